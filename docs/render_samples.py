"""Render docs/synthetic_samples.png: a few synthetic benchmark images above their ground-truth masks.

Usage: python docs/render_samples.py [--count 6] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.config import SyntheticParams
from pipeline.data.layout import voc_palette
from pipeline.data.synthetic import class_names, generate_sample
from pipeline.viz import colorize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("synthetic_samples.png"))
    args = parser.parse_args()
    spec = SyntheticParams()
    palette = [list(c) for c in voc_palette(len(class_names()))]
    columns = []
    for index in range(args.count):
        image, mask, _ = generate_sample(index, args.seed, spec)
        columns.append(np.concatenate([image, colorize(mask, palette)], axis=0))
    grid = np.concatenate(columns, axis=1)
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
