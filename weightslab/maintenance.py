"""Looking after a root: verifying every byte, applying retention, reclaiming unreferenced blobs.

These work on any root (``root=`` a path), by default the running checkpoint system's, and never
need the model's code::

    wl.verify()                                   # every checkpoint of the root
    wl.prune(keep_last=5, keep_best=1, metric="val_loss")
    wl.gc()                                       # reclaim what the pruned checkpoints held
    wl.name_experiment("baseline", "3fa2c1@latest")  # then "baseline@best:loss" works as a ref

While a checkpoint system runs, ``verify`` and ``prune`` are events of it (:mod:`weightslab.events`):
``verified`` callbacks run when a verification ends, on the caller's thread; ``pruned`` callbacks on
the events thread, with the refs deleted.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

from .errors import ConfigError
from .events import Pruned, Verified
from .process import manager_for, running_system
from .retention import Retention, RetentionPlan
from .storage import garbage
from .storage.archive import Archive, archive_of
from .storage.garbage import GcReport
from .storage.manager import VerifyReport
from .storage.remote import is_remote

__all__ = ["verify", "prune", "gc", "name_experiment"]



def verify(ref: str | os.PathLike[str] | None = None, *, root: str | os.PathLike[str] | None = None,
           progress: Callable[[int, int], None] | None = None) -> VerifyReport:
    """Check the digests of every blob of one checkpoint (``ref``) or of every checkpoint.

    Returns a :class:`~weightslab.storage.manager.VerifyReport`; ``report.ok`` is False and
    ``report.damaged`` names each bad checkpoint and file when something does not verify.
    """
    manager = manager_for(root)
    report = manager.verify(ref, progress=progress)
    running = running_system()
    if running is not None:
        running.events.emit("verified", Verified(event="verified", root=manager.root,
                                                 ref=None if ref is None else str(ref), report=report))
    return report


def prune(*, keep_last: int | None = None, keep_every: int | None = None, keep_best: int | None = None,
          metric: str | None = None, mode: str = "min", keep_changes: bool = False,
          retention: Retention | None = None, experiments: Iterable[str] | None = None,
          root: str | os.PathLike[str] | None = None, dry_run: bool = False,
          archive: "Archive | str | Mapping[str, Any] | None" = None) -> RetentionPlan:
    """Delete the checkpoints a retention policy does not keep (per experiment).

    The latest checkpoint of each experiment and the best by each ``metric`` are never deleted.
    Deleting removes manifests; run :func:`gc` to reclaim the bytes only they referenced.
    With ``archive`` (``"lc"``, ``"excp"``, ``{"codec": "lc", "bits": 3, "max_chain": 16}`` or an
    :class:`~weightslab.Archive`), what would be deleted is demoted to the lossy archive instead
    (``plan.demote``; guides/storage.md).
    """
    if retention is None:
        retention = Retention.of(keep_last=keep_last, keep_every=keep_every, keep_best=keep_best,
                                 metric=metric, mode=mode, keep_changes=keep_changes, archive=archive_of(archive))
    elif any(v is not None for v in (keep_last, keep_every, keep_best, metric, archive)) or keep_changes:
        raise ValueError("pass either retention= (with its archive) or the keep_* and archive arguments, not both")
    manager = manager_for(root)
    plan = manager.apply_retention(retention, experiments=experiments, dry_run=dry_run)
    running = running_system()
    event = None if dry_run else Pruned.of(plan.delete, layout=manager.layout, root=manager.root)
    if running is not None and event is not None:
        running.events.dispatch("pruned", event)
    return plan


def gc(*, root: str | os.PathLike[str] | None = None, grace_seconds: float = 300.0, repack_below: float = 0.5,
       dry_run: bool = False) -> GcReport:
    """Reclaim the blobs no committed checkpoint references (see :mod:`weightslab.storage.garbage`).

    Safe while other processes save into the same root. Packs younger than ``grace_seconds``
    are left alone; packs less than ``repack_below`` live are rewritten with their live blobs.
    ``root`` may be a remote root's URL: its unreferenced packs are deleted (never rewritten); without
    ``root``, a system training into a remote root collects its local staging root.
    """
    manager = manager_for(root)
    if is_remote(root):  # the bucket: its packs no remote manifest references (never rewritten)
        return garbage.collect_remote(manager.remote, grace_seconds=grace_seconds, dry_run=dry_run)
    return garbage.collect(manager, grace_seconds=grace_seconds, repack_below=repack_below, dry_run=dry_run)


def name_experiment(name: str, ref: str | os.PathLike[str] | None = None, *,
                    root: str | os.PathLike[str] | None = None, replace: bool = False) -> str:
    """Give an experiment a human name, usable in every ref (``"baseline@1200"``,
    ``"baseline@best:loss"``); returns the experiment's hash.

    ``ref`` is any ref of the experiment (``"3fa2c1"``, ``"3fa2c1@latest"``, a path); by default the
    running system's current experiment. A name already given to another experiment raises
    :class:`ConfigError` unless ``replace=True`` moves it.
    """
    if ref is None:
        running = running_system()
        if running is None:
            raise ConfigError("wl.name_experiment(name) without a ref names the running system's experiment, but no "
                              "checkpoint system runs; pass the ref of the experiment to name")
        return running.name_experiment(name, replace=replace)
    manager = manager_for(root)
    entries = manager.candidates(ref)
    if not entries:
        raise ConfigError(f"wl.name_experiment: {ref!r} names no checkpoint")
    try:
        manager.name_experiment(entries[0].experiment, name, replace=replace)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return entries[0].experiment
