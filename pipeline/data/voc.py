"""PASCAL VOC 2012 + SBD (``SegmentationClassAug``) -> the prepared layout.

Expected raw layout (what ``wsss download`` writes under ``data.root``; ``data.root`` may also point at
``VOCdevkit/VOC2012`` itself)::

    <data.root>/VOCdevkit/VOC2012/
      JPEGImages/<id>.jpg
      SegmentationClass/<id>.png            official masks of train (1,464) and val (1,449), 255 boundaries
      SegmentationClassAug/<id>.png         SBD-derived masks of 12,031 images (train_aug + val)
      ImageSets/Segmentation/train.txt      1,464 ids
      ImageSets/Segmentation/val.txt        1,449 ids

Splits: ``train`` and ``val`` are the official lists; ``train_aug`` is every image with an augmented mask that is
not in ``val`` (the standard 10,582-image list, unless ``ImageSets/SegmentationAug/train_aug.txt`` is present, in
which case that list is used). Masks: the official fine mask where one exists (train and val: seed and pseudo-label
mIoU are scored against it, as in the papers), else the ``SegmentationClassAug`` mask. Image-level labels are the
classes present in the mask. Images are referenced in place (``image_root``), masks re-written as palette PNGs.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np

from pipeline.data.layout import IGNORE, PreparedDataset, cut_splits, voc_palette, write_index
from pipeline.data.raw import (
    check_same_size,
    image_size,
    plain_name,
    process_map,
    read_id_list,
    read_mask,
    reference,
    require,
)
from pipeline.io import save_label_png

log = logging.getLogger(__name__)

CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)
EXPECTED_SIZES = {"train": 1464, "train_aug": 10582, "val": 1449}
REQUIRED = [
    "JPEGImages/",
    "SegmentationClass/",
    "SegmentationClassAug/",
    "ImageSets/Segmentation/train.txt",
    "ImageSets/Segmentation/val.txt",
]
AUG_LIST = "ImageSets/SegmentationAug/train_aug.txt"
HINT = "run `wsss download` with data.dataset: voc, or point data.root at the folder that holds VOCdevkit/VOC2012"


def find_voc_dir(root: Path) -> Path:
    """The ``VOC2012`` folder under ``root``: ``root/VOCdevkit/VOC2012``, ``root/VOC2012`` or ``root`` itself.

    Raises:
        DatasetError: If none of them has the full layout; the message lists what is missing where.
    """
    candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            require(candidate, REQUIRED, "VOC 2012", HINT)
            return candidate
    require(candidates[0], REQUIRED, "VOC 2012", HINT)
    return candidates[0]


def voc_splits(voc_dir: Path) -> dict[str, list[str]]:
    """The ``train``, ``train_aug`` and ``val`` image ids (see the module docstring)."""
    lists = voc_dir / "ImageSets" / "Segmentation"
    train = read_id_list(lists / "train.txt", voc_dir)
    val = read_id_list(lists / "val.txt", voc_dir)
    if (voc_dir / AUG_LIST).is_file():
        train_aug = read_id_list(voc_dir / AUG_LIST, voc_dir)
    else:
        aug_dir, excluded = voc_dir / "SegmentationClassAug", set(val)
        stems = sorted(p.stem for p in aug_dir.glob("*.png") if p.stem not in excluded)
        train_aug = [plain_name(stem, str(aug_dir), voc_dir) for stem in stems]
    splits = {"train": train, "train_aug": train_aug, "val": val}
    for name, ids in splits.items():
        if len(ids) != EXPECTED_SIZES[name]:
            log.warning("VOC split %s has %d images (the standard one has %d)", name, len(ids), EXPECTED_SIZES[name])
    return splits


def _convert_image(item: tuple[str, str], voc_dir: Path, out: Path, palette: list) -> list[int]:
    """Check one image and its mask (from ``item = (id, mask folder)``), write the mask; return its labels."""
    image_id, folder = item
    mask_path = voc_dir / folder / f"{image_id}.png"
    mask = read_mask(mask_path, len(CLASSES))
    image_path = voc_dir / "JPEGImages" / f"{image_id}.jpg"
    check_same_size(image_path, mask_path, image_size(image_path), mask.shape)
    save_label_png(out / "masks" / f"{image_id}.png", mask, palette)
    return [int(c) for c in np.unique(mask) if c not in (0, IGNORE)]


def prepare_voc(root: Path | str, out: Path, subset: int | None = None) -> PreparedDataset:
    """Convert VOC 2012 + SBD under ``root`` into the prepared layout in ``out``.

    The raw layout is checked completely before anything is written.

    Args:
        root: ``data.root``.
        out: An empty output directory (``prepare`` swaps it in when complete).
        subset: ``data.subset``: keep the first N images of each split (only their masks are written); None = all.

    Returns:
        The prepared dataset.

    Raises:
        DatasetError: If a folder or list is missing, a list entry escapes the root, an image is unreadable, a mask
            has an unknown class value, or an image and its mask differ in size.
    """
    root = Path(root)
    voc_dir = find_voc_dir(root)
    full = voc_splits(voc_dir)
    fine = set(full["train"]) | set(full["val"])  # an image's mask does not depend on the cut
    splits = cut_splits(full, subset)
    ids = sorted(set().union(*splits.values()))
    palette = voc_palette()
    items = [(i, "SegmentationClass" if i in fine else "SegmentationClassAug") for i in ids]
    convert = functools.partial(_convert_image, voc_dir=voc_dir, out=out, palette=palette)
    labels = dict(zip(ids, process_map(convert, items, "prepare voc"), strict=True))
    empty = sum(1 for present in labels.values() if not present)
    if empty:
        log.warning("%d VOC images have no foreground class in their mask", empty)
    return write_index(
        out,
        "voc",
        list(CLASSES),
        palette[: len(CLASSES)],
        labels,
        splits,
        image_ext=".jpg",
        image_root=reference(voc_dir / "JPEGImages", out),
    )
