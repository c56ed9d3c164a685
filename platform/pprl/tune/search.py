"""The search driver: judges once, data once, a Ray Tune run of function trials under ASHA, then the reports.

    job = TuneJob(config=load_config("cpu-quick").to_dict(), space=read_space(), data="data/ferg", storage="runs/tune", name="t1")
    outcome = run_search(job)

``{storage}/{name}/`` holds Tune's experiment (trial folders, checkpoints), ``search.json`` (the job and how often
the judges were trained), ``judges.pt`` and the results of :mod:`pprl.tune.report`. Running a job with an existing
name continues it (``Tuner.restore``) with the settings saved in ``search.json``; finished trials are not rerun,
unfinished ones continue from their last epoch checkpoint, and the judges are loaded, not retrained.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

from pprl import cluster, storage
from pprl.config import Config
from pprl.tune import judges as judge_store
from pprl.tune.data import TuneData, prepare
from pprl.tune.objective import SCORE
from pprl.tune.report import Outcome, SearchSummary, write_results
from pprl.tune.space import base_point, check_space, parse_space
from pprl.tune.trial import TrialInputs, run_trial

log = logging.getLogger(__name__)

SEARCH_FILE = "search.json"


@dataclass
class TuneJob:
    """Everything the driver decides; saved to ``search.json`` so a resumed search keeps its settings."""

    config: dict[str, Any]  # base Config.to_dict(); each trial's parameters go on top
    space: dict[str, Any]  # search space mapping (see pprl.tune.space)
    data: str  # dataset folder (local, file:// or s3://)
    storage: str  # results root (local path or s3://bucket/prefix)
    name: str  # {storage}/{name}/ holds the search; the same name resumes it
    num_samples: int = 8  # trials, the base config's weights included
    max_concurrent: int = 2  # trials running at once
    gpus_per_trial: float = 0.0  # fractions share a GPU (e.g. 0.25: four trials per GPU)
    cpus_per_trial: float = 1.0
    privacy_weight: float = 1.0  # w in score = expression_acc - w * max(0, privacy_leak) (pprl.tune.objective)
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: float = 3.0  # ASHA: keep the top 1/rf at each rung
    val_fraction: float = 0.1  # of the train split, carved out (stratified) as the validation images
    val_limit: int = 1000  # at most this many validation images (0 = no cap)
    judge_epochs: int = 10  # the authors' 10 epochs
    judge_limit: int = 0  # train the judges on at most this many images (0 = all)
    judge_batch_size: int = 256
    include_base: bool = True  # run the base config's own weights (the paper's) as the first trial
    max_failures: int = 1  # retries of a failed trial from its last checkpoint
    seed: int = 0  # validation split, targets, judges, sampling of the space

    @property
    def run_uri(self) -> str:
        return storage.join(self.storage, self.name)

    def settings(self) -> dict[str, Any]:
        """The job as plain data, for search.json and the report."""
        return asdict(self)

    def judge_settings(self, fingerprint: str) -> dict[str, Any]:
        return {
            "data": self.data, "val_fraction": self.val_fraction, "val_limit": self.val_limit, "seed": self.seed,
            "size": Config.from_dict(self.config).model.image_size, "epochs": self.judge_epochs,
            "batch_size": self.judge_batch_size, "limit": self.judge_limit, "val_fingerprint": fingerprint,
        }


def check_job(job: TuneJob) -> Config:
    """Everything that can be checked before Ray starts, with the flag to fix."""
    cfg = Config.from_dict(job.config)
    checks = [
        (job.num_samples >= 1, f"--num-samples must be >= 1, got {job.num_samples}"),
        (job.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {job.max_concurrent}"),
        (job.gpus_per_trial >= 0 and job.cpus_per_trial > 0, f"--gpus-per-trial must be >= 0 and --cpus-per-trial > 0, got {job.gpus_per_trial}, {job.cpus_per_trial}"),
        (job.privacy_weight >= 0, f"--privacy-weight must be >= 0, got {job.privacy_weight}"),
        (job.grace_period >= 1, f"--grace-period must be >= 1, got {job.grace_period}"),
        (job.reduction_factor > 1, f"--reduction-factor must be > 1, got {job.reduction_factor}"),
        (job.judge_epochs >= 1, f"--judge-epochs must be >= 1, got {job.judge_epochs}"),
        (bool(job.name) and "/" not in job.name, f"--name must be a plain folder name, got {job.name!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    check_space(parse_space(job.space), cfg)
    return cfg


def check_data(job: TuneJob, cfg: Config, data: TuneData) -> None:
    if data.view.num_identities != cfg.model.num_identities:
        raise ValueError(
            f"{job.data} has {data.view.num_identities} identities but model.num_identities={cfg.model.num_identities}: "
            f"pass --set model.num_identities={data.view.num_identities}"
        )
    if len(data.train[0]) < cfg.train.batch_size:
        raise ValueError(
            f"{job.data}: {len(data.train[0])} training images after carving the validation split, fewer than "
            f"train.batch_size={cfg.train.batch_size}: lower it with --set train.batch_size=N"
        )


# ----------------------------------------------------------------------------------------------------------- driver
def run_search(job: TuneJob, address: str | None = None) -> Outcome:
    """Start or resume the search named ``job.name``; returns where the results are and what they say."""
    import ray

    check_job(job)
    fs, root = storage.arrow_filesystem(job.storage)
    experiment = posixpath.join(root, job.name)
    resuming = _can_restore(experiment, fs)
    meta = read_meta(job.run_uri)
    if resuming and meta:
        job = resumed_job(meta["job"], job)
    cfg = check_job(job)
    data = _prepare(job, cfg)  # before Ray starts: a bad dataset fails fast
    with cluster.ray_session(address, purpose="the search's trials"):
        shared, trained = obtain_judges(job, data)
        write_meta(job, meta, shared, trained, resuming)
        inputs = TrialInputs(job.config, ray.put(shared), ray.put(data.train), ray.put(data.val), job.privacy_weight, job.cpus_per_trial)
        make_tuner(job, inputs, experiment, fs, resuming).fit()
        return write_results(_analysis(experiment, fs), summary(job, cfg, data, shared))


def _prepare(job: TuneJob, cfg: Config) -> TuneData:
    from pprl.data.dataset import load_dataset

    start = time.perf_counter()
    data = prepare(load_dataset(job.data), cfg.model.image_size, job.val_fraction, job.val_limit, job.seed)
    check_data(job, cfg, data)
    log.info("data: %d training, %d validation images at %dpx (%.1fs)", len(data.train[0]), len(data.val.images),
             cfg.model.image_size, time.perf_counter() - start)
    return data


def obtain_judges(job: TuneJob, data: TuneData) -> tuple[judge_store.SharedJudges, bool]:
    """The search's judges: loaded from ``judges.pt`` when trained for the same settings, else trained now (once)."""
    import ray

    uri = storage.join(job.run_uri, judge_store.JUDGES_FILE)
    settings = job.judge_settings(judge_store.fingerprint(data.val.images))
    if storage.exists(uri):
        shared = judge_store.load(uri)
        if shared.settings == settings:
            log.info("judges loaded from %s (token %s)", uri, shared.token)
            return shared, False
        log.warning("%s was trained with other settings: training the judges again", uri)
    start = time.perf_counter()
    task = ray.remote(judge_store.train_shared).options(num_cpus=job.cpus_per_trial, num_gpus=job.gpus_per_trial)
    shared = ray.get(task.remote(data.view, settings, data.val))
    judge_store.save(shared, uri)
    log.info("judges trained in %.1fs (token %s): originals identity %.3f, expression %.3f", time.perf_counter() - start,
             shared.token, shared.reference["identity_acc"], shared.reference["expression_acc"])
    return shared, True


# ----------------------------------------------------------------------------------------------------------- tune
def make_tuner(job: TuneJob, inputs: TrialInputs, experiment: str, fs, resuming: bool):
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, inputs=inputs), {"cpu": job.cpus_per_trial, "gpu": job.gpus_per_trial}
    )
    if resuming:
        log.info("resuming the search at %s", experiment)
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    cfg = Config.from_dict(job.config)
    params = parse_space(job.space)
    epochs = cfg.train.epochs
    return tune.Tuner(
        trainable,
        param_space={p.field: p.domain() for p in params},
        tune_config=tune.TuneConfig(
            metric=SCORE,
            mode="max",
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(job.grace_period, epochs), reduction_factor=job.reduction_factor),
            search_alg=BasicVariantGenerator(  # it limits concurrency itself (max_concurrent_trials only wraps Searchers)
                points_to_evaluate=[base_point(params, cfg)] if job.include_base else None,
                max_concurrent=job.max_concurrent,
                random_state=job.seed,
            ),
            num_samples=job.num_samples,
            reuse_actors=True,  # the next trial starts in the finished one's process: no new worker, no second import of torch
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=job.name,
            storage_path=posixpath.dirname(experiment),
            storage_filesystem=fs,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # 1 would force an experiment snapshot per report
            failure_config=tune.FailureConfig(max_failures=job.max_failures),
            verbose=1,
        ),
    )


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _can_restore(experiment: str, fs) -> bool:
    from ray import tune

    return tune.Tuner.can_restore(experiment, storage_filesystem=fs)


def _analysis(experiment: str, fs):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(experiment, storage_filesystem=fs, default_metric=SCORE, default_mode="max")


# ----------------------------------------------------------------------------------------------------------- metadata
def read_meta(run_uri: str) -> dict[str, Any] | None:
    uri = storage.join(run_uri, SEARCH_FILE)
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def resumed_job(saved: dict[str, Any], requested: TuneJob) -> TuneJob:
    """The saved job, with this run's storage location; differing requested settings are reported, not applied."""
    known = {f.name for f in fields(TuneJob)}
    job = TuneJob(**{k: v for k, v in saved.items() if k in known})
    job.storage, job.name = requested.storage, requested.name
    changed = [k for k in known - {"storage", "name"} if getattr(job, k) != getattr(requested, k)]
    if changed:
        log.warning("resuming %s with its saved settings; ignoring the new value(s) of: %s", job.name, ", ".join(sorted(changed)))
    return job


def write_meta(job: TuneJob, meta: dict[str, Any] | None, shared, trained: bool, resuming: bool) -> None:
    """``search.json``: the job, the judges' token and how many times this search trained judges (once, normally)."""
    meta = dict(meta or {})
    meta.update({
        "job": job.settings(),
        "judges_trained": int(meta.get("judges_trained", 0)) + int(trained),
        "judges_token": shared.token,
        "judges_reference": shared.reference,
        "driver_runs": int(meta.get("driver_runs", 0)) + 1,
        "resumed": int(meta.get("resumed", 0)) + int(resuming),
    })
    storage.write_text(storage.join(job.run_uri, SEARCH_FILE), json.dumps(meta, indent=2))


def summary(job: TuneJob, cfg: Config, data: TuneData, shared) -> SearchSummary:
    params = parse_space(job.space)
    return SearchSummary(
        run_uri=job.run_uri,
        base=job.config,
        params=[p.field for p in params],
        base_point=base_point(params, cfg) if job.include_base else None,
        max_epochs=cfg.train.epochs,
        num_samples=job.num_samples,
        num_identities=cfg.model.num_identities,
        num_expressions=cfg.model.num_expressions,
        privacy_weight=job.privacy_weight,
        reference=shared.reference,
        settings={k: v for k, v in job.settings().items() if k != "config"} | {"validation_images": len(data.val.images)},
    )
