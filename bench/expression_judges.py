"""How much does attack-1 expression depend on the judge? Score bundles with several expression judges.

    python bench/expression_judges.py --data bench/.cache/privacy-seeds/data \\
        --model seed-0=bench/.cache/privacy-seeds/seed-0/model --model seed-1=...   # 5 judges by default

Attack 1 trains one paper CNN on the original training faces and reads the expression of the anonymised test faces
(``pprl evaluate``'s recipe: 10 epochs, batch 64, one thread; the suite's figure is the mean of judge seeds 0-4,
``--expression-judges``). Here the same judge is trained with ``--judges`` seeds once for several bundles, each bundle
anonymises the test faces with the evaluation's own targets, and every judge scores every bundle: one row per bundle
with each judge's figure, the mean and the spread. Printed,
and written to ``bench/results/expression-judges-<date>.json`` with the machine's load. Outside CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np

from pprl.anonymizer import Anonymizer
from pprl.data.dataset import load_dataset
from pprl.evaluate import scenarios as S
from pprl.evaluate.classifiers import fit, paper_spec, torch_threads

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the dataset the bundles were trained on")
    p.add_argument("--model", action="append", required=True, metavar="NAME=URI", help="a bundle to score; repeatable")
    p.add_argument("--judges", type=int, default=5, help="judge seeds 0..N-1 (default 5)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON")
    args = p.parse_args(argv)
    for item in args.model:
        if "=" not in item:
            p.error(f"--model wants NAME=URI, got {item!r}")
    return args


def anonymised_test_faces(uri: str, images: np.ndarray, ids_train: np.ndarray, ids_test: np.ndarray,
                          options: S.EvalOptions) -> np.ndarray:  # fmt: skip
    """The test faces as ``pprl evaluate`` anonymises them: the same random targets (drawn after the training set's)."""
    model = Anonymizer.load(uri, device="cpu")
    rng = np.random.default_rng(options.seed)
    S.random_targets(ids_train, model.num_identities, rng, options.allow_source_target)
    targets = S.random_targets(ids_test, model.num_identities, rng, options.allow_source_target)
    return S.anonymize_all(model, images, targets, options.anonymize_batch, options.sample, f"anonymise {uri}")[0]


def main(argv: list[str] | None = None) -> dict[str, list[float]]:
    args = parse_args(argv)
    dataset, options = load_dataset(args.data), S.options_for("quick", suite=False, strong=False)
    models = dict(item.split("=", 1) for item in args.model)
    size = int(Anonymizer.load(next(iter(models.values())), device="cpu").image_size)
    train_rows = S.stratified_subsample(dataset.split("train"), options.train_limit, options.seed)
    test_rows = dataset.split("test")
    x_train, x_test = dataset.load_images(train_rows, size), dataset.load_images(test_rows, size)
    y_train, y_test = (r["expression"].to_numpy(np.int64) for r in (train_rows, test_rows))
    ids_train, ids_test = (r["identity"].to_numpy(np.int64) for r in (train_rows, test_rows))
    faces = {name: anonymised_test_faces(uri, x_test, ids_train, ids_test, options) for name, uri in models.items()}
    scores: dict[str, list[float]] = {name: [] for name in models}
    with torch_threads(1):  # as the evaluation's classifiers run
        for seed in range(args.judges):
            spec = replace(paper_spec("paper-cnn", options.paper_epochs, seed), batch_size=options.paper_batch)
            judge = fit(spec, x_train, y_train, dataset.num_expressions, device="cpu")
            for name, x in faces.items():
                scores[name].append(float((judge.predict(x) == y_test).mean()))
            print(f"judge {seed}: " + ", ".join(f"{n} {100 * v[-1]:.1f} %" for n, v in scores.items()), flush=True)
    print("| model | " + " | ".join(f"judge {s}" for s in range(args.judges)) + " | mean | spread |")
    print("|---|" + "---:|" * (args.judges + 2))
    for name, values in scores.items():
        cells = " | ".join(f"{100 * v:.1f} %" for v in values)
        print(f"| {name} | {cells} | {100 * statistics.fmean(values):.1f} % | {100 * (max(values) - min(values)):.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"load_average": os.getloadavg(), "models": models, "accuracy": scores}
    (out / f"expression-judges-{dt.date.today()}.json").write_text(json.dumps(record, indent=2))
    return scores


if __name__ == "__main__":
    main()
