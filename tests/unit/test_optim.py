"""vitlab.optim: Muon on the encoder's matrices, AdamW on the rest, against torch's own optimisers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from vitlab.optim import MuonAdamW, orthogonalize


def _params(seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(s, generator=g) for s in [(48, 16), (16, 16), (32, 16), (16, 32), (48, 16)]]
    vecs = [torch.randn(48, generator=g), torch.randn(1, 5, 16, generator=g)]
    return [m.requires_grad_() for m in mats], [v.requires_grad_() for v in vecs]


def _set_grads(params: list[Tensor], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def test_orthogonalize_flattens_singular_values_of_wide_tall_and_batched_matrices() -> None:
    g = torch.Generator().manual_seed(0)
    for shape in [(40, 12), (12, 40), (3, 24, 24), (2, 3, 8, 20)]:
        *batch, m, n = shape
        k = min(m, n)
        u = torch.linalg.qr(torch.randn(*batch, m, k, generator=g)).Q
        v = torch.linalg.qr(torch.randn(*batch, n, k, generator=g)).Q
        sv = torch.logspace(-1.5, 0, k)  # singular values spread over 1.5 decades
        x = u @ torch.diag_embed(sv.expand(*batch, k)) @ v.mT
        o = orthogonalize(x, dtype=torch.float32)
        assert o.shape == x.shape and o.dtype == x.dtype
        # the same singular vectors, singular values pulled to ~1 (roughly 0.7-1.2 for Muon's quintic)
        core = u.mT @ o @ v
        diag = torch.diagonal(core, dim1=-2, dim2=-1)
        assert diag.min() > 0.5 and diag.max() < 1.3, (shape, diag.min(), diag.max())
        assert (core - torch.diag_embed(diag)).abs().max() < 1e-4
        # a batch is its matrices one by one
        flat_x, flat_o = x.reshape(-1, m, n), o.reshape(-1, m, n)
        torch.testing.assert_close(orthogonalize(flat_x[-1], dtype=torch.float32), flat_o[-1])
    with pytest.raises(ValueError, match="matrix or a batch of matrices"):
        orthogonalize(torch.ones(5))


def test_muon_and_adamw_groups_step_as_torchs_muon_and_adamw() -> None:
    """The Muon groups take exactly torch.optim.Muon's steps with the AdamW-matching learning-rate scale
    (Nesterov, decoupled decay, bf16 Newton-Schulz); the other groups exactly torch.optim.AdamW's."""
    mats, vecs = _params()
    ref_mats, ref_vecs = (
        [m.detach().clone().requires_grad_() for m in mats],
        [v.detach().clone().requires_grad_() for v in vecs],
    )
    ours = MuonAdamW(
        [{"params": mats, "weight_decay": 0.1, "muon": True}, {"params": vecs, "weight_decay": 0.01}],
        lr=0.02,
        betas=(0.9, 0.98),
        momentum=0.9,
    )
    muon = torch.optim.Muon(ref_mats, lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(ref_vecs, lr=0.02, betas=(0.9, 0.98), weight_decay=0.01)
    for step in range(4):
        _set_grads(mats + vecs, seed=step)
        _set_grads(ref_mats + ref_vecs, seed=step)
        for group, ref in zip(ours.param_groups, (muon, adamw), strict=True):
            group["lr"] = ref.param_groups[0]["lr"] = 0.02 * (1 - step / 4)  # a schedule reaches both kinds
        ours.step()
        muon.step()
        adamw.step()
    for a, b in zip(mats + vecs, ref_mats + ref_vecs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (mats[0] - _params()[0][0]).abs().max() > 1e-2  # they moved


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    mats, vecs = _params()

    def make(m: list[Tensor], v: list[Tensor]) -> MuonAdamW:
        groups = [{"params": m, "weight_decay": 0.05, "muon": True}, {"params": v, "weight_decay": 0.0}]
        return MuonAdamW(groups, lr=0.01, ns_dtype=torch.float32)

    straight = make(mats, vecs)
    for step in range(3):
        _set_grads(mats + vecs, seed=step)
        straight.step()

    mats2, vecs2 = _params()
    first = make(mats2, vecs2)
    _set_grads(mats2 + vecs2, seed=0)
    first.step()
    saved = copy.deepcopy(first.state_dict())
    mats3, vecs3 = (
        [p.detach().clone().requires_grad_() for p in mats2],
        [p.detach().clone().requires_grad_() for p in vecs2],
    )
    resumed = make(mats3, vecs3)
    resumed.load_state_dict(saved)
    for step in (1, 2):
        _set_grads(mats3 + vecs3, seed=step)
        resumed.step()
    for a, b in zip(mats + vecs, mats3 + vecs3, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_bad_groups_and_settings_are_refused() -> None:
    mats, vecs = _params()
    with pytest.raises(ValueError, match=r"2D weight matrices only, got shapes \[\(48,\)"):
        MuonAdamW([{"params": vecs, "muon": True}], lr=0.01)
    with pytest.raises(ValueError, match="momentum must be in"):
        MuonAdamW([{"params": mats, "muon": True}], lr=0.01, momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps must be >= 1"):
        MuonAdamW([{"params": mats, "muon": True}], lr=0.01, ns_steps=0)


def test_train_builds_muon_for_the_blocks_matrices_only() -> None:
    from vitlab.model import create_model
    from vitlab.recipes import TrainConfig
    from vitlab.train import build_optimizer

    model = create_model(
        "Ti/7", image_size=28, in_channels=1, num_classes=10, hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64
    )
    c = TrainConfig(optimizer="muon", weight_decay=0.05, momentum=0.9, amp="none")
    opt = build_optimizer(model, c, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW) and opt.ns_dtype == torch.float32  # fp32 run: fp32 Newton-Schulz
    names = {id(p): n for n, p in model.named_parameters()}
    by_kind = {(g["muon"], g["weight_decay"]): sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    muon = by_kind[(True, 0.05)]
    assert muon == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    )
    assert by_kind[(False, 0.05)] == ["head.weight", "patch_embed.proj.weight"]  # input and output maps: AdamW
    assert "pos_embed" in by_kind[(False, 0.0)] and "cls_token" in by_kind[(False, 0.0)]
    assert sum(len(v) for v in by_kind.values()) == len(names)  # every parameter exactly once
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    # momentum None (the default) is each optimiser's own: Muon's 0.95, SGD's 0.9
    default = build_optimizer(model, TrainConfig(optimizer="muon", amp="none"), torch.device("cpu"))
    assert [g["momentum"] for g in default.param_groups] == [0.95] * len(default.param_groups)
    sgd = build_optimizer(model, TrainConfig(optimizer="sgd"), torch.device("cpu"))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\) or None, got 1.0"):
        TrainConfig(optimizer="muon", momentum=1.0)
    # relative position biases are 2D parameters of a block but no linear map: AdamW, undecayed
    rel = create_model(
        "Ti/7", image_size=28, in_channels=1, num_classes=10, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
        pos_embed="relative", pool="token",
    )  # fmt: skip
    rel_names = {id(p): n for n, p in rel.named_parameters()}
    groups = build_optimizer(rel, c, torch.device("cpu")).param_groups
    assert "blocks.0.attn.rel_pos_cls" in [rel_names[id(p)] for p in groups[2]["params"]]
    assert groups[2]["weight_decay"] == 0.0 and not groups[2]["muon"] and len(groups[0]["params"]) == 4
    with pytest.raises(
        ValueError, match="optimizer muon trains the linear layers of a ViT's encoder blocks; Sequential"
    ):
        build_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4)), c, torch.device("cpu"))
    with pytest.raises(ValueError, match="is not adamw, adam, sgd or muon"):
        TrainConfig(optimizer="lion")  # type: ignore[arg-type]
