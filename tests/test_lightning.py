"""PyTorch Lightning (weightslab.integrations.lightning): a Trainer killed with SIGKILL mid-epoch and
resumed in a fresh process ends bit for bit where an uninterrupted run ends.

The runs are real subprocesses (tests/scripts/lightning_train.py: dropout, NumPy and Python draws, a
shuffled DataLoader with two workers, AdamW, a per-step scheduler, gradient accumulation, validation)
with MKL's strict mode and one thread, side by side where they are independent. Final states
(parameters, optimizer state, scheduler, the next batch, the next random draws) are compared byte
for byte.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from weightslab.ledger import LEDGER

from .support import REPO, assert_root_consistent, child_env, manifests, read_manifest

pytestmark = [pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL"),
              pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                 reason="needs lightning: pip install 'weightslab[lightning]'")]

SCRIPT = REPO / "tests" / "scripts" / "lightning_train.py"


def _spawn(root: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *extra], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str]) -> str:
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"the run failed with {proc.returncode}:\n{stdout}\n{stderr}"
    return stdout


def _kill_when_ready(proc: subprocess.Popen[str]) -> None:
    """Read the run's output until READY (step N done, its checkpoint durable), then SIGKILL it."""
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line.strip())
        if line.strip() == "READY":
            proc.send_signal(signal.SIGKILL)
            break
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"not killed by the test: {proc.returncode}, {seen}\n{stderr}"


def _start(stdout: str) -> int:
    return int(next(line for line in stdout.splitlines() if line.startswith("START")).split()[1])


def _assert_same_end(straight: Path, resumed: Path) -> None:
    for suffix in (".safetensors", ".json"):
        assert Path(f"{straight}{suffix}").read_bytes() == Path(f"{resumed}{suffix}").read_bytes(), \
            f"the resumed run ends elsewhere ({suffix})"
    # Every step the resumed run took saw the samples, and had the loss, of the uninterrupted run's.
    ran = json.loads(Path(f"{resumed}.steps.json").read_text())
    straight_steps = json.loads(Path(f"{straight}.steps.json").read_text())
    assert ran and {key: straight_steps.get(key) for key in ran} == ran


def _only_experiment(root: Path) -> tuple[str, list[int]]:
    (exp, steps), = manifests(root).items()
    return exp, steps


#: Two batches per optimizer step, 8 batches per epoch: 10 steps are 2.5 epochs. Validation after
#: every 4th batch (steps 2, 4, 6, ...), on a loader that draws from the global generator. A
#: checkpoint every 3 steps by weightslab, and one by Lightning's ModelCheckpoint after each
#: validation. The run to kill stops after step 6 (batch 4 of epoch 1) and its validation.
#: ``--auto`` is resume="auto" (a ckpt_path given wins over it; the first run starts fresh).
ARGS = ("--accumulate", "2", "--max-steps", "10", "--frequency", "3", "--validate", "--auto", "--model-checkpoint")
KILLED_AT = 6


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A run to the end (``straight``), one killed after step 6 (``root``, kept as it was left), and
    three resumes of copies of that root in fresh processes: ``trainer.fit(ckpt_path="<name>@best:loss")``
    (``named``), ``resume="auto"`` (``auto``) and ``trainer.fit(ckpt_path=<ModelCheckpoint's .ckpt of
    step 6>)`` (``lightning``). Independent runs go side by side: Lightning takes seconds to import."""
    base = tmp_path_factory.mktemp("lightning")
    straight = _spawn(base / "straight-root", base / "straight", *ARGS)
    _kill_when_ready(_spawn(base / "root", base / "killed", *ARGS, "--pause-at", str(KILLED_AT)))
    _finish(straight)

    from weightslab.maintenance import name_experiment

    for copy in ("named-root", "auto-root", "lightning-root"):
        shutil.copytree(base / "root", base / copy)
    exp, _ = _only_experiment(base / "root")
    name_experiment("lightning-run", exp, root=base / "named-root")
    named = _spawn(base / "named-root", base / "named", *ARGS, "--ckpt-path", "lightning-run@best:loss")
    auto = _spawn(base / "auto-root", base / "auto", *ARGS)
    lightning = _spawn(base / "lightning-root", base / "lightning", *ARGS,
                       "--ckpt-path", str(base / "lightning-root" / "lightning" / f"step={KILLED_AT}.ckpt"))
    return {"base": base, "experiment": exp, "named": _finish(named), "auto": _finish(auto),
            "lightning": _finish(lightning)}


def test_killed_mid_epoch_the_checkpoint_holds_the_position_and_the_loops(runs: dict) -> None:
    root, exp = runs["base"] / "root", runs["experiment"]
    assert sorted(assert_root_consistent(root)) == [3, 6]  # 6 was durable when the run was killed
    assert sorted(p.name for p in (root / "lightning").iterdir()) == ["step=2.ckpt", "step=4.ckpt", "step=6.ckpt"]
    state = read_manifest(root, exp, KILLED_AT)["state"]
    # Mid-epoch: 12 batches taken, 8 per epoch; Lightning's own counters are there too.
    assert (state["dataloaders"]["train"]["epoch"], state["dataloaders"]["train"]["batches"]) == (1, 4)
    loops = state["custom"]["lightning"]
    assert (loops["epoch"], loops["global_step"]) == (1, KILLED_AT)
    assert loops["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 4
    # Taken after the validation that followed the step: its metric is there, the modules are saved
    # in training mode (Lightning sets them back after the hook), and its counters are done.
    assert "val_loss" in read_manifest(root, exp, KILLED_AT)["metrics"]
    assert state["models"]["model"]["eval"] == []
    assert loops["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]["completed"] == 4  # 64 / 16


def test_resumed_with_ckpt_path_a_named_best_ref_ends_bit_identical(runs: dict) -> None:
    root, exp = runs["base"] / "root", runs["experiment"]
    losses = {step: read_manifest(root, exp, step)["metrics"]["loss"] for step in (3, KILLED_AT)}
    assert _start(runs["named"]) == min(losses, key=losses.get)  # trainer.callback_metrics reached @best
    _assert_same_end(runs["base"] / "straight", runs["base"] / "named")


def test_resumed_by_the_callback_itself_ends_bit_identical(runs: dict) -> None:
    assert _start(runs["auto"]) == KILLED_AT  # resume="auto": from "latest"
    _assert_same_end(runs["base"] / "straight", runs["base"] / "auto")


def test_lightnings_own_checkpoint_taken_with_the_callback_resumes_bit_identical(runs: dict) -> None:
    # ModelCheckpoint's .ckpt holds the callback's state: the random generators and the loader's position.
    assert _start(runs["lightning"]) == KILLED_AT
    _assert_same_end(runs["base"] / "straight", runs["base"] / "lightning")


def test_with_accumulated_gradients_a_checkpoint_step_is_an_optimizer_step(runs: dict) -> None:
    root, exp = runs["base"] / "straight-root", runs["experiment"]
    assert _only_experiment(root)[1] == [3, 6, 9, 10]  # optimizer steps 3, 6, 9 and the last (20 batches)
    for step in (3, 6, 9, 10):
        state = read_manifest(root, exp, step)["state"]
        position = state["dataloaders"]["train"]
        assert state["custom"]["lightning"]["global_step"] == step
        assert 8 * position["epoch"] + position["batches"] == 2 * step  # both batches of the step taken
    assert read_manifest(root, exp, 10)["reasons"] == ["exit"]  # the final checkpoint, at the end of training


def test_weightslab_refs_go_to_weightslab_and_lightning_files_to_lightning(tmp_path: Path) -> None:
    from weightslab.integrations.lightning import is_weightslab_ref

    ckpt = tmp_path / "epoch=0-step=4.ckpt"
    ckpt.write_bytes(b"")
    manifest = tmp_path / "3fa2c1d0e9b8a7f6_step_000012.json"
    manifest.write_text("{}")
    experiment = tmp_path / "3fa2c1d0e9b8a7f6"
    experiment.mkdir()
    (experiment / "experiment.json").write_text("{}")
    assert [is_weightslab_ref(r) for r in ("latest", "3fa2c1@12", "run@best:loss", "run@latest", str(manifest),
                                           manifest, str(experiment))] == [True] * 7
    assert [is_weightslab_ref(r) for r in (str(ckpt), ckpt, "last.ckpt", str(tmp_path / "missing.ckpt"),
                                           str(tmp_path), "", None)] == [False] * 7


def test_a_ref_that_names_no_checkpoint_fails_before_training_and_leaves_nothing_registered(tmp_path: Path) -> None:
    import lightning.pytorch as pl

    from weightslab import CheckpointNotFoundError
    from weightslab.integrations.lightning import WeightslabCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            raise AssertionError("no step may run")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 2)), batch_size=2)
    trainer = pl.Trainer(max_steps=2, callbacks=[WeightslabCallback(root_log_dir=tmp_path / "root")],
                         accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with pytest.raises(CheckpointNotFoundError, match="nosuch"):
        trainer.fit(Tiny(), loader, ckpt_path="nosuch@3")
    assert trainer.global_step == 0
    assert LEDGER.list_registered() == {}


def test_weightslab_never_imports_lightning_and_says_which_extra_is_missing() -> None:
    from .support import run_python

    run_python("import sys, weightslab, weightslab.integrations\n"
               "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)")
    # Without lightning installed (an import hook refuses it), the message names the extra to install.
    proc = run_python("import sys\n"
                      "class NoLightning:\n"
                      "    def find_spec(self, name, path=None, target=None):\n"
                      "        if name.split('.')[0] == 'lightning':\n"
                      "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
                      "sys.meta_path.insert(0, NoLightning())\n"
                      "import weightslab.integrations.lightning\n", check=False)
    assert proc.returncode == 1
    assert "ImportError: weightslab.integrations.lightning needs PyTorch Lightning" in proc.stderr
    assert "pip install 'weightslab[lightning]'" in proc.stderr
