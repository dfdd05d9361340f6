"""Tests of weightslab/manifest.py: the self-verifying checkpoint manifest, seal and unseal."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from weightslab.codec import encode
from weightslab.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, WeightslabError
from weightslab.storage.atomic import atomic_write
from weightslab.storage.layout import Layout
from weightslab.storage.manifest import FORMAT_VERSION, KIND, READABLE_VERSIONS, Manifest, TensorEntry, canonical_json, seal, unseal
from weightslab.storage.store import Blob, BlobRef, BlobStore

H = "0123456789abcdef"


def ref(i: int, nbytes: int = 48) -> BlobRef:
    return BlobRef(digest="sha256:" + hashlib.sha256(bytes([i])).hexdigest(), pack="ab" * 32,
                   offset=128 + 64 * i, nbytes=nbytes)


def make_manifest(**overrides) -> Manifest:
    tensors: dict[str, torch.Tensor] = {}
    state = encode({"models": {"main": {"w": torch.zeros(3, 4), "b": torch.zeros(3)}},
                    "optimizers": {"opt": {"state": {0: {"step": 3}}, "groups": [{"betas": (0.9, 0.99)}]}},
                    "user": {"epoch": 2, "nan": math.nan}},
                   path="", tensors=tensors)
    fields = dict(
        experiment=H, step=1234567, created="2024-05-01T12:00:00.000001+00:00", created_ns=1714564800000001000,
        reasons=("step", "config_change"),
        changes=({"kind": "config", "lines": ["main.lr: 0.1 -> 0.01"]},),
        metrics=encode({"loss": 0.25, "acc": math.inf}, path="metrics", tensors={}),
        run="run-42", resumed_from=f"{H}@100",
        tensors={"/models/main/w": TensorEntry("F32", (3, 4), ref(1)),
                 "/models/main/b": TensorEntry("BF16", (3,), ref(2, 6)),
                 "/scalar": TensorEntry("I64", (), ref(3, 8))},
        state=state, versions={"weightslab": "0.1.0", "torch": torch.__version__},
    )
    fields.update(overrides)
    return Manifest(**fields)


# --- canonical_json / seal / unseal -------------------------------------------------------------------

def test_canonical_json_is_sorted_compact_utf8():
    assert canonical_json({"b": 1, "a": [1, 2, {"d": "é", "c": None}]}) == '{"a":[1,2,{"c":null,"d":"é"}],"b":1}'


def test_canonical_json_refuses_nan():
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})


def test_seal_adds_digest_over_the_rest_and_ignores_key_order():
    body = {"kind": "k", "format_version": FORMAT_VERSION, "x": [1, 2.5, "é"]}
    data = seal(body)
    doc = json.loads(data)
    rest = {k: v for k, v in doc.items() if k != "digest"}
    assert rest == body
    assert doc["digest"] == "sha256:" + hashlib.sha256(canonical_json(body).encode()).hexdigest()
    assert json.loads(seal(dict(reversed(list(body.items())))))["digest"] == doc["digest"]
    assert "digest" not in body  # the caller's dict is not modified


def test_seal_replaces_a_stale_digest():
    body = {"kind": "k", "format_version": FORMAT_VERSION, "digest": "sha256:stale"}
    doc = json.loads(seal(body))
    assert doc["digest"] != "sha256:stale"
    assert unseal(seal(body), path="p", kind="k") == {"kind": "k", "format_version": FORMAT_VERSION}


def test_unseal_returns_body_without_digest():
    body = {"kind": "k", "format_version": FORMAT_VERSION, "nested": {"a": [1, None, True]}}
    assert unseal(seal(body), path="x.json", kind="k") == body


def test_unseal_wrong_kind():
    data = seal({"kind": "other", "format_version": FORMAT_VERSION})
    with pytest.raises(CorruptCheckpointError) as info:
        unseal(data, path="/r/x.json", kind="k")
    assert "/r/x.json is not a k document" in str(info.value)


def test_seal_refuses_nan():
    with pytest.raises(ValueError):
        seal({"kind": "k", "x": math.nan})


# --- Manifest round trip --------------------------------------------------------------------------

def test_manifest_round_trip_equal_fields():
    m = make_manifest()
    back = Manifest.from_bytes(m.to_bytes(), path="m.json")
    assert back == m
    assert back.experiment == H and back.step == 1234567
    assert back.created == m.created and back.created_ns == m.created_ns
    assert back.reasons == ("step", "config_change") and isinstance(back.reasons, tuple)
    assert back.changes == m.changes and isinstance(back.changes, tuple)
    assert back.metrics == m.metrics
    assert back.run == "run-42" and back.resumed_from == f"{H}@100"
    assert back.versions == m.versions
    assert back.tensors == m.tensors
    assert back.tensors["/scalar"].shape == () and back.tensors["/models/main/w"].shape == (3, 4)
    assert back.tensors["/models/main/b"].blob == ref(2, 6)
    assert back.state == m.state
    # and it is stable: writing the read manifest gives the same bytes
    assert back.to_bytes() == m.to_bytes()


def test_manifest_minimal_round_trip_and_defaults():
    m = Manifest(experiment=H, step=0, created="c", created_ns=0, reasons=())
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.resumed_from is None and back.tensors == {} and back.state == {} and back.run == ""
    assert back.reason == "manual"
    assert back.total_bytes == 0


def test_manifest_properties():
    m = make_manifest()
    assert m.ref == f"{H}@1234567"
    assert m.reason == "step"
    assert m.total_bytes == 48 + 6 + 8


def test_manifest_document_shape():
    m = make_manifest()
    doc = json.loads(m.to_bytes())
    assert doc["format_version"] == FORMAT_VERSION == 2
    assert doc["kind"] == KIND == "weightslab.checkpoint"
    assert doc["digest"].startswith("sha256:") and len(doc["digest"]) == 7 + 64
    assert doc["tensors"]["/models/main/w"] == {"dtype": "F32", "shape": [3, 4], **ref(1).to_json()}
    assert doc["metrics"]["acc"] == {"__wl__": "float", "value": "inf"}


def test_tensor_entry_json_round_trip():
    e = TensorEntry("BOOL", (2, 0, 5), ref(9, 0))
    assert TensorEntry.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_manifest_read_written_file(tmp_path):
    m = make_manifest()
    path = Layout(tmp_path).manifest(H, m.step)
    path.parent.mkdir(parents=True)
    atomic_write(path, m.to_bytes())
    assert Manifest.read(path) == m


def test_manifest_references_real_blobs(tmp_path):
    store = BlobStore(Layout(tmp_path))
    w = torch.arange(6, dtype=torch.float32)
    (r,) = store.put([Blob(w.numpy().tobytes(), "F32", (6,))])
    m = make_manifest(tensors={"w": TensorEntry("F32", (6,), r)})
    back = Manifest.from_bytes(m.to_bytes())
    out = torch.empty(6)
    store.read_into([(back.tensors["w"].blob, memoryview(out.numpy()))], checkpoint=back.ref)
    assert torch.equal(out, w)


# --- damage ---------------------------------------------------------------------------------------

def replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1, old
    return data.replace(old, new, 1)


@pytest.mark.parametrize("old, new", [
    (b'"step": 1234567', b'"step": 1234568'),
    (b'"run-42"', b'"run-43"'),
    (b'"experiment": "0123456789abcdef"', b'"experiment": "0123456789abcdee"'),
    (b'"reasons": [', b'"reasons": ["x", '),
    (b'"nbytes": 48', b'"nbytes": 49'),
    (b'"F32"', b'"F16"'),
    (b'"digest": "sha256:', b'"digest": "sha256:0'),
    (b'"versions": {', b'"versions": {"extra": "1", '),
], ids=["step", "run", "experiment", "reasons", "nbytes", "dtype", "digest", "added-key"])
def test_changed_content_raises_corrupt(tmp_path, old, new):
    path = tmp_path / f"{H}_step_1234567.json"
    data = replace_once(make_manifest().to_bytes(), old, new)
    assert json.loads(data)  # still valid JSON: only the digest can catch it
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as info:
        Manifest.read(path)
    msg = str(info.value)
    assert str(path) in msg and "does not match its digest" in msg
    assert "Resume an earlier checkpoint" in msg and "wl.verify()" in msg
    assert info.value.path == path
    assert isinstance(info.value, ValueError) and isinstance(info.value, WeightslabError)


def _flipped(c: int) -> int | None:
    ch = chr(c)
    if ch.isdigit():
        return ord(str((int(ch) + 1) % 10))
    if ch.isalpha():
        return ord(ch.swapcase()) if ch.swapcase() != ch else ord("a" if ch != "a" else "b")
    return None


def test_every_character_flip_is_caught():
    data = make_manifest().to_bytes()
    original = json.loads(data)
    outcomes = {"corrupt": 0, "version": 0}
    for i, c in enumerate(data):
        new = _flipped(c)
        if new is None:
            continue
        damaged = bytearray(data)
        damaged[i] = new
        try:
            doc = json.loads(bytes(damaged))
        except ValueError:
            doc = None
        assert doc != original, f"flip at {i} changed nothing"
        expected = FormatVersionError if doc is not None and doc.get("format_version") not in READABLE_VERSIONS and \
            doc.get("kind") == KIND else CorruptCheckpointError
        with pytest.raises(expected):
            Manifest.from_bytes(bytes(damaged), path="m.json")
        outcomes["version" if expected is FormatVersionError else "corrupt"] += 1
    assert outcomes["corrupt"] > 500 and outcomes["version"] >= 1


def test_whitespace_changes_do_not_matter():
    m = make_manifest()
    compact = json.dumps(json.loads(m.to_bytes()), separators=(",", ":")).encode()
    assert Manifest.from_bytes(compact) == m


def test_wrong_format_version_raises_format_version_error(tmp_path):
    m = make_manifest()
    body = json.loads(m.to_bytes())
    # control: re-sealing the unchanged body gives a readable manifest
    assert Manifest.from_bytes(seal(body)) == m
    body["format_version"] = 5
    path = tmp_path / "newer.json"
    path.write_bytes(seal(body))  # digest correct, so only the version check can fire
    with pytest.raises(FormatVersionError) as info:
        Manifest.read(path)
    msg = str(info.value)
    assert str(path) in msg and "format_version 5" in msg and "reads versions 1, 2, 3, 4" in msg
    assert "upgrade weightslab" in msg
    assert isinstance(info.value, ValueError) and not isinstance(info.value, CorruptCheckpointError)


@pytest.mark.parametrize("version", [None, "1", 1.5, 0])
def test_missing_or_odd_format_version(version):
    body = json.loads(make_manifest().to_bytes())
    if version is None:
        del body["format_version"]
    else:
        body["format_version"] = version
    with pytest.raises(FormatVersionError, match=f"format_version {version!r}"):
        Manifest.from_bytes(seal(body), path="p.json")


@pytest.mark.parametrize("data", [b"", b"{", b'{"kind": "weightslab.checkpoint",}', b"\xff\xfe\x00garbage",
                                  b"\x00" * 100], ids=["empty", "unclosed", "trailing-comma", "binary", "zeros"])
def test_invalid_json_raises_corrupt_naming_path(tmp_path, data):
    path = tmp_path / "bad.json"
    path.write_bytes(data)
    with pytest.raises(CorruptCheckpointError) as info:
        Manifest.read(path)
    msg = str(info.value)
    assert str(path) in msg and "not valid JSON" in msg and "damaged" in msg
    assert "Resume an earlier checkpoint" in msg
    assert info.value.path == path


def test_truncated_manifest_raises_corrupt(tmp_path):
    path = tmp_path / "m.json"
    data = make_manifest().to_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        Manifest.read(path)


@pytest.mark.parametrize("doc", [[1, 2], "text", 3, None, {"format_version": 1}],
                         ids=["list", "string", "number", "null", "no-kind"])
def test_non_manifest_json_raises_corrupt(doc):
    with pytest.raises(CorruptCheckpointError) as info:
        Manifest.from_bytes(json.dumps(doc).encode(), path="/x/m.json")
    assert "/x/m.json is not a weightslab.checkpoint document" in str(info.value)


def test_experiment_record_is_not_a_manifest():
    data = seal({"kind": "weightslab.experiment", "format_version": FORMAT_VERSION})
    with pytest.raises(CorruptCheckpointError, match="not a weightslab.checkpoint document"):
        Manifest.from_bytes(data, path="e.json")


@pytest.mark.parametrize("field", ["experiment", "step", "created", "created_ns"])
def test_resealed_manifest_missing_a_field_raises_corrupt(field):
    body = json.loads(make_manifest().to_bytes())
    del body[field]
    with pytest.raises(CorruptCheckpointError) as info:
        Manifest.from_bytes(seal(body), path="/r/m.json")
    msg = str(info.value)
    assert "/r/m.json" in msg and "missing a field" in msg and repr(field) in msg


@pytest.mark.parametrize("field, value", [("step", "ten"), ("tensors", {"w": {"dtype": "F32"}}),
                                          ("tensors", {"w": {"dtype": "F32", "shape": ["x"], "digest": "d",
                                                             "pack": "p", "offset": 0, "nbytes": 0}})])
def test_resealed_manifest_with_bad_value_raises_corrupt(field, value):
    body = json.loads(make_manifest().to_bytes())
    body[field] = value
    with pytest.raises(CorruptCheckpointError, match=r"/r/m\.json is missing a field or has a bad value"):
        Manifest.from_bytes(seal(body), path="/r/m.json")


def test_missing_field_message_says_how_to_fix():
    body = json.loads(make_manifest().to_bytes())
    del body["step"]
    with pytest.raises(CorruptCheckpointError) as info:
        Manifest.from_bytes(seal(body), path="/r/m.json")
    assert "Resume an earlier checkpoint" in str(info.value)


def test_read_missing_file_raises_checkpoint_not_found(tmp_path):
    path = tmp_path / "checkpoints" / H / "model" / f"{H}_step_000100.json"
    with pytest.raises(CheckpointNotFoundError) as info:
        Manifest.read(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, WeightslabError)


def test_read_missing_file_message_says_how_to_fix(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(CheckpointNotFoundError) as info:
        Manifest.read(path)
    msg = str(info.value).replace(str(path), "<path>")
    assert re.search(r"\b(pass|resume|Resume|run|use|check|give|expected|list)\b", msg), msg


def test_manifest_is_frozen():
    m = make_manifest()
    with pytest.raises(AttributeError):
        m.step = 5  # type: ignore[misc]
