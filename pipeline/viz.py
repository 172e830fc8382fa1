"""Pictures for people: heat maps, label overlays, and galleries of titled panels with a class legend."""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Panel:
    """One tile of a gallery: a titled (H, W, 3) uint8 picture.

    A label map keeps its (H, W) class ids in ``label``: it is then scaled by nearest neighbour, so every pixel
    keeps a palette colour, and its classes go into the gallery's legend.
    """

    title: str
    pixels: np.ndarray
    label: np.ndarray | None = None


@dataclass(frozen=True)
class Row:
    """One image of a gallery: a caption (e.g. its id and IoU) over its panels, left to right."""

    caption: str
    panels: list[Panel]


def label_panel(title: str, label: np.ndarray, palette: list[list[int]]) -> Panel:
    """A (H, W) class-id map drawn in palette colours (255 white), upscaled by nearest neighbour."""
    return Panel(title, colorize(label, palette), label)


def cam_gallery_row(
    caption: str, image: np.ndarray, maps: dict[str, np.ndarray], keys: np.ndarray, gt: np.ndarray, names: list[str],
    palette: list[list[int]],
) -> Row:  # fmt: skip
    """A CAM gallery row: image | one CAM panel per present class | one R-CAM panel per class | ground truth.

    Args:
        caption: Shown above the row (image id, IoU).
        image: (H, W, 3) uint8 image.
        maps: ``cam`` and optionally ``rcam`` / ``aream``, each (N, H, W): channel 0 background, then the classes
            ``keys[1:]``.
        keys: (N,) class ids of the channels, ``keys[0] == 0``.
        gt: (H, W) ground truth.
        names: Class names, background first.
        palette: Colour per class id.
    """
    panels = [Panel("image", image)]
    for name, title in (("cam", "CAM"), ("rcam", "R-CAM"), ("aream", "AReAM")):
        if name in maps:
            for channel, class_id in enumerate(keys[1:], start=1):
                score = maps[name][channel].astype(np.float32)
                panels.append(Panel(f"{title}: {names[class_id]}", blend(image, heatmap(score), 0.6)))
    return Row(caption, [*panels, label_panel("ground truth", gt, palette)])


def label_gallery_row(caption: str, image: np.ndarray, labels: dict[str, np.ndarray], palette: list[list[int]]) -> Row:
    """A gallery row: the image, then titled label maps (e.g. seeds | pseudo label | ground truth).

    Args:
        caption: Shown above the row.
        image: (H, W, 3) uint8 image.
        labels: Column title -> (H, W) class-id map; 255 (ignore) is drawn white.
        palette: Colour per class id.
    """
    return Row(caption, [Panel("image", image), *(label_panel(t, lab, palette) for t, lab in labels.items())])


def legend_entries(rows: list[Row], names: list[str], palette: list[list[int]]) -> list[tuple[str, tuple]]:
    """``(name, colour)`` of every class id in the rows' label panels, in id order; 255 comes last as ``ignore``."""
    labels = [np.unique(p.label) for row in rows for p in row.panels if p.label is not None]
    found = np.unique(np.concatenate(labels)) if labels else []
    entries = [(names[i], tuple(palette[i])) for i in found if i < len(names)]
    return entries + ([("ignore", (255, 255, 255))] if IGNORE in found else [])


def caption(image_id: str, what: str, iou: float) -> str:
    """A row caption: the image id and its IoU (``what`` says of which map), or that it was not scored."""
    return f"{image_id}   " + ("not scored" if np.isnan(iou) else f"{what} IoU {iou:.2f}")


class Worst:
    """The ``k`` items with the lowest score seen so far; of equal scores the earlier item is kept."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._heap: list[tuple[float, int, object]] = []  # (-score, -arrival, item): the root is the one to drop
        self._seen = 0

    def add(self, score: float, item: object, order: int | None = None) -> None:
        """Offer one item; ``order`` (default: the number offered before) ranks it among equal scores."""
        heapq.heappush(self._heap, (-score, -(self._seen if order is None else order), item))
        self._seen += 1
        if len(self._heap) > self.k:
            heapq.heappop(self._heap)

    def entries(self) -> list[tuple[float, int, object]]:
        """``(score, order, item)`` of the items kept, from the lowest score up (ties in order)."""
        return sorted(((-s, -a, item) for s, a, item in self._heap), key=lambda e: (e[0], e[1]))

    def items(self) -> list[tuple[float, object]]:
        """``(score, item)`` from the lowest score up (ties in arrival order)."""
        return [(score, item) for score, _, item in self.entries()]


def fit_tile(panel: Panel, tile: int) -> Image.Image:
    """The panel scaled (up or down) so that its longer side is ``tile`` pixels, centred on a white square."""
    h, w = panel.pixels.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.BILINEAR if panel.label is None else Image.Resampling.NEAREST
    square = Image.new("RGB", (tile, tile), "white")
    square.paste(Image.fromarray(panel.pixels).resize(size, resample), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    return square


def gallery(title: str, rows: list[Row], names: list[str], palette: list[list[int]], tile: int = 192) -> np.ndarray:
    """Lay rows of panels out as one picture: a title, column titles, captioned rows, a class legend.

    When every row has the same panel titles they are written once, as a header; otherwise (e.g. one CAM
    column per present class) each panel carries its own title. Rows with fewer panels leave the right blank.

    Args:
        title: Line at the top.
        rows: The images, one row each.
        names: Class names, background first: the legend names the classes of the label panels.
        palette: Colour per class id.
        tile: Side of a panel in pixels (panels are scaled to fit, label maps by nearest neighbour).

    Returns:
        (H, W, 3) uint8 picture, ``W = columns * (tile + 4) + 4`` with ``columns`` the longest row's panels.
    """
    font, line, gap = ImageFont.load_default(size=14), 20, 4  # scalable: Pillow >= 10.1
    titles = [[p.title for p in row.panels] for row in rows]
    shared = len(rows) > 0 and all(t == titles[0] for t in titles)
    columns = max((len(row.panels) for row in rows), default=1)
    width = columns * (tile + gap) + gap
    row_height = line + (0 if shared else line) + tile + gap
    legend_lines = _legend_layout(legend_entries(rows, names, palette), font, width)
    height = line * (2 if shared else 1) + len(rows) * row_height + line * (len(legend_lines) or 0) + gap
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((gap, 2), title, fill="black", font=font)
    y = line
    if shared:
        for col, name in enumerate(titles[0]):
            draw.text((gap + col * (tile + gap) + tile // 2, y + 2), name, fill="black", anchor="ma", font=font)
        y += line
    for row in rows:
        draw.text((gap, y + 2), row.caption, fill=(90, 90, 90), font=font)
        y += line
        if not shared:
            for col, panel in enumerate(row.panels):
                x = gap + col * (tile + gap) + tile // 2
                draw.text((x, y + 2), panel.title, fill="black", anchor="ma", font=font)
            y += line
        for col, panel in enumerate(row.panels):
            canvas.paste(fit_tile(panel, tile), (gap + col * (tile + gap), y))
        y += tile + gap
    for entries in legend_lines:
        x = gap
        for name, colour, advance in entries:
            draw.rectangle((x, y + 3, x + 13, y + 16), fill=colour, outline="black")
            draw.text((x + 18, y + 2), name, fill="black", font=font)
            x += advance
        y += line
    return np.asarray(canvas)


def _legend_layout(legend: list[tuple[str, tuple]], font, width: int) -> list[list[tuple[str, tuple, int]]]:
    """Legend swatches flowed into lines no wider than ``width``: ``[[(name, colour, advance), ...], ...]``."""
    lines: list[list[tuple[str, tuple, int]]] = []
    used = width
    for name, colour in legend:
        advance = 18 + int(font.getlength(name)) + 14
        if used + advance > width and (not lines or lines[-1]):
            lines.append([])
            used = 4
        lines[-1].append((name, colour, advance))
        used += advance
    return lines


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


class Picks:
    """What a stage draws: its first ``size`` images and the ``size`` with the lowest IoU (the failure cases).

    Items are whatever the caller needs to draw a row later; only ``2 * size`` of them are held at a time. A
    sharded stage gives each image its place in the one-process order and merges the ranks' picks
    (:meth:`merged`) into those one process would have made.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._first: list[tuple[int, float, object]] = []  # (order, iou, item)
        self.worst = Worst(size)
        self._seen = 0

    @property
    def first(self) -> list[tuple[float, object]]:
        """``(iou, item)`` of the first images, in order."""
        return [(iou, item) for _, iou, item in self._first]

    def add(self, iou: float, item: object, order: int | None = None) -> None:
        """Offer one image's IoU (NaN: not scored, never a failure case) and its drawing inputs.

        Images come in increasing ``order``: their place in the stage's image list (default: the number offered
        before).
        """
        order = self._seen if order is None else order
        self._seen += 1
        if len(self._first) < self.size:
            self._first.append((order, iou, item))
        if not np.isnan(iou):
            self.worst.add(iou, item, order)

    @classmethod
    def merged(cls, parts: list[Picks]) -> Picks:
        """The picks of a whole run from those of its shards (each offered its images with their ``order``)."""
        total = cls(parts[0].size)
        total._first = sorted((e for part in parts for e in part._first), key=lambda e: e[0])[: total.size]
        for score, order, item in (e for part in parts for e in part.worst.entries()):
            total.worst.add(score, item, order)
        return total


def pick_galleries(
    picks: Picks, draw: Callable[[float, object], Row], title: str, names: list[str], palette: list[list[int]],
    prefix: str = "",
) -> dict[str, np.ndarray]:  # fmt: skip
    """The pictures of a :class:`Picks`: ``<prefix>gallery.png`` (the first images) and ``<prefix>failures.png``.

    Args:
        picks: The chosen images.
        draw: ``(iou, item) -> Row``.
        title: What the rows show (e.g. ``"seeds and pseudo labels"``), the start of each picture's title.
        names: Class names, background first.
        palette: Colour per class id.
        prefix: Start of the file names.

    Returns:
        File name -> (H, W, 3) uint8 picture; none for a gallery without images.
    """
    chosen = {
        f"{prefix}gallery.png": (f"{title}: the first {len(picks.first)} images", picks.first),
        f"{prefix}failures.png": (f"{title}: the {len(picks.worst.items())} lowest-IoU images", picks.worst.items()),
    }
    return {
        file: gallery(heading, [draw(iou, item) for iou, item in entries], names, palette)
        for file, (heading, entries) in chosen.items()
        if entries
    }
