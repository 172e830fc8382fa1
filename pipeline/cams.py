"""``cams``: multi-scale + flip CAM / R-CAM inference, the sharded CAM store, and seed evaluation.

Works for both classifiers of ``model.arch`` (read from the model's ``meta.json``): SWTformer V1/V2, and the
DeiT classifier, whose CAM is its patch-token head's (no R-CAM).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from dvclive import Live
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import runtime
from pipeline.config import CamsParams, SeedLocating
from pipeline.data.datasets import ClassificationEvalSet, index_batches, normalize, size_batches
from pipeline.data.layout import PreparedDataset
from pipeline.errors import DatasetError, ModelError
from pipeline.io import CamWriter
from pipeline.live import open_live
from pipeline.metrics import SeedEvaluator, classification_map, image_miou, iou_report, threshold_grid
from pipeline.models.files import check_classes
from pipeline.models.swtformer import (
    Features,
    SWTformer,
    load_classifier,
    max_norm,
    shared_classifier_scores,
    with_background,
)
from pipeline.relevance import multiscale_relevance
from pipeline.shard import Shard, sharded
from pipeline.viz import Picks, Row, cam_gallery_row, caption, pick_galleries

log = logging.getLogger(__name__)


def present_class_mask(labels: list[list[int]], num_classes: int, device: torch.device) -> torch.Tensor:
    """Image-level labels (class ids >= 1 per image) -> (B, K, 1, 1) mask: background (channel 0) + present classes."""
    mask = torch.zeros(len(labels), num_classes, 1, 1, device=device)
    mask[:, 0] = 1
    for row, present in enumerate(labels):
        mask[row, present] = 1
    return mask


def _unflip(x: torch.Tensor) -> torch.Tensor:
    """Sum each (original, flipped) pair of a (2B, ...) batch after flipping the second half back: -> (B, ...)."""
    half = x.shape[0] // 2
    return x[:half] + x[half:].flip(-1)


@torch.no_grad()
def multiscale_maps(
    model: SWTformer | torch.nn.Module,
    images: torch.Tensor,
    label_mask: torch.Tensor,
    scales: tuple[float, ...],
    flip: bool,
    seed_locating: SeedLocating,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CAM and (V2) R-CAM of a batch of same-size images, summed over scales and max-normalised.

    Flipped copies are fused at the feature level before normalisation (SIPE's scheme): raw CAM logits,
    tokens and HFF features of the flipped image are flipped back and added.

    Args:
        model: The classifier in eval mode (:class:`SWTformer`, or the DeiT classifier: same ``features`` /
            ``maps`` interface, ``fused`` always ``None``).
        images: (B, 3, H, W) normalised images.
        label_mask: (B, K, 1, 1) background (1) + image-level labels.
        scales: Input scales.
        flip: Add horizontally flipped copies.
        seed_locating: How R-CAM's seeds are located (``structure`` | ``cam``, see :meth:`SWTformer.maps`).

    Returns:
        ``(cam, rcam)``: (B, C, H, W) CAM over all foreground classes and (B, K, H, W) R-CAM (``None`` for V1),
        both max-normalised per channel after summing over scales.
    """
    maps = multiscale_all_maps(model, images, label_mask, scales, flip, seed_locating)
    return maps["cam"], maps.get("rcam")


@torch.no_grad()
def multiscale_all_maps(
    model: SWTformer | torch.nn.Module,
    images: torch.Tensor,
    label_mask: torch.Tensor,
    scales: tuple[float, ...],
    flip: bool,
    seed_locating: SeedLocating,
    aream: Mapping[str, int] | None = None,
    amp: bool = False,
) -> dict[str, torch.Tensor]:
    """:func:`multiscale_maps` as a mapping, plus (``aream``: a model trained with AReAM) its re-activated CAM.

    Args:
        model: The classifier.
        images: (B, 3, H, W) normalised images.
        label_mask: (B, K, 1, 1) present classes (V2's seeds).
        scales: Scales of the input.
        flip: Add flipped copies.
        seed_locating: V2's seeds at inference.
        aream: ``meta.json``'s AReAM settings (``stage``, ``steps``; SWTformer only) or ``None``.
        amp: The backbone's forward (and AReAM's re-activation) in bfloat16 (float16 where unsupported) on CUDA;
            the maps, seeds and normalisation stay float32. Nothing changes on the CPU.

    Returns:
        ``cam`` (B, C, H, W), ``rcam`` (B, K, H, W) for V2, and with ``aream`` the CAM re-activated through the
        attention (the ``reactivated`` method of :class:`pipeline.models.deit.DeiTClassifier` or
        :class:`SWTformer`), each copy re-activated before the flipped one is flipped back; all summed over
        scales and max-normalised.
    """
    h, w = images.shape[-2:]
    sums: dict[str, torch.Tensor] = {}
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False) if scale != 1 else images
        if flip:
            x = torch.cat([x, x.flip(-1)])
        with runtime.autocast(images.device, amp):
            feats, extra = model.reactivated(x, **aream) if aream is not None else (model.features(x), None)
        feats = Features(*(None if t is None else t.float() for t in (feats.logit_map, feats.tokens, feats.fused)))
        extra = extra if extra is None else extra.float()
        if flip:
            fused = feats.fused if feats.fused is None else _unflip(feats.fused)
            feats = Features(_unflip(feats.logit_map), _unflip(feats.tokens), fused)
            extra = extra if extra is None else _unflip(extra)
        out = model.maps(feats, label_mask if feats.fused is not None else None, seed_locating)
        if extra is not None:
            out["aream"] = extra
        for name in ("cam", "rcam", "aream"):
            if name in out:
                resized = F.interpolate(out[name], size=(h, w), mode="bilinear", align_corners=False)
                sums[name] = resized if name not in sums else sums[name] + resized
    return {name: max_norm(total) for name, total in sums.items()}


def scored_ids(data: PreparedDataset, params: CamsParams, ids: list[str]) -> set[str] | None:
    """The ids of ``cams.split`` whose seeds are scored: ``None`` (all of them) unless ``cams.score_split`` is set.

    Raises:
        DatasetError: If ``score_split`` shares no image with ``split``.
    """
    if params.score_split is None:
        return None
    scored = set(data.split(params.score_split)) & set(ids)
    if not scored:
        raise DatasetError(
            f"cams.score_split = {params.score_split} shares no image with cams.split = {params.split}; "
            "seeds could not be scored (use a split contained in cams.split, or null)"
        )
    log.info("cams: seeds for %d images of %s, scored on the %d of %s", len(ids), params.split, len(scored),
             params.score_split)  # fmt: skip
    return scored


def generate_cams(
    params: CamsParams, data_dir: Path, model_dir: Path, cams_dir: Path, results_dir: Path
) -> dict[str, float]:
    """Run inference on ``cams.split``, store CAM/R-CAM shards and write seed metrics, mAP and a gallery.

    Seeds are scored on every image of ``cams.split``, or only on those of ``cams.score_split`` when it is set.
    Under ``torchrun`` the batches are shared out by rank and merged on rank 0 (:mod:`pipeline.shard`): the
    outputs are those of one process.

    Args:
        params: The ``cams`` section.
        data_dir: Prepared dataset.
        model_dir: Classifier written by ``train_cls``.
        cams_dir: Output directory of the CAM shards.
        results_dir: dvclive directory (metrics, sweep curves, gallery).

    Returns:
        The headline metrics (on rank 0; ``{}`` on the other ranks).
    """
    data = PreparedDataset.open(data_dir)
    with sharded(params.device) as (device, shard):
        runtime.set_threads(params.threads)
        model, meta = load_classifier(model_dir, device)
        check_classes(meta, model_dir, data.root, data.class_names)
        ids = data.split(params.split)
        work = {"ids": ids, "params": params.model_dump(mode="json"), "model": meta}
        shard.agree("cams", f"{len(ids)} images of {params.split}", work)
        unlabelled = data.count_unlabelled(params.split, "cams")  # their maps hold the background channel only
        grid = threshold_grid(params.sweep.max, params.sweep.step)
        evaluators = _evaluators(model, meta, params, data.num_classes, grid)
        seeds = _SeedPass(model, meta, params, data, device, ids, scored_ids(data, params, ids), evaluators)
        live = open_live(results_dir) if shard.is_main else None
        plan = size_batches(ids, data.image_size, params.batch_size)
        quiet = None if shard.is_main else True  # rank 0 shows every rank's progress
        bar = tqdm(total=len(ids), desc=f"cams {params.split}", unit="img", disable=quiet, mininterval=2)
        store = CamWriter(cams_dir, params.shard_size, quantize=params.store == "uint8", stride=params.store_stride)
        with store if shard.is_main else contextlib.nullcontext() as writer:
            for stored in shard.merged(map(seeds, shard.mine(plan)), len(plan)):  # rank 0: every batch, in order
                for image_id, keys, maps in stored:
                    writer.add(image_id, keys, maps)
                bar.update(len(stored))
        bar.close()
        parts = shard.gather((evaluators, seeds.picks))
        scores = _val_scores(model, data, meta, device, shard)
        if live is None:
            return {}
        evaluators = {name: SeedEvaluator.merged([part[name] for part, _ in parts]) for name in evaluators}
        _log_galleries(live, Picks.merged([picks for _, picks in parts]), seeds.shown, data)
        headline = _log_seed_metrics(live, evaluators, data.class_names, grid)
        live.log_metric("images_without_labels", unlabelled, plot=False)
        for name, value in classification_map(*scores).items():
            live.log_metric(f"val/{name}", value, plot=False)
            headline[f"val/{name}"] = value
        live.end()
        return headline | {"images_without_labels": unlabelled}


class _SeedPass:
    """The maps of batches of images, scored against the ground truth and offered to the gallery as they come.

    Args:
        model: The classifier in eval mode.
        meta: Its ``meta.json`` (``mean``, ``std``, ``aream``).
        params: The ``cams`` section.
        data: The prepared dataset.
        device: Where the model runs.
        ids: The images of ``cams.split``, in order (an image's place there orders the gallery's picks).
        scored: The ids whose seeds are scored (``None``: all).
        evaluators: One seed evaluator per stored map (:func:`_evaluators`).
    """

    def __init__(
        self, model: torch.nn.Module, meta: dict, params: CamsParams, data: PreparedDataset, device: torch.device,
        ids: list[str], scored: set[str] | None, evaluators: dict[str, SeedEvaluator],
    ) -> None:  # fmt: skip
        self.model, self.params, self.data, self.device = model, params, data, device
        self.mean, self.std = tuple(meta["mean"]), tuple(meta["std"])
        self.aream = aream_settings(meta) if "aream" in evaluators else None
        self.order = {image_id: k for k, image_id in enumerate(ids)}
        self.scored, self.evaluators = scored, evaluators
        self.picks = Picks(params.gallery_size)
        # failure cases: the lowest IoU of this map's argmax seeds
        self.shown = next(m for m in ("rcam", "aream", "cam") if m in evaluators)

    def __call__(self, group: list[str]) -> list[tuple[str, np.ndarray, dict[str, np.ndarray]]]:
        """One batch of same-size images -> ``(image id, keys, maps)`` per image, what the CAM store keeps."""
        params, data = self.params, self.data
        images = [data.load_image(image_id) for image_id in group]
        x = torch.stack([normalize(im, self.mean, self.std) for im in images]).to(self.device)  # (B, 3, H, W)
        labels = [data.labels[i] for i in group]
        mask = present_class_mask(labels, data.num_classes, self.device)
        args = (params.scales, params.flip, params.seed_locating, self.aream, params.amp)
        out = multiscale_all_maps(self.model, x, mask, *args)
        if "relevance" in self.evaluators:
            args = (params.scales, params.flip, params.relevance)
            out["relevance"] = multiscale_relevance(self.model, x, labels, *args)  # (B, C, H, W)
        stored = []
        for row, image_id in enumerate(group):
            keys = np.array([0, *labels[row]], dtype=np.int64)
            maps = image_maps(out, row, keys)
            stored.append((image_id, keys, maps))
            order = self.order[image_id]
            score = self.scored is None or image_id in self.scored
            gt = data.load_mask(image_id) if score or order < params.gallery_size else None
            if score:
                for name, evaluator in self.evaluators.items():
                    evaluator.add(maps[name], keys, gt)
            iou = image_miou(keys[maps[self.shown].argmax(0)], gt, data.num_classes) if score else float("nan")
            self.picks.add(iou, (image_id, images[row], maps, keys, gt), order)
        return stored


def _val_scores(
    model: torch.nn.Module, data: PreparedDataset, meta: dict, device: torch.device, shard: Shard
) -> tuple[np.ndarray, np.ndarray] | None:
    """The classifier's (N, C) scores on val and the (N, C) labels, in batches of 16 shared out by rank.

    Returns:
        The whole split's scores and labels on the main process; ``None`` on the others.
    """
    valset = ClassificationEvalSet(data, "val", meta["img_size"], tuple(meta["mean"]), tuple(meta["std"]))
    plan = index_batches(len(valset), 16)
    loader = DataLoader(valset, batch_sampler=shard.mine(plan))
    return shared_classifier_scores(model, loader, len(plan), device, True, shard)


def aream_settings(meta: dict) -> dict[str, int] | None:
    """AReAM's inference settings (``stage``, ``steps``) from ``meta.json``; ``None`` without AReAM.

    A DeiT model written before the settings were recorded says ``true``: ``{}`` (its defaults).
    """
    recorded = meta.get("aream", False)
    return dict(recorded) if isinstance(recorded, dict) else ({} if recorded else None)


def _evaluators(
    model: torch.nn.Module, meta: dict, params: CamsParams, num_classes: int, grid: np.ndarray
) -> dict[str, SeedEvaluator]:
    """One seed evaluator per stored map: ``cam``, V2's ``rcam``, AReAM's ``aream``, ``relevance`` if asked.

    Raises:
        ModelError: If relevance maps are asked of a classifier that is not the DeiT.
    """
    names = ["cam"] + (["rcam"] if model.version == "v2" else [])
    names += ["aream"] if aream_settings(meta) is not None else []  # a classifier trained with loss.aream
    if params.relevance.kind != "none":
        if model.version != "deit":
            kind = params.relevance.kind
            raise ModelError(f"cams.relevance.kind = {kind} needs the DeiT classifier (model.arch: deit)")
        names.append("relevance")
    return {name: SeedEvaluator(num_classes, grid) for name in names}


def image_maps(out: dict[str, torch.Tensor], row: int, keys: np.ndarray) -> dict[str, np.ndarray]:
    """The stored maps of one image: ``cam``, ``aream``, ``relevance`` (K, H, W, background 1 - max) and ``rcam``.

    Args:
        out: Batch maps by name: ``cam``, ``aream``, ``relevance`` (B, C, H, W) over all foreground classes,
            ``rcam`` (B, K, H, W) over background + all classes.
        row: The image's row in the batch.
        keys: (K,) background + the image's class ids.
    """
    maps = {
        name: with_background(out[name][row, keys[1:] - 1][None])[0].cpu().numpy()
        for name in ("cam", "aream", "relevance")
        if name in out
    }
    if "rcam" in out:
        maps["rcam"] = out["rcam"][row, keys].cpu().numpy()
    return maps


def _log_galleries(live: Live, picks: Picks, shown: str, data: PreparedDataset) -> None:
    """The first images and the lowest-IoU ones (by ``shown``'s argmax seeds), one CAM column per present class."""

    def draw(iou: float, item: tuple) -> Row:
        image_id, image, maps, keys, gt = item
        text = caption(image_id, f"{shown} argmax seeds:", iou)
        return cam_gallery_row(text, image, maps, keys, gt, data.class_names, data.palette)

    extra = {"rcam": " and R-CAM", "aream": " and AReAM"}.get(shown, "")
    title = f"CAM (heat: blue 0 to red 1){extra} per present class"
    for file, picture in pick_galleries(picks, draw, title, data.class_names, data.palette).items():
        live.log_image(file, Image.fromarray(picture))


def _log_seed_metrics(
    live: Live, evaluators: dict[str, SeedEvaluator], names: list[str], grid: np.ndarray
) -> dict[str, float]:
    headline = {}
    for map_name, evaluator in evaluators.items():
        summary = evaluator.summary()
        metrics = {f"{map_name}/{k}": float(summary[k]) for k in ("miou_argmax", "miou_best", "best_threshold")}
        headline |= metrics
        for protocol in ("argmax", "best"):  # adds the per-class IoUs; the mIoUs keep their place
            metrics |= iou_report(summary[f"confusion_{protocol}"], names, map_name, f"_{protocol}")
        for name, value in metrics.items():
            live.log_metric(name, round(value, 5), plot=False)
        points = [{"threshold": float(t), "miou": float(m)} for t, m in zip(grid, summary["sweep"], strict=True)]
        live.log_plot(
            f"sweep_{map_name}",
            points,
            x="threshold",
            y="miou",
            template="linear",
            title=f"{map_name}: seed mIoU vs constant background score",
        )
    return headline
