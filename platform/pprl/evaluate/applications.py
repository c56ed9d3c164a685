"""The paper's applications: expression morphing and image completion (``img_applications.py``).

Morphing interpolates the latent means of two images of one subject and decodes every step with one fixed identity
code. Completion greys out the mouth (the authors' rows 40:55, cols 18:47 of a 64 px image, scaled to the model's
size), encodes the occluded face, decodes it with the source identity and pastes only the box back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from pprl.config import EXPRESSIONS
from pprl.data.dataset import Dataset

MOUTH_BOX_64 = (40, 55, 18, 47)  # rows 40:55, cols 18:47 at 64 px
GREY = 128  # the authors set the box to 0 in [-1, 1]: mid-grey


def mouth_box(size: int) -> tuple[int, int, int, int]:
    """(row0, row1, col0, col1) of the mouth box at ``size`` px, rounded outwards."""
    r0, r1, c0, c1 = MOUTH_BOX_64
    scale = size / 64
    return math.floor(r0 * scale), math.ceil(r1 * scale), math.floor(c0 * scale), math.ceil(c1 * scale)


def mouth_mask(size: int) -> np.ndarray:
    """bool (size, size), True = missing."""
    mask = np.zeros((size, size), bool)
    r0, r1, c0, c1 = mouth_box(size)
    mask[r0:r1, c0:c1] = True
    return mask


def grid(rows: list[list[np.ndarray]], cell: int | None = None, gap: int = 2) -> np.ndarray:
    """Tile HWC uint8 images into one image (white gaps); cells are scaled (nearest) to ``cell`` px, at least 64."""
    size = cell or max(64, max(im.shape[0] for row in rows for im in row))
    width = max(len(r) for r in rows)
    out = np.full((len(rows) * (size + gap) - gap, width * (size + gap) - gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            tile = np.asarray(Image.fromarray(im).resize((size, size), Image.NEAREST))
            out[i * (size + gap) : i * (size + gap) + size, j * (size + gap) : j * (size + gap) + size] = tile
    return out


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in images])


# ----------------------------------------------------------------------------------------------------------- morph


def morph_strip(model, a: np.ndarray, b: np.ndarray, steps: int, identity: int) -> tuple[np.ndarray, np.ndarray]:
    """(strip image: a | decoded steps | b, the decoded steps (steps, S, S, 3))."""
    if steps < 2:
        raise ValueError(f"morph needs at least 2 steps, got {steps}")
    if not 0 <= identity < model.num_identities:
        raise ValueError(f"identity {identity} is out of range [0, {model.num_identities})")
    frames = np.asarray(model.morph(a, b, steps, identity), np.uint8)
    ends = _resize(np.stack([a, b]), model.image_size)
    return grid([[ends[0], *frames, ends[1]]]), frames


def expression_index(name_or_index: str | int, names: tuple[str, ...] = EXPRESSIONS) -> int:
    text = str(name_or_index).strip().lower()
    if text.isdigit() and int(text) < len(names):
        return int(text)
    if text in names:
        return names.index(text)
    raise ValueError(f"unknown expression {name_or_index!r}; use an index < {len(names)} or one of {', '.join(names)}")


def pick_pair(dataset: Dataset, subject: int | None, expr_a: str | int, expr_b: str | int) -> tuple[np.ndarray, np.ndarray, int]:
    """Two test images of one subject with the given expressions: (a, b, subject)."""
    names = tuple(dataset.info.get("expressions") or EXPRESSIONS)
    ea, eb = expression_index(expr_a, names), expression_index(expr_b, names)
    test = dataset.split("test")
    subject = int(test["identity"].min()) if subject is None else subject
    picks = []
    for expr in (ea, eb):
        rows = test[(test["identity"] == subject) & (test["expression"] == expr)]
        if rows.empty:
            raise ValueError(f"{dataset.root}: no test image of identity {subject} with expression {names[expr]}")
        picks.append(rows.iloc[:1])
    a, b = (dataset.load_images(rows)[0] for rows in picks)
    return a, b, subject


# ----------------------------------------------------------------------------------------------------------- completion


@dataclass
class Completion:
    image: np.ndarray  # the triplets grid: one row per face, original | masked | completed
    masked: np.ndarray
    completed: np.ndarray
    l1_completed: float  # mean |completed - original| inside the box, in [0, 1]
    l1_grey: float  # the same for the grey fill: what "no completion" scores

    def summary(self) -> dict[str, float]:
        return {"faces": len(self.completed), "l1_completed": round(self.l1_completed, 4), "l1_grey_fill": round(self.l1_grey, 4)}


def complete_faces(model, images: np.ndarray, identities: np.ndarray) -> Completion:
    """Mask the mouth, complete with the source identity, paste the box back; triplets and box L1 errors."""
    originals = _resize(np.asarray(images, np.uint8), model.image_size)
    mask = mouth_mask(model.image_size)
    masked = originals.copy()
    masked[:, mask] = GREY
    decoded = np.asarray(model.complete(masked, mask, identities=np.asarray(identities)), np.uint8)
    completed = np.where(mask[None, :, :, None], decoded, masked)  # only the box comes from the decoder
    box = mask[None, :, :, None].repeat(len(originals), 0).repeat(3, 3)
    err = lambda x: float(np.abs(x.astype(np.float32) - originals.astype(np.float32))[box].mean() / 255)  # noqa: E731
    rows = [[o, m, c] for o, m, c in zip(originals, masked, completed, strict=True)]
    return Completion(grid(rows), masked, completed, err(completed), err(masked))


def pick_faces(dataset: Dataset, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` test images cycling through identities and expressions: (images, identities)."""
    test = dataset.split("test")
    chosen = []
    for i in range(count):
        rows = test[(test["identity"] == i % dataset.num_identities) & (test["expression"] == i % dataset.num_expressions)]
        chosen.append(rows.index[0] if len(rows) else test.index[i % len(test)])
    rows = test.loc[chosen]
    return dataset.load_images(rows), rows["identity"].to_numpy(np.int64)
