"""Round-trips of every storable type through ``dreamer_magic.storage``.

Property tests (hypothesis) pin that what is saved comes back with the same type and value;
the rest pins the layout (``_dataset`` loads with plain datasets), the pickle rules and the
error messages a user sees.
"""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict, namedtuple
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from hypothesis.extra import pandas as hpd

from dreamer_magic.errors import StorageError
from dreamer_magic.storage import (
    describe_type,
    load_outputs,
    load_value,
    save_outputs,
    save_value,
)

SETTINGS = settings(
    deadline=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def roundtrip(values: dict, **load_kwargs):
    """Save ``values`` into a fresh step folder and load them back."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "step"
        folder.mkdir()
        entries = save_outputs(values, folder)
        json.dumps(entries, allow_nan=False)  # entries are plain JSON for step.json
        return entries, load_outputs(folder, entries, **load_kwargs)


def same(a, b) -> bool:
    """Strict equality: same types all the way down; nan equals nan."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    return a == b


def assert_frames_equal(left: pd.DataFrame, right: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        left, right, check_exact=True, check_index_type=True, check_column_type=True
    )
    assert list(left.columns) == list(right.columns)


# --------------------------------------------------------------------------- JSON


scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
hashables = st.recursive(
    scalars.filter(lambda v: not (isinstance(v, float) and math.isnan(v))),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=5,
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
        | st.dictionaries(hashables, inner, max_size=4)
        | st.sets(hashables, max_size=4)
        | st.binary(max_size=8)
    ),
    max_leaves=20,
)


@SETTINGS
@given(value=json_values)
def test_json_values_round_trip_with_their_types(value):
    entries, loaded = roundtrip({"v": value})
    assert entries["v"]["storage"] == "json"
    assert entries["v"]["pickled"] is False
    assert same(loaded["v"], value)


def test_json_tags_cannot_be_confused_with_user_dicts():
    value = {"__dreamer__": "tuple", "items": [1, 2]}
    _, loaded = roundtrip({"v": value})
    assert same(loaded["v"], value)


def test_plain_json_stays_readable():
    with tempfile.TemporaryDirectory() as tmp:
        entry = save_value({"lr": 0.1, "name": "gpt-2 ✓"}, Path(tmp), "config")
        text = (Path(tmp) / entry["path"]).read_text(encoding="utf-8")
    assert json.loads(text) == {"lr": 0.1, "name": "gpt-2 ✓"}
    assert entry["path"] == "_outputs/config.json"


Point = namedtuple("Point", "x y")  # noqa: PYI024 - a tuple subclass


def test_subclasses_of_json_types_are_pickled_not_flattened():
    values = {"od": OrderedDict(a=1), "p": Point(1, 2), "f": np.float64(1.5), "b": True}
    entries, loaded = roundtrip(values)
    assert entries["od"]["pickled"] and entries["p"]["pickled"]
    assert entries["f"]["storage"] == "npy"
    assert entries["b"]["storage"] == "json"
    for name, value in values.items():
        assert same(loaded[name], value), name


# --------------------------------------------------------------------------- numpy


numpy_dtypes = (
    hnp.integer_dtypes(endianness="=")
    | hnp.unsigned_integer_dtypes(endianness="=")
    | hnp.floating_dtypes(endianness="=")
    | hnp.complex_number_dtypes(endianness="=")
    | hnp.boolean_dtypes()
    | hnp.datetime64_dtypes()
    | hnp.timedelta64_dtypes()
    | hnp.unicode_string_dtypes(max_len=5)
    | hnp.byte_string_dtypes(max_len=5)
    | hnp.integer_dtypes(endianness=">")
)


@SETTINGS
@given(array=hnp.arrays(numpy_dtypes, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)))
def test_numpy_arrays_round_trip_without_pickle(array):
    entries, loaded = roundtrip({"a": array}, allow_pickle=False)
    assert entries["a"]["storage"] == "npy" and not entries["a"]["pickled"]
    back = loaded["a"]
    assert type(back) is np.ndarray
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()


def test_numpy_structured_fortran_and_scalars():
    structured = np.array([(1, 2.5, b"ab"), (3, -1.0, b"")], dtype=[("i", "<i4"), ("f", ">f8"), ("s", "S2")])
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    values = {
        "structured": structured,
        "fortran": fortran,
        "view": np.arange(10)[::3],
        "f32": np.float32(1.25),
        "dt": np.datetime64("2024-01-02T03:04", "m"),
        "s": np.str_("héllo"),
    }
    entries, loaded = roundtrip(values, allow_pickle=False)
    for name, value in values.items():
        assert entries[name]["storage"] == "npy"
        assert type(loaded[name]) is type(value), name
        assert np.asarray(loaded[name]).dtype == np.asarray(value).dtype
        assert np.array_equal(loaded[name], value), name


def test_object_arrays_are_pickled_and_marked():
    value = np.array([1, "a", None], dtype=object)
    entries, loaded = roundtrip({"mixed": value})
    assert entries["mixed"]["storage"] == "pickle" and entries["mixed"]["pickled"] is True
    assert entries["mixed"]["type"] == "numpy.ndarray"
    assert loaded["mixed"].dtype == object and list(loaded["mixed"]) == [1, "a", None]


# --------------------------------------------------------------------------- pandas


frames = hpd.data_frames(
    columns=[
        hpd.column("i", dtype=np.int64),
        hpd.column("f", dtype=np.float64),
        hpd.column("b", dtype=bool),
        hpd.column("t", elements=st.text(max_size=10)),
        hpd.column("when", dtype="datetime64[ns]"),
    ],
    index=hpd.range_indexes(min_size=0, max_size=20),
)


@settings(SETTINGS, max_examples=25)
@given(df=frames, main=st.booleans())
def test_dataframes_round_trip_exactly(df, main):
    # The first DataFrame is the main dataset (_dataset); the second goes to _outputs.
    values = {"df": df} if main else {"first": pd.DataFrame({"x": [1]}), "df": df}
    entries, loaded = roundtrip(values, allow_pickle=False)
    assert entries["df"]["storage"] == ("dataset" if main else "arrow")
    assert entries["df"]["path"] == "_dataset" if main else "_outputs/df.arrow"
    assert_frames_equal(loaded["df"], df)


def rich_frame() -> pd.DataFrame:
    n = 6
    return pd.DataFrame(
        {
            "int": np.arange(n, dtype=np.int64),
            "float": [0.5, np.nan, np.inf, -0.0, 1e300, -1.5],
            "str": pd.Series(["a", "ü", None, "", "long text", "x"], dtype="str"),
            "string": pd.array(["a", None, "c", "d", "e", "f"], dtype="string"),
            "object_str": pd.Series(["a", None, "c", "d", "e", "f"], dtype=object),
            "object_nan": pd.Series(["a", np.nan, "c", "d", "e", "f"], dtype=object),
            "object_int": pd.Series([1, 2, 3, 4, 5, 6], dtype=object),
            "bool": [True, False, True, True, False, False],
            "boolean": pd.array([True, None, False, True, None, False], dtype="boolean"),
            "Int64": pd.array([1, None, 3, 4, 5, None], dtype="Int64"),
            "Float64": pd.array([1.5, None, 3, 4, 5, 6], dtype="Float64"),
            "uint8": np.arange(n, dtype=np.uint8),
            "float32": np.arange(n, dtype=np.float32),
            "category": pd.Categorical(list("abcabc"), categories=list("cbad"), ordered=True),
            "int_category": pd.Categorical([3, 1, 3, 1, 3, 1], categories=[3, 1, 2]),
            "date": pd.date_range("2020-01-01", periods=n, freq="D"),
            "date_ns": pd.date_range("2020-01-01", periods=n, freq="h").astype("datetime64[ns]"),
            "tz": pd.date_range("2020-01-01", periods=n, tz="Europe/Paris"),
            "timedelta": pd.to_timedelta(np.arange(n), unit="s"),
            "period": pd.period_range("2020-01", periods=n, freq="M"),
            "interval": pd.interval_range(0, n),
            "bytes": pd.Series([b"a", b"", None, b"\x00", b"d", b"e"], dtype=object),
        }
    )


@pytest.mark.parametrize("main", [True, False])
@pytest.mark.parametrize(
    "index",
    [
        None,
        pd.RangeIndex(10, 22, 2, name="r"),
        pd.Index(list("uvwxyz"), name="key"),
        pd.Index([5, 3, 1, 0, -1, 9], name="id"),
        pd.MultiIndex.from_product([["a", "b"], [1, 2, 3]], names=["letter", "number"]),
        pd.date_range("2021-01-01", periods=6, name="day"),
    ],
    ids=["range", "range-named", "str", "int", "multi", "datetime"],
)
def test_rich_dataframe_round_trips_every_dtype_and_index(main, index):
    df = rich_frame()
    if index is not None:
        df.index = index
    values = {"df": df} if main else {"first": pd.DataFrame({"x": [1]}), "df": df}
    entries, loaded = roundtrip(values, allow_pickle=False)
    assert entries["df"]["storage"] == ("dataset" if main else "arrow")
    assert_frames_equal(loaded["df"], df)
    if index is None:
        assert type(loaded["df"].index) is pd.RangeIndex


def test_dataframe_column_labels_are_preserved():
    values = {
        "ints": pd.DataFrame({0: [1, 2], 1: ["a", "b"]}),
        "multi": pd.DataFrame(np.arange(4).reshape(2, 2), columns=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)])),
        "empty": pd.DataFrame({"a": pd.Series([], dtype=np.int64), "b": pd.Series([], dtype="str")}),
    }
    entries, loaded = roundtrip(values, allow_pickle=False)
    for name, df in values.items():
        assert not entries[name]["pickled"], name
        assert_frames_equal(loaded[name], df)


def test_main_dataframe_is_readable_without_this_package():
    import datasets

    df = rich_frame().set_index(pd.Index(list("uvwxyz"), name="key"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"n": 3, "df": df}, folder)
        assert entries["df"]["path"] == "_dataset"
        ds = datasets.load_from_disk(str(folder / "_dataset"))
        assert len(ds) == 6
        assert ds["str"][:2] == ["a", "ü"]
        assert ds["category"][:3] == ["a", "b", "c"]  # categoricals are readable values
        assert ds["key"] == list("uvwxyz")  # a named index is a column


def test_object_columns_that_arrow_would_change_are_pickled():
    values = {
        "lists": pd.DataFrame({"tokens": pd.Series([[1, 2], [], [3]], dtype=object)}),
        "mixed_na": pd.DataFrame({"s": pd.Series(["a", None, np.nan], dtype=object)}),
        "tuples": pd.DataFrame({"t": pd.Series([(1, 2), (3, 4), (5, 6)], dtype=object)}),
        "int_then_float": pd.DataFrame({"o": pd.Series([1] * 300 + [2.5], dtype=object)}),
        "mixed": pd.DataFrame({"o": pd.Series([1, "a"], dtype=object)}),
        # text by every other sign, but a str subclass (Arrow gives back plain str): checked value by value
        "str_subclass": pd.DataFrame({"s": pd.Series(["a"] * 300 + [np.str_("b")], dtype=object)}),
    }
    entries, loaded = roundtrip(values)
    for name, df in values.items():
        assert entries[name]["pickled"], name
        assert_frames_equal(loaded[name], df)
        for a, b in zip(loaded[name].iloc[:, 0], df.iloc[:, 0]):
            assert type(a) is type(b)


def test_a_dataframe_arrow_cannot_store_exactly_is_not_the_main_dataset():
    bad = pd.DataFrame({"o": pd.Series([1, "a"], dtype=object)})
    good = pd.DataFrame({"x": [1.0, 2.0]})
    entries, loaded = roundtrip({"bad": bad, "good": good})
    assert entries["bad"]["storage"] == "pickle"
    assert entries["good"]["path"] == "_dataset"
    assert_frames_equal(loaded["good"], good)


@pytest.mark.parametrize(
    "series",
    [
        pd.Series([1, 2, 3], name="n"),
        pd.Series([1.5, np.nan], name=None, index=pd.Index(["a", "b"], name="k")),
        pd.Series(pd.Categorical(["x", "y"]), name=("a", 1)),
        pd.Series(["a", "b"], dtype=object, name=0),
    ],
)
def test_series_round_trip(series):
    entries, loaded = roundtrip({"s": series}, allow_pickle=False)
    assert entries["s"]["storage"] == "arrow"
    pd.testing.assert_series_equal(loaded["s"], series, check_index_type=True, check_exact=True)
    assert same(loaded["s"].name, series.name)


# --------------------------------------------------------------------------- datasets


def test_dataset_round_trip_memory_mapped_and_readable_with_plain_datasets():
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]}).shuffle(seed=0)
    ds = ds.with_format("numpy")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # The Dataset is the main dataset even though a DataFrame comes first.
        entries = save_outputs({"df": pd.DataFrame({"x": [1]}), "ds": ds}, folder)
        assert entries["ds"] == {
            "type": "datasets.Dataset",
            "storage": "dataset",
            "path": "_dataset",
            "pickled": False,
            "size": entries["ds"]["size"],
        }
        assert entries["df"]["storage"] == "arrow"
        plain = datasets.load_from_disk(str(folder / "_dataset"))
        loaded = load_outputs(folder, entries, allow_pickle=False)["ds"]
        assert type(loaded) is datasets.Dataset
        assert loaded.cache_files, "loaded memory-mapped, not copied into RAM"
        assert loaded.format["type"] == "numpy"
        assert loaded.with_format(None).to_dict() == ds.with_format(None).to_dict() == plain.with_format(None).to_dict()


def test_dataset_dict_and_second_dataset_round_trip():
    import datasets

    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"x": [1, 2]}), test=datasets.Dataset.from_dict({"x": [3]})
    )
    other = datasets.Dataset.from_dict({"y": ["é"]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"dd": dd, "other": other}, folder)
        assert entries["dd"]["path"] == "_dataset" and entries["dd"]["type"] == "datasets.DatasetDict"
        assert entries["other"]["path"] == "_outputs/other"
        loaded = load_outputs(folder, entries, allow_pickle=False)
        assert isinstance(datasets.load_from_disk(str(folder / "_dataset")), datasets.DatasetDict)
        assert {k: v.to_dict() for k, v in loaded["dd"].items()} == {k: v.to_dict() for k, v in dd.items()}
        assert loaded["other"].to_dict() == {"y": ["é"]}


# --------------------------------------------------------------------------- torch


torch_dtypes = ["float32", "float64", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"]


@SETTINGS
@given(
    dtype=st.sampled_from(torch_dtypes),
    shape=st.lists(st.integers(0, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_torch_tensors_round_trip_with_safetensors(dtype, shape, seed):
    import torch

    generator = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=generator) * 100).to(getattr(torch, dtype))
    entries, loaded = roundtrip({"t": tensor, "d": {"w": tensor, "a": tensor.reshape(-1)[:1]}}, allow_pickle=False)
    assert entries["t"]["storage"] == entries["d"]["storage"] == "safetensors"
    for back, orig in [(loaded["t"], tensor), (loaded["d"]["w"], tensor), (loaded["d"]["a"], tensor.reshape(-1)[:1])]:
        assert type(back) is torch.Tensor and back.device.type == "cpu"
        assert back.dtype == orig.dtype and back.shape == orig.shape
        assert torch.equal(back, orig)
    assert list(loaded["d"]) == ["w", "a"]


def test_torch_requires_grad_and_non_contiguous():
    import torch

    weight = torch.randn(3, 4, requires_grad=True)
    values = {"w": weight, "tview": torch.arange(12.0).reshape(3, 4).T}
    entries, loaded = roundtrip(values, allow_pickle=False)
    assert loaded["w"].requires_grad and torch.equal(loaded["w"], weight)
    assert torch.equal(loaded["tview"], values["tview"])
    assert describe_type(weight) == "torch.Tensor"


# --------------------------------------------------------------------------- pickle


class Custom:
    def __init__(self, x):
        self.x = x

    def __eq__(self, other):
        return type(other) is Custom and other.x == self.x


def test_other_objects_are_pickled_and_marked():
    values = {"obj": Custom([1, 2]), "c": 1 + 2j, "r": range(3)}
    entries, loaded = roundtrip(values)
    for name, value in values.items():
        assert entries[name]["storage"] == "pickle" and entries[name]["pickled"] is True
        assert entries[name]["path"] == f"_outputs/{name}.pkl"
        assert loaded[name] == value
    assert entries["obj"]["type"] == f"{__name__}.Custom"


def test_allow_pickle_false_refuses_with_the_fix():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"model": Custom(1), "n": 1}, folder)
        with pytest.raises(StorageError) as info:
            load_outputs(folder, entries, allow_pickle=False)
        message = str(info.value)
        assert "'model'" in message
        assert "%config DreamerMagics.allow_pickle = True" in message
        assert "trust" in message
        assert load_value(folder, entries["n"], allow_pickle=False) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda: (i for i in range(3)),
        lambda: threading.Lock(),
        lambda: open(__file__),  # noqa: SIM115
    ],
    ids=["generator", "lock", "file"],
)
def test_unsaveable_values_name_the_variable_type_and_remedy(make):
    # save_value of one such value still raises; save_outputs skips it (test_not_saved_* below).
    # A lambda was in this list: it is saved by its source now (test_functions_* below).
    value = make()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            with pytest.raises(StorageError) as info:
                save_value(value, folder, "thing")
            message = str(info.value)
            assert "'thing'" in message
            assert describe_type(value) in message
            assert "--outputs" in message and "picklable" in message
            assert not (folder / "_outputs" / "thing.pkl").exists()
            saved = save_outputs({"ok": 1, "thing": value}, folder)
            assert list(saved) == ["ok"] and list(saved.not_saved) == ["thing"]
            assert not (folder / "_outputs" / "thing.pkl").exists()
    finally:
        if hasattr(value, "close"):
            value.close()


# --------------------------------------------------------------------------- damage


@pytest.mark.parametrize(
    "value",
    [
        pd.DataFrame({"x": [1, 2]}),
        np.arange(3),
        {"a": 1},
        Custom(1),
        "torch",
        "dataset",
    ],
    ids=["dataframe", "numpy", "json", "pickle", "torch", "dataset"],
)
def test_deleted_files_raise_storage_error(value):
    import shutil

    import datasets
    import torch

    if isinstance(value, str) and value == "torch":
        value = torch.ones(2)
    elif isinstance(value, str) and value == "dataset":
        value = datasets.Dataset.from_dict({"x": [1]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"first": pd.DataFrame({"y": [0]}), "v": value}, folder)
        path = folder / entries["v"]["path"]
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        with pytest.raises(StorageError, match="'v'"):
            load_outputs(folder, entries)


def test_damaged_main_dataset_and_bad_entries_raise_storage_error():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"df": pd.DataFrame({"x": range(10)})}, folder)
        for data_file in (folder / "_dataset").glob("*.arrow"):
            data_file.write_bytes(b"garbage")
        with pytest.raises(StorageError, match="'df'"):
            load_outputs(folder, entries)
        with pytest.raises(StorageError, match="outside"):
            load_value(folder, {**entries["df"], "path": "../elsewhere"})
        with pytest.raises(StorageError, match="unknown storage"):
            load_value(folder, {**entries["df"], "storage": "zip"})


# --------------------------------------------------------------------------- misc


def test_entries_keep_order_and_sizes():
    values = {"b": np.zeros(1000), "a": "text", "c": pd.DataFrame({"x": [1]})}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs(values, folder)
        assert list(entries) == ["b", "a", "c"]
        assert entries["b"]["size"] == (folder / "_outputs/b.npy").stat().st_size > 8000
        assert all(entry["size"] > 0 for entry in entries.values())


def test_names_differing_only_in_case_get_distinct_files():
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"df": 1, "DF": 2, "données": 3}, folder)
        assert len({e["path"].lower() for e in entries.values()}) == 3
        assert load_outputs(folder, entries) == {"df": 1, "DF": 2, "données": 3}


def test_describe_type():
    import datasets

    assert describe_type(1) == "int"
    assert describe_type(None) == "NoneType"
    assert describe_type(pd.DataFrame()) == "pandas.DataFrame"
    assert describe_type(pd.Series(dtype=float)) == "pandas.Series"
    assert describe_type(np.zeros(1)) == "numpy.ndarray"
    assert describe_type(np.float32(1)) == "numpy.float32"
    assert describe_type(datasets.Dataset.from_dict({})) == "datasets.Dataset"
    assert describe_type(Custom(1)) == f"{__name__}.Custom"


def test_import_is_cheap():
    code = (
        "import sys, dreamer_magic.storage; "
        "print(sorted(m for m in ('pandas', 'numpy', 'pyarrow', 'torch', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_pickle_of_loaded_main_frame_matches_original():
    # A loaded frame is an ordinary DataFrame: it can be pickled and changed.
    df = pd.DataFrame({"t": ["a", "b"], "n": [1, 2]})
    _, loaded = roundtrip({"df": df})
    frame = loaded["df"]
    frame.loc[0, "n"] = 5
    assert pickle.loads(pickle.dumps(frame)).loc[0, "n"] == 5


@pytest.mark.parametrize("main", [True, False])
def test_empty_and_odd_frames(main):
    values = {
        "empty_rows": pd.DataFrame(
            {"a": pd.Series([], dtype=np.int64), "c": pd.Categorical([], categories=["x", "y"])}
        ),
        "no_columns": pd.DataFrame(index=pd.RangeIndex(3)),
        "nothing": pd.DataFrame(),
        "duplicate_labels": pd.DataFrame([[1, 2]], columns=["a", "a"]),
        "freq_index": pd.DataFrame({"v": [1.0, 2.0]}, index=pd.date_range("2024", periods=2, freq="W")),
    }
    for name, df in values.items():
        frames = {name: df} if main else {"first": pd.DataFrame({"x": [1]}), name: df}
        entries, loaded = roundtrip(frames)
        assert_frames_equal(loaded[name], df)
        if name == "empty_rows" and main:
            assert entries[name]["path"] == "_dataset"


def test_series_keeps_a_frequency_index():
    series = pd.Series([1, 2, 3], index=pd.timedelta_range("1s", periods=3, freq="s"), name="x")
    _, loaded = roundtrip({"s": series}, allow_pickle=False)
    pd.testing.assert_series_equal(loaded["s"], series, check_exact=True, check_freq=True)


# --------------------------------------------------------------------------- outputs that cannot be saved


def _unsaveables(tmp: Path) -> dict:
    import socket
    import sqlite3

    from tqdm.auto import tqdm

    closed = open(tmp / "closed.txt", "w")  # noqa: SIM115
    closed.close()
    return {
        "open_file": open(tmp / "open.txt", "w"),  # noqa: SIM115
        "closed_file": closed,
        "binary_file": open(__file__, "rb"),  # noqa: SIM115
        "generator": (i for i in range(3)),
        "bar": tqdm(total=3, disable=True),
        "sock": socket.socket(),
        "lock": threading.Lock(),
        "rlock": threading.RLock(),
        "condition": threading.Condition(),
        "db": sqlite3.connect(":memory:"),
        "unpicklable": {"nested": threading.Lock()},
    }


def test_not_saved_outputs_are_skipped_with_a_reason_and_the_rest_is_saved(tmp_path):
    values = _unsaveables(tmp_path)
    try:
        folder = tmp_path / "step"
        folder.mkdir()
        saved = save_outputs({"first": 1, **values, "last": [1, 2]}, folder)
        assert list(saved) == ["first", "last"]
        assert list(saved.not_saved) == list(values)
        reasons = saved.not_saved
        assert reasons["open_file"] == "an open file cannot be saved"
        assert reasons["closed_file"] == "a closed file cannot be saved"
        assert reasons["binary_file"] == "an open file cannot be saved"
        assert "generator" in reasons["generator"] and "list" in reasons["generator"]
        assert reasons["bar"] == "a progress bar cannot be saved"
        assert "socket" in reasons["sock"]
        assert reasons["lock"] == reasons["rlock"] == "a lock cannot be saved"
        assert reasons["condition"] == "a Condition (it synchronises threads) cannot be saved"
        assert reasons["db"] == "a database connection cannot be saved"
        assert reasons["unpicklable"].startswith("it cannot be pickled (TypeError")
        json.dumps(saved, allow_nan=False)  # still plain JSON for step.json
        assert sorted(p.name for p in (folder / "_outputs").iterdir()) == ["first.json", "last.json"]
        assert load_outputs(folder, saved) == {"first": 1, "last": [1, 2]}
    finally:
        for value in values.values():
            with __import__("contextlib").suppress(Exception):
                value.close()


def test_in_memory_files_are_data_and_saved(tmp_path):
    import io

    entries, loaded = roundtrip({"b": io.BytesIO(b"abc"), "s": io.StringIO("text")})
    assert loaded["b"].getvalue() == b"abc" and loaded["s"].getvalue() == "text"
    assert entries["b"]["storage"] == "pickle"


def test_a_step_whose_output_cannot_be_saved_still_commits_the_rest(ip, tmp_path):
    from conftest import fresh_kernel
    from dreamer_magic.status import LOADED, RAN

    cell = "rows = [1, 2, 3]\nlog = open('log.txt', 'w')\nlog.write('x')\nlog.close()\ntotal = sum(rows)\n"
    ip.run_cell_magic("dreamer_step", "with-a-file", cell)
    assert ip._dreamer_magics._last_status.state == RAN
    meta = json.loads((tmp_path / "output" / "with-a-file" / "step.json").read_text())
    assert list(meta["outputs"]) == ["rows", "total"]
    fresh_kernel(ip)
    ip.run_cell_magic("dreamer_step", "with-a-file", cell)
    assert ip._dreamer_magics._last_status.state == LOADED
    assert ip.user_ns["rows"] == [1, 2, 3] and ip.user_ns["total"] == 6


# --------------------------------------------------------------------------- functions by their source


SCALE = 3


def _adder(n):
    return lambda x: x + n


def _power(k):
    def power(x, *, offset=0):
        """x to the k."""
        return x**k + offset

    return power


def test_functions_that_pickle_cannot_bring_back_are_saved_by_source():
    values = {
        "top": lambda x: x * SCALE,
        "closure": _adder(5),
        "nested_def": _power(3),
        "defaults": lambda x, items=(1, 2): x + len(items),
        "second_on_a_line": [lambda: "first", lambda: "second"][1],
    }
    values["nested_def"].tag = "cube"
    entries, loaded = roundtrip(values)
    assert {e["storage"] for e in entries.values()} == {"function"}
    assert not any(e["pickled"] for e in entries.values())
    assert loaded["top"](2) == 6
    assert loaded["closure"](1) == 6
    assert loaded["nested_def"](2, offset=1) == 9 and loaded["nested_def"].__doc__ == "x to the k."
    assert loaded["nested_def"].tag == "cube" and loaded["nested_def"].__qualname__ == values["nested_def"].__qualname__
    assert loaded["defaults"](1) == 3 and loaded["defaults"].__defaults__ == ((1, 2),)
    assert loaded["second_on_a_line"]() == "second"
    # the globals are those of the module the function came from: it sees changes, as the original would
    global SCALE
    SCALE = 10
    try:
        assert loaded["top"](2) == values["top"](2) == 20
    finally:
        SCALE = 3


def test_an_importable_function_is_still_pickled_by_reference():
    entries, loaded = roundtrip({"f": _adder, "g": math.sqrt})
    assert entries["f"]["storage"] == entries["g"]["storage"] == "pickle"
    assert loaded["f"] is _adder and loaded["g"] is math.sqrt


def test_a_lambda_over_values_json_cannot_hold_is_not_saved_rather_than_failing():
    lock = threading.Lock()
    with tempfile.TemporaryDirectory() as tmp:
        saved = save_outputs({"f": lambda: lock, "n": 1}, Path(tmp))
    assert list(saved) == ["n"] and saved.not_saved["f"].startswith("it cannot be pickled")


def test_functions_are_code_and_refused_without_allow_pickle_before_anything_loads():
    torch = pytest.importorskip("torch")
    from dreamer_magic.errors import PickleRefusedError

    net = torch.nn.Linear(2, 2)
    trained = {k: v.clone() + 1 for k, v in net.state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        other = torch.nn.Linear(2, 2)
        other.load_state_dict(trained)
        entries = {"net": save_value(other, folder, "net", storage="state_dict", path="_model/net.safetensors")}
        entries.update(save_outputs({"f": lambda x: x}, folder))
        assert entries["net"]["storage"] == "state_dict" and entries["f"]["storage"] == "function"
        before = {k: v.clone() for k, v in net.state_dict().items()}
        with pytest.raises(PickleRefusedError, match="'f'.*source code") as info:
            load_outputs(folder, entries, allow_pickle=False, namespace={"net": net})
        assert "%config DreamerMagics.allow_pickle = True" in str(info.value)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # nothing was loaded
        loaded = load_outputs(folder, entries, namespace={"net": net})
        assert loaded["net"] is net and all(torch.equal(trained[k], v) for k, v in net.state_dict().items())
        assert loaded["f"](4) == 4


def test_a_notebook_lambda_and_closure_come_back_after_a_restart(ip, tmp_path):
    from conftest import fresh_kernel
    from dreamer_magic.status import LOADED, RAN

    cell = "def make(n):\n    return lambda x: x + n + offset\nadd2 = make(2)\ntwice = lambda x: 2 * x\n"
    ip.user_ns["offset"] = 100
    ip.run_cell_magic("dreamer_step", "functions", cell)
    assert ip._dreamer_magics._last_status.state == RAN
    meta = json.loads((tmp_path / "output" / "functions" / "step.json").read_text())
    assert {n: e["storage"] for n, e in meta["outputs"].items()} == {"add2": "function", "twice": "function"}
    fresh_kernel(ip)
    ip.user_ns["offset"] = 100
    ip.run_cell_magic("dreamer_step", "functions", cell)
    assert ip._dreamer_magics._last_status.state == LOADED
    assert ip.user_ns["add2"](1) == 103 and ip.user_ns["twice"](4) == 8
    ip.user_ns["offset"] = 0  # the re-created function reads the notebook's globals, as the original did
    assert ip.user_ns["add2"](1) == 3


# --------------------------------------------------------------------------- tensors keep their device


def test_a_cpu_tensor_entry_is_unchanged_and_a_missing_device_loads_on_the_cpu():
    torch = pytest.importorskip("torch")
    from dreamer_magic.storage import _device_exists

    t = torch.arange(4.0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = save_outputs({"t": t, "d": {"a": t, "b": t + 1}}, folder)
        assert "device" not in entries["t"] and "devices" not in entries["d"]
        gone = {**entries["t"], "device": "cuda:97"}  # saved on a machine with more GPUs
        loaded = load_value(folder, gone)
        assert loaded.device.type == "cpu" and torch.equal(loaded, t)
        odd = {**entries["d"], "devices": {"a": "not-a-device", "b": "cuda:97"}}
        loaded = load_value(folder, odd)
        assert {k: v.device.type for k, v in loaded.items()} == {"a": "cpu", "b": "cpu"}
    assert _device_exists("cpu") and not _device_exists("cuda:97") and not _device_exists("nonsense")


@pytest.mark.skipif(
    not __import__("importlib").util.find_spec("torch") or not __import__("torch").cuda.is_available(),
    reason="needs a CUDA device",
)
def test_a_gpu_tensor_comes_back_on_its_device():
    import torch

    t = torch.arange(6.0, device="cuda:0").reshape(2, 3).requires_grad_(True)
    entries, loaded = roundtrip({"t": t, "d": {"gpu": t.detach(), "cpu": torch.ones(2)}})
    assert entries["t"]["device"] == "cuda:0" and entries["d"]["devices"] == {"gpu": "cuda:0"}
    assert loaded["t"].device == t.device and loaded["t"].requires_grad and loaded["t"].is_leaf
    assert torch.equal(loaded["t"].detach(), t.detach())
    assert loaded["d"]["gpu"].device == t.device and loaded["d"]["cpu"].device.type == "cpu"
