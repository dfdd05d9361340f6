"""Cheap detection, at every step boundary, of what changed since the last one.

Hashing the architecture and hyperparameters at every step would cost far more than a step
boundary may (the target is < 50 us for a 100-module model), so change detection is split:

* structure (modules, parameters, buffers added, removed or replaced): torch's global
  registration hooks flag the tracked models as dirty the moment it happens; per step, a sum of
  child counts catches the ``del model.layer`` that no hook sees. Only a dirty flag leads to a
  full fingerprint.
* hyperparameters: a ``repr`` of each live object (microseconds), compared with the last one.
* model state: ``requires_grad`` of every parameter (freeze / unfreeze) and ``training`` of every
  module (train / eval), compared with the last boundary. Parameters replaced by new ones of the
  same shape show up as a ``reset`` when the baseline is taken again. A train/eval switch counts
  once it holds at two consecutive boundaries: a loop that validates in eval mode around one
  boundary and switches back before the next is not changing its model.

In-place re-initialisation of a parameter (``layer.reset_parameters()``) changes values, not
structure or flags; it is indistinguishable from an optimizer update at this cost, so it is
reported by ``checkpoint_on_state_change("reset")``.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Mapping

from torch import nn
from torch.nn.modules import module as _torch_module

from .hyperparams import signature

__all__ = ["ChangeDetector", "Poll", "StateChange"]

_REQUIRES_GRAD = attrgetter("requires_grad")
_TRAINING = attrgetter("training")
_CHILDREN = attrgetter("_modules")
_MAX_NAMES = 20


@dataclass(frozen=True)
class StateChange:
    """A change of model state that keeps the experiment: freeze, unfreeze, train, eval, reset."""

    kind: str
    model: str
    names: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "names": list(self.names[:_MAX_NAMES]),
                "count": len(self.names)}

    def __str__(self) -> str:
        shown = ", ".join(n or "<root>" for n in self.names[:3])
        more = f" and {len(self.names) - 3} more" if len(self.names) > 3 else ""
        return f"{self.kind} of {self.model!r}: {shown}{more}"


@dataclass(frozen=True)
class Poll:
    structure: bool  # architecture may have changed: recompute the fingerprint
    hyperparams: bool  # hyperparameter values may have changed: recompute the fingerprint
    state: tuple[StateChange, ...]

    def __bool__(self) -> bool:
        return self.structure or self.hyperparams or bool(self.state)


class _ModelProbe:
    """The flags of one model, as flat lists read with C-level ``map``."""

    def __init__(self, model: nn.Module):
        self.model = model
        named_params = list(model.named_parameters())
        named_modules = list(model.named_modules())
        self.param_names = [n for n, _ in named_params]
        self.params = [p for _, p in named_params]
        self.module_names = [n for n, _ in named_modules]
        self.modules = [m for _, m in named_modules]
        self.requires_grad = list(map(_REQUIRES_GRAD, self.params))
        self.training = list(map(_TRAINING, self.modules))
        self.pending_training: list[bool] | None = None  # a switch seen once, not yet confirmed
        self.children = self._children()
        self.param_ids = {n: (id(p), tuple(p.shape), p.dtype) for n, p in named_params}

    def _children(self) -> int:
        return sum(map(len, map(_CHILDREN, self.modules)))

    def structure_moved(self) -> bool:
        return self._children() != self.children

    def flag_changes(self, name: str) -> list[StateChange]:
        changes: list[StateChange] = []
        rg = list(map(_REQUIRES_GRAD, self.params))
        if rg != self.requires_grad:
            changes += _flips(name, self.param_names, self.requires_grad, rg, "freeze", "unfreeze")
            self.requires_grad = rg
        tr = list(map(_TRAINING, self.modules))
        if tr == self.training:
            self.pending_training = None
        elif tr != self.pending_training:
            self.pending_training = tr  # first sighting: wait one boundary for confirmation
        else:
            self.pending_training = None
            changes += _flips(name, self.module_names, self.training, tr, "eval", "train")
            self.training = tr
        return changes

    def diff_against(self, old: "_ModelProbe", name: str) -> list[StateChange]:
        """State changes between an old baseline and this one, matched by name (after a structure change)."""
        old_rg = dict(zip(old.param_names, old.requires_grad))
        kept = [(n, old_rg[n], v) for n, v in zip(self.param_names, self.requires_grad) if n in old_rg]
        changes = _flips(name, *_columns(kept), "freeze", "unfreeze")
        old_tr = dict(zip(old.module_names, old.training))
        kept = [(n, old_tr[n], v) for n, v in zip(self.module_names, self.training) if n in old_tr]
        changes += _flips(name, *_columns(kept), "eval", "train")
        # A new parameter object of the same shape and dtype is a re-initialisation; a different
        # shape is an architecture change, reported by the fingerprint instead.
        replaced = tuple(n for n, (i, shape, dtype) in self.param_ids.items() if n in old.param_ids
                         and old.param_ids[n][0] != i and old.param_ids[n][1:] == (shape, dtype))
        if replaced:
            changes.append(StateChange("reset", name, replaced))
        return changes


def _columns(rows: list[tuple[str, bool, bool]]) -> tuple[list[str], list[bool], list[bool]]:
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def _flips(model: str, names: list[str], before: list[bool], after: list[bool], off: str, on: str) -> list[StateChange]:
    """Changes for the flags that went from True to False (``off``) and from False to True (``on``)."""
    went_off = tuple(n for n, b, a in zip(names, before, after) if b and not a)
    went_on = tuple(n for n, b, a in zip(names, before, after) if a and not b)
    return [StateChange(kind, model, found) for kind, found in ((off, went_off), (on, went_on)) if found]


class ChangeDetector:
    """Tracks registered models and hyperparameters between step boundaries."""

    def __init__(self) -> None:
        self._probes: dict[str, _ModelProbe] = {}
        self._hp_objects: dict[str, Any] = {}
        self._hp_signatures: dict[str, str] = {}
        self._tracked_ids: set[int] = set()
        self._dirty = True
        self._hooks: list[Any] = []

    # --- global torch hooks -----------------------------------------------------------------
    def install(self) -> None:
        if self._hooks:
            return
        self._hooks = [
            _torch_module.register_module_module_registration_hook(self._on_registration),
            _torch_module.register_module_parameter_registration_hook(self._on_registration),
            _torch_module.register_module_buffer_registration_hook(self._on_registration),
        ]

    def remove(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _on_registration(self, module: nn.Module, name: str, value: Any) -> None:
        # Called for every module built anywhere in the process: keep it to one set lookup.
        if id(module) in self._tracked_ids:
            self._dirty = True

    def invalidate(self) -> None:
        """Something was (un)registered: the next poll reports a structure change."""
        self._dirty = True

    # --- per step ---------------------------------------------------------------------------
    def poll(self) -> Poll:
        """What changed since the last baseline. Cheap unless something did."""
        structure = self._dirty or any(p.structure_moved() for p in self._probes.values())
        hp = any(signature(obj) != self._hp_signatures[name] for name, obj in self._hp_objects.items())
        state: list[StateChange] = []
        if not structure:
            for name, probe in self._probes.items():
                state += probe.flag_changes(name)
        return Poll(structure=structure, hyperparams=hp, state=tuple(state))

    def parameter_names(self) -> dict[int, str]:
        """``id(parameter) -> "model/qualified.name"`` as of the last baseline: after surgery, the
        names the replaced parameters had (the probes still hold them)."""
        return {id(p): f"{model}/{n}" for model, probe in self._probes.items()
                for n, p in zip(probe.param_names, probe.params)}

    def track(self, models: Mapping[str, nn.Module], hyperparams: Mapping[str, Any]) -> list[StateChange]:
        """Take a new baseline; return the state changes since the old one, matched by name."""
        old = self._probes
        self._probes = {name: _ModelProbe(model) for name, model in models.items()}
        self._tracked_ids = {id(m) for probe in self._probes.values() for m in probe.modules}
        self._hp_objects = dict(hyperparams)
        self._hp_signatures = {name: signature(obj) for name, obj in hyperparams.items()}
        self._dirty = False
        changes: list[StateChange] = []
        for name, probe in self._probes.items():
            if name in old and old[name].model is probe.model:
                changes += probe.diff_against(old[name], name)
        return changes
