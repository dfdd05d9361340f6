"""The catalog: ``<root>/index.sqlite``, an index of a root's experiments, checkpoints, metrics,
blob references and lineage, so that listing a root and finding the best checkpoint by a metric
stay fast with 10,000 checkpoints.

Reading every manifest costs one JSON parse and one digest per checkpoint, seconds for a large
root; the catalog keeps what listings need in SQLite and brings it up to date at every query by
stat-ing the manifests and reading only those whose (path, mtime, size) is new or changed. It is
derived data: the manifests and ``experiment.json`` files stay the truth, the index can be deleted
at any time, and a damaged or outdated one is rebuilt by itself. It writes nothing but
``index.sqlite`` and SQLite's own ``-wal`` / ``-shm`` (or ``-journal``) files beside it::

    with Catalog(CheckpointManager(root)) as catalog:
        for row in catalog.experiments():
            print(row.hash, row.names, row.last_step, row.bytes_alone, row.best)
        catalog.best(row.hash, "loss")

Concurrency: a training process may commit checkpoints while several command lines refresh the
same index. Manifests are read outside any lock; the changes are then written in one ``BEGIN
IMMEDIATE`` transaction that checks again, under the write lock, what another refresh already did,
so refreshing is idempotent. A refresh that finds nothing new writes nothing and takes no lock.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence, TypeVar

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, WeightslabError
from ..retention import CheckpointRecord, KeepBest
from ..storage.experiment import ExperimentRecord
from ..storage.identifiers import MAX_COUNT
from ..storage.layout import Layout
from ..storage.manifest import Manifest
from ..storage.names import read_names

if TYPE_CHECKING:
    from ..storage.manager import CheckpointManager

__all__ = ["Catalog", "CheckpointRow", "ExperimentRow", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: Kept in ``PRAGMA user_version``; an index of another version is deleted and rebuilt.
SCHEMA_VERSION = 4

#: How long a refresh waits for another process's write transaction (they last milliseconds).
BUSY_TIMEOUT_SECONDS = 10.0

# Filesystems on which SQLite's WAL mode is unsafe (it needs shared memory between the processes
# of one machine); the index uses a rollback journal there.
_NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "afs", "ceph", "lustre", "gpfs", "glusterfs", "beegfs",
    "9p", "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.rclone",
})

# Roots whose index could not be opened for writing: warned about once per process.
_WARNED_IN_MEMORY: set[Path] = set()

# One statement per entry: sqlite3's executescript() commits the open transaction first.
_SCHEMA: tuple[str, ...] = (
    # hash: every experiment directory of the root. record_mtime_ns / record_size: stat of the
    # experiment.json the row was read from (NULL: no readable record, looked at again each refresh).
    """CREATE TABLE experiments (
        hash TEXT PRIMARY KEY,
        record_mtime_ns INTEGER,
        record_size INTEGER,
        parent TEXT,
        reason TEXT,
        branch TEXT,
        created TEXT
    ) WITHOUT ROWID""",
    "CREATE TABLE names (name TEXT PRIMARY KEY, experiment TEXT NOT NULL) WITHOUT ROWID",
    # One row per readable manifest; (path, mtime_ns, size) decides whether it must be read again.
    # path is relative to the root (POSIX separators), so a moved or copied root keeps its index.
    """CREATE TABLE checkpoints (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        mtime_ns INTEGER NOT NULL,
        size INTEGER NOT NULL,
        experiment TEXT NOT NULL,
        step INTEGER NOT NULL,
        created_ns INTEGER NOT NULL,
        reasons TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        superseded INTEGER NOT NULL,
        chain INTEGER NOT NULL
    )""",
    "CREATE INDEX checkpoints_by_experiment ON checkpoints (experiment, step)",
    "CREATE INDEX checkpoints_by_time ON checkpoints (created_ns, step)",
    # value NULL: NaN (SQLite has no NaN; NULL is also what MIN() and ORDER BY best skip).
    """CREATE TABLE metrics (
        checkpoint_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        value REAL,
        PRIMARY KEY (checkpoint_id, name)
    ) WITHOUT ROWID""",
    "CREATE INDEX metrics_by_name ON metrics (name, value)",
    # Every blob a checkpoint needs, delta bases included (what deleting it could free).
    """CREATE TABLE blobs (
        checkpoint_id INTEGER NOT NULL,
        digest TEXT NOT NULL,
        nbytes INTEGER NOT NULL,
        PRIMARY KEY (checkpoint_id, digest)
    ) WITHOUT ROWID""",
    "CREATE INDEX blobs_by_digest ON blobs (digest, checkpoint_id, nbytes)",
    # Per-experiment aggregates, recomputed in the transaction that changes checkpoints, so that
    # listing (the frequent query) reads one row per experiment whatever the number of blobs.
    """CREATE TABLE summary (
        experiment TEXT PRIMARY KEY,
        checkpoints INTEGER NOT NULL,
        first_step INTEGER,
        last_step INTEGER,
        bytes_alone INTEGER NOT NULL,
        dropped INTEGER NOT NULL,
        archived INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE best (
        experiment TEXT NOT NULL,
        metric TEXT NOT NULL,
        value REAL NOT NULL,
        highest REAL NOT NULL,
        PRIMARY KEY (experiment, metric)
    ) WITHOUT ROWID""",
)

_TABLES = ("experiments", "names", "checkpoints", "metrics", "blobs", "summary", "best")

_SUMMARY = """
INSERT INTO summary (experiment, checkpoints, first_step, last_step, bytes_alone, dropped, archived)
SELECT c.experiment, c.n, c.first_step, c.last_step, COALESCE(a.bytes_alone, 0), c.dropped, c.archived
FROM (SELECT experiment, COUNT(*) AS n, MIN(step) AS first_step, MAX(step) AS last_step,
             SUM(superseded) AS dropped, SUM(chain > 0) AS archived
      FROM checkpoints GROUP BY experiment) AS c
LEFT JOIN (
    -- a blob is an experiment's alone when every checkpoint referencing it belongs to it
    -- (TOTAL, a float, never overflows: blobs' sizes are checked one by one, not their sum)
    SELECT experiment, TOTAL(nbytes) AS bytes_alone FROM (
        SELECT MIN(c.experiment) AS experiment, MAX(b.nbytes) AS nbytes
        FROM blobs AS b JOIN checkpoints AS c ON c.id = b.checkpoint_id
        GROUP BY b.digest
        HAVING MIN(c.experiment) = MAX(c.experiment))
    GROUP BY experiment) AS a ON a.experiment = c.experiment
"""

_BEST = """
INSERT INTO best (experiment, metric, value, highest)
SELECT c.experiment, m.name, MIN(m.value), MAX(m.value)
FROM metrics AS m JOIN checkpoints AS c ON c.id = m.checkpoint_id
WHERE m.value IS NOT NULL
GROUP BY c.experiment, m.name
"""

_CHECKPOINT_COLUMNS = "c.id, c.experiment, c.step, c.created_ns, c.reasons, c.nbytes, c.path, c.chain"


@dataclass(frozen=True, kw_only=True)
class ExperimentRow:
    """One experiment of the root, as a listing shows it."""

    hash: str
    names: tuple[str, ...]  # human names pointing at it, sorted
    parent: str | None  # "<hash>@<step>" of the checkpoint it branched from
    reason: str | None  # why it branched: "config_change", "model_change", "fork", ...
    branch: str | None  # a fork's branch
    created: str | None  # from experiment.json (None: missing or unreadable)
    first_step: int | None
    last_step: int | None  # the latest (highest) step
    checkpoints: int
    bytes_alone: int  # stored bytes only its checkpoints reference: what deleting it would free
    dropped: int  # saves replaced before they were written (backpressure="latest"), as recorded
    archived: int  # of its checkpoints, those demoted to the lossy archive
    best: dict[str, float]  # lowest value of each metric its checkpoints record (NaN ignored)
    highest: dict[str, float]  # highest value of each (for metrics where higher is better)


@dataclass(frozen=True, kw_only=True)
class CheckpointRow:
    """One committed checkpoint, as a listing shows it."""

    experiment: str
    step: int
    created_ns: int
    reasons: tuple[str, ...]
    metrics: dict[str, float]  # NaN stays NaN here
    nbytes: int  # stored bytes of its tensors
    path: str
    chain: int = 0  # 0: exact; else archived, with chains of up to this many lossy links

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"

    @property
    def exact(self) -> bool:
        return self.chain == 0


@dataclass(frozen=True)
class _Indexed:
    """What the index keeps of one manifest, read outside the transaction."""

    path: str
    mtime_ns: int
    size: int
    experiment: str
    step: int
    created_ns: int
    reasons: str  # JSON list
    nbytes: int
    superseded: int  # older saves this checkpoint replaced before they were written
    chain: int  # 0: exact; else the longest chain of lossy links of its archived tensors
    metrics: tuple[tuple[str, float | None], ...]
    blobs: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class _ExperimentIndexed:
    hash: str
    mtime_ns: int | None
    size: int | None
    parent: str | None = None
    reason: str | None = None
    branch: str | None = None
    created: str | None = None


class _Corrupt(Exception):
    """The index file is not a usable index of this version (the message says why)."""


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """True for an index that must be rebuilt; False for one that cannot be written (read-only,
    locked too long, full disk), where a rebuild would fail the same way."""
    if not isinstance(exc, sqlite3.OperationalError):
        return True  # not a database, malformed image, constraint broken by a foreign writer
    text = str(exc).lower()
    return "no such table" in text or "no such column" in text or "malformed" in text


def _on_network_filesystem(path: Path) -> bool:
    """Whether ``path`` is on a network filesystem (Linux: /proc/self/mounts; elsewhere: no)."""
    try:
        with open("/proc/self/mounts", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    real = os.path.realpath(path)
    mount, fstype = "", ""
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(mount):
            mount, fstype = point, fields[2]
    return fstype in _NETWORK_FILESYSTEMS


def _float_or_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _metrics(manifest: Manifest) -> tuple[tuple[str, float | None], ...]:
    return tuple((name, None if math.isnan(value) else value) for name, value in manifest.numeric_metrics().items())


def _superseded(manifest: Manifest) -> int:
    return sum(len(c["steps"]) for c in manifest.changes
               if isinstance(c, Mapping) and c.get("kind") == "superseded" and isinstance(c.get("steps"), list))


def _read_manifest(path: Path, experiment: str, key: str) -> _Indexed:
    """The index entry of one manifest; the stat is taken from the open file, so it describes
    exactly the bytes read (a manifest replaced meanwhile is read again at the next refresh)."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    manifest = Manifest.from_bytes(data, path=path)  # (every field checked: steps and sizes fit an INTEGER)
    blobs: dict[str, int] = {}
    for tensor in manifest.tensors.values():
        for ref in tensor.blobs():  # a delta needs its base: deleting it would not free the base
            blobs[ref.digest] = ref.nbytes
    if manifest.total_bytes > MAX_COUNT:
        raise CorruptCheckpointError(f"manifest {path} records {manifest.total_bytes:,} bytes of tensors, more than "
                                     "any root holds; it was damaged or edited", path=path)
    return _Indexed(path=key, mtime_ns=st.st_mtime_ns, size=st.st_size, experiment=experiment,
                    step=manifest.step, created_ns=manifest.created_ns, reasons=json.dumps(list(manifest.reasons)),
                    nbytes=manifest.total_bytes, superseded=_superseded(manifest),
                    chain=max((len(t.links) for t in manifest.tensors.values() if not t.exact), default=0),
                    metrics=_metrics(manifest),
                    blobs=tuple(blobs.items()))


def _read_experiment(path: Path, exp_hash: str) -> _ExperimentIndexed:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        data = f.read()
    record = ExperimentRecord.from_bytes(data, path=path)
    parent = record.parent
    return _ExperimentIndexed(hash=exp_hash, mtime_ns=st.st_mtime_ns, size=st.st_size,
                              parent=parent.ref if parent else None, reason=parent.reason if parent else None,
                              branch=record.branch, created=record.created)


class Catalog:
    """The SQLite index of one root (``<root>/index.sqlite``), brought up to date by every query.

    A missing index is created; a damaged one, or one of another schema version, is deleted and
    rebuilt with a warning. When the root is read-only (or the index cannot be written), the
    index is built in memory from the manifests instead, so listing still works. Close it, or use
    it as a context manager.
    """

    def __init__(self, root: "CheckpointManager | Layout", *,
                 read_manifest: Callable[[Path, str, str], Any] | None = None) -> None:
        # (``read_manifest(path, experiment, key)`` indexes one manifest: a test passes its own to see
        # which manifests a refresh reads)
        self.layout = root.layout if hasattr(root, "layout") else root
        self._read_manifest = read_manifest or _read_manifest
        self.path = self.layout.catalog_path
        self.in_memory = False  # True when the index could not be written (see _open_memory)
        self._identity: tuple[int, int] | None = None  # (device, inode) of the index file opened
        self._conn: sqlite3.Connection | None = None
        self._conn = self._open()

    # --- opening ----------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        try:
            return self._open_file()
        except _Corrupt as exc:
            log.warning("the catalog %s is unusable (%s); deleting it and rebuilding it from the manifests "
                        "(it is derived data, nothing is lost)", self.path, exc)
            try:
                self._delete_files()
            except OSError as error:  # a read-only root: the damaged file cannot go
                return self._open_memory(error)
        except sqlite3.OperationalError as exc:
            return self._open_memory(exc)
        try:
            return self._open_file()
        except (_Corrupt, sqlite3.DatabaseError) as exc:
            return self._open_memory(exc)

    def _open_file(self) -> sqlite3.Connection:
        """The index file, open for writing, with this version's schema (created if the file is
        new). Raises _Corrupt for a file that is not such an index, OperationalError for one that
        cannot be opened or written."""
        if not self.layout.root.is_dir():
            # sqlite would create the file but not the root; and a catalog never creates a root.
            raise sqlite3.OperationalError(f"the root {self.layout.root} does not exist")
        if any(os.path.islink(f"{self.path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")):
            # SQLite would write where the link points: never outside the root (a shared root may hold one)
            raise sqlite3.OperationalError(f"{self.path} (or a file SQLite keeps beside it) is a symbolic link")
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            self._identity = self._file_identity()
            try:
                journal = "DELETE" if _on_network_filesystem(self.layout.root) else "WAL"
                conn.execute(f"PRAGMA journal_mode={journal}").fetchone()
                conn.execute("PRAGMA synchronous=NORMAL")  # derived data: a lost last commit is re-read
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    self._create_schema(conn)
                elif version != SCHEMA_VERSION:
                    raise _Corrupt(f"schema version {version}, this weightslab uses {SCHEMA_VERSION}")
                else:
                    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                    if not tables.issuperset(_TABLES):
                        raise _Corrupt(f"tables missing: {', '.join(sorted(set(_TABLES) - tables))}")
            except sqlite3.DatabaseError as exc:
                if _is_corruption(exc):
                    raise _Corrupt(str(exc)) from None
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Checked again under the write lock: another process may have created it meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0]:
                    raise _Corrupt("a SQLite database without a weightslab schema version")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _open_memory(self, why: BaseException) -> sqlite3.Connection:
        if self.layout.root not in _WARNED_IN_MEMORY:
            _WARNED_IN_MEMORY.add(self.layout.root)
            log.warning("the catalog %s cannot be written (%s); indexing the manifests in memory instead, "
                        "which reads every manifest each time: make the root writable to keep an index",
                        self.path, why)
        self.in_memory = True
        conn = sqlite3.connect(":memory:", isolation_level=None)
        for statement in _SCHEMA:
            conn.execute(statement)
        return conn

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino

    def _delete_files(self) -> None:
        """Delete the index file this catalog opened, with SQLite's files beside it; nothing if
        another process already replaced it (it found the same damage and rebuilt it first)."""
        current = self._file_identity()
        if current is not None and current != self._identity:
            return
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(f"{self.path}{suffix}")
            except FileNotFoundError:
                pass

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise WeightslabError(f"the catalog of {self.layout.root} is closed; open a new Catalog(manager)")
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- keeping it up to date --------------------------------------------------------------
    def refresh(self) -> None:
        """Bring the index up to date with the manifests and experiment records on disk."""
        self._recovering(lambda: self._refresh(rebuild=False))

    def reindex(self) -> int:
        """Drop every row and index the root again from its manifests; returns the number of
        checkpoints indexed (unreadable manifests are skipped with a warning)."""
        def work() -> int:
            self._refresh(rebuild=True)
            return int(self._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0])
        return self._recovering(work)

    def _recovering(self, work: Callable[[], _T]) -> _T:
        """``work()``; if the index turns out damaged, rebuilt and ``work()`` again; if it cannot
        be written (read-only, locked longer than the busy timeout), in memory and again."""
        try:
            return work()
        except sqlite3.DatabaseError as exc:
            if self.in_memory:
                raise
            if _is_corruption(exc):
                log.warning("the catalog %s is damaged (%s); deleting it and rebuilding it from the manifests "
                            "(it is derived data, nothing is lost)", self.path, exc)
                self.close()
                try:
                    self._delete_files()
                except OSError as error:
                    self._conn = self._open_memory(error)
                else:
                    self._conn = self._open()
            else:
                self.close()
                self._conn = self._open_memory(exc)
        return work()

    def _refresh(self, *, rebuild: bool) -> None:
        db = self._db
        # 1. What is on disk: stat only (cheap); no lock held.
        on_disk: dict[str, tuple[str, int, int]] = {}  # path -> (experiment, mtime_ns, size)
        records: dict[str, tuple[int, int] | None] = {}  # experiment -> stat of experiment.json
        for h in self.layout.experiments():
            records[h] = self._stat(self.layout.experiment_record(h))
            for _step, path in self.layout.manifests(h):
                st = self._stat(path)
                if st is not None:
                    on_disk[self._key(path)] = (h, *st)
        # 2. What the index holds (a snapshot; checked again under the write lock).
        stored = {} if rebuild else {p: (m, s) for p, m, s in db.execute("SELECT path, mtime_ns, size FROM checkpoints")}
        stored_records = {} if rebuild else {
            h: (None if m is None else (m, s))
            for h, m, s in db.execute("SELECT hash, record_mtime_ns, record_size FROM experiments")}
        # 3. Read what is new or changed, outside the transaction (the slow part of a first build).
        read: list[_Indexed] = []
        unreadable: set[str] = set()
        for path, (h, mtime, size) in on_disk.items():
            if stored.get(path) == (mtime, size):
                continue
            try:
                read.append(self._read_manifest(self.layout.root / path, h, path))
            except (FileNotFoundError, CheckpointNotFoundError):
                unreadable.add(path)  # deleted since the listing
            except (OSError, WeightslabError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
                    OverflowError) as exc:  # (one unreadable manifest never stops a listing)
                log.warning("the catalog skips the checkpoint manifest %s: it cannot be read (%s); it is tried "
                            "again at the next refresh, and wl.verify() lists every damaged checkpoint",
                            self.layout.root / path, exc)
                unreadable.add(path)
        gone = (set(stored) - set(on_disk)) | (unreadable & set(stored))
        experiments = []
        for h, st in records.items():
            if h in stored_records and stored_records[h] == st:
                continue
            experiments.append(self._experiment_entry(h, st))
        experiments_gone = set(stored_records) - set(records)
        names = read_names(self.layout)
        names_changed = rebuild or names != dict(db.execute("SELECT name, experiment FROM names"))
        if not (rebuild or read or gone or experiments or experiments_gone or names_changed):
            return  # nothing new: no lock taken, nothing written
        # 4. Write it all in one transaction, re-checking under the lock what another refresh did.
        db.execute("BEGIN IMMEDIATE")
        try:
            changed = self._apply(db, rebuild=rebuild, read=read, gone=gone, unreadable=unreadable,
                                  experiments=experiments, experiments_gone=experiments_gone)
            if names_changed:
                db.execute("DELETE FROM names")
                db.executemany("INSERT INTO names (name, experiment) VALUES (?, ?)", sorted(names.items()))
            if changed:
                db.execute("DELETE FROM summary")
                db.execute(_SUMMARY)
                db.execute("DELETE FROM best")
                db.execute(_BEST)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _key(self, path: Path) -> str:
        """How the index names a file: relative to the root, so a moved or copied root keeps its index."""
        text = os.fspath(path)
        prefix = os.path.join(self.layout.root, "")
        # (string slicing: Path.relative_to is most of the cost of a refresh that finds nothing new)
        relative = text[len(prefix):] if text.startswith(prefix) else os.path.relpath(text, self.layout.root)
        return relative if os.sep == "/" else relative.replace(os.sep, "/")

    @staticmethod
    def _stat(path: Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def _experiment_entry(self, h: str, st: tuple[int, int] | None) -> _ExperimentIndexed:
        path = self.layout.experiment_record(h)
        if st is None:
            return _ExperimentIndexed(hash=h, mtime_ns=None, size=None)  # no record (yet): no lineage
        try:
            return _read_experiment(path, h)
        except FileNotFoundError:
            return _ExperimentIndexed(hash=h, mtime_ns=None, size=None)
        except (OSError, WeightslabError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # Stored without a stat, so it is read again at the next refresh.
            log.warning("the catalog lists experiment %s without its lineage: %s cannot be read (%s)", h, path, exc)
            return _ExperimentIndexed(hash=h, mtime_ns=None, size=None)

    def _apply(self, db: sqlite3.Connection, *, rebuild: bool, read: Sequence[_Indexed], gone: Iterable[str],
               unreadable: set[str], experiments: Sequence[_ExperimentIndexed],
               experiments_gone: Iterable[str]) -> bool:
        """Write the changes; True if checkpoints or experiments changed (the aggregates must be
        recomputed). Runs inside the write transaction."""
        if rebuild:
            for table in _TABLES:
                db.execute(f"DELETE FROM {table}")
        current = {p: (i, m, s) for p, i, m, s in db.execute("SELECT path, id, mtime_ns, size FROM checkpoints")}
        delete_ids = []
        for path in gone:
            row = current.get(path)
            # Still there and readable: a concurrent refresh saw a manifest our listing missed.
            if row is not None and (path in unreadable or not (self.layout.root / path).exists()):
                delete_ids.append(row[0])
        inserts = []
        for entry in read:
            row = current.get(entry.path)
            if row is not None:
                if row[1:] == (entry.mtime_ns, entry.size):
                    continue  # another refresh indexed this very file meanwhile
                delete_ids.append(row[0])
            inserts.append(entry)
        changed = bool(delete_ids or inserts)
        if delete_ids:
            ids = [(i,) for i in delete_ids]
            db.executemany("DELETE FROM metrics WHERE checkpoint_id = ?", ids)
            db.executemany("DELETE FROM blobs WHERE checkpoint_id = ?", ids)
            db.executemany("DELETE FROM checkpoints WHERE id = ?", ids)
        for entry in inserts:
            cur = db.execute(
                "INSERT INTO checkpoints (path, mtime_ns, size, experiment, step, created_ns, reasons, nbytes, "
                "superseded, chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (entry.path, entry.mtime_ns, entry.size, entry.experiment, entry.step, entry.created_ns,
                 entry.reasons, entry.nbytes, entry.superseded, entry.chain))
            cid = cur.lastrowid
            db.executemany("INSERT INTO metrics (checkpoint_id, name, value) VALUES (?, ?, ?)",
                           [(cid, name, value) for name, value in entry.metrics])
            db.executemany("INSERT INTO blobs (checkpoint_id, digest, nbytes) VALUES (?, ?, ?)",
                           [(cid, digest, nbytes) for digest, nbytes in entry.blobs])
        for h in experiments_gone:
            if not self.layout.experiment_dir(h).is_dir():
                changed = True
                db.execute("DELETE FROM experiments WHERE hash = ?", (h,))
        if experiments:
            changed = True
            db.executemany(
                "INSERT OR REPLACE INTO experiments (hash, record_mtime_ns, record_size, parent, reason, branch, "
                "created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(e.hash, e.mtime_ns, e.size, e.parent, e.reason, e.branch, e.created) for e in experiments])
        return changed

    # --- queries ----------------------------------------------------------------------------
    def experiments(self) -> list[ExperimentRow]:
        """Every experiment of the root, oldest first (by ``created``, then hash; experiments
        without a readable record last)."""
        return self._recovering(self._experiments)

    def _experiments(self) -> list[ExperimentRow]:
        self._refresh(rebuild=False)
        db = self._db
        names: dict[str, list[str]] = {}
        for name, h in db.execute("SELECT name, experiment FROM names ORDER BY name"):
            names.setdefault(h, []).append(name)
        best: dict[str, dict[str, float]] = {}
        highest: dict[str, dict[str, float]] = {}
        for h, metric, value, high in db.execute(
                "SELECT experiment, metric, value, highest FROM best ORDER BY experiment, metric"):
            best.setdefault(h, {})[metric] = float(value)
            highest.setdefault(h, {})[metric] = float(high)
        rows = db.execute(
            "SELECT e.hash, e.parent, e.reason, e.branch, e.created, s.first_step, s.last_step, "
            "COALESCE(s.checkpoints, 0), COALESCE(s.bytes_alone, 0), COALESCE(s.dropped, 0), "
            "COALESCE(s.archived, 0) "
            "FROM experiments AS e LEFT JOIN summary AS s ON s.experiment = e.hash "
            "ORDER BY e.created IS NULL, e.created, e.hash")
        return [ExperimentRow(hash=h, names=tuple(names.get(h, ())), parent=parent, reason=reason, branch=branch,
                              created=created, first_step=first, last_step=last, checkpoints=int(n),
                              bytes_alone=int(alone), dropped=int(dropped), archived=int(archived),
                              best=best.get(h, {}), highest=highest.get(h, {}))
                for h, parent, reason, branch, created, first, last, n, alone, dropped, archived in rows]

    def checkpoints(self, experiment: str | None = None, *, refresh: bool = True) -> list[CheckpointRow]:
        """The committed checkpoints of the root, or of one experiment (its hash, or a name of it),
        oldest first (by the commit time recorded in each manifest, then step). ``refresh=False``
        reads the index as the last query left it (a caller that just refreshed)."""
        return self._recovering(lambda: self._checkpoints(experiment, refresh))

    def _checkpoints(self, experiment: str | None, refresh: bool = True) -> list[CheckpointRow]:
        if refresh:
            self._refresh(rebuild=False)
        db = self._db
        if experiment is None:
            rows = db.execute(f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints AS c ORDER BY c.created_ns, c.step")
            metric_rows = db.execute("SELECT checkpoint_id, name, value FROM metrics")
        else:
            h = self._resolve(experiment)
            rows = db.execute(f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints AS c WHERE c.experiment = ? "
                              "ORDER BY c.created_ns, c.step", (h,))
            metric_rows = db.execute("SELECT m.checkpoint_id, m.name, m.value FROM metrics AS m JOIN checkpoints AS c "
                                     "ON c.id = m.checkpoint_id WHERE c.experiment = ?", (h,))
        found = rows.fetchall()
        metrics: dict[int, dict[str, float]] = {}
        for cid, name, value in metric_rows:
            metrics.setdefault(cid, {})[name] = _float_or_nan(value)
        return [self._row(r, metrics.get(r[0], {})) for r in found]

    # --- what the index knows of blobs and names (as the last refresh left it) ---------------------
    def bytes_alone(self, experiment: str, step: int) -> int:
        """Stored bytes only checkpoint ``experiment@step`` references: what deleting it (then gc) frees."""
        return self._recovering(lambda: int(self._db.execute(
            "SELECT TOTAL(b.nbytes) FROM blobs AS b JOIN checkpoints AS c ON c.id = b.checkpoint_id "
            "WHERE c.experiment = ? AND c.step = ? AND NOT EXISTS (SELECT 1 FROM blobs AS o WHERE "
            "o.digest = b.digest AND o.checkpoint_id != b.checkpoint_id)", (experiment, step)).fetchone()[0] or 0))

    def names_of(self, experiment: str) -> tuple[str, ...]:
        """The human names pointing at ``experiment``, sorted."""
        return self._recovering(lambda: tuple(n for (n,) in self._db.execute(
            "SELECT name FROM names WHERE experiment = ? ORDER BY name", (experiment,))))

    def parent_of(self, experiment: str) -> tuple[str | None, str | None]:
        """(the ``<hash>@<step>`` ``experiment`` branched from, why), or (None, None)."""
        def work() -> tuple[str | None, str | None]:
            found = self._db.execute("SELECT parent, reason FROM experiments WHERE hash = ?", (experiment,)).fetchone()
            return (found[0], found[1]) if found else (None, None)
        return self._recovering(work)

    def live_digests(self) -> set[str]:
        """The digest of every blob a committed checkpoint references (delta bases, archive anchors and
        links included): what garbage collection keeps."""
        return self._recovering(lambda: {d for (d,) in self._db.execute("SELECT DISTINCT digest FROM blobs")})

    def referenced_bytes(self) -> tuple[dict[str, int], int]:
        """({experiment: bytes of the distinct blobs its checkpoints reference}, bytes of every distinct
        blob referenced in the root)."""
        def work() -> tuple[dict[str, int], int]:
            per = {h: int(n) for h, n in self._db.execute(
                "SELECT experiment, TOTAL(nbytes) FROM (SELECT c.experiment AS experiment, MAX(b.nbytes) AS nbytes "
                "FROM blobs AS b JOIN checkpoints AS c ON c.id = b.checkpoint_id GROUP BY c.experiment, b.digest) "
                "GROUP BY experiment")}
            total = self._db.execute("SELECT TOTAL(n) FROM (SELECT MAX(nbytes) AS n FROM blobs GROUP BY digest)")
            return per, int(total.fetchone()[0] or 0)
        return self._recovering(work)

    def best(self, experiment: str, metric: str, mode: str = "min") -> CheckpointRow | None:
        """The checkpoint of ``experiment`` (its hash, or a name of it) with the lowest ``metric``
        (``mode="max"``: the highest); ties go to the earlier checkpoint, as ``@best`` refs do.
        None when no checkpoint records the metric (NaN values do not count)."""
        if mode not in ("min", "max"):
            raise ValueError(f"Catalog.best: mode must be 'min' (lower is better) or 'max' (higher is better), "
                             f"got {mode!r}")
        return self._recovering(lambda: self._best(experiment, metric, mode))

    def _best(self, experiment: str, metric: str, mode: str) -> CheckpointRow | None:
        # Ranked as every "best" is (retention's KeepBest, the @best refs): one definition of the order.
        rows = {CheckpointRecord(r.experiment, r.step, r.created_ns, metrics=r.metrics): r
                for r in self._checkpoints(experiment)}
        ranked = KeepBest(k=1, metric=metric, mode=mode).ranked(list(rows))
        return rows[ranked[0]] if ranked else None

    def _resolve(self, experiment: str) -> str:
        """A name of an experiment -> its hash; anything else as it is (names never look like hashes)."""
        found = self._db.execute("SELECT experiment FROM names WHERE name = ?", (experiment,)).fetchone()
        return found[0] if found else experiment

    def _row(self, row: Sequence[Any], metrics: dict[str, float]) -> CheckpointRow:
        _cid, experiment, step, created_ns, reasons, nbytes, path, chain = row
        return CheckpointRow(experiment=experiment, step=int(step), created_ns=int(created_ns),
                             reasons=tuple(json.loads(reasons)), metrics=metrics, nbytes=int(nbytes),
                             path=str(self.layout.root / path), chain=int(chain))
