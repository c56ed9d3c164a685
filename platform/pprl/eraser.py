"""The identity erasers: linear maps fitted at export that leave no linear trace of identity in the latents.

An adversarially trained encoder hides identity from the adversary it was trained against, not from the next one:
a probe trained afterwards reads what the in-training adversary missed (Song and Shmatikov, "Overlearning Reveals
Sensitive Attributes", ICLR 2020). So a bundle whose config sets ``model.erase_identity`` carries ``eraser.npz``,
two LEACE erasers (Belrose et al., "LEACE: Perfect linear concept erasure in closed form", NeurIPS 2023) fitted on
the training faces and their identities when the bundle is exported:

- ``render``, fitted on the encoder's latent means: faces are rendered from the erased mean, so the decoder gets no
  linear trace of the source's identity to draw (the images attack 2 and the inversion attack read);
- ``export``, fitted on the exported latents (the canonical re-encodings of the erased means,
  ``model.latent_cycles``): what serve, batch jobs and footage hand out as ``latent``.

After an eraser the class-conditional means of its latents are equal on the faces it was fitted on, so no linear
classifier reads identity from them better than a constant guess, and it changes the latent as little as that
allows (least squares in the whitened space). Expression survives: each removes at most ``num_identities - 1``
directions of the latent. The erasers are linear, so a nonlinear attacker may still read something; the attack
suite's kNN and MLP probes and its image attackers measure exactly that on the test faces (docs/model.md, "Identity
erasers"; docs/evaluation.md).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pprl.train.export import ERASER_FILE, read_bundle_file, write_bundle_file

ERASER_FORMAT = "pprl-eraser/1"

PARTS, ARRAYS = ("render", "export"), ("mean", "projection", "faces")  # eraser.npz holds f"{part}_{array}"
EIGEN_FLOOR = 1e-8  # covariance eigenvalues below this (unused latent directions) are not whitened
# singular values of the whitened cross-covariance (at most 0.5: correlations times the labels' spread) below this are
# rounding noise, e.g. of latents that were erased before, in float32
RANK_TOLERANCE = 1e-5


@dataclass(frozen=True)
class IdentityEraser:
    """``x -> x - (x - mean) @ projection.T``: LEACE's oblique projection for the identity labels it was fitted on."""

    mean: np.ndarray  # float64 (D,)
    projection: np.ndarray  # float64 (D, D), rank <= number of identities - 1
    faces: int  # training faces it was fitted on

    @classmethod
    def fit(cls, latents: np.ndarray, identities: np.ndarray, num_identities: int) -> IdentityEraser:
        """Fit on (N, D) latents and their (N,) identities in ``0..num_identities-1``."""
        x = np.asarray(latents, np.float64)
        y = np.asarray(identities)
        if x.ndim != 2 or y.shape != (len(x),):
            raise ValueError(f"the eraser needs latents (N, D) and N identities, got {x.shape} and {y.shape}")
        if len(np.unique(y)) < 2:
            raise ValueError(f"the eraser needs faces of at least 2 identities, got {len(np.unique(y))}")
        if y.min() < 0 or y.max() >= num_identities:
            raise ValueError(f"identities must be in 0..{num_identities - 1}, got {int(y.min())}..{int(y.max())}")
        mean = x.mean(0)
        centred = x - mean
        evals, evecs = np.linalg.eigh(centred.T @ centred / len(x))
        used = evals > EIGEN_FLOOR * max(float(evals.max()), EIGEN_FLOOR)
        root = np.where(used, np.sqrt(np.clip(evals, 0, None)), 0.0)
        inv_root = np.where(used, 1.0 / np.where(used, root, 1.0), 0.0)
        whiten, unwhiten = (evecs * inv_root) @ evecs.T, (evecs * root) @ evecs.T
        onehot = np.eye(num_identities)[y]
        cross = centred.T @ (onehot - onehot.mean(0)) / len(x)
        u, s, _ = np.linalg.svd(whiten @ cross, full_matrices=False)
        basis = u[:, s > RANK_TOLERANCE]
        return cls(mean, unwhiten @ basis @ basis.T @ whiten, len(x))

    @classmethod
    def identity(cls, dim: int) -> IdentityEraser:
        """The eraser that changes nothing."""
        return cls(np.zeros(dim), np.zeros((dim, dim)), 0)

    def apply(self, latents: np.ndarray) -> np.ndarray:
        x = np.asarray(latents, np.float64)
        return (x - (x - self.mean) @ self.projection.T).astype(np.float32)

    def apply_torch(self, latents: torch.Tensor) -> torch.Tensor:
        """``apply`` on a tensor, on its device and in its dtype."""
        mean = torch.as_tensor(self.mean, dtype=latents.dtype, device=latents.device)
        projection = torch.as_tensor(self.projection, dtype=latents.dtype, device=latents.device)
        return latents - (latents - mean) @ projection.T

    @property
    def rank(self) -> int:
        return int(np.linalg.matrix_rank(self.projection))

    def arrays(self, part: str) -> dict[str, np.ndarray]:
        return {f"{part}_{name}": value for name, value in zip(ARRAYS, (self.mean, self.projection, np.int64(self.faces)), strict=True)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], part: str, source: str) -> IdentityEraser:
        eraser = cls(arrays[f"{part}_mean"], arrays[f"{part}_projection"], int(arrays[f"{part}_faces"]))
        dim = len(eraser.mean)
        if eraser.mean.ndim != 1 or eraser.projection.shape != (dim, dim):
            raise ValueError(f"{source}: inconsistent {part} shapes (mean {eraser.mean.shape}, projection {eraser.projection.shape})")
        return eraser


@dataclass(frozen=True)
class Erasers:
    """A bundle's pair (module docstring): ``render`` for the latent faces are rendered from, ``export`` for the
    latent outputs carry."""

    render: IdentityEraser
    export: IdentityEraser

    def summary(self) -> dict[str, Any]:
        """What ``bundle.json`` says about them (with the file name and hash ``write_erasers`` adds)."""
        return {"format": ERASER_FORMAT, "method": "leace", "concept": "identity", "faces": self.export.faces,
                "latent_dim": len(self.export.mean), "rank": {"render": self.render.rank, "export": self.export.rank}}  # fmt: skip

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **self.render.arrays(PARTS[0]), **self.export.arrays(PARTS[1]))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = ERASER_FILE) -> Erasers:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {f"{part}_{name}": z[f"{part}_{name}"] for part in PARTS for name in ARRAYS}
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"{source}: not a {ERASER_FORMAT} file ({err})") from None
        return cls(*(IdentityEraser.from_arrays(arrays, part, source) for part in PARTS))


def write_erasers(uri: str, erasers: Erasers) -> dict[str, Any]:
    """Write ``eraser.npz`` into the bundle folder ``uri``; returns the ``eraser`` entry for its ``bundle.json``."""
    return {**erasers.summary(), **write_bundle_file(uri, ERASER_FILE, erasers.to_bytes())}


def read_erasers(uri: str, info: dict[str, Any]) -> Erasers | None:
    """The erasers ``bundle.json`` (``info``) names, or None when it names none; a broken file is an error naming it."""
    data, target = read_bundle_file(uri, info, "eraser", ERASER_FILE)
    if data is None:
        return None
    erasers = Erasers.from_bytes(data, target)
    dim = len(erasers.export.mean)
    if "latent_dim" in info and {dim, len(erasers.render.mean)} != {int(info["latent_dim"])}:
        raise ValueError(f"{target}: erasers of a {dim}-d latent, the model's is {info['latent_dim']}-d")
    return erasers
