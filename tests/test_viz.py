"""Gallery layout: tile sizes, one CAM column per present class, the legend's names, the lowest-IoU picks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.metrics import image_miou
from pipeline.viz import (
    Panel,
    Picks,
    Row,
    Worst,
    cam_gallery_row,
    caption,
    fit_tile,
    gallery,
    label_gallery_row,
    legend_entries,
    pick_galleries,
)

NAMES = ["background", "cat", "dog", "car"]
PALETTE = [[0, 0, 0], [200, 0, 0], [0, 200, 0], [0, 0, 200]]
LINE, GAP = 20, 4  # gallery(): text line height and spacing


def _image(h=4, w=4):
    return np.full((h, w, 3), 100, np.uint8)


def test_label_tile_is_upscaled_by_nearest_neighbour_and_centred():
    label = np.array([[1, 2, 2, 3], [3, 2, 1, 1]], np.uint8)  # (H=2, W=4) -> 8 x 4 inside an 8 x 8 tile
    tile = np.asarray(fit_tile(label_gallery_row("", _image(), {"l": label}, PALETTE).panels[1], 8))
    assert tile.shape == (8, 8, 3)
    assert (tile[:2] == 255).all() and (tile[6:] == 255).all(), "white bands above and below"
    assert tile[2, 0].tolist() == PALETTE[1] and tile[3, 1].tolist() == PALETTE[1], "pixel (0, 0) -> 2 x 2 block"
    assert tile[2, 2].tolist() == PALETTE[2] and tile[5, 7].tolist() == PALETTE[1]
    colours = {tuple(c) for c in tile[2:6].reshape(-1, 3)}
    assert colours == {tuple(PALETTE[i]) for i in (1, 2, 3)}, "nearest neighbour: no blended colour"


def test_image_tile_is_downscaled_to_the_tile():
    tile = fit_tile(Panel("image", np.zeros((40, 20, 3), np.uint8)), 10)
    assert tile.size == (10, 10)
    assert np.asarray(tile)[:, :2].min() == 255 and np.asarray(tile)[:, 3:7].max() == 0, "20 x 40 -> 5 x 10, centred"


def test_cam_row_has_one_column_per_present_class_and_map():
    keys = np.array([0, 1, 3])
    maps = {"cam": np.random.rand(3, 4, 4), "rcam": np.random.rand(3, 4, 4)}
    gt = np.zeros((4, 4), np.uint8)
    row = cam_gallery_row("id", _image(), maps, keys, gt, NAMES, PALETTE)
    titles = [p.title for p in row.panels]
    assert titles == ["image", "CAM: cat", "CAM: car", "R-CAM: cat", "R-CAM: car", "ground truth"]
    v1 = cam_gallery_row("id", _image(), {"cam": maps["cam"]}, keys, gt, NAMES, PALETTE)
    assert len(v1.panels) == 1 + 2 + 1
    one_class = cam_gallery_row("id", _image(), {"cam": maps["cam"][:2]}, keys[:2], gt, NAMES, PALETTE)
    assert [p.title for p in one_class.panels] == ["image", "CAM: cat", "ground truth"]
    assert row.panels[-1].label is gt and row.panels[1].label is None, "only label maps are nearest-scaled"


def test_cam_panel_shows_that_class_channel():
    maps = {"cam": np.zeros((3, 2, 2), np.float32)}
    maps["cam"][2] = 1.0  # the second class fires everywhere, the first nowhere
    row = cam_gallery_row(
        "", np.zeros((2, 2, 3), np.uint8), maps, np.array([0, 1, 2]), np.zeros((2, 2), np.uint8), NAMES, PALETTE
    )
    assert row.panels[1].pixels[..., 2].min() > 0 and row.panels[1].pixels[..., 0].max() == 0, "cat: blue (score 0)"
    assert row.panels[2].pixels[..., 0].min() > 100, "dog: red (score 1)"


def test_legend_names_the_classes_of_the_label_panels():
    rows = [
        label_gallery_row("a", _image(2, 2), {"gt": np.array([[0, 2], [255, 2]], np.uint8)}, PALETTE),
        label_gallery_row("b", _image(2, 2), {"gt": np.array([[0, 0], [0, 1]], np.uint8)}, PALETTE),
    ]
    entries = legend_entries(rows, NAMES, PALETTE)
    assert entries == [("background", (0, 0, 0)), ("cat", (200, 0, 0)), ("dog", (0, 200, 0)), ("ignore", (255,) * 3)]
    assert legend_entries([Row("c", [Panel("image", _image())])], NAMES, PALETTE) == []


def test_gallery_size_header_and_legend_swatches():
    tile = 10
    rows = [label_gallery_row(f"r{i}", _image(), {"pseudo": np.full((4, 4), 3, np.uint8)}, PALETTE) for i in range(3)]
    picture = gallery("title", rows, NAMES, PALETTE, tile=tile)
    # shared column titles: title line + header line, 3 x (caption line + tile + gap), one legend line, gap
    assert picture.shape == (2 * LINE + 3 * (LINE + tile + GAP) + LINE + GAP, 2 * (tile + GAP) + GAP, 3)
    first_tile = picture[3 * LINE : 3 * LINE + tile, 2 * GAP + tile : 2 * GAP + 2 * tile]
    assert (first_tile == PALETTE[3]).all(), "row 1, column 2: the label map in its palette colour"
    legend_y = 2 * LINE + 3 * (LINE + tile + GAP)
    assert picture[legend_y + 10, GAP + 7].tolist() == PALETTE[3], "the legend's swatch for 'car'"


def test_rows_with_different_columns_title_every_panel():
    tile = 10
    keys = np.array([0, 1])
    two = np.array([0, 1, 2])
    rows = [
        cam_gallery_row("a", _image(), {"cam": np.zeros((2, 4, 4))}, keys, np.zeros((4, 4), np.uint8), NAMES, PALETTE),
        cam_gallery_row("b", _image(), {"cam": np.zeros((3, 4, 4))}, two, np.zeros((4, 4), np.uint8), NAMES, PALETTE),
    ]
    picture = gallery("t", rows, NAMES, PALETTE, tile=tile)
    # no shared header: a title line per row; 4 columns (the longer row); legend: background only
    assert picture.shape == (LINE + 2 * (2 * LINE + tile + GAP) + LINE + GAP, 4 * (tile + GAP) + GAP, 3)
    row_a = picture[LINE + 2 * LINE :][:tile]
    assert (row_a[:, 3 * (tile + GAP) + GAP :][:, :tile] == 255).all(), "row a has 3 panels: the 4th stays blank"


def test_worst_keeps_the_lowest_scores_earlier_first_on_ties():
    worst = Worst(3)
    for score, item in zip([0.5, 0.2, 0.9, 0.2, 0.1], "abcde", strict=True):
        worst.add(score, item)
    assert worst.items() == [(0.1, "e"), (0.2, "b"), (0.2, "d")]
    worst = Worst(2)
    for score, item in zip([0.2, 0.2, 0.2], "abc", strict=True):
        worst.add(score, item)
    assert worst.items() == [(0.2, "a"), (0.2, "b")]
    assert Worst(0).items() == [] and Worst(2).items() == []


def test_picks_first_n_and_lowest_iou_and_skip_unscored():
    picks = Picks(2)
    for iou, item in [(0.9, "a"), (math.nan, "b"), (0.3, "c"), (0.6, "d"), (0.1, "e")]:
        picks.add(iou, item)
    assert [item for _, item in picks.first] == ["a", "b"]
    assert picks.worst.items() == [(0.1, "e"), (0.3, "c")]


def test_pick_galleries_writes_both_pictures_only_when_there_are_images():
    picks = Picks(2)
    for i, iou in enumerate([0.8, 0.4, 0.2]):
        picks.add(iou, i)

    def draw(iou, item):
        return label_gallery_row(caption(f"id{item}", "x", iou), _image(), {"l": np.zeros((4, 4), np.uint8)}, PALETTE)

    pictures = pick_galleries(picks, draw, "t", NAMES, PALETTE, prefix="p_")
    assert sorted(pictures) == ["p_failures.png", "p_gallery.png"]
    assert pictures["p_gallery.png"].shape == pictures["p_failures.png"].shape
    assert pick_galleries(Picks(0), draw, "t", NAMES, PALETTE) == {}
    assert caption("id3", "DeepLab", 0.4567) == "id3   DeepLab IoU 0.46"
    assert caption("id3", "DeepLab", math.nan) == "id3   not scored"


def test_image_miou_by_hand():
    pred = np.array([[0, 1], [1, 1]])
    gt = np.array([[0, 1], [0, 255]])
    # kept pixels: 3; class 0: TP 1, GT 2, pred 1 -> 1/2; class 1: TP 1, GT 1, pred 2 -> 1/2
    assert image_miou(pred, gt, 4) == pytest.approx(0.5)
    assert image_miou(gt.clip(0, 1), gt, 4) == pytest.approx(1.0)
    assert math.isnan(image_miou(pred, np.full((2, 2), 255), 4))
    # a pseudo label's 255 pixels are not scored either: only (0, 0) and (1, 1) remain -> class 0: 1, class 1: 1
    assert image_miou(np.array([[0, 255], [255, 1]]), np.array([[0, 0], [1, 1]]), 4) == pytest.approx(1.0)
