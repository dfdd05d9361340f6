"""Carrying optimizer state across model surgery (weightslab.surgery)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage.manager import CheckpointManager
from weightslab.surgery import CarryReport, carry_optimizer_state, parameter_names


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    x, y = _data(seed)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x.to(next(model.parameters()).dtype)), y).backward()
        opt.step()


def _names(model: nn.Module) -> dict[int, str]:
    return parameter_names({"net": model})


def _assert_state_copied(old: torch.optim.Optimizer, p_old: torch.Tensor,
                         new: torch.optim.Optimizer, p_new: torch.Tensor, keys: set[str]) -> None:
    s_old, s_new = old.state[p_old], new.state[p_new]
    assert set(s_new) == set(s_old) == keys
    for key in keys:
        assert torch.equal(s_new[key], s_old[key]), key
        assert s_new[key] is not s_old[key], key
        assert s_new[key].data_ptr() != s_old[key].data_ptr(), key  # not aliased storage


ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}


def test_parameter_names_prefix_model_and_skip_duplicates() -> None:
    a = _model()
    b = nn.Linear(2, 2)
    shared = nn.Sequential(a[0], a[0])  # the same layer twice: named once
    names = parameter_names({"a": a, "b": b, "s": shared})
    assert names[id(a[0].weight)] == "a/0.weight"  # first model that holds it wins
    assert names[id(a[2].bias)] == "a/2.bias"
    assert names[id(b.weight)] == "b/weight"
    assert len(names) == 6


def test_adam_widen_layer_resets_resized_and_carries_the_rest() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 3)
    old_names = _names(model)
    old_head_bias = model[2].bias
    model[0] = nn.Linear(4, 16)
    model[2] = nn.Linear(16, 2)
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=old_names, new_names=_names(model))
    # the head's bias is still (2,): same name and shape, so it keeps its moments
    assert report.carried == ("net/2.bias",)
    assert report.reset == ("net/0.weight", "net/0.bias", "net/2.weight")
    assert report.dropped == ()  # resized parameters keep their names: reset, not dropped
    assert report.reason == ""
    assert str(report) == ("carried the state of 1 parameter; "
                           "reset net/0.weight, net/0.bias, net/2.weight (new or resized)")
    assert set(new.state) == {model[2].bias}
    _assert_state_copied(old, old_head_bias, new, model[2].bias, ADAM_KEYS)
    _train(model, new, 1)  # the carried and the fresh state step together
    assert new.state[model[2].bias]["step"].item() == 4.0
    assert new.state[model[0].weight]["step"].item() == 1.0


def test_adam_replaced_layer_of_same_shape_carries_by_name() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 3)
    old_names = _names(model)
    old_layer2 = model[2]
    model[2] = nn.Linear(8, 2)  # a new object of the same shape: matched by name
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=old_names, new_names=_names(model))
    assert report.carried == ("net/0.weight", "net/0.bias", "net/2.weight", "net/2.bias")
    assert report.reset == () and report.dropped == ()
    assert str(report) == "carried the state of 4 parameters"
    for p in model[0].parameters():  # same objects: matched by identity
        _assert_state_copied(old, p, new, p, ADAM_KEYS)
    _assert_state_copied(old, old_layer2.weight, new, model[2].weight, ADAM_KEYS)
    _assert_state_copied(old, old_layer2.bias, new, model[2].bias, ADAM_KEYS)
    assert new.state[model[2].weight]["step"].item() == 3.0


def test_adam_added_and_removed_layers() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    old_names = _names(model)
    kept_layer = model[0]
    model = nn.Sequential(kept_layer, nn.ReLU(), nn.Linear(8, 3))  # the head is now "2", resized
    model.add_module("extra", nn.Linear(3, 3))
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=old_names, new_names=_names(model))
    assert report.carried == ("net/0.weight", "net/0.bias")
    assert report.reset == ("net/2.weight", "net/2.bias", "net/extra.weight", "net/extra.bias")
    assert report.dropped == ()

    smaller = nn.Sequential(kept_layer)  # layer 2 removed altogether
    newer = torch.optim.Adam(smaller.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, newer, old_names=old_names, new_names=_names(smaller))
    assert report.carried == ("net/0.weight", "net/0.bias")
    assert report.reset == ()
    assert report.dropped == ("net/2.weight", "net/2.bias")
    assert "dropped net/2.weight, net/2.bias" in str(report)


def test_swapped_layers_follow_identity_not_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, _ = _data()
    for _ in range(2):
        old.zero_grad()
        model(x).square().mean().backward()
        old.step()
    old_names = _names(model)
    first, second = model[0], model[1]
    model[0], model[1] = second, first
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    carry_optimizer_state(old, new, old_names=old_names, new_names=_names(model))
    _assert_state_copied(old, first.weight, new, first.weight, ADAM_KEYS)
    _assert_state_copied(old, second.weight, new, second.weight, ADAM_KEYS)
    assert not torch.equal(new.state[first.weight]["exp_avg"], new.state[second.weight]["exp_avg"])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_carried_state_is_bitwise_exact(amsgrad: bool) -> None:
    model_a, model_b = _model(), _model()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2, amsgrad=amsgrad)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2, amsgrad=amsgrad)
    _train(model_a, opt_a, 3)
    _train(model_b, opt_b, 3)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)

    names = _names(model_b)
    new_b = torch.optim.Adam(model_b.parameters(), lr=1e-2, amsgrad=amsgrad)
    report = carry_optimizer_state(opt_b, new_b, old_names=names, new_names=names)
    assert len(report.carried) == 4 and report.reset == () and report.dropped == ()

    _train(model_a, opt_a, 2, seed=2)
    _train(model_b, new_b, 2, seed=2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
    # and a fresh optimizer would not have been: the test can fail
    model_c = _model()
    opt_c = torch.optim.Adam(model_c.parameters(), lr=1e-2, amsgrad=amsgrad)
    _train(model_c, opt_c, 3)
    _train(model_c, torch.optim.Adam(model_c.parameters(), lr=1e-2, amsgrad=amsgrad), 2, seed=2)
    assert not torch.equal(model_c[0].weight, model_a[0].weight)


def test_exact_after_surgery_for_the_untouched_layer() -> None:
    # A keeps its optimizer; B widens nothing in layer 0 but replaces the head, so layer 0's
    # next update must be the same as A's as long as its gradient is: freeze the heads' effect by
    # comparing one step in which both heads are identical copies.
    model_a, model_b = _model(), _model()
    opt_a = torch.optim.Adam(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    _train(model_a, opt_a, 3)
    _train(model_b, opt_b, 3)
    old_names = _names(model_b)
    head = nn.Linear(8, 2)
    head.load_state_dict(model_b[2].state_dict())
    model_b[2] = head  # a new object, same name and shape
    new_b = torch.optim.Adam(model_b.parameters(), lr=1e-2)
    carry_optimizer_state(opt_b, new_b, old_names=old_names, new_names=_names(model_b))
    _train(model_a, opt_a, 2, seed=3)
    _train(model_b, new_b, 2, seed=3)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_sgd_momentum_buffer_carried_and_exact() -> None:
    model_a, model_b = _model(), _model()
    opt_a = torch.optim.SGD(model_a.parameters(), lr=0.1, momentum=0.9)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    _train(model_a, opt_a, 3)
    _train(model_b, opt_b, 3)
    names = _names(model_b)
    new_b = torch.optim.SGD(model_b.parameters(), lr=0.1, momentum=0.9)
    report = carry_optimizer_state(opt_b, new_b, old_names=names, new_names=names)
    assert len(report.carried) == 4
    for p in model_b.parameters():
        _assert_state_copied(opt_b, p, new_b, p, {"momentum_buffer"})
    _train(model_a, opt_a, 2, seed=2)
    _train(model_b, new_b, 2, seed=2)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)


def test_different_optimizer_class_carries_nothing() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    names = _names(model)
    new = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.carried == ()
    assert report.reset == ("net/0.weight", "net/0.bias", "net/2.weight", "net/2.bias")
    assert report.dropped == ()
    assert report.reason == "Adam -> SGD: different optimizer classes keep different state"
    assert str(report).startswith("carried nothing (Adam -> SGD: different optimizer classes")
    assert len(new.state) == 0
    # AdamW is not Adam, even though it subclasses it in some torch versions
    report = carry_optimizer_state(old, torch.optim.AdamW(model.parameters()),
                                   old_names=names, new_names=names)
    assert report.carried == () and report.reason.startswith("Adam -> AdamW")


def test_multiple_param_groups_regrouped_and_lrs_untouched() -> None:
    model = _model()
    old = torch.optim.Adam([{"params": model[0].parameters(), "lr": 1e-4},
                            {"params": model[2].parameters(), "lr": 1e-3}])
    _train(model, old, 3)
    names = _names(model)
    # regrouped: weights in one group, biases in the other
    new = torch.optim.Adam([{"params": [model[0].weight, model[2].weight], "lr": 5e-4},
                            {"params": [model[0].bias, model[2].bias], "lr": 2e-3}])
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.carried == ("net/0.weight", "net/2.weight", "net/0.bias", "net/2.bias")
    assert [g["lr"] for g in new.param_groups] == [5e-4, 2e-3]
    assert [g["lr"] for g in old.param_groups] == [1e-4, 1e-3]
    for p in model.parameters():
        _assert_state_copied(old, p, new, p, ADAM_KEYS)


def test_never_stepped_parameter_counts_as_carried() -> None:
    model = _model()
    model[0].requires_grad_(False)  # in the optimizer, but never gets a gradient
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    names = _names(model)
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.carried == ("net/0.weight", "net/0.bias", "net/2.weight", "net/2.bias")
    assert model[0].weight not in new.state and model[2].weight in new.state


def test_dtype_change_resets() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    old_names = _names(model)
    model[0].double()  # in place: same Parameter objects, now float64
    model[2] = nn.Linear(8, 2).double()  # new objects, same name and shape, other dtype
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=old_names, new_names=_names(model))
    assert report.carried == ()
    assert report.reset == ("net/0.weight", "net/0.bias", "net/2.weight", "net/2.bias")
    assert report.dropped == ()
    assert len(new.state) == 0
    _train(model, new, 1)  # fresh state of the right dtype: steps fine
    assert new.state[model[0].weight]["exp_avg"].dtype == torch.float64


def test_in_place_resize_of_same_parameter_resets() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    names = _names(model)
    model[2].bias.data = torch.zeros(3)  # same object, new shape
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.reset == ("net/2.bias",)
    assert report.carried == ("net/0.weight", "net/0.bias", "net/2.weight")


def test_changed_amsgrad_switch_resets_instead_of_crashing() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 2)
    names = _names(model)
    new = torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True)
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.carried == () and len(report.reset) == 4
    _train(model, new, 1)  # would raise KeyError('max_exp_avg_sq') on carried state
    # foreach only picks a kernel: carried
    newer = torch.optim.Adam(model.parameters(), lr=1e-2, foreach=False)
    assert len(carry_optimizer_state(old, newer, old_names=names, new_names=names).carried) == 4


def test_existing_state_of_new_optimizer_is_kept() -> None:
    model = _model()
    old = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, old, 3)
    names = _names(model)
    new = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, new, 1)
    before = new.state[model[0].weight]["exp_avg"].clone()
    report = carry_optimizer_state(old, new, old_names=names, new_names=names)
    assert report.kept == ("net/0.weight", "net/0.bias", "net/2.weight", "net/2.bias")
    assert report.carried == () and report.dropped == ()
    assert torch.equal(new.state[model[0].weight]["exp_avg"], before)
    assert new.state[model[0].weight]["step"].item() == 1.0


def test_same_optimizer_registered_again_is_a_no_op() -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, opt, 2)
    exp_avg = opt.state[model[0].weight]["exp_avg"]
    names = _names(model)
    report = carry_optimizer_state(opt, opt, old_names=names, new_names=names)
    assert len(report.carried) == 4
    assert opt.state[model[0].weight]["exp_avg"] is exp_avg


def test_report_str_truncates_long_lists() -> None:
    report = CarryReport(carried=("a", "b"), reset=tuple(f"r{i}" for i in range(8)),
                         dropped=("d0",))
    assert str(report) == ("carried the state of 2 parameters; reset r0, r1, r2, r3, r4 and 3 more "
                           "(new or resized); dropped d0 (no longer optimized)")
    short = CarryReport(carried=(), reset=tuple(f"r{i}" for i in range(5)), dropped=())
    assert str(short) == "carried the state of 0 parameters; reset r0, r1, r2, r3, r4 (new or resized)"
    with pytest.raises(TypeError):
        CarryReport(("a",), (), ())  # type: ignore[misc]  # keyword-only


# --- in a running system: surgery, a new experiment, and rebuilding a saved architecture ----------


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _steps(model, opt, steps, start):
    for step in range(start + 1, start + steps + 1):
        opt.zero_grad()
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        wl.checkpoint_on_step(step)
    return start + steps


def test_surgery_opens_a_child_and_carries_the_unchanged_state(root, caplog):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=None, save_on_close=False)
    wl.register_hyperparams({"hidden": 8})
    torch.manual_seed(0)
    model = wl.register_model(_mlp(8))
    opt = wl.register_optimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    step = _steps(model, opt, 3, 0)
    before = system.experiment_hash
    kept = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    model[0] = nn.Linear(4, 16)  # widen the hidden layer: both linears change shape
    model[2] = nn.Linear(16, 2)
    model.add_module("3", nn.Tanh())
    new_opt = torch.optim.Adam(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        wl.register_optimizer(new_opt)
    warning = [r.getMessage() for r in caplog.records if "registered again" in r.getMessage()]
    assert len(warning) == 1 and "reset" in warning[0] and "main/0.weight" in warning[0]
    # 2.bias kept its shape (2,) and its name: carried; the resized ones start fresh
    bias = dict(model.named_parameters())["2.bias"]
    assert torch.equal(new_opt.state[bias]["exp_avg"], kept["2.bias"]["exp_avg"])
    assert dict(model.named_parameters())["0.weight"] not in new_opt.state
    _steps(model, new_opt, 1, step)
    child = system.experiment_hash
    assert child != before
    system.wait()
    manager = CheckpointManager(root)
    record = manager.read_experiment(child)
    assert record.parent.reason == "model_change" and record.parent.ref == f"{before}@3"
    assert "main:0 Linear(in_features=4, out_features=8, bias=True) -> Linear(in_features=4, out_features=16, " \
        "bias=True)" in record.parent.changes and "main:3 added (Tanh())" in record.parent.changes
    info = system.peek(f"{child}@latest")
    assert info.step == 4 and info.reasons[0] == "model_change"
    system.close()


def test_surgery_without_a_new_optimizer_warns_once(root, caplog):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=None, save_on_close=False)
    model = wl.register_model(_mlp(8))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.01))
    step = _steps(model, opt, 2, 0)
    model[2] = nn.Linear(8, 2)  # same shape, but new parameters the optimizer does not know
    model[0] = nn.Linear(4, 8, bias=False)
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        _steps(model, opt, 3, step)
    stale = [r.getMessage() for r in caplog.records if "no longer in any registered model" in r.getMessage()]
    assert len(stale) == 1 and "optimizer 'main' still holds 4 parameters" in stale[0]
    assert "register it again as 'main'" in stale[0]
    system.close()


def test_resume_into_another_architecture_lists_the_differences_and_a_factory_rebuilds_it(root):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=2, save_on_close=False)
    wl.register_hyperparams({"hidden": 16})
    torch.manual_seed(0)
    model = wl.register_model(_mlp(16))
    opt = wl.register_optimizer(torch.optim.Adam(model.parameters(), lr=0.01))
    _steps(model, opt, 4, 0)
    system.wait()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    system.close()
    wl.unregister("main")

    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=2, save_on_close=False)
    wl.register_hyperparams({"hidden": 8})
    small = wl.register_model(_mlp(8))
    wl.register_optimizer(torch.optim.Adam(small.parameters(), lr=0.01))
    ref = CheckpointManager(root).checkpoints()[-1].ref
    with pytest.raises(wl.ArchitectureMismatchError) as info:
        system.resume(ref)
    message = str(info.value)
    assert "0.weight is [16, 4] torch.float32 in the checkpoint, [8, 4] torch.float32 in the model" in message
    assert "model_factory" in message
    assert torch.equal(small[0].weight, small[0].weight)  # nothing restored

    with pytest.raises(wl.ConfigError, match="trains the parameters of the old ones"):
        system.resume(ref, model_factory=lambda info: _mlp(info.hyperparams["main"]["hidden"]))

    seen = []

    def build(info):
        seen.append((info.ref, info.hyperparams["main"]["hidden"], len(info.architecture)))
        rebuilt = _mlp(info.hyperparams["main"]["hidden"])
        return {"model": rebuilt, "optimizer": torch.optim.Adam(rebuilt.parameters(), lr=0.01)}

    assert system.resume(ref, model_factory=build) == 4
    assert seen == [(ref, 16, 1)]
    rebuilt = wl.get_model()
    assert rebuilt is not small and all(torch.equal(rebuilt.state_dict()[k], v) for k, v in saved.items())
    assert wl.get_optimizer().state[rebuilt[0].weight]["exp_avg"].shape == (16, 4)
    assert system.experiment_hash == ref.split("@")[0]
    system.close()


def test_a_factory_that_returns_the_wrong_thing_registers_nothing(root):
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=2, save_on_close=False)
    model = wl.register_model(_mlp(8))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    _steps(model, opt, 2, 0)
    system.wait()
    with pytest.raises(wl.ConfigError, match="returned a str as optimizer 'main'"):
        system.resume("latest", model_factory=lambda info: {"model": _mlp(8), "optimizer": "sgd"})
    assert wl.get_model() is model and wl.get_optimizer() is opt  # nothing half-registered
    system.close()
