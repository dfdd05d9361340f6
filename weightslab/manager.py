"""The checkpoints of one root: committing them, finding them, reading them back verified.

:class:`CheckpointManager` joins the layout (where files go), the store (tensor bytes) and the
manifest (the commit). It is what the background writer calls to make a snapshot durable, and
what ``resume`` and the command line use to resolve a ref and load a checkpoint. It knows paths
and bytes; what the tensors mean is the state layer's business.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
import yaml

from .atomic import atomic_write, make_dirs, sweep_temp_files
from .errors import CheckpointNotFoundError, CorruptCheckpointError
from .experiment import ExperimentRecord, descendants
from .layout import Layout, is_experiment_hash
from .manifest import Manifest, TensorEntry
from .refs import Ref, parse_ref
from .snapshot import dtype_tag, empty_like_entry, raw_bytes, tag_dtype
from .store import Blob, BlobStore

__all__ = ["CheckpointManager", "CheckpointEntry", "SaveRequest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SaveRequest:
    """Everything the writer needs to commit one checkpoint; built on the training thread."""

    experiment: ExperimentRecord
    step: int
    reasons: tuple[str, ...]
    changes: tuple[Mapping[str, Any], ...]
    metrics: Mapping[str, Any]
    tree: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]  # private copies: contiguous CPU tensors
    run: str
    resumed_from: str | None
    created: str
    created_ns: int
    versions: Mapping[str, str]

    @property
    def ref(self) -> str:
        return f"{self.experiment.hash}@{self.step}"


@dataclass(frozen=True)
class CheckpointEntry:
    """A committed checkpoint found on disk (its manifest not yet read)."""

    experiment: str
    step: int
    path: Path
    mtime_ns: int

    @property
    def ref(self) -> str:
        return f"{self.experiment}@{self.step}"


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
    """Structured checkpoint storage under one root (``<root>/checkpoints``, ``<root>/objects``)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.layout = Layout(Path(root))
        self.store = BlobStore(self.layout)
        self._written_experiments: set[str] = set()
        swept = sweep_temp_files(self.layout.temp_dirs())
        if swept:
            log.info("removed %d temporary files left by interrupted saves under %s", len(swept), self.root)

    @property
    def root(self) -> Path:
        return self.layout.root

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

    def commit(self, request: SaveRequest) -> Manifest:
        """Make one checkpoint durable: tensor pack first, then the manifest (the commit point)."""
        self.write_experiment(request.experiment)
        keys = list(request.tensors)
        blobs = []
        for key in keys:
            t = request.tensors[key]
            blobs.append(Blob(data=raw_bytes(t), dtype=dtype_tag(t.dtype, key=key), shape=tuple(t.shape)))
        refs = self.store.put(blobs)
        manifest = Manifest(
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
            tensors={k: TensorEntry(dtype=b.dtype, shape=b.shape, blob=r) for k, b, r in zip(keys, blobs, refs)},
            state=request.tree,
        )
        atomic_write(self.layout.manifest(manifest.experiment, manifest.step), manifest.to_bytes())
        return manifest

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
        """Committed checkpoints, oldest first (by commit time, then step)."""
        found = []
        for h in (self.experiments() if experiments is None else experiments):
            for step, path in self.layout.manifests(h):
                try:
                    mtime = path.stat().st_mtime_ns
                except FileNotFoundError:  # removed meanwhile
                    continue
                found.append(CheckpointEntry(h, step, path, mtime))
        found.sort(key=lambda e: (e.mtime_ns, e.step))
        return found

    def _experiment_for(self, prefix: str) -> str:
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
        h = self._experiment_for(parsed.experiment or "")
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
        return [CheckpointEntry(h, parsed.step, path, path.stat().st_mtime_ns)]

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
        return CheckpointEntry(parsed[0], parsed[1], path, path.stat().st_mtime_ns)

    # --- reading ----------------------------------------------------------------------------
    def read_manifest(self, entry: CheckpointEntry | Path) -> Manifest:
        return Manifest.read(entry.path if isinstance(entry, CheckpointEntry) else Path(entry))

    def load_tensors(self, manifest: Manifest) -> dict[str, torch.Tensor]:
        """Every tensor of the checkpoint, each byte checked against its digest."""
        tensors = {k: empty_like_entry(e.dtype, e.shape) for k, e in manifest.tensors.items()}
        self.store.read_into(((e.blob, raw_bytes(tensors[k])) for k, e in manifest.tensors.items()),
                             checkpoint=manifest.ref)
        return tensors

    @staticmethod
    def tensor_meta(manifest: Manifest) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        return {k: (tag_dtype(e.dtype), e.shape) for k, e in manifest.tensors.items()}
