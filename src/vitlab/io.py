"""Atomic file writes: a temporary file in the same folder, fsync, then rename; and the checks an output path
gets before any work is done.

A reader (or a crash, or ``kill -9``) sees either the old file whole or the new one whole, never half.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder to fill; on success its files become ``path``'s, on failure nothing changes.

    A new ``path`` appears whole (the temporary folder beside it is renamed). An existing folder (a symlink to
    one, a mount point, ``.``) keeps its own identity, owner and mode: the temporary folder is made inside it and,
    once complete, the old entries are removed and the new ones moved in, each move atomic."""
    import shutil

    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; give the usual permissions
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    tmp = Path(tempfile.mkdtemp(prefix=".incoming.", suffix=".tmp", dir=path))
    try:
        yield tmp
        for entry in path.iterdir():  # the old contents go only once the new ones are complete
            if entry == tmp:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for entry in tmp.iterdir():
            os.replace(entry, path / entry.name)
        _fsync_dir(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
