"""The ``vitlab`` command line. Thin: it parses arguments, calls the library and prints.

Exit codes: 0 success, 1 some inputs failed, 2 usage error (bad arguments or bad input files).
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _command_modules() -> list[ModuleType]:
    """Each module of ``vitlab.commands`` adds one subcommand through its ``add_parser(subparsers)``."""
    import vitlab.commands as pkg

    names = sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))
    return [importlib.import_module(f"vitlab.commands.{name}") for name in names]


def build_parser() -> argparse.ArgumentParser:
    from vitlab import __version__

    parser = _Parser(prog="vitlab", description="The Vision Transformer (Dosovitskiy et al. 2021), as software.")
    parser.add_argument("--version", action="version", version=f"vitlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    for module in _command_modules():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from vitlab import malloc

    parser = build_parser()
    args = parser.parse_args(argv)
    malloc.keep_freed_memory()  # the command owns its process: reuse freed buffers instead of faulting in new pages
    try:
        status = int(args.func(args))
    except ValueError as e:  # bad user input reaching the library: a message, not a traceback
        print(f"vitlab {args.command}: error: {e}", file=sys.stderr)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = 130
    except BrokenPipeError:  # `vitlab models | head`: the reader left; no traceback, and none at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 141  # 128 + SIGPIPE, as a shell tool would end
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_without_teardown(status)
    return status


def _exit_without_teardown(status: int) -> NoReturn:
    """End a process that torchrun started, once its command is done and its output flushed, without the
    interpreter's teardown. DDP keeps the gloo process group (and its worker threads) alive past
    ``destroy_process_group``; a worker thread still releasing a finished collective's tensors at interpreter
    shutdown needs the GIL, is ended by Python mid-C++ and aborts the whole process ("terminate called without
    an active exception", SIGABRT, seen in CI after successful runs). Every file is written by then."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
