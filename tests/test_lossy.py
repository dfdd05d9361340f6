"""Tests of weightslab/storage/lossy.py: the lossy archive codecs (LC-Checkpoint, ExCP).

Every test checks values or bytes: error bounds elementwise, decode(payload) bit-identical to what
the encoder said a reader would get, closed-loop chains not accumulating error (and an open-loop
chain, the thing the closed loop prevents, accumulating it), second moments never negative,
storage-dtype round trips, parameter checks and damaged payloads.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from weightslab.storage.lossy import (CODECS, FLOAT_DTYPES, ExcpParams, LcParams, Member, codec_params, decode,
                                      encode_group, params_from_json, to_compute, to_storage)

pytest.importorskip("zstandard")

SEED = 20240


def rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


def compute_dtype(dtype: str) -> type:
    return np.float64 if dtype == "F64" else np.float32


def in_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` made representable in ``dtype`` (what a checkpoint tensor would hold)."""
    return to_compute(to_storage(values, dtype), dtype)


def spacing(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of the storage dtype at ``values`` (the rounding the bound allows)."""
    mantissa = {"F16": 10, "BF16": 7, "F32": 23, "F64": 52}[dtype]
    tiny = {"F16": 2.0 ** -24, "BF16": 2.0 ** -133, "F32": 2.0 ** -149, "F64": 2.0 ** -1074}[dtype]
    magnitude = np.abs(values.astype(np.float64))
    return np.maximum(2.0 ** (np.floor(np.log2(np.maximum(magnitude, tiny))) - mantissa), tiny)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def weight_pair(n: int, dtype: str, *, rel: float = 1e-3, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(target, base): weights of scale 0.02 and a random update ``rel`` times as large."""
    gen = rng(offset)
    base = in_storage(gen.standard_normal(n) * 0.02, dtype)
    target = in_storage(base.astype(np.float64) + gen.standard_normal(n) * 0.02 * rel, dtype)
    return target, base


def adam_second_moment(n: int, dtype: str, offset: int = 0) -> np.ndarray:
    """Values spanning 30 orders of magnitude, with exact zeros (parameters never given a gradient)."""
    gen = rng(offset)
    values = np.exp(gen.uniform(np.log(1e-30), np.log(1e2), n))
    values[gen.random(n) < 0.1] = 0.0
    if dtype in ("F16",):
        values = np.minimum(values, 6e4)
    return in_storage(values, dtype)


def roundtrip(params, members: list[Member]) -> list:
    """Encode a group and check each payload decodes bitwise to its ``decoded``."""
    results = encode_group(params, members)
    assert len(results) == len(members)
    for member, result in zip(members, results):
        again = decode(result.payload, member.base, dtype=member.dtype, size=member.target.size)
        assert same_bits(again, result.decoded), member.key
        assert result.decoded.dtype == compute_dtype(member.dtype)
        diff = result.decoded.astype(np.float64) - member.target
        assert result.max_abs == pytest.approx(np.abs(diff).max() if diff.size else 0.0, rel=1e-5, abs=1e-30)
    return results


# --- dtypes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_storage_round_trip_is_bit_exact_for_every_bit_pattern(dtype):
    itemsize = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}[dtype]
    raw = rng().integers(0, 256, 4096 * itemsize, dtype=np.uint8).tobytes()
    if itemsize == 2:  # every 16-bit pattern: NaN payloads, infinities, subnormals, -0.0
        raw = np.arange(1 << 16, dtype="<u2").tobytes()
    values = to_compute(raw, dtype)
    assert values.dtype == compute_dtype(dtype) and values.size == len(raw) // itemsize
    assert to_storage(values, dtype) == raw


def test_bf16_rounds_to_nearest_even_and_keeps_nan():
    one = 1.0
    half_ulp = 2.0 ** -8  # bf16 has 7 mantissa bits: ulp(1) = 2**-7
    values = np.array([one + half_ulp, one + 3 * half_ulp, one + half_ulp * 1.01, -(one + half_ulp), np.nan,
                       3.4e38, 1.5], dtype=np.float32)
    got = np.frombuffer(to_storage(values, "BF16"), dtype="<u2")
    want = [0x3F80, 0x3F82, 0x3F81, 0xBF80, None, 0x7F80, 0x3FC0]  # ties to even; 3.4e38 overflows to inf
    for g, w in zip(got, want):
        if w is not None:
            assert g == w
    assert (got[4] & 0x7F80) == 0x7F80 and (got[4] & 0x7F)  # still a NaN
    assert to_compute(to_storage(np.array([1.5], np.float64), "BF16"), "BF16")[0] == 1.5


# --- LC-Checkpoint ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [1, 3, 8])
def test_lc_error_is_within_the_delta_elementwise(dtype, bits):
    target, base = weight_pair(20_000, dtype, rel=1e-2, offset=bits)
    (result,) = roundtrip(LcParams(bits=bits), [Member("w", dtype, target, base, "weight")])
    delta = np.abs(target.astype(np.float64) - base)
    err = np.abs(result.decoded.astype(np.float64) - target)
    slack = spacing(np.maximum(np.abs(target), np.abs(result.decoded)), dtype)
    assert (err <= delta + slack).all()
    # more bits keep more buckets: 8 bits keeps all of a 1e-2 update's binades in F32
    if bits == 8 and dtype in ("F32", "F64"):
        assert result.rel_l2 < 0.01 * 0.4
    kept = result.decoded != base
    assert kept.any()


def test_lc_keeps_largest_exponents_as_bucket_means():
    base = np.zeros(8, np.float32)
    # buckets: +[4,8): 5, 7 ; -[4,8): -6 ; +[2,4): 3 ; +[1,2): 1.5 ; -[0.5,1): -0.75
    target = np.array([5, 7, -6, 3, 1.5, -0.75, 0, 7], np.float32)
    (result,) = roundtrip(LcParams(bits=2), [Member("w", "F32", target, base, "weight")])
    # 3 buckets kept: +[4,8) (mean of 5, 7, 7), -[4,8), +[2,4); smaller exponents become 0
    mean = np.float32((5 + 7 + 7) / 3)
    assert result.decoded.tolist() == [mean, mean, -6, 3, 0, 0, 0, mean]


def test_lc_without_base_encodes_against_zeros():
    target, _ = weight_pair(5000, "F32")
    (result,) = roundtrip(LcParams(bits=8), [Member("w", "F32", target, None, "weight")])
    assert (np.abs(result.decoded - target) <= np.abs(target)).all()
    assert result.rel_l2 < 0.4
    with pytest.raises(ValueError, match="no base was given"):
        decode(encode_group(LcParams(), [Member("w", "F32", target, target * 0, "weight")])[0].payload, None,
               dtype="F32", size=target.size)


def test_lc_ratio_on_a_small_random_update():
    target, base = weight_pair(200_000, "F32", rel=1e-3)
    (result,) = roundtrip(LcParams(), [Member("w", "F32", target, base, "weight")])
    assert target.nbytes / len(result.payload) > 8
    (result,) = roundtrip(LcParams(bits=2), [Member("w", "F32", target, base, "weight")])
    assert target.nbytes / len(result.payload) > 16


# --- closed loop -----------------------------------------------------------------------------
@pytest.mark.parametrize("params", [LcParams(bits=2), ExcpParams(bits=2, weight_prune=1.0)])
def test_closed_loop_chain_does_not_accumulate_error(params):
    n, links = 20_000, 20
    gen = rng(7)
    truth = [gen.standard_normal(n).astype(np.float32) * 0.02]
    for _ in range(links):  # an SGD-like random walk: small steps, some coordinates drifting
        truth.append((truth[-1] + gen.standard_normal(n).astype(np.float32) * 1e-4 + 2e-5).astype(np.float32))
    closed, open_loop = truth[0], truth[0]
    for k in range(1, links + 1):
        (link,) = roundtrip(params, [Member("w", "F32", truth[k], closed, "weight")])
        bound = np.abs(truth[k] - closed)  # this link's own bound
        assert (np.abs(link.decoded - truth[k]) <= bound + spacing(truth[k], "F32")).all()
        closed = link.decoded
        # open loop: each link against the true previous value, applied to the reconstruction
        (step,) = encode_group(params, [Member("w", "F32", truth[k], truth[k - 1], "weight")])
        open_loop = decode(step.payload, open_loop, dtype="F32", size=n)
    closed_err = np.linalg.norm(closed - truth[-1]) / np.linalg.norm(truth[-1])
    open_err = np.linalg.norm(open_loop - truth[-1]) / np.linalg.norm(truth[-1])
    one_step = np.linalg.norm(truth[-1] - truth[-2]) / np.linalg.norm(truth[-1])
    assert closed_err < 3 * one_step  # a few steps' worth, not twenty
    assert open_err > 2 * closed_err, (open_err, closed_err)


# --- second moments ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F64"])
@pytest.mark.parametrize("params", [LcParams(bits=1), LcParams(), ExcpParams(), ExcpParams(bits=1),
                                    ExcpParams(prune_second_moment=True, moment_prune=2.0)])
def test_second_moment_stays_non_negative_and_zero_stays_zero(dtype, params):
    n = 20_000
    v_prev = adam_second_moment(n, dtype, 1)
    v_now = adam_second_moment(n, dtype, 2)
    v_now[:100] = 0.0
    v_prev[:100] = 0.0
    weight, weight_base = weight_pair(n, dtype, rel=1e-2)
    members = [Member("w", dtype, weight, weight_base, "weight"),
               Member("v", dtype, v_now, v_prev, "second_moment")]
    decoded_v = roundtrip(params, members)[1].decoded
    assert (decoded_v >= 0).all()
    assert (decoded_v[:100] == 0).all()
    if isinstance(params, LcParams):  # the LC bound, in sqrt space
        err = np.abs(np.sqrt(decoded_v.astype(np.float64)) - np.sqrt(v_now))
        bound = np.abs(np.sqrt(v_now.astype(np.float64)) - np.sqrt(v_prev))
        assert (err <= bound * 1.001 + np.sqrt(spacing(np.maximum(decoded_v, v_now), dtype))).all()
    else:  # ExCP codes a second moment absolutely: zero stays zero, nothing else becomes zero unpruned
        assert ((decoded_v == 0) == (v_now == 0)).all() or params.prune_second_moment


def test_excp_second_moment_relative_error_on_a_narrow_range():
    n = 50_000
    v = in_storage(np.exp(rng(3).uniform(np.log(1e-8), np.log(1e-6), n)), "F32")
    (result,) = roundtrip(ExcpParams(), [Member("v", "F32", v, None, "second_moment")])
    log_ratio = np.abs(np.log(result.decoded / v.astype(np.float64)))
    # 15 levels over two decades, evenly spread in log space: within about half a level spacing
    assert log_ratio.max() < 0.6 * np.log(100) / 15
    assert log_ratio.mean() < 0.3 * np.log(100) / 15


# --- ExCP ---------------------------------------------------------------------------------------
def test_excp_bounds_and_joint_pruning():
    n = 50_000
    weight, weight_base = weight_pair(n, "F32", rel=1e-2, offset=4)
    gen = rng(5)
    m = (gen.standard_normal(n) * 1e-4).astype(np.float32)
    v = (gen.standard_normal(n) * 1e-4).astype(np.float32) ** 2
    members = [Member("w", "F32", weight, weight_base, "weight"), Member("m", "F32", m, m * 0.5, "moment"),
               Member("v", "F32", v, v, "second_moment")]
    w_res, m_res, v_res = roundtrip(ExcpParams(), members)
    residual = np.abs(weight - weight_base)
    assert (np.abs(w_res.decoded - weight) <= residual + spacing(weight, "F32")).all()
    assert (np.abs(m_res.decoded - m) <= np.abs(m)).all()
    kept_w = w_res.decoded != weight_base
    kept_m = m_res.decoded != 0
    assert 0.05 < kept_w.mean() < 0.9
    assert not (kept_m & ~kept_w).any()  # a moment survives only where its weight residual did
    assert (v_res.decoded > 0).all()
    raw = 3 * 4 * n
    assert raw / sum(len(r.payload) for r in (w_res, m_res, v_res)) > 5


def test_excp_importance_prefers_large_second_moment():
    n = 40_000
    weight, weight_base = weight_pair(n, "F32", rel=1e-2, offset=6)
    v = np.where(np.arange(n) < n // 2, 1e-2, 1e-8).astype(np.float32)
    members = [Member("w", "F32", weight, weight_base, "weight"), Member("v", "F32", v, None, "second_moment")]
    w_res = roundtrip(ExcpParams(), members)[0]
    kept = w_res.decoded != weight_base
    assert kept[: n // 2].mean() > 5 * kept[n // 2:].mean()


def test_lone_tensors_and_empty_tensors():
    for params in (LcParams(), ExcpParams()):
        for role in ("weight", "moment", "second_moment"):
            values = adam_second_moment(3000, "F32") if role == "second_moment" else weight_pair(3000, "F32")[0]
            roundtrip(params, [Member(role, "F32", values, None, role)])
            (empty,) = roundtrip(params, [Member("e", "F32", np.zeros(0, np.float32), None, role)])
            assert empty.decoded.size == 0 and empty.rel_l2 == 0.0
        (zero,) = roundtrip(params, [Member("z", "F32", np.zeros(10, np.float32), np.zeros(10, np.float32),
                                            "weight")])
        assert zero.rel_l2 == 0.0 and (zero.decoded == 0).all()


# --- parameters ------------------------------------------------------------------------------
def test_params_defaults_and_json():
    assert codec_params("lc") == LcParams() and codec_params("excp", bits=3).bits == 3
    for params in (LcParams(bits=2), ExcpParams(weight_prune=2.5, prune_second_moment=True)):
        data = params.to_json()
        assert data["codec"] == params.codec and params_from_json(data) == params
    assert set(ExcpParams().to_json()) == {"codec", "bits", "weight_prune", "moment_prune", "prune_second_moment"}
    assert LcParams(moment_bits=2).to_json() == {"codec": "lc", "bits": 3, "moment_bits": 2}
    assert params_from_json(LcParams(moment_bits=2).to_json()) == LcParams(moment_bits=2)
    with pytest.raises(ValueError, match="moment_bits must be an int from 1 to 8, got 0"):
        codec_params("lc", moment_bits=0)
    assert CODECS == ("lc", "excp")


@pytest.mark.parametrize("call, message", [
    (lambda: codec_params("zip"), "unknown lossy codec 'zip'; expected one of 'lc', 'excp'"),
    (lambda: codec_params("lc", bits=0), "bits must be an int from 1 to 8, got 0"),
    (lambda: codec_params("lc", bits=9), "bits must be an int from 1 to 8, got 9"),
    (lambda: codec_params("excp", bits="3"), "bits must be an int from 1 to 8, got '3'"),
    (lambda: codec_params("lc", bits=True), "bits must be an int from 1 to 8, got True"),
    (lambda: codec_params("lc", weight_prune=1.0), r"unknown parameter\(s\) 'weight_prune'.*allowed: bits"),
    (lambda: codec_params("excp", weight_prune=-1), "weight_prune must be a number from 0"),
    (lambda: codec_params("excp", moment_prune=float("nan")), "moment_prune must be a number from 0"),
    (lambda: codec_params("excp", prune_second_moment=1), "prune_second_moment must be True or False"),
    (lambda: params_from_json({"bits": 3}), "no 'codec' key"),
    (lambda: params_from_json({"codec": "lc", "bits": 12}), "bits must be an int from 1 to 8, got 12"),
    (lambda: params_from_json([1]), "must be a mapping"),
])
def test_bad_params_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bad_members_are_refused():
    good = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        encode_group(LcParams(), [Member("w", "F32", np.array([1, np.inf], np.float32), None, "weight")])
    with pytest.raises(ValueError, match="1-D numpy array of float32"):
        encode_group(LcParams(), [Member("w", "BF16", good.astype(np.float64), None, "weight")])
    with pytest.raises(ValueError, match="negative"):
        encode_group(ExcpParams(), [Member("v", "F32", -good, None, "second_moment")])
    with pytest.raises(ValueError, match="role 'bias'"):
        encode_group(LcParams(), [Member("w", "F32", good, None, "bias")])
    with pytest.raises(ValueError, match="base has 3 elements"):
        encode_group(LcParams(), [Member("w", "F32", good, good[:3], "weight")])


# --- damaged payloads -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def payloads():
    target, base = weight_pair(30_000, "F32", rel=1e-2)
    sparse = encode_group(ExcpParams(weight_prune=3.0), [Member("w", "F32", target, base, "weight")])[0].payload
    dense = encode_group(LcParams(bits=8), [Member("w", "F32", target, base, "weight")])[0].payload
    return base, sparse, dense


def test_damaged_payloads_raise_value_error(payloads):
    base, *blobs = payloads
    gen = rng(9)
    for blob in blobs:
        assert decode(blob, base, dtype="F32", size=base.size).size == base.size
        cuts = sorted({0, 3, 10, 40, len(blob) // 2, len(blob) - 5, len(blob) - 1})
        for cut in cuts:
            with pytest.raises(ValueError, match="damaged"):
                decode(blob[:cut], base, dtype="F32", size=base.size)
        with pytest.raises(ValueError, match="damaged"):
            decode(blob + b"\0", base, dtype="F32", size=base.size)
        positions = list(range(0, 200)) + list(gen.integers(200, len(blob), 60))
        for position in positions:
            for bit in (0x01, 0x80):
                flipped = bytearray(blob)
                flipped[position] ^= bit
                if position == 4:  # the format version: refused as such
                    with pytest.raises(ValueError, match="format version"):
                        decode(bytes(flipped), base, dtype="F32", size=base.size)
                    continue
                with pytest.raises(ValueError):
                    decode(bytes(flipped), base, dtype="F32", size=base.size)


def test_payload_of_another_size_dtype_or_base_is_refused(payloads):
    base, sparse, _ = payloads
    with pytest.raises(ValueError, match="encodes 30000 elements, not 29999"):
        decode(sparse, base[:-1], dtype="F32", size=base.size - 1)
    with pytest.raises(ValueError, match="encodes a F32 tensor, not BF16"):
        decode(sparse, base, dtype="BF16", size=base.size)
    with pytest.raises(ValueError, match="no base was given"):
        decode(sparse, None, dtype="F32", size=base.size)
    with pytest.raises(ValueError, match="base must be a 1-D float32 array"):
        decode(sparse, base.astype(np.float64), dtype="F32", size=base.size)


def test_lying_sizes_do_not_allocate(payloads):
    """A header claiming a huge tensor is refused against ``size`` before anything is allocated."""
    base, sparse, _ = payloads
    forged = bytearray(sparse)
    struct.pack_into("<Q", forged, 15, 1 << 60)  # the element count
    with pytest.raises(ValueError, match="damaged"):
        decode(bytes(forged), base, dtype="F32", size=base.size)
