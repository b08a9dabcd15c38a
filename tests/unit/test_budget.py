"""vitlab.budget: the prediction a time budget's fit rests on, and the fit itself."""

from __future__ import annotations

import pytest

from vitlab.budget import Costs, Schedule, fit, full_patch_cost_ratio, predicted_seconds


def test_prediction_counts_steps_validations_checkpoints_and_the_full_patch_phase() -> None:
    costs = Costs(step=1.0, full_patch_ratio=3.0, recompile=10.0, validation=5.0, checkpoint=0.5)
    # from the end of step 10 to step 40 of a run of 10 steps per epoch, validation every 20, last 10 on every patch:
    # 20 steps at 1 s, 10 at 3 s, one recompile, validations after 20 and 40, checkpoints after 20, 30 and 40
    seconds = predicted_seconds(10, Schedule(40, 10), costs, eval_every=20, steps_per_epoch=10)
    assert seconds == 20 + 30 + 10 + 2 * 5 + 3 * 0.5
    # already on every patch: no recompile; validated and saved after step 40 and again at the last, 41
    on_every_patch = predicted_seconds(35, Schedule(41, 10), costs, eval_every=20, steps_per_epoch=10, dropping=False)
    assert on_every_patch == 6 * 3 + 2 * 5 + 2 * 0.5
    # at the switch, still dropping: the next step compiles for the longer sequence
    assert (
        predicted_seconds(31, Schedule(41, 10), costs, eval_every=20, steps_per_epoch=10)
        == 10 * 3 + 10 + 2 * 5 + 2 * 0.5
    )
    assert predicted_seconds(5, Schedule(10), Costs(step=2.0), eval_every=3, steps_per_epoch=100) == 10.0
    # every checkpoint_every steps on top of the epoch ends
    extra = predicted_seconds(
        0, Schedule(10), Costs(step=1.0, checkpoint=1.0), eval_every=100, steps_per_epoch=100, checkpoint_every=4
    )
    assert extra == 10 + 1 + 2
    # a step that is an epoch end and a checkpoint_every multiple is one checkpoint: 4, 8, 10 (epoch), 12, 16, 20
    both = predicted_seconds(
        0, Schedule(20), Costs(step=1.0, checkpoint=1.0), eval_every=100, steps_per_epoch=10, checkpoint_every=4
    )
    assert both == 20 + 6
    assert predicted_seconds(10, Schedule(10), costs, eval_every=1, steps_per_epoch=1) == 0.0


def test_fit_keeps_the_longest_run_that_fits_and_scales_its_full_patch_share() -> None:
    kw: dict[str, int] = {"eval_every": 1000, "steps_per_epoch": 1000}
    costs = Costs(step=0.5)
    # 100 s left at 0.5 s per step after step 20: 200 more steps, plus the final validation/checkpoint (free here)
    assert fit(20, Schedule(1000), 100.0, costs, **kw) == Schedule(220)
    assert fit(20, Schedule(100), 100.0, costs, **kw) == Schedule(100)  # the cap: a budget never lengthens a run
    assert fit(20, Schedule(1000), 0.1, costs, **kw) == Schedule(21)  # nothing fits: one more step, then stop
    assert fit(99, Schedule(100), 0.0, costs, **kw) == Schedule(100)
    # a tenth on every patch at twice the cost: the fitted run keeps a tenth of itself on every patch
    plan = fit(0, Schedule(1000, 100), 110.0, Costs(step=0.1, full_patch_ratio=2.0), **kw)
    assert plan == Schedule(1000, 100)
    plan = fit(0, Schedule(1000, 100), 55.0, Costs(step=0.1, full_patch_ratio=2.0), **kw)
    assert plan == Schedule(500, 50)
    over = predicted_seconds(
        0, Schedule(501, 50), Costs(step=0.1, full_patch_ratio=2.0), eval_every=1000, steps_per_epoch=1000
    )
    assert over > 55.0
    # nothing fits: one more step on the patches trained on now, not a compilation for one full-patch step
    slow = Costs(step=0.17, full_patch_ratio=4.0, recompile=60.0)
    assert fit(175, Schedule(7999, 421), 0.1, slow, **kw) == Schedule(176)
    # a late fit whose scaled switch would be behind the current step: the rest of the run on every patch
    assert fit(100, Schedule(1000, 500), 50.0, Costs(step=1.0), **kw) == Schedule(150, 50)


def test_full_patch_cost_ratio_follows_the_encoder_flops() -> None:
    assert full_patch_cost_ratio(16, 16, 1, 128, 256) == 1.0
    # 4x4 patches on 28x28 (49), a quarter kept (12), class token: between the token ratio and its square root
    ratio = full_patch_cost_ratio(49, 12, 1, 128, 256)
    assert 50 / 13 < ratio < (50 / 13) ** 1.5
    with pytest.raises(ValueError, match="kept patches"):
        full_patch_cost_ratio(49, 0, 1, 128, 256)
    with pytest.raises(ValueError, match="must be > 0"):
        Costs(step=0.0)
