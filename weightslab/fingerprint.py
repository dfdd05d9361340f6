"""Which experiment a run is: a hash of its architecture and its hyperparameters.

The experiment hash is the first 16 hex characters (64 bits) of SHA-256 over a canonical JSON
description of

* the architecture: every registered model, in registration order, as the list of its modules in
  ``named_modules()`` order, each with its qualified name, class, constructor configuration (the
  module's ``extra_repr()``: in/out features, kernel size, ...), and the names, shapes and dtypes of
  its parameters and persistent buffers. Values, ``requires_grad`` and train/eval mode are state,
  not architecture, and do not enter the hash;
* the hyperparameters: every registered hyperparameter object as canonical JSON (sorted keys,
  integral floats written as integers so ``lr: 1`` and ``lr: 1.0`` agree), minus keys that do not
  define the experiment (checkpointing, logging, data handling: :data:`DEFAULT_EXCLUDED_KEYS`,
  extendable).

Data state (discarded samples, tags, augmentation, loader position) never enters the hash.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .canonical import canonical_json
from .hyperparams import to_plain

__all__ = [
    "DEFAULT_EXCLUDED_KEYS",
    "ExperimentHashGenerator",
    "Fingerprint",
    "HashChange",
    "describe_architecture",
    "architecture_text",
    "diff_architecture",
    "diff_hyperparams",
    "keep_excluded",
]

#: Hyperparameter keys that never change the experiment: where and how often to save or log,
#: which device or how many workers, and data handling (which samples, tags, augmentation).
#: A bare name matches at any depth; a dotted path ("trainer.log_every") matches that path only.
DEFAULT_EXCLUDED_KEYS: frozenset[str] = frozenset({
    # checkpointing and output
    "checkpoint", "checkpoints", "checkpointing", "checkpoint_frequency", "checkpoint_every",
    "checkpoint_dir", "save_every", "save_dir", "output_dir", "out_dir", "root_log_dir", "resume",
    # logging and tracking
    "log_dir", "logdir", "logging", "log_every", "log_interval", "log_level", "verbose",
    "wandb", "tensorboard", "experiment_name", "run_name", "tags",
    # where it runs
    "device", "num_workers", "pin_memory",
    # data handling, which the original design keeps out of the experiment identity
    "augmentation", "augmentations", "augment", "transforms", "discarded", "discarded_samples",
    "sample_tags",
})

_ADDRESS_RE = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs inside extra_repr differ per process


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _describe_model(model: nn.Module) -> list[dict[str, Any]]:
    entries = []
    for name, module in model.named_modules():
        cls = type(module)
        params = [[n, list(p.shape), _dtype_name(p.dtype)]
                  for n, p in module._parameters.items() if p is not None]
        buffers = [[n, list(b.shape), _dtype_name(b.dtype)]
                   for n, b in module._buffers.items()
                   if b is not None and n not in module._non_persistent_buffers_set]
        entries.append({
            "name": name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "config": _ADDRESS_RE.sub("", module.extra_repr()),
            "params": params,
            "buffers": buffers,
        })
    return entries


def describe_architecture(models: Mapping[str, nn.Module]) -> list[list[Any]]:
    """``[[model_name, [module entries...]], ...]`` in registration order (a list keeps the order)."""
    return [[name, _describe_model(model)] for name, model in models.items()]


def architecture_text(models: Mapping[str, nn.Module]) -> str:
    """A readable module tree with a parameter table, for ``model/<hash>_architecture.txt``."""
    parts = []
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        parts.append(f"== model {name!r}: {type(model).__qualname__}, {total:,} parameters ==")
        parts.append(repr(model))
        parts.append("")
        for pname, p in model.named_parameters():
            parts.append(f"  {pname:<48} {str(list(p.shape)):<20} {_dtype_name(p.dtype)}")
        parts.append("")
    return "\n".join(parts) + "\n"


def _matches(path: str, name: str, excluded: frozenset[str]) -> bool:
    return name in excluded or path in excluded


def keep_excluded(saved: Mapping[str, Any], live: Mapping[str, Any], excluded: frozenset[str], *,
                  path: str = "") -> tuple[dict[str, Any], list[str]]:
    """The values a resume writes back into a registered config, and the keys it leaves.

    Keys that define the experiment take their ``saved`` values. Keys excluded from the experiment
    (matched as the hash matches them: by name at any depth of nested mappings, or by dotted path)
    keep their ``live`` values, or stay absent: they say how this process runs (where it logs, when
    it stops, which device), not what it trains. Also returns the dotted paths of the excluded keys
    whose live value differs from the saved one.
    """
    out: dict[str, Any] = {}
    kept: list[str] = []
    for key in [*live, *(k for k in saved if k not in live)]:  # the live order, then keys only saved
        sub = f"{path}.{key}" if path else str(key)
        if _matches(sub, str(key), excluded):
            if key in live:
                out[key] = live[key]
            if live.get(key, _ABSENT) != saved.get(key, _ABSENT):
                kept.append(sub)
        elif key in saved:
            value, live_value = saved[key], live.get(key)
            if isinstance(value, Mapping) and isinstance(live_value, Mapping):
                value, inner = keep_excluded(value, live_value, excluded, path=sub)
                kept += inner
            out[key] = value
    return out, kept


_ABSENT = object()


def _canonical(value: Any, excluded: frozenset[str], path: str) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        if value.is_integer() and abs(value) < 2**53:
            return int(value)  # 1.0 and 1 mean the same learning rate
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = str(k)
            sub = f"{path}.{key}" if path else key
            if not _matches(sub, key, excluded):
                out[key] = _canonical(v, excluded, sub)
        return out
    if isinstance(value, (list, tuple)):
        return [_canonical(v, excluded, path) for v in value]
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    raise TypeError(f"unexpected {type(value).__name__} in plain hyperparameters")  # to_plain guards this


def _sha256(value: Any) -> str:
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


@dataclass(frozen=True)
class HashChange:
    """Which part of the experiment identity changed; false when neither did."""

    architecture: bool
    hyperparams: bool

    def __bool__(self) -> bool:
        return self.architecture or self.hyperparams


@dataclass(frozen=True)
class Fingerprint:
    hash: str
    architecture_digest: str
    hyperparams_digest: str
    architecture: list[list[Any]]
    hyperparams: dict[str, Any]  # canonical (excluded keys removed), as hashed
    branch: str | None = None  # set by a fork: the same architecture and values on another branch

    def compare(self, other: "Fingerprint") -> HashChange:
        return HashChange(architecture=self.architecture_digest != other.architecture_digest,
                          hyperparams=self.hyperparams_digest != other.hyperparams_digest)


class ExperimentHashGenerator:
    """Computes experiment hashes and says which part of one changed.

    >>> gen = ExperimentHashGenerator()
    >>> gen.generate_hash(nn.Linear(10, 64), {"lr": 1e-3})  # doctest: +SKIP
    '3f0c...'
    >>> gen.has_changed(nn.Linear(10, 64), {"lr": 1e-3})
    HashChange(architecture=False, hyperparams=False)
    >>> gen.has_changed(nn.Linear(10, 128), {"lr": 1e-3})
    HashChange(architecture=True, hyperparams=False)
    """

    def __init__(self, *, exclude_keys: Iterable[str] = (), use_default_exclusions: bool = True,
                 length: int = 16):
        if not 8 <= length <= 64:
            raise ValueError(f"hash length must be between 8 and 64 hex characters, got {length}")
        extra = frozenset(exclude_keys)
        self.excluded_keys: frozenset[str] = (DEFAULT_EXCLUDED_KEYS | extra) if use_default_exclusions else extra
        self.length = length
        self.last: Fingerprint | None = None

    def fingerprint(self, models: Mapping[str, nn.Module], hyperparams: Mapping[str, Any], *,
                    branch: str | None = None) -> Fingerprint:
        """Describe and hash registered ``models`` and ``hyperparams`` (each a name -> object map).

        ``branch`` (a fork's) enters the hash too, so a fork is its own experiment even with the
        values of the run it came from; without one the hash is what it always was."""
        arch = describe_architecture(models)
        hp = {name: _canonical(to_plain(obj, where=f"hyperparameters {name!r}"), self.excluded_keys, "")
              for name, obj in hyperparams.items()}
        arch_digest, hp_digest = _sha256(arch), _sha256(hp)
        identity = {"architecture": arch_digest, "hyperparams": hp_digest}
        if branch is not None:
            identity["branch"] = branch
        full = _sha256(identity)
        return Fingerprint(hash=full[: self.length], architecture_digest=arch_digest,
                           hyperparams_digest=hp_digest, architecture=arch, hyperparams=hp, branch=branch)

    def generate_hash(self, model: nn.Module | Mapping[str, nn.Module] | None = None,
                      hyperparams: Any = None) -> str:
        """The experiment hash of ``model`` and ``hyperparams``; also the baseline of :meth:`has_changed`.

        ``model`` is a module or a name -> module map; ``hyperparams`` one hyperparameter object.
        Both are taken as registered under the default name ``"main"``, so the result equals the
        hash the checkpoint system computes for ``wl.register_model(model)`` and
        ``wl.register_hyperparams(hyperparams)``.
        """
        self.last = self.fingerprint(_named(model), _named(hyperparams, single=True))
        return self.last.hash

    def has_changed(self, model: nn.Module | Mapping[str, nn.Module] | None = None,
                    hyperparams: Any = None) -> HashChange:
        """Which part differs from the last :meth:`generate_hash` (everything, if there was none)."""
        current = self.fingerprint(_named(model), _named(hyperparams, single=True))
        if self.last is None:
            return HashChange(architecture=True, hyperparams=True)
        return current.compare(self.last)


def _named(obj: Any, *, single: bool = False) -> dict[str, Any]:
    if obj is None:
        return {}
    if single or isinstance(obj, nn.Module):
        return {"main": obj}
    return dict(obj)


def diff_hyperparams(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two canonical hyperparameter trees."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in old:
            out.append(f"{path}: added {new[key]!r}")
        elif key not in new:
            out.append(f"{path}: removed (was {old[key]!r})")
        elif isinstance(old[key], Mapping) and isinstance(new[key], Mapping):
            out.extend(diff_hyperparams(old[key], new[key], path))
        elif old[key] != new[key]:
            out.append(f"{path}: {old[key]!r} -> {new[key]!r}")
    return out


def diff_architecture(old: list[list[Any]], new: list[list[Any]]) -> list[str]:
    """Human-readable differences between two architecture descriptions."""
    out = []
    old_models, new_models = dict((n, m) for n, m in old), dict((n, m) for n, m in new)
    for model in list(dict.fromkeys([*old_models, *new_models])):
        if model not in old_models:
            out.append(f"model {model!r} added")
            continue
        if model not in new_models:
            out.append(f"model {model!r} removed")
            continue
        a = {e["name"]: e for e in old_models[model]}
        b = {e["name"]: e for e in new_models[model]}
        for name in list(dict.fromkeys([*a, *b])):
            label = f"{model}:{name or '<root>'}"
            if name not in a:
                out.append(f"{label} added ({b[name]['class'].rsplit('.', 1)[-1]}({b[name]['config']}))")
            elif name not in b:
                out.append(f"{label} removed ({a[name]['class'].rsplit('.', 1)[-1]}({a[name]['config']}))")
            elif a[name] != b[name]:
                ea, eb = a[name], b[name]
                if ea["class"] != eb["class"] or ea["config"] != eb["config"]:
                    out.append(f"{label} {ea['class'].rsplit('.', 1)[-1]}({ea['config']}) -> "
                               f"{eb['class'].rsplit('.', 1)[-1]}({eb['config']})")
                else:
                    out.append(f"{label} tensors {ea['params'] + ea['buffers']} -> {eb['params'] + eb['buffers']}")
    return out
