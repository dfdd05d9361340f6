"""Tests of weightslab/ledger.py and the wl.register_* / get_* / unregister / list_registered functions."""

from __future__ import annotations

import argparse
import dataclasses
import threading

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.errors import NotRegisteredError, RegistrationError
from weightslab.ledger import KINDS, LEDGER, Entry, Ledger


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1
    epochs: int = 2


def _loader():
    ds = torch.utils.data.TensorDataset(torch.arange(8.0).unsqueeze(1))
    return torch.utils.data.DataLoader(ds, batch_size=4)


def _opt(model):
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.fixture
def events():
    """Every ledger event, recorded by a subscribed listener (unsubscribed afterwards)."""
    seen: list[tuple[str, Entry, Entry | None]] = []
    unsubscribe = LEDGER.subscribe(lambda event, entry, previous: seen.append((event, entry, previous)))
    yield seen
    unsubscribe()


# --- register and get, for every kind ---------------------------------------------------------

def test_model_default_and_explicit_names():
    a, b = nn.Linear(2, 2), nn.Linear(3, 3)
    assert wl.register_model(a) is a
    assert wl.register_model("encoder", b) is b
    assert wl.get_model() is a
    assert wl.get_model("main") is a
    assert wl.get_model("encoder") is b
    assert wl.list_registered() == {"model": ["main", "encoder"]}


def test_optimizer_scheduler_scaler_dataloader():
    model = nn.Linear(2, 2)
    opt, opt2 = _opt(model), torch.optim.Adam(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    scaler = torch.amp.GradScaler("cpu")
    loader = _loader()
    assert wl.register_optimizer(opt) is opt
    assert wl.register_optimizer("adam", opt2) is opt2
    assert wl.register_scheduler(sched) is sched
    assert wl.register_scheduler("warmup", sched) is sched
    assert wl.register_scaler(scaler) is scaler
    assert wl.register_scaler("amp", scaler) is scaler
    assert wl.register_dataloader(loader) is loader
    assert wl.register_dataloader("val", [1, 2, 3]) == [1, 2, 3]
    assert wl.get_optimizer() is opt and wl.get_optimizer("adam") is opt2
    assert wl.get_scheduler() is sched and wl.get_scheduler("warmup") is sched
    assert wl.get_scaler() is scaler and wl.get_scaler("amp") is scaler
    assert wl.get_dataloader() is loader and wl.get_dataloader("val") == [1, 2, 3]
    assert wl.list_registered() == {"optimizer": ["main", "adam"], "scheduler": ["main", "warmup"],
                                    "dataloader": ["main", "val"], "scaler": ["main", "amp"]}


def test_hyperparams_dict_dataclass_namespace_and_yaml(tmp_path):
    d = {"lr": 0.1}
    cfg = Cfg()
    ns = argparse.Namespace(lr=0.3)
    path = tmp_path / "config.yaml"
    path.write_text("lr: 0.01\nmodel:\n  width: 64\n")
    assert wl.register_hyperparams(d) is d
    assert wl.register_hyperparams("dc", cfg) is cfg
    assert wl.register_hyperparams("ns", ns) is ns
    live = wl.register_hyperparams("yaml", str(path))
    assert live == {"lr": 0.01, "model": {"width": 64}}
    assert wl.get_hyperparams() is d
    assert wl.get_hyperparams("dc") is cfg
    assert wl.get_hyperparams("ns") is ns
    assert wl.get_hyperparams("yaml") is live  # the live dict, not a copy
    live["lr"] = 0.5
    assert wl.get_hyperparams("yaml")["lr"] == 0.5
    assert LEDGER.get("hyperparams", "yaml").source == path
    assert LEDGER.get("hyperparams", "main").source is None
    live2 = wl.register_hyperparams("yaml2", path)  # a Path works too
    assert live2 == {"lr": 0.01, "model": {"width": 64}} and live2 is not live


def test_hyperparams_with_unplain_values_are_rejected_at_registration():
    with pytest.raises(wl.HyperparamsError, match=r"hyperparameters 'cfg'.*'opt.cls'"):
        wl.register_hyperparams("cfg", {"opt": {"cls": torch.optim.SGD}})
    assert "hyperparams" not in wl.list_registered()


def test_state_getter_and_setter():
    box = {"value": 1}
    wl.register_state("counter", lambda: box["value"], lambda v: box.__setitem__("value", v))
    assert wl.get_state("counter") == 1
    box["value"] = 5
    assert wl.get_state("counter") == 5  # the getter is called each time
    entry = LEDGER.get("state", "counter")
    entry.setter(9)
    assert box["value"] == 9

    def getter():
        return "g"

    def setter(v):
        pass

    wl.register_state(getter, setter)  # name defaults to "main"
    assert wl.get_state() == "g"
    assert LEDGER.get("state").setter is setter
    assert wl.list_registered() == {"state": ["counter", "main"]}


def test_reregistering_replaces():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    wl.register_model("net", a)
    wl.register_model("net", b)
    assert wl.get_model("net") is b
    assert wl.list_registered() == {"model": ["net"]}
    wl.register_hyperparams({"lr": 1})
    wl.register_hyperparams({"lr": 2})
    assert wl.get_hyperparams() == {"lr": 2}


# --- wrong types ------------------------------------------------------------------------------

@pytest.mark.parametrize("register, obj, expected", [
    (wl.register_model, {"w": 1}, "torch.nn.Module"),
    (wl.register_optimizer, nn.Linear(2, 2), "torch.optim.Optimizer"),
    (wl.register_scheduler, 3, "state_dict"),
    (wl.register_scaler, "scaler", "torch.amp.GradScaler"),
    (wl.register_dataloader, 5, "not iterable"),
])
def test_wrong_types_name_the_name_and_the_expected_type(register, obj, expected):
    kind = register.__name__.removeprefix("register_")
    with pytest.raises(RegistrationError) as info:
        register("my_thing", obj)
    msg = str(info.value)
    assert "'my_thing'" in msg
    assert type(obj).__name__ in msg
    assert kind in msg
    assert expected in msg
    assert isinstance(info.value, TypeError)
    assert wl.list_registered() == {}


def test_scheduler_error_says_what_is_missing_and_how_to_fix():
    with pytest.raises(RegistrationError) as info:
        wl.register_scheduler("lr", object())
    msg = str(info.value)
    assert "'lr'" in msg and "state_dict / load_state_dict()" in msg and "register_state" in msg


def test_wrong_hyperparams_type_names_the_name():
    with pytest.raises(RegistrationError) as info:
        wl.register_hyperparams("cfg", 42)
    msg = str(info.value)
    assert "dict" in msg and "dataclass" in msg  # the expected types: holds today
    assert "'cfg'" in msg  # the name: missing today


def test_hyperparams_class_instead_of_instance():
    with pytest.raises(RegistrationError, match=r"class Cfg; pass an instance, for instance Cfg\(\)"):
        wl.register_hyperparams("cfg", Cfg)


def test_state_needs_two_callables_and_names_the_name():
    with pytest.raises(RegistrationError) as info:
        wl.register_state("rng", lambda: 1, "not callable")
    msg = str(info.value)
    assert "'rng'" in msg and "two callables" in msg and "getter()" in msg and "setter(state)" in msg
    with pytest.raises(RegistrationError, match="name must be a string, got int"):
        wl.register_state(3, lambda: 1, lambda v: None)


def test_bad_names():
    with pytest.raises(RegistrationError, match=r"name must be a string, got int; pass register_model\(model\)"):
        wl.register_model(1, nn.Linear(2, 2))
    with pytest.raises(RegistrationError, match="register_model needs the object"):
        wl.register_model()
    with pytest.raises(RegistrationError, match="non-empty string, got ''"):
        wl.register_model("", nn.Linear(2, 2))
    with pytest.raises(RegistrationError, match="unknown kind 'weights'; expected one of model, optimizer"):
        Ledger().register(Entry("weights", "main", object()))


# --- unknown names ----------------------------------------------------------------------------

def test_get_unknown_name_lists_registered_and_how_to_register():
    wl.register_model("encoder", nn.Linear(2, 2))
    wl.register_model("decoder", nn.Linear(2, 2))
    with pytest.raises(NotRegisteredError) as info:
        wl.get_model("enc")
    msg = str(info.value)
    assert "no model named 'enc'" in msg
    assert "['decoder', 'encoder']" in msg
    assert "wl.register_model('enc', ...)" in msg
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError):
        wl.get_model()  # "main" was never registered


@pytest.mark.parametrize("kind", KINDS)
def test_get_of_an_empty_kind(kind):
    getter = getattr(wl, f"get_{kind}")
    with pytest.raises(NotRegisteredError) as info:
        getter("x")
    msg = str(info.value)
    assert f"no {kind} named 'x'" in msg and f"no {kind} is registered at all" in msg
    assert f"wl.register_{kind}('x', ...)" in msg


# --- unregister and list_registered -----------------------------------------------------------

def test_unregister_across_kinds_and_by_kind():
    model = nn.Linear(2, 2)
    wl.register_model("a", model)
    wl.register_optimizer("a", _opt(model))
    wl.register_hyperparams("a", {"lr": 1})
    wl.register_model("b", nn.Linear(2, 2))
    assert wl.list_registered() == {"model": ["a", "b"], "optimizer": ["a"], "hyperparams": ["a"]}
    assert wl.unregister("a", kind="optimizer") == ["optimizer"]
    assert wl.list_registered() == {"model": ["a", "b"], "hyperparams": ["a"]}
    assert wl.unregister("a") == ["model", "hyperparams"]
    assert wl.list_registered() == {"model": ["b"]}
    with pytest.raises(NotRegisteredError):
        wl.get_model("a")
    assert wl.get_model("b") is not None


def test_unregister_default_name():
    wl.register_model(nn.Linear(2, 2))
    assert wl.unregister() == ["model"]
    assert wl.list_registered() == {}


def test_unregister_unknown_names_what_is_registered():
    wl.register_model("b", nn.Linear(2, 2))
    with pytest.raises(NotRegisteredError) as info:
        wl.unregister("a")
    msg = str(info.value)
    assert "'a'" in msg and "{'model': ['b']}" in msg
    with pytest.raises(NotRegisteredError, match="nothing optimizer named 'b'"):
        wl.unregister("b", kind="optimizer")
    with pytest.raises(RegistrationError, match="unknown kind 'models'"):
        wl.unregister("b", kind="models")
    assert wl.list_registered() == {"model": ["b"]}


def test_list_registered_is_a_copy():
    wl.register_model(nn.Linear(2, 2))
    listing = wl.list_registered()
    listing["model"].append("ghost")
    listing["optimizer"] = ["x"]
    assert wl.list_registered() == {"model": ["main"]}


# --- listeners --------------------------------------------------------------------------------

def test_listeners_get_event_entry_and_previous(events):
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    wl.register_model("net", a)
    wl.register_model("net", b)
    wl.unregister("net")
    assert [(e, entry.kind, entry.name, entry.obj) for e, entry, _ in events] == [
        ("register", "model", "net", a), ("register", "model", "net", b), ("unregister", "model", "net", b)]
    assert events[0][2] is None
    assert events[1][2] is events[0][1]  # the replaced entry
    assert events[2][2] is None


def test_unsubscribe_stops_events():
    seen = []
    unsubscribe = LEDGER.subscribe(lambda *args: seen.append(args))
    wl.register_model(nn.Linear(2, 2))
    unsubscribe()
    unsubscribe()  # twice is harmless
    wl.register_model("other", nn.Linear(2, 2))
    assert len(seen) == 1


def _lock_probe(ledger: Ledger, results: list[tuple[str, bool, object]]):
    """A listener that needs the ledger from another thread while it runs."""

    def listener(event, entry, previous):
        acquired = threading.Event()
        listing: list[dict] = []

        def other():
            with ledger._lock:
                acquired.set()
            listing.append(ledger.list_registered())  # public read from the other thread

        t = threading.Thread(target=other)
        t.start()
        ok = acquired.wait(timeout=2)
        t.join(timeout=5)
        results.append((event, ok, listing[0] if listing else None))

    return listener


def test_listeners_are_called_outside_the_lock():
    results: list = []
    unsubscribe = LEDGER.subscribe(_lock_probe(LEDGER, results))
    try:
        wl.register_model("net", nn.Linear(2, 2))
        wl.unregister("net")
    finally:
        unsubscribe()
    assert [(e, ok) for e, ok, _ in results] == [("register", True), ("unregister", True)]
    assert results[0][2] == {"model": ["net"]}  # the registration is visible to the listener's reader
    assert results[1][2] == {}


def test_listeners_of_clear_are_called_outside_the_lock():
    ledger = Ledger()
    ledger.register(Entry("model", "a", nn.Linear(2, 2)))
    ledger.register(Entry("optimizer", "a", object()))
    results: list = []
    ledger.subscribe(_lock_probe(ledger, results))
    ledger.clear()
    assert [(e, ok) for e, ok, _ in results] == [("unregister", True), ("unregister", True)]
    assert ledger.is_empty()


def test_concurrent_registration_is_consistent(events):
    n_threads, per_thread = 8, 25
    barrier = threading.Barrier(n_threads)
    shared_objs: dict[int, nn.Module] = {}
    errors: list[BaseException] = []

    def work(t: int):
        try:
            barrier.wait(timeout=5)
            for i in range(per_thread):
                wl.register_model(f"t{t}-{i}", nn.Identity())
                wl.register_hyperparams(f"t{t}-{i}", {"t": t, "i": i})
                shared_objs[t] = wl.register_model("shared", nn.Identity())
                wl.list_registered()
            for i in range(0, per_thread, 2):
                wl.unregister(f"t{t}-{i}", kind="hyperparams")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    listing = wl.list_registered()
    expected_models = {f"t{t}-{i}" for t in range(n_threads) for i in range(per_thread)} | {"shared"}
    assert set(listing["model"]) == expected_models
    assert len(listing["model"]) == len(expected_models)
    expected_hp = {f"t{t}-{i}" for t in range(n_threads) for i in range(1, per_thread, 2)}
    assert set(listing["hyperparams"]) == expected_hp
    for t in range(n_threads):
        for i in range(1, per_thread, 2):
            assert wl.get_hyperparams(f"t{t}-{i}") == {"t": t, "i": i}
    assert any(wl.get_model("shared") is obj for obj in shared_objs.values())
    registers = [e for e in events if e[0] == "register"]
    assert len(registers) == n_threads * per_thread * 3
    unregisters = [e for e in events if e[0] == "unregister"]
    assert len(unregisters) == n_threads * len(range(0, per_thread, 2))
    # every replacement of "shared" reports a previous entry, except the very first
    shared = [prev for e, entry, prev in registers if entry.name == "shared"]
    assert sum(prev is None for prev in shared) == 1
