"""A small IoU tracker: a track id per face, so its replacement identity stays fixed, and short gaps bridged.

Each frame's detections are matched greedily (highest IoU first) to the boxes the live tracks predict for that frame
(last box plus a smoothed per-frame velocity). A track that finds its face again after missing it for up to
``max_gap`` frames gets boxes interpolated into the frames it missed (``bridged`` faces), so a face that the detector
loses for one or two frames is still replaced there. The caller keeps the last ``max_gap`` frames pending
(``IoUTracker.settled``) until no bridge can reach them any more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pprl.footage.detect import box_iou


@dataclass
class Face:
    """One face in one frame. ``score`` is None for bridged (interpolated) faces."""

    frame_index: int
    box: np.ndarray  # float32 (4,) x0, y0, x1, y1 in frame pixels
    score: float | None
    track_id: int
    bridged: bool = False


@dataclass
class _Track:
    id: int
    box: np.ndarray
    frame: int
    velocity: np.ndarray = field(default_factory=lambda: np.zeros(4, np.float32))

    def predict(self, frame: int) -> np.ndarray:
        return self.box + self.velocity * (frame - self.frame)


class IoUTracker:
    def __init__(self, iou_threshold: float = 0.3, max_gap: int = 2, smoothing: float = 0.5):
        if not 0 < iou_threshold < 1:
            raise ValueError(f"iou_threshold must be in (0, 1), got {iou_threshold}")
        if max_gap < 0:
            raise ValueError(f"max_gap must be >= 0, got {max_gap}")
        self.iou_threshold, self.max_gap, self.smoothing = iou_threshold, max_gap, smoothing
        self.tracks: list[_Track] = []
        self.next_id = 0
        self.last_frame = -1

    def settled(self, frame_index: int) -> bool:
        """True once no later detection can bridge into ``frame_index`` (its faces are final)."""
        return frame_index < self.last_frame - self.max_gap

    def update(self, frame_index: int, dets: np.ndarray) -> tuple[list[Face], list[Face]]:
        """Match one frame's (K, 5) detections. Returns this frame's faces and bridged faces for earlier frames."""
        if frame_index <= self.last_frame:
            raise ValueError(f"frames must arrive in order: got {frame_index} after {self.last_frame}")
        self.last_frame = frame_index
        self.tracks = [t for t in self.tracks if frame_index - t.frame - 1 <= self.max_gap]
        dets = np.asarray(dets, np.float32).reshape(-1, 5)
        faces: list[Face] = []
        bridged: list[Face] = []
        unmatched = set(range(len(dets)))
        for ti, di in self._match(frame_index, dets):
            track = self.tracks[ti]
            bridged.extend(self._bridge(track, frame_index, dets[di, :4]))
            self._advance(track, frame_index, dets[di, :4])
            faces.append(Face(frame_index, dets[di, :4].copy(), float(dets[di, 4]), track.id))
            unmatched.discard(di)
        for di in sorted(unmatched):
            track = _Track(self.next_id, dets[di, :4].copy(), frame_index)
            self.next_id += 1
            self.tracks.append(track)
            faces.append(Face(frame_index, dets[di, :4].copy(), float(dets[di, 4]), track.id))
        return faces, bridged

    def _match(self, frame_index: int, dets: np.ndarray) -> list[tuple[int, int]]:
        if not self.tracks or not len(dets):
            return []
        predicted = np.stack([t.predict(frame_index) for t in self.tracks])
        iou = box_iou(predicted, dets[:, :4])
        pairs = []
        while True:
            ti, di = np.unravel_index(np.argmax(iou), iou.shape)
            if iou[ti, di] < self.iou_threshold:
                return pairs
            pairs.append((int(ti), int(di)))
            iou[ti, :] = -1
            iou[:, di] = -1

    def _bridge(self, track: _Track, frame_index: int, box: np.ndarray) -> list[Face]:
        steps = frame_index - track.frame
        return [
            Face(f, (track.box + (box - track.box) * ((f - track.frame) / steps)).astype(np.float32), None, track.id, bridged=True)
            for f in range(track.frame + 1, frame_index)
        ]

    def _advance(self, track: _Track, frame_index: int, box: np.ndarray) -> None:
        step = (box - track.box) / (frame_index - track.frame)
        track.velocity = (self.smoothing * track.velocity + (1 - self.smoothing) * step).astype(np.float32)
        track.box, track.frame = box.copy(), frame_index
