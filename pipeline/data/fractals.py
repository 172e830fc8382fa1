"""Formula-driven pretraining data: FractalDB-style categories of 2-D iterated function systems (IFS).

A category is one IFS: ``N`` affine maps ``(x, y) -> (a x + b y + e, c x + d y + f)`` (N in 2..7, every parameter
uniform in [-1, 1]), map ``i`` drawn with probability proportional to ``|a_i d_i - b_i c_i|``. A system is kept when
its attractor, drawn with 100k points on a 512 x 512 canvas, lights at least 20 % of the pixels (Kataoka et al.,
ACCV 2020; ``../shared/reference/formula_pretraining.md``). An instance is one of FractalDB's 25 weight variants of
its category (one parameter of every map scaled by 0.2, 0.6, 1.4 or 1.8, or none), drawn in a random colour, at a
random place and size, on a smooth random background (colour and backgrounds as in Anderson & Farrell, WACV 2022).

Points come from the chaos game run as many short chains at once (vectorised): after a burn-in every chain is on
the attractor, so 1,000 chains of 100 steps give the 100k points of one long chain without its Python loop.
The categories share nothing with the synthetic benchmark's classes (no object shapes, no class colours).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from tqdm import tqdm

WEIGHT_FACTORS = (0.2, 0.6, 1.4, 1.8)
VARIANTS = 1 + 6 * len(WEIGHT_FACTORS)
"""FractalDB's 25 instances of a category: the system itself, and each of its 6 parameters scaled by 4 factors."""
BURN_IN = 20
MAX_EXTENT = 1e6
"""Points farther than this from the origin: the system diverges (an expanding map) and is refused."""


def sample_system(rng: np.random.Generator, min_maps: int = 2, max_maps: int = 7) -> np.ndarray:
    """A random IFS: (N, 6) rows ``a, b, c, d, e, f`` uniform in [-1, 1], N uniform in ``[min_maps, max_maps]``."""
    return rng.uniform(-1.0, 1.0, size=(int(rng.integers(min_maps, max_maps + 1)), 6))


def map_probabilities(system: np.ndarray) -> np.ndarray:
    """(N,) probabilities of the maps, proportional to ``|a d - b c|`` (uniform if every map is singular)."""
    det = np.abs(system[:, 0] * system[:, 3] - system[:, 1] * system[:, 2])
    return det / det.sum() if det.sum() > 0 else np.full(len(system), 1.0 / len(system))


def chaos_points(system: np.ndarray, count: int, rng: np.random.Generator, chains: int = 1000) -> np.ndarray:
    """``count`` points of the system's attractor by the chaos game, ``chains`` chains at once.

    Args:
        system: (N, 6) maps.
        count: Points to return.
        rng: Random generator (start points and map choices).
        chains: Chains run side by side; each drops its first :data:`BURN_IN` points.

    Returns:
        (count, 2) points, ``x, y``; non-finite or huge values when the system diverges.
    """
    chains = min(chains, count)
    steps = -(-count // chains)
    probs = map_probabilities(system)
    xy = rng.uniform(-1.0, 1.0, size=(chains, 2))  # (K, 2)
    out = np.empty((steps, chains, 2))
    with np.errstate(over="ignore", invalid="ignore"):
        for step in range(BURN_IN + steps):
            m = system[rng.choice(len(system), size=chains, p=probs)]  # (K, 6)
            x, y = xy[:, 0], xy[:, 1]
            xy = np.stack([m[:, 0] * x + m[:, 1] * y + m[:, 4], m[:, 2] * x + m[:, 3] * y + m[:, 5]], 1)
            if step >= BURN_IN:
                out[step - BURN_IN] = xy
    return out.reshape(-1, 2)[:count]


def to_pixels(points: np.ndarray, size: int, box: tuple[float, float, float] | None = None) -> np.ndarray | None:
    """Integer pixel coordinates of ``points`` fitted into a square canvas of ``size`` (aspect kept).

    Args:
        points: (P, 2) points.
        size: Canvas side.
        box: ``(side, left, top)`` of the square the points are fitted into, as fractions of the canvas; the
            whole canvas if None.

    Returns:
        (P, 2) ``x, y`` pixel indices, or None if the points are not finite or diverge.
    """
    if not np.isfinite(points).all() or np.abs(points).max() > MAX_EXTENT:
        return None
    low, high = points.min(0), points.max(0)
    span = max(float((high - low).max()), 1e-12)
    side, left, top = box or (1.0, 0.0, 0.0)
    scaled = (points - low) / span  # (P, 2) in [0, 1], longest side 1
    scaled += (1.0 - (high - low) / span) / 2  # centre the shorter side
    pixels = np.floor((scaled * side + (left, top)) * size).astype(np.int64)
    return np.clip(pixels, 0, size - 1)


def fill_ratio(points: np.ndarray, size: int = 512) -> float:
    """The fraction of a ``size`` x ``size`` canvas that ``points`` light (0 if they diverge)."""
    pixels = to_pixels(points, size)
    if pixels is None:
        return 0.0
    return len(np.unique(pixels[:, 1] * size + pixels[:, 0])) / size**2


def search_categories(
    count: int,
    rng: np.random.Generator,
    min_fill: float = 0.2,
    points: int = 100_000,
    canvas: int = 512,
    progress: bool = True,
) -> list[np.ndarray]:
    """Random systems kept by the fill rule (FractalDB's category search), until ``count`` are kept.

    Args:
        count: Categories to find.
        rng: Random generator.
        min_fill: The least fraction of the canvas a kept system lights.
        points: Points drawn per candidate.
        canvas: Canvas side of the fill rule.
        progress: Show a progress bar.

    Returns:
        ``count`` (N_i, 6) systems.
    """
    kept: list[np.ndarray] = []
    with tqdm(total=count, desc="fractal categories", unit="cat", disable=None if progress else True) as bar:
        while len(kept) < count:
            system = sample_system(rng)
            if to_pixels(chaos_points(system, 2_000, rng), canvas) is None:
                continue  # diverges: refused before drawing all the points
            if fill_ratio(chaos_points(system, points, rng), canvas) >= min_fill:
                kept.append(system)
                bar.update(1)
    return kept


def weight_variant(system: np.ndarray, variant: int) -> np.ndarray:
    """FractalDB's instance ``variant`` (0..24) of a category.

    Variant 0 is the system itself; ``1 + 4 k + j`` scales parameter ``k`` of every map by ``WEIGHT_FACTORS[j]``.
    """
    if variant == 0:
        return system
    param, factor = divmod(variant - 1, len(WEIGHT_FACTORS))
    out = system.copy()
    out[:, param] *= WEIGHT_FACTORS[factor]
    return out


def smooth_background(size: int, rng: np.random.Generator, cells: int = 4) -> np.ndarray:
    """(size, size, 3) float background: a random ``cells`` x ``cells`` colour field, bicubically upsampled."""
    low = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.float32)


def render(system: np.ndarray, size: int, points: int, rng: np.random.Generator) -> np.ndarray:
    """One image of ``system``: its attractor in one random colour at a random place and scale on a smooth background.

    A pixel's opacity grows with the points it receives (one point: 0.5, two or more: 1), so dense parts of the
    attractor read as solid and sparse parts as texture.

    Args:
        system: (N, 6) maps.
        size: Image side.
        points: Points drawn.
        rng: Random generator.

    Returns:
        (size, size, 3) uint8 image; the background alone if the system diverges.
    """
    image = smooth_background(size, rng)
    side = rng.uniform(0.5, 0.95)
    left, top = rng.uniform(0, 1 - side, size=2)
    pixels = to_pixels(chaos_points(system, points, rng), size, (side, left, top))
    if pixels is not None:
        hits = np.bincount(pixels[:, 1] * size + pixels[:, 0], minlength=size * size).reshape(size, size)
        alpha = np.minimum(hits, 2)[..., None] / 2.0  # (S, S, 1)
        colour = rng.uniform(0, 255, size=3)
        while np.abs(colour - image.mean((0, 1))).sum() < 150:  # stand out from the background
            colour = rng.uniform(0, 255, size=3)
        image = image * (1 - alpha) + colour * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_instances(
    systems: list[np.ndarray], instances: int, size: int, points: int, seed: int, first: int = 0, desc: str = ""
) -> np.ndarray:
    """Images of every category: instance ``first + i`` of category ``c`` is weight variant ``(first + i) % 25``.

    Each image has its own generator, seeded by ``(seed, c, first + i)``: the train and held-out sets (other
    ``first``) never share a draw.

    Returns:
        (len(systems) * instances, size, size, 3) uint8, category-major.
    """
    out = np.empty((len(systems) * instances, size, size, 3), dtype=np.uint8)
    bar = tqdm(total=len(out), desc=desc or "fractal images", unit="img", disable=None, mininterval=2)
    for c, system in enumerate(systems):
        for i in range(first, first + instances):
            rng = np.random.default_rng([seed, c, i])
            out[c * instances + i - first] = render(weight_variant(system, i % VARIANTS), size, points, rng)
            bar.update(1)
    bar.close()
    return out
