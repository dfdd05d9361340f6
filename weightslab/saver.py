"""Taking a checkpoint: capture the registered state, copy what changed, commit it in the background.

On the training thread, :meth:`Saver.save` captures the state tree and the live tensors
(:mod:`weightslab.state`), and the snapshotter copies every tensor into reusable host buffers
(:mod:`weightslab.snapshot`): parameters and optimizer state in the background with ``overlap`` (the
system calls :meth:`Saver.settle` in the optimizer's pre-step hook, before they change), the rest at
once. The
rest runs on the background writer (:mod:`weightslab.writer`), in order: the copy and the sharded
tensors of a distributed job are awaited, the snapshot becomes blobs, the manager commits pack and
manifest (:mod:`weightslab.storage.manager`; a tensor whose digest the root holds costs no bytes),
a remote root gets the upload, then retention runs.

The save's events (:mod:`weightslab.events`): ``before_save`` runs here, on the training thread,
before the capture (its callbacks' metadata goes into the manifest); ``saved`` once the commit is
durable, ``save_failed`` and ``pruned`` are handed to the events thread, so that neither the
training loop nor the writer waits for a callback.

Nothing committed is replaced: a save whose experiment and step a checkpoint holds already (this
run's, or an earlier run's) is not taken, with a warning. The one exception is a change forced at
the step of this run's latest checkpoint with no optimizer step since (``checkpoint_on_state_change``
after ``checkpoint_on_step``): the same boundary's checkpoint is taken again with the change, and
the log says so. A save goes only into an experiment this process has claimed
(:mod:`weightslab.storage.claim`): another live process writing it fails the save, which is kept
for ``wait()`` / ``close()``, and nothing interleaves.

In a distributed job every rank takes part in a save (it was agreed at the boundary): each rank's own
state travels to rank 0 (:meth:`~weightslab.distributed.job.Job.exchange_own`), every rank writes its sharded
tensors with torch.distributed.checkpoint, and rank 0 alone commits the one manifest.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from . import codec
from . import state as _state
from .distributed import ranks as _ranks
from .distributed import sharded as _sharded
from .distributed.job import Job
from .distributed.sharded import is_sharded
from .errors import CheckpointSaveError, ConfigError
from .events import BeforeSave, Events, Pruned, Saved, SaveFailed
from .failures import Failures
from .ledger import Ledger
from .provenance import now, versions
from .retention import Retention
from .snapshot import Snapshot, Snapshotter
from .storage.claim import Claims, ExperimentInUseError
from .storage.experiment import ExperimentRecord
from .storage.manager import CheckpointManager, SaveRequest
from .storage.manifest import Manifest, TensorEntry
from .storage.names import check_new_name
from .tensors import blob_of, dtype_tag
from .writer import Writer

__all__ = ["Saver"]

log = logging.getLogger(__name__)


@dataclass
class _Queued:
    """A save waiting in the writer's queue that a newer one may replace (``backpressure="latest"``)."""

    experiment: str
    step: int
    snap: Snapshot
    superseded: list[int] = field(default_factory=list)  # older steps it replaced, oldest first


class Saver:
    """The checkpoints one run takes, from capture to upload.

    ``clock`` is what "seconds since the last save" is measured with (``every_seconds``); the
    run's start counts as a save.
    """

    def __init__(self, ledger: Ledger, manager: CheckpointManager, job: Job, failures: Failures, writer: Writer,
                 events: Events, *, backpressure: str = "block", retention: Retention | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._ledger = ledger
        self._manager = manager
        self._job = job
        self._failures = failures
        self._events = events
        self._writer = writer
        self._backpressure = backpressure
        self._retention = retention if retention is not None and not retention.keeps_everything else None
        # Demoting to the lossy archive re-encodes whole checkpoints (seconds for a large model): on a
        # thread of its own, so that the next save's write never waits for it.
        self._archiver = Writer(max_pending=2, name="weightslab-archiver") \
            if self._retention is not None and self._retention.archive is not None else None
        self._retain_lock = threading.Lock()
        self._to_retain: set[str] = set()  # experiments saved since the archiver's last pass started
        self._clock = clock
        self.snapshotter = Snapshotter()
        self._in_flight: Snapshot | None = None  # the last snapshot whose copy may still be running
        self.run = uuid.uuid4().hex[:12]  # names this process's run in every manifest it writes
        self._saved: set[tuple[str, int]] = set()  # (experiment, step) saved by this run
        self._last_save = clock()
        self._skipped = 0  # saves dropped by backpressure="skip"
        self._unpushed: list[Manifest] = []  # committed locally, not uploaded yet (a failed push)
        self._shard_saves: list[tuple[str, _sharded.SaveHandle]] = []  # ranks > 0: their shards being written
        self.claims = Claims(manager.layout, run=self.run)  # the experiments this run writes (rank 0's)
        self._latest: tuple[str, int] | None = None  # this run's latest checkpoint (experiment, step) ...
        self._stepped = False  # ... and whether a (hooked) optimizer step started since

    # --- what this run saved --------------------------------------------------------------------
    def saved(self, experiment: str, step: int) -> bool:
        """Whether this run took (or resumed from) checkpoint ``experiment@step``."""
        return (experiment, step) in self._saved

    def mark_saved(self, experiment: str, step: int) -> None:
        self._saved.add((experiment, step))

    @property
    def has_saved(self) -> bool:
        return bool(self._saved)

    @property
    def skipped(self) -> int:
        """Saves dropped because the writer was behind (``backpressure="skip"`` or ``"latest"``)."""
        return self._skipped

    def seconds_since_save(self) -> float:
        return self._clock() - self._last_save

    # --- which experiments this run writes ----------------------------------------------------
    def enter(self, exp_hash: str) -> None:
        """The run now writes into ``exp_hash``: claim it, or raise :class:`ExperimentInUseError` when
        another live process writes it. (In a distributed job, rank 0 writes and claims.)"""
        if self._job.writes:
            self.claims.enter(exp_hash)

    def leave(self, exp_hash: str) -> None:
        """The run moved on from ``exp_hash``: its claim goes once the saves queued for it are written."""
        if self._job.writes:
            self.claims.leave(exp_hash)
            self._writer.submit(f"release of {exp_hash}", self.claims.release_left)

    # --- saving ---------------------------------------------------------------------------------
    def file_record(self, record: ExperimentRecord) -> None:
        """Write an experiment's record in the background (in order with the commits), unless another
        process writes that experiment (this run never got its claim)."""
        def write() -> None:
            if self.claims.holds(record.hash):
                self._manager.write_experiment(record)

        if self._job.writes:
            self._writer.submit(f"record of {record.hash}", write)

    def save(self, *, experiment: ExperimentRecord, step: int, reasons: tuple[str, ...],
             changes: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any] | None, resumed_from: str | None,
             early: Mapping[str, Any] | None = None, overlap: bool = False) -> bool:
        """Take a checkpoint; True when it was handed to the writer (or committed, under ``strict``).
        ``overlap``: copy parameters and optimizer state in the background (call :meth:`settle`
        before anything may change them)."""
        job = self._job
        if job.gone:
            return False
        ref = f"{experiment.hash}@{step}"
        writes = job.writes
        strict = self._failures.strict
        forced = any(isinstance(c, Mapping) and c.get("forced") for c in changes)  # checkpoint_on_*_change
        refused = writes and self._refused(experiment.hash, step, ref, forced)  # (rank 0 decides for every rank)
        if refused and not job.distributed:
            return False
        skipping = self._backpressure == "skip" and not strict and "preempt" not in reasons
        if skipping and not job.distributed and not self._writer.has_room():
            return self._skip(ref)
        metadata = self._before_save(experiment.hash, step, reasons, metrics) if writes else {}
        captured, payload, error = None, b"", None
        try:
            if writes:
                captured = _state.capture(self._ledger, step=step, early=early)
            else:  # the replicated sections only for their sharded tensors; its own state travels to rank 0
                captured = _state.capture_replicated(self._ledger, step=step)
                payload = _state.capture_own(self._ledger, early=early, prefix=f"ranks/{job.rank}/").to_bytes()
        except Exception as exc:  # noqa: BLE001 - reported now (one process) or once every rank knows
            error = exc
        # (detached: DCP's staging deep-copies what it is given, and an FSDP parameter also holds an
        # unsharded storage that is freed between steps)
        sharded = {k: t.detach() for k, t in captured.tensors.items() if is_sharded(t)} if captured is not None \
            else {}
        try:
            exchange = job.exchange_own(experiment=experiment.hash, step=step, payload=payload, error=error,
                                        sharded=len(sharded),
                                        skip=refused or (writes and skipping and not self._writer.has_room()))
        except Exception as exc:
            self._failed(ref, exc)
            return False
        if exchange.skip:
            return False if refused else self._skip(ref)
        if job.distributed:
            self.mark_saved(experiment.hash, step)  # on every rank: final saves are decided alike
        assert captured is not None
        token = f"{exchange.token:016x}"
        shards = None
        if sharded:  # every rank writes its shards, with torch.distributed.checkpoint, in the background
            directory = self._manager.layout.shards(experiment.hash, step, token)
            try:
                shards = _sharded.async_save(sharded, directory)
            except Exception as exc:
                self._failed(ref, exc, what=" (sharded tensors)")
                return False
            if not writes:
                self._shard_saves.append((ref, shards))
        if not writes:
            return True
        try:
            others = [_state.Captured.from_bytes(p) for p in exchange.others]
            if others:
                _ranks.attach(captured.tree, [_ranks.own(captured.tree)] + [c.tree for c in others])
                for other in others:
                    captured.tensors.update(other.tensors)
            if sharded:
                captured.tree["sharded"] = {
                    "directory": f"shards/{directory.name}",
                    "tensors": {k: {"dtype": dtype_tag(t.dtype, key=k), "shape": list(t.shape)}
                                for k, t in sharded.items()}}
                for key in sharded:
                    del captured.tensors[key]
            snap = self.snapshotter.take(captured.tensors, later=captured.step_only if overlap else ())
        except Exception as exc:
            self._failed(ref, exc)
            return False
        created, created_ns = now()
        request = dict(experiment=experiment, step=step, reasons=reasons, changes=tuple(changes),
                       metrics=dict(metrics or {}), tree=captured.tree, run=self.run, resumed_from=resumed_from,
                       created=created, created_ns=created_ns, versions=versions(), metadata=metadata)
        if skipping and not job.distributed and not sharded and not self._writer.has_room(snap.copied_bytes):
            self.snapshotter.release(snap)
            return self._skip(ref)
        if snap.in_flight:
            self._in_flight = snap
        self.mark_saved(experiment.hash, step)
        self._latest, self._stepped = (experiment.hash, step), False
        self._last_save = self._clock()
        if strict:
            try:
                self._commit(request, snap, shards)
            except Exception as exc:
                raise CheckpointSaveError(f"checkpoint {ref} failed: {type(exc).__name__}: {exc}",
                                          errors=[exc]) from exc
        elif self._backpressure == "latest" and "preempt" not in reasons and not job.distributed and not sharded:
            queued = _Queued(experiment.hash, step, snap)
            self._writer.submit(ref, lambda: self._commit(request, snap, shards, queued.superseded), snap.copied_bytes,
                                droppable=queued, replace=lambda dropped: self._replaced(dropped, queued, ref))
        else:
            self._writer.submit(ref, lambda: self._commit(request, snap, shards), snap.copied_bytes)
        return True

    def capture_early(self, ref: str) -> dict[str, Any] | None:
        """What a save decided at an optimizer hook takes at once (RNG, loader positions; the rest at the
        next forward); None when it failed (reported)."""
        try:
            return _state.capture_early(self._ledger)
        except Exception as exc:
            self._failed(ref, exc)
            return None

    def _refused(self, exp_hash: str, step: int, ref: str, forced: bool) -> bool:
        """Whether a save of ``exp_hash@step`` must not be written (said here): a committed checkpoint
        is never replaced (but by a change forced at the same boundary), and an experiment another
        live process writes is left to it."""
        mine = (exp_hash, step) in self._saved
        if mine and forced and self._latest == (exp_hash, step) and not self._stepped:
            log.info("checkpoint %s is taken again with the change forced at its step (no optimizer step ran since): "
                     "it replaces this run's own checkpoint of step %d", ref, step)
        elif mine or self._manager.layout.manifest(exp_hash, step).exists():
            why = "this run took it, or resumed from it" if mine else "an earlier run committed it"
            if mine and forced:
                self._failures.warn_once(
                    "kept-forced", "checkpoint %s exists already (%s), and an optimizer step (or another checkpoint) "
                    "came since: weightslab never replaces a committed checkpoint, so the checkpoint forced now is "
                    "not taken (said once). Call checkpoint_on_step(step) at the end of each step, and the "
                    "checkpoint_on_*_change() of a change right after the step it belongs to", ref, why)
            else:
                self._failures.warn_once(
                    "kept", "checkpoint %s exists already (%s): weightslab never replaces a committed checkpoint, so "
                    "it keeps that one and does not save step %d again (said once; the same holds for any later "
                    "step label that exists). Pass checkpoint_on_step a step that keeps growing: the number of "
                    "optimizer updates done (after a resume, start the loop at system.start_step + 1)", ref, why, step)
            log.debug("checkpoint %s exists already: not saved again", ref)
            return True
        if self.claims.holds(exp_hash):  # (normally: the lineage entered it)
            return False
        # The run moved into an experiment another process was writing: try again, and write there
        # only if nobody else has since (two trajectories in one experiment are what claims prevent).
        try:
            self.claims.enter(exp_hash)
        except ExperimentInUseError as exc:
            self._failed(ref, exc, once=f"in-use:{exp_hash}")
            return True
        theirs = [s for s, _ in self._manager.layout.manifests(exp_hash) if (exp_hash, s) not in self._saved]
        if theirs:
            self.claims.drop(exp_hash)
            self._failed(ref, ExperimentInUseError(
                f"experiment {exp_hash} holds checkpoints another run wrote while this run waited to write it "
                f"(steps {', '.join(map(str, theirs[-5:]))}); this run does not write there, so as not to interleave "
                "two trajectories: its checkpoints fail until it moves to another experiment",
                experiment=exp_hash), once=f"taken:{exp_hash}")
            return True
        return False

    def _before_save(self, exp_hash: str, step: int, reasons: tuple[str, ...],
                     metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        """The ``before_save`` callbacks, on the training thread: the metadata they add (checked)."""
        if not self._events.wants("before_save"):
            return {}
        event = BeforeSave(event="before_save", experiment=exp_hash, step=step, reasons=tuple(reasons),
                           metrics=codec.decode(dict(metrics or {}), {}))
        self._events.emit("before_save", event)
        return dict(event.metadata)

    def _failed(self, ref: str, exc: BaseException, *, what: str = "", once: str | None = None) -> None:
        """Checkpoint ``ref`` was not taken: ``save_failed``, then the failure is reported (raised under strict)."""
        self._announce_failure(ref, exc)
        self._failures.fail(f"checkpoint {ref}{what}", exc, once=once)

    def _announce_failure(self, ref: str, exc: BaseException) -> None:
        experiment, _, step = ref.partition("@")
        self._events.dispatch("save_failed", SaveFailed(event="save_failed", ref=ref, experiment=experiment,
                                                        step=int(step), error=exc))

    def _replaced(self, dropped: list[_Queued], newer: _Queued, ref: str) -> None:
        """Queued saves dropped for ``newer`` (under the writer's lock, before ``newer`` is queued):
        their buffers go back, their steps are no longer saved, and ``newer`` records them."""
        for old in dropped:
            self.snapshotter.release(old.snap)
            self._saved.discard((old.experiment, old.step))
            newer.superseded[:0] = old.superseded + [old.step]
            self._skipped += 1
            if self._skipped in (1, 10, 100) or self._skipped % 1000 == 0:
                log.warning("checkpoint %s@%d replaced by the newer %s before it was written: the writer is behind "
                            "(backpressure='latest'; %d saves dropped so far). Save less often to keep every one",
                            old.experiment, old.step, ref, self._skipped)

    def _skip(self, ref: str) -> bool:
        self._skipped += 1
        if self._skipped in (1, 10, 100) or self._skipped % 1000 == 0:
            log.warning("checkpoint %s skipped: the writer is behind (backpressure='skip'; %d saves skipped so "
                        "far). Save less often, or set backpressure='block' to wait for it", ref, self._skipped)
        return False

    def _commit(self, request: dict[str, Any], snap: Snapshot, shards: _sharded.SaveHandle | None,
                superseded: list[int] | None = None) -> Manifest:
        """On the writer's thread: make one checkpoint durable, then retention and upload."""
        if superseded:  # (final now: a job is only replaced while queued, never once it runs)
            request["changes"] = (*request["changes"], {"kind": "superseded", "steps": list(superseded)})
        try:
            if shards is not None:  # the sharded tensors first: durable on every rank when this returns
                request["tree"]["sharded"]["files"] = shards.result().to_json()
            manifest, _, written = self._manager.commit(SaveRequest(**request, tensors=snap.entries(),
                                                                   blobs=snap.blobs()))
        except BaseException as exc:
            if not self._job.distributed:  # not taken after all: a later save may take this step (ranks
                self._saved.discard((request["experiment"].hash, request["step"]))  # would disagree)
            self._announce_failure(f"{request['experiment'].hash}@{request['step']}", exc)
            raise
        finally:
            self.snapshotter.release(snap)  # its buffers serve the next snapshots
        if self._events.wants("saved"):  # (the manifest, written last, is fsynced with its directory)
            self._events.dispatch("saved", Saved(
                event="saved", ref=manifest.ref, experiment=manifest.experiment, step=manifest.step,
                reasons=manifest.reasons, metrics=codec.decode(dict(manifest.metrics), {}),
                metadata=manifest.metadata, nbytes=manifest.total_bytes, bytes_written=written,
                path=self._manager.layout.manifest(manifest.experiment, manifest.step), root=self._manager.root))
        if self._manager.remote is None or self._push(manifest):  # (never prune remotely what is not up yet)
            self._apply_retention(manifest)
        log.debug("committed checkpoint %s (%s, %d tensors, %d bytes)", manifest.ref, ", ".join(manifest.reasons),
                  len(manifest.tensors), manifest.total_bytes)
        return manifest

    def _apply_retention(self, manifest: Manifest) -> None:
        if self._retention is None:
            return
        if self._archiver is None:
            self._retain([manifest.experiment], manifest.ref)
            return
        # One pass at most waits behind the running one, and takes every experiment saved since:
        # each plans from what is on disk when it runs.
        with self._retain_lock:
            queued = bool(self._to_retain)
            self._to_retain.add(manifest.experiment)
        if not queued:
            self._archiver.submit(f"retention after {manifest.ref}", lambda: self._retain_queued(manifest.ref))

    def _retain_queued(self, ref: str) -> None:
        with self._retain_lock:
            experiments, self._to_retain = sorted(self._to_retain), set()
        self._retain(experiments, ref)

    def _retain(self, experiments: list[str], ref: str) -> None:
        assert self._retention is not None
        try:
            plan = self._manager.apply_retention(self._retention, experiments=experiments)
        except Exception as exc:  # the checkpoint itself is committed: report, do not fail it
            log.warning("retention after checkpoint %s failed: %s: %s", ref, type(exc).__name__, exc)
            self._failures.keep(exc)
            return
        event = Pruned.of(plan.delete, layout=self._manager.layout, root=self._manager.root) \
            if self._events.wants("pruned") else None
        if event is not None:
            self._events.dispatch("pruned", event)

    def _push(self, manifest: Manifest) -> bool:
        """Upload a committed checkpoint (and any whose upload failed before) to the remote root;
        a failure is kept and raised from wait()/close(), and retried with the next checkpoint."""
        remote = self._manager.remote
        assert remote is not None
        self._unpushed.append(manifest)
        try:
            remote.push(self._unpushed)
        except Exception as exc:
            log.warning("uploading checkpoint %s to %s failed: %s: %s (it is committed locally under %s; the upload "
                        "is retried with the next checkpoint)", manifest.ref, remote.url, type(exc).__name__, exc,
                        self._manager.root)
            self._failures.keep(exc)
            return False
        self._unpushed.clear()
        return True

    def check_new_name(self, name: str | None) -> None:
        """A name a fork may give its experiment (:class:`ConfigError` saying why not); None is fine."""
        try:
            if name is not None:
                check_new_name(self._manager.layout, name)
        except ValueError as exc:
            raise ConfigError(f"wl.fork(name={name!r}): {exc}") from None

    def name_experiment(self, exp_hash: str, name: str, *, replace: bool = False) -> None:
        """Give experiment ``exp_hash`` a human name (:class:`ConfigError` if it cannot have it), and upload it."""
        try:
            self._manager.name_experiment(exp_hash, name, replace=replace)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.push_names()

    def push_names(self) -> None:
        """Upload the root's experiment names to its remote root, if it has one."""
        remote = self._manager.remote
        if remote is None:
            return
        try:
            remote.push_names()
        except Exception as exc:  # the name is kept locally; say so, and raise it from wait()
            log.warning("uploading experiment names to %s failed: %s: %s", remote.url, type(exc).__name__, exc)
            self._failures.keep(exc)

    # --- after a resume ---------------------------------------------------------------------------
    def learn_restored(self, manifest: Manifest, loaded: Mapping[str, Any]) -> None:
        """The models and optimizers now hold exactly the restored blobs: with ``delta``, the next
        save stores what changed as deltas against them. The checkpoint counts as taken by this run."""
        self.mark_saved(manifest.experiment, manifest.step)
        self._latest = None  # (a change forced at that step is not this run's to put into it)
        # (an archived tensor is not the bytes of any blob: a lossless delta is never stored against it)
        refs = {k: e.blob for k, e in manifest.tensors.items()
                if isinstance(e, TensorEntry) and k.startswith(("models/", "optimizers/"))}
        self._manager.remember({k: blob_of(k, loaded[k]) for k in refs if k in loaded}, refs)

    # --- waiting ----------------------------------------------------------------------------------
    def before_step(self) -> None:
        """A registered optimizer's step starts (its pre-step hook): wait for the background copy,
        and remember that the state has moved on from the latest checkpoint."""
        self._stepped = True
        self.settle()

    def settle(self) -> None:
        """Right before the next step may change parameters or optimizer state: wait for the
        background copy of the last save's (on a GPU, the training stream waits, not the host)."""
        snap, self._in_flight = self._in_flight, None
        if snap is not None:
            snap.before_mutation()

    def wait(self) -> None:
        """Until every save taken so far is durable and retention (with its archive) has run on it
        (failures are kept, not raised)."""
        self.settle()
        self._writer.wait()
        if self._archiver is not None:  # (after the writer: its last commit queues the last pass)
            self._archiver.wait()
        self.wait_shards()

    def wait_shards(self) -> None:
        """Ranks other than 0: wait for the sharded tensors they are writing (rank 0's writer waits
        for every rank's before it commits)."""
        while self._shard_saves:
            ref, handle = self._shard_saves.pop(0)
            try:
                handle.result()
            except Exception as exc:  # rank 0 fails the same checkpoint, which is not committed
                log.warning("the sharded tensors of checkpoint %s failed on this rank: %s: %s", ref,
                            type(exc).__name__, exc)
                self._failures.keep(exc)

    def close(self) -> None:
        """Finish every queued save, stop the writer, free the snapshot buffers."""
        self.settle()
        self._writer.close()
        if self._archiver is not None:
            self._archiver.close()
        self.wait_shards()
        self.snapshotter.close()
        self.claims.close()
