"""The images ``wsss pretrain`` trains on: fractal categories or many-class scenes, and their dataset.

``pretrain.source: fractals`` draws FractalDB-style categories (:mod:`pipeline.data.fractals`), one label per image.
``pretrain.source: scenes`` draws the VOC/COCO stand-ins' many-class scenes (:func:`pipeline.data.synthetic.
generate_scene`) at the benchmark's size, multi-label, with **patterned** looks only: every pretraining class has
striped, checked or dotted bodies, and every benchmark class a plain one, so no pretraining class is a benchmark
class. They share with the benchmark what ImageNet shares with VOC: the backgrounds, the kind of objects and
marks (three of the four mark colours are benchmark marks), the rendering.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline.data.synthetic import MAX_LOOKS, Look, SceneSpec, class_looks, generate_scene

PRETRAIN_LOOKS = tuple(look for look in class_looks(MAX_LOOKS) if look.pattern != "plain")
"""The 60 patterned looks of the stand-ins: the classes ``source: scenes`` can draw from."""


def pretrain_looks(num_classes: int) -> list[Look]:
    """The first ``num_classes`` patterned looks.

    Raises:
        ValueError: If ``num_classes`` is not in 1..60.
    """
    if not 0 < num_classes <= len(PRETRAIN_LOOKS):
        raise ValueError(f"pretrain.categories must be in 1..{len(PRETRAIN_LOOKS)} with source scenes")
    return list(PRETRAIN_LOOKS[:num_classes])


def scene_spec(size: int) -> SceneSpec:
    """Square scenes of ``size`` px with the default benchmark's object counts and scales."""
    return SceneSpec(
        sizes=((size, size, 1.0),), max_classes=2, max_objects=3, min_scale=0.14, max_scale=0.34, noise_std=6.0
    )


def render_scenes(
    looks: list[Look], count: int, size: int, seed: int, first: int = 0, min_visible: int = 16, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Scenes ``first .. first + count - 1`` of dataset ``seed`` and their image-level labels.

    A class is present when at least ``min_visible`` of its pixels are visible (the benchmark's rule). Other
    ``first`` values give other draws: the training and held-out sets never share a scene.

    Returns:
        ``(images, targets)``: (count, size, size, 3) uint8 and (count, K) float32 multi-hot, K = ``len(looks)``.
    """
    spec = scene_spec(size)
    images = np.empty((count, size, size, 3), dtype=np.uint8)
    targets = np.zeros((count, len(looks)), dtype=np.float32)
    for row, index in enumerate(tqdm(range(first, first + count), desc=desc or "scenes", unit="img", disable=None)):
        images[row], label, _ = generate_scene(index, seed, looks, spec)
        visible = np.bincount(label.ravel(), minlength=len(looks) + 1)[1:]  # (K,) pixels per class
        targets[row] = visible >= min_visible
    return images, targets


class PretrainImages(Dataset):
    """Pre-rendered images with their labels; training augmentation: flips and 90-degree rotations.

    The augmentation of sample ``i`` in epoch ``e`` is seeded by ``(seed, e, i)``, so a resumed run is exact
    (:func:`pipeline.training.fit` sets :attr:`epoch`).

    Args:
        images: (M, S, S, 3) uint8.
        labels: (M,) category indices (fractals), or (M, K) multi-hot (scenes).
        mean, std: Normalisation (the pipeline's ``data.mean`` / ``data.std``).
        augment: Random flips and rotations (training); off for the held-out set.
        seed: Augmentation seed.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: bool,
        seed: int = 0,
    ) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean).view(3, 1, 1) * 255
        self.std = torch.tensor(std).view(3, 1, 1) * 255
        self.augment, self.seed, self.epoch = augment, seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = torch.from_numpy(self.images[index]).permute(2, 0, 1).float()  # (3, S, S)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image = torch.rot90(image, int(rng.integers(4)), dims=(1, 2))
            if rng.random() < 0.5:
                image = image.flip(2)
        return {"image": (image - self.mean) / self.std, "label": torch.as_tensor(self.labels[index])}
