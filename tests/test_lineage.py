"""Experiments as a graph: human names, refs by name and by best metric, forks from any checkpoint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.storage.manager import CheckpointManager


class Run:
    """A small run: a model, SGD bound to config["optimizer"]["lr"], checkpoints every 2 steps."""

    def __init__(self, root, *, lr: float = 0.1, **settings):
        settings = {"checkpoint_frequency": 2, "save_on_close": False, **settings}
        self.system = wl.get_checkpoint_system(root_log_dir=root, **settings)
        self.config = wl.register_hyperparams("config", {"optimizer": {"lr": lr}, "width": 4})
        torch.manual_seed(0)
        self.model = wl.register_model(nn.Linear(3, 4))
        self.opt = wl.register_optimizer(torch.optim.SGD(self.model.parameters(), lr=lr))
        self.step = 0

    def train(self, n: int, loss_of=lambda step: 1.0 / step) -> None:
        for _ in range(n):
            self.opt.zero_grad()
            self.model(torch.randn(2, 3)).pow(2).mean().backward()
            self.opt.step()
            self.step += 1
            wl.checkpoint_on_step(self.step, metrics={"loss": loss_of(self.step), "acc": self.step % 5})

    def close(self) -> None:
        self.system.close()
        for name in ("config", "main"):
            wl.unregister(name)


def _weights(root, ref):
    return wl.load(ref, root=root)["models"]["main"]


# --- names and refs ------------------------------------------------------------------------------
def test_a_named_experiment_is_found_by_name_everywhere(root):
    run = Run(root)
    run.train(6)
    exp = run.system.name_experiment("baseline")
    run.system.wait()
    assert exp == run.system.experiment_hash
    assert CheckpointManager(root).names() == {"baseline": exp}
    assert (root / "names" / "baseline.json").is_file()
    assert run.system.peek("baseline@4").ref == f"{exp}@4"
    assert run.system.peek("baseline@latest").step == 6
    assert wl.load("baseline@2", root=root)["step"] == 2
    assert wl.name_experiment("base2", "baseline@latest", root=root) == exp  # several names are fine
    assert CheckpointManager(root).names() == {"baseline": exp, "base2": exp}
    run.close()


def test_best_refs_rank_by_the_metric(root):
    run = Run(root)
    losses = {2: 0.5, 4: 0.2, 6: 0.9}
    run.train(6, loss_of=lambda s: losses.get(s, 1.0))
    run.system.name_experiment("b")
    run.system.wait()
    assert run.system.peek("b@best:loss").step == 4
    assert run.system.peek("b@best:acc:max").step == 4  # acc = step % 5: 2, 4, 1
    assert run.system.peek("b@best:acc").step == 6
    with pytest.raises(wl.CheckpointNotFoundError) as info:
        run.system.peek("b@best")  # two metrics, no retention metric: which one?
    assert "acc, loss" in str(info.value) and "@best:<metric>" in str(info.value)
    with pytest.raises(wl.CheckpointNotFoundError, match="records the metric 'f1'"):
        run.system.peek("b@best:f1")
    run.close()
    # with a retention metric, a bare @best uses it
    run = Run(root, retention={"keep_best": 1, "metric": "acc", "mode": "max"})
    assert run.system.peek("b@best").step == 4
    run.close()


def test_unknown_and_invalid_names_say_what_to_do(root):
    run = Run(root)
    run.train(2)
    with pytest.raises(wl.CheckpointNotFoundError) as info:
        run.system.resume("nobody@latest")
    assert "no experiment is named 'nobody'" in str(info.value) and "wl.name_experiment" in str(info.value)
    with pytest.raises(wl.ConfigError, match="cannot name an experiment"):
        run.system.name_experiment("cafe")  # reads as a hash prefix
    run.system.name_experiment("taken")
    run.close()
    other = Run(root, lr=0.2)
    other.train(2)
    with pytest.raises(wl.ConfigError, match="already names experiment"):
        other.system.name_experiment("taken")
    assert other.system.name_experiment("taken", replace=True) == other.system.experiment_hash
    other.close()


# --- forks ---------------------------------------------------------------------------------------
def test_fork_restores_the_checkpoint_changes_the_config_and_opens_a_named_branch(root):
    run = Run(root)
    run.train(6)
    run.system.wait()
    base = run.system.experiment_hash
    at_4 = _weights(root, f"{base}@4")
    step = wl.fork(f"{base}@4", name="lr-sweep-2", optimizer__lr=0.01)
    assert step == 4
    assert torch.equal(run.model.weight.detach(), at_4["weight"])  # the checkpoint's state
    assert run.config["optimizer"]["lr"] == 0.01 and run.opt.param_groups[0]["lr"] == 0.01
    fork = run.system.experiment_hash
    assert fork != base
    run.system.wait()
    manager = CheckpointManager(root)
    record = manager.read_experiment(fork)
    assert record.parent.ref == f"{base}@4" and record.parent.reason == "fork"
    assert record.parent.changes == ("config.optimizer.lr: 0.1 -> 0.01",)
    assert record.branch == "lr-sweep-2"
    assert manager.names() == {"lr-sweep-2": fork}
    first = run.system.peek("lr-sweep-2@latest")
    assert first.step == 4 and first.reasons == ("fork",)
    run.step = step
    run.train(2)  # continues at step 5 in the fork
    run.system.wait()
    assert [e.step for e in manager.checkpoints([fork])] == [4, 6]
    assert [e.step for e in manager.checkpoints([base])] == [2, 4, 6]  # the base is untouched
    assert fork in manager.lineage(base)
    run.close()


def test_forks_without_overrides_are_distinct_experiments(root):
    run = Run(root)
    run.train(4)
    base = run.system.experiment_hash
    wl.fork(f"{base}@2")
    first = run.system.experiment_hash
    wl.fork(f"{base}@2")
    second = run.system.experiment_hash
    assert len({base, first, second}) == 3
    run.system.wait()
    manager = CheckpointManager(root)
    for h in (first, second):
        assert manager.read_experiment(h).parent.ref == f"{base}@2"
        assert manager.read_experiment(h).parent.changes == ()
    run.close()


@pytest.mark.parametrize("kwargs, error, says", [
    ({"name": "cafe"}, wl.ConfigError, "cannot name an experiment"),
    ({"name": "taken"}, wl.ConfigError, "already names experiment"),
    ({"optimizer__momentum": 0.9}, wl.HyperparamsError, "no registered hyperparameters have the key 'optimizer.momentum'"),
    ({"optimizer__lr": "fast"}, wl.HyperparamsError, "'optimizer.lr' must be a float"),
    ({"ref": "nobody@3"}, wl.CheckpointNotFoundError, "no experiment is named 'nobody'"),
])
def test_a_fork_that_cannot_succeed_changes_nothing(root, kwargs, error, says):
    run = Run(root)
    run.train(4)
    run.system.name_experiment("taken")
    base, before = run.system.experiment_hash, run.model.weight.detach().clone()
    ref = kwargs.pop("ref", f"{base}@2")
    with pytest.raises(error) as info:
        wl.fork(ref, **kwargs)
    assert says in str(info.value)
    assert run.system.experiment_hash == base and torch.equal(run.model.weight.detach(), before)
    assert run.config["optimizer"]["lr"] == 0.1 and run.opt.param_groups[0]["lr"] == 0.1
    run.close()


def test_a_new_process_continues_a_fork_on_its_branch(root):
    run = Run(root)
    run.train(4)
    base = run.system.experiment_hash
    wl.fork(f"{base}@2", name="sweep", optimizer__lr=0.05)
    fork = run.system.experiment_hash
    run.step = 2
    run.train(4)  # checkpoints at 4 and 6 of the fork
    run.close()
    again = Run(root, lr=0.1)  # a new process, built from the base's config
    assert again.system.resume("sweep@latest") == 6
    assert again.system.experiment_hash == fork  # on the fork's branch, not a "resume with changes"
    assert again.config["optimizer"]["lr"] == 0.05 and again.opt.param_groups[0]["lr"] == 0.05
    again.step = 6
    again.config["optimizer"]["lr"] = 0.02  # a change inside the fork opens its child
    again.train(1)
    child = again.system.experiment_hash
    again.system.wait()
    record = CheckpointManager(root).read_experiment(child)
    assert record.parent.experiment == fork and record.branch == "sweep"
    again.close()
    latest = Run(root)  # resume("latest") searches the whole lineage of the base, forks included
    assert latest.system.resume() == 7 and latest.system.experiment_hash == child
    latest.close()
