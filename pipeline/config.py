"""Typed models of ``params.yaml``: load, validate, and report errors in one line.

Every section of ``params.yaml`` has a pydantic model here with ``extra="forbid"``, so an unknown key, a wrong
type or an out-of-range value stops the run before any work with a :class:`ConfigError` naming the file, the
dotted key, the bad value and what is allowed. Types are strict (a number is never read from a string or a bool;
an integer is accepted where a float is expected), every float is finite, a list that needs items has at least
one, and a key written twice in one mapping is refused. Every top-level section but ``pretrain`` must be present (a
file missing one is refused, naming it); inside a section, a key left out takes its default. A stage asks only for the
sections its ``dvc.yaml`` entry declares (:func:`load_sections`); the other sections are validated but not
handed out.

Keys shared by several sections are declared once in mixins whose keys sit directly in the section:
:class:`Runtime` / :class:`AmpRuntime` (``device``, ``threads``, ``amp``) and :class:`Schedule` (the optimiser
and learning-rate schedule).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ConfigError

FROM_LIST = Field(strict=False)
"""Lets a tuple field take the list YAML gives; its items stay strict (the model's ``strict=True`` applies to them)."""
SEED_LIMIT = 2**32
"""Seeds are below this: NumPy's legacy seeding accepts no more (torch takes 64 bits)."""
DEFAULT_SWIN_WEIGHTS = "weights/swin_small_scenes.safetensors"
"""``model.pretrained``'s default: the default Swin pretrained on generated scenes of other classes
(docs/pretraining.md), relative to the project's root, where DVC runs the stages."""
MIN_SWEEP_STEP = 1e-3
"""The finest threshold step of the seed sweep: at most 1,001 thresholds, one confusion matrix each."""


def _exact_int(value: Any) -> Any:
    """Refuse a bool or a float where an integer choice is expected (``Literal[8, 16]`` alone takes ``8.0``)."""
    if type(value) is not int:
        raise ValueError("Input should be an integer")
    return value


PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
WeightDecay = Annotated[float, Field(ge=0)]
WarmupEpochs = Annotated[float, Field(ge=0)]
MinLrRatio = Annotated[float, Field(ge=0, le=1)]


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable, types strict, floats finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Device = Literal["auto", "cpu", "cuda"]
ScheduleName = Literal["cosine", "poly"]
OptimizerName = Literal["sgd", "adamw"]
Momentum = Annotated[float, Field(ge=0, lt=1)]
WARMUP_MESSAGE = "warmup_epochs must be smaller than epochs"


class Runtime(Section):
    """Where a stage computes: ``device`` (``auto`` = CUDA if available) and CPU ``threads`` (0 = torch's default).

    A mixin: its keys sit directly in the section (``train_cls.device``), not in a sub-mapping.
    """

    device: Device = "auto"
    threads: Annotated[int, Field(ge=0)] = 0


class AmpRuntime(Runtime):
    """:class:`Runtime` plus ``amp``: mixed precision on CUDA (bfloat16 where supported, else float16)."""

    amp: bool = True


class Schedule(Section):
    """The optimiser and learning-rate schedule of a training stage, with ``warmup_epochs < epochs`` checked once.

    A mixin: its keys sit directly in the section. The defaults are those shared by most stages; a section
    re-declares a field (same type alias) to change its default. ``epochs`` has no default here: every training
    section sets its own.
    """

    epochs: PositiveInt
    lr: PositiveFloat = 1e-3
    head_lr_mult: PositiveFloat = 10.0
    weight_decay: WeightDecay = 1e-4
    warmup_epochs: WarmupEpochs = 1.0
    schedule: ScheduleName = "poly"
    min_lr_ratio: MinLrRatio = 0.0

    @model_validator(mode="after")
    def _warmup_within_training(self) -> Schedule:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(WARMUP_MESSAGE)
        return self


class SyntheticParams(Section):
    """Size and difficulty of the embedded synthetic benchmark (see README, "The synthetic benchmark").

    ``seed``: the benchmark instance's seed; ``None`` = the global ``seed`` (each seed a new instance and a new
    training). An integer fixes the images while ``seed`` varies the training alone, as on VOC or COCO.
    """

    seed: Annotated[int, Field(ge=0)] | None = None
    num_train: PositiveInt = 1000
    num_val: PositiveInt = 300
    image_size: Annotated[int, Field(ge=32, le=1024)] = 96
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 3
    max_classes_per_image: Annotated[int, Field(ge=1, le=6)] = 2
    min_scale: Annotated[float, Field(gt=0, lt=0.5)] = 0.14
    max_scale: Annotated[float, Field(gt=0, lt=0.5)] = 0.34
    context_prob: Probability = 0.4
    body_color_bias: Probability = 0.85
    noise_std: Annotated[float, Field(ge=0)] = 6.0
    boundary_width: Annotated[int, Field(ge=0, le=8)] = 1
    min_visible_pixels: Annotated[int, Field(ge=1)] = 16

    @model_validator(mode="after")
    def _ranges(self) -> SyntheticParams:
        if self.min_objects > self.max_objects:
            raise ValueError("min_objects must be <= max_objects")
        if self.min_scale > self.max_scale:
            raise ValueError("min_scale must be <= max_scale")
        return self


class DataParams(Section):
    """Which dataset ``prepare`` builds, and from where.

    ``synthetic`` is generated by code; ``voc`` (PASCAL VOC 2012 + SBD) and ``coco`` (COCO 2014) are converted
    from the raw data under ``root`` (fetched by ``wsss download``, or any copy with the same layout). ``subset: N``
    cuts every split to its first N images (in split order) for a rehearsal on a handful of images; null = all.
    """

    dataset: Literal["synthetic", "voc", "coco"] = "synthetic"
    root: str = "data/raw"
    subset: PositiveInt | None = None
    synthetic: SyntheticParams = SyntheticParams()
    mean: Annotated[tuple[float, float, float], FROM_LIST] = (0.485, 0.456, 0.406)
    std: Annotated[tuple[PositiveFloat, PositiveFloat, PositiveFloat], FROM_LIST] = (0.229, 0.224, 0.225)


class SwinParams(Section):
    """A small Swin configuration built through timm's ``SwinTransformer`` (used when ``model.backbone: small``)."""

    patch_size: Annotated[int, Field(ge=1, le=16)] = 2
    embed_dim: PositiveInt = 16
    depths: Annotated[tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt], FROM_LIST] = (1, 1, 2, 2)
    num_heads: Annotated[tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt], FROM_LIST] = (1, 2, 4, 8)
    window_size: Annotated[tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt], FROM_LIST] = (4, 4, 4, 3)
    mlp_ratio: PositiveFloat = 2.0
    conv_stem: bool = True


VIT_MODULES = ("vision_transformer", "deit")
"""The timm modules whose models are the plain ViTs ``model.arch: deit`` wraps (``model.vit.name``)."""


def is_vit_name(name: str) -> bool:
    """Whether ``name`` is a timm model of :data:`VIT_MODULES` (e.g. ``deit_small_patch16_224``)."""
    import timm  # here: timm loads only to check a timm name

    return name in timm.list_models(module=list(VIT_MODULES))


class ViTParams(Section):
    """The ViT/DeiT of ``model.arch: deit``: ``name`` is ``small`` (the configuration below) or a timm ViT/DeiT name.

    ``small`` is a CPU-sized ViT built through timm's ``VisionTransformer`` at ``train_cls.crop_size``; a timm
    name (e.g. ``deit_small_patch16_224``) ignores the size keys. ``pretrained`` (``none``, a local file or a timm
    tag such as ``deit_small_patch16_224.fb_in1k``) initialises this ViT; ``model.pretrained`` is the Swin's.
    """

    name: str = "small"
    pretrained: str = "none"
    patch_size: Annotated[int, Field(ge=1, le=32)] = 8
    embed_dim: PositiveInt = 64
    depth: PositiveInt = 4
    num_heads: PositiveInt = 2
    mlp_ratio: PositiveFloat = 2.0
    conv_stem: bool = True

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name != "small" and not is_vit_name(name):
            raise ValueError(
                "not 'small' nor a timm ViT/DeiT name (e.g. deit_small_patch16_224, vit_small_patch16_224; see "
                "timm.list_models(module=['vision_transformer', 'deit']))"
            )
        return name

    @model_validator(mode="after")
    def _heads(self) -> ViTParams:
        if self.name == "small" and self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be a multiple of num_heads")
        return self


class ModelParams(Section):
    """The classifier: ``arch`` ``swtformer`` (a Swin backbone; ``version`` V1/V2) or ``deit`` (``vit``).

    ``deit`` reads ``vit``, ``drop_path_rate``, ``final_norm`` and ``head_kernel``; the other keys are SWTformer's.
    ``pretrained`` defaults to the shipped scene-pretrained weights of the default ``swin`` (a Swin of another
    size needs ``none``, its own file or a timm tag).
    """

    arch: Literal["swtformer", "deit"] = "swtformer"
    version: Literal["v1", "v2"] = "v2"
    backbone: str = "small"
    swin: SwinParams = SwinParams()
    vit: ViTParams = ViTParams()
    pretrained: str = DEFAULT_SWIN_WEIGHTS
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.0
    final_norm: bool = True
    head_kernel: Annotated[Literal[1, 3], BeforeValidator(_exact_int)] = 3
    hff_dims: Annotated[tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt], FROM_LIST] = (32, 32, 64, 64)
    detach_hff_inputs: bool = True
    bg_iou_scale: Annotated[float, Field(gt=0, le=1)] = 0.5


class TrainClsParams(Schedule, AmpRuntime):
    """Classifier fine-tuning (``train_cls``)."""

    epochs: PositiveInt = 48
    lr: PositiveFloat = 5e-4
    batch_size: PositiveInt = 16
    weight_decay: WeightDecay = 0.05
    schedule: ScheduleName = "cosine"
    min_lr_ratio: MinLrRatio = 0.01
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    crop_size: Annotated[int, Field(ge=16)] = 96
    resize_long: Annotated[tuple[PositiveInt, PositiveInt], FROM_LIST] = (80, 112)
    flip: bool = True
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0
    num_workers: Annotated[int, Field(ge=0)] = 0
    cache_images: bool = True

    @model_validator(mode="after")
    def _ranges(self) -> TrainClsParams:
        if self.resize_long[0] > self.resize_long[1]:
            raise ValueError("resize_long must be [min, max] with min <= max")
        return self


class AReAMParams(Section):
    """AReAM's attention supervision (``loss.aream``; pipeline/aream.py, docs/classifier.md).

    After ``warmup_epochs`` epochs, blocks ``< split`` (shallow) re-activate the CAM that PAR refines into
    reliable labels with the background scores ``bg_thresholds`` (low, high; pixels between are ignored), and
    blocks ``>= split`` (deep) get the affinity loss, weighted by ``weight``. ``split: null`` = half the blocks
    (rounded up). ``weights``: ``uniform`` or ``entropy`` (each block weighted by the min-max normalised entropy
    of its re-activated map, online). ``par_scale``: the resolution PAR runs at, relative to the crop (AFA /
    AReAM: 0.5; 0.25 keeps the CPU step cheap). DeiT: the blocks are the ViT's. SWTformer (S1 of
    ``/work/shared/reference/refinement.md`` §4.4): the blocks of Swin stage ``stage`` (1-based), whose window
    attention is scattered onto the stage's token grid; the CAM is re-activated ``steps`` times through it (plus
    the identity, rows renormalised), since one step moves it inside a window only.
    """

    enabled: bool = False
    warmup_epochs: Annotated[int, Field(ge=0)] = 4
    split: PositiveInt | None = None
    bg_thresholds: Annotated[tuple[Probability, Probability], FROM_LIST] = (0.35, 0.55)
    weights: Literal["uniform", "entropy"] = "uniform"
    weight: PositiveFloat = 0.1
    par_scale: Annotated[float, Field(gt=0, le=1)] = 0.25
    stage: Annotated[int, Field(ge=1, le=4)] = 3
    steps: PositiveInt = 2

    @model_validator(mode="after")
    def _order(self) -> AReAMParams:
        if self.bg_thresholds[0] > self.bg_thresholds[1]:
            raise ValueError("bg_thresholds must be [low, high] with low <= high")
        return self

    def split_of(self, depth: int) -> int:
        """The first deep block among ``depth`` blocks: ``split``, or half of them rounded up."""
        return self.split if self.split is not None else (depth + 1) // 2


class LossParams(Section):
    """Loss terms of ``train_cls``; each switch turns one term on or off (V2 only for GSC and CCL).

    ``detach_cam``: where GSC / CCL leave the CAM a fixed target: ``both`` (default), ``ccl``, ``none`` (SIPE's code).
    """

    cls_weight: PositiveFloat = 1.0
    gsc: bool = True
    gsc_weight: PositiveFloat = 1.0
    ccl: bool = True
    ccl_weight: PositiveFloat = 1.0
    ccl_mode: Literal["literal", "contrastive"] = "literal"
    detach_cam: Literal["none", "ccl", "both"] = "both"
    aream: AReAMParams = AReAMParams()


class SweepParams(Section):
    """The constant-background sweep of seed evaluation protocol (b)."""

    max: Annotated[float, Field(ge=0, le=1)] = 0.60
    step: Annotated[float, Field(ge=MIN_SWEEP_STEP, le=1)] = 0.01


SeedLocating = Literal["structure", "cam"]


class RelevanceParams(Section):
    """Relevance maps of the DeiT classifier (WegFormer; ``docs/wegformer.md``), stored as the map ``relevance``.

    ``kind``: ``none`` (off), ``full`` (Chefer's LRP relevance, Deep Taylor Decomposition) or ``gradient``
    (gradient-weighted attention, hooks only). ``blocks``: ``last`` (WegFormer) or ``all`` (rollout).
    ``class_batch``: (image, class) rows per forward/backward pass (memory: each row holds every block's
    attention).
    """

    kind: Literal["none", "full", "gradient"] = "none"
    blocks: Literal["last", "all"] = "last"
    class_batch: Annotated[int, Field(ge=1, le=1024)] = 16


class CamsParams(AmpRuntime):
    """CAM / R-CAM inference and seed evaluation (``cams``).

    ``seed_locating`` chooses the seeds of R-CAM's prototypes at inference: ``structure`` is SWTformer's
    structure-aware locating (soft IoU with the |cos| affinity of last-stage tokens; always used in training),
    ``cam`` the argmax of the CAM with its background ``1 - max`` (SIPE's ablation without structure-aware
    locating). On the synthetic benchmark ``cam`` measured better (docs/results_history.md, "V1 against V2").

    ``scales``: the default runs the 96 px synthetic images up to 3x: a 6 x 6 last stage gives R-CAM's prototypes
    a coarse grid, and upscaled copies refine it (docs/classifier.md, "Inference scales"); the paper configs keep
    SIPE's 1.0 / 0.5 / 1.5 / 2.0.

    ``score_split`` (``null`` = every image of ``split``) scores the seeds only on the images of ``split`` that
    also belong to that split: VOC's protocol stores seeds for ``train_aug`` (what DeepLab trains on) and scores
    them on the 1,464 ``train`` images with fine masks.

    ``store`` is how the CAM store keeps the maps: ``float16`` (lossless for what ``cams`` computes in float32 to
    3 digits) or ``uint8`` (8 bits per value between each channel's minimum and maximum: a third of the bytes and
    faster to write, seed mIoU within 1e-3; ``benchmarks/cam_store.py``); the paper configs take ``uint8``.
    ``amp`` runs the backbone in bfloat16 on CUDA (the maps, seeds and normalisation stay float32).
    ``batch_size`` images of one size go through each forward, per process (bucketed by size); on a CPU at VOC's
    size 1 is faster (a batch's large tensors cost page faults; docs/cost.md), on a GPU larger batches are.
    ``store_stride`` > 1 stores the maps average-pooled to 1/stride of the image's side (1/stride² of the bytes);
    the readers get them back bilinearly at the image's size. A transformer's CAM is no finer than its last
    stage's tokens (stride 32 for Swin-T at scale 1), so a stride of 4 keeps what later stages read: COCO's
    store fits a 64 GiB disk with it (docs/cost.md). Seeds are scored on the full-resolution maps in ``cams``;
    ``refine`` scores what it reads back.
    """

    split: Literal["train", "train_aug", "val"] = "train"
    score_split: Literal["train", "train_aug", "val"] | None = None
    scales: Annotated[tuple[PositiveFloat, ...], FROM_LIST, Field(min_length=1)] = (1.0, 1.5, 2.0, 2.5, 3.0)
    flip: bool = True
    seed_locating: SeedLocating = "cam"
    relevance: RelevanceParams = RelevanceParams()
    batch_size: PositiveInt = 8
    shard_size: PositiveInt = 500
    store: Literal["float16", "uint8"] = "float16"
    store_stride: Annotated[int, Field(ge=1, le=32)] = 1
    gallery_size: Annotated[int, Field(ge=0, le=64)] = 16
    sweep: SweepParams = SweepParams()


class CrfParams(Section):
    """Dense CRF (pydensecrf) parameters: mean-field iterations and the two pairwise kernels.

    Defaults were measured on the 96 px synthetic benchmark (docs/refine.md): the PSA pseudo-label recipe
    (Gaussian 3 / 3; bilateral sxy 80, srgb 13, compat 10; for ~500 px VOC images) with a weaker bilateral
    term (compat 4, as in the AFA / DeepLab test-time recipes), a colour std of 8 and sxy 40 (about half the
    image). A compat of 0 drops that kernel.
    """

    iterations: Annotated[int, Field(ge=1, le=100)] = 10
    gauss_sxy: PositiveFloat = 3.0
    gauss_compat: Annotated[float, Field(ge=0)] = 3.0
    bilateral_sxy: PositiveFloat = 40.0
    bilateral_srgb: PositiveFloat = 8.0
    bilateral_compat: Annotated[float, Field(ge=0)] = 4.0


SeedMapName = Literal["auto", "cam", "rcam", "aream", "relevance"]


class AffinityLabelParams(Section):
    """Confident affinity labels from the seeds: two CRFs with a strong and a weak background score.

    ``mode: constant`` uses the constant background scores ``fg_score`` (high: only confident foreground
    survives) and ``bg_score`` (low: only confident background survives); ``mode: power`` uses PSA's
    ``(1 - max_c M_c)^alpha`` with ``fg_alpha`` (small) and ``bg_alpha`` (large).
    """

    mode: Literal["constant", "power"] = "constant"
    fg_score: Probability = 0.60
    bg_score: Probability = 0.30
    fg_alpha: PositiveFloat = 4.0
    bg_alpha: PositiveFloat = 32.0
    crf: CrfParams = CrfParams(iterations=5)

    @model_validator(mode="after")
    def _order(self) -> AffinityLabelParams:
        if self.fg_score <= self.bg_score:
            raise ValueError("fg_score must be larger than bg_score (a strong background keeps confident fg)")
        if self.fg_alpha >= self.bg_alpha:
            raise ValueError("fg_alpha must be smaller than bg_alpha (a small power is a strong background)")
        return self


class AffinityNetParams(Section):
    """The AffinityNet: a timm ``features_only`` backbone, its feature levels and the embedding widths."""

    backbone: str = "regnetx_002"
    out_indices: Annotated[tuple[Annotated[int, Field(ge=0, le=5)], ...], FROM_LIST] = (1, 2)
    projection_dims: Annotated[tuple[PositiveInt, ...], FROM_LIST] = (32, 64)
    feature_dim: PositiveInt = 64
    pretrained: str = "none"

    @model_validator(mode="after")
    def _levels(self) -> AffinityNetParams:
        if not self.out_indices:
            raise ValueError("out_indices must name at least one feature level")
        if len(self.projection_dims) != len(self.out_indices):
            raise ValueError("projection_dims must have one width per entry of out_indices")
        return self


class TrainAffParams(Schedule, AmpRuntime):
    """AffinityNet training on affinity labels derived from the seeds (``train_aff``).

    ``optimizer: sgd`` uses ``momentum`` (PSA's recipe); ``adamw`` ignores it.
    """

    seed_map: SeedMapName = "cam"
    labels: AffinityLabelParams = AffinityLabelParams()
    model: AffinityNetParams = AffinityNetParams()
    radius: Annotated[int, Field(ge=2, le=16)] = 3
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 16
    warmup_epochs: WarmupEpochs = 0.5
    optimizer: OptimizerName = "adamw"
    momentum: Momentum = 0.9
    crop_size: Annotated[int, Field(ge=16)] = 96
    flip: bool = True
    label_workers: Annotated[int, Field(ge=0)] = 0
    num_workers: Annotated[int, Field(ge=0)] = 0


class PsaParams(Section):
    """PSA random-walk inference (``refine.method: psa | psa_crf``)."""

    beta: PositiveFloat = 8.0
    logt: Annotated[int, Field(ge=0, le=12)] = 6


class ParParams(Section):
    """PAR, AFA's pixel-adaptive refinement (``refine.method: par | par_crf``); defaults are AFA's constants.

    ``thresholds: null`` refines the seed scores with the background of ``refine`` (the stored channel or
    ``bg_threshold``) into dense labels; ``[low, high]`` is AFA / AReAM's three-state recipe (a constant
    background of ``high`` gives the foreground, one of ``low`` the background, the rest is 255).
    """

    dilations: Annotated[tuple[Annotated[int, Field(ge=1, le=256)], ...], FROM_LIST] = (1, 2, 4, 8, 12, 24)
    iterations: Annotated[int, Field(ge=1, le=100)] = 10
    w1: PositiveFloat = 0.3
    w2: Annotated[float, Field(ge=0)] = 0.01
    scale: Annotated[float, Field(gt=0, le=1)] = 0.5
    thresholds: Annotated[tuple[Probability, Probability], FROM_LIST] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParParams:
        if not self.dilations:
            raise ValueError("dilations must name at least one dilation")
        if self.thresholds is not None and not self.thresholds[0] < self.thresholds[1]:
            raise ValueError("thresholds must be [low, high] with low < high")
        return self


class WegformerParams(Section):
    """WegFormer's post-processors in ``refine`` (``docs/wegformer.md``), for any stored map.

    ``soft_erase``: ``S_r`` (WegFormer: 0.55) or ``null`` (off): each class map is min-max normalised, clipped at
    ``S_r`` and divided by it. ``saliency``: a folder of ``<image_id>.png`` saliency maps (0..255), ``oracle`` (the
    ground-truth foreground: an upper bound for the synthetic benchmark, never a method) or ``null``;
    with one the scores are DRS's (background ``1 - saliency``, class cues below ``cue_threshold`` zeroed; pixels
    where two or more channels exceed ``conflict_threshold``, and fully salient pixels labelled background,
    become 255). ``epom``: EPOM's ignore step; ``epom_fg_threshold`` is ``T_fg`` of its class-absent branch.
    """

    soft_erase: Annotated[float, Field(gt=0, le=1)] | None = None
    saliency: str | None = None
    cue_threshold: Probability = 0.2
    conflict_threshold: Probability = 0.9
    epom: bool = False
    epom_fg_threshold: Probability = 0.5


PSA_METHODS = ("psa", "psa_crf")
"""The ``refine.method`` values that read the AffinityNet; ``train_aff`` trains it only for them."""


class RefineParams(Section):
    """Seeds -> pseudo labels (``refine``).

    Every image of the CAM store gets a pseudo label; the metrics score those with a ground-truth mask, or only
    those of ``score_split`` when it is set (VOC: ``train``, the 1,464 fine masks, as papers report).
    """

    method: Literal["none", "crf", "psa", "psa_crf", "par", "par_crf"] = "crf"
    seed_map: SeedMapName = "auto"
    bg_threshold: Probability | None = None
    ignore_band: Annotated[tuple[Probability, Probability], FROM_LIST] | None = None
    crf: CrfParams = CrfParams()
    psa: PsaParams = PsaParams()
    par: ParParams = ParParams()
    wegformer: WegformerParams = WegformerParams()
    workers: Annotated[int, Field(ge=0)] = 0
    gallery_size: Annotated[int, Field(ge=0, le=64)] = 16
    score_split: Literal["train", "train_aug", "val"] | None = None

    @model_validator(mode="after")
    def _band(self) -> RefineParams:
        if self.wegformer.saliency is not None and self.bg_threshold is not None:
            raise ValueError("wegformer.saliency gives the background (1 - saliency): bg_threshold must be null")
        if self.ignore_band is not None:
            low, high = self.ignore_band
            if self.bg_threshold is None or not low <= self.bg_threshold <= high:
                raise ValueError("ignore_band needs a numeric bg_threshold in [low, high]")
        return self


class TrainSegParams(Schedule, AmpRuntime):
    """DeepLab training on pseudo labels (``train_seg``), built through segmentation-models-pytorch."""

    arch: Literal["deeplabv3plus", "deeplabv3"] = "deeplabv3plus"
    encoder: str = "tu-mobilenetv3_small_050"
    encoder_weights: str = "none"
    output_stride: Annotated[Literal[8, 16], BeforeValidator(_exact_int)] = 16
    decoder_channels: PositiveInt = 32
    split: Literal["train", "train_aug"] = "train"
    epochs: PositiveInt = 24
    batch_size: Annotated[int, Field(ge=2)] = 16
    optimizer: OptimizerName = "adamw"
    lr: PositiveFloat = 2e-3
    head_lr_mult: PositiveFloat = 1.0
    momentum: Momentum = 0.9
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    crop_size: Annotated[int, Field(ge=16)] = 96
    scale_range: Annotated[tuple[PositiveFloat, PositiveFloat], FROM_LIST] = (0.5, 2.0)
    flip: bool = True
    val_every: Annotated[int, Field(ge=0)] = 1
    num_workers: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _ranges(self) -> TrainSegParams:
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range must be [min, max] with min <= max")
        return self


class EvaluateParams(AmpRuntime):
    """Evaluation of the segmentation model (``evaluate``): single-scale, multi-scale + flip, and CRF.

    The CRF runs on the multi-scale + flip probabilities of all classes (no image labels at test time); its
    defaults are AFA's test-time values for DeepLab-V3+ (Gaussian 3/3, bilateral 64/5/4, 10 iterations).
    It runs in ``crf_workers`` processes (0 = one per CPU core, 1 = in the main process), on the labels whose
    probability reaches ``crf_min_prob`` somewhere in the image.
    """

    split: Literal["val", "train"] = "val"
    scales: Annotated[tuple[PositiveFloat, ...], FROM_LIST, Field(min_length=1)] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    batch_size: PositiveInt = 8
    gallery_size: Annotated[int, Field(ge=0, le=64)] = 16
    use_crf: bool = True
    crf: CrfParams = CrfParams(
        gauss_sxy=3.0, gauss_compat=3.0, bilateral_sxy=64.0, bilateral_srgb=5.0, bilateral_compat=4.0
    )
    crf_workers: Annotated[int, Field(ge=0)] = 0
    crf_min_prob: Annotated[float, Field(ge=0, lt=1)] = 0.01


SCENE_CLASSES = 60
"""The patterned looks of the stand-ins' scenes (:data:`pipeline.data.pretrain_images.PRETRAIN_LOOKS`)."""


class PretrainParams(Schedule, AmpRuntime):
    """Pretraining of the classifier's encoder on generated images: fractal categories or scenes (``wsss pretrain``).

    Not a stage of the DAG: its weights ship in ``weights/`` and ``model.pretrained`` names them. The encoder is
    the one ``model`` describes (the Swin of ``model.swin``, or the ViT of ``model.vit`` with ``model.arch: deit``),
    at the size ``train_cls`` fine-tunes it.
    """

    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)] = 0
    source: Literal["fractals", "scenes"] = "scenes"
    categories: Annotated[int, Field(ge=2)] = 20
    instances: PositiveInt = 200
    val_instances: PositiveInt = 20
    image_size: Annotated[int, Field(ge=16)] = 96
    points: PositiveInt = 10_000
    min_fill: Annotated[float, Field(gt=0, lt=1)] = 0.2
    epochs: PositiveInt = 20
    batch_size: PositiveInt = 16
    weight_decay: WeightDecay = 0.05
    warmup_epochs: WarmupEpochs = 0.5
    schedule: ScheduleName = "cosine"
    min_lr_ratio: MinLrRatio = 0.01
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    head_lr_mult: PositiveFloat = 10.0
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1

    @model_validator(mode="after")
    def _scene_classes_exist(self) -> PretrainParams:
        if self.source == "scenes" and self.categories > SCENE_CLASSES:
            raise ValueError(f"categories is at most {SCENE_CLASSES} with source scenes (the patterned looks)")
        return self


class Params(Section):
    """The whole ``params.yaml``.

    Every section of a stage is required: a params file names each one (the keys inside a section keep their
    defaults), so a file written for a few stages cannot silently run the others on defaults. ``pretrain``, a
    command outside the DAG whose weights ship with the repository, may be left out.
    """

    seed: Annotated[int, Field(ge=0, lt=SEED_LIMIT)]
    data: DataParams
    model: ModelParams
    train_cls: TrainClsParams
    loss: LossParams
    cams: CamsParams
    train_aff: TrainAffParams
    refine: RefineParams
    train_seg: TrainSegParams
    evaluate: EvaluateParams
    pretrain: PretrainParams = PretrainParams()  # the one optional section: a command outside the DAG

    @model_validator(mode="after")
    def _aream(self) -> Params:
        aream, model = self.loss.aream, self.model
        if not aream.enabled:
            return self
        if model.arch == "deit" and model.vit.name == "small":
            depth, blocks = model.vit.depth, f"model.vit.depth = {model.vit.depth}"
        elif model.arch == "swtformer" and model.backbone == "small":
            depth = model.swin.depths[aream.stage - 1]
            blocks = f"the {depth} blocks of Swin stage loss.aream.stage = {aream.stage}"
        else:
            return self  # a timm model's depth is known once built (train_cls checks it)
        if depth < 2 or aream.split_of(depth) >= depth:
            raise ValueError(
                f"loss.aream.split = {aream.split_of(depth)} must be below {blocks} "
                "(blocks >= split are the deep ones; AReAM needs 2 blocks or more)"
            )
        return self


SECTIONS = tuple(Params.model_fields)
REQUIRED_SECTIONS = tuple(name for name, field in Params.model_fields.items() if field.is_required())


def _format_error(path: Path, errors: list[dict[str, Any]]) -> str:
    """One line for a failed validation: file, dotted key, value, what is allowed.

    Missing top-level sections are reported first (all of them, in one line); otherwise the first error is.
    """
    missing = [str(e["loc"][0]) for e in errors if e["type"] == "missing" and len(e["loc"]) == 1]
    needs = f"every params file needs: {', '.join(REQUIRED_SECTIONS)}"
    if len(missing) == 1:
        return f"{path}: section '{missing[0]}' is missing ({needs})"
    if missing:
        return f"{path}: sections {', '.join(repr(m) for m in missing)} are missing ({needs})"
    error = errors[0]
    key = ".".join(str(part) for part in error["loc"]) or "<top level>"
    kind = error["type"]
    value = error.get("input")
    if kind == "extra_forbidden":
        parent = Params
        for part in error["loc"][:-1]:
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            parent = field.annotation if field is not None else None
        allowed = sorted(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        hint = f"allowed keys here: {', '.join(allowed)}" if allowed else "this key is not allowed"
        return f"{path}: unknown key '{key}' ({hint})"
    message = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:  # a rule across sections names its keys itself
        return f"{path}: {message}"
    return f"{path}: {key} = {json.dumps(value, default=str)} is invalid: {message}"


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping.

    Args:
        raw: The mapping read from YAML; it must hold every section of :data:`SECTIONS`.
        path: The file it came from (used in messages only).

    Returns:
        The validated :class:`Params`.

    Raises:
        ConfigError: With a one-line message if the mapping is not valid.
    """
    path = Path(path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_error(path, exc.errors())) from None


class DuplicateKeyError(yaml.YAMLError):
    """A key written twice in one YAML mapping (``yaml.safe_load`` would silently keep the last value)."""

    def __init__(self, key: Any, first: yaml.Mark, second: yaml.Mark) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first.line + 1} and {second.line + 1})")


class ParamsLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses duplicate keys and reads ``1e-3`` as a float, as YAML 1.2 and DVC do.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is a string; the strict models
    would then refuse ``lr: 1e-3``.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """Build a mapping after checking that no key is written twice (merge keys ``<<`` may override)."""
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) or key is None:
                continue
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(path: Path) -> Any:
    """Parse a params file with :class:`ParamsLoader`.

    Raises:
        ConfigError: If the file is not UTF-8 text, not YAML, or writes a key twice in one mapping.
    """
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=ParamsLoader)  # SafeLoader: no arbitrary objects
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the params file as UTF-8") from None
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path}: {exc}; keep one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def load_params(path: Path | str = "params.yaml") -> Params:
    """Read and validate a whole params file.

    Args:
        path: Path of the YAML file.

    Returns:
        The validated :class:`Params`.

    Raises:
        ConfigError: If the file is missing, is not YAML, or does not validate.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    return parse_params(read_yaml(path), path)


class StageParams:
    """The params one stage may read: whole sections, or single ``section.key`` leaves (see :meth:`leaf`).

    Asking for anything else is a programming error.
    """

    def __init__(self, params: Params, sections: tuple[str, ...]) -> None:
        unknown = {name.split(".")[0] for name in sections} - set(SECTIONS)
        if unknown:
            raise KeyError(f"unknown params sections {sorted(unknown)}")
        self._params = params
        self.sections = tuple(sections)
        for name in self.sections:
            self._value(name)  # a leaf that does not exist is a KeyError now, not at first use

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        if name not in self.sections:
            raise AttributeError(f"this stage did not declare params section '{name}' (declared: {self.sections})")
        return getattr(self._params, name)

    def leaf(self, key: str) -> Any:
        """The value of one declared ``section.key`` (e.g. ``refine.method``).

        A stage that depends on a single key of another stage's section declares just that key, so that the
        section's other keys do not re-run it.
        """
        if "." not in key or key not in self.sections:
            raise AttributeError(f"this stage did not declare the params key '{key}' (declared: {self.sections})")
        return self._value(key)

    def _value(self, name: str) -> Any:
        value: Any = self._params
        for part in name.split("."):
            if not isinstance(value, BaseModel) or part not in type(value).model_fields:
                raise KeyError(f"unknown params key '{name}'")
            value = getattr(value, part)
        return value

    def digest(self) -> str:
        """A stable hash of the declared sections (used to tell whether a checkpoint matches its config)."""
        payload = {name: self._value(name) for name in self.sections}
        text = json.dumps(
            {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in payload.items()}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_sections(path: Path | str, sections: tuple[str, ...]) -> StageParams:
    """Validate the whole params file and return only the sections a stage declared.

    Args:
        path: Path of ``params.yaml``.
        sections: The sections the stage reads (must match its ``params:`` list in ``dvc.yaml``).

    Returns:
        A :class:`StageParams` exposing exactly those sections as attributes.
    """
    return StageParams(load_params(path), sections)
