"""Batch jobs behind ``/v1/jobs``: a registry of job kinds and a manager that runs them in background threads.

Job kinds are pluggable. ``JOB_KINDS`` maps a kind to its runner, given as ``"module:function"`` (imported lazily,
in the process that runs the job) or as a callable::

    def runner(request: JobRequest, progress: Progress) -> Progress | None

A runner lists its inputs, skips those already in ``request.output``, writes Parquet parts in the face schema
(``pprl.serve.schema``) and keeps ``progress`` current; it checks ``progress.cancel`` between blocks (the images job
publishes its parts through ``progress.publish``, so that nothing appears in its output once a cancel has returned).
Another area adds its kind with one line here (or ``register_job_kind`` at import time of a module listed here).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pprl.serve.batch import JobRequest, Progress
from pprl.serve.security import Rejected

log = logging.getLogger(__name__)
JobRunner = Callable[[JobRequest, Progress], Any]

JOB_KINDS: dict[str, str | JobRunner] = {
    "images": "pprl.serve.batch:run_images_job",
    "footage": "pprl.footage.pipeline:run_footage_job",  # videos -> anonymised videos + faces.parquet (docs/footage.md)
}
ACTIVE = ("queued", "running", "cancelling")
KEEP_FINISHED = 500  # finished jobs remembered for GET; older ones are forgotten (their Parquet stays)


def register_job_kind(kind: str, runner: str | JobRunner) -> None:
    JOB_KINDS[kind] = runner


def resolve_runner(kind: str) -> JobRunner:
    if kind not in JOB_KINDS:
        raise Rejected(400, f"unknown job kind {kind!r}; available: {', '.join(sorted(JOB_KINDS))}")
    target = JOB_KINDS[kind]
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Job:
    id: str
    kind: str
    request: JobRequest
    progress: Progress = field(default_factory=Progress)
    state: str = "queued"  # queued | running | cancelling | succeeded | failed | cancelled
    error: str | None = None  # why the job failed (bad files never fail a job: they become error rows)
    submitted_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "input": self.request.input,
            "output": self.request.output,
            "identity": self.request.identity,
            "counts": self.progress.to_dict(),
            "error": self.error,
            "submitted_at": self.submitted_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }


class JobManager:
    """Runs up to ``max_running`` jobs at a time; the rest wait in submission order."""

    def __init__(self, max_running: int = 1):
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_running, thread_name_prefix="pprl-job")

    def submit(self, kind: str, request: JobRequest) -> dict[str, Any]:
        runner = resolve_runner(kind)
        with self._lock:
            busy = [j.id for j in self._jobs.values() if j.state in ACTIVE and j.request.output.rstrip("/") == request.output.rstrip("/")]
            if busy:
                raise Rejected(409, f"output {request.output} is being written by job {busy[0]}; wait for it or cancel it")
            job = Job(id=uuid.uuid4().hex, kind=kind, request=request)
            self._jobs[job.id] = job
            self._forget_old()
        self._pool.submit(self._run, job, runner)
        return job.to_dict()

    def get(self, job_id: str) -> dict[str, Any]:
        return self._job(job_id).to_dict()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [j.to_dict() for j in self._jobs.values()]

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self._job(job_id)
        job.progress.request_cancel()
        with self._lock:
            if job.state == "queued":
                job.state, job.finished_at = "cancelled", time.time()
            elif job.state == "running":
                job.state = "cancelling"
        return job.to_dict()

    def _job(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise Rejected(404, f"no job {job_id!r} (unknown, or forgotten after a restart; its Parquet output is kept)")
        return job

    def _run(self, job: Job, runner: JobRunner) -> None:
        with self._lock:
            if job.progress.cancel.is_set():
                return
            job.state, job.started_at = "running", time.time()
        try:
            runner(job.request, job.progress)
            state, error = ("cancelled" if job.progress.cancel.is_set() else "succeeded"), None
        except Exception as err:  # the job fails, the server does not
            log.exception("job %s failed", job.id)
            state, error = "failed", f"{type(err).__name__}: {err}"
        with self._lock:
            job.state, job.error, job.finished_at = state, error, time.time()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.state not in ACTIVE]
        for job in sorted(finished, key=lambda j: j.submitted_at)[: max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[job.id]
