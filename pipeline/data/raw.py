"""Checks shared by the readers of raw datasets (VOC, COCO): layouts, image lists, image headers, masks.

Every problem is a :class:`~pipeline.data.layout.DatasetError` with a one-line message that names the file
(and the line of a list), so a broken download or a hand-made copy is diagnosed without a traceback.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.data.layout import IGNORE, open_image
from pipeline.errors import DatasetError
from pipeline.parallel import map_ordered, resolve_workers

PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
MAX_WORKERS = 8  # conversion is CPU-bound per image; more processes mostly add memory


def require(base: Path, entries: list[str], what: str, hint: str) -> None:
    """Check that files or folders exist under ``base``; name every missing one in a single error.

    Args:
        base: The folder the entries are relative to.
        entries: Relative paths; a trailing ``/`` marks a folder.
        what: The dataset, for the message (e.g. ``"VOC 2012"``).
        hint: What the user can do about it (appended to the message).

    Raises:
        DatasetError: If any entry is missing.
    """
    missing = [e for e in entries if not ((base / e).is_dir() if e.endswith("/") else (base / e).is_file())]
    if missing:
        raise DatasetError(f"{what} data incomplete: missing {', '.join(missing)} in {base} ({hint})")


def plain_name(name: str, where: str, base: Path) -> str:
    """Check that a name from a list or an annotation file is a plain file name inside ``base``.

    Args:
        name: The image id or file name.
        where: Where it was read (file and line), for the message.
        base: The folder it must stay in.

    Returns:
        The name.

    Raises:
        DatasetError: If it has path separators, ``..``, or other characters that could leave ``base``.
    """
    if not PLAIN_NAME.fullmatch(name) or ".." in name:
        raise DatasetError(f"{where}: entry {name!r} is not a plain file name (it would escape {base})")
    return name


def read_id_list(path: Path, base: Path) -> list[str]:
    """Read an image-id list (one id per line, blank lines skipped) and check every entry.

    Args:
        path: The list file.
        base: The folder the ids refer to (for the escape check's message).

    Returns:
        The ids in file order.

    Raises:
        DatasetError: If the file is missing, an entry escapes ``base``, or an id is listed twice.
    """
    if not path.is_file():
        raise DatasetError(f"image list {path} not found")
    ids: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        entry = line.strip()
        if entry:
            ids.append(plain_name(entry, f"{path} line {number}", base))
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise DatasetError(f"{path}: image id {duplicate!r} is listed twice")
    return ids


def image_size(path: Path) -> tuple[int, int]:
    """Read an image's (width, height) from its header (cheap: the pixels are not decoded).

    Raises:
        DatasetError: If the file is missing or not a readable image.
    """
    with open_image(path) as image:
        return image.size


def read_mask(path: Path, num_classes: int) -> np.ndarray:
    """Read a raw class-index mask (palette or greyscale PNG) and check its values.

    Args:
        path: The PNG.
        num_classes: K, labels including background; allowed values are ``0..K-1`` and 255.

    Returns:
        (H, W) uint8 class ids.

    Raises:
        DatasetError: If the file is missing, unreadable, not an index image, or has unknown values.
    """
    with open_image(path, "mask") as image:
        if image.mode not in ("P", "L"):
            raise DatasetError(f"mask {path} is a {image.mode} image; expected class indices (palette or L)")
        mask = np.asarray(image, dtype=np.uint8).copy()
    values = np.unique(mask)
    unknown = values[(values >= num_classes) & (values != IGNORE)]
    if unknown.size:
        raise DatasetError(
            f"mask {path} has unknown class values {unknown.tolist()} (allowed: 0..{num_classes - 1} and {IGNORE})"
        )
    return mask


def check_same_size(image: Path, mask: Path, image_wh: tuple[int, int], mask_hw: tuple[int, ...]) -> None:
    """Check that an image and its mask have the same size.

    Raises:
        DatasetError: If they differ.
    """
    if (image_wh[1], image_wh[0]) != tuple(mask_hw):
        raise DatasetError(
            f"mask {mask} is {mask_hw[1]}x{mask_hw[0]} but image {image} is {image_wh[0]}x{image_wh[1]} (WxH)"
        )


def reference(folder: Path, out: Path) -> str:
    """How the prepared directory ``out`` refers to a raw folder: relative if ``folder`` was given relative.

    A relative path keeps a project movable; an absolute ``data.root`` stays absolute.
    """
    if folder.is_absolute():
        return str(folder)
    return os.path.relpath(folder.absolute(), out.absolute())


def default_workers() -> int:
    """Worker processes for converting a dataset: the usable CPUs, at most :data:`MAX_WORKERS`."""
    return min(MAX_WORKERS, resolve_workers(0))


def process_map(function: Callable[[Any], Any], items: Sequence, desc: str, workers: int | None = None) -> list:
    """``[function(item) for item in items]`` in worker processes (:func:`~pipeline.parallel.map_ordered`), with a bar.

    ``function`` and the items must be picklable (a module-level function, or a ``functools.partial`` of one).
    Small inputs run in this process. An exception raised for an item (e.g. a ``DatasetError``) is re-raised here.

    Args:
        function: The per-item work.
        items: The inputs.
        desc: Progress-bar label.
        workers: Process count (default :func:`default_workers`).

    Returns:
        The results in the order of ``items``.
    """
    workers = default_workers() if workers is None else workers
    if len(items) < 4 * workers:
        workers = 1
    results = map_ordered(function, items, workers)
    return list(tqdm(results, total=len(items), desc=desc, unit="img", disable=None, mininterval=2))
