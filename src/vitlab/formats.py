"""Converters between vitlab's state-dict layout and the public ViT checkpoint layouts.

Each converter is a pure function over state dicts written as a KEY TABLE: target key -> (source keys, how to
combine and reshape them). :func:`apply_table` is strict both ways: a source key the table needs but the file
lacks, or a key of the file the table does not use, raises :class:`~vitlab.errors.CheckpointError` naming it.

Layouts (see also ``REFERENCE.md``):

- Google vit_jax ``.npz`` (the paper's checkpoints, arXiv:2010.11929, and AugReg, arXiv:2106.10270): Flax
  parameter paths; dense kernels are [in, out], the patch embedding HWIO, attention kernels [D, heads, hd].
- big_vision ``.npz``: the same parameters under ``params/``, blocks named ``MultiHeadDotProductAttention_0`` /
  ``LayerNorm_1`` / ``MlpBlock_0``, a top-level ``pos_embedding`` for the patches only, and optionally one
  scan-stacked ``Transformer/encoderblock/`` with a leading layer axis.
- HF transformers ``ViTModel`` / ``ViTForImageClassification`` (``vit.`` prefix or none; separate q, k, v).
- torchvision ``VisionTransformer`` (fused ``in_proj`` in q, k, v order, like vitlab's ``qkv``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vitlab.config import PosEmbed, ViTConfig
from vitlab.errors import CheckpointError

Transform = Callable[..., Tensor]
Rule = tuple[tuple[str, ...], Transform]
KeyTable = dict[str, Rule]


# --------------------------------------------------------------------------------------- machinery
def apply_table(sd: Mapping[str, Tensor], table: KeyTable, what: str) -> dict[str, Tensor]:
    """``{target: transform(*[sd[s] for s in sources])}`` for every row; every key of ``sd`` must be used."""
    used = {s for sources, _ in table.values() for s in sources}
    missing = sorted(used - set(sd))
    unexpected = sorted(set(sd) - used)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s) {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s) {_short(unexpected)}")
        raise CheckpointError(f"not a {what} checkpoint vitlab can convert: {'; '.join(parts)}")
    out: dict[str, Tensor] = {}
    for target, (sources, fn) in table.items():
        try:
            out[target] = fn(*(sd[s] for s in sources))
        except (RuntimeError, IndexError, ValueError) as e:
            shapes = [tuple(sd[s].shape) for s in sources]
            raise CheckpointError(f"{what}: cannot convert {list(sources)} {shapes} to {target!r}: {e}") from e
    return out


def _short(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"


def same(x: Tensor) -> Tensor:
    return x


def transpose(x: Tensor) -> Tensor:
    """A Flax dense kernel [in, out] as a PyTorch Linear weight [out, in]."""
    return x.T.contiguous()


def hwio_to_oihw(x: Tensor) -> Tensor:
    return x.permute(3, 2, 0, 1).contiguous()


def heads_in_to_linear(*kernels: Tensor) -> Tensor:
    """q, k, v kernels [D, heads, hd] as one fused Linear weight [3D, D] (rows q, then k, then v)."""
    return torch.cat([k.reshape(k.shape[0], -1).T for k in kernels], dim=0).contiguous()


def heads_bias(*biases: Tensor) -> Tensor:
    """q, k, v biases [heads, hd] as one fused bias [3D]."""
    return torch.cat([b.reshape(-1) for b in biases], dim=0)


def heads_out_to_linear(x: Tensor) -> Tensor:
    """The output kernel [heads, hd, D] as a Linear weight [D, D]."""
    return x.reshape(-1, x.shape[-1]).T.contiguous()


def cat_rows(*xs: Tensor) -> Tensor:
    return torch.cat(xs, dim=0)


def with_class_slot(pos: Tensor) -> Tensor:
    """big_vision adds position embeddings to the patches only; vitlab's table has a (zero) class slot."""
    pos = pos.reshape(1, -1, pos.shape[-1])
    return torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)


def as_tokens(pos: Tensor) -> Tensor:
    return pos.reshape(1, -1, pos.shape[-1])


def _layer(i: int, fn: Transform) -> Transform:
    """Pick layer i of scan-stacked tensors (leading layer axis), then apply ``fn``."""
    return lambda *xs: fn(*(x[i] for x in xs))


def _rows(start: int, stop: int) -> Transform:
    return lambda x: x[start:stop].contiguous()


def _count_layers(keys: Any, pattern: str) -> int:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not found:
        return 0
    if found != set(range(max(found) + 1)):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise CheckpointError(f"the checkpoint has no layer(s) {missing} although it has layer {max(found)}")
    return max(found) + 1


def _grid(tokens: int, hint: tuple[int, int] | None, known: tuple[int, int] | None = None) -> tuple[int, int]:
    from vitlab import pos_embed as pe

    try:
        return pe.grid_from_tokens(tokens, hint, known)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def grid_hint(image_size: Any, patch: int) -> tuple[int, int] | None:
    if image_size is None:
        return None
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return (int(h) // patch, int(w) // patch)


def _make_config(**fields: Any) -> ViTConfig:
    try:
        return ViTConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's shapes give an invalid architecture: {e}") from e


# ------------------------------------------------------------------------- Google vit_jax / big_vision
@dataclass(frozen=True)
class JaxLayout:
    """Where a Flax ViT keeps its parameters: vit_jax (the paper's code) or big_vision."""

    name: str
    prefix: str
    attention: str
    norm2: str
    mlp: str
    pos: str
    stacked: bool

    def block(self, i: int) -> str:
        if self.stacked:
            return f"{self.prefix}Transformer/encoderblock/"
        return f"{self.prefix}Transformer/encoderblock_{i}/"


def jax_layout(keys: Any) -> JaxLayout:
    """Recognise a Google ``.npz`` from its keys (``opt/target/`` and ``params/`` prefixes allowed)."""
    keys = set(keys)
    prefix = ""
    for p in ("opt/target/", "params/"):
        if f"{p}embedding/kernel" in keys:
            prefix = p
            break
    if f"{prefix}embedding/kernel" not in keys:
        raise CheckpointError(
            "this .npz has no 'embedding/kernel' (nor under 'params/' or 'opt/target/'): not a Google ViT checkpoint"
        )
    stacked = f"{prefix}Transformer/encoderblock/LayerNorm_0/scale" in keys
    first = f"{prefix}Transformer/encoderblock/" if stacked else f"{prefix}Transformer/encoderblock_0/"
    big_vision = f"{first}MultiHeadDotProductAttention_0/query/kernel" in keys or f"{prefix}pos_embedding" in keys
    if big_vision:
        return JaxLayout("big_vision", prefix, "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0",
                         f"{prefix}pos_embedding", stacked)  # fmt: skip
    return JaxLayout("vit_jax", prefix, "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3",
                     f"{prefix}Transformer/posembed_input/pos_embedding", stacked)  # fmt: skip


def infer_jax_config(sd: Mapping[str, Tensor], layout: JaxLayout, overrides: Mapping[str, Any]) -> ViTConfig:
    """The architecture of a Google checkpoint, all from its shapes (heads from the [D, heads, hd] kernels)."""
    p = layout.prefix
    need = [f"{p}embedding/kernel", layout.pos, f"{layout.block(0)}{layout.attention}/query/kernel"]
    need.append(f"{layout.block(0)}{layout.mlp}/Dense_0/kernel")
    missing = [k for k in need if k not in sd]
    if missing:
        raise CheckpointError(f"not a {layout.name} ViT checkpoint: missing key(s) {missing}")
    ph, pw, c, d = sd[f"{p}embedding/kernel"].shape
    if ph != pw:
        raise CheckpointError(f"non-square patches {ph}x{pw} are not supported")
    query = sd[f"{layout.block(0)}{layout.attention}/query/kernel"]
    mlp = sd[f"{layout.block(0)}{layout.mlp}/Dense_0/kernel"]
    if layout.stacked:
        layers = query.shape[0]
        query, mlp = query[0], mlp[0]
    else:
        layers = _count_layers(sd, re.escape(f"{p}Transformer/encoderblock_") + r"(\d+)/")
    has_cls = f"{p}cls" in sd
    pos_tokens = sd[layout.pos].reshape(-1, d).shape[0]
    prefix_tokens = 1 if has_cls and layout.name == "vit_jax" else 0
    grid = _grid(pos_tokens - prefix_tokens, grid_hint(overrides.get("image_size"), ph))
    rep = sd[f"{p}pre_logits/kernel"].shape[-1] if f"{p}pre_logits/kernel" in sd else None
    return _make_config(
        image_size=(grid[0] * ph, grid[1] * ph),
        patch_size=ph,
        in_channels=c,
        hidden_dim=d,
        num_layers=layers,
        num_heads=query.shape[1],
        mlp_dim=mlp.shape[-1],
        num_classes=sd[f"{p}head/kernel"].shape[-1] if f"{p}head/kernel" in sd else 0,
        pos_embed="learned",
        pool="token" if has_cls else "gap",
        representation_size=rep,
        layer_norm_eps=1e-6,  # Flax's LayerNorm default
    )


def jax_table(config: ViTConfig, layout: JaxLayout) -> KeyTable:
    """vitlab key -> (npz keys, transform) for a Google checkpoint of ``config``."""
    p = layout.prefix
    pos = with_class_slot if layout.name == "big_vision" and config.pool == "token" else as_tokens
    table: KeyTable = {
        "patch_embed.proj.weight": ((f"{p}embedding/kernel",), hwio_to_oihw),
        "patch_embed.proj.bias": ((f"{p}embedding/bias",), same),
        "pos_embed": ((layout.pos,), pos),
        "norm.weight": ((f"{p}Transformer/encoder_norm/scale",), same),
        "norm.bias": ((f"{p}Transformer/encoder_norm/bias",), same),
    }
    if config.pool == "token":
        table["cls_token"] = ((f"{p}cls",), lambda x: x.reshape(1, 1, -1))
    for i in range(config.num_layers):
        table.update(_jax_block(i, layout))
    if config.representation_size is not None:
        table["pre_logits.fc.weight"] = ((f"{p}pre_logits/kernel",), transpose)
        table["pre_logits.fc.bias"] = ((f"{p}pre_logits/bias",), same)
    if config.num_classes:
        table["head.weight"] = ((f"{p}head/kernel",), transpose)
        table["head.bias"] = ((f"{p}head/bias",), same)
    return table


def _jax_block(i: int, layout: JaxLayout) -> KeyTable:
    src = layout.block(i)
    att = f"{src}{layout.attention}/"
    mlp = f"{src}{layout.mlp}/"
    rows: dict[str, tuple[tuple[str, ...], Transform]] = {
        f"blocks.{i}.norm1.weight": ((f"{src}LayerNorm_0/scale",), same),
        f"blocks.{i}.norm1.bias": ((f"{src}LayerNorm_0/bias",), same),
        f"blocks.{i}.attn.qkv.weight": (
            tuple(f"{att}{n}/kernel" for n in ("query", "key", "value")),
            heads_in_to_linear,
        ),
        f"blocks.{i}.attn.qkv.bias": (tuple(f"{att}{n}/bias" for n in ("query", "key", "value")), heads_bias),
        f"blocks.{i}.attn.proj.weight": ((f"{att}out/kernel",), heads_out_to_linear),
        f"blocks.{i}.attn.proj.bias": ((f"{att}out/bias",), same),
        f"blocks.{i}.norm2.weight": ((f"{src}{layout.norm2}/scale",), same),
        f"blocks.{i}.norm2.bias": ((f"{src}{layout.norm2}/bias",), same),
        f"blocks.{i}.mlp.fc1.weight": ((f"{mlp}Dense_0/kernel",), transpose),
        f"blocks.{i}.mlp.fc1.bias": ((f"{mlp}Dense_0/bias",), same),
        f"blocks.{i}.mlp.fc2.weight": ((f"{mlp}Dense_1/kernel",), transpose),
        f"blocks.{i}.mlp.fc2.bias": ((f"{mlp}Dense_1/bias",), same),
    }
    if layout.stacked:
        return {k: (sources, _layer(i, fn)) for k, (sources, fn) in rows.items()}
    return rows


def from_jax(sd: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> tuple[dict[str, Tensor], ViTConfig, str]:
    """A Google vit_jax or big_vision ``.npz`` (as tensors) in vitlab's layout, its config and layout name."""
    layout = jax_layout(sd)
    config = infer_jax_config(sd, layout, overrides)
    return apply_table(sd, jax_table(config, layout), layout.name), config, layout.name


# -------------------------------------------------------------------------------- HF transformers
HF_ACTIVATIONS = ("gelu",)  # exact erf GELU, which is what vitlab's Mlp computes


def hf_prefix(keys: Any) -> str:
    return "vit." if any(str(k).startswith("vit.embeddings.") for k in keys) else ""


def is_hf_state_dict(keys: Any) -> bool:
    return any(str(k).endswith("embeddings.patch_embeddings.projection.weight") for k in keys)


def check_hf_config(hf: Mapping[str, Any]) -> None:
    """Refuse HF models vitlab does not compute the same way (before any weights are read)."""
    model_type = hf.get("model_type")
    if model_type != "vit":
        raise CheckpointError(f"HF model_type {model_type!r} is not supported; vitlab reads model_type 'vit'")
    act = hf.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise CheckpointError(f"HF hidden_act {act!r} is not supported: vitlab's MLP uses the exact GELU ('gelu')")


def infer_hf_config(
    hf: Mapping[str, Any], sd: Mapping[str, Tensor], overrides: Mapping[str, Any]
) -> tuple[ViTConfig, list[str] | None]:
    """Architecture and class names from an HF ``config.json`` (checked against the weights)."""
    check_hf_config(hf)
    p = hf_prefix(sd)
    try:
        d = int(hf["hidden_size"])
        patch = int(hf["patch_size"])
        image = hf.get("image_size", 224)
        size = (image, image) if isinstance(image, int) else (int(image[0]), int(image[1]))
        has_head = "classifier.weight" in sd
        num_classes = sd["classifier.weight"].shape[0] if has_head else 0
        rep = d if f"{p}pooler.dense.weight" in sd else None
        pos_tokens = sd[f"{p}embeddings.position_embeddings"].shape[1] - 1
        grid = _grid(pos_tokens, grid_hint(overrides.get("image_size"), patch), known=grid_hint(size, patch))
        config = _make_config(
            image_size=(grid[0] * patch, grid[1] * patch),
            patch_size=patch,
            in_channels=int(hf.get("num_channels", 3)),
            hidden_dim=d,
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=int(hf["num_attention_heads"]),
            mlp_dim=int(hf["intermediate_size"]),
            num_classes=num_classes,
            representation_size=rep,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            qkv_bias=bool(hf.get("qkv_bias", True)),
        )
    except KeyError as e:
        raise CheckpointError(f"the HF checkpoint lacks {e} (in config.json or the weights)") from e
    names = None
    id2label = hf.get("id2label")
    if num_classes and isinstance(id2label, dict) and len(id2label) == num_classes:
        labels = [str(id2label.get(str(i), "")) for i in range(num_classes)]
        if labels != [f"LABEL_{i}" for i in range(num_classes)]:  # HF's placeholder names are no names
            names = labels
    return config, names


def hf_table(config: ViTConfig, prefix: str) -> KeyTable:
    """vitlab key -> (HF on-disk keys, transform)."""
    p = prefix
    e = f"{p}embeddings."
    table: KeyTable = {
        "cls_token": ((f"{e}cls_token",), same),
        "pos_embed": ((f"{e}position_embeddings",), same),
        "patch_embed.proj.weight": ((f"{e}patch_embeddings.projection.weight",), same),
        "patch_embed.proj.bias": ((f"{e}patch_embeddings.projection.bias",), same),
        "norm.weight": ((f"{p}layernorm.weight",), same),
        "norm.bias": ((f"{p}layernorm.bias",), same),
    }
    for i in range(config.num_layers):
        s = f"{p}encoder.layer.{i}."
        a = f"{s}attention.attention."
        table.update(
            {
                f"blocks.{i}.norm1.weight": ((f"{s}layernorm_before.weight",), same),
                f"blocks.{i}.norm1.bias": ((f"{s}layernorm_before.bias",), same),
                f"blocks.{i}.attn.qkv.weight": ((f"{a}query.weight", f"{a}key.weight", f"{a}value.weight"), cat_rows),
                f"blocks.{i}.attn.proj.weight": ((f"{s}attention.output.dense.weight",), same),
                f"blocks.{i}.attn.proj.bias": ((f"{s}attention.output.dense.bias",), same),
                f"blocks.{i}.norm2.weight": ((f"{s}layernorm_after.weight",), same),
                f"blocks.{i}.norm2.bias": ((f"{s}layernorm_after.bias",), same),
                f"blocks.{i}.mlp.fc1.weight": ((f"{s}intermediate.dense.weight",), same),
                f"blocks.{i}.mlp.fc1.bias": ((f"{s}intermediate.dense.bias",), same),
                f"blocks.{i}.mlp.fc2.weight": ((f"{s}output.dense.weight",), same),
                f"blocks.{i}.mlp.fc2.bias": ((f"{s}output.dense.bias",), same),
            }
        )
        if config.qkv_bias:
            table[f"blocks.{i}.attn.qkv.bias"] = ((f"{a}query.bias", f"{a}key.bias", f"{a}value.bias"), cat_rows)
    if config.representation_size is not None:
        table["pre_logits.fc.weight"] = ((f"{p}pooler.dense.weight",), same)
        table["pre_logits.fc.bias"] = ((f"{p}pooler.dense.bias",), same)
    if config.num_classes:
        table["head.weight"] = (("classifier.weight",), same)
        table["head.bias"] = (("classifier.bias",), same)
    return table


def from_hf(
    sd: Mapping[str, Tensor], hf_config: Mapping[str, Any], overrides: Mapping[str, Any]
) -> tuple[dict[str, Tensor], ViTConfig, list[str] | None]:
    config, names = infer_hf_config(hf_config, sd, overrides)
    return apply_table(sd, hf_table(config, hf_prefix(sd)), "HF transformers ViT"), config, names


def to_hf(sd: Mapping[str, Tensor], config: ViTConfig) -> dict[str, Tensor]:
    """vitlab weights as a ``ViTForImageClassification`` state dict (the inverse of :func:`hf_table`)."""
    if config.pool != "token" or config.pos_embed != "learned":
        raise CheckpointError(
            f"HF ViT has a class token and learned 1D position embeddings; this model has pool={config.pool!r}, "
            f"pos_embed={config.pos_embed!r}"
        )
    if config.representation_size is not None:
        raise CheckpointError(
            "HF ViTForImageClassification has no pre-logits layer: load with representation_size=None "
            "(vitlab convert --drop-pre-logits) to drop it"
        )
    d = config.hidden_dim
    inverse: KeyTable = {}
    for ours, (theirs, fn) in hf_table(config, "vit.").items():
        if fn is cat_rows:  # the fused qkv splits back into query, key, value
            for j, name in enumerate(theirs):
                inverse[name] = ((ours,), _rows(j * d, (j + 1) * d))
        else:
            inverse[theirs[0]] = ((ours,), same)
    return apply_table(sd, inverse, "vitlab")


def hf_config_dict(config: ViTConfig, class_names: list[str] | None) -> dict[str, Any]:
    """A ``config.json`` that ``transformers.ViTForImageClassification.from_pretrained`` reads."""
    h, w = config.image_size
    names = class_names or [f"LABEL_{i}" for i in range(config.num_classes)]
    return {
        "architectures": ["ViTForImageClassification"],
        "model_type": "vit",
        "hidden_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": h if h == w else [h, w],  # transformers' ViT reads a (height, width) pair too
        "patch_size": config.patch_size,
        "num_channels": config.in_channels,
        "qkv_bias": config.qkv_bias,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
    }


# ----------------------------------------------------------------------------------- torchvision
def is_torchvision_state_dict(keys: Any) -> bool:
    keys = set(keys)
    return "conv_proj.weight" in keys and "encoder.ln.weight" in keys


def torchvision_table(config: ViTConfig) -> KeyTable:
    """vitlab key -> (torchvision key, transform); torchvision's in_proj is q, k, v stacked like vitlab's qkv."""
    table: KeyTable = {
        "cls_token": (("class_token",), same),
        "pos_embed": (("encoder.pos_embedding",), same),
        "patch_embed.proj.weight": (("conv_proj.weight",), same),
        "patch_embed.proj.bias": (("conv_proj.bias",), same),
        "norm.weight": (("encoder.ln.weight",), same),
        "norm.bias": (("encoder.ln.bias",), same),
    }
    for i in range(config.num_layers):
        s = f"encoder.layers.encoder_layer_{i}."
        for ours, theirs in (
            ("norm1", "ln_1"),
            ("attn.qkv", "self_attention.in_proj_"),
            ("attn.proj", "self_attention.out_proj"),
            ("norm2", "ln_2"),
            ("mlp.fc1", "mlp.0"),
            ("mlp.fc2", "mlp.3"),
        ):
            sep = "" if theirs.endswith("_") else "."
            table[f"blocks.{i}.{ours}.weight"] = ((f"{s}{theirs}{sep}weight",), same)
            table[f"blocks.{i}.{ours}.bias"] = ((f"{s}{theirs}{sep}bias",), same)
    if config.representation_size is not None:
        table["pre_logits.fc.weight"] = (("heads.pre_logits.weight",), same)
        table["pre_logits.fc.bias"] = (("heads.pre_logits.bias",), same)
    if config.num_classes:
        table["head.weight"] = (("heads.head.weight",), same)
        table["head.bias"] = (("heads.head.bias",), same)
    return table


def infer_torchvision_config(sd: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> ViTConfig:
    """Everything but the head count comes from the shapes; ``num_heads`` must be in ``overrides``."""
    missing = [k for k in ("conv_proj.weight", "encoder.pos_embedding", "class_token") if k not in sd]
    if missing:
        raise CheckpointError(f"not a torchvision ViT state dict: missing key(s) {missing}")
    d, c, p, p2 = sd["conv_proj.weight"].shape
    if p != p2:
        raise CheckpointError(f"non-square patches {p}x{p2} are not supported")
    if "num_heads" not in overrides:
        raise CheckpointError(
            "num_heads cannot be read from a torchvision state dict: pass it, e.g. "
            f"vitlab.from_pretrained(path, num_heads={max(1, d // 64)}) or --num-heads {max(1, d // 64)}"
        )
    layers = _count_layers(sd, r"encoder\.layers\.encoder_layer_(\d+)\.")
    grid = _grid(sd["encoder.pos_embedding"].shape[1] - 1, grid_hint(overrides.get("image_size"), p))
    fc1 = "encoder.layers.encoder_layer_0.mlp.0.weight"
    if fc1 not in sd:
        raise CheckpointError(f"not a torchvision ViT state dict: missing key {fc1!r}")
    kind: PosEmbed = "learned"
    return _make_config(
        image_size=(grid[0] * p, grid[1] * p),
        patch_size=p,
        in_channels=c,
        hidden_dim=d,
        num_layers=layers,
        num_heads=int(overrides["num_heads"]),
        mlp_dim=sd[fc1].shape[0],
        num_classes=sd["heads.head.weight"].shape[0] if "heads.head.weight" in sd else 0,
        pos_embed=kind,
        representation_size=sd["heads.pre_logits.weight"].shape[0] if "heads.pre_logits.weight" in sd else None,
        layer_norm_eps=1e-6,  # torchvision builds its ViT with LayerNorm(eps=1e-6)
    )


def from_torchvision(sd: Mapping[str, Tensor], overrides: Mapping[str, Any]) -> tuple[dict[str, Tensor], ViTConfig]:
    config = infer_torchvision_config(sd, overrides)
    return apply_table(sd, torchvision_table(config), "torchvision ViT"), config
