"""Differentiable augmentation of everything the discriminator sees (DiffAugment, Zhao et al., NeurIPS 2020).

Real and generated images get the same random transforms, so D cannot tell them apart by the transform, and the
generator's gradients come through a D that must judge shifted/recoloured faces: it learns from what a face shows,
not from pixel-exact patterns. A deviation from the paper (``train.augment``, empty = off); docs/model.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

POLICIES = ("translation", "color")


def check_policy(policy: str) -> list[str]:
    parts = [p for p in policy.split(",") if p]
    unknown = [p for p in parts if p not in POLICIES]
    if unknown:
        raise ValueError(f"train.augment: unknown {', '.join(unknown)}; use a comma list of {', '.join(POLICIES)} or ''")
    return parts


def diff_augment(x: torch.Tensor, policy: str, shift_ratio: float = 0.125) -> torch.Tensor:
    """Apply the policy's transforms, each with its own random draw per image (from torch's global RNG)."""
    for part in check_policy(policy):
        x = translate(x, shift_ratio) if part == "translation" else recolour(x)
    return x


def translate(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """Shift each image by a whole number of pixels, up to ``ratio`` of its side, filling with zeros (mid-grey)."""
    n, _, h, w = x.shape
    max_shift = max(1, int(h * ratio + 0.5))
    shifts = torch.randint(-max_shift, max_shift + 1, (n, 2), device=x.device)
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    rows = (torch.arange(h, device=x.device)[None, :] + max_shift - shifts[:, :1])  # (n, h)
    cols = (torch.arange(w, device=x.device)[None, :] + max_shift - shifts[:, 1:])  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)  # NHWC underneath: channels_last, as the GPU path wants


def recolour(x: torch.Tensor) -> torch.Tensor:
    """Random brightness, saturation and contrast, as in DiffAugment's 'color' policy ([-1, 1] images)."""
    n = x.shape[0]
    rand = lambda: torch.rand(n, 1, 1, 1, device=x.device, dtype=x.dtype)  # noqa: E731
    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean
