"""What a trial reports each epoch: two proxies measured by frozen judges on anonymised validation images, and a score.

* privacy proxy ``identity_acc``: how often the identity judge (trained on original images) still names the
  *source* identity of an anonymised image. Chance is 1/N_id; lower is better, and below chance is normal because
  the generator pushes faces towards another identity.
* utility proxy ``expression_acc``: how often the expression judge names the source expression. Higher is better.
* ``score = expression_acc - privacy_weight * max(0, identity_acc - 1/N_id)``: utility, minus a penalty for every
  point of identity leakage above chance. Leakage below chance earns nothing, so the search cannot trade expression
  for an ever "more anonymous" face once identity is at chance. ASHA ranks trials by it.

Every validation image is anonymised with a fixed target identity that is never its own (drawn once per search), so
all trials are judged on the same images with the same targets.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pprl.train.batches import to_model_range, to_uint8

SCORE = "score"  # the metric ASHA and the best-trial choice use (mode: max)


def score(expression_acc: float, identity_acc: float, num_identities: int, privacy_weight: float) -> float:
    """The documented scalarisation (see module docstring and docs/tuning.md)."""
    return expression_acc - privacy_weight * privacy_leak(identity_acc, num_identities)


def privacy_leak(identity_acc: float, num_identities: int) -> float:
    """Identity accuracy above chance, 0 at or below it."""
    return max(0.0, identity_acc - 1.0 / num_identities)


@dataclass
class ValidationSet:
    """Original validation images at the model's size, their labels, and the fixed anonymisation targets."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    identity: np.ndarray  # int64 (N,)
    expression: np.ndarray  # int64 (N,)
    targets: np.ndarray  # int64 (N,), never equal to identity

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.identity) == len(self.expression) == len(self.targets):
            raise ValueError("validation images, labels and targets differ in length")
        if np.any(self.targets == self.identity):
            raise ValueError("a validation target equals its source identity")


@torch.no_grad()
def anonymize(encoder: nn.Module, decoder: nn.Module, images: np.ndarray, targets: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 NHWC -> uint8 NHWC rendered as ``targets`` from the latent mean (what ``Anonymizer.run`` does).

    Networks run in eval mode (BatchNorm running statistics, no dropout) and get their previous mode back.
    """
    device = next(encoder.parameters()).device
    modes = encoder.training, decoder.training
    encoder.eval()
    decoder.eval()
    try:
        out = []
        for start in range(0, len(images), batch_size):
            x = to_model_range(np.array(images[start : start + batch_size])).to(device)
            c = torch.as_tensor(targets[start : start + batch_size], dtype=torch.int64, device=device)
            mean, _ = encoder(x)
            out.append(to_uint8(decoder(mean, c)))
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    return np.concatenate(out)


def evaluate(encoder: nn.Module, decoder: nn.Module, judges, val: ValidationSet, num_identities: int, privacy_weight: float) -> dict[str, float]:
    """Both raw proxies, the target-identity hit rate, the leakage and the score for one model state."""
    fakes = anonymize(encoder, decoder, val.images, val.targets)
    predicted_identity = judges.predict_identity(fakes)
    identity_acc = float(np.mean(predicted_identity == val.identity))
    expression_acc = judges.expression_accuracy(fakes, val.expression)
    return {
        "identity_acc": identity_acc,
        "expression_acc": expression_acc,
        "target_acc": float(np.mean(predicted_identity == val.targets)),
        "privacy_leak": privacy_leak(identity_acc, num_identities),
        SCORE: score(expression_acc, identity_acc, num_identities, privacy_weight),
    }
