"""``wsss standin``: VOC and COCO stand-ins in the exact raw layouts, read by the real readers unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from pipeline.config import DataParams
from pipeline.data import standin, synthetic
from pipeline.data.coco import annotation_mask
from pipeline.data.layout import IGNORE
from pipeline.data.voc import CLASSES
from pipeline.errors import DatasetError
from pipeline.prepare import prepare
from stages.cli import app

VOC_SIZES = {(w, h) for w, h, _ in standin.VOC_SCENES.sizes}
COCO_SIZES = {(w, h) for w, h, _ in standin.COCO_SCENES.sizes}
# COCO 2014's category ids: 1..90 without these ten
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def read_list(path: Path) -> list[str]:
    return path.read_text().split()


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.md5(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.fixture(scope="module")
def voc_standin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("voc_standin")
    standin.write_voc(root, 20, seed=3, workers=1)
    return root


@pytest.fixture(scope="module")
def coco_standin(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco_standin")
    standin.write_coco(root, 9, seed=1, workers=1)
    return root


# --- the generator's many-class scenes ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [20, 80])
def test_every_class_has_its_own_look(count):
    looks = synthetic.class_looks(count)
    assert len({(look.body, look.pattern, look.part, look.part_color) for look in looks}) == count
    if count == 20:  # VOC: body shape and surface pattern alone tell the classes apart
        assert len({(look.body, look.pattern) for look in looks}) == 20
    assert synthetic.class_looks(80)[:count] == looks
    with pytest.raises(ValueError, match="1..80"):
        synthetic.class_looks(81)


def test_scenes_are_deterministic_at_real_sizes():
    looks = synthetic.class_looks(80)
    image, label, objects = synthetic.generate_scene(5, 0, looks, standin.COCO_SCENES)
    again = synthetic.generate_scene(5, 0, looks, standin.COCO_SCENES)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1]) and objects == again[2]
    assert not np.array_equal(image, synthetic.generate_scene(6, 0, looks, standin.COCO_SCENES)[0])
    sizes = set()
    for index in range(40):
        image, label, objects = synthetic.generate_scene(index, 0, looks, standin.COCO_SCENES)
        height, width = label.shape
        sizes.add((width, height))
        assert image.shape == (height, width, 3) and image.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= {0} | {obj.label for obj in objects}
        areas = [obj.area for obj in objects if not obj.crowd]
        assert areas == sorted(areas, reverse=True), "largest first: a smaller object lies on a larger one"
        assert all(obj.crowd for obj in objects[: len(objects) - len(areas)]), "a crowd lies under every object"
        for obj in objects:
            points = np.asarray([p for polygon in obj.polygons for p in polygon])
            assert (points >= 0).all() and (points[:, 0] <= width).all() and (points[:, 1] <= height).all()
    assert sizes <= COCO_SIZES and any(w < h for w, h in sizes) and any(w > h for w, h in sizes)


def test_scene_labels_match_their_objects_polygons():
    looks = synthetic.class_looks(20)
    image, label, objects = synthetic.generate_scene(2, 0, looks, standin.VOC_SCENES)
    height, width = label.shape
    painted = np.zeros_like(label)
    for obj in objects:
        painted[synthetic.fill_polygons(width, height, obj.polygons)] = obj.label
    assert np.array_equal(painted, label)


# --- VOC ------------------------------------------------------------------------------------------------------


def test_voc_plan_follows_the_real_proportions():
    ids, splits = standin.voc_plan(12031, 0)
    assert (len(splits["train"]), len(splits["val"]), len(splits["train_aug"])) == (1464, 1449, 10582)
    assert ids == sorted(ids) and ids[0] == "2007_000001" and ids[-1].startswith("2012_")
    ids, splits = standin.voc_plan(2, 0)
    assert len(splits["train"]) == len(splits["val"]) == 1
    with pytest.raises(DatasetError, match="at least 2 images"):
        standin.voc_plan(1, 0)


def test_voc_standin_has_the_exact_layout(voc_standin):
    voc = voc_dir(voc_standin)
    lists = {name: read_list(voc / "ImageSets" / "Segmentation" / f"{name}.txt") for name in
             ("train", "train_aug", "val", "trainval")}  # fmt: skip
    jpegs = sorted(p.stem for p in (voc / "JPEGImages").glob("*.jpg"))
    assert len(jpegs) == 20 and sorted(set(lists["train_aug"]) | set(lists["val"])) == jpegs
    assert set(lists["train"]) < set(lists["train_aug"]) and not set(lists["val"]) & set(lists["train_aug"])
    assert lists["trainval"] == sorted(lists["train"] + lists["val"])
    assert sorted(p.stem for p in (voc / "SegmentationClass").glob("*.png")) == lists["trainval"]
    assert sorted(p.stem for p in (voc / "SegmentationClassAug").glob("*.png")) == jpegs
    for image_id in jpegs:
        with Image.open(voc / "JPEGImages" / f"{image_id}.jpg") as image:
            assert image.format == "JPEG" and image.mode == "RGB" and image.size in VOC_SIZES
        with Image.open(voc / "SegmentationClassAug" / f"{image_id}.png") as aug:
            assert aug.mode == "L" and aug.size == image.size
            assert set(np.unique(np.asarray(aug)).tolist()) <= set(range(21)), "SBD masks have no band"
    with Image.open(voc / "SegmentationClass" / f"{lists['val'][0]}.png") as fine:
        assert fine.mode == "P" and IGNORE in np.asarray(fine), "official masks carry the 255 boundary band"


def test_voc_standin_goes_through_the_real_reader(voc_standin, tmp_path):
    data = prepare(DataParams(dataset="voc", root=str(voc_standin)), 0, tmp_path / "prepared")
    voc = voc_dir(voc_standin)
    for split in ("train", "train_aug", "val"):
        assert data.split(split) == read_list(voc / "ImageSets" / "Segmentation" / f"{split}.txt")
    assert data.class_names == list(CLASSES)
    image_id = data.split("train")[0]
    with Image.open(voc / "SegmentationClass" / f"{image_id}.png") as fine:
        assert np.array_equal(data.load_mask(image_id), np.asarray(fine)), "train and val use the fine masks"
    assert data.load_image(image_id).shape[:2] == data.load_mask(image_id).shape
    assert all(1 <= c <= 20 for labels in data.labels.values() for c in labels)


# --- COCO -----------------------------------------------------------------------------------------------------


def test_coco_categories_are_cocos():
    ids = [i for i, _, _ in standin.COCO_CATEGORIES]
    assert ids == sorted(set(range(1, 91)) - COCO_UNUSED_IDS) and len(ids) == 80
    names = {i: name for i, name, _ in standin.COCO_CATEGORIES}
    assert (names[1], names[18], names[64], names[90]) == ("person", "dog", "potted plant", "toothbrush")


def test_coco_plan_proportions_and_unannotated_images():
    plan = standin.coco_plan(123287, 0)
    assert (len(plan["train"]), len(plan["val"])) == (82783, 40504)
    for split, expected in (("train", 82081), ("val", 40137)):
        assert abs(sum(annotated for _, _, annotated in plan[split]) - expected) < 120
        image_ids = [image_id for _, image_id, _ in plan[split]]
        assert image_ids == sorted(image_ids) and 1 <= image_ids[0] and image_ids[-1] <= 581929
    with pytest.raises(DatasetError, match="at least 2 images"):
        standin.coco_plan(1, 0)


def test_crowd_annotation_is_an_uncompressed_rle_that_pycocotools_reads():
    polygons = [[(2.0, 2.0), (9.0, 2.0), (9.0, 9.0)], [(12.0, 4.0), (18.0, 4.0), (18.0, 12.0), (12.0, 12.0)]]
    crowd = synthetic.SceneObject(3, polygons, 0.0, crowd=True)
    ann = standin.coco_annotation(crowd, 20, 16)
    expected = synthetic.fill_polygons(20, 16, polygons)
    assert ann["iscrowd"] == 1 and isinstance(ann["segmentation"]["counts"], list)
    assert np.array_equal(annotation_mask(ann["segmentation"], 16, 20).astype(bool), expected)
    assert ann["area"] == expected.sum() and ann["category_id"] == 3
    polygon = standin.coco_annotation(synthetic.SceneObject(80, polygons[1:], 48.0), 20, 16)
    assert polygon["iscrowd"] == 0 and polygon["category_id"] == 90 and polygon["bbox"] == [12.0, 4.0, 6.0, 8.0]
    rle = mask_utils.frPyObjects(polygon["segmentation"], 16, 20)
    assert abs(float(mask_utils.area(mask_utils.merge(rle))) - polygon["area"]) < 20


def test_coco_standin_has_the_exact_layout(coco_standin):
    for split in ("train", "val"):
        payload = json.loads((coco_standin / "annotations" / f"instances_{split}2014.json").read_text())
        assert {"info", "images", "licenses", "annotations", "categories"} <= set(payload)
        assert [c["id"] for c in payload["categories"]] == [i for i, _, _ in standin.COCO_CATEGORIES]
        files = sorted(p.name for p in (coco_standin / f"{split}2014").glob("*.jpg"))
        assert files == sorted(image["file_name"] for image in payload["images"])
        for image in payload["images"]:
            assert image["file_name"] == f"COCO_{split}2014_{image['id']:012d}.jpg"
            with Image.open(coco_standin / f"{split}2014" / image["file_name"]) as jpeg:
                assert jpeg.format == "JPEG" and jpeg.size == (image["width"], image["height"])
                assert jpeg.size in COCO_SIZES
        known = {image["id"] for image in payload["images"]}
        for ann in payload["annotations"]:
            assert ann["image_id"] in known and ann["area"] > 0 and len(ann["bbox"]) == 4
            assert isinstance(ann["segmentation"], dict if ann["iscrowd"] else list)


def test_coco_standin_goes_through_the_real_reader(coco_standin, tmp_path):
    data = prepare(DataParams(dataset="coco", root=str(coco_standin)), 0, tmp_path / "prepared")
    assert data.num_classes == 81 and data.class_names[1] == "person" and data.class_names[80] == "toothbrush"
    plan = standin.coco_plan(9, 1)
    for split in ("train", "val"):
        expected = [f"COCO_{split}2014_{image_id:012d}" for _, image_id, annotated in plan[split] if annotated]
        assert data.split(split) == expected
    for split in ("train", "val"):  # the reader's masks are the generator's class maps (crowds ignored)
        for index, image_id, annotated in plan[split]:
            assert annotated
            _, label, objects = synthetic.generate_scene(index, 1, synthetic.class_looks(80), standin.COCO_SCENES)
            mask = data.load_mask(f"COCO_{split}2014_{image_id:012d}")
            height, width = label.shape
            expected = label.copy()
            covered = synthetic.fill_polygons(width, height, [p for o in objects if not o.crowd for p in o.polygons])
            for obj in objects:
                if obj.crowd:  # ignored, where no object lies on it
                    expected[synthetic.fill_polygons(width, height, obj.polygons) & ~covered] = IGNORE
            labels = {c for c in np.unique(label).tolist() if c}
            assert labels <= set(data.labels[f"COCO_{split}2014_{image_id:012d}"]) | {0}
            assert (mask == expected).mean() > 0.98, "polygons and the painted image agree up to edge pixels"


def test_crowds_occur_in_coco_scenes():
    looks = synthetic.class_looks(80)
    crowds = sum(any(o.crowd for o in synthetic.generate_scene(i, 0, looks, standin.COCO_SCENES)[2]) for i in range(60))
    assert 2 <= crowds <= 15


# --- both -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_standin_does_not_depend_on_the_process_count(dataset, tmp_path):
    standin.write_standin(dataset, tmp_path / "one", 6, seed=2, workers=1)
    standin.write_standin(dataset, tmp_path / "two", 6, seed=2, workers=2)
    assert tree_digest(tmp_path / "one") == tree_digest(tmp_path / "two")


def test_standin_refuses_a_non_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="exists and is not empty"):
        standin.write_standin("voc", tmp_path / "out", 4)


def test_cli_writes_a_standin_and_reports_errors_in_one_line(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["standin", "coco", "--out", str(tmp_path / "coco"), "--images", "3"])
    assert result.exit_code == 0, result.output
    assert "wrote a coco stand-in" in result.output and "val=1" in result.output
    again = runner.invoke(app, ["standin", "coco", "--out", str(tmp_path / "coco"), "--images", "3"])
    assert again.exit_code == 2 and "exists and is not empty" in again.output
    assert runner.invoke(app, ["standin", "ade20k", "--out", str(tmp_path / "x"), "--images", "3"]).exit_code == 2
    assert runner.invoke(app, ["standin", "voc", "--out", str(tmp_path / "x"), "--images", "1"]).exit_code == 2
