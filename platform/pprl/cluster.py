"""The one home for Ray: joining a cluster, starting a private one, the runtime env and the auth token.

Every pprl command that needs Ray goes through :func:`connect` (or :func:`ray_session`):

- ``address`` (a command's ``--address``) or ``RAY_ADDRESS`` set: join that cluster. Under ``ray job submit`` Ray sets
  ``RAY_ADDRESS`` for the entrypoint, so jobs join the cluster they were submitted to.
- neither set: start a *private* local Ray for this command, on loopback, with token authentication on and a token
  generated for this process. A cluster already running on the machine is never joined by accident (Ray's own
  ``ray.init()`` would join it, or crash on a stale pointer to a dead one): one log line says which happened.

:class:`LocalHead` is a ``ray start --head`` that pprl owns (the demo's cluster, the tests' cluster): free ports, its own
temp folder, token auth, and a stop that ends exactly the processes it started.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pprl import storage

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_ENV = "RAY_AUTH_TOKEN"
HEAD_MARK_ENV = "PPRL_RAY_HEAD"  # set in a LocalHead's environment, so that every process it starts can be found
TOKEN_HINT = (
    f"a Ray cluster with token authentication (Ray's default) needs its token here: put it in ~/.ray/auth_token, "
    f"or point {TOKEN_PATH_ENV} at a file that holds it, or set {TOKEN_ENV}"
)

_process_token: Path | None = None


class ClusterError(RuntimeError):
    """Ray could not be joined or started; the message says what to do."""


class HeadExited(ClusterError):
    """``ray start`` gave up while starting (e.g. a port taken between choosing and binding it)."""


# ----------------------------------------------------------------------------------------------------- the token
def local_token_env() -> dict[str, str]:
    """Token-auth settings for the clusters this process starts: one token per process, in a 0600 file.

    The file lives in a private 0700 temp folder that is removed when the process exits. The variables are also put in
    ``os.environ``, so this process, the Ray processes it starts and the clients it runs (``ray job submit``) agree.
    """
    global _process_token
    if _process_token is None:
        folder = Path(tempfile.mkdtemp(prefix="pprl-ray-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        path = folder / "auth_token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        _process_token = path
    env = {AUTH_MODE_ENV: "token", TOKEN_PATH_ENV: str(_process_token)}
    os.environ.update(env)
    _forget_cached_token()
    return env


def _forget_cached_token() -> None:
    """Ray caches the token a process read first; make it read the one now configured (private API, guarded)."""
    with contextlib.suppress(ImportError, AttributeError):
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def token_available() -> bool:
    """Whether a client here has a token to offer: ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, or
    ``~/.ray/auth_token``."""
    if os.environ.get(TOKEN_ENV):
        return True
    path = os.environ.get(TOKEN_PATH_ENV)
    return Path(path).is_file() if path else (Path.home() / ".ray" / "auth_token").is_file()


def use_token_if_available() -> None:
    """A client that has a token sends it (Ray's clients send none unless ``RAY_AUTH_MODE=token``); an explicit
    ``RAY_AUTH_MODE`` is left as it is."""
    if AUTH_MODE_ENV not in os.environ and token_available():
        os.environ[AUTH_MODE_ENV] = "token"
        _forget_cached_token()


def auth_headers() -> dict[str, str]:
    """The HTTP header that Ray's dashboard wants from a client of a token cluster (empty without a token)."""
    token = os.environ.get(TOKEN_ENV)
    path = Path(os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token")
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# ----------------------------------------------------------------------------------------------- runtime env
def runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """What every Ray worker of pprl needs: the S3 settings, ``extra_env``, and under ``ray job submit --working-dir .``
    this copy of ``pprl`` ahead of any installed one (workers start in their copy of the working dir)."""
    import pprl

    env = {**storage.s3_env(), **(extra_env or {})}
    platform_dir = Path(pprl.__file__).resolve().parents[1]
    if platform_dir.is_relative_to(Path.cwd().resolve()):
        relative = str(platform_dir.relative_to(Path.cwd().resolve()))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (relative, os.environ.get("PYTHONPATH")) if p)
    return {"env_vars": env}


# ----------------------------------------------------------------------------------------------- connecting
def connect(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    extra_env: dict[str, str] | None = None,
    purpose: str = "this command",
    log_to_driver: bool = True,
) -> str | None:
    """Join ``address`` (default ``RAY_ADDRESS``) or start a private local Ray; see the module docstring.

    Returns "joined" or "local" when this call connected (the caller shuts Ray down when done), None when this process
    was already connected."""
    import ray

    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = runtime_env(extra_env)
    if address:
        _join(address, env, purpose, log_to_driver)
        return "joined"
    local_token_env()
    ray.init(
        address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
        runtime_env=env, log_to_driver=log_to_driver, _node_ip_address=LOOPBACK,
    )
    cpus = int(ray.cluster_resources().get("CPU", 0))
    log.info("started a private local Ray for %s (%d CPUs, token auth); to use a running cluster instead, set "
             "RAY_ADDRESS or pass --address", purpose, cpus)
    return "local"


def _join(address: str, env: dict[str, Any], purpose: str, log_to_driver: bool) -> None:
    import ray

    env = _without_job_env(env)
    use_token_if_available()
    try:
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=log_to_driver)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        hint = "" if token_available() else f"; if it runs, {TOKEN_HINT}"
        raise ClusterError(f"could not join the Ray cluster at {address} for {purpose}: {err}{hint}") from None
    log.info("joined the Ray cluster at %s for %s", address, purpose)


def _without_job_env(env: dict[str, Any]) -> dict[str, Any]:
    """``env`` less the variables a ``ray job submit`` runtime env already sets: Ray refuses a driver's runtime env that
    names the same variable as its job's, even with the same value."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {**env, "env_vars": {k: v for k, v in env["env_vars"].items() if k not in taken}}


@contextlib.contextmanager
def ray_session(address: str | None = None, **kwargs: Any) -> Iterator[str | None]:
    """:func:`connect` for the duration of a ``with`` block; disconnects only if it connected."""
    import ray

    started = connect(address, **kwargs)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


# ----------------------------------------------------------------------------------------------- a head of our own
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def dashboard_status(url: str) -> int | None:
    """HTTP status of the Ray dashboard's version endpoint at ``url``; None when nothing answers there.

    401 means the cluster uses token authentication and this client has no (or the wrong) token."""
    request = urllib.request.Request(f"{url}/api/version", headers=auth_headers())
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


_PORT_FLAGS = (
    "port", "ray-client-server-port", "node-manager-port", "object-manager-port", "metrics-export-port",
    "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "runtime-env-agent-port",
)


@dataclass
class LocalHead:
    """``ray start --head --block`` on loopback, free ports, its own temp folder, with token authentication.

    The head runs in its own process session, so :meth:`stop` ends exactly the processes it started (GCS, raylet,
    dashboard, workers, job drivers) and never another Ray on the machine, which ``ray stop`` would.
    """

    num_cpus: int = 2
    dashboard_port: int = 0  # 0: a free one
    log_path: Path | None = None  # the head's output (default: in its temp folder)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the head (and so its workers)
    address: str = ""
    dashboard: str = ""
    temp_dir: str = ""
    _proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120, attempts: int = 3) -> LocalHead:
        """Start the head; a start that fails (a free port taken by someone else before Ray bound it) is retried on new
        ports, ``attempts`` times in all."""
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(timeout_s)
                break
            except HeadExited as err:
                if attempt == attempts:
                    raise
                log.warning("%s; trying again on other ports", err)
        log.info("started a local Ray head at %s (dashboard %s, token auth)", self.address, self.dashboard)
        return self

    def _start_once(self, timeout_s: float) -> None:
        ports = {flag: free_port() for flag in _PORT_FLAGS}
        dashboard_port = self.dashboard_port or free_port()
        self.temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths stay under 107 chars
        self.address = f"{LOOPBACK}:{ports['port']}"
        self.dashboard = f"http://{LOOPBACK}:{dashboard_port}"
        cmd = [
            ray_executable("ray"), "start", "--head", "--block", f"--node-ip-address={LOOPBACK}",
            *(f"--{flag}={port}" for flag, port in ports.items()),
            f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
            f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
        ]
        env = {**env_with_this_python(), **local_token_env(), **self.env, HEAD_MARK_ENV: self.temp_dir}
        log_path = self.log_path or Path(self.temp_dir) / "head.log"
        with open(log_path, "w") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._wait(timeout_s, log_path)

    def _wait(self, timeout_s: float, log_path: Path) -> None:
        deadline = time.time() + timeout_s
        while dashboard_status(self.dashboard) != 200:
            if self._proc.poll() is not None:
                self._kill_all()
                raise HeadExited(f"ray start exited with {self._proc.returncode}; its output is in {log_path}")
            if time.time() > deadline:
                self._kill_all()
                raise ClusterError(f"the Ray dashboard did not answer at {self.dashboard}; see {log_path}")
            time.sleep(0.5)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def stop(self, grace_s: float = 3, timeout_s: float = 15) -> None:
        """SIGTERM to every process of this head, SIGKILL to what is left after ``grace_s`` (a ``ray start --block``
        asked politely takes half a minute and leaves its agents behind). "Of this head": its process group, and any
        process that carries the head's mark in its environment (Ray starts some workers in sessions of their own)."""
        if self._proc is None:
            return
        self._kill_all(grace_s, timeout_s)
        self._proc = None
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_all(self, grace_s: float = 3, timeout_s: float = 15) -> None:
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, timeout_s)):
            for pid in self._processes():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + wait_s
            while self._processes() and time.time() < deadline:
                time.sleep(0.1)
                self._proc.poll()  # reap the head itself
        self._proc.wait()

    def _processes(self) -> list[int]:
        return live_processes(pgid=self._proc.pid, env_mark=f"{HEAD_MARK_ENV}={self.temp_dir}")

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def live_processes(pgid: int | None = None, env_mark: str | None = None) -> list[int]:
    """Running processes (zombies do not count) of process group ``pgid`` or with ``env_mark`` ("NAME=value") in their
    environment."""
    found = []
    mark = env_mark.encode() if env_mark else None
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            state, _ppid, group = (proc / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            if state == "Z":
                continue
            if int(group) == pgid or (mark and mark in (proc / "environ").read_bytes().split(b"\0")):
                found.append(int(proc.name))
    return found


def ray_executable(name: str) -> str:
    """``ray``/``serve`` of this interpreter's environment (``make demo`` does not activate .venv)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def env_with_this_python() -> dict[str, str]:
    """This environment with this interpreter's bin/ first on PATH, so that a job's ``python`` entrypoint runs in the
    environment pprl is installed in."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
