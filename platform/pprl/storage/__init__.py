"""Every URI the platform touches goes through here: local paths, ``file://`` and ``s3://``.

S3 settings come from the standard environment variables, so MinIO and AWS both work:
``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``. Writes are atomic: a reader sees the old object or the whole new one, never half.

Transient S3 faults (5xx, SlowDown and other throttling, dropped connections) are retried with backoff by the
S3 clients themselves: botocore's standard retry mode makes up to :data:`S3_MAX_ATTEMPTS` attempts per request
(exponential backoff with full jitter), and s3fs repeats a whole call that still failed on throttling or a broken
connection up to :data:`S3FS_CALL_REPEATS` times; pyarrow's own S3 client, used by Ray Data and Ray Train, makes
up to :data:`S3_MAX_ATTEMPTS` attempts. Every failed attempt of pprl's own requests is counted
(:func:`s3_retries`), so a run can say how many faults it absorbed. A permanent fault (no bucket, access denied)
is not retried: it becomes a :class:`StorageError` naming the bucket and the settings to check.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import tempfile
import threading
import uuid
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_ENV_VARS = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
)


SCHEMES = ("s3://", "file://")  # and plain local paths
_ANY_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):/")


class StorageError(RuntimeError):
    """A URI that cannot be read or written, with the reason in the message."""


class UnsupportedURI(StorageError, ValueError):
    """A URI with a scheme pprl does not read or write (it would otherwise become a local path)."""


def scheme(uri: str) -> str:
    """"s3", "file" or "local" (a plain path); any other ``scheme:/`` is refused, misspellings of ours included."""
    uri = str(uri)
    for known in SCHEMES:
        if uri.startswith(known):
            return known[: -len("://")]
    found = _ANY_SCHEME.match(uri)
    if found:
        supported = ", ".join(f"{s}..." for s in SCHEMES)
        raise UnsupportedURI(f"{uri}: the scheme {found.group(1)!r} is not supported; use a local path, {supported}")
    return "local"


def is_s3(uri: str) -> bool:
    return scheme(uri) == "s3"


def strip_scheme(uri: str) -> str:
    """``s3://b/k`` -> ``b/k``; ``file:///x`` -> ``/x``; plain paths unchanged."""
    uri = str(uri)
    kind = scheme(uri)
    if kind == "file":
        return urlparse(uri).path
    if kind == "s3":
        return uri[len("s3://") :]
    return uri


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if scheme(uri) != "local":
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(uri, *parts))


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_env() -> dict[str, str]:
    """The S3 variables set in this process, to forward to Ray workers through ``runtime_env``."""
    return {k: os.environ[k] for k in S3_ENV_VARS if k in os.environ}


def check_endpoint(endpoint: str | None = None, timeout: float = 3.0) -> None:
    """Fail fast, naming the endpoint, when an S3 endpoint does not accept connections."""
    endpoint = endpoint or s3_endpoint()
    if not endpoint:
        return
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise StorageError(f"S3 endpoint {endpoint} is not reachable ({err}); check AWS_ENDPOINT_URL_S3") from None


S3_MAX_ATTEMPTS = 5  # per S3 request, the first included: botocore's standard retry mode, and pyarrow's
S3FS_CALL_REPEATS = 5  # s3fs repeats a call that still failed on throttling or a broken connection (its own default)


class _RetryCounter:
    """Failed attempts of this process's S3 requests that were transient (the kind the clients retry)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def on_attempt(self, response=None, caught_exception=None, **_) -> None:
        """botocore's ``needs-retry`` event: called after every attempt, successful or not."""
        status = response[0].status_code if response is not None else None
        if caught_exception is not None or (status is not None and (status >= 500 or status == 429)):
            with self._lock:
                self.count += 1


_RETRIES = _RetryCounter()


def s3_retries() -> int:
    """Transient S3 faults this process has met so far (each one retried, unless its request ran out of attempts)."""
    return _RETRIES.count


@lru_cache(maxsize=8)
def _s3fs(endpoint: str | None, key: str | None, secret: str | None, region: str | None):
    import s3fs
    from aiobotocore.session import AioSession

    client_kwargs = {"region_name": region} if region else {}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    session = AioSession()
    session.register("needs-retry.s3", _RETRIES.on_attempt)
    fs = s3fs.S3FileSystem(
        key=key,
        secret=secret,
        anon=False,
        session=session,
        client_kwargs=client_kwargs,
        config_kwargs={"connect_timeout": 5, "read_timeout": 60,
                       "retries": {"mode": "standard", "total_max_attempts": S3_MAX_ATTEMPTS}},
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    fs.retries = S3FS_CALL_REPEATS
    return fs


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    if is_s3(uri):
        check_endpoint()
        env = os.environ
        fs = _s3fs(s3_endpoint(), env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_DEFAULT_REGION"))
        return fs, strip_scheme(uri)
    return fsspec.filesystem("file"), os.path.abspath(strip_scheme(uri))


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's own filesystem (not boto) for ``uri``: what Ray Train and Ray Data are given."""
    if is_s3(uri):
        check_endpoint()
        endpoint = s3_endpoint()
        kwargs: dict = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS)}
        if endpoint:
            parsed = urlparse(endpoint)
            kwargs["endpoint_override"] = parsed.netloc or endpoint
            kwargs["scheme"] = parsed.scheme or "https"
        if "AWS_ACCESS_KEY_ID" in os.environ:
            kwargs["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
            kwargs["secret_key"] = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
        return pafs.S3FileSystem(**kwargs), strip_scheme(uri)
    return pafs.LocalFileSystem(), os.path.abspath(strip_scheme(uri))


def exists(uri: str) -> bool:
    """Whether the file exists; on S3 a missing bucket is an error (StorageError), not a missing file."""
    fs, path = filesystem(uri)
    with _s3_faults(uri):
        found = fs.exists(path)
        if not found and is_s3(uri):
            _check_bucket(uri)
    return found


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def _s3_faults(uri: str):
    """S3 errors as :class:`StorageError` naming the URI. A missing bucket or denied access names the bucket and the
    settings to check: retrying cannot help, so the run stops at once instead of failing every item the same way.
    Any other error (a missing key aside, which stays FileNotFoundError) is what was left after the clients' retries."""
    try:
        yield
    except OSError as err:  # s3fs: FileNotFoundError / PermissionError / OSError(EBUSY) for throttling...
        if not is_s3(uri):
            raise
        fault = _permanent_fault(uri, err)
        if fault is not None:
            raise fault from None
        if isinstance(err, FileNotFoundError):
            raise
        raise StorageError(f"{uri}: {err} (S3 kept failing through the retries: {S3_MAX_ATTEMPTS} attempts a request, "
                           f"each call repeated up to {S3FS_CALL_REPEATS} times)") from err


def _permanent_fault(uri: str, err: OSError) -> StorageError | None:
    bucket = _bucket(uri)
    if isinstance(err, PermissionError) or "AccessDenied" in str(err) or "Access Denied" in str(err):
        return StorageError(f"{uri}: access to bucket {bucket!r} denied ({err}); check AWS_ACCESS_KEY_ID, "
                            "AWS_SECRET_ACCESS_KEY and the bucket's policy")
    try:
        _check_bucket(uri)
    except StorageError as missing:
        return missing
    except OSError:
        pass
    return None


_BUCKETS_SEEN: set[tuple[str | None, str]] = set()  # (endpoint, bucket) found to exist; buckets are rarely deleted


def _bucket(uri: str) -> str:
    return strip_scheme(uri).split("/", 1)[0]


def _check_bucket(uri: str) -> None:
    """StorageError naming the bucket and the settings to check when ``uri``'s bucket does not exist."""
    key = (s3_endpoint(), _bucket(uri))
    if key in _BUCKETS_SEEN:
        return
    fs, _ = filesystem(uri)
    if not fs.exists(key[1]):
        raise StorageError(f"{uri}: bucket {key[1]!r} does not exist at {key[0] or 'AWS'}; create it, or check "
                           "AWS_ENDPOINT_URL_S3 and AWS_DEFAULT_REGION")
    _BUCKETS_SEEN.add(key)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with _s3_faults(uri), fs.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such file") from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: a temporary sibling renamed into place locally; one PUT on S3 (atomic by design)."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with _s3_faults(uri):
            fs.pipe_file(path, data)
        return
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_parquet(table: pa.Table, uri: str) -> None:
    """Serialise in memory, then one atomic write."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(uri)
    try:
        with _s3_faults(uri), fs.open(path, "rb") as f:
            return pq.read_table(f, columns=columns)
    except FileNotFoundError:
        raise StorageError(f"{uri}: no such Parquet file") from None


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under a prefix (recursive), as full URIs in sorted order; a single file lists itself."""
    fs, path = filesystem(uri)
    with _s3_faults(uri):
        found = [path] if fs.isfile(path) else [p for p in fs.find(path) if not os.path.basename(p).startswith(".")]
    if suffixes:
        found = [p for p in found if p.lower().endswith(suffixes)]
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + p for p in found)


def unique_suffix() -> str:
    return uuid.uuid4().hex[:12]
