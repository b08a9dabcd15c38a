"""Shared fixtures: tiny configs, and no test may reach the network."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import torch

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
