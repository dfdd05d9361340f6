"""Hyperparameters bound to optimizer settings reach the param groups when they change."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.binding import OptimizerBinding, refusal


def _sgd(lr=0.1, **kw):
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=lr, **kw)


def test_the_first_look_is_a_baseline_then_only_changes_apply():
    opt = _sgd(lr=0.5)  # the optimizer was built with another lr than the config says
    hp = {"optimizer": {"lr": 0.1, "momentum": 0.0}}
    binding = OptimizerBinding()
    assert binding.apply({"c": hp}, {"main": opt}, {}) == []
    assert opt.param_groups[0]["lr"] == 0.5  # untouched: only changes are applied
    hp["optimizer"]["momentum"] = 0.9
    done = binding.apply({"c": hp}, {"main": opt}, {})
    assert done == ["optimizer 'main': momentum 0 -> 0.9 from c:optimizer.momentum"]
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["lr"] == 0.5
    assert binding.apply({"c": hp}, {"main": opt}, {}) == []  # nothing changed since


def test_named_sections_user_paths_and_every_param_group():
    gen, disc = _sgd(), torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=0.1)
    disc.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2})
    hp = {"optimizer": {"generator": {"lr": 0.1}}, "gan": {"d_lr": 0.1}, "train": {"wd": 0.0}}
    binding = OptimizerBinding({"gan.d_lr": "discriminator.lr", "train.wd": "weight_decay"})
    optimizers = {"generator": gen, "discriminator": disc}
    binding.apply({"c": hp}, optimizers, {})
    hp["optimizer"]["generator"]["lr"] = 0.01
    hp["gan"]["d_lr"] = 0.02
    hp["train"]["wd"] = 0.001
    binding.apply({"c": hp}, optimizers, {})
    assert gen.param_groups[0]["lr"] == 0.01
    assert [g["lr"] for g in disc.param_groups] == [0.02, 0.02]
    assert gen.param_groups[0]["weight_decay"] == 0.001
    assert [g["weight_decay"] for g in disc.param_groups] == [0.001, 0.001]


def test_betas_as_a_list_and_integers_for_floats():
    opt = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=0.1)
    hp = {"optimizer": {"betas": [0.9, 0.999], "lr": 0.1}}
    binding = OptimizerBinding()
    binding.apply({"c": hp}, {"main": opt}, {})
    hp["optimizer"]["betas"] = [0.8, 0.99]
    hp["optimizer"]["lr"] = 1
    binding.apply({"c": hp}, {"main": opt}, {})
    assert opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.param_groups[0]["lr"] == 1.0 and type(opt.param_groups[0]["lr"]) is float


@pytest.mark.parametrize("change, says", [
    ({"momentum": 0.9}, "has no setting 'momentum'"),  # Adam has betas, not momentum
    ({"lr": "fast"}, "lr = 'fast' is not applied to optimizer 'main' (Adam): lr must be a number"),
    ({"lr": -0.1}, "lr = -0.1 is not applied to optimizer 'main' (Adam): lr must be >= 0; it keeps 0.1"),
    ({"lr": float("nan")}, "lr = nan is not applied to optimizer 'main' (Adam): lr must be finite (not nan or inf)"),
    ({"lr": float("inf")}, "lr = inf is not applied to optimizer 'main' (Adam): lr must be finite (not nan or inf)"),
    ({"lr": 10**400}, "lr must be a number a float can hold"),
    ({"betas": [0.9]}, "betas = [0.9] is not applied to optimizer 'main' (Adam): betas must be a list of 2 values "
                       "like its current value (0.9, 0.999); it keeps (0.9, 0.999)"),
    ({"betas": [2.0, 0.999]}, "betas = [2.0, 0.999] is not applied to optimizer 'main' (Adam): each of betas must be "
                              "in [0, 1)"),
    ({"betas": [0.9, True]}, "betas must be a number like its current value (0.9, 0.999)"),
    ({"eps": -1e-8}, "eps = -1e-08 is not applied to optimizer 'main' (Adam): eps must be >= 0"),
])
def test_a_value_that_cannot_apply_warns_once_and_changes_nothing(caplog, change, says):
    opt = torch.optim.Adam(nn.Linear(2, 2).parameters(), lr=0.1)
    hp = {"optimizer": {"lr": 0.1, "momentum": 0.0}}
    binding = OptimizerBinding()
    binding.apply({"c": hp}, {"main": opt}, {})
    hp["optimizer"].update(change)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        assert binding.apply({"c": hp}, {"main": opt}, {}) == []
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and says in messages[0] and "not applied" in messages[0]


def test_with_a_scheduler_an_edited_lr_rescales_the_schedule():
    opt = _sgd(lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    hp = {"optimizer": {"lr": 0.1}}
    binding = OptimizerBinding()
    binding.apply({"c": hp}, {"main": opt}, {"main": scheduler})
    hp["optimizer"]["lr"] = 0.01
    done = binding.apply({"c": hp}, {"main": opt}, {"main": scheduler})
    assert "schedule's base" in done[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)  # same point of the schedule, new scale
    assert opt.param_groups[0]["initial_lr"] == 0.01 and scheduler.base_lrs == [0.01]
    for _ in range(2):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0025)


def test_an_in_code_edit_reaches_the_optimizer_at_the_next_step(root):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=None, save_on_close=False)
    config = wl.register_hyperparams({"optimizer": {"lr": 0.1}})
    model = wl.register_model(nn.Linear(2, 2))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    wl.checkpoint_on_step(1)
    config["optimizer"]["lr"] = 0.03
    assert opt.param_groups[0]["lr"] == 0.1  # not before the boundary
    wl.checkpoint_on_step(2)
    assert opt.param_groups[0]["lr"] == 0.03
    system.close()


def test_a_resume_takes_a_new_baseline_and_applies_nothing(root):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    config = wl.register_hyperparams({"optimizer": {"lr": 0.1}})
    model = wl.register_model(nn.Linear(2, 2))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    wl.checkpoint_on_step(1)
    config["optimizer"]["lr"] = 0.02
    wl.checkpoint_on_step(2)
    assert opt.param_groups[0]["lr"] == 0.02
    system.close()
    # a new process: built from the file's first values, then resumed into the edited experiment
    wl.unregister("main")
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, save_on_close=False)
    config = wl.register_hyperparams({"optimizer": {"lr": 0.02}})
    model = wl.register_model(nn.Linear(2, 2))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.5))  # another lr on purpose
    assert system.resume() == 2
    assert opt.param_groups[0]["lr"] == 0.02  # restored from the checkpoint
    opt.param_groups[0]["lr"] = 0.07  # the run's own change (a warm-up, say) is not overwritten
    wl.checkpoint_on_step(3)
    assert opt.param_groups[0]["lr"] == 0.07
    system.close()


@pytest.mark.parametrize("key, value, current, rule", [
    ("momentum", -0.9, 0, "momentum must be >= 0"),  # SGD's default momentum is the int 0
    ("momentum", 0.9, 0, None),
    ("eps", [None, 1e-4], (None, 1e-3), None),  # Adafactor's eps pair
    ("eps", [None, -1.0], (None, 1e-3), "eps must be >= 0"),
    ("beta2_decay", -0.5, -0.8, None),  # negative where torch takes it (Adafactor)
    ("rho", 1.0, 0.9, None),
    ("rho", 1.5, 0.9, "rho must be in [0, 1]"),
    ("betas", (0.0, 0.5), (0.9, 0.999), None),
    ("betas", [0.9, 1.0], (0.9, 0.999), "each of betas must be in [0, 1)"),
    ("lr", True, 0.1, "lr must be a number like its current value 0.1"),
    ("nesterov", 1, False, "nesterov must be a bool like its current value False"),
    ("lr", float("-inf"), 0.1, "lr must be finite (not nan or inf)"),
])
def test_the_rules_a_bound_value_must_meet(key, value, current, rule):
    assert refusal(key, value, current) == rule
