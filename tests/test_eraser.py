"""The identity eraser (pprl.eraser): linear identity information goes, expression stays, and bundles carry it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import make_trainer
from pprl import storage
from pprl.anonymizer import Anonymizer
from pprl.eraser import ERASER_FILE, Erasers, IdentityEraser
from pprl.train.export import TrainingFaces, bundle_info, export_bundle, latent_gate


def latents_with_identity(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, 16) latents where identity (6) and expression (7) are both linearly readable, in overlapping directions."""
    rng = np.random.default_rng(seed)
    identity, expression = rng.integers(0, 6, n), rng.integers(0, 7, n)
    mix = np.random.default_rng(0).normal(size=(13, 16))  # the same embedding for every seed
    x = np.concatenate([np.eye(6)[identity] * 2.0, np.eye(7)[expression] * 2.0], 1) @ mix + rng.normal(size=(n, 16))
    return x, identity, expression


def probe(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], classes: int) -> float:
    """A linear probe in closed form: ridge regression onto one-hot labels, the largest output wins."""
    (x, y), (x_test, y_test) = train, test
    design = np.c_[x, np.ones(len(x))]
    weights = np.linalg.solve(design.T @ design + 1e-3 * np.eye(design.shape[1]), design.T @ np.eye(classes)[y])
    return float(((np.c_[x_test, np.ones(len(x_test))] @ weights).argmax(1) == y_test).mean())


def test_erased_latents_hide_identity_from_a_linear_probe_and_keep_expression():
    x, ids, exps = latents_with_identity(3000, seed=1)
    x_test, ids_test, exps_test = latents_with_identity(1000, seed=2)
    eraser = IdentityEraser.fit(x, ids, 6)
    erased, erased_test = eraser.apply(x), eraser.apply(x_test)
    class_means = np.stack([erased[ids == k].mean(0) for k in range(6)])
    assert np.abs(class_means - class_means.mean(0)).max() < 1e-4  # LEACE: equal class means on the fitted faces
    assert eraser.rank == 5  # at most num_identities - 1 directions go
    assert probe((x, ids), (x_test, ids_test), 6) > 0.9
    assert probe((erased, ids), (erased_test, ids_test), 6) < 1 / 6 + 0.05
    assert probe((erased, exps), (erased_test, exps_test), 7) > 0.8
    assert np.linalg.norm(erased - x) < np.linalg.norm(x - x.mean(0))  # a projection, not a scramble


def test_eraser_files_round_trip_and_bad_input_is_named():
    x, ids, _ = latents_with_identity(200, seed=3)
    erasers = Erasers(IdentityEraser.fit(x, ids, 6), IdentityEraser.fit(x[:100], ids[:100], 6))
    again = Erasers.from_bytes(erasers.to_bytes())
    for part in ("render", "export"):
        np.testing.assert_array_equal(getattr(again, part).apply(x), getattr(erasers, part).apply(x))
    np.testing.assert_allclose(erasers.render.apply_torch(torch.as_tensor(x)).numpy(), erasers.render.apply(x), rtol=1e-6)
    np.testing.assert_array_equal(IdentityEraser.identity(16).apply(x), x.astype(np.float32))
    with pytest.raises(ValueError, match="e.npz: not a pprl-eraser/1 file"):
        Erasers.from_bytes(b"not an npz", "e.npz")
    with pytest.raises(ValueError, match="at least 2 identities"):
        IdentityEraser.fit(x, np.zeros(len(x), int), 6)
    with pytest.raises(ValueError, match=r"identities must be in 0..5, got 0..6"):
        IdentityEraser.fit(x, np.arange(len(x)) % 7, 6)


def test_a_bundle_carries_its_erasers_and_names_the_latent_it_exports(tmp_path, caplog):
    trainer = make_trainer("model.latent_cycles=0")  # cpu-quick: model.erase_identity (untrained re-encodings are constant)
    faces = np.random.default_rng(4).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    erased, plain = str(tmp_path / "erased"), str(tmp_path / "plain")
    info = export_bundle(trainer, erased, training=TrainingFaces(faces, np.arange(64) % 6))
    with caplog.at_level(logging.WARNING, logger="pprl"):
        export_bundle(trainer, plain)
    assert "without the identity eraser" in caplog.text
    entry = bundle_info(erased)["eraser"]
    assert entry == info["eraser"] and entry["file"] == ERASER_FILE and entry["faces"] == 64
    assert entry["rank"] == {"render": 5, "export": 0}  # with 0 cycles it exports the rendered latent, erased already
    model, unerased = Anonymizer.load(erased, device="cpu"), Anonymizer.load(plain, device="cpu")
    assert model.version == unerased.version  # the erasers are fitted on top of the weights, not part of them
    assert model.latent_kind == latent_gate(erased).kind == "encoder_mean+leace_identity"
    assert unerased.latent_kind == latent_gate(plain).kind == "encoder_mean"
    x = faces[:8]
    raw = unerased.encode(x)  # with 0 cycles: the encoder's mean
    np.testing.assert_allclose(model.input_latents(x), raw, atol=1e-6)  # the domain check reads the raw mean
    rendered_from = model.erasers.render.apply(raw)
    np.testing.assert_allclose(model.encode(x), model.erasers.export.apply(rendered_from), atol=1e-5)
    assert np.abs(rendered_from - raw).max() > 1e-4  # it did change the latent
    result = model.run(x, 1)
    np.testing.assert_allclose(result.latents, model.encode(x), atol=1e-5)
    expected = Anonymizer.to_uint8(unerased.decoder(torch.as_tensor(rendered_from), torch.ones(8, dtype=torch.long)).detach())
    np.testing.assert_array_equal(result.images, expected)  # rendered from the erased mean
    storage.write_bytes(f"{erased}/{ERASER_FILE}", Erasers(model.erasers.export, model.erasers.render).to_bytes())
    with pytest.raises(ValueError, match=f"{ERASER_FILE}: does not match the sha256"):
        Anonymizer.load(erased)
