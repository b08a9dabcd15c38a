"""vitlab's state-dict names are timm's: timm weights load with no renaming and give the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

import vitlab
from vitlab import ViTConfig

CONFIGS = [
    ViTConfig(image_size=32, patch_size=16, hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=256, num_classes=7),
    ViTConfig(image_size=(32, 48), patch_size=8, hidden_dim=48, num_layers=3, num_heads=3, mlp_dim=96, num_classes=5),
    ViTConfig(image_size=28, patch_size=4, in_channels=1, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64),
    ViTConfig(image_size=(16, 24), patch_size=8, hidden_dim=32, num_layers=1, num_heads=4, mlp_dim=64, qkv_bias=False),
]


def timm_like(c: ViTConfig) -> VisionTransformer:
    return VisionTransformer(
        img_size=c.image_size,
        patch_size=c.patch_size,
        in_chans=c.in_channels,
        num_classes=c.num_classes,
        embed_dim=c.hidden_dim,
        depth=c.num_layers,
        num_heads=c.num_heads,
        mlp_ratio=c.mlp_dim / c.hidden_dim,
        qkv_bias=c.qkv_bias,
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.image_size}-p{c.patch_size}-c{c.in_channels}")
@torch.no_grad()
def test_timm_state_dict_loads_strictly_and_matches(config: ViTConfig) -> None:
    reference = timm_like(config).eval()
    for p in reference.parameters():  # timm zero-inits some tensors; make every weight matter
        p.normal_(0, 0.2)
    ours = vitlab.ViT(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, config.in_channels, *config.image_size)
    torch.testing.assert_close(ours(images), reference(images), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.forward_features(images), reference.forward_features(images), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@torch.no_grad()
def test_from_pretrained_reads_timm_files(tmp_path: Path, suffix: str) -> None:
    config = CONFIGS[1]
    reference = timm_like(config).eval()
    for p in reference.parameters():
        p.normal_(0, 0.2)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), str(path))
    else:
        torch.save({"state_dict": reference.state_dict()}, path)
    with pytest.raises(ValueError, match=r"num_heads cannot be read .* num_heads="):
        vitlab.from_pretrained(path)
    ours = vitlab.from_pretrained(path, num_heads=3, image_size=(32, 48))
    assert ours.config == config
    images = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(ours(images), reference(images), atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_resampled_position_embeddings_match_timm_dynamic_size(tmp_path: Path) -> None:
    """At another input size both libraries interpolate the learned grid bicubically."""
    config = CONFIGS[0]
    reference = VisionTransformer(
        img_size=32, patch_size=16, num_classes=7, embed_dim=64, depth=2, num_heads=4, dynamic_img_size=True
    ).eval()
    for p in reference.parameters():
        p.normal_(0, 0.2)
    ours = vitlab.ViT(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(2, 3, 64, 48)
    torch.testing.assert_close(ours(images), reference(images), atol=1e-4, rtol=1e-4)


def test_a_bare_state_dict_without_position_tensors_needs_pos_embed(tmp_path: Path) -> None:
    model = vitlab.create_model(CONFIGS[0], pos_embed="sincos_2d").eval()
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match="pos_embed='sincos_2d' or pos_embed='none'"):
        vitlab.from_pretrained(tmp_path / "w.safetensors", num_heads=4, image_size=32)
    loaded = vitlab.from_pretrained(tmp_path / "w.safetensors", num_heads=4, image_size=32, pos_embed="sincos_2d")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


@torch.no_grad()
def test_from_pretrained_reads_a_timm_hub_folder(tmp_path: Path) -> None:
    """A folder as timm itself writes it for the Hugging Face Hub (``timm.models.save_for_hf``): config.json
    with architecture, model_args and pretrained_cfg beside model.safetensors."""
    import timm
    from timm.models import save_for_hf

    reference = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), num_classes=3, depth=2
    ).eval()
    for p in reference.parameters():
        p.normal_(0, 0.2)
    save_for_hf(reference, str(tmp_path), model_config={"label_names": ["cat", "dog", "eel"]}, safe_serialization=True)
    ours = vitlab.from_pretrained(tmp_path)
    assert ours.config.num_heads == 3 and ours.config.image_size == (32, 48) and ours.config.num_layers == 2
    saved = reference.pretrained_cfg
    assert isinstance(saved, dict)
    assert ours.preprocessing.mean == tuple(saved["mean"]) and ours.preprocessing.crop_pct == saved["crop_pct"]
    assert ours.class_names == ["cat", "dog", "eel"]
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(vitlab.CheckpointError, match="num_heads=3"):
        vitlab.from_pretrained(tmp_path, num_heads=4)  # the folder says how many heads there are
    saved_config = (tmp_path / "config.json").read_text()
    for change, message in [
        ({"global_pool": "avg"}, "global_pool='avg'"),  # same keys as token pooling: must not load silently
        ({"act_layer": "quick_gelu"}, "act_layer"),
        ({"init_values": 1e-5}, "init_values"),
    ]:
        meta = json.loads(saved_config)
        meta["model_args"].update(change)
        (tmp_path / "config.json").write_text(json.dumps(meta))
        with pytest.raises(vitlab.CheckpointError, match=message):
            vitlab.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(saved_config)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(vitlab.CheckpointError, match="without weights"):
        vitlab.from_pretrained(tmp_path)
