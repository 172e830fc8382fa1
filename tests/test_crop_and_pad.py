"""The three training crops share one crop-and-pad helper but draw and compute exactly as before.

Trained weights are a function of every random draw of the augmentation, so each caller is pinned against a
frozen copy of its implementation at d66d219 (below, ``_old_*``): same outputs to the bit, same generator
state afterwards (the same number of draws, in the same order), for images smaller than, equal to, larger
than and mixed against the crop size.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.datasets import crop_offsets, paste_crop, place_in_canvas
from pipeline.data.layout import IGNORE
from pipeline.data.seg_datasets import random_scale_flip_crop
from pipeline.train_aff import _crop

SHAPES = [(5, 7), (10, 10), (12, 15), (12, 4), (3, 30), (10, 13), (1, 1)]  # against crop size 10
SEEDS = range(12)


def _old_place_in_canvas(image, size, rng):
    _, h, w = image.shape

    def offsets(length):
        slack = abs(length - size)
        shift = int(rng.integers(0, slack + 1)) if rng is not None else 0
        return (shift, 0) if length > size else (0, shift)

    (sy, ty), (sx, tx) = offsets(h), offsets(w)
    ch, cw = min(h, size), min(w, size)
    canvas = torch.zeros(3, size, size)
    valid = torch.zeros(1, size, size)
    canvas[:, ty : ty + ch, tx : tx + cw] = image[:, sy : sy + ch, sx : sx + cw]
    valid[:, ty : ty + ch, tx : tx + cw] = 1.0
    return canvas, valid


def _old_random_scale_flip_crop(image, label, crop, scale_range, flip, rng):
    h, w = label.shape
    scale = rng.uniform(*scale_range)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
    if flip and rng.random() < 0.5:
        image, label = image[:, ::-1], label[:, ::-1]
    h, w = label.shape
    out_image = np.zeros((crop, crop, 3), np.uint8)
    out_label = np.full((crop, crop), IGNORE, np.uint8)
    sy, ty = (int(rng.integers(0, h - crop + 1)), 0) if h > crop else (0, int(rng.integers(0, crop - h + 1)))
    sx, tx = (int(rng.integers(0, w - crop + 1)), 0) if w > crop else (0, int(rng.integers(0, crop - w + 1)))
    ch, cw = min(h, crop), min(w, crop)
    out_image[ty : ty + ch, tx : tx + cw] = image[sy : sy + ch, sx : sx + cw]
    out_label[ty : ty + ch, tx : tx + cw] = label[sy : sy + ch, sx : sx + cw]
    return out_image, out_label


def _old_aff_crop(image, labels, size, flip, rng):
    h, w = labels.shape
    out_image = np.zeros((size, size, 3), np.uint8)
    out_labels = np.full((size, size), IGNORE, np.uint8)
    sy, sx = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
    ty, tx = int(rng.integers(0, max(size - h, 0) + 1)), int(rng.integers(0, max(size - w, 0) + 1))
    ch, cw = min(h, size), min(w, size)
    out_image[ty : ty + ch, tx : tx + cw] = image[sy : sy + ch, sx : sx + cw]
    out_labels[ty : ty + ch, tx : tx + cw] = labels[sy : sy + ch, sx : sx + cw]
    if flip and rng.random() < 0.5:
        out_image, out_labels = out_image[:, ::-1], out_labels[:, ::-1]
    return out_image, out_labels


def _image_and_label(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    source = np.random.default_rng(1000 + seed)
    return source.integers(0, 256, (h, w, 3), dtype=np.uint8), source.integers(0, 6, (h, w), dtype=np.uint8)


def _pair(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    return np.random.default_rng([seed, 3, 7]), np.random.default_rng([seed, 3, 7])


def _same_state(a: np.random.Generator, b: np.random.Generator) -> bool:
    return a.bit_generator.state == b.bit_generator.state


@pytest.mark.parametrize("shape", SHAPES)
def test_classification_canvas_is_unchanged(shape):
    image = torch.randn(3, *shape, generator=torch.Generator().manual_seed(sum(shape)))  # (3, H, W)
    for rng_new, rng_old in [_pair(seed) for seed in SEEDS] + [(None, None)]:
        canvas, valid = place_in_canvas(image, 10, rng_new)
        old_canvas, old_valid = _old_place_in_canvas(image, 10, rng_old)
        assert torch.equal(canvas, old_canvas) and torch.equal(valid, old_valid)
        assert canvas.dtype == valid.dtype == torch.float32 and canvas.is_contiguous() and valid.is_contiguous()
        assert rng_new is None or _same_state(rng_new, rng_old), "same number of draws"


NUMPY_CROPS = {  # caller -> (today's crop, frozen copy); arguments (image, label, flip, rng), crop size 10
    "train_seg": (
        lambda image, label, flip, rng: random_scale_flip_crop(image, label, 10, (0.7, 1.3), flip, rng),
        lambda image, label, flip, rng: _old_random_scale_flip_crop(image, label, 10, (0.7, 1.3), flip, rng),
    ),
    "train_aff": (
        lambda image, label, flip, rng: _crop(image, label, 10, flip, rng),
        lambda image, label, flip, rng: _old_aff_crop(image, label, 10, flip, rng),
    ),
}


@pytest.mark.parametrize("caller", sorted(NUMPY_CROPS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("flip", [True, False])
def test_segmentation_and_affinity_crops_are_unchanged(caller, shape, flip):
    new_crop, old_crop = NUMPY_CROPS[caller]
    for seed in SEEDS:
        image, label = _image_and_label(*shape, seed)
        rng_new, rng_old = _pair(seed)
        new, old = new_crop(image, label, flip, rng_new), old_crop(image, label, flip, rng_old)
        assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(new, old, strict=True))
        assert _same_state(rng_new, rng_old), "same draws, in the same order"


def test_crop_offsets_by_hand():
    assert crop_offsets(12, 10, None) == (0, 0) and crop_offsets(7, 10, None) == (0, 0)
    for seed in SEEDS:
        source, target = crop_offsets(12, 10, np.random.default_rng(seed))
        assert target == 0 and 0 <= source <= 2, "a longer axis is cropped"
        source, target = crop_offsets(7, 10, np.random.default_rng(seed))
        assert source == 0 and 0 <= target <= 3, "a shorter axis is padded"
    assert crop_offsets(10, 10, np.random.default_rng(0)) == (0, 0)


def test_paste_crop_by_hand():
    layer = np.arange(12, dtype=np.uint8).reshape(3, 4)  # rows 0..2, columns 0..3
    canvas = paste_crop(np.full((2, 5), IGNORE, np.uint8), layer, source=(1, 0), target=(0, 1))
    assert canvas.tolist() == [[IGNORE, 4, 5, 6, 7], [IGNORE, 8, 9, 10, 11]]
    tensor = torch.zeros(2, 2, 2)  # (C, H, W), filled through a rows-first view
    paste_crop(tensor.permute(1, 2, 0), torch.ones(3, 3, 2), (0, 0), (0, 0))
    assert torch.equal(tensor, torch.ones(2, 2, 2))
