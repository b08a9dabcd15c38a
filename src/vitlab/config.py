"""Architecture of a Vision Transformer (arXiv:2010.11929, Section 3.1 and Table 1).

A :class:`ViTConfig` says everything needed to build the network; :class:`Preprocessing` says what a
checkpoint expects of its input pixels. Presets are named ``"{Ti,S,B,L,H}/{patch}"`` as in the paper
("ViT-L/16" is the Large model with 16x16 patches); Ti and S come from DeiT and the official configs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

PosEmbed = Literal["learned", "learned_2d", "sincos_2d", "relative", "none"]
Pool = Literal["token", "gap"]
Interpolation = Literal["bilinear", "bicubic", "nearest"]
CropMode = Literal["center", "squash"]

POS_EMBED_CHOICES: tuple[str, ...] = get_args(PosEmbed)
POOL_CHOICES: tuple[str, ...] = get_args(Pool)
# training-time regularisation (probabilities in [0, 1)); no effect in evaluation
REGULARISATION_FIELDS = ("dropout", "attention_dropout", "drop_path", "patch_dropout")

# name: (hidden_dim, num_layers, num_heads, mlp_dim); paper Table 1, Ti/S as in DeiT
SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
    "H": (1280, 32, 16, 5120),
}


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")


class _ImageSize:
    """Dataclass field descriptor: accepts an int or (height, width), always reads back as a pair."""

    def __init__(self, default: tuple[int, int]) -> None:
        self._default = default

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = "_" + name

    def __get__(self, obj: object | None, owner: type) -> tuple[int, int]:
        if obj is None:
            return self._default
        value: tuple[int, int] = obj.__dict__[self._name]
        return value

    def __set__(self, obj: object, value: int | tuple[int, int] | list[int]) -> None:
        obj.__dict__[self._name] = _pair(value, self._name[1:])


@dataclass(frozen=True, kw_only=True)
class ViTConfig:
    """Architecture of a Vision Transformer (arXiv:2010.11929, Section 3.1).

    ``image_size`` may be given as an int (square) or ``(height, width)``; it is stored as a pair.
    ``num_classes=0`` builds a feature extractor without a head.
    """

    image_size: _ImageSize = _ImageSize((224, 224))
    patch_size: int = 16
    in_channels: int = 3
    hidden_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    num_classes: int = 1000
    pos_embed: PosEmbed = "learned"
    pool: Pool = "token"
    representation_size: int | None = None
    dropout: float = 0.0
    attention_dropout: float = 0.0
    drop_path: float = 0.0
    patch_dropout: float = 0.0  # share of patch tokens dropped at random per image in training (0: none)
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True

    def __post_init__(self) -> None:
        for name in ("patch_size", "in_channels", "hidden_dim", "num_layers", "num_heads", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        h, w = self.image_size
        p = self.patch_size
        if h < 1 or w < 1 or h % p or w % p:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {p}: "
                f"use sides that are positive multiples of {p}, e.g. {(max(1, h // p) * p, max(1, w // p) * p)}"
            )
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"num_heads {self.num_heads} does not divide hidden_dim {self.hidden_dim}: "
                f"choose a head count among the divisors of {self.hidden_dim}"
            )
        if self.pos_embed not in POS_EMBED_CHOICES:
            raise ValueError(f"pos_embed {self.pos_embed!r} is not one of {list(POS_EMBED_CHOICES)}")
        if self.pool not in POOL_CHOICES:
            raise ValueError(f"pool {self.pool!r} is not one of {list(POOL_CHOICES)}")
        if self.pos_embed == "learned_2d" and self.hidden_dim % 2:
            raise ValueError(f"pos_embed 'learned_2d' needs an even hidden_dim, got {self.hidden_dim}")
        if self.pos_embed == "sincos_2d" and self.hidden_dim % 4:
            raise ValueError(f"pos_embed 'sincos_2d' needs hidden_dim divisible by 4, got {self.hidden_dim}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {self.num_classes!r}")
        rep = self.representation_size
        if rep is not None and (isinstance(rep, bool) or not isinstance(rep, int) or rep < 1):
            raise ValueError(f"representation_size must be None or a positive int, got {rep!r}")
        for name in REGULARISATION_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
        if self.patch_dropout and self.pos_embed == "relative":
            raise ValueError(
                "patch_dropout needs absolute position embeddings: a relative position bias is indexed by the "
                "full patch grid, which dropping patches breaks"
            )
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
            raise ValueError(f"layer_norm_eps must be a finite number > 0, got {eps!r}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"qkv_bias must be True or False, got {self.qkv_bias!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patches along (height, width) at ``image_size``."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        """N = HW / P^2."""
        gh, gw = self.grid_size
        return gh * gw

    def kept_patches(self, n: int) -> int:
        """How many of ``n`` patch tokens patch dropout keeps in training (at least one)."""
        return max(1, int(n * (1.0 - self.patch_dropout)))

    @property
    def num_prefix_tokens(self) -> int:
        """1 for the class token with token pooling, 0 for GAP."""
        return 1 if self.pool == "token" else 0

    def replace(self, **changes: Any) -> ViTConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; fields are {field_names()}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ViTConfig:
        unknown = sorted(set(d) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; fields are {field_names()}")
        d = dict(d)
        if isinstance(d.get("image_size"), list):
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ViTConfig:
        """The preset ``"{Ti,S,B,L,H}/{patch}"`` (e.g. ``"B/16"``), with any field overridden."""
        match = re.fullmatch(r"(?:ViT-)?(Ti|S|B|L|H)/(\d+)", name.strip())
        if match is None:
            raise ValueError(
                f"unknown model {name!r}: use '<size>/<patch>' with size in {list(SIZES)}, e.g. 'B/16' or 'Ti/4'"
            )
        width, depth, heads, mlp = SIZES[match.group(1)]
        base: dict[str, Any] = dict(
            hidden_dim=width, num_layers=depth, num_heads=heads, mlp_dim=mlp, patch_size=int(match.group(2))
        )
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown ViTConfig field(s) {unknown}; fields are {field_names()}")
        base.update(overrides)
        return cls(**base)


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ViTConfig)]


def preset_names(patches: tuple[int, ...] = (32, 16, 14, 8, 4)) -> list[str]:
    """Names of the usual presets (any other patch size works too)."""
    return [f"{size}/{p}" for size in SIZES for p in patches]


@dataclass(frozen=True, kw_only=True)
class Preprocessing:
    """What a checkpoint expects of its input: resize, centre crop, then (x - mean) / std per channel.

    The resize target is ``floor(image_size / crop_pct)`` per side, as timm computes it (0.875 at 224: 256).
    ``crop_mode="center"`` (timm's and torchvision's evaluation transforms) resizes keeping the aspect ratio,
    the short side to that target, then centre-crops ``image_size``; ``"squash"`` (HF's image processors, Google's
    big_vision) resizes both sides to it, aspect not kept, so with ``crop_pct`` 1 the whole picture is scaled
    straight to ``image_size``. Google's checkpoints expect pixels in [-1, 1] (mean = std = 0.5); torchvision's
    and many timm weights use ImageNet statistics.
    """

    image_size: _ImageSize = _ImageSize((224, 224))
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: Interpolation = "bicubic"
    crop_pct: float = 1.0
    crop_mode: CropMode = "center"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"mean {self.mean} and std {self.std} need the same, non-zero length")
        if not all(math.isfinite(v) for v in self.mean + self.std) or any(s <= 0 for s in self.std):
            raise ValueError(f"mean must be finite and std positive and finite, got {self.mean} and {self.std}")
        if min(self.image_size) < 1:  # (a pair of ints already: _ImageSize)
            raise ValueError(f"image_size must be a positive int or (height, width), got {self.image_size!r}")
        if self.interpolation not in get_args(Interpolation):
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {list(get_args(Interpolation))}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in get_args(CropMode):
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {list(get_args(CropMode))}")

    @classmethod
    def for_config(cls, config: ViTConfig, **changes: Any) -> Preprocessing:
        """Default preprocessing for a model: its size, pixels to [-1, 1] for each of its channels."""
        base: dict[str, Any] = dict(
            image_size=config.image_size, mean=(0.5,) * config.in_channels, std=(0.5,) * config.in_channels
        )
        base.update(changes)
        return cls(**base)

    def replace(self, **changes: Any) -> Preprocessing:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown Preprocessing field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }
        if self.crop_mode != "center":  # the default is left out: vitlab before crop_mode still reads the file
            d["crop_mode"] = self.crop_mode
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing field(s) {unknown}; fields are {sorted(known)}")
        d = dict(d)
        if "image_size" in d:
            d["image_size"] = tuple(d["image_size"])
        return cls(**d)
