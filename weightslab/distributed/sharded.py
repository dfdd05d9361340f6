"""Sharded tensors (DTensor) saved and loaded collectively, with torch.distributed.checkpoint.

weightslab writes replicated state itself, from one rank. A sharded tensor (a ``DTensor``: the
parameters of an FSDP2 ``fully_shard`` model and their optimizer state, tensor-parallel weights)
lives in pieces on many ranks, so no rank can write it alone. Here every rank writes its own
shards into one directory, collectively, with torch.distributed.checkpoint (DCP) as the engine:
its planner decides which rank writes what (a replicated tensor is written once), and on load it
reshards, so a checkpoint saved by N ranks loads on M ranks or into other placements.

What this module adds to DCP:

- **No pickle on load.** Stock DCP pickles its ``.metadata`` file and ``torch.save``s every
  tensor. Here the shards go to safetensors files through DCP's own HuggingFace storage layer
  (``torch.distributed.checkpoint.hf_storage``), one file per rank, and no metadata file is
  written: each file's JSON header names its tensors with their dtype, shape and offset in the
  full tensor, and the reader rebuilds DCP's metadata from those headers. Nothing read from disk
  is unpickled. (DCP's plans still travel between live ranks through c10d object collectives,
  which pickle in memory; those bytes come from a peer process, never from disk.)
- **Digests.** :func:`save` returns :class:`ShardedFiles`, the size and SHA-256 of every file,
  the same on every rank, for the manifest rank 0 commits. :func:`load` checks them before DCP
  reads a byte (the hashing split over the ranks, the verdict agreed in one all-reduce, so every
  rank raises the same :class:`~weightslab.errors.CorruptCheckpointError` instead of some ranks
  hanging), and lets DCP read only the files listed there.
- **Durability.** Every file is fsynced, then the directory, and :func:`save` returns on rank 0
  only after every rank has done so (each rank's write results reach rank 0 after its fsyncs,
  before DCP's closing broadcast): the caller may commit its manifest the moment it returns.

On disk, after a save from N ranks (a rank left nothing to write writes no file)::

    <directory>/shard-00001-model-00001-of-00001.safetensors    rank 0's shards
    ...
    <directory>/shard-0000N-model-00001-of-00001.safetensors    rank N-1's

Only tensors go through here (the caller keeps all other structure as JSON). A plain tensor is
taken as replicated (Adam's ``step`` next to FSDP2's sharded moments): the same on every rank,
written once, read whole by every rank that loads it. One that differs between ranks must not
come here: DCP would keep one rank's value, whichever it chose to write.

Costs: a rank builds its file in memory before writing it (about twice its shards' bytes at the
peak; an async save adds the staged copy), then hashes it back from the page cache. A file is
checked at load, then read again by DCP: a change in between (another writer, a failing disk) is
not caught; each safetensors header is still parsed by a reader that never executes code.

Process groups: every collective runs on the ``group`` passed (default: the default group). All
of them move CPU tensors, so a job whose default backend is NCCL passes a gloo group
(``dist.new_group(backend="gloo")``). A gloo group's timeout (``init_process_group(timeout=...)``,
30 minutes by default) bounds how long a rank waits for one that died: nothing here waits forever.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import sys
import threading
import types
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import torch

from ..errors import (ArchitectureMismatchError, CheckpointSaveError, ConfigError, CorruptCheckpointError,
                     StateError, WeightslabError)
from ..storage.atomic import fsync_dir, make_dirs
from ..storage.shardfiles import (MISSING, SUFFIX, WRONG_SIZE, LAYOUT, OK,
                         PROBLEMS, ShardedFiles, check_file, file_digest, verify)

__all__ = ["LAYOUT", "SaveHandle", "ShardedFiles", "async_save", "is_sharded", "load", "save", "verify"]

def is_sharded(value: object) -> bool:
    """Whether ``value`` is a tensor that lives in pieces on several ranks (a ``DTensor``, or a
    legacy ``ShardedTensor``) and so must be saved by :func:`save` rather than by one rank."""
    if not isinstance(value, torch.Tensor) or type(value) is torch.Tensor:
        return False
    # No such tensor can exist before its module is imported, so never pay for importing it here.
    for module_name, class_name in (("torch.distributed.tensor", "DTensor"),
                                    ("torch.distributed._shard.sharded_tensor", "ShardedTensor")):
        module = sys.modules.get(module_name)
        if module is not None and isinstance(value, getattr(module, class_name)):
            return True
    return False


def save(tensors: Mapping[str, torch.Tensor], directory: Path | str, *, group: Any = None) -> ShardedFiles:
    """Write ``tensors`` (DTensors, and plain tensors taken as replicated) into ``directory``.

    Collective: every rank of ``group`` calls it with the same names, in the same order of calls.
    ``directory`` must be fresh (it is created; one that already holds ``.safetensors`` files is
    refused on every rank). Returns the same :class:`ShardedFiles` on every rank, once every
    rank's files and the directory are fsynced. Raises ``StateError`` for values it cannot save
    (before any collective), ``CheckpointSaveError`` on every rank if any rank's write fails.
    """
    state = _checked(tensors)
    directory = Path(directory)
    ranks = _Ranks.of(group)
    _wait_for_background_save(ranks.key)
    engine = _engine()
    try:
        with ranks.quiet():
            metadata = engine.dcp.save(state, storage_writer=engine.Writer(directory), planner=engine.SavePlanner(),
                                       process_group=group, no_dist=not ranks.distributed)
    except engine.CheckpointException as exc:
        raise _save_error(exc, directory) from exc
    return _files_of(metadata, ranks.size)


class SaveHandle:
    """A sharded save running in a background thread (from :func:`async_save`)."""

    def __init__(self, future: concurrent.futures.Future, directory: Path, world_size: int):
        self._future, self._directory, self._world_size = future, directory, world_size

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> ShardedFiles:
        """Wait for the save; what :func:`save` would have returned, or raised. Needs no
        collective: when it returns on rank 0, every rank's files are durable."""
        engine = _engine()
        try:
            metadata = self._future.result(timeout)
        except engine.CheckpointException as exc:
            raise _save_error(exc, self._directory) from exc
        return _files_of(metadata, self._world_size)


def async_save(tensors: Mapping[str, torch.Tensor], directory: Path | str, *, group: Any = None) -> SaveHandle:
    """:func:`save` in the background, with ``torch.distributed.checkpoint.async_save``.

    The call copies every rank's shards into fresh CPU tensors (DCP's staging, on the calling
    thread; training may change the originals once it returns) and writes them from a thread.

    The thread runs collectives, so ``group`` must be used by nothing else until the save ends:
    not the group training or weightslab's own step-boundary agreement run on. By default a gloo
    group of this module's own is created, collectively, at the first call (every rank reaches it
    at the same point, as a collective save requires). One background save per group at a time:
    a save, load or async save on a group with one still running first waits for it.
    """
    state = _checked(tensors)
    directory = Path(directory)
    ranks = _Ranks.of(group)
    if ranks.distributed and group is None:
        group = _background_group()
        ranks = _Ranks.of(group)
    _wait_for_background_save(ranks.key)
    engine = _engine()
    # The writer is DCP's stager too (FileSystemWriter is a BlockingAsyncStager): it copies the
    # state to CPU memory before returning; no pinned memory, which needs an accelerator.
    response = engine.dcp.async_save(state, storage_writer=engine.Writer(directory), planner=engine.SavePlanner(),
                                     process_group=group, no_dist=not ranks.distributed)
    future = getattr(response, "upload_completion", response)  # newer DCP returns an AsyncSaveResponse
    _remember_background_save(ranks.key, future)
    return SaveHandle(future, directory, ranks.size)


def load(targets: Mapping[str, torch.Tensor], directory: Path | str, files: ShardedFiles, *,
         group: Any = None, verified: bool = False) -> None:
    """Read a sharded save into ``targets`` in place, resharding to their placements.

    Collective, like :func:`save`. Each target is a live tensor: a DTensor receives the part of
    the full tensor its placements give this rank (whatever the world size at save), a plain
    tensor receives all of it. Before DCP reads a byte, every file in ``files`` is checked
    against its recorded size and digest (file ``i`` by rank ``i % world_size``) and the ranks
    agree on the result: a damaged or missing file raises ``CorruptCheckpointError`` naming it,
    on every rank; targets whose names, shapes or dtypes the checkpoint does not have raise
    ``ArchitectureMismatchError`` on every rank. Without an initialized process group it loads in
    this one process (a 2-rank save into plain, full tensors, say).

    ``verified=True`` skips the digests: for a caller that has just checked every file itself, on
    every rank, and agreed on the outcome (the checkpoint system does, to fall back from a damaged
    save); sizes, names, shapes and dtypes are still checked.
    """
    state = _checked(targets)
    directory = Path(directory)
    ranks = _Ranks.of(group)
    _wait_for_background_save(ranks.key)
    names = list(files.files)
    codes = [OK] * len(names)
    for i in range(ranks.rank, len(names), ranks.size):
        if verified:  # (a file changed since the caller's check still fails DCP's header and size checks)
            size = files.files[names[i]][0]
            present = (directory / names[i]).is_file()
            codes[i] = MISSING if not present else (OK if (directory / names[i]).stat().st_size == size
                                                      else WRONG_SIZE)
        else:
            codes[i], _ = check_file(directory / names[i], *files.files[names[i]])
    codes = ranks.agree(codes)
    damaged = [(name, code) for name, code in zip(names, codes) if code != OK]
    if damaged:
        listing = "; ".join(f"{name} {PROBLEMS[code]}" for name, code in damaged)
        raise CorruptCheckpointError(f"sharded checkpoint {directory} is damaged: {listing}. Nothing was loaded; "
                                     "load an earlier checkpoint", path=directory / damaged[0][0])

    engine = _engine()
    reader = engine.Reader(directory, names)
    try:  # the headers of files just verified; still, a rank that fails here must not leave the others waiting
        corrupt, differences = _compare(state, reader.read_metadata())
    except Exception as exc:  # noqa: BLE001 - reported to every rank below
        corrupt, differences = [f"its safetensors headers cannot be read ({exc})"], []
    bad_files, mismatch = ranks.agree([int(bool(corrupt)), int(bool(differences))])
    if bad_files:
        detail = "; ".join(corrupt) if corrupt else "another rank could not read its headers"
        raise CorruptCheckpointError(f"sharded checkpoint {directory} is damaged: {detail}. Nothing was loaded; "
                                     "load an earlier checkpoint", path=directory)
    if mismatch:
        detail = "; ".join(differences) if differences else "another rank's tensors do not fit it"
        raise ArchitectureMismatchError(f"sharded checkpoint {directory} does not fit the tensors to load into: "
                                        f"{detail}. Nothing was loaded; load it into the model it was saved from",
                                        differences=differences)
    try:
        with ranks.quiet():
            engine.dcp.load(state, storage_reader=reader, planner=engine.LoadPlanner(), process_group=group,
                            no_dist=not ranks.distributed)
    except engine.CheckpointException as exc:
        raise _load_error(exc, directory) from exc


# --- internals -------------------------------------------------------------------------------


class _StoredFile(NamedTuple):
    """What a rank's writer reports to rank 0 about one file it wrote (DCP's per-write storage
    data, which DCP gathers on the coordinator; a module-level type so it can travel)."""

    name: str
    size: int
    digest: str


def _checked(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plain dict of the tensors, or ``StateError`` (raised before any collective) for a value
    this module cannot save or load in place."""
    if not isinstance(tensors, Mapping):
        raise StateError(f"expected a mapping of names to tensors, got {type(tensors).__name__}")
    out: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise StateError(f"tensor name {name!r}: expected a non-empty string")
        if not isinstance(value, torch.Tensor):
            raise StateError(f"{name}: a {type(value).__name__}, not a tensor; sharded saves take tensors only "
                             "(keep other values in the manifest as JSON)")
        sharded_tensor = sys.modules.get("torch.distributed._shard.sharded_tensor")
        if sharded_tensor is not None and isinstance(value, sharded_tensor.ShardedTensor):
            raise StateError(f"{name}: ShardedTensor (deprecated by torch) is not supported; convert it to a "
                             "DTensor (FSDP2 / torch.distributed.tensor) to checkpoint it")
        if value.device.type == "meta":
            raise StateError(f"{name}: a tensor on the meta device has no data to save or to load into; "
                             "materialize it (to_empty) first")
        if is_sharded(value) and any(p.is_partial() for p in value.placements):
            raise StateError(f"{name}: a DTensor with a Partial placement holds pending reductions, not values; "
                             "redistribute it to Shard or Replicate placements first")
        out[name] = value
    return out


@dataclass(frozen=True)
class _Ranks:
    """This process's place in the group a call runs on (rank 0 of 1 without a process group)."""

    rank: int
    size: int
    group: Any
    distributed: bool

    @staticmethod
    def of(group: Any) -> "_Ranks":
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise ConfigError("a process group was passed but torch.distributed is not initialized")
            return _Ranks(0, 1, None, False)
        rank = dist.get_rank(group)
        if rank < 0:
            raise ConfigError("this process is not a member of the group passed; call with a group it belongs to, "
                             "on every rank of that group")
        return _Ranks(rank, dist.get_world_size(group), group, True)

    @property
    def key(self) -> Any:
        """The group's identity, for serializing background saves on it."""
        if not self.distributed:
            return None
        return self.group if self.group is not None else torch.distributed.group.WORLD

    def agree(self, values: list[int]) -> list[int]:
        """The element-wise maximum of ``values`` over the group: a flag set on one rank is set on all."""
        if self.size == 1:
            return list(values)
        vector = torch.tensor([*values, 0], dtype=torch.int64)  # never empty
        torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return vector.tolist()[:-1]

    def quiet(self) -> Any:
        """Silence DCP's warning that it runs in one process: without a process group that is the
        intent. (catch_warnings is process-wide, so only where no process group means no training
        threads to disturb: a CLI or an export loading a sharded checkpoint whole.)"""
        return _single_process_warning_silenced() if not self.distributed else contextlib.nullcontext()


@contextlib.contextmanager
def _single_process_warning_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _compare(state: Mapping[str, torch.Tensor], metadata: Any) -> tuple[list[str], list[str]]:
    """What is damaged in the checkpoint's metadata (a tensor it holds only part of), and how the
    targets differ from it (names, global shapes, dtypes): the same on every rank in a SPMD job."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    stored = metadata.state_dict_metadata
    corrupt, differences = [], []
    for name, tensor in state.items():
        entry = stored.get(name)
        if not isinstance(entry, TensorStorageMetadata):
            differences.append(f"{name}: not in the checkpoint")
            continue
        if tuple(entry.size) != tuple(tensor.shape):
            differences.append(f"{name}: shape {tuple(tensor.shape)} here, {tuple(entry.size)} in the checkpoint")
        if entry.properties.dtype != tensor.dtype:
            differences.append(f"{name}: dtype {tensor.dtype} here, {entry.properties.dtype} in the checkpoint")
        # Shards never overlap (DCP writes a replicated tensor once), so their volumes add up to the
        # whole unless a shard is missing: then part of the target would silently keep its old values.
        held = sum(_volume(chunk.sizes) for chunk in entry.chunks)
        if held != _volume(entry.size):
            corrupt.append(f"{name}: its shards hold {held} of its {_volume(entry.size)} elements")
    return corrupt, differences


def _volume(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _files_of(metadata: Any, world_size: int) -> ShardedFiles:
    # The writer's finish() put every rank's file records there; DCP broadcast them to every rank.
    return ShardedFiles(files=dict(metadata.storage_data), world_size=world_size)


def _failures(exc: Any) -> list[tuple[int, BaseException]]:
    return [(rank, wrapped[0]) for rank, wrapped in sorted(exc.failures.items())]


def _first_weightslab_error(failures: list[tuple[int, BaseException]]) -> BaseException | None:
    return failures[0][1] if failures and isinstance(failures[0][1], WeightslabError) else None


def _detail(failures: list[tuple[int, BaseException]]) -> str:
    return "; ".join(f"rank {rank}: {type(e).__name__}: {e}" for rank, e in failures)


def _save_error(exc: Any, directory: Path) -> BaseException:
    """DCP reports every rank's failure on every rank; give them all the same weightslab error."""
    failures = _failures(exc)
    if (first := _first_weightslab_error(failures)) is not None:
        return first
    detail = _detail(failures)
    return CheckpointSaveError(f"sharded save into {directory} failed ({detail}); nothing in it may be committed. "
                               "Fix the cause and save again into a fresh directory",
                               errors=[e for _, e in failures])


def _load_error(exc: Any, directory: Path) -> BaseException:
    failures = _failures(exc)
    if (first := _first_weightslab_error(failures)) is not None:
        return first
    detail = _detail(failures)
    return CorruptCheckpointError(f"sharded checkpoint {directory} could not be read ({detail}); the targets may "
                                  "be partly overwritten: load an earlier checkpoint", path=directory)


# --- background saves: one at a time per group -------------------------------------------------

_BACKGROUND_LOCK = threading.Lock()
# id(group) -> (group, future of its running save); the group is kept so its id cannot be reused.
_BACKGROUND: dict[int, tuple[Any, concurrent.futures.Future]] = {}
# Weak references to the default group it was made in and to the group: both die with
# destroy_process_group(), which so invalidates the cache, and this module never keeps a destroyed
# group alive until the interpreter's teardown.
_BACKGROUND_GROUP: tuple[weakref.ref, weakref.ref] | None = None


def _wait_for_background_save(key: Any) -> None:
    """Two saves' collectives interleaved on one group would mismatch; wait for the running one.
    (Its outcome is its own handle's to report.)"""
    if key is None:
        return
    with _BACKGROUND_LOCK:
        entry = _BACKGROUND.get(id(key))
    if entry is not None and entry[0] is key:
        concurrent.futures.wait([entry[1]])


def _remember_background_save(key: Any, future: concurrent.futures.Future) -> None:
    if key is None:
        return
    with _BACKGROUND_LOCK:
        _BACKGROUND[id(key)] = (key, future)

    def forget(done: concurrent.futures.Future) -> None:
        with _BACKGROUND_LOCK:
            if _BACKGROUND.get(id(key), (None, None))[1] is done:
                del _BACKGROUND[id(key)]

    future.add_done_callback(forget)


def _background_group() -> Any:
    """A gloo group for background saves only, made once per process group (every rank makes it
    in its first async_save: the same point on all ranks, as ``new_group`` requires)."""
    global _BACKGROUND_GROUP
    dist = torch.distributed
    world = dist.group.WORLD
    group = None
    if _BACKGROUND_GROUP is not None and _BACKGROUND_GROUP[0]() is world:
        group = _BACKGROUND_GROUP[1]()
    if group is None:
        group = dist.new_group(backend="gloo")
        _BACKGROUND_GROUP = (weakref.ref(world), weakref.ref(group))
    return group


# --- the DCP storage layer: safetensors files, digests, nothing unpickled -----------------------


@functools.lru_cache(maxsize=None)
def _engine() -> types.SimpleNamespace:
    """DCP and this module's storage classes, imported on first use (DCP takes about a second)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
    from torch.distributed.checkpoint.filesystem import FileSystem
    from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageReader, HuggingFaceStorageWriter
    from torch.distributed.checkpoint.planner import LoadItemType, WriteItemType
    from torch.distributed.checkpoint.storage import WriteResult
    from torch.futures import Future

    class Writer(HuggingFaceStorageWriter):
        """One safetensors file per rank, fsynced, hashed; no metadata file (the headers are it)."""

        def __init__(self, directory: Path):
            # save_distributed: every rank writes its own shards, to a file named by its rank.
            super().__init__(str(directory), save_distributed=True)
            self._directory = directory

        def prepare_local_plan(self, plan: Any) -> Any:
            # Runs on every rank before any rank writes (DCP gathers all local plans first), and
            # DCP hands an error raised here to every rank.
            byte_items = [item.index.fqn for item in plan.items if item.type == WriteItemType.BYTE_IO]
            if byte_items:
                raise StateError(f"{byte_items}: not tensors; sharded saves take tensors only (keep other values "
                                 "in the manifest as JSON)")
            make_dirs(self._directory)
            existing = sorted(n for n in os.listdir(self._directory) if n.endswith(SUFFIX))
            if existing:
                raise FileExistsError(f"{self._directory} already holds {existing}: a sharded save needs a fresh "
                                      "directory, or its files would mix with an earlier save's")
            return super().prepare_local_plan(plan)

        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)  # synchronous: files written and fsynced
            written.wait()
            results = written.value()
            stored = {}
            for name in sorted({r.storage_data.relative_path for r in results}):
                # Hash what reached the file (from the page cache, right after writing it).
                size, digest = file_digest(self._directory / name)
                stored[name] = _StoredFile(name, size, digest)
            if stored:
                fsync_dir(self._directory)
            future: Any = Future()
            future.set_result([WriteResult(index=r.index, size_in_bytes=r.size_in_bytes,
                                           storage_data=stored[r.storage_data.relative_path]) for r in results])
            return future

        def finish(self, metadata: Any, results: Any) -> None:
            # On the coordinator, once every rank's write_data has returned. The records travel
            # back to every rank inside the metadata dcp.save returns; nothing is written here.
            files = {}
            for rank_results in results:
                for result in rank_results:
                    record = result.storage_data
                    files[record.name] = (record.size, record.digest)
            metadata.storage_data = files

    class SavePlanner(DefaultSavePlanner):
        def transform_object(self, write_item: Any, object: Any) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:  # DefaultSavePlanner would torch.save it
                raise StateError(f"{write_item.index.fqn}: not a tensor; sharded saves take tensors only")
            # safetensors stores dense row-major bytes only (a transposed tensor, say, is refused).
            return object.contiguous()

    class _ListedFiles(FileSystem):
        def __init__(self, paths: list[str]):
            super().__init__()
            self._paths = paths

        def ls(self, path: Any) -> list[str]:
            return list(self._paths)

    class Reader(HuggingFaceStorageReader):
        """Reads the listed (verified) files only; the metadata comes from their JSON headers."""

        def __init__(self, directory: Path, names: list[str]):
            super().__init__(str(directory))
            self.fs = _ListedFiles([str(directory / name) for name in names])
            self._metadata: Any = None

        def read_metadata(self) -> Any:  # type: ignore[override]
            if self._metadata is None:  # read once: load() compares it with the targets first
                self._metadata = super().read_metadata()
            self._metadata.storage_meta.load_id = self.load_id
            return self._metadata

        def read_data(self, plan: Any, planner: Any) -> Any:
            if any(item.type == LoadItemType.BYTE_IO for item in plan.items):
                raise CorruptCheckpointError("a sharded checkpoint holds a non-tensor item; reading it would "
                                             "unpickle, which weightslab never does")
            return super().read_data(plan, planner)

    class LoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:
            # DefaultLoadPlanner would torch.load(weights_only=False) it; never reached with
            # safetensors files, refused should it ever be.
            raise CorruptCheckpointError(f"{read_item.dest_index.fqn}: a non-tensor item in a sharded checkpoint; "
                                         "reading it would unpickle, which weightslab never does")

    return types.SimpleNamespace(dcp=dcp, CheckpointException=CheckpointException, Writer=Writer, Reader=Reader,
                                 SavePlanner=SavePlanner, LoadPlanner=LoadPlanner)
