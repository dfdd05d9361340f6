"""The process-wide checkpoint system, and the module-level functions that act on it.

One training process has one checkpoint system. :func:`get_checkpoint_system` creates it (or returns
the running one); the first ``wl.register_*`` starts one with default settings if none runs
(:func:`ensure_running`), and a later :func:`get_checkpoint_system` with other settings replaces it
as long as it has saved nothing (the callbacks subscribed with ``wl.on`` move to the new one).
``wl.checkpoint_on_step``, the other triggers and ``wl.on`` / ``wl.off`` act on it.

:func:`manager_for` gives the Python root operations (``wl.verify``, ``wl.load``, ...) the manager of
a root: the running system's own when it is the same root (sharing its caches, and seeing what a
remote root has not uploaded yet), else one opened on the existing root.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import CheckpointConfig, make_config
from .errors import ConfigError
from .events import check_event
from .storage.manager import CheckpointManager
from .storage.remote import is_remote
from .storage.root import Root, default_location
from .system import AutomaticCheckpointSystem

__all__ = ["get_checkpoint_system", "running_system", "ensure_running", "manager_for", "checkpoint_on_step",
           "checkpoint_on_model_change", "checkpoint_on_config_change", "checkpoint_on_state_change", "fork",
           "on", "off"]

log = logging.getLogger(__name__)

_SYSTEM: AutomaticCheckpointSystem | None = None
_LOCK = threading.RLock()


def get_checkpoint_system(**settings: Any) -> AutomaticCheckpointSystem:
    """Create the process-wide checkpoint system, or return the running one.

    Settings are those of :class:`CheckpointConfig`. Called again with settings that differ from
    the running system's: if that system has not saved anything yet (for instance it was started
    with defaults by the first ``register_*`` call), it is replaced by one with the new settings;
    once it has saved, a :class:`ConfigError` names the differences (close it first to change them).
    """
    global _SYSTEM
    if settings.pop("auto_init", True) is not True:
        raise ConfigError("auto_init=False is not supported: the checkpoint system always reads the registered "
                          "objects from the ledger; remove the argument")
    with _LOCK:
        current = running_system()
        if current is None:
            _SYSTEM = AutomaticCheckpointSystem(make_config(settings))
            return _SYSTEM
        if not settings:
            return current
        try:
            wanted = dataclasses.replace(current.config, **settings)
        except TypeError as exc:
            valid = ", ".join(f.name for f in dataclasses.fields(CheckpointConfig))
            raise ConfigError(f"{exc}; the checkpoint system's settings are: {valid}") from None
        if wanted == current.config:
            return current
        differences = ", ".join(f"{f.name}: {getattr(current.config, f.name)!r} -> {getattr(wanted, f.name)!r}"
                                for f in dataclasses.fields(CheckpointConfig)
                                if getattr(current.config, f.name) != getattr(wanted, f.name))
        if current.has_saved:
            raise ConfigError(f"the checkpoint system is already running and has saved checkpoints, with other "
                              f"settings ({differences}); call system.close() first to start one with new settings")
        log.info("reconfiguring the checkpoint system (%s)", differences)
        current._close(crashed=True)  # nothing saved yet: no final checkpoint to take
        _SYSTEM = AutomaticCheckpointSystem(wanted)
        _SYSTEM.events.adopt(current.events)  # (wl.on may have come first, and started the system)
        return _SYSTEM


def running_system() -> AutomaticCheckpointSystem | None:
    """The process-wide system if one runs (never starts one)."""
    with _LOCK:
        return _SYSTEM if _SYSTEM is not None and not _SYSTEM.closed else None


def ensure_running() -> None:
    """Start the process-wide system with default settings if none runs (the first registration)."""
    with _LOCK:
        if running_system() is None:
            get_checkpoint_system()


def manager_for(root: str | os.PathLike[str] | None = None) -> CheckpointManager:
    """The checkpoint manager of ``root``; by default the running system's root, else
    ``$WEIGHTSLAB_ROOT`` or ``./experiments``. Raises :class:`~weightslab.errors.NotARootError` if
    there is no weightslab root there.

    A remote root's URL gives the manager of a local mirror of its manifests (fetched now), which
    fetches packs when it reads them."""
    system = running_system()
    if system is not None:
        if root is None or (system.config.root_log_dir == root if is_remote(root)
                            else system.root == Path(root).expanduser().absolute()):
            return system.manager  # shares the blob index and caches of the running system
    return CheckpointManager(Root.existing(root if root is not None else default_location()))


def checkpoint_on_step(step: int, metrics: Mapping[str, Any] | None = None) -> bool:
    """Mark the end of step ``step`` for the process-wide system (see
    :meth:`AutomaticCheckpointSystem.checkpoint_on_step`)."""
    return get_checkpoint_system().checkpoint_on_step(step, metrics)


def fork(ref: str | os.PathLike[str], *, name: str | None = None, **overrides: Any) -> int:
    """Start a new branch of the run from checkpoint ``ref`` (see :meth:`AutomaticCheckpointSystem.fork`)::

        start = wl.fork("baseline@1000", name="lr-sweep-2", optimizer__lr=0.01)
    """
    return get_checkpoint_system().fork(ref, name=name, **overrides)


def checkpoint_on_model_change() -> bool:
    """Checkpoint now because the architecture changed."""
    return get_checkpoint_system().checkpoint_on_model_change()


def checkpoint_on_config_change() -> bool:
    """Checkpoint now because the hyperparameters changed."""
    return get_checkpoint_system().checkpoint_on_config_change()


def checkpoint_on_state_change(kind: str = "state") -> bool:
    """Checkpoint now because the model state changed (``'freeze'``, ``'reset'``, ...)."""
    return get_checkpoint_system().checkpoint_on_state_change(kind)


def on(event: str, fn: Callable[[Any], Any] | None = None, *, priority: int = 0) -> Any:
    """Subscribe ``fn`` to ``event`` of the process-wide system; returns ``fn``, or a decorator without it
    (see :mod:`weightslab.events`)::

        @wl.on("saved")
        def upload(event):            # on the weightslab-events thread, once the checkpoint is durable
            bucket.upload(event.path)
    """
    return get_checkpoint_system().on(event, fn, priority=priority)


def off(event: str, fn: Callable[[Any], Any]) -> bool:
    """Unsubscribe ``fn`` from ``event`` of the process-wide system; False if it was not subscribed."""
    system = running_system()
    if system is None:
        check_event(event)
        return False
    return system.off(event, fn)
