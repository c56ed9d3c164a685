"""The dataset format every part of the platform reads.

A dataset is a folder (local path, ``file://`` or ``s3://``) holding PNG images, ``manifest.parquet`` and
``dataset.json``. The manifest has one row per image: ``path`` (relative to the folder), ``identity`` (int32),
``expression`` (int32), ``split`` (``train``/``test``) and, for clips, ``sequence`` and ``frame``.
The manifest is written last, so it never names a file that is not there.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from PIL import Image

from pprl import storage
from pprl.config import EXPRESSIONS

MANIFEST = "manifest.parquet"
INFO = "dataset.json"
REQUIRED_COLUMNS = {"path": "string", "identity": "int32", "expression": "int32", "split": "string"}
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """A dataset that cannot be used, with what is wrong and where."""


@dataclass
class Dataset:
    root: str
    manifest: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_identities(self) -> int:
        return int(self.info.get("num_identities") or self.manifest["identity"].max() + 1)

    @property
    def num_expressions(self) -> int:
        return len(self.info.get("expressions") or EXPRESSIONS)

    @property
    def image_size(self) -> int:
        return int(self.info.get("image_size", 64))

    def split(self, name: str) -> pd.DataFrame:
        return self.manifest[self.manifest["split"] == name].reset_index(drop=True)

    def uri(self, relative_path: str) -> str:
        return storage.join(self.root, relative_path)

    def load_images(self, rows: pd.DataFrame, size: int | None = None, threads: int = 8) -> np.ndarray:
        """Decode the rows' images into one uint8 (N, H, W, 3) array, resized to ``size`` if given."""
        size = size or self.image_size
        uris = [self.uri(p) for p in rows["path"]]
        with ThreadPoolExecutor(threads) as pool:
            images = list(pool.map(lambda u: decode_image(storage.read_bytes(u), size, source=u), uris))
        return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)

    def arrays(self, split: str, size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(images uint8 NHWC, identity int64, expression int64) for one split."""
        rows = self.split(split)
        return (
            self.load_images(rows, size),
            rows["identity"].to_numpy(np.int64),
            rows["expression"].to_numpy(np.int64),
        )


def decode_image(data: bytes, size: int | None = None, source: str = "<bytes>") -> np.ndarray:
    """PNG/JPEG bytes -> uint8 RGB (H, W, 3); RGBA is composited on white (FERG's transparent background)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                white = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(white, im)
            im = im.convert("RGB")
            if size and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as err:  # PIL raises many types for bad data
        raise DatasetError(f"{source}: cannot decode image ({err})") from None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def load_dataset(root: str) -> Dataset:
    """Read and validate ``manifest.parquet`` and ``dataset.json`` under ``root``."""
    manifest_uri = storage.join(root, MANIFEST)
    if not storage.exists(manifest_uri):
        raise DatasetError(f"{root}: not a dataset (no {MANIFEST}); create one with `pprl data synth` or `pprl data import-*`")
    manifest = storage.read_parquet(manifest_uri).to_pandas()
    info_uri = storage.join(root, INFO)
    info = json.loads(storage.read_text(info_uri)) if storage.exists(info_uri) else {}
    validate_manifest(manifest, info, where=manifest_uri)
    return Dataset(root=str(root), manifest=manifest, info=info)


def validate_manifest(manifest: pd.DataFrame, info: dict[str, Any], where: str) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in manifest.columns]
    if missing:
        raise DatasetError(f"{where}: missing column(s) {', '.join(missing)}; required: {', '.join(REQUIRED_COLUMNS)}")
    if manifest.empty:
        raise DatasetError(f"{where}: the manifest has no rows")
    num_expr = len(info.get("expressions") or EXPRESSIONS)
    num_id = info.get("num_identities")
    for column, limit in (("identity", num_id), ("expression", num_expr)):
        values = manifest[column]
        if values.isna().any():
            raise DatasetError(f"{where}: column {column} has empty values (row {int(values.isna().idxmax())})")
        bad = values[(values < 0) | ((values >= limit) if limit else False)]
        if len(bad):
            row = int(bad.index[0])
            raise DatasetError(f"{where}: {column}={int(bad.iloc[0])} at row {row} ({manifest['path'].iloc[row]}) is out of range [0, {limit})")
    bad_split = ~manifest["split"].isin(SPLITS)
    if bad_split.any():
        row = int(bad_split.idxmax())
        raise DatasetError(f"{where}: split={manifest['split'].iloc[row]!r} at row {row}; expected one of {SPLITS}")
    for row, path in enumerate(manifest["path"]):
        if not safe_relative(path):
            raise DatasetError(f"{where}: path {path!r} at row {row} escapes the dataset root (absolute or '..')")


def safe_relative(path: str) -> bool:
    if not isinstance(path, str) or not path or path.startswith(("/", "\\")) or "://" in path:
        return False
    return not posixpath.normpath(path).startswith("..")


def manifest_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows -> a typed Arrow table with the required columns first."""
    df = pd.DataFrame(rows)
    for column, dtype in REQUIRED_COLUMNS.items():
        if dtype == "int32":
            df[column] = df[column].astype("int32")
    for column in ("sequence", "frame"):
        if column in df:
            df[column] = df[column].astype("int32")
    ordered = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    return pa.Table.from_pandas(df[ordered], preserve_index=False)


def write_dataset_index(root: str, rows: list[dict[str, Any]], info: dict[str, Any]) -> dict[str, Any]:
    """Write ``dataset.json`` then ``manifest.parquet`` (last, atomically) once every image is in place."""
    table = manifest_table(rows)
    df = table.to_pandas()
    info = {
        "expressions": list(EXPRESSIONS),
        "num_identities": int(df["identity"].max()) + 1,
        **info,
        "counts": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "num_images": len(df),
    }
    validate_manifest(df, info, where=storage.join(root, MANIFEST))
    storage.write_text(storage.join(root, INFO), json.dumps(info, indent=2))
    storage.write_parquet(table, storage.join(root, MANIFEST))
    return info


def stratified_split(keys: Iterable[Any], test_fraction: float, seed: int) -> list[str]:
    """85/15-style split, stratified by key (e.g. (identity, expression) or a sequence's key)."""
    keys = list(keys)
    split = ["train"] * len(keys)
    groups: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    rng = np.random.default_rng(seed)
    for key in sorted(groups, key=repr):
        members = groups[key]
        n_test = int(round(len(members) * test_fraction))
        n_test = min(max(n_test, 1), len(members) - 1) if len(members) > 1 else 0
        for i in rng.permutation(members)[:n_test]:
            split[int(i)] = "test"
    return split
