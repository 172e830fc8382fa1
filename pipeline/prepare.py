"""``prepare``: write a dataset in the prepared layout (see :mod:`pipeline.data.layout`)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from pipeline.config import DataParams
from pipeline.data import synthetic
from pipeline.data.coco import prepare_coco
from pipeline.data.layout import PreparedDataset, voc_palette, write_index
from pipeline.data.voc import prepare_voc
from pipeline.io import save_image_png, save_label_png
from pipeline.outputs import replaced_dir
from pipeline.parallel import map_ordered, resolve_workers


def _write_sample(item: tuple[str, int, int, DataParams, Path]) -> list[int]:
    """Generate sample ``index`` and write its image and mask as ``<image_id>.png``; return its labels."""
    image_id, index, seed, params, out = item
    image, mask, present = synthetic.generate_sample(index, seed, params.synthetic)
    save_image_png(out / "images" / f"{image_id}.png", image)
    save_label_png(out / "masks" / f"{image_id}.png", mask, voc_palette())
    return present


def prepare_synthetic(params: DataParams, seed: int, out: Path) -> PreparedDataset:
    """Generate the synthetic benchmark into ``out``.

    ``train`` and ``train_aug`` are the same images (the benchmark has no separate augmented set);
    ``val`` is disjoint (``data.subset`` keeps the first N of each). Image ids are ``train_00000`` ... and
    ``val_00000`` ... Samples are generated in one process per CPU core; each depends only on ``seed`` and its
    index, so the output does not depend on the number of processes.

    Args:
        params: The ``data`` section (uses ``data.synthetic``).
        seed: The benchmark's seed; the images depend on it and on nothing else.
        out: An empty output directory.

    Returns:
        The prepared dataset.
    """
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    names = synthetic.class_names()
    palette = voc_palette()[: len(names)]
    labels: dict[str, list[int]] = {}
    num_train, num_val = params.synthetic.num_train, params.synthetic.num_val
    if params.subset is not None:  # the first N of each split: the same images as without the cut
        num_train, num_val = min(num_train, params.subset), min(num_val, params.subset)
    splits = {"train": ("train", num_train, 0), "val": ("val", num_val, 1_000_000)}
    lists: dict[str, list[str]] = {}
    workers = resolve_workers(0)
    for split, (prefix, count, offset) in splits.items():
        ids = [f"{prefix}_{index:05d}" for index in range(count)]
        items = ((image_id, offset + index, seed, params, out) for index, image_id in enumerate(ids))
        results = map_ordered(_write_sample, items, workers, in_flight=16)
        bar = tqdm(results, total=count, desc=f"prepare {split}", unit="img", disable=None, mininterval=2)
        labels.update(zip(ids, bar, strict=True))
        lists[split] = ids
    lists["train_aug"] = lists["train"]
    return write_index(out, "synthetic", names, palette, labels, lists, image_ext=".png")


def prepare(params: DataParams, seed: int, out: Path | str) -> PreparedDataset:
    """Write the dataset chosen by ``data.dataset`` into ``out`` in the prepared layout.

    ``synthetic`` is generated from ``data.synthetic.seed``, or from ``seed`` when that is ``None``; ``voc`` and
    ``coco`` are converted from the raw data in ``data.root`` (see :mod:`pipeline.data.voc` and
    :mod:`pipeline.data.coco`). With ``data.subset: N`` every split holds only its first N images
    (:func:`~pipeline.data.layout.cut_splits`), and only those are written.

    Args:
        params: The ``data`` section.
        seed: The global seed.
        out: Output directory; replaced whole when the dataset is complete (a failed run leaves the old one).

    Returns:
        The prepared dataset.

    Raises:
        DatasetError: If the raw data of a real dataset is missing or broken (one line naming the file).
    """
    out = Path(out)
    with replaced_dir(out) as staging:
        if params.dataset == "voc":
            prepare_voc(params.root, staging, params.subset)
        elif params.dataset == "coco":
            prepare_coco(params.root, staging, params.subset)
        else:
            benchmark_seed = seed if params.synthetic.seed is None else params.synthetic.seed
            prepare_synthetic(params, benchmark_seed, staging)
    return PreparedDataset.open(out)
