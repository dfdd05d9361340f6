"""Tests of weightslab/catalog.py: the SQLite index of a root, on roots made by real training runs."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import weightslab as wl
from weightslab import codec
from weightslab.cli import catalog as catalog_module
from weightslab.cli.catalog import SCHEMA_VERSION, Catalog, CheckpointRow
from weightslab.storage.manager import CheckpointManager


# --- roots made by training --------------------------------------------------------------------------
def train(root: Path, *, steps: int = 6, lr: float = 0.1, change_lr_at: int | None = None,
          loss: Callable[[int], float] = lambda step: 1.0 / step, fork: dict | None = None) -> str:
    """One run: Linear(3, 2) + SGD, a checkpoint every 2 steps with metrics loss and acc; the
    hyperparameter lr set to 0.01 at ``change_lr_at`` (a child experiment); then, if ``fork`` is
    given, ``wl.fork(**fork)`` (one checkpoint, reason fork). Returns the first experiment's hash."""
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=2, save_on_close=False)
    try:
        hp = wl.register_hyperparams({"lr": lr})
        torch.manual_seed(0)
        model = wl.register_model(nn.Linear(3, 2))
        opt = wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=lr))
        first = None
        for step in range(1, steps + 1):
            if step == change_lr_at:
                hp["lr"] = 0.01
            opt.zero_grad()
            model(torch.randn(2, 3)).sum().backward()
            opt.step()
            wl.checkpoint_on_step(step, metrics={"loss": loss(step), "acc": float(step % 5)})
            first = first or system.experiment_hash  # before the lr change
        system.wait()
        if fork is not None:
            wl.fork(**fork)
            system.wait()
        return first
    finally:
        system.close()
        wl.unregister("main")


def lineage_root(root: Path) -> dict[str, str]:
    """A: steps 2, 4; B (lr changed at step 5, parent A@4): steps 5, 6; C (fork of A@4 named
    "sweep", lr 0.05): its fork checkpoint at step 4 only, all its blobs shared with A@4."""
    a = train(root, change_lr_at=5)
    m = CheckpointManager(root)
    b = next(h for h in m.experiments() if h != a)
    train_fork(root, f"{a}@4")
    c = m.names()["sweep"]
    return {"a": a, "b": b, "c": c}


def train_fork(root: Path, ref: str) -> None:
    system = wl.get_checkpoint_system(root_log_dir=root, checkpoint_frequency=2, save_on_close=False)
    try:
        wl.register_hyperparams({"lr": 0.1})
        model = wl.register_model(nn.Linear(3, 2))
        wl.register_optimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        wl.fork(ref, name="sweep", lr=0.05)
        system.wait()
    finally:
        system.close()
        wl.unregister("main")


def expected_checkpoints(root: Path) -> list[tuple]:
    """What the manifests say, in the manager's order: (ref, created_ns, reasons, metrics, nbytes, path)."""
    m = CheckpointManager(root)
    out = []
    for entry in m.checkpoints():
        manifest = m.read_manifest(entry)
        metrics = {k: float(v) for k, v in codec.decode(dict(manifest.metrics), {}).items()}
        out.append((entry.ref, manifest.created_ns, manifest.reasons, metrics, manifest.total_bytes, str(entry.path)))
    return out


def as_tuples(rows: list[CheckpointRow]) -> list[tuple]:
    return [(r.ref, r.created_ns, r.reasons, r.metrics, r.nbytes, r.path) for r in rows]


def referenced(root: Path) -> dict[str, tuple[int, set[str]]]:
    """digest -> (stored bytes, experiments whose checkpoints need it), computed from the manifests."""
    m = CheckpointManager(root)
    out: dict[str, tuple[int, set[str]]] = {}
    for entry in m.checkpoints():
        for tensor in m.read_manifest(entry).tensors.values():
            for ref in tensor.blob.chain():
                out.setdefault(ref.digest, (ref.nbytes, set()))[1].add(entry.experiment)
    return out


class Reads(list):
    """The paths of the manifests a catalog reads, in order: pass ``read_manifest=reads.read``."""

    def read(self, path, *args):
        self.append(str(path))
        return catalog_module._read_manifest(path, *args)


@pytest.fixture
def counting() -> Reads:
    return Reads()


# --- rows ------------------------------------------------------------------------------------------------
def test_rows_match_the_manifests_and_the_lineage(root: Path) -> None:
    h = lineage_root(root)
    m = CheckpointManager(root)
    with Catalog(m) as catalog:
        rows = {r.hash: r for r in catalog.experiments()}
        checkpoints = catalog.checkpoints()
        of_b = catalog.checkpoints(h["b"])
        of_sweep = catalog.checkpoints("sweep")  # a name works where a hash does
    assert set(rows) == set(h.values()) == set(m.experiments())
    a, b, c = rows[h["a"]], rows[h["b"]], rows[h["c"]]
    assert (a.first_step, a.last_step, a.checkpoints, a.parent, a.reason, a.branch, a.names) == \
        (2, 4, 2, None, None, None, ())
    assert (b.first_step, b.last_step, b.checkpoints, b.parent, b.reason, b.branch, b.names) == \
        (5, 6, 2, f"{h['a']}@4", "config_change", None, ())
    assert (c.first_step, c.last_step, c.checkpoints, c.parent, c.reason, c.branch, c.names) == \
        (4, 4, 1, f"{h['a']}@4", "fork", "sweep", ("sweep",))
    for row in rows.values():
        assert row.created == m.read_experiment(row.hash).created
    assert a.best == {"loss": 0.25, "acc": 2.0} and b.best == {"loss": pytest.approx(1 / 6), "acc": 0.0}
    assert c.best == {}  # the fork's checkpoint records no metric
    # checkpoints: the same records, in the manager's order (commit time, then step)
    assert as_tuples(checkpoints) == expected_checkpoints(root)
    assert [r.reasons for r in checkpoints] == [("step",), ("step",), ("config_change",), ("step",), ("fork",)]
    assert [r.ref for r in of_b] == [f"{h['b']}@5", f"{h['b']}@6"]
    assert [r.ref for r in of_sweep] == [f"{h['c']}@4"]
    assert all(r.nbytes > 0 for r in checkpoints)


def test_experiments_are_ordered_by_creation(root: Path) -> None:
    h = lineage_root(root)
    with Catalog(CheckpointManager(root)) as catalog:
        order = [r.hash for r in catalog.experiments()]
    assert order == [h["a"], h["b"], h["c"]]  # created in that order, whatever the hashes sort as


def test_bytes_alone_counts_only_blobs_no_other_experiment_needs(root: Path) -> None:
    h = lineage_root(root)
    blobs = referenced(root)
    with Catalog(CheckpointManager(root)) as catalog:
        rows = {r.hash: r for r in catalog.experiments()}
    # the fork's only checkpoint restored A@4 and saved it unchanged: every blob is A's too
    assert rows[h["c"]].bytes_alone == 0
    assert rows[h["a"]].bytes_alone > 0 and rows[h["b"]].bytes_alone > 0
    for exp, row in rows.items():
        assert row.bytes_alone == sum(n for n, users in blobs.values() if users == {exp})
    total = sum(n for n, _ in blobs.values())
    assert sum(r.bytes_alone for r in rows.values()) <= total


# --- keeping up to date ---------------------------------------------------------------------------------
def test_refresh_reads_only_new_manifests_and_drops_deleted_ones(root: Path, counting: list[str]) -> None:
    a = train(root, steps=4)
    with Catalog(CheckpointManager(root), read_manifest=counting.read) as catalog:
        assert [r.ref for r in catalog.checkpoints()] == [f"{a}@2", f"{a}@4"]
        assert len(counting) == 2
        catalog.experiments()
        catalog.best(a, "loss")
        assert len(counting) == 2  # nothing new: nothing read again
        b = train(root, steps=2, lr=0.2)  # a new experiment, one checkpoint
        rows = {r.hash: r for r in catalog.experiments()}
        assert counting[2:] == [str(CheckpointManager(root).layout.manifest(b, 2))]
        assert set(rows) == {a, b} and rows[b].checkpoints == 1 and rows[b].last_step == 2
        assert as_tuples(catalog.checkpoints()) == expected_checkpoints(root)
        plan = wl.prune(keep_last=1, root=root)
        assert [r.ref for r in plan.delete] == [f"{a}@2"]
        rows = {r.hash: r for r in catalog.experiments()}
        assert len(counting) == 3  # a deletion reads nothing
        assert (rows[a].first_step, rows[a].last_step, rows[a].checkpoints) == (4, 4, 1)
        assert rows[a].best == {"loss": 0.25, "acc": 4.0}  # step 2 (acc 2) is gone
        assert as_tuples(catalog.checkpoints()) == expected_checkpoints(root)
    # another Catalog on the same file finds it up to date
    with Catalog(CheckpointManager(root), read_manifest=counting.read) as again:
        assert [r.ref for r in again.checkpoints()] == [f"{a}@4", f"{b}@2"]
    assert len(counting) == 3


def test_names_are_refreshed_every_time(root: Path) -> None:
    a = train(root, steps=2)
    with Catalog(CheckpointManager(root)) as catalog:
        assert catalog.experiments()[0].names == ()
        wl.name_experiment("baseline", f"{a}@latest", root=root)
        wl.name_experiment("also", f"{a}@latest", root=root)
        assert catalog.experiments()[0].names == ("also", "baseline")
        assert catalog.best("baseline", "loss").ref == f"{a}@2"


def test_a_copied_root_lists_its_own_files(root: Path, tmp_path: Path, counting: list[str]) -> None:
    lineage_root(root)
    with Catalog(CheckpointManager(root), read_manifest=counting.read) as catalog:
        catalog.experiments()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)  # (copy2: file times kept, so the index is still valid)
    with Catalog(CheckpointManager(copy), read_manifest=counting.read) as catalog:
        rows = catalog.checkpoints()
    assert as_tuples(rows) == expected_checkpoints(copy)
    assert all(Path(r.path).is_relative_to(copy) for r in rows)
    assert len(counting) == 5  # the copy's index was reused, not rebuilt


def test_reindex_rebuilds_everything_and_returns_the_count(root: Path, counting: list[str]) -> None:
    lineage_root(root)
    with Catalog(CheckpointManager(root), read_manifest=counting.read) as catalog:
        before = (catalog.experiments(), catalog.checkpoints())
        assert len(counting) == 5
        assert catalog.reindex() == 5
        assert len(counting) == 10  # every manifest read again
        assert (catalog.experiments(), catalog.checkpoints()) == before


def test_concurrent_refresh_that_lost_the_race_writes_nothing_twice(root: Path) -> None:
    a = train(root, steps=4)
    m = CheckpointManager(root)
    raced = []

    def read(path, *args):
        if not raced:  # while the first reads, the second indexes the same manifests and commits
            raced.append(path)
            second.refresh()
        return catalog_module._read_manifest(path, *args)

    first, second = Catalog(m, read_manifest=read), Catalog(m)
    try:
        rows = first.checkpoints()
        assert raced and [r.ref for r in rows] == [f"{a}@2", f"{a}@4"]
        assert first._db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 2
        assert first._db.execute("SELECT COUNT(*) FROM blobs").fetchone()[0] == \
            sum(len({r.digest for t in m.read_manifest(e).tensors.values() for r in t.blob.chain()})
                for e in m.checkpoints())
        assert second.checkpoints() == rows
    finally:
        first.close()
        second.close()


def test_several_catalogs_refresh_while_training_commits(root: Path) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()

    def lister() -> None:
        try:
            with Catalog(CheckpointManager(root)) as catalog:
                while not stop.is_set():
                    catalog.experiments()
                    catalog.checkpoints()
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    root.mkdir(parents=True)
    threads = [threading.Thread(target=lister, name=f"lister-{i}") for i in range(3)]
    for t in threads:
        t.start()
    try:
        train(root, steps=20)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    with Catalog(CheckpointManager(root)) as catalog:
        assert as_tuples(catalog.checkpoints()) == expected_checkpoints(root)
        assert catalog.experiments()[0].checkpoints == 10


# --- the index file ---------------------------------------------------------------------------------------
def test_a_missing_index_is_created_in_wal_mode_and_nothing_else_is_written(root: Path) -> None:
    lineage_root(root)
    path = root / "index.sqlite"
    assert not path.exists()
    before = {p for p in root.rglob("*")}
    with Catalog(CheckpointManager(root)) as catalog:
        assert len(catalog.experiments()) == 3
        assert not catalog.in_memory
    assert {p for p in root.rglob("*")} - before == {path}  # (-wal and -shm removed at close)
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("SELECT COUNT(*) FROM checkpoints").fetchone()[0] == 5
    finally:
        db.close()


@pytest.mark.parametrize("damage", ["garbage", "schema version", "foreign database"])
def test_a_damaged_index_is_rebuilt_with_a_warning(root: Path, caplog, damage: str) -> None:
    lineage_root(root)
    with Catalog(CheckpointManager(root)) as catalog:
        before = (catalog.experiments(), catalog.checkpoints())
    path = root / "index.sqlite"
    if damage == "garbage":
        path.write_bytes(b"this is not a database, it is garbage" * 200)
    else:
        db = sqlite3.connect(path)
        if damage == "schema version":
            db.execute("PRAGMA user_version = 99")
        else:
            db.execute("PRAGMA user_version = 0")
        db.close()
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        with Catalog(CheckpointManager(root)) as catalog:
            after = (catalog.experiments(), catalog.checkpoints())
            assert not catalog.in_memory
    assert after == before
    assert "index.sqlite" in caplog.text and "rebuilding it" in caplog.text
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_damage_found_during_a_query_is_rebuilt_too(root: Path, caplog) -> None:
    a = train(root, steps=4)
    with Catalog(CheckpointManager(root)) as catalog:
        catalog.experiments()
        catalog._db.execute("DROP TABLE metrics")  # e.g. a foreign tool edited it
        with caplog.at_level(logging.WARNING, logger="weightslab"):
            rows = catalog.checkpoints()
        assert [r.metrics["loss"] for r in rows] == [0.5, 0.25]
        assert catalog.best(a, "loss").step == 4
    assert "is damaged" in caplog.text


@pytest.mark.parametrize("index", ["none", "up to date", "damaged"])
def test_a_read_only_root_is_listed_from_memory(root: Path, caplog, index: str) -> None:
    lineage_root(root)
    expected = expected_checkpoints(root)
    if index != "none":
        Catalog(CheckpointManager(root)).close()
    if index == "damaged":
        (root / "index.sqlite").write_bytes(b"garbage" * 1000)
    os.chmod(root, 0o555)
    try:
        if os.access(root, os.W_OK):
            pytest.skip("running as root: chmod does not make the root read-only")
        with caplog.at_level(logging.WARNING, logger="weightslab"):
            with Catalog(CheckpointManager(root)) as catalog:
                assert catalog.in_memory
                assert as_tuples(catalog.checkpoints()) == expected
                assert len(catalog.experiments()) == 3
        assert "cannot be written" in caplog.text
        assert (root / "index.sqlite").exists() == (index != "none")
    finally:
        os.chmod(root, 0o755)


def test_an_index_that_cannot_be_opened_falls_back_to_memory(root: Path, caplog) -> None:
    h = lineage_root(root)
    (root / "index.sqlite").mkdir()  # works as root too, unlike chmod
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        with Catalog(CheckpointManager(root)) as catalog:
            assert catalog.in_memory
            assert as_tuples(catalog.checkpoints()) == expected_checkpoints(root)
            assert {r.hash for r in catalog.experiments()} == set(h.values())
            assert catalog.best(h["a"], "loss").step == 4
    assert "cannot be written" in caplog.text and "in memory" in caplog.text
    assert (root / "index.sqlite").is_dir()


def test_a_read_only_index_file_is_used_until_something_must_be_written(root: Path, caplog) -> None:
    a = train(root, steps=4)
    with Catalog(CheckpointManager(root)) as catalog:
        catalog.experiments()
    path = root / "index.sqlite"
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: chmod does not make the index read-only")
        b = train(root, steps=2, lr=0.2)
        with caplog.at_level(logging.WARNING, logger="weightslab"):
            with Catalog(CheckpointManager(root)) as catalog:
                assert {r.hash for r in catalog.experiments()} == {a, b}
                assert catalog.in_memory
    finally:
        os.chmod(path, 0o644)


# --- damaged manifests and metrics -----------------------------------------------------------------------
def test_a_damaged_manifest_is_skipped_with_a_warning_and_retried(root: Path, caplog) -> None:
    a = train(root, steps=6)
    m = CheckpointManager(root)
    damaged = m.layout.manifest(a, 4)
    good = damaged.read_bytes()
    with Catalog(m) as catalog:
        assert [r.step for r in catalog.checkpoints()] == [2, 4, 6]
        damaged.write_bytes(good.replace(b'"step": 4', b'"step": 5'))  # no longer matches its digest
        with caplog.at_level(logging.WARNING, logger="weightslab"):
            rows = catalog.checkpoints()
            experiments = catalog.experiments()
        assert [r.step for r in rows] == [2, 6]
        assert f"skips the checkpoint manifest {damaged}: it cannot be read" in caplog.text
        assert experiments[0].checkpoints == 2 and experiments[0].best["acc"] == 1.0
        damaged.write_bytes(good)  # repaired: indexed again at the next refresh
        assert [r.step for r in catalog.checkpoints()] == [2, 4, 6]
    # a new index with the damage from the start: skipped too
    damaged.write_bytes(b"{not json")
    (root / "index.sqlite").unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        with Catalog(m) as catalog:
            assert catalog.reindex() == 2
            assert [r.step for r in catalog.checkpoints()] == [2, 6]
    assert str(damaged) in caplog.text


def test_best_ignores_nan_breaks_ties_by_time_and_says_none(root: Path) -> None:
    losses = {2: 0.5, 4: math.nan, 6: 0.5, 8: 0.7}
    a = train(root, steps=8, loss=lambda s: losses.get(s, 1.0))
    with Catalog(CheckpointManager(root)) as catalog:
        best = catalog.best(a, "loss")
        assert (best.step, best.metrics["loss"]) == (2, 0.5)  # 6 ties; the earlier wins, as @best does
        assert catalog.best(a, "loss", mode="max").step == 8  # NaN is not the largest either
        assert catalog.best(a, "acc", mode="max").step == 4  # acc = step % 5: 2, 4, 1, 3
        assert catalog.best(a, "acc").step == 6
        assert catalog.best(a, "f1") is None
        assert catalog.best("0123456789abcdef", "loss") is None
        assert catalog.experiments()[0].best == {"loss": 0.5, "acc": 1.0}
        rows = catalog.checkpoints(a)
        assert math.isnan(rows[1].metrics["loss"])  # NaN is kept as NaN in the rows
        with pytest.raises(ValueError, match="mode must be 'min'"):
            catalog.best(a, "loss", mode="lowest")
    assert CheckpointManager(root).candidates(f"{a}@best:loss")[0].step == 2


def test_a_closed_catalog_says_so(root: Path) -> None:
    train(root, steps=2)
    catalog = Catalog(CheckpointManager(root))
    catalog.close()
    catalog.close()  # twice is fine
    with pytest.raises(wl.WeightslabError, match="closed"):
        catalog.experiments()
