"""``wsss predict``: segment new images with the trained model (no DVC, no params file needed).

For every input image ``<name>.<ext>`` it writes ``<out>/<name>.png`` (palette PNG of class ids) and
``<out>/<name>_overlay.jpg`` (the prediction blended into the image). Images found by recursing into a folder
keep their sub-folder under ``<out>``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import runtime
from pipeline.data.datasets import normalize
from pipeline.data.layout import read_rgb
from pipeline.errors import DatasetError, one_line
from pipeline.io import atomic_path, save_label_png
from pipeline.models.deeplab import load_segmenter, predict_probs
from pipeline.viz import overlay

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


@dataclass
class PredictReport:
    """What a prediction run did: written label files, one message per input that failed or was too large."""

    written: list[Path] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def find_images(inputs: list[Path]) -> Iterator[tuple[Path, Path]]:
    """Expand files and folders (recursively, common image extensions) into (image path, output stem) pairs.

    The output stem is the file name without extension, prefixed by its sub-folder for images found in a folder.
    A path that does not exist is yielded as is, so that reading it reports the error.
    """
    for path in inputs:
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
                yield child, child.relative_to(path).with_suffix("")
        else:
            yield path, Path(path.stem)


def _unique(stem: Path, taken: set[Path]) -> Path:
    """``stem``, or ``stem_1``, ``stem_2``, ... if an earlier input already wrote that name."""
    candidate, n = stem, 0
    while candidate in taken:
        n += 1
        candidate = stem.with_name(f"{stem.name}_{n}")
    taken.add(candidate)
    return candidate


def image_size(path: Path) -> tuple[int, int] | None:
    """``(width, height)`` from the file's header, whatever its size; ``None`` if it cannot be opened."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # only the header is read here: no decompression-bomb check needed
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError):
        return None  # missing or unreadable: reading it reports the error
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Set PIL's decompression-bomb limit to ``max_pixels`` inside the block (PIL raises above twice that)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def read_limited(path: Path, max_pixels: int) -> np.ndarray | str:
    """Read an image as (H, W, 3) uint8 RGB, or return why it is skipped (more than ``max_pixels`` pixels).

    Raises:
        DatasetError: If the file is missing or not a readable image.
    """
    size = image_size(path)
    if size is not None and size[0] * size[1] > max_pixels:
        return (
            f"{path}: {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} Mpx) is above --max-pixels {max_pixels}; "
            "skipped (raise --max-pixels to predict it)"
        )
    try:
        with pixel_limit(max_pixels):
            return read_rgb(path)
    except Image.DecompressionBombError as exc:  # a size only known while decoding
        return f"{path}: {one_line(exc)}; skipped (raise --max-pixels to predict it)"


def predict_images(
    inputs: list[Path],
    out_dir: Path,
    model_dir: Path,
    scales: tuple[float, ...] = (1.0,),
    flip: bool = False,
    device_name: str = "auto",
    threads: int = 0,
    on_error: Callable[[str], None] = log.error,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[str], None] = log.warning,
) -> PredictReport:
    """Segment images and write palette PNGs and overlays.

    Unreadable inputs and images of more than ``max_pixels`` pixels are reported (one line each, naming the file)
    and skipped; the others are written. High-bit-depth images are rescaled by their range (:func:`read_rgb`).

    Args:
        inputs: Image files and/or folders.
        out_dir: Output folder.
        model_dir: Model written by ``train_seg``.
        scales: Inference scales (probabilities averaged).
        flip: Also average horizontally flipped passes.
        device_name: ``auto``, ``cpu`` or ``cuda``.
        threads: Torch intra-op threads (0 = default).
        on_error: Called with the one-line message of each failed input, as it happens.
        max_pixels: Images with more pixels (width x height) are skipped, not read.
        on_skip: Called with the one-line message of each skipped image, as it happens.

    Returns:
        The written label files and the failures.

    Raises:
        SegModelError: If the model is missing or broken.
    """
    device = runtime.resolve_device(device_name)
    runtime.set_threads(threads)
    model, meta = load_segmenter(model_dir, device)
    mean, std, palette = tuple(meta["mean"]), tuple(meta["std"]), meta["palette"]
    report, taken = PredictReport(), set()
    found = list(find_images(inputs))
    if not found:
        report.failures.append(f"no images found in {', '.join(map(str, inputs))} (extensions: {IMAGE_EXTENSIONS})")
        on_error(report.failures[-1])
    for path, stem in tqdm(found, desc="predict", unit="img", disable=None, mininterval=2):
        try:
            image = read_limited(path, max_pixels)
        except DatasetError as exc:
            report.failures.append(str(exc))
            on_error(str(exc))
            continue
        if isinstance(image, str):
            report.skipped.append(image)
            on_skip(image)
            continue
        x = normalize(image, mean, std)[None].to(device)  # (1, 3, H, W)
        label = predict_probs(model, x, scales, flip).argmax(1)[0].cpu().numpy().astype(np.uint8)  # (H, W)
        stem = _unique(stem, taken)
        target = out_dir / stem.with_name(f"{stem.name}.png")
        save_label_png(target, label, palette)
        with atomic_path(out_dir / stem.with_name(f"{stem.name}_overlay.jpg")) as tmp:
            Image.fromarray(overlay(image, label, palette)).save(tmp, format="JPEG", quality=90)
        report.written.append(target)
    return report
