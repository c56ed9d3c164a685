"""Losses, the training loop, checkpoints, collapse detection, `pprl train-local`, and the quality bar on cpu-quick."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pprl.cli import main
from pprl.config import load_config
from pprl.train import loss as L
from pprl.train.batches import InMemoryBatches, to_model_range
from pprl.train.checkpoint import load_checkpoint, save_checkpoint
from pprl.train.collapse import CollapseDetector
from pprl.train.samples import GAP
from pprl.train.trainer import Trainer

# A network small enough for plumbing tests; every deviation on so that their state is exercised too.
TINY = [
    "model.image_size=16", "model.kernel_size=4", "model.latent_dim=8",
    "model.encoder_widths=[8,8,8,8]", "model.decoder_widths=[8,8,8]", "model.decoder_seed_channels=8",
    "model.disc_widths=[8,8,8,8]", "model.disc_dense=16",
    "train.batch_size=8", "train.steps_per_epoch=2", "train.log_every=0", "train.d_warmup_steps=1",
    "loss.g_recon=1", "loss.g_latent=0.5", "loss.g_latent_exp=0.5", "loss.g_cycle=0.5", "train.augment=translation,color", "train.ema_decay=0.9",
]


def tiny_arrays(n: int = 48, size: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 6, n), rng.integers(0, 7, n)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def tiny_trainer(overrides: list[str] = (), **kwargs) -> Trainer:
    cfg = load_config("cpu-quick", overrides=[*TINY, *overrides])
    images, ids, exps = tiny_arrays()
    return Trainer(cfg, InMemoryBatches(images, ids, exps, cfg.train.batch_size, seed=cfg.train.seed), device="cpu", **kwargs)


# ------------------------------------------------------------------------------------------------ losses


def test_kl_is_zero_at_the_prior_and_summed_over_dimensions():
    zeros = torch.zeros(4, 10)
    assert L.kl_divergence(zeros, zeros).item() == 0
    # mean 1 in every dimension: 0.5 per dimension, summed over 10, averaged over the batch
    assert L.kl_divergence(torch.ones(4, 10), zeros).item() == pytest.approx(5.0)


def test_noisy_labels_stay_in_their_range():
    t = L.noisy_labels(1000, (0.9, 1.0), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert t.min() >= 0.9 and t.max() <= 1.0 and t.std() > 0.02


def test_discriminator_loss_weights_and_parts():
    heads = (torch.zeros(4), torch.zeros(4, 6), torch.zeros(4, 7))
    labels = torch.zeros(4, dtype=torch.long)
    out = L.discriminator_loss(heads, torch.ones(4), labels, labels, (1.0, 0.0, 0.0), "d_fake")
    assert set(out.parts) == {"d_fake_bce"}  # MUG: fakes train the real/fake head only
    assert out.total.item() == pytest.approx(math.log(2))
    full = L.discriminator_loss(heads, torch.ones(4), labels, labels, (0.25, 0.5, 0.25), "d_real")
    assert full.total.item() == pytest.approx(0.25 * math.log(2) + 0.5 * math.log(6) + 0.25 * math.log(7))


def test_confusion_loss_is_smallest_when_the_classes_look_alike():
    assert L.confusion_loss(torch.zeros(3, 6)).item() == pytest.approx(math.log(6))
    assert L.confusion_loss(torch.tensor([[9.0, 0, 0, 0, 0, 0]])).item() > math.log(6)


def test_generator_loss_has_a_part_per_active_term():
    heads = (torch.zeros(4), torch.zeros(4, 6), torch.zeros(4, 7))
    labels = torch.zeros(4, dtype=torch.long)
    weights = {"g_kl": 0.002, "g_adv": 0.108, "g_id": 0.6, "g_exp": 0.29, "g_recon": 2.0, "g_latent": 1.0,
               "g_latent_exp": 0.5, "g_cycle": 3.0}
    paper = L.generator_loss(heads, labels, labels, torch.zeros(4, 8), torch.zeros(4, 8), weights)
    assert set(paper.parts) == {"g_kl", "g_adv", "g_id", "g_exp"}
    assert paper.total.item() == pytest.approx(0.108 * math.log(2) + 0.6 * math.log(6) + 0.29 * math.log(7))
    image = torch.zeros(4, 3, 8, 8)
    extras = L.GeneratorExtras(recon=(image + 0.5, image), latent_logits=torch.zeros(4, 6), latent_exp_logits=torch.zeros(4, 7),
                               cycle=(torch.full((2, 8), 0.25), torch.zeros(2, 8)))
    full = L.generator_loss(heads, labels, labels, torch.zeros(4, 8), torch.zeros(4, 8), weights, extras)
    assert full.parts["g_recon"].item() == pytest.approx(0.5)
    assert full.parts["g_latent_exp"].item() == pytest.approx(math.log(7))
    assert full.parts["g_cycle"].item() == pytest.approx(0.25)
    assert full.total.item() == pytest.approx(paper.total.item() + 2.0 * 0.5 + math.log(6) + 0.5 * math.log(7) + 3.0 * 0.25)


def test_weight_average_starts_as_a_copy_then_moves_a_fraction_towards_the_live_weights():
    from pprl.train.ema import WeightAverage

    live = torch.nn.BatchNorm1d(2)
    average = WeightAverage({"net": live}, decay=0.75)
    with torch.no_grad():
        live.weight.fill_(2.0)
    average.update({"net": live})  # the first update copies
    assert average.averaged["net"].weight.tolist() == [2.0, 2.0]
    with torch.no_grad():
        live.weight.fill_(6.0)
        live.running_mean.fill_(3.0)
    average.update({"net": live})
    assert average.averaged["net"].weight.tolist() == [3.0, 3.0]  # 2 + (6 - 2) * (1 - 0.75)
    assert average.averaged["net"].running_mean.tolist() == [3.0, 3.0]  # statistics are copied, not averaged
    assert not any(p.requires_grad for p in average.averaged["net"].parameters())
    restored = WeightAverage({"net": torch.nn.BatchNorm1d(2)}, decay=0.75)
    restored.load_state_dict(average.state_dict())
    assert restored.started and restored.averaged["net"].weight.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="train.ema_decay"):
        WeightAverage({"net": live}, decay=1.0)


def test_diff_augment_shifts_whole_pixels_and_validates_the_policy():
    from pprl.train.augment import diff_augment, translate

    x = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    torch.manual_seed(1)
    shifted = translate(x, 0.25)
    for image, original in zip(shifted, x, strict=True):
        kept = set(image.flatten().tolist()) - {0.0}
        assert kept <= set(original.flatten().tolist())  # values move, they are not blended
    assert diff_augment(x, "").equal(x)
    with pytest.raises(ValueError, match="train.augment"):
        diff_augment(x, "cutout")


# ------------------------------------------------------------------------------------------------ trainer


def test_checkpoint_resume_gives_the_same_next_step_losses(tmp_path):
    torch.manual_seed(123)
    straight = tiny_trainer()
    straight.train_epoch()  # epoch 1 includes the warm-up iteration (D only)
    straight.train_epoch()
    save_checkpoint(straight.state_dict(), str(tmp_path / "ckpt.pt"))
    expected = straight.train_epoch()

    resumed = tiny_trainer(["train.seed=99"])  # a different seed: everything must come from the checkpoint
    resumed.load_state_dict(load_checkpoint(str(tmp_path / "ckpt.pt")))
    got = resumed.train_epoch()
    losses = [k for k in expected if k.startswith(("d_", "g_", "latent_"))]
    assert {"d_real_bce", "d_fake_bce", "g_id", "g_exp", "g_recon", "g_latent", "g_latent_exp", "g_cycle", "latent_id_ce"} <= set(losses)
    assert {k: got[k] for k in losses} == {k: expected[k] for k in losses}
    assert (got["epoch"], got["step"]) == (3, 6)


def after_warmup(overrides: list[str], iterations: int = 1) -> Trainer:
    """A tiny trainer past D's warm-up, ``iterations`` full iterations (D and generator steps) in."""
    trainer = tiny_trainer(overrides)  # seeds the global RNG: build and step one trainer at a time
    trainer.step = trainer.config.train.d_warmup_steps
    for _ in range(iterations):
        trainer.train_step()
    return trainer


def test_latent_expression_head_trains_with_the_encoder():
    """The head learns, and its loss reaches the encoder: the same seed without it ends the step elsewhere."""
    head_before = tiny_trainer().latent_exp.linear.weight.detach().clone()
    with_head, without = after_warmup([]), after_warmup(["loss.g_latent_exp=0"])
    assert without.latent_exp is None
    assert not torch.equal(with_head.latent_exp.linear.weight, head_before)
    assert not torch.equal(with_head.encoder.mean.weight, without.encoder.mean.weight)
    assert torch.equal(with_head.disc.identity.weight, without.disc.identity.weight)  # the D step saw the same fakes


def test_latent_cycle_is_judged_by_the_frozen_average_and_trains_the_generator():
    """No cycle until the weight average exists; then its loss reaches the decoder, and the judge itself never learns."""
    first, first_without = after_warmup([]), after_warmup(["loss.g_cycle=0"])
    assert "g_cycle" not in first._sums  # the average starts after the first generator steps
    assert torch.equal(first.decoder.dense.weight, first_without.decoder.dense.weight)
    second, second_without = after_warmup([], 2), after_warmup(["loss.g_cycle=0"], 2)
    assert second._sums["g_cycle"] > 0
    assert not torch.equal(second.decoder.dense.weight, second_without.decoder.dense.weight)
    judge = second.ema.averaged["encoder"]
    assert not judge.training and all(p.grad is None and not p.requires_grad for p in judge.parameters())
    with pytest.raises(ValueError, match="train.ema_decay"):
        tiny_trainer(["train.ema_decay=0"])


def test_checkpoint_from_another_model_is_refused(tmp_path):
    trainer = tiny_trainer()
    state = trainer.state_dict()
    other = tiny_trainer(["model.latent_dim=4"])
    with pytest.raises(ValueError, match="different model config"):
        other.load_state_dict(state)


def test_epoch_metrics_csv_tensorboard_and_sample_grid(tmp_path):
    images, _, _ = tiny_arrays(n=3)
    trainer = tiny_trainer(run_dir=str(tmp_path), sample_images=to_model_range(images))
    first = trainer.train_epoch()
    second = trainer.train_epoch()
    trainer.close()
    for m in (first, second):
        assert m["images_per_s"] > 0 and m["collapsed"] is False and 0 <= m["d_real_acc"] <= 1
    rows = read_csv(tmp_path / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and float(rows[1]["g_recon"]) > 0
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with Image.open(tmp_path / "samples" / "epoch_0002.png") as grid:
        scale = 64 // 16
        assert grid.size == (((1 + 6) * 16 + GAP) * scale, 3 * 16 * scale)  # input column + one per identity


def test_batch_source_validates_and_draws_without_repeats():
    images, ids, exps = tiny_arrays(n=10)
    with pytest.raises(ValueError, match="larger than the 10"):
        InMemoryBatches(images, ids, exps, batch_size=11)
    with pytest.raises(ValueError, match="differ in length"):
        InMemoryBatches(images, ids[:5], exps, batch_size=4)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        InMemoryBatches(images[..., :1], ids, exps, batch_size=4)
    x, y_id, _ = next(InMemoryBatches(images, np.arange(10), exps, batch_size=10))
    assert sorted(y_id.tolist()) == list(range(10)) and x.min() >= -1 and x.max() <= 1


# ------------------------------------------------------------------------------------------------ collapse


def history(real: float, fake: float, g_id: list[float]) -> list[dict]:
    return [{"d_real_acc": real, "d_fake_acc": fake, "g_id": v} for v in g_id]


def test_collapse_detector():
    detector = CollapseDetector(patience=3, num_identities=6)
    assert detector.check(history(0.7, 0.8, [1.6, 0.9, 0.5, 0.2, 0.1])) == ""  # learning
    assert detector.check(history(0.7, 0.8, [0.05, 0.06, 0.05, 0.06])) == ""  # solved: flat but low
    assert "identity loss" in detector.check(history(0.7, 0.8, [1.7, 1.6, 1.65, 1.7, 1.68]))
    assert "pinned" in detector.check(history(1.0, 1.0, [1.0, 0.5, 0.3]))  # D wins outright
    assert "pinned" in detector.check(history(1.0, 0.0, [1.0, 0.5, 0.3]))  # D calls everything real
    assert detector.check(history(1.0, 1.0, [1.0, 0.5])) == ""  # not for long enough yet


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_train_local_cli_writes_bundle_and_samples_and_resumes(small_data, tmp_path):
    out = tmp_path / "run"
    args = ["train-local", "--data", small_data, "--out", str(out), "--preset", "cpu-quick", "--threads", "1",
            "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=16", "--set", "train.d_warmup_steps=0"]
    main([*args, "--epochs", "1"])
    assert (out / "model" / "bundle.json").exists() and (out / "samples" / "epoch_0001.png").exists()
    main([*args, "--epochs", "2"])  # same folder: resumes at epoch 1 and runs one more
    rows = read_csv(out / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2] and int(rows[-1]["step"]) == 4
    assert (out / "samples" / "epoch_0002.png").exists()
    from pprl.anonymizer import Anonymizer
    from pprl.data.dataset import load_dataset

    model = Anonymizer.load(str(out / "model"))
    assert model.version.startswith("cpu-quick-s4-")
    assert model.domain is not None and model.info["domain"]["faces"] == len(load_dataset(small_data).split("train"))


def test_train_local_refuses_a_dataset_with_other_identities(small_data, tmp_path):
    with pytest.raises(ValueError, match="model.num_identities=6"):
        from pprl.train.local import train_local

        train_local(load_config("cpu-quick", overrides=["model.num_identities=8"]), small_data, str(tmp_path))


# ------------------------------------------------------------------------------------------------ quality


@pytest.mark.slow
def test_cpu_quick_disentangles_identity_from_expression(trained_model, synth_data, judges):
    """The done-when bar: judges trained only on original images see the TARGET identity (>= 90%) and the SOURCE
    expression (>= 80%) on held-out faces rendered with random target codes, never the source's own."""
    from pprl.anonymizer import Anonymizer
    from pprl.data.dataset import load_dataset

    anon = Anonymizer.load(trained_model, device="cpu")
    ds = load_dataset(synth_data)
    images, identity, expression = ds.arrays("test", anon.image_size)
    rng = np.random.default_rng(0)
    targets = (identity + rng.integers(1, anon.num_identities, len(identity))) % anon.num_identities
    assert not (targets == identity).any()
    result = anon.run(images, targets)
    target_acc = judges.identity_accuracy(result.images, targets)
    source_id_acc = judges.identity_accuracy(result.images, identity)
    expression_acc = judges.expression_accuracy(result.images, expression)
    originals = judges.expression_accuracy(images, expression), judges.identity_accuracy(images, identity)
    print(
        f"\ncpu-quick on {len(images)} held-out faces: target identity {target_acc:.3f}, source expression "
        f"{expression_acc:.3f}, source identity {source_id_acc:.3f} "
        f"(judges on originals: expression {originals[0]:.3f}, identity {originals[1]:.3f})"
    )
    assert target_acc >= 0.90
    assert expression_acc >= 0.80  # the latent's identity (attack 3) is issue 5's bar: tests/test_evaluate.py


def test_sample_grid_of_the_fixture_model_is_written(trained_model):
    grids = sorted((Path(trained_model).parent / "samples").glob("epoch_*.png"))
    if not grids:
        pytest.skip("the bundle came from PPRL_TEST_MODEL_CACHE without its run folder")
    with Image.open(grids[-1]) as im:
        assert im.width > im.height  # input column + one column per identity, sample_rows rows
