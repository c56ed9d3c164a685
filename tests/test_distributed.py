"""Distributed training end to end: real `ray job submit` against a real `ray start --head`, 2 DDP workers on CPU (gloo).

Each job trains cpu-quick for a few tiny steps; what is checked is the platform around the trainer: checkpoints and
the model bundle in local or S3 storage, a worker crash that is survived (with either loader), resuming by name,
collapse rollback (in one process and across ranks), and that after every epoch all ranks hold bit-identical parameters.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pprl import storage

REPO = Path(__file__).resolve().parents[1]
STEPS = 2  # per epoch
OVERRIDES = [f"train.steps_per_epoch={STEPS}", "train.batch_size=8", "train.d_warmup_steps=0", "train.num_workers=0", "train.sample_rows=2", "train.log_every=0"]
TINY = ["--preset", "cpu-quick", *(arg for item in OVERRIDES for arg in ("--set", item))]

pytestmark = pytest.mark.slow


def submit(ray_head: dict, log_dir: Path, args: list[str], env: dict[str, str] | None = None, timeout: int = 420) -> str:
    """`ray job submit --working-dir . -- python jobs/train.py ARGS`; waits for the end, returns the job's log."""
    env_vars = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}  # `python` = this venv's
    cmd = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head["dashboard"],
        "--working-dir", ".", "--runtime-env-json", json.dumps({"env_vars": env_vars}),
        "--", "python", "jobs/train.py", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    saved = Path(log_dir, f"job-{uuid.uuid4().hex[:6]}.log")
    saved.write_text(log)
    assert proc.returncode == 0 and "succeeded" in log, f"job failed ({proc.returncode}), whole log in {saved}:\n{log[-6000:]}"
    return log


def metrics_rows(run: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(storage.read_text(storage.join(run, "metrics.csv")))))


def checkpoints(run: str) -> list[str]:
    """Checkpoint folders Ray kept in the run folder (named by epoch)."""
    return sorted({Path(storage.strip_scheme(f)).parent.name for f in storage.list_files(run) if f.endswith("trainer.pt")})


def checkpoint_digest(ckpt: str) -> str:
    """Trainer.parameter_digest() of the trainer state in a checkpoint folder, computed here, outside the run."""
    import torch

    from pprl.config import Config
    from pprl.train.distributed import STATE_FILE
    from pprl.train.trainer import Trainer

    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(ckpt, STATE_FILE))), map_location="cpu", weights_only=True)
    trainer = Trainer(Config.from_dict(state["config"]), iter(()), device="cpu", steps_per_epoch=1)
    trainer.load_state_dict(state)
    return trainer.parameter_digest()


def check_ranks_agree(run: str, last_checkpoint: str, world_size: int = 2) -> list[str]:
    """Every epoch, every rank reported the same digest of all its parameters (networks, latent heads, weight
    averages); the last one is that of the last checkpoint. Returns each epoch's digest."""
    epochs = []
    for row in metrics_rows(run):
        digests = row["param_digests"].split()
        assert len(digests) == world_size and len(set(digests)) == 1, f"ranks disagree after epoch {row['epoch']}: {digests}"
        epochs.append(digests[0])
    assert epochs[-1] == checkpoint_digest(last_checkpoint)
    assert len(set(epochs)) == len(epochs)  # and the parameters did change from epoch to epoch
    return epochs


def check_run(run: str, epochs: int) -> None:
    rows = metrics_rows(run)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))  # no epoch counted twice
    assert int(rows[-1]["step"]) == epochs * STEPS
    last = rows[-1]
    assert float(last["images_per_s_worker"]) > 0
    assert float(last["images_per_s"]) == pytest.approx(2 * float(last["images_per_s_worker"]))  # job total, 2 workers
    assert checkpoints(run)[-1] == f"epoch_{epochs:04d}"
    assert len(checkpoints(run)) <= 2  # --keep-checkpoints default
    ckpt = storage.join(run, checkpoints(run)[-1])
    check_ranks_agree(run, ckpt)
    assert storage.exists(storage.join(ckpt, "rng-0.pt")) and storage.exists(storage.join(ckpt, "rng-1.pt"))
    for name in ("model.pt", "config.yaml", "domain.npz", "bundle.json"):
        assert storage.exists(storage.join(run, "model", name)), name
    info = json.loads(storage.read_text(storage.join(run, "model", "bundle.json")))
    assert info["step"] == epochs * STEPS and info["domain"]["faces"] > 0  # the domain check's statistics (pprl.domain)
    assert storage.exists(storage.join(run, "samples", f"epoch_{epochs:04d}.png"))
    assert storage.list_files(storage.join(run, "tensorboard"))


def test_job_local_storage_then_resume_by_name(ray_head, small_data, tmp_path):
    """2 workers, 2 epochs into a local folder; the same --name with --epochs 3 continues where it stopped."""
    store, name = str(tmp_path / "runs"), f"local-{uuid.uuid4().hex[:6]}"
    log = submit(ray_head, tmp_path, [*TINY, "--num-workers", "2", "--data", small_data, "--storage", store, "--name", name, "--epochs", "2"])
    run = storage.join(store, name)
    check_run(run, epochs=2)
    assert "images_per_s" in log  # per-epoch metrics are in the job's log
    from pprl.anonymizer import Anonymizer

    model = Anonymizer.load(storage.join(run, "model"))
    assert model.image_size == 32 and model.num_identities == 6

    log = submit(ray_head, tmp_path, [*TINY, "--num-workers", "2", "--data", small_data, "--storage", store, "--name", name, "--epochs", "3"])
    assert "resumed at epoch 2" in log
    check_run(run, epochs=3)


def test_collapse_on_one_rank_rolls_every_rank_back_to_the_same_checkpoint(ray_head, small_data, tmp_path):
    """Rank 1 alone flags a collapse after epoch 2: both ranks roll back to the epoch-1 checkpoint (the same
    parameters, bit for bit), reseed, replay epoch 2 and finish with identical parameters and a bundle."""
    store, name = str(tmp_path / "runs"), f"rollback-{uuid.uuid4().hex[:6]}"
    # patience 0: the detector itself stays quiet in so short a run, only the injected collapse counts
    args = [*TINY, "--set", "train.collapse_patience=0", "--num-workers", "2", "--loader", "torch", "--keep-checkpoints", "3",
            "--data", small_data, "--storage", store, "--name", name, "--epochs", "3"]
    log = submit(ray_head, tmp_path, args, env={"PPRL_COLLAPSE_AT": "1:2"})
    run = storage.join(store, name)
    assert "rank 1 flags a collapse at epoch 2" in log and "rolled back to epoch 1 with seed 1" in log
    assert checkpoints(run) == ["epoch_0001", "epoch_0002-r1", "epoch_0003-r1"]  # the collapsed epoch 2 was never kept
    rows = metrics_rows(run)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3] and int(rows[-1]["step"]) == 3 * STEPS
    per_epoch = check_ranks_agree(run, storage.join(run, "epoch_0003-r1"))
    before = checkpoint_digest(storage.join(run, "epoch_0001"))
    assert per_epoch[0] == before
    run_state = json.loads(storage.read_text(storage.join(run, "epoch_0003-r1", "run_state.json")))
    assert run_state["rollbacks"] == 1 and run_state["seed"] == 1
    # each rank's own digest right after its rollback: both loaded the epoch-1 checkpoint's parameters
    assert run_state["rollback_log"] == [{"collapsed_at": 2, "to_epoch": 1, "seed": 1, "param_digests": [before, before]}]
    assert json.loads(storage.read_text(storage.join(run, "model", "bundle.json")))["step"] == 3 * STEPS


@pytest.fixture
def s3_data(small_data, s3_bucket) -> str:
    """small_data copied to the loopback S3 server."""
    root = Path(small_data)
    dest = f"{s3_bucket}/datasets/small"
    files = [p for p in root.rglob("*") if p.is_file()]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda p: storage.write_bytes(storage.join(dest, str(p.relative_to(root))), p.read_bytes()), files))
    return dest


def test_job_s3_storage_survives_a_worker_crash_with_dali(ray_head, s3_data, s3_bucket, tmp_path):
    """Data and run storage on S3: staged to local disk for DALI, checkpoints through pyarrow, bundle through s3fs.

    Rank 1 exits mid-epoch 2; Ray restarts the group from the epoch-1 checkpoint on S3 (new DALI pipelines on every
    rank, at epoch 2's data position) and the run ends at the right step. One job carries both checks: a job costs
    about a minute of Ray start-up on 2 cores. Local checkpoints are restored by the resume test, and the PyTorch
    loader's restart is the rollback test's (it replays an epoch from a checkpoint the same way)."""
    name = f"s3-{uuid.uuid4().hex[:6]}"
    store = f"{s3_bucket}/runs"
    env = {**storage.s3_env(), "PPRL_CACHE_DIR": str(tmp_path / "stage"), "PPRL_FAIL_AT_STEP": f"1:{STEPS + 1}"}
    args = [*TINY, "--num-workers", "2", "--loader", "dali", "--data", s3_data, "--storage", store, "--name", name, "--epochs", "2"]
    log = submit(ray_head, tmp_path, args, env=env)
    run = storage.join(store, name)
    assert storage.exists(storage.join(run, f".fault-injected-rank1-step{STEPS + 1}"))
    assert "rank 1 exits at step" in log and "resumed at epoch 1, step 2" in log  # from the checkpoint, not from scratch
    check_run(run, epochs=2)
    assert any((tmp_path / "stage").rglob("*.png"))


def test_collapse_rolls_back_once_then_gives_up(small_data, tmp_path, caplog):
    """A diverging run (lr=1: NaNs, D accuracies pinned) rolls back with a new seed once, then stops with a clear error."""
    from pprl.config import load_config
    from pprl.train.distributed import TrainJob, launch

    cfg = load_config("cpu-quick", overrides=[*OVERRIDES, "train.steps_per_epoch=1", "optim.lr=1.0", "train.collapse_patience=1", "train.epochs=4"])
    job = TrainJob(config=cfg.to_dict(), data=small_data, storage=str(tmp_path), name="collapse", num_workers=0, loader="torch")
    with pytest.raises(RuntimeError, match="after one rollback"):
        launch(job)
    assert re.search(r"rolled back to epoch \d+ with seed 1", caplog.text)  # to the last healthy state, reseeded
    assert not storage.exists(storage.join(job.run_uri, "model", "model.pt"))  # no bundle from a collapsed run


BLOCK_RAY_AND_DALI = """
import runpy, sys
class Block:  # a GPU box may have neither: prove the check never imports them
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith(("ray.", "nvidia.dali")):
            raise ImportError(f"blocked for this test: {name}")
sys.meta_path.insert(0, Block())
sys.argv = ["bench/gpu_check.py", *sys.argv[1:]]
runpy.run_path("bench/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_smoke_on_cpu_without_ray_or_dali(tmp_path):
    """bench/gpu_check.py: the real Trainer and Anonymizer path, a table of numbers, no Ray or DALI needed."""
    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--steps", "5", "--warmup", "1", "--batch-size", "4", "--anon-batches", "1,4", "--anon-seconds", "0.2", "--json", str(out)]
    proc = subprocess.run([sys.executable, "-c", BLOCK_RAY_AND_DALI, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "| train | eager | 4 |" in proc.stdout and "| anonymize | Anonymizer.anonymize | 4 |" in proc.stdout
    result = json.loads(out.read_text())
    assert result["flops_per_image"] > 1e8  # paper-ferg at 64x64: ~1.3 GFLOP per training image
    assert [(r["phase"], r["batch"]) for r in result["rows"]] == [("train", 4), ("anonymize", 1), ("anonymize", 4)]
    assert all(r["per_s"] > 0 for r in result["rows"])
