"""A root in remote storage (an fsspec URL: ``s3://``, ``gs://``, ``memory://``, ``file://``), mirrored
from a local staging root.

Training writes to a local staging root exactly as to any local root: the same blocking time, the
same atomic commit. After each local commit, the background writer *pushes* the checkpoint:

1. the packs its tensors live in (content-addressed and immutable: one that exists remotely is
   never uploaded again), then the experiment's descriptive files, ``experiment.json`` last;
2. the manifest, last of all. Object stores have no atomic rename, so the manifest is the commit
   object: discovery lists manifests only, and a checkpoint whose upload stopped before its
   manifest does not exist remotely (its packs are unreferenced bytes there).

Every object is written under a temporary name and then moved to its name, so a reader never sees
half an object on filesystems whose writes are not atomic (``file://``); on object stores the move
is a server-side copy that creates the final object whole.

Resuming *pulls*: the manifests, experiment records and names of the remote root (small files) into
the staging root, so the ordinary local code finds and orders checkpoints, then only the packs the
chosen checkpoint needs. Every byte pulled is verified when it is read, as on a local root.

fsspec is an optional dependency (``pip install 'weightslab[remote]'``), imported when a remote
root is used.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import CorruptCheckpointError
from .atomic import atomic_path, make_dirs
from .layout import Layout
from .manifest import Manifest

__all__ = ["RemoteRoot", "is_remote", "staging_dir", "modified"]

log = logging.getLogger(__name__)

# What pull_index may bring into the staging root: a bucket others can write must not name a file
# out of it (or anything the layout does not know).
_PULLED = re.compile(r"checkpoints/[0-9a-f]{16}/(?:experiment\.json|(?:model|hp)/[A-Za-z0-9][A-Za-z0-9_.-]*)"
                     r"|names/[A-Za-z][A-Za-z0-9._-]{0,63}\.json")


def is_remote(root: object) -> bool:
    """Whether ``root`` is a URL that names a remote root (``"<protocol>://..."``)."""
    return isinstance(root, str) and "://" in root


def staging_dir(url: str, *, view: bool = False) -> Path:
    """Where the local mirror of remote root ``url`` lives: ``$WEIGHTSLAB_STAGING`` or
    ``~/.cache/weightslab/staging``, one directory per URL; ``view=True``: the command line's
    read-only mirror, apart from any training's staging root."""
    base = Path(os.environ.get("WEIGHTSLAB_STAGING") or Path.home() / ".cache" / "weightslab" / "staging")
    name = hashlib.sha256(url.encode()).hexdigest()[:16] + ("-view" if view else "")
    return (base / name).expanduser().absolute()


def modified(info: Mapping[str, Any]) -> float | None:
    """When an object was last written, in seconds since the epoch, from what its filesystem reports
    (local: ``mtime``; S3: ``LastModified``; GCS: ``updated``; memory: ``created``); None if unknown."""
    for key in ("mtime", "LastModified", "updated", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, _dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=_dt.timezone.utc)).timestamp()
        if isinstance(value, str):
            try:
                return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def _fsspec() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ImportError("a remote root_log_dir needs fsspec: pip install 'weightslab[remote]' (and the "
                          "filesystem's own package, e.g. s3fs or gcsfs)") from None
    return fsspec


class RemoteRoot:
    """The remote copy of one weightslab root, and the staging root it mirrors."""

    def __init__(self, url: str, layout: Layout):
        self.url = url
        self.layout = layout
        self.fs, path = _fsspec().core.url_to_fs(url)
        self.base = path.rstrip("/")

    def path_of(self, local: Path) -> str:
        """The remote path of a file of the staging root."""
        return f"{self.base}/{local.relative_to(self.layout.root).as_posix()}"

    def _put(self, local: Path, remote: str) -> None:
        parent = remote.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        temporary = f"{parent}/.tmp.{uuid.uuid4().hex}.{remote.rsplit('/', 1)[-1]}"
        self.fs.put_file(str(local), temporary)
        self.fs.mv(temporary, remote)

    # --- pushing ---------------------------------------------------------------------------
    def push(self, manifests: Iterable[Manifest]) -> int:
        """Upload each checkpoint (packs, experiment files, manifest last); return the bytes sent."""
        sent = 0
        for manifest in manifests:
            h = manifest.experiment
            packs = {blob.pack for t in manifest.tensors.values() for blob in t.blobs()}
            for pack in sorted(packs):
                local = self.layout.pack(pack)
                remote = self.path_of(local)
                if not self.fs.exists(remote):  # content-addressed: an existing pack is the same bytes
                    self._put(local, remote)
                    sent += local.stat().st_size
            for local in self.shard_files(manifest):  # a distributed job's sharded tensors
                remote = self.path_of(local)
                if not self.fs.exists(remote):  # (each save has its own directory: never rewritten)
                    self._put(local, remote)
                    sent += local.stat().st_size
            record = self.layout.experiment_record(h)
            if not self.fs.exists(self.path_of(record)):
                for local in (self.layout.architecture_text(h), self.layout.hyperparams_yaml(h), record):
                    if local.exists():  # experiment.json last: it says the others are complete
                        self._put(local, self.path_of(local))
                        sent += local.stat().st_size
            local = self.layout.manifest(h, manifest.step)
            self._put(local, self.path_of(local))  # the commit object
            sent += local.stat().st_size
        return sent

    def push_names(self) -> None:
        """Upload the names of the staging root (small files; a name may move, so always)."""
        for local in sorted(self.layout.names_dir.glob("*.json")):
            self._put(local, self.path_of(local))

    def delete(self, experiment: str, step: int) -> None:
        """Remove one checkpoint remotely (its manifest; its packs stay until a gc of the remote root)."""
        remote = self.path_of(self.layout.manifest(experiment, step))
        if self.fs.exists(remote):
            self.fs.rm(remote)

    # --- pulling ---------------------------------------------------------------------------
    def _download(self, remote: str, local: Path) -> None:
        make_dirs(local.parent)
        with atomic_path(local) as temporary:
            self.fs.get_file(remote, str(temporary))

    def pull_index(self, *, mirror: bool = False) -> int:
        """Bring the remote root's manifests, experiment files and names into the staging root
        (those not there yet); return how many files were fetched.

        ``mirror=True`` also deletes local manifests and names the remote root no longer has: only
        for a read-only view (the command line's), never for a training's staging root, which may
        hold checkpoints not uploaded yet."""
        patterns = (f"{self.base}/checkpoints/*/experiment.json", f"{self.base}/checkpoints/*/model/*",
                    f"{self.base}/checkpoints/*/hp/*", f"{self.base}/names/*.json")
        fetched = 0
        seen: set[Path] = set()
        for pattern in patterns:
            for remote in sorted(self.fs.glob(pattern)):
                name = remote.rsplit("/", 1)[-1]
                if name.startswith(".tmp."):
                    continue  # an upload in progress, or one that died
                relative = remote[len(self.base) + 1:].lstrip("/")
                if not _PULLED.fullmatch(relative) or ".." in relative.split("/"):
                    log.warning("not fetching %s from %s: no file of a weightslab root is named so", relative, self.url)
                    continue
                local = self.layout.root / relative
                seen.add(local)
                if not local.exists() or local.parent == self.layout.names_dir:
                    self._download(remote, local)
                    fetched += 1
        if mirror:
            for h in self.layout.experiments():
                for _, local in self.layout.manifests(h):
                    if local not in seen:
                        local.unlink(missing_ok=True)
            for local in self.layout.names_dir.glob("*.json"):
                if local not in seen:
                    local.unlink(missing_ok=True)
        return fetched

    def pull_packs(self, manifest: Manifest) -> int:
        """Fetch the packs ``manifest`` needs that the staging root lacks; return the bytes fetched."""
        fetched = 0
        packs = {blob.pack for t in manifest.tensors.values() for blob in t.blobs()}
        for local in [self.layout.pack(pack) for pack in sorted(packs)] + self.shard_files(manifest):
            if not local.exists():
                self._download(self.path_of(local), local)
                fetched += local.stat().st_size
        return fetched

    def shard_files(self, manifest: Manifest) -> list[Path]:
        sharded = manifest.state.get("sharded")
        if sharded is None:
            return []
        try:
            return self.layout.shard_files(manifest.experiment, sharded)
        except ValueError as exc:
            raise CorruptCheckpointError(f"checkpoint {manifest.ref}: {exc}; its manifest is damaged") from None
