"""The automatic checkpoint system: the one orchestrator, and the only place where the parts meet.

It holds collaborators, each an object with its own state and one concept, and calls them in order.
At a **step boundary** (``checkpoint_on_step``, or the :class:`~weightslab.clock.StepClock`'s hooks):
the watched files' edits (:class:`~weightslab.watch.ConfigWatch`), what changed and which experiment
the run is in (:class:`~weightslab.lineage.Lineage`), the optimizer binding, the save policy, the
ranks' agreement (:class:`~weightslab.distributed.job.Job`), the save (:class:`~weightslab.saver.Saver`).
At a **resume** or **fork**: :class:`~weightslab.restorer.Restorer`, then the lineage. Failures go
through one :class:`~weightslab.failures.Failures`; the user's callbacks are subscribed to the
:class:`~weightslab.events.Events`, which the collaborators emit. The map: guides/architecture.md.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .attachments import Attachments
from .binding import OptimizerBinding
from .clock import Deferred, StepClock, check_change_kind, check_metrics, check_step
from .config import CheckpointConfig, make_config
from .configfile import ConfigFile, apply_edits
from .distributed.job import Job
from .errors import CheckpointNotFoundError, ConfigError
from .events import Events
from .failures import Failures
from .ledger import LEDGER, Ledger
from .lineage import Lineage
from .preemption import PreemptionGuard, signal_numbers
from .restorer import CheckpointInfo, Resolved, Restorer
from .saver import Saver
from .storage.manager import CheckpointManager
from .storage.root import Root
from .triggers import SavePolicy
from .watch import ConfigWatch
from .writer import Writer

__all__ = ["AutomaticCheckpointSystem", "CheckpointConfig", "CheckpointInfo"]

log = logging.getLogger(__name__)


class AutomaticCheckpointSystem:
    """Saves every registered object of a training run when it matters, and restores it exactly.

    ::

        import weightslab as wl

        system = wl.get_checkpoint_system(root_log_dir="./experiments", checkpoint_frequency=100)
        wl.register_model("model", model)
        wl.register_optimizer("optimizer", optimizer)
        wl.register_scheduler("scheduler", scheduler)
        config = wl.register_hyperparams("config", "config.yaml")
        start = system.resume()                  # 0 on a fresh run, else the step restored

        for step in range(start + 1, num_steps + 1):
            loss = train_step(model, optimizer, config)
            scheduler.step()
            wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
        system.close()                           # waits for background saves; also runs at exit

    Saves happen every ``checkpoint_frequency`` steps and whenever the architecture, the
    hyperparameters or the model state (frozen parameters, train/eval) change; an architecture or
    hyperparameter change opens a new experiment directory that records its parent. Saves are
    written in the background; a failed save never stops training (unless ``strict=True``) but
    is logged and raised from :meth:`wait` or :meth:`close`.

    ``clock`` measures the seconds of ``every_seconds`` (a test passes its own).
    """

    def __init__(self, config: CheckpointConfig | None = None, *, ledger: Ledger = LEDGER,
                 clock: Callable[[], float] = time.monotonic, **settings: Any):
        if config is None:
            config = make_config(settings)
        elif settings:
            raise ConfigError("pass either a CheckpointConfig or keyword settings, not both")
        self.config, self.ledger = config, ledger
        self._lock = threading.RLock()
        self._closed = False
        self._job = Job()
        try:  # (only rank 0 sweeps temporary files: a pid in a file name means nothing on another host)
            self.manager = CheckpointManager(Root.create(config.root_log_dir), compression=config.compression,
                                             delta=config.delta, reanchor_interval=config.reanchor_interval,
                                             sweep=self._job.rank == 0, best_metric=config.best_metric,
                                             direct_io=config.direct_io)
        except ImportError as exc:  # an optional package the settings need: the message names the extra
            raise ConfigError(str(exc)) from exc
        writer = Writer(max_pending=config.max_pending_saves, max_pending_bytes=config.max_pending_bytes)
        self._failures = Failures(writer, strict=config.strict)
        self.events = events = Events(self._failures, timeout=config.callback_timeout)  # the user's callbacks
        self._saver = Saver(ledger, self.manager, self._job, self._failures, writer, events,
                            backpressure=config.backpressure, retention=config.retention, clock=clock)
        self._lineage = Lineage(ledger, self.manager, self._failures, events, exclude_keys=config.exclude_keys,
                                resume_mode=config.resume, file_record=self._saver.file_record,
                                saved=self._saver.saved, enter=self._saver.enter, leave=self._saver.leave)
        self._restorer = Restorer(ledger, self.manager, self._job, self._failures, events,
                                  rank_state=config.rank_state, excluded_keys=self._lineage.hasher.excluded_keys)
        self._clock = StepClock(hooks=config.hook_optimizer, lock=self._lock, on_boundary=self._implicit_boundary,
                                on_forward=self._forward, on_step=self._saver.before_step)
        self._watch = ConfigWatch(mode=config.watch_files, optimizer_keys=config.optimizer_keys)
        self._policy = SavePolicy(every_steps=config.checkpoint_frequency, every_seconds=config.every_seconds)
        self._binding = OptimizerBinding(config.optimizer_keys)
        self._binding_seen = False  # the optimizer binding has taken its baseline
        self._auto_resume_due = config.resume == "auto"
        self._start_step = 0  # the step the run resumed from (0: fresh)
        self._guard = PreemptionGuard(signal_numbers(config.preempt_signals), timeout=config.preempt_timeout)
        if config.preempt_signals and not self._guard.install():
            log.info("the checkpoint system was created outside the main thread: no preemption signal handlers")
        self._attachments = Attachments(ledger, lock=self._lock, clock=self._clock, watch=self._watch,
                                        lineage=self._lineage, failures=self._failures)
        atexit.register(self._atexit)

    # --- what a user can read ---------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The directory checkpoints are written to (a remote root's local staging root)."""
        return self.manager.root

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def step(self) -> int | None:
        """The step of the last boundary (or of the checkpoint resumed), None before any."""
        return self._clock.last_step

    @property
    def experiment_hash(self) -> str:
        """The hash of the experiment the run is in now."""
        with self._lock:
            return self._lineage.ensure(self._clock.last_step or 0)

    @property
    def experiment_dir(self) -> Path:
        return self.manager.layout.experiment_dir(self.experiment_hash)

    @property
    def watched_files(self) -> dict[str, ConfigFile]:
        """The hyperparameter files watched for edits, by registration name."""
        with self._lock:
            return self._watch.files

    @property
    def has_saved(self) -> bool:
        return self._saver.has_saved

    @property
    def skipped(self) -> int:
        """Saves dropped because the writer was behind (``backpressure="skip"`` or ``"latest"``)."""
        return self._saver.skipped

    @property
    def start_step(self) -> int:
        """The step this run resumed from, 0 for a fresh run. With ``resume="auto"``, reading it
        resumes now if that has not happened yet (register everything first)."""
        self._auto_resume()
        return self._start_step

    def _auto_resume(self) -> None:
        with self._lock:
            due, self._auto_resume_due = self._auto_resume_due, False
            if due and self.resume("latest"):
                log.info("resume='auto': continuing from %s", self._lineage.resumed_from)

    # --- events ---------------------------------------------------------------------------------
    def on(self, event: str, fn: Callable[[Any], Any] | None = None, *, priority: int = 0) -> Any:
        """Call ``fn(payload)`` at each ``event`` (or decorate it), higher ``priority`` first: weightslab.events."""
        return self.events.on(event, fn, priority=priority)

    def off(self, event: str, fn: Callable[[Any], Any]) -> bool:
        """Stop calling ``fn`` at ``event``; False if it was not subscribed."""
        return self.events.off(event, fn)

    # --- the triggers -----------------------------------------------------------------------
    def checkpoint_on_step(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Mark the end of training step ``step`` (after its optimizer update); save if it is due.

        Returns True when a checkpoint was taken at this boundary (written in the background).
        """
        step, metrics = check_step(step), check_metrics(metrics)
        with self._lock:
            # An implicit save decided at the optimizer hook of this same step is superseded by this
            # call (which marks the true end of the step); its reasons carry over.
            inherited = self._clock.explicit_call()
            saved = self._boundary(step, metrics=metrics,
                                   forced=tuple(r for r in inherited.reasons if r != "step") if inherited else (),
                                   forced_changes=inherited.changes if inherited else ())
        self._stop_if_preempted()
        return saved

    def checkpoint_on_model_change(self) -> bool:
        """Checkpoint now because the architecture changed (detected anyway at the next boundary)."""
        return self._forced("model_change", {"kind": "model_change", "forced": True})

    def checkpoint_on_config_change(self) -> bool:
        """Checkpoint now because the hyperparameters changed (detected anyway at the next boundary)."""
        return self._forced("config_change", {"kind": "config_change", "forced": True})

    def checkpoint_on_state_change(self, kind: str = "state") -> bool:
        """Checkpoint now because the model state changed (``'freeze'``, ``'reset'``, ``'eval'``, ...)."""
        return self._forced("state_change", {"kind": check_change_kind(kind), "forced": True})

    def _forced(self, event: str, change: dict[str, Any]) -> bool:
        with self._lock:
            last = self._clock.last
            saved = self._boundary(last.step if last else 0, metrics=last.metrics if last else None,
                                   forced=(event,), forced_changes=(change,))
        self._stop_if_preempted()
        return saved

    def _implicit_boundary(self, step: int) -> None:  # (the hooks found it: a save is completed at the next forward)
        self._boundary(step, metrics=None, defer=True)

    def _forward(self) -> None:
        if self._auto_resume_due:
            self._auto_resume()
        if self._clock.deferred is not None and not self._closed:
            with self._lock:
                self._complete_deferred()
            self._stop_if_preempted()

    def _complete_deferred(self) -> None:
        deferred = self._clock.take_deferred()
        if deferred is not None:
            self._save(deferred.step, deferred.reasons, deferred.changes, None, early=deferred.early)

    def _stop_if_preempted(self) -> None:
        """After a preemption signal: once the final checkpoint is durable, stop as the process would
        have without weightslab (the user's handler, KeyboardInterrupt, or death by the signal)."""
        if self._guard.pending is not None and self._clock.deferred is None:  # (a deferred save first)
            self._guard.stop(durable=lambda: self._saver.wait() or self.events.wait(self.events.timeout),
                             before=self._job.barrier_before_stop)

    # --- the step boundary ------------------------------------------------------------------
    def _boundary(self, step: int, *, metrics: Mapping[str, Any] | None, forced: tuple[str, ...] = (),
                  forced_changes: tuple[dict[str, Any], ...] = (), defer: bool = False) -> bool:
        if self._auto_resume_due:
            self._auto_resume()
            if self._start_step and step <= self._start_step and not forced:
                self._failures.warn_once(
                    "auto-resume-labels", "the run resumed at step %d (resume='auto'), but the loop passed step %d: "
                    "start the loop at system.start_step + 1 so checkpoints are labelled with the right step",
                    self._start_step, step)
        with self._lock:
            self._check_open()
            self._saver.settle()
            self._complete_deferred()
            last = self._clock.last_step
            if last is not None and step < last and not forced:
                self._failures.warn_once("backwards", "the step went backwards (%d after %d); checkpoints are "
                                         "labelled with the step you pass, so pass a step that keeps growing", step, last)
            events, changes = list(forced), list(forced_changes)
            try:
                changes += self._watch.take(step, self.ledger.objects("hyperparams"), self._job)
                look = self._lineage.look(step, last_step=last, forced=forced)
                events += [e for e in look.events if e not in events]
                changes += look.changes
                if look.hyperparams_moved or not self._binding_seen:
                    self._apply_bindings(step)
            except Exception as exc:  # never let change detection stop training
                self._failures.fail(f"change detection at step {step}", exc)
            self._clock.passed(step, metrics)
            if self._lineage.record is None:  # no fingerprint could be taken: nothing to file a save under
                return False
            if self._guard.pending is not None and "preempt" not in events:
                events.append("preempt")
            # In a distributed job, rank 0's clock decides every_seconds (each rank's would differ).
            seconds = self._saver.seconds_since_save() if self._job.rank == 0 else None
            reasons = self._policy.reasons(step=step, events=events, seconds_since_save=seconds)
            if self._job.distributed:
                reasons = self._agree(step, reasons)
            if not reasons:
                return False
            if not defer:
                return self._save(step, reasons, changes, metrics)
            early = self._saver.capture_early(f"{self._lineage.hash}@{step}")
            if early is None:
                return False
            self._clock.defer(Deferred(step, reasons, tuple(changes), early))
            return True

    def _agree(self, step: int, reasons: tuple[str, ...]) -> tuple[str, ...]:
        """Every rank's decision at this boundary, the same on all (see :meth:`Job.agree`)."""
        if self._job.gone:
            self._failures.warn_once("group-gone", "the torch.distributed process group was destroyed: no checkpoint "
                                     "from step %d on (call system.close() before dist.destroy_process_group())", step)
            return ()
        try:
            agreed = self._job.agree(reasons, signal=self._guard.pending, edits=self._watch.holds_edits)
        except Exception as exc:  # a rank died: the job is over, but do not hide why
            self._failures.fail(f"agreeing with the other ranks at step {step}", exc)
            return ()
        if agreed.signal:
            self._guard.adopt(agreed.signal)  # another rank was told to stop: this one stops with it
        self._watch.agreed(agreed.edits)
        return agreed.reasons

    def _apply_bindings(self, step: int) -> None:
        """Hyperparameters bound to optimizer settings (``optimizer.lr``, ...) reach the optimizers."""
        self._binding_seen = True
        for line in self._binding.apply(self.ledger.objects("hyperparams"), self.ledger.objects("optimizer"),
                                        self.ledger.objects("scheduler")):
            log.info("step %d: %s", step, line)

    def _save(self, step: int, reasons: tuple[str, ...], changes: Any, metrics: Mapping[str, Any] | None, *,
              early: Mapping[str, Any] | None = None) -> bool:
        assert self._lineage.record is not None
        return self._saver.save(experiment=self._lineage.record, step=step, reasons=reasons, changes=changes,
                                metrics=metrics, resumed_from=self._lineage.resumed_from, early=early,
                                overlap=self.config.overlap and self._clock.guards_next_step)

    # --- waiting and closing ----------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save taken so far is durable and its events' callbacks ran; raise what was kept."""
        self._saver.wait()
        self.events.wait()
        self._failures.raise_kept()

    flush = wait

    def close(self) -> None:
        """Take the final checkpoint if due, wait for every save, stop the writer. Idempotent.

        Raises :class:`CheckpointSaveError` if any save failed since the last ``wait()``.
        """
        self._close(crashed=False)

    def _close(self, *, crashed: bool) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                if not crashed:
                    self._final_save()
            finally:
                self._closed = True
                self._attachments.close()
                atexit.unregister(self._atexit)
        self._saver.close()
        self.events.close()  # (after the writer: its events are all dispatched)
        pending = self._guard.pending
        self._guard.uninstall()
        if pending is not None and not crashed:  # the loop ended after a preemption signal: stop now
            self._guard.deliver()
        self._failures.raise_kept()

    def _final_save(self) -> None:
        self._complete_deferred()
        last = self._clock.last
        if not self.config.save_on_close or last is None or self._lineage.record is None:
            return
        if self._job.gone:
            self._failures.warn_once("group-gone-close", "no final checkpoint: the torch.distributed process group "
                                     "was destroyed before close(); call system.close() before "
                                     "dist.destroy_process_group()")
            return
        if self._saver.saved(self._lineage.record.hash, last.step):
            return
        why_not = self._clock.why_the_state_may_not_be_the_last_step()
        if why_not:
            log.warning("no final checkpoint at close: %s", why_not)
            return
        self._boundary(last.step, metrics=last.metrics, forced=("exit",))

    def _atexit(self) -> None:
        # An unhandled exception sets sys.last_value before atexit runs: the state may be mid-step.
        crashed = getattr(sys, "last_value", None) is not None or getattr(sys, "last_exc", None) is not None
        try:
            self._close(crashed=crashed)
        except Exception as exc:  # noqa: BLE001 - nothing can raise to the user at exit; log loudly
            log.error("weightslab: at exit, %s", exc)

    def __enter__(self) -> "AutomaticCheckpointSystem":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._close(crashed=exc_type is not None)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this checkpoint system is closed; get a new one with wl.get_checkpoint_system()")

    # --- resuming and forking -----------------------------------------------------------------
    def peek(self, ref: str | os.PathLike[str] = "latest") -> CheckpointInfo | None:
        """What :meth:`resume` would restore from ``ref``, without changing anything; None if nothing.

        Use it to build the model a checkpoint needs before registering it (its hyperparameters
        and architecture are in the result).
        """
        with self._lock:
            self._saver.wait()
            return self._restorer.peek(ref, self._lineage.current_hash)

    def resume(self, ref: str | os.PathLike[str] = "latest", *, model_factory: Callable[[CheckpointInfo], Any] | None = None,
               rank_state: str | None = None, allow_lossy: bool = False) -> int:
        """Restore every registered object from ``ref`` (RNG last) and return the step restored.

        ``ref`` is ``"latest"`` (the newest checkpoint of this run's lineage: the experiment the
        registered objects hash to and every experiment opened from it by a change or a fork),
        ``"<hash or name>@<step>"``, ``"<hash or name>@latest"``, ``"<hash or name>@best[:metric]"``
        or a path. Returns 0 when ``"latest"`` finds nothing. With ``"latest"``, a damaged checkpoint
        is skipped for the newest one that verifies, with a warning. Raises
        :class:`ArchitectureMismatchError` listing the differences, before changing anything, when
        the checkpoint does not fit the registered model.

        ``model_factory(info)`` rebuilds what the checkpoint needs from its :class:`CheckpointInfo`
        (hyperparameters and structure, nothing unpickled) before anything is restored: it returns
        the model, or ``{"model": model, "optimizer": optimizer, "scheduler": scheduler}`` (several
        models: ``{"model": {name: module}}``), registered under the checkpoint's names.

        In a torch.distributed job every rank calls it and gets back its own random generators,
        loader position and custom state. On another number of ranks, loader positions are resharded
        and the rest restored when it was the same on every saved rank; otherwise
        :class:`RankStateError` lists it, unless ``rank_state="rank0"`` gives every rank rank 0's.
        An archived (lossy) checkpoint raises :class:`LossyCheckpointError` naming the nearest exact one, unless
        ``allow_lossy=True``: then the run goes on in a child experiment (reason ``lossy_resume``).
        """
        with self._lock:
            self._check_open()
            self._saver.wait()
            self._auto_resume_due = False  # resumed (or chose not to) explicitly: no automatic resume
            resolved = self._restorer.load(ref, self._lineage.current_hash, model_factory=model_factory,
                                           allow_lossy=allow_lossy)
            if resolved is None:
                self._lineage.start_fresh(str(self.root))
                return 0
            follow = self._lineage.continue_from if resolved.manifest.exact else self._lineage.continue_lossy
            with self._restore(resolved, rank_state=rank_state):
                lines = follow(resolved.manifest, resolved.record)
            if lines is not None:
                reason = "resume_with_changes" if resolved.manifest.exact else "lossy_resume"
                self._save(resolved.step, (reason,), [{"kind": reason, "diff": lines}], None)
            return resolved.step

    def fork(self, ref: str | os.PathLike[str], *, name: str | None = None, **overrides: Any) -> int:
        """Start a new branch from checkpoint ``ref``: restore it, change the hyperparameters given
        as ``overrides``, and continue in a new experiment whose parent is ``ref`` (reason
        ``"fork"``), named ``name`` if given. Returns the step restored (continue at step + 1).

        Overrides change existing keys of the registered hyperparameters; ``__`` separates nested
        keys (``optimizer__lr=0.01`` sets ``optimizer.lr``). Keys bound to an optimizer setting
        reach the optimizer. Nothing changes when the ref, the name or an override is not valid.
        A fork is its own experiment even without overrides: its branch enters the hash.
        """
        with self._lock:
            self._check_open()
            self._saver.check_new_name(name)
            self._saver.wait()
            self._auto_resume_due = False
            resolved = self._restorer.load(ref, self._lineage.current_hash, fall_back=False)
            if resolved is None:
                raise CheckpointNotFoundError(f"wl.fork({str(ref)!r}): there is no checkpoint to fork from yet")
            manifest, step = resolved.manifest, resolved.step
            edits = self._restorer.fork_edits(resolved, overrides)  # (checked before anything changes)
            with self._restore(resolved, kind="fork"):
                lines = apply_edits(edits, self.ledger.objects("hyperparams"))
                self._apply_bindings(step)
                # One branch (it enters the hash) for every rank: rank 0's.
                branch = self._job.share((name or f"fork-{uuid.uuid4().hex[:12]}").encode()).decode()
                exp = self._lineage.fork(manifest, branch=branch, lines=lines)
            if name is not None and self._job.writes:
                self._saver.name_experiment(exp, name)
            log.info("forked %s -> new experiment %s%s at step %d: %s", manifest.ref, exp,
                     f" ({name!r})" if name else "", step, "; ".join(lines) or "no hyperparameter changes")
            self._save(step, ("fork",), [{"kind": "fork", "from": manifest.ref, "name": name, "diff": lines}], None)
            return step

    @contextlib.contextmanager
    def _restore(self, resolved: Resolved, *, rank_state: str | None = None, kind: str = "resume") -> Iterator[None]:
        """Put ``resolved`` into the registered objects and run the block (the lineage: a resume and a
        fork differ); if it raises, they are put back as they were. Then the clock, the saver and the
        optimizer binding continue from its step (``before_load`` and ``loaded`` around it all)."""
        def baseline() -> None:
            self._binding.baseline(self.ledger.objects("hyperparams"), self.ledger.objects("optimizer"))
        restored = self._restorer.restore(resolved, rank_state=rank_state, kind=kind)
        baseline()
        with restored.taken_back_on_error(then=baseline):
            yield
        self._saver.learn_restored(resolved.manifest, restored.tensors)
        self._clock.restart(resolved.step)
        self._start_step, self._binding_seen = resolved.step, True
        self._restorer.loaded(resolved, kind)

    def name_experiment(self, name: str, *, replace: bool = False) -> str:
        """Give the current experiment a human name, usable in refs (``name@latest``); returns its hash."""
        exp = self.experiment_hash
        self._saver.name_experiment(exp, name, replace=replace)
        return exp

