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

This module only names and lists paths; it writes nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["Layout", "HASH_LENGTH", "is_experiment_hash"]

HASH_LENGTH = 16
_HASH_RE = re.compile(r"[0-9a-f]{16}")
_MANIFEST_RE = re.compile(r"([0-9a-f]{16})_step_([0-9]{6,})\.json")
_SHARDS_RE = re.compile(r"shards/[0-9a-f]{16}_step_[0-9]{6,}\.[0-9a-f]+")
_SHARD_FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*\.safetensors")
PACK_SUFFIX = ".safetensors"


def is_experiment_hash(text: str) -> bool:
    return bool(_HASH_RE.fullmatch(text))


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
        return self.names_dir / f"{name}.json"

    @property
    def catalog_path(self) -> Path:
        return self.root / "index.sqlite"

    # --- one experiment ---------------------------------------------------------------------
    def experiment_dir(self, exp_hash: str) -> Path:
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
        return self.model_dir(exp_hash) / f"{exp_hash}_step_{step:06d}.json"

    def shards_dir(self, exp_hash: str) -> Path:
        """Where the sharded tensors of a distributed job's checkpoints go (torch.distributed.checkpoint)."""
        return self.experiment_dir(exp_hash) / "shards"

    def shards(self, exp_hash: str, step: int, token: str) -> Path:
        """One checkpoint's sharded tensors: a directory written by every rank. ``token`` tells apart
        the saves of one step by different runs: a directory exists before its manifest commits."""
        return self.shards_dir(exp_hash) / f"{exp_hash}_step_{step:06d}.{token}"

    def shard_files(self, exp_hash: str, sharded: object) -> list[Path]:
        """The files a manifest's ``sharded`` record names (``{"directory": "shards/<name>", "files":
        {"files": {<name>: ...}}}``); ValueError when it would point anywhere else, as a damaged or
        edited manifest could."""
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
        base = self.experiment_dir(exp_hash) / directory
        return [base / name for name in names]

    # --- content-addressed objects ----------------------------------------------------------
    def pack(self, pack_id: str) -> Path:
        """Fan out by the first two hex digits, as git does, to keep directories small."""
        return self.objects_dir / pack_id[:2] / f"{pack_id[2:]}{PACK_SUFFIX}"

    # --- parsing and listing ----------------------------------------------------------------
    @staticmethod
    def parse_manifest_name(name: str) -> tuple[str, int] | None:
        """``'<hash>_step_000100.json'`` -> ``('<hash>', 100)``; anything else -> None."""
        m = _MANIFEST_RE.fullmatch(name)
        if not m or m.group(2) != f"{int(m.group(2)):06d}":  # only the spelling manifest() writes
            return None
        return m.group(1), int(m.group(2))

    def experiments(self) -> list[str]:
        """Hashes of the experiment directories of this root, sorted."""
        try:
            names = os.listdir(self.checkpoints_dir)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if is_experiment_hash(n) and (self.checkpoints_dir / n).is_dir())

    def manifests(self, exp_hash: str) -> list[tuple[int, Path]]:
        """``(step, path)`` of every committed checkpoint of one experiment, by step."""
        found = []
        try:
            entries = os.scandir(self.model_dir(exp_hash))
        except FileNotFoundError:
            return []
        with entries:
            for entry in entries:
                parsed = self.parse_manifest_name(entry.name)
                if parsed and parsed[0] == exp_hash:
                    found.append((parsed[1], Path(entry.path)))
        found.sort()
        return found

    def temp_dirs(self) -> Iterator[Path]:
        """Every directory a save writes temporary files into (for the sweep at start)."""
        yield self.root
        yield self.checkpoints_dir
        if self.names_dir.is_dir():
            yield self.names_dir
        if self.objects_dir.is_dir():
            yield self.objects_dir
            for entry in os.scandir(self.objects_dir):
                if entry.is_dir():
                    yield Path(entry.path)
        for exp in self.experiments():
            yield self.experiment_dir(exp)
            yield self.model_dir(exp)
            yield self.hp_dir(exp)
