from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitlab
from vitlab import ViTConfig
from vitlab.config import POOL_CHOICES, POS_EMBED_CHOICES
from vitlab.model import DropPath

KINDS = [(p, q) for p in POS_EMBED_CHOICES for q in POOL_CHOICES]


def test_patch_projection_equals_reshape_then_linear(tiny: ViTConfig) -> None:
    """Steps 1-2: the strided conv is x_p E with x_p the flattened P x P x C patches."""
    model = vitlab.create_model(tiny.replace(image_size=(32, 48), in_channels=3))
    images = torch.randn(2, 3, 32, 48)
    p = tiny.patch_size
    b, c, h, w = images.shape
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    conv = model.patch_embed.proj
    explicit = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    torch.testing.assert_close(model.patch_embed(images), explicit, atol=1e-5, rtol=1e-5)
    assert explicit.shape == (2, (h // p) * (w // p), tiny.hidden_dim)


@pytest.mark.parametrize(("pos_embed", "pool"), KINDS)
def test_explicit_attention_path_reproduces_fused_forward(tiny: ViTConfig, pos_embed: str, pool: str) -> None:
    model = vitlab.create_model(tiny, pos_embed=pos_embed, pool=pool).eval()
    with torch.no_grad():  # give relative tables and class-token biases non-zero values
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_explicit(images), model(images), atol=1e-5, rtol=1e-5)
        maps = model.attention_maps(images)
    t = 16 + (1 if pool == "token" else 0)
    assert len(maps) == tiny.num_layers
    for m in maps:
        assert m.shape == (3, tiny.num_heads, t, t)
        torch.testing.assert_close(m.sum(-1), torch.ones(3, tiny.num_heads, t))


@pytest.mark.parametrize(("pos_embed", "pool"), KINDS)
def test_every_kind_learns_a_tiny_batch(tiny: ViTConfig, pos_embed: str, pool: str) -> None:
    model = vitlab.create_model(tiny, pos_embed=pos_embed, pool=pool, num_classes=4)
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(8) % 4
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(("pos_embed", "pool"), KINDS)
def test_gradients_reach_every_parameter(tiny: ViTConfig, pos_embed: str, pool: str) -> None:
    model = vitlab.create_model(tiny, pos_embed=pos_embed, pool=pool, representation_size=32)
    images = torch.randn(2, 3, 32, 32)
    # all tokens, not just the pooled one: the last layer's patch-to-patch attention reaches no logit
    (model(images).square().sum() + model.forward_features(images).square().sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("pos_embed", POS_EMBED_CHOICES)
def test_other_input_sizes_work_and_native_size_is_unchanged(tiny: ViTConfig, pos_embed: str) -> None:
    model = vitlab.create_model(tiny, pos_embed=pos_embed).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 48, 64)).shape == (2, 10)
        assert model(torch.randn(1, 3, 8, 8)).shape == (1, 10)
        pos = model.position_embeddings(tiny.grid_size)
    if pos_embed == "learned":
        assert model.pos_embed is not None
        torch.testing.assert_close(pos, model.pos_embed)


def test_bad_inputs_name_the_sizes(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny)
    with pytest.raises(ValueError, match=r"image size 30x32 is not a multiple of the patch size 8"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"takes 3 channel\(s\), got images with 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expected images of shape"):
        model(torch.randn(3, 32, 32))


def test_forward_features_and_head_split(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny, representation_size=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert tokens.shape == (2, 17, 64)
        torch.testing.assert_close(model.forward_head(tokens), model(images))
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 16)
    assert vitlab.create_model(tiny, num_classes=0)(images).shape == (2, 64)


def test_gap_pool_is_mean_of_normed_patch_tokens(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny, pool="gap", num_classes=0).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert tokens.shape == (2, 16, 64)
        torch.testing.assert_close(model(images), tokens.mean(1))


def test_dropout_and_drop_path_act_only_in_training(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny, dropout=0.2, attention_dropout=0.2, drop_path=0.3)
    images = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(images), model(images))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), model(images))
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert rates[0] == rates[1] == 0.0 and rates[-1] == pytest.approx(0.3)  # linear in depth


def test_zero_head_and_reset_classifier(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny, zero_head=True)
    assert model(torch.randn(1, 3, 32, 32)).abs().max() == 0
    model.reset_classifier(3, class_names=["a", "b", "c"])
    assert model.config.num_classes == 3 and model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_save_load_round_trip(tiny: ViTConfig, tmp_path: Path) -> None:
    for pos_embed in POS_EMBED_CHOICES:
        model = vitlab.ViT(
            tiny.replace(pos_embed=pos_embed, image_size=(32, 48)),
            class_names=[str(i) for i in range(10)],
            preprocessing=vitlab.Preprocessing(image_size=(32, 48), mean=(0.1, 0.2, 0.3), std=(1, 2, 3)),
        ).eval()
        out = model.save_pretrained(tmp_path / pos_embed)
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
        loaded = vitlab.from_pretrained(out)
        assert loaded.config == model.config
        assert loaded.preprocessing == model.preprocessing
        assert loaded.class_names == model.class_names
        images = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            torch.testing.assert_close(loaded(images), model(images))


def test_from_pretrained_overrides(tiny: ViTConfig, tmp_path: Path) -> None:
    model = vitlab.create_model(tiny).eval()
    model.save_pretrained(tmp_path)
    same = vitlab.from_pretrained(tmp_path, image_size=32)
    torch.testing.assert_close(same.pos_embed, model.pos_embed)
    bigger = vitlab.from_pretrained(tmp_path, image_size=(48, 64), num_classes=3, in_channels=1, dropout=0.1)
    assert bigger.config.grid_size == (6, 8) and bigger.config.dropout == 0.1
    assert bigger.pos_embed is not None and bigger.pos_embed.shape == (1, 49, 64)
    assert bigger(torch.randn(1, 1, 48, 64)).abs().max() == 0  # zero-initialised head
    assert bigger.preprocessing.image_size == (48, 64) and len(bigger.preprocessing.mean) == 1
    torch.testing.assert_close(bigger.patch_embed.proj.weight, model.patch_embed.proj.weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="hidden_dim=64; it cannot be changed"):
        vitlab.from_pretrained(tmp_path, hidden_dim=128)
    with pytest.raises(ValueError, match="unknown override"):
        vitlab.from_pretrained(tmp_path, width=3)


def _loss_grads_and_saved_bytes(model: torch.nn.Module, images: torch.Tensor) -> tuple[float, dict, int]:
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    torch.manual_seed(1)
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images).logsumexp(dim=1).mean()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def test_grad_checkpointing_gives_the_same_gradients_and_keeps_fewer_activations(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny, dropout=0.1, attention_dropout=0.1, drop_path=0.2).train()
    images = torch.randn(4, 3, 32, 32)
    loss, grads, saved = _loss_grads_and_saved_bytes(model, images)
    model.set_grad_checkpointing()
    loss_ckpt, grads_ckpt, saved_ckpt = _loss_grads_and_saved_bytes(model, images)
    assert loss_ckpt == loss  # the same dropout and drop-path draws
    assert len(grads) == len(grads_ckpt) == len(list(model.parameters()))
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, msg=name)
    assert saved_ckpt < 0.5 * saved, (saved_ckpt, saved)
    model.eval()
    with torch.no_grad():  # without gradients nothing is checkpointed: inference is unchanged
        with_ckpt = model(images)
        model.set_grad_checkpointing(False)
        torch.testing.assert_close(with_ckpt, model(images), rtol=0, atol=0)


def test_onednn_inference_linear_matches_f_linear_and_leaves_training_alone() -> None:
    from vitlab import model as vm

    layer = vm.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x.double().float()), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
        )
    y = layer(x.requires_grad_())  # with gradients: exactly nn.Linear, differentiable
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert layer.weight.grad is not None and x.grad is not None
    layer.double()  # other dtypes: plain F.linear
    with torch.no_grad():
        assert torch.equal(layer(x.double()), F.linear(x.double(), layer.weight, layer.bias))
