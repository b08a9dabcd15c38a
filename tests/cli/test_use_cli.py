"""`vitlab evaluate` and `vitlab predict` end to end on tiny real data and files the tests write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vitlab
from vitlab.datasets import load_data


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip


@pytest.fixture
def grey_model(fitted_grey_model: Path) -> Path:
    return fitted_grey_model


def test_evaluate_json_on_fashion_mnist(grey_model: Path, tmp_path: Path) -> None:
    r = run("evaluate", str(grey_model), "--data", "fashion-mnist", "--limit", "300", "--json", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 300
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0
    assert set(result["per_class"]) == {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                                        "Sneaker", "Bag", "Ankle boot"}  # fmt: skip
    assert (tmp_path / "confusion.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert sum(map(sum, saved["confusion"])) == 300


def test_evaluate_with_flip_tta_reports_it_and_matches_the_library(grey_model: Path) -> None:
    from vitlab.evaluate import accuracy_metrics, predict_logits

    r = run("evaluate", str(grey_model), "--data", "fashion-mnist", "--limit", "200", "--tta", "hflip", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["tta"] == "hflip" and result["n"] == 200
    model = vitlab.from_pretrained(grey_model)
    test = load_data("fashion-mnist", limit=200).test
    assert test is not None
    logits = predict_logits(model, test.images, model.preprocessing.mean, model.preprocessing.std, tta="hflip")
    want = accuracy_metrics(logits, test.labels)
    assert result["top1"] == pytest.approx(want["top1"]) and result["top5"] == pytest.approx(want["top5"])
    bad = run("evaluate", str(grey_model), "--data", "fashion-mnist", "--tta", "vflip")
    assert bad.returncode == 2 and "--tta: invalid choice: 'vflip'" in bad.stderr


def test_evaluate_on_an_image_folder_maps_classes_by_name(grey_model: Path, tmp_path: Path) -> None:
    data = load_data("fashion-mnist", limit=40)
    assert data.test is not None
    keep = ["Trouser", "Bag"]  # a subset of the model's classes, in another order than the model's
    for name in keep:
        (tmp_path / "test" / name.replace("/", "-")).mkdir(parents=True)
        (tmp_path / "train" / name).mkdir(parents=True)
    for i in range(len(data.test)):
        name = data.test.class_names[int(data.test.labels[i])]
        if name in keep:
            img = Image.fromarray(data.test.images[i, 0].numpy(), mode="L")
            img.save(tmp_path / "test" / name / f"{i}.png")
            img.save(tmp_path / "train" / name / f"{i}.png")
    r = run("evaluate", str(grey_model), "--data", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    folder = json.loads(r.stdout.strip().splitlines()[-1])
    # the same images through predict: the folder's accuracy is the share predicted as their own class
    r = run("predict", str(grey_model), str(tmp_path / "test"), "--json", "--top-k", "1")
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    right = sum(row["predictions"][0]["label"] == Path(row["path"]).parent.name for row in rows)
    assert folder["n"] == len(rows)
    # evaluate restricts the logits to the folder's classes, so it can only be right more often
    assert folder["top1"] >= right / len(rows)


def test_predict_json_lines_errors_and_exit_status(grey_model: Path, tmp_path: Path) -> None:
    data = load_data("fashion-mnist", limit=20)
    assert data.test is not None
    good = []
    for i in range(3):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(data.test.images[i, 0].numpy(), mode="L").save(p)
        good.append(p)
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good[0].read_bytes()[:60])
    text = tmp_path / "notes.png"
    text.write_text("hello")
    missing = tmp_path / "missing.png"
    r = run("predict", str(grey_model), str(good[0]), str(truncated), str(text), str(missing), str(good[1]),
            str(tmp_path / "img2*.png"), "--json", "--top-k", "3")  # fmt: skip
    assert r.returncode == 1
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [Path(row["path"]).name for row in rows] == ["img0.png", "cut.png", "notes.png", "missing.png",
                                                        "img1.png", "img2.png"]  # fmt: skip
    for row in rows:
        if row["path"].endswith(("cut.png", "notes.png", "missing.png")):
            assert row["error"] and "predictions" not in row
        else:
            preds = row["predictions"]
            assert len(preds) == 3 and isinstance(preds[0]["index"], int) and isinstance(preds[0]["label"], str)
            probs = [p["probability"] for p in preds]
            assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    assert "no such file" in rows[3]["error"] and "not an image" in rows[2]["error"]
    assert "3 of 6 input(s) could not be read" in r.stderr

    r = run("predict", str(grey_model), *map(str, good))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    labels = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert len(lines) == 3
    for line, path in zip(lines, good, strict=True):
        name, shown = line.split("\t")
        assert name == str(path) and shown.split(",")[0].rsplit(" ", 1)[0] in labels


def test_a_command_under_torchrun_skips_teardown_but_keeps_output_and_status(grey_model: Path, tmp_path: Path) -> None:
    # under torchrun (WORLD_SIZE > 1) the CLI leaves with os._exit once done, skipping the interpreter's teardown
    # (an atexit hook stands for it here); buffered output must still reach the pipe, the status the process
    Image.new("L", (28, 28), 128).save(tmp_path / "a.png")
    hook = tmp_path / "site"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import atexit, sys\natexit.register(lambda: print('TEARDOWN', file=sys.stderr))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # stdout to a pipe: block-buffered
    env["PYTHONPATH"] = os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])
    torchrun = {**env, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    for args, status in [
        (("models",), 0),
        (("predict", str(grey_model), str(tmp_path / "a.png"), str(tmp_path / "no.png"), "--json"), 1),
    ]:
        alone, launched = run(*args, env=env), run(*args, env=torchrun)
        assert alone.returncode == launched.returncode == status, launched.stderr
        assert launched.stdout == alone.stdout and alone.stdout.strip()
        assert "TEARDOWN" in alone.stderr and "TEARDOWN" not in launched.stderr


def test_same_picture_grey_or_rgb_or_16_bit_gives_the_same_answer(grey_model: Path, tmp_path: Path) -> None:
    data = load_data("fashion-mnist", limit=20)
    assert data.test is not None
    pixels = data.test.images[5, 0].numpy()
    Image.fromarray(pixels, mode="L").save(tmp_path / "grey.png")
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.stack([pixels] * 3 + [np.full_like(pixels, 255)], -1), mode="RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # I;16
    Image.fromarray(np.stack([pixels] * 3, -1), mode="RGB").convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    r = run("predict", str(grey_model), str(tmp_path), "--json", "--top-k", "10")
    assert r.returncode == 0, r.stderr
    rows = {Path(row["path"]).name: row["predictions"] for row in map(json.loads, r.stdout.splitlines())}
    reference = {p["index"]: p["probability"] for p in rows["grey.png"]}
    for name in ("rgb.png", "rgba.png", "deep.png"):
        assert {p["index"]: pytest.approx(p["probability"], abs=1e-6) for p in rows[name]} == reference, name
    assert rows["cmyk.jpg"][0]["index"] == rows["grey.png"][0]["index"]  # lossy JPEG: same top class


def test_exif_orientation_is_respected(grey_model: Path, tmp_path: Path) -> None:
    data = load_data("fashion-mnist", limit=20)
    assert data.test is not None
    pixels = data.test.images[3, 0].numpy()
    Image.fromarray(pixels, mode="L").save(tmp_path / "upright.png")
    rotated = Image.fromarray(np.rot90(pixels, k=1).copy(), mode="L")  # stored turned left; EXIF 6: turn right
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    rotated.save(tmp_path / "turned.png", exif=exif)
    r = run("predict", str(grey_model), str(tmp_path / "upright.png"), str(tmp_path / "turned.png"), "--json")
    a, b = (json.loads(line)["predictions"] for line in r.stdout.splitlines())
    assert [p["index"] for p in a] == [p["index"] for p in b]
    assert a[0]["probability"] == pytest.approx(b[0]["probability"], abs=1e-6)


def test_decompression_bomb_is_refused(grey_model: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(bomb)  # 144 Mpx: over PIL's limit, tiny on disk
    r = run("predict", str(grey_model), str(bomb), "--json")
    assert r.returncode == 1
    assert "decompression bomb" in json.loads(r.stdout.splitlines()[0])["error"]


def test_predict_with_an_exported_onnx_model_matches_the_checkpoint(grey_model: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    data = load_data("fashion-mnist", limit=20)
    assert data.test is not None
    for i in range(4):
        Image.fromarray(data.test.images[i, 0].numpy(), mode="L").save(tmp_path / f"{i}.png")
    onnx = tmp_path / "model.onnx"
    r = run("export", str(grey_model), "--out", str(onnx))
    assert r.returncode == 0, r.stderr
    a = run("predict", str(grey_model), str(tmp_path), "--json")
    b = run("predict", "--onnx", str(onnx), str(tmp_path), "--json")
    assert a.returncode == b.returncode == 0, b.stderr
    for x, y in zip(a.stdout.splitlines(), b.stdout.splitlines(), strict=True):
        px, py = json.loads(x)["predictions"], json.loads(y)["predictions"]
        assert [p["label"] for p in px] == [p["label"] for p in py]
        assert [p["probability"] for p in px] == pytest.approx([p["probability"] for p in py], abs=1e-5)


def test_predict_refuses_a_model_without_a_head(tmp_path: Path) -> None:
    vitlab.create_model("Ti/8", image_size=16, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                        num_classes=0).save_pretrained(tmp_path / "m")  # fmt: skip
    Image.new("RGB", (16, 16)).save(tmp_path / "x.png")
    r = run("predict", str(tmp_path / "m"), str(tmp_path / "x.png"))
    assert r.returncode == 2 and "no classification head" in r.stderr
