"""What `vitlab train` does to the folders it is given: it never writes into a folder holding something else or
its own starting checkpoint, saves paths that mean the same from any directory, and names broken run files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitlab
from tests.cli.test_train_cli import TINY, run
from vitlab.cli import main


def tiny_checkpoint(path: Path) -> Path:
    vitlab.create_model("Ti/7", image_size=28, in_channels=1, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                        num_classes=3).save_pretrained(path)  # fmt: skip
    return path


def flat_folder(root: Path) -> Path:
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (28, 28), color=40 * c + i).save(root / name / f"{i}.png")
    return root


def test_out_holding_the_init_from_checkpoint_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_checkpoint(tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for out in (src, tmp_path):  # the checkpoint itself, and a folder holding it
        assert main(["train", "--init-from", str(src), "--out", str(out), "--overwrite", "--max-steps", "1"]) == 2
        assert "holds --init-from" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_files_a_run_would_replace_need_overwrite_and_others_are_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tiny_checkpoint(tmp_path / "model")  # a saved model, not a run: its files are what a run writes
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(model)]) == 2
    assert "holds config.json, model.safetensors but no run to resume" in capsys.readouterr().err
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]
    mine = tmp_path / "mine"  # e.g. `vitlab train --out mine | tee mine/train.log`
    mine.mkdir()
    (mine / "train.log").write_text("mine")
    (mine / "model.safetensors").write_text("left by a half-deleted run")  # an --overwrite that failed half way
    r = run("train", *TINY, "--max-steps", "1", "--out", str(mine), "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (mine / "train.log").read_text() == "mine" and (mine / "run_config.json").is_file()
    vitlab.from_pretrained(mine)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--threads", "-2"], "threads must be >= 1"),
    ],
)
def test_contradicting_or_bad_flags(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_out_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "f").write_text("x")
    assert main(["train", *TINY, "--max-steps", "1", "--out", str(tmp_path / "f" / "run")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_fine_tuning_any_architecture_under_the_default_recipe(tmp_path: Path) -> None:
    """The recipe's width and depth describe the model it builds, not a checkpoint's (whose weights fix them)."""
    src = tiny_checkpoint(tmp_path / "src")
    r = run("train", "--init-from", str(src), "--print-config")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_overrides"] == {}
    r = run("train", "--init-from", str(src), "--data", "fashion-mnist", "--limit", "128", "--batch-size", "16",
            "--max-steps", "1", "--threads", "1", "--no-compile", "--no-progress",
            "--out", str(tmp_path / "ft"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert vitlab.from_pretrained(tmp_path / "ft").config.num_layers == 1


def test_paths_are_saved_absolute_and_broken_run_files_are_named(tmp_path: Path) -> None:
    flat_folder(tmp_path / "flat")
    args = ["train", "--data", "flat", "--image-size", "28x35", "--batch-size", "8", "--max-steps", "2",
            "--threads", "1", "--no-compile", "--no-progress", "--set", "model.hidden_dim=32",
            "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.mlp_dim=64",
            "--out", "run"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    run_dir = tmp_path / "run"
    saved = json.loads((run_dir / "run_config.json").read_text())
    assert saved["data"] == str((tmp_path / "flat").resolve())
    assert saved["image_size"] == [28, 35] and vitlab.from_pretrained(run_dir).config.image_size == (28, 35)
    stale = run_dir / ".training_state.pt.k1ll9d.tmp"  # what a kill -9 inside an atomic write leaves
    stale.write_bytes(b"half")
    state = torch.load(run_dir / "training_state.pt", weights_only=True)
    (run_dir / "training_state.pt").write_bytes(b"PK\x03\x04 cut short")
    r = run("train", "--out", str(run_dir), "--resume", "--no-progress")  # from another working directory
    assert r.returncode == 2 and "training_state.pt (truncated or corrupt?)" in r.stderr and "Traceback" not in r.stderr
    assert not stale.exists()
    torch.save(state, run_dir / "training_state.pt")
    (run_dir / "run_config.json").write_text('{"data": ')
    r = run("train", "--out", str(run_dir), "--resume", "--no-progress")
    assert r.returncode == 2 and "cannot read the run's settings" in r.stderr and "run_config.json" in r.stderr
