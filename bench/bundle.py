"""The model the serving and footage benchmarks run: a ``cpu-quick`` bundle trained for a few iterations.

The benchmarks measure speed, not quality: a briefly trained network does exactly the same arithmetic as a good one
of the same preset. The bundle is cached in the bench work folder; pass ``--model`` to use your own.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("bench.bundle")
PRESET = "cpu-quick"
STEPS = 10


def ensure_model(data: str, out: Path) -> str:
    """``out`` if it already holds a bundle, else train ``cpu-quick`` for ``STEPS`` iterations on ``data`` and export it."""
    from pprl.train.export import INFO

    if (out / INFO).exists():
        return str(out)
    import torch

    from pprl.config import load_config
    from pprl.data.dataset import load_dataset
    from pprl.train.batches import InMemoryBatches
    from pprl.train.export import export_bundle
    from pprl.train.trainer import Trainer

    log.info("training a %s bundle for %d iterations (speed benchmarks only) into %s", PRESET, STEPS, out)
    cfg = load_config(PRESET)
    arrays = load_dataset(data).arrays("train", cfg.model.image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a shared 2-core machine one thread is the fastest (see bench/README.md)
    try:
        trainer = Trainer(cfg, InMemoryBatches(*arrays, cfg.train.batch_size), device="cpu", steps_per_epoch=STEPS)
        trainer.train_epoch()
    finally:
        torch.set_num_threads(threads)
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    export_bundle(trainer, str(staging), {"note": "bench/bundle.py: trained for speed benchmarks only"})
    staging.rename(out)
    return str(out)
