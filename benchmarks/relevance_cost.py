"""Cost of the DeiT's relevance maps (``cams.relevance``) per image, relative to its CAMs, in one run.

Loads the DeiT classifier written by ``train_cls`` (``model.arch: deit``) and times, on the first ``--images``
images of ``cams.split`` in batches of 8 with ``cams.scales`` and ``cams.flip``: the CAMs
(:func:`pipeline.cams.multiscale_maps`, what ``cams`` computes anyway) and each relevance variant
(:func:`pipeline.relevance.multiscale_relevance`: full / gradient x last / all), alternating the variants in each
repeat. Prints the median seconds per image of each and its ratio to the CAMs.

Usage: python benchmarks/relevance_cost.py [--params params.yaml] [--images 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import runtime
from pipeline.cams import multiscale_maps, present_class_mask
from pipeline.config import RelevanceParams, load_params
from pipeline.data.datasets import normalize
from pipeline.data.layout import PreparedDataset
from pipeline.models.swtformer import load_classifier
from pipeline.relevance import multiscale_relevance

VARIANTS = [("full", "last"), ("full", "all"), ("gradient", "last"), ("gradient", "all")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model-dir", default="models/cls")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cams = load_params(args.params).cams
    device = runtime.resolve_device(cams.device)
    runtime.set_threads(cams.threads)
    data = PreparedDataset.open(args.data)
    model, meta = load_classifier(args.model_dir, device)
    if model.version != "deit":
        raise SystemExit("relevance maps need the DeiT classifier (model.arch: deit)")
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    ids = data.split(cams.split)[: args.images]
    batches = []
    for start in range(0, len(ids), 8):
        group = ids[start : start + 8]
        x = torch.stack([normalize(data.load_image(i), mean, std) for i in group]).to(device)  # (B, 3, H, W)
        batches.append((x, [data.labels[i] for i in group]))
    classes = sum(len(labels) for _, batch in batches for labels in batch)

    def run(variant: tuple[str, str] | None) -> float:
        start = time.perf_counter()
        for x, labels in batches:
            if variant is None:
                mask = present_class_mask(labels, data.num_classes, device)
                multiscale_maps(model, x, mask, cams.scales, cams.flip, cams.seed_locating)
            else:
                params = RelevanceParams(kind=variant[0], blocks=variant[1], class_batch=cams.relevance.class_batch)
                multiscale_relevance(model, x, labels, cams.scales, cams.flip, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(ids)

    variants = [None, *VARIANTS]
    for variant in variants:  # warm-up
        run(variant)
    seconds: dict = {v: [] for v in variants}
    for _ in range(args.repeats):
        for variant in variants:
            seconds[variant].append(run(variant))
    cam = statistics.median(seconds[None])
    print(f"{len(ids)} images ({classes} present classes), scales {list(cams.scales)}, flip {cams.flip}, "
          f"{device.type}, {torch.get_num_threads()} thread(s), median of {args.repeats}")  # fmt: skip
    print(f"{'maps':<22} {'ms / image':>10} {'x CAM':>7}")
    print(f"{'CAM':<22} {cam * 1e3:>10.1f} {1.0:>7.2f}")
    for variant in VARIANTS:
        median = statistics.median(seconds[variant])
        print(f"{'relevance ' + '/'.join(variant):<22} {median * 1e3:>10.1f} {median / cam:>7.2f}")


if __name__ == "__main__":
    main()
