"""The settings of a checkpoint system: one kw-only dataclass, validated when it is made.

Every setting has a default that serves a person who passes nothing; a wrong value is refused
with a :class:`~weightslab.errors.ConfigError` that names the setting, what it got and what it
takes, before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .configfile import WATCH_MODES
from .distributed.ranks import RANK_STATE_MODES
from .errors import ConfigError
from .preemption import signal_numbers
from .retention import KeepBest, Retention
from .storage.archive import archive_of
from .storage.remote import is_remote, staging_dir
from .storage.root import default_location
from .triggers import SavePolicy

__all__ = ["CheckpointConfig", "make_config"]


def _default_root() -> Path:
    return Path(default_location())


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
    #: When the writer falls behind: ``"block"`` waits for room; ``"latest"`` drops the older save
    #: still queued and writes the newest instead (training never waits for the disk, and the next
    #: checkpoint written is always the newest state; the replaced steps are logged and recorded in
    #: the checkpoint that replaced them); ``"skip"`` drops the new save.
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
    #: With a registered (hooked) optimizer: copy parameters and optimizer state in the background,
    #: beside the next forward and backward, and wait for the copy in the optimizer's pre-step hook.
    #: Pass False if the loop changes them between ``checkpoint_on_step`` and the next
    #: ``optimizer.step()`` through ``.data`` or numpy (guides/getting-started.md). Without a
    #: registered optimizer every tensor is copied at the boundary, whatever this says.
    overlap: bool = True
    #: Write the packs of tensor bytes with O_DIRECT where the filesystem allows it: the page cache
    #: is bypassed, which cost the writer a tenth of the CPU here and leaves the training data's
    #: cache alone. False writes through the page cache (a restore right after a save then reads
    #: from memory).
    direct_io: bool = True
    #: No longer used: every save copies every tensor, and the store skips what it holds already by
    #: digest (kept so that scripts passing it still run; a warning says so).
    full_check_every: int | None = None
    #: Which checkpoints to keep, applied to the experiment after each save: a
    #: :class:`~weightslab.retention.Retention` or a dict of ``Retention.of`` arguments, e.g.
    #: ``{"keep_last": 5, "keep_best": 1, "metric": "val_loss"}``. None keeps everything. The
    #: latest and the best are never deleted; ``wl.gc()`` reclaims the space. With ``archive``
    #: (``"lc"``, ``"excp"``, ``{"codec": "lc", "bits": 3}`` or a :class:`~weightslab.Archive`), what is
    #: not kept is demoted to the lossy archive instead of deleted (guides/storage.md).
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
    #: How long ``close()`` (and a stop after a preemption signal) waits for event callbacks still
    #: queued or running on the ``weightslab-events`` thread (an upload of the last checkpoint, say);
    #: then it warns, naming the callback, and goes on without them. ``wait()`` waits for them all.
    callback_timeout: float = 120.0

    @property
    def best_metric(self) -> tuple[str, str] | None:
        """What a bare ``<hash>@best`` ranks by: the metric retention keeps the best of, if any."""
        best = [p for p in (self.retention.policies if self.retention else ()) if isinstance(p, KeepBest)]
        return (best[0].metric, best[0].mode) if best else None

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
        for name in ("strict", "hook_optimizer", "save_on_close", "overlap", "direct_io"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.max_pending_saves, bool) or not isinstance(self.max_pending_saves, int) \
                or self.max_pending_saves < 1:
            raise ConfigError(f"max_pending_saves must be a positive integer, got {self.max_pending_saves!r}")
        if self.max_pending_bytes is not None and (isinstance(self.max_pending_bytes, bool) or not isinstance(
                self.max_pending_bytes, int) or self.max_pending_bytes < 1):
            raise ConfigError(f"max_pending_bytes must be a positive integer or None, got {self.max_pending_bytes!r}")
        if self.backpressure not in ("block", "latest", "skip"):
            raise ConfigError(f"backpressure must be 'block' (wait for the writer), 'latest' (replace an older queued "
                              f"save) or 'skip' (drop the new save), got {self.backpressure!r}")
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
        if isinstance(self.callback_timeout, bool) or not isinstance(self.callback_timeout, (int, float)) \
                or not self.callback_timeout >= 0:
            raise ConfigError(f"callback_timeout must be a number of seconds >= 0, got {self.callback_timeout!r}")
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
                settings = dict(self.retention)
                settings["archive"] = archive_of(settings.get("archive"))
                object.__setattr__(self, "retention", Retention.of(**settings))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"retention: {exc}; use keys keep_last, keep_every, keep_best, metric, mode, "
                                  "keep_changes, archive") from None
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
        if self.rank_state not in RANK_STATE_MODES:
            raise ConfigError(f"rank_state must be one of {', '.join(map(repr, RANK_STATE_MODES))}, "
                              f"got {self.rank_state!r}")
        if isinstance(self.reanchor_interval, bool) or not isinstance(self.reanchor_interval, int) \
                or self.reanchor_interval < 1:
            raise ConfigError(f"reanchor_interval must be an integer >= 1, got {self.reanchor_interval!r}")
        if self.full_check_every is not None:
            warnings.warn("full_check_every no longer has any effect: every save copies every tensor and the store "
                          "skips what it holds already by digest (nothing is trusted to be unchanged); remove it",
                          FutureWarning, stacklevel=4)


def make_config(settings: Mapping[str, Any]) -> CheckpointConfig:
    """A config from keyword settings; an unknown one is a ConfigError that lists the valid ones."""
    try:
        return CheckpointConfig(**settings)
    except TypeError as exc:
        valid = ", ".join(f.name for f in dataclasses.fields(CheckpointConfig))
        raise ConfigError(f"{exc}; the checkpoint system's settings are: {valid}") from None
