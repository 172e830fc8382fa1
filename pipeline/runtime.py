"""The process a stage runs in: device, threads, seeding, mixed precision and the (optional) DDP process group."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.errors import TrainingError


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a (possibly single-process) distributed run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on the process that logs and writes artifacts."""
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``), else run alone.

    Uses NCCL on CUDA and gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def cleanup_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Map ``auto`` / ``cpu`` / ``cuda`` to a device; ``cuda`` without a GPU is an error.

    Raises:
        TrainingError: If CUDA is requested but not available.
    """
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but no CUDA device is available (use 'auto' or 'cpu')")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def distributed_device(name: str) -> tuple[torch.device, Dist]:
    """Resolve ``name`` to a device and join the process group under ``torchrun`` (alone otherwise).

    Under ``torchrun`` on CUDA, each process takes the GPU of its ``LOCAL_RANK``.

    Raises:
        TrainingError: If CUDA is requested but not available.
    """
    device = resolve_device(name)
    ddp = init_distributed(device)
    if ddp.world_size > 1 and device.type == "cuda":
        device = resolve_device(name, ddp.local_rank)
    return device, ddp


def set_threads(threads: int) -> None:
    """Set torch's intra-op threads (0 leaves torch's default)."""
    if threads > 0:
        torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA (bf16 where supported, else fp16); a no-op on CPU or when disabled."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def make_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 autocast on CUDA."""
    fp16 = enabled and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    return torch.amp.GradScaler(device.type, enabled=fp16)
