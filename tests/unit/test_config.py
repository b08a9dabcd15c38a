from __future__ import annotations

import pytest
import torch

import vitlab
from vitlab import ViTConfig
from vitlab.model import count_parameters, flops_per_image


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("B/16", 86_567_656),
        ("B/32", 88_224_232),
        ("L/16", 304_326_632),
        ("L/32", 306_535_400),
        ("H/14", 632_045_800),
    ],
)
def test_paper_parameter_counts_on_meta(name: str, params: int) -> None:
    with torch.device("meta"):
        model = vitlab.create_model(name)
    assert count_parameters(model) == params
    assert next(model.parameters()).device.type == "meta"


def test_presets_follow_table_1() -> None:
    c = ViTConfig.from_name("L/16")
    assert (c.hidden_dim, c.num_layers, c.num_heads, c.mlp_dim, c.patch_size) == (1024, 24, 16, 4096, 16)
    c = ViTConfig.from_name("Ti/4", image_size=28, in_channels=1, num_classes=10)
    assert (c.hidden_dim, c.num_heads, c.image_size, c.num_patches) == (192, 3, (28, 28), 49)


def test_flops_of_b16_match_the_known_17_6_gmac() -> None:
    assert flops_per_image(ViTConfig.from_name("B/16")) / 2 == pytest.approx(17.56e9, rel=2e-3)


def test_image_size_accepts_int_or_pair_and_round_trips() -> None:
    c = ViTConfig(image_size=(32, 48), patch_size=16)
    assert c.grid_size == (2, 3)
    assert ViTConfig.from_dict(c.to_dict()) == c
    assert ViTConfig(image_size=32, patch_size=16).image_size == (32, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(image_size=30, patch_size=16), "not a multiple of patch_size 16"),
        (dict(hidden_dim=100, num_heads=3), "does not divide hidden_dim 100"),
        (dict(pos_embed="rope"), "pos_embed 'rope' is not one of"),
        (dict(pool="max"), "pool 'max' is not one of"),
        (dict(dropout=1.5), "dropout must be a probability"),
        (dict(num_classes=-1), "num_classes must be"),
        (dict(hidden_dim=66, num_heads=2, pos_embed="sincos_2d"), "divisible by 4"),
        (dict(image_size=(1, 2, 3)), "image_size must be"),
        (dict(representation_size=0), "representation_size"),
    ],
)
def test_bad_config_values_name_the_problem(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_bad_preset_and_override_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'X/16'"):
        vitlab.create_model("X/16")
    with pytest.raises(ValueError, match="unknown ViTConfig field"):
        vitlab.create_model("Ti/16", hidden=3)


def test_config_is_frozen() -> None:
    c = ViTConfig()
    with pytest.raises(AttributeError):
        c.hidden_dim = 3  # type: ignore[misc]
