"""When to save: a pure decision from plain inputs (no torch, no disk, no clock of its own).

At each step boundary the checkpoint system tells the policy the step, what changed and how long
ago the last save was; the policy answers with the reasons to save now, in a fixed order, the
first being the checkpoint's main reason. No reasons: no checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

__all__ = ["SavePolicy", "REASONS"]

#: Every reason a checkpoint can carry, in the order they are reported.
REASONS = ("fork", "model_change", "config_change", "resume_with_changes", "lossy_resume", "state_change", "preempt",
           "step", "time", "exit", "manual")


@dataclass(frozen=True, kw_only=True)
class SavePolicy:
    """Save every ``every_steps`` steps and every ``every_seconds`` seconds (None: not on that
    schedule), and on every event (a change, a preemption, ...)."""

    every_steps: int | None = 100
    every_seconds: float | None = None

    def __post_init__(self) -> None:
        if self.every_steps is not None and (isinstance(self.every_steps, bool)
                                             or not isinstance(self.every_steps, int) or self.every_steps < 1):
            raise ValueError(f"every_steps must be a positive int or None, got {self.every_steps!r}")
        if self.every_seconds is not None and (isinstance(self.every_seconds, bool)
                                               or not isinstance(self.every_seconds, (int, float))
                                               or not self.every_seconds > 0):
            raise ValueError(f"every_seconds must be a positive number of seconds or None, got {self.every_seconds!r}")

    def reasons(self, *, step: int, events: Iterable[str] = (),
                seconds_since_save: float | None = None) -> tuple[str, ...]:
        """The reasons to save at ``step`` given the ``events`` seen at this boundary and the time
        since the last save (or since the run started)."""
        wanted = set(events)
        if self.every_steps is not None and step % self.every_steps == 0:
            wanted.add("step")
        if self.every_seconds is not None and seconds_since_save is not None \
                and seconds_since_save >= self.every_seconds:
            wanted.add("time")
        unknown = wanted - set(REASONS)
        if unknown:
            raise ValueError(f"unknown checkpoint reasons {sorted(unknown)}; expected some of {REASONS}")
        return tuple(r for r in REASONS if r in wanted)
