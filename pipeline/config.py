"""Typed models of ``params.yaml``: load, validate, and report errors in one line.

Every section of ``params.yaml`` has a pydantic model here with ``extra="forbid"``, so an unknown key, a wrong
type or an out-of-range value stops the run before any work with a :class:`ConfigError` naming the file, the
dotted key, the bad value and what is allowed. A stage asks only for the sections its ``dvc.yaml`` entry
declares (:func:`load_sections`); the other sections are validated but not handed out.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(ge=0, le=1)]


class ConfigError(ValueError):
    """A params file that cannot be used; the message is one line meant for the user."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class SyntheticParams(Section):
    """Size and difficulty of the embedded synthetic benchmark (see README, "The synthetic benchmark")."""

    num_train: PositiveInt = 1200
    num_val: PositiveInt = 300
    image_size: Annotated[int, Field(ge=32, le=1024)] = 96
    min_objects: PositiveInt = 1
    max_objects: PositiveInt = 3
    max_classes_per_image: Annotated[int, Field(ge=1, le=6)] = 2
    min_scale: Annotated[float, Field(gt=0, lt=0.5)] = 0.14
    max_scale: Annotated[float, Field(gt=0, lt=0.5)] = 0.34
    context_prob: Probability = 0.7
    body_color_bias: Probability = 0.5
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
    """Which dataset ``prepare`` builds, and from where."""

    dataset: Literal["synthetic"] = "synthetic"
    root: str = "data/raw"
    synthetic: SyntheticParams = SyntheticParams()
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (0.229, 0.224, 0.225)


class SwinParams(Section):
    """A small Swin configuration built through timm's ``SwinTransformer`` (used when ``model.backbone: small``)."""

    patch_size: Annotated[int, Field(ge=1, le=16)] = 2
    embed_dim: PositiveInt = 16
    depths: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (1, 1, 2, 2)
    num_heads: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (1, 2, 4, 8)
    window_size: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (4, 4, 4, 3)
    mlp_ratio: PositiveFloat = 2.0
    conv_stem: bool = True


class ModelParams(Section):
    """The SWTformer classifier."""

    version: Literal["v1", "v2"] = "v2"
    backbone: str = "small"
    swin: SwinParams = SwinParams()
    pretrained: str = "none"
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1
    final_norm: bool = True
    head_kernel: Literal[1, 3] = 3
    hff_dims: tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = (64, 64, 128, 128)
    detach_hff_inputs: bool = True
    bg_iou_scale: Annotated[float, Field(gt=0, le=1)] = 0.5


class TrainClsParams(Section):
    """Classifier fine-tuning (``train_cls``)."""

    epochs: PositiveInt = 20
    batch_size: PositiveInt = 16
    lr: PositiveFloat = 1e-3
    head_lr_mult: PositiveFloat = 10.0
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    schedule: Literal["cosine", "poly"] = "cosine"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.01
    grad_clip: Annotated[float, Field(ge=0)] = 1.0
    crop_size: Annotated[int, Field(ge=16)] = 96
    resize_long: tuple[PositiveInt, PositiveInt] = (80, 112)
    flip: bool = True
    color_jitter: Annotated[float, Field(ge=0, le=1)] = 0.0
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _ranges(self) -> TrainClsParams:
        if self.resize_long[0] > self.resize_long[1]:
            raise ValueError("resize_long must be [min, max] with min <= max")
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        return self


class LossParams(Section):
    """Loss terms of ``train_cls``; each switch turns one term on or off (V2 only for GSC and CCL)."""

    cls_weight: PositiveFloat = 1.0
    gsc: bool = True
    gsc_weight: PositiveFloat = 1.0
    ccl: bool = True
    ccl_weight: PositiveFloat = 1.0
    ccl_mode: Literal["literal", "contrastive"] = "literal"


class SweepParams(Section):
    """The constant-background sweep of seed evaluation protocol (b)."""

    max: Annotated[float, Field(ge=0, le=1)] = 0.60
    step: Annotated[float, Field(gt=0, le=1)] = 0.01


class CamsParams(Section):
    """CAM / R-CAM inference and seed evaluation (``cams``)."""

    split: Literal["train", "train_aug", "val"] = "train"
    scales: tuple[PositiveFloat, ...] = (1.0, 0.5, 1.5, 2.0)
    flip: bool = True
    shard_size: PositiveInt = 500
    gallery_size: Annotated[int, Field(ge=0, le=64)] = 16
    sweep: SweepParams = SweepParams()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Annotated[int, Field(ge=0)] = 0


class CrfParams(Section):
    """Dense CRF (pydensecrf) parameters: mean-field iterations and the two pairwise kernels.

    Defaults are the PSA pseudo-label recipe (10 iterations; Gaussian sxy 3 / compat 3; bilateral sxy 80,
    srgb 13, compat 10), written for ~500 px VOC images. A compat of 0 drops that kernel.
    """

    iterations: Annotated[int, Field(ge=1, le=100)] = 10
    gauss_sxy: PositiveFloat = 3.0
    gauss_compat: Annotated[float, Field(ge=0)] = 3.0
    bilateral_sxy: PositiveFloat = 80.0
    bilateral_srgb: PositiveFloat = 13.0
    bilateral_compat: Annotated[float, Field(ge=0)] = 10.0


class TrainSegParams(Section):
    """DeepLab training on pseudo labels (``train_seg``), built through segmentation-models-pytorch."""

    arch: Literal["deeplabv3plus", "deeplabv3"] = "deeplabv3plus"
    encoder: str = "tu-mobilenetv3_small_050"
    encoder_weights: str = "none"
    output_stride: Literal[8, 16] = 16
    decoder_channels: PositiveInt = 32
    split: Literal["train", "train_aug"] = "train"
    epochs: PositiveInt = 8
    batch_size: Annotated[int, Field(ge=2)] = 16
    optimizer: Literal["sgd", "adamw"] = "adamw"
    lr: PositiveFloat = 2e-3
    head_lr_mult: PositiveFloat = 1.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    weight_decay: Annotated[float, Field(ge=0)] = 1e-4
    warmup_epochs: Annotated[float, Field(ge=0)] = 1.0
    schedule: Literal["poly", "cosine"] = "poly"
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    grad_clip: Annotated[float, Field(ge=0)] = 0.0
    crop_size: Annotated[int, Field(ge=16)] = 96
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.5, 2.0)
    flip: bool = True
    val_every: Annotated[int, Field(ge=0)] = 1
    num_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _ranges(self) -> TrainSegParams:
        if self.scale_range[0] > self.scale_range[1]:
            raise ValueError("scale_range must be [min, max] with min <= max")
        if self.warmup_epochs >= self.epochs:
            raise ValueError("warmup_epochs must be smaller than epochs")
        return self


class EvaluateParams(Section):
    """Evaluation of the segmentation model (``evaluate``): single-scale, multi-scale + flip, and CRF.

    The CRF runs on the multi-scale + flip probabilities of all classes (no image labels at test time); its
    defaults are AFA's test-time values for DeepLab-V3+ (Gaussian 3/3, bilateral 64/5/4, 10 iterations).
    ``crf_workers`` > 0 runs it in that many worker processes.
    """

    split: Literal["val", "train"] = "val"
    scales: tuple[PositiveFloat, ...] = (0.5, 0.75, 1.0, 1.25, 1.5)
    flip: bool = True
    batch_size: PositiveInt = 8
    gallery_size: Annotated[int, Field(ge=0, le=64)] = 16
    use_crf: bool = True
    crf: CrfParams = CrfParams(
        gauss_sxy=3.0, gauss_compat=3.0, bilateral_sxy=64.0, bilateral_srgb=5.0, bilateral_compat=4.0
    )
    crf_workers: Annotated[int, Field(ge=0)] = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    threads: Annotated[int, Field(ge=0)] = 0


class Params(Section):
    """The whole ``params.yaml``."""

    seed: Annotated[int, Field(ge=0)] = 0
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train_cls: TrainClsParams = TrainClsParams()
    loss: LossParams = LossParams()
    cams: CamsParams = CamsParams()
    train_seg: TrainSegParams = TrainSegParams()
    evaluate: EvaluateParams = EvaluateParams()


SECTIONS = tuple(Params.model_fields)


def _format_error(path: Path, error: dict[str, Any]) -> str:
    """One line for the first pydantic error: file, dotted key, value, what is allowed."""
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
    return f"{path}: {key} = {json.dumps(value, default=str)} is invalid: {message}"


def parse_params(raw: Any, path: Path | str = "params.yaml") -> Params:
    """Validate an already-loaded params mapping.

    Args:
        raw: The mapping read from YAML.
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
        raise ConfigError(_format_error(path, exc.errors()[0])) from None


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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_params(raw, path)


class StageParams:
    """The sections one stage may read; asking for any other section is a programming error."""

    def __init__(self, params: Params, sections: tuple[str, ...]) -> None:
        unknown = set(sections) - set(SECTIONS)
        if unknown:
            raise KeyError(f"unknown params sections {sorted(unknown)}")
        self._params = params
        self.sections = tuple(sections)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "sections":
            raise AttributeError(name)
        if name not in self.sections:
            raise AttributeError(f"this stage did not declare params section '{name}' (declared: {self.sections})")
        return getattr(self._params, name)

    def digest(self) -> str:
        """A stable hash of the declared sections (used to tell whether a checkpoint matches its config)."""
        payload = {name: getattr(self._params, name) for name in self.sections}
        text = json.dumps(
            {k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in payload.items()}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def as_dict(self) -> dict[str, Any]:
        """The declared sections as plain data (for logging)."""
        return {
            name: getattr(self._params, name)
            if not isinstance(getattr(self._params, name), BaseModel)
            else getattr(self._params, name).model_dump(mode="json")
            for name in self.sections
        }


def load_sections(path: Path | str, sections: tuple[str, ...]) -> StageParams:
    """Validate the whole params file and return only the sections a stage declared.

    Args:
        path: Path of ``params.yaml``.
        sections: The sections the stage reads (must match its ``params:`` list in ``dvc.yaml``).

    Returns:
        A :class:`StageParams` exposing exactly those sections as attributes.
    """
    return StageParams(load_params(path), sections)
