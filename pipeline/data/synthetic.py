"""The embedded synthetic WSSS benchmark: procedurally generated images with pixel ground truth.

Every image is a background texture with one to three objects painted on it. Each object class has

* a **body** whose shape is class-specific and whose colour is the class's typical colour only part of the
  time (``body_color_bias``), otherwise any colour of a palette shared by all classes, so the body is only
  weakly distinctive, and
* a small **discriminative part** (a saturated mark of a class-specific colour and shape) near the top of
  the body, where a classifier's CAM fires first.

Each class prefers one background texture (``context_prob``), so CAMs learn to leak into the background;
objects vary in scale, overlap and occlude each other; boundaries are crisp colour edges (a CRF can snap
to them); and the ground-truth masks carry a thin 255 band on label boundaries, as in PASCAL VOC.

Everything is generated from one integer seed: the same seed gives byte-identical images and masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import SyntheticParams
from pipeline.data.layout import IGNORE


@dataclass(frozen=True)
class ObjectClass:
    """One foreground class of the benchmark.

    Attributes:
        name: Class name.
        body: Body shape: ``ellipse``, ``rectangle``, ``diamond`` or ``trapezoid``.
        part: Shape of the discriminative mark: ``disk``, ``square`` or ``bar``.
        part_color: RGB colour of the mark.
        context: Index into ``TEXTURES`` of the background this class usually sits on.
        body_color: Index into ``BODY_PALETTE`` of the class's typical body colour; it stands out from the
            class's usual background (a camouflaged body would leave the class only its mark).
    """

    name: str
    body: str
    part: str
    part_color: tuple[int, int, int]
    context: int
    body_color: int


TEXTURES = ("sky", "water", "sand", "road", "grass", "wall")

CLASSES = (
    ObjectClass("kite", "diamond", "disk", (230, 30, 40), context=0, body_color=0),
    ObjectClass("boat", "trapezoid", "bar", (250, 250, 250), context=1, body_color=1),
    ObjectClass("turtle", "ellipse", "square", (40, 200, 60), context=2, body_color=2),
    ObjectClass("car", "rectangle", "bar", (250, 210, 20), context=3, body_color=3),
    ObjectClass("beetle", "ellipse", "disk", (220, 40, 220), context=4, body_color=5),
    ObjectClass("sign", "rectangle", "square", (30, 220, 230), context=5, body_color=4),
)

# How far above the body centre the mark sits, in units of the vertical half-extent (it stays inside the body).
PART_OFFSET = {"ellipse": 0.4, "rectangle": 0.45, "diamond": 0.3, "trapezoid": 0.05}

# Muted body colours shared by every class: the body says little about the class.
BODY_PALETTE = np.array(
    [
        (120, 80, 50),
        (110, 110, 60),
        (70, 90, 120),
        (120, 50, 60),
        (50, 110, 105),
        (150, 125, 90),
        (85, 85, 105),
        (105, 70, 110),
    ],
    dtype=np.float32,
)

# A body colour closer than this (RGB distance) to the background's mean colour is not used on it.
MIN_BODY_CONTRAST = 60.0


def class_names() -> list[str]:
    """Return the label names, background first."""
    return ["background"] + [c.name for c in CLASSES]


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """Paint a (size, size, 3) float32 background texture."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0.0, 1.0, (size, size, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * math.pi)
    if kind == "sky":
        base = np.array([150, 190, 235], np.float32) * (0.85 + 0.2 * yy[..., None])
        return base + 4 * noise
    if kind == "water":
        waves = np.sin(2 * math.pi * (7 * yy + 0.6 * np.sin(2 * math.pi * 2 * xx + phase)))
        return np.array([40, 90, 170], np.float32) + 22 * waves[..., None] + 5 * noise
    if kind == "sand":
        return np.array([215, 190, 140], np.float32) + 14 * noise
    if kind == "road":
        lane = (np.abs(yy - 0.5 - 0.1 * math.sin(phase)) < 0.02).astype(np.float32)
        return np.array([95, 95, 100], np.float32) + 120 * lane[..., None] + 8 * noise
    if kind == "grass":
        blades = np.sin(2 * math.pi * 23 * xx + 3 * np.sin(2 * math.pi * 5 * yy + phase))
        return np.array([70, 150, 60], np.float32) + 18 * blades[..., None] + 10 * noise
    if kind == "wall":
        row = np.floor(yy * 10)
        offset = (row % 2) * 0.5 / 6
        mortar = (((xx + offset) * 6) % 1 < 0.08) | ((yy * 10) % 1 < 0.1)
        brick = np.array([175, 95, 75], np.float32)
        return np.where(mortar[..., None], 200.0, brick) + 6 * noise
    raise ValueError(f"unknown texture {kind!r}")


def _polygon(shape: str, cx: float, cy: float, rx: float, ry: float, angle: float) -> list[tuple]:
    """Vertices of a body shape centred at (cx, cy) with half-extents (rx, ry), rotated by ``angle``."""
    if shape == "ellipse":
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        pts = np.stack([rx * np.cos(t), ry * np.sin(t)], 1)
    elif shape == "rectangle":
        pts = np.array([(-rx, -ry), (rx, -ry), (rx, ry), (-rx, ry)])
    elif shape == "diamond":
        pts = np.array([(0, -ry), (rx, 0), (0, ry), (-rx, 0)])
    elif shape == "trapezoid":
        pts = np.array([(-rx, -0.3 * ry), (rx, -0.3 * ry), (0.6 * rx, ry), (-0.6 * rx, ry)])
    else:
        raise ValueError(f"unknown body shape {shape!r}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = pts @ rot.T + np.array([cx, cy])
    return [tuple(p) for p in pts.tolist()]


def _part_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple]:
    """Vertices of a discriminative mark of radius ``r`` centred at (cx, cy)."""
    if shape == "disk":
        return _polygon("ellipse", cx, cy, r, r, 0.0)
    if shape == "square":
        return _polygon("rectangle", cx, cy, r, r, 0.0)
    if shape == "bar":
        return _polygon("rectangle", cx, cy, 1.6 * r, 0.55 * r, 0.0)
    raise ValueError(f"unknown part shape {shape!r}")


def _fill(size: int, polygon: list[tuple]) -> np.ndarray:
    """Rasterise a polygon into a (size, size) bool mask."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels that have a different label within ``width`` pixels (Chebyshev distance)."""
    band = np.zeros(label.shape, dtype=bool)
    padded = np.pad(label, width, mode="edge")
    h, w = label.shape
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            shifted = padded[width + dy : width + dy + h, width + dx : width + dx + w]
            band |= shifted != label
    return band


def generate_sample(index: int, seed: int, spec: SyntheticParams) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Generate one image, its ground-truth mask and its image-level labels.

    Args:
        index: Index of the sample; with ``seed`` it fully determines the sample.
        seed: Benchmark seed.
        spec: Generator settings (``params.yaml: data.synthetic``).

    Returns:
        ``(image, mask, labels)``: a (S, S, 3) uint8 RGB image, a (S, S) uint8 mask with class ids
        (0 = background, 1..C = classes, 255 = boundary band) and the sorted present class ids.
    """
    rng = np.random.default_rng([seed, index])
    size = spec.image_size
    num_classes = int(rng.integers(1, spec.max_classes_per_image + 1))
    chosen = rng.choice(len(CLASSES), size=num_classes, replace=False)
    num_objects = int(rng.integers(max(spec.min_objects, num_classes), spec.max_objects + 1))
    object_classes = list(chosen) + list(rng.choice(chosen, size=num_objects - num_classes))
    rng.shuffle(object_classes)

    context = CLASSES[chosen[0]].context
    if rng.random() >= spec.context_prob:
        context = int(rng.integers(len(TEXTURES)))
    image = _texture(TEXTURES[context], size, rng)
    background_mean = image.reshape(-1, 3).mean(0)
    label = np.zeros((size, size), dtype=np.uint8)

    for cls_index in object_classes:
        cls = CLASSES[cls_index]
        scale = rng.uniform(spec.min_scale, spec.max_scale) * size
        rx, ry = scale * rng.uniform(0.8, 1.25), scale * rng.uniform(0.8, 1.25)
        cx, cy = rng.uniform(0.15, 0.85) * size, rng.uniform(0.2, 0.85) * size
        angle = rng.uniform(-0.35, 0.35)
        visible = np.linalg.norm(BODY_PALETTE - background_mean, axis=1) > MIN_BODY_CONTRAST
        candidates = np.flatnonzero(visible) if visible.any() else np.arange(len(BODY_PALETTE))
        typical = cls.body_color in candidates and rng.random() < spec.body_color_bias
        body_color = BODY_PALETTE[cls.body_color if typical else rng.choice(candidates)] + rng.normal(0, 8, 3)
        body = _fill(size, _polygon(cls.body, cx, cy, rx, ry, angle))
        part_radius = max(2.0, 0.3 * min(rx, ry))
        part_y = cy - PART_OFFSET[cls.body] * ry
        part = _fill(size, _part_polygon(cls.part, cx, part_y, part_radius)) & body
        image[body] = body_color + rng.normal(0, 3, (int(body.sum()), 3))
        image[part] = np.array(cls.part_color, np.float32)
        label[body] = cls_index + 1

    image += rng.normal(0, spec.noise_std, image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    present = [int(k) for k in np.unique(label) if k and (label == k).sum() >= spec.min_visible_pixels]
    mask = label.copy()
    mask[~np.isin(label, [0, *present])] = IGNORE  # barely visible objects: unlabelled, so unscored
    mask[_boundary_band(label, spec.boundary_width)] = IGNORE
    return image, mask, present
