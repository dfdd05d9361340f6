"""A YAML hyperparameter file that a person edits while the run trains.

``wl.register_hyperparams("config", "config.yaml")`` returns a :class:`~weightslab.hyperparams.LiveConfig`
and, while a checkpoint system runs, a :class:`ConfigFile` watches the file:

* the watchdog package watches the file's *directory*, because editors save by writing another
  file and renaming it over the original (vim, IDEs), which a watch on the file itself loses;
* the observer thread only counts events. Once no event came for ``debounce`` seconds (editors write
  in bursts), the file's reader thread reads it and parses and checks it: at most
  :data:`~weightslab.hyperparams.MAX_FILE_BYTES` bytes, :data:`~weightslab.hyperparams.MAX_NODES`
  values once aliases are expanded, :data:`~weightslab.hyperparams.MAX_DEPTH` levels, with the C
  parser where PyYAML has it. A YAML alias bomb, a huge file, a directory or a pipe in the file's
  place is refused there with a warning, and the training loop never waits for it;
* at the next step boundary the training thread merges the parsed version into the live values
  (cheap) and checks the values bound to an optimizer as the optimizer would (``check``);
* an edit is applied as a whole or not at all: the new values are built apart and swapped into
  the live object in one step, so nothing reading it ever sees half an edit;
* only what the edit changed is applied (a three-way merge against the file's previous version),
  so values the run set at runtime survive every reload; a key deleted from the file keeps its
  value, because the training code may still read it;
* values YAML 1.1 misreads (``1e-3`` is a string, ``on`` a boolean, ``1.10`` the float 1.1) are
  coerced to the type the key has in the run, with a warning naming the key; an empty, half-written,
  unparsable or oversized file, a value of the wrong type, or a value the optimizer refuses keeps
  the previous configuration and logs a warning naming the file and the line or the limit.

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
from typing import Any, Callable, Iterable, Mapping

from .errors import HyperparamsError
from .hyperparams import LiveConfig, Marks, at_path, parse_yaml, read_config, restore_in_place, to_plain

__all__ = ["Check", "ConfigFile", "Edit", "WATCH_MODES", "apply_edits", "fork_edits", "merge_edit"]

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


@dataclass(frozen=True)
class _Version:
    """One version of the file as the reader thread read it: parsed and checked, or refused."""

    events: int  # the file events seen before it was read
    content: bytes | None  # None: the file is missing
    data: dict[str, Any] | None = None  # the parsed values (None: refused)
    marks: Marks | None = None
    problem: str | None = None  # why it was refused


#: What a check of an edit is given: the live values, the edit's new values, where each value was
#: written, and the file's name; it raises HyperparamsError to refuse the whole edit.
Check = Callable[[Mapping[str, Any], Mapping[str, Any], Marks, str], None]


class ConfigFile:
    """Watches one YAML file: its reader thread reads and parses each settled version, and the
    training thread takes accepted edits at step boundaries (:meth:`poll`).

    Reading and parsing, bounded by :func:`~weightslab.hyperparams.read_config` and
    :func:`~weightslab.hyperparams.parse_yaml` (size, values after alias expansion, depth), happen
    on the reader thread, so a hostile or huge file costs the training loop nothing; a version
    refused there is logged there. The training thread only merges a parsed version into the live
    values and runs ``check`` (the optimizer's rules for bound values): cheap, and against the live
    values as they are at the boundary.
    """

    def __init__(self, path: Path, live: LiveConfig, *, watch: str = "auto",
                 debounce: float = DEBOUNCE_SECONDS, check: Check | None = None):
        if watch not in WATCH_MODES:
            raise ValueError(f"watch must be one of {', '.join(WATCH_MODES)}, got {watch!r}")
        self.path = Path(path)
        self.live = live
        self.debounce = debounce
        self._check = check
        self._cond = threading.Condition()
        self._events = 0  # file events seen by the observer thread
        self._last_event = 0.0
        self._read_at = 0  # the events seen when the reader last read the file
        self._ready: _Version | None = None  # read and parsed, not yet taken by the training thread
        self._closing = False
        self._said: tuple[bytes | None, str] | None = None  # the last refusal logged: (content, why), said once
        first = self._load(0)
        self._content = first.content  # the bytes last read
        self._decided = first.content  # the bytes of the last version the training thread acted on
        # the file's values as last accepted (the run may have changed its live values since)
        self._before = first.data if first.data is not None else live.copy()
        self._observer: Any = None
        self._reader: threading.Thread | None = None
        if watch != "off":
            self._observer = self._start(watch)
            if self._observer is not None:
                self._reader = threading.Thread(target=self._read_settled, name=f"weightslab-config-{self.path.name}",
                                                daemon=True)
                self._reader.start()

    # --- the observer thread ----------------------------------------------------------------
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

    # --- the reader thread ------------------------------------------------------------------
    def _read_settled(self) -> None:
        """Read and parse the file each time it settles (no event for ``debounce`` seconds: editors
        write in bursts), until :meth:`close`."""
        while True:
            with self._cond:
                while not self._closing:
                    if self._events != self._read_at:
                        quiet = time.monotonic() - self._last_event
                        if quiet >= self.debounce:
                            break
                        self._cond.wait(self.debounce - quiet)
                    else:
                        self._cond.wait()
                if self._closing:
                    return
                events = self._events
            try:
                version = self._load(events)
            except Exception as exc:  # noqa: BLE001 - never let this thread die: the run keeps its config
                version = _Version(events, None, problem=f"{self.path} could not be read ({type(exc).__name__}: "
                                                         f"{exc})")
            # Said before the version is published (not under the lock: a slow log handler must not
            # hold up poll()), so that whoever sees this version settled also sees the warning.
            # (Only this thread writes _said.)
            if version.problem is not None and (version.content, version.problem) != self._said:
                log.warning("%s. The previous configuration is kept and training goes on",
                            version.problem.rstrip("."))
            with self._cond:
                self._read_at = events
                self._content = version.content
                if version.problem is not None:
                    self._ready = None  # the file as it is now is refused; an older version is not applied
                    self._said = (version.content, version.problem)
                else:
                    self._said = None
                    self._ready = version if version.content != self._decided else None
                self._cond.notify_all()

    def _load(self, events: int) -> _Version:
        """Read, parse and check the file as it is now (on the reader thread, and once at start)."""
        where = str(self.path)
        try:
            content = read_config(self.path, missing_ok=True)
        except HyperparamsError as exc:
            return _Version(events, None, problem=str(exc))
        if content is None:
            return _Version(events, None, problem=f"hyperparameter file {where} is gone (deleted, or being replaced); "
                                                  "edits apply again once it is back")
        try:
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise HyperparamsError(f"{where} is not UTF-8 text ({exc})") from None
            data, marks = parse_yaml(text, where=where)
            if data is None:
                raise HyperparamsError(f"{where}, line 1: the file is empty (an editor may be half-way through "
                                       "saving it)")
            if not isinstance(data, dict):
                raise HyperparamsError(f"{where}, line 1: the file must hold a mapping of names to values, but "
                                       f"holds a {type(data).__name__}")
            to_plain(data, where=where)
        except HyperparamsError as exc:
            return _Version(events, content, problem=str(exc))
        return _Version(events, content, data, marks)

    # --- what any thread may ask ------------------------------------------------------------
    def wait_for_events(self, count: int, timeout: float) -> bool:
        """Wait until the watcher has seen at least ``count`` events of the file since it started."""
        with self._cond:
            return self._cond.wait_for(lambda: self._events >= count, timeout)

    def wait_until_read(self, timeout: float) -> bool:
        """Wait until the reader has read the file after every event seen so far."""
        with self._cond:
            return self._cond.wait_for(lambda: self._read_at == self._events or self._closing, timeout)

    @property
    def events(self) -> int:
        with self._cond:
            return self._events

    @property
    def settled(self) -> bool:
        """True when the file was read after every event the watcher saw, and the version read was
        refused, unchanged, or taken by the training thread."""
        with self._cond:
            return self._read_at == self._events and self._ready is None

    @property
    def content(self) -> bytes | None:
        """The file's bytes as last read (None if it was missing or could not be read)."""
        with self._cond:
            return self._content

    @property
    def watching(self) -> bool:
        return self._observer is not None

    def close(self) -> None:
        """Stop watching (joins the observer and reader threads). Idempotent."""
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.join()

    # --- the training thread ----------------------------------------------------------------
    def poll(self) -> Edit | None:
        """Called at a step boundary: the edit to apply now, if the file settled into a new version
        the reader parsed and checked since the last call, and it merges into the live values;
        None otherwise (nothing happened, the file is still being written or read, or the new
        version was refused with a warning). Never reads nor parses the file."""
        with self._cond:
            version = self._ready
            if version is None or version.events != self._events:
                return None  # nothing new, or the file changed since it was read: the reader reads it again
            self._ready = None
            self._decided = version.content
        assert version.data is not None and version.marks is not None
        where = str(self.path)
        try:
            edit = merge_edit(self.live, self._before, version.data, version.marks, where=where)
            if self._check is not None and edit.changed:
                self._check(self.live, edit.values, version.marks, where)
        except HyperparamsError as exc:
            log.warning("%s. The previous configuration is kept and training goes on", str(exc).rstrip("."))
            return None
        self._before = version.data
        for warning in edit.warnings:
            log.warning("%s", warning)
        return edit if edit.changed else None
