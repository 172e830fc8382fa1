"""Torch datasets over a prepared dataset: augmented crops for training, letterboxed images for evaluation.

Augmentation randomness comes from ``numpy.random.default_rng([seed, epoch, index])``, so a sample is a
pure function of (seed, epoch, index): a resumed run sees exactly the crops an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.data.layout import PreparedDataset

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
T = TypeVar("T")


def normalize(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 normalised tensor."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def resize_long(image: Image.Image, long_side: int) -> Image.Image:
    """Resize so that the longer side is ``long_side`` (bicubic), keeping the aspect ratio."""
    w, h = image.size
    scale = long_side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def crop_offsets(length: int, size: int, rng: np.random.Generator | None) -> tuple[int, int]:
    """Where one axis of ``length`` pixels goes into a crop of ``size``: ``(source start, target start)``.

    A longer axis is cropped (the source window moves), a shorter one is padded (the image moves inside the
    canvas). One draw from ``rng`` in ``[0, |length - size|]`` picks the shift; without ``rng`` it is 0.
    """
    slack = abs(length - size)
    shift = int(rng.integers(0, slack + 1)) if rng is not None else 0
    return (shift, 0) if length > size else (0, shift)


def paste_crop(canvas: ArrayT, layer: ArrayT, source: tuple[int, int], target: tuple[int, int]) -> ArrayT:
    """Crop-and-pad: copy the window of ``layer`` that fits into ``canvas``, in place.

    ``canvas[ty : ty + ch, tx : tx + cw] = layer[sy : sy + ch, sx : sx + cw]`` with ``ch, cw`` the smaller of
    the two heights and widths; the rest of ``canvas`` keeps its fill (the padding). Both are indexed rows
    first: (H, W) or (H, W, C) arrays, or ``permute(1, 2, 0)`` views of (C, H, W) tensors (which write through).

    Args:
        canvas: (S, S[, C]) output, already filled with the padding value.
        layer: (H, W[, C]) image or label map.
        source: ``(sy, sx)``, top-left of the window in ``layer``.
        target: ``(ty, tx)``, top-left of the window in ``canvas``.

    Returns:
        ``canvas``.
    """
    (sy, sx), (ty, tx) = source, target
    ch, cw = min(layer.shape[0], canvas.shape[0]), min(layer.shape[1], canvas.shape[1])
    canvas[ty : ty + ch, tx : tx + cw] = layer[sy : sy + ch, sx : sx + cw]
    return canvas


def place_in_canvas(
    image: torch.Tensor, size: int, rng: np.random.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop or pad a (3, H, W) tensor to (3, size, size); zeros fill the padding.

    Args:
        image: Normalised image.
        size: Output side.
        rng: Random offsets if given (one draw per axis, rows first), else top-left placement.

    Returns:
        ``(canvas, valid)`` with ``valid`` a (1, size, size) float mask of real-image pixels.
    """
    _, h, w = image.shape
    (sy, ty), (sx, tx) = crop_offsets(h, size, rng), crop_offsets(w, size, rng)
    canvas = torch.zeros(3, size, size)
    valid = torch.zeros(1, size, size)
    paste_crop(canvas.permute(1, 2, 0), image.permute(1, 2, 0), (sy, sx), (ty, tx))  # (size, size, 3) views
    paste_crop(valid[0], torch.ones(h, w), (sy, sx), (ty, tx))  # (size, size)
    return canvas, valid


class ClassificationTrainSet(Dataset):
    """Random-resize / flip / crop samples with image-level labels (SIPE-style augmentation).

    Args:
        data: Prepared dataset.
        split: Split name.
        crop_size: Output side.
        resize_long: Range [min, max] of the random long-side resize.
        flip: Random horizontal flip.
        color_jitter: Strength of brightness/contrast/saturation jitter (0 = off).
        mean: Normalisation mean.
        std: Normalisation std.
        seed: Global seed.
        cache: Decode every image once, here, and keep it in memory (DataLoader workers forked later share it).
    """

    def __init__(
        self,
        data: PreparedDataset,
        split: str,
        crop_size: int,
        resize_long: tuple[int, int],
        flip: bool,
        color_jitter: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
        cache: bool = False,
    ) -> None:
        self.data = data
        self.ids = data.split(split)
        self.crop_size = crop_size
        self.resize_long = resize_long
        self.flip = flip
        self.color_jitter = color_jitter
        self.mean, self.std = mean, std
        self.seed = seed
        self.epoch = 0
        decode = tqdm(self.ids, desc=f"decode {split}", disable=None) if cache else []
        self.cached = {image_id: data.load_image(image_id) for image_id in decode}

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_id = self.ids[index]
        decoded = self.cached[image_id] if self.cached else self.data.load_image(image_id)
        image = resize_long(Image.fromarray(decoded), int(rng.integers(self.resize_long[0], self.resize_long[1] + 1)))
        if self.color_jitter > 0:
            b, c, s = 1.0 + rng.uniform(-self.color_jitter, self.color_jitter, 3)
            for enhancer, factor in ((ImageEnhance.Brightness, b), (ImageEnhance.Contrast, c), (ImageEnhance.Color, s)):
                image = enhancer(image).enhance(factor)
        if self.flip and rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        canvas, valid = place_in_canvas(normalize(np.asarray(image), self.mean, self.std), self.crop_size, rng)
        return {"image": canvas, "valid": valid, "labels": torch.from_numpy(self.data.label_vector(image_id))}


class ClassificationEvalSet(Dataset):
    """Whole images resized so the long side is ``size`` and padded to a square (for batched evaluation)."""

    def __init__(
        self, data: PreparedDataset, split: str, size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        self.data = data
        self.ids = data.split(split)
        self.size = size
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image_id = self.ids[index]
        image = resize_long(Image.fromarray(self.data.load_image(image_id)), self.size)
        canvas, valid = place_in_canvas(normalize(np.asarray(image), self.mean, self.std), self.size, None)
        return {"image": canvas, "valid": valid, "labels": torch.from_numpy(self.data.label_vector(image_id))}


def same_size_batches(
    ids: list[str], load: Callable[[str], np.ndarray], batch_size: int
) -> Iterator[tuple[list[str], list[np.ndarray]]]:
    """Group consecutive images of one size into batches of at most ``batch_size``.

    Args:
        ids: Image ids in order.
        load: Returns the (H, W, 3) uint8 image of an id.
        batch_size: Largest group.

    Yields:
        ``(ids, images)`` of one group.
    """
    loaded = ((image_id, load(image_id)) for image_id in ids)
    for group in consecutive_groups(loaded, lambda pair: pair[1].shape, batch_size):
        yield [image_id for image_id, _ in group], [image for _, image in group]


def size_batches(ids: list[str], size: Callable[[str], tuple[int, int]], batch_size: int) -> list[list[str]]:
    """Batches of same-size images, from image sizes alone (e.g. read from file headers): bucketed by size.

    Every image of one size goes into that size's bucket (sizes in order of first appearance, ids in order within
    a bucket), each cut into batches of ``batch_size`` and a last, smaller one. On VOC, where consecutive images
    rarely share a size, this fills the batches (64 stand-in images: 12 batches instead of 47 consecutive runs)
    and keeps the ranks of a sharded stage in step (their batches have the same sizes).

    Args:
        ids: Image ids in order.
        size: Returns the ``(H, W)`` of an id.
        batch_size: Largest batch.
    """
    buckets: dict[tuple[int, int], list[str]] = {}
    for image_id in ids:
        buckets.setdefault(tuple(size(image_id)), []).append(image_id)
    return [bucket[k : k + batch_size] for bucket in buckets.values() for k in range(0, len(bucket), batch_size)]


def index_batches(count: int, batch_size: int) -> list[list[int]]:
    """``[[0, ..., batch_size - 1], [batch_size, ...], ...]``: a split of ``count`` items in batches, in order."""
    return [list(range(start, min(start + batch_size, count))) for start in range(0, count, batch_size)]


def consecutive_groups(items: Iterable[T], key: Callable[[T], object], size: int) -> Iterator[list[T]]:
    """Runs of consecutive items with equal ``key``, cut into groups of at most ``size``."""
    group: list[T] = []
    group_key: object = None
    for item in items:
        item_key = key(item)
        if group and (item_key != group_key or len(group) == size):
            yield group
            group = []
        if not group:
            group_key = item_key
        group.append(item)
    if group:
        yield group
