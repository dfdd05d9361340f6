"""Tests of weightslab/atomic.py: atomic durable writes, directory creation, the temp-file sweep."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from weightslab.storage.atomic import (TEMP_PREFIX, DirectFile, Disk, atomic_write, fsync_dir, make_dirs,
                                      sweep_temp_files, temp_path_for)

DAY = 24 * 3600


def temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


def dead_pid() -> int:
    """The pid of a real process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    pid = proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the premise of the test: nobody runs under this pid now
    return pid


def make_temp(directory: Path, pid: int | str, name: str = "file.bin", *, age: float = 0.0) -> Path:
    path = directory / f"{TEMP_PREFIX}{pid}.0123456789ab.{name}"
    path.write_bytes(b"partial")
    if age:
        t = time.time() - age
        os.utime(path, (t, t))
    return path


# --- temp_path_for --------------------------------------------------------------------------------

def test_temp_path_for_is_a_hidden_sibling_naming_pid_and_target(tmp_path):
    target = tmp_path / "sub" / "model.json"
    tmp = temp_path_for(target)
    assert tmp.parent == target.parent
    assert re.fullmatch(rf"\.tmp\.{os.getpid()}\.[0-9a-f]{{12}}\.model\.json", tmp.name), tmp.name


def test_temp_path_for_is_unique_per_call(tmp_path):
    target = tmp_path / "x"
    names = {temp_path_for(target).name for _ in range(50)}
    assert len(names) == 50


# --- atomic_write ---------------------------------------------------------------------------------

def test_atomic_write_bytes_exact_content_and_count(tmp_path):
    path = tmp_path / "a.bin"
    data = bytes(range(256)) * 3
    assert atomic_write(path, data) == len(data)
    assert path.read_bytes() == data
    assert temp_files(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_write_chunks_are_concatenated_in_order(tmp_path):
    path = tmp_path / "chunks.bin"
    arr = np.arange(10, dtype=np.float32)
    chunks = [b"head", bytearray(b"-mid-"), memoryview(arr), b"", b"tail"]
    n = atomic_write(path, iter(chunks))
    expected = b"head-mid-" + arr.tobytes() + b"tail"
    assert n == len(expected) == 4 + 5 + 40 + 4
    assert path.read_bytes() == expected
    assert temp_files(tmp_path) == []


def test_atomic_write_accepts_bytearray_and_memoryview_as_single_buffer(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert atomic_write(a, bytearray(b"xyz")) == 3
    assert atomic_write(b, memoryview(b"0123456789")[2:5]) == 3
    assert a.read_bytes() == b"xyz"
    assert b.read_bytes() == b"234"


def test_atomic_write_empty_file(tmp_path):
    path = tmp_path / "empty"
    assert atomic_write(path, b"") == 0
    assert path.exists() and path.read_bytes() == b""


def test_atomic_write_replaces_existing_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_bytes(b"old content that is longer than the new one")
    old_inode = path.stat().st_ino
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new"
    assert path.stat().st_ino != old_inode  # renamed over, never rewritten in place
    assert temp_files(tmp_path) == []


def test_atomic_write_failure_midway_keeps_old_content_and_leaves_no_temp(tmp_path):
    path = tmp_path / "checkpoint.json"
    path.write_bytes(b"committed")
    produced = []

    def chunks():
        yield b"first chunk "
        produced.append(1)
        yield b"second chunk "
        produced.append(2)
        raise RuntimeError("disk exploded while writing")

    with pytest.raises(RuntimeError, match="disk exploded"):
        atomic_write(path, chunks())
    assert produced == [1, 2]  # it really was midway
    assert path.read_bytes() == b"committed"
    assert temp_files(tmp_path) == []


def test_atomic_write_failure_on_a_new_file_creates_nothing(tmp_path):
    path = tmp_path / "new.bin"

    def chunks():
        yield b"x" * 1000
        raise KeyboardInterrupt  # BaseException too: an interrupted save must clean up

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, chunks())
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_bad_chunk_type_keeps_old_content(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        atomic_write(path, [b"ok", "not bytes"])
    assert path.read_bytes() == b"old"
    assert temp_files(tmp_path) == []


def test_atomic_write_over_a_directory_fails_and_cleans_up(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_bytes(b"keep")
    with pytest.raises(OSError):
        atomic_write(target, b"data")
    assert target.is_dir() and (target / "inside").read_bytes() == b"keep"
    assert temp_files(tmp_path) == []


def test_atomic_write_into_missing_directory_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "nope" / "f", b"x")
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_commits_what_the_block_wrote_and_nothing_if_it_raises(tmp_path):
    from weightslab.storage.atomic import atomic_path
    path = tmp_path / "f"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]
    with atomic_path(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".tmp.")
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_fsync_dir_on_existing_and_missing_directory(tmp_path):
    fsync_dir(tmp_path)  # must not raise on a real directory
    fsync_dir(tmp_path / "missing")  # unsupported/missing: a documented no-op
    assert list(tmp_path.iterdir()) == []


# --- make_dirs ------------------------------------------------------------------------------------

def test_make_dirs_creates_nested_directories(tmp_path):
    target = tmp_path / "a" / "b" / "c" / "d"
    make_dirs(target)
    assert target.is_dir()
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b"]


def test_make_dirs_existing_is_a_noop_and_keeps_contents(tmp_path):
    target = tmp_path / "x"
    target.mkdir()
    (target / "f").write_bytes(b"1")
    make_dirs(target)
    make_dirs(target)
    assert (target / "f").read_bytes() == b"1"


def test_make_dirs_accepts_str(tmp_path):
    make_dirs(str(tmp_path / "s" / "t"))
    assert (tmp_path / "s" / "t").is_dir()


def test_make_dirs_under_a_file_raises(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        make_dirs(blocker / "sub")
    assert blocker.read_bytes() == b""


def test_make_dirs_on_an_existing_file_raises_naming_it(tmp_path):
    blocker = tmp_path / "objects"
    blocker.write_bytes(b"not a directory")
    with pytest.raises(OSError) as info:
        make_dirs(blocker)
    assert str(blocker) in str(info.value)


# --- sweep_temp_files -----------------------------------------------------------------------------

def test_sweep_removes_temp_files_of_a_dead_pid(tmp_path):
    pid = dead_pid()
    orphan = make_temp(tmp_path, pid)
    removed = sweep_temp_files([tmp_path])
    assert removed == [orphan]
    assert not orphan.exists()


def test_sweep_keeps_fresh_temp_files_of_current_and_live_pids(tmp_path):
    mine = make_temp(tmp_path, os.getpid(), "a")
    parent = make_temp(tmp_path, os.getppid(), "b")  # alive: it is running this test
    assert sweep_temp_files([tmp_path]) == []
    assert mine.read_bytes() == b"partial"
    assert parent.read_bytes() == b"partial"


def test_sweep_keeps_temp_file_of_a_live_child_process(tmp_path):
    proc = subprocess.Popen(["cat"], stdin=subprocess.PIPE)
    try:
        live = make_temp(tmp_path, proc.pid)
        assert sweep_temp_files([tmp_path]) == []
        assert live.exists()
    finally:
        proc.stdin.close()
        proc.wait()


def test_sweep_removes_temp_files_older_than_a_day_even_of_live_pids(tmp_path):
    old_mine = make_temp(tmp_path, os.getpid(), "old", age=DAY + 120)
    young_mine = make_temp(tmp_path, os.getpid(), "young", age=DAY - 120)
    removed = sweep_temp_files([tmp_path])
    assert removed == [old_mine]
    assert not old_mine.exists()
    assert young_mine.exists()


def test_sweep_ignores_non_temp_files_and_directories(tmp_path):
    pid = dead_pid()
    keep = [tmp_path / "model.json", tmp_path / f"tmp.{pid}.x", tmp_path / f"x{TEMP_PREFIX}{pid}.y"]
    for p in keep:
        p.write_bytes(b"data")
        t = time.time() - 10 * DAY
        os.utime(p, (t, t))
    temp_dir = tmp_path / f"{TEMP_PREFIX}{pid}.abc.dir"
    temp_dir.mkdir()
    assert sweep_temp_files([tmp_path]) == []
    assert all(p.read_bytes() == b"data" for p in keep)
    assert temp_dir.is_dir()


def test_sweep_removes_temp_prefix_without_pid(tmp_path):
    odd = tmp_path / f"{TEMP_PREFIX}notapid.file"
    odd.write_bytes(b"x")
    assert sweep_temp_files([tmp_path]) == [odd]
    assert not odd.exists()


def test_sweep_does_not_follow_symlinks(tmp_path):
    pid = dead_pid()
    target = tmp_path / "real"
    target.write_bytes(b"precious")
    link = tmp_path / f"{TEMP_PREFIX}{pid}.abc.link"
    link.symlink_to(target)
    assert sweep_temp_files([tmp_path]) == []
    assert link.is_symlink() and target.read_bytes() == b"precious"


def test_sweep_several_directories_and_missing_ones(tmp_path):
    pid = dead_pid()
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    orphan_a = make_temp(a, pid)
    orphan_b = make_temp(b, pid)
    live_b = make_temp(b, os.getpid(), "live")
    removed = sweep_temp_files([a, tmp_path / "missing", b])
    assert sorted(removed) == sorted([orphan_a, orphan_b])
    assert live_b.exists()
    assert temp_files(a) == [] and temp_files(b) == [live_b.name]


def test_sweep_leaves_nothing_of_a_failed_atomic_write_by_current_process(tmp_path):
    # A temp file left by atomic_write of this live process is real and kept; simulate a dead writer.
    path = tmp_path / "target"
    tmp = temp_path_for(path)
    tmp.write_bytes(b"half")
    assert sweep_temp_files([tmp_path]) == []
    pid = dead_pid()
    orphan = tmp.with_name(tmp.name.replace(f".{os.getpid()}.", f".{pid}.", 1))
    tmp.rename(orphan)
    assert sweep_temp_files([tmp_path]) == [orphan]
    assert list(tmp_path.iterdir()) == []


# --- large files bypass the page cache ----------------------------------------------------------------

@pytest.mark.parametrize("sizes", [[1], [4095, 1, 4097], [3, 9 << 20, 5], [8 << 20], [0, 0]])
def test_a_direct_write_holds_exactly_the_bytes_given(tmp_path: Path, sizes: list[int]):
    rng = np.random.default_rng(len(sizes))
    chunks = [rng.integers(0, 256, size=n, dtype=np.uint8).tobytes() for n in sizes]
    path = tmp_path / "pack.safetensors"
    assert atomic_write(path, [memoryview(c) for c in chunks], direct=True) == sum(sizes)
    assert path.read_bytes() == b"".join(chunks)  # padded to whole blocks on disk, truncated back
    assert not list(tmp_path.glob(f"{TEMP_PREFIX}*"))


def test_a_direct_file_is_written_once_and_falls_back_where_o_direct_is_refused(tmp_path: Path):
    with DirectFile(tmp_path / "once") as f:
        f.write(b"abc")
        f.flush()
        with pytest.raises(ValueError, match="written once"):
            f.write(b"more")
    assert (tmp_path / "once").read_bytes() == b"abc"
    # A filesystem without O_DIRECT gets a plain file: the same bytes, whatever the platform.
    path = tmp_path / "plain"
    with Disk().create(path, direct=True) as f:
        Disk().write(f, b"xyz")
        Disk().fsync(f)
    assert path.read_bytes() == b"xyz"
