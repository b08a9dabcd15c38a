"""Accuracy of a model on in-memory images: top-1, top-5, loss and per-class accuracy.

Optional test-time augmentation (``tta="hflip"``): each image and its mirror image are classified and their
class probabilities averaged, the cheapest TTA of the small-data literature; a model trained with flips
sees both as the same class. Numbers with TTA are reported as such, never in place of plain ones.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tta = Literal["none", "hflip"]
TTA_CHOICES: tuple[Tta, ...] = ("none", "hflip")


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (B, C, H, W) -> float, (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - m) / s


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    tta: Tta = "none",
) -> Tensor:
    """Logits for uint8 images, in batches, in eval mode (the model's mode is restored).

    With ``tta="hflip"`` the result is the log of the mean softmax probability over the image and its
    horizontal mirror: log-probabilities, so argmax, top-k and cross-entropy read them as logits.
    """
    if tta not in TTA_CHOICES:
        raise ValueError(f"tta {tta!r} is not one of {list(TTA_CHOICES)}")
    was_training = model.training
    model.eval()
    outs = []
    try:
        for i in range(0, len(images), batch_size):
            x = normalize(images[i : i + batch_size].to(device), mean, std)
            logits = model(x).float()
            if tta == "hflip":  # log((p + q) / 2) in log space: finite where both probabilities underflow
                mirrored = model(x.flip(-1)).float()
                logits = torch.logaddexp(logits.log_softmax(-1), mirrored.log_softmax(-1)) - math.log(2)
            outs.append(logits.cpu())
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0, 0)


def accuracy_metrics(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> dict[str, Any]:
    """top1 / top5 (fractions), mean cross-entropy, n, per-class accuracy and the confusion matrix."""
    n = len(labels)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan"), "n": 0}
    k = logits.shape[1] if num_classes is None else num_classes
    pred = logits.argmax(1)
    topk = logits.topk(min(5, logits.shape[1]), dim=1).indices
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = confusion.diag().float() / confusion.sum(1).clamp(min=1).float()
    return {
        "top1": (pred == labels).float().mean().item(),
        "top5": (topk == labels[:, None]).any(1).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
        "n": n,
        "per_class": per_class.tolist(),
        "confusion": confusion.tolist(),
    }


def evaluate_tensors(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    tta: Tta = "none",
) -> dict[str, Any]:
    logits = predict_logits(model, images, mean, std, batch_size, device, tta)
    return accuracy_metrics(logits, labels)
