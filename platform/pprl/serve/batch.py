"""Batch anonymisation with Ray Data, shared by ``POST /v1/jobs`` and ``pprl anonymize-images``.

    sources (prefix listing or dataset manifest) minus sources already in the output
      -> fetch + header check + decode      (Ray Data tasks, CPU)
      -> Anonymizer.run                     (Ray Data actor pool, one model per actor, explicit integer batch size)
      -> one Parquet part file per block    (tasks; each part written whole by pprl.storage.write_parquet, hidden)
      -> published by the driver            (renamed to part-*.parquet and counted, unless the job was cancelled)

Every source ends up in exactly one row (or one row per face, for kinds that detect several): a file that cannot
be read or decoded becomes a row with ``error`` set, never a failed job. A rerun with the same output prefix skips
every source already present in a part file there, so an interrupted or cancelled job resumes where it stopped; it
first deletes the parts a killed driver had written but not published.
Once a cancel has been requested (:meth:`Progress.request_cancel`) no part is published any more; the job stops its
pipeline, waits for the part writes in flight (:class:`WriteFence`) and removes what its tasks had written but not
published.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pprl import storage
from pprl.config import EXPRESSIONS
from pprl.data.dataset import MANIFEST, encode_png, load_dataset
from pprl.serve import schema
from pprl.serve.security import IMAGE_SUFFIXES, Limits, Rejected, decode_checked, parse_target
from pprl.train.export import bundle_info, latent_gate

log = logging.getLogger(__name__)
FETCH_THREADS = 8  # concurrent reads per fetch task: object-store latency, not CPU, bounds this stage
# Fetch tasks reserve less than the model actors, which also keeps Ray Data from fusing them into the (GPU) actors.
FETCH_CPUS = 0.5


@dataclass
class JobRequest:
    """Everything one batch run needs. ``options`` carries settings of other job kinds (e.g. footage)."""

    input: str  # prefix of images (s3:// or local), a dataset folder, or its manifest.parquet
    output: str  # prefix that receives part-*.parquet files
    model_uri: str  # model bundle folder
    identity: str = "random"  # index | random (stable per source) | pseudonym:<key>
    store_inputs: bool = False  # also keep the original bytes in the input_image column
    batch_size: int = 32  # images per forward pass (explicit: required for GPU actors)
    actors: int = 1  # model actors in the pool
    num_gpus: float = 0.0  # per model actor
    device: str | None = None  # torch device for the model; None = cuda if the actor has a GPU, else cpu
    max_pixels: int = Limits.max_pixels  # header-checked limit per input image
    pseudonym_secret: bytes = b""  # HMAC key for pseudonym:<key> targets
    export_unaudited_latent: bool = False  # the operator's override of the latent gate (pprl.train.export.latent_gate)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1 or int(self.actors) < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and actors ({self.actors}) must be >= 1")
        self.batch_size, self.actors = int(self.batch_size), int(self.actors)


@dataclass
class Progress:
    """Counts a running job reports; ``cancel`` is set by whoever wants it to stop (:meth:`request_cancel`)."""

    total: int = 0  # sources found at the input
    skipped: int = 0  # already present in the output before this run
    done: int = 0  # rows written successfully by this run
    failed: int = 0  # error rows written by this run
    parts: list[str] = field(default_factory=list)  # part files written by this run
    cancel: threading.Event = field(default_factory=threading.Event)
    listener: Callable[[Progress], None] | None = None
    _publishing: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_cancel(self) -> None:
        """Ask the job to stop. When this returns, no further part of the images job becomes visible."""
        with self._publishing:  # waits for a part being published right now
            self.cancel.set()

    def publish(self, pending: str, rows: int, errors: int) -> bool:
        """Make a written part visible (:func:`publish_part`) and count it, unless a cancel was requested first."""
        with self._publishing:
            if self.cancel.is_set():
                return False
            self.add(publish_part(pending), rows, errors)
            return True

    def add(self, part: str, rows: int, errors: int) -> None:
        self.parts.append(part)
        self.done += rows - errors
        self.failed += errors
        if self.listener:
            self.listener(self)

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "skipped": self.skipped, "done": self.done, "failed": self.failed, "parts": len(self.parts)}


# --- sources ---------------------------------------------------------------------------------------------------


def list_sources(input_uri: str) -> list[str]:
    """Image URIs of a prefix, or of a dataset (folder with manifest.parquet, or the manifest itself)."""
    root = input_uri[: -len(MANIFEST)].rstrip("/") if input_uri.endswith(MANIFEST) else input_uri
    if storage.exists(storage.join(root, MANIFEST)):
        dataset = load_dataset(root)
        return [dataset.uri(path) for path in dataset.manifest["path"]]
    if not storage.exists(input_uri):
        raise ValueError(f"input {input_uri} does not exist")
    sources = storage.list_files(input_uri, IMAGE_SUFFIXES)
    if not sources:
        raise ValueError(f"input {input_uri} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return sources


def done_sources(output_uri: str) -> set[str]:
    """Sources already accounted for (success or error rows) in the part files under ``output_uri``."""
    if not storage.exists(output_uri):
        return set()
    done: set[str] = set()
    for part in storage.list_files(output_uri, (".parquet",)):
        table = storage.read_parquet(part, columns=["source_uri"])
        done.update(table.column("source_uri").to_pylist())
    return done


# --- pipeline stages -------------------------------------------------------------------------------------------


def fetch_and_decode(batch: pa.Table, image_size: int, max_pixels: int, store_inputs: bool) -> pa.Table:
    """source_uri -> raw RGB pixels at the model's size, or the reason the file is unusable."""
    sources = batch.column("source_uri").to_pylist()
    with ThreadPoolExecutor(min(FETCH_THREADS, max(1, len(sources)))) as pool:
        fetched = list(pool.map(lambda s: _fetch_one(s, image_size, max_pixels), sources))
    return pa.table(
        {
            "source_uri": sources,
            "target_identity": batch.column("target_identity"),
            "pixels": pa.array([pixels for pixels, _, _ in fetched], pa.binary()),
            "error": pa.array([error for _, error, _ in fetched], pa.string()),
            "input_image": pa.array([raw if store_inputs else None for _, _, raw in fetched], pa.binary()),
        }
    )


def _fetch_one(source: str, image_size: int, max_pixels: int) -> tuple[bytes | None, str | None, bytes | None]:
    try:
        raw = storage.read_bytes(source)
        return decode_checked(raw, image_size, max_pixels, source=source).tobytes(), None, raw
    except Rejected as err:
        return None, err.message, None
    except Exception as err:  # unreadable object: record it, keep going
        return None, f"{source}: cannot read ({type(err).__name__}: {err})", None


class AnonymizeActor:
    """Ray Data actor: loads the model once, then one batched forward pass per call. ``export_latent``: the driver's
    latent gate decision (the latent column stays null without it)."""

    def __init__(self, model_uri: str, device: str | None = None, export_latent: bool = False):
        from pprl.anonymizer import Anonymizer

        self.model = Anonymizer.load(model_uri, device=device)
        self.export_latent = export_latent

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        size = self.model.image_size
        version = self.model.version
        out = [schema.error_row(r["source_uri"], r["error"], model_version=version) for r in rows]
        ok = [i for i, r in enumerate(rows) if r["error"] is None]
        if ok:
            images = np.stack([np.frombuffer(rows[i]["pixels"], np.uint8).reshape(size, size, 3) for i in ok])
            targets = np.asarray([rows[i]["target_identity"] for i in ok], np.int64)
            result = self.model.run(images, targets)
            for j, i in enumerate(ok):
                out[i] = face_row(rows[i]["source_uri"], 0, result, j, version, self.export_latent)
        for i, row in enumerate(rows):
            out[i]["input_image"] = row["input_image"]
        return schema.to_table(out)


def face_row(source_uri: str, face_index: int, result: Any, j: int, version: str, export_latent: bool) -> dict:
    """Row ``j`` of an ``AnonymizeResult`` in the face schema; ``latent`` is null unless ``export_latent``."""
    probs = np.asarray(result.expression_probs[j], np.float32)
    return {
        "source_uri": source_uri,
        "face_index": face_index,
        "image": encode_png(np.asarray(result.images[j], np.uint8)),
        "target_identity": int(result.targets[j]),
        "expression": EXPRESSIONS[int(probs.argmax())],
        "expression_probs": probs.tolist(),
        "latent": np.asarray(result.latents[j], np.float32).tolist() if export_latent else None,
        "model_version": version,
        "error": None,
    }


PENDING = ".pending"  # a written part that the driver has not published: hidden (dot name), not *.parquet


class WriteFence:
    """Lets a job's driver wait out the part writes in flight before it clears what was not published.

    Ray Data's shutdown cancels its tasks without waiting for them (``ray.cancel`` with ``force=False``), so a write
    task already running when a job was cancelled could leave its part behind after :func:`remove_unpublished` had
    run (CI saw a ``.pending`` part appear after the cancel). Each write enters the fence first; once closed it lets
    no write in, and the driver waits until the writes inside have left. One per job, as a Ray actor."""

    def __init__(self) -> None:
        self._open, self._inside = True, 0

    def enter(self) -> bool:
        if self._open:
            self._inside += 1
        return self._open

    def leave(self) -> None:
        self._inside -= 1

    def close(self) -> int:
        """Let no further write in; returns how many are still writing."""
        self._open = False
        return self._inside


WRITTEN = pa.schema({"part": pa.string(), "rows": pa.int64(), "errors": pa.int64()})  # what write_part tells the driver
FENCE_TIMEOUT_S = 60.0  # a write task that died without leaving (its node lost) holds the cleanup no longer


def write_part(batch: pa.Table, output: str, run_id: str, latent: dict[str, Any], fence: Any = None) -> pa.Table:
    """Write one block as a whole (atomic) part file under a hidden name, with the latent gate's ``latent`` record in
    its metadata; return it and its counts for the driver, which publishes it (or, once the job is cancelled, leaves
    it to :func:`remove_unpublished`). With the job's ``fence`` (a :class:`WriteFence` actor) a write starts only
    while the job runs, and the driver knows when it has ended."""
    if fence is not None:
        import ray

        if not ray.get(fence.enter.remote()):
            return WRITTEN.empty_table()
    try:
        table = batch.cast(schema.with_latent_record(schema.RESULT_SCHEMA, latent))
        uri = storage.join(output, f".part-{run_id}-{storage.unique_suffix()}.parquet{PENDING}")
        storage.write_parquet(table, uri)
        errors = table.num_rows - table.column("error").null_count
        return pa.table({"part": [uri], "rows": [table.num_rows], "errors": [errors]}, schema=WRITTEN)
    finally:
        if fence is not None:
            ray.get(fence.leave.remote())


def publish_part(pending: str) -> str:
    """``.part-X.parquet.pending`` -> ``part-X.parquet`` (a rename locally, copy and delete on S3); returns the part."""
    fs, path = storage.filesystem(pending)
    name = os.path.basename(path)[1 : -len(PENDING)]
    fs.mv(path, f"{os.path.dirname(path)}/{name}")
    return f"{pending.rsplit('/', 1)[0]}/{name}"


def wait_for_writes(fence: Any) -> None:
    """Close the job's :class:`WriteFence` and wait until no task of the job is writing a part."""
    import ray

    deadline = time.monotonic() + FENCE_TIMEOUT_S
    while (inside := ray.get(fence.close.remote())) and time.monotonic() < deadline:
        time.sleep(0.05)
    if inside:
        log.warning("%d part writes still unfinished after %.0f s; clearing unpublished parts without them", inside, FENCE_TIMEOUT_S)


def remove_unpublished(output: str, run_id: str | None = None) -> None:
    """Delete a run's hidden files under ``output``: parts never published and temporary files of cut-short writes;
    with ``run_id=None`` those of every run (what drivers that were killed left behind).

    Call it when no task of that run writes any more: once its pipeline has stopped, or (``None``) before a run
    starts, as only one run writes to an output at a time (the job server refuses a second one, 409)."""
    fs, path = storage.filesystem(output)
    if not fs.exists(path):
        return
    mark = f"part-{run_id}-" if run_id else "part-"
    leftovers = [p for p in fs.find(path) if os.path.basename(p).startswith(".") and mark in os.path.basename(p)]
    for leftover in leftovers:
        fs.rm(leftover)
    if leftovers:
        log.info("removed %d unpublished files of %s from %s", len(leftovers), f"run {run_id}" if run_id else "earlier runs", output)


# --- driver ----------------------------------------------------------------------------------------------------


def run_images_job(request: JobRequest, progress: Progress | None = None) -> Progress:
    """Anonymise every not-yet-done image of ``request.input`` into Parquet parts under ``request.output``."""
    import ray

    progress = progress or Progress()
    info = bundle_info(request.model_uri)
    gate = latent_gate(request.model_uri, request.export_unaudited_latent, info)
    sources = list_sources(request.input)
    already = done_sources(request.output)
    todo = [s for s in sources if s not in already]
    progress.total, progress.skipped = len(sources), len(sources) - len(todo)
    log.info("job %s -> %s: %d sources, %d already done", request.input, request.output, len(sources), progress.skipped)
    if not todo or progress.cancel.is_set():
        return progress
    gate.log(f"images job -> {request.output}")
    storage.makedirs(request.output)
    remove_unpublished(request.output)  # parts a killed driver had not published: their sources are in todo again
    num_ids = int(info["num_identities"])
    items = [{"source_uri": s, "target_identity": parse_target(request.identity, num_ids, request.pseudonym_secret, random_key=s)} for s in todo]
    _quiet_data_context()
    env = {"env_vars": storage.s3_env()} if storage.s3_env() else None
    this_run = run_id()
    fence = ray.remote(num_cpus=0)(WriteFence).remote()
    complete = False
    try:
        ds = _pipeline(items, request, info, gate, env, this_run, fence)
        # closing the iterator (at the end, on a cancel or an error) stops the pipeline and waits for its tasks
        with contextlib.closing(iter(ds.iter_batches(batch_size=None, batch_format="pyarrow"))) as summaries:
            for summary in summaries:
                written = zip(*(summary.column(c).to_pylist() for c in ("part", "rows", "errors")), strict=True)
                if not all(progress.publish(pending, rows, errors) for pending, rows, errors in written):  # stops at a refusal
                    log.info("job writing to %s cancelled after %d parts", request.output, len(progress.parts))
                    break
            else:
                complete = True
    finally:
        if not complete:
            wait_for_writes(fence)
            remove_unpublished(request.output, this_run)
        ray.kill(fence)
    return progress


def _pipeline(items: list[dict[str, Any]], request: JobRequest, info: dict[str, Any], gate: Any,
              env: dict[str, Any] | None, this_run: str, fence: Any) -> Any:
    """The job's Ray Data pipeline: fetch and decode -> anonymise (an actor pool holding the model) -> write parts."""
    import ray

    blocks = max(1, min(len(items), math.ceil(len(items) / request.batch_size)))
    return (
        ray.data.from_items(items, override_num_blocks=blocks)
        .map_batches(
            fetch_and_decode,
            batch_format="pyarrow",
            batch_size=request.batch_size,
            fn_kwargs={"image_size": int(info["image_size"]), "max_pixels": request.max_pixels, "store_inputs": request.store_inputs},
            num_cpus=FETCH_CPUS,
            runtime_env=env,
        )
        .map_batches(
            AnonymizeActor,
            batch_format="pyarrow",
            batch_size=request.batch_size,
            fn_constructor_kwargs={"model_uri": request.model_uri, "device": request.device,
                                   "export_latent": gate.exported},  # fmt: skip
            compute=ray.data.ActorPoolStrategy(size=request.actors),
            num_gpus=request.num_gpus or None,
            runtime_env=env,
        )
        .map_batches(write_part, batch_format="pyarrow", batch_size=None, runtime_env=env,
                     fn_kwargs={"output": request.output, "run_id": this_run, "latent": gate.record(), "fence": fence})
    )


def run_id() -> str:
    """Sortable and unique: part files of one run share it."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{storage.unique_suffix()[:6]}"


def _quiet_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
