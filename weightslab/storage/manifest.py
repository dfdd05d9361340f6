"""The manifest: one committed checkpoint, as a single self-verifying JSON document.

A manifest names every tensor of the checkpoint (dtype, shape, and the blob holding its bytes with
that blob's digest) and holds everything else as JSON: step, reasons, metrics and the encoded state
tree. Its own ``digest`` covers the rest of the document, so a flipped bit anywhere in it is caught.
Writing the manifest (atomically) is the commit: a checkpoint without one does not exist.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..canonical import TAG, canonical_json
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from .store import BlobRef

__all__ = ["FORMAT_VERSION", "DISTRIBUTED_FORMAT_VERSION", "READABLE_VERSIONS", "Manifest", "TensorEntry", "seal", "unseal"]

#: Version 2 added encoded blobs (zstd, XOR deltas with a nested ``base``) to tensor entries;
#: version 1 documents (the foundation's) read unchanged.
FORMAT_VERSION = 2
#: Version 3 added what a distributed job writes: every rank's own state (the state tree's
#: ``ranks``, see :mod:`weightslab.distributed.ranks`) and sharded tensors written by every rank with
#: torch.distributed.checkpoint (``sharded``: their directory, dtypes and global shapes, and the
#: size and digest of each file). Only manifests that hold them are written as version 3,
#: so that an older weightslab refuses them (asking for an upgrade) rather than giving every rank
#: rank 0's random state; every other document stays version 2.
DISTRIBUTED_FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
KIND = "weightslab.checkpoint"

log = logging.getLogger(__name__)


def _digest(body: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(body: dict[str, Any]) -> bytes:
    """Serialize a JSON document with a ``digest`` field covering the rest of it."""
    body = dict(body)
    body.pop("digest", None)
    body["digest"] = _digest(body)
    return json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False).encode()


def unseal(data: bytes, *, path: Path | str, kind: str) -> dict[str, Any]:
    """Parse a sealed document of ``kind``; raise if it is damaged or of an unknown format version."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({exc}); it is damaged", path=path) from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise CorruptCheckpointError(f"{path} is not a {kind} document", path=path)
    version = body.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{path} has format_version {version!r}, but this weightslab reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade weightslab (pip install -U weightslab) to read it")
    recorded = body.pop("digest", None)
    if recorded != _digest(body):
        raise CorruptCheckpointError(f"{path} does not match its digest; it is damaged", path=path)
    return body


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    blob: BlobRef

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), **self.blob.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorEntry":
        return cls(dtype=str(data["dtype"]), shape=tuple(int(s) for s in data["shape"]),
                   blob=BlobRef.from_json(data))


@dataclass(frozen=True, kw_only=True)
class Manifest:
    experiment: str
    step: int
    created: str  # ISO-8601, UTC
    created_ns: int  # for ordering: commit time in ns since the epoch
    reasons: tuple[str, ...]  # why it was taken: "step", "config_change", "model_change", ...
    changes: tuple[Mapping[str, Any], ...] = ()  # details of the changes that triggered it
    metrics: Mapping[str, Any] = field(default_factory=dict)  # encoded with the codec (NaN-safe)
    run: str = ""  # id of the process run that wrote it
    resumed_from: str | None = None  # the ref this run resumed from, if any
    tensors: Mapping[str, TensorEntry] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)  # codec tree referencing ``tensors``
    versions: Mapping[str, str] = field(default_factory=dict)  # weightslab / torch that wrote it

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else "manual"

    @property
    def total_bytes(self) -> int:
        return sum(t.blob.nbytes for t in self.tensors.values())

    def numeric_metrics(self) -> dict[str, float]:
        """The metrics as floats (non-finite ones are tagged by the codec: read without it, and
        without torch); a value that is not a number is left out, with a warning naming it."""
        out = {}
        for name, value in self.metrics.items():
            if isinstance(value, Mapping) and value.get(TAG) == "float":
                value = value.get("value", "nan")
            try:
                out[str(name)] = float(value)
            except (TypeError, ValueError):
                log.warning("checkpoint %s: metric %r is %r, not a number; ignored", self.ref, name, value)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": DISTRIBUTED_FORMAT_VERSION if {"ranks", "sharded"} & set(self.state) else FORMAT_VERSION,
            "kind": KIND,
            "experiment": self.experiment,
            "step": self.step,
            "created": self.created,
            "created_ns": self.created_ns,
            "reasons": list(self.reasons),
            "changes": list(self.changes),
            "metrics": dict(self.metrics),
            "run": self.run,
            "resumed_from": self.resumed_from,
            "versions": dict(self.versions),
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "state": self.state,
        }

    def to_bytes(self) -> bytes:
        return seal(self.to_json())

    @classmethod
    def from_bytes(cls, data: bytes, *, path: Path | str = "<manifest>") -> "Manifest":
        try:
            body = unseal(data, path=path, kind=KIND)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"checkpoint manifest {exc}. Resume an earlier checkpoint, or run "
                                         "wl.verify() to list every damaged one.", path=path) from None
        try:
            return cls(
                experiment=str(body["experiment"]),
                step=int(body["step"]),
                created=str(body["created"]),
                created_ns=int(body["created_ns"]),
                reasons=tuple(body.get("reasons", ())),
                changes=tuple(body.get("changes", ())),
                metrics=dict(body.get("metrics", {})),
                run=str(body.get("run", "")),
                resumed_from=body.get("resumed_from"),
                versions=dict(body.get("versions", {})),
                tensors={k: TensorEntry.from_json(v) for k, v in body.get("tensors", {}).items()},
                state=body.get("state", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"manifest {path} is missing a field or has a bad value ({type(exc).__name__}: {exc}); it was "
                "not written by this version of weightslab or it was edited. Resume an earlier checkpoint.",
                path=path) from None

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint manifest at {path}; it may have been deleted. Resume 'latest', or list the "
                f"committed checkpoints of the experiment in {Path(path).parent}") from None
        return cls.from_bytes(data, path=path)
