"""Hyperparameters that drive the optimizer: an edit of ``optimizer.lr`` reaches its param groups.

Which hyperparameters are bound to which param-group setting:

* ``optimizer.<key>`` in any registered hyperparameters, for every key torch keeps in a param group
  (``lr``, ``weight_decay``, ``momentum``, ``betas``, ``eps``, ...): every registered optimizer
  that has that key;
* ``optimizer.<name>.<key>`` (or ``optimizers.<name>.<key>``): the optimizer registered as ``name``;
* ``CheckpointConfig(optimizer_keys={"train.learning_rate": "lr", "gan.d_lr": "discriminator.lr"})``:
  any other hyperparameter path, to a key of every optimizer or of the one named before the dot.

A bound value is applied when it *changes* (in a watched file or in the live object), never at
every step, so a learning-rate scheduler stays in charge between edits. When a registered scheduler
drives the optimizer, an edited ``lr`` is the schedule's new base: ``initial_lr`` and the
scheduler's ``base_lrs`` take it, and the current ``lr`` is rescaled by the same factor, so the
schedule goes on from where it was, at the new scale.

A bound value is checked as the optimizer would check it before it is applied (:func:`refusal`):
the type and arity of the current value (``betas`` is a pair), finite, and in range (``lr``,
``eps``, ``weight_decay``, ``momentum``, ... >= 0, each of ``betas`` in [0, 1)). An edit of a
watched file with such a value is refused whole before it reaches the live config
(:func:`check_edit`, run by the file's check), so what the experiment records is what trains; a
value the run sets in code is refused here with a warning, and the optimizer keeps its value.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Mapping

from . import hyperparams as _hp
from .errors import HyperparamsError

__all__ = ["Assignment", "OptimizerBinding", "check_edit", "refusal"]

log = logging.getLogger(__name__)

_SECTIONS = ("optimizer", "optimizers")


@dataclass(frozen=True)
class Assignment:
    """One param-group setting a hyperparameter asks for."""

    optimizer: str | None  # None: every registered optimizer that has the key
    key: str
    value: Any
    source: str  # "config:optimizer.lr"
    path: tuple[Any, ...] = ()  # where in its hyperparameters: ("optimizer", "lr")


def assignments(hyperparams: Mapping[str, Any], optimizer_names: list[str],
                extra: Mapping[str, str]) -> dict[tuple[str | None, str], Assignment]:
    """What the hyperparameters ask of the optimizers, by (optimizer name or None, key)."""
    found: dict[tuple[str | None, str], Assignment] = {}
    for hp_name, obj in hyperparams.items():
        plain = _hp.to_plain(obj)
        if not isinstance(plain, Mapping):
            continue
        for section in _SECTIONS:
            block = plain.get(section)
            if not isinstance(block, Mapping):
                continue
            for key, value in block.items():
                if isinstance(value, Mapping) and key in optimizer_names:
                    for sub, v in value.items():
                        if sub != "params" and not isinstance(v, Mapping):
                            found[(key, str(sub))] = Assignment(key, str(sub), v, f"{hp_name}:{section}.{key}.{sub}",
                                                                (section, key, sub))
                elif key != "params" and not isinstance(value, Mapping):
                    found[(None, str(key))] = Assignment(None, str(key), value, f"{hp_name}:{section}.{key}",
                                                         (section, key))
        for path, target in extra.items():
            value = _hp.at_path(plain, path.split("."))
            if value is None:
                continue
            name, _, key = target.rpartition(".")
            found[(name or None, key)] = Assignment(name or None, key, value, f"{hp_name}:{path}",
                                                    tuple(path.split(".")))
    return found


# What torch's optimizers require of a setting (their constructors' checks), plus finiteness, which
# they do not check: an lr of inf is accepted and the weights are NaN from the next step.
_AT_LEAST_ZERO = frozenset({"lr", "eps", "weight_decay", "momentum", "dampening", "alpha", "lr_decay",
                            "initial_accumulator_value", "momentum_decay", "lambd"})
_UNIT = {"betas": (True, "each of betas must be in [0, 1)"), "rho": (False, "rho must be in [0, 1]")}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def refusal(key: str, value: Any, current: Any) -> str | None:
    """Why ``value`` cannot be an optimizer's setting ``key`` whose current value is ``current``
    (the rule it breaks), or None if it can."""
    if isinstance(current, (tuple, list)):
        if not isinstance(value, (tuple, list)) or len(value) != len(current):
            return f"{key} must be a list of {len(current)} values like its current value {current!r}"
        pairs = list(zip(value, current))
    else:
        pairs = [(value, current)]
    for v, c in pairs:
        if _number(c) or (c is None and len(pairs) > 1):  # (Adafactor's eps is (None, 1e-3))
            if not (_number(v) or (c is None and v is None)):
                return f"{key} must be a number like its current value {current!r}"
        elif type(v) is not type(c):
            return f"{key} must be a {type(c).__name__} like its current value {current!r}"
    numbers = [v for v, _ in pairs if _number(v)]
    for v in numbers:
        try:
            finite = math.isfinite(v)
        except OverflowError:
            return f"{key} must be a number a float can hold"
        if not finite:
            return f"{key} must be finite (not nan or inf)"
    if key in _AT_LEAST_ZERO and any(v < 0 for v in numbers):
        return f"{key} must be >= 0"
    if key in _UNIT:
        below_one, rule = _UNIT[key]
        if any(v < 0 or v > 1 or (below_one and v == 1) for v in numbers):
            return rule
    return None


def check_edit(name: str, live: Mapping[str, Any], values: Mapping[str, Any], optimizers: Mapping[str, Any],
               extra: Mapping[str, str], *, marks: _hp.Marks, where: str) -> None:
    """Refuse an edit of the hyperparameters ``name`` (``live`` -> ``values``) that changes a bound
    value to one an optimizer it reaches would not take: HyperparamsError naming the file, the line,
    the key, the value and the rule."""
    before = assignments({name: live}, list(optimizers), extra)
    for slot, a in assignments({name: values}, list(optimizers), extra).items():
        old = before.get(slot)
        if old is not None and type(old.value) is type(a.value) and old.value == a.value:
            continue  # not changed by the edit
        targets = {a.optimizer: optimizers[a.optimizer]} if a.optimizer in optimizers else \
            {n: o for n, o in optimizers.items() if a.optimizer is None}
        for opt_name, opt in targets.items():
            having = [g for g in opt.param_groups if a.key in g]
            rule = refusal(a.key, a.value, having[0][a.key]) if having else None
            if rule is not None:
                line = marks.get(a.path, (None, None))[0]
                dotted = ".".join(str(p) for p in a.path)
                raise HyperparamsError(f"{where}{f', line {line}' if line else ''}: '{dotted}' = {a.value!r} cannot "
                                       f"be optimizer {opt_name!r}'s {a.key}: {rule} (it is {having[0][a.key]!r}); "
                                       "fix the value")


class OptimizerBinding:
    """Applies changed bound hyperparameters to the registered optimizers (on the training thread)."""

    def __init__(self, extra: Mapping[str, str] | None = None):
        self.extra = dict(extra or {})
        self._last: dict[tuple[str | None, str], Any] | None = None  # None: no baseline yet
        self._warned: set[str] = set()

    def baseline(self, hyperparams: Mapping[str, Any], optimizers: Mapping[str, Any]) -> None:
        """Remember the current values without applying them (at start, and after a resume)."""
        self._last = {k: a.value for k, a in assignments(hyperparams, list(optimizers), self.extra).items()}

    def apply(self, hyperparams: Mapping[str, Any], optimizers: Mapping[str, Any],
              schedulers: Mapping[str, Any]) -> list[str]:
        """Apply the bound values that changed since the last call (the first call only looks);
        return what was done, for the log."""
        current = assignments(hyperparams, list(optimizers), self.extra)
        last, self._last = self._last, {k: a.value for k, a in current.items()}
        if last is None:
            return []  # the first look is the baseline: the optimizers were built from these values
        changed = [a for k, a in current.items() if k not in last or last[k] != a.value]
        done: list[str] = []
        for a in changed:
            targets = {a.optimizer: optimizers[a.optimizer]} if a.optimizer in optimizers else \
                {n: o for n, o in optimizers.items() if a.optimizer is None}
            if a.optimizer is not None and a.optimizer not in optimizers:
                self._warn(f"{a.source}: no optimizer named {a.optimizer!r} is registered "
                           f"(registered: {sorted(optimizers)}); the value is not applied")
                continue
            for name, opt in targets.items():
                done += self._set(name, opt, a, schedulers)
        return done

    def _set(self, name: str, opt: Any, a: Assignment, schedulers: Mapping[str, Any]) -> list[str]:
        groups = opt.param_groups
        having = [g for g in groups if a.key in g]
        if not having:
            keys = sorted(k for k in groups[0] if k != "params") if groups else []
            self._warn(f"{a.source}: optimizer {name!r} ({type(opt).__name__}) has no setting {a.key!r} (it has "
                       f"{', '.join(keys)}); the value is not applied")
            return []
        value = a.value
        old = having[0][a.key]
        rule = refusal(a.key, value, old)
        if rule is not None:
            self._warn(f"{a.source}: {a.key} = {value!r} is not applied to optimizer {name!r} "
                       f"({type(opt).__name__}): {rule}; it keeps {old!r}")
            return []
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        elif isinstance(old, float) and _number(value):
            value = float(value)
        driving = [s for s in schedulers.values() if getattr(s, "optimizer", None) is opt]
        for index, group in enumerate(groups):
            if a.key not in group:
                continue
            if a.key == "lr" and driving and "initial_lr" in group:
                base = group["initial_lr"]
                group["lr"] = group["lr"] * (value / base) if base else value
                group["initial_lr"] = value
                for scheduler in driving:
                    if hasattr(scheduler, "base_lrs") and index < len(scheduler.base_lrs):
                        scheduler.base_lrs[index] = value
            else:
                group[a.key] = value
        how = " (the schedule's base; the current lr rescaled)" if a.key == "lr" and driving else ""
        return [f"optimizer {name!r}: {a.key} {old!r} -> {value!r} from {a.source}{how}"]

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)
