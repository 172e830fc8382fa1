"""``evaluate``: mIoU of the segmentation model, single-scale, multi-scale + flip, and with CRF post-processing.

VOC protocol: one confusion matrix over background + C classes for the whole split, ground-truth 255 ignored,
IoU per class and their mean (:mod:`pipeline.metrics`). Writes ``<results>/metrics.json`` (dvclive), the
confusion matrices (``confusion.json`` and a picture per mode) and galleries: the first val images (image |
single-scale | multi-scale | CRF | ground truth), the lowest-IoU ones, and, given the CAM store and the pseudo
labels, a ladder of train images through the stages (image | seeds | pseudo label | DeepLab | ground truth).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from PIL import Image
from tqdm import tqdm

from pipeline import runtime
from pipeline.config import EvaluateParams, RefineParams
from pipeline.data.datasets import normalize, same_size_batches, size_batches
from pipeline.data.layout import PreparedDataset
from pipeline.io import load_label_png, write_json
from pipeline.live import open_live
from pipeline.metrics import confusion_matrix, image_miou, iou_report
from pipeline.models.deeplab import load_segmenter, predict_probs
from pipeline.models.files import check_classes
from pipeline.parallel import OrderedPool, resolve_workers
from pipeline.refinement.crf import dense_crf
from pipeline.refinement.seeds import choose_seed_map, open_cam_store, threshold_labels
from pipeline.shard import sharded
from pipeline.viz import Picks, Row, caption, confusion_image, label_gallery_row, pick_galleries

log = logging.getLogger(__name__)


class ConfusionSet:
    """One confusion matrix per evaluation mode (e.g. ``single_scale``, ``multi_scale``, ``crf``)."""

    def __init__(self, modes: list[str], num_classes: int) -> None:
        self.matrices = {mode: np.zeros((num_classes, num_classes), np.int64) for mode in modes}
        self.num_classes = num_classes

    def add(self, mode: str, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image's (H, W) prediction against its (H, W) ground truth (255 ignored)."""
        self.matrices[mode] += confusion_matrix(pred, gt, self.num_classes)

    @classmethod
    def merged(cls, parts: list[ConfusionSet]) -> ConfusionSet:
        """The summed matrices of ``parts`` (those of a sharded run's processes)."""
        total = cls(list(parts[0].matrices), parts[0].num_classes)
        for part in parts:
            for mode, matrix in part.matrices.items():
                total.matrices[mode] += matrix
        return total

    def summary(self, names: list[str]) -> dict[str, float]:
        """Flat metrics: ``<mode>/miou`` and ``<mode>/iou/<class>`` (classes absent from GT and predictions skipped)."""
        out: dict[str, float] = {}
        for mode, matrix in self.matrices.items():
            out |= iou_report(matrix, names, mode)
        return out


def crf_labels(image: np.ndarray, probs: np.ndarray, crf: dict[str, float], min_prob: float = 0.0) -> np.ndarray:
    """Dense CRF on the labels that matter: (K, H, W) probabilities of a (H, W, 3) uint8 image -> (H, W) uint8 labels.

    Labels whose probability stays below ``min_prob`` at every pixel are left out of the CRF (its cost grows with the
    number of labels: 21 on VOC, 81 on COCO, of which an image has a few); if none reaches it, all are kept.
    """
    return _crf_on_kept(image, *kept_labels(probs, min_prob), crf)


def kept_labels(probs: np.ndarray, min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) probabilities -> the (K', H, W) of the labels reaching ``min_prob`` somewhere, and their (K',) ids."""
    keep = np.flatnonzero(probs.reshape(len(probs), -1).max(1) >= min_prob)  # (K',) label ids
    if len(keep) == 0:
        keep = np.arange(len(probs))
    return (probs if len(keep) == len(probs) else probs[keep]), keep


def _crf_on_kept(image: np.ndarray, probs: np.ndarray, keep: np.ndarray, crf: dict[str, float]) -> np.ndarray:
    return keep[dense_crf(image, probs, **crf).argmax(0)].astype(np.uint8)


def crf_job(image_id: str, image: np.ndarray, probs: np.ndarray, crf: dict[str, float], min_prob: float) -> tuple:
    """One image's job for :func:`_crf_job`: pruned here, so that only the kept probabilities travel to a worker."""
    return image_id, image, *kept_labels(probs, min_prob), crf


def _crf_job(job: tuple[str, np.ndarray, np.ndarray, np.ndarray, dict[str, float]]) -> tuple[str, np.ndarray]:
    """``(image id, (H, W, 3) uint8 image, (K', H, W) kept probs, (K',) their ids, CRF kwargs)`` -> ``(id, labels)``."""
    image_id, image, probs, keep, params = job
    return image_id, _crf_on_kept(image, probs, keep, params)


@dataclass(frozen=True)
class LadderInputs:
    """What the ladder gallery reads besides the model: the CAM store, the pseudo labels and how seeds were cut."""

    cams_dir: Path
    pseudo_dir: Path
    refine: RefineParams


def evaluate_segmenter(
    params: EvaluateParams, data_dir: Path, model_dir: Path, results_dir: Path, ladder: LadderInputs | None = None
) -> dict[str, float]:
    """Evaluate the model on ``evaluate.split`` and write metrics, confusion matrices and galleries.

    Under ``torchrun`` the batches are shared out by rank and merged on rank 0 (:mod:`pipeline.shard`): the
    outputs are those of one process.

    Args:
        params: The ``evaluate`` section.
        data_dir: Prepared dataset (images and ground-truth masks).
        model_dir: Model written by ``train_seg``.
        results_dir: dvclive directory.
        ladder: Given, the ladder gallery of train images through the stages is drawn too (:func:`ladder_galleries`).

    Returns:
        The flat metrics (``single_scale/miou``, ``multi_scale/miou``, per-class IoUs, ...) on rank 0; ``{}`` on the
        other ranks.

    Raises:
        SegModelError: If the model is missing.
        DatasetError: If the data is missing.
        ModelError: If the model's classes differ from the data's.
    """
    data = PreparedDataset.open(data_dir)
    with sharded(params.device) as (device, shard):
        runtime.set_threads(params.threads)
        model, meta = load_segmenter(model_dir, device)
        check_classes(meta, model_dir, data.root, data.class_names)
        ids = data.split(params.split)
        work = {"ids": ids, "params": params.model_dump(mode="json"), "model": meta}
        shard.agree("evaluate", f"{len(ids)} images of {params.split}", work)
        live = open_live(results_dir) if shard.is_main else None
        plan = size_batches(ids, data.image_size, params.batch_size)
        scoring = _ValScoring(model, meta, params, data, device, ids)
        mine = shard.mine(plan)
        quiet = None if shard.is_main else True  # rank 0 shows its own share
        bar = tqdm(total=sum(map(len, mine)), desc=f"evaluate {params.split}", unit="img", disable=quiet, mininterval=2)
        workers = resolve_workers(params.crf_workers) if params.use_crf else 0
        # at most 2 images per CRF worker in flight (one worker: the CRF runs here, image by image)
        with OrderedPool(_crf_job, workers if workers > 1 else 0, in_flight=2) as crf:
            for group in mine:
                scoring(group, crf)
                bar.update(len(group))
            scoring.add_crf(crf.drain())
        bar.close()
        parts = shard.gather((scoring.confusions, scoring.picks, scoring.crf_shown))
        if live is None:
            return {}
        confusions = ConfusionSet.merged([confusions for confusions, _, _ in parts])
        crf_shown = {image_id: label for _, _, shown in parts for image_id, label in shown.items()}
        pictures = _val_galleries(Picks.merged([picks for _, picks, _ in parts]), crf_shown, data)
        if ladder is not None:
            pictures |= ladder_galleries(model, meta, data, ladder, params)
        metrics = confusions.summary(data.class_names)
        _write_results(live, confusions, metrics, data.class_names, Path(results_dir), pictures)
        return metrics


class _ValScoring:
    """Batches of val images through the model (single-scale, multi-scale + flip, CRF), scored as they come.

    Args:
        model: The segmentation model.
        meta: Its ``meta.json`` (``mean``, ``std``).
        params: The ``evaluate`` section.
        data: The prepared dataset.
        device: Where the model runs.
        ids: The images of ``evaluate.split``, in order (an image's place there orders the gallery's picks).
    """

    def __init__(
        self, model: torch.nn.Module, meta: dict, params: EvaluateParams, data: PreparedDataset, device: torch.device,
        ids: list[str],
    ) -> None:  # fmt: skip
        self.model, self.params, self.data, self.device = model, params, data, device
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.order = {image_id: k for k, image_id in enumerate(ids)}
        modes = ["single_scale", "multi_scale"] + (["crf"] if params.use_crf else [])
        self.confusions = ConfusionSet(modes, data.num_classes)
        self.picks = Picks(params.gallery_size)
        self.shown = set(ids[: params.gallery_size])
        self.crf_shown: dict[str, np.ndarray] = {}  # id -> CRF labels, for the gallery

    def __call__(self, group: list[str], crf: OrderedPool) -> None:
        """Score one batch of same-size images; their CRF goes to ``crf``'s workers."""
        params, data = self.params, self.data
        images = [data.load_image(image_id) for image_id in group]
        x = torch.stack([normalize(im, self.mean, self.std) for im in images]).to(self.device)  # (B, 3, H, W)
        single = predict_probs(self.model, x, (1.0,), False, params.amp).argmax(1).cpu().numpy()  # (B, H, W)
        probs = predict_probs(self.model, x, params.scales, params.flip, params.amp).cpu().numpy()  # (B, K, H, W)
        multi = probs.argmax(1)  # (B, H, W)
        crf_args = params.crf.model_dump()
        for row, image_id in enumerate(group):
            gt = data.load_mask(image_id)
            self.confusions.add("single_scale", single[row], gt)
            self.confusions.add("multi_scale", multi[row], gt)
            iou = image_miou(multi[row], gt, data.num_classes)
            self.picks.add(iou, (image_id, images[row], single[row], multi[row]), self.order[image_id])
            if params.use_crf:
                self.add_crf(crf.submit(crf_job(image_id, images[row], probs[row], crf_args, params.crf_min_prob)))

    def add_crf(self, results: list[tuple[str, np.ndarray]]) -> None:
        """Score finished CRF labels ``(image id, (H, W) labels)``."""
        for image_id, label in results:
            self.confusions.add("crf", label, self.data.load_mask(image_id))
            if image_id in self.shown:
                self.crf_shown[image_id] = label


def _val_galleries(picks: Picks, crf_shown: dict[str, np.ndarray], data: PreparedDataset) -> dict[str, np.ndarray]:
    """``gallery.png`` and ``failures.png`` (lowest multi-scale IoU): image | predictions | ground truth."""

    def draw(iou: float, item: tuple) -> Row:
        image_id, image, single, multi = item
        labels = {"single-scale": single, "multi-scale": multi}
        if image_id in crf_shown:
            labels["CRF"] = crf_shown[image_id]
        labels["ground truth"] = data.load_mask(image_id)
        return label_gallery_row(caption(image_id, "multi-scale", iou), image, labels, data.palette)

    return pick_galleries(picks, draw, "DeepLab on val", data.class_names, data.palette)


def ladder_galleries(
    model: torch.nn.Module, meta: dict, data: PreparedDataset, ladder: LadderInputs, params: EvaluateParams
) -> dict[str, np.ndarray]:
    """One train image through the stages: image | seeds | pseudo label | DeepLab | ground truth.

    The pool is the first ``4 * gallery_size`` images of the CAM store that have ground truth; DeepLab
    predicts them single-scale. ``ladder_gallery.png`` shows the first ``gallery_size`` of them and
    ``ladder_failures.png`` the ``gallery_size`` with the lowest DeepLab IoU.

    Returns:
        File name -> (H, W, 3) uint8 picture (none when no image of the store has ground truth).
    """
    store = open_cam_store(ladder.cams_dir)
    pool = [i for i in store.ids if data.mask_path(i).is_file()][: 4 * params.gallery_size]
    if not pool:
        return {}
    seed_map = choose_seed_map(list(store.load(pool[0])), ladder.refine.seed_map)
    mean, std, device = tuple(meta["mean"]), tuple(meta["std"]), next(model.parameters()).device
    picks = Picks(params.gallery_size)
    for group, images in same_size_batches(pool, data.load_image, params.batch_size):
        x = torch.stack([normalize(im, mean, std) for im in images]).to(device)  # (B, 3, H, W)
        predictions = predict_probs(model, x, (1.0,), False, params.amp).argmax(1).cpu().numpy()  # (B, H, W)
        for image_id, image, prediction in zip(group, images, predictions, strict=True):
            picks.add(image_miou(prediction, data.load_mask(image_id), data.num_classes), (image_id, image, prediction))

    def draw(iou: float, item: tuple) -> Row:
        image_id, image, prediction = item
        entry = store.load(image_id)
        labels = {
            "seeds": threshold_labels(entry[seed_map], entry["keys"], ladder.refine.bg_threshold),
            "pseudo label": load_label_png(ladder.pseudo_dir / f"{image_id}.png"),
            "DeepLab": prediction,
            "ground truth": data.load_mask(image_id),
        }
        return label_gallery_row(caption(image_id, "DeepLab", iou), image, labels, data.palette)

    title = f"train images through the stages ({seed_map} seeds; failures among the first {len(pool)})"
    return pick_galleries(picks, draw, title, data.class_names, data.palette, prefix="ladder_")


def _write_results(
    live: Live, confusions: ConfusionSet, metrics: dict[str, float], names: list[str], results_dir: Path,
    pictures: dict[str, np.ndarray],
) -> None:  # fmt: skip
    for file, picture in pictures.items():
        live.log_image(file, Image.fromarray(picture))
    for name, value in metrics.items():
        live.log_metric(name, round(value, 5), plot=False)
    for mode, matrix in confusions.matrices.items():
        live.log_image(f"confusion_{mode}.png", Image.fromarray(confusion_image(matrix, names)))
    write_json(
        results_dir / "confusion.json",
        {"classes": names, "rows": "ground truth", **{m: c.tolist() for m, c in confusions.matrices.items()}},
    )
    live.end()
