"""Batch sources for the trainer: anything iterable yielding ``(images, identity, expression)``.

Images are float32 NCHW in [-1, 1]; labels int64. The trainer only calls ``next()``; a source that also has
``state_dict()/load_state_dict()`` is checkpointed with the trainer so a resumed run sees the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1], the authors' (x - 127.5) / 127.5."""
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.dim() != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected uint8 images shaped (N, H, W, 3), got {tuple(tensor.shape)} {tensor.dtype}")
    return tensor.permute(0, 3, 1, 2).float().sub_(127.5).div_(127.5)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    out = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


class InMemoryBatches(Iterator[Batch]):
    """Endless random batches from arrays held in memory, as the authors drew them.

    Each batch is a ``random.sample`` of the indices: no repeats inside a batch, independent across batches.
    Images stay uint8 until a batch is drawn, so a 64x64 FERG-sized set costs ~120 MB, not 4x that.
    """

    def __init__(self, images: np.ndarray, identity: np.ndarray, expression: np.ndarray, batch_size: int, seed: int = 0) -> None:
        if not len(images) == len(identity) == len(expression):
            raise ValueError(f"images ({len(images)}), identity ({len(identity)}) and expression ({len(expression)}) differ in length")
        if len(images) < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {len(images)} training images")
        self.images = torch.as_tensor(np.ascontiguousarray(images))
        to_model_range(self.images[:1])  # validates shape and dtype once
        self.identity = torch.as_tensor(identity, dtype=torch.int64)
        self.expression = torch.as_tensor(expression, dtype=torch.int64)
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def num_examples(self) -> int:
        return len(self.images)

    def __next__(self) -> Batch:
        idx = torch.randperm(len(self.images), generator=self.generator)[: self.batch_size]
        return to_model_range(self.images[idx]), self.identity[idx], self.expression[idx]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
