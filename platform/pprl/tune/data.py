"""The search's data, decoded once by the driver: a training part, a validation part carved from the training split,
and the fixed anonymisation targets of the validation images.

The dataset's ``test`` split is not touched: it stays for ``pprl evaluate`` of the model trained with the chosen
weights, so the test images never take part in choosing them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pprl.data.dataset import Dataset
from pprl.evaluate.scenarios import random_targets
from pprl.tune.objective import ValidationSet

VAL = "val"


@dataclass
class TuneData:
    view: Dataset  # the dataset with the carved validation rows relabelled split="val"
    train: tuple[np.ndarray, np.ndarray, np.ndarray]  # uint8 NHWC at the model's size, identity, expression
    val: ValidationSet


def carve_validation(dataset: Dataset, fraction: float, limit: int, seed: int) -> Dataset:
    """Move a stratified ``fraction`` (at most ``limit`` images; 0 = no cap) of the train split to split="val".

    Whole sequences move together when the manifest has a ``sequence`` column, so near-identical frames of one clip
    never sit on both sides.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {fraction}")
    manifest = dataset.manifest.copy()
    train = manifest[manifest["split"] == "train"]
    if train.empty:
        raise ValueError(f"{dataset.root}: the train split is empty; tuning carves its validation images from it")
    unit = train["sequence"] if "sequence" in train.columns else pd.Series(train.index, index=train.index)
    units = train.assign(_unit=unit.to_numpy()).groupby("_unit", sort=True).agg(identity=("identity", "first"), expression=("expression", "first"), n=("path", "size"))
    if limit:
        fraction = min(fraction, limit / len(train))
    rng = np.random.default_rng(seed)
    chosen = []
    for _, cell in units.groupby(["identity", "expression"], sort=True):
        n = min(int(round(len(cell) * fraction)), len(cell) - 1)
        chosen.extend(cell.index[rng.permutation(len(cell))[: max(n, 0)]])
    moved = train.index[unit.isin(chosen).to_numpy()]
    if len(moved) == 0 or len(moved) == len(train):
        raise ValueError(
            f"{dataset.root}: --val-fraction {fraction:.3f} of {len(train)} training images leaves no validation or no "
            "training images; use a larger dataset or change --val-fraction/--val-limit"
        )
    manifest.loc[moved, "split"] = VAL
    return Dataset(root=dataset.root, manifest=manifest, info=dataset.info)


def prepare(dataset: Dataset, size: int, fraction: float, limit: int, seed: int) -> TuneData:
    """Carve, decode both parts at ``size``, draw the validation targets (never the source identity)."""
    view = carve_validation(dataset, fraction, limit, seed)
    train = view.arrays("train", size)
    images, identity, expression = view.arrays(VAL, size)
    targets = random_targets(identity, dataset.num_identities, np.random.default_rng(seed + 1))
    return TuneData(view, train, ValidationSet(images, identity, expression, targets))
