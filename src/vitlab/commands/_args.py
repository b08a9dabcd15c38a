"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


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
