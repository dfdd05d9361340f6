"""An experiment: one architecture + hyperparameter identity, and where it came from.

``checkpoints/<hash>/experiment.json`` records what went into the hash (the architecture
description and the canonical hyperparameters), when the experiment was opened, and its parent:
the experiment and step it branched from and why (a configuration change, an architecture
change, a resume with changes). Parents link experiments into a lineage graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from ..errors import CorruptCheckpointError, FormatVersionError
from .identifiers import check_experiment, check_step, is_experiment_hash
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
        """Read what :meth:`to_json` wrote, checked: the parent's experiment and step build refs and paths."""
        if not isinstance(data, Mapping):
            raise ValueError(f"parent is {type(data).__name__}, not a mapping")
        changes = data.get("changes", [])
        if not isinstance(changes, list) or not all(isinstance(c, str) for c in changes):
            raise ValueError("the parent's changes are not a list of strings")
        step = data["step"]
        if isinstance(step, str) and re.fullmatch(r"[0-9]{1,19}", step):  # (read as before: "7" is step 7)
            step = int(step)
        return cls(experiment=check_experiment(data["experiment"], "the parent's experiment"),
                   step=check_step(step, "the parent's step"), reason=_text(data["reason"], "reason"),
                   changes=tuple(changes))


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
            excluded = body.get("excluded_keys", [])
            if not isinstance(excluded, list) or not all(isinstance(k, str) for k in excluded):
                raise ValueError("excluded_keys is not a list of strings")
            branch = body.get("branch")
            record = cls(hash=check_experiment(body["experiment"]), created=_text(body["created"], "created"),
                         architecture_digest=_text(body["architecture_digest"], "architecture_digest"),
                         hyperparams_digest=_text(body["hyperparams_digest"], "hyperparams_digest"),
                         architecture=_typed(body["architecture"], list, "architecture"),
                         hyperparams=dict(_typed(body["hyperparams"], dict, "hyperparams")),
                         excluded_keys=tuple(excluded),
                         parent=Parent.from_json(parent) if parent is not None else None,
                         branch=_text(branch, "branch") if branch is not None else None,
                         versions=dict(_typed(body.get("versions", {}), dict, "versions")))
        except FormatVersionError:
            raise
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"experiment record {exc}. {advice}", path=path) from None
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            raise CorruptCheckpointError(f"experiment record {path} is missing a field or has a bad value "
                                         f"({type(exc).__name__}: {exc}). {advice}", path=path) from None
        directory = Path(path).parent.name
        if is_experiment_hash(directory) and directory != record.hash:
            raise CorruptCheckpointError(f"experiment record {path} is the record of experiment {record.hash}, not of "
                                         f"{directory}, whose directory it is in. {advice}", path=path)
        return record


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a string")
    return value


def _typed(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{what} is {type(value).__name__}, not a {kind.__name__}")
    return value


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
