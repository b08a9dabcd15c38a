"""vitlab.malloc: glibc keeps freed blocks for reuse instead of mapping fresh pages for every allocation."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.malloc import ENV_VARS, keep_freed_memory

# allocate, touch and free blocks of growing size: glibc's default maps each one afresh (it only raises its
# mmap threshold to a block's size once that block is freed); with keep_freed_memory the heap is reused
_PROBE = """
import resource, sys
import torch
from vitlab.malloc import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for mib in range(8, 17):  # settling in: not counted
    torch.ones(mib << 18)  # mib MiB of float32, written
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for mib in [*range(17, 31), 20, 20, 20, 20]:
    torch.ones(mib << 18)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_always() -> bool:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.is_file() and "[always]" in path.read_text()


def _faults(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k not in ("VITLAB_MALLOC", "GLIBC_TUNABLES")}
    done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
@pytest.mark.skipif(_thp_always(), reason="with transparent huge pages always on, the defaults fault little too")
def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    default, kept = _faults("default"), _faults("keep")
    # default: every block's pages fault in afresh (~100k pages in all); kept: only each growth of the heap
    # (1 MiB per new size; measured here: 3,584 vs 104,701 pages)
    assert default > 50_000, default
    assert kept < default / 10, (kept, default)


@pytest.mark.parametrize(
    "name, value",
    [*((v, "0") for v in ENV_VARS), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0"), ("VITLAB_MALLOC", "0")],
)
def test_the_users_own_malloc_settings_win(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    assert keep_freed_memory() is False


def test_train_applies_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from vitlab import train as vt
    from vitlab.recipes import TrainConfig

    calls: list[int] = []

    def counting() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(vt, "keep_freed_memory", counting)
    monkeypatch.setattr(vt.torch, "set_num_threads", lambda n: None)
    logs: list[str] = []
    tiny = TrainConfig(model="Ti/7", model_overrides=dict(hidden_dim=16, num_layers=1, num_heads=2, mlp_dim=32),
                       limit=64, batch_size=32, max_steps=1, threads=1)  # fmt: skip
    vt.train(tiny, tmp_path / "run", progress=False, log=logs.append)
    assert calls == [1] and any("glibc malloc keeps freed memory" in line for line in logs)


def test_a_glibc_refusing_large_mmap_thresholds_gets_32_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    """Older glibc versions refuse mmap thresholds above 32 MiB: keep_freed_memory then sets 32 MiB."""
    from vitlab import malloc

    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 0 if param == malloc.M_MMAP_THRESHOLD and value > 32 << 20 else 1

    old_libc = type("OldLibc", (), {})()
    old_libc.mallopt = mallopt

    for name in (*ENV_VARS, "VITLAB_MALLOC", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(malloc.sys, "platform", "linux")
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda name: old_libc)
    monkeypatch.setattr(malloc, "_applied", False)  # restored afterwards: this process's malloc was not touched
    assert keep_freed_memory() is True and malloc.applied()
    assert calls[-1] == (malloc.M_MMAP_THRESHOLD, 32 << 20) and len(calls) == len(malloc.SETTINGS) + 1


def test_every_cli_command_applies_it(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from vitlab import cli, malloc

    calls: list[int] = []

    def counting() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(malloc, "keep_freed_memory", counting)
    assert cli.main(["models", "--json"]) == 0
    assert calls == [1] and capsys.readouterr().out
