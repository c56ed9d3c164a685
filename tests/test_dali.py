"""The two input paths: DALI and the plain DataLoader give the same tensors; shards cover a pass exactly once."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from pprl.data.dataset import load_dataset
from pprl.data.loader import TorchBatches, pass_order, resize_linear, shard_bounds, stage_split

dali = pytest.importorskip("pprl.data.dali")
if not dali.available():
    pytest.skip("NVIDIA DALI is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def samples(small_data):
    return stage_split(load_dataset(small_data), "train")


def collect(source, pass_index=0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, ids, exps = zip(*source.one_pass(pass_index), strict=True)
    return torch.cat(images), torch.cat(ids), torch.cat(exps)


@pytest.mark.parametrize("size", [64, 32])  # native size, and the 2x downscale cpu-quick trains at
def test_dali_matches_dataloader(samples, size):
    """Same files, same shard, same shuffled order, no augmentation: equal images (far below 1/255) and labels."""
    kwargs = dict(rank=1, world_size=2, seed=5, drop_last=False)
    dali_x, dali_id, dali_exp = collect(dali.DaliBatches(samples, size, 16, num_threads=1, **kwargs), pass_index=1)
    torch_x, torch_id, torch_exp = collect(TorchBatches(samples, size, 16, **kwargs), pass_index=1)
    assert dali_x.shape == torch_x.shape == (len(samples) // 2, 3, size, size)
    assert dali_x.dtype == torch.float32 and dali_x.min() >= -1.0 and dali_x.max() <= 1.0
    assert torch.equal(dali_id, torch_id) and torch.equal(dali_exp, torch_exp)
    assert (dali_x - torch_x).abs().max().item() < 1e-4  # 1/255 of the [-1, 1] range is 7.8e-3


def test_two_dali_shards_cover_a_pass_exactly_once(samples):
    """DALI's reader with shard_id/num_shards: disjoint, complete shards, in our order; pad_last_batch adds nothing."""
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    n = len(samples)  # 420: shards of 210 = 13 batches of 16 and a partial one of 2
    order = pass_order(n, seed=0, epoch=0, pass_index=0)
    seen = []
    for rank in range(2):
        pipe = dali.build_pipeline([samples.files[i] for i in order], order.tolist(), 32, 16, shard_id=rank, num_shards=2, device_id=None, num_threads=1)
        reader = DALIGenericIterator([pipe], ["images", "ids"], reader_name=dali.READER, last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        ids = [int(i) for batch in reader for i in batch[0]["ids"].reshape(-1)]
        lo, hi = shard_bounds(n, rank, 2)
        assert ids == order[lo:hi].tolist()
        seen += ids
    assert sorted(seen) == list(range(n))


def test_batch_source_labels_and_passes(samples):
    """Through the BatchSource: both ranks' labels together are the split's labels; the next pass is reshuffled."""
    labels = Counter()
    for rank in range(2):
        source = dali.DaliBatches(samples, 32, 16, num_threads=1, rank=rank, world_size=2, seed=0, drop_last=False)
        _, identity, expression = collect(source)
        labels.update(zip(identity.tolist(), expression.tolist(), strict=True))
    assert labels == Counter(zip(samples.identity.tolist(), samples.expression.tolist(), strict=True))
    source = dali.DaliBatches(samples, 32, 16, num_threads=1, rank=0, world_size=2, seed=0)
    first, second = next(source.one_pass(0)), next(source.one_pass(1))
    assert not torch.equal(first[0], second[0])


def test_endless_stream_is_replayable_per_epoch(samples):
    """set_epoch(e) restarts the same stream: a resumed epoch sees the batches it would have seen."""
    source = TorchBatches(samples, 32, 64, rank=0, world_size=2, seed=3)
    source.set_epoch(4)
    run = [next(source)[1] for _ in range(5)]  # 210 samples per rank: 3 batches a pass, so this crosses passes
    source.set_epoch(5)
    other = next(source)[1]
    source.set_epoch(4)
    assert all(torch.equal(a, next(source)[1]) for a in run)
    assert not torch.equal(run[0], other)


def test_shard_smaller_than_batch_is_refused(samples):
    with pytest.raises(ValueError, match="fewer than one batch"):
        TorchBatches(samples, 32, 300, rank=0, world_size=2)


def test_resize_matches_pil_away_from_the_border():
    """The shared resize is PIL's antialiased bilinear except at the border (DALI clamps, PIL renormalises)."""
    from PIL import Image

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ours = resize_linear(image, 32)
    pil = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR), dtype=np.float32)
    assert np.abs(ours - pil)[1:-1, 1:-1].max() <= 1.0  # rounding only
