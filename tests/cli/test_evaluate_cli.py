"""`vitlab evaluate` on image folders: which images it scores, how it maps classes, its bad-input errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.cli.test_use_cli import run
from vitlab.commands.evaluate import class_mapping
from vitlab.datasets import load_data
from vitlab.report import plot_confusion


def _folder(root: Path, names: dict[str, str], per_class: int = 6) -> int:
    """Fashion-MNIST test images of the model's classes ``names`` (model name: folder name) under ``root``."""
    data = load_data("fashion-mnist", limit=200)
    assert data.test is not None
    written = dict.fromkeys(names, 0)
    for image, label in zip(data.test.images, data.test.labels, strict=True):
        name = data.test.class_names[int(label)]
        if name in names and written[name] < per_class:
            (root / names[name]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy(), mode="L").save(root / names[name] / f"{written[name]}.png")
            written[name] += 1
    return sum(written.values())


def _last_json(stdout: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def test_split_all_scores_every_image_of_a_class_folder_set(fitted_grey_model: Path, tmp_path: Path) -> None:
    total = _folder(tmp_path, {"Trouser": "Trouser", "Bag": "Bag", "Sandal": "Sandal"})
    r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--split", "all", "--json")
    assert r.returncode == 0, r.stderr
    assert _last_json(r.stdout)["n"] == total == 18
    carved = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--json")  # the default: test
    assert carved.returncode == 0, carved.stderr
    assert _last_json(carved.stdout)["n"] == 3  # 10% of 6 per class, rounded half up: one each
    assert "not an official test split" in carved.stderr  # said, not silently a tenth of the folder


def test_a_lone_val_folder_is_evaluated(fitted_grey_model: Path, tmp_path: Path) -> None:
    total = _folder(tmp_path / "val", {"Coat": "Coat", "Dress": "Dress"}, per_class=4)
    for split in ("val", "all"):
        r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--split", split, "--json")
        assert r.returncode == 0, r.stderr
        assert _last_json(r.stdout)["n"] == total == 8


def test_partly_matching_class_names_are_refused(fitted_grey_model: Path, tmp_path: Path) -> None:
    _folder(tmp_path, {"Trouser": "Trouser", "T-shirt/top": "Tops"})
    r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--split", "all")
    assert r.returncode == 2
    assert "'Tops'" in r.stderr and "Traceback" not in r.stderr


def test_a_class_whose_name_cannot_be_a_folder(fitted_grey_model: Path, tmp_path: Path) -> None:
    """ "T-shirt/top" cannot name a folder; "T-shirt_top" finds it, and a carved split too small says why."""
    total = _folder(tmp_path, {"Trouser": "Trouser", "T-shirt/top": "T-shirt_top"}, per_class=4)
    r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--split", "all", "--json")
    assert r.returncode == 0, r.stderr
    assert _last_json(r.stdout)["n"] == total == 8 and "T-shirt_top" in _last_json(r.stdout)["per_class"]
    r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path), "--out", str(tmp_path / "Trouser" / "0.png"))
    assert r.returncode == 2 and "is not a directory" in r.stderr and "Traceback" not in r.stderr
    r = run("evaluate", str(fitted_grey_model), "--data", str(tmp_path))  # test: 10% of 4 rounds to none
    assert r.returncode == 2 and "no image of a class with fewer than 5" in r.stderr


def test_bad_batch_size_is_named(fitted_grey_model: Path) -> None:
    for size in ("0", "-1"):
        r = run("evaluate", str(fitted_grey_model), "--data", "fashion-mnist", "--limit", "20", "--batch-size", size)
        assert r.returncode == 2 and "--batch-size must be >= 1" in r.stderr and "Traceback" not in r.stderr


def test_class_mapping_by_name_in_order_or_refused() -> None:
    assert class_mapping(["a", "b", "c"], ["c", "a"], 3) == [2, 0]
    assert class_mapping(["tench", "goldfish"], ["n01", "n02"], 2) == [0, 1]  # no name matches: in order
    assert class_mapping(None, ["x", "y"], 2) == [0, 1]
    # a folder cannot be called "T-shirt/top": names agree up to case and punctuation, where that is unambiguous
    fashion = ["T-shirt/top", "Trouser", "Pullover"]
    assert class_mapping(fashion, ["Pullover", "T-shirt_top", "trouser"], 3) == [2, 0, 1]
    with pytest.raises(ValueError, match="'AB' are not among"):
        class_mapping(["a-b", "a_b", "c"], ["c", "AB"], 3)  # two model names with that key: no guess
    with pytest.raises(ValueError, match="'Cat', 'cat' all name the same model class"):
        class_mapping(["cat", "dog"], ["Cat", "cat", "dog"], 2)  # one output scored as two classes: refused
    with pytest.raises(ValueError, match=r"'d'.*not among"):
        class_mapping(["a", "b", "c"], ["a", "d"], 3)
    with pytest.raises(ValueError, match=r"in order.*dataset has 2, the model 3"):
        class_mapping(None, ["x", "y"], 3)
    with pytest.raises(ValueError, match="none of the dataset's class names"):
        class_mapping(["a", "b", "c"], ["x", "y"], 3)


def test_confusion_figure_of_many_classes_stays_a_picture(tmp_path: Path) -> None:
    k = 300
    confusion = [[5 if i == j else 0 for j in range(k)] for i in range(k)]
    path = plot_confusion(confusion, [f"class {i}" for i in range(k)], tmp_path / "confusion.png")
    with Image.open(path) as im:
        assert max(im.size) < 2500  # 0.55 inch a class would be ~18,000 pixels a side


def test_an_imported_hf_checkpoint_on_an_imagenet_style_val_folder(tmp_path: Path) -> None:
    """ImageNet's layout (val/<wnid>/*.JPEG, sorted wnids = output order) scored with an HF directory whose
    class names are readable ones: classes map in order, and the accuracy is the share of files whose top
    prediction, from `vitlab predict` on the same files, is their folder's position."""
    import numpy as np
    import torch
    from transformers import ViTConfig as HFConfig
    from transformers import ViTForImageClassification, ViTImageProcessor

    hf = HFConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    hf.patch_size, hf.num_labels = 8, 3
    hf.id2label = {0: "tench", 1: "goldfish", 2: "great white shark"}
    hf.label2id = {v: k for k, v in hf.id2label.items()}
    torch.manual_seed(0)
    ViTForImageClassification(hf).save_pretrained(tmp_path / "hf")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "hf")
    wnids = ["n01440764", "n01443537", "n01484850"]
    rng = np.random.default_rng(0)
    for i, wnid in enumerate(wnids):
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
        for j in range(4):  # non-square JPEGs, coloured per class
            pixels = (
                rng.integers(0, 256, (40 + 3 * j, 56, 3)) // 2 + np.array([120, 60, 0])[[i, (i + 1) % 3, (i + 2) % 3]]
            )
            Image.fromarray(pixels.astype(np.uint8)).save(tmp_path / "imagenet" / "val" / wnid / f"{j}.JPEG")
    r = run("evaluate", str(tmp_path / "hf"), "--data", str(tmp_path / "imagenet"), "--split", "val", "--json")
    assert r.returncode == 0, r.stderr
    result = _last_json(r.stdout)
    assert result["n"] == 12 and set(result["per_class"]) == set(wnids)
    p = run("predict", str(tmp_path / "hf"), str(tmp_path / "imagenet" / "val"), "--json", "--top-k", "1")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    right = sum(row["predictions"][0]["index"] == wnids.index(Path(row["path"]).parent.name) for row in rows)
    assert len(rows) == 12 and result["top1"] == pytest.approx(right / 12)
