"""Data loading: images/s of the DALI pipeline vs the PyTorch DataLoader on the same files.

Both are the platform's own training inputs (``pprl.data.loader.make_batches``): the split's PNG files, decoded,
resized with the same antialiased linear filter to the ``cpu-quick`` model size, normalised to [-1, 1], NCHW float,
in batches of the preset's size, read as the trainer reads them (the endless per-epoch stream, new pass after pass).
Each loader runs at every worker count of a small grid (DALI: CPU threads; DataLoader: worker processes, 0 = in
the main process), in interleaved rounds, and each loader's best run is compared. On a machine with a GPU the DALI ``mixed`` (nvJPEG/GPU) decode
is timed too; its images land on the GPU, so the consumer synchronises before the clock is read.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from harness import Context, Figure

log = logging.getLogger("bench.data_loading")
PRESET = "cpu-quick"
ROUNDS = 2  # every setting is measured this many times, interleaved; the best run counts


def worker_grid(quick: bool) -> list[int]:
    cores = os.cpu_count() or 1
    counts = {1, 2, cores} if quick else {1, 2, 4, cores, 2 * cores}
    return sorted(counts)


def throughput(source, seconds: float, warmup_batches: int = 2) -> dict[str, float]:
    """Pull batches for ``seconds`` (after a warm-up) and count images; pass restarts are part of the cost."""
    stream = iter(source)
    for _ in range(warmup_batches):
        next(stream)
    images, batches = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or batches < 3:
        x, _, _ = next(stream)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        images += len(x)
        batches += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": images / elapsed, "images": images, "seconds": elapsed}


def measure(kind: str, samples, size: int, batch: int, workers: int, seconds: float, device: str = "cpu") -> dict[str, float]:
    from pprl.data.loader import make_batches

    source = make_batches(samples, size, batch, loader=kind, num_workers=workers, device=device, seed=0)
    result = throughput(source, seconds)
    # Drop the half-read stream now: left to the cyclic GC, a DataLoader's workers are shut down whenever it runs
    # (inside the next measurement), and that shutdown waits ~5 s per worker (see bench/README.md, findings).
    source.set_epoch(0)
    log.info("%s %s workers=%d: %.0f images/s", kind, device, workers, result["images_per_s"])
    return {**result, "workers": workers}


def run(ctx: Context) -> list[Figure]:
    from pprl.config import load_config
    from pprl.data import dali
    from pprl.data.dataset import load_dataset
    from pprl.data.loader import stage_split

    if not dali.available():
        raise RuntimeError("NVIDIA DALI is not installed: pip install nvidia-dali-cuda120 (the baseline needs nothing extra)")
    cfg = load_config(PRESET)
    size, batch = cfg.model.image_size, cfg.train.batch_size
    dataset = load_dataset(ctx.dataset())
    samples = stage_split(dataset, "train")
    seconds = ctx.duration(3.0, 10.0)
    grid = worker_grid(ctx.quick)
    settings = [("torch", 0)] + [(kind, w) for w in grid for kind in ("torch", "dali")]
    runs: dict[str, list[dict]] = {"torch": [], "dali": []}
    for _ in range(ctx.rounds or (ROUNDS if ctx.quick else 2 * ROUNDS)):  # interleaved rounds: a busy moment on a shared machine hits both
        for kind, workers in settings:
            runs[kind].append(measure(kind, samples, size, batch, workers, seconds))
    best = {kind: max(results, key=lambda r: r["images_per_s"]) for kind, results in runs.items()}
    what = f"{len(samples)} PNGs {dataset.image_size}px -> {size}px, batch {batch}"
    torch_name = f"PyTorch DataLoader ({best['torch']['workers']} workers)"
    figures = [
        Figure("data_loading", torch_name, best["torch"]["images_per_s"], "images/s", note=f"best of workers {[0, *grid]} x {len(runs['torch']) // (len(grid) + 1)} rounds; {what}",
               details={"runs": runs["torch"]}),
        Figure("data_loading", f"DALI CPU pipeline ({best['dali']['workers']} threads)", best["dali"]["images_per_s"], "images/s",
               baseline=torch_name, baseline_value=best["torch"]["images_per_s"], note=f"best of threads {grid} x {len(runs['dali']) // len(grid)} rounds; same files and transforms",
               details={"runs": runs["dali"]}),
    ]
    if torch.cuda.is_available():
        gpu = measure("dali", samples, size, batch, max(grid), seconds, device="cuda")
        figures.append(Figure("data_loading", "DALI mixed (GPU) decode", gpu["images_per_s"], "images/s", baseline=torch_name,
                              baseline_value=best["torch"]["images_per_s"], note=torch.cuda.get_device_name(0), details=gpu))
    else:
        log.info("no GPU: DALI mixed decode not measured")
    return figures
