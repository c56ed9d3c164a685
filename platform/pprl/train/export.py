"""Model bundles: the folder serving, evaluation and footage load with ``Anonymizer.load``.

Layout (local or S3): ``model.pt`` (state dicts of the encoder, decoder and discriminator), ``config.yaml`` (the
resolved run config), ``domain.npz`` (statistics of the training faces in latent space, for the domain check of
``pprl.domain``; bundles exported before it have none), ``eraser.npz`` (the identity erasers of ``pprl.eraser``, when
the config sets ``model.erase_identity``) and ``bundle.json`` (version, sizes, step, last metrics, the ``domain`` and
``eraser`` entries naming their files with their hashes). ``bundle.json`` is written last, so a folder that has one is
complete. ``privacy_audit.json``, when present, is the attack suite's verdict on these weights
(written by ``pprl evaluate``); ``latent_gate`` reads it to decide whether outputs may carry the latent.

    export_bundle(trainer, "s3://models/ferg/model", training=TrainingFaces(images, identities))

torch is imported only to write weights, so the serving front end and batch drivers read bundles without it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pprl import storage
from pprl.config import EXPRESSIONS, Config, ModelConfig

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "pprl-bundle/1"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"
INFO = "bundle.json"
NETWORKS = ("encoder", "decoder", "discriminator")
AUDIT = "privacy_audit.json"
ERASER_FILE = "eraser.npz"  # pprl.eraser's file
AUDIT_FORMAT = "pprl-privacy-audit/1"
ENCODER_MEAN = "encoder_mean"  # the paper's latent: the encoder's posterior mean of the input face
AUDIT_FIELDS = ("format", "model_version", "latent_kind", "passed", "attacks", "created")
ERASED_KIND = "leace_identity"  # what latent_kind appends when the exported latent passes the identity eraser


@dataclass(frozen=True)
class TrainingFaces:
    """A sample of the training faces at the model's size (``pprl.domain.training_faces``), with their identities:
    the bundle's domain statistics and identity eraser are fitted on them."""

    images: np.ndarray  # uint8 (N, S, S, 3)
    identity: np.ndarray  # int (N,)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or len(self.identity) != len(self.images):
            raise ValueError(f"training faces need images (N, S, S, 3) and N identities, got {self.images.shape} and {len(self.identity)}")


def export_bundle(trainer: Any, out: str, extra: dict[str, Any] | None = None, training: TrainingFaces | None = None) -> dict[str, Any]:
    """Write the trainer's networks as a bundle at ``out``; ``extra`` is merged into ``bundle.json``. Returns its content.

    ``training``: training faces whose latent statistics the bundle carries for the domain check (without them it has
    none), and that its identity eraser is fitted on when the config sets ``model.erase_identity`` (without them the
    bundle has no eraser, and its ``latent_kind`` says so)."""
    last = trainer.history[-1] if trainer.history else None
    return write_bundle(out, trainer.config, trainer.networks(), step=trainer.step, epoch=trainer.epoch, metrics=last, extra=extra,
                        training=training)


def write_bundle(
    out: str,
    config: Config,
    networks: dict[str, nn.Module],
    *,
    step: int = 0,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    training: TrainingFaces | None = None,
) -> dict[str, Any]:
    """Write a bundle from plain (unwrapped) networks (``training``: see ``export_bundle``)."""
    import torch

    missing = [n for n in NETWORKS if n not in networks]
    if missing:
        raise ValueError(f"a bundle needs the networks {', '.join(NETWORKS)}; missing {', '.join(missing)}")
    state = {name: {k: v.detach().cpu() for k, v in networks[name].state_dict().items()} for name in NETWORKS}
    buf = io.BytesIO()
    torch.save(state, buf)
    weights = buf.getvalue()
    m = config.model
    info = {
        "format": BUNDLE_FORMAT,
        "version": f"{config.preset}-s{step}-{hashlib.sha256(weights).hexdigest()[:8]}",
        "preset": config.preset,
        "image_size": m.image_size,
        "num_identities": m.num_identities,
        "num_expressions": m.num_expressions,
        "expressions": list(EXPRESSIONS[: m.num_expressions]),
        "latent_dim": m.latent_dim,
        "step": step,
        "epoch": epoch,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "metrics": {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float, bool, str))},
        **(extra or {}),
    }
    storage.write_bytes(storage.join(out, WEIGHTS), weights)
    storage.write_text(storage.join(out, CONFIG), config.to_yaml())
    if training is not None:
        from pprl.anonymizer import Anonymizer

        info.update(write_training_statistics(out, Anonymizer(config, state, info, device="cpu"), training))
    elif config.model.erase_identity:
        log.warning("%s: exported without training faces, so without the identity eraser model.erase_identity asks for: "
                    "its latent is %s", out, latent_kind(config.model, erased=False))  # fmt: skip
    storage.write_text(storage.join(out, INFO), json.dumps(info, indent=2))
    return info


def write_training_statistics(out: str, model: Any, training: TrainingFaces) -> dict[str, Any]:
    """Encode the training faces as inference will with ``model`` (an ``Anonymizer`` without erasers), write their
    domain statistics into the bundle folder ``out`` and, when its config sets ``model.erase_identity``, the identity
    erasers fitted on them (``pprl.eraser``); returns the ``bundle.json`` entries. ``model`` ends with the erasers."""
    from pprl.domain import DomainStats, write_domain
    from pprl.eraser import Erasers, IdentityEraser, write_erasers

    if model.erasers is not None:
        raise ValueError("the statistics are fitted on the latents before erasure: pass a model without erasers")
    means = model.input_latents(training.images)
    entries = {"domain": write_domain(out, DomainStats.fit(means))}
    log.info("%s: domain statistics of %d training faces (median distance %.2f)", out, len(means), entries["domain"]["distance_median"])
    if model.config.model.erase_identity:
        render = IdentityEraser.fit(means, training.identity, model.num_identities)
        # encode() below must render from the render-erased mean and export unerased: what the export eraser is fitted on
        model.erasers = Erasers(render, IdentityEraser.identity(len(render.mean)))
        model.erasers = Erasers(render, IdentityEraser.fit(model.encode(training.images), training.identity, model.num_identities))
        entries["eraser"] = write_erasers(out, model.erasers)
        log.info("%s: identity erasers fitted on %d training faces (ranks %s)", out, len(means), entries["eraser"]["rank"])
    return entries


def attach_training_statistics(uri: str, data_uri: str) -> dict[str, Any]:
    """Give an existing bundle the domain statistics (and identity eraser, when its config asks for one) of its
    training split at ``data_uri``; returns the new ``bundle.json`` entries (``pprl domain-stats``).

    The weights, and so the bundle's version, are unchanged; ``bundle.json`` is rewritten after the files are in place.
    A new eraser changes the exported latent, so an earlier privacy audit of it no longer counts (``latent_gate``)."""
    from pprl.anonymizer import Anonymizer
    from pprl.data.dataset import load_dataset
    from pprl.domain import training_faces

    model = Anonymizer.load(uri, device="cpu")
    model.erasers = None
    entries = write_training_statistics(uri, model, training_faces(load_dataset(data_uri), model.image_size))
    storage.write_text(storage.join(uri, INFO), json.dumps({**bundle_info(uri), **entries}, indent=2))
    return entries


def latent_kind(model: ModelConfig, erased: bool) -> str:
    """What outputs carry as ``latent`` (``Anonymizer._latents``, ``pprl.models.networks.canonical_reencoding``): the encoder's mean of the
    input face, or of its ``model.latent_cycles``-th re-encoding as the canonical identity; ``erased``: passed through
    the bundle's identity eraser (``pprl.eraser``)."""
    kind = ENCODER_MEAN if not model.latent_cycles else f"canonical_reencoding:{model.latent_cycles}x:identity_{model.canonical_identity}"
    return f"{kind}+{ERASED_KIND}" if erased else kind


def write_bundle_file(uri: str, name: str, data: bytes) -> dict[str, str]:
    """Write a file of fitted statistics into the bundle folder ``uri``; returns its ``bundle.json`` entry's name and
    hash (``read_bundle_file`` checks them)."""
    storage.write_bytes(storage.join(uri, name), data)
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest()}


def read_bundle_file(uri: str, info: dict[str, Any], key: str, default_name: str) -> tuple[bytes | None, str]:
    """(content, URI) of the file ``bundle.json``'s entry ``key`` names; (None, "") when there is no entry.

    A named file that is missing or altered is an error naming it: the bundle is broken."""
    entry = info.get(key)
    if not entry:
        return None, ""
    target = storage.join(uri, entry.get("file", default_name))
    if not storage.exists(target):
        raise ValueError(f"{target}: missing, although bundle.json names it")
    data = storage.read_bytes(target)
    if entry.get("sha256") and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ValueError(f"{target}: does not match the sha256 in bundle.json (written by another export?)")
    return data, target


def read_config(uri: str) -> Config:
    """The resolved run config in the bundle at ``uri``."""
    import yaml

    return Config.from_dict(yaml.safe_load(storage.read_text(storage.join(uri, CONFIG))))


def bundle_info(uri: str) -> dict[str, Any]:
    """``bundle.json`` of the bundle at ``uri`` (read without loading weights); a clear error when the folder is not a
    (complete) bundle."""
    info_uri = storage.join(uri, INFO)
    if not storage.exists(info_uri):
        raise ValueError(f"{uri}: not a model bundle (no {INFO}); train one with `pprl train-local` or `pprl train`")
    try:
        info = json.loads(storage.read_text(info_uri))
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_uri}: not valid JSON ({err})") from None
    for key in ("image_size", "num_identities"):
        if key not in info:
            raise ValueError(f"{info_uri}: missing {key!r}")
    return info


# --- the privacy audit and the latent gate ------------------------------------------------------------------------


def write_audit(uri: str, audit: dict[str, Any]) -> str:
    """Attach ``audit`` (``pprl.evaluate.attacks.audit_record``) to the bundle at ``uri``; returns the file's URI."""
    missing = [key for key in AUDIT_FIELDS if key not in audit]
    if missing or audit["format"] != AUDIT_FORMAT:
        found = f"missing {', '.join(missing) or 'nothing'}, format {audit.get('format')!r}"
        raise ValueError(f"not a {AUDIT_FORMAT} record ({found})")
    target = storage.join(uri, AUDIT)
    storage.write_text(target, json.dumps(audit, indent=2))
    return target


def read_audit(uri: str) -> dict[str, Any] | None:
    """The bundle's privacy audit, or None when it has none."""
    target = storage.join(uri, AUDIT)
    return json.loads(storage.read_text(target)) if storage.exists(target) else None


@dataclass(frozen=True)
class LatentGate:
    """Whether outputs of a bundle may carry its latent: only with a passing privacy audit of these very weights
    (the audit names the bundle version, which holds a hash of the weights), or when the operator overrides it.
    ``record()`` goes into every output, so each names the latent it carries (or withholds) and why."""

    exported: bool
    kind: str  # latent_kind() of the bundle
    audit: str  # passed | failed | missing | stale | invalid
    override: bool
    note: str
    audited: str | None = None  # when the audit was made

    def record(self) -> dict[str, Any]:
        return {"latent_kind": self.kind, "latent_exported": self.exported, "audit": self.audit,
                "override": self.override, "audited": self.audited, "note": self.note}  # fmt: skip

    def log(self, where: str) -> None:
        """The one log line a component writes when the latent is withheld or exported by override."""
        if self.audit != "passed":
            log.warning("%s: %s", where, self.note)


def latent_gate(uri: str, override: bool = False, info: dict[str, Any] | None = None) -> LatentGate:
    """Read the audit of the bundle at ``uri`` and decide; ``override`` is the operator's export_unaudited_latent."""
    info = info or bundle_info(uri)
    kind = latent_kind(read_config(uri).model, erased=bool(info.get("eraser")))
    status, why, audited = _audit_status(uri, info, kind)
    if status == "passed":
        return LatentGate(True, kind, status, False, f"privacy audit of {audited} passed: latent exported", audited)
    if override:
        note = f"latent exported WITHOUT a passing privacy audit ({why}): the operator set export_unaudited_latent"
        return LatentGate(True, kind, status, True, note, audited)
    note = (f"latent withheld: {why}; audit the bundle with `pprl evaluate`, or export anyway with "
            "--export-unaudited-latent (settings: export_unaudited_latent)")  # fmt: skip
    return LatentGate(False, kind, status, False, note, audited)


def _audit_status(uri: str, info: dict[str, Any], kind: str) -> tuple[str, str, str | None]:
    """(status, why, audit date) of the bundle's privacy audit."""
    try:
        audit = read_audit(uri)
    except (ValueError, storage.StorageError) as err:  # a JSONDecodeError is a ValueError
        return "invalid", f"its {AUDIT} cannot be read ({err})", None
    if audit is None:
        return "missing", f"the bundle has no privacy audit ({AUDIT})", None
    audited = audit.get("created")
    if audit.get("format") != AUDIT_FORMAT:
        return "invalid", f"its {AUDIT} is not a {AUDIT_FORMAT} record", audited
    if audit.get("model_version") != info.get("version") or audit.get("latent_kind") != kind:
        of = f"{audit.get('model_version')!r} ({audit.get('latent_kind')})"
        return "stale", f"the privacy audit is of {of}, not of this bundle", audited
    if audit.get("eraser_sha256") != (info.get("eraser") or {}).get("sha256"):
        return "stale", f"the privacy audit is of these weights with other identity erasers than {ERASER_FILE}'s", audited
    if audit.get("passed") is not True:
        failed = [a.get("name", "?") for a in audit.get("attacks", []) if not a.get("pass")]
        return "failed", f"the privacy audit of {audited} failed ({', '.join(failed) or 'incomplete'})", audited
    return "passed", "", audited


def export_checkpoint(checkpoint_uri: str, out: str, extra: dict[str, Any] | None = None, data: str | None = None) -> dict[str, Any]:
    """Turn a trainer checkpoint (a Ray Train run's, a Tune trial's) into a bundle without building a trainer;
    ``data``: the training dataset, whose faces give the bundle its domain statistics (none without it)."""
    from pprl.data.dataset import load_dataset
    from pprl.domain import training_faces
    from pprl.models.networks import build_networks
    from pprl.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_uri)
    config = Config.from_dict(state["config"])
    nets = dict(zip(NETWORKS, build_networks(config.model), strict=True))
    for name, net in nets.items():
        net.load_state_dict(state[name])
    last = state["history"][-1] if state.get("history") else None
    faces = training_faces(load_dataset(data), config.model.image_size) if data else None
    return write_bundle(out, config, nets, step=int(state["step"]), epoch=int(state["epoch"]), metrics=last, extra=extra,
                        training=faces)
