"""``vitlab evaluate``: top-1, top-5, per-class accuracy and a confusion matrix on a dataset split."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from vitlab.commands._args import note_assumed_preprocessing, require_positive
from vitlab.io import check_out_dir


def add_parser(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a checkpoint on a dataset split")
    p.add_argument("source", help="a checkpoint: vitlab run folder, file, registry name or URL")
    p.add_argument("--data", required=True, help="fashion-mnist, mnist, cifar10, cifar100 or an image folder")
    p.add_argument(
        "--split",
        choices=["test", "val", "all"],
        default="test",
        help="all: every image of the data, whatever its split (e.g. a folder of class folders that is a test set)",
    )
    p.add_argument("--val-fraction", type=float, default=None, help="default: the run's, else 0.1")
    p.add_argument("--seed", type=int, default=None, help="default: the run's, else 0")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, default=None, help="as training's --limit (default: the run's, else all)")
    p.add_argument(
        "--tta",
        choices=["none", "hflip"],
        default="none",
        help="test-time augmentation: hflip averages the probabilities of each image and its mirror",
    )
    p.add_argument("--out", default=None, help="folder for metrics.json and confusion.png")
    p.add_argument("--num-heads", type=int, default=None, help="head count, for bare state dicts")
    p.add_argument("--json", action="store_true", help="last line of stdout: one JSON object")
    p.set_defaults(func=run)


def class_mapping(model_names: list[str] | None, data_names: list[str], num_classes: int) -> list[int]:
    """For each dataset class, the model's output index.

    By name when the model has names and the dataset's are among them. When none of them is (e.g. ImageNet's
    folder ids against a model's readable names) or the model has no names, in order, which needs as many
    dataset classes as outputs. Some names matching and others not is an error: mapping those in order
    would silently score classes against the wrong outputs."""
    if model_names:
        index = {n: i for i, n in enumerate(model_names)}
        # a folder cannot be named "T-shirt/top": a name matches up to case and punctuation when that is unique
        keys = [_name_key(n) for n in model_names]
        unique = Counter(keys)
        for i, key in enumerate(keys):
            if unique[key] == 1:
                index.setdefault(key, i)
        found = {n: index.get(n, index.get(_name_key(n))) for n in data_names}
        missing = [n for n, i in found.items() if i is None]
        if not missing:
            used = Counter(found.values())
            same = [n for n, i in found.items() if used[i] > 1]
            if same:
                raise ValueError(
                    f"dataset classes {', '.join(map(repr, same))} all name the same model class: merge or rename "
                    "those folders"
                )
            return [i for i in found.values() if i is not None]
        if len(missing) < len(data_names):
            raise ValueError(
                f"dataset class(es) {', '.join(map(repr, missing[:5]))}{'...' if len(missing) > 5 else ''} are not "
                f"among the model's class names, while {len(data_names) - len(missing)} other(s) are: rename those "
                "folders to the model's names"
            )
    if len(data_names) != num_classes:
        named = "none of the dataset's class names is the model's" if model_names else "the model has no class names"
        raise ValueError(
            f"{named}, so classes can only be mapped in order, which needs as many dataset classes as outputs: "
            f"the dataset has {len(data_names)}, the model {num_classes}"
        )
    return list(range(len(data_names)))


def _same_data(saved: Any, given: str) -> bool:
    """Whether a run's saved ``data`` (an absolute path when it names a folder) is the ``--data`` given here."""
    if not isinstance(saved, str) or saved == given:
        return saved == given
    try:
        return Path(saved).expanduser().resolve() == Path(given).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _name_key(name: str) -> str:
    """A class name without case, spaces and punctuation ("T-shirt/top" and the folder "t-shirt_top" agree)."""
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def _present_splits(spec: str) -> tuple[str, ...]:
    """Every split of the data: all three, or the split folders of a folder without train/ (ImageNet's val/)."""
    from vitlab.datasets import DATASETS, SPLITS

    root = Path(spec).expanduser()
    if spec not in DATASETS and root.is_dir() and not (root / "train").is_dir():
        return tuple(s for s in SPLITS if (root / s).is_dir()) or SPLITS
    return SPLITS


def _run_config(source: Path) -> dict[str, Any]:
    path = source / "run_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def run(args: argparse.Namespace) -> int:
    import torch

    from vitlab.checkpoint import from_pretrained
    from vitlab.datasets import ImageTensors, load_data
    from vitlab.evaluate import accuracy_metrics, predict_logits

    require_positive(args, "batch_size")
    if args.out:
        check_out_dir(args.out)
    overrides = {"num_heads": args.num_heads} if args.num_heads else {}
    model = from_pretrained(args.source, **overrides).eval()
    note_assumed_preprocessing(args.source, model)
    if not model.config.num_classes:
        raise ValueError(f"{args.source} has no classification head (num_classes=0): nothing to evaluate")
    pre = model.preprocessing
    # a run folder knows how its validation split was carved: the same seed, fraction and limit find it again
    run = _run_config(Path(args.source))
    if run and not _same_data(run.get("data"), args.data):
        print(
            f"note: {args.source} was trained on {run.get('data')}, not {args.data}: its val split settings (seed, "
            "fraction, limit) are not applied",
            file=sys.stderr,
        )
        run = {}
    val_fraction = args.val_fraction if args.val_fraction is not None else run.get("val_fraction", 0.1)
    data = load_data(
        args.data,
        val_fraction=val_fraction,
        seed=args.seed if args.seed is not None else run.get("seed", 0),
        image_size=model.config.image_size,
        channels=model.config.in_channels,
        limit=args.limit if args.limit is not None else run.get("limit"),
        preprocessing=pre,  # folders: resize and centre-crop as the checkpoint says, as `vitlab predict` does
        splits=_present_splits(args.data) if args.split == "all" else (args.split,),  # decode only what is scored
    )
    split: ImageTensors | None
    if args.split == "all":  # every image once: the splits partition the data
        parts = [s for s in (data.train, data.val, data.test) if s is not None]
        images, labels = torch.cat([s.images for s in parts]), torch.cat([s.labels for s in parts])
        split = ImageTensors(images, labels, data.train.class_names)
    else:
        split = data.test if args.split == "test" else data.val
    if split is None or len(split) == 0:
        readable = f" with readable images ({len(data.skipped)} skipped)" if data.skipped else ""
        others = " or ".join(s for s in ("test", "val", "all") if s != args.split)
        root = Path(args.data).expanduser()
        if args.split != "all" and root.is_dir() and not (root / args.split).is_dir() and val_fraction > 0:
            fewest = math.ceil(0.5 / val_fraction)  # floor(fraction * n + 0.5) >= 1
            readable += (
                f" (without a {args.split}/ folder it is carved as {val_fraction} of each class, which gives no "
                f"image of a class with fewer than {fewest})"
            )
        raise ValueError(f"{args.data} has no {args.split} split{readable}; try --split {others}")
    for note in data.notes:
        print(f"note: {note}", file=sys.stderr)
    for path, reason in data.skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    mapping = torch.tensor(class_mapping(model.class_names, split.class_names, model.config.num_classes))
    logits = predict_logits(model, split.images, pre.mean, pre.std, args.batch_size, tta=args.tta)
    logits = logits[:, mapping]  # restrict to the dataset's classes, in its order
    m = accuracy_metrics(logits, split.labels)
    result: dict[str, Any] = {
        "source": str(args.source),
        "data": args.data,
        "split": args.split,
        "tta": args.tta,
        "n": m["n"],
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "per_class": dict(zip(split.class_names, m["per_class"], strict=True)),
    }
    if data.skipped:
        result["skipped"] = len(data.skipped)
    if args.out:
        from vitlab.io import atomic_write_json
        from vitlab.report import plot_confusion

        out = Path(args.out)
        atomic_write_json(out / "metrics.json", {**result, "confusion": m["confusion"]})
        plot_confusion(m["confusion"], split.class_names, out / "confusion.png")
    if args.json:
        print(json.dumps(result))
    else:
        tta = "" if args.tta == "none" else f" (tta: {args.tta})"
        print(f"{args.data} {args.split}{tta}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  (n={m['n']})")
        for name, acc in result["per_class"].items():
            print(f"  {name:<20} {acc:.4f}")
    return 0
