"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


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
