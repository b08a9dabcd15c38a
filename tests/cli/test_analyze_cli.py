"""``vitlab analyze`` and ``vitlab fewshot`` end to end on a tiny random model and a Fashion-MNIST slice.

The successful runs are real subprocesses; the usage errors go through ``cli.main`` in-process (same code path
after argument parsing, without paying for a fresh interpreter each)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitlab import create_model
from vitlab.cli import main
from vitlab.datasets import find_dataset_files


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, timeout=120)


def _have_fashion_mnist() -> bool:
    try:
        find_dataset_files("fashion-mnist")
    except ValueError:
        return False
    return True


needs_data = pytest.mark.skipif(not _have_fashion_mnist(), reason="Fashion-MNIST is not on disk")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = create_model(
        "Ti/7", image_size=28, in_channels=1, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64, num_classes=10
    )
    return model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "tiny")


@needs_data
def test_analyze_on_fashion_mnist(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    result = run("analyze", str(checkpoint), "--data", "fashion-mnist", "--num-images", "12", "--num-samples", "4",
                 "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "mean attention distance" in result.stdout
    names = ("rollout.png", "filters.png", "position_similarity.png", "attention_distance.png")
    for name in names:
        data = (out / name).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    a = json.loads((out / "analysis.json").read_text())
    assert a["num_images"] == 12 and a["grid"] == [4, 4]
    mad = a["mean_attention_distance"]
    assert len(mad) == 2 and all(len(row) == 4 for row in mad)  # [layers][heads]
    assert all(0 <= d <= 28 * 2**0.5 for row in mad for d in row)  # pixels, within the image diagonal
    sim = a["position_similarity"]["matrix"]
    assert len(sim) == 16 and all(len(row) == 16 for row in sim)
    assert all(abs(sim[i][i] - 1) < 1e-4 for i in range(16))
    assert {"mean_entropy", "centre_share", "uniform_entropy"} <= set(a["rollout"])
    assert a["model"]["config"]["num_layers"] == 2 and sorted(a["figures"].values()) == sorted(names)
    report = (out / "report.md").read_text()
    assert all(f"({name})" in report for name in names)


def test_analyze_image_files(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # RGB and of another size: converted and resized with the model's preprocessing
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    assert main(["analyze", str(checkpoint), "--images", str(folder), "--out", str(out)]) == 0
    a = json.loads((out / "analysis.json").read_text())
    assert a["num_images"] == 3 and a["image_size"] == [28, 28]


def test_analyze_usage_errors(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(checkpoint), "--out", str(out)])
    assert e.value.code == 2 and "one of the arguments --data --images is required" in capsys.readouterr().err
    assert main(["analyze", str(checkpoint), "--data", "no-such-data", "--out", str(out)]) == 2
    assert "no dataset 'no-such-data'" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert main(["analyze", str(checkpoint), "--images", str(tmp_path / "bad.png"), "--out", str(out)]) == 2
    assert "bad.png: not an image" in capsys.readouterr().err
    assert main(["analyze", str(checkpoint), "--images", str(tmp_path / "bad.png"), "--num-images", "0",
                 "--out", str(out)]) == 2  # fmt: skip
    assert "--num-images must be >= 1" in capsys.readouterr().err
    assert not out.exists()  # nothing half-written


@needs_data
def test_fewshot_json_last_line_is_the_shots_mapping(checkpoint: Path) -> None:
    result = run("fewshot", str(checkpoint), "--data", "fashion-mnist", "--limit", "300", "--shots", "1", "5",
                 "--draws", "2", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert list(last) == ["1", "5"] and all(0.0 <= v <= 1.0 for v in last.values())
    details = json.loads(result.stdout.strip().splitlines()[-2])
    assert 0.0 <= details["linear_probe"]["test_accuracy"] <= 1.0
    assert len(details["fewshot"]["5"]["accuracies"]) == 2
    assert "linear probe" in result.stderr


@needs_data
def test_fewshot_usage_errors(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 100 images, 10 held out: 9 training images per class
    assert main(["fewshot", str(checkpoint), "--data", "fashion-mnist", "--limit", "100", "--shots", "10"]) == 2
    err = capsys.readouterr().err
    assert "--shots 10 is more than the 9 training image(s)" in err and "use --shots <= 9" in err
    assert main(["fewshot", str(checkpoint), "--data", "no-such-data", "--shots", "1"]) == 2
    assert "no dataset 'no-such-data'" in capsys.readouterr().err
    assert main(["fewshot", str(checkpoint), "--data", "fashion-mnist", "--shots", "0"]) == 2
    assert "--shots must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["fewshot", str(checkpoint), "--shots", "1"])
    assert e.value.code == 2 and "--data" in capsys.readouterr().err
