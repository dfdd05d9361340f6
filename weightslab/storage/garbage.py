"""Garbage collection: reclaiming the blobs no committed checkpoint references any more.

Retention deletes manifests; the tensor bytes they referenced stay in ``objects/`` until garbage
collection finds that no manifest (nor any delta that a manifest needs) references them. A pack
whose blobs are all dead is deleted; a pack that is mostly dead is rewritten with its live blobs
(its old locations stay valid as hints: readers find moved blobs again by digest).

Two safety nets make this safe while other processes save into the same root: collection holds
the store's lock exclusively, so no commit can be between "reuse this blob" and "manifest
written" while it marks and sweeps; and it never touches a pack younger than ``grace_seconds``,
for writers on machines whose locks it cannot see (network filesystems).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet as Set
from typing import Any, Callable, Iterable

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, WeightslabError
from .identifiers import is_experiment_hash
from .layout import PACK_SUFFIX, Layout
from .manager import CheckpointManager
from .manifest import Manifest
from .remote import RemoteRoot, modified
from .store import PackInfo

__all__ = ["GcReport", "PackSweep", "collect", "collect_remote", "sweep_packs"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GcReport:
    packs_deleted: int
    packs_rewritten: int
    bytes_freed: int  # (would be freed, with dry_run)
    bytes_live: int  # stored bytes of live blobs
    bytes_dead_kept: int  # dead bytes left in place (young packs, packs mostly live)
    live_blobs: int
    dry_run: bool
    shard_sets_deleted: int = 0  # directories of sharded tensors no manifest references
    links_skipped: int = 0  # symbolic links found where packs or sharded saves live: never followed

    def __str__(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        shards = f", {self.shard_sets_deleted} sharded saves deleted" if self.shard_sets_deleted else ""
        links = f"; {self.links_skipped} symbolic links skipped" if self.links_skipped else ""
        return (f"{verb} {self.bytes_freed:,} bytes ({self.packs_deleted} packs deleted{shards}, {self.packs_rewritten} "
                f"rewritten); {self.live_blobs} live blobs hold {self.bytes_live:,} bytes; "
                f"{self.bytes_dead_kept:,} dead bytes left in young or mostly live packs{links}")


def _skip_link(path: Path | str) -> int:
    log.warning("garbage collection skips %s: it is a symbolic link, and weightslab never deletes through links "
                "(a link planted in a shared root must not make it delete what the link points to); move what it "
                "points to into the root, or remove the link", path)
    return 1


_FANOUT = re.compile(r"[0-9a-f]{2}")


def _is_shard_file(relative: str) -> bool:
    """``checkpoints/<hash>/shards/<hash>_step_<step>.<token>/<file>.safetensors``: a sharded save's file."""
    parts = relative.split("/")
    return len(parts) == 5 and is_experiment_hash(parts[1]) and parts[2] == "shards" and \
        Layout.is_shard_save(parts[3], parts[1]) and parts[4].endswith(PACK_SUFFIX) and not parts[4].startswith(".")


class _Links:
    """Whether a remote path, or a folder on its way from the root, is a symbolic link (only a local
    filesystem, ``file://``, has links; an object store is asked nothing)."""

    def __init__(self, fs: Any, base: str):
        protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
        self._local = bool({"file", "local"} & set(protocols))
        self._fs, self._base = fs, base
        self._seen: dict[str, bool] = {}

    def __call__(self, path: str) -> bool:
        if not self._local:
            return False
        parts = path[len(self._base) + 1:].split("/")
        for i in range(1, len(parts) + 1):
            here = "/".join([self._base, *parts[:i]])
            if here not in self._seen:
                self._seen[here] = bool(self._fs.info(here).get("islink"))
            if self._seen[here]:
                return True
        return False


@dataclass(frozen=True)
class PackSweep:
    """What collection does to the packs of a root, given the digests checkpoints reference:
    decided, not done (no lock, no deletion). ``bytes_freed`` is what deleting and rewriting frees
    (a rewritten pack's dead bytes; its header shrinks a little more)."""

    delete: tuple[PackInfo, ...]  # packs with no live blob
    rewrite: tuple[tuple[PackInfo, frozenset[str]], ...]  # mostly dead packs, with the digests they keep
    bytes_freed: int
    bytes_dead_kept: int  # dead bytes left in place: young packs, mostly live packs, packs it may not touch
    bytes_live: int  # stored bytes of the live blobs (each once)
    live_blobs: int


def sweep_packs(packs: Iterable[PackInfo], live: Set[str], *, now: float, grace_seconds: float,
                repack_below: float, deletable: Callable[[PackInfo], bool] = lambda info: True) -> PackSweep:
    """Collection's rule for packs: one with no live blob is deleted, one whose live bytes are below
    ``repack_below`` of it is rewritten, and any younger than ``grace_seconds`` (a writer on another
    machine may be about to reference it) or not ``deletable`` is left. Used by :func:`collect` under
    the store's lock, and without it for a dry-run figure (``weightslab ui``)."""
    delete: list[PackInfo] = []
    rewrite: list[tuple[PackInfo, frozenset[str]]] = []
    freed = dead_kept = live_bytes = 0
    counted: set[str] = set()
    for info in packs:
        alive = [b for b in info.blobs if b.digest in live]
        for b in alive:
            if b.digest not in counted:
                counted.add(b.digest)
                live_bytes += b.nbytes
        dead = sum(b.nbytes for b in info.blobs if b.digest not in live)
        if dead == 0:
            continue
        kept = sum(b.nbytes for b in alive)
        if now - info.mtime < grace_seconds or (alive and kept >= repack_below * (kept + dead)) or \
                not deletable(info):
            dead_kept += dead
        elif not alive:
            delete.append(info)
            freed += info.size
        else:
            rewrite.append((info, frozenset(b.digest for b in alive)))
            freed += dead
    return PackSweep(delete=tuple(delete), rewrite=tuple(rewrite), bytes_freed=freed, bytes_dead_kept=dead_kept,
                     bytes_live=live_bytes, live_blobs=len(counted))


def collect(manager: CheckpointManager, *, grace_seconds: float = 300.0, repack_below: float = 0.5,
            dry_run: bool = False) -> GcReport:
    """Delete or rewrite packs holding blobs that no committed checkpoint references.

    ``repack_below``: a pack whose live bytes are less than this fraction of its bytes is
    rewritten with only its live blobs (0 never rewrites). ``dry_run`` only reports.
    """
    if grace_seconds < 0 or not 0 <= repack_below <= 1:
        raise ValueError("grace_seconds must be >= 0 and repack_below between 0 and 1")
    store = manager.store
    layout = manager.layout
    with store.lock(exclusive=True):
        live: set[str] = set()
        live_shards: set[Path] = set()
        for entry in manager.checkpoints():
            try:
                manifest = manager.read_manifest(entry, sizes=False)  # (only its digests count here)
            except CheckpointNotFoundError:
                continue  # deleted by retention meanwhile
            except CorruptCheckpointError as exc:
                # Its blobs are unknown: collecting now could delete what a repair would need.
                raise WeightslabError(
                    f"garbage collection stopped before deleting anything: {exc}. Delete that manifest (the "
                    "checkpoint cannot be restored anyway) or restore it from a backup, then run gc again.") from exc
            for tensor in manifest.tensors.values():
                live.update(ref.digest for ref in tensor.blobs())
            shards = manager.shards(manifest)
            if shards is not None:
                live_shards.add(shards[0])
        now = time.time()
        links = sum(_skip_link(path) for path in layout.objects_links())
        deletable = layout.contains(layout.objects_dir)
        if not deletable and layout.objects_dir.is_dir():
            links += _skip_link(layout.objects_dir)
        sweep = sweep_packs(store.packs(), live, now=now, grace_seconds=grace_seconds, repack_below=repack_below,
                            deletable=lambda info: deletable and layout.contains(info.path))
        freed = sweep.bytes_freed
        if not dry_run:  # (what was freed, counted from the files: a rewritten pack's header shrinks too)
            freed = 0
            for info in sweep.delete:
                store.delete_pack(info)
                freed += info.size
            for info, keep in sweep.rewrite:
                new_pack = store.repack(info, set(keep))
                freed += info.size - (store.layout.pack(new_pack).stat().st_size if new_pack else 0)
        # Sharded saves (a directory per checkpoint, written by every rank of a job) whose manifest
        # retention deleted, or that never committed; young ones may be a save still being written.
        shard_sets = 0
        for exp in layout.experiments():  # (none of them a link)
            base = layout.shards_dir(exp)
            if os.path.islink(base) or not layout.contains(layout.experiment_dir(exp)):
                links += _skip_link(base)
                continue
            for directory in sorted(base.iterdir()) if base.is_dir() else ():
                if directory.is_symlink():
                    links += _skip_link(directory)
                    continue
                # only what a save of this experiment writes (rmtree itself never follows the links inside)
                if directory in live_shards or not Layout.is_shard_save(directory.name, exp) or \
                        not directory.is_dir() or now - directory.stat().st_mtime < grace_seconds:
                    continue
                shard_sets += 1
                freed += sum(f.stat().st_size for f in directory.iterdir() if f.is_file() and not f.is_symlink())
                if not dry_run:
                    shutil.rmtree(directory)
    report = GcReport(packs_deleted=len(sweep.delete), packs_rewritten=len(sweep.rewrite), bytes_freed=freed,
                      bytes_live=sweep.bytes_live, bytes_dead_kept=sweep.bytes_dead_kept, live_blobs=sweep.live_blobs,
                      dry_run=dry_run, shard_sets_deleted=shard_sets, links_skipped=links)
    log.info("garbage collection under %s: %s", manager.root, report)
    return report


def collect_remote(remote: RemoteRoot, *, grace_seconds: float = 300.0, dry_run: bool = False) -> GcReport:
    """Delete the packs of a remote root that no remote manifest references, and dead temporary objects.

    Packs (and temporary objects) younger than ``grace_seconds`` are left alone: a trainer uploads a
    checkpoint's packs before its manifest. A pack whose age the filesystem does not report is kept.
    Remote packs are never rewritten: a pack with one live blob stays whole.
    """
    if grace_seconds < 0:
        raise ValueError("grace_seconds must be >= 0")
    fs, base = remote.fs, remote.base
    live: set[str] = set()
    digests: set[str] = set()
    live_shards: set[str] = set()
    for path in fs.glob(f"{base}/checkpoints/*/model/*_step_*.json"):
        if path.rsplit("/", 1)[-1].startswith(".tmp."):
            continue
        try:
            manifest = Manifest.from_bytes(fs.cat_file(path), path=path)
        except CorruptCheckpointError as exc:
            raise WeightslabError(f"garbage collection of {remote.url} stopped before deleting anything: {exc}. "
                                  "Delete that manifest or restore it, then run gc again.") from exc
        for tensor in manifest.tensors.values():
            for blob in tensor.blobs():
                live.add(blob.pack)
                digests.add(blob.digest)
        live_shards.update(remote.path_of(f) for f in remote.shard_files(manifest))
    now = time.time()
    deleted = freed = live_bytes = dead_kept = links = 0
    linked = _Links(fs, base)
    objects = fs.glob(f"{base}/objects/*/*")
    shard_files = [f for f in fs.glob(f"{base}/checkpoints/*/shards/*/*") if f not in live_shards]
    shard_sets = set()
    for path in shard_files:  # sharded saves whose manifest was deleted (or never uploaded)
        if not _is_shard_file(path[len(base) + 1:]):
            continue  # not what a save writes: never ours to delete
        if linked(path):
            links += _skip_link(path)
            continue
        info = fs.info(path)
        written = modified(info)
        if written is None or now - written < grace_seconds:
            dead_kept += int(info.get("size") or 0)
            continue
        shard_sets.add(path.rsplit("/", 1)[0])
        freed += int(info.get("size") or 0)
        if not dry_run:
            fs.rm(path)
    for path in objects:
        folder, name = path.rsplit("/", 2)[-2:]
        temporary = name.startswith(".tmp.")
        pack = Layout.parse_pack_path(folder, name)
        if pack is None and not (temporary and _FANOUT.fullmatch(folder)):
            continue  # neither a pack nor an upload of one: not ours to delete
        if linked(path):
            links += _skip_link(path)
            continue
        info = fs.info(path)
        size = int(info.get("size") or 0)
        if pack in live:
            live_bytes += size
            continue
        written = modified(info)
        if written is None or now - written < grace_seconds:
            dead_kept += size
            continue
        deleted += 1
        freed += size
        if not dry_run:
            fs.rm(path)
    report = GcReport(packs_deleted=deleted, packs_rewritten=0, bytes_freed=freed, bytes_live=live_bytes,
                      bytes_dead_kept=dead_kept, live_blobs=len(digests), dry_run=dry_run,
                      shard_sets_deleted=len(shard_sets), links_skipped=links)
    log.info("garbage collection of %s: %s", remote.url, report)
    return report
