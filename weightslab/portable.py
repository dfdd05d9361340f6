"""Getting a checkpoint out of weightslab: as plain Python, or as one self-contained file.

A checkpoint lives in a root as a manifest plus tensor blobs shared with other checkpoints
(possibly zstd-compressed or stored as XOR deltas). That is right for saving often and cheaply,
but the weights must also reach places that know nothing of weightslab: an inference server, a
colleague, a model hub. :func:`load` reads a checkpoint into plain dicts of tensors without the
model's code and without unpickling anything, every byte checked against its digest;
:func:`export` writes it as one standard file::

    state = wl.load("latest", root="./experiments")          # dicts, tensors, numbers
    wl.export("latest", "model.safetensors")                 # the weights, for any safetensors reader
    wl.export("3fa2c1@1200", "run.pt")                       # the whole state, for torch.load(weights_only=True)

The file is written atomically, so an interrupted export never leaves a torn file behind.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path, PurePath
from typing import Any, Callable, Mapping

import numpy as np
import torch

from . import codec
from ._version import __version__
from .distributed.world import World
from .errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from .process import manager_for
from .refs import parse_ref
from .storage.archive import describe_lossy
from .storage.atomic import atomic_path, make_dirs, sweep_temp_files
from .storage.layout import is_experiment_hash
from .storage.manager import CheckpointManager
from .tensors import load_tensors, tensor_meta

__all__ = ["export", "load"]

log = logging.getLogger(__name__)

_SAFETENSORS = (".safetensors",)
_TORCH = (".pt", ".pth")
SUPPORTED_SUFFIXES = _SAFETENSORS + _TORCH

# The sections of a checkpoint's state tree that hold named objects, as load() returns them.
_SECTIONS = ("optimizers", "schedulers", "scalers", "hyperparams", "dataloaders", "custom")


# --- reading ----------------------------------------------------------------------------------

def _root_of(path: Path) -> Path | None:
    """The root a manifest file or experiment directory lies in (``<root>/checkpoints/<hash>/...``).

    A path names its checkpoint completely; reading its tensors from another root's store (the
    default one) would fail on a digest mismatch with a misleading message.
    """
    path = path.expanduser().absolute()
    for p in (path, *path.parents):
        if is_experiment_hash(p.name) and p.parent.name == "checkpoints":
            return p.parent.parent
    return None


def _manager(ref: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> CheckpointManager:
    if root is None:
        parsed = parse_ref(ref)
        if parsed.path is not None:
            found = _root_of(parsed.path)
            if found is not None:
                return manager_for(found)
    return manager_for(root)


def load(ref: str | os.PathLike[str] = "latest", *, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The full state of a checkpoint as plain Python: no model code needed, nothing unpickled,
    every byte verified.

    ``ref`` is ``"latest"`` (the newest committed checkpoint of the root), ``"<hash>@<step>"``
    (a unique hash prefix is enough), ``"<hash>@latest"`` or the path of a manifest or experiment
    directory. ``root`` is the ``root_log_dir`` training used; by default the running system's
    root, else ``$WEIGHTSLAB_ROOT`` or ``./experiments`` (for a path ref, the root it lies in).
    Checkpoints a running system is still writing in the background are not seen; call
    ``system.wait()`` first to include them.

    Returns::

        {"ref": "<hash>@<step>", "experiment": hash, "step": int, "reasons": [...], "metrics": {...},
         "models": {name: {param_name: tensor}}, "model_flags": {name: {"frozen": [...], "eval": [...]}},
         "optimizers": {name: optimizer state_dict}, "schedulers": {...}, "scalers": {...},
         "hyperparams": {name: values}, "dataloaders": {...}, "custom": {...}, "rng": {...},
         "exact": bool, "archive": {...}}

    ``exact`` is False for a checkpoint of the lossy archive: its tensors are the decoded values,
    within the errors ``archive`` records (the codec, its parameters, the largest max abs and
    relative L2 error of a tensor); a warning says so.

    Values keep the types they were saved with (tuples, numpy arrays, paths, dates, torch dtypes).
    Raises :class:`~weightslab.CheckpointNotFoundError` when ``ref`` names nothing and
    :class:`~weightslab.CorruptCheckpointError` when a byte does not match its digest.
    """
    manager = _manager(ref, root)
    entries = manager.candidates(ref)
    if not entries:  # only "latest" comes back empty; explicit refs raise in candidates()
        raise CheckpointNotFoundError(f"no committed checkpoint under {manager.root} to load; train with "
                                      "checkpoints saved there, or pass root= the root_log_dir your training used")
    # The first candidate, and no fallback: a damaged checkpoint is reported, never silently
    # replaced by an older one in a file the user will take for the newest.
    manifest = manager.read_manifest(entries[0])
    if not manifest.exact:
        log.warning("checkpoint %s is in the lossy archive: its tensors are the archived values, not the ones saved "
                    "(%s)", manifest.ref, describe_lossy(manifest))
    tensors = load_tensors(manager, manifest)
    tensors.update(_whole_shards(manager, manifest))
    state = manifest.state

    def section(name: str) -> dict[str, Any]:
        return codec.decode(state.get(name) or {}, tensors)

    models: dict[str, Any] = {}
    flags: dict[str, Any] = {}
    for name, saved in (state.get("models") or {}).items():
        models[name] = codec.decode(saved.get("state_dict", {}), tensors)
        flags[name] = {"frozen": list(saved.get("frozen", [])), "eval": list(saved.get("eval", []))}
    out: dict[str, Any] = {
        "ref": manifest.ref,
        "experiment": manifest.experiment,
        "step": manifest.step,
        "reasons": list(manifest.reasons),
        "metrics": codec.decode(dict(manifest.metrics), {}),
        "models": models,
        "model_flags": flags,
    }
    for name in _SECTIONS:
        out[name] = section(name)
    out["rng"] = section("rng")
    out["exact"], out["archive"] = manifest.exact, dict(manifest.archive)
    return out


def _whole_shards(manager: CheckpointManager, manifest: Any) -> dict[str, torch.Tensor]:
    """The sharded tensors of a distributed job's checkpoint (FSDP, DTensor), read whole in this
    one process with torch.distributed.checkpoint, every file verified first."""
    shards = manager.shards(manifest)
    if shards is None:
        return {}
    if World.current() is not None:
        raise ConfigError(f"checkpoint {manifest.ref} holds sharded tensors, which wl.load and wl.export read whole "
                          "in one process; call them outside the torch.distributed job (or use `weightslab export`), "
                          "or resume the checkpoint in the job with system.resume()")
    from .distributed.sharded import load as load_shards

    sharded = manifest.state["sharded"]["tensors"]
    meta = {key: (dtype, shape) for key, (dtype, shape) in tensor_meta(manifest).items() if key in sharded}
    # Nothing is allocated that the files on disk cannot hold: a crafted manifest may claim any shape.
    need = sum(math.prod(shape) * dtype.itemsize for dtype, shape in meta.values())
    directory, record = shards
    try:
        held = sum((directory / name).stat().st_size for name in record.files)
    except OSError as exc:
        raise CorruptCheckpointError(f"checkpoint {manifest.ref}: a file of its sharded tensors cannot be read "
                                     f"({exc}); it is damaged") from None
    if need > held:
        raise CorruptCheckpointError(f"checkpoint {manifest.ref}: its sharded tensors claim {need:,} bytes but their "
                                     f"files hold {held:,}; its manifest is damaged")
    targets = {key: torch.empty(shape, dtype=dtype) for key, (dtype, shape) in meta.items()}
    load_shards(targets, *shards)
    return targets


# --- writing ----------------------------------------------------------------------------------

def _write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Let ``write`` fill a temporary sibling of ``path`` (safetensors and torch.save write by file
    name), then commit it atomically: a crash leaves the old file or the new one, never a torn one."""
    sweep_temp_files([path.parent], of=path.name)  # what an export killed before left beside it
    with atomic_path(path) as tmp:
        # Created here first to learn the mode a new file gets (0o666 minus the umask), without
        # touching the process-wide umask: safetensors writes through its own temporary file,
        # which is 0o600, and an exported file is meant to be shared.
        with open(tmp, "xb"):
            pass
        mode = os.stat(tmp).st_mode & 0o777
        write(tmp)
        if os.stat(tmp).st_mode & 0o777 != mode:
            os.chmod(tmp, mode)


def _weights_only(value: Any) -> Any:
    """``value`` in the types ``torch.load(weights_only=True)`` accepts.

    Measured with torch 2.x: tensors, dicts (any hashable keys), lists, tuples, sets, numbers
    (NaN, complex, big ints), str, bytes, None, torch dtypes, devices and sizes load; numpy
    arrays and scalars, paths and datetimes are refused (their classes would need unpickling).
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        return {_weights_only(k): _weights_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_weights_only(v) for v in value]
    if isinstance(value, tuple) and not isinstance(value, torch.Size):
        return tuple(_weights_only(v) for v in value)
    if isinstance(value, np.ndarray):
        # codec only stores numeric arrays, which torch holds with the same dtype and shape.
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, PurePath):
        return os.fspath(value)
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    return value


def _model_tensors(state: Mapping[str, Any], model: str | None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors to put in a safetensors file, and the names of the models they come from."""
    models = state["models"]
    ref = state["ref"]
    if model is not None:
        if model not in models:
            have = ", ".join(repr(m) for m in models) or "none"
            raise ValueError(f"checkpoint {ref} has no model {model!r}; its models: {have}")
        chosen = [model]
    else:
        chosen = list(models)
    if not chosen:
        raise ValueError(f"checkpoint {ref} holds no model weights (no model was registered); export it "
                         "to a .pt file for its whole state")
    prefix = len(chosen) > 1
    out: dict[str, torch.Tensor] = {}
    for name in chosen:
        for pname, value in models[name].items():
            if not isinstance(value, torch.Tensor):
                # safetensors holds tensors only (e.g. a non-tensor _extra_state).
                log.warning("export of %s: %s of model %r is a %s, not a tensor; left out of the safetensors "
                            "file (a .pt export keeps it)", ref, pname, name, type(value).__name__)
                continue
            key = f"{name}.{pname}" if prefix else pname
            if key in out:
                raise ValueError(f"checkpoint {ref}: models {', '.join(map(repr, chosen))} both give the key "
                                 f"{key!r} once prefixed with their names; export one at a time with model=")
            out[key] = value
    # safetensors refuses tensors that share memory. load() reads each tensor into its own
    # buffer (tied weights included), so this only guards against a future change there.
    seen: set[int] = set()
    for key, value in out.items():
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen or not value.is_contiguous():
            out[key] = value.clone(memory_format=torch.contiguous_format)
        elif value.numel():
            seen.add(ptr)
    return out, chosen


def _save_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    import safetensors.torch  # a dependency; imported here so that `import weightslab` stays light

    safetensors.torch.save_file(tensors, os.fspath(path), metadata=metadata)


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def export(ref: str | os.PathLike[str], path: str | os.PathLike[str], *,
           root: str | os.PathLike[str] | None = None, model: str | None = None) -> Path:
    """Write checkpoint ``ref`` as one self-contained file at ``path``; return the path written.

    The suffix of ``path`` picks the format:

    - ``.safetensors``: the model weights, readable by any safetensors reader. With one model in
      the checkpoint the keys are its parameter names (``model.load_state_dict(load_file(path))``
      works); with several, ``<model>.<param>``, unless ``model=`` picks one. The metadata holds
      ``weightslab.ref``, ``weightslab.experiment``, ``weightslab.step``, ``weightslab.models``
      and ``format: pt`` (which transformers expects); for a checkpoint of the lossy archive, also
      ``weightslab.exact: false`` and ``weightslab.archive`` (its codec and errors, JSON).
    - ``.pt`` / ``.pth``: the whole state :func:`load` returns, in types that
      ``torch.load(path, weights_only=True)`` accepts: numpy arrays become tensors, paths and
      dates/times become strings (ISO 8601); tuples, dtypes and devices stay as they are.

    ``ref`` and ``root`` are as for :func:`load`. Missing parent directories are created. The
    file is written under a temporary name in its directory, fsynced and renamed over ``path``,
    so a crash or error leaves the previous file (if any) untouched.
    """
    target = Path(path).expanduser()
    suffix = target.suffix.lower()
    if target.is_dir():
        raise IsADirectoryError(f"cannot export to {target}: it is a directory; pass a file path such as "
                                f"{target / ('model' + (suffix if suffix in SUPPORTED_SUFFIXES else '.safetensors'))}")
    if suffix not in SUPPORTED_SUFFIXES:
        raise ValueError(f"cannot export to {target}: unsupported suffix {target.suffix or '(none)'!r}; "
                         f"use {', '.join(SUPPORTED_SUFFIXES)} (.safetensors for the model weights, .pt for "
                         "the whole state)")
    if suffix in _TORCH and model is not None:
        raise ValueError(f"model= picks the weights of a .safetensors export; a {suffix} export holds the whole "
                         f"state of every model. Export to a .safetensors file, or drop model=")
    state = load(ref, root=root)
    if suffix in _SAFETENSORS:
        tensors, chosen = _model_tensors(state, model)
        metadata = {
            "format": "pt",
            "weightslab.ref": state["ref"],
            "weightslab.experiment": state["experiment"],
            "weightslab.step": str(state["step"]),
            "weightslab.models": ",".join(chosen),
            "weightslab.version": __version__,
            # (a checkpoint of the lossy archive: the weights are its decoded values, within these errors)
            **({} if state["exact"] else {"weightslab.exact": "false",
                                          "weightslab.archive": json.dumps(state["archive"], sort_keys=True)}),
        }

        def write(tmp: Path) -> None:
            _save_safetensors(tensors, metadata, tmp)
    else:
        obj = _weights_only(state)

        def write(tmp: Path) -> None:
            _save_torch(obj, tmp)

    make_dirs(target.parent.absolute())
    _write_atomically(target, write)
    log.info("exported checkpoint %s to %s", state["ref"], target)
    return target
