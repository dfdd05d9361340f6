"""The watched YAML file on its own: the merge policy (pure) and the watcher on a real file."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest

from weightslab.configfile import ConfigFile, merge_edit
from weightslab.errors import HyperparamsError
from weightslab.hyperparams import LiveConfig, parse_yaml


def _merge(live, before_text, after_text):
    before = parse_yaml(before_text, where="c.yaml")[0] or {}
    after, marks = parse_yaml(after_text, where="c.yaml")
    return merge_edit(live, before, after, marks, where="c.yaml")


# --- merge_edit: what an edit changes, and what it leaves alone ----------------------------------
def test_an_edit_changes_only_what_it_touched():
    live = {"lr": 0.05, "batch": 32, "model": {"width": 8}, "set_at_runtime": [1, 2]}  # lr overridden by the run
    edit = _merge(live, "lr: 0.1\nbatch: 32\nmodel:\n  width: 8\n", "lr: 0.1\nbatch: 64\nmodel:\n  width: 8\n")
    assert edit.values == {"lr": 0.05, "batch": 64, "model": {"width": 8}, "set_at_runtime": [1, 2]}
    assert edit.changed == ("batch: 32 -> 64",)
    assert edit.warnings == ()
    assert live["batch"] == 32  # the input is not touched


def test_an_edit_of_a_key_the_run_overrode_wins():
    edit = _merge({"lr": 0.05}, "lr: 0.1\n", "lr: 0.2\n")
    assert edit.values == {"lr": 0.2} and edit.changed == ("lr: 0.05 -> 0.2",)


def test_nested_and_new_keys():
    edit = _merge({"opt": {"lr": 0.1, "wd": 0.0}}, "opt:\n  lr: 0.1\n  wd: 0.0\n",
                  "opt:\n  lr: 0.1\n  wd: 0.01\n  betas: [0.9, 0.99]\nnew:\n  a: 1\n")
    assert edit.values == {"opt": {"lr": 0.1, "wd": 0.01, "betas": [0.9, 0.99]}, "new": {"a": 1}}
    assert set(edit.changed) == {"opt.wd: 0.0 -> 0.01", "opt.betas: (new) -> [0.9, 0.99]", "new: (new) -> {'a': 1}"}


def test_a_key_removed_from_the_file_keeps_its_value_with_a_warning():
    edit = _merge({"lr": 0.1, "batch": 32}, "lr: 0.1\nbatch: 32\n", "lr: 0.1\n")
    assert edit.values == {"lr": 0.1, "batch": 32} and edit.changed == ()
    assert len(edit.warnings) == 1 and "'batch' was removed from the file" in edit.warnings[0]
    assert "keeps its value 32" in edit.warnings[0]


@pytest.mark.parametrize("text, key, value, says", [
    ("lr: 1e-3\n", "lr", 0.001, "YAML 1.1 reads as a string"),  # the classic: 1e-3 is a str in YAML 1.1
    ("act: on\n", "act", "on", "reads 'on' as the bool True"),
    ("act: yes\n", "act", "yes", "reads 'yes' as the bool True"),
    ("version: 1.10\n", "version", "1.10", "reads '1.10' as the float 1.1"),
    ("epochs: 10.0\n", "epochs", 10, "used as the integer 10"),
])
def test_yaml_1_1_misreadings_are_coerced_to_the_current_type(text, key, value, says):
    live = {"lr": 0.1, "act": "relu", "version": "1.0", "epochs": 5}
    edit = _merge(live, "", text)
    assert edit.values[key] == value and type(edit.values[key]) is type(value)
    assert len(edit.warnings) == 1
    assert edit.warnings[0].startswith("c.yaml, line 1:") and f"'{key}'" in edit.warnings[0] and says in edit.warnings[0]


def test_an_integer_for_a_float_is_taken_silently():
    edit = _merge({"lr": 0.1}, "lr: 0.1\n", "lr: 1\n")
    assert edit.values == {"lr": 1.0} and type(edit.values["lr"]) is float and edit.warnings == ()


@pytest.mark.parametrize("text, line", [
    ("a: 1\nlr: abc\n", 2),           # not a number
    ("a: 1\n\nlr: [0.1]\n", 3),       # a list for a float
    ("a: 1\nflag: maybe\n", 2),       # a string for a bool
    ("model:\n  width: wide\n", 2),  # nested
    ("lr:\n", 1),                      # emptied value
])
def test_a_value_of_the_wrong_type_rejects_the_whole_edit_naming_the_line(text, line):
    live = {"a": 0, "lr": 0.1, "flag": True, "model": {"width": 8}}
    with pytest.raises(HyperparamsError) as info:
        _merge(live, "", text)
    assert str(info.value).startswith(f"c.yaml, line {line}:")
    assert "like its current value" in str(info.value)


# --- the watcher on a real file --------------------------------------------------------------------
def _watched(tmp_path: Path, text: str, **kw) -> tuple[Path, LiveConfig, ConfigFile]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    live = LiveConfig(parse_yaml(text, where=str(path))[0])
    return path, live, ConfigFile(path, live, debounce=0.05, **kw)


def _refused(watched: ConfigFile, path: Path, text: str, caplog) -> list[str]:
    """Write ``text`` to the watched file, which must be refused (no edit handed over once the
    watcher settled); return the warnings logged meanwhile."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightslab"):
        seen = watched.events
        path.write_text(text)
        assert watched.wait_for_events(seen + 1, timeout=10)
        assert _poll_until_settled(watched, path) is None
    return [r.getMessage() for r in caplog.records]


def _poll_until_settled(watched: ConfigFile, path: Path, timeout: float = 10.0):
    """Poll like step boundaries do until the watcher has read the file as it is now and acted on
    every event; return the last edit handed over (None if none)."""
    deadline = time.monotonic() + timeout
    edit = None
    while True:
        edit = watched.poll() or edit
        if watched.settled and watched.content == path.read_bytes():
            return edit
        assert time.monotonic() < deadline, "the watcher's events were never acted on"
        time.sleep(0.01)


@pytest.mark.parametrize("watch", ["auto", "poll"])
def test_an_edit_is_seen_by_the_watcher_and_handed_over_at_poll(tmp_path, watch):
    path, live, watched = _watched(tmp_path, "lr: 0.1\n", watch=watch)
    try:
        assert watched.watching
        assert watched.poll() is None  # nothing happened yet
        tmp = tmp_path / "config.yaml.tmp"
        tmp.write_text("lr: 0.2\n")
        os.replace(tmp, path)
        assert watched.wait_for_events(1, timeout=10)
        edit = _poll_until_settled(watched, path)
        assert edit is not None and edit.values == {"lr": 0.2} and edit.changed == ("lr: 0.1 -> 0.2",)
        assert live == {"lr": 0.1}  # the caller swaps it in; poll never touches the live object
        assert watched.poll() is None  # handed over once
    finally:
        watched.close()
        watched.close()  # idempotent


def test_a_rewrite_with_the_same_content_or_a_sibling_file_is_no_edit(tmp_path):
    path, live, watched = _watched(tmp_path, "lr: 0.1\n")
    try:
        (tmp_path / "other.yaml").write_text("lr: 5\n")  # same directory, another file: ignored
        path.write_text("lr: 0.1\n")  # same bytes
        assert watched.wait_for_events(1, timeout=10)
        assert _poll_until_settled(watched, path) is None
    finally:
        watched.close()


def test_bad_versions_keep_the_previous_configuration_and_say_where(tmp_path, caplog):
    path, live, watched = _watched(tmp_path, "lr: 0.1\nname: run\n")
    try:
        for text, says in [
            ("lr: [0.1\n", "line 2, column 1: the YAML does not parse"),
            ("", "line 1: the file is empty"),
            ("- lr\n", "line 1: the file must hold a mapping"),
            ("lr: fast\nname: run\n", "line 1: 'lr' must be a float"),
        ]:
            messages = _refused(watched, path, text, caplog)
            assert any(str(path) in m and says in m and "previous configuration is kept" in m for m in messages), \
                (text, messages)
        seen = watched.events
        path.write_text("lr: 0.3\nname: run\n")  # fixed: applied against the last good version
        assert watched.wait_for_events(seen + 1, timeout=10)
        edit = _poll_until_settled(watched, path)
        assert edit is not None and edit.values == {"lr": 0.3, "name": "run"}
    finally:
        watched.close()


def test_watch_off_starts_no_thread_and_sees_nothing(tmp_path):
    path, live, watched = _watched(tmp_path, "lr: 0.1\n", watch="off")
    assert not watched.watching
    path.write_text("lr: 0.2\n")
    assert not watched.wait_for_events(1, timeout=0.2)
    assert watched.poll() is None
    watched.close()


def test_a_live_config_copies_pickles_and_compares_like_its_values():
    import copy as _copy
    import json
    import pickle

    live = LiveConfig({"optimizer": {"lr": 0.1}, "tags": ["a"]})
    assert live == {"optimizer": {"lr": 0.1}, "tags": ["a"]} and repr(live) == repr(live.copy())
    clone = pickle.loads(pickle.dumps(live))  # what a DataLoader worker process receives
    deep = _copy.deepcopy(live)
    assert isinstance(clone, LiveConfig) and isinstance(deep, LiveConfig)
    live["optimizer"]["lr"] = 0.2
    assert clone["optimizer"]["lr"] == 0.1 and deep["optimizer"]["lr"] == 0.1
    assert json.loads(json.dumps(live.copy())) == {"optimizer": {"lr": 0.2}, "tags": ["a"]}
    old_inner = live["optimizer"]
    live.swap({"optimizer": {"lr": 0.3}})
    assert live["optimizer"]["lr"] == 0.3 and old_inner == {"lr": 0.2}  # a nested dict kept aside is the old version


def test_a_version_the_check_refuses_stays_refused_until_the_value_is_fixed(tmp_path, caplog):
    """The check (the optimizer's rules, in a run) refuses the whole edit, and the refused version
    is not the base of the next merge: the bad value still counts as an edit while it is in the file."""
    def check(live, values, marks, where):
        if values["lr"] < 0:
            raise HyperparamsError(f"{where}, line {marks[('lr',)][0]}: 'lr' = {values['lr']!r} must be >= 0")

    path, live, watched = _watched(tmp_path, "lr: 0.1\nepochs: 3\n", check=check)
    try:
        for text in ("lr: -1.0\nepochs: 3\n", "lr: -1.0\nepochs: 4\n"):
            assert any(f"{path}, line 1: 'lr' = -1.0 must be >= 0. The previous configuration is kept" in m
                       for m in _refused(watched, path, text, caplog)), text
        assert live == {"lr": 0.1, "epochs": 3}
        seen = watched.events
        path.write_text("lr: 0.2\nepochs: 4\n")
        assert watched.wait_for_events(seen + 1, timeout=10)
        edit = _poll_until_settled(watched, path)
        assert edit is not None and edit.values == {"lr": 0.2, "epochs": 4}
    finally:
        watched.close()
