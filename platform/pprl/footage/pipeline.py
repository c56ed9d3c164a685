"""Anonymise archived footage: one video streamed frame by frame, many videos in parallel as Ray tasks.

Per video (``process_video``)::

    decode (PyAV) -> detect faces (batch of frames) -> track (IoU, bridges 1-2 missed frames)
      -> crop with margin -> Anonymizer.run on every face of a batch of frames at once (the latent optionally
      smoothed per track) -> feathered paste-back -> per face: domain score, frame-to-frame change, judged identity
      -> encode at the input's timestamps, audio packets remuxed unchanged -> faces.parquet rows (streamed)
      -> leak audit of the written video (``pprl.footage.audit``): suspects as faces.parquet rows and a contact sheet

Only ``batch_frames + max_gap`` decoded frames are held at a time. The video and its ``faces.parquet`` are written
to staging files and moved into place when complete, the video first: an existing ``faces.parquet`` means the video
is finished, which is what a rerun checks (one listing of the output). The run-level ``index.parquet`` is rewritten
(atomically) at most every ``INDEX_EVERY_S`` and at the end; a crash loses no finished video, because each
``faces.parquet`` carries its index row, and a rerun picks up where the last one stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pprl import cluster, storage
from pprl.config import EXPRESSIONS
from pprl.data.dataset import encode_png
from pprl.domain import missing_note, mostly_out_of_domain
from pprl.footage.audit import AuditOptions, AuditResult, AuditTrail, audit_video, contact_sheet, suspect_columns
from pprl.footage.detect import DetectorSpec, make_detector
from pprl.footage.paste import blur_surround, crop_region, extract, paste
from pprl.footage.stability import TrackMemory, flicker
from pprl.footage.track import Face, IoUTracker
from pprl.footage.video import VIDEO_SUFFIXES, EncodeOptions, Frame, VideoReader, VideoWriter
from pprl.serve import schema as face_schema
from pprl.serve.security import pseudonym_identity
from pprl.storage import StorageError
from pprl.train.export import LatentGate, bundle_info, latent_gate

log = logging.getLogger(__name__)

INDEX_NAME = "index.parquet"
FACES_SUFFIX = ".faces.parquet"
SUMMARY_KEY = b"pprl.footage.summary"  # faces.parquet metadata: the video's index row, so the index can be rebuilt
AUDIT_KEY = b"pprl.footage.audit"  # faces.parquet metadata: the leak audit's record (AuditResult.record)
SUSPECTS_SUFFIX = ".suspects.png"

_SHARED = ("target_identity", "expression", "expression_probs", "latent", "model_version", "error")
FACES_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("frame_index", pa.int64(), nullable=False),  # 0-based decoded frame number
        pa.field("timestamp", pa.float64(), nullable=False),  # seconds, from the frame's presentation time
        pa.field("track_id", pa.int32()),  # per video, from 0; null for suspects
        pa.field("box", pa.list_(pa.float32(), 4)),  # x0, y0, x1, y1 in full-resolution pixels
        pa.field("score", pa.float32()),  # detector score; null for bridged faces
        pa.field("bridged", pa.bool_()),  # box interpolated by the tracker over a missed detection
        *(f for f in face_schema.FACE_FIELDS if f.name in _SHARED),  # same names and types as the batch jobs
        pa.field("kind", pa.string(), nullable=False),  # replaced | suspect (a face the leak audit found outside every replaced crop)
        # the domain check (pprl.domain); null when the bundle has no domain statistics
        pa.field("domain_distance", pa.float32()),  # Mahalanobis distance of the latent from the training faces'
        pa.field("domain_percentile", pa.float32()),  # share (%) of the training faces that lie closer
        pa.field("out_of_domain", pa.bool_()),  # domain_percentile > 99
        # temporal stability (pprl.footage.stability); the changes are null on a track's first frame
        pa.field("source_change", pa.float32()),  # mean |change| of the original face since the track's previous frame
        pa.field("render_change", pa.float32()),  # the same for the replaced face, as pasted
        pa.field("judged_identity", pa.int32()),  # identity the model's discriminator reads in the replaced face
    ],
    metadata={"pprl.schema": "footage-faces/v2"},
)
INDEX_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("output_uri", pa.string()),
        pa.field("faces_uri", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # done | error
        pa.field("frames", pa.int64()),
        pa.field("faces", pa.int64()),
        pa.field("tracks", pa.int64()),
        pa.field("seconds", pa.float64()),  # wall time spent on the video
        pa.field("error", pa.string()),
        pa.field("model_version", pa.string()),
        pa.field("finished_at", pa.string()),  # ISO 8601, UTC
        pa.field("audited_frames", pa.int64()),  # frames the leak audit scanned; null when it did not run
        pa.field("suspect_frames", pa.int64()),  # frames with a face the audit found outside every replaced crop
        pa.field("suspects_uri", pa.string()),  # the contact sheet of the suspects (PNG); null when there are none
        pa.field("out_of_domain_share", pa.float64()),  # share of the faces out of domain; null without domain statistics
        pa.field("flicker", pa.float64()),  # sum(render_change) / sum(source_change) over the video's faces
        pa.field("identity_consistency", pa.float64()),  # share of faces whose judged identity is their target
        pa.field("s3_retries", pa.int64()),  # transient S3 faults the video's task met and retried (0 on local disk)
    ],
    metadata={"pprl.schema": "footage-index/v3"},
)


# --- options ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetPolicy:
    """Which identity each track is rendered as.

    - ``random-per-track``: a draw per (run seed, video, track): one identity per track, unrelated across tracks.
    - ``fixed N``: every face becomes identity N.
    - ``pseudonym``: HMAC(key, video path + track id): reproducible with the key, unlinkable without it.
    """

    kind: str = "random-per-track"
    index: int | None = None
    key: str | None = None
    seed: int | None = None

    @classmethod
    def parse(cls, text: str, key: str | None = None, seed: int | None = None) -> TargetPolicy:
        words = text.replace(":", " ").replace("=", " ").split()
        if words == ["random-per-track"]:
            return cls("random-per-track", seed=seed)
        if len(words) == 2 and words[0] == "fixed" and words[1].lstrip("-").isdigit():
            return cls("fixed", index=int(words[1]))
        if words == ["pseudonym"]:
            if not key:
                raise ValueError("--target-policy pseudonym needs --pseudonym-key (or PPRL_PSEUDONYM_KEY)")
            return cls("pseudonym", key=key)
        raise ValueError(f"--target-policy {text!r}: expected 'random-per-track', 'fixed N' or 'pseudonym'")

    def resolved(self) -> TargetPolicy:
        """Give ``random-per-track`` a seed for this run, so every task of the run draws consistently."""
        if self.kind == "random-per-track" and self.seed is None:
            return dataclasses.replace(self, seed=secrets.randbits(63))
        return self

    def check(self, num_identities: int) -> None:
        if self.kind == "fixed" and not 0 <= (self.index or 0) < num_identities:
            raise ValueError(f"--target-policy fixed {self.index}: the model has {num_identities} identities (0..{num_identities - 1})")

    def target(self, rel: str, track_id: int, num_identities: int) -> int:
        if self.kind == "fixed":
            return int(self.index)
        if self.kind == "pseudonym":
            return pseudonym_identity(f"{rel}#track-{track_id}", self.key.encode("utf-8"), num_identities)
        digest = hashlib.sha256(f"{self.seed}\0{rel}\0{track_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") % num_identities


@dataclass(frozen=True)
class FootageOptions:
    """Everything a worker needs for one video (picklable: it travels to Ray tasks)."""

    model: str  # model bundle folder, local or s3://
    detector: DetectorSpec = field(default_factory=lambda: DetectorSpec("centerface"))
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    margin: float = 0.14  # crop side = max(box w, h) * (1 + 2 margin): the face fills the crop as in training
    feather: float = 0.15  # fraction of the crop side over which the paste fades out
    blur_context: float = 0.0  # a ring this fraction of the crop side wide around each crop is blurred (0 = off)
    batch_frames: int = 32  # frames detected and anonymised together (memory: this many decoded frames, plus max_gap)
    max_faces_per_batch: int = 256  # crops per Anonymizer.run call
    iou_threshold: float = 0.3
    max_gap: int = 2  # missed detections bridged by the tracker, in frames
    use_gpu: bool = False
    encode: EncodeOptions = field(default_factory=EncodeOptions)
    log_every: int = 500  # frames between progress lines in the worker log
    export_unaudited_latent: bool = False  # the operator's override of the latent gate (pprl.train.export.latent_gate)
    latent: LatentGate | None = None  # the gate's decision, taken once per run by anonymize_footage
    audit: AuditOptions = field(default_factory=AuditOptions)  # the leak audit of every written video
    smooth_frames: int = 2  # per-track moving average of the rendered latent over about this many frames; 0/1: off

    def __post_init__(self) -> None:
        if self.batch_frames < 1 or self.max_faces_per_batch < 1:
            raise ValueError(f"batch_frames ({self.batch_frames}) and max_faces_per_batch ({self.max_faces_per_batch}) must be >= 1")
        if self.smooth_frames < 0:
            raise ValueError(f"smooth_frames must be >= 0 (0 = off), got {self.smooth_frames}")
        if not 0 <= self.margin <= 2 or not 0 <= self.feather <= 0.5 or not 0 <= self.blur_context <= 2:
            raise ValueError(f"margin and blur_context must be in [0, 2] and feather in [0, 0.5] (got margin {self.margin}, "
                             f"blur_context {self.blur_context}, feather {self.feather})")


@dataclass(frozen=True)
class VideoTask:
    """One input video and where its outputs go (the input tree mirrored under the output)."""

    input_uri: str
    rel: str  # path relative to the input root, '/'-separated
    output_uri: str
    faces_uri: str

    @property
    def suspects_uri(self) -> str:
        return self.output_uri + SUSPECTS_SUFFIX


# --- one video -------------------------------------------------------------------------------------------------


class SetupError(RuntimeError):
    """A failure that is not the video's fault (the model cannot be loaded): it stops the run instead of
    marking every video as failed."""


@functools.lru_cache(maxsize=2)
def load_anonymizer(uri: str, device: str | None):
    """One model per worker process, reused by every video the worker gets."""
    try:
        from pprl.anonymizer import Anonymizer

        return Anonymizer.load(uri, device=device)
    except Exception as err:
        raise SetupError(f"cannot load the model {uri} on {device}: {type(err).__name__}: {err}") from err


@dataclass
class _Pending:
    frame: Frame
    faces: list[Face]


class _FaceRows:
    """Streams faces.parquet: one row group per batch of frames, so a long video's rows are never all in memory.
    The latent column is null unless the gate exports it; the file's metadata carries the gate's record."""

    def __init__(self, path: str, latent: LatentGate):
        self.schema = face_schema.with_latent_record(FACES_SCHEMA, latent.record())
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.export_latent = latent.exported
        self.count = 0

    def add(self, columns: dict[str, list], faces: bool = True) -> None:
        """``faces``: the rows are replaced faces (counted in the index), not the audit's suspects."""
        if columns["frame_index"]:
            if not self.export_latent:
                columns = {**columns, "latent": [None] * len(columns["frame_index"])}
            self.writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))
            self.count += len(columns["frame_index"]) if faces else 0

    def close(self, summary: dict[str, Any] | None, audit: AuditResult | None = None) -> None:
        meta = {}
        if summary is not None:
            meta[SUMMARY_KEY] = json.dumps(summary).encode()
        if audit is not None:
            meta[AUDIT_KEY] = json.dumps(audit.record()).encode()
        if meta:
            self.writer.add_key_value_metadata(meta)
        self.writer.close()


@dataclass
class _Figures:
    """A video's domain and stability figures, summed over its faces as they are written (its index row's columns)."""

    scored: int = 0  # faces with a domain score
    out_of_domain: int = 0
    render_change: float = 0.0
    source_change: float = 0.0
    judged: int = 0
    consistent: int = 0

    def add(self, columns: dict[str, list]) -> None:
        ood = [v for v in columns["out_of_domain"] if v is not None]
        self.scored += len(ood)
        self.out_of_domain += sum(ood)
        pairs = [(r, s) for r, s in zip(columns["render_change"], columns["source_change"], strict=True) if r is not None and s is not None]
        self.render_change += sum(r for r, _ in pairs)
        self.source_change += sum(s for _, s in pairs)
        self.judged += len(columns["judged_identity"])
        self.consistent += sum(j == t for j, t in zip(columns["judged_identity"], columns["target_identity"], strict=True))

    def row(self) -> dict[str, float | None]:
        return {
            "out_of_domain_share": self.out_of_domain / self.scored if self.scored else None,
            "flicker": flicker([self.render_change], [self.source_change]),
            "identity_consistency": self.consistent / self.judged if self.judged else None,
        }


class _VideoRun:
    """The frame loop of one video: detect -> track -> (once settled) anonymise -> paste -> measure -> encode."""

    def __init__(self, task: VideoTask, options: FootageOptions, model, detector, writer: VideoWriter, rows: _FaceRows):
        self.task, self.options, self.model, self.detector = task, options, model, detector
        self.writer, self.rows = writer, rows
        self.tracker = IoUTracker(options.iou_threshold, options.max_gap)
        self.memory = TrackMemory(model.image_size, options.feather, options.smooth_frames)
        self.figures = _Figures()
        self.pending: deque[_Pending] = deque()
        self.by_index: dict[int, _Pending] = {}
        self.frames = 0
        self.tracks: set[int] = set()
        self.trail = AuditTrail()  # what the leak audit needs to know about each frame

    def feed(self, frames: list[Frame]) -> None:
        detections = self.detector.detect([f.image for f in frames], [f.index for f in frames])
        for frame, dets in zip(frames, detections, strict=True):
            faces, bridged = self.tracker.update(frame.index, dets)
            item = _Pending(frame, faces)
            self.pending.append(item)
            self.by_index[frame.index] = item
            for face in bridged:
                self.by_index[face.frame_index].faces.append(face)
        self._drain(final=False)

    def finish(self) -> None:
        self._drain(final=True)

    def _drain(self, final: bool) -> None:
        ready: list[_Pending] = []
        while self.pending and (final or self.tracker.settled(self.pending[0].frame.index)):
            item = self.pending.popleft()
            del self.by_index[item.frame.index]
            ready.append(item)
        if ready:
            self._anonymise(ready)
            for item in ready:
                self.writer.write(item.frame, item.frame.image)
            self.frames += len(ready)

    def _anonymise(self, ready: list[_Pending]) -> None:
        """Every face of the ready frames in as few model calls as possible; crops are taken before any paste, the
        stability figures after every paste (frames in order, so each track's faces come in frame order)."""
        items = [(item, face) for item in ready for face in item.faces]
        if not items:
            return
        n = self.model.num_identities
        regions = [crop_region(face.box, self.options.margin) for _, face in items]
        for (_, face), region in zip(items, regions, strict=True):
            self.trail.add(face, region, self.options.audit.low_score)
        crops = [extract(item.frame.image, region) for (item, _), region in zip(items, regions, strict=True)]
        for (item, _), region in zip(items, regions, strict=True):  # every surround before any face is pasted
            blur_surround(item.frame.image, region, self.options.blur_context, self.options.feather)
        targets = [self.options.policy.target(self.task.rel, face.track_id, n) for _, face in items]
        track_ids = [face.track_id for _, face in items]
        step = self.options.max_faces_per_batch
        results = []
        for start in range(0, len(items), step):
            ids = track_ids[start : start + step]
            smooth = (lambda z, ids=ids: self.memory.smooth(ids, z)) if self.memory.smoothing else None
            result = self.model.run(crops[start : start + step], np.asarray(targets[start : start + step], np.int64), latent_filter=smooth)
            for j, k in enumerate(range(start, min(start + step, len(items)))):
                paste(items[k][0].frame.image, regions[k], np.asarray(result.images[j]), self.options.feather)
            results.append((start, result))
        measured = self._measure(items, regions, crops)
        for start, result in results:
            part = slice(start, start + len(result.images))
            columns = self._columns(items[part], result, {name: values[part] for name, values in measured.items()})
            self.figures.add(columns)
            self.rows.add(columns)
        self.tracks.update(track_ids)
        self.memory.forget(t.id for t in self.tracker.tracks)

    def _measure(self, items: list[tuple[_Pending, Face]], regions: list, crops: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Per face, once every face of these frames is pasted: the identity the model's discriminator reads in the
        replaced face, and the frame-to-frame change of the original and of the replaced face along its track."""
        pasted = [extract(item.frame.image, region) for (item, _), region in zip(items, regions, strict=True)]
        source_change, render_change = self.memory.changes([face.track_id for _, face in items], crops, pasted)
        judged = self.model.predict_identity(pasted).argmax(1)
        return {"judged_identity": judged, "source_change": source_change, "render_change": render_change}

    def _columns(self, items: list[tuple[_Pending, Face]], result, measured: dict[str, np.ndarray]) -> dict[str, list]:
        probs = np.asarray(result.expression_probs, np.float32)
        domain = result.domain
        return {
            "video_uri": [self.task.input_uri] * len(items),
            "frame_index": [item.frame.index for item, _ in items],
            "timestamp": [item.frame.time for item, _ in items],
            "track_id": [face.track_id for _, face in items],
            "box": [face.box.astype(np.float32).tolist() for _, face in items],
            "score": [face.score for _, face in items],
            "bridged": [face.bridged for _, face in items],
            "target_identity": [int(t) for t in np.asarray(result.targets)],
            "expression": [EXPRESSIONS[int(i)] for i in probs.argmax(1)],
            "expression_probs": probs.tolist(),
            "latent": np.asarray(result.latents, np.float32).tolist(),
            "model_version": [self.model.version] * len(items),
            "error": [None] * len(items),
            "kind": ["replaced"] * len(items),
            "domain_distance": domain.distance.tolist() if domain is not None else [None] * len(items),
            "domain_percentile": domain.percentile.tolist() if domain is not None else [None] * len(items),
            "out_of_domain": domain.out_of_domain.tolist() if domain is not None else [None] * len(items),
            "source_change": _nullable(measured["source_change"]),
            "render_change": _nullable(measured["render_change"]),
            "judged_identity": [int(i) for i in measured["judged_identity"]],
        }

    def log_progress(self, started: float) -> None:
        rate = self.frames / max(time.time() - started, 1e-9)
        log.info("%s: %d frames, %d faces, %.1f frames/s", self.task.rel, self.frames, self.rows.count, rate)


def _nullable(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


_STAGED = re.compile(r"^\.(?P<base>.+)\.[0-9a-f]{12}\.part(\.[^.]*)?$")  # the local names _staging gives


def _staging(uri: str, tmp: str, name: str) -> str:
    """Where an output is written before it is moved into place. Locally a hidden sibling (same filesystem, so the
    move is an atomic rename; the extension is kept because it picks the container format); for S3 a local file."""
    if storage.is_s3(uri):
        return os.path.join(tmp, name)
    path = storage.strip_scheme(uri)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    base = os.path.basename(path)
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{base}.{storage.unique_suffix()}.part{os.path.splitext(base)[1]}")


def _commit(staged: str, uri: str) -> None:
    if storage.is_s3(uri):
        fs, path = storage.filesystem(uri)
        fs.put_file(staged, path)  # one PUT / multipart upload: the object appears whole or not at all
        os.unlink(staged)
    else:
        os.replace(staged, storage.strip_scheme(uri))


@contextlib.contextmanager
def local_input(uri: str, tmp: str) -> Iterator[str]:
    """A local path to read: the file itself, or an S3 object downloaded (streamed to disk, not memory)."""
    if not storage.is_s3(uri):
        yield storage.strip_scheme(uri)
        return
    fs, path = storage.filesystem(uri)
    local = os.path.join(tmp, "input" + os.path.splitext(path)[1])
    fs.get_file(path, local)
    yield local


def process_video(task: VideoTask, options: FootageOptions) -> dict[str, Any]:
    """Anonymise one video; returns its index row. Raises on any failure (see ``process_video_safe``)."""
    started = time.time()
    model = load_anonymizer(options.model, "cuda" if options.use_gpu else "cpu")
    latent = options.latent or latent_gate(options.model, options.export_unaudited_latent)
    staged: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="pprl-footage-") as tmp, local_input(task.input_uri, tmp) as src:
            video_tmp = _staging(task.output_uri, tmp, "video" + os.path.splitext(task.rel)[1])
            faces_tmp = _staging(task.faces_uri, tmp, "faces.parquet")
            staged += [video_tmp, faces_tmp]
            rows = _FaceRows(faces_tmp, latent)
            try:
                with VideoReader(src, task.input_uri) as reader, VideoWriter(video_tmp, reader, options.encode) as writer:
                    detector = make_detector(options.detector, task.rel, options.use_gpu)
                    run = _VideoRun(task, options, model, detector, writer, rows)
                    _stream(reader, writer, run, options, started)
                audit = _audit(video_tmp, task, run, options, started)
            except BaseException:
                rows.close(None)
                raise
            row = _row(task, "done", run.frames, rows.count, len(run.tracks), time.time() - started, None, model.version, audit)
            row |= run.figures.row()
            rows.close(row, audit)
            _commit(video_tmp, task.output_uri)
            _write_sheet(task, audit)
            _commit(faces_tmp, task.faces_uri)  # last: its presence marks the video finished
            return row
    finally:
        for path in staged:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _audit(video: str, task: VideoTask, run: _VideoRun, options: FootageOptions, started: float) -> AuditResult | None:
    """The leak audit of the written (staged) video; its suspects become faces.parquet rows."""
    if not options.audit.enabled:
        return None
    audit = audit_video(video, run.trail, options.audit, run.frames, options.audit.budget * (time.time() - started))
    run.rows.add(suspect_columns(audit, task.input_uri, run.rows.schema.names), faces=False)
    level = logging.WARNING if audit.suspects else logging.INFO
    budget = "" if audit.budget_s is None else f" (budget {audit.budget_s:.1f} s)"
    log.log(level, "%s: leak audit (%s) scanned %d of %d frames in %.1f s%s: %d suspect faces in %d frames", task.rel,
            options.audit.describe(), len(audit.audited), run.frames, audit.seconds, budget, len(audit.suspects), audit.suspect_frames)
    if audit.skipped_risk:
        log.warning("%s: the leak audit's time budget left %d risk frames unscanned: raise --audit-budget or use --audit all",
                    task.rel, audit.skipped_risk)
    return audit


def _write_sheet(task: VideoTask, audit: AuditResult | None) -> None:
    """The suspects' contact sheet next to the video; a sheet left by an earlier run of this video is removed."""
    if audit is not None and audit.suspects:
        storage.write_bytes(task.suspects_uri, encode_png(contact_sheet(audit, task.rel)))
    elif storage.exists(task.suspects_uri):
        fs, path = storage.filesystem(task.suspects_uri)
        fs.rm(path)


def _stream(reader: VideoReader, writer: VideoWriter, run: _VideoRun, options: FootageOptions, started: float) -> None:
    batch: list[Frame] = []
    logged = 0
    for frame in reader.frames(passthrough=writer.copy_packet):
        batch.append(frame)
        if len(batch) == options.batch_frames:
            run.feed(batch)
            batch = []
            if run.frames - logged >= options.log_every:
                run.log_progress(started)
                logged = run.frames
    if batch:
        run.feed(batch)
    run.finish()


def _row(task: VideoTask, status: str, frames, faces, tracks, seconds, error, version, audit: AuditResult | None = None) -> dict[str, Any]:
    return {
        "video_uri": task.input_uri, "output_uri": task.output_uri, "faces_uri": task.faces_uri, "status": status,
        "frames": frames, "faces": faces, "tracks": tracks, "seconds": round(float(seconds), 3), "error": error,
        "model_version": version, "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "audited_frames": len(audit.audited) if audit else None, "suspect_frames": audit.suspect_frames if audit else None,
        "suspects_uri": task.suspects_uri if audit and audit.suspects else None,
    }


def process_video_safe(task: VideoTask, options: FootageOptions) -> dict[str, Any]:
    """``process_video`` that turns any failure into an error row naming the video: one bad file never stops a run."""
    _worker_logging()
    started, retries = time.time(), storage.s3_retries()  # a task has its worker process to itself
    try:
        row = process_video(task, options)
    except SetupError:
        raise
    except Exception as err:
        log.warning("%s failed: %s", task.input_uri, err)
        message = str(err) if task.input_uri in str(err) else f"{task.input_uri}: {err}"
        row = _row(task, "error", None, None, None, time.time() - started, f"{type(err).__name__}: {message}", None)
    return row | {"s3_retries": storage.s3_retries() - retries}


def _worker_logging() -> None:
    """Ray workers start with WARNING: make this package's progress lines reach the job log."""
    logger = logging.getLogger("pprl")
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


# --- many videos -----------------------------------------------------------------------------------------------


def plan(input_uri: str, output_uri: str) -> list[VideoTask]:
    """Every video under ``input_uri`` (recursive; a single file is fine), mirrored under ``output_uri``.
    Anything already under the output prefix is left out, so the output may live inside the input folder."""
    if not storage.exists(input_uri):
        raise ValueError(f"--input {input_uri}: no such file or prefix")
    fs, root = storage.filesystem(input_uri)
    single = fs.isfile(root)
    _, out_root = storage.filesystem(output_uri)
    out_prefix = out_root.rstrip("/") + "/"
    tasks = []
    for uri in storage.list_files(input_uri, VIDEO_SUFFIXES):
        path = storage.strip_scheme(uri) if storage.is_s3(uri) else uri
        if path.startswith(out_prefix):
            continue
        rel = os.path.basename(path) if single else os.path.relpath(path, root).replace(os.sep, "/")
        tasks.append(VideoTask(uri, rel, storage.join(output_uri, rel), storage.join(output_uri, rel + FACES_SUFFIX)))
    return tasks


def read_index(output_uri: str) -> dict[str, dict[str, Any]]:
    uri = storage.join(output_uri, INDEX_NAME)
    if not storage.exists(uri):
        return {}
    return {row["video_uri"]: row for row in storage.read_parquet(uri).to_pylist()}


def write_index(output_uri: str, rows: dict[str, dict[str, Any]]) -> pa.Table:
    ordered = [rows[k] for k in sorted(rows)]
    table = pa.Table.from_pylist(ordered, schema=INDEX_SCHEMA)
    storage.write_parquet(table, storage.join(output_uri, INDEX_NAME))
    return table


def _file_key(uri: str) -> str:
    """``uri`` as :func:`storage.list_files` spells it, so the two can be compared."""
    return uri if storage.is_s3(uri) else os.path.abspath(storage.strip_scheme(uri))


def finished_rows(tasks: list[VideoTask], output_uri: str, rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Index rows of the tasks whose video and ``faces.parquet`` are both in the output, by input URI.

    One listing of the output, not requests per video (an archive of 20,000 videos on S3 would otherwise spend
    minutes on them); a ``faces.parquet`` is read only where ``rows`` (the index) lacks the video's done row: a run
    that died between finishing a video and writing the index is healed here."""
    try:
        present = set(storage.list_files(output_uri))
    except FileNotFoundError:
        present = set()
    finished = {}
    for task in tasks:
        if _file_key(task.faces_uri) not in present or _file_key(task.output_uri) not in present:
            continue
        row = rows.get(task.input_uri)
        if row is None or row["status"] != "done":
            row = _summary(task.faces_uri)
        if row is not None:
            finished[task.input_uri] = row
    return finished


def _summary(faces_uri: str) -> dict[str, Any] | None:
    """The index row a finished video's ``faces.parquet`` carries in its metadata."""
    fs, path = storage.filesystem(faces_uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_metadata(f).metadata or {}
    return json.loads(meta[SUMMARY_KEY]) if SUMMARY_KEY in meta else None


def _sweep_staging(tasks: list[VideoTask]) -> int:
    """Remove the local staging files (``_staging``) of these tasks' outputs: what attempts killed with their worker
    or node left behind. Called when every attempt of the tasks has ended; returns how many were removed."""
    names: dict[str, set[str]] = {}
    for task in tasks:
        for uri in (task.output_uri, task.faces_uri):
            if not storage.is_s3(uri):
                path = _file_key(uri)
                names.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    removed = 0
    for directory, bases in names.items():
        with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
            for entry in entries:
                staged = _STAGED.match(entry.name)
                if staged and staged["base"] in bases:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
    return removed


@dataclass
class RunSummary:
    index: pd.DataFrame
    processed: int  # videos run by this call (done + error)
    skipped: int  # finished (or failed, without retry_errors) in an earlier run
    errors: int  # error rows written by this call
    suspect_frames: int = 0  # frames with a leak-audit suspect, in the videos this call processed
    s3_retries: int = 0  # transient S3 faults the videos of this call met and retried
    domain_warning: str | None = None  # set when most faces of this call were out of the model's domain (logged once)

    @property
    def suspect_videos(self) -> pd.DataFrame:
        """Index rows of every video in the output (this call's and earlier ones) with leak-audit suspects."""
        if not len(self.index) or "suspect_frames" not in self.index:
            return self.index.iloc[:0]
        return self.index[self.index.suspect_frames.fillna(0) > 0]


def _read_model(options: FootageOptions) -> tuple[dict[str, Any], LatentGate]:
    """The bundle's facts and latent gate, read before any video starts so a broken bundle stops the run."""
    try:
        info = bundle_info(options.model)
        return info, latent_gate(options.model, options.export_unaudited_latent, info)
    except (ValueError, StorageError) as err:
        raise SetupError(f"cannot load the model {options.model}: {err}") from err


def anonymize_footage(
    input_uri: str,
    output_uri: str,
    options: FootageOptions,
    num_workers: int = 2,
    gpus_per_worker: float = 1.0,
    cpus_per_worker: float = 1.0,
    retry_errors: bool = False,
    progress: bool = True,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    cancelled: Callable[[], bool] = lambda: False,
) -> RunSummary:
    """Anonymise every video under ``input_uri`` into ``output_uri``; ``num_workers=0`` runs in this process.

    ``on_row`` sees each video's index row as it finishes; once ``cancelled()`` is true no further video starts
    (those running finish and are kept)."""
    info, gate = _read_model(options)
    options.policy.check(int(info["num_identities"]))
    options = dataclasses.replace(options, policy=options.policy.resolved(), latent=gate)
    tasks = plan(input_uri, output_uri)
    rows = read_index(output_uri)
    finished = finished_rows(tasks, output_uri, rows)
    rows |= finished
    todo = [t for t in tasks if t.input_uri not in finished
            and not (rows.get(t.input_uri, {}).get("status") == "error" and not retry_errors)]
    skipped = len(tasks) - len(todo)
    log.info("%s -> %s: %d videos, %d to process, %d finished or failed before", input_uri, output_uri, len(tasks), len(todo), skipped)
    storage.makedirs(output_uri)
    if not todo:
        table = write_index(output_uri, rows) if rows else pa.Table.from_pylist([], schema=INDEX_SCHEMA)
        return RunSummary(table.to_pandas(), 0, skipped, 0)
    if options.audit.enabled:
        log.info("leak audit of every written video: %s", options.audit.describe())
    gate.log(f"footage {input_uri} -> {output_uri}")
    if not info.get("domain"):
        log.warning("%s", missing_note(options.model))
    if num_workers <= 0:
        results = _run_local(todo, options, cancelled)
    else:
        resources = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker if options.use_gpu else 0}
        results = _run_ray(todo, options, num_workers, resources, cancelled)
    errors = suspects = scored = out_of_domain = retries = 0
    with _progress_bar(len(todo), progress) as bar, _index_writer(output_uri, rows) as save_index:
        frames, started = 0, time.time()
        for count, row in enumerate(results, start=1):  # bar.n stays 0 when the bar is disabled
            rows[row["video_uri"]] = row
            save_index()
            errors += row["status"] == "error"
            suspects += row.get("suspect_frames") or 0
            retries += row.get("s3_retries") or 0
            frames += row["frames"] or 0
            if row.get("out_of_domain_share") is not None:
                scored += row["faces"]
                out_of_domain += round(row["out_of_domain_share"] * row["faces"])
            rate = frames / max(time.time() - started, 1e-9)
            bar.update(1)
            bar.set_postfix_str(f"{rate:.1f} frames/s, {errors} errors, {suspects} suspect frames")
            _log_row(row, count, len(todo), rate)
            if on_row:
                on_row(row)
    table = write_index(output_uri, rows)
    if removed := _sweep_staging(todo):
        log.info("removed %d staging files left by attempts that did not finish (a lost worker or node)", removed)
    warning = mostly_out_of_domain(scored, out_of_domain)
    if warning:
        log.warning("%s", warning)
    if retries:
        log.info("%d transient S3 faults met and retried by the videos' tasks (index.parquet: s3_retries)", retries)
    return RunSummary(table.to_pandas(), len(todo), skipped, errors, suspects, s3_retries=retries, domain_warning=warning)


INDEX_EVERY_S = 10.0  # the index is rewritten at most this often during a run (and at its end)


@contextlib.contextmanager
def _index_writer(output_uri: str, rows: dict[str, dict[str, Any]]) -> Iterator[Callable[[], None]]:
    """``save()`` rewrites ``index.parquet`` when :data:`INDEX_EVERY_S` have passed since the last write, so a run of
    N videos writes it about run-time / 10 s times, not N times (each write is the whole index); when the run stops
    on an error or an interrupt it is written once more. Between writes, finished videos are still safe: their
    ``faces.parquet`` carries their row (``finished_rows``); an error row lost to a crash is retried by the rerun."""
    last = time.monotonic()

    def save() -> None:
        nonlocal last
        if time.monotonic() - last >= INDEX_EVERY_S:
            write_index(output_uri, rows)
            last = time.monotonic()

    try:
        yield save
    except BaseException:
        write_index(output_uri, rows)
        raise


def _log_row(row: dict[str, Any], done: int, total: int, rate: float) -> None:
    if row["status"] == "done":
        audit = "not audited" if row.get("audited_frames") is None else f"{row['suspect_frames']} suspect frames"
        if row.get("suspects_uri"):
            audit += f" (see {row['suspects_uri']})"
        log.info("[%d/%d] done %s: %d frames, %d faces, %d tracks, %s in %.1f s (run: %.1f frames/s)",
                 done, total, row["video_uri"], row["frames"], row["faces"], row["tracks"], audit, row["seconds"], rate)
    else:
        log.warning("[%d/%d] error %s: %s", done, total, row["video_uri"], row["error"])


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="video", desc="anonymise", disable=not enabled, dynamic_ncols=True)


def _run_local(todo: list[VideoTask], options: FootageOptions, cancelled: Callable[[], bool]) -> Iterator[dict[str, Any]]:
    for task in todo:
        if cancelled():
            return
        yield process_video_safe(task, options)


def _run_ray(
    todo: list[VideoTask], options: FootageOptions, num_workers: int, resources: dict[str, float], cancelled: Callable[[], bool]
) -> Iterator[dict[str, Any]]:
    """At most ``num_workers`` videos in flight as Ray tasks; results come back in completion order."""
    import ray

    with cluster.ray_session(purpose="the footage tasks"):
        remote = ray.remote(process_video_safe).options(**resources, max_retries=2)
        options_ref = ray.put(options)
        queue = iter(todo)
        pending = {remote.remote(task, options_ref): task for task in islice(queue, num_workers)}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, SetupError):
                    raise err.cause from None
                row = _row(task, "error", None, None, None, 0.0, f"{type(err).__name__}: {task.input_uri}: {err}", None)
            except ray.exceptions.RayError as err:  # the worker died (OOM, crash in a codec): record it, go on
                row = _row(task, "error", None, None, None, 0.0, f"{type(err).__name__}: {task.input_uri}: {err}", None)
            yield row
            for nxt in islice(queue, 0 if cancelled() else 1):
                pending[remote.remote(nxt, options_ref)] = nxt


# --- the batch-endpoint job kind -------------------------------------------------------------------------------


def run_footage_job(request, progress):
    """``POST /v1/jobs`` with ``kind: footage`` (registered in ``pprl.serve.jobs.JOB_KINDS``).

    ``request.identity`` maps onto the target policy: ``random`` -> random-per-track, ``N`` -> fixed N,
    ``pseudonym:<key>`` -> pseudonym keyed by the server's secret and ``<key>``. ``request.options`` may set
    ``detector``, ``num_workers`` (default ``request.actors``), ``batch_frames``, ``margin``, ``feather``, ``blur_context``, ``crf``,
    ``audit`` (``sample``, ``all``, ``off``), ``smooth_frames``, ``retry_errors``. ``request.num_gpus`` > 0 runs each video
    task on that GPU share.
    """
    opts = dict(request.options or {})
    identity = (request.identity or "random").strip()
    if identity == "random":
        policy = TargetPolicy("random-per-track")
    elif identity.startswith("pseudonym:"):
        policy = TargetPolicy("pseudonym", key=f"{request.pseudonym_secret.hex()}:{identity[len('pseudonym:'):]}")
    else:
        policy = TargetPolicy.parse(f"fixed {identity}")
    options = FootageOptions(
        model=request.model_uri,
        detector=DetectorSpec.parse(str(opts.pop("detector", "centerface"))),
        policy=policy,
        batch_frames=int(opts.pop("batch_frames", 32)),
        margin=float(opts.pop("margin", 0.14)),
        feather=float(opts.pop("feather", 0.15)),
        blur_context=float(opts.pop("blur_context", FootageOptions.blur_context)),
        use_gpu=bool(request.num_gpus),
        encode=EncodeOptions(crf=int(opts.pop("crf", 18))),
        export_unaudited_latent=request.export_unaudited_latent,
        audit=AuditOptions(mode=str(opts.pop("audit", "sample"))),
        smooth_frames=int(opts.pop("smooth_frames", FootageOptions.smooth_frames)),
    )
    num_workers = int(opts.pop("num_workers", request.actors))
    retry_errors = bool(opts.pop("retry_errors", False))
    if opts:
        raise ValueError(f"footage job: unknown option(s) {sorted(opts)}")

    def on_row(row: dict[str, Any]) -> None:
        if row["status"] == "done":
            progress.done += 1
            progress.parts.append(row["faces_uri"])
        else:
            progress.failed += 1
        if progress.listener:
            progress.listener(progress)

    tasks = plan(request.input, request.output)
    progress.total = len(tasks)
    summary = anonymize_footage(request.input, request.output, options, num_workers=num_workers, gpus_per_worker=request.num_gpus or 1.0,
                                retry_errors=retry_errors, progress=False, on_row=on_row, cancelled=progress.cancel.is_set)
    progress.skipped = summary.skipped
    return progress
