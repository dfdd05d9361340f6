"""Tests of weightslab/codec.py: training state <-> JSON + tensor table, exact and without pickle."""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import safetensors.torch
import torch

from weightslab.codec import TAG, decode, encode
from weightslab.errors import StateError, WeightslabError


def store_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Send the tensor table through the safetensors format, as a checkpoint does."""
    return safetensors.torch.load(safetensors.torch.save({k: v.contiguous().clone() for k, v in tensors.items()}))


def roundtrip(value, *, path="state", through_bytes=True):
    tensors: dict[str, torch.Tensor] = {}
    node = encode(value, path=path, tensors=tensors)
    text = json.dumps(node, allow_nan=False)  # plain, strict JSON: no NaN, no pickle
    loaded = json.loads(text)
    table = store_tensors(tensors) if through_bytes and tensors else tensors
    return decode(loaded, table), tensors, node


def same(a, b) -> bool:
    """Deep equality that also checks types, NaN, -0.0, tensors and arrays."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, dict):
        return list(a.keys()) == list(b.keys()) and all(same(a[k], b[k]) for k in a) and \
            all(type(k1) is type(k2) for k1, k2 in zip(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# --- plain values ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    None, True, False, 0, -7, 2**70, -(2**65), 0.1, 0.1 + 0.2, 1e-320, 1.7976931348623157e308, -0.0, 1.0,
    "", "text", "ünïcødé ✓ 日本", TAG,
], ids=repr)
def test_scalars_round_trip_exactly(value):
    out, tensors, _ = roundtrip(value)
    assert same(out, value)
    assert tensors == {}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=repr)
def test_special_floats_round_trip(value):
    out, _, node = roundtrip(value)
    assert node[TAG] == "float"
    assert type(out) is float
    assert (math.isnan(out) if math.isnan(value) else out == value)


def test_bool_is_not_turned_into_int():
    out, _, _ = roundtrip({"a": True, "b": [False, 1]})
    assert type(out["a"]) is bool and type(out["b"][0]) is bool and type(out["b"][1]) is int


def test_int_enum_becomes_plain_int():
    class Color(enum.IntEnum):
        RED = 3
    out, _, node = roundtrip({"c": Color.RED})
    assert node == {"c": 3}
    assert type(out["c"]) is int and out["c"] == 3


def test_nested_structure_round_trip():
    value = {
        "tuple": (1, 2.5, "x", (3, (4,)), []),
        "list": [1, (2, 3), {"k": (None,)}],
        "int_keys": {0: "a", 1: {2: "b"}, -3: 4},
        "mixed_keys": {1: "one", "two": 2, 2.5: "f", None: "none", False: "f0", (1, 2): "tuple"},
        "floats": [math.nan, math.inf, -math.inf, 0.0, -0.0],
        "nan_key": {math.inf: 1},
        "bytes": b"\x00\xff\x10raw",
        "bytearray": bytearray(b"ba"),
        "empty": {"d": {}, "l": [], "t": ()},
        "size": torch.Size([2, 3]),
        "tag_named_key": {TAG: "tensor", "key": "not really"},
    }
    out, tensors, _ = roundtrip(value)
    assert tensors == {}
    expected = dict(value, bytearray=b"ba", size=(2, 3))
    assert same(out, expected), out
    assert type(out["tuple"][3][1]) is tuple
    assert list(out["int_keys"]) == [0, 1, -3] and type(out["int_keys"][1]) is dict
    assert list(out["mixed_keys"]) == [1, "two", 2.5, None, False, (1, 2)]
    assert out["tag_named_key"] == {TAG: "tensor", "key": "not really"}


def test_torch_dtypes_devices_paths_and_dates_round_trip():
    value = {
        "dtypes": [torch.float32, torch.bfloat16, torch.bool, torch.int8, torch.complex64, torch.float8_e4m3fn],
        "devices": [torch.device("cpu"), torch.device("cuda:1"), torch.device("meta")],
        "path": Path("/data/run 1/file.txt"),
        "relative": Path("a/b"),
        "pure": PurePosixPath("x/y"),
        "datetime": dt.datetime(2024, 2, 29, 13, 45, 1, 123456),
        "aware": dt.datetime(2024, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
        "date": dt.date(1999, 12, 31),
        "time": dt.time(23, 59, 58, 7),
    }
    out, _, _ = roundtrip(value)
    assert out["dtypes"] == value["dtypes"]
    assert all(isinstance(d, torch.dtype) for d in out["dtypes"])
    assert out["devices"] == value["devices"]
    assert out["path"] == Path("/data/run 1/file.txt") and isinstance(out["path"], Path)
    assert out["relative"] == Path("a/b")
    assert out["pure"] == Path("x/y")
    assert type(out["datetime"]) is dt.datetime and out["datetime"] == value["datetime"]
    assert out["aware"] == value["aware"] and out["aware"].utcoffset() == dt.timedelta(hours=-5)
    assert type(out["date"]) is dt.date and out["date"] == value["date"]
    assert type(out["time"]) is dt.time and out["time"] == value["time"]


def test_date_subclass_round_trips():
    class MyDate(dt.date):
        pass
    out, _, _ = roundtrip({"when": MyDate(2020, 1, 2)})
    assert out["when"] == dt.date(2020, 1, 2)


# --- numpy ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8,
                                   np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64,
                                   np.complex128])
def test_numpy_arrays_round_trip_with_dtype(dtype):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal((3, 4)) * 50).astype(dtype)
    out, tensors, node = roundtrip({"arr": arr}, through_bytes=False)
    assert node["arr"] == {TAG: "ndarray", "key": "state/arr"}
    assert list(tensors) == ["state/arr"]
    assert type(out["arr"]) is np.ndarray
    assert out["arr"].dtype == arr.dtype and out["arr"].shape == (3, 4)
    assert np.array_equal(out["arr"], arr)


def test_numpy_arrays_through_the_safetensors_format():
    arrays = {"f": np.array([1.5, np.nan, -np.inf], dtype=np.float32), "b": np.array([[True], [False]]),
              "i": np.arange(6, dtype=np.int16).reshape(2, 3), "e": np.zeros((0, 2), dtype=np.float64),
              "nc": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]}
    out, _, _ = roundtrip(arrays)
    for k, arr in arrays.items():
        assert type(out[k]) is np.ndarray, k
        assert out[k].dtype == arr.dtype and out[k].shape == arr.shape, k
        assert np.array_equal(out[k], arr, equal_nan=k == "f"), k


def test_zero_dim_numpy_array_keeps_its_shape():
    arr = np.array(3.5)
    out, _, _ = roundtrip({"x": arr}, through_bytes=False)
    assert out["x"].shape == () and out["x"].dtype == np.float64 and out["x"] == 3.5


def test_big_endian_array_round_trips_or_is_refused_naming_path():
    arr = np.array([1, 2, 300], dtype=">i4")
    try:
        out, _, _ = roundtrip({"be": arr}, through_bytes=False)
    except StateError as exc:
        assert "'state/be'" in str(exc)
    else:
        assert np.array_equal(out["be"], arr) and out["be"].dtype.kind == "i"


def test_longdouble_array_is_refused_naming_path():
    with pytest.raises(StateError) as info:
        encode({"ld": np.ones(2, dtype=np.longdouble)}, path="state", tensors={})
    assert "'state/ld'" in str(info.value)


def test_numpy_scalars_become_python_values():
    value = {"f32": np.float32(0.1), "f64": np.float64(2.5), "i64": np.int64(-7), "u8": np.uint8(255),
             "b": np.bool_(True), "nan": np.float32("nan"), "inf": np.float64("-inf"), "s": np.str_("s")}
    out, tensors, _ = roundtrip(value)
    assert tensors == {}
    assert type(out["f32"]) is float and out["f32"] == float(np.float32(0.1))  # the float32's exact value
    assert type(out["f64"]) is float and out["f64"] == 2.5
    assert type(out["i64"]) is int and out["i64"] == -7
    assert type(out["u8"]) is int and out["u8"] == 255
    assert type(out["b"]) is bool and out["b"] is True
    assert math.isnan(out["nan"]) and out["inf"] == -math.inf
    assert out["s"] == "s"


@pytest.mark.parametrize("arr", [np.array([object(), 1], dtype=object), np.array(["a", "b"]),
                                 np.array([b"a"]), np.array(["2020-01-01"], dtype="datetime64[D]"),
                                 np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])],
                         ids=["object", "unicode", "bytes", "datetime64", "structured"])
def test_non_numeric_arrays_raise_state_error_naming_path(arr):
    with pytest.raises(StateError) as info:
        encode({"inner": [arr]}, path="user/main", tensors={}, what="state 'main'")
    msg = str(info.value)
    assert "'user/main/inner/0'" in msg
    assert str(arr.dtype) in msg
    assert "cannot save state 'main'" in msg
    assert "convert it to a numeric array" in msg


# --- tensors --------------------------------------------------------------------------------------

TENSOR_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", TENSOR_DTYPES, ids=str)
def test_tensors_of_many_dtypes_round_trip(dtype):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 3, generator=g) * 100
    value = {
        "t": base.to(dtype) if dtype != torch.complex64 else torch.complex(base, -base),
        "scalar": torch.tensor(7, dtype=dtype) if dtype != torch.bool else torch.tensor(True),
        "empty": torch.empty(0, 5, dtype=dtype),
    }
    out, tensors, node = roundtrip(value)
    assert sorted(tensors) == ["state/empty", "state/scalar", "state/t"]
    assert node["t"] == {TAG: "tensor", "key": "state/t"}
    for k, t in value.items():
        assert out[k].dtype == dtype and out[k].shape == t.shape, k
        assert torch.equal(out[k], t), k
    assert out["scalar"].dim() == 0


def test_special_float_values_in_tensors_survive():
    t = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 1e-45], dtype=torch.float32)
    out, _, _ = roundtrip({"t": t})
    got = out["t"]
    assert got.view(torch.int32).tolist() == t.view(torch.int32).tolist()  # bit for bit


def test_tensor_keys_derive_from_the_path():
    t = torch.zeros(1)
    value = {"model": {"layer.weight": t, "sub": {"b": t}}, "list": [t, (t, {"x": t})], 3: t}
    tensors: dict[str, torch.Tensor] = {}
    encode(value, path="models/main", tensors=tensors)
    assert sorted(tensors) == sorted([
        "models/main/model/layer.weight", "models/main/model/sub/b", "models/main/list/0",
        "models/main/list/1/0", "models/main/list/1/1/x", "models/main/3",
    ])


def test_colliding_tensor_keys_are_disambiguated_and_decode_correctly():
    a, b, c = torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0])
    value = {"a/b": a, "a": {"b": b}, "x": [c]}
    out, tensors, _ = roundtrip(value, path="p")
    assert sorted(tensors) == ["p/a/b", "p/a/b#2", "p/x/0"]
    assert out["a/b"].item() == 1.0 and out["a"]["b"].item() == 2.0 and out["x"][0].item() == 3.0


def test_existing_entries_of_the_table_are_not_overwritten():
    tensors = {"p/t": torch.tensor([9.0])}
    node = encode({"t": torch.tensor([1.0])}, path="p", tensors=tensors)
    assert node == {"t": {TAG: "tensor", "key": "p/t#2"}}
    assert tensors["p/t"].item() == 9.0 and tensors["p/t#2"].item() == 1.0


def test_non_contiguous_tensor_is_kept_as_is():
    t = torch.arange(12.0).reshape(3, 4).t()
    out, _, _ = roundtrip({"t": t})
    assert torch.equal(out["t"], t)


def test_sparse_tensor_raises_state_error_naming_path():
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(StateError) as info:
        encode({"buffers": {"s": sparse}}, path="models/m", tensors={})
    msg = str(info.value)
    assert "'models/m/buffers/s'" in msg and "sparse" in msg and ".to_dense()" in msg


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_csr_tensor_raises_state_error():
    with pytest.raises(StateError, match=r"'p/c'.*to_dense"):
        encode({"c": torch.eye(3).to_sparse_csr()}, path="p", tensors={})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantized_tensor_raises_state_error():
    q = torch.quantize_per_tensor(torch.ones(2), scale=0.1, zero_point=0, dtype=torch.qint8)
    with pytest.raises(StateError) as info:
        encode([q], path="p", tensors={})
    assert "'p/0'" in str(info.value) and "dequantize" in str(info.value)


def test_meta_tensor_raises_state_error():
    with pytest.raises(StateError) as info:
        encode({"m": torch.empty(3, device="meta")}, path="p", tensors={})
    assert "'p/m'" in str(info.value) and "meta device" in str(info.value)


class Custom:
    pass


@pytest.mark.parametrize("obj, type_name", [
    (lambda x: x, "function"), (Custom(), "Custom"), ({1, 2}, "builtins.set"), (frozenset(), "frozenset"),
    (1 + 2j, "builtins.complex"), (object(), "builtins.object"), (range(3), "builtins.range"),
], ids=["lambda", "custom", "set", "frozenset", "complex", "object", "range"])
def test_objects_raise_state_error_naming_path_and_fix(obj, type_name):
    tensors: dict[str, torch.Tensor] = {}
    with pytest.raises(StateError) as info:
        encode({"ok": torch.zeros(1), "nested": [0, {"bad": obj}]}, path="state/user", tensors=tensors,
               what="state 'user'")
    err = info.value
    msg = str(err)
    assert "'state/user/nested/1/bad'" in msg
    assert type_name in msg
    assert "never pickles" in msg and "Return plain data" in msg
    assert msg.startswith("cannot save state 'user'")
    assert isinstance(err, TypeError) and isinstance(err, WeightslabError)


def test_bad_dict_key_raises_naming_the_key():
    with pytest.raises(StateError) as info:
        encode({Custom(): 1}, path="p", tensors={})
    assert "p/<key <" in str(info.value) and "Custom" in str(info.value)


def test_decode_unknown_tag_raises_state_error():
    with pytest.raises(StateError, match="unknown tagged value 'future'.*newer weightslab"):
        decode({"x": {TAG: "future", "v": 1}}, {})


def test_decode_unknown_dtype_raises_state_error():
    with pytest.raises(StateError, match="unknown torch dtype 'float99'"):
        decode({TAG: "dtype", "name": "float99"}, {})
    with pytest.raises(StateError, match="unknown torch dtype 'nn'"):
        decode({TAG: "dtype", "name": "nn"}, {})  # an attribute of torch, but not a dtype


# --- real training state --------------------------------------------------------------------------

def adam_after_steps(steps=2):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.8, 0.95), amsgrad=True, weight_decay=0.01)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
    return model, opt


def assert_state_dict_equal(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert type(k) is type(next(k2 for k2 in b if k2 == k))
            assert_state_dict_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dict_equal(x, y)
    else:
        assert a == b


def test_adam_state_dict_round_trips_exactly():
    model, opt = adam_after_steps()
    sd = opt.state_dict()
    assert set(sd["state"]) == {0, 1, 2, 3} and isinstance(sd["param_groups"][0]["betas"], tuple)
    out, tensors, node = roundtrip(sd, path="optimizers/main")
    assert_state_dict_equal(out, sd)
    assert out["param_groups"][0]["betas"] == (0.8, 0.95)
    assert "optimizers/main/state/0/exp_avg" in tensors
    assert "optimizers/main/state/2/max_exp_avg_sq" in tensors

    # the decoded state drives a fresh optimizer exactly like the original one
    model2, opt2 = adam_after_steps(steps=0)
    model2.load_state_dict(model.state_dict())
    opt2.load_state_dict(out)
    x = torch.randn(5, 4)
    for m, o in [(model, opt), (model2, opt2)]:
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_model_state_dict_and_rng_state_round_trip():
    model, _ = adam_after_steps(steps=1)
    value = {"model": model.state_dict(), "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state(),
             "py_rng": __import__("random").getstate()}
    out, _, _ = roundtrip(value)
    assert_state_dict_equal(out["model"], dict(model.state_dict()))
    assert torch.equal(out["torch_rng"], value["torch_rng"])
    assert out["np_rng"][0] == "MT19937" and np.array_equal(out["np_rng"][1], value["np_rng"][1])
    assert out["np_rng"][1].dtype == value["np_rng"][1].dtype and out["np_rng"][2:] == value["np_rng"][2:]
    assert out["py_rng"] == value["py_rng"]
