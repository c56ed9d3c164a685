"""Temporal stability of the replaced faces, per track, and the per-track smoothing of what the model renders.

Each frame is anonymised on its own, so a replaced face can flicker: the encoder reads small frame-to-frame changes of
the original (noise, codec, a box that jitters) into its latent, and the decoder renders them as changes of the whole
face. Per face of a track, from the track's previous frame, both taken at the model's size inside the part of the crop
the paste replaces completely (the feather mask's plateau), footage records:

- ``source_change``: the mean absolute change of the original face (0-255 scale);
- ``render_change``: the same for the replaced face, cut out of the output frame after the paste.

A track's **flicker** is ``sum(render_change) / sum(source_change)`` over its frames: 1 when the replaced face changes
as much from frame to frame as the original face did, above 1 when it changes more. Its **identity consistency** is the
share of its frames whose replaced face the model's own identity judge (the discriminator's identity head) reads as the
track's target. ``track_table`` computes both from a ``faces.parquet``; the index has them per video.

Smoothing (``FootageOptions.smooth_frames``, ``--smooth-frames N``): the latent each face is rendered from is an
exponential moving average over the track's frames, ``z_t = a x_t + (1 - a) z_{t-1}`` with ``a = 2 / (N + 1)`` (the
"span" convention: a window of about N frames). It is causal, so a change of expression shows up with a lag of about
``(N - 1) / 2`` frames. The ``latent`` column and the domain score stay those of each face itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from pprl.footage.paste import feather_mask


def patches(crops: Sequence[np.ndarray], size: int) -> np.ndarray:
    """float32 (N, size, size, 3): each square crop resized to ``size``."""
    out = [np.asarray(c if c.shape[0] == size else Image.fromarray(c).resize((size, size), Image.BILINEAR), np.float32) for c in crops]
    return np.stack(out) if out else np.zeros((0, size, size, 3), np.float32)


class TrackMemory:
    """Per video: each live track's last patches (original and replaced) and its smoothed latent."""

    def __init__(self, size: int, feather: float, smooth_frames: int = 0):
        if smooth_frames < 0:
            raise ValueError(f"smooth_frames must be >= 0, got {smooth_frames}")
        self.size = size
        self.inner = feather_mask(size, feather)[..., 0] >= 1.0 - 1e-6  # where the paste is the render alone
        if not self.inner.any():
            self.inner[:] = True
        self.alpha = 2.0 / (smooth_frames + 1) if smooth_frames > 1 else 1.0
        self.latents: dict[int, np.ndarray] = {}
        self.last: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def smoothing(self) -> bool:
        return self.alpha < 1.0

    def smooth(self, track_ids: Sequence[int], latents: np.ndarray) -> np.ndarray:
        """The latents to render, row by row in frame order: each track's moving average, updated with its face."""
        out = np.array(latents, np.float32, copy=True)
        for row, track in enumerate(track_ids):
            previous = self.latents.get(track)
            if previous is not None:
                out[row] = self.alpha * out[row] + (1 - self.alpha) * previous
            self.latents[track] = out[row]
        return out

    def changes(self, track_ids: Sequence[int], source: Sequence[np.ndarray], rendered: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(source_change, render_change) per face, in frame order; NaN on a track's first frame."""
        src, ren = patches(source, self.size), patches(rendered, self.size)
        source_change = np.full(len(track_ids), np.nan, np.float32)
        render_change = np.full(len(track_ids), np.nan, np.float32)
        for row, track in enumerate(track_ids):
            if track in self.last:
                prev_src, prev_ren = self.last[track]
                source_change[row] = np.abs(src[row] - prev_src)[self.inner].mean()
                render_change[row] = np.abs(ren[row] - prev_ren)[self.inner].mean()
            self.last[track] = (src[row], ren[row])
        return source_change, render_change

    def forget(self, keep: Iterable[int]) -> None:
        """Drop the tracks that can get no further face (not in ``keep``, the tracker's live tracks)."""
        keep = set(keep)
        for memo in (self.latents, self.last):
            for track in [t for t in memo if t not in keep]:
                del memo[track]


def flicker(render_change, source_change) -> float | None:
    """``sum(render_change) / sum(source_change)`` over the faces that have both; None when there are none."""
    ren, src = np.asarray(render_change, np.float64), np.asarray(source_change, np.float64)
    ok = np.isfinite(ren) & np.isfinite(src)
    return float(ren[ok].sum() / src[ok].sum()) if ok.any() and src[ok].sum() > 0 else None


def track_table(faces: pd.DataFrame) -> pd.DataFrame:
    """One row per track of a ``faces.parquet``: frames, first and last frame, target, flicker, identity consistency,
    and the share of its faces that are out of domain (null without domain statistics)."""
    rows = []
    for track, group in faces.sort_values("frame_index").groupby("track_id", sort=True):
        ood = group["out_of_domain"].dropna()
        rows.append({
            "track_id": int(track), "frames": len(group), "first_frame": int(group.frame_index.min()),
            "last_frame": int(group.frame_index.max()), "target_identity": int(group.target_identity.iloc[0]),
            "flicker": flicker(group.render_change, group.source_change),
            "identity_consistency": float((group.judged_identity == group.target_identity).mean()),
            "out_of_domain_share": float(ood.astype(bool).mean()) if len(ood) else None,
        })  # fmt: skip
    return pd.DataFrame(rows, columns=["track_id", "frames", "first_frame", "last_frame", "target_identity", "flicker",
                                       "identity_consistency", "out_of_domain_share"])  # fmt: skip
