"""``vitlab export``: a checkpoint to an ONNX file (fp32 or int8) checked against torch with onnxruntime."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vitlab.io import check_out_file

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint to ONNX (dynamic batch), checked against torch with onnxruntime",
        description=(
            "Write FILE.onnx, whose input is the preprocessed float tensor (batch, C, H, W), and "
            "FILE.preprocessing.json beside it. The fp32 graph is compared with torch on random inputs at batch 1 "
            "and --batch-check; if they differ by more than --atol nothing is written and the exit code is 1."
        ),
    )
    p.add_argument("source", metavar="SRC", help="checkpoint file or directory, registry name, or http(s) URL")
    p.add_argument("--out", required=True, metavar="FILE", help="the .onnx file to write")
    p.add_argument("--int8", action="store_true", help="write an int8 model (onnxruntime dynamic quantisation)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX opset (default 17, 14 to 20; with --exporter dynamo 18, 18 up)"
    )
    p.add_argument("--num-heads", type=int, default=None, help="head count, for bare state dicts")
    p.add_argument("--batch-check", type=int, default=3, metavar="N", help="check at batch 1 and N (default 3)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest fp32 |ONNX - torch| accepted (default 1e-4)")
    p.add_argument(
        "--exporter",
        choices=["torchscript", "dynamo"],
        default="torchscript",
        help="torch.onnx exporter (default torchscript; dynamo needs onnxscript and cannot export relative)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.export import ExportCheckError, MissingDependencyError, export, require_onnx

    try:
        require_onnx()
    except MissingDependencyError as e:
        print(f"vitlab export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    from vitlab.checkpoint import from_pretrained

    check_out_file(args.out, overwrite=args.overwrite)
    if args.opset is None:
        args.opset = 18 if args.exporter == "dynamo" else 17  # the lowest the dynamo exporter writes
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = from_pretrained(args.source, **overrides)
    try:
        report = export(
            model,
            args.out,
            opset=args.opset,
            int8=args.int8,
            batch_check=args.batch_check,
            atol=args.atol,
            exporter=args.exporter,
        )
    except ExportCheckError as e:
        print(f"vitlab export: check failed: {e}; nothing written", file=sys.stderr)
        return EXIT_FAILED
    except MissingDependencyError as e:
        print(f"vitlab export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    c = model.config
    sizes = " and ".join(str(b) for b in report.batch_sizes)
    print(f"fp32 max abs error vs torch: {report.fp32_max_abs_error:.3g} (batch sizes {sizes}, atol {args.atol:g})")
    if report.int8_top1_agreement is not None:
        n = sum(report.batch_sizes)
        print(
            f"int8 top-1 agreement with fp32: {report.int8_top1_agreement:.3f} on {n} random inputs "
            f"(max abs logit difference {report.int8_max_abs_diff:.3g})"
        )
    kind = "int8" if args.int8 else "fp32"
    print(
        f"wrote {kind} ONNX model to {report.path} (opset {args.opset}, input 'images' (batch, {c.in_channels}, "
        f"{c.image_size[0]}, {c.image_size[1]})) and preprocessing to {report.preprocessing_path}"
    )
    return EXIT_OK
