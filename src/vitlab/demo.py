"""``make demo``: train the ``fashion-mnist-demo`` recipe, evaluate it, predict a few test images, look
inside (attention rollout), and write ``runs/demo/report.md`` with the figures.

Run as ``python -m vitlab.demo [--out runs/demo]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vitlab.analysis import attention_rollout, rollout_relevance
from vitlab.checkpoint import from_pretrained
from vitlab.cli import main as cli_main
from vitlab.datasets import load_data
from vitlab.evaluate import accuracy_metrics, normalize, predict_logits
from vitlab.recipes import get_recipe
from vitlab.report import markdown_table, plot_confusion, plot_relevance, plot_samples, write_report
from vitlab.train import train


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_demo(out: Path, recipe: str = "fashion-mnist-demo", progress: bool = True) -> Path:
    config = get_recipe(recipe)
    log(f"[1/4] training the {recipe!r} recipe into {out} ...")
    started = time.perf_counter()
    result = train(config, out, overwrite=True, progress=progress, log=log)
    wall = time.perf_counter() - started

    log("[2/4] evaluating on the Fashion-MNIST test split ...")
    model = from_pretrained(out).eval()
    pre = model.preprocessing
    data = load_data(config.dataset, val_fraction=config.val_fraction, seed=config.seed)
    test = data.test
    assert test is not None
    logits = predict_logits(model, test.images, pre.mean, pre.std)
    m = accuracy_metrics(logits, test.labels)
    names = test.class_names
    plot_confusion(m["confusion"], names, out / "confusion.png")

    log("[3/4] predicting a few test images with `vitlab predict` ...")
    samples = out / "samples"
    samples.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(test), generator=g)[:16]
    for n, i in enumerate(pick.tolist()):
        Image.fromarray(test.images[i, 0].numpy(), mode="L").save(
            samples / f"{n:02d}_{names[test.labels[i]]}.png".replace("/", "-")
        )
    cli_main(["predict", str(out), str(samples), "--top-k", "2"])
    probs = logits[pick].softmax(-1)
    plot_samples(test.images[pick], test.labels[pick], probs, names, out / "samples.png")

    log("[4/4] attention rollout (paper Figure 6) ...")
    with torch.no_grad():
        maps = model.attention_maps(normalize(test.images[pick], pre.mean, pre.std))
    relevance = rollout_relevance(attention_rollout(maps), model.config.num_prefix_tokens)
    plot_relevance(test.images[pick], relevance, model.config.grid_size, out / "attention.png")

    c = model.config
    table = markdown_table(
        [
            ("test top-1", f"{100 * m['top1']:.2f}%"),
            ("test top-5", f"{100 * m['top5']:.2f}%"),
            ("best validation top-1", f"{100 * (result.best_val_top1 or float('nan')):.2f}%"),
            ("test images", f"{m['n']}"),
            ("training time", f"{result.train_seconds:.0f} s, {result.step} steps ({wall:.0f} s with evaluation)"
                              + (f"; time budget {config.time_budget:g} s" if config.time_budget else "")),
            ("model", f"ViT patch {c.patch_size}, width {c.hidden_dim}, depth {c.num_layers}, "
                      f"{c.num_heads} heads, {sum(p.numel() for p in model.parameters()):,} parameters"),
            ("machine", f"{torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()}), "
                        f"torch {torch.__version__}"),
        ]
    )  # fmt: skip
    per_class = "\n".join(f"| {n} | {100 * a:.1f}% |" for n, a in zip(names, m["per_class"], strict=True))
    report = write_report(
        out / "report.md",
        f"vitlab demo: {recipe}",
        [
            ("Result", table),
            ("Learning curves", "![curves](curves.png)"),
            ("Per class", "| class | test top-1 |\n|---|---|\n" + per_class),
            ("Confusion matrix", "![confusion](confusion.png)"),
            ("Sample predictions", "Green: right, red: wrong.\n\n![samples](samples.png)"),
            (
                "Where the model looks",
                "Attention rollout from the class token, as the paper's Figure 6.\n\n![attention](attention.png)",
            ),
            (
                "Reproduce",
                f"```\nvitlab train --recipe {recipe} --out {out}\n"
                f"vitlab evaluate {out} --data fashion-mnist\nvitlab predict {out} {samples}\n```",
            ),
        ],
    )
    log(f"test top-1 {100 * m['top1']:.2f}% after {result.train_seconds:.0f} s of training; report: {report}")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vitlab.demo", description=__doc__)
    p.add_argument("--out", default="runs/demo")
    p.add_argument(
        "--recipe", default="fashion-mnist-demo", choices=["fashion-mnist-demo", "fashion-mnist", "fashion-mnist-2h"]
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    run_demo(Path(args.out), args.recipe, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
