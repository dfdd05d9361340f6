"""What the web page shows, gathered from a root: the lineage, the metric curves, one checkpoint's
card, the storage figures, a diff, and the verifications run from the page.

Everything is read, never written: the catalog (``index.sqlite``, derived data the listing commands
update the same way) is refreshed at every request, so a root being written shows its new
checkpoints on the next reload, and nothing here takes a lock a training waits on. In particular
the garbage-collection figure is not ``garbage.collect(dry_run=True)``, which holds the store's
lock exclusively (a training's commit would wait for it, seconds on a large root): it applies
the same rule to the catalog's blob references and the packs' headers, lock-free
(:meth:`Site.reclaimable`). The manager is opened without sweeping temporary files (a sweep deletes
them), and a remote root is read through the command line's mirror of its manifests.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ..cli.catalog import Catalog, CheckpointRow, ExperimentRow
from ..errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from ..storage.experiment import ExperimentRecord
from ..storage.root import Root

if TYPE_CHECKING:
    from ..cli.comparison import Comparison
    from ..storage.garbage import GcReport
    from ..storage.manager import CheckpointManager

__all__ = ["Site", "Overview", "Card", "Storage", "Verification", "REMOTE_REFRESH_SECONDS",
           "GC_GRACE_SECONDS", "GC_REPACK_BELOW"]

#: A remote root's mirror is brought up to date at most this often (each pull lists the bucket).
REMOTE_REFRESH_SECONDS = 10.0
#: The defaults of ``weightslab gc``: packs younger than this are left alone ...
GC_GRACE_SECONDS = 300.0
#: ... and a pack is rewritten when its live bytes are below this fraction of it.
GC_REPACK_BELOW = 0.5


@dataclass(frozen=True, kw_only=True)
class Overview:
    """One request's view of the root: every experiment and checkpoint, as the catalog has them now."""

    location: str
    experiments: list[ExperimentRow]
    checkpoints: list[CheckpointRow]
    changes: dict[str, tuple[str, ...]]  # experiment -> the changes from its parent (experiment.json)
    metrics: list[str]  # every metric name some checkpoint records, sorted
    storage: "Storage"
    warning: str | None = None  # a remote root that could not be refreshed, shown on the page


@dataclass(frozen=True, kw_only=True)
class Verification:
    """A verification run from this page (``--allow-actions``)."""

    ok: bool
    problem: str | None
    at: str  # local time it finished
    blobs: int
    nbytes: int


@dataclass(frozen=True, kw_only=True)
class Card:
    """One checkpoint, as its card shows it."""

    row: CheckpointRow
    names: tuple[str, ...]  # names of its experiment
    alone: int  # stored bytes only this checkpoint references
    codec: str | None  # lossy: the archive's codec and parameters
    max_abs: float | None  # lossy: the largest error of its tensors
    rel_l2: float | None
    verification: Verification | None
    parent: str | None  # "<hash>@<step>" its experiment branched from
    reason: str | None


@dataclass(frozen=True, kw_only=True)
class Storage:
    """Per experiment: bytes it alone holds (the catalog's ``bytes_alone``) and bytes it shares."""

    rows: list[ExperimentRow]
    shared: dict[str, int]  # experiment -> stored bytes of its blobs other experiments reference too
    total: int  # stored bytes of every blob a checkpoint references (each counted once)


@dataclass(eq=False)
class Site:
    """The page's source of truth: one root, opened once; the catalog read again per request."""

    root: Root
    allow_actions: bool = False
    _records: dict[str, tuple[tuple[int, int], tuple[str, ...]]] = field(default_factory=dict, repr=False)
    _verified: dict[str, Verification] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pulled: float = field(default_factory=time.monotonic, repr=False)  # Root.existing pulled just now
    _pull_error: str | None = field(default=None, repr=False)

    @classmethod
    def open(cls, location: str | Path | None = None, *, allow_actions: bool = False) -> "Site":
        """The site of an existing root (``NotARootError`` otherwise); a URL through the local mirror.
        The catalog is brought up to date now, so that the first page costs what every page costs
        (indexing 10,000 new manifests takes about a second)."""
        site = cls(Root.existing(location), allow_actions=allow_actions)
        with site.catalog() as catalog:
            catalog.refresh()
        return site

    @property
    def location(self) -> str:
        return self.root.location

    # --- reading --------------------------------------------------------------------------------
    def _refresh_remote(self) -> None:
        """A remote root's mirror, at most every ``REMOTE_REFRESH_SECONDS`` (a failure is shown, the
        mirror as last pulled is served)."""
        remote = self.root.remote
        if remote is None or time.monotonic() - self._pulled < REMOTE_REFRESH_SECONDS:
            return
        with self._lock:
            if time.monotonic() - self._pulled < REMOTE_REFRESH_SECONDS:
                return
            self._pulled = time.monotonic()
            try:
                remote.pull_index(mirror=True)
                self._pull_error = None
            except OSError as exc:
                self._pull_error = (f"{remote.url} could not be read ({type(exc).__name__}: {exc}); showing the "
                                    "mirror as last read")

    def catalog(self) -> Catalog:
        """A catalog brought up to date by its first query (close it; a context manager)."""
        self._refresh_remote()
        return Catalog(self.root.layout)

    def manager(self) -> "CheckpointManager":
        from ..storage.manager import CheckpointManager
        return CheckpointManager(self.root, sweep=False)  # (a sweep deletes files: this page only reads)

    def overview(self) -> Overview:
        with self.catalog() as catalog:
            experiments = catalog.experiments()
            checkpoints = catalog.checkpoints(refresh=False)  # (experiments() just refreshed the index)
            storage = _storage(catalog, experiments)
        metrics = sorted({name for row in checkpoints for name in row.metrics})
        changes = {row.hash: self._changes(row.hash) for row in experiments if row.parent}
        return Overview(location=self.location, experiments=experiments, checkpoints=checkpoints, changes=changes,
                        metrics=metrics, storage=storage, warning=self._pull_error)

    def _changes(self, exp_hash: str) -> tuple[str, ...]:
        """The parent's ``changes`` lines from ``experiment.json``, cached by the file's stat."""
        path = self.root.layout.experiment_record(exp_hash)
        try:
            st = path.stat()
        except OSError:
            return ()
        key = (st.st_mtime_ns, st.st_size)
        cached = self._records.get(exp_hash)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            record = ExperimentRecord.from_bytes(path.read_bytes(), path=path)
        except (OSError, CorruptCheckpointError, FormatVersionError):
            return ()  # (the catalog already warned about a damaged record)
        lines = tuple(record.parent.changes) if record.parent else ()
        self._records[exp_hash] = (key, lines)
        return lines

    def resolve(self, ref: str) -> tuple[str, int]:
        """(experiment, step) of the one checkpoint ``ref`` means (any ref the command line takes)."""
        try:
            entries = self.manager().candidates(ref)
        except ValueError as exc:
            raise CheckpointNotFoundError(str(exc)) from None
        if not entries:
            raise CheckpointNotFoundError(f"{ref!r} names no checkpoint under {self.location}; the lineage above "
                                          "lists what is there")
        return entries[0].experiment, entries[0].step

    def card(self, ref: str) -> Card:
        experiment, step = self.resolve(ref)
        with self.catalog() as catalog:
            rows = [r for r in catalog.checkpoints(experiment) if r.step == step]  # (the one refresh)
            if not rows:
                raise CheckpointNotFoundError(f"{ref!r}: the catalog has no checkpoint {experiment}@{step} (deleted "
                                              "meanwhile?)")
            row = rows[0]
            alone, names = catalog.bytes_alone(experiment, step), catalog.names_of(experiment)
            parent, reason = catalog.parent_of(experiment)
        codec = max_abs = rel_l2 = None
        if not row.exact:  # the codec and its error are in the manifest, not the catalog
            manifest = self.manager().read_manifest(Path(row.path))
            archive = dict(manifest.archive)
            settings = " ".join(f"{k}={v}" for k, v in dict(archive.get("params", {})).items() if k != "codec")
            codec = f"{archive.get('codec', '?')} {settings}".strip()
            max_abs, rel_l2 = _number(archive.get("max_abs")), _number(archive.get("rel_l2"))
        with self._lock:
            verification = self._verified.get(row.ref)
        return Card(row=row, names=names, alone=int(alone), codec=codec, max_abs=max_abs, rel_l2=rel_l2,
                    verification=verification, parent=parent, reason=reason)

    def reclaimable(self, *, grace_seconds: float = GC_GRACE_SECONDS,
                    repack_below: float = GC_REPACK_BELOW) -> "GcReport":
        """What ``weightslab gc`` would free now: its rule (:func:`~weightslab.storage.garbage.sweep_packs`)
        applied to the catalog's blob references (delta bases and archive anchors and links included)
        and the pack headers, without gc's exclusive lock, which would make a training commit wait. A
        snapshot: a save committing meanwhile can make it stale, never the root different. Sharded
        saves' directories are not counted; on a remote root (its packs are not in the mirror) it is empty."""
        from ..storage.garbage import GcReport, sweep_packs
        from ..storage.store import BlobIndex
        with self.catalog() as catalog:
            live = catalog.live_digests()
        layout = self.root.layout
        packs = [] if self.root.remote is not None else BlobIndex(layout).packs()
        sweep = sweep_packs(packs, live, now=time.time(), grace_seconds=grace_seconds, repack_below=repack_below,
                            deletable=lambda info: layout.contains(info.path))
        return GcReport(packs_deleted=len(sweep.delete), packs_rewritten=len(sweep.rewrite),
                        bytes_freed=sweep.bytes_freed, bytes_live=sweep.bytes_live,
                        bytes_dead_kept=sweep.bytes_dead_kept, live_blobs=sweep.live_blobs, dry_run=True)

    def compare(self, a: str, b: str) -> "Comparison":
        """``weightslab diff a b`` (imports torch: ImportError where it cannot be imported)."""
        from ..cli.comparison import compare
        manager = self.manager()
        ea, eb = (self._entry(manager, ref) for ref in (a, b))
        return compare(manager, manager.read_manifest(ea), manager.read_manifest(eb))

    def _entry(self, manager: "CheckpointManager", ref: str) -> Any:
        try:
            entries = manager.candidates(ref)
        except ValueError as exc:
            raise CheckpointNotFoundError(str(exc)) from None
        if not entries:
            raise CheckpointNotFoundError(f"{ref!r} names no checkpoint under {self.location}")
        return entries[0]

    # --- the one action ---------------------------------------------------------------------------
    def verified(self) -> Mapping[str, Verification]:
        with self._lock:
            return dict(self._verified)

    def verify(self, ref: str) -> Verification:
        """Read back and check every byte of one checkpoint (only with ``allow_actions``: on a remote
        root it fetches its packs into the mirror). It writes nothing to the root."""
        if not self.allow_actions:
            raise PermissionError("verifying from the page needs `weightslab ui --allow-actions`; or run "
                                  f"`weightslab verify {ref}`")
        experiment, step = self.resolve(ref)
        report = self.manager().verify(f"{experiment}@{step}")
        problem = "; ".join(why for _, why in report.damaged) or None
        result = Verification(ok=report.ok, problem=problem, at=time.strftime("%H:%M:%S"), blobs=report.blobs,
                              nbytes=report.nbytes)
        with self._lock:
            self._verified[f"{experiment}@{step}"] = result
        return result


def _storage(catalog: Catalog, rows: list[ExperimentRow]) -> Storage:
    referenced, total = catalog.referenced_bytes()
    shared = {r.hash: max(referenced.get(r.hash, 0) - r.bytes_alone, 0) for r in rows}
    return Storage(rows=rows, shared=shared, total=total)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None

