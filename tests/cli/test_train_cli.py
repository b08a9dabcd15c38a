"""`vitlab train` end to end on a slice of real Fashion-MNIST and on image folders the tests create."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import vitlab

TINY = [
    "--data", "fashion-mnist", "--limit", "640", "--batch-size", "32", "--no-progress",
    "--model", "Ti/7", "--set", "model.hidden_dim=32", "--set", "model.num_layers=2", "--set", "model.num_heads=2",
    "--set", "model.mlp_dim=64", "--threads", "1", "--no-compile",
]  # fmt: skip


def vitlab_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "vitlab", *args]


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(vitlab_cmd(*args), capture_output=True, text=True, timeout=timeout)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_short_run_writes_a_loadable_model_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run("train", *TINY, "--max-steps", "6", "--out", str(out), "--set", "eval_every=0.5")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["step"] == 6 and 0.0 <= summary["test_top1"] <= 1.0
    for name in ("config.json", "model.safetensors", "training_state.pt", "run_config.json", "metrics.jsonl",
                 "results.json", "curves.png"):  # fmt: skip
        assert (out / name).is_file(), name
    model = vitlab.from_pretrained(out)
    assert model.config.in_channels == 1 and model.config.num_classes == 10
    assert model.class_names is not None and model.class_names[0] == "T-shirt/top"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert any("val_top1" in r for r in rows) and rows[-1].get("final") is True
    config = json.loads((out / "run_config.json").read_text())
    assert config["max_steps"] == 6 and config["model_overrides"]["hidden_dim"] == 32
    # state is readable without unpickling code
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["step"] == 6


def test_out_holding_a_run_is_refused_without_resume_or_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("train", *TINY, "--max-steps", "1", "--out", str(out)).returncode == 0
    r = run("train", *TINY, "--max-steps", "1", "--out", str(out))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = run("train", *TINY, "--max-steps", "2", "--out", str(tmp_path / "empty"), "--resume")
    assert r.returncode == 2 and "no training_state.pt" in r.stderr
    assert run("train", *TINY, "--max-steps", "1", "--out", str(out), "--overwrite").returncode == 0


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "training_state.pt").is_file():
            try:
                if torch.load(out / "training_state.pt", weights_only=True)["step"] >= step:
                    return
            except Exception:  # being replaced right now
                pass
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("training did not reach the step in time")


@pytest.mark.parametrize(("how", "optimizer"), [("sigterm", "adamw"), ("kill9", "adamw"), ("sigterm", "muon")])
def test_interrupted_and_resumed_equals_uninterrupted(tmp_path: Path, how: str, optimizer: str) -> None:
    args = [*TINY, "--max-steps", "14", "--checkpoint-every", "1", "--set", "augment.random_erasing=0.5",
            "--set", "model.drop_path=0.1", "--optimizer", optimizer]  # fmt: skip
    full = tmp_path / "full"
    assert run("train", *args, "--out", str(full)).returncode == 0

    part = tmp_path / "part"
    proc = subprocess.Popen(vitlab_cmd("train", *args, "--out", str(part)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_step(part, 4, proc)
    if how == "sigterm":
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert "--resume continues" in err
    else:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    stopped_at = torch.load(part / "training_state.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < 14
    vitlab.from_pretrained(part)  # the run folder holds a whole model at any moment
    r = run("train", "--out", str(part), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 15))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = run("train", *TINY, "--max-steps", "30", "--lr", "1e30", "--set", "clip_grad=null", "--out", str(out),
            "--checkpoint-every", "1", "--set", "warmup_steps=0")  # fmt: skip
    assert r.returncode == 1, r.stderr
    assert "non-finite" in r.stderr
    if (out / "model.safetensors").is_file():
        for k, v in weights(out).items():
            assert torch.isfinite(v).all(), k


def _make_folder(root: Path, classes: dict[str, int], size: tuple[int, int] = (16, 16)) -> None:
    g = torch.Generator().manual_seed(0)
    for i, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(count):
            base = torch.full((size[1], size[0], 3), 40 + 80 * i, dtype=torch.uint8)
            noise = torch.randint(0, 40, base.shape, generator=g, dtype=torch.uint8)
            Image.fromarray((base + noise).numpy()).save(root / name / f"{j}.png")


def test_trains_on_an_image_folder_with_an_unreadable_file(tmp_path: Path) -> None:
    data = tmp_path / "images"
    _make_folder(data / "train", {"cat": 40, "dog": 40})
    _make_folder(data / "val", {"cat": 8, "dog": 8})
    (data / "train" / "cat" / "broken.png").write_bytes(b"not an image")
    r = run("train", "--data", str(data), "--model", "Ti/8", "--set", "model.hidden_dim=32",
            "--set", "model.num_layers=1", "--set", "model.num_heads=2", "--set", "model.mlp_dim=64",
            "--batch-size", "16", "--max-steps", "4", "--out", str(tmp_path / "run"), "--no-progress",
            "--no-compile")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "skipped 1 unreadable file" in r.stderr and "broken.png" in r.stderr
    model = vitlab.from_pretrained(tmp_path / "run")
    assert model.class_names == ["cat", "dog"] and model.config.image_size == (16, 16)


@pytest.mark.parametrize("layout", [{}, {"only": 10}], ids=["empty", "single-class"])
def test_bad_folders_give_a_clear_error(tmp_path: Path, layout: dict[str, int]) -> None:
    data = tmp_path / "images"
    data.mkdir()
    _make_folder(data, layout)
    r = run("train", "--data", str(data), "--max-steps", "1", "--out", str(tmp_path / "run"), "--no-progress")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and str(data) in r.stderr


def test_fine_tune_from_a_checkpoint_resamples_and_zero_inits_the_head(tmp_path: Path) -> None:
    src = vitlab.create_model("Ti/8", image_size=32, hidden_dim=32, num_layers=1, num_heads=2, mlp_dim=64,
                              num_classes=3)  # fmt: skip
    src.save_pretrained(tmp_path / "src")
    r = run("train", "--recipe", "paper-finetune", "--init-from", str(tmp_path / "src"), "--data", "fashion-mnist",
            "--limit", "256", "--image-size", "32", "--batch-size", "16", "--accum-steps", "2", "--max-steps", "2",
            "--set", "warmup_steps=1", "--out", str(tmp_path / "ft"), "--no-progress")  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = vitlab.from_pretrained(tmp_path / "ft")
    assert model.config.num_classes == 10 and model.config.in_channels == 1 and model.config.image_size == (32, 32)
    config = json.loads((tmp_path / "ft" / "run_config.json").read_text())
    assert config["optimizer"] == "sgd" and config["weight_decay"] == 0.0 and config["accum_steps"] == 2


def test_two_processes_with_torchrun_over_loopback(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", "29517", "-m", "vitlab", "train", *TINY, "--max-steps", "3", "--accum-steps", "2",
           "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (summary,) = [json.loads(line) for line in r.stdout.splitlines()]  # rank 0's alone
    assert summary["step"] == 3 and summary["test_top1"] is not None
    state = torch.load(out / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
    vitlab.from_pretrained(out)


_DIE_IN_THIRD_STATE_WRITE = """
import os, signal, sys, torch
real_save, calls = torch.save, []
def dying_save(obj, f, *args, **kwargs):
    calls.append(f)
    if len(calls) == 3:  # the third state write (after step 0 and step 1): leave half a file, die like kill -9
        with open(f, "wb") as handle:
            handle.write(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = dying_save
from vitlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    args = [*TINY, "--max-steps", "6", "--checkpoint-every", "1"]
    full = tmp_path / "full"
    assert run("train", *args, "--out", str(full)).returncode == 0
    part = tmp_path / "part"
    r = subprocess.run([sys.executable, "-c", _DIE_IN_THIRD_STATE_WRITE, "train", *args, "--out", str(part)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert torch.load(part / "training_state.pt", weights_only=True)["step"] == 1  # the second write, whole
    vitlab.from_pretrained(part)
    r = run("train", "--out", str(part), "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    a, b = weights(full), weights(part)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--set", "lr=abc"], "lr='abc' is not a float"),
        (["--set", "batch_size=1.5"], "batch_size=1.5 is not a int"),
        (["--set", "augment.scale=0.5"], "scale=0.5 is not a tuple"),
        (["--set", "optimizer=lamb"], "optimizer='lamb' is not a Literal"),
        (["--accum-steps", "64"], "fewer than accum_steps=64"),
        (["--set", "model_overrides=3"], "model_overrides needs a JSON object"),
        (["--keep-head"], "keep_head needs init_from"),
    ],
)
def test_bad_training_settings_exit_2_with_a_message(tmp_path: Path, flags: list[str], message: str) -> None:
    r = run("train", *TINY, "--max-steps", "2", *flags, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("recipe", ["paper-finetune", "paper-pretrain", "deit"])
def test_imagenet_style_recipes_ask_for_data(tmp_path: Path, recipe: str) -> None:
    r = run("train", "--recipe", recipe, "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    assert f"recipe '{recipe}' has no default dataset: name one with --data" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()


def test_set_model_overrides_replaces_the_recipes_model_fields() -> None:
    r = run(
        "train", "--recipe", "fashion-mnist-demo", "--print-config",  # no --out needed to print
        "--set", "model.mlp_dim=512", "--set", 'model_overrides={"num_layers": 8}',
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_overrides"] == {"num_layers": 8, "mlp_dim": 512}


def test_another_model_keeps_only_the_recipes_regularisation() -> None:
    r = run("train", "--recipe", "fashion-mnist", "--model", "S/16", "--print-config")
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)
    assert config["model"] == "S/16" and config["model_overrides"] == {"patch_dropout": 0.75}  # no width, depth, patch


@pytest.mark.parametrize("resume", [False, True])
def test_training_or_resuming_without_out_is_a_usage_error(resume: bool) -> None:
    r = run("train", *TINY, "--max-steps", "1", *(["--resume", "--print-config"] if resume else []))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"--out is required: the run folder to {'resume' if resume else 'write'}" in r.stderr


def test_grad_checkpointing_trains_the_same_weights(tmp_path: Path) -> None:
    dropout = ["--set", "model.dropout=0.1", "--set", "model.drop_path=0.1", "--max-steps", "4"]
    plain = run("train", *TINY, *dropout, "--out", str(tmp_path / "plain"))
    ckpt = run("train", *TINY, *dropout, "--grad-checkpointing", "--out", str(tmp_path / "ckpt"))
    assert plain.returncode == 0 and ckpt.returncode == 0, plain.stderr + ckpt.stderr
    assert json.loads((tmp_path / "ckpt" / "run_config.json").read_text())["grad_checkpointing"] is True
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "ckpt")
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, msg=name)


def test_resume_names_the_result_changing_settings_it_ignores_without_validating_them(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("train", *TINY, "--max-steps", "2", "--grad-checkpointing", "--out", str(out)).returncode == 0
    before = weights(out)
    # --keep-head without --init-from would be refused on a new run; on resume it is only named as ignored
    given = ["--recipe", "deit", "--keep-head", "--lr", "5", "--set", "seed=3"]
    r = run("train", "--out", str(out), "--resume", "--print-config", "--no-grad-checkpointing", *given)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)  # the saved run's configuration, not the given recipe's
    assert shown["recipe"] == "fashion-mnist-demo" and shown["lr"] != 5 and shown["grad_checkpointing"] is False
    assert shown == {**json.loads((out / "run_config.json").read_text()), "grad_checkpointing": False}
    r = run("train", "--out", str(out), "--resume", "--no-progress", *given)
    assert r.returncode == 0, r.stderr
    assert "ignoring --recipe, --lr, --keep-head, --set seed=3" in r.stderr
    assert "ignoring given" not in r.stderr  # train() was not handed a config to compare
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["lr"] != 5 and saved["seed"] == 0 and not saved["keep_head"]
    # the run had finished: resuming it trains no step and rewrites no weights
    assert all(torch.equal(before[k], v) for k, v in weights(out).items())
    r = run("train", "--out", str(out), "--resume", "--no-progress", "--batch-size", "32", "--limit", "640")
    assert r.returncode == 0 and "ignoring" not in r.stderr  # the saved values repeated: nothing is ignored
    r = run("train", "--out", str(tmp_path / "none"), "--resume", "--print-config")
    assert r.returncode == 2 and "holds no training_state.pt" in r.stderr


def test_time_budget_flag_sets_removes_and_refuses(tmp_path: Path) -> None:
    shown = run("train", "--recipe", "fashion-mnist", "--time-budget", "60", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["time_budget"] == 60.0
    none = run("train", "--recipe", "fashion-mnist", "--set", "time_budget=null", "--print-config")
    assert none.returncode == 0 and json.loads(none.stdout)["time_budget"] is None, none.stderr
    bad = run("train", *TINY, "--time-budget", "0", "--out", str(tmp_path / "run"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr
    assert "time_budget must be > 0 seconds or None, got 0.0" in bad.stderr
    assert not (tmp_path / "run").exists()
