"""Write the synthetic dataset: render on every core, upload with a thread pool, manifest last."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

from pprl import storage
from pprl.config import EXPRESSIONS
from pprl.data import synth
from pprl.data.dataset import encode_png, stratified_split, write_dataset_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SynthSpec:
    identities: int = 6
    images_per_cell: int = 240  # 6 x 7 x 240 = 10,080 stills, about FERG's per-cell density scaled down
    size: int = 64
    seed: int = 0
    sequences_per_cell: int = 0  # MUG-like clips per (identity, expression)
    frames_per_sequence: int = 16
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        if self.identities < 2:
            raise ValueError(f"--identities must be >= 2, got {self.identities}")
        if self.images_per_cell < 0 or self.sequences_per_cell < 0:
            raise ValueError("--images-per-cell and --sequences must be >= 0")
        if self.images_per_cell == 0 and self.sequences_per_cell == 0:
            raise ValueError("nothing to generate: set --images-per-cell or --sequences above 0")
        if self.size < 16:
            raise ValueError(f"--size must be >= 16, got {self.size}")
        if self.frames_per_sequence < 3:
            raise ValueError("--frames must be >= 3 (neutral, apex, neutral)")


@dataclass(frozen=True)
class _Job:
    path: str
    identity: int
    expression: int
    image_seed: int = 0
    sequence: int = -1
    frame: int = -1


def _jobs(spec: SynthSpec) -> list[_Job]:
    jobs: list[_Job] = []
    counter = 0
    for identity in range(spec.identities):
        for expression, name in enumerate(EXPRESSIONS):
            for k in range(spec.images_per_cell):
                jobs.append(_Job(f"images/id{identity:03d}/{name}/{k:05d}.png", identity, expression, image_seed=counter))
                counter += 1
    sequence = 0
    for identity in range(spec.identities):
        for expression, name in enumerate(EXPRESSIONS):
            for _ in range(spec.sequences_per_cell):
                for frame in range(spec.frames_per_sequence):
                    path = f"sequences/id{identity:03d}/{name}/seq{sequence:05d}/f{frame:03d}.png"
                    jobs.append(_Job(path, identity, expression, sequence=sequence, frame=frame))
                sequence += 1
    return jobs


def _render_chunk(args: tuple[SynthSpec, list[_Job]]) -> list[tuple[str, bytes, list[float]]]:
    spec, jobs = args
    out = []
    for job in jobs:
        if job.sequence >= 0:
            image, cues = synth.draw_sequence_frame(
                job.identity, job.expression, spec.seed, job.sequence, job.frame, spec.frames_per_sequence, spec.size
            )
        else:
            image, cues = synth.draw_sample(job.identity, job.expression, spec.seed, job.image_seed, spec.size)
        out.append((job.path, encode_png(image), [float(c) for c in cues]))
    return out


def _chunks(items: list[_Job], size: int) -> Iterator[list[_Job]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def generate(out: str, spec: SynthSpec, workers: int | None = None, progress: bool = True) -> dict:
    """Render ``spec`` into the dataset folder ``out`` and return the dataset info written."""
    jobs = _jobs(spec)
    workers = workers or os.cpu_count() or 1
    if storage.is_s3(out):
        storage.check_endpoint()
    storage.makedirs(out)
    cues_by_path: dict[str, list[float]] = {}
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    with ProcessPoolExecutor(workers) as render_pool, ThreadPoolExecutor(16) as write_pool:
        pending = []
        for rendered in render_pool.map(_render_chunk, ((spec, c) for c in _chunks(jobs, 64))):
            for path, png, cues in rendered:
                cues_by_path[path] = cues
                pending.append(write_pool.submit(storage.write_bytes, storage.join(out, path), png))
            bar.update(len(rendered))
        for future in pending:
            future.result()
    bar.close()
    rows = _manifest_rows(jobs, spec, cues_by_path)
    info = {
        "name": "synthetic-ferg",
        "generator": synth.GENERATOR_VERSION,
        "seed": spec.seed,
        "image_size": spec.size,
        "num_identities": spec.identities,
        "cues": list(synth.CUES),
        "frames_per_sequence": spec.frames_per_sequence if spec.sequences_per_cell else None,
    }
    info = write_dataset_index(out, rows, info)
    log.info("wrote %d images to %s", len(rows), out)
    return info


def _manifest_rows(jobs: list[_Job], spec: SynthSpec, cues_by_path: dict[str, list[float]]) -> list[dict]:
    stills = [j for j in jobs if j.sequence < 0]
    clips = [j for j in jobs if j.sequence >= 0]
    still_split = stratified_split(((j.identity, j.expression) for j in stills), spec.test_fraction, spec.seed)
    # Clips are split whole, stratified by (identity, expression): no clip has frames on both sides.
    first_frames = {j.sequence: j for j in clips if j.frame == 0}
    seq_ids = sorted(first_frames)
    seq_split = dict(zip(seq_ids, stratified_split(((first_frames[s].identity, first_frames[s].expression) for s in seq_ids), spec.test_fraction, spec.seed + 1), strict=True))
    rows = []
    for job, split in [*zip(stills, still_split, strict=True), *((j, seq_split[j.sequence]) for j in clips)]:
        row = {"path": job.path, "identity": job.identity, "expression": job.expression, "split": split}
        if clips:
            row["sequence"], row["frame"] = job.sequence, job.frame
        row.update({f"cue_{name}": value for name, value in zip(synth.CUES, cues_by_path[job.path], strict=True)})
        rows.append(row)
    return rows
