from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import vitlab
from vitlab import ViTConfig
from vitlab.config import POOL_CHOICES, POS_EMBED_CHOICES
from vitlab.model import CPU_HAS_ONEDNN_BF16, DropPath, ViT

KINDS = [(p, q) for p in POS_EMBED_CHOICES for q in POOL_CHOICES]


# oneDNN's bf16 GEMM needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT; elsewhere bf16 autocast keeps F.linear (tested
# in test_onednn_linear_steps_aside_for_fp16_autocast_unsupported_bf16_and_switch by switching it off)
ONEDNN = torch.backends.mkldnn.is_available()
ONEDNN_BF16 = CPU_HAS_ONEDNN_BF16
needs_onednn_bf16 = pytest.mark.skipif(
    not ONEDNN_BF16, reason="this CPU has no oneDNN bf16 GEMM (needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT)"
)


@pytest.fixture(autouse=True)
def _onednn_path_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """This module's tests run the oneDNN path wherever torch has it, not only on the AVX-512 CPUs that take it by
    default: an AVX2 machine still checks its results (a test that switches it off does so after this)."""
    from vitlab import model as vm

    monkeypatch.setattr(vm, "_ONEDNN", ONEDNN)
    monkeypatch.setattr(vm, "_ONEDNN_BF16", ONEDNN_BF16)


@pytest.mark.parametrize(
    ("setting", "capability", "available", "expected"),
    [
        (None, "AVX512", True, True),
        (None, "AVX2", True, False),
        ("auto", "AVX512", True, True),
        ("", "AVX2", True, False),
        ("1", "AVX2", True, True),
        ("0", "AVX512", True, False),
        ("1", "AVX512", False, False),  # no mkldnn in this torch: nothing to turn on
        (None, "DEFAULT", True, False),
        (None, "SVE256", True, False),
        (" On ", "AVX2", True, True),
        ("false", "AVX512", True, False),
    ],
)
def test_onednn_default_follows_the_cpu_and_vitlab_onednn(
    setting: str | None, capability: str, available: bool, expected: bool
) -> None:
    from vitlab.model import _onednn_default

    assert _onednn_default(setting, capability, available) is expected


def test_onednn_default_refuses_an_unknown_setting() -> None:
    from vitlab.model import _onednn_default

    for available in (True, False):  # refused even where there is no oneDNN to switch
        with pytest.raises(ValueError, match=r"VITLAB_ONEDNN='fast'.*1 \(on\), 0 \(off\) or auto"):
            _onednn_default("fast", "AVX512", available)


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
def test_explicit_attention_path_reproduces_fused_forward(
    tiny: ViTConfig, pos_embed: str, pool: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vitlab import model as vm

    monkeypatch.setattr(vm, "EXPLICIT_ATTENTION_MAX_TOKENS", 0)  # forward through SDPA even at 17 tokens
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


@pytest.mark.parametrize("pool", POOL_CHOICES)
def test_patch_dropout_keeps_a_random_subset_of_embedded_patches_in_training_only(tiny: ViTConfig, pool: str) -> None:
    model = vitlab.create_model(tiny, pool=pool, patch_dropout=0.5)
    prefix, n = model.config.num_prefix_tokens, model.config.num_patches  # 16 patches: 8 kept
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        full, _ = model.eval().embed(images)
        torch.manual_seed(0)
        kept, grid = model.train().embed(images)
        torch.manual_seed(1)
        other, _ = model.embed(images)
    assert grid == model.config.grid_size and full.shape[1] == prefix + n
    assert kept.shape == (3, prefix + n // 2, tiny.hidden_dim)
    torch.testing.assert_close(kept[:, :prefix], full[:, :prefix], rtol=0, atol=0)  # the class token stays
    chosen = []
    for b in range(3):  # every kept token is one of this image's embedded patches (position added), none twice
        match = (kept[b, prefix:, None] == full[b, None, prefix:]).all(-1)  # (kept, n)
        assert (match.sum(1) == 1).all()
        chosen.append(sorted(match.float().argmax(1).tolist()))
    assert len({tuple(c) for c in chosen}) > 1  # drawn per image
    assert not torch.equal(kept, other)  # and per call
    plain = vitlab.create_model(tiny, pool=pool).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():  # evaluation sees every patch: the same logits as without patch dropout
        torch.testing.assert_close(model.eval()(images), plain(images), rtol=0, atol=0)
        assert not torch.allclose(model.train()(images), plain(images))


def test_patch_dropout_is_refused_out_of_range_and_with_a_relative_bias(tiny: ViTConfig) -> None:
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="patch_dropout must be a probability"):
            tiny.replace(patch_dropout=bad)
    with pytest.raises(ValueError, match="patch_dropout needs absolute position embeddings"):
        tiny.replace(pos_embed="relative", patch_dropout=0.25)


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


def test_onednn_inference_linear_matches_f_linear() -> None:
    from vitlab import model as vm

    layer = vm.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x.double().float()), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5
        )
    layer.double()  # other dtypes: plain F.linear
    with torch.no_grad():
        assert torch.equal(layer(x.double()), F.linear(x.double(), layer.weight, layer.bias))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 24), (3, 5, 24), "transposed"])
@pytest.mark.parametrize("frozen", ["none", "weight", "input"])
def test_onednn_training_linear_gradients_match_f_linear(bias: bool, shape: Any, frozen: str) -> None:
    from vitlab import model as vm

    torch.manual_seed(0)
    layer = vm.Linear(24, 40, bias=bias)
    base = torch.randn(6, 24) if shape == "transposed" else torch.randn(*shape)
    grad_out = torch.randn(*base.shape[:-1], 40).mT.contiguous().mT  # a strided output gradient
    layer.weight.requires_grad_(frozen != "weight")

    def run(fn: Any) -> list[Tensor | None]:
        x = base.clone()
        if shape == "transposed":  # a strided input: the transposed view of a contiguous (24, 6) tensor
            x = x.t().contiguous().t()
        x.requires_grad_(frozen != "input")
        for p in layer.parameters():
            p.grad = None
        y = fn(x)
        (y * grad_out).sum().backward()
        return [y, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]

    ours = run(layer)
    reference = run(lambda x: F.linear(x, layer.weight, layer.bias))
    assert "OneDNN" in type(getattr(ours[0], "grad_fn", None)).__name__  # the fast path ran
    for got, want in zip(ours, reference, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onednn_linear_steps_aside_for_fp16_autocast_unsupported_bf16_and_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vitlab import model as vm

    layer = vm.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.float16):  # autocast dtypes other than bf16: F.linear
        y16 = layer(x)
        assert y16.dtype == torch.float16 and "OneDNN" not in type(y16.grad_fn).__name__
    with monkeypatch.context() as patched, torch.autocast("cpu", dtype=torch.bfloat16):
        patched.setattr(vm, "_ONEDNN_BF16", False)  # a CPU oneDNN has no bf16 GEMM for: autocast's F.linear
        y = layer(x)
        assert y.dtype == torch.bfloat16 and "OneDNN" not in type(y.grad_fn).__name__
    monkeypatch.setattr(vm, "_ONEDNN", False)  # VITLAB_ONEDNN=0
    y = layer(x)
    assert "OneDNN" not in type(y.grad_fn).__name__
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))


def _tiny_vit_loss_and_grads(net: Any, model: ViT) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and every parameter gradient of one step of ``net`` (``model`` or a compiled wrapper of it) on a
    fixed batch."""
    g = torch.Generator().manual_seed(1)
    images, labels = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 5, (6,), generator=g)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(images), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _tiny_vit() -> ViT:
    config = ViTConfig(image_size=16, patch_size=4, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64, num_classes=5)
    torch.manual_seed(0)
    return ViT(config).train()


def _assert_matches_plain_linear(
    model: vitlab.ViT, loss: Tensor, grads: dict[str, Tensor], monkeypatch: pytest.MonkeyPatch, loss_atol: float
) -> None:
    """``loss`` and ``grads`` (from the oneDNN path) equal the same step with oneDNN off (plain F.linear)."""
    from vitlab import model as vm

    monkeypatch.setattr(vm, "_ONEDNN", False)
    ref_loss, ref = _tiny_vit_loss_and_grads(model, model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=loss_atol)
    assert grads.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_onednn_training_step_matches_plain_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole ViT's loss and every parameter gradient agree with the nn.Linear path."""

    model = _tiny_vit()
    loss, fast = _tiny_vit_loss_and_grads(model, model)
    _assert_matches_plain_linear(model, loss, fast, monkeypatch, loss_atol=1e-6)


def test_onednn_custom_ops_pass_opcheck() -> None:
    """The operators torch.compile sees: fake (meta) shapes, autograd registration, schema."""
    from vitlab import model as vm

    x, weight, bias = torch.randn(2, 5, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True), torch.randn(6)
    torch.library.opcheck(vm.linear_op, (x, weight, bias.requires_grad_()))
    torch.library.opcheck(vm.linear_op, (x, weight, None))


def test_onednn_linear_under_compile_matches_plain_linear() -> None:
    """Compiled (the graph holds the custom operators), forward and gradients agree with nn.Linear's."""
    from vitlab import model as vm

    torch.manual_seed(0)
    layer = vm.Linear(12, 20)
    x = torch.randn(3, 4, 12)
    graphs: list[Any] = []

    def backend(gm: Any, example_inputs: Any) -> Any:
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [compiled(xs[0]), F.linear(xs[1], layer.weight, layer.bias)]
    grads = []
    for out, xi in zip(outs, xs, strict=True):
        layer.zero_grad(set_to_none=True)
        out.square().sum().backward()
        grads.append([xi.grad, layer.weight.grad, layer.bias.grad])
    assert any("vitlab.onednn_linear" in str(g.graph) for g in graphs)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.zero_grad(set_to_none=True)
    compiled(torch.zeros(0, 4, 12, requires_grad=True)).sum().backward()  # an empty batch: zero gradients
    assert layer.weight.grad is not None and not layer.weight.grad.any()


def test_onednn_linear_edge_cases_match_f_linear() -> None:
    """A trainable bias alone, an empty batch, a 1-D input: the same gradients as F.linear."""
    from vitlab import model as vm

    torch.manual_seed(0)
    layer = vm.Linear(8, 6)
    layer.weight.requires_grad_(False)  # only the bias trains (e.g. BitFit)
    x = torch.randn(4, 8)
    y = layer(x)
    assert "OneDNN" in type(y.grad_fn).__name__
    y.square().sum().backward()
    bias_grad, layer.bias.grad = layer.bias.grad, None
    F.linear(x, layer.weight, layer.bias).square().sum().backward()
    assert bias_grad is not None
    torch.testing.assert_close(bias_grad, layer.bias.grad)

    layer.weight.requires_grad_(True)
    for shape in [(0, 8), (2, 0, 8), (8,)]:
        grads = []
        for fn in (layer, lambda t: F.linear(t, layer.weight, layer.bias)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), requires_grad=True)
            layer.zero_grad(set_to_none=True)
            out = fn(x)
            out.square().sum().backward()
            grads.append([out, x.grad, layer.weight.grad, layer.bias.grad])
        for got, want in zip(*grads, strict=True):
            torch.testing.assert_close(got, want, msg=str(shape))


def test_onednn_linear_supports_double_backward_and_torch_func() -> None:
    from vitlab import model as vm

    torch.manual_seed(0)
    layer = vm.Linear(8, 6)
    x = torch.randn(5, 8, requires_grad=True)

    def penalty(fn: Any) -> Tensor:  # a gradient penalty: differentiates through the backward
        (gx,) = torch.autograd.grad(fn(x).tanh().sum(), x, create_graph=True)
        return gx.square().sum()

    ours = torch.autograd.grad(penalty(layer), layer.weight)[0]
    reference = torch.autograd.grad(penalty(lambda t: F.linear(t, layer.weight, layer.bias)), layer.weight)[0]
    torch.testing.assert_close(ours, reference)

    params = dict(layer.named_parameters())
    per_sample = torch.func.vmap(
        torch.func.grad(lambda p, xi: torch.func.functional_call(layer, p, (xi,)).square().sum()), in_dims=(None, 0)
    )(params, x.detach())
    for i in range(2):
        layer.zero_grad(set_to_none=True)
        F.linear(x.detach()[i], layer.weight, layer.bias).square().sum().backward()
        torch.testing.assert_close(per_sample["weight"][i], layer.weight.grad)

    with torch.autocast("cpu", dtype=torch.bfloat16):  # the same under bf16 autocast, to bf16 rounding
        ours = torch.autograd.grad(penalty(layer), layer.weight)[0]
        reference = torch.autograd.grad(penalty(lambda t: F.linear(t, layer.weight, layer.bias)), layer.weight)[0]
        per_sample = torch.func.vmap(
            torch.func.grad(lambda p, xi: torch.func.functional_call(layer, p, (xi,)).float().square().sum()),
            in_dims=(None, 0),
        )(params, x.detach())
        plain = torch.func.vmap(
            torch.func.grad(lambda p, xi: F.linear(xi, p["weight"], p["bias"]).float().square().sum()),
            in_dims=(None, 0),
        )(params, x.detach())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, reference, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(per_sample["weight"], plain["weight"], rtol=2e-2, atol=2e-2)


def test_onednn_training_under_inductor_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torch.compile (inductor, C++ codegen) around the custom operators: a ViT's loss and
    gradients agree with the eager nn.Linear path."""
    from vitlab import model as vm

    model = _tiny_vit()
    calls = []
    kernel = vm.onednn_linear

    def counting(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        calls.append(1)
        return kernel(x, weight, bias)

    torch._dynamo.reset()
    with monkeypatch.context() as patched:
        patched.setattr(vm, "onednn_linear", counting)  # what the custom operators call at run time
        loss, compiled = _tiny_vit_loss_and_grads(torch.compile(model), model)
    assert len(calls) >= 3 * 2 * 4  # forward + two gradients, for the 4 linear layers of each of the 2 blocks
    _assert_matches_plain_linear(model, loss, compiled, monkeypatch, loss_atol=1e-5)


@needs_onednn_bf16
def test_bf16_autocast_training_under_inductor_matches_plain_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU bf16 autocast, compiled by inductor: every GEMM runs on oneDNN in bf16, and the loss and fp32
    gradients agree, to bf16 rounding, with the eager autocast step of plain nn.Linear (oneDNN off)."""
    from vitlab import model as vm

    model = _tiny_vit()
    dtypes = []
    kernel = vm.onednn_linear

    def counting(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        dtypes.append((x.dtype, weight.dtype))
        return kernel(x, weight, bias)

    torch._dynamo.reset()
    with monkeypatch.context() as patched, torch.autocast("cpu", dtype=torch.bfloat16):
        patched.setattr(vm, "onednn_linear", counting)
        loss, grads = _tiny_vit_loss_and_grads(torch.compile(model), model)
    assert len(dtypes) >= 3 * 2 * 4 and set(dtypes) == {(torch.bfloat16, torch.bfloat16)}
    monkeypatch.setattr(vm, "_ONEDNN", False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref = _tiny_vit_loss_and_grads(model, model)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    assert grads.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        assert grads[name].dtype == torch.float32
        scale = ref[name].abs().max().item() + 1e-6  # bf16 keeps ~3 significant digits: compare to the largest
        torch.testing.assert_close(grads[name] / scale, ref[name] / scale, rtol=0, atol=5e-2, msg=name)


def test_inference_fuses_fc1_and_gelu_and_matches_the_two_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """In inference each block's fc1 + GELU is one oneDNN call (eager and under inductor), with the same logits
    as the plain nn.Linear + nn.GELU path; with gradients on, the two steps stay separate."""
    from vitlab import model as vm

    model = _tiny_vit().eval()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    calls = []
    kernel = vm.onednn_linear_gelu

    def counting(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        calls.append(1)
        return kernel(x, weight, bias)

    with monkeypatch.context() as plain:
        plain.setattr(vm, "_ONEDNN", False)
        with torch.no_grad():
            expected = model(images)
    monkeypatch.setattr(vm, "onednn_linear_gelu", counting)
    with torch.no_grad():
        torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.num_layers
    calls.clear()
    with_grad = model(images)  # parameters require grad: fc1 and GELU as two differentiable steps
    assert not calls and with_grad.requires_grad
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == model.config.num_layers  # the custom operator calls the kernel at run time
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6)
    torch.library.opcheck(vm.linear_gelu_op, (x, weight, bias))
    torch.library.opcheck(vm.linear_gelu_op, (x, weight, None))


def test_short_sequences_on_cpu_use_explicit_attention(tiny: ViTConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to EXPLICIT_ATTENTION_MAX_TOKENS tokens the CPU forward writes attention out; longer ones use SDPA.
    Both give the same outputs and gradients."""
    from vitlab import model as vm

    sdpa_calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args: Any, **kwargs: Any) -> Tensor:
        sdpa_calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(vm.F, "scaled_dot_product_attention", counting)
    model = vitlab.create_model(tiny).train()
    images = torch.randn(2, 3, 32, 32)  # 17 tokens
    results = []
    for limit in (vm.EXPLICIT_ATTENTION_MAX_TOKENS, 16):  # the default, then below 17 tokens: SDPA
        monkeypatch.setattr(vm, "EXPLICIT_ATTENTION_MAX_TOKENS", limit)
        model.zero_grad(set_to_none=True)
        out = model(images)
        out.square().sum().backward()
        results.append((out, [p.grad for p in model.parameters()]))
        assert len(sdpa_calls) == (0 if limit >= 17 else tiny.num_layers)
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for explicit, fused in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-4)
    monkeypatch.setattr(vm, "EXPLICIT_ATTENTION_MAX_TOKENS", 64)
    sdpa_calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # autocast: still explicit, in fp32
        model(images)
        maps = model.attention_maps(images)
    assert not sdpa_calls
    assert all(m.dtype == torch.float32 for m in maps)
    seen: list[torch.dtype] = []

    def recording(q: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        seen.append(q.dtype)
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(vm.F, "scaled_dot_product_attention", recording)
    monkeypatch.setattr(vm, "EXPLICIT_ATTENTION_MAX_TOKENS", 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # longer sequences: SDPA, in fp32 too
        model(images)
    assert seen == [torch.float32] * tiny.num_layers
    seen.clear()
    with torch.no_grad():  # bf16 weights: SDPA in bf16 (it keeps its softmax in fp32)
        model.bfloat16()(images.bfloat16())
    assert seen == [torch.bfloat16] * tiny.num_layers


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_under_bf16_autocast_matches_f_linear(bias: bool) -> None:
    """Under CPU bf16 autocast Linear runs oneDNN's bf16 GEMM: the same bf16 output as autocast's F.linear,
    and fp32 gradients for the fp32 parameters, equal to autocast's to bf16 rounding."""
    from vitlab import model as vm

    torch.manual_seed(0)
    layer = vm.Linear(48, 40, bias=bias)
    base = torch.randn(3, 7, 48)
    grad_out = torch.randn(3, 7, 40)

    def run(fn: Any) -> list[Tensor | None]:
        x = base.clone().requires_grad_(True)
        for p in layer.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x)
        (y.float() * grad_out).sum().backward()
        return [y, x.grad, layer.weight.grad, None if layer.bias is None else layer.bias.grad]

    ours = run(layer)
    reference = run(lambda x: F.linear(x, layer.weight, layer.bias))
    assert ours[0] is not None and ours[0].dtype == torch.bfloat16
    assert "OneDNN" in type(ours[0].grad_fn).__name__  # the fast path ran
    for got, want, ref_dtype in zip(ours, reference, [torch.bfloat16] + [torch.float32] * 3, strict=True):
        if want is None:
            assert got is None
        else:
            assert got is not None and got.dtype == want.dtype == ref_dtype
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: no fused fp32 GELU call
        assert layer.fused_gelu(base) is None
    with torch.no_grad():
        assert layer.fused_gelu(base) is not None


def test_hooked_fc1_or_act_is_called_as_a_module_in_inference() -> None:
    """Hooks on fc1 or act (pruning, activation capture) must fire: the fused call is skipped for them."""
    model = _tiny_vit().eval()
    images = torch.randn(2, 3, 16, 16)
    seen: list[str] = []
    from vitlab import model as vm

    block = model.blocks[0]
    assert isinstance(block, vm.Block)
    mlp = block.mlp
    h1 = mlp.act.register_forward_hook(lambda m, i, o: seen.append("act"))
    h2 = mlp.fc1.register_forward_pre_hook(lambda m, i: seen.append("fc1"))
    with torch.no_grad():
        model(images)
    assert seen == ["fc1", "act"]
    h1.remove()
    h2.remove()
