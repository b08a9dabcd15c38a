"""``vitlab models``: the presets (paper Table 1) with parameters and GFLOPs per image; ``--pretrained`` lists
the named public checkpoints instead."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vitlab.commands._args import image_size

EXIT_OK = 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="list model presets with parameters and GFLOPs per image")
    p.add_argument("--image-size", type=image_size, default=None, help="input size, N or HxW (default 224)")
    p.add_argument("--num-classes", type=int, default=None, help="classes of the head (default 1000)")
    p.add_argument("--patches", type=int, nargs="+", default=[32, 16, 14], help="patch sizes to list")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.add_argument("--pretrained", action="store_true", help="list the named public checkpoints")
    p.set_defaults(func=run)


def run_pretrained(as_json: bool) -> int:
    from vitlab.hub import cache_path, list_pretrained

    entries = list_pretrained()
    if as_json:
        for e in entries:
            path = cache_path(e.url)
            print(json.dumps({**e.to_dict(), "cached": path.is_file(), "cache_path": str(path)}))
        return EXIT_OK
    print(f"{'name':<28} {'arch':<5} {'size':>4} {'classes':>7} {'top1':>6}  {'licence':<10} cached")
    for e in entries:
        top1 = f"{e.top1:.2f}" if e.top1 is not None else "-"
        cached = "yes" if cache_path(e.url).is_file() else "no"
        print(f"{e.name:<28} {e.arch:<5} {e.image_size:>4} {e.num_classes:>7} {top1:>6}  {e.license:<10} {cached}")
    print("top1: ImageNet-1k top-1 (%) as evaluated by timm; `--json` gives URLs, preprocessing and sources")
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    if args.pretrained:
        ignored = [flag for flag, value in (("--image-size", args.image_size), ("--num-classes", args.num_classes))
                   if value is not None]  # fmt: skip
        if ignored:
            verb = "apply" if len(ignored) > 1 else "applies"
            raise ValueError(f"{' and '.join(ignored)} {verb} to the presets, not to the --pretrained checkpoints")
        return run_pretrained(args.json)
    args.image_size = 224 if args.image_size is None else args.image_size
    args.num_classes = 1000 if args.num_classes is None else args.num_classes
    import torch

    from vitlab.config import SIZES, ViTConfig
    from vitlab.model import ViT, count_parameters, flops_per_image

    rows: list[dict[str, Any]] = []
    for size in SIZES:
        for patch in args.patches:
            config = ViTConfig.from_name(f"{size}/{patch}", image_size=args.image_size, num_classes=args.num_classes)
            with torch.device("meta"):
                params = count_parameters(ViT(config))
            rows.append(
                {
                    "name": f"{size}/{patch}",
                    "layers": config.num_layers,
                    "hidden_dim": config.hidden_dim,
                    "mlp_dim": config.mlp_dim,
                    "heads": config.num_heads,
                    "image_size": list(config.image_size),
                    "tokens": config.num_patches + config.num_prefix_tokens,
                    "params": params,
                    "gflops": round(flops_per_image(config) / 1e9, 2),
                }
            )
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return EXIT_OK
    h, w = rows[0]["image_size"]
    print(
        f"{'model':<7} {'layers':>6} {'width':>6} {'mlp':>6} {'heads':>5} {'tokens':>6} {'params':>13} "
        f"{'GFLOPs':>8}   ({h}x{w}, {args.num_classes} classes)"
    )
    for r in rows:
        print(
            f"{r['name']:<7} {r['layers']:>6} {r['hidden_dim']:>6} {r['mlp_dim']:>6} {r['heads']:>5} "
            f"{r['tokens']:>6} {r['params']:>13,} {r['gflops']:>8.2f}"
        )
    return EXIT_OK
