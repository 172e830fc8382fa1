"""The prepared dataset layout written by ``prepare`` and read by every later stage.

```
data/prepared/
  classes.json        {"dataset", "names": [background, ...], "palette": [[r, g, b], ...], "image_ext",
                       "image_root" (optional, default "images")}
  cls_labels.json     {image_id: [class ids present, 1..C]}
  splits/<split>.txt  one image id per line (train, train_aug, val)
  images/<id><ext>    RGB images (synthetic data; real datasets reference their raw images, see below)
  image_files.json    optional {image_id: path relative to image_root}, for images spread over folders
  masks/<id>.png      palette PNG ground truth (0 = background, 255 = ignore); used by metrics only
```

Real datasets are large (VOC 2 GB, COCO 20 GB), so their images are *referenced*, not copied:
``image_root`` is the raw image folder, relative to the prepared directory (or absolute), and an image is
``image_root/<id><image_ext>``, or ``image_root/image_files[id]`` when ``image_files.json`` exists (COCO keeps
train and val images in two folders). Masks are always written into the prepared directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.errors import DatasetError, UserError, one_line
from pipeline.io import atomic_path, load_label_png, write_json

log = logging.getLogger(__name__)

SPLITS = ("train", "train_aug", "val")
IGNORE = 255  # label value of pixels that are not scored (boundary bands, unlabelled objects)


# VOC's colour map for label ids 0..N; 255 (ignore) is drawn white-ish like VOC's void colour.
def voc_palette(num: int = 256) -> list[tuple[int, int, int]]:
    """Return the PASCAL VOC colour map (bit-interleaved) for ``num`` label ids.

    Args:
        num: Number of colours.

    Returns:
        A list of ``num`` RGB tuples; id 0 is black, 255 is VOC's void colour (224, 224, 192).
    """
    palette = []
    for label in range(num):
        r = g = b = 0
        value = label
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        palette.append((r, g, b))
    if num > IGNORE:
        palette[IGNORE] = (224, 224, 192)
    return palette


@contextlib.contextmanager
def open_image(path: Path, what: str = "image") -> Iterator[Image.Image]:
    """Open an image file; a failure to open or decode it (also inside the block) is one line naming the file.

    Args:
        path: The file.
        what: What it is, for the message (``image``, ``mask``).

    Yields:
        The opened PIL image (closed when the block ends).

    Raises:
        DatasetError: ``<what> not found: <path>`` or ``cannot read <what> <path>: <reason>``.
    """
    try:
        with Image.open(path) as image:
            yield image
    except FileNotFoundError:
        raise DatasetError(f"{what} not found: {path}") from None
    except UserError:
        raise  # a check in the block (a DatasetError is also a ValueError)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DatasetError(f"cannot read {what} {path}: {reason}") from None


HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")  # 16-bit, 32-bit integer and float grey


def to_rgb(image: Image.Image) -> np.ndarray:
    """A PIL image as (H, W, 3) uint8 RGB; 16-bit, 32-bit and float grey are rescaled by their range, not clipped.

    Grey of more than 8 bits maps its smallest finite value to 0 and its largest to 255 (linearly; a constant
    image becomes 0): PIL's own conversion would clip it (a 16-bit image turns almost all white, a float one black).
    """
    if image.mode not in HIGH_DEPTH_MODES:
        return np.asarray(image.convert("RGB")).copy()
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    scaled = (np.nan_to_num(values, nan=low, posinf=high, neginf=low) - low) / max(high - low, 1e-12) * 255
    grey = np.round(np.clip(scaled, 0, 255)).astype(np.uint8)  # (H, W)
    return np.repeat(grey[:, :, None], 3, axis=2)  # (H, W, 3)


def read_rgb(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB (high-bit-depth grey rescaled, see :func:`to_rgb`).

    Raises:
        DatasetError: If the file is missing or not a readable image (one line naming the file).
    """
    with open_image(path) as image:
        return to_rgb(image)


@dataclass(frozen=True)
class PreparedDataset:
    """Read access to a prepared dataset directory.

    Args:
        root: The directory ``prepare`` wrote (e.g. ``data/prepared``).
    """

    root: Path

    @classmethod
    def open(cls, root: Path | str, stage: str = "prepare") -> PreparedDataset:
        """Open and check a prepared dataset.

        Args:
            root: Directory written by ``prepare``.
            stage: The stage that makes it (named in the error message).

        Raises:
            DatasetError: If the directory, one of its index files, or its image folder is missing.
        """
        root = Path(root)
        for name in ("classes.json", "cls_labels.json", "splits"):
            if not (root / name).exists():
                raise DatasetError(
                    f"prepared data not found: {root / name} is missing (run the '{stage}' stage first: "
                    f"`wsss {stage}` or `dvc repro {stage}`)"
                )
        data = cls(root)
        if not data.image_root.is_dir():
            raise DatasetError(
                f"image folder {data.image_root} of the prepared data {root} not found (the raw dataset moved? "
                f"point data.root at it and run '{stage}' again)"
            )
        return data

    def _read_index(self, name: str, kind: type) -> Any:
        """Read one of the JSON index files ``prepare`` writes; a damaged one is a one-line :class:`DatasetError`."""
        path = self.root / name
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise DatasetError(f"cannot read {path}: {one_line(exc)} (run the 'prepare' stage again)") from None
        if not isinstance(value, kind):
            raise DatasetError(f"{path} is not a JSON {kind.__name__} (run the 'prepare' stage again)")
        return value

    @cached_property
    def info(self) -> dict:
        """The contents of ``classes.json``."""
        return self._read_index("classes.json", dict)

    @property
    def class_names(self) -> list[str]:
        """Label names, background first."""
        return list(self.info["names"])

    @property
    def num_classes(self) -> int:
        """Number of labels K including background."""
        return len(self.class_names)

    @property
    def palette(self) -> list[list[int]]:
        """RGB colour per label id."""
        return [list(c) for c in self.info["palette"]]

    @cached_property
    def labels(self) -> dict[str, list[int]]:
        """Image-level labels: present class ids (1..C) per image id."""
        return self._read_index("cls_labels.json", dict)

    def split(self, name: str) -> list[str]:
        """Image ids of a split.

        Raises:
            DatasetError: If the split list does not exist.
        """
        path = self.root / "splits" / f"{name}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in (self.root / "splits").glob("*.txt"))
            raise DatasetError(f"split list {path} not found (available: {', '.join(available) or 'none'})")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]

    def count_unlabelled(self, split: str, stage: str) -> int:
        """Count the images of ``split`` without any class label (they train as all-negative and get no seeds).

        Args:
            split: The split a stage is about to read.
            stage: The stage, for the message.

        Returns:
            How many images have no label (logged when some do).

        Raises:
            DatasetError: If no image of the split has a label (nothing to learn or score).
        """
        ids = self.split(split)
        unlabelled = sum(1 for image_id in ids if not self.labels.get(image_id))
        if ids and unlabelled == len(ids):
            raise DatasetError(
                f"no image of split {split!r} in {self.root} has a class label ({stage} has nothing to learn or "
                "score; with VOC/COCO, check data.min_visible_pixels and the raw masks, then run 'prepare' again)"
            )
        if unlabelled:
            log.info("%s: %d of %d images of %s have no class label", stage, unlabelled, len(ids), split)
        return unlabelled

    @cached_property
    def image_root(self) -> Path:
        """The folder that holds the images (inside the prepared directory, or the raw dataset's)."""
        return self.root / self.info.get("image_root", "images")

    @cached_property
    def image_files(self) -> dict[str, str] | None:
        """Image paths relative to :attr:`image_root` per image id, if the layout lists them."""
        path = self.root / "image_files.json"
        return self._read_index(path.name, dict) if path.is_file() else None

    def image_path(self, image_id: str) -> Path:
        """Path of an image file.

        Raises:
            DatasetError: If the layout lists image files and ``image_id`` is not among them.
        """
        if self.image_files is None:
            return self.image_root / f"{image_id}{self.info['image_ext']}"
        if image_id not in self.image_files:
            raise DatasetError(f"image id {image_id!r} is not in {self.root / 'image_files.json'}")
        return self.image_root / self.image_files[image_id]

    def mask_path(self, image_id: str) -> Path:
        """Path of a ground-truth mask."""
        return self.root / "masks" / f"{image_id}.png"

    def load_image(self, image_id: str) -> np.ndarray:
        """Load an image as (H, W, 3) uint8 RGB.

        Raises:
            DatasetError: If the file is missing or not a readable image.
        """
        return read_rgb(self.image_path(image_id))

    def image_size(self, image_id: str) -> tuple[int, int]:
        """``(H, W)`` of an image, from its file's header (nothing decoded): the shape :meth:`load_image` returns.

        Raises:
            DatasetError: If the file is missing or not a readable image.
        """
        with open_image(self.image_path(image_id)) as image:
            return image.height, image.width

    def load_mask(self, image_id: str) -> np.ndarray:
        """Load a ground-truth mask as (H, W) uint8 class ids (255 = ignore).

        Raises:
            DatasetError: If the mask is missing, unreadable, or holds a class id outside ``classes.json``.
        """
        path = self.mask_path(image_id)
        again = "run the 'prepare' stage again: `wsss prepare` or `dvc repro prepare`"
        if not path.is_file():
            raise DatasetError(f"ground-truth mask not found: {path} ({again})")
        try:
            mask = load_label_png(path)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DatasetError(f"cannot read ground-truth mask {path}: {one_line(exc)} ({again})") from None
        bad = np.unique(mask[(mask >= self.num_classes) & (mask != IGNORE)])
        if bad.size:
            raise DatasetError(
                f"ground-truth mask {path} holds class id {int(bad[0])}, but {self.root / 'classes.json'} lists "
                f"0..{self.num_classes - 1} (and {IGNORE} = ignore); {again}"
            )
        return mask

    def label_vector(self, image_id: str) -> np.ndarray:
        """Image-level labels as a (C,) float32 multi-hot vector over the foreground classes."""
        vector = np.zeros(self.num_classes - 1, np.float32)
        vector[np.asarray(self.labels[image_id], dtype=np.int64) - 1] = 1.0
        return vector


def cut_splits(splits: dict[str, list[str]], subset: int | None) -> dict[str, list[str]]:
    """Every split cut to its first ``subset`` images, in split order (``data.subset``); ``None`` keeps them all.

    Args:
        splits: Image ids per split.
        subset: N, or ``None``.

    Returns:
        The cut lists (new lists; the input is not changed).
    """
    return {name: list(ids if subset is None else ids[:subset]) for name, ids in splits.items()}


def write_index(
    out: Path,
    dataset: str,
    names: list[str],
    palette: list[list[int]] | list[tuple],
    labels: dict[str, list[int]],
    splits: dict[str, list[str]],
    image_ext: str,
    image_root: str = "images",
    image_files: dict[str, str] | None = None,
) -> PreparedDataset:
    """Write the index files of a prepared dataset whose images and masks are already in place.

    Args:
        out: The prepared directory.
        dataset: Dataset name recorded in ``classes.json``.
        names: Label names, background first.
        palette: RGB colour per label id.
        labels: Present foreground class ids per image id.
        splits: Image ids per split (``train``, ``train_aug``, ``val``).
        image_ext: Image file extension (with the dot).
        image_root: Image folder, relative to ``out`` or absolute.
        image_files: Optional image paths relative to ``image_root`` per image id.

    Returns:
        The prepared dataset.
    """
    for split, ids in splits.items():
        with atomic_path(out / "splits" / f"{split}.txt") as tmp:
            tmp.write_text("".join(f"{i}\n" for i in ids))
    write_json(out / "cls_labels.json", labels)
    if image_files is not None:
        write_json(out / "image_files.json", image_files)
    info = {"dataset": dataset, "names": list(names), "palette": [list(c) for c in palette], "image_ext": image_ext}
    if image_root != "images":
        info["image_root"] = image_root
    write_json(out / "classes.json", info)
    return PreparedDataset.open(out)
