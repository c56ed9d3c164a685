"""Trainer checkpoints: one file holding everything a restart needs, written atomically (local or S3)."""

from __future__ import annotations

import io
from typing import Any

import torch

from pprl import storage

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(state: dict[str, Any], uri: str) -> None:
    """Serialise ``Trainer.state_dict()`` in memory, then one atomic write."""
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(uri, buf.getvalue())


def load_checkpoint(uri: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors and plain Python only: ``weights_only``)."""
    data = storage.read_bytes(uri)
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{uri}: not a pprl checkpoint ({err})") from None
