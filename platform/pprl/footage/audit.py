"""The leak audit: after a video is written, an independent face detector looks for faces the pipeline did not replace.

The pipeline replaces what CenterFace (or a sidecar) finds; a face it misses is published as it was. The audit
decodes the *written* output and runs dlib's detector (``pprl.footage.detect.DlibDetector``: HOG by default, another
model family than CenterFace) on its frames at full resolution. A face it finds that does not lie inside a replaced
crop is a *suspect*: a face that may have slipped through, or a false alarm of the audit's detector.

Which frames (``AuditOptions.mode``):

- ``sample`` (default): the audit may take ``budget`` (0.25) of the time the video itself took to process, its own
  decoding included (``Schedule``). First come the *risk frames* (within ``radius`` frames of a track's start or end,
  of a bridged face or of a detection scored below ``low_score``: where a detector that is about to miss a face
  shows it first), then as many evenly spread frames as the rest of the budget affords.
- ``all``: every frame.
- ``off``: no audit.
"""

from __future__ import annotations

import bisect
import functools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from pprl.footage.detect import DlibDetector
from pprl.footage.paste import Region, crop_region, extract
from pprl.footage.track import Face
from pprl.footage.video import VideoReader

log = logging.getLogger(__name__)

MODES = ("sample", "all", "off")
SHEET_TILE = 128  # px per suspect on the contact sheet
SHEET_MAX = 64  # suspects shown on a contact sheet; faces.parquet lists them all


@dataclass(frozen=True)
class AuditOptions:
    mode: str = "sample"  # sample | all | off
    detector: str = "hog"  # dlib's hog or cnn
    min_face: int = 40  # px at full resolution: the smallest face the audit looks for
    threshold: float = 0.0  # added to dlib's decision threshold
    budget: float = 0.25  # sample mode: the audit's time, as a fraction of the video's own processing time
    low_score: float = 0.7  # a detection scored below this makes its frame a risk frame
    radius: int = 2  # frames on each side of a risk event that are scanned
    coverage: float = 0.5  # an audit box is covered when this share of it lies inside one replaced crop

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--audit {self.mode!r}: expected one of {', '.join(MODES)}")
        if not 0 < self.budget <= 10 or not 0 < self.coverage <= 1 or self.radius < 0:
            raise ValueError(f"audit budget must be in (0, 10] (got {self.budget}), coverage in (0, 1] (got {self.coverage}), "
                             f"radius >= 0 (got {self.radius})")
        DlibDetector.check(self.detector, self.min_face)

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def describe(self) -> str:
        how = "every frame" if self.mode == "all" else f"risk frames first, within {self.budget:.0%} of the video's time"
        return f"dlib-{self.detector}, faces >= {self.min_face} px, {how}"


@dataclass
class AuditTrail:
    """What the pipeline did to each frame, recorded as it goes: the replaced crops and where detection was shaky."""

    crops: dict[int, list[Region]] = field(default_factory=dict)
    spans: dict[int, list[int]] = field(default_factory=dict)  # track id -> [first frame, last frame]
    shaky: set[int] = field(default_factory=set)  # frames with a bridged face or a low-score detection

    def add(self, face: Face, region: Region, low_score: float) -> None:
        self.crops.setdefault(face.frame_index, []).append(region)
        span = self.spans.setdefault(face.track_id, [face.frame_index, face.frame_index])
        span[0], span[1] = min(span[0], face.frame_index), max(span[1], face.frame_index)
        if face.bridged or (face.score is not None and face.score < low_score):
            self.shaky.add(face.frame_index)

    def risk_frames(self, radius: int, frames: int) -> set[int]:
        """Frames within ``radius`` of a shaky frame, or of the frame just before a track's face was found or just
        after it was lost (unless that is outside the video's ``frames``)."""
        events = set(self.shaky)
        for first, last in self.spans.values():
            events.update(f for f in (first - 1, last + 1) if 0 <= f < frames)
        return {f + d for f in events for d in range(-radius, radius + 1) if 0 <= f + d < frames}


@dataclass
class Suspect:
    frame_index: int
    timestamp: float
    box: np.ndarray  # float32 x0, y0, x1, y1
    score: float
    crop: np.ndarray | None  # the face with some context, for the contact sheet (only the first SHEET_MAX)


@dataclass
class AuditResult:
    options: AuditOptions
    frames: int = 0  # frames of the output video
    audited: list[int] = field(default_factory=list)  # frame indices scanned, in order
    suspects: list[Suspect] = field(default_factory=list)
    seconds: float = 0.0
    budget_s: float | None = None  # the sample mode's time budget
    skipped_risk: int = 0  # risk frames the sample mode's budget did not reach

    @property
    def suspect_frames(self) -> int:
        return len({s.frame_index for s in self.suspects})

    def record(self) -> dict:
        """The audit's summary for faces.parquet's metadata: what ran, on which frames (as index ranges)."""
        return {"detector": f"dlib-{self.options.detector}", "mode": self.options.mode, "min_face": self.options.min_face,
                "threshold": self.options.threshold, "budget": self.options.budget, "frames": self.frames,
                "audited_frames": len(self.audited), "audited_ranges": _ranges(self.audited),
                "suspects": len(self.suspects), "suspect_frames": self.suspect_frames, "skipped_risk_frames": self.skipped_risk,
                "seconds": round(self.seconds, 3)}


def _ranges(indices: list[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in indices:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def covered(box: np.ndarray, regions: list[Region], coverage: float) -> bool:
    """Whether at least ``coverage`` of ``box`` lies inside one of the replaced crops."""
    x0, y0, x1, y1 = (float(v) for v in box[:4])
    area = max((x1 - x0) * (y1 - y0), 1e-9)
    for region in regions:
        rx0, ry0, rx1, ry1 = region.box
        inter = max(0.0, min(x1, rx1) - max(x0, rx0)) * max(0.0, min(y1, ry1) - max(y0, ry0))
        if inter / area >= coverage:
            return True
    return False


class Schedule:
    """Which frames the sample mode scans, decided frame by frame within ``budget_s`` (decoding included).

    The first frame is scanned to learn what a scan costs. A risk frame is scanned while the budget lasts. A regular
    frame is scanned when it is its turn in an even spacing of the scans the budget still affords after the rest of
    the video's decoding and its remaining risk frames, all at the mean costs measured so far."""

    def __init__(self, frames: int, risk: set[int], budget_s: float):
        self.frames, self.budget = max(frames, 1), budget_s
        self.risk = sorted(risk)
        self.scans, self.scan_s, self.last = 0, 0.0, -1
        self.skipped_risk = 0

    def wants(self, index: int, elapsed: float) -> bool:
        if not self.scans:
            return True
        cost = self.scan_s / self.scans
        if index in self._risk_set:
            ok = elapsed + cost <= self.budget
            self.skipped_risk += not ok
            return ok
        decoding = (elapsed - self.scan_s) / (index + 1)  # per frame, from the frames so far
        risk_left = len(self.risk) - bisect.bisect_right(self.risk, index)
        spare = self.budget - elapsed - decoding * (self.frames - index - 1) - cost * (risk_left + 1)  # + 1: scans vary
        affordable = int(spare // cost)
        return affordable >= 1 and index - self.last >= (self.frames - index) / affordable

    def scanned(self, index: int, seconds: float) -> None:
        self.scans += 1
        self.scan_s += seconds
        if index not in self._risk_set:
            self.last = index

    @functools.cached_property
    def _risk_set(self) -> set[int]:
        return set(self.risk)


def audit_video(path: str, trail: AuditTrail, options: AuditOptions, frames: int, budget_s: float) -> AuditResult:
    """Scan the written video at ``path``; in sample mode the audit's whole time stays within about ``budget_s``
    (one scan over it at most: the first)."""
    detector = DlibDetector(options.detector, options.min_face, options.threshold)
    schedule = Schedule(frames, trail.risk_frames(options.radius, frames), budget_s)
    result = AuditResult(options, frames=frames, budget_s=budget_s if options.mode == "sample" else None)
    started = time.perf_counter()
    with VideoReader(path) as reader:
        for frame in reader.frames():
            if options.mode == "all" or schedule.wants(frame.index, time.perf_counter() - started):
                scan_started = time.perf_counter()
                result.audited.append(frame.index)
                for det in detector.detect([frame.image], [frame.index])[0]:
                    if not covered(det, trail.crops.get(frame.index, []), options.coverage):
                        crop = _context(frame.image, det) if len(result.suspects) < SHEET_MAX else None
                        result.suspects.append(Suspect(frame.index, frame.time, det[:4].copy(), float(det[4]), crop))
                schedule.scanned(frame.index, time.perf_counter() - scan_started)
    result.seconds = time.perf_counter() - started
    result.skipped_risk = schedule.skipped_risk
    return result


def _context(image: np.ndarray, det: np.ndarray) -> np.ndarray:
    tile = extract(image, crop_region(det, margin=0.25))
    return np.asarray(Image.fromarray(tile).resize((SHEET_TILE, SHEET_TILE), Image.BILINEAR))


def contact_sheet(result: AuditResult, title: str) -> np.ndarray:
    """One labelled tile per suspect (the first ``SHEET_MAX``), 8 to a row, under a title line."""
    from pprl.evaluate.applications import grid

    tiles = []
    for s in result.suspects[:SHEET_MAX]:
        img = Image.fromarray(s.crop)
        draw = ImageDraw.Draw(img)
        draw.rectangle((0, 0, SHEET_TILE, 12), fill=(0, 0, 0))
        draw.text((2, 1), f"f{s.frame_index} {s.timestamp:.2f}s {s.score:.2f}", fill=(255, 255, 0))
        tiles.append(np.asarray(img))
    rows = [tiles[i : i + 8] for i in range(0, len(tiles), 8)]
    body = grid(rows, cell=SHEET_TILE)
    head = Image.new("RGB", (body.shape[1], 16), (255, 255, 255))
    shown = f"{len(tiles)} of {len(result.suspects)}" if len(result.suspects) > len(tiles) else f"{len(tiles)}"
    ImageDraw.Draw(head).text((2, 2), f"{title}: {shown} suspects in {result.suspect_frames} frames", fill=(0, 0, 0))
    return np.concatenate([np.asarray(head), body], axis=0)


def suspect_columns(result: AuditResult, video_uri: str, names: list[str]) -> dict[str, list]:
    """faces.parquet rows for the suspects (``kind = suspect``); columns the audit has no value for are null."""
    n = len(result.suspects)
    values = {
        "video_uri": [video_uri] * n,
        "frame_index": [s.frame_index for s in result.suspects],
        "timestamp": [s.timestamp for s in result.suspects],
        "box": [s.box.astype(np.float32).tolist() for s in result.suspects],
        "score": [s.score for s in result.suspects],
        "kind": ["suspect"] * n,
    }
    return {name: values.get(name, [None] * n) for name in names}
