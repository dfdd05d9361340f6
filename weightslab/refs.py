"""Checkpoint references, as a person types them.

``latest``                  the newest checkpoint of the current experiment's lineage
``<hash>@<step>``           one checkpoint (a unique prefix of the hash, 4+ characters, is enough)
``<hash>@latest``, ``<hash>``   the newest checkpoint of one experiment
a path                      a manifest file, or an experiment directory (its newest checkpoint)

Parsing is pure; :class:`~weightslab.manager.CheckpointManager` resolves a ref against a root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ref", "parse_ref"]

_REF_RE = re.compile(r"(?P<exp>[0-9a-f]{4,16})(?:@(?P<step>[0-9]+|latest))?")


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of ``latest``, ``experiment`` or ``path`` describes it."""

    text: str
    latest: bool = False  # the bare word "latest"
    experiment: str | None = None  # hash or hash prefix
    step: int | None = None  # None: the newest of the experiment
    path: Path | None = None


def parse_ref(ref: str | os.PathLike[str]) -> Ref:
    if isinstance(ref, os.PathLike):
        return Ref(text=os.fspath(ref), path=Path(ref))
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"a checkpoint ref must be a non-empty string or a path, got {ref!r}")
    if ref == "latest":
        return Ref(text=ref, latest=True)
    m = _REF_RE.fullmatch(ref)
    if m and not os.path.exists(ref):
        step = m.group("step")
        return Ref(text=ref, experiment=m.group("exp"),
                   step=None if step in (None, "latest") else int(step))
    if "@" in ref and not os.path.exists(ref):
        raise ValueError(f"cannot read checkpoint ref {ref!r}: expected 'latest', '<hash>@<step>', "
                         "'<hash>@latest' or a path to a checkpoint manifest")
    return Ref(text=ref, path=Path(ref))
