"""The per-epoch sample grid: one row per test input; columns are the input, then that face rendered as every identity."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pprl import storage
from pprl.data.dataset import encode_png
from pprl.train.batches import to_uint8

GAP = 2  # white pixels between the input column and the renderings


@torch.no_grad()
def render_grid(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor, num_identities: int) -> np.ndarray:
    """uint8 (rows*S, (1+N_id)*S + GAP, 3). Uses the latent mean, networks in eval mode (restored afterwards)."""
    modes = encoder.training, decoder.training
    encoder.eval()
    decoder.eval()
    try:
        mean, _ = encoder(images)
        n = len(images)
        codes = torch.arange(num_identities, device=images.device).repeat_interleave(n)
        fakes = decoder(mean.repeat(num_identities, 1), codes).view(num_identities, n, *images.shape[1:])
    finally:
        encoder.train(modes[0])
        decoder.train(modes[1])
    inputs = to_uint8(images)
    rendered = np.stack([to_uint8(f) for f in fakes], axis=1)  # (n, N_id, S, S, 3)
    side = images.shape[-1]
    gap = np.full((side, GAP, 3), 255, np.uint8)
    rows = [np.concatenate([inputs[i], gap, *rendered[i]], axis=1) for i in range(n)]
    return np.concatenate(rows, axis=0)


def save_grid(grid: np.ndarray, uri: str, scale: int = 1) -> None:
    """Write the grid as PNG (atomic), optionally upscaled by an integer factor (nearest) for viewing small models."""
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    storage.write_bytes(uri, encode_png(grid))
