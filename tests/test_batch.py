"""Batch anonymisation: the Parquet schema, the request checks shared with the server, and `pprl anonymize-images`
running the Ray Data pipeline on the shared local cluster (no HTTP)."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pprl import storage
from pprl.serve import schema
from pprl.serve.security import (
    Rejected,
    check_allowed,
    check_image_header,
    decode_checked,
    parse_target,
    pseudonym_identity,
)


def png_bytes(side: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def png_bomb(side: int = 20000) -> bytes:
    """A valid PNG header claiming side x side pixels, with 1 MiB of zlib-compressed zeros as data: ~1 KB on the wire."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 2**20, 9)) + chunk(b"IEND", b"")


# --- schema ----------------------------------------------------------------------------------------------------


def test_schema_rows_round_trip_through_parquet_with_exact_types(tmp_path):
    ok = {
        "source_uri": "s3://b/a.png",
        "face_index": 0,
        "image": png_bytes(8),
        "target_identity": 3,
        "expression": "joy",
        "expression_probs": [0.1] * 7,
        "latent": [0.5, -0.5],
        "model_version": "v1",
        "error": None,
    }
    bad = schema.error_row("s3://b/bad.png", "s3://b/bad.png: cannot decode image", model_version="v1")
    uri = str(tmp_path / "part.parquet")
    storage.write_parquet(schema.to_table([ok, bad]), uri)
    table = pq.read_table(uri)
    schema.check_schema(table.schema, uri)
    assert table.schema.field("expression_probs").type == pa.list_(pa.float32())
    assert table.schema.field("latent").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert rows[0]["error"] is None and rows[0]["target_identity"] == 3 and rows[0]["input_image"] is None
    assert rows[1]["image"] is None and rows[1]["latent"] is None and "cannot decode" in rows[1]["error"]
    with pytest.raises(ValueError, match="missing column 'latent'"):
        schema.check_schema(table.drop(["latent"]).schema, "x.parquet")
    with pytest.raises(ValueError, match="clash"):
        schema.result_schema([pa.field("image", pa.string())])


# --- request checks ----------------------------------------------------------------------------------------------


def test_image_checks_reject_bombs_garbage_truncation_and_mislabels_before_decoding():
    assert check_image_header(png_bytes(), max_pixels=10_000, declared_type="image/png") == "PNG"
    assert decode_checked(png_bytes(48), size=32, max_pixels=10_000).shape == (32, 32, 3)
    cases = [
        (png_bomb(), "image/png", 413, "decompression-bomb guard"),
        (png_bomb(5000), "image/png", 413, "5000x5000 = 25000000 pixels; the limit is 10000"),
        (b"", "image/png", 400, "empty"),
        (os.urandom(2000), "image/png", 422, "not a readable PNG or JPEG"),
        (png_bytes()[:300], "image/png", 422, "truncated"),
        (png_bytes(), "image/jpeg", 415, "is a PNG"),
    ]
    for data, declared, status, message in cases:
        with pytest.raises(Rejected) as caught:
            decode_checked(data, size=32, max_pixels=10_000, declared_type=declared)
        assert caught.value.status == status and message in caught.value.message, (status, caught.value.message)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    with pytest.raises(Rejected, match="not a readable PNG or JPEG"):
        check_image_header(gif.getvalue(), max_pixels=10_000)


def test_targets_index_random_and_keyed_pseudonyms():
    secret = b"server-secret"
    assert parse_target("4", 6, secret) == 4
    assert all(0 <= parse_target("random", 6, secret) < 6 for _ in range(50))
    assert parse_target("random", 6, secret, random_key="s3://b/x.png") == parse_target("random", 6, secret, random_key="s3://b/x.png")
    keys = [f"person-{i}" for i in range(60)]
    mapped = [parse_target(f"pseudonym:{k}", 6, secret) for k in keys]
    assert mapped == [pseudonym_identity(k, secret, 6) for k in keys]  # stable
    assert len(set(mapped)) == 6  # spread over every identity
    assert mapped != [pseudonym_identity(k, b"another-secret", 6) for k in keys]  # keyed: the secret matters
    for spec, message in (("6", "out of range"), ("-1", "out of range"), ("bob", "expected an index"), ("pseudonym:", "needs a key")):
        with pytest.raises(Rejected, match=message):
            parse_target(spec, 6, secret)


def test_allow_list_resolves_traversal_symlinks_and_lookalike_buckets(tmp_path):
    allowed_dir = tmp_path / "allowed"
    (allowed_dir / "in").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    (allowed_dir / "escape").symlink_to(tmp_path / "secret")
    allowed = [str(allowed_dir), "s3://data/incoming"]
    assert check_allowed(str(allowed_dir / "in"), allowed, "input") == str(allowed_dir / "in")
    assert check_allowed("s3://data/incoming/day1/", allowed, "input") == "s3://data/incoming/day1"
    refused = [
        (str(allowed_dir / "in" / ".." / ".." / "secret"), 403),
        (str(allowed_dir / "escape"), 403),
        ("/etc", 403),
        ("s3://data/incoming-evil/x", 403),
        ("s3://data/incoming/../private", 400),
        ("http://example.com/x", 400),
    ]
    for uri, status in refused:
        with pytest.raises(Rejected) as caught:
            check_allowed(uri, allowed, "input")
        assert caught.value.status == status, uri
    with pytest.raises(Rejected, match="disabled"):
        check_allowed(str(allowed_dir), [], "output")


def test_every_registered_job_kind_resolves_to_a_runner():
    from pprl.serve.jobs import JOB_KINDS, resolve_runner

    assert {"images", "footage"} <= set(JOB_KINDS)
    assert all(callable(resolve_runner(kind)) for kind in JOB_KINDS)
    with pytest.raises(Rejected, match="unknown job kind 'nope'; available: footage, images"):
        resolve_runner("nope")


def test_parts_become_visible_only_when_published_and_never_after_a_cancel(tmp_path):
    """What a part-writing task leaves is hidden until the driver publishes it; once request_cancel() has returned,
    publish() refuses, and remove_unpublished() clears the run's hidden files (pending parts, cut-short writes)."""
    from pprl.serve.batch import Progress, done_sources, remove_unpublished, write_part
    from pprl.train.export import ENCODER_MEAN, LatentGate

    out, latent = str(tmp_path / "out"), LatentGate(False, ENCODER_MEAN, "missing", False, "no bundle in this test").record()
    rows = [schema.error_row(f"s3://b/{i}.png", "unreadable", model_version="v1") for i in range(3)]

    def written(run: str) -> tuple[str, int, int]:
        summary = write_part(schema.to_table(rows), out, run, latent).to_pylist()[0]
        return summary["part"], summary["rows"], summary["errors"]

    progress = Progress()
    first = written("run1")
    assert storage.list_files(out, (".parquet",)) == [] and done_sources(out) == set()  # hidden until published
    assert progress.publish(*first)
    assert storage.list_files(out, (".parquet",)) == progress.parts and len(done_sources(out)) == 3
    second = written("run1")
    (tmp_path / "out" / f".{Path(second[0]).name}.tmp").write_bytes(b"half")  # a write cut short by a kill
    other_run = written("run2")
    progress.request_cancel()
    assert not progress.publish(*second) and progress.to_dict() == {**progress.to_dict(), "done": 0, "failed": 3, "parts": 1}
    remove_unpublished(out, "run1")
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left == sorted([Path(progress.parts[0]).name, Path(other_run[0]).name])  # another run's files are its own


@pytest.mark.slow
def test_a_closed_fence_lets_no_write_in_and_the_driver_waits_out_the_writes_inside(ray_head, tmp_path):
    """Ray Data's shutdown does not wait for its tasks: the job's WriteFence is what makes a cancelled job clear its
    unpublished parts only after the last write has ended, and keeps writes from starting after that."""
    import ray

    from pprl.serve.batch import WriteFence, remove_unpublished, wait_for_writes, write_part
    from pprl.train.export import ENCODER_MEAN, LatentGate

    out, latent = str(tmp_path / "out"), LatentGate(False, ENCODER_MEAN, "missing", False, "no bundle in this test").record()
    table = schema.to_table([schema.error_row("s3://b/0.png", "unreadable", model_version="v1")])
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head["address"])
    try:
        fence = ray.remote(num_cpus=0)(WriteFence).remote()
        assert write_part(table, out, "run1", latent, fence).num_rows == 1  # open: written
        assert ray.get(fence.enter.remote())  # a write in flight when the job is cancelled
        threading.Timer(1.0, lambda: ray.get(fence.leave.remote())).start()
        started = time.monotonic()
        wait_for_writes(fence)
        assert time.monotonic() - started >= 0.9  # waited until it left
        late = write_part(table, out, "run1", latent, fence)
        assert late.num_rows == 0 and late.schema.names == ["part", "rows", "errors"]  # closed: nothing written
        remove_unpublished(out, "run1")
        assert list((tmp_path / "out").iterdir()) == []
    finally:
        ray.shutdown()


# --- the pipeline without HTTP -----------------------------------------------------------------------------------


def run_cli(main, args: list[str], capsys) -> dict:
    """Run a `pprl` command to completion; return the JSON summary it prints last."""
    main(args)  # returns on success; a failure exits non-zero
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.slow
def test_anonymize_images_cli_over_a_dataset_manifest_stores_inputs_on_request_and_resumes(ray_head, trained_model, tmp_path, capsys):
    import ray

    from pprl.cli import main
    from pprl.data.generate import SynthSpec, generate

    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    generate(data, SynthSpec(images_per_cell=1, seed=3), progress=False)  # 6 identities x 7 expressions = 42 images
    manifest = pq.read_table(f"{data}/manifest.parquet").to_pandas()
    args = ["anonymize-images", "--input", f"{data}/manifest.parquet", "--output", out, "--model", trained_model]
    args += ["--identity", "pseudonym:album-7", "--batch-size", "16", "--store-inputs"]
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head["address"])
    try:
        first = run_cli(main, args, capsys)
        parts = storage.list_files(out, (".parquet",))
        second = run_cli(main, args, capsys)
        override = str(tmp_path / "override")
        run_cli(main, [*args[:4], override, *args[5:], "--export-unaudited-latent"], capsys)
    finally:
        ray.shutdown()
    assert first == {"output": out, "total": 42, "skipped": 0, "done": 42, "failed": 0, "parts": len(parts)}
    rows = [r for p in parts for r in pq.read_table(p).to_pylist()]
    assert sorted(r["source_uri"] for r in rows) == sorted(f"{data}/{p}" for p in manifest["path"])
    assert len({r["target_identity"] for r in rows}) == 1  # one pseudonym -> one avatar for the whole album
    for row in rows[:5]:
        assert row["input_image"] == storage.read_bytes(row["source_uri"])  # asked for, so stored verbatim
        assert Image.open(io.BytesIO(row["image"])).format == "PNG" and row["error"] is None
    assert second == {"output": out, "total": 42, "skipped": 42, "done": 0, "failed": 0, "parts": 0}
    assert storage.list_files(out, (".parquet",)) == parts
    assert all(r["latent"] is None for r in rows)  # CI's model has no privacy audit: the latent column stays null
    assert {schema.latent_record(pq.read_schema(p))["audit"] for p in parts} == {"missing"}
    overridden = storage.list_files(override, (".parquet",))
    assert all(len(r["latent"]) == 64 for p in overridden for r in pq.read_table(p).to_pylist())  # the operator's choice
    assert all(schema.latent_record(pq.read_schema(p))["override"] for p in overridden)  # and it says so


@pytest.mark.slow
def test_a_killed_images_job_driver_is_resumed_with_every_image_exactly_once(ray_head, tiny_bundle, tmp_path):
    """``pprl anonymize-images`` over 2,000 images, killed with SIGKILL once a number of parts drawn at random is
    published; the rerun does exactly the images not in a published part, leaves those parts untouched and removes
    what the killed driver had written but not published."""
    import random
    import signal
    import subprocess
    import sys

    import ray

    from pprl.serve.batch import JobRequest, run_images_job

    sources = set()
    for i in range(2000):
        path = tmp_path / "in" / f"shelf{i % 8}" / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not a png at all" if i % 400 == 7 else png_bytes(16, seed=i))
        sources.add(str(path))
    out = tmp_path / "out"
    kill_after = random.Random(11).randint(2, 15)
    cmd = [sys.executable, "-m", "pprl", "anonymize-images", "--input", str(tmp_path / "in"), "--output", str(out),
           "--model", tiny_bundle, "--batch-size", "100", "--address", ray_head["address"]]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list(out.glob("part-*.parquet"))) < kill_after:
        assert driver.poll() is None, f"the job ended before it could be killed: {driver.stderr.read()[-2000:]}"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    published = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    done_before = {r for p in published for r in pq.read_table(p, columns=["source_uri"]).column("source_uri").to_pylist()}
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head["address"])
    try:
        progress = run_images_job(JobRequest(input=str(tmp_path / "in"), output=str(out), model_uri=tiny_bundle, batch_size=100))
    finally:
        ray.shutdown()
    assert (progress.total, progress.skipped) == (2000, len(done_before)) and 0 < len(done_before) < 2000
    assert progress.done + progress.failed == 2000 - len(done_before)
    assert {p: p.stat().st_mtime_ns for p in published} == published  # nothing published before was rewritten
    rows = [r for p in sorted(out.glob("part-*.parquet")) for r in pq.read_table(p, columns=["source_uri", "error"]).to_pylist()]
    assert sorted(r["source_uri"] for r in rows) == sorted(sources)  # every image exactly once
    assert sum(r["error"] is not None for r in rows) == 5  # the five files that are not PNGs, as error rows
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # the killed driver's unpublished parts are gone
