"""An experiment: one architecture + hyperparameter identity, and where it came from.

``checkpoints/<hash>/experiment.json`` records what went into the hash (the architecture
description and the canonical hyperparameters), when the experiment was opened, and its parent:
the experiment and step it branched from and why (a configuration change, an architecture
change, a resume with changes). Parents link experiments into a lineage graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import CorruptCheckpointError, FormatVersionError
from .manifest import FORMAT_VERSION, seal, unseal

if TYPE_CHECKING:  # (fingerprint imports torch; reading a record must not)
    from ..fingerprint import Fingerprint

__all__ = ["ExperimentRecord", "Parent", "descendants"]

KIND = "weightslab.experiment"


@dataclass(frozen=True)
class Parent:
    experiment: str
    step: int
    reason: str  # "config_change", "model_change", "resume_with_changes", "fork", ...
    changes: tuple[str, ...] = ()  # human-readable differences from the parent

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"

    def to_json(self) -> dict[str, Any]:
        return {"ref": self.ref, "experiment": self.experiment, "step": self.step,
                "reason": self.reason, "changes": list(self.changes)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Parent":
        return cls(experiment=str(data["experiment"]), step=int(data["step"]), reason=str(data["reason"]),
                   changes=tuple(data.get("changes", ())))


@dataclass(frozen=True, kw_only=True)
class ExperimentRecord:
    hash: str
    created: str
    architecture_digest: str
    hyperparams_digest: str
    architecture: list[Any]
    hyperparams: Mapping[str, Any]  # canonical, as hashed
    excluded_keys: tuple[str, ...]
    parent: Parent | None = None
    branch: str | None = None  # a fork's branch, part of the hash (see fingerprint)
    versions: Mapping[str, str] = field(default_factory=dict)
    # Written beside the record for people, not read back: the module tree and the raw values.
    architecture_text: str = field(default="", compare=False)
    hyperparams_values: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def open(cls, fingerprint: Fingerprint, *, created: str, excluded_keys: Iterable[str],
             parent: Parent | None, versions: Mapping[str, str], architecture_text: str,
             hyperparams_values: Mapping[str, Any]) -> "ExperimentRecord":
        return cls(hash=fingerprint.hash, created=created,
                   architecture_digest=fingerprint.architecture_digest,
                   hyperparams_digest=fingerprint.hyperparams_digest,
                   architecture=fingerprint.architecture, hyperparams=fingerprint.hyperparams,
                   excluded_keys=tuple(sorted(excluded_keys)), parent=parent, branch=fingerprint.branch,
                   versions=versions,
                   architecture_text=architecture_text, hyperparams_values=hyperparams_values)

    def to_bytes(self) -> bytes:
        branch = {"branch": self.branch} if self.branch is not None else {}  # absent: as before forks existed
        return seal({
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "experiment": self.hash,
            "created": self.created,
            "parent": self.parent.to_json() if self.parent else None,
            "architecture_digest": self.architecture_digest,
            "hyperparams_digest": self.hyperparams_digest,
            "hyperparams": self.hyperparams,
            "excluded_keys": list(self.excluded_keys),
            "versions": dict(self.versions),
            "architecture": self.architecture,
            **branch,
        })

    @classmethod
    def from_bytes(cls, data: bytes, *, path: Path | str) -> "ExperimentRecord":
        advice = ("The experiment's checkpoints are unaffected (each manifest verifies on its own); only "
                  "its lineage record is lost. Restore the file from a backup, or delete it to let the "
                  "next run of this experiment write a new one without a parent.")
        try:
            body = unseal(data, path=path, kind=KIND)
            parent = body.get("parent")
            return cls(hash=str(body["experiment"]), created=str(body["created"]),
                       architecture_digest=str(body["architecture_digest"]),
                       hyperparams_digest=str(body["hyperparams_digest"]),
                       architecture=list(body["architecture"]), hyperparams=dict(body["hyperparams"]),
                       excluded_keys=tuple(body.get("excluded_keys", ())),
                       parent=Parent.from_json(parent) if parent else None,
                       branch=body.get("branch"), versions=dict(body.get("versions", {})))
        except FormatVersionError:
            raise
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"experiment record {exc}. {advice}", path=path) from None
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"experiment record {path} is missing a field or has a bad value "
                                         f"({type(exc).__name__}: {exc}). {advice}", path=path) from None


def descendants(root: str, parents: Mapping[str, str | None]) -> set[str]:
    """``root`` and every experiment whose chain of parents leads to it.

    ``parents`` maps each experiment hash to its parent's hash (or None). Cycles (an experiment
    that changed back to an earlier configuration) are harmless.
    """
    children: dict[str, list[str]] = {}
    for child, parent in parents.items():
        if parent is not None:
            children.setdefault(parent, []).append(child)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
