"""The domain check (``pprl.domain``): statistics of the training faces in latent space, written into bundles, and the
out-of-domain score at inference. The check on real against synthetic footage is in test_footage.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import make_trainer
from pprl import storage
from pprl.anonymizer import Anonymizer
from pprl.domain import DOMAIN_FILE, WARNING, DomainStats, missing_note, mostly_out_of_domain
from pprl.train.export import TrainingFaces, bundle_info, export_bundle


def test_training_like_latents_spread_over_the_percentiles_and_far_ones_are_out_of_domain():
    rng = np.random.default_rng(0)
    scales = np.geomspace(1.0, 1e-3, 16)  # an encoder uses some directions much more than others
    stats = DomainStats.fit(rng.normal(size=(4096, 16)) * scales)
    fresh = stats.score(rng.normal(size=(4000, 16)) * scales)
    assert 45 <= np.median(fresh.percentile) <= 55 and fresh.out_of_domain.mean() <= 0.02
    # 8 standard deviations along a direction the training latents use little is far out; the distance says how far
    shifted = rng.normal(size=(200, 16)) * scales + 8 * scales[8] * np.eye(16)[8]
    far = stats.score(shifted)
    assert far.out_of_domain.all() and np.median(far.percentile) == 100 and far.distance.min() > np.percentile(stats.reference, 99)
    again = DomainStats.from_bytes(stats.to_bytes())
    np.testing.assert_array_equal(again.score(shifted).distance, far.distance)
    with pytest.raises(ValueError, match="x.npz: not a pprl-domain/1 file"):
        DomainStats.from_bytes(b"not an npz", "x.npz")


def test_mostly_out_of_domain_warns_in_plain_words():
    assert mostly_out_of_domain(10, 5) is None and mostly_out_of_domain(0, 0) is None
    assert mostly_out_of_domain(10, 6) == f"6 of 10 faces (60%) are out of domain: {WARNING}"
    assert "train on your own faces, see docs/training.md" in WARNING


def faces(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_an_exported_bundle_carries_domain_statistics_and_one_without_them_still_loads(tmp_path):
    trainer = make_trainer()
    with_stats, without = str(tmp_path / "with"), str(tmp_path / "without")
    info = export_bundle(trainer, with_stats, training=TrainingFaces(faces(64), np.arange(64) % 6))
    export_bundle(trainer, without)
    entry = bundle_info(with_stats)["domain"]
    assert entry == info["domain"] and entry["faces"] == 64 and entry["latent_dim"] == 8 and entry["file"] == DOMAIN_FILE
    assert storage.exists(f"{with_stats}/{DOMAIN_FILE}") and "domain" not in bundle_info(without)
    model, plain = Anonymizer.load(with_stats, device="cpu"), Anonymizer.load(without, device="cpu")
    assert model.version == plain.version  # the statistics are not part of the weights' version
    result = model.run(faces(5, seed=2), 1)
    assert result.domain.distance.shape == result.domain.percentile.shape == result.domain.out_of_domain.shape == (5,)
    np.testing.assert_allclose(result.domain.distance, model.domain.distance(model.input_latents(faces(5, seed=2))), rtol=1e-5)
    assert plain.domain is None and plain.run(faces(5, seed=2), 1).domain is None
    np.testing.assert_array_equal(result.images, plain.run(faces(5, seed=2), 1).images)
    assert "no statistics of its training faces" in missing_note(without) and "pprl domain-stats" in missing_note(without)
    # a named file that is altered or gone is a broken bundle, named in the error
    storage.write_bytes(f"{with_stats}/{DOMAIN_FILE}", DomainStats.fit(np.random.default_rng(0).normal(size=(8, 8))).to_bytes())
    with pytest.raises(ValueError, match=f"{DOMAIN_FILE}: does not match the sha256"):
        Anonymizer.load(with_stats)


def test_domain_stats_cli_adds_statistics_to_an_older_bundle(tiny_bundle, small_data, tmp_path):
    from pprl.cli import main
    from pprl.data.dataset import load_dataset

    bundle = str(tmp_path / "old")
    shutil.copytree(tiny_bundle, bundle)
    before = {k: v for k, v in bundle_info(bundle).items() if k not in ("domain", "eraser")}  # as exported before them
    storage.write_text(f"{bundle}/bundle.json", json.dumps(before))
    assert Anonymizer.load(bundle).domain is None and Anonymizer.load(bundle).erasers is None
    main(["domain-stats", "--model", bundle, "--data", small_data])
    after = json.loads(storage.read_text(f"{bundle}/bundle.json"))
    faces = len(load_dataset(small_data).split("train"))  # fewer than DOMAIN_FACES: all of them
    assert after["domain"]["faces"] == after["eraser"]["faces"] == faces  # cpu-quick sets model.erase_identity
    assert {k: v for k, v in after.items() if k not in ("domain", "eraser")} == before  # the weights and version are untouched
    model = Anonymizer.load(bundle)
    assert model.domain is not None and model.erasers is not None and model.latent_kind.endswith("+leace_identity")
