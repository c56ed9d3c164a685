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
    latent_exp_logits: torch.Tensor | None = None  # the latent expression head on the latent means
    cycle: tuple[torch.Tensor, torch.Tensor] | None = None  # (averaged encoder's mean of the fakes, of their sources)


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
    if ex.latent_exp_logits is not None:
        parts["g_latent_exp"] = F.cross_entropy(ex.latent_exp_logits.float(), expression)
    if ex.cycle is not None:
        parts["g_cycle"] = F.l1_loss(ex.cycle[0].float(), ex.cycle[1].float())
    total = sum(weights[name] * value for name, value in parts.items())
    return LossParts(total, parts)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(dim=1) == target).float().mean()
