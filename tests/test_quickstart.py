"""The README's main example runs as written and leaves the lineage it describes."""

from __future__ import annotations

from pathlib import Path

from weightslab.storage.manager import CheckpointManager
from weightslab.tensors import load_tensors

from .support import REPO, run_python


def test_quickstart_trains_changes_crashes_resumes_and_reports(tmp_path: Path) -> None:
    root = tmp_path / "qs"
    proc = run_python(script=REPO / "examples" / "quickstart.py", env={"WEIGHTSLAB_ROOT": str(root)},
                      cwd=tmp_path, timeout=300)
    out = proc.stdout
    assert "the training process died with exit status -9" in out
    assert "resumed from" in out and "@40" in out  # the newest checkpoint before the kill at step 47
    assert "finished step 60" in out
    assert f"Checkpoints are under {root}" in out
    assert out.rstrip().endswith(f"weightslab ui --root {root}")  # it ends by saying how to see the runs

    manager = CheckpointManager(root)
    records = {h: manager.read_experiment(h) for h in manager.experiments()}
    assert len(records) == 3
    roots = [h for h, r in records.items() if r.parent is None]
    assert len(roots) == 1
    by_parent = {r.parent.experiment: (h, r.parent) for h, r in records.items() if r.parent}
    lr_child, lr_link = by_parent[roots[0]]
    assert lr_link.reason == "config_change" and lr_link.step == 19
    arch_child, arch_link = by_parent[lr_child]
    assert arch_link.reason == "model_change" and arch_link.step == 34
    steps = {h: [e.step for e in manager.checkpoints([h])] for h in records}
    assert steps == {roots[0]: [10], lr_child: [20, 30], arch_child: [35, 40, 50, 60]}
    for entry in manager.checkpoints():  # everything on disk verifies
        load_tensors(manager, manager.read_manifest(entry))
