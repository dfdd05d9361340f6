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
import stat
import threading
import types
from pathlib import Path, PurePath
from typing import Any, Iterator, Mapping, MutableMapping, Sequence

import yaml

from .errors import HyperparamsError, RegistrationError

__all__ = ["LiveConfig", "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_NODES", "Marks", "at_path", "load_yaml", "parse_yaml",
           "read_config", "resolve", "to_plain", "signature", "restore_in_place"]

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, str)

# Bounds on hyperparameters, far above real configs (a few hundred values, a few levels deep) and
# far below what stalls a step: a YAML alias bomb of 400 bytes expands to 9**9 strings, a 26 MB file
# took minutes to parse, and a value nested a thousand levels deep breaks every save.
#: A hyperparameter file larger than this is refused without being read.
MAX_FILE_BYTES = 1 << 20
#: The most values (scalars, lists and mappings, mapping keys included) a file may expand to, each
#: alias counted as a copy of what it refers to.
MAX_NODES = 100_000
#: The most lists and mappings a value may be nested in, the top-level mapping included.
MAX_DEPTH = 64

# The C parser (libyaml) where PyYAML was built with it: the same safe rules, about 5 times faster
# (0.55 s against 2.7 s for 40,000 keys here), and it refuses nesting past 1,000 levels by itself.
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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

    Raises :class:`HyperparamsError` naming ``where`` and the line for text that does not parse, and
    for a document beyond the bounds (:data:`MAX_NODES` values once aliases are expanded,
    :data:`MAX_DEPTH` levels, no alias inside itself), checked on the parsed nodes before any
    value is built.
    """
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, where)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if mark else where
        problem = getattr(exc, "problem", None) or str(exc)
        raise HyperparamsError(f"{at}: the YAML does not parse ({problem}); fix the file") from None
    except RecursionError:  # (the pure-Python parser, on nesting the C one refuses by itself)
        raise HyperparamsError(f"{where}: the YAML is nested too deeply to parse (at most {MAX_DEPTH} levels); "
                               "fix the file") from None
    finally:
        loader.dispose()
    marks: Marks = {}
    if node is not None:
        _marks(node, data, (), marks)
    return data, marks


def _check_nodes(root: yaml.Node, where: str) -> None:
    """Refuse a document whose values, aliases expanded, are too many, too deep or circular.

    Each node is visited once (an alias is the same node object as its anchor, so sizes and heights
    are remembered by node), and the recursion stops at :data:`MAX_DEPTH`: the check costs the
    size of the file, not of its expansion.
    """
    sizes: dict[int, tuple[int, int]] = {}  # node id -> (values it expands to, containers nested in it)
    open_nodes: set[int] = set()

    def line(node: yaml.Node) -> str:
        return f"{where}, line {node.start_mark.line + 1}"

    def visit(node: yaml.Node, depth: int) -> tuple[int, int]:
        """``depth``: the containers around ``node``."""
        key = id(node)
        if key in open_nodes:
            raise HyperparamsError(f"{line(node)}: an alias refers to a value that contains it (a circular value, "
                                   "which cannot be saved); fix the file")
        known = sizes.get(key)
        if known is None:
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [child for pair in node.value for child in pair]
            else:
                children = []
            size, height = 1, 0 if isinstance(node, yaml.ScalarNode) else 1
            if height and depth + 1 > MAX_DEPTH:
                raise HyperparamsError(f"{line(node)}: values are nested more than {MAX_DEPTH} levels deep (the limit "
                                       "for hyperparameters); flatten the file")
            open_nodes.add(key)
            for child in children:
                child_size, child_height = visit(child, depth + 1)
                size += child_size
                height = max(height, child_height + 1)
                if size > MAX_NODES:
                    raise HyperparamsError(f"{line(node)}: the file expands to more than {MAX_NODES:,} values (the "
                                           "limit for hyperparameters; each alias counts as a copy of what it refers "
                                           "to); fix the file")
            open_nodes.discard(key)
            known = sizes[key] = (size, height)
        if depth + known[1] > MAX_DEPTH:
            raise HyperparamsError(f"{line(node)}: values are nested more than {MAX_DEPTH} levels deep (the limit for "
                                   "hyperparameters); flatten the file")
        return known

    visit(root, 0)


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


def read_config(path: str | os.PathLike[str], *, missing_ok: bool = False) -> bytes | None:
    """The bytes of a hyperparameter file, read only if it is a regular file of at most
    :data:`MAX_FILE_BYTES`; anything else raises :class:`HyperparamsError` naming the path and what
    to do. With ``missing_ok``, a missing file is None (a watched file between an editor's rename
    and the next)."""
    path = Path(path)
    try:
        # O_NONBLOCK: a FIFO put in the file's place must not block the reader until a writer comes
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise HyperparamsError(f"hyperparameter file {path} does not exist; check the path "
                               f"(relative paths are taken from {Path.cwd()})") from None
    except IsADirectoryError:
        raise HyperparamsError(_a_directory(path)) from None
    except OSError as exc:
        raise HyperparamsError(f"hyperparameter file {path} cannot be read ({exc.strerror or exc}); pass the path "
                               "of a readable YAML file") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise HyperparamsError(_a_directory(path))
        if not stat.S_ISREG(info.st_mode):
            raise HyperparamsError(f"hyperparameter file {path} is not a regular file (a pipe, socket or device); "
                                   "pass the path of a YAML file")
        limit = MAX_FILE_BYTES
        too_big = (f"hyperparameter file {path} is larger than {limit:,} bytes, the limit for a config file; keep "
                   "large data out of it (write the path of a data file in the config instead)")
        if info.st_size > limit:
            raise HyperparamsError(too_big.replace("is larger than", f"is {info.st_size:,} bytes, more than"))
        chunks, size = [], 0
        while size <= limit:  # (the file may grow after the stat)
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise HyperparamsError(too_big)
        return b"".join(chunks)
    except OSError as exc:
        raise HyperparamsError(f"hyperparameter file {path} cannot be read ({exc.strerror or exc}); pass the path "
                               "of a readable YAML file") from None
    finally:
        os.close(fd)


def _a_directory(path: Path) -> str:
    try:
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".yaml", ".yml"))[:5]
    except OSError:
        inside = []
    example = path / (inside[0] if inside else "config.yaml")
    holds = f" (YAML files in it: {', '.join(inside)})" if inside else ""
    return (f"hyperparameter file {path} is a directory{holds}, not a YAML file; register the path of a YAML file, "
            f"such as register_hyperparams(name, {str(example)!r})")


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``'s rules (never constructs arbitrary objects),
    within the bounds of :func:`read_config` and :func:`parse_yaml`."""
    path = Path(path)
    content = read_config(path) or b""
    try:
        text = content.decode("utf-8")
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
    without pickle; so do values nested in more than :data:`MAX_DEPTH` lists and mappings (every
    save would fail on them) and a container that contains itself.
    """
    return _plain(obj, where, "", 0, {})


def _plain(value: Any, where: str, key: str, depth: int, open_containers: dict[int, str]) -> Any:
    """``depth``: the containers around ``value``; ``open_containers``: their ids -> their keys."""
    if isinstance(value, enum.Enum):
        return _plain(value.value, where, key, depth, open_containers)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, (PurePath, _dt.date, _dt.time)):
        return value
    mapping = isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)) \
        or isinstance(value, (argparse.Namespace, types.SimpleNamespace))
    if mapping or isinstance(value, (list, tuple)):
        here = key if len(key) <= 120 else f"{key[:60]}...{key[-50:]}"
        here = here or "<top>"
        if id(value) in open_containers:
            outer = open_containers[id(value)] or "<top>"
            raise HyperparamsError(f"{where}: '{here}' is '{outer}' itself (a value that contains itself cannot be "
                                   "saved or hashed); put a copy there, or remove the reference")
        if depth >= MAX_DEPTH:
            raise HyperparamsError(f"{where}: '{here}' is nested more than {MAX_DEPTH} levels deep, the limit for "
                                   "hyperparameters (deeper values cannot be saved); flatten it")
        open_containers[id(value)] = key
        try:
            if not mapping:
                items = [_plain(v, where, f"{key}[{i}]", depth + 1, open_containers) for i, v in enumerate(value)]
                return tuple(items) if isinstance(value, tuple) else items
            out = {}
            for k, v in _fields(value).items():
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise HyperparamsError(f"{where}: key {k!r} under '{here}' is a {type(k).__name__}; "
                                           "hyperparameter keys must be strings or numbers")
                out[k] = _plain(v, where, f"{key}.{k}" if key else str(k), depth + 1, open_containers)
            return out
        finally:
            del open_containers[id(value)]
    # numpy and torch scalars are common in configs; accept them as their Python value.
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return _plain(item(), where, key, depth, open_containers)
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
