"""Comparing two checkpoints: their hyperparameters, their architectures and how much each model
tensor moved (relative L2 norm of the difference).

One function for the two surfaces that show it, ``weightslab diff`` and the web page
(:mod:`weightslab.ui`), so that they never disagree. It lives apart from ``commands.py`` because the
page imports it and the command line starts the page: either way round through ``commands.py``
would be an import circle. Reading the hyperparameters and the tensors needs torch (the codec and
the fingerprint import it); it is imported when a comparison runs, never when this module is
imported, so the listing commands and the page start without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..storage.manager import CheckpointManager
    from ..storage.manifest import Manifest

__all__ = ["Comparison", "compare", "hyperparams_of", "tensor_changes"]


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """What differs from checkpoint ``a`` to checkpoint ``b``."""

    a: str  # "<hash>@<step>"
    b: str
    hyperparams: tuple[str, ...]  # one readable line per changed key ("lr: 0.1 -> 0.01")
    architecture: tuple[str, ...]  # one line per changed module
    tensors: tuple[tuple[str, float | None], ...]  # (key, relative L2 of b - a; None: shapes differ), by key
    only_in_one: tuple[str, ...]  # model tensors only one of them holds

    def ranked(self) -> list[tuple[str, float | None]]:
        """The tensors, those that changed most first (a changed shape before any number)."""
        return sorted(self.tensors, key=lambda kv: -math.inf if kv[1] is None else -kv[1])

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "hyperparams": list(self.hyperparams),
                "architecture": list(self.architecture),
                "tensors": [{"key": k, "relative_l2": v} for k, v in self.tensors]}


def hyperparams_of(manifest: Manifest) -> dict[str, Any]:
    """The hyperparameters a checkpoint holds, decoded (imports torch: the codec)."""
    from .. import codec
    return codec.decode(manifest.state.get("hyperparams", {}), {})


def tensor_changes(manager: CheckpointManager, a: Manifest, b: Manifest) -> list[tuple[str, float | None]]:
    """(key, relative L2 norm of the difference) for the model tensors both hold (None: shapes differ).
    Every byte is read verified; identical blobs are not even compared."""
    import torch

    from ..tensors import load_tensors

    keys = sorted(k for k in a.tensors if k.startswith("models/") and k in b.tensors)
    ta, tb = load_tensors(manager, a), load_tensors(manager, b)
    out: list[tuple[str, float | None]] = []
    for key in keys:
        x, y = ta[key], tb[key]
        if x.shape != y.shape:
            out.append((key, None))
            continue
        if a.tensors[key].content == b.tensors[key].content:
            out.append((key, 0.0))
            continue
        x64, y64 = x.to(torch.float64), y.to(torch.float64)
        scale = float(torch.linalg.vector_norm(x64))
        diff = float(torch.linalg.vector_norm(y64 - x64))
        out.append((key, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)))
    return out


def compare(manager: CheckpointManager, a: Manifest, b: Manifest) -> Comparison:
    """The differences between two committed checkpoints of ``manager``'s root (imports torch)."""
    from ..fingerprint import diff_architecture, diff_hyperparams

    ra, rb = manager.read_experiment(a.experiment), manager.read_experiment(b.experiment)
    hp = diff_hyperparams(hyperparams_of(a), hyperparams_of(b))
    arch = diff_architecture(ra.architecture, rb.architecture) if ra and rb else []
    only = sorted(k for k in set(a.tensors) ^ set(b.tensors) if k.startswith("models/"))
    return Comparison(a=a.ref, b=b.ref, hyperparams=tuple(hp), architecture=tuple(arch),
                      tensors=tuple(tensor_changes(manager, a, b)), only_in_one=tuple(only))
