"""Pictures for people: heat maps, label overlays and gallery rows."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.data.layout import IGNORE


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
    image: np.ndarray, maps: dict[str, np.ndarray], gt: np.ndarray, palette: list[list[int]]
) -> np.ndarray:
    """One gallery row: image | CAM | R-CAM (if any) | ground truth, side by side.

    Each map panel blends the image with a heat map of the strongest foreground class and outlines nothing;
    the ground-truth panel shows the palette colours.

    Args:
        image: (H, W, 3) uint8 image.
        maps: ``cam`` and optionally ``rcam``, each (N, H, W) with background first.
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


def overlay(image: np.ndarray, label: np.ndarray, palette: list[list[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend a (H, W) label map's colours into a (H, W, 3) uint8 image; background (0) and 255 stay unblended."""
    coloured = blend(image, colorize(label, palette), alpha)
    keep = (label == 0) | (label == IGNORE)
    return np.where(keep[..., None], image, coloured)


def confusion_image(confusion: np.ndarray, names: list[str], cell: int = 40) -> np.ndarray:
    """Draw a row-normalised confusion matrix (rows = ground truth, columns = prediction) as an RGB image.

    Args:
        confusion: (K, K) counts.
        names: K class names.
        cell: Side of one cell in pixels.

    Returns:
        (H, W, 3) uint8 picture with class names, cell percentages and a blue-to-red colour scale.
    """
    rows = confusion.sum(1, keepdims=True)
    share = np.divide(confusion, np.maximum(rows, 1), dtype=np.float64)  # (K, K), each row sums to 1
    font = ImageFont.load_default()
    k = len(names)
    margin = 8 + max(int(font.getlength(name)) for name in names)
    grid = np.kron(heatmap(share), np.ones((cell, cell, 1), np.uint8))  # (K*cell, K*cell, 3)
    canvas = Image.new("RGB", (margin + k * cell + 8, margin + k * cell + 24), "white")
    canvas.paste(Image.fromarray(grid), (margin, margin))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((4, margin + i * cell + cell // 2), name, fill="black", anchor="lm", font=font)
        column = Image.new("RGB", (margin, cell), "white")
        ImageDraw.Draw(column).text((margin - 4, cell // 2), name, fill="black", anchor="rm", font=font)
        canvas.paste(column.rotate(90, expand=True), (margin + i * cell, 0))
        for j in range(k):
            text = f"{100 * share[i, j]:.0f}"
            colour = "white" if share[i, j] < 0.3 or share[i, j] > 0.85 else "black"
            center = (margin + j * cell + cell // 2, margin + i * cell + cell // 2)
            draw.text(center, text, fill=colour, anchor="mm", font=font)
    draw.text((margin, margin + k * cell + 6), "rows: ground truth, columns: prediction, % of row", fill="black")
    return np.asarray(canvas)
