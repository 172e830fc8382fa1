"""Which inference scales give the best seeds: one trained classifier, ``cams``' inference at several scale sets.

Runs ``cams``' multi-scale + flip inference (:func:`pipeline.cams.multiscale_maps`, the seeds of
``cams.seed_locating``) on the first N images of ``cams.split`` for each scale set and prints the seed mIoU
(argmax protocol, the map's own background) of the CAM and, for a V2 classifier, of R-CAM, with R-CAM's
per-class IoU. On the 96 px synthetic images the last stage is 6 x 6 tokens at scale 1: upscaled copies give
R-CAM's prototypes and maps a finer grid (docs/classifier.md, "Inference scales").

Usage: python benchmarks/cam_scales.py [--params params.yaml] [--data data/prepared] [--model-dir models/cls]
       [--images N] [--scales 1,0.5,1.5,2 --scales 1,1.5,2,2.5,3 ...]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pipeline import runtime
from pipeline.cams import multiscale_maps, present_class_mask
from pipeline.config import load_params
from pipeline.data.datasets import normalize
from pipeline.data.layout import PreparedDataset
from pipeline.metrics import SeedEvaluator, threshold_grid
from pipeline.models.swtformer import load_classifier, with_background

DEFAULT_SETS = ("1,0.5,1.5,2", "1,1.5,2,2.5,3")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model-dir", default="models/cls")
    parser.add_argument("--images", type=int, default=None, help="first N images of cams.split (default: all)")
    parser.add_argument("--scales", action="append", help="a comma-separated scale set (repeat for several)")
    args = parser.parse_args()

    cams = load_params(args.params).cams
    runtime.set_threads(cams.threads)
    device = runtime.resolve_device(cams.device)
    data = PreparedDataset.open(args.data)
    model, meta = load_classifier(args.model_dir, device)
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    ids = data.split(cams.split)[: args.images]
    sets = {text: tuple(float(s) for s in text.split(",")) for text in (args.scales or DEFAULT_SETS)}
    grid = threshold_grid(cams.sweep.max, cams.sweep.step)
    evaluators = {(text, name): SeedEvaluator(data.num_classes, grid) for text in sets for name in ("cam", "rcam")}
    has_rcam = False
    for start in range(0, len(ids), cams.batch_size):
        group = ids[start : start + cams.batch_size]
        x = torch.stack([normalize(data.load_image(i), mean, std) for i in group]).to(device)  # (B, 3, H, W)
        mask = present_class_mask([data.labels[i] for i in group], data.num_classes, device)
        truths = [data.load_mask(i) for i in group]
        for text, scales in sets.items():
            cam, rcam = multiscale_maps(model, x, mask, scales, cams.flip, cams.seed_locating)
            for row, image_id in enumerate(group):
                keys = np.array([0, *data.labels[image_id]])
                cam_bg = with_background(cam[row, keys[1:] - 1][None])[0]  # (1 + n, H, W)
                evaluators[text, "cam"].add(cam_bg.cpu().numpy(), keys, truths[row])
                has_rcam = rcam is not None
                if has_rcam:
                    evaluators[text, "rcam"].add(rcam[row, keys].cpu().numpy(), keys, truths[row])

    print(f"{len(ids)} images of {cams.split}, flip {cams.flip}, seeds located by {cams.seed_locating}")
    print(f"{'scales':<18} {'CAM':>6} {'R-CAM':>6}  R-CAM per class ({', '.join(data.class_names)})")
    for text in sets:
        cam = evaluators[text, "cam"].summary()["miou_argmax"]
        if not has_rcam:
            print(f"{text:<18} {cam:>6.3f}")
            continue
        rcam = evaluators[text, "rcam"].summary()
        per_class = " ".join(f"{v:.2f}" for v in rcam["iou_argmax"])
        print(f"{text:<18} {cam:>6.3f} {rcam['miou_argmax']:>6.3f}  {per_class}")


if __name__ == "__main__":
    main()
