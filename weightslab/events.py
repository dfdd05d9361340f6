"""The events of a checkpoint system, and the user's callbacks subscribed to them.

A training script acts when something happens to its checkpoints: upload one once it is durable,
add metadata to the next, page someone when a save fails, reset a logger after a resume::

    @system.on("saved")
    def upload(event: Saved) -> None:        # on the weightslab-events thread
        bucket.upload(event.path)

    @system.on("before_save", priority=10)   # on the training thread, before the state is captured
    def tag(event: BeforeSave) -> None:
        event.metadata["git"] = GIT_COMMIT   # plain JSON; written into the checkpoint's manifest

The events (:data:`EVENTS`) and the thread their callbacks run on:

- ``before_save`` (:class:`BeforeSave`): the training thread, before the state is captured; a
  callback may add plain-JSON ``metadata``, which the manifest keeps (``CheckpointInfo.metadata``).
- ``saved`` (:class:`Saved`): the checkpoint is committed and fsynced (it survives a crash now).
- ``save_failed`` (:class:`SaveFailed`): a save was not taken, with the error.
- ``before_load`` / ``loaded`` (:class:`Load`): around a resume or a fork, on the training thread:
  before anything registered changes (the checkpoint was read and verified), and once the run
  continues from it.
- ``verified`` (:class:`Verified`): ``wl.verify`` finished, on its caller's thread.
- ``experiment_opened`` (:class:`ExperimentOpened`): the run entered an experiment no record
  names yet (the first of a fresh run, a change, a fork, a branch), on the training thread.
- ``pruned`` (:class:`Pruned`): retention deleted checkpoints.

``saved``, ``save_failed`` and ``pruned`` happen on the background writer (or must not make the
training loop wait): their callbacks run on one ``weightslab-events`` thread, in the order the
events happened, so a callback that uploads for a minute holds neither training nor the writer.
``wait()`` and ``close()`` of the system wait for the events dispatched so far (``close()`` at most
``callback_timeout`` seconds, then warns and goes on). The other events' callbacks run where the
event happens, before the system goes on.

Callbacks of one event run by ``priority``, highest first, then in the order they subscribed.
A callback that raises is logged with its qualified name and the event, and kept
(:class:`~weightslab.failures.Failures`); the other callbacks and training go on. Under
``strict=True``, ``wait()`` / ``close()`` then raise :class:`CallbackError`. A callback must not call
the system's triggers (``checkpoint_on_step``, ``resume``, ``fork``); ``wait()`` called from a
``weightslab-events`` callback does not wait for the events thread (it would wait for itself).
"""

from __future__ import annotations

import collections
import copy
import itertools
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence, TypeVar

from .errors import CheckpointSaveError, ConfigError

if TYPE_CHECKING:
    from .failures import Failures
    from .storage.manager import VerifyReport

__all__ = ["EVENTS", "Events", "CallbackError", "BeforeSave", "Saved", "SaveFailed", "Load", "Verified",
           "ExperimentOpened", "Pruned", "check_event", "check_metadata", "MAX_METADATA_BYTES"]

log = logging.getLogger(__name__)

#: Every event a callback may subscribe to.
EVENTS = ("before_save", "saved", "save_failed", "before_load", "loaded", "verified", "experiment_opened", "pruned")
#: The events whose callbacks run on the ``weightslab-events`` thread.
BACKGROUND = frozenset({"saved", "save_failed", "pruned"})
#: The most metadata one checkpoint carries, as compact JSON (every listing reads manifests).
MAX_METADATA_BYTES = 64 * 1024
_MAX_DEPTH = 32

F = TypeVar("F", bound=Callable[..., Any])


# --- what a callback receives -------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class BeforeSave:
    """A checkpoint is about to be taken (``before_save``; the training thread). Put plain JSON
    (dicts with string keys, lists, strings, finite numbers, booleans, None) into ``metadata``: it
    is checked after each callback and written into the manifest."""

    event: str
    experiment: str
    step: int
    reasons: tuple[str, ...]  # why it is taken: "step", "config_change", "exit", ...
    metrics: Mapping[str, float]  # the metrics reported at this step
    metadata: dict[str, Any] = field(default_factory=dict)  # what the callbacks add

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"


@dataclass(frozen=True, kw_only=True)
class Saved:
    """A checkpoint is durable (``saved``): its manifest, the commit point, is written and fsynced
    after its pack. On a remote root, ``path`` is in the local staging root and the upload follows."""

    event: str
    ref: str  # "<experiment>@<step>", usable in every ref
    experiment: str
    step: int
    reasons: tuple[str, ...]
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]  # what the before_save callbacks added
    nbytes: int  # stored bytes of every tensor the checkpoint references (deduplicated ones included)
    bytes_written: int  # what this save added to the root: tensor bytes no earlier checkpoint held, and the manifest
    path: Path  # the manifest
    root: Path


@dataclass(frozen=True, kw_only=True)
class SaveFailed:
    """A checkpoint was not taken (``save_failed``): ``error`` says why (it is also kept, and raised
    from ``wait()`` / ``close()``)."""

    event: str
    ref: str
    experiment: str
    step: int
    error: BaseException


@dataclass(frozen=True, kw_only=True)
class Load:
    """A resume or a fork (``before_load``: its checkpoint is read and verified, nothing registered
    has changed yet; ``loaded``: the registered objects hold it and the run goes on from it)."""

    event: str
    kind: str  # "resume" or "fork"
    ref: str  # the checkpoint restored
    experiment: str
    step: int  # the step restored: the loop continues at step + 1
    path: Path  # its manifest
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]


@dataclass(frozen=True, kw_only=True)
class Verified:
    """``wl.verify`` checked every byte of ``report.checked`` (``report.ok``, ``report.damaged``)."""

    event: str
    root: Path
    ref: str | None  # the ref asked for; None: every checkpoint of the root
    report: "VerifyReport"


@dataclass(frozen=True, kw_only=True)
class ExperimentOpened:
    """The run entered an experiment that had no record yet (``experiment_opened``)."""

    event: str
    experiment: str
    parent: str | None  # "<experiment>@<step>" it came from; None for the first experiment of a fresh run
    reason: str | None  # "model_change", "config_change", "fork", "restart", "rewind", "resume_with_changes", ...
    differences: tuple[str, ...]  # readable lines: what differs from the parent
    branch: str | None  # a fork's name, or restart-<n> / rewind-<n>


@dataclass(frozen=True, kw_only=True)
class Pruned:
    """Retention deleted these checkpoints (``pruned``); ``wl.gc()`` reclaims their bytes."""

    event: str
    refs: tuple[str, ...]
    root: Path

    @classmethod
    def of(cls, records: Sequence[Any], *, layout: Any, root: Path) -> "Pruned | None":
        """The event for those of retention's deleted ``records`` whose manifests are gone from
        ``layout`` (:class:`~weightslab.storage.layout.Layout`); None if none is."""
        refs = tuple(r.ref for r in records if not layout.manifest(r.experiment, r.step).exists())
        return cls(event="pruned", refs=refs, root=root) if refs else None


class CallbackError(CheckpointSaveError):
    """An event callback raised. Logged and kept; raised from ``wait()`` / ``close()`` under
    ``strict=True`` only. ``event``, ``callback`` (its qualified name) and ``error`` (what it raised)
    name the first; ``errors`` holds every :class:`CallbackError` raised together."""

    def __init__(self, message: str, *, event: str, callback: str, error: BaseException,
                 errors: Sequence[BaseException] = ()):
        super().__init__(message, errors=errors or [self])
        self.event, self.callback, self.error = event, callback, error

    @classmethod
    def of(cls, errors: Sequence["CallbackError"]) -> "CallbackError":
        """One error for several kept ones (the first named first)."""
        if len(errors) == 1:
            return errors[0]
        first = errors[0]
        detail = "; ".join(str(e) for e in errors[:5]) + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else "")
        return cls(f"{len(errors)} event callbacks raised: {detail}", event=first.event, callback=first.callback,
                   error=first.error, errors=errors)


# --- metadata --------------------------------------------------------------------------------------

def check_metadata(value: Any) -> dict[str, Any]:
    """``value`` as plain JSON (tuples become lists), or a ``ValueError`` naming the first key that is
    not: a dict with string keys, lists, strings, finite numbers, booleans and None, at most
    :data:`MAX_METADATA_BYTES` as compact JSON."""
    if not isinstance(value, Mapping):
        raise ValueError(f"metadata must be a dict, got {type(value).__name__}")
    plain = _plain(value, "metadata", 0)
    size = len(json.dumps(plain, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {size:,} bytes of JSON, more than {MAX_METADATA_BYTES:,}: a manifest is read "
                         "by every listing; store large things in a file and put its path in the metadata")
    return plain


def _plain(value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise ValueError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value!r}: JSON holds finite numbers only")
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r} ({type(key).__name__}): keys must be strings")
            out[key] = _plain(item, f"{where}[{key!r}]", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise ValueError(f"{where} is a {type(value).__module__}.{type(value).__qualname__}, not plain JSON (a dict, "
                     "list, string, number, boolean or None); convert it, e.g. str(value) or value.tolist()")


# --- subscriptions and delivery --------------------------------------------------------------------

def callback_name(fn: Callable[..., Any]) -> str:
    """``module.qualified_name`` of a function, a bound method or a callable object."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    module = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", repr(fn))
    return f"{module}.{name}" if module else name


def check_event(event: Any) -> str:
    """``event`` if it is one of :data:`EVENTS`, else a :class:`ConfigError` listing them."""
    if event not in EVENTS:
        raise ConfigError(f"unknown event {event!r}; the events are: {', '.join(EVENTS)}")
    return event


class Events:
    """The subscriptions of one checkpoint system and the thread that runs its background callbacks.

    ``failures`` keeps what a callback raised; ``timeout`` bounds how long :meth:`close` waits for
    background callbacks still queued or running.
    """

    def __init__(self, failures: "Failures", *, timeout: float = 120.0):
        self._failures = failures
        self.timeout = timeout
        # event -> (-priority, order, fn), sorted; replaced whole on every change so that
        # delivery reads it without the lock
        self._subs: dict[str, tuple[tuple[int, int, Callable[[Any], Any]], ...]] = {e: () for e in EVENTS}
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[str, Any]] = collections.deque()
        self._running: str | None = None  # what runs on the thread now (named if close() gives up on it)
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- subscribing ------------------------------------------------------------------------------
    def on(self, event: str, fn: F | None = None, *, priority: int = 0) -> Any:
        """Call ``fn(payload)`` at each ``event``; returns ``fn``. Without ``fn``, a decorator.
        Higher ``priority`` runs first; equal priorities run in the order they subscribed. The same
        ``fn`` subscribed again to the same event replaces its subscription."""
        check_event(event)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ConfigError(f"priority must be an integer (higher runs first), got {priority!r}")
        if fn is None:
            return lambda f: self.on(event, f, priority=priority)
        if not callable(fn):
            raise ConfigError(f"on({event!r}, ...) needs a callable taking the event, got {type(fn).__name__}")
        with self._cond:
            subs = [s for s in self._subs[event] if s[2] != fn] + [(-priority, next(self._order), fn)]
            self._subs[event] = tuple(sorted(subs, key=lambda s: (s[0], s[1])))
        return fn

    def off(self, event: str, fn: Callable[[Any], Any]) -> bool:
        """Stop calling ``fn`` at ``event``; False when it was not subscribed."""
        check_event(event)
        with self._cond:
            subs = self._subs[event]
            self._subs[event] = tuple(s for s in subs if s[2] != fn)
            return len(self._subs[event]) != len(subs)

    def adopt(self, other: "Events") -> None:
        """Take over ``other``'s subscriptions, in their order (a system replaced by one with new settings)."""
        for event, subs in other._subs.items():
            for neg_priority, _, fn in subs:
                self.on(event, fn, priority=-neg_priority)

    @property
    def errors(self) -> tuple[CallbackError, ...]:
        """What callbacks raised and is kept (without ``strict``: the latest 100; under ``strict``,
        until ``wait()`` / ``close()`` raised them)."""
        return self._failures.callback_errors

    def wants(self, event: str) -> bool:
        """Whether anything subscribed to ``event`` (a payload costs nothing otherwise)."""
        return bool(self._subs[event])

    # --- delivering -------------------------------------------------------------------------------
    def emit(self, event: str, payload: Any) -> None:
        """Run ``event``'s callbacks now, on this thread (the training thread's events)."""
        for _, _, fn in self._subs[event]:
            self._call(event, fn, payload, catch=Exception)

    def dispatch(self, event: str, payload: Any) -> None:
        """Queue ``event`` for the ``weightslab-events`` thread; returns at once."""
        if not self._subs[event]:
            return
        with self._cond:
            if self._closed:
                log.warning("the %r event of %s came after the checkpoint system closed: its callbacks are not called",
                            event, getattr(payload, "ref", "") or "the root")
                return
            self._queue.append((event, payload))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="weightslab-events", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                event, payload = self._queue.popleft()
                self._running = f"the {event!r} callbacks"  # (taken in the same step: wait() sees no gap)
            try:
                for _, _, fn in self._subs[event]:
                    with self._cond:
                        self._running = f"the {event!r} callback {callback_name(fn)}"
                    # (BaseException: a callback's sys.exit() would end this thread, and wait() with it)
                    self._call(event, fn, payload, catch=BaseException)
            finally:
                with self._cond:
                    self._running = None
                    self._cond.notify_all()

    def _call(self, event: str, fn: Callable[[Any], Any], payload: Any, *, catch: type[BaseException]) -> None:
        kept = copy.deepcopy(payload.metadata) if isinstance(payload, BeforeSave) else None
        try:
            fn(payload)
        except catch as exc:  # noqa: BLE001 - a callback never stops training; it is reported
            self._failed(event, fn, f"raised {type(exc).__name__}: {exc}", exc, payload, kept)
            return
        if kept is not None:  # what this callback added is plain JSON, or it is taken back
            try:
                checked = check_metadata(payload.metadata)
            except Exception as exc:  # noqa: BLE001 - (a mapping whose items() raises, too)
                self._failed(event, fn, f"added metadata that is not plain JSON: {exc}", exc, payload, kept)
                return
            payload.metadata.clear()
            payload.metadata.update(checked)

    def _failed(self, event: str, fn: Callable[[Any], Any], what: str, exc: BaseException, payload: Any,
                kept: dict[str, Any] | None) -> None:
        if kept is not None:
            payload.metadata.clear()
            payload.metadata.update(kept)
        name = callback_name(fn)
        error = CallbackError(f"the {event!r} callback {name} {what}", event=event, callback=name, error=exc)
        error.__cause__ = exc
        self._failures.callback_failed(error)

    # --- waiting ----------------------------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> bool:
        """Until the callbacks of every event dispatched so far have run (at most ``timeout``
        seconds); False when some are still queued or running. From a callback, returns at once."""
        if threading.current_thread() is self._thread:
            return False
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._closed:  # (a callback close() gave up on is not waited for again)
                return not self._queue and self._running is None
            while self._queue or self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self) -> None:
        """Wait (at most ``timeout`` seconds) for the events dispatched so far, then stop the
        thread. A callback still running then is left to itself, with a warning naming it, and the
        events still queued are not delivered. Idempotent; from a callback, the thread stops once
        the queued events are delivered."""
        with self._cond:
            if self._closed:
                return
        on_thread = threading.current_thread() is self._thread
        done = on_thread or self.wait(self.timeout)
        with self._cond:
            self._closed = True
            if not done:
                log.warning("event callbacks did not finish within %g s (callback_timeout): %s is still running and "
                            "%d queued events are not delivered; closing without them", self.timeout,
                            self._running or "a callback", len(self._queue))
                self._queue.clear()
            self._cond.notify_all()
            thread = self._thread
        if done and thread is not None and not on_thread:
            thread.join()
