"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def require_positive(args: argparse.Namespace, *names: str) -> None:
    """ValueError naming the first option among ``names`` given a value below 1 (None: not given)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def image_size(text: str) -> int | tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW") from None
    if len(parts) == 1:
        return parts[0]
    if len(parts) == 2:
        return (parts[0], parts[1])
    raise argparse.ArgumentTypeError(f"image size {text!r} is not N or HxW")


def note_assumed_preprocessing(source: str, model: Any) -> None:
    """On stderr: a single weights file (no vitlab, timm or HF folder around it) records neither preprocessing
    nor class names, so say which were assumed instead of using them silently."""
    path = Path(source).expanduser()
    if not path.is_file() or model.class_names is not None:
        return
    pre = model.preprocessing
    crop = f", crop_pct {pre.crop_pct:g}" if pre.crop_mode == "center" and pre.crop_pct < 1 else ""
    print(
        f"note: {path.name} is a weights file that records no preprocessing or class names: assumed "
        f"{pre.interpolation} resize to {pre.image_size[0]}x{pre.image_size[1]}{crop}, mean "
        f"{[round(m, 4) for m in pre.mean]}, std {[round(s, 4) for s in pre.std]}; labels are class indices",
        file=sys.stderr,
    )
