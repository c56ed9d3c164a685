"""Can footage be published? The leak audit (dlib's detector on the written output) and the re-identification check
(dlib's face recogniser on input and output), on real faces: scikit-image's astronaut and matplotlib's Grace Hopper.

A missed face is made by leaving frames out of the astronaut clip's sidecar: the pipeline then replaces nothing
there, and both checks must see exactly those frames.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pprl.footage import reid, testclips
from pprl.footage.audit import AuditOptions, AuditTrail, Schedule, covered
from pprl.footage.detect import DetectorError, DetectorSpec, DlibDetector, box_iou, dlib_model_path
from pprl.footage.paste import Region
from pprl.footage.pipeline import AUDIT_KEY, FACES_SCHEMA, INDEX_SCHEMA, FootageOptions, anonymize_footage
from pprl.footage.reid import THRESHOLD, FaceRecogniser, evaluate_footage, reference_descriptors
from pprl.footage.track import Face

FRAMES = 16
MISSED = set(range(5, 11))  # frames the sidecar leaves out: a gap longer than the tracker bridges


def test_dlib_detector_finds_real_faces_of_min_face_and_larger():
    from skimage.data import astronaut

    photo = astronaut()
    small = np.asarray(Image.fromarray(photo).resize((256, 256)))  # the face is ~45 px wide
    full = DlibDetector("hog").detect([photo, np.full((96, 128, 3), 128, np.uint8)], [0, 1])
    best = full[0][np.argmax(full[0][:, 4])]
    assert box_iou(best[None, :4], np.array([testclips.ASTRONAUT_FACE]))[0, 0] > 0.5 and len(full[1]) == 0
    # At dlib's own threshold the badge on the suit is a weak second "face"; a higher threshold leaves the face only.
    assert len(full[0]) == 2 and len(DlibDetector("hog", threshold=0.2).detect([photo], [0])[0]) == 1
    assert len(DlibDetector("hog", min_face=80).detect([small], [0])[0]) == 0  # below its min_face
    found = DlibDetector("hog", min_face=40).detect([small], [0])[0]
    assert len(found) == 1 and box_iou(found[:, :4], np.array([testclips.ASTRONAUT_FACE]) / 2)[0, 0] > 0.5  # mapped back
    crop = np.ascontiguousarray(photo[20:220, 140:310])  # the face at its own size, 89 px wide: the CNN's cheap case
    cnn = DlibDetector("cnn", min_face=80).detect([crop], [0])[0]
    assert len(cnn) == 1 and box_iou(cnn[:, :4] + [140, 20, 140, 20], np.array([testclips.ASTRONAUT_FACE]))[0, 0] > 0.5
    with pytest.raises(DetectorError, match="'hog' or 'cnn'"):
        DlibDetector("yolo")
    with pytest.raises(DetectorError, match="missing"):
        dlib_model_path("no_such_model.dat")


def test_audit_trail_marks_risk_frames_and_coverage_is_by_crop():
    trail = AuditTrail()
    region = Region(0, 0, 10)
    for f in range(10, 20):
        trail.add(Face(f, np.zeros(4, np.float32), 0.9, track_id=0), region, low_score=0.7)
    trail.add(Face(40, np.zeros(4, np.float32), 0.55, track_id=1), region, low_score=0.7)  # a weak detection
    trail.add(Face(60, np.zeros(4, np.float32), None, track_id=2, bridged=True), region, low_score=0.7)
    # track 0: the frame before its start and after its end; tracks 1 and 2: around their frames (radius 1)
    shaky = {*range(38, 43), *range(58, 63)}
    assert trail.risk_frames(1, 100) == {8, 9, 10, 19, 20, 21} | shaky
    assert trail.risk_frames(1, 20) == {8, 9, 10}  # in a 20-frame video track 0 lasts to the end: it was not lost
    trail.add(Face(0, np.zeros(4, np.float32), 0.9, track_id=3), region, low_score=0.7)
    assert trail.risk_frames(1, 20) == {8, 9, 10, 0, 1, 2}  # lost after frame 0; there is no frame before its start
    assert trail.risk_frames(1, 100) == {8, 9, 10, 19, 20, 21, 0, 1, 2} | shaky
    assert covered(np.array([2, 2, 8, 8]), [region], 0.5) and not covered(np.array([6, 6, 16, 16]), [region], 0.5)
    assert not covered(np.array([2, 2, 8, 8]), [], 0.5)
    with pytest.raises(ValueError, match="--audit"):
        AuditOptions(mode="some")


def simulate(schedule: Schedule, frames: int, scan_s: float, decode_s: float) -> tuple[list[int], float]:
    """Drive the sample mode's schedule with a clock where decoding a frame and scanning one take fixed times."""
    elapsed, scanned = 0.0, []
    for i in range(frames):
        elapsed += decode_s
        if schedule.wants(i, elapsed):
            scanned.append(i)
            elapsed += scan_s
            schedule.scanned(i, scan_s)
    return scanned, elapsed


def test_sample_mode_scans_risk_frames_first_and_spreads_the_rest_within_the_budget():
    risk = {60, 61, 62, 90}
    scanned, elapsed = simulate(Schedule(100, risk, budget_s=12.0), 100, scan_s=1.0, decode_s=0.01)
    assert risk <= set(scanned) and elapsed <= 12.0 + 1e-9 and len(scanned) == 10
    gaps = np.diff([f for f in scanned if f not in risk])
    assert gaps.max() - gaps.min() <= 6  # evenly spread: about every 15th frame
    # A budget smaller than the risk frames: it is still kept, and the frames left out are counted.
    schedule = Schedule(100, risk, budget_s=3.0)
    scanned, elapsed = simulate(schedule, 100, scan_s=1.0, decode_s=0.01)
    assert elapsed <= 3.0 + 1.0 and schedule.skipped_risk == len(risk) - (len(scanned) - 1)


def astronaut_input(root, missed: set[int]) -> pd.DataFrame:
    """The astronaut clip and a sidecar of its true boxes without the ``missed`` frames."""
    truth = testclips.astronaut_clip(str(root / "in" / "astronaut.mp4"), frames=FRAMES)
    truth[~truth.frame_index.isin(missed)].to_parquet(root / "boxes.parquet")
    return truth


@pytest.fixture(scope="module")
def missed_face(tmp_path_factory, tiny_bundle):
    """The astronaut clip with frames 5-10 missing from the detections: through the CLI with the sample audit
    (``out``; with a budget that reaches every risk frame of this short clip and tiny model), and with ``--audit all``
    (``all``)."""
    from pprl.cli import main

    root = tmp_path_factory.mktemp("missed")
    truth = astronaut_input(root, MISSED)
    with pytest.raises(SystemExit) as exit_:
        main(["anonymize-footage", "--input", str(root / "in"), "--output", str(root / "out"), "--model", tiny_bundle,
              "--detector", f"sidecar:{root / 'boxes.parquet'}", "--num-workers", "0", "--no-progress", "--audit-budget", "10", "--fail-on-suspect"])
    options = FootageOptions(model=tiny_bundle, detector=DetectorSpec.parse(f"sidecar:{root / 'boxes.parquet'}"), audit=AuditOptions(mode="all"))
    every = anonymize_footage(str(root / "in"), str(root / "all"), options, num_workers=0, progress=False)
    return {"root": root, "truth": truth, "exit": exit_.value.code, "all": every}


def test_audit_flags_the_frames_of_a_missed_face(missed_face):
    root, truth = missed_face["root"], missed_face["truth"]
    assert missed_face["exit"] == 1  # --fail-on-suspect
    index = pq.read_table(root / "out" / "index.parquet")
    assert index.schema.equals(INDEX_SCHEMA)
    row = index.to_pylist()[0]
    table = pq.read_table(root / "out" / "astronaut.mp4.faces.parquet")
    assert table.schema.equals(FACES_SCHEMA)
    faces = table.to_pandas()
    suspects = faces[faces.kind == "suspect"]
    # Sample mode: frames next to the end and start of the two tracks are risk frames, which covers this gap.
    assert set(suspects.frame_index) == MISSED and row["suspect_frames"] == len(MISSED)
    assert row["faces"] == FRAMES - len(MISSED) == (faces.kind == "replaced").sum()
    assert suspects.track_id.isna().all() and suspects.target_identity.isna().all()
    for s in suspects.itertuples():
        assert box_iou(np.array([s.box]), np.array([truth.box[s.frame_index]]))[0, 0] > 0.4
    record = json.loads(pq.read_metadata(root / "out" / "astronaut.mp4.faces.parquet").metadata[AUDIT_KEY])
    assert record["mode"] == "sample" and record["audited_frames"] == row["audited_frames"] <= FRAMES
    sheet = Image.open(row["suspects_uri"])
    assert row["suspects_uri"] == str(root / "out" / "astronaut.mp4.suspects.png") and sheet.width == 6 * 128 + 5 * 2

    # Every frame: the same frames, and no other.
    summary = missed_face["all"]
    faces = pd.read_parquet(root / "all" / "astronaut.mp4.faces.parquet")
    assert set(faces[faces.kind == "suspect"].frame_index) == MISSED and summary.suspect_frames == len(MISSED)
    assert summary.index.audited_frames.iloc[0] == FRAMES and len(summary.suspect_videos) == 1


def test_a_clean_run_has_no_suspects_and_drops_an_old_contact_sheet(missed_face, tiny_bundle, tmp_path):
    missed_face["truth"].to_parquet(tmp_path / "boxes.parquet")  # every face detected
    out = tmp_path / "out"
    shutil.copytree(missed_face["root"] / "out", out)  # the missed-face run's output, its contact sheet included
    (out / "astronaut.mp4.faces.parquet").unlink()  # so that the rerun processes the video again
    options = FootageOptions(model=tiny_bundle, detector=DetectorSpec.parse(f"sidecar:{tmp_path / 'boxes.parquet'}"), audit=AuditOptions(mode="all"))
    summary = anonymize_footage(str(missed_face["root"] / "in"), str(out), options, num_workers=0, progress=False)
    row = summary.index.iloc[0]
    assert (row.audited_frames, row.suspect_frames, summary.suspect_frames, len(summary.suspect_videos)) == (FRAMES, 0, 0, 0)
    assert pd.isna(row.suspects_uri) and not (out / "astronaut.mp4.suspects.png").exists()
    assert (pd.read_parquet(out / "astronaut.mp4.faces.parquet").kind == "replaced").all()
    off = anonymize_footage(str(missed_face["root"] / "in"), str(tmp_path / "off"), FootageOptions(
        model=tiny_bundle, detector=options.detector, audit=AuditOptions(mode="off")), num_workers=0, progress=False)
    assert off.index.audited_frames.isna().all() and off.index.suspect_frames.isna().all()


def test_reid_sees_the_frames_where_a_missed_face_leaks(missed_face, tmp_path):
    """Without a reference photo, the person is whoever the input shows; the anonymised frames must not match them."""
    root = missed_face["root"]
    summary = evaluate_footage(str(root / "in"), str(root / "all"), distances_uri=str(tmp_path / "reid.parquet"))
    distances = pd.read_parquet(tmp_path / "reid.parquet")
    assert len(distances) == FRAMES and summary.recognised_input.iloc[0] >= 0.9
    assert set(distances[distances.recognised_output].frame_index) == MISSED
    assert set(distances[distances.recognised_in_place].frame_index) == MISSED  # the untrained model's noise matches nobody


@pytest.mark.slow
def test_the_output_is_checked_against_the_reference_people_the_input_shows():
    """A replaced face near another reference photo is a false match, not the person in the video recognised."""
    alice, bob = np.eye(128, dtype=np.float32)[:2]  # 1.41 apart
    near_alice = alice + 0.3 * np.eye(128, dtype=np.float32)[5]
    assert np.array_equal(reid._people_in(np.stack([alice, bob]), near_alice[None]), alice[None])
    nobody = np.eye(128, dtype=np.float32)[7:9]
    assert np.array_equal(reid._people_in(np.stack([alice, bob]), nobody), np.stack([alice, bob]))  # none shown: all


def test_real_people_are_recognised_in_the_input_and_not_in_the_output(tmp_path, trained_model):
    """Two real people through the default pipeline (CenterFace, the audit) and the CLI check against their photos."""
    from matplotlib import cbook
    from skimage.data import astronaut

    from pprl.cli import main

    testclips.astronaut_clip(str(tmp_path / "in" / "astronaut.mp4"), frames=24)
    testclips.hopper_clip(str(tmp_path / "in" / "hopper.mp4"), frames=24)
    Image.fromarray(astronaut()).save(tmp_path / "astronaut.png")
    hopper = str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    main(["anonymize-footage", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model", trained_model,
          "--num-workers", "0", "--no-progress", "--seed", "1", "--fail-on-suspect"])  # returns: no suspects
    index = pd.read_parquet(tmp_path / "out" / "index.parquet")
    assert (index.suspect_frames == 0).all() and (index.faces == 24).all()
    try:  # returns: not recognised; exit 1: recognised in some output frame, shown below
        main(["evaluate-footage", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
              "--reference", str(tmp_path / "astronaut.png"), "--reference", hopper, "--strict"])
        strict_exit = 0
    except SystemExit as exit_:
        strict_exit = exit_.code
    distances = pd.read_parquet(tmp_path / "out" / "reid.parquet")
    by_video = distances.groupby(distances.video_uri.str.rsplit("/", n=1).str[-1])
    print(by_video[["recognised_input", "recognised_output", "recognised_in_place"]].mean())
    print(by_video[["input_distance", "output_distance", "in_place_distance"]].agg(["min", "mean", "max"]), by_video.output_faces.sum())
    matched = distances[distances.recognised_output][["video_uri", "frame_index", "output_faces", "output_distance", "in_place_distance"]]
    assert strict_exit == 0, f"the person is recognised in these output frames:\n{matched.to_string()}"
    assert (by_video.recognised_input.mean() >= 0.9).all() and by_video.size().to_dict() == {"astronaut.mp4": 24, "hopper.mp4": 24}
    assert not distances.recognised_output.any()
    # Not asserted: aligned where the face was, hair and head outline around the replaced crop bring the distance
    # close to the threshold (docs/footage.md, "Can I publish this?").
    # The recogniser tells the two apart, so a match above means this person.
    a, b = reference_descriptors(FaceRecogniser(), [str(tmp_path / "astronaut.png"), hopper])
    assert np.linalg.norm(a - b) > THRESHOLD
