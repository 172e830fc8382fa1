"""``prepare`` on tiny VOC 2012 + SBD and COCO 2014 layouts: splits, labels, masks, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, tiny_params_dict, write_params
from PIL import Image
from raw_fixtures import (
    AUG_ONLY_CLASS,
    COCO_NAMES,
    VOC_LABELS,
    VOC_SIZES,
    VOC_TRAIN,
    VOC_TRAIN_AUG,
    VOC_VAL,
    coco_crowd_region,
    make_coco,
    make_voc,
)

from pipeline.config import DataParams
from pipeline.data.layout import PreparedDataset
from pipeline.data.raw import process_map
from pipeline.data.voc import CLASSES
from pipeline.errors import DatasetError
from pipeline.prepare import prepare


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "raw")


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "coco")


def prepare_voc_at(root: Path, out: Path) -> PreparedDataset:
    return prepare(DataParams(dataset="voc", root=str(root)), 0, out)


def voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


# --- VOC ----------------------------------------------------------------------------------------------------


def test_voc_splits_labels_and_classes(voc_root, tmp_path):
    data = prepare_voc_at(voc_root, tmp_path / "prepared")
    assert data.split("train") == VOC_TRAIN
    assert data.split("val") == VOC_VAL
    assert data.split("train_aug") == VOC_TRAIN_AUG  # every augmented mask not in val
    assert data.labels == {i: VOC_LABELS[i] for i in sorted(VOC_SIZES)}
    assert data.class_names == list(CLASSES) and data.num_classes == 21
    assert data.palette[15] == [192, 128, 128] and data.palette[0] == [0, 0, 0]  # the VOC palette
    assert data.info["dataset"] == "voc"


def test_voc_masks_are_palette_pngs_from_the_official_masks_where_they_exist(voc_root, tmp_path):
    data = prepare_voc_at(voc_root, tmp_path / "prepared")
    for image_id in VOC_SIZES:
        with Image.open(data.mask_path(image_id)) as image:
            assert image.mode == "P"
        mask = data.load_mask(image_id)
        w, h = VOC_SIZES[image_id]
        assert mask.shape == (h, w)
        assert AUG_ONLY_CLASS not in mask, f"{image_id}: the augmented mask was used instead of the official one"
        border = {255} if VOC_LABELS[image_id] else set()  # the boundary band is kept
        assert set(np.unique(mask).tolist()) == {0, *border, *VOC_LABELS[image_id]}


def test_voc_images_are_referenced_not_copied(voc_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = prepare_voc_at(Path("raw"), Path("data/prepared"))
    assert not (data.root / "images").exists()
    path = data.image_path("2007_000002")
    assert path.resolve() == (voc_dir(voc_root) / "JPEGImages" / "2007_000002.jpg").resolve()
    assert data.load_image("2007_000002").shape == (44, 36, 3)
    assert data.info["image_root"] == "../../raw/VOCdevkit/VOC2012/JPEGImages", "relative stays relative (movable)"


def test_voc_train_aug_list_is_used_when_present(voc_root, tmp_path):
    (voc_dir(voc_root) / "ImageSets" / "SegmentationAug").mkdir()
    (voc_dir(voc_root) / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("2008_000005\n2007_000001\n")
    data = prepare_voc_at(voc_root, tmp_path / "prepared")
    assert data.split("train_aug") == ["2008_000005", "2007_000001"]


def test_voc_root_may_be_the_voc2012_folder_itself(voc_root, tmp_path):
    data = prepare_voc_at(voc_dir(voc_root), tmp_path / "prepared")
    assert data.split("train") == VOC_TRAIN


def test_voc_missing_folder_names_what_and_where(voc_root, tmp_path):
    shutil.rmtree(voc_dir(voc_root) / "SegmentationClassAug")
    (voc_dir(voc_root) / "ImageSets" / "Segmentation" / "val.txt").unlink()
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DatasetError) as info:
        prepare_voc_at(voc_root, out)
    message = str(info.value)
    assert "\n" not in message
    assert "SegmentationClassAug/" in message and "ImageSets/Segmentation/val.txt" in message
    assert str(voc_dir(voc_root)) in message
    assert (out / "keep.txt").exists(), "nothing is deleted before the raw layout is checked"


def test_voc_empty_root_reports_the_expected_location(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"missing JPEGImages/.*VOCdevkit/VOC2012"):
        prepare_voc_at(tmp_path / "empty", tmp_path / "prepared")


def test_voc_corrupt_image(voc_root, tmp_path):
    (voc_dir(voc_root) / "JPEGImages" / "2008_000005.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=r"cannot read image .*2008_000005\.jpg") as info:
        prepare_voc_at(voc_root, tmp_path / "prepared")
    assert "\n" not in str(info.value)


def test_voc_mask_with_unknown_class_value(voc_root, tmp_path):
    path = voc_dir(voc_root) / "SegmentationClassAug" / "2008_000006.png"
    mask = np.zeros((36, 30), np.uint8)
    mask[3:6, 3:6] = 21
    mask[10:12, 10:12] = 40
    Image.fromarray(mask, mode="L").save(path)
    with pytest.raises(DatasetError) as info:
        prepare_voc_at(voc_root, tmp_path / "prepared")
    assert str(info.value) == f"mask {path} has unknown class values [21, 40] (allowed: 0..20 and 255)"


def test_voc_colour_mask_is_rejected(voc_root, tmp_path):
    path = voc_dir(voc_root) / "SegmentationClass" / "2007_000003.png"
    Image.new("RGB", (40, 40)).save(path)
    with pytest.raises(DatasetError, match="is a RGB image"):
        prepare_voc_at(voc_root, tmp_path / "prepared")


def test_voc_mask_and_image_of_different_size(voc_root, tmp_path):
    Image.new("RGB", (10, 10)).save(voc_dir(voc_root) / "JPEGImages" / "2008_000005.jpg")
    with pytest.raises(DatasetError, match=r"mask .*2008_000005\.png is 32x32 but image .* is 10x10"):
        prepare_voc_at(voc_root, tmp_path / "prepared")


@pytest.mark.parametrize("entry", ["../../etc/passwd", "/etc/passwd", "..", "a/b"])
def test_voc_list_entry_escaping_the_root(voc_root, tmp_path, entry):
    lists = voc_dir(voc_root) / "ImageSets" / "Segmentation"
    (lists / "train.txt").write_text(f"2007_000001\n{entry}\n")
    with pytest.raises(DatasetError) as info:
        prepare_voc_at(voc_root, tmp_path / "prepared")
    assert str(info.value).startswith(f"{lists / 'train.txt'} line 2: entry {entry!r} is not a plain file name")
    assert "escape" in str(info.value)


def test_voc_missing_mask_of_a_listed_image(voc_root, tmp_path):
    (voc_dir(voc_root) / "SegmentationClass" / "2007_000004.png").unlink()
    with pytest.raises(DatasetError, match=r"mask not found: .*SegmentationClass/2007_000004\.png"):
        prepare_voc_at(voc_root, tmp_path / "prepared")


@pytest.mark.slow  # a Python subprocess
def test_prepare_cli_exit_2_on_a_broken_raw_layout(voc_root, tmp_path):
    shutil.rmtree(voc_dir(voc_root) / "JPEGImages")
    params = write_params(tmp_path / "params.yaml", tiny_params_dict(data={"dataset": "voc", "root": str(voc_root)}))
    result = run_cli("prepare", "--params", params, "--out", tmp_path / "prepared", cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: VOC 2012 data incomplete: missing JPEGImages/")
    assert "Traceback" not in result.stderr


def test_prepared_data_whose_raw_images_moved(voc_root, tmp_path):
    prepare_voc_at(voc_root, tmp_path / "prepared")
    voc_root.rename(tmp_path / "moved")
    with pytest.raises(DatasetError, match="image folder .* not found"):
        PreparedDataset.open(tmp_path / "prepared")


# --- COCO ---------------------------------------------------------------------------------------------------

TRAIN_1, TRAIN_2, VAL_7 = "COCO_train2014_000000000001", "COCO_train2014_000000000002", "COCO_val2014_000000000007"


def prepare_coco_at(root: Path, out: Path) -> PreparedDataset:
    return prepare(DataParams(dataset="coco", root=str(root)), 0, out)


def test_coco_splits_labels_and_classes(coco_root, tmp_path):
    data = prepare_coco_at(coco_root, tmp_path / "prepared")
    assert data.split("train") == [TRAIN_1, TRAIN_2], "the image without annotations is left out"
    assert data.split("train_aug") == data.split("train")
    assert data.split("val") == [VAL_7]
    assert data.class_names == COCO_NAMES, "category ids 1, 3, 18, 90 -> labels 1..4 in id order"
    assert data.labels == {TRAIN_1: [1, 3], TRAIN_2: [2, 4], VAL_7: [2]}, "crowd categories are labels too"


def test_coco_smaller_object_on_top_and_crowd_ignored(coco_root, tmp_path):
    data = prepare_coco_at(coco_root, tmp_path / "prepared")
    first = data.load_mask(TRAIN_1)
    assert first.shape == (16, 20)
    assert first[7, 7] == 3, "the small dog is painted over the large person"
    assert first[12, 15] == 1 and first[0, 0] == 0
    second = data.load_mask(TRAIN_2)
    crowd = coco_crowd_region().astype(bool)
    assert second[3, 3] == 255 and crowd[3, 3], "crowd pixels are ignored"
    assert second[9, 8] == 4 and crowd[9, 8], "an object covers the crowd region"
    assert second[9, 14] == 4 and second[0, 0] == 0
    assert set(np.unique(second)) == {0, 4, 255}, "the crowd category has no pixels of its own"


def test_coco_images_are_referenced_per_split_folder(coco_root, tmp_path):
    data = prepare_coco_at(coco_root, tmp_path / "prepared")
    assert data.image_path(VAL_7).resolve() == (coco_root / "val2014" / f"{VAL_7}.jpg").resolve()
    assert data.image_path(TRAIN_2).resolve() == (coco_root / "train2014" / f"{TRAIN_2}.jpg").resolve()
    assert data.load_image(VAL_7).shape == (18, 24, 3)
    with pytest.raises(DatasetError, match="not in"):
        data.image_path("COCO_train2014_000000000003")


def test_coco_missing_annotations(coco_root, tmp_path):
    (coco_root / "annotations" / "instances_val2014.json").unlink()
    with pytest.raises(DatasetError, match=r"COCO 2014 data incomplete: missing annotations/instances_val2014\.json"):
        prepare_coco_at(coco_root, tmp_path / "prepared")


def test_coco_file_name_escaping_its_folder(coco_root, tmp_path):
    path = coco_root / "annotations" / "instances_train2014.json"
    payload = json.loads(path.read_text())
    payload["images"][0]["file_name"] = "../../secret.jpg"
    path.write_text(json.dumps(payload))
    with pytest.raises(DatasetError, match=r"entry '\.\./\.\./secret\.jpg' is not a plain file name"):
        prepare_coco_at(coco_root, tmp_path / "prepared")


def test_coco_corrupt_annotation_file(coco_root, tmp_path):
    (coco_root / "annotations" / "instances_train2014.json").write_text("{not json")
    with pytest.raises(DatasetError, match="cannot read COCO annotations"):
        prepare_coco_at(coco_root, tmp_path / "prepared")


def test_coco_image_size_disagrees_with_annotations(coco_root, tmp_path):
    Image.new("RGB", (5, 5)).save(coco_root / "val2014" / f"{VAL_7}.jpg")
    with pytest.raises(DatasetError, match=r"is not 24x18 as .*instances_val2014\.json says"):
        prepare_coco_at(coco_root, tmp_path / "prepared")


def test_synthetic_layout_still_copies_images(tmp_path):
    params = DataParams.model_validate(tiny_params_dict()["data"])
    data = prepare(params, 0, tmp_path / "prepared")
    assert data.image_root == data.root / "images" and "image_root" not in data.info
    assert data.image_path(data.split("train")[0]).is_file()


def _fail_on_three(item: int) -> int:
    if item == 3:
        raise DatasetError(f"bad item {item}")
    return item * 2


def test_process_map_in_worker_processes_keeps_order_and_reraises():
    assert process_map(_fail_on_three, list(range(4, 24)), "test", workers=2) == [2 * i for i in range(4, 24)]
    with pytest.raises(DatasetError, match="^bad item 3$"):
        process_map(_fail_on_three, list(range(10)), "test", workers=2)


# --- data.subset ----------------------------------------------------------------------------------------------


def test_voc_subset_keeps_the_first_images_of_every_split(voc_root, tmp_path):
    aug_list = voc_dir(voc_root) / "ImageSets" / "SegmentationAug"
    aug_list.mkdir()
    (aug_list / "train_aug.txt").write_text("2007_000002\n2008_000005\n2007_000001\n")
    data = prepare(DataParams(dataset="voc", root=str(voc_root), subset=1), 0, tmp_path / "prepared")
    assert (data.split("train"), data.split("train_aug"), data.split("val")) == (
        VOC_TRAIN[:1],
        ["2007_000002"],
        VOC_VAL[:1],
    )
    kept = {"2007_000001", "2007_000002", "2007_000003"}
    assert set(data.labels) == kept and {p.stem for p in (data.root / "masks").glob("*.png")} == kept
    assert AUG_ONLY_CLASS not in data.load_mask("2007_000002"), "a train image keeps its fine mask outside the cut"
    bigger = prepare(DataParams(dataset="voc", root=str(voc_root), subset=100), 0, tmp_path / "all")
    assert bigger.split("train_aug") == ["2007_000002", "2008_000005", "2007_000001"]


def test_coco_subset_keeps_the_first_images_of_every_split(coco_root, tmp_path):
    data = prepare(DataParams(dataset="coco", root=str(coco_root), subset=1), 0, tmp_path / "prepared")
    assert (data.split("train"), data.split("train_aug"), data.split("val")) == ([TRAIN_1], [TRAIN_1], [VAL_7])
    assert data.labels == {TRAIN_1: [1, 3], VAL_7: [2]} and set(data.image_files) == {TRAIN_1, VAL_7}
    assert {p.stem for p in (data.root / "masks").glob("*.png")} == {TRAIN_1, VAL_7}


def test_synthetic_subset_is_the_first_images_unchanged(tmp_path):
    params = tiny_params_dict()["data"]
    full = prepare(DataParams.model_validate(params), 0, tmp_path / "full")
    cut = prepare(DataParams.model_validate({**params, "subset": 3}), 0, tmp_path / "cut")
    for split in ("train", "train_aug", "val"):
        assert cut.split(split) == full.split(split)[:3]
    for image_id in cut.split("train") + cut.split("val"):
        assert cut.image_path(image_id).read_bytes() == full.image_path(image_id).read_bytes()
        assert cut.mask_path(image_id).read_bytes() == full.mask_path(image_id).read_bytes()
    assert len(list((cut.root / "images").iterdir())) == 6
