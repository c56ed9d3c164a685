"""``pprl evaluate`` end to end: scenarios -> applications -> report folder (local or s3://)."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from pprl import storage
from pprl.data.dataset import MANIFEST, Dataset, encode_png
from pprl.evaluate import applications as apps
from pprl.evaluate.attacks import audit_record
from pprl.evaluate.report import build_report, write_report
from pprl.evaluate.scenarios import EvalOptions, Evaluation, evaluate, stratified_subsample
from pprl.train.export import INFO, write_audit

log = logging.getLogger(__name__)


def model_info(model, uri: str | None) -> dict[str, Any]:
    info = {
        "uri": uri or type(model).__name__,
        "version": str(getattr(model, "version", "unknown")),
        "image_size": int(model.image_size),
        "num_identities": int(model.num_identities),
        "latent_dim": int(getattr(model, "latent_dim", 0)) or None,
    }
    if uri and storage.exists(storage.join(uri, "bundle.json")):
        info["bundle"] = json.loads(storage.read_text(storage.join(uri, "bundle.json")))
    return info


def data_info(dataset: Dataset, options: EvalOptions) -> dict[str, Any]:
    manifest = storage.read_bytes(storage.join(dataset.root, MANIFEST))
    return {
        "uri": dataset.root,
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "num_images": len(dataset.manifest),
        "num_identities": dataset.num_identities,
        "n_train": len(dataset.split("train")),
        "n_train_used": len(stratified_subsample(dataset.split("train"), options.train_limit, options.seed)),
        "n_test": len(dataset.split("test")),
    }


def applications(model, dataset: Dataset, steps: int = 8, faces: int = 6) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Morph strip and completion triplets for the report folder: (summary, {file name: PNG bytes})."""
    summary: dict[str, Any] = {}
    images: dict[str, bytes] = {}
    try:
        a, b, subject = apps.pick_pair(dataset, None, "joy", "anger")
        strip, _ = apps.morph_strip(model, a, b, steps, identity=subject)
        images["morph.png"] = encode_png(strip)
        summary["morph"] = f"identity {subject}, joy -> anger, {steps} steps, decoded with identity {subject}"
    except ValueError as err:  # e.g. a dataset without those expressions: the report says why
        summary["morph"] = f"skipped: {err}"
    faces_x, ids = apps.pick_faces(dataset, faces)
    completion = apps.complete_faces(model, faces_x, ids)
    images["completion.png"] = encode_png(completion.image)
    summary["completion"] = completion.summary()
    return summary, images


def run_evaluation(
    model,
    dataset: Dataset,
    out: str,
    options: EvalOptions | None = None,
    use_ray: bool = True,
    model_uri: str | None = None,
    attach_audit: bool = False,
) -> tuple[dict[str, Any], Evaluation, dict[str, str]]:
    """Evaluate ``model`` (anything with the Anonymizer interface), write the report folder, return
    (report, evaluation, files).

    ``attach_audit``: also write the attack suite's verdict into the bundle at ``model_uri`` (``privacy_audit.json``,
    listed in files when written)."""
    options = options or EvalOptions()
    evaluation = evaluate(model, dataset, options, use_ray=use_ray)
    app_summary, images = applications(model, dataset) if options.applications else ({}, {})
    report = build_report(evaluation, model_info(model, model_uri), data_info(dataset, options), app_summary)
    files = write_report(out, report, evaluation, images)
    log.info("evaluation report written to %s", out)
    if attach_audit and model_uri and report["attacks"]:
        audit = _attach_audit(model_uri, report, out)
        files.update({"privacy_audit.json": audit} if audit else {})
    return report, evaluation, files


def _attach_audit(model_uri: str, report: dict[str, Any], out: str) -> str | None:
    """Write the audit into the bundle; one that cannot take it (not a bundle, read-only) is a warning, not an error."""
    if not storage.exists(storage.join(model_uri, INFO)):
        log.warning("%s is not a bundle folder: the privacy audit stays in the report only", model_uri)
        return None
    try:
        uri = write_audit(model_uri, audit_record(report, out))
    except (OSError, storage.StorageError) as err:
        log.warning("cannot write the privacy audit into %s (%s): it stays in the report only", model_uri, err)
        return None
    log.info("privacy audit (%s) attached to %s", "passed" if report["audit"]["passed"] else "failed", uri)
    return uri
