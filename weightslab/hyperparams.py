"""Hyperparameters as plain data: loading, validation, cheap change tokens, restoring in place.

A run's hyperparameters are registered as a live object the user keeps mutating (a dict, a
dataclass, an ``argparse.Namespace``) or as the path of a YAML file. weightslab never copies the
live object away from the user: it reads it at step boundaries and, on resume, writes the saved
values back into the same object, so every reference the training script holds stays valid.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import enum
import logging
import os
import types
from pathlib import Path, PurePath
from typing import Any, Mapping, MutableMapping

import yaml

from .errors import HyperparamsError, RegistrationError

__all__ = ["load_yaml", "resolve", "to_plain", "signature", "restore_in_place"]

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load`` (never constructs arbitrary objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HyperparamsError(f"hyperparameter file {path} does not exist; check the path "
                               f"(relative paths are taken from {Path.cwd()})") from None
    except UnicodeDecodeError as exc:
        raise HyperparamsError(f"hyperparameter file {path} is not UTF-8 text ({exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise HyperparamsError(f"{where}: the YAML does not parse ({problem}); fix the file") from None
    if data is None:
        log.warning("hyperparameter file %s is empty; registering no hyperparameters", path)
        return {}
    if not isinstance(data, dict):
        raise HyperparamsError(f"{path} must hold a mapping of names to values at its top level, "
                               f"but holds a {type(data).__name__}; write it as 'key: value' lines")
    to_plain(data, where=str(path))  # validate now, with the file in the message
    return data


def resolve(obj: Any, *, name: str = "main") -> tuple[Any, Path | None]:
    """The live object to track for ``obj``, and the YAML file it came from (if any)."""
    if isinstance(obj, (str, os.PathLike)):
        path = Path(obj).expanduser().absolute()
        return load_yaml(path), path
    if isinstance(obj, type):
        raise RegistrationError(f"register_hyperparams({name!r}, ...) got the class {obj.__name__}; pass an "
                                f"instance, for instance {obj.__name__}()")
    if isinstance(obj, Mapping) or dataclasses.is_dataclass(obj) or isinstance(
            obj, (argparse.Namespace, types.SimpleNamespace)):
        return obj, None
    raise RegistrationError(
        f"register_hyperparams({name!r}, ...) got a {type(obj).__name__}; pass a dict, a dataclass instance, "
        "an argparse.Namespace, or the path of a YAML file")


def _fields(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return vars(obj)


def to_plain(obj: Any, *, where: str = "hyperparameters") -> Any:
    """A plain-data copy of ``obj``: dicts, lists, tuples, scalars, paths and dates.

    Dataclasses and namespaces become dicts, enums their values. Anything else raises
    :class:`HyperparamsError` naming the key, because it could not be hashed stably or saved
    without pickle.
    """
    return _plain(obj, where, "")


def _plain(value: Any, where: str, key: str) -> Any:
    if isinstance(value, enum.Enum):
        return _plain(value.value, where, key)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (PurePath, _dt.date, _dt.time)):
        return value
    if isinstance(value, (list, tuple)):
        items = [_plain(v, where, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if isinstance(value, tuple) else items
    if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)) \
            or isinstance(value, (argparse.Namespace, types.SimpleNamespace)):
        out = {}
        for k, v in _fields(value).items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise HyperparamsError(f"{where}: key {k!r} under '{key or '<top>'}' is a {type(k).__name__}; "
                                       "hyperparameter keys must be strings or numbers")
            out[k] = _plain(v, where, f"{key}.{k}" if key else str(k))
        return out
    # numpy and torch scalars are common in configs; accept them as their Python value.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return _plain(item(), where, key)
    raise HyperparamsError(
        f"{where}: the value of '{key or '<top>'}' is a {type(value).__module__}.{type(value).__qualname__}, "
        "which cannot be saved or hashed as plain data; use numbers, strings, booleans, None, lists or "
        "dicts (store the name of a class or function instead of the object itself)")


def signature(obj: Any) -> str:
    """A cheap token that changes whenever the live object's values change (checked every step).

    ``repr`` of the values is a few microseconds for a typical config and covers nested in-place
    mutation; only a full canonical hash decides whether the experiment really changed.
    """
    if isinstance(obj, Mapping):
        return repr(obj)
    # The fields' values, not repr(obj): a dataclass may hide fields from its repr (repr=False).
    return repr(_fields(obj))


def restore_in_place(obj: Any, values: Mapping[str, Any], *, name: str) -> None:
    """Write saved ``values`` back into the live object ``obj`` without replacing it.

    Nested dicts are updated in place too, so references the script holds into them stay valid.
    """
    if isinstance(obj, MutableMapping):
        _update_mapping(obj, values)
        return
    if isinstance(obj, Mapping):
        if dict(obj) != dict(values):
            log.warning("hyperparameters %r are a read-only mapping; their saved values were not restored", name)
        return
    for key, value in values.items():
        current = getattr(obj, key, None)
        if isinstance(value, Mapping) and current is not None and not isinstance(current, Mapping) \
                and (dataclasses.is_dataclass(current) or hasattr(current, "__dict__")):
            restore_in_place(current, value, name=f"{name}.{key}")
            continue
        if isinstance(current, MutableMapping) and isinstance(value, Mapping):
            _update_mapping(current, value)  # keep the identity of containers the script holds
            continue
        if isinstance(current, list) and isinstance(value, list):
            current[:] = value
            continue
        if isinstance(current, enum.Enum) and not isinstance(value, enum.Enum):
            value = type(current)(value)
        elif isinstance(current, PurePath) and isinstance(value, str):
            value = type(current)(value)
        try:
            setattr(obj, key, value)
        except (dataclasses.FrozenInstanceError, AttributeError):
            if current != value:
                log.warning("hyperparameters %r are frozen: %s stays %r instead of the saved %r",
                            name, key, current, value)


def _update_mapping(target: MutableMapping[Any, Any], source: Mapping[Any, Any]) -> None:
    for key in [k for k in target if k not in source]:
        del target[key]
    for key, value in source.items():
        current = target.get(key)
        if isinstance(current, MutableMapping) and isinstance(value, Mapping):
            _update_mapping(current, value)
        elif isinstance(current, list) and isinstance(value, list):
            current[:] = value
        else:
            target[key] = value
