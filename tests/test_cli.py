"""The `weightslab` console script, run for real in subprocesses against roots made by real training."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from weightslab.storage.manager import CheckpointManager

from .support import REPO, run_cli, run_python

TRAIN = r'''
import sys, torch
from torch import nn
import weightslab as wl
root = sys.argv[1]
system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=5, save_on_close=False)
config = wl.register_hyperparams("config", {"optimizer": {"lr": 0.1}, "width": 8})
torch.manual_seed(0)
model = wl.register_model(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1)))
opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
x, y = torch.randn(64, 4), torch.randn(64, 1)
def train(first, last):
    for step in range(first, last + 1):
        opt.zero_grad(); loss = nn.functional.mse_loss(model(x), y); loss.backward(); opt.step()
        wl.checkpoint_on_step(step, metrics={"loss": loss.item()})
train(1, 20)
base = system.name_experiment("baseline")
config["optimizer"]["lr"] = 0.01          # a config change: a child experiment
train(21, 30)
wl.fork(f"{base}@10", name="sweep", optimizer__lr=0.05)   # a named fork from step 10
train(11, 25)
system.close()
print(base)
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("cli") / "root"
    proc = run_python(TRAIN, args=[str(root)], timeout=300)
    return root, proc.stdout.strip().splitlines()[-1]


def _fits(text: str) -> None:
    long = [line for line in text.splitlines() if len(line) > 80]
    assert long == [], long


# --- listing ---------------------------------------------------------------------------------------------
def test_ls_lists_every_experiment_with_its_lineage_and_sizes(trained):
    root, base = trained
    proc = run_cli("ls", root=root)
    assert proc.returncode == 0, proc.stderr
    _fits(proc.stdout)
    assert "\033[" not in proc.stdout  # not a terminal: no colour
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["HASH", "NAME", "PARENT", "REASON", "STEPS", "CKPTS", "ALONE", "BEST"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert len(rows) == 3
    assert rows[base[:8]][1:6] == ["baseline", "-", "-", "5-20", "4"]
    reasons = sorted(r[3] for r in rows.values())
    assert reasons == ["-", "config", "fork"]
    data = json.loads(run_cli("ls", "--json", root=root).stdout)
    by_hash = {r["hash"]: r for r in data}
    manager = CheckpointManager(root)
    for h in manager.experiments():
        steps = [e.step for e in manager.checkpoints([h])]
        assert by_hash[h]["checkpoints"] == len(steps) and by_hash[h]["last_step"] == max(steps)
    fork = next(r for r in data if r["reason"] == "fork")
    assert fork["names"] == ["sweep"] and fork["parent"] == f"{base}@10" and fork["first_step"] == 10
    assert all(r["bytes_alone"] > 0 for r in data)


def test_log_draws_the_lineage_with_reasons(trained):
    root, base = trained
    proc = run_cli("log", root=root)
    assert proc.returncode == 0, proc.stderr
    _fits(proc.stdout)
    out = proc.stdout
    assert out.startswith(f"* {base[:8]} (baseline)")
    assert "config_change at" in out and "config.optimizer.lr: 0.1 -> 0.01" in out
    assert f"fork at {base[:8]}@10: config.optimizer.lr: 0.1 -> 0.05" in out
    assert out.count("|-- * ") + out.count("`-- * ") == 2
    sweep = run_cli("log", "sweep@latest", "--json", root=root)
    tree = json.loads(sweep.stdout)
    assert {t["reason"] for t in tree} == {None, "fork"}  # its ancestor and itself, not the config child


def test_show_diff_and_resume_info(trained):
    root, base = trained
    show = run_cli("show", "baseline@best:loss", root=root)
    assert show.returncode == 0, show.stderr
    _fits(show.stdout)
    assert f"checkpoint {base}@20  (baseline)" in show.stdout  # the loss falls: the last one is best
    assert "lr: 0.1" in show.stdout and "Linear(in_features=4, out_features=8, bias=True)" in show.stdout
    info = json.loads(run_cli("show", "sweep@15", "--json", root=root).stdout)
    assert info["step"] == 15 and info["hyperparams"]["config"]["optimizer"]["lr"] == 0.05
    assert info["parent"]["reason"] == "fork" and info["branch"] == "sweep"

    diff = run_cli("diff", f"{base}@10", "sweep@15", root=root)
    assert diff.returncode == 0, diff.stderr
    assert "config.optimizer.lr: 0.1 -> 0.05" in diff.stdout and "(the same)" in diff.stdout
    data = json.loads(run_cli("diff", f"{base}@10", "sweep@10", "--json", root=root).stdout)
    assert data["hyperparams"] == ["config.optimizer.lr: 0.1 -> 0.05"]
    assert {t["relative_l2"] for t in data["tensors"]} == {0.0}  # the fork starts from those very weights
    moved = json.loads(run_cli("diff", f"{base}@10", f"{base}@20", "--json", root=root).stdout)
    assert all(t["relative_l2"] > 0 for t in moved["tensors"]) and len(moved["tensors"]) == 4

    resume = run_cli("resume-info", "sweep@latest", root=root)
    assert resume.returncode == 0
    assert "restores step 25; the loop continues at step 26" in resume.stdout
    assert "optimizers        main" in resume.stdout


# --- checking, cleaning, exporting ------------------------------------------------------------------------
def test_verify_names_every_damaged_file_and_exits_1(trained, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(trained[0], root)
    ok = run_cli("verify", root=root)
    assert ok.returncode == 0 and "all verify" in ok.stdout
    packs = sorted((root / "objects").rglob("*.safetensors"))
    victim = packs[len(packs) // 2]
    data = bytearray(victim.read_bytes())
    data[-5] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = run_cli("verify", root=root)
    assert bad.returncode == 1
    assert "damaged" in bad.stdout and victim.name in bad.stdout
    report = json.loads(run_cli("verify", "--json", root=root).stdout)
    assert report["ok"] is False and all(victim.name in d["problem"] for d in report["damaged"])


def test_prune_then_gc_show_what_goes_and_the_bytes(trained, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(trained[0], root)
    before = CheckpointManager(root).checkpoints()
    dry = run_cli("prune", "--keep-last", "1", "--dry-run", root=root)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith(f"would delete {len(before) - 3} of {len(before)} checkpoints")
    assert len(CheckpointManager(root).checkpoints()) == len(before)  # a dry run changes nothing
    done = run_cli("prune", "--keep-last", "1", "--json", root=root)
    plan = json.loads(done.stdout)
    assert len(plan["delete"]) == len(before) - 3 and plan["bytes_freed_by_gc"] > 0
    assert len(CheckpointManager(root).checkpoints()) == 3
    gc = run_cli("gc", "--grace", "0", "--json", root=root)
    assert gc.returncode == 0 and json.loads(gc.stdout)["bytes_freed"] > 0
    assert run_cli("verify", root=root).returncode == 0
    ls = json.loads(run_cli("ls", "--json", root=root).stdout)
    assert sorted(r["checkpoints"] for r in ls) == [1, 1, 1]


def test_export_writes_a_standard_file(trained, tmp_path):
    root, base = trained
    out = tmp_path / "w.safetensors"
    proc = run_cli("export", "baseline@20", str(out), root=root)
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file
    weights = load_file(str(out))
    assert set(weights) == {"0.weight", "0.bias", "2.weight", "2.bias"}


# --- errors and exit codes -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, code, says", [
    (["show", "nobody@3"], 4, "no experiment is named 'nobody'"),
    (["show", "baseline@999"], 4, "no checkpoint at step 999"),
    (["show", "abc@x@y"], 2, "cannot read checkpoint ref"),
    (["prune"], 2, "prune needs a policy"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_errors_are_one_line_with_a_documented_exit_code(trained, args, code, says):
    proc = run_cli(*args, root=trained[0])
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert says in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("weightslab: error:")


def test_not_a_root_and_a_corrupt_manifest(trained, tmp_path):
    proc = run_cli("ls", "--root", str(tmp_path))
    assert proc.returncode == 3 and "is not a weightslab root" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    root = tmp_path / "copy"
    shutil.copytree(trained[0], root)
    entry = CheckpointManager(root).checkpoints()[0]
    entry.path.write_text(entry.path.read_text().replace('"step"', '"stop"', 1))
    proc = run_cli("show", entry.ref, root=root)
    assert proc.returncode == 5 and entry.path.name in proc.stderr
    listing = run_cli("ls", root=root)  # the listing survives a damaged manifest
    assert listing.returncode == 0


def test_help_documents_exit_codes_and_python_m_works(trained):
    proc = run_cli("verify", "--help")
    assert proc.returncode == 0 and "exit codes:" in proc.stdout and "3  the root is not a weightslab root" in proc.stdout
    via_m = subprocess.run([sys.executable, "-m", "weightslab", "ls", "--json", "--root", str(trained[0])],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert via_m.returncode == 0 and json.loads(via_m.stdout) == json.loads(
        run_cli("ls", "--json", root=trained[0]).stdout)


def test_colour_only_when_asked_or_on_a_terminal(trained):
    plain = run_cli("ls", root=trained[0]).stdout
    painted = run_cli("ls", "--color", "always", root=trained[0]).stdout
    assert "\033[1m" in painted and "\033[" not in plain
    assert run_cli("ls", "--color", "always", root=trained[0], env={"NO_COLOR": "1"}).stdout == painted


def test_ls_best_column_for_a_metric_where_higher_is_better(trained):
    root, base = trained
    low = run_cli("ls", "--json", root=root)
    rows = {r["hash"]: r for r in json.loads(low.stdout)}
    assert rows[base]["highest"]["loss"] >= rows[base]["best"]["loss"]
    table = run_cli("ls", "--metric", "loss:max", root=root).stdout
    line = next(line for line in table.splitlines() if line.startswith(base[:8]))
    assert line.split()[-2:] == ["loss", f"{rows[base]['highest']['loss']:.4g}"]
