"""The Vision Transformer of arXiv:2010.11929, Section 3.1, Eq. (1)-(4).

Step 1 cuts the image into P x P patches (N = HW / P^2); step 2 projects each flattened patch to D with
one trainable linear map (written as a P-strided convolution, which is the same thing); step 3 prepends a
learnable class token and adds position embeddings; step 4 runs L pre-LayerNorm blocks of multi-head
self-attention and a two-layer GELU MLP, each with a residual, then a final LayerNorm; step 5 is the head on
the class token (or on the mean of the patch tokens, Appendix D.3), with the optional tanh pre-logits layer
of the ImageNet-21k checkpoints.

State-dict names are those timm, DINOv2 and MAE share, so a timm ``VisionTransformer`` state dict loads
into a token-pooled, learned-1D model with no renaming.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitlab import pos_embed as pe
from vitlab.config import Preprocessing, ViTConfig

_ON, _OFF = ("1", "on", "true", "yes"), ("0", "off", "false", "no")  # VITLAB_ONEDNN's spellings


def _onednn_default(setting: str | None, capability: str, available: bool) -> bool:
    """Whether linear layers call oneDNN: ``VITLAB_ONEDNN=1`` / ``0`` force it on / off; unset (or ``auto``),
    only on CPUs with AVX-512 (AMX included). There oneDNN's fp32 GEMM measured ~2x MKL's and the compiled
    training step ~1.4x faster; on an AVX2-only AMD EPYC the compiled training step of the demo model measured
    884 images/s with ``F.linear`` against 614 with oneDNN, and inference the same either way
    (docs/performance.md, "Which GEMM the linear layers use")."""
    value = "auto" if setting is None else setting.strip().lower()
    if value in ("", "auto"):
        wanted = capability == "AVX512"  # x86 only: aarch64 (SVE, DEFAULT) keeps F.linear too
    elif value in _ON or value in _OFF:
        wanted = value in _ON
    else:
        raise ValueError(f"VITLAB_ONEDNN={setting!r}: use 1 (on), 0 (off) or auto (on with AVX-512 only)")
    return available and wanted


_ONEDNN = _onednn_default(
    os.environ.get("VITLAB_ONEDNN"),
    torch.backends.cpu.get_cpu_capability(),
    torch.backends.mkldnn.is_available(),
)
# oneDNN's bf16 GEMM needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: whether this CPU has one, and whether the linear
# layers use it (elsewhere bf16 autocast keeps F.linear)
CPU_HAS_ONEDNN_BF16 = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
_ONEDNN_BF16 = _ONEDNN and CPU_HAS_ONEDNN_BF16


def onednn_enabled() -> bool:
    """Whether vitlab's linear layers call oneDNN on CPU: mkldnn built in, and ``VITLAB_ONEDNN=1``, or unset on a
    CPU with AVX-512."""
    return _ONEDNN


def onednn_bf16_enabled() -> bool:
    """Whether vitlab's linear layers run oneDNN's bf16 GEMM under CPU bf16 autocast (oneDNN on, and a CPU it
    supports bf16 on)."""
    return _ONEDNN_BF16


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias`` by oneDNN's GEMM, fp32 or bf16 operands (any leading dims; strided operands are
    accepted)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``gelu(x @ weight.T + bias)`` (exact GELU) with the GELU applied in the GEMM's output stage: one pass over
    the output fewer, and no separate buffer for the pre-activation. Inference only (no autograd formula)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")


def _onednn_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """dW = dy^T @ x over all leading dims, as ``linear(dy^T, x^T)`` on transposed views."""
    if grad.numel() == 0:  # an empty batch: oneDNN refuses a zero-length reduction
        return grad.new_zeros((grad.shape[-1], x.shape[-1]))
    return onednn_linear(grad.reshape(-1, grad.shape[-1]).t(), x.reshape(-1, x.shape[-1]).t(), None)


def _plain_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])


def _linear_grads(
    ctx: Any, grad: Tensor, linear: Callable[..., Tensor], weight_grad: Callable[[Tensor, Tensor], Tensor]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The three gradients of a linear layer: dx = dy @ W (``linear(dy, W^T)``), dW = dy^T @ x, db."""
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx = linear(grad, weight.t(), None) if needs[0] else None
    dw = weight_grad(grad, x) if needs[1] else None
    db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and needs[2] else None
    return dx, dw, db


def _save_for_linear_grads(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


# Under torch.compile the GEMMs are opaque custom operators (inductor fuses everything around them and
# would otherwise lower the matmuls to MKL); in eager mode one autograd.Function calls oneDNN directly,
# without the custom-operator dispatch cost.
# The suffix changes whenever the registered backward changes: torch.compile's on-disk caches key a graph on
# its operators' names, not on their autograd formulas, and would replay a stale backward after an upgrade.
@torch.library.custom_op("vitlab::onednn_linear_v2", mutates_args=())
def linear_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return onednn_linear(x, weight, bias)


def _linear_output_like(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """The fake (shape-only) kernel of both linear custom operators."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_op.register_fake(_linear_output_like)


def _compiled_weight_grad(grad: Tensor, x: Tensor) -> Tensor:
    """dW = dy^T @ x inside a compiled graph: the two transposes are made contiguous as graph operations, which
    inductor writes from the kernels that produce dy and x (fused with them), so oneDNN gets dense operands
    instead of copying strided views inside its call. Measured on the demo model's compiled training step:
    56.8 -> 51.6 ms (``python benchmarks/step_variants.py``, docs/performance.md)."""
    g = grad.reshape(-1, grad.shape[-1])
    if g.shape[0] == 0:  # an empty batch: oneDNN refuses a zero-length reduction
        return grad.new_zeros((grad.shape[-1], x.shape[-1]))
    return linear_op(g.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous(), None)


# inference only: Linear.fused_gelu calls it only when no gradient is needed, so it has no autograd formula
@torch.library.custom_op("vitlab::onednn_linear_gelu", mutates_args=())
def linear_gelu_op(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return onednn_linear_gelu(x, weight, bias)


linear_gelu_op.register_fake(_linear_output_like)


linear_op.register_autograd(
    lambda ctx, grad: _linear_grads(ctx, grad, linear_op, _compiled_weight_grad),
    setup_context=lambda ctx, inputs, output: _save_for_linear_grads(ctx, *inputs),
)


class _OneDNNLinearFn(torch.autograd.Function):
    """Eager training: forward and both gradient GEMMs on oneDNN. A backward that must itself be
    differentiable (``create_graph=True``: gradient penalties, meta-learning) uses plain torch ops instead."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        _save_for_linear_grads(ctx, x, weight, bias)
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        if torch.is_grad_enabled():
            return _linear_grads(ctx, grad, F.linear, _plain_weight_grad)
        return _linear_grads(ctx, grad, onednn_linear, _onednn_weight_grad)


def _cpu_autocast(x: Tensor) -> bool:
    """Whether ``x`` is a CPU tensor of autocast's dtypes under CPU autocast (vitlab's training autocasts to bf16
    with ``--amp bf16``, or ``auto`` on CPUs with AMX)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and torch.is_autocast_enabled("cpu")


def _fp32_attention(cpu_autocast: bool) -> contextlib.AbstractContextManager[Any]:
    """Autocast off for the attention core when CPU autocast is on (``Attention._qkv`` then gives fp32 inputs)."""
    return torch.autocast("cpu", enabled=False) if cpu_autocast else contextlib.nullcontext()


def _is_exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(is_exporting and is_exporting())


def _functorch_wrapped(*tensors: Tensor) -> bool:
    """Inside torch.func transforms (grad, vmap, jvp) the autograd.Function above does not apply."""
    return any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose GEMMs run on oneDNN on CPU, in inference and
    training, eager or under ``torch.compile``, on CPUs with AVX-512 (``onednn_enabled()``): on the AVX-512 AMD
    CPU of sessions 2-9 oneDNN's fp32 GEMM measured ~2x the rate of the MKL GEMM that ``F.linear`` uses (see
    docs/performance.md). Under CPU bf16 autocast the GEMMs run on oneDNN in bf16 (AMX where the CPU has it).
    While tracing or exporting (ONNX, ``torch.export``), inside ``torch.func`` transforms, under other autocast
    dtypes, on other devices or dtypes, on CPUs without AVX-512, or with ``VITLAB_ONEDNN=0`` it computes exactly
    what ``nn.Linear`` does, with ``F.linear``. Outputs and gradients agree with ``F.linear`` to float32 rounding,
    and under bf16 autocast to bf16 rounding (tested)."""

    def _gemm_dtype(self, x: Tensor) -> torch.dtype | None:
        """The dtype of the oneDNN GEMM this call runs, or None for ``F.linear``: float32, or bfloat16 under CPU
        bf16 autocast (the operands are cast to bf16, as autocast would for ``F.linear``; oneDNN accumulates in
        fp32 and, on CPUs with AMX, runs ~5x the fp32 rate)."""
        if not (
            _ONEDNN
            and x.device.type == "cpu"
            and self.weight.dtype == torch.float32
            and not x.is_mkldnn
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.onnx.is_in_onnx_export()
            and not _is_exporting()
        ):
            return None
        if torch.is_autocast_enabled("cpu"):
            bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16)
            return torch.bfloat16 if bf16 and _ONEDNN_BF16 else None
        return torch.float32 if x.dtype == torch.float32 else None

    def _needs_grad(self, x: Tensor) -> bool:
        params = (self.weight,) if self.bias is None else (self.weight, self.bias)
        return torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))

    def forward(self, x: Tensor) -> Tensor:
        dtype = self._gemm_dtype(x)
        if dtype is None:
            return F.linear(x, self.weight, self.bias)
        weight: Tensor = self.weight
        bias: Tensor | None = self.bias
        if dtype != torch.float32:  # differentiable casts: the fp32 parameters get their gradients back in fp32
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if torch.compiler.is_compiling():
            return linear_op(x, weight, bias)
        if _functorch_wrapped(x, weight):
            return F.linear(x, weight, bias)
        if self._needs_grad(x):
            out: Tensor = _OneDNNLinearFn.apply(x, weight, bias)
            return out
        return onednn_linear(x, weight, bias)

    def fused_gelu(self, x: Tensor) -> Tensor | None:
        """``F.gelu(self(x))`` in one oneDNN call, the GELU in the GEMM's output stage (B/16's fc1 + GELU at
        batch 16 measured 57 -> 44 ms), or None where that does not apply: outside the oneDNN fp32 path (under
        autocast too), inside ``torch.func`` transforms, or when a gradient is needed (the backward needs the
        pre-activation)."""
        if self._gemm_dtype(x) != torch.float32 or self._needs_grad(x):
            return None
        if torch.compiler.is_compiling():
            return linear_gelu_op(x, self.weight, self.bias)
        if _functorch_wrapped(x, self.weight):
            return None
        return onednn_linear_gelu(x, self.weight, self.bias)


class PatchEmbed(nn.Module):
    """Steps 1-2: non-overlapping P x P patches, each linearly projected to D (a strided conv)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.patch_size = p
        self.in_channels = config.in_channels
        self.proj = nn.Conv2d(config.in_channels, config.hidden_dim, kernel_size=p, stride=p)

    def forward(self, images: Tensor) -> Tensor:
        x = self.proj(images)  # (B, D, gh, gw)
        return x.flatten(2).transpose(1, 2)  # (B, N, D), row-major patches


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p (Huang et al. 2016)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


# On CPU, up to this many tokens attention is computed as written (two batched matmuls and a softmax, which
# torch.compile fuses) rather than by SDPA's flash kernel, whose blocking costs more than it saves on short
# sequences: the compiled demo training step (17 tokens) measured 5% faster, 50 tokens equal
# (docs/performance.md). Longer sequences, GPUs and bf16 weights use SDPA. Under CPU autocast attention runs in
# fp32 either way (Attention.forward_explicit).
EXPLICIT_ATTENTION_MAX_TOKENS = 64


class Attention(nn.Module):
    """Multi-head self-attention (paper Appendix A), with an optional learned relative-position bias."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.num_heads = config.num_heads
        self.head_dim = d // config.num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(d, 3 * d, bias=config.qkv_bias)
        self.proj = Linear(d, d)
        self.attn_drop = config.attention_dropout
        self.proj_drop = nn.Dropout(config.dropout)
        self.rel_pos: nn.Parameter | None = None
        self.rel_pos_cls: nn.Parameter | None = None
        if config.pos_embed == "relative":
            gh, gw = config.grid_size
            self.rel_pos = nn.Parameter(torch.zeros(config.num_heads, 2 * gh - 1, 2 * gw - 1))
            if config.pool == "token":
                self.rel_pos_cls = nn.Parameter(torch.zeros(config.num_heads, 3))

    def _bias(self, grid: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
        if self.rel_pos is None:
            return None
        return pe.relative_bias(self.rel_pos, self.rel_pos_cls, grid).to(dtype)[None]  # (1, h, T, T)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, _ = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, T, hd); unbind, not indexing: one gradient buffer, not three
        if _cpu_autocast(x):  # attention itself runs in fp32 under CPU autocast (forward_explicit)
            return q.float(), k.float(), v.float()
        return q, k, v

    def _merge(self, out: Tensor) -> Tensor:
        b, h, t, hd = out.shape
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, h * hd)))  # (not -1: batch 0 works)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        cpu_autocast = _cpu_autocast(x)
        if (
            x.device.type == "cpu"
            and (x.dtype == torch.float32 or cpu_autocast)
            and x.shape[1] <= EXPLICIT_ATTENTION_MAX_TOKENS
        ):
            return self.forward_explicit(x, grid)[0]
        q, k, v = self._qkv(x)
        with _fp32_attention(cpu_autocast):
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=self._bias(grid, q.dtype), dropout_p=self.attn_drop if self.training else 0.0
            )
        return self._merge(out)

    def forward_explicit(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The same computation written out, also returning the attention probabilities (B, h, T, T).

        Under CPU autocast attention itself (the products of queries and keys, the softmax, the weighted sum)
        runs in fp32, here and in ``forward``, while the projections around it run in bf16: with SDPA in bf16
        instead, its CPU backward took 70% of the compiled training step of the fashion-mnist model (143 ms a
        step against 41 ms this way, docs/performance.md)."""
        q, k, v = self._qkv(x)
        with _fp32_attention(_cpu_autocast(x)):
            logits = (q * self.scale) @ k.transpose(-2, -1)
            bias = self._bias(grid, q.dtype)
            if bias is not None:
                logits = logits + bias
            probs = logits.softmax(dim=-1)
            out = F.dropout(probs, self.attn_drop, training=self.training) @ v
        return self._merge(out), probs


class Mlp(nn.Module):
    """The two-layer MLP with a GELU non-linearity (paper Eq. 3)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.fc1 = Linear(config.hidden_dim, config.mlp_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(config.dropout)
        self.fc2 = Linear(config.mlp_dim, config.hidden_dim)
        self.drop2 = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # fc1 and the GELU in one oneDNN call where Linear can (inference on CPU); self.act stays a module so
        # that the model's structure reads like the paper's
        h = self.fc1.fused_gelu(x) if self._fusable else None
        if h is None:
            h = self.act(self.fc1(x))
        return self.drop2(self.fc2(self.drop1(h)))

    @property
    def _fusable(self) -> bool:
        """Only the plain modules, with nothing hooked or patched: hooks (pruning, weight norm, activation capture)
        and forward overrides (LoRA-style subclasses) must see fc1 and act called as modules."""
        fc1, act = self.fc1, self.act
        return (
            type(act) is nn.GELU
            and act.approximate == "none"
            and type(fc1) is Linear
            and "forward" not in vars(fc1)
            and not (fc1._forward_hooks or fc1._forward_pre_hooks or act._forward_hooks or act._forward_pre_hooks)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)
        )


class Block(nn.Module):
    """Pre-norm encoder block, Eq. (2)-(3) of the paper."""

    def __init__(self, config: ViTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(config.hidden_dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(config)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward_explicit(self, x: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
        out, probs = self.attn.forward_explicit(self.norm1(x), grid)
        x = x + self.drop_path1(out)
        return x + self.drop_path2(self.mlp(self.norm2(x))), probs


class PreLogits(nn.Module):
    """The hidden layer of the pre-training head: Linear then tanh (paper Section 3.1)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.fc(x))


class ViT(nn.Module):
    """Vision Transformer (arXiv:2010.11929).

    ``forward(images)`` takes (B, C, H, W) with H and W multiples of the patch size (learned position
    embeddings are interpolated in 2D for a grid other than the configured one) and returns logits
    (B, num_classes), or pooled features (B, D) when ``num_classes == 0``.

    ``preprocessing`` and ``class_names`` describe the checkpoint and are saved with it.
    """

    def __init__(
        self,
        config: ViTConfig,
        *,
        zero_head: bool = False,
        preprocessing: Preprocessing | None = None,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.preprocessing = preprocessing or Preprocessing.for_config(config)
        if not isinstance(self.preprocessing, Preprocessing):
            raise TypeError(f"preprocessing must be a vitlab Preprocessing, not {type(self.preprocessing).__name__}")
        if len(self.preprocessing.mean) != config.in_channels:
            raise ValueError(
                f"preprocessing has {len(self.preprocessing.mean)} channel statistics (mean {self.preprocessing.mean}) "
                f"for a model of {config.in_channels} input channel(s)"
            )
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        check_class_names(self.class_names, config.num_classes)
        d = config.hidden_dim
        self.patch_embed = PatchEmbed(config)
        self.cls_token: nn.Parameter | None = None
        self.pos_embed: nn.Parameter | None = None
        self.pos_embed_y: nn.Parameter | None = None
        self.pos_embed_x: nn.Parameter | None = None
        if config.pool == "token":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        gh, gw = config.grid_size
        if config.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_prefix_tokens + gh * gw, d))
        elif config.pos_embed == "learned_2d":
            self.pos_embed_y = nn.Parameter(torch.zeros(gh, d // 2))
            self.pos_embed_x = nn.Parameter(torch.zeros(gw, d // 2))
        self.pos_drop = nn.Dropout(config.dropout)
        n = config.num_layers  # stochastic depth rises linearly with depth, as in DeiT
        rates = [config.drop_path * i / max(n - 1, 1) for i in range(n)]
        self.blocks = nn.ModuleList(Block(config, drop_path=r) for r in rates)
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.pre_logits: nn.Module = nn.Identity()
        head_in = d
        if config.representation_size is not None:
            self.pre_logits = PreLogits(d, config.representation_size)
            head_in = config.representation_size
        self.head: nn.Module = Linear(head_in, config.num_classes) if config.num_classes else nn.Identity()
        self.grad_checkpointing = False
        self.drop_patches = True  # False: train on every patch whatever config.patch_dropout says
        self.init_weights(zero_head=zero_head)

    # ----------------------------------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, zero_head: bool = False) -> None:
        """Truncated normal (std 0.02) for embeddings and dense layers, LeCun normal for the patch
        projection, zero biases; the head zero-initialised on request (the paper's fine-tuning)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        proj = self.patch_embed.proj
        fan_in = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
        nn.init.trunc_normal_(proj.weight, std=math.sqrt(1.0 / fan_in))
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
        for p in (self.cls_token, self.pos_embed, self.pos_embed_y, self.pos_embed_x):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        if zero_head and isinstance(self.head, nn.Linear):
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def reset_classifier(self, num_classes: int, class_names: Sequence[str] | None = None) -> None:
        """Replace the head by a zero-initialised one for ``num_classes`` (0: no head)."""
        check_class_names(class_names, num_classes)  # before anything changes
        self.config = self.config.replace(num_classes=num_classes)
        ref = next(self.parameters())
        head_in = self.config.representation_size or self.config.hidden_dim
        if num_classes:
            head = Linear(head_in, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            self.head = head
        else:
            self.head = nn.Identity()
        self.class_names = list(class_names) if class_names is not None else None

    # -------------------------------------------------------------------------------------- forward
    def _check(self, images: Tensor) -> tuple[int, int]:
        c = self.config
        if not isinstance(images, Tensor):
            raise TypeError(f"expected a tensor of images (batch, {c.in_channels}, H, W), got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(
                f"expected float images (normalised as model.preprocessing says), got {images.dtype}: e.g. "
                "vitlab.preprocess.load_for_model, or images.float() / 255 then (x - mean) / std"
            )
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (batch, {c.in_channels}, H, W), got {tuple(images.shape)}")
        _, ch, h, w = images.shape
        if ch != c.in_channels:
            raise ValueError(f"the model takes {c.in_channels} channel(s), got images with {ch}: {tuple(images.shape)}")
        p = c.patch_size
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}: resize or crop to multiples of "
                f"{p} (the model was built for {c.image_size[0]}x{c.image_size[1]})"
            )
        return (h // p, w // p)

    def position_embeddings(self, grid: tuple[int, int]) -> Tensor | None:
        """Absolute position embeddings for the patch grid, shape (1, prefix + N, D) for ``learned``
        (class slot included) and (1, N, D) otherwise; None for ``relative`` and ``none``."""
        kind = self.config.pos_embed
        if kind == "learned":
            assert self.pos_embed is not None
            return pe.resample_pos_embed(self.pos_embed, self.config.grid_size, grid, self.config.num_prefix_tokens)
        if kind == "learned_2d":
            assert self.pos_embed_y is not None and self.pos_embed_x is not None
            return pe.learned_2d(self.pos_embed_y, self.pos_embed_x, grid)[None]
        if kind == "sincos_2d":
            ref = self.patch_embed.proj.weight
            return pe.sincos_2d(grid, self.config.hidden_dim).to(device=ref.device, dtype=ref.dtype)[None]
        return None

    def embed(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Eq. (1): z0 = [x_class; x_p E] + E_pos, shape (B, T, D), and the patch grid. In training with
        ``patch_dropout`` only a random subset of each image's patch tokens is returned (fewer T, shuffled)."""
        grid = self._check(images)
        x = self.patch_embed(images)  # (B, N, D)
        pos = self.position_embeddings(grid)
        if self.config.pos_embed == "learned":
            assert pos is not None
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = x + pos
        else:
            if pos is not None:
                x = x + pos
            if self.cls_token is not None:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.training and self.drop_patches and self.config.patch_dropout > 0:
            x = self._drop_patches(x)
        return self.pos_drop(x), grid

    def _drop_patches(self, x: Tensor) -> Tensor:
        """PatchDropout (Liu et al. 2022): keep a random ``1 - patch_dropout`` share of each image's patch
        tokens (at least one; the prefix tokens always), positions already added. Training only."""
        prefix = self.config.num_prefix_tokens
        patches = x[:, prefix:]
        b, n, d = patches.shape
        keep = self.config.kept_patches(n)
        idx = torch.rand(b, n, device=x.device).argsort(dim=1)[:, :keep]
        kept = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))
        return torch.cat([x[:, :prefix], kept], dim=1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing: keep only each block's input while training and recompute the block in
        the backward pass (less memory, about one more forward of compute). Dropout and drop path replay the
        same random draws in the recomputation, so gradients equal those without checkpointing."""
        self.grad_checkpointing = enable

    def forward_features(self, images: Tensor) -> Tensor:
        """All tokens after the final LayerNorm, shape (B, T, D) (T = N + 1 with a class token; fewer in
        training with ``patch_dropout``)."""
        x, grid = self.embed(images)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, grid, use_reentrant=False) if recompute else block(x, grid)
        return self.norm(x)

    def pool(self, tokens: Tensor) -> Tensor:
        """The image representation y of Eq. (4): the class token, or the mean of the patch tokens."""
        if self.config.pool == "token":
            return tokens[:, 0]
        return tokens.mean(dim=1)

    def forward_head(self, tokens: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, then the pre-logits layer if any, then the head (unless ``pre_logits``)."""
        x = self.pre_logits(self.pool(tokens))
        return x if pre_logits else self.head(x)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(images))

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Attention probabilities of every layer, each (B, heads, T, T), computed by an explicit
        softmax(QK^T / sqrt(d) + bias) path that reproduces the fused forward. Call it in eval mode: with
        ``patch_dropout`` in training the tokens are a random subset that no longer maps onto the grid."""
        x, grid = self.embed(images)
        maps = []
        for block in self.blocks:
            x, probs = block.forward_explicit(x, grid)  # type: ignore[operator]
            maps.append(probs)
        return maps

    def forward_explicit(self, images: Tensor) -> Tensor:
        """Logits through the explicit attention path (for testing it against the fused one)."""
        x, grid = self.embed(images)
        for block in self.blocks:
            x, _ = block.forward_explicit(x, grid)  # type: ignore[operator]
        return self.forward_head(self.norm(x))

    # ------------------------------------------------------------------------------------------- io
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` (architecture, preprocessing, class names) and ``model.safetensors``."""
        from vitlab.checkpoint import save_model

        return save_model(self, directory)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"image_size={c.image_size}, patch_size={c.patch_size}, hidden_dim={c.hidden_dim}, "
            f"num_layers={c.num_layers}, num_heads={c.num_heads}, pos_embed={c.pos_embed!r}, pool={c.pool!r}"
        )


def check_class_names(names: Sequence[str] | None, num_classes: int, fix: str = "") -> None:
    """ValueError unless ``names`` (if any) name each of ``num_classes`` outputs; ``fix`` ends the message."""
    if names is not None and len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for num_classes={num_classes}{fix}")


def create_model(name: str | ViTConfig, *, zero_head: bool = False, **overrides: Any) -> ViT:
    """Build a randomly initialised ViT from a preset (``"B/16"``, ``"Ti/4"``, ...) or a config.

    Any :class:`ViTConfig` field can be overridden: ``create_model("S/4", image_size=28, in_channels=1,
    num_classes=10)``. Build on the meta device with ``with torch.device("meta"): ...``.
    """
    if isinstance(name, ViTConfig):
        config = name.replace(**overrides) if overrides else name
    else:
        config = ViTConfig.from_name(name, **overrides)
    return ViT(config, zero_head=zero_head)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_image(config: ViTConfig, image_size: tuple[int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass, times two (FLOPs), counting matrix products only."""
    h, w = image_size or config.image_size
    p, d, m = config.patch_size, config.hidden_dim, config.mlp_dim
    n = (h // p) * (w // p)
    t = n + config.num_prefix_tokens
    macs = n * p * p * config.in_channels * d  # patch projection
    per_layer = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m  # qkv + proj, QK^T + AV, MLP
    macs += config.num_layers * per_layer
    head_in = d
    if config.representation_size is not None:
        macs += d * config.representation_size
        head_in = config.representation_size
    macs += head_in * config.num_classes
    return 2 * macs
