from __future__ import annotations

import json
import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vitlab", *args], capture_output=True, text=True, timeout=120)


def test_models_lists_presets_with_exact_parameter_counts() -> None:
    result = run("models", "--patches", "16", "32", "--json")
    assert result.returncode == 0, result.stderr
    rows = {r["name"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert rows["B/16"]["params"] == 86_567_656
    assert rows["B/32"]["params"] == 88_224_232
    assert rows["B/16"]["gflops"] == 35.13
    assert rows["Ti/16"]["tokens"] == 197


def test_models_table_and_non_square_size() -> None:
    result = run("models", "--patches", "16", "--image-size", "224x320")
    assert result.returncode == 0, result.stderr
    assert "224x320" in result.stdout and "L/16" in result.stdout


def test_usage_errors_exit_2_with_a_message() -> None:
    result = run("models", "--patches", "15")
    assert result.returncode == 2
    assert "not a multiple of patch_size 15" in result.stderr
    result = run("models", "--image-size", "big")
    assert result.returncode == 2 and "image size 'big'" in result.stderr
    result = run("no-such-command")
    assert result.returncode == 2 and "invalid choice" in result.stderr
