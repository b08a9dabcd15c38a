"""``vitlab analyze``: the paper's Figures 6 and 7 (attention rollout, embedding filters, position embedding
similarity, mean attention distance) for any checkpoint, with the numbers in ``analysis.json``."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from vitlab.commands._args import require_positive


def add_parser(sub: Any) -> None:
    p = sub.add_parser("analyze", help="attention rollout, filters, position embeddings, attention distance")
    p.add_argument("source", help="a checkpoint: vitlab run folder, file, registry name or URL")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="fashion-mnist, mnist, cifar10, cifar100 or an image folder")
    src.add_argument("--images", nargs="+", metavar="FILE", help="image files, folders or glob patterns")
    p.add_argument("--out", required=True, help="folder for the figures, report.md and analysis.json")
    p.add_argument("--split", choices=["test", "train"], default="test", help="with --data (default test)")
    p.add_argument("--num-images", type=int, default=128, help="images to average over (default 128)")
    p.add_argument("--num-samples", type=int, default=16, help="images shown in the rollout figure (default 16)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: as many as keep 256 MB of attention maps)")  # fmt: skip
    p.add_argument("--num-heads", type=int, default=None, help="head count, for bare state dicts")
    p.set_defaults(func=run)


def load_images(args: argparse.Namespace, model: Any) -> Any:
    """uint8 (B, C, H, W) images at the model's size and channels, from --data or --images."""
    import torch

    from vitlab.preprocess import ImageReadError, expand_inputs, load_for_model

    c = model.config
    if args.data is not None:
        from vitlab.datasets import load_data

        data = load_data(
            args.data, val_fraction=0.0, image_size=c.image_size, channels=c.in_channels, limit=args.num_images
        )
        split = data.test if args.split == "test" else data.train
        if split is None or len(split) == 0:
            raise ValueError(f"{args.data} has no {args.split} split; try --split train")
        return split.images[: args.num_images]
    paths = expand_inputs(args.images)[: args.num_images]
    if not paths:
        raise ValueError("--images matched no image files")
    tensors = []
    for path in paths:
        try:
            tensors.append(load_for_model(path, model.preprocessing, c.in_channels))
        except ImageReadError as e:
            raise ValueError(f"{path}: {e}") from None
    return torch.stack(tensors)


def run(args: argparse.Namespace) -> int:
    from vitlab.analyze import analyze
    from vitlab.checkpoint import from_pretrained

    require_positive(args, "num_images", "num_samples", "batch_size")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} exists and is not a folder")
    started = time.perf_counter()
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = from_pretrained(args.source, **overrides).eval()
    images = load_images(args, model)
    loaded = time.perf_counter() - started
    if len(images) < args.num_images:
        print(f"note: only {len(images)} images available (asked for {args.num_images})", file=sys.stderr)
    result = analyze(
        model, images, out, batch_size=args.batch_size, num_samples=args.num_samples, source=str(args.source)
    )
    dist = result["mean_attention_distance_by_layer"]
    ro = result["rollout"]
    t = result["timings_s"]
    print(f"analysed {result['num_images']} images in {t['attention']:.1f} s (+{loaded:.1f} s loading, "
          f"{t['figures']:.1f} s figures)")  # fmt: skip
    print(f"mean attention distance by layer (px): {' '.join(f'{d:.1f}' for d in dist)}")
    print(f"rollout entropy {ro['mean_entropy']:.3f} nats (uniform {ro['uniform_entropy']:.3f}), "
          f"centre share {ro['centre_share']:.3f} (uniform {ro['centre_share_uniform']:.3f})")  # fmt: skip
    if "note" in result["position_similarity"]:
        print(f"position similarity: {result['position_similarity']['note']}")
    print(f"report: {out / 'report.md'}")
    return 0
