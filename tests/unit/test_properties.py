"""Property-based checks (hypothesis) of the pure pieces: config validation and position resampling."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vitlab import ViTConfig
from vitlab import pos_embed as pe

sides = st.integers(min_value=1, max_value=64)


@given(h=sides, w=sides, p=st.integers(min_value=1, max_value=16))
def test_config_accepts_exactly_the_multiples_of_the_patch_size(h: int, w: int, p: int) -> None:
    ok = h % p == 0 and w % p == 0
    try:
        c = ViTConfig(image_size=(h, w), patch_size=p, hidden_dim=8, num_heads=2, mlp_dim=8)
    except ValueError as e:
        assert not ok and "not a multiple of patch_size" in str(e)
    else:
        assert ok and c.num_patches == (h // p) * (w // p)


@settings(deadline=None, max_examples=40)
@given(
    old=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    new=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    prefix=st.integers(0, 1),
)
def test_resampling_keeps_the_class_slot_and_gives_the_new_grid(
    old: tuple[int, int], new: tuple[int, int], prefix: int
) -> None:
    pos = torch.randn(1, prefix + old[0] * old[1], 8)
    out = pe.resample_pos_embed(pos, old, new, prefix)
    assert out.shape == (1, prefix + new[0] * new[1], 8)
    torch.testing.assert_close(out[:, :prefix], pos[:, :prefix])
    if old == new:
        assert out is pos


@settings(deadline=None, max_examples=30)
@given(grid=st.tuples(st.integers(1, 6), st.integers(1, 6)), value=st.floats(-3, 3))
def test_a_constant_embedding_resamples_to_the_same_constant(grid: tuple[int, int], value: float) -> None:
    pos = torch.full((1, 1 + grid[0] * grid[1], 4), value)
    out = pe.resample_pos_embed(pos, grid, (grid[0] + 2, grid[1] + 3), 1, interpolation="bilinear")
    torch.testing.assert_close(out, torch.full_like(out, value), atol=1e-5, rtol=1e-5)


@settings(deadline=None, max_examples=30)
@given(grid=st.tuples(st.integers(1, 5), st.integers(1, 5)))
def test_relative_bias_depends_only_on_the_offset(grid: tuple[int, int]) -> None:
    heads = 2
    table = torch.randn(heads, 2 * grid[0] - 1, 2 * grid[1] - 1)
    bias = pe.relative_bias(table, None, grid)
    n = grid[0] * grid[1]
    for q in range(n):
        for k in range(n):
            dy = q // grid[1] - k // grid[1]
            dx = q % grid[1] - k % grid[1]
            torch.testing.assert_close(bias[:, q, k], table[:, dy + grid[0] - 1, dx + grid[1] - 1])
