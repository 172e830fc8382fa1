"""``refine``: seeds -> one pseudo-label PNG per image, by threshold, dense CRF, PSA random walk, PAR, or combinations.

Per-image work runs in a process pool (one torch thread per worker). Ground truth is read only for the
metrics: pseudo-label mIoU (pixels labelled 255 are not scored; their share is reported), the mIoU of the
thresholded seeds they come from, and a gallery.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from PIL import Image
from tqdm import tqdm

from pipeline.config import PSA_METHODS, ParParams, RefineParams
from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.errors import DatasetError
from pipeline.io import CamStore, save_label_png
from pipeline.live import open_live
from pipeline.metrics import confusion_matrix, image_miou, iou_report
from pipeline.models.affinitynet import AffinityModel, load_affinity_model
from pipeline.outputs import replaced_dir
from pipeline.parallel import map_ordered, resolve_workers
from pipeline.refinement.crf import dense_crf
from pipeline.refinement.par import PAR, refine_at_scale
from pipeline.refinement.random_walk import walk_seed_scores
from pipeline.refinement.seeds import (
    argmax_labels,
    choose_seed_map,
    open_cam_store,
    seed_scores,
    threshold_labels,
    with_constant_background,
)
from pipeline.refinement.wegformer import (
    ORACLE,
    check_saliency_dir,
    drs_ignore,
    drs_scores,
    epom,
    load_saliency,
    oracle_saliency,
    soft_erase,
)
from pipeline.shard import sharded
from pipeline.viz import Picks, Row, caption, label_gallery_row, pick_galleries

log = logging.getLogger(__name__)
PAR_METHODS = ("par", "par_crf")


@lru_cache(maxsize=2)
def _par_module(params: ParParams) -> PAR:
    """One PAR per worker and parameter set, so its neighbour index and sparsity pattern are reused."""
    return PAR(params.dilations, params.iterations, params.w1, params.w2)


def par_pseudo_label(image: np.ndarray, maps: np.ndarray, keys: np.ndarray, params: RefineParams) -> np.ndarray:
    """``refine.method: par | par_crf``: PAR on the softmax of the seed scores (AFA), optionally then the CRF.

    With ``refine.par.thresholds: null`` the scores are ``[bg ; M_c]`` with ``refine``'s background and every
    pixel gets the argmax. With ``[low, high]`` (AFA / AReAM) two stacks with the constant backgrounds ``high``
    and ``low`` share one PAR kernel: the ``high`` labels are kept where they are foreground, background is
    where the ``low`` labels are background too, the rest is 255.

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) seed maps, channel 0 background.
        keys: (K,) class ids of the channels.
        params: The ``refine`` section.

    Returns:
        (H, W) uint8 class ids, 255 = ignore (only with thresholds).
    """
    thresholds = params.par.thresholds
    if thresholds is None:
        stacks = seed_scores(maps, params.bg_threshold)[None]  # (1, K, H, W)
    else:
        stacks = np.stack([with_constant_background(maps, t) for t in (thresholds[1], thresholds[0])])  # (2, K, H, W)
    rgb = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    with torch.inference_mode():
        refined = refine_at_scale(_par_module(params.par), rgb, torch.from_numpy(stacks)[None], params.par.scale)
    if params.method == "par_crf":
        crf = params.crf.model_dump()
        choice = np.stack([dense_crf(image, probs, **crf).argmax(0) for probs in refined[0].numpy()])  # (S, H, W)
    else:
        choice = refined[0].max(1).indices.numpy()  # (S, H, W); first max like argmax_labels; torch's argmax
        # over a leading dimension is ~10x slower than max here
    labels = np.asarray(keys)[choice].astype(np.uint8)  # (S, H, W)
    if thresholds is None:
        return labels[0]
    high, low = labels
    return np.where(high != 0, high, np.where(low == 0, 0, IGNORE)).astype(np.uint8)


def pseudo_label(
    image: np.ndarray, maps: np.ndarray, keys: np.ndarray, params: RefineParams, affinity: AffinityModel | None
) -> np.ndarray:
    """The pseudo label of one image by ``params.method``.

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) seed maps (channel 0 background, replaced by ``params.bg_threshold`` unless it is None).
        keys: (K,) class ids of the channels (background + the image's classes: the CRF's label set).
        params: The ``refine`` section.
        affinity: The AffinityNet, for ``psa`` and ``psa_crf``.

    Returns:
        (H, W) uint8 class ids (255 = ignore, only from ``none`` with an ignore band and PAR with thresholds).
    """
    if params.method == "none":
        return threshold_labels(maps, keys, params.bg_threshold, params.ignore_band)
    if params.method in PAR_METHODS:
        return par_pseudo_label(image, maps, keys, params)
    scores = seed_scores(maps, params.bg_threshold)  # (K, H, W)
    if params.method in PSA_METHODS:
        if affinity is None:
            raise ValueError(f"refine.method={params.method} needs the affinity model")
        walked = walk_seed_scores(
            torch.from_numpy(scores),
            affinity.affinities(image),
            affinity.offsets,
            affinity.net.stride,
            params.psa.beta,
            2**params.psa.logt,
        )
        scores = walked.numpy()
    if params.method in ("crf", "psa_crf"):
        scores = dense_crf(image, scores, **params.crf.model_dump())
    return argmax_labels(scores, keys)


def wegformer_label(
    image: np.ndarray,
    maps: np.ndarray,
    keys: np.ndarray,
    params: RefineParams,
    affinity: AffinityModel | None,
    saliency: np.ndarray | None,
) -> np.ndarray:
    """:func:`pseudo_label` with ``refine.wegformer``'s steps around it (each off unless set).

    Soft erase flattens the class maps; with a saliency map the scores are DRS's (background ``1 - saliency``,
    weak cues zeroed) and DRS's ignored pixels are set after the method; EPOM then ignores background pixels that
    score above a class's threshold on the (soft-erased) maps.

    Args:
        image: (H, W, 3) uint8 RGB.
        maps: (K, H, W) stored maps, channel 0 background.
        keys: (K,) class ids of the channels.
        params: The ``refine`` section.
        affinity: The AffinityNet, for ``psa`` and ``psa_crf``.
        saliency: (H, W) saliency in [0, 1], or ``None``.

    Returns:
        (H, W) uint8 class ids, 255 = ignore.
    """
    weg = params.wegformer
    if weg.soft_erase is not None:
        maps = soft_erase(maps, weg.soft_erase)
    scores = drs_scores(maps, saliency, weg.cue_threshold) if saliency is not None else maps  # (K, H, W)
    label = pseudo_label(image, scores, keys, params, affinity)
    if saliency is not None:
        label = drs_ignore(label, scores, saliency, weg.conflict_threshold)
    if weg.epom:
        label = epom(label, maps, keys, weg.epom_fg_threshold)
    return label


_WORKER: dict[str, object] = {}


def _init_worker(params: RefineParams, model_dir: str | None) -> None:
    _WORKER["params"] = params
    _WORKER["affinity"] = load_affinity_model(model_dir) if model_dir is not None else None


def _job(job: tuple) -> np.ndarray:
    image, maps, keys, saliency = job
    return wegformer_label(image, maps, keys, _WORKER["params"], _WORKER["affinity"], saliency)


def pseudo_labels(
    jobs: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]],
    params: RefineParams,
    model_dir: Path | None,
    workers: int,
) -> Iterator[np.ndarray]:
    """Pseudo labels for ``(image, maps, keys, saliency)`` jobs, in order, computed by ``workers`` processes.

    Args:
        jobs: Iterable of ``(image, maps, keys, saliency or None)``.
        params: The ``refine`` section.
        model_dir: The AffinityNet directory (needed for the PSA methods, else ``None``).
        workers: Number of processes (1 = in this process).

    Yields:
        (H, W) uint8 labels per job.
    """
    model_arg = str(model_dir) if params.method in PSA_METHODS else None
    yield from map_ordered(_job, jobs, workers, initializer=_init_worker, initargs=(params, model_arg))


class _Scores:
    """Confusion matrices of pseudo labels and seeds, and the ignored-pixel count."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.pseudo = np.zeros((num_classes, num_classes), np.int64)
        self.seed = np.zeros_like(self.pseudo)
        self.ignored = self.pixels = self.images = 0

    def add(self, pseudo: np.ndarray, seed: np.ndarray, gt: np.ndarray) -> None:
        kept = pseudo != IGNORE
        self.pseudo += confusion_matrix(pseudo[kept], gt[kept], self.num_classes)
        self.seed += confusion_matrix(seed, gt, self.num_classes)
        self.ignored += int((~kept).sum())
        self.pixels += pseudo.size
        self.images += 1

    @classmethod
    def merged(cls, parts: list[_Scores]) -> _Scores:
        """The summed counts of ``parts`` (those of a sharded run's processes)."""
        total = cls(parts[0].num_classes)
        for part in parts:
            total.pseudo += part.pseudo
            total.seed += part.seed
            total.ignored += part.ignored
            total.pixels += part.pixels
            total.images += part.images
        return total

    def metrics(self, names: list[str]) -> dict[str, float]:
        if self.images == 0:
            return {}
        pseudo, seed = iou_report(self.pseudo, names, "pseudo"), iou_report(self.seed, names, "seed")
        out = {"pseudo/miou": pseudo["pseudo/miou"], "seed/miou": seed["seed/miou"]}
        out["gain_miou"] = out["pseudo/miou"] - out["seed/miou"]
        out["pseudo/ignored_fraction"] = self.ignored / self.pixels
        out |= pseudo | seed  # adds the per-class IoUs; the two mIoUs keep their place
        out["images_scored"] = self.images
        return out


class _Scoring:
    """Pseudo labels scored against the ground truth (with the seeds they come from) and offered to the gallery.

    Args:
        data: The prepared dataset.
        store: The CAM store.
        seed_map: The stored map the seeds come from.
        params: The ``refine`` section.
        scored: The ids to score (``None``: all with ground truth).
    """

    def __init__(
        self, data: PreparedDataset, store: CamStore, seed_map: str, params: RefineParams, scored: set[str] | None
    ) -> None:
        self.data, self.store, self.seed_map, self.params, self.scored = data, store, seed_map, params, scored
        self.scores = _Scores(data.num_classes)
        self.picks = Picks(params.gallery_size)

    def __call__(self, entry: tuple[int, str], label: np.ndarray) -> tuple[str, np.ndarray]:
        """Score one ``(place in the image list, image id)``'s (H, W) label; returns ``(image id, label)``."""
        order, image_id = entry
        if (self.scored is None or image_id in self.scored) and self.data.mask_path(image_id).is_file():
            maps = self.store.load(image_id)
            seed = threshold_labels(maps[self.seed_map], maps["keys"], self.params.bg_threshold)
            gt = self.data.load_mask(image_id)
            self.scores.add(label, seed, gt)
            self.picks.add(image_miou(label, gt, self.data.num_classes), (image_id, seed, label, gt), order)
        return image_id, label


def _jobs(
    data: PreparedDataset, store: CamStore, ids: list[str], seed_map: str, saliency_from: str | None,
    saliency_dir: Path | None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]]:  # fmt: skip
    """``(image, (K, H, W) seed maps, (K,) keys, saliency or None)`` of each image, for :func:`pseudo_labels`.

    ``saliency_from`` is ``refine.wegformer.saliency``; ``saliency_dir`` its checked folder (``None`` for none
    or the oracle).
    """
    for image_id in ids:
        entry = store.load(image_id)
        image = data.load_image(image_id)
        saliency = None
        if saliency_from == ORACLE:
            saliency = oracle_saliency(data, image_id)
        elif saliency_dir is not None:
            saliency = load_saliency(saliency_dir, image_id, image.shape[:2])
        yield image, entry[seed_map].astype(np.float32), entry["keys"].astype(np.int64), saliency


def refine_pseudo_labels(
    params: RefineParams, data_dir: Path, cams_dir: Path, aff_dir: Path, out_dir: Path, results_dir: Path
) -> dict[str, float]:
    """Write ``<out_dir>/<image_id>.png`` for every image of the CAM store, plus metrics and a gallery.

    Under ``torchrun`` the images are shared out by rank and merged on rank 0 (:mod:`pipeline.shard`): the
    outputs are those of one process.

    Args:
        params: The ``refine`` section.
        data_dir: Prepared dataset (images, palette; ground truth for the metrics only).
        cams_dir: CAM store written by ``cams``.
        aff_dir: AffinityNet written by ``train_aff`` (read only by the PSA methods).
        out_dir: Output directory of the palette PNGs (255 = ignore).
        results_dir: dvclive directory (``metrics.json``, gallery).

    Returns:
        The metrics (pseudo-label and seed mIoU on the images with ground truth, ignored fraction, ...) on rank 0;
        ``{}`` on the other ranks.

    Raises:
        DatasetError: If an input (a saliency map too) is missing or the seed map is not in the store.
    """
    data = PreparedDataset.open(data_dir)
    store = open_cam_store(cams_dir)
    ids = store.ids
    try:
        seed_map = choose_seed_map(list(store.load(ids[0])), params.seed_map) if ids else "cam"
    except ValueError as exc:
        raise DatasetError(f"{cams_dir}: {exc} (refine.seed_map)") from None
    model_dir = aff_dir if params.method in PSA_METHODS else None
    if model_dir is not None:
        load_affinity_model(model_dir)  # fail early, in this process, with a clear message
    with sharded("cpu") as (_, shard):
        work = {"ids": ids, "params": params.model_dump(mode="json")}
        shard.agree("refine", f"{len(ids)} images in {cams_dir}", work)
        workers = resolve_workers(params.workers)
        log.info("refine: method=%s, seed map=%s, %d images, %d worker(s)", params.method, seed_map, len(ids), workers)
        saliency_from = params.wegformer.saliency
        saliency_dir = check_saliency_dir(saliency_from) if saliency_from not in (None, ORACLE) else None
        scored = set(data.split(params.score_split)) & set(ids) if params.score_split else None
        if scored is not None and not scored:
            raise DatasetError(
                f"refine.score_split = {params.score_split} shares no image with the CAM store {cams_dir}"
            )
        live = open_live(results_dir) if shard.is_main else None
        if live is not None:
            live.log_params({"seed_map": seed_map, "workers": workers})
        started = time.perf_counter()
        mine = shard.mine(list(enumerate(ids)))
        jobs = _jobs(data, store, [image_id for _, image_id in mine], seed_map, saliency_from, saliency_dir)
        scoring = _Scoring(data, store, seed_map, params, scored)
        labelled = map(scoring, mine, pseudo_labels(jobs, params, model_dir, workers))
        quiet = None if shard.is_main else True  # rank 0 shows every rank's progress
        bar = tqdm(total=len(ids), desc=f"refine ({params.method})", unit="img", disable=quiet, mininterval=2)
        with replaced_dir(out_dir) if shard.is_main else contextlib.nullcontext() as staging:
            for image_id, label in shard.merged(labelled, len(ids), chunk=16):  # rank 0: every label
                save_label_png(staging / f"{image_id}.png", label, data.palette)
                bar.update()
        bar.close()
        log.info("refine: %d pseudo labels in %.1f s", len(ids), time.perf_counter() - started)
        parts = shard.gather((scoring.scores, scoring.picks))
        if live is None:
            return {}
        _log_galleries(live, Picks.merged([picks for _, picks in parts]), data, params.method)
        metrics = _Scores.merged([scores for scores, _ in parts]).metrics(data.class_names)
        metrics |= {"images_without_labels": sum(not data.labels.get(i) for i in ids)}
        for name, value in metrics.items():
            live.log_metric(name, value if isinstance(value, int) else round(float(value), 5), plot=False)
        live.end()
        return metrics


def _log_galleries(live: Live, picks: Picks, data: PreparedDataset, method: str) -> None:
    """``gallery.png`` and ``failures.png`` (lowest pseudo-label IoU): image | seeds | pseudo label | ground truth."""

    def draw(iou: float, item: tuple) -> Row:
        image_id, seed, label, gt = item
        labels = {"seeds": seed, "pseudo label": label, "ground truth": gt}
        image = data.load_image(image_id)
        return label_gallery_row(caption(image_id, "pseudo label", iou), image, labels, data.palette)

    title = f"seeds and pseudo labels (refine.method = {method})"
    for file, picture in pick_galleries(picks, draw, title, data.class_names, data.palette).items():
        live.log_image(file, Image.fromarray(picture))
