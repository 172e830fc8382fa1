"""Draw docs/refine_gallery.png: image | CAM | seed | pseudo labels of several refine runs | ground truth.

Usage: python docs/render_refine_gallery.py --data data/prepared --cams data/cams --threshold 0.45
       --labels crf=pl_crf psa=pl_psa psa_crf=pl_psa_crf --ids train_00000 train_00002 --out docs/refine_gallery.png
(each ``--labels`` entry is ``name=directory`` of pseudo-label PNGs written by ``wsss refine --out``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.data.layout import PreparedDataset
from pipeline.io import CamStore, load_label_png
from pipeline.refinement.seeds import threshold_labels
from pipeline.viz import blend, colorize, heatmap


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/prepared")
    parser.add_argument("--cams", default="data/cams")
    parser.add_argument("--seed-map", default="cam")
    parser.add_argument("--threshold", type=float, default=0.45)
    parser.add_argument("--labels", nargs="+", required=True, help="name=directory of pseudo-label PNGs")
    parser.add_argument("--ids", nargs="+", required=True)
    parser.add_argument("--out", default="docs/refine_gallery.png")
    args = parser.parse_args()

    data, store = PreparedDataset.open(args.data), CamStore(args.cams)
    runs = [Path(entry.split("=", 1)[1]) for entry in args.labels]
    rows = []
    for image_id in args.ids:
        entry, image = store.load(image_id), data.load_image(image_id)
        maps = entry[args.seed_map].astype(np.float32)
        panels = [image, blend(image, heatmap(maps[1:].max(0)), 0.6)]
        panels.append(colorize(threshold_labels(maps, entry["keys"], args.threshold), data.palette))
        panels += [colorize(load_label_png(run / f"{image_id}.png"), data.palette) for run in runs]
        panels.append(colorize(data.load_mask(image_id), data.palette))
        rows.append(np.concatenate(panels, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(args.out, optimize=True)


if __name__ == "__main__":
    main()
