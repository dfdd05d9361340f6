"""What a checkpoint holds: collecting the full training state from the ledger, and putting it back.

The state layer knows torch, not paths. :func:`capture` turns every registered object into one
JSON-ready tree plus a flat table of (live, uncopied) tensors; :func:`restore` checks that the tree
fits the registered objects *before* touching any of them, then restores models, optimizers,
schedulers, scalers, hyperparameters, data loaders and custom state, and the random generators
last (a restore may draw random numbers).

Besides ``state_dict()``, a model's entry records which parameters are frozen and which modules
are in eval mode: both change what the next training step computes, so an exact resume needs them.

A restore can still fail where nothing could check it beforehand (a ``register_state`` setter that
raises). :class:`Undo` takes the registered objects' state before a restore (copies) and learns
which objects the restore reached, so that a resume that cannot finish puts exactly those back.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from . import codec, data, rng
from . import hyperparams as _hp
from .canonical import canonical_json
from .errors import ArchitectureMismatchError, StateError, WeightslabError
from .fingerprint import keep_excluded

__all__ = ["Captured", "capture", "capture_early", "capture_own", "capture_replicated", "restore", "check_compatible",
           "RestoreReport", "Undo"]

if TYPE_CHECKING:
    from .ledger import Ledger

log = logging.getLogger(__name__)

@dataclass
class Captured:
    tree: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # live tensors: copy them before training continues
    #: Keys of the tensors only an optimizer step changes: the models' parameters and the optimizers'
    #: per-parameter state (not buffers, which a forward updates, nor tensors in param groups, which
    #: a scheduler may fill). Their copy may run beside the next forward and backward.
    step_only: set[str] = field(default_factory=set)

    def to_bytes(self) -> bytes:
        """One safetensors document holding the tensors (copied to the CPU) and the tree in its
        metadata: how a rank's own state travels to rank 0, with nothing pickled."""
        import safetensors.torch  # a dependency; imported here so that `import weightslab` stays light

        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.tensors.items()}
        return safetensors.torch.save(tensors, metadata={"tree": canonical_json(self.tree)})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Captured":
        import safetensors.torch

        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size])["__metadata__"]
        return cls(tree=json.loads(metadata["tree"]), tensors=dict(safetensors.torch.load(data)))


@dataclass
class RestoreReport:
    restored: list[str] = field(default_factory=list)  # "model 'main'", ...
    missing: list[str] = field(default_factory=list)  # registered here, absent from the checkpoint
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not registered here
    kept: list[str] = field(default_factory=list)  # "config.log_interval": excluded keys left as they are
    current: str = "nothing"  # the object being restored (what a failure names)


def capture_early(ledger: Ledger) -> dict[str, Any]:
    """The parts of the state that the *next* step consumes before its forward pass: the random
    generators (its batch, its noise) and the data loaders' positions (its batch).

    An implicit step boundary is found at the optimizer's post-step hook, but the rest of the
    step (``scheduler.step()``, ``scaler.update()``) is only done at the next forward; these parts
    are taken at the hook, the rest at that forward.
    """
    loaders = {name: data.loader_state(loader) for name, loader in ledger.objects("dataloader").items()}
    return {"rng": rng.capture(), "dataloaders": loaders}


def capture(ledger: Ledger, *, step: int, early: Mapping[str, Any] | None = None) -> Captured:
    """Collect everything registered into one tree; raises :class:`StateError` naming what failed.

    ``early`` holds what :func:`capture_early` took at the boundary, if it was taken then.
    """
    captured = capture_replicated(ledger, step=step)
    mine = capture_own(ledger, early=early)
    captured.tree.update(mine.tree)
    captured.tensors.update(mine.tensors)
    return captured


def _step_only(ledger: Ledger, tensors: Mapping[str, torch.Tensor]) -> set[str]:
    parameters = {id(p) for model in ledger.objects("model").values() for p in model.parameters()}
    return {key for key, t in tensors.items()
            if id(t) in parameters or (key.startswith("optimizers/") and key.split("/")[2:3] == ["state"])}


def capture_replicated(ledger: Ledger, *, step: int) -> Captured:
    """The sections of the state that are the same on every rank of a data-parallel job (or
    sharded across them): models, optimizers, schedulers, scalers, hyperparameters."""
    tensors: dict[str, torch.Tensor] = {}
    tree: dict[str, Any] = {"step": step}

    def enc(value: Any, path: str, what: str) -> Any:
        return codec.encode(value, path=path, tensors=tensors, what=what)

    tree["models"] = {name: _model_tree(name, model, tensors) for name, model in ledger.objects("model").items()}
    for section, kind in (("optimizers", "optimizer"), ("schedulers", "scheduler"), ("scalers", "scaler")):
        tree[section] = {name: enc(obj.state_dict(), f"{section}/{name}", f"{kind} {name!r}")
                         for name, obj in ledger.objects(kind).items()}
    tree["hyperparams"] = {
        name: enc(_hp.to_plain(obj, where=f"hyperparameters {name!r}"), f"hyperparams/{name}",
                  f"hyperparameters {name!r}")
        for name, obj in ledger.objects("hyperparams").items()}
    tree["parameters"] = _parameter_keys(ledger, tensors)
    return Captured(tree=tree, tensors=tensors, step_only=_step_only(ledger, tensors))


def _parameter_keys(ledger: Ledger, tensors: Mapping[str, torch.Tensor]) -> dict[str, list[str | None]]:
    """``{optimizer: [tensor key of the model parameter in each of its state slots, or None]}``: a
    state dict numbers parameters in the order of its param groups, and says nothing of which is
    which. The lossy archive encodes a parameter's weight and moments together (ExCP's joint
    shrinking); restoring never reads it."""
    key_of = {id(t): k for k, t in tensors.items() if k.startswith("models/")}
    return {name: [key_of.get(id(p)) for group in opt.param_groups for p in group["params"]]
            for name, opt in ledger.objects("optimizer").items()}


def _model_tree(name: str, model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        # keep_vars: the live parameters and buffers themselves, whose identity and version
        # counters tell the snapshotter which ones changed since the last save.
        "state_dict": codec.encode(dict(model.state_dict(keep_vars=True)), path=f"models/{name}", tensors=tensors,
                                   what=f"model {name!r}"),
        "frozen": [n for n, p in model.named_parameters() if not p.requires_grad],
        "eval": [n for n, m in model.named_modules() if not m.training],
    }


def capture_own(ledger: Ledger, *, early: Mapping[str, Any] | None = None, prefix: str = "") -> Captured:
    """The sections of the state that each rank of a distributed job holds for itself (see
    :mod:`weightslab.distributed.ranks`): loader positions, custom state, random generators. Tensor keys start
    with ``prefix`` (``"ranks/1/"``), so that every rank's tensors fit in one table."""
    early = early if early is not None else capture_early(ledger)
    tensors: dict[str, torch.Tensor] = {}
    tree: dict[str, Any] = {}

    def enc(value: Any, path: str, what: str) -> Any:
        return codec.encode(value, path=prefix + path, tensors=tensors, what=what)

    tree["dataloaders"] = {name: enc(value, f"dataloaders/{name}", f"dataloader {name!r}") if value is not None
                           else None for name, value in early["dataloaders"].items()}
    tree["custom"] = {}
    for name, entry in ledger.entries("state").items():
        try:
            value = entry.obj()
        except Exception as exc:
            raise StateError(f"the getter of custom state {name!r} raised {type(exc).__name__}: {exc}") from exc
        tree["custom"][name] = enc(value, f"state/{name}", f"custom state {name!r}")
    tree["rng"] = enc(early["rng"], "rng", "random generator state")
    return Captured(tree=tree, tensors=tensors)


def _model_tensor_keys(model_tree: Mapping[str, Any]) -> dict[str, str]:
    """``{state_dict key: tensor-table key}`` for one model's entry."""
    sd = model_tree.get("state_dict", {})
    return {name: node["key"] for name, node in sd.items()
            if isinstance(node, dict) and node.get(codec.TAG) == "tensor"}


def check_compatible(ledger: Ledger, tree: Mapping[str, Any],
                     tensor_meta: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
    """Raise :class:`ArchitectureMismatchError` listing every difference between the checkpoint's
    models and optimizers and the registered ones, before anything is modified."""
    differences: list[str] = []
    for name, model in ledger.objects("model").items():
        saved = tree.get("models", {}).get(name)
        if saved is None:
            continue
        live = model.state_dict()
        keys = _model_tensor_keys(saved)
        for pname in sorted(set(keys) | set(live)):
            if pname not in live:
                dtype, shape = tensor_meta[keys[pname]]
                differences.append(f"model {name!r}: {pname} {list(shape)} {dtype} is in the checkpoint "
                                   "but not in the model")
            elif pname not in keys:
                differences.append(f"model {name!r}: {pname} {list(live[pname].shape)} is in the model "
                                   "but not in the checkpoint")
            else:
                dtype, shape = tensor_meta[keys[pname]]
                t = live[pname]
                if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                    differences.append(f"model {name!r}: {pname} is {list(shape)} {dtype} in the checkpoint, "
                                       f"{list(t.shape)} {t.dtype} in the model")
    for name, opt in ledger.objects("optimizer").items():
        saved = tree.get("optimizers", {}).get(name)
        if saved is None:
            continue
        groups = codec.decode(saved.get("param_groups", []), {})
        live_sizes = [len(g["params"]) for g in opt.param_groups]
        saved_sizes = [len(g["params"]) for g in groups]
        if live_sizes != saved_sizes:
            differences.append(f"optimizer {name!r}: parameter groups hold {saved_sizes} parameters in the "
                               f"checkpoint but {live_sizes} here")
    if differences:
        listing = "\n  ".join(differences)
        raise ArchitectureMismatchError(
            f"the checkpoint does not fit the registered objects:\n  {listing}\n"
            "Build the model as it was when the checkpoint was saved: system.resume(ref, model_factory=f) "
            "calls f(system.peek(ref)), which holds its hyperparameters and architecture, and registers what f "
            "builds; or resume a checkpoint of this architecture.",
            differences=differences)


def restore(ledger: Ledger, tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], *,
            excluded: frozenset[str] = frozenset(), undo: Undo | None = None) -> RestoreReport:
    """Load ``tree`` into the registered objects (call :func:`check_compatible` first). Hyperparameter
    keys in ``excluded`` (those left out of the experiment hash) keep their live values.

    An object that cannot take its state back raises :class:`StateError` naming it (a weightslab
    error is raised as it is); ``undo`` learns each object before it is touched, so that the caller
    can put back those the restore reached."""
    report = RestoreReport()
    try:
        _restore(ledger, tree, tensors, excluded, report, undo if undo is not None else Undo.nothing())
    except WeightslabError:
        raise
    except Exception as exc:
        raise StateError(f"restoring {report.current} failed: {type(exc).__name__}: {exc}") from exc
    return report


def _restore(ledger: Ledger, tree: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], excluded: frozenset[str],
             report: RestoreReport, undo: Undo) -> None:
    def reach(kind: str, name: str) -> None:
        report.current = f"{kind} {name!r}" if name else kind
        undo.reach(kind, name)

    def dec(node: Any) -> Any:
        return codec.decode(node, tensors)

    def pair(section: str, kind: str) -> list[tuple[str, Any, Any]]:
        saved = tree.get(section, {}) or {}
        live = ledger.entries(kind)
        report.missing += [f"{kind} {n!r}" for n in live if n not in saved]
        report.unused += [f"{kind} {n!r}" for n in saved if n not in live]
        return [(n, live[n], saved[n]) for n in live if n in saved]

    for name, entry, saved in pair("models", "model"):
        reach("model", name)
        model = entry.obj
        model.load_state_dict(dec(saved["state_dict"]), strict=True)
        frozen = set(saved.get("frozen", []))
        for pname, p in model.named_parameters():
            p.requires_grad_(pname not in frozen)
        in_eval = set(saved.get("eval", []))
        for mname, m in model.named_modules():
            m.training = mname not in in_eval
        report.restored.append(f"model {name!r}")
    for section, kind in (("optimizers", "optimizer"), ("schedulers", "scheduler"), ("scalers", "scaler")):
        for name, entry, saved in pair(section, kind):
            reach(kind, name)
            entry.obj.load_state_dict(dec(saved))
            report.restored.append(f"{kind} {name!r}")
    for name, entry, saved in pair("hyperparams", "hyperparams"):
        reach("hyperparams", name)
        values, kept = keep_excluded(dec(saved), _hp.to_plain(entry.obj, where=f"hyperparameters {name!r}"), excluded)
        _hp.restore_in_place(entry.obj, values, name=name)
        report.restored.append(f"hyperparameters {name!r}")
        report.kept += [f"{name}.{key}" for key in kept]
    for name, entry, saved in pair("dataloaders", "dataloader"):
        if saved is None:
            continue
        reach("dataloader", name)
        if data.restore_loader(entry.obj, dec(saved)):
            report.restored.append(f"dataloader {name!r}")
        else:
            log.warning("dataloader %r cannot take back its saved position (no load_state_dict()); it restarts "
                        "its epoch", name)
    for name, entry, saved in pair("custom", "state"):
        reach("custom state", name)
        entry.setter(dec(saved))
        report.restored.append(f"custom state {name!r}")
    if "rng" in tree:
        reach("random generators", "")
        rng.restore(dec(tree["rng"]))
        report.restored.append("random generators")
    report.current = "nothing"


def _copy(value: Any) -> Any:
    """A copy of a state value that no later change of the live object reaches: tensors copied (to
    the CPU, so a GPU holds no second copy; a sharded tensor stays where its shards are)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True) if type(value) is torch.Tensor else value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_copy(v) for v in value)
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - an object that cannot be copied is put back as it is
        return value


class Undo:
    """The registered objects as they were before a restore, and the ones the restore reached.

    Made before the restore (it copies every registered object's state: the models' and optimizers'
    tensors go to host memory); :func:`restore` tells it each object before touching it;
    :meth:`put_back` gives those objects their earlier state again, the random generators last.
    """

    def __init__(self, ledger: Ledger | None):
        self._put: dict[tuple[str, str], Callable[[], None]] = {}
        self._unsaved: dict[tuple[str, str], str] = {}  # objects whose state could not be taken, and why
        self.reached: list[tuple[str, str]] = []
        if ledger is None:
            return
        for name, model in ledger.objects("model").items():
            self._put[("model", name)] = self._model(model)
        for kind in ("optimizer", "scheduler", "scaler"):
            for name, obj in ledger.objects(kind).items():
                self._put[(kind, name)] = self._loadable(obj)
        for name, obj in ledger.objects("hyperparams").items():
            values = copy.deepcopy(_hp.to_plain(obj, where=f"hyperparameters {name!r}"))
            self._put[("hyperparams", name)] = lambda obj=obj, values=values, name=name: \
                _hp.restore_in_place(obj, values, name=name)
        for name, loader in ledger.objects("dataloader").items():
            position = _copy(data.loader_state(loader))
            self._put[("dataloader", name)] = lambda loader=loader, position=position: \
                data.restore_loader(loader, position) if position is not None else None
        for name, entry in ledger.entries("state").items():
            try:
                value = _copy(entry.obj())
            except Exception as exc:  # noqa: BLE001 - said if it must be put back
                self._unsaved[("custom state", name)] = f"its getter raised {type(exc).__name__}: {exc}"
                continue
            self._put[("custom state", name)] = lambda setter=entry.setter, value=value: setter(value)
        generators = rng.capture()
        self._put[("random generators", "")] = lambda: rng.restore(generators)

    @classmethod
    def nothing(cls) -> "Undo":
        """An undo that keeps nothing (a restore nobody will take back)."""
        return cls(None)

    @staticmethod
    def _model(model: Any) -> Callable[[], None]:
        weights = {k: _copy(v) for k, v in model.state_dict().items()}
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        in_eval = {n for n, m in model.named_modules() if not m.training}

        def put() -> None:
            model.load_state_dict(weights, strict=True)
            for pname, p in model.named_parameters():
                p.requires_grad_(pname not in frozen)
            for mname, m in model.named_modules():
                m.training = mname not in in_eval
        return put

    @staticmethod
    def _loadable(obj: Any) -> Callable[[], None]:
        saved = _copy(obj.state_dict())
        return lambda: obj.load_state_dict(saved)

    def reach(self, kind: str, name: str) -> None:
        """The restore is about to change this object."""
        self.reached.append((kind, name))

    @staticmethod
    def name(key: tuple[str, str]) -> str:
        return f"{key[0]} {key[1]!r}" if key[1] else key[0]

    def put_back(self) -> dict[str, str]:
        """Give every object the restore reached its earlier state (the random generators last);
        returns the objects that could not be put back (by :meth:`name`), and why."""
        problems = {}
        for key in sorted(dict.fromkeys(self.reached), key=lambda k: k[0] == "random generators"):
            put = self._put.get(key)
            if put is None:
                if key in self._unsaved:
                    problems[self.name(key)] = self._unsaved[key]
                continue
            try:
                put()
            except Exception as exc:  # noqa: BLE001 - the caller says so, with its own error
                problems[self.name(key)] = f"{type(exc).__name__}: {exc}"
        self.reached.clear()
        return problems
