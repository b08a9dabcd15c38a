"""Reading and writing model checkpoints (paper Section 3.2 for the resolution change).

A vitlab checkpoint is a directory with ``config.json`` (architecture, preprocessing, class names) and
``model.safetensors``. :func:`from_pretrained` also reads, through the key tables of :mod:`vitlab.formats`:
Google vit_jax and big_vision ``.npz`` (``allow_pickle=False``), HF transformers ViT directories, torchvision
state dicts, and timm-layout state dicts (``.safetensors``, or ``.pth`` / ``.bin`` / ``.pt`` read with
``torch.load(weights_only=True)``, plain or wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``); registry
names and URLs are downloaded by :mod:`vitlab.hub`. Adapting a checkpoint to another image size, class count
or channel count is a pure function over state dicts, :func:`adapt_state_dict`. :func:`save_timm` and
:func:`save_hf` write the other libraries' layouts.
"""

from __future__ import annotations

import json
import pickle
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vitlab import formats
from vitlab import pos_embed as pe
from vitlab.config import Interpolation, PosEmbed, Preprocessing, ViTConfig, field_names
from vitlab.errors import CheckpointError
from vitlab.io import atomic_write, atomic_write_json
from vitlab.model import ViT, check_class_names
from vitlab.preprocess import resize_target

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_TAG = "vitlab"
FORMAT_VERSION = 1
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

# Fields the weights themselves fix. image_size, num_classes, representation_size (to None) and
# in_channels can be changed by adapting the weights; the rest only by training anew.
_FIXED_BY_WEIGHTS = ("patch_size", "hidden_dim", "num_layers", "mlp_dim", "pos_embed", "pool", "qkv_bias")


@dataclass
class Checkpoint:
    """A state dict in vitlab's layout with everything known about it."""

    state_dict: dict[str, Tensor]
    config: ViTConfig
    preprocessing: Preprocessing
    class_names: list[str] | None = None
    format: str = "vitlab"


# ------------------------------------------------------------------------------------------- write
def save_model(model: ViT, directory: str | Path) -> Path:
    """Write ``model`` as a vitlab directory; each file is replaced atomically."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save into {directory}: it exists and is not a directory")
    _check_savable(model)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, checkpoint_metadata(model))
    return directory


def _check_savable(model: ViT) -> None:
    """What a loader would refuse, refused before anything is written (attributes may have been set by hand)."""
    check_class_names(model.class_names, model.config.num_classes, fix=": fix model.class_names")
    if not isinstance(model.preprocessing, Preprocessing):
        raise TypeError(f"model.preprocessing must be a vitlab Preprocessing, not {type(model.preprocessing).__name__}")


def checkpoint_metadata(model: ViT) -> dict[str, Any]:
    from vitlab import __version__

    return {
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "vitlab_version": __version__,
        "architecture": model.config.to_dict(),
        "preprocessing": model.preprocessing.to_dict(),
        "class_names": model.class_names,
    }


# -------------------------------------------------------------------------------------------- read
def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` or weights-only pickle file, unwrapped from ``state_dict``/``model``.

    Pickles are read with ``weights_only=True``: a file that needs code to load is refused, and its code
    never runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} as safetensors (truncated or corrupt?): {e}") from e
    _check_magic(path, (b"PK", b"\x80"), "a PyTorch file (zip archive or pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it needs code to unpickle, which vitlab never runs "
            f"(only tensors are read, with torch.load(weights_only=True)). Details: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch file (truncated or corrupt?): {str(e) or type(e).__name__}"
        ) from e
    return _unwrap(obj, path)


def _check_magic(path: Path, magics: tuple[bytes, ...], what: str) -> None:
    """Refuse a file that does not start the way ``what`` does: corrupt, empty or another kind of file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
    if not head:
        raise CheckpointError(f"{path} is empty")
    if not head.startswith(magics):
        raise CheckpointError(f"{path} is not {what}: corrupt, or another kind of file")


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and not _all_tensors(obj):
            for key in ("state_dict", "model", "module", "model_state_dict"):
                if key in obj and isinstance(obj[key], Mapping):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, Mapping) or not _all_tensors(obj):
        raise CheckpointError(
            f"{path} holds no state dict of tensors (looked at the top level and under 'state_dict', 'model', 'module')"
        )
    sd = {str(k): v for k, v in obj.items()}
    if sd and all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _all_tensors(obj: Mapping[Any, Any]) -> bool:
    return bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def load_vitlab_dir(directory: Path) -> Checkpoint:
    meta = read_config_json(directory)
    if meta.get("format") != FORMAT_TAG:
        raise CheckpointError(f'{directory / CONFIG_NAME} is not a vitlab config (no "format": "vitlab")')
    try:
        config = ViTConfig.from_dict(meta["architecture"])
        preprocessing = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_NAME} is not a valid vitlab config: {e}") from e
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    return Checkpoint(read_state_dict(weights), config, preprocessing, meta.get("class_names"), "vitlab")


def read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return meta


# ----------------------------------------------------------------------- timm layout -> ViTConfig
def infer_timm_config(
    sd: Mapping[str, Tensor], overrides: Mapping[str, Any], saved_size: int | Sequence[int] | None = None
) -> ViTConfig:
    """The architecture of a timm / vitlab-layout state dict, from its shapes and ``overrides``.

    The head count cannot be read from the shapes: it must be in ``overrides``. ``saved_size``: the image size
    the checkpoint's own metadata records (a timm folder's), which tells its patch grid.
    """
    if "fc_norm.weight" in sd:
        raise CheckpointError(
            "this timm state dict has 'fc_norm' (global average pooling followed by a LayerNorm); vitlab's GAP "
            "applies the final LayerNorm before the mean (as big_vision), so it cannot load it"
        )
    _require(sd, ["patch_embed.proj.weight", "norm.weight"], "a timm/vitlab ViT state dict")
    d, c, p, p2 = sd["patch_embed.proj.weight"].shape
    if p != p2:
        raise CheckpointError(f"non-square patches {p}x{p2} are not supported")
    layers = 1 + max((int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise CheckpointError("the state dict has no 'blocks.{i}.' keys: not a ViT encoder")
    if "num_heads" not in overrides:
        raise CheckpointError(
            "num_heads cannot be read from a timm-layout state dict: pass it, e.g. "
            f"vitlab.from_pretrained(path, num_heads={max(1, d // 64)}) or --num-heads {max(1, d // 64)}"
        )
    has_cls = "cls_token" in sd
    kind: PosEmbed
    if "pos_embed" in sd:
        kind = "learned"
    elif "pos_embed_y" in sd:
        kind = "learned_2d"
    elif "blocks.0.attn.rel_pos" in sd:
        kind = "relative"
    elif "pos_embed" in overrides:
        kind = overrides["pos_embed"]
    else:
        raise CheckpointError(
            "the state dict has no position-embedding tensors: the model used fixed ones or none; pass "
            "pos_embed='sincos_2d' or pos_embed='none' to from_pretrained to say which"
        )
    hint = formats.grid_hint(overrides.get("image_size"), p)
    known = formats.grid_hint(saved_size, p)
    if kind == "learned":
        n = sd["pos_embed"].shape[1] - (1 if has_cls else 0)
        grid = pe.grid_from_tokens(n, hint, known, prefer_hint=saved_size is None)
    elif kind == "learned_2d":
        grid = (sd["pos_embed_y"].shape[0], sd["pos_embed_x"].shape[0])
    elif kind == "relative":
        t = sd["blocks.0.attn.rel_pos"].shape
        grid = ((t[1] + 1) // 2, (t[2] + 1) // 2)
    else:
        grid = known or hint or (224 // p, 224 // p)
    rep = sd["pre_logits.fc.weight"].shape[0] if "pre_logits.fc.weight" in sd else None
    num_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    try:
        return ViTConfig(
            image_size=(grid[0] * p, grid[1] * p),
            patch_size=p,
            in_channels=c,
            hidden_dim=d,
            num_layers=layers,
            num_heads=int(overrides["num_heads"]),
            mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
            num_classes=num_classes,
            pos_embed=kind,
            pool="token" if has_cls else "gap",
            representation_size=rep,
            qkv_bias="blocks.0.attn.qkv.bias" in sd,
        )
    except KeyError as e:
        raise CheckpointError(f"the state dict is missing the key {e}") from e


def _require(sd: Mapping[str, Tensor], keys: Sequence[str], what: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise CheckpointError(f"not {what}: missing key(s) {missing}")


# ------------------------------------------------------------------------------ adapt (pure)
def adapt_state_dict(sd: Mapping[str, Tensor], source: ViTConfig, target: ViTConfig) -> dict[str, Tensor]:
    """Turn weights of ``source`` into weights of ``target`` (a pure function; the input is not changed).

    - image_size: position embeddings resampled in 2D to the new grid (paper Section 3.2);
    - num_classes: a new zero-initialised head (the paper's fine-tuning);
    - representation_size: only to None, dropping the pre-logits layer;
    - in_channels: RGB filters summed over colour for grey input (3 -> 1), or spread (1 -> 3).
    """
    for name in _FIXED_BY_WEIGHTS:
        if getattr(source, name) != getattr(target, name):
            raise CheckpointError(
                f"the checkpoint has {name}={getattr(source, name)!r}; it cannot be changed to "
                f"{getattr(target, name)!r} when loading (the weights fix it)"
            )
    out = dict(sd)
    if source.grid_size != target.grid_size:
        _resample_positions(out, source, target)
    if source.representation_size != target.representation_size:
        if target.representation_size is not None:
            raise CheckpointError(
                f"representation_size can only be dropped (None) when loading, not changed from "
                f"{source.representation_size} to {target.representation_size}"
            )
        out.pop("pre_logits.fc.weight", None)
        out.pop("pre_logits.fc.bias", None)
    head_in = target.representation_size or target.hidden_dim
    head_w = out.get("head.weight")
    # a dropped pre-logits layer keeps the head where it still fits (as timm does), else a new one; a head of the
    # wrong shape with nothing changed is left for _load_strict to refuse by name
    refit = source.representation_size != target.representation_size
    if source.num_classes != target.num_classes or (refit and head_w is not None and head_w.shape[1] != head_in):
        out.pop("head.weight", None)
        out.pop("head.bias", None)
        if target.num_classes:
            ref = out["patch_embed.proj.weight"]
            out["head.weight"] = torch.zeros(target.num_classes, head_in, dtype=ref.dtype)
            out["head.bias"] = torch.zeros(target.num_classes, dtype=ref.dtype)
    if source.in_channels != target.in_channels:
        w = out["patch_embed.proj.weight"]
        if source.in_channels == 3 and target.in_channels == 1:
            out["patch_embed.proj.weight"] = w.sum(dim=1, keepdim=True)
        elif source.in_channels == 1:
            out["patch_embed.proj.weight"] = w.repeat(1, target.in_channels, 1, 1) / target.in_channels
        else:
            raise CheckpointError(
                f"cannot adapt {source.in_channels}-channel filters to in_channels={target.in_channels} "
                "(supported: 3 -> 1 and 1 -> any)"
            )
    return out


def _resample_positions(sd: dict[str, Tensor], source: ViTConfig, target: ViTConfig) -> None:
    grid = target.grid_size
    if source.pos_embed == "learned":
        sd["pos_embed"] = pe.resample_pos_embed(sd["pos_embed"], source.grid_size, grid, source.num_prefix_tokens)
    elif source.pos_embed == "learned_2d":
        sd["pos_embed_y"] = pe.resample_axis_embed(sd["pos_embed_y"], grid[0])
        sd["pos_embed_x"] = pe.resample_axis_embed(sd["pos_embed_x"], grid[1])
    elif source.pos_embed == "relative":
        for key in [k for k in sd if k.endswith("attn.rel_pos")]:
            sd[key] = pe.resample_relative_table(sd[key], grid)


def adapt_preprocessing(pre: Preprocessing, target: ViTConfig) -> Preprocessing:
    mean, std = pre.mean, pre.std
    if len(mean) != target.in_channels:
        mean = (sum(mean) / len(mean),) * target.in_channels
        std = (sum(std) / len(std),) * target.in_channels
    return pre.replace(image_size=target.image_size, mean=mean, std=std)


# ----------------------------------------------------------------------------------- other formats
def read_npz(path: str | Path) -> dict[str, Tensor]:
    """The arrays of a Google ``.npz`` as tensors, read with ``allow_pickle=False`` (no code ever runs)."""
    import zipfile

    import numpy as np

    path = Path(path)
    _check_magic(path, (b"PK", b"\x93NUMPY", b"\x80"), "an .npz file (zip archive)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise CheckpointError(f"refusing to load {path}: it holds pickled objects, which vitlab never runs") from e
        raise CheckpointError(f"cannot read {path} as .npz (truncated or corrupt?): {e}") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise CheckpointError(f"cannot read {path} as .npz (truncated or corrupt?): {e}") from e


_HF_RESAMPLE: dict[int, Interpolation] = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's codes


def load_hf_dir(directory: Path, overrides: Mapping[str, Any]) -> Checkpoint:
    """An HF transformers ViT directory: config.json + model.safetensors (or sharded, or pytorch_model.bin)."""
    hf = read_config_json(directory)
    formats.check_hf_config(hf)
    sd = _read_hf_weights(directory)
    state, config, names = formats.from_hf(sd, hf, overrides)
    # ViTImageProcessor's defaults: resize straight to the size (no crop), bilinear, pixels to [-1, 1]
    pre = Preprocessing.for_config(config, crop_mode="squash", interpolation="bilinear")
    pre_path = directory / "preprocessor_config.json"
    if pre_path.is_file():
        pre = _hf_preprocessing(pre_path, pre)
    return Checkpoint(state, config, pre, names, "hf")


def _read_hf_weights(directory: Path) -> dict[str, Tensor]:
    for name in (WEIGHTS_NAME, "pytorch_model.bin"):
        if (directory / name).is_file():
            return read_state_dict(directory / name)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = directory / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index: {e}") from e
            sd: dict[str, Tensor] = {}
            for shard in shards:
                sd.update(read_state_dict(directory / shard))
            return sd
    raise CheckpointError(f"{directory} has an HF config.json but no {WEIGHTS_NAME} or pytorch_model.bin")


def _hf_preprocessing(path: Path, default: Preprocessing) -> Preprocessing:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        changes: dict[str, Any] = {}
        if meta.get("image_mean") is not None:
            changes["mean"] = tuple(meta["image_mean"])
            changes["std"] = tuple(meta["image_std"])
        size = meta.get("size")
        if isinstance(size, dict) and "shortest_edge" in size:  # short side to N (long side truncated), as timm
            changes.update(image_size=(int(size["shortest_edge"]),) * 2, crop_mode="center")
        elif isinstance(size, dict) and "height" in size:
            changes["image_size"] = (int(size["height"]), int(size["width"]))
        elif isinstance(size, int):
            changes["image_size"] = (size, size)
        elif size is not None:
            raise ValueError(f"size {size!r}: vitlab reads height/width, shortest_edge or an int")
        if meta.get("resample") in _HF_RESAMPLE:
            changes["interpolation"] = _HF_RESAMPLE[meta["resample"]]
        # DeiT-style processors resize to `size`, then centre-crop `crop_size` (their default: do crop)
        cropping = meta.get("do_center_crop", meta.get("image_processor_type") != "ViTImageProcessor")
        crop = meta.get("crop_size") if cropping else None
        if crop is not None:
            crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
            resized = changes.get("image_size", default.image_size)
            if min(*crop_hw, *resized) < 1:
                raise ValueError(f"crop_size {crop_hw} and size {resized} must be positive")
            changes.update(image_size=crop_hw, crop_pct=crop_hw[0] / resized[0])
            if resize_target(default.replace(**changes)) != tuple(resized):
                raise ValueError(f"crop_size {crop_hw} is not one fraction of size {resized} on both sides")
        return default.replace(**changes)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a valid HF image-processor config: {e}") from e


def load_state_dict_file(path: Path, overrides: Mapping[str, Any]) -> Checkpoint:
    """A single weights file: Google/big_vision ``.npz``, or a timm / torchvision / HF state dict."""
    if path.suffix == ".npz":
        state, config, layout = formats.from_jax(read_npz(path), overrides)
        # big_vision and vision_transformer evaluate with tf.image.resize straight to the size (bilinear, no crop);
        # PIL's bilinear filter is not TF's when shrinking, the geometry is theirs
        pre = Preprocessing.for_config(config, crop_mode="squash", interpolation="bilinear")
        return Checkpoint(state, config, pre, None, layout)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise CheckpointError(
            f"unknown checkpoint type {path.name!r}: expected a directory (vitlab, HF transformers or timm) or a file "
            f"ending in .npz, {', '.join(STATE_DICT_SUFFIXES)}"
        )
    sd = read_state_dict(path)
    if formats.is_torchvision_state_dict(sd):
        state, config = formats.from_torchvision(sd, overrides)
        pre = Preprocessing.for_config(config, mean=IMAGENET_MEAN, std=IMAGENET_STD, interpolation="bilinear")
        return Checkpoint(state, config, pre.replace(crop_pct=224 / 256), None, "torchvision")
    if formats.is_hf_state_dict(sd):
        raise CheckpointError(
            f"{path} holds HF transformers ViT weights, whose architecture is in the config.json beside them: "
            f"load the directory {path.parent} instead"
        )
    config = infer_timm_config(sd, overrides)
    return Checkpoint(sd, config, Preprocessing.for_config(config), None, "timm")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm's ViT size names and their head counts (timm/models/vision_transformer.py, and DeiT's)
_TIMM_HEADS = {"tiny": 3, "small": 6, "medium": 8, "base": 12, "large": 16, "huge": 16, "giant": 16}
TIMM_WEIGHTS_NAMES = (WEIGHTS_NAME, "pytorch_model.bin")


def _timm_heads(architecture: str) -> int | None:
    m = re.match(r"(?:vit|deit)_(tiny|small|medium|base|large|huge|giant)_patch", architecture)
    return _TIMM_HEADS[m.group(1)] if m else None


def load_timm_dir(path: Path, overrides: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> Checkpoint:
    """A timm Hugging Face Hub folder (``timm.models.push_to_hf_hub`` / ``save_for_hf``, or ``vitlab convert
    --to timm``): config.json (``meta``, if already read) with ``architecture`` and ``pretrained_cfg``, weights
    in timm's key names."""
    meta = dict(meta) if meta is not None else read_config_json(path)
    arch = meta.get("architecture")
    weights = next((path / n for n in TIMM_WEIGHTS_NAMES if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{path} is a timm folder ({arch}) without weights: expected {' or '.join(TIMM_WEIGHTS_NAMES)}"
        )
    model_args = meta.get("model_args") or {}
    # newer exports nest the data config under pretrained_cfg; older ones keep it at the top level
    nested = meta.get("pretrained_cfg")
    pcfg: dict[str, Any] = nested if isinstance(nested, dict) else meta
    heads = model_args.get("num_heads") or _timm_heads(str(arch))
    if heads is None and "num_heads" not in overrides:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: cannot tell the head count of architecture {arch!r} (no model_args.num_heads): "
            "pass num_heads to from_pretrained"
        )
    _refuse_timm_variants(path, model_args)
    known: dict[str, Any] = {"num_heads": heads} if heads else {}
    # the size the weights were saved at tells their patch grid: model_args.img_size, else pretrained_cfg's (C, H, W)
    size, input_size = model_args.get("img_size"), pcfg.get("input_size")
    if size is None and isinstance(input_size, list) and len(input_size) == 3:
        size = input_size[1:]
    sd = read_state_dict(weights)
    config = infer_timm_config(sd, {**overrides, **known}, size)
    pool = model_args.get("global_pool", meta.get("global_pool"))
    if pool not in (None, "") and pool != {"token": "token", "gap": "avg"}[config.pool]:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: global_pool={pool!r} with{'' if config.pool == 'token' else 'out'} a class "
            "token; vitlab pools with the class token ('token') or, without one, by the mean ('avg')"
        )
    pre = Preprocessing.for_config(config)
    changes: dict[str, Any] = {}
    if "mean" in pcfg and "std" in pcfg:
        changes.update(mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"]))
    if pcfg.get("interpolation") in ("bilinear", "bicubic"):
        changes["interpolation"] = pcfg["interpolation"]
    if pcfg.get("crop_pct"):
        changes["crop_pct"] = float(pcfg["crop_pct"])
    if pcfg.get("crop_mode") in ("center", "squash"):  # timm's "border" (pad to fit) is not one of vitlab's
        changes["crop_mode"] = pcfg["crop_mode"]
    try:
        pre = pre.replace(**changes)
    except ValueError as e:
        raise CheckpointError(f"{path / CONFIG_NAME}: bad preprocessing in pretrained_cfg: {e}") from e
    names = meta.get("label_names") or pcfg.get("label_names") or pcfg.get("labels")  # "labels": older exports
    if isinstance(names, dict):  # {"index": name}: kept only when no index is missing
        names = [names.get(str(i)) for i in range(config.num_classes)]
    class_names = None
    if isinstance(names, list) and names and len(names) == config.num_classes and None not in names:
        class_names = [str(n) for n in names]
    return Checkpoint(sd, config, pre, class_names, "timm_dir" if heads else "timm")


def _refuse_timm_variants(path: Path, model_args: Mapping[str, Any]) -> None:
    """timm ViT options that change the computation without changing the paper's key names."""
    act = model_args.get("act_layer")
    unsupported = {
        "act_layer": act is not None and act != "gelu",
        "no_embed_class": bool(model_args.get("no_embed_class")),
        "reg_tokens": bool(model_args.get("reg_tokens")),
        "init_values": model_args.get("init_values") is not None,
        "pre_norm": bool(model_args.get("pre_norm")),
        "qk_norm": bool(model_args.get("qk_norm")),
    }
    found = [f"{k}={model_args[k]!r}" for k, bad in unsupported.items() if bad]
    if found:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: a timm ViT variant vitlab does not implement ({', '.join(found)}); vitlab loads "
            "the paper's architecture (GELU MLP, position embeddings on every token, no LayerScale or registers)"
        )


# ------------------------------------------------------------------------------- from_pretrained
def load_checkpoint(source: str | Path, overrides: Mapping[str, Any]) -> Checkpoint:
    """Read ``source`` into vitlab's layout.

    ``source`` is a registry name (``vitlab models --pretrained``), an http(s) URL (downloaded to the cache), a
    vitlab, HF transformers or timm (Hugging Face Hub layout) directory, or a file: Google vit_jax / big_vision
    ``.npz``, or a timm / torchvision state dict (``.safetensors``, ``.pth``, ``.pt``, ``.bin``).
    """
    from vitlab import hub

    if isinstance(source, str) and source in hub.REGISTRY:
        entry = hub.REGISTRY[source]
        ckpt = load_checkpoint(hub.download(entry.url, sha256=entry.sha256, size=entry.size), overrides)
        ckpt.preprocessing = entry.preprocessing.replace(image_size=ckpt.config.image_size)
        if ckpt.config.num_classes == entry.num_classes:
            ckpt.class_names = hub.class_names_for(entry)
        return ckpt
    if hub.is_url(source):
        name = urllib.parse.urlsplit(str(source)).path.rsplit("/", 1)[-1]
        if not name.endswith((".npz", *STATE_DICT_SUFFIXES)):  # before downloading what could not be read
            raise CheckpointError(
                f"cannot load {source}: a URL must name a .npz or {', '.join(STATE_DICT_SUFFIXES)} file"
            )
        return load_checkpoint(hub.download(str(source)), overrides)
    path = Path(source)
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(
                f"{path} is a directory without {CONFIG_NAME}; expected a vitlab checkpoint (config.json + "
                f"{WEIGHTS_NAME}), an HF transformers or a timm one"
            )
        meta = read_config_json(path)
        if meta.get("format") == FORMAT_TAG:
            return load_vitlab_dir(path)
        if "model_type" in meta:
            return load_hf_dir(path, overrides)
        if "architecture" in meta:
            return load_timm_dir(path, overrides, meta)
        raise CheckpointError(f"{path / CONFIG_NAME} is neither a vitlab, an HF transformers nor a timm config")
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: not a file, a directory, an http(s) URL or a registered name "
            "(`vitlab models --pretrained` lists the names)"
        )
    return load_state_dict_file(path, overrides)


# formats whose files say how many heads there are
_HEADS_KNOWN = ("vitlab", "vit_jax", "big_vision", "hf", "timm_dir")


def from_pretrained(
    source: str | Path,
    *,
    preprocessing: Preprocessing | None = None,
    class_names: Sequence[str] | None = None,
    **overrides: Any,
) -> ViT:
    """Load a checkpoint into a :class:`ViT`, adapted to ``overrides`` (any :class:`ViTConfig` field).

    ``source``: see :func:`load_checkpoint`. ``image_size`` resamples the position embeddings, ``num_classes``
    puts on a zero-initialised head, ``representation_size=None`` drops the pre-logits layer, ``in_channels=1``
    sums RGB filters. The model carries the checkpoint's preprocessing and class names.
    """
    unknown = sorted(set(overrides) - set(field_names()))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown}; overrides are ViTConfig fields: {field_names()}")
    ckpt = load_checkpoint(source, overrides)
    heads = overrides.get("num_heads")
    if heads is not None and heads != ckpt.config.num_heads and ckpt.format in _HEADS_KNOWN:
        raise CheckpointError(f"the checkpoint has num_heads={ckpt.config.num_heads}; it cannot be changed to {heads}")
    target = ckpt.config.replace(**overrides) if overrides else ckpt.config
    sd = adapt_state_dict(ckpt.state_dict, ckpt.config, target)
    names = ckpt.class_names if target.num_classes == ckpt.config.num_classes else None
    if class_names is not None:
        names = list(class_names)
    with torch.device("meta"):
        model = ViT(
            target, preprocessing=preprocessing or adapt_preprocessing(ckpt.preprocessing, target), class_names=names
        )
    _load_strict(model, sd)
    return model.eval()


# ------------------------------------------------------------------------------ export (timm, HF)
def save_timm(model: ViT, directory: str | Path) -> Path:
    """Write ``model.safetensors`` (timm's key names, which are vitlab's) and a timm-style ``config.json``.

    ``timm.create_model(cfg["architecture"], **cfg["model_args"])`` builds the matching model.
    """
    from safetensors.torch import save_file

    _check_savable(model)
    c = model.config
    if c.pos_embed != "learned":
        raise CheckpointError(f"timm's VisionTransformer has learned 1D position embeddings, not {c.pos_embed!r}")
    if c.representation_size is not None:
        raise CheckpointError(
            "timm's VisionTransformer has no pre-logits layer: load with representation_size=None "
            "(vitlab convert --drop-pre-logits) to drop it"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    h, w = c.image_size
    model_args: dict[str, Any] = {
        "img_size": [h, w],
        "patch_size": c.patch_size,
        "in_chans": c.in_channels,
        "num_classes": c.num_classes,
        "embed_dim": c.hidden_dim,
        "depth": c.num_layers,
        "num_heads": c.num_heads,
        "mlp_ratio": c.mlp_dim / c.hidden_dim,
        "qkv_bias": c.qkv_bias,
    }
    if c.pool == "gap":  # vitlab's GAP normalises before the mean: timm's fc_norm=False
        model_args.update(class_token=False, global_pool="avg", fc_norm=False)
    pre = model.preprocessing
    atomic_write_json(
        directory / CONFIG_NAME,
        {
            "architecture": "vit_base_patch16_224",  # overridden field by field by model_args
            "num_classes": c.num_classes,
            "num_features": c.hidden_dim,
            "model_args": model_args,
            "label_names": model.class_names,
            "pretrained_cfg": {
                "input_size": [c.in_channels, *pre.image_size],
                "interpolation": pre.interpolation,
                "mean": list(pre.mean),
                "std": list(pre.std),
                "crop_pct": pre.crop_pct,
                "crop_mode": pre.crop_mode,
                "num_classes": c.num_classes,
                "first_conv": "patch_embed.proj",
                "classifier": "head",
            },
        },
    )
    return directory


def save_hf(model: ViT, directory: str | Path) -> Path:
    """Write an HF transformers ``ViTForImageClassification`` directory (config.json + model.safetensors +
    preprocessor_config.json). HF's ViTImageProcessor resizes straight to the size and never crops, so a model
    whose preprocessing crops (``crop_mode="center"`` on non-square pictures, or ``crop_pct`` < 1) is written
    with that straight resize, which is what HF, and vitlab reading the directory back, then apply."""
    from safetensors.torch import save_file

    _check_savable(model)
    c = model.config
    if not c.num_classes:
        raise CheckpointError(
            "HF ViTForImageClassification needs a head: load with num_classes=K (vitlab convert --num-classes K)"
        )
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    tensors = {k: v.contiguous() for k, v in formats.to_hf(sd, c).items()}
    config = formats.hf_config_dict(c, model.class_names)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(directory / CONFIG_NAME, config)
    pre = model.preprocessing
    resample = {v: k for k, v in _HF_RESAMPLE.items()}[pre.interpolation]
    atomic_write_json(
        directory / "preprocessor_config.json",
        {
            "image_processor_type": "ViTImageProcessor",
            "do_resize": True,
            "size": {"height": pre.image_size[0], "width": pre.image_size[1]},
            "resample": resample,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(pre.mean),
            "image_std": list(pre.std),
        },
    )
    return directory


def _load_strict(model: ViT, sd: Mapping[str, Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing keys {missing}, unexpected keys {unexpected}"
        )
    for k, v in expected.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"checkpoint tensor {k!r} has shape {tuple(sd[k].shape)}, the model needs {tuple(v.shape)}"
            )
    model.load_state_dict(
        {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in sd.items()}, strict=True, assign=True
    )
