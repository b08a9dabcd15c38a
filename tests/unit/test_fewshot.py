"""The few-shot linear evaluation: the closed-form solver, the choice of L2, the shots and the linear probe."""

from __future__ import annotations

import pytest
import torch

from vitlab import ViTConfig, create_model
from vitlab.fewshot import (
    extract_features,
    fewshot_accuracy,
    linear_probe,
    pm1_targets,
    ridge_fit,
    ridge_path,
    sample_shots,
)


def _lstsq_ridge(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The same problem as an ordinary least-squares solve of an augmented system:
    [x 1; sqrt(l2) I 0] [W; b] = [y; 0], so that only W is penalised."""
    n, d = x.shape
    a = torch.cat(
        [
            torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1),
            torch.cat([l2**0.5 * torch.eye(d, dtype=x.dtype), torch.zeros(d, 1, dtype=x.dtype)], 1),
        ]
    )
    rhs = torch.cat([y, torch.zeros(d, y.shape[1], dtype=y.dtype)])
    sol = torch.linalg.lstsq(a, rhs, driver="gelsd").solution
    return sol[:d], sol[d]


@pytest.mark.parametrize(("n", "d"), [(40, 8), (10, 30)])  # primal and dual forms
def test_ridge_matches_a_direct_least_squares_solve(n: int, d: int) -> None:
    x = torch.randn(n, d, dtype=torch.float64) + 3.0  # off-centre, so that the bias matters
    y = pm1_targets(torch.randint(0, 4, (n,)), 4)
    grid = [1e-3, 0.1, 10.0]
    w_path, b_path = ridge_path(x, y, grid)
    for i, l2 in enumerate(grid):
        w_ref, b_ref = _lstsq_ridge(x, y, l2)
        w, b = ridge_fit(x, y, l2)
        torch.testing.assert_close(w, w_ref, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(b, b_ref, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(w_path[i], w_ref, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(b_path[i], b_ref, atol=1e-7, rtol=1e-6)


def test_targets_are_plus_minus_one() -> None:
    t = pm1_targets(torch.tensor([0, 2]), 3)
    torch.testing.assert_close(t, torch.tensor([[1.0, -1, -1], [-1, -1, 1]], dtype=torch.float64))


def test_bad_regularisation_is_refused() -> None:
    x, y = torch.randn(4, 2), pm1_targets(torch.tensor([0, 1, 0, 1]), 2)
    with pytest.raises(ValueError, match="> 0"):
        ridge_fit(x, y, 0.0)
    with pytest.raises(ValueError, match="positive"):
        ridge_path(x, y, [])


def _blobs(
    per_class: int, k: int = 3, d: int = 6, noise: float = 0.3, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.eye(k, d)
    labels = torch.arange(k).repeat_interleave(per_class)
    return centres[labels] + noise * torch.randn(len(labels), d, generator=g), labels


def test_sample_shots_takes_distinct_examples_of_each_class() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    idx = sample_shots(labels, 2, 3, torch.Generator().manual_seed(0))
    assert labels[idx].tolist() == [0, 0, 1, 1, 2, 2] and len(set(idx.tolist())) == 6
    with pytest.raises(ValueError, match="class 1 has only 2"):
        sample_shots(labels, 3, 3, torch.Generator().manual_seed(0))


def test_fewshot_accuracy_on_separable_data_and_the_l2_choice() -> None:
    train, val, test = _blobs(20, seed=0), _blobs(10, seed=1), _blobs(10, seed=2)
    grid = [1e-2, 1e-1, 1.0]
    r = fewshot_accuracy(train, val, test, 5, num_classes=3, draws=3, seed=0, l2_grid=grid)
    assert r.accuracies == [1.0, 1.0, 1.0] and r.mean == 1.0 and r.std == 0.0
    # every strength classifies these blobs perfectly: ties go to the strongest
    assert r.l2 == [1.0] * 3 and r.val_accuracies == [1.0] * 3
    again = fewshot_accuracy(train, val, test, 5, num_classes=3, draws=3, seed=0, l2_grid=grid)
    assert again == r  # seeded draws


def test_the_chosen_l2_is_the_best_on_held_out_data() -> None:
    # 1 noisy shot per class in 40 dimensions: the held-out accuracy depends on the strength; whichever is
    # chosen must score the best held-out accuracy over the grid for that draw.
    from vitlab.fewshot import _standardise

    train, val = _blobs(30, k=4, d=40, noise=1.5, seed=3), _blobs(30, k=4, d=40, noise=1.5, seed=4)
    test = (torch.randn(8, 40), torch.zeros(8, dtype=torch.long))
    grid = [1e-3, 1.0, 1e3]
    r = fewshot_accuracy(train, val, test, 2, num_classes=4, draws=1, seed=7, l2_grid=grid)
    g = torch.Generator().manual_seed(7 * 1_000_003 + 2)  # the draw fewshot_accuracy made
    idx = sample_shots(train[1], 2, 4, g)
    xs, xv = _standardise(train[0][idx].double(), val[0].double())
    accs = []
    for l2 in grid:
        w, b = ridge_fit(xs, pm1_targets(train[1][idx], 4), l2)
        accs.append(float(((xv @ w + b).argmax(-1) == val[1]).double().mean()))
    best = max(accs)
    assert r.val_accuracies[0] == pytest.approx(best)
    assert r.l2[0] == max(l2 for l2, a in zip(grid, accs, strict=True) if a == best)


def test_fewshot_needs_held_out_data() -> None:
    train = _blobs(5)
    empty = (torch.empty(0, 6), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match="held-out"):
        fewshot_accuracy(train, empty, train, 1, num_classes=3)


def test_linear_probe_separates_blobs() -> None:
    p = linear_probe(_blobs(30, seed=0), _blobs(10, seed=1), _blobs(10, seed=2), num_classes=3, max_iter=50)
    assert p.test_accuracy == 1.0 and p.val_accuracy == 1.0 and p.train_size == 90


def test_features_are_the_pooled_pre_logits(tiny: ViTConfig) -> None:
    model = create_model(tiny.replace(representation_size=24)).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = extract_features(model, images, batch_size=2)
    assert feats.shape == (5, 24)
    from vitlab.evaluate import normalize

    x = normalize(images, model.preprocessing.mean, model.preprocessing.std)
    with torch.no_grad():
        torch.testing.assert_close(feats, model.forward_head(model.forward_features(x), pre_logits=True))
    with pytest.raises(ValueError, match="uint8"):
        extract_features(model, images.float())
