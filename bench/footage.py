"""Footage: frames/s end to end on a generated 720p clip, pprl vs the ``deface`` CLI, and pprl's time per stage.

The clip is ``pprl.footage.testclips.astronaut_clip`` at 1280x720, 24 fps (a real face, panned and zoomed, so both
tools' CenterFace detector finds it). Both tools run as fresh processes on the same file and are timed from launch
to exit, so each pays its interpreter start, imports and model loading once:

* pprl: ``pprl.footage.pipeline.process_video`` (what ``pprl anonymize-footage --num-workers 0`` runs per video:
  PyAV decode -> CenterFace at 640 px long side -> IoU tracking -> PPRL-VGAN on every face crop -> feathered paste ->
  x264 encode, audio remuxed, faces.parquet, then the default leak audit of the written video) in a child process (``python bench/footage.py --worker ...``) that
  wraps the pipeline's stage functions with timers (nothing in the pipeline changes; the wrappers call the real
  functions) and reports the time per stage. The child gets ``OMP_NUM_THREADS=1``, as Ray gives each 1-CPU video
  task of ``pprl anonymize-footage`` (torch then runs one thread; CenterFace's onnxruntime keeps its own pool);
* deface: ``deface clip.mp4 -o out.mp4`` as users run it (CenterFace at full resolution, blur), and with
  ``--scale 640x360``, the detection resolution pprl uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from unittest import mock

from harness import REPO, Context, Figure

log = logging.getLogger("bench.footage")
WIDTH, HEIGHT, FPS = 1280, 720, 24
STAGES = ("imports", "model + detector load", "decode", "detect", "crop", "anonymise (model)", "paste", "encode",
          "faces.parquet", "leak audit", "other (tracking, bookkeeping, commit)")


def make_clip(ctx: Context) -> tuple[Path, int]:
    from pprl.footage.testclips import astronaut_clip

    frames = int((2.5 if ctx.quick else 10.0) * FPS)
    path = ctx.workdir / f"astronaut-{WIDTH}x{HEIGHT}-{frames}.mp4"
    if not path.exists():
        tmp = path.with_name(".tmp-" + path.name)
        astronaut_clip(str(tmp), frames=frames, width=WIDTH, height=HEIGHT, fps=FPS)
        tmp.replace(path)
    return path, frames


def run_process(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None) -> float:
    """Wall time of a fresh process from launch to exit; its output is kept only for the error message."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return wall


def output_frames(path: Path) -> int:
    from pprl.footage.video import probe

    return probe(str(path)).frames


def run(ctx: Context) -> list[Figure]:
    clip, frames = make_clip(ctx)
    out = ctx.workdir / "footage-out"
    out.mkdir(exist_ok=True)
    budget = 600.0
    deface = str(Path(sys.executable).with_name("deface"))
    result_file = out / "pprl-stages.json"
    pprl_out = out / "pprl.mp4"
    worker = [sys.executable, __file__, "--worker", str(clip), str(pprl_out), ctx.model(), str(result_file)]
    pprl_wall = run_process(worker, budget, env={"OMP_NUM_THREADS": "1"})  # what Ray gives a 1-CPU footage task
    stages = json.loads(result_file.read_text())
    deface_wall = run_process([deface, str(clip), "-o", str(out / "deface.mp4")], budget)
    deface_small_wall = run_process([deface, str(clip), "-o", str(out / "deface-640.mp4"), "--scale", "640x360"], budget)
    written = {name: output_frames(out / name) for name in ("pprl.mp4", "deface.mp4", "deface-640.mp4")}
    if set(written.values()) != {frames}:
        raise RuntimeError(f"output frame counts differ from the clip's {frames}: {written}")
    stages["seconds"]["process start (interpreter, harness import)"] = max(pprl_wall - stages["total_s"], 0.0)
    clip_note = f"{WIDTH}x{HEIGHT} {FPS} fps, {frames} frames, 1 face/frame; process launch to exit"
    figures = [
        Figure("footage", "deface CLI (CenterFace at full res, blur)", frames / deface_wall, "frames/s",
               note=f"{clip_note}; its defaults (onnxruntime threads: one per core; ffmpeg encodes in its own process)",
               details={"wall_s": deface_wall}),
        Figure("footage", "pprl process_video (CenterFace at 640 px, PPRL-VGAN)", frames / pprl_wall, "frames/s",
               baseline="deface CLI", baseline_value=frames / deface_wall,
               note=f"{stages['faces']} faces replaced; {clip_note}; OMP_NUM_THREADS=1 as in a 1-CPU Ray task "
                    f"({stages['torch_threads']} torch thread)", details={"wall_s": pprl_wall, **stages}),
        Figure("footage", "pprl vs deface --scale 640x360 (same detection size)", frames / pprl_wall, "frames/s",
               baseline="deface --scale 640x360", baseline_value=frames / deface_small_wall, details={"wall_s": deface_small_wall}),
    ]
    for stage in ("process start (interpreter, harness import)", *STAGES):
        seconds = stages["seconds"].get(stage, 0.0)
        figures.append(Figure("footage", f"pprl stage: {stage}", 100 * seconds / pprl_wall, "% of time", note=f"{seconds:.2f} s"))
    return figures


# --------------------------------------------------------------------------------------------------- worker


class StageClock:
    """Accumulates wall time per stage; ``wrap`` returns a function that calls the real one under a stage's clock.
    A stage entered inside another counts toward the outer one only (the leak audit's decoding is the audit's)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.depth = 0

    @contextlib.contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.seconds[name] += time.perf_counter() - start

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            with self.stage(name):
                return fn(*args, **kwargs)

        return timed

    def wrap_iterator(self, name: str, gen_fn):
        """For generators: only the time spent producing each item counts, not the consumer's."""

        def timed(*args, **kwargs):
            it = gen_fn(*args, **kwargs)
            while True:
                with self.stage(name):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        return timed


class TimedModel:
    """The real Anonymizer with ``run`` under the clock; every other attribute passes through."""

    def __init__(self, model, clock: StageClock) -> None:
        self._model, self.run = model, clock.wrap("anonymise (model)", model.run)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def instrumented_run(clip: str, output: str, model_uri: str) -> dict[str, Any]:
    """``process_video`` on one clip with its stage functions timed; returns seconds per stage."""
    started = time.perf_counter()
    clock = StageClock()
    with clock.stage("imports"):
        from pprl.footage import pipeline
        from pprl.footage.detect import DetectorSpec
        from pprl.footage.video import VideoReader, VideoWriter
    real_load, real_detector = pipeline.load_anonymizer, pipeline.make_detector

    def load(uri: str, device: str | None):
        return TimedModel(clock.wrap("model + detector load", real_load)(uri, device), clock)

    def detector(*args, **kwargs):
        det = clock.wrap("model + detector load", real_detector)(*args, **kwargs)
        det.detect = clock.wrap("detect", det.detect)
        return det

    patches = [
        mock.patch.object(pipeline, "load_anonymizer", load),
        mock.patch.object(pipeline, "make_detector", detector),
        mock.patch.object(pipeline, "extract", clock.wrap("crop", pipeline.extract)),
        mock.patch.object(pipeline, "paste", clock.wrap("paste", pipeline.paste)),
        mock.patch.object(pipeline._FaceRows, "add", clock.wrap("faces.parquet", pipeline._FaceRows.add)),
        mock.patch.object(VideoReader, "frames", clock.wrap_iterator("decode", VideoReader.frames)),
        mock.patch.object(VideoWriter, "write", clock.wrap("encode", VideoWriter.write)),
        mock.patch.object(VideoWriter, "close", clock.wrap("encode", VideoWriter.close)),
        mock.patch.object(pipeline, "audit_video", clock.wrap("leak audit", pipeline.audit_video)),
    ]
    task = pipeline.VideoTask(clip, Path(clip).name, output, output + pipeline.FACES_SUFFIX)
    options = pipeline.FootageOptions(model=model_uri, detector=DetectorSpec("centerface"),
                                      policy=pipeline.TargetPolicy("fixed", index=0))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        row = pipeline.process_video(task, options)
    total = time.perf_counter() - started
    clock.seconds["other (tracking, bookkeeping, commit)"] = total - sum(clock.seconds.values())
    import torch

    return {"total_s": total, "frames": row["frames"], "faces": row["faces"], "audited_frames": row["audited_frames"], "seconds": dict(clock.seconds),
            "torch_threads": torch.get_num_threads()}


def worker_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description="(internal) one instrumented pprl footage run")
    p.add_argument("--worker", nargs=4, metavar=("CLIP", "OUTPUT", "MODEL", "RESULT_JSON"), required=True)
    clip, output, model_uri, result = p.parse_args(argv).worker
    sys.path.insert(0, str(REPO / "platform"))
    Path(result).write_text(json.dumps(instrumented_run(clip, output, model_uri)))


if __name__ == "__main__":
    worker_main(sys.argv[1:])
