"""Tests of weightslab/refs.py: parsing the checkpoint references a person types."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from weightslab.refs import Ref, check_name, parse_ref

H = "0123456789abcdef"


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path, monkeypatch):
    """Refs are checked against the filesystem relative to the cwd: make it an empty directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_latest():
    assert parse_ref("latest") == Ref(text="latest", latest=True)


@pytest.mark.parametrize("text, exp, step", [
    (f"{H}@12", H, 12),
    (f"{H}@0", H, 0),
    (f"{H}@000100", H, 100),
    (f"{H}@1000000", H, 1000000),
    ("abcd@7", "abcd", 7),
    (f"{H}@latest", H, None),
    ("abcd@latest", "abcd", None),
    (H, H, None),
    ("abcd", "abcd", None),
    ("0000", "0000", None),
])
def test_experiment_refs(text, exp, step):
    ref = parse_ref(text)
    assert ref == Ref(text=text, experiment=exp, step=step)
    assert ref.latest is False and ref.path is None
    assert ref.step is None or type(ref.step) is int


def test_path_object_is_a_path_ref_even_if_missing(tmp_path):
    p = tmp_path / "nowhere" / f"{H}_step_000012.json"
    assert parse_ref(p) == Ref(text=str(p), path=p)


def test_path_object_that_looks_like_a_ref_stays_a_path():
    ref = parse_ref(Path(f"{H}@12"))
    assert ref.path == Path(f"{H}@12") and ref.experiment is None and not ref.latest
    ref = parse_ref(PurePosixPath("latest"))
    assert ref.path == Path("latest") and ref.latest is False


def test_existing_string_path_is_a_path(tmp_path):
    manifest = tmp_path / "checkpoints" / H / "model" / f"{H}_step_000012.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_bytes(b"{}")
    assert parse_ref(str(manifest)) == Ref(text=str(manifest), path=manifest)
    assert parse_ref(str(manifest.parent.parent)).path == manifest.parent.parent


def test_existing_file_named_like_a_hash_is_a_path(empty_cwd):
    (empty_cwd / "abcd").mkdir()
    (empty_cwd / f"{H}@12").write_bytes(b"")
    assert parse_ref("abcd") == Ref(text="abcd", path=Path("abcd"))
    assert parse_ref(f"{H}@12") == Ref(text=f"{H}@12", path=Path(f"{H}@12"))


def test_existing_file_with_at_signs_is_a_path(empty_cwd):
    (empty_cwd / "abc@x@y").write_bytes(b"")
    assert parse_ref("abc@x@y").path == Path("abc@x@y")


def test_latest_word_wins_over_a_file_named_latest(empty_cwd):
    (empty_cwd / "latest").write_bytes(b"")
    assert parse_ref("latest").latest is True


@pytest.mark.parametrize("text", [
    "abc@x@y", f"{H}@x", f"{H}@", f"{H}@-1", f"{H}@1.5", f"{H}@ 12", f"{H}@12@13", f"{H}0@12", "1xyz@12",
    "a b@12", "@12", "@latest", f"{H}@Latest", "latest@12", "best@3", f"{H}@best:", f"{H}@best:loss:up",
])
def test_malformed_refs_raise_value_error_naming_ref_and_forms(text):
    with pytest.raises(ValueError) as info:
        parse_ref(text)
    msg = str(info.value)
    assert repr(text) in msg
    assert "'latest'" in msg and "'<hash or name>@<step>'" in msg and "'<hash or name>@latest'" in msg
    assert "@best" in msg and "path" in msg


@pytest.mark.parametrize("text", ["abc", "ABCD", "g123", f"{H}0", "runs/exp", "model.json"])
def test_other_strings_without_at_are_paths(text):
    assert parse_ref(text) == Ref(text=text, path=Path(text))


@pytest.mark.parametrize("bad", ["", None, 12, b"latest", ["latest"]])
def test_non_string_or_empty_refs_raise(bad):
    with pytest.raises(ValueError) as info:
        parse_ref(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) and "non-empty string or a path" in str(info.value)


def test_ref_is_frozen():
    ref = parse_ref("latest")
    with pytest.raises(AttributeError):
        ref.latest = False  # type: ignore[misc]


@pytest.mark.parametrize("text, exp, step", [
    ("baseline@12", "baseline", 12),
    ("lr-sweep-2@latest", "lr-sweep-2", None),
    ("ABCD@12", "ABCD", 12),  # upper case: a name, not a hash prefix
    ("abc@0", "abc", 0),  # three hex digits are too short for a hash prefix: a name
])
def test_named_refs(text, exp, step):
    ref = parse_ref(text)
    assert ref == Ref(text=text, experiment=exp, step=step)
    assert ref.by_name


@pytest.mark.parametrize("text, exp, metric, mode", [
    (f"{H}@best", H, None, "min"),
    ("abcd@best:loss", "abcd", "loss", "min"),
    ("run.1@best:val/acc:max", "run.1", "val/acc", "max"),
    ("run@best:loss:min", "run", "loss", "min"),
])
def test_best_refs(text, exp, metric, mode):
    ref = parse_ref(text)
    assert ref == Ref(text=text, experiment=exp, best=True, metric=metric, mode=mode)
    assert ref.step is None and not ref.latest


@pytest.mark.parametrize("name", ["baseline", "lr-sweep-2", "A", "run.v2_final", "beefy"])
def test_check_name_accepts(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "latest", "best", "cafe", "0123456789abcdef", "2nd", "a b", "a/b", "x" * 65,
                                  None, 3])
def test_check_name_refuses_with_the_rule(name):
    with pytest.raises(ValueError) as info:
        check_name(name)
    assert repr(name) in str(info.value) and "a letter" in str(info.value)
