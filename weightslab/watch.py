"""The hyperparameter files a run watches, and the edits it takes from them at step boundaries.

A hyperparameter file registered by path becomes a :class:`~weightslab.hyperparams.LiveConfig`
watched by a :class:`~weightslab.configfile.ConfigFile` (its own threads notice, read and parse each
version, within bounds). At each step boundary, on the training thread, :meth:`ConfigWatch.take` asks
every file for an accepted edit and swaps it into its live config in one assignment, so that change
detection, the optimizer binding and the checkpoint of that boundary all see the new values. An edit
that gives a bound optimizer setting a value its optimizer would not take (``lr: .nan``,
``betas: [0.9]``) is refused whole, before the swap (:func:`~weightslab.binding.check_edit` against
the registered optimizers, which the watch keeps track of): the experiment never records a value
that does not train.

In a distributed job every rank must change its hyperparameters at the same step, whatever moment
its own observer saw the edit: only rank 0 reads the files; the ranks agree at the end of the
boundary that rank 0 holds edits (:meth:`~weightslab.distributed.job.Job.agree`); at the next boundary rank 0's
edits go to every rank as JSON (through the codec: nothing pickled) and every rank applies them.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Mapping

from . import codec
from .binding import check_edit
from .canonical import canonical_json
from .configfile import Check, ConfigFile, Edit
from .distributed.job import Job
from .hyperparams import LiveConfig, Marks
from .ledger import Entry

__all__ = ["ConfigWatch"]

log = logging.getLogger(__name__)

_Pending = tuple[str, str, Edit]  # (registration name, file, edit)


class ConfigWatch:
    """The watched files of the registered hyperparameters, by registration name."""

    def __init__(self, *, mode: str, optimizer_keys: Mapping[str, str] | None = None):
        self.mode = mode  # "auto" | "poll" | "off" (see CheckpointConfig.watch_files)
        self.optimizer_keys = dict(optimizer_keys or {})  # CheckpointConfig.optimizer_keys: more bound paths
        self._files: dict[str, ConfigFile] = {}
        self._optimizers: dict[str, Any] = {}  # the registered optimizers, whose rules an edit must meet
        self._held: list[_Pending] = []  # rank 0 of a job: edits read, applied once every rank agreed
        self._due = False  # every rank agreed at the last boundary to apply rank 0's edits now

    @property
    def files(self) -> dict[str, ConfigFile]:
        return dict(self._files)

    @property
    def holds_edits(self) -> bool:
        """Rank 0 of a job holds edits the other ranks have not applied yet."""
        return bool(self._held)

    def attach(self, entry: Entry) -> None:
        """Watch the file of hyperparameters registered by path, and keep track of the optimizers
        (a registration of anything else, or with watching off, is ignored)."""
        if entry.kind == "optimizer":
            self._optimizers[entry.name] = entry.obj
        if entry.kind == "hyperparams" and entry.source is not None and isinstance(entry.obj, LiveConfig) \
                and self.mode != "off":
            self._files[entry.name] = ConfigFile(entry.source, entry.obj, watch=self.mode,
                                                 check=self._checker(entry.name))

    def detach(self, entry: Entry) -> None:
        if entry.kind == "optimizer" and self._optimizers.get(entry.name) is entry.obj:
            del self._optimizers[entry.name]
        if entry.kind == "hyperparams" and entry.name in self._files:
            self._files.pop(entry.name).close()

    def _checker(self, name: str) -> Check:
        def check(live: Mapping[str, Any], values: Mapping[str, Any], marks: Marks, where: str) -> None:
            check_edit(name, live, values, self._optimizers, self.optimizer_keys, marks=marks, where=where)
        return check

    def agreed(self, edits: bool) -> None:
        """What the ranks agreed at this boundary: rank 0's edits are applied at the next one."""
        self._due = edits

    def take(self, step: int, hyperparams: Mapping[str, Any], job: Job) -> list[dict[str, Any]]:
        """Swap the accepted edits into the live configs; return them as checkpoint changes."""
        if not job.distributed:
            edits = self._poll()
        else:
            edits = self._shared(job) if self._due else []
            self._due = False
            if job.rank == 0 and not self._held:
                self._held = self._poll()
        changes = []
        for name, path, edit in edits:
            live = hyperparams.get(name)
            if not isinstance(live, LiveConfig):
                continue  # unregistered since (on this rank)
            live.swap(edit.values)
            log.info("step %d: %s changed: %s (hyperparameters %r)", step, path, "; ".join(edit.changed), name)
            changes.append({"kind": "config_file", "hyperparams": name, "file": path, "diff": list(edit.changed)})
        return changes

    def _poll(self) -> list[_Pending]:
        edits = []
        for name, watched in list(self._files.items()):
            edit = watched.poll()
            if edit is not None:
                edits.append((name, str(watched.path), edit))
        return edits

    def _shared(self, job: Job) -> list[_Pending]:
        """Rank 0's held edits, on every rank."""
        payload = None
        if job.rank == 0:
            payload = canonical_json([{"name": n, "file": p, "values": codec.encode(e.values, path=f"hyperparams/{n}",
                                                                                     tensors={}, what=f"config file {p}"),
                                       "changed": list(e.changed)} for n, p, e in self._held]).encode()
            self._held = []
        received = json.loads(job.share(payload))
        return [(d["name"], d["file"], Edit(values=codec.decode(d["values"], {}), changed=tuple(d["changed"]),
                                            warnings=())) for d in received]

    def close(self) -> None:
        """Stop every observer thread."""
        for watched in self._files.values():
            watched.close()
        self._files.clear()
