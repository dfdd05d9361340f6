"""Exact resume for the Hugging Face ``Trainer``: a ``TrainerCallback``, and the directory the Trainer resumes from.

::

    from weightslab.integrations.transformers import WeightslabTrainerCallback, resume_from

    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                      callbacks=[WeightslabTrainerCallback(root_log_dir="runs", checkpoint_frequency=100)])
    trainer.train(resume_from_checkpoint=resume_from(trainer, "latest"))   # None on a fresh run

**Saving.** At ``on_train_begin`` the callback registers the model, the optimizer and the learning-rate
scheduler the Trainer built (the objects that hold the state, not Accelerate's wrappers), the AMP
scaler if there is one, and the Trainer's own state (``TrainerState``, the loop's loss accumulators,
the train sampler's seed). Each optimizer step ends at ``on_step_end`` (``state.global_step``), but
its boundary, ``checkpoint_on_step(global_step, metrics)``, is marked once the step is complete:
after the logging, evaluation and saving the Trainer does after ``on_step_end``
(``_maybe_log_save_evaluate``), at the next ``on_step_begin`` / ``on_epoch_begin`` / ``on_train_end``.
An evaluation draws from the global random generator (its loader's worker seed) and adds to
``TrainerState`` (``log_history``, ``best_metric``), and its metrics belong to this step: the
checkpoint then holds what the next step starts from, and ``@best:eval_loss`` refs rank it by them.

**Resuming.** The Trainer decides where its loop starts (epoch, batches of it to skip, global step)
only from the ``trainer_state.json`` of the directory given to ``train(resume_from_checkpoint=...)``,
and refuses a directory without model weights. :func:`resume_from` resolves a weightslab ref
(``"latest"``, ``"<hash>@<step>"``, ``"<name>@best"``) and writes, atomically (a temporary sibling,
fsynced, renamed: the Trainer never sees a half-written one), a directory holding just those two
files, from the checkpoint's verified bytes. The Trainer loads the weights, positions its loop and
skips the consumed batches itself (index-only with Accelerate's seedable sampler, the default: the
epoch's order depends on the seed and the epoch alone). Everything else is restored by weightslab at
``on_train_begin`` from the same checkpoint, every byte verified, nothing unpickled: model,
optimizer, scheduler, scaler, the loop's accumulators; the random generators (this process's, in a
torch.distributed job) are put back at the moment the Trainer would load its ``rng_state.pth``: the
first ``on_step_begin`` (mid-epoch: after the skip and the first batch) or ``on_epoch_begin`` (at an
epoch's end: before the new epoch's loader draws its worker seed). The directory is deleted once the
restore succeeded. Its name (``weightslab-<hash>-step-<step>``) never matches the Trainer's
``checkpoint-<N>``, so ``resume_from_checkpoint=True`` never picks it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

import torch

try:
    from transformers import TrainerCallback, TrainerState
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # the framework is an optional extra
    raise ImportError("weightslab.integrations.transformers needs the Hugging Face transformers package "
                      f"({exc}); install it with: pip install 'weightslab[transformers]'") from exc

from .. import codec, rng
from ..config import make_config
from ..data import sampler_seed, set_sampler_seed
from ..errors import ConfigError, CorruptCheckpointError, StateError
from ..fingerprint import ExperimentHashGenerator
from ..ledger import LEDGER
from ..process import get_checkpoint_system
from ..refs import parse_ref
from ..registration import (list_registered, register_model, register_optimizer, register_scaler, register_scheduler,
                            register_state, unregister)
from ..storage.atomic import DISK, TEMP_PREFIX, atomic_path, atomic_write, fsync_dir, make_dirs, temp_path_for
from ..tensors import load_tensors

__all__ = ["WeightslabTrainerCallback", "resume_from"]

log = logging.getLogger(__name__)

#: The names the Trainer's objects are registered under (a checkpoint of a Trainer run holds them).
MODEL, OPTIMIZER, SCHEDULER, SCALER, TRAINER = "model", "optimizer", "scheduler", "scaler", "trainer"
#: What the Trainer reads from a checkpoint directory (transformers.trainer's file names).
WEIGHTS_FILE, STATE_FILE = "model.safetensors", "trainer_state.json"
#: Samplers whose order of an epoch depends on their seed and the epoch alone, so that the Trainer's
#: skip of the consumed batches replays the same batches (class names: no import of accelerate).
_REPLAYABLE = {"SeedableRandomSampler", "SequentialSampler", "DistributedSampler", "ResumableSampler"}


class WeightslabTrainerCallback(TrainerCallback):
    """Checkpoints a ``Trainer`` run with weightslab and resumes it exactly (see the module's text).

    ``settings`` are those of :func:`weightslab.get_checkpoint_system` (``root_log_dir``,
    ``checkpoint_frequency``, ``retention``, ...). Resume with
    ``trainer.train(resume_from_checkpoint=resume_from(trainer, ref))``; call it on a fresh run too
    (it returns None then): it is also how the callback learns the Trainer, whose loop accumulators
    and stateful callbacks (``EarlyStoppingCallback``) then enter the checkpoints.
    """

    def __init__(self, **settings: Any):
        if settings.get("resume") == "auto":
            raise ConfigError("WeightslabTrainerCallback(resume='auto'): the Trainer positions its loop only from "
                              "train(resume_from_checkpoint=...); leave resume unset and call "
                              "trainer.train(resume_from_checkpoint=resume_from(trainer, 'latest'))")
        make_config(dict(settings))  # a wrong setting fails here, with the setting's name
        self._settings = dict(settings)
        self._trainer: Any = None
        self._system: Any = None
        self._pending: _Pending | None = None  # what resume_from prepared, restored at on_train_begin
        self._state: TrainerState | None = None
        self._loader: Any = None
        self._ended: int | None = None  # the step that ended and whose boundary is not marked yet
        self._metrics: dict[str, float] = {}  # logged since the last boundary
        self._rng: tuple[str, dict[str, Any]] | None = None  # (event, generators) to put back after a resume

    # --- the system -----------------------------------------------------------------------------
    @property
    def system(self) -> Any:
        """The process-wide checkpoint system with this callback's settings (started if needed)."""
        if self._system is None or self._system.closed:
            self._system = get_checkpoint_system(**self._settings)
        return self._system

    # --- resuming -------------------------------------------------------------------------------
    def _prepare_resume(self, trainer: Any, ref: str | os.PathLike[str] = "latest") -> str | None:
        """:func:`resume_from`, for this callback."""
        self._trainer = trainer
        system = self.system
        register_model(MODEL, _model_of(trainer.model))  # so that "latest" means this model's lineage
        found = _resolve(system, ref)
        if found is None:
            self._pending = None
            return None
        manifest, tensors = found
        saved = manifest.state.get("custom", {}).get(TRAINER)
        trainer_state = bytes(codec.decode(saved, tensors)["trainer_state"].numpy()).decode()
        weights = codec.decode(manifest.state["models"][MODEL]["state_dict"], tensors)
        # safetensors holds tensors only (a module's _extra_state may be anything).
        weights = {name: value for name, value in weights.items() if isinstance(value, torch.Tensor)}
        args = trainer.args
        name = f"weightslab-{manifest.experiment}-step-{manifest.step}"
        if getattr(args, "world_size", 1) > 1:  # each process reads its own copy (nodes may share no disk)
            name += f"-rank{args.process_index}"
        directory = Path(args.output_dir).expanduser().absolute() / name
        materialize(directory, weights, trainer_state)
        self._pending = _Pending(manifest.ref, directory)
        log.info("resuming the Trainer from %s through %s", manifest.ref, directory)
        return str(directory)

    # --- the Trainer's events ---------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: TrainerState, control: Any, model: Any = None, optimizer: Any = None,
                       lr_scheduler: Any = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        system = self.system
        self._state, self._loader = state, train_dataloader
        self._ended, self._metrics, self._rng = None, {}, None
        register_model(MODEL, _model_of(model))
        inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer holds the real one
        register_optimizer(OPTIMIZER, inner)
        if lr_scheduler is not None:
            register_scheduler(SCHEDULER, getattr(lr_scheduler, "scheduler", lr_scheduler))
        scaler = getattr(optimizer, "scaler", None)  # Accelerate's GradScaler under fp16
        if scaler is not None:
            register_scaler(SCALER, scaler)
        register_state(TRAINER, self._capture, self._restore)
        sampler = _sampler_of(train_dataloader)
        if sampler is not None and type(sampler).__name__ not in _REPLAYABLE:
            log.warning("the Trainer's train sampler is a %s: its order of an epoch is not a function of the epoch "
                        "alone, so after a resume mid-epoch the Trainer's skip of the consumed batches lands on other "
                        "samples. Keep accelerator_config={'use_seedable_sampler': True} (the default) and the "
                        "default train sampler for an exact resume", type(sampler).__name__)
        pending, self._pending = self._pending, None
        if pending is None:
            if state.global_step:
                log.info("the Trainer resumed at step %d from its own checkpoint: weightslab restored nothing and "
                         "checkpoints from here on", state.global_step)
            return
        system.resume(pending.ref)  # (the trainer state's setter checks the Trainer resumed from its directory)
        mid_epoch = _steps_into_epoch(args, state, train_dataloader) > 0
        if mid_epoch and args.ignore_data_skip:
            log.warning("ignore_data_skip=True: the Trainer restarts epoch %d from its first batch instead of "
                        "skipping the %d batches the checkpoint had consumed; the resumed run is not exact",
                        int(state.epoch), _steps_into_epoch(args, state, train_dataloader))
        self._rng = ("step" if mid_epoch and not args.ignore_data_skip else "epoch", rng.capture())
        shutil.rmtree(pending.directory, ignore_errors=True)  # everything is restored; it was a copy

    def on_epoch_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._put_back_rng("epoch")
        self._boundary()

    def on_step_begin(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._put_back_rng("step")
        self._boundary()

    def on_step_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._ended = state.global_step  # (its boundary is marked once the Trainer is done with the step)

    def on_log(self, args: Any, state: TrainerState, control: Any, logs: Mapping[str, Any] | None = None,
               **kwargs: Any) -> None:
        self._record(logs)

    def on_evaluate(self, args: Any, state: TrainerState, control: Any, metrics: Mapping[str, Any] | None = None,
                    **kwargs: Any) -> None:
        self._record(metrics)

    def on_train_end(self, args: Any, state: TrainerState, control: Any, **kwargs: Any) -> None:
        self._boundary()
        system, self._system = self._system, None
        try:
            if system is not None:
                system.close()  # the final checkpoint (if the last step has none), durable; kept failures raise
        finally:
            registered = list_registered()
            for kind, name in (("model", MODEL), ("optimizer", OPTIMIZER), ("scheduler", SCHEDULER),
                               ("scaler", SCALER), ("state", TRAINER)):
                if name in registered.get(kind, ()):
                    unregister(name, kind=kind)
            self._loader = None

    # --- the parts ------------------------------------------------------------------------------
    def _boundary(self) -> None:
        if self._ended is None:
            self._metrics = {}  # logged before any step (eval_on_start): no checkpoint holds that state
            return
        step, metrics = self._ended, self._metrics
        self._ended, self._metrics = None, {}
        self.system.checkpoint_on_step(step, metrics=metrics or None)

    def _record(self, values: Mapping[str, Any] | None) -> None:
        for key, value in (values or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and isinstance(key, str) and key:
                self._metrics[key] = float(value)

    def _put_back_rng(self, event: str) -> None:
        if self._rng is not None and self._rng[0] == event:
            rng.restore(self._rng[1])
            self._rng = None

    def _capture(self) -> dict[str, Any]:
        """The Trainer's own state, as plain data (the getter of the ``trainer`` custom state)."""
        assert self._state is not None
        fields = dataclasses.asdict(self._state)
        trainer = self._trainer
        if trainer is not None:  # as Trainer._save_checkpoint records them
            exportable = [cb for cb in [*trainer.callback_handler.callbacks, trainer.control]
                          if isinstance(cb, ExportableState)]
            fields["stateful_callbacks"] = TrainerState(stateful_callbacks=exportable).stateful_callbacks
        loop = {}
        if trainer is not None:
            for attr in ("_total_loss_scalar", "_globalstep_last_logged", "current_flos"):
                if hasattr(trainer, attr):
                    loop[attr] = getattr(trainer, attr)
            if isinstance(getattr(trainer, "_tr_loss", None), torch.Tensor):
                loop["_tr_loss"] = float(trainer._tr_loss.item())
        sampler = _sampler_of(self._loader)
        return {
            "format": 1,
            "global_step": self._state.global_step,
            # Written as TrainerState.save_to_json writes it: the file the Trainer reads back. As bytes
            # (a blob in the pack, not text in the manifest): its log history grows with the run.
            "trainer_state": torch.frombuffer(bytearray((json.dumps(fields, indent=2, sort_keys=True) + "\n").encode()),
                                              dtype=torch.uint8),
            "loop": loop,
            "data": {"batches_per_epoch": _length(self._loader), "sampler": type(sampler).__name__ if sampler else None,
                     "seed": sampler_seed(sampler)},
        }

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """The setter of the ``trainer`` custom state: the Trainer already read ``trainer_state.json``."""
        state = self._state
        assert state is not None
        if state.global_step != int(saved["global_step"]):
            raise StateError(f"the Trainer starts at step {state.global_step} but the checkpoint is at step "
                             f"{saved['global_step']}: pass the directory resume_from(trainer, ref) returned to "
                             "trainer.train(resume_from_checkpoint=...)")
        data = saved.get("data", {})
        length = _length(self._loader)
        if data.get("batches_per_epoch") not in (None, length):
            log.warning("the train loader gives %s batches per epoch, the checkpoint's gave %s: the Trainer's skip of "
                        "the consumed batches lands elsewhere than in the run that saved it",
                        length, data["batches_per_epoch"])
        sampler = _sampler_of(self._loader)
        seed = data.get("seed")
        if seed is not None and sampler_seed(sampler) not in (None, seed):
            log.info("the train sampler takes the checkpoint's seed %d (this run's was %d)", seed, sampler_seed(sampler))
            set_sampler_seed(sampler, int(seed))  # the saved run's order of every epoch, whatever seeds this one
        trainer = self._trainer
        for attr, value in saved.get("loop", {}).items():
            if trainer is None or not hasattr(trainer, attr):
                continue
            if attr == "_tr_loss":
                trainer._tr_loss.fill_(value)  # in place: the loop holds this tensor
            else:
                setattr(trainer, attr, value)


def resume_from(trainer: Any, ref: str | os.PathLike[str] = "latest") -> str | None:
    """The directory to pass to ``trainer.train(resume_from_checkpoint=...)`` to resume from a weightslab
    checkpoint: ``"latest"`` (the newest of this model's lineage), ``"<hash or name>@<step>"``,
    ``"<name>@best[:metric]"`` or a manifest's path. None when ``"latest"`` finds nothing (a fresh run).

    ``trainer`` must have a :class:`WeightslabTrainerCallback`. The directory holds the checkpoint's
    model weights and ``trainer_state.json`` (what the Trainer needs to position its loop), written
    atomically; the callback restores everything else from the same checkpoint when training begins,
    and deletes the directory."""
    callbacks = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, WeightslabTrainerCallback)]
    if not callbacks:
        raise ConfigError("resume_from(trainer): the Trainer has no WeightslabTrainerCallback; create it with "
                          "Trainer(..., callbacks=[WeightslabTrainerCallback(root_log_dir=...)]) or "
                          "trainer.add_callback(WeightslabTrainerCallback(...))")
    if len(callbacks) > 1:
        raise ConfigError("resume_from(trainer): the Trainer has several WeightslabTrainerCallback; keep one")
    return callbacks[0]._prepare_resume(trainer, ref)


def materialize(directory: Path, weights: Mapping[str, torch.Tensor], trainer_state: str) -> None:
    """Write a Trainer checkpoint directory (``model.safetensors``, ``trainer_state.json``) atomically.

    Its files are written and fsynced in a temporary sibling (``.tmp.<pid>.<random>.<name>``), which is
    then renamed to ``directory`` (a directory there already is first renamed away, then deleted): a
    reader sees the complete directory or none, whenever this process dies. Temporary siblings that
    dead processes left are removed first."""
    import safetensors.torch  # a dependency; imported here so that importing this module stays light

    directory = Path(directory)
    make_dirs(directory.parent)
    sweep_temp_dirs(directory.parent, of=directory.name)
    tmp = temp_path_for(directory)
    DISK.mkdir(tmp)
    try:
        with atomic_path(tmp / WEIGHTS_FILE) as path:
            safetensors.torch.save_file(dict(weights), os.fspath(path), metadata={"format": "pt"})
        atomic_write(tmp / STATE_FILE, trainer_state.encode())
        fsync_dir(tmp)
        old = None
        if directory.exists():
            old = temp_path_for(directory)
            DISK.replace(directory, old)
        DISK.replace(tmp, directory)
        fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_ORPHAN_AGE_SECONDS = 24 * 3600


def sweep_temp_dirs(parent: Path, *, of: str) -> list[Path]:
    """Remove the temporary siblings of directory ``of`` that :func:`materialize` left in ``parent``
    when its process died (the pid in the name is not alive, or it is older than a day)."""
    pattern = re.compile(rf"{re.escape(TEMP_PREFIX)}(\d+)\.[0-9a-f]{{12}}\.{re.escape(of)}")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or not entry.is_dir(follow_symlinks=False):
            continue
        pid = int(match.group(1))
        alive = pid == os.getpid() or _alive(pid)
        if alive and time.time() - entry.stat(follow_symlinks=False).st_mtime < _ORPHAN_AGE_SECONDS:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@dataclasses.dataclass(frozen=True)
class _Pending:
    ref: str  # "<hash>@<step>": the exact checkpoint the directory was written from
    directory: Path


def _model_of(model: Any) -> Any:
    """The module that holds the weights (the Trainer passes its unwrapped model; DataParallel and
    DDP wrappers hold theirs in ``module``)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


def _resolve(system: Any, ref: str | os.PathLike[str]) -> tuple[Any, dict[str, torch.Tensor]] | None:
    """The checkpoint ``ref`` means, with every tensor read and verified; None when ``latest`` finds
    nothing. As ``system.resume`` does, ``latest`` (or ``<hash>@latest``) skips a damaged checkpoint for
    the newest one that verifies, with a warning; an exact ref raises
    :class:`~weightslab.CorruptCheckpointError`."""
    if system.peek(ref) is None:  # (fetches a remote root's index; an explicit ref naming nothing raises)
        return None
    manager = system.manager
    parsed = parse_ref(ref)
    current = None
    if parsed.latest:  # the lineage of the registered model, as the system's own resume searches it
        hasher = ExperimentHashGenerator(exclude_keys=system.config.exclude_keys)
        current = hasher.fingerprint(LEDGER.objects("model"), LEDGER.objects("hyperparams")).hash
    may_fall_back = parsed.latest or parsed.step is None
    damaged = []
    for entry in manager.candidates(parsed, current=current):
        try:
            manifest = manager.read_manifest(entry)
            if TRAINER not in manifest.state.get("custom", {}) or MODEL not in manifest.state.get("models", {}):
                raise StateError(f"checkpoint {manifest.ref} holds no Trainer state: it was not saved by "
                                 "WeightslabTrainerCallback. Resume it with system.resume() in the loop that saved "
                                 "it, or pick a checkpoint of a Trainer run")
            return manifest, load_tensors(manager, manifest)
        except CorruptCheckpointError as exc:
            if not may_fall_back:
                raise
            damaged.append(f"{entry.ref}: {exc}")
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", entry.ref, exc)
    raise CorruptCheckpointError("no checkpoint of %s verifies:\n  %s" % (ref, "\n  ".join(damaged)))


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:  # an iterable dataset
        return None


def _steps_into_epoch(args: Any, state: TrainerState, loader: Any) -> int:
    """How many optimizer steps into its epoch the Trainer resumes (as Trainer._init_training_state
    computes it): 0 when the checkpoint ended an epoch."""
    length = _length(loader)
    accumulation = args.gradient_accumulation_steps
    per_epoch = max(length // accumulation + int(length % accumulation > 0), 1) if length else state.max_steps
    return state.global_step % per_epoch if per_epoch else 0


def _sampler_of(loader: Any) -> Any:
    """The index sampler inside the (Accelerate-prepared) train loader, or None."""
    if loader is None:
        return None
    batch_sampler = getattr(loader, "batch_sampler", None)
    for holder in (batch_sampler, getattr(batch_sampler, "batch_sampler", None)):
        sampler = getattr(holder, "sampler", None)
        if isinstance(sampler, torch.utils.data.Sampler) and not isinstance(sampler, torch.utils.data.BatchSampler):
            return sampler
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, torch.utils.data.Sampler) else None
