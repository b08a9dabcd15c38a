"""vitlab.train in process: behaviour that needs no subprocess (the CLI tests cover the rest)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from vitlab.recipes import TrainConfig
from vitlab.train import train

TINY = TrainConfig(
    model="Ti/7",
    model_overrides=dict(hidden_dim=32, num_layers=2, num_heads=2, mlp_dim=64, dropout=0.1),
    data="fashion-mnist",
    limit=640,
    batch_size=32,
    max_steps=3,
    threads=1,
)


def _hook_first_block(monkeypatch: pytest.MonkeyPatch, hook: Any) -> None:
    """Every model vitlab.train creates gets ``hook`` as a forward pre-hook on its first block."""
    import vitlab.train as vt

    create = vt.create_model

    def hooked(*args: Any, **kwargs: Any) -> Any:
        model = create(*args, **kwargs)
        model.blocks[0].register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(vt, "create_model", hooked)


def test_a_failing_torch_compile_falls_back_to_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(net: Any) -> Any:
        def fail(x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found\nmore detail")

        return fail

    monkeypatch.setattr(torch, "compile", no_compiler)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # threads=1 must not outlive the test
    logs: list[str] = []
    train(TINY.replace(compile=True), tmp_path / "compiled", progress=False, log=logs.append)
    train(TINY, tmp_path / "eager", progress=False)
    assert any("torch.compile failed (RuntimeError: InvalidCxxCompiler" in line for line in logs), logs
    # after the fallback the run is an eager one: the same weights bit for bit
    a, b = (
        load_file(str(tmp_path / "compiled" / "model.safetensors")),
        load_file(str(tmp_path / "eager" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_may_switch_on_grad_checkpointing_and_compile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    train(TINY, tmp_path / "run", progress=False)
    logs: list[str] = []
    given = TINY.replace(compile=True, lr=0.5)  # compile comes with the config, not as a runtime switch: ignored
    train(given, tmp_path / "run", resume=True, progress=False, log=logs.append, runtime={"grad_checkpointing": True})
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["grad_checkpointing"] is True and saved["compile"] is False and saved["lr"] == TINY.lr
    assert any("ignoring given compile, lr" in line for line in logs), logs
    with pytest.raises(ValueError, match="runtime switches"):
        train(TINY, tmp_path / "run", resume=True, progress=False, runtime={"lr": True})
    logs.clear()
    train(None, tmp_path / "run", resume=True, progress=False, log=logs.append)  # the saved configuration alone
    assert any("with its saved configuration" in line and "ignoring" not in line for line in logs), logs
    with pytest.raises(ValueError, match="needs a config unless it resumes"):
        train(None, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()


def test_restore_rng_reads_both_state_layouts() -> None:
    """Training states keep a dict of generator states per process; states saved before that hold the CPU
    generator's tensor alone, and both restore the CPU stream exactly."""
    from vitlab.train import Dist, _gather_rng, _restore_rng

    cpu = torch.device("cpu")
    torch.manual_seed(123)
    (saved,) = _gather_rng(Dist(rank=0, world_size=1, local_rank=0), cpu)
    assert set(saved) == {"cpu"}  # no GPU generator on a CPU run
    expected = torch.rand(5)
    for layout in (saved, saved["cpu"]):
        torch.manual_seed(0)
        _restore_rng(layout, cpu)
        torch.testing.assert_close(torch.rand(5), expected, rtol=0, atol=0)


def test_every_named_recipe_resolves_to_a_buildable_model() -> None:
    """Each recipe is a valid TrainConfig under its own name, and its architecture builds for its data
    (28x28 grey for the Fashion-MNIST recipes; the paper and DeiT recipes are for ImageNet-style folders given
    with --data, at the preset's own size)."""
    from vitlab.config import ViTConfig
    from vitlab.recipes import RECIPES, get_recipe

    for name in RECIPES:
        c = get_recipe(name)
        assert c.recipe == name
        size = dict(image_size=28, in_channels=1, num_classes=10) if name.startswith("fashion-mnist") else {}
        config = ViTConfig.from_name(c.model, **size, **c.model_overrides)
        assert config.num_patches >= 1
    long = get_recipe("fashion-mnist-2h")
    assert long.model_overrides["patch_size"] == 4 and long.ema_decay and long.augment.crop == "pad"
    assert long.model_overrides["patch_dropout"] == 0.5 and long.epochs == 100
    ten = get_recipe("fashion-mnist")  # the 10-minute recipe of docs/results.md
    assert ten.model_overrides["patch_size"] == 4 and ten.model_overrides["patch_dropout"] == 0.75
    assert ten.epochs == 19 and ten.full_patch_epochs == 1 and ten.optimizer == "muon" and ten.momentum is None
    demo = get_recipe("fashion-mnist-demo")
    assert demo.optimizer == "muon" and demo.epochs == 4 and long.optimizer == "adamw"
    # the budgets, with room for the final validation pass: 5 minutes, 10 minutes, 2 hours
    assert (demo.time_budget, ten.time_budget, long.time_budget) == (285, 590, 7150)


def test_patch_dropout_trains_and_is_not_inherited_by_a_fine_tuning_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    dropped = TINY.replace(model_overrides={**TINY.model_overrides, "patch_dropout": 0.5})
    result = train(dropped, tmp_path / "pd", progress=False)
    assert result.step == 3 and result.test is not None and 0.0 <= result.test["top1"] <= 1.0
    assert json.loads((tmp_path / "pd" / "config.json").read_text())["architecture"]["patch_dropout"] == 0.5
    train(TINY.replace(init_from=str(tmp_path / "pd"), max_steps=1), tmp_path / "ft", progress=False)
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["architecture"]["patch_dropout"] == 0.0
    again = dropped.replace(init_from=str(tmp_path / "pd"), max_steps=1)  # unless the fine-tuning recipe asks
    train(again, tmp_path / "ft-pd", progress=False)
    assert json.loads((tmp_path / "ft-pd" / "config.json").read_text())["architecture"]["patch_dropout"] == 0.5


def test_keep_head_continues_the_classifier_at_a_new_resolution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """init_from zero-initialises a new head (the paper's transfer); keep_head continues the checkpoint's own
    head on the same classes, e.g. after training at a lower resolution, and refuses a head for other classes."""
    import vitlab

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    train(TINY.replace(image_size=14), tmp_path / "low", progress=False)  # 2 x 2 patches of 7
    source = load_file(str(tmp_path / "low" / "model.safetensors"))["head.weight"]
    assert source.abs().max() > 1e-3  # trained away from its zero start
    still = TINY.replace(init_from=str(tmp_path / "low"), lr=1e-9, max_steps=1)  # 28x28: 4 x 4 patches
    train(still.replace(keep_head=True), tmp_path / "kept", progress=False)
    train(still, tmp_path / "new", progress=False)
    kept = load_file(str(tmp_path / "kept" / "model.safetensors"))
    new = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert kept["pos_embed"].shape[1] == 1 + 16  # the positions were resampled to the new grid
    torch.testing.assert_close(kept["head.weight"], source, rtol=0, atol=1e-6)
    assert new["head.weight"].abs().max() < 1e-6

    with pytest.raises(ValueError, match="keep_head needs init_from"):
        TINY.replace(keep_head=True)
    other = vitlab.create_model("Ti/7", image_size=28, in_channels=1, hidden_dim=32, num_layers=2, num_heads=2,
                                mlp_dim=64, num_classes=3)  # fmt: skip
    other.save_pretrained(tmp_path / "three")
    with pytest.raises(ValueError, match=r"has 3 output.*10 classes"):
        train(still.replace(init_from=str(tmp_path / "three"), keep_head=True), tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "run_config.json").exists()  # refused before the run folder is written
    with pytest.raises(ValueError, match=r"drop the model override\(s\) \['num_classes'\]"):
        train(
            still.replace(keep_head=True, model_overrides={**TINY.model_overrides, "num_classes": 10}), tmp_path / "o"
        )

    # the same count under other names (e.g. lemmas vs synset ids): kept by index, with a warning naming the first
    renamed = vitlab.from_pretrained(tmp_path / "low")
    names = list(renamed.class_names or [])
    renamed.class_names = [*names[:3], "sweater", *names[4:]]
    renamed.save_pretrained(tmp_path / "renamed")
    logs: list[str] = []
    train(
        still.replace(init_from=str(tmp_path / "renamed"), keep_head=True),
        tmp_path / "r",
        progress=False,
        log=logs.append,
    )
    assert any("1 of 10 class names differ" in line and "index 3 ('sweater' vs 'Dress')" in line for line in logs), logs

    # a pre-logits layer (representation_size) stays with the head it feeds
    pre = vitlab.create_model("Ti/7", image_size=28, in_channels=1, hidden_dim=32, num_layers=2, num_heads=2,
                              mlp_dim=64, num_classes=10, representation_size=16)  # fmt: skip
    pre.class_names = renamed.class_names
    with torch.no_grad():
        pre.head.weight.normal_()  # type: ignore[operator]
    pre.save_pretrained(tmp_path / "pre")
    train(still.replace(init_from=str(tmp_path / "pre"), keep_head=True), tmp_path / "p", progress=False)
    kept_pre = vitlab.from_pretrained(tmp_path / "p")
    assert kept_pre.config.representation_size == 16
    torch.testing.assert_close(kept_pre.state_dict()["head.weight"], pre.state_dict()["head.weight"], rtol=0, atol=1e-6)


def test_full_patch_epochs_train_the_last_epochs_on_every_patch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With patch dropout 0.5 the blocks see 1 + 8 of the 16 patch tokens, after the switch all 1 + 16, also
    when the run is resumed past the switch."""
    import os
    import signal

    from vitlab.train import TrainingInterrupted

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    seen: list[int] = []

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            seen.append(args[0].shape[1])
            if len(seen) == 30:  # a SIGTERM during step 30: the run saves after it and stops
                os.kill(os.getpid(), signal.SIGTERM)

    _hook_first_block(monkeypatch, record)
    # 576 training images in batches of 32: 18 steps per epoch, 36 in all, the last 9 on every patch
    dropped = TINY.replace(
        model_overrides={**TINY.model_overrides, "patch_dropout": 0.5}, max_steps=None, epochs=2, full_patch_epochs=0.5
    )
    logs: list[str] = []
    with pytest.raises(TrainingInterrupted):
        train(dropped, tmp_path / "run", progress=False, log=logs.append)
    assert seen == [1 + 8] * 27 + [1 + 16] * 3
    assert any("step 27: patch dropout off for the last 9 steps" in line for line in logs), logs
    result = train(None, tmp_path / "run", resume=True, progress=False)
    assert result.step == 36 and seen == [1 + 8] * 27 + [1 + 16] * 9

    with pytest.raises(ValueError, match="full_patch_epochs must be >= 0"):
        TINY.replace(full_patch_epochs=-1)
    # moot, said and ignored: nothing to turn off, or no step left with patch dropout (a quick --max-steps try)
    seen.clear()
    logs.clear()
    train(TINY.replace(full_patch_epochs=1), tmp_path / "none", progress=False, log=logs.append)
    assert seen == [1 + 16] * 3 and any("has nothing to turn off" in line for line in logs), logs
    seen.clear()
    train(dropped.replace(max_steps=4), tmp_path / "short", progress=False, log=logs.append)
    assert seen == [1 + 8] * 4 and any("(9 steps) is not shorter than the run (4 steps)" in line for line in logs)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["architecture"]
    assert saved["patch_dropout"] == 0.5  # the saved model says how it was trained, switch or not


def test_amp_auto_means_bf16_on_cpus_with_amx_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from vitlab import train as vt

    cpu = torch.device("cpu")
    assert vt.uses_bf16("bf16", cpu) and not vt.uses_bf16("none", cpu)
    monkeypatch.setattr(vt, "onednn_bf16_enabled", lambda: True)
    for amx in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        assert vt.cpu_has_amx() is amx
        assert vt.uses_bf16("auto", cpu) is amx
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(vt, "onednn_bf16_enabled", lambda: False)  # AMX, but no oneDNN bf16 GEMM: fp32
    assert vt.cpu_has_amx() and not vt.uses_bf16("auto", cpu)
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the (private) probe: fp32
    assert not vt.cpu_has_amx() and not vt.uses_bf16("auto", cpu)


def test_a_muon_run_saves_both_kinds_of_optimiser_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--optimizer muon: the blocks' matrices keep Muon momentum, everything else AdamW moments, and both are
    in the training state that --resume reads."""
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    result = train(TINY.replace(optimizer="muon"), tmp_path / "muon", progress=False)
    assert result.step == 3 and result.test is not None
    saved = torch.load(tmp_path / "muon" / "training_state.pt", weights_only=True)["optimizer"]  # as --resume reads it
    kinds = [(g["muon"], len(g["params"])) for g in saved["param_groups"]]
    assert kinds[0] == (True, 8)  # 2 blocks x (qkv, proj, fc1, fc2)
    assert all(not muon for muon, _ in kinds[1:])
    muon_ids = set(saved["param_groups"][0]["params"])
    for pid, state in saved["state"].items():
        assert set(state) == ({"momentum_buffer"} if pid in muon_ids else {"step", "exp_avg", "exp_avg_sq"})
        assert int(state.get("step", 3)) == 3


class _Clock:
    """A stand-in for ``time`` in vitlab.train: only training forwards advance it, by ``per_step`` seconds."""

    def __init__(self, per_step: float) -> None:
        self.now, self.per_step = 1000.0, per_step

    def perf_counter(self) -> float:
        return self.now

    def tick(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        if module.training:
            self.now += self.per_step


def test_a_time_budget_fits_the_run_and_stops_it_when_spent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps cost 1/8 s of a fake clock (validation and checkpoints nothing): the fit after 23 steps (3 at the
    start skipped, 20 measured) leaves 2.125 s of the 5 s budget, 17 more steps. A SIGTERM at step 30 saves;
    the resumed run keeps the fitted 40 steps and the seconds already spent. Slowed to 1/2 s per step, a
    second run stops once the budget is spent, before its fitted end."""
    import os
    import signal
    import types

    import vitlab.train as vt
    from vitlab.train import TrainingInterrupted

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    clock = _Clock(0.125)
    monkeypatch.setattr(vt, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    forwards: list[int] = []

    def tick_and_maybe_stop(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        clock.tick(module, args)
        if module.training:
            forwards.append(1)
            if len(forwards) == 30 and stop_at_30:
                os.kill(os.getpid(), signal.SIGTERM)
            if len(forwards) > 30 and slow_after_30:
                clock.now += 0.375  # 1/2 s per step in all

    _hook_first_block(monkeypatch, tick_and_maybe_stop)
    # 576 training images in batches of 32: 18 steps per epoch; 5 epochs (90 steps) is the cap
    budgeted = TINY.replace(max_steps=None, epochs=5, time_budget=5.0)
    stop_at_30, slow_after_30 = True, False
    logs: list[str] = []
    with pytest.raises(TrainingInterrupted):
        train(budgeted, tmp_path / "run", progress=False, log=logs.append)
    assert any("step 23: time budget 5 s, 2.9 s spent" in line and "40 of 90 steps fit" in line for line in logs), logs
    stop_at_30 = False
    result = train(None, tmp_path / "run", resume=True, progress=False)
    assert result.step == 40 and len(forwards) == 40
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["time_budget"] == 5.0 and saved["stopped_by_time_budget"] is False
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["total"] == 40 and state["budget_fitted"] and state["train_seconds"] == 40 * 0.125

    forwards.clear()
    slow_after_30 = True  # 30 steps spend 3.75 s; at 1/2 s each, steps 31 and 32 reach 4.75 s, step 33 5.25 s
    logs.clear()
    result = train(budgeted, tmp_path / "slow", progress=False, log=logs.append)
    assert result.step == 33
    assert any("step 33: the time budget of 5 s is spent: stopping 7 early" in line for line in logs), logs
    assert json.loads((tmp_path / "slow" / "results.json").read_text())["stopped_by_time_budget"] is True
    resumed = train(None, tmp_path / "slow", resume=True, progress=False)  # spent stays spent: no more steps
    assert resumed.step == 33 and len(forwards) == 33
    assert json.loads((tmp_path / "slow" / "results.json").read_text())["stopped_by_time_budget"] is True

    with pytest.raises(ValueError, match="time_budget must be > 0"):
        TINY.replace(time_budget=0)


def test_a_time_budget_is_fitted_again_at_each_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fitted at 1/8 s per step after 23 steps (57 more fit the 10 s budget: 80 of 90), the steps then get
    twice as fast: at the validation after step 36 the rest of the epochs fit again, and the run ends at the
    cap of 90 steps."""
    import types

    import vitlab.train as vt

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    clock = _Clock(0.125)
    monkeypatch.setattr(vt, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))

    def tick(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        clock.tick(module, args)
        if clock.now >= 1000.0 + 23 * 0.125:
            clock.per_step = 0.0625

    _hook_first_block(monkeypatch, tick)
    logs: list[str] = []
    result = train(
        TINY.replace(max_steps=None, epochs=5, time_budget=10.0), tmp_path / "run", progress=False, log=logs.append
    )
    assert any("step 23: time budget 10 s" in line and "80 of 90 steps fit" in line for line in logs), logs
    assert any("step 36: 3.7 of 10 s spent, a step takes 62 ms: 90 steps fit (was 80)" in line for line in logs), logs
    assert result.step == 90
