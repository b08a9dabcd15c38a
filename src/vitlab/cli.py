"""The ``vitlab`` command line. Thin: it parses arguments, calls the library and prints.

Exit codes: 0 success, 1 some inputs failed, 2 usage error (bad arguments or bad input files).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _image_size(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW")


def build_parser() -> argparse.ArgumentParser:
    from vitlab import __version__

    parser = _Parser(prog="vitlab", description="The Vision Transformer (Dosovitskiy et al. 2021), as software.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("models", help="list model presets with parameters and GFLOPs per image")
    p.add_argument("--image-size", type=_image_size, default=224, help="input size, N or HxW (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classes of the head (default 1000)")
    p.add_argument("--patches", type=int, nargs="+", default=[32, 16, 14], help="patch sizes to list")
    p.add_argument("--json", action="store_true", help="print one JSON object per line")
    p.set_defaults(func=_cmd_models)
    return parser


def _cmd_models(args: argparse.Namespace) -> int:
    import torch

    from vitlab.config import SIZES, ViTConfig
    from vitlab.model import ViT, count_parameters, flops_per_image

    rows = []
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
    print(f"{'model':<7} {'layers':>6} {'width':>6} {'mlp':>6} {'heads':>5} {'tokens':>6} {'params':>13} "
          f"{'GFLOPs':>8}   ({h}x{w}, {args.num_classes} classes)")
    for r in rows:
        print(f"{r['name']:<7} {r['layers']:>6} {r['hidden_dim']:>6} {r['mlp_dim']:>6} {r['heads']:>5} "
              f"{r['tokens']:>6} {r['params']:>13,} {r['gflops']:>8.2f}")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ValueError as e:  # bad user input reaching the library: a message, not a traceback
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
