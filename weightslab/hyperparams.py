"""Hyperparameters as plain data: loading, validation, cheap change tokens, restoring in place.

A run's hyperparameters are registered as a live object the user keeps mutating (a dict, a
dataclass, an ``argparse.Namespace``) or as the path of a YAML file. weightslab never copies the
live object away from the user: it reads it at step boundaries and, on resume, writes the saved
values back into the same object, so every reference the training script holds stays valid.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import enum
import logging
import os
import threading
import types
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

import yaml

from .errors import HyperparamsError, RegistrationError

__all__ = ["LiveConfig", "Marks", "at_path", "load_yaml", "parse_yaml", "resolve", "to_plain", "signature",
           "restore_in_place"]

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)


#: Where each value of a YAML file was written: key path -> (line, the scalar's text as written).
Marks = dict[tuple[Any, ...], tuple[int, str | None]]


class LiveConfig(MutableMapping[str, Any]):
    """The live hyperparameters of a YAML file: a mapping whose whole content is replaced in one step.

    Reads go through the object (``config["optimizer"]["lr"]``), so a reload, which builds the
    new values apart and then swaps them in with one reference assignment, is never seen half
    done. Writes by the run (``config["steps"] = 10``) go into the current values and are carried
    into every later version.
    """

    def __init__(self, values: Mapping[str, Any] | None = None):
        self._lock = threading.Lock()
        self._data: dict[str, Any] = dict(values or {})

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        with self._lock:
            self._data[key] = value

    def __delitem__(self, key: str) -> None:
        with self._lock:
            del self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)

    # Loaders' worker processes and copy.deepcopy see the values, never the lock.
    def __reduce__(self) -> tuple[Any, ...]:
        return (LiveConfig, (self.copy(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> "LiveConfig":
        return LiveConfig(copy.deepcopy(self._data, memo))

    def copy(self) -> dict[str, Any]:
        """A deep, independent copy of the current values as a plain dict (for ``json.dumps``,
        ``yaml.safe_dump``, a logger's config)."""
        with self._lock:
            return copy.deepcopy(self._data)

    def swap(self, values: dict[str, Any]) -> None:
        """Replace every value at once (``values`` becomes the content; do not keep using it)."""
        with self._lock:
            self._data = values


def at_path(values: Any, path: Sequence[str], default: Any = None) -> Any:
    """``values["a"]["b"]`` for ``path`` ``["a", "b"]`` in nested mappings; ``default`` if absent."""
    for part in path:
        if not isinstance(values, Mapping) or part not in values:
            return default
        values = values[part]
    return values


def parse_yaml(text: str, *, where: str) -> tuple[Any, Marks]:
    """Parse YAML text with ``yaml.safe_load``'s rules; also return where each value was written.

    Raises :class:`HyperparamsError` naming ``where`` and the line for text that does not parse.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise HyperparamsError(f"{at}: the YAML does not parse ({problem}); fix the file") from None
    finally:
        loader.dispose()
    marks: Marks = {}
    if node is not None:
        _marks(node, data, (), marks)
    return data, marks


def _marks(node: yaml.Node, value: Any, path: tuple[Any, ...], out: Marks) -> None:
    raw = node.value if isinstance(node, yaml.ScalarNode) else None
    out[path] = (node.start_mark.line + 1, raw)
    if isinstance(node, yaml.MappingNode) and isinstance(value, dict):
        by_text = {str(k): k for k in value}
        for key_node, value_node in node.value:
            key = by_text.get(str(key_node.value)) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None:
                _marks(value_node, value[key], path + (key,), out)
    elif isinstance(node, yaml.SequenceNode) and isinstance(value, list):
        for i, (item_node, item) in enumerate(zip(node.value, value)):
            _marks(item_node, item, path + (i,), out)


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``'s rules (never constructs arbitrary objects)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise HyperparamsError(f"hyperparameter file {path} does not exist; check the path "
                               f"(relative paths are taken from {Path.cwd()})") from None
    except UnicodeDecodeError as exc:
        raise HyperparamsError(f"hyperparameter file {path} is not UTF-8 text ({exc})") from None
    data, _ = parse_yaml(text, where=str(path))
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
        return LiveConfig(load_yaml(path)), path
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
    if isinstance(obj, LiveConfig):
        obj.swap(copy.deepcopy(dict(values)))  # all at once, like a reload
        return
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
