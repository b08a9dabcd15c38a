"""vitlab.datasets: named datasets found on disk, folders of class folders, splits, batches. Nothing downloads."""

from __future__ import annotations

import gzip
import itertools
import pickle
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import vitlab.datasets as ds
from vitlab.datasets import (
    DATASETS,
    DataError,
    DataSplits,
    ImageTensors,
    batches,
    find_dataset_files,
    load_data,
    normalize_stats,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Nothing from the user's own data or cache folders, and no download even if a test gets that far."""
    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("VITLAB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fashion() -> DataSplits:
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("VITLAB_DATA", raising=False)
        mp.setenv("VITLAB_CACHE", "/nonexistent/vitlab-cache")
        mp.setenv("VITLAB_OFFLINE", "1")
        return load_data("fashion-mnist")


def _rows(images: torch.Tensor) -> Counter[bytes]:
    return Counter(row.tobytes() for row in images.reshape(images.shape[0], -1).numpy())


# ----------------------------------------------------------------------------------------------------------
# Real Fashion-MNIST from Debian's package


@needs_fashion
def test_fashion_mnist_shapes_and_splits(fashion: DataSplits) -> None:
    assert fashion.name == "fashion-mnist"
    assert fashion.test is not None
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54000, 6000, 10000)
    assert fashion.train.images.shape == (54000, 1, 28, 28)
    assert fashion.train.images.dtype == torch.uint8 and fashion.train.labels.dtype == torch.int64
    assert fashion.test.images.shape == (10000, 1, 28, 28)
    assert fashion.train.class_names[0] == "T-shirt/top" and fashion.train.class_names[9] == "Ankle boot"
    assert fashion.val.class_names == fashion.train.class_names == fashion.test.class_names
    # stratified: 6000 per class in the training file, so exactly 600 of each go to val
    assert fashion.val.labels.bincount(minlength=10).tolist() == [600] * 10
    assert fashion.train.labels.bincount(minlength=10).tolist() == [5400] * 10
    assert fashion.test.labels.bincount(minlength=10).tolist() == [1000] * 10
    assert fashion.skipped == []


@needs_fashion
def test_fashion_mnist_val_is_a_partition_of_train(fashion: DataSplits) -> None:
    full = load_data("fashion-mnist", val_fraction=0.0)
    assert len(full.train) == 60000 and len(full.val) == 0 and full.val.images.shape == (0, 1, 28, 28)
    assert _rows(fashion.train.images) + _rows(fashion.val.images) == _rows(full.train.images)


@needs_fashion
def test_fashion_mnist_split_is_deterministic_by_seed(fashion: DataSplits) -> None:
    again = load_data("fashion-mnist", limit=2000, seed=0)
    same = load_data("fashion-mnist", limit=2000, seed=0)
    other = load_data("fashion-mnist", limit=2000, seed=1)
    assert torch.equal(again.val.images, same.val.images) and torch.equal(again.train.labels, same.train.labels)
    assert not torch.equal(again.val.images, other.val.images)
    assert again.test is not None and other.test is not None
    assert torch.equal(again.test.images, other.test.images)  # the test subset never depends on the seed


@needs_fashion
def test_fashion_mnist_limit_channels_and_size(fashion: DataSplits) -> None:
    small = load_data("fashion-mnist", limit=1000, channels=3, image_size=(32, 24))
    assert small.test is not None
    assert (len(small.train), len(small.val), len(small.test)) == (900, 100, 1000)
    assert small.train.labels.bincount(minlength=10).tolist() == [90] * 10
    assert small.val.labels.bincount(minlength=10).tolist() == [10] * 10
    assert small.train.images.shape == (900, 3, 32, 24) and small.train.images.dtype == torch.uint8
    assert torch.equal(small.train.images[:, 0], small.train.images[:, 2])  # grey replicated
    native = load_data("fashion-mnist", limit=1000)
    assert native.train.images.shape == (900, 1, 28, 28)
    square = load_data("fashion-mnist", limit=1000, image_size=32)
    # resizing is a smooth bicubic: the mean brightness barely moves
    assert abs(native.train.images.float().mean() - square.train.images.float().mean()) < 2.0
    # another aspect ratio: resized to cover it, aspect kept, then centre-cropped (as folders and predict do)
    assert torch.equal(small.train.images[:, :1], square.train.images[..., 4:28])


@needs_fashion
def test_named_dataset_converts_only_the_splits_asked_for() -> None:
    full = load_data("fashion-mnist", limit=200, image_size=32)
    only = load_data("fashion-mnist", limit=200, image_size=32, splits=("test",))
    assert only.test is not None and full.test is not None
    assert torch.equal(only.test.images, full.test.images) and torch.equal(only.test.labels, full.test.labels)
    assert only.train.images.shape == (0, 1, 32, 32) and only.val.images.shape == (0, 1, 32, 32)
    with pytest.raises(DataError, match="splits must be"):
        load_data("fashion-mnist", splits=("dev",))


@needs_fashion
def test_named_dataset_with_a_checkpoints_preprocessing_matches_predict() -> None:
    from vitlab.config import Preprocessing
    from vitlab.preprocess import resize_crop

    raw = load_data("fashion-mnist", limit=20, splits=("test",)).test
    pre = Preprocessing(image_size=56, mean=(0.5,), std=(0.5,), interpolation="bilinear", crop_pct=0.875)
    resized = load_data("fashion-mnist", limit=20, splits=("test",), image_size=56, preprocessing=pre).test
    assert raw is not None and resized is not None and resized.images.shape == (20, 1, 56, 56)
    files = torch.stack(
        [torch.from_numpy(np.array(resize_crop(Image.fromarray(im[0].numpy()), pre))) for im in raw.images]
    )
    assert (
        resized.images[:, 0].float() - files.float()
    ).abs().mean() < 1.5  # PIL's and torch's kernels differ a little
    uncropped = load_data("fashion-mnist", limit=20, splits=("test",), image_size=56).test
    assert uncropped is not None and (uncropped.images[:, 0].float() - files.float()).abs().mean() > 5
    for native in (  # the data's own size, still cropped; PIL's nearest-pixel rule
        Preprocessing(image_size=28, mean=(0.5,), std=(0.5,), crop_pct=0.875),
        Preprocessing(image_size=28, mean=(0.5,), std=(0.5,), crop_pct=0.7, interpolation="nearest"),
    ):
        same = load_data("fashion-mnist", limit=20, splits="test", image_size=28, preprocessing=native).test
        files = torch.stack(
            [torch.from_numpy(np.array(resize_crop(Image.fromarray(im[0].numpy()), native))) for im in raw.images]
        )
        assert same is not None and (same.images[:, 0].float() - files.float()).abs().mean() < 1.5


@needs_fashion
def test_find_dataset_files_falls_back_to_debian() -> None:
    assert find_dataset_files("fashion-mnist") == DEBIAN_FASHION


@needs_fashion
def test_normalize_stats_on_fashion_mnist(fashion: DataSplits) -> None:
    mean, std = normalize_stats(fashion.train)
    assert len(mean) == len(std) == 1
    assert mean[0] == pytest.approx(0.286, abs=0.003) and std[0] == pytest.approx(0.353, abs=0.003)


# ----------------------------------------------------------------------------------------------------------
# IDX files found through $VITLAB_DATA, the cache, or Debian's folder


def _idx_bytes(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()


def _write_idx_dataset(folder: Path, *, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8)[::-1] % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in arrays.items():
        if gz:
            (folder / (stem + ".gz")).write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (folder / stem).write_bytes(_idx_bytes(array))
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_vitlab_data_idx_files_take_precedence(gz: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path))
    arrays = _write_idx_dataset(tmp_path / "fashion-mnist", gz=gz)
    assert find_dataset_files("fashion-mnist") == tmp_path / "fashion-mnist"
    splits = load_data("fashion-mnist", val_fraction=0.0)
    assert splits.test is not None
    assert splits.train.images.shape == (20, 1, 5, 4)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert splits.train.labels.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert splits.test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()


def test_cache_lookup_in_torchvision_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(ds, "DEBIAN_DATASETS", tmp_path / "debian")
    _write_idx_dataset(tmp_path / "data" / "mnist" / "MNIST" / "raw", gz=False)
    assert find_dataset_files("mnist") == tmp_path / "data" / "mnist" / "MNIST" / "raw"
    splits = load_data("mnist", val_fraction=0.5, limit=10)  # one image per class, and half of 1 rounds up
    assert splits.train.class_names == [str(d) for d in range(10)]
    assert (len(splits.train), len(splits.val)) == (0, 10)
    splits = load_data("mnist", val_fraction=0.5, limit=20)
    assert (len(splits.train), len(splits.val)) == (10, 10)
    assert splits.test is not None and len(splits.test) == 10


def test_malformed_idx_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path))
    _write_idx_dataset(tmp_path / "mnist", gz=False)
    (tmp_path / "mnist" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 7)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_data("mnist")


def _write_cifar10(folder: Path) -> dict[str, np.ndarray]:
    """Tiny pickles in the layout of the official ``cifar-10-batches-py`` (rows of 3072 bytes, channel-major)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (4, 3 * 32 * 32), dtype=np.uint8)
        written[name] = rows
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [0, 1, 2, 1]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"]}, f)
    return written


def test_cifar_batches_read_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar

    # the pickles are ours, so torchvision's checksums of the official files cannot match them
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setenv("VITLAB_DATA", str(tmp_path))
    written = _write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    assert find_dataset_files("cifar10") == tmp_path / "cifar10" / "cifar-10-batches-py"
    splits = load_data("cifar10", val_fraction=0.0, channels=1)
    assert splits.test is not None
    assert splits.train.class_names == ["airplane", "automobile", "bird"]
    assert splits.train.images.shape == (20, 1, 32, 32) and splits.test.images.shape == (4, 1, 32, 32)
    rgb = load_data("cifar10", val_fraction=0.0)
    assert rgb.test is not None
    assert torch.equal(rgb.test.images, torch.from_numpy(written["test_batch"]).view(4, 3, 32, 32))
    assert rgb.train.labels.tolist() == [0, 1, 2, 1] * 5
    luma = (rgb.test.images.double() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1).round()
    torch.testing.assert_close(splits.test.images[:, 0].double(), luma, atol=1, rtol=0)  # float32 rounding


def _point_everything_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path, Path]:
    data, cache, debian = tmp_path / "data", tmp_path / "cache", tmp_path / "debian"
    monkeypatch.setenv("VITLAB_DATA", str(data))
    monkeypatch.setenv("VITLAB_CACHE", str(cache))
    monkeypatch.setattr(ds, "DEBIAN_DATASETS", debian)
    return data, cache, debian


def test_offline_error_names_every_place_and_how_to_get_the_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, cache, debian = _point_everything_at(tmp_path, monkeypatch)

    def no_download(name: str) -> None:
        raise AssertionError("VITLAB_OFFLINE=1 must not try to download")

    monkeypatch.setattr(ds, "_download", no_download)
    with pytest.raises(DataError) as err:
        load_data("fashion-mnist")
    message = str(err.value)
    for place in (data / "fashion-mnist", cache / "data" / "fashion-mnist", debian / "fashion-mnist"):
        assert str(place) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "VITLAB_OFFLINE=1" in message
    with pytest.raises(DataError, match="download=False"):
        load_data("cifar10", download=False)


def test_failed_download_becomes_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, cache, _ = _point_everything_at(tmp_path, monkeypatch)
    monkeypatch.delenv("VITLAB_OFFLINE")
    calls: list[str] = []

    def failing(name: str) -> None:
        calls.append(name)
        raise OSError("network is unreachable")

    monkeypatch.setattr(ds, "_download", failing)
    with pytest.raises(DataError, match="network is unreachable") as err:
        load_data("cifar100")
    assert calls == ["cifar100"]
    assert str(cache / "data" / "cifar100") in str(err.value)


def test_unknown_names_and_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fashion-mnist, mnist, cifar10, cifar100"):
        find_dataset_files("imagenet")
    with pytest.raises(DataError, match="fashion-mnist, mnist, cifar10, cifar100"):
        load_data(str(tmp_path / "nowhere"))
    a_file = tmp_path / "images.zip"
    a_file.write_bytes(b"PK")
    with pytest.raises(DataError, match="is a file"):
        load_data(str(a_file))
    with pytest.raises(DataError, match="val_fraction"):
        load_data("mnist", val_fraction=1.0)
    with pytest.raises(DataError, match="channels"):
        load_data("mnist", channels=2)
    with pytest.raises(DataError, match="image_size"):
        load_data("mnist", image_size=(0, 4))
    assert set(DATASETS) == {"fashion-mnist", "mnist", "cifar10", "cifar100"}


# ----------------------------------------------------------------------------------------------------------
# Folders of class folders


def _pattern(h: int = 6, w: int = 8, seed: int = 0) -> np.ndarray:
    """A grey (h, w) uint8 image with a handful of levels, so that palette modes hold it exactly."""
    levels = np.array([0, 40, 90, 160, 220, 255], dtype=np.uint8)
    return levels[np.random.default_rng(seed).integers(0, len(levels), (h, w))]


def _save(path: Path, array: np.ndarray, **kwargs: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _make_classes(root: Path, counts: dict[str, int], *, rgb: bool = False, h: int = 6, w: int = 8) -> None:
    for c, n in counts.items():
        for i in range(n):
            a = _pattern(h, w, seed=zlib.crc32(f"{c}/{i}".encode()))
            _save(root / c / f"{i}.png", np.stack([a, a // 2, 255 - a], -1) if rgb else a)


def test_train_val_layout(tmp_path: Path) -> None:
    _make_classes(tmp_path / "train", {"cat": 4, "dog": 5, "bird": 3}, rgb=True)
    _make_classes(tmp_path / "val", {"cat": 2, "dog": 1})  # no bird in val: fine
    splits = load_data(str(tmp_path))
    assert splits.name == str(tmp_path)
    assert splits.train.class_names == ["bird", "cat", "dog"] == splits.val.class_names
    assert splits.test is None
    assert splits.train.images.shape == (12, 3, 6, 8)  # one colour image makes every split RGB
    assert splits.val.images.shape == (3, 3, 6, 8)
    assert splits.train.labels.bincount().tolist() == [3, 4, 5]
    assert splits.val.labels.tolist() == [1, 1, 2]
    assert torch.equal(splits.val.images[0, 0], splits.val.images[0, 2])  # grey val images replicated
    assert splits.skipped == []


def test_train_test_layout_carves_val_from_train(tmp_path: Path) -> None:
    _make_classes(tmp_path / "train", {"a": 10, "b": 10})
    _make_classes(tmp_path / "test", {"a": 3, "b": 2})
    splits = load_data(str(tmp_path), val_fraction=0.2)
    assert splits.test is not None
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 5)
    assert splits.train.images.shape[1] == 1  # all grey
    assert any("carved from the training data" in note for note in splits.notes)


def test_class_in_val_but_not_in_train_is_an_error(tmp_path: Path) -> None:
    _make_classes(tmp_path / "train", {"a": 2, "b": 2})
    _make_classes(tmp_path / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"'c'|/c'"):
        load_data(str(tmp_path))


def test_class_folders_only_carves_val_and_test(tmp_path: Path) -> None:
    _make_classes(tmp_path, {"x": 10, "y": 20, "z": 10})
    splits = load_data(str(tmp_path), val_fraction=0.2, seed=3)
    assert splits.test is not None
    assert splits.test.labels.bincount().tolist() == [2, 4, 2]
    assert splits.val.labels.bincount().tolist() == [2, 3, 2]  # 20% of what is left after the test split
    assert len(splits.train) + len(splits.val) + len(splits.test) == 40
    everything = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    assert len(_rows(everything)) == 40  # distinct images: nothing counted twice
    assert any("not an official test split" in note for note in splits.notes)
    other_seed = load_data(str(tmp_path), val_fraction=0.2, seed=4)
    assert other_seed.test is not None and torch.equal(other_seed.test.images, splits.test.images)


def test_one_split_decodes_only_its_files_and_carves_as_a_full_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _make_classes(tmp_path, {"x": 10, "y": 20, "z": 10})
    full = load_data(str(tmp_path), val_fraction=0.2, seed=3)
    decoded: list[Path] = []
    real_decode = ds._decode

    def recording(path: Path, *args: Any) -> Any:
        decoded.append(path)
        return real_decode(path, *args)

    monkeypatch.setattr(ds, "_decode", recording)
    for wanted in ("val", "test"):
        decoded.clear()
        only = load_data(str(tmp_path), val_fraction=0.2, seed=3, splits=(wanted,))
        part, want = getattr(only, wanted), getattr(full, wanted)
        assert torch.equal(part.images, want.images) and torch.equal(part.labels, want.labels)
        assert len(decoded) == len(want)  # nothing else was read
        assert len(only.train) == 0 and only.train.images.shape[1:] == want.images.shape[1:]


def test_a_class_unreadable_in_train_is_refused_even_if_val_has_it(tmp_path: Path) -> None:
    _make_classes(tmp_path / "train", {"a": 3})
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "broken.png").write_bytes(b"not a png")
    _make_classes(tmp_path / "val", {"a": 1, "b": 2})
    with pytest.raises(DataError, match=r"'b'.*no readable images"):
        load_data(str(tmp_path))
    assert load_data(str(tmp_path), splits="val").val.labels.tolist() == [0, 1, 1]  # scoring val alone is fine


def test_a_lone_split_folder_can_be_loaded_but_not_trained_on(tmp_path: Path) -> None:
    _make_classes(tmp_path / "val", {"n01": 2, "n02": 3})  # ImageNet's layout for evaluation: val/ alone
    _make_classes(tmp_path / "test", {"n01": 1, "other": 1})  # not asked for: not even listed
    only = load_data(str(tmp_path), splits=("val",))
    assert only.val.class_names == ["n01", "n02"] and only.val.labels.tolist() == [0, 0, 1, 1, 1]
    assert only.val.images.shape == (5, 1, 6, 8)
    with pytest.raises(DataError, match="no train/ folder"):
        load_data(str(tmp_path))
    test = load_data(str(tmp_path), splits=("test",)).test  # its own classes, when asked for alone
    assert test is not None and test.class_names == ["n01", "other"]
    with pytest.raises(DataError, match="no train/ folder"):
        load_data(str(tmp_path), splits=("train",))


def test_mixed_pil_modes_give_the_same_pixels(tmp_path: Path) -> None:
    grey = _pattern()
    rgb = Image.fromarray(np.stack([grey] * 3, -1))
    images = {
        "L.png": Image.fromarray(grey),
        "RGB.png": rgb,
        "RGBA.png": rgb.convert("RGBA"),
        "P.png": rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
        "CMYK.tiff": rgb.convert("CMYK"),
        "I16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "LA.png": Image.fromarray(grey).convert("LA"),
    }
    assert images["I16.png"].mode.startswith("I;16")
    for name, im in images.items():
        (tmp_path / "a").mkdir(exist_ok=True)
        im.save(tmp_path / "a" / name)
    _save(tmp_path / "b" / "other.png", _pattern(seed=5))

    splits = load_data(str(tmp_path), val_fraction=0.0)
    assert splits.skipped == []
    assert len(splits.train) == len(images) + 1
    assert splits.train.images.shape[1:] == (3, 6, 8)  # colour modes present, so 3 channels by default
    expected = torch.from_numpy(grey).expand(3, -1, -1)
    for i in range(len(images)):
        torch.testing.assert_close(splits.train.images[i], expected, atol=1, rtol=0)

    grey_only = load_data(str(tmp_path), val_fraction=0.0, channels=1)
    assert grey_only.train.images.shape[1:] == (1, 6, 8)
    for i in range(len(images)):
        torch.testing.assert_close(grey_only.train.images[i, 0], torch.from_numpy(grey), atol=1, rtol=0)


def test_transparency_is_white_in_training_as_in_prediction(tmp_path: Path) -> None:
    from vitlab.config import Preprocessing
    from vitlab.preprocess import load_for_model

    rgba = np.zeros((6, 8, 4), dtype=np.uint8)  # black, fully transparent on the left half, opaque on the right
    rgba[:, 4:, 3] = 255
    path = _save(tmp_path / "a" / "icon.png", rgba)
    _save(tmp_path / "b" / "other.png", np.zeros((6, 8, 3), dtype=np.uint8))
    loaded = load_data(str(tmp_path), val_fraction=0.0).train.images[0]  # class "a" first
    assert loaded[:, :, :4].eq(255).all() and loaded[:, :, 4:].eq(0).all()  # white, not red (255, 0, 0)
    predicted = load_for_model(path, Preprocessing(image_size=(6, 8)), channels=3)
    assert torch.equal(loaded, predicted)


def test_all_grey_folder_defaults_to_one_channel_and_resizes(tmp_path: Path) -> None:
    _make_classes(tmp_path, {"a": 3, "b": 3}, h=10, w=10)
    splits = load_data(str(tmp_path), val_fraction=0.0, image_size=5)
    assert splits.train.images.shape == (6, 1, 5, 5)
    assert splits.test is not None and len(splits.test) == 0
    assert splits.train.images.dtype == torch.uint8


def test_exif_orientation_is_respected(tmp_path: Path) -> None:
    stored = np.zeros((8, 16, 3), dtype=np.uint8)  # (H, W): left half black, right half white
    stored[:, 8:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    (tmp_path / "a").mkdir()
    Image.fromarray(stored).save(tmp_path / "a" / "rotated.jpg", quality=100, exif=exif)
    _save(tmp_path / "b" / "upright.png", np.zeros((16, 8, 3), dtype=np.uint8))
    splits = load_data(str(tmp_path), val_fraction=0.0)  # same size only once the JPEG is turned upright
    shown = splits.train.images[0].float().mean(0)  # class "a" comes first; (16, 8)
    assert shown.shape == (16, 8)
    assert shown[:6].mean() < 20 and shown[10:].mean() > 235  # left went to the top


def test_unreadable_files_are_skipped_and_reported(tmp_path: Path) -> None:
    _make_classes(tmp_path, {"a": 3, "b": 3})
    good = _save(tmp_path / "a" / "whole.jpg", np.stack([_pattern()] * 3, -1))
    truncated = tmp_path / "b" / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fake = tmp_path / "b" / "notes.png"
    fake.write_text("this is not an image\n")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\x00\x01")  # hidden: ignored, not reported

    splits = load_data(str(tmp_path), val_fraction=0.0)
    assert sorted(path for path, _ in splits.skipped) == sorted([str(fake), str(truncated)])
    assert all(reason for _, reason in splits.skipped)
    assert len(splits.train) + len(splits.test or []) == 7


def test_class_with_no_readable_images_is_an_error(tmp_path: Path) -> None:
    _make_classes(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match=r"'b'.*no readable images"):
        load_data(str(tmp_path))


def test_empty_and_single_class_folders_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders"):
        load_data(str(empty))
    one = tmp_path / "one"
    _make_classes(one, {"only": 3})
    with pytest.raises(DataError, match=r"single class.*at least 2"):
        load_data(str(one))
    no_files = tmp_path / "no_files"
    (no_files / "a").mkdir(parents=True)
    (no_files / "b").mkdir()
    with pytest.raises(DataError, match="hold no files"):
        load_data(str(no_files))
    train_only = tmp_path / "train_only"
    _make_classes(train_only / "train", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="neither val/ nor test/"):
        load_data(str(train_only))


def test_mismatched_sizes_need_image_size(tmp_path: Path) -> None:
    _make_classes(tmp_path, {"a": 2}, h=6, w=8)
    _make_classes(tmp_path, {"b": 2}, h=7, w=7)
    with pytest.raises(DataError, match="image_size"):
        load_data(str(tmp_path))
    splits = load_data(str(tmp_path), image_size=(4, 6), val_fraction=0.0)
    assert splits.train.images.shape == (4, 1, 4, 6)


# ----------------------------------------------------------------------------------------------------------
# Batches and statistics


def _counting(n: int) -> ImageTensors:
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageTensors(images, torch.arange(n), ["even", "odd"])


def _labels(it: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> list[list[int]]:
    return [labels.tolist() for _, labels in it]


def test_batches_cover_every_image_once_per_epoch() -> None:
    data = _counting(23)
    g = torch.Generator().manual_seed(0)
    epochs = [_labels(batches(data, 5, shuffle=True, generator=g)) for _ in range(2)]
    for epoch in epochs:
        assert [len(b) for b in epoch] == [5, 5, 5, 5, 3]
        assert sorted(itertools.chain.from_iterable(epoch)) == list(range(23))
    assert epochs[0] != epochs[1]
    assert _labels(batches(data, 5, shuffle=False)) == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]
    dropped = _labels(batches(data, 5, shuffle=True, generator=g, drop_last=True))
    assert [len(b) for b in dropped] == [5, 5, 5, 5]
    images, labels = next(batches(data, 4, shuffle=True, generator=g))
    assert images.dtype == torch.uint8 and images.shape == (4, 1, 2, 2)
    assert torch.equal(images[:, 0, 0, 0].long(), labels)  # images and labels stay paired
    with pytest.raises(DataError, match="batch_size"):
        next(batches(data, 0, shuffle=False))


def test_batches_start_resumes_the_same_epoch() -> None:
    data = _counting(30)
    g = torch.Generator().manual_seed(7)
    state = g.get_state()
    full = _labels(batches(data, 4, shuffle=True, generator=g))
    g.set_state(state)
    resumed = _labels(batches(data, 4, shuffle=True, generator=g, start=3))
    assert resumed == full[3:]
    assert _labels(batches(data, 4, shuffle=False, start=7)) == [[28, 29]]
    assert _labels(batches(data, 4, shuffle=False, start=8)) == []


def test_subset_and_normalize_stats() -> None:
    images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
    images[:, 0] = 255
    images[:2, 1] = 255
    data = ImageTensors(images, torch.tensor([0, 1, 0, 1]), ["a", "b"])
    mean, std = normalize_stats(data)
    assert mean == pytest.approx((1.0, 0.5, 0.0)) and std == pytest.approx((0.0, 0.5, 0.0))
    part = data.subset(torch.tensor([3, 0]))
    assert len(part) == 2 and part.labels.tolist() == [1, 0] and part.class_names == ["a", "b"]
    with pytest.raises(DataError, match="empty"):
        normalize_stats(data.subset(torch.tensor([], dtype=torch.long)))


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_with_a_checkpoints_preprocessing_matches_predict(tmp_path: Path, channels: int) -> None:
    from vitlab.config import Preprocessing
    from vitlab.preprocess import load_for_model

    rng = np.random.default_rng(0)
    files = []
    for name in ("a", "b"):
        for split in ("train", "test"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            # non-square in both orientations; RGB, RGBA (half transparent) and grey files
            for i, (h, w, mode) in enumerate([(40, 60, "RGB"), (64, 30, "RGBA"), (50, 35, "L")]):
                depth = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
                pixels = rng.integers(0, 256, (h, w, depth), dtype=np.uint8)
                path = folder / f"{i}.png"
                Image.fromarray(pixels.squeeze(-1) if depth == 1 else pixels, mode=mode).save(path)
                files.append((split, path))
    pre = Preprocessing(image_size=(16, 16), crop_pct=0.875, interpolation="bilinear")
    data = load_data(str(tmp_path), val_fraction=0.0, channels=channels, preprocessing=pre)
    assert data.test is not None and data.test.images.shape == (6, channels, 16, 16)
    expected = torch.stack([load_for_model(p, pre, channels) for split, p in sorted(files) if split == "test"])
    torch.testing.assert_close(data.test.images, expected, rtol=0, atol=0)


def test_folder_images_of_another_size_are_resized_to_cover_and_centre_cropped(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        wide = np.zeros((20, 40), dtype=np.uint8)
        wide[:, 10:30] = 200  # the centre square is bright, the sides dark
        Image.fromarray(wide, mode="L").save(tmp_path / name / "wide.png")
    data = load_data(str(tmp_path), val_fraction=0.0, image_size=10)
    # a squash would keep the dark sides in view; the centre crop of the cover-resize sees only the bright square
    assert data.train.images.shape[1:] == (1, 10, 10)
    assert int(data.train.images.min()) >= 150  # bicubic rings a little at the crop edge (187)


def test_batches_shard_an_epoch_across_processes() -> None:
    data = _counting(23)
    shards = []
    for rank in range(3):
        g = torch.Generator().manual_seed(5)  # every process draws the same permutation
        shards.append(_labels(batches(data, 2, shuffle=True, generator=g, drop_last=True, rank=rank, world_size=3)))
    seen = [set(itertools.chain.from_iterable(s)) for s in shards]
    assert [len(s) for s in shards] == [3, 3, 3]  # 23 // 3 = 7 images each, 3 full batches of 2
    assert all(len(s) == 6 for s in seen)
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    single = _labels(batches(data, 2, shuffle=True, generator=torch.Generator().manual_seed(5), rank=0, world_size=1))
    assert sorted(itertools.chain.from_iterable(single)) == list(range(23))
    bad: list[tuple[Any, Any]] = [(3, 3), (-1, 2), (0.0, 2), (0, "2"), (True, 2)]
    for rank, world_size in bad:
        with pytest.raises(DataError, match=r"rank|world_size"):
            next(batches(data, 2, shuffle=False, rank=rank, world_size=world_size))
    # numpy integers (from an index array, a config read with numpy) are ints; numpy bools and floats are not
    numpy_ints: dict[str, Any] = {"batch_size": np.int64(2), "rank": np.int32(1), "world_size": np.int64(3)}
    shard = _labels(batches(data, shuffle=False, **numpy_ints))
    assert shard == _labels(batches(data, 2, shuffle=False, rank=1, world_size=3))
    numpy_start: dict[str, Any] = {"start": np.int64(3)}
    assert _labels(batches(data, 2, shuffle=False, **numpy_start)) == _labels(batches(data, 2, shuffle=False))[3:]
    for kwargs in ({"batch_size": np.float32(2)}, {"batch_size": np.bool_(True)}, {"start": 1.0}):
        with pytest.raises(DataError, match="must be an int"):
            next(batches(data, **{"batch_size": 2, **kwargs}, shuffle=False))  # type: ignore[arg-type]
