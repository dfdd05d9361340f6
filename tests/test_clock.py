"""Tests of weightslab/clock.py: where the step boundaries are, on real optimizers and models."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.clock import Boundary, Deferred, StepClock, check_metrics, check_step
from weightslab.ledger import Entry


class Calls:
    def __init__(self) -> None:
        self.boundaries: list[int] = []
        self.forwards = 0

    def boundary(self, step: int) -> None:
        self.boundaries.append(step)

    def forward(self) -> None:
        self.forwards += 1


def _clock(calls: Calls, *, hooks: bool = True) -> StepClock:
    return StepClock(hooks=hooks, lock=threading.RLock(), on_boundary=calls.boundary, on_forward=calls.forward)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def _step(model: nn.Module, *optimizers: torch.optim.Optimizer) -> None:
    model(torch.ones(1, 2)).sum().backward()
    for opt in optimizers:
        opt.step()


def test_a_boundary_comes_once_every_registered_optimizer_has_stepped():
    calls, model = Calls(), nn.Linear(2, 1)
    g, d = _sgd(model), _sgd(model)  # a GAN steps two optimizers per iteration
    clock = _clock(calls)
    clock.attach(Entry("optimizer", "g", g))
    clock.attach(Entry("optimizer", "d", d))
    _step(model, g)
    assert calls.boundaries == [] and clock.optimizer_ran
    d.step()
    assert calls.boundaries == [1]  # numbered one after the last boundary (none yet)
    clock.passed(1, None)
    _step(model, g, d)
    assert calls.boundaries == [1, 2]
    clock.close()
    _step(model, g, d)
    assert calls.boundaries == [1, 2]  # closed: the hooks are gone


def test_forward_hooks_call_back_and_explicit_calls_switch_the_hooks_off():
    calls, model = Calls(), nn.Linear(2, 1)
    opt = _sgd(model)
    clock = _clock(calls)
    clock.attach(Entry("model", "main", model))
    clock.attach(Entry("optimizer", "main", opt))
    _step(model, opt)
    assert calls.forwards == 1 and calls.boundaries == [1]
    clock.defer(Deferred(1, ("step",), (), {}))
    inherited = clock.explicit_call()  # the loop's own call supersedes the hook's pending save
    assert inherited is not None and inherited.step == 1 and clock.deferred is None
    assert clock.last is None  # the loop's labels replace the hooks' count
    _step(model, opt)
    assert calls.boundaries == [1]  # explicit from now on


def test_a_deferred_save_is_dropped_with_one_warning_when_no_forward_came(caplog):
    calls, model = Calls(), nn.Linear(2, 1)
    opt = _sgd(model)
    clock = _clock(calls)
    clock.attach(Entry("optimizer", "main", opt))
    for _ in range(3):
        clock.defer(Deferred(7, ("step",), (), {}))
        _step(model, opt)
    assert clock.deferred is None
    assert caplog.text.count("the checkpoint of step 7 was dropped") == 1


def test_no_hooks_when_asked_for_none():
    calls, model = Calls(), nn.Linear(2, 1)
    opt = _sgd(model)
    clock = _clock(calls, hooks=False)
    clock.attach(Entry("optimizer", "main", opt))
    _step(model, opt)
    assert calls.boundaries == [] and clock.hooked_optimizers == 0
    # A loop with no hooked optimizer reports its steps itself: its last one is taken at its word.
    assert clock.why_the_state_may_not_be_the_last_step() is None


def test_why_the_state_may_have_moved_past_the_last_boundary():
    calls, model = Calls(), nn.Linear(2, 1)
    opt = _sgd(model)
    clock = _clock(calls)
    clock.attach(Entry("optimizer", "main", opt))
    clock.explicit_call()
    clock.passed(5, {"loss": 1.0})
    assert clock.why_the_state_may_not_be_the_last_step() is None
    assert clock.last == Boundary(5, {"loss": 1.0})
    _step(model, opt)  # an optimizer step after the boundary of step 5
    assert "after the last step boundary (step 5)" in clock.why_the_state_may_not_be_the_last_step()
    clock.restart(9)  # a resume: the objects hold step 9 exactly
    assert clock.last == Boundary(9) and clock.why_the_state_may_not_be_the_last_step() is None


@pytest.mark.parametrize("bad", [1.5, "3", True, None, -1])
def test_check_step_refuses_what_is_not_a_step(bad):
    with pytest.raises(wl.InvalidStepError):
        check_step(bad)


def test_check_step_and_metrics_take_what_a_loop_passes():
    assert check_step(torch.tensor(4)) == 4
    assert check_metrics({"loss": torch.tensor(0.5), "acc": 1}) == {"loss": 0.5, "acc": 1.0}
    assert check_metrics({"loss": float("nan")}) == {"loss": {"__wl__": "float", "value": "nan"}}
    with pytest.raises(wl.InvalidMetricsError, match="loss.item"):
        check_metrics({"loss": [1.0]})
