"""Tests of weightslab/storage/root.py: the one way every caller opens a root."""

from __future__ import annotations

from pathlib import Path

import pytest

import weightslab as wl
from weightslab.errors import NotARootError
from weightslab.storage.manager import CheckpointManager
from weightslab.storage.root import Root, is_root


def test_create_takes_a_path_that_need_not_exist(tmp_path: Path):
    root = Root.create(tmp_path / "new")
    assert root.local == (tmp_path / "new").absolute() and root.remote is None
    assert root.location == str(root.local) and root.layout.root == root.local
    assert not root.local.exists()  # created on the first write, not here


def test_existing_refuses_a_directory_that_is_not_a_root(tmp_path: Path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotARootError, match="is not a weightslab root") as info:
        Root.existing(tmp_path / "plain")
    assert isinstance(info.value, wl.CheckpointNotFoundError)  # what callers caught before
    assert not is_root(tmp_path / "plain")
    (tmp_path / "plain" / "objects").mkdir()
    assert is_root(tmp_path / "plain") and Root.existing(tmp_path / "plain").local == tmp_path / "plain"


def test_existing_defaults_to_the_environment(tmp_path: Path, monkeypatch):
    (tmp_path / "env" / "checkpoints").mkdir(parents=True)
    monkeypatch.setenv("WEIGHTSLAB_ROOT", str(tmp_path / "env"))
    assert Root.existing().local == tmp_path / "env"


def test_a_remote_root_is_read_through_a_mirror_and_written_through_a_staging_root(tmp_path: Path, monkeypatch):
    pytest.importorskip("fsspec")
    monkeypatch.setenv("WEIGHTSLAB_STAGING", str(tmp_path / "staging"))
    url = "memory://weightslab-root-test"
    writing = Root.create(url)
    assert writing.remote is not None and writing.location == url
    assert writing.local.is_relative_to(tmp_path / "staging")
    with pytest.raises(NotARootError, match="holds no committed checkpoint"):
        Root.existing(url)  # nothing committed there yet


def test_the_manager_keeps_the_root_it_was_opened_on(tmp_path: Path):
    manager = CheckpointManager(Root.create(tmp_path / "r"), best_metric=("loss", "min"))
    assert manager.root == (tmp_path / "r").absolute() and manager.remote is None
    assert manager.best_metric == ("loss", "min")
    with pytest.raises(AttributeError):
        manager.remote = object()  # given at construction; nothing sets it from outside
    assert CheckpointManager(tmp_path / "r").root == manager.root  # a plain path still opens one
