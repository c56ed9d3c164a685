"""The Ray Serve application: a FastAPI ingress, a separately scaled model deployment and a batch-job manager.

    HTTP -> Ingress (CPU: auth, limits, decode, encode) -> Model (GPU: @serve.batch forward passes)
                                                        -> Jobs   (one replica: Ray Data batch jobs, see batch.py)

Started by ``pprl serve`` locally, or from ``serve_config.yaml`` (``serve deploy`` / a KubeRay RayService), whose
``args`` are :class:`ServeSettings`. See docs/serving.md for the API, the Parquet schema and the security model.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile

from pprl.config import EXPRESSIONS
from pprl.data.dataset import encode_png
from pprl.serve import security
from pprl.serve.batch import JobRequest
from pprl.serve.jobs import JobManager
from pprl.serve.security import IMAGE_TYPES, Rejected
from pprl.train.export import latent_gate

log = logging.getLogger(__name__)
APP_NAME = "pprl"
PUBLIC_PATHS = frozenset({"/healthz"})
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})


@dataclass
class ServeSettings:
    """The application's settings: the ``args`` of serve_config.yaml, or ``pprl serve`` options."""

    model_uri: str  # model bundle folder (local or s3://)
    device: str | None = None  # torch device of the model replicas; None = cuda when the replica has a GPU
    # model deployment
    num_gpus: float = 0.0  # per model replica
    model_num_cpus: float = 1.0  # per model replica
    min_replicas: int = 1  # autoscaling bounds of the model deployment
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0  # autoscaling target per model replica
    max_batch_size: int = 16  # @serve.batch
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    max_ongoing_requests: int = 32  # per model replica; must be >= max_batch_size or batches never fill
    # ingress
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25
    ingress_max_ongoing_requests: int = 256
    max_body_bytes: int = security.Limits.max_body_bytes
    max_pixels: int = security.Limits.max_pixels
    token_env: str = security.TOKEN_ENV  # env var holding the bearer token
    insecure_local: bool = False  # allow starting without a token (local development only)
    public_docs: bool = False  # serve /docs and /openapi.json without the token
    # batch jobs
    allowed_prefixes: list[str] = field(default_factory=list)  # job inputs/outputs must lie under one of these
    job_batch_size: int = 32
    job_actors: int = 1
    job_num_gpus: float = 0.0
    max_running_jobs: int = 1
    # the latent gate: export the latent although the bundle's privacy audit did not pass (recorded in every output)
    export_unaudited_latent: bool = False

    def __post_init__(self) -> None:
        if not self.model_uri:
            raise ValueError("model_uri is required: the model bundle folder (local or s3://)")
        if self.max_batch_size < 1 or self.job_batch_size < 1:
            raise ValueError("max_batch_size and job_batch_size must be >= 1")
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} < max_batch_size={self.max_batch_size}: "
                "a replica would never receive enough requests to fill a batch"
            )
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        self.allowed_prefixes = list(self.allowed_prefixes)
        for prefix in self.allowed_prefixes:
            security.normalize_uri(prefix)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServeSettings:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown serve setting(s) {unknown}; valid settings: {sorted(names)}")
        return cls(**data)


# --- model ------------------------------------------------------------------------------------------------------


@serve.deployment(name="Model", health_check_period_s=10, health_check_timeout_s=60)
class ModelDeployment:
    """One Anonymizer per replica; concurrent requests are merged into batched forward passes. The latent leaves the
    replica only when the bundle's privacy audit passed or the operator overrode the gate."""

    def __init__(
        self, model_uri: str, device: str | None, max_batch_size: int, batch_wait_timeout_s: float,
        export_unaudited_latent: bool,
    ):  # fmt: skip
        from pprl.anonymizer import Anonymizer

        self.model = Anonymizer.load(model_uri, device=device)
        self.gate = latent_gate(model_uri, export_unaudited_latent, self.model.info)
        self.gate.log(f"serving {model_uri}")
        self.max_batch_size = max_batch_size
        self.anonymize.set_max_batch_size(max_batch_size)
        self.anonymize.set_batch_wait_timeout_s(batch_wait_timeout_s)
        log.info("model %s (version %s) loaded on %s", model_uri, self.model.version, self.model.device)

    def info(self) -> dict[str, Any]:
        m = self.model
        return {
            "version": m.version,
            "image_size": m.image_size,
            "num_identities": m.num_identities,
            "num_expressions": m.num_expressions,
            "latent_dim": m.latent_dim,
            "expressions": list(EXPRESSIONS[: m.num_expressions]),
            "max_batch_size": self.max_batch_size,
            "latent": self.gate.record(),
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def anonymize(self, images: list[np.ndarray], targets: list[int]) -> list[dict[str, Any]]:
        """One forward pass for the whole batch (off the event loop, so the next batch keeps filling)."""
        result = await asyncio.to_thread(self.model.run, np.stack(images), np.asarray(targets, np.int64))
        return self.outputs(result)

    def outputs(self, result: Any) -> list[dict[str, Any]]:
        """One response per image of an ``AnonymizeResult``; the latent only when the gate exports it."""
        n = len(result.images)
        return [
            {
                "image": result.images[i],
                **({"latent": np.asarray(result.latents[i], np.float32)} if self.gate.exported else {}),
                "expression_probs": np.asarray(result.expression_probs[i], np.float32),
                "target": int(result.targets[i]),
                "batch_size": n,
            }
            for i in range(n)
        ]

    async def check_health(self) -> None:
        """A real forward pass on a grey image: a replica whose model no longer runs is replaced."""
        size = self.model.image_size
        probe = np.full((1, size, size, 3), 128, np.uint8)
        result = await asyncio.to_thread(self.model.run, probe, np.zeros(1, np.int64))
        if result.images.shape != (1, size, size, 3) or not np.isfinite(result.latents).all():
            raise RuntimeError(f"health check: bad model output (images {result.images.shape}, finite latents: {np.isfinite(result.latents).all()})")


# --- jobs -------------------------------------------------------------------------------------------------------


@serve.deployment(name="Jobs", num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class JobsDeployment:
    """Holds job state and drives Ray Data pipelines from background threads (one replica: one source of truth).

    Methods return ``(status, value)`` so refusals cross the handle as data, not as wrapped exceptions.
    """

    def __init__(self, max_running: int):
        self.manager = JobManager(max_running)

    def submit(self, kind: str, request: JobRequest) -> tuple[int, Any]:
        return _outcome(self.manager.submit, kind, request)

    def get(self, job_id: str) -> tuple[int, Any]:
        return _outcome(self.manager.get, job_id)

    def cancel(self, job_id: str) -> tuple[int, Any]:
        return _outcome(self.manager.cancel, job_id)

    def list(self) -> tuple[int, Any]:
        return _outcome(self.manager.list)


def _outcome(fn, *args) -> tuple[int, Any]:
    try:
        return 200, fn(*args)
    except Rejected as err:
        return err.status, err.message


def _unwrap(outcome: tuple[int, Any]) -> Any:
    status, value = outcome
    if status != 200:
        raise Rejected(status, value)
    return value


# --- ingress ----------------------------------------------------------------------------------------------------


class JobBody(BaseModel):
    """``POST /v1/jobs`` body."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(..., description="s3:// or local prefix of PNG/JPEG images, a dataset folder, or its manifest.parquet")
    output: str = Field(..., description="prefix that receives part-*.parquet files (rerunning with it resumes)")
    kind: str = Field("images", description="job kind (see GET /v1/info for the list)")
    identity: str = Field("random", description="index | random (stable per source) | pseudonym:<key>")
    store_inputs: bool = Field(False, description="also keep the original image bytes in the input_image column")
    options: dict[str, Any] = Field(default_factory=dict, description="settings of other job kinds")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front end. Builds its FastAPI app per replica (``__serve_build_asgi_app__``) from the settings."""

    def __init__(self, model: DeploymentHandle, jobs: DeploymentHandle, settings: dict[str, Any]):
        from starlette.formparsers import MultiPartParser

        self.settings = ServeSettings.from_dict(settings)
        self.token = security.load_token(self.settings.token_env, self.settings.insecure_local)
        self.tokens = security.TokenCheck(self.token)
        self.secret = security.pseudonym_secret(self.token)
        self.model = model
        self.jobs = jobs
        self._info: dict[str, Any] | None = None
        # Uploads within the body limit stay in memory: input images are never written to this replica's disk.
        MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, self.settings.max_body_bytes)
        if not self.tokens.enabled:
            log.warning("serving WITHOUT authentication (insecure_local): do not expose this port")

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_api(self)

    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.model.info.remote()
        return self._info

    async def anonymize(self, request: Request, identity: str, output_format: str, details: bool) -> Response:
        data, declared = await read_image_body(request)
        info = await self.model_info()
        s = self.settings
        image = await asyncio.to_thread(security.decode_checked, data, info["image_size"], s.max_pixels, declared)
        target = security.parse_target(identity, info["num_identities"], self.secret)
        out = await self.model.anonymize.remote(image, target)
        encoded = encode_image(out["image"], output_format)
        probs = out["expression_probs"]
        expression = info["expressions"][int(probs.argmax())]
        headers = {
            "X-Target-Identity": str(out["target"]),
            "X-Expression": expression,
            "X-Batch-Size": str(out["batch_size"]),
            "X-Model-Version": info["version"],
        }
        if not details:
            return Response(encoded, media_type=f"image/{output_format}", headers=headers)
        body = {
            "image": base64.b64encode(encoded).decode("ascii"),
            "media_type": f"image/{output_format}",
            "size": info["image_size"],
            "target_identity": out["target"],
            "expression": expression,
            "expression_probs": {label: float(p) for label, p in zip(info["expressions"], probs, strict=True)},
            **latent_fields(out, info["latent"]),
            "model_version": info["version"],
            "batch_size": out["batch_size"],
        }
        return JSONResponse(body, headers=headers)

    async def submit_job(self, body: JobBody) -> dict[str, Any]:
        s = self.settings
        source = security.check_allowed(body.input, s.allowed_prefixes, "input")
        output = security.check_allowed(body.output, s.allowed_prefixes, "output")
        info = await self.model_info()
        security.check_target_spec(body.identity, info["num_identities"])
        request = JobRequest(
            input=source,
            output=output,
            model_uri=s.model_uri,
            identity=body.identity,
            store_inputs=body.store_inputs,
            batch_size=s.job_batch_size,
            actors=s.job_actors,
            num_gpus=s.job_num_gpus,
            device=s.device,
            max_pixels=s.max_pixels,
            pseudonym_secret=self.secret,
            export_unaudited_latent=s.export_unaudited_latent,
            options=body.options,
        )
        return _unwrap(await self.jobs.submit.remote(body.kind, request))


def latent_fields(out: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The ``details=true`` fields about the latent: ``latent`` (only when the gate exports it), ``latent_kind``, and
    ``latent_audit`` (the gate's record: audit status, override, why)."""
    fields: dict[str, Any] = {"latent": [float(v) for v in out["latent"]]} if "latent" in out else {}
    audit = {k: v for k, v in record.items() if k != "latent_kind"}
    return {**fields, "latent_kind": record["latent_kind"], "latent_audit": audit}


async def read_image_body(request: Request) -> tuple[bytes, str]:
    """The image bytes and their declared type, from a raw PNG/JPEG body or a multipart ``image`` file field."""
    ctype = security.media_type(request.headers.get("content-type"))
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=4)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise Rejected(400, "multipart body needs a file field named 'image'")
        declared = security.media_type(upload.content_type)
        if declared not in IMAGE_TYPES:
            raise Rejected(415, f"the 'image' part is {declared or 'untyped'}; send image/png or image/jpeg")
        return await upload.read(), declared
    if ctype in IMAGE_TYPES:
        return await request.body(), ctype
    raise Rejected(415, f"Content-Type {ctype or '(none)'} is not supported; send image/png, image/jpeg, or multipart/form-data with an 'image' file")


def encode_image(image: np.ndarray, output_format: str) -> bytes:
    if output_format == "png":
        return encode_png(image)
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def create_api(ingress: Ingress) -> FastAPI:
    """The FastAPI app of one ingress replica; routes close over it."""
    s = ingress.settings
    api = FastAPI(
        title="pprl anonymisation service",
        description="PPRL-VGAN face anonymisation: online (`/v1/anonymize`) and batch (`/v1/jobs`). Bearer token on every route but /healthz.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    api.add_middleware(security.BodyLimitMiddleware, max_bytes=s.max_body_bytes)
    public = PUBLIC_PATHS | (DOCS_PATHS if s.public_docs else frozenset())
    api.add_middleware(security.AuthMiddleware, tokens=ingress.tokens, public_paths=public)  # outermost: runs first
    api.add_exception_handler(Rejected, lambda _req, err: JSONResponse({"detail": err.message}, status_code=err.status))
    # The middleware enforces the token; this declaration only puts the scheme into the OpenAPI document.
    v1 = APIRouter(prefix="/v1", dependencies=[Security(HTTPBearer(auto_error=False))])

    @api.get("/healthz", tags=["health"])
    async def healthz() -> JSONResponse:
        """Liveness and readiness: 200 once a model replica answers. No token needed."""
        try:
            info = await asyncio.wait_for(ingress.model.info.remote(), timeout=10)
        except Exception as err:
            return JSONResponse({"status": "unavailable", "detail": f"model not ready: {type(err).__name__}"}, status_code=503)
        return JSONResponse({"status": "ok", "model_version": info["version"]})

    @v1.get("/info", tags=["model"])
    async def info() -> dict[str, Any]:
        """The model (version, size, identities, expressions) and the limits this server enforces."""
        from pprl.serve.jobs import JOB_KINDS

        limits = {"max_body_bytes": s.max_body_bytes, "max_pixels": s.max_pixels, "max_batch_size": s.max_batch_size}
        return {"model": await ingress.model_info(), "limits": limits, "job_kinds": sorted(JOB_KINDS)}

    @v1.post(
        "/anonymize",
        tags=["online"],
        responses={200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the anonymised face, or JSON with details=true"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}},
                },
            }
        },
    )
    async def anonymize(
        request: Request,
        identity: str = Query("random", description="target identity: an index, 'random', or 'pseudonym:<key>' (same key -> same avatar)"),
        format: Literal["png", "jpeg"] = Query("png", description="output image format"),
        details: bool = Query(False, description="return JSON: base64 image, expression + probabilities, target identity, latent"),
    ) -> Response:
        """Anonymise one aligned face: same expression, the target identity's appearance."""
        return await ingress.anonymize(request, identity, format, details)

    @v1.post("/jobs", tags=["batch"], status_code=202)
    async def submit_job(body: JobBody) -> dict[str, Any]:
        """Start a batch job; poll ``GET /v1/jobs/{id}``. Input and output must lie under the configured allowed_prefixes."""
        return await ingress.submit_job(body)

    @v1.get("/jobs", tags=["batch"])
    async def list_jobs() -> list[dict[str, Any]]:
        return _unwrap(await ingress.jobs.list.remote())

    @v1.get("/jobs/{job_id}", tags=["batch"])
    async def get_job(job_id: str) -> dict[str, Any]:
        """State (queued/running/cancelling/succeeded/failed/cancelled), counts and output location."""
        return _unwrap(await ingress.jobs.get.remote(job_id))

    @v1.delete("/jobs/{job_id}", tags=["batch"])
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel: stops after the part file being written; a rerun with the same output resumes."""
        return _unwrap(await ingress.jobs.cancel.remote(job_id))

    api.include_router(v1)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url=request.scope.get("root_path", "") + "/openapi.json", title=api.title)

    return api


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder (``import_path: pprl.serve.app:build_app``); ``args`` are :class:`ServeSettings` fields."""
    s = ServeSettings.from_dict(dict(args))
    model = ModelDeployment.options(
        ray_actor_options={"num_gpus": s.num_gpus, "num_cpus": s.model_num_cpus},
        max_ongoing_requests=s.max_ongoing_requests,
        autoscaling_config={"min_replicas": s.min_replicas, "max_replicas": s.max_replicas, "target_ongoing_requests": s.target_ongoing_requests},
    ).bind(s.model_uri, s.device, s.max_batch_size, s.batch_wait_timeout_s, s.export_unaudited_latent)
    jobs = JobsDeployment.bind(s.max_running_jobs)
    ingress = Ingress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=s.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    )
    return ingress.bind(model, jobs, asdict(s))


def forwarded_env(settings: ServeSettings) -> dict[str, str]:
    """Variables replicas need when they run on a cluster that did not inherit this process's environment."""
    from pprl import storage

    names = (settings.token_env, security.PSEUDONYM_SECRET_ENV)
    return {**storage.s3_env(), **{k: os.environ[k] for k in names if k in os.environ}}
