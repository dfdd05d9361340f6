"""Errors raised by weightslab.

Every error derives from :class:`WeightslabError` *and* from the builtin a caller would naturally
catch (``KeyError`` for an unknown name, ``FileNotFoundError`` for a missing checkpoint, ...), so
existing ``except`` clauses keep working. Messages say what happened, what was expected and how to
fix it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

__all__ = [
    "WeightslabError",
    "NotRegisteredError",
    "RegistrationError",
    "HyperparamsError",
    "ConfigError",
    "InvalidStepError",
    "InvalidMetricsError",
    "StateError",
    "LossyCheckpointError",
    "NotARootError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "FormatVersionError",
    "ArchitectureMismatchError",
    "CheckpointSaveError",
    "ExperimentInUseError",
    "RankStateError",
]


class WeightslabError(Exception):
    """Base class of every error weightslab raises."""

    def __str__(self) -> str:
        # KeyError would otherwise wrap the message in quotes.
        return str(self.args[0]) if self.args else ""


class NotRegisteredError(WeightslabError, KeyError):
    """A name was looked up in the ledger but nothing is registered under it."""


class RegistrationError(WeightslabError, TypeError):
    """An object of the wrong kind was registered (for instance a dict as a model)."""


class HyperparamsError(WeightslabError, ValueError):
    """Hyperparameters that cannot be loaded, hashed or saved as plain data."""


class ConfigError(WeightslabError, ValueError):
    """An invalid checkpoint-system configuration, or one that conflicts with the running system."""


class InvalidStepError(WeightslabError, TypeError, ValueError):
    """A step label that is not a non-negative integer."""


class InvalidMetricsError(WeightslabError, TypeError, ValueError):
    """Metrics that are not a mapping of names to numbers."""


class StateError(WeightslabError, TypeError):
    """Training state that cannot be saved without pickle (an unsupported type at some path)."""


class CheckpointNotFoundError(WeightslabError, FileNotFoundError):
    """A checkpoint reference that resolves to nothing."""


class NotARootError(CheckpointNotFoundError):
    """A path or URL where no weightslab root is (no checkpoints/ or objects/ directory)."""


class CorruptCheckpointError(WeightslabError, ValueError):
    """Bytes on disk that do not match the digest recorded for them, or an unreadable manifest."""

    def __init__(self, message: str, *, path: Path | str | None = None, checkpoint: str | None = None):
        super().__init__(message)
        self.path = Path(path) if path is not None else None
        self.checkpoint = checkpoint


class FormatVersionError(WeightslabError, ValueError):
    """A manifest written by a newer (or unknown) on-disk format."""


class LossyCheckpointError(WeightslabError, ValueError):
    """A resume from a checkpoint of the lossy archive that was not accepted by name (``allow_lossy=True``).
    ``nearest`` is the ref of the nearest exact checkpoint of its experiment, if any."""

    def __init__(self, message: str, *, checkpoint: str, nearest: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.nearest = nearest


class ArchitectureMismatchError(WeightslabError, ValueError):
    """A checkpoint whose tensors do not fit the registered model."""

    def __init__(self, message: str, *, differences: Sequence[str] = ()):
        super().__init__(message)
        self.differences = list(differences)


class ExperimentInUseError(WeightslabError, RuntimeError):
    """Another live process writes the experiment this run would write into; ``holder`` says who
    (pid, host, run, since: a :class:`weightslab.storage.claim.Holder`) when its lock file tells."""

    def __init__(self, message: str, *, experiment: str, holder: Any = None):
        super().__init__(message)
        self.experiment = experiment
        self.holder = holder
        #: found at the start of a run (a resume, a fork, the first step boundary), which it stops;
        #: later, training goes on and only the saves into that experiment fail
        self.at_start = False


class CheckpointSaveError(WeightslabError, RuntimeError):
    """One or more saves failed; raised from ``wait()``, ``close()`` or, with ``strict=True``, at once."""

    def __init__(self, message: str, *, errors: Sequence[BaseException] = ()):
        super().__init__(message)
        self.errors = list(errors)


class RankStateError(WeightslabError, ValueError):
    """A checkpoint of a distributed job whose per-rank state cannot be given to this job's ranks
    (another world size, and the saved ranks' states differ)."""

    def __init__(self, message: str, *, unmappable: Sequence[str] = ()):
        super().__init__(message)
        self.unmappable = list(unmappable)
