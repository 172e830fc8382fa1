import numpy as np
import pytest
import torch
from torch.testing import assert_close

from pipeline.config import DataParams, SyntheticParams
from pipeline.data.datasets import (
    ClassificationEvalSet,
    ClassificationTrainSet,
    normalize,
    place_in_canvas,
    resize_long,
)
from pipeline.data.layout import PreparedDataset
from pipeline.prepare import prepare, prepare_synthetic

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    params = DataParams(synthetic=SyntheticParams(num_train=6, num_val=3, image_size=48))
    return prepare_synthetic(params, seed=0, out=tmp_path_factory.mktemp("data") / "prep")


def test_a_fixed_benchmark_seed_keeps_the_images_whatever_the_global_seed(tmp_path):
    def images(global_seed: int, benchmark_seed: int | None) -> list[np.ndarray]:
        spec = SyntheticParams(seed=benchmark_seed, num_train=2, num_val=1, image_size=32)
        data = prepare(DataParams(synthetic=spec), global_seed, tmp_path / f"{global_seed}_{benchmark_seed}")
        return [data.load_image(image_id) for image_id in data.split("train")]

    fixed = images(1, 7)
    assert all(np.array_equal(a, b) for a, b in zip(fixed, images(2, 7), strict=True))
    assert all(np.array_equal(a, b) for a, b in zip(fixed, images(7, None), strict=True)), "7 = the global seed 7"
    assert not np.array_equal(images(1, None)[0], images(2, None)[0]), "null: the global seed picks the images"


def train_set(prepared, seed: int = 0, **update) -> ClassificationTrainSet:
    options = {"crop_size": 32, "resize_long": (24, 40), "flip": True, "color_jitter": 0.2, **update}
    return ClassificationTrainSet(prepared, "train", mean=MEAN, std=STD, seed=seed, **options)


def numbered(h: int, w: int) -> torch.Tensor:
    return 1.0 + torch.arange(3 * h * w, dtype=torch.float32).reshape(3, h, w)


def test_normalize():
    image = np.full((2, 3, 3), 255, np.uint8)
    x = normalize(image, MEAN, STD)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert_close(x[:, 0, 0], (1 - torch.tensor(MEAN)) / torch.tensor(STD))


def test_resize_long_keeps_aspect():
    from PIL import Image

    image = Image.new("RGB", (40, 20))
    assert resize_long(image, 30).size == (30, 15)
    assert resize_long(Image.new("RGB", (10, 50)), 25).size == (5, 25)


def test_place_in_canvas_pads_top_left():
    image = numbered(5, 7)
    canvas, valid = place_in_canvas(image, 10, None)
    assert canvas.shape == (3, 10, 10) and valid.shape == (1, 10, 10)
    assert_close(canvas[:, :5, :7], image)
    assert canvas.sum() == image.sum()
    assert valid.sum() == 35
    assert torch.all(valid[0, :5, :7] == 1)


def test_place_in_canvas_pads_at_random_offset():
    image = numbered(5, 7)
    for seed in range(5):
        canvas, valid = place_in_canvas(image, 10, np.random.default_rng(seed))
        rows, cols = torch.nonzero(valid[0], as_tuple=True)
        top, left = rows.min().item(), cols.min().item()
        assert valid.sum() == 35
        assert rows.max().item() - top == 4 and cols.max().item() - left == 6
        assert_close(canvas[:, top : top + 5, left : left + 7], image)
        assert torch.all(canvas[:, valid[0] == 0] == 0)


def test_place_in_canvas_crops_larger_image():
    image = numbered(12, 15)
    canvas, valid = place_in_canvas(image, 10, None)
    assert_close(canvas, image[:, :10, :10])
    assert torch.all(valid == 1)
    canvas, valid = place_in_canvas(image, 10, np.random.default_rng(3))
    assert torch.all(valid == 1)
    hits = [(y, x) for y in range(3) for x in range(6) if torch.equal(canvas, image[:, y : y + 10, x : x + 10])]
    assert len(hits) == 1


def test_place_in_canvas_mixed():
    image = numbered(12, 4)  # taller, narrower
    canvas, valid = place_in_canvas(image, 8, None)
    assert_close(canvas[:, :, :4], image[:, :8])
    assert valid.sum() == 32
    assert torch.all(canvas[:, :, 4:] == 0)


def test_train_sample_shapes(prepared):
    dataset = train_set(prepared)
    assert len(dataset) == 6
    sample = dataset[0]
    assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.float32
    assert sample["valid"].shape == (1, 32, 32)
    labels = sample["labels"]
    assert labels.shape == (prepared.num_classes - 1,) and labels.dtype == torch.float32
    expected = np.zeros(prepared.num_classes - 1, np.float32)
    expected[np.array(prepared.labels[dataset.ids[0]]) - 1] = 1
    np.testing.assert_array_equal(labels.numpy(), expected)
    assert labels.sum() >= 1


def test_train_sample_is_pure_function_of_seed_epoch_index(prepared):
    dataset = train_set(prepared)
    first = dataset[2]
    _ = dataset[1]
    again = dataset[2]
    fresh = train_set(prepared)[2]
    for key in ("image", "valid", "labels"):
        assert torch.equal(first[key], again[key])
        assert torch.equal(first[key], fresh[key])


def test_cached_train_set_decodes_once_and_gives_the_same_samples(prepared, monkeypatch):
    cached = train_set(prepared, cache=True)
    assert sorted(cached.cached) == sorted(prepared.split("train"))

    def no_disk(self, image_id):
        raise AssertionError(f"read {image_id} from disk")

    monkeypatch.setattr(PreparedDataset, "load_image", no_disk)
    samples = [cached[i] for i in range(len(cached))]
    monkeypatch.undo()
    plain = train_set(prepared)
    for index, sample in enumerate(samples):
        expected = plain[index]
        for key in ("image", "valid", "labels"):
            assert torch.equal(sample[key], expected[key])


def test_train_sample_changes_with_epoch_and_seed(prepared):
    dataset = train_set(prepared)
    first = dataset[2]["image"]
    dataset.epoch = 1
    assert not torch.equal(first, dataset[2]["image"])
    dataset.epoch = 0
    assert torch.equal(first, dataset[2]["image"])
    assert not torch.equal(first, train_set(prepared, seed=1)[2]["image"])


def test_train_sample_valid_mask_marks_image(prepared):
    dataset = train_set(prepared, resize_long=(20, 20), flip=False, color_jitter=0.0)
    sample = dataset[0]
    assert sample["valid"].sum() == 20 * 20  # 48x48 resized to 20x20, padded into 32x32
    assert torch.all(sample["image"][:, sample["valid"][0] == 0] == 0)


def test_eval_set(prepared):
    dataset = ClassificationEvalSet(prepared, "val", 32, MEAN, STD)
    assert len(dataset) == 3
    sample = dataset[1]
    assert sample["image"].shape == (3, 32, 32)
    assert torch.all(sample["valid"] == 1)  # square images fill the canvas
    assert torch.equal(sample["image"], dataset[1]["image"])


def test_prepare_synthetic_does_not_depend_on_the_number_of_processes(prepared, tmp_path, monkeypatch):
    import pipeline.prepare as prepare_module

    monkeypatch.setattr(prepare_module, "resolve_workers", lambda workers: 1)
    params = DataParams(synthetic=SyntheticParams(num_train=6, num_val=3, image_size=48))
    serial = prepare_synthetic(params, seed=0, out=tmp_path / "serial")
    assert serial.labels == prepared.labels
    for image_id in serial.split("train") + serial.split("val"):
        assert np.array_equal(serial.load_image(image_id), prepared.load_image(image_id))
        assert np.array_equal(serial.load_mask(image_id), prepared.load_mask(image_id))
