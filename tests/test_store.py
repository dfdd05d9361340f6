"""Tests of weightslab/store.py: content-addressed packs, safetensors-compatible, verified on read."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch

from weightslab.errors import CorruptCheckpointError, WeightslabError
from weightslab.storage.layout import Layout
from weightslab.storage.store import DIGEST_ALGORITHM, Blob, BlobRef, BlobStore

DTYPE_TAGS = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def blob_of(t: torch.Tensor) -> Blob:
    return Blob(data=tensor_bytes(t), dtype=DTYPE_TAGS[t.dtype], shape=tuple(t.shape))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(root):
    return BlobStore(Layout(root))


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g, dtype=torch.float64),
        torch.randn(2, 3, generator=g).to(torch.bfloat16),
        torch.randn(7, generator=g).to(torch.float16),
        torch.tensor([True, False, True]),
        torch.arange(-6, 6, dtype=torch.int64).reshape(3, 4),
        torch.arange(10, dtype=torch.uint8),
        torch.tensor(3.25),  # 0-dim
        torch.empty(0, 4),  # 0 bytes
    ]


def test_digest_algorithm_is_sha256():
    assert DIGEST_ALGORITHM == "sha256"


def test_put_returns_refs_in_order_whose_bytes_read_back(store, tensors):
    blobs = [blob_of(t) for t in tensors]
    refs = store.put(blobs)
    assert len(refs) == len(blobs)
    assert len({r.pack for r in refs}) == 1  # one pack per put
    for blob, ref in zip(blobs, refs):
        assert ref.digest == "sha256:" + sha(blob.data)
        assert ref.nbytes == len(blob.data)
        assert bytes(store.read(ref)) == blob.data
    # the offsets are absolute positions in the pack file
    raw = store.pack_path(refs[0]).read_bytes()
    for blob, ref in zip(blobs, refs):
        assert raw[ref.offset:ref.offset + ref.nbytes] == blob.data


def test_read_into_fills_tensor_buffers(store, tensors):
    refs = store.put([blob_of(t) for t in tensors])
    outs = [torch.empty_like(t) for t in tensors]
    store.read_into([(r, memoryview(o.reshape(-1).view(torch.uint8).numpy())) for r, o in zip(refs, outs)])
    for t, o in zip(tensors, outs):
        assert o.dtype == t.dtype and o.shape == t.shape
        assert torch.equal(o, t)


def test_blob_data_may_be_any_contiguous_buffer(store):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    refs = store.put([Blob(memoryview(arr), "F32", (3, 4)), Blob(bytearray(b"abc"), "U8", (3,)),
                      Blob(memoryview(b"xyz"), "U8", (3,))])
    assert bytes(store.read(refs[0])) == arr.tobytes()
    assert bytes(store.read(refs[1])) == b"abc"
    assert bytes(store.read(refs[2])) == b"xyz"


def test_non_contiguous_blob_is_refused(store):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        store.put([Blob(memoryview(arr), "F32", (3, 2))])
    assert not (store.layout.objects_dir).exists()


def test_identical_blobs_are_stored_once(store):
    a = torch.arange(100, dtype=torch.float32)
    b = torch.ones(10)
    refs = store.put([blob_of(a), blob_of(b), blob_of(a.clone()), blob_of(a)])
    assert refs[0] == refs[2] == refs[3]
    assert refs[0].offset != refs[1].offset
    path = store.pack_path(refs[0])
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size == 8 + header_len + 400 + 40  # a's bytes only once


def test_pack_is_a_valid_safetensors_file(store, tensors):
    refs = store.put([blob_of(t) for t in tensors])
    path = store.pack_path(refs[0])
    assert path == store.layout.objects_dir / refs[0].pack[:2] / f"{refs[0].pack[2:]}.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        assert set(f.keys()) == {r.digest.split(":", 1)[1] for r in refs}
        meta = f.metadata()
        assert {k: meta[k] for k in ("format", "format_version", "digest")} == \
            {"format": "weightslab.pack", "format_version": "2", "digest": "sha256"}
        assert set(json.loads(meta["checks"])) == {r.digest.split(":", 1)[1] for r in refs}
        for t, r in zip(tensors, refs):
            got = f.get_tensor(r.digest.split(":", 1)[1])
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t)
    loaded = safetensors.torch.load_file(str(path))
    assert len(loaded) == len(tensors)
    for t, r in zip(tensors, refs):
        got = loaded[r.digest.split(":", 1)[1]]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t)


def test_pack_header_layout(store):
    refs = store.put([Blob(b"12345", "U8", (5,))])
    raw = store.pack_path(refs[0]).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + n]
    assert n % 8 == 0  # data aligned to 8 bytes
    assert refs[0].pack == sha(header)  # the pack is named by the digest of its header
    body = json.loads(header)
    assert body[sha(b"12345")] == {"dtype": "U8", "shape": [5], "data_offsets": [0, 5]}
    assert refs[0].offset == 8 + n
    assert raw[8 + n:] == b"12345"


def test_same_content_twice_gives_same_pack_without_rewriting(store, tensors):
    blobs = [blob_of(t) for t in tensors]
    first = store.put(blobs)
    path = store.pack_path(first[0])
    old = 1_000_000_000
    os.utime(path, (old, old))
    before = path.stat()
    second = store.put([blob_of(t.clone()) for t in tensors])
    assert second == first
    after = path.stat()
    assert after.st_ino == before.st_ino
    assert after.st_mtime_ns == before.st_mtime_ns == old * 10**9
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp left


def test_different_content_gives_different_packs(store):
    r1 = store.put([Blob(b"aaaa", "U8", (4,))])
    r2 = store.put([Blob(b"aaab", "U8", (4,))])
    r3 = store.put([Blob(b"aaaa", "I32", (1,))])  # same bytes under another dtype: stored once
    assert r1[0].pack != r2[0].pack
    assert r3[0] == r1[0]
    assert len(list(store.layout.objects_dir.rglob("*.safetensors"))) == 2
    for r, data in [(r1[0], b"aaaa"), (r2[0], b"aaab"), (r3[0], b"aaaa")]:
        assert bytes(store.read(r)) == data


def test_empty_blobs(store):
    refs = store.put([Blob(b"", "F32", (0,)), Blob(b"x", "U8", (1,)), Blob(bytearray(), "F32", (0, 3))])
    assert refs[0].nbytes == 0 and refs[0].digest == "sha256:" + sha(b"")
    assert refs[0] == refs[2]
    assert store.read(refs[0]) == bytearray()
    store.read_into([(refs[0], bytearray()), (refs[1], bytearray(1))])
    assert bytes(store.read(refs[1])) == b"x"
    loaded = safetensors.torch.load_file(str(store.pack_path(refs[0])))
    assert loaded[sha(b"")].shape == (0,) and loaded[sha(b"x")].tolist() == [ord("x")]


def test_put_of_nothing(store):
    assert store.put([]) == []


def test_blobref_json_round_trip(store):
    (ref,) = store.put([Blob(b"hello", "U8", (5,))])
    data = json.loads(json.dumps(ref.to_json()))
    import xxhash
    assert data == {"digest": ref.digest, "pack": ref.pack, "offset": ref.offset, "nbytes": 5,
                    "check": "xxh3-128:" + xxhash.xxh3_128(b"hello").hexdigest()}
    assert BlobRef.from_json(data) == ref
    assert bytes(store.read(BlobRef.from_json(data))) == b"hello"


def test_exists(store):
    (ref,) = store.put([Blob(b"hello", "U8", (5,))])
    assert store.exists(ref)
    store.pack_path(ref).unlink()
    assert not store.exists(ref)


def test_read_into_across_several_packs(store):
    r1 = store.put([Blob(b"one", "U8", (3,)), Blob(b"two!", "U8", (4,))])
    r2 = store.put([Blob(b"three", "U8", (5,))])
    assert r1[0].pack != r2[0].pack
    outs = [bytearray(3), bytearray(5), bytearray(4)]
    store.read_into([(r1[0], outs[0]), (r2[0], outs[1]), (r1[1], outs[2])])
    assert [bytes(o) for o in outs] == [b"one", b"three", b"two!"]


def test_buffer_of_wrong_size_is_refused(store):
    (ref,) = store.put([Blob(b"hello", "U8", (5,))])
    with pytest.raises(ValueError, match="4 bytes for a blob of 5 bytes"):
        store.read_into([(ref, bytearray(4))])


def flip_byte(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_raises_corrupt_naming_pack_and_checkpoint(store, tensors):
    refs = store.put([blob_of(t) for t in tensors])
    path = store.pack_path(refs[0])
    flip_byte(path, refs[1].offset + 3)
    # other blobs of the same pack still read
    assert bytes(store.read(refs[0])) == tensor_bytes(tensors[0])
    with pytest.raises(CorruptCheckpointError) as info:
        store.read(refs[1], checkpoint="0123456789abcdef@12")
    err = info.value
    msg = str(err)
    assert str(path) in msg
    assert "0123456789abcdef@12" in msg
    assert refs[1].digest in msg and "corrupt" in msg
    assert "Resume an earlier checkpoint" in msg and "wl.verify()" in msg
    assert err.path == path and err.checkpoint == "0123456789abcdef@12"
    assert isinstance(err, WeightslabError) and isinstance(err, ValueError)


def test_flipped_byte_without_checkpoint_still_names_pack(store):
    (ref,) = store.put([Blob(b"\x00" * 64, "U8", (64,))])
    path = store.pack_path(ref)
    flip_byte(path, ref.offset + 63)
    with pytest.raises(CorruptCheckpointError) as info:
        store.read_into([(ref, bytearray(64))])
    assert str(path) in str(info.value) and "(checkpoint " not in str(info.value)
    assert info.value.checkpoint is None


def test_flipped_byte_in_every_position_of_a_blob_is_caught(store):
    data = bytes(range(16))
    (ref,) = store.put([Blob(data, "U8", (16,))])
    path = store.pack_path(ref)
    original = path.read_bytes()
    for i in range(16):
        damaged = bytearray(original)
        damaged[ref.offset + i] ^= 0x80
        path.write_bytes(bytes(damaged))
        with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
            store.read(ref)
    path.write_bytes(original)
    assert bytes(store.read(ref)) == data


def test_truncated_pack_raises_corrupt_mentioning_truncated(store):
    refs = store.put([Blob(b"a" * 100, "U8", (100,)), Blob(b"b" * 100, "U8", (100,))])
    path = store.pack_path(refs[0])
    size = path.stat().st_size
    os.truncate(path, size - 10)
    assert bytes(store.read(refs[0])) == b"a" * 100  # the intact blob still reads
    with pytest.raises(CorruptCheckpointError) as info:
        store.read(refs[1], checkpoint="abcd@7")
    msg = str(info.value)
    assert "truncated" in msg and str(path) in msg and "abcd@7" in msg
    assert "expected 100 bytes" in msg and "found 90" in msg
    assert "Resume an earlier checkpoint" in msg
    assert info.value.path == path


def test_pack_truncated_before_the_blob_starts(store):
    (ref,) = store.put([Blob(b"payload", "U8", (7,))])
    path = store.pack_path(ref)
    os.truncate(path, 8)
    with pytest.raises(CorruptCheckpointError, match="truncated.*found 0"):
        store.read(ref)


def test_missing_pack_raises_corrupt(store):
    (ref,) = store.put([Blob(b"payload", "U8", (7,))])
    path = store.pack_path(ref)
    path.unlink()
    with pytest.raises(CorruptCheckpointError) as info:
        store.read(ref, checkpoint="abcd@1")
    msg = str(info.value)
    assert "missing" in msg and str(path) in msg and "abcd@1" in msg
    assert "Resume an earlier checkpoint" in msg
    assert info.value.path == path and info.value.checkpoint == "abcd@1"


def test_unknown_digest_algorithm_says_upgrade(store):
    (ref,) = store.put([Blob(b"payload", "U8", (7,))])
    odd = BlobRef(digest="blake9:" + "0" * 64, pack=ref.pack, offset=ref.offset, nbytes=ref.nbytes)
    with pytest.raises(CorruptCheckpointError) as info:
        store.read(odd, checkpoint="abcd@2")
    msg = str(info.value)
    assert "'blake9'" in msg and "upgrade weightslab" in msg and str(store.pack_path(ref)) in msg


def test_wrong_offset_in_ref_is_caught_by_digest_and_found_again_by_digest(store):
    refs = store.put([Blob(b"AAAA", "U8", (4,)), Blob(b"BBBB", "U8", (4,))])
    shifted = BlobRef(digest=refs[0].digest, pack=refs[0].pack, offset=refs[1].offset, nbytes=4)
    assert bytes(store.read(shifted)) == b"AAAA"  # the stale location is a hint; the digest finds the blob
    unknown = BlobRef(digest="sha256:" + "0" * 64, pack=refs[0].pack, offset=refs[1].offset, nbytes=4)
    with pytest.raises(CorruptCheckpointError, match="does not match its digest"):
        store.read(unknown)


def test_second_store_over_the_same_root_reads_the_packs(store):
    # A second store object over the same root sees the packs of the first.
    (ref,) = store.put([Blob(b"shared", "U8", (6,))])
    other = BlobStore(Layout(store.layout.root))
    assert bytes(other.read(ref)) == b"shared"


def test_reads_check_the_fast_checksum_and_strong_reads_check_sha256(store):
    import dataclasses
    (ref,) = store.put([Blob(b"payload!", "U8", (8,))])
    assert ref.check and ref.check.startswith("xxh3-128:")
    tampered = dataclasses.replace(ref, check="xxh3-128:" + "0" * 32)
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        store.read(tampered)  # proves the fast checksum is what a normal read verifies
    assert bytes(store.read(tampered, strong=True)) == b"payload!"  # SHA-256 of the same bytes: fine
    wrong_digest = dataclasses.replace(ref, digest="sha256:" + "0" * 64)
    assert bytes(store.read(dataclasses.replace(wrong_digest, check=ref.check))) == b"payload!"
    with pytest.raises(CorruptCheckpointError):
        store.read(wrong_digest, strong=True)


def test_without_xxhash_reads_fall_back_to_sha256(store, monkeypatch):
    import dataclasses
    import sys
    (ref,) = store.put([Blob(b"payload!", "U8", (8,))])
    monkeypatch.setitem(sys.modules, "xxhash", None)  # makes `import xxhash` fail: as if not installed
    store = BlobStore(store.layout)
    tampered = dataclasses.replace(ref, check="xxh3-128:" + "0" * 32)
    assert bytes(store.read(tampered)) == b"payload!"  # the check is ignored, SHA-256 verifies
    (other,) = store.put([Blob(b"no check", "U8", (8,))])
    assert other.check is None
