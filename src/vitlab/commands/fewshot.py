"""``vitlab fewshot``: the paper's few-shot linear evaluation of a frozen representation (closed-form ridge
regression onto {-1, 1}^K), averaged over random draws of the shots, and a logistic-regression linear probe."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from vitlab.commands._args import require_positive


def add_parser(sub: Any) -> None:
    p = sub.add_parser("fewshot", help="few-shot linear evaluation of a frozen checkpoint (and a linear probe)")
    p.add_argument("source", help="a checkpoint: vitlab run folder, file, registry name or URL")
    p.add_argument("--data", required=True, help="fashion-mnist, mnist, cifar10, cifar100 or an image folder")
    p.add_argument(
        "--shots", type=int, nargs="+", default=[1, 5, 10, 25], help="examples per class (default 1 5 10 25)"
    )
    p.add_argument("--draws", type=int, default=5, help="random draws of the shots to average over (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="held-out training data that chooses the L2 strength (default 0.1)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, help="use the first N training (and test) images only")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass for the features")
    p.add_argument("--no-probe", action="store_true", help="skip the logistic-regression linear probe")
    p.add_argument("--json", action="store_true", help='last line of stdout: {"<shots>": accuracy, ...}')
    p.add_argument("--num-heads", type=int, default=None, help="head count, for bare state dicts")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.checkpoint import from_pretrained
    from vitlab.datasets import load_data
    from vitlab.fewshot import extract_features, fewshot_accuracy, linear_probe

    shots = list(dict.fromkeys(args.shots))  # in order, without repeats
    if min(shots) < 1:
        raise ValueError(f"--shots must be >= 1, got {min(shots)}")
    require_positive(args, "draws")
    if not 0 < args.val_fraction < 1:
        raise ValueError(
            f"--val-fraction must be in (0, 1): the L2 strength is chosen on held-out data, got {args.val_fraction}"
        )
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = from_pretrained(args.source, **overrides).eval()
    c = model.config
    data = load_data(
        args.data,
        val_fraction=args.val_fraction,
        seed=args.seed,
        image_size=c.image_size,
        channels=c.in_channels,
        limit=args.limit,
    )
    if data.test is None or len(data.test) == 0:
        raise ValueError(f"{args.data} has no test split to report accuracy on")
    k = len(data.train.class_names)
    counts = data.train.labels.bincount(minlength=k)
    fewest = int(counts.min())
    if max(shots) > fewest:
        name = data.train.class_names[int(counts.argmin())]
        limited = f" and --limit {args.limit}" if args.limit else ""
        raise ValueError(
            f"--shots {max(shots)} is more than the {fewest} training image(s) of class {name!r} "
            f"(after holding out --val-fraction {args.val_fraction}{limited}); "
            f"use --shots <= {fewest}"
        )
    if len(data.val) == 0:
        raise ValueError("no held-out training data for choosing the L2 strength: raise --val-fraction or --limit")

    def log(message: str) -> None:
        print(message, file=sys.stderr if args.json else sys.stdout, flush=True)

    started = time.perf_counter()
    splits = {}
    for name, part in (("train", data.train), ("val", data.val), ("test", data.test)):
        splits[name] = (extract_features(model, part.images, batch_size=args.batch_size), part.labels)
    n = sum(len(v[1]) for v in splits.values())
    log(f"features of {n} images ({splits['train'][0].shape[1]} wide) in {time.perf_counter() - started:.1f} s")

    results: dict[str, float] = {}
    details: dict[str, Any] = {}
    for s in shots:
        r = fewshot_accuracy(
            splits["train"], splits["val"], splits["test"], s, num_classes=k, draws=args.draws, seed=args.seed
        )
        results[str(s)] = r.mean
        details[str(s)] = {"mean": r.mean, "std": r.std, "accuracies": r.accuracies, "l2": r.l2}
        log(f"{s:>3}-shot: {100 * r.mean:6.2f}% ± {100 * r.std:.2f} over {args.draws} draws "
            f"(L2 chosen on {len(data.val)} held-out images: {', '.join(f'{v:g}' for v in r.l2)})")  # fmt: skip
    summary: dict[str, Any] = {"source": str(args.source), "data": args.data, "fewshot": details}
    if not args.no_probe:
        started = time.perf_counter()
        p = linear_probe(splits["train"], splits["val"], splits["test"], num_classes=k)
        summary["linear_probe"] = {"test_accuracy": p.test_accuracy, "val_accuracy": p.val_accuracy, "l2": p.l2,
                                   "train_size": p.train_size}  # fmt: skip
        log(f"linear probe (logistic regression on {p.train_size} training images, L2 {p.l2:g}): "
            f"{100 * p.test_accuracy:.2f}% test ({time.perf_counter() - started:.1f} s)")  # fmt: skip
    if args.json:
        print(json.dumps(summary))  # the details; the last line is the shots mapping alone
        print(json.dumps(results))
    return 0
