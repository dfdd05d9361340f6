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
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, WeightslabError
from .layout import PACK_SUFFIX
from .manager import CheckpointManager
from .manifest import Manifest
from .remote import RemoteRoot, modified

__all__ = ["GcReport", "collect", "collect_remote"]

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

    def __str__(self) -> str:
        verb = "would free" if self.dry_run else "freed"
        shards = f", {self.shard_sets_deleted} sharded saves deleted" if self.shard_sets_deleted else ""
        return (f"{verb} {self.bytes_freed:,} bytes ({self.packs_deleted} packs deleted{shards}, {self.packs_rewritten} "
                f"rewritten); {self.live_blobs} live blobs hold {self.bytes_live:,} bytes; "
                f"{self.bytes_dead_kept:,} dead bytes left in young or mostly live packs")


def collect(manager: CheckpointManager, *, grace_seconds: float = 300.0, repack_below: float = 0.5,
            dry_run: bool = False) -> GcReport:
    """Delete or rewrite packs holding blobs that no committed checkpoint references.

    ``repack_below``: a pack whose live bytes are less than this fraction of its bytes is
    rewritten with only its live blobs (0 never rewrites). ``dry_run`` only reports.
    """
    if grace_seconds < 0 or not 0 <= repack_below <= 1:
        raise ValueError("grace_seconds must be >= 0 and repack_below between 0 and 1")
    store = manager.store
    with store.lock(exclusive=True):
        live: set[str] = set()
        live_shards: set[Path] = set()
        for entry in manager.checkpoints():
            try:
                manifest = manager.read_manifest(entry)
            except CheckpointNotFoundError:
                continue  # deleted by retention meanwhile
            except CorruptCheckpointError as exc:
                # Its blobs are unknown: collecting now could delete what a repair would need.
                raise WeightslabError(
                    f"garbage collection stopped before deleting anything: {exc}. Delete that manifest (the "
                    "checkpoint cannot be restored anyway) or restore it from a backup, then run gc again.") from exc
            for tensor in manifest.tensors.values():
                live.update(ref.digest for ref in tensor.blob.chain())
            shards = manager.shards(manifest)
            if shards is not None:
                live_shards.add(shards[0])
        now = time.time()
        deleted = rewritten = freed = live_bytes = dead_kept = live_count = 0
        counted: set[str] = set()
        for info in store.packs():
            alive = [b for b in info.blobs if b.digest in live]
            for b in alive:
                if b.digest not in counted:
                    counted.add(b.digest)
                    live_count += 1
                    live_bytes += b.nbytes
            dead = sum(b.nbytes for b in info.blobs if b.digest not in live)
            if dead == 0:
                continue
            kept = sum(b.nbytes for b in alive)
            if now - info.mtime < grace_seconds or (alive and kept >= repack_below * (kept + dead)):
                dead_kept += dead
                continue
            if not alive:
                deleted += 1
                freed += info.size
                if not dry_run:
                    store.delete_pack(info)
                continue
            rewritten += 1
            if dry_run:
                freed += dead
                continue
            new_pack = store.repack(info, {b.digest for b in alive})
            new_size = store.layout.pack(new_pack).stat().st_size if new_pack else 0
            freed += info.size - new_size
        # Sharded saves (a directory per checkpoint, written by every rank of a job) whose manifest
        # retention deleted, or that never committed; young ones may be a save still being written.
        shard_sets = 0
        for exp in manager.layout.experiments():
            base = manager.layout.shards_dir(exp)
            for directory in sorted(base.iterdir()) if base.is_dir() else ():
                if directory in live_shards or not directory.is_dir() or now - directory.stat().st_mtime < grace_seconds:
                    continue
                shard_sets += 1
                freed += sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
                if not dry_run:
                    shutil.rmtree(directory)
    report = GcReport(packs_deleted=deleted, packs_rewritten=rewritten, bytes_freed=freed, bytes_live=live_bytes,
                      bytes_dead_kept=dead_kept, live_blobs=live_count, dry_run=dry_run, shard_sets_deleted=shard_sets)
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
            for blob in tensor.blob.chain():
                live.add(blob.pack)
                digests.add(blob.digest)
        live_shards.update(remote.path_of(f) for f in remote.shard_files(manifest))
    now = time.time()
    deleted = freed = live_bytes = dead_kept = 0
    objects = fs.glob(f"{base}/objects/*/*")
    shard_files = [f for f in fs.glob(f"{base}/checkpoints/*/shards/*/*") if f not in live_shards]
    shard_sets = set()
    for path in shard_files:  # sharded saves whose manifest was deleted (or never uploaded)
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
        if not temporary and not name.endswith(PACK_SUFFIX):
            continue
        info = fs.info(path)
        size = int(info.get("size") or 0)
        pack = folder + name[: -len(PACK_SUFFIX)] if not temporary else None
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
                      shard_sets_deleted=len(shard_sets))
    log.info("garbage collection of %s: %s", remote.url, report)
    return report
