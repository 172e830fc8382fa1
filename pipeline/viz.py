"""Pictures for people: heat maps, label overlays and gallery rows."""

from __future__ import annotations

import numpy as np

from pipeline.io import IGNORE


def heatmap(score: np.ndarray) -> np.ndarray:
    """Map (H, W) scores in [0, 1] to a (H, W, 3) uint8 blue-to-red colour ramp."""
    s = np.clip(score.astype(np.float32), 0, 1)[..., None]
    ramp = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 128], [255, 255, 0], [255, 64, 0]], np.float32)
    position = s * (len(ramp) - 1)
    low = np.floor(position).astype(int).clip(0, len(ramp) - 2)
    frac = position - low
    return (ramp[low[..., 0]] * (1 - frac) + ramp[low[..., 0] + 1] * frac).astype(np.uint8)


def blend(image: np.ndarray, overlay: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Alpha-blend two (H, W, 3) uint8 images."""
    return (image.astype(np.float32) * (1 - alpha) + overlay.astype(np.float32) * alpha).astype(np.uint8)


def colorize(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    """(H, W) class ids -> (H, W, 3) colours; 255 (ignore) is drawn white."""
    table = np.zeros((256, 3), np.uint8)
    table[: len(palette)] = np.asarray(palette, np.uint8)
    table[IGNORE] = 255
    return table[label]


def cam_gallery_row(
    image: np.ndarray, maps: dict[str, np.ndarray], keys: np.ndarray, gt: np.ndarray, palette: list[list[int]]
) -> np.ndarray:
    """One gallery row: image | CAM | R-CAM (if any) | ground truth, side by side.

    Each map panel blends the image with a heat map of the strongest foreground class and outlines nothing;
    the ground-truth panel shows the palette colours.

    Args:
        image: (H, W, 3) uint8 image.
        maps: ``cam`` and optionally ``rcam``, each (N, H, W) with background first.
        keys: (N,) class ids of the channels.
        gt: (H, W) ground truth.
        palette: Colour per class id.
    """
    panels = [image]
    for name in ("cam", "rcam"):
        if name in maps:
            fg = maps[name][1:].astype(np.float32)
            score = fg.max(0) if len(fg) else np.zeros(image.shape[:2], np.float32)
            panels.append(blend(image, heatmap(score), 0.6))
    panels.append(colorize(gt, palette))
    return np.concatenate(panels, axis=1)


def label_gallery_row(image: np.ndarray, labels: list[np.ndarray], palette: list[list[int]]) -> np.ndarray:
    """One gallery row: the image followed by label maps (e.g. seed | pseudo label | ground truth), side by side.

    Args:
        image: (H, W, 3) uint8 image.
        labels: (H, W) class-id maps; 255 (ignore) is drawn white.
        palette: Colour per class id.
    """
    return np.concatenate([image, *(colorize(label, palette) for label in labels)], axis=1)
