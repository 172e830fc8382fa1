"""Stand-ins for PASCAL VOC 2012 + SBD and COCO 2014: raw trees in their exact layouts, drawn by the generator.

``wsss standin voc|coco --out DIR --images N`` writes what ``wsss download`` would put under ``data.root``, at the
real datasets' scale per image (image sizes and aspect ratios, JPEG encoding, 20 or 80 classes) but with any
number of images, drawn by :func:`pipeline.data.synthetic.generate_scene`. The real readers
(:mod:`pipeline.data.voc`, :mod:`pipeline.data.coco`) read it unchanged, so a paper config can be rehearsed end to
end without the 2 or 20 GB download. It is a tool, not a dataset: the classes only look like their names.

VOC (``DIR/VOCdevkit/VOC2012``)::

    JPEGImages/<year>_<6 digits>.jpg      every image; about 500 x 375, landscape and portrait
    SegmentationClass/<id>.png            palette PNGs of train and val only, with a 255 boundary band
    SegmentationClassAug/<id>.png         greyscale PNGs of every image (train_aug + val), no band (as SBD's)
    ImageSets/Segmentation/train.txt      train (about 12 % of the images), sorted
    ImageSets/Segmentation/val.txt        val (about 12 %), disjoint from train_aug
    ImageSets/Segmentation/trainval.txt   train + val
    ImageSets/Segmentation/train_aug.txt  every image not in val (train is a subset), sorted: the list the reader
                                          derives from SegmentationClassAug

COCO (``DIR``)::

    train2014/COCO_train2014_<12 digits>.jpg, val2014/COCO_val2014_<12 digits>.jpg   about 640 x 480
    annotations/instances_{train,val}2014.json   info, licenses, images, annotations (polygons; a crowd is one
                                                 ``iscrowd: 1`` uncompressed RLE), COCO's 80 categories (ids 1..90)

Split sizes follow the real proportions (VOC: 1,464 train, 1,449 val of 12,031 masks; COCO: 40,504 of 123,287
images in val); about one COCO image in 118 has no annotation, as in COCO, and is left out by the reader.
Each image depends only on ``seed`` and its index, so the output does not depend on the number of processes.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data import synthetic
from pipeline.data.layout import voc_palette
from pipeline.data.raw import process_map
from pipeline.data.synthetic import SceneObject, SceneSpec
from pipeline.errors import DatasetError
from pipeline.io import save_label_png

VOC_SCENES = SceneSpec(
    sizes=((500, 375, 0.5), (500, 333, 0.2), (375, 500, 0.12), (333, 500, 0.05), (500, 400, 0.05), (500, 281, 0.04),
           (486, 500, 0.04)),
    max_classes=2,
    max_objects=3,
    min_scale=0.12,
    max_scale=0.35,
)  # fmt: skip
COCO_SCENES = SceneSpec(
    sizes=((640, 480, 0.45), (640, 427, 0.25), (480, 640, 0.12), (427, 640, 0.08), (640, 640, 0.04), (612, 612, 0.03),
           (500, 375, 0.03)),
    max_classes=4,
    max_objects=7,
    min_scale=0.05,
    max_scale=0.3,
    crowd_prob=0.1,
)  # fmt: skip
VOC_BAND = 2  # half-width of SegmentationClass's 255 band (VOC's void band is about 5 px wide)
JPEG_QUALITY = 90
VOC_TRAIN, VOC_VAL, VOC_MASKS = 1464, 1449, 12031
COCO_VAL, COCO_IMAGES, COCO_MAX_ID = 40504, 123287, 581929
UNANNOTATED_EVERY = 118  # COCO 2014: 702 of 82,783 train and 367 of 40,504 val images have no annotation

# COCO 2014's 80 categories by supercategory: (id, name); ids 12, 26, 29, 30, 45, 66, 68, 69, 71 and 83 are unused.
COCO_GROUPS = {
    "person": [(1, "person")],
    "vehicle": [(2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
                (8, "truck"), (9, "boat")],
    "outdoor": [(10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"), (14, "parking meter"), (15, "bench")],
    "animal": [(16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"),
               (23, "bear"), (24, "zebra"), (25, "giraffe")],
    "accessory": [(27, "backpack"), (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase")],
    "sports": [(34, "frisbee"), (35, "skis"), (36, "snowboard"), (37, "sports ball"), (38, "kite"),
               (39, "baseball bat"), (40, "baseball glove"), (41, "skateboard"), (42, "surfboard"),
               (43, "tennis racket")],
    "kitchen": [(44, "bottle"), (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"),
                (51, "bowl")],
    "food": [(52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"),
             (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake")],
    "furniture": [(62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"),
                  (70, "toilet")],
    "electronic": [(72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"), (77, "cell phone")],
    "appliance": [(78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"), (82, "refrigerator")],
    "indoor": [(84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"), (89, "hair drier"),
               (90, "toothbrush")],
}  # fmt: skip
COCO_CATEGORIES = sorted((i, name, group) for group, members in COCO_GROUPS.items() for i, name in members)


def _refuse_non_empty(path: Path) -> None:
    """Refuse to write into a non-empty folder (stale images would join the stand-in's splits)."""
    if path.exists() and any(path.iterdir()):
        raise DatasetError(f"{path} exists and is not empty (remove it or choose another --out)")


def _save_jpeg(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


# --- VOC ------------------------------------------------------------------------------------------------------


def voc_plan(images: int, seed: int) -> tuple[list[str], dict[str, list[str]]]:
    """The image ids of a VOC stand-in and its ``train``, ``train_aug`` and ``val`` lists (sorted).

    Args:
        images: Number of images (at least 2).
        seed: Chooses which images are train and val.

    Returns:
        ``(ids, splits)``: every id in index order (image ``i`` is drawn from index ``i``), and the lists.

    Raises:
        DatasetError: If ``images`` is below 2.
    """
    if images < 2:
        raise DatasetError(f"a VOC stand-in needs at least 2 images (one train, one val), got {images}")
    ids = [f"{2007 + 6 * i // images}_{i + 1:06d}" for i in range(images)]  # sorted: year, then number
    num_val = max(1, round(images * VOC_VAL / VOC_MASKS))
    num_train = min(images - num_val, max(1, round(images * VOC_TRAIN / VOC_MASKS)))
    order = np.random.default_rng([seed, images]).permutation(images)
    val = sorted(ids[i] for i in order[:num_val])
    train = sorted(ids[i] for i in order[num_val : num_val + num_train])
    held_out = set(val)
    return ids, {"train": train, "train_aug": [i for i in ids if i not in held_out], "val": val}


def _write_voc_image(item: tuple[int, str, bool], voc: Path, seed: int) -> None:
    """Draw image ``index`` and write its JPEG, its augmented mask and (train/val only) its fine mask."""
    index, image_id, fine = item
    looks = synthetic.class_looks(20)
    image, label, _ = synthetic.generate_scene(index, seed, looks, VOC_SCENES)
    _save_jpeg(voc / "JPEGImages" / f"{image_id}.jpg", image)
    Image.fromarray(label, mode="L").save(voc / "SegmentationClassAug" / f"{image_id}.png")
    if fine:
        mask = label.copy()
        mask[synthetic.boundary_band(label, VOC_BAND)] = 255
        save_label_png(voc / "SegmentationClass" / f"{image_id}.png", mask, voc_palette())


def write_voc(out: Path, images: int, seed: int = 0, workers: int | None = None) -> dict[str, int]:
    """Write a VOC 2012 + SBD stand-in under ``out/VOCdevkit/VOC2012`` (see the module docstring).

    Args:
        out: The stand-in's root (``data.root``); must be empty or absent.
        images: Number of images.
        seed: Seed of the images and the split.
        workers: Processes (default: the usable CPUs, at most 8).

    Returns:
        The number of images per split.

    Raises:
        DatasetError: If ``out`` is not empty or ``images`` is below 2.
    """
    _refuse_non_empty(out)
    ids, splits = voc_plan(images, seed)
    voc = out / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        (voc / folder).mkdir(parents=True, exist_ok=True)
    fine = set(splits["train"]) | set(splits["val"])
    items = [(index, image_id, image_id in fine) for index, image_id in enumerate(ids)]
    process_map(functools.partial(_write_voc_image, voc=voc, seed=seed), items, "standin voc", workers)
    lists = {**splits, "trainval": sorted(fine)}
    for name, members in lists.items():
        (voc / "ImageSets" / "Segmentation" / f"{name}.txt").write_text("".join(f"{i}\n" for i in members))
    return {name: len(members) for name, members in splits.items()}


# --- COCO -----------------------------------------------------------------------------------------------------


def coco_plan(images: int, seed: int) -> dict[str, list[tuple[int, int, bool]]]:
    """Which images of a COCO stand-in are train and val: ``(index, image id, annotated)`` per split, by image id.

    Args:
        images: Number of images (at least 2).
        seed: Chooses the image ids and the split.

    Returns:
        ``{"train": [...], "val": [...]}``; image ids are distinct, in 1..581,929 as COCO's.

    Raises:
        DatasetError: If ``images`` is below 2.
    """
    if images < 2:
        raise DatasetError(f"a COCO stand-in needs at least 2 images (one train, one val), got {images}")
    rng = np.random.default_rng([seed, images])
    image_ids = rng.choice(COCO_MAX_ID, size=images, replace=False) + 1
    num_val = min(images - 1, max(1, round(images * COCO_VAL / COCO_IMAGES)))
    in_val = np.zeros(images, bool)
    in_val[rng.permutation(images)[:num_val]] = True
    plan = {}
    for split, members in (("train", np.flatnonzero(~in_val)), ("val", np.flatnonzero(in_val))):
        ordered = sorted(members.tolist(), key=lambda index: image_ids[index])
        plan[split] = [
            (index, int(image_ids[index]), position % UNANNOTATED_EVERY != UNANNOTATED_EVERY - 1)
            for position, index in enumerate(ordered)
        ]
    return plan


def uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a (H, W) 0/1 mask: run lengths over column-major pixels, zeros first."""
    flat = np.asarray(mask, np.uint8).flatten(order="F")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    counts = np.diff(bounds).tolist()
    return {"counts": ([0] if flat[0] else []) + counts, "size": list(mask.shape)}


def coco_annotation(obj: SceneObject, width: int, height: int) -> dict:
    """A COCO annotation (without ``id`` and ``image_id``) of one scene object: polygon, or crowd RLE."""
    category = COCO_CATEGORIES[obj.label - 1][0]
    if obj.crowd:
        mask = synthetic.fill_polygons(width, height, obj.polygons)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
        return {"segmentation": uncompressed_rle(mask), "area": float(mask.sum()), "iscrowd": 1, "bbox": bbox,
                "category_id": category}  # fmt: skip
    points = np.asarray(obj.polygons[0], np.float64)
    (x0, y0), (x1, y1) = points.min(0), points.max(0)
    return {
        "segmentation": [[round(float(v), 2) for v in points.ravel()]],
        "area": round(obj.area, 2),
        "iscrowd": 0,
        "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)],
        "category_id": category,
    }


def _write_coco_image(item: tuple[int, int, bool], root: Path, split: str, seed: int) -> tuple[dict, list[dict]]:
    """Draw image ``index``, write its JPEG; return its ``images`` record and annotations (none if unannotated)."""
    index, image_id, annotated = item
    image, _, objects = synthetic.generate_scene(index, seed, synthetic.class_looks(80), COCO_SCENES)
    height, width = image.shape[:2]
    name = f"COCO_{split}2014_{image_id:012d}.jpg"
    _save_jpeg(root / f"{split}2014" / name, image)
    info = {
        "license": 1 + index % 8,
        "file_name": name,
        "coco_url": f"http://images.cocodataset.org/{split}2014/{name}",
        "height": height,
        "width": width,
        "date_captured": "2013-11-14 16:28:13",
        "flickr_url": "",
        "id": image_id,
    }
    return info, [coco_annotation(obj, width, height) for obj in objects] if annotated else []


def write_coco(out: Path, images: int, seed: int = 0, workers: int | None = None) -> dict[str, int]:
    """Write a COCO 2014 stand-in under ``out`` (see the module docstring).

    Args:
        out: The stand-in's root (``data.root``); must be empty or absent.
        images: Number of images, train and val together.
        seed: Seed of the images, their ids and the split.
        workers: Processes (default: the usable CPUs, at most 8).

    Returns:
        The number of images per split (those with annotations, as the reader counts them).

    Raises:
        DatasetError: If ``out`` is not empty or ``images`` is below 2.
    """
    _refuse_non_empty(out)
    plan = coco_plan(images, seed)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    categories = [{"supercategory": group, "id": i, "name": name} for i, name, group in COCO_CATEGORIES]
    licenses = [{"url": "", "id": i, "name": f"stand-in licence {i}"} for i in range(1, 9)]
    next_id, counts = 1, {}
    for split, items in plan.items():
        (out / f"{split}2014").mkdir(exist_ok=True)
        write = functools.partial(_write_coco_image, root=out, split=split, seed=seed)
        records = process_map(write, items, f"standin coco {split}", workers)
        annotations = []
        for info, anns in records:
            for ann in anns:
                annotations.append({**ann, "image_id": info["id"], "id": next_id})
                next_id += 1
        payload = {
            "info": {"description": f"wsss stand-in for COCO 2014 {split} (seed {seed})", "version": "1.0"},
            "images": [info for info, _ in records],
            "licenses": licenses,
            "annotations": annotations,
            "categories": categories,
        }
        (out / "annotations" / f"instances_{split}2014.json").write_text(json.dumps(payload, separators=(",", ":")))
        counts[split] = sum(1 for _, anns in records if anns)
    return {"train": counts["train"], "train_aug": counts["train"], "val": counts["val"]}


def write_standin(dataset: str, out: Path | str, images: int, seed: int = 0, workers: int | None = None) -> dict:
    """Write a ``voc`` or ``coco`` stand-in under ``out``; return the number of images per split.

    Raises:
        DatasetError: If ``dataset`` is neither, ``out`` is not empty, or ``images`` is below 2.
    """
    writers = {"voc": write_voc, "coco": write_coco}
    if dataset not in writers:
        raise DatasetError(f"unknown stand-in {dataset!r} (choose voc or coco)")
    return writers[dataset](Path(out), images, seed, workers)
