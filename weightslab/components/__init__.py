"""The names of the original weightslab write-up, unchanged.

``from weightslab.components import get_checkpoint_system, checkpoint_on_step, ...`` keeps working;
these are the same objects as at ``weightslab`` top level.
"""

from ..fingerprint import ExperimentHashGenerator
from ..process import (checkpoint_on_config_change, checkpoint_on_model_change, checkpoint_on_state_change,
                       checkpoint_on_step, get_checkpoint_system)
from ..storage.manager import CheckpointManager
from ..system import AutomaticCheckpointSystem

__all__ = [
    "get_checkpoint_system",
    "checkpoint_on_step",
    "checkpoint_on_model_change",
    "checkpoint_on_config_change",
    "checkpoint_on_state_change",
    "ExperimentHashGenerator",
    "CheckpointManager",
    "AutomaticCheckpointSystem",
]
