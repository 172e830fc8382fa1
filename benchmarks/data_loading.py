"""Time to load one epoch of ``train_cls`` samples with and without ``train_cls.cache_images``, and the val set.

Runs the ``ClassificationTrainSet`` / ``ClassificationEvalSet`` that ``train_cls`` uses through a DataLoader in
this process (``num_workers: 0``, the default), alternating an epoch that decodes every image from disk with one
that reads the decoded images kept in memory, and prints the medians, the one-time decoding of the cache and
one pass over the val set (which ``cache_images`` makes once instead of every epoch).

Usage: python benchmarks/data_loading.py [--params params.yaml] [--data data/prepared] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from torch.utils.data import DataLoader

from pipeline.config import load_params
from pipeline.data.datasets import ClassificationEvalSet, ClassificationTrainSet
from pipeline.data.layout import PreparedDataset


def seconds_to_iterate(dataset, batch_size: int) -> float:
    """Wall time of one pass over ``dataset`` in batches."""
    start = time.perf_counter()
    for _ in DataLoader(dataset, batch_size=batch_size):
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    params = load_params(args.params)
    cfg = params.train_cls
    data = PreparedDataset.open(args.data)
    options = (cfg.crop_size, cfg.resize_long, cfg.flip, cfg.color_jitter, params.data.mean, params.data.std, 0)
    from_disk = ClassificationTrainSet(data, "train_aug", *options, cache=False)
    start = time.perf_counter()
    cached = ClassificationTrainSet(data, "train_aug", *options, cache=True)
    decode = time.perf_counter() - start
    disk, memory = [], []
    for _ in range(args.repeats):
        disk.append(seconds_to_iterate(from_disk, cfg.batch_size))
        memory.append(seconds_to_iterate(cached, cfg.batch_size))
    val = seconds_to_iterate(ClassificationEvalSet(data, "val", cfg.crop_size, params.data.mean, params.data.std), 16)
    print(f"one epoch of {len(cached)} training samples (median of {args.repeats}):")
    print(f"  decoding from disk:      {statistics.median(disk):.2f} s")
    print(f"  from the decoded cache:  {statistics.median(memory):.2f} s  (filling the cache once: {decode:.2f} s)")
    print(f"val set, {len(data.split('val'))} images, one pass: {val:.2f} s")


if __name__ == "__main__":
    main()
