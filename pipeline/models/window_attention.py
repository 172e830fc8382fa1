"""Swin window attention on the global token grid: recording it and the window <-> grid bookkeeping (AReAM S1).

A timm ``SwinTransformerBlock`` on an (H, W) token map rolls it by ``-shift``, pads it bottom/right to a multiple
of the window M, cuts it into nW windows of M x M tokens and attends inside each window, with -100 added between
tokens that came from different regions of the rolled map (the shift mask). Its attention is therefore a tensor
(B * nW, heads, M^2, M^2). AReAM on Swin (``/work/shared/reference/refinement.md`` §4.4, S1) needs it on the
global grid of N = H * W tokens:

* :func:`window_index`: the global token of each window slot (-1 for padding);
* :func:`window_pairs`: the pairs a block really attends with (same region, no padding);
* :func:`scatter_windows` / :func:`gather_windows`: window values <-> (B, N, N) matrices, zero (or ``fill``)
  outside the windows;
* :func:`record_window_attention`: the pre-softmax logits (relative-position bias and shift mask included) and
  the probabilities of chosen blocks, with the token grid each block saw.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition


def window_index(grid: tuple[int, int], window: tuple[int, int], shift: tuple[int, int]) -> torch.Tensor:
    """The global token (``r * W + c``) in each slot of each window, as timm's block cuts them.

    Args:
        grid: The block's token map (H, W).
        window: The window (M_h, M_w).
        shift: The cyclic shift (s_h, s_w); (0, 0) for regular windows.

    Returns:
        (nW, M_h * M_w) int64; -1 on the padding timm adds when H or W is not a multiple of the window.
    """
    h, w = grid
    tokens = torch.arange(h * w, dtype=torch.float64).view(1, h, w, 1)  # (1, H, W, 1)
    rolled = torch.roll(tokens, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    padded = F.pad(rolled, (0, 0, 0, pad_w, 0, pad_h), value=-1.0)  # (1, Hp, Wp, 1)
    return window_partition(padded, window).reshape(-1, window[0] * window[1]).long()  # (nW, M^2)


def window_pairs(block: SwinTransformerBlock, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's window layout on an (H, W) map: the slot -> token index and the pairs it attends with.

    Returns:
        ``index`` (nW, M^2) from :func:`window_index` and ``valid`` (nW, M^2, M^2) bool: both slots are tokens
        (not padding) from the same region of the rolled map (not shift-masked).
    """
    window, shift = tuple(block.window_size), tuple(block.shift_size)
    index = window_index(grid, window, shift)  # (nW, M^2)
    tokens = index >= 0
    valid = tokens[:, :, None] & tokens[:, None, :]  # (nW, M^2, M^2)
    if any(shift):
        padded = torch.zeros(1, grid[0] + (-grid[0]) % window[0], grid[1] + (-grid[1]) % window[1], 1)
        valid &= block.get_attn_mask(padded) == 0  # (nW, M^2, M^2): 0 same region, -100 otherwise
    return index, valid


def _flat_pairs(index: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Flat (N * N) positions of the valid window pairs: (nW, M^2), (nW, M^2, M^2) -> (P,)."""
    rows = index[:, :, None].expand_as(valid)[valid]  # (P,)
    cols = index[:, None, :].expand_as(valid)[valid]  # (P,)
    return rows * n + cols


def scatter_windows(values: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, n: int) -> torch.Tensor:
    """Window values onto the global grid: (B, nW, M^2, M^2) -> (B, N, N), zero outside the valid pairs.

    Every token lies in exactly one window of a block, so no pair is written twice.
    """
    out = values.new_zeros(values.shape[0], n * n)  # (B, N*N)
    out[:, _flat_pairs(index, valid, n)] = values[:, valid]
    return out.view(-1, n, n)


def gather_windows(matrix: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, fill: float) -> torch.Tensor:
    """Global pair values into the windows: (B, N, N) -> (B, nW, M^2, M^2), ``fill`` where a pair is not valid."""
    b, n = matrix.shape[0], matrix.shape[-1]
    out = matrix.new_full((b, *valid.shape), fill)  # (B, nW, M^2, M^2)
    out[:, valid] = matrix.reshape(b, n * n)[:, _flat_pairs(index, valid, n)]
    return out


@dataclass
class WindowRecord:
    """One block's attention in one forward pass, head-averaged.

    Attributes:
        grid: The token map (H, W) the block saw.
        logits: (B, nW, M^2, M^2) pre-softmax logits (scaled q k^T + relative-position bias + shift mask).
        probs: (B, nW, M^2, M^2) softmax attention.
        index: (nW, M^2) slot -> token (:func:`window_pairs`).
        valid: (nW, M^2, M^2) the pairs the block attends with.
    """

    grid: tuple[int, int]
    logits: torch.Tensor
    probs: torch.Tensor
    index: torch.Tensor = field(repr=False)
    valid: torch.Tensor = field(repr=False)

    def dense(self) -> torch.Tensor:
        """The attention probabilities on the global grid: (B, N, N), zero outside the windows."""
        index, valid = self.index.to(self.probs.device), self.valid.to(self.probs.device)
        return scatter_windows(self.probs.float(), index, valid, self.grid[0] * self.grid[1])


@contextmanager
def record_window_attention(blocks: Sequence[SwinTransformerBlock]) -> Iterator[list[WindowRecord]]:
    """Record the attention of ``blocks`` during the forward passes run inside the ``with``.

    The blocks run timm's explicit softmax attention while recording (not the fused kernel, which keeps no
    attention); the list yielded fills with one :class:`WindowRecord` per block call, in call order.
    """
    records: list[WindowRecord] = []
    grids: dict[int, tuple[int, int]] = {}
    handles, fused = [], [block.attn.fused_attn for block in blocks]

    def on_block(block: SwinTransformerBlock, args: tuple) -> None:
        grids[id(block)] = tuple(args[0].shape[1:3])  # the block's input is (B, H, W, C)

    def on_softmax(block: SwinTransformerBlock):
        def hook(_module: torch.nn.Module, args: tuple, probs: torch.Tensor) -> None:
            grid = grids[id(block)]
            index, valid = window_pairs(block, grid)
            n_windows, heads, area = index.shape[0], probs.shape[1], probs.shape[-1]
            logits = args[0].view(-1, n_windows, heads, area, area).mean(dim=2)  # (B, nW, M^2, M^2)
            probs = probs.view(-1, n_windows, heads, area, area).mean(dim=2)
            records.append(WindowRecord(grid, logits, probs, index, valid))

        return hook

    try:
        for block in blocks:
            block.attn.fused_attn = False
            handles.append(block.register_forward_pre_hook(on_block))
            handles.append(block.attn.softmax.register_forward_hook(on_softmax(block)))
        yield records
    finally:
        for handle in handles:
            handle.remove()
        for block, was_fused in zip(blocks, fused, strict=True):
            block.attn.fused_attn = was_fused
