"""Restoring a checkpoint: resolve a ref once, verify it, check it fits, put it back (RNG last).

A ref (``latest``, ``<hash or name>@<step>``, ``@best``, a path; :mod:`weightslab.refs`) resolves to
candidates, best first (``latest`` may fall back to an older checkpoint when a newer one is damaged;
an explicit ref never does). Each candidate is read once into a :class:`Resolved` checkpoint (its
manifest, verified by its digest, and its experiment's record), which is handed down to every step
that needs it: building the model it needs (``model_factory``), the check that it fits the
registered objects, loading its tensors (every byte verified), restoring them, and the lineage.
Nothing registered changes until every tensor has been read and verified, and the experiment's
record checked (:func:`weightslab.lineage.check_record`). What no check can foresee (a
``register_state`` setter that raises, or the lineage refusing afterwards: another live process
writes the experiment) is undone: :meth:`Restorer.restore` takes the objects' state first
(:class:`weightslab.state.Undo`) and puts back those it reached, and the :class:`Restored` it
returns can be taken back until the resume has finished. Around it, the ``before_load`` and
``loaded`` events (:mod:`weightslab.events`) run their callbacks on the training thread.

In a distributed job every rank resolves the same ref against the same root (a shared filesystem or
a remote URL); :meth:`~weightslab.distributed.job.Job.agree_on_checkpoint` makes sure they found the same
checkpoint before any rank restores anything, and rank r restores rank r's own state
(:func:`weightslab.distributed.ranks.view`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from . import codec
from . import state as _state
from .distributed import ranks as _ranks
from .distributed import sharded as _sharded
from .distributed.job import Job
from .distributed.sharded import is_sharded
from .configfile import Edit, fork_edits
from .errors import (ArchitectureMismatchError, ConfigError, CorruptCheckpointError, LossyCheckpointError, StateError,
                     WeightslabError)
from .events import Events, Load
from .failures import Failures
from .ledger import Entry, Ledger
from .lineage import check_record
from .refs import parse_ref
from .storage.experiment import ExperimentRecord
from .storage.manager import CheckpointEntry, CheckpointManager
from .storage.archive import describe_lossy
from .storage.manifest import Manifest
from .storage.shardfiles import ShardedFiles
from .tensors import load_tensors, tag_dtype, tensor_meta

__all__ = ["CheckpointInfo", "Resolved", "Restored", "Restorer"]

log = logging.getLogger(__name__)


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
    metadata: Mapping[str, Any] = field(default_factory=dict)  # what before_save callbacks added (weightslab.events)


@dataclass
class Resolved:
    """One committed checkpoint a ref resolved to, read once: its manifest and its experiment's
    record; after :meth:`Restorer.load`, its tensors too (every byte verified)."""

    entry: CheckpointEntry
    manifest: Manifest
    record: ExperimentRecord | None
    tensors: dict[str, torch.Tensor] | None = None
    shards: tuple[Path, ShardedFiles] | None = None

    @property
    def ref(self) -> str:
        return self.manifest.ref

    @property
    def step(self) -> int:
        return self.manifest.step

    def info(self) -> CheckpointInfo:
        manifest, record = self.manifest, self.record
        return CheckpointInfo(
            ref=manifest.ref, experiment=manifest.experiment, step=manifest.step, reasons=manifest.reasons,
            created=manifest.created, metrics=codec.decode(dict(manifest.metrics), {}),
            hyperparams=codec.decode(manifest.state.get("hyperparams", {}), {}), path=self.entry.path,
            parent=record.parent.ref if record and record.parent else None,
            architecture=record.architecture if record else [], nbytes=manifest.total_bytes,
            metadata=manifest.metadata)

    def event(self, event: str, kind: str) -> Load:
        """What the ``before_load`` / ``loaded`` callbacks of a resume or a fork (``kind``) receive."""
        manifest = self.manifest
        return Load(event=event, kind=kind, ref=manifest.ref, experiment=manifest.experiment, step=manifest.step,
                    path=self.entry.path, metrics=codec.decode(dict(manifest.metrics), {}), metadata=manifest.metadata)


@dataclass
class Restored:
    """A checkpoint put into the registered objects (``tensors``: every tensor restored, by key),
    which :meth:`taken_back_on_error` undoes if what follows the restore fails."""

    ref: str
    tensors: dict[str, torch.Tensor]
    undo: _state.Undo

    @contextlib.contextmanager
    def taken_back_on_error(self, *, then: Callable[[], None] = lambda: None) -> Iterator[None]:
        """Anything raised inside puts the objects the restore changed back as they were, calls
        ``then()``, and goes on."""
        try:
            yield
        except BaseException as exc:
            problems = self.undo.put_back()
            then()
            if problems:
                log.error("resume from %s did not finish (%s), and these objects could not be put back as they "
                          "were: %s. Build and register them again before training", self.ref, exc,
                          "; ".join(f"{what}: {why}" for what, why in problems.items()))
            else:
                log.info("resume from %s did not finish (%s: %s); the registered objects are back as they were",
                         self.ref, type(exc).__name__, exc)
            raise


class Restorer:
    """Resolves refs against one root and restores checkpoints into the registered objects."""

    def __init__(self, ledger: Ledger, manager: CheckpointManager, job: Job, failures: Failures, events: Events, *,
                 rank_state: str = "exact", excluded_keys: frozenset[str] = frozenset()):
        self._ledger = ledger
        self._events = events
        self._excluded = excluded_keys  # hyperparameter keys a resume leaves as they are
        self._manager = manager
        self._job = job
        self._failures = failures
        self._rank_state = rank_state

    # --- resolving ------------------------------------------------------------------------------
    def _candidates(self, ref: str | os.PathLike[str], current: Callable[[], str | None]) \
            -> tuple[list[CheckpointEntry], bool]:
        """The checkpoints ``ref`` may mean, best first, and whether a damaged one may be skipped
        for the next. ``current()`` names the experiment whose lineage ``latest`` searches."""
        remote = self._manager.remote
        if remote is not None:  # what the remote root holds, in the staging root first
            fetched = remote.pull_index()
            if fetched:
                log.info("fetched %d manifests and records from %s", fetched, remote.url)
        parsed = parse_ref(ref)
        entries = self._manager.candidates(parsed, current=current() if parsed.latest else None)
        return entries, parsed.latest or parsed.step is None

    def _read(self, entry: CheckpointEntry) -> Resolved:
        manifest = self._manager.read_manifest(entry)
        record = self._manager.read_experiment(manifest.experiment)
        if record is not None:
            check_record(record, self._manager.layout.experiment_record(manifest.experiment))
        return Resolved(entry, manifest, record)

    def peek(self, ref: str | os.PathLike[str], current: Callable[[], str | None]) -> CheckpointInfo | None:
        """What the newest readable checkpoint ``ref`` means holds (its tensors not read); None if none."""
        entries, _ = self._candidates(ref, current)
        for entry in entries:
            try:
                return self._read(entry).info()
            except CorruptCheckpointError as exc:
                log.warning("skipping damaged checkpoint %s: %s", entry.ref, exc)
        return None

    def load(self, ref: str | os.PathLike[str], current: Callable[[], str | None], *, fall_back: bool = True,
             model_factory: Callable[[CheckpointInfo], Any] | None = None, allow_lossy: bool = False) -> Resolved | None:
        """The checkpoint ``ref`` means, read, checked against the registered objects and loaded with
        every byte verified; nothing registered changes (but what ``model_factory`` builds: it is
        called once, with the first checkpoint whose manifest reads, before the check, and what it
        returns is registered). None when ``latest`` finds nothing. In a distributed job, every rank
        found the same checkpoint or all raise.

        A checkpoint of the lossy archive is loaded only with ``allow_lossy``: else ``latest`` (or
        ``@best``) passes over it for the next exact one, and an explicit ref raises
        :class:`LossyCheckpointError` naming the nearest exact checkpoint."""
        prepare = None if model_factory is None else (lambda resolved: self.register_built(model_factory, resolved))
        found, error = None, None
        try:
            found = self._load(ref, current, fall_back=fall_back, prepare=prepare, allow_lossy=allow_lossy)
        except Exception as exc:  # noqa: BLE001 - raised by agree_on_checkpoint, once the other ranks know
            if not self._job.distributed:
                raise
            error = exc
        self._job.agree_on_checkpoint(str(ref), found.ref if found is not None else None, error)
        return found

    def _load(self, ref: str | os.PathLike[str], current: Callable[[], str | None], *, fall_back: bool,
              prepare: Callable[[Resolved], None] | None, allow_lossy: bool = False) -> Resolved | None:
        entries, may_fall_back = self._candidates(ref, current)
        if not entries:
            return None
        damaged: list[str] = []
        lossy: LossyCheckpointError | None = None
        for entry in entries:
            try:
                resolved = self._read(entry)
                if not resolved.manifest.exact and not allow_lossy:
                    refusal = self._refuse_lossy(resolved.manifest)
                    if not (may_fall_back and fall_back):
                        raise refusal
                    log.info("passing over %s: it is in the lossy archive; looking for an exact checkpoint", entry.ref)
                    lossy = lossy or refusal
                    continue
                if prepare is not None:
                    prepare(resolved)
                    prepare = None
                manifest = resolved.manifest
                self._manager.check_stored(manifest)  # a damaged checkpoint falls back, whatever shapes it claims
                _state.check_compatible(self._ledger, manifest.state, tensor_meta(manifest))
                resolved.tensors = load_tensors(self._manager, manifest)  # (fetches a remote root's packs)
                resolved.shards = self._manager.shards(manifest)
                # Checked here too (every rank, each file), so that a damaged sharded save falls back
                # to the previous checkpoint as a damaged pack does.
                problems = _sharded.verify(*resolved.shards) if resolved.shards is not None else []
                if problems:
                    raise CorruptCheckpointError(f"its sharded tensors are damaged: {'; '.join(problems)}",
                                                 path=resolved.shards[0] if resolved.shards else None)
                return resolved
            except CorruptCheckpointError as exc:
                if not (may_fall_back and fall_back):
                    raise
                damaged.append(f"{entry.ref}: {exc}")
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", entry.ref, exc)
        if lossy is not None and not damaged:
            raise lossy
        raise CorruptCheckpointError("no checkpoint of %s verifies:\n  %s" % (ref, "\n  ".join(damaged)))

    def _refuse_lossy(self, manifest: Manifest) -> LossyCheckpointError:
        """The error of a resume from an archived checkpoint not accepted by name: what it is, its
        error bounds, the nearest exact checkpoint and the flag that accepts it."""
        exact = [r for r in self._manager.records([manifest.experiment]) if r.exact]
        nearest = min(exact, key=lambda r: (abs(r.step - manifest.step), r.step)).ref if exact else None
        return LossyCheckpointError(
            f"checkpoint {manifest.ref} is in the lossy archive ({describe_lossy(manifest)}): resuming it would not "
            "continue the run exactly. "
            + (f"Resume the nearest exact checkpoint, {nearest!r}, or " if nearest else "")
            + f"pass allow_lossy=True to resume({manifest.ref!r}) to accept its values (the run continues in a "
            "child experiment that records the lossy origin)", checkpoint=manifest.ref, nearest=nearest)

    # --- restoring -----------------------------------------------------------------------------
    def restore(self, resolved: Resolved, *, rank_state: str | None = None, kind: str = "resume") -> Restored:
        """Put a loaded checkpoint into the registered objects (RNG last), after the ``before_load``
        callbacks. If an object cannot take its state back, those already restored are put back as
        they were and the error, naming the object, is raised: nothing changed."""
        self._events.emit("before_load", resolved.event("before_load", kind))
        manifest = resolved.manifest
        assert resolved.tensors is not None, "load() the checkpoint before restoring it"
        digests = {key: entry.content for key, entry in manifest.tensors.items()}
        try:
            tree, notes = _ranks.view(manifest.state, rank=self._job.rank, world_size=self._job.size,
                                      digests=digests, mode=rank_state or self._rank_state)
        except ValueError as exc:
            if isinstance(exc, WeightslabError):
                raise
            raise ConfigError(str(exc)) from None
        for note in notes:
            log.warning("resume from %s: %s", manifest.ref, note)
        tensors = dict(resolved.tensors)
        undo = _state.Undo(self._ledger)  # (before anything changes)
        try:
            if resolved.shards is not None:
                for kind in ("model", "optimizer"):  # sharded tensors are read into the live ones
                    for name in self._ledger.objects(kind):
                        undo.reach(kind, name)
                tensors.update(self._load_shards(manifest, *resolved.shards))
            report = _state.restore(self._ledger, tree, tensors, excluded=self._excluded, undo=undo)
        except Exception as exc:
            error = self._undone(manifest.ref, exc, undo)
            if error is exc:
                raise
            raise error from exc
        for what in report.missing:
            log.warning("resume from %s: %s is registered but not in the checkpoint; left as it is",
                        manifest.ref, what)
        if report.kept:
            log.info("resume from %s: kept this process's values of keys excluded from the experiment: %s",
                     manifest.ref, ", ".join(report.kept))
        for what in report.unused:
            log.warning("resume from %s: the checkpoint holds %s, which is not registered here; not restored",
                        manifest.ref, what)
        log.info("restored %s (step %d, %s) from %s", manifest.ref, manifest.step,
                 ", ".join(report.restored) or "nothing registered", resolved.entry.path)
        return Restored(manifest.ref, tensors, undo)

    @staticmethod
    def _undone(ref: str, exc: Exception, undo: _state.Undo) -> Exception:
        """The error of a restore that failed, once the objects it reached are back as they were."""
        reached = [undo.name(key) for key in dict.fromkeys(undo.reached)]
        failing = reached[-1] if reached and not isinstance(exc, ArchitectureMismatchError) else None
        problems = undo.put_back()
        if set(problems) - {failing}:
            return StateError(f"resume from {ref} failed ({exc}), and putting back what it had changed failed too: "
                              + "; ".join(f"{what}: {why}" for what, why in problems.items())
                              + ". The registered objects are partly restored: build and register them again "
                              "before training")
        before = [what for what in reached if what != failing]
        note = f"what it had restored before ({', '.join(before) or 'nothing'}) is back as it was before the resume"
        if failing in problems:  # (its own setter raised when given its earlier value too)
            note += f"; {failing} is as the failed restore left it (putting back its earlier value raised " \
                    f"{problems[failing]})"
        elif failing is not None:
            note += f", and so is {failing}: nothing changed"
        if isinstance(exc, WeightslabError) and not isinstance(exc, StateError):
            log.warning("resume from %s failed (%s); %s", ref, exc, note)
            return exc
        return StateError(f"resume from {ref} failed: {exc}. {note[0].upper()}{note[1:]}")

    def _load_shards(self, manifest: Manifest, directory: Path, files: ShardedFiles) -> dict[str, torch.Tensor]:
        """Read a checkpoint's sharded tensors (every rank, collectively) into the live ones of the
        registered objects, resharding to their placements; restore then loads them as they are."""
        meta = manifest.state["sharded"]["tensors"]
        live = _state.capture_replicated(self._ledger, step=manifest.step).tensors
        targets = {key: live[key].detach() if key in live else self._shard_target(key, m) for key, m in meta.items()}
        # (load verified every file on every rank, and the ranks agreed on this checkpoint: no need
        # to hash the files a second time)
        _sharded.load(targets, directory, files, group=self._job.group, verified=True)
        return targets

    def _shard_target(self, key: str, meta: Mapping[str, Any]) -> torch.Tensor:
        """A tensor to load sharded optimizer state into when the optimizer has none yet (it makes
        its state at its first step): shaped and placed like the parameter it belongs to."""
        parts = key.split("/")
        optimizer = self._ledger.objects("optimizer").get(parts[1]) if len(parts) == 5 and \
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

    def loaded(self, resolved: Resolved, kind: str) -> None:
        """The run goes on from ``resolved`` (a resume or a fork, ``kind``): the ``loaded`` callbacks, and
        a word if the process cannot continue it bit for bit."""
        self._events.emit("loaded", resolved.event("loaded", kind))
        self.warn_if_not_reproducible()

    def fork_edits(self, resolved: Resolved, overrides: Mapping[str, Any]) -> dict[str, Edit]:
        """A fork's ``overrides`` as edits of the checkpoint's saved hyperparameters (checked: raises
        before anything changes)."""
        manifest = resolved.manifest
        return fork_edits(codec.decode(manifest.state.get("hyperparams", {}), {}),
                          self._ledger.objects("hyperparams"), overrides, where=manifest.ref)

    # --- building what a checkpoint needs ---------------------------------------------------------
    def register_built(self, model_factory: Callable[[CheckpointInfo], Any], resolved: Resolved) -> None:
        """Register what ``model_factory(info)`` builds under the checkpoint's names (everything it
        returns is checked before anything is registered)."""
        built = model_factory(resolved.info())
        if isinstance(built, torch.nn.Module):
            built = {"model": built}
        kinds = ("model", "optimizer", "scheduler", "scaler")
        if not isinstance(built, Mapping) or not set(built) <= set(kinds):
            raise ConfigError(f"model_factory must return a torch.nn.Module or a dict with keys among {kinds}, got "
                              f"{type(built).__name__}{' with keys ' + str(sorted(built)) if isinstance(built, Mapping) else ''}")
        saved = resolved.manifest.state
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
        new_models = {**self._ledger.objects("model"), **by_kind.get("model", {})}
        live = {id(p) for m in new_models.values() for p in m.parameters()}
        for name, opt in self._ledger.objects("optimizer").items():
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
                self._ledger.register(Entry(kind, name, obj))

    def warn_if_not_reproducible(self) -> None:
        """Exactness needs a reproducible process; say once what is missing, and what to do."""
        problems = []
        if any(p.is_cuda for m in self._ledger.objects("model").values() for p in m.parameters()) and \
                not torch.are_deterministic_algorithms_enabled():
            problems.append("models run on CUDA without torch.use_deterministic_algorithms(True) (and "
                            "CUBLAS_WORKSPACE_CONFIG=:4096:8): nondeterministic kernels make every run differ")
        if torch.backends.mkl.is_available() and "MKL_CBWR" not in os.environ:
            problems.append("MKL_CBWR is not set: on this CPU two runs of the same seeded training can differ; set "
                            "MKL_CBWR=AVX2,STRICT before importing torch and torch.set_num_threads(1)")
        if problems:
            self._failures.warn_once("reproducible", "resumed, but this process is not set up to continue bit for "
                                     "bit: %s (guides/exactness.md)", "; ".join(problems))
