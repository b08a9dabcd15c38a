"""``vitlab predict``: classify image files with a checkpoint's own preprocessing."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vitlab.commands._args import note_assumed_preprocessing, require_positive

EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="classify image files, folders or globs")
    p.add_argument("source", help="a checkpoint: vitlab run folder, file, registry name or URL")
    p.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--top-k", type=int, default=None, help="classes to show per image (default 5, or all if fewer)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", action="store_true", help="JSON Lines: one object per input")
    p.add_argument("--num-heads", type=int, default=None, help="head count, for bare state dicts")
    p.add_argument("--onnx", action="store_true", help="SOURCE is an .onnx file written by `vitlab export`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.checkpoint import from_pretrained
    from vitlab.evaluate import normalize
    from vitlab.preprocess import IMAGE_SUFFIXES, ImageReadError, expand_inputs, load_for_model

    require_positive(args, "top_k", "batch_size")
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    if args.onnx:
        from vitlab.export import load_onnx

        try:
            model: Any = load_onnx(args.source)
        except ImportError as e:  # onnxruntime missing: a usage problem, not a crash
            raise ValueError(str(e)) from None
    else:
        model = from_pretrained(args.source, **overrides).eval()
        note_assumed_preprocessing(args.source, model)
    if not model.config.num_classes:
        raise ValueError(f"{args.source} has no classification head (num_classes=0): nothing to predict")
    pre, channels = model.preprocessing, model.config.in_channels
    names = model.class_names
    classes = model.config.num_classes
    if args.top_k is not None and args.top_k > classes:
        raise ValueError(f"--top-k {args.top_k} is more than the {classes} classes of {args.source}")
    k = args.top_k or min(5, classes)
    inputs: list[tuple[str, str]] = []  # (path, why it cannot be predicted, if known before opening it)
    for item in args.inputs:
        found = [(str(path), "") for path in expand_inputs([item])]  # nothing only for a folder without images
        inputs += found or [(item, f"no image files in folder (looked for {', '.join(IMAGE_SUFFIXES)})")]
    failed = 0
    results: list[dict[str, Any]] = []

    def flush(batch: list[tuple[str, Any]]) -> None:
        if not batch:
            return
        x = normalize(torch.stack([t for _, t in batch]), pre.mean, pre.std)
        with torch.no_grad():
            probs = model(x).float().softmax(-1)
        top = probs.topk(k, dim=-1)
        for (path, _), values, indices in zip(batch, top.values, top.indices, strict=True):
            preds = [
                {"index": int(i), "label": names[int(i)] if names else str(int(i)), "probability": float(v)}
                for v, i in zip(values, indices, strict=True)
            ]
            emit({"path": path, "predictions": preds})
        batch.clear()

    def emit(row: dict[str, Any]) -> None:
        results.append(row)
        if args.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{row['path']}: error: {row['error']}", file=sys.stderr)
        else:
            best = row["predictions"]
            shown = ", ".join(f"{p['label']} {p['probability']:.3f}" for p in best)
            print(f"{row['path']}\t{shown}")

    pending: list[tuple[str, Any]] = []
    for path, error in inputs:
        if not error:
            try:
                pending.append((path, load_for_model(path, pre, channels)))
            except ImageReadError as e:
                error = str(e)
        if error:
            flush(pending)  # keep the output in input order
            failed += 1
            emit({"path": path, "error": error})
        if len(pending) >= args.batch_size:
            flush(pending)
    flush(pending)
    if failed:
        print(f"{failed} of {len(inputs)} input(s) could not be read", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK
