"""Foundation: the synthetic dataset is learnable and its factors independent; the format round-trips; bad input is refused."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch import nn

from pprl import storage
from pprl.data.dataset import DatasetError, load_dataset, validate_manifest
from pprl.data.generate import SynthSpec, generate
from pprl.data.importers import import_csv, import_ferg, import_mug


def _two_head_cnn(num_ids: int) -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(96 * 16, 128), nn.ReLU(),
            )
            self.identity = nn.Linear(128, num_ids)
            self.expression = nn.Linear(128, 7)

        def forward(self, x):
            h = self.trunk(x)
            return self.identity(h), self.expression(h)

    return Net()


def _tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


@pytest.mark.slow
def test_synthetic_factors_are_visible_and_independent(synth_data):
    """Self-check: identity and expression are both learnable from pixels; identity is not predictable from expression cues."""
    torch.manual_seed(0)
    ds = load_dataset(synth_data)
    x_train, id_train, ex_train = ds.arrays("train", size=32)
    x_test, id_test, ex_test = ds.arrays("test", size=32)
    xt, xv = _tensor(x_train), _tensor(x_test)
    yi, ye = torch.from_numpy(id_train), torch.from_numpy(ex_train)
    net = _two_head_cnn(ds.num_identities)
    epochs, batch = 6, 128  # test accuracy (2026-12-02): 8 epochs identity 99.9 %, expression 98.8 %; 6: 99.9 / 98.3 %; 4: 99.9 / 95.6 %
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(xt) // batch))
    for _epoch in range(epochs):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = perm[i : i + batch]
            logits_id, logits_ex = net(xt[idx])
            loss = nn.functional.cross_entropy(logits_id, yi[idx]) + nn.functional.cross_entropy(logits_ex, ye[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        outs = [net(xv[i : i + 512]) for i in range(0, len(xv), 512)]
    id_acc = (torch.cat([o[0] for o in outs]).argmax(1).numpy() == id_test).mean()
    ex_acc = (torch.cat([o[1] for o in outs]).argmax(1).numpy() == ex_test).mean()

    # Independence: predict identity from the expression cues alone (a logistic regression on the cue vector).
    cue_cols = [c for c in ds.manifest.columns if c.startswith("cue_")]
    train, test = ds.split("train"), ds.split("test")
    ct = torch.tensor(train[cue_cols].to_numpy(np.float32))
    cv = torch.tensor(test[cue_cols].to_numpy(np.float32))
    probe = nn.Sequential(nn.Linear(len(cue_cols), 64), nn.ReLU(), nn.Linear(64, ds.num_identities))
    popt = torch.optim.Adam(probe.parameters(), 1e-2)
    target = torch.from_numpy(train["identity"].to_numpy(np.int64))
    for _ in range(300):
        loss = nn.functional.cross_entropy(probe(ct), target)
        popt.zero_grad()
        loss.backward()
        popt.step()
    cue_id_acc = (probe(cv).argmax(1).numpy() == test["identity"].to_numpy()).mean()
    chance = 1 / ds.num_identities
    print(f"\nself-check: identity {id_acc:.3f}, expression {ex_acc:.3f}, identity-from-cues {cue_id_acc:.3f} (chance {chance:.3f})")
    assert id_acc >= 0.98
    assert ex_acc >= 0.95
    assert cue_id_acc <= chance + 0.05


def test_dataset_format_is_plain_parquet_and_json(small_data):
    table = pq.read_table(f"{small_data}/manifest.parquet")
    df = table.to_pandas()
    assert {"path", "identity", "expression", "split"} <= set(df.columns)
    assert str(table.schema.field("identity").type) == "int32"
    assert set(df["split"]) == {"train", "test"}
    counts = df.groupby(["identity", "expression"]).size()
    assert len(counts) == 42 and counts.nunique() == 1  # fully crossed and balanced
    test_share = (df["split"] == "test").mean()
    assert 0.12 <= test_share <= 0.2
    info = json.loads(Path(small_data, "dataset.json").read_text())
    assert info["expressions"] == ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
    assert info["image_size"] == 64 and info["num_images"] == len(df)
    assert Image.open(f"{small_data}/{df['path'][0]}").size == (64, 64)


def test_generation_is_deterministic_and_scales_to_many_identities(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(str(a), SynthSpec(identities=100, images_per_cell=1, size=32, seed=3), workers=2, progress=False)
    generate(str(b), SynthSpec(identities=100, images_per_cell=1, size=32, seed=3), workers=1, progress=False)
    ma, mb = load_dataset(str(a)).manifest, load_dataset(str(b)).manifest
    pd.testing.assert_frame_equal(ma, mb)
    assert ma["identity"].nunique() == 100
    for path in ma["path"][:20]:
        assert (a / path).read_bytes() == (b / path).read_bytes()


def test_sequences_are_split_whole(tmp_path):
    generate(str(tmp_path), SynthSpec(images_per_cell=0, sequences_per_cell=3, frames_per_sequence=8, size=32), progress=False)
    df = load_dataset(str(tmp_path)).manifest
    assert df.groupby("sequence")["split"].nunique().max() == 1
    assert set(df["split"]) == {"train", "test"}
    assert sorted(df[df["sequence"] == 0]["frame"]) == list(range(8))
    # neutral -> apex -> neutral: the mouth/brow cues peak mid-clip
    clip = df[(df["expression"] == 6)].sort_values(["sequence", "frame"]).groupby("frame")["cue_mouth_open"].mean()
    assert clip.iloc[len(clip) // 2] > clip.iloc[0] + 0.4


def test_synth_writes_to_s3_and_reads_back_with_plain_pyarrow(s3_bucket):
    import pyarrow.fs as pafs

    uri = f"{s3_bucket}/ferg-like"
    generate(uri, SynthSpec(identities=2, images_per_cell=2, size=32), workers=1, progress=False)
    ds = load_dataset(uri)
    assert len(ds.manifest) == 2 * 7 * 2
    images, ids, _ = ds.arrays("train")
    assert images.shape[1:] == (32, 32, 3)
    fs, path = storage.arrow_filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert pq.read_table(f"{path}/manifest.parquet", filesystem=fs).num_rows == 28
    assert json.loads(storage.read_text(f"{uri}/dataset.json"))["num_identities"] == 2


@pytest.mark.parametrize("uri", ["gs://bucket/data", "S3://bucket/data", "s3a://bucket/data", "http://host/data",
                                 "s3:/bucket/one-slash", "File:///tmp/x"])
def test_unsupported_schemes_are_refused_naming_the_supported_ones(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a misspelt URI used to become a folder here
    for use in (storage.exists, storage.read_bytes, lambda u: storage.write_text(u, "x"), storage.filesystem,
                storage.arrow_filesystem, lambda u: storage.join(u, "manifest.parquet"), load_dataset):
        with pytest.raises(storage.UnsupportedURI, match=r"is not supported; use a local path, s3://\.\.\., file://"):
            use(uri)
    assert not any(tmp_path.iterdir())


def test_supported_uris_still_resolve(tmp_path):
    for uri in (str(tmp_path / "a"), f"file://{tmp_path}/b", "relative/path"):
        assert storage.scheme(uri) in ("local", "file")
    storage.write_text(f"file://{tmp_path}/b/x.txt", "ok")
    assert storage.read_text(str(tmp_path / "b" / "x.txt")) == "ok"
    assert storage.scheme("s3://bucket/key") == "s3"


def test_unreachable_s3_endpoint_fails_fast_naming_it(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    with pytest.raises(storage.StorageError, match="127.0.0.1:9"):
        load_dataset("s3://nowhere/data")


def test_a_missing_bucket_fails_at_once_naming_it_and_what_to_check(s3_server, s3_bucket):
    missing = f"{s3_bucket}-gone"
    name = missing.removeprefix("s3://")
    calls = [lambda: storage.list_files(f"{missing}/in"), lambda: storage.read_bytes(f"{missing}/a.png"),
             lambda: storage.write_text(f"{missing}/out/a.txt", "x"), lambda: storage.read_parquet(f"{missing}/i.parquet"),
             lambda: load_dataset(f"{missing}/data")]
    for call in calls:
        with pytest.raises(storage.StorageError, match=rf"bucket '{name}' does not exist at {s3_server}.*AWS_ENDPOINT_URL_S3"):
            call()
    with pytest.raises(storage.StorageError, match="no such file"):  # a missing key in a bucket that exists stays that
        storage.read_bytes(f"{s3_bucket}/a.png")
    # moto does not enforce credentials: s3fs's PermissionError (S3's AccessDenied) goes through the same translation
    denied = pytest.raises(storage.StorageError, match=rf"access to bucket '{name}' denied.*AWS_SECRET_ACCESS_KEY")
    with denied, storage._s3_faults(f"{missing}/a.png"):
        raise PermissionError("Access Denied")
    # what is left after the clients' retries (s3fs's OSError for SlowDown) names the object and says it was retried
    throttled = pytest.raises(storage.StorageError, match=rf"{s3_bucket}/a.png: .*reduce your request rate.*kept failing through the retries")
    with throttled, storage._s3_faults(f"{s3_bucket}/a.png"):
        raise OSError(errno.EBUSY, "Please reduce your request rate.")


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda df: df.drop(columns=["expression"]), "missing column"),
        (lambda df: df.assign(expression=df["expression"].where(df.index != 3, 9)), "expression=9 at row 3"),
        (lambda df: df.assign(path=df["path"].where(df.index != 2, "../../etc/passwd")), "escapes the dataset root"),
        (lambda df: df.assign(split=df["split"].where(df.index != 1, "val")), "split='val'"),
    ],
)
def test_malformed_manifest_is_refused_with_the_problem(small_data, mutate, message):
    df = load_dataset(small_data).manifest
    with pytest.raises(DatasetError, match=message):
        validate_manifest(mutate(df.copy()), {"num_identities": 6}, where="m.parquet")


def test_manifest_write_is_atomic_and_last(tmp_path, monkeypatch):
    """A crash while writing images leaves no manifest naming missing files."""
    calls = {"n": 0}
    real_write = storage.write_bytes

    def flaky(uri, data):
        calls["n"] += 1
        if calls["n"] == 30:
            raise OSError("disk full")
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    with pytest.raises(OSError):
        generate(str(tmp_path), SynthSpec(identities=2, images_per_cell=4, size=32), workers=1, progress=False)
    assert not (tmp_path / "manifest.parquet").exists()
    assert not list(tmp_path.rglob("*.tmp"))


def _png(path, size=(40, 48), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = (200, 30, 30, 0) if mode == "RGBA" else (200, 30, 30)
    Image.new(mode, size, color).save(path)


def test_import_ferg_layout_composites_alpha_on_white_and_skips_bad_files(tmp_path):
    src = tmp_path / "FERG_DB_256"
    for character in ("aia", "bonnie"):
        for expr in ("anger", "joy", "neutral"):
            for k in range(4):
                _png(src / character.capitalize() / f"{character}_{expr}" / f"{character}_{expr}_{k}.png", mode="RGBA")
    bad = src / "Aia" / "aia_joy" / "aia_joy_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    result = import_ferg(str(src), str(tmp_path / "out"), size=32)
    assert result.imported == 24
    assert len(result.skipped) == 1 and "aia_joy_broken.png" in result.skipped[0][0]
    ds = load_dataset(str(tmp_path / "out"))
    assert ds.info["identity_names"] == ["Aia", "Bonnie"]
    assert set(ds.manifest["expression"]) == {0, 3, 4}
    pixels = ds.load_images(ds.manifest.head(1))
    assert pixels.shape == (1, 32, 32, 3) and pixels.min() == 255  # transparent -> white
    with pytest.raises(DatasetError, match="aia_joy_broken.png"):
        import_ferg(str(src), str(tmp_path / "strict"), size=32, strict=True)


def test_import_mug_splits_whole_takes(tmp_path):
    src = tmp_path / "mug"
    for subject in ("001", "002"):
        for expr in ("happiness", "surprise", "neutral"):
            for take in ("take000", "take001", "take002", "take003"):
                for frame in range(3):
                    _png(src / subject / expr / take / f"img_{frame:04d}.jpg".replace(".jpg", ".png"))
    import_mug(str(src), str(tmp_path / "out"), size=32)
    df = load_dataset(str(tmp_path / "out")).manifest
    assert len(df) == 2 * 3 * 4 * 3
    assert df.groupby("sequence")["split"].nunique().max() == 1
    assert set(df["expression"]) == {3, 4, 6}  # happiness -> joy


def test_import_csv_and_its_errors(tmp_path):
    src = tmp_path / "imgs"
    rows = []
    for i in range(12):
        _png(src / f"f{i}.png")
        rows.append({"path": f"f{i}.png", "identity": i % 2, "expression": ["joy", "anger", "3"][i % 3]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    result = import_csv(str(src), str(tmp_path / "labels.csv"), str(tmp_path / "out"), size=32)
    assert result.imported == 12
    pd.DataFrame([{"path": "../x.png", "identity": 0, "expression": 0}]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DatasetError, match="escapes"):
        import_csv(str(src), str(tmp_path / "bad.csv"), str(tmp_path / "o2"))
    pd.DataFrame([{"path": "f0.png", "identity": 0, "expression": "smirk"}]).to_csv(tmp_path / "bad2.csv", index=False)
    with pytest.raises(DatasetError, match="smirk"):
        import_csv(str(src), str(tmp_path / "bad2.csv"), str(tmp_path / "o3"))


def test_cli_help_explains_every_data_command():
    from typer.testing import CliRunner

    from pprl.cli import app

    runner = CliRunner()
    for args in (["--help"], ["data", "--help"], ["data", "synth", "--help"], ["data", "import-ferg", "--help"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output
