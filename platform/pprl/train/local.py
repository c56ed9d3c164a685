"""Single-process training on a dataset folder (no Ray): what ``pprl train-local`` and the test fixture run.

Run folder layout (local or S3):
    OUT/checkpoint.pt     the latest trainer state (a rerun with the same OUT resumes from it)
    OUT/config.yaml       the resolved configuration
    OUT/metrics.csv       one row per epoch; OUT/tensorboard/ holds the same as TensorBoard events (local OUT only)
    OUT/samples/          epoch_NNNN.png grids: rows are test faces, columns the input then every target identity
    OUT/model/            the exported bundle (``Anonymizer.load(OUT/model)``), with the domain statistics of its
                          training faces (``pprl.domain``)
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pprl import storage
from pprl.config import Config
from pprl.data.dataset import Dataset, load_dataset
from pprl.domain import sample_indices
from pprl.train.batches import InMemoryBatches, to_model_range
from pprl.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from pprl.train.export import TrainingFaces, export_bundle
from pprl.train.trainer import Trainer

log = logging.getLogger(__name__)


def check_dataset(config: Config, ds: Dataset) -> None:
    """The model's label spaces must match the dataset's, with the fix in the message."""
    if ds.num_identities != config.model.num_identities:
        raise ValueError(
            f"{ds.root} has {ds.num_identities} identities but model.num_identities={config.model.num_identities}; "
            f"add --set model.num_identities={ds.num_identities}"
        )
    if ds.num_expressions != config.model.num_expressions:
        raise ValueError(f"{ds.root} has {ds.num_expressions} expressions but model.num_expressions={config.model.num_expressions}")


def sample_rows(ds: Dataset, rows: int) -> pd.DataFrame:
    """Test images for the sample grid: row r shows expression r mod N_exp on identity r mod N_id where available."""
    test = ds.split("test")
    if test.empty:
        test = ds.split("train")
    picked: list[int] = []
    for r in range(rows):
        match = np.flatnonzero((test["expression"] == r % ds.num_expressions).to_numpy() & (test["identity"] == r % ds.num_identities).to_numpy())
        candidates = [int(i) for i in match if int(i) not in picked] or [i for i in range(len(test)) if i not in picked]
        if candidates:
            picked.append(candidates[0])
    return test.iloc[picked]


def train_local(config: Config, data: str, out: str, device: str | None = None, resume: bool = True, bundle: str | None = None) -> str:
    """Train ``config`` on the dataset at ``data`` until ``train.epochs``; returns the bundle URI (``bundle``, default ``OUT/model``)."""
    ds = load_dataset(data)
    check_dataset(config, ds)
    size = config.model.image_size
    images, identity, expression = ds.arrays("train", size)
    batches = InMemoryBatches(images, identity, expression, config.train.batch_size, seed=config.train.seed)
    samples = to_model_range(ds.load_images(sample_rows(ds, config.train.sample_rows), size))
    trainer = Trainer(config, batches, device=device, run_dir=out, sample_images=samples)
    checkpoint = storage.join(out, CHECKPOINT_NAME)
    if resume and storage.exists(checkpoint):
        trainer.load_state_dict(load_checkpoint(checkpoint, map_location=trainer.device))
        log.info("resumed from %s at epoch %d (step %d)", checkpoint, trainer.epoch, trainer.step)
    storage.write_text(storage.join(out, "config.yaml"), config.to_yaml())
    try:
        trainer.fit(on_epoch=lambda _: save_checkpoint(trainer.state_dict(), checkpoint))
    finally:
        trainer.close()
    bundle = bundle or storage.join(out, "model")
    sample = sample_indices(len(images))
    info = export_bundle(trainer, bundle, training=TrainingFaces(images[sample], identity[sample]))
    log.info("bundle %s written to %s", info["version"], bundle)
    return bundle


def set_threads(threads: int) -> None:
    """CPU threads for training; 0 keeps torch's default."""
    if threads > 0:
        torch.set_num_threads(threads)
