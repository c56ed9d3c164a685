"""Does the privacy recipe hold beyond one draw? Train cpu-quick on several seeds, audit each, print the table.

    python bench/privacy_seeds.py                                  # seeds 0 1 2, ~25 min per seed on 2 cores
    python bench/privacy_seeds.py --model main-job=runs/demo/runs/demo/model   # also audit the main job's model
    python bench/privacy_seeds.py --seeds 0 --epochs 1 --images-per-cell 12    # a smoke run of the script itself

Each seed is a ``pprl train-local --preset cpu-quick --set train.seed=S`` run on the embedded synthetic default,
then ``pprl evaluate --profile quick`` with the attack suite (its verdict is attached to the bundle). Runs and
reports live under ``--workdir``; a rerun reuses finished runs and reports. The table has one row per attack (and
the paper's attack-1/attack-3 figures), one column per model, the worst and the mean over the seeds, and the bar;
it is printed and written to ``bench/results/privacy-seeds-<date>.md`` (and ``.json``) with the machine's load.
Outside CI: the figures that matter are the worst seed's, and the main job's model is what users get.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PPRL = [sys.executable, "-m", "pprl"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="training seeds (train.seed); none with --model")
    p.add_argument("--model", action="append", default=[], metavar="NAME=URI",
                   help="also audit this trained bundle (e.g. the main job's), in its own column; repeatable")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="config override for every seed's training (e.g. loss.g_latent=2.0); repeatable")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the preset's)")
    p.add_argument("--images-per-cell", type=int, default=None, help="synthetic images per cell (default: the generator's)")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".cache" / "privacy-seeds"), help="data, runs and reports")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the table (.md and .json)")
    p.add_argument("--no-ray", action="store_true", help="evaluate in-process instead of on a private local Ray")
    args = p.parse_args(argv)
    for item in args.model:
        if "=" not in item:
            p.error(f"--model wants NAME=URI, got {item!r}")
    return args


def run(cmd: list[str], log: Path) -> None:
    """Run a pprl command with its output in ``log``; stop with the log's tail when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd[2:])}  (log: {log})", flush=True)
    with log.open("w") as handle:
        code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"{cmd[2]} failed (exit {code}); the end of {log}:\n" + log.read_text()[-3000:])


def dataset(args: argparse.Namespace, work: Path) -> str:
    data = work / "data"
    if not (data / "manifest.parquet").exists():
        extra = ["--images-per-cell", str(args.images_per_cell)] if args.images_per_cell else []
        run([*PPRL, "data", "synth", "--out", str(data), *extra], work / "logs" / "data.log")
    return str(data)


def train(args: argparse.Namespace, data: str, seed: int, work: Path) -> str:
    """The seed's bundle, trained unless a finished run is there (an unfinished one resumes from its checkpoint)."""
    run_dir = work / f"seed-{seed}"
    if not (run_dir / "model" / "bundle.json").exists():
        sets = [f"train.seed={seed}", *args.overrides] + ([f"train.epochs={args.epochs}"] if args.epochs else [])
        cmd = [*PPRL, "train-local", "--preset", "cpu-quick", "--data", data, "--out", str(run_dir), "--device", "cpu"]
        run(cmd + [arg for item in sets for arg in ("--set", item)], work / "logs" / f"train-seed-{seed}.log")
    return str(run_dir / "model")


def audit(args: argparse.Namespace, name: str, model: str, data: str, work: Path) -> dict:
    """``pprl evaluate --profile quick`` (attack suite on, verdict attached to the bundle); returns report.json."""
    report = work / "reports" / name
    if not (report / "report.json").exists():
        cmd = [*PPRL, "evaluate", "--model", model, "--data", data, "--out", str(report), "--profile", "quick",
               "--no-applications"] + (["--no-ray"] if args.no_ray else [])  # fmt: skip
        run(cmd, work / "logs" / f"evaluate-{name}.log")
    return json.loads((report / "report.json").read_text())


def figures(report: dict) -> dict[str, tuple[float, float, str, bool]]:
    """name -> (figure, bar, op, pass) for every attack of the suite and the paper's scenarios (no bar: nan)."""
    out = {a["name"]: (a["figure"], a["bar"], a["op"], bool(a["pass"])) for a in report.get("attacks") or []}
    for row in report["rows"]:
        for task in ("identity", "expression"):
            value = row.get(f"{task}_accuracy")
            if value is not None and row["attacker"] != "chance":  # the stronger attackers judge identity only
                out[f"{row['scenario']} {row['attacker']} {task}"] = (value, float("nan"), "", True)
    return out


def table(reports: dict[str, dict], seeds: list[str]) -> str:
    """Markdown: a row per figure, a column per model, then the worst and the mean over the seeds, and the bar."""
    per_model = {name: figures(report) for name, report in reports.items()}
    names = list(dict.fromkeys(key for fig in per_model.values() for key in fig))
    head = ["figure", *reports, "worst seed", "mean of seeds", "bar"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in names:
        cells, values = [], []
        for model, fig in per_model.items():
            if key not in fig:
                cells.append("")
                continue
            value, bar, op, passed = fig[key]
            cells.append(f"{100 * value:.1f} %" + ("" if passed else " FAIL"))
            values += [value] if model in seeds else []
        bar_cell = next((f"{op} {100 * fig[key][1]:.1f} %" for fig in per_model.values() if key in fig and fig[key][2]), "")
        worst = (max(values) if bar_cell.startswith("<=") else min(values)) if values and bar_cell else None
        worst_cell = f"{100 * worst:.1f} %" if worst is not None else ""
        mean_cell = f"{100 * statistics.fmean(values):.1f} %" if values else ""
        lines.append("| " + " | ".join([key, *cells, worst_cell, mean_cell, bar_cell]) + " |")
    verdicts = ["PASSED" if (r.get("audit") or {}).get("passed") else "FAILED" for r in reports.values()]
    lines.append("| **audit** | " + " | ".join(verdicts) + " | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    work = Path(args.workdir)
    data = dataset(args, work)
    models = {f"seed {seed}": train(args, data, seed, work) for seed in args.seeds}
    models |= dict(item.split("=", 1) for item in args.model)
    reports = {name: audit(args, name.replace(" ", "-"), uri, data, work) for name, uri in models.items()}
    text = table(reports, [f"seed {seed}" for seed in args.seeds])
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    header = (f"# cpu-quick privacy audit per seed, {dt.date.today()}\n\nLoad average at the end: {load}. Overrides: "
              f"{args.overrides or 'none'}; epochs: {args.epochs or 'preset'}; data: {data}\n\n")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"privacy-seeds-{dt.date.today()}"
    stem.with_suffix(".md").write_text(header + text + "\n")
    stem.with_suffix(".json").write_text(json.dumps({name: r.get("attacks") for name, r in reports.items()}, indent=2))
    print(header + text)
    return text


if __name__ == "__main__":
    main()
