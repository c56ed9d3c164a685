"""Inference API shared by evaluation, serving and footage: load a bundle, anonymise faces in batches.

    anon = Anonymizer.load("s3://models/ferg/model")
    out = anon.anonymize(faces, target_identities=3)        # uint8 (N, S, S, 3)
    res = anon.run(faces, [0, 4, 2])                         # images + latents + expression probabilities
    res.domain.percentile                                    # how unlike the training faces each face is (pprl.domain)

Images are accepted as one uint8 HWC array, a uint8 NHWC array, a list of HWC arrays of any sizes, or a float
tensor NCHW in [-1, 1]; they are resized to the model's size here. By default the latent MEAN is decoded, so the same
input and target give the same output; ``sample=True`` draws from the posterior as the authors' Keras code did.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pprl import storage
from pprl.config import Config
from pprl.domain import DomainScores, DomainStats, read_domain
from pprl.eraser import Erasers, read_erasers
from pprl.models.networks import build_networks, canonical_reencoding, reparameterize
from pprl.train.export import WEIGHTS, bundle_info, latent_kind, read_config

ImageInput = np.ndarray | torch.Tensor | Sequence[np.ndarray]


@dataclass
class AnonymizeResult:
    images: np.ndarray  # uint8 (N, S, S, 3)
    latents: np.ndarray  # float32 (N, latent_dim): the exported latent (Anonymizer._latents)
    expression_probs: np.ndarray  # float32 (N, N_exp): D's expression head on the INPUT face
    targets: np.ndarray  # int64 (N,): the identity each face was rendered with
    domain: DomainScores | None = None  # how unlike the training faces each input is; None without domain statistics


class Anonymizer:
    def __init__(self, config: Config, state: dict[str, dict], info: dict, device: str | torch.device | None = None,
                 domain: DomainStats | None = None, erasers: Erasers | None = None) -> None:  # fmt: skip
        self.config = config
        self.info = info
        self.domain = domain  # statistics of the training faces in latent space (pprl.domain); None: no scores
        self.erasers = erasers  # identity erasers of the rendered and the exported latent (pprl.eraser); None: none
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.encoder, self.decoder, self.discriminator = (m.to(self.device).eval() for m in build_networks(config.model))
        self.encoder.load_state_dict(state["encoder"])
        self.decoder.load_state_dict(state["decoder"])
        self.discriminator.load_state_dict(state["discriminator"])
        model = config.model
        self.image_size, self.num_identities = model.image_size, model.num_identities
        self.num_expressions, self.latent_dim = model.num_expressions, model.latent_dim
        self.version = str(info.get("version", "unversioned"))
        self.latent_kind = latent_kind(model, erased=erasers is not None)  # what ``run(...).latents`` holds
        self.batch_size = 256

    @classmethod
    def load(cls, uri: str, device: str | None = None) -> Anonymizer:
        info = bundle_info(uri)
        config = read_config(uri)
        state = torch.load(io.BytesIO(storage.read_bytes(storage.join(uri, WEIGHTS))), map_location="cpu", weights_only=True)
        return cls(config, state, info, device, read_domain(uri, info), read_erasers(uri, info))

    # ------------------------------------------------------------------------------------------ inputs
    def to_tensor(self, images: ImageInput) -> torch.Tensor:
        """Any accepted image input -> float32 NCHW in [-1, 1] at the model's size, on the model's device."""
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"float tensors must be NCHW with 3 channels in [-1, 1], got shape {tuple(images.shape)}")
            return self._resize(images.to(self.device, torch.float32))
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("no images given (an empty list)")
            return torch.cat([self.to_tensor(np.asarray(im)) for im in images])
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (H, W, 3) or (N, H, W, 3) arrays, got dtype {array.dtype}")
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[1] < 2 or array.shape[2] < 2:
            raise ValueError(f"images must be RGB shaped (H, W, 3) or (N, H, W, 3), got {array.shape}")
        if len(array) == 0:
            raise ValueError("no images given (an array of 0 images)")
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device).permute(0, 3, 1, 2).float()
        return self._resize(tensor.sub_(127.5).div_(127.5))

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        return F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False)

    def targets_for(self, n: int, target_identities: int | Sequence[int] | np.ndarray) -> torch.Tensor:
        targets = np.full(n, target_identities, dtype=np.int64) if np.isscalar(target_identities) else np.asarray(target_identities, np.int64)
        if targets.shape != (n,):
            raise ValueError(f"got {targets.size} target identities for {n} images")
        bad = targets[(targets < 0) | (targets >= self.num_identities)]
        if bad.size:
            raise ValueError(f"target identity {int(bad[0])} is out of range: this model has identities 0..{self.num_identities - 1}")
        return torch.from_numpy(targets).to(self.device)

    @staticmethod
    def to_uint8(x: torch.Tensor) -> np.ndarray:
        return x.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    # ------------------------------------------------------------------------------------------ inference
    def _latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder mean, its log-variance, the mean faces are rendered from, the exported latent) of faces ``x``.

        With erasers (``model.erase_identity``) faces are rendered from the erased mean, and the exported latent is
        the canonical re-encoding of that, erased again (pprl.eraser); the encoder's own mean stays for the domain check."""
        mean, logvar = self.encoder(x)
        render = mean if self.erasers is None else self.erasers.render.apply_torch(mean)
        exported = canonical_reencoding(self.encoder, self.decoder, render, self.config.model)
        if self.erasers is not None:
            exported = self.erasers.export.apply_torch(exported)
        return mean, logvar, render, exported

    @torch.no_grad()
    def run(
        self,
        images: ImageInput,
        target_identities: int | Sequence[int] | np.ndarray,
        sample: bool = False,
        latent_filter: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> AnonymizeResult:
        """One batched pass: anonymised faces, their exported latents, expression probabilities and domain scores of
        the inputs.

        ``latent_filter`` maps the (N, latent_dim) latents about to be decoded to the ones to decode instead (footage's
        per-track smoothing); the returned ``latents`` and domain scores stay those of each face itself."""
        x = self.to_tensor(images)
        targets = self.targets_for(len(x), target_identities)
        means, codes, latents, probs = [], [], [], []  # encoder's own means, rendered from, exported, expression
        for i in range(0, len(x), self.batch_size):
            chunk = x[i : i + self.batch_size]
            mean, logvar, render, latent = self._latents(chunk)
            means.append(mean.float().cpu().numpy())
            codes.append(reparameterize(render, logvar) if sample else render)
            latents.append(latent.float().cpu().numpy())
            probs.append(torch.softmax(self.discriminator(chunk)[2].float(), 1).cpu().numpy())
        z = torch.cat(codes)
        if latent_filter is not None:
            z = torch.as_tensor(np.asarray(latent_filter(z.float().cpu().numpy()), np.float32), device=self.device).to(z.dtype)
        outs = [self.to_uint8(self.decoder(z[i : i + self.batch_size], targets[i : i + self.batch_size])) for i in range(0, len(x), self.batch_size)]
        domain = self.domain.score(np.concatenate(means)) if self.domain is not None else None
        return AnonymizeResult(np.concatenate(outs), np.concatenate(latents), np.concatenate(probs), targets.cpu().numpy(), domain)

    def anonymize(self, images: ImageInput, target_identities: int | Sequence[int] | np.ndarray, sample: bool = False) -> np.ndarray:
        return self.run(images, target_identities, sample).images

    @torch.no_grad()
    def encode(self, images: ImageInput) -> np.ndarray:
        """The latent means these images' outputs would carry (``run(...).latents``)."""
        x = self.to_tensor(images)
        return np.concatenate([self._latents(x[i : i + self.batch_size])[3].float().cpu().numpy() for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def input_latents(self, images: ImageInput) -> np.ndarray:
        """The encoder's own latent means of the input faces, before any canonical re-encoding: the space where the
        domain check compares faces with the training faces (a re-encoding shows a face the model rendered)."""
        x = self.to_tensor(images)
        return np.concatenate([self.encoder(x[i : i + self.batch_size])[0].float().cpu().numpy() for i in range(0, len(x), self.batch_size)])

    @torch.no_grad()
    def predict_expression(self, images: ImageInput) -> np.ndarray:
        return self._head_probs(images, 2)

    @torch.no_grad()
    def predict_identity(self, images: ImageInput) -> np.ndarray:
        """D's identity head: (N, num_identities) probabilities of which training identity each face shows."""
        return self._head_probs(images, 1)

    @torch.no_grad()
    def _head_probs(self, images: ImageInput, head: int) -> np.ndarray:
        x = self.to_tensor(images)
        chunks = [torch.softmax(self.discriminator(x[i : i + self.batch_size])[head].float(), 1) for i in range(0, len(x), self.batch_size)]
        return torch.cat(chunks).cpu().numpy()

    @torch.no_grad()
    def morph(self, a: ImageInput, b: ImageInput, steps: int, identity: int) -> np.ndarray:
        """Decode the latents ``anonymize`` renders from, interpolated from ``a`` to ``b``, with one fixed identity:
        (steps, S, S, 3)."""
        if steps < 2:
            raise ValueError(f"steps must be >= 2, got {steps}")
        za, zb = (self._latents(self.to_tensor(im)[:1])[2] for im in (a, b))
        alphas = torch.linspace(0, 1, steps, device=self.device)[:, None]
        z = (1 - alphas) * za + alphas * zb
        return self.to_uint8(self.decoder(z, self.targets_for(steps, identity)))

    @torch.no_grad()
    def complete(self, images: ImageInput, mask: np.ndarray, identities: int | Sequence[int] | None = None) -> np.ndarray:
        """Fill the masked pixels (True = missing) from the decoder: occlude, encode, decode, paste the fill back.

        The occluded pixels are set to 0 in [-1, 1] (mid-grey) as in the authors' script. ``identities`` defaults to
        the identity D's head sees in each occluded face (the authors hard-coded one code; the face's own fits best).
        """
        x = self.to_tensor(images)
        m = torch.as_tensor(np.asarray(mask, dtype=bool), device=self.device)
        if m.dim() == 2:
            m = m.expand(len(x), -1, -1)
        if tuple(m.shape) != (len(x), self.image_size, self.image_size):
            raise ValueError(f"mask must be ({self.image_size}, {self.image_size}) or (N, {self.image_size}, {self.image_size}), got {tuple(m.shape)}")
        m = m[:, None].float()
        occluded = x * (1 - m)
        codes = self.discriminator(occluded)[1].argmax(1) if identities is None else self.targets_for(len(x), identities)
        decoded = self.decoder(self.encoder(occluded)[0], codes)
        return self.to_uint8(occluded + decoded * m)
