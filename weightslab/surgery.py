"""Carrying optimizer state across model surgery.

Users change a model's architecture while it trains: they widen a layer
(``model.fc1 = nn.Linear(8, 64)`` in place of a ``Linear(8, 32)``), add one or remove one, then
build a new optimizer over the new parameters and register it again under the same name. The new
optimizer starts empty, so the moments of every parameter that did *not* change (Adam's
``exp_avg``, ``exp_avg_sq`` and ``step``, SGD's ``momentum_buffer``, ...) would be lost, and the
untouched part of the model would restart with a cold optimizer: Adam's bias correction starts over
and its first steps are much larger than the ones it was taking. :func:`carry_optimizer_state`
copies that state from the old optimizer into the new one.

Rules:

* State is carried only between optimizers of the same class: different classes keep different
  state, so an ``Adam -> SGD`` switch carries nothing and says why in :attr:`CarryReport.reason`.
* A parameter of the new optimizer is matched with a parameter of the old one by identity first
  (the same ``nn.Parameter`` object, whatever its name now), then by name (``model/qualified.name``,
  see :func:`parameter_names`) among the old parameters not already matched, with the same shape,
  dtype and device. Identity is not required: a layer replaced by a new one of the same shape
  keeps the moments of the layer it replaces. A user who re-initialises a layer and wants fresh
  moments for it builds the optimizer without carrying.
* Each state entry is copied, never aliased: tensors are ``detach().clone()``-d and moved to the new
  parameter's device. A per-parameter tensor (anything but a 0-dim tensor) must have the new
  parameter's shape and dtype, otherwise the parameter is reset: this catches a parameter changed
  in place (``module.half()``, ``param.data = ...``), which keeps its identity. It also resets
  optimizers whose state is not shaped like the parameter (Adafactor's factored variances,
  LBFGS's flat history): losing state is recoverable, wrongly shaped state is not. 0-dim tensors
  (Adam's ``step``) are copied as they are; one that lived on an accelerator (``capturable`` or
  ``fused``) follows the parameter's device, one on the CPU stays there.
* The boolean options of the two param groups (``amsgrad``, ``nesterov``, ``capturable``,
  ``fused``, ...) must agree: they decide which state entries the optimizer expects (a new
  ``amsgrad=True`` Adam fails on state without ``max_exp_avg_sq``). ``foreach`` only picks a kernel
  and is ignored. Numbers (``lr``, ``betas``, ``momentum``, ...) may differ.
* A matched parameter whose old state is empty (never stepped) counts as carried: nothing was lost.
* The new optimizer's param groups (``lr`` etc.) are never touched: the user set them when building
  it. Nor is state it already holds (it was stepped before being registered): such parameters are
  reported as :attr:`CarryReport.kept`.

Carried state is exact: the next ``new.step()`` gives bitwise the values ``old.step()`` would have
given to the parameters that were carried.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

__all__ = ["CarryReport", "carry_optimizer_state", "parameter_names"]

_SHOWN = 5
# Group options that select a kernel only, never the layout of the state.
_KERNEL_ONLY_OPTIONS = frozenset({"foreach"})


@dataclass(frozen=True, kw_only=True)
class CarryReport:
    """What :func:`carry_optimizer_state` did, by parameter name."""

    carried: tuple[str, ...]  # parameters of the new optimizer that got the old state
    reset: tuple[str, ...]  # parameters of the new optimizer that start fresh (new, resized, ...)
    dropped: tuple[str, ...]  # parameters with old state and no counterpart in the new optimizer
    kept: tuple[str, ...] = ()  # parameters that already had state in the new optimizer
    reason: str = ""  # why nothing could be carried, if so

    def __str__(self) -> str:
        if self.reason:
            parts = [f"carried nothing ({self.reason})"]
        else:
            n = len(self.carried)
            parts = [f"carried the state of {n} parameter{'' if n == 1 else 's'}"]
        if self.reset:
            parts.append(f"reset {_shorten(self.reset)} (new or resized)")
        if self.dropped:
            parts.append(f"dropped {_shorten(self.dropped)} (no longer optimized)")
        if self.kept:
            parts.append(f"kept {_shorten(self.kept)} (already had state)")
        return "; ".join(parts)


def parameter_names(models: Mapping[str, torch.nn.Module]) -> dict[int, str]:
    """``id(parameter) -> "model_name/param.qualified.name"`` for every parameter of ``models``.

    A parameter shared by two models keeps the first name it is seen under, like
    ``named_parameters`` does within one model.
    """
    names: dict[int, str] = {}
    for model_name, model in models.items():
        for name, param in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(param), f"{model_name}/{name}")
    return names


def carry_optimizer_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer, *,
                          old_names: Mapping[int, str],
                          new_names: Mapping[int, str]) -> CarryReport:
    """Copy the per-parameter state of ``old`` into ``new`` where the parameter did not change.

    ``old_names`` must have been taken before the surgery (the old parameter objects are kept
    alive by ``old.param_groups``, so their ids are still theirs), ``new_names`` after it.
    See the module docstring for the rules.
    """
    new_params = list(_params(new))
    old_params = list(_params(old))
    new_label = {id(p): new_names.get(id(p), f"<unnamed parameter {g}.{i}>")
                 for g, i, p, _ in new_params}
    named = {new_names[id(p)] for _, _, p, _ in new_params if id(p) in new_names}

    if new is old:  # registered again as it is: its state is already where it belongs
        return CarryReport(carried=tuple(new_label[id(p)] for _, _, p, _ in new_params),
                           reset=(), dropped=())

    if type(old) is not type(new):
        reason = (f"{type(old).__name__} -> {type(new).__name__}: "
                  "different optimizer classes keep different state")
        return CarryReport(carried=(), reset=tuple(new_label[id(p)] for _, _, p, _ in new_params),
                           dropped=_dropped(old, old_params, old_names, new_label, named, set()),
                           reason=reason)

    # Identity first: a parameter object that survived the surgery keeps its state even if the
    # module holding it was renamed or moved. Only then by name, among the old parameters not
    # claimed by identity (after ``fc1, fc2 = fc2, fc1`` the states follow the objects).
    old_by_id = {id(p): (p, group) for _, _, p, group in old_params}
    new_ids = {id(p) for _, _, p, _ in new_params}
    old_by_name = {old_names[id(p)]: (p, group) for _, _, p, group in old_params
                   if id(p) in old_names and id(p) not in new_ids}

    carried: list[str] = []
    reset: list[str] = []
    kept: list[str] = []
    matched: set[int] = set()
    for _, _, p_new, new_group in new_params:
        label = new_label[id(p_new)]
        if new.state.get(p_new):
            kept.append(label)
            matched.add(id(p_new))  # the same object may be in old: its state was not lost
            continue
        match = old_by_id.get(id(p_new))
        if match is None and label in old_by_name and id(p_new) in new_names:
            candidate = old_by_name[label]
            if _same_kind(candidate[0], p_new):
                match = candidate
        if match is None:
            reset.append(label)
            continue
        p_old, old_group = match
        matched.add(id(p_old))
        if not _same_switches(old_group, new_group):
            reset.append(label)
            continue
        state = _copy_state(old.state.get(p_old, {}), p_new)
        if state is None:
            reset.append(label)
            continue
        if state:
            new.state[p_new] = state
        carried.append(label)

    return CarryReport(carried=tuple(carried), reset=tuple(reset),
                       dropped=_dropped(old, old_params, old_names, new_label, named, matched),
                       kept=tuple(kept))


def _params(opt: torch.optim.Optimizer) -> Iterator[tuple[int, int, torch.Tensor,
                                                          Mapping[str, Any]]]:
    """(group index, index in group, parameter, group) for each distinct parameter of ``opt``."""
    seen: set[int] = set()
    for g, group in enumerate(opt.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in seen:
                seen.add(id(p))
                yield g, i, p, group


def _dropped(old: torch.optim.Optimizer,
             old_params: list[tuple[int, int, torch.Tensor, Mapping[str, Any]]],
             old_names: Mapping[int, str], new_label: Mapping[int, str],
             new_named: set[str], matched: set[int]) -> tuple[str, ...]:
    """Old parameters with state and no counterpart (same object or same name) in the new one.

    A resized parameter keeps its name in the new optimizer: it is reset there, not dropped.
    """
    dropped = []
    for g, i, p, _ in old_params:
        if not old.state.get(p) or id(p) in matched or id(p) in new_label:
            continue
        if id(p) not in old_names:  # unnamed: only identity could have matched it
            dropped.append(f"<unnamed parameter {g}.{i}>")
        elif old_names[id(p)] not in new_named:
            dropped.append(old_names[id(p)])
    return tuple(dropped)


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _same_switches(old_group: Mapping[str, Any], new_group: Mapping[str, Any]) -> bool:
    # None is how torch spells "off" for the tri-state flags (``fused=None``).
    for key in old_group.keys() | new_group.keys():
        if key == "params" or key in _KERNEL_ONLY_OPTIONS:
            continue
        a, b = old_group.get(key), new_group.get(key)
        if (isinstance(a, bool) or isinstance(b, bool)) and bool(a) != bool(b):
            return False
    return True


def _copy_state(state: Mapping[str, Any], p_new: torch.Tensor) -> dict[str, Any] | None:
    """A copy of one parameter's state for ``p_new``; None if it does not fit ``p_new``."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if value.dim() == 0:
                device = value.device if value.device.type == "cpu" else p_new.device
            elif value.shape != p_new.shape or value.dtype != p_new.dtype:
                return None
            else:
                device = p_new.device
            out[key] = value.detach().clone().to(device)
        else:
            # Numbers mostly (an older torch's int ``step``); deepcopy so nothing is shared.
            out[key] = copy.deepcopy(value)
    return out


def _shorten(names: tuple[str, ...]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return f"{shown} and {len(names) - _SHOWN} more" if len(names) > _SHOWN else shown
