"""Image files to model inputs, with the checkpoint's own preprocessing.

Every PIL mode becomes what the model expects: greyscale models get luma ("L"; 16-bit images scaled, not
clipped), RGB models get RGB (palettes and CMYK converted). Transparent pixels are composited on white, as
training's loader does, so that a file looks the same to training and to prediction. EXIF orientation is
applied. Decompression bombs (more pixels than PIL's limit) are refused; any other failure to decode or orient
a file is an :class:`ImageReadError` that names it. Resizing and cropping follow the checkpoint's
:class:`~vitlab.config.Preprocessing` with the arithmetic of the library it came from: timm's and torchvision's
evaluation transforms (``crop_mode="center"``: short side to ``floor(image_size / crop_pct)``, centre crop) or
HF's ViTImageProcessor (``"squash"``: both sides straight to the size; DeiT's processor then centre-crops),
on PIL images with PIL's filters.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from vitlab.config import Preprocessing

_INTERPOLATION = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """A file could not be read as an image; the message says why."""


def open_image(path: str | Path) -> Image.Image:
    """Open, fully decode and orient an image; raises :class:`ImageReadError` with the reason."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError("no such file")
    if path.is_dir():
        raise ImageReadError("is a directory")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as f:
                f.load()
                return (ImageOps.exif_transpose(f) or f).copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"refused as a possible decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image (unknown or unreadable format)") from None
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, struct.error in EXIF...)
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        reason = f"{kind}: {e}" if str(e) else kind  # "struct.error: ...", not a bare "error: ..."
        raise ImageReadError(f"cannot decode ({reason})") from None


def flatten_alpha(im: Image.Image) -> Image.Image:
    """An image with transparency (LA, La, PA, RGBA, RGBa, P with a transparent colour) as "L" or "RGB",
    composited on a white background; an image of any other mode is returned unchanged."""
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
    if im.mode in ("La", "RGBa"):  # premultiplied alpha: undo it before compositing
        im = im.convert(im.mode.upper())
    if im.mode not in ("LA", "RGBA"):
        return im
    colour = im.mode[:-1]
    background = Image.new(colour, im.size, "white")  # not 255: for "RGB" that packed int is red
    background.paste(im.convert(colour), mask=im.getchannel("A"))
    return background


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to "L" (channels=1) or "RGB" (channels=3), transparency composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if im.mode == "F" and arr.max() <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    im = flatten_alpha(im)
    if channels == 1:
        return im if im.mode == "L" else im.convert("RGB").convert("L")
    return im if im.mode == "RGB" else im.convert("RGB")


def resize_target(pre: Preprocessing) -> tuple[int, int]:
    """``floor(image_size / crop_pct)`` per side, as timm computes it (1e-6: 224 / (224 / 242) is 242)."""
    h, w = pre.image_size
    return math.floor(h / pre.crop_pct + 1e-6), math.floor(w / pre.crop_pct + 1e-6)


def resized_size(height: int, width: int, pre: Preprocessing) -> tuple[int, int]:
    """(height, width) an image of ``height`` x ``width`` is resized to before the centre crop: timm's evaluation
    arithmetic (``floor(image_size / crop_pct)``; "center": torchvision's short-side resize, the long side
    truncated; "squash": both sides to it)."""
    h, w = resize_target(pre)
    if pre.crop_mode == "squash":
        return h, w
    if h == w:  # torchvision's Resize(int): the short side to h, the long one truncated
        return (h, int(h * width / height)) if height <= width else (int(h * height / width), h)
    ratio = min(height / h, width / w)  # timm's ResizeKeepRatio for other aspect ratios: cover both, rounded
    return round(height / ratio), round(width / ratio)


def crop_offsets(height: int, width: int, pre: Preprocessing) -> tuple[int, int]:
    """(top, left) of the centre crop of ``image_size`` from a ``height`` x ``width`` image (torchvision's
    CenterCrop rounding)."""
    h, w = pre.image_size
    return round((height - h) / 2.0), round((width - w) / 2.0)  # half to even, as Python rounds


def resize_crop(im: Image.Image, pre: Preprocessing) -> Image.Image:
    h, w = pre.image_size
    nh, nw = resized_size(im.height, im.width, pre)
    if (nh, nw) != (im.height, im.width):
        im = im.resize((nw, nh), _INTERPOLATION[pre.interpolation])
    top, left = crop_offsets(nh, nw, pre)
    return im.crop((left, top, left + w, top + h))


def to_uint8_tensor(im: Image.Image, pre: Preprocessing, channels: int) -> Tensor:
    """(C, H, W) uint8, resized and cropped as ``pre`` says."""
    arr = np.asarray(resize_crop(to_mode(im, channels), pre), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def load_for_model(path: str | Path, pre: Preprocessing, channels: int) -> Tensor:
    """An image file as a uint8 (C, H, W) tensor ready for ``evaluate.normalize``."""
    return to_uint8_tensor(open_image(path), pre, channels)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (their image files, recursively, sorted) and glob patterns, in the order given.

    A name that matches nothing is kept, so that it is reported as missing; a folder with no image files gives
    nothing."""
    import glob

    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif any(ch in item for ch in "*?[") and not p.exists():
            matches = [Path(m) for m in sorted(glob.glob(item, recursive=True)) if Path(m).is_file()]
            out.extend(matches or [p])
        else:
            out.append(p)
    return out
