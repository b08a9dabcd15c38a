"""Position embeddings: the types the paper compares in Appendix D.4, plus fixed 2D sin-cos.

Everything here is a pure function of tensors, so that the model, the checkpoint converters and the
analysis code share one definition. Resampling to a new grid is the paper's Section 3.2: "we perform 2D
interpolation of the pre-trained position embeddings, according to their location in the original image".
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor


def sincos_2d(grid: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2D sin-cos embeddings (as MoCo v3 and big_vision), shape (gh * gw, dim), row-major.

    A quarter of the channels each holds sin(x), cos(x), sin(y), cos(y) at geometric frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos 2D embeddings need dim divisible by 4, got {dim}")
    gh, gw = grid
    y, x = torch.meshgrid(torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij")
    quarter = dim // 4
    omega = torch.arange(quarter, dtype=torch.float32) / max(quarter - 1, 1)
    omega = 1.0 / temperature**omega  # (dim/4,)
    ox = x.flatten()[:, None] * omega[None, :]
    oy = y.flatten()[:, None] * omega[None, :]
    return torch.cat([ox.sin(), ox.cos(), oy.sin(), oy.cos()], dim=1)


def resample_pos_embed(
    pos_embed: Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> Tensor:
    """Resample learned 1D position embeddings (1, prefix + gh * gw, D) to another patch grid, in 2D.

    The class-token slot (the first ``num_prefix_tokens`` rows) is kept as it is. The same grid returns
    the input unchanged.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != expected:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens but grid {old_grid} with {num_prefix_tokens} "
            f"prefix token(s) needs {expected}"
        )
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    dtype = patches.dtype
    grid = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(
        grid,
        size=tuple(new_grid),
        mode=interpolation,
        antialias=antialias and interpolation in ("bilinear", "bicubic"),
        align_corners=False if interpolation != "nearest" else None,
    )
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(dtype)
    return torch.cat([prefix, patches], dim=1)


def resample_axis_embed(table: Tensor, new_length: int) -> Tensor:
    """Resample one axis table (length, D) of 2D learned embeddings to ``new_length`` rows (linear)."""
    if table.shape[0] == new_length:
        return table
    out = F.interpolate(table.float().T[None], size=new_length, mode="linear", align_corners=False)
    return out[0].T.to(table.dtype)


def learned_2d(pos_y: Tensor, pos_x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Paper D.4 "2-D": concat(X-embedding, Y-embedding) for each patch, shape (gh * gw, D), row-major.

    pos_y: (gh0, D/2), pos_x: (gw0, D/2); resampled when the grid differs.
    """
    gh, gw = grid
    y = resample_axis_embed(pos_y, gh)
    x = resample_axis_embed(pos_x, gw)
    half = x.shape[1]
    xs = x[None, :, :].expand(gh, gw, half)
    ys = y[:, None, :].expand(gh, gw, half)
    return torch.cat([xs, ys], dim=-1).reshape(gh * gw, 2 * half)


def relative_index(grid: tuple[int, int], device: torch.device | None = None) -> Tensor:
    """For every (query, key) pair of patches, the flat index of their offset (dy, dx) in a
    (2gh - 1) x (2gw - 1) table. Shape (N, N)."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + gh - 1
    dx = xs[:, None] - xs[None, :] + gw - 1
    return dy * (2 * gw - 1) + dx


def resample_relative_table(table: Tensor, new_grid: tuple[int, int]) -> Tensor:
    """Resample a relative-offset table (heads, 2gh - 1, 2gw - 1) to another grid (bilinear)."""
    size = (2 * new_grid[0] - 1, 2 * new_grid[1] - 1)
    if tuple(table.shape[1:]) == size:
        return table
    out = F.interpolate(table.float()[None], size=size, mode="bilinear", align_corners=True)
    return out[0].to(table.dtype)


def relative_bias(table: Tensor, cls_bias: Tensor | None, grid: tuple[int, int]) -> Tensor:
    """Attention-logit bias (heads, T, T) from a per-head table of relative offsets.

    table: (heads, 2gh0 - 1, 2gw0 - 1), resampled if the grid differs. cls_bias: (heads, 3) learned
    biases for class token -> patch, patch -> class token and class token -> itself (as BEiT), or None
    without a class token.
    """
    heads = table.shape[0]
    table = resample_relative_table(table, grid)
    n = grid[0] * grid[1]
    bias = table.reshape(heads, -1)[:, relative_index(grid, table.device).flatten()].reshape(heads, n, n)
    if cls_bias is None:
        return bias
    t = n + 1
    out = bias.new_empty(heads, t, t)
    out[:, 1:, 1:] = bias
    out[:, 0, 1:] = cls_bias[:, 0:1]
    out[:, 1:, 0] = cls_bias[:, 1:2]
    out[:, 0, 0] = cls_bias[:, 2]
    return out


def grid_from_tokens(
    num_patches: int,
    hint: tuple[int, int] | None = None,
    known: tuple[int, int] | None = None,
    prefer_hint: bool = False,
) -> tuple[int, int]:
    """The (gh, gw) grid a checkpoint's ``num_patches`` position embeddings were trained on.

    ``known``: the grid the checkpoint's own metadata records (its config's image size), used when it fits.
    ``hint``: the grid the caller asks for. Formats that are only ever square (Google ``.npz``, torchvision) take a
    square count as square, so a 4x4 grid asked for at 2x8 is resampled; a bare timm state dict, which may have
    been trained at any size, takes a fitting ``hint`` as its own grid (``prefer_hint``), with a warning when a
    square grid would fit too. A count that is not square can only be settled by ``hint``.
    """
    if known is not None and known[0] * known[1] == num_patches:
        return known
    side = math.isqrt(num_patches)
    square = side * side == num_patches
    if hint is not None and hint[0] * hint[1] == num_patches and (prefer_hint or not square):
        if square and hint != (side, side):
            warnings.warn(
                f"the checkpoint records no image size: its {num_patches} position embeddings are taken as the "
                f"{hint[0]}x{hint[1]} grid asked for, not resampled from {side}x{side}; if they were trained at "
                f"{side}x{side}, load them at that size and save_pretrained the model (a vitlab folder records its "
                "size), then load that at the new one",
                stacklevel=2,
            )
        return hint
    if square:
        return (side, side)
    raise ValueError(
        f"{num_patches} position embeddings do not form a square grid; pass image_size=(height, width) "
        "so that the grid can be known"
    )
