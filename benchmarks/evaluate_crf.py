"""evaluate's CRF at scale: today's serial all-label CRF against the pool + label pruning, on VOC-sized images.

One run, same inputs: the first N val images of the prepared synthetic benchmark with the probabilities of the
trained DeepLab (``models/seg``: multi-scale + flip, as ``evaluate`` computes them), all brought to VOC's size
(500 x 375: images bicubic, probabilities bilinear, masks nearest), so that the CRF sees a real model's
probabilities (how many labels an image's pixels ever give a non-negligible probability) at VOC's pixel count.

* serial: :func:`pipeline.evaluate.crf_labels` over all labels, one image after another in this process;
* ours: the same function with ``evaluate.crf_min_prob`` (or ``--min-prob``) in ``--workers`` processes
  (:class:`OrderedPool`, default one per core), as ``evaluate`` runs it.

Also prints how many labels the threshold keeps per image, and the share of the labels absent from an image's
ground truth that it keeps (``ABSENT_KEPT`` in ``benchmarks/full_run_cost.py`` projects COCO's CRF with it).

Prints both times, the ratio (target >= 1.8 on 2 cores), the mIoU of each against the ground truth and their
difference (target <= 1e-3), and the pixel agreement; exits with 1 if the mIoUs differ by more than 1e-3.

Needs the prepared data and the DeepLab of ``dvc repro train_seg`` (the defaults point at them).

Usage: python benchmarks/evaluate_crf.py [--params params.yaml] [--data data/prepared] [--model-dir models/seg]
       [--images 32] [--workers 0] [--min-prob P]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.config import load_params
from pipeline.data.datasets import normalize
from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.evaluate import _crf_job, crf_job, crf_labels
from pipeline.metrics import confusion_matrix, iou_report
from pipeline.models.deeplab import load_segmenter, predict_probs
from pipeline.parallel import OrderedPool, resolve_workers

VOC_SIZE = (375, 500)  # (H, W), VOC's typical image


def voc_sized(image: np.ndarray, probs: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h, w, 3) uint8, (K, h, w) float32, (h, w) uint8 -> the same at VOC's (375, 500)."""
    h, w = VOC_SIZE
    big = np.array(Image.fromarray(image).resize((w, h), Image.BICUBIC))
    grown = F.interpolate(torch.from_numpy(probs)[None], size=VOC_SIZE, mode="bilinear", align_corners=False)[0]
    labels = np.array(Image.fromarray(mask).resize((w, h), Image.NEAREST))
    return big, grown.numpy(), labels


Inputs = list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]


def load_inputs(params, data_dir: str, model_dir: str, count: int) -> Inputs:
    """``(id, image, probs, mask)`` at VOC's size for the first ``count`` images of ``evaluate.split``."""
    cfg, data = params.evaluate, PreparedDataset.open(data_dir)
    model, meta = load_segmenter(model_dir, torch.device("cpu"))
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    inputs = []
    for image_id in data.split(cfg.split)[:count]:
        image = data.load_image(image_id)
        with torch.no_grad():
            probs = predict_probs(model, normalize(image, mean, std)[None], cfg.scales, cfg.flip, False)[0]  # (K, h, w)
        inputs.append((image_id, *voc_sized(image, probs.numpy(), data.load_mask(image_id))))
    return inputs


def miou(labels: list[np.ndarray], masks: list[np.ndarray], num_labels: int) -> float:
    confusion = sum(confusion_matrix(label, mask, num_labels) for label, mask in zip(labels, masks, strict=True))
    return iou_report(confusion, [str(i) for i in range(num_labels)], "crf")["crf/miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model-dir", default="models/seg")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--min-prob", type=float, default=None, help="default: the config's evaluate.crf_min_prob")
    args = parser.parse_args()
    params = load_params(args.params)
    cfg = params.evaluate
    min_prob = cfg.crf_min_prob if args.min_prob is None else args.min_prob
    crf, workers = cfg.crf.model_dump(), resolve_workers(args.workers)
    torch.set_num_threads(os.cpu_count() or 1)
    inputs = load_inputs(params, args.data, args.model_dir, args.images)
    labels = len(inputs[0][2])
    print(f"{len(inputs)} val images at {inputs[0][1].shape[1]} x {inputs[0][1].shape[0]}, {labels} labels, "
          f"{workers} worker(s), load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    started = time.perf_counter()
    serial = [crf_labels(image, probs, crf) for _, image, probs, _ in inputs]
    serial_s = time.perf_counter() - started

    started = time.perf_counter()
    with OrderedPool(_crf_job, workers if workers > 1 else 0, in_flight=2) as pool:
        done = [r for i, im, p, _ in inputs for r in pool.submit(crf_job(i, im, p, crf, min_prob))] + pool.drain()
    ours_s = time.perf_counter() - started
    ours = [label for _, label in done]

    masks = [mask for *_, mask in inputs]
    kept = [p.reshape(labels, -1).max(1) >= min_prob for _, _, p, _ in inputs]  # (K,) per image
    present = [np.isin(np.arange(labels), mask[mask != IGNORE]) for mask in masks]  # (K,) per image
    absent_kept = sum((k & ~g).sum() for k, g in zip(kept, present, strict=True)) / sum((~g).sum() for g in present)
    serial_miou, ours_miou = miou(serial, masks, labels), miou(ours, masks, labels)
    agreement = np.mean([np.mean(a == b) for a, b in zip(serial, ours, strict=True)])
    print(f"serial, all labels : {serial_s / len(inputs):6.2f} s/image, mIoU {serial_miou:.5f}")
    print(f"pool + min_prob {min_prob}: {ours_s / len(inputs):6.2f} s/image, mIoU {ours_miou:.5f} "
          f"({np.mean([k.sum() for k in kept]):.2f} labels kept per image, "
          f"{np.mean([g.sum() for g in present]):.2f} in the ground truth; "
          f"{absent_kept:.3f} of the absent labels kept)")  # fmt: skip
    print(f"speed-up: {serial_s / ours_s:.2f}x (target >= 1.8 on 2 cores)")
    print(f"mIoU difference: {abs(serial_miou - ours_miou):.2e} (target <= 1e-3); pixel agreement {agreement:.5f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    sys.exit(0 if abs(serial_miou - ours_miou) <= 1e-3 else 1)


if __name__ == "__main__":
    main()
