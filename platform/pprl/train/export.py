"""Model bundles: the folder serving, evaluation and footage load with ``Anonymizer.load``.

Layout (local or S3): ``model.pt`` (state dicts of the encoder, decoder and discriminator), ``config.yaml`` (the
resolved run config), ``domain.npz`` (statistics of the training faces in latent space, for the domain check of
``pprl.domain``; bundles exported before it have none) and ``bundle.json`` (version, sizes, step, last metrics, the
``domain`` entry naming ``domain.npz`` with its hash). ``bundle.json`` is written last, so a folder that has one is
complete. ``privacy_audit.json``, when present, is the attack suite's verdict on these weights
(written by ``pprl evaluate``); ``latent_gate`` reads it to decide whether outputs may carry the latent.

    export_bundle(trainer, "s3://models/ferg/model", domain_faces=training_images)

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
AUDIT_FORMAT = "pprl-privacy-audit/1"
ENCODER_MEAN = "encoder_mean"  # the paper's latent: the encoder's posterior mean of the input face
AUDIT_FIELDS = ("format", "model_version", "latent_kind", "passed", "attacks", "created")


def export_bundle(trainer: Any, out: str, extra: dict[str, Any] | None = None, domain_faces: np.ndarray | None = None) -> dict[str, Any]:
    """Write the trainer's networks as a bundle at ``out``; ``extra`` is merged into ``bundle.json``. Returns its content.

    ``domain_faces`` (uint8 NHWC at the model's size, e.g. ``pprl.domain.training_faces``): training faces whose latent
    statistics the bundle carries for the domain check; without them the bundle has none."""
    last = trainer.history[-1] if trainer.history else None
    return write_bundle(out, trainer.config, trainer.networks(), step=trainer.step, epoch=trainer.epoch, metrics=last, extra=extra,
                        domain_faces=domain_faces)


def write_bundle(
    out: str,
    config: Config,
    networks: dict[str, nn.Module],
    *,
    step: int = 0,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    domain_faces: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write a bundle from plain (unwrapped) networks (``domain_faces``: see ``export_bundle``)."""
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
    if domain_faces is not None:
        info["domain"] = _write_domain(out, config, state, info, domain_faces)
    storage.write_text(storage.join(out, INFO), json.dumps(info, indent=2))
    return info


def _write_domain(out: str, config: Config, state: dict[str, dict], info: dict[str, Any], faces: np.ndarray) -> dict[str, Any]:
    """Encode ``faces`` as inference will (``Anonymizer.input_latents``, on CPU) and write their statistics to the bundle."""
    from pprl.anonymizer import Anonymizer
    from pprl.domain import DomainStats, write_domain

    latents = Anonymizer(config, state, info, device="cpu").input_latents(np.asarray(faces))
    entry = write_domain(out, DomainStats.fit(latents))
    log.info("%s: domain statistics of %d training faces (median distance %.2f)", out, len(faces), entry["distance_median"])
    return entry


def latent_kind(model: ModelConfig) -> str:
    """What outputs carry as ``latent`` (``pprl.models.networks.canonical_reencodings``): the encoder's mean of the
    input face, or of its ``model.latent_cycles``-th re-encoding as the canonical identity."""
    if not model.latent_cycles:
        return ENCODER_MEAN
    return f"canonical_reencoding:{model.latent_cycles}x:identity_{model.canonical_identity}"


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
    kind = latent_kind(read_config(uri).model)
    status, why, audited = _audit_status(uri, info or bundle_info(uri), kind)
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
                        domain_faces=faces)
