"""`vitlab predict` on the inputs that used to crash it or be silently mishandled: a corrupt EXIF block, a folder
without images, a --top-k above the class count, a --batch-size below 1, and transparent pixels."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import vitlab
from tests.cli.test_use_cli import run
from vitlab.preprocess import ImageReadError, flatten_alpha, load_for_model, open_image

# Reading this EXIF works; exif_transpose, after rotating, writes it back and packs "cam" as the integer that
# FreeOffsets must be: struct.error. (Found by fuzzing: one byte changed in the Make tag, 0x010F.)
CORRUPT_EXIF = bytes.fromhex(
    "4d4d 002a 00000008"  # big-endian TIFF header, IFD0 at offset 8
    " 0002"  # 2 entries
    " 0120 0002 00000004 63616d00"  # FreeOffsets (a LONG tag) stored as ASCII "cam"
    " 0112 0003 00000001 00060000"  # Orientation 6: turn right, so that exif_transpose rewrites the EXIF
    " 00000000"  # no next IFD
)


def rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_a_corrupt_exif_block_is_an_error_row_and_the_other_files_are_predicted(
    fitted_grey_model: Path, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good.png", tmp_path / "badexif.png"
    Image.new("L", (28, 28), 90).save(good)
    Image.new("L", (28, 28), 90).save(bad, exif=CORRUPT_EXIF)
    with Image.open(bad) as im, pytest.raises(struct.error):  # the reproduction is real: PIL itself fails
        ImageOps.exif_transpose(im)
    with pytest.raises(ImageReadError, match=r"cannot decode \(struct.error: "):
        open_image(bad)

    r = run("predict", str(fitted_grey_model), str(bad), str(good), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    first, second = rows(r.stdout)
    assert first["path"] == str(bad) and "struct.error" in first["error"] and "predictions" not in first
    assert second["path"] == str(good) and len(second["predictions"]) == 5
    assert "1 of 2 input(s) could not be read" in r.stderr


def test_a_folder_without_image_files_is_an_error_row(fitted_grey_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    good = tmp_path / "good.png"
    Image.new("L", (28, 28), 90).save(good)

    r = run("predict", str(fitted_grey_model), str(good), str(empty), "--json")
    assert r.returncode == 1, r.stderr
    first, second = rows(r.stdout)
    assert first["path"] == str(good) and first["predictions"]
    assert second["path"] == str(empty) and "no image files in folder" in second["error"] and ".png" in second["error"]

    r = run("predict", str(fitted_grey_model), str(empty), "--json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert [row["path"] for row in rows(r.stdout)] == [str(empty)] and "error" in rows(r.stdout)[0]


def test_top_k_above_the_class_count_is_refused(fitted_grey_model: Path, tmp_path: Path) -> None:
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    r = run("predict", str(fitted_grey_model), str(tmp_path / "a.png"), "--top-k", "11")
    assert r.returncode == 2 and "--top-k 11" in r.stderr and "10 classes" in r.stderr and "Traceback" not in r.stderr
    assert not r.stdout

    three = tmp_path / "three"
    vitlab.create_model("Ti/8", image_size=16, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                        num_classes=3).save_pretrained(three)  # fmt: skip
    r = run("predict", str(three), str(tmp_path / "a.png"), "--json")  # default 5: all 3 classes, silently
    assert r.returncode == 0 and len(rows(r.stdout)[0]["predictions"]) == 3, r.stderr
    r = run("predict", str(three), str(tmp_path / "a.png"), "--top-k", "4")
    assert r.returncode == 2 and "--top-k 4" in r.stderr and "3 classes" in r.stderr


@pytest.mark.parametrize("size", ["0", "-3"])
def test_batch_size_below_one_is_refused(fitted_grey_model: Path, tmp_path: Path, size: str) -> None:
    Image.new("L", (28, 28), 90).save(tmp_path / "a.png")
    r = run("predict", str(fitted_grey_model), str(tmp_path / "a.png"), "--batch-size", size)
    assert r.returncode == 2 and f"--batch-size must be >= 1, got {size}" in r.stderr and not r.stdout


def half_transparent() -> Image.Image:
    """4x4 RGBA: left half black and fully transparent, right half (10, 20, 30) opaque, bottom row half opaque."""
    a = np.zeros((4, 4, 4), dtype=np.uint8)
    a[:, 2:] = (10, 20, 30, 255)
    a[3, 2:, 3] = 128
    return Image.fromarray(a, mode="RGBA")


def test_flatten_alpha_composites_on_white() -> None:
    rgb = np.asarray(flatten_alpha(half_transparent()))
    assert flatten_alpha(half_transparent()).mode == "RGB"
    assert (rgb[:, :2] == 255).all() and (rgb[:3, 2:] == (10, 20, 30)).all()
    assert np.abs(rgb[3, 2:].astype(int) - (133, 138, 143)).max() <= 1  # half way from the colour to white

    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.asarray(half_transparent())[..., 3]], -1), "LA")
    assert flatten_alpha(la).mode == "L" and (np.asarray(flatten_alpha(la))[:, :2] == 255).all()
    assert flatten_alpha(la.convert("La")).mode == "L"
    assert (np.asarray(flatten_alpha(half_transparent().convert("RGBa"))) == rgb).all()

    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(flatten_alpha(palette)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    for mode in ("L", "RGB", "P", "CMYK", "I;16"):
        im = Image.new(mode, (2, 2))
        assert flatten_alpha(im) is im


@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_load_as_white_and_opaque_alpha_changes_nothing(tmp_path: Path, channels: int) -> None:
    pre = vitlab.Preprocessing(image_size=(4, 4), mean=(0.5,) * channels, std=(0.5,) * channels)
    half_transparent().save(tmp_path / "rgba.png")
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.asarray(half_transparent())[..., 3]], -1), "LA")
    la.save(tmp_path / "la.png")
    for name in ("rgba.png", "la.png"):
        x = load_for_model(tmp_path / name, pre, channels)
        assert x.shape == (channels, 4, 4) and (x[:, :, :2] == 255).all(), name

    picture = np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    Image.fromarray(picture, mode="RGB").save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([picture, np.full((4, 4), 255, np.uint8)]), mode="RGBA").save(tmp_path / "opaque.png")
    a, b = (load_for_model(tmp_path / n, pre, channels) for n in ("rgb.png", "opaque.png"))
    assert torch.equal(a, b)


def test_predict_sees_a_transparent_image_as_its_white_composite(fitted_grey_model: Path, tmp_path: Path) -> None:
    half_transparent().resize((28, 28), Image.Resampling.NEAREST).save(tmp_path / "alpha.png")
    flatten_alpha(half_transparent()).resize((28, 28), Image.Resampling.NEAREST).save(tmp_path / "white.png")
    r = run("predict", str(fitted_grey_model), str(tmp_path / "alpha.png"), str(tmp_path / "white.png"), "--json")
    assert r.returncode == 0, r.stderr
    alpha, white = (row["predictions"] for row in rows(r.stdout))
    assert [p["index"] for p in alpha] == [p["index"] for p in white]
    assert [p["probability"] for p in alpha] == pytest.approx([p["probability"] for p in white], abs=1e-6)


def test_a_bare_weights_file_says_which_preprocessing_it_assumed(fitted_grey_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = vitlab.from_pretrained(fitted_grey_model)
    bare = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(bare))
    Image.new("L", (28, 28), 90).save(tmp_path / "x.png")
    heads = str(model.config.num_heads)
    r = run("predict", str(bare), str(tmp_path / "x.png"), "--num-heads", heads, "--top-k", "1")
    assert r.returncode == 0, r.stderr
    assert "bare.safetensors is a weights file that records no preprocessing or class names" in r.stderr
    assert "mean [0.5], std [0.5]" in r.stderr  # what is then used, not the run's own statistics
    r = run("predict", str(fitted_grey_model), str(tmp_path / "x.png"), "--top-k", "1")
    assert r.returncode == 0 and "records no preprocessing" not in r.stderr
