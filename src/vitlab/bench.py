"""Speed of vitlab's ViT beside timm's, HF transformers' and torchvision's, measured in one run.

The paper reports compute as TPUv3-core-days (Section 4.2, Table 2); here the question is narrower: does
vitlab's ViT run as fast as the other libraries' *at the same architecture* on this machine, and how close do
they all come to what its matrix units can do? Every library builds the same preset with random weights (no
downloads) and is timed on the same inputs; within each repeat the libraries take turns (the order rotates
from repeat to repeat) so that a burst of noise from other jobs hits all of them alike; the numbers reported
are medians over repeats, with ratios to the best peer taken within the same run.

What is measured (also written into every results file, under ``"definitions"``):

- inference: ``model(x)`` under ``torch.inference_mode()``, eval mode; ``latency_ms`` is the median over repeats
  of the time of one call (each repeat averages several calls), so the batch-1 rows give the batch-1 latency;
  ``images_per_s`` is batch / latency.
- training (``train=True``): one step = forward, cross-entropy on random labels, backward, AdamW step.
- ``peak_share``: achieved FLOP/s (``flops_per_image`` x images/s; 3x the forward's FLOPs for a training
  step) over the best measured fp32 GEMM rate (``torch.mm``, or oneDNN's on CPU, whichever is faster:
  vitlab's linear layers call oneDNN, so a share of torch.mm's rate could exceed 100%). The models run in
  fp32; the bf16 rate is measured too, to show which is the machine's fast path.
  :func:`vitlab.model.flops_per_image` counts matrix products only.
- memory on CPU: each configuration runs once more in a fresh subprocess, which builds the model, reads its
  resident set size, resets the kernel's high-water mark (``/proc/self/clear_refs``), runs one *cold* step
  and reads the high-water mark again (``VmHWM``). ``step_rss_delta_mb`` is the extra resident memory of that
  step (activations, workspaces; for training also gradients and AdamW's state); ``peak_rss_mb`` is the whole
  process (interpreter, libraries and weights included). On CUDA: ``torch.cuda.max_memory_allocated`` over
  one warm step, in process. Compiled variants are not measured.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab import malloc
from vitlab.config import ViTConfig
from vitlab.model import CPU_HAS_ONEDNN_BF16, ViT, flops_per_image, onednn_enabled, onednn_linear

LIBRARIES: tuple[str, ...] = ("vitlab", "timm", "hf", "torchvision")
PEERS: tuple[str, ...] = LIBRARIES[1:]
GRAD_CKPT = "vitlab-gc"  # vitlab with activation checkpointing: timed and measured in training only
Mode = Literal["inference", "train"]
TRAIN_FLOP_FACTOR = 3  # backward ~ 2x forward
_DISTRIBUTIONS = {"timm": "timm", "hf": "transformers", "torchvision": "torchvision"}

DEFINITIONS = {
    "images_per_s": "batch / (latency_ms / 1000)",
    "latency_ms": "median over repeats of the mean time of one call in that repeat (one training step in mode 'train')",
    "train_step": "forward, cross-entropy on random labels, backward, AdamW step",
    "gflops_per_image": "vitlab.model.flops_per_image (matrix products only), x3 for a training step",
    "peak_share": "gflops_per_image x images_per_s / best measured fp32 GEMM GFLOP/s (torch.mm or oneDNN)",
    "ratio_vs_best_peer": "images_per_s / images_per_s of the fastest peer library (not vitlab) in the same "
    "model, mode, batch and compile group, same run",
    "memory_cpu": "fresh subprocess per configuration: peak_rss_mb = VmHWM during one cold step (whole "
    "process); step_rss_delta_mb = VmHWM - VmRSS just before the step, the high-water mark reset through "
    "/proc/self/clear_refs (without that reset the delta is an upper bound)",
    "vitlab-gc": "vitlab with activation checkpointing (training only); its peak_share counts the same useful "
    "FLOPs (3x the forward), not the recomputed forward",
    "memory_cuda": "torch.cuda.max_memory_allocated during one warm step; delta above the allocation before it",
}


class PeerUnavailable(Exception):
    """A peer library is not installed, or cannot build this architecture; the message says which."""


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """What to measure. ``models`` are preset names ("B/16") or configs; ``image_size`` overrides the presets'."""

    models: tuple[str | ViTConfig, ...] = ("S/16", "B/16")
    batches: tuple[int, ...] = (1, 16)
    peers: tuple[str, ...] = PEERS
    train: bool = False
    grad_checkpointing: bool = False  # also train vitlab with activation checkpointing ("vitlab-gc" rows)
    compile: bool = False
    repeats: int = 5
    min_time: float = 1.0  # seconds of calls per timing; the call count is fixed in the warm-up
    warmup: int = 2
    memory: bool = True
    matmul_size: int = 2048
    matmul_repeats: int = 5
    image_size: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("no models to benchmark: give preset names such as 'S/16,B/16'")
        for name in self.models:
            if not isinstance(name, ViTConfig):
                ViTConfig.from_name(name)  # raises ValueError naming the accepted forms
        if not self.batches or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.batches):
            raise ValueError(f"batch sizes must be positive ints, got {list(self.batches)}")
        if self.grad_checkpointing and not self.train:
            raise ValueError("grad_checkpointing (--grad-checkpointing) times training steps: add train (--train)")
        unknown = [p for p in self.peers if p not in PEERS]
        if unknown:
            raise ValueError(f"unknown peer(s) {unknown}: choose from {list(PEERS)}")
        if self.repeats < 1 or self.warmup < 0 or self.min_time < 0:
            raise ValueError(
                f"need repeats >= 1, warmup >= 0, min_time >= 0; got {self.repeats}, {self.warmup}, {self.min_time}"
            )
        if self.matmul_size < 1 or self.matmul_repeats < 1:
            raise ValueError(
                f"matmul_size and matmul_repeats must be >= 1, got {self.matmul_size}, {self.matmul_repeats}"
            )

    def configs(self) -> list[tuple[str, ViTConfig]]:
        out = []
        extra: dict[str, Any] = {} if self.image_size is None else {"image_size": self.image_size}
        for m in self.models:
            if isinstance(m, ViTConfig):
                config = m.replace(**extra) if extra else m
                label = f"{config.hidden_dim}w{config.num_layers}d/{config.patch_size}@{config.image_size[0]}"
            else:
                config, label = ViTConfig.from_name(m, **extra), m
            out.append((label, config))
        return out


# ------------------------------------------------------------------------------------------ models
class _HFLogits(nn.Module):
    """HF's model takes ``pixel_values=`` and returns an output object; the others take x and return logits."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(pixel_values=x).logits
        return logits


def build_model(library: str, config: ViTConfig) -> nn.Module:
    """A randomly initialised ViT of ``config``'s architecture from ``library`` (fp32, CPU), with its dropout
    rates (and, for timm, drop path and patch dropout: what a training comparison needs).

    Raises :class:`PeerUnavailable` if the library is not installed or has no such architecture.
    """
    if library in ("vitlab", GRAD_CKPT):
        model = ViT(config)
        model.set_grad_checkpointing(library == GRAD_CKPT)
        return model
    if library not in PEERS:
        raise ValueError(f"unknown library {library!r}: choose from {list(LIBRARIES)}")
    c = config
    if c.pos_embed != "learned" or c.representation_size is not None:
        raise PeerUnavailable(f"{library} builds learned 1D position embeddings without a pre-logits layer")
    square = c.image_size[0] == c.image_size[1]
    try:
        if library == "timm":
            from timm.models.vision_transformer import VisionTransformer as TimmViT

            pool: dict[str, Any] = (
                {} if c.pool == "token" else dict(class_token=False, global_pool="avg", fc_norm=False)
            )
            return TimmViT(
                img_size=c.image_size,
                patch_size=c.patch_size,
                in_chans=c.in_channels,
                num_classes=c.num_classes,
                embed_dim=c.hidden_dim,
                depth=c.num_layers,
                num_heads=c.num_heads,
                mlp_ratio=c.mlp_dim / c.hidden_dim,
                qkv_bias=c.qkv_bias,
                pos_drop_rate=c.dropout,
                proj_drop_rate=c.dropout,
                attn_drop_rate=c.attention_dropout,
                drop_path_rate=c.drop_path,
                patch_drop_rate=c.patch_dropout,  # the same PatchDropout (a random share of patches per image)
                **pool,
            )
        if c.patch_dropout or c.drop_path:  # training-only regularisation this peer cannot build
            raise PeerUnavailable(f"{library} has no patch dropout or drop path")
        if not square or c.pool != "token":
            raise PeerUnavailable(f"{library} builds square images with a class token only")
        if library == "hf":
            from transformers import ViTConfig as HFConfig
            from transformers import ViTForImageClassification

            hf_args: dict[str, Any] = dict(
                hidden_size=c.hidden_dim,
                num_hidden_layers=c.num_layers,
                num_attention_heads=c.num_heads,
                intermediate_size=c.mlp_dim,
                image_size=c.image_size[0],
                patch_size=c.patch_size,
                num_channels=c.in_channels,
                num_labels=c.num_classes,
                layer_norm_eps=c.layer_norm_eps,
                qkv_bias=c.qkv_bias,
                hidden_dropout_prob=c.dropout,
                attention_probs_dropout_prob=c.attention_dropout,
            )
            hf = HFConfig(**hf_args)
            return _HFLogits(ViTForImageClassification._from_config(hf, attn_implementation="sdpa"))
        from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

        if c.in_channels != 3 or not c.qkv_bias:
            raise PeerUnavailable("torchvision builds 3-channel models with qkv biases only")
        return TorchvisionViT(
            image_size=c.image_size[0],
            patch_size=c.patch_size,
            num_layers=c.num_layers,
            num_heads=c.num_heads,
            hidden_dim=c.hidden_dim,
            mlp_dim=c.mlp_dim,
            dropout=c.dropout,
            attention_dropout=c.attention_dropout,
            num_classes=c.num_classes,
        )
    except ImportError as e:
        raise PeerUnavailable(f"{_DISTRIBUTIONS[library]} is not installed ({e})") from e


# --------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


# bf16 products without a native bf16 GEMM (AVX2 CPUs) are emulated at ~1 GFLOP/s: time them on small matrices
_EMULATED_BF16_MAX_SIZE = 512


def _cpu_has_bf16_gemm() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (as oneDNN reports it; monkeypatched in tests)."""
    return CPU_HAS_ONEDNN_BF16


def matmul_rates(
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    *,
    size: int = 2048,
    repeats: int = 5,
    device: str = "cpu",
) -> dict[str, dict[str, Any]]:
    """GFLOP/s of ``torch.mm`` on two size x size matrices per dtype, best and median over ``repeats``
    timings; on CPU also of oneDNN's fp32 GEMM (``float32_onednn``: the kernel vitlab's linear layers call),
    which on some CPUs is far faster than torch.mm's. The kernels take turns, so that load from other jobs
    hits them alike. On a CPU without a native bf16 GEMM (AVX2 only: ~1 GFLOP/s, 20 s per 2048^2 product)
    bf16 is timed on at most 512 x 512 matrices; each entry records its ``size``."""
    dev = torch.device(device)
    sync = _sync(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    a32 = torch.randn(size, size, generator=g, device=dev)
    b32 = torch.randn(size, size, generator=g, device=dev)
    kernels: dict[str, Callable[[], object]] = {}
    sizes: dict[str, int] = {}
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        n = size
        if dev.type == "cpu" and dtype == torch.bfloat16 and not _cpu_has_bf16_gemm():
            n = min(size, _EMULATED_BF16_MAX_SIZE)
        a, b = a32[:n, :n].to(dtype), b32[:n, :n].to(dtype)
        out = torch.mm(a, b)  # the output buffer
        kernels[name], sizes[name] = functools.partial(torch.mm, a, b, out=out), n
    if dev.type == "cpu" and onednn_enabled():  # linear(a, b) = a @ b.T: the same FLOPs
        kernels["float32_onednn"], sizes["float32_onednn"] = functools.partial(onednn_linear, a32, b32, None), size
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for fn in kernels.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in kernels.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "size": sizes[name],
            "repeats": repeats,
            "gflops_best": 2 * sizes[name] ** 3 / min(t) / 1e9,
            "gflops_median": 2 * sizes[name] ** 3 / statistics.median(t) / 1e9,
        }
        for name, t in times.items()
    }


def fp32_peak_gflops(rates: dict[str, dict[str, Any]]) -> float:
    """The machine's fp32 matrix-multiply rate: the best of torch.mm and oneDNN (when measured)."""
    measured = [rates[k]["gflops_best"] for k in ("float32", "float32_onednn") if k in rates]
    if not measured:
        raise ValueError(f"no fp32 matmul rate among {sorted(rates)}")
    return max(measured)


def _make_step(
    model: nn.Module, mode: Mode, x: Tensor, y: Tensor, opt: torch.optim.Optimizer | None = None
) -> Callable[[], None]:
    if mode == "inference":

        def infer() -> None:
            with torch.inference_mode():
                model(x)

        return infer
    if opt is None:
        opt = _optimizer(model)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return train_step


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def _inputs(config: ViTConfig, batch: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *config.image_size, generator=g).to(device)
    y = torch.randint(0, max(config.num_classes, 1), (batch,), generator=g).to(device)
    return x, y


def seconds_per_call(step: Callable[[], object], iters: int, sync: Callable[[], None] = lambda: None) -> float:
    """Mean wall-clock seconds of ``iters`` back-to-back calls of ``step`` (``sync`` waits for the device)."""
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return (time.perf_counter() - t0) / iters


@dataclass
class _Case:
    model: str
    library: str
    compiled: bool
    mode: Mode
    batch: int
    step: Callable[[], None]
    iters: int = 1
    seconds: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.library + ("+compile" if self.compiled else "")


def memory_probe(
    *, library: str, config: dict[str, Any], batch: int, mode: Mode, threads: int, device: str = "cpu"
) -> dict[str, Any]:
    """Resident memory of one cold step in *this* process (meant for a fresh subprocess; see the module doc)."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    cfg = ViTConfig.from_dict(config)
    dev = torch.device(device)
    model = build_model(library, cfg).to(dev).train(mode == "train")
    x, y = _inputs(cfg, batch, dev)
    step = _make_step(model, mode, x, y)
    gc.collect()
    if dev.type == "cuda":
        step()  # warm: CUDA's numbers are allocator counts, not pages, so warm-up does not hide anything
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        step()
        torch.cuda.synchronize(dev)
        top = torch.cuda.max_memory_allocated(dev)
        return {"method": "cuda_max_memory_allocated", "peak_mb": top / 2**20, "step_delta_mb": (top - before) / 2**20}
    base = _proc_status_kb("VmRSS")
    reset = _reset_peak_rss()
    step()
    peak = _proc_status_kb("VmHWM")
    if base is None or peak is None:  # no /proc: the process's high-water mark only
        import resource

        return {"method": "ru_maxrss", "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {
        "method": "VmHWM after clear_refs" if reset else "VmHWM (not reset: delta is an upper bound)",
        "peak_rss_mb": peak / 1024,
        "step_rss_delta_mb": (peak - base) / 1024,
    }


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


_PROBE = (
    "import json, sys; from vitlab.bench import memory_probe; "
    "print(json.dumps(memory_probe(**json.loads(sys.argv[1]))))"
)


def _measure_memory(case: _Case, config: ViTConfig, device: str, timeout: float = 1800) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "library": case.library,
        "config": config.to_dict(),
        "batch": case.batch,
        "mode": case.mode,
        "threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        return memory_probe(**spec)
    r = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True, timeout=timeout, check=False
    )
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"memory subprocess failed (exit {r.returncode}): {last}"}
    result: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------------------- running
def run_benchmark(
    settings: BenchSettings, *, command: str = "", log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Measure everything ``settings`` asks for; returns the results document (JSON-serialisable)."""
    say = log or (lambda _msg: None)
    load_before = _load_average()
    device = torch.device(settings.device)
    sync = _sync(device)
    say(f"matmul rate ({settings.matmul_size}x{settings.matmul_size}, {settings.matmul_repeats} timings)")
    rates = matmul_rates(size=settings.matmul_size, repeats=settings.matmul_repeats, device=settings.device)
    peak = fp32_peak_gflops(rates) * 1e9
    modes: list[Mode] = ["inference", "train"] if settings.train else ["inference"]
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for label, config in settings.configs():
        cases = _measure_model(label, config, settings, modes, device, sync, skipped, say)
        forward = flops_per_image(config)
        for case in cases:
            per_image = forward * (TRAIN_FLOP_FACTOR if case.mode == "train" else 1)
            seconds = statistics.median(case.seconds)
            ips = case.batch / seconds
            row: dict[str, Any] = {
                "model": label,
                "library": case.library,
                "compiled": case.compiled,
                "mode": case.mode,
                "batch": case.batch,
                "iters_per_repeat": case.iters,
                "seconds_per_call": case.seconds,
                "images_per_s": ips,
                "latency_ms": 1000 * seconds,
                "gflops_per_image": per_image / 1e9,
                "achieved_gflops": per_image * ips / 1e9,
                "peak_share": per_image * ips / peak,
                "memory": None,
            }
            if settings.memory and not case.compiled:
                say(f"{label} {case.mode} batch {case.batch}: memory of {case.name}")
                row["memory"] = _measure_memory(case, config, settings.device)
            rows.append(row)
        gc.collect()
    _add_ratios(rows)
    return {
        "command": command,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "versions": _versions(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
        "machine": machine_info(device),
        "load_average_1min": {"start": load_before, "end": _load_average()},
        "matmul": rates,
        "peak_gflops": peak / 1e9,
        "settings": _settings_dict(settings),
        "definitions": DEFINITIONS,
        "results": rows,
        "skipped": skipped,
    }


def _measure_model(
    label: str,
    config: ViTConfig,
    settings: BenchSettings,
    modes: Sequence[Mode],
    device: torch.device,
    sync: Callable[[], None],
    skipped: list[dict[str, str]],
    say: Callable[[str], None],
) -> list[_Case]:
    """Build every library's model of ``config``, warm up, then time them in turns, ``repeats`` times."""
    models: dict[tuple[str, bool], nn.Module] = {}
    ours = ("vitlab", GRAD_CKPT) if settings.grad_checkpointing and "train" in modes else ("vitlab",)
    for library in (*ours, *settings.peers):
        torch.manual_seed(0)
        try:
            eager = build_model(library, config).to(device)
        except PeerUnavailable as e:
            skipped.append({"model": label, "library": library, "reason": str(e)})
            continue
        models[(library, False)] = eager
        if settings.compile:
            models[(library, True)] = torch.compile(eager)  # type: ignore[assignment]
    optimizers: dict[str, torch.optim.Optimizer] = {}  # one per library: eager and compiled share the weights
    cases: dict[tuple[Mode, int], list[_Case]] = {}
    for mode in modes:
        for batch in settings.batches:
            x, y = _inputs(config, batch, device)
            group = []
            for (library, compiled), model in models.items():
                if library == GRAD_CKPT and mode != "train":
                    continue  # nothing is checkpointed without gradients
                model.train(mode == "train")
                opt = None
                if mode == "train":
                    opt = optimizers.setdefault(library, _optimizer(model))
                case = _Case(label, library, compiled, mode, batch, _make_step(model, mode, x, y, opt))
                say(f"{label} {mode} batch {batch}: warming up {case.name}")
                try:
                    for _ in range(settings.warmup):
                        case.step()
                    once = seconds_per_call(case.step, 1, sync)
                except Exception as e:  # a peer or torch.compile failing must not sink the others' numbers
                    if library == "vitlab" and not compiled:
                        raise
                    skipped.append({"model": label, "library": case.name, "reason": f"{type(e).__name__}: {e}"})
                    continue
                case.iters = max(1, math.ceil(settings.min_time / max(once, 1e-9)))
                group.append(case)
            cases[(mode, batch)] = group
    for r in range(settings.repeats):
        for (mode, batch), group in cases.items():
            say(f"{label} {mode} batch {batch}: repeat {r + 1}/{settings.repeats}")
            k = r % len(group) if group else 0
            for case in group[k:] + group[:k]:  # a different library goes first in each repeat
                models[(case.library, case.compiled)].train(mode == "train")
                case.seconds.append(seconds_per_call(case.step, case.iters, sync))
    return [case for group in cases.values() for case in group]


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["mode"], row["batch"], row["compiled"]), []).append(row)
    for group in groups.values():
        peers = [r for r in group if r["library"] not in ("vitlab", GRAD_CKPT)]
        best = max(peers, key=lambda r: r["images_per_s"]) if peers else None
        for row in group:
            row["best_peer"] = best["library"] if best else None
            row["ratio_vs_best_peer"] = row["images_per_s"] / best["images_per_s"] if best else None


def _load_average() -> float | None:
    """Other jobs' load: with more runnable threads than cores, timings (tiny models most) are inflated."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _settings_dict(settings: BenchSettings) -> dict[str, Any]:
    d = asdict(settings)
    d["models"] = [m.to_dict() if isinstance(m, ViTConfig) else m for m in settings.models]
    return d


def _versions() -> dict[str, str | None]:
    from vitlab import __version__

    out: dict[str, str | None] = {
        "vitlab": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    for dist in ("timm", "transformers", "torchvision", "numpy"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = None
    return out


def result_header(script: str, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The fields a benchmark script's result file starts with: the command that made it (``python script
    args``, ``argv`` defaulting to this process's arguments), when (UTC), torch's version and threads, and
    the machine (``machine_info``)."""
    args = list(argv) if argv is not None else sys.argv[1:]
    return {
        "command": shlex.join(["python", script, *args]),
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
        "versions": _versions(),
        "torch_threads": torch.get_num_threads(),
        "machine": machine_info(),
    }


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """CPU model and flags of interest (from /proc/cpuinfo), core counts, memory, OS; the GPU if used."""
    info: dict[str, Any] = {
        "cpu_model": platform.processor() or None,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "malloc_keeps_freed_memory": malloc.applied(),  # vitlab.malloc; process-wide: peers timed here share it
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    fields = dict(line.split(":", 1) for line in text.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    if "model name" in fields:
        info["cpu_model"] = fields["model name"]
    if "flags" in fields:
        flags = set(fields["flags"].split())
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
        info["cpu_flags"] = [f for f in wanted if f in flags]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------- reporting
def _bf16_rate_text(m: dict[str, Any]) -> str:
    """The bf16 matmul rate for the table's first line, with its matrix size when smaller than fp32's."""
    if "bfloat16" not in m:
        return ""
    bf16 = m["bfloat16"]
    size = f" (at {bf16['size']}^2)" if bf16["size"] != m["float32"]["size"] else ""
    return f"; bf16 {bf16['gflops_best']:.1f} GFLOP/s{size}"


def format_table(result: dict[str, Any]) -> str:
    """The results as a plain-text table, one block per model and mode."""
    lines = []
    m = result["matmul"]
    lines.append(
        f"torch {result['torch_version']}, {result['threads']} threads, {result['machine'].get('cpu_model')}; "
        f"matmul fp32 torch.mm {m['float32']['gflops_best']:.1f} GFLOP/s"
        + (f", oneDNN {m['float32_onednn']['gflops_best']:.1f}" if "float32_onednn" in m else "")
        + _bf16_rate_text(m)
        + f"; peak = {fp32_peak_gflops(m):.1f}"
    )
    header = (
        f"{'library':<20}{'batch':>6}{'images/s':>11}{'ms/call':>10}{'% peak':>8}  {'vs best peer':<20}{'mem MB':>7}"
    )
    current = None
    for row in result["results"]:
        key = (row["model"], row["mode"])
        if key != current:
            current = key
            lines.append("")
            lines.append(f"{row['model']} {row['mode']} ({row['gflops_per_image']:.2f} GFLOP/image)")
            lines.append(header)
        name = row["library"] + ("+compile" if row["compiled"] else "")
        ratio = "" if row["ratio_vs_best_peer"] is None else f"{row['ratio_vs_best_peer']:.2f}x {row['best_peer']}"
        mem = row["memory"] or {}
        delta = mem.get("step_rss_delta_mb", mem.get("step_delta_mb"))
        mem_text = "" if delta is None else f"{delta:.0f}"
        lines.append(
            f"{name:<20}{row['batch']:>6}{row['images_per_s']:>11.2f}{row['latency_ms']:>10.1f}"
            f"{100 * row['peak_share']:>7.1f}%  {ratio:<20}{mem_text:>7}".rstrip()
        )
    for s in result["skipped"]:
        lines.append(f"skipped {s['library']} for {s['model']}: {s['reason']}")
    load, cpus = result["load_average_1min"], result["machine"].get("usable_cpus")
    busiest = max((v for v in load.values() if v is not None), default=None)
    if busiest is not None and cpus and busiest > 0.5 * cpus:
        lines.append(
            f"note: load average up to {busiest:.1f} on {cpus} CPUs during the run: other jobs were competing, "
            "absolute numbers are low (same-run ratios are the ones to read)"
        )
    return "\n".join(lines)
