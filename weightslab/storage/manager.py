"""The checkpoints of one root: committing them, finding them, reading them back verified.

:class:`CheckpointManager` joins the layout (where files go), the store (tensor bytes) and the
manifest (the commit). It is what the background writer calls to make a snapshot durable, and
what ``resume`` and the command line use to resolve a ref and load a checkpoint. It knows paths
and bytes (and no torch: :mod:`weightslab.tensors` turns tensors into blobs and back); what the
tensors mean is the state layer's business.

A manager is opened on one :class:`~weightslab.storage.root.Root`: for a remote root, the packs a read needs
are fetched into the local directory first, and retention deletes the remote commit objects before
the local ones.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import yaml

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, WeightslabError
from ..refs import Ref, parse_ref
from ..retention import CheckpointRecord, KeepBest, Retention, RetentionPlan
from ..triggers import REASONS
from .atomic import atomic_write, fsync_dir, make_dirs, remove, sweep_temp_files
from .experiment import ExperimentRecord, descendants
from .layout import Layout, is_experiment_hash
from . import archive as _archive
from .manifest import ArchivedEntry, Manifest, TensorEntry
from .names import read_names, set_name
from .remote import RemoteRoot
from .root import Root
from .shardfiles import ShardedFiles
from .shardfiles import verify as verify_shards
from .store import Blob, BlobRef, BlobStore, BytesLike

__all__ = ["CheckpointManager", "CheckpointEntry", "Committed", "SaveRequest", "VerifyReport"]

log = logging.getLogger(__name__)

_KNOWN_REASONS = frozenset(REASONS)


@dataclass(frozen=True, kw_only=True)
class SaveRequest:
    """Everything the writer needs to commit one checkpoint; built on the training thread."""

    experiment: ExperimentRecord
    step: int
    reasons: tuple[str, ...]
    changes: tuple[Mapping[str, Any], ...]
    metrics: Mapping[str, Any]
    tree: Mapping[str, Any]
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]  # every tensor key: (dtype name, shape)
    blobs: Mapping[str, Blob]  # the bytes of every tensor (the store keeps one blob per digest)
    run: str
    resumed_from: str | None
    created: str
    created_ns: int
    versions: Mapping[str, str]
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # plain JSON, checked by the caller

    @property
    def ref(self) -> str:
        return f"{self.experiment.hash}@{self.step}"


class Committed(NamedTuple):
    """What :meth:`CheckpointManager.commit` made durable."""

    manifest: Manifest
    refs: dict[str, BlobRef]  # where each tensor is stored
    written: int  # bytes this commit added: tensor bytes the root did not hold, and the manifest


@dataclass(frozen=True)
class CheckpointEntry:
    """A committed checkpoint found on disk (its manifest not fully read)."""

    experiment: str
    step: int
    path: Path
    mtime_ns: int
    created_ns: int  # commit time recorded in the manifest: what "newest" means

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"


@dataclass(frozen=True)
class VerifyReport:
    """What :meth:`CheckpointManager.verify` found."""

    checked: tuple[str, ...]  # refs of the checkpoints checked
    damaged: tuple[tuple[str, str], ...]  # (ref, what is wrong, naming the file)
    blobs: int  # distinct blobs read and checked
    nbytes: int  # bytes read and checked

    @property
    def ok(self) -> bool:
        return not self.damaged

    def __str__(self) -> str:
        lines = [f"{len(self.checked)} checkpoints, {self.blobs} blobs ({self.nbytes:,} bytes) checked: "
                 + ("all verify" if self.ok else f"{len(self.damaged)} damaged")]
        lines += [f"  {ref}: {why}" for ref, why in self.damaged]
        return "\n".join(lines)


_CREATED_RE = re.compile(rb'"created_ns":\s*(\d+)')


def _read_created_ns(path: Path) -> int:
    """The commit time a manifest records, from its first bytes (the field is near the top); the
    whole document only if it is not there. 0 for an unreadable manifest: reading it later raises."""
    try:
        with open(path, "rb") as f:
            m = _CREATED_RE.search(f.read(1024))
            if m:
                return int(m.group(1))
        return Manifest.read(path).created_ns
    except (OSError, CorruptCheckpointError, ValueError):
        return 0


def _yamlable(value: Any) -> Any:
    """Plain hyperparameter values in the types ``yaml.safe_dump`` writes."""
    if isinstance(value, dict):
        return {k: _yamlable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yamlable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


class CheckpointManager:
    """Structured checkpoint storage under one root (``<root>/checkpoints``, ``<root>/objects``).

    ``compression="zstd"`` stores changed tensors byte-shuffled and zstd-compressed when that
    saves space; ``delta=True`` stores them as XOR deltas against their anchor, the last version
    stored self-contained (kept in host memory), with a new anchor every ``reanchor_interval``
    versions. Deltas never chain: a restore decodes at most two blobs per tensor, whatever the
    checkpoint. Both are lossless: restores are bit-identical.
    """

    def __init__(self, root: Root | str | os.PathLike[str], *, compression: str = "off", delta: bool = False,
                 reanchor_interval: int = 10, level: int = 1, sweep: bool = True,
                 best_metric: tuple[str, str] | None = None, direct_io: bool = True):
        if delta and compression != "zstd":
            raise ValueError("delta=True stores XOR deltas compressed with zstd; set compression='zstd' too")
        if reanchor_interval < 1:
            raise ValueError(f"reanchor_interval must be >= 1, got {reanchor_interval}")
        self._root = root if isinstance(root, Root) else Root(Path(root))
        self.layout = self._root.layout
        self.store = BlobStore(self.layout, compression=compression, level=level, direct=direct_io)
        self.delta = delta
        self.reanchor_interval = reanchor_interval
        self._best_metric = best_metric
        # key -> (anchor blob, a copy of its raw bytes, its dtype name and shape, deltas stored
        # against it since), for delta=True
        self._anchors: dict[str, tuple[BlobRef, BytesLike, str, tuple[int, ...], int]] = {}
        self._written_experiments: set[str] = set()
        self._demoter: _archive.Demoter | None = None
        self._records: dict[Path, tuple[int, CheckpointRecord | None]] = {}  # path -> (mtime, record)
        self._created: dict[Path, tuple[int, int, int]] = {}  # path -> (mtime, size, created_ns)
        # (sweep=False for a process that must not judge other writers' temporary files: a rank of a
        # distributed job on another host cannot tell whether a pid in a file name is alive.)
        swept = sweep_temp_files(self.layout.temp_dirs()) if sweep else []
        if swept:
            log.info("removed %d temporary files left by interrupted saves under %s", len(swept), self.root)

    @property
    def root(self) -> Path:
        return self.layout.root

    @property
    def remote(self) -> RemoteRoot | None:
        """The remote root this root mirrors (a :class:`~weightslab.storage.remote.RemoteRoot`), or None."""
        return self._root.remote

    @property
    def best_metric(self) -> tuple[str, str] | None:
        """What a bare ``<hash>@best`` ranks by: (metric, ``"min"`` | ``"max"``), or None."""
        return self._best_metric

    # --- writing ----------------------------------------------------------------------------
    def write_experiment(self, record: ExperimentRecord) -> None:
        """Create the experiment's directories and descriptive files, once."""
        h = record.hash
        if h in self._written_experiments and self.layout.experiment_record(h).exists():
            return
        for d in (self.layout.model_dir(h), self.layout.hp_dir(h), self.layout.data_dir(h), self.layout.logs_dir):
            make_dirs(d)
        if not self.layout.experiment_record(h).exists():
            if record.architecture_text:
                atomic_write(self.layout.architecture_text(h), record.architecture_text.encode())
            values = dict(record.hyperparams_values)
            document = values[next(iter(values))] if len(values) == 1 else values
            atomic_write(self.layout.hyperparams_yaml(h),
                         yaml.safe_dump(_yamlable(document), sort_keys=False, allow_unicode=True).encode())
            # experiment.json last: its presence says the experiment's files are complete.
            atomic_write(self.layout.experiment_record(h), record.to_bytes())
        self._written_experiments.add(h)

    def commit(self, request: SaveRequest) -> Committed:
        """Make one checkpoint durable: the pack of the blobs the root does not hold yet first, then
        the manifest (the commit point). Returns the manifest, where each tensor is stored, and the
        bytes written."""
        h = request.experiment.hash
        for directory in (self.layout.experiment_dir(h), self.layout.model_dir(h)):
            if os.path.islink(directory):  # listings skip it: a checkpoint written there would be lost
                raise WeightslabError(f"refusing to commit {request.ref}: {directory} is a symbolic link, and "
                                      "weightslab never writes, lists or deletes through links in a root (someone "
                                      "may have planted it); remove the link")
        self.write_experiment(request.experiment)
        keys = list(request.blobs)
        blobs = [dataclasses.replace(blob, base=self._delta_base(key, blob)) for key, blob in request.blobs.items()]
        # Shared lock: garbage collection cannot delete a blob between the store finding it (an
        # unchanged tensor costs no bytes) and the commit of the manifest that references it.
        with self.store.lock(exclusive=False):
            stored, written = self.store.put_counting(blobs)
            refs = dict(zip(keys, stored))
            manifest = self._manifest(request, refs)
            document = manifest.to_bytes()
            atomic_write(self.layout.manifest(manifest.experiment, manifest.step), document)
        if self.delta:
            for key, blob in request.blobs.items():
                ref = refs[key]
                if ref.base is None:  # stored self-contained: the new anchor of this tensor
                    # copied: the snapshot's buffer is reused by the next snapshots
                    self._anchors[key] = (ref, bytes(blob.data), blob.dtype, blob.shape, 0)
                elif key in self._anchors and ref.base.digest == self._anchors[key][0].digest:
                    anchor, data, dtype, shape, count = self._anchors[key]
                    self._anchors[key] = (anchor, data, dtype, shape, count + 1)
        return Committed(manifest, refs, written + len(document))

    def _delta_base(self, key: str, blob: Blob) -> tuple[BlobRef, BytesLike] | None:
        anchor = self._anchors.get(key) if self.delta else None
        if anchor is None:
            return None
        ref, data, dtype, shape, count = anchor
        if dtype != blob.dtype or shape != blob.shape or count + 1 >= self.reanchor_interval:
            return None  # store it self-contained: it becomes the new anchor
        return ref, data

    def remember(self, blobs: Mapping[str, Blob], refs: Mapping[str, BlobRef]) -> None:
        """Anchors after a resume: the restored tensors (``blobs``: their bytes, kept as they are)
        that are stored self-contained become the anchors of the next deltas."""
        if self.delta:
            for key, ref in refs.items():
                blob = blobs.get(key)
                if blob is not None and ref.base is None:
                    self._anchors[key] = (ref, blob.data, blob.dtype, blob.shape, 0)

    def _manifest(self, request: SaveRequest, refs: Mapping[str, BlobRef]) -> Manifest:
        return Manifest(
            experiment=request.experiment.hash,
            step=request.step,
            created=request.created,
            created_ns=request.created_ns,
            reasons=request.reasons,
            changes=request.changes,
            metrics=request.metrics,
            run=request.run,
            resumed_from=request.resumed_from,
            versions=request.versions,
            tensors={k: TensorEntry(dtype=dtype, shape=shape, blob=refs[k])
                     for k, (dtype, shape) in request.tensors.items()},
            state=request.tree,
            metadata=request.metadata,
        )

    # --- finding ----------------------------------------------------------------------------
    def experiments(self) -> list[str]:
        return self.layout.experiments()

    def read_experiment(self, exp_hash: str) -> ExperimentRecord | None:
        path = self.layout.experiment_record(exp_hash)
        try:
            return ExperimentRecord.from_bytes(path.read_bytes(), path=path)
        except FileNotFoundError:
            return None

    def parents(self) -> dict[str, str | None]:
        """``{experiment: parent experiment or None}`` for every readable experiment of the root."""
        out: dict[str, str | None] = {}
        for h in self.experiments():
            try:
                record = self.read_experiment(h)
            except (CorruptCheckpointError, ValueError, KeyError) as exc:
                log.warning("skipping experiment %s in the lineage: %s", h, exc)
                continue
            out[h] = record.parent.experiment if record and record.parent else None
        return out

    def lineage(self, exp_hash: str) -> set[str]:
        """The experiment and all experiments descending from it."""
        return descendants(exp_hash, self.parents())

    def checkpoints(self, experiments: Iterable[str] | None = None) -> list[CheckpointEntry]:
        """Committed checkpoints, oldest first (by the commit time recorded in each manifest, then
        step; file times are not used: a copy or a git checkout of a root does not keep them)."""
        found = []
        for h in (self.experiments() if experiments is None else experiments):
            for step, path in self.layout.manifests(h):
                entry = self._entry(h, step, path)
                if entry is not None:  # (None: removed meanwhile)
                    found.append(entry)
        found.sort(key=lambda e: (e.created_ns, e.step))
        return found

    def _entry(self, exp_hash: str, step: int, path: Path) -> CheckpointEntry | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        cached = self._created.get(path)
        if cached is None or cached[:2] != (st.st_mtime_ns, st.st_size):
            cached = self._created[path] = (st.st_mtime_ns, st.st_size, _read_created_ns(path))
        return CheckpointEntry(exp_hash, step, path, st.st_mtime_ns, cached[2])

    # --- names ------------------------------------------------------------------------------
    def names(self) -> dict[str, str]:
        """``{name: experiment hash}`` of every human name in the root."""
        return read_names(self.layout)

    def name_experiment(self, exp_hash: str, name: str, *, replace: bool = False) -> None:
        """Give experiment ``exp_hash`` the human name ``name`` (see :mod:`weightslab.storage.names`)."""
        created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
        set_name(self.layout, name, exp_hash, created=created, replace=replace)

    def _experiment_for(self, prefix: str, *, by_name: bool = False) -> str:
        if by_name:
            names = self.names()
            if prefix not in names:
                known = ", ".join(sorted(names)[:8]) or "none"
                raise CheckpointNotFoundError(f"no experiment is named {prefix!r} under {self.layout.root} (names: "
                                              f"{known}); name one with wl.name_experiment({prefix!r}, ref)")
            return names[prefix]
        if is_experiment_hash(prefix):
            if not self.layout.experiment_dir(prefix).is_dir():
                raise CheckpointNotFoundError(f"no experiment {prefix} under {self.layout.checkpoints_dir}; "
                                              f"experiments there: {self._some_experiments()}")
            return prefix
        matches = [h for h in self.experiments() if h.startswith(prefix)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise CheckpointNotFoundError(f"no experiment hash starts with {prefix!r} under "
                                          f"{self.layout.checkpoints_dir}; experiments there: "
                                          f"{self._some_experiments()}")
        raise CheckpointNotFoundError(f"{prefix!r} matches several experiments ({', '.join(matches[:5])}); "
                                      "give more characters of the hash")

    def _some_experiments(self) -> str:
        names = self.experiments()
        return ", ".join(names[:8]) + (" ..." if len(names) > 8 else "") if names else "none"

    def candidates(self, ref: str | os.PathLike[str] | Ref, *, current: str | None = None) -> list[CheckpointEntry]:
        """The checkpoints ``ref`` may mean, best first: one for an exact ref, newest first for
        ``latest`` (in the lineage of ``current`` when given) or ``<hash>@latest``.

        Raises :class:`CheckpointNotFoundError` when an explicit ref names nothing; returns ``[]``
        when ``latest`` finds no checkpoint.
        """
        parsed = ref if isinstance(ref, Ref) else parse_ref(ref)
        if parsed.latest:
            scope = self.lineage(current) if current else None
            return list(reversed(self.checkpoints(scope)))
        if parsed.path is not None:
            return [self._entry_for_path(parsed.path)]
        h = self._experiment_for(parsed.experiment or "", by_name=parsed.by_name)
        if parsed.best:
            return [self._best(h, parsed.metric, parsed.mode)]
        if parsed.step is None:
            found = list(reversed(self.checkpoints([h])))
            if not found:
                raise CheckpointNotFoundError(f"experiment {h} has no committed checkpoint yet")
            return found
        path = self.layout.manifest(h, parsed.step)
        if not path.exists():
            steps = [s for s, _ in self.layout.manifests(h)]
            listing = ", ".join(map(str, steps[-10:])) if steps else "none"
            raise CheckpointNotFoundError(f"no checkpoint at step {parsed.step} of experiment {h}; its "
                                          f"checkpoints are at steps: {listing}")
        entry = self._entry(h, parsed.step, path)
        if entry is None:
            raise CheckpointNotFoundError(f"the checkpoint at step {parsed.step} of experiment {h} was just deleted")
        return [entry]

    def _best(self, exp_hash: str, metric: str | None, mode: str) -> CheckpointEntry:
        """The best checkpoint of one experiment by ``metric`` (default: ``best_metric``, else the
        only metric its checkpoints record)."""
        records = self.records([exp_hash])
        if metric is None and self.best_metric is not None:
            metric, mode = self.best_metric
        recorded = sorted({name for r in records for name in r.metrics})
        if metric is None:
            if len(recorded) != 1:
                raise CheckpointNotFoundError(
                    f"'{exp_hash}@best' needs a metric: its checkpoints record {', '.join(recorded) or 'no metric'}; "
                    f"write '{exp_hash}@best:<metric>' (lowest wins) or '{exp_hash}@best:<metric>:max'")
            metric = recorded[0]
        ranked = KeepBest(k=1, metric=metric, mode=mode).ranked(records)
        if not ranked:
            raise CheckpointNotFoundError(f"no checkpoint of experiment {exp_hash} records the metric {metric!r} "
                                          f"(recorded: {', '.join(recorded) or 'none'}); pass it with "
                                          "checkpoint_on_step(step, metrics={...})")
        best = ranked[0]
        entry = self._entry(exp_hash, best.step, self.layout.manifest(exp_hash, best.step))
        if entry is None:
            raise CheckpointNotFoundError(f"the best checkpoint {best.ref} was just deleted")
        return entry

    def _entry_for_path(self, path: Path) -> CheckpointEntry:
        path = path.expanduser()
        if path.is_dir():
            h = path.name if is_experiment_hash(path.name) else path.parent.name
            entries = list(reversed(self.checkpoints([h]))) if is_experiment_hash(h) else []
            if not entries:
                raise CheckpointNotFoundError(f"{path} holds no committed checkpoint; pass a manifest file "
                                              "(model/<hash>_step_<step>.json) or an experiment directory")
            return entries[0]
        parsed = Layout.parse_manifest_name(path.name)
        if parsed is None or not path.is_file():
            raise CheckpointNotFoundError(f"{path} is not a checkpoint manifest; expected a file named "
                                          "<hash>_step_<step>.json under checkpoints/<hash>/model/")
        entry = self._entry(parsed[0], parsed[1], path)
        if entry is None:
            raise CheckpointNotFoundError(f"{path} was just deleted")
        return entry

    # --- reading ----------------------------------------------------------------------------
    def read_manifest(self, entry: CheckpointEntry | Path, *, sizes: bool = True) -> Manifest:
        """A checkpoint's manifest, verified by its digest, every identifier by its grammar (the file
        name and the content agree) and, with ``sizes``, every blob's stored size against the real
        size of the pack it is recorded in (stat only; a pack not here, as on a remote root, is
        checked when read): a crafted or damaged manifest raises CorruptCheckpointError here, so a
        resume falls back from it before anything else looks at it."""
        manifest = Manifest.read(entry.path if isinstance(entry, CheckpointEntry) else Path(entry))
        if sizes:
            self.store.check_stored((b for t in manifest.tensors.values() for b in t.blobs()),
                                    checkpoint=manifest.ref, frames=False, missing_ok=True)
        return manifest

    def check_stored(self, manifest: Manifest) -> None:
        """Before buffers are allocated for a checkpoint's tensors: the packs it needs fetched (a
        remote root), and every blob's sizes checked against the real packs and zstd frames
        (:meth:`BlobStore.check_stored`); CorruptCheckpointError names the first that does not fit."""
        if self.remote is not None:
            self.remote.pull_packs(manifest)
        self.store.check_stored((b for t in manifest.tensors.values() for b in t.blobs()), checkpoint=manifest.ref)

    def read_tensors(self, manifest: Manifest, into: Mapping[str, BytesLike]) -> None:
        """Read the bytes of the checkpoint's tensors ``into`` buffers (by tensor key), each byte
        checked against its digest; a remote root's packs are fetched first. An archived tensor is
        decoded from its anchor and lossy links (:mod:`weightslab.storage.archive`): the values it was
        archived with, not the ones it was saved with (``manifest.exact`` says which).
        (:func:`weightslab.tensors.load_tensors` gives them as tensors.)"""
        if self.remote is not None:
            self.remote.pull_packs(manifest)
        exact = [(entry.blob, buffer) for entry, buffer in ((manifest.tensors[k], b) for k, b in into.items())
                 if isinstance(entry, TensorEntry)]
        self.store.read_into(exact, checkpoint=manifest.ref)
        for key, buffer in into.items():
            entry = manifest.tensors[key]
            if isinstance(entry, ArchivedEntry):
                _archive.read_into(self.store, entry, buffer, checkpoint=manifest.ref)

    def shards(self, manifest: Manifest) -> tuple[Path, ShardedFiles] | None:
        """Where a checkpoint's sharded tensors are (torch.distributed.checkpoint wrote them) and the
        record of their files (:class:`weightslab.distributed.sharded.ShardedFiles`); None if it has none."""
        sharded = manifest.state.get("sharded")
        if sharded is None:
            return None
        try:
            files = self.layout.shard_files(manifest.experiment, sharded)
        except ValueError as exc:
            raise CorruptCheckpointError(f"checkpoint {manifest.ref}: {exc}; its manifest is damaged") from None
        directory = files[0].parent if files else self.layout.experiment_dir(manifest.experiment) / sharded["directory"]
        return directory, ShardedFiles.from_json(sharded["files"])

    # --- verification -----------------------------------------------------------------------
    def verify(self, ref: str | os.PathLike[str] | None = None, *,
               progress: Callable[[int, int], None] | None = None) -> VerifyReport:
        """Read back and check every byte of one checkpoint (``ref``) or of all of them.

        Each distinct blob is read once, however many checkpoints share it; damaged ones are
        reported with the file that holds them, not raised.
        """
        entries = self.checkpoints() if ref is None else self.candidates(ref)[:1]
        verified: dict[str, str | None] = {}  # digest -> None if good, else the problem
        checked, damaged = [], []
        nbytes = 0
        for i, entry in enumerate(entries):
            if progress is not None:
                progress(i, len(entries))
            checked.append(entry.ref)
            try:
                manifest = self.read_manifest(entry)
                if self.remote is not None:
                    self.remote.pull_packs(manifest)
            except (CorruptCheckpointError, CheckpointNotFoundError) as exc:
                damaged.append((entry.ref, str(exc)))
                continue
            problems = []
            for key, tensor in manifest.tensors.items():
                for blob in tensor.blobs():  # (an archived tensor's anchor and every link, like any blob)
                    if blob.digest not in verified:
                        try:
                            self.store.verify_blob(blob)  # SHA-256 (not the fast checksum), in bounded memory
                            verified[blob.digest] = None
                            nbytes += blob.size
                        except CorruptCheckpointError as exc:
                            verified[blob.digest] = str(exc)
                    if verified[blob.digest] is not None:
                        problems.append(f"tensor {key}: {verified[blob.digest]}")
                        break
            try:
                shards = self.shards(manifest)
            except (CorruptCheckpointError, ValueError) as exc:
                problems.append(str(exc))
                shards = None
            if shards is not None:
                problems += verify_shards(*shards)
                nbytes += shards[1].nbytes
            if problems:
                damaged.append((entry.ref, "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)"
                                                                      if len(problems) > 3 else "")))
        if progress is not None:
            progress(len(entries), len(entries))
        return VerifyReport(checked=tuple(checked), damaged=tuple(damaged), blobs=len(verified), nbytes=nbytes)

    # --- retention --------------------------------------------------------------------------
    def records(self, experiments: Iterable[str] | None = None) -> list[CheckpointRecord]:
        """What retention needs to know of each committed checkpoint (manifests read once, cached)."""
        out = []
        for entry in self.checkpoints(experiments):
            cached = self._records.get(entry.path)
            if cached is None or cached[0] != entry.mtime_ns:
                try:
                    manifest = self.read_manifest(entry)
                    metrics = manifest.numeric_metrics()
                    record: CheckpointRecord | None = CheckpointRecord(
                        experiment=manifest.experiment, step=manifest.step, created_ns=manifest.created_ns,
                        reasons=tuple(r for r in manifest.reasons if r in _KNOWN_REASONS), metrics=metrics,
                        exact=manifest.exact, chain=_archive.chain_of(manifest),
                        archivable="sharded" not in manifest.state)
                except (CorruptCheckpointError, CheckpointNotFoundError, ValueError) as exc:
                    log.warning("retention leaves %s alone: its manifest cannot be read (%s)", entry.ref, exc)
                    record = None
                cached = self._records[entry.path] = (entry.mtime_ns, record)
            if cached[1] is not None:
                out.append(cached[1])
        return out

    def apply_retention(self, retention: Retention, *, experiments: Iterable[str] | None = None,
                        dry_run: bool = False) -> RetentionPlan:
        """Delete the manifests of the checkpoints ``retention`` does not keep (blobs stay until
        :func:`weightslab.gc`), and with an archive, demote those it archives
        (:class:`~weightslab.storage.archive.Demoter`). Returns the plan, whether or not it was carried out.

        On a remote root, each checkpoint is deleted remotely first (its manifest is the commit
        object there), then locally: a failure leaves the local copy, and the next retention
        deletes it again."""
        plan = retention.plan(self.records(experiments))
        if dry_run:
            return plan
        if plan.demote:
            assert retention.archive is not None
            if self._demoter is None or self._demoter.archive != retention.archive:
                # (kept: in training, the checkpoint demoted after this save is the base of the next)
                self._demoter = _archive.Demoter(self, retention.archive)
            self._demoter.demote(plan.demote)
        if not plan.delete:
            return plan
        touched = set()
        for record in plan.delete:
            path = self.layout.manifest(record.experiment, record.step)
            if not self.layout.contains(path):  # (experiments() lists no link; a checkpoints/ that is one)
                log.warning("retention leaves %s alone: it is reached through a symbolic link out of the root "
                            "%s, and weightslab never deletes through links", path, self.root)
                continue
            if self.remote is not None:
                self.remote.delete(record.experiment, record.step)
            remove(path)
            self._records.pop(path, None)
            touched.add(path.parent)
        for directory in touched:
            fsync_dir(directory)
        log.info("retention deleted %d checkpoints (%s)", len(plan.delete),
                 ", ".join(r.ref for r in plan.delete[:5]) + (" ..." if len(plan.delete) > 5 else ""))
        return plan
