"""Known answers for the paper's analyses (Figures 6 and 7) and the ``analyze`` library call."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from vitlab import ViTConfig, create_model
from vitlab.analysis import (
    attention_rollout,
    centre_patches,
    filter_components,
    mean_attention_distance,
    position_similarity,
    rollout_relevance,
    rollout_statistics,
)
from vitlab.analyze import analyze, attention_statistics, auto_batch_size, patch_position_embeddings, to_json


def _mean_pairwise_distance(grid: tuple[int, int], patch_size: int) -> float:
    """Mean Euclidean distance between patch centres over all ordered pairs (self-pairs included), by loops."""
    cells = [((i + 0.5) * patch_size, (j + 0.5) * patch_size) for i in range(grid[0]) for j in range(grid[1])]
    total = sum(math.dist(a, b) for a, b in itertools.product(cells, cells))
    return total / len(cells) ** 2


def _maps(a: torch.Tensor, layers: int, batch: int = 2, heads: int = 3) -> list[torch.Tensor]:
    return [a.expand(batch, heads, *a.shape).clone() for _ in range(layers)]


# ------------------------------------------------------------------------------------ attention distance
def test_identity_attention_has_zero_distance_and_identity_rollout() -> None:
    grid, t = (3, 4), 13  # class token + 12 patches
    maps = _maps(torch.eye(t), layers=3)
    torch.testing.assert_close(mean_attention_distance(maps, grid, 8), torch.zeros(3, 3))
    torch.testing.assert_close(attention_rollout(maps), torch.eye(t).expand(2, t, t))


@pytest.mark.parametrize(("grid", "patch"), [((4, 4), 8), ((3, 5), 16)])
def test_uniform_attention_gives_the_mean_pairwise_distance(grid: tuple[int, int], patch: int) -> None:
    n = grid[0] * grid[1]
    maps = _maps(torch.full((n + 1, n + 1), 1.0 / (n + 1)), layers=2)  # class token included, left out by MAD
    expected = _mean_pairwise_distance(grid, patch)
    torch.testing.assert_close(mean_attention_distance(maps, grid, patch), torch.full((2, 3), expected))


def test_mean_attention_distance_separates_heads_and_layers() -> None:
    grid, n = (2, 2), 4
    # head 0 attends to itself (0 px); head 1 to the horizontal neighbour (one patch = 10 px away)
    swap = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float)
    layer = torch.stack([torch.eye(n), swap])[None]  # (1, 2, 4, 4), no class token
    d = mean_attention_distance([layer, layer.flip(1)], grid, 10)
    torch.testing.assert_close(d, torch.tensor([[0.0, 10.0], [10.0, 0.0]]))


# ------------------------------------------------------------------------------------------ rollout
def test_rollout_of_one_layer_is_the_residual_mixed_renormalised_head_mean() -> None:
    a = torch.rand(2, 3, 5, 5).softmax(-1)
    for residual in (0.0, 0.5, 0.9):
        mixed = residual * torch.eye(5) + (1 - residual) * a.mean(1)
        expected = mixed / mixed.sum(-1, keepdim=True)
        torch.testing.assert_close(attention_rollout([a], residual=residual), expected)


def test_rollout_multiplies_layers_first_to_last_and_rows_sum_to_one() -> None:
    a, b = torch.rand(1, 2, 4, 4).softmax(-1), torch.rand(1, 2, 4, 4).softmax(-1)
    one = attention_rollout([a])
    two = attention_rollout([b])
    torch.testing.assert_close(attention_rollout([a, b]), two @ one)
    torch.testing.assert_close(attention_rollout([a, b]).sum(-1), torch.ones(1, 4))


def test_rollout_relevance_and_statistics() -> None:
    grid = (4, 4)
    uniform = torch.full((1, 17, 17), 1 / 17)
    rel = rollout_relevance(uniform, num_prefix_tokens=1)
    torch.testing.assert_close(rel, torch.full((1, 16), 1 / 16))
    entropy, centre = rollout_statistics(rel, grid)
    torch.testing.assert_close(entropy, torch.tensor([math.log(16)]))
    torch.testing.assert_close(centre, torch.tensor([4 / 16]))  # the middle 2 x 2 of a 4 x 4 grid
    assert centre_patches(grid).reshape(4, 4)[1:3, 1:3].all() and centre_patches(grid).sum() == 4
    peaked = torch.zeros(1, 16)
    peaked[0, 5] = 1.0  # row 1, column 1: a centre patch
    entropy, centre = rollout_statistics(peaked, grid)
    assert entropy.item() == pytest.approx(0.0, abs=1e-6) and centre.item() == 1.0
    gap = torch.eye(16)[None]  # no class token: the mean of the patch rows
    torch.testing.assert_close(rollout_relevance(gap, num_prefix_tokens=0), torch.full((1, 16), 1 / 16))


# -------------------------------------------------------------------------------- filters, positions
def test_filter_components_are_orthonormal_and_explain_at_most_everything() -> None:
    weight = torch.randn(64, 3, 4, 4)
    comps, explained = filter_components(weight, k=20)
    assert comps.shape == (20, 3, 4, 4) and explained.shape == (20,)
    flat = comps.reshape(20, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(20), atol=1e-5, rtol=0)
    assert float(explained.sum()) <= 1.0 + 1e-6
    assert bool((explained[:-1] >= explained[1:]).all())
    _, everything = filter_components(weight, k=1000)  # k is capped at the rank bound min(D, C*P*P)
    assert len(everything) == 48 and float(everything.sum()) == pytest.approx(1.0, abs=1e-5)


def test_position_similarity_has_unit_diagonal_and_is_symmetric() -> None:
    sim = position_similarity(torch.randn(12, 32))
    torch.testing.assert_close(sim.diagonal(), torch.ones(12))
    torch.testing.assert_close(sim, sim.T)
    assert float(sim.abs().max()) <= 1.0 + 1e-6


@pytest.mark.parametrize("kind", ["learned", "learned_2d", "sincos_2d", "none", "relative"])
def test_patch_position_embeddings_leave_out_the_class_slot(kind: str, tiny: ViTConfig) -> None:
    model = create_model(tiny.replace(pos_embed=kind))
    pos = patch_position_embeddings(model, tiny.grid_size)
    if kind in ("none", "relative"):
        assert pos is None
        return
    assert pos is not None and pos.shape == (tiny.num_patches, tiny.hidden_dim)
    if kind == "learned":
        assert model.pos_embed is not None
        torch.testing.assert_close(pos, model.pos_embed[0, 1:].detach())


# ------------------------------------------------------------------------------------- analyze()
def test_attention_statistics_do_not_depend_on_the_batch_size(tiny: ViTConfig) -> None:
    model = create_model(tiny)
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    one = attention_statistics(model, images, batch_size=5)
    two = attention_statistics(model, images, batch_size=2)
    torch.testing.assert_close(one["distance"], two["distance"])
    torch.testing.assert_close(one["relevance"], two["relevance"])
    assert one["distance"].shape == (tiny.num_layers, tiny.num_heads) and one["relevance"].shape == (5, 16)
    with torch.device("meta"):
        base = create_model("B/16")
    assert auto_batch_size(base, (14, 14)) == 12  # 21.3 MiB of maps per image in 256 MiB


@pytest.mark.parametrize("pool", ["token", "gap"])
def test_analyze_writes_figures_and_numbers(tiny: ViTConfig, tmp_path: Path, pool: str) -> None:
    model = create_model(tiny.replace(pool=pool, pos_embed="learned_2d"))
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    result = analyze(model, images, tmp_path / "out", num_samples=4)
    saved = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert saved["mean_attention_distance"] == result["mean_attention_distance"]
    assert len(saved["mean_attention_distance"]) == 2 and all(len(r) == 4 for r in saved["mean_attention_distance"])
    assert len(saved["position_similarity"]["matrix"]) == 16
    for name in saved["figures"].values():
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    assert "![position similarity](position_similarity.png)" in (tmp_path / "out" / "report.md").read_text()


def test_analyze_says_why_there_is_no_position_figure(tiny: ViTConfig, tmp_path: Path) -> None:
    model = create_model(tiny.replace(pos_embed="relative"))
    result = analyze(model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8), tmp_path)
    assert "relative" in result["position_similarity"]["note"] and "matrix" not in result["position_similarity"]
    assert "position_similarity" not in result["figures"] and not (tmp_path / "position_similarity.png").exists()
    assert "No figure" in (tmp_path / "report.md").read_text()


def test_analyze_rejects_bad_images_before_writing(tiny: ViTConfig, tmp_path: Path) -> None:
    model = create_model(tiny)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="uint8"):
        analyze(model, torch.rand(2, 3, 32, 32), out)
    with pytest.raises(ValueError, match="channel"):
        analyze(model, torch.zeros(2, 1, 32, 32, dtype=torch.uint8), out)
    with pytest.raises(ValueError, match="no images"):
        analyze(model, torch.zeros(0, 3, 32, 32, dtype=torch.uint8), out)
    assert not out.exists()


def test_to_json_keeps_number_rows_on_one_line() -> None:
    obj = {"m": [[1.0, 2.0], [3.0, 4.0]], "s": "\u0000row0\u0000", "e": [], "n": None}
    text = to_json(obj)
    assert json.loads(text) == obj and "[1.0, 2.0]" in text
