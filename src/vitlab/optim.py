"""Muon for the encoder's weight matrices, AdamW for every other parameter, as one optimiser.

Muon (K. Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks") replaces the update of a
weight matrix by the orthogonalised Nesterov momentum of its gradient (a few Newton-Schulz iterations of the
quintic with coefficients (3.4445, -4.7750, 2.0315)). The update is scaled by 0.2 * sqrt(max(fan_out, fan_in)) so
that its RMS matches AdamW's (Liu et al. 2025, "Muon is Scalable for LLM Training", Section 2.2): the same
learning rate, schedule and decoupled weight decay then serve both parts, and ``TrainConfig.lr`` means the same
thing with ``optimizer="muon"`` as with ``"adamw"``. Embeddings, the head, norms and biases stay on AdamW, as in
the references: orthogonalising is meant for hidden layers, not for the input and output maps.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw

_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for ``g = U S V^T``, batched over leading dimensions: (..., A, B) -> same shape.

    The quintic Newton-Schulz iteration Muon uses; it drives singular values into roughly [0.7, 1.2] rather
    than exactly 1, which the Muon authors found no worse. ``dtype`` is the working precision (bf16 in the
    references; fp32 where bf16 matrix products are slow)."""
    if g.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    a, b, c = _NS_COEFFICIENTS
    tall = g.size(-2) > g.size(-1)
    x = (g.mT if tall else g).reshape(-1, *g.shape[-2:][:: -1 if tall else 1])  # (batch, rows <= cols)
    # one contiguous copy in the working precision: strided bf16 products and sums are several times slower on CPU
    x = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b * gram + c * gram @ gram
        x = torch.baddbmm(x, poly, x, beta=a)  # a * x + poly @ x
    x = x.to(g.dtype)
    return (x.mT if tall else x).reshape(g.shape)


class MuonAdamW(torch.optim.Optimizer):
    """One optimiser over two kinds of parameter group: ``muon=True`` groups (2D weight matrices) take Muon
    steps, the others AdamW steps. Every group has ``lr`` and ``weight_decay``, so a learning-rate schedule
    that sets ``group["lr"]`` drives both; the state dict saves and restores both kinds of state."""

    def __init__(
        self,
        groups: Iterable[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
        fused: bool | None = None,
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, momentum=momentum, nesterov=nesterov, weight_decay=0.0, muon=False, fused=fused
        )  # "fused" in each group: torch's load_state_dict then keeps AdamW's step counts on the parameters' device
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"]:
                bad = [tuple(p.shape) for p in group["params"] if p.ndim != 2]
                if bad:
                    raise ValueError(f"Muon groups take 2D weight matrices only, got shapes {bad}")
        self.ns_steps = ns_steps
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._muon_step if group["muon"] else self._adamw_step)(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, mu, decay = group["lr"], group["momentum"], 1 - group["lr"] * group["weight_decay"]
        # same-shaped matrices go together: multi-tensor updates, one batched product per Newton-Schulz step
        by_shape: dict[tuple[torch.Size, torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
        for p in params:
            by_shape[p.shape, p.dtype, p.device].append(p)
        for (shape, _, _), ps in by_shape.items():
            grads = [p.grad for p in ps if p.grad is not None]  # step() passes only parameters with gradients
            bufs = [self._momentum_buffer(p) for p in ps]
            torch._foreach_lerp_(bufs, grads, 1 - mu)  # buf = mu * buf + (1 - mu) * grad
            updates = torch._foreach_lerp(grads, bufs, mu) if group["nesterov"] else bufs
            ortho = orthogonalize(torch.stack(updates), self.ns_steps, self.ns_dtype)
            if decay != 1:
                torch._foreach_mul_(ps, decay)
            scale = 0.2 * math.sqrt(max(shape))  # RMS of the update ~ AdamW's (Liu et al. 2025)
            torch._foreach_add_(ps, ortho.unbind(0), alpha=-lr * scale)

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf: Tensor = state["momentum_buffer"]
        return buf

    def _adamw_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        steps: list[Tensor] = []
        for p in params:
            assert p.grad is not None  # step() passes only parameters with gradients
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else None)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        beta1, beta2 = group["betas"]
        adamw(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            fused=group["fused"],
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )
