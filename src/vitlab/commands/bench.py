"""``vitlab bench``: vitlab's ViT beside timm, HF transformers and torchvision at the same architecture, one run."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from vitlab.commands._args import require_positive
from vitlab.io import check_out_file

EXIT_OK = 0


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers, e.g. 1,16")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="throughput, latency, memory and share of the matmul peak, vitlab beside timm / HF / torchvision",
        description=(
            "Times vitlab's ViT and the same architecture built with random weights by each installed peer "
            "library, the libraries taking turns within each repeat; reports medians, ratios to the best peer in "
            "the same run, the machine's measured fp32 and bf16 matmul rates and each model's share of the fp32 one."
        ),
    )
    p.add_argument("--models", type=_name_list, default=("S/16", "B/16"), help="presets (default S/16,B/16)")
    p.add_argument("--batch", type=_int_list, default=(1, 16), help="batch sizes (default 1,16)")
    p.add_argument("--train", action="store_true", help="also time training steps (forward+backward+AdamW)")
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="with --train: also time and measure vitlab with activation checkpointing (rows 'vitlab-gc')",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants of every model")
    p.add_argument(
        "--peers", type=_name_list, default=("timm", "hf", "torchvision"), help="default timm,hf,torchvision; none"
    )
    p.add_argument("--repeats", type=int, default=5, help="timings per configuration; medians reported (default 5)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per timing (default 1.0)")
    p.add_argument("--image-size", type=int, default=None, help="override the presets' 224")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the matrices timed for the peak")
    p.add_argument("--no-memory", action="store_true", help="skip the per-configuration memory subprocesses")
    p.add_argument("--json", action="store_true", help="print the results JSON instead of a table")
    p.add_argument(
        "--out", default=None, metavar="FILE", help="write the results JSON here (e.g. benchmarks/results/NAME.json)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.bench import BenchSettings, format_table, run_benchmark

    if args.out:
        check_out_file(args.out)  # before the minutes of timing, not after
    require_positive(args, "threads")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    settings = BenchSettings(
        models=args.models,
        batches=args.batch,
        peers=args.peers,
        train=args.train,
        grad_checkpointing=args.grad_checkpointing,
        compile=args.compile,
        repeats=args.repeats,
        min_time=args.min_time,
        memory=not args.no_memory,
        matmul_size=args.matmul_size,
        image_size=args.image_size,
        device=args.device,
    )
    command = shlex.join(["vitlab", *sys.argv[1:]])
    result = run_benchmark(settings, command=command, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.out:
        from vitlab.io import atomic_write_json

        atomic_write_json(args.out, result)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result))
        if args.out:
            print(f"wrote {args.out}")
    return EXIT_OK
