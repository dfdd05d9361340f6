"""A YAML hyperparameter file that a person edits while the run trains.

``wl.register_hyperparams("config", "config.yaml")`` returns a :class:`~weightslab.hyperparams.LiveConfig`
and, while a checkpoint system runs, a :class:`ConfigFile` watches the file:

* the watchdog package watches the file's *directory*, because editors save by writing another
  file and renaming it over the original (vim, IDEs), which a watch on the file itself loses;
* the watcher thread only counts events. At the next step boundary, once no event came for
  ``debounce`` seconds (editors write in bursts), the training thread reads the file, compares
  its bytes with the last version it read, and parses, checks and merges the edit;
* an edit is applied as a whole or not at all: the new values are built apart and swapped into
  the live object in one step, so nothing reading it ever sees half an edit;
* only what the edit changed is applied (a three-way merge against the file's previous version),
  so values the run set at runtime survive every reload; a key deleted from the file keeps its
  value, because the training code may still read it;
* values YAML 1.1 misreads (``1e-3`` is a string, ``on`` a boolean, ``1.10`` the float 1.1) are
  coerced to the type the key has in the run, with a warning naming the key; an empty, half-written
  or unparsable file, or a value of the wrong type, keeps the previous configuration and logs a
  warning naming the file and the line.

:func:`merge_edit` is the pure policy; :class:`ConfigFile` does the watching and reading.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import HyperparamsError
from .hyperparams import LiveConfig, Marks, at_path, parse_yaml, restore_in_place, to_plain

__all__ = ["ConfigFile", "Edit", "WATCH_MODES", "apply_edits", "fork_edits", "merge_edit"]

log = logging.getLogger(__name__)

#: ``"auto"``: the operating system's file events (inotify, FSEvents, ...), falling back to
#: polling; ``"poll"``: stat the directory twice a second (network filesystems, where events
#: do not arrive); ``"off"``: read the file once, at registration.
WATCH_MODES = ("auto", "poll", "off")
DEBOUNCE_SECONDS = 0.2
_MISSING = object()


@dataclass(frozen=True)
class Edit:
    """The outcome of one accepted edit of the file."""

    values: dict[str, Any]  # the new live values: a fresh object, ready to be swapped in
    changed: tuple[str, ...]  # "optimizer.lr: 0.1 -> 0.01", one per value that changed
    warnings: tuple[str, ...]  # coercions and deleted keys, each naming the key


_ABSENT = object()


def fork_edits(saved: Mapping[str, Any], registered: Iterable[str], overrides: Mapping[str, Any], *,
               where: str) -> dict[str, Edit]:
    """A fork's ``overrides`` (``optimizer__lr=0.01``: ``__`` separates nested keys) as edits of
    the ``saved`` hyperparameters of checkpoint ``where``, by registration name. Each key must exist
    in exactly one of the ``registered`` hyperparameters; raises before anything changes."""
    registered = list(registered)
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        path = key.split("__")
        owners = [n for n in registered if at_path(saved.get(n), path, _ABSENT) is not _ABSENT]
        dotted = ".".join(path)
        if len(owners) != 1:
            known = {n: sorted(v) for n, v in saved.items() if isinstance(v, Mapping)}
            problem = "no registered hyperparameters have" if not owners else f"{owners} all have"
            raise HyperparamsError(f"wl.fork: {problem} the key {dotted!r} in checkpoint {where} (its keys: "
                                   f"{known}); overrides change existing keys, nested ones written with '__' "
                                   "(optimizer__lr=0.01)")
        target = nested.setdefault(owners[0], {})
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    edits = {}
    for name, after in nested.items():
        to_plain(after, where=f"wl.fork overrides of {name!r}")
        edits[name] = merge_edit(saved[name], {}, after, {}, where=f"wl.fork overrides of {name!r}")
    return edits


def apply_edits(edits: Mapping[str, Edit], hyperparams: Mapping[str, Any]) -> list[str]:
    """Write each edit's values into the registered hyperparameters of its name, in place (the
    objects the training loop holds); return the changed lines, each prefixed with its name."""
    lines = []
    for name, edit in edits.items():
        restore_in_place(hyperparams[name], edit.values, name=name)
        lines += [f"{name}.{line}" for line in edit.changed]
    return lines


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _at(where: str, marks: Marks, path: tuple[Any, ...]) -> str:
    line = marks.get(path, (None, None))[0]
    return f"{where}, line {line}" if line else where


def merge_edit(live: Mapping[str, Any], before: Mapping[str, Any], after: Mapping[str, Any], marks: Marks, *,
               where: str) -> Edit:
    """Apply the change from the file's ``before`` to its ``after`` version onto the run's ``live``
    values; return the new values (``live`` is not touched). Raises :class:`HyperparamsError`,
    naming the file and the line, when a value cannot take the place of the current one."""
    values = copy.deepcopy(dict(live))
    changed: list[str] = []
    warnings: list[str] = []
    _merge(values, before, after, marks, where, (), changed, warnings)
    return Edit(values, tuple(changed), tuple(warnings))


def _merge(target: dict[str, Any], before: Mapping[str, Any], after: Mapping[str, Any], marks: Marks, where: str,
           path: tuple[Any, ...], changed: list[str], warnings: list[str]) -> None:
    for key, new in after.items():
        here = path + (key,)
        old_file = before.get(key, _MISSING)
        if old_file is not _MISSING and type(old_file) is type(new) and old_file == new:
            continue  # the edit did not touch it: whatever the run holds stays
        current = target.get(key, _MISSING)
        if isinstance(new, dict) and isinstance(current, dict):
            _merge(current, old_file if isinstance(old_file, dict) else {}, new, marks, where, here, changed, warnings)
            continue
        value = _coerce(current, new, here, marks, where, warnings)
        if current is _MISSING or type(value) is not type(current) or value != current:
            target[key] = copy.deepcopy(value)
            shown = "(new)" if current is _MISSING else repr(current)
            changed.append(f"{_dotted(here)}: {shown} -> {value!r}")
    for key in before:
        if key not in after and key in target:
            warnings.append(f"{_at(where, marks, path)}: '{_dotted(path + (key,))}' was removed from the file; the "
                            f"run keeps its value {target[key]!r}, since the training code may still read it (set "
                            "another value instead, or restart the run without it)")


def _coerce(current: Any, new: Any, path: tuple[Any, ...], marks: Marks, where: str, warnings: list[str]) -> Any:
    """``new`` in the type of ``current``, or HyperparamsError if it cannot be."""
    if current is _MISSING or current is None:
        return new  # a new key, or one that was unset: any plain value
    kind, got = type(current), type(new)
    if got is kind:
        return new
    raw = marks.get(path, (None, None))[1]
    name = _dotted(path)
    note = None
    if kind is float and got is int:
        return float(new)  # "lr: 1" means 1.0; no surprise worth a warning
    if kind is float and got is str:
        try:
            value: Any = float(new)
            note = (f"'{name}' is {new!r}, which YAML 1.1 reads as a string; used as the float {value!r} like its "
                    f"current value (write it with a dot, e.g. {value!r}, to silence this)")
        except ValueError:
            value = _MISSING
    elif kind is int and got is str:
        try:
            value = int(new.replace("_", ""))
            note = f"'{name}' is the string {new!r}; used as the integer {value} like its current value"
        except ValueError:
            value = _MISSING
    elif kind is int and got is float and new.is_integer():
        value = int(new)
        note = f"'{name}' is {new!r}; used as the integer {value} like its current value"
    elif kind is str and not isinstance(new, (list, dict)):
        value = raw if raw is not None else str(new)
        note = (f"'{name}': YAML 1.1 reads {value!r} as the {got.__name__} {new!r}; kept as the string {value!r} "
                f"like its current value (quote it in the file to silence this)")
    elif kind is tuple and got is list:
        return tuple(new)
    else:
        value = _MISSING
    if value is _MISSING:
        raise HyperparamsError(
            f"{_at(where, marks, path)}: '{name}' must be a {kind.__name__} like its current value {current!r}, "
            f"but the file gives the {got.__name__} {new!r}; fix the value")
    warnings.append(f"{_at(where, marks, path)}: {note}")
    return value


class ConfigFile:
    """Watches one YAML file and hands accepted edits to the training thread at step boundaries."""

    def __init__(self, path: Path, live: LiveConfig, *, watch: str = "auto",
                 debounce: float = DEBOUNCE_SECONDS):
        if watch not in WATCH_MODES:
            raise ValueError(f"watch must be one of {', '.join(WATCH_MODES)}, got {watch!r}")
        self.path = Path(path)
        self.live = live
        self.debounce = debounce
        self._cond = threading.Condition()
        self._events = 0  # file events seen by the watcher thread
        self._handled = 0  # events the training thread has acted on
        self._last_event = 0.0
        self._missing_warned = False
        self._content = self._read()  # the bytes last read
        self._before = self._values_of(self._content, fallback=live)  # the file's values as last accepted
        self._observer: Any = None
        if watch != "off":
            self._observer = self._start(watch)

    # --- the watcher thread -----------------------------------------------------------------
    def _start(self, watch: str) -> Any:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        target = os.path.normcase(str(self.path))
        on_event = self._on_event

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return  # reads of the file, ours included
                paths = (event.src_path, getattr(event, "dest_path", "") or "")
                if any(os.path.normcase(os.fsdecode(p)) == target for p in paths):
                    on_event()

        for make in ((Observer, PollingObserver) if watch == "auto" else (PollingObserver,)):
            observer = make(timeout=0.5) if make is PollingObserver else make()
            try:
                observer.schedule(Handler(), str(self.path.parent), recursive=False)
                observer.start()
            except OSError as exc:  # e.g. no inotify watches left: poll instead
                log.warning("cannot watch %s with %s (%s); polling it instead", self.path, make.__name__, exc)
                continue
            log.debug("watching %s with %s", self.path, type(observer).__name__)
            return observer
        log.warning("cannot watch %s at all; edits of it are not applied while this run trains", self.path)
        return None

    def _on_event(self) -> None:
        with self._cond:
            self._events += 1
            self._last_event = time.monotonic()
            self._cond.notify_all()

    def wait_for_events(self, count: int, timeout: float) -> bool:
        """Wait until the watcher has seen at least ``count`` events of the file since it started."""
        with self._cond:
            return self._cond.wait_for(lambda: self._events >= count, timeout)

    @property
    def events(self) -> int:
        with self._cond:
            return self._events

    @property
    def settled(self) -> bool:
        """True when every event the watcher saw has been acted on at a step boundary."""
        with self._cond:
            return self._handled == self._events

    @property
    def content(self) -> bytes | None:
        """The file's bytes as last read at a step boundary (None if it was missing)."""
        return self._content

    @property
    def watching(self) -> bool:
        return self._observer is not None

    def close(self) -> None:
        """Stop watching (joins the watcher threads). Idempotent."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()

    # --- the training thread ----------------------------------------------------------------
    def _values_of(self, content: bytes | None, *, fallback: LiveConfig) -> dict[str, Any]:
        """The file's values at the start (the run may have changed its live values since)."""
        try:
            data, _ = parse_yaml((content or b"").decode("utf-8"), where=str(self.path))
        except (HyperparamsError, UnicodeDecodeError):
            data = None
        return data if isinstance(data, dict) else fallback.copy()

    def _read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def poll(self) -> Edit | None:
        """Called at a step boundary: the edit to apply now, if the file settled into a new valid
        version since the last call; None otherwise (nothing happened, the file is still being
        written, or the new version was rejected with a warning)."""
        with self._cond:
            if self._handled == self._events or time.monotonic() - self._last_event < self.debounce:
                return None
            self._handled = self._events
        content = self._read()
        if content is None:
            if not self._missing_warned:
                self._missing_warned = True
                log.warning("hyperparameter file %s is gone (deleted, or being replaced); the run keeps its current "
                            "configuration until the file is back", self.path)
            return None
        self._missing_warned = False
        if content == self._content:
            return None
        self._content = content
        try:
            edit = self._accept(content)
        except HyperparamsError as exc:
            log.warning("%s. The previous configuration is kept and training goes on", str(exc).rstrip("."))
            return None
        for warning in edit.warnings:
            log.warning("%s", warning)
        return edit if edit.changed else None

    def _accept(self, content: bytes) -> Edit:
        where = str(self.path)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HyperparamsError(f"{where} is not UTF-8 text ({exc})") from None
        data, marks = parse_yaml(text, where=where)
        if data is None:
            raise HyperparamsError(f"{where}, line 1: the file is empty (an editor may be half-way through saving it)")
        if not isinstance(data, dict):
            raise HyperparamsError(f"{where}, line 1: the file must hold a mapping of names to values, but holds a "
                                   f"{type(data).__name__}")
        to_plain(data, where=where)
        edit = merge_edit(self.live, self._before, data, marks, where=where)
        self._before = data
        return edit
