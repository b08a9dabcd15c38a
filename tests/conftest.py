"""Shared fixtures: tiny configs, and no test may reach the network."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

import vitlab
from vitlab import ViTConfig


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse connections to anything but loopback, so that a test that would download fails."""
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family not in (socket.AF_INET, socket.AF_INET6):
            return real_connect(self, address)
        host = str(address[0])
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            raise RuntimeError(f"tests never download: refused a connection to {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def tiny() -> ViTConfig:
    return ViTConfig(image_size=32, patch_size=8, hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128, num_classes=10)


@pytest.fixture(scope="session")
def fitted_grey_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 1-channel 28x28 model, briefly fitted to a Fashion-MNIST slice so that its predictions mean
    something, saved as a vitlab directory (class names and preprocessing included)."""
    from vitlab.datasets import load_data

    torch.manual_seed(0)
    data = load_data("fashion-mnist", limit=512)
    model = vitlab.create_model("Ti/7", image_size=28, in_channels=1, num_classes=10, hidden_dim=32, num_layers=1,
                                num_heads=2, mlp_dim=64)  # fmt: skip
    model.class_names = list(data.train.class_names)
    model.preprocessing = vitlab.Preprocessing(image_size=28, mean=(0.29,), std=(0.35,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = (data.train.images.float() / 255 - 0.29) / 0.35
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x), data.train.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("fitted-grey")
    model.save_pretrained(out)
    return out
