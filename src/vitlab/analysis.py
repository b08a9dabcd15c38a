"""The paper's analyses of what a ViT learns (Section 4.5, Figures 6 and 7, Appendix D.8).

Pure functions over tensors: attention rollout (Abnar & Zuidema 2020, Figure 6), mean attention
distance (Figure 7 right), position-embedding similarity (Figure 7 centre) and principal components of
the patch-embedding filters (Figure 7 left).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def attention_rollout(maps: Sequence[Tensor], residual: float = 0.5) -> Tensor:
    """Abnar & Zuidema (2020), as used for the paper's Figure 6. maps: per layer (B, heads, T, T).

    Heads are averaged, the identity is mixed in for the residual connection
    (``residual * I + (1 - residual) * A``), rows are renormalised, and the layers are multiplied from the
    first to the last. Returns (B, T, T): how much each output token draws on each input token.
    """
    _check_maps(maps, "attention_rollout")
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual must be in [0, 1] (a mixing weight), got {residual}")
    result: Tensor | None = None
    for a in maps:
        a = a.float().mean(dim=1)  # (B, T, T)
        eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
        a = residual * eye + (1 - residual) * a
        a = a / a.sum(dim=-1, keepdim=True)
        result = a if result is None else a @ result
    assert result is not None
    return result


def _check_maps(maps: Sequence[Tensor], who: str) -> None:
    """Per-layer attention maps of one shape, (B, heads, T, T), as ViT.attention_maps returns them."""
    if len(maps) == 0:
        raise ValueError(f"{who} needs at least one layer of attention maps")
    shape = tuple(maps[0].shape)
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"{who} takes maps of shape (batch, heads, T, T) as ViT.attention_maps gives, got {shape}")
    if any(tuple(a.shape) != shape for a in maps):
        raise ValueError(f"{who}: the layers' maps differ in shape: {sorted({tuple(a.shape) for a in maps})}")


def patch_centres(grid: tuple[int, int], patch_size: int) -> Tensor:
    """(N, 2) pixel coordinates (y, x) of the patch centres, row-major."""
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([ys.flatten(), xs.flatten()], dim=1).float() + 0.5) * patch_size


def mean_attention_distance(maps: Sequence[Tensor], grid: tuple[int, int], patch_size: int) -> Tensor:
    """Figure 7 right: for each layer and head, the pixel distance between query and key patch centres,
    weighted by the attention, averaged over queries and images. Class-token rows and columns are left
    out (keys renormalised over patches). Returns (layers, heads)."""
    _check_maps(maps, "mean_attention_distance")
    centres = patch_centres(grid, patch_size)
    dist = torch.cdist(centres, centres)  # (N, N)
    n = dist.shape[0]
    t = maps[0].shape[-1]
    if not n <= t <= n + 1:  # a vitlab ViT has at most one prefix token (the class token)
        raise ValueError(f"the maps have {t} tokens, the grid {grid} has {n} patches (+ at most 1 class token)")
    out = []
    for a in maps:
        a = a.float()[..., -n:, -n:]  # patch-to-patch block
        a = a / a.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        out.append((a * dist.to(a.device)).sum(-1).mean(dim=(0, 2)))  # (heads,)
    return torch.stack(out)


def position_similarity(pos: Tensor) -> Tensor:
    """Figure 7 centre: cosine similarity between every pair of patch position embeddings. pos: (N, D)."""
    normed = F.normalize(pos.float(), dim=-1)
    return normed @ normed.T


def filter_components(weight: Tensor, k: int = 28) -> tuple[Tensor, Tensor]:
    """Figure 7 left: the top ``k`` principal components of the patch-embedding filters.

    weight: (D, C, P, P). Returns components (k, C, P, P) and their explained-variance fractions (k,)."""
    if k < 1:
        raise ValueError(f"k must be >= 1 components, got {k}")
    d, c, p, _ = weight.shape
    flat = weight.float().reshape(d, -1)
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, s, vh = torch.linalg.svd(flat, full_matrices=False)
    k = min(k, vh.shape[0])
    var = s.square()
    return vh[:k].reshape(k, c, p, p), (var[:k] / var.sum())


def rollout_relevance(rollout: Tensor, num_prefix_tokens: int) -> Tensor:
    """How much the image representation draws on each patch, from a rollout (B, T, T): the class-token
    row with a class token, else the mean of the patch rows (global average pooling, Appendix D.3);
    restricted to the patch columns and renormalised. Returns (B, N), rows summing to 1."""
    rows = rollout[:, 0, num_prefix_tokens:] if num_prefix_tokens else rollout.mean(dim=1)
    return rows / rows.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def centre_patches(grid: tuple[int, int]) -> Tensor:
    """(N,) bool, row-major: the patches whose centres lie in the middle half of the image along both axes."""
    ys = (torch.arange(grid[0]) + 0.5) / grid[0]
    xs = (torch.arange(grid[1]) + 0.5) / grid[1]
    iny = (ys >= 0.25) & (ys <= 0.75)
    inx = (xs >= 0.25) & (xs <= 0.75)
    return (iny[:, None] & inx[None, :]).flatten()


def rollout_statistics(relevance: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Per image: the entropy (nats) of a relevance distribution over patches (B, N), and its share on
    the :func:`centre_patches`. A uniform map has entropy log N and centre share (centre patches) / N."""
    p = relevance.float().clamp_min(0)
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1)
    centre = p[:, centre_patches(grid).to(p.device)].sum(dim=-1)
    return entropy, centre
