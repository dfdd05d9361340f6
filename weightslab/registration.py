"""Registering the objects of a run: the ``wl.register_*``, ``wl.get_*`` and ``wl.unregister`` functions.

Each ``register_*`` checks that the object is what its kind needs (a ``torch.nn.Module``, an
optimizer, something with ``state_dict()``, ...), with an error that says what to pass instead, and
puts it in the process-wide :data:`~weightslab.ledger.LEDGER`. The first registration starts the
process-wide checkpoint system with default settings if none runs (:mod:`weightslab.process`):
registering is all a training script must do to be checkpointed.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from . import hyperparams as _hp
from .errors import RegistrationError
from .ledger import DEFAULT_NAME, LEDGER, Entry
from .process import ensure_running

__all__ = [
    "register_model", "register_optimizer", "register_scheduler", "register_hyperparams", "register_dataloader",
    "register_scaler", "register_state", "get_model", "get_optimizer", "get_scheduler", "get_hyperparams",
    "get_dataloader", "get_scaler", "get_state", "unregister", "list_registered",
]


def _register(entry: Entry) -> None:
    ensure_running()  # (first, so that the system attaches to this entry as it is registered)
    LEDGER.register(entry)


class _NotGiven:
    """The default of an argument left out: ``None`` passed on purpose is an error to report."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN: Any = _NotGiven()


def _split(kind: str, name: Any, obj: Any) -> tuple[str, Any]:
    """Allow ``register_x(obj)`` as well as ``register_x(name, obj)``; anything else is an error that
    says what was passed and how to call it."""
    usage = f"call register_{kind}({kind}) or register_{kind}(name, {kind})"
    if obj is _NOT_GIVEN:
        if name is _NOT_GIVEN or name is None:
            raise RegistrationError(f"register_{kind} needs the object to register"
                                    f"{', got None' if name is None else ''}: {usage}")
        if isinstance(name, str) and kind != "hyperparams":  # (a YAML path alone is hyperparameters)
            raise RegistrationError(f"register_{kind}({name!r}) got a name but no {kind}: {usage}")
        return DEFAULT_NAME, name
    if name is _NOT_GIVEN:  # register_x(x=obj)
        name = DEFAULT_NAME
    if obj is None:
        raise RegistrationError(f"register_{kind}({name!r}, None): the {kind} to register is None; {usage}")
    if not isinstance(name, str):
        if isinstance(obj, str):
            raise RegistrationError(f"register_{kind}({type(name).__name__}, {obj!r}): the name comes first; call "
                                    f"register_{kind}({obj!r}, {kind})")
        raise RegistrationError(f"register_{kind}(name, {kind}): the name must be a string, got "
                                f"{type(name).__name__}; pass register_{kind}({kind}) to use the name 'main'")
    return name, obj


def _require(kind: str, name: str, obj: Any, methods: Iterable[str], hint: str) -> None:
    missing = [m for m in methods if not callable(getattr(obj, m, None))]
    if missing:
        raise RegistrationError(f"cannot register {type(obj).__name__} as {kind} {name!r}: it has no "
                                f"{' / '.join(missing)}(); {hint}")


def _require_type(kind: str, name: str, obj: Any, cls: type, display: str) -> None:
    if not isinstance(obj, cls):
        raise RegistrationError(f"cannot register {type(obj).__name__} as {kind} {name!r}: it must be a {display}")


def register_model(name: Any = _NOT_GIVEN, model: Any = _NOT_GIVEN) -> Any:
    """Register a ``torch.nn.Module`` (``register_model(model)`` uses the name ``"main"``)."""
    name, model = _split("model", name, model)
    _require_type("model", name, model, torch.nn.Module, "torch.nn.Module")
    _register(Entry("model", name, model))
    return model


def register_optimizer(name: Any = _NOT_GIVEN, optimizer: Any = _NOT_GIVEN) -> Any:
    """Register a ``torch.optim.Optimizer``; a post-step hook then finds the step boundaries."""
    name, optimizer = _split("optimizer", name, optimizer)
    _require_type("optimizer", name, optimizer, torch.optim.Optimizer, "torch.optim.Optimizer")
    _register(Entry("optimizer", name, optimizer))
    return optimizer


def register_scheduler(name: Any = _NOT_GIVEN, scheduler: Any = _NOT_GIVEN) -> Any:
    """Register a learning-rate scheduler (anything with ``state_dict``/``load_state_dict``)."""
    name, scheduler = _split("scheduler", name, scheduler)
    _require("scheduler", name, scheduler, ("state_dict", "load_state_dict"),
             "use a torch.optim.lr_scheduler scheduler, or register_state for custom objects")
    _register(Entry("scheduler", name, scheduler))
    return scheduler


def register_scaler(name: Any = _NOT_GIVEN, scaler: Any = _NOT_GIVEN) -> Any:
    """Register an AMP ``GradScaler`` (anything with ``state_dict``/``load_state_dict``)."""
    name, scaler = _split("scaler", name, scaler)
    _require("scaler", name, scaler, ("state_dict", "load_state_dict"), "use torch.amp.GradScaler")
    _register(Entry("scaler", name, scaler))
    return scaler


def register_hyperparams(name: Any = _NOT_GIVEN, hyperparams: Any = _NOT_GIVEN) -> Any:
    """Register hyperparameters: a dict, a dataclass instance, a namespace, or a YAML file's path.

    Returns the live object weightslab tracks (for a YAML path, the dict loaded from it). Mutate it
    in place during training and the change is detected at the next step boundary.
    """
    name, hyperparams = _split("hyperparams", name, hyperparams)
    live, source = _hp.resolve(hyperparams, name=name)
    _hp.to_plain(live, where=f"hyperparameters {name!r}" if source is None else str(source))
    _register(Entry("hyperparams", name, live, source=source))
    return live


def register_dataloader(name: Any = _NOT_GIVEN, dataloader: Any = _NOT_GIVEN) -> Any:
    """Register a data loader (its position is saved when it offers ``state_dict()``)."""
    name, dataloader = _split("dataloader", name, dataloader)
    if not hasattr(dataloader, "__iter__"):
        raise RegistrationError(f"cannot register {type(dataloader).__name__} as dataloader {name!r}: "
                                "it is not iterable")
    _register(Entry("dataloader", name, dataloader))
    return dataloader


def register_state(name: Any = None, getter: Callable[[], Any] | None = None,
                   setter: Callable[[Any], None] | None = None) -> None:
    """Register any other state by a ``getter()`` returning plain data and a ``setter(value)``.

    The getter may return nested dicts, lists, tuples, numbers, strings, tensors and numpy arrays;
    the setter receives the same structure on resume.
    """
    if callable(name) and setter is None:  # register_state(getter, setter)
        name, getter, setter = DEFAULT_NAME, name, getter
    if name is None:
        name = DEFAULT_NAME
    if not isinstance(name, str):
        raise RegistrationError(f"register_state(name, getter, setter): the name must be a string, got "
                                f"{type(name).__name__}")
    if not callable(getter) or not callable(setter):
        raise RegistrationError(f"register_state({name!r}, getter, setter) needs two callables: getter() "
                                "returning the state and setter(state) restoring it; got "
                                f"{type(getter).__name__} and {type(setter).__name__}")
    _register(Entry("state", name, getter, setter=setter))


def _getter(kind: str) -> Callable[[str], Any]:
    def get(name: str = DEFAULT_NAME) -> Any:
        return LEDGER.get(kind, name).obj
    get.__name__ = f"get_{kind}"
    get.__doc__ = f"The {kind} registered under ``name`` (``'main'`` by default)."
    return get


get_model = _getter("model")
get_optimizer = _getter("optimizer")
get_scheduler = _getter("scheduler")
get_hyperparams = _getter("hyperparams")
get_dataloader = _getter("dataloader")
get_scaler = _getter("scaler")


def get_state(name: str = DEFAULT_NAME) -> Any:
    """The current value of the custom state registered under ``name`` (calls its getter)."""
    return LEDGER.get("state", name).obj()


def unregister(name: str = DEFAULT_NAME, *, kind: str | None = None) -> list[str]:
    """Remove ``name`` from one kind, or from every kind; returns the kinds it was removed from."""
    return [e.kind for e in LEDGER.unregister(name, kind=kind)]


def list_registered() -> dict[str, list[str]]:
    """``{kind: [names...]}`` of everything registered, kinds without entries left out."""
    return LEDGER.list_registered()
