"""Re-identification check: is the person in a video recognised in its anonymised output?

An independent face recogniser, dlib's ResNet (128-d descriptors; two faces are the same person when their
descriptors are closer than 0.6, the model's own threshold), compares faces, frame by frame:

- the *person* is the face in ``reference`` photos when given, else every face dlib finds in the input video;
- an input frame recognises the person when one of its faces is within the threshold of the reference (without a
  reference: of a face in another input frame);
- an output frame recognises the person when a face dlib finds in it is within the threshold of the person: what a
  recogniser run over the published footage sees;
- a stronger attacker who knows where the faces were fits the landmarks to the output's pixels at the input's face
  boxes (``in_place``): the recogniser's aligned crop then also holds what the paste keeps around the replaced crop
  (hair, head outline), so this distance is the closer one.

Faces are found by ``DlibDetector`` (HOG by default), aligned by dlib's 5-point landmark model; all weights come
from the ``face-recognition-models`` wheel.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from pprl import storage
from pprl.footage.detect import DlibDetector, dlib_model_path
from pprl.footage.pipeline import local_input, plan
from pprl.footage.video import VideoReader

log = logging.getLogger(__name__)

THRESHOLD = 0.6  # dlib's same-person distance for this model
DISTANCES_SCHEMA = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),  # the input video
        pa.field("output_uri", pa.string(), nullable=False),
        pa.field("frame_index", pa.int64(), nullable=False),
        pa.field("timestamp", pa.float64()),
        pa.field("input_faces", pa.int32()),  # faces dlib found in the input frame
        pa.field("input_distance", pa.float32()),  # nearest input face to the person; null: no face
        pa.field("output_faces", pa.int32()),  # faces dlib found in the output frame
        pa.field("output_distance", pa.float32()),  # nearest of those to the person; null: none
        pa.field("in_place_distance", pa.float32()),  # the output's pixels at the input's face boxes; null: no input face
        pa.field("recognised_input", pa.bool_()),
        pa.field("recognised_output", pa.bool_()),
        pa.field("recognised_in_place", pa.bool_()),
    ],
    metadata={"pprl.schema": "footage-reid/v1"},
)


@functools.lru_cache(maxsize=1)
def _dlib_models():
    import dlib

    return (dlib.shape_predictor(dlib_model_path("shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(dlib_model_path("dlib_face_recognition_resnet_model_v1.dat")))


class FaceRecogniser:
    """Faces found by ``DlibDetector`` and described by dlib's ResNet (about 0.1 s per face on a CPU core)."""

    def __init__(self, detector: str = "hog", min_face: int = 40):
        self.detector = DlibDetector(detector, min_face)
        self.landmarks, self.net = _dlib_models()

    def faces(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (K, 4), descriptors (K, 128)) of the faces found in ``image``."""
        boxes = self.detector.detect([image], [0])[0][:, :4]
        return boxes, self.describe(image, boxes)

    def describe(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Descriptors of whatever ``image`` shows in ``boxes``: landmarks are fitted inside each box, then aligned."""
        import dlib

        image = np.ascontiguousarray(image)
        out = []
        for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
            rect = dlib.rectangle(round(x0), round(y0), round(x1) - 1, round(y1) - 1)
            out.append(np.asarray(self.net.compute_face_descriptor(image, self.landmarks(image, rect)), np.float32))
        return np.stack(out) if out else np.zeros((0, 128), np.float32)


def reference_descriptors(recogniser: FaceRecogniser, paths: list[str]) -> np.ndarray:
    """The largest face of each reference photo (local or s3://); a photo without a face is an error naming it."""
    out = []
    for path in paths:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as img:
            image = np.asarray(img.convert("RGB"))
        boxes, desc = recogniser.faces(image)
        if not len(boxes):
            raise ValueError(f"--reference {path}: no face found (looked for faces of {recogniser.detector.min_face} px and larger)")
        out.append(desc[int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))])
    return np.stack(out)


@dataclass
class _Frame:
    index: int
    time: float
    inputs: np.ndarray  # descriptors of the input's faces
    found: np.ndarray  # descriptors of the faces found in the output
    in_place: np.ndarray  # descriptors of the output at the input's face boxes


def _paired_frames(input_path: str, output_path: str, every: int) -> Iterator[tuple[int, float, np.ndarray, np.ndarray]]:
    with VideoReader(input_path) as a, VideoReader(output_path) as b:
        ia, ib = a.frames(), b.frames()
        for fa in ia:
            fb = next(ib, None)
            if fb is None:
                raise ValueError(f"{output_path} has fewer frames than {input_path} ({fa.index})")
            if fa.index % every == 0:
                yield fa.index, fa.time, fa.image, fb.image
        if next(ib, None) is not None:
            raise ValueError(f"{output_path} has more frames than {input_path}")


def compare_videos(input_path: str, output_path: str, recogniser: FaceRecogniser, reference: np.ndarray | None = None,
                   every: int = 1) -> pd.DataFrame:
    """Per evaluated frame: faces and distances to the person in the input and the output (``DISTANCES_SCHEMA``
    columns, without the two URIs)."""
    frames = []
    for index, time, before, after in _paired_frames(input_path, output_path, every):
        boxes, inputs = recogniser.faces(before)
        _, found = recogniser.faces(after)
        frames.append(_Frame(index, time, inputs, found, recogniser.describe(after, boxes)))
    gallery = reference if reference is not None else _stack([f.inputs for f in frames])
    owner = None if reference is not None else np.concatenate([[k] * len(f.inputs) for k, f in enumerate(frames)] or [[]])
    people = _people_in(reference, _stack([f.inputs for f in frames])) if reference is not None else gallery
    rows = []
    for k, f in enumerate(frames):
        exclude = owner == k if owner is not None else None  # without a reference, an input face is not its own match
        d_in, d_out, d_place = _nearest(f.inputs, gallery, exclude), _nearest(f.found, people), _nearest(f.in_place, people)
        rows.append({"frame_index": f.index, "timestamp": f.time, "input_faces": len(f.inputs), "input_distance": d_in,
                     "output_faces": len(f.found), "output_distance": d_out, "in_place_distance": d_place,
                     "recognised_input": _match(d_in), "recognised_output": _match(d_out), "recognised_in_place": _match(d_place)})
    return pd.DataFrame(rows, columns=[f.name for f in DISTANCES_SCHEMA][2:])


def _people_in(reference: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """The reference people this video's input shows (any input face within the threshold); all of them when it shows
    none. The output is checked against these only: a replaced face that comes near *another* reference photo is a
    false match of the recogniser, not this person recognised (on the test footage, the astronaut's replaced face came
    0.596 from Grace Hopper's photo and 0.632 from her own; docs/footage.md)."""
    shown = np.array([_match(_nearest(inputs, reference[i : i + 1])) for i in range(len(reference))], bool)
    return reference[shown] if shown.any() else reference


def _match(distance: float | None) -> bool:
    return distance is not None and distance < THRESHOLD


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros((0, 128), np.float32)


def _nearest(faces: np.ndarray, gallery: np.ndarray, exclude: np.ndarray | None = None) -> float | None:
    """The smallest distance from any of ``faces`` to the gallery (``exclude``: gallery rows to leave out)."""
    if exclude is not None:
        gallery = gallery[~exclude]
    if not len(faces) or not len(gallery):
        return None
    faces, gallery = faces.astype(np.float64), gallery.astype(np.float64)
    squared = (faces**2).sum(1)[:, None] + (gallery**2).sum(1)[None, :] - 2 * faces @ gallery.T  # no (K, N, 128) array
    return float(np.sqrt(max(float(squared.min()), 0.0)))


def pairs(input_uri: str, output_uri: str) -> list[tuple[str, str]]:
    """(input video, anonymised video): two files, or an input tree and the output tree ``anonymize-footage`` wrote."""
    fs, path = storage.filesystem(input_uri)
    out_fs, out_path = storage.filesystem(output_uri)
    if fs.isfile(path) and out_fs.isfile(out_path):
        return [(input_uri, output_uri)]
    found = [(t.input_uri, t.output_uri) for t in plan(input_uri, output_uri) if storage.exists(t.output_uri)]
    if not found:
        raise ValueError(f"--output {output_uri}: no anonymised video for any video under --input {input_uri}")
    return found


def default_distances_uri(output_uri: str) -> str:
    fs, path = storage.filesystem(output_uri)
    return output_uri + ".reid.parquet" if fs.isfile(path) else storage.join(output_uri, "reid.parquet")


def evaluate_footage(input_uri: str, output_uri: str, distances_uri: str | None = None, references: list[str] | None = None,
                     detector: str = "hog", min_face: int = 40, every: int = 1) -> pd.DataFrame:
    """Compare every (input, output) pair; writes the per-frame distances (``DISTANCES_SCHEMA``) and returns one row
    per video: frames evaluated, and the share of them that recognise the person in the input, in the output and in
    the output in place."""
    if every < 1:
        raise ValueError(f"--every must be >= 1, got {every}")
    recogniser = FaceRecogniser(detector, min_face)
    reference = reference_descriptors(recogniser, references) if references else None
    parts = []
    for src, dst in pairs(input_uri, output_uri):
        with _local(src) as a, _local(dst) as b:
            df = compare_videos(a, b, recogniser, reference, every)
        parts.append(df.assign(video_uri=src, output_uri=dst))
        log.info("%s: person recognised in %.1f %% of input frames, %.1f %% of output frames (%.1f %% in place; %d frames)", src,
                 100 * df.recognised_input.mean(), 100 * df.recognised_output.mean(), 100 * df.recognised_in_place.mean(), len(df))
    table = pa.Table.from_pandas(pd.concat(parts)[[f.name for f in DISTANCES_SCHEMA]], schema=DISTANCES_SCHEMA, preserve_index=False)
    storage.write_parquet(table, distances_uri or default_distances_uri(output_uri))
    return summarise(table.to_pandas())


def summarise(distances: pd.DataFrame) -> pd.DataFrame:
    by = distances.groupby("video_uri", sort=True)
    return pd.DataFrame({"frames": by.size(), "recognised_input": by.recognised_input.mean(),
                         "recognised_output": by.recognised_output.mean(),
                         "recognised_in_place": by.recognised_in_place.mean()}).reset_index()


@contextlib.contextmanager
def _local(uri: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pprl-reid-") as tmp, local_input(uri, tmp) as path:
        yield path
