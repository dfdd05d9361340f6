"""Tests of weightslab/triggers.py: the pure save-policy decision."""

from __future__ import annotations

import dataclasses

import pytest

from weightslab.triggers import REASONS, SavePolicy


def test_reasons_come_in_the_fixed_order():
    policy = SavePolicy(every_steps=10)
    events = ["manual", "state_change", "config_change", "model_change", "exit", "resume_with_changes"]
    assert policy.reasons(step=20, events=events) == (
        "model_change", "config_change", "resume_with_changes", "state_change", "step", "exit", "manual")
    assert policy.reasons(step=20, events=reversed(REASONS)) == REASONS
    assert policy.reasons(step=21, events=iter(["exit", "model_change"])) == ("model_change", "exit")


def test_duplicate_events_are_reported_once():
    assert SavePolicy(every_steps=5).reasons(step=5, events=["step", "state_change", "state_change"]) == (
        "state_change", "step")


def test_frequency():
    policy = SavePolicy(every_steps=3)
    due = [s for s in range(1, 13) if policy.reasons(step=s)]
    assert due == [3, 6, 9, 12]
    assert policy.reasons(step=9) == ("step",)
    assert policy.reasons(step=10) == ()
    assert SavePolicy(every_steps=1).reasons(step=7) == ("step",)


def test_default_frequency_is_100():
    policy = SavePolicy()
    assert policy.every_steps == 100
    assert policy.reasons(step=100) == ("step",)
    assert policy.reasons(step=150) == ()


def test_none_frequency_never_saves_on_a_schedule():
    policy = SavePolicy(every_steps=None)
    assert all(policy.reasons(step=s) == () for s in (1, 10, 100, 1000))
    assert policy.reasons(step=100, events=["config_change"]) == ("config_change",)


@pytest.mark.parametrize("bad", [0, -1, True, False, 2.5, "10", 10.0])
def test_invalid_every_steps(bad):
    with pytest.raises(ValueError) as info:
        SavePolicy(every_steps=bad)
    msg = str(info.value)
    assert "every_steps must be a positive int or None" in msg
    assert repr(bad) in msg


def test_unknown_event_raises_naming_it():
    with pytest.raises(ValueError) as info:
        SavePolicy(every_steps=10).reasons(step=3, events=["model_change", "weights_changed", "oops"])
    msg = str(info.value)
    assert "['oops', 'weights_changed']" in msg
    assert "model_change" in msg and "manual" in msg  # the valid reasons


def test_policy_is_frozen_and_keyword_only():
    policy = SavePolicy(every_steps=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.every_steps = 6
    with pytest.raises(TypeError):
        SavePolicy(5)
