"""PAR, pixel-adaptive refinement (AFA, Ru et al., CVPR'22; reused by ToCo and AReAM), batched, CPU and CUDA.

Every pixel ``i`` looks at the 8 neighbours of a 3x3 stencil (centre excluded) at each dilation ``d`` of
``dilations`` (48 neighbours for the published ``(1, 2, 4, 8, 12, 24)``), out-of-image neighbours clamped to
the border (replicate padding). The kernel over these neighbours ``j`` is computed once from the image:

* appearance: ``k_I(i, j) = -mean_ch [|I_ch(i) - I_ch(j)| / ((s_ch(i) + 1e-8) * w1)]^2`` with ``s_ch(i)`` the
  (unbiased) standard deviation of channel ``ch`` over the neighbours of ``i``, so the image's range does not
  matter;
* position: ``k_P(j) = -[p(j) / ((s_P + 1e-8) * w1)]^2`` with ``p(j) = d`` for axial and ``sqrt(2) d`` for
  diagonal neighbours and ``s_P`` the standard deviation of the 48 distances (a constant);
* ``K(i, j) = softmax_j k_I(i, j) + w2 * softmax_j k_P(j)`` (sums to ``1 + w2``, not renormalised, as published:
  a global scale that no argmax sees).

The maps are then propagated ``iterations`` times: ``m(i) <- sum_j K(i, j) m(j)`` for every channel. Published
constants: dilations (1, 2, 4, 8, 12, 24), w1 = 0.3, w2 = 0.01, 10 iterations, at half the image resolution
(``scale`` 0.5 in :func:`refine_at_scale`). See /work/shared/reference/refinement.md §3 for the provenance.

Implementation: the image's neighbours are gathered once with a precomputed flat index (clamping the
coordinates is replicate padding at any pad width), pixel-major so that every reduction over a pixel's
neighbours runs along contiguous memory; the float32 kernel, shared by all channels, becomes a
sparse (h*w, h*w) matrix (block-diagonal over the batch, CSR), so an iteration is one sparse-dense product,
whatever the number of dilations. On 48 x 48 maps (the 96 px benchmark at half resolution) this is about 9x
faster than AFA's one-hot dilated convolutions, which make 48 shifted copies of the maps at every iteration.
The standard deviation is taken over the differences ``I(j) - I(i)`` (the same value, one pass less).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

DILATIONS = (1, 2, 4, 8, 12, 24)
"""AFA's dilations: 6 x 8 = 48 neighbours per pixel."""
W1 = 0.3
"""Temperature of both terms (AFA's ``w1``)."""
W2 = 0.01
"""Weight of the position term (AFA's ``w2``)."""
ITERATIONS = 10
SCALE = 0.5
"""AFA / AReAM run PAR at half the image resolution (``down_scale=2``)."""
EPS = 1e-8
STENCIL = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
"""The 8 (dy, dx) steps of a 3x3 stencil without its centre, row-major."""


def neighbour_offsets(dilations: Sequence[int]) -> torch.Tensor:
    """The (dy, dx) offsets of the neighbourhood, dilation-major: (8 * len(dilations), 2) int64."""
    return torch.tensor([(dy * d, dx * d) for d in dilations for dy, dx in STENCIL], dtype=torch.int64)


def neighbour_distances(dilations: Sequence[int]) -> torch.Tensor:
    """Distance of each neighbour to the centre (``d`` axial, ``sqrt(2) d`` diagonal): (N,) float32."""
    return neighbour_offsets(dilations).double().norm(dim=1).float()  # (N,)


def neighbour_index(
    height: int, width: int, dilations: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Flat index ``y * width + x`` of every neighbour of every pixel, coordinates clamped to the image.

    Args:
        height: Rows h.
        width: Columns w.
        dilations: The stencil dilations.
        device: Where the index lives.

    Returns:
        (h * w, N) int32 (``index_select`` gathers faster with it), N = 8 * len(dilations); row i holds the
        neighbours of pixel i (row-major pixels), dilation-major as :func:`neighbour_offsets`.
    """
    offsets = neighbour_offsets(dilations).to(device)  # (N, 2)
    ys = torch.arange(height, device=device).view(height, 1, 1)  # (h, 1, 1)
    xs = torch.arange(width, device=device).view(1, width, 1)  # (1, w, 1)
    ny = (ys + offsets[:, 0]).clamp_(0, height - 1)  # (h, 1, N)
    nx = (xs + offsets[:, 1]).clamp_(0, width - 1)  # (1, w, N)
    return (ny * width + nx).reshape(height * width, len(offsets)).int()  # (h*w, N)


def gather_neighbours(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The neighbours of every pixel: (B, C, h, w) with a (h*w, N) index -> (B, C, h*w, N)."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1)  # (B*C, h*w); a 2-D index_select is ~15x faster on CPU than along dim 2 of 3-D
    return flat.index_select(1, index.reshape(-1)).view(b, c, *index.shape)  # (B, C, h*w, N)


@lru_cache(maxsize=8)
def position_weights(dilations: tuple[int, ...], w1: float = W1) -> torch.Tensor:
    """``softmax_j k_P(j)`` over the neighbours: (N,) float32 (the same for every pixel; cached, do not modify)."""
    dist = neighbour_distances(dilations)  # (N,)
    logits = -((dist / (dist.std() + EPS) / w1) ** 2)  # (N,)
    return logits.softmax(0)


def par_kernel(
    image: torch.Tensor, index: torch.Tensor, dilations: Sequence[int], w1: float = W1, w2: float = W2
) -> torch.Tensor:
    """PAR's kernel from the image: appearance softmax + ``w2`` x position softmax.

    Args:
        image: (B, 3, h, w) float image (any range: differences are divided by a local std).
        index: (h*w, N) neighbour index of :func:`neighbour_index` for these dilations and this size.
        dilations: The stencil dilations (for the position term).
        w1: Temperature of both terms.
        w2: Weight of the position term.

    Returns:
        (B, h*w, N) float32 weights; each pixel's N weights sum to ``1 + w2``.
    """
    image = image.float()
    b, ch = image.shape[:2]
    n = index.shape[1]
    diff = gather_neighbours(image, index).sub_(image.reshape(b, ch, -1, 1))  # (B, 3, h*w, N), I(j) - I(i)
    # std over the neighbours of I(j) = that of I(j) - I(i): one pass less than centring on the mean
    mean = diff.mean(3, keepdim=True)  # (B, 3, h*w, 1)
    sq_diff = diff.square_()  # (B, 3, h*w, N), in place: fresh large buffers cost page faults at this size
    var = (sq_diff.sum(3, keepdim=True) - n * mean.square()).clamp_(min=0) / (n - 1)  # (B, 3, h*w, 1), unbiased
    inv_scale = ((var.sqrt_() + EPS) * w1).pow_(-2).mul_(-1 / ch)  # (B, 3, h*w, 1), with the 1/3 and the sign
    appearance = sq_diff.mul_(inv_scale).sum(1)  # (B, h*w, N)
    position = position_weights(tuple(dilations), w1).to(image.device)  # (N,)
    return appearance.softmax(2).add_(position, alpha=w2)  # (B, h*w, N)


class SparsePattern:
    """The sparsity pattern of PAR's (h*w, h*w) propagation matrix for one size: canonical CSR.

    Clamped neighbours repeat a column (near the border); CSR wants each (row, column) once and columns sorted,
    so the N weights of a pixel are summed into its distinct columns: each column takes the first weight that
    lands on it (``first``), and the few repeats (``repeats``) are added to their columns (``repeat_slot``).

    Args:
        index: (h*w, N) neighbour index of :func:`neighbour_index`.
    """

    def __init__(self, index: torch.Tensor) -> None:
        hw, n = index.shape
        rows = torch.arange(hw, device=index.device).repeat_interleave(n)  # (h*w*N,), entry (i, j) -> pixel i
        keys, slot = torch.unique(rows * hw + index.reshape(-1).long(), sorted=True, return_inverse=True)  # (nnz,)
        counts = torch.bincount(keys // hw, minlength=hw)  # (h*w,) distinct neighbours per pixel
        self.pixels, self.nnz = hw, len(keys)
        entries = torch.arange(len(slot), device=index.device)  # (h*w*N,)
        self.first = torch.full_like(keys, len(slot)).scatter_reduce_(0, slot, entries, "amin")  # (nnz,)
        repeated = torch.ones_like(slot, dtype=torch.bool).index_fill_(0, self.first, False)  # (h*w*N,)
        self.repeats, self.repeat_slot = entries[repeated], slot[repeated]  # the clamped duplicates
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (h*w + 1,)
        self.col = keys % hw  # (nnz,)
        self._batched: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def indices(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CSR row pointers (B*h*w + 1,) and columns (B*nnz,) of the block-diagonal batch (cached per size).

        int32 where they fit, as the sparse kernels (MKL, cuSPARSE) use: int64 would be converted at every product.
        """
        if self._batched is None or self._batched[0] != batch:
            shift = torch.arange(batch, device=self.crow.device).view(batch, 1)  # (B, 1)
            crow = torch.cat(
                [(self.crow[:-1] + shift * self.nnz).reshape(-1), self.crow.new_tensor([batch * self.nnz])]
            )
            col = (self.col + shift * self.pixels).reshape(-1)  # (B*nnz,)
            dtype = torch.int32 if batch * max(self.nnz, self.pixels) < 2**31 else torch.int64
            self._batched = batch, crow.to(dtype), col.to(dtype)
        return self._batched[1], self._batched[2]

    def matrix(self, kernel: torch.Tensor) -> torch.Tensor:
        """The block-diagonal propagation matrix of a batch: (B, h*w, N) kernel -> sparse CSR (B*h*w, B*h*w)."""
        b = kernel.shape[0]
        flat = kernel.reshape(b, -1)  # (B, h*w*N)
        values = flat.index_select(1, self.first).index_add_(1, self.repeat_slot, flat[:, self.repeats])  # (B, nnz)
        crow, col = self.indices(b)
        size = (b * self.pixels, b * self.pixels)
        with warnings.catch_warnings():  # torch warns once that CSR support is "beta"; it is exact here
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(crow, col, values.reshape(-1), size, check_invariants=False)


def propagate(maps: torch.Tensor, matrix: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` steps of ``m(i) <- sum_j K(i, j) m(j)``: (B, C, h, w) -> (B, C, h, w) float32.

    Args:
        maps: (B, C, h, w) maps at the kernel's resolution.
        matrix: (B*h*w, B*h*w) sparse propagation matrix of :meth:`SparsePattern.matrix`.
        iterations: Propagation steps.
    """
    b, c, h, w = maps.shape
    current = maps.float().permute(0, 2, 3, 1).reshape(b * h * w, c)  # (B*h*w, C)
    for _ in range(iterations):
        current = matrix @ current  # (B*h*w, C)
    return current.view(b, h, w, c).permute(0, 3, 1, 2).contiguous()  # (B, C, h, w)


class PAR(nn.Module):
    """Pixel-adaptive refinement of (B, C, h, w) maps guided by a (B, 3, h, w) image (AFA's module).

    The maps are resized (bilinear, align_corners=True as in AFA) to the image's size, refined there and
    returned at that size. The neighbour index and sparsity pattern are cached for the last few sizes.

    Args:
        dilations: Stencil dilations (published: 1, 2, 4, 8, 12, 24).
        iterations: Propagation steps (published: 10).
        w1: Temperature of the appearance and position terms (published: 0.3).
        w2: Weight of the position term (published: 0.01).
    """

    CACHED_SIZES = 4

    def __init__(
        self, dilations: Sequence[int] = DILATIONS, iterations: int = ITERATIONS, w1: float = W1, w2: float = W2
    ) -> None:
        super().__init__()
        if not dilations or min(dilations) < 1:
            raise ValueError(f"dilations must be positive integers, got {tuple(dilations)}")
        self.dilations = tuple(int(d) for d in dilations)
        self.iterations, self.w1, self.w2 = int(iterations), float(w1), float(w2)
        self._cache: dict[tuple, tuple[torch.Tensor, SparsePattern]] = {}

    def pattern(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, SparsePattern]:
        """The (h*w, N) neighbour index and the sparsity pattern for this size and device (cached)."""
        key = (height, width, str(device))
        if key not in self._cache:
            if len(self._cache) >= self.CACHED_SIZES:
                self._cache.pop(next(iter(self._cache)))
            index = neighbour_index(height, width, self.dilations, device)  # (h*w, N)
            self._cache[key] = index, SparsePattern(index)
        return self._cache[key]

    def forward(self, image: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Refine ``maps`` (B, C, h', w') with ``image`` (B, 3, h, w): returns (B, C, h, w) float32."""
        h, w = image.shape[-2:]
        if maps.shape[-2:] != (h, w):
            maps = F.interpolate(maps.float(), size=(h, w), mode="bilinear", align_corners=True)  # (B, C, h, w)
        index, pattern = self.pattern(h, w, image.device)
        kernel = par_kernel(image, index, self.dilations, self.w1, self.w2)  # (B, h*w, N)
        return propagate(maps, pattern.matrix(kernel), self.iterations)


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The size PAR runs at: ``floor(h * scale)``, ``floor(w * scale)``, at least 1 (AFA: ``h // 2`` for 0.5)."""
    return max(1, math.floor(height * scale)), max(1, math.floor(width * scale))


def refine_at_scale(
    par: PAR, image: torch.Tensor, scores: torch.Tensor, scale: float = SCALE, softmax: bool = True
) -> torch.Tensor:
    """AFA's use of PAR: downscale image and scores, softmax over classes, refine, upsample back.

    Resampling is bilinear with align_corners=False, as in AFA's ``refine_cams_with_bkg_v2``. Several score
    stacks of one image (AFA's two background thresholds) share one kernel.

    Args:
        par: The module.
        image: (B, 3, H, W) float image.
        scores: (B, S, K, H, W) S score stacks per image over K channels (AFA: a constant background score +
            the CAMs of the image's classes), or (B, K, H, W) for one stack.
        scale: Resolution factor PAR runs at (published: 0.5); 1 runs at full resolution.
        softmax: Softmax over the K channels of each stack after downscaling (AFA: yes, temperature 1).

    Returns:
        Refined maps, float32, shaped like ``scores``.
    """
    shape = scores.shape  # (B, [S,] K, H, W)
    size = tuple(image.shape[-2:])
    small = scaled_size(*size, scale)
    image, stacks = image.float(), scores.float().reshape(shape[0], -1, *size)  # (B, S*K, H, W)
    if small != size:
        image = F.interpolate(image, size=small, mode="bilinear", align_corners=False)  # (B, 3, h, w)
        stacks = F.interpolate(stacks, size=small, mode="bilinear", align_corners=False)  # (B, S*K, h, w)
    if softmax:
        stacks = stacks.view(shape[0], -1, shape[-3], *small).softmax(2).view(shape[0], -1, *small)
    refined = par(image, stacks)  # (B, S*K, h, w)
    if small != size:
        refined = F.interpolate(refined, size=size, mode="bilinear", align_corners=False)  # (B, S*K, H, W)
    return refined.reshape(shape)
