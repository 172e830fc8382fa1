"""Swin window attention on the global grid (AReAM S1): index bookkeeping against a brute-force reconstruction."""

from __future__ import annotations

import pytest
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from pipeline.models.window_attention import (
    gather_windows,
    record_window_attention,
    scatter_windows,
    window_index,
    window_pairs,
)


def brute_force_index(grid, window, shift):
    """Slot (p_r, p_c) of window (w_r, w_c) holds token ((w_r M + p_r + s) mod H, (w_c M + p_c + s) mod W)."""
    (h, w), (mh, mw), (sh, sw) = grid, window, shift
    rows = []
    for wr in range(-(-h // mh)):
        for wc in range(-(-w // mw)):
            slots = []
            for pr in range(mh):
                for pc in range(mw):
                    r, c = wr * mh + pr, wc * mw + pc
                    slots.append(-1 if r >= h or c >= w else ((r + sh) % h) * w + (c + sw) % w)
            rows.append(slots)
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("grid", "window", "shift"),
    [((12, 12), (4, 4), (0, 0)), ((12, 12), (4, 4), (2, 2)), ((10, 7), (4, 4), (2, 2)), ((6, 6), (3, 3), (1, 1))],
)
def test_window_index_is_the_brute_force_layout(grid, window, shift):
    index = window_index(grid, window, shift)
    assert torch.equal(index, brute_force_index(grid, window, shift))
    tokens = index[index >= 0]
    assert sorted(tokens.tolist()) == list(range(grid[0] * grid[1])), "each token in exactly one slot"


def block(shift: int, heads: int = 1) -> SwinTransformerBlock:
    torch.manual_seed(0)
    return SwinTransformerBlock(
        dim=8, input_resolution=(12, 12), num_heads=heads, window_size=4, shift_size=shift, dynamic_mask=True
    )


def test_shifted_pairs_are_the_same_region_pairs():
    index, valid = window_pairs(block(2), (12, 12))
    regular_index, regular_valid = window_pairs(block(0), (12, 12))
    assert regular_valid.all(), "regular windows attend every pair"
    assert torch.equal(regular_index, window_index((12, 12), (4, 4), (0, 0)))
    # the last window of the shifted grid wraps both borders: its tokens come from 4 regions of 2 x 2
    corner = index[-1].view(4, 4)
    assert corner[0, 0] == 10 * 12 + 10 and corner[3, 3] == 1 * 12 + 1
    assert valid[-1].sum() == 4 * 4 * 4, "4 regions of 4 tokens: 4 x 16 pairs"
    assert valid[0].all(), "an inner window is one region"


@pytest.mark.parametrize("shift", [0, 2])
def test_recorded_attention_on_the_global_grid_reproduces_the_block(shift):
    """Brute force: with the scattered (N, N) attention, proj(A V) on the global grid is the block's attention."""
    net = block(shift).eval()
    net.attn.fused_attn = True  # as SwinBackbone sets it in eval mode
    x = torch.randn(2, 12, 12, 8)
    with torch.no_grad():
        expected = net._attn(net.norm1(x))  # (B, H, W, C): timm's window attention, rolled back
        with record_window_attention([net]) as records:
            net(x)
    (record,) = records
    assert record.grid == (12, 12) and record.probs.shape == (2, 9, 16, 16)
    dense = record.dense()  # (B, N, N)
    assert torch.allclose(dense.sum(dim=2), torch.ones(2, 144), atol=1e-4), "rows: their window, masked pairs ~0"
    v = net.attn.qkv(net.norm1(x).reshape(2, 144, 8))[..., 16:]  # (B, N, C): the values of the one head
    assert torch.allclose(net.attn.proj(dense @ v).view(2, 12, 12, 8), expected, atol=1e-5)
    assert net.attn.fused_attn, "the fused kernel is back after recording"
    with record_window_attention([net]) as records:
        net(torch.randn(1, 8, 12, 8))  # another map size: the layout follows the block's input
    assert records[0].grid == (8, 12) and records[0].probs.shape == (1, 6, 16, 16)


def test_gather_undoes_scatter_and_fills_the_rest():
    index, valid = window_pairs(block(2), (12, 12))
    values = torch.rand(3, *valid.shape)  # (B, nW, M^2, M^2)
    dense = scatter_windows(values, index, valid, 144)
    assert dense.shape == (3, 144, 144) and int((dense != 0).sum()) == 3 * int(valid.sum())
    back = gather_windows(dense, index, valid, fill=255.0)
    assert torch.equal(back[:, valid], values[:, valid]) and (back[:, ~valid] == 255).all()
