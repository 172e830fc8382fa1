"""The one image reader (data/layout.py): every failure is one DatasetError line that names the file."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.data.layout import open_image, read_rgb
from pipeline.data.raw import image_size, read_mask
from pipeline.errors import DatasetError


def test_read_rgb_converts_to_uint8_rgb(tmp_path):
    Image.fromarray(np.full((3, 4), 7, np.uint8)).save(tmp_path / "grey.png")
    image = read_rgb(tmp_path / "grey.png")
    assert image.shape == (3, 4, 3) and image.dtype == np.uint8 and (image == 7).all()


def test_missing_corrupt_and_truncated_files_are_one_line_each(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg")
    whole = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header and half the pixels
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG not really")
    cases = {
        "missing.png": f"^image not found: {tmp_path / 'missing.png'}$",
        "garbage.png": f"^cannot read image {tmp_path / 'garbage.png'}: ",
        "truncated.jpg": f"^cannot read image {tmp_path / 'truncated.jpg'}: ",  # fails while decoding
    }
    for name, message in cases.items():
        with pytest.raises(DatasetError, match=message) as info:
            read_rgb(tmp_path / name)
        assert "\n" not in str(info.value)
    assert image_size(tmp_path / "truncated.jpg") == (64, 64), "the header alone gives the size"
    with pytest.raises(DatasetError, match="^cannot read image .*garbage.png: "):
        image_size(tmp_path / "garbage.png")


def test_a_check_inside_the_block_passes_through(tmp_path):
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match="is a RGB image; expected class indices"):
        read_mask(tmp_path / "rgb.png", 3)
    with pytest.raises(DatasetError, match=f"^mask not found: {tmp_path / 'none.png'}$"):
        read_mask(tmp_path / "none.png", 3)
    with pytest.raises(KeyError), open_image(tmp_path / "rgb.png"):
        raise KeyError("not an image error")
