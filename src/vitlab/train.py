"""Training and fine-tuning (paper Section 4.1 and Appendix B.1), from one process to many with torchrun.

A run folder always holds a model that ``vitlab.from_pretrained(out)`` loads (``config.json`` +
``model.safetensors``) and the training state for an exact resume (``training_state.pt``: weights,
optimiser, EMA, step, data position and RNG states, read back with ``torch.load(weights_only=True)``).
Every file is replaced atomically, so a ``kill -9`` at any moment leaves the previous checkpoint whole.
SIGINT and SIGTERM finish the current step, save, and stop. A non-finite loss stops the run before the
update is applied; nothing non-finite is written.

Data order: epoch e visits a permutation drawn from a generator seeded with (seed, e); with W processes,
process r takes every W-th index of it. Augmentation and dropout draw from torch's global generator, whose
state is checkpointed. With the same seed and world size, an interrupted and resumed CPU run ends with the
same weights, bit for bit, as an uninterrupted one (unless a time budget binds: its fitted length depends on
the machine's speed, vitlab.budget).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import shutil
import signal
import statistics
import time
from collections.abc import Callable, Iterator, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitlab.augment import BatchAugment
from vitlab.budget import Costs, Schedule, fit, full_patch_cost_ratio
from vitlab.checkpoint import CONFIG_NAME, WEIGHTS_NAME, from_pretrained, save_model
from vitlab.config import Preprocessing
from vitlab.datasets import DATASETS, batches, load_data, normalize_stats
from vitlab.evaluate import evaluate_tensors
from vitlab.io import atomic_path, atomic_write_json, atomic_write_text, check_out_dir
from vitlab.malloc import keep_freed_memory
from vitlab.model import ViT, create_model, onednn_bf16_enabled
from vitlab.optim import MuonAdamW
from vitlab.recipes import TrainConfig

STATE_NAME = "training_state.pt"
RUN_CONFIG_NAME = "run_config.json"
METRICS_NAME = "metrics.jsonl"
RESULTS_NAME = "results.json"
BEST_DIR = "best"
_RUN_FILES = (STATE_NAME, RUN_CONFIG_NAME, METRICS_NAME, RESULTS_NAME, CONFIG_NAME, WEIGHTS_NAME, "curves.png")


class TrainingError(RuntimeError):
    """The run could not go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM: the run saved its state and stopped; ``--resume`` continues it."""

    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"stopped by signal {signum} after step {step}; the state is saved, --resume continues")
        self.signum = signum
        self.step = step


# ------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this run created the process group (and so ends it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group that torchrun set up (gloo on CPU, NCCL on GPU); one process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
    return Dist(rank=rank, world_size=world, local_rank=local, owns_group=owns)


def _device(d: Dist) -> torch.device:
    return torch.device(f"cuda:{d.local_rank}") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------------------- helpers
def param_groups(model: nn.Module, weight_decay: float, exclude: Set[int] = frozenset()) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only: none on norms, biases, position embeddings, class token.
    Parameters whose ``id`` is in ``exclude`` are left out (another group holds them)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        skip = p.ndim <= 1 or name.startswith(("pos_embed", "cls_token")) or "rel_pos" in name
        (no_decay if skip else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, c: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type in ("cuda", "cpu")  # one multi-tensor kernel per step (on CPU too, since torch 2.4)
    if c.optimizer == "muon":  # Muon on the encoder blocks' linear weights, AdamW on the rest (vitlab.optim)
        hidden = [
            m.weight
            for n, m in model.named_modules()
            if n.startswith("blocks.") and isinstance(m, nn.Linear) and m.weight.requires_grad
        ]  # not other 2D parameters of a block (a relative-position bias is no linear map)
        if not hidden:
            raise ValueError(
                f"optimizer muon trains the linear layers of a ViT's encoder blocks; {type(model).__name__} has "
                "none (trainable): use adamw"
            )
        ids = {id(p) for p in hidden}
        rest = param_groups(model, c.weight_decay, exclude=ids)
        muon = {"params": hidden, "weight_decay": c.weight_decay, "muon": True}
        # Newton-Schulz in bf16 where the run trains in bf16 (fast GEMMs), else in fp32
        ns_dtype = torch.bfloat16 if uses_bf16(c.amp, device) else torch.float32
        return MuonAdamW(
            [muon, *rest],
            lr=c.lr,
            betas=c.betas,
            momentum=0.95 if c.momentum is None else c.momentum,
            ns_dtype=ns_dtype,
            fused=fused or None,
        )
    groups = param_groups(model, c.weight_decay)
    if c.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=c.lr, momentum=0.9 if c.momentum is None else c.momentum)
    if c.optimizer == "adam":  # L2 decay through the gradient (coupled); the paper's decoupled decay is adamw
        return torch.optim.Adam(groups, lr=c.lr, betas=c.betas, fused=fused or None)
    return torch.optim.AdamW(groups, lr=c.lr, betas=c.betas, fused=fused or None)


def lr_at(step: int, total: int, warmup: int, c: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine or linear decay to ``min_lr`` (or constant)."""
    if warmup and step < warmup:
        return c.lr * (step + 1) / warmup
    if c.schedule == "constant":
        return c.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if c.schedule == "cosine":
        return c.min_lr + (c.lr - c.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return c.min_lr + (c.lr - c.min_lr) * (1 - progress)


class EMA:
    """Exponential moving average of the weights (Polyak averaging), kept in fp32."""

    def __init__(self, model: ViT, decay: float) -> None:
        self.decay = decay
        self.model: ViT = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, p in zip(self.model.state_dict().values(), model.state_dict().values(), strict=True):
            if e.is_floating_point():
                e.lerp_(p.detach(), 1 - self.decay)
            else:
                e.copy_(p)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Sapphire Rapids and later), where oneDNN's bf16 GEMMs measured
    ~5x its fp32 ones and bf16 autocast trains the Fashion-MNIST models ~1.5x faster (docs/performance.md)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up defensively
    return bool(probe is not None and probe())


def uses_bf16(amp: str, device: torch.device) -> bool:
    """What ``amp`` means on ``device``: ``auto`` is bf16 autocast on CUDA GPUs that support it and on CPUs with
    AMX where vitlab's linear layers run oneDNN's bf16 GEMM, fp32 elsewhere (plain bf16 autocast measured
    slower than fp32 on CPU). Resolved when a run starts or resumes: a run resumed on another machine may change."""
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_amx() and onednn_bf16_enabled()


def _autocast(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class _Signals:
    """Turn SIGINT/SIGTERM into a flag checked after each optimiser step."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    out: Path
    step: int
    best_val_top1: float | None
    test: dict[str, Any] | None = None
    test_best: dict[str, Any] | None = None
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def saved_config(out: str | Path, overwrite: bool = False) -> TrainConfig:
    """The configuration of the run saved in ``out`` (what ``--resume`` continues; ``overwrite`` contradicts it)."""
    out = Path(out)
    prepare_out(out, resume=True, overwrite=overwrite)
    path = out / RUN_CONFIG_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the run's settings {path}: {e}") from e
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a JSON object of settings")
    return TrainConfig.from_dict(saved)


def _absolute_paths(c: TrainConfig) -> TrainConfig:
    """``data`` and ``init_from`` as absolute paths where they name existing files or folders (not dataset or
    registry names), so that ``--resume`` from another working directory finds the same ones."""
    changes: dict[str, str] = {}
    if c.data is not None and c.data not in DATASETS and Path(c.data).expanduser().exists():
        changes["data"] = str(Path(c.data).expanduser().resolve())
    if c.init_from and _is_local_path(c.init_from):
        changes["init_from"] = str(Path(c.init_from).expanduser().resolve())
    return c.replace(**changes) if changes else c


def _is_local_path(source: str) -> bool:
    """Whether ``init_from`` names a file or folder here, not a registry name or URL (which load_checkpoint tries
    first)."""
    from vitlab.hub import REGISTRY

    return source not in REGISTRY and "://" not in source and Path(source).expanduser().exists()


def prepare_out(out: Path, resume: bool, overwrite: bool, delete: bool = True, init_from: str | None = None) -> None:
    """Refuse to mix runs: an --out holding another run needs --resume or --overwrite; a folder holding anything
    else, or the checkpoint the run starts from, is never written into."""
    check_out_dir(out)
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other: continue the run, or replace it")
    has_run = out.is_dir() and any((out / n).exists() for n in (STATE_NAME, RUN_CONFIG_NAME))
    if resume:
        for name in (STATE_NAME, RUN_CONFIG_NAME):
            if not (out / name).is_file():
                raise ValueError(f"--resume: {out} holds no {name} to resume from")
        if delete:
            _remove_stale_temporaries(out)
        return
    source = Path(init_from).expanduser() if init_from and _is_local_path(init_from) else None
    if source is not None:
        o, s = out.resolve(), source.resolve()
        if o == s or o in s.parents:
            raise ValueError(f"--out {out} holds --init-from {init_from}: write the new run somewhere else")
    if has_run and not overwrite:
        raise ValueError(f"{out} already holds a run: pass --resume to continue it or --overwrite to replace it")
    # files of the names a run writes (a saved model, a half-deleted run) are replaced only when asked; anything
    # else in the folder (a log being tee'd, notes, the demo's report) stays and is never touched
    taken = [n for n in (*_RUN_FILES, BEST_DIR, "tensorboard") if (out / n).exists()]
    if taken and not overwrite:
        raise ValueError(
            f"--out {out} holds {', '.join(taken)} but no run to resume (nothing was touched): pass --overwrite to "
            "replace them, or give another folder"
        )
    if taken and overwrite and delete:
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / BEST_DIR, ignore_errors=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        _remove_stale_temporaries(out)


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of atomic writes that a kill -9 interrupted (``.NAME.XXXX.tmp``, vitlab.io): never read."""
    for folder in (out, out / BEST_DIR):
        for name in _RUN_FILES:
            for tmp in folder.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)


RUNTIME_FIELDS = ("compile", "grad_checkpointing")


def train(
    config: TrainConfig | None,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: None,
    runtime: dict[str, bool] | None = None,
) -> TrainResult:
    """Run (or resume) training as ``config`` says, writing everything under ``out``.

    With ``resume`` the run continues with the configuration saved in ``out``: ``config`` may then be None;
    a given one only has its differences from the saved one logged as ignored.
    ``runtime`` sets switches that change speed and memory but not the results (``compile``,
    ``grad_checkpointing``); unlike the rest of ``config`` they apply on resume too, on top of the saved run.
    On Linux with glibc it also sets the process's malloc to keep freed memory for reuse, for good
    (:func:`vitlab.malloc.keep_freed_memory`; ``VITLAB_MALLOC=0`` opts out)."""
    runtime = dict(runtime or {})
    unknown = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"runtime switches are {list(RUNTIME_FIELDS)}, not {unknown}")
    if config is None and not resume:
        raise ValueError("train needs a config unless it resumes a saved run")
    config = config.replace(**runtime) if config is not None else None
    out = Path(out)
    init_from = None
    if config is not None and not resume:
        _ = config.dataset  # a recipe without a default dataset stops here, before anything is written
        config = _absolute_paths(config)  # run_config.json then means the same data from any directory
        init_from = config.init_from
    d = init_distributed()
    prepare_out(out, resume, overwrite, delete=d.main, init_from=init_from)  # every rank checks: all stop together
    _barrier(d)
    if resume:
        saved = saved_config(out).replace(**runtime)
        given = config.to_dict() if config is not None else {}
        ignored = sorted(k for k, v in given.items() if saved.to_dict()[k] != v and k != "recipe")
        log(
            f"resuming {out} with its saved configuration"
            + (f" (ignoring given {', '.join(ignored)})" if ignored else "")
        )
        config = saved
    assert config is not None  # given, or read back from the run on resume
    c = config
    if c.threads:
        torch.set_num_threads(c.threads)
    if keep_freed_memory():  # no page faults for the same activation buffers every step (vitlab.malloc)
        log("glibc malloc keeps freed memory for reuse (VITLAB_MALLOC=0 leaves malloc alone)")
    torch.manual_seed(c.seed + d.rank)
    device = _device(d)

    # ---------------------------------------------------------------- data
    model_size = c.image_size or c.model_overrides.get("image_size")
    data = load_data(
        c.dataset, val_fraction=c.val_fraction, seed=c.seed, image_size=model_size, channels=c.channels, limit=c.limit
    )
    if data.skipped:
        log(f"skipped {len(data.skipped)} unreadable file(s), e.g. {data.skipped[0][0]}: {data.skipped[0][1]}")
    train_set = data.train
    num_classes = len(train_set.class_names)
    _, channels, h, w = train_set.images.shape
    if len(train_set) < c.batch_size * d.world_size:
        raise ValueError(
            f"{len(train_set)} training images are fewer than one batch ({c.batch_size} x {d.world_size} "
            "process(es)): lower --batch-size"
        )

    # --------------------------------------------------------------- model
    arch = {k: v for k, v in c.model_overrides.items() if k != "image_size"}
    if c.init_from:
        # the checkpoint's patch dropout is how it was trained, not what this run asks for (the recipe says)
        arch.setdefault("patch_dropout", 0.0)
        if not c.keep_head:  # keep_head: continue on the same classes (e.g. low-res training, then higher-res)
            arch.setdefault("representation_size", None)  # the paper fine-tunes with a single linear head
            arch["num_classes"] = num_classes
        model = from_pretrained(c.init_from, image_size=(h, w), in_channels=channels, **arch)
        # from_pretrained already fitted the checkpoint's statistics to the channel count
        mean, std = c.mean or model.preprocessing.mean, c.std or model.preprocessing.std
        if c.keep_head:
            _check_kept_head(model, train_set.class_names, c.init_from, log)
        else:
            model.reset_classifier(num_classes)  # the paper: a zero-initialised head for the new task
    else:
        model = create_model(c.model, image_size=(h, w), in_channels=channels, num_classes=num_classes, **arch)
        stats = normalize_stats(train_set)
        mean, std = c.mean or stats[0], c.std or stats[1]
    model.class_names = list(train_set.class_names)
    model.preprocessing = Preprocessing(image_size=(h, w), mean=mean, std=std, interpolation="bicubic")
    model.to(device).train()
    model.set_grad_checkpointing(c.grad_checkpointing)
    ema = EMA(model, c.ema_decay) if c.ema_decay else None
    export = ema.model if ema is not None else model  # what is saved and evaluated
    optimizer = build_optimizer(model, c, device)

    micro_per_epoch = len(train_set) // (c.batch_size * d.world_size)
    if micro_per_epoch < c.accum_steps:
        raise ValueError(
            f"{len(train_set)} training images give {micro_per_epoch} micro-batch(es) of {c.batch_size} x "
            f"{d.world_size} per epoch, fewer than accum_steps={c.accum_steps}: lower --batch-size or --accum-steps"
        )
    steps_per_epoch = max(1, micro_per_epoch // c.accum_steps)
    total = c.max_steps or max(1, math.ceil(c.epochs * steps_per_epoch))
    warmup = c.warmup_steps if c.warmup_steps is not None else round(c.warmup_epochs * steps_per_epoch)
    warmup = _warmup_within(warmup, total, f"the run ({total} steps)", log)
    full_patch = round(c.full_patch_epochs * steps_per_epoch)  # the last steps, on every patch
    # a recipe's closing full-patch epochs are moot when a run drops no patches or is too short (a quick
    # --max-steps try): said, not refused, as for the warm-up
    if full_patch and model.config.patch_dropout == 0:
        log(f"full_patch_epochs={c.full_patch_epochs} has nothing to turn off: the model drops no patches")
        full_patch = 0
    if full_patch >= total:  # total >= 1, so 0 never gets here
        log(
            f"full_patch_epochs={c.full_patch_epochs} ({full_patch} steps) is not shorter than the run "
            f"({total} steps): patch dropout stays on to the end"
        )
        full_patch = 0

    cap = Schedule(total, full_patch)  # what the epochs give; a time budget may shorten it (vitlab.budget)
    step, epoch, micro_pos, best_val = 0, 0, 0, -1.0
    seconds_before, fitted, stopped_by_budget = 0.0, False, False  # training seconds of earlier sessions
    last_checkpoint, last_validation = 0.0, 0.0  # seconds the latest of each took, for the time budget
    step_cost = 0.0  # seconds a step takes, as last fitted
    if resume:
        try:
            state = torch.load(out / STATE_NAME, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:
            raise ValueError(
                f"cannot read {out / STATE_NAME} (truncated or corrupt?): {str(e).splitlines()[0] if str(e) else e!r}"
            ) from e
        if state["world_size"] != d.world_size:
            raise ValueError(f"the run was saved with {state['world_size']} process(es); resume with the same number")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.model.load_state_dict(state["ema"])
        step, epoch, micro_pos, best_val = state["step"], state["epoch"], state["micro_pos"], state["best_val"]
        seconds_before = state.get("train_seconds", 0.0)  # up to the last checkpoint: a kill -9 loses the rest
        warmup = state.get("warmup", warmup)
        if c.time_budget and state.get("budget_fitted"):  # the schedule fitted in an earlier session
            total, full_patch, fitted = state["total"], state["full_patch"], True
        if c.time_budget and state.get("budget_stopped"):  # the budget was spent: nothing more to train
            total, stopped_by_budget = step, True
        _restore_rng(state["rng"][d.rank], device)
        log(f"resumed at step {step} (epoch {epoch}, batch {micro_pos})")

    net: nn.Module = model
    if d.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[d.local_rank] if device.type == "cuda" else None)
    fwd: Callable[[Tensor], Tensor] = _CompiledOrEager(net, log) if c.compile else net
    augment = BatchAugment(c.augment, mean, std, num_classes)

    metrics = _Metrics(out, step, d.main)
    bf16 = uses_bf16(c.amp, device)  # once per run (also the probe of the CPU)
    if d.main:
        atomic_write_json(out / RUN_CONFIG_NAME, c.to_dict())
        mc = model.config
        log(
            f"{c.recipe}: {c.model} (patch {mc.patch_size}, width {mc.hidden_dim}, depth {mc.num_layers}, "
            f"{mc.num_heads} heads, MLP {mc.mlp_dim}, {h}x{w} input) "
            f"{sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{len(train_set)} train / {len(data.val)} val images, {total} steps of "
            f"{c.batch_size}x{d.world_size}x{c.accum_steps} (global batch "
            f"{c.batch_size * d.world_size * c.accum_steps}), {steps_per_epoch} steps per epoch, "
            f"{'bf16 autocast' if bf16 else 'fp32'} (--amp {c.amp})"
        )

    def save() -> None:
        nonlocal last_checkpoint
        t0 = time.perf_counter()
        rngs = _gather_rng(d, device)
        if not d.main:
            return
        metrics.flush()  # first: rows past the saved step are dropped on resume, missing ones never come back
        state = {
            "step": step,
            "epoch": epoch,
            "micro_pos": micro_pos,
            "best_val": best_val,
            "world_size": d.world_size,
            "total": total,
            "full_patch": full_patch,
            "warmup": warmup,
            "budget_fitted": fitted,
            "budget_stopped": stopped_by_budget,
            "train_seconds": seconds_before + time.perf_counter() - started,
            "model": model.state_dict(),
            "ema": ema.model.state_dict() if ema is not None else None,
            "optimizer": optimizer.state_dict(),
            "rng": rngs,
        }
        with atomic_path(out / STATE_NAME) as tmp:
            torch.save(state, tmp)
        save_model(export, out)
        last_checkpoint = time.perf_counter() - t0

    def validate() -> dict[str, Any]:
        if len(data.val) == 0:
            return {}
        r = evaluate_tensors(export, data.val.images, data.val.labels, mean, std, c.eval_batch_size, device)
        return {"val_top1": r["top1"], "val_loss": r["loss"]}

    def validation_pass() -> None:  # rank 0 alone logs and selects the best model
        nonlocal best_val, last_validation
        t0 = time.perf_counter()
        v = validate()
        if v:
            metrics.add({"step": step, "epoch": epoch + micro_pos / micro_per_epoch, **v})
            log(f"step {step}: val top-1 {v['val_top1']:.4f}")
            if v["val_top1"] > best_val:
                best_val = v["val_top1"]
                save_model(export, out / BEST_DIR)
        last_validation = time.perf_counter() - t0

    def spent() -> float:
        return seconds_before + time.perf_counter() - started

    def fit_to_budget(measured: float) -> None:
        """Fix the step count that fits the rest of the budget at the measured costs (rank 0's decide)."""
        nonlocal total, full_patch, warmup, fitted, step_cost
        step_cost = measured
        assert c.time_budget is not None
        mc = model.config
        ratio = 1.0  # called while patches are dropped (if the model drops any): full-patch steps cost more
        if mc.patch_dropout > 0:
            kept = mc.kept_patches(mc.num_patches)
            ratio = full_patch_cost_ratio(mc.num_patches, kept, mc.num_prefix_tokens, mc.hidden_dim, mc.mlp_dim)
        costs = Costs(
            step=step_cost,
            full_patch_ratio=ratio,
            recompile=max(0.0, first_step - step_cost) if c.compile else 0.0,
            validation=last_validation,
            checkpoint=last_checkpoint,
        )
        plan = fit(
            step,
            cap,
            c.time_budget - spent(),
            costs,
            eval_every=eval_every_steps,
            steps_per_epoch=steps_per_epoch,
            checkpoint_every=c.checkpoint_every,
        )
        before, first = total, not fitted
        total, full_patch = _broadcast_ints([plan.total, plan.full_patch], d)
        fitted = True
        if first:
            log(
                f"step {step}: time budget {c.time_budget:g} s, {spent():.1f} s spent; a step takes "
                f"{1000 * step_cost:.0f} ms, a validation {costs.validation:.1f} s, a checkpoint "
                f"{costs.checkpoint:.2f} s: {total} of {cap.total} steps fit ({total / steps_per_epoch:.2f} epochs"
                + (f", the last {full_patch} on every patch)" if full_patch else ")")
            )
        elif total != before:
            log(
                f"step {step}: {spent():.1f} of {c.time_budget:g} s spent, a step takes {1000 * step_cost:.0f} ms: "
                f"{total} steps fit (was {before})"
            )
        warmup = _warmup_within(warmup, total, "the fitted run", log)
        bar_to_total()

    def bar_to_total() -> None:
        if bar is not None:
            bar.total = total
            bar.refresh()

    started = time.perf_counter()
    if not resume:
        save()  # from the first moment, the folder holds a loadable model and a resumable state
    bar = None
    if progress and d.main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)
    t_last, seen_last = time.perf_counter(), 0
    session_start, first_step, durations = step, 0.0, []  # step times of this session, for the time budget
    eval_every_steps = max(1, round(c.eval_every * steps_per_epoch))
    run_loss, run_correct, run_n = 0.0, 0, 0
    with _Signals() as signals:
        while step < total:
            for images, labels in _epoch_batches(train_set, c, d, epoch, micro_pos):
                if full_patch and step >= total - full_patch and model.drop_patches:
                    # the saved config keeps its patch_dropout (how the model was trained); a compiled forward
                    # recompiles once for the longer sequence
                    log(f"step {step}: patch dropout off for the last {total - step} steps (full_patch_epochs)")
                    model.drop_patches = False
                # augment on the CPU (per-image random draws from the checkpointed CPU generator), then move
                x, target = augment(images, labels)
                x, target, labels = x.to(device), target.to(device), labels.to(device)
                last_micro = (micro_pos + 1) % c.accum_steps == 0
                # DDP: no gradient all-reduce until the last micro-batch of an accumulation group
                sync: contextlib.AbstractContextManager[Any] = (
                    net.no_sync() if d.world_size > 1 and not last_micro else contextlib.nullcontext()  # type: ignore[operator]
                )
                with sync:
                    with _autocast(bf16, device):
                        logits = fwd(x)
                        loss = F.cross_entropy(logits.float(), target, label_smoothing=c.label_smoothing)
                    if _any_rank(not bool(torch.isfinite(loss)), d):  # every rank stops together
                        raise TrainingError(
                            f"non-finite loss at step {step + 1}: stopped before applying it; the last good "
                            f"checkpoint in {out} is kept (lower --lr or check the data)"
                        )
                    (loss / c.accum_steps).backward()
                micro_pos += 1
                hard = target if target.ndim == 1 else target.argmax(1)
                run_loss += loss.item() * len(labels)
                run_correct += int((logits.argmax(1) == hard).sum())
                run_n += len(labels)
                seen_last += len(labels) * d.world_size
                if not last_micro:
                    continue
                for g in optimizer.param_groups:
                    g["lr"] = lr_at(step, total, warmup, c)
                grad_norm = _clip(model, c.clip_grad)
                if not math.isfinite(grad_norm):
                    raise TrainingError(
                        f"non-finite gradient norm at step {step + 1}: stopped before applying it; "
                        f"the last good checkpoint in {out} is kept"
                    )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                step += 1
                now = time.perf_counter()
                ips = seen_last / max(now - t_last, 1e-9)
                if step == session_start + 1:
                    first_step = now - t_last  # compilation included
                elif step > session_start + 3:
                    durations.append(now - t_last)
                # stop when another step would leave no room for the closing validation and checkpoint
                closing = step_cost + last_validation + last_checkpoint
                if c.time_budget and step < total and _any_rank(spent() + closing > c.time_budget, d):
                    log(f"step {step}: the time budget of {c.time_budget:g} s is spent: stopping {total - step} early")
                    total, stopped_by_budget = step, True
                    bar_to_total()
                row = {
                    "step": step,
                    "epoch": epoch + micro_pos / micro_per_epoch,
                    "loss": run_loss / max(run_n, 1),
                    "train_top1": run_correct / max(run_n, 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "grad_norm": grad_norm,
                    "images_per_s": ips,
                }
                metrics.add(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['train_top1']:.3f}", ips=f"{ips:.0f}")
                seen_last = 0
                run_loss, run_correct, run_n = 0.0, 0, 0
                end_of_epoch = micro_pos >= micro_per_epoch - (micro_per_epoch % c.accum_steps)
                validated = step % eval_every_steps == 0 or step == total
                if validated and d.main:
                    validation_pass()
                interrupted = _any_rank(signals.received is not None, d)
                if end_of_epoch:
                    epoch, micro_pos = epoch + 1, 0
                if (
                    (c.checkpoint_every and step % c.checkpoint_every == 0)
                    or end_of_epoch
                    or interrupted
                    or step == total
                ):
                    save()
                if c.time_budget and step < total and model.drop_patches:  # measured steps: the phase they fit
                    if not fitted:
                        # 20 steps past compilation and 5% of the budget (at most 30 s), then time the other work
                        enough = len(durations) >= 20 and sum(durations) >= min(30.0, 0.05 * c.time_budget)
                        if _any_rank(enough, d):
                            save()
                            if d.main:  # timed only: a pass at a machine-dependent step selects nothing
                                t0 = time.perf_counter()
                                validate()
                                last_validation = time.perf_counter() - t0
                            fit_to_budget(statistics.median(durations))
                            durations.clear()
                    elif validated and len(durations) >= 10:  # fit again at each validation: the machine drifts
                        fit_to_budget(statistics.median(durations))
                        durations.clear()
                t_last = time.perf_counter()  # images/s counts training only, not validation or saving
                if interrupted:
                    if bar is not None:
                        bar.close()
                    raise TrainingInterrupted(signals.received or signal.SIGTERM, step)
                if step >= total or end_of_epoch:
                    break
            else:  # the epoch ran out of micro-batches without an optimiser step closing it
                epoch, micro_pos = epoch + 1, 0
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - started

    result = TrainResult(out=out, step=step, best_val_top1=best_val if best_val >= 0 else None, train_seconds=elapsed)
    if d.main:
        if data.test is not None and len(data.test):
            t = data.test
            result.test = evaluate_tensors(export, t.images, t.labels, mean, std, c.eval_batch_size, device)
            if (out / BEST_DIR / WEIGHTS_NAME).is_file():
                best = from_pretrained(out / BEST_DIR)
                result.test_best = evaluate_tensors(best, t.images, t.labels, mean, std, c.eval_batch_size, device)
        summary = {
            "step": step,
            "train_seconds_this_session": round(elapsed, 1),
            "best_val_top1": result.best_val_top1,
            "test_top1_last": result.test["top1"] if result.test else None,
            "test_top5_last": result.test["top5"] if result.test else None,
            "test_top1_best_val": result.test_best["top1"] if result.test_best else None,
        }
        if c.time_budget:
            summary |= {"time_budget": c.time_budget, "stopped_by_time_budget": stopped_by_budget}
        metrics.add({"final": True, **summary})
        metrics.flush()
        atomic_write_json(out / RESULTS_NAME, summary)
        _plot_curves(out)
    # the other ranks wait for rank 0's test pass, so that no process leaves while the group is in use. (The
    # gloo group's threads outlive destroy_process_group once DDP has held it: the CLI skips the interpreter's
    # teardown under torchrun for that reason, see cli._exit_without_teardown.)
    _barrier(d)
    if d.owns_group:
        import torch.distributed as dist

        dist.destroy_process_group()
    return result


class _CompiledOrEager:
    """``torch.compile(net)``, unless compiling fails on the first batch (on CPU, inductor needs a C++
    compiler): then the run says why and goes on eagerly. Later failures are real errors and propagate."""

    def __init__(self, net: nn.Module, log: Callable[[str], None]) -> None:
        self.eager = net
        self.compiled: Callable[[Tensor], Tensor] = torch.compile(net)
        self.log = log
        self.chosen: Callable[[Tensor], Tensor] | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.chosen is not None:
            return self.chosen(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # inductor raises many types (BackendCompilerFailed, InvalidCxxCompiler, ...)
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            self.log(f"torch.compile failed ({type(e).__name__}: {reason}); training without it")
            self.chosen = self.eager
            return self.eager(x)
        self.chosen = self.compiled
        return out


def _check_kept_head(model: ViT, class_names: Sequence[str], source: str, log: Callable[[str], None]) -> None:
    """keep_head continues a classifier by output index: the class count must match the data's. Different class
    names are logged, not refused: the same classes may be spelt differently (an ImageNet checkpoint's lemmas
    against a folder's synset ids)."""
    k = model.config.num_classes
    if k != len(class_names):
        raise ValueError(
            f"--keep-head: {source} has {k} output(s) but the data has {len(class_names)} classes; "
            "drop --keep-head to train a new head"
        )
    if model.class_names is None:
        log(f"--keep-head: {source} names no classes; its outputs are taken to be the data's classes in order")
        return
    differ = [i for i, (a, b) in enumerate(zip(model.class_names, class_names, strict=True)) if a != b]
    if differ:
        i = differ[0]
        log(
            f"--keep-head: warning: {len(differ)} of {k} class names differ between {source} and the data, first "
            f"at index {i} ({model.class_names[i]!r} vs {class_names[i]!r}); outputs are kept by index"
        )


def _warmup_within(warmup: int, total: int, run: str, log: Callable[[str], None]) -> int:
    """The warm-up, or a tenth of ``run`` (said in the log) when it is not shorter than the run's ``total`` steps."""
    if warmup < total:
        return warmup
    log(f"warm-up of {warmup} steps is not shorter than {run}: using {total // 10}")
    return total // 10


def _clip(model: nn.Module, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm is None:  # the norm is still logged: one fused (foreach) reduction over all gradients
        norms = torch._foreach_norm([p.grad for p in params])  # type: ignore[misc]
        return float(torch.linalg.vector_norm(torch.stack(norms)))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _epoch_batches(data: Any, c: TrainConfig, d: Dist, epoch: int, start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Micro-batches of epoch ``epoch`` for this process, from micro-batch ``start`` on: the epoch's order is
    a function of (seed, epoch) alone, so a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(c.seed * 1_000_003 + epoch)
    return batches(
        data, c.batch_size, shuffle=True, generator=g, drop_last=True, start=start, rank=d.rank, world_size=d.world_size
    )


def _barrier(d: Dist) -> None:
    if d.world_size > 1:
        import torch.distributed as dist

        dist.barrier()


def _gather_rng(d: Dist, device: torch.device) -> list[dict[str, Tensor]]:
    """Every process's generator states: the CPU one (augmentation, drop path on CPU) and, on a GPU, the
    device's (dropout and drop path draw there)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if d.world_size == 1:
        return [state]
    import torch.distributed as dist

    states: list[Any] = [None] * d.world_size
    dist.all_gather_object(states, state)
    return states


def _restore_rng(saved: Tensor | dict[str, Tensor], device: torch.device) -> None:
    if isinstance(saved, Tensor):  # runs saved before the GPU generator was kept: CPU state only
        saved = {"cpu": saved}
    torch.set_rng_state(saved["cpu"])
    if device.type == "cuda" and "cuda" in saved:
        torch.cuda.set_rng_state(saved["cuda"], device)


def _broadcast_ints(values: list[int], d: Dist) -> list[int]:
    """Rank 0's ``values`` on every rank."""
    if d.world_size == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64, device=_device(d))  # NCCL takes GPU tensors only
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


def _any_rank(flag: bool, d: Dist) -> bool:
    if d.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=_device(d))  # NCCL takes GPU tensors only
    dist.all_reduce(t)
    return bool(t.item() > 0)


class _Metrics:
    """metrics.jsonl: one JSON object per step and per validation. On resume, rows after the
    checkpointed step are dropped first, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, step: int, main: bool) -> None:
        self.path = out / METRICS_NAME
        self.main = main
        self.pending: list[dict[str, Any]] = []
        self.writer: Any = None
        if not main:
            return
        kept: list[str] = []
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    if json.loads(line).get("step", 0) <= step and not json.loads(line).get("final"):
                        kept.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.writer = None

    def add(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        self.pending.append(row)
        if self.writer is not None and "step" in row:
            for k, v in row.items():
                if isinstance(v, float) and k not in ("step", "epoch"):
                    self.writer.add_scalar(k, v, row["step"])
        if len(self.pending) >= 50:
            self.flush()

    def flush(self) -> None:
        if not self.main or not self.pending:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            for row in self.pending:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.pending.clear()
        if self.writer is not None:
            self.writer.flush()


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _plot_curves(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    vals = [r for r in rows if "val_top1" in r]
    if not steps:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, label="train loss")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.legend()
    b.plot([r["step"] for r in steps], [r["train_top1"] for r in steps], lw=0.6, alpha=0.6, label="train (augmented)")
    if vals:
        b.plot([r["step"] for r in vals], [r["val_top1"] for r in vals], "o-", label="validation")
    b.set_xlabel("step")
    b.set_ylabel("top-1 accuracy")
    b.legend()
    fig.tight_layout()
    with atomic_path(out / "curves.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
