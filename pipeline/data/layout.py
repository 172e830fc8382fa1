"""The prepared dataset layout written by ``prepare`` and read by every later stage.

```
data/prepared/
  classes.json        {"dataset", "names": [background, ...], "palette": [[r, g, b], ...], "image_ext"}
  cls_labels.json     {image_id: [class ids present, 1..C]}
  splits/<split>.txt  one image id per line (train, train_aug, val)
  images/<id><ext>    RGB images
  masks/<id>.png      palette PNG ground truth (0 = background, 255 = ignore); used by metrics only
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.io import load_label_png

SPLITS = ("train", "train_aug", "val")


class DatasetError(ValueError):
    """A prepared dataset that is missing or inconsistent; the message is one line for the user."""


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
            DatasetError: If the directory or one of its index files is missing.
        """
        root = Path(root)
        for name in ("classes.json", "cls_labels.json", "splits"):
            if not (root / name).exists():
                raise DatasetError(
                    f"prepared data not found: {root / name} is missing (run the '{stage}' stage first: "
                    f"`wsss {stage}` or `dvc repro {stage}`)"
                )
        return cls(root)

    @cached_property
    def info(self) -> dict:
        """The contents of ``classes.json``."""
        return json.loads((self.root / "classes.json").read_text())

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
        return json.loads((self.root / "cls_labels.json").read_text())

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

    def image_path(self, image_id: str) -> Path:
        """Path of an image file."""
        return self.root / "images" / f"{image_id}{self.info['image_ext']}"

    def mask_path(self, image_id: str) -> Path:
        """Path of a ground-truth mask."""
        return self.root / "masks" / f"{image_id}.png"

    def load_image(self, image_id: str) -> np.ndarray:
        """Load an image as (H, W, 3) uint8 RGB.

        Raises:
            DatasetError: If the file is missing or not a readable image.
        """
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                return np.asarray(image.convert("RGB")).copy()
        except FileNotFoundError:
            raise DatasetError(f"image not found: {path}") from None
        except (UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from None

    def load_mask(self, image_id: str) -> np.ndarray:
        """Load a ground-truth mask as (H, W) uint8 class ids (255 = ignore)."""
        path = self.mask_path(image_id)
        if not path.is_file():
            raise DatasetError(f"ground-truth mask not found: {path}")
        return load_label_png(path)

    def label_vector(self, image_id: str) -> np.ndarray:
        """Image-level labels as a (C,) float32 multi-hot vector over the foreground classes."""
        vector = np.zeros(self.num_classes - 1, np.float32)
        vector[np.asarray(self.labels[image_id], dtype=np.int64) - 1] = 1.0
        return vector
