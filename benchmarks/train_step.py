"""Cost of a full SWTformer-V2 training step relative to the bare Swin backbone, measured in one run.

Times (a) the backbone's forward + backward alone and (b) a V2 step: forward with HFF, seeds, prototypes and
R-CAM, all losses (CLS + GSC + CCL), backward, on the same batch and the same weights. Prints the ratio b / a
(target <= 1.3). Timings alternate between (a) and (b) and take the median to cancel drift.

``--arch deit`` times the DeiT classifier instead (``model.vit``): (a) the ViT's forward + backward alone and
(b) its training step (class-token + patch-token soft margin); ``--arch both`` also times a V2 step and prints
the DeiT step relative to it. ``--aream`` also times (c) each model's step with AReAM's affinity loss on
(``loss.aream`` of the params file, as after the warm-up: explicit attention in every block (DeiT) or in the
Swin stage ``loss.aream.stage`` (SWTformer), the shallow re-activation, PAR's reliable labels, the deep blocks'
loss) and prints (c) / (b) (target <= 1.5).

Usage: python benchmarks/train_step.py [--params params.yaml] [--batch 16] [--repeats 10] [--arch swtformer]
    [--aream]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.aream import aream_terms
from pipeline.config import load_params
from pipeline.losses import deit_loss, swtformer_loss
from pipeline.models.swtformer import build_model
from pipeline.refinement.par import PAR


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--arch", choices=("swtformer", "deit", "both"), default="swtformer")
    parser.add_argument("--aream", action="store_true", help="also time the step with AReAM on")
    return parser.parse_args()


def _steps(arch: str, params, args, images, labels, mask) -> tuple:
    """(model, {kind: step}) for one architecture, built from seed 0: the bare trunk, the training step, and with
    ``--aream`` the step with AReAM on (DeiT: every block; SWTformer: the window attention of ``loss.aream.stage``)."""
    torch.manual_seed(0)
    update = {"version": "v2"} if arch == "swtformer" else {"arch": "deit"}
    model = build_model(args.classes, images.shape[-1], **params.model.model_copy(update=update).model_dump())
    model.train()
    cfg, par, valid = params.loss.aream.model_dump(), PAR(), mask[:, :1]
    if arch == "deit":

        def trunk() -> None:
            out = model.encode(images)
            (out["tokens"].float().mean() + out["prefix"].float().mean()).backward()

        def loss(out: dict) -> torch.Tensor:
            return deit_loss(out, labels)["total"]

        attention = {"attention": True}
    else:

        def trunk() -> None:
            sum(s.float().mean() for s in model.backbone(images)).backward()

        def loss(out: dict) -> torch.Tensor:
            return swtformer_loss(out, labels, mask, **params.loss.model_dump())["total"]

        attention = {"attention": True, "stage": cfg["stage"]}

    def step() -> None:
        loss(model(images, mask)).backward()

    def aream_step() -> None:
        out = model(images, mask, **attention)
        (loss(out) + cfg["weight"] * aream_terms(par, out, images, labels, valid, cfg)["aff"]).backward()

    return model, {"trunk": trunk, "step": step} | ({"aream": aream_step} if args.aream else {})


def main() -> None:
    args = _parse()
    params = load_params(args.params)
    size = params.train_cls.crop_size
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, size, size)
    labels = (torch.rand(args.batch, args.classes) < 0.3).float()
    labels[:, 0] = 1
    mask = torch.cat([torch.ones(args.batch, 1, size, size), labels[:, :, None, None].expand(-1, -1, size, size)], 1)
    arches = ("swtformer", "deit") if args.arch == "both" else (args.arch,)
    runs = {arch: _steps(arch, params, args, images, labels, mask) for arch in arches}

    def timed(model, step) -> float:
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    for model, steps in runs.values():  # warm-up
        for step in steps.values():
            timed(model, step)
    times = {(arch, kind): [] for arch, (_, steps) in runs.items() for kind in steps}
    for _ in range(args.repeats):
        for arch, (model, steps) in runs.items():
            for kind, step in steps.items():
                times[arch, kind].append(timed(model, step))
    med = {key: statistics.median(values) for key, values in times.items()}
    print(f"median of {args.repeats}, batch {args.batch}, {size} px")
    for arch in arches:
        trunk_name, step_name = (
            ("Swin backbone", "V2 step (all losses)") if arch == "swtformer" else ("ViT", "DeiT step")
        )
        print(f"{trunk_name + ' forward+backward:':34s} {med[arch, 'trunk'] * 1e3:.1f} ms")
        print(f"{step_name + ':':34s} {med[arch, 'step'] * 1e3:.1f} ms")
        print(
            f"ratio: {med[arch, 'step'] / med[arch, 'trunk']:.3f}" + (" (target <= 1.3)" if arch == "swtformer" else "")
        )
        if (arch, "aream") in med:
            name = step_name.split(" (")[0]
            print(f"{name + ' with AReAM:':34s} {med[arch, 'aream'] * 1e3:.1f} ms")
            print(f"AReAM step / {name}: {med[arch, 'aream'] / med[arch, 'step']:.3f} (target <= 1.5)")
    if args.arch == "both":
        print(f"DeiT step / V2 step: {med['deit', 'step'] / med['swtformer', 'step']:.3f}")


if __name__ == "__main__":
    main()
