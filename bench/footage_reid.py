"""Does the person survive the paste? dlib's recogniser on the test footage for several ``--blur-context`` values.

    python bench/footage_reid.py --model runs/demo/bundle --blur-context 0 0.15 0.3 0.5

For each value, the astronaut and Grace Hopper clips (``pprl.footage.testclips``, 24 frames) go through
``anonymize_footage`` as the footage test runs them (CenterFace, random targets with ``--seed``, no Ray; the leak
audit off, it does not change the pixels), then ``evaluate_footage`` compares input and output with their reference
photos. Printed per clip: the nearest and mean in-place distance (the output's pixels where the input's faces were:
the stronger attack), the frames recognised in place and in the output (distance < 0.6), and the faces dlib finds in
the output. Written to ``bench/results/footage-reid-<date>.json`` with the machine's load. Outside CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
from PIL import Image

from pprl.footage import testclips
from pprl.footage.audit import AuditOptions
from pprl.footage.pipeline import FootageOptions, TargetPolicy, anonymize_footage
from pprl.footage.reid import evaluate_footage

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the bundle that anonymises")
    p.add_argument("--blur-context", type=float, nargs="+", default=[0.0, FootageOptions.blur_context], help="values to compare")
    p.add_argument("--margin", type=float, default=FootageOptions.margin, help="crop margin (FootageOptions.margin)")
    p.add_argument("--feather", type=float, default=FootageOptions.feather, help="paste fade-out (FootageOptions.feather)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random-per-track targets (the footage test's: 1)")
    p.add_argument("--frames", type=int, default=24, help="frames per clip")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON")
    return p.parse_args(argv)


def measure(model: str, blur_context: float, margin: float, feather: float, seed: int, root: Path, references: list[str]) -> pd.DataFrame:
    out = root / f"out-{blur_context}"
    options = FootageOptions(model=model, policy=TargetPolicy("random-per-track", seed=seed), blur_context=blur_context,
                             margin=margin, feather=feather, audit=AuditOptions(mode="off"))
    anonymize_footage(str(root / "in"), str(out), options, num_workers=0, progress=False)
    evaluate_footage(str(root / "in"), str(out), references=references)
    d = pd.read_parquet(out / "reid.parquet")
    d["clip"] = d.video_uri.str.rsplit("/", n=1).str[-1]
    return d.groupby("clip").agg(in_place_min=("in_place_distance", "min"), in_place_mean=("in_place_distance", "mean"),
                                 recognised_in_place=("recognised_in_place", "mean"), output_faces=("output_faces", "sum"),
                                 output_min=("output_distance", "min"), recognised_output=("recognised_output", "mean"))


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from matplotlib import cbook
    from skimage.data import astronaut

    rows = []
    with tempfile.TemporaryDirectory(prefix="pprl-bench-reid-") as tmp:
        root = Path(tmp)
        testclips.astronaut_clip(str(root / "in" / "astronaut.mp4"), frames=args.frames)
        testclips.hopper_clip(str(root / "in" / "hopper.mp4"), frames=args.frames)
        Image.fromarray(astronaut()).save(root / "astronaut.png")
        references = [str(root / "astronaut.png"), str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
        for value in args.blur_context:
            table = measure(args.model, value, args.margin, args.feather, args.seed, root, references)
            print(f"--blur-context {value} --margin {args.margin} --feather {args.feather}\n{table.round(3).to_string()}\n", flush=True)
            rows += [{"blur_context": value, "clip": clip, **row} for clip, row in table.to_dict("index").items()]
    record = {"model": args.model, "margin": args.margin, "feather": args.feather, "seed": args.seed, "frames": args.frames, "load": os.getloadavg(), "rows": rows}
    path = Path(args.out) / f"footage-reid-{dt.date.today()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=float))
    print(f"load average {os.getloadavg()[0]:.2f}; written to {path}")
    return rows


if __name__ == "__main__":
    main()
