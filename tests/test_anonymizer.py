"""The inference API on a small untrained bundle (fast) plus the fixture model: inputs, determinism, errors, S3."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import make_trainer
from pprl import storage
from pprl.anonymizer import Anonymizer
from pprl.train.export import bundle_info, export_bundle, export_checkpoint


@pytest.fixture(scope="module")
def bundle(tiny_bundle) -> str:
    return tiny_bundle


@pytest.fixture(scope="module")
def anon(bundle) -> Anonymizer:
    return Anonymizer.load(bundle, device="cpu")


def faces(n: int, size: int = 16, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_bundle_layout_and_metadata(bundle, anon):
    info = json.loads(storage.read_text(f"{bundle}/bundle.json"))
    assert {"model.pt", "config.yaml", "bundle.json"} <= {p.rsplit("/", 1)[-1] for p in storage.list_files(bundle)}
    assert info["version"] == anon.version and info["version"].startswith("cpu-quick-s1-") and info["note"] == "test"
    assert (info["image_size"], info["num_identities"], info["latent_dim"], info["step"]) == (16, 6, 8, 1)
    assert (anon.image_size, anon.num_identities, anon.num_expressions, anon.latent_dim) == (16, 6, 7, 8)
    assert anon.config.model.image_size == 16 and anon.device == torch.device("cpu")


def test_outputs_shapes_dtypes_and_determinism(anon):
    x = faces(5)
    out = anon.anonymize(x, [0, 1, 2, 3, 4])
    assert out.shape == (5, 16, 16, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, anon.anonymize(x, [0, 1, 2, 3, 4]))  # latent mean: deterministic
    assert not np.array_equal(anon.anonymize(x, 2, sample=True), anon.anonymize(x, 2, sample=True))
    z = anon.encode(x)
    assert z.shape == (5, 8) and z.dtype == np.float32
    probs = anon.predict_expression(x)
    assert probs.shape == (5, 7) and probs.dtype == np.float32 and np.allclose(probs.sum(1), 1, atol=1e-5)
    res = anon.run(x, 3)
    np.testing.assert_array_equal(res.images, anon.anonymize(x, 3))
    np.testing.assert_allclose(res.latents, z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(res.expression_probs, probs, rtol=1e-5, atol=1e-6)
    assert res.targets.tolist() == [3] * 5


def test_every_accepted_input_form_gives_the_same_answer(anon):
    x = faces(3)
    want = anon.encode(x)
    tensor = torch.from_numpy(x).permute(0, 3, 1, 2).float().sub(127.5).div(127.5)
    np.testing.assert_allclose(anon.encode(tensor), want, rtol=1e-5, atol=1e-6)  # float NCHW in [-1, 1]
    np.testing.assert_allclose(anon.encode(list(x)), want, rtol=1e-5, atol=1e-6)  # list of HWC arrays
    np.testing.assert_allclose(anon.encode(x[0]), want[:1], rtol=1e-5, atol=1e-6)  # one HWC array
    mixed = [faces(1, 40)[0], faces(1, 16)[0], faces(1, 7)[0]]  # any sizes: resized to the model's
    assert anon.anonymize(mixed, 1).shape == (3, 16, 16, 3)
    big = faces(600)  # more than one internal batch
    assert anon.anonymize(big, np.arange(600) % 6).shape == (600, 16, 16, 3)


@pytest.mark.parametrize(
    ("images", "targets", "message"),
    [
        (np.zeros((2, 16, 16), np.uint8), 0, r"\(N, H, W, 3\)"),
        (np.zeros((2, 16, 16, 4), np.uint8), 0, r"\(N, H, W, 3\)"),
        (np.zeros((2, 16, 16, 3), np.float32), 0, "uint8"),
        (torch.zeros(2, 16, 16, 3), 0, "NCHW"),
        ([], 0, "no images"),
        (np.zeros((0, 16, 16, 3), np.uint8), 0, "no images"),
        (np.zeros((2, 16, 16, 3), np.uint8), 6, "out of range"),
        (np.zeros((2, 16, 16, 3), np.uint8), [0, 1, 2], "3 target identities for 2 images"),
    ],
)
def test_bad_inputs_raise_clear_value_errors(anon, images, targets, message):
    with pytest.raises(ValueError, match=message):
        anon.anonymize(images, targets)


def test_morph_and_complete(anon):
    a, b = faces(1, seed=2)[0], faces(1, seed=3)[0]
    frames = anon.morph(a, b, steps=5, identity=2)
    assert frames.shape == (5, 16, 16, 3)
    np.testing.assert_array_equal(frames[0], anon.anonymize(a, 2)[0])  # the ends are the two faces as identity 2
    np.testing.assert_array_equal(frames[-1], anon.anonymize(b, 2)[0])
    with pytest.raises(ValueError, match="steps"):
        anon.morph(a, b, steps=1, identity=0)
    x = faces(2)
    mask = np.zeros((16, 16), bool)
    mask[10:14, 4:12] = True
    filled = anon.complete(x, mask, identities=[0, 1])
    assert filled.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(filled[:, ~mask], x[:, ~mask])  # only the missing pixels change
    assert anon.complete(x, mask).shape == (2, 16, 16, 3)  # identity from D's head
    with pytest.raises(ValueError, match="mask must be"):
        anon.complete(x, np.zeros((8, 8), bool))


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="not a model bundle"):
        Anonymizer.load(str(tmp_path))
    with pytest.raises(ValueError, match="not a model bundle"):
        bundle_info(str(tmp_path / "missing"))


@pytest.mark.slow
def test_bundle_round_trip_through_s3_and_from_a_checkpoint(s3_bucket, tmp_path, anon):
    from pprl.train.checkpoint import save_checkpoint

    trainer = make_trainer()
    save_checkpoint(trainer.state_dict(), f"{s3_bucket}/run/checkpoint.pt")
    info = export_checkpoint(f"{s3_bucket}/run/checkpoint.pt", f"{s3_bucket}/model")
    remote = Anonymizer.load(f"{s3_bucket}/model", device="cpu")
    local_dir = str(tmp_path / "local")
    export_bundle(trainer, local_dir)
    x = faces(4)
    np.testing.assert_array_equal(remote.anonymize(x, 1), Anonymizer.load(local_dir).anonymize(x, 1))
    assert remote.version == info["version"] and info["step"] == 1


def test_fixture_model_loads_and_renders(trained_model):
    anon = Anonymizer.load(trained_model)
    x = (np.random.default_rng(0).random((2, 64, 64, 3)) * 255).astype(np.uint8)
    assert anon.anonymize(x, [0, 5]).shape == (2, anon.image_size, anon.image_size, 3)
