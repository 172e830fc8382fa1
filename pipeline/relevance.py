"""Relevance maps of the DeiT classifier (WegFormer's attention maps; Chefer et al., CVPR 2021): ``cams.relevance``.

For an image and a class c, the map is the class token's row of a (rolled-out) relevance-weighted attention,
read over the patch tokens. Two kinds (``docs/wegformer.md``; reconstruction in the reference notes §5.2-5.3):

* ``full``: Deep Taylor Decomposition / LRP. The relevance ``R = one-hot(c)`` at the class-token head is
  propagated back through the network: linear layers by the alpha1-beta0 (z+) rule, residual additions by a
  conservative split, the two matrix products of attention (``q k^T`` and ``A v``) by gradient x input with the
  relevance halved between their two factors; LayerNorm, GELU, softmax and dropout pass it through. The relevance
  reaching each block's attention probabilities is ``R_b``; per block ``A_b = I + mean_h((dA_b * R_b)^+)`` with
  ``dA_b`` the gradient of the class logit, and the map is the class-token row of ``A_B ... A_1`` (no row
  normalisation).
* ``gradient``: the gradient-only rule (Chefer et al., ICCV 2021): ``A_b = mean_h((dA_b * A_b)^+)`` and the
  rollout ``R <- R + A_b R`` from ``R = I``.

``blocks: last`` (WegFormer's choice) reads the last block only; ``all`` rolls out over every block. Each
(image, class) pair is one row of a batch: the image is repeated once per present class (``class_batch`` rows
per forward/backward), so every row's gradient and relevance are its own class's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.config import RelevanceParams
from pipeline.models.deit import DeiTClassifier
from pipeline.models.padding import crop_to_input, pad_to_multiple
from pipeline.models.swtformer import max_norm

EPS = 1e-9


def safe_divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` with 0 where ``b`` is 0, and ``b`` moved away from 0 by ``EPS`` keeping its sign."""
    den = b + EPS * torch.where(b >= 0, 1.0, -1.0)
    return a / den * (b != 0)


def linear_relprop(x: torch.Tensor, weight: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
    """The alpha1-beta0 (z+) rule through ``y = x W^T (+ b)``: only the positive contributions carry relevance.

    Args:
        x: (..., in) layer input.
        weight: (out, in) weight (the bias takes no relevance).
        relevance: (..., out) relevance of the output.

    Returns:
        (..., in) relevance of the input; it sums to the output's where a row has any positive contribution.
    """
    w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
    x_pos, x_neg = x.clamp(min=0), x.clamp(max=0)
    z = x_pos @ w_pos.T + x_neg @ w_neg.T  # (..., out) positive contributions
    s = safe_divide(relevance, z)  # (..., out)
    return x_pos * (s @ w_pos) + x_neg * (s @ w_neg)  # (..., in)


def _row_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over all but the first (row) dimension, kept broadcastable: (N, ...) -> (N, 1, ...)."""
    return x.sum(dim=tuple(range(1, x.dim())), keepdim=True)


def add_relprop(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the relevance of ``a + b`` between the summands, conserving each row's total.

    Each summand first gets ``x * R / (a + b)``; then both parts are rescaled so that their totals are in the
    ratio of their absolute sums and add up to the total of ``relevance`` (per row).

    Returns:
        ``(R_a, R_b)``, shaped like ``a`` and ``b``.
    """
    r_a, r_b = a * safe_divide(relevance, a + b), b * safe_divide(relevance, a + b)
    sum_a, sum_b, total = _row_sum(r_a), _row_sum(r_b), _row_sum(relevance)
    share_a = safe_divide(sum_a.abs(), sum_a.abs() + sum_b.abs()) * total
    share_b = safe_divide(sum_b.abs(), sum_a.abs() + sum_b.abs()) * total
    return r_a * safe_divide(share_a, sum_a), r_b * safe_divide(share_b, sum_b)


def matmul_relprop(a: torch.Tensor, b: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient x input through ``z = a @ b``, halved between the factors (each half sums to half of R).

    Args:
        a: (..., n, k).
        b: (..., k, m).
        relevance: (..., n, m) relevance of ``z``.

    Returns:
        ``(R_a, R_b)`` shaped like ``a`` and ``b``.
    """
    s = safe_divide(relevance, a @ b)  # (..., n, m)
    return a * (s @ b.transpose(-2, -1)) / 2, b * (a.transpose(-2, -1) @ s) / 2


@dataclass
class BlockTrace:
    """What one transformer block computed, for the relevance pass (N rows, T tokens, h heads)."""

    n1: torch.Tensor  # (N, T, D) norm1 output = qkv input
    q: torch.Tensor  # (N, h, T, d) scaled queries
    k: torch.Tensor  # (N, h, T, d)
    v: torch.Tensor  # (N, h, T, d)
    probs: torch.Tensor  # (N, h, T, T) attention probabilities
    context: torch.Tensor  # (N, T, h * d) proj input
    residual1: tuple[torch.Tensor, torch.Tensor]  # the two summands of x + attn
    n2: torch.Tensor  # (N, T, D) fc1 input
    hidden: torch.Tensor  # (N, T, hidden) fc2 input
    residual2: tuple[torch.Tensor, torch.Tensor]  # the two summands of x + mlp


def _check_supported(model: DeiTClassifier) -> None:
    for block in model.vit.blocks:
        if block.attn.gate is not None or not hasattr(block.mlp, "fc1"):
            raise ValueError("relevance maps need plain ViT blocks (no gated attention, an fc1/fc2 MLP)")


def _trace_block(block: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, BlockTrace]:
    """The ``forward`` of timm's ``Block`` (eval mode) written out: (N, T, D) -> (N, T, D) and its trace."""
    attn, mlp = block.attn, block.mlp
    n, t, _ = x.shape
    n1 = block.norm1(x)
    qkv = attn.qkv(n1).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (N, h, T, d)
    q, k = attn.q_norm(q) * attn.scale, attn.k_norm(k)
    probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)  # (N, h, T, T)
    context = attn.norm((probs @ v).transpose(1, 2).reshape(n, t, attn.attn_dim))  # (N, T, h * d)
    branch = block.ls1(attn.proj(context))
    x2 = x + branch
    n2 = block.norm2(x2)
    hidden = mlp.norm(mlp.act(mlp.fc1(n2)))
    branch2 = block.ls2(mlp.fc2(hidden))
    trace = BlockTrace(n1, q, k, v, probs, context, (x, branch), n2, hidden, (x2, branch2))
    return x2 + branch2, trace


def trace_forward(model: DeiTClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[BlockTrace]]:
    """The class-token logits of (N, 3, H, W) images with every block's trace (model in eval mode).

    Returns:
        ``(logits, cls_features, traces)``: (N, C) logits, (N, D) the class token the head reads, one
        :class:`BlockTrace` per block.
    """
    vit = model.vit
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(pad_to_multiple(x, model.patch_size)))))
    traces = []
    for block in vit.blocks:
        tokens, trace = _trace_block(block, tokens)
        traces.append(trace)
    cls = (vit.norm(tokens) if model.final_norm else tokens)[:, 0]  # (N, D)
    return model.cls_head(cls), cls, traces


def _block_relprop(block: torch.nn.Module, trace: BlockTrace, relevance: torch.Tensor, first: bool) -> tuple:
    """Relevance of a block's output (N, T, D) -> (its attention probabilities' (N, h, T, T), its input's).

    The input's relevance is not computed (``None``) for the ``first`` block.
    """
    x2, branch2 = trace.residual2
    r_x2, r_mlp = add_relprop(x2, branch2, relevance)
    r_hidden = linear_relprop(trace.hidden, block.mlp.fc2.weight, r_mlp)  # (N, T, hidden); act passes it
    r_x2 = r_x2 + linear_relprop(trace.n2, block.mlp.fc1.weight, r_hidden)  # norm2 passes it; clone adds
    x, branch = trace.residual1
    r_x, r_attn = add_relprop(x, branch, r_x2)
    r_context = linear_relprop(trace.context, block.attn.proj.weight, r_attn)  # (N, T, h * d)
    n, t, _ = r_context.shape
    r_out = r_context.reshape(n, t, block.attn.num_heads, -1).transpose(1, 2)  # (N, h, T, d)
    r_probs, r_v = matmul_relprop(trace.probs, trace.v, r_out)
    if first:
        return r_probs, None
    r_q, r_kt = matmul_relprop(trace.q, trace.k.transpose(-2, -1), r_probs)  # softmax passes it
    r_qkv = torch.stack([r_q, r_kt.transpose(-2, -1), r_v])  # (3, N, h, T, d)
    r_qkv = r_qkv.permute(1, 3, 0, 2, 4).reshape(n, t, -1)  # (N, T, 3 * h * d), qkv's layout
    return r_probs, r_x + linear_relprop(trace.n1, block.attn.qkv.weight, r_qkv)  # norm1 passes it


def lrp_attention_relevance(
    model: DeiTClassifier, cls: torch.Tensor, traces: list[BlockTrace], classes: torch.Tensor, depth: int
) -> list[torch.Tensor]:
    """LRP relevance of the attention probabilities of the last ``depth`` blocks, from ``R = one-hot(class)``.

    Args:
        model: The classifier.
        cls: (N, D) class token read by the head.
        traces: Every block's trace.
        classes: (N,) class index (0-based) of each row.
        depth: How many blocks, from the last, to go back through.

    Returns:
        The (N, h, T, T) relevances of those blocks, in forward order.
    """
    start = F.one_hot(classes, model.cls_head.out_features).to(cls.dtype)  # (N, C)
    r_cls = linear_relprop(cls, model.cls_head.weight, start)  # (N, D); the final norm passes it
    relevance = torch.zeros(*traces[-1].n1.shape, dtype=cls.dtype, device=cls.device)  # (N, T, D)
    relevance[:, 0] = r_cls
    out = []
    blocks = list(model.vit.blocks)
    for index in range(len(blocks) - 1, len(blocks) - 1 - depth, -1):
        first = index == len(blocks) - depth
        r_probs, relevance = _block_relprop(blocks[index], traces[index], relevance, first)
        out.append(r_probs)
    return out[::-1]


def rollout(per_block: list[torch.Tensor]) -> torch.Tensor:
    """Roll out per-block (N, T, T) maps: ``(I + M_B) ... (I + M_1)`` (later blocks multiply from the left).

    This is both Chefer's LRP rollout (``A_b = I + M_b``, product) and the gradient-only update ``R <- R + M_b R``
    from ``R = I``. With one block it is ``I + M``, whose class-token row over the patches is ``M``'s.
    """
    eye = torch.eye(per_block[0].shape[-1], dtype=per_block[0].dtype, device=per_block[0].device)
    joint = eye.expand_as(per_block[0])
    for m in per_block:
        joint = joint + m @ joint
    return joint


def relevance_rows(
    model: DeiTClassifier, x: torch.Tensor, classes: torch.Tensor, kind: str, blocks: str
) -> torch.Tensor:
    """Relevance maps on the token grid for (image, class) rows.

    Args:
        model: The DeiT classifier in eval mode.
        x: (N, 3, H, W) normalised images (row i is explained for ``classes[i]``).
        classes: (N,) 0-based class indices.
        kind: ``full`` (LRP) or ``gradient``.
        blocks: ``last`` or ``all``.

    Returns:
        (N, ceil(H / p), ceil(W / p)) non-negative maps (unnormalised).
    """
    _check_supported(model)
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits, cls, traces = trace_forward(model, x)
        depth = 1 if blocks == "last" else len(traces)
        probs = [trace.probs for trace in traces[-depth:]]
        score = logits.gather(1, classes[:, None]).sum()  # each row's own class logit
        grads = torch.autograd.grad(score, probs)
        with torch.no_grad():
            weights = lrp_attention_relevance(model, cls, traces, classes, depth) if kind == "full" else probs
            per_block = [(g * w).clamp(min=0).mean(dim=1) for g, w in zip(grads, weights, strict=True)]  # (N, T, T)
            joint = rollout(per_block)  # (N, T, T)
    prefix = model.vit.num_prefix_tokens
    hp, wp = (-(-s // model.patch_size) for s in x.shape[-2:])
    grid = joint[:, 0, prefix:].reshape(-1, 1, hp, wp)  # (N, 1, hp, wp)
    return crop_to_input(grid, x.shape[-2:], model.patch_size)[:, 0].detach()


def relevance_for_labels(
    model: DeiTClassifier, x: torch.Tensor, labels: list[list[int]], kind: str, blocks: str, class_batch: int
) -> torch.Tensor:
    """Token-grid relevance of every present class of a batch: (B, 3, H, W) -> (B, C, h, w), 0 for absent ones.

    Args:
        model: The DeiT classifier in eval mode.
        x: (B, 3, H, W) normalised images.
        labels: Per image, the present class ids (1-based, as in the prepared dataset).
        kind: ``full`` or ``gradient``.
        blocks: ``last`` or ``all``.
        class_batch: (image, class) rows per forward/backward pass.
    """
    pairs = [(i, c - 1) for i, present in enumerate(labels) for c in present]
    p = model.patch_size
    out = x.new_zeros(x.shape[0], model.cls_head.out_features, -(-x.shape[-2] // p), -(-x.shape[-1] // p))
    for start in range(0, len(pairs), class_batch):
        chunk = torch.tensor(pairs[start : start + class_batch], device=x.device)  # (n, 2)
        out[chunk[:, 0], chunk[:, 1]] = relevance_rows(model, x[chunk[:, 0]], chunk[:, 1], kind, blocks)
    return out


def multiscale_relevance(
    model: DeiTClassifier,
    images: torch.Tensor,
    labels: list[list[int]],
    scales: tuple[float, ...],
    flip: bool,
    relevance: RelevanceParams,
) -> torch.Tensor:
    """Relevance maps over scales and flips, like :func:`pipeline.cams.multiscale_maps`' CAMs.

    Flipped copies are flipped back and added on the token grid; each scale's grid is upsampled to the image and
    the sum over scales is max-normalised per channel.

    Args:
        model: The DeiT classifier in eval mode.
        images: (B, 3, H, W) normalised images.
        labels: Per image, the present class ids (1-based).
        scales: Input scales.
        flip: Add horizontally flipped copies.
        relevance: The ``cams.relevance`` params (``kind``, ``blocks``, ``class_batch``).

    Returns:
        (B, C, H, W) maps in [0, 1], zero for absent classes.
    """
    h, w = images.shape[-2:]
    total = None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False) if scale != 1 else images
        args = (relevance.kind, relevance.blocks, relevance.class_batch)
        grid = relevance_for_labels(model, x, labels, *args)  # (B, C, h', w')
        if flip:
            grid = grid + relevance_for_labels(model, x.flip(-1), labels, *args).flip(-1)
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)  # (B, C, H, W)
        total = up if total is None else total + up
    return max_norm(total.clamp(min=0))
