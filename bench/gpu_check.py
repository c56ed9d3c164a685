"""GPU check: the real Trainer on ``paper-ferg`` (bf16, channels_last; eager and torch.compile) fed with synthetic
tensors made on the GPU, then anonymisation through ``Anonymizer`` at batch 1/32/256. Prints a table of training
images/s, MFU and peak GPU memory, and anonymised faces/s.

Needs only torch (and Triton for torch.compile): no Ray, no DALI, no dataset. One command, a few minutes on an H100:

    python bench/gpu_check.py                                   # GPU: 300 timed steps per mode
    python bench/gpu_check.py --device cpu --steps 5 --batch-size 8   # smoke test (what CI runs)

MFU = achieved FLOP/s / the chip's dense bf16 peak. FLOPs per image are counted once with
``torch.utils.flop_counter`` over one full training iteration (D real step, D fake step, the G steps; forward and
backward), divided by the images that iteration consumes, the same count the trainer's images/s uses.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from pprl.config import Config, load_config  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}  # dense, no sparsity


class SyntheticBatches:
    """Endless batches drawn from a small pool made once on the device: the input pipeline costs nothing."""

    def __init__(self, cfg: Config, batch_size: int, device: torch.device, pool: int = 8, seed: int = 0) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        size, m = cfg.model.image_size, cfg.model
        self.pool = [
            (
                torch.rand(batch_size, 3, size, size, device=device, generator=gen) * 2 - 1,
                torch.randint(m.num_identities, (batch_size,), device=device, generator=gen),
                torch.randint(m.num_expressions, (batch_size,), device=device, generator=gen),
            )
            for _ in range(pool)
        ]
        self.i = 0
        self.num_examples = batch_size * pool

    def __iter__(self) -> SyntheticBatches:
        return self

    def __next__(self):
        self.i = (self.i + 1) % len(self.pool)
        return self.pool[self.i]


def make_trainer(cfg: Config, device: torch.device, compile_: bool):
    from pprl.train.trainer import Trainer

    cfg = Config.from_dict(cfg.to_dict())
    cfg.train.compile = compile_
    return Trainer(cfg, SyntheticBatches(cfg, cfg.train.batch_size, device), device=device, steps_per_epoch=1)


def flops_per_image(cfg: Config, device: torch.device) -> float:
    """FLOPs of one training iteration (forward + backward of every phase) per image it consumes."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer = make_trainer(cfg, device, compile_=False)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step()
    return counter.get_total_flops() / ((1 + cfg.train.g_steps_per_d) * cfg.train.batch_size)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name.replace("NVIDIA ", "").split()), None)


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def train_speed(cfg: Config, device: torch.device, steps: int, warmup: int, compile_: bool, flops: float) -> dict:
    reset_memory(device)
    trainer = make_trainer(cfg, device, compile_)
    trainer.steps_per_epoch = warmup
    start = time.perf_counter()
    trainer.train_epoch()  # includes compilation
    warm_s = time.perf_counter() - start
    trainer.steps_per_epoch = steps
    metrics = trainer.train_epoch()
    peak = peak_flops(device)
    return {
        "phase": "train",
        "setting": ("compiled" if compile_ else "eager") + (", bf16" if device.type == "cuda" and cfg.train.bf16 else ""),
        "batch": cfg.train.batch_size,
        "per_s": metrics["images_per_s"],
        "mfu": metrics["images_per_s"] * flops / peak if peak else None,
        "peak_mem_gib": peak_memory_gib(device),
        "warmup_s": warm_s,
        "trainer": trainer,
    }


def anonymize_speed(trainer, device: torch.device, batch: int, seconds: float) -> dict:
    """Faces/s through the public path: uint8 NHWC in host memory -> Anonymizer.anonymize -> uint8 NHWC back."""
    from pprl.anonymizer import Anonymizer
    from pprl.train.export import export_bundle

    with tempfile.TemporaryDirectory() as folder:
        export_bundle(trainer, folder)
        model = Anonymizer.load(folder, device=str(device))
    size = model.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    targets = rng.integers(0, model.num_identities, batch)
    reset_memory(device)
    model.anonymize(images, targets)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or done < 2 * batch:
        model.anonymize(images, targets)  # returns host numpy: synchronised
        done += batch
    elapsed = time.perf_counter() - start
    return {"phase": "anonymize", "setting": "Anonymizer.anonymize", "batch": batch, "per_s": done / elapsed, "mfu": None,
            "peak_mem_gib": peak_memory_gib(device), "warmup_s": None}


def table(rows: list[dict]) -> str:
    lines = ["| phase | setting | batch | images/s | MFU | peak GPU mem (GiB) | warm-up (s) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        warm = f"{r['warmup_s']:.1f}" if r["warmup_s"] is not None else ""
        lines.append(f"| {r['phase']} | {r['setting']} | {r['batch']} | {r['per_s']:,.0f} | {mfu} | {mem} | {warm} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paper-ferg")
    p.add_argument("--steps", type=int, default=300, help="timed training iterations per mode")
    p.add_argument("--warmup", type=int, default=20, help="untimed iterations first (compilation happens here)")
    p.add_argument("--batch-size", type=int, default=None, help="per-step batch (default: the preset's, 256)")
    p.add_argument("--compile", choices=("auto", "yes", "no"), default="auto", help="also time torch.compile (auto: on CUDA with Triton)")
    p.add_argument("--anon-batches", default="1,32,256")
    p.add_argument("--anon-seconds", type=float, default=3.0, help="time spent per anonymisation batch size")
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    overrides = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    cfg = load_config(args.preset, overrides=overrides)
    has_triton = importlib.util.find_spec("triton") is not None
    compile_modes = [False]
    if args.compile == "yes" or (args.compile == "auto" and device.type == "cuda" and has_triton):
        compile_modes.append(True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; triton {'yes' if has_triton else 'no'}; preset {args.preset}; "
          f"image {cfg.model.image_size}px; batch {cfg.train.batch_size}; {args.steps} timed steps", flush=True)
    flops = flops_per_image(cfg, device)
    peak = peak_flops(device)
    print(f"training FLOPs per image: {flops / 1e9:.3f} GFLOP; dense bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak
          else f"training FLOPs per image: {flops / 1e9:.3f} GFLOP; no bf16 peak known for this device (MFU n/a)", flush=True)
    rows = []
    for compile_ in compile_modes:
        rows.append(train_speed(cfg, device, args.steps, args.warmup, compile_, flops))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    eager = rows[0].pop("trainer")
    for row in rows:
        row.pop("trainer", None)
    for batch in (int(b) for b in args.anon_batches.split(",") if b):
        rows.append(anonymize_speed(eager, device, batch, args.anon_seconds))
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "torch": torch.__version__, "flops_per_image": flops, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
