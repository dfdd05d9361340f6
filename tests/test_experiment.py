"""Tests of weightslab/experiment.py: the experiment record, its parent link, and lineage."""

from __future__ import annotations

import json
import re

import pytest
import torch

from weightslab.errors import CorruptCheckpointError, FormatVersionError
from weightslab.fingerprint import ExperimentHashGenerator
from weightslab.storage.experiment import ExperimentRecord, Parent, descendants
from weightslab.storage.manifest import FORMAT_VERSION, READABLE_VERSIONS, Manifest, seal

PARENT_HASH = "fedcba9876543210"


@pytest.fixture(scope="module")
def fingerprint():
    torch.manual_seed(0)
    return ExperimentHashGenerator().fingerprint({"main": torch.nn.Linear(2, 3)}, {"main": {"lr": 0.1}})


def make_record(fp, *, parent=None, excluded=("log_every", "device", "checkpoint"), text="tree\n"):
    return ExperimentRecord.open(
        fp, created="2024-05-01T12:00:00+00:00", excluded_keys=excluded, parent=parent,
        versions={"weightslab": "0.1.0", "torch": torch.__version__}, architecture_text=text,
        hyperparams_values={"main": {"lr": 0.1, "device": "cpu"}})


def test_open_copies_the_fingerprint(fingerprint):
    rec = make_record(fingerprint)
    assert len(fingerprint.hash) == 16
    assert rec.hash == fingerprint.hash
    assert rec.architecture_digest == fingerprint.architecture_digest
    assert rec.hyperparams_digest == fingerprint.hyperparams_digest
    assert rec.architecture == fingerprint.architecture
    assert rec.hyperparams == {"main": {"lr": 0.1}}
    assert rec.excluded_keys == ("checkpoint", "device", "log_every")  # sorted tuple
    assert rec.parent is None


def test_round_trip_without_parent(fingerprint):
    rec = make_record(fingerprint)
    back = ExperimentRecord.from_bytes(rec.to_bytes(), path="experiment.json")
    assert back == rec
    assert back.hash == fingerprint.hash and back.created == "2024-05-01T12:00:00+00:00"
    assert back.architecture == fingerprint.architecture
    assert back.architecture[0][0] == "main"
    assert back.architecture[0][1][0]["class"] == "torch.nn.modules.linear.Linear"
    assert back.architecture[0][1][0]["params"] == [["weight", [3, 2], "float32"], ["bias", [3], "float32"]]
    assert back.hyperparams == {"main": {"lr": 0.1}}
    assert back.excluded_keys == ("checkpoint", "device", "log_every") and isinstance(back.excluded_keys, tuple)
    assert back.versions == {"weightslab": "0.1.0", "torch": torch.__version__}
    assert back.parent is None


def test_round_trip_with_parent(fingerprint):
    parent = Parent(PARENT_HASH, 1200, "config_change", ("main.lr: 0.2 -> 0.1", "main.wd: added 0.01"))
    rec = make_record(fingerprint, parent=parent)
    back = ExperimentRecord.from_bytes(rec.to_bytes(), path="experiment.json")
    assert back == rec
    assert back.parent == parent
    assert isinstance(back.parent.changes, tuple)
    assert back.parent.ref == f"{PARENT_HASH}@1200"
    assert back.to_bytes() == rec.to_bytes()


def test_descriptive_fields_are_not_stored_and_not_compared(fingerprint):
    rec = make_record(fingerprint, text="a readable tree\n")
    doc = json.loads(rec.to_bytes())
    assert "architecture_text" not in doc and "hyperparams_values" not in doc
    assert "a readable tree" not in rec.to_bytes().decode()
    back = ExperimentRecord.from_bytes(rec.to_bytes(), path="e.json")
    assert back.architecture_text == "" and back.hyperparams_values == {}
    assert back == rec  # compare=False


def test_document_shape(fingerprint):
    rec = make_record(fingerprint, parent=Parent(PARENT_HASH, 5, "model_change"))
    doc = json.loads(rec.to_bytes())
    assert doc["kind"] == "weightslab.experiment" and doc["format_version"] == FORMAT_VERSION
    assert doc["experiment"] == fingerprint.hash
    assert doc["parent"] == {"ref": f"{PARENT_HASH}@5", "experiment": PARENT_HASH, "step": 5,
                             "reason": "model_change", "changes": []}
    assert doc["digest"].startswith("sha256:")


def test_same_fingerprint_gives_same_bytes(fingerprint):
    torch.manual_seed(123)  # weights differ; architecture does not
    fp2 = ExperimentHashGenerator().fingerprint({"main": torch.nn.Linear(2, 3)}, {"main": {"lr": 0.1}})
    assert make_record(fp2).to_bytes() == make_record(fingerprint).to_bytes()
    fp3 = ExperimentHashGenerator().fingerprint({"main": torch.nn.Linear(2, 3)}, {"main": {"lr": 0.2}})
    assert fp3.hash != fingerprint.hash
    assert ExperimentRecord.from_bytes(make_record(fp3).to_bytes(), path="e").hyperparams == {"main": {"lr": 0.2}}


def test_parent_json_round_trip():
    p = Parent(PARENT_HASH, 0, "resume_with_changes", ("x",))
    assert Parent.from_json(json.loads(json.dumps(p.to_json()))) == p
    assert Parent.from_json({"experiment": PARENT_HASH, "step": "7", "reason": "r"}) == Parent(PARENT_HASH, 7, "r")


@pytest.mark.parametrize("old, new", [
    (b'"lr": 0.1', b'"lr": 0.2'),
    (b'"created": "2024', b'"created": "2025'),
    (b'"step": 1200', b'"step": 1201'),
    (b'"config_change"', b'"model_change"'),
    (b'"float32"', b'"float64"'),
    (b'"log_every"', b'"log_evers"'),
], ids=["hyperparam", "created", "parent-step", "reason", "architecture", "excluded"])
def test_damaged_bytes_raise_corrupt_naming_path(fingerprint, tmp_path, old, new):
    rec = make_record(fingerprint, parent=Parent(PARENT_HASH, 1200, "config_change"))
    data = rec.to_bytes()
    assert old in data
    path = tmp_path / "checkpoints" / fingerprint.hash / "experiment.json"
    with pytest.raises(CorruptCheckpointError) as info:
        ExperimentRecord.from_bytes(data.replace(old, new, 1), path=path)
    assert str(path) in str(info.value) and "does not match its digest" in str(info.value)
    assert info.value.path == path


def test_damaged_record_message_says_how_to_fix(fingerprint, tmp_path):
    data = make_record(fingerprint).to_bytes().replace(b'"lr": 0.1', b'"lr": 0.2', 1)
    path = tmp_path / "experiment.json"
    with pytest.raises(CorruptCheckpointError) as info:
        ExperimentRecord.from_bytes(data, path=path)
    msg = str(info.value).replace(str(path), "<path>")
    assert re.search(r"\b(pass|resume|Resume|run|use|check|give|delete|remove|restore)\b", msg), msg


@pytest.mark.parametrize("data", [b"", b"{not json", b"\xff\xfe\xfd", b"[]", b'"text"'])
def test_unreadable_bytes_raise_corrupt(data):
    with pytest.raises(CorruptCheckpointError) as info:
        ExperimentRecord.from_bytes(data, path="/r/experiment.json")
    assert "/r/experiment.json" in str(info.value)


def test_manifest_is_not_an_experiment_record():
    data = Manifest(experiment=PARENT_HASH, step=1, created="c", created_ns=1, reasons=()).to_bytes()
    with pytest.raises(CorruptCheckpointError, match="not a weightslab.experiment document"):
        ExperimentRecord.from_bytes(data, path="e.json")


def test_newer_format_version_raises_format_version_error(fingerprint):
    body = json.loads(make_record(fingerprint).to_bytes())
    body["format_version"] = max(READABLE_VERSIONS) + 1
    with pytest.raises(FormatVersionError) as info:
        ExperimentRecord.from_bytes(seal(body), path="/r/experiment.json")
    assert "/r/experiment.json" in str(info.value) and "upgrade weightslab" in str(info.value)


def test_sealed_record_missing_a_field_raises_corrupt(fingerprint):
    body = json.loads(make_record(fingerprint).to_bytes())
    del body["architecture"]
    with pytest.raises(CorruptCheckpointError) as info:
        ExperimentRecord.from_bytes(seal(body), path="/r/experiment.json")
    assert "/r/experiment.json" in str(info.value)


# --- descendants ----------------------------------------------------------------------------------

def test_descendants_of_a_chain():
    parents = {"a": None, "b": "a", "c": "b", "d": "c"}
    assert descendants("a", parents) == {"a", "b", "c", "d"}
    assert descendants("c", parents) == {"c", "d"}
    assert descendants("d", parents) == {"d"}


def test_descendants_with_branches():
    parents = {"root": None, "x": "root", "y": "root", "x1": "x", "x2": "x", "y1": "y", "y11": "y1",
               "other": None, "o1": "other"}
    assert descendants("root", parents) == {"root", "x", "y", "x1", "x2", "y1", "y11"}
    assert descendants("x", parents) == {"x", "x1", "x2"}
    assert descendants("y", parents) == {"y", "y1", "y11"}
    assert descendants("other", parents) == {"other", "o1"}


def test_descendants_with_a_cycle_terminates():
    # a -> b -> c -> a: an experiment changed back to an earlier configuration
    parents = {"a": "c", "b": "a", "c": "b", "d": "b", "e": None}
    assert descendants("a", parents) == {"a", "b", "c", "d"}
    assert descendants("d", parents) == {"d"}
    assert descendants("e", parents) == {"e"}


def test_descendants_self_parent_and_unknown_root():
    assert descendants("a", {"a": "a"}) == {"a"}
    assert descendants("zzz", {"a": None, "b": "a"}) == {"zzz"}
    assert descendants("a", {}) == {"a"}


def test_descendants_through_a_parent_missing_from_the_map():
    # 'gone' was deleted (not a key) but children still name it
    parents = {"k1": "gone", "k2": "k1"}
    assert descendants("gone", parents) == {"gone", "k1", "k2"}


def test_descendants_from_real_records(fingerprint):
    child_fp = ExperimentHashGenerator().fingerprint({"main": torch.nn.Linear(2, 4)}, {"main": {"lr": 0.1}})
    root_rec = make_record(fingerprint)
    child = make_record(child_fp, parent=Parent(root_rec.hash, 10, "model_change"))
    records = [ExperimentRecord.from_bytes(r.to_bytes(), path="e") for r in (root_rec, child)]
    parents = {r.hash: r.parent.experiment if r.parent else None for r in records}
    assert descendants(root_rec.hash, parents) == {root_rec.hash, child_fp.hash}
    assert descendants(child_fp.hash, parents) == {child_fp.hash}
