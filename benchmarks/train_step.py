"""Cost of a full SWTformer-V2 training step relative to the bare Swin backbone, measured in one run.

Times (a) the backbone's forward + backward alone and (b) a V2 step: forward with HFF, seeds, prototypes and
R-CAM, all losses (CLS + GSC + CCL), backward, on the same batch and the same weights. Prints the ratio b / a
(target <= 1.3). Timings alternate between (a) and (b) and take the median to cancel drift.

Usage: python benchmarks/train_step.py [--params params.yaml] [--batch 16] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import load_params
from pipeline.losses import swtformer_loss
from pipeline.models.swtformer import build_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--classes", type=int, default=6)
    args = parser.parse_args()

    params = load_params(args.params)
    model_params = params.model.model_copy(update={"version": "v2"})
    size = params.train_cls.crop_size
    torch.manual_seed(0)
    model = build_model(args.classes, size, **model_params.model_dump())
    model.train()
    images = torch.randn(args.batch, 3, size, size)
    labels = (torch.rand(args.batch, args.classes) < 0.3).float()
    labels[:, 0] = 1
    mask = torch.cat([torch.ones(args.batch, 1, size, size), labels[:, :, None, None].expand(-1, -1, size, size)], 1)

    def backbone_step() -> None:
        stages = model.backbone(images)
        sum(s.float().mean() for s in stages).backward()

    def v2_step() -> None:
        out = model(images, mask)
        swtformer_loss(out, labels, mask, **params.loss.model_dump())["total"].backward()

    def timed(step) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for step in (backbone_step, v2_step):  # warm-up
        timed(step)
    base, full = [], []
    for _ in range(args.repeats):
        base.append(timed(backbone_step))
        full.append(timed(v2_step))
    b, f = statistics.median(base), statistics.median(full)
    print(f"backbone forward+backward: {b * 1e3:.1f} ms  (median of {args.repeats}, batch {args.batch}, {size} px)")
    print(f"V2 step (all losses):      {f * 1e3:.1f} ms")
    print(f"ratio: {f / b:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
