"""Segmentation and classification metrics: confusion-matrix mIoU, seed-evaluation protocols, mAP."""

from __future__ import annotations

import numpy as np

from pipeline.data.layout import IGNORE


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """Accumulate a confusion matrix, skipping ground-truth pixels equal to 255.

    Args:
        pred: Predicted class ids, any shape.
        gt: Ground-truth class ids, same shape; 255 marks ignored pixels.
        num_classes: Number of classes K (background included).

    Returns:
        A (K, K) int64 matrix; rows are ground truth, columns predictions.
    """
    gt = gt.reshape(-1).astype(np.int64)
    pred = pred.reshape(-1).astype(np.int64)
    keep = gt != IGNORE
    return np.bincount(num_classes * gt[keep] + pred[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU = TP / (GT + Pred - TP) per class; NaN for a class absent from both GT and predictions."""
    tp = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.maximum(union, 1), np.nan)


def mean_iou(confusion: np.ndarray) -> float:
    """Mean IoU over the classes that occur (NaN-mean of :func:`iou_per_class`)."""
    return float(np.nanmean(iou_per_class(confusion)))


def image_miou(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    """One image's mIoU over the classes in its ground truth or prediction; NaN if every pixel is ignored.

    Pixels that are 255 in the ground truth or in the prediction (a pseudo label's ignore band) are not scored.
    """
    confusion = confusion_matrix(pred, np.where(pred == IGNORE, IGNORE, gt), num_classes)
    return mean_iou(confusion) if confusion.any() else float("nan")


def iou_report(confusion: np.ndarray, class_names: list[str], prefix: str, suffix: str = "") -> dict[str, float]:
    """The mIoU and per-class IoUs of one confusion matrix, as flat metric names (the ``metrics.json`` keys).

    Args:
        confusion: (K, K) matrix, rows ground truth (:func:`confusion_matrix`).
        class_names: K names, background first.
        prefix: What was scored (``multi_scale``, ``pseudo``, ``cam``).
        suffix: Appended to ``miou`` and ``iou`` (e.g. ``_argmax``, for a protocol).

    Returns:
        ``{prefix}/miou{suffix}``, then ``{prefix}/iou{suffix}/{name}`` in class order; classes absent from
        both ground truth and predictions (NaN IoU) are left out.
    """
    report = {f"{prefix}/miou{suffix}": mean_iou(confusion)}
    for name, iou in zip(class_names, iou_per_class(confusion), strict=True):
        if not np.isnan(iou):
            report[f"{prefix}/iou{suffix}/{name}"] = float(iou)
    return report


def threshold_grid(max_threshold: float, step: float) -> np.ndarray:
    """Constant background scores 0, step, ... up to max_threshold (inclusive, robust to float error)."""
    count = int(np.floor(max_threshold / step + 1e-9)) + 1
    return np.round(np.arange(count) * step, 10)


class SeedEvaluator:
    """Seed mIoU under the two protocols, accumulated image by image.

    Protocol (a): argmax over the stored maps including the background channel.
    Protocol (b): the background channel replaced by a constant score t, for every t of a grid; the best t
    is reported (a full sweep, no early stop). Ties go to background, like ``argmax`` with background first.
    """

    def __init__(self, num_classes: int, thresholds: np.ndarray) -> None:
        self.num_classes = num_classes
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.argmax_confusion = np.zeros((num_classes, num_classes), np.int64)
        self.sweep_confusions = np.zeros((len(self.thresholds), num_classes, num_classes), np.int64)

    def add(self, maps: np.ndarray, keys: np.ndarray, gt: np.ndarray) -> None:
        """Add one image.

        Args:
            maps: (N, H, W) scores; channel 0 is background, channels 1.. are the classes in ``keys[1:]``.
            keys: (N,) class ids of the channels, ``keys[0] == 0``.
            gt: (H, W) ground truth with 255 = ignore.
        """
        keys = np.asarray(keys)
        maps = maps.astype(np.float32)
        self.argmax_confusion += confusion_matrix(keys[maps.argmax(0)], gt, self.num_classes)
        if len(keys) == 1:
            fg_score = np.full(gt.shape, -np.inf, np.float32)
            fg_label = np.zeros(gt.shape, np.int64)
        else:
            fg_score = maps[1:].max(0)
            fg_label = keys[1:][maps[1:].argmax(0)]
        # one histogram instead of one confusion matrix per threshold: a pixel is foreground at t_i iff i < k,
        # k = the number of thresholds below its best foreground score
        n, count = self.num_classes, len(self.thresholds)
        keep = gt.reshape(-1) != IGNORE
        truth = gt.reshape(-1)[keep].astype(np.int64)
        k = np.searchsorted(self.thresholds, fg_score.reshape(-1)[keep].astype(np.float64), side="left")
        cells = (k * n + truth) * n + fg_label.reshape(-1)[keep]
        hist = np.bincount(cells, minlength=(count + 1) * n * n).reshape(count + 1, n, n)  # (T+1, gt, fg label)
        self.sweep_confusions += hist[::-1].cumsum(0)[::-1][1:]  # (T, n, n): still foreground at t_i
        self.sweep_confusions[:, :, 0] += hist.cumsum(0)[:-1].sum(2)  # (T, n): background at t_i, by gt row

    @classmethod
    def merged(cls, parts: list[SeedEvaluator]) -> SeedEvaluator:
        """One evaluator holding the summed counts of ``parts`` (e.g. those of a sharded run's processes)."""
        total = cls(parts[0].num_classes, parts[0].thresholds)
        for part in parts:
            total.argmax_confusion += part.argmax_confusion
            total.sweep_confusions += part.sweep_confusions
        return total

    def summary(self) -> dict[str, object]:
        """Return mIoU, per-class IoU and the confusion matrix for both protocols, and the sweep's best threshold."""
        sweep = np.array([mean_iou(c) for c in self.sweep_confusions])
        best = int(np.nanargmax(sweep))
        return {
            "miou_argmax": mean_iou(self.argmax_confusion),
            "iou_argmax": iou_per_class(self.argmax_confusion),
            "miou_best": float(sweep[best]),
            "best_threshold": float(self.thresholds[best]),
            "iou_best": iou_per_class(self.sweep_confusions[best]),
            "sweep": sweep,
            "confusion_argmax": self.argmax_confusion,
            "confusion_best": self.sweep_confusions[best],
        }


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Non-interpolated average precision (the definition sklearn uses), ties handled per distinct score.

    Args:
        scores: (N,) scores.
        targets: (N,) binary relevance.

    Returns:
        AP in [0, 1], or NaN if there is no positive.
    """
    targets = np.asarray(targets).astype(bool)
    if not targets.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    hits = targets[order].astype(np.float64)
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), len(hits) - 1]
    tp = np.cumsum(hits)[last_of_tie]
    precision = tp / (last_of_tie + 1)
    recall = tp / targets.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def classification_map(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Classification mAP, class-wise (VOC style) and sample-wise (MCTformer style).

    Args:
        scores: (N, C) scores per image and foreground class.
        targets: (N, C) binary image-level labels.

    Returns:
        ``{"map_classwise": ..., "map_samplewise": ...}``; classes or images without positives are skipped.
    """
    classwise = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    samplewise = [average_precision(scores[n], targets[n]) for n in range(scores.shape[0])]
    return {"map_classwise": float(np.nanmean(classwise)), "map_samplewise": float(np.nanmean(samplewise))}
