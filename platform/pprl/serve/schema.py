"""The Parquet schema of anonymised faces, shared by batch jobs (``pprl.serve.batch``) and footage.

One row per face of one source file. A source that could not be processed still gets exactly one row
(``face_index`` 0) whose ``error`` says why, and whose result columns are null: every input is accounted for.

=================  ===================  ==========================================================================
column             type                 meaning
=================  ===================  ==========================================================================
source_uri         string, not null     where the input came from (``s3://...`` or an absolute local path)
face_index         int32, not null      which face of the source (0 for an aligned single-face image)
image              binary               the anonymised face as PNG bytes (model's size); null on error
target_identity    int32                identity index the face was rendered as; null on error
expression         string               predicted expression label (one of ``pprl.config.EXPRESSIONS``)
expression_probs   list<float32>        probability per label, in ``EXPRESSIONS`` order
latent             list<float32>        the encoder's latent mean; null unless the bundle's privacy audit passed (or
                                        the operator overrode the gate): the file metadata ``pprl.latent`` says which
model_version      string               ``Anonymizer.version`` of the model bundle that produced the row
error              string               null on success; otherwise what went wrong, naming the file
input_image        binary               the original input bytes, only when the job asked for them (else null)
=================  ===================  ==========================================================================

Extra per-kind columns (footage adds frame numbers and boxes) go after these: see ``result_schema(extra)``.
Every file's key-value metadata ``pprl.latent`` is the JSON of ``pprl.train.export.LatentGate.record()``: the latent's
kind (``encoder_mean``), whether it was exported, the audit status, any override, and why.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

FACE_FIELDS: tuple[pa.Field, ...] = (
    pa.field("source_uri", pa.string(), nullable=False, metadata={"doc": "input location"}),
    pa.field("face_index", pa.int32(), nullable=False, metadata={"doc": "face number within the source"}),
    pa.field("image", pa.binary(), metadata={"doc": "anonymised face, PNG bytes"}),
    pa.field("target_identity", pa.int32(), metadata={"doc": "identity index rendered"}),
    pa.field("expression", pa.string(), metadata={"doc": "predicted expression label"}),
    pa.field("expression_probs", pa.list_(pa.float32()), metadata={"doc": "probabilities in EXPRESSIONS order"}),
    pa.field("latent", pa.list_(pa.float32()), metadata={"doc": "encoder latent mean; null unless audited"}),
    pa.field("model_version", pa.string(), metadata={"doc": "model bundle version"}),
    pa.field("error", pa.string(), metadata={"doc": "null on success, else the reason"}),
    pa.field("input_image", pa.binary(), metadata={"doc": "original input bytes, only if requested"}),
)
RESULT_SCHEMA = pa.schema(FACE_FIELDS, metadata={"pprl.schema": "anonymized-faces/v1"})
LATENT_META = b"pprl.latent"  # file metadata: which latent the `latent` column carries, or why it is null


def with_latent_record(schema: pa.Schema, record: dict[str, Any]) -> pa.Schema:
    """``schema`` with the latent gate's record (``LatentGate.record()``) added to its metadata."""
    return schema.with_metadata({**(schema.metadata or {}), LATENT_META: json.dumps(record).encode()})


def latent_record(schema: pa.Schema) -> dict[str, Any] | None:
    """The latent gate's record of a file written by a batch job or footage (None for files written before it)."""
    meta = schema.metadata or {}
    return json.loads(meta[LATENT_META]) if LATENT_META in meta else None


def result_schema(extra: Iterable[pa.Field] = ()) -> pa.Schema:
    """The face schema followed by a job kind's own columns (e.g. footage's frame number)."""
    extra = list(extra)
    clash = {f.name for f in extra} & set(RESULT_SCHEMA.names)
    if clash:
        raise ValueError(f"extra column(s) {sorted(clash)} clash with the face schema")
    return pa.schema([*FACE_FIELDS, *extra], metadata=RESULT_SCHEMA.metadata)


def to_table(rows: Sequence[dict[str, Any]], schema: pa.Schema = RESULT_SCHEMA) -> pa.Table:
    """Row dicts -> a table of exactly ``schema`` (missing optional values become null)."""
    columns = {name: [row.get(name) for row in rows] for name in schema.names}
    return pa.Table.from_pydict(columns, schema=schema)


def error_row(source_uri: str, error: str, face_index: int = 0, model_version: str | None = None) -> dict[str, Any]:
    """The row that accounts for a source that could not be processed."""
    return {"source_uri": source_uri, "face_index": face_index, "model_version": model_version, "error": error}


def check_schema(schema: pa.Schema, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a file does not carry the face columns with their types."""
    for field in FACE_FIELDS:
        if field.name not in schema.names:
            raise ValueError(f"{where}: missing column {field.name!r} of the anonymised-faces schema")
        found = schema.field(field.name).type
        if found != field.type:
            raise ValueError(f"{where}: column {field.name!r} is {found}, expected {field.type}")
