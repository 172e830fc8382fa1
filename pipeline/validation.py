"""Validation of models on a split of the prepared dataset: used after training epochs and by ``cams``/``evaluate``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from pipeline import runtime
from pipeline.data.datasets import normalize, same_size_batches
from pipeline.data.layout import PreparedDataset
from pipeline.metrics import classification_map, confusion_matrix
from pipeline.models.deeplab import Segmenter, predict_probs
from pipeline.models.swtformer import SWTformer


@torch.no_grad()
def evaluate_classifier(
    model: SWTformer, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, amp: bool
) -> dict[str, float]:
    """Class-wise and sample-wise mAP of the classifier's sigmoid scores on batches of ``ClassificationEvalSet``."""
    was_training = model.training
    model.eval()
    scores, targets = [], []
    for batch in batches:
        with runtime.autocast(device, amp):
            logits = model.classify(batch["image"].to(device))
        scores.append(torch.sigmoid(logits.float()).cpu().numpy())
        targets.append(batch["labels"].numpy())
    model.train(was_training)
    return classification_map(np.concatenate(scores), np.concatenate(targets))


@torch.no_grad()
def split_confusion(
    model: Segmenter,
    data: PreparedDataset,
    split: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    amp: bool,
    batch_size: int = 16,
) -> np.ndarray:
    """Single-scale confusion matrix of a split against its ground-truth masks (metrics only).

    Returns:
        (K, K) int64 matrix, rows = ground truth.
    """
    was_training = model.training
    model.eval()
    confusion = np.zeros((data.num_classes, data.num_classes), np.int64)
    for ids, images in same_size_batches(data.split(split), data.load_image, batch_size):
        x = torch.stack([normalize(im, mean, std) for im in images]).to(device)  # (B, 3, H, W)
        pred = predict_probs(model, x, (1.0,), False, amp).argmax(1).cpu().numpy()  # (B, H, W)
        for row, image_id in enumerate(ids):
            confusion += confusion_matrix(pred[row], data.load_mask(image_id), data.num_classes)
    model.train(was_training)
    return confusion
