"""DeepLab through segmentation-models-pytorch: build, encoder weights, loss, save/load, multi-scale inference.

The model is an smp ``DeepLabV3Plus`` / ``DeepLabV3`` wrapped in :class:`Segmenter`, which pads inputs of any size
to a multiple of the encoder's output stride and crops the logits back. ``models/seg`` holds the smp model's
state dict (``model.safetensors``, loadable into a plain smp model) and ``meta.json`` with everything needed to
rebuild it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from safetensors.torch import load_file
from torch import nn

from pipeline import runtime
from pipeline.data.layout import IGNORE
from pipeline.errors import SegModelError, one_line
from pipeline.models.files import META, read_model_dir, save_model_dir
from pipeline.models.padding import crop_to_input, pad_to_multiple
from pipeline.models.pretrained import is_weights_file, load_state_into, reachable, read_state_dict

log = logging.getLogger(__name__)

ARCHS = {"deeplabv3plus": smp.DeepLabV3Plus, "deeplabv3": smp.DeepLabV3}
META_FORMAT = "wsss-seg/1"
SETTING = "train_seg.encoder_weights"  # the params key of the encoder weights, in messages


class Segmenter(nn.Module):
    """An smp DeepLab that takes inputs of any size.

    Inputs are zero-padded (bottom/right) to a multiple of the encoder's output stride, and the logits are cropped
    back to the input size.

    Args:
        net: The smp segmentation model.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.stride = int(net.encoder.output_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K, H, W) logits."""
        return crop_to_input(self.net(pad_to_multiple(x, self.stride)), x.shape[-2:])

    def new_modules(self) -> list[nn.Module]:
        """The randomly initialised parts (decoder and head), trained with ``head_lr_mult``."""
        return [self.net.decoder, self.net.segmentation_head]


def _check_encoder_name(encoder: str) -> None:
    if encoder.startswith("tu-"):
        if not timm.is_model(encoder[3:].split(".")[0]):
            raise SegModelError(f"train_seg.encoder: '{encoder}' names no timm model (see timm.list_models())")
    elif encoder not in smp.encoders.get_encoder_names():
        raise SegModelError(
            f"train_seg.encoder: unknown encoder '{encoder}' (an smp encoder such as resnet18, resnet50, resnet101, "
            "mobilenet_v2, efficientnet-b0, or tu-<timm model name>)"
        )


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """Switch huggingface_hub to cache-only mode (as ``HF_HUB_OFFLINE=1`` would) so it fails fast, not after retries."""
    previous = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = previous


def _build_net(arch: str, encoder: str, weights: Any, num_classes: int, output_stride: int, channels: int) -> nn.Module:
    return ARCHS[arch](
        encoder_name=encoder,
        encoder_weights=weights,
        encoder_output_stride=output_stride,
        decoder_channels=channels,
        classes=num_classes,
    )


def _build_with_tag(arch: str, encoder: str, tag: str, num_classes: int, output_stride: int, channels: int):
    """Build with named pretrained weights, downloaded by smp/timm (or taken from their cache when offline)."""
    weights = True if encoder.startswith("tu-") else tag
    offline = not reachable(hub_constants.ENDPOINT)
    try:
        with _hub_offline(offline):
            return _build_net(arch, encoder, weights, num_classes, output_stride, channels)
    except KeyError as exc:
        raise SegModelError(f"{SETTING}: {exc.args[0]}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        reason = "no network" if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        raise SegModelError(
            f"{SETTING}: cannot download '{tag}' weights for encoder '{encoder}' ({reason}); "
            f"pass a local file instead: train_seg.encoder_weights=/path/to/{encoder}.safetensors (or .pth)"
        ) from None


def load_encoder_weights(encoder: nn.Module, path: Path) -> None:
    """Load a local ``.safetensors`` / ``.pth`` state dict into an smp encoder, strictly.

    Accepted layouts: the encoder's own keys (for ``tu-`` encoders also the keys of the bare timm model), or a
    whole smp model's keys (``encoder.`` prefix). Extra tensors (e.g. a classifier head) are ignored.

    Raises:
        SegModelError: If the file is missing or unreadable, a tensor has the wrong shape, or encoder tensors
            are missing from it.
    """
    state = read_state_dict(path, SETTING, SegModelError)
    smp_parts = ("encoder.", "decoder.", "segmentation_head.", "classification_head.")
    if any(k.startswith("encoder.") for k in state) and all(k.startswith(smp_parts) for k in state):
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    target = encoder
    if not target.state_dict().keys() & state.keys() and hasattr(encoder, "model"):
        target = encoder.model
    load_state_into(target, state, str(path), SETTING, complete=True, error=SegModelError, what="encoder")


def build_segmenter(
    arch: str,
    encoder: str,
    num_classes: int,
    encoder_weights: str = "none",
    output_stride: int = 16,
    decoder_channels: int = 256,
) -> Segmenter:
    """Build a DeepLab through segmentation-models-pytorch.

    Args:
        arch: ``deeplabv3plus`` or ``deeplabv3``.
        encoder: An smp encoder name (``resnet101``) or ``tu-<timm name>``.
        num_classes: Output channels K (background included).
        encoder_weights: ``none``; a local ``.safetensors``/``.pth`` file loaded into the encoder; or a named tag
            such as ``imagenet`` that smp/timm download (for ``tu-`` encoders any tag means timm's default
            pretrained weights, or the tag in the name, e.g. ``tu-resnet18.a1_in1k``).
        output_stride: Encoder output stride, 8 or 16.
        decoder_channels: ASPP / decoder width.

    Returns:
        The model.

    Raises:
        SegModelError: For an unknown encoder, or weights that cannot be loaded or downloaded.
    """
    _check_encoder_name(encoder)
    if encoder_weights == "none":
        net = _build_net(arch, encoder, None, num_classes, output_stride, decoder_channels)
    elif is_weights_file(encoder_weights):
        net = _build_net(arch, encoder, None, num_classes, output_stride, decoder_channels)
        load_encoder_weights(net.encoder, Path(encoder_weights))
    else:
        net = _build_with_tag(arch, encoder, encoder_weights, num_classes, output_stride, decoder_channels)
    return Segmenter(net)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled pixels (255 = ignore); 0 with zero gradients if there are none.

    Args:
        logits: (B, K, H, W) scores.
        target: (B, H, W) int64 class ids or 255.
    """
    total = F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")
    count = (target != IGNORE).sum().clamp(min=1)
    return total / count


def save_segmenter(model: Segmenter, meta: dict[str, Any], model_dir: Path) -> None:
    """Write ``model.safetensors`` (the smp model's state dict) and ``meta.json``, each atomically."""
    save_model_dir(model_dir, model.net, {"format": META_FORMAT, **meta})


def load_segmenter(model_dir: Path | str, device: torch.device) -> tuple[Segmenter, dict[str, Any]]:
    """Rebuild the model written by ``train_seg`` from ``model.safetensors`` + ``meta.json`` (eval mode).

    Raises:
        SegModelError: If a file is missing or does not match the described model.
    """
    keys = ("arch", "encoder", "num_classes", "output_stride", "decoder_channels", "mean", "std", "palette")
    weights, meta = read_model_dir(model_dir, "segmentation model", "train_seg", keys)
    meta_path = Path(model_dir) / META
    if meta.get("format") != META_FORMAT:
        raise SegModelError(f"{meta_path}: not a segmentation model description (format {meta.get('format')!r})")
    try:
        model = build_segmenter(
            *(meta[key] for key in keys[:3]), "none", meta["output_stride"], meta["decoder_channels"]
        )
    except SegModelError:
        raise
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SegModelError(f"{meta_path}: does not describe a model this version builds ({one_line(exc)})") from None
    try:
        model.net.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # noqa: BLE001 - a corrupt or mismatched file is one user error
        raise SegModelError(f"{weights}: does not match {meta_path} ({type(exc).__name__})") from None
    return model.to(device).eval(), meta


@torch.no_grad()
def predict_probs(
    model: Segmenter, images: torch.Tensor, scales: tuple[float, ...], flip: bool, amp: bool = True
) -> torch.Tensor:
    """Class probabilities averaged over scales and (optionally) horizontal flips.

    Args:
        model: The model in eval mode.
        images: (B, 3, H, W) normalised images.
        scales: Input scales (bilinear resize).
        flip: Also run the mirrored images and flip their outputs back.
        amp: Autocast on CUDA.

    Returns:
        (B, K, H, W) float32 softmax probabilities at the input size.
    """
    h, w = images.shape[-2:]
    total, count = None, 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if scale != 1 else images
        for mirrored in (False, True) if flip else (False,):
            with runtime.autocast(images.device, amp):
                logits = model(x.flip(-1) if mirrored else x)  # (B, K, h', w')
            logits = logits.float().flip(-1) if mirrored else logits.float()
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)  # (B, K, H, W)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
            count += 1
    return total / count
