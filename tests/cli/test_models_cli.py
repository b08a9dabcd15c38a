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


def test_pretrained_listing_says_what_is_cached_and_refuses_preset_options(tmp_path: object) -> None:
    result = run("models", "--pretrained", "--json")
    assert result.returncode == 0, result.stderr
    first = json.loads(result.stdout.splitlines()[0])
    assert isinstance(first["cached"], bool) and first["cache_path"].endswith(first["url"].rsplit("/", 1)[-1])
    result = run("models", "--pretrained", "--image-size", "384")
    assert result.returncode == 2 and "--image-size applies to the presets" in result.stderr


def test_a_reader_that_stops_early_gets_no_traceback() -> None:
    """`vitlab models --pretrained | head -1`: the pipe is closed under the writer (here before its first line)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitlab", "models", "--pretrained"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has imported vitlab and printed anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
