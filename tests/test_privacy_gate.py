"""The privacy gate: serving, batch jobs and footage export the latent only from a bundle whose privacy audit passed,
say why when they leave it out, and record the operator's override.

The gate's job is to obey the audit, so these tests write passing or failing audit records into copies of the
tiny bundle (``tiny_bundle``) and check what each output carries.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pprl import storage
from pprl.footage import testclips
from pprl.footage.detect import DetectorSpec
from pprl.footage.pipeline import FootageOptions, anonymize_footage
from pprl.serve import schema
from pprl.train.export import AUDIT, AUDIT_FORMAT, ENCODER_MEAN, bundle_info, latent_gate, write_audit

CASES = {  # case: (audit written, override) -> (latent exported, audit status, override recorded)
    "no audit": ((None, False), (False, "missing", False)),
    "failed audit": ((False, False), (False, "failed", False)),
    "passed audit": ((True, False), (True, "passed", False)),
    "override": ((False, True), (True, "failed", True)),
}


def audited_copy(bundle: str, dest, passed: bool | None, version: str | None = None, kind: str | None = None,
                 eraser: str | None = None) -> str:  # fmt: skip
    """A copy of ``bundle`` with an audit that passed or failed (None: no audit), of ``version``, latent ``kind`` and
    erasers' hash ``eraser`` (default: its own)."""
    out = str(dest / "bundle")
    shutil.copytree(bundle, out)
    if passed is not None:
        write_audit(
            out,
            {
                "format": AUDIT_FORMAT,
                "model_version": version or bundle_info(out)["version"],
                "latent_kind": kind or latent_gate(out).kind,
                "eraser_sha256": bundle_info(out)["eraser"]["sha256"] if eraser is None else eraser,
                "passed": passed,
                "attacks": [{"name": "latent-mlp", "figure": 0.91, "bar": 0.217, "op": "<=", "pass": passed}],
                "created": "2026-12-01T00:00:00+00:00",
            },
        )
    return out


def check_record(record: dict, expected: tuple[bool, str, bool]) -> None:
    exported, status, override = expected
    assert record["latent_kind"] == "canonical_reencoding:3x:identity_0+leace_identity"  # cpu-quick's (model.latent_cycles, erase_identity)
    assert (record["latent_exported"], record["audit"], record["override"]) == expected
    if not exported:
        assert record["note"].startswith("latent withheld") and "--export-unaudited-latent" in record["note"]
    if override:
        assert "WITHOUT a passing privacy audit" in record["note"]


def test_gate_reads_the_audit_of_these_weights_only(tiny_bundle, tmp_path):
    for name, ((passed, override), expected) in CASES.items():
        (tmp_path / name).mkdir()
        check_record(latent_gate(audited_copy(tiny_bundle, tmp_path / name, passed), override).record(), expected)
    (tmp_path / "stale").mkdir()
    stale = audited_copy(tiny_bundle, tmp_path / "stale", True, version="cpu-quick-s999-00000000")
    assert (
        latent_gate(stale).record()["audit"] == "stale" and not latent_gate(stale).exported
    )  # a passing audit of other weights
    (tmp_path / "other-latent").mkdir()
    other = audited_copy(tiny_bundle, tmp_path / "other-latent", True, kind=ENCODER_MEAN)
    assert latent_gate(other).audit == "stale" and not latent_gate(other).exported  # it attacked another latent
    (tmp_path / "other-eraser").mkdir()
    refitted = audited_copy(tiny_bundle, tmp_path / "other-eraser", True, eraser="0" * 64)
    assert latent_gate(refitted).audit == "stale" and "other identity erasers" in latent_gate(refitted).note
    (tmp_path / "bad").mkdir()
    bad = audited_copy(tiny_bundle, tmp_path / "bad", None)
    storage.write_text(storage.join(bad, AUDIT), "{not json")
    assert latent_gate(bad).audit == "invalid" and not latent_gate(bad).exported
    with pytest.raises(ValueError, match="missing model_version"):
        write_audit(
            bad, {"format": AUDIT_FORMAT, "latent_kind": ENCODER_MEAN, "passed": True, "attacks": [], "created": "x"}
        )


@pytest.mark.parametrize("case", list(CASES))
def test_serve_details_carry_the_latent_only_through_the_gate(tiny_bundle, tmp_path, caplog, case):
    from pprl.serve.app import ModelDeployment, latent_fields

    (passed, override), expected = CASES[case]
    with caplog.at_level(logging.WARNING, logger="pprl"):
        replica = ModelDeployment.func_or_class(
            audited_copy(tiny_bundle, tmp_path, passed), "cpu", 4, 0.01, override
        )
    size = replica.model.image_size
    assert len([r for r in caplog.records if "latent" in r.getMessage()]) == (0 if case == "passed audit" else 1)
    out = replica.outputs(replica.model.run(np.full((1, size, size, 3), 100, np.uint8), [2]))[0]  # what anonymize() returns
    fields = latent_fields(out, replica.info()["latent"])
    assert ("latent" in fields) == expected[0] and ("latent" in out) == expected[0]
    if expected[0]:
        assert len(fields["latent"]) == replica.info()["latent_dim"]
    check_record({"latent_kind": fields["latent_kind"], **fields["latent_audit"]}, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_batch_part_files_carry_the_latent_only_through_the_gate(tiny_bundle, tmp_path, case):
    from pprl.serve.batch import AnonymizeActor, write_part

    (passed, override), expected = CASES[case]
    model = audited_copy(tiny_bundle, tmp_path, passed)
    gate, info = latent_gate(model, override), bundle_info(model)
    size = int(info["image_size"])
    pixels = [np.full((size, size, 3), 40 * i, np.uint8).tobytes() for i in range(3)]
    block = pa.table(
        {
            "source_uri": [f"/in/{i}.png" for i in range(3)],
            "target_identity": [0, 1, 2],
            "pixels": pixels,
            "error": pa.array([None, None, None], pa.string()),
            "input_image": pa.array([None] * 3, pa.binary()),
        }
    )
    written = write_part(
        AnonymizeActor(model, "cpu", gate.exported)(block), str(tmp_path / "out"), "run", gate.record()
    )
    table = pq.read_table(written.column("part")[0].as_py())
    latents = table.column("latent").to_pylist()
    assert all(v is not None and len(v) == info["latent_dim"] for v in latents) if expected[0] else all(v is None for v in latents)
    check_record(schema.latent_record(table.schema), expected)
    assert table.schema.equals(schema.RESULT_SCHEMA)  # same columns and types: only the file metadata is added


@pytest.mark.parametrize("case", list(CASES))
def test_footage_faces_carry_the_latent_only_through_the_gate(tiny_bundle, tmp_path, caplog, case):
    (passed, override), expected = CASES[case]
    spec = testclips.ClipSpec(faces=2, frames=12, width=128, height=128, tile=56)
    testclips.synthetic_clip(str(tmp_path / "in" / "a.mp4"), spec, sidecar=str(tmp_path / "boxes" / "a.parquet"))
    options = FootageOptions(
        model=audited_copy(tiny_bundle, tmp_path, passed),
        detector=DetectorSpec.parse(f"sidecar:{tmp_path / 'boxes'}"),
        export_unaudited_latent=override,
    )
    with caplog.at_level(logging.WARNING, logger="pprl"):
        summary = anonymize_footage(str(tmp_path / "in"), str(tmp_path / "out"), options, num_workers=0, progress=False)
    assert list(summary.index.status) == ["done"]
    assert len([r for r in caplog.records if "latent" in r.getMessage()]) == (0 if case == "passed audit" else 1)
    faces_file = tmp_path / "out" / "a.mp4.faces.parquet"
    faces = pd.read_parquet(faces_file)
    assert len(faces) > 0 and (faces.latent.notna().all() if expected[0] else faces.latent.isna().all())
    check_record(schema.latent_record(pq.read_schema(faces_file)), expected)
    assert json.loads(pq.read_metadata(faces_file).metadata[b"pprl.footage.summary"])["status"] == "done"
