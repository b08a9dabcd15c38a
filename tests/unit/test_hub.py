"""The registry, and downloads through a local HTTP server on 127.0.0.1 (no test reaches the internet)."""

from __future__ import annotations

import hashlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

import vitlab
from vitlab import CheckpointError, hub
from vitlab.commands.models import run_pretrained

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class Server:
    url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)
    truncate: set[str] = field(default_factory=set)
    chunked_cut: set[str] = field(default_factory=set)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(url="", files={"/models/w.bin": PAYLOAD})

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.files.get(self.path.split("?")[0])
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            if self.path in state.chunked_cut:  # no length promised: one chunk of half the file, then hang up
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                half = body[: len(body) // 2]
                self.wfile.write(f"{len(half):x}\r\n".encode() + half + b"\r\n")
                self.wfile.flush()
                self.close_connection = True
                return
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.truncate:  # promise everything, send half, hang up
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hub.OFFLINE_ENV, raising=False)
    return tmp_path / "cache"


def cached_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_download_then_cache_without_network(server: Server, _cache: Path) -> None:
    url = f"{server.url}/models/w.bin"
    path = hub.download(url, sha256=hashlib.sha256(PAYLOAD).hexdigest(), size=len(PAYLOAD), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert path == hub.cache_path(url) and path.is_relative_to(_cache)
    assert server.requests == ["/models/w.bin"]
    assert hub.download(url, progress=False) == path  # second call: from the cache
    assert server.requests == ["/models/w.bin"]


def test_offline_uses_the_cache_and_never_the_network(
    server: Server, _cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"{server.url}/models/w.bin"
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    with pytest.raises(CheckpointError, match=rf"{url}.*by hand to {hub.cache_path(url)}"):
        hub.download(url, progress=False)
    assert server.requests == []
    monkeypatch.delenv(hub.OFFLINE_ENV)
    path = hub.download(url, progress=False)
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    assert hub.download(url, progress=False) == path
    assert len(server.requests) == 1


def test_truncated_transfer_leaves_nothing(server: Server, _cache: Path) -> None:
    server.truncate.add("/models/w.bin")
    with pytest.raises(CheckpointError, match=r"cut short: \d+ of \d+ bytes"):
        hub.download(f"{server.url}/models/w.bin", progress=False)
    assert cached_files(_cache) == []


@pytest.mark.parametrize("check", ["sha256", "size"])
def test_checksum_or_size_mismatch_leaves_nothing(server: Server, _cache: Path, check: str) -> None:
    url = f"{server.url}/models/w.bin"
    kwargs = {"sha256": "0" * 64} if check == "sha256" else {"size": len(PAYLOAD) + 1}
    with pytest.raises(CheckpointError, match="SHA-256" if check == "sha256" else "published size"):
        hub.download(url, progress=False, **kwargs)
    assert cached_files(_cache) == []


def test_no_network_names_the_url_and_the_cache_path(server: Server, _cache: Path) -> None:
    url = f"{server.url}/missing.npz"
    with pytest.raises(CheckpointError, match=rf"cannot download {url}: the server answered 404"):
        hub.download(url, progress=False)
    dead = "http://127.0.0.1:9/w.npz"  # the discard port: connection refused
    with pytest.raises(CheckpointError, match=rf"{dead}.*{hub.cache_path(dead)}"):
        hub.download(dead, progress=False)
    assert cached_files(_cache) == []


def test_progress_bar_goes_to_stderr(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    hub.download(f"{server.url}/models/w.bin", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "w.bin" in err


@torch.no_grad()
def test_from_pretrained_url(server: Server, tmp_path: Path) -> None:
    model = vitlab.create_model("Ti/8", image_size=16, num_layers=1, num_classes=4)
    model.save_pretrained(tmp_path / "src")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes((tmp_path / "src" / "model.safetensors").read_bytes())
    server.files["/ckpt/w.safetensors"] = weights.read_bytes()
    loaded = vitlab.from_pretrained(f"{server.url}/ckpt/w.safetensors", num_heads=3)
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))


# ---------------------------------------------------------------------------------------- registry
def test_registry_covers_the_paper_and_augreg() -> None:
    names = set(hub.REGISTRY)
    for arch in ("b16", "b32", "l16", "l32", "h14"):
        assert f"vit-{arch}-in21k" in names
    for arch in ("b16", "b32", "l16", "l32"):
        assert f"vit-{arch}-in21k-in1k-384" in names
    assert {"vit-b16-in21k-in1k-224", "vit-l16-in21k-in1k-224"} <= names
    for arch in ("ti16", "s16", "b16", "l16"):
        assert {f"augreg-{arch}-in21k", f"augreg-{arch}-in21k-in1k-224", f"augreg-{arch}-in21k-in1k-384"} <= names
    for e in hub.list_pretrained():
        assert e.url.startswith("https://storage.googleapis.com/vit_models/") and e.url.endswith(".npz")
        assert e.preprocessing.image_size == (e.image_size, e.image_size) and e.preprocessing.mean == (0.5,) * 3
        assert e.license == "Apache-2.0" and e.num_classes in (1000, 21843)
        assert (e.top1 is None) == (e.top1_source is None)
        vitlab.ViTConfig.from_name(e.arch)


def test_imagenet_class_names_ship_with_vitlab() -> None:
    names = hub.imagenet_class_names()
    assert len(names) == 1000 and names[0].startswith("tench") and names[-1].startswith("toilet tissue")


def test_models_pretrained_lists_every_entry(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_pretrained(as_json=False) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in hub.REGISTRY)


@torch.no_grad()
def test_registry_name_from_a_file_put_in_the_cache_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a registered checkpoint placed at its cache path loads with the entry's preprocessing
    and the ImageNet class names."""
    from tests.parity.test_formats import google_npz, save_npz

    entry = hub.get_entry("augreg-ti16-in21k-in1k-224")
    target = hub.cache_path(entry.url)
    target.parent.mkdir(parents=True)
    save_npz(google_npz(classes=1000), target.with_suffix(""))  # numpy appends .npz
    monkeypatch.setenv(hub.OFFLINE_ENV, "1")
    model = vitlab.from_pretrained(entry.name)
    assert model.class_names == hub.imagenet_class_names()
    assert model.preprocessing.crop_pct == 0.9 and model.preprocessing.image_size == (32, 32)
    with pytest.raises(CheckpointError, match="no pretrained checkpoint named"):
        hub.get_entry("vit-z99")
    np.testing.assert_array_equal(model.head.weight.shape, (1000, 64))


def test_a_chunked_transfer_cut_short_leaves_nothing(server: Server, _cache: Path) -> None:
    server.chunked_cut.add("/models/w.bin")
    with pytest.raises(
        CheckpointError, match=r"cut short after \d+ bytes \(the server closed the connection\); nothing was cached"
    ):
        hub.download(f"{server.url}/models/w.bin", progress=False)
    assert cached_files(_cache) == []


@pytest.mark.parametrize(
    "path", ["/a/%2Ftmp%2Fx.npz", "/a/..%2F..%2Fx.npz", "/a/%2e%2e/x.npz", "/a/..%5Cx.npz", "/a/x%00.npz"]
)
def test_an_url_cannot_write_outside_the_cache(path: str, _cache: Path) -> None:
    with pytest.raises(CheckpointError, match="expected http"):
        hub.cache_path(f"http://example.org{path}")


def test_query_strings_are_part_of_the_cache_key(server: Server, _cache: Path) -> None:
    server.files["/models/w.bin"] = b"one"
    first = hub.download(f"{server.url}/models/w.bin?v=1", progress=False)
    server.files["/models/w.bin"] = b"two"
    second = hub.download(f"{server.url}/models/w.bin?v=2", progress=False)
    assert first != second and first.name == second.name == "w.bin"  # the suffix still says the format
    assert (first.read_bytes(), second.read_bytes()) == (b"one", b"two")


def test_a_cached_file_is_checked_against_a_published_digest(server: Server, _cache: Path) -> None:
    url = f"{server.url}/models/w.bin"
    path = hub.download(url, progress=False)
    assert hub.download(url, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False) == path
    path.write_bytes(b"put here by hand, but not the published file")
    with pytest.raises(CheckpointError, match=r"does not have .* published SHA-256: delete it"):
        hub.download(url, sha256=hashlib.sha256(PAYLOAD).hexdigest(), progress=False)


def test_an_unusable_cache_says_so(server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "a_file"))
    with pytest.raises(CheckpointError, match=r"cannot store .* set VITLAB_CACHE to a writable folder"):
        hub.download(f"{server.url}/models/w.bin", progress=False)


def test_an_url_of_an_unknown_file_type_is_refused_before_downloading(server: Server) -> None:
    server.files["/models/model.ckpt"] = PAYLOAD
    with pytest.raises(CheckpointError, match=r"a URL must name a \.npz or \.safetensors"):
        vitlab.from_pretrained(f"{server.url}/models/model.ckpt")
    assert server.requests == []
