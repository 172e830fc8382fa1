"""The cost of a full VOC / COCO run: each stage's pieces measured here, then projected to the whole datasets.

Measures, per image at the real resolution and label count (VOC 500 x 375 with 21 labels, COCO 640 x 480 with 81;
images, maps and labels are synthesised in memory: no dataset is needed), with the models and settings of
``configs/voc_paper.yaml`` / ``configs/coco_paper.yaml`` (random weights: timing does not depend on them):

* JPEG decode + each training stage's augmentation; mask PNG decode + re-encode (``prepare``);
* ``train_cls``: SWTformer-V2 (Swin-T) forward + backward with all losses at the config's crop and batch;
* ``cams``: the multi-scale + flip forward, seed evaluation (both protocols), CAM shard writing (+ its size);
* ``train_aff``: the two label CRFs per image, AffinityNet forward + backward at its crop and batch;
* ``refine``: one pseudo label by the config's method (AffinityNet on the full image, random walk, CRF);
  label PNG writing (+ its size);
* ``train_seg``: DeepLab forward + backward at the config's crop (a smaller batch here, scaled per image);
* ``evaluate``: single-scale + multi-scale + flip forward, and the test-time CRF over all labels.

Each stage's pieces run in a fresh process, whose peak resident memory is recorded. The projection (wall time,
disk with DVC's cache, host memory peak) is printed as Markdown for this machine and for one GPU with 16 cores;
every assumption is printed with it (see ``ASSUMPTIONS``). On a shared machine the timings are indicative.

Usage: python benchmarks/full_run_cost.py [--datasets voc coco] [--quick] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


@dataclass(frozen=True)
class DatasetSpec:
    """What a full run processes: image size, label count, split sizes, raw data on disk."""

    name: str
    config: str
    size: tuple[int, int]  # (width, height) of a typical image
    num_labels: int  # background + classes
    present: float  # mean number of classes per image (image-level labels)
    splits: dict[str, int]
    masks: int  # ground-truth masks prepare writes
    raw_gb: float  # extracted raw data
    raw_peak_gb: float  # during `wsss download` (archive + extracted)


DATASETS = {
    "voc": DatasetSpec(
        "voc", "configs/voc_paper.yaml", (500, 375), 21, 1.5,
        {"train_aug": 10_582, "train": 1_464, "val": 1_449}, 12_031, 2.1, 4.2,
    ),
    "coco": DatasetSpec(
        "coco", "configs/coco_paper.yaml", (640, 480), 81, 2.9,
        {"train": 82_081, "train_aug": 82_081, "val": 40_137}, 122_218, 20.0, 34.0,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Machine:
    """Where the run is projected: CPU cores, and an optional GPU's effective training / inference FLOP rates."""

    name: str
    cores: int
    gpu_train_flops: float = 0.0  # effective FLOP/s of forward + backward; 0 = no GPU
    gpu_infer_flops: float = 0.0


# timm's published benchmark (results/benchmark-*-rtx3090.csv): Swin-T (4.51 GMAC at 224) trains at 646.8 img/s
# (AMP, batch 256) and infers at 1994 img/s (AMP, batch 1024) on an RTX 3090; a FLOP is 2 multiply-adds and
# forward + backward is 3 forwards. An A100/H100-class GPU is taken as GPU_SPEEDUP x an RTX 3090.
RTX3090_TRAIN = 646.8 * 3 * 2 * 4.51e9
RTX3090_INFER = 1994 * 2 * 4.51e9
GPU_SPEEDUP = 2.5
GPU_EFFICIENCY = 0.5  # our batches (16 crops, single full images at 4-5 scales) reach half of timm's big batches

# The share of an image's absent labels that evaluate.crf_min_prob (0.1 in the paper configs) keeps in the CRF,
# measured with the synthetic benchmark's trained DeepLabs (7 labels; weak models, so more than a strong one keeps):
# 0.354 / 0.465 / 0.425 on all 300 val images of seeds 0 / 1 / 2, the largest rounded up;
# `python benchmarks/evaluate_crf.py --images 300 --min-prob 0.1` (docs/cost.md, "evaluate's CRF").
ABSENT_KEPT = 0.47

ASSUMPTIONS = [
    "CPU timings: this machine, torch with --threads threads for model work; CRF, decoding, seed evaluation, "
    "shard and PNG writing single-threaded (as in the stages' worker processes / main loop). Work that the stages "
    "spread over processes (CRFs, refine, data loaders, prepare) is divided by the cores it gets.",
    f"GPU: model FLOPs counted by torch's FlopCounterMode on the real shapes, run at {GPU_EFFICIENCY:g} x the "
    f"effective rate of Swin-T in timm's RTX 3090 benchmark ({RTX3090_TRAIN / 1e12:.1f} TFLOP/s training, "
    f"{RTX3090_INFER / 1e12:.1f} inference) x {GPU_SPEEDUP:g} for an A100/H100-class GPU; CPU-side work as on "
    "this machine's cores, 16 of them. Data loading overlaps the GPU (the slower of the two counts).",
    "Images: VOC 500 x 375, COCO 640 x 480 (their typical sizes), 1.5 / 2.9 classes per image on average; "
    "synthetic maps (smooth, like upsampled CAMs) compress like real ones only roughly.",
    "Disk: DVC's cache holds a copy of every output (cache.type copy, DVC's default on most file systems); "
    "raw data extracted (VOC 2.1 GB, COCO 20 GB; archives deleted after unpacking, peak while unpacking); "
    "the resumable checkpoint (weights + optimiser state) exists only during training; environment not counted.",
    "Memory: each stage's measured process peak plus what the stage keeps for the whole run (a pending CAM "
    "shard, evaluate's batch of probabilities) and its worker processes "
    "(each: the measured peak of a process doing one job; an upper bound for forked data loaders, which share "
    "pages). GPU memory is not projected here: benchmarks/cuda_check.py measures it on a GPU.",
    "evaluate's CRF: the labels above evaluate.crf_min_prob, i.e. the image's own and a share of the others "
    f"({ABSENT_KEPT:g}: benchmarks/evaluate_crf.py with a trained model's probabilities); its cost is linear in the "
    "labels between the two measured counts (all labels, the image's only).",
    "cams: the CAM store compresses in a background thread (on its own core beside a GPU) at cams.store and "
    "cams.store_stride of the config.",
    "Not included: downloads, cams' one val mAP pass, galleries, DVC hashing.",
]


# ------------------------------------------------------------------------------------------------ measurement
SHRINK = {"batch": 1}  # --quick: training steps measured on batch // 4 crops and scaled (FLOPs exactly)


def _timed(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """Median seconds of ``repeats`` calls, after one warm-up call if ``warmup``."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _flops(fn: Callable[[], object]) -> float:
    """FLOPs of one call (matmuls and convolutions, forward and backward), by torch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _flops_and_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """FLOPs of one call (which is also the warm-up) and the median seconds of ``repeats`` more."""
    flops = _flops(fn)
    return flops, _timed(fn, repeats, warmup=False)


def _image(spec: DatasetSpec, seed: int = 0) -> np.ndarray:
    """A (H, W, 3) uint8 image with smooth structure and texture (JPEG-compresses like a photograph)."""
    w, h = spec.size
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 255, (h // 25 + 2, w // 25 + 2, 3)).astype(np.uint8)
    from PIL import Image

    base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _label(spec: DatasetSpec, classes: list[int], seed: int = 0) -> np.ndarray:
    """A (H, W) uint8 label map: background and one ellipse per class, 255 bands on their borders."""
    w, h = spec.size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    label = np.zeros((h, w), np.uint8)
    for c in classes:
        cy, cx, ry, rx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, h * 0.25, w * 0.2
        r = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        label[r < 1.1] = 255
        label[r < 1.0] = c
    return label


def _classes(spec: DatasetSpec) -> list[int]:
    """A typical image's classes: round(mean present) distinct ids."""
    return list(range(1, max(1, round(spec.present)) + 1))


def _maps(spec: DatasetSpec, keys: np.ndarray, seed: int = 0) -> np.ndarray:
    """(K, H, W) float32 smooth seed maps in [0, 1] (channel 0 background), like upsampled max-normalised CAMs."""
    import torch
    import torch.nn.functional as F

    w, h = spec.size
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, len(keys), h // 16 + 1, w // 16 + 1, generator=gen) ** 3  # (1, K, h', w')
    full = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]  # (K, H, W)
    full = full / full.amax(dim=(1, 2), keepdim=True)
    full[0] = 1 - full[1:].amax(0)
    return full.numpy()


def _jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _png(label: np.ndarray, palette: list) -> bytes:
    from pipeline.io import save_label_png

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "label.png"
        save_label_png(path, label, palette)
        return path.read_bytes()


def measure_data(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """Decode + augmentation of each training stage, and prepare's mask re-encoding (seconds per image)."""
    from PIL import Image

    from pipeline.data.datasets import normalize, place_in_canvas, resize_long
    from pipeline.data.layout import voc_palette
    from pipeline.data.seg_datasets import random_scale_flip_crop

    image, label = _image(spec), _label(spec, _classes(spec))
    jpeg, palette = _jpeg(image), voc_palette()
    png = _png(label, palette)
    rng = np.random.default_rng(0)
    cls, seg = params.train_cls, params.train_seg

    def decode() -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))

    def cls_sample() -> None:
        resized = resize_long(Image.fromarray(decode()), int(rng.integers(cls.resize_long[0], cls.resize_long[1] + 1)))
        place_in_canvas(normalize(np.asarray(resized), params.data.mean, params.data.std), cls.crop_size, rng)

    def seg_sample() -> None:
        mask = np.asarray(Image.open(io.BytesIO(png)))
        crop, _ = random_scale_flip_crop(decode(), mask, seg.crop_size, seg.scale_range, seg.flip, rng)
        normalize(crop, params.data.mean, params.data.std)

    def prepare_mask() -> None:
        _png(np.asarray(Image.open(io.BytesIO(png))), palette)

    return {
        "decode_s": _timed(decode, repeats * 5),
        "cls_sample_s": _timed(cls_sample, repeats * 5),
        "seg_sample_s": _timed(seg_sample, repeats * 5),
        "aff_sample_s": _timed(decode, repeats * 5),  # decode + a numpy crop (the crop itself is negligible)
        "prepare_s": _timed(prepare_mask, repeats * 5),
        "mask_png_bytes": float(len(png)),
        "jpeg_bytes": float(len(jpeg)),
    }


def measure_train_cls(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """SWTformer-V2 forward + backward with all losses at the config's crop and batch (seconds per step)."""
    import torch

    from pipeline.losses import swtformer_loss
    from pipeline.models.swtformer import build_model

    cfg, size, classes = params.train_cls, params.train_cls.crop_size, spec.num_labels - 1
    batch = max(1, cfg.batch_size // SHRINK["batch"])
    torch.manual_seed(0)
    model = build_model(classes, size, **params.model.model_copy(update={"pretrained": "none"}).model_dump())
    model.train()
    images = torch.randn(batch, 3, size, size)  # (b, 3, S, S)
    labels = (torch.rand(batch, classes) < spec.present / classes).float()  # (b, C)
    labels[:, 0] = 1
    present = labels[:, :, None, None].expand(-1, -1, size, size)  # (b, C, S, S)
    mask = torch.cat([torch.ones(batch, 1, size, size), present], 1)  # (b, 1 + C, S, S)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(images, mask)
        swtformer_loss(out, labels, mask, **params.loss.model_dump())["total"].backward()

    flops, seconds = _flops_and_seconds(step, repeats)
    scale = cfg.batch_size / batch
    return {
        "cls_step_s": seconds * scale,
        "cls_step_flops": flops * scale,
        "cls_params": float(sum(p.numel() for p in model.parameters())),
    }


def measure_cams(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """Multi-scale + flip CAM/R-CAM of one image, seed evaluation, and shard writing (+ bytes per image)."""
    import torch

    from pipeline.cams import multiscale_maps, present_class_mask
    from pipeline.io import CamWriter
    from pipeline.metrics import SeedEvaluator, threshold_grid
    from pipeline.models.swtformer import build_model, with_background

    cfg, classes = params.cams, _classes(spec)
    torch.manual_seed(0)
    model_params = params.model.model_copy(update={"pretrained": "none"}).model_dump()
    model = build_model(spec.num_labels - 1, params.train_cls.crop_size, **model_params).eval()
    w, h = spec.size
    x = torch.randn(1, 3, h, w)  # (1, 3, H, W)
    mask = present_class_mask([classes], spec.num_labels, x.device)  # (1, K, 1, 1)
    keys = np.array([0, *classes])

    def forward() -> tuple:
        return multiscale_maps(model, x, mask, cfg.scales, cfg.flip, cfg.seed_locating)

    flops, seconds = _flops_and_seconds(forward, repeats)
    out: dict[str, float] = {"cams_forward_s": seconds, "cams_forward_flops": flops}
    cam, rcam = forward()
    maps = {"cam": with_background(cam[0, keys[1:] - 1][None])[0].numpy(), "rcam": rcam[0, keys].numpy()}
    gt = _label(spec, classes)
    evaluators = [SeedEvaluator(spec.num_labels, threshold_grid(cfg.sweep.max, cfg.sweep.step)) for _ in maps]

    def evaluate() -> None:
        for evaluator, array in zip(evaluators, maps.values(), strict=True):
            evaluator.add(array, keys, gt)

    out["seed_eval_s"] = _timed(evaluate, repeats * 3)
    count = 8
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        store = CamWriter(Path(tmp) / "cams", count, quantize=cfg.store == "uint8", stride=cfg.store_stride)
        with store as writer:
            for index in range(count):
                writer.add(f"img{index}", keys, maps)
        out["shard_write_s"] = (time.perf_counter() - started) / count
        out["shard_bytes"] = sum(p.stat().st_size for p in (Path(tmp) / "cams").glob("*.npz")) / count
    per_value = 1 if cfg.store == "uint8" else 2  # uint8 codes or float16, in memory before a flush
    out["shard_raw_bytes"] = float(sum(a.size * per_value for a in maps.values())) / cfg.store_stride**2
    return out


def measure_train_aff(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """The two label CRFs of one image, and AffinityNet forward + backward at its crop and batch."""
    import torch

    from pipeline.models.affinitynet import AffinityNet
    from pipeline.refinement.affinity import (
        affinity_loss,
        confident_labels,
        grid_labels,
        pair_affinities,
        pair_label_masks,
        radius_offsets,
    )

    cfg, classes = params.train_aff, _classes(spec)
    keys = np.array([0, *classes])
    image, maps = _image(spec), _maps(spec, keys)
    labels = cfg.labels
    fg, bg = (labels.fg_score, labels.bg_score) if labels.mode == "constant" else (labels.fg_alpha, labels.bg_alpha)
    crf = cfg.labels.crf.model_dump()
    labelling = lambda: confident_labels(image, maps, keys, crf, fg, bg, labels.mode)  # noqa: E731
    out = {"aff_labels_s": _timed(labelling, repeats, warmup=repeats > 1)}
    torch.manual_seed(0)
    net = AffinityNet(**cfg.model.model_copy(update={"pretrained": "none"}).model_dump()).train()
    size, offsets = cfg.crop_size, radius_offsets(cfg.radius)
    batch = max(1, cfg.batch_size // SHRINK["batch"])
    images = torch.randn(batch, 3, size, size)  # (b, 3, S, S)
    crops = [_label(spec, classes, seed=i)[:size, :size] for i in range(batch)]
    padded = [np.pad(c, ((0, size - c.shape[0]), (0, size - c.shape[1])), constant_values=255) for c in crops]
    target = torch.from_numpy(np.stack([grid_labels(c, net.stride) for c in padded])).long()  # (B, h, w)
    masks = pair_label_masks(target, offsets)

    def step() -> None:
        net.zero_grad(set_to_none=True)
        affinity_loss(pair_affinities(net(images), offsets), masks)["total"].backward()

    flops, seconds = _flops_and_seconds(step, repeats)
    out["aff_step_s"], out["aff_step_flops"] = seconds * cfg.batch_size / batch, flops * cfg.batch_size / batch
    out["aff_params"] = float(sum(p.numel() for p in net.parameters()))
    return out


def measure_refine(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """One pseudo label by ``refine.method`` (full-image AffinityNet + random walk + CRF) and its PNG."""
    import torch

    from pipeline.config import PSA_METHODS
    from pipeline.data.layout import voc_palette
    from pipeline.models.affinitynet import AffinityModel, AffinityNet
    from pipeline.refine import pseudo_label
    from pipeline.refinement.affinity import radius_offsets

    cfg, classes = params.refine, _classes(spec)
    keys = np.array([0, *classes])
    image, maps = _image(spec), _maps(spec, keys)
    affinity = None
    if cfg.method in PSA_METHODS:
        torch.manual_seed(0)
        net = AffinityNet(**params.train_aff.model.model_copy(update={"pretrained": "none"}).model_dump()).eval()
        offsets = radius_offsets(params.train_aff.radius)
        affinity = AffinityModel(net, offsets, params.data.mean, params.data.std)
    label = pseudo_label(image, maps, keys, cfg, affinity)
    png = _png(label, voc_palette())
    return {
        "refine_s": _timed(lambda: pseudo_label(image, maps, keys, cfg, affinity), repeats, warmup=False),
        "png_write_s": _timed(lambda: _png(label, voc_palette()), repeats * 5),
        "pseudo_png_bytes": float(len(png)),
    }


def measure_train_seg(spec: DatasetSpec, params, repeats: int, batch: int) -> dict[str, float]:
    """DeepLab forward + backward at the config's crop (``batch`` crops, reported per image) and a val forward."""
    import torch

    from pipeline.models.deeplab import build_segmenter, predict_probs, segmentation_loss

    cfg = params.train_seg
    torch.manual_seed(0)
    model = build_segmenter(cfg.arch, cfg.encoder, spec.num_labels, "none", cfg.output_stride, cfg.decoder_channels)
    images = torch.randn(batch, 3, cfg.crop_size, cfg.crop_size)  # (b, 3, S, S)
    target = torch.randint(0, spec.num_labels, (batch, cfg.crop_size, cfg.crop_size))  # (b, S, S)

    def step() -> None:
        model.train()
        model.zero_grad(set_to_none=True)
        segmentation_loss(model(images), target).backward()

    w, h = spec.size
    x = torch.randn(1, 3, h, w)  # (1, 3, H, W)

    def val() -> None:
        model.eval()
        with torch.no_grad():
            predict_probs(model, x, (1.0,), False, False)

    step_flops, step_s = _flops_and_seconds(step, repeats)
    val_flops, val_s = _flops_and_seconds(val, repeats)
    return {
        "seg_step_img_s": step_s / batch,
        "seg_step_img_flops": step_flops / batch,
        "seg_val_s": val_s,
        "seg_val_flops": val_flops,
        "seg_params": float(sum(p.numel() for p in model.parameters())),
    }


def measure_evaluate(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """evaluate's per-image work: single-scale + multi-scale + flip forward, and the CRF over all labels."""
    import torch

    from pipeline.evaluate import crf_labels
    from pipeline.models.deeplab import build_segmenter, predict_probs

    cfg, seg = params.evaluate, params.train_seg
    torch.manual_seed(0)
    model = build_segmenter(seg.arch, seg.encoder, spec.num_labels, "none", seg.output_stride, seg.decoder_channels)
    model.eval()
    w, h = spec.size
    x = torch.randn(1, 3, h, w)  # (1, 3, H, W)

    def forward() -> torch.Tensor:
        with torch.no_grad():
            predict_probs(model, x, (1.0,), False, False)
            return predict_probs(model, x, cfg.scales, cfg.flip, False)  # (1, K, H, W)

    flops, seconds = _flops_and_seconds(forward, repeats)
    probs = forward()[0].numpy() if repeats > 1 else None  # (K, H, W)
    if probs is None:
        with torch.no_grad():
            probs = predict_probs(model, x, (1.0,), False, False)[0].numpy()  # same shape, one pass
    image = _image(spec)
    crf, present = cfg.crf.model_dump(), probs[: 1 + len(_classes(spec))] + 1e-4  # background + the image's classes
    present = present / present.sum(0, keepdims=True)  # (the random model may give them no probability at a pixel)
    return {
        "eval_forward_s": seconds,
        "eval_forward_flops": flops,
        "eval_crf_s": _timed(lambda: crf_labels(image, probs, crf), max(1, repeats // 2), warmup=False),
        "eval_crf_present_s": _timed(lambda: crf_labels(image, present, crf), max(1, repeats // 2), warmup=False),
        "eval_probs_bytes": float(probs.nbytes),
    }


def _baseline(spec: DatasetSpec, params, repeats: int) -> dict[str, float]:
    """Nothing: the peak of a process that has imported torch and the pipeline (a worker's floor)."""
    import torch  # noqa: F401

    import pipeline.refine  # noqa: F401

    return {}


MEASURES = {
    "baseline": _baseline,
    "data": measure_data,
    "train_cls": measure_train_cls,
    "cams": measure_cams,
    "train_aff": measure_train_aff,
    "refine": measure_refine,
    "train_seg": measure_train_seg,
    "evaluate": measure_evaluate,
}
SINGLE_THREAD = {"baseline", "data", "refine"}  # run as the stages' single-threaded worker processes do


def _child(name: str, dataset: str, repeats: int, threads: int, seg_batch: int, shrink: int) -> dict[str, float]:
    """Run one group of measurements in this (fresh) process; adds its peak resident memory in bytes."""
    import torch

    from pipeline.config import load_params

    torch.set_num_threads(1 if name in SINGLE_THREAD else threads)
    SHRINK["batch"] = shrink
    spec = DATASETS[dataset]
    params = load_params(REPO / spec.config)
    args = (spec, params, repeats, seg_batch) if name == "train_seg" else (spec, params, repeats)
    result = MEASURES[name](*args)
    result[f"{name}_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0
    return result


def measure(dataset: str, repeats: int, threads: int, seg_batch: int, shrink: int = 1) -> dict[str, float]:
    """Every group of :data:`MEASURES` for one dataset, each in a fresh spawned process (clean memory peaks)."""
    out: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    for name in MEASURES:
        started = time.perf_counter()
        with context.Pool(1) as pool:
            out |= pool.apply(_child, (name, dataset, repeats, threads, seg_batch, shrink))
        print(f"  {dataset} {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return out


# ------------------------------------------------------------------------------------------------- projection
@dataclass(frozen=True)
class StageCost:
    """One stage of a full run on one machine: wall seconds, bytes of its DVC outputs, host memory peak."""

    stage: str
    seconds: float
    out_bytes: float
    memory_bytes: float


def gpu_machine(cores: int = 16) -> Machine:
    """One A100/H100-class GPU (:data:`GPU_SPEEDUP` x an RTX 3090 at :data:`GPU_EFFICIENCY`) with ``cores`` cores."""
    scale = GPU_SPEEDUP * GPU_EFFICIENCY
    return Machine(f"1 GPU + {cores} cores", cores, RTX3090_TRAIN * scale, RTX3090_INFER * scale)


def model_seconds(machine: Machine, measured_s: float, flops: float, train: bool) -> float:
    """A model piece's seconds: as measured here on a CPU machine, FLOPs over the GPU's effective rate on a GPU."""
    if machine.gpu_train_flops <= 0:
        return measured_s
    return flops / (machine.gpu_train_flops if train else machine.gpu_infer_flops)


def loader_bound(machine: Machine, compute_s: float, data_cpu_s: float, workers: int) -> float:
    """Seconds of a training step whose batch is prepared by ``workers`` loader processes.

    Without loader processes (``workers`` 0) the batch is prepared in turn with the step. On a GPU the loaders
    overlap the step (the slower wins); on a CPU machine they share its cores with the model, whose threads
    already use all of them, so their CPU time adds up over the cores.
    """
    if workers == 0:
        return compute_s + data_cpu_s
    if machine.gpu_train_flops <= 0:
        return compute_s + data_cpu_s / machine.cores
    return max(compute_s, data_cpu_s / max(1, min(workers, machine.cores - 1)))


def val_passes(epochs: int, val_every: int) -> int:
    """How many times ``train_seg`` scores val: every ``val_every`` epochs and always after the last one."""
    if val_every <= 0:
        return 1
    return epochs // val_every + (1 if epochs % val_every else 0)


def project(
    spec: DatasetSpec, params, m: dict[str, float], machine: Machine, absent_kept: float = ABSENT_KEPT
) -> list[StageCost]:
    """Wall time, DVC output bytes and host memory peak of every stage of a full run of ``spec`` on ``machine``.

    Args:
        spec: The dataset (split sizes, image size, label count).
        params: The validated paper config.
        m: The measurements of :func:`measure` (per image / per step seconds, FLOPs, bytes, process peaks).
        machine: Where the run is projected.
        absent_kept: The share of the labels absent from an image that ``evaluate.crf_min_prob`` keeps in its CRF.

    Returns:
        One :class:`StageCost` per DVC stage, in DAG order.
    """
    from pipeline.config import PSA_METHODS

    cores, gpu = machine.cores, machine.gpu_train_flops > 0
    floor = m["baseline_rss_bytes"]
    cls, cams, aff, seg, ev = params.train_cls, params.cams, params.train_aff, params.train_seg, params.evaluate
    n_cls, n_val = spec.splits["train_aug"], spec.splits["val"]
    n_cams, n_seg = spec.splits[cams.split], spec.splits[seg.split]
    n_scored = spec.splits[cams.score_split] if cams.score_split else n_cams
    stages = [StageCost("prepare", spec.masks * m["prepare_s"] / min(8, cores), spec.masks * m["mask_png_bytes"],
                        floor * (1 + min(8, cores)))]  # fmt: skip

    # train_cls: steps (loader-bound or not) + a val forward per epoch (a forward ~ 1/3 of forward + backward)
    step = model_seconds(machine, m["cls_step_s"], m["cls_step_flops"], train=True)
    steps = cls.epochs * (n_cls // cls.batch_size)
    val_img = model_seconds(machine, m["cls_step_s"], m["cls_step_flops"], train=False) / (3 * cls.batch_size)
    seconds = steps * loader_bound(machine, step, cls.batch_size * m["cls_sample_s"], cls.num_workers)
    seconds += cls.epochs * n_val * (val_img + m["cls_sample_s"] / (min(cls.num_workers, cores) if gpu else cores))
    stages.append(StageCost("train_cls", seconds, 4 * m["cls_params"],
                            m["train_cls_rss_bytes"] + cls.num_workers * floor))  # fmt: skip

    # cams: the main process runs the forward, decodes and scores seeds; the store's writer thread compresses
    # (a core of its own beside a GPU; on the CPU the forward's threads take every core, so it adds up)
    forward = model_seconds(machine, m["cams_forward_s"], m["cams_forward_flops"], train=False)
    scoring = n_scored / n_cams * (m["seed_eval_s"] + m["decode_s"] / 4)  # mask PNG ~ 1/4 JPEG
    main = forward + m["decode_s"] + scoring
    seconds = n_cams * (max(main, m["shard_write_s"]) if gpu else main + m["shard_write_s"])
    pending = cams.shard_size * m["shard_raw_bytes"]
    stages.append(StageCost("cams", seconds, n_cams * m["shard_bytes"], m["cams_rss_bytes"] + pending))

    # train_aff: two CRFs per image in one process per core, then training on crops; nothing unless refine's
    # method reads the AffinityNet
    labels_s = n_cams * m["aff_labels_s"] / cores
    step = model_seconds(machine, m["aff_step_s"], m["aff_step_flops"], train=True)
    steps = aff.epochs * (n_cams // aff.batch_size)
    seconds = labels_s + steps * loader_bound(machine, step, aff.batch_size * m["aff_sample_s"], aff.num_workers)
    memory = max(m["train_aff_rss_bytes"], cores * (floor + 8 * spec.num_labels * spec.size[0] * spec.size[1]))
    if params.refine.method in PSA_METHODS:  # the labels go to PNG files beside the checkpoint, not to memory
        stages.append(StageCost("train_aff", seconds, 4 * m["aff_params"], memory))
    else:
        stages.append(StageCost("train_aff", 0.0, 0.0, floor))

    # refine: one image per worker process (AffinityNet on the CPU, walk, CRF), PNGs written by the main process
    seconds = max(n_cams * m["refine_s"] / cores, n_cams * m["png_write_s"])
    stages.append(StageCost("refine", seconds, n_cams * m["pseudo_png_bytes"], floor + cores * m["refine_rss_bytes"]))

    # train_seg: steps + val passes (single scale, full images)
    step = model_seconds(machine, seg.batch_size * m["seg_step_img_s"], seg.batch_size * m["seg_step_img_flops"], True)
    steps = seg.epochs * (n_seg // seg.batch_size)
    val = n_val * (model_seconds(machine, m["seg_val_s"], m["seg_val_flops"], False) + m["decode_s"])
    seconds = steps * loader_bound(machine, step, seg.batch_size * m["seg_sample_s"], seg.num_workers)
    seconds += val_passes(seg.epochs, seg.val_every) * val
    stages.append(StageCost("train_seg", seconds, 4 * m["seg_params"],
                            m["train_seg_rss_bytes"] + seg.num_workers * floor))  # fmt: skip

    # evaluate: forwards in the main process, CRFs in crf_workers processes (overlapping the forwards); each CRF
    # on the labels above evaluate.crf_min_prob: the image's own and a share `absent_kept` of the others (the
    # CRF's cost is linear in its labels: interpolated between the two measured counts)
    forward = n_val * (model_seconds(machine, m["eval_forward_s"], m["eval_forward_flops"], False) + m["decode_s"])
    crf_image = m["eval_crf_present_s"] + absent_kept * (m["eval_crf_s"] - m["eval_crf_present_s"])
    crf_cpu = n_val * crf_image if ev.use_crf else 0.0
    workers = min(ev.crf_workers, cores)
    if workers == 0:
        seconds = forward + crf_cpu  # in the main process, image by image
    elif gpu:
        seconds = max(forward, crf_cpu / workers)
    else:
        seconds = forward + crf_cpu / workers  # the forward's threads and the workers share the cores
    memory = m["evaluate_rss_bytes"] + ev.batch_size * m["eval_probs_bytes"]
    memory += ev.crf_workers * (floor + 3 * m["eval_probs_bytes"]) if ev.use_crf else 0
    stages.append(StageCost("evaluate", seconds, 20e6, memory))
    return stages


def disk_summary(spec: DatasetSpec, params, m: dict[str, float], stages: list[StageCost]) -> dict[str, float]:
    """Bytes on disk: raw data, DVC outputs, their copy in DVC's cache, and the largest transient checkpoint."""
    outs = sum(s.out_bytes for s in stages)
    optimiser_slots = {"adamw": 2, "sgd": 1}  # moment buffers per weight (SGD: momentum)
    checkpoints = {
        "train_cls": 4 * m["cls_params"] * 3,  # AdamW
        "train_aff": 4 * m["aff_params"] * (1 + optimiser_slots[params.train_aff.optimizer]),
        "train_seg": 4 * m["seg_params"] * (1 + optimiser_slots[params.train_seg.optimizer]),
    }
    return {
        "raw": spec.raw_gb * GB,
        "raw_peak": spec.raw_peak_gb * GB,
        "outs": outs,
        "dvc_cache": outs,
        "checkpoint": max(checkpoints.values()),
        "total": spec.raw_gb * GB + 2 * outs + max(checkpoints.values()),
    }


def _hours(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 72 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB" if value < 10 * GB else f"{value / GB:.0f} GB"


def markdown(results: dict[str, dict[str, float]], machine_here: Machine, disk_limit_gb: float = 64.0) -> str:
    """The measured pieces and the projections of every measured dataset, as Markdown tables."""
    lines = ["### Measured pieces (this machine, per image unless noted)", ""]
    names = list(results)
    lines += ["| piece | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    rows = [
        ("JPEG decode", "decode_s", "ms"), ("train_cls sample (decode + resize + crop)", "cls_sample_s", "ms"),
        ("train_seg sample (decode + scale + crop)", "seg_sample_s", "ms"),
        ("prepare: mask PNG re-encode", "prepare_s", "ms"),
        ("train_cls step (fwd + bwd, whole batch)", "cls_step_s", "s"), ("train_cls step GFLOP", "cls_step_flops", "G"),
        ("cams multi-scale + flip forward", "cams_forward_s", "s"), ("cams forward GFLOP", "cams_forward_flops", "G"),
        ("seed evaluation (CAM + R-CAM)", "seed_eval_s", "ms"), ("CAM shard writing", "shard_write_s", "ms"),
        ("CAM shard size", "shard_bytes", "MB"), ("train_aff label CRFs (2)", "aff_labels_s", "s"),
        ("train_aff step (fwd + bwd, whole batch)", "aff_step_s", "s"), ("train_aff step GFLOP", "aff_step_flops", "G"),
        ("refine: one pseudo label (1 thread)", "refine_s", "s"), ("pseudo-label PNG write", "png_write_s", "ms"),
        ("pseudo-label PNG size", "pseudo_png_bytes", "kB"), ("train_seg fwd + bwd per crop", "seg_step_img_s", "s"),
        ("train_seg GFLOP per crop", "seg_step_img_flops", "G"),
        ("evaluate forward (1 + ms + flip)", "eval_forward_s", "s"),
        ("evaluate forward GFLOP", "eval_forward_flops", "G"), ("evaluate CRF (all labels)", "eval_crf_s", "s"),
        ("evaluate CRF (the image's labels only)", "eval_crf_present_s", "s"),
    ]  # fmt: skip
    scale = {"ms": 1e3, "s": 1.0, "G": 1e-9, "MB": 1e-6, "kB": 1e-3}
    for label, key, unit in rows:
        cells = [f"{results[n][key] * scale[unit]:.{1 if unit != 'kB' else 0}f} {unit}" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in names:
        lines += ["", *project_table(name, results[name], machine_here, disk_limit_gb)]
    return "\n".join(lines)


def project_table(name: str, m: dict[str, float], machine_here: Machine, disk_limit_gb: float) -> list[str]:
    """Markdown rows of one dataset's projection on this machine and on one GPU with 16 cores."""
    from pipeline.config import load_params

    spec = DATASETS[name]
    params = load_params(REPO / spec.config)
    machines = [machine_here, gpu_machine(16)]
    projected = [project(spec, params, m, machine) for machine in machines]
    lines = [f"### Full {name.upper()} run ({spec.config})", ""]
    lines += [f"| stage | {machines[0].name} | {machines[1].name} | outputs | host memory peak (here / GPU machine) |"]
    lines += ["|---|---|---|---|---|"]
    for here, there in zip(*projected, strict=True):
        lines.append(
            f"| {here.stage} | {_hours(here.seconds)} | {_hours(there.seconds)} | {_gb(here.out_bytes)} | "
            f"{_gb(here.memory_bytes)} / {_gb(there.memory_bytes)} |"
        )
    totals = [sum(s.seconds for s in p) for p in projected]
    disk = disk_summary(spec, params, m, projected[0])
    lines.append(f"| **total** | **{_hours(totals[0])}** | **{_hours(totals[1])}** | {_gb(disk['outs'])} | |")
    fits = "fits" if disk["total"] <= disk_limit_gb * GB else "does NOT fit"
    lines += [
        "",
        f"Disk: raw data {_gb(disk['raw'])} (peak {_gb(disk['raw_peak'])} while unpacking) + DVC outputs "
        f"{_gb(disk['outs'])} + their copy in DVC's cache {_gb(disk['dvc_cache'])} + the largest checkpoint "
        f"{_gb(disk['checkpoint'])} = **{_gb(disk['total'])}**: {fits} a {disk_limit_gb:.0f} GiB disk.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["voc", "coco"], choices=sorted(DATASETS))
    parser.add_argument("--quick", action="store_true", help="one timed run per piece (default three), batches / 4")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for model work = this machine's cores")
    parser.add_argument("--seg-batch", type=int, default=2, help="DeepLab crops per measured step (>= 2: BatchNorm)")
    parser.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = parser.parse_args()
    repeats, shrink = (1, 4) if args.quick else (3, 1)
    started = time.perf_counter()
    results = {name: measure(name, repeats, args.threads, args.seg_batch, shrink) for name in args.datasets}
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    here = Machine(f"this machine ({args.threads} cores)", args.threads)
    print(markdown(results, here))
    print("\nAssumptions:\n" + "\n".join(f"- {a}" for a in ASSUMPTIONS))
    print(f"\n(measured in {time.perf_counter() - started:.0f} s, {repeats} timed repetition(s) per piece)")


if __name__ == "__main__":
    main()
