"""The Hugging Face Trainer with WeightslabTrainerCallback: a run SIGKILLed mid-epoch and resumed in a
fresh process ends bit for bit where an uninterrupted run does.

Each run is a real subprocess (tests/scripts/hf_train.py: a tiny BERT with dropout, a shuffled loader
with 2 workers, AdamW, a linear schedule, an evaluation every 6 steps, the Trainer's own checkpoints
off) with MKL's strict mode and one thread. Compared: parameters, optimizer state, scheduler, the
Trainer's log history, the next random draws, and the batch every step after the resume trained on.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .support import REPO, assert_root_consistent, assert_same, child_env, kill_when, read_manifest, run_python

pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")

SCRIPT = REPO / "tests" / "scripts" / "hf_train.py"


def train(root: Path, out: Path, *extra: str) -> str:
    return run_python(script=SCRIPT, args=[str(root), str(out), *extra], timeout=300).stdout


def spawn(root: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(SCRIPT), str(root), str(out), *extra], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def start_step(stdout: str) -> int:
    return int(next(line for line in stdout.splitlines() if line.startswith("START_STEP")).split()[1])


def batches(out: Path) -> dict[int, str]:
    return {int(k): v for k, v in json.loads(Path(str(out) + ".batches.json").read_text()).items()}


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("hf-straight")
    out = base / "final"
    assert start_step(train(base / "root", out)) == 0
    # Saves every 4 steps and the last step at the end of training; evaluations at 6, 12, 18, 24.
    assert assert_root_consistent(base / "root") == [4, 8, 12, 16, 20, 24, 25]
    return out


def assert_resumed_exactly(straight: Path, out: Path, stdout: str, step: int) -> None:
    assert start_step(stdout) == step
    assert_same(straight, out)  # parameters, optimizer, scheduler, log history, next random draws
    seen = batches(out)
    assert sorted(seen) == list(range(step + 1, 26))
    assert seen == {s: d for s, d in batches(straight).items() if s > step}  # the same batch at every step


def test_killed_at_an_epoch_end_then_mid_epoch_after_an_evaluation_resumes_bit_identical(tmp_path: Path,
                                                                                         straight: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "final"
    # Step 10 ends the first epoch (10 batches each): the next epoch's loader draws its workers' seed
    # from the global generator, which must be the checkpoint's when it does (where the Trainer
    # would load its rng_state.pth).
    kill_when(spawn(root, out, "--pause-at", "10", "--frequency", "2"), "READY")
    assert assert_root_consistent(root) == [2, 4, 6, 8, 10]
    # Resumed, then killed again at step 12: 2 batches into the second epoch, right after the
    # Trainer's evaluation of step 12. The checkpoint must hold what step 13 starts from, after the
    # evaluation drew its own loader's seed from the global generator.
    seen = kill_when(spawn(root, out, "--pause-at", "12", "--frequency", "2"), "READY")
    assert assert_root_consistent(root) == [2, 4, 6, 8, 10, 12]
    assert not Path(str(out) + ".json").exists(), seen
    exp = next((root / "checkpoints").glob("*/")).name
    assert "eval_loss" in read_manifest(root, exp, 12)["metrics"]  # the evaluation of step 12 is its metric
    assert "eval_loss" not in read_manifest(root, exp, 10)["metrics"]

    stdout = train(root, out, "--frequency", "2")
    assert_resumed_exactly(straight, out, stdout, 12)
    # The directories the Trainer resumed from were deleted once restored; nothing temporary is left.
    assert list((root / "trainer").iterdir()) == []


def test_best_ref_ranks_the_checkpoints_by_their_evaluation(straight: Path) -> None:
    from weightslab.storage.manager import CheckpointManager

    root = straight.parent / "root"
    manager = CheckpointManager(root)
    exp = next((root / "checkpoints").glob("*/")).name
    losses = {s: read_manifest(root, exp, s)["metrics"].get("eval_loss") for s in (4, 8, 12, 16, 20, 24, 25)}
    assert [s for s, v in losses.items() if v is not None] == [12, 24, 25]  # (and at the end of training)
    best = manager.candidates(f"{exp}@best:eval_loss")[0]
    assert best.step == min((12, 24, 25), key=lambda s: losses[s])


MATERIALIZE = """
import sys, time
from pathlib import Path
import torch
from weightslab.integrations import transformers as wl_hf
from weightslab.storage import atomic

target = Path(sys.argv[1]) / "weightslab-0123456789abcdef-step-12"
wl_hf.materialize(target, {"w": torch.full((4,), 1.0)}, '{"global_step": 11}')
rename = atomic.DISK.replace
def replace(source, dest):
    if Path(dest) == target:  # the new directory is complete, about to become visible
        print("RENAMING", flush=True)
        time.sleep(600)
    rename(source, dest)
atomic.DISK.replace = replace
wl_hf.materialize(target, {"w": torch.full((4,), 2.0)}, '{"global_step": 12}')
"""


def test_a_resume_directory_is_never_visible_half_written(tmp_path: Path) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    proc = subprocess.Popen([sys.executable, "-c", MATERIALIZE, str(tmp_path)], env=child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when(proc, "RENAMING")  # killed after every file of the new directory was written and fsynced
    target = tmp_path / "weightslab-0123456789abcdef-step-12"
    assert not target.exists()  # never a half-written directory under the name the Trainer is given
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 2 and all(n.startswith(".tmp.") and n.endswith(target.name) for n in leftovers)
    assert get_last_checkpoint(str(tmp_path)) is None  # resume_from_checkpoint=True never picks them

    import torch
    from weightslab.integrations import transformers as wl_hf

    wl_hf.materialize(target, {"w": torch.full((4,), 3.0)}, '{"global_step": 12}')
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # the dead writer's siblings swept
    from safetensors.torch import load_file

    assert load_file(target / "model.safetensors")["w"].tolist() == [3.0] * 4
    assert json.loads((target / "trainer_state.json").read_text()) == {"global_step": 12}


def test_resume_from_needs_the_callback_starts_fresh_and_falls_back_from_a_damaged_latest(tmp_path: Path) -> None:
    stdout = run_python(f"""
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments
from weightslab.errors import ConfigError
from weightslab.integrations.transformers import WeightslabTrainerCallback, resume_from

model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32))
args = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, use_cpu=True, report_to=[], save_strategy="no")
try:
    resume_from(Trainer(model=model, args=args), "latest")
except ConfigError as exc:
    print("NO CALLBACK:", exc)
try:
    WeightslabTrainerCallback(resume="auto")
except ConfigError as exc:
    print("AUTO:", exc)
try:
    WeightslabTrainerCallback(checkpoint_frequency=0)
except ConfigError as exc:
    print("SETTING:", exc)
callback = WeightslabTrainerCallback(root_log_dir={str(tmp_path / 'root')!r}, checkpoint_frequency=2)
data = [{{"input_ids": torch.arange(1, 9), "labels": torch.tensor(i % 2)}} for i in range(8)]
trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
print("FRESH:", resume_from(trainer, "latest"))
trainer.args.max_steps = 4
trainer.train()  # checkpoints at steps 2 and 4

from pathlib import Path
packs = sorted(Path({str(tmp_path / 'root')!r}).glob("objects/*/*.safetensors"), key=lambda p: p.stat().st_mtime_ns)
with open(packs[-1], "r+b") as f:  # the save of step 4, damaged on disk
    f.seek(-64, 2)
    f.write(bytes(64))
print("FELL BACK TO:", Path(resume_from(trainer, "latest")).name)
from weightslab.errors import CorruptCheckpointError
exp = Path(resume_from(trainer, "latest")).name.split("-")[1]
try:
    resume_from(trainer, exp + "@4")
except CorruptCheckpointError as exc:
    print("EXACT REF:", type(exc).__name__)
""").stdout
    assert "NO CALLBACK: resume_from(trainer): the Trainer has no WeightslabTrainerCallback" in stdout
    assert "AUTO: WeightslabTrainerCallback(resume='auto')" in stdout and "resume_from(trainer, 'latest')" in stdout
    assert "SETTING: checkpoint_frequency must be a positive integer" in stdout
    assert "FRESH: None" in stdout
    # A damaged newest checkpoint: "latest" falls back to the newest that verifies, as system.resume does;
    # an exact ref to it raises.
    assert "FELL BACK TO: weightslab-" in stdout and stdout.split("FELL BACK TO: ")[1].split()[0].endswith("-step-2")
    assert "EXACT REF: CorruptCheckpointError" in stdout


def test_import_needs_transformers_only_when_used() -> None:
    stdout = run_python("""
import sys
import weightslab, weightslab.integrations
print("LOADED:", sorted(m for m in ("transformers", "accelerate", "lightning") if m in sys.modules))
sys.modules["transformers"] = None  # as if it were not installed
try:
    import weightslab.integrations.transformers
except ImportError as exc:
    print("ERROR:", exc)
""").stdout
    assert "LOADED: []" in stdout
    assert "ERROR: weightslab.integrations.transformers needs the Hugging Face transformers package" in stdout
    assert "pip install 'weightslab[transformers]'" in stdout
