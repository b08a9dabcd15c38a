"""Batch-level data augmentation on in-memory uint8 tensors (the small-data ViT recipes: DeiT, CCT).

Small datasets live in memory and are augmented a batch at a time, so two CPU cores keep up with the model:
crops, flips and random erasing are vectorised over the batch with per-image random parameters;
RandAugment and TrivialAugment (torchvision transforms v2) run per image; MixUp and CutMix (torchvision v2)
act on the normalised batch. Every random draw comes from torch's global generator, whose state the trainer
saves, so a resumed run continues the same random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Crop = Literal["none", "pad", "rrc"]
AutoAugment = Literal["none", "randaugment", "trivialaugment"]


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """What to do to each training batch. ``crop``: ``pad`` (pad by ``pad`` and crop back, CIFAR-style),
    ``rrc`` (random resized crop with ``scale`` and aspect ratio in [3/4, 4/3]) or ``none``."""

    crop: Crop = "pad"
    pad: int = 2
    scale: tuple[float, float] = (0.35, 1.0)
    hflip: bool = True
    vflip: bool = False
    auto_augment: AutoAugment = "none"
    ra_num_ops: int = 2
    ra_magnitude: int = 9
    random_erasing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0

    def __post_init__(self) -> None:
        if self.crop not in ("none", "pad", "rrc"):
            raise ValueError(f"crop {self.crop!r} is not one of ['none', 'pad', 'rrc']")
        if self.auto_augment not in ("none", "randaugment", "trivialaugment"):
            raise ValueError(
                f"auto_augment {self.auto_augment!r} is not one of ['none', 'randaugment', 'trivialaugment']"
            )
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        for name in ("random_erasing", "mix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def pad_crop(images: Tensor, pad: int) -> Tensor:
    """Zero-pad by ``pad`` on each side and crop back at a random offset per image. (B, C, H, W)."""
    if pad == 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,))
    ox = torch.randint(0, 2 * pad + 1, (b,))
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    batch = torch.arange(b)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    images: Tensor, scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
) -> Tensor:
    """Inception-style crop of a random area fraction and aspect ratio per image, resized back (bilinear)."""
    b, _, h, w = images.shape
    area = torch.empty(b).uniform_(*scale)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_ratio.exp()
    cw = (area * aspect).sqrt().clamp(max=1.0)  # crop width, as a fraction of the image width
    ch = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(b) * 2 - 1) * (1 - cw)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (torch.rand(b) * 2 - 1) * (1 - ch)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = cw, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round().clamp(0, 255).to(images.dtype) if images.dtype == torch.uint8 else out


def random_flip(images: Tensor, dim: int) -> Tensor:
    """Flip each image along ``dim`` with probability 1/2."""
    mask = torch.rand(images.shape[0]) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(dim), images)


def random_erasing(images: Tensor, p: float, area: tuple[float, float] = (0.02, 1 / 3)) -> Tensor:
    """Erase one random rectangle per image with probability p, filled with N(0, 1) noise (Zhong et al.).

    Works on normalised float images."""
    b, c, h, w = images.shape
    apply = torch.rand(b) < p
    frac = torch.empty(b).uniform_(*area)
    aspect = torch.empty(b).uniform_(math.log(0.3), math.log(1 / 0.3)).exp()
    erased = frac * h * w  # pixels to erase, as eh rows x ew columns with ew / eh = aspect
    eh = (erased / aspect).sqrt().round().clamp(1, h).long()
    ew = (erased * aspect).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(b) * (h - eh + 1)).long()
    x0 = (torch.rand(b) * (w - ew + 1)).long()
    ys = torch.arange(h)[None, :]
    xs = torch.arange(w)[None, :]
    in_y = (ys >= y0[:, None]) & (ys < (y0 + eh)[:, None])  # (B, H)
    in_x = (xs >= x0[:, None]) & (xs < (x0 + ew)[:, None])  # (B, W)
    mask = (in_y[:, :, None] & in_x[:, None, :] & apply[:, None, None])[:, None]  # (B, 1, H, W)
    noise = torch.randn(b, c, h, w, dtype=images.dtype)
    return torch.where(mask, noise, images)


class BatchAugment:
    """Augment a uint8 batch and return normalised float images and (possibly soft) targets."""

    def __init__(
        self, config: AugmentConfig, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int
    ) -> None:
        import torchvision.transforms.v2 as T

        self.config = config
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.num_classes = num_classes
        self.auto: T.Transform | None = None
        if config.auto_augment == "randaugment":
            self.auto = T.RandAugment(num_ops=config.ra_num_ops, magnitude=config.ra_magnitude)
        elif config.auto_augment == "trivialaugment":
            self.auto = T.TrivialAugmentWide()
        mixers: list[T.Transform] = []
        if config.mixup_alpha > 0:
            mixers.append(T.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
        if config.cutmix_alpha > 0:
            mixers.append(T.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
        self.mix: T.Transform | None = T.RandomChoice(mixers) if mixers else None

    def normalize(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        c = self.config
        x = images
        if c.crop == "pad":
            x = pad_crop(x, c.pad)
        elif c.crop == "rrc":
            x = random_resized_crop(x, c.scale)
        if c.hflip:
            x = random_flip(x, -1)
        if c.vflip:
            x = random_flip(x, -2)
        if self.auto is not None:
            x = torch.stack([self.auto(img) for img in x])
        out = self.normalize(x)
        if c.random_erasing > 0:
            out = random_erasing(out, c.random_erasing)
        target = labels
        if self.mix is not None and torch.rand(()) < c.mix_prob:
            out, target = self.mix(out, labels)
        return out, target
