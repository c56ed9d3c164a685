"""Model bundles: the folder serving, evaluation and footage load with ``Anonymizer.load``.

Layout (local or S3): ``model.pt`` (state dicts of the encoder, decoder and discriminator), ``config.yaml`` (the
resolved run config) and ``bundle.json`` (version, sizes, step, last metrics). ``bundle.json`` is written last, so a
folder that has one is complete.

    export_bundle(trainer, "s3://models/ferg/model")
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from typing import Any

import torch
from torch import nn

from pprl import storage
from pprl.config import EXPRESSIONS, Config

BUNDLE_FORMAT = "pprl-bundle/1"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"
INFO = "bundle.json"
NETWORKS = ("encoder", "decoder", "discriminator")


def export_bundle(trainer: Any, out: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the trainer's networks as a bundle at ``out``; ``extra`` is merged into ``bundle.json``. Returns its content."""
    last = trainer.history[-1] if trainer.history else None
    return write_bundle(out, trainer.config, trainer.networks(), step=trainer.step, epoch=trainer.epoch, metrics=last, extra=extra)


def write_bundle(
    out: str,
    config: Config,
    networks: dict[str, nn.Module],
    *,
    step: int = 0,
    epoch: int = 0,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a bundle from plain (unwrapped) networks."""
    missing = [n for n in NETWORKS if n not in networks]
    if missing:
        raise ValueError(f"a bundle needs the networks {', '.join(NETWORKS)}; missing {', '.join(missing)}")
    buf = io.BytesIO()
    torch.save({name: {k: v.detach().cpu() for k, v in networks[name].state_dict().items()} for name in NETWORKS}, buf)
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
    storage.write_text(storage.join(out, INFO), json.dumps(info, indent=2))
    return info


def bundle_info(uri: str) -> dict[str, Any]:
    """``bundle.json`` of the bundle at ``uri``; a clear error when the folder is not a (complete) bundle."""
    info_uri = storage.join(uri, INFO)
    if not storage.exists(info_uri):
        raise ValueError(f"{uri}: not a model bundle (no {INFO}); train one with `pprl train-local` or `pprl train`")
    try:
        return json.loads(storage.read_text(info_uri))
    except json.JSONDecodeError as err:
        raise ValueError(f"{info_uri}: not valid JSON ({err})") from None


def export_checkpoint(checkpoint_uri: str, out: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn a trainer checkpoint into a bundle without building a trainer (e.g. after a Ray Train run)."""
    from pprl.models.networks import build_networks
    from pprl.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint_uri)
    config = Config.from_dict(state["config"])
    nets = dict(zip(NETWORKS, build_networks(config.model), strict=True))
    for name, net in nets.items():
        net.load_state_dict(state[name])
    last = state["history"][-1] if state.get("history") else None
    return write_bundle(out, config, nets, step=int(state["step"]), epoch=int(state["epoch"]), metrics=last, extra=extra)
