"""Is the data pipeline ever the bottleneck? Time batch augmentation against the training step it feeds.

For each recipe: median seconds per batch of (a) slicing the in-memory tensors + augmentation + normalisation
and (b) the model's forward + backward + optimiser step, on the same batch size, in one process.

    python benchmarks/data_pipeline.py [--recipes fashion-mnist-demo fashion-mnist deit] [--repeats 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from vitlab.augment import BatchAugment
from vitlab.bench import result_header
from vitlab.config import ViTConfig
from vitlab.datasets import load_data
from vitlab.io import atomic_write_json
from vitlab.model import create_model
from vitlab.recipes import get_recipe
from vitlab.train import build_optimizer


def measure(recipe: str, repeats: int) -> dict[str, Any]:
    c = get_recipe(recipe)
    data = load_data("fashion-mnist", val_fraction=0.0).train
    _, ch, h, w = data.images.shape
    overrides = dict(c.model_overrides)
    if h % ViTConfig.from_name(c.model).patch_size:
        overrides["patch_size"] = 7  # e.g. deit's S/16 on 28x28 images: same width and depth, 7x7 patches
    model = create_model(c.model, image_size=(h, w), in_channels=ch, num_classes=10, **overrides)
    opt = build_optimizer(model, c, torch.device("cpu"))
    aug = BatchAugment(c.augment, (0.286,), (0.353,), 10)
    g = torch.Generator().manual_seed(0)
    data_t, step_t = [], []
    for _ in range(repeats + 2):
        t0 = time.perf_counter()
        idx = torch.randint(0, len(data), (c.batch_size,), generator=g)
        x, y = aug(data.images[idx], data.labels[idx])
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=c.label_smoothing)
        opt.zero_grad()
        loss.backward()
        opt.step()
        t2 = time.perf_counter()
        data_t.append(t1 - t0)
        step_t.append(t2 - t1)
    d, s = statistics.median(data_t[2:]), statistics.median(step_t[2:])
    return {"recipe": recipe, "model": c.model, "model_overrides": overrides, "batch": c.batch_size,
            "augment": dataclasses.asdict(c.augment), "data_s": d, "step_s": s, "data_share": d / (d + s)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipes", nargs="+", default=["fashion-mnist-demo", "fashion-mnist", "deit"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results/data_pipeline.json")
    args = p.parse_args()
    rows = [measure(r, args.repeats) for r in args.recipes]
    for r in rows:
        print(f"{r['recipe']:<20} batch {r['batch']:>4}  data {1000 * r['data_s']:7.1f} ms  "
              f"step {1000 * r['step_s']:7.1f} ms  data share {100 * r['data_share']:.1f}%")  # fmt: skip
    atomic_write_json(args.out, {**result_header("benchmarks/data_pipeline.py"), "rows": rows})


if __name__ == "__main__":
    main()
