"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse
from pathlib import Path


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


def check_out_file(path: str | Path, overwrite: bool | None = None) -> Path:
    """Refuse, before any work, an output file path that cannot be written: a folder, or under a file.
    ``overwrite=False`` also refuses an existing file (None: replacing one is fine)."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give a file name")
    _parents_are_folders(out)
    if overwrite is False and out.exists():
        raise ValueError(f"--out {out} exists: pass --overwrite to replace it")
    return out


def check_out_dir(path: str | Path) -> Path:
    """Refuse, before any work, an output folder path that is a file or lies under one."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    _parents_are_folders(out)
    return out


def _parents_are_folders(out: Path) -> None:
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"cannot write --out {out}: {parent} is a file, not a folder")
            return
