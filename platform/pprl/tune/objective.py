"""What a trial reports each epoch: the audit's attacks, cut down to seconds, on its anonymised validation images.

Privacy: attackers trained with the *source* identities on one half of the validation images (stratified by identity)
and scored on the other half, so they can read identity wherever the model leaves it (the attack suite of
``pprl evaluate``, pprl.evaluate.attacks, on the validation set instead of train/test):

* ``latent_knn_acc``, ``latent_linear_acc``: the suite's cosine kNN and logistic-regression probes (``probe_spec``,
  standardised inputs) on the exported latent (eval mode; with ``model.erase_identity``, rendered and exported
  through identity erasers fitted on the attackers' half, as the export fits them on the training faces); bar
  chance + ``LATENT_MARGIN``;
* ``output_knn_acc``, ``output_linear_acc``: the same probes on the frozen identity judge's penultimate features of the
  anonymised images (an attack 2 on the outputs); bar chance + ``IMAGE_MARGIN``.

Utility: ``expression_acc``, the frozen expression judge (attack 1's CNN, trained on originals) on the anonymised
images; bar ``EXPRESSION_BAR``. ``identity_acc`` and ``target_acc`` (the identity judge names the source / the target)
are kept for reading the results: the judge is fooled by construction, so they are no privacy axis.

* ``privacy_leak``: the worst attack's identity accuracy above chance 1/N_id (negative when all are below chance);
* ``score = expression_acc - privacy_weight * max(0, privacy_leak)``: ASHA ranks trials by it. Leakage below chance
  earns nothing, so the search cannot trade expression for an ever "more anonymous" latent;
* ``{attack}_pass`` per attack and ``audit_pass`` (all of them): whether the figures meet the audit's bars.

Every validation image is anonymised with a fixed target identity that is never its own (drawn once per search), so
all trials are judged on the same images with the same targets and the same halves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pprl.config import ModelConfig
from pprl.eraser import IdentityEraser
from pprl.evaluate.attacks import EXPRESSION_BAR, IMAGE_MARGIN, LATENT_MARGIN, bar_op, meets
from pprl.evaluate.classifiers import accuracy, fit, probe_spec, stratified_holdout, torch_threads
from pprl.models.networks import canonical_reencoding
from pprl.train.batches import to_model_range, to_uint8

SCORE = "score"  # the metric ASHA and the best-trial choice use (mode: max)
PROBES = ("knn", "linear")  # the suite's fast probe archs (classifiers.probe_spec)
PROBE_EPOCHS, PROBE_PATIENCE = 200, 8  # the linear probe trains to convergence, as in the suite's quick profile
SPACES = {"latent": LATENT_MARGIN, "output": IMAGE_MARGIN}  # what the probes read -> the audit's margin over chance
PRIVACY_ATTACKS = {f"{space}_{arch}": margin for space, margin in SPACES.items() for arch in PROBES}
ATTACKS = (*PRIVACY_ATTACKS, "expression")  # every figure with a bar; its column is f"{name}_acc"


def score(expression_acc: float, leak: float, privacy_weight: float) -> float:
    """The documented scalarisation (see module docstring and docs/tuning.md)."""
    return expression_acc - privacy_weight * max(0.0, leak)


def bar(name: str, num_identities: int) -> float:
    """The audit's bar for one of ATTACKS: chance 1/N_id plus the attack's margin, or the expression bar."""
    return EXPRESSION_BAR if name == "expression" else 1.0 / num_identities + PRIVACY_ATTACKS[name]


def audit(figures: dict[str, float], num_identities: int) -> dict[str, float | bool]:
    """``figures`` (attack -> accuracy, every name of ATTACKS) -> the leak, the pass of each bar and of all of them."""
    passed = {f"{name}_pass": meets(name, figures[name], bar(name, num_identities)) for name in ATTACKS}
    leak = max(figures[name] for name in PRIVACY_ATTACKS) - 1.0 / num_identities
    return {"privacy_leak": leak, **passed, "audit_pass": all(passed.values())}


def failed_bars(row, num_identities: int) -> list[str]:
    """What a reported row (a dict or a pandas row) misses, e.g. ``latent_knn 0.930 > 0.217``."""
    return [f"{name} {row[f'{name}_acc']:.3f} {'<' if bar_op(name) == '>=' else '>'} {bar(name, num_identities):.3f}"
            for name in ATTACKS if not bool(row[f"{name}_pass"])]  # fmt: skip


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

    def halves(self) -> tuple[np.ndarray, np.ndarray]:
        """(attacker-training indices, attacker-scoring indices): half of every identity each, the same every trial."""
        return stratified_holdout(self.identity, 0.5, seed=0)


@torch.no_grad()
def anonymize(encoder: nn.Module, decoder: nn.Module, images: np.ndarray, targets: np.ndarray, model: ModelConfig,
              erase_on: tuple[np.ndarray, np.ndarray] | None = None, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """uint8 NHWC -> (uint8 NHWC rendered as ``targets``, float32 exported latents): what ``Anonymizer.run`` renders
    and exports (``Anonymizer._latents``). ``erase_on`` = (indices, identities) of faces to fit the identity erasers
    on, as the export fits them on training faces (``model.erase_identity``; pprl.eraser).

    Networks run in eval mode (BatchNorm running statistics, no dropout) and get their previous mode back.
    """
    device = next(encoder.parameters()).device
    modes = encoder.training, decoder.training
    encoder.eval()
    decoder.eval()

    def batched(fn, *arrays: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(*(a[i : i + batch_size] for a in arrays)) for i in range(0, len(arrays[0]), batch_size)])

    def erase(latents: np.ndarray) -> np.ndarray:
        if erase_on is None:
            return latents
        return IdentityEraser.fit(latents[erase_on[0]], erase_on[1], model.num_identities).apply(latents)

    def as_tensor(z: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(z, device=device)

    try:
        means = erase(batched(lambda x: encoder(to_model_range(np.array(x)).to(device))[0].float().cpu().numpy(), images))
        fakes = batched(lambda z, c: to_uint8(decoder(as_tensor(z), as_tensor(c).long())), means, targets)
        latents = batched(lambda z: canonical_reencoding(encoder, decoder, as_tensor(z), model).float().cpu().numpy(), means)
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    return fakes, erase(latents)


def probe_accuracy(arch: str, features: np.ndarray, labels: np.ndarray, halves: tuple[np.ndarray, np.ndarray], num_classes: int) -> float:
    """The suite's ``arch`` probe trained on the first half of (features, labels), its accuracy on the second."""
    train, test = halves
    spec = probe_spec(arch, PROBE_EPOCHS, PROBE_PATIENCE)
    with torch_threads(1):  # a probe this small runs fastest on one thread (classifiers.torch_threads)
        fitted = fit(spec, features[train], labels[train], num_classes)
    return accuracy(fitted.predict(features[test]), labels[test])


def evaluate(encoder: nn.Module, decoder: nn.Module, judges, val: ValidationSet, model: ModelConfig, privacy_weight: float) -> dict[str, float | bool]:
    """Every attack's figure, the pass of each bar, the leakage and the score for one model state."""
    num_identities = model.num_identities
    halves = val.halves()
    erase_on = (halves[0], val.identity[halves[0]]) if model.erase_identity else None  # faces of known identity
    fakes, latents = anonymize(encoder, decoder, val.images, val.targets, model, erase_on)
    spaces = {"latent": latents, "output": judges.identity_features(fakes)}
    figures = {f"{space}_{arch}": probe_accuracy(arch, x, val.identity, halves, num_identities)
               for space, x in spaces.items() for arch in PROBES}  # fmt: skip
    figures["expression"] = judges.expression_accuracy(fakes, val.expression)
    verdict = audit(figures, num_identities)
    predicted_identity = judges.predict_identity(fakes)
    return {
        **{f"{name}_acc": figure for name, figure in figures.items()},
        "identity_acc": accuracy(predicted_identity, val.identity),
        "target_acc": accuracy(predicted_identity, val.targets),
        **verdict,
        SCORE: score(figures["expression"], verdict["privacy_leak"], privacy_weight),
    }
