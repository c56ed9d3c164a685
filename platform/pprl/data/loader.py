"""Training input: endless, sharded, resumable batches of ``(images, identity, expression)``.

Two interchangeable sources give the same tensors for the same files: :class:`TorchBatches` (a plain PyTorch
``DataLoader``, used where DALI is not installed) and ``pprl.data.dali.DaliBatches``. What they share lives here:

* the order: each *pass* over the split is a global permutation seeded by ``(seed, epoch, pass)``; rank ``r`` of ``W``
  reads the contiguous slice ``[r*N//W, (r+1)*N//W)`` of it (DALI's own shard rule), so the ranks see every sample of a
  pass exactly once between them, and a resumed epoch replays exactly the batches it would have seen;
* the resize: :func:`resize_linear` is a NumPy twin of DALI's ``fn.resize(interp_type=INTERP_LINEAR, antialias=True)``
  (a triangle filter as wide as the scale, border pixels clamped), computed in float so both paths agree to ~1e-5;
* staging: S3 datasets are copied once per node to local disk (:func:`stage_split`), since both readers want files.

A trainer epoch may need several passes (each iteration draws ``1 + g_steps_per_d`` batches); the stream never ends,
the trainer takes what it needs, and :meth:`BatchSource.set_epoch` starts the next epoch's stream.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from pprl import storage
from pprl.data.dataset import Dataset, decode_image

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images float NCHW [-1, 1], identity int64, expression int64


@dataclass(frozen=True)
class Samples:
    """One split as local files plus labels; a sample's index into these arrays is its id in both loaders."""

    files: list[str]
    identity: np.ndarray  # int64 (N,)
    expression: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.files)


def stage_split(dataset: Dataset, split: str, cache_dir: str | None = None, threads: int = 16) -> Samples:
    """The split's files as local paths: a local dataset is used in place, an S3 one is copied once per node.

    Several workers on one node share the copy: a file lock lets the first one download while the others wait,
    and each file is written atomically, so an interrupted copy is resumed rather than trusted.
    """
    rows = dataset.split(split)
    if rows.empty:
        raise ValueError(f"{dataset.root}: the {split!r} split has no rows")
    if storage.is_s3(dataset.root):
        root = _stage_s3(dataset, list(rows["path"]), cache_dir or default_cache_dir(), threads)
    else:
        root = os.path.abspath(storage.strip_scheme(dataset.root))
    return Samples(
        files=[os.path.join(root, p) for p in rows["path"]],
        identity=rows["identity"].to_numpy(np.int64),
        expression=rows["expression"].to_numpy(np.int64),
    )


def default_cache_dir() -> str:
    return os.environ.get("PPRL_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "pprl-stage"))


def _stage_s3(dataset: Dataset, paths: list[str], cache_dir: str, threads: int) -> str:
    root = os.path.join(cache_dir, hashlib.sha1(dataset.root.encode()).hexdigest()[:16])
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [p for p in paths if not os.path.exists(os.path.join(root, p))]
        if missing:
            log.info("staging %d files of %s to %s", len(missing), dataset.root, root)

            def copy(rel: str) -> None:
                storage.write_bytes(os.path.join(root, rel), storage.read_bytes(dataset.uri(rel)))

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(copy, missing))
    return root


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """DALI's file reader shard rule: shard ``rank`` holds ``[rank*n//W, (rank+1)*n//W)``."""
    return rank * n // world_size, (rank + 1) * n // world_size


def pass_order(n: int, seed: int, epoch: int, pass_index: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one pass; the same on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, pass_index]).permutation(n)


@lru_cache(maxsize=32)
def _resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of a linear filter, antialiased when shrinking, clamped at the border (as DALI does)."""
    scale = n_in / n_out
    radius = max(scale, 1.0)
    weights = np.zeros((n_out, n_in), np.float64)
    for j in range(n_out):
        centre = (j + 0.5) * scale - 0.5
        for k in range(int(np.floor(centre - radius)), int(np.ceil(centre + radius)) + 1):
            weights[j, min(max(k, 0), n_in - 1)] += max(0.0, 1.0 - abs(k - centre) / radius)
        weights[j] /= weights[j].sum()
    return weights.astype(np.float32)


def resize_linear(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> float32 (size, size, C), unrounded, equal to DALI's linear antialiased resize."""
    height, width = image.shape[:2]
    pixels = image.astype(np.float32)
    if (height, width) == (size, size):
        return pixels
    rows = np.tensordot(_resize_weights(height, size), pixels, axes=(1, 0))  # (size, W, C)
    return np.einsum("xj,yjc->yxc", _resize_weights(width, size), rows, optimize=True)


def load_tensor(path: str, size: int) -> torch.Tensor:
    """One file -> float CHW in [-1, 1] at ``size``: decode, resize, normalise with (x - 127.5) / 127.5."""
    with open(path, "rb") as f:
        image = decode_image(f.read(), size=None, source=path)
    pixels = (resize_linear(image, size) - 127.5) / 127.5
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


class ManifestImages(torch.utils.data.Dataset):
    """Map-style dataset over :class:`Samples`: item ``i`` is ``(image CHW float, i)``."""

    def __init__(self, samples: Samples, size: int) -> None:
        self.samples = samples
        self.size = size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return load_tensor(self.samples.files[index], self.size), index


class BatchSource:
    """Endless batches for the current epoch; :meth:`set_epoch` restarts the stream for another epoch.

    Subclasses implement :meth:`_pass`, which yields ``(images, sample ids)`` for this rank's shard of one pass
    given the pass's global order. Labels are looked up here, from the sample ids, so both loaders share them.
    """

    def __init__(
        self,
        samples: Samples,
        size: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        device: torch.device | str = "cpu",
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        lo, hi = shard_bounds(len(samples), rank, world_size)
        if drop_last and hi - lo < batch_size:
            raise ValueError(
                f"rank {rank}'s shard holds {hi - lo} of {len(samples)} samples, fewer than one batch of {batch_size}: "
                f"lower train.batch_size or use fewer workers"
            )
        self.samples, self.size, self.batch_size = samples, size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.identity = torch.from_numpy(samples.identity)
        self.expression = torch.from_numpy(samples.expression)
        self.epoch = 0
        self.on_batch: Callable[[], None] | None = None  # called before each batch is handed out (fault injection)
        self._stream: Iterator[Batch] | None = None

    @property
    def num_examples(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._stream = None

    def __iter__(self) -> BatchSource:
        return self

    def __next__(self) -> Batch:
        if self.on_batch is not None:
            self.on_batch()
        if self._stream is None:
            self._stream = self._endless()
        return next(self._stream)

    def one_pass(self, pass_index: int = 0) -> Iterator[Batch]:
        """This rank's batches of one pass of the current epoch (finite)."""
        order = pass_order(len(self.samples), self.seed, self.epoch, pass_index, self.shuffle)
        for images, ids in self._pass(order):
            ids = ids.reshape(-1).long().cpu()
            yield images.to(self.device, non_blocking=True), self._label(self.identity, ids), self._label(self.expression, ids)

    def _label(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return table[ids].to(self.device, non_blocking=True)

    def _endless(self) -> Iterator[Batch]:
        pass_index = 0
        while True:
            yield from self.one_pass(pass_index)
            pass_index += 1

    def _pass(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


class TorchBatches(BatchSource):
    """The plain PyTorch path: a ``DataLoader`` over this rank's shard of each pass."""

    def __init__(self, samples: Samples, size: int, batch_size: int, num_workers: int = 0, **kwargs) -> None:
        super().__init__(samples, size, batch_size, **kwargs)
        self.dataset = ManifestImages(samples, size)
        self.num_workers = num_workers

    def _pass(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lo, hi = shard_bounds(len(order), self.rank, self.world_size)
        shard = order[lo:hi].tolist()
        stop = len(shard) - len(shard) % self.batch_size if self.drop_last else len(shard)
        batches = [shard[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=batches,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        yield from loader


def make_batches(
    samples: Samples,
    size: int,
    batch_size: int,
    loader: str = "auto",
    num_workers: int = 0,
    **kwargs,
) -> BatchSource:
    """``loader``: ``dali``, ``torch`` or ``auto`` (DALI when it is installed)."""
    if loader not in ("auto", "dali", "torch"):
        raise ValueError(f"loader must be auto, dali or torch, got {loader!r}")
    if loader != "torch":
        from pprl.data import dali

        if dali.available():
            return dali.DaliBatches(samples, size, batch_size, num_threads=max(1, num_workers), **kwargs)
        if loader == "dali":
            raise ValueError("loader=dali but NVIDIA DALI is not installed: pip install nvidia-dali-cuda120 (or use --loader torch)")
        log.info("DALI is not installed: using the PyTorch DataLoader path")
    return TorchBatches(samples, size, batch_size, num_workers=num_workers, **kwargs)
