"""Face crops in, generated faces back: a square crop around each box with a margin, and a feathered paste.

The crop is square and centred on the detection, its side ``max(w, h) * (1 + 2 * margin)``, so the face fills the
crop about as much as it filled the training images; parts outside the frame are filled by repeating the edge.
The generated face is resized to the crop and blended in with a mask that is 1 in the middle and falls smoothly to
0 at the crop's border over ``feather`` of its side. Around the crop, ``blur_surround`` blurs a ring of the
original (``context`` of the side on each side) first: the pasted face replaces the inner face only, and hair, head
outline and ears there are what a face recogniser still matches (docs/footage.md, "Can I publish this?").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter


@dataclass(frozen=True)
class Region:
    """A square in frame pixels; it may reach outside the frame."""

    x0: int
    y0: int
    side: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x0, self.y0, self.x0 + self.side, self.y0 + self.side


def crop_region(box, margin: float) -> Region:
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    side = max(4, round(max(x1 - x0, y1 - y0) * (1 + 2 * margin)))
    return Region(round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2), side)


def extract(frame: np.ndarray, region: Region) -> np.ndarray:
    """The region's pixels (side, side, 3); outside the frame the nearest edge pixel is repeated."""
    h, w = frame.shape[:2]
    ys = np.clip(np.arange(region.y0, region.y0 + region.side), 0, h - 1)
    xs = np.clip(np.arange(region.x0, region.x0 + region.side), 0, w - 1)
    return frame[np.ix_(ys, xs)]


@functools.lru_cache(maxsize=64)
def feather_mask(side: int, feather: float) -> np.ndarray:
    """(side, side, 1) float32: 1 inside, a smoothstep down to 0 at the border over ``feather * side`` pixels."""
    ramp = max(1.0, feather * side)
    d = np.minimum(np.arange(side), np.arange(side)[::-1]).astype(np.float32) + 0.5  # distance to the nearer edge
    t = np.clip(d / ramp, 0.0, 1.0)
    edge = t * t * (3 - 2 * t)
    return np.minimum(edge[:, None], edge[None, :])[..., None]


def paste(frame: np.ndarray, region: Region, face: np.ndarray, feather: float) -> None:
    """Blend ``face`` (any square size, uint8 RGB) into ``frame`` over ``region``, in place."""
    if face.shape[0] != region.side or face.shape[1] != region.side:
        face = np.asarray(Image.fromarray(face).resize((region.side, region.side), Image.BICUBIC))
    h, w = frame.shape[:2]
    fx0, fy0 = max(region.x0, 0), max(region.y0, 0)
    fx1, fy1 = min(region.x0 + region.side, w), min(region.y0 + region.side, h)
    if fx1 <= fx0 or fy1 <= fy0:
        return
    sy, sx = slice(fy0 - region.y0, fy1 - region.y0), slice(fx0 - region.x0, fx1 - region.x0)
    mask = feather_mask(region.side, feather)[sy, sx]
    target = frame[fy0:fy1, fx0:fx1].astype(np.float32)
    blended = target + mask * (face[sy, sx].astype(np.float32) - target)
    frame[fy0:fy1, fx0:fx1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def surround(region: Region, context: float) -> Region:
    """The square around ``region`` reaching ``context`` of its side further on each side."""
    pad = round(region.side * context)
    return Region(region.x0 - pad, region.y0 - pad, region.side + 2 * pad)


def blur_surround(frame: np.ndarray, region: Region, context: float, feather: float) -> None:
    """Blur ``surround(region, context)`` in place with a Gaussian of sigma ``side / 8`` (the crop's side), fading
    back to the original over ``feather`` of its side; a no-op when ``context`` is 0."""
    if context <= 0:
        return
    outer = surround(region, context)
    blurred = Image.fromarray(np.ascontiguousarray(extract(frame, outer))).filter(ImageFilter.GaussianBlur(region.side / 8))
    paste(frame, outer, np.asarray(blurred), feather)
