"""The lossy archive tier end to end: which checkpoints retention demotes (a pure plan), what a demoted
checkpoint holds on a real root, resuming, loading and exporting one, the command line, and a real
SIGKILL during demotion. The codecs themselves are tested in tests/test_lossy.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab.retention import (ANCHOR_LABEL, ARCHIVED_LABEL, RING_LABEL, CheckpointRecord, KeepEvery, KeepLast,
                                  Retention)
from weightslab.storage.archive import Archive
from weightslab.storage.layout import Layout
from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import child_env, read_manifest, run_cli, run_python

# --- the plan (pure) ---------------------------------------------------------------------------------


def _records(steps, archived=()):
    """One experiment's records at ``steps``; those in ``archived`` (step -> chain) already archived."""
    archived = dict(archived)
    return [CheckpointRecord("e", s, created_ns=s, exact=s not in archived, chain=archived.get(s, 0)) for s in steps]


@pytest.mark.parametrize("steps, archived, policies, max_chain, demote, why", [
    # nothing older than the ring: nothing to do
    ([1, 2], {}, (KeepLast(n=1),), 16, [], {1: RING_LABEL, 2: RING_LABEL}),
    # the oldest stays exact as the start of the chain; the rest chain on it
    ([1, 2, 3, 4, 5], {}, (KeepLast(n=1),), 16, [(2, 1, 1), (3, 2, 2)], {1: ANCHOR_LABEL, 2: ARCHIVED_LABEL}),
    # a kept checkpoint (every 3) restarts the chain
    ([1, 2, 3, 4, 5, 6, 7], {}, (KeepEvery(steps=3),), 16, [(1, None, 0), (2, 1, 1), (4, 3, 1), (5, 4, 2)],
     {3: "every 3 steps", 6: RING_LABEL}),
    # chains continue from what is archived already, up to max_chain; then from the nearest exact one
    ([1, 2, 3, 4, 5, 6, 7], {2: 1, 3: 2}, (KeepLast(n=1),), 3, [(4, 3, 3), (5, 1, 1)], {3: ARCHIVED_LABEL}),
])
def test_the_plan_demotes_in_order_against_the_checkpoint_before(steps, archived, policies, max_chain, demote, why):
    plan = Retention(policies=policies, archive=Archive.of("lc", max_chain=max_chain)).plan(_records(steps, archived))
    got = [(d.record.step, d.base.step, d.chain) for d in plan.demote]
    expected = [d for d in demote if d[1] is not None]
    assert got == expected
    assert not plan.delete  # an archive deletes nothing it can demote
    for step, label in why.items():
        assert label in plan.why[f"e@{step}"], plan.why
    if (1, None, 0) in demote:  # step 1 has nothing exact before it: it stays exact as the anchor
        assert ANCHOR_LABEL in plan.why["e@1"]
    assert plan.keep_refs[-2:] == tuple(f"e@{s}" for s in steps[-2:])  # the ring is never demoted


def test_the_plan_never_demotes_the_ring_nor_what_a_policy_keeps():
    records = _records(range(1, 21))
    plan = Retention(policies=(KeepEvery(steps=5), KeepLast(n=1)), archive=Archive.of("excp", ring=3)).plan(records)
    demoted = {d.record.step for d in plan.demote}
    assert demoted.isdisjoint({5, 10, 15, 20, 18, 19})
    assert demoted == set(range(1, 21)) - {1, 5, 10, 15, 18, 19, 20}  # 1: the anchor of the first chain
    assert all(d.base.step == d.record.step - 1 for d in plan.demote)


def test_what_cannot_be_archived_is_deleted_as_without_an_archive():
    records = [CheckpointRecord("e", s, created_ns=s, archivable=s != 3) for s in range(1, 7)]
    plan = Retention(policies=(KeepLast(n=1),), archive=Archive.of("lc")).plan(records)
    assert plan.delete_refs == ("e@3",)
    assert [(d.record.step, d.base.step) for d in plan.demote] == [(2, 1), (4, 2)]


@pytest.mark.parametrize("make, words", [
    (lambda: Archive.of("zip"), ["'lc'", "'excp'"]),
    (lambda: Archive.of("lc", bits=0), ["bits", "1", "8"]),
    (lambda: Archive.of("lc", bits=9), ["bits", "1", "8"]),
    (lambda: Archive.of("lc", colour=3), ["colour", "bits"]),
    (lambda: Archive.of("lc", ring=1), ["ring", "2"]),
    (lambda: Archive.of("lc", max_chain=0), ["max_chain", "1", "64"]),
    (lambda: Archive.of("lc", optimizer="maybe"), ["'lossy'", "'exact'"]),
    (lambda: Retention(policies=(KeepLast(n=2),), archive="lc"), ["Archive.of"]),
])
def test_bad_archive_settings_name_the_allowed_values(make, words):
    with pytest.raises(ValueError) as info:
        make()
    assert all(w in str(info.value) for w in words), str(info.value)


# --- a real root ---------------------------------------------------------------------------------


def _train(root: Path, steps: int, retention: Retention | None, *, seed: int = 0):
    """Train a small classifier with Adam, a checkpoint at every step; return the system (open), and
    a copy of the exact state (model + optimizer tensors by manifest key) after each step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 96), nn.ReLU(), nn.Linear(96, 8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    system = wl.get_checkpoint_system(root_log_dir=str(root), checkpoint_frequency=1, retention=retention)
    wl.register_model(model)
    wl.register_optimizer(opt)
    x, y = torch.randn(128, 32), torch.randint(0, 8, (128,))
    exact = {}
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        system.checkpoint_on_step(step, metrics={"loss": loss.item()})
        state = {f"models/main/{k}": v.detach().clone() for k, v in model.state_dict().items()}
        for i, s in opt.state_dict()["state"].items():
            state.update({f"optimizers/main/state/{i}/{k}": v.clone() for k, v in s.items()})
        exact[step] = state
    system.wait()
    return system, exact


@pytest.fixture
def archived_root(root):
    """12 steps, every 4th and the last 2 kept exact, the rest archived with lc."""
    retention = Retention(policies=(KeepEvery(steps=4),), archive=Archive.of("lc"))
    system, exact = _train(root, 12, retention)
    yield root, system, exact
    system.close()


def test_demoted_checkpoints_say_what_they_are_and_decode_within_their_recorded_errors(archived_root):
    root, system, exact = archived_root
    exp = system.experiment_hash
    manager = CheckpointManager(root)
    demoted = []
    for step in range(1, 13):
        body = read_manifest(root, exp, step)
        manifest = manager.read_manifest(manager.layout.manifest(exp, step))
        tensors = load_tensors(manager, manifest)
        if step in (1, 4, 8, 11, 12):  # the anchor, every 4th, the ring: exact, bit for bit
            assert body.get("exact", True) and body["format_version"] in (2, 3) and manifest.exact
            for key, value in exact[step].items():
                assert torch.equal(tensors[key], value), (step, key)
            continue
        demoted.append(step)
        assert body["exact"] is False and body["format_version"] == 4 and not manifest.exact
        assert body["archive"]["codec"] == "lc" and body["archive"]["params"] == Archive.of("lc").codec.to_json()
        lossy = {k: t for k, t in body["tensors"].items() if t.get("exact", True) is False}
        assert any(k.startswith("models/") for k in lossy) and any(k.endswith("exp_avg_sq") for k in lossy)
        for key, entry in lossy.items():
            diff = (tensors[key].double() - exact[step][key].double())
            # the recorded error is the real one (float32 rounding of the comparison aside)
            assert float(diff.abs().max()) == pytest.approx(entry["error"]["max_abs"], rel=1e-5, abs=1e-12), key
            norm = float(exact[step][key].double().norm())
            assert float(diff.norm()) / norm == pytest.approx(entry["error"]["rel_l2"], rel=1e-4, abs=1e-9), key
            if key.endswith("exp_avg_sq"):
                assert bool((tensors[key] >= 0).all()), key
        # what is not lossy is exact (steps, and anything the codec would not shrink)
        for key in set(exact[step]) - set(lossy):
            assert torch.equal(tensors[key], exact[step][key]), (step, key)
    assert demoted == [2, 3, 5, 6, 7, 9, 10]
    # chains restart at each exact checkpoint
    assert [read_manifest(root, exp, s)["archive"]["chain"] for s in demoted] == [1, 2, 1, 2, 3, 1, 2]
    assert read_manifest(root, exp, 5)["archive"]["base"] == f"{exp}@4"


def test_archived_blobs_are_verified_and_kept_by_gc(archived_root):
    root, system, _ = archived_root
    exp = system.experiment_hash
    report = wl.verify(root=root)
    assert report.ok and len(report.checked) == 12
    before = wl.load(f"{exp}@7", root=root)
    wl.gc(root=root, grace_seconds=0)  # the exact bytes only the demoted manifests held are gone ...
    after = wl.load(f"{exp}@7", root=root)  # ... and every archived checkpoint still decodes the same
    assert all(torch.equal(before["models"]["main"][k], v) for k, v in after["models"]["main"].items())
    assert wl.verify(root=root).ok
    # a flipped byte in a payload is found by verify, like in any blob
    manifest = read_manifest(root, exp, 7)
    link = next(t for t in manifest["tensors"].values() if t.get("exact", True) is False)["links"][-1]["blob"]
    pack = Layout(root).pack(link["pack"])
    data = bytearray(pack.read_bytes())
    data[link["offset"] + link["nbytes"] // 2] ^= 0x10
    pack.write_bytes(bytes(data))
    report = wl.verify(root=root)
    assert not report.ok and f"{exp}@7" in dict(report.damaged)


def test_resuming_an_archived_checkpoint_is_refused_unless_accepted_by_name(archived_root):
    root, system, exact = archived_root
    exp = system.experiment_hash
    with pytest.raises(wl.LossyCheckpointError) as info:
        system.resume(f"{exp}@6")
    message = str(info.value)
    assert f"{exp}@6" in message and "allow_lossy=True" in message and f"'{exp}@4'" in message
    assert info.value.nearest == f"{exp}@4" and isinstance(info.value, ValueError)
    model = wl.get_model()
    assert torch.equal(model[0].weight.detach(), exact[12]["models/main/0.weight"])  # nothing changed
    # "latest" never lands on an archived checkpoint
    assert system.resume("latest") == 12
    step = system.resume(f"{exp}@6", allow_lossy=True)
    assert step == 6 and system.experiment_hash != exp
    loaded = wl.load(f"{exp}@6", root=root)
    assert torch.equal(model[0].weight.detach(), loaded["models"]["main"]["0.weight"])
    system.wait()
    child = system.experiment_hash
    record = json.loads((root / "checkpoints" / child / "experiment.json").read_text())
    assert record["parent"]["ref"] == f"{exp}@6" and record["parent"]["reason"] == "lossy_resume"
    assert "lossy archive" in record["parent"]["changes"][0] and "max abs" in record["parent"]["changes"][0]
    first = read_manifest(root, child, 6)  # the child starts with an exact checkpoint of what it resumed
    assert first["reasons"] == ["lossy_resume"] and first.get("exact", True)


def test_load_and_export_of_an_archived_checkpoint_say_it_is_lossy(archived_root, tmp_path, caplog):
    root, system, exact = archived_root
    exp = system.experiment_hash
    with caplog.at_level("WARNING", logger="weightslab.portable"):
        state = wl.load(f"{exp}@3", root=root)
    assert state["exact"] is False and state["archive"]["codec"] == "lc" and "lossy archive" in caplog.text
    assert wl.load(f"{exp}@4", root=root)["exact"] is True
    from safetensors import safe_open
    path = wl.export(f"{exp}@3", tmp_path / "w.safetensors", root=root)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        weight = f.get_tensor("0.weight")
    assert meta["weightslab.exact"] == "false" and json.loads(meta["weightslab.archive"])["codec"] == "lc"
    assert torch.equal(weight, state["models"]["main"]["0.weight"])
    assert not torch.equal(weight, exact[3]["models/main/0.weight"])  # (lossy indeed)
    with safe_open(str(wl.export(f"{exp}@4", tmp_path / "x.safetensors", root=root)), "pt") as f:
        assert "weightslab.exact" not in f.metadata()


def test_the_command_line_marks_archived_checkpoints(archived_root):
    root, system, _ = archived_root
    exp = system.experiment_hash
    system.close()
    ls = run_cli("ls", root=root)
    assert ls.returncode == 0 and "12~7" in ls.stdout, ls.stdout
    log = run_cli("log", root=root)
    assert "12 checkpoints (7 in the lossy archive)" in log.stdout, log.stdout
    show = run_cli("show", f"{exp}@6", root=root)
    assert "exact       no: lossy archive, lc" in show.stdout and "allow_lossy=True" in show.stdout, show.stdout
    shown = json.loads(run_cli("show", f"{exp}@6", "--json", root=root).stdout)
    assert shown["exact"] is False and shown["archive"]["chain"] == 2
    assert shown["errors"] and all(e["max_abs"] >= 0 and e["links"] in (1, 2) for e in shown["errors"].values())
    assert json.loads(run_cli("show", f"{exp}@8", "--json", root=root).stdout)["exact"] is True


def test_prune_archive_on_the_command_line(root):
    system, exact = _train(root, 8, None)
    exp = system.experiment_hash
    system.close()
    bad = run_cli("prune", "--keep-last", "2", "--archive", "lc", "--bits", "12", root=root)
    assert bad.returncode == 2 and "bits" in bad.stderr and "1 to 8" in bad.stderr, bad.stderr
    zero = run_cli("prune", "--keep-last", "2", "--archive", "lc", "--max-chain", "0", root=root)
    assert zero.returncode == 2 and "max_chain must be an int from 1 to 64, got 0" in zero.stderr, zero.stderr
    lonely = run_cli("prune", "--keep-last", "2", "--bits", "3", root=root)
    assert lonely.returncode == 2 and "--archive" in lonely.stderr
    dry = run_cli("prune", "--keep-last", "2", "--archive", "excp", "--dry-run", "--json", root=root)
    assert json.loads(dry.stdout)["archive"] == [f"{exp}@{s}" for s in range(2, 7)]
    assert all(read_manifest(root, exp, s).get("exact", True) for s in range(1, 9))  # (a dry run changes nothing)
    done = run_cli("prune", "--keep-last", "2", "--archive", "excp", "--optimizer", "exact", root=root)
    assert done.returncode == 0 and "archived 5 with excp(" in done.stdout, done.stdout + done.stderr
    for step in range(2, 7):
        body = read_manifest(root, exp, step)
        assert body["exact"] is False and body["archive"]["optimizer"] == "exact"
        # optimizer state kept exact: byte for byte what was saved
        state = wl.load(f"{exp}@{step}", root=root)["optimizers"]["main"]["state"]
        assert torch.equal(state[0]["exp_avg_sq"], exact[step]["optimizers/main/state/0/exp_avg_sq"])
    assert run_cli("verify", root=root).returncode == 0


def test_a_root_with_archives_is_listed_and_archived_without_torch(archived_root):
    root, system, _ = archived_root
    system.close()
    out = run_python(f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
from weightslab.cli import main
for command in (["ls"], ["log"], ["reindex"], ["ls", "--json"], ["prune", "--keep-last", "2", "--archive", "lc"]):
    assert main(["--root", {str(root)!r}, *command]) == 0, command
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
""").stdout
    assert out.strip().endswith("ok")
    assert wl.verify(root=root).ok


# --- a SIGKILL during demotion -------------------------------------------------------------------

_DEMOTE = """
import sys, time
from weightslab.storage import archive
from weightslab.maintenance import prune
real = archive.atomic_write
def slow(path, data, **kw):  # between the payloads' pack (written, fsynced) and the manifest's rename
    print("PACKED", path.name, flush=True)
    time.sleep(float(sys.argv[2]))
    real(path, data, **kw)
    print("REPLACED", path.name, flush=True)
archive.atomic_write = slow
prune(keep_last=2, archive=sys.argv[3], root=sys.argv[1])
print("DONE", flush=True)
"""


def _kill_at(root: Path, marker: str, nth: int, codec: str = "lc") -> list[str]:
    proc = subprocess.Popen([sys.executable, "-c", _DEMOTE, str(root), "0.5", codec], env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line.strip())
        if sum(x.startswith(marker) for x in seen) == nth:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, seen, proc.stderr.read() if proc.stderr else "")
    proc.stdout.close()
    proc.stderr.close()
    return seen


def test_a_sigkill_during_demotion_leaves_every_checkpoint_exact_or_archived_and_verified(root):
    system, exact = _train(root, 9, None)
    exp = system.experiment_hash
    system.close()
    # killed after the payloads of the 2nd demotion are durable, before its manifest is replaced
    seen = _kill_at(root, "PACKED", 2)
    assert sum(x.startswith("REPLACED") for x in seen) == 1
    states = [read_manifest(root, exp, s).get("exact", True) for s in range(1, 10)]
    assert states == [True, False, True, True, True, True, True, True, True]  # 2 demoted, 3 still exact
    orphans_before = len(list((root / "objects").rglob("*")))
    # killed right after the 3rd replace of a second run: steps 3-5 demoted too, the rest exact; all verify, all load
    _kill_at(root, "REPLACED", 3)
    states = [read_manifest(root, exp, s).get("exact", True) for s in range(1, 10)]
    assert states == [True, False, False, False, False, True, True, True, True]
    report = wl.verify(root=root)
    assert report.ok and len(report.checked) == 9, report
    manager = CheckpointManager(root)
    for step in range(1, 10):
        manifest = manager.read_manifest(manager.layout.manifest(exp, step))
        tensors = load_tensors(manager, manifest)
        for key, value in exact[step].items():
            if manifest.exact or manifest.tensors[key].exact:
                assert torch.equal(tensors[key], value), (step, key)
            else:
                err = float((tensors[key].double() - value.double()).abs().max())
                assert err == pytest.approx(manifest.tensors[key].max_abs, rel=1e-5, abs=1e-12)
    assert orphans_before > 0
    # a run to the end finishes the job from where the kills left it
    proc = subprocess.run([sys.executable, "-c", _DEMOTE, str(root), "0", "lc"], env=child_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stderr
    assert [read_manifest(root, exp, s).get("exact", True) for s in range(1, 10)] == [True] + [False] * 6 + [True] * 2
    assert wl.verify(root=root).ok
    assert np.isfinite([read_manifest(root, exp, s)["archive"]["max_abs"] for s in range(2, 8)]).all()


def test_a_slow_demotion_never_holds_up_the_next_saves(root, monkeypatch):
    """Demotions run on their own thread (weightslab-archiver): while one is held back, later saves
    are still written; once it goes on, every pass queued meanwhile has been done."""
    import threading
    import time

    from weightslab.storage.archive import Demoter
    from weightslab.storage.layout import Layout

    entered, gate, threads = threading.Event(), threading.Event(), set()
    real = Demoter._demote

    def held(self, demotion):
        threads.add(threading.current_thread().name)
        entered.set()
        assert gate.wait(60)
        return real(self, demotion)

    monkeypatch.setattr(Demoter, "_demote", held)
    torch.manual_seed(0)
    system = wl.get_checkpoint_system(root_log_dir=str(root), checkpoint_frequency=1,
                                      retention=Retention(policies=(KeepLast(n=2),), archive=Archive.of("lc")))
    model = wl.register_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)))
    opt = wl.register_optimizer(torch.optim.Adam(model.parameters(), lr=1e-2))
    x = torch.randn(64, 32)

    def step(i):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        system.checkpoint_on_step(i)

    for i in range(1, 5):
        step(i)
    assert entered.wait(30)  # the demotion of step 2 has started, and is held
    for i in range(5, 9):
        step(i)
    exp, layout = system.experiment_hash, Layout(root)
    deadline = time.monotonic() + 30
    while not layout.manifest(exp, 8).exists():  # written while the demotion is held
        assert time.monotonic() < deadline, "the saves waited for the demotion"
        time.sleep(0.05)
    gate.set()
    system.wait()
    assert threads == {"weightslab-archiver"}
    assert [read_manifest(root, exp, s).get("exact", True) for s in range(1, 9)] == [True] + [False] * 5 + [True] * 2
    system.close()


def test_a_manual_sgd_loop_with_an_ema_copy_is_archived_within_its_recorded_errors(root):
    """Written the way real scripts write tensors: parameters moved through ``.data`` (no optimizer),
    an EMA ``copy.deepcopy`` of the model registered as a second model and updated through numpy
    views, the model saved whole with torch.save. Each archived checkpoint decodes both models within
    the errors its manifest records; the ring resumes bit for bit."""
    import copy
    import io

    torch.manual_seed(0)
    system = wl.get_checkpoint_system(root_log_dir=str(root), checkpoint_frequency=1,
                                      retention=Retention(policies=(KeepLast(n=2),), archive=Archive.of("lc")))
    model = wl.register_model(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 4)))
    ema = copy.deepcopy(model)
    wl.register_model("ema", ema)
    x, y = torch.randn(64, 32), torch.randn(64, 4)
    live = {}
    for step in range(1, 9):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-0.05)  # manual SGD
        for e, p in zip(ema.parameters(), model.parameters()):
            view = e.detach().numpy()  # written through a numpy view of the EMA copy
            view *= 0.9
            view += 0.1 * p.detach().numpy()
        system.checkpoint_on_step(step)
        live[step] = {f"models/{name}/{k}": v.detach().clone() for name, m in (("main", model), ("ema", ema))
                      for k, v in m.state_dict().items()}
    torch.save(model, io.BytesIO())  # (a registered model still pickles whole)
    system.wait()
    exp = system.experiment_hash
    manager = CheckpointManager(root)
    archived = 0
    for step in range(1, 9):
        manifest = manager.read_manifest(manager.layout.manifest(exp, step))
        tensors = load_tensors(manager, manifest)
        for key, value in live[step].items():
            entry = manifest.tensors[key]
            if entry.exact:
                assert torch.equal(tensors[key], value), (step, key)
            else:
                archived += 1
                err = float((tensors[key].double() - value.double()).abs().max())
                assert err == pytest.approx(entry.max_abs, rel=1e-5, abs=1e-12), (step, key)
    assert archived > 0 and [manifest.exact for manifest in
                             (manager.read_manifest(manager.layout.manifest(exp, s)) for s in (1, 7, 8))] == [True] * 3
    assert system.resume("latest") == 8
    assert all(torch.equal(v, live[8][f"models/main/{k}"]) for k, v in model.state_dict().items())
    system.close()


def test_optimizer_state_no_codec_can_bound_stays_exact_and_archiving_goes_on(root):
    """A field named like a second moment that holds negative values is coded as a plain moment, and a
    tensor with NaN in it (or in the checkpoint before) stays exact: the demotion neither fails nor
    retries forever."""
    torch.manual_seed(0)
    system = wl.get_checkpoint_system(root_log_dir=str(root), checkpoint_frequency=1,
                                      retention=Retention(policies=(KeepLast(n=2),), archive=Archive.of("lc")))
    model = wl.register_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)))
    opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    x = torch.randn(64, 32)
    first = next(model.parameters())
    for step in range(1, 7):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
        opt.state[first]["exp_avg_sq"] = -torch.rand_like(first)  # a custom field, negative
        trace = torch.full_like(first, 0.1 * step)  # another custom field (training never reads either)
        if step == 2:
            trace[0, 0] = float("nan")  # checkpoint 2 holds a NaN; 3 is finite, but the one before is not
        opt.state[first]["trace"] = trace
        system.checkpoint_on_step(step)
    system.wait()  # (would raise the kept error of a demotion that failed)
    exp = system.experiment_hash
    for step in (2, 3, 4):
        body = read_manifest(root, exp, step)
        assert body["exact"] is False, step
        trace, custom = (body["tensors"][f"optimizers/main/state/0/{k}"] for k in ("trace", "exp_avg_sq"))
        assert trace.get("exact", True) == (step in (2, 3)), step  # NaN in it, or in the one before
        assert custom.get("exact", True) is False  # coded, as a plain moment
        state = wl.load(f"{exp}@{step}", root=root)["optimizers"]["main"]["state"][0]
        assert bool(torch.isnan(state["trace"][0, 0])) == (step == 2)
        assert float(state["exp_avg_sq"].min()) < 0.0  # (not coded as a second moment: those never go below 0)
    system.close()


_SHARED = r"""
import sys, time, torch
from torch import nn
import weightslab as wl
from weightslab.retention import KeepLast, Retention
system = wl.get_checkpoint_system(root_log_dir=sys.argv[1], checkpoint_frequency=1, save_on_close=False,
                                  retention=Retention(policies=(KeepLast(n=2),), archive=wl.Archive.of("lc")))
torch.manual_seed(0)
model = wl.register_model(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 8)))
opt = wl.register_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
x = torch.randn(128, 64)
for step in range(1, 31):
    opt.zero_grad(); model(x).pow(2).mean().backward(); opt.step()
    wl.checkpoint_on_step(step)
    time.sleep(0.02)
system.close()
print("DONE")
"""


def test_a_training_run_and_prune_archive_from_another_process_share_a_root(root):
    """The training process archives after each save while `weightslab prune --archive` runs on the
    same root from another process, again and again: both may demote the same checkpoint; every
    checkpoint ends exact or archived, verified, and decodes."""
    trainer = subprocess.Popen([sys.executable, "-c", _SHARED, str(root)], env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pruned = 0
    while trainer.poll() is None:
        if (root / "checkpoints").is_dir():
            proc = run_cli("prune", "--keep-last", "2", "--archive", "lc", root=root)
            assert proc.returncode in (0, 3), proc.stderr  # (3: the root's first files are not there yet)
            pruned += proc.returncode == 0
    out, err = trainer.communicate()
    assert trainer.returncode == 0 and "DONE" in out, err
    assert pruned >= 2
    report = wl.verify(root=root)
    assert report.ok and len(report.checked) == 30, report
    manager = CheckpointManager(root)
    exact = [manager.read_manifest(e).exact for e in manager.checkpoints()]
    assert exact[0] and exact[-2:] == [True, True] and not any(exact[1:-2])
    for entry in manager.checkpoints():
        load_tensors(manager, manager.read_manifest(entry))  # every one decodes, every byte verified
