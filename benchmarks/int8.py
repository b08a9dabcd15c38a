"""int8 ONNX against vitlab's fp32 eager forward: speed, and top-1 agreement on Fashion-MNIST test images.

Two measurements, written to one JSON file with the command that made them:

- speed: a randomly initialised ``--speed-model`` (default S/16, 224x224, 3 channels) at ``--batch`` (16),
  exported by ``vitlab.export`` with and without ``int8``; vitlab's eager fp32 forward, onnxruntime fp32 and
  onnxruntime int8 take turns in every repeat (the order rotating), medians reported, ratios within this run;
- agreement: a trained Fashion-MNIST checkpoint (``--model``, default ``runs/demo`` from ``make demo``),
  exported to int8; top-1 of the int8 model against vitlab's fp32 eager top-1 on the first ``--n`` (1000)
  test images, and both models' accuracy against the labels.

    python benchmarks/int8.py [--model runs/demo] [--n 1000] [--speed-model S/16] [--batch 16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import vitlab
from vitlab.bench import result_header, seconds_per_call
from vitlab.datasets import load_data
from vitlab.evaluate import normalize
from vitlab.export import export, load_onnx
from vitlab.io import atomic_write_json


def _seconds(call: Callable[[], object], min_time: float) -> float:
    call()
    t0 = time.perf_counter()
    call()
    once = time.perf_counter() - t0
    return seconds_per_call(call, max(1, round(min_time / max(once, 1e-6))))


def measure_speed(name: str, batch: int, repeats: int, min_time: float, work: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = vitlab.create_model(name).eval()
    fp32 = export(model, work / "speed_fp32.onnx")
    int8 = export(model, work / "speed_int8.onnx", int8=True)
    sessions = {"onnx_fp32": load_onnx(fp32.path), "onnx_int8": load_onnx(int8.path)}
    x = torch.randn(batch, model.config.in_channels, *model.config.image_size)

    def eager() -> None:
        with torch.inference_mode():
            model(x)

    calls: dict[str, Callable[[], object]] = {"vitlab_eager_fp32": eager}
    for key, session in sessions.items():
        calls[key] = functools.partial(session, x)
    times: dict[str, list[float]] = {k: [] for k in calls}
    names = list(calls)
    for r in range(repeats):
        k = r % len(names)
        for key in names[k:] + names[:k]:
            times[key].append(_seconds(calls[key], min_time))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "batch": batch,
        "seconds_per_batch": times,
        "images_per_s": {k: batch / v for k, v in med.items()},
        "int8_speedup_vs_vitlab_eager_fp32": med["vitlab_eager_fp32"] / med["onnx_int8"],
        "int8_speedup_vs_onnx_fp32": med["onnx_fp32"] / med["onnx_int8"],
        "onnx_fp32_max_abs_error": fp32.fp32_max_abs_error,
    }


def measure_agreement(source: str, n: int, work: Path) -> dict[str, Any]:
    model = vitlab.from_pretrained(source).eval()
    report = export(model, work / "trained_int8.onnx", int8=True)
    quantized = load_onnx(report.path)
    c = model.config
    test = load_data("fashion-mnist", val_fraction=0.0, channels=c.in_channels, image_size=c.image_size).test
    if test is None or len(test) < n:
        raise SystemExit(f"Fashion-MNIST's test split has fewer than {n} images")
    images, labels = test.images[:n], test.labels[:n]
    p = model.preprocessing
    x = normalize(images, p.mean, p.std)
    with torch.inference_mode():
        ref = torch.cat([model(x[i : i + 250]) for i in range(0, n, 250)])
    got = torch.cat([quantized(x[i : i + 250]) for i in range(0, n, 250)])
    return {
        "source": source,
        "n": n,
        "top1_agreement": (ref.argmax(1) == got.argmax(1)).float().mean().item(),
        "fp32_top1": (ref.argmax(1) == labels).float().mean().item(),
        "int8_top1": (got.argmax(1) == labels).float().mean().item(),
        "max_abs_logit_diff": (ref - got).abs().max().item(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo", help="trained Fashion-MNIST checkpoint (default runs/demo)")
    p.add_argument("--n", type=int, default=1000, help="test images for the agreement (default 1000)")
    p.add_argument("--speed-model", default="S/16", help="preset timed for speed (default S/16)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds of calls per timing")
    p.add_argument("--out", default="benchmarks/results/int8.json")
    args = p.parse_args(argv)
    if not Path(args.model).exists():
        print(f"no trained model at {args.model}: run `make demo` first or give --model", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vitlab-int8-") as tmp:
        work = Path(tmp)
        agreement = measure_agreement(args.model, args.n, work)
        print(json.dumps(agreement), flush=True)
        speed = measure_speed(args.speed_model, args.batch, args.repeats, args.min_time, work)
        print(json.dumps({k: v for k, v in speed.items() if k != "seconds_per_batch"}), flush=True)
    result = {
        **result_header("benchmarks/int8.py", argv),
        "agreement": agreement,
        "speed": speed,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
