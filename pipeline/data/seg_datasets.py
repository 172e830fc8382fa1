"""Segmentation data: pseudo labels checked against the class list, augmented crops, same-size batches.

Augmentation (random scale, flip, crop with ignore padding) draws from ``numpy.random.default_rng([seed, epoch,
index])``, so a sample is a pure function of (seed, epoch, index) and a resumed run sees the same crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from pipeline.data.datasets import crop_offsets, normalize, paste_crop
from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.errors import DatasetError
from pipeline.io import load_label_png


def load_pseudo_label(path: Path, num_classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Load one pseudo-label PNG and check it against the class list and the image size.

    Args:
        path: The PNG (palette or greyscale; class ids 0..K-1, 255 = ignore).
        num_classes: K, background included.
        shape: (H, W) of the image it labels.

    Returns:
        (H, W) uint8 class ids.

    Raises:
        DatasetError: If the file is missing or unreadable, has another size, or holds an unknown class id.
    """
    try:
        label = load_label_png(path)
    except FileNotFoundError:
        raise DatasetError(
            f"pseudo label not found: {path} (run the 'refine' stage first: `wsss refine` or `dvc repro refine`)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DatasetError(f"cannot read pseudo label {path}: {exc}") from None
    if label.shape != tuple(shape):
        raise DatasetError(f"pseudo label {path} is {label.shape[1]}x{label.shape[0]}, its image {shape[1]}x{shape[0]}")
    bad = np.unique(label[(label >= num_classes) & (label != IGNORE)])
    if bad.size:
        raise DatasetError(
            f"pseudo label {path} holds class id {int(bad[0])}, but the dataset has classes 0..{num_classes - 1} "
            f"(and {IGNORE} = ignore)"
        )
    return label


def random_scale_flip_crop(
    image: np.ndarray, label: np.ndarray, crop: int, scale_range: tuple[float, float], flip: bool, rng
) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale (image bilinear, label nearest), horizontal flip, and a crop padded with 255 labels.

    Args:
        image: (H, W, 3) uint8.
        label: (H, W) uint8.
        crop: Output side.
        scale_range: [min, max] of the uniform scale factor.
        flip: Mirror with probability 0.5.
        rng: A NumPy generator.

    Returns:
        ``(image, label)``: (crop, crop, 3) uint8 and (crop, crop) uint8; padding has image 0 and label 255.
    """
    h, w = label.shape
    scale = rng.uniform(*scale_range)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    h, w = label.shape
    (sy, ty), (sx, tx) = crop_offsets(h, crop, rng), crop_offsets(w, crop, rng)
    out_image = paste_crop(np.zeros((crop, crop, 3), np.uint8), image, (sy, sx), (ty, tx))
    out_label = paste_crop(np.full((crop, crop), IGNORE, np.uint8), label, (sy, sx), (ty, tx))
    return out_image, out_label


class SegmentationTrainSet(Dataset):
    """Augmented (image, pseudo label) crops.

    Padding pixels get label 255, so they never enter the loss.

    Args:
        data: Prepared dataset (images).
        split: Split whose images have pseudo labels.
        label_dir: Directory of ``<image_id>.png`` pseudo labels.
        crop_size: Output side.
        scale_range: Random scale range.
        flip: Random horizontal flip.
        mean: Normalisation mean.
        std: Normalisation std.
        seed: Global seed.
    """

    def __init__(
        self,
        data: PreparedDataset,
        split: str,
        label_dir: Path,
        crop_size: int,
        scale_range: tuple[float, float],
        flip: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
    ) -> None:
        self.data = data
        self.ids = data.split(split)
        self.label_dir = Path(label_dir)
        missing = [i for i in self.ids if not (self.label_dir / f"{i}.png").is_file()]
        if missing:
            raise DatasetError(
                f"pseudo label not found: {self.label_dir / (missing[0] + '.png')} and {len(missing) - 1} more of "
                f"the {len(self.ids)} '{split}' images (run the 'refine' stage first: `wsss refine` or "
                "`dvc repro refine`)"
            )
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.flip = flip
        self.mean, self.std = mean, std
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_id = self.ids[index]
        image = self.data.load_image(image_id)
        label = load_pseudo_label(self.label_dir / f"{image_id}.png", self.data.num_classes, image.shape[:2])
        image, label = random_scale_flip_crop(image, label, self.crop_size, self.scale_range, self.flip, rng)
        return {"image": normalize(image, self.mean, self.std), "label": torch.from_numpy(label.astype(np.int64))}
