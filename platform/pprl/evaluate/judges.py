"""Frozen judge classifiers: the authors' CNN trained on original images, for identity and for expression.

The evaluation's unconstrained/attack-1 classifiers are exactly these; Ray Tune reuses them to score a trial's
anonymised images (put a ``Judges`` in the object store once with ``ray.put``: it pickles as plain modules).

    judges = train_judges("data/ferg-like", size=32)
    judges.identity_accuracy(fake_images, source_ids)    # privacy: lower is better
    judges.expression_accuracy(fake_images, expressions)  # utility: higher is better
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from pprl.data.dataset import Dataset, load_dataset
from pprl.evaluate.classifiers import Fitted, accuracy, fit, paper_spec, torch_threads
from pprl.evaluate.scenarios import stratified_subsample


@dataclass
class Judges:
    identity: Fitted
    expression: Fitted
    size: int

    def images(self, images) -> np.ndarray:
        """uint8 NHWC (any side: resized) or a float NCHW tensor in [-1, 1] -> uint8 NHWC at the judges' size."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected a float NCHW tensor with 3 channels, got shape {tuple(images.shape)}")
            images = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}")
        if images.shape[1:3] != (self.size, self.size):
            images = np.stack([np.asarray(Image.fromarray(im).resize((self.size, self.size), Image.BILINEAR)) for im in images])
        return images

    def predict_identity(self, images) -> np.ndarray:
        return self.identity.predict(self.images(images))

    def identity_features(self, images) -> np.ndarray:
        """The identity judge's penultimate features: an attacker's feature space for faces (pprl tune's attacks)."""
        return self.identity.features(self.images(images))

    def predict_expression(self, images) -> np.ndarray:
        return self.expression.predict(self.images(images))

    def identity_accuracy(self, images, labels) -> float:
        return accuracy(self.predict_identity(images), np.asarray(labels))

    def expression_accuracy(self, images, labels) -> float:
        return accuracy(self.predict_expression(images), np.asarray(labels))

    def to(self, device: str | torch.device) -> Judges:
        self.identity.model.to(device)
        self.expression.model.to(device)
        return self


def train_judges(
    dataset: Dataset | str,
    size: int | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 256,
    train_limit: int = 0,
    seed: int = 0,
    augment: str = "",
    processes: int = 1,
    device: str | None = None,
) -> Judges:
    """Train the identity and expression judges on the training split (epoch picked on a held-out part of it).

    ``augment="video,geometric"`` trains judges for faces cut out of video (rescaled, 4:2:0 colour, off-centre):
    see classifiers.video_imaging. The default is the paper's protocol: original images as they are.
    ``processes=2`` fits the two judges side by side in spawned processes on a CPU (the same weights, in half the time
    on two idle cores); keep 1 inside a worker process that must not spawn, such as a Ray task.
    """
    ds = load_dataset(dataset) if isinstance(dataset, str) else dataset
    size = size or ds.image_size
    rows = stratified_subsample(ds.split("train"), train_limit, seed)
    images = ds.load_images(rows, size)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    spec = replace(paper_spec("paper-cnn", epochs, seed), batch_size=batch_size, augment=augment)
    jobs = [
        (spec, images, rows["identity"].to_numpy(np.int64), ds.num_identities, device),
        (spec, images, rows["expression"].to_numpy(np.int64), ds.num_expressions, device),
    ]
    identity, expression = _fit_all(jobs, processes if device == "cpu" else 1)
    return Judges(identity, expression, size)


def _fit_all(jobs: list[tuple], processes: int) -> list[Fitted]:
    """``fit(*job)`` for every job, one torch thread each (see classifiers.torch_threads), in ``processes`` processes."""
    if processes <= 1:
        with torch_threads(1):
            return [fit(*job) for job in jobs]
    context = multiprocessing.get_context("spawn")  # fork is unsafe once torch has started its thread pools
    with ProcessPoolExecutor(min(processes, len(jobs)), mp_context=context, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        return list(pool.map(fit, *zip(*jobs, strict=True)))
