"""COCO 2014 instance annotations -> semantic masks and image-level labels in the prepared layout.

Expected raw layout (what ``wsss download`` writes under ``data.root``)::

    <data.root>/
      train2014/COCO_train2014_<12 digits>.jpg       82,783 images
      val2014/COCO_val2014_<12 digits>.jpg           40,504 images
      annotations/instances_train2014.json
      annotations/instances_val2014.json

Conventions (the usual ones of COCO WSSS work):

* **Classes.** The 80 categories sorted by COCO category id map to labels 1..80 (id 1 ``person`` -> 1, ...,
  id 90 ``toothbrush`` -> 80); 0 is background. Names come from the annotation file.
* **Splits.** Images with at least one annotation: ``train`` (82,081) and ``val`` (40,137); ``train_aug`` is
  ``train`` (COCO has no augmented set).
* **Masks.** Polygons and RLEs are rasterised with pycocotools. Crowd regions (``iscrowd: 1``) become 255
  (ignore). Then the non-crowd objects are painted in order of decreasing area, so where objects overlap the
  smaller one stays visible (it is usually in front) and covers crowd pixels.
* **Image-level labels.** The categories of all of an image's annotations, crowd ones included (the image does
  show them, even where the mask ignores their pixels).

Images are referenced in place (``image_root`` + ``image_files.json``). Masks are streamed: one image's mask is in
memory at a time; the annotation index of one split is (pycocotools loads the JSON).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from pipeline.data.layout import IGNORE, PreparedDataset, voc_palette, write_index
from pipeline.data.raw import image_size, plain_name, process_map, reference, require
from pipeline.errors import DatasetError
from pipeline.io import save_label_png

log = logging.getLogger(__name__)

SPLITS = {"train": "train2014", "val": "val2014"}
EXPECTED_SIZES = {"train": 82081, "val": 40137}
HINT = "run `wsss download` with data.dataset: coco, or point data.root at the folder that holds train2014/"


def load_coco(path: Path) -> COCO:
    """Load an instances annotation file with pycocotools (its progress prints are silenced).

    Raises:
        DatasetError: If the file is not a COCO annotation file.
    """
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, AssertionError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read COCO annotations {path}: {type(exc).__name__}: {exc}") from None


def category_labels(coco: COCO, path: Path) -> tuple[dict[int, int], list[str]]:
    """The category id -> label (1..C, in category-id order) mapping and the label names (background first).

    Raises:
        DatasetError: If there are no categories or more than 254.
    """
    cats = sorted(coco.loadCats(coco.getCatIds()), key=lambda c: c["id"])
    if not 0 < len(cats) < IGNORE:
        raise DatasetError(f"{path}: expected 1..{IGNORE - 1} categories, found {len(cats)}")
    return {c["id"]: i + 1 for i, c in enumerate(cats)}, ["background"] + [c["name"] for c in cats]


def annotation_mask(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """Rasterise one annotation's polygons, uncompressed RLE or compressed RLE into a (H, W) uint8 0/1 map."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle)


def semantic_mask(annotations: list[dict], height: int, width: int, label_of: dict[int, int]) -> np.ndarray:
    """Rasterise one image's instances into a (H, W) uint8 class map (crowd -> 255, larger objects first).

    Args:
        annotations: The image's annotations.
        height: Image height.
        width: Image width.
        label_of: Category id -> label.

    Returns:
        (H, W) uint8 labels: 0 background, 1..C classes, 255 crowd.
    """
    mask = np.zeros((height, width), np.uint8)
    for ann in annotations:
        if ann.get("iscrowd", 0):
            mask[annotation_mask(ann["segmentation"], height, width) > 0] = IGNORE
    objects = sorted((a for a in annotations if not a.get("iscrowd", 0)), key=lambda a: (-a["area"], a["id"]))
    for ann in objects:
        mask[annotation_mask(ann["segmentation"], height, width) > 0] = label_of[ann["category_id"]]
    return mask


def _convert_image(
    task: tuple[dict, list[dict]], folder: Path, ann_path: Path, out: Path, label_of: dict, palette: list
):
    """Check one image against its annotation record and write its semantic mask."""
    info, annotations = task
    image_path = folder / info["file_name"]
    if image_size(image_path) != (info["width"], info["height"]):
        raise DatasetError(f"image {image_path} is not {info['width']}x{info['height']} as {ann_path} says (WxH)")
    mask = semantic_mask(annotations, info["height"], info["width"], label_of)
    save_label_png(out / "masks" / f"{Path(info['file_name']).stem}.png", mask, palette)


def _convert_split(
    coco: COCO,
    ann_path: Path,
    split: str,
    root: Path,
    out: Path,
    label_of: dict[int, int],
    palette: list,
    subset: int | None,
) -> tuple[list[str], dict[str, list[int]], dict[str, str]]:
    """Write the masks of one split (its first ``subset`` images if set); return its image ids, labels and files."""
    folder = SPLITS[split]
    tasks, ids, labels, files = [], [], {}, {}
    for image_id in sorted(coco.getImgIds()):
        annotations = coco.imgToAnns.get(image_id, [])
        if not annotations:
            continue
        info = coco.imgs[image_id]
        file_name = plain_name(info["file_name"], f"{ann_path} image {image_id}", root / folder)
        unknown = {a["category_id"] for a in annotations} - set(label_of)
        if unknown:
            raise DatasetError(f"{ann_path}: image {image_id} has annotations of unknown categories {sorted(unknown)}")
        name = Path(file_name).stem
        ids.append(name)
        labels[name] = sorted({label_of[a["category_id"]] for a in annotations})
        files[name] = f"{folder}/{file_name}"
        tasks.append((info, annotations))
    if len(ids) != EXPECTED_SIZES[split]:
        log.warning("COCO split %s has %d images (the standard one has %d)", split, len(ids), EXPECTED_SIZES[split])
    ids, tasks = ids[:subset], tasks[:subset]  # data.subset (None keeps all)
    convert = functools.partial(
        _convert_image, folder=root / folder, ann_path=ann_path, out=out, label_of=label_of, palette=palette
    )
    process_map(convert, tasks, f"prepare coco {split}")
    return ids, {i: labels[i] for i in ids}, {i: files[i] for i in ids}


def prepare_coco(root: Path | str, out: Path, subset: int | None = None) -> PreparedDataset:
    """Convert COCO 2014 under ``root`` into the prepared layout in ``out``.

    The raw layout is checked before anything is written.

    Args:
        root: ``data.root``.
        out: An empty output directory (``prepare`` swaps it in when complete).
        subset: ``data.subset``: keep the first N images of each split (only their masks are written); None = all.

    Returns:
        The prepared dataset.

    Raises:
        DatasetError: If a folder or annotation file is missing or unreadable, the two splits disagree on the
            categories, a file name escapes its folder, or an image is unreadable or not the annotated size.
    """
    root = Path(root)
    ann_paths = {split: root / "annotations" / f"instances_{folder}.json" for split, folder in SPLITS.items()}
    entries = [f"{folder}/" for folder in SPLITS.values()] + [f"annotations/{p.name}" for p in ann_paths.values()]
    require(root, entries, "COCO 2014", HINT)
    palette = voc_palette()
    names: list[str] | None = None
    splits: dict[str, list[str]] = {}
    labels: dict[str, list[int]] = {}
    files: dict[str, str] = {}
    for split in ("val", "train"):
        coco = load_coco(ann_paths[split])
        label_of, split_names = category_labels(coco, ann_paths[split])
        if names is None:
            names = split_names
        elif split_names != names:
            raise DatasetError(f"{ann_paths[split]}: categories differ from those of {ann_paths['val']}")
        ids, split_labels, split_files = _convert_split(
            coco, ann_paths[split], split, root, out, label_of, palette, subset
        )
        splits[split] = ids
        labels.update(split_labels)
        files.update(split_files)
        del coco
    splits["train_aug"] = splits["train"]
    return write_index(
        out,
        "coco",
        names,
        palette[: len(names)],
        labels,
        splits,
        image_ext=".jpg",
        image_root=reference(root, out),
        image_files=files,
    )
