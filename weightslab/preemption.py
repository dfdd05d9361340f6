"""Preemption: turning SIGTERM (and SIGINT) into "final checkpoint at the end of this step, then exit".

Schedulers and spot instances announce the end of a job with SIGTERM, a few seconds to minutes
before the kill; a person at the terminal uses Ctrl-C (SIGINT). Either way the work since the last
checkpoint is lost unless a checkpoint is taken now, and "now" must be a step boundary: a state
captured in the middle of a step cannot be resumed exactly.

:class:`PreemptionGuard` installs handlers that only *record* the signal. The checkpoint system
sees it at the next step boundary, takes a checkpoint, waits until it is durable, and asks the
guard to :meth:`~PreemptionGuard.deliver` the signal as the process would have handled it without
weightslab: the user's own handler if one was installed, ``KeyboardInterrupt`` for SIGINT, death
by the signal for SIGTERM. A signal the process ignores (SIGINT in a shell's background job, SIGHUP
under nohup) stays ignored: no checkpoint, no stop. A second signal delivers at once; if no
step boundary comes within ``timeout`` seconds (the loop is stuck, or has ended), the signal is
delivered anyway, without a checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable, Sequence

__all__ = ["PreemptionGuard", "signal_numbers"]

log = logging.getLogger(__name__)


def signal_numbers(names: Sequence[str]) -> list[int]:
    """``["SIGTERM", "SIGINT"]`` -> their numbers; a name this platform lacks raises ValueError."""
    numbers = []
    for name in names:
        number = getattr(signal, str(name), None)
        if not isinstance(number, int) or not str(name).startswith("SIG"):
            raise ValueError(f"unknown signal {name!r}; use names such as 'SIGTERM' or 'SIGINT'")
        numbers.append(int(number))
    return numbers


def signal_name(number: int | None) -> str:
    """``"SIGTERM"`` for 15; ``"signal"`` for None; ``"signal 99"`` for a number with no name."""
    try:
        return signal.Signals(number).name if number is not None else "signal"
    except ValueError:
        return f"signal {number}"


class PreemptionGuard:
    """Records preemption signals until the checkpoint system has taken its final checkpoint."""

    def __init__(self, signals: Sequence[int], *, timeout: float = 60.0):
        self.signals = list(signals)
        self.timeout = timeout
        self._previous: dict[int, Any] = {}
        self._pending: int | None = None
        self._frame: Any = None
        self._timer: threading.Timer | None = None
        self._expired = False
        self._adopted = False  # the pending signal came from another rank (adopt), not to this process
        self._lock = threading.Lock()

    @property
    def pending(self) -> int | None:
        """The signal waiting for a final checkpoint, if any (read at every step boundary)."""
        return self._pending

    def install(self) -> bool:
        """Install the handlers; only the main thread may (returns False elsewhere)."""
        if not self.signals or threading.current_thread() is not threading.main_thread():
            return False
        for number in self.signals:
            if signal.getsignal(number) == signal.SIG_IGN:
                # The process ignores it (a background job of a shell, nohup): so does weightslab.
                # Taking a checkpoint and then going on would contradict "stopping" in the log.
                log.info("%s is ignored by this process; weightslab leaves it ignored (no preemption "
                         "checkpoint on it)", signal_name(number))
                continue
            self._previous[number] = signal.signal(number, self._handle)
        return True

    def uninstall(self) -> None:
        """Put back the handlers that were there before (main thread only)."""
        self._cancel_timer()
        if threading.current_thread() is not threading.main_thread():
            return
        for number, previous in self._previous.items():
            if signal.getsignal(number) == self._handle:
                signal.signal(number, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        with self._lock:
            if self._adopted and number == self._pending:  # the same preemption reaching this rank too
                self._adopted, self._frame = False, frame
                return
            first = self._pending is None and not self._expired
            if first:
                self._pending, self._frame = number, frame
        if not first:  # second signal, or the watchdog: stop now, as the process would have
            self._pending = number
            self._frame = frame
            self.deliver()
            return
        name = signal.Signals(number).name
        log.warning("%s received: weightslab takes a final checkpoint at the end of this step, then lets the "
                    "process stop (send %s again to stop at once)", name, name)
        if self.timeout > 0:
            timer = threading.Timer(self.timeout, self._watchdog, args=(number,))
            timer.daemon = True
            timer.name = "weightslab-preemption"
            # Start it before publishing it: a second signal can run its handler in the middle of
            # start(), and deliver() must not find (and try to join) a thread not yet started.
            timer.start()
            self._timer = timer

    def _watchdog(self, number: int) -> None:
        with self._lock:
            if self._pending is None:
                return
            self._expired = True
        log.warning("no step boundary within %g s of %s: stopping without a final checkpoint", self.timeout,
                    signal.Signals(number).name)
        os.kill(os.getpid(), number)  # handled again in the main thread, where deliver() may run

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread() and timer.ident is not None:
                timer.join()

    def adopt(self, number: int) -> None:
        """Another rank of the job received signal ``number``: this process takes the final checkpoint
        with it and then stops as if it had received the signal too (launchers preempt whole jobs)."""
        with self._lock:
            if self._pending is None:
                self._pending, self._frame, self._adopted = number, None, True

    def stop(self, *, durable: Callable[[], None], before: Callable[[], None]) -> None:
        """Once ``durable()`` returns (the final checkpoint is on disk), and ``before()`` ran (the
        other ranks of a job are told), stop as the process would have without weightslab."""
        try:
            durable()
        finally:
            before()
            log.warning("final checkpoint after %s is durable; stopping", signal_name(self._pending))
            self.deliver()

    def deliver(self) -> None:
        """Handle the pending signal as the process would have without weightslab (main thread).

        May raise (``KeyboardInterrupt``, or whatever the user's handler raises) or not return.
        """
        number, frame = self._pending, self._frame
        if number is None:
            return
        self._pending = self._frame = None
        self._adopted = False
        self._cancel_timer()
        previous = self._previous.get(number, signal.SIG_DFL)
        if callable(previous):
            previous(number, frame)
        elif previous == signal.SIG_IGN:
            return
        else:  # SIG_DFL (or a handler not set from Python): the default action, with it in place
            signal.signal(number, signal.SIG_DFL)
            os.kill(os.getpid(), number)
