"""Named public ViT checkpoints, and downloading them into a local cache.

The registry lists the paper's checkpoints (arXiv:2010.11929: ImageNet-21k pre-training, Section 4.1, and the
ImageNet-1k fine-tunes of Section 3.2) and the AugReg family ("How to train your ViT?", arXiv:2106.10270), as
released on Google Cloud Storage. Each entry carries its URL, architecture, preprocessing, licence and a reported
ImageNet-1k top-1 accuracy with the source of that number (``None`` where no source was at hand).

Downloads go to ``$VITLAB_CACHE`` (default ``~/.cache/vitlab``) at ``<host>/<path of the URL>``, through a
temporary file renamed only when complete and checked. ``VITLAB_OFFLINE=1`` never touches the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from vitlab.config import Preprocessing
from vitlab.errors import CheckpointError
from vitlab.io import atomic_path

CACHE_ENV = "VITLAB_CACHE"
OFFLINE_ENV = "VITLAB_OFFLINE"
_GCS = "https://storage.googleapis.com/vit_models"
# ImageNet-1k top-1 as evaluated by timm (results/results-imagenet.csv of huggingface/pytorch-image-models,
# commit 0173a13), for the same weights converted to PyTorch.
_TIMM_RESULTS = "timm results-imagenet.csv"


@dataclass(frozen=True)
class PretrainedEntry:
    """One public checkpoint: where it is, what it is, what it expects and how well it does."""

    name: str
    url: str
    arch: str  # vitlab preset, e.g. "B/16"
    image_size: int
    num_classes: int
    dataset: str
    preprocessing: Preprocessing
    license: str = "Apache-2.0"
    top1: float | None = None  # ImageNet-1k top-1 (%), None where no source was at hand
    top1_source: str | None = None
    sha256: str | None = None
    size: int | None = None  # bytes
    hf_hub_id: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "arch": self.arch,
            "image_size": self.image_size,
            "num_classes": self.num_classes,
            "dataset": self.dataset,
            "top1": self.top1,
            "top1_source": self.top1_source,
            "license": self.license,
            "url": self.url,
            "hf_hub_id": self.hf_hub_id,
            "sha256": self.sha256,
            "size": self.size,
            "preprocessing": self.preprocessing.to_dict(),
        }


def _google_pre(size: int) -> Preprocessing:
    # pixels to [-1, 1]; timm's pretrained_cfg for these weights: bicubic, crop 0.9 at 224, none at 384
    return Preprocessing(image_size=size, interpolation="bicubic", crop_pct=0.9 if size == 224 else 1.0)


def _entries() -> list[PretrainedEntry]:
    out: list[PretrainedEntry] = []
    # the paper's ImageNet-21k pre-trained checkpoints: 21843 classes, with the tanh pre-logits layer
    for arch in ("B/16", "B/32", "L/16", "L/32", "H/14"):
        tag = arch.replace("/", "_")
        out.append(
            PretrainedEntry(
                name=f"vit-{arch.lower().replace('/', '')}-in21k",
                url=f"{_GCS}/imagenet21k/ViT-{tag}.npz",
                arch=arch,
                image_size=224,
                num_classes=21843,
                dataset="ImageNet-21k",
                preprocessing=_google_pre(224),
            )
        )
    # the paper's ImageNet-21k -> ImageNet-1k fine-tunes at 384 (and the two released at 224)
    # timm evaluated only these three of the paper's fine-tunes (orig_in21k_ft_in1k); the others stay None
    timm_top1 = {("B/16", 384): 84.200, ("B/16", 224): 81.786, ("L/32", 384): 81.510}
    for arch, size in (("B/16", 384), ("B/32", 384), ("L/16", 384), ("L/32", 384), ("B/16", 224), ("L/16", 224)):
        tag = arch.replace("/", "_")
        suffix = "" if size == 384 else "-224"
        out.append(
            PretrainedEntry(
                name=f"vit-{arch.lower().replace('/', '')}-in21k-in1k-{size}",
                url=f"{_GCS}/imagenet21k+imagenet2012/ViT-{tag}{suffix}.npz",
                arch=arch,
                image_size=size,
                num_classes=1000,
                dataset="ImageNet-21k, fine-tuned on ImageNet-1k",
                preprocessing=_google_pre(size),
                top1=timm_top1.get((arch, size)),
                top1_source=_TIMM_RESULTS if (arch, size) in timm_top1 else None,
            )
        )
    out.extend(_augreg())
    return out


# AugReg (arXiv:2106.10270): the recommended checkpoint per model, file names as in timm's default_cfgs.
# (arch, pre-training file stem, fine-tune lr, {size: timm top-1}); i21k -> i1k fine-tunes.
_AUGREG_I21K: list[tuple[str, str, str, dict[int, float]]] = [
    ("Ti/16", "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0", "0.03", {224: 75.454, 384: 78.424}),
    ("S/32", "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03", {224: 75.994, 384: 80.486}),
    ("S/16", "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0", "0.03", {224: 81.384, 384: 83.802}),
    ("B/32", "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0", "0.03", {224: 80.716}),
    ("B/16", "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0", "0.01", {224: 84.532, 384: 85.996}),
    ("L/16", "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "0.01", {224: 85.834, 384: 87.084}),
]
# timm pairs B/32 at 384 with a different pre-training run (wd 0.1)
_AUGREG_B32_384 = "B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0"
_AUGREG_I1K: list[tuple[str, str, dict[int, float]]] = [
    ("S/16", "S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0", {224: 78.846, 384: 81.116}),
    ("B/32", "B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1", {224: 74.894, 384: 78.752}),
    ("B/16", "B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1", {224: 79.154, 384: 81.102}),
]
_TIMM_ARCH = {"Ti": "tiny", "S": "small", "B": "base", "L": "large"}


def _timm_id(arch: str, size: int, tag: str) -> str:
    width, patch = arch.split("/")
    return f"timm/vit_{_TIMM_ARCH[width]}_patch{patch}_{size}.{tag}"


def _augreg() -> list[PretrainedEntry]:
    out: list[PretrainedEntry] = []
    for arch, stem, lr, top1 in _AUGREG_I21K:
        short = arch.lower().replace("/", "")
        out.append(
            PretrainedEntry(
                name=f"augreg-{short}-in21k",
                url=f"{_GCS}/augreg/{stem}.npz",
                arch=arch,
                image_size=224,
                num_classes=21843,
                dataset="ImageNet-21k (AugReg)",
                preprocessing=_google_pre(224),
                hf_hub_id=_timm_id(arch, 224, "augreg_in21k"),
            )
        )
        for size in (224, 384):
            base = _AUGREG_B32_384 if (arch, size) == ("B/32", 384) else stem
            out.append(
                PretrainedEntry(
                    name=f"augreg-{short}-in21k-in1k-{size}",
                    url=f"{_GCS}/augreg/{base}--imagenet2012-steps_20k-lr_{lr}-res_{size}.npz",
                    arch=arch,
                    image_size=size,
                    num_classes=1000,
                    dataset="ImageNet-21k (AugReg), fine-tuned on ImageNet-1k",
                    preprocessing=_google_pre(size),
                    top1=83.350 if (arch, size) == ("B/32", 384) else top1[size],
                    top1_source=_TIMM_RESULTS,
                    hf_hub_id=_timm_id(arch, size, "augreg_in21k_ft_in1k"),
                )
            )
    for arch, stem, top1 in _AUGREG_I1K:
        short = arch.lower().replace("/", "")
        for size in (224, 384):
            out.append(
                PretrainedEntry(
                    name=f"augreg-{short}-in1k-{size}",
                    url=f"{_GCS}/augreg/{stem}--imagenet2012-steps_20k-lr_0.01-res_{size}.npz",
                    arch=arch,
                    image_size=size,
                    num_classes=1000,
                    dataset="ImageNet-1k (AugReg)",
                    preprocessing=_google_pre(size),
                    top1=top1[size],
                    top1_source=_TIMM_RESULTS,
                    hf_hub_id=_timm_id(arch, size, "augreg_in1k"),
                )
            )
    return out


REGISTRY: dict[str, PretrainedEntry] = {e.name: e for e in _entries()}


def list_pretrained() -> list[PretrainedEntry]:
    return list(REGISTRY.values())


def get_entry(name: str) -> PretrainedEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise CheckpointError(
            f"no pretrained checkpoint named {name!r}; `vitlab models --pretrained` lists them"
        ) from None


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names in the usual index order (WordNet lemmas, shipped with vitlab)."""
    text = resources.files("vitlab").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return text.splitlines()


def class_names_for(entry: PretrainedEntry) -> list[str] | None:
    return imagenet_class_names() if entry.num_classes == 1000 else None


# -------------------------------------------------------------------------------------- download
def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vitlab")


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def cache_path(url: str, root: Path | None = None) -> Path:
    """Where ``url`` is kept: ``<cache>/<host>/<path>`` (so a file can also be put there by hand)."""
    parts = urllib.parse.urlsplit(url)
    segments = [urllib.parse.unquote(s) for s in parts.path.split("/") if s]
    host = parts.netloc.replace(":", "_")
    # a decoded segment is one path component under the cache, never a way out of it ("%2F", "..%2F", "\\")
    unsafe = [s for s in [host, *segments] if s in (".", "..") or "/" in s or "\\" in s or "\0" in s]
    if not parts.netloc or not segments or unsafe:
        raise CheckpointError(f"cannot download {url!r}: expected http(s)://host/path/to/file")
    if parts.query:  # another query may be another file: its own folder, the file name (and suffix) kept
        segments.insert(-1, "query-" + hashlib.sha256(parts.query.encode()).hexdigest()[:16])
    base = root or cache_dir()
    target = base.joinpath(host, *segments)
    if not target.resolve().is_relative_to(base.resolve()):
        raise CheckpointError(f"cannot download {url!r}: its path leads out of the cache {base}")
    return target


def offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def download(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    root: Path | None = None,
    progress: bool = True,
    timeout: float = 60.0,
) -> Path:
    """The cached file for ``url``, downloading it first if needed (never with ``VITLAB_OFFLINE=1``).

    The transfer goes to a temporary file beside the target, is checked against the server's
    Content-Length and the published ``size`` / ``sha256`` when known, and is renamed into place only then:
    a short or corrupt transfer leaves nothing in the cache.
    """
    target = cache_path(url, root)
    if target.is_file():
        if size is not None and target.stat().st_size != size:
            raise CheckpointError(
                f"the cached {target} has {target.stat().st_size} bytes, {url} has {size}: delete it and retry"
            )
        if sha256 is not None and _sha256(target) != sha256.lower():  # a file put there by hand is checked too
            raise CheckpointError(f"the cached {target} does not have {url}'s published SHA-256: delete it and retry")
        return target
    if offline():
        raise CheckpointError(
            f"{url} is not in the cache and {OFFLINE_ENV} is set: download it by hand to {target} "
            f"(or unset {OFFLINE_ENV})"
        )
    try:
        with atomic_path(target) as tmp:
            _fetch(url, tmp, progress=progress, timeout=timeout)
            _verify(url, tmp, sha256=sha256, size=size)
    except urllib.error.HTTPError as e:
        raise CheckpointError(f"cannot download {url}: the server answered {e.code} {e.reason}") from e
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise CheckpointError(f"cannot download {url} ({e}); without network, put the file by hand at {target}") from e
    except OSError as e:  # the cache itself: not writable, full, a file where a folder goes
        raise CheckpointError(
            f"cannot store {url} at {target} ({e}): set {CACHE_ENV} to a writable folder with room for it"
        ) from e
    return target


def _fetch(url: str, dest: Path, *, progress: bool, timeout: float) -> None:
    from tqdm import tqdm

    request = urllib.request.Request(url, headers={"User-Agent": "vitlab"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        length = response.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        received = 0
        name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
        with tqdm(total=expected, unit="B", unit_scale=True, desc=name, file=sys.stderr, disable=not progress) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except http.client.IncompleteRead as e:  # the server closed a chunked transfer mid-way
                    raise CheckpointError(
                        f"download of {url} was cut short after {received + len(e.partial)} bytes (the server closed "
                        "the connection); nothing was cached"
                    ) from e
                if not chunk:
                    break
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    if expected is not None and received != expected:
        raise CheckpointError(f"download of {url} was cut short: {received} of {expected} bytes; nothing was cached")


def _verify(url: str, path: Path, *, sha256: str | None, size: int | None) -> None:
    got = path.stat().st_size
    if size is not None and got != size:
        raise CheckpointError(f"{url}: downloaded {got} bytes, the published size is {size}; nothing was cached")
    if sha256 is not None:
        digest = _sha256(path)
        if digest != sha256.lower():
            raise CheckpointError(f"{url}: SHA-256 {digest} does not match the published {sha256}; nothing was cached")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
