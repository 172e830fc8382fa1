"""``train_aff``: train the PSA AffinityNet on confident affinity labels derived from the seeds.

The labels come from the CAM store (two CRFs per image, :func:`confident_labels`, computed once in a process
pool, shared out over the ranks of a ``torchrun`` launch) and are written as PNGs beside the checkpoint, which the
training set reads; ground truth is read only to report how good those labels are. Writes
``<model_dir>/model.safetensors`` + ``meta.json`` (everything ``refine`` needs), dvclive curves in
``<results_dir>`` and, after every epoch, a resumable checkpoint (deleted when training completes), like
``train_cls``.

Only ``refine.method`` ``psa`` and ``psa_crf`` read the AffinityNet: for any other method the stage trains nothing
and writes ``meta.json`` saying so (:func:`skip_affinity_net`), so that a run of the default CRF pipeline does
not spend its time on a model nobody reads. The stage depends on that one key (``refine.method`` in
``dvc.yaml``), so switching to a PSA method re-runs it.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pipeline import runtime, training
from pipeline.config import PSA_METHODS, StageParams, TrainAffParams
from pipeline.data.datasets import normalize, paste_crop
from pipeline.data.layout import IGNORE, PreparedDataset
from pipeline.errors import DatasetError
from pipeline.io import CamStore, labels_fingerprint, load_label_png, save_label_png, write_json
from pipeline.models.affinitynet import AffinityNet
from pipeline.models.files import META, SKIPPED, save_model_dir
from pipeline.outputs import replaced_dir
from pipeline.parallel import map_ordered, resolve_workers
from pipeline.refinement.affinity import (
    affinity_loss,
    confident_labels,
    grid_labels,
    pair_affinities,
    pair_label_masks,
    radius_offsets,
)
from pipeline.refinement.seeds import choose_seed_map, open_cam_store
from pipeline.shard import Shard

log = logging.getLogger(__name__)
LOSS_TERMS = ("total", "bg", "fg", "neg")
"""The terms of :func:`affinity_loss`, logged as ``train/loss_<term>`` (the curves ``dvc.yaml`` draws together)."""
GT_EVAL_IMAGES = 64  # images used for the ground-truth affinity check after each epoch


def _label_job(job: tuple) -> np.ndarray:
    image, maps, keys, cfg = job
    labels = cfg.labels
    fg, bg = (labels.fg_score, labels.bg_score) if labels.mode == "constant" else (labels.fg_alpha, labels.bg_alpha)
    return confident_labels(image, maps, keys, labels.crf.model_dump(), fg, bg, labels.mode)


def make_affinity_labels(
    data: PreparedDataset, store: CamStore, ids: list[str], cfg: TrainAffParams, out_dir: Path, shard: Shard
) -> str:
    """Confident affinity labels of every image as ``<out_dir>/<id>.png``, shared out over the ranks.

    Each rank of a ``torchrun`` launch computes its share (:meth:`Shard.mine`) in a process pool and writes it;
    all ranks wait until every file exists (the training samples of a rank change with the epoch). The labels
    stay on disk, not in memory (COCO's would take 25 GB) nor in the checkpoint.

    Returns:
        The resolved seed map name.

    Raises:
        DatasetError: If the requested seed map is not in the store.
    """
    try:
        seed_map = choose_seed_map(list(store.load(ids[0])), cfg.seed_map)
    except ValueError as exc:
        raise DatasetError(f"{store.directory}: {exc} (train_aff.seed_map)") from None
    if shard.is_main:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
    shard.barrier()
    mine = shard.mine(ids)

    def jobs():
        for image_id in mine:
            entry = store.load(image_id)
            yield data.load_image(image_id), entry[seed_map].astype(np.float32), entry["keys"], cfg

    workers = resolve_workers(cfg.label_workers)
    started = time.perf_counter()
    bar = tqdm(total=len(mine), desc="affinity labels", unit="img", disable=None if shard.is_main else True)
    for image_id, label in zip(mine, map_ordered(_label_job, jobs(), workers), strict=True):
        save_label_png(out_dir / f"{image_id}.png", label, data.palette)
        bar.update()
    bar.close()
    shard.barrier()
    log.info(
        "affinity labels (%s seeds) for %d images in %.1f s with %d process(es) per rank",
        seed_map,
        len(ids),
        time.perf_counter() - started,
        workers,
    )
    return seed_map


def label_quality(data: PreparedDataset, ids: list[str], label_dir: Path) -> dict[str, float]:
    """Coverage (non-ignored fraction) and precision of the affinity labels against ground truth, if any."""
    labelled = correct = total = 0
    for image_id in ids:
        if not data.mask_path(image_id).is_file():
            continue
        gt, label = data.load_mask(image_id), load_label_png(label_dir / f"{image_id}.png")
        scored = (label != IGNORE) & (gt != IGNORE)
        labelled += int(scored.sum())
        correct += int((label[scored] == gt[scored]).sum())
        total += int((gt != IGNORE).sum())
    if total == 0:
        return {}
    return {"labels/coverage": labelled / total, "labels/precision": correct / max(labelled, 1)}


def _crop(image: np.ndarray, labels: np.ndarray, size: int, flip: bool, rng: np.random.Generator) -> tuple:
    """A random ``size`` x ``size`` crop (zero image / 255 label padding where the image is smaller), maybe flipped."""
    h, w = labels.shape
    # four draws in this order (not two crop_offsets draws): trained AffinityNet weights depend on them
    sy, sx = int(rng.integers(0, max(h - size, 0) + 1)), int(rng.integers(0, max(w - size, 0) + 1))
    ty, tx = int(rng.integers(0, max(size - h, 0) + 1)), int(rng.integers(0, max(size - w, 0) + 1))
    out_image = paste_crop(np.zeros((size, size, 3), np.uint8), image, (sy, sx), (ty, tx))
    out_labels = paste_crop(np.full((size, size), IGNORE, np.uint8), labels, (sy, sx), (ty, tx))
    if flip and rng.random() < 0.5:
        out_image, out_labels = out_image[:, ::-1], out_labels[:, ::-1]
    return out_image, out_labels


class AffinityTrainSet(Dataset):
    """Random crops of the training images with their affinity labels, normalised for the AffinityNet.

    The crop of image ``i`` in epoch ``e`` depends only on ``(seed, e, i)``, so resumed runs are exact.

    Args:
        data: The prepared dataset.
        ids: Image ids.
        label_dir: The (H, W) uint8 affinity labels (255 = ignore) of every id, as ``<id>.png``.
        crop_size: Side of the square crops.
        flip: Random horizontal flips.
        mean: Normalisation mean.
        std: Normalisation std.
        seed: The global seed.
    """

    def __init__(
        self,
        data: PreparedDataset,
        ids: list[str],
        label_dir: Path,
        crop_size: int,
        flip: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        seed: int,
    ) -> None:
        self.data, self.ids, self.label_dir = data, ids, label_dir
        self.crop_size, self.flip, self.mean, self.std, self.seed = crop_size, flip, mean, std, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """``image`` (3, S, S) normalised, ``labels`` (S, S) uint8."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image_id = self.ids[index]
        labels = load_label_png(self.label_dir / f"{image_id}.png")
        image, labels = _crop(self.data.load_image(image_id), labels, self.crop_size, self.flip, rng)
        return {
            "image": normalize(np.ascontiguousarray(image), self.mean, self.std),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
        }


def _pad_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pad (H, W) labels with 255 (bottom/right) to (height, width)."""
    out = np.full((height, width), IGNORE, np.uint8)
    out[: labels.shape[0], : labels.shape[1]] = labels
    return out


def _grid_targets(model: AffinityNet, labels: list[np.ndarray]) -> torch.Tensor:
    """Same-size (H, W) label maps -> (B, h, w) int64 pure-cell labels on the model's grid."""
    h, w = model.grid_size(*labels[0].shape)
    s = model.stride
    return torch.from_numpy(np.stack([grid_labels(_pad_labels(y, h * s, w * s), s) for y in labels])).long()


@torch.no_grad()
def ground_truth_affinity(
    model: AffinityNet, data: PreparedDataset, ids: list[str], radius: int, mean, std, device: torch.device
) -> dict[str, float]:
    """Mean predicted affinity of pairs that ground truth calls same-label vs different-label (a sanity check)."""
    offsets = radius_offsets(radius)
    sums = {"bg": 0.0, "fg": 0.0, "neg": 0.0}
    counts = dict.fromkeys(sums, 0)
    model.eval()
    for image_id in ids:
        gt = data.load_mask(image_id)
        x = normalize(data.load_image(image_id), mean, std)[None].to(device)  # (1, 3, H, W)
        affinity = pair_affinities(model(x).float(), offsets)  # (1, D, h, w)
        masks = pair_label_masks(_grid_targets(model, [gt]).to(device), offsets)
        for name, mask in masks.items():
            sums[name] += float(affinity[mask].sum())
            counts[name] += int(mask.sum())
    model.train()
    return {f"gt/affinity_{name}": sums[name] / counts[name] for name in sums if counts[name]}


def _save_model(model: AffinityNet, params: StageParams, seed_map: str, model_dir: Path) -> None:
    meta = {
        "model": params.train_aff.model.model_dump(mode="json"),
        "radius": params.train_aff.radius,
        "stride": model.stride,
        "seed_map": seed_map,
        "mean": list(params.data.mean),
        "std": list(params.data.std),
    }
    save_model_dir(model_dir, model, meta)


def train_affinity_net(
    params: StageParams, data_dir: Path, cams_dir: Path, model_dir: Path, results_dir: Path, checkpoint: Path
) -> dict[str, float]:
    """Derive affinity labels from the seeds and train the AffinityNet on them.

    Args:
        params: Sections ``seed``, ``data``, ``train_aff`` and the key ``refine.method`` (any method but ``psa``
            and ``psa_crf``: nothing is trained, see :func:`skip_affinity_net`).
        data_dir: Prepared dataset.
        cams_dir: CAM store written by ``cams``.
        model_dir: Where ``model.safetensors`` + ``meta.json`` go.
        results_dir: dvclive directory.
        checkpoint: Resumable checkpoint path.

    Returns:
        The final metrics (losses of the last epoch, label quality, ground-truth affinity check); ``{}`` when
        nothing was trained.

    Raises:
        DatasetError: If the inputs are missing.
        TrainingError: On a non-finite loss or too few images for one batch.
    """
    method = params.leaf("refine.method")
    if method not in PSA_METHODS:
        skip_affinity_net(method, model_dir, results_dir, checkpoint)
        return {}
    cfg = params.train_aff
    data = PreparedDataset.open(data_dir)
    store = open_cam_store(cams_dir)
    ids = store.ids
    batch_size = training.rehearsal_batch("train_aff", cfg.batch_size, len(ids), params.data.subset)
    training.check_batch("train_aff", batch_size, len(ids))
    run = training.setup("train_aff", cfg.device, cfg.threads, params.seed, batch_size)
    mean, std = tuple(params.data.mean), tuple(params.data.std)
    model = AffinityNet(**cfg.model.model_dump()).to(run.device)
    groups = training.param_groups(model, model.new_modules(), cfg.lr, cfg.head_lr_mult, cfg.weight_decay)
    label_dir = labels_beside(checkpoint)
    seed_map = make_affinity_labels(data, store, ids, cfg, label_dir, Shard(run.dist))
    quality = label_quality(data, ids, label_dir) if run.dist.is_main else {}
    gt_ids = [i for i in ids if data.mask_path(i).is_file()][:GT_EVAL_IMAGES]
    task = training.Task(
        "train_aff",
        model,
        training.make_optimizer(cfg.optimizer, groups, cfg.momentum),
        AffinityTrainSet(data, ids, label_dir, cfg.crop_size, cfg.flip, mean, std, params.seed),
        _loss_step(model, run.device, cfg.amp, radius_offsets(cfg.radius)),
        save=lambda trained: _save_model(trained, params, seed_map, model_dir),
        validate=lambda epoch: ground_truth_affinity(model, data, gt_ids, cfg.radius, mean, std, run.device),
        live_params={"seed_map": seed_map},
        static_metrics=quality,
    )
    digest = f"{params.digest()}-{labels_fingerprint(label_dir, ids)}"  # the labels too: they come from the CAMs
    history = training.fit(task, training.Recipe.of(cfg, batch_size=batch_size), run, results_dir, checkpoint, digest)
    if run.dist.is_main:
        shutil.rmtree(label_dir, ignore_errors=True)
    return {**quality, **(history[-1] if history else {})}


def labels_beside(checkpoint: Path) -> Path:
    """Where a run's affinity labels go: beside its checkpoint (``checkpoints/train_aff_labels/``), deleted with it."""
    return checkpoint.parent / f"{checkpoint.stem}_labels"


def skip_affinity_net(method: str, model_dir: Path, results_dir: Path, checkpoint: Path) -> None:
    """Write the outputs of a ``train_aff`` that trains nothing because ``refine.method`` does not read the model.

    ``<model_dir>/meta.json`` holds only ``{"skipped": reason}`` (loading it fails with that reason); the results
    hold empty metrics and the loss curves with no step (header-only TSVs: ``dvc plots show`` draws them empty
    instead of failing, and git keeps them, unlike empty folders); a checkpoint of an earlier interrupted run is
    removed.
    """
    reason = f"refine.method was {method!r} when train_aff ran; only {' and '.join(PSA_METHODS)} use the AffinityNet"
    log.info("train_aff: nothing to train (%s)", reason)
    with replaced_dir(model_dir) as staging:
        write_json(staging / META, {SKIPPED: reason})
    with replaced_dir(results_dir) as staging:
        write_json(staging / "metrics.json", {})
        curves = staging / "plots" / "metrics" / "train"
        curves.mkdir(parents=True)
        for term in LOSS_TERMS:
            (curves / f"loss_{term}.tsv").write_text(f"step\tloss_{term}\n")
    checkpoint.unlink(missing_ok=True)
    shutil.rmtree(labels_beside(checkpoint), ignore_errors=True)


def _loss_step(model: AffinityNet, device: torch.device, amp: bool, offsets: list[tuple[int, int]]) -> training.Step:
    """The training step of :class:`pipeline.training.Task`: pair affinities against the pair labels."""

    def step(net: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"].to(device)  # (B, 3, S, S)
        masks = pair_label_masks(_grid_targets(model, list(batch["labels"].numpy())).to(device), offsets)
        with runtime.autocast(device, amp):
            features = net(images)  # (B, F, h, w)
        terms = affinity_loss(pair_affinities(features.float(), offsets), masks)
        return terms["total"], {f"loss_{name}": value for name, value in terms.items()}

    return step
