"""Test footage with known ground truth, since no real archive footage may ship with the project.

- ``synthetic_clip``: 1-3 synthetic faces (``pprl.data.synth.draw_sequence_frame``, so identity and expression are
  known; ``switch_to`` changes a face's expression halfway through its track) moving across a textured background, a sine tone as the audio track, and the true face boxes written as
  a sidecar Parquet that the ``sidecar`` detector reads.
- ``astronaut_clip``: scikit-image's public-domain ``astronaut()`` photo panned and zoomed into a short clip, with
  the true face box per frame, to check the default (CenterFace) detector on a real face.
- ``hopper_clip``: the same for matplotlib's sample photo of Grace Hopper (public domain): a second real person.
- ``synthetic_archive``: many tiny clips in camera folders, a few corrupt: what the archive-scale tests and
  ``bench/footage_archive.py`` run over.

Faces are drawn in the middle third of a longer expression sequence, so every frame shows its expression clearly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from pprl.data.synth import draw_sequence_frame

# The face inside a rendered tile, as fractions of the tile side (x0, y0, x1, y1): the labelled box. With the
# default crop margin the square crop around it is the tile, which is how the model saw faces in training.
FACE_IN_TILE = (0.18, 0.11, 0.82, 0.89)
ASTRONAUT_FACE = (181.0, 58.0, 270.0, 178.0)  # the face in skimage.data.astronaut() (512x512), x0, y0, x1, y1
HOPPER_FACE = (175.0, 132.0, 357.0, 336.0)  # the face in matplotlib's grace_hopper.jpg (512 wide, 600 high)


@dataclass(frozen=True)
class ClipSpec:
    """One synthetic clip; the defaults are CI-sized (2 s at 24 fps, 256x192)."""

    faces: int = 2  # 1-3, one horizontal lane each
    frames: int = 48
    width: int = 256
    height: int = 192
    fps: int = 24
    tile: int = 64  # rendered face side in pixels
    seed: int = 0  # scene, trajectories, identities and expressions
    data_seed: int = 0  # the synthetic dataset's seed: the identities' appearance
    num_identities: int = 6
    identities: tuple[int, ...] | None = None  # one per face; default: distinct, drawn from the seed
    expressions: tuple[int, ...] | None = None  # one per face (0-6, EXPRESSIONS order); default: drawn
    switch_to: tuple[int, ...] | None = None  # one per face: the expression it changes to halfway through its track
    audio: str | None = "aac"  # "aac", "pcm_s16le" or None
    sample_rate: int = 22050

    def __post_init__(self) -> None:
        if not 1 <= self.faces <= 3:
            raise ValueError(f"ClipSpec.faces must be 1-3, got {self.faces}")
        for name in ("identities", "expressions", "switch_to"):
            if getattr(self, name) is not None and len(getattr(self, name)) != self.faces:
                raise ValueError(f"ClipSpec.{name} needs one entry per face ({self.faces})")
        if self.height < self.faces * self.tile or self.width < 2 * self.tile:
            raise ValueError(f"a {self.width}x{self.height} frame has no room for {self.faces} lanes of {self.tile}px faces")


def background(width: int, height: int, seed: int) -> np.ndarray:
    """A static scene: a gradient with soft blobs and fine noise, so "unchanged outside the face" means something."""
    rng = np.random.default_rng([seed, 11])
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(60, 200, 3).astype(np.float32)
    img = base + 40 * np.sin(xx[..., None] / width * math.pi * rng.uniform(1, 3) + rng.uniform(0, 6, 3))
    for _ in range(6):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(15, 50)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-60, 60, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _tracks(spec: ClipSpec) -> list[dict]:
    """Per face: identity, expression, visible frame range and a straight path across its lane."""
    rng = np.random.default_rng([spec.seed, 13])
    identities = spec.identities or rng.permutation(spec.num_identities)[: spec.faces]
    expressions = spec.expressions or rng.integers(0, 7, spec.faces)
    lane_h = spec.height // spec.faces
    tracks = []
    for k in range(spec.faces):
        start = int(rng.integers(0, spec.frames // 4)) if k else 0
        end = spec.frames if k != 1 else int(spec.frames - rng.integers(0, spec.frames // 4))
        x0, x1 = rng.uniform(0, spec.width - spec.tile, 2)
        y_lo = k * lane_h
        y0, y1 = rng.uniform(y_lo, y_lo + lane_h - spec.tile, 2)
        tracks.append({
            "identity": int(identities[k]), "expression": int(expressions[k]), "sequence": int(rng.integers(0, 10**6)),
            "start": start, "end": end, "x": (float(x0), float(x1)), "y": (float(y0), float(y1)),
            "switch_to": int(spec.switch_to[k]) if spec.switch_to else int(expressions[k]),
        })
    return tracks


def _tile_at(track: dict, frame: int) -> tuple[int, int]:
    a = (frame - track["start"]) / max(1, track["end"] - track["start"] - 1)
    return round(track["x"][0] + (track["x"][1] - track["x"][0]) * a), round(track["y"][0] + (track["y"][1] - track["y"][0]) * a)


def synthetic_frames(spec: ClipSpec):
    """Yield ``(frame_image, truth_rows)`` per frame; truth rows carry the labelled box and the face's labels."""
    scene = background(spec.width, spec.height, spec.seed)
    tracks = _tracks(spec)
    for f in range(spec.frames):
        img = scene.copy()
        rows = []
        for t, track in enumerate(tracks):
            if not track["start"] <= f < track["end"]:
                continue
            n = track["end"] - track["start"]
            expression = track["expression"] if f - track["start"] < n // 2 else track["switch_to"]
            face, _ = draw_sequence_frame(track["identity"], expression, spec.data_seed, track["sequence"],
                                          n + f - track["start"], 3 * n, spec.tile)
            x, y = _tile_at(track, f)
            img[y : y + spec.tile, x : x + spec.tile] = face
            fx0, fy0, fx1, fy1 = FACE_IN_TILE
            box = [x + fx0 * spec.tile, y + fy0 * spec.tile, x + fx1 * spec.tile, y + fy1 * spec.tile]
            rows.append({"frame_index": f, "box": box, "score": 1.0, "true_track": t,
                         "identity": track["identity"], "expression": expression, "tile": [x, y, spec.tile]})
        yield img, rows


def _sine(spec_rate: int, seconds: float, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(round(seconds * spec_rate))) / spec_rate
    return (0.3 * np.sin(2 * math.pi * hz * t)).astype(np.float32)


class _ClipEncoder:
    """Writes a small test clip: H.264 video, optionally a sine-tone audio stream, interleaved by time."""

    def __init__(self, path: str, width: int, height: int, fps: int, audio: str | None, sample_rate: int, frames: int):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        self.container.metadata["title"] = f"pprl test clip {Path(path).name}"
        self.video = self.container.add_stream("libx264", rate=fps)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.codec_context.options = {"crf": "12", "preset": "veryfast"}
        self.audio = None
        if audio:
            self.audio = self.container.add_stream(audio, rate=sample_rate)
            self.audio.layout = "mono"
            self.samples = _sine(sample_rate, frames / fps)
            self.sent = 0
        self.fps, self.rate = fps, sample_rate

    def add(self, index: int, image: np.ndarray) -> None:
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = index, Fraction(1, self.fps)
        for packet in self.video.encode(frame):
            self.container.mux(packet)
        if self.audio is not None:
            self._audio_until(int((index + 1) / self.fps * self.rate))

    def _audio_until(self, upto: int) -> None:
        chunk = 1024
        fmt = self.audio.codec_context.format.name
        while self.sent < min(upto, len(self.samples)):
            part = self.samples[self.sent : self.sent + chunk]
            data = (part * 32767).astype(np.int16)[None] if fmt.startswith("s16") else part[None]
            frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = self.rate, self.sent, Fraction(1, self.rate)
            for packet in self.audio.encode(frame):
                self.container.mux(packet)
            self.sent += len(part)

    def close(self) -> None:
        for packet in self.video.encode(None):
            self.container.mux(packet)
        if self.audio is not None:
            self._audio_until(len(self.samples))
            for packet in self.audio.encode(None):
                self.container.mux(packet)
        self.container.close()


def truth_table(rows: list[dict]) -> pa.Table:
    """The sidecar: ``frame_index`` and ``box`` (x0, y0, x1, y1 pixels) are what the sidecar detector reads."""
    df = pd.DataFrame(rows)
    return pa.Table.from_pandas(df, preserve_index=False).cast(pa.schema([
        ("frame_index", pa.int64()), ("box", pa.list_(pa.float32())), ("score", pa.float32()), ("true_track", pa.int32()),
        ("identity", pa.int32()), ("expression", pa.int32()), ("tile", pa.list_(pa.int32())),
    ]))


def synthetic_clip(path: str, spec: ClipSpec | None = None, sidecar: str | None = None) -> pd.DataFrame:
    """Write the clip (local path) and, if asked, its sidecar Parquet; return the truth rows."""
    import pyarrow.parquet as pq

    spec = spec or ClipSpec()
    enc = _ClipEncoder(path, spec.width, spec.height, spec.fps, spec.audio, spec.sample_rate, spec.frames)
    truth: list[dict] = []
    for index, (img, rows) in enumerate(synthetic_frames(spec)):
        enc.add(index, img)
        truth.extend(rows)
    enc.close()
    table = truth_table(truth)
    if sidecar:
        Path(sidecar).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, sidecar)
    return table.to_pandas()


def astronaut_clip(path: str, frames: int = 48, width: int = 256, height: int = 192, fps: int = 24) -> pd.DataFrame:
    """Pan and zoom over ``astronaut()``: the 4:3 window shrinks from 440 to 300 px wide while sliding right and down."""
    from skimage.data import astronaut

    return _pan_clip(path, astronaut(), ASTRONAUT_FACE, frames, width, height, fps, widths=(440, 300), start=(30, 10), shift=(60, 30))


def hopper_clip(path: str, frames: int = 48, width: int = 256, height: int = 192, fps: int = 24) -> pd.DataFrame:
    """Pan and zoom over matplotlib's ``grace_hopper.jpg``: the window shrinks from 512 to 400 px wide."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        photo = np.asarray(img.convert("RGB"))
    return _pan_clip(path, photo, HOPPER_FACE, frames, width, height, fps, widths=(512, 400), start=(0, 40), shift=(60, 40))


def _pan_clip(path: str, photo: np.ndarray, face: tuple[float, ...], frames: int, width: int, height: int, fps: int,
              widths: tuple[float, float], start: tuple[float, float], shift: tuple[float, float]) -> pd.DataFrame:
    """A window of the frame's aspect over ``photo`` that shrinks from ``widths[0]`` to ``widths[1]`` px while its
    corner moves from ``start`` by ``shift``; returns the true face box per frame."""
    image = Image.fromarray(photo)
    enc = _ClipEncoder(path, width, height, fps, None, 0, frames)
    rows = []
    for f in range(frames):
        a = f / max(1, frames - 1)
        win_w = widths[0] + (widths[1] - widths[0]) * a
        win_h = win_w * height / width
        x0, y0 = start[0] + shift[0] * a, start[1] + shift[1] * a
        crop = image.resize((width, height), Image.BICUBIC, box=(x0, y0, x0 + win_w, y0 + win_h))
        enc.add(f, np.asarray(crop))
        s = width / win_w
        fx0, fy0, fx1, fy1 = face
        rows.append({"frame_index": f, "box": [(fx0 - x0) * s, (fy0 - y0) * s, (fx1 - x0) * s, (fy1 - y0) * s]})
    enc.close()
    return pd.DataFrame(rows)


def corrupt_clip(path: str, seed: int = 0) -> None:
    """A file with a video suffix whose bytes are not a video (as a truncated upload would be)."""
    rng = np.random.default_rng(seed)
    Path(path).write_bytes(b"\x00\x00\x00\x18ftypmp42" + rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())


def synthetic_archive(root: str | Path, count: int, corrupt_every: int = 50) -> set[str]:
    """``count`` tiny clips (4 frames of 128x64, one face) under ``root/in/cam<k>/`` in four camera folders, every
    third with AAC audio and one in ``corrupt_every`` corrupt, their boxes under ``root/boxes`` (the sidecar
    detector's mirror of the tree); returns the corrupt clips' paths."""
    root = Path(root)
    corrupt = set()
    for i in range(count):
        rel = f"cam{i % 4}/clip{i:05d}.mp4"
        path = root / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % corrupt_every == corrupt_every // 2:
            corrupt_clip(str(path), seed=i)
            corrupt.add(str(path))
            continue
        spec = ClipSpec(faces=1, frames=4, width=128, height=64, tile=56, seed=i, audio="aac" if i % 3 == 0 else None)
        synthetic_clip(str(path), spec, sidecar=str(root / "boxes" / rel.replace(".mp4", ".parquet")))
    return corrupt
