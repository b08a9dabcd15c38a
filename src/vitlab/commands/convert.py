"""``vitlab convert``: any supported checkpoint to a vitlab, timm or HF transformers directory."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitlab.commands._args import image_size
from vitlab.io import check_out_dir

EXIT_OK = 0
TARGETS = ("vitlab", "timm", "hf")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint (Google .npz, big_vision, HF, torchvision, timm, vitlab, registry name or URL)",
        description="Read SRC in any format vitlab knows and write it to DIR as vitlab (default), timm or HF.",
    )
    p.add_argument("source", metavar="SRC", help="checkpoint file or directory, registry name, or http(s) URL")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (new, or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out (never SRC itself)")
    p.add_argument("--to", choices=TARGETS, default="vitlab", help="output layout (default vitlab)")
    p.add_argument("--image-size", type=image_size, help="resample position embeddings to N or HxW")
    p.add_argument("--num-classes", type=int, help="replace the head by a zero-initialised one with K classes")
    p.add_argument("--num-heads", type=int, help="attention heads (needed for timm/torchvision state dicts)")
    p.add_argument(
        "--drop-pre-logits", action="store_true", help="drop the tanh pre-logits layer (timm and HF have none)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.checkpoint import from_pretrained, save_hf, save_model, save_timm
    from vitlab.io import atomic_dir

    out = Path(args.out)
    _check_out(out, args.source, args.overwrite)
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
    try:
        with atomic_dir(out) as tmp:  # the whole folder appears at the end, or nothing does
            save(model, tmp)
    except OSError as e:
        raise ValueError(f"cannot write {out}: {e.strerror or e}") from e
    c = model.config
    print(
        f"wrote {args.to} checkpoint to {out}: {c.num_layers} layers, width {c.hidden_dim}, {c.num_heads} heads, "
        f"patch {c.patch_size}, {c.image_size[0]}x{c.image_size[1]}, {c.num_classes} classes"
    )
    if c.num_classes and isinstance(model.head, torch.nn.Linear) and not model.head.weight.any():
        print(f"note: the {c.num_classes}-class head is new (zero-initialised): fine-tune it before predicting")
    return EXIT_OK


def _check_out(out: Path, source: str, overwrite: bool) -> None:
    """Refuse an --out that is a file, holds something (without --overwrite), or is or holds SRC."""
    check_out_dir(out)
    src = Path(source)
    if src.exists():
        o, s = out.resolve(), src.resolve()
        if o == s or o in s.parents:  # (a new folder inside a source folder is fine: nothing there is replaced)
            raise ValueError(f"--out {out} would replace or hold the source {source}: write somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {out} is not empty: pass --overwrite to replace it")
