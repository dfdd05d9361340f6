"""What the checkpoint system hangs on the registered objects, kept in step with the ledger.

Registering an object is all a training script does; the system then attaches what it needs: the
step clock's hooks on optimizers and models, a file watcher on hyperparameters registered by path, a
resumable sampler and generator on a data loader. :class:`Attachments` listens to the ledger and
attaches, detaches and re-attaches as objects are registered, replaced and unregistered, and says
what a replacement means: new models or hyperparameters make the change detector look again, and an
optimizer registered again after model surgery gets the state of the parameters that did not change
(:mod:`weightslab.surgery`).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from . import data
from .clock import StepClock
from .failures import Failures
from .ledger import Entry, Ledger
from .lineage import Lineage
from .surgery import carry_optimizer_state, parameter_names
from .watch import ConfigWatch

__all__ = ["Attachments"]

log = logging.getLogger(__name__)


class Attachments:
    """The system's attachments to the objects of ``ledger``, from construction until :meth:`close`."""

    def __init__(self, ledger: Ledger, *, lock: threading.RLock, clock: StepClock, watch: ConfigWatch,
                 lineage: Lineage, failures: Failures):
        self._ledger = ledger
        self._lock = lock
        self._clock = clock
        self._watch = watch
        self._lineage = lineage
        self._failures = failures
        self._closed = False
        lineage.detector.install()  # (torch's registration hooks: a structure change is seen cheaply)
        for kind in ("model", "optimizer", "dataloader", "hyperparams"):
            for entry in ledger.entries(kind).values():
                self._attach(entry)
        self._unsubscribe = ledger.subscribe(self._on_ledger)

    def close(self) -> None:
        """Remove everything attached: the ledger listener, the clock's hooks, the file watchers,
        the change detector's hooks."""
        self._closed = True
        self._unsubscribe()
        self._clock.close()
        self._watch.close()
        self._lineage.detector.remove()

    def _on_ledger(self, event: str, entry: Entry, previous: Entry | None) -> None:
        # (called outside the ledger's lock: taking the system's cannot deadlock with a boundary
        # that holds it and reads the ledger)
        with self._lock:
            if self._closed:
                return
            if previous is not None:
                self._detach(previous)
                if entry.kind == "optimizer" and event == "register" and previous.obj is not entry.obj:
                    self._carry_over(previous.obj, entry.obj, entry.name)
            if event == "register":
                self._attach(entry)
            else:
                self._detach(entry)
            if entry.kind in ("model", "hyperparams"):
                self._lineage.detector.invalidate()

    def _attach(self, entry: Entry) -> None:
        self._watch.attach(entry)
        if entry.kind == "dataloader":
            problem = data.make_resumable(entry.obj, name=entry.name)
            if problem is not None:
                self._failures.warn_once(f"loader:{entry.name}", "%s. A resumed run restarts that loader's epoch, "
                                         "so it is not exact.", problem)
        self._clock.attach(entry)

    def _detach(self, entry: Entry) -> None:
        self._clock.detach(entry)
        self._watch.detach(entry)
        if entry.kind == "dataloader":
            data.undo_resumable(entry.obj)

    def _carry_over(self, old: Any, new: Any, name: str) -> None:
        """An optimizer registered again (after model surgery, typically): the state of the
        parameters that did not change moves to the new one; the rest starts fresh, with a warning."""
        try:
            report = carry_optimizer_state(old, new, old_names=self._lineage.detector.parameter_names(),
                                           new_names=parameter_names(self._ledger.objects("model")))
        except Exception as exc:  # never let this stop training: the new optimizer just starts fresh
            self._failures.fail(f"carrying the state of optimizer {name!r} over", exc)
            return
        level = logging.WARNING if report.reset or report.dropped or report.reason else logging.INFO
        log.log(level, "optimizer %r registered again: %s", name, report)
