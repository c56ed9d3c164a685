"""Run the benchmarks, each against its baseline in the same invocation, and write one table.

    python bench/run.py --quick                      # every CPU benchmark, < 15 min on 2 cores
    python bench/run.py --quick --only data_loading  # one (or a few) of: data_loading training serving footage

Prints one Markdown table (every figure, its baseline and the speed-up) and writes ``bench/results/<date>-<host>.json``,
``latest.json`` and ``latest.md``. Inputs (a synthetic dataset, a briefly trained ``cpu-quick`` model bundle, a 720p
clip) are made once and cached in ``bench/.cache``. See bench/README.md for what each benchmark measures.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Context, Figure, machine, markdown_table, report  # noqa: E402

BENCHMARKS = ("data_loading", "training", "serving", "footage")
log = logging.getLogger("bench")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short measurements and small inputs (the CPU run, < 15 min on 2 cores)")
    p.add_argument("--only", nargs="+", metavar="NAME", help=f"run only these benchmarks: {', '.join(BENCHMARKS)}")
    p.add_argument("--seconds", type=float, default=None, help="time per measurement (default: each benchmark's own for quick/full)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved repeats per setting in data_loading (default 2; full: 4)")
    p.add_argument("--data", default=None, help="dataset folder to read (default: a synthetic one generated into --workdir)")
    p.add_argument("--model", default=None, help="cpu-quick model bundle to serve/anonymise with (default: trained briefly, cached)")
    p.add_argument("--workdir", default=str(REPO / "bench" / ".cache"), help="cache for generated inputs")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and Markdown results")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.seconds is not None and args.seconds <= 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    if args.rounds is not None and args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    ctx = Context(quick=args.quick, workdir=Path(args.workdir), seconds=args.seconds, rounds=args.rounds, data_uri=args.data, model_uri=args.model)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    info = machine() | {"loadavg_at_start": [round(v, 2) for v in os.getloadavg()]}
    figures: list[Figure] = []
    timings: dict[str, float] = {}
    errors: dict[str, str] = {}
    for name in [b for b in BENCHMARKS if not args.only or b in args.only]:
        log.info("=== %s ===", name)
        start = time.perf_counter()
        try:
            got = importlib.import_module(name).run(ctx)
            figures += got
            print(markdown_table(got), flush=True)
        except Exception as err:  # one broken benchmark must not lose the others' numbers
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}"
        timings[name] = round(time.perf_counter() - start, 1)
    info["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    doc = report(figures, info, dict(vars(args)), timings, errors, Path(args.out))
    print()
    print(markdown_table(figures))
    print(f"\nwritten: {Path(args.out) / 'latest.json'}, latest.md" + (f"; FAILED: {', '.join(errors)}" if errors else ""))
    return doc


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
