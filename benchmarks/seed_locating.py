"""Where R-CAM's seeds and features come from, and what that does to seed mIoU: one trained classifier.

Runs ``cams``' multi-scale + flip inference on the first N images of ``cams.split`` with the classifier in
``--model-dir`` and evaluates R-CAM (both protocols) for each way of locating the seeds of its prototypes:

* ``structure``: SWTformer's structure-aware locating (soft IoU with the |cos| affinity of last-stage tokens),
  the paper's choice and what training uses;
* ``cam``: the argmax of the CAM with its background ``1 - max`` (``cams.seed_locating: cam``);
* ``ground truth`` (an oracle, for diagnosis only): the seeds are the ground-truth mask on the seed grid
  (area-resized, argmax, masked by the image labels). It bounds what better seeds could give in this
  feature space.

``--sources`` keeps some of these rows (e.g. ``cam``). ``--features`` chooses the feature R-CAM compares with its
prototypes, for every row:

* ``hff``: HFF's learned projections of the four stages (SIPE, SWTformer; what ``cams`` uses);
* ``backbone``: the four Swin stages themselves, each L2-normalised and brought to stage 3's grid (average pooling
  down, bilinear up), with no learned layer;
* ``both``: the two concatenated.

Also prints the CAM's seed mIoU on the same images, each map's object-vs-background precision and recall
under the argmax protocol, and the mean |cos| between last-stage tokens of an image (at scale 1): the
structure-aware soft IoU can only separate object from background if this is well below 1.

Usage: python benchmarks/seed_locating.py [--params params.yaml] [--data data/prepared] [--model-dir models/cls]
       [--images 240] [--sources structure,cam,truth] [--features hff|backbone|both]
"""

from __future__ import annotations

import argparse
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import runtime
from pipeline.cams import multiscale_maps, present_class_mask
from pipeline.config import load_params
from pipeline.data.datasets import normalize
from pipeline.data.layout import PreparedDataset
from pipeline.metrics import SeedEvaluator, threshold_grid
from pipeline.models import swtformer
from pipeline.models.swtformer import HierarchicalFeatureFusion, load_classifier, with_background

SOURCES = {"structure": "structure", "cam": "cam", "truth": "ground truth"}


def ground_truth_seeds(batch_masks: list[np.ndarray], num_classes: int):
    """A stand-in for ``structure_aware_seeds`` that returns the ground truth of the current batch as seeds."""
    onehot = np.stack([np.stack([m == k for k in range(num_classes)]) for m in batch_masks]).astype(np.float32)
    truth = torch.from_numpy(onehot)  # (B, K, H, W); 255 (ignore) is in no channel

    def seeds(cam: torch.Tensor, tokens: torch.Tensor, label_mask: torch.Tensor, bg_iou_scale: float = 0.5):
        area = F.interpolate(truth, size=cam.shape[-2:], mode="area")  # (B, K, h, w)
        return F.one_hot(area.argmax(dim=1), cam.shape[1]).permute(0, 3, 1, 2).to(cam.dtype) * label_mask

    return seeds


def backbone_fusion(stages: list[torch.Tensor]) -> torch.Tensor:
    """The four stages, each L2-normalised on stage 3's grid, concatenated.

    (B, C_i, H_i, W_i) x 4 -> (B, sum C_i, H_3, W_3).
    """
    size = stages[2].shape[-2:]
    fused = []
    for stage in stages:
        if stage.shape[-1] > size[-1]:
            stage = F.adaptive_avg_pool2d(stage, size)
        elif stage.shape[-2:] != size:
            stage = F.interpolate(stage, size=size, mode="bilinear", align_corners=False)
        fused.append(F.normalize(stage, dim=1, eps=swtformer.EPS))
    return torch.cat(fused, dim=1)


def fusion(features: str):
    """A stand-in for ``HierarchicalFeatureFusion.forward`` that gives R-CAM the feature named by ``--features``."""
    learned = HierarchicalFeatureFusion.forward
    if features == "hff":
        return learned
    if features == "backbone":
        return lambda hff, stages: backbone_fusion(stages)
    return lambda hff, stages: torch.cat([learned(hff, stages), backbone_fusion(stages)], dim=1)


def foreground_precision_recall(confusion: np.ndarray) -> tuple[float, float]:
    """Object-vs-background precision and recall of the argmax labels, from a (gt, pred) confusion matrix."""
    both = confusion[1:, 1:].sum()  # ground truth and prediction both some class (not necessarily the same)
    return float(both / confusion[:, 1:].sum()), float(both / confusion[1:, :].sum())


def token_cosine(model: swtformer.SWTformer, x: torch.Tensor) -> float:
    """Mean |cos| between the last-stage tokens of each image, averaged over the batch."""
    tokens = F.normalize(model.features(x).tokens.flatten(2), dim=1)  # (B, D, hw)
    return float(torch.bmm(tokens.transpose(1, 2), tokens).abs().mean())


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--model-dir", default="models/cls")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"R-CAM rows, some of {', '.join(SOURCES)}")
    parser.add_argument("--features", choices=("hff", "backbone", "both"), default="hff")
    args = parser.parse_args()
    unknown = set(args.sources.split(",")) - set(SOURCES)
    if unknown:
        raise SystemExit(f"error: unknown --sources {', '.join(sorted(unknown))} ({', '.join(SOURCES)})")
    sources = tuple(SOURCES[name] for name in args.sources.split(","))

    cams = load_params(args.params).cams
    runtime.set_threads(cams.threads)
    device = runtime.resolve_device(cams.device)
    data = PreparedDataset.open(args.data)
    model, meta = load_classifier(args.model_dir, device)
    if model.version != "v2":
        raise SystemExit("error: R-CAM needs a v2 classifier (model.version: v2)")
    mean, std = tuple(meta["mean"]), tuple(meta["std"])
    ids = data.split(cams.split)[: args.images]
    grid = threshold_grid(cams.sweep.max, cams.sweep.step)
    evaluators = {name: SeedEvaluator(data.num_classes, grid) for name in ("CAM", *sources)}
    cosines = []
    for start in range(0, len(ids), 8):
        group = ids[start : start + 8]
        x = torch.stack([normalize(data.load_image(i), mean, std) for i in group]).to(device)  # (B, 3, H, W)
        mask = present_class_mask([data.labels[i] for i in group], data.num_classes, device)
        truths = [data.load_mask(i) for i in group]
        cosines.append(token_cosine(model, x))
        rcams = {}
        with mock.patch.object(HierarchicalFeatureFusion, "forward", fusion(args.features)):
            for name in sources:  # the CAM depends neither on the seeds nor on R-CAM's feature: keep one copy
                if name == "ground truth":
                    oracle = ground_truth_seeds(truths, data.num_classes)
                    with mock.patch.object(swtformer, "structure_aware_seeds", oracle):
                        cam, rcams[name] = multiscale_maps(model, x, mask, cams.scales, cams.flip, "structure")
                else:
                    cam, rcams[name] = multiscale_maps(model, x, mask, cams.scales, cams.flip, name)
        for row, image_id in enumerate(group):
            keys = np.array([0, *data.labels[image_id]])
            evaluators["CAM"].add(with_background(cam[row, keys[1:] - 1][None])[0].cpu().numpy(), keys, truths[row])
            for name in sources:
                evaluators[name].add(rcams[name][row, keys].cpu().numpy(), keys, truths[row])

    cosine = np.mean(cosines)
    print(f"{len(ids)} images of {cams.split}; R-CAM on {args.features}; mean |cos| of last-stage tokens: {cosine:.3f}")
    print(f"{'map (seeds)':<26} {'argmax':>7} {'best':>7} {'at t':>6} {'fg prec':>8} {'fg rec':>7}")
    for name, evaluator in evaluators.items():
        summary = evaluator.summary()
        precision, recall = foreground_precision_recall(evaluator.argmax_confusion)
        label = name if name == "CAM" else f"R-CAM ({name})"
        print(
            f"{label:<26} {summary['miou_argmax']:>7.3f} {summary['miou_best']:>7.3f} {summary['best_threshold']:>6.2f}"
            f" {precision:>8.3f} {recall:>7.3f}"
        )


if __name__ == "__main__":
    main()
