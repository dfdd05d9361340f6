"""The ledger: one global, thread-safe registry of the named live objects of a training run.

A training script registers its model, optimizer, hyperparameters, ... once (the ``wl.register_*``
functions of :mod:`weightslab.registration`); every other part of weightslab finds them here by kind
and name. Names default to ``"main"``; registering a name again
replaces the object. Listeners (the checkpoint system) hear of every registration and removal;
they are called after the ledger's lock is released, so a listener may take its own locks
without risking a lock-order deadlock with threads that read the ledger.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import NotRegisteredError, RegistrationError

__all__ = ["KINDS", "DEFAULT_NAME", "Entry", "Ledger", "LEDGER"]

log = logging.getLogger(__name__)

KINDS = ("model", "optimizer", "scheduler", "hyperparams", "dataloader", "scaler", "state")
DEFAULT_NAME = "main"


@dataclass(frozen=True)
class Entry:
    """One registered object."""

    kind: str
    name: str
    obj: Any  # the live object (for "state": the getter)
    source: Path | None = None  # the YAML file hyperparameters came from
    setter: Callable[[Any], None] | None = None  # for "state" entries


Listener = Callable[[str, Entry, "Entry | None"], None]  # (event, entry, replaced entry)


class Ledger:
    """Named live objects by kind. All methods are safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        self._listeners: list[Listener] = []

    def register(self, entry: Entry) -> Entry:
        if entry.kind not in KINDS:
            raise RegistrationError(f"unknown kind {entry.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(entry.name, str) or not entry.name:
            raise RegistrationError(f"a {entry.kind} name must be a non-empty string, got {entry.name!r}")
        with self._lock:
            previous = self._entries[entry.kind].get(entry.name)
            self._entries[entry.kind][entry.name] = entry
            listeners = list(self._listeners)
        for listener in listeners:
            listener("register", entry, previous)
        return entry

    def get(self, kind: str, name: str = DEFAULT_NAME) -> Entry:
        with self._lock:
            entry = self._entries[kind].get(name)
            if entry is None:
                known = sorted(self._entries[kind])
                have = f"registered {kind}s: {known}" if known else f"no {kind} is registered at all"
                raise NotRegisteredError(
                    f"no {kind} named {name!r} is registered ({have}); register it with "
                    f"wl.register_{kind}({name!r}, ...)")
            return entry

    def unregister(self, name: str = DEFAULT_NAME, *, kind: str | None = None) -> list[Entry]:
        if kind is not None and kind not in KINDS:
            raise RegistrationError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
        with self._lock:
            kinds = [kind] if kind else list(KINDS)
            removed = [self._entries[k].pop(name) for k in kinds if name in self._entries[k]]
            listeners = list(self._listeners)
            if not removed:
                what = f"{kind} " if kind else ""
                raise NotRegisteredError(f"nothing {what}named {name!r} is registered; "
                                         f"registered: {self._listing()}")
        for entry in removed:
            for listener in listeners:
                listener("unregister", entry, None)
        return removed

    def entries(self, kind: str) -> dict[str, Entry]:
        """A copy of the entries of one kind, in registration order."""
        with self._lock:
            return dict(self._entries[kind])

    def objects(self, kind: str) -> dict[str, Any]:
        with self._lock:
            return {name: e.obj for name, e in self._entries[kind].items()}

    def _listing(self) -> dict[str, list[str]]:
        return {kind: list(names) for kind, names in self._entries.items() if names}

    def list_registered(self) -> dict[str, list[str]]:
        with self._lock:
            return self._listing()

    def is_empty(self) -> bool:
        with self._lock:
            return not any(self._entries.values())

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(event, entry, previous)`` on every change; returns an unsubscribe function."""
        with self._lock:
            self._listeners.append(listener)

        def unsubscribe() -> None:
            with self._lock:
                if listener in self._listeners:
                    self._listeners.remove(listener)
        return unsubscribe

    def clear(self) -> None:
        """Forget every registration (listeners are told of each removal)."""
        with self._lock:
            removed = [e for by_name in self._entries.values() for e in by_name.values()]
            self._entries = {kind: {} for kind in KINDS}
            listeners = list(self._listeners)
        for entry in removed:
            for listener in listeners:
                listener("unregister", entry, None)


#: The process-wide ledger behind the ``wl.register_*`` functions.
LEDGER = Ledger()
