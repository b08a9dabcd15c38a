"""``vitlab train``: train from scratch or fine-tune, on one process or many (torchrun)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from vitlab.augment import AugmentConfig
from vitlab.commands._args import image_size
from vitlab.config import REGULARISATION_FIELDS

DEFAULT_RECIPE = "fashion-mnist-demo"

# flag -> TrainConfig field, for the fields people change most; --set reaches every field
_FLAGS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "--data": ("data", str),
    "--model": ("model", str),
    "--init-from": ("init_from", str),
    "--lr": ("lr", float),
    "--epochs": ("epochs", float),
    "--max-steps": ("max_steps", int),
    "--time-budget": ("time_budget", float),
    "--batch-size": ("batch_size", int),
    "--accum-steps": ("accum_steps", int),
    "--seed": ("seed", int),
    "--checkpoint-every": ("checkpoint_every", int),
    "--image-size": ("image_size", image_size),
    "--optimizer": ("optimizer", str),
    "--weight-decay": ("weight_decay", float),
    "--warmup-steps": ("warmup_steps", int),
    "--warmup-epochs": ("warmup_epochs", float),
    "--schedule": ("schedule", str),
    "--clip-grad": ("clip_grad", float),
    "--label-smoothing": ("label_smoothing", float),
    "--ema": ("ema_decay", float),
    "--amp": ("amp", str),
    "--limit": ("limit", int),
    "--val-fraction": ("val_fraction", float),
    "--threads": ("threads", int),
}

_HELP = {
    "image_size": "resize the images to N or HxW (a multiple of the patch size)",
    "time_budget": "at most this many seconds of training: the run's epochs are shortened to fit where the CPU is "
    "too slow for them (--set time_budget=null: none)",
}


def add_parser(sub: Any) -> None:
    from vitlab.recipes import RECIPES

    p = sub.add_parser(
        "train",
        help="train or fine-tune a ViT",
        description="Train from scratch or fine-tune. Multi-process: torchrun --nproc-per-node N -m vitlab train ...",
    )
    p.add_argument(
        "--recipe", default=None, choices=sorted(RECIPES), help=f"named recipe to start from (default {DEFAULT_RECIPE})"
    )
    p.add_argument("--out", help="run folder (model, training state, metrics); not needed with --print-config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    for flag, (name, kind) in _FLAGS.items():
        p.add_argument(flag, dest=name, type=kind, default=None, help=_HELP.get(name, f"override {name}"))
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the model (the demo recipes do; --no-compile trains eagerly)",
    )
    p.add_argument(
        "--grad-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recompute each block's activations in the backward pass (less memory, about 1/3 more compute)",
    )
    p.add_argument(
        "--keep-head",
        action="store_true",
        default=None,
        help="with --init-from: keep the model's classifier (same classes, e.g. continuing at a higher resolution)",
    )
    p.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override any field (JSON values): e.g. --set augment.mixup_alpha=0.8 --set model.num_layers=8",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace) -> Any:
    from vitlab.recipes import TrainConfig, coerce, get_recipe

    config = get_recipe(args.recipe or DEFAULT_RECIPE)
    changes: dict[str, Any] = {}
    for name, _ in _FLAGS.values():
        value = getattr(args, name, None)
        if value is not None:
            changes[name] = value
    if args.compile is not None:
        changes["compile"] = args.compile
    if args.grad_checkpointing is not None:
        changes["grad_checkpointing"] = args.grad_checkpointing
    if args.keep_head:
        changes["keep_head"] = True
    aug = dataclasses.asdict(config.augment)
    model = dict(config.model_overrides)
    init_from, preset = _given(args, "init_from"), _given(args, "model")  # --set wins over the flag, as below
    new_start = init_from is not None and init_from != config.init_from
    if new_start or (preset is not None and preset != config.model):
        # a new preset, or a checkpoint whose weights fix the architecture: keep only the recipe's
        # regularisation and input-size overrides (--set model.X still applies on top)
        model = {k: v for k, v in model.items() if k == "image_size" or k in REGULARISATION_FIELDS}
    # a whole model_overrides object applies first, so that model.X settings refine it in any order
    sets = sorted(args.sets, key=lambda item: not item.startswith("model_overrides="))
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not FIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare string
        if isinstance(value, list):
            value = tuple(value)
        if key.startswith("augment."):
            if key[8:] not in aug:
                raise ValueError(f"unknown augmentation field {key[8:]!r}; fields are {sorted(aug)}")
            aug[key[8:]] = coerce(AugmentConfig, key[8:], value)
        elif key.startswith("model."):
            model[key[6:]] = value
        elif key == "model_overrides":
            if not isinstance(value, dict):
                raise ValueError(f"--set model_overrides needs a JSON object, got {raw!r}")
            model = dict(value)
        else:
            changes[key] = coerce(TrainConfig, key, value)
    changes["augment"] = AugmentConfig(**aug)
    changes["model_overrides"] = model
    return config.replace(**changes)


def _given(args: argparse.Namespace, name: str) -> Any:
    """The value a field is given on the command line: its last ``--set name=...``, else its flag, else None."""
    for item in reversed(args.sets):
        key, sep, raw = item.partition("=")
        if sep and key == name:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                return raw
    return getattr(args, name, None)


def _same_as_saved(given: str, args: argparse.Namespace, saved: dict[str, Any]) -> bool:
    """Whether a flag given on --resume repeats the run's saved value (then there is nothing to ignore)."""
    field = _FLAGS.get(given, (None, None))[0]
    if field is None or field not in saved:
        return False
    value = getattr(args, field)
    return bool(saved[field] == (list(value) if isinstance(value, tuple) else value))


def _given_settings(args: argparse.Namespace) -> list[str]:
    """The result-changing options given on the command line (flags and --set items), as typed."""
    given = ["--recipe"] if args.recipe is not None else []
    given += [flag for flag, (name, _) in _FLAGS.items() if getattr(args, name) is not None]
    if args.keep_head:
        given.append("--keep-head")
    return given + [f"--set {item}" for item in args.sets]


def run(args: argparse.Namespace) -> int:
    from vitlab.recipes import TrainConfig
    from vitlab.train import RUNTIME_FIELDS, TrainingError, TrainingInterrupted, saved_config, train

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.out is None and (args.resume or not args.print_config):
        raise ValueError("--out is required: the run folder to " + ("resume" if args.resume else "write"))
    # switches given explicitly apply on --resume too (they change speed and memory, not results); on a new
    # run the resolved config has them (where --set may have refined the flag)
    given_runtime = [k for k in RUNTIME_FIELDS if getattr(args, k) is not None]
    rank0 = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone speaks for the run
    config: TrainConfig | None = None
    if args.resume:
        # the run continues as it was saved: settings that change results are named, not even validated
        saved = saved_config(args.out, overwrite=args.overwrite)  # a clear error when --out holds no run
        saved = saved.replace(**{k: getattr(args, k) for k in given_runtime})
        if args.print_config:
            print(json.dumps(saved.to_dict(), indent=2))
            return 0
        saved_dict = saved.to_dict()
        ignored = [g for g in _given_settings(args) if not _same_as_saved(g, args, saved_dict)]
        if ignored and rank0:
            log(f"--resume continues the saved configuration; ignoring {', '.join(ignored)}")
    else:
        config = resolve_config(args)
        if args.print_config:
            print(json.dumps(config.to_dict(), indent=2))
            return 0
    runtime = {k: getattr(config if config is not None else args, k) for k in given_runtime}
    try:
        result = train(
            config,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            log=log,
            runtime=runtime,
        )
    except TrainingInterrupted as e:
        log(str(e))
        return 128 + int(e.signum)
    except TrainingError as e:
        log(f"vitlab train: error: {e}")
        return 1
    if not rank0:  # the summary is rank 0's: the others have no test pass
        return 0
    summary = {
        "out": str(result.out),
        "step": result.step,
        "train_seconds": round(result.train_seconds, 1),
        "best_val_top1": result.best_val_top1,
        "test_top1": result.test["top1"] if result.test else None,
        "test_top1_best_val": result.test_best["top1"] if result.test_best else None,
    }
    print(json.dumps(summary))
    return 0
