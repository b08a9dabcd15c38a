"""Fitting a training run's length to a wall-clock budget (``TrainConfig.time_budget``).

A run with a budget starts with the step count its epochs (or ``max_steps``) give: the budget can shorten a run,
never lengthen it. Some steps in, once compilation is behind it, the run measures what an optimiser step, a
validation pass and a checkpoint cost on this machine and keeps the largest step count whose predicted time fits
what is left of the budget. The learning-rate schedule (the warm-up aside, which is in steps) and the closing
full-patch share then run over that count, and the count is saved with the run, so ``--resume`` continues the same
schedule. Should the machine slow down after the fit, the run still stops once the budget is spent.

What the fit predicts, from the end of the current step to the end of the run: the remaining steps at the measured
cost (the full-patch ones at that cost times the ratio of their encoder FLOPs, :func:`full_patch_cost_ratio`,
plus one more compilation if the model is compiled), the validation passes and the checkpoints still to come.
The fitted length depends on the machine's speed and load, so a budgeted run is reproducible only where the
budget does not bind (or by resuming the saved run).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Costs:
    """Seconds of each kind of work in a training run, as measured on this machine."""

    step: float  # one optimiser step of the phase measured (patch dropout on, if the model drops patches)
    full_patch_ratio: float = 1.0  # a full-patch step's cost over a measured step's
    recompile: float = 0.0  # compiling again for the full-patch sequence length
    validation: float = 0.0
    checkpoint: float = 0.0

    def __post_init__(self) -> None:
        if self.step <= 0 or self.full_patch_ratio <= 0:
            raise ValueError(f"step cost and full-patch ratio must be > 0, got {self.step}, {self.full_patch_ratio}")
        if min(self.recompile, self.validation, self.checkpoint) < 0:
            raise ValueError("recompile, validation and checkpoint costs must be >= 0")


@dataclass(frozen=True)
class Schedule:
    """The parts of a run's length a budget changes: optimiser steps in all, the last of them on every patch."""

    total: int
    full_patch: int = 0


def full_patch_cost_ratio(patches: int, kept: int, prefix: int, width: int, mlp: int) -> float:
    """FLOPs of an encoder block on all ``patches`` tokens over those on the ``kept`` ones (``prefix`` class
    and register tokens always included): per token the four attention projections and the MLP (4 D^2 + 2 D M
    multiply-adds), plus the attention scores and their weighted sum (2 T D per token for T tokens). An upper
    bound of the measured ratio: fixed per-step work (optimiser, data, kernel launches) does not grow with T."""
    if not 0 < kept <= patches:
        raise ValueError(f"kept patches must be in [1, {patches}], got {kept}")

    def cost(tokens: int) -> float:
        return tokens * (4 * width * width + 2 * width * mlp + 2 * tokens * width)

    return cost(patches + prefix) / cost(kept + prefix)


def _ends_between(step: int, total: int, every: int, also: int | None = None) -> int:
    """How many of the steps step+1 .. total are a multiple of ``every`` or of ``also``, or ``total`` itself."""

    def multiples(k: int) -> int:
        return total // k - step // k

    count = multiples(every)
    if also:
        count += multiples(also) - multiples(math.lcm(every, also))  # a step that is both counts once
    last_counted = total % every == 0 or bool(also and total % also == 0)
    return count + (0 if last_counted else 1)


def predicted_seconds(
    step: int,
    plan: Schedule,
    costs: Costs,
    *,
    eval_every: int,
    steps_per_epoch: int,
    checkpoint_every: int | None = None,
    dropping: bool = True,
) -> float:
    """Seconds from the end of ``step`` to the end of a run planned as ``plan`` (validation after every
    ``eval_every`` steps and at the last one; a checkpoint at each epoch end, every ``checkpoint_every`` steps
    and at the last one). ``dropping``: the model still drops patches, so full-patch steps still to come
    start with a compilation."""
    if step >= plan.total:
        return 0.0
    switch = plan.total - plan.full_patch  # the first step on every patch
    normal = max(0, switch - step)
    full = plan.total - max(step, switch)
    seconds = normal * costs.step + full * costs.step * costs.full_patch_ratio
    if full and dropping:
        seconds += costs.recompile
    seconds += _ends_between(step, plan.total, eval_every) * costs.validation
    saves = _ends_between(step, plan.total, steps_per_epoch, checkpoint_every)
    return seconds + saves * costs.checkpoint


def fit(
    step: int,
    cap: Schedule,
    seconds_left: float,
    costs: Costs,
    *,
    eval_every: int,
    steps_per_epoch: int,
    checkpoint_every: int | None = None,
) -> Schedule:
    """The longest run of at most ``cap.total`` steps, its full-patch share scaled with it, whose predicted
    time from the end of ``step`` (the model still dropping patches) fits ``seconds_left``; ``step + 1`` steps
    (one more, on the patches it trains on now) if none fits."""

    def plan(total: int) -> Schedule:
        full = round(cap.full_patch * total / cap.total) if cap.full_patch else 0
        return Schedule(total, min(full, total - step))  # a switch in the past: the rest on every patch

    def fits(total: int) -> bool:
        return (
            predicted_seconds(
                step,
                plan(total),
                costs,
                eval_every=eval_every,
                steps_per_epoch=steps_per_epoch,
                checkpoint_every=checkpoint_every,
            )
            <= seconds_left
        )

    lo, hi = step + 1, cap.total  # the prediction grows with the total: bisect for the last that fits
    if hi <= lo:
        return cap  # at most one step left: nothing to shorten
    if fits(hi):
        return plan(hi)
    if not fits(lo):
        return Schedule(lo)  # not a compilation for one step on every patch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return plan(lo)
