"""Privacy vs utility evaluation: the paper's scenarios on a trained model, a non-anonymising model that must be
flagged, the report files, the applications, and the pieces (targets, subsample, linkage chance, mouth box)."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pprl import storage
from pprl.cli import main
from pprl.data.dataset import load_dataset
from pprl.evaluate import applications as apps
from pprl.evaluate.attacks import TITLES, same_source_chance, same_source_top1, target_only_rate, verdict_lines
from pprl.evaluate.classifiers import FitSpec, fit, probe_spec, stratified_holdout
from pprl.evaluate.run import run_evaluation
from pprl.evaluate.scenarios import (
    check_compatible,
    identity_link_chance,
    options_for,
    random_targets,
    stratified_subsample,
)


class IdentityAnonymizer:
    """A deliberately non-anonymising "model" with the Anonymizer interface: every image comes back unchanged,
    the latent is the 8x8 downsampled image. The evaluation must flag it."""

    num_expressions = 7
    version = "identity-function"

    def __init__(self, image_size: int = 32, num_identities: int = 6):
        self.image_size, self.num_identities, self.latent_dim = image_size, num_identities, 8 * 8 * 3

    def _prep(self, images) -> np.ndarray:
        images = np.asarray(images, np.uint8)
        images = images[None] if images.ndim == 3 else images
        s = self.image_size
        return np.stack([im if im.shape[0] == s else np.asarray(Image.fromarray(im).resize((s, s), Image.BILINEAR)) for im in images])

    def encode(self, images) -> np.ndarray:
        small = np.stack([np.asarray(Image.fromarray(im).resize((8, 8), Image.BILINEAR)) for im in self._prep(images)])
        return (small.reshape(len(small), -1) / 255.0).astype(np.float32)

    def anonymize(self, images, target_identities, sample: bool = False) -> np.ndarray:
        return self._prep(images)

    def predict_expression(self, images) -> np.ndarray:
        return np.full((len(self._prep(images)), 7), 1 / 7, np.float32)

    def run(self, images, target_identities):
        x = self._prep(images)
        targets = np.broadcast_to(np.asarray(target_identities), (len(x),)).copy()
        return SimpleNamespace(images=x, latents=self.encode(x), expression_probs=self.predict_expression(x), targets=targets)

    def morph(self, a, b, steps: int, identity: int) -> np.ndarray:
        a, b = (self._prep(v)[0].astype(np.float32) for v in (a, b))
        return np.stack([((1 - t) * a + t * b).round().astype(np.uint8) for t in np.linspace(0, 1, steps)])

    def complete(self, images, mask, identities=None) -> np.ndarray:
        return self._prep(images)


def _rows(report: dict) -> dict[tuple[str, str], dict]:
    return {(r["scenario"], r["attacker"]): r for r in report["rows"]}


def _print_rows(report: dict) -> None:
    for r in report["rows"]:
        ident, expr = r["identity_accuracy"], r["expression_accuracy"]
        print(f"{r['scenario']:<22} {r['attacker']:<10} identity {100 * ident:5.1f}%  expression {'   -  ' if expr is None else f'{100 * expr:5.1f}%'}")
    for r in report["linkage"]:
        print(f"linkage {r['attacker']} ({r['feature_space']}): identity top1 {r['identity_top1']:.3f} top5 {r['identity_top5']:.3f}, "
              f"instance top1 {r['instance_top1']:.3f} top5 {r['instance_top5']:.3f}")  # fmt: skip
    for r in report["target_success"]:
        print(f"target success {r['classifier']}: {r['target_success_rate']:.3f} (chance {r['chance']:.3f})")
    print("D expression head on anonymised:", report["d_expression_accuracy"], "| flags:", report["privacy_flags"])
    print("\n".join(verdict_lines(report)))


def _check_attacks(report: dict) -> dict[str, dict]:
    """Every attack of the suite is in the report with its figure, bar and verdict; returns them by name."""
    attacks = {a["name"]: a for a in report["attacks"]}
    assert set(attacks) == set(TITLES)
    for a in attacks.values():
        assert 0 <= a["figure"] <= 1 and 0 < a["bar"] < 1 and a["op"] in ("<=", ">=") and isinstance(a["pass"], bool)
        assert a["pass"] == (a["figure"] <= a["bar"] if a["op"] == "<=" else a["figure"] >= a["bar"])
        assert a["seconds"] >= 0
    assert report["audit"]["passed"] == all(a["pass"] for a in attacks.values())
    return attacks


def _check_report_files(out: str, n_test: int) -> None:
    md = storage.read_text(storage.join(out, "report.md"))
    assert "| Scenario | Identity acc." in md and "Attack 1 (train on originals" in md and "Random guess | 16.7% | 14.3%" in md
    for name in ("privacy_utility.png", "morph.png", "completion.png"):
        with Image.open(io.BytesIO(storage.read_bytes(storage.join(out, name)))) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 64
    fs, path = storage.filesystem(storage.join(out, "predictions.parquet"))
    with fs.open(path, "rb") as f:
        predictions = pd.read_parquet(f)
    assert len(predictions) == n_test
    assert {"source_identity", "expression", "target_identity", "pred.attack-1.paper-cnn.identity", "pred.attack-3.paper-mlp.expression"} <= set(predictions.columns)
    assert (predictions["target_identity"] != predictions["source_identity"]).all()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_identity_function_model_is_flagged(synth_data, s3_bucket):
    """A model that does not anonymise at all: attack 1 must recognise nearly everyone, every privacy attack of the
    suite must miss its bar, and the report says so."""
    out = f"{s3_bucket}/eval-identity"
    # 6 strong epochs and 4 of the inverter (2026-12-02: 12 and 8 before) leave every figure far from its check: the suite's
    # privacy attacks at 95.6-100 % (bars <= 21.7-26.7 %), inversion 98.5 % (>= 90 %); 63 s instead of 87 s on 2 idle cores
    options = options_for("quick", train_limit=600, strong_epochs=6, probe_epochs=100, inverter_epochs=4)
    report, evaluation, _ = run_evaluation(IdentityAnonymizer(32), load_dataset(synth_data), out, options, use_ray=False)
    _print_rows(report)
    attacks = _check_attacks(report)
    assert not any(a["pass"] for a in attacks.values() if a["op"] == "<=") and not report["audit"]["passed"]
    assert attacks["latent-linear"]["figure"] >= 0.9 and attacks["inversion"]["figure"] >= 0.9  # its own inverse
    rows = _rows(report)
    assert rows[("attack-1", "paper-cnn")]["identity_accuracy"] >= 0.90
    assert rows[("attack-2", "paper-cnn")]["identity_accuracy"] >= 0.90
    assert any(flag.startswith("attack-1 (paper-cnn)") for flag in report["privacy_flags"])
    link = next(r for r in report["linkage"] if r["feature_space"] == "attack-1")
    assert link["instance_top5"] > 0.5 and link["identity_top1"] >= 0.9  # the "anonymised" image is its own original
    assert report["target_success"][0]["target_success_rate"] < 0.05  # targets are never the source, so never "hit"
    saved = json.loads(storage.read_text(f"{out}/report.json"))
    assert saved["model"]["version"] == "identity-function" and saved["data"]["n_train_used"] < saved["data"]["n_train"]
    _check_report_files(out, len(evaluation.predictions))
    assert "## Attack suite (the privacy audit)" in storage.read_text(f"{out}/report.md")


@pytest.mark.slow
def test_strict_exits_non_zero_when_an_attack_fails_and_the_audit_is_attached(tiny_bundle, small_data, tmp_path):
    """An untrained model keeps no expression: `--strict` fails, the report is still written, the audit is attached
    to the bundle and the latent gate reads it as failed."""
    import shutil

    from pprl.train.export import latent_gate, read_audit

    model, out = str(tmp_path / "bundle"), str(tmp_path / "report")
    shutil.copytree(tiny_bundle, model)
    args = ["evaluate", "--model", model, "--data", small_data, "--out", out, "--profile", "quick", "--no-ray",
            "--no-applications", "--epochs", "2", "--strong-epochs", "3", "--patience", "1", "--probe-epochs", "20",
            "--inverter-epochs", "3", "--expression-judges", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as exited:
        main([*args, "--strict"])
    assert exited.value.code == 1
    report = json.loads(storage.read_text(storage.join(out, "report.json")))
    attacks = _check_attacks(report)
    assert not attacks["expression-attack-1"]["pass"] and not report["audit"]["passed"]
    assert len(attacks["expression-attack-1"]["judges"]) == 2
    audit = read_audit(model)
    assert audit["passed"] is False and audit["model_version"] == report["model"]["version"]
    assert {a["name"] for a in audit["attacks"]} == set(TITLES)
    assert audit["data"]["manifest_sha256"] == report["data"]["manifest_sha256"]
    assert latent_gate(model).audit == "failed" and not latent_gate(model).exported
    main([*args, "--no-attach-audit", "--no-attack-suite", "--no-strong"])  # without --strict: exit 0
    assert read_audit(model)["created"] == audit["created"]  # and --no-attach-audit leaves the bundle alone


@pytest.mark.slow
def test_trained_model_hides_identity_keeps_expression(trained_model, synth_data, ray_head, tmp_path, monkeypatch, capsys):
    """The done-when numbers on the cpu-quick model, through the CLI, with every classifier a Ray task on a real cluster."""
    monkeypatch.setenv("RAY_ADDRESS", ray_head["address"])
    out = str(tmp_path / "report")
    args = ["--model", trained_model, "--data", synth_data, "--out", out, "--profile", "quick", "--no-attach-audit"]
    main(["evaluate", *args])
    printed = capsys.readouterr().out
    report = json.loads(storage.read_text(storage.join(out, "report.json")))
    with capsys.disabled():
        print()
        _print_rows(report)
    assert "| Attack 3 (the exported latent, MLP) |" in printed
    rows = _rows(report)
    unconstrained = rows[("privacy-unconstrained", "paper-cnn")]
    assert unconstrained["identity_accuracy"] >= 0.98 and unconstrained["expression_accuracy"] >= 0.95
    assert rows[("attack-1", "paper-cnn")]["identity_accuracy"] <= 0.30
    assert rows[("attack-3", "paper-mlp")]["identity_accuracy"] <= 0.30
    assert {("attack-2", "paper-cnn"), ("attack-1", "resnet"), ("attack-2", "resnet"), ("attack-3", "mlp-deep")} <= set(rows)
    _check_report_files(out, report["data"]["n_test"])
    attacks = _check_attacks(report)
    # every privacy attack of the suite meets its bar on the model users get (the identity erasers, docs/model.md);
    # attack-1 expression (the mean of 5 expression judges: one judge's figure moves by up to 11 points from judge seed
    # to judge seed on the same renders; docs/evaluation.md, "Per seed") is held to the paper's 85 %, not the suite's 90 %
    assert [name for name, a in attacks.items() if not a["pass"] and name != "expression-attack-1"] == []
    judged = attacks["expression-attack-1"]
    assert judged["figure"] >= 0.85, judged  # expression on anonymised images
    assert all(t["target_success_rate"] >= 0.90 for t in report["target_success"])  # the output shows the target
    assert report["audit"]["latent_kind"] == "canonical_reencoding:3x:identity_0+leace_identity"
    assert judged["judges"][0] == rows[("attack-1", "paper-cnn")]["expression_accuracy"] and len(judged["judges"]) == 5
    assert judged["figure"] == pytest.approx(np.mean(judged["judges"])) and judged["worst_judge"] == min(judged["judges"])
    assert "privacy audit:" in printed


@pytest.mark.slow
def test_morph_and_complete_commands(trained_model, synth_data, tmp_path):
    main(["morph", "--model", trained_model, "--data", synth_data, "--out", str(tmp_path / "m.png"), "--steps", "5"])
    with Image.open(tmp_path / "m.png") as im:
        assert im.width > 6 * im.height  # a | 5 steps | b in one row
    main(["complete", "--model", trained_model, "--data", synth_data, "--out", str(tmp_path / "c.png"), "--count", "3"])
    with Image.open(tmp_path / "c.png") as im:
        assert im.height > 2.5 * im.width / 3  # three rows of original | masked | completed


# ------------------------------------------------------------------------------------------------ pieces


def test_random_targets_avoid_the_source_unless_allowed():
    rng = np.random.default_rng(0)
    sources = np.repeat(np.arange(6), 500)
    targets = random_targets(sources, 6, rng)
    assert (targets != sources).all() and set(targets) == set(range(6))
    assert np.bincount(targets[sources == 0], minlength=6)[1:].min() > 60  # uniform over the other five
    assert (random_targets(sources, 6, rng, allow_source=True) == sources).mean() > 0.1


def test_stratified_subsample_keeps_every_cell(small_data):
    rows = load_dataset(small_data).split("train")
    sub = stratified_subsample(rows, 100, seed=0)
    assert len(sub) == 100
    assert sub.groupby(["identity", "expression"]).size().min() >= 1
    assert len(stratified_subsample(rows, 0, seed=0)) == len(rows)


def test_linkage_chance_matches_a_random_ranking():
    ids = np.repeat(np.arange(6), 50)
    assert identity_link_chance(ids, 1) == pytest.approx(1 / 6)
    rng = np.random.default_rng(0)
    hits = [(ids[rng.permutation(len(ids))[:5]] == ids[q]).any() for q in rng.integers(0, len(ids), 4000)]
    assert identity_link_chance(ids, 5) == pytest.approx(np.mean(hits), abs=0.03)


def test_linkage_rates_of_a_random_matcher_a_target_matcher_and_a_perfect_one():
    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(6), 100)
    targets = (ids + rng.integers(1, 6, len(ids))) % 6  # never the source, as in the evaluation
    assert same_source_chance(ids) == pytest.approx(99 / 599)
    assert same_source_top1(rng.normal(size=(len(ids), 8)), ids) == pytest.approx(1 / 6, abs=0.05)
    assert same_source_top1(np.eye(6)[ids] + rng.normal(0, 0.1, (len(ids), 6)), ids) == 1.0
    assert target_only_rate(ids, targets) == pytest.approx(1 / 5, abs=0.02)  # a target spreads over the 5 other sources
    by_target = np.eye(6)[targets] + rng.normal(0, 0.01, (len(ids), 6))
    assert same_source_top1(by_target, ids) == pytest.approx(target_only_rate(ids, targets), abs=0.05)


def test_latent_probes_read_a_linearly_hidden_identity_and_stop_early():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(6), 80)
    x = (np.eye(6)[y] @ rng.normal(0, 1, (6, 32)) + rng.normal(0, 1.0, (len(y), 32))) * 50 + 300  # needs standardising
    x = x.astype(np.float32)
    for arch in ("linear", "knn", "mlp-wide"):
        fitted = fit(probe_spec(arch, epochs=400, patience=3), x[::2], y[::2], 6)
        assert (fitted.predict(x[1::2]) == y[1::2]).mean() > 0.9, arch
        assert arch == "knn" or len(fitted.history) < 400  # early stopping, long before the epoch limit


def test_mouth_box_scales_the_authors_box():
    assert apps.mouth_box(64) == (40, 55, 18, 47)
    assert apps.mouth_box(32) == (20, 28, 9, 24)
    assert apps.mouth_mask(128).sum() == (110 - 80) * (94 - 36)


def test_epoch_is_chosen_on_validation_data_only():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 40)
    x = (np.eye(4)[y] * 2 + rng.normal(0, 0.5, (len(y), 4))).astype(np.float32)
    train_idx, val_idx = stratified_holdout(y, 0.1, seed=0)
    assert not set(train_idx) & set(val_idx) and len(val_idx) == 16
    fitted = fit(FitSpec("paper-mlp", epochs=4, batch_size=32), x, y, 4)
    best = max(h["val_accuracy"] for h in fitted.history)
    assert fitted.val_accuracy == pytest.approx(best, abs=1e-4)
    assert fitted.history[fitted.best_epoch - 1]["val_accuracy"] == pytest.approx(best, abs=1e-4)


def test_video_augmentation_rescales_part_of_the_batch_and_halves_colour_resolution():
    import torch

    from pprl.evaluate.classifiers import chroma_420, video_imaging

    def luma(x):
        return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]

    torch.manual_seed(0)
    x = torch.rand(400, 3, 32, 32) * 0.8 - 0.4  # no colour reaches [-1, 1] after 4:2:0, so clamping keeps the luma
    colour = chroma_420(x)
    assert torch.allclose(luma(colour), luma(x), atol=1e-5)  # luma is kept per pixel
    grey = x[:, :1].expand(-1, 3, -1, -1)
    assert torch.allclose(chroma_420(grey), grey, atol=1e-5)
    checker = torch.zeros(1, 3, 8, 8)
    checker[0, 0, ::2, ::2] = checker[0, 0, 1::2, 1::2] = 1  # red and blue alternate pixel by pixel
    checker[0, 2] = 1 - checker[0, 0]
    assert (chroma_420(checker)[:, 0] - luma(chroma_420(checker))).std() < 0.05 * (checker[:, 0] - luma(checker)).std()

    out = video_imaging(x)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    kept_sharp = ((luma(out) - luma(x)).abs().amax(dim=(1, 2)) < 1e-4).float().mean()
    assert 0.2 < kept_sharp < 0.4  # 30 % keep every pixel's luma, the rest are rescaled
    torch.manual_seed(0)
    torch.rand(400, 3, 32, 32)
    assert torch.equal(video_imaging(x), out)  # seeded, like the rest of fit()


def test_bad_inputs_are_refused_with_a_clear_message(small_data):
    with pytest.raises(ValueError, match="unknown classifier arch 'vgg'"):
        FitSpec("vgg")
    with pytest.raises(ValueError, match="unknown augmentation jpeg; use a comma list of geometric, video"):
        FitSpec("paper-cnn", augment="video,jpeg")
    with pytest.raises(ValueError, match="has 8 identities but the dataset"):
        check_compatible(IdentityAnonymizer(32, num_identities=8), load_dataset(small_data))
    with pytest.raises(ValueError, match="unknown evaluation profile"):
        options_for("fast")
    with pytest.raises(ValueError, match="unknown expression 'smile'"):
        apps.expression_index("smile")


def test_judges_score_images_of_any_size_or_tensors(small_data):
    import torch

    from pprl.evaluate.judges import train_judges

    ds = load_dataset(small_data)
    judges = train_judges(ds, size=32, epochs=6, batch_size=32)
    x, ids, exprs = ds.arrays("test", 64)  # 64 px in, resized to the judges' 32
    assert judges.identity_accuracy(x, ids) >= 0.8  # identity is easy on the synthetic faces
    as_tensor = torch.from_numpy(judges.images(x)).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert judges.identity_accuracy(as_tensor, ids) == pytest.approx(judges.identity_accuracy(x, ids), abs=0.02)
    assert 0.0 <= judges.expression_accuracy(x, exprs) <= 1.0
    with pytest.raises(ValueError, match="expected uint8 images"):
        judges.identity_accuracy(x.astype(np.float32), ids)
    side_by_side = train_judges(ds, size=32, epochs=6, batch_size=32, processes=2)  # two spawned processes
    assert (side_by_side.predict_identity(x) == judges.predict_identity(x)).all()
    assert (side_by_side.predict_expression(x) == judges.predict_expression(x)).all()
    assert side_by_side.expression.history == judges.expression.history
