"""Small-scale reproductions of the paper's ablations on Fashion-MNIST (arXiv:2010.11929).

* ``inductive-bias``: ViT against a ResNet-18 as the training set grows (Section 4.3, Figures 3 and 4: with
  little data the convolutional inductive bias wins, with more data the ViT catches up). Budgets are matched in
  **optimiser steps**: at every data size both models take the same number of steps with the same batch size,
  augmentation, optimiser, schedule and seed.
* ``pos-embed``: no, learned 1-D, learned 2-D, relative and fixed 2-D sin-cos position information (Appendix D.4).
* ``pooling``: class token against global average pooling, each with its own learning-rate sweep (Appendix D.3).
* ``patch-size``: accuracy and compute against the patch size (Section 3.1: tokens grow as 1/P^2).
* ``transfer``: pre-train on five classes, then few-shot linear evaluation (Section 4.1 "Metrics") and
  fine-tuning on the other five, against training from scratch on the same few labels.

Each experiment writes ``results.json`` (one row per setting), its figure(s) and ``report.md`` under one folder;
the ViT runs go through :func:`vitlab.train.train` into ``runs/<setting>/``. ``quick=True`` sizes everything for
about a minute or two on two CPU cores (a smoke test, not a result); the default is sized for under an hour.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.augment import AugmentConfig, BatchAugment
from vitlab.datasets import ImageTensors, load_data, normalize_stats
from vitlab.evaluate import evaluate_tensors
from vitlab.io import atomic_path, atomic_write_json
from vitlab.recipes import TrainConfig
from vitlab.report import write_report
from vitlab.train import build_optimizer, lr_at, train

DATA = "fashion-mnist"


@dataclass(frozen=True)
class Experiment:
    """What one experiment wrote."""

    name: str
    out: Path
    rows: list[dict[str, Any]]
    seconds: float


# ------------------------------------------------------------------------------------------ shared settings
def vit_config(quick: bool, seed: int, **changes: Any) -> TrainConfig:
    """The ViT every experiment starts from: the demo recipe's small model (tiny in quick mode)."""
    if quick:
        arch: dict[str, Any] = dict(hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128)
        base: dict[str, Any] = dict(limit=2000, max_steps=200, batch_size=64, warmup_steps=20, eval_every=100.0)
    else:
        arch = dict(hidden_dim=128, num_layers=6, num_heads=4, mlp_dim=256)
        base = dict(max_steps=1000, batch_size=128, warmup_steps=100)
    c = TrainConfig(
        recipe="experiment",
        model="Ti/7",
        model_overrides=arch,
        data=DATA,
        lr=2e-3,
        weight_decay=0.05,
        label_smoothing=0.1,
        clip_grad=None,
        augment=AugmentConfig(crop="none", hflip=True),
        amp="none",  # fp32 like the ResNet loop, on every CPU: a matched budget
        seed=seed,
        **base,
    )
    return c.replace(**changes)


def run_vit(c: TrainConfig, out: Path, setting: str) -> tuple[Any, Path]:
    """Train one ViT setting into ``out/runs/<setting>``."""
    run_dir = out / "runs" / setting
    return train(c, run_dir, overwrite=True, progress=False), run_dir


def _evaluate_run(run_dir: Path, test: ImageTensors) -> float:
    """Test top-1 of the final model a run saved, on ``test``."""
    from vitlab.checkpoint import from_pretrained

    model = from_pretrained(run_dir).eval()
    pre = model.preprocessing
    return float(evaluate_tensors(model, test.images, test.labels, pre.mean, pre.std)["top1"])


def _common_test(quick: bool, seed: int, full_size: int | None = None) -> ImageTensors:
    """One fixed, class-balanced test set for every setting of an experiment."""
    data = load_data(DATA, seed=seed, limit=500 if quick else full_size)
    assert data.test is not None
    return data.test


# ----------------------------------------------------------------------------------------------- ResNet
def resnet18_grey(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 for 28 x 28 greyscale: a 3x3 stride-1 stem on 1 channel and no max-pool, so the
    last stage still sees a 4 x 4 map (the CIFAR-style adaptation)."""
    from torchvision.models import resnet18

    model = resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def train_resnet(c: TrainConfig, test: ImageTensors) -> dict[str, Any]:
    """A plain loop with what :func:`vitlab.train.train` would use for ``c``: the same data (``limit``, seed,
    validation carve-out), augmentation, optimiser, warm-up and schedule, label smoothing and step count."""
    if c.max_steps is None or c.warmup_steps is None:
        raise ValueError("the ResNet loop needs max_steps and warmup_steps set, to match the ViT budget")
    torch.manual_seed(c.seed)
    data = load_data(c.dataset, val_fraction=c.val_fraction, seed=c.seed, limit=c.limit)
    train_set = data.train
    mean, std = normalize_stats(train_set)
    model = resnet18_grey(len(train_set.class_names))
    device = torch.device("cpu")
    optimizer = build_optimizer(model, c, device)
    augment = BatchAugment(c.augment, mean, std, len(train_set.class_names))
    g = torch.Generator().manual_seed(c.seed)
    batch = min(c.batch_size, len(train_set))
    step, order, pos = 0, torch.randperm(len(train_set), generator=g), 0
    model.train()
    started = time.perf_counter()
    while step < c.max_steps:
        if pos + batch > len(order):
            order, pos = torch.randperm(len(train_set), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        x, target = augment(train_set.images[idx], train_set.labels[idx])
        loss = F.cross_entropy(model(x), target, label_smoothing=c.label_smoothing)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, c.max_steps, c.warmup_steps, c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad)
        optimizer.step()
        step += 1
    seconds = time.perf_counter() - started
    val = evaluate_tensors(model, data.val.images, data.val.labels, mean, std) if len(data.val) else None
    return {
        "steps": step,
        "train_seconds": seconds,
        "val_top1": val["top1"] if val else None,
        "test_top1": float(evaluate_tensors(model, test.images, test.labels, mean, std)["top1"]),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


# ------------------------------------------------------------------------------------------- experiments
def inductive_bias(out: Path, quick: bool, seed: int) -> tuple[list[dict[str, Any]], str]:
    sizes = (1000, 3000) if quick else (1000, 3000, 10_000, 30_000, 60_000)
    steps, batch = (30, 32) if quick else (500, 64)
    test = _common_test(quick, seed, full_size=5000)
    rows = []
    for size in sizes:
        c = vit_config(quick, seed, limit=size, max_steps=steps, batch_size=batch, warmup_steps=max(1, steps // 10))
        result, run_dir = run_vit(c, out, f"vit-{size}")
        rows.append({"model": "ViT", "train_size": size, "steps": result.step, "val_top1": result.best_val_top1,
                     "test_top1": _evaluate_run(run_dir, test), "train_seconds": result.train_seconds})  # fmt: skip
        r = train_resnet(c, test)
        rows.append({"model": "ResNet-18", "train_size": size, **r})
    _plot_lines(
        out / "accuracy_vs_data.png",
        {m: [(r["train_size"], r["test_top1"]) for r in rows if r["model"] == m] for m in ("ViT", "ResNet-18")},
        xlabel="training images (before the 10% validation carve-out)",
        ylabel="test top-1",
        logx=True,
        title=f"matched budget: {steps} steps of {batch} images per size",
    )
    budget = (
        f"Matched budget: at every size both models take {steps} optimiser steps of {batch} images (same "
        "augmentation, AdamW settings, warm-up and cosine schedule, seed). Small sets are seen for many epochs, "
        "large ones for less than one, so the largest sizes mainly show the effect of data diversity, not of more "
        f"compute. Test accuracy on one fixed, class-balanced set of {len(test)} test images."
    )
    return rows, budget


def pos_embed(out: Path, quick: bool, seed: int) -> tuple[list[dict[str, Any]], str]:
    test = _common_test(quick, seed)
    rows = []
    for kind in ("none", "learned", "learned_2d", "relative", "sincos_2d"):
        base = vit_config(quick, seed)
        c = base.replace(model_overrides={**base.model_overrides, "pos_embed": kind})
        result, run_dir = run_vit(c, out, f"pos-{kind}")
        rows.append({"pos_embed": kind, "steps": result.step, "val_top1": result.best_val_top1,
                     "test_top1": _evaluate_run(run_dir, test), "train_seconds": result.train_seconds})  # fmt: skip
    _plot_bars(out / "pos_embed.png", [r["pos_embed"] for r in rows], [r["test_top1"] for r in rows], "test top-1")
    return rows, f"Same model, data, steps and seed for every kind; test on {len(test)} images."


def pooling(out: Path, quick: bool, seed: int) -> tuple[list[dict[str, Any]], str]:
    lrs = (1e-3, 3e-3) if quick else (3e-4, 1e-3, 3e-3)
    test = _common_test(quick, seed)
    rows = []
    for pool in ("token", "gap"):
        for lr in lrs:
            base = vit_config(quick, seed, lr=lr)
            c = base.replace(model_overrides={**base.model_overrides, "pool": pool})
            result, run_dir = run_vit(c, out, f"pool-{pool}-lr{lr:g}")
            rows.append({"pool": pool, "lr": lr, "steps": result.step, "val_top1": result.best_val_top1,
                         "test_top1": _evaluate_run(run_dir, test), "train_seconds": result.train_seconds})  # fmt: skip
    for pool in ("token", "gap"):  # the paper's point: each pooling needs its own learning rate
        mine = [r for r in rows if r["pool"] == pool]
        best = max(mine, key=lambda r: r["val_top1"] if r["val_top1"] is not None else -1.0)
        for r in mine:
            r["best_for_pool"] = r is best
    _plot_lines(
        out / "pooling_lr.png",
        {p: [(r["lr"], r["test_top1"]) for r in rows if r["pool"] == p] for p in ("token", "gap")},
        xlabel="learning rate",
        ylabel="test top-1",
        logx=True,
        title="class token vs global average pooling",
    )
    return rows, (
        f"Learning rates {', '.join(f'{lr:g}' for lr in lrs)} for each pooling; the best per pooling is chosen "
        f"on validation accuracy (`best_for_pool`). Test on {len(test)} images."
    )


def patch_size(out: Path, quick: bool, seed: int) -> tuple[list[dict[str, Any]], str]:
    from vitlab.model import create_model, flops_per_image

    test = _common_test(quick, seed)
    steps = 60 if quick else 500
    rows = []
    for p in (2, 4, 7, 14):
        c = vit_config(quick, seed, model=f"Ti/{p}", max_steps=steps, warmup_steps=max(1, steps // 10))
        result, run_dir = run_vit(c, out, f"patch-{p}")
        model = create_model(c.model, image_size=28, in_channels=1, num_classes=10, **c.model_overrides).eval()
        rows.append({
            "patch_size": p,
            "tokens": (28 // p) ** 2,
            "steps": result.step,
            "val_top1": result.best_val_top1,
            "test_top1": _evaluate_run(run_dir, test),
            "gflops_per_image": flops_per_image(model.config) / 1e9,
            "inference_images_per_s": _throughput(model, batch=64 if quick else 256),
            "train_images_per_s": result.step * c.batch_size / max(result.train_seconds, 1e-9),
        })  # fmt: skip
    _plot_patch(out / "patch_size.png", rows)
    return rows, (
        f"{steps} steps per patch size. FLOPs count matrix products of one forward pass "
        "(vitlab.model.flops_per_image); images/s are measured here, in eval mode, on random input, after a "
        f"warm-up pass. Test on {len(test)} images."
    )


@torch.no_grad()
def _throughput(model: nn.Module, batch: int, repeats: int = 3) -> float:
    x = torch.randn(batch, 1, 28, 28)
    model(x)  # warm-up
    started = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return batch * repeats / (time.perf_counter() - started)


def transfer(out: Path, quick: bool, seed: int) -> tuple[list[dict[str, Any]], str]:
    from vitlab.checkpoint import from_pretrained
    from vitlab.fewshot import extract_features, fewshot_accuracy

    shots_list = (5, 10) if quick else (1, 5, 10, 25)
    val_per_class = 20 if quick else 100
    full = load_data(DATA, val_fraction=0.0, seed=seed)
    assert full.test is not None
    upstream, downstream = list(range(5)), list(range(5, 10))
    g = torch.Generator().manual_seed(seed)
    pool_limit = 400 if quick else None  # per class
    test_limit = 100 if quick else None
    up = _classes(full.train, upstream, g, per_class=pool_limit)
    up_test = _classes(full.test, upstream, g, per_class=test_limit)
    down_pool = _classes(full.train, downstream, g, per_class=pool_limit)
    down_test = _classes(full.test, downstream, g, per_class=test_limit)
    down_val, down_rest = _split_per_class(down_pool, val_per_class, g)
    up_val, up_train = _split_per_class(up, val_per_class, g)

    data_dir = out / "data"
    pre_data = _write_folder(data_dir / "upstream", {"train": up_train, "val": up_val, "test": up_test})
    pre_c = vit_config(quick, seed, data=str(pre_data), limit=None, max_steps=200 if quick else 1500)
    pre_result, pre_dir = run_vit(pre_c, out, "pretrain-upstream")
    rows: list[dict[str, Any]] = [{"method": "pre-train (classes 0-4)", "shots": None, "steps": pre_result.step,
                                   "test_top1": pre_result.test["top1"] if pre_result.test else None}]  # fmt: skip

    model = from_pretrained(pre_dir).eval()
    feats = {k: (extract_features(model, t.images), t.labels) for k, t in
             (("train", down_rest), ("val", down_val), ("test", down_test))}  # fmt: skip
    ft_steps = 60 if quick else 300
    for shots in shots_list:
        fs = fewshot_accuracy(feats["train"], feats["val"], feats["test"], shots, num_classes=5, draws=5, seed=seed)
        rows.append({"method": "few-shot linear (frozen)", "shots": shots, "test_top1": fs.mean,
                     "test_top1_std": fs.std, "draws": len(fs.accuracies)})  # fmt: skip
        few, _ = _split_per_class(down_rest, shots, g)
        folder = _write_folder(data_dir / f"downstream-{shots}shot", {"train": few, "val": down_val, "test": down_test})
        batch = min(32, len(few))
        common = dict(data=str(folder), limit=None, max_steps=ft_steps, batch_size=batch, warmup_steps=ft_steps // 10)
        for method, extra in (("fine-tune", {"init_from": str(pre_dir), "lr": 5e-4}), ("from scratch", {})):
            c = vit_config(quick, seed, **common, **extra)
            if method == "fine-tune":
                c = c.replace(model_overrides={})  # the architecture comes from the checkpoint
            result, _ = run_vit(c, out, f"{method.replace(' ', '-')}-{shots}shot")
            rows.append({"method": method, "shots": shots, "steps": result.step,
                         "test_top1": result.test["top1"] if result.test else None,
                         "train_seconds": result.train_seconds})  # fmt: skip
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r["shots"] is not None and r["test_top1"] is not None:
            series.setdefault(r["method"], []).append((r["shots"], r["test_top1"]))
    _plot_lines(out / "transfer.png", series, xlabel="labelled images per class (classes 5-9)",
                ylabel="test top-1 (5-way)", logx=True, title="transfer from classes 0-4")  # fmt: skip
    return rows, (
        f"Upstream: Fashion-MNIST classes 0-4; downstream: classes 5-9 as a 5-way task. All downstream methods "
        f"share a held-out set of {val_per_class} labelled images per class (the few-shot L2 choice and the runs' "
        f"validation) and {len(down_test)} test images. Few-shot linear: ridge regression on the frozen pre-logits, "
        f"mean over 5 draws of the shots; fine-tune and from scratch: one draw, {ft_steps} steps."
    )


def _classes(data: ImageTensors, keep: Sequence[int], g: torch.Generator, per_class: int | None = None) -> ImageTensors:
    """Images of classes ``keep`` (at most ``per_class`` of each, drawn with ``g``), relabelled 0..len(keep)-1."""
    idx = []
    for k in keep:
        members = (data.labels == k).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        idx.append(members[:per_class] if per_class else members)
    sub = data.subset(torch.cat(idx))
    remap = torch.full((len(data.class_names),), -1, dtype=torch.long)
    remap[list(keep)] = torch.arange(len(keep))
    return ImageTensors(sub.images, remap[sub.labels], [data.class_names[k] for k in keep])


def _split_per_class(data: ImageTensors, n: int, g: torch.Generator) -> tuple[ImageTensors, ImageTensors]:
    """(``n`` random images of each class, the rest)."""
    first, rest = [], []
    for k in range(len(data.class_names)):
        members = (data.labels == k).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        if len(members) <= n:
            raise ValueError(f"class {data.class_names[k]!r} has {len(members)} images, not more than {n}")
        first.append(members[:n])
        rest.append(members[n:])
    return data.subset(torch.cat(first)), data.subset(torch.cat(rest))


def _write_folder(root: Path, splits: dict[str, ImageTensors]) -> Path:
    """Write splits as ``root/<split>/<class>/<i>.png`` greyscale images, the folder layout load_data reads."""
    from PIL import Image

    for split, t in splits.items():
        names = [f"{i}-{name.replace('/', '-')}" for i, name in enumerate(t.class_names)]
        for i, (image, label) in enumerate(zip(t.images, t.labels.tolist(), strict=True)):
            path = root / split / names[label] / f"{i:05d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(path)
    return root


# ----------------------------------------------------------------------------------------------- figures
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight")
    _plt().close(fig)
    return path


def _plot_lines(
    path: Path, series: dict[str, list[tuple[float, float]]], *, xlabel: str, ylabel: str, logx: bool, title: str
) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
    if logx:
        ax.set_xscale("log")
        xs = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _plot_bars(path: Path, labels: list[str], values: list[float], ylabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    ax.bar(labels, values)
    lo = min(values)
    ax.set_ylim(max(0.0, lo - 0.1), min(1.0, max(values) + 0.05))
    ax.set_ylabel(ylabel)
    ax.set_title("position embeddings (Appendix D.4)", fontsize=9)
    return _save(fig, path)


def _plot_patch(path: Path, rows: list[dict[str, Any]]) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    ps = [r["patch_size"] for r in rows]
    a.plot(ps, [r["test_top1"] for r in rows], "o-")
    a.set_xlabel("patch size")
    a.set_ylabel("test top-1")
    b.plot(ps, [r["gflops_per_image"] for r in rows], "o-", label="GFLOPs / image")
    b.set_yscale("log")
    b.set_xlabel("patch size")
    b.set_ylabel("GFLOPs per image")
    b2 = b.twinx()
    b2.plot(ps, [r["inference_images_per_s"] for r in rows], "s--", color="C1", label="images/s")
    b2.set_yscale("log")
    b2.set_ylabel("inference images/s (measured)")
    fig.suptitle("patch size: accuracy and compute", fontsize=9)
    return _save(fig, path)


# ------------------------------------------------------------------------------------------------ driver
EXPERIMENTS: dict[str, Callable[[Path, bool, int], tuple[list[dict[str, Any]], str]]] = {
    "inductive-bias": inductive_bias,
    "pos-embed": pos_embed,
    "pooling": pooling,
    "patch-size": patch_size,
    "transfer": transfer,
}
_TITLES = {
    "inductive-bias": "ViT vs ResNet-18 against training-set size (paper Figures 3/4, small scale)",
    "pos-embed": "Position embeddings (paper Appendix D.4)",
    "pooling": "Class token vs global average pooling (paper Appendix D.3)",
    "patch-size": "Patch size: accuracy and compute",
    "transfer": "Transfer from five classes to the other five",
}


def check_out(out: str | Path) -> Path:
    """Create ``out`` and make sure it is writable; ValueError naming it otherwise."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"--out {path} is not a writable folder: {e.strerror or e}") from None
    return path


def run_experiment(name: str, out: str | Path, *, quick: bool = False, seed: int = 0) -> Experiment:
    """Run experiment ``name`` (one of :data:`EXPERIMENTS`), writing results.json, figures and report.md."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; experiments are {', '.join(EXPERIMENTS)}")
    path = check_out(out)
    started = time.perf_counter()
    rows, notes = EXPERIMENTS[name](path, quick, seed)
    seconds = time.perf_counter() - started
    atomic_write_json(
        path / "results.json",
        {"experiment": name, "quick": quick, "seed": seed, "seconds": round(seconds, 1), "notes": notes, "rows": rows},
    )
    figures = sorted(p.name for p in path.glob("*.png"))
    sections = [
        ("Setup", notes + ("\n\n**Quick mode**: tiny model and data, a smoke test, not a result." if quick else "")),
        ("Results", rows_table(rows)),
        ("Figures", "\n".join(f"![{f}]({f})" for f in figures) or "none"),
        ("Run", f"`vitlab experiment {name}{' --quick' if quick else ''} --seed {seed}`: {seconds:.0f} s."),
    ]
    write_report(path / "report.md", _TITLES[name], sections)
    return Experiment(name=name, out=path, rows=rows, seconds=seconds)


def rows_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table with one column per key (in first-seen order); floats shown to 4 significant digits."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else json.dumps(v) if isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
