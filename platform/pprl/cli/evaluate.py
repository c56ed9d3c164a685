"""``pprl evaluate``, ``pprl morph``, ``pprl complete``: privacy vs utility of a trained model, and the paper's applications."""

from __future__ import annotations

import numpy as np
import typer

from pprl import storage


def _load_model(uri: str, device: str | None):
    from pprl.anonymizer import Anonymizer

    return Anonymizer.load(uri, device=device)


def evaluate(
    model: str = typer.Option(..., "--model", help="Model bundle folder (local or s3://)."),
    data: str = typer.Option(..., "--data", help="Dataset folder the model was trained on (same identities)."),
    out: str = typer.Option(None, "--out", help="Report folder (local or s3://). Default: <model>/evaluation."),
    profile: str = typer.Option("paper", "--profile", help="paper: the authors' protocol on every training image; quick: ~2.4k images, batch 64."),
    train_limit: int = typer.Option(None, "--train-limit", help="Use at most N training images (stratified); 0 = all."),
    epochs: int = typer.Option(None, "--epochs", help="Epochs of the paper's classifiers (default 10)."),
    strong: bool = typer.Option(True, "--strong/--no-strong", help="Also run the stronger attackers (ResNet + augmentation, deeper MLP)."),
    strong_epochs: int = typer.Option(
        None, "--strong-epochs", help="Most epochs of the stronger attackers (paper 60, quick 30)."
    ),
    patience: int = typer.Option(
        None, "--patience", help="Early stopping of the stronger attackers and the suite (paper 10, quick 8)."
    ),
    suite: bool = typer.Option(
        True, "--attack-suite/--no-attack-suite", help="Run the attack suite, each attack judged by its bar."
    ),
    probe_epochs: int = typer.Option(
        None, "--probe-epochs", help="Most epochs of the suite's latent probes (paper 300, quick 200)."
    ),
    inverter_epochs: int = typer.Option(
        None, "--inverter-epochs", help="Most epochs of the inversion attack's network (paper 60, quick 20)."
    ),
    expression_judges: int = typer.Option(
        None, "--expression-judges",
        help="Paper expression CNNs (seeds --seed, --seed+1, ...) whose mean is the suite's attack-1 expression (5).",
    ),  # fmt: skip
    strict: bool = typer.Option(
        False, "--strict", help="Exit 1 when an attack misses its bar (the report is still written)."
    ),
    attach_audit: bool = typer.Option(
        True, "--attach-audit/--no-attach-audit",
        help="Write the suite's verdict into the bundle (privacy_audit.json): serving, batch jobs and footage "
        "export the latent only from a bundle whose audit passed.",
    ),  # fmt: skip
    seed: int = typer.Option(0, "--seed", help="Seed of targets, subsample, validation split and classifier init."),
    allow_source_target: bool = typer.Option(False, "--allow-source-target", help="Let the random target be the source identity."),
    sample: bool = typer.Option(False, "--sample", help="Anonymise with a sampled latent instead of its mean."),
    use_ray: bool = typer.Option(True, "--ray/--no-ray", help="Train the classifiers as parallel Ray tasks (RAY_ADDRESS or a local 2-CPU Ray)."),
    gpus_per_task: float = typer.Option(0.0, "--gpus-per-task", help="GPU share per Ray task, e.g. 0.25; 0 = CPU."),
    device: str = typer.Option(None, "--device", help="Device of the anonymiser (default: cuda if available)."),
    apps: bool = typer.Option(True, "--applications/--no-applications", help="Also write morph.png and completion.png."),
) -> None:
    """Measure privacy (identity accuracy, lower is better) vs utility (expression accuracy) in the paper's scenarios,
    then run the attack suite against its bars and attach the verdict to the bundle."""
    from pprl.data.dataset import load_dataset
    from pprl.evaluate.attacks import verdict_lines
    from pprl.evaluate.report import table
    from pprl.evaluate.run import run_evaluation
    from pprl.evaluate.scenarios import options_for

    if strict and not suite:
        raise typer.BadParameter("--strict judges the attack suite: drop --no-attack-suite")
    try:
        options = options_for(
            profile, train_limit=train_limit, paper_epochs=epochs, strong=strong, strong_epochs=strong_epochs,
            patience=patience, suite=suite, probe_epochs=probe_epochs, inverter_epochs=inverter_epochs, seed=seed,
            expression_judges=expression_judges,
            allow_source_target=allow_source_target, sample=sample, gpus_per_task=gpus_per_task, applications=apps,
        )  # fmt: skip
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    out = out or storage.join(model, "evaluation")
    anonymizer, dataset = _load_model(model, device), load_dataset(data)
    report, _, files = run_evaluation(anonymizer, dataset, out, options, use_ray, model, attach_audit)
    typer.echo(table(report))
    for flag in report["privacy_flags"]:
        typer.echo(f"WARNING: {flag}")
    for line in verdict_lines(report):
        typer.echo(line)
    attached = f"; audit attached: {files['privacy_audit.json']}" if "privacy_audit.json" in files else ""
    typer.echo(f"report: {files['report.md']}{attached}")
    if strict and not report["audit"]["passed"]:
        raise typer.Exit(code=1)


def morph(
    model: str = typer.Option(..., "--model", help="Model bundle folder."),
    out: str = typer.Option(..., "--out", help="PNG file to write (local or s3://)."),
    data: str = typer.Option(None, "--data", help="Dataset to pick two test images of one subject from."),
    subject: int = typer.Option(None, "--subject", help="Identity of the subject (default: the first)."),
    expr_from: str = typer.Option("joy", "--from", help="Expression of the first image (name or index)."),
    expr_to: str = typer.Option("anger", "--to", help="Expression of the second image."),
    image_a: str = typer.Option(None, "--a", help="First image file instead of --data."),
    image_b: str = typer.Option(None, "--b", help="Second image file instead of --data."),
    identity: int = typer.Option(None, "--identity", help="Identity code to decode with (default: the subject, else 0)."),
    steps: int = typer.Option(8, "--steps", help="Interpolation steps."),
    device: str = typer.Option(None, "--device", help="Device of the model."),
) -> None:
    """Expression morphing: interpolate two images' latent means, decode with one fixed identity; write a strip PNG."""
    from pprl.data.dataset import encode_png, load_dataset
    from pprl.evaluate.applications import morph_strip, pick_pair

    if not (image_a and image_b) and not data:
        raise typer.BadParameter("give --data (and optionally --subject/--from/--to) or both --a and --b")
    anonymizer = _load_model(model, device)
    if image_a and image_b:
        a, b, subject = _read_image(image_a, anonymizer.image_size), _read_image(image_b, anonymizer.image_size), None
    else:
        a, b, subject = pick_pair(load_dataset(data), subject, expr_from, expr_to)
    identity = identity if identity is not None else (subject or 0)
    strip, _ = morph_strip(anonymizer, a, b, steps, identity)
    storage.write_bytes(out, encode_png(strip))
    typer.echo(f"morph strip ({steps} steps, identity {identity}) written to {out}")


def complete(
    model: str = typer.Option(..., "--model", help="Model bundle folder."),
    out: str = typer.Option(..., "--out", help="PNG file to write: one row per face, original | masked | completed."),
    data: str = typer.Option(None, "--data", help="Dataset to pick test faces from (their identities are known)."),
    count: int = typer.Option(6, "--count", help="Faces picked from --data."),
    images: list[str] = typer.Option([], "--image", help="Image file(s) instead of --data (repeatable); needs --identity."),
    identity: int = typer.Option(None, "--identity", help="Identity to decode with (default with --data: each face's own)."),
    device: str = typer.Option(None, "--device", help="Device of the model."),
) -> None:
    """Image completion: grey out the mouth, encode, decode with the source identity, paste the box back."""
    from pprl.data.dataset import encode_png, load_dataset
    from pprl.evaluate.applications import complete_faces, pick_faces

    if not images and not data:
        raise typer.BadParameter("give --data or one or more --image files")
    if images and identity is None:
        raise typer.BadParameter("--image needs --identity (the identity the faces are decoded with)")
    anonymizer = _load_model(model, device)
    if images:
        faces = np.stack([_read_image(uri, anonymizer.image_size) for uri in images])
        ids = np.full(len(faces), identity)
    else:
        faces, ids = pick_faces(load_dataset(data), count)
        ids = ids if identity is None else np.full(len(faces), identity)
    result = complete_faces(anonymizer, faces, ids)
    storage.write_bytes(out, encode_png(result.image))
    typer.echo(f"{len(faces)} completions written to {out}; L1 in the box {result.l1_completed:.3f} (grey fill {result.l1_grey:.3f})")


def _read_image(uri: str, size: int) -> np.ndarray:
    from pprl.data.dataset import decode_image

    return decode_image(storage.read_bytes(uri), size, source=uri)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)
    app.command("morph")(morph)
    app.command("complete")(complete)
