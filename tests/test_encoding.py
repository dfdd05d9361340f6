"""Tests of weightslab/encoding.py: lossless blob encodings, bit-exact round trips, damage detected."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest

import weightslab.storage.encoding as encoding_module
from weightslab.storage.encoding import ENCODINGS, decode, encode, zstandard_module

zstandard = pytest.importorskip("zstandard")

RNG_SEED = 1234


def weights(n: int, *, seed: int = RNG_SEED, scale: float = 0.02) -> np.ndarray:
    """float32 values distributed like freshly initialised weights."""
    return (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)


def special_floats() -> np.ndarray:
    """float32 bit patterns that a float comparison would get wrong or hide."""
    bits = np.array([
        0x7FC00000,  # canonical quiet NaN
        0x7FC00001,  # quiet NaN with a payload
        0xFFBADBAD,  # negative NaN with a payload
        0x7F800001,  # signalling NaN
        0x80000000,  # -0.0
        0x00000000,  # +0.0
        0x7F800000,  # inf
        0xFF800000,  # -inf
        0x00000001,  # smallest subnormal
        0x807FFFFF,  # largest negative subnormal
        0x7F7FFFFF,  # largest finite
    ], dtype=np.uint32)
    return np.tile(bits, 37).view(np.float32)  # repeated, so a tail and the shuffle both matter


def bfloat16_like(n: int) -> np.ndarray:
    """The upper half of float32 weights: what a bfloat16 tensor's bytes look like."""
    return (weights(n).view(np.uint32) >> 16).astype(np.uint16)


# (name, array): the raw bytes of each are encoded with the array's itemsize.
SAMPLES = [
    ("float32", weights(10_000)),
    ("float16", weights(10_001).astype(np.float16)),
    ("bfloat16", bfloat16_like(9_999)),
    ("int64", np.random.default_rng(RNG_SEED).integers(-(2**40), 2**40, 5_000, dtype=np.int64)),
    ("complex128", (weights(300) + 1j * weights(300, seed=9)).astype(np.complex128)),  # itemsize 16
    ("bool", np.random.default_rng(RNG_SEED).random(4_097) < 0.3),
    ("uint8", np.random.default_rng(RNG_SEED).integers(0, 256, 4_097, dtype=np.uint8)),
    ("0-d", np.array(1.5, dtype=np.float32)),
    ("empty", np.zeros(0, dtype=np.float32)),
    ("zeros", np.zeros(300_000, dtype=np.float32)),  # zstd stores these as RLE blocks
    ("special-floats", special_floats()),
]


def random_base(nbytes: int, seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def roundtrip(data: np.ndarray, encoding: str, *, itemsize: int | None = None, base=None, **kw) -> bytes:
    itemsize = data.dtype.itemsize if itemsize is None else itemsize
    stored = encode(data, itemsize=itemsize, encoding=encoding, base=base, **kw)
    restored = decode(stored, itemsize=itemsize, encoding=encoding, raw_nbytes=data.nbytes, base=base)
    assert isinstance(restored, memoryview)
    assert restored.nbytes == data.nbytes
    return bytes(restored)


# --- round trips --------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("name,data", SAMPLES, ids=[s[0] for s in SAMPLES])
def test_roundtrip_is_bit_exact(name, data, encoding):
    base = random_base(data.nbytes) if encoding == "xor-zstd" else None
    # Compare raw bytes: NaN != NaN and -0.0 == 0.0 would make a float comparison lie.
    assert roundtrip(data, encoding, base=base) == data.tobytes()


@pytest.mark.parametrize("encoding", ["zstd", "xor-zstd"])
@pytest.mark.parametrize("nbytes", [1, 3, 5, 7, 4 * 1000 + 3, 8 * 123 + 7])
@pytest.mark.parametrize("itemsize", [2, 4, 8, 16])
def test_roundtrip_with_a_partial_trailing_element(nbytes, itemsize, encoding):
    # Lengths that are not a multiple of itemsize: whole elements are shuffled, the tail kept as is.
    data = random_base(nbytes, seed=nbytes)
    base = random_base(nbytes, seed=7) if encoding == "xor-zstd" else None
    assert roundtrip(data, encoding, itemsize=itemsize, base=base) == data.tobytes()


def test_roundtrip_across_block_boundaries():
    # Larger than the internal 1 MiB block and not a multiple of it, so several blocks and a short
    # last one are shuffled; itemsize 3 makes blocks end mid-uint64 for the XOR.
    data = random_base((1 << 20) * 2 + 12_345, seed=3)
    base = random_base(data.nbytes, seed=4)
    for itemsize in (3, 4):
        assert roundtrip(data, "xor-zstd", itemsize=itemsize, base=base) == data.tobytes()
        assert roundtrip(data, "zstd", itemsize=itemsize) == data.tobytes()


def test_zstd_frame_holds_the_documented_shuffle():
    # The stored format is on disk for years: pin it. Byte i of element j sits at i * n + j, and
    # the bytes after the last whole element follow unchanged.
    data = random_base(4 * 5 + 3, seed=5)
    stored = encode(data, itemsize=4, encoding="zstd")
    plain = zstandard.ZstdDecompressor().decompress(stored)
    expected = data[:20].reshape(5, 4).T.tobytes() + data[20:].tobytes()
    assert plain == expected
    assert plain != data.tobytes()


def test_xor_zstd_frame_holds_the_shuffled_xor():
    data, base = random_base(64, seed=1), random_base(64, seed=2)
    stored = encode(data, itemsize=8, encoding="xor-zstd", base=base)
    plain = zstandard.ZstdDecompressor().decompress(stored)
    assert plain == np.bitwise_xor(data, base).reshape(8, 8).T.tobytes()


@pytest.mark.parametrize("encoding", ["zstd", "xor-zstd"])
def test_encoding_is_deterministic(encoding):
    # Blobs are named by their digest: the same tensor must encode to the same bytes.
    data = weights(50_000)
    base = weights(50_000, seed=5) if encoding == "xor-zstd" else None
    first = encode(data, itemsize=4, encoding=encoding, base=base)
    assert encode(data.copy(), itemsize=4, encoding=encoding, base=base) == first


def test_level_and_threads_round_trip():
    data = weights(200_000)
    for level, threads in [(3, 0), (1, 2), (-5, 0)]:
        assert roundtrip(data, "zstd", level=level, threads=threads) == data.tobytes()


def test_raw_encode_returns_a_view_not_a_copy():
    data = weights(100)
    stored = encode(data, itemsize=4, encoding="raw")
    assert isinstance(stored, memoryview)
    data[0] = 42.0  # a view sees the change; a copy would not
    assert bytes(stored) == data.tobytes()


def test_accepts_any_contiguous_bytes_like():
    data = weights(1_000)
    for form in (data.tobytes(), bytearray(data.tobytes()), memoryview(data), data.reshape(10, 100)):
        assert bytes(decode(encode(form, itemsize=4, encoding="zstd"), itemsize=4, encoding="zstd",
                            raw_nbytes=data.nbytes)) == data.tobytes()


def test_non_contiguous_input_is_refused():
    with pytest.raises(ValueError, match="C-contiguous"):
        encode(weights(100).reshape(10, 10).T, itemsize=4, encoding="zstd")


@pytest.mark.parametrize("itemsize", [0, -4, 2.0, True])
def test_bad_itemsize_is_refused(itemsize):
    with pytest.raises(ValueError, match="itemsize"):
        encode(b"abcd", itemsize=itemsize, encoding="zstd")


# --- xor-zstd and its base ------------------------------------------------------------------------
def test_xor_zstd_restores_only_with_the_right_base():
    base = weights(20_000)
    data = (base * (1 + 1e-3 * np.random.default_rng(5).standard_normal(base.size))).astype(np.float32)
    stored = encode(data, itemsize=4, encoding="xor-zstd", base=base)
    right = decode(stored, itemsize=4, encoding="xor-zstd", raw_nbytes=data.nbytes, base=base)
    assert bytes(right) == data.tobytes()
    wrong_base = weights(20_000, seed=77)
    wrong = decode(stored, itemsize=4, encoding="xor-zstd", raw_nbytes=data.nbytes, base=wrong_base)
    assert bytes(wrong) != data.tobytes()
    # XOR is its own inverse: what comes out is the data with the two bases' difference applied.
    assert bytes(wrong) == np.bitwise_xor(data.view(np.uint8),
                                          np.bitwise_xor(base.view(np.uint8), wrong_base.view(np.uint8))).tobytes()


def test_base_of_the_wrong_length_is_refused_on_encode():
    with pytest.raises(ValueError, match=r"base holds 396 bytes but data holds 400") as info:
        encode(weights(100), itemsize=4, encoding="xor-zstd", base=weights(99))
    assert "damaged" not in str(info.value)  # the caller's mistake, not damage


def test_base_of_the_wrong_length_on_decode_reports_damage():
    stored = encode(weights(100), itemsize=4, encoding="xor-zstd", base=weights(100, seed=2))
    with pytest.raises(ValueError, match=r"damaged.*396 bytes.*400"):
        decode(stored, itemsize=4, encoding="xor-zstd", raw_nbytes=400, base=weights(99))


def test_xor_zstd_needs_a_base_and_other_encodings_refuse_one():
    with pytest.raises(ValueError, match="needs base"):
        encode(weights(10), itemsize=4, encoding="xor-zstd")
    stored = encode(weights(10), itemsize=4, encoding="xor-zstd", base=weights(10, seed=3))
    with pytest.raises(ValueError, match="needs base"):
        decode(stored, itemsize=4, encoding="xor-zstd", raw_nbytes=40)
    for name in ("raw", "zstd"):
        with pytest.raises(ValueError, match="takes no base"):
            encode(weights(10), itemsize=4, encoding=name, base=weights(10))


# --- compression ratios ----------------------------------------------------------------------------
# Measured on this machine (zstd level 1, 1M float32 weights ~ N(0, 0.02)):
#   zstd, float32 random weights:                                    0.842 of the raw size
#   zstd with itemsize=1 (no shuffle), same weights:                 0.925
#   xor-zstd, weights * (1 + 1e-3 * noise) against the weights:      0.542
#   xor-zstd, weights + 1e-4 * noise (about 5e-3 relative):          0.638
def compressed_ratio(data: np.ndarray, encoding: str, base=None, itemsize: int | None = None) -> float:
    stored = encode(data, itemsize=itemsize or data.dtype.itemsize, encoding=encoding, base=base)
    return len(stored) / data.nbytes


def test_shuffle_makes_float_weights_compress():
    data = weights(1 << 18)
    shuffled = compressed_ratio(data, "zstd")
    unshuffled = compressed_ratio(data, "zstd", itemsize=1)
    assert shuffled < 0.87
    assert shuffled < unshuffled - 0.05


def test_xor_of_small_updates_compresses():
    base = weights(1 << 18)
    noise = np.random.default_rng(11).standard_normal(base.size)
    updated = (base + 1e-4 * noise).astype(np.float32)
    delta = compressed_ratio(updated, "xor-zstd", base=base)
    assert delta < 0.9
    assert delta < compressed_ratio(updated, "zstd") - 0.1  # the delta is what helps, not zstd alone
    relative = (base * (1 + 1e-3 * noise)).astype(np.float32)
    assert compressed_ratio(relative, "xor-zstd", base=base) < 0.6


def test_zeros_and_unchanged_tensors_compress_to_almost_nothing():
    zeros = np.zeros(1 << 18, dtype=np.float32)
    assert compressed_ratio(zeros, "zstd") < 0.001
    data = weights(1 << 18)
    assert compressed_ratio(data, "xor-zstd", base=data.copy()) < 0.001  # an unchanged tensor


# --- damage ---------------------------------------------------------------------------------------
def stored_float32(encoding: str = "zstd"):
    data = weights(10_000)
    base = weights(10_000, seed=8) if encoding == "xor-zstd" else None
    return data, base, encode(data, itemsize=4, encoding=encoding, base=base)


@pytest.mark.parametrize("encoding", ["zstd", "xor-zstd"])
@pytest.mark.parametrize("where", [0, 5, "middle", -1, -5])
def test_a_flipped_byte_is_reported_as_damage(encoding, where):
    data, base, stored = stored_float32(encoding)
    damaged = bytearray(stored)
    index = len(damaged) // 2 if where == "middle" else where  # magic, header, data, checksum
    damaged[index] ^= 0x10
    with pytest.raises(ValueError, match="stored blob is damaged"):
        decode(damaged, itemsize=4, encoding=encoding, raw_nbytes=data.nbytes, base=base)


@pytest.mark.parametrize("keep", [0, 3, 5, 10, "half", -4, -1])  # -4, -1: the checksum cut
def test_truncated_input_is_reported_as_damage(keep):
    data, _, stored = stored_float32()
    cut = stored[:len(stored) // 2] if keep == "half" else stored[:keep]
    with pytest.raises(ValueError, match="stored blob is damaged"):
        decode(cut, itemsize=4, encoding="zstd", raw_nbytes=data.nbytes)


def test_trailing_bytes_are_reported_as_damage():
    data, _, stored = stored_float32()
    for extra in (b"\0", stored):  # junk, and a second frame
        with pytest.raises(ValueError, match="stored blob is damaged"):
            decode(stored + extra, itemsize=4, encoding="zstd", raw_nbytes=data.nbytes)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("delta", [-4, -1, 1, 4])
def test_wrong_raw_nbytes_is_reported_as_damage(encoding, delta):
    data, base, stored = stored_float32(encoding)
    if base is not None:
        base = np.concatenate([base, np.zeros(1, np.float32)]).view(np.uint8)[:data.nbytes + delta]
    with pytest.raises(ValueError, match=rf"stored blob is damaged.*{data.nbytes + delta}"):
        decode(stored, itemsize=4, encoding=encoding, raw_nbytes=data.nbytes + delta, base=base)


def test_empty_stored_blob_is_damage_unless_raw_and_empty():
    with pytest.raises(ValueError, match="stored blob is damaged"):
        decode(b"", itemsize=4, encoding="zstd", raw_nbytes=0)
    assert bytes(decode(b"", itemsize=4, encoding="raw", raw_nbytes=0)) == b""


# --- out= -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("itemsize", [1, 4])
def test_decode_writes_into_out(encoding, itemsize):
    data, base, _ = stored_float32(encoding)
    stored = encode(data, itemsize=itemsize, encoding=encoding, base=base)
    out = bytearray(b"\xee" * data.nbytes)
    result = decode(stored, itemsize=itemsize, encoding=encoding, raw_nbytes=data.nbytes, base=base, out=out)
    assert bytes(out) == data.tobytes()  # the caller's own buffer holds the bytes
    assert result.obj is out
    target = np.full(data.shape, np.nan, dtype=np.float32)  # a numpy array, as a tensor's .numpy() is
    decode(stored, itemsize=itemsize, encoding=encoding, raw_nbytes=data.nbytes, base=base, out=target)
    assert target.tobytes() == data.tobytes()


@pytest.mark.parametrize("itemsize", [1, 4])
def test_delta_decodes_into_the_buffer_that_holds_its_base(itemsize):
    # Restoring in place: the tensor being overwritten holds the previous version, the base.
    previous = weights(300_000)
    current = (previous * 1.001).astype(np.float32)
    stored = encode(current, itemsize=itemsize, encoding="xor-zstd", base=previous)
    tensor = previous.copy()
    decode(stored, itemsize=itemsize, encoding="xor-zstd", raw_nbytes=tensor.nbytes, base=tensor, out=tensor)
    assert tensor.tobytes() == current.tobytes()


def test_decode_without_out_returns_a_writable_buffer():
    data, _, stored = stored_float32()
    result = decode(stored, itemsize=4, encoding="zstd", raw_nbytes=data.nbytes)
    assert not result.readonly


def test_out_must_be_writable_and_the_right_size():
    data, _, stored = stored_float32()
    with pytest.raises(ValueError, match="read-only"):
        decode(stored, itemsize=4, encoding="zstd", raw_nbytes=data.nbytes, out=bytes(data.nbytes))
    with pytest.raises(ValueError, match=rf"out holds {data.nbytes - 1} bytes"):
        decode(stored, itemsize=4, encoding="zstd", raw_nbytes=data.nbytes, out=bytearray(data.nbytes - 1))


# --- errors that name the fix ---------------------------------------------------------------------
def test_unknown_encoding_lists_the_known_ones():
    for call in (lambda: encode(b"abcd", itemsize=4, encoding="lz4"),
                 lambda: decode(b"abcd", itemsize=4, encoding="lz4", raw_nbytes=4)):
        with pytest.raises(ValueError, match="unknown encoding 'lz4'") as info:
            call()
        assert all(repr(name) in str(info.value) for name in ENCODINGS)


def test_missing_zstandard_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "zstandard", None)  # makes `import zstandard` fail
    with pytest.raises(ImportError, match=r"pip install 'weightslab\[zstd\]'") as info:
        zstandard_module()
    assert isinstance(info.value.__cause__, ImportError)
    with pytest.raises(ImportError, match=r"weightslab\[zstd\]"):
        encode(b"abcd", itemsize=4, encoding="zstd")
    # "raw" needs no compressor, so it keeps working.
    assert bytes(decode(encode(b"abcd", itemsize=4, encoding="raw"), itemsize=4, encoding="raw",
                        raw_nbytes=4)) == b"abcd"


def test_module_does_not_import_torch():
    # The store knows bytes, not torch: encoding.py must stay importable and fast without it.
    tree = ast.parse(Path(encoding_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "torch" not in imported
    assert "numpy" in imported
