"""A picture reaches the model as the reference library of its checkpoint would give it: torchvision's and
timm's evaluation transforms (short side to floor(size / crop_pct), centre crop) pixel for pixel, and HF's
ViTImageProcessor (straight to the size) to within one level, on non-square pictures of odd and even margins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.config import Preprocessing
from vitlab.evaluate import normalize
from vitlab.preprocess import resize_crop, to_uint8_tensor

SHAPES = [(50, 41), (41, 50), (37, 64), (32, 32), (90, 33)]  # (height, width)


def _picture(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = np.cumsum(rng.integers(-20, 21, (height, width, 3)), axis=1)  # structure, so that filters matter
    return Image.fromarray(np.clip(smooth + 128, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("resize", "interpolation"), [(36, "bilinear"), (37, "bicubic"), (32, "bicubic")])
def test_center_crop_equals_torchvisions_resize_and_center_crop(
    shape: tuple[int, int], resize: int, interpolation: str
) -> None:
    from torchvision import transforms as T

    im = _picture(*shape)
    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[interpolation]
    reference = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(32)])(im)
    pre = Preprocessing(image_size=32, crop_pct=32 / resize, interpolation=interpolation)  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(resize_crop(im, pre)), np.asarray(reference))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("crop_pct", "crop_mode", "size"),
    [
        (0.9, "center", (32, 32)),
        (0.875, "center", (32, 32)),
        (1.0, "squash", (32, 32)),
        (0.9, "squash", (32, 32)),
        (1.0, "center", (24, 32)),  # another aspect ratio: timm's ResizeKeepRatio
        (0.9, "center", (32, 20)),
    ],
)
def test_model_input_equals_timms_eval_transform(
    shape: tuple[int, int], crop_pct: float, crop_mode: str, size: tuple[int, int]
) -> None:
    from timm.data import create_transform

    im = _picture(*shape, seed=1)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = create_transform(
        input_size=(3, *size),
        is_training=False,
        interpolation="bicubic",
        crop_pct=crop_pct,
        crop_mode=crop_mode,
        mean=mean,
        std=std,
    )(im)
    pre = Preprocessing(image_size=size, mean=mean, std=std, crop_pct=crop_pct, crop_mode=crop_mode)  # type: ignore[arg-type]
    ours = normalize(to_uint8_tensor(im, pre, 3)[None], pre.mean, pre.std)[0]
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_an_hf_directory_preprocesses_as_its_image_processor(tmp_path: Path) -> None:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification, ViTImageProcessor

    hf = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    hf.patch_size, hf.num_labels = 8, 3
    ViTForImageClassification(hf).save_pretrained(tmp_path)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.2, 0.3, 0.4], image_std=[0.5] * 3)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["resample"] == 2  # HF's default
    model = vitlab.from_pretrained(tmp_path)
    pre = model.preprocessing
    assert (pre.crop_mode, pre.interpolation, pre.crop_pct) == ("squash", "bilinear", 1.0)
    for shape in SHAPES:
        im = _picture(*shape, seed=2)
        reference = processor(im, return_tensors="pt")["pixel_values"][0]
        ours = normalize(to_uint8_tensor(im, pre, 3)[None], pre.mean, pre.std)[0]
        # transformers 5 resizes with torchvision on tensors, vitlab with PIL: the same geometry and filter, a
        # rounding apart in a few pixels
        levels = ((ours - reference) * 0.5 * 255).abs()  # in 8-bit levels (std 0.5)
        assert levels.max() < 1.01 and levels.mean() < 0.5  # a centre crop would be off by 50-170 levels


def test_a_deit_style_hf_directory_resizes_then_crops(tmp_path: Path) -> None:
    from transformers import DeiTImageProcessor, ViTForImageClassification
    from transformers import ViTConfig as HFConfig

    hf = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    hf.patch_size, hf.num_labels = 8, 3
    ViTForImageClassification(hf).save_pretrained(tmp_path)
    processor = DeiTImageProcessor(size={"height": 36, "width": 36}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path)
    pre = vitlab.from_pretrained(tmp_path).preprocessing
    assert (pre.crop_mode, pre.image_size, pre.crop_pct) == ("squash", (32, 32), 32 / 36)
    for shape in SHAPES:
        im = _picture(*shape, seed=3)
        reference = processor(im, return_tensors="pt")["pixel_values"][0]
        ours = normalize(to_uint8_tensor(im, pre, 3)[None], pre.mean, pre.std)[0]
        levels = ((ours - reference) * torch.tensor(pre.std).view(3, 1, 1) * 255).abs()
        # bicubic here: torchvision's kernel (a = -0.75) is not PIL's (a = -0.5); geometry errors cost tens of levels
        assert levels.max() < 4.01 and levels.mean() < 0.5


def test_crop_mode_is_saved_and_checked(tmp_path: Path) -> None:
    pre = Preprocessing(image_size=32, crop_pct=0.9, crop_mode="squash")
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    center = Preprocessing(image_size=32, crop_pct=0.9)
    assert "crop_mode" not in center.to_dict()  # the default is left out: older vitlab reads the file
    assert Preprocessing.from_dict(center.to_dict()) == center
    with pytest.raises(ValueError, match="crop_mode 'border' is not one of"):
        Preprocessing(crop_mode="border")  # type: ignore[arg-type]


def test_hf_processor_configs_map_to_their_geometry(tmp_path: Path) -> None:
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification

    hf = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    hf.patch_size, hf.num_labels = 8, 3
    ViTForImageClassification(hf).save_pretrained(tmp_path)
    config = tmp_path / "preprocessor_config.json"
    cases = [  # (processor config, (crop_mode, image_size, crop_pct))
        ({"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True},
         ("center", (32, 32), 32 / 36)),  # short side to 36, centre crop: torchvision's geometry
        ({"size": {"height": 36, "width": 36}, "crop_size": 32}, ("squash", (32, 32), 32 / 36)),  # crop by default
        ({"image_processor_type": "ViTImageProcessor", "size": {"height": 32, "width": 32}, "crop_size": 28},
         ("squash", (32, 32), 1.0)),  # ViT's processor never crops
    ]  # fmt: skip
    for meta, want in cases:
        config.write_text(json.dumps(meta))
        pre = vitlab.from_pretrained(tmp_path).preprocessing
        assert (pre.crop_mode, pre.image_size, pre.crop_pct) == want, meta
    for bad, message in [({"size": {"height": 0, "width": 0}, "crop_size": 32}, "must be positive"),
                         ({"size": {"longest_edge": 32}}, "shortest_edge")]:  # fmt: skip
        config.write_text(json.dumps(bad))
        with pytest.raises(vitlab.CheckpointError, match=message):
            vitlab.from_pretrained(tmp_path)
