"""``vitlab.bench`` on a tiny model with tiny repeats: the results document's structure and definitions.

No speed is asserted: only that every number is there, positive, and computed as the definitions say.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from vitlab.bench import PEERS, BenchSettings, PeerUnavailable, build_model, format_table, run_benchmark
from vitlab.config import ViTConfig
from vitlab.model import ViT, count_parameters, flops_per_image, onednn_enabled

_MODULES = {"timm": "timm", "hf": "transformers", "torchvision": "torchvision"}
INSTALLED = tuple(p for p in PEERS if importlib.util.find_spec(_MODULES[p]) is not None)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models are all synchronisation on a shared machine with more threads; one is plenty here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_settings(tiny: ViTConfig, **changes: object) -> BenchSettings:
    base: dict[str, object] = dict(
        models=(tiny,),
        batches=(1, 2),
        peers=INSTALLED,
        repeats=2,
        min_time=0.0,
        warmup=1,
        memory=False,
        matmul_size=64,
        matmul_repeats=2,
    )
    base.update(changes)
    return BenchSettings(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def result() -> dict[str, object]:
    tiny = ViTConfig(image_size=32, patch_size=8, hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128, num_classes=10)
    return run_benchmark(tiny_settings(tiny, train=True), command="vitlab bench --test")


def test_document_structure(result: dict) -> None:
    json.dumps(result)  # serialisable as it is
    assert result["command"] == "vitlab bench --test"
    assert result["torch_version"] == torch.__version__
    assert result["threads"] == torch.get_num_threads() == 1
    assert result["machine"]["logical_cpus"] >= 1 and "cpu_model" in result["machine"]
    assert set(result["load_average_1min"]) == {"start", "end"}
    kernels = ["float32", "bfloat16"]
    if onednn_enabled():  # oneDNN's GEMM too: vitlab's linear layers call it
        kernels.append("float32_onednn")
    assert sorted(result["matmul"]) == sorted(kernels)
    for kernel in kernels:
        rate = result["matmul"][kernel]
        assert rate["gflops_best"] >= rate["gflops_median"] > 0
    fp32 = [result["matmul"][k]["gflops_best"] for k in kernels if k != "bfloat16"]
    assert result["peak_gflops"] == max(fp32)  # the share is of the faster fp32 kernel
    assert set(result["definitions"]) >= {"images_per_s", "latency_ms", "peak_share", "ratio_vs_best_peer"}
    libraries = {"vitlab", *INSTALLED}
    rows = result["results"]
    assert len(rows) == len(libraries) * 2 * 2  # libraries x (inference, train) x batches (1, 2)
    assert {r["library"] for r in rows} == libraries
    assert {(r["mode"], r["batch"]) for r in rows} == {("inference", 1), ("inference", 2), ("train", 1), ("train", 2)}
    assert result["skipped"] == []
    assert "images/s" in format_table(result)


def test_numbers_are_positive_and_as_defined(result: dict) -> None:
    tiny_flops = None
    for row in result["results"]:
        assert len(row["seconds_per_call"]) == 2 and all(s > 0 for s in row["seconds_per_call"])
        assert row["images_per_s"] > 0 and row["latency_ms"] > 0 and row["iters_per_repeat"] >= 1
        assert row["images_per_s"] == pytest.approx(row["batch"] / (row["latency_ms"] / 1000))
        forward = row["gflops_per_image"] / (3 if row["mode"] == "train" else 1)
        tiny_flops = tiny_flops or forward
        assert forward == pytest.approx(tiny_flops)  # the same architecture for every library
        expected = row["gflops_per_image"] * row["images_per_s"] / result["peak_gflops"]
        assert row["peak_share"] == pytest.approx(expected)
        assert row["achieved_gflops"] == pytest.approx(row["gflops_per_image"] * row["images_per_s"])
    tiny = ViTConfig(image_size=32, patch_size=8, hidden_dim=64, num_layers=2, num_heads=4, mlp_dim=128, num_classes=10)
    assert tiny_flops == pytest.approx(flops_per_image(tiny) / 1e9)


def test_ratios_against_the_best_peer_of_the_same_run(result: dict) -> None:
    if not INSTALLED:
        pytest.skip("no peer library installed")
    groups: dict[tuple, list[dict]] = {}
    for row in result["results"]:
        groups.setdefault((row["mode"], row["batch"]), []).append(row)
    for rows in groups.values():
        peers = [r for r in rows if r["library"] != "vitlab"]
        best = max(peers, key=lambda r: r["images_per_s"])
        for row in rows:
            assert row["best_peer"] == best["library"]
            assert row["ratio_vs_best_peer"] == pytest.approx(row["images_per_s"] / best["images_per_s"])
        assert max(r["ratio_vs_best_peer"] for r in peers) == pytest.approx(1.0)


def test_without_peers_there_are_no_ratios(tiny: ViTConfig) -> None:
    out = run_benchmark(tiny_settings(tiny, peers=(), batches=(1,), repeats=1))
    (row,) = out["results"]
    assert row["library"] == "vitlab" and row["ratio_vs_best_peer"] is None and row["best_peer"] is None


def test_memory_in_a_subprocess(tiny: ViTConfig) -> None:
    out = run_benchmark(tiny_settings(tiny, peers=(), batches=(2,), repeats=1, memory=True, train=True))
    for row in out["results"]:
        mem = row["memory"]
        assert "error" not in mem, mem
        assert mem["peak_rss_mb"] > 0
        if "step_rss_delta_mb" in mem:
            assert 0 <= mem["step_rss_delta_mb"] <= mem["peak_rss_mb"]
            assert f"{mem['step_rss_delta_mb']:.0f}" in format_table(out)


@pytest.mark.parametrize("library", INSTALLED)
def test_peers_build_the_same_architecture(library: str, tiny: ViTConfig) -> None:
    ours = build_model("vitlab", tiny)
    theirs = build_model(library, tiny)
    assert count_parameters(theirs) == count_parameters(ours)
    assert theirs(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_peers_refuse_architectures_they_do_not_have(tiny: ViTConfig) -> None:
    for library in INSTALLED:
        with pytest.raises(PeerUnavailable):
            build_model(library, tiny.replace(pos_embed="relative"))
    out = run_benchmark(tiny_settings(tiny.replace(pos_embed="sincos_2d"), batches=(1,), repeats=1))
    assert {r["library"] for r in out["results"]} == {"vitlab"}
    assert {s["library"] for s in out["skipped"]} == set(INSTALLED)


def test_patch_dropout_is_built_by_timm_only(tiny: ViTConfig) -> None:
    """For the training benchmark the peer must drop patches as vitlab does (same share kept per image)."""
    config = tiny.replace(patch_dropout=0.5)  # 16 patches: 8 kept
    for library in set(INSTALLED) - {"timm"}:
        with pytest.raises(PeerUnavailable, match="patch dropout"):
            build_model(library, config)
    if "timm" not in INSTALLED:
        pytest.skip("timm is not installed")
    timm_model: Any = build_model("timm", config).train()
    seen: list[int] = []
    timm_model.blocks[0].register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))
    timm_model(torch.randn(2, 3, 32, 32))
    ours, _ = ViT(config).train().embed(torch.randn(2, 3, 32, 32))
    assert seen == [ours.shape[1]] == [1 + 8]


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown peer"):
        BenchSettings(peers=("jax",))
    with pytest.raises(ValueError, match="unknown model"):
        BenchSettings(models=("Q/16",))
    with pytest.raises(ValueError, match="batch sizes"):
        BenchSettings(batches=(0,))
    with pytest.raises(ValueError, match="add train"):
        BenchSettings(grad_checkpointing=True)


def test_cli_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "results" / "tiny.json"
    args = ["--models", "Ti/16", "--image-size", "32", "--batch", "1", "--peers", "none", "--repeats", "1"]
    args += ["--min-time", "0", "--matmul-size", "64", "--threads", "1", "--no-memory", "--json", "--out", str(out)]
    env = {**os.environ, "VITLAB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "vitlab", "bench", *args], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    printed = json.loads(r.stdout)
    saved = json.loads(out.read_text())
    assert printed == saved
    assert saved["command"] == "vitlab bench " + " ".join(args)
    assert saved["settings"]["models"] == ["Ti/16"] and saved["results"][0]["model"] == "Ti/16"
    bad = subprocess.run([sys.executable, "-m", "vitlab", "bench", "--peers", "jax"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown peer" in bad.stderr
    for where, message in [(tmp_path, "is a folder"), (out / "x.json", "is a file, not a folder")]:
        bad = subprocess.run(
            [sys.executable, "-m", "vitlab", "bench", *args[:-1], str(where)], capture_output=True, text=True
        )
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr  # before any timing
        assert "vitlab" not in bad.stdout


@pytest.mark.slow
def test_compiled_variants_are_timed_beside_eager(tiny: ViTConfig) -> None:
    out = run_benchmark(tiny_settings(tiny, peers=(), batches=(2,), repeats=1))
    eager_only = len(out["results"])
    out = run_benchmark(tiny_settings(tiny, peers=(), batches=(2,), repeats=1, compile=True))
    rows = {(r["library"], r["compiled"]): r for r in out["results"]}
    if ("vitlab", True) not in rows:  # no working compiler here: reported, not raised
        assert any(s["library"] == "vitlab+compile" for s in out["skipped"])
    else:
        assert len(rows) == 2 * eager_only and rows[("vitlab", True)]["images_per_s"] > 0


def test_grad_checkpointing_rows_in_training_only(tiny: ViTConfig) -> None:
    settings = tiny_settings(tiny, peers=INSTALLED[:1], batches=(2,), repeats=1, train=True, grad_checkpointing=True)
    out = run_benchmark(settings)
    rows = {(r["library"], r["mode"]): r for r in out["results"]}
    assert ("vitlab-gc", "train") in rows and ("vitlab-gc", "inference") not in rows
    gc_row = rows[("vitlab-gc", "train")]
    assert gc_row["images_per_s"] > 0
    if INSTALLED:  # a checkpointed vitlab is never anyone's peer
        assert gc_row["best_peer"] == rows[("vitlab", "train")]["best_peer"] == INSTALLED[0]


def test_fp32_peak_needs_an_fp32_rate() -> None:
    from vitlab.bench import fp32_peak_gflops

    rate = {"gflops_best": 2.0, "gflops_median": 1.0}
    assert fp32_peak_gflops({"float32": rate, "float32_onednn": {**rate, "gflops_best": 5.0}}) == 5.0
    with pytest.raises(ValueError, match="no fp32 matmul rate among \\['bfloat16'\\]"):
        fp32_peak_gflops({"bfloat16": rate})


@pytest.mark.parametrize("native", [True, False])
def test_matmul_rates_time_emulated_bf16_on_small_matrices(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import vitlab.bench as vb

    monkeypatch.setattr(vb, "_cpu_has_bf16_gemm", lambda: native)
    monkeypatch.setattr(vb, "_EMULATED_BF16_MAX_SIZE", 16)
    rates = vb.matmul_rates(size=48, repeats=2)
    assert rates["float32"]["size"] == 48
    assert rates["bfloat16"]["size"] == (48 if native else 16)
    for rate in rates.values():
        assert rate["repeats"] == 2 and rate["gflops_best"] >= rate["gflops_median"] > 0
    doc = {"matmul": rates, "torch_version": "x", "threads": 1, "machine": {}, "results": [], "skipped": []}
    doc["load_average_1min"] = {"start": None, "end": None}
    first = vb.format_table(doc).splitlines()[0]
    assert "; bf16 " in first and ("(at 16^2)" in first) == (not native)  # a smaller bf16 product is named
    del rates["bfloat16"]  # a run asked for fp32 only: no bf16 rate to print
    assert "bf16" not in vb.format_table(doc)
