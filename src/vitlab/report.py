"""Figures and the Markdown report a person looks at after a run (``make demo``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab.io import atomic_path, atomic_write_text


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    plt = _plt()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


_CONFUSION_MAX_INCHES = 16.0
_CONFUSION_MAX_LABELS = 40


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    m = torch.tensor(confusion, dtype=torch.float)
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    side = min(0.55 * k, _CONFUSION_MAX_INCHES)  # 1000 ImageNet classes: a readable picture, not 60k pixels a side
    fig, ax = plt.subplots(figsize=(side + 2.5, side + 2))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    labelled = k <= _CONFUSION_MAX_LABELS  # else class indices only: the names would overlap
    if labelled:
        ax.set_xticks(range(k), names, rotation=45, ha="right")
        ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted" if labelled else "predicted (class index)")
    ax.set_ylabel("true" if labelled else "true (class index)")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                v = rates[i, j].item()
                if v >= 0.005:
                    ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7,
                            color="white" if v > 0.5 else "black")  # fmt: skip
    ax.set_title("confusion matrix (% of each true class)")
    return _save(fig, Path(path))


def plot_samples(
    images: Tensor, labels: Tensor, probs: Tensor, names: Sequence[str], path: str | Path, cols: int = 8
) -> Path:
    """A grid of images with the predicted class, its probability and the true class."""
    plt = _plt()
    n = len(images)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        img = images[i].permute(1, 2, 0).squeeze(-1).numpy()
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        p, k = probs[i].max(0)
        ok = int(k) == int(labels[i])
        ax.set_title(f"{names[int(k)]} {p:.2f}\n(true: {names[int(labels[i])]})", fontsize=7,
                     color="green" if ok else "red")  # fmt: skip
    return _save(fig, Path(path))


def markdown_table(rows: Sequence[tuple[str, str]]) -> str:
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    text = f"# {title}\n\n" + "\n".join(f"## {h}\n\n{body}\n" for h, body in sections)
    return atomic_write_text(path, text)


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _mosaic(tiles: Tensor, rows: int, cols: int, pad: int = 1, fill: float = float("nan")) -> Tensor:
    """(n, h, w, c) tiles -> one (rows * (h + pad) - pad, cols * (w + pad) - pad, c) image, row-major.

    One ``imshow`` of a mosaic is much faster than a subplot per tile (196 subplots for a 14 x 14 grid)."""
    n, h, w, c = tiles.shape
    out = torch.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), fill, dtype=torch.float)
    for i in range(n):
        r, q = divmod(i, cols)
        out[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = tiles[i].float()
    return out


def plot_filter_components(
    components: Tensor, explained: Tensor, path: str | Path, cols: int = 7, title: str | None = None
) -> Path:
    """Figure 7 left: principal components of the patch-embedding filters, one P x P tile each.

    components: (k, C, P, P), each tile scaled to [0, 1] on its own (the sign of a component is arbitrary);
    explained: (k,) fractions of the variance, shown in the title."""
    plt = _plt()
    k, c, p, _ = components.shape
    flat = components.float().reshape(k, -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    scaled = (flat - lo[:, None]) / (hi - lo).clamp_min(1e-12)[:, None]
    tiles = scaled.reshape(k, c, p, p).permute(0, 2, 3, 1)  # (k, P, P, C)
    cols = max(1, min(cols, k))
    rows = (k + cols - 1) // cols
    mosaic = _mosaic(tiles, rows, cols, pad=max(1, p // 8), fill=1.0)
    fig, ax = plt.subplots(figsize=(min(1.0 * cols, 10) + 0.5, min(1.0 * rows, 10) + 0.8))
    ax.imshow(mosaic[..., 0].numpy() if c == 1 else mosaic.clamp(0, 1).numpy(), cmap="gray" if c == 1 else None,
              interpolation="nearest")  # fmt: skip
    ax.axis("off")
    total = float(explained.sum()) if len(explained) else 0.0
    kind = "RGB embedding filters" if c == 3 else "embedding filters"
    ax.set_title(title or f"{kind}: top {k} principal components ({100 * total:.0f}% of the variance)", fontsize=9)
    return _save(fig, Path(path))


def plot_position_similarity(similarity: Tensor, grid: tuple[int, int], path: str | Path, title: str = "") -> Path:
    """Figure 7 centre: for each patch position (laid out on the patch grid), the cosine similarity of its
    position embedding with those of all positions, as a small gh x gw map. similarity: (N, N)."""
    plt = _plt()
    gh, gw = grid
    tiles = similarity.float().reshape(gh * gw, gh, gw, 1)
    mosaic = _mosaic(tiles, gh, gw, pad=1)[..., 0]
    size = min(9.0, max(3.0, 0.45 * max(gh, gw)))
    fig, ax = plt.subplots(figsize=(size * gw / max(gh, gw) + 1.2, size * gh / max(gh, gw) + 0.6))
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([(gw + 1) * j + (gw - 1) / 2 for j in range(gw)], [str(j + 1) for j in range(gw)], fontsize=6)
    ax.set_yticks([(gh + 1) * i + (gh - 1) / 2 for i in range(gh)], [str(i + 1) for i in range(gh)], fontsize=6)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    ax.set_title(title or "position embedding similarity", fontsize=9)
    return _save(fig, Path(path))


def plot_attention_distance(distance: Tensor, path: str | Path, image_size: int | None = None, title: str = "") -> Path:
    """Figure 7 right: mean attention distance in pixels against depth, one dot per head. distance: (L, heads)."""
    plt = _plt()
    layers, heads = distance.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    cmap = plt.get_cmap("tab20" if heads > 10 else "tab10")
    for h in range(heads):
        ax.scatter(range(1, layers + 1), distance[:, h].numpy(), s=14, color=cmap(h % cmap.N),
                   label=f"head {h + 1}")  # fmt: skip
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(1, layers + 1) if layers <= 16 else range(1, layers + 1, max(1, layers // 8)))
    top = float(image_size) if image_size else float(distance.max()) * 1.1 + 1e-6
    ax.set_ylim(0, top)
    ax.grid(alpha=0.3)
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right", frameon=False)
    ax.set_title(title or "mean attention distance per head", fontsize=9)
    return _save(fig, Path(path))


def plot_relevance(
    images: Tensor, relevance: Tensor, grid: tuple[int, int], path: str | Path, cols: int = 8, title: str = ""
) -> Path:
    """Figure 6 from a per-patch relevance (B, N) such as the class-token row of an attention rollout:
    each image above its map, upsampled and overlaid. The colour scale runs from 0 to each map's maximum, so
    a flat map looks flat (a min-max stretch would turn its noise into structure)."""
    import torch.nn.functional as F

    plt = _plt()
    n = len(images)
    h, w = images.shape[-2:]
    heat = F.interpolate(relevance.float().reshape(n, 1, *grid), size=(h, w), mode="bilinear", align_corners=False)
    heat = heat[:, 0] / heat.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    cols = max(1, min(cols, n))
    rows = 2 * ((n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        img = images[i].permute(1, 2, 0).squeeze(-1).numpy()
        cmap = "gray" if img.ndim == 2 else None
        axes[r, c].imshow(img, cmap=cmap)
        axes[r + 1, c].imshow(img, cmap=cmap)
        axes[r + 1, c].imshow(heat[i].numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    fig.suptitle(title or "attention rollout (Abnar & Zuidema 2020; paper Figure 6)", fontsize=9)
    return _save(fig, Path(path))
