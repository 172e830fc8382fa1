"""``cams``' multi-scale + flip inference with the fused window-attention kernel against timm's explicit one.

Loads the classifier written by ``train_cls`` and runs :func:`pipeline.cams.multiscale_maps` as ``cams`` does
(``cams.scales``, ``cams.flip``, ``cams.seed_locating``, batches of 8) on the first ``--images`` images of
``cams.split``, alternating eval mode's fused ``scaled_dot_product_attention`` (what ``cams`` uses) with timm's
explicit softmax attention. Prints the median time per image of each and the largest difference between their
CAM and R-CAM maps.

Usage: python benchmarks/cam_inference.py [--params params.yaml] [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline import runtime
from pipeline.cams import multiscale_maps, present_class_mask
from pipeline.config import load_params
from pipeline.data.datasets import normalize
from pipeline.data.layout import PreparedDataset
from pipeline.models.swtformer import load_classifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model-dir", default="models/cls")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cams = load_params(args.params).cams
    device = runtime.resolve_device(cams.device)
    data = PreparedDataset.open(args.data)
    model, meta = load_classifier(args.model_dir, device)
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    ids = data.split(cams.split)[: args.images]
    batches = []
    for start in range(0, len(ids), 8):
        group = ids[start : start + 8]
        x = torch.stack([normalize(data.load_image(i), mean, std) for i in group]).to(device)  # (B, 3, H, W)
        batches.append((x, present_class_mask([data.labels[i] for i in group], data.num_classes, device)))

    def run(fused: bool) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor | None]]]:
        for attention in model.backbone.attentions:
            attention.fused_attn = fused
        start = time.perf_counter()
        maps = [multiscale_maps(model, x, mask, cams.scales, cams.flip, cams.seed_locating) for x, mask in batches]
        return (time.perf_counter() - start) / len(ids), maps

    run(True)  # warm-up
    seconds: dict[bool, list[float]] = {True: [], False: []}
    maps = {}
    for _ in range(args.repeats):
        for fused in (False, True):
            elapsed, maps[fused] = run(fused)
            seconds[fused].append(elapsed)
    difference = max(
        (a - b).abs().max().item()
        for pair_explicit, pair_fused in zip(maps[False], maps[True], strict=True)
        for a, b in zip(pair_explicit, pair_fused, strict=True)
        if a is not None
    )
    explicit_ms, fused_ms = (statistics.median(seconds[f]) * 1e3 for f in (False, True))
    print(f"{len(ids)} images of {cams.split}, scales {list(cams.scales)}, flip {cams.flip} (median of {args.repeats})")
    print(f"explicit attention: {explicit_ms:.1f} ms per image")
    print(f"fused attention:    {fused_ms:.1f} ms per image ({1 - fused_ms / explicit_ms:.0%} less)")
    print(f"largest difference between their max-normalised maps: {difference:.1e}")


if __name__ == "__main__":
    main()
