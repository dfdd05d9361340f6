"""resume="auto" / "never", restarts with other settings, and the warnings about exactness."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import weightslab as wl
from weightslab.storage.layout import Layout

from .support import make_model


def build(width: int = 8):
    model = make_model(width)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def train(model, opt, steps: int, *, explicit_from: int | None = None) -> None:
    for i in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        if explicit_from is not None:
            wl.checkpoint_on_step(explicit_from + i + 1)


def first_run(root: Path, config: dict, steps: int = 5, width: int = 8):
    model, opt = build(width)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", config)
    train(model, opt, steps, explicit_from=0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    h = system.experiment_hash
    system.close()
    wl.unregister("main")
    wl.unregister("config")
    return h, weights


def test_auto_resumes_by_itself_and_tells_the_step(root: Path) -> None:
    h, weights = first_run(root, {"lr": 0.1})
    model, opt = build()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, resume="auto")
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.1})
    assert system.start_step == 5  # resumes on first read, after everything is registered
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    train(model, opt, 2, explicit_from=system.start_step)
    system.close()
    assert [s for s, _ in Layout(root).manifests(h)] == [1, 2, 3, 4, 5, 6, 7]


def test_auto_resume_of_a_loop_that_never_asks(root: Path) -> None:
    h, weights = first_run(root, {"lr": 0.1})
    model, opt = build()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, resume="auto")
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.1})
    before = model(torch.ones(1, 4))  # the first forward resumes, before computing
    assert system.start_step == 5
    expected, _ = build()
    expected.load_state_dict(weights)
    assert torch.equal(before, expected(torch.ones(1, 4)))
    train(model, opt, 3)  # implicit steps continue from the resumed one
    system.close()
    assert [s for s, _ in Layout(root).manifests(h)] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_auto_resume_warns_when_the_loop_restarts_its_step_count(root: Path, caplog) -> None:
    first_run(root, {"lr": 0.1})
    model, opt = build()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, resume="auto")
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.1})
    with caplog.at_level(logging.WARNING):
        wl.checkpoint_on_step(1)
    assert "start the loop at system.start_step + 1" in caplog.text
    system.close()


def test_never_starts_fresh_without_a_warning(root: Path, caplog) -> None:
    h, weights = first_run(root, {"lr": 0.1})
    model, opt = build()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1, resume="never")
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.1})
    with caplog.at_level(logging.WARNING):
        model(torch.ones(1, 4))
        wl.checkpoint_on_step(1)
    assert system.start_step == 0
    assert not torch.equal(model[0].weight, weights["0.weight"])
    assert "did not resume" not in caplog.text
    system.close()


@pytest.mark.parametrize("change", ["hyperparameters", "architecture"])
def test_a_restart_with_other_settings_records_its_parent_and_says_so(root: Path, caplog, change: str) -> None:
    h, _ = first_run(root, {"lr": 0.1})
    model, opt = build(width=16 if change == "architecture" else 8)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.2 if change == "hyperparameters" else 0.1})
    with caplog.at_level(logging.WARNING):
        assert system.resume() == 0  # not the other experiment's weights
    assert f"latest related run {h}@5" in caplog.text and "not resuming it" in caplog.text
    train(model, opt, 1, explicit_from=0)
    new = system.experiment_hash
    system.close()
    assert new != h
    record = json.loads(Layout(root).experiment_record(new).read_text())
    assert record["parent"]["ref"] == f"{h}@5" and record["parent"]["reason"] == "restart_with_changes"
    expected = "config.lr: 0.1 -> 0.2" if change == "hyperparameters" else "out_features=16"
    assert any(expected in line for line in record["parent"]["changes"])


def test_an_unrelated_run_gets_no_parent(root: Path) -> None:
    first_run(root, {"lr": 0.1})
    model, opt = build(width=16)
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_model(model)
    wl.register_optimizer(opt)
    wl.register_hyperparams("config", {"lr": 0.3})  # different architecture AND hyperparameters
    assert system.resume() == 0
    train(model, opt, 1, explicit_from=0)
    system.wait()
    record = json.loads(Layout(root).experiment_record(system.experiment_hash).read_text())
    assert record["parent"] is None
    system.close()


def test_resuming_without_a_reproducible_setup_warns_once(root: Path, caplog, monkeypatch) -> None:
    if not torch.backends.mkl.is_available():
        pytest.skip("this check is about MKL")
    first_run(root, {"lr": 0.1})
    monkeypatch.delenv("MKL_CBWR", raising=False)
    model, opt = build()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    wl.register_model(model)
    wl.register_hyperparams("config", {"lr": 0.1})
    with caplog.at_level(logging.WARNING):
        system.resume()
        system.resume()
    assert caplog.text.count("MKL_CBWR is not set") == 1 and "guides/exactness.md" in caplog.text
    system.close()
    monkeypatch.setenv("MKL_CBWR", "AVX2,STRICT")
    caplog.clear()
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=1)
    with caplog.at_level(logging.WARNING):
        system.resume()
    assert "MKL_CBWR" not in caplog.text
    system.close()


def test_resume_mode_is_validated(root: Path) -> None:
    with pytest.raises(wl.ConfigError, match="'auto', 'never' or None"):
        wl.get_checkpoint_system(root_log_dir=root, resume="always")
