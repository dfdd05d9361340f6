"""The step clock: where a training loop's step boundaries are, whoever marks them.

A boundary is the end of a step, after its optimizer update. A loop marks it by calling
``checkpoint_on_step(step)``; a loop that never does is served by hooks on the registered objects:
once every registered optimizer has stepped (two per iteration in a GAN), their post-step hook is the
boundary, numbered one after the previous one. The first explicit call switches the hooks off for
good (and its step numbers replace the hooks' count).

A save decided at a hook cannot be taken there: ``scheduler.step()``, ``scaler.update()`` and the
loop's own counters still run after ``optimizer.step()``. So it is taken in two parts: at the hook,
what the next step consumes before its forward pass (random generators, loader positions: the
``early`` part of a :class:`Deferred` save); at the next forward of a registered model, before it
touches any buffer, the rest. Both together equal what ``checkpoint_on_step`` at the end of the loop
body would save.

The clock keeps the boundary's bookkeeping (the last step and its metrics, which optimizers have
stepped, whether an optimizer ran since the boundary, the deferred save) and calls the checkpoint
system back at the two moments it cannot handle alone: a boundary found by the hooks, and a forward.
"""

from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

from . import codec
from .errors import InvalidMetricsError, InvalidStepError
from .storage.identifiers import MAX_STEP  # what the catalog of checkpoints stores (SQLite INTEGER)
from .ledger import Entry

__all__ = ["StepClock", "Deferred", "Boundary", "MAX_STEP", "check_step", "check_metrics", "check_change_kind"]

log = logging.getLogger(__name__)



def check_step(step: Any) -> int:
    """The step a loop passed, as an int in [0, MAX_STEP]; anything else is an error that says what to pass."""
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise InvalidStepError(f"checkpoint_on_step(step) needs an integer step (the number of optimizer "
                               f"updates done), got {type(step).__name__} {step!r}; pass int(step)")
    value = step.__index__()
    if value < 0:
        raise InvalidStepError(f"checkpoint_on_step(step) needs a step >= 0, got {value}")
    if value > MAX_STEP:
        raise InvalidStepError(f"checkpoint_on_step(step) needs a step <= 2**63 - 1 (what the catalog of "
                               f"checkpoints stores), got {value}; pass the number of optimizer updates done")
    return value


def check_metrics(metrics: Any) -> dict[str, Any] | None:
    """The metrics a loop passed, as JSON numbers (non-finite ones tagged by the codec); anything
    else is an :class:`InvalidMetricsError` naming the metric and what to pass."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise InvalidMetricsError(f"metrics must be a dict of names to numbers, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str) or not name.strip():
            # (an empty name cannot be written in a ref such as @best:<metric>, nor ranked by retention)
            raise InvalidMetricsError(f"metric names must be non-empty strings, got {name!r}; name each metric, "
                                      "as in metrics={'loss': loss.item()}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise InvalidMetricsError(f"metric {name!r} is a tensor of {value.numel()} elements "
                                          f"(shape {list(value.shape)}); pass one number, such as "
                                          f"{name}.mean().item()")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise InvalidMetricsError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}; "
                                      "pass loss.item() rather than the tensor or a list")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError) as exc:
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise InvalidMetricsError(f"metric {name!r} cannot be taken as a float ({type(exc).__name__}: {exc}): "
                                      f"got {type(value).__name__} {shown}; pass one number that fits a 64-bit "
                                      "float") from None
        out[name] = codec.encode(number, path=f"metrics/{name}", tensors={}, what="metrics")
    return out


def check_change_kind(kind: Any) -> str:
    """The name of a state change passed to ``checkpoint_on_state_change(kind)``."""
    if not isinstance(kind, str) or not kind:
        raise InvalidStepError(f"checkpoint_on_state_change(kind) needs a short name of the change such as "
                               f"'freeze' or 'reset', got {kind!r}")
    return kind


@dataclass(frozen=True)
class Deferred:
    """A save decided at an optimizer's post-step hook, completed at the next forward."""

    step: int
    reasons: tuple[str, ...]
    changes: tuple[dict[str, Any], ...]
    early: Mapping[str, Any]  # what state.capture_early took at the hook


@dataclass(frozen=True)
class Boundary:
    """The last step boundary: its step, and the metrics the loop reported with it."""

    step: int
    metrics: Mapping[str, Any] | None = None


class _Hook:
    """A hook the clock puts on a registered object (a model's forward, an optimizer's step).

    It holds the clock and the object only weakly, so the object stays deep-copyable and picklable
    (an EMA copy, ``torch.save(model)``): a bound method of the clock would drag its lock into every
    copy. It calls the clock only for the object it was put on, so a copy, which is not registered,
    never marks a boundary or completes a save.
    """

    __slots__ = ("_clock", "_target", "_method")

    def __init__(self, clock: StepClock, target: Any, method: str):
        self._clock, self._target, self._method = weakref.ref(clock), weakref.ref(target), method

    def __call__(self, obj: Any, *args: Any) -> None:
        clock = self._clock()
        if clock is not None and obj is self._target():
            getattr(clock, self._method)(obj, *args)

    def __reduce__(self) -> tuple[Any, ...]:
        # What a copy or a pickle of the object carries instead: ``{}.get(module, args)`` returns the
        # arguments unchanged (what a forward pre-hook may return) and names no weightslab code, so a
        # model saved whole with torch.save loads where weightslab is not installed. (Optimizers
        # leave their hooks out of copies and pickles themselves.)
        return getattr, ({}, "get")


class StepClock:
    """Step boundaries of one checkpoint system, from explicit calls or from hooks.

    ``on_boundary(step)`` is called (under ``lock``) when the hooks find the end of a step;
    ``on_forward()`` when a registered model's forward starts (the system completes a deferred save
    there); ``on_step()`` when a registered optimizer's step starts, before it changes anything (the
    system waits there for a background copy of the parameters). ``hooks=False`` installs no hook:
    only explicit calls mark boundaries.
    """

    def __init__(self, *, hooks: bool, lock: threading.RLock, on_boundary: Callable[[int], Any],
                 on_forward: Callable[[], Any], on_step: Callable[[], Any] = lambda: None):
        self._hooks = hooks
        self._lock = lock
        self._on_boundary = on_boundary
        self._on_forward = on_forward
        self._on_step = on_step
        self.last: Boundary | None = None
        self.explicit = False  # the loop calls checkpoint_on_step itself
        self.optimizer_ran = False  # an optimizer step started since the last boundary
        self._deferred: Deferred | None = None
        self._stepped: set[int] = set()  # optimizers stepped since the last boundary
        self._handles: dict[tuple[str, str], list[Any]] = {}
        self._closed = False
        self._warned = False  # a deferred save was dropped (said once)

    # --- what the clock knows -------------------------------------------------------------
    @property
    def last_step(self) -> int | None:
        return self.last.step if self.last is not None else None

    @property
    def deferred(self) -> Deferred | None:
        return self._deferred

    @property
    def hooked_optimizers(self) -> int:
        return sum(1 for kind, _ in self._handles if kind == "optimizer")

    @property
    def guards_next_step(self) -> bool:
        """A hooked optimizer's pre-step hook comes before the next change of parameters, so a copy of
        them may overlap the next forward pass; a loop without one may change them anywhere (manual
        SGD, ``.data``), so they are copied at the boundary."""
        return self.hooked_optimizers > 0

    # --- hooks on the registered objects ----------------------------------------------------
    def attach(self, entry: Entry) -> None:
        if not self._hooks:
            return
        key = (entry.kind, entry.name)
        if entry.kind == "optimizer":
            self._handles[key] = [entry.obj.register_step_pre_hook(_Hook(self, entry.obj, "_optimizer_starts")),
                                  entry.obj.register_step_post_hook(_Hook(self, entry.obj, "_optimizer_stepped"))]
        elif entry.kind == "model":
            self._handles[key] = [entry.obj.register_forward_pre_hook(_Hook(self, entry.obj, "_forward_starts"))]

    def detach(self, entry: Entry) -> None:
        for handle in self._handles.pop((entry.kind, entry.name), []):
            handle.remove()

    def close(self) -> None:
        """Remove every hook; the clock marks no boundary from then on."""
        self._closed = True
        for handles in self._handles.values():
            for handle in handles:
                handle.remove()
        self._handles.clear()

    def _optimizer_starts(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self.optimizer_ran = True
        self._on_step()

    def _optimizer_stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self.explicit or self._closed:
            return
        with self._lock:
            self._stepped.add(id(optimizer))
            if len(self._stepped) < self.hooked_optimizers:
                return  # wait until every registered optimizer has stepped (GANs step two per iteration)
            self._stepped.clear()
            if self._deferred is not None:
                if not self._warned:
                    self._warned = True
                    log.warning("the checkpoint of step %d was dropped: the optimizers stepped again before any "
                                "forward of a registered model, which is where implicit checkpoints are completed. "
                                "Register the model you train, or call wl.checkpoint_on_step(step) at the end of "
                                "each step.", self._deferred.step)
                self._deferred = None
            self._on_boundary((self.last_step or 0) + 1)

    def _forward_starts(self, module: Any, args: Any) -> None:
        if not self._closed:
            self._on_forward()

    # --- the boundaries -----------------------------------------------------------------------
    def explicit_call(self) -> Deferred | None:
        """``checkpoint_on_step`` was called: the loop marks boundaries from now on. Returns the
        implicit save of this same step it supersedes (its reasons carry over), if one is pending."""
        if not self.explicit:
            self.explicit = True
            self.last = None  # implicit step counting does not constrain the loop's labels
        deferred, self._deferred = self._deferred, None
        return deferred

    def passed(self, step: int, metrics: Mapping[str, Any] | None) -> None:
        """A boundary at ``step`` was taken."""
        self.last = Boundary(step, metrics)
        self.optimizer_ran = False
        self._stepped.clear()

    def defer(self, deferred: Deferred) -> None:
        self._deferred = deferred

    def take_deferred(self) -> Deferred | None:
        """The deferred save to complete now (the clock forgets it)."""
        deferred, self._deferred = self._deferred, None
        return deferred

    def why_the_state_may_not_be_the_last_step(self) -> str | None:
        """Why the registered objects may no longer hold the state of the last boundary (a final
        checkpoint labelled with its step could then be wrong); None when they do.

        A loop that reports its steps (``checkpoint_on_step`` at the end of each) holds the state of
        the last step it reported, unless a hooked optimizer stepped since: a loop with no hooked
        optimizer (manual SGD) is taken at its word."""
        if self.optimizer_ran:
            return f"an optimizer step ran after the last step boundary (step {self.last_step}), so the state " \
                   "no longer matches that step"
        return None

    def restart(self, step: int) -> None:
        """The registered objects now hold the state after ``step`` (a resume or a fork)."""
        self.last = Boundary(step)
        self._deferred = None
        self.optimizer_ran = False
        self._stepped.clear()
