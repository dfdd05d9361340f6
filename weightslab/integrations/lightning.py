"""PyTorch Lightning: weightslab's checkpoints and exact resume for a ``Trainer``, from one callback.

::

    import lightning.pytorch as pl
    from weightslab.integrations.lightning import WeightslabCallback

    trainer = pl.Trainer(max_epochs=10, callbacks=[WeightslabCallback(root_log_dir="./experiments",
                                                                      checkpoint_frequency=100)])
    trainer.fit(model, train_loader, ckpt_path="latest")  # or "<hash>@<step>", "<name>@best"

A Lightning ``.ckpt`` holds the module, the optimizers, the schedulers, the precision plugin and the
loops' counters, but no random generator and, for a plain ``DataLoader``, no position in the epoch:
a run resumed mid-epoch draws another order of batches and other dropout masks. The callback
registers with weightslab's ledger what a ``Trainer`` holds (the LightningModule as model
``"model"``, its ``hparams`` as hyperparameters ``"hparams"``, the optimizers, the schedulers, the
precision plugin's GradScaler, the train loaders' position as dataloader ``"train"``, and the loops'
counters and the other callbacks' ``state_dict()`` as custom state ``"lightning"``) and marks a step
boundary whenever an optimizer step happened (``trainer.global_step`` moved: with gradient
accumulation a boundary is an optimizer step, not a batch), with ``trainer.callback_metrics`` as
the metrics, so ``@best`` refs rank them. When Lightning validates after that batch, the step ends
after the validation (``on_validation_end``): its metrics and its draws from the random generators
belong to it, as in a ``ModelCheckpoint`` saved there. weightslab saves on its own triggers (every
``checkpoint_frequency`` steps, architecture, hyperparameter and state changes), with every random
generator. The callback runs after the other callbacks (checkpoint callbacks last, as Lightning has
them), so a checkpoint holds what they did in the same hook.

Resuming: ``trainer.fit(model, ckpt_path=ref)`` with a weightslab ref (the callback installs a
:class:`WeightslabCheckpointIO` that recognises refs and hands any other path to the checkpoint IO
it wraps), or ``WeightslabCallback(resume="auto")``, which resumes from ``"latest"`` by itself.
weightslab restores everything at ``on_fit_start``, where Lightning restores its own training state;
the loader's position once Lightning has built the loader (``on_train_start``); and the random
generators as they were at the checkpoint right before the first batch is fetched, since Lightning
draws from them in between (the workers' seed of the loader it builds, for one). Lightning's own
checkpoint files taken with the callback present also hold the generators and the position (the
callback's ``state_dict``), so ``ckpt_path=<a .ckpt>`` resumes exactly too.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping

try:
    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import Callback, Checkpoint
    from lightning.pytorch.utilities.model_helpers import is_overridden
except ImportError as _missing:  # the extra is not installed
    raise ImportError("weightslab.integrations.lightning needs PyTorch Lightning (the package `lightning`): "
                      "pip install 'weightslab[lightning]'") from _missing

import torch
from torch.utils.data import DataLoader

from .. import codec, data, registration, rng
from ..config import make_config
from ..errors import ConfigError, HyperparamsError, RegistrationError, StateError
from ..process import get_checkpoint_system
from ..refs import parse_ref

__all__ = ["WeightslabCallback", "WeightslabCheckpointIO", "is_weightslab_ref", "MODEL", "HYPERPARAMS", "LOOP_STATE",
           "TRAIN_DATA"]

log = logging.getLogger(__name__)

#: The names the callback registers under (``wl.load(ref)["models"]["model"]`` is the module's state).
MODEL, HYPERPARAMS, LOOP_STATE, TRAIN_DATA = "model", "hparams", "lightning", "train"
_MANY = "weightslab.lightning.loaders"  # the state of several train loaders (a CombinedLoader)


def _indexed(base: str, i: int) -> str:
    return base if i == 0 else f"{base}_{i}"


class WeightslabCallback(Callback):
    """Checkpoints of a Lightning run taken by weightslab, and an exact resume from them.

    ``settings`` are those of :func:`weightslab.get_checkpoint_system` (``root_log_dir``,
    ``checkpoint_frequency``, ``retention``, ...); the process-wide checkpoint system starts with
    them when ``trainer.fit`` starts and is closed when training ends (a final checkpoint if the
    last step has none; a save that failed raises there). ``resume="auto"`` resumes from
    ``"latest"`` at the start of ``fit`` when no ``ckpt_path`` is given; ``overlap`` is False
    unless given (see ``__init__``).
    """

    def __init__(self, **settings: Any) -> None:
        make_config(settings)  # a wrong setting is refused now, with the valid ones named
        resume = settings.get("resume")
        # The system's own auto-resume fires at the first forward of the module (the sanity check's,
        # before the optimizers exist): the callback resumes at on_fit_start instead. And the
        # parameters are copied at the boundary, not beside the next step: Lightning calls the
        # LightningModule's hooks after the callbacks', and one that changes a parameter in place
        # there (an EMA kept as a submodule) would tear a background copy.
        self.settings = {"overlap": False, **settings, "resume": "never" if resume == "never" else None}
        self.auto_resume = resume == "auto"
        self.system: Any = None
        self._trainer: pl.Trainer | None = None
        self._ref: str | None = None  # the weightslab ref trainer.fit(ckpt_path=...) named
        self._registered: list[tuple[str, str]] = []
        self._position = _TrainPosition()
        self._pending_rng: dict[str, Any] | None = None  # restored, to be put back before the first fetch
        self._last_step: int | None = None
        self._after_validation: tuple[int, dict[str, bool]] | None = None  # a boundary validation follows
        self._warned: set[str] = set()

    # --- Lightning's hooks --------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After the other callbacks, so that a checkpoint holds what they did in the same hook (an
        # EMA's update at on_train_batch_end); checkpoint callbacks stay last, as Lightning has them.
        # (A new list: Lightning is iterating over the one it has, to call this hook.)
        others = [c for c in trainer.callbacks if c is not self and not isinstance(c, Checkpoint)]
        trainer.callbacks = others + [self] + [c for c in trainer.callbacks if isinstance(c, Checkpoint)]
        # Before Lightning reads ckpt_path: the checkpoint IO must know refs by then.
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, WeightslabCheckpointIO):
            io = WeightslabCheckpointIO(io)
            trainer.strategy.checkpoint_io = io
        io.callback = self
        if stage != "fit":
            return
        self._trainer = trainer
        self.system = get_checkpoint_system(**self.settings)
        # The model and its hyperparameters now: they decide which experiment "latest" searches.
        self._register("model", MODEL, pl_module)
        if pl_module.hparams:
            try:
                self._register("hyperparams", HYPERPARAMS, pl_module.hparams)
            except (HyperparamsError, RegistrationError) as exc:  # an object in hparams: the run goes on without
                self._warn("hparams", "the LightningModule's hparams are not registered with weightslab (%s); they "
                           "do not enter the experiment hash", exc)
        registration.register_state(LOOP_STATE, self._loop_state, self._restore_loop_state)
        self._registered.append(("state", LOOP_STATE))
        self._register("dataloader", TRAIN_DATA, self._position)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has built the optimizers and schedulers (and moved the module) by now.
        for i, optimizer in enumerate(trainer.optimizers):
            self._register("optimizer", _indexed("optimizer", i), optimizer)
        for i, config in enumerate(trainer.lr_scheduler_configs):
            self._register("scheduler", _indexed("scheduler", i), config.scheduler)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self._register("scaler", "scaler", scaler)
        self._warn_about_checkpoint_hooks(trainer, pl_module)
        # (resume="auto" gives way to a ckpt_path given to fit, weightslab's or Lightning's own)
        ref = self._ref if self._ref is not None else \
            "latest" if self.auto_resume and trainer.ckpt_path is None else None
        if ref is not None:
            # Everything at once, where Lightning restores its own training state (the loops'
            # counters through the "lightning" state); the loader's position waits for the loader.
            step = self.system.resume(ref)
            if step:
                self._pending_rng = rng.capture()  # what resume put back; Lightning draws before the first batch
                log.info("weightslab: resumed from %s at step %d", ref, step)
            else:
                log.info("weightslab: no checkpoint to resume from %r in %s: training starts fresh", ref,
                         self.system.root)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._bind_loaders(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bind_loaders(trainer)  # (reload_dataloaders_every_n_epochs builds new ones)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._restore_rng()  # (a loader that could not do it before its first fetch)
        if self._after_validation is not None:  # (validation was due after the last step, and did not run)
            self._warn("validation", "no checkpoint at step %d: validation was due after it and did not run",
                       self._after_validation[0])
            self._after_validation = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step since the last boundary
        self._last_step = step
        if _validation_follows(trainer):
            # The step ends after the validation Lightning runs now: its draws from the random
            # generators, its metrics and what callbacks do with them belong to this step (a run
            # resumed from a checkpoint taken before it would skip it, as Lightning does).
            self._after_validation = (step, {name: m.training for name, m in pl_module.named_modules()})
            return
        self.system.checkpoint_on_step(step, metrics=_scalars(trainer.callback_metrics))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._after_validation is None or trainer.sanity_checking:
            return
        (step, modes), self._after_validation = self._after_validation, None
        # Lightning puts the modules back in training mode right after this hook: they are saved so.
        during = {name: m.training for name, m in pl_module.named_modules()}
        _set_modes(pl_module, modes)
        try:
            self.system.checkpoint_on_step(step, metrics=_scalars(trainer.callback_metrics))
        finally:
            _set_modes(pl_module, during)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(None)  # training is over: the final checkpoint, before Lightning tears the loop down

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish(None)  # (a fit with nothing left to train has no on_train_end)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._finish(exception)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._finish(None)

    def state_dict(self) -> dict[str, Any]:
        """What Lightning's own checkpoints (``ModelCheckpoint``) lack for an exact resume, added to
        them: the random generators and the train loaders' position (``ckpt_path=<a .ckpt>``)."""
        if self.system is None:
            return {}
        # Encoded as weightslab encodes a checkpoint (plain values and tensors): Lightning loads its
        # files with torch.load(weights_only=True), which refuses NumPy's generator state.
        tensors: dict[str, torch.Tensor] = {}
        state = {"rng": rng.capture(), "train": self._position.state_dict()}
        return {"state": codec.encode(state, path="weightslab", tensors=tensors, what="WeightslabCallback"),
                "tensors": tensors}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "state" in state_dict:  # (resuming from a Lightning checkpoint taken with this callback)
            state = codec.decode(state_dict["state"], state_dict["tensors"])
            self._pending_rng = state["rng"]
            self._position.load_state_dict(state["train"])

    # --- resuming -----------------------------------------------------------------------------
    def _checkpoint_for(self, ref: str) -> dict[str, Any]:
        """What :class:`WeightslabCheckpointIO` gives Lightning for ``ckpt_path=ref``."""
        trainer = self._trainer
        if self.system is None:  # validate / test / predict: the module's weights only
            return self._weights(ref)
        assert trainer is not None
        info = self.system.peek(ref)  # an explicit ref that names nothing raises here, before anything runs
        if info is None:
            log.warning("weightslab: ckpt_path=%r: no checkpoint in %s yet; training starts fresh", ref,
                        self.system.root)
        else:
            self._ref = ref
        # weightslab restores everything at on_fit_start; what Lightning loads from this is the module
        # as it is (its own tensors), no optimizer or scheduler state and no loop state.
        return {"pytorch-lightning_version": pl.__version__, "state_dict": trainer.lightning_module.state_dict(),
                "optimizer_states": [], "lr_schedulers": [], "weightslab": info.ref if info else None}

    def _weights(self, ref: str) -> dict[str, Any]:
        from ..portable import load  # (the root operations: only when a ref is tested, validated or predicted)

        state = load(ref, root=make_config(self.settings).root_log_dir)
        models = state["models"]
        if MODEL not in models:
            raise ConfigError(f"checkpoint {state['ref']} holds no model {MODEL!r} (it holds "
                              f"{', '.join(map(repr, models)) or 'none'}): it was not saved by WeightslabCallback")
        return {"pytorch-lightning_version": pl.__version__, "state_dict": models[MODEL], "weightslab": state["ref"]}

    def _restore_rng(self) -> None:
        state, self._pending_rng = self._pending_rng, None
        if state is not None:
            rng.restore(state)

    def _bind_loaders(self, trainer: pl.Trainer) -> None:
        """Give the train loaders Lightning built to the registered position (and a resumed one to
        them), then start Lightning's iteration over them again: it began when Lightning built them."""
        combined = trainer.fit_loop._combined_loader
        if combined is None:
            return
        loaders = list(combined.flattened)
        if [id(x) for x in loaders] == [id(x) for x in self._position.loaders]:
            return
        for problem in self._position.bind(loaders, epoch=trainer.current_epoch):
            self._warn(problem, "%s. A resumed run restarts that loader's epoch, so it is not exact.", problem)
        if self._pending_rng is not None and len(loaders) == 1 and isinstance(loaders[0], DataLoader):
            _before_next_iteration(loaders[0], self._restore_rng)
        fetcher = trainer.fit_loop._data_fetcher
        if fetcher is not None:
            iter(fetcher)

    # --- the state of the loops and of the other callbacks ---------------------------------------
    def _loop_state(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None
        callbacks = []
        for callback in trainer.callbacks:
            if callback is self:
                continue
            state = callback.state_dict()
            if state and self._encodable(state, f"callback {callback.state_key}"):
                callbacks.append({"key": callback.state_key, "state": state})
        state = {"epoch": trainer.current_epoch, "global_step": trainer.global_step,
                 "fit_loop": trainer.fit_loop.state_dict(), "callbacks": callbacks}
        datamodule = trainer.datamodule
        if datamodule is not None:
            saved = datamodule.state_dict()
            if saved and self._encodable(saved, f"datamodule {type(datamodule).__name__}"):
                state["datamodule"] = saved
        return state

    def _restore_loop_state(self, state: Mapping[str, Any]) -> None:
        trainer = self._trainer
        assert trainer is not None
        trainer.fit_loop.load_state_dict(dict(state["fit_loop"]))
        saved = {entry["key"]: entry["state"] for entry in state.get("callbacks", [])}
        for callback in trainer.callbacks:
            if callback is not self and callback.state_key in saved:
                callback.load_state_dict(copy.deepcopy(saved[callback.state_key]))
        if trainer.datamodule is not None and "datamodule" in state:
            trainer.datamodule.load_state_dict(state["datamodule"])

    def _warn_about_checkpoint_hooks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """State kept in Lightning's checkpoint dict by ``on_save_checkpoint`` (an EMA callback's
        averaged weights, a module's extras) is not in weightslab's checkpoints: say so, once."""
        owners = [f"callback {type(c).__name__}" for c in trainer.callbacks
                  if c is not self and is_overridden("on_save_checkpoint", c, Callback)]
        if is_overridden("on_save_checkpoint", pl_module, pl.LightningModule):
            owners.append(f"the LightningModule {type(pl_module).__name__}")
        if owners:
            self._warn("on_save_checkpoint", "%s keep%s state in Lightning's checkpoints through on_save_checkpoint, "
                       "which weightslab's checkpoints do not hold: a run resumed from a weightslab ref starts that "
                       "state afresh. Register it (wl.register_state, wl.register_model) to have it saved",
                       " and ".join(owners), "s" if len(owners) == 1 else "")

    def _encodable(self, value: Any, what: str) -> bool:
        try:
            codec.encode(value, path="check", tensors={}, what=what)
        except StateError as exc:
            self._warn(f"encode:{what}", "the state of %s is not saved by weightslab: %s", what, exc)
            return False
        return True

    # --- bookkeeping ----------------------------------------------------------------------------
    def _register(self, kind: str, name: str, obj: Any) -> None:
        getattr(registration, f"register_{kind}")(name, obj)
        self._registered.append((kind, name))

    def _finish(self, exception: BaseException | None) -> None:
        system, self.system = self.system, None
        if system is None:
            return
        try:
            if exception is None:
                system.close()  # the final checkpoint, every save durable; a failed save raises here
            else:
                try:  # no final checkpoint after an error: the state may be mid-step
                    system.__exit__(type(exception), exception, exception.__traceback__)
                except Exception as exc:  # noqa: BLE001 - the training's own error is the one to raise
                    log.error("weightslab: closing the checkpoint system after %s: %s", type(exception).__name__, exc)
        finally:
            self._position.unbind()
            for kind, name in reversed(self._registered):
                registration.unregister(name, kind=kind)
            self._registered.clear()
            self._pending_rng, self._ref, self._trainer = None, None, None

    def _warn(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)


class WeightslabCheckpointIO(CheckpointIO):
    """Lightning's checkpoint IO with weightslab refs: ``trainer.fit(ckpt_path="latest")``,
    ``"<hash>@<step>"``, ``"<name>@best"``, or the path of a weightslab manifest or experiment
    directory. :class:`WeightslabCallback` installs it around the IO the strategy has (Lightning's
    own ``.ckpt`` files still go through that one); passing it in ``Trainer(plugins=[...])`` works too.
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        self.checkpoint_io = checkpoint_io if checkpoint_io is not None else TorchCheckpointIO()
        self.callback: WeightslabCallback | None = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not is_weightslab_ref(path):
            return self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        if self.callback is None:
            raise ConfigError(f"ckpt_path={str(path)!r} is a weightslab checkpoint ref: add "
                              "weightslab.integrations.lightning.WeightslabCallback(...) to the Trainer's callbacks")
        return self.callback._checkpoint_for(str(path))

    def remove_checkpoint(self, path: Any) -> None:
        self.checkpoint_io.remove_checkpoint(path)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def is_weightslab_ref(path: Any) -> bool:
    """``path`` names a weightslab checkpoint (a ref, a manifest, an experiment directory), not a
    file of Lightning's own."""
    try:
        ref = parse_ref(path)
    except (ValueError, TypeError):
        return False
    if ref.path is None:
        return True
    where = Path(ref.path)
    return (where.is_file() and where.suffix == ".json") or (where.is_dir() and (where / "experiment.json").is_file())


class _TrainPosition:
    """The train loaders' position in the ledger (dataloader ``"train"``), registered before
    Lightning builds them.

    A resume restores the loops' counters before ``fit`` builds the train loader; this stand-in
    keeps a restored position until the loaders are bound, then hands it to them. For one loader
    its state is what ``wl.register_dataloader`` saves for a ``DataLoader``, so a checkpoint reads
    the same in a hand-written loop.
    """

    def __init__(self) -> None:
        self.loaders: list[Any] = []
        self.pending: Any = None  # a restored position, for loaders not bound yet

    def __iter__(self) -> Any:
        return iter(self.loaders[0]) if len(self.loaders) == 1 else iter(())

    def state_dict(self) -> Any:
        if not self.loaders:
            return self.pending
        states = [data.loader_state(loader) for loader in self.loaders]
        return states[0] if len(states) == 1 else {"kind": _MANY, "loaders": states}

    def load_state_dict(self, state: Any) -> None:
        if self.loaders:
            self._apply(state)
        else:
            self.pending = state

    def bind(self, loaders: list[Any], *, epoch: int) -> list[str]:
        """Make ``loaders`` resumable and put the pending position into them (else, after the first
        epoch, the epoch Lightning is in); returns what cannot be made resumable."""
        problems = []
        self.unbind(keep=loaders)
        for i, loader in enumerate(loaders):
            problem = data.make_resumable(loader, name=_indexed(TRAIN_DATA, i))
            if problem is not None:
                problems.append(problem)
        self.loaders = list(loaders)
        pending, self.pending = self.pending, None
        if pending is not None:
            problems += self._apply(pending)
        elif epoch > 0:  # a loader built after the first epoch (reloaded) starts where Lightning is
            for loader in loaders:
                data.restore_loader(loader, {"kind": "weightslab.loader", "epoch": epoch, "batches": 0})
        return problems

    def unbind(self, *, keep: list[Any] = ()) -> None:  # type: ignore[assignment]
        for loader in self.loaders:
            if not any(loader is k for k in keep):
                data.undo_resumable(loader)
        self.loaders = []

    def _apply(self, state: Any) -> list[str]:
        states = state["loaders"] if isinstance(state, Mapping) and state.get("kind") == _MANY else [state]
        if len(states) != len(self.loaders):
            return [f"the checkpoint holds the position of {len(states)} train loader(s), this run has "
                    f"{len(self.loaders)}"]
        return [f"train loader {i} cannot take back its saved position (no load_state_dict())"
                for i, (loader, saved) in enumerate(zip(self.loaders, states))
                if saved is not None and not data.restore_loader(loader, saved)]


def _before_next_iteration(loader: DataLoader, then: Any) -> None:
    """Call ``then()`` when the next iteration over ``loader`` fetches its first batch, before the
    loader draws anything (once)."""
    cls = type(loader)

    def __iter__(self: DataLoader) -> Any:
        if type(self) is once:
            self.__class__ = cls
        then()
        yield from cls.__iter__(self)

    once = type(cls.__name__, (cls,), {"__iter__": __iter__, "__module__": cls.__module__})
    loader.__class__ = once


def _validation_follows(trainer: pl.Trainer) -> bool:
    """Lightning runs validation after this training batch (decided by the number of batches; with
    a validation interval in time, when it runs cannot be known before: False)."""
    if getattr(trainer, "_val_check_time_interval", None) is not None:
        return False
    loop = trainer.fit_loop
    return bool(loop.epoch_loop._should_check_val_fx(loop._data_fetcher))


def _set_modes(module: torch.nn.Module, modes: Mapping[str, bool]) -> None:
    for name, m in module.named_modules():
        if name in modes:
            m.training = modes[name]


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The one-number metrics of ``trainer.callback_metrics`` (what ``self.log`` logged)."""
    out = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor):
            if value.numel() == 1 and not value.is_complex():
                out[name] = float(value.item())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
