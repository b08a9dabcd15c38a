"""Image classification data held in memory as uint8 tensors, for training and evaluating a ViT.

The paper (arXiv:2010.11929, Section 4.1 and Appendix B.1) holds out a small part of each training set for
model selection ("minival") and reports final numbers on the official test split. :func:`load_data` does the
same: the validation split is a seeded, per-class random fraction of the training data, and the test split is
the dataset's own, to be looked at only for final numbers.

Two kinds of data:

* a named dataset (:data:`DATASETS`), looked up on disk (see :func:`find_dataset_files`) and downloaded with
  torchvision only when it is nowhere to be found and downloading is allowed. MNIST-style IDX files are parsed
  here with numpy; CIFAR's pickled batches are read by torchvision's own classes.
* a folder of class folders, either ``train/`` + ``val/`` and/or ``test/`` each holding class folders, or the
  class folders alone. Images of any PIL mode are decoded on a few threads, turned upright by their EXIF
  orientation, converted to 1 or 3 channels and resized with bicubic interpolation. Files that cannot be
  decoded are skipped and listed in :attr:`DataSplits.skipped`, never a crash half way through.

Everything stays in memory; :func:`batches` slices a permutation of it, which for datasets of this size is far
faster than a ``DataLoader`` with workers on a two-core machine.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from vitlab.config import Preprocessing
from vitlab.preprocess import crop_offsets, flatten_alpha, resize_crop, resized_size, to_mode

DATASETS: tuple[str, ...] = ("fashion-mnist", "mnist", "cifar10", "cifar100")
SPLITS: tuple[str, ...] = ("train", "val", "test")

DEBIAN_DATASETS = Path("/usr/share/datasets")  # Debian's dataset-* packages install here

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_IDX_FILES = {  # split: (images, labels), as published by LeCun et al. and Zalando
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_CLASS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}
_CIFAR_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_DEBIAN_PACKAGE = {"fashion-mnist": "dataset-fashion-mnist"}

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_DECODE_THREADS = 4
_CARVED_TEST_SEED = 1_000_003
_RESIZE_CHUNK = 2048  # images per torch.interpolate call, to bound the float32 copy


class DataError(ValueError):
    """Data could not be found or read; the message names the bad value or path and what would be accepted."""


@dataclass(frozen=True)
class ImageTensors:
    """Images and labels in memory. ``images``: uint8 (N, C, H, W); ``labels``: int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: torch.Tensor) -> ImageTensors:
        """The images at ``indices`` (a 1-D integer tensor), in that order."""
        indices = indices.to(torch.long)
        return ImageTensors(self.images[indices], self.labels[indices], list(self.class_names))


@dataclass(frozen=True)
class DataSplits:
    """Train, validation (for model selection) and test (for final numbers only) splits of one dataset."""

    train: ImageTensors
    val: ImageTensors
    test: ImageTensors | None
    name: str
    skipped: list[tuple[str, str]]  # (path, reason) of image files that could not be read
    notes: list[str] = field(default_factory=list)  # where each split came from, when it was carved


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def load_data(
    spec: str,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    channels: int | None = None,
    download: bool = True,
    limit: int | None = None,
    preprocessing: Preprocessing | None = None,
    splits: Collection[str] = SPLITS,
) -> DataSplits:
    """Load a named dataset (one of :data:`DATASETS`) or a folder of class folders into memory.

    ``val_fraction`` of the training data, drawn per class with ``seed``, becomes the validation split (0 gives
    an empty one). ``image_size`` (an int or (height, width)) and ``channels`` (1 or 3) default to the data's
    own. ``limit`` keeps the first ``limit`` training images of a seeded per-class interleaving (the validation
    part is then carved from those) and as many test images, for quick runs. ``download`` allows torchvision to
    fetch a named dataset that is not on disk, unless the environment sets ``VITLAB_OFFLINE=1``.

    A ``spec`` that is not a dataset name is a folder (write ``./mnist`` for a folder of that name): either
    ``train/`` with ``val/`` and/or ``test/`` beside it, each holding one folder of images per class, or the class
    folders alone, from which a test split of ``val_fraction`` per class (drawn with a fixed seed, so that runs of
    different seeds share it) is held out before the validation split; :attr:`DataSplits.notes` says so. Classes
    are the sorted folder names of ``train/``. Folder images default to 1 channel if every file is greyscale by its
    PIL mode, else 3, and to the images' common size (differing sizes need ``image_size``).

    ``preprocessing`` (a checkpoint's :class:`~vitlab.config.Preprocessing`) makes images go through what
    ``vitlab predict`` does to a file: mode conversion, resize as its ``crop_mode`` and ``crop_pct`` say with its
    interpolation, centre crop to its ``image_size`` (for a named dataset, the same on tensors, within a level
    or two of PIL's kernels). Without it, images of another size than ``image_size`` are resized
    (bicubic) to cover it and centre-cropped: the same with ``crop_pct`` 1.

    ``splits`` names the splits to decode and convert (default all three); the others come back without images
    but carved exactly as in a full load, so evaluating one split of a large folder or at a checkpoint's
    resolution touches only that split's files. Without ``"train"``, a folder may hold just the splits asked
    for (e.g. an ImageNet-style ``val/``), their classes then being its class folders. Channels and size,
    when inferred, come from the decoded splits only.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DataError(f"limit must be a positive int or None, got {limit!r}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1, 3 or None (keep the data's own), got {channels!r}")
    size = _size_pair(image_size)
    wanted = frozenset((splits,) if isinstance(splits, str) else splits)
    if not wanted or not wanted <= set(SPLITS):
        raise DataError(f"splits must be a non-empty selection of {', '.join(SPLITS)}, got {sorted(wanted)}")

    if spec in DATASETS:
        train, test = _load_named(spec, download=download)
        carved = _finish(spec, train, test, [], [], val_fraction=val_fraction, seed=seed, limit=limit, val=None)

        def convert(split: ImageTensors, name: str) -> ImageTensors:  # after limit: quick runs resize few images
            kept = split if name in wanted else split.subset(torch.zeros(0, dtype=torch.long))
            return _convert_tensors(kept, channels, size, preprocessing)

        return dataclasses.replace(
            carved,
            train=convert(carved.train, "train"),
            val=convert(carved.val, "val"),
            test=None if carved.test is None else convert(carved.test, "test"),
        )

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"no dataset {spec!r}: it is neither a named dataset ({', '.join(DATASETS)}) nor an existing folder"
        )
    if not path.is_dir():
        raise DataError(
            f"{str(path)!r} is a file; give a folder of class folders (or of train/, val/, test/ folders "
            f"of class folders) or a named dataset ({', '.join(DATASETS)})"
        )
    if preprocessing is not None:
        size = preprocessing.image_size
    return _load_folder(
        path,
        val_fraction=val_fraction,
        seed=seed,
        size=size,
        channels=channels,
        limit=limit,
        pre=preprocessing,
        wanted=wanted,
    )


def find_dataset_files(name: str) -> Path:
    """The folder holding the files of the named dataset; raises :class:`DataError` naming every place looked.

    Looks, in order, in ``$VITLAB_DATA/<name>/``, ``${VITLAB_CACHE:-~/.cache/vitlab}/data/<name>/`` and Debian's
    ``/usr/share/datasets/<name>/``. MNIST and Fashion-MNIST need the four IDX files (gzipped or not), directly in
    that folder or in torchvision's ``<FashionMNIST|MNIST>/raw/`` below it. CIFAR needs torchvision's
    ``cifar-10-batches-py`` / ``cifar-100-python`` folder, which is what is returned.
    """
    _check_name(name)
    looked: list[Path] = []
    for place in _places(name):
        for folder in _candidate_folders(name, place):
            looked.append(folder)
            if _has_files(name, folder):
                return folder
    raise DataError(_not_found_message(name, looked))


def normalize_stats(data: ImageTensors) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``data``'s pixels, in [0, 1] units."""
    if len(data) == 0:
        raise DataError("cannot compute normalisation statistics of an empty split")
    values = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(data.images.shape[1]):
        # a histogram of the 256 byte values gives exact moments without a float copy of the images
        counts = torch.bincount(data.images[:, c].flatten(), minlength=256).to(torch.float64)
        mean = (counts * values).sum() / counts.sum()
        var = (counts * (values - mean).square()).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(var.sqrt()))
    return tuple(means), tuple(stds)


def batches(
    data: ImageTensors,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (uint8 images (B, C, H, W), int64 labels (B,)) batches.

    With ``shuffle`` the order is a permutation drawn from ``generator`` (torch's global one if None) when the
    iteration starts. ``start`` skips the first ``start`` batches of that permutation: to resume exactly, restore
    the generator's state from the start of the epoch and pass the number of batches already done. With
    ``world_size`` > 1, process ``rank`` takes every ``world_size``-th image of the order (all processes the same
    number, ``len(data) // world_size``), so the processes of a distributed run see disjoint images.
    """
    for name, value in (("batch_size", batch_size), ("start", start), ("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):  # numpy ints are ints
            raise DataError(f"{name} must be an int, got {value!r}")
    batch_size, start, rank, world_size = int(batch_size), int(start), int(rank), int(world_size)
    if batch_size < 1:
        raise DataError(f"batch_size must be a positive int, got {batch_size!r}")
    if start < 0:
        raise DataError(f"start must be >= 0, got {start!r}")
    if not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank {rank!r}, world_size {world_size!r}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    if world_size > 1:
        order = order[rank::world_size][: n // world_size]
    n = len(order)
    count = n // batch_size if drop_last else math.ceil(n / batch_size)
    for i in range(start, count):
        idx = order[i * batch_size : (i + 1) * batch_size]
        yield data.images[idx], data.labels[idx]


# ----------------------------------------------------------------------------------------------------------
# Splitting


def _class_members(labels: torch.Tensor) -> list[np.ndarray]:
    """For each label that occurs, ascending, the indices holding it, ascending. (numpy: several times faster than
    torch's unique and nonzero at this size on a small CPU.)"""
    y = labels.numpy()
    order = np.argsort(y, kind="stable")
    counts = np.bincount(y) if y.size else np.zeros(0, dtype=np.int64)
    return [group for group in np.split(order, np.cumsum(counts)[:-1]) if group.size]


def _stratified_order(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """A permutation that shuffles each class and interleaves the classes evenly, so any prefix is stratified."""
    rng = np.random.default_rng(seed)
    keys = np.empty(labels.shape[0], dtype=np.float64)
    for members in _class_members(labels):
        # position within the shuffled class, spread over [0, 1): each class advances at its own pace
        keys[rng.permutation(members)] = (np.arange(members.size) + 0.5) / members.size
    keys += rng.random(keys.size) * 1e-9  # break ties between classes of equal size at random
    return torch.from_numpy(np.argsort(keys, kind="stable"))


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out) indices, both ascending: ``fraction`` of each class, rounded half up, held out at random."""
    rng = np.random.default_rng(seed)
    held = np.zeros(labels.shape[0], dtype=bool)
    for members in _class_members(labels):
        k = math.floor(fraction * members.size + 0.5)  # half up, unlike round(): 0.5 of 1 image is 1
        held[rng.choice(members, size=k, replace=False)] = True
    return torch.from_numpy(np.flatnonzero(~held)), torch.from_numpy(np.flatnonzero(held))


def _finish(
    name: str,
    train: ImageTensors,
    test: ImageTensors | None,
    skipped: list[tuple[str, str]],
    notes: list[str],
    *,
    val_fraction: float,
    seed: int,
    limit: int | None,
    val: ImageTensors | None,
) -> DataSplits:
    """Apply ``limit`` and carve the validation split (unless the data came with one)."""
    notes = list(notes)
    if limit is not None:
        if limit < len(train):
            train = train.subset(torch.sort(_stratified_order(train.labels, seed)[:limit]).values)
            notes.append(f"limit={limit}: kept {len(train)} training images (seeded, stratified)")
        # the test subset must not depend on the run's seed, so that runs stay comparable
        if test is not None and limit < len(test):
            test = test.subset(torch.sort(_stratified_order(test.labels, 0)[:limit]).values)
            notes.append(f"limit={limit}: kept {len(test)} test images (stratified, fixed seed 0)")
        if val is not None and limit < len(val):
            val = val.subset(torch.sort(_stratified_order(val.labels, 0)[:limit]).values)
    if val is None:
        kept, held = _stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held)
        notes.append(f"val: {len(val)} images carved from the training data (val_fraction={val_fraction}, seed={seed})")
    return DataSplits(train=train, val=val, test=test, name=name, skipped=skipped, notes=notes)


# ----------------------------------------------------------------------------------------------------------
# Named datasets


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; the named datasets are {', '.join(DATASETS)} (or give a folder)")


def _cache_root() -> Path:
    return Path(os.environ.get("VITLAB_CACHE") or Path.home() / ".cache" / "vitlab").expanduser() / "data"


def _places(name: str) -> list[Path]:
    places = []
    if os.environ.get("VITLAB_DATA"):
        places.append(Path(os.environ["VITLAB_DATA"]).expanduser() / name)
    places.append(_cache_root() / name)
    places.append(DEBIAN_DATASETS / name)
    return places


def _candidate_folders(name: str, place: Path) -> list[Path]:
    if name in _CIFAR_FOLDER:
        return [place / _CIFAR_FOLDER[name]]
    return [place, place / _TORCHVISION_CLASS[name] / "raw"]  # the latter is where torchvision downloads to


def _idx_path(folder: Path, stem: str) -> Path | None:
    for candidate in (stem, stem + ".gz"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None


def _has_files(name: str, folder: Path) -> bool:
    if name in _CIFAR_FOLDER:
        return folder.is_dir() and any(folder.iterdir())
    return all(_idx_path(folder, stem) is not None for pair in _IDX_FILES.values() for stem in pair)


def _not_found_message(name: str, looked: Sequence[Path]) -> str:
    if name in _CIFAR_FOLDER:
        wanted = f"torchvision's {_CIFAR_FOLDER[name]}/ folder"
    else:
        wanted = "the four IDX files (" + ", ".join(s for pair in _IDX_FILES.values() for s in pair) + ", .gz or not)"
    how = [f"put {wanted} in {_cache_root() / name} (or in $VITLAB_DATA/{name})"]
    if name in _DEBIAN_PACKAGE:
        how.insert(0, f"`apt-get install {_DEBIAN_PACKAGE[name]}`")
    how.append("or let vitlab download it (network access, VITLAB_OFFLINE unset; download=True, the default)")
    return f"dataset {name!r} not found; looked in: {', '.join(str(p) for p in looked)}. To get it: " + "; ".join(how)


def _download(name: str) -> None:
    import torchvision.datasets

    root = _cache_root() / name
    root.mkdir(parents=True, exist_ok=True)
    cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
    cls(root=str(root), train=True, download=True)
    cls(root=str(root), train=False, download=True)


def _load_named(name: str, *, download: bool) -> tuple[ImageTensors, ImageTensors]:
    try:
        folder = find_dataset_files(name)
    except DataError as not_found:
        from vitlab.hub import offline

        if not download or offline():
            reason = "download=False" if not download else f"VITLAB_OFFLINE={os.environ.get('VITLAB_OFFLINE')}"
            raise DataError(f"{not_found} (not downloading: {reason})") from None
        try:
            _download(name)
        except Exception as e:  # any failure of the network or of torchvision's checks
            raise DataError(f"{not_found} (the download failed: {type(e).__name__}: {e})") from e
        folder = find_dataset_files(name)
    if name in _CIFAR_FOLDER:
        return _read_cifar(name, folder)
    return _read_idx_dataset(name, folder)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array of unsigned bytes (the MNIST format: magic 0x0000 08 ndim, big-endian int32 sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes (expected magic 00 00 08 <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is cut short: {len(raw)} bytes, not even the {header}-byte IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if len(raw) != header + math.prod(shape):
        raise DataError(f"{path}: header says shape {shape} but the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _read_idx_dataset(name: str, folder: Path) -> tuple[ImageTensors, ImageTensors]:
    classes = list(FASHION_MNIST_CLASSES) if name == "fashion-mnist" else [str(d) for d in range(10)]
    out = []
    for images_stem, labels_stem in _IDX_FILES.values():
        images_path, labels_path = _idx_path(folder, images_stem), _idx_path(folder, labels_stem)
        assert images_path is not None and labels_path is not None  # find_dataset_files checked
        images, labels = _read_idx(images_path), _read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{images_path} and {labels_path} do not fit together: images {images.shape}, labels {labels.shape}"
            )
        if labels.size and int(labels.max()) >= len(classes):
            raise DataError(f"{labels_path} has label {int(labels.max())}; {name} has {len(classes)} classes")
        out.append(
            ImageTensors(
                torch.from_numpy(images.copy()).unsqueeze(1),  # (N, 1, H, W)
                torch.from_numpy(labels.astype(np.int64)),
                list(classes),
            )
        )
    return out[0], out[1]


def _read_cifar(name: str, folder: Path) -> tuple[ImageTensors, ImageTensors]:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, _TORCHVISION_CLASS[name])
    out = []
    for train in (True, False):
        try:
            ds = cls(root=str(folder.parent), train=train, download=False)
        except Exception as e:
            raise DataError(f"cannot read {name} from {folder}: {e}") from e
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
        out.append(ImageTensors(images, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes)))
    return out[0], out[1]


def _size_pair(image_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0:
        return (image_size, image_size)
    if (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    ):
        return (int(image_size[0]), int(image_size[1]))
    raise DataError(f"image_size must be a positive int or (height, width), got {image_size!r}")


def _convert_tensors(
    data: ImageTensors, channels: int | None, size: tuple[int, int] | None, pre: Preprocessing | None = None
) -> ImageTensors:
    """Change a whole uint8 (N, C, H, W) tensor's channel count (luma or replication) and size: bicubic to
    ``size``, or with ``pre`` as a checkpoint says (resize as its crop mode and ``crop_pct`` say with its
    interpolation, then centre-crop), the tensor counterpart of what ``vitlab predict`` does to a file."""
    images = data.images
    if channels is not None and channels != images.shape[1]:
        if channels == 3:
            images = images.expand(-1, 3, -1, -1).contiguous()
        else:  # ITU-R 601-2 luma, as PIL's convert("L")
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    if pre is None and size is not None:
        pre = Preprocessing(image_size=size, mean=(0.5,), std=(0.5,))  # bicubic, crop_pct 1
    if pre is not None and (tuple(images.shape[2:]) != pre.image_size or pre.crop_pct < 1):
        (h, w), (nh, nw) = pre.image_size, resized_size(images.shape[2], images.shape[3], pre)
        top, left = crop_offsets(nh, nw, pre)
        # "nearest-exact": PIL's pixel-centre rule (torch's "nearest" is not)
        mode = "nearest-exact" if pre.interpolation == "nearest" else pre.interpolation
        smooth = {"antialias": True, "align_corners": False} if mode != "nearest-exact" else {}
        chunks = []
        for start in range(0, images.shape[0], _RESIZE_CHUNK):
            x = images[start : start + _RESIZE_CHUNK].float()
            if (nh, nw) != tuple(x.shape[2:]):
                x = F.interpolate(x, size=(nh, nw), mode=mode, **smooth)
            chunks.append(x[..., top : top + h, left : left + w].round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(chunks) if chunks else images.new_zeros((0, images.shape[1], h, w))
    return ImageTensors(images, data.labels, data.class_names)


# ----------------------------------------------------------------------------------------------------------
# Folders of class folders


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p))


def _list_files(folder: Path, classes: list[str], split: str, source: str) -> tuple[list[Path], list[int]]:
    """Every visible file below each class folder of ``folder``, with its class index among those of ``source``."""
    index = {c: i for i, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for c in _class_folders(folder):
        if c not in index:
            raise DataError(
                f"class folder {str(folder / c)!r} in {split}/ has no counterpart in {source}/; "
                f"the classes are {', '.join(classes)}"
            )
        files = sorted(p for p in (folder / c).rglob("*") if p.is_file() and _visible(p))
        paths += files
        labels += [index[c]] * len(files)
    return paths, labels


def _to_array(im: Image.Image) -> np.ndarray:
    """A PIL image of any mode as uint8 (H, W) if it is greyscale, else (H, W, 3). Alpha is composited on white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            a = a * 255.0 if a.size and a.max() <= 1.0 else a
        elif im.mode.startswith("I;16") or (a.size and a.max() > 255):
            a = a / 257.0  # 16-bit range onto 8 bits
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if im.mode == "1":
        im = im.convert("L")
    im = flatten_alpha(im)
    if im.mode not in ("L", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX...
    return np.asarray(im, dtype=np.uint8)


def _decode(
    path: Path, size: tuple[int, int] | None, pre: Preprocessing | None = None, channels: int | None = None
) -> tuple[np.ndarray | None, bool, str]:
    """(pixels, was greyscale, reason it failed). Never raises: a bad file is a reason, not a crash.

    With ``pre``: exactly what ``vitlab predict`` does to a file (mode conversion, then resize and centre crop
    as ``pre`` says). Else a differently sized image is resized to cover ``size`` (bicubic) and centre-cropped,
    which is ``pre``'s crop with ``crop_pct`` 1, so that training and prediction see images alike."""
    try:
        with Image.open(path) as opened:
            opened.load()
            grey = opened.mode in _GREY_MODES
            if pre is not None:
                im = to_mode(ImageOps.exif_transpose(opened), channels or (1 if grey else 3))
                return np.asarray(resize_crop(im, pre), dtype=np.uint8), grey, ""
            a = _to_array(ImageOps.exif_transpose(opened))
        if size is not None and a.shape[:2] != size:
            a = np.asarray(resize_crop(Image.fromarray(a), Preprocessing(image_size=size)), dtype=np.uint8)
        return a, grey, ""
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return None, False, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _decode_all(
    paths: list[Path],
    labels: list[int],
    size: tuple[int, int] | None,
    skipped: list[tuple[str, str]],
    pre: Preprocessing | None = None,
    channels: int | None = None,
) -> tuple[list[np.ndarray], list[bool], list[int]]:
    arrays: list[np.ndarray] = []
    greys: list[bool] = []
    kept: list[int] = []
    with ThreadPoolExecutor(max_workers=min(_DECODE_THREADS, max(1, os.cpu_count() or 1))) as pool:
        for path, label, (a, grey, reason) in zip(
            paths, labels, pool.map(lambda p: _decode(p, size, pre, channels), paths), strict=True
        ):
            if a is None:
                skipped.append((str(path), reason))
            else:
                arrays.append(a)
                greys.append(grey)
                kept.append(label)
    return arrays, greys, kept


def _stack(arrays: list[np.ndarray], channels: int, size: tuple[int, int]) -> torch.Tensor:
    out = np.empty((len(arrays), channels, *size), dtype=np.uint8)
    for i, a in enumerate(arrays):
        if a.ndim == 2:
            out[i] = a[None]  # grey: broadcast over 1 or 3 channels
        elif channels == 3:
            out[i] = a.transpose(2, 0, 1)
        else:  # colour to grey: ITU-R 601-2 luma, as PIL's convert("L")
            out[i, 0] = np.clip(np.rint(a @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
    return torch.from_numpy(out)


def _load_folder(
    root: Path,
    *,
    val_fraction: float,
    seed: int,
    size: tuple[int, int] | None,
    channels: int | None,
    limit: int | None,
    pre: Preprocessing | None = None,
    wanted: frozenset[str] = frozenset(SPLITS),
) -> DataSplits:
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    notes: list[str] = []
    if "train" in split_dirs:
        if len(split_dirs) == 1:
            raise DataError(
                f"{root} has train/ but neither val/ nor test/; add one, or give {root / 'train'} "
                "itself to carve validation and test splits from its class folders"
            )
        class_root = split_dirs["train"]
    elif split_dirs and "train" not in wanted and wanted <= split_dirs.keys():
        split_dirs = {s: d for s, d in split_dirs.items() if s in wanted}  # e.g. ImageNet's val/ alone, to evaluate
        class_root = split_dirs[min(wanted, key=SPLITS.index)]
    elif split_dirs:
        found = ", ".join(s + "/" for s in split_dirs)
        raise DataError(f"{root} has {found} but no train/ folder of class folders beside it")
    else:
        class_root = root
        split_dirs = {"train": root}

    classes = _class_folders(class_root)
    if not classes:
        raise DataError(f"{class_root} has no class folders; expected one folder of images per class")
    if len(classes) < 2 and "train" in wanted:
        raise DataError(f"{class_root} has a single class folder ({classes[0]!r}); training needs at least 2 classes")

    # List every file (cheap), carve and limit on the listing, then decode only the splits wanted. "Images" are
    # indices into `paths` until then.
    paths: list[Path] = []
    listed: dict[str, ImageTensors] = {}
    for split, folder in split_dirs.items():
        files, labels = _list_files(folder, classes, split, class_root.name)
        if split == "train":
            counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
            empty = [classes[i] for i in np.flatnonzero(counts == 0)]
            if empty:
                raise DataError(f"class folder(s) {', '.join(repr(c) for c in empty)} in {folder} hold no files")
        index = torch.arange(len(paths), len(paths) + len(files))
        listed[split] = ImageTensors(index, torch.tensor(labels, dtype=torch.int64), list(classes))
        paths += files
    none = ImageTensors(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), list(classes))
    train, val, test = listed.get("train", none), listed.get("val"), listed.get("test")
    if split_dirs == {"train": root}:  # class folders alone: hold out a test split as well, same fraction as val
        # the held-out test images do not depend on the run's seed, so that runs with different seeds compare
        kept, held = _stratified_split(train.labels, val_fraction, _CARVED_TEST_SEED)
        train, test = train.subset(kept), train.subset(held)
        notes.append(
            f"no train/ val/ test/ folders: test is {len(test)} images carved from the class folders "
            f"(fraction {val_fraction}, fixed seed), not an official test split"
        )
    carved = _finish(str(root), train, test, [], notes, val_fraction=val_fraction, seed=seed, limit=limit, val=val)

    skipped: list[tuple[str, str]] = []
    decoded: dict[str, tuple[list[np.ndarray], list[bool], list[int]]] = {}
    for split in SPLITS:
        part = getattr(carved, split)
        if split in wanted and part is not None:
            files = [paths[i] for i in part.images.tolist()]
            decoded[split] = _decode_all(files, part.labels.tolist(), size, skipped, pre, channels)

    if "train" in wanted:  # every class needs a readable image among those of the training folder
        from_train = [s for s in decoded if s == "train" or s not in listed]  # val/test carved from train/
        readable = {label for split in from_train for label in decoded[split][2]}
        unreadable = [repr(c) for i, c in enumerate(classes) if i not in readable]
        if unreadable:
            example = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
            raise DataError(f"class folder(s) {', '.join(unreadable)} in {class_root} hold no readable images{example}")

    all_arrays = [a for arrays, _, _ in decoded.values() for a in arrays]
    if channels is None:
        channels = 1 if all(g for _, greys, _ in decoded.values() for g in greys) else 3
    if size is None:
        sizes = {a.shape[:2] for a in all_arrays}
        if len(sizes) > 1:
            shown = ", ".join(f"{h}x{w}" for h, w in sorted(sizes)[:5])
            raise DataError(
                f"the images in {root} differ in size ({shown}{'...' if len(sizes) > 5 else ''}); "
                "pass image_size to resize them all (vitlab train --image-size N)"
            )
        h, w = sizes.pop() if sizes else (0, 0)  # nothing decoded: empty splits
        size = (int(h), int(w))

    def tensors(split: str) -> ImageTensors:
        arrays, _, labels = decoded.get(split, ([], [], []))
        assert size is not None and channels is not None
        return ImageTensors(_stack(arrays, channels, size), torch.tensor(labels, dtype=torch.int64), list(classes))

    skipped.sort()
    return dataclasses.replace(
        carved,
        train=tensors("train"),
        val=tensors("val"),
        test=None if carved.test is None else tensors("test"),
        skipped=skipped,
    )
