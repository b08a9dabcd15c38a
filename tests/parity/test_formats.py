"""Every public checkpoint layout, written by the test in its real on-disk form with random weights, loads into
vitlab and gives the logits of the reference implementation: timm's ``_load_weights`` for Google ``.npz``,
HF transformers for HF directories, torchvision's ``VisionTransformer`` for torchvision state dicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from timm.models.vision_transformer import _load_weights

import vitlab
from vitlab import CheckpointError

D, LAYERS, HEADS, HD, MLP, P, SIZE = 64, 2, 4, 16, 128, 8, 32
GRID = SIZE // P
ATOL = 1e-4

Arrays = dict[str, np.ndarray]


def google_npz(
    *, cls: bool = True, classes: int = 10, rep: int | None = None, zero_class_pos: bool = False, seed: int = 0
) -> Arrays:
    """A random vit_jax checkpoint with the paper code's parameter names and shapes."""
    rng = np.random.default_rng(seed)

    def r(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w: Arrays = {
        "embedding/kernel": r(P, P, 3, D, scale=0.05),  # HWIO
        "embedding/bias": r(D),
        "Transformer/posembed_input/pos_embedding": r(1, GRID * GRID + int(cls), D),
        "Transformer/encoder_norm/scale": 1 + r(D),
        "Transformer/encoder_norm/bias": r(D),
    }
    if cls:
        w["cls"] = r(1, 1, D)
        if zero_class_pos:  # big_vision has no position embedding for the class token
            w["Transformer/posembed_input/pos_embedding"][:, 0] = 0
    for i in range(LAYERS):
        b = f"Transformer/encoderblock_{i}/"
        for ln in ("LayerNorm_0", "LayerNorm_2"):
            w[f"{b}{ln}/scale"] = 1 + r(D)
            w[f"{b}{ln}/bias"] = r(D)
        for name in ("query", "key", "value"):
            w[f"{b}MultiHeadDotProductAttention_1/{name}/kernel"] = r(D, HEADS, HD)
            w[f"{b}MultiHeadDotProductAttention_1/{name}/bias"] = r(HEADS, HD)
        w[f"{b}MultiHeadDotProductAttention_1/out/kernel"] = r(HEADS, HD, D)
        w[f"{b}MultiHeadDotProductAttention_1/out/bias"] = r(D)
        w[f"{b}MlpBlock_3/Dense_0/kernel"] = r(D, MLP)
        w[f"{b}MlpBlock_3/Dense_0/bias"] = r(MLP)
        w[f"{b}MlpBlock_3/Dense_1/kernel"] = r(MLP, D)
        w[f"{b}MlpBlock_3/Dense_1/bias"] = r(D)
    head_in = D
    if rep is not None:
        w["pre_logits/kernel"] = r(D, rep)
        w["pre_logits/bias"] = r(rep)
        head_in = rep
    if classes:
        w["head/kernel"] = r(head_in, classes)
        w["head/bias"] = r(classes)
    return w


def to_big_vision(w: Arrays, *, stacked: bool = False) -> Arrays:
    """The same weights as big_vision names them: params/, *_0 / LayerNorm_1, top-level pos_embedding."""
    out: Arrays = {}
    for k, v in w.items():
        k = k.replace("MultiHeadDotProductAttention_1", "MultiHeadDotProductAttention_0")
        k = k.replace("LayerNorm_2", "LayerNorm_1").replace("MlpBlock_3", "MlpBlock_0")
        if k == "Transformer/posembed_input/pos_embedding":
            k, v = "pos_embedding", (v[:, 1:] if "cls" in w else v)
        out[f"params/{k}"] = v
    if stacked:
        blocks = sorted({k.split("/", 3)[3] for k in out if "/encoderblock_" in k})
        for name in blocks:
            layers = [out.pop(f"params/Transformer/encoderblock_{i}/{name}") for i in range(LAYERS)]
            out[f"params/Transformer/encoderblock/{name}"] = np.stack(layers)
    return out


def save_npz(w: Arrays, path: Path) -> Path:
    arrays: dict[str, Any] = dict(w)
    np.savez(path, **arrays)
    return path


def timm_model(**kw: Any) -> TimmViT:
    args: dict[str, Any] = dict(img_size=SIZE, patch_size=P, embed_dim=D, depth=LAYERS, num_heads=HEADS)
    args.update(mlp_ratio=MLP / D, num_classes=10)
    args.update(kw)
    return TimmViT(**args).eval()


def images(n: int = 2, size: tuple[int, int] = (SIZE, SIZE), channels: int = 3) -> torch.Tensor:
    return torch.randn(n, channels, *size)


# ----------------------------------------------------------------------------------------- vit_jax
@torch.no_grad()
def test_vit_jax_npz_matches_timm(tmp_path: Path) -> None:
    path = save_npz(google_npz(), tmp_path / "ViT-T_8.npz")
    reference = timm_model()
    _load_weights(reference, str(path))
    ours = vitlab.from_pretrained(path)
    c = ours.config
    assert (c.num_heads, c.hidden_dim, c.num_layers, c.mlp_dim, c.patch_size) == (HEADS, D, LAYERS, MLP, P)
    assert ours.preprocessing.mean == (0.5, 0.5, 0.5) and ours.preprocessing.std == (0.5, 0.5, 0.5)
    x = images()
    torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_vit_jax_gap_npz_matches_timm(tmp_path: Path) -> None:
    path = save_npz(google_npz(cls=False), tmp_path / "gap.npz")
    reference = timm_model(class_token=False, global_pool="avg", fc_norm=False)
    _load_weights(reference, str(path))
    ours = vitlab.from_pretrained(path)
    assert ours.config.pool == "gap"
    x = images()
    torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_vit_jax_pre_logits_is_the_tanh_representation_layer(tmp_path: Path) -> None:
    w = google_npz(rep=32, classes=21)
    path = save_npz(w, tmp_path / "i21k.npz")
    reference = timm_model(num_classes=0)  # timm no longer builds the pre-logits layer: apply it by hand
    _load_weights(reference, str(path))
    ours = vitlab.from_pretrained(path)
    assert ours.config.representation_size == 32 and ours.config.num_classes == 21
    x = images()
    pooled = reference(x)
    hidden = torch.tanh(pooled @ torch.from_numpy(w["pre_logits/kernel"]) + torch.from_numpy(w["pre_logits/bias"]))
    expected = hidden @ torch.from_numpy(w["head/kernel"]) + torch.from_numpy(w["head/bias"])
    torch.testing.assert_close(ours(x), expected, atol=ATOL, rtol=ATOL)
    dropped = vitlab.from_pretrained(path, representation_size=None, num_classes=0)
    torch.testing.assert_close(dropped(x), pooled, atol=ATOL, rtol=ATOL)


# -------------------------------------------------------------------------------------- big_vision
@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "scan-stacked"])
@torch.no_grad()
def test_big_vision_equals_the_same_weights_as_vit_jax(tmp_path: Path, stacked: bool) -> None:
    w = google_npz(zero_class_pos=True)
    google = vitlab.from_pretrained(save_npz(w, tmp_path / "google.npz"))
    ours = vitlab.from_pretrained(save_npz(to_big_vision(w, stacked=stacked), tmp_path / "bv.npz"))
    x = images()
    torch.testing.assert_close(ours(x), google(x), atol=ATOL, rtol=ATOL)
    for k, v in google.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], v, msg=k)


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "scan-stacked"])
@torch.no_grad()
def test_big_vision_gap_matches_vit_jax_and_timm(tmp_path: Path, stacked: bool) -> None:
    w = google_npz(cls=False)
    google = vitlab.from_pretrained(save_npz(w, tmp_path / "google.npz"))
    bv_path = save_npz(to_big_vision(w, stacked=stacked), tmp_path / "bv.npz")
    ours = vitlab.from_pretrained(bv_path)
    assert ours.config.pool == "gap"
    reference = timm_model(class_token=False, global_pool="avg", fc_norm=False)  # norm, then mean: big_vision
    _load_weights(reference, str(bv_path))
    x = images()
    torch.testing.assert_close(ours(x), google(x), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=ATOL)


# --------------------------------------------------------------------------------- HF transformers
def hf_config(**kw: Any) -> Any:
    from transformers import ViTConfig as HFConfig

    args: dict[str, Any] = dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    args.update(intermediate_size=MLP, image_size=SIZE, patch_size=P)
    args.update(kw)
    return HFConfig(**args)


def perturb(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@torch.no_grad()
def test_hf_image_classification_dir_matches_transformers(tmp_path: Path) -> None:
    from transformers import ViTForImageClassification

    labels = {i: name for i, name in enumerate("abcde")}
    reference = ViTForImageClassification(hf_config(num_labels=5, id2label=labels, label2id={}))
    perturb(reference)
    reference.eval().save_pretrained(tmp_path / "hf")
    ours = vitlab.from_pretrained(tmp_path / "hf")
    assert ours.config.layer_norm_eps == pytest.approx(1e-12)
    assert ours.config.num_heads == HEADS and ours.class_names == list("abcde")
    x = images()
    torch.testing.assert_close(ours(x), reference(pixel_values=x).logits, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("prefixed", [False, True], ids=["ViTModel", "vit.-prefixed"])
@torch.no_grad()
def test_hf_vit_model_pooler_is_pre_logits(tmp_path: Path, prefixed: bool) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import ViTModel

    reference = ViTModel(hf_config(), add_pooling_layer=True)
    perturb(reference)
    reference.eval().save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    if prefixed:  # the encoder of a classification checkpoint, saved with its "vit." prefix
        save_file({f"vit.{k}": v for k, v in load_file(str(weights)).items()}, str(weights))
    ours = vitlab.from_pretrained(tmp_path / "hf")
    assert ours.config.num_classes == 0 and ours.config.representation_size == D
    x = images()
    out = reference(pixel_values=x)
    torch.testing.assert_close(ours(x), out.pooler_output, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours.forward_features(x), out.last_hidden_state, atol=ATOL, rtol=ATOL)


# ------------------------------------------------------------------------------------- torchvision
def torchvision_model(representation_size: int | None = None) -> Any:
    from torchvision.models.vision_transformer import VisionTransformer

    model = VisionTransformer(
        image_size=SIZE, patch_size=P, num_layers=LAYERS, num_heads=HEADS, hidden_dim=D, mlp_dim=MLP,
        num_classes=10, representation_size=representation_size,
    )  # fmt: skip
    perturb(model)
    return model.eval()


@pytest.mark.parametrize("rep", [None, 32], ids=["plain", "pre-logits"])
@torch.no_grad()
def test_torchvision_state_dict_matches_torchvision(tmp_path: Path, rep: int | None) -> None:
    reference = torchvision_model(rep)
    path = tmp_path / "vit_tv.pth"
    torch.save(reference.state_dict(), path)
    ours = vitlab.from_pretrained(path, num_heads=HEADS)
    assert ours.config.layer_norm_eps == 1e-6 and ours.config.representation_size == rep
    assert ours.preprocessing.mean == (0.485, 0.456, 0.406)
    x = images()
    torch.testing.assert_close(ours(x), reference(x), atol=ATOL, rtol=ATOL)


def test_torchvision_without_num_heads_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "vit_tv.pth"
    torch.save(torchvision_model().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"num_heads.*from_pretrained\(path, num_heads=1\).*--num-heads"):
        vitlab.from_pretrained(path)


# ------------------------------------------------------------------------------------- adaptation
@pytest.mark.parametrize("size", [48, (32, 48), (48, 24)], ids=str)
@torch.no_grad()
def test_resampling_equals_on_the_fly_interpolation(tmp_path: Path, size: int | tuple[int, int]) -> None:
    """Loading at a new size (paper Section 3.2) gives what the native model computes on those images."""
    path = save_npz(google_npz(), tmp_path / "w.npz")
    native = vitlab.from_pretrained(path)
    resized = vitlab.from_pretrained(path, image_size=size)
    hw = (size, size) if isinstance(size, int) else size
    assert resized.config.image_size == hw and resized.preprocessing.image_size == hw
    assert resized.pos_embed is not None
    assert resized.pos_embed.shape[1] == 1 + (hw[0] // P) * (hw[1] // P)
    x = images(size=hw)
    torch.testing.assert_close(resized(x), native(x), atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_new_head_is_zero_and_keeps_the_features(tmp_path: Path) -> None:
    path = save_npz(google_npz(), tmp_path / "w.npz")
    native = vitlab.from_pretrained(path, class_names=[str(i) for i in range(10)])
    assert native.class_names is not None
    fine_tune = vitlab.from_pretrained(path, num_classes=3)
    assert fine_tune.class_names is None
    x = images()
    assert torch.count_nonzero(fine_tune(x)) == 0 and fine_tune(x).shape == (2, 3)
    torch.testing.assert_close(fine_tune.forward_features(x), native.forward_features(x))


@torch.no_grad()
def test_grey_input_sums_the_rgb_filters(tmp_path: Path) -> None:
    path = save_npz(google_npz(), tmp_path / "w.npz")
    rgb = vitlab.from_pretrained(path)
    grey = vitlab.from_pretrained(path, in_channels=1)
    x = images(channels=1)
    assert len(grey.preprocessing.mean) == 1
    torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=ATOL, rtol=ATOL)


def test_heads_read_from_the_file_cannot_be_overridden(tmp_path: Path) -> None:
    path = save_npz(google_npz(), tmp_path / "w.npz")
    with pytest.raises(CheckpointError, match="num_heads=4"):
        vitlab.from_pretrained(path, num_heads=8)
