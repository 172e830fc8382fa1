"""Draw docs/ladder_gallery.png (and docs/ladder_failures.png) from a finished run, for the README.

The ladder is evaluate's gallery of train images through the stages: image | seeds | pseudo label | DeepLab |
ground truth. ``evaluate`` writes it with ``evaluate.gallery_size`` rows (results/evaluate/plots/images/); this
script draws the same picture with fewer rows, from the run's outputs (data/cams, data/pseudo_labels,
models/seg) and params.yaml, through the same code (:func:`pipeline.evaluate.ladder_galleries`).

Usage (after ``dvc repro`` / ``make run``): python docs/render_gallery.py [--rows 4]
With ``--page``, it also runs ``dvc plots show`` and saves a screenshot of the page, drawn offline by headless
Chromium, to docs/plots_page.png.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import load_params  # noqa: E402
from pipeline.data.layout import PreparedDataset  # noqa: E402
from pipeline.evaluate import LadderInputs, ladder_galleries  # noqa: E402
from pipeline.models.deeplab import load_segmenter  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4, help="images per picture")
    parser.add_argument("--page", action="store_true", help="also screenshot `dvc plots show` to docs/")
    parser.add_argument("--run", type=Path, default=ROOT, help="the checkout holding the run (default: this one)")
    args = parser.parse_args()
    run = args.run
    params = load_params(run / "params.yaml")
    evaluate = params.evaluate.model_copy(update={"gallery_size": args.rows})
    model, meta = load_segmenter(run / "models/seg", torch.device("cpu"))
    ladder = LadderInputs(run / "data/cams", run / "data/pseudo_labels", params.refine)
    pictures = ladder_galleries(model, meta, PreparedDataset.open(run / "data/prepared"), ladder, evaluate)
    for name, picture in pictures.items():
        Image.fromarray(picture).save(ROOT / "docs" / name)
        print(f"wrote docs/{name} ({picture.shape[1]} x {picture.shape[0]})")
    if args.page:
        sys.path.insert(0, str(ROOT / "tests"))
        from browser import screenshot

        subprocess.run([sys.executable, "-m", "dvc", "plots", "show"], cwd=run, check=True)
        screenshot(run / "dvc_plots" / "index.html", ROOT / "docs" / "plots_page.png")
        print("wrote docs/plots_page.png")


if __name__ == "__main__":
    main()
