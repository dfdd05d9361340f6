"""What went wrong during training and was not raised at once: the promise that training never dies
because checkpointing failed, and that no failure is silent either.

Every part of the checkpoint system reports through one :class:`Failures`: a failure is logged as a
warning and kept (with the background writer's own failures) until :meth:`Failures.raise_kept`, which
``wait()`` and ``close()`` call; under ``strict=True`` it is raised at once instead. Warnings that
would repeat at every step are said once per key.

A user's event callback that raised (:mod:`weightslab.events`) is logged with its name and event and
kept too, but never stops anything: it is raised from ``wait()`` / ``close()`` only under
``strict=True`` (as a :class:`~weightslab.events.CallbackError`).
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any

from .errors import CheckpointSaveError, WeightslabError
from .events import CallbackError
from .storage.claim import ExperimentInUseError
from .writer import Writer

__all__ = ["Failures"]

log = logging.getLogger(__name__)


class Failures:
    """The failures of one checkpoint system, kept beside those of its writer."""

    def __init__(self, writer: Writer, *, strict: bool):
        self._writer = writer
        self.strict = strict
        self._warned: set[str] = set()
        self._lock = threading.Lock()
        # callbacks' failures: every one under strict (raised, then forgotten), else the latest
        self._callbacks: collections.deque[CallbackError] = collections.deque(maxlen=None if strict else 100)

    def fail(self, what: str, exc: BaseException, *, once: str | None = None) -> None:
        """``what`` failed with ``exc``: raised under ``strict``, else logged and kept. With ``once``,
        a failure that would repeat at every save is logged the first time that key comes up (and
        kept every time). A run refused at its start (another live process writes its experiment)
        is raised whatever the settings: it has trained nothing yet, and could save nothing."""
        if isinstance(exc, ExperimentInUseError) and exc.at_start:
            raise exc
        if self.strict:
            if isinstance(exc, WeightslabError):
                raise exc
            raise CheckpointSaveError(f"{what} failed: {type(exc).__name__}: {exc}", errors=[exc]) from exc
        if once is None or once not in self._warned:
            if once is not None:
                self._warned.add(once)
            log.warning("%s failed: %s: %s (training goes on; the error is raised from wait() or close())",
                        what, type(exc).__name__, exc)
        self._writer.keep(exc)

    def keep(self, exc: BaseException) -> None:
        """Keep a failure that was logged already (raised from the next ``wait()`` / ``close()``)."""
        self._writer.keep(exc)

    def callback_failed(self, error: CallbackError) -> None:
        """An event callback raised (from any thread): logged with the traceback, kept."""
        log.warning("%s (training goes on%s)", error, "; raised from wait() or close()" if self.strict else "",
                    exc_info=(type(error.error), error.error, error.error.__traceback__))
        with self._lock:
            self._callbacks.append(error)

    @property
    def callback_errors(self) -> tuple[CallbackError, ...]:
        """What event callbacks raised and is kept (without strict: the latest 100)."""
        with self._lock:
            return tuple(self._callbacks)

    def warn_once(self, key: str, message: str, *args: Any) -> None:
        """A warning that is said the first time ``key`` comes up, and never again."""
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    def raise_kept(self) -> None:
        """Raise :class:`CheckpointSaveError` with every failure kept since the last call, if any (and,
        under ``strict``, the callbacks' failures: alone, a :class:`CallbackError`)."""
        errors = self._writer.take_errors()
        callbacks: list[CallbackError] = []
        if self.strict:
            with self._lock:
                callbacks, self._callbacks = list(self._callbacks), collections.deque()
        if callbacks and not errors:
            raise CallbackError.of(callbacks) from callbacks[0].error
        saves = len(errors)
        errors += callbacks
        if errors:
            detail = "; ".join(f"{type(e).__name__}: {e}" for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            also = f" and {len(callbacks)} event callback(s) raised" if callbacks else ""
            raise CheckpointSaveError(f"{saves} checkpoint save(s) failed{also}: {detail}{more}",
                                      errors=errors) from errors[0]
