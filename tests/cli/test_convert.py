"""``vitlab convert`` as a real subprocess: Google .npz to vitlab, timm and HF directories that load with the
same logits in those libraries; bad input exits 2 with a message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vitlab
from tests.parity.test_formats import google_npz, save_npz, torchvision_model

ATOL = 1e-4


def convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VITLAB_OFFLINE": "1"}  # a CLI test never downloads
    cmd = [sys.executable, "-m", "vitlab", "convert", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def npz(tmp_path: Path) -> Path:
    return save_npz(google_npz(), tmp_path / "ViT-T_8.npz")


@torch.no_grad()
def test_convert_to_vitlab_with_new_size_and_head(npz: Path, tmp_path: Path) -> None:
    out = tmp_path / "ours"
    result = convert(npz, "--out", out, "--image-size", "32x48", "--num-classes", "3")
    assert result.returncode == 0, result.stderr
    assert "wrote vitlab checkpoint" in result.stdout
    loaded = vitlab.from_pretrained(out)
    expected = vitlab.from_pretrained(npz, image_size=(32, 48), num_classes=3)
    assert loaded.config == expected.config
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(loaded.forward_features(x), expected.forward_features(x))


@torch.no_grad()
def test_convert_to_timm_round_trip(npz: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file

    out = tmp_path / "timm"
    result = convert(npz, "--out", out, "--to", "timm")
    assert result.returncode == 0, result.stderr
    cfg = json.loads((out / "config.json").read_text())
    reference = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
    reference.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    assert cfg["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]
    ours = vitlab.from_pretrained(npz)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reference(x), ours(x), atol=ATOL, rtol=ATOL)
    back = vitlab.from_pretrained(out / "model.safetensors", num_heads=4)  # timm -> vitlab again
    torch.testing.assert_close(back(x), ours(x), atol=ATOL, rtol=ATOL)
    folder = vitlab.from_pretrained(out)  # the folder itself: heads and preprocessing from its config.json
    assert folder.config == ours.config and folder.preprocessing == ours.preprocessing
    torch.testing.assert_close(folder(x), ours(x), atol=ATOL, rtol=ATOL)


@torch.no_grad()
def test_convert_to_hf_loads_in_transformers(npz: Path, tmp_path: Path) -> None:
    from transformers import ViTForImageClassification

    out = tmp_path / "hf"
    result = convert(npz, "--out", out, "--to", "hf")
    assert result.returncode == 0, result.stderr
    reference = ViTForImageClassification.from_pretrained(out).eval()
    ours = vitlab.from_pretrained(npz)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(reference(pixel_values=x).logits, ours(x), atol=ATOL, rtol=ATOL)
    back = vitlab.from_pretrained(out)  # HF -> vitlab again, eps and preprocessing kept
    assert back.config.layer_norm_eps == ours.config.layer_norm_eps
    assert back.preprocessing.mean == ours.preprocessing.mean
    torch.testing.assert_close(back(x), ours(x), atol=ATOL, rtol=ATOL)


def test_bad_input_exits_2_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "tv.pth"
    torch.save(torchvision_model().state_dict(), path)
    result = convert(path, "--out", tmp_path / "o")
    assert result.returncode == 2 and "--num-heads" in result.stderr and "Traceback" not in result.stderr


def test_bad_input_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same exit-code path as the subprocess, without paying for another interpreter start each time."""
    from vitlab.cli import main

    assert main(["convert", str(tmp_path / "nothing.npz"), "--out", str(tmp_path / "o")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    rep = save_npz(google_npz(rep=16), tmp_path / "i21k.npz")
    assert main(["convert", str(rep), "--out", str(tmp_path / "o"), "--to", "hf"]) == 2
    assert "representation_size=None" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["convert", str(rep), "--out", str(tmp_path / "o"), "--to", "hf", "--drop-pre-logits"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()


@torch.no_grad()
def test_convert_non_square_to_hf_loads_in_transformers(npz: Path, tmp_path: Path) -> None:
    from transformers import ViTForImageClassification

    from vitlab.cli import main

    out = tmp_path / "hf"
    assert main(["convert", str(npz), "--out", str(out), "--to", "hf", "--image-size", "32x48"]) == 0
    reference = ViTForImageClassification.from_pretrained(out).eval()
    ours = vitlab.from_pretrained(npz, image_size=(32, 48))
    x = torch.randn(2, 3, 32, 48)
    torch.testing.assert_close(reference(pixel_values=x).logits, ours(x), atol=ATOL, rtol=ATOL)
    assert vitlab.from_pretrained(out).config == ours.config


def test_out_is_never_merged_into_or_over_the_source(
    npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitlab.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert", str(npz), "--out", str(out)]) == 2
    assert "not empty: pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["convert", str(npz), "--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]  # replaced whole
    capsys.readouterr()
    hf = tmp_path / "hf"
    assert main(["convert", str(npz), "--out", str(hf), "--to", "hf"]) == 0
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for target in (hf, tmp_path):  # the source itself, and a folder holding it
        assert main(["convert", str(hf), "--out", str(target), "--overwrite"]) == 2
        assert "would replace or hold the source" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    assert main(["convert", str(hf), "--out", str(hf / "timm"), "--to", "timm"]) == 0  # beside SRC's files: fine
    assert {p.name: p.read_bytes() for p in hf.iterdir() if p.is_file()} == before
    capsys.readouterr()
    file = tmp_path / "file"
    file.write_text("x")
    assert main(["convert", str(npz), "--out", str(file), "--to", "timm"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_a_failed_write_leaves_nothing(
    npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    from vitlab.cli import main

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    work = tmp_path / "work"
    work.mkdir()
    for to in ("vitlab", "timm", "hf"):
        assert main(["convert", str(npz), "--out", str(work / "out"), "--to", to]) == 2
        err = capsys.readouterr().err
        assert "cannot write" in err and "No space left on device" in err and "Traceback" not in err
        assert list(work.iterdir()) == []  # no --out, no temporary folder


def test_a_new_head_is_said_to_be_new(npz: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from vitlab.cli import main

    assert main(["convert", str(npz), "--out", str(tmp_path / "a")]) == 0
    assert "head is new" not in capsys.readouterr().out
    assert main(["convert", str(npz), "--out", str(tmp_path / "b"), "--num-classes", "3"]) == 0
    assert "the 3-class head is new (zero-initialised)" in capsys.readouterr().out


def test_an_existing_folder_keeps_its_identity(npz: Path, tmp_path: Path) -> None:
    """An empty --out folder (or a symlink to one) is filled in place: its mode stays, a link stays a link."""
    from vitlab.cli import main

    empty = tmp_path / "empty"
    empty.mkdir()
    os.chmod(empty, 0o2750)
    assert main(["convert", str(npz), "--out", str(empty)]) == 0
    assert os.stat(empty).st_mode & 0o7777 == 0o2750
    assert sorted(p.name for p in empty.iterdir()) == ["config.json", "model.safetensors"]
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main(["convert", str(npz), "--out", str(link), "--to", "timm"]) == 0
    assert link.is_symlink() and (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ViT-T_8.npz", "empty", "link", "target"]  # no leftovers
