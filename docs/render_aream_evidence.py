"""Draw the AReAM evidence of a trained classifier: per-block entropy and what each block's attention does to the CAM.

Rows are train images; columns: the image, its ground truth, the CAM of its first class on the attention's token
grid, that CAM re-activated by each block alone (DeiT: every block; SWTformer: the blocks of ``loss.aream.stage``),
and by the mean of all blocks (what ``cams`` stores as ``aream``). Each column's title gives its foreground share
(:func:`pipeline.aream_evidence.foreground_share` over the ``--images`` rows: how much of the map lies on its
class; a uniform map scores the classes' area share, also given), the figure's title each block's batch-mean
entropy in bits (the official layer weights); both are also printed as JSON.

Usage (after ``dvc repro train_cls`` or a ``dvc exp run`` with ``loss.aream.enabled=true``):
    python docs/render_aream_evidence.py --model-dir models/cls --data data/prepared --out docs/aream_evidence.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.aream_evidence import attention_evidence, foreground_share  # noqa: E402
from pipeline.cams import aream_settings  # noqa: E402
from pipeline.data.datasets import normalize  # noqa: E402
from pipeline.data.layout import PreparedDataset  # noqa: E402
from pipeline.models.swtformer import load_classifier  # noqa: E402
from pipeline.viz import colorize  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models/cls")
    parser.add_argument("--data", type=Path, default=ROOT / "data/prepared")
    parser.add_argument("--images", type=int, default=6, help="rows: the first train images with a label")
    parser.add_argument("--out", type=Path, default=ROOT / "docs/aream_evidence.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    data = PreparedDataset.open(args.data)
    model, meta = load_classifier(args.model_dir, torch.device("cpu"))
    settings = aream_settings(meta) or {"stage": 3, "steps": 2}
    ids = [i for i in data.split("train") if data.labels[i]][: args.images]
    x = torch.stack([normalize(data.load_image(i), tuple(meta["mean"]), tuple(meta["std"])) for i in ids])
    labels = torch.zeros(len(ids), data.num_classes - 1)
    for row, image_id in enumerate(ids):
        labels[row, [k - 1 for k in data.labels[image_id]]] = 1
    evidence = attention_evidence(model, x, labels, **settings)
    masks = torch.stack([torch.from_numpy(data.load_mask(i)).long() for i in ids])  # (B, H, W)
    maps = [("CAM", evidence["cam"])]
    maps += [(f"block {k}", m) for k, m in enumerate(evidence["reactivated"])] + [("all blocks", evidence["fused"])]
    shares = {name: round(foreground_share(value, masks, labels), 3) for name, value in maps}
    uniform = round(foreground_share(torch.ones_like(evidence["cam"]), masks, labels), 3)  # the classes' area share
    fig, axes = plt.subplots(len(ids), 2 + len(maps), figsize=(1.6 * (2 + len(maps)), 1.6 * len(ids)), squeeze=False)
    for row, image_id in enumerate(ids):
        first = data.labels[image_id][0] - 1
        axes[row, 0].imshow(data.load_image(image_id))
        axes[row, 1].imshow(colorize(data.load_mask(image_id), data.palette))
        for col, (name, value) in enumerate(maps, 2):
            axes[row, col].imshow(value[row, first].numpy(), cmap="jet", interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(f"{name}\nfg share {shares[name]:.2f}", fontsize=8)
        axes[row, 0].set_ylabel(data.class_names[first + 1], fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    entropy = [round(float(e), 3) for e in evidence["entropy"]]
    title = f"{args.model_dir}: entropy (bits) per block {entropy}; fg share of a uniform map {uniform}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    report = {"model_dir": str(args.model_dir), "images": ids, "entropy_bits": entropy, "fg_share": shares}
    report["fg_share_uniform"] = uniform
    print(json.dumps(report | {"out": str(args.out)}))


if __name__ == "__main__":
    main()
