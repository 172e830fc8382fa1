"""evaluate's CRF at scale: today's serial all-label CRF against the pool + label pruning, on VOC-sized images.

One run, same inputs: N images of a VOC stand-in (``wsss standin voc``: 500 x 375 class scenes with masks) and,
standing in for a trained DeepLab's multi-scale probabilities over VOC's 21 labels, a softmax of
``6 * one-hot(ground truth) + smooth noise`` (ignore pixels count as background; the noise gives every label a
small, spatially varying probability, and the wrong labels sometimes win, as in a real model's output).

* serial: :func:`pipeline.evaluate.crf_labels` over all 21 labels, one image after another in this process;
* ours: the same function with ``evaluate.crf_min_prob`` in ``--workers`` processes (:class:`OrderedPool`,
  default one per core), as ``evaluate`` runs it.

Prints both times, the ratio (target >= 1.8 on 2 cores), the mIoU of each against the ground truth and their
difference (target <= 1e-3), and the pixel agreement; exits with 1 if the mIoUs differ by more than 1e-3.

Usage: python benchmarks/evaluate_crf.py [--params params.yaml] [--images 16] [--workers 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import load_params
from pipeline.data.layout import IGNORE, open_image
from pipeline.data.standin import write_voc
from pipeline.evaluate import _crf_job, crf_labels
from pipeline.io import load_label_png
from pipeline.metrics import confusion_matrix, iou_report
from pipeline.parallel import OrderedPool, resolve_workers

LABELS = 21


def fake_probs(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) ground truth -> (21, H, W) float32 softmax of 6 * one-hot + smooth noise (std 1, 24-px blobs)."""
    truth = np.where(mask == IGNORE, 0, mask)
    logits = 6.0 * (np.arange(LABELS)[:, None, None] == truth[None]).astype(np.float32)  # (21, H, W)
    coarse = torch.from_numpy(rng.normal(size=(1, LABELS, mask.shape[0] // 24 + 1, mask.shape[1] // 24 + 1)))
    noise = F.interpolate(coarse.float(), size=mask.shape, mode="bicubic", align_corners=False)[0].numpy()
    logits += noise / noise.std()
    e = np.exp(logits - logits.max(0, keepdims=True))
    return (e / e.sum(0, keepdims=True)).astype(np.float32)


def load_inputs(count: int) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """``(id, image, probs, mask)`` for ``count`` VOC stand-in images."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        write_voc(Path(tmp), count, seed=0, workers=1)
        voc = Path(tmp) / "VOCdevkit" / "VOC2012"
        inputs = []
        for path in sorted((voc / "SegmentationClassAug").glob("*.png"))[:count]:
            with open_image(voc / "JPEGImages" / f"{path.stem}.jpg") as image:
                rgb = np.array(image.convert("RGB"))
            mask = load_label_png(path)
            inputs.append((path.stem, rgb, fake_probs(mask, rng), mask))
    return inputs


def miou(labels: list[np.ndarray], masks: list[np.ndarray]) -> float:
    confusion = sum(confusion_matrix(label, mask, LABELS) for label, mask in zip(labels, masks, strict=True))
    return iou_report(confusion, [str(i) for i in range(LABELS)], "crf")["crf/miou"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    cfg = load_params(args.params).evaluate
    crf, workers = cfg.crf.model_dump(), resolve_workers(args.workers)
    inputs = load_inputs(args.images)
    print(f"{len(inputs)} VOC stand-in images ({inputs[0][1].shape[1]} x {inputs[0][1].shape[0]}), {LABELS} labels, "
          f"{workers} worker(s), load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    started = time.perf_counter()
    serial = [crf_labels(image, probs, crf) for _, image, probs, _ in inputs]
    serial_s = time.perf_counter() - started

    started = time.perf_counter()
    with OrderedPool(_crf_job, workers if workers > 1 else 0, in_flight=2) as pool:
        done = [r for i, im, p, _ in inputs for r in pool.submit((i, im, p, crf, cfg.crf_min_prob))] + pool.drain()
    ours_s = time.perf_counter() - started
    ours = [label for _, label in done]

    masks = [mask for *_, mask in inputs]
    kept = np.mean([(p.reshape(LABELS, -1).max(1) >= cfg.crf_min_prob).sum() for _, _, p, _ in inputs])
    serial_miou, ours_miou = miou(serial, masks), miou(ours, masks)
    agreement = np.mean([np.mean(a == b) for a, b in zip(serial, ours, strict=True)])
    print(f"serial, all labels : {serial_s / len(inputs):6.2f} s/image, mIoU {serial_miou:.5f}")
    print(f"pool + min_prob {cfg.crf_min_prob}: {ours_s / len(inputs):6.2f} s/image, mIoU {ours_miou:.5f} "
          f"({kept:.1f} labels kept per image on average)")  # fmt: skip
    print(f"speed-up: {serial_s / ours_s:.2f}x (target >= 1.8 on 2 cores)")
    print(f"mIoU difference: {abs(serial_miou - ours_miou):.2e} (target <= 1e-3); pixel agreement {agreement:.5f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    sys.exit(0 if abs(serial_miou - ours_miou) <= 1e-3 else 1)


if __name__ == "__main__":
    main()
