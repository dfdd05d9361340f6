"""Tests of weightslab/change.py: cheap per-step detection of structure, hyperparameter and state changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

from weightslab.change import ChangeDetector, Poll, StateChange

ALL_MODULES = ("", "body", "body.0", "body.1", "body.2", "fc")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(self.body(x))


@dataclasses.dataclass
class Cfg:
    lr: float = 0.1


def _global_hook_counts() -> tuple[int, int, int]:
    return (len(torch_module._global_module_registration_hooks),
            len(torch_module._global_parameter_registration_hooks),
            len(torch_module._global_buffer_registration_hooks))


@pytest.fixture
def detector():
    det = ChangeDetector()
    det.install()
    yield det
    det.remove()


@pytest.fixture
def tracked(detector):
    model = Net()
    hp = {"lr": 0.1, "opt": {"name": "adam", "betas": [0.9, 0.99]}}
    assert detector.track({"main": model}, {"cfg": hp}) == []
    return detector, model, hp


def test_no_change_is_a_falsy_poll(tracked):
    det, model, hp = tracked
    for _ in range(3):
        poll = det.poll()
        assert poll == Poll(structure=False, hyperparams=False, state=())
        assert not poll
    model(torch.zeros(1, 4)).sum().backward()  # a training step changes nothing that is tracked
    with torch.no_grad():
        model.fc.weight.add_(1.0)
    assert not det.poll()


def test_poll_before_any_track_and_invalidate(detector):
    assert detector.poll().structure  # no baseline yet
    detector.track({"main": Net()}, {})
    assert not detector.poll()
    detector.invalidate()
    assert detector.poll().structure
    assert detector.poll().structure  # stays until the next baseline
    detector.track({"main": Net()}, {})
    assert not detector.poll()


def test_freeze_then_unfreeze(tracked):
    det, model, _ = tracked
    model.fc.requires_grad_(False)
    poll = det.poll()
    assert poll.state == (StateChange("freeze", "main", ("fc.weight", "fc.bias")),)
    assert not poll.structure and not poll.hyperparams
    assert poll
    assert not det.poll()  # reported once
    model.fc.requires_grad_(True)
    assert det.poll().state == (StateChange("unfreeze", "main", ("fc.weight", "fc.bias")),)
    assert not det.poll()


def test_freeze_and_unfreeze_in_one_poll(tracked):
    det, model, _ = tracked
    model.fc.requires_grad_(False)
    det.poll()
    model.fc.requires_grad_(True)
    model.body[0].weight.requires_grad_(False)
    assert det.poll().state == (StateChange("freeze", "main", ("body.0.weight",)),
                                StateChange("unfreeze", "main", ("fc.weight", "fc.bias")))


def test_eval_counts_after_two_consecutive_polls(tracked):
    det, model, _ = tracked
    model.eval()
    assert not det.poll()  # first sighting: not yet
    poll = det.poll()
    assert poll.state == (StateChange("eval", "main", ALL_MODULES),)
    assert not poll.structure
    assert not det.poll()  # the new baseline
    assert not det.poll()
    model.train()
    assert not det.poll()
    assert det.poll().state == (StateChange("train", "main", ALL_MODULES),)
    assert not det.poll()


def test_eval_and_back_before_the_next_poll_is_never_reported(tracked):
    det, model, _ = tracked
    model.eval()
    model.train()
    for _ in range(3):
        assert not det.poll()


def test_validation_around_one_boundary_is_never_reported(tracked):
    det, model, _ = tracked
    model.eval()
    assert not det.poll()  # the boundary falls inside validation
    model.train()
    for _ in range(3):
        assert not det.poll()


def test_eval_of_one_submodule_names_it(tracked):
    det, model, _ = tracked
    model.body.eval()
    det.poll()
    assert det.poll().state == (StateChange("eval", "main", ("body", "body.0", "body.1", "body.2")),)


def test_assigning_a_new_submodule_sets_structure(tracked):
    det, model, _ = tracked
    model.fc = nn.Linear(8, 3)  # same name: the child count does not move, only the hook sees it
    poll = det.poll()
    assert poll.structure and not poll.hyperparams and poll.state == ()
    det.track({"main": model}, {})
    assert not det.poll()


def test_replacing_a_submodule_by_one_of_the_same_shape_is_a_reset(tracked):
    det, model, _ = tracked
    model.fc = nn.Linear(8, 2)
    assert det.poll().structure
    assert det.track({"main": model}, {}) == [StateChange("reset", "main", ("fc.weight", "fc.bias"))]


def test_replacing_a_submodule_by_one_of_another_shape_is_not_a_reset(tracked):
    det, model, _ = tracked
    model.fc = nn.Linear(8, 3)
    assert det.poll().structure
    assert det.track({"main": model}, {}) == []


def test_adding_a_nested_submodule_and_a_buffer_set_structure(tracked):
    det, model, _ = tracked
    model.body.add_module("3", nn.Tanh())
    assert det.poll().structure
    det.track({"main": model}, {})
    model.fc.register_buffer("scale", torch.ones(2))
    assert det.poll().structure


def test_del_from_sequential_is_caught_without_a_hook(tracked):
    det, model, _ = tracked
    fired = []
    handle = torch_module.register_module_module_registration_hook(lambda m, n, v: fired.append(n))
    try:
        del model.body[1]
    finally:
        handle.remove()
    assert fired == []  # no registration hook saw the deletion
    assert len(model.body) == 2
    poll = det.poll()
    assert poll.structure


def test_del_attribute_is_caught(tracked):
    det, model, _ = tracked
    del model.fc
    assert det.poll().structure


def test_replaced_parameter_shows_up_as_reset(tracked):
    det, model, _ = tracked
    model.fc.weight = nn.Parameter(torch.zeros(2, 8))  # same shape, new object
    assert det.poll().structure
    assert det.track({"main": model}, {}) == [StateChange("reset", "main", ("fc.weight",))]
    assert not det.poll()
    assert det.track({"main": model}, {}) == []  # no replacement since


def test_track_reports_state_changes_hidden_by_a_structure_change(tracked):
    det, model, _ = tracked
    model.fc.requires_grad_(False)
    model.body.eval()
    model.head = nn.Linear(2, 2)
    poll = det.poll()
    assert poll.structure and poll.state == ()  # state is not compared when the structure moved
    changes = det.track({"main": model}, {})
    assert changes == [StateChange("freeze", "main", ("fc.weight", "fc.bias")),
                       StateChange("eval", "main", ("body", "body.0", "body.1", "body.2"))]


def test_track_of_another_model_under_the_same_name_reports_nothing(tracked):
    det, model, _ = tracked
    other = Net()
    other.fc.requires_grad_(False)
    assert det.track({"main": other}, {}) == []  # not the same model: nothing to compare


def test_hyperparams_dict_mutated_in_place(tracked):
    det, model, hp = tracked
    hp["opt"]["betas"][1] = 0.999
    poll = det.poll()
    assert poll.hyperparams and not poll.structure and poll.state == ()
    assert det.poll().hyperparams  # until the next baseline
    det.track({"main": model}, {"cfg": hp})
    assert not det.poll()
    hp["new"] = 1
    assert det.poll().hyperparams


def test_hyperparams_dataclass_setattr(detector):
    cfg = Cfg()
    detector.track({}, {"cfg": cfg})
    assert not detector.poll()
    cfg.lr = 0.2
    assert detector.poll() == Poll(structure=False, hyperparams=True, state=())


def test_untracked_modules_do_not_set_structure(tracked):
    det, model, _ = tracked
    unrelated = nn.Linear(3, 3)
    unrelated.extra = nn.Linear(3, 3)
    unrelated.register_buffer("b", torch.zeros(1))
    unrelated.weight = nn.Parameter(torch.zeros(3, 3))
    nn.Sequential(nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1))
    assert not det.poll()


def test_a_model_no_longer_tracked_does_not_set_structure(detector):
    old, new = Net(), Net()
    detector.track({"main": old}, {})
    detector.track({"main": new}, {})
    old.fc = nn.Linear(8, 2)
    assert not detector.poll()
    new.fc = nn.Linear(8, 2)
    assert detector.poll().structure


def test_install_and_remove_really_remove_the_global_hooks():
    before = _global_hook_counts()
    det = ChangeDetector()
    det.install()
    det.install()  # idempotent: no second set of hooks
    try:
        assert _global_hook_counts() == tuple(n + 1 for n in before)
        model = Net()
        det.track({"main": model}, {})
        model.fc = nn.Linear(8, 2)
        assert det.poll().structure  # with the hooks: seen
    finally:
        det.remove()
    assert _global_hook_counts() == before
    det.remove()  # twice is harmless
    model = Net()
    det.track({"main": model}, {})
    model.fc = nn.Linear(8, 2)  # the same replacement, now without hooks
    assert not det.poll().structure
    del model.body[0]  # the child-count check needs no hook
    assert det.poll().structure


def test_state_change_text_and_json():
    names = tuple(f"layer{i}.weight" for i in range(25))
    change = StateChange("freeze", "main", names)
    assert str(change) == "freeze of 'main': layer0.weight, layer1.weight, layer2.weight and 22 more"
    data = change.to_json()
    assert data["kind"] == "freeze" and data["model"] == "main" and data["count"] == 25
    assert data["names"] == list(names[:20])
    assert str(StateChange("eval", "m", ("",))) == "eval of 'm': <root>"
