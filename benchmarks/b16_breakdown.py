"""Compiled B/16 inference (224x224, batch 16, fp32): where the time goes, and what ">= 92% of the fp32 matmul
roofline" would need from each part.

1. The compiled model's throughput (median of ``--repeats`` timings of ``--calls`` calls), then torch.profiler
   over ``--calls`` calls, the self time split into the linear layers' GEMMs (``mkldnn::_linear_pointwise``),
   attention (the SDPA kernel), the patch-embedding convolution, and everything else (the fused inductor
   kernels: LayerNorms, residual adds, copies). fc1's GELU runs inside its GEMM (oneDNN post-op) and is counted
   there; the profiler's own overhead is spread over the parts in proportion (most of it is in "other").
2. One layer's attention alone (16 x 12 heads x 197 tokens x 64, q/k/v strided views of one qkv output as in
   the model): SDPA, written out, and its parts (Q K^T and P V as batched matmuls, the softmax), taking turns.
3. The machine's fp32 GEMM rates in the same run (``vitlab.bench.matmul_rates``), and the arithmetic: the
   linear layers' achieved rate, and the time left for the rest at 92% of the best fp32 rate.

Writes ``benchmarks/results/b16_breakdown.json`` (with this command).

    python benchmarks/b16_breakdown.py [--calls 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab import malloc
from vitlab.bench import fp32_peak_gflops, matmul_rates, result_header
from vitlab.io import atomic_write_json
from vitlab.model import flops_per_image

BATCH, TOKENS, HEADS, HEAD_DIM = 16, 197, 12, 64
# profiler event name -> part of the forward pass
PARTS = {
    "mkldnn::_linear_pointwise": "linear_gemms",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::mkldnn_convolution": "patch_embedding",
}


def _median_ms(fn: Callable[[], object], calls: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e3)
    return statistics.median(times)


def whole_model(calls: int, repeats: int) -> dict[str, Any]:
    """Throughput and the profiled split of compiled B/16 inference."""
    torch.manual_seed(0)
    model = torch.compile(vitlab.create_model("B/16").eval())
    x = torch.randn(BATCH, 3, 224, 224)
    with torch.inference_mode():  # as vitlab bench times it
        for _ in range(3):  # compile, warm up
            model(x)
        ms_per_batch = _median_ms(lambda: model(x), calls, repeats)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                model(x)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    split_ms = {part: 0.0 for part in (*PARTS.values(), "other")}
    for e in events:
        split_ms[PARTS.get(e.key, "other")] += e.self_cpu_time_total / calls / 1e3
    return {
        "images_per_s": BATCH / ms_per_batch * 1e3,
        "ms_per_batch": ms_per_batch,
        "profiled_ms_per_batch": total_us / calls / 1e3,
        "profiled_split_ms_per_batch": split_ms,
    }


def attention_parts(repeats: int) -> dict[str, float]:
    """Milliseconds for one layer's attention at batch 16, by SDPA and written out, and the written-out parts."""
    torch.manual_seed(0)
    qkv = torch.randn(BATCH, TOKENS, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, h, T, hd) views, as Attention._qkv makes them
    scale = HEAD_DIM**-0.5
    scores = (q * scale) @ k.transpose(-2, -1)
    probs = scores.softmax(-1)
    variants: dict[str, Callable[[], object]] = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
        "written_out": lambda: ((q * scale) @ k.transpose(-2, -1)).softmax(-1) @ v,
        "q_kt_bmm": lambda: torch.matmul(q, k.transpose(-2, -1)),
        "softmax": lambda: scores.softmax(-1),
        "p_v_bmm": lambda: torch.matmul(probs, v),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(repeats):  # taking turns
            for name, fn in variants.items():
                times[name].append(_median_ms(fn, 5, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=3, help="batches per timing and in the profile")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="benchmarks/results/b16_breakdown.json")
    args = p.parse_args(argv)
    malloc.keep_freed_memory()  # as every vitlab command does

    model = whole_model(args.calls, args.repeats)
    attention = attention_parts(args.repeats)
    rates = matmul_rates((torch.float32,))
    peak = fp32_peak_gflops(rates)
    document: dict[str, Any] = {
        **result_header("benchmarks/b16_breakdown.py", argv),
        "compiled_b16_batch16": model,
        "attention_one_layer_ms": attention,
        "matmul_rates": rates,
    }
    missing = [part for part in ("linear_gemms", "attention") if model["profiled_split_ms_per_batch"][part] == 0]
    if missing:  # e.g. VITLAB_ONEDNN=0, or a torch that names these kernels differently
        atomic_write_json(args.out, document)
        raise SystemExit(f"no profiler events for {missing} (names looked for: {PARTS}); raw data in {args.out}")

    config = vitlab.ViTConfig.from_name("B/16")
    gflop_batch = flops_per_image(config) * BATCH / 1e9
    attention_gflop_layer = 2 * 2 * BATCH * HEADS * TOKENS * TOKENS * HEAD_DIM / 1e9
    attention_gflop_batch = attention_gflop_layer * config.num_layers
    conv_gflop_batch = 2 * BATCH * (TOKENS - 1) * 3 * 16 * 16 * config.hidden_dim / 1e9
    linear_gflop_batch = gflop_batch - attention_gflop_batch - conv_gflop_batch
    split = model["profiled_split_ms_per_batch"]
    scale_to_timed = model["ms_per_batch"] / model["profiled_ms_per_batch"]  # the profiler's own overhead out
    target_ms = gflop_batch / (0.92 * peak) * 1e3
    linear_at_peak_ms = linear_gflop_batch / peak * 1e3
    analysis = {
        "gflop_per_batch": gflop_batch,
        "linear_gflop_per_batch": linear_gflop_batch,
        "attention_gflop_per_batch": attention_gflop_batch,
        "fp32_peak_gflops": peak,
        "share_of_peak": gflop_batch / model["ms_per_batch"] * 1e3 / peak,
        "linear_gemms_gflops": linear_gflop_batch / (split["linear_gemms"] * scale_to_timed) * 1e3,
        "attention_gflops_in_model": attention_gflop_batch / (split["attention"] * scale_to_timed) * 1e3,
        "attention_gflops_best_alone": attention_gflop_layer / min(attention["sdpa"], attention["written_out"]) * 1e3,
        "ms_per_batch_at_92_percent": target_ms,
        "ms_left_beside_linear_layers_at_peak": target_ms - linear_at_peak_ms,
        "ms_beside_linear_layers_now": model["ms_per_batch"] - split["linear_gemms"] * scale_to_timed,
    }
    document["analysis"] = analysis
    atomic_write_json(args.out, document)
    print(f"compiled B/16, batch 16: {model['images_per_s']:.2f} img/s = {analysis['share_of_peak']:.1%} of "
          f"{peak:.1f} GFLOP/s (best fp32 GEMM)")  # fmt: skip
    print("profiled split, ms per batch: " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()))
    print("one layer's attention, ms: " + ", ".join(f"{k} {v:.2f}" for k, v in attention.items()))
    print(
        f"linear GEMMs at {analysis['linear_gemms_gflops']:.0f} GFLOP/s; attention at "
        f"{analysis['attention_gflops_in_model']:.0f} GFLOP/s; 92% of the peak = {target_ms:.0f} ms per batch, "
        f"of which the linear layers at the peak take {linear_at_peak_ms:.0f}: "
        f"{analysis['ms_left_beside_linear_layers_at_peak']:.0f} ms left for the rest "
        f"(now {analysis['ms_beside_linear_layers_now']:.0f})"
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
