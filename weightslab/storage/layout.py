"""The directories a person sees: where each file of a root lives, and how names are parsed back.

::

    <root>/
      checkpoints/<exp_hash>/
        experiment.json                    what went into the hash, parent, created
        model/<exp_hash>_architecture.txt  readable module tree
        model/<exp_hash>_step_<step:06d>.json   one committed checkpoint (its manifest)
        shards/<exp_hash>_step_<step:06d>.<token>/   its sharded tensors (FSDP, DTensor), if any
        hp/<exp_hash>_config.yaml          the hyperparameters of this experiment
        data/                              reserved for the user's data state
      objects/<aa>/<rest>.safetensors      content-addressed tensor packs shared by all experiments
      names/<name>.json                    a human name of an experiment (points at its hash)
      index.sqlite                         catalog (derived; rebuilt from the manifests)
      logs/

This module only names and lists paths; it writes nothing. Every path it builds from an identifier
is checked against that identifier's grammar first (:mod:`.identifiers`): an identifier read from a
crafted file cannot name a path outside the root. Listings never follow a symbolic link below the
root's top-level directories, and :meth:`Layout.contains` tells maintenance (which deletes) whether
a path is inside the root with no link on the way.
"""

from __future__ import annotations

import logging
import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..errors import CorruptCheckpointError
from ..refs import check_name
from .identifiers import HASH_LENGTH, MAX_STEP, check_experiment, check_pack, check_token, is_experiment_hash

__all__ = ["Layout", "HASH_LENGTH", "MAX_STEP", "is_experiment_hash", "PACK_SUFFIX"]

log = logging.getLogger(__name__)

_MANIFEST_RE = re.compile(r"([0-9a-f]{16})_step_([0-9]{6,})\.json")
_SHARDS_RE = re.compile(r"shards/[0-9a-f]{16}_step_[0-9]{6,}\.[0-9a-f]+")
_SHARD_SAVE_RE = re.compile(r"([0-9a-f]{16})_step_[0-9]{6,}\.[0-9a-f]+")
_SHARD_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors")
_FANOUT_RE = re.compile(r"[0-9a-f]{2}")
_PACK_FILE_RE = re.compile(r"[0-9a-f]{62}\.safetensors")
PACK_SUFFIX = ".safetensors"

# Links found in experiment listings, warned about once per process (listing runs at every save).
_WARNED_LINKS: set[str] = set()


def _refuse(what: str, value: Any, exc: ValueError) -> CorruptCheckpointError:
    # Reaching here means an identifier read from a file was not checked where it was parsed: the
    # last line of defence says so rather than build a path out of the root.
    return CorruptCheckpointError(f"refusing to build a path from {what} {value!r}: {exc}")


def _step(step: Any) -> int:
    # (any non-negative integer builds a safe file name; MAX_STEP is checked where steps are read)
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise _refuse("the step", step, ValueError("not a non-negative integer"))
    return step


def _warn_link(path: Path) -> None:
    if str(path) not in _WARNED_LINKS:
        _WARNED_LINKS.add(str(path))
        log.warning("skipping %s: it is a symbolic link, and weightslab never follows links below a root's "
                    "top-level directories; move what it points to into the root, or remove the link", path)


@dataclass(frozen=True)
class Layout:
    """Paths inside one weightslab root."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).expanduser().absolute())

    # --- root level -------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def objects_dir(self) -> Path:
        return self.root / "objects"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def names_dir(self) -> Path:
        return self.root / "names"

    def name_file(self, name: str) -> Path:
        try:
            check_name(name)
        except ValueError as exc:
            raise _refuse("the name", name, exc) from None
        return self.names_dir / f"{name}.json"

    @property
    def catalog_path(self) -> Path:
        return self.root / "index.sqlite"

    # --- one experiment ---------------------------------------------------------------------
    def experiment_dir(self, exp_hash: str) -> Path:
        try:
            check_experiment(exp_hash)
        except ValueError as exc:
            raise _refuse("the experiment", exp_hash, exc) from None
        return self.checkpoints_dir / exp_hash

    def experiment_record(self, exp_hash: str) -> Path:
        return self.experiment_dir(exp_hash) / "experiment.json"

    def model_dir(self, exp_hash: str) -> Path:
        return self.experiment_dir(exp_hash) / "model"

    def hp_dir(self, exp_hash: str) -> Path:
        return self.experiment_dir(exp_hash) / "hp"

    def data_dir(self, exp_hash: str) -> Path:
        return self.experiment_dir(exp_hash) / "data"

    def architecture_text(self, exp_hash: str) -> Path:
        return self.model_dir(exp_hash) / f"{exp_hash}_architecture.txt"

    def hyperparams_yaml(self, exp_hash: str) -> Path:
        return self.hp_dir(exp_hash) / f"{exp_hash}_config.yaml"

    def manifest(self, exp_hash: str, step: int) -> Path:
        return self.model_dir(exp_hash) / f"{exp_hash}_step_{_step(step):06d}.json"

    def shards_dir(self, exp_hash: str) -> Path:
        """Where the sharded tensors of a distributed job's checkpoints go (torch.distributed.checkpoint)."""
        return self.experiment_dir(exp_hash) / "shards"

    def shards(self, exp_hash: str, step: int, token: str) -> Path:
        """One checkpoint's sharded tensors: a directory written by every rank. ``token`` tells apart
        the saves of one step by different runs: a directory exists before its manifest commits."""
        try:
            check_token(token)
        except ValueError as exc:
            raise _refuse("the token", token, exc) from None
        return self.shards_dir(exp_hash) / f"{exp_hash}_step_{_step(step):06d}.{token}"

    @staticmethod
    def is_shard_save(name: str, exp_hash: str) -> bool:
        """Whether ``name`` is the name of one of ``exp_hash``'s sharded saves (what gc may delete)."""
        m = _SHARD_SAVE_RE.fullmatch(name)
        return m is not None and m.group(1) == exp_hash

    def shard_files(self, exp_hash: str, sharded: object) -> list[Path]:
        """The files a manifest's ``sharded`` record names (``{"directory": "shards/<name>", "files":
        {"files": {<name>: ...}}}``); ValueError when it would point anywhere else, as a damaged or
        edited manifest could."""
        directory, names = self.shard_names(exp_hash, sharded)
        base = self.experiment_dir(exp_hash) / directory
        return [base / name for name in names]

    @staticmethod
    def shard_names(exp_hash: str, sharded: object) -> tuple[str, list[str]]:
        """The directory (relative to the experiment's) and the file names a ``sharded`` record
        names, checked: ValueError unless they are the experiment's own, plain names."""
        try:
            directory = sharded["directory"]  # type: ignore[index]
            names = list(sharded["files"]["files"])  # type: ignore[index]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"the record of sharded tensors is malformed ({exc!r})") from None
        if not isinstance(directory, str) or not _SHARDS_RE.fullmatch(directory) or \
                not directory.split("/")[1].startswith(exp_hash + "_"):
            raise ValueError(f"the sharded tensors' directory {directory!r} is not one of experiment {exp_hash}'s")
        if not all(isinstance(n, str) and _SHARD_FILE_RE.fullmatch(n) for n in names):
            raise ValueError(f"the sharded tensors' file names {names!r} are not plain file names")
        return directory, names

    # --- content-addressed objects ----------------------------------------------------------
    def pack(self, pack_id: str) -> Path:
        """Fan out by the first two hex digits, as git does, to keep directories small."""
        try:
            check_pack(pack_id)
        except ValueError as exc:
            raise _refuse("the pack id", pack_id, exc) from None
        return self.objects_dir / pack_id[:2] / f"{pack_id[2:]}{PACK_SUFFIX}"

    @staticmethod
    def parse_pack_path(fanout: str, name: str) -> str | None:
        """``('ab', '<62 hex>.safetensors')`` -> the pack id; anything else (not a pack) -> None."""
        if _FANOUT_RE.fullmatch(fanout) and _PACK_FILE_RE.fullmatch(name):
            return fanout + name[: -len(PACK_SUFFIX)]
        return None

    def contains(self, path: Path | str) -> bool:
        """Whether ``path`` is inside the root with no symbolic link on the way below the root (the
        root itself may be a link). Maintenance deletes only such paths: a link planted in a shared
        root must not make it delete what the link points to."""
        relative = os.path.relpath(path, self.root)
        if relative == os.curdir:
            return True
        if relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative):
            return False
        return os.path.realpath(path) == os.path.join(os.path.realpath(self.root), relative)

    def objects_links(self) -> list[Path]:
        """Symbolic links in ``objects/`` and its fan-out directories: never listed as packs nor
        followed; garbage collection reports them."""
        found = []
        try:
            fanouts = list(os.scandir(self.objects_dir))
        except (FileNotFoundError, NotADirectoryError):
            return []
        for fan in fanouts:
            if fan.is_symlink():
                found.append(Path(fan.path))
            elif fan.is_dir(follow_symlinks=False):
                with os.scandir(fan.path) as entries:
                    found += [Path(e.path) for e in entries if e.is_symlink()]
        return sorted(found)

    # --- parsing and listing ----------------------------------------------------------------
    @staticmethod
    def parse_manifest_name(name: str) -> tuple[str, int] | None:
        """``'<hash>_step_000100.json'`` -> ``('<hash>', 100)``; anything else -> None."""
        m = _MANIFEST_RE.fullmatch(name)
        if not m or m.group(2) != f"{int(m.group(2)):06d}":  # only the spelling manifest() writes
            return None
        return m.group(1), int(m.group(2))

    def experiments(self) -> list[str]:
        """Hashes of the experiment directories of this root, sorted (a directory that is a
        symbolic link is skipped, with a warning)."""
        found = []
        try:
            entries = os.scandir(self.checkpoints_dir)
        except FileNotFoundError:
            return []
        except NotADirectoryError:  # said, not listed as "no experiments": the root is damaged
            raise NotADirectoryError(errno.ENOTDIR, "not a directory (move the file away: every experiment of "
                                     "the root lives under it)", str(self.checkpoints_dir)) from None
        with entries:
            for entry in entries:
                if not is_experiment_hash(entry.name):
                    continue
                if entry.is_symlink():
                    _warn_link(Path(entry.path))
                elif entry.is_dir(follow_symlinks=False):
                    found.append(entry.name)
        return sorted(found)

    def manifests(self, exp_hash: str) -> list[tuple[int, Path]]:
        """``(step, path)`` of every committed checkpoint of one experiment, by step (regular files
        only: a manifest or a ``model/`` directory that is a symbolic link is skipped)."""
        found = []
        directory = self.model_dir(exp_hash)
        if os.path.islink(directory):
            _warn_link(directory)
            return []
        try:
            entries = os.scandir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            for entry in entries:
                parsed = self.parse_manifest_name(entry.name)
                if parsed and parsed[0] == exp_hash:
                    if entry.is_file(follow_symlinks=False):
                        found.append((parsed[1], Path(entry.path)))
                    elif entry.is_symlink():
                        _warn_link(Path(entry.path))
        found.sort()
        return found

    def temp_dirs(self) -> Iterator[Path]:
        """Every directory a save writes temporary files into (for the sweep at start), reached
        without a symbolic link below the root: the sweep deletes, and never through a link."""
        yield self.root
        if self.contains(self.checkpoints_dir):
            yield self.checkpoints_dir
        for top in (self.names_dir, self.objects_dir):
            if top.is_dir() and self.contains(top):
                yield top
        if self.objects_dir.is_dir() and self.contains(self.objects_dir):
            with os.scandir(self.objects_dir) as entries:
                fanouts = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
            yield from fanouts
        if not self.contains(self.checkpoints_dir):
            return
        for exp in self.experiments():  # (no links among them)
            yield self.experiment_dir(exp)
            for directory in (self.model_dir(exp), self.hp_dir(exp)):
                if not os.path.islink(directory):
                    yield directory
