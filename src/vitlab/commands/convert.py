"""``vitlab convert``: any supported checkpoint to a vitlab, timm or HF transformers directory."""

from __future__ import annotations

import argparse
from typing import Any

from vitlab.commands._args import image_size

EXIT_OK = 0
TARGETS = ("vitlab", "timm", "hf")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (Google .npz, big_vision, HF, torchvision, timm, vitlab, registry name or URL)",
        description="Read SRC in any format vitlab knows and write it to DIR as vitlab (default), timm or HF.",
    )
    p.add_argument("source", metavar="SRC", help="checkpoint file or directory, registry name, or http(s) URL")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--to", choices=TARGETS, default="vitlab", help="output layout (default vitlab)")
    p.add_argument("--image-size", type=image_size, help="resample position embeddings to N or HxW")
    p.add_argument("--num-classes", type=int, help="replace the head by a zero-initialised one with K classes")
    p.add_argument("--num-heads", type=int, help="attention heads (needed for timm/torchvision state dicts)")
    p.add_argument(
        "--drop-pre-logits", action="store_true", help="drop the tanh pre-logits layer (timm and HF have none)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.checkpoint import from_pretrained, save_hf, save_model, save_timm

    overrides: dict[str, Any] = {}
    if args.image_size is not None:
        overrides["image_size"] = args.image_size
    if args.num_classes is not None:
        overrides["num_classes"] = args.num_classes
    if args.num_heads is not None:
        overrides["num_heads"] = args.num_heads
    if args.drop_pre_logits:
        overrides["representation_size"] = None
    model = from_pretrained(args.source, **overrides)
    save = {"vitlab": save_model, "timm": save_timm, "hf": save_hf}[args.to]
    out = save(model, args.out)
    c = model.config
    print(
        f"wrote {args.to} checkpoint to {out}: {c.num_layers} layers, width {c.hidden_dim}, {c.num_heads} heads, "
        f"patch {c.patch_size}, {c.image_size[0]}x{c.image_size[1]}, {c.num_classes} classes"
    )
    return EXIT_OK
