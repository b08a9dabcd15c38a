"""Few-shot linear evaluation of a frozen ViT representation (arXiv:2010.11929, Section 4.1, "Metrics").

The paper: "few-shot accuracies are obtained by solving a regularized least-squares regression problem that
maps the (frozen) representation of a subset of training images to {-1, 1}^K target vectors", which "allows
recovery of the exact solution in closed form". Here:

* the representation is the pooled pre-logits feature, ``forward_head(forward_features(x), pre_logits=True)``,
  computed once for all images (:func:`extract_features`) and reused across shot counts and draws;
* for each draw, ``shots`` images per class are sampled from the training split; features are standardised with
  that sample's statistics; the ridge regression has an unregularised bias (:func:`ridge_fit`), solved for a
  whole grid of L2 strengths from one SVD (:func:`ridge_path`);
* the L2 strength is the one with the best accuracy on held-out training data (the validation split), and
  test accuracy is reported at that strength, averaged over draws.

:func:`linear_probe` is the usual companion: multinomial logistic regression on all training features, fitted
full-batch with L-BFGS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from vitlab.evaluate import normalize
from vitlab.model import ViT

L2_GRID: tuple[float, ...] = tuple(10.0 ** (k / 2) for k in range(-6, 11))  # 1e-3 ... 1e5, half decades
PROBE_L2_GRID: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the small solves below on one thread. They are many tiny ops, and on a shared CPU each parallel op
    waits for a descheduled sibling thread: a logistic fit on 450 x 32 features took 17 s on two busy cores
    and 0.2 s on one (measured on this project's 2-vCPU machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def extract_features(model: ViT, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """The frozen representation of uint8 images (B, C, H, W): pooled pre-logits features (B, F), float32 on
    the CPU, in batches and in eval mode (the model's mode is restored)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pre = model.preprocessing
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size].to(device), pre.mean, pre.std)
            out.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
    finally:
        model.train(was_training)
    width = model.config.representation_size or model.config.hidden_dim
    return torch.cat(out) if out else torch.empty(0, width)


def pm1_targets(labels: Tensor, num_classes: int) -> Tensor:
    """{-1, 1}^K targets: +1 for the true class, -1 elsewhere. (n,) -> (n, K) float64."""
    return 2.0 * F.one_hot(labels, num_classes).double() - 1.0


def ridge_fit(x: Tensor, y: Tensor, l2: float) -> tuple[Tensor, Tensor]:
    """argmin_{W, b} ||x W + b - y||^2 + l2 ||W||^2 in closed form (the bias is not regularised).

    x: (n, d), y: (n, K). Returns W (d, K) and b (K,), float64. Centring x and y removes the bias exactly;
    the solve uses the smaller of the primal (d x d) and dual (n x n) systems."""
    if l2 <= 0:
        raise ValueError(f"the L2 regularisation must be > 0, got {l2}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    n, d = xc.shape
    if n >= d:
        w = torch.linalg.solve(xc.T @ xc + l2 * torch.eye(d, dtype=x.dtype), xc.T @ yc)
    else:
        w = xc.T @ torch.linalg.solve(xc @ xc.T + l2 * torch.eye(n, dtype=x.dtype), yc)
    return w, my - mx @ w


def ridge_path(x: Tensor, y: Tensor, l2s: Sequence[float]) -> tuple[Tensor, Tensor]:
    """:func:`ridge_fit` for every strength in ``l2s`` from one SVD of the centred features.

    With x - mean = U S V^T, W(l2) = V diag(s / (s^2 + l2)) U^T (y - mean). Returns W (len(l2s), d, K) and
    b (len(l2s), K)."""
    if not l2s or min(l2s) <= 0:
        raise ValueError(f"the L2 grid must hold positive values, got {list(l2s)}")
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    u, s, vh = torch.linalg.svd(x - mx, full_matrices=False)
    uty = u.T @ (y - my)  # (r, K)
    lam = torch.tensor(list(l2s), dtype=x.dtype)
    shrink = s[None, :] / (s[None, :] ** 2 + lam[:, None])  # (G, r)
    w = torch.einsum("rd,gr,rk->gdk", vh, shrink, uty)
    return w, my[None] - torch.einsum("d,gdk->gk", mx, w)


def _standardise(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Zero mean, unit variance per feature with ``train``'s statistics (a constant feature is only centred)."""
    mean, std = train.mean(0), train.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    return [(t - mean) / std for t in (train, *others)]


def sample_shots(labels: Tensor, shots: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """Indices of ``shots`` random examples of each class (class by class). Raises ValueError if a class has
    fewer."""
    picked = []
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        if len(members) < shots:
            raise ValueError(f"{shots} shots asked, but class {k} has only {len(members)} training image(s)")
        picked.append(members[torch.randperm(len(members), generator=generator)[:shots]])
    return torch.cat(picked)


@dataclass(frozen=True)
class FewShotResult:
    """Test accuracy of the few-shot linear classifier for one shot count, over ``len(accuracies)`` draws."""

    shots: int
    accuracies: list[float]
    l2: list[float]  # the strength chosen on held-out training data, per draw
    val_accuracies: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return sum(self.accuracies) / len(self.accuracies)

    @property
    def std(self) -> float:
        return float(torch.tensor(self.accuracies).std(unbiased=False)) if len(self.accuracies) > 1 else 0.0


def fewshot_accuracy(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    shots: int,
    *,
    num_classes: int,
    draws: int = 5,
    seed: int = 0,
    l2_grid: Sequence[float] = L2_GRID,
) -> FewShotResult:
    """Few-shot linear evaluation for one shot count. Each argument pair is (features (n, F), labels (n,)).

    For each of ``draws`` seeded draws of ``shots`` training examples per class: standardise with the draw's
    statistics, fit ridge regression onto {-1, 1}^K for every L2 strength in ``l2_grid``, keep the strength
    with the best accuracy on ``val`` (ties: the stronger regularisation), report its accuracy on ``test``."""
    if shots < 1 or draws < 1:
        raise ValueError(f"shots and draws must be >= 1, got {shots} and {draws}")
    if len(val[1]) == 0:
        raise ValueError("few-shot evaluation needs held-out training data to choose the L2 strength: val is empty")
    grid = sorted(l2_grid)
    g = torch.Generator().manual_seed(seed * 1_000_003 + shots)
    accs, chosen, val_accs = [], [], []
    with one_thread():
        for _ in range(draws):
            acc, l2, val_acc = _one_draw(train, val, test, shots, num_classes, grid, g)
            accs.append(acc)
            chosen.append(l2)
            val_accs.append(val_acc)
    return FewShotResult(shots=shots, accuracies=accs, l2=chosen, val_accuracies=val_accs)


def _one_draw(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    shots: int,
    num_classes: int,
    grid: list[float],
    g: torch.Generator,
) -> tuple[float, float, float]:
    """(test accuracy, chosen L2, its validation accuracy) for one random draw of the shots."""
    idx = sample_shots(train[1], shots, num_classes, g)
    xs, xv, xt = _standardise(train[0][idx].double(), val[0].double(), test[0].double())
    w, b = ridge_path(xs, pm1_targets(train[1][idx], num_classes), grid)  # (G, F, K), (G, K)
    val_pred = (torch.einsum("nd,gdk->gnk", xv, w) + b[:, None]).argmax(-1)  # (G, n_val)
    val_acc = (val_pred == val[1][None]).double().mean(1)
    best = len(grid) - 1 - int(val_acc.flip(0).argmax())  # the last (largest) l2 among the best
    test_pred = (xt @ w[best] + b[best]).argmax(-1)
    return float((test_pred == test[1]).double().mean()), grid[best], float(val_acc[best])


@dataclass(frozen=True)
class ProbeResult:
    """Logistic-regression linear probe on all training features."""

    test_accuracy: float
    val_accuracy: float | None
    l2: float
    train_size: int


def _fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    num_classes: int,
    l2_grid: Sequence[float] = PROBE_L2_GRID,
    max_iter: int = 200,
) -> ProbeResult:
    """Multinomial logistic regression on standardised features, full-batch L-BFGS, with the L2 strength (on
    the mean cross-entropy) chosen on ``val`` (the first of the grid when ``val`` is empty)."""
    if len(train[1]) == 0:
        raise ValueError("the linear probe needs training data")
    xs, xv, xt = _standardise(train[0].float(), val[0].float(), test[0].float())
    has_val = len(val[1]) > 0
    best: tuple[float, float, Tensor, Tensor] | None = None
    for l2 in l2_grid if has_val else list(l2_grid)[:1]:
        with one_thread():
            w, b = _fit_logistic(xs, train[1], num_classes, l2, max_iter)
        acc = float(((xv @ w + b).argmax(-1) == val[1]).float().mean()) if has_val else 0.0
        if best is None or acc > best[0]:
            best = (acc, l2, w, b)
    assert best is not None
    acc, l2, w, b = best
    test_acc = float(((xt @ w + b).argmax(-1) == test[1]).float().mean())
    return ProbeResult(test_accuracy=test_acc, val_accuracy=acc if has_val else None, l2=l2, train_size=len(train[1]))
