"""Pretrained weights for any timm-built network: ``none``, a local file, or a timm pretrained tag.

``model.pretrained`` (and any future encoder's equivalent) is resolved by :func:`load_pretrained`:

* ``none``: keep the random initialisation;
* a path (ends in ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin``, contains a ``/``, or exists): a state dict,
  plain or nested under ``model`` / ``state_dict``, loaded with ``weights_only=True``; when a manifest
  ``<name>.json`` with a ``sha256`` sits beside it (``wsss pretrain`` writes one), the file must match it;
* anything else: a timm pretrained tag such as ``swin_tiny_patch4_window7_224.ms_in1k``, loaded through timm from
  the local Hugging Face / torch hub cache, or downloaded where there is network. Without network (or with
  ``HF_HUB_OFFLINE=1``) an uncached tag fails at once with a message that says how to pass a file instead;
  reachability is probed with a short TCP connect, so no download hangs.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.errors import PretrainedError
from pipeline.io import atomic_path, sha256_of

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
PROBE_TIMEOUT = 3.0


def is_weights_file(spec: str) -> bool:
    """Whether ``model.pretrained`` names a file (rather than ``none`` or a timm tag)."""
    return spec.endswith(WEIGHT_SUFFIXES) or "/" in spec or os.sep in spec or Path(spec).is_file()


def read_state_dict(
    path: Path | str, setting: str = "model.pretrained", error: type[Exception] = PretrainedError
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``).

    A checkpoint that nests the weights under ``model`` or ``state_dict`` is unwrapped.

    Args:
        path: The file.
        setting: The params key that named it (starts every message).
        error: The exception type to raise (the caller's user error).

    Raises:
        error: If the file is missing or unreadable, or holds no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{setting}: weights file {path} not found")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise error(f"{setting}: cannot read {path} ({type(exc).__name__})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        kind = "dict of non-tensors" if isinstance(state, dict) else type(state).__name__
        raise error(f"{setting}: {path} holds a {kind}, not a state dict of tensors")
    return state


def load_state_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    setting: str = "model.pretrained",
    *,
    complete: bool = False,
    error: type[Exception] = PretrainedError,
    what: str = "model",
) -> None:
    """Load matching tensors of ``state`` into ``model``, checking names and shapes; extra tensors are ignored.

    Args:
        model: The network.
        state: The weights.
        source: Where they came from (for messages).
        setting: The params key that named the weights (for messages).
        complete: Require every tensor of ``model`` (BatchNorm's ``num_batches_tracked`` aside); otherwise one
            matching tensor is enough and the missing ones are logged.
        error: The exception type to raise (the caller's user error).
        what: What ``model`` is, for messages (``model``, ``encoder``).

    Raises:
        error: If tensors have the wrong shape, or are missing (``complete``), or none belongs to the model.
    """
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        key = wrong[0]
        raise error(
            f"{setting}: {source}: {len(wrong)} tensors have the wrong shape "
            f"(first: {key} {tuple(state[key].shape)} vs {tuple(own[key].shape)} in the {what}): the weights are "
            f"for another size; set {setting} to weights of this one, or none to train from scratch"
        )
    missing = [k for k in own if k not in state]
    needed = [k for k in missing if not k.endswith("num_batches_tracked")] if complete else []
    if needed:
        raise error(
            f"{setting}: {source} lacks {len(needed)} of the {what}'s {len(own)} tensors (first: {needed[0]}); "
            f"is it for another {what}?"
        )
    if len(missing) == len(own):
        raise error(f"{setting}: {source} has no weights for this {what}")
    model.load_state_dict(state, strict=False)
    if missing and not complete:
        log.warning("%s: %d of %d tensors not in %s (e.g. %s)", setting, len(missing), len(own), source, missing[0])
    unused = len(state.keys() - own.keys())
    if unused:
        log.info("%s: ignored %d tensors of %s that the %s does not have", setting, unused, source, what)


def _offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return flag or bool(hf_constants.HF_HUB_OFFLINE)


def _cached_weights(cfg) -> str | None:
    """A local copy of the tag's weights in the Hugging Face or torch hub cache, if there is one."""
    if cfg.hf_hub_id:
        repo, _, revision = cfg.hf_hub_id.partition("@")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        for name in names:
            found = try_to_load_from_cache(repo, name, revision=revision or None)
            if isinstance(found, str):
                return found
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(cfg.url).path).name
        if path.is_file():
            return str(path)
    return None


def reachable(url: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds (a probe before downloads).

    The port is the URL's, else 80 for ``http`` and 443 otherwise; a URL without a host is unreachable.
    """
    parts = urlparse(url)
    if not parts.hostname:
        return False
    address = (parts.hostname, parts.port or (80 if parts.scheme == "http" else 443))
    try:
        socket.create_connection(address, timeout=timeout).close()
        return True
    except OSError:
        return False


def _no_network_message(tag: str, reason: str) -> str:
    return (
        f"model.pretrained: cannot get timm weights '{tag}' ({reason}); set model.pretrained to a local "
        f".safetensors/.pth file instead, e.g. made where there is network with `wsss download-weights {tag} "
        f"--out weights.safetensors`"
    )


def timm_state_dict(tag: str, probe_timeout: float = PROBE_TIMEOUT) -> dict[str, torch.Tensor]:
    """The backbone weights of a timm pretrained tag (classifier head removed), from cache or downloaded.

    Args:
        tag: A timm model name with pretrained tag, e.g. ``swin_tiny_patch4_window7_224.ms_in1k``.
        probe_timeout: Seconds allowed for the reachability probe of the weights' host.

    Returns:
        The state dict, in timm's naming.

    Raises:
        PretrainedError: If the tag is unknown, or the weights are not cached and cannot be downloaded.
    """
    cfg = timm.models.get_pretrained_cfg(tag)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PretrainedError(
            f"model.pretrained: '{tag}' is neither 'none', a weights file, nor a timm pretrained tag "
            f"(e.g. swin_tiny_patch4_window7_224.ms_in1k; see timm.list_pretrained())"
        )
    cached = _cached_weights(cfg)
    if cached is not None:
        log.info("model.pretrained: %s from the local cache %s", tag, cached)
        model = timm.create_model(tag, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": cached})
        return model.state_dict()
    if _offline():
        raise PretrainedError(_no_network_message(tag, "not cached and HF_HUB_OFFLINE is set"))
    url = hf_constants.ENDPOINT if cfg.hf_hub_id else cfg.url
    host = urlparse(url).hostname or ""
    if not reachable(url, probe_timeout):
        raise PretrainedError(_no_network_message(tag, f"not cached and {host} is unreachable"))
    try:
        model = timm.create_model(tag, pretrained=True, num_classes=0)
    except Exception as exc:  # noqa: BLE001 - any failed download is the same user error
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise PretrainedError(_no_network_message(tag, f"{type(exc).__name__}: {reason}")) from None
    return model.state_dict()


def load_pretrained(model: nn.Module, spec: str | Path, setting: str = "model.pretrained") -> None:
    """Initialise ``model`` from ``spec``: ``none``, a weights file, or a timm pretrained tag (module docstring).

    Raises:
        PretrainedError: If the weights cannot be found, read, or do not fit the model.
    """
    spec = str(spec)
    if spec == "none":
        return
    if is_weights_file(spec):
        verify_checksum(Path(spec), setting)
        load_state_into(model, read_state_dict(spec, setting), spec, setting)
    else:
        load_state_into(model, timm_state_dict(spec), f"timm weights '{spec}'", setting)


def verify_checksum(path: Path, setting: str = "model.pretrained") -> None:
    """Check a weights file against the ``sha256`` of the manifest ``<name>.json`` beside it, if there is one.

    Raises:
        PretrainedError: If the file's SHA-256 differs from the manifest's.
    """
    manifest = path.with_suffix(".json")
    if not path.is_file() or not manifest.is_file():
        return
    try:
        expected = json.loads(manifest.read_text()).get("sha256")
    except (ValueError, AttributeError):
        return  # not a manifest of ours
    if isinstance(expected, str) and sha256_of(path) != expected:
        raise PretrainedError(
            f"{setting}: {path} does not match the sha256 in {manifest} (a changed or truncated file: restore it "
            f"with `git checkout -- {path}`, or re-make it with the command in the manifest)"
        )


def save_state_dict(state: dict[str, torch.Tensor], path: Path | str) -> Path:
    """Save weights as ``.safetensors`` (contiguous copies; usable as ``model.pretrained``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(tmp))
    return path
