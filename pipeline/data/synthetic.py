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

The second half of the module draws **many-class scenes** for the VOC and COCO stand-ins
(:mod:`pipeline.data.standin`): up to 80 classes, each with its own body shape x surface pattern x mark (and a
colour and a preferred background), at real image sizes, with the objects as polygons (and crowds) for COCO's
annotations. The six-class benchmark does not use it.
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
PART_OFFSET = {"ellipse": 0.4, "rectangle": 0.45, "diamond": 0.3, "trapezoid": 0.05, "triangle": -0.2}

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
    elif shape == "triangle":
        pts = np.array([(0, -ry), (rx, ry), (-rx, ry)])
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


def boundary_band(label: np.ndarray, width: int) -> np.ndarray:
    """Pixels that have a different label within ``width`` pixels (Chebyshev distance).

    Args:
        label: (H, W) class map.
        width: Half-width of the band in pixels.

    Returns:
        (H, W) bool: the band.
    """
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
    mask[boundary_band(label, spec.boundary_width)] = IGNORE
    return image, mask, present


# --- Many-class scenes at real image sizes: the VOC and COCO stand-ins (pipeline.data.standin) ------------------
# The six-class benchmark above is left exactly as it was; what follows only adds classes, sizes and patterns.

LOOK_BODIES = ("ellipse", "rectangle", "diamond", "trapezoid", "triangle")
LOOK_PATTERNS = ("plain", "stripes", "checks", "dots")
LOOK_PARTS = (("disk", (230, 30, 40)), ("square", (30, 220, 230)), ("bar", (250, 210, 20)), ("disk", (250, 250, 250)))
LOOK_COLORS = (
    (120, 80, 50),
    (70, 90, 160),
    (150, 60, 70),
    (60, 130, 110),
    (160, 140, 60),
    (110, 70, 140),
    (80, 80, 80),
    (170, 110, 60),
    (60, 110, 60),
    (140, 140, 160),
)
MAX_LOOKS = len(LOOK_BODIES) * len(LOOK_PATTERNS) * len(LOOK_PARTS)  # 80: COCO's class count


@dataclass(frozen=True)
class Look:
    """The appearance of one class of a many-class scene.

    Attributes:
        body: Body shape (one of :data:`LOOK_BODIES`).
        pattern: Surface pattern of the body (one of :data:`LOOK_PATTERNS`).
        part: Shape of the discriminative mark (``disk``, ``square`` or ``bar``).
        part_color: RGB colour of the mark.
        body_color: RGB colour of the body.
        context: Index into ``TEXTURES`` of the background the class usually sits on.
    """

    body: str
    pattern: str
    part: str
    part_color: tuple[int, int, int]
    body_color: tuple[int, int, int]
    context: int


def class_looks(num_classes: int) -> list[Look]:
    """Distinct looks for ``num_classes`` classes: no two share body, pattern and mark.

    Class k < 20 has its own (body, pattern) pair, so 20 classes (VOC) differ in shape and surface alone; the
    mark tells the four classes apart that share a pair when there are up to 80 (COCO). Colours and preferred
    backgrounds vary too, but are not needed to tell classes apart.

    Args:
        num_classes: C, at most :data:`MAX_LOOKS` (80).

    Returns:
        C looks; class label k + 1 has look k.

    Raises:
        ValueError: If C is not in 1..80.
    """
    if not 0 < num_classes <= MAX_LOOKS:
        raise ValueError(f"num_classes must be in 1..{MAX_LOOKS}, got {num_classes}")
    pairs = len(LOOK_BODIES) * len(LOOK_PATTERNS)
    looks = []
    for k in range(num_classes):
        pair, group = k % pairs, k // pairs
        part, part_color = LOOK_PARTS[(pair + group) % len(LOOK_PARTS)]
        looks.append(
            Look(
                body=LOOK_BODIES[pair % len(LOOK_BODIES)],
                pattern=LOOK_PATTERNS[pair // len(LOOK_BODIES)],
                part=part,
                part_color=part_color,
                body_color=LOOK_COLORS[(3 * k + group) % len(LOOK_COLORS)],
                context=k % len(TEXTURES),
            )
        )
    return looks


@dataclass(frozen=True)
class SceneSpec:
    """How many-class scenes are drawn.

    Attributes:
        sizes: ``(width, height, weight)`` of the image sizes to draw from (weights sum to 1).
        max_classes: Most distinct classes in one image.
        max_objects: Most objects in one image (at least one per class).
        min_scale: Smallest object half-extent, as a fraction of the image's shorter side.
        max_scale: Largest object half-extent, as that fraction.
        crowd_prob: How often an image also holds a crowd: a cluster of small objects of one class.
        context_prob: How often the first class sits on its preferred background.
        noise_std: Pixel noise.
    """

    sizes: tuple[tuple[int, int, float], ...]
    max_classes: int
    max_objects: int
    min_scale: float = 0.1
    max_scale: float = 0.3
    crowd_prob: float = 0.0
    context_prob: float = 0.4
    noise_std: float = 5.0


@dataclass(frozen=True)
class SceneObject:
    """One annotated object of a scene.

    Attributes:
        label: Class label, 1..C.
        polygons: Outlines in pixel coordinates ``[(x, y), ...]``: one for an object, one per member of a crowd.
        area: The outlines' total area in pixels (shoelace formula).
        crowd: Whether this is a crowd (COCO's ``iscrowd: 1``).
    """

    label: int
    polygons: list[list[tuple[float, float]]]
    area: float
    crowd: bool = False


def polygon_area(polygon: list[tuple[float, float]]) -> float:
    """Area of a simple polygon in square pixels (shoelace formula)."""
    xs, ys = np.asarray(polygon, np.float64).T
    return float(abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))) / 2)


def fill_polygons(width: int, height: int, polygons: list[list[tuple[float, float]]]) -> np.ndarray:
    """Rasterise the union of polygons into a (height, width) bool mask."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        draw.polygon(polygon, fill=1)
    return np.asarray(canvas, dtype=bool)


def _pattern(kind: str, width: int, height: int, period: float) -> np.ndarray:
    """A (height, width) float32 0/1 surface pattern with the given period in pixels."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "plain":
        return np.zeros((height, width), np.float32)
    if kind == "stripes":
        return (np.floor((xx + yy) / period) % 2).astype(np.float32)
    if kind == "checks":
        return ((np.floor(xx / period) + np.floor(yy / period)) % 2).astype(np.float32)
    if kind == "dots":
        dx, dy = xx % period - period / 2, yy % period - period / 2
        return (dx**2 + dy**2 < (period / 3.5) ** 2).astype(np.float32)
    raise ValueError(f"unknown pattern {kind!r}")


def _inside(polygon: list[tuple], width: int, height: int) -> list[tuple[float, float]]:
    """The polygon moved (and, if larger than the image, clipped) so that it lies inside the image."""
    pts = np.asarray(polygon, np.float64)
    low, high = pts.min(0), pts.max(0)
    size = np.array([width, height], np.float64)
    shift = np.maximum(0.0, -low) - np.maximum(0.0, high - size)
    pts = np.clip(pts + shift, 0.0, size)
    return [(round(float(x), 2), round(float(y), 2)) for x, y in pts]


def _scene_size(spec: SceneSpec, rng: np.random.Generator) -> tuple[int, int]:
    """Draw an image size ``(width, height)`` from ``spec.sizes``."""
    weights = np.array([w for _, _, w in spec.sizes], np.float64)
    width, height, _ = spec.sizes[int(rng.choice(len(spec.sizes), p=weights / weights.sum()))]
    return width, height


def _outline(look: Look, half: float, width: int, height: int, rng: np.random.Generator) -> tuple[list, tuple]:
    """A random body outline of ``look`` with half-extent about ``half``; returns it and its mark's (x, y, r)."""
    rx, ry = half * rng.uniform(0.8, 1.25), half * rng.uniform(0.8, 1.25)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.15, 0.9) * height
    rotated = _polygon(look.body, cx, cy, rx, ry, rng.uniform(-0.35, 0.35))
    polygon = _inside(rotated, width, height)
    shift = np.mean(polygon, 0) - np.mean(rotated, 0)  # how far it was moved to lie inside the image
    part_x, part_y = cx + shift[0], cy + shift[1] - PART_OFFSET[look.body] * ry
    return polygon, (part_x, part_y, max(3.0, 0.3 * min(rx, ry)))


def _paint(
    image: np.ndarray, label: np.ndarray, look: Look, value: int, polygon: list, part: tuple, rng: np.random.Generator
) -> None:
    """Paint one body (patterned, in its class colour) and its mark into ``image``; write ``value`` into ``label``."""
    height, width = label.shape
    body = fill_polygons(width, height, [polygon])
    if not body.any():
        return
    period = max(5.0, part[2] * 0.9)
    shade = _pattern(look.pattern, width, height, period)[body][:, None]  # (N, 1)
    color = np.asarray(look.body_color, np.float32) + rng.normal(0, 8, 3)
    image[body] = color * (1.0 - 0.45 * shade) + 0.45 * shade * 230.0 + rng.normal(0, 3, (int(body.sum()), 3))
    mark = fill_polygons(width, height, [_part_polygon(look.part, *part)]) & body
    image[mark] = np.asarray(look.part_color, np.float32)
    label[body] = value


def _crowd(image: np.ndarray, label: np.ndarray, look: Look, cls: int, rng: np.random.Generator) -> SceneObject:
    """Paint a crowd: 4 to 8 small objects of class ``cls`` around one point; return it as one crowd object."""
    height, width = label.shape
    short = min(width, height)
    cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.3, 0.8) * height
    polygons = []
    for _ in range(int(rng.integers(4, 9))):
        half = rng.uniform(0.03, 0.05) * short
        x, y = cx + rng.normal(0, 0.08) * short, cy + rng.normal(0, 0.05) * short
        polygon = _inside(_polygon(look.body, x, y, half, half, 0.0), width, height)
        _paint(image, label, look, cls + 1, polygon, (x, y - PART_OFFSET[look.body] * half, 2.0), rng)
        polygons.append(polygon)
    return SceneObject(cls + 1, polygons, sum(polygon_area(p) for p in polygons), crowd=True)


def generate_scene(
    index: int, seed: int, looks: list[Look], spec: SceneSpec
) -> tuple[np.ndarray, np.ndarray, list[SceneObject]]:
    """Generate one many-class scene at a real image size, with its class map and annotated objects.

    Objects are painted largest first, so a smaller object lies on a larger one, as COCO's reader assumes when it
    turns instances into a semantic mask; a crowd (if any) lies under all of them.

    Args:
        index: Index of the image; with ``seed`` it fully determines the scene.
        seed: Seed of the dataset.
        looks: The classes' looks (:func:`class_looks`).
        spec: Sizes and object counts.

    Returns:
        ``(image, label, objects)``: (H, W, 3) uint8 RGB, (H, W) uint8 class map (0 = background, 1..C, no
        boundary band) and the objects in painting order.
    """
    rng = np.random.default_rng([seed, index, len(looks)])
    width, height = _scene_size(spec, rng)
    num_classes = int(rng.integers(1, min(spec.max_classes, len(looks)) + 1))
    chosen = [int(c) for c in rng.choice(len(looks), size=num_classes, replace=False)]
    num_objects = int(rng.integers(num_classes, max(num_classes, spec.max_objects) + 1))
    classes = chosen + [int(c) for c in rng.choice(chosen, size=num_objects - num_classes)]
    context = looks[chosen[0]].context if rng.random() < spec.context_prob else int(rng.integers(len(TEXTURES)))
    image = np.ascontiguousarray(_texture(TEXTURES[context], max(width, height), rng)[:height, :width])
    label = np.zeros((height, width), np.uint8)
    objects = [_crowd(image, label, looks[chosen[0]], chosen[0], rng)] if rng.random() < spec.crowd_prob else []
    short = min(width, height)
    bodies = []
    for cls in classes:
        polygon, part = _outline(looks[cls], rng.uniform(spec.min_scale, spec.max_scale) * short, width, height, rng)
        bodies.append((polygon_area(polygon), cls, polygon, part))
    for area, cls, polygon, part in sorted(bodies, key=lambda body: -body[0]):  # stable: ties keep drawing order
        _paint(image, label, looks[cls], cls + 1, polygon, part, rng)
        objects.append(SceneObject(cls + 1, [polygon], area))
    image += rng.normal(0, spec.noise_std, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label, objects
