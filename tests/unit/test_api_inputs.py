"""The Python API's answers to inputs a researcher gets wrong: a clear error naming the problem, never a wrong
result or a checkpoint that cannot be read back."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import vitlab
from vitlab import Preprocessing, ViTConfig
from vitlab.analysis import attention_rollout, filter_components, mean_attention_distance

SMALL = dict(image_size=32, patch_size=8, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64, num_classes=3)


@pytest.fixture(scope="module")
def model() -> vitlab.ViT:
    torch.manual_seed(0)
    return vitlab.ViT(ViTConfig(**SMALL)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("side", [32, 72], ids=["explicit-attention", "fused-attention"])
@torch.no_grad()
def test_an_empty_batch_gives_empty_outputs(model: vitlab.ViT, side: int) -> None:
    x = torch.randn(0, 3, side, side)
    assert model(x).shape == (0, 3)
    assert model.forward_features(x).shape == (0, 1 + (side // 8) ** 2, 32)
    assert model.attention_maps(x)[0].shape == (0, 2, 1 + (side // 8) ** 2, 1 + (side // 8) ** 2)


def test_images_that_are_not_float_tensors(model: vitlab.ViT) -> None:
    with pytest.raises(TypeError, match=r"expected float images .* got torch\.uint8"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="expected a tensor of images"):
        model([[0.0]])


def test_class_names_must_fit_the_head(model: vitlab.ViT, tmp_path: Path) -> None:
    fresh = vitlab.ViT(ViTConfig(**SMALL))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1 class names for num_classes=4"):
        fresh.reset_classifier(4, class_names=["a"])
    fresh.class_names = ["a", "b"]  # set by hand, one short
    with pytest.raises(ValueError, match=r"2 class names for num_classes=3: fix model\.class_names"):
        fresh.save_pretrained(tmp_path / "ck")
    assert not (tmp_path / "ck").exists()  # refused before anything was written


def test_preprocessing_is_checked(tmp_path: Path) -> None:
    grey = ViTConfig(**{**SMALL, "in_channels": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"3 channel statistics .* 1 input channel"):
        vitlab.ViT(grey, preprocessing=Preprocessing(image_size=32))
    with pytest.raises(TypeError, match="must be a vitlab Preprocessing, not dict"):
        vitlab.ViT(grey, preprocessing={"image_size": 32})  # type: ignore[arg-type]
    for bad in [dict(image_size=0), dict(mean=(math.nan,) * 3), dict(std=(math.inf,) * 3)]:
        with pytest.raises(ValueError, match=r"image_size must be|mean must be finite"):
            Preprocessing(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"unknown Preprocessing field\(s\) \['foo'\]"):
        Preprocessing().replace(foo=1)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("qkv_bias", "no", "qkv_bias must be True or False"),
        ("layer_norm_eps", math.nan, "layer_norm_eps must be a finite number > 0"),
        ("layer_norm_eps", True, "layer_norm_eps must be a finite number > 0"),
        ("dropout", False, "dropout must be a probability"),
    ],
)
def test_config_fields_of_the_wrong_type(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**{**SMALL, field: value})  # type: ignore[arg-type]


@torch.no_grad()
def test_analysis_helpers_refuse_what_they_cannot_mean(model: vitlab.ViT) -> None:
    maps = model.attention_maps(torch.randn(2, 3, 32, 32))  # 17 tokens: a 4x4 grid and the class token
    assert mean_attention_distance(maps, (4, 4), 8).shape == (1, 2)
    with pytest.raises(ValueError, match=r"the maps have 17 tokens, the grid \(3, 3\) has 9 patches"):
        mean_attention_distance(maps, (3, 3), 8)
    with pytest.raises(ValueError, match="residual must be in"):
        attention_rollout(maps, residual=2.0)
    with pytest.raises(ValueError, match="at least one layer"):
        mean_attention_distance([], (4, 4), 8)
    with pytest.raises(ValueError, match="differ in shape"):
        attention_rollout([maps[0], maps[0][:, :, :9, :9]])
    with pytest.raises(ValueError, match="k must be >= 1"):
        filter_components(model.patch_embed.proj.weight, k=-1)
