"""The archive driver at scale: wall time, throughput and the driver's memory for growing numbers of videos.

    python bench/footage_archive.py --model runs/demo/bundle --videos 20 200 1000

For each size, ``pprl.footage.testclips.synthetic_archive`` writes that many tiny clips (4 frames of 128x64, one
face, boxes in a sidecar, one in 50 corrupt), and ``anonymize_footage`` runs over them on a private local Ray head
(``--num-workers`` video tasks, the leak audit off: it is per-video work, not the driver's). A thread samples the
driver's resident memory (``VmRSS``) every 20 ms. Each size runs twice: with ``index.parquet`` rewritten after every
video (``INDEX_EVERY_S = 0``, the driver before 2026-12-04: the baseline) and at most every 10 s (the default).
Printed per run: wall time, videos/s, the driver's RSS before the run and at its peak during it, that growth per
video (each run starts from what the one before left, so runs are compared by their own growth), and a rerun over the finished output (what a resumed run pays to find that
nothing is left). Written to
``bench/results/footage-archive-<date>.json`` with the machine's load. Outside CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from pprl import cluster
from pprl.footage import pipeline, testclips
from pprl.footage.audit import AuditOptions
from pprl.footage.detect import DetectorSpec
from pprl.footage.pipeline import FootageOptions, TargetPolicy, anonymize_footage

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INDEX_EVERY_S = pipeline.INDEX_EVERY_S


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the bundle that anonymises")
    p.add_argument("--videos", type=int, nargs="+", default=[20, 200], help="archive sizes; the first is the baseline")
    p.add_argument("--num-workers", type=int, default=2, help="video tasks in flight")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON result")
    args = p.parse_args(argv)
    if min(args.videos) < 1 or args.num_workers < 1:
        p.error("--videos and --num-workers must be >= 1")
    return args


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


class PeakRSS:
    """The highest RSS of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = rss_mib(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(model: str, videos: int, num_workers: int, workdir: Path, index_every_s: float = pipeline.INDEX_EVERY_S) -> dict:
    root = workdir / f"archive-{videos}-{index_every_s}"
    corrupt = testclips.synthetic_archive(root, videos)
    pipeline.INDEX_EVERY_S = index_every_s
    options = FootageOptions(model=model, detector=DetectorSpec.parse(f"sidecar:{root / 'boxes'}"), batch_frames=4,
                             policy=TargetPolicy("random-per-track", seed=7), audit=AuditOptions(mode="off"))
    before = rss_mib()
    started = time.time()
    with PeakRSS() as peak:
        summary = anonymize_footage(str(root / "in"), str(root / "out"), options, num_workers=num_workers, progress=False)
    seconds = time.time() - started
    assert (summary.processed, summary.errors) == (videos, len(corrupt)), (summary.processed, summary.errors)
    started = time.time()
    again = anonymize_footage(str(root / "in"), str(root / "out"), options, num_workers=num_workers, progress=False)
    assert again.processed == 0
    pipeline.INDEX_EVERY_S = DEFAULT_INDEX_EVERY_S
    return {"videos": videos, "index_every_s": index_every_s, "seconds": round(seconds, 2), "videos_per_s": round(videos / seconds, 2),
            "rss_before_mib": round(before, 1), "rss_peak_mib": round(peak.peak, 1), "rss_after_mib": round(rss_mib(), 1),
            "rerun_seconds": round(time.time() - started, 2)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load = [round(v, 2) for v in os.getloadavg()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pprl-archive-bench-") as tmp, cluster.LocalHead(num_cpus=args.num_workers) as head:
        os.environ["RAY_ADDRESS"] = head.address
        measure(args.model, 4, args.num_workers, Path(tmp))  # warm-up: Ray's workers, the model, the imports
        for videos in args.videos:
            for index_every_s in (0.0, DEFAULT_INDEX_EVERY_S):
                rows.append(measure(args.model, videos, args.num_workers, Path(tmp), index_every_s))
                print(json.dumps(rows[-1]), flush=True)
    print(f"\nload average at start {load}, at end {[round(v, 2) for v in os.getloadavg()]}")
    print("| videos | index written | wall s | videos/s | vs every video | driver RSS before, peak (MiB) | growth per video (KiB) | rerun s |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        every = next(r for r in rows if r["videos"] == row["videos"] and r["index_every_s"] == 0)
        growth = (row["rss_peak_mib"] - row["rss_before_mib"]) * 1024 / row["videos"]
        when = "after every video" if row["index_every_s"] == 0 else f"every {row['index_every_s']:g} s"
        print(f"| {row['videos']} | {when} | {row['seconds']} | {row['videos_per_s']} | {every['seconds'] / row['seconds']:.2f}x | "
              f"{row['rss_before_mib']}, {row['rss_peak_mib']} | {growth:.1f} | {row['rerun_seconds']} |")
    result = {"date": dt.date.today().isoformat(), "load_average_start": load, "num_workers": args.num_workers, "model": args.model, "rows": rows}
    out = Path(args.out) / f"footage-archive-{result['date']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
