"""Which patch grid a checkpoint's position embeddings were trained on: from its own metadata when it has some,
square for a square count in the formats that are only ever square, and for a bare timm state dict the size asked
for when it fits (said with a warning when a square grid would fit too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vitlab
from tests.parity.test_formats import google_npz, images, save_npz
from vitlab import pos_embed as pe
from vitlab.checkpoint import save_hf, save_timm

CONFIG = dict(patch_size=8, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64, num_classes=5)


def model_at(size: tuple[int, int]) -> vitlab.ViT:
    torch.manual_seed(0)
    model = vitlab.ViT(vitlab.ViTConfig(image_size=size, **CONFIG)).eval()  # type: ignore[arg-type]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def timm_file(model: vitlab.ViT, tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def timm_dir(model: vitlab.ViT, tmp_path: Path) -> Path:
    return save_timm(model, tmp_path / "timm")


def hf_dir(model: vitlab.ViT, tmp_path: Path) -> Path:
    return save_hf(model, tmp_path / "hf")


WRITERS: dict[str, Callable[[vitlab.ViT, Path], Path]] = {"timm-file": timm_file, "timm-dir": timm_dir, "hf": hf_dir}


@pytest.mark.parametrize("fmt", ["timm-dir", "hf"])
@torch.no_grad()
def test_square_grid_asked_for_at_a_size_with_as_many_patches_is_resampled(tmp_path: Path, fmt: str) -> None:
    """4x4 patches saved, 2x8 asked for: 16 patches both ways, but the embeddings must be resampled, not reshaped."""
    native = model_at((32, 32))
    path = WRITERS[fmt](native, tmp_path)
    wide = vitlab.from_pretrained(path, image_size=(16, 64), num_heads=4)
    assert wide.config.grid_size == (2, 8)
    assert wide.pos_embed is not None and native.pos_embed is not None
    expected = pe.resample_pos_embed(native.pos_embed, (4, 4), (2, 8), 1)
    torch.testing.assert_close(wide.pos_embed, expected)
    x = images(size=(16, 64))
    torch.testing.assert_close(wide(x), native(x), atol=1e-4, rtol=1e-4)  # = the native model's own interpolation


@torch.no_grad()
def test_a_bare_state_dict_takes_the_asked_grid_and_says_so(tmp_path: Path) -> None:
    """No recorded size: 16 embeddings asked for at 2x8 are taken as a 2x8 grid (it may have been trained so), with a
    warning naming the way to resample a square one instead: through a folder that records its size."""
    wide_native = model_at((16, 64))
    path = timm_file(wide_native, tmp_path)
    with pytest.warns(UserWarning, match="records no image size: its 16 position embeddings are taken as the 2x8"):
        wide = vitlab.from_pretrained(path, image_size=(16, 64), num_heads=4)
    x = images(size=(16, 64))
    torch.testing.assert_close(wide(x), wide_native(x))
    square_native = model_at((32, 32))
    (tmp_path / "sq").mkdir()
    with pytest.warns(UserWarning):
        assert vitlab.from_pretrained(timm_file(square_native, tmp_path / "sq"), image_size=(16, 64), num_heads=4)
    square = vitlab.from_pretrained(timm_file(square_native, tmp_path / "sq"), num_heads=4)  # its own size: no warning
    square.save_pretrained(tmp_path / "folder")
    resampled = vitlab.from_pretrained(tmp_path / "folder", image_size=(16, 64))
    torch.testing.assert_close(resampled(x), square_native(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["timm-dir", "hf"])
@torch.no_grad()
def test_non_square_grid_from_the_metadata_loads_at_any_size(tmp_path: Path, fmt: str) -> None:
    """A 2x8 checkpoint whose files record its size loads at 32x32 (4x4, the same count) and at 48x48 (6x6)."""
    native = model_at((16, 64))
    path = WRITERS[fmt](native, tmp_path)
    for size in [(32, 32), (48, 48)]:
        resized = vitlab.from_pretrained(path, image_size=size)
        x = images(size=size)
        torch.testing.assert_close(resized(x), native(x), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_npz_square_grid_at_a_size_with_as_many_patches(tmp_path: Path) -> None:
    path = save_npz(google_npz(), tmp_path / "w.npz")  # 32x32 at patch 8: a 4x4 grid
    native = vitlab.from_pretrained(path)
    wide = vitlab.from_pretrained(path, image_size=(16, 64))
    x = images(size=(16, 64))
    torch.testing.assert_close(wide(x), native(x), atol=1e-4, rtol=1e-4)


def test_grid_from_tokens_rules() -> None:
    assert pe.grid_from_tokens(16, hint=(2, 8)) == (4, 4)  # a square count in an always-square format is square
    with pytest.warns(UserWarning, match="not resampled from 4x4"):
        assert pe.grid_from_tokens(16, hint=(2, 8), prefer_hint=True) == (2, 8)  # a bare timm state dict
    assert pe.grid_from_tokens(16, hint=(2, 8), known=(2, 8)) == (2, 8)  # the metadata says otherwise
    assert pe.grid_from_tokens(16, known=(3, 3)) == (4, 4)  # metadata that does not fit is not believed
    assert pe.grid_from_tokens(24, hint=(4, 6)) == (4, 6)  # a non-square count: only the caller can tell
    with pytest.raises(ValueError, match="24 position embeddings do not form a square grid"):
        pe.grid_from_tokens(24, hint=(5, 5))
