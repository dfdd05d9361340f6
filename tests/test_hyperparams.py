"""Tests of weightslab/hyperparams.py: loading, validating, change tokens and restoring in place."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import enum
import logging
import re
import types
from pathlib import Path, PurePosixPath

import pytest
import torch

from weightslab.errors import HyperparamsError, RegistrationError
from weightslab.hyperparams import load_yaml, resolve, restore_in_place, signature, to_plain


class Act(enum.Enum):
    RELU = "relu"
    GELU = "gelu"


@dataclasses.dataclass
class Opt:
    name: str = "adam"
    lr: float = 0.001


@dataclasses.dataclass
class Cfg:
    epochs: int = 3
    act: Act = Act.RELU
    out: Path = Path("runs/a")
    opt: Opt = dataclasses.field(default_factory=Opt)


@dataclasses.dataclass(frozen=True)
class Frozen:
    lr: float = 0.1
    depth: int = 2


def _write(tmp_path: Path, text: str | bytes, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- load_yaml --------------------------------------------------------------------------------

def test_load_yaml_valid_file(tmp_path):
    path = _write(tmp_path, "lr: 0.001\nmodel:\n  layers: [64, 128]\n  act: relu\nname: run\nseed: null\n")
    assert load_yaml(path) == {"lr": 0.001, "model": {"layers": [64, 128], "act": "relu"}, "name": "run",
                               "seed": None}
    assert load_yaml(str(path)) == load_yaml(path)


def test_load_yaml_syntax_error_names_file_and_line(tmp_path):
    path = _write(tmp_path, "a: 1\nb: 2\n  c: 3\nd: 4\n")
    with pytest.raises(HyperparamsError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "line 3" in msg
    assert "does not parse" in msg and "fix the file" in msg
    assert isinstance(info.value, ValueError)


def test_load_yaml_unclosed_bracket_reports_its_line(tmp_path):
    path = _write(tmp_path, "lr: 0.1\nlayers: [1, 2\nepochs: 3\n")
    with pytest.raises(HyperparamsError, match=rf"{re.escape(str(path))}, line 3, column \d+: the YAML does not parse"):
        load_yaml(path)


def test_load_yaml_refuses_python_tags(tmp_path):
    path = _write(tmp_path, "a: 1\ncmd: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(HyperparamsError, match=rf"{re.escape(str(path))}, line 2.*could not determine a constructor"):
        load_yaml(path)


@pytest.mark.parametrize("text, kind", [("- 1\n- 2\n", "list"), ("42\n", "int"), ("just text\n", "str")])
def test_load_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    path = _write(tmp_path, text)
    with pytest.raises(HyperparamsError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg
    assert f"holds a {kind}" in msg and "mapping" in msg and "'key: value'" in msg


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n", "\n\n"])
def test_load_yaml_empty_file_is_empty_dict(tmp_path, caplog, text):
    path = _write(tmp_path, text)
    with caplog.at_level(logging.WARNING, logger="weightslab.hyperparams"):
        assert load_yaml(path) == {}
    assert any(str(path) in r.getMessage() and "empty" in r.getMessage() for r in caplog.records)


def test_load_yaml_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope" / "config.yaml"
    with pytest.raises(HyperparamsError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "does not exist" in msg and "check the path" in msg


def test_load_yaml_not_utf8(tmp_path):
    path = _write(tmp_path, b"lr: \xff\xfe\n")
    with pytest.raises(HyperparamsError, match=rf"{re.escape(str(path))} is not UTF-8"):
        load_yaml(path)


def test_load_yaml_rejects_values_that_are_not_plain_data(tmp_path):
    path = _write(tmp_path, "aug:\n  flips: !!set {h, v}\n")
    with pytest.raises(HyperparamsError) as info:
        load_yaml(path)
    msg = str(info.value)
    assert str(path) in msg and "'aug.flips'" in msg and "set" in msg


# --- resolve ----------------------------------------------------------------------------------

def test_resolve_live_objects_are_returned_as_is():
    d = {"lr": 0.1}
    c = Cfg()
    ns = argparse.Namespace(lr=0.1)
    sn = types.SimpleNamespace(lr=0.1)
    for obj in (d, c, ns, sn):
        live, source = resolve(obj)
        assert live is obj
        assert source is None


def test_resolve_yaml_path_as_str_and_path(tmp_path, monkeypatch):
    path = _write(tmp_path, "lr: 0.5\n")
    live, source = resolve(str(path))
    assert live == {"lr": 0.5} and source == path
    monkeypatch.chdir(tmp_path)
    live, source = resolve(Path("config.yaml"))
    assert live == {"lr": 0.5}
    assert source == path and source.is_absolute()


def test_resolve_rejects_a_dataclass_class():
    with pytest.raises(RegistrationError) as info:
        resolve(Cfg)
    msg = str(info.value)
    assert "class Cfg" in msg and "Cfg()" in msg and "instance" in msg
    assert isinstance(info.value, TypeError)


def test_resolve_rejects_an_int():
    with pytest.raises(RegistrationError) as info:
        resolve(42)
    msg = str(info.value)
    assert "int" in msg
    assert "dict" in msg and "dataclass instance" in msg and "YAML" in msg


# --- to_plain ---------------------------------------------------------------------------------

def test_to_plain_converts_enums_dataclasses_namespaces_and_scalars():
    cfg = Cfg()
    plain = to_plain({"cfg": cfg, "ns": argparse.Namespace(a=1, b=[Act.GELU]), "t": (1, 2.5),
                      "scalar": torch.tensor(0.25), "when": dt.date(2024, 1, 2), "p": PurePosixPath("a/b")})
    assert plain == {
        "cfg": {"epochs": 3, "act": "relu", "out": Path("runs/a"), "opt": {"name": "adam", "lr": 0.001}},
        "ns": {"a": 1, "b": ["gelu"]},
        "t": (1, 2.5),
        "scalar": 0.25,
        "when": dt.date(2024, 1, 2),
        "p": PurePosixPath("a/b"),
    }
    assert type(plain["cfg"]) is dict and type(plain["cfg"]["opt"]) is dict
    assert type(plain["t"]) is tuple
    assert type(plain["scalar"]) is float
    # a copy: mutating it leaves the live object alone
    plain["cfg"]["opt"]["lr"] = 5.0
    assert cfg.opt.lr == 0.001


def test_to_plain_rejects_a_function_naming_the_key():
    def schedule(step):
        return step

    with pytest.raises(HyperparamsError) as info:
        to_plain({"train": {"sched": [1, schedule]}}, where="config.yaml")
    msg = str(info.value)
    assert msg.startswith("config.yaml:")
    assert "'train.sched[1]'" in msg and "function" in msg
    assert "store the name of a class or function" in msg


def test_to_plain_rejects_a_non_scalar_key():
    with pytest.raises(HyperparamsError, match=r"key \('a', 'b'\) under 'outer' is a tuple.*strings or numbers"):
        to_plain({"outer": {("a", "b"): 1}})


# --- signature --------------------------------------------------------------------------------

def test_signature_changes_on_nested_in_place_mutation_of_a_dict():
    cfg = {"lr": 0.1, "opt": {"betas": [0.9, 0.99], "name": "adam"}}
    s0 = signature(cfg)
    assert signature(cfg) == s0
    cfg["opt"]["name"] = "sgd"
    s1 = signature(cfg)
    assert s1 != s0
    cfg["opt"]["betas"].append(0.5)
    assert signature(cfg) != s1


def test_signature_changes_on_setattr_of_a_dataclass_and_nested_fields():
    cfg = Cfg()
    s0 = signature(cfg)
    assert signature(Cfg()) == s0
    cfg.epochs = 4
    s1 = signature(cfg)
    assert s1 != s0
    cfg.opt.lr = 0.5  # nested dataclass
    assert signature(cfg) != s1


def test_signature_of_namespaces_and_slotted_dataclass():
    ns = argparse.Namespace(lr=0.1)
    s = signature(ns)
    ns.lr = 0.2
    assert signature(ns) != s

    @dataclasses.dataclass(slots=True)
    class Slotted:
        lr: float = 0.1

    obj = Slotted()
    s = signature(obj)
    obj.lr = 0.3
    assert signature(obj) != s


def test_signature_of_slotted_dataclass_without_repr():
    @dataclasses.dataclass(slots=True, repr=False)
    class Quiet:
        lr: float = 0.1

    obj = Quiet()
    s = signature(obj)
    obj.lr = 0.5
    assert signature(obj) != s


# --- restore_in_place -------------------------------------------------------------------------

def test_restore_in_place_keeps_identity_of_dicts_and_lists():
    live = {"lr": 0.5, "extra": 1, "opt": {"name": "sgd", "momentum": 0.9, "added": True},
            "layers": [1, 2, 3]}
    opt, layers = live["opt"], live["layers"]
    same = live
    saved = {"lr": 0.1, "opt": {"name": "adam", "momentum": 0.8}, "layers": [64, 128], "new": "x"}
    restore_in_place(live, saved, name="main")
    assert live is same
    assert live == saved
    assert live["opt"] is opt and opt == {"name": "adam", "momentum": 0.8}
    assert live["layers"] is layers and layers == [64, 128]
    assert "extra" not in live and "added" not in opt


def test_restore_in_place_replaces_values_of_another_type():
    live = {"a": {"x": 1}, "b": 5}
    restore_in_place(live, {"a": 7, "b": {"y": 2}}, name="main")
    assert live == {"a": 7, "b": {"y": 2}}


def test_restore_in_place_dataclass_with_enum_path_and_nested_dataclass():
    cfg = Cfg()
    opt = cfg.opt
    restore_in_place(cfg, {"epochs": 10, "act": "gelu", "out": "runs/b", "opt": {"name": "sgd", "lr": 0.2}},
                     name="main")
    assert cfg.epochs == 10
    assert cfg.act is Act.GELU
    assert isinstance(cfg.out, Path) and cfg.out == Path("runs/b")
    assert cfg.opt is opt and opt == Opt(name="sgd", lr=0.2)


def test_restore_in_place_namespace():
    ns = argparse.Namespace(lr=0.5, epochs=1)
    restore_in_place(ns, {"lr": 0.01, "epochs": 7}, name="args")
    assert vars(ns) == {"lr": 0.01, "epochs": 7}


def test_restore_in_place_frozen_dataclass_warns_instead_of_raising(caplog):
    obj = Frozen()
    with caplog.at_level(logging.WARNING, logger="weightslab.hyperparams"):
        restore_in_place(obj, {"lr": 0.5, "depth": 2}, name="frozen_cfg")
    assert obj == Frozen()  # unchanged
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # only the value that differs
    assert "'frozen_cfg'" in warnings[0] and "lr" in warnings[0] and "0.5" in warnings[0]
    assert "frozen" in warnings[0]


def test_restore_in_place_read_only_mapping_warns(caplog):
    live = types.MappingProxyType({"lr": 0.1})
    with caplog.at_level(logging.WARNING, logger="weightslab.hyperparams"):
        restore_in_place(live, {"lr": 0.1}, name="ro")
        assert not caplog.records
        restore_in_place(live, {"lr": 0.2}, name="ro")
    assert live["lr"] == 0.1
    assert any("'ro'" in r.getMessage() and "read-only" in r.getMessage() for r in caplog.records)


def test_restore_in_place_keeps_identity_of_dict_and_list_fields_of_a_dataclass():
    @dataclasses.dataclass
    class WithContainers:
        opt: dict = dataclasses.field(default_factory=lambda: {"lr": 1.0})
        layers: list = dataclasses.field(default_factory=lambda: [1, 2])

    cfg = WithContainers()
    opt, layers = cfg.opt, cfg.layers
    restore_in_place(cfg, {"opt": {"lr": 2.0}, "layers": [3]}, name="main")
    assert cfg.opt == {"lr": 2.0} and cfg.layers == [3]
    assert cfg.opt is opt  # the reference the script holds must see the restored values
    assert cfg.layers is layers
