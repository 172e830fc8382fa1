"""``evaluate``: mIoU of the segmentation model, single-scale, multi-scale + flip, and with CRF post-processing.

VOC protocol: one confusion matrix over background + C classes for the whole split, ground-truth 255 ignored,
IoU per class and their mean (:mod:`pipeline.metrics`). Writes ``<results>/metrics.json`` (dvclive), the
confusion matrices (``confusion.json`` and a picture per mode) and a gallery (image | predictions | ground truth).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from PIL import Image
from tqdm import tqdm

from pipeline import train
from pipeline.config import EvaluateParams
from pipeline.data.datasets import normalize
from pipeline.data.layout import DatasetError, PreparedDataset
from pipeline.data.seg_datasets import same_size_batches
from pipeline.io import write_json
from pipeline.metrics import confusion_matrix, iou_per_class, mean_iou
from pipeline.seg import load_segmenter, predict_probs
from pipeline.viz import confusion_image, seg_gallery_row

log = logging.getLogger(__name__)


class ConfusionSet:
    """One confusion matrix per evaluation mode (e.g. ``single_scale``, ``multi_scale``, ``crf``)."""

    def __init__(self, modes: list[str], num_classes: int) -> None:
        self.matrices = {mode: np.zeros((num_classes, num_classes), np.int64) for mode in modes}
        self.num_classes = num_classes

    def add(self, mode: str, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image's (H, W) prediction against its (H, W) ground truth (255 ignored)."""
        self.matrices[mode] += confusion_matrix(pred, gt, self.num_classes)

    def summary(self, names: list[str]) -> dict[str, float]:
        """Flat metrics: ``<mode>/miou`` and ``<mode>/iou/<class>`` (classes absent from GT and predictions skipped)."""
        out: dict[str, float] = {}
        for mode, matrix in self.matrices.items():
            out[f"{mode}/miou"] = mean_iou(matrix)
            for name, iou in zip(names, iou_per_class(matrix), strict=True):
                if not np.isnan(iou):
                    out[f"{mode}/iou/{name}"] = float(iou)
        return out


def _check_classes(meta: dict, data: PreparedDataset, model_dir: Path) -> None:
    if list(meta["class_names"]) != data.class_names:
        raise DatasetError(
            f"{model_dir / 'meta.json'} was trained on classes {meta['class_names']}, "
            f"but {data.root / 'classes.json'} lists {data.class_names}"
        )


def evaluate_segmenter(params: EvaluateParams, data_dir: Path, model_dir: Path, results_dir: Path) -> dict[str, float]:
    """Evaluate the model on ``evaluate.split`` and write metrics, confusion matrices and a gallery.

    Args:
        params: The ``evaluate`` section.
        data_dir: Prepared dataset (images and ground-truth masks).
        model_dir: Model written by ``train_seg``.
        results_dir: dvclive directory.

    Returns:
        The flat metrics (``single_scale/miou``, ``multi_scale/miou``, per-class IoUs, ...).

    Raises:
        SegModelError: If the model is missing.
        DatasetError: If the data is missing or its classes differ from the model's.
    """
    data = PreparedDataset.open(data_dir)
    device = train.resolve_device(params.device)
    train.set_threads(params.threads)
    model, meta = load_segmenter(model_dir, device)
    _check_classes(meta, data, model_dir)
    mean, std, names = tuple(meta["mean"]), tuple(meta["std"]), data.class_names
    ids = data.split(params.split)
    confusions = ConfusionSet(["single_scale", "multi_scale"], data.num_classes)
    live = Live(str(results_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    shown = 0

    bar = tqdm(total=len(ids), desc=f"evaluate {params.split}", unit="img", disable=None, mininterval=2)
    for group, images in same_size_batches(ids, data.load_image, params.batch_size):
        x = torch.stack([normalize(im, mean, std) for im in images]).to(device)  # (B, 3, H, W)
        single = predict_probs(model, x, (1.0,), False, params.amp).argmax(1).cpu().numpy()  # (B, H, W)
        multi = predict_probs(model, x, params.scales, params.flip, params.amp).argmax(1).cpu().numpy()
        for row, image_id in enumerate(group):
            gt = data.load_mask(image_id)
            confusions.add("single_scale", single[row], gt)
            confusions.add("multi_scale", multi[row], gt)
            if shown < params.gallery_size:
                panel = seg_gallery_row(images[row], [single[row], multi[row], gt], data.palette)
                live.log_image(f"gallery/{shown:02d}_{image_id}.png", Image.fromarray(panel))
                shown += 1
        bar.update(len(group))
    bar.close()

    metrics = confusions.summary(names)
    for name, value in metrics.items():
        live.log_metric(name, round(value, 5), plot=False)
    for mode, matrix in confusions.matrices.items():
        live.log_image(f"confusion_{mode}.png", Image.fromarray(confusion_image(matrix, names)))
    write_json(
        Path(results_dir) / "confusion.json",
        {"classes": names, "rows": "ground truth", **{m: c.tolist() for m, c in confusions.matrices.items()}},
    )
    live.end()
    return metrics
