"""The automatic checkpoint system: the one orchestrator, and the only place where the parts meet.

At each step boundary it asks the change detector what changed, the fingerprint which experiment
the run now is, and the save policy whether to save; a save captures the state, copies its
tensors, and hands the copy to the background writer, which commits it through the checkpoint
manager. ``resume`` goes the other way: resolve a ref, verify, check fit, restore (RNG last).

Step boundaries come from ``checkpoint_on_step(step)`` calls or, in a loop that never makes them,
from the registered optimizers: once every registered optimizer has stepped, their post-step hook
is the boundary. A save decided there is taken in two parts, so that it holds exactly what a
``checkpoint_on_step`` call at the end of the loop body would: at the hook, what the next step
consumes before its forward pass (random generators, loader positions); at the next forward of a
registered model, everything else, once the rest of the step (``scheduler.step()``,
``scaler.update()``, the user's own counters) is done and before the forward touches any buffer.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import codec, data
from . import hyperparams as _hp
from . import ranks as _ranks
from . import sharded as _sharded
from . import state as _state
from .binding import OptimizerBinding
from .change import ChangeDetector, StateChange
from .configfile import WATCH_MODES, ConfigFile, Edit, merge_edit
from .errors import (ArchitectureMismatchError, CheckpointNotFoundError, CheckpointSaveError, ConfigError,
                     CorruptCheckpointError, HyperparamsError, InvalidMetricsError, InvalidStepError, WeightslabError)
from .experiment import ExperimentRecord, Parent
from .fingerprint import ExperimentHashGenerator, Fingerprint, architecture_text, diff_architecture, diff_hyperparams
from ._version import __version__
from .ledger import LEDGER, Entry, Ledger
from .manager import CheckpointEntry, CheckpointManager, SaveRequest
from .manifest import Manifest, canonical_json
from .refs import check_name, parse_ref
from .remote import RemoteRoot, is_remote, staging_dir
from .preemption import PreemptionGuard, signal_numbers
from .retention import KeepBest, Retention
from .sharded import is_sharded
from .snapshot import Snapshotter, dtype_tag, tag_dtype
from .surgery import carry_optimizer_state, parameter_names
from .triggers import REASONS, SavePolicy
from .world import World, digest64
from .writer import Writer

__all__ = [
    "CheckpointConfig",
    "CheckpointInfo",
    "AutomaticCheckpointSystem",
    "get_checkpoint_system",
    "checkpoint_on_step",
    "checkpoint_on_model_change",
    "checkpoint_on_config_change",
    "checkpoint_on_state_change",
    "fork",
]

log = logging.getLogger(__name__)

_ABSENT = object()


def _default_root() -> Path:
    return Path(os.environ.get("WEIGHTSLAB_ROOT") or "./experiments")


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Settings of the checkpoint system; the defaults serve a person who passes nothing."""

    #: Where experiments go. Default: ``$WEIGHTSLAB_ROOT`` or ``./experiments``. An fsspec URL
    #: (``s3://bucket/runs``, ``gs://...``, ``file://...``, ``memory://...``) is a remote root:
    #: training writes to a local staging root (``$WEIGHTSLAB_STAGING`` or
    #: ``~/.cache/weightslab/staging``) and every checkpoint is uploaded in the background.
    root_log_dir: Path | str = field(default_factory=_default_root)
    #: Save when ``step % checkpoint_frequency == 0``; None saves only on changes and at exit.
    checkpoint_frequency: int | None = 100
    #: Raise save failures at once (saves become synchronous) instead of logging and keeping them.
    strict: bool = False
    #: Hook registered optimizers (and the forward of registered models) to find step boundaries
    #: in loops that never call ``checkpoint_on_step``.
    hook_optimizer: bool = True
    #: Take a final checkpoint at ``close()`` (and interpreter exit) if the last step has none.
    save_on_close: bool = True
    #: Also save when this many seconds passed since the last save (checked at step boundaries).
    every_seconds: float | None = None
    #: Saves queued or being written at most (their snapshots are in host memory).
    max_pending_saves: int = 2
    #: Bytes of snapshots in flight at most (None: bounded by max_pending_saves only).
    max_pending_bytes: int | None = None
    #: When the writer falls behind: ``"block"`` waits for room; ``"skip"`` drops the new save
    #: with a warning (training never waits for the disk).
    backpressure: str = "block"
    #: Signals that mean "take a final checkpoint at the end of this step, then stop as you would
    #: have" (a second signal stops at once). Empty: weightslab installs no signal handler.
    preempt_signals: tuple[str, ...] = ("SIGTERM", "SIGINT")
    #: After a preemption signal, how long to wait for a step boundary before stopping without one.
    preempt_timeout: float = 60.0
    #: ``"auto"``: resume from the latest checkpoint of this run's lineage by itself, before the
    #: first forward or step boundary (read ``system.start_step`` for the step); ``"never"``: start
    #: fresh even if checkpoints exist; None: resume when ``system.resume()`` is called.
    resume: str | None = None
    #: Hyperparameter keys (bare names or dotted paths) that do not change the experiment, on top
    #: of ``weightslab.fingerprint.DEFAULT_EXCLUDED_KEYS``.
    exclude_keys: tuple[str, ...] = ()
    #: ``"zstd"``: store changed tensors byte-shuffled and zstd-compressed when that saves space
    #: (lossless; needs ``pip install 'weightslab[zstd]'``).
    compression: str = "off"
    #: Store a changed tensor as an XOR delta against its previous version (needs compression="zstd").
    delta: bool = False
    #: With ``delta``: a self-contained copy every N versions, so a restore decodes at most N blobs.
    reanchor_interval: int = 10
    #: Every N-th save copies and hashes every tensor, to check the cheap "unchanged" signal
    #: (version counters) that lets the other saves skip unchanged tensors; 0 never checks.
    full_check_every: int = 10
    #: Which checkpoints to keep, applied to the experiment after each save: a
    #: :class:`~weightslab.retention.Retention` or a dict of ``Retention.of`` arguments, e.g.
    #: ``{"keep_last": 5, "keep_best": 1, "metric": "val_loss"}``. None keeps everything. The
    #: latest and the best are never deleted; ``wl.gc()`` reclaims the space.
    retention: Retention | None = None
    #: How a hyperparameter file registered by path is watched for edits, applied at the next
    #: step boundary: ``"auto"`` (file-system events), ``"poll"`` (network filesystems), ``"off"``.
    watch_files: str = "auto"
    #: Hyperparameter paths bound to optimizer settings, besides ``optimizer.<key>``:
    #: ``{"train.learning_rate": "lr"}`` (every optimizer) or ``{"gan.d_lr": "discriminator.lr"}``.
    optimizer_keys: Mapping[str, str] = field(default_factory=dict)
    #: Resuming a distributed job's checkpoint on another number of ranks, when the saved ranks'
    #: random generators or custom state differ: ``"exact"`` refuses, naming them; ``"rank0"``
    #: gives every rank rank 0's (loader positions are resharded either way).
    rank_state: str = "exact"

    @property
    def local_root(self) -> Path:
        """The directory checkpoints are written to: the root, or a remote root's staging root."""
        return staging_dir(self.root_log_dir) if is_remote(self.root_log_dir) else Path(self.root_log_dir)

    def __post_init__(self) -> None:
        if not isinstance(self.root_log_dir, (str, os.PathLike)):
            raise ConfigError(f"root_log_dir must be a path or an fsspec URL, got {type(self.root_log_dir).__name__}")
        if not is_remote(self.root_log_dir):
            object.__setattr__(self, "root_log_dir", Path(self.root_log_dir).expanduser().absolute())
        freq = self.checkpoint_frequency
        if freq is not None and (isinstance(freq, bool) or not isinstance(freq, int) or freq < 1):
            raise ConfigError(f"checkpoint_frequency must be a positive integer (save every N steps) or None "
                              f"(save only on changes), got {freq!r}")
        for name in ("strict", "hook_optimizer", "save_on_close"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.max_pending_saves, bool) or not isinstance(self.max_pending_saves, int) \
                or self.max_pending_saves < 1:
            raise ConfigError(f"max_pending_saves must be a positive integer, got {self.max_pending_saves!r}")
        if self.max_pending_bytes is not None and (isinstance(self.max_pending_bytes, bool) or not isinstance(
                self.max_pending_bytes, int) or self.max_pending_bytes < 1):
            raise ConfigError(f"max_pending_bytes must be a positive integer or None, got {self.max_pending_bytes!r}")
        if self.backpressure not in ("block", "skip"):
            raise ConfigError(f"backpressure must be 'block' (wait for the writer) or 'skip' (drop the save), "
                              f"got {self.backpressure!r}")
        try:
            SavePolicy(every_steps=self.checkpoint_frequency, every_seconds=self.every_seconds)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("every_steps", "checkpoint_frequency")) from None
        if isinstance(self.preempt_signals, str):
            raise ConfigError(f"preempt_signals must be a list of signal names, not a string; write "
                              f"preempt_signals=[{self.preempt_signals!r}]")
        object.__setattr__(self, "preempt_signals", tuple(self.preempt_signals))
        try:
            signal_numbers(self.preempt_signals)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if isinstance(self.preempt_timeout, bool) or not isinstance(self.preempt_timeout, (int, float)) \
                or self.preempt_timeout < 0:
            raise ConfigError(f"preempt_timeout must be a number of seconds >= 0, got {self.preempt_timeout!r}")
        if self.resume not in (None, "auto", "never"):
            raise ConfigError(f"resume must be 'auto', 'never' or None (resume when system.resume() is called), "
                              f"got {self.resume!r}")
        if isinstance(self.exclude_keys, str):
            raise ConfigError("exclude_keys must be a list of key names, not a single string; "
                              f"write exclude_keys=[{self.exclude_keys!r}]")
        keys = tuple(self.exclude_keys)
        if not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"exclude_keys must be non-empty strings, got {keys!r}")
        object.__setattr__(self, "exclude_keys", keys)
        if self.compression not in ("off", "zstd"):
            raise ConfigError(f"compression must be 'off' or 'zstd', got {self.compression!r}")
        if not isinstance(self.delta, bool):
            raise ConfigError(f"delta must be True or False, got {self.delta!r}")
        if self.delta and self.compression != "zstd":
            raise ConfigError("delta=True stores XOR deltas compressed with zstd: also pass compression='zstd'")
        if isinstance(self.retention, Mapping):
            try:
                object.__setattr__(self, "retention", Retention.of(**self.retention))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"retention: {exc}; use keys keep_last, keep_every, keep_best, metric, mode, "
                                  "keep_changes") from None
        elif self.retention is not None and not isinstance(self.retention, Retention):
            raise ConfigError(f"retention must be a weightslab.retention.Retention, a dict of its settings or None, "
                              f"got {type(self.retention).__name__}")
        if self.watch_files not in WATCH_MODES:
            raise ConfigError(f"watch_files must be one of {', '.join(map(repr, WATCH_MODES))}, got {self.watch_files!r}")
        if not isinstance(self.optimizer_keys, Mapping) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v and not v.endswith(".")
                for k, v in self.optimizer_keys.items()):
            raise ConfigError(f"optimizer_keys must map hyperparameter paths to optimizer settings, such as "
                              f"{{'train.learning_rate': 'lr'}} or {{'gan.d_lr': 'discriminator.lr'}}; got "
                              f"{self.optimizer_keys!r}")
        object.__setattr__(self, "optimizer_keys", dict(self.optimizer_keys))
        if self.rank_state not in _ranks.RANK_STATE_MODES:
            raise ConfigError(f"rank_state must be one of {', '.join(map(repr, _ranks.RANK_STATE_MODES))}, "
                              f"got {self.rank_state!r}")
        for name in ("reanchor_interval", "full_check_every"):
            value = getattr(self, name)
            low = 1 if name == "reanchor_interval" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its (verified) manifest without loading any tensor."""

    ref: str
    experiment: str
    step: int
    reasons: tuple[str, ...]
    created: str
    metrics: Mapping[str, Any]
    hyperparams: Mapping[str, Any]  # registration name -> saved values
    path: Path
    parent: str | None  # the experiment's parent ref, if it was opened by a change
    architecture: list[Any]  # the experiment's structural description (see fingerprint)
    nbytes: int


@dataclass(frozen=True)
class _Deferred:
    """An implicit save decided at an optimizer's post-step hook, completed at the next forward."""

    step: int
    reasons: tuple[str, ...]
    changes: tuple[dict[str, Any], ...]
    early: Mapping[str, Any]  # what state.capture_early took at the hook


def signal_name(number: int | None) -> str:
    try:
        return signal.Signals(number).name if number is not None else "signal"
    except ValueError:
        return f"signal {number}"


def _now() -> tuple[str, int]:
    ns = time.time_ns()
    iso = _dt.datetime.fromtimestamp(ns / 1e9, tz=_dt.timezone.utc).isoformat(timespec="microseconds")
    return iso.replace("+00:00", "Z"), ns


def _versions() -> dict[str, str]:
    return {"weightslab": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _validate_step(step: Any) -> int:
    if isinstance(step, bool) or not hasattr(step, "__index__"):
        raise InvalidStepError(f"checkpoint_on_step(step) needs an integer step (the number of optimizer "
                               f"updates done), got {type(step).__name__} {step!r}; pass int(step)")
    value = step.__index__()
    if value < 0:
        raise InvalidStepError(f"checkpoint_on_step(step) needs a step >= 0, got {value}")
    return value


def _validate_metrics(metrics: Any) -> dict[str, Any] | None:
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        raise InvalidMetricsError(f"metrics must be a dict of names to numbers, got {type(metrics).__name__}")
    out = {}
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise InvalidMetricsError(f"metric names must be strings, got {name!r}")
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
            raise InvalidMetricsError(f"metric {name!r} must be a number, got {type(value).__name__} {value!r}; "
                                      "pass loss.item() rather than the tensor or a list")
        out[name] = codec.encode(float(value), path=f"metrics/{name}", tensors={}, what="metrics")
    return out


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
    """

    def __init__(self, config: CheckpointConfig | None = None, *, ledger: Ledger = LEDGER, **settings: Any):
        if config is None:
            config = _make_config(settings)
        elif settings:
            raise ConfigError("pass either a CheckpointConfig or keyword settings, not both")
        self.config = config
        self.ledger = ledger
        try:  # only rank 0 sweeps temporary files: a pid in a file name means nothing on another host
            self.manager = CheckpointManager(config.local_root, compression=config.compression, delta=config.delta,
                                             reanchor_interval=config.reanchor_interval,
                                             sweep=getattr(World.current(), "rank", 0) == 0)
            self._remote = RemoteRoot(config.root_log_dir, self.manager.layout) \
                if is_remote(config.root_log_dir) else None
            self.manager.remote = self._remote  # packs a restore needs are fetched before they are read
        except ImportError as exc:
            raise ConfigError(str(exc)) from exc
        self._unpushed: list[Manifest] = []  # committed locally, not uploaded yet (a failed push)
        best = [p for p in (config.retention.policies if config.retention else ()) if isinstance(p, KeepBest)]
        if best:  # a bare "<hash>@best" ranks by the metric retention keeps the best of
            self.manager.best_metric = (best[0].metric, best[0].mode)
        self._snapshotter = Snapshotter(full_check_every=config.full_check_every)
        self._policy = SavePolicy(every_steps=config.checkpoint_frequency, every_seconds=config.every_seconds)
        self._hasher = ExperimentHashGenerator(exclude_keys=config.exclude_keys)
        self._detector = ChangeDetector()
        self._binding = OptimizerBinding(config.optimizer_keys)
        self._files: dict[str, ConfigFile] = {}  # watched hyperparameter files, by registration name
        self._writer = Writer(max_pending=config.max_pending_saves, max_pending_bytes=config.max_pending_bytes)
        self._lock = threading.RLock()
        self._run = uuid.uuid4().hex[:12]
        self._experiment: ExperimentRecord | None = None
        self._fingerprint: Fingerprint | None = None
        self._last_step: int | None = None
        self._metrics: tuple[int, dict[str, Any]] | None = None  # (step, metrics) last passed in
        self._saved: set[tuple[str, int]] = set()  # (experiment, step) saved by this run
        self._resumed_from: str | None = None
        self._explicit = False  # the loop calls checkpoint_on_step itself
        self._deferred: _Deferred | None = None  # an implicit save to complete at the next forward
        self._stepped: set[int] = set()  # optimizers stepped since the last boundary
        self._optimizer_ran = False  # an optimizer step started since the last boundary
        self._handles: dict[tuple[str, str], list[Any]] = {}
        self._warned: set[str] = set()
        self._closed = False
        self._last_save_time = time.monotonic()  # for every_seconds: the run's start counts as a save
        self._skipped = 0  # saves dropped by backpressure="skip"
        self._binding_seen = False  # the optimizer binding has taken its baseline
        self._branch: str | None = None  # set by fork(): part of every hash this run computes from then on
        self._auto_resume_due = config.resume == "auto"
        self._start_step = 0  # the step the run resumed from (0: fresh)
        self._world: World | None = None  # the torch.distributed job, once one is seen
        self._edits: list[tuple[str, Edit]] = []  # rank 0: file edits read, to apply once every rank agreed
        self._edits_due = False  # every rank agreed at the last boundary to apply rank 0's edits now
        self._shard_saves: list[tuple[str, _sharded.SaveHandle]] = []  # ranks > 0: their shards being written
        self._guard = PreemptionGuard(signal_numbers(config.preempt_signals), timeout=config.preempt_timeout)
        if config.preempt_signals and not self._guard.install():
            log.info("the checkpoint system was created outside the main thread: no preemption signal handlers")
        self._detector.install()
        for kind in ("model", "optimizer", "dataloader", "hyperparams"):
            for entry in ledger.entries(kind).values():
                self._attach(entry)
        self._unsubscribe = ledger.subscribe(self._on_ledger)
        atexit.register(self._atexit)
        log.debug("checkpoint system started under %s", self.root)

    # --- properties -------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self.config.local_root

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def step(self) -> int | None:
        """The step of the last boundary (or of the checkpoint resumed), None before any."""
        return self._last_step

    @property
    def experiment_hash(self) -> str:
        """The hash of the experiment the run is in now."""
        with self._lock:
            if self._experiment is None:
                self._refresh(self._last_step or 0)
            assert self._experiment is not None
            return self._experiment.hash

    @property
    def experiment_dir(self) -> Path:
        return self.manager.layout.experiment_dir(self.experiment_hash)

    @property
    def watched_files(self) -> dict[str, ConfigFile]:
        """The hyperparameter files watched for edits, by registration name."""
        with self._lock:
            return dict(self._files)

    @property
    def has_saved(self) -> bool:
        return bool(self._saved)

    @property
    def start_step(self) -> int:
        """The step this run resumed from, 0 for a fresh run. With ``resume="auto"``, reading it
        resumes now if that has not happened yet (register everything first)."""
        if self._auto_resume_due:
            self._auto_resume()
        return self._start_step

    def _auto_resume(self) -> None:
        with self._lock:
            if not self._auto_resume_due:
                return
            self._auto_resume_due = False
            step = self.resume("latest")
            if step:
                log.info("resume='auto': continuing from %s", self._resumed_from)

    # --- ledger events and hooks ------------------------------------------------------------
    def _on_ledger(self, event: str, entry: Entry, previous: Entry | None) -> None:
        # Called outside the ledger's lock, so taking ours cannot deadlock with a boundary (which
        # holds ours and then reads the ledger).
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
                self._detector.invalidate()

    def _carry_over(self, old: Any, new: Any, name: str) -> None:
        """An optimizer registered again (after model surgery, typically): the state of the
        parameters that did not change moves to the new one; the rest starts fresh, with a warning."""
        try:
            report = carry_optimizer_state(old, new, old_names=self._detector.parameter_names(),
                                           new_names=parameter_names(self.ledger.objects("model")))
        except Exception as exc:  # never let this stop training: the new optimizer just starts fresh
            self._fail(f"carrying the state of optimizer {name!r} over", exc)
            return
        if report.reset or report.dropped or report.reason:
            log.warning("optimizer %r registered again: %s", name, report)
        else:
            log.info("optimizer %r registered again: %s", name, report)

    def _attach(self, entry: Entry) -> None:
        key = (entry.kind, entry.name)
        if entry.kind == "hyperparams" and entry.source is not None and isinstance(entry.obj, _hp.LiveConfig) \
                and self.config.watch_files != "off":
            self._files[entry.name] = ConfigFile(entry.source, entry.obj, watch=self.config.watch_files)
        if entry.kind == "dataloader":
            problem = data.make_resumable(entry.obj, name=entry.name)
            if problem is not None:
                self._warn_once(f"loader:{entry.name}", "%s. A resumed run restarts that loader's epoch, so it is "
                                "not exact.", problem)
        if not self.config.hook_optimizer:
            return
        if entry.kind == "optimizer":
            opt = entry.obj
            self._handles[key] = [opt.register_step_pre_hook(self._on_optimizer_pre_step),
                                  opt.register_step_post_hook(self._on_optimizer_step)]
        elif entry.kind == "model":
            self._handles[key] = [entry.obj.register_forward_pre_hook(self._on_forward)]

    def _detach(self, entry: Entry) -> None:
        for handle in self._handles.pop((entry.kind, entry.name), []):
            handle.remove()
        if entry.kind == "hyperparams" and entry.name in self._files:
            self._files.pop(entry.name).close()
        if entry.kind == "dataloader":
            data.undo_resumable(entry.obj)

    def _on_optimizer_pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        self._optimizer_ran = True

    def _on_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._explicit or self._closed:
            return
        with self._lock:
            self._stepped.add(id(optimizer))
            if len(self._stepped) < len(self._handles_of("optimizer")):
                return  # wait until every registered optimizer has stepped (GANs step two per iteration)
            self._stepped.clear()
            if self._deferred is not None:
                self._warn_once("no-forward",
                                "the checkpoint of step %d was dropped: the optimizers stepped again before any "
                                "forward of a registered model, which is where implicit checkpoints are "
                                "completed. Register the model you train, or call wl.checkpoint_on_step(step) "
                                "at the end of each step.", self._deferred.step)
                self._deferred = None
            self._boundary((self._last_step or 0) + 1, metrics=None, forced=(), forced_changes=(), defer=True)

    def _handles_of(self, kind: str) -> list[tuple[str, str]]:
        return [k for k in self._handles if k[0] == kind]

    def _on_forward(self, module: Any, args: Any) -> None:
        if self._auto_resume_due:
            self._auto_resume()
        if self._deferred is not None and not self._closed:
            with self._lock:
                self._complete_deferred()
            self._stop_if_preempted()

    def _complete_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._save(deferred.step, deferred.reasons, deferred.changes, early=deferred.early)

    # --- the public triggers ----------------------------------------------------------------
    def checkpoint_on_step(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Mark the end of training step ``step`` (after its optimizer update); save if it is due.

        Returns True when a checkpoint was taken at this boundary (written in the background).
        """
        step = _validate_step(step)
        metrics = _validate_metrics(metrics)
        with self._lock:
            first_explicit, self._explicit = not self._explicit, True
            # An implicit save decided at the optimizer hook of this same step is superseded by this
            # call (which marks the true end of the step); its reasons carry over.
            inherited, self._deferred = self._deferred, None
            forced = tuple(r for r in inherited.reasons if r != "step") if inherited else ()
            if first_explicit:
                self._last_step = None  # implicit step counting does not constrain the loop's labels
            saved = self._boundary(step, metrics=metrics, forced=forced,
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
        if not isinstance(kind, str) or not kind:
            raise InvalidStepError(f"checkpoint_on_state_change(kind) needs a short name of the change such as "
                                   f"'freeze' or 'reset', got {kind!r}")
        return self._forced("state_change", {"kind": kind, "forced": True})

    def _forced(self, event: str, change: dict[str, Any]) -> bool:
        with self._lock:
            step = self._last_step if self._last_step is not None else 0
            saved = self._boundary(step, metrics=None, forced=(event,), forced_changes=(change,))
        self._stop_if_preempted()
        return saved

    def _stop_if_preempted(self) -> None:
        """After a preemption signal: once the final checkpoint is durable, stop as the process would
        have without weightslab (the user's handler, KeyboardInterrupt, or death by the signal)."""
        if self._guard.pending is None or self._deferred is not None:
            return  # (an implicit save is completed at the next forward first)
        try:
            self._writer.wait()
            self._wait_shards()
        finally:
            world = self._job()
            if world is not None and world.alive:
                try:  # no rank stops (and makes a launcher kill the others) before rank 0's commit is durable
                    world.barrier()
                except Exception as exc:  # noqa: BLE001 - stopping anyway; say why the others may not wait
                    log.warning("could not wait for the other ranks before stopping: %s: %s", type(exc).__name__, exc)
            log.warning("final checkpoint after %s is durable; stopping", signal_name(self._guard.pending))
            self._guard.deliver()

    # --- the step boundary ------------------------------------------------------------------
    def _boundary(self, step: int, *, metrics: dict[str, Any] | None, forced: tuple[str, ...],
                  forced_changes: tuple[dict[str, Any], ...], defer: bool = False) -> bool:
        if self._auto_resume_due:
            self._auto_resume()
            if self._start_step and step <= self._start_step and not forced:
                self._warn_once("auto-resume-labels",
                                "the run resumed at step %d (resume='auto'), but the loop passed step %d: start the "
                                "loop at system.start_step + 1 so checkpoints are labelled with the right step",
                                self._start_step, step)
        with self._lock:
            self._check_open()
            self._complete_deferred()
            self._stepped.clear()
            if self._last_step is not None and step < self._last_step and not forced:
                self._warn_once("backwards", "the step went backwards (%d after %d); checkpoints are labelled "
                                "with the step you pass, so pass a step that keeps growing", step, self._last_step)
            if metrics is not None:
                self._metrics = (step, metrics)
            events: list[str] = list(forced)
            changes: list[dict[str, Any]] = list(forced_changes)
            state_changes: list[StateChange] = []
            try:
                changes += self._reload_files(step)
                poll = self._detector.poll()
                state_changes += poll.state
                if self._experiment is None or poll.structure or poll.hyperparams or \
                        {"model_change", "config_change"} & set(forced):
                    ev, ch, st = self._refresh(step)
                    events += [e for e in ev if e not in events]
                    changes += ch
                    state_changes += st
                if poll.hyperparams or not self._binding_seen:
                    self._apply_bindings(step)
            except Exception as exc:  # never let change detection stop training
                self._fail(f"change detection at step {step}", exc)
            if self._experiment is None:  # no fingerprint could be taken: nothing to file a save under
                self._last_step = step
                return False
            if state_changes:
                if "state_change" not in events:
                    events.append("state_change")
                changes += [c.to_json() for c in state_changes]
                for c in state_changes:
                    log.info("step %d: %s", step, c)
            if self._guard.pending is not None and "preempt" not in events:
                events.append("preempt")
            self._last_step = step
            self._optimizer_ran = False
            world = self._job()
            # In a distributed job, rank 0's clock decides every_seconds (each rank's would differ).
            seconds = time.monotonic() - self._last_save_time if world is None or world.rank == 0 else None
            reasons = self._policy.reasons(step=step, events=events, seconds_since_save=seconds)
            if world is not None:
                reasons = self._agree(world, step, reasons)
            if not reasons:
                return False
            if defer:
                try:
                    early = _state.capture_early(self.ledger)
                except Exception as exc:
                    self._fail(f"checkpoint {self._experiment.hash}@{step}", exc)
                    return False
                self._deferred = _Deferred(step, reasons, tuple(changes), early)
                return True
            return self._save(step, reasons, changes)

    def _reload_files(self, step: int) -> list[dict[str, Any]]:
        """Swap in the accepted edits of watched hyperparameter files (on the training thread).

        In a distributed job every rank must change its hyperparameters at the same step, whatever
        moment its own watcher saw the edit: rank 0 reads the files, the ranks agree at the end of
        the boundary (:meth:`_agree`), and at the next one rank 0's edits go to every rank."""
        world = self._job()
        if world is None:
            edits = self._poll_files()
        else:
            edits = self._shared_edits(world) if self._edits_due else []
            self._edits_due = False
            if world.rank == 0 and not self._edits:
                self._edits = self._poll_files()
        changes = []
        hparams = self.ledger.objects("hyperparams")
        for name, path, edit in edits:
            live = hparams.get(name)
            if not isinstance(live, _hp.LiveConfig):
                continue  # unregistered since (on this rank)
            live.swap(edit.values)
            log.info("step %d: %s changed: %s (hyperparameters %r)", step, path, "; ".join(edit.changed), name)
            changes.append({"kind": "config_file", "hyperparams": name, "file": path, "diff": list(edit.changed)})
        return changes

    def _poll_files(self) -> list[tuple[str, str, Edit]]:
        edits = []
        for name, watched in list(self._files.items()):
            edit = watched.poll()
            if edit is not None:
                edits.append((name, str(watched.path), edit))
        return edits

    def _shared_edits(self, world: World) -> list[tuple[str, str, Edit]]:
        """Rank 0's pending edits, on every rank (sent as JSON, read back with the codec)."""
        payload = None
        if world.rank == 0:
            payload = canonical_json([{"name": n, "file": p, "values": codec.encode(e.values, path=f"hyperparams/{n}",
                                                                                     tensors={}, what=f"config file {p}"),
                                       "changed": list(e.changed)} for n, p, e in self._edits]).encode()
            self._edits = []
        received = json.loads(world.broadcast_bytes(payload))
        return [(d["name"], d["file"], Edit(values=codec.decode(d["values"], {}), changed=tuple(d["changed"]),
                                            warnings=())) for d in received]

    def _agree(self, world: World, step: int, reasons: tuple[str, ...]) -> tuple[str, ...]:
        """Make every rank's decision at this boundary the same, with one all-reduce of a few
        integers: save if any rank wants to, for every reason any rank has (a preemption signal,
        rank 0's clock, a change seen on one rank only); a preemption signal received by any rank
        stops every rank after the save; rank 0's edits of watched files are applied by every rank
        at the next boundary. Without this, one rank would wait for the others at a save they
        never take, and hang the job."""
        if not world.alive:
            self._warn_once("group-gone", "the torch.distributed process group was destroyed: no checkpoint from "
                            "step %d on (call system.close() before dist.destroy_process_group())", step)
            return ()
        flags = [int(r in reasons) for r in REASONS] + [self._guard.pending or 0, int(bool(self._edits))]
        try:
            agreed = world.agree(flags)
        except Exception as exc:  # a rank died: the job is over, but do not hide why
            self._fail(f"agreeing with the other ranks at step {step}", exc)
            return ()
        *bits, signum, edits = agreed
        if signum and self._guard.pending is None:
            self._guard.adopt(signum)  # another rank was told to stop: this one stops with it
        self._edits_due = bool(edits)
        return tuple(r for r, bit in zip(REASONS, bits) if bit)

    def _apply_bindings(self, step: int) -> None:
        """Hyperparameters bound to optimizer settings (``optimizer.lr``, ...) reach the optimizers."""
        self._binding_seen = True
        for line in self._binding.apply(self.ledger.objects("hyperparams"), self.ledger.objects("optimizer"),
                                        self.ledger.objects("scheduler")):
            log.info("step %d: %s", step, line)

    def _refresh(self, step: int) -> tuple[list[str], list[dict[str, Any]], list[StateChange]]:
        """Recompute the fingerprint; open a new experiment if it changed. Returns (events, changes,
        state changes found while taking the new baseline)."""
        models = self.ledger.objects("model")
        hparams = self.ledger.objects("hyperparams")
        try:
            fp = self._hasher.fingerprint(models, hparams, branch=self._branch)
        except HyperparamsError as exc:
            # A value that cannot be hashed was put into the live config: keep the current
            # experiment, say so once, and keep checking at later boundaries.
            self._detector.track(models, hparams)
            self._fail(f"hyperparameter check at step {step}", exc)
            return [], [], []
        state_changes = self._detector.track(models, hparams)
        if self._experiment is None:
            self._open_experiment(fp, parent=None)
            return [], [], state_changes
        if fp.hash == self._experiment.hash:
            return [], [], state_changes
        assert self._fingerprint is not None
        diff = fp.compare(self._fingerprint)
        events, changes, lines = [], [], []
        if diff.architecture:
            arch = diff_architecture(self._fingerprint.architecture, fp.architecture)
            self._warn_if_optimizer_is_stale(models, fp.hash)
            events.append("model_change")
            changes.append({"kind": "model_change", "diff": arch})
            lines += arch
        if diff.hyperparams:
            hp = diff_hyperparams(self._fingerprint.hyperparams, fp.hyperparams)
            events.append("config_change")
            changes.append({"kind": "config_change", "diff": hp})
            lines += hp
        old = self._experiment.hash
        parent_step = self._last_step if self._last_step is not None else step
        # The parent may have no checkpoint yet (checkpoint_frequency=None): file its record anyway,
        # in the background and before the child's, so the lineage never names an unknown experiment.
        parent_record = self._experiment
        if self._writes():
            self._writer.submit(f"record of {old}", lambda: self.manager.write_experiment(parent_record))
        self._open_experiment(fp, parent=Parent(old, parent_step, events[0], tuple(lines)))
        log.info("step %d: %s -> new experiment %s (parent %s@%d): %s", step, " and ".join(events),
                 fp.hash, old, parent_step, "; ".join(lines) or "no readable difference")
        return events, changes, state_changes

    def _warn_if_optimizer_is_stale(self, models: Mapping[str, Any], exp_hash: str) -> None:
        live = {id(p) for m in models.values() for p in m.parameters()}
        for name, opt in self.ledger.objects("optimizer").items():
            stale = sum(1 for g in opt.param_groups for p in g["params"] if id(p) not in live)
            if stale:
                self._warn_once(f"stale-optimizer:{name}:{exp_hash}",
                                "the architecture changed, but optimizer %r still holds %d parameters that are no "
                                "longer in any registered model (it goes on training the old ones): build a new "
                                "optimizer over model.parameters() and register it again as %r; weightslab carries "
                                "the state of the parameters that did not change over to it", name, stale, name)

    def _open_experiment(self, fp: Fingerprint, *, parent: Parent | None) -> None:
        try:
            existing = self.manager.read_experiment(fp.hash)
        except WeightslabError as exc:
            self._warn_once(f"record:{fp.hash}", "the record of experiment %s cannot be read (%s); its lineage "
                            "information is lost, checkpoints still go to its directory", fp.hash, exc)
            existing = None
        if existing is not None:
            record = existing
            if parent is not None:
                log.info("returning to existing experiment %s", fp.hash)
        else:
            models = self.ledger.objects("model")
            record = ExperimentRecord.open(
                fp, created=_now()[0], excluded_keys=self._hasher.excluded_keys, parent=parent,
                versions=_versions(), architecture_text=architecture_text(models),
                hyperparams_values={n: _hp.to_plain(o) for n, o in self.ledger.objects("hyperparams").items()})
        self._experiment, self._fingerprint = record, fp
        resumed_here = self._resumed_from is not None and self._resumed_from.startswith(fp.hash + "@")
        if not resumed_here:
            earlier = [e for e in self.manager.checkpoints([fp.hash]) if (fp.hash, e.step) not in self._saved]
            if earlier and self.config.resume == "never":
                log.info("resume='never': experiment %s holds %d checkpoints of earlier runs; this run starts fresh "
                         "and replaces those of the same steps", fp.hash, len(earlier))
            elif earlier:
                self._warn_once(f"earlier:{fp.hash}",
                                "experiment %s already holds %d checkpoints (up to step %d) from an earlier run "
                                "that this run did not resume; checkpoints this run takes at the same steps will "
                                "replace them. Call system.resume() before training to continue that run instead.",
                                fp.hash, len(earlier), max(e.step for e in earlier))

    # --- saving -----------------------------------------------------------------------------
    def _job(self) -> World | None:
        """The torch.distributed job this process is a rank of; None for a single process."""
        if self._world is None:
            self._world = World.current()
            if self._world is not None:
                log.info("torch.distributed job of %d ranks (this is rank %d): rank 0 writes the replicated state "
                         "once; every rank's random generators, loader positions and custom state go into the same "
                         "checkpoint", self._world.size, self._world.rank)
        return self._world

    def _writes(self) -> bool:
        """Whether this process writes checkpoints: in a torch.distributed job, rank 0 only (it
        gathers the others' own state into one manifest: one writer, one commit)."""
        world = self._job()
        return world is None or world.rank == 0

    def _gather_own(self, world: World, step: int, payload: bytes, error: BaseException | None, *,
                    sharded: int, skip: bool) -> tuple[list[_state.Captured], int] | None:
        """Every rank's own state (random generators, loader positions, custom state), on rank 0.

        All ranks first exchange (captured?, step, experiment, number of sharded tensors): unless
        every rank captured its state for the same step of the same experiment, no rank goes on,
        and each says why; rank 0's ``skip`` (its writer is behind) and its token (naming the
        directory of sharded tensors) reach every rank with it. Returns the other ranks' captures on
        rank 0 ([] on the others) and the token; None when the save is off on every rank.
        """
        assert self._experiment is not None
        ref = f"{self._experiment.hash}@{step}"
        token = uuid.uuid4().int >> 65  # 63 bits: fits an int64
        try:
            headers = world.all_gather([int(error is None), step, digest64(self._experiment.hash), len(payload),
                                        sharded, token, int(skip)])
            problems = [f"rank {r} could not capture its state" for r, h in enumerate(headers) if not h[0]]
            if not problems and len({(h[1], h[2], h[4]) for h in headers}) > 1:
                problems.append("the ranks are at different steps or experiments, or hold different sharded "
                                "tensors (" + ", ".join(f"rank {r}: step {h[1]}, {h[4]} sharded tensors"
                                                        for r, h in enumerate(headers)) + "); every rank must run "
                                "the same loop and register the same objects")
            if problems:
                raise error or CheckpointSaveError("; ".join(problems))
            if headers[0][6]:
                self._skip(ref)
                return None
            payloads = world.gather_bytes(payload, [h[3] for h in headers])
        except Exception as exc:
            self._fail(f"checkpoint {ref}", exc)
            return None
        others = [] if payloads is None else [_state.Captured.from_bytes(p) for p in payloads[1:]]
        return others, headers[0][5]

    def _save(self, step: int, reasons: tuple[str, ...], changes: Sequence[dict[str, Any]],
              early: Mapping[str, Any] | None = None) -> bool:
        """Take a checkpoint: capture, copy, hand to the writer. In a distributed job every rank
        takes part (it was agreed at the boundary); rank 0 commits what all of them captured."""
        assert self._experiment is not None
        world = self._job()
        if world is not None and not world.alive:
            return False
        ref = f"{self._experiment.hash}@{step}"
        writes = world is None or world.rank == 0
        skipping = self.config.backpressure == "skip" and not self.config.strict and "preempt" not in reasons
        if skipping and world is None and not self._writer.has_room():
            return self._skip(ref)
        captured, payload, error = None, b"", None
        try:
            if writes:
                captured = _state.capture(self.ledger, step=step, early=early)
            else:  # the replicated sections only for their sharded tensors; its own state travels to rank 0
                captured = _state.capture_replicated(self.ledger, step=step)
                payload = _state.capture_own(self.ledger, early=early, prefix=f"ranks/{world.rank}/").to_bytes()
        except Exception as exc:  # noqa: BLE001 - reported now (one process) or once every rank knows
            error = exc
        # (detached: DCP's staging deep-copies what it is given, and an FSDP parameter also holds an
        # unsharded storage that is freed between steps)
        sharded = {k: t.detach() for k, t in captured.tensors.items() if is_sharded(t)} if captured is not None \
            else {}
        others: list[_state.Captured] = []
        token = uuid.uuid4().hex[:16]
        if world is not None:
            gathered = self._gather_own(world, step, payload, error, sharded=len(sharded),
                                        skip=writes and skipping and not self._writer.has_room())
            if gathered is None:
                return False
            others, token = gathered[0], f"{gathered[1]:016x}"
            self._saved.add((self._experiment.hash, step))  # on every rank: final saves are decided alike
        elif error is not None:
            self._fail(f"checkpoint {ref}", error)
            return False
        assert captured is not None
        shards = None
        if sharded:  # every rank writes its shards, with torch.distributed.checkpoint, in the background
            directory = self.manager.layout.shards(self._experiment.hash, step, token)
            try:
                shards = _sharded.async_save(sharded, directory)
            except Exception as exc:
                self._fail(f"checkpoint {ref} (sharded tensors)", exc)
                return False
            if not writes:
                self._shard_saves.append((ref, shards))
        if not writes:
            return True
        try:
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
            snap = self._snapshotter.take(captured.tensors)
        except Exception as exc:
            self._fail(f"checkpoint {ref}", exc)
            return False
        created, created_ns = _now()
        metrics = self._metrics[1] if self._metrics and self._metrics[0] == step else {}
        request = SaveRequest(
            experiment=self._experiment, step=step, reasons=reasons, changes=tuple(changes), metrics=metrics,
            tree=captured.tree, snapshot=snap, run=self._run, resumed_from=self._resumed_from,
            created=created, created_ns=created_ns, versions=_versions())
        if skipping and world is None and not sharded and not self._writer.has_room(snap.copied_bytes):
            self._snapshotter.failed(snap)
            self._snapshotter.release(snap)
            return self._skip(ref)
        self._saved.add((self._experiment.hash, step))
        self._last_save_time = time.monotonic()
        if self.config.strict:
            try:
                self._commit(request, shards)
            except Exception as exc:
                raise CheckpointSaveError(f"checkpoint {ref} failed: {type(exc).__name__}: {exc}",
                                          errors=[exc]) from exc
        else:
            self._writer.submit(ref, lambda: self._commit(request, shards), snap.copied_bytes)
        return True

    def _skip(self, ref: str) -> bool:
        self._skipped += 1
        if self._skipped in (1, 10, 100) or self._skipped % 1000 == 0:
            log.warning("checkpoint %s skipped: the writer is behind (backpressure='skip'; %d saves skipped so "
                        "far). Save less often, or set backpressure='block' to wait for it", ref, self._skipped)
        return False

    @property
    def skipped(self) -> int:
        """Saves dropped because the writer was behind (``backpressure="skip"``)."""
        return self._skipped

    def _commit(self, request: SaveRequest, shards: _sharded.SaveHandle | None = None) -> Manifest:
        try:
            if shards is not None:  # the sharded tensors first: durable on every rank when this returns
                request.tree["sharded"]["files"] = shards.result().to_json()
            manifest, refs = self.manager.commit(request)
        except BaseException:
            self._snapshotter.failed(request.snapshot)  # later saves must copy what this one did not store
            self._snapshotter.release(request.snapshot)
            raise
        self._snapshotter.committed(request.snapshot, refs)
        self._snapshotter.release(request.snapshot)  # its buffers serve the next snapshots
        deleted: tuple[Any, ...] = ()
        retention = self.config.retention
        if retention is not None and not retention.keeps_everything:
            try:
                deleted = self.manager.apply_retention(retention, experiments=[manifest.experiment]).delete
            except Exception as exc:  # the checkpoint itself is committed: report, do not fail it
                log.warning("retention after checkpoint %s failed: %s: %s", manifest.ref, type(exc).__name__, exc)
                self._writer.keep(exc)
        if self._remote is not None:
            self._push(manifest, deleted)
        log.debug("committed checkpoint %s (%s, %d tensors, %d bytes)", manifest.ref, ", ".join(manifest.reasons),
                  len(manifest.tensors), manifest.total_bytes)
        return manifest

    def _push(self, manifest: Manifest, deleted: Sequence[Any]) -> None:
        """Upload a committed checkpoint (and any whose upload failed before) to the remote root;
        a failure is kept and raised from wait()/close(), and retried with the next checkpoint."""
        assert self._remote is not None
        self._unpushed.append(manifest)
        try:
            self._remote.push(self._unpushed)
            self._unpushed.clear()
            for record in deleted:
                self._remote.delete(record.experiment, record.step)
        except Exception as exc:
            log.warning("uploading checkpoint %s to %s failed: %s: %s (it is committed locally under %s; the upload "
                        "is retried with the next checkpoint)", manifest.ref, self.config.root_log_dir,
                        type(exc).__name__, exc, self.root)
            self._writer.keep(exc)

    def _push_names(self) -> None:
        if self._remote is None:
            return
        try:
            self._remote.push_names()
        except Exception as exc:  # the name is kept locally; say so, and raise it from wait()
            log.warning("uploading experiment names to %s failed: %s: %s", self.config.root_log_dir,
                        type(exc).__name__, exc)
            self._writer.keep(exc)

    def _pull_index(self) -> None:
        """Before looking for checkpoints: what the remote root holds, in the staging root."""
        if self._remote is not None:
            fetched = self._remote.pull_index()
            if fetched:
                log.info("fetched %d manifests and records from %s", fetched, self.config.root_log_dir)

    def _fail(self, what: str, exc: BaseException) -> None:
        if self.config.strict:
            if isinstance(exc, WeightslabError):
                raise exc
            raise CheckpointSaveError(f"{what} failed: {type(exc).__name__}: {exc}", errors=[exc]) from exc
        log.warning("%s failed: %s: %s (training goes on; the error is raised from wait() or close())",
                    what, type(exc).__name__, exc)
        self._writer.keep(exc)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # --- waiting and closing ----------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save taken so far is durable; raise the failures kept since last time."""
        self._writer.wait()
        self._wait_shards()
        self._raise_kept()

    def _wait_shards(self) -> None:
        """Ranks other than 0: wait for the sharded tensors they are writing (rank 0's writer waits
        for every rank's before it commits)."""
        while self._shard_saves:
            ref, handle = self._shard_saves.pop(0)
            try:
                handle.result()
            except Exception as exc:  # rank 0 fails the same checkpoint, which is not committed
                log.warning("the sharded tensors of checkpoint %s failed on this rank: %s: %s", ref,
                            type(exc).__name__, exc)
                self._writer.keep(exc)

    flush = wait

    def _raise_kept(self) -> None:
        errors = self._writer.take_errors()
        if errors:
            detail = "; ".join(f"{type(e).__name__}: {e}" for e in errors[:5])
            more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
            raise CheckpointSaveError(f"{len(errors)} checkpoint save(s) failed: {detail}{more}",
                                      errors=errors) from errors[0]

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
                self._unsubscribe()
                for handles in self._handles.values():
                    for handle in handles:
                        handle.remove()
                self._handles.clear()
                for watched in self._files.values():
                    watched.close()
                self._files.clear()
                self._detector.remove()
                atexit.unregister(self._atexit)
                _forget(self)
        self._writer.close()
        self._wait_shards()
        self._snapshotter.pool.clear()
        pending = self._guard.pending
        self._guard.uninstall()
        if pending is not None and not crashed:  # the loop ended after a preemption signal: stop now
            self._guard.deliver()
        self._raise_kept()

    def _final_save(self) -> None:
        self._complete_deferred()
        if not self.config.save_on_close or self._last_step is None or self._experiment is None:
            return
        if self._world is not None and not self._world.alive:
            self._warn_once("group-gone-close", "no final checkpoint: the torch.distributed process group was destroyed "
                            "before close(); call system.close() before dist.destroy_process_group()")
            return
        if (self._experiment.hash, self._last_step) in self._saved:
            return
        if not self._handles_of("optimizer"):
            log.info("no final checkpoint at close: with no hooked optimizer, weightslab cannot tell whether "
                     "training moved past step %d, so it would not know which step to label the state with",
                     self._last_step)
            return
        if self._optimizer_ran:
            log.info("no final checkpoint at close: an optimizer step ran after the last step boundary "
                     "(step %d), so the state no longer matches that step", self._last_step)
            return
        self._boundary(self._last_step, metrics=None, forced=("exit",), forced_changes=())

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

    # --- resuming ---------------------------------------------------------------------------
    def _current_hash(self) -> str | None:
        models, hparams = self.ledger.objects("model"), self.ledger.objects("hyperparams")
        if not models and not hparams:
            return None
        return self._hasher.fingerprint(models, hparams, branch=self._branch).hash

    def _candidates(self, ref: str | os.PathLike[str]) -> tuple[list[CheckpointEntry], bool]:
        self._pull_index()
        parsed = parse_ref(ref)
        current = self._current_hash() if parsed.latest else None
        return self.manager.candidates(parsed, current=current), parsed.latest or parsed.step is None

    def peek(self, ref: str | os.PathLike[str] = "latest") -> CheckpointInfo | None:
        """What :meth:`resume` would restore from ``ref``, without changing anything; None if nothing.

        Use it to build the model a checkpoint needs before registering it (its hyperparameters
        and architecture are in the result).
        """
        with self._lock:
            self._writer.wait()
            entries, _ = self._candidates(ref)
            for entry in entries:
                try:
                    manifest = self.manager.read_manifest(entry)
                except CorruptCheckpointError as exc:
                    log.warning("skipping damaged checkpoint %s: %s", entry.ref, exc)
                    continue
                record = self.manager.read_experiment(manifest.experiment)
                hparams = codec.decode(manifest.state.get("hyperparams", {}), {})
                return CheckpointInfo(
                    ref=manifest.ref, experiment=manifest.experiment, step=manifest.step, reasons=manifest.reasons,
                    created=manifest.created, metrics=codec.decode(dict(manifest.metrics), {}),
                    hyperparams=hparams, path=entry.path,
                    parent=record.parent.ref if record and record.parent else None,
                    architecture=record.architecture if record else [], nbytes=manifest.total_bytes)
            return None

    def resume(self, ref: str | os.PathLike[str] = "latest", *,
               model_factory: Callable[[CheckpointInfo], Any] | None = None, rank_state: str | None = None) -> int:
        """Restore every registered object from ``ref`` (RNG last) and return the step restored.

        ``ref`` is ``"latest"`` (the newest checkpoint of this run's lineage: the experiment the
        registered objects hash to and every experiment opened from it by a change or a fork),
        ``"<hash or name>@<step>"``, ``"<hash or name>@latest"``, ``"<hash or name>@best[:metric]"``
        or a path. Returns 0 when ``"latest"`` finds nothing. With ``"latest"``, a damaged checkpoint
        is skipped for the newest one that verifies, with a warning. Raises
        :class:`ArchitectureMismatchError` listing the differences, before changing anything, when
        the checkpoint does not fit the registered model.

        ``model_factory(info)`` rebuilds what the checkpoint needs, from its
        :class:`CheckpointInfo` (hyperparameters and structural description, nothing unpickled),
        before anything is restored: it returns the model, or a dict such as ``{"model": model,
        "optimizer": optimizer, "scheduler": scheduler}`` (several models: ``{"model": {name:
        module}}``); weightslab registers what it returns under the checkpoint's names.

        In a torch.distributed job every rank calls it; rank r gets back rank r's own random
        generators, loader position and custom state. On another number of ranks, loader positions
        are resharded and the rest is restored when it was the same on every saved rank; otherwise
        :class:`RankStateError` lists it, unless ``rank_state="rank0"`` (default: the config's
        ``rank_state``) gives every rank rank 0's.
        """
        with self._lock:
            self._check_open()
            self._writer.wait()
            self._auto_resume_due = False  # resumed (or chose not to) explicitly: no automatic resume
            if model_factory is not None:
                info = self.peek(ref)
                if info is None:
                    self._start_fresh()
                    return 0
                self._register_built(model_factory, info)
            found = self._load_agreed(ref)
            if found is None:
                self._start_fresh()
                return 0
            manifest, tensors, path = found
            self._restore(manifest, tensors, path, rank_state=rank_state)
            record = self.manager.read_experiment(manifest.experiment)
            self._branch = record.branch if record is not None else None  # continuing a fork stays on its branch
            self._adopt(manifest)
            self._start_step = manifest.step
            self._warn_if_not_reproducible()
            return manifest.step

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
            if name is not None:
                try:
                    check_name(name)
                    current = self.manager.names().get(name)
                except ValueError as exc:
                    raise ConfigError(f"wl.fork(name={name!r}): {exc}") from None
                if current is not None:
                    raise ConfigError(f"wl.fork(name={name!r}): that name already names experiment {current}; "
                                      f"continue it with system.resume('{name}@latest'), or choose another name")
            self._writer.wait()
            self._auto_resume_due = False
            found = self._load_agreed(ref, fall_back=False)
            if found is None:
                raise CheckpointNotFoundError(f"wl.fork({str(ref)!r}): there is no checkpoint to fork from yet")
            manifest, tensors, path = found
            edits = self._overrides(manifest, overrides)  # checked before anything changes
            self._restore(manifest, tensors, path)
            hparams = self.ledger.objects("hyperparams")
            self._binding.baseline(hparams, self.ledger.objects("optimizer"))
            self._binding_seen = True
            lines = []
            for hp_name, edit in edits.items():
                _hp.restore_in_place(hparams[hp_name], edit.values, name=hp_name)
                lines += [f"{hp_name}.{line}" for line in edit.changed]
            self._apply_bindings(manifest.step)
            branch = name if name is not None else f"fork-{uuid.uuid4().hex[:12]}"
            world = self._job()
            if world is not None:  # one branch (it enters the hash) for every rank: rank 0's
                branch = world.broadcast_bytes(branch.encode() if world.rank == 0 else None).decode()
            self._branch = branch
            models, hparams = self.ledger.objects("model"), self.ledger.objects("hyperparams")
            fp = self._hasher.fingerprint(models, hparams, branch=self._branch)
            self._detector.track(models, hparams)
            self._resumed_from = manifest.ref
            self._last_step = self._start_step = manifest.step
            self._deferred, self._optimizer_ran = None, False
            self._stepped.clear()
            self._open_experiment(fp, parent=Parent(manifest.experiment, manifest.step, "fork", tuple(lines)))
            if name is not None and self._writes():
                self.manager.name_experiment(fp.hash, name)
                self._push_names()
            log.info("forked %s -> new experiment %s%s at step %d: %s", manifest.ref, fp.hash,
                     f" ({name!r})" if name else "", manifest.step, "; ".join(lines) or "no hyperparameter changes")
            self._save(manifest.step, ("fork",), [{"kind": "fork", "from": manifest.ref, "name": name, "diff": lines}])
            self._warn_if_not_reproducible()
            return manifest.step

    def _register_built(self, model_factory: Callable[[CheckpointInfo], Any], info: CheckpointInfo) -> None:
        """Register what ``model_factory(info)`` builds under the checkpoint's names."""
        built = model_factory(info)
        if isinstance(built, torch.nn.Module):
            built = {"model": built}
        kinds = ("model", "optimizer", "scheduler", "scaler")
        if not isinstance(built, Mapping) or not set(built) <= set(kinds):
            raise ConfigError(f"model_factory must return a torch.nn.Module or a dict with keys among {kinds}, got "
                              f"{type(built).__name__}{' with keys ' + str(sorted(built)) if isinstance(built, Mapping) else ''}")
        saved = self.manager.read_manifest(info.path).state
        plural = {"model": "models", "optimizer": "optimizers", "scheduler": "schedulers", "scaler": "scalers"}
        by_kind: dict[str, dict[str, Any]] = {}
        for kind, value in built.items():
            names = sorted(saved.get(plural[kind], {})) or ["main"]
            if not isinstance(value, Mapping):
                if len(names) != 1:
                    raise ConfigError(f"the checkpoint holds several {plural[kind]} ({', '.join(names)}): return "
                                      f"{{{kind!r}: {{name: object}}}} from model_factory")
                value = {names[0]: value}
            by_kind[kind] = dict(value)
        # An optimizer left training the parameters of a replaced model would silently do nothing useful.
        new_models = {**self.ledger.objects("model"), **by_kind.get("model", {})}
        live = {id(p) for m in new_models.values() for p in m.parameters()}
        for name, opt in self.ledger.objects("optimizer").items():
            if name not in by_kind.get("optimizer", {}) and any(
                    id(p) not in live for g in opt.param_groups for p in g["params"]):
                raise ConfigError(f"model_factory built new models, but the registered optimizer {name!r} trains the "
                                  "parameters of the old ones: return {'model': model, 'optimizer': optimizer} (and its "
                                  "scheduler) from model_factory")
        expected = {"model": (torch.nn.Module, "a torch.nn.Module"),
                    "optimizer": (torch.optim.Optimizer, "a torch.optim.Optimizer"),
                    "scheduler": (object, "an object with load_state_dict()"),
                    "scaler": (object, "an object with load_state_dict()")}
        for kind, objects in by_kind.items():  # check everything before registering anything
            cls, what = expected[kind]
            for name, obj in objects.items():
                if not isinstance(obj, cls) or not callable(getattr(obj, "load_state_dict", None)):
                    raise ConfigError(f"model_factory returned a {type(obj).__name__} as {kind} {name!r}; "
                                      f"return {what}")
        for kind in kinds:  # models first, so optimizers registered again can be matched to them
            for name, obj in by_kind.get(kind, {}).items():
                self.ledger.register(Entry(kind, name, obj))

    def name_experiment(self, name: str, *, replace: bool = False) -> str:
        """Give the current experiment a human name, usable in refs (``name@latest``); returns its hash."""
        exp = self.experiment_hash
        try:
            self.manager.name_experiment(exp, name, replace=replace)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._push_names()
        return exp

    def _overrides(self, manifest: Manifest, overrides: Mapping[str, Any]) -> dict[str, Edit]:
        """The fork's overrides as edits of the checkpoint's hyperparameters, by registration name."""
        saved = codec.decode(manifest.state.get("hyperparams", {}), {})
        registered = self.ledger.objects("hyperparams")
        nested: dict[str, dict[str, Any]] = {}
        for key, value in overrides.items():
            path = key.split("__")
            owners = [n for n in registered if _hp.at_path(saved.get(n), path, _ABSENT) is not _ABSENT]
            dotted = ".".join(path)
            if len(owners) != 1:
                known = {n: sorted(v) for n, v in saved.items() if isinstance(v, Mapping)}
                problem = "no registered hyperparameters have" if not owners else f"{owners} all have"
                raise HyperparamsError(f"wl.fork: {problem} the key {dotted!r} in checkpoint {manifest.ref} (its keys: "
                                       f"{known}); overrides change existing keys, nested ones written with '__' "
                                       "(optimizer__lr=0.01)")
            target = nested.setdefault(owners[0], {})
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
        edits = {}
        for hp_name, after in nested.items():
            _hp.to_plain(after, where=f"wl.fork overrides of {hp_name!r}")
            edits[hp_name] = merge_edit(saved[hp_name], {}, after, {}, where=f"wl.fork overrides of {hp_name!r}")
        return edits

    def _load(self, ref: str | os.PathLike[str], *, fall_back: bool = True) -> \
            tuple[Manifest, dict[str, torch.Tensor], Path] | None:
        """The checkpoint ``ref`` means, read, checked against the registered objects and loaded
        with every byte verified; nothing registered changes. None when "latest" finds nothing."""
        entries, may_fall_back = self._candidates(ref)
        if not entries:
            return None
        damaged: list[str] = []
        for entry in entries:
            try:
                manifest = self.manager.read_manifest(entry)
                _state.check_compatible(self.ledger, manifest.state, self.manager.tensor_meta(manifest))
                tensors = self.manager.load_tensors(manifest)  # (fetches a remote root's packs and shards)
                shards = self.manager.shards(manifest)
                # Checked here too (every rank, each file), so that a damaged sharded save falls back
                # to the previous checkpoint as a damaged pack does.
                problems = _sharded.verify(*shards) if shards is not None else []
                if problems:
                    raise CorruptCheckpointError(f"its sharded tensors are damaged: {'; '.join(problems)}",
                                                 path=shards[0] if shards else None)
                return manifest, tensors, entry.path
            except CorruptCheckpointError as exc:
                if not (may_fall_back and fall_back):
                    raise
                damaged.append(f"{entry.ref}: {exc}")
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", entry.ref, exc)
        raise CorruptCheckpointError("no checkpoint of %s verifies:\n  %s" % (ref, "\n  ".join(damaged)))

    def _load_agreed(self, ref: str | os.PathLike[str], *, fall_back: bool = True) -> \
            tuple[Manifest, dict[str, torch.Tensor], Path] | None:
        """:meth:`_load`, and in a distributed job a check that every rank found the same checkpoint
        (they read the same root: a shared filesystem or a remote URL), raised on every rank alike."""
        world = self._job()
        if world is None:
            return self._load(ref, fall_back=fall_back)
        found, error = None, None
        try:
            found = self._load(ref, fall_back=fall_back)
        except Exception as exc:  # noqa: BLE001 - raised below, once the other ranks know
            error = exc
        mine = found[0].ref if found is not None else ("<error>" if error is not None else "<nothing>")
        views = world.all_gather([digest64(mine), int(error is not None)])
        if error is not None:
            raise error
        failed = [r for r, v in enumerate(views) if v[1]]
        if failed:
            raise CheckpointNotFoundError(f"resume of {str(ref)!r}: rank(s) {failed} could not read the checkpoint "
                                          "(their error is in their log); no rank restored anything")
        if len({v[0] for v in views}) > 1:
            raise CheckpointNotFoundError(
                f"resume of {str(ref)!r}: the ranks found different checkpoints (this is rank {world.rank}, which "
                f"found {mine}); every rank must see the same root, such as a shared filesystem or a remote URL")
        return found

    def _restore(self, manifest: Manifest, tensors: dict[str, torch.Tensor], path: Path, *,
                 rank_state: str | None = None) -> None:
        world = self._job()
        digests = {key: entry.blob.digest for key, entry in manifest.tensors.items()}
        try:
            tree, notes = _ranks.view(manifest.state, rank=world.rank if world else 0,
                                      world_size=world.size if world else 1, digests=digests,
                                      mode=rank_state or self.config.rank_state)
        except ValueError as exc:
            if isinstance(exc, WeightslabError):
                raise
            raise ConfigError(str(exc)) from None
        for note in notes:
            log.warning("resume from %s: %s", manifest.ref, note)
        shards = self.manager.shards(manifest)
        if shards is not None:
            tensors = {**tensors, **self._load_shards(manifest, *shards)}
        report = _state.restore(self.ledger, tree, tensors)
        self._learn_restored(manifest, tensors)
        for what in report.missing:
            log.warning("resume from %s: %s is registered but not in the checkpoint; left as it is",
                        manifest.ref, what)
        for what in report.unused:
            log.warning("resume from %s: the checkpoint holds %s, which is not registered here; not restored",
                        manifest.ref, what)
        log.info("restored %s (step %d, %s) from %s", manifest.ref, manifest.step,
                 ", ".join(report.restored) or "nothing registered", path)

    def _load_shards(self, manifest: Manifest, directory: Path, files: Any) -> dict[str, torch.Tensor]:
        """Read a checkpoint's sharded tensors (every rank, collectively) into the live ones of the
        registered objects, resharding to their placements; restore then loads them as they are."""
        meta = manifest.state["sharded"]["tensors"]
        live = _state.capture_replicated(self.ledger, step=manifest.step).tensors
        targets = {key: live[key].detach() if key in live else self._shard_target(key, m) for key, m in meta.items()}
        world = self._job()
        # (_load verified every file on every rank, and _load_agreed made sure all ranks chose this
        # checkpoint: no need to hash the files a second time)
        _sharded.load(targets, directory, files, group=world.group if world is not None else None, verified=True)
        return targets

    def _shard_target(self, key: str, meta: Mapping[str, Any]) -> torch.Tensor:
        """A tensor to load sharded optimizer state into when the optimizer has none yet (it makes
        its state at its first step): shaped and placed like the parameter it belongs to."""
        parts = key.split("/")
        optimizer = self.ledger.objects("optimizer").get(parts[1]) if len(parts) == 5 and \
            parts[0] == "optimizers" and parts[2] == "state" and parts[3].isdigit() else None
        if optimizer is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            index = int(parts[3])
            if index < len(params) and is_sharded(params[index]) and list(params[index].shape) == list(meta["shape"]):
                return torch.zeros_like(params[index].detach(), dtype=tag_dtype(meta["dtype"]))
        raise ArchitectureMismatchError(
            f"the checkpoint's sharded tensor {key} {list(meta['shape'])} has no counterpart among the registered "
            "objects to load into; register the model and optimizer the checkpoint was saved from",
            differences=[key])

    def _start_fresh(self) -> None:
        """Nothing to resume in this run's lineage. If the root holds a run of the same architecture
        or the same hyperparameters, this is a restart with changes: record it as the parent."""
        models, hparams = self.ledger.objects("model"), self.ledger.objects("hyperparams")
        if not models and not hparams:
            log.info("no checkpoint to resume under %s; starting fresh", self.root)
            return
        fp = self._hasher.fingerprint(models, hparams, branch=self._branch)
        related = None
        for entry in reversed(self.manager.checkpoints()):
            try:
                record = self.manager.read_experiment(entry.experiment)
            except WeightslabError:
                continue
            if record is not None and (record.architecture_digest == fp.architecture_digest
                                       or record.hyperparams_digest == fp.hyperparams_digest):
                related = (record, entry)
                break
        if related is None:
            log.info("no checkpoint of experiment %s (nor of a run of the same architecture or hyperparameters) "
                     "under %s; starting fresh", fp.hash, self.root)
            return
        record, entry = related
        lines = diff_architecture(record.architecture, fp.architecture) + \
            diff_hyperparams(dict(record.hyperparams), fp.hyperparams)
        self._detector.track(models, hparams)
        self._open_experiment(fp, parent=Parent(record.hash, entry.step, "restart_with_changes", tuple(lines)))
        log.warning("this run differs from the latest related run %s (%s): not resuming it; starting a new "
                    "experiment %s with that run as its parent. To continue its weights with the new settings, "
                    "call system.resume(%r)", entry.ref, "; ".join(lines) or "no readable difference", fp.hash,
                    entry.ref)

    def _warn_if_not_reproducible(self) -> None:
        """Exactness needs a reproducible process; say once what is missing, and what to do."""
        problems = []
        if any(p.is_cuda for m in self.ledger.objects("model").values() for p in m.parameters()) and \
                not torch.are_deterministic_algorithms_enabled():
            problems.append("models run on CUDA without torch.use_deterministic_algorithms(True) (and "
                            "CUBLAS_WORKSPACE_CONFIG=:4096:8): nondeterministic kernels make every run differ")
        if torch.backends.mkl.is_available() and "MKL_CBWR" not in os.environ:
            problems.append("MKL_CBWR is not set: on this CPU two runs of the same seeded training can differ; set "
                            "MKL_CBWR=AVX2,STRICT before importing torch and torch.set_num_threads(1)")
        if problems:
            self._warn_once("reproducible", "resumed, but this process is not set up to continue bit for bit: %s "
                            "(guides/exactness.md)", "; ".join(problems))

    def _learn_restored(self, manifest: Manifest, loaded: Mapping[str, torch.Tensor]) -> None:
        """The models and optimizers now hold exactly the restored blobs: the next save reuses them
        instead of copying and hashing everything again."""
        live = _state.capture(self.ledger, step=manifest.step).tensors
        refs = {k: e.blob for k, e in manifest.tensors.items()
                if k in live and k.startswith(("models/", "optimizers/"))}
        self._snapshotter.seed(live, refs)
        self.manager.remember(loaded, refs)

    def _adopt(self, manifest: Manifest) -> None:
        """Continue in the restored checkpoint's experiment, or branch if the run differs from it."""
        self._resumed_from = manifest.ref
        self._last_step = manifest.step
        self._deferred, self._optimizer_ran = None, False
        self._stepped.clear()
        self._saved.add((manifest.experiment, manifest.step))
        models, hparams = self.ledger.objects("model"), self.ledger.objects("hyperparams")
        fp = self._hasher.fingerprint(models, hparams, branch=self._branch)
        self._detector.track(models, hparams)
        self._binding.baseline(hparams, self.ledger.objects("optimizer"))
        self._binding_seen = True
        record = self.manager.read_experiment(manifest.experiment)
        if fp.hash == manifest.experiment and record is not None:
            self._experiment, self._fingerprint = record, fp
            return
        # The registered objects hash differently from the checkpoint (a hyperparameter the
        # checkpoint could not overwrite, different excluded keys): branch, and record why.
        lines: list[str] = []
        if record is not None:
            lines = diff_architecture(record.architecture, fp.architecture) + \
                diff_hyperparams(dict(record.hyperparams), fp.hyperparams)
        self._open_experiment(fp, parent=Parent(manifest.experiment, manifest.step, "resume_with_changes",
                                                tuple(lines)))
        log.info("resumed %s with changes -> new experiment %s: %s", manifest.ref, fp.hash,
                 "; ".join(lines) or "no readable difference")
        self._save(manifest.step, ("resume_with_changes",), [{"kind": "resume_with_changes", "diff": lines}])


# --- the process-wide system ---------------------------------------------------------------------
_SYSTEM: AutomaticCheckpointSystem | None = None
_SYSTEM_LOCK = threading.RLock()


def _make_config(settings: Mapping[str, Any]) -> CheckpointConfig:
    try:
        return CheckpointConfig(**settings)
    except TypeError as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(CheckpointConfig))
        raise ConfigError(f"{exc}; the checkpoint system's settings are: {valid}") from None


def _forget(system: AutomaticCheckpointSystem) -> None:
    global _SYSTEM
    with _SYSTEM_LOCK:
        if _SYSTEM is system:
            _SYSTEM = None


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
    with _SYSTEM_LOCK:
        current = _SYSTEM
        if current is None or current.closed:
            _SYSTEM = AutomaticCheckpointSystem(_make_config(settings))
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
        return _SYSTEM


def running_system() -> AutomaticCheckpointSystem | None:
    """The process-wide system if one runs (never starts one)."""
    with _SYSTEM_LOCK:
        return _SYSTEM if _SYSTEM is not None and not _SYSTEM.closed else None


def manager_for(root: str | os.PathLike[str] | None = None) -> CheckpointManager:
    """The checkpoint manager of ``root``; by default the running system's root, else
    ``$WEIGHTSLAB_ROOT`` or ``./experiments``. Raises if that directory is not a weightslab root.

    A remote root's URL gives the manager of a local mirror of its manifests (fetched now), which
    fetches packs when it reads them."""
    if is_remote(root):
        return _remote_manager(str(root))
    system = running_system()
    path = Path(root).expanduser().absolute() if root is not None else (system.root if system else _default_root().absolute())
    if system is not None and system.root == path:
        return system.manager  # shares the blob index and caches of the running system
    if not (path / "checkpoints").is_dir() and not (path / "objects").is_dir():
        raise CheckpointNotFoundError(f"{path} is not a weightslab root (it has no checkpoints/ or objects/ "
                                      "directory); pass root= the root_log_dir your training used")
    return CheckpointManager(path)


def _remote_manager(url: str) -> CheckpointManager:
    system = running_system()
    if system is not None and system.config.root_log_dir == url:
        return system.manager  # the running system's staging root, with what it has not uploaded yet
    manager = CheckpointManager(staging_dir(url, view=True))
    manager.remote = RemoteRoot(url, manager.layout)
    try:
        manager.remote.pull_index(mirror=True)
    except ImportError as exc:
        raise ConfigError(str(exc)) from exc
    if not manager.layout.checkpoints_dir.is_dir():
        raise CheckpointNotFoundError(f"{url} is not a weightslab root (it holds no committed checkpoint); pass root= "
                                      "the root_log_dir your training used")
    return manager


def _system() -> AutomaticCheckpointSystem:
    return get_checkpoint_system()


def checkpoint_on_step(step: int, metrics: Mapping[str, Any] | None = None) -> bool:
    """Mark the end of step ``step`` for the process-wide system (see
    :meth:`AutomaticCheckpointSystem.checkpoint_on_step`)."""
    return _system().checkpoint_on_step(step, metrics)


def fork(ref: str | os.PathLike[str], *, name: str | None = None, **overrides: Any) -> int:
    """Start a new branch of the run from checkpoint ``ref`` (see :meth:`AutomaticCheckpointSystem.fork`)::

        start = wl.fork("baseline@1000", name="lr-sweep-2", optimizer__lr=0.01)
    """
    return _system().fork(ref, name=name, **overrides)


def checkpoint_on_model_change() -> bool:
    """Checkpoint now because the architecture changed."""
    return _system().checkpoint_on_model_change()


def checkpoint_on_config_change() -> bool:
    """Checkpoint now because the hyperparameters changed."""
    return _system().checkpoint_on_config_change()


def checkpoint_on_state_change(kind: str = "state") -> bool:
    """Checkpoint now because the model state changed (``'freeze'``, ``'reset'``, ...)."""
    return _system().checkpoint_on_state_change(kind)


def _autostart(event: str, entry: Entry, previous: Entry | None) -> None:
    """The first registration starts the system with default settings if none runs."""
    if event == "register":
        with _SYSTEM_LOCK:
            if _SYSTEM is None or _SYSTEM.closed:
                get_checkpoint_system()


LEDGER.subscribe(_autostart)
