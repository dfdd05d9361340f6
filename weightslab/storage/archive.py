"""The lossy archive tier: what it keeps (:class:`Archive`), how a checkpoint enters it (:class:`Demoter`)
and how an archived tensor is read back (:func:`read_archived`).

Exact resume needs exact checkpoints, but a run's history does not: an old checkpoint that retention
would delete can instead be *demoted*: each of its floating tensors of the models (and, unless
``optimizer="exact"``, of the optimizers) re-encoded by a lossy codec (:mod:`weightslab.storage.lossy`)
as a delta against the decoded value of the checkpoint before it. That closes the loop: each link is
encoded against what a reader will decode, so the error of link 20 is that of one encoding, not the
sum of 20. A chain starts at an exact checkpoint (its tensors' bytes are the *anchor*) and holds at
most ``max_chain`` links; every archived manifest names its anchor and all its links itself, so
deleting any other checkpoint never breaks it (garbage collection keeps every blob a manifest names).

A tensor stays exact in a demoted checkpoint when a lossy code would not save bytes (a scalar, a
bias of a few elements), when it is not floating point, not finite, new since the checkpoint before,
or the same bytes as an exact one there (a frozen layer: it costs nothing already).

Demoting is atomic: the payloads are written into a new pack (durably) before the demoted manifest
replaces the exact one by a rename, so a crash leaves either, each complete; the exact blobs stay
until :func:`weightslab.gc` finds nothing that names them. The demoted manifest says what it is
(``exact: false``, format version 4, the codec, its parameters, each tensor's measured error).
No torch here: the CLI demotes and reads archives where importing torch fails.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import numpy as np

from ..errors import CorruptCheckpointError
from . import lossy
from .atomic import atomic_write
from .manifest import MAX_CHAIN, ArchivedEntry, Entry, Link, Manifest, TensorEntry
from .store import Blob, BlobRef

if TYPE_CHECKING:
    from ..retention import Demotion
    from .manager import CheckpointManager
    from .store import BlobStore

__all__ = ["Archive", "archive_of", "Demoter", "read_archived", "describe_lossy", "chain_of", "SECOND_MOMENTS", "OPTIMIZER_MODES"]

log = logging.getLogger(__name__)

#: Optimizer state fields that are non-negative by construction (Adam, AdamW, Adamax, RMSprop,
#: Adagrad, Adadelta): archived in a non-negative space, so that a decoded one never goes below 0.
SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta"})
#: What the archive does with optimizer state: re-encode it too, or keep it exact.
OPTIMIZER_MODES = ("lossy", "exact")


@dataclass(frozen=True, kw_only=True)
class Archive:
    """How retention demotes instead of deleting: the codec and its parameters, the longest chain of
    lossy links (a read decodes up to that many), the newest checkpoints that always stay exact, and
    whether optimizer state is archived too (``"lossy"``) or kept exact.

    ``Archive.of("lc", bits=3)`` builds one from a codec's name and its parameters.
    """

    codec: lossy.CodecParams = field(default_factory=lambda: lossy.codec_params("lc"))
    max_chain: int = 16
    ring: int = 2
    optimizer: str = "lossy"

    def __post_init__(self) -> None:
        if isinstance(self.codec, str):
            object.__setattr__(self, "codec", lossy.codec_params(self.codec))
        if not isinstance(self.codec, (lossy.LcParams, lossy.ExcpParams)):
            raise ValueError(f"Archive: codec must be one of {', '.join(map(repr, lossy.CODECS))} or their "
                             f"parameters (Archive.of('lc', bits=3)), got {self.codec!r}")
        for name, low, high in (("max_chain", 1, MAX_CHAIN), ("ring", 2, None)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
                raise ValueError(f"Archive: {name} must be an int from {low}" + (f" to {high}" if high else " up")
                                 + f", got {value!r}")
        if self.optimizer not in OPTIMIZER_MODES:
            raise ValueError(f"Archive: optimizer must be 'lossy' (archive optimizer state with the codec) or "
                             f"'exact' (keep it lossless), got {self.optimizer!r}")

    @classmethod
    def of(cls, codec: str = "lc", *, max_chain: int = 16, ring: int = 2, optimizer: str = "lossy",
           **params: Any) -> "Archive":
        """An archive of codec ``codec`` (``"lc"`` or ``"excp"``) with its parameters (``bits=3``)."""
        return cls(codec=lossy.codec_params(codec, **params), max_chain=max_chain, ring=ring, optimizer=optimizer)

    def describe(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.codec.to_json().items() if k != "codec")
        return f"{self.codec.codec}({params}), chains of at most {self.max_chain}, optimizer {self.optimizer}"


def archive_of(value: "Archive | str | Mapping[str, Any] | None") -> "Archive | None":
    """An :class:`Archive` from what a person writes: None, a codec's name (``"lc"``), a mapping of
    ``Archive.of`` arguments (``{"codec": "excp", "bits": 4, "max_chain": 8}``) or an Archive."""
    if value is None or isinstance(value, Archive):
        return value
    if isinstance(value, str):
        return Archive.of(value)
    if isinstance(value, Mapping):
        settings = dict(value)
        return Archive.of(settings.pop("codec", "lc"), **settings)
    raise ValueError(f"archive must be a codec's name ({', '.join(map(repr, lossy.CODECS))}), a mapping such as "
                     f"{{'codec': 'lc', 'bits': 3}} or a weightslab.Archive, got {type(value).__name__}")


# --- reading ---------------------------------------------------------------------------------------
def read_archived(store: "BlobStore", entry: ArchivedEntry, *, checkpoint: str | None = None) -> np.ndarray:
    """The decoded values of an archived tensor (compute dtype, 1-D): its anchor read (every byte
    checked against its digest), then each link's payload (checked likewise) decoded onto it."""
    size = math.prod(entry.shape)
    values = lossy.to_compute(store.read(entry.anchor, checkpoint=checkpoint), entry.dtype)
    for i, link in enumerate(entry.links):
        try:
            lossy.params_from_json(link.params)
            values = lossy.decode(store.read(link.blob, checkpoint=checkpoint), values, dtype=entry.dtype, size=size)
        except ValueError as exc:
            raise CorruptCheckpointError(f"checkpoint {checkpoint or '?'}: link {i + 1} of an archived tensor "
                                         f"cannot be decoded ({exc}); it is damaged. Load an exact checkpoint "
                                         "instead, or run wl.verify() to list every damaged one",
                                         path=None, checkpoint=checkpoint) from None
    return values


def read_into(store: "BlobStore", entry: ArchivedEntry, out: Any, *, checkpoint: str | None = None) -> None:
    """Decode an archived tensor into ``out`` (a writable buffer of its storage bytes)."""
    data = lossy.to_storage(read_archived(store, entry, checkpoint=checkpoint), entry.dtype)
    np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)


# --- demoting --------------------------------------------------------------------------------------
@dataclass
class _Decoded:
    """A checkpoint as the next link is encoded against it: its manifest and decoded values."""

    manifest: Manifest
    values: dict[str, np.ndarray]  # tensor key -> compute-dtype values (floating tensors only)


class Demoter:
    """Carries out the demotions of a retention plan against one root, in order (each encoded
    against the decoded checkpoint before it, which the previous demotion usually just produced)."""

    def __init__(self, manager: "CheckpointManager", archive: Archive):
        self._manager = manager
        self._store = manager.store
        self.archive = archive
        self._last: _Decoded | None = None  # the checkpoint demoted last, decoded: usually the next one's base

    def demote(self, demotions: Iterable["Demotion"]) -> list[Manifest]:
        """Demote each checkpoint; return the demoted manifests (one already archived or gone is skipped)."""
        out = []
        for demotion in demotions:
            manifest = self._demote(demotion)
            if manifest is not None:
                out.append(manifest)
        return out

    def _demote(self, demotion: "Demotion") -> Manifest | None:
        layout = self._manager.layout
        record = demotion.record
        path = layout.manifest(record.experiment, record.step)
        if not layout.contains(path):
            log.warning("the archive leaves %s alone: it is reached through a symbolic link", path)
            return None
        try:
            target = self._manager.read_manifest(path)
        except FileNotFoundError:
            return None  # (deleted meanwhile)
        if not target.exact:
            return None  # (demoted meanwhile, by another process)
        base = self._base(demotion.base.experiment, demotion.base.step)
        encoded: dict[str, tuple[TensorEntry, lossy.Encoded]] = {}
        decoded: dict[str, np.ndarray] = {}
        for group in self._groups(target, base):
            members = []
            for key in group:
                entry = target.tensors[key]
                assert isinstance(entry, TensorEntry)
                values, before = lossy.to_compute(self._store.read(entry.blob, checkpoint=target.ref),
                                                  entry.dtype), base.values[key]
                if not (np.isfinite(values).all() and np.isfinite(before).all()):
                    decoded[key] = values  # (no codec bounds an error on inf or NaN: it stays exact)
                    continue
                members.append(lossy.Member(key=key, dtype=entry.dtype, target=values, base=before,
                                            role=self._role(key, values, before)))
            for member, result in zip(members, lossy.encode_group(self.archive.codec, members) if members else ()):
                entry = target.tensors[member.key]
                assert isinstance(entry, TensorEntry)
                if len(result.payload) >= entry.size:  # the code costs more than the bytes: stays exact
                    decoded[member.key] = member.target
                else:
                    encoded[member.key] = (entry, result)
                    decoded[member.key] = result.decoded
        for key, entry in target.tensors.items():  # the exact ones the next link starts from
            if key not in decoded and isinstance(entry, TensorEntry) and entry.dtype in lossy.FLOAT_DTYPES:
                decoded[key] = lossy.to_compute(self._store.read(entry.blob, checkpoint=target.ref), entry.dtype)
        if not encoded:
            log.info("checkpoint %s stays exact: no tensor of it is smaller in the archive", target.ref)
            self._last = _Decoded(target, decoded)
            return None
        demoted = self._write(target, base.manifest, encoded)
        self._last = _Decoded(demoted, decoded)
        return demoted

    def _write(self, target: Manifest, base: Manifest, encoded: Mapping[str, tuple[TensorEntry, lossy.Encoded]]) \
            -> Manifest:
        """The payloads into one new pack, then the demoted manifest in place of the exact one."""
        keys = list(encoded)
        blobs = [Blob(data=encoded[k][1].payload, dtype="U8", shape=(len(encoded[k][1].payload),)) for k in keys]
        params = self.archive.codec.to_json()
        with self._store.lock(exclusive=False):  # (gc cannot delete a blob between finding it and the commit)
            # (a payload is small and read once per decode: its SHA-256 suffices, the fast check's
            # 50 bytes would be repeated by every later link's manifest)
            refs: list[BlobRef] = [dataclasses.replace(r, check=None) for r in self._store.put(blobs)]
            tensors: dict[str, Entry] = dict(target.tensors)
            for key, ref in zip(keys, refs):
                entry, result = encoded[key]
                before = base.tensors[key]
                anchor, links = (before.anchor, before.links) if isinstance(before, ArchivedEntry) else (before.blob, ())
                tensors[key] = ArchivedEntry(dtype=entry.dtype, shape=entry.shape, anchor=anchor,
                                             links=(*links, Link(params=params, blob=ref)),
                                             max_abs=_finite(result.max_abs), rel_l2=_finite(result.rel_l2))
            archived = [t for t in tensors.values() if isinstance(t, ArchivedEntry)]
            summary = {
                "codec": params["codec"], "params": params, "optimizer": self.archive.optimizer,
                "demoted": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "chain": max(len(t.links) for t in archived), "base": base.ref,
                "tensors": len(archived), "exact_nbytes": target.total_bytes,
                "max_abs": max(t.max_abs for t in archived), "rel_l2": max(t.rel_l2 for t in archived),
            }
            demoted = dataclasses.replace(target, tensors=tensors, archive=summary)
            atomic_write(self._manager.layout.manifest(target.experiment, target.step), demoted.to_bytes())
        if self._manager.remote is not None:  # (the remote's manifest is replaced the same way: the new one last)
            self._manager.remote.push([demoted])
        log.info("archived %s with %s: %d tensors lossy, %s -> %s bytes, max abs error %.3g, rel L2 %.3g",
                 target.ref, self.archive.describe(), len(archived), f"{target.total_bytes:,}",
                 f"{demoted.total_bytes:,}", summary["max_abs"], summary["rel_l2"])
        return demoted

    def _base(self, experiment: str, step: int) -> _Decoded:
        """The checkpoint a demotion is encoded against, decoded (the one just demoted, usually)."""
        last = self._last
        if last is not None and (last.manifest.experiment, last.manifest.step) == (experiment, step):
            current = self._manager.read_manifest(self._manager.layout.manifest(experiment, step))
            if current.to_bytes() == last.manifest.to_bytes():
                return last
        manifest = self._manager.read_manifest(self._manager.layout.manifest(experiment, step))
        values = {}
        for key, entry in manifest.tensors.items():
            if isinstance(entry, ArchivedEntry):
                values[key] = read_archived(self._store, entry, checkpoint=manifest.ref)
            elif entry.dtype in lossy.FLOAT_DTYPES:
                values[key] = lossy.to_compute(self._store.read(entry.blob, checkpoint=manifest.ref), entry.dtype)
        return _Decoded(manifest, values)

    def _lossy(self, key: str, target: Manifest, base: _Decoded) -> bool:
        """Whether tensor ``key`` of ``target`` is re-encoded (see the module's docstring)."""
        entry, before = target.tensors[key], base.manifest.tensors.get(key)
        if not isinstance(entry, TensorEntry) or before is None or key not in base.values:
            return False
        if entry.dtype not in lossy.FLOAT_DTYPES or (before.dtype, before.shape) != (entry.dtype, entry.shape):
            return False
        if isinstance(before, TensorEntry) and before.blob.digest == entry.blob.digest:
            return False  # the same bytes: costs nothing as it is
        if key.startswith("models/"):
            return True
        return key.startswith("optimizers/") and self.archive.optimizer == "lossy"

    def _groups(self, target: Manifest, base: _Decoded) -> list[list[str]]:
        """The tensors to re-encode, grouped by parameter (its weight, then its optimizer state), as
        the checkpoint's record of which optimizer slot holds which parameter says; the rest alone."""
        chosen = [k for k in target.tensors if self._lossy(k, target, base)]
        groups: dict[str, list[str]] = {}
        slot_of = {}
        for optimizer, keys in _parameter_keys(target.state).items():
            for index, weight in enumerate(keys):
                if weight is not None:
                    slot_of[f"optimizers/{optimizer}/state/{index}/"] = weight
        for key in chosen:
            if key.startswith("optimizers/"):
                prefix = "/".join(key.split("/")[:4]) + "/"
                weight = slot_of.get(prefix)
                groups.setdefault(weight if weight in chosen else prefix, []).append(key)
            else:
                groups.setdefault(key, []).insert(0, key)
        return list(groups.values())

    @staticmethod
    def _role(key: str, values: np.ndarray, before: np.ndarray) -> str:
        if not key.startswith("optimizers/"):
            return "weight"
        if key.rsplit("/", 1)[-1] in SECOND_MOMENTS and values.min(initial=0) >= 0 and before.min(initial=0) >= 0:
            return "second_moment"
        return "moment"  # (another optimizer's field of that name may hold negative values: a plain moment)


def _parameter_keys(state: Mapping[str, Any]) -> dict[str, list[str | None]]:
    """``{optimizer: [the tensor key of the parameter in each state slot, or None]}`` as the capture
    recorded it (checkpoints written before it was recorded: none, every tensor is encoded alone)."""
    recorded = state.get("parameters")
    if not isinstance(recorded, Mapping):
        return {}
    return {str(name): [k if isinstance(k, str) else None for k in keys] for name, keys in recorded.items()
            if isinstance(keys, list)}


def _finite(value: float) -> float:
    return float(value) if math.isfinite(value) else float(np.finfo(np.float64).max)


def chain_of(manifest: Manifest) -> int:
    """The longest chain of lossy links among a checkpoint's tensors (0: it is exact)."""
    return max((len(t.links) for t in manifest.tensors.values() if isinstance(t, ArchivedEntry)), default=0)


def describe_lossy(manifest: Manifest) -> str:
    """What a person needs to judge an archived checkpoint's values, in a line: the codec and the
    largest errors of its tensors (``"lc bits=3, 12 tensors lossy, largest error max abs 0.0021,
    relative L2 0.0004"``)."""
    archived = [t for t in manifest.tensors.values() if isinstance(t, ArchivedEntry)]
    if not archived:
        return "exact"
    params = archived[-1].links[-1].params
    settings = " ".join(f"{k}={v}" for k, v in params.items() if k != "codec")
    return (f"{params.get('codec', '?')}{' ' + settings if settings else ''}, {len(archived)} tensors lossy, largest "
            f"error max abs {max(t.max_abs for t in archived):.3g}, relative L2 {max(t.rel_l2 for t in archived):.3g}")
