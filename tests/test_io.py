import os
import stat

import numpy as np
import pytest
from PIL import Image

from pipeline import io as io_module
from pipeline.data.layout import voc_palette
from pipeline.io import (
    CamStore,
    CamWriter,
    atomic_path,
    dequantize_maps,
    grow_maps,
    load_label_png,
    quantize_maps,
    read_json,
    save_image_png,
    save_label_png,
    shrink_maps,
    write_json,
)


def test_atomic_path_success_replaces_destination(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with atomic_path(dest) as tmp:
        assert tmp != dest
        assert tmp.parent == dest.parent
        tmp.write_text("new")
        assert dest.read_text() == "old"
    assert dest.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_failure_leaves_destination_and_no_temp(tmp_path):
    dest = tmp_path / "out.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_failure_without_previous_file(tmp_path):
    dest = tmp_path / "sub" / "new.bin"
    with pytest.raises(ValueError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"x")
            raise ValueError
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_atomic_path_file_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644


def test_json_round_trip(tmp_path):
    data = {"a": [1, 2.5, None], "b": {"c": "text"}, "ü": True}
    path = tmp_path / "deep" / "dir" / "x.json"
    write_json(path, data)
    assert read_json(path) == data
    assert path.read_text().endswith("\n")


def test_label_png_round_trip(tmp_path):
    label = np.array([[0, 1, 2, 255], [6, 5, 4, 3], [255, 255, 0, 1]], dtype=np.uint8)
    path = tmp_path / "label.png"
    save_label_png(path, label, voc_palette())
    with Image.open(path) as image:
        assert image.mode == "P"
        palette = image.getpalette()
    assert palette[3:6] == [128, 0, 0]
    assert palette[255 * 3 : 256 * 3] == [224, 224, 192]
    loaded = load_label_png(path)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, label)


def test_label_png_short_palette(tmp_path):
    label = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    path = tmp_path / "label.png"
    save_label_png(path, label, [(0, 0, 0), (128, 0, 0), (0, 128, 0)])
    np.testing.assert_array_equal(load_label_png(path), label)


def test_load_label_png_refuses_rgb(tmp_path):
    path = tmp_path / "rgb.png"
    save_image_png(path, np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="rgb.png"):
        load_label_png(path)


def make_maps(rng: np.random.Generator, num_keys: int) -> dict[str, np.ndarray]:
    return {"cam": rng.random((num_keys, 5, 6)).astype(np.float32), "rcam": rng.random((num_keys, 5, 6))}


@pytest.mark.parametrize("quantize", [False, True])
def test_cam_store_round_trip_across_shards(tmp_path, quantize):
    rng = np.random.default_rng(0)
    written = {}
    with CamWriter(tmp_path / "cams", shard_size=2, quantize=quantize) as writer:
        for i in range(5):
            keys = np.array([0, 1 + i % 3, 4 + i % 2])[: 2 + i % 2]
            maps = make_maps(rng, len(keys))
            writer.add(f"img_{i}", keys, maps)
            written[f"img_{i}"] = (keys, maps)
    assert len(list((tmp_path / "cams").glob("shard-*.npz"))) == 3
    assert not [p for p in (tmp_path / "cams").iterdir() if p.name.startswith(".")]

    store = CamStore(tmp_path / "cams")
    assert store.ids == [f"img_{i}" for i in range(5)]
    for image_id in ["img_4", "img_0", "img_3", "img_1", "img_2", "img_0"]:
        keys, maps = written[image_id]
        loaded = store.load(image_id)
        assert set(loaded) == {"keys", "cam", "rcam"}
        assert loaded["keys"].dtype.kind == "i"
        np.testing.assert_array_equal(loaded["keys"], keys)
        for name in ("cam", "rcam"):
            if quantize:
                assert loaded[name].dtype == np.float32
                np.testing.assert_allclose(loaded[name], maps[name], rtol=0, atol=1 / 510 + 1e-6)  # 8 bits, [0, 1)
            else:
                assert loaded[name].dtype == np.float16
                np.testing.assert_array_equal(loaded[name], maps[name].astype(np.float16))
    assert read_json(tmp_path / "cams/index.json")["format"] == "wsss-cams/3"


def test_shrink_and_grow_maps_hand_case():
    maps = np.arange(20, dtype=np.float32).reshape(1, 4, 5)  # (1, 4, 5): rows 0-4, 5-9, 10-14, 15-19
    assert shrink_maps(maps, 1) is maps
    small = shrink_maps(maps, 2)  # (1, 2, 3): ceil(4 / 2), ceil(5 / 2); adaptive bins of columns {0,1} {2} {3,4}
    assert small.shape == (1, 2, 3)
    assert small[0, 0].tolist() == [3.0, 4.5, 6.0]  # mean of rows 0-1 over columns 0-1 = (0+1+5+6) / 4
    grown = grow_maps(np.array([[[1.0, 3.0]]]), (1, 4))  # bilinear, half-pixel centres: 1, 1.5, 2.5, 3
    assert grown.tolist() == [[[1.0, 1.5, 2.5, 3.0]]]


@pytest.mark.parametrize("quantize", [False, True])
def test_a_strided_store_reads_back_at_the_image_size(tmp_path, quantize):
    yy, xx = np.mgrid[0:12, 0:10]  # smooth maps: a stride of 2 loses little
    cam = np.stack([yy / 11, xx / 9, (yy + xx) / 19]).astype(np.float32)  # (3, 12, 10)
    with CamWriter(tmp_path / "cams", shard_size=2, quantize=quantize, stride=2) as writer:
        writer.add("a", np.array([0, 3, 7]), {"cam": cam, "rcam": 1 - cam})
    with np.load(next((tmp_path / "cams").glob("*.npz"))) as archive:
        assert archive["a/cam"].shape == (3, 6, 5) and archive["a/size"].tolist() == [12, 10]
    loaded = CamStore(tmp_path / "cams").load("a")
    assert set(loaded) == {"keys", "cam", "rcam"}
    for name, full in (("cam", cam), ("rcam", 1 - cam)):
        assert loaded[name].shape == (3, 12, 10) and loaded[name].dtype == np.float32
        interior = np.abs(loaded[name] - full)[:, 1:-1, 1:-1]  # linear maps come back exactly away from the border
        assert interior.max() <= (2 / 510 if quantize else 1e-3) + 1e-6


def test_quantized_maps_hand_case():
    maps = np.array([[[0.0, 0.6], [1.0, 0.25]], [[2.0, 2.0], [2.0, 2.0]], [[-1.0, 1.0], [0.5, 0.002]]])  # (3, 2, 2)
    codes, bounds = quantize_maps(maps)
    assert codes.dtype == np.uint8 and bounds.dtype == np.float32
    assert codes[0].tolist() == [[0, 153], [255, 64]]  # 0.6 * 255 = 153, 0.25 * 255 = 63.75
    assert codes[1].tolist() == [[0, 0], [0, 0]] and bounds[1].tolist() == [2.0, 2.0]  # constant: exact
    assert codes[2].tolist() == [[0, 255], [191, 128]] and bounds[2].tolist() == [-1.0, 1.0]  # 1.5 / (2 / 255)
    back = dequantize_maps(codes, bounds)
    assert back[1].tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert np.abs(back - maps).max() <= 2 / 510 + 1e-6  # half a step of the widest range


def test_a_format_1_store_still_reads(tmp_path):
    (tmp_path / "cams").mkdir()
    maps = np.random.default_rng(0).random((2, 3, 4)).astype(np.float16)
    np.savez_compressed(tmp_path / "cams/shard-00000.npz", **{"a/keys": np.array([0, 1], np.int16), "a/cam": maps})
    write_json(tmp_path / "cams/index.json", {"format": "wsss-cams/1", "images": {"a": "shard-00000.npz"}})
    loaded = CamStore(tmp_path / "cams").load("a")
    assert loaded["cam"].dtype == np.float16 and (loaded["cam"] == maps).all()


def test_a_failed_shard_write_leaves_the_old_store(tmp_path, monkeypatch):
    # shards are written in a background thread: its error reaches the caller, and the old store stays whole
    with CamWriter(tmp_path / "cams", shard_size=1) as writer:
        writer.add("old", np.array([0]), {"cam": np.ones((1, 2, 2))})
    real, calls = io_module.write_npz, []

    def disk_full_on_the_second_shard(path, arrays, compresslevel):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, arrays, compresslevel)

    monkeypatch.setattr(io_module, "write_npz", disk_full_on_the_second_shard)
    with pytest.raises(OSError, match="No space left"):
        with CamWriter(tmp_path / "cams", shard_size=1) as writer:
            for i in range(4):
                writer.add(f"new{i}", np.array([0]), {"cam": np.zeros((1, 2, 2))})
    assert 2 <= len(calls) <= 3, "the writer stops at the failed shard (one more may have been handed over)"
    assert CamStore(tmp_path / "cams").ids == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cams"], "no staging directory or temporary left"


def test_cam_writer_single_shard_when_small(tmp_path):
    with CamWriter(tmp_path, shard_size=10) as writer:
        writer.add("a", np.array([0]), {"cam": np.ones((1, 2, 2))})
    assert [p.name for p in tmp_path.glob("*.npz")] == ["shard-00000.npz"]
    assert read_json(tmp_path / "index.json")["images"] == {"a": "shard-00000.npz"}


def test_cam_writer_rejects_duplicate_ids(tmp_path):
    with CamWriter(tmp_path / "cams", shard_size=2) as writer:
        maps = {"cam": np.zeros((2, 2, 2))}
        writer.add("a", np.array([0, 1]), maps)
        with pytest.raises(ValueError, match="'a'"):
            writer.add("a", np.array([0, 1]), maps)  # still pending
        writer.add("b", np.array([0, 1]), maps)  # flushes the shard
        with pytest.raises(ValueError, match="'a'"):
            writer.add("a", np.array([0, 1]), maps)  # already in a shard
        with pytest.raises(ValueError):
            writer.add("x/y", np.array([0, 1]), maps)


def test_cam_store_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="index.json"):
        CamStore(tmp_path / "missing")
