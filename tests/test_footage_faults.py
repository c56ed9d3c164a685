"""Archive runs under the faults an operator meets at scale: a flaky S3, a lost worker node, a killed driver.

Every test checks the same bookkeeping: each input video exactly once in ``index.parquet`` (a done or an error
row), each finished video's ``faces.parquet`` once and whole, nothing partial or temporary left in the output, and
no finished video done twice. The clips are tiny (a few 128x64 frames, one face, boxes from a sidecar) and the model
is the untrained 16-px ``tiny_bundle``: what is tested is the plumbing, not the pictures.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from pprl import cluster
from pprl.footage import pipeline, testclips
from pprl.footage.audit import AuditOptions
from pprl.footage.detect import DetectorSpec
from pprl.footage.pipeline import FACES_SUFFIX, INDEX_NAME, FootageOptions, TargetPolicy, anonymize_footage


def archive_options(model: str, root: Path | str, **kwargs) -> FootageOptions:
    return FootageOptions(model=model, detector=DetectorSpec.parse(f"sidecar:{root}/boxes"), batch_frames=4,
                          policy=TargetPolicy("random-per-track", seed=7), **kwargs)


def check_exactly_once(out: Path, index: pd.DataFrame, inputs: int, corrupt: set[str]) -> None:
    """Every input once in the index, the corrupt ones as errors; every finished video's faces.parquet whole and
    without duplicate rows; no staging file left."""
    assert len(index) == inputs and index.video_uri.is_unique
    assert set(index[index.status == "error"].video_uri) == corrupt
    for row in index[index.status == "done"].itertuples():
        faces = pd.read_parquet(row.faces_uri)
        assert len(faces) == row.faces and not faces.duplicated(["frame_index", "track_id", "kind"]).any(), row.video_uri
        assert Path(row.output_uri).is_file()
    assert not [str(p) for p in out.rglob(".*")]  # nothing partial or temporary


# --- transient S3 faults ----------------------------------------------------------------------------------------


def test_transient_s3_faults_are_retried_counted_and_change_no_output(s3_server, s3_bucket, tmp_path, tiny_bundle, monkeypatch):
    """Between pprl and S3, a proxy answers 503 SlowDown to 2 requests in 12 and drops the connection of 3 more
    (before the server sees the request, after it acted on it, halfway through the response): the run retries
    through, counts what it met, and writes exactly what a fault-free run writes."""
    from pprl import storage
    from s3_fault_proxy import FaultProxy

    corrupt = testclips.synthetic_archive(tmp_path, 4, corrupt_every=4)
    for path in sorted((tmp_path / "in").rglob("*.mp4")) + sorted((tmp_path / "boxes").rglob("*.parquet")):
        storage.write_bytes(f"{s3_bucket}/{path.relative_to(tmp_path)}", path.read_bytes())
    options = archive_options(tiny_bundle, s3_bucket, audit=AuditOptions(mode="all"))  # "sample" scans what time allows
    clean = anonymize_footage(f"{s3_bucket}/in", f"{s3_bucket}/clean", options, num_workers=0, progress=False)
    with FaultProxy(s3_server) as proxy, monkeypatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        met = storage.s3_retries()
        faulty = anonymize_footage(f"{s3_bucket}/in", f"{s3_bucket}/faulty", options, num_workers=0, progress=False)
        met = storage.s3_retries() - met
    assert min(proxy.faults[kind] for kind in ("slow-down", "drop-before", "drop-after", "truncate")) >= 3, proxy.faults
    assert proxy.faults["slow-down"] <= met <= sum(proxy.faults.values())  # every 503 counted; aiohttp re-sends some drops unseen
    assert clean.s3_retries == clean.index.s3_retries.sum() == 0
    assert faulty.s3_retries == faulty.index.s3_retries.sum() > 0
    assert list(clean.index.status) == ["done", "done", "error", "done"]  # cam0/clip00000 ... cam3/clip00003
    assert {f"{s3_bucket}/in/{Path(p).relative_to(tmp_path / 'in')}" for p in corrupt} == set(clean.index[clean.index.status == "error"].video_uri)
    moved = ["output_uri", "faces_uri", "suspects_uri", "seconds", "finished_at", "s3_retries"]
    pd.testing.assert_frame_equal(faulty.index.drop(columns=moved), clean.index.drop(columns=moved))
    listed = {prefix: sorted(uri.split(f"/{prefix}/", 1)[1] for uri in storage.list_files(f"{s3_bucket}/{prefix}")) for prefix in ("clean", "faulty")}
    assert listed["faulty"] == listed["clean"]  # every output exactly once, nothing partial or temporary
    for rel in listed["clean"]:
        before, after = storage.read_bytes(f"{s3_bucket}/clean/{rel}"), storage.read_bytes(f"{s3_bucket}/faulty/{rel}")
        if rel.endswith(FACES_SUFFIX):
            pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(after)), pd.read_parquet(io.BytesIO(before)))
        elif rel != INDEX_NAME:
            assert after == before, rel  # the videos byte for byte


# --- a lost worker node ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def worker_node(head: cluster.LocalHead, num_cpus: int = 1):
    """A second ``ray start`` joining ``head`` on loopback with its own CPUs, in its own process group; yields its
    ``Popen`` and the environment mark its processes carry (some Ray workers run in sessions of their own)."""
    from ray.util.state import list_nodes

    mark = f"PPRL_TEST_NODE={uuid.uuid4().hex[:8]}"
    flags = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-grpc-port",
             "dashboard-agent-listen-port", "runtime-env-agent-port")
    cmd = [cluster.ray_executable("ray"), "start", f"--address={head.address}", "--block", f"--node-ip-address={cluster.LOOPBACK}",
           f"--num-cpus={num_cpus}", *(f"--{flag}={cluster.free_port()}" for flag in flags), "--disable-usage-stats"]
    env = {**cluster.env_with_this_python(), **cluster.local_token_env(), mark.split("=")[0]: mark.split("=")[1]}
    node = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.time() + 90
        while len(list_nodes(address=head.dashboard, filters=[("state", "=", "ALIVE")])) < 2:
            assert node.poll() is None and time.time() < deadline, "the worker node did not join"
            time.sleep(0.5)
        yield node, mark
    finally:
        for pid in [node.pid, *cluster.live_processes(pgid=node.pid, env_mark=mark)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait()


def running_a_video(node: subprocess.Popen, mark: str) -> bool:
    """Whether a worker of the node is executing a video task (Ray names the process after the task)."""
    for pid in cluster.live_processes(pgid=node.pid, env_mark=mark):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::process_video_safe"):
                return True
    return False


@pytest.mark.slow
def test_an_archive_run_survives_losing_a_worker_node(tmp_path, tiny_bundle, monkeypatch):
    """200 clips on a head and a worker node (one CPU each, a video task each); once a third are done and the worker
    node is running a video, its raylet's process group is killed. Ray re-runs its tasks on the head (at most 2
    retries a task: ``_run_ray``'s ``max_retries``), and the output has every video exactly once."""
    from ray.util.state import list_tasks

    corrupt = testclips.synthetic_archive(tmp_path, 200)
    out = tmp_path / "out"
    with cluster.LocalHead(num_cpus=1) as head, worker_node(head) as (node, mark):
        monkeypatch.setenv("RAY_ADDRESS", head.address)
        monkeypatch.setattr(pipeline, "INDEX_EVERY_S", 2.0)  # so that the index is rewritten during the run here
        killed: dict[str, int] = {}

        def kill_the_node_mid_run() -> None:
            while len(list(out.rglob(f"*{FACES_SUFFIX}"))) < 200 // 3 or not running_a_video(node, mark):
                time.sleep(0.01)
            killed["finished"] = len(list(out.rglob(f"*{FACES_SUFFIX}")))
            os.killpg(node.pid, signal.SIGKILL)
            while not (out / INDEX_NAME).exists():
                time.sleep(0.05)
            killed["index_rows"] = len(pd.read_parquet(out / INDEX_NAME))  # readable while the run goes on

        threading.Thread(target=kill_the_node_mid_run, daemon=True).start()
        started = time.time()
        summary = anonymize_footage(str(tmp_path / "in"), str(out), archive_options(tiny_bundle, tmp_path, audit=AuditOptions(mode="off")),
                                    num_workers=2, progress=False)
        seconds = time.time() - started
        attempts = list_tasks(address=head.dashboard, filters=[("func_or_class_name", "=", "process_video_safe")], detail=True,
                              limit=10_000, raise_on_missing_output=False)
    print(f"200 videos on two nodes, the worker node killed after {killed.get('finished')}: {seconds:.1f} s; attempts: "
          f"{collections.Counter((a.state, a.attempt_number, a.error_type) for a in attempts)}")
    assert 200 // 3 <= killed.get("finished", 200) < 200 - 2, "the node was not killed mid-run"
    assert 0 < killed["index_rows"] < 200
    check_exactly_once(out, summary.index, 200, corrupt)
    assert (summary.processed, summary.errors) == (200, len(corrupt))
    nodes = {a.node_id for a in attempts if a.state == "FINISHED"}
    assert len(nodes) == 2  # the tasks were spread over both nodes
    lost = [a for a in attempts if a.error_type == "NODE_DIED"]
    assert lost, "no task was running on the node when it died"
    finished = {(a.task_id, a.node_id) for a in attempts if a.state == "FINISHED"}
    for attempt in lost:  # re-run, elsewhere, within the bound
        assert any(task == attempt.task_id and where != attempt.node_id for task, where in finished)
    assert max(a.attempt_number for a in attempts) <= 2
    again = anonymize_footage(str(tmp_path / "in"), str(out), archive_options(tiny_bundle, tmp_path), num_workers=0, progress=False)
    assert (again.processed, again.skipped) == (0, 200)


# --- a killed driver -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_killed_driver_is_resumed_without_redoing_a_finished_video(tmp_path, tiny_bundle):
    """``pprl anonymize-footage`` killed with SIGKILL at a point drawn at random; the rerun processes exactly the
    videos not finished, leaves the finished ones untouched, and heals the index from their faces.parquet."""
    corrupt = testclips.synthetic_archive(tmp_path, 60, corrupt_every=20)
    out = tmp_path / "out"
    kill_after = random.Random(18).randint(10, 45)
    cmd = [sys.executable, "-m", "pprl", "anonymize-footage", "--input", str(tmp_path / "in"), "--output", str(out), "--model", tiny_bundle,
           "--detector", f"sidecar:{tmp_path / 'boxes'}", "--num-workers", "0", "--no-audit", "--no-progress", "--seed", "7"]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list(out.rglob(f"*{FACES_SUFFIX}"))) < kill_after:
        assert driver.poll() is None, f"the run ended before it could be killed: {driver.stderr.read()[-2000:]}"
        time.sleep(0.01)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    faces = list(out.rglob(f"*{FACES_SUFFIX}"))  # a video is finished once its faces.parquet is in place
    finished = {p: p.stat().st_mtime_ns for f in faces for p in (f, f.with_name(f.name.removesuffix(FACES_SUFFIX)))}
    rerun = anonymize_footage(str(tmp_path / "in"), str(out), archive_options(tiny_bundle, tmp_path, audit=AuditOptions(mode="off")),
                              num_workers=0, progress=False)
    kept_errors = len(corrupt) - rerun.errors  # error rows in the killed run's last index write are not retried
    assert rerun.skipped == len(faces) + kept_errors and rerun.processed == 60 - rerun.skipped
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # no finished video redone
    check_exactly_once(out, rerun.index, 60, corrupt)
