"""Tests of weightslab/fingerprint.py: the experiment hash and what changed in it."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
from torch import nn

from weightslab.errors import HyperparamsError
from weightslab.fingerprint import (DEFAULT_EXCLUDED_KEYS, ExperimentHashGenerator, HashChange,
                                    architecture_text, describe_architecture, diff_architecture,
                                    diff_hyperparams)

from .support import run_python

HEX16 = re.compile(r"[0-9a-f]{16}")


def _hash(model=None, hp=None, **kwargs) -> str:
    return ExperimentHashGenerator(**kwargs).generate_hash(model, hp)


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.BatchNorm1d(8), nn.Linear(8, 2))


class WithBuffers(nn.Module):
    def __init__(self, persistent_size: int = 3, with_cache: bool = False):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.register_buffer("running", torch.zeros(persistent_size))
        if with_cache:
            self.register_buffer("cache", torch.zeros(5), persistent=False)


# --- the hash itself --------------------------------------------------------------------------

def test_hash_is_16_lowercase_hex_and_stable_in_process():
    h = _hash(_net(), {"lr": 0.001})
    assert HEX16.fullmatch(h), h
    assert _hash(_net(), {"lr": 0.001}) == h


def test_length_option_and_its_validation():
    assert re.fullmatch(r"[0-9a-f]{8}", _hash(_net(), {}, length=8))
    assert _hash(_net(), {}, length=8) == _hash(_net(), {})[:8]
    with pytest.raises(ValueError, match="between 8 and 64.*got 7"):
        ExperimentHashGenerator(length=7)
    with pytest.raises(ValueError, match="got 65"):
        ExperimentHashGenerator(length=65)


DETERMINISM_SCRIPT = textwrap.dedent("""
    import torch
    from torch import nn
    from weightslab.fingerprint import ExperimentHashGenerator
    torch.manual_seed(int(__import__("sys").argv[1]))  # parameter values differ per process
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    names = {"alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"}
    hp = {"lr": 0.001, "sizes": {n: len(n) for n in names}, "opt": {"name": "adam", "betas": [0.9, 0.999]}}
    print(ExperimentHashGenerator().generate_hash(model, hp))
""")


def _determinism_model_and_hp():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4))
    names = ["theta", "eta", "zeta", "epsilon", "delta", "gamma", "beta", "alpha"]
    hp = {"opt": {"betas": [0.9, 0.999], "name": "adam"}, "sizes": {n: len(n) for n in names}, "lr": 0.001}
    return model, hp


def test_hash_is_deterministic_across_fresh_interpreters():
    # Different hash seeds change set iteration order (so dict insertion order) and the seed
    # changes parameter values: neither may change the experiment hash.
    first = run_python(DETERMINISM_SCRIPT, args=["1"], env={"PYTHONHASHSEED": "1"}).stdout.strip()
    second = run_python(DETERMINISM_SCRIPT, args=["2"], env={"PYTHONHASHSEED": "2"}).stdout.strip()
    assert HEX16.fullmatch(first), first
    assert first == second
    model, hp = _determinism_model_and_hp()
    assert _hash(model, hp) == first  # and the same in this process, with its own key order


# --- architecture -----------------------------------------------------------------------------

def test_layer_width_changes_architecture_only():
    gen = ExperimentHashGenerator()
    h1 = gen.generate_hash(nn.Linear(10, 64), {"lr": 1e-3})
    assert gen.has_changed(nn.Linear(10, 64), {"lr": 1e-3}) == HashChange(architecture=False, hyperparams=False)
    assert not gen.has_changed(nn.Linear(10, 64), {"lr": 1e-3})
    change = gen.has_changed(nn.Linear(10, 128), {"lr": 1e-3})
    assert change == HashChange(architecture=True, hyperparams=False)
    assert change
    assert _hash(nn.Linear(10, 128), {"lr": 1e-3}) != h1


def test_lr_change_changes_hyperparams_only():
    gen = ExperimentHashGenerator()
    h1 = gen.generate_hash(nn.Linear(10, 64), {"lr": 1e-3})
    assert gen.has_changed(nn.Linear(10, 64), {"lr": 1e-2}) == HashChange(architecture=False, hyperparams=True)
    assert _hash(nn.Linear(10, 64), {"lr": 1e-2}) != h1


def test_has_changed_without_baseline_reports_everything():
    assert ExperimentHashGenerator().has_changed(nn.Linear(2, 2), {}) == HashChange(True, True)


def test_parameter_values_requires_grad_and_mode_do_not_change_the_hash():
    torch.manual_seed(0)
    model = _net()
    h = _hash(model, {"lr": 0.1})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.5)
    model[2].running_mean.fill_(7.0)  # buffer values are state too
    assert _hash(model, {"lr": 0.1}) == h
    model[0].requires_grad_(False)
    assert _hash(model, {"lr": 0.1}) == h
    model.eval()
    assert _hash(model, {"lr": 0.1}) == h
    torch.manual_seed(123)
    assert _hash(_net(), {"lr": 0.1}) == h


def test_dtype_changes_the_hash():
    model = _net()
    gen = ExperimentHashGenerator()
    h = gen.generate_hash(model, {})
    model.half()
    assert gen.has_changed(model, {}) == HashChange(architecture=True, hyperparams=False)
    assert _hash(model, {}) != h


def test_persistent_buffers_count_non_persistent_do_not():
    base = _hash(WithBuffers())
    assert _hash(WithBuffers(persistent_size=4)) != base  # persistent buffer shape
    assert _hash(WithBuffers(with_cache=True)) == base  # non-persistent buffer added
    m = WithBuffers()
    m.register_buffer("extra", torch.zeros(1))  # a new persistent buffer
    assert _hash(m) != base
    m2 = WithBuffers()
    m2.register_buffer("extra", torch.zeros(1), persistent=False)
    assert _hash(m2) == base


def test_module_order_and_class_enter_the_hash():
    assert _hash(nn.Sequential(nn.ReLU(), nn.Tanh())) != _hash(nn.Sequential(nn.Tanh(), nn.ReLU()))
    assert _hash(nn.Sequential(nn.ReLU())) != _hash(nn.Sequential(nn.GELU()))
    assert _hash(nn.Conv2d(3, 8, 3)) != _hash(nn.Conv2d(3, 8, 5))


def test_model_mapping_is_named_and_ordered():
    a, b = nn.Linear(2, 2), nn.Linear(3, 3)
    assert _hash(a) == _hash({"main": a})
    assert _hash({"enc": a, "dec": b}) != _hash({"dec": b, "enc": a})  # registration order matters
    assert _hash({"enc": a}) != _hash({"other": a})


def test_describe_architecture_and_text():
    desc = describe_architecture({"m": WithBuffers(with_cache=True)})
    [[name, entries]] = desc
    assert name == "m"
    root, fc = entries
    assert root["name"] == "" and root["class"].endswith("WithBuffers")
    assert root["buffers"] == [["running", [3], "float32"]]  # "cache" is not persistent
    assert fc["name"] == "fc" and fc["class"] == "torch.nn.modules.linear.Linear"
    assert fc["config"] == "in_features=3, out_features=3, bias=True"
    assert fc["params"] == [["weight", [3, 3], "float32"], ["bias", [3], "float32"]]
    text = architecture_text({"m": nn.Linear(10, 64)})
    assert "== model 'm': Linear, 704 parameters ==" in text
    assert re.search(r"weight\s+\[64, 10\]\s+float32", text)


# --- hyperparameters --------------------------------------------------------------------------

def test_integral_floats_equal_ints_and_key_order_is_irrelevant():
    m = nn.Linear(2, 2)
    assert _hash(m, {"lr": 1}) == _hash(m, {"lr": 1.0})
    assert _hash(m, {"lr": 1}) != _hash(m, {"lr": 1.5})
    assert _hash(m, {"lr": True}) != _hash(m, {"lr": 1})  # a bool is not a number here
    a = {"lr": 0.1, "opt": {"name": "sgd", "momentum": 0.9}, "epochs": 3}
    b = {"epochs": 3, "opt": {"momentum": 0.9, "name": "sgd"}, "lr": 0.1}
    assert _hash(m, a) == _hash(m, b)


def test_default_excluded_keys_do_not_change_the_hash():
    assert {"log_every", "device", "logging", "checkpoint_frequency"} <= DEFAULT_EXCLUDED_KEYS
    m = nn.Linear(2, 2)
    base = {"lr": 0.1, "log_every": 10, "device": "cpu", "logging": {"level": "info", "dir": "/a"},
            "trainer": {"epochs": 5, "log_every": 50}}
    other = {"lr": 0.1, "log_every": 99, "device": "cuda:3", "logging": {"level": "debug", "extra": [1, 2]},
             "trainer": {"epochs": 5, "log_every": 1}}
    assert _hash(m, base) == _hash(m, other)
    assert _hash(m, base) == _hash(m, {"lr": 0.1, "trainer": {"epochs": 5}})
    # ... but the keys next to them do
    assert _hash(m, base) != _hash(m, {**base, "trainer": {"epochs": 6, "log_every": 50}})
    # without the defaults they count
    assert _hash(m, base, use_default_exclusions=False) != _hash(m, other, use_default_exclusions=False)


def test_dotted_exclusion_excludes_only_that_path():
    m = nn.Linear(2, 2)
    gen = ExperimentHashGenerator(exclude_keys=["trainer.log_every"], use_default_exclusions=False)
    assert gen.excluded_keys == frozenset({"trainer.log_every"})
    hp = {"trainer": {"log_every": 10, "epochs": 3}, "eval": {"log_every": 10}, "log_every": 10}
    h = gen.generate_hash(m, hp)
    assert gen.generate_hash(m, {**hp, "trainer": {"log_every": 999, "epochs": 3}}) == h
    assert gen.generate_hash(m, {**hp, "eval": {"log_every": 999}}) != h
    assert gen.generate_hash(m, {**hp, "log_every": 999}) != h
    assert gen.generate_hash(m, {**hp, "trainer": {"log_every": 10, "epochs": 4}}) != h


def test_user_bare_key_excluded_at_any_depth_on_top_of_defaults():
    m = nn.Linear(2, 2)
    gen = ExperimentHashGenerator(exclude_keys={"seed_note"})
    assert "seed_note" in gen.excluded_keys and "device" in gen.excluded_keys
    h = gen.generate_hash(m, {"lr": 1, "a": {"seed_note": "x"}, "seed_note": "y", "device": "cpu"})
    assert gen.generate_hash(m, {"lr": 1, "a": {"seed_note": "z"}, "seed_note": "w", "device": "cuda"}) == h


def test_dataclass_and_dict_with_same_values_hash_equal():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.5
        depth: int = 3

    m = nn.Linear(2, 2)
    assert _hash(m, Cfg()) == _hash(m, {"depth": 3, "lr": 0.5})


def test_unserializable_hyperparameter_names_the_key_path():
    m = nn.Linear(2, 2)

    def make_optimizer():
        return None

    with pytest.raises(HyperparamsError) as info:
        _hash(m, {"lr": 0.1, "opt": {"factory": make_optimizer}})
    msg = str(info.value)
    assert "'opt.factory'" in msg
    assert "hyperparameters 'main'" in msg
    assert "function" in msg and "store the name" in msg
    with pytest.raises(HyperparamsError, match=r"'layers\[1\]'.*builtins\.object"):
        _hash(m, {"layers": [1, object()]})


def test_diff_hyperparams_names_keys():
    gen = ExperimentHashGenerator()
    old = gen.fingerprint({}, {"main": {"lr": 0.001, "old": 1, "opt": {"name": "sgd"}}}).hyperparams
    new = gen.fingerprint({}, {"main": {"lr": 0.01, "opt": {"name": "sgd", "beta": 0.9}}}).hyperparams
    lines = diff_hyperparams(old, new)
    assert lines == ["main.lr: 0.001 -> 0.01", "main.old: removed (was 1)", "main.opt.beta: added 0.9"]
    assert diff_hyperparams(old, old) == []


def test_diff_architecture_names_modules():
    gen = ExperimentHashGenerator()
    a = gen.fingerprint({"main": nn.Linear(10, 64)}, {}).architecture
    b = gen.fingerprint({"main": nn.Linear(10, 128)}, {}).architecture
    assert diff_architecture(a, b) == [
        "main:<root> Linear(in_features=10, out_features=64, bias=True) -> "
        "Linear(in_features=10, out_features=128, bias=True)"]
    s1 = gen.fingerprint({"net": nn.Sequential(nn.Linear(2, 2))}, {}).architecture
    s2 = gen.fingerprint({"net": nn.Sequential(nn.Linear(2, 2), nn.ReLU()), "aux": nn.Tanh()}, {}).architecture
    lines = diff_architecture(s1, s2)
    assert "net:1 added (ReLU())" in lines
    assert "model 'aux' added" in lines
    assert diff_architecture(s2, s1) == ["net:1 removed (ReLU())", "model 'aux' removed"]
    half = gen.fingerprint({"main": nn.Linear(2, 2).half()}, {}).architecture
    [line] = diff_architecture(gen.fingerprint({"main": nn.Linear(2, 2)}, {}).architecture, half)
    assert line.startswith("main:<root> tensors") and "float32" in line and "float16" in line
    assert diff_architecture(a, a) == []
