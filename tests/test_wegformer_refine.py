"""WegFormer's post-processors in ``refine`` (``refine.wegformer``): soft erase, DRS's saliency recipe, EPOM, the
saliency folder (errors name the file) and the oracle saliency, on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.config import DataParams, RefineParams, SyntheticParams, WegformerParams
from pipeline.errors import DatasetError
from pipeline.prepare import prepare
from pipeline.refine import wegformer_label
from pipeline.refinement.seeds import threshold_labels
from pipeline.refinement.wegformer import (
    check_saliency_dir,
    drs_ignore,
    drs_scores,
    epom,
    load_saliency,
    oracle_saliency,
    soft_erase,
)

IGNORE = 255


def test_soft_erase_clips_at_the_ratio_of_the_max_and_renormalises():
    maps = np.array([[[0.7, 0.7, 0.7]], [[0.2, 0.6, 1.0]], [[0.0, 0.0, 0.0]]], np.float32)  # (3, 1, 3)
    out = soft_erase(maps, 0.5)
    assert np.allclose(out[0], 0.7)  # background left as it is
    # min-max: 0, 0.5, 1 -> clip at 0.5: 0, 0.5, 0.5 -> / 0.5: 0, 1, 1
    assert np.allclose(out[1], [[0.0, 1.0, 1.0]])
    assert np.allclose(out[2], 0.0)  # a flat map stays 0
    assert np.allclose(soft_erase(maps, 1.0)[1], [[0.0, 0.5, 1.0]])  # S_r = 1: min-max only


def test_epom_median_branch():
    labels = np.array([[1, 1, 1, 0, 0, 0]], np.uint8)
    maps = np.zeros((2, 1, 6), np.float32)
    maps[1] = [[0.2, 0.5, 0.9, 0.6, 0.5, 0.1]]  # median over the class-1 pixels = 0.5
    out = epom(labels, maps, np.array([0, 1]), fg_threshold=0.5)
    assert out.tolist() == [[1, 1, 1, IGNORE, 0, 0]]  # 0.6 > 0.5 ignored; 0.5 (not above) and 0.1 stay background


def test_epom_class_absent_branch_uses_the_upper_quartile_over_confident_pixels():
    labels = np.zeros((1, 6), np.uint8)  # class 2 got no pixel
    maps = np.zeros((2, 1, 6), np.float32)
    maps[1] = [[0.1, 0.3, 0.4, 0.5, 0.7, 0.9]]  # above T_fg = 0.35: 0.4, 0.5, 0.7, 0.9 -> 75th percentile = 0.75
    out = epom(labels, maps, np.array([0, 2]), fg_threshold=0.35)
    assert out.tolist() == [[0, 0, 0, 0, 0, IGNORE]]
    assert (epom(labels, maps, np.array([0, 2]), fg_threshold=0.95) == 0).all()  # nothing confident: skipped


def test_epom_touches_background_only_and_each_class_has_its_threshold():
    labels = np.array([[1, 2, 0, 0]], np.uint8)
    maps = np.array([[[0, 0, 0, 0]], [[0.5, 0.9, 0.6, 0.1]], [[0.9, 0.3, 0.1, 0.4]]], np.float32)
    out = epom(labels, maps, np.array([0, 1, 2]), fg_threshold=0.5)
    # class 1: median 0.5 -> pixel 2 (0.6) ignored; class 2: median 0.3 -> pixel 3 (0.4) ignored; pixel 1 keeps 2
    assert out.tolist() == [[1, 2, IGNORE, IGNORE]]


def test_drs_scores_and_ignored_pixels():
    maps = np.array([[[0.5, 0.5, 0.5]], [[0.1, 0.95, 0.3]]], np.float32)
    saliency = np.array([[0.0, 1.0, 1.0]], np.float32)
    scores = drs_scores(maps, saliency, 0.2)
    assert np.allclose(scores, [[[1.0, 0.0, 0.0]], [[0.0, 0.95, 0.3]]])
    labels = np.array([0, 1])[scores.argmax(0)].astype(np.uint8)  # [[0, 1, 1]]
    conflict = scores.copy()
    conflict[0, 0, 0], conflict[1, 0, 0] = 0.95, 0.92  # two channels above 0.9 at pixel 0
    assert drs_ignore(labels, conflict, saliency, 0.9).tolist() == [[IGNORE, 1, 1]]
    background = np.zeros_like(labels)  # fully salient pixels labelled background are ignored
    assert drs_ignore(background, scores, saliency, 0.9).tolist() == [[0, IGNORE, IGNORE]]


def test_wegformer_label_chains_soft_erase_saliency_and_epom():
    image = np.zeros((1, 4, 3), np.uint8)
    maps = np.array([[[0.0] * 4], [[0.1, 0.3, 0.5, 1.0]]], np.float32)
    keys = np.array([0, 1])
    weg = WegformerParams(soft_erase=0.5, epom=True)
    params = RefineParams(method="none", bg_threshold=0.5, wegformer=weg)
    # soft erase: min-max (0, 2/9, 4/9, 1) -> clip 0.5 -> / 0.5: (0, 4/9, 8/9, 1); > 0.5: pixels 2, 3
    # EPOM: median over class 1 = (8/9 + 1) / 2 > 8/9 -> no background pixel above it
    assert wegformer_label(image, maps, keys, params, None, None).tolist() == [[0, 0, 1, 1]]
    with_saliency = RefineParams(method="none", wegformer=WegformerParams(soft_erase=0.5))
    saliency = np.array([[0.0, 1.0, 0.0, 1.0]], np.float32)
    # scores: bg 1 - s = (1, 0, 1, 0); cues (0, 4/9, 8/9, 1) -> argmax (0, 1, 0, 1)
    assert wegformer_label(image, maps, keys, with_saliency, None, saliency).tolist() == [[0, 1, 0, 1]]


def test_saliency_needs_the_stored_background():
    with pytest.raises(ValueError, match="bg_threshold must be null"):
        RefineParams(bg_threshold=0.3, wegformer=WegformerParams(saliency="sal"))


def test_saliency_file_errors_name_the_file(tmp_path):
    with pytest.raises(DatasetError, match="is not a folder"):
        check_saliency_dir(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"saliency map missing: .*a\.png"):
        load_saliency(tmp_path, "a", (2, 3))
    Image.fromarray(np.full((2, 4), 255, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png is 4x2, its image 3x2"):
        load_saliency(tmp_path, "b", (2, 3))
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"unreadable: .*c\.png"):
        load_saliency(tmp_path, "c", (2, 3))
    assert np.allclose(load_saliency(tmp_path, "b", (2, 4)), 1.0)


def test_oracle_saliency_is_the_ground_truth_foreground(tmp_path):
    synthetic = SyntheticParams(num_train=3, num_val=2, image_size=32)
    data = prepare(DataParams(synthetic=synthetic), 0, tmp_path / "data")
    image_id = data.split("train")[0]
    saliency = oracle_saliency(data, image_id)
    assert saliency.dtype == np.float32 and set(np.unique(saliency)) <= {0.0, 1.0}
    assert np.array_equal(saliency == 1.0, data.load_mask(image_id) != 0)
    data.mask_path(image_id).unlink()
    with pytest.raises(DatasetError, match=f"oracle needs a ground-truth mask: {image_id} has none"):
        oracle_saliency(data, image_id)


def test_epom_cannot_fire_on_labels_thresholded_from_the_same_maps():
    """Background means every map <= t, and each class's median over its own pixels is > t: nothing to ignore."""
    rng = np.random.default_rng(0)
    maps = rng.random((3, 16, 16)).astype(np.float32)
    keys = np.array([0, 1, 2])
    labels = threshold_labels(maps, keys, 0.6)
    assert (labels == 0).any() and (labels != 0).any()
    assert np.array_equal(epom(labels, maps, keys, fg_threshold=0.5), labels)
