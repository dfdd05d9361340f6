"""The process-wide random number generators a training run draws from.

Python's ``random``, NumPy's legacy global generator, torch's CPU generator and every CUDA
device's generator. Restoring them is the last step of a resume: anything restored before them
(a model's ``load_state_dict``, a sampler) may draw random numbers.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Mapping

import numpy as np
import torch

__all__ = ["capture", "restore"]

log = logging.getLogger(__name__)


def capture() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    # Asking an uninitialised CUDA for its state would initialise it; a run that never touched
    # the GPU has no CUDA randomness to save.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: Mapping[str, Any]) -> None:
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        np.random.set_state(tuple(state["numpy"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda:
        if not torch.cuda.is_available():
            log.warning("the checkpoint holds CUDA random states but CUDA is not available here; "
                        "GPU random draws will differ from the original run")
        elif torch.cuda.device_count() != len(cuda):
            log.warning("the checkpoint holds random states for %d CUDA devices but %d are visible; "
                        "restoring the first %d", len(cuda), torch.cuda.device_count(),
                        min(len(cuda), torch.cuda.device_count()))
            for i, s in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(s, i)
        else:
            torch.cuda.set_rng_state_all(cuda)
