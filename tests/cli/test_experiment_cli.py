"""`vitlab experiment`: quick runs end to end on real Fashion-MNIST, bad input, and the ResNet adaptation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from vitlab.experiments import resnet18_grey


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitlab", "experiment", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def results(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def test_resnet_adaptation_takes_grey_28x28() -> None:
    model = resnet18_grey().eval()
    with torch.no_grad():
        logits = model(torch.randn(3, 1, 28, 28))
    assert logits.shape == (3, 10)
    assert model.conv1.stride == (1, 1) and model.conv1.in_channels == 1


def test_unknown_name_is_a_usage_error(tmp_path: Path) -> None:
    r = run("no-such-thing", "--quick", "--out", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "no-such-thing" in r.stderr and "pos-embed" in r.stderr


def test_unwritable_out_is_a_usage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run("pos-embed", "--quick", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "not a writable folder" in r.stderr


def test_pos_embed_quick(tmp_path: Path) -> None:
    out = tmp_path / "pos"
    r = run("pos-embed", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = results(out)
    assert res["experiment"] == "pos-embed" and res["quick"] is True
    assert [row["pos_embed"] for row in res["rows"]] == ["none", "learned", "learned_2d", "relative", "sincos_2d"]
    assert all(0.0 <= row["test_top1"] <= 1.0 for row in res["rows"])
    assert (out / "pos_embed.png").stat().st_size > 0
    assert "sincos_2d" in (out / "report.md").read_text()
    assert (out / "runs" / "pos-learned" / "model.safetensors").is_file()


def test_transfer_quick(tmp_path: Path) -> None:
    out = tmp_path / "transfer"
    r = run("transfer", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = results(out)["rows"]
    assert [row["method"] for row in rows[1:4]] == ["few-shot linear (frozen)", "fine-tune", "from scratch"]
    assert {row["shots"] for row in rows[1:]} == {5, 10}
    assert all(0.0 <= row["test_top1"] <= 1.0 for row in rows)
    assert (out / "transfer.png").is_file() and (out / "runs" / "fine-tune-5shot" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "figure", "count"),
    [("pooling", "pooling_lr.png", 4), ("patch-size", "patch_size.png", 4),
     ("inductive-bias", "accuracy_vs_data.png", 4)],
)  # fmt: skip
def test_quick_experiments(tmp_path: Path, name: str, figure: str, count: int) -> None:
    out = tmp_path / name
    r = run(name, "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rows = results(out)["rows"]
    assert len(rows) == count
    assert all(0.0 <= row["test_top1"] <= 1.0 for row in rows)
    assert (out / figure).is_file() and (out / "report.md").is_file()
