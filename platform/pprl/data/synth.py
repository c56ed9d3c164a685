"""A procedural FERG-like face dataset: identity and expression are independent, exactly labelled factors.

Identity lives in appearance (face shape, skin tone, hair style and colour, eye shape and colour, nose,
accessories); expression lives in geometry (brow angle and height, eye openness, mouth curve, openness,
width and asymmetry), each expression drawn at a per-image intensity. Pose, scale, lighting and background
vary per image as nuisances. Faces are drawn at 2x with PIL and downsampled, so edges are anti-aliased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pprl.config import EXPRESSIONS

GENERATOR_VERSION = "synth-faces/1"
FACE_ZOOM = 1.15  # the face fills most of the frame so expression cues survive downsampling to 32x32
CUES = ("brow_angle", "brow_raise", "eye_open", "mouth_curve", "mouth_open", "mouth_width", "mouth_asym")

# Deviation of each cue from neutral at full intensity, in the order of CUES.
EXPRESSION_CUES = {
    "anger": (-1.0, -0.5, -0.35, -0.35, 0.0, -0.25, 0.0),
    "disgust": (-0.4, -0.3, -0.6, -0.5, 0.15, 0.0, 1.0),
    "fear": (0.9, 0.7, 0.6, -0.3, 0.45, 0.15, 0.0),
    "joy": (0.0, 0.15, -0.2, 1.0, 0.45, 0.45, 0.0),
    "neutral": (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    "sadness": (1.0, -0.2, -0.5, -1.0, 0.0, -0.25, 0.0),
    "surprise": (0.0, 1.0, 0.9, 0.0, 1.0, -0.35, 0.0),
}
assert tuple(EXPRESSION_CUES) == EXPRESSIONS

SKIN = [(255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (255, 205, 178), (224, 172, 105)]
HAIR = [(20, 20, 20), (110, 60, 20), (230, 190, 90), (170, 40, 20), (150, 150, 150), (60, 40, 120), (30, 110, 60), (240, 240, 235)]
EYES = [(60, 40, 20), (40, 90, 170), (40, 130, 60), (110, 110, 110), (150, 90, 30)]
HAIR_STYLES = ("bald", "cap", "bangs", "spiky", "side", "long")
FACE_SHAPES = ("oval", "round", "square")
NOSES = ("triangle", "button", "long")
ACCESSORIES = ("none", "glasses", "earrings", "hat")


@dataclass(frozen=True)
class Identity:
    """Appearance of one synthetic person: everything here is fixed across their images."""

    face_shape: str
    face_w: float
    face_h: float
    skin: tuple[int, int, int]
    hair_style: str
    hair: tuple[int, int, int]
    eye_color: tuple[int, int, int]
    eye_w: float
    eye_h: float
    eye_gap: float
    nose: str
    nose_size: float
    accessory: str
    lip: tuple[int, int, int]


def make_identity(index: int, seed: int) -> Identity:
    """Discrete attributes by mixed strides (the first six identities differ in every one), continuous jitter by seed."""
    rng = np.random.default_rng([seed, index, 17])
    i = index
    skin = np.array(SKIN[(i * 5 + i // 6) % len(SKIN)]) + rng.integers(-12, 13, 3)
    hair = np.array(HAIR[(i * 3 + i // 8) % len(HAIR)]) + rng.integers(-10, 11, 3)
    return Identity(
        face_shape=FACE_SHAPES[(i + i // 3) % len(FACE_SHAPES)],
        face_w=float(rng.uniform(0.50, 0.62)),
        face_h=float(rng.uniform(0.64, 0.74)),
        skin=tuple(int(v) for v in np.clip(skin, 0, 255)),
        hair_style=HAIR_STYLES[i % len(HAIR_STYLES)],
        hair=tuple(int(v) for v in np.clip(hair, 0, 255)),
        eye_color=EYES[(i * 2 + i // 5) % len(EYES)],
        eye_w=float(rng.uniform(0.075, 0.1)),
        eye_h=float(rng.uniform(0.045, 0.06)),
        eye_gap=float(rng.uniform(0.10, 0.13)),
        nose=NOSES[(i + i // 3 + i // 9) % len(NOSES)],
        nose_size=float(rng.uniform(0.8, 1.2)),
        accessory=ACCESSORIES[(i * 3 + i // 4) % len(ACCESSORIES)],
        lip=(int(rng.integers(150, 210)), int(rng.integers(40, 80)), int(rng.integers(50, 90))),
    )


def expression_cues(expression: int, intensity: float, rng: np.random.Generator) -> np.ndarray:
    """Cue values for one image: the expression's prototype times its intensity, plus small noise."""
    proto = np.array(EXPRESSION_CUES[EXPRESSIONS[expression]], dtype=np.float64)
    return proto * intensity + rng.normal(0.0, 0.05, len(CUES))


@dataclass(frozen=True)
class Nuisance:
    dx: float = 0.0  # translation, fraction of the canvas
    dy: float = 0.0
    scale: float = 1.0
    angle: float = 0.0  # degrees
    brightness: float = 1.0
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    bg_top: tuple[int, int, int] = (200, 200, 200)
    bg_bottom: tuple[int, int, int] = (150, 150, 150)


def random_nuisance(rng: np.random.Generator) -> Nuisance:
    return Nuisance(
        dx=float(rng.uniform(-0.05, 0.05)),
        dy=float(rng.uniform(-0.05, 0.05)),
        scale=float(rng.uniform(0.92, 1.08)),
        angle=float(rng.uniform(-8, 8)),
        brightness=float(rng.uniform(0.85, 1.15)),
        tint=tuple(float(v) for v in rng.uniform(0.92, 1.08, 3)),
        bg_top=tuple(int(v) for v in rng.integers(60, 250, 3)),
        bg_bottom=tuple(int(v) for v in rng.integers(40, 230, 3)),
    )


def render_face(ident: Identity, cues: np.ndarray, nuisance: Nuisance, size: int = 64) -> np.ndarray:
    """One face as a uint8 (size, size, 3) array."""
    big = size * 2
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    _draw_face(ImageDraw.Draw(layer), ident, dict(zip(CUES, cues, strict=True)), big)
    side = max(1, round(big * nuisance.scale * FACE_ZOOM))
    layer = layer.resize((side, side), Image.BILINEAR).rotate(nuisance.angle, Image.BILINEAR, expand=False)
    canvas = _background(nuisance, big)
    offset = (round((big - side) / 2 + nuisance.dx * big), round((big - side) / 2 + nuisance.dy * big))
    canvas.paste(layer, offset, layer)
    rgb = np.asarray(canvas.convert("RGB").resize((size, size), Image.LANCZOS), dtype=np.float32)
    rgb = rgb * nuisance.brightness * np.asarray(nuisance.tint, dtype=np.float32)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def _background(n: Nuisance, big: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, big, dtype=np.float32)[:, None, None]
    grad = (1 - t) * np.asarray(n.bg_top, np.float32) + t * np.asarray(n.bg_bottom, np.float32)
    grad = np.broadcast_to(grad, (big, big, 3)).astype(np.uint8)
    return Image.fromarray(grad, "RGB").convert("RGBA")


def _draw_face(d: ImageDraw.ImageDraw, ident: Identity, cue: dict[str, float], s: int) -> None:
    def box(cx: float, cy: float, w: float, h: float) -> list[float]:
        return [(cx - w / 2) * s, (cy - h / 2) * s, (cx + w / 2) * s, (cy + h / 2) * s]

    cx, cy = 0.5, 0.53
    fw, fh = ident.face_w, ident.face_h
    hair, skin = ident.hair, ident.skin
    if ident.hair_style == "long":
        d.rounded_rectangle(box(cx, cy + 0.04, fw + 0.14, fh + 0.12), radius=0.2 * s, fill=hair)
    # ears (and earrings)
    for side in (-1, 1):
        d.ellipse(box(cx + side * fw / 2, cy, 0.08, 0.14), fill=skin)
        if ident.accessory == "earrings":
            d.ellipse(box(cx + side * fw / 2, cy + 0.09, 0.04, 0.04), fill=(250, 215, 0))
    # head
    if ident.face_shape == "square":
        d.rounded_rectangle(box(cx, cy, fw, fh), radius=0.12 * s, fill=skin)
    elif ident.face_shape == "round":
        d.ellipse(box(cx, cy, fw + 0.04, fh - 0.04), fill=skin)
    else:
        d.ellipse(box(cx, cy, fw, fh), fill=skin)
    _draw_hair(d, ident, cx, cy, fw, fh, s, box)
    _draw_eyes_and_brows(d, ident, cue, cx, s, box)
    _draw_nose(d, ident, cx, s)
    _draw_mouth(d, ident, cue, cx, s)


def _draw_hair(d, ident: Identity, cx, cy, fw, fh, s, box) -> None:
    top = cy - fh / 2
    hair = ident.hair
    style = ident.hair_style
    if style in ("cap", "bangs", "long", "side"):
        d.chord(box(cx, top + 0.1, fw + 0.06, 0.32), 180, 360, fill=hair)
    if style == "bangs":
        d.rectangle([(cx - fw / 2.4) * s, (top + 0.06) * s, (cx + fw / 2.4) * s, (top + 0.15) * s], fill=hair)
    if style == "side":
        d.polygon([((cx - fw / 2) * s, (top + 0.1) * s), ((cx + 0.05) * s, (top + 0.04) * s), ((cx - fw / 2) * s, (top + 0.24) * s)], fill=hair)
    if style == "spiky":
        for k in range(6):
            x0 = cx - fw / 2 + k * fw / 6
            d.polygon([(x0 * s, (top + 0.09) * s), ((x0 + fw / 12) * s, (top - 0.06) * s), ((x0 + fw / 6) * s, (top + 0.09) * s)], fill=hair)
    if ident.accessory == "hat":
        d.rectangle([(cx - fw / 2 - 0.06) * s, (top + 0.02) * s, (cx + fw / 2 + 0.06) * s, (top + 0.07) * s], fill=(40, 40, 90))
        d.rectangle([(cx - fw / 2.6) * s, (top - 0.12) * s, (cx + fw / 2.6) * s, (top + 0.03) * s], fill=(40, 40, 90))


def _draw_eyes_and_brows(d, ident: Identity, cue: dict[str, float], cx, s, box) -> None:
    eye_y = 0.47
    open_ = max(0.12, 1.0 + cue["eye_open"] * 0.7)
    ew, eh = ident.eye_w, ident.eye_h * open_
    for side in (-1, 1):
        ex = cx + side * ident.eye_gap
        d.ellipse(box(ex, eye_y, ew, eh), fill=(250, 250, 250), outline=(30, 30, 30), width=max(1, s // 64))
        iris = min(ew, eh) * 0.9
        if eh > 0.012:
            d.ellipse(box(ex, eye_y, iris, iris), fill=ident.eye_color)
            d.ellipse(box(ex, eye_y, iris * 0.4, iris * 0.4), fill=(10, 10, 10))
        # brow: inner end moves with brow_angle (+ = inner up, as in fear/sadness), whole brow with brow_raise
        brow_y = eye_y - 0.07 - cue["brow_raise"] * 0.04
        inner_dy = -cue["brow_angle"] * 0.045
        inner = (cx + side * (ident.eye_gap - 0.055), brow_y + inner_dy)
        outer = (cx + side * (ident.eye_gap + 0.06), brow_y - inner_dy * 0.3)
        d.line([(inner[0] * s, inner[1] * s), (outer[0] * s, outer[1] * s)], fill=tuple(v // 2 for v in ident.hair), width=max(2, s // 28))
        if ident.accessory == "glasses":
            d.ellipse(box(ex, eye_y, ew + 0.05, 0.1), outline=(20, 20, 20), width=max(1, s // 50))
    if ident.accessory == "glasses":
        d.line([((cx - ident.eye_gap + (ew + 0.05) / 2) * s, eye_y * s), ((cx + ident.eye_gap - (ew + 0.05) / 2) * s, eye_y * s)], fill=(20, 20, 20), width=max(1, s // 50))


def _draw_nose(d, ident: Identity, cx, s) -> None:
    k = ident.nose_size
    shade = tuple(max(0, v - 45) for v in ident.skin)
    if ident.nose == "triangle":
        d.polygon([(cx * s, 0.52 * s), ((cx - 0.03 * k) * s, 0.6 * s), ((cx + 0.03 * k) * s, 0.6 * s)], fill=shade)
    elif ident.nose == "button":
        d.ellipse([(cx - 0.025 * k) * s, 0.55 * s, (cx + 0.025 * k) * s, 0.6 * s], fill=shade)
    else:
        d.line([(cx * s, 0.5 * s), (cx * s, 0.6 * s), ((cx + 0.025 * k) * s, 0.6 * s)], fill=shade, width=max(2, s // 40))


def _draw_mouth(d, ident: Identity, cue: dict[str, float], cx, s) -> None:
    """The mouth as a closed polygon: corners lifted by curve (and asymmetry), lips parted by openness."""
    my = 0.69
    half = 0.095 * (1.0 + cue["mouth_width"] * 0.4)
    curve = cue["mouth_curve"] * 0.06
    gap = max(0.0, cue["mouth_open"]) * 0.07
    asym = cue["mouth_asym"] * 0.055
    xs = np.linspace(-1.0, 1.0, 13)
    upper, lower = [], []
    for t in xs:
        lift = curve * t * t + asym * max(t, 0.0)  # + curve raises the corners (smile)
        x = cx + half * t
        bulge = (1 - t * t)
        upper.append((x * s, (my - lift - 0.008 * bulge - gap * 0.3 * bulge) * s))
        lower.append((x * s, (my - lift + 0.012 * bulge + gap * bulge) * s))
    d.polygon(upper + lower[::-1], fill=ident.lip)
    if gap > 0.01:
        inner_u = [(x, y + 0.006 * s) for x, y in upper[2:-2]]
        inner_l = [(x, y - 0.008 * s) for x, y in lower[2:-2]]
        d.polygon(inner_u + inner_l[::-1], fill=(60, 15, 20))


def draw_sample(identity: int, expression: int, seed: int, image_seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One labelled image and its cue vector, deterministic for (seed, image_seed)."""
    rng = np.random.default_rng([seed, image_seed, 3])
    intensity = 0.0 if EXPRESSIONS[expression] == "neutral" else float(rng.uniform(0.7, 1.0))
    cues = expression_cues(expression, intensity, rng)
    image = render_face(make_identity(identity, seed), cues, random_nuisance(rng), size)
    return image, cues


def sequence_intensities(frames: int) -> np.ndarray:
    """Neutral -> apex -> neutral, MUG style."""
    return np.sin(np.linspace(0.0, math.pi, frames)) ** 1.5


def draw_sequence_frame(identity: int, expression: int, seed: int, sequence: int, frame: int, frames: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One frame of a clip: the nuisance drifts smoothly within the clip, intensity follows the sine envelope."""
    rng = np.random.default_rng([seed, sequence, 5])
    start, end = random_nuisance(rng), random_nuisance(rng)
    apex = float(rng.uniform(0.7, 1.0))
    a = frame / max(1, frames - 1)
    nuisance = Nuisance(
        dx=start.dx + (end.dx - start.dx) * a,
        dy=start.dy + (end.dy - start.dy) * a,
        scale=start.scale + (end.scale - start.scale) * a,
        angle=start.angle + (end.angle - start.angle) * a,
        brightness=start.brightness,
        tint=start.tint,
        bg_top=start.bg_top,
        bg_bottom=start.bg_bottom,
    )
    frame_rng = np.random.default_rng([seed, sequence, frame, 7])
    intensity = apex * float(sequence_intensities(frames)[frame])
    if EXPRESSIONS[expression] == "neutral":
        intensity = 0.0
    cues = expression_cues(expression, intensity, frame_rng)
    return render_face(make_identity(identity, seed), cues, nuisance, size), cues
