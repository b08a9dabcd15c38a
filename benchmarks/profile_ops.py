"""Where the time goes: torch.profiler tables for vitlab's hot paths, written beside the benchmark results.

- ``b16-inference``: B/16 forward, 224x224, batch 16, eager fp32, inference mode;
- ``demo-train``: one training step of the ``fashion-mnist-demo`` model (batch 128, 28x28 grey): forward,
  cross-entropy, backward, the recipe's optimiser step (Muon since session 14; AdamW before), eager;
- ``demo-train-compiled``: the same step with the model under ``torch.compile``, as ``vitlab train`` runs it;
  inductor's generated kernels appear by name (``cpp.enable_kernel_profile``).

Each writes ``benchmarks/results/profile_<name>.txt``: the command, then the operators sorted by self CPU time.

    python benchmarks/profile_ops.py [--cases b16-inference demo-train] [--steps 3] [--rows 25]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import vitlab
from vitlab.io import atomic_write_text
from vitlab.recipes import get_recipe
from vitlab.train import build_optimizer


def b16_inference() -> Callable[[], None]:
    torch.manual_seed(0)
    model = vitlab.create_model("B/16").eval()
    x = torch.randn(16, 3, 224, 224)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def demo_train(compiled: bool = False) -> Callable[[], None]:
    c = get_recipe("fashion-mnist-demo")
    torch.manual_seed(0)
    model = vitlab.create_model(c.model, image_size=28, in_channels=1, num_classes=10, **c.model_overrides).train()
    opt = build_optimizer(model, c, torch.device("cpu"))
    x, y = torch.randn(c.batch_size, 1, 28, 28), torch.randint(0, 10, (c.batch_size,))
    if compiled:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # name each generated kernel in the profile
    fwd: Callable[[torch.Tensor], torch.Tensor] = torch.compile(model) if compiled else model

    def step() -> None:
        loss = F.cross_entropy(fwd(x), y, label_smoothing=c.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


CASES: dict[str, Callable[[], Callable[[], None]]] = {
    "b16-inference": b16_inference,
    "demo-train": demo_train,
    "demo-train-compiled": lambda: demo_train(compiled=True),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--out-dir", default="benchmarks/results")
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/profile_ops.py", *(argv if argv is not None else sys.argv[1:])])
    for name in args.cases:
        step = CASES[name]()
        for _ in range(2):
            step()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
        header = f"# {command}\n# case {name}: {args.steps} steps, torch {torch.__version__}, "
        header += f"{torch.get_num_threads()} threads\n"
        path = Path(args.out_dir) / f"profile_{name}.txt"
        atomic_write_text(path, header + table + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
