import numpy as np

from pipeline.config import SyntheticParams
from pipeline.data.layout import voc_palette
from pipeline.data.synthetic import (
    BODY_PALETTE,
    CLASSES,
    MIN_BODY_CONTRAST,
    TEXTURES,
    _texture,
    class_names,
    generate_sample,
)

SPEC = SyntheticParams(image_size=48)
ALLOWED = set(range(len(CLASSES) + 1)) | {255}


def test_sample_shapes_and_types():
    image, mask, labels = generate_sample(0, 0, SPEC)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8
    assert all(isinstance(k, int) for k in labels)


def test_same_index_and_seed_is_deterministic():
    a = generate_sample(5, 3, SPEC)
    b = generate_sample(5, 3, SPEC)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]


def test_other_seed_or_index_differs():
    image, _, _ = generate_sample(5, 3, SPEC)
    assert not np.array_equal(image, generate_sample(5, 4, SPEC)[0])
    assert not np.array_equal(image, generate_sample(6, 3, SPEC)[0])


def test_mask_values_and_labels_agree():
    seen = set()
    for index in range(20):
        _, mask, labels = generate_sample(index, 0, SPEC)
        values = set(np.unique(mask).tolist())
        assert values <= ALLOWED
        assert labels == sorted(values - {0, 255})
        assert 1 <= len(labels) <= SPEC.max_classes_per_image
        seen.update(labels)
    assert len(seen) >= 3  # several classes show up


def test_barely_visible_objects_are_ignored_not_labelled():
    strict = SPEC.model_copy(update={"min_visible_pixels": 200})
    dropped_any = False
    for index in range(30):
        image, mask, labels = generate_sample(index, 0, SPEC)
        strict_image, strict_mask, strict_labels = generate_sample(index, 0, strict)
        np.testing.assert_array_equal(image, strict_image)
        assert set(strict_labels) <= set(labels)
        assert strict_labels == sorted(set(np.unique(strict_mask).tolist()) - {0, 255})
        for cls in set(labels) - set(strict_labels):
            dropped_any = True
            assert np.all(strict_mask[mask == cls] == 255)
    assert dropped_any


def test_boundary_band_separates_regions():
    for index in range(10):
        _, mask, labels = generate_sample(index, 0, SPEC)
        assert labels and (mask == 255).any()
        # with a band of width >= 1, two 4-adjacent scored pixels never carry different labels
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            scored = (a != 255) & (b != 255)
            assert np.all(a[scored] == b[scored])


def test_band_width_only_changes_ignore_pixels():
    wide = SPEC.model_copy(update={"boundary_width": 2})
    no_band = SPEC.model_copy(update={"boundary_width": 0})
    _, mask, _ = generate_sample(1, 0, SPEC)
    _, mask_wide, _ = generate_sample(1, 0, wide)
    _, mask_none, _ = generate_sample(1, 0, no_band)
    assert (mask_none == 255).sum() < (mask == 255).sum() < (mask_wide == 255).sum()
    for narrower, wider in ((mask_none, mask), (mask, mask_wide)):
        kept = wider != 255
        np.testing.assert_array_equal(wider[kept], narrower[kept])


def test_voc_palette():
    palette = voc_palette(256)
    assert len(palette) == 256
    assert palette[0] == (0, 0, 0)
    assert palette[1] == (128, 0, 0)
    assert palette[2] == (0, 128, 0)
    assert palette[3] == (128, 128, 0)
    assert palette[255] == (224, 224, 192)
    assert voc_palette(7) == palette[:7]


def test_class_names():
    names = class_names()
    assert names[0] == "background"
    assert len(names) == len(CLASSES) + 1
    assert len(set(names)) == len(names)


def test_typical_body_colour_stands_out_from_the_usual_background():
    # a camouflaged body on its own context leaves the class only its mark (beetle on grass: seed IoU 0.10)
    for cls in CLASSES:
        texture = _texture(TEXTURES[cls.context], 96, np.random.default_rng(0))
        contrast = np.linalg.norm(BODY_PALETTE - texture.reshape(-1, 3).mean(0), axis=1)  # (palette,)
        assert contrast[cls.body_color] > max(MIN_BODY_CONTRAST, np.median(contrast)), (cls.name, contrast)
