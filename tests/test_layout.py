"""Tests of weightslab/layout.py: the on-disk paths of DESIGN.md and parsing/listing them back."""

from __future__ import annotations

from pathlib import Path

import pytest

from weightslab.storage.layout import HASH_LENGTH, Layout, is_experiment_hash

H = "0123456789abcdef"
H2 = "fedcba9876543210"


def test_hash_length_is_16():
    assert HASH_LENGTH == 16


def test_root_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = Layout("relative/root")
    assert layout.root == tmp_path / "relative" / "root"
    assert layout.root.is_absolute()


def test_root_expands_user(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert Layout(Path("~/runs")).root == tmp_path / "home" / "runs"


def test_layout_is_frozen(root):
    layout = Layout(root)
    with pytest.raises(AttributeError):
        layout.root = Path("/elsewhere")  # type: ignore[misc]


def test_root_level_paths(root):
    layout = Layout(root)
    assert layout.checkpoints_dir == root / "checkpoints"
    assert layout.objects_dir == root / "objects"
    assert layout.logs_dir == root / "logs"
    assert layout.catalog_path == root / "index.sqlite"


def test_experiment_paths_match_design(root):
    layout = Layout(root)
    exp = root / "checkpoints" / H
    assert layout.experiment_dir(H) == exp
    assert layout.experiment_record(H) == exp / "experiment.json"
    assert layout.model_dir(H) == exp / "model"
    assert layout.hp_dir(H) == exp / "hp"
    assert layout.data_dir(H) == exp / "data"
    assert layout.architecture_text(H) == exp / "model" / f"{H}_architecture.txt"
    assert layout.hyperparams_yaml(H) == exp / "hp" / f"{H}_config.yaml"


@pytest.mark.parametrize("step, name", [
    (0, f"{H}_step_000000.json"),
    (100, f"{H}_step_000100.json"),
    (999999, f"{H}_step_999999.json"),
    (1000000, f"{H}_step_1000000.json"),
    (123456789, f"{H}_step_123456789.json"),
])
def test_manifest_path_is_zero_padded_to_six(root, step, name):
    assert Layout(root).manifest(H, step) == root / "checkpoints" / H / "model" / name


def test_pack_path_fans_out_by_two_hex_digits(root):
    pack_id = "ab" + "c" * 62
    assert Layout(root).pack(pack_id) == root / "objects" / "ab" / ("c" * 62 + ".safetensors")


def test_layout_writes_nothing(root):
    layout = Layout(root)
    layout.manifest(H, 1), layout.pack("ab" * 32), layout.experiments(), layout.manifests(H)
    assert not root.exists()


@pytest.mark.parametrize("step", [0, 1, 100, 999999, 1000000, 12345678901])
def test_parse_manifest_name_inverts_manifest(root, step):
    name = Layout(root).manifest(H, step).name
    assert Layout.parse_manifest_name(name) == (H, step)


@pytest.mark.parametrize("name", [
    f"{H}_step_000100.yaml",
    f"{H}_step_000100.json.tmp",
    f"{H}_step_.json",
    f"{H}_step_-00001.json",
    f"{H}_step_00010a.json",
    f"{H}_architecture.txt",
    f"{H[:15]}_step_000100.json",
    f"{H}0_step_000100.json",
    f"{H.upper()}_step_000100.json",
    f"x{H}_step_000100.json",
    f".tmp.123.abcdef012345.{H}_step_000100.json",
    f"{H}_step_000100",
    "experiment.json",
    "",
])
def test_parse_manifest_name_rejects_other_names(name):
    assert Layout.parse_manifest_name(name) is None


def test_manifest_name_with_trailing_newline_is_rejected():
    assert Layout.parse_manifest_name(f"{H}_step_000100.json\n") is None


def test_experiment_hash_with_trailing_newline_is_rejected():
    assert not is_experiment_hash(H + "\n")


@pytest.mark.parametrize("spelling", ["100", "0000100", "\u0661\u0660\u0660"], ids=["unpadded", "overpadded",
                                                                                   "arabic-indic-digits"])
def test_parse_manifest_name_accepts_only_canonical_step_spelling(root, spelling):
    name = f"{H}_step_{spelling}.json"
    parsed = Layout.parse_manifest_name(name)
    assert parsed is None or Layout(root).manifest(*parsed).name == name


def test_manifests_lists_each_step_once(root):
    layout = Layout(root)
    layout.model_dir(H).mkdir(parents=True)
    layout.manifest(H, 100).write_bytes(b"{}")
    (layout.model_dir(H) / f"{H}_step_100.json").write_bytes(b"{}")
    assert layout.manifests(H) == [(100, layout.manifest(H, 100))]


@pytest.mark.parametrize("text, ok", [
    (H, True), (H2, True), ("0" * 16, True),
    (H[:15], False), (H + "0", False), (H.upper(), False), ("g" * 16, False), ("", False), ("logs", False),
])
def test_is_experiment_hash(text, ok):
    assert is_experiment_hash(text) is ok


def test_experiments_lists_only_16_hex_directories_sorted(root):
    layout = Layout(root)
    assert layout.experiments() == []  # no checkpoints dir at all
    ckpts = root / "checkpoints"
    for name in [H2, H, "0" * 16, H[:15], H + "0", H.upper(), "notes", ".tmp.1.abc.x"]:
        (ckpts / name).mkdir(parents=True)
    (ckpts / "abcdefabcdefabcd").write_bytes(b"a file, not an experiment")
    assert layout.experiments() == ["0" * 16, H, H2]


def test_manifests_sorted_by_integer_step(root):
    layout = Layout(root)
    model = layout.model_dir(H)
    model.mkdir(parents=True)
    steps = [2000000, 5, 999999, 10000000, 1000000, 20, 0]
    for s in steps:
        layout.manifest(H, s).write_bytes(b"{}")
    # noise: other experiment's manifest, non-manifests, a temp file
    (model / f"{H2}_step_000007.json").write_bytes(b"{}")
    (model / f"{H}_architecture.txt").write_bytes(b"tree")
    (model / f".tmp.1.abcdef012345.{H}_step_000008.json").write_bytes(b"{}")
    (model / f"{H}_step_000009.json.bak").write_bytes(b"{}")
    found = layout.manifests(H)
    assert [s for s, _ in found] == sorted(steps)
    assert [p for _, p in found] == [layout.manifest(H, s) for s in sorted(steps)]
    # lexicographic order of the names would differ: that is what the int sort is for
    assert sorted(p.name for _, p in found) != [p.name for _, p in found]


def test_manifests_of_missing_experiment_is_empty(root):
    assert Layout(root).manifests(H) == []


def test_temp_dirs_cover_every_directory_a_save_writes(root):
    layout = Layout(root)
    for h in (H, H2):
        layout.model_dir(h).mkdir(parents=True)
        layout.hp_dir(h).mkdir(parents=True)
    (root / "objects" / "ab").mkdir(parents=True)
    (root / "objects" / "cd").mkdir()
    (root / "objects" / "stray-file").write_bytes(b"")
    (root / "names").mkdir()
    dirs = list(layout.temp_dirs())
    expected = {root, root / "checkpoints", root / "objects", root / "objects" / "ab", root / "objects" / "cd",
                root / "names"}
    for h in (H, H2):
        expected |= {layout.experiment_dir(h), layout.model_dir(h), layout.hp_dir(h)}
    assert set(dirs) == expected
    assert len(dirs) == len(expected)


def test_temp_dirs_of_an_empty_root(root):
    assert list(Layout(root).temp_dirs()) == [root, root / "checkpoints"]


# --- identifiers read from files never build a path out of the root (issue 16) -----------------

@pytest.mark.parametrize("build", [
    lambda layout: layout.pack("/etc/passwd"),
    lambda layout: layout.pack(".." + "../" * 8 + "etc/passwd"),
    lambda layout: layout.pack("A" * 64),
    lambda layout: layout.experiment_dir("../../victim"),
    lambda layout: layout.manifest("../" * 5 + "x", 1),
    lambda layout: layout.manifest(H, -1),
    lambda layout: layout.manifest(H, True),
    lambda layout: layout.shards(H, 1, "../../x"),
    lambda layout: layout.name_file("../x"),
])
def test_a_path_is_never_built_from_an_identifier_out_of_its_grammar(root, build):
    from weightslab.errors import CorruptCheckpointError
    with pytest.raises(CorruptCheckpointError, match="refusing to build a path"):
        build(Layout(root))


def test_contains_means_inside_the_root_with_no_link_on_the_way(tmp_path):
    real = tmp_path / "real"
    (real / "objects" / "ab").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (real / "objects" / "zz").symlink_to(tmp_path / "outside")
    (tmp_path / "alias").symlink_to(real)  # the root itself may be a link
    for layout in (Layout(real), Layout(tmp_path / "alias")):
        assert layout.contains(layout.root) and layout.contains(layout.objects_dir / "ab" / "new-file")
        assert not layout.contains(layout.objects_dir / "zz") and not layout.contains(layout.objects_dir / "zz" / "f")
        assert not layout.contains(tmp_path / "outside") and not layout.contains(layout.root / ".." / "outside")
    assert Layout(real).objects_links() == [real / "objects" / "zz"]


def test_max_step_is_shared_by_the_layout_and_the_identifiers():
    from weightslab.storage import identifiers, layout
    assert layout.MAX_STEP is identifiers.MAX_STEP == 2**63 - 1
