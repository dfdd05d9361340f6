"""The background writer: one thread that makes snapshots durable, in order, off the training loop.

The training thread hands over a job (a snapshot already copied, plus the function that commits
it) and returns at once, unless ``max_pending`` jobs (or ``max_pending_bytes`` of snapshots) are
already queued or running: then it waits for room, which bounds the memory that snapshots in
flight can take. A single job larger than ``max_pending_bytes`` is still admitted when nothing
else is in flight, so a save can never wait forever. A job that fails is logged
and kept; the writer goes on with the next job, and the kept errors are handed to whoever asks
(``wait()``/``close()`` of the checkpoint system raise them).

A job may be submitted *droppable* (a save whose newer version makes it pointless) and a later one
with ``replace``: instead of waiting for room, it drops queued droppable jobs (not the one being
written) and takes their place, so a loop that saves faster than the disk writes never waits for
the disk and the newest state is always the next one written.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Any, Callable

__all__ = ["Writer"]

log = logging.getLogger(__name__)


class Writer:
    def __init__(self, *, max_pending: int = 2, max_pending_bytes: int | None = None,
                 name: str = "weightslab-writer"):
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if max_pending_bytes is not None and max_pending_bytes < 1:
            raise ValueError(f"max_pending_bytes must be at least 1 or None, got {max_pending_bytes}")
        self.max_pending = max_pending
        self.max_pending_bytes = max_pending_bytes
        self._bytes = 0
        self._name = name
        self._cond = threading.Condition()
        self._jobs: collections.deque[tuple[str, Callable[[], Any], int, Any]] = collections.deque()
        self._running = 0
        self._errors: list[BaseException] = []
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._jobs) + self._running

    def _fits(self, nbytes: int) -> bool:
        in_flight = len(self._jobs) + self._running
        if in_flight == 0:
            return True
        return in_flight < self.max_pending and (self.max_pending_bytes is None
                                                 or self._bytes + nbytes <= self.max_pending_bytes)

    def has_room(self, nbytes: int = 0) -> bool:
        """Whether a job of ``nbytes`` would be accepted now without waiting."""
        with self._cond:
            return self._fits(nbytes)

    def submit(self, label: str, job: Callable[[], Any], nbytes: int = 0, *, droppable: Any = None,
               replace: Callable[[list[Any]], None] | None = None) -> None:
        """Queue ``job`` (holding ``nbytes`` of snapshot); blocks while there is no room.

        ``droppable``: a token; while this job is still queued, a newer job submitted with ``replace``
        may drop it. ``replace(tokens)``: when there is no room, drop queued droppable jobs, newest
        first, until there is, and hand their tokens (oldest first) to ``replace``, called under the
        writer's lock before this job is queued; wait only when nothing is left to drop.
        """
        with self._cond:
            if self._closed:
                raise RuntimeError("the checkpoint writer is closed")
            while not self._fits(nbytes):
                if replace is not None:
                    dropped = self._drop_one()
                    if dropped is not None:
                        replace([dropped])
                        continue
                self._cond.wait()
                if self._closed:  # closed while we waited: nobody would ever run this job
                    raise RuntimeError("the checkpoint writer was closed while this save waited for a slot")
            self._jobs.append((label, job, nbytes, droppable))
            self._bytes += nbytes
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def _drop_one(self) -> Any:
        """Remove the newest queued droppable job; its token, or None if there is none."""
        for i in range(len(self._jobs) - 1, -1, -1):
            label, _, nbytes, token = self._jobs[i]
            if token is not None:
                del self._jobs[i]
                self._bytes -= nbytes
                return token
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:  # closed and drained
                    return
                label, job, nbytes, _ = self._jobs.popleft()
                self._running += 1
            try:
                job()
            except BaseException as exc:  # noqa: BLE001 - kept and re-raised to the user later
                log.warning("checkpoint %s failed: %s: %s (training goes on; the error is raised from "
                            "wait() or close())", label, type(exc).__name__, exc)
                with self._cond:
                    self._errors.append(exc)
            finally:
                with self._cond:
                    self._running -= 1
                    self._bytes -= nbytes
                    self._cond.notify_all()

    def keep(self, exc: BaseException) -> None:
        """Keep an error that happened outside the writer (for instance while taking a snapshot)."""
        with self._cond:
            self._errors.append(exc)

    def take_errors(self) -> list[BaseException]:
        """The errors kept since the last call."""
        with self._cond:
            errors, self._errors = self._errors, []
            return errors

    def wait(self) -> None:
        """Return when every job submitted so far has finished (successfully or not)."""
        with self._cond:
            while self._jobs or self._running:
                self._cond.wait()

    def close(self) -> None:
        """Finish every queued job, then stop the thread. Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread
