"""Accuracy on in-memory images, with and without test-time augmentation."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from vitlab import ViTConfig
from vitlab.evaluate import accuracy_metrics, evaluate_tensors, normalize, predict_logits


def test_hflip_tta_averages_the_probabilities_of_each_image_and_its_mirror(tiny: ViTConfig) -> None:
    torch.manual_seed(0)
    model = vitlab.create_model(tiny.replace(in_channels=1)).eval()
    images = torch.randint(0, 256, (7, 1, *tiny.image_size), dtype=torch.uint8)
    mean, std = (0.3,), (0.2,)
    got = predict_logits(model, images, mean, std, batch_size=3, tta="hflip")
    with torch.no_grad():
        x = normalize(images, mean, std)
        want = ((model(x).softmax(-1) + model(x.flip(-1)).softmax(-1)) / 2).log()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.exp().sum(-1), torch.ones(7))  # log-probabilities, read as logits downstream
    plain = predict_logits(model, images, mean, std, batch_size=3)
    assert not torch.allclose(plain.log_softmax(-1), got, atol=1e-4)  # the mirror changed something
    mirrored = predict_logits(model, images.flip(-1), mean, std, batch_size=3, tta="hflip")
    torch.testing.assert_close(mirrored, got, rtol=1e-5, atol=1e-6)  # invariant to flipping the input


def test_evaluate_tensors_with_tta_reports_metrics_of_the_averaged_prediction(tiny: ViTConfig) -> None:
    torch.manual_seed(1)
    model = vitlab.create_model(tiny.replace(in_channels=1))
    images = torch.randint(0, 256, (9, 1, *tiny.image_size), dtype=torch.uint8)
    labels = torch.randint(0, tiny.num_classes, (9,))
    result = evaluate_tensors(model, images, labels, (0.5,), (0.5,), tta="hflip")
    logits = predict_logits(model, images, (0.5,), (0.5,), tta="hflip")
    assert result == accuracy_metrics(logits, labels)
    assert model.training  # the model's mode is restored


def test_unknown_tta_is_refused(tiny: ViTConfig) -> None:
    model = vitlab.create_model(tiny.replace(in_channels=1))
    images = torch.zeros(2, 1, *tiny.image_size, dtype=torch.uint8)
    with pytest.raises(ValueError, match="tta 'vflip' is not one of \\['none', 'hflip'\\]"):
        predict_logits(model, images, (0.5,), (0.5,), tta="vflip")  # type: ignore[arg-type]


def test_hflip_tta_stays_finite_where_both_views_underflow() -> None:
    class Confident(torch.nn.Module):  # logit gaps far beyond fp32 softmax's range, different in each view
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            side = x[:, 0, 0, :1].sign()  # +1 or -1, swapped by the mirror
            return torch.cat([side * 300, -side * 300, torch.full_like(side, -500)], dim=1)

    images = torch.zeros(2, 1, 2, 2, dtype=torch.uint8)
    images[0, 0, :, 0] = 255  # bright left column: class 0 in this view, class 1 in the mirror
    images[1, 0, :, 1] = 255
    got = predict_logits(Confident(), images, (0.5,), (0.5,), tta="hflip")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, :2], torch.full((2, 2), -math.log(2)))  # half the mass on each of 0 and 1
    assert got[0, 2] < -700  # the class neither view believes: ~-800, not -inf
