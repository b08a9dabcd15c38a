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


def plot_confusion(confusion: Sequence[Sequence[int]], names: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted)."""
    plt = _plt()
    m = torch.tensor(confusion, dtype=torch.float)
    rates = m / m.sum(1, keepdim=True).clamp(min=1)
    k = len(names)
    fig, ax = plt.subplots(figsize=(0.55 * k + 2.5, 0.55 * k + 2))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
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


def plot_rollout(images: Tensor, rollout: Tensor, grid: tuple[int, int], path: str | Path, cols: int = 8) -> Path:
    """Figure 6: each image beside its attention-rollout map (class token to patches) overlaid on it."""
    import torch.nn.functional as F

    plt = _plt()
    n = len(images)
    h, w = images.shape[-2:]
    cls_to_patches = rollout[:, 0, -grid[0] * grid[1] :].reshape(n, 1, *grid)
    heat = F.interpolate(cls_to_patches, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    heat = heat / heat.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    rows = 2 * ((n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        r, c = 2 * (i // cols), i % cols
        img = images[i].permute(1, 2, 0).squeeze(-1).numpy()
        axes[r, c].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r + 1, c].imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r + 1, c].imshow(heat[i].numpy(), cmap="jet", alpha=0.5)
    fig.suptitle("attention rollout (Abnar & Zuidema 2020; paper Figure 6)", fontsize=9)
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
