"""weightslab: automatic, verified, bit-exact checkpointing for PyTorch training.

Register the objects of a run once; the checkpoint system saves them in the background every N
steps and whenever the architecture, the hyperparameters or the model state change, files every
checkpoint under its experiment (a hash of architecture + hyperparameters), and resumes bit for bit::

    import weightslab as wl

    system = wl.get_checkpoint_system(root_log_dir="./experiments", checkpoint_frequency=100)
    wl.register_model("model", model)
    wl.register_optimizer("optimizer", optimizer)
    wl.register_hyperparams("config", "config.yaml")
    start = system.resume()
    for step in range(start + 1, num_steps + 1):
        loss = train_step()
        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
    system.close()
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (ArchitectureMismatchError, CheckpointNotFoundError, CheckpointSaveError, ConfigError,
                     CorruptCheckpointError, ExperimentInUseError, FormatVersionError, HyperparamsError,
                     InvalidMetricsError, InvalidStepError, LossyCheckpointError, NotRegisteredError, RankStateError,
                     RegistrationError, StateError, WeightslabError)

# The rest is imported on first use: the command line (weightslab ls) reads a root without
# importing torch, which costs more than a listing of 10,000 checkpoints. (The first registration
# starts the checkpoint system: see weightslab.registration.)
_LAZY = {
    "ExperimentHashGenerator": "fingerprint",
    **dict.fromkeys(("get_dataloader", "get_hyperparams", "get_model", "get_optimizer", "get_scaler",
                     "get_scheduler", "get_state", "list_registered", "register_dataloader", "register_hyperparams",
                     "register_model", "register_optimizer", "register_scaler", "register_scheduler",
                     "register_state", "unregister"), "registration"),
    "export": "portable", "load": "portable",
    **dict.fromkeys(("gc", "name_experiment", "prune", "verify"), "maintenance"),
    "CheckpointManager": "storage.manager", "VerifyReport": "storage.manager", "Archive": "storage.archive",
    **dict.fromkeys(("KeepBest", "KeepChanges", "KeepEvery", "KeepLast", "Retention"), "retention"),
    "AutomaticCheckpointSystem": "system", "CheckpointConfig": "config", "CheckpointInfo": "restorer",
    **dict.fromkeys(("checkpoint_on_config_change", "checkpoint_on_model_change", "checkpoint_on_state_change",
                     "checkpoint_on_step", "fork", "get_checkpoint_system", "on", "off"), "process"),
    "CallbackError": "events",
}


def __getattr__(name: str) -> Any:
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is None:
        # A submodule used as an attribute (wl.data.ResumableSampler), or asked for by the import
        # system itself (`from . import hyperparams` inside the package): import just that.
        if name.startswith("_") or importlib.util.find_spec(f"{__name__}.{name}") is None:
            raise AttributeError(f"module 'weightslab' has no attribute {name!r}")
        return importlib.import_module(f"{__name__}.{name}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from .fingerprint import ExperimentHashGenerator
    from .config import CheckpointConfig
    from .events import CallbackError
    from .process import (checkpoint_on_config_change, checkpoint_on_model_change, checkpoint_on_state_change,
                          checkpoint_on_step, fork, get_checkpoint_system, off, on)
    from .registration import (get_dataloader, get_hyperparams, get_model, get_optimizer, get_scaler, get_scheduler,
                               get_state, list_registered, register_dataloader, register_hyperparams, register_model,
                               register_optimizer, register_scaler, register_scheduler, register_state, unregister)
    from .restorer import CheckpointInfo
    from .maintenance import gc, name_experiment, prune, verify
    from .storage.manager import CheckpointManager, VerifyReport
    from .storage.archive import Archive
    from .portable import export, load
    from .retention import KeepBest, KeepChanges, KeepEvery, KeepLast, Retention
    from .system import AutomaticCheckpointSystem

__all__ = [
    "__version__",
    # the ledger
    "register_model", "register_optimizer", "register_scheduler", "register_hyperparams",
    "register_dataloader", "register_scaler", "register_state",
    "get_model", "get_optimizer", "get_scheduler", "get_hyperparams", "get_dataloader", "get_scaler",
    "get_state", "unregister", "list_registered",
    # the checkpoint system
    "get_checkpoint_system", "checkpoint_on_step", "checkpoint_on_model_change", "checkpoint_on_config_change",
    "checkpoint_on_state_change", "fork", "AutomaticCheckpointSystem", "CheckpointConfig", "CheckpointInfo",
    "CheckpointManager", "ExperimentHashGenerator",
    # events of the checkpoint system (weightslab.events)
    "on", "off", "CallbackError",
    # looking after a root
    "verify", "prune", "gc", "export", "load", "name_experiment", "VerifyReport", "Retention", "KeepLast", "KeepEvery", "KeepBest", "KeepChanges",
    "Archive",
    # errors
    "WeightslabError", "NotRegisteredError", "RegistrationError", "HyperparamsError", "ConfigError",
    "InvalidStepError", "InvalidMetricsError", "StateError", "CheckpointNotFoundError",
    "CorruptCheckpointError", "FormatVersionError", "ArchitectureMismatchError", "CheckpointSaveError",
    "ExperimentInUseError", "RankStateError", "LossyCheckpointError",
]
