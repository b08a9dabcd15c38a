"""A/B of two choices inside vitlab's compiled training step on CPU, on the Fashion-MNIST demo model.

- ``dw``: how dW = dy^T x reaches oneDNN under torch.compile. ``graph`` (vitlab's): the transposed operands
  are contiguous copies in the graph, which inductor fuses into the kernels producing dy and x. ``inside``
  (before session 4): strided transposed views, which oneDNN copies inside its call.
- ``attn``: ``explicit`` (two matmuls + softmax, vitlab's choice up to EXPLICIT_ATTENTION_MAX_TOKENS on CPU)
  or ``sdpa`` (SDPA's flash kernel).

Every variant is compiled once (inductor's on-disk caches off, so each is really compiled), then the variants
take turns for ``--rounds`` x ``--steps`` steps; medians of the step times. Output: one line per variant.

    python benchmarks/step_variants.py [--patch 7] [--dw graph,inside] [--attn explicit,sdpa]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
from typing import Any

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab import model as vm
from vitlab.config import ViTConfig

VARIANT: dict[str, str] = {}
_graph_weight_grad = vm._compiled_weight_grad
_attention_forward = vm.Attention.forward


def _weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    if VARIANT["dw"] == "graph":
        return _graph_weight_grad(grad, x)
    return vm.linear_op(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t(), None)


def _attention(self: vm.Attention, x: Tensor, grid: tuple[int, int]) -> Tensor:
    # branching on both choices here makes dynamo guard on them: one compiled graph (and backward) per variant;
    # x * 1.0 is a no-op that inductor's remove_noop_ops pass deletes
    if VARIANT["dw"] == "inside":
        x = x * 1.0
    if VARIANT["attn"] == "explicit":
        return self.forward_explicit(x, grid)[0]
    q, k, v = self._qkv(x)
    return self._merge(F.scaled_dot_product_attention(q, k, v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--patch", type=int, default=7, help="7: 17 tokens (the demo model), 4: 50 tokens")
    p.add_argument("--dw", default="graph,inside")
    p.add_argument("--attn", default="explicit,sdpa")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    vm._compiled_weight_grad = _weight_grad
    vm.Attention.forward = _attention  # type: ignore[method-assign]
    cfg = ViTConfig.from_name(
        "Ti/7", image_size=28, in_channels=1, num_classes=10, hidden_dim=128, num_layers=6, num_heads=4,
        mlp_dim=256, patch_size=args.patch,
    )  # fmt: skip
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    runs: list[tuple[dict[str, str], Any, Any, list[float]]] = []
    for dw, attn in itertools.product(args.dw.split(","), args.attn.split(",")):
        VARIANT.update(dw=dw, attn=attn)
        torch.manual_seed(0)
        model = vm.ViT(cfg).train()
        step = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        t0 = time.perf_counter()
        for _ in range(3):
            loss = F.cross_entropy(step(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        print(f"dw={dw} attn={attn}: compiled in {time.perf_counter() - t0:.0f} s, loss {loss.item():.5f}", flush=True)
        runs.append((dict(VARIANT), step, opt, []))
    for _ in range(args.rounds):
        for variant, step, opt, times in runs:
            VARIANT.update(variant)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                loss = F.cross_entropy(step(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                times.append(time.perf_counter() - t0)
    for variant, _, _, times in runs:
        print(f"dw={variant['dw']} attn={variant['attn']}: median {1000 * statistics.median(times):.2f} ms/step")


if __name__ == "__main__":
    main()
