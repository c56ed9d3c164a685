"""What the serving endpoints accept: who may call, how big a request and an image may be, which paths a job may touch.

Every refusal is a :class:`Rejected` carrying the HTTP status and a message that says what to fix.
Checks run before any expensive work: the token before the body is read, the body size while it streams in,
the image's header (format and pixel count) before a single pixel is decoded.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import posixpath
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from pprl import storage
from pprl.data.dataset import DatasetError, decode_image

TOKEN_ENV = "PPRL_API_TOKEN"
PSEUDONYM_SECRET_ENV = "PPRL_PSEUDONYM_SECRET"
MIN_TOKEN_CHARS = 16
MAX_PSEUDONYM_KEY_CHARS = 256
# Declared content type -> the PIL format the bytes must really be. Only these decoders are ever run.
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Rejected(Exception):
    """A request the service refuses; ``status`` is the HTTP status code."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 8 * 2**20  # whole request body, checked while it streams in
    max_pixels: int = 4096 * 4096  # width x height read from the image header, checked before decoding


# --- authentication --------------------------------------------------------------------------------------------


def load_token(env_name: str = TOKEN_ENV, insecure_local: bool = False) -> str | None:
    """The API token from the environment; refuse to run without one unless explicitly insecure (local use)."""
    token = os.environ.get(env_name, "").strip()
    if token:
        if len(token) < MIN_TOKEN_CHARS:
            raise RuntimeError(f"{env_name} is only {len(token)} characters; use at least {MIN_TOKEN_CHARS} (e.g. `openssl rand -hex 32`)")
        return token
    if insecure_local:
        return None
    raise RuntimeError(
        f"{env_name} is not set: refusing to start without an API token. Set it (from a Kubernetes Secret in a cluster), "
        "or pass --insecure-local (insecure_local: true) for an unauthenticated server on your own machine."
    )


class TokenCheck:
    """Constant-time bearer-token comparison; holds only the token's digest."""

    def __init__(self, token: str | None):
        self._digest = _sha256(token) if token else None

    @property
    def enabled(self) -> bool:
        return self._digest is not None

    def check(self, authorization: str | None) -> None:
        if self._digest is None:
            return
        if not authorization:
            raise Rejected(401, "missing bearer token: send the header 'Authorization: Bearer <token>'")
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Rejected(401, "malformed Authorization header: expected 'Bearer <token>'")
        if not hmac.compare_digest(_sha256(value.strip()), self._digest):
            raise Rejected(401, "invalid bearer token")


def _sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class AuthMiddleware:
    """ASGI middleware: every path but ``public_paths`` needs the bearer token, checked before the body is read."""

    def __init__(self, app, tokens: TokenCheck, public_paths: frozenset[str]):
        self.app = app
        self.tokens = tokens
        self.public_paths = public_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.tokens.enabled and _route_path(scope) not in self.public_paths:
            header = dict(scope.get("headers") or []).get(b"authorization")
            try:
                self.tokens.check(header.decode("latin-1") if header else None)
            except Rejected as err:
                await _send_json(send, err.status, err.message, [(b"www-authenticate", b'Bearer realm="pprl"')])
                return
        await self.app(scope, receive, send)


def _route_path(scope) -> str:
    """The path below the application's route prefix (Serve passes the prefix as ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] or "/" if root and path.startswith(root) else path


# --- request bodies and images ---------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """ASGI middleware: 413 when Content-Length or the bytes actually streamed exceed ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            problem = self._declared_problem(declared)
            if problem:
                await _send_json(send, *problem)
                return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise Rejected(413, f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def _declared_problem(self, declared: bytes) -> tuple[int, str] | None:
        try:
            length = int(declared)
        except ValueError:
            return 400, f"invalid Content-Length header {declared[:32]!r}"
        if length > self.max_bytes:
            return 413, f"request body of {length} bytes exceeds the limit of {self.max_bytes} bytes"
        return None


async def _send_json(send, status: int, message: str, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def check_image_header(data: bytes, max_pixels: int, declared_type: str | None = None, source: str = "request body") -> str:
    """Read only the header: reject empty, non-PNG/JPEG, oversized (decompression bombs) and mislabelled images.

    Returns the PIL format name. Nothing is decoded here, so a 20000x20000 PNG costs a few bytes to reject.
    """
    if not data:
        raise Rejected(400, f"{source} is empty: send the PNG or JPEG bytes of an aligned face")
    try:
        with Image.open(io.BytesIO(data), formats=tuple(sorted(set(IMAGE_TYPES.values())))) as im:
            fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as err:
        raise Rejected(413, f"{source}: image too large ({err}); the limit is {max_pixels} pixels (decompression-bomb guard)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise Rejected(422, f"{source} is not a readable PNG or JPEG image ({err})") from None
    if width * height > max_pixels:
        raise Rejected(413, f"{source} is {width}x{height} = {width * height} pixels; the limit is {max_pixels} (decompression-bomb guard)")
    expected = IMAGE_TYPES.get(media_type(declared_type)) if declared_type else None
    if expected and expected != fmt:
        raise Rejected(415, f"Content-Type {media_type(declared_type)} does not match the body, which is a {fmt} image")
    return fmt


def decode_checked(data: bytes, size: int, max_pixels: int, declared_type: str | None = None, source: str = "request body") -> np.ndarray:
    """Header checks, then a full decode to uint8 RGB (size, size, 3); truncated or corrupt data -> 422."""
    check_image_header(data, max_pixels, declared_type, source)
    try:
        return decode_image(data, size, source=source)
    except DatasetError as err:
        raise Rejected(422, str(err)) from None


# --- target identities -----------------------------------------------------------------------------------------


def pseudonym_secret(token: str | None) -> bytes:
    """Key of the pseudonym HMAC: ``PPRL_PSEUDONYM_SECRET``, else derived from the API token, else a fixed local-only key."""
    secret = os.environ.get(PSEUDONYM_SECRET_ENV, "")
    if secret:
        return secret.encode("utf-8")
    if token:
        return hmac.new(token.encode("utf-8"), b"pprl-pseudonym", hashlib.sha256).digest()
    return b"pprl-insecure-local-pseudonyms"


def pseudonym_identity(key: str, secret: bytes, num_identities: int) -> int:
    """Same key and secret -> same identity; without the secret the mapping cannot be recomputed or inverted."""
    digest = hmac.new(secret, key.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") % num_identities


def parse_target(spec: str | None, num_identities: int, secret: bytes, random_key: str | None = None) -> int:
    """``"3"`` | ``"random"`` | ``"pseudonym:<key>"`` -> an identity index in ``[0, num_identities)``.

    ``random`` draws fresh randomness, or, given ``random_key`` (batch jobs pass the source URI), a stable
    draw per key so a rerun renders the same avatar.
    """
    spec = (spec if spec is not None else "random").strip()
    if spec == "random":
        if random_key is None:
            return secrets.randbelow(num_identities)
        return int.from_bytes(hashlib.sha256(random_key.encode("utf-8")).digest()[:8], "big") % num_identities
    if spec.startswith("pseudonym:"):
        key = spec[len("pseudonym:") :]
        if not key or len(key) > MAX_PSEUDONYM_KEY_CHARS:
            raise Rejected(400, f"identity=pseudonym:<key> needs a key of 1 to {MAX_PSEUDONYM_KEY_CHARS} characters")
        return pseudonym_identity(key, secret, num_identities)
    try:
        index = int(spec)
    except ValueError:
        raise Rejected(400, f"identity={spec[:40]!r}: expected an index, 'random' or 'pseudonym:<key>'") from None
    if not 0 <= index < num_identities:
        raise Rejected(400, f"identity={index} is out of range: this model has {num_identities} identities (0..{num_identities - 1})")
    return index


def check_target_spec(spec: str, num_identities: int) -> None:
    """Validate a target spec without drawing (jobs check theirs when submitted)."""
    parse_target(spec, num_identities, b"check", random_key="check")


# --- job paths -------------------------------------------------------------------------------------------------


def normalize_uri(uri: str) -> str:
    """``s3://bucket/key`` with no ``.``/``..`` segments, or a resolved absolute local path (symlinks followed)."""
    uri = str(uri).strip()
    try:
        kind = storage.scheme(uri)
    except storage.UnsupportedURI as err:
        raise Rejected(400, str(err)) from None
    if kind == "s3":
        key = uri[len("s3://") :]
        parts = key.rstrip("/").split("/")
        if not parts[0] or any(p in (".", "..", "") for p in parts):
            raise Rejected(400, f"{uri!r} is not a clean s3://bucket/prefix URI (empty, '.' or '..' segments)")
        return "s3://" + "/".join(parts)
    path = storage.strip_scheme(uri)
    if not path:
        raise Rejected(400, "empty path")
    return os.path.realpath(path)


def check_allowed(uri: str, allowed: Sequence[str], what: str) -> str:
    """The normalised ``uri`` if it lies under one of the ``allowed`` prefixes, else 403 naming the prefixes."""
    if not allowed:
        raise Rejected(403, f"{what} {uri!r} refused: batch jobs are disabled until the server config lists allowed_prefixes")
    normalized = normalize_uri(uri)
    for prefix in allowed:
        root = normalize_uri(prefix).rstrip("/")
        if normalized == root or normalized.startswith(root + "/"):
            return normalized
    raise Rejected(403, f"{what} {uri!r} is outside the allowed prefixes: {', '.join(allowed)}")


def is_image_name(path: str) -> bool:
    return posixpath.basename(path).lower().endswith(IMAGE_SUFFIXES)
