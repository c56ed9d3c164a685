"""NVIDIA DALI input path: read, decode, resize and normalise on the GPU (or on CPU threads where there is none).

Each pass over the split is one small pipeline: ``fn.readers.file`` over the pass's globally permuted file list,
sharded by global rank (``shard_id=rank, num_shards=world_size, pad_last_batch=True``), so the ranks read disjoint
slices that cover the split. The reader's label is the sample's index, from which identity and expression are looked
up (see :class:`pprl.data.loader.BatchSource`). Under Ray Train the device comes from ``ray.train.torch.get_device()``:
``device_id`` is that CUDA index, never a hard-coded 0 (Ray may show every GPU of the node to every worker).

DALI is optional: import this module only through :func:`pprl.data.loader.make_batches` or after :func:`available`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch

from pprl.data.loader import BatchSource, Samples

READER = "Reader"


def available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def build_pipeline(
    files: list[str],
    ids: list[int],
    size: int,
    batch_size: int,
    shard_id: int,
    num_shards: int,
    device_id: int | None,
    num_threads: int = 2,
    seed: int = 0,
):
    """One pass: files in the given (global) order, this shard's slice, ids as labels. ``device_id=None``: CPU only."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2)
    def pipeline():
        encoded, labels = fn.readers.file(
            files=files,
            labels=ids,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=False,  # the order is the pass's global permutation, the same on every rank
            stick_to_shard=True,
            pad_last_batch=True,
            name=READER,
        )
        images = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
        # float output, unrounded: pprl.data.loader.resize_linear computes the same filter
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT)
        images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mean=[127.5] * 3, std=[127.5] * 3)
        return images, labels

    pipe = pipeline()
    pipe.build()
    return pipe


class DaliBatches(BatchSource):
    """DALI-backed :class:`BatchSource`; on a CUDA device the images come out on that device."""

    def __init__(self, samples: Samples, size: int, batch_size: int, num_threads: int = 2, **kwargs) -> None:
        super().__init__(samples, size, batch_size, **kwargs)
        self.num_threads = num_threads
        self.device_id = self.device.index if self.device.type == "cuda" else None
        if self.device.type == "cuda" and self.device_id is None:
            self.device_id = torch.cuda.current_device()

    def _pass(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = build_pipeline(
            files=[self.samples.files[i] for i in order],
            ids=order.tolist(),
            size=self.size,
            batch_size=self.batch_size,
            shard_id=self.rank,
            num_shards=self.world_size,
            device_id=self.device_id,
            num_threads=self.num_threads,
            seed=self.seed,
        )
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        batches = DALIGenericIterator([pipe], ["images", "ids"], reader_name=READER, last_batch_policy=policy, auto_reset=False)
        for out in batches:
            yield out[0]["images"], out[0]["ids"]
