"""The privacy-vs-utility evaluation: the paper's three attack scenarios, stronger attackers, linkage, target success,
and the attack suite with its bars (``pprl.evaluate.attacks``).

Works on any object with the ``Anonymizer`` interface (``image_size``, ``num_identities``, ``run``,
``predict_expression``; ``morph``/``complete`` for the applications), so a deliberately non-anonymising stand-in
goes through exactly the same code as a trained model.

Flow: load the dataset at the model's size -> anonymise train and test images once, each with a random target
identity (never the source's own unless asked) -> put the arrays into Ray's object store once -> train every
classifier ("job") as its own Ray task (or in-process with ``use_ray=False``) -> score the scenarios and the attack
suite from the jobs' test predictions (the inversion attack's reconstructions are read by the returned classifiers
trained on originals).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from pprl.data.dataset import Dataset
from pprl.evaluate import attacks
from pprl.evaluate.classifiers import (
    FitSpec,
    accuracy,
    fit,
    inverter_spec,
    paper_spec,
    probe_spec,
    strong_spec,
    torch_threads,
    with_code_channel,
)
from pprl.train.export import ENCODER_MEAN

log = logging.getLogger(__name__)

TASKS = ("identity", "expression")
# scenario -> (what the classifiers train on, what they are tested on); inputs: original images, anonymised
# images (random target per image), latent means f(I).
SCENARIOS: dict[str, tuple[str, str]] = {
    "privacy-unconstrained": ("orig", "orig"),
    "attack-1": ("orig", "anon"),
    "attack-2": ("anon", "anon"),
    "attack-3": ("latent", "latent"),
}
PAPER, STRONG = "paper", "strong"
# per epoch, to schedule long jobs first
RELATIVE_COST = {"inverter": 3.0, "resnet": 2.0, "paper-cnn": 1.0, "mlp-deep": 0.05, "mlp-wide": 0.05,
                 "paper-mlp": 0.02, "linear": 0.01, "knn": 0.01}  # fmt: skip
FLAG_FRACTION = 0.5  # privacy_flags: an attack above chance + this share of (unconstrained - chance) is flagged
ARCHS = {PAPER: {"image": "paper-cnn", "latent": "paper-mlp"}, STRONG: {"image": "resnet", "latent": "mlp-deep"}}


@dataclass(frozen=True)
class EvalOptions:
    """How thoroughly to evaluate. ``paper`` is the authors' protocol; ``quick`` is a cheaper, labelled approximation."""

    profile: str = "paper"  # a name recorded in the report
    train_limit: int = 0  # 0 = every training image; else a subsample stratified by (identity, expression)
    paper_epochs: int = 10  # the authors' classifiers: SGD 0.005, momentum 0.9, Nesterov
    paper_batch: int = 256  # the authors' batch size
    strong: bool = True  # also run the stronger attackers (ResNet + augmentation, deeper MLP) for identity
    strong_epochs: int = 60  # at most; they train to convergence (``patience``)
    patience: int = 10  # early stopping (stronger attackers, suite): epochs without a better validation score
    suite: bool = True  # the attack suite with its bars: latent probes, inversion, linkage (pprl.evaluate.attacks)
    probe_epochs: int = 300  # at most, for the suite's latent probes
    inverter_epochs: int = 60  # at most, for the inversion attack's network
    # the suite's expression-attack-1 figure is the mean of this many paper expression CNNs (seeds seed, seed+1, ...):
    # one judge's figure on the same renders moved by up to 11 points from seed to seed (docs/evaluation.md, "Per seed")
    expression_judges: int = 5
    seed: int = 0  # targets, subsample, validation split, classifier init
    allow_source_target: bool = False  # True: targets drawn from all identities, the source's own included
    sample: bool = False  # anonymise with a sampled z instead of the latent mean
    anonymize_batch: int = 256
    gpus_per_task: float = 0.0  # GPU share per Ray task (0 = CPU only); in-process mode uses a GPU when present
    applications: bool = True  # also write morph.png and completion.png into the report folder

    def __post_init__(self) -> None:
        epochs = (self.paper_epochs, self.strong_epochs, self.probe_epochs, self.inverter_epochs, self.paper_batch)
        if self.train_limit < 0 or self.patience < 0 or min(*epochs, self.expression_judges) < 1:
            raise ValueError("train_limit and patience must be >= 0; paper_epochs, strong_epochs, probe_epochs, "
                             "inverter_epochs, paper_batch and expression_judges >= 1")  # fmt: skip
        if self.suite and not self.strong:
            raise ValueError("the attack suite needs the stronger attackers (its attack 2 is the ResNet): keep "
                             "them, or turn the suite off too (--no-attack-suite)")  # fmt: skip


PROFILES: dict[str, EvalOptions] = {
    "paper": EvalOptions(),
    # CI / the 15-minute demo: ~2.4k training images; batch 64 keeps the number of SGD steps near the paper's.
    "quick": EvalOptions(profile="quick", train_limit=2400, paper_batch=64, strong_epochs=30, patience=8,
                         probe_epochs=200, inverter_epochs=20),
}


def options_for(profile: str, **overrides: Any) -> EvalOptions:
    if profile not in PROFILES:
        raise ValueError(f"unknown evaluation profile {profile!r}; choose one of {', '.join(PROFILES)}")
    return replace(PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Job:
    """One classifier: trained on ``train`` inputs for ``task``, then asked about each test input in ``tests``.

    The inverter's task is ``reconstruct``: its labels are the original images, its test outputs reconstructions."""

    attacker: str  # paper | strong | probe-<arch> | inverter
    task: str  # identity | expression | reconstruct
    train: str  # orig | anon | latent | anon+code (anonymised images with their target code, see with_code_channel)
    tests: tuple[str, ...]
    spec: FitSpec
    features: bool = False  # also return penultimate features of test orig and anon images (linkage attack)
    keep_model: bool = False  # also return the trained classifier itself (it reads the inversion's reconstructions)

    @property
    def key(self) -> str:
        return f"{self.attacker}/{self.task}/{self.train}"


@dataclass
class EvalData:
    """Everything the jobs and the scorer need; ``arrays`` goes into the object store once."""

    arrays: dict[str, np.ndarray]
    test_rows: pd.DataFrame
    num_identities: int
    num_expressions: int
    seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------- jobs


def plan_jobs(options: EvalOptions) -> list[Job]:
    """The paper's classifiers for both tasks in every scenario, the stronger attackers for identity, the suite's."""
    jobs = []
    attackers = [PAPER, STRONG] if options.strong else [PAPER]
    for attacker in attackers:
        for train in ("orig", "anon", "latent"):
            tests = tuple(test for tr, test in SCENARIOS.values() if tr == train)
            arch = ARCHS[attacker]["latent" if train == "latent" else "image"]
            for task in TASKS if attacker == PAPER else ("identity",):
                spec = (
                    replace(paper_spec(arch, options.paper_epochs, options.seed), batch_size=options.paper_batch)
                    if attacker == PAPER
                    else strong_spec(arch, options.strong_epochs, options.seed, options.patience)
                )
                features = task == "identity" and train != "latent"
                keep = options.suite and features and train == "orig"  # the inversion's readers
                jobs.append(Job(attacker, task, train, tests, spec, features, keep))
    return jobs + (suite_jobs(options) if options.suite else [])


def suite_jobs(options: EvalOptions) -> list[Job]:
    """The attack suite's own classifiers: latent probes (identity, and expression for utility), the expression judges
    beyond attack 1's own CNN, and the inverter."""
    def probe(arch: str, task: str) -> Job:
        spec = probe_spec(arch, options.probe_epochs, options.patience, options.seed)
        return Job(f"probe-{arch}", task, "latent", ("latent",), spec)

    jobs = [probe(arch, "identity") for arch in attacks.LATENT_PROBES.values()]
    jobs.append(probe(attacks.EXPRESSION_PROBE, "expression"))
    for k in range(1, options.expression_judges):  # judge 0 is attack 1's expression CNN (paper/expression/orig)
        spec = replace(paper_spec(ARCHS[PAPER]["image"], options.paper_epochs, options.seed + k), batch_size=options.paper_batch)
        jobs.append(Job(attacks.judge_attacker(k), "expression", "orig", ("anon",), spec))
    inverter = inverter_spec(options.inverter_epochs, options.patience, options.seed)
    return jobs + [Job("inverter", "reconstruct", "anon+code", ("anon+code",), inverter)]


def job_inputs(arrays: dict[str, np.ndarray], split: str, name: str) -> np.ndarray:
    """The ``split`` array called ``name``; ``anon+code`` is built here so the object store holds no second copy."""
    if name == "anon+code":
        return with_code_channel(arrays[f"{split}/anon"], arrays[f"{split}/target"])
    return arrays[f"{split}/{name}"]


def run_job(job: Job, arrays: dict[str, np.ndarray], num_classes: int, device: str | None = None) -> dict[str, Any]:
    """Train one classifier and return its test predictions (and features). Runs in a Ray task or in-process."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    reconstruct = job.task == "reconstruct"
    labels = arrays["train/orig"] if reconstruct else arrays[f"train/{job.task}"]
    strata = arrays["train/identity"] if reconstruct else None
    fitted = fit(job.spec, job_inputs(arrays, "train", job.train), labels, num_classes, device=device, strata=strata)
    out: dict[str, Any] = {"key": job.key, "summary": fitted.summary(), "predictions": {}, "features": {}}
    for test in job.tests:
        x = job_inputs(arrays, "test", test)
        if reconstruct:
            out["reconstructions"] = fitted.reconstruct(x)
        else:
            out["predictions"][test] = fitted.predict(x)
    if job.features:
        for test in ("orig", "anon"):
            out["features"][test] = fitted.features(arrays[f"test/{test}"])
    if job.keep_model:
        fitted.model.cpu()
        out["fitted"] = fitted
    return out


def _ray_job(job: Job, arrays: dict[str, np.ndarray], num_classes: int, use_gpu: bool) -> dict[str, Any]:
    torch.set_num_threads(1)  # one CPU per task: several tasks share a node without oversubscribing it
    return run_job(job, arrays, num_classes, "cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def run_jobs(jobs: list[Job], data: EvalData, use_ray: bool, gpus_per_task: float = 0.0) -> dict[str, dict[str, Any]]:
    # the inverter's "classes" are the target codes it reads
    classes = {"identity": data.num_identities, "expression": data.num_expressions, "reconstruct": data.num_identities}
    if not use_ray:
        with torch_threads(1):
            return {job.key: run_job(job, data.arrays, classes[job.task]) for job in tqdm(jobs, desc="classifiers", unit="job")}
    import ray

    from pprl import cluster

    with cluster.ray_session(num_cpus=2, purpose="the evaluation's classifiers"):
        arrays_ref = ray.put(data.arrays)  # once: every task reads the same zero-copy arrays
        remote = ray.remote(num_cpus=1, num_gpus=gpus_per_task, max_retries=1)(_ray_job)
        by_cost = sorted(jobs, key=lambda j: RELATIVE_COST[j.spec.arch] * j.spec.epochs, reverse=True)  # longest first
        pending = {remote.remote(job, arrays_ref, classes[job.task], gpus_per_task > 0): job for job in by_cost}
        results = {}
        with tqdm(total=len(jobs), desc="classifiers (Ray tasks)", unit="job") as bar:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                job = pending.pop(ready[0])
                results[job.key] = ray.get(ready[0])
                bar.set_postfix_str(f"{job.key} done")
                bar.update()
        return {job.key: results[job.key] for job in jobs}  # plan order, not finishing order


# --------------------------------------------------------------------------------------------------------- data


def random_targets(sources: np.ndarray, num_identities: int, rng: np.random.Generator, allow_source: bool = False) -> np.ndarray:
    """One target identity per image, uniform over the other identities (over all of them with ``allow_source``)."""
    sources = np.asarray(sources, dtype=np.int64)
    if allow_source:
        return rng.integers(0, num_identities, len(sources))
    return (sources + rng.integers(1, num_identities, len(sources))) % num_identities


def stratified_subsample(rows: pd.DataFrame, limit: int, seed: int) -> pd.DataFrame:
    """Exactly ``limit`` rows, every (identity, expression) cell keeping its share (largest remainders); all rows when 0."""
    if not limit or limit >= len(rows):
        return rows
    groups = [group for _, group in rows.groupby(["identity", "expression"], sort=True)]
    quotas = np.array([len(g) for g in groups]) * limit / len(rows)
    counts = np.floor(quotas).astype(int)
    counts[np.argsort(counts - quotas, kind="stable")[: limit - counts.sum()]] += 1  # largest remainders first
    keep = [g.sample(n=int(n), random_state=seed).index for g, n in zip(groups, counts, strict=True)]
    return rows.loc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def anonymize_all(model, images: np.ndarray, targets: np.ndarray, batch: int, sample: bool, desc: str) -> tuple[np.ndarray, np.ndarray]:
    """(anonymised uint8 images, latent means) through ``model.run`` in batches."""
    outs, latents = [], []
    for start in tqdm(range(0, len(images), batch), desc=desc, unit="batch"):
        chunk, chunk_targets = images[start : start + batch], targets[start : start + batch]
        if sample:  # run() decodes the mean; a sampled z goes through anonymize(sample=True)
            outs.append(np.asarray(model.anonymize(chunk, chunk_targets, sample=True), np.uint8))
            latents.append(np.asarray(model.encode(chunk), np.float32))
        else:
            result = model.run(chunk, chunk_targets)
            outs.append(np.asarray(result.images, np.uint8))
            latents.append(np.asarray(result.latents, np.float32))
    return np.concatenate(outs), np.concatenate(latents)


def reencode(model, images: np.ndarray, batch: int) -> np.ndarray:
    """The encoder's latent means of (anonymised) images, in batches."""
    chunks = [np.asarray(model.encode(images[i : i + batch]), np.float32) for i in range(0, len(images), batch)]
    return np.concatenate(chunks)


def check_compatible(model, dataset: Dataset) -> None:
    if model.num_identities != dataset.num_identities:
        raise ValueError(
            f"the model has {model.num_identities} identities but the dataset {dataset.root} has {dataset.num_identities}: "
            "evaluate a model on the dataset (or one with the same identities) it was trained on"
        )
    if dataset.split("test").empty or dataset.split("train").empty:
        raise ValueError(f"{dataset.root}: the evaluation needs both a train and a test split")


def prepare(model, dataset: Dataset, options: EvalOptions) -> EvalData:
    """Load originals at the model's size, anonymise them with random targets, encode their latent means (and, for the
    suite's linkage attack, the anonymised test images again: the latent an attacker holding the bundle reads)."""
    check_compatible(model, dataset)
    size, rng = int(model.image_size), np.random.default_rng(options.seed)
    seconds: dict[str, float] = {}
    start = time.time()
    train_rows = stratified_subsample(dataset.split("train"), options.train_limit, options.seed)
    test_rows = dataset.split("test")
    x_train, x_test = dataset.load_images(train_rows, size), dataset.load_images(test_rows, size)
    seconds["load"] = time.time() - start
    ids_train, ids_test = (r["identity"].to_numpy(np.int64) for r in (train_rows, test_rows))
    t_train = random_targets(ids_train, model.num_identities, rng, options.allow_source_target)
    t_test = random_targets(ids_test, model.num_identities, rng, options.allow_source_target)
    start = time.time()
    a_train, z_train = anonymize_all(model, x_train, t_train, options.anonymize_batch, options.sample, "anonymise train")
    a_test, z_test = anonymize_all(model, x_test, t_test, options.anonymize_batch, options.sample, "anonymise test")
    test_rows = test_rows.assign(target_identity=t_test)
    arrays = {
        "train/orig": x_train, "train/anon": a_train, "train/latent": z_train, "train/target": t_train,
        "train/identity": ids_train, "train/expression": train_rows["expression"].to_numpy(np.int64),
        "test/orig": x_test, "test/anon": a_test, "test/latent": z_test, "test/target": t_test,
    }  # fmt: skip
    if options.suite:
        arrays["test/reencoded"] = reencode(model, a_test, options.anonymize_batch)
    seconds["anonymise"] = time.time() - start
    return EvalData(arrays, test_rows, dataset.num_identities, dataset.num_expressions, seconds)


# --------------------------------------------------------------------------------------------------------- scoring


def score_rows(results: dict[str, dict[str, Any]], data: EvalData) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """Report rows (one per scenario and attacker) and the per-test-image prediction columns."""
    labels = {t: data.test_rows[t].to_numpy(np.int64) for t in TASKS}
    n_test = len(data.test_rows)
    rows = [_row("random-guess", "chance", 1 / data.num_identities, 1 / data.num_expressions, n_test)]
    columns: dict[str, np.ndarray] = {}
    for attacker in (PAPER, STRONG):
        for scenario, (train, test) in SCENARIOS.items():
            acc: dict[str, float | None] = {}
            for task in TASKS:
                result = results.get(f"{attacker}/{task}/{train}")
                if result is None:
                    acc[task] = None
                    continue
                pred = result["predictions"][test]
                acc[task] = accuracy(pred, labels[task])
                columns[f"pred.{scenario}.{result['summary']['spec']['arch']}.{task}"] = pred
            if acc["identity"] is not None:
                arch = ARCHS[attacker]["latent" if train == "latent" else "image"]
                rows.append(_row(scenario, arch, acc["identity"], acc["expression"], n_test))
    return rows, columns


def privacy_flags(rows: list[dict[str, Any]]) -> list[str]:
    """Attack rows whose identity accuracy is closer to the unconstrained classifier's than to chance: identity leaks."""
    chance = next(r["identity_accuracy"] for r in rows if r["scenario"] == "random-guess")
    ceiling = {r["attacker"]: r["identity_accuracy"] for r in rows if r["scenario"] == "privacy-unconstrained"}
    flags = []
    for r in rows:
        if not r["scenario"].startswith("attack-"):
            continue
        top = ceiling.get(r["attacker"], ceiling.get("paper-cnn", 1.0))
        if r["identity_accuracy"] > chance + FLAG_FRACTION * (max(top, chance) - chance):
            flags.append(
                f"{r['scenario']} ({r['attacker']}): identity accuracy {100 * r['identity_accuracy']:.1f}% is more than halfway "
                f"from chance ({100 * chance:.1f}%) to the unconstrained {100 * top:.1f}%: identity is not hidden from this attacker"
            )
    return flags


def _row(scenario: str, attacker: str, identity: float | None, expression: float | None, n_test: int) -> dict[str, Any]:
    return {"scenario": scenario, "attacker": attacker, "identity_accuracy": identity, "expression_accuracy": expression, "n_test": n_test}


def target_success(results: dict[str, dict[str, Any]], data: EvalData) -> list[dict[str, Any]]:
    """How often an identity classifier trained on originals recognises the *requested* target in the anonymised image."""
    targets = data.test_rows["target_identity"].to_numpy(np.int64)
    out = []
    for attacker in (PAPER, STRONG):
        result = results.get(f"{attacker}/identity/orig")
        if result is not None:
            rate = accuracy(result["predictions"]["anon"], targets)
            out.append({"classifier": result["summary"]["spec"]["arch"], "target_success_rate": rate, "chance": 1 / data.num_identities})
    return out


def linkage(results: dict[str, dict[str, Any]], data: EvalData, ks: tuple[int, ...] = (1, 5)) -> list[dict[str, Any]]:
    """Match each anonymised test image to the original test images by nearest neighbour (cosine) in an attacker's
    feature space. Identity linkage: one of the k nearest originals shows the source identity. Instance linkage:
    the image's own original is among the k nearest."""
    identities = data.test_rows["identity"].to_numpy(np.int64)
    out = []
    for key, result in results.items():
        if not result["features"]:
            continue
        gallery, queries = (_unit(result["features"][k]) for k in ("orig", "anon"))
        nearest = np.argsort(-(queries @ gallery.T), axis=1)[:, : max(ks)]
        scenario = next(s for s, (tr, te) in SCENARIOS.items() if tr == key.split("/")[2] and te == "anon")
        row = {"attacker": result["summary"]["spec"]["arch"], "feature_space": scenario, "n_queries": len(queries)}
        for k in ks:
            row[f"identity_top{k}"] = float((identities[nearest[:, :k]] == identities[:, None]).any(1).mean())
            row[f"identity_top{k}_chance"] = identity_link_chance(identities, k)
            row[f"instance_top{k}"] = float((nearest[:, :k] == np.arange(len(queries))[:, None]).any(1).mean())
            row[f"instance_top{k}_chance"] = min(1.0, k / len(gallery))
        out.append(row)
    return out


def identity_link_chance(identities: np.ndarray, k: int) -> float:
    """Expected top-k identity hit rate of a random ranking: 1 - C(n-m, k) / C(n, k), averaged over the queries."""
    n = len(identities)
    counts = np.bincount(identities)[identities]
    miss = np.ones(n)
    for j in range(k):  # product of (n - m - j) / (n - j): drawing k without replacement and missing every time
        miss *= np.clip(n - counts - j, 0, None) / (n - j)
    return float(1 - miss.mean())


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def discriminator_expression(model, data: EvalData, batch: int) -> dict[str, Any] | None:
    """The model's own D expression head on the anonymised test images (the authors' internal utility check)."""
    if not hasattr(model, "predict_expression"):
        return None
    images = data.arrays["test/anon"]
    probs = np.concatenate([np.asarray(model.predict_expression(images[i : i + batch])) for i in range(0, len(images), batch)])
    pred = probs.argmax(1).astype(np.int64)
    return {"predictions": pred, "accuracy": accuracy(pred, data.test_rows["expression"].to_numpy(np.int64))}


# --------------------------------------------------------------------------------------------------------- entry


@dataclass
class Evaluation:
    """The outcome of one evaluation, before it is written out (see ``pprl.evaluate.report``)."""

    rows: list[dict[str, Any]]
    predictions: pd.DataFrame
    linkage: list[dict[str, Any]]
    target_success: list[dict[str, Any]]
    d_expression_accuracy: float | None
    classifiers: dict[str, dict[str, Any]]
    attacks: list[dict[str, Any]]  # the attack suite: figure, bar, pass per attack (empty without the suite)
    options: EvalOptions
    seconds: dict[str, float]
    num_identities: int
    num_expressions: int
    latent_kind: str  # what the latent probes read: the model's latent_kind (pprl.train.export.latent_kind)

    def row(self, scenario: str, attacker: str) -> dict[str, Any]:
        for row in self.rows:
            if row["scenario"] == scenario and row["attacker"] == attacker:
                return row
        raise KeyError(f"no row for scenario={scenario!r} attacker={attacker!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "privacy_flags": privacy_flags(self.rows), "linkage": self.linkage, "target_success": self.target_success,
            "d_expression_accuracy": self.d_expression_accuracy, "classifiers": self.classifiers,
            "attacks": self.attacks, "audit": attacks.audit_summary(self.attacks, self.latent_kind) if self.attacks else None,
            "options": asdict(self.options), "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
            "chance": {"identity": 1 / self.num_identities, "expression": 1 / self.num_expressions},
        }  # fmt: skip


def evaluate(model, dataset: Dataset, options: EvalOptions | None = None, use_ray: bool = True) -> Evaluation:
    """Run every scenario for ``model`` (anything with the Anonymizer interface) on ``dataset``'s test split."""
    options = options or EvalOptions()
    data = prepare(model, dataset, options)
    start = time.time()
    results = run_jobs(plan_jobs(options), data, use_ray, options.gpus_per_task)
    data.seconds["classifiers"] = time.time() - start
    rows, columns = score_rows(results, data)
    d_check = discriminator_expression(model, data, options.anonymize_batch)
    if d_check is not None:
        columns["pred.d-head.expression"] = d_check["predictions"]
    base = data.test_rows[["path", "identity", "expression", "target_identity"]].rename(columns={"identity": "source_identity"})
    predictions = pd.concat([base, pd.DataFrame(columns)], axis=1)
    return Evaluation(
        rows=rows,
        predictions=predictions,
        linkage=linkage(results, data),
        target_success=target_success(results, data),
        d_expression_accuracy=None if d_check is None else d_check["accuracy"],
        classifiers={key: r["summary"] for key, r in results.items()},
        attacks=attacks.run_suite(results, data) if options.suite else [],
        options=options,
        seconds=data.seconds,
        num_identities=data.num_identities,
        num_expressions=data.num_expressions,
        latent_kind=getattr(model, "latent_kind", ENCODER_MEAN),  # a stand-in without one exports an encoder's mean
    )
