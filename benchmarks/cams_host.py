"""``cams``' host time per VOC-sized image: everything its main process does besides the model's forward.

Per image, ``cams``' main process decodes the image (JPEG) and its mask (PNG), scores two maps (CAM and R-CAM)
with two seed evaluators (argmax + the threshold sweep) and hands the maps to the CAM store. This benchmark times
that on VOC-sized stand-ins, in one run, for the store as it was and as it is:

* ``float16, deflate 6, in turn``: the ``wsss-cams/1`` writer (float16 maps, ``np.savez_compressed`` in the
  main process at each shard's end);
* ``float16, deflate 1, background``: :class:`pipeline.io.CamWriter` (``cams.store: float16``, the default);
* ``uint8, deflate 1, background``: :class:`pipeline.io.CamWriter` with ``quantize`` (``cams.store: uint8``,
  the paper configs).

The maps stand in for a classifier's: per class a 24 x 32 grid of uniform noise resized (bilinear) to 375 x 500
and max-normalised, background ``1 - max`` for the CAM; 21 labels, two or three classes per image (a real
model's maps are smoother still, which helps deflate). The time is the main thread's, from the first image to
the end of the ``with`` block (the last shard's write included), per image; the background writer runs on
another core, as it does beside a GPU's forward. On a 2-core CPU the forward itself takes both cores, so this
is the host's share of a GPU run, not of a CPU one.

Prints each writer's ms per image, split into decode, seed evaluation and store, and the ratio to the first
(the issue asks for <= 1/3).

Usage: python benchmarks/cams_host.py [--images 200] [--shard-size 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.data.layout import read_rgb
from pipeline.io import CamWriter, atomic_path, load_label_png
from pipeline.metrics import SeedEvaluator, threshold_grid

HEIGHT, WIDTH, LABELS = 375, 500, 21


class SerialFloat16Writer:
    """The ``wsss-cams/1`` store's writer: float16 maps, each shard ``np.savez_compressed`` in the caller's thread."""

    def __init__(self, directory: Path, shard_size: int) -> None:
        self.directory, self.shard_size = directory, shard_size
        self.pending: dict[str, np.ndarray] = {}
        self.count = self.shards = 0

    def __enter__(self) -> SerialFloat16Writer:
        self.directory.mkdir(parents=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    def add(self, image_id: str, keys: np.ndarray, maps: dict[str, np.ndarray]) -> None:
        self.pending[f"{image_id}/keys"] = np.asarray(keys, dtype=np.int16)
        for name, array in maps.items():
            self.pending[f"{image_id}/{name}"] = np.asarray(array, dtype=np.float16)
        self.count += 1
        if self.count % self.shard_size == 0:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            with atomic_path(self.directory / f"shard-{self.shards:05d}.npz") as tmp, open(tmp, "wb") as handle:
                np.savez_compressed(handle, **self.pending)
            self.shards, self.pending = self.shards + 1, {}


WRITERS: dict[str, Callable[[Path, int], contextlib.AbstractContextManager]] = {
    "float16, deflate 6, in turn": SerialFloat16Writer,
    "float16, deflate 1, background": lambda d, n: CamWriter(d, n),
    "uint8, deflate 1, background": lambda d, n: CamWriter(d, n, quantize=True),
}


def stand_ins(count: int, folder: Path) -> list[tuple[Path, Path, np.ndarray, dict[str, np.ndarray]]]:
    """``count`` (JPEG path, mask PNG path, keys, float32 maps) at VOC's size, from seed 0."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    items = []
    for index in range(count):
        classes = np.sort(rng.choice(np.arange(1, LABELS), size=int(rng.integers(2, 4)), replace=False))
        keys = np.array([0, *classes])
        coarse = torch.rand(1, len(classes), 24, 32)  # (1, k, 24, 32)
        fg = F.interpolate(coarse, size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]  # (k, H, W)
        fg = (fg / fg.amax(dim=(1, 2), keepdim=True)).numpy()
        cam = np.concatenate([1 - fg.max(0, keepdims=True), fg])  # (K, H, W)
        rcam = np.concatenate([0.5 * np.ones_like(fg[:1]), fg**2])
        label = keys[cam.argmax(0)].astype(np.uint8)  # (H, W)
        image = (rng.random((HEIGHT // 8, WIDTH // 8, 3)) * 255).astype(np.uint8)
        jpeg, mask = folder / f"{index}.jpg", folder / f"{index}.png"
        Image.fromarray(image).resize((WIDTH, HEIGHT), Image.BILINEAR).save(jpeg, quality=90)
        Image.fromarray(label, mode="L").save(mask)
        items.append((jpeg, mask, keys, {"cam": cam.astype(np.float32), "rcam": rcam.astype(np.float32)}))
    return items


@contextlib.contextmanager
def timed(into: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    into[key] = into.get(key, 0.0) + time.perf_counter() - start


def host_pass(items: list, make_writer: Callable, directory: Path, shard_size: int) -> dict[str, float]:
    """One pass of the main process's host work over ``items``: seconds per part (decode, seeds, store)."""
    grid = threshold_grid(0.60, 0.01)
    evaluators = {"cam": SeedEvaluator(LABELS, grid), "rcam": SeedEvaluator(LABELS, grid)}
    parts: dict[str, float] = {}
    with timed(parts, "store"), make_writer(directory, shard_size) as writer:
        for index, (jpeg, mask, keys, maps) in enumerate(items):
            with timed(parts, "decode"):
                read_rgb(jpeg)
                gt = load_label_png(mask)
            with timed(parts, "seeds"):
                for name, evaluator in evaluators.items():
                    evaluator.add(maps[name], keys, gt)
            with timed(parts, "add"):
                writer.add(f"img{index}", keys, maps)
    parts["store"] -= parts["decode"] + parts["seeds"]  # the with block's time besides them: add + the last write
    del parts["add"]
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--shard-size", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="wsss-cams-host-") as tmp:
        items = stand_ins(args.images, Path(tmp))
        results: dict[str, list[dict[str, float]]] = {name: [] for name in WRITERS}
        for repeat in range(args.repeats):
            for k, (name, make) in enumerate(WRITERS.items()):
                results[name].append(host_pass(items, make, Path(tmp) / f"store-{repeat}-{k}", args.shard_size))
    n = args.images
    rows = {}
    for name, passes in results.items():
        totals = [sum(p.values()) for p in passes]
        median = passes[totals.index(statistics.median_low(totals))]
        rows[name] = {part: seconds / n * 1e3 for part, seconds in median.items()}
    base = sum(rows["float16, deflate 6, in turn"].values())
    print(f"{n} stand-in images of {WIDTH} x {HEIGHT}, {LABELS} labels, CAM + R-CAM, shards of {args.shard_size}, "
          f"median of {args.repeats} passes; ms per image of the main thread")  # fmt: skip
    print(f"{'store writer':32s} {'decode':>7s} {'seeds':>7s} {'store':>7s} {'total':>7s} {'x first':>8s}")
    for name, row in rows.items():
        total = sum(row.values())
        print(
            f"{name:32s} {row['decode']:7.1f} {row['seeds']:7.1f} {row['store']:7.1f} {total:7.1f} {total / base:8.2f}"
        )


if __name__ == "__main__":
    main()
