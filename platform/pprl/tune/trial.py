"""One Tune trial: a single-process :class:`~pprl.train.trainer.Trainer` with the trial's loss weights, judged per epoch.

A plain function trainable (``tune.report`` with a checkpoint each epoch), not a Ray Train worker group per trial:
see docs/tuning.md for why. The trial reads the training arrays, the validation set and the frozen judges from the
object store (put there once by the driver), so it decodes no image and trains no judge: after each epoch it trains
only the attack probes of :mod:`pprl.tune.objective`, about 2 s per report for cpu-quick (``eval_seconds``).
"""

from __future__ import annotations

import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pprl.data.dataset import encode_png
from pprl.train.batches import InMemoryBatches, to_model_range
from pprl.train.samples import render_grid
from pprl.train.trainer import Trainer
from pprl.tune.objective import ValidationSet, evaluate
from pprl.tune.space import apply_params

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "trainer.pt"  # Trainer.state_dict(): networks, optimisers, schedules, RNG, data position
SAMPLES_FILE = "samples.png"  # validation faces (rows) rendered as every identity (columns), latest epoch


@dataclass(frozen=True)
class TrialInputs:
    """What every trial shares. ``judges``, ``train`` and ``val`` are ``ray.put`` references, fetched, never copied in."""

    base: dict[str, Any]  # Config.to_dict() of the search's base config; the trial's params go on top
    judges: Any  # ObjectRef[SharedJudges]
    train: Any  # ObjectRef[(images uint8 NHWC, identity, expression)]
    val: Any  # ObjectRef[ValidationSet]
    privacy_weight: float  # w in score = expression_acc - w * max(0, privacy_leak) (pprl.tune.objective)
    cpus: float  # CPU threads for torch in this trial


def run_trial(params: dict[str, Any], inputs: TrialInputs) -> None:
    """Train epoch by epoch; after each, score the anonymised validation set and report it with a checkpoint."""
    import ray
    from ray import tune

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = apply_params(inputs.base, params)
    device = trial_device()
    torch.set_num_threads(max(1, int(inputs.cpus)))
    shared = ray.get(inputs.judges).to(device)
    images, identity, expression = ray.get(inputs.train)
    val: ValidationSet = ray.get(inputs.val)
    with warnings.catch_warnings():  # object-store arrays are read-only; batches are copies, so sharing them is safe
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        batches = InMemoryBatches(images, identity, expression, config.train.batch_size, seed=config.train.seed)
    trainer = Trainer(config, batches, device=device)  # no run_dir: Tune keeps the metrics, the checkpoint keeps the state
    restore(trainer, tune.get_checkpoint())
    rows = sample_rows(val, config.train.sample_rows)
    while trainer.epoch < config.train.epochs:
        train_metrics = trainer.train_epoch()
        start = time.perf_counter()
        metrics = evaluate(*trainer.rendering_networks(), shared.judges, val, config.model, inputs.privacy_weight)
        metrics["eval_seconds"] = time.perf_counter() - start  # anonymising, judging and attacking the validation set
        metrics |= {f"train_{k}": v for k, v in train_metrics.items() if isinstance(v, float)}
        metrics |= {"epoch": trainer.epoch, "step": trainer.step, "collapsed": bool(train_metrics["collapsed"]), "judges_token": shared.token}
        report(trainer, metrics, rows)


def trial_device() -> torch.device:
    """The GPU Ray gave this trial (``--gpus-per-trial``, fractions share one), else the CPU."""
    import ray

    return torch.device("cuda") if ray.get_gpu_ids() and torch.cuda.is_available() else torch.device("cpu")


def restore(trainer: Trainer, checkpoint) -> None:
    """Continue from the trial's last checkpoint (a resumed search, or a trial retried after a failure)."""
    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        state = torch.load(Path(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=True)
    trainer.load_state_dict(state)
    log.info("trial resumed at epoch %d, step %d", trainer.epoch, trainer.step)


def sample_rows(val: ValidationSet, count: int) -> torch.Tensor:
    """Fixed validation faces for the per-epoch grid: one per expression, in expression order."""
    _, first = np.unique(val.expression, return_index=True)
    return to_model_range(np.array(val.images[np.sort(first)[:count]]))


def report(trainer: Trainer, metrics: dict[str, Any], rows: torch.Tensor) -> None:
    """``tune.report`` once per epoch with a checkpoint (the trainer's state and a sample grid)."""
    from ray import tune

    with tempfile.TemporaryDirectory(prefix="pprl-trial-") as tmp:
        torch.save(trainer.state_dict(), Path(tmp, CHECKPOINT_FILE))
        grid = render_grid(*trainer.rendering_networks(), rows.to(trainer.device), trainer.config.model.num_identities)
        scale = max(1, 64 // trainer.config.model.image_size)  # small models are upscaled so the grid is viewable
        Path(tmp, SAMPLES_FILE).write_bytes(encode_png(grid.repeat(scale, axis=0).repeat(scale, axis=1)))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
