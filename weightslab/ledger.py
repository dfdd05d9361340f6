"""The ledger: one global, thread-safe registry of the named live objects of a training run.

A training script registers its model, optimizer, hyperparameters, ... once; every other part of
weightslab finds them here by kind and name. Names default to ``"main"``; registering a name again
replaces the object. Listeners (the checkpoint system) hear of every registration and removal;
they are called after the ledger's lock is released, so a listener may take its own locks
without risking a lock-order deadlock with threads that read the ledger.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import hyperparams as _hp
from .errors import NotRegisteredError, RegistrationError

__all__ = [
    "KINDS",
    "Entry",
    "Ledger",
    "LEDGER",
    "register_model",
    "register_optimizer",
    "register_scheduler",
    "register_hyperparams",
    "register_dataloader",
    "register_scaler",
    "register_state",
    "get_model",
    "get_optimizer",
    "get_scheduler",
    "get_hyperparams",
    "get_dataloader",
    "get_scaler",
    "get_state",
    "unregister",
    "list_registered",
]

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
        if self is LEDGER and "weightslab.system" not in sys.modules:
            # The checkpoint system subscribes to this ledger when it is imported (and starts with the
            # first registration); `import weightslab` defers that import to the first use.
            importlib.import_module("weightslab.system")
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


def _split(kind: str, name: Any, obj: Any) -> tuple[str, Any]:
    """Allow ``register_x(obj)`` as well as ``register_x(name, obj)``."""
    if obj is None:
        if name is None:
            raise RegistrationError(f"register_{kind} needs the object to register")
        return DEFAULT_NAME, name
    if not isinstance(name, str):
        raise RegistrationError(f"register_{kind}(name, {kind}): the name must be a string, got "
                                f"{type(name).__name__}; pass register_{kind}({kind}) to use the name 'main'")
    return name, obj


def _require(kind: str, name: str, obj: Any, methods: Iterable[str], hint: str) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise RegistrationError(f"cannot register {type(obj).__name__} as {kind} {name!r}: it has no "
                                f"{' / '.join(missing)}(); {hint}")


def _require_type(kind: str, name: str, obj: Any, cls: type, display: str) -> None:
    if not isinstance(obj, cls):
        raise RegistrationError(f"cannot register {type(obj).__name__} as {kind} {name!r}: it must be a {display}")


def register_model(name: Any = None, model: Any = None) -> Any:
    """Register a ``torch.nn.Module`` (``register_model(model)`` uses the name ``"main"``)."""
    name, model = _split("model", name, model)
    _require_type("model", name, model, torch.nn.Module, "torch.nn.Module")
    LEDGER.register(Entry("model", name, model))
    return model


def register_optimizer(name: Any = None, optimizer: Any = None) -> Any:
    """Register a ``torch.optim.Optimizer``; a post-step hook then finds the step boundaries."""
    name, optimizer = _split("optimizer", name, optimizer)
    _require_type("optimizer", name, optimizer, torch.optim.Optimizer, "torch.optim.Optimizer")
    LEDGER.register(Entry("optimizer", name, optimizer))
    return optimizer


def register_scheduler(name: Any = None, scheduler: Any = None) -> Any:
    """Register a learning-rate scheduler (anything with ``state_dict``/``load_state_dict``)."""
    name, scheduler = _split("scheduler", name, scheduler)
    _require("scheduler", name, scheduler, ("state_dict", "load_state_dict"),
             "use a torch.optim.lr_scheduler scheduler, or register_state for custom objects")
    LEDGER.register(Entry("scheduler", name, scheduler))
    return scheduler


def register_scaler(name: Any = None, scaler: Any = None) -> Any:
    """Register an AMP ``GradScaler`` (anything with ``state_dict``/``load_state_dict``)."""
    name, scaler = _split("scaler", name, scaler)
    _require("scaler", name, scaler, ("state_dict", "load_state_dict"), "use torch.amp.GradScaler")
    LEDGER.register(Entry("scaler", name, scaler))
    return scaler


def register_hyperparams(name: Any = None, hyperparams: Any = None) -> Any:
    """Register hyperparameters: a dict, a dataclass instance, a namespace, or a YAML file's path.

    Returns the live object weightslab tracks (for a YAML path, the dict loaded from it). Mutate it
    in place during training and the change is detected at the next step boundary.
    """
    name, hyperparams = _split("hyperparams", name, hyperparams)
    live, source = _hp.resolve(hyperparams, name=name)
    _hp.to_plain(live, where=f"hyperparameters {name!r}" if source is None else str(source))
    LEDGER.register(Entry("hyperparams", name, live, source=source))
    return live


def register_dataloader(name: Any = None, dataloader: Any = None) -> Any:
    """Register a data loader (its position is saved when it offers ``state_dict()``)."""
    name, dataloader = _split("dataloader", name, dataloader)
    if not hasattr(dataloader, "__iter__"):
        raise RegistrationError(f"cannot register {type(dataloader).__name__} as dataloader {name!r}: "
                                "it is not iterable")
    LEDGER.register(Entry("dataloader", name, dataloader))
    return dataloader


def register_state(name: Any = None, getter: Callable[[], Any] | None = None,
                   setter: Callable[[Any], None] | None = None) -> None:
    """Register any other state by a ``getter()`` returning plain data and a ``setter(value)``.

    The getter may return nested dicts, lists, tuples, numbers, strings, tensors and numpy arrays;
    the setter receives the same structure on resume.
    """
    if callable(name) and setter is None:  # register_state(getter, setter)
        name, getter, setter = DEFAULT_NAME, name, getter
    if name is None:
        name = DEFAULT_NAME
    if not isinstance(name, str):
        raise RegistrationError(f"register_state(name, getter, setter): the name must be a string, got "
                                f"{type(name).__name__}")
    if not callable(getter) or not callable(setter):
        raise RegistrationError(f"register_state({name!r}, getter, setter) needs two callables: getter() "
                                "returning the state and setter(state) restoring it")
    LEDGER.register(Entry("state", name, getter, setter=setter))


def _getter(kind: str) -> Callable[[str], Any]:
    def get(name: str = DEFAULT_NAME) -> Any:
        return LEDGER.get(kind, name).obj
    get.__name__ = f"get_{kind}"
    get.__doc__ = f"The {kind} registered under ``name`` (``'main'`` by default)."
    return get


get_model = _getter("model")
get_optimizer = _getter("optimizer")
get_scheduler = _getter("scheduler")
get_hyperparams = _getter("hyperparams")
get_dataloader = _getter("dataloader")
get_scaler = _getter("scaler")


def get_state(name: str = DEFAULT_NAME) -> Any:
    """The current value of the custom state registered under ``name`` (calls its getter)."""
    return LEDGER.get("state", name).obj()


def unregister(name: str = DEFAULT_NAME, *, kind: str | None = None) -> list[str]:
    """Remove ``name`` from one kind, or from every kind; returns the kinds it was removed from."""
    return [e.kind for e in LEDGER.unregister(name, kind=kind)]


def list_registered() -> dict[str, list[str]]:
    """``{kind: [names...]}`` of everything registered, kinds without entries left out."""
    return LEDGER.list_registered()
