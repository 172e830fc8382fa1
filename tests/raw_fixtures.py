"""Tiny raw datasets in the VOC 2012 + SBD and COCO 2014 layouts, with hand-written expectations.

VOC: six images of different sizes. ``train`` = 000001, 000002; ``val`` = 000003, 000004; two more images exist only
in ``SegmentationClassAug``. The augmented masks of the train images carry a *different* class than the official
ones, so a test can tell which mask was used.

COCO: categories with COCO's gapped ids (1, 3, 18, 90 -> labels 1..4); train has an image with a small object on a
large one, an image with a crowd region partly covered by an object, and an image without annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

VOC_SIZES = {  # id -> (width, height)
    "2007_000001": (40, 32),
    "2007_000002": (36, 44),
    "2007_000003": (40, 40),
    "2007_000004": (44, 30),
    "2008_000005": (32, 32),
    "2008_000006": (30, 36),
}
VOC_TRAIN = ["2007_000001", "2007_000002"]
VOC_VAL = ["2007_000003", "2007_000004"]
VOC_TRAIN_AUG = ["2007_000001", "2007_000002", "2008_000005", "2008_000006"]
# classes painted into each official (train/val) and augmented-only mask: expected image-level labels
VOC_LABELS = {
    "2007_000001": [15],
    "2007_000002": [1, 12],
    "2007_000003": [7],
    "2007_000004": [3, 20],
    "2008_000005": [8],
    "2008_000006": [],
}
AUG_ONLY_CLASS = 9  # what the augmented masks of the train/val images show instead of the official classes
IGNORE_BORDER = 255


def _voc_mask(size: tuple[int, int], classes: list[int]) -> np.ndarray:
    """Background with one 255-bordered box per class, side by side."""
    w, h = size
    mask = np.zeros((h, w), np.uint8)
    for index, label in enumerate(classes):
        x0 = 2 + index * (w // 2)
        box = (slice(4, h - 4), slice(x0, x0 + w // 2 - 4))
        mask[box] = IGNORE_BORDER
        mask[box[0].start + 1 : box[0].stop - 1, box[1].start + 1 : box[1].stop - 1] = label
    return mask


def _image(size: tuple[int, int], mask: np.ndarray, seed: int) -> Image.Image:
    """An RGB image whose colours follow the mask (so a classifier has something to learn)."""
    rng = np.random.default_rng(seed)
    w, h = size
    image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    for label in np.unique(mask).tolist():
        if label not in (0, 255):
            image[mask == label] = ((label * 53) % 256, (label * 97) % 256, (label * 31) % 256)
    return Image.fromarray(image)


def _palette_png(mask: np.ndarray, path: Path) -> None:
    image = Image.fromarray(mask, mode="P")
    image.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 59) % 256, (i * 83) % 256)])
    image.save(path)


def make_voc(root: Path) -> Path:
    """Write the tiny VOC layout under ``root/VOCdevkit/VOC2012`` and return ``root``."""
    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    official = set(VOC_TRAIN) | set(VOC_VAL)
    for seed, (image_id, size) in enumerate(VOC_SIZES.items()):
        mask = _voc_mask(size, VOC_LABELS[image_id])
        _image(size, mask, seed).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if image_id in official:
            _palette_png(mask, voc / "SegmentationClass" / f"{image_id}.png")
            aug = np.where((mask > 0) & (mask < 255), AUG_ONLY_CLASS, mask).astype(np.uint8)
        else:
            aug = mask
        Image.fromarray(aug, mode="L").save(voc / "SegmentationClassAug" / f"{image_id}.png")
    (voc / "ImageSets/Segmentation/train.txt").write_text("\n".join(VOC_TRAIN) + "\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_VAL) + "\n\n")
    return root


COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
]
COCO_NAMES = ["background", "person", "car", "dog", "toothbrush"]


def _box(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"counts": counts, "size": list(mask.shape)}


def coco_crowd_region(height: int = 16, width: int = 20) -> np.ndarray:
    """The crowd region of train image 2: rows 2..13, columns 2..9."""
    region = np.zeros((height, width), np.uint8)
    region[2:14, 2:10] = 1
    return region


def make_coco(root: Path) -> Path:
    """Write the tiny COCO layout under ``root`` and return ``root``."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    specs = {
        "train": [
            (1, 20, 16, [(1, _box(1, 1, 19, 15), 0), (3, _box(4, 4, 10, 10), 0)]),  # dog on a larger person
            (2, 20, 16, [(2, _uncompressed_rle(coco_crowd_region()), 1), (4, _box(6, 6, 16, 12), 0)]),
            (3, 20, 16, []),  # no annotations: not part of the split
        ],
        "val": [(7, 24, 18, [(2, _box(2, 2, 20, 14), 0)])],
    }
    for split, images in specs.items():
        folder = root / f"{split}2014"
        folder.mkdir(exist_ok=True)
        payload = {"images": [], "annotations": [], "categories": COCO_CATEGORIES}
        for image_id, w, h, anns in images:
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(folder / name)
            payload["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
            for label, segmentation, crowd in anns:
                ann_id = len(payload["annotations"]) + 100 * image_id
                area = float(np.sum(segmentation["counts"][1::2])) if crowd else _polygon_area(segmentation[0])
                payload["annotations"].append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": COCO_CATEGORIES[label - 1]["id"],
                        "segmentation": segmentation,
                        "area": area,
                        "bbox": [0, 0, 1, 1],
                        "iscrowd": crowd,
                    }
                )
        (root / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(payload))
    return root


def _polygon_area(polygon: list[float]) -> float:
    xs, ys = polygon[0::2], polygon[1::2]
    return abs(sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))) / 2
