"""Importers from the real datasets' layouts into the platform's dataset format.

- FERG-DB: ``<Character>/<character>_<expression>/*.png`` (RGBA, composited on white).
- MUG: ``<subject>/<expression>/<take>/*.jpg``: each take is a sequence, split whole.
- Generic: a folder of images plus a CSV with ``path,identity,expression[,split]``.

Unreadable images are skipped and reported by name (or stop the import with ``strict=True``).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pandas as pd
from tqdm import tqdm

from pprl import storage
from pprl.config import EXPRESSIONS
from pprl.data.dataset import DatasetError, decode_image, encode_png, safe_relative, stratified_split, write_dataset_index

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# MUG names happiness "happiness"; FERG says "joy". Both map to FERG's order.
EXPRESSION_ALIASES = {"happiness": "joy", "happy": "joy", "angry": "anger", "sad": "sadness", "surprised": "surprise", "disgusted": "disgust", "scared": "fear"}


@dataclass
class ImportResult:
    imported: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Item:
    source: str
    identity: int
    expression: int
    sequence: int = -1
    frame: int = -1
    split: str | None = None


def expression_index(name: str) -> int:
    key = EXPRESSION_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key.isdigit() and int(key) < len(EXPRESSIONS):
        return int(key)
    if key not in EXPRESSIONS:
        raise DatasetError(f"unknown expression {name!r}; expected one of {', '.join(EXPRESSIONS)} (or an index 0-6)")
    return EXPRESSIONS.index(key)


def _relative(root: str, uri: str) -> str:
    return storage.strip_scheme(uri)[len(storage.strip_scheme(root).rstrip("/")) + 1 :]


def import_ferg(src: str, out: str, size: int = 64, seed: int = 0, strict: bool = False) -> ImportResult:
    files = storage.list_files(src, IMAGE_SUFFIXES)
    characters = sorted({_relative(src, f).split("/")[0] for f in files})
    items = []
    for f in files:
        parts = _relative(src, f).split("/")
        if len(parts) != 3:
            continue
        character, folder, _ = parts
        expr_name = folder.split("_", 1)[-1]
        items.append(_Item(f, characters.index(character), expression_index(expr_name)))
    if not items:
        raise DatasetError(f"{src}: no FERG images found (expected <Character>/<character>_<expression>/*.png)")
    split = stratified_split(((i.identity, i.expression) for i in items), 0.15, seed)
    for item, s in zip(items, split, strict=True):
        item.split = s
    return _write(items, out, size, strict, {"name": "ferg-db", "identity_names": characters, "source": src})


def import_mug(src: str, out: str, size: int = 64, seed: int = 0, strict: bool = False) -> ImportResult:
    files = storage.list_files(src, IMAGE_SUFFIXES)
    subjects = sorted({_relative(src, f).split("/")[0] for f in files})
    takes: dict[tuple[str, str, str], list[str]] = {}
    for f in files:
        parts = _relative(src, f).split("/")
        if len(parts) != 4:
            continue
        takes.setdefault(tuple(parts[:3]), []).append(f)
    if not takes:
        raise DatasetError(f"{src}: no MUG frames found (expected <subject>/<expression>/<take>/*.jpg)")
    items = []
    keys = sorted(takes)
    for seq, (subject, expr_name, _take) in enumerate(keys):
        for frame, f in enumerate(sorted(takes[(subject, expr_name, _take)])):
            items.append(_Item(f, subjects.index(subject), expression_index(expr_name), seq, frame))
    seq_split = stratified_split(((subjects.index(k[0]), expression_index(k[1])) for k in keys), 0.15, seed)
    for item in items:
        item.split = seq_split[item.sequence]
    return _write(items, out, size, strict, {"name": "mug", "identity_names": subjects, "source": src})


def import_csv(src: str, labels: str, out: str, size: int = 64, seed: int = 0, strict: bool = False) -> ImportResult:
    table = pd.read_csv(io.BytesIO(storage.read_bytes(labels)))
    missing = {"path", "identity", "expression"} - set(table.columns)
    if missing:
        raise DatasetError(f"{labels}: missing column(s) {', '.join(sorted(missing))}; need path,identity,expression[,split]")
    items = []
    for row_number, row in enumerate(table.itertuples(index=False), start=2):
        if not safe_relative(str(row.path)):
            raise DatasetError(f"{labels}: line {row_number}: path {row.path!r} escapes the image folder")
        try:
            identity = int(row.identity)
        except ValueError:
            raise DatasetError(f"{labels}: line {row_number}: identity {row.identity!r} is not an integer") from None
        split = getattr(row, "split", None)
        items.append(_Item(storage.join(src, str(row.path)), identity, expression_index(str(row.expression)), split=split))
    if any(i.split is None or pd.isna(i.split) for i in items):
        for item, s in zip(items, stratified_split(((i.identity, i.expression) for i in items), 0.15, seed), strict=True):
            item.split = s
    return _write(items, out, size, strict, {"name": "csv-import", "source": src})


def _write(items: list[_Item], out: str, size: int, strict: bool, info: dict) -> ImportResult:
    result = ImportResult()
    rows: list[dict] = []
    storage.makedirs(out)

    def convert(index_item: tuple[int, _Item]) -> tuple[_Item, str | None, str | None]:
        index, item = index_item
        try:
            image = decode_image(storage.read_bytes(item.source), size, source=item.source)
        except (DatasetError, storage.StorageError) as err:
            if strict:
                raise
            return item, None, str(err)
        path = f"images/id{item.identity:03d}/{EXPRESSIONS[item.expression]}/{index:06d}.png"
        storage.write_bytes(storage.join(out, path), encode_png(image))
        return item, path, None

    convert_one: Callable = convert
    with ThreadPoolExecutor(8) as pool:
        for item, path, error in tqdm(pool.map(convert_one, enumerate(items)), total=len(items), desc="import", unit="img"):
            if error:
                result.skipped.append((item.source, error))
                continue
            row = {"path": path, "identity": item.identity, "expression": item.expression, "split": item.split}
            if item.sequence >= 0:
                row.update(sequence=item.sequence, frame=item.frame)
            rows.append(row)
    if not rows:
        raise DatasetError(f"nothing imported: all {len(items)} images were unreadable")
    result.imported = len(rows)
    write_dataset_index(out, rows, {**info, "image_size": size, "skipped": [s for s, _ in result.skipped]})
    return result
