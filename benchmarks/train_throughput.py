"""Training throughput: ``vitlab train`` (the whole pipeline) against a plain eager AdamW loop over timm's model.

The plain loop is what a user writes by hand: timm's ``VisionTransformer`` of the recipe's architecture,
``torch.optim.AdamW``, batches sliced from float tensors already in memory and normalised, no augmentation,
forward + cross-entropy + backward + step. vitlab's number is the steady-state images/s that ``vitlab train``
itself logs per step in ``metrics.jsonl`` (slicing the uint8 data, augmentation, normalisation, step, metrics),
median over the steps after ``--skip`` (warm-up, and torch.compile's compilation with ``--compile``), leaving
out steps that ran a validation pass. Each side is measured in fp32 and under bf16 autocast (vitlab:
``--amp none`` and ``--amp bf16``; ``--amp auto``, the recipes' default, is bf16 on CPUs with AMX). The four
alternate ``--rounds`` times, each measurement in a fresh Python process (no compile caches, allocator state or
threads carried from one measurement to the next); medians over rounds, and medians of the same-round ratios.
Both sides use AdamW: a recipe that names another optimiser (``fashion-mnist``: Muon, whose step costs more) is
measured with AdamW here, so that the ratio compares the training pipelines, not the optimisers.

    python benchmarks/train_throughput.py [--recipe fashion-mnist] [--steps 300] [--rounds 3] [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitlab import malloc
from vitlab.bench import build_model, result_header
from vitlab.config import ViTConfig
from vitlab.io import atomic_write_json
from vitlab.recipes import TrainConfig, get_recipe
from vitlab.train import train


def _architecture(c: TrainConfig) -> ViTConfig:
    """The recipe's model on Fashion-MNIST (28x28 grey, 10 classes), regularisation included: timm's model
    drops the same share of patches (patch dropout) and paths (drop path) in training."""
    return ViTConfig.from_name(c.model, image_size=28, in_channels=1, num_classes=10, **c.model_overrides)


def plain_timm_loop(c: TrainConfig, steps: int, skip: int, bf16: bool) -> float:
    """Median images/s of a hand-written eager loop over timm's model (after ``skip`` warm-up steps), the
    forward and loss under bf16 autocast if ``bf16``."""
    torch.manual_seed(0)
    model = build_model("timm", _architecture(c)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    n = 8192
    x = torch.randn(n, 1, 28, 28)
    y = torch.randint(0, 10, (n,))
    b = c.batch_size
    times = []
    for i in range(skip + steps):
        t0 = time.perf_counter()
        j = (i * b) % (n - b)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x[j : j + b]), y[j : j + b], label_smoothing=c.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return b / statistics.median(times[skip:])


VITLAB_TRAIN_CHANGES = {"eval_every": 1e6, "full_patch_epochs": 0.0}  # besides max_steps = skip + steps


def vitlab_train(c: TrainConfig, steps: int, skip: int, work: Path) -> float:
    """Median of the images/s ``vitlab train`` logs per step, after ``skip`` steps, without validation steps.
    A recipe's closing epochs on every patch (``full_patch_epochs``) are left out: this is its patch-dropout
    phase, the one timm's loop is given too."""
    out = work / "run"
    c = c.replace(**VITLAB_TRAIN_CHANGES, max_steps=skip + steps)
    train(c, out, overwrite=True, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validated = {r["step"] for r in rows if "val_top1" in r}
    ips = [r["images_per_s"] for r in rows if "images_per_s" in r and r["step"] > skip and r["step"] not in validated]
    return statistics.median(ips)


MEASUREMENTS = ("timm_plain_eager_loop", "vitlab_train", "timm_plain_eager_loop_bf16", "vitlab_train_bf16")


def _measure(kind: str, recipe: str, compile_: bool, steps: int, skip: int) -> float:
    """One measurement in this process (what the child process runs)."""
    bf16 = kind.endswith("_bf16")
    c = get_recipe(recipe).replace(compile=compile_, amp="bf16" if bf16 else "none", optimizer="adamw")
    if kind.startswith("timm_plain_eager_loop"):
        return plain_timm_loop(c, steps, skip, bf16)
    with tempfile.TemporaryDirectory(prefix="vitlab-train-throughput-") as tmp:
        return vitlab_train(c, steps, max(skip, 60) if compile_ else skip, Path(tmp))


def _measure_in_child(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """images/s, and whether vitlab's malloc settings were on in that process (vitlab train sets them)."""
    cmd = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps), "--skip", str(args.skip)]
    cmd += ["--child", kind] + (["--compile"] if args.compile else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _median_ratio(results: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(results[a], results[b], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="fashion-mnist", choices=["fashion-mnist", "fashion-mnist-demo"])
    p.add_argument("--steps", type=int, default=300, help="timed steps per round")
    p.add_argument("--skip", type=int, default=30, help="warm-up steps left out of the median")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="vitlab train --compile (compile time is skipped)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/train_throughput.json)")
    p.add_argument("--child", choices=MEASUREMENTS, help=argparse.SUPPRESS)  # one measurement, JSON to stdout
    args = p.parse_args(argv)
    if args.child:
        ips = _measure(args.child, args.recipe, args.compile, args.steps, args.skip)
        print(json.dumps({"images_per_s": ips, "malloc_keeps_freed_memory": malloc.applied()}))
        return 0
    c = get_recipe(args.recipe).replace(compile=args.compile, optimizer="adamw")  # what is measured
    results: dict[str, list[float]] = {k: [] for k in MEASUREMENTS}
    kept_freed: dict[str, list[bool]] = {k: [] for k in MEASUREMENTS}
    for r in range(args.rounds):
        for kind in MEASUREMENTS:
            child = _measure_in_child(kind, args)
            results[kind].append(float(child["images_per_s"]))
            kept_freed[kind].append(bool(child["malloc_keeps_freed_memory"]))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in results.items()), flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratios = {  # medians of the same-round ratios
        "vitlab_train_vs_timm_plain_loop_fp32": _median_ratio(results, "vitlab_train", "timm_plain_eager_loop"),
        "vitlab_train_vs_timm_plain_loop_bf16": _median_ratio(
            results, "vitlab_train_bf16", "timm_plain_eager_loop_bf16"
        ),
        "vitlab_train_bf16_vs_fp32": _median_ratio(results, "vitlab_train_bf16", "vitlab_train"),
    }
    print(f"median images/s: {med}; median same-round ratios: {ratios}")
    out = args.out or f"benchmarks/results/train_throughput{'_compile' if args.compile else ''}.json"
    document: dict[str, Any] = {
        **result_header("benchmarks/train_throughput.py", argv),  # machine's malloc flag: this parent process's
        "recipe": c.to_dict(),
        "vitlab_train_changes": {**VITLAB_TRAIN_CHANGES, "max_steps": "skip + steps"},
        "images_per_s_per_round": results,
        "malloc_keeps_freed_memory_per_round": kept_freed,
        "median_images_per_s": med,
        "median_same_round_ratios": ratios,
    }
    atomic_write_json(out, document)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
