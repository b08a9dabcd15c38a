"""``vitlab experiment``: the paper's ablations at Fashion-MNIST scale (see :mod:`vitlab.experiments`)."""

from __future__ import annotations

import argparse
from typing import Any

NAMES = ("inductive-bias", "pos-embed", "pooling", "patch-size", "transfer")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("experiment", help="run one of the paper's ablations on Fashion-MNIST and write a report")
    p.add_argument("name", help=f"one of: {', '.join(NAMES)}")
    p.add_argument("--out", required=True, help="folder for results.json, figures, report.md and runs/")
    p.add_argument("--quick", action="store_true", help="tiny models and data: a smoke test, not a result")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.experiments import run_experiment

    result = run_experiment(args.name, args.out, quick=args.quick, seed=args.seed)
    print(f"{result.name}: {len(result.rows)} settings in {result.seconds:.0f} s; report in {result.out / 'report.md'}")
    return 0
