"""The Serve application end to end: real Ray Serve on the shared local cluster, real HTTP, loopback S3.

One application is deployed for the module (model from the `trained_model` fixture) and shut down at the end.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import secrets
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from conftest import free_port
from pprl import storage
from pprl.data.dataset import load_dataset
from pprl.serve import schema
from test_batch import png_bomb

CONFIG_YAML = Path(__file__).resolve().parents[1] / "platform" / "pprl" / "serve" / "serve_config.yaml"
MAX_BODY = 2 * 2**20


@pytest.fixture(scope="module")
def server(ray_head, trained_model, s3_server, tmp_path_factory):
    """Deploy the app on a free port; yields url, token, the S3 bucket and local folder jobs may use."""
    import boto3
    import ray
    from ray import serve

    from pprl.serve.app import APP_NAME, build_app

    token = secrets.token_hex(16)
    saved = os.environ.get("PPRL_API_TOKEN")
    os.environ["PPRL_API_TOKEN"] = token
    bucket = f"serve-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    local_jobs = tmp_path_factory.mktemp("serve-jobs")
    if ray.is_initialized():
        ray.shutdown()
    # Workers of the shared head did not inherit this environment: hand replicas what they need.
    ray.init(address=ray_head["address"], runtime_env={"env_vars": {**storage.s3_env(), "PPRL_API_TOKEN": token}}, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {
        "model_uri": trained_model,
        "max_batch_size": 16,
        "batch_wait_timeout_s": 0.05,
        "max_ongoing_requests": 32,
        "model_num_cpus": 1,
        "ingress_num_cpus": 0.25,
        "max_body_bytes": MAX_BODY,
        "allowed_prefixes": [f"s3://{bucket}", str(local_jobs)],
        "job_batch_size": 8,
    }
    started = time.time()
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    print(f"serve app up in {time.time() - started:.1f}s")
    try:
        yield {"url": f"http://127.0.0.1:{port}", "token": token, "bucket": f"s3://{bucket}", "local": str(local_jobs)}
    finally:
        serve.shutdown()
        ray.shutdown()
        if saved is None:
            os.environ.pop("PPRL_API_TOKEN", None)
        else:
            os.environ["PPRL_API_TOKEN"] = saved


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], headers={"Authorization": f"Bearer {server['token']}"}, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def faces(synth_data):
    """Test-split originals (64x64 PNG bytes, larger than the model's 32: the server resizes) and their identities."""
    ds = load_dataset(synth_data)
    rows = ds.split("test").groupby("identity").head(4).reset_index(drop=True)
    return [storage.read_bytes(ds.uri(p)) for p in rows["path"]], rows["identity"].to_numpy()


@pytest.fixture(scope="module")
def identity_judge(judges, synth_data):
    """The evaluation area's identity judge, checked on held-out originals before it judges anything."""
    ds = load_dataset(synth_data)
    test = ds.split("test").groupby("identity").head(30)
    assert judges.identity_accuracy(ds.load_images(test, judges.size), test["identity"].to_numpy()) > 0.95, "the judge must recognise originals"
    return judges, judges.size


def png_of(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.slow
def test_health_needs_no_token_and_docs_do(server, client):
    assert httpx.get(f"{server['url']}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server['url']}/openapi.json").status_code == 401
    spec = client.get("/openapi.json").json()
    assert {"/v1/anonymize", "/v1/jobs", "/v1/jobs/{job_id}"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


@pytest.mark.slow
def test_online_png_has_model_size_and_the_requested_identity(client, faces, identity_judge):
    judge, size = identity_judge
    images, _ = faces
    targets = [i % 6 for i in range(len(images))]
    outputs = []
    for data, target in zip(images, targets, strict=True):
        response = client.post("/v1/anonymize", params={"identity": target}, content=data, headers={"Content-Type": "image/png"})
        out = png_of(response)
        assert out.shape == (size, size, 3)
        assert int(response.headers["X-Target-Identity"]) == target
        outputs.append(out)
    predicted = judge.predict_identity(np.stack(outputs))
    recognised = float((predicted == np.asarray(targets)).mean())
    print(f"identity judge recognises the requested target in {recognised:.0%} of {len(targets)} outputs")
    assert predicted[0] == targets[0] and recognised >= 0.75


@pytest.mark.slow
def test_details_json_jpeg_multipart_and_stable_pseudonyms(client, faces):
    data = faces[0][0]
    detailed = client.post("/v1/anonymize", params={"identity": "pseudonym:alice@example.com", "details": "true"}, content=data, headers={"Content-Type": "image/png"})
    assert detailed.status_code == 200, detailed.text
    body = detailed.json()
    info = client.get("/v1/info").json()["model"]
    # CI's model has no privacy audit: the latent is withheld, and the response says which latent and why
    assert "latent" not in body and body["latent_kind"] == "canonical_reencoding:3x:identity_0+leace_identity" and body["latent_audit"]["audit"] == "missing"
    assert not body["latent_audit"]["latent_exported"] and info["latent"]["note"] == body["latent_audit"]["note"]
    assert set(body["expression_probs"]) == set(info["expressions"]) and abs(sum(body["expression_probs"].values()) - 1) < 1e-3
    assert body["expression"] == max(body["expression_probs"], key=body["expression_probs"].get)
    assert Image.open(io.BytesIO(base64.b64decode(body["image"]))).size == (info["image_size"], info["image_size"])
    again = [client.post("/v1/anonymize", params={"identity": "pseudonym:alice@example.com"}, content=data, headers={"Content-Type": "image/png"}) for _ in range(3)]
    assert {int(r.headers["X-Target-Identity"]) for r in again} == {body["target_identity"]}
    others = {int(client.post("/v1/anonymize", params={"identity": f"pseudonym:user-{i}"}, content=data, headers={"Content-Type": "image/png"}).headers["X-Target-Identity"]) for i in range(12)}
    assert len(others) > 1
    jpeg = client.post("/v1/anonymize", params={"format": "jpeg", "identity": "random"}, files={"image": ("face.png", data, "image/png")})
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg.content)).format == "JPEG"


@pytest.mark.slow
def test_200_concurrent_requests_all_answered_in_batches(server, faces):
    images, _ = faces

    async def fire() -> list[tuple[int, httpx.Response]]:
        limit = asyncio.Semaphore(100)
        headers = {"Authorization": f"Bearer {server['token']}", "Content-Type": "image/png"}
        async with httpx.AsyncClient(base_url=server["url"], headers=headers, timeout=120, limits=httpx.Limits(max_connections=100)) as c:

            async def one(i: int) -> tuple[int, httpx.Response]:
                async with limit:
                    return i, await c.post("/v1/anonymize", params={"identity": i % 6}, content=images[i % len(images)])

            return await asyncio.gather(*(one(i) for i in range(200)))

    started = time.time()
    results = asyncio.run(fire())
    elapsed = time.time() - started
    assert len(results) == 200
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200][:3]
    assert all(int(r.headers["X-Target-Identity"]) == i % 6 for i, r in results)  # each answer belongs to its request
    sizes = [int(r.headers["X-Batch-Size"]) for _, r in results]
    for _, r in results[:5]:
        png_of(r)
    print(f"200 requests in {elapsed:.1f}s; batch sizes: max {max(sizes)}, mean {np.mean(sizes):.1f}")
    assert max(sizes) > 1


@pytest.mark.slow
def test_bad_inputs_get_clear_4xx_and_the_server_stays_healthy(server, client, faces):
    good = faces[0][0]
    png = {"Content-Type": "image/png"}
    cases = [
        ("no auth", dict(headers=png, content=good), None, 401, "missing bearer token"),
        ("wrong token", dict(headers={**png, "Authorization": "Bearer " + "x" * 32}, content=good), None, 401, "invalid bearer token"),
        ("empty body", dict(headers=png, content=b""), "auth", 400, "empty"),
        ("random bytes", dict(headers=png, content=os.urandom(4096)), "auth", 422, "not a readable PNG or JPEG"),
        ("truncated png", dict(headers=png, content=good[: len(good) // 2]), "auth", 422, "truncated"),
        ("png bomb", dict(headers=png, content=png_bomb()), "auth", 413, "decompression-bomb guard"),
        ("too big", dict(headers=png, content=b"\0" * (MAX_BODY + 1)), "auth", 413, "exceeds the limit"),
        ("too big, streamed", dict(headers=png, content=iter([b"\0" * MAX_BODY, b"\0" * 16])), "auth", 413, "exceeds the limit"),
        ("wrong type", dict(headers={"Content-Type": "text/plain"}, content=good), "auth", 415, "not supported"),
        ("mislabelled", dict(headers={"Content-Type": "image/jpeg"}, content=good), "auth", 415, "is a PNG"),
        ("no image part", dict(files={"file": ("a.png", good, "image/png")}), "auth", 400, "field named 'image'"),
        ("identity range", dict(headers=png, content=good, params={"identity": 99}), "auth", 400, "out of range"),
        ("identity junk", dict(headers=png, content=good, params={"identity": "bob"}), "auth", 400, "expected an index"),
    ]
    auth = {"Authorization": f"Bearer {server['token']}"}
    with httpx.Client(base_url=server["url"], timeout=60) as raw:
        for name, kwargs, use_auth, status, message in cases:
            if use_auth:
                kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), **auth}}
            response = raw.post("/v1/anonymize", **kwargs)
            assert response.status_code == status, (name, response.status_code, response.text)
            assert message in response.json()["detail"], (name, response.text)
    job_cases = [
        ({"input": "/etc", "output": f"{server['bucket']}/out"}, 403, "outside the allowed prefixes"),
        ({"input": f"{server['bucket']}/in", "output": "s3://somebody-elses-bucket/out"}, 403, "outside the allowed prefixes"),
        ({"input": f"{server['bucket']}/../x", "output": f"{server['bucket']}/out"}, 400, "not a clean"),
        ({"input": f"{server['bucket']}/in", "output": f"{server['bucket']}/out", "kind": "nope"}, 400, "unknown job kind"),
        ({"input": f"{server['bucket']}/in", "output": f"{server['bucket']}/out", "identity": "7"}, 400, "out of range"),
        ({"input": f"{server['bucket']}/in"}, 422, "output"),
    ]
    for body, status, message in job_cases:
        response = client.post("/v1/jobs", json=body)
        assert response.status_code == status and message in response.text, (body, response.text)
    assert client.get("/v1/jobs/0123").status_code == 404
    assert httpx.get(f"{server['url']}/healthz").json()["status"] == "ok"
    assert png_of(client.post("/v1/anonymize", content=good, headers=png)).ndim == 3


def upload_inputs(prefix: str, faces) -> list[str]:
    """14 good PNGs, a file of random bytes and a truncated JPEG under ``prefix``, plus a non-image file (ignored)."""
    images, _ = faces
    uris = []
    for i, data in enumerate(images[:14]):
        uris.append(storage.join(prefix, f"day1/face-{i:02d}.png"))
        storage.write_bytes(uris[-1], data)
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(images[0])).convert("RGB").save(jpeg, format="JPEG")
    for name, data in (("day1/corrupt.png", os.urandom(3000)), ("day2/truncated.jpg", jpeg.getvalue()[:400])):
        uris.append(storage.join(prefix, name))
        storage.write_bytes(uris[-1], data)
    storage.write_bytes(storage.join(prefix, "README.txt"), b"not an image")
    return uris


def wait_for(client: httpx.Client, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("succeeded", "failed", "cancelled"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {status['state']} after {timeout}s: {status}")


def read_output(prefix: str):
    parts = storage.list_files(prefix, (".parquet",))
    for part in parts:
        schema.check_schema(storage.read_parquet(part).schema, part)
    rows = [row for part in parts for row in storage.read_parquet(part).to_pylist()]
    return parts, rows


@pytest.mark.slow
def test_batch_job_over_s3_accounts_for_every_input_and_resumes(server, client, faces):
    source = f"{server['bucket']}/incoming"
    output = f"{server['bucket']}/anonymized/run1"
    inputs = upload_inputs(source, faces)
    started = time.time()
    submitted = client.post("/v1/jobs", json={"input": source, "output": output, "identity": "2"})
    assert submitted.status_code == 202, submitted.text
    status = wait_for(client, submitted.json()["id"])
    print(f"batch job over {len(inputs)} S3 objects: {time.time() - started:.1f}s")
    assert status["state"] == "succeeded", status
    assert status["counts"] == {**status["counts"], "total": 16, "skipped": 0, "done": 14, "failed": 2}
    assert status["output"] == output
    parts, rows = read_output(output)
    assert sorted(r["source_uri"] for r in rows) == sorted(inputs)
    errors = {r["source_uri"]: r["error"] for r in rows if r["error"] is not None}
    assert set(errors) == {inputs[-2], inputs[-1]}
    assert all(uri in message for uri, message in errors.items())  # each error names its file
    for row in (r for r in rows if r["error"] is None):
        assert row["target_identity"] == 2 and row["input_image"] is None  # inputs are not stored unless asked
        assert len(row["expression_probs"]) == 7 and row["expression"] and row["model_version"]
        assert Image.open(io.BytesIO(row["image"])).format == "PNG"
    rerun = wait_for(client, client.post("/v1/jobs", json={"input": source, "output": output, "identity": "2"}).json()["id"])
    assert rerun["state"] == "succeeded" and rerun["counts"]["skipped"] == 16 and rerun["counts"]["done"] == 0, rerun
    assert storage.list_files(output, (".parquet",)) == parts  # nothing new written


def local_files(folder: str) -> dict[str, int]:
    """Every file under a local folder, hidden ones included, with its modification time (ns)."""
    root = Path(folder)
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} if root.exists() else {}


@pytest.mark.slow
def test_cancel_queued_and_running_jobs_stops_writing_at_once(server, client, faces):
    """A queued job is cancelled outright; a running one, cancelled after its first parts, ends `cancelled` (not
    succeeded) with its output exactly as it was when DELETE returned: no part added or rewritten after, no
    temporary or unpublished files left, and every part counted."""
    images, _ = faces
    source, output, queued_output = (Path(server["local"]) / "cancel" / name for name in ("in", "a", "b"))
    source.mkdir(parents=True)
    for i in range(1200):  # 150 parts of job_batch_size 8: still running when cancelled after the first
        (source / f"face-{i:04d}.png").write_bytes(images[i % len(images)])
    first = client.post("/v1/jobs", json={"input": str(source), "output": str(output)}).json()
    second = client.post("/v1/jobs", json={"input": str(source), "output": str(queued_output)}).json()
    clash = client.post("/v1/jobs", json={"input": str(source), "output": str(output)})
    assert clash.status_code == 409 and first["id"] in clash.text
    cancelled = client.delete(f"/v1/jobs/{second['id']}").json()
    assert cancelled["state"] == "cancelled"  # it was queued behind the first (one job at a time)
    deadline = time.time() + 180
    while (status := client.get(f"/v1/jobs/{first['id']}").json())["counts"]["done"] == 0:
        assert status["state"] in ("queued", "running") and time.time() < deadline, status
        time.sleep(0.1)
    answer = client.delete(f"/v1/jobs/{first['id']}").json()
    at_cancel = local_files(str(output))
    assert answer["state"] == "cancelling", answer  # it was running
    status = wait_for(client, first["id"], timeout=60)
    after = local_files(str(output))
    assert status["state"] == "cancelled", status
    assert 0 < status["counts"]["done"] < status["counts"]["total"] == 1200, status
    visible = {name: mtime for name, mtime in at_cancel.items() if not name.startswith(".")}
    assert after == visible, f"changed after the cancel: {sorted(set(after.items()) ^ set(visible.items()))}"
    parts, rows = read_output(str(output))
    assert status["counts"]["parts"] == len(parts) and status["counts"]["done"] + status["counts"]["failed"] == len(rows)
    sources = [r["source_uri"] for r in rows]
    assert len(sources) == len(set(sources)) and all(s.startswith(str(source)) for s in sources)
    assert not local_files(str(queued_output))


def test_serve_config_yaml_is_a_valid_deploy_config():
    from ray.serve.schema import ServeDeploySchema

    from pprl.serve.app import ServeSettings, build_app

    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG_YAML.read_text()))
    (application,) = config.applications
    assert application.import_path == "pprl.serve.app:build_app"
    settings = ServeSettings.from_dict(application.args)
    assert settings.max_ongoing_requests >= settings.max_batch_size and settings.num_gpus >= 1
    assert not settings.insecure_local and settings.allowed_prefixes
    build_app(application.args)  # the builder accepts the args (no cluster needed to build)


def flat(text: str) -> str:
    """Typer's boxed error message as one line."""
    return " ".join(text.replace("│", " ").split())


def test_refuses_to_start_without_a_token_or_with_unsafe_settings(monkeypatch, capsys, tmp_path):
    """Checked before anything starts (no Ray needed)."""
    from pprl.cli import main
    from pprl.serve.app import ServeSettings

    model = str(tmp_path / "bundle")
    monkeypatch.delenv("PPRL_API_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--model", model])
    assert exited.value.code == 2 and "PPRL_API_TOKEN is not set" in flat(capsys.readouterr().err)
    monkeypatch.setenv("PPRL_API_TOKEN", "short")
    with pytest.raises(SystemExit):
        main(["serve", "--model", model])
    assert "at least 16" in flat(capsys.readouterr().err)
    monkeypatch.delenv("PPRL_API_TOKEN")
    with pytest.raises(SystemExit):
        main(["serve", "--model", model, "--insecure-local", "--host", "0.0.0.0"])
    assert "bind to 127.0.0.1" in flat(capsys.readouterr().err)
    with pytest.raises(ValueError, match="never receive enough requests to fill a batch"):
        ServeSettings(model_uri=model, max_batch_size=32, max_ongoing_requests=8)
    with pytest.raises(ValueError, match="unknown serve setting"):
        ServeSettings.from_dict({"model_uri": model, "max_batch": 4})


@pytest.mark.slow
def test_a_job_whose_replica_dies_is_resumed_by_resubmitting_it(server, client, faces):
    """The ``Jobs`` replica (the images job's driver) is killed while a 400-image job runs: Serve starts a new one,
    which has forgotten the job; submitting it again does exactly the images not in a published part, and every
    image ends up in exactly one row with nothing hidden left."""
    import ray

    images, _ = faces
    source, output = (Path(server["local"]) / "replica" / name for name in ("in", "out"))
    source.mkdir(parents=True)
    for i in range(400):  # 50 parts of job_batch_size 8
        (source / f"face-{i:04d}.png").write_bytes(images[i % len(images)])
    job = {"input": str(source), "output": str(output)}
    first = client.post("/v1/jobs", json=job).json()
    deadline = time.time() + 180
    while len(list(output.glob("part-*.parquet"))) < 3:
        status = client.get(f"/v1/jobs/{first['id']}").json()
        assert status["state"] in ("queued", "running") and time.time() < deadline, status
        time.sleep(0.05)
    replica = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "#Jobs#" in a["name"])
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    print(f"replica killed after {time.time() - deadline + 180:.1f} s")
    published = {p: p.stat().st_mtime_ns for p in output.glob("part-*.parquet")}
    while (forgotten := client.get(f"/v1/jobs/{first['id']}")).status_code != 404:  # the new replica knows no such job
        assert time.time() < deadline, forgotten.text
        time.sleep(0.2)
    done_before = {r["source_uri"] for p in output.glob("part-*.parquet") for r in pq.read_table(p, columns=["source_uri"]).to_pylist()}
    print(f"a new replica answers after {time.time() - deadline + 180:.1f} s")
    rerun = wait_for(client, client.post("/v1/jobs", json=job).json()["id"])
    print(f"the rerun ends after {time.time() - deadline + 180:.1f} s")
    assert rerun["state"] == "succeeded", rerun
    assert rerun["counts"]["skipped"] == len(done_before) and 0 < len(done_before) < 400
    assert rerun["counts"]["done"] + rerun["counts"]["failed"] == 400 - len(done_before)
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in published.items())  # published parts left as they were
    parts, rows = read_output(str(output))
    assert sorted(r["source_uri"] for r in rows) == sorted(str(p) for p in source.iterdir())  # each image exactly once
    assert not [p.name for p in output.iterdir() if p.name.startswith(".")]
