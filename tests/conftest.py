"""Shared fixtures: an isolated root per test, a clean ledger and system, and no leaked threads.

Fixtures only; helpers shared by tests are in tests/support.py."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import weightslab as wl
from weightslab import process
from weightslab.ledger import LEDGER


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weightslab root; also the default root of systems the ledger starts by itself."""
    path = tmp_path / "root"
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(path))
    return path


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Every test starts with an empty ledger and no checkpoint system, and must not leak threads."""
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(tmp_path / "default-root"))
    before = set(threading.enumerate())
    yield
    system = process.running_system()
    if system is not None:
        try:
            system._close(crashed=True)
        except wl.CheckpointSaveError:
            pass
    LEDGER.clear()
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(timeout=5)
    leaked = [t.name for t in leaked if t.is_alive()]
    assert not leaked, f"test leaked threads: {leaked}"

