"""PPRL-VGAN losses, as pure functions of network outputs (testable without any network).

Notation: x real images, y_id / y_exp their labels, c target identity codes, x' = Dec(Enc(x), c).
Discriminator: BCE on real/fake with noisy label smoothing, cross-entropy of the identity and expression heads.
Generator: KL + adversarial + identity-of-target + expression-of-source, plus the switchable deviations
(self-reconstruction, latent identity adversary) documented in docs/model.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Heads = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (real/fake logit, identity logits, expression logits)


@dataclass
class LossParts:
    """A weighted total plus its unweighted parts (for logging)."""

    total: torch.Tensor
    parts: dict[str, torch.Tensor]


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z|x) || N(0, I)) summed over latent dimensions and averaged over the batch, as in the Keras code."""
    return (-0.5 * (1 + logvar - mean.square() - logvar.exp()).sum(dim=1)).mean()


def noisy_labels(n: int, bounds: tuple[float, float], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Per-sample targets drawn from U(low, high): the authors' noisy label smoothing."""
    low, high = bounds
    return low + (high - low) * torch.rand(n, generator=generator).to(device)


def discriminator_loss(
    heads: Heads,
    rf_target: torch.Tensor,
    identity: torch.Tensor,
    expression: torch.Tensor,
    weights: tuple[float, float, float],
    prefix: str,
) -> LossParts:
    """One discriminator step (real or fake batch): weighted BCE + identity CE + expression CE."""
    rf, id_logits, exp_logits = (h.float() for h in heads)
    bce = F.binary_cross_entropy_with_logits(rf, rf_target)
    parts = {f"{prefix}_bce": bce}
    total = weights[0] * bce
    if weights[1]:
        parts[f"{prefix}_id"] = F.cross_entropy(id_logits, identity)
        total = total + weights[1] * parts[f"{prefix}_id"]
    if weights[2]:
        parts[f"{prefix}_exp"] = F.cross_entropy(exp_logits, expression)
        total = total + weights[2] * parts[f"{prefix}_exp"]
    return LossParts(total, parts)


def confusion_loss(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the uniform distribution: minimal when a classifier cannot tell the classes apart."""
    return -F.log_softmax(logits.float(), dim=1).mean()


@dataclass
class GeneratorExtras:
    """Inputs of the switchable deviations (docs/model.md); each is None when its weight is 0."""

    recon: tuple[torch.Tensor, torch.Tensor] | None = None  # (reconstruction with the source code, input)
    latent_logits: torch.Tensor | None = None  # the latent identity classifier on the latent means
    cycle_mean: torch.Tensor | None = None  # the encoder's latent means of the fakes
    mmd: torch.Tensor | None = None  # identity_mmd of the latent means
    features: tuple[torch.Tensor, torch.Tensor] | None = None  # D's features of (reconstruction, input)


def generator_loss(
    heads: Heads,
    target: torch.Tensor,
    expression: torch.Tensor,
    mean: torch.Tensor,
    logvar: torch.Tensor,
    weights: dict[str, float],
    extras: GeneratorExtras | None = None,
) -> LossParts:
    """The authors' generator objective (KL, adversarial, identity of the target, expression of the source) plus
    the deviations present in ``extras``."""
    rf, id_logits, exp_logits = (h.float() for h in heads)
    parts = {
        "g_kl": kl_divergence(mean.float(), logvar.float()),
        "g_adv": F.binary_cross_entropy_with_logits(rf, torch.ones_like(rf)),
        "g_id": F.cross_entropy(id_logits, target),
        "g_exp": F.cross_entropy(exp_logits, expression),
    }
    ex = extras or GeneratorExtras()
    if ex.recon is not None:
        parts["g_recon"] = F.l1_loss(ex.recon[0].float(), ex.recon[1].float())
    if ex.latent_logits is not None:
        parts["g_latent"] = confusion_loss(ex.latent_logits)
    if ex.cycle_mean is not None:
        parts["g_cycle"] = latent_cycle_loss(ex.cycle_mean, mean)
    if ex.mmd is not None:
        parts["g_mmd"] = ex.mmd
    if ex.features is not None:
        parts["g_feat"] = F.l1_loss(ex.features[0].float(), ex.features[1].float())
    total = sum(weights[name] * value for name, value in parts.items())
    return LossParts(total, parts)


def latent_cycle_loss(cycle_mean: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Squared distance of the fakes' latent means to the sources', relative to the spread of the sources' means,
    so that shrinking every code does not lower it."""
    target = mean.detach().float()
    return F.mse_loss(cycle_mean.float(), target) / target.var(dim=0).mean().clamp_min(1e-6)


def identity_mmd(mean: torch.Tensor, identity: torch.Tensor, num_identities: int) -> torch.Tensor:
    """How far each identity's latent means are, in distribution, from the other identities': the mean over
    identities of the unbiased MMD² between "this identity" and "the rest" (Gaussian kernels at 1/4, 1 and 4 times
    the median squared distance), as in the Variational Fair Autoencoder. Zero in expectation when every identity's
    codes are distributed alike, so no classifier can tell them apart; the unbiased form does not reward collapse.
    """
    z = mean.float()
    n = len(z)
    d2 = torch.cdist(z, z).square()
    scale = d2.detach()[d2.detach() > 0].median().clamp_min(1e-6) if n > 1 else d2.new_tensor(1.0)
    kernel = sum(torch.exp(-d2 / (scale * f)) for f in (0.25, 1.0, 4.0))
    off = kernel * (1 - torch.eye(n, device=z.device))
    group = F.one_hot(identity, num_identities).float()
    n_in = group.sum(0)
    keep = (n_in >= 2) & (n - n_in >= 2)
    if not keep.any():
        return z.sum() * 0
    group, n_in = group[:, keep], n_in[keep]
    rest, n_out = 1 - group, n - n_in
    within = (group * (off @ group)).sum(0) / (n_in * (n_in - 1))
    others = (rest * (off @ rest)).sum(0) / (n_out * (n_out - 1))
    across = (group * (kernel @ rest)).sum(0) / (n_in * n_out)
    return (within + others - 2 * across).mean()


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == target).float().mean()
