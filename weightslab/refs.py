"""Checkpoint references, as a person types them.

``latest``                      the newest checkpoint of the current experiment's lineage
``<hash>@<step>``               one checkpoint (a unique prefix of the hash, 4+ characters, is enough)
``<hash>@latest``, ``<hash>``   the newest checkpoint of one experiment
``<hash>@best``                 its best checkpoint by a metric: ``@best:<metric>`` (lowest wins),
                                ``@best:<metric>:max`` (highest wins); bare ``@best`` takes the
                                retention metric, or the only metric the checkpoints record
``<name>@<step>``, ``<name>@latest``, ``<name>@best``   the same, for an experiment given a human
                                name (``wl.fork``, ``wl.name_experiment``); a bare word is a path
a path                          a manifest file, or an experiment directory (its newest checkpoint)

Parsing reads no checkpoint: :class:`~weightslab.storage.manager.CheckpointManager` resolves a ref against a
root. It asks the filesystem one question only, whether a file of that name exists (relative to the
working directory): a person who names an existing file means that file, even when its name reads as
a ref (``abcd``, ``run@3``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Ref", "parse_ref", "check_name", "short", "short_ref", "NAME_RULE"]

_HASH_PREFIX = r"[0-9a-f]{4,16}"
_NAME = r"[A-Za-z][A-Za-z0-9._-]{0,63}"
_REF_RE = re.compile(rf"(?P<exp>{_HASH_PREFIX}|{_NAME})"
                     r"(?:@(?P<sel>[0-9]+|latest|best(?::(?P<metric>[^:@\s]+)(?::(?P<mode>min|max))?)?))?")
_RESERVED = {"latest", "best"}
NAME_RULE = ("a letter, then up to 63 letters, digits, '.', '_' or '-', not 'latest' or 'best', and not a "
             "string of 4 to 16 hexadecimal digits (which reads as a hash)")


@dataclass(frozen=True)
class Ref:
    """A parsed reference. Exactly one of ``latest``, ``experiment`` or ``path`` describes it."""

    text: str
    latest: bool = False  # the bare word "latest"
    experiment: str | None = None  # hash, hash prefix, or name
    step: int | None = None  # None: the newest of the experiment (or its best, with ``best``)
    path: Path | None = None
    best: bool = False  # "@best": the best checkpoint by ``metric``
    metric: str | None = None  # None with ``best``: decided by the resolver
    mode: str = "min"

    @property
    def by_name(self) -> bool:
        """The experiment part is a human name, not a hash prefix."""
        return self.experiment is not None and re.fullmatch(_HASH_PREFIX, self.experiment) is None


def check_name(name: object) -> str:
    """``name`` if it can name an experiment, else ValueError saying what a name may be."""
    if not isinstance(name, str) or name in _RESERVED or re.fullmatch(_NAME, name) is None \
            or re.fullmatch(_HASH_PREFIX, name) is not None:
        raise ValueError(f"{name!r} cannot name an experiment: a name is {NAME_RULE}")
    return name


def parse_ref(ref: str | os.PathLike[str]) -> Ref:
    if isinstance(ref, os.PathLike):
        return Ref(text=os.fspath(ref), path=Path(ref))
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"a checkpoint ref must be a non-empty string or a path, got {ref!r}")
    if ref == "latest":
        return Ref(text=ref, latest=True)
    m = _REF_RE.fullmatch(ref)
    # A name needs its "@": a bare word that is not a hash prefix stays a path ("model.json").
    named_without_selector = m is not None and m.group("sel") is None and \
        re.fullmatch(_HASH_PREFIX, m.group("exp")) is None
    if m and m.group("exp") not in _RESERVED and not named_without_selector and not os.path.exists(ref):
        sel = m.group("sel")
        if sel is not None and sel.startswith("best"):
            return Ref(text=ref, experiment=m.group("exp"), best=True, metric=m.group("metric"),
                       mode=m.group("mode") or "min")
        return Ref(text=ref, experiment=m.group("exp"), step=None if sel in (None, "latest") else int(sel))
    if "@" in ref and not os.path.exists(ref):
        raise ValueError(f"cannot read checkpoint ref {ref!r}: expected 'latest', '<hash or name>@<step>', "
                         "'<hash or name>@latest', '<hash or name>@best[:<metric>[:max]]' or a path to a "
                         "checkpoint manifest")
    return Ref(text=ref, path=Path(ref))


def short(exp_hash: str | None) -> str:
    """An experiment hash as people read it: its first 8 characters (``"-"`` for none)."""
    return exp_hash[:8] if exp_hash else "-"


def short_ref(ref: str | None) -> str:
    """``<hash>@<step>`` with the hash shortened (``"-"`` for none)."""
    if not ref:
        return "-"
    exp, _, step = ref.partition("@")
    return f"{exp[:8]}@{step}" if step else exp[:8]
