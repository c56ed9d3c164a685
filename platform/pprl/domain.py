"""The domain check: does a face look like the faces the model was trained on?

A model renders faces unlike its training faces badly (a model trained on the synthetic cartoons turns a real face
into a patch of colour noise) and says nothing. So every bundle carries statistics of its training faces in the
encoder's latent space (``domain.npz``), and inference scores each face against them:

- the **distance** is the Mahalanobis distance of the face's latent mean from the training faces' mean, under their
  covariance (plus a ridge of ``RIDGE`` times its mean eigenvalue, so that latent directions the encoder does not use
  at all keep it invertible; 2,048 faces determine it well for the presets' 64-128 latent dimensions);
- the **percentile** is the share of training faces, in %, whose own distance is smaller: about uniform between 0 and
  100 for faces like the training faces, 100 for a face farther out than all of them. The reference distances are
  of training faces held out of the mean and covariance, so a training-like face is not scored as closer than it is;
- a face is **out of domain** when its percentile exceeds ``OUT_OF_DOMAIN_PERCENTILE`` (99): farther out than 99 % of
  the training faces, which about 1 in 100 faces like the training faces is too.

The statistics are written when a bundle is exported (``pprl.train.export.write_bundle(training=...)``) and can be
added to an older bundle with ``pprl.train.export.attach_training_statistics`` (``pprl domain-stats``). A bundle without them still loads: the
scores are then absent (null) and the run says so once (``missing_note``).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pprl.train.export import TrainingFaces, read_bundle_file, write_bundle_file

log = logging.getLogger(__name__)

DOMAIN_FILE = "domain.npz"
DOMAIN_FORMAT = "pprl-domain/1"
DOMAIN_FACES = 4096  # training faces sampled for the statistics: half fit the mean and covariance, half the reference
RIDGE = 1e-6  # covariance -> C + r * mean eigenvalue * I
OUT_OF_DOMAIN_PERCENTILE = 99.0
MOSTLY = 0.5  # a run warns when more than this share of its faces is out of domain
WARNING = "this model was trained on faces unlike these: train on your own faces, see docs/training.md"


@dataclass(frozen=True)
class DomainScores:
    """Per face: Mahalanobis distance, percentile among the training faces (0-100), and the out-of-domain flag."""

    distance: np.ndarray  # float32 (N,)
    percentile: np.ndarray  # float32 (N,)
    out_of_domain: np.ndarray  # bool (N,)


@dataclass(frozen=True)
class DomainStats:
    """The training faces in latent space: mean, (shrunk) precision matrix and the held-out faces' sorted distances."""

    mean: np.ndarray  # float64 (D,)
    precision: np.ndarray  # float64 (D, D)
    reference: np.ndarray  # float64 (M,), ascending
    faces: int  # training faces used (fit + reference)

    @classmethod
    def fit(cls, latents: np.ndarray) -> DomainStats:
        """Fit on the first half of ``latents`` (N, D), take the reference distances of the second half."""
        latents = np.asarray(latents, np.float64)
        if latents.ndim != 2 or len(latents) < 4:
            raise ValueError(f"domain statistics need at least 4 latents shaped (N, D), got {latents.shape}")
        half = len(latents) // 2
        fit, held_out = latents[:half], latents[half:]
        cov = np.atleast_2d(np.cov(fit, rowvar=False))
        dim = cov.shape[0]
        ridged = cov + RIDGE * (np.trace(cov) / dim + 1e-12) * np.eye(dim)
        stats = cls(fit.mean(0), np.linalg.inv(ridged), np.zeros(0), len(latents))
        return cls(stats.mean, stats.precision, np.sort(stats.distance(held_out)), len(latents))

    def distance(self, latents: np.ndarray) -> np.ndarray:
        d = np.asarray(latents, np.float64).reshape(-1, len(self.mean)) - self.mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, self.precision, d), 0.0))

    def percentile(self, distances: np.ndarray) -> np.ndarray:
        """Share of the reference (held-out training) faces, in %, whose distance is smaller."""
        return 100.0 * np.searchsorted(self.reference, np.asarray(distances, np.float64), side="left") / len(self.reference)

    def score(self, latents: np.ndarray) -> DomainScores:
        distance = self.distance(latents)
        percentile = self.percentile(distance)
        return DomainScores(distance.astype(np.float32), percentile.astype(np.float32), percentile > OUT_OF_DOMAIN_PERCENTILE)

    def summary(self) -> dict[str, Any]:
        """What ``bundle.json`` says about the statistics (with the file name and hash ``write_domain`` adds)."""
        ref = self.reference
        return {"format": DOMAIN_FORMAT, "faces": self.faces, "latent_dim": len(self.mean), "ridge": RIDGE,
                "out_of_domain_percentile": OUT_OF_DOMAIN_PERCENTILE,
                "distance_median": round(float(np.median(ref)), 4), "distance_p99": round(float(np.percentile(ref, 99)), 4)}  # fmt: skip

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, precision=self.precision, reference=self.reference, faces=np.int64(self.faces))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, source: str = DOMAIN_FILE) -> DomainStats:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                stats = cls(z["mean"], z["precision"], z["reference"], int(z["faces"]))
        except (ValueError, KeyError, OSError) as err:
            raise ValueError(f"{source}: not a {DOMAIN_FORMAT} file ({err})") from None
        dim = len(stats.mean)
        if stats.precision.shape != (dim, dim) or stats.reference.ndim != 1 or not len(stats.reference):
            raise ValueError(f"{source}: inconsistent shapes (mean {stats.mean.shape}, precision {stats.precision.shape})")
        return stats


def sample_indices(n: int, limit: int = DOMAIN_FACES, seed: int = 0) -> np.ndarray:
    """Which of ``n`` training faces the statistics use: all of them up to ``limit``, else a fixed random sample."""
    if n <= limit:
        return np.random.default_rng(seed).permutation(n)
    return np.random.default_rng(seed).choice(n, limit, replace=False)


def training_faces(dataset, size: int, limit: int = DOMAIN_FACES) -> TrainingFaces:
    """The sample of ``dataset``'s training split (a ``pprl.data.dataset.Dataset``) at ``size`` px that the bundle's
    statistics are taken from."""
    train = dataset.split("train")
    if train.empty:
        raise ValueError(f"{dataset.root}: no training split to take the domain statistics from")
    rows = train.iloc[sample_indices(len(train), limit)]
    return TrainingFaces(dataset.load_images(rows, size), rows["identity"].to_numpy())


def write_domain(uri: str, stats: DomainStats) -> dict[str, Any]:
    """Write ``domain.npz`` into the bundle folder ``uri``; returns the ``domain`` entry for its ``bundle.json``."""
    return {**stats.summary(), **write_bundle_file(uri, DOMAIN_FILE, stats.to_bytes())}


def read_domain(uri: str, info: dict[str, Any]) -> DomainStats | None:
    """The statistics ``bundle.json`` (``info``) names, or None when it names none (a bundle exported before them).

    A file that is named but missing, altered or of another latent size is an error naming it: the bundle is broken."""
    data, target = read_bundle_file(uri, info, "domain", DOMAIN_FILE)
    if data is None:
        return None
    stats = DomainStats.from_bytes(data, target)
    if "latent_dim" in info and len(stats.mean) != int(info["latent_dim"]):
        raise ValueError(f"{target}: statistics of a {len(stats.mean)}-d latent, the model's is {info['latent_dim']}-d")
    return stats


def missing_note(uri: str) -> str:
    """The one line a run logs when the bundle has no domain statistics."""
    return (f"{uri}: the bundle has no statistics of its training faces ({DOMAIN_FILE}), so faces get no out-of-domain "
            "score; add them with `pprl domain-stats --model BUNDLE --data TRAINING_DATA` (docs/footage.md)")  # fmt: skip


def mostly_out_of_domain(faces: int, out_of_domain: int) -> str | None:
    """The run's warning, in plain words, when more than half its scored faces are out of domain; else None."""
    if faces <= 0 or out_of_domain / faces <= MOSTLY:
        return None
    return f"{out_of_domain} of {faces} faces ({out_of_domain / faces:.0%}) are out of domain: {WARNING}"
