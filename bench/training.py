"""Training: images/s and model FLOP utilisation of ``cpu-quick`` on CPU, and DDP scaling 1 -> 2 workers on Ray Train.

* Throughput: the platform's ``Trainer`` fed from memory (``InMemoryBatches``: the input pipeline is benchmarked on
  its own in data_loading), timed over whole iterations (D real + D fake + ``g_steps_per_d`` G steps), images counted
  as the trainer counts them: ``(1 + g_steps_per_d) * batch`` per iteration. Three settings, each in a fresh
  process: 1 torch thread; one thread per core (torch's default); one per core with ``OMP_WAIT_POLICY=PASSIVE``.
  On a shared machine the OpenMP threads of the default setting spin at every barrier while another process holds
  a core, which can make it several times slower than one thread; the passive wait policy removes that.
* MFU: achieved FLOP/s / this machine's measured peak. FLOPs per image are counted once with
  ``torch.utils.flop_counter.FlopCounterMode`` over one full training iteration (``bench/gpu_check.flops_per_image``,
  the same count the GPU check uses). A CPU has no datasheet peak we can trust here, so the denominator is the best
  achieved FLOP/s of a large fp32 matmul (2048 x 2048) at the same thread count, measured in the same run.
* DDP scaling: the same Trainer inside Ray Train's ``TorchTrainer`` (gloo), networks wrapped by the platform's
  ``pprl.train.distributed.wrap_model`` (``prepare_model``), each rank reading its own shard of the training files
  through ``make_batches`` (DALI on CPU), as ``pprl train`` runs it. Ray gives each worker one CPU (and one torch
  thread). Efficiency = throughput(2 workers) / (2 x throughput(1 worker)).
* Denormals: the same Trainer after ``TRAINED_STEPS`` untimed iterations, with and without
  ``torch.set_flush_denormal(True)`` (set before the first iteration, so both train alike until denormals appear).
  Arithmetic on subnormal floats is slow on x86, and a trained state iterates 12-16 % slower than fresh weights
  here (831-872 against 950-1009 images/s in the three runs below). On a restored 450-iteration checkpoint,
  flushing measured 94-119 ms per iteration against 100-135 ms (six alternating runs each, load average about 2;
  the saved state held only 2 subnormal values, so any arise in the computation). This benchmark, three runs on
  2026-12-04 (2 idle cores, AVX-512, load average 1.4-1.7; bench/results/training-denormals-2026-12-04-*.json):
  1.24x, 0.99x and 1.03x (the last at 30 s per setting). So it is not a dependable lever, and flushing also changes
  the numerics (a preset could enable it only after a multi-seed audit, bench/privacy_seeds.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Any

import torch
from harness import Context, Figure

from pprl import cluster

log = logging.getLogger("bench.training")
PRESET = "cpu-quick"
MATMUL_N = 2048
TRAINED_STEPS = 300  # untimed iterations before the denormal variants are timed


@contextlib.contextmanager
def torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def matmul_peak(threads: int, seconds: float) -> float:
    """Best achieved fp32 FLOP/s of an N x N matmul at ``threads`` torch threads (the MFU denominator)."""
    with torch_threads(threads):
        a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
        a @ b
        best, start = 0.0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * MATMUL_N**3 / (time.perf_counter() - t))
        return best


def count_flops(cfg) -> float:
    """Training FLOPs per image, counted once (see bench/gpu_check.py); the count does not depend on threads."""
    import gpu_check

    with torch_threads(1):
        return gpu_check.flops_per_image(cfg, torch.device("cpu"))


def iterate(trainer, seconds: float, min_steps: int = 2) -> dict[str, float]:
    """Run whole training iterations for ``seconds``; images/s as the trainer counts them."""
    tc = trainer.config.train
    per_step = (1 + tc.g_steps_per_d) * tc.batch_size
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < min_steps:
        trainer.train_step()
        steps += 1
    elapsed = time.perf_counter() - start
    return {"images_per_s": steps * per_step / elapsed, "steps": steps, "seconds": elapsed}


def single_process(job: dict[str, Any]) -> dict[str, Any]:
    """One variant, in a fresh process (OpenMP reads its environment once): matmul peak and Trainer images/s."""
    from pprl.config import Config
    from pprl.data.dataset import load_dataset
    from pprl.train.batches import InMemoryBatches
    from pprl.train.trainer import Trainer

    cfg = Config.from_dict(job["config"])
    arrays = load_dataset(job["data"]).arrays("train", cfg.model.image_size)
    peak = matmul_peak(job["threads"], min(job["seconds"], 3.0))
    torch.set_flush_denormal(job.get("flush_denormal", False))
    with torch_threads(job["threads"]):
        trainer = Trainer(cfg, InMemoryBatches(*arrays, cfg.train.batch_size), device="cpu", steps_per_epoch=1)
        for _ in range(max(1, job.get("trained_steps", 0))):  # the first: allocations and kernel selection
            trainer.train_step()
        result = iterate(trainer, job["seconds"])
    return {**result, "threads": job["threads"], "matmul_peak_flops": peak}


def run_variant(ctx: Context, cfg, threads: int, env: dict[str, str], seconds: float, **options: Any) -> dict[str, Any]:
    """``options``: ``trained_steps`` (untimed iterations first) and ``flush_denormal`` for the single-process job."""
    job = {"config": cfg.to_dict(), "data": ctx.dataset(), "threads": threads, "seconds": seconds, **options}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"training variant {threads} thread(s) {env} failed: {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    log.info("trainer, %d thread(s) %s %s: %.1f images/s over %d iterations", threads, env or "", options or "",
             result["images_per_s"], result["steps"])
    return result


# --------------------------------------------------------------------------------------------------- DDP


def ddp_loop(cfg_: dict[str, Any]) -> None:
    """Per-worker: build the trainer as ``pprl train`` does, warm up, time a fixed number of iterations."""
    import ray.train
    import ray.train.torch

    from pprl import storage
    from pprl.config import Config
    from pprl.data.dataset import load_dataset
    from pprl.data.loader import make_batches, stage_split
    from pprl.train.distributed import wrap_model
    from pprl.train.trainer import Trainer

    cfg = Config.from_dict(cfg_["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tc = cfg.train
    source = make_batches(stage_split(load_dataset(cfg_["data"]), "train"), cfg.model.image_size, tc.batch_size, loader=cfg_["loader"],
                          num_workers=tc.num_workers, rank=rank, world_size=world, seed=tc.seed, device=device)
    trainer = Trainer(cfg, source, device=device, rank=rank, world_size=world, wrap_model=wrap_model if world > 1 else None,
                      steps_per_epoch=1)
    for _ in range(cfg_["warmup"]):
        trainer.train_step()
    start = time.perf_counter()
    for _ in range(cfg_["steps"]):  # a fixed count: DDP ranks run in lock step
        trainer.train_step()
    elapsed = time.perf_counter() - start
    images = world * cfg_["steps"] * (1 + tc.g_steps_per_d) * tc.batch_size
    if rank == 0:  # Ray Train V2 keeps no metrics reported without a checkpoint: hand them back through a file
        result = {"images_per_s": images / elapsed, "seconds": elapsed, "torch_threads": torch.get_num_threads()}
        storage.write_text(cfg_["out"], json.dumps(result))


def ddp_throughput(ctx: Context, cfg, workers: int, steps: int) -> dict[str, Any]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = ctx.workdir / "ray-train" / f"ddp-{workers}.json"
    out.unlink(missing_ok=True)
    loop_config = {"config": cfg.to_dict(), "data": ctx.dataset(), "loader": "auto", "warmup": 2, "steps": steps, "out": str(out)}
    trainer = TorchTrainer(
        ddp_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=RunConfig(name=f"bench-ddp-{workers}-{int(time.time())}", storage_path=str(ctx.workdir / "ray-train")),
    )
    started = time.perf_counter()
    trainer.fit()
    metrics = json.loads(out.read_text())
    log.info("DDP %d worker(s): %.1f images/s (%.0f s with start-up)", workers, metrics["images_per_s"], time.perf_counter() - started)
    return {**metrics, "workers": workers, "steps": steps, "wall_s": time.perf_counter() - started}


def ddp_scaling(ctx: Context, cfg) -> tuple[dict[str, Any], dict[str, Any]]:
    import ray

    cluster.connect(num_cpus=os.cpu_count(), log_to_driver=False, purpose="the benchmark")
    try:
        steps = 8 if ctx.quick else 30
        return ddp_throughput(ctx, cfg, 1, steps), ddp_throughput(ctx, cfg, 2, steps)
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------------------------------- report


def variant_figures(name: str, speed: dict[str, Any], flops: float, cfg, **baseline) -> list[Figure]:
    achieved = speed["images_per_s"] * flops
    peak = speed["matmul_peak_flops"]
    return [
        Figure("training", f"cpu-quick Trainer, {name}", speed["images_per_s"], "images/s",
               note=f"batch {cfg.train.batch_size}, {cfg.model.image_size}px, {speed['steps']} iterations, input from memory",
               details=speed, **baseline),
        Figure("training", f"cpu-quick MFU, {name}", 100 * achieved / peak, "%",
               note=f"{achieved / 1e9:.2f} GFLOP/s of a {peak / 1e9:.1f} GFLOP/s fp32 matmul peak measured at the same setting; "
                    f"{flops / 1e9:.3f} GFLOP per image (FlopCounterMode)",
               details={"flops_per_image": flops, "matmul_peak_flops": peak, "achieved_flops": achieved}),
    ]


def denormal_figures(ctx: Context, cfg, threads: int, seconds: float) -> list[Figure]:
    """A trained state with and without flushing subnormal floats to zero (see the module docstring)."""
    kept = run_variant(ctx, cfg, threads, {}, seconds, trained_steps=TRAINED_STEPS)
    flushed = run_variant(ctx, cfg, threads, {}, seconds, trained_steps=TRAINED_STEPS, flush_denormal=True)
    name = f"{threads} threads, after {TRAINED_STEPS} iterations"
    note = "speed only: flushing changes the numerics, and no preset enables it before a multi-seed audit"
    return [
        Figure("training", f"cpu-quick Trainer, {name}", kept["images_per_s"], "images/s", details=kept),
        Figure("training", f"cpu-quick Trainer, {name}, denormals flushed", flushed["images_per_s"], "images/s",
               baseline=f"cpu-quick Trainer, {name}", baseline_value=kept["images_per_s"], note=note, details=flushed),
    ]


def run(ctx: Context) -> list[Figure]:
    from pprl.config import load_config

    cfg = load_config(PRESET, overrides=["train.d_warmup_steps=0"])  # steady-state iterations: D real + D fake + G steps
    seconds = ctx.duration(10.0, 30.0)
    flops = count_flops(cfg)
    cores = os.cpu_count() or 1
    one_thread = run_variant(ctx, cfg, 1, {}, seconds)
    default = run_variant(ctx, cfg, cores, {}, seconds)
    passive = run_variant(ctx, cfg, cores, {"OMP_WAIT_POLICY": "PASSIVE"}, seconds)
    default_name = f"{cores} threads (torch default)"
    figures = [
        *variant_figures("1 thread", one_thread, flops, cfg),
        *variant_figures(default_name, default, flops, cfg),
        *variant_figures(f"{cores} threads, OMP_WAIT_POLICY=PASSIVE", passive, flops, cfg, baseline=default_name,
                         baseline_value=default["images_per_s"]),
    ]
    figures += denormal_figures(ctx, cfg, cores, seconds)
    one, two = ddp_scaling(ctx, cfg)
    figures += [
        Figure("training", "DDP 1 worker (Ray Train, gloo)", one["images_per_s"], "images/s",
               note=f"{one['steps']} timed iterations, DALI CPU input, {one['torch_threads']} torch thread per worker", details=one),
        Figure("training", "DDP 2 workers (Ray Train, gloo)", two["images_per_s"], "images/s", baseline="DDP 1 worker",
               baseline_value=one["images_per_s"], note="global throughput; speed-up = throughput(2) / throughput(1)", details=two),
        Figure("training", "DDP scaling efficiency, 2 workers", 100 * two["images_per_s"] / (2 * one["images_per_s"]), "%",
               note="throughput(2) / (2 x throughput(1))"),
    ]
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
        raise SystemExit("usage (internal): training.py --worker JOB_JSON")
    print(json.dumps(single_process(json.loads(sys.argv[2]))))
