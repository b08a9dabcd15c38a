"""``vitlab export`` as a real subprocess: every position-embedding type exports with a dynamic batch axis and
agrees with torch; the preprocessing travels with the file; int8 runs and keeps top-1; bad input exits 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab
from vitlab.config import ViTConfig

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from vitlab.export import ExportError, export, load_onnx, preprocessing_path  # noqa: E402

ATOL = 1e-4
PREPROCESSING_KEYS = {"image_size", "mean", "std", "interpolation", "crop_pct", "class_names", "in_channels"}


def vitlab_export(*args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VITLAB_OFFLINE": "1"}  # a CLI test never downloads
    cmd = [sys.executable, "-m", "vitlab", "export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def tiny_model(**overrides: object) -> vitlab.ViT:
    base: dict[str, object] = dict(image_size=32, patch_size=8, hidden_dim=32, num_layers=2, num_heads=4, mlp_dim=64)
    base.update(overrides)
    config = ViTConfig(num_classes=5, **base)  # type: ignore[arg-type]
    model = vitlab.ViT(config, class_names=["a", "b", "c", "d", "e"])
    with torch.no_grad():  # non-zero everything, so that every part of the graph matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def fp32_error(stdout: str) -> float:
    match = re.search(r"fp32 max abs error vs torch: (\S+)", stdout)
    assert match, stdout
    return float(match.group(1))


@pytest.mark.parametrize(
    ("pos_embed", "pool", "image_size"),
    [
        ("learned", "token", (32, 32)),
        ("learned_2d", "token", (32, 48)),
        ("sincos_2d", "gap", (32, 32)),
        ("relative", "token", (32, 32)),
        ("none", "token", (32, 32)),
        # 82 tokens: more than EXPLICIT_ATTENTION_MAX_TOKENS, so the forward (and the export) goes through SDPA
        ("learned", "token", (72, 72)),
        ("relative", "token", (72, 72)),
    ],
)
@torch.no_grad()
def test_every_pos_embed_exports_with_a_dynamic_batch(
    pos_embed: str, pool: str, image_size: tuple[int, int], tmp_path: Path
) -> None:
    model = tiny_model(pos_embed=pos_embed, pool=pool, image_size=image_size)
    model.preprocessing = vitlab.Preprocessing(
        image_size=image_size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), crop_pct=0.875
    )
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "export" / "model.onnx"
    r = vitlab_export(tmp_path / "ckpt", "--out", out)
    assert r.returncode == 0, r.stderr
    assert fp32_error(r.stdout) <= ATOL
    assert {p.name for p in out.parent.iterdir()} == {"model.onnx", "model.preprocessing.json"}  # no temp files

    meta = json.loads(preprocessing_path(out).read_text())
    assert meta.keys() >= PREPROCESSING_KEYS
    assert meta["image_size"] == list(image_size)
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    assert meta["crop_pct"] == 0.875 and meta["interpolation"] == "bicubic"
    assert meta["class_names"] == ["a", "b", "c", "d", "e"] and meta["in_channels"] == 3
    assert meta["quantization"] is None

    proto = onnx.load(str(out))
    (graph_input,) = proto.graph.input
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, *image_size]

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # other sizes than the tool checked
        x = torch.randn(batch, 3, *image_size)
        got = session.run(None, {"images": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), model(x), atol=ATOL, rtol=0)


@pytest.fixture
def fitted_grey(fitted_grey_model: Path) -> tuple[Path, torch.Tensor]:
    """The shared tiny fitted grey model, and normalised Fashion-MNIST test images."""
    from vitlab.datasets import load_data

    data = load_data("fashion-mnist", limit=256)
    assert data.test is not None
    return fitted_grey_model, (data.test.images[:64].float() / 255 - 0.29) / 0.35


@torch.no_grad()
def test_int8_runs_and_keeps_top1(fitted_grey: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    ckpt, images = fitted_grey
    out = tmp_path / "q.onnx"
    r = vitlab_export(ckpt, "--out", out, "--int8", "--batch-check", "4")
    assert r.returncode == 0, r.stderr
    assert fp32_error(r.stdout) <= ATOL
    match = re.search(r"int8 top-1 agreement with fp32: (\S+) on 5 random inputs", r.stdout)
    assert match, r.stdout
    assert 0.0 <= float(match.group(1)) <= 1.0
    ops = {node.op_type for node in onnx.load(str(out)).graph.node}
    assert "MatMulInteger" in ops  # really quantised
    assert json.loads(preprocessing_path(out).read_text())["quantization"].startswith("dynamic-int8")

    q = load_onnx(out)
    reference = vitlab.from_pretrained(ckpt)
    agree = (q(images).argmax(1) == reference(images).argmax(1)).float().mean().item()
    assert agree >= 0.9, agree
    assert {p.name for p in tmp_path.iterdir()} == {"q.onnx", "q.preprocessing.json"}  # the fp32 one was temporary


@torch.no_grad()
def test_onnx_classifier_stands_in_for_the_model_in_predict(tmp_path: Path) -> None:
    """The steps of ``vitlab predict`` (read, resize, normalise, forward) give the same logits from ONNX."""
    from vitlab.evaluate import normalize
    from vitlab.preprocess import load_for_model

    model = tiny_model()
    model.preprocessing = vitlab.Preprocessing(image_size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    export(model, tmp_path / "m.onnx")
    onnx_model = load_onnx(tmp_path / "m.onnx").eval()
    assert onnx_model.preprocessing == model.preprocessing
    assert onnx_model.class_names == model.class_names
    assert onnx_model.config == model.config
    assert (onnx_model.config.in_channels, onnx_model.config.num_classes) == (3, 5)

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "img.png")
    pre = onnx_model.preprocessing
    x = normalize(load_for_model(tmp_path / "img.png", pre, 3)[None], pre.mean, pre.std)
    torch.testing.assert_close(onnx_model(x), model(x), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"shape \(batch, 3, 32, 32\)"):
        onnx_model(torch.randn(1, 3, 16, 16))


def test_metadata_inside_the_model_when_the_json_is_gone(tmp_path: Path) -> None:
    model = tiny_model(pos_embed="sincos_2d")
    report = export(model, tmp_path / "m.onnx")
    report.preprocessing_path.unlink()
    loaded = load_onnx(tmp_path / "m.onnx")
    assert loaded.preprocessing == model.preprocessing and loaded.class_names == model.class_names


def test_dynamo_exporter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("onnxscript")
    from vitlab.cli import main

    model = tiny_model()
    report = export(model, tmp_path / "m.onnx", exporter="dynamo", opset=18)
    assert report.fp32_max_abs_error <= ATOL
    model.save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--out", str(tmp_path / "d.onnx"), "--exporter", "dynamo"]) == 0
    assert "(opset 18," in capsys.readouterr().out  # its own default: it writes no opset below 18
    with pytest.raises(ExportError, match="relative"):
        export(tiny_model(pos_embed="relative"), tmp_path / "r.onnx", exporter="dynamo", opset=18)


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("small")
    tiny_model(num_layers=1).save_pretrained(out)
    return out


def test_failed_check_writes_nothing(small_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    out.write_bytes(b"an older file, kept")
    r = vitlab_export(small_ckpt, "--out", out)
    assert r.returncode == 2 and "exists: pass --overwrite" in r.stderr  # an existing file needs a yes
    r = vitlab_export(small_ckpt, "--out", out, "--atol", "1e-15", "--overwrite")
    assert r.returncode == 1
    assert "check failed" in r.stderr and "nothing written" in r.stderr
    assert out.read_bytes() == b"an older file, kept"
    assert {p.name for p in tmp_path.iterdir()} == {"m.onnx"}


def test_unknown_source_exits_2(tmp_path: Path) -> None:
    r = vitlab_export(tmp_path / "nowhere", "--out", tmp_path / "m.onnx")
    assert r.returncode == 2
    assert "vitlab export: error:" in r.stderr and "nowhere" in r.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_out_exits_2(small_ckpt: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    r = vitlab_export(small_ckpt, "--out", blocker / "m.onnx")
    assert r.returncode == 2
    assert "cannot write" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ExportError, match="is a directory"):
        export(tiny_model(num_layers=1), tmp_path)


def test_bad_opset_exits_2(small_ckpt: Path, tmp_path: Path) -> None:
    r = vitlab_export(small_ckpt, "--out", tmp_path / "m.onnx", "--opset", "9")
    assert r.returncode == 2 and "opset 9" in r.stderr
    with pytest.raises(ExportError, match="batch_check"):
        export(tiny_model(num_layers=1), tmp_path / "m.onnx", batch_check=1)
    assert not list(tmp_path.iterdir())


def test_load_onnx_errors(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="no ONNX file"):
        load_onnx(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ExportError, match="cannot load"):
        load_onnx(tmp_path / "junk.onnx")


def test_missing_onnx_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, small_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from vitlab.cli import main
    from vitlab.export import MissingDependencyError, require_onnx

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'vitlab\[export\]'"):
        require_onnx()
    assert main(["export", str(small_ckpt), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "vitlab[export]" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@torch.no_grad()
def test_predict_runs_on_an_onnx_model_in_place_of_a_vit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What ``vitlab predict --onnx`` will do: the same predictions from the ONNX file as from the checkpoint."""
    import vitlab.checkpoint
    from vitlab.cli import main

    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    export(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    images = [str(tmp_path / f"{i}.png") for i in range(3)]
    assert main(["predict", str(tmp_path / "ckpt"), *images, "--json"]) == 0
    expected = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    monkeypatch.setattr(vitlab.checkpoint, "from_pretrained", lambda source, **_: load_onnx(source))
    assert main(["predict", str(tmp_path / "m.onnx"), *images, "--json"]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [[p["label"] for p in row["predictions"]] for row in got] == [
        [p["label"] for p in row["predictions"]] for row in expected
    ]
    for g, e in zip(got, expected, strict=True):
        for pg, pe in zip(g["predictions"], e["predictions"], strict=True):
            assert pg["probability"] == pytest.approx(pe["probability"], abs=1e-5)
