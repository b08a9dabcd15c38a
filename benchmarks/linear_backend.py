"""A/B of the GEMM behind vitlab's linear layers on CPU: oneDNN (``vm._ONEDNN`` on) against ``F.linear``
(torch's MKL GEMM), in the same process, the two taking turns, so that load from other jobs hits both alike.

- ``train``: the compiled training step (forward, backward, fused AdamW) of the Fashion-MNIST demo model
  (128 wide, 6 deep, batch 128) on 7x7 patches (17 tokens) and 4x4 patches (50 tokens).
- ``infer``: eager inference of S/16 at 224, batch 16.

This decides ``VITLAB_ONEDNN``'s default (``vitlab.model._onednn_default``): on where the CPU has AVX-512.
Output: one line per case, medians of the step times and the ratio.

    python benchmarks/linear_backend.py [--steps 30] [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
import torch.nn.functional as F

from vitlab import model as vm
from vitlab.config import ViTConfig


def _train_steps(patch: int) -> dict[bool, Callable[[], None]]:
    cfg = ViTConfig.from_name(
        "Ti/7", image_size=28, in_channels=1, num_classes=10, hidden_dim=128, num_layers=6, num_heads=4,
        mlp_dim=256, patch_size=patch,
    )  # fmt: skip
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    steps: dict[bool, Callable[[], None]] = {}
    for onednn in (True, False):
        vm._ONEDNN = onednn
        torch.manual_seed(0)
        model = vm.ViT(cfg).train()
        compiled = torch.compile(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def step(compiled: Callable[..., torch.Tensor] = compiled, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        t0 = time.perf_counter()
        for _ in range(3):
            step()
        print(f"train patch {patch} onednn={onednn}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        steps[onednn] = step
    return steps


def _infer_steps() -> dict[bool, Callable[[], None]]:
    torch.manual_seed(0)
    model = vm.ViT(ViTConfig.from_name("S/16")).eval()
    x = torch.randn(16, 3, 224, 224)

    def infer() -> None:
        with torch.inference_mode():
            model(x)

    return {True: infer, False: infer}  # the same module: the flag is read on every call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="training steps per turn (inference: a fifth)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability "
          f"{torch.backends.cpu.get_cpu_capability()}, default onednn={vm.onednn_enabled()}")  # fmt: skip
    cases = {"train patch 7 (demo model, batch 128)": (_train_steps(7), args.steps, 128),
             "train patch 4 (batch 128)": (_train_steps(4), args.steps, 128),
             "inference S/16 at 224 (batch 16)": (_infer_steps(), max(1, args.steps // 5), 16)}  # fmt: skip
    for name, (steps, n, batch) in cases.items():
        times: dict[bool, list[float]] = {True: [], False: []}
        for flag, fn in steps.items():  # warm-up, inference included
            vm._ONEDNN = flag
            fn()
        for _ in range(args.rounds):
            for flag, fn in steps.items():
                vm._ONEDNN = flag
                for _ in range(n):
                    t0 = time.perf_counter()
                    fn()
                    times[flag].append(time.perf_counter() - t0)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name}: oneDNN {1000 * on:.1f} ms ({batch / on:.0f} images/s), F.linear {1000 * off:.1f} ms "
              f"({batch / off:.0f} images/s); oneDNN / F.linear speed {off / on:.2f}x", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
