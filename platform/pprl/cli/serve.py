"""``pprl serve`` (the HTTP service on Ray Serve) and ``pprl anonymize-images`` (the same batch pipeline, no HTTP)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from typing import Any

import typer
import yaml

from pprl import cluster, storage
from pprl.serve import security

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(
    model: str = typer.Option(..., "--model", help="Model bundle folder (local or s3://)."),
    host: str = typer.Option("127.0.0.1", help="HTTP bind address (0.0.0.0 to listen on every interface)."),
    port: int = typer.Option(8000, help="HTTP port."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join ('auto' or HOST:PORT); default: start a local one."),
    insecure_local: bool = typer.Option(False, "--insecure-local", help="Run without a bearer token (loopback only, for development)."),
    allow: list[str] = typer.Option([], "--allow", help="Prefix batch jobs may read and write (repeatable); none = jobs disabled."),
    settings: str | None = typer.Option(None, "--settings", help="YAML mapping of server settings (the `args` of serve_config.yaml)."),
    num_gpus: float | None = typer.Option(None, help="GPUs per model replica."),
    max_batch_size: int | None = typer.Option(None, help="Largest dynamic batch of the model deployment."),
    export_unaudited_latent: bool = typer.Option(
        False, "--export-unaudited-latent",
        help="Return the latent (details=true, batch jobs) although the bundle's privacy audit did not pass; every "
        "output records the override.",
    ),  # fmt: skip
) -> None:
    """Serve the online (/v1/anonymize) and batch (/v1/jobs) endpoints; the token comes from PPRL_API_TOKEN."""
    from ray import serve

    from pprl.serve.app import APP_NAME, ServeSettings, build_app, forwarded_env

    values: dict[str, Any] = (yaml.safe_load(storage.read_text(settings)) or {}) if settings else {}
    values.update({"model_uri": model, "insecure_local": insecure_local or values.get("insecure_local", False)})
    if allow:
        values["allowed_prefixes"] = list(allow)
    if export_unaudited_latent:
        values["export_unaudited_latent"] = True
    for name, value in (("num_gpus", num_gpus), ("max_batch_size", max_batch_size)):
        if value is not None:
            values[name] = value
    try:
        s = ServeSettings.from_dict(values)
        security.load_token(s.token_env, s.insecure_local)
    except (ValueError, RuntimeError) as err:
        raise typer.BadParameter(str(err)) from None
    if s.insecure_local and host not in LOOPBACK:
        raise typer.BadParameter(f"--insecure-local serves without authentication: bind to 127.0.0.1, not {host}")
    cluster.connect(address, extra_env=forwarded_env(s), purpose="serving")
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(asdict(s)), name=APP_NAME, route_prefix="/")
    typer.echo(f"serving on http://{host}:{port} (OpenAPI: /docs); Ctrl-C to stop")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()


def anonymize_images(
    input_uri: str = typer.Option(..., "--input", help="Prefix of PNG/JPEG images, a dataset folder, or its manifest.parquet."),
    output: str = typer.Option(..., "--output", help="Prefix for part-*.parquet (rerun with the same one to resume)."),
    model: str = typer.Option(..., "--model", help="Model bundle folder (local or s3://)."),
    identity: str = typer.Option("random", help="Target: an index, 'random' (stable per file), or 'pseudonym:<key>'."),
    batch_size: int = typer.Option(32, help="Images per forward pass."),
    actors: int = typer.Option(1, help="Model actors in the Ray Data pool."),
    num_gpus: float = typer.Option(0.0, help="GPUs per model actor."),
    device: str | None = typer.Option(None, help="Torch device for the model (default: cuda if the actor has a GPU)."),
    store_inputs: bool = typer.Option(False, "--store-inputs", help="Also keep the original image bytes (input_image column)."),
    max_pixels: int = typer.Option(security.Limits.max_pixels, help="Largest input image (width x height) accepted."),
    address: str | None = typer.Option(None, "--address", help="Ray cluster to join; default: start a local one."),
    export_unaudited_latent: bool = typer.Option(
        False, "--export-unaudited-latent",
        help="Fill the latent column although the bundle's privacy audit did not pass (each part file records it).",
    ),  # fmt: skip
) -> None:
    """Anonymise a folder or bucket of face images into Parquet with Ray Data (the pipeline behind POST /v1/jobs)."""
    from tqdm import tqdm

    from pprl.serve.batch import JobRequest, Progress, run_images_job

    request = JobRequest(
        input=input_uri,
        output=output,
        model_uri=model,
        identity=identity,
        store_inputs=store_inputs,
        batch_size=batch_size,
        actors=actors,
        num_gpus=num_gpus,
        device=device,
        max_pixels=max_pixels,
        pseudonym_secret=security.pseudonym_secret(os.environ.get(security.TOKEN_ENV)),
        export_unaudited_latent=export_unaudited_latent,
    )
    cluster.connect(address, purpose="the images job")
    with tqdm(unit="img", desc="anonymize") as bar:

        def show(p: Progress) -> None:
            bar.total = p.total - p.skipped
            bar.update(p.done + p.failed - bar.n)

        try:
            progress = run_images_job(request, Progress(listener=show))
        except (ValueError, storage.StorageError) as err:
            raise typer.BadParameter(str(err)) from None
    typer.echo(json.dumps({"output": output, **progress.to_dict()}))


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)
    app.command("anonymize-images")(anonymize_images)
