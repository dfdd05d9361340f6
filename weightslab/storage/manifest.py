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
from typing import Any, Iterator, Mapping, Union

from ..canonical import TAG, canonical_json
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from .identifiers import (check_count, check_dtype, check_experiment, check_shape, check_step, is_experiment_hash,
                          shape_nbytes)
from .layout import Layout
from .shardfiles import ShardedFiles
from .store import BlobRef

__all__ = ["FORMAT_VERSION", "DISTRIBUTED_FORMAT_VERSION", "ARCHIVE_FORMAT_VERSION", "READABLE_VERSIONS", "MAX_CHAIN",
           "Manifest", "TensorEntry", "ArchivedEntry", "Link", "Entry", "seal", "unseal"]

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
#: Version 4 added the lossy archive tier (:mod:`weightslab.storage.archive`): tensors stored as a
#: chain of lossy links on an exact anchor (:class:`ArchivedEntry`) and the manifest's ``exact: false``
#: and ``archive`` record. Only demoted checkpoints are written as version 4, so that an older
#: weightslab refuses them (asking for an upgrade) rather than reading a codec's payload as weights.
ARCHIVE_FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
#: The most lossy links a tensor's chain may hold (what a reader decodes: bounded, whatever a
#: manifest claims; :class:`~weightslab.storage.archive.Archive` allows at most this).
MAX_CHAIN = 64
KIND = "weightslab.checkpoint"

log = logging.getLogger(__name__)


def _digest(body: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()


def seal(body: dict[str, Any], *, compact: bool = False) -> bytes:
    """Serialize a JSON document with a ``digest`` field covering the rest of it (indented for a
    person to read, or ``compact``: the digest covers the canonical form, whatever the layout)."""
    body = dict(body)
    body.pop("digest", None)
    body["digest"] = _digest(body)
    if compact:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    return json.dumps(body, indent=1, ensure_ascii=False, allow_nan=False).encode()


def unseal(data: bytes, *, path: Path | str, kind: str) -> dict[str, Any]:
    """Parse a sealed document of ``kind``; raise if it is damaged or of an unknown format version."""
    try:
        body = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({exc}); it is damaged", path=path) from None
    except RecursionError:  # (JSON nested deeper than Python's recursion limit: never written by weightslab)
        raise CorruptCheckpointError(f"{path} is JSON nested too deep to read; it is damaged", path=path) from None
    if not isinstance(body, dict) or body.get("kind") != kind:
        raise CorruptCheckpointError(f"{path} is not a {kind} document", path=path)
    version = body.get("format_version")
    if version not in READABLE_VERSIONS:
        raise FormatVersionError(
            f"{path} has format_version {version!r}, but this weightslab reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade weightslab (pip install -U weightslab) to read it")
    recorded = body.pop("digest", None)
    try:
        expected = _digest(body)
    except (ValueError, TypeError, RecursionError) as exc:  # nested too deep, a NaN: not what seal() writes
        raise CorruptCheckpointError(f"{path} cannot be digested ({type(exc).__name__}); it is damaged",
                                     path=path) from None
    if recorded != expected:
        raise CorruptCheckpointError(f"{path} does not match its digest; it is damaged", path=path)
    return body


@dataclass(frozen=True)
class TensorEntry:
    """A tensor stored exactly: its bytes are the blob's (decoded) bytes."""

    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    blob: BlobRef

    exact = True

    def blobs(self) -> Iterator[BlobRef]:
        """Every blob reading this tensor needs (what gc must keep, a remote root must fetch)."""
        return self.blob.chain()

    @property
    def nbytes(self) -> int:
        """The stored bytes of its own blob."""
        return self.blob.nbytes

    @property
    def size(self) -> int:
        """The tensor's bytes, as read."""
        return self.blob.size

    @property
    def content(self) -> str:
        """Names what reading it gives: equal for two entries that read the same bytes."""
        return self.blob.digest

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), **self.blob.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TensorEntry":
        """Every field checked (ValueError saying which is wrong): the dtype is a known one and the
        shape's bytes are the blob's raw size, so reading it allocates what the blob holds."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a tensor record is {type(data).__name__}, not a mapping")
        if "dtype" not in data or "shape" not in data:
            raise ValueError("a tensor record lacks its dtype or shape")
        dtype, shape = check_dtype(data["dtype"]), check_shape(data["shape"])
        blob = BlobRef.from_json(data)
        if shape_nbytes(dtype, shape) != blob.size:
            raise ValueError(f"shape {list(shape)} of {dtype} holds {shape_nbytes(dtype, shape):,} bytes, but its blob "
                             f"holds {blob.size:,}")
        return cls(dtype=dtype, shape=shape, blob=blob)


@dataclass(frozen=True)
class Link:
    """One lossy step of an archived tensor's chain: a codec's payload (a blob of bytes) that turns
    the decoded previous value into the next (:func:`weightslab.storage.lossy.decode`)."""

    params: Mapping[str, Any]  # the codec and its parameters (``{"codec": "lc", "bits": 3}``), as written
    blob: BlobRef  # the payload, stored raw: a codec's output is already entropy-coded

    def to_json(self) -> dict[str, Any]:
        return {"params": dict(self.params), "blob": self.blob.to_json()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Link":
        data = _mapping(data, "a lossy link")
        params = _mapping(data["params"], "a lossy link's params")
        if not isinstance(params.get("codec"), str):
            raise ValueError(f"a lossy link's params {dict(params)!r} name no codec")
        return cls(params=dict(params), blob=BlobRef.from_json(_mapping(data["blob"], "a lossy link's blob")))


@dataclass(frozen=True)
class ArchivedEntry:
    """A tensor of the lossy archive tier: an exact ``anchor`` (the bytes of the tensor in the exact
    checkpoint its chain starts from) and the ``links`` that lead from it to this checkpoint's value,
    each encoded against the decoded value before it (closed loop: errors do not accumulate).
    ``error`` is what the last link measured against the exact value it replaced."""

    dtype: str
    shape: tuple[int, ...]
    anchor: BlobRef
    links: tuple[Link, ...]
    max_abs: float  # max |decoded - exact| over the tensor's elements
    rel_l2: float  # ||decoded - exact|| / ||exact||

    exact = False

    def blobs(self) -> Iterator[BlobRef]:
        """Every blob reading this tensor needs: the anchor (and its delta bases) and every link."""
        yield from self.anchor.chain()
        for link in self.links:
            yield from link.blob.chain()

    @property
    def nbytes(self) -> int:
        """The stored bytes of its own payload (the last link; the anchor and earlier links are shared)."""
        return self.links[-1].blob.nbytes

    @property
    def size(self) -> int:
        """The tensor's bytes, as read (decoded)."""
        return self.anchor.size

    @property
    def content(self) -> str:
        """Names what reading it gives: the anchor and every link (a decode is deterministic)."""
        chain = " ".join([self.anchor.digest, *(link.blob.digest for link in self.links)])
        return "chain:" + hashlib.sha256(chain.encode()).hexdigest()

    @property
    def codec(self) -> str:
        return str(self.links[-1].params["codec"])

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "exact": False, "anchor": self.anchor.to_json(),
                "links": [link.to_json() for link in self.links],
                "error": {"max_abs": self.max_abs, "rel_l2": self.rel_l2}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ArchivedEntry":
        """Every field checked (ValueError saying which is wrong): the anchor holds the tensor's
        bytes, the chain is 1 to :data:`MAX_CHAIN` links long, the errors are finite and not negative."""
        dtype, shape = check_dtype(data["dtype"]), check_shape(data["shape"])
        anchor = BlobRef.from_json(_mapping(data["anchor"], "an archived tensor's anchor"))
        if shape_nbytes(dtype, shape) != anchor.size:
            raise ValueError(f"shape {list(shape)} of {dtype} holds {shape_nbytes(dtype, shape):,} bytes, but its "
                             f"anchor holds {anchor.size:,}")
        links = _list(data["links"], "an archived tensor's links")
        if not 1 <= len(links) <= MAX_CHAIN:
            raise ValueError(f"an archived tensor has {len(links)} lossy links, not 1 to {MAX_CHAIN}")
        error = _mapping(data["error"], "an archived tensor's error")
        max_abs, rel_l2 = (_error(error.get(k), k) for k in ("max_abs", "rel_l2"))
        return cls(dtype=dtype, shape=shape, anchor=anchor, links=tuple(Link.from_json(x) for x in links),
                   max_abs=max_abs, rel_l2=rel_l2)


#: A tensor of a checkpoint, exact or archived.
Entry = Union[TensorEntry, ArchivedEntry]


def _entry(data: Any) -> Entry:
    if isinstance(data, Mapping) and data.get("exact", True) is False:
        return ArchivedEntry.from_json(data)
    return TensorEntry.from_json(data)


def _error(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"an archived tensor's {what} {value!r} is not a finite non-negative number")
    return float(value)


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
    tensors: Mapping[str, Entry] = field(default_factory=dict)
    state: Mapping[str, Any] = field(default_factory=dict)  # codec tree referencing ``tensors``
    versions: Mapping[str, str] = field(default_factory=dict)  # weightslab / torch that wrote it
    #: plain JSON the user's ``before_save`` callbacks added (:mod:`weightslab.events`); written only
    #: when not empty, so other manifests are byte for byte as before, and older readers ignore it
    metadata: Mapping[str, Any] = field(default_factory=dict)
    #: set by a demotion (:mod:`weightslab.storage.archive`): the codec and its parameters, when it was
    #: demoted, the chain length and the largest errors of its tensors; empty for an exact checkpoint
    archive: Mapping[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        """True when every tensor holds the bytes it was saved with (False: demoted to the lossy archive)."""
        return all(t.exact for t in self.tensors.values())

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"

    @property
    def reason(self) -> str:
        return self.reasons[0] if self.reasons else "manual"

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def numeric_metrics(self) -> dict[str, float]:
        """The metrics as floats (non-finite ones are tagged by the codec: read without it, and
        without torch); a value that is not a number is left out, with a warning naming it."""
        out = {}
        for name, value in self.metrics.items():
            if isinstance(value, Mapping) and value.get(TAG) == "float":
                value = value.get("value", "nan")
            try:
                out[str(name)] = float(value)
            except (TypeError, ValueError, OverflowError):  # (10**400: a number no float holds)
                log.warning("checkpoint %s: metric %r is %r, not a number; ignored", self.ref, name, value)
        return out

    def to_json(self) -> dict[str, Any]:
        exact = self.exact
        return {
            "format_version": ARCHIVE_FORMAT_VERSION if not exact else
            DISTRIBUTED_FORMAT_VERSION if {"ranks", "sharded"} & set(self.state) else FORMAT_VERSION,
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
            **({"metadata": dict(self.metadata)} if self.metadata else {}),
            **({} if exact else {"exact": False, "archive": dict(self.archive)}),
        }

    def to_bytes(self) -> bytes:
        # (an archived manifest names every link of every tensor's chain: compact, it is a third smaller)
        return seal(self.to_json(), compact=not self.exact)

    @classmethod
    def from_bytes(cls, data: bytes, *, path: Path | str = "<manifest>") -> "Manifest":
        try:
            body = unseal(data, path=path, kind=KIND)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"checkpoint manifest {exc}. Resume an earlier checkpoint, or run "
                                         "wl.verify() to list every damaged one.", path=path) from None
        try:
            manifest = cls._parse(body)
        except FormatVersionError:  # (sharded files in a layout of a newer weightslab)
            raise
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
            what = f"no field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise CorruptCheckpointError(
                f"manifest {path} is missing a field or has a bad value ({what}); it was damaged or edited, or not "
                "written by this version of weightslab. Resume an earlier checkpoint, or run wl.verify() to list "
                "every damaged one.", path=path) from None
        named = Layout.parse_manifest_name(Path(path).name)
        if named is not None and named != (manifest.experiment, manifest.step):
            raise CorruptCheckpointError(
                f"manifest {path} records checkpoint {manifest.ref} but its file name says {named[0]}@{named[1]}: the "
                "experiment or step was edited, or the file was copied under another name. Resume an earlier "
                "checkpoint, or run wl.verify() to list every damaged one.", path=path)
        directory = Path(path).parent.parent.name
        if Path(path).parent.name == "model" and is_experiment_hash(directory) and directory != manifest.experiment:
            raise CorruptCheckpointError(
                f"manifest {path} records checkpoint {manifest.ref} but lies in experiment {directory}'s directory. "
                "Resume an earlier checkpoint, or run wl.verify() to list every damaged one.", path=path)
        return manifest

    @classmethod
    def _parse(cls, body: Mapping[str, Any]) -> "Manifest":
        """The manifest a sealed document holds, every field checked against its grammar: the
        experiment and step build the path retention deletes, the tensors' records name packs
        and size buffers (ValueError, KeyError or TypeError saying what is wrong)."""
        tensors = _mapping(body.get("tensors", {}), "tensors")
        state = _mapping(body.get("state", {}), "state")
        lossy = any(isinstance(t, Mapping) and t.get("exact", True) is False for t in tensors.values())
        if body.get("exact", True) is not (not lossy) or lossy != (body.get("format_version") == ARCHIVE_FORMAT_VERSION):
            raise ValueError(f"exact {body.get('exact', True)!r} and format_version {body.get('format_version')!r} do "
                             f"not agree with its tensors ({'some' if lossy else 'none'} archived)")
        experiment = check_experiment(body["experiment"])
        if "sharded" in state:
            _check_sharded(state["sharded"], experiment)
        resumed_from = body.get("resumed_from")
        if resumed_from is not None and not isinstance(resumed_from, str):
            raise ValueError(f"resumed_from {resumed_from!r} is not a ref")
        return cls(
            experiment=experiment,
            step=check_step(body["step"]),
            created=_text(body["created"], "created"),
            created_ns=check_count(body["created_ns"], "created_ns"),
            reasons=tuple(_texts(body.get("reasons", ()), "reasons")),
            changes=tuple(_list(body.get("changes", ()), "changes")),
            metrics=dict(_mapping(body.get("metrics", {}), "metrics")),
            run=_text(body.get("run", ""), "run"),
            resumed_from=resumed_from,
            versions=dict(_mapping(body.get("versions", {}), "versions")),
            tensors={_text(k, "a tensor key"): _entry(v) for k, v in tensors.items()},
            state=state,
            metadata=dict(_mapping(body.get("metadata", {}), "metadata")),
            archive=dict(_mapping(body.get("archive", {}), "archive")),
        )

    @classmethod
    def read(cls, path: Path) -> "Manifest":
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"no checkpoint manifest at {path}; it may have been deleted. Resume 'latest', or list the "
                f"committed checkpoints of the experiment in {Path(path).parent}") from None
        except OSError as exc:  # a directory in its place, no permission: it cannot be read, as if damaged
            raise CorruptCheckpointError(f"checkpoint manifest {path} cannot be read ({exc}). Resume an earlier "
                                         "checkpoint, or run wl.verify() to list every damaged one.",
                                         path=path) from None
        return cls.from_bytes(data, path=path)


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} is {type(value).__name__}, not a mapping")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{what} is {type(value).__name__}, not a list")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} {value!r} is not a string")
    return value


def _texts(value: Any, what: str) -> list[str]:
    return [_text(v, f"an item of {what}") for v in _list(value, what)]


def _check_sharded(sharded: Any, experiment: str) -> None:
    """A distributed checkpoint's record of sharded tensors: its directory and file names are
    the experiment's own (:meth:`Layout.shard_files`), the files' sizes and digests well formed,
    and each tensor's dtype and global shape known, holding no more bytes than the files do
    (what a reader allocates before it reads them)."""
    Layout.shard_names(experiment, sharded)  # (ValueError: not the experiment's own)
    files = ShardedFiles.from_json(sharded["files"])
    total = 0
    for key, meta in _mapping(sharded.get("tensors", {}), "the sharded tensors").items():
        meta = _mapping(meta, f"sharded tensor {key}")
        total += shape_nbytes(check_dtype(meta["dtype"]), check_shape(meta["shape"]))
    if total > files.nbytes:
        raise ValueError(f"its sharded tensors hold {total:,} bytes, more than their files ({files.nbytes:,})")
