"""Save and load one step output by its type, in a safe format where one exists.

Every output gets one JSON-able *entry* (kept in step.json's ``outputs``) that says where and
how it was written::

    {"type": "pandas.DataFrame", "storage": "dataset", "path": "_dataset",
     "pickled": false, "size": 123456}

Formats, by type (first match wins):

========================================  ===============  ==================================
value                                     ``storage``      written to
========================================  ===============  ==================================
``datasets.Dataset`` / ``DatasetDict``    ``dataset``      ``save_to_disk`` folder
``pandas.DataFrame`` (main dataset)       ``dataset``      ``_dataset`` (+ exact columns)
``pandas.DataFrame`` / ``Series``         ``arrow``        Arrow IPC file (Feather v2)
``numpy.ndarray`` / numpy scalar          ``npy``          ``.npy``, never pickled
``torch.Tensor`` / ``dict[str, Tensor]``  ``safetensors``  ``.safetensors``
JSON-able values                          ``json``         ``.json`` (tagged where needed)
anything else                             ``pickle``       ``.pkl``, ``"pickled": true``
========================================  ===============  ==================================

The step's *main dataset* (the first ``Dataset``/``DatasetDict`` output, else the first
DataFrame that Arrow stores exactly) goes to ``_dataset`` so that
``datasets.load_from_disk(folder / "_dataset")`` works without this package; everything
else goes to ``_outputs/<name>.<ext>`` (or a folder). A DataFrame or numpy array that cannot
be stored exactly in its safe format (say an object column of mixed Python values) is
pickled instead, and marked as pickled.

Loading gives back the same type and value: DataFrames keep their dtypes, column labels and
index; datasets come back memory-mapped. pandas, pyarrow, numpy, torch and datasets are
imported inside the functions that need them, so importing this module is cheap.

Examples
--------
>>> entries = save_outputs({"df": df, "n": 3}, folder)  # doctest: +SKIP
>>> load_outputs(folder, entries)["n"]  # doctest: +SKIP
3
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import pickle
import re
import sys
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

from .errors import PickleRefusedError, StorageError
from .folders import folder_size

__all__ = [
    "describe_type",
    "load_outputs",
    "load_value",
    "save_outputs",
    "save_value",
]

MAIN_DATASET = "_dataset"
OUTPUTS = "_outputs"
MAX_SHARD_SIZE = "500MB"

_TAG = "__dreamer__"
_PICKLE_FIX = (
    "If you trust this output folder, run `%config DreamerMagics.allow_pickle = True` "
    "and run the cell again (or re-run the step with --force to recompute it)."
)


# --------------------------------------------------------------------------- public API


def save_outputs(values: dict[str, Any], folder: Path) -> dict[str, dict]:
    """Write every output under ``folder`` and return one entry per name, in order.

    Examples
    --------
    >>> entries = save_outputs({"ds": ds, "model_name": "gpt2"}, tmp / "step")  # doctest: +SKIP
    >>> entries["ds"]["path"]  # doctest: +SKIP
    '_dataset'

    The main dataset (the first ``datasets.Dataset``/``DatasetDict``, else the first pandas
    DataFrame that Arrow stores exactly) is written to ``folder / "_dataset"``.

    Raises
    ------
    StorageError
        If a value cannot be saved at all; the message names the variable, its type and
        the remedy.
    """
    folder = Path(folder)
    try:
        main = _pick_main(values)
        entries: dict[str, dict] = {}
        for name, value in values.items():
            entries[name] = save_value(value, folder, name, main=(name == main))
    finally:
        _plan_cache.clear()
    return entries


def load_outputs(
    folder: Path, entries: dict[str, dict], *, allow_pickle: bool = True
) -> dict[str, Any]:
    """Load every output described by ``entries`` (as returned by :func:`save_outputs`).

    Examples
    --------
    >>> values = load_outputs(folder, step_json["outputs"], allow_pickle=False)  # doctest: +SKIP

    Raises
    ------
    StorageError
        If a file is missing or unreadable (the step is incomplete and should re-run), or a
        pickled output is met while ``allow_pickle`` is false.
    """
    folder = Path(folder)
    return {
        name: load_value(folder, entry, allow_pickle=allow_pickle, name=name)
        for name, entry in entries.items()
    }


def save_value(value: Any, folder: Path, name: str, *, main: bool = False) -> dict:
    """Write one value under ``folder`` and return its JSON-able entry.

    Examples
    --------
    >>> save_value(np.arange(3), folder, "xs")  # doctest: +SKIP
    {'type': 'numpy.ndarray', 'storage': 'npy', 'path': '_outputs/xs.npy', 'pickled': False, 'size': 152}

    ``main=True`` writes a ``Dataset``/``DatasetDict``/DataFrame to ``folder / "_dataset"``
    (ignored for other types).

    Raises
    ------
    StorageError
        If the value cannot be saved (it cannot even be pickled); the message names the
        variable, its type and the remedy.
    """
    folder = Path(folder)
    kind = _kind(value)
    type_name = describe_type(value)
    if main and kind in ("dataset", "dataframe"):
        target = folder / MAIN_DATASET
        if target.exists():
            raise StorageError(
                f"Cannot save {name!r} as the main dataset: {target} already exists "
                "(only one output can be the step's main dataset)."
            )
    else:
        target = None
    entry: dict[str, Any] | None
    try:
        if kind == "dataset":
            entry = _save_dataset(value, folder, target or _new_path(folder, name, ""))
        elif kind in ("dataframe", "series"):
            entry = _save_pandas(value, folder, name, target)
        elif kind == "ndarray":
            entry = _save_numpy(value, folder, name)
        elif kind in ("tensor", "tensor_dict"):
            entry = _save_torch(value, folder, name)
        else:
            entry = _save_json(value, folder, name)
    except OSError as exc:  # disk full, permissions: nothing the format can fix
        raise StorageError(
            f"Cannot save output {name!r} ({type_name}) under {folder}: {exc}"
        ) from exc
    if entry is None:
        entry = _save_pickle(value, folder, name)
    entry = {"type": type_name, **entry}
    entry["size"] = folder_size(folder / entry["path"])
    return entry


def load_value(
    folder: Path, entry: dict, *, allow_pickle: bool = True, name: str | None = None
) -> Any:
    """Load one value described by ``entry`` from ``folder``.

    Examples
    --------
    >>> load_value(folder, {"type": "int", "storage": "json", "path": "_outputs/n.json",
    ...                     "pickled": False, "size": 1})  # doctest: +SKIP
    3

    ``name`` (the variable's name) is only used in error messages.

    Raises
    ------
    StorageError
        If the files are missing or unreadable, or the entry is pickled and
        ``allow_pickle`` is false.
    """
    folder = Path(folder)
    path = _entry_path(folder, entry)
    name = name or PurePosixPath(str(entry.get("path", "?"))).stem
    if entry.get("pickled") and not allow_pickle:
        raise PickleRefusedError(
            f"Output {name!r} ({entry.get('type', '?')}) was saved with pickle, and loading "
            "pickles is turned off (a pickle can run code when it is loaded). " + _PICKLE_FIX
        )
    storage = entry.get("storage")
    loader = _LOADERS.get(storage)  # type: ignore[arg-type]
    if loader is None:
        raise StorageError(
            f"Output {name!r} has an unknown storage {storage!r}; expected one of "
            f"{sorted(_LOADERS)}. The step will have to run again."
        )
    if not path.exists():
        raise StorageError(
            f"Output {name!r} is missing: {path} does not exist. The step folder is "
            "incomplete; run the step again."
        )
    try:
        return loader(path, entry)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot load, re-run"
        raise StorageError(
            f"Cannot load output {name!r} ({entry.get('type', '?')}) from {path}: "
            f"{type(exc).__name__}: {exc}. Run the step again to recompute it."
        ) from exc


def describe_type(value: Any) -> str:
    """The short, importable name of ``value``'s type.

    Examples
    --------
    >>> describe_type(3)
    'int'
    >>> describe_type({"a": 1})
    'dict'

    Types that a package re-exports at its top level are named that way
    (``pandas.DataFrame``, ``datasets.Dataset``, ``numpy.ndarray``, ``torch.Tensor``).
    """
    cls = type(value)
    module = cls.__module__ or ""
    qualname = getattr(cls, "__qualname__", cls.__name__)
    if module == "builtins":
        return qualname
    top = module.split(".", 1)[0]
    package = sys.modules.get(top)
    if package is not None and getattr(package, qualname, None) is cls:
        return f"{top}.{qualname}"
    return f"{module}.{qualname}"


# --------------------------------------------------------------------------- dispatch


def _kind(value: Any) -> str:
    """Which family of formats ``value`` belongs to (by exact type, without imports)."""
    cls = type(value)
    module = cls.__module__ or ""
    if module.startswith("datasets") and "datasets" in sys.modules:
        import datasets

        if isinstance(value, (datasets.Dataset, datasets.DatasetDict)):
            return "dataset"
    if module.startswith("pandas") and "pandas" in sys.modules:
        import pandas as pd

        if cls is pd.DataFrame:
            return "dataframe"
        if cls is pd.Series:
            return "series"
    if module == "numpy" and "numpy" in sys.modules:
        import numpy as np

        if cls is np.ndarray or (isinstance(value, np.generic) and cls.__module__ == "numpy"):
            return "ndarray"
    if "torch" in sys.modules:
        import torch

        if cls is torch.Tensor:
            return "tensor"
        if (
            cls is dict
            and value
            and all(type(k) is str for k in value)
            and all(type(v) is torch.Tensor for v in value.values())
        ):
            return "tensor_dict"
    return "other"


def _pick_main(values: dict[str, Any]) -> str | None:
    """The name of the step's main dataset, or ``None``."""
    for name, value in values.items():
        if _kind(value) == "dataset":
            return name
    for name, value in values.items():
        if _kind(value) == "dataframe" and _frame_plan(value) is not None:
            return name
    return None


# --------------------------------------------------------------------------- paths


def _new_path(folder: Path, name: str, ext: str) -> Path:
    """A fresh path ``folder/_outputs/<safe name><ext>`` that does not exist yet.

    Names that differ only in case (``df`` and ``DF``) get distinct files even on
    case-insensitive file systems.
    """
    outputs = folder / OUTPUTS
    outputs.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^\w.-]", "_", name).lstrip(".")[:100] or "output"
    taken = {p.name.lower() for p in outputs.iterdir()}
    candidate, n = stem, 1
    while any(t == (candidate + ext).lower() or t.startswith(candidate.lower() + ".") for t in taken):
        n += 1
        candidate = f"{stem}-{n}"
    return outputs / (candidate + ext)


def _relative(folder: Path, path: Path) -> str:
    return path.relative_to(folder).as_posix()


def _entry_path(folder: Path, entry: dict) -> Path:
    rel = entry.get("path")
    if not isinstance(rel, str) or not rel:
        raise StorageError(f"A step.json output entry has no valid 'path': {entry!r}.")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts:
        raise StorageError(
            f"A step.json output entry points outside its step folder ({rel!r}); refusing "
            "to read it. Run the step again."
        )
    return folder.joinpath(*pure.parts)


# --------------------------------------------------------------------------- datasets


# Rows per Arrow record batch in _dataset files. datasets writes 1,000-row batches by default
# (its own cap for huge rows still applies); bigger batches make saving and loading a large
# dataset several times faster, and the files stay what load_from_disk expects.
WRITER_BATCH_ROWS = 65_536


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """While we save: hide datasets' progress bars (the step shows its own status) and write
    bigger record batches."""
    import datasets
    from datasets import config

    was_disabled = datasets.are_progress_bars_disabled()
    batch_rows = config.DEFAULT_MAX_BATCH_SIZE
    datasets.disable_progress_bars()
    config.DEFAULT_MAX_BATCH_SIZE = max(batch_rows, WRITER_BATCH_ROWS)
    try:
        yield
    finally:
        config.DEFAULT_MAX_BATCH_SIZE = batch_rows
        if not was_disabled:
            datasets.enable_progress_bars()


def _save_dataset(value: Any, folder: Path, path: Path) -> dict:
    with _quiet_datasets():
        value.save_to_disk(str(path), max_shard_size=MAX_SHARD_SIZE)
    return {"storage": "dataset", "path": _relative(folder, path), "pickled": False}


def _load_dataset(path: Path, entry: dict) -> Any:
    if "pandas" in entry:
        return _load_frame_from_dataset(path, entry)
    import datasets

    return datasets.load_from_disk(str(path), keep_in_memory=False)


# --------------------------------------------------------------------------- pandas


class _FramePlan:
    """An Arrow table that gives back a DataFrame exactly, and how to rebuild it."""

    def __init__(self, table: Any, meta: dict, fixups: dict[str, Any]) -> None:
        self.table = table
        self.meta = meta
        self.fixups = fixups  # entry fields: object_columns, index_freq


# Plans are costly to build; save_outputs builds them while choosing the main dataset and
# reuses them when saving. Keyed by id() and checked by identity; cleared by save_outputs.
_plan_cache: dict[int, tuple[Any, _FramePlan | None]] = {}


def _frame_plan(df: Any) -> _FramePlan | None:
    """Convert ``df`` to Arrow and check that it comes back exactly; ``None`` if not."""
    cached = _plan_cache.get(id(df))
    if cached is not None and cached[0] is df:
        return cached[1]
    plan = _build_frame_plan(df)
    _plan_cache[id(df)] = (df, plan)
    return plan


def _build_frame_plan(df: Any) -> _FramePlan | None:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    try:
        table = pa.Table.from_pandas(df, preserve_index=None)
    except Exception:  # noqa: BLE001 - Arrow cannot hold it: pickle instead
        return None
    meta = json.loads(table.schema.metadata[b"pandas"])
    objects: dict[str, str] = {}
    for i in range(df.shape[1]):
        column = df.iloc[:, i]
        if column.dtype != object:
            continue
        na = _na_kind(column.to_numpy())
        if na == "mixed":
            return None
        objects[str(i)] = na
    fixups: dict[str, Any] = {}
    if objects:
        fixups["object_columns"] = objects
    if getattr(df.index, "freq", None) is not None:
        fixups["index_freq"] = df.index.freqstr
    columns = df.columns
    if type(columns) is pd.RangeIndex:
        try:
            name = _encode(columns.name)
        except _NotJSONable:
            return None
        fixups["column_range"] = [columns.start, columns.stop, columns.step, name]
    plan = _FramePlan(table, meta, fixups)
    # Dtypes, labels and index: check on a head sample (cheap, same code path as loading).
    n = min(len(df), 200)
    try:
        probe = _frame_from_table(table.slice(0, n), _sliced_meta(meta, n), fixups)
        _assert_same_frame(probe, df.iloc[:n])
        # Object columns can change silently (ints -> floats, tuples -> lists,
        # dicts -> structs): check every value of those.
        if objects or _has_object_index(df):
            full = _frame_from_table(table, meta, fixups)
            for i in range(df.shape[1]):
                if df.iloc[:, i].dtype == object and not _same_sequence(
                    df.iloc[:, i].to_numpy(), full.iloc[:, i].to_numpy()
                ):
                    return None
            if _has_object_index(df) and not _same_sequence(
                np.asarray(df.index.to_numpy()), np.asarray(full.index.to_numpy())
            ):
                return None
    except Exception:  # noqa: BLE001 - any difference: not exact, pickle instead
        return None
    return plan


def _has_object_index(df: Any) -> bool:
    import pandas as pd

    index = df.index
    if isinstance(index, pd.MultiIndex):
        return any(level.dtype == object for level in index.levels)
    return index.dtype == object


def _sliced_meta(meta: dict, n: int) -> dict:
    out = dict(meta)
    out["index_columns"] = [
        {**ix, "stop": ix["start"] + n * ix["step"]}
        if isinstance(ix, dict) and ix.get("kind") == "range"
        else ix
        for ix in meta["index_columns"]
    ]
    return out


def _na_kind(values: Any) -> str:
    """How missing values look in an object column: none, nan, or mixed."""
    import pandas as pd

    missing = pd.isna(values)
    if not missing.any():
        return "none"
    kinds = {
        "none" if v is None else "nan" if type(v) is float and math.isnan(v) else "other"
        for v in values[missing]
    }
    return kinds.pop() if len(kinds) == 1 and "other" not in kinds else "mixed"


def _frame_from_table(table: Any, meta: dict, fixups: dict[str, Any]) -> Any:
    """Rebuild the DataFrame from an Arrow table, the pandas metadata and the fix-ups
    (``object_columns``: position -> how missing values look; ``index_freq``;
    ``column_range``: integer column labels 0..n that pandas keeps as a RangeIndex)."""
    import numpy as np
    import pandas as pd

    table = table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})
    df = table.to_pandas()
    if fixups.get("index_freq"):
        df.index = type(df.index)(df.index, freq=fixups["index_freq"])
    if fixups.get("column_range"):
        start, stop, step, name = fixups["column_range"]
        df.columns = pd.RangeIndex(start, stop, step, name=_decode(name))
    for key, na in fixups.get("object_columns", {}).items():
        i = int(key)
        column = df.iloc[:, i]
        na_value = np.nan if na == "nan" else None
        if column.dtype != object:
            values = column.to_numpy(dtype=object, na_value=na_value)
        else:
            missing = column.isna().to_numpy()
            if not missing.any():
                continue
            values = column.to_numpy().copy()
            values[missing] = na_value
        # A Series with an explicit dtype: pandas 3 would infer ``str`` from a bare array.
        df.isetitem(i, pd.Series(values, index=df.index, dtype=object, copy=False))
    return df


def _assert_same_frame(left: Any, right: Any) -> None:
    import pandas as pd

    pd.testing.assert_frame_equal(
        left,
        right,
        check_exact=True,
        check_index_type=True,
        check_column_type=True,
        check_categorical=True,
        check_flags=True,
    )
    if list(left.columns) != list(right.columns) or left.columns.names != right.columns.names:
        raise AssertionError("column labels differ")


def _same_sequence(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _same(a: Any, b: Any) -> bool:
    """Strict equality: same types all the way down, nan equals nan."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (list, tuple):
        return _same_sequence(a, b)
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    try:
        result = a == b
        # bool or numpy.bool_; an array (elementwise ==) does not count as equal
        return bool(result) if type(result).__name__ in ("bool", "bool_") else False
    except Exception:  # noqa: BLE001
        return False


def _save_pandas(value: Any, folder: Path, name: str, main: Path | None) -> dict | None:
    series_name: Any = None
    frame = value
    if _kind(value) == "series":
        try:
            series_name = _encode(value.name)
        except _NotJSONable:
            return None
        frame = value.to_frame("values")
    plan = _frame_plan(frame)
    _plan_cache.pop(id(frame), None)
    if plan is None:
        return None
    if main is not None:
        entry = _save_frame_as_dataset(plan, main, folder, name)
        if entry is not None:
            return entry
    path = _new_path(folder, name, ".arrow")
    _write_arrow_file(plan.table, path)
    entry: dict[str, Any] = {
        "storage": "arrow",
        "path": _relative(folder, path),
        "pickled": False,
        "num_rows": len(frame),
    }
    entry.update(plan.fixups)
    if _kind(value) == "series":
        entry["series_name"] = series_name
    return entry


def _save_frame_as_dataset(plan: _FramePlan, path: Path, folder: Path, name: str) -> dict | None:
    """Write a DataFrame as the step's ``_dataset``; columns datasets cannot hold exactly
    (categoricals, pandas extension types) are also kept, exactly, in a side file."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    table = plan.table
    exact: dict[str, Any] = {}
    readable = table
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            exact[field.name] = table.column(i)
            readable = readable.set_column(i, field.name, table.column(i).cast(field.type.value_type))
        elif isinstance(field.type, pa.ExtensionType):
            exact[field.name] = table.column(i)
            storage = pa.chunked_array(
                [chunk.storage for chunk in table.column(i).chunks], type=field.type.storage_type
            )
            readable = readable.set_column(i, field.name, storage)
    readable = readable.replace_schema_metadata(None)
    try:
        dataset = Dataset(InMemoryTable(readable), fingerprint=os.urandom(8).hex())
        if dataset.data.schema.remove_metadata() != readable.schema:
            for i, field in enumerate(readable.schema):
                if dataset.data.schema.field(i).type != field.type and field.name not in exact:
                    exact[field.name] = table.column(i)
    except Exception:  # noqa: BLE001 - datasets cannot hold it: an ordinary output instead
        return None
    entry: dict[str, Any] = {
        "storage": "dataset",
        "path": MAIN_DATASET,
        "pickled": False,
        "num_rows": table.num_rows,
        "pandas": plan.meta,
    }
    entry.update(plan.fixups)
    with _quiet_datasets():
        dataset.save_to_disk(str(path), max_shard_size=MAX_SHARD_SIZE)
    if exact:
        side = _new_path(folder, name, ".columns.arrow")
        _write_arrow_file(pa.table(exact), side)
        entry["exact_columns"] = _relative(folder, side)
    return entry


def _write_arrow_file(table: Any, path: Path) -> None:
    """Write an Arrow IPC file (Feather v2): memory-mappable, with the schema metadata."""
    import pyarrow as pa

    batches = table.to_batches(max_chunksize=1 << 20)
    if not batches:  # keep one empty batch, or dictionaries (categories) would be lost
        columns = [c.chunks[0] if c.num_chunks else pa.array([], type=c.type) for c in table.columns]
        batches = [pa.record_batch(columns, schema=table.schema)]
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _load_frame_from_dataset(path: Path, entry: dict) -> Any:
    """Read ``_dataset``'s Arrow files memory-mapped and rebuild the DataFrame."""
    import pyarrow as pa

    state = json.loads((path / "state.json").read_text())
    tables = []
    for data_file in state["_data_files"]:
        source = pa.memory_map(str(path / data_file["filename"]))
        tables.append(pa.ipc.open_stream(source).read_all())
    if not tables:  # an empty dataset has no data files: rebuild its schema
        from datasets import Features

        info = json.loads((path / "dataset_info.json").read_text())
        tables.append(Features.from_dict(info["features"]).arrow_schema.empty_table())
    table = pa.concat_tables(tables) if len(tables) != 1 else tables[0]
    side = entry.get("exact_columns")
    if side:
        side_path = _entry_path(path.parent, {"path": side})
        side_table = pa.ipc.open_file(pa.memory_map(str(side_path))).read_all()
        for name in side_table.column_names:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, side_table.column(name))
    _check_rows(table, entry)
    return _frame_from_table(table, entry["pandas"], entry)


def _load_arrow(path: Path, entry: dict) -> Any:
    import pyarrow as pa

    table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
    _check_rows(table, entry)
    meta = json.loads(table.schema.metadata[b"pandas"])
    frame = _frame_from_table(table, meta, entry)
    if "series_name" in entry:
        series = frame.iloc[:, 0]
        series.name = _decode(entry["series_name"])
        return series
    return frame


def _check_rows(table: Any, entry: dict) -> None:
    expected = entry.get("num_rows")
    if expected is not None and table.num_rows != expected:
        raise StorageError(
            f"{entry.get('path')} holds {table.num_rows} rows where {expected} were saved; "
            "the step folder is damaged. Run the step again."
        )


# --------------------------------------------------------------------------- numpy


def _save_numpy(value: Any, folder: Path, name: str) -> dict | None:
    import numpy as np

    array = np.asarray(value)
    if array.dtype.hasobject:
        return None
    path = _new_path(folder, name, ".npy")
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
    entry: dict[str, Any] = {"storage": "npy", "path": _relative(folder, path), "pickled": False}
    if type(value) is not np.ndarray:
        entry["scalar"] = True
    return entry


def _load_numpy(path: Path, entry: dict) -> Any:
    import numpy as np

    array = np.load(path, allow_pickle=False)
    return array[()] if entry.get("scalar") else array


# --------------------------------------------------------------------------- torch


def _save_torch(value: Any, folder: Path, name: str) -> dict | None:
    import torch
    from safetensors.torch import save_file

    single = _kind(value) == "tensor"
    tensors = {"tensor": value} if single else value
    if any(t.layout != torch.strided or t.is_quantized for t in tensors.values()):
        return None
    prepared = {k: t.detach().resolve_conj().resolve_neg().cpu().contiguous() for k, t in tensors.items()}
    path = _new_path(folder, name, ".safetensors")
    try:
        try:
            save_file(prepared, str(path))
        except RuntimeError:  # tensors sharing memory (tied weights): store copies
            save_file({k: t.clone() for k, t in prepared.items()}, str(path))
    except Exception:  # noqa: BLE001 - an unsupported dtype, say: pickle instead
        path.unlink(missing_ok=True)
        return None
    entry: dict[str, Any] = {
        "storage": "safetensors",
        "path": _relative(folder, path),
        "pickled": False,
        "keys": None if single else list(tensors),
    }
    grad = [k for k, t in tensors.items() if t.requires_grad]
    if grad:
        entry["requires_grad"] = grad
    return entry


def _load_torch(path: Path, entry: dict) -> Any:
    from safetensors.torch import load_file

    loaded = load_file(str(path), device="cpu")
    for key in entry.get("requires_grad", ()):
        loaded[key].requires_grad_(True)
    keys = entry.get("keys")
    if keys is None:
        return loaded["tensor"]
    return {k: loaded[k] for k in keys}


# --------------------------------------------------------------------------- json


class _NotJSONable(Exception):
    pass


def _encode(value: Any) -> Any:
    """Encode ``value`` as plain JSON, tagging what JSON alone would lose.

    Tuples, sets, bytes, dicts with non-string keys and non-finite floats become
    ``{"__dreamer__": kind, ...}`` objects; a dict that itself has a ``"__dreamer__"`` key
    is tagged too, so decoding is never ambiguous. Types are matched exactly (a subclass
    such as ``OrderedDict`` or ``numpy.float64`` is not JSON-able and gets pickled).
    """
    cls = type(value)
    if value is None or cls in (bool, str):
        return value
    if cls is int:
        if abs(value) >= 10**4000:  # beyond int <-> str conversion limits
            raise _NotJSONable
        return value
    if cls is float:
        if math.isfinite(value):
            return value
        return {_TAG: "float", "value": repr(value)}
    if cls is list:
        return [_encode(v) for v in value]
    if cls is tuple:
        return {_TAG: "tuple", "items": [_encode(v) for v in value]}
    if cls is dict:
        if all(type(k) is str for k in value) and _TAG not in value:
            return {k: _encode(v) for k, v in value.items()}
        return {_TAG: "dict", "items": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if cls in (set, frozenset):
        return {_TAG: cls.__name__, "items": [_encode(v) for v in value]}
    if cls is bytes:
        return {_TAG: "bytes", "base64": base64.b64encode(value).decode("ascii")}
    raise _NotJSONable


def _decode(data: Any) -> Any:
    if type(data) is list:
        return [_decode(v) for v in data]
    if type(data) is not dict:
        return data
    tag = data.get(_TAG)
    if tag is None:
        return {k: _decode(v) for k, v in data.items()}
    if tag == "float":
        return float(data["value"])
    if tag == "tuple":
        return tuple(_decode(v) for v in data["items"])
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in data["items"]}
    if tag == "set":
        return {_decode(v) for v in data["items"]}
    if tag == "frozenset":
        return frozenset(_decode(v) for v in data["items"])
    if tag == "bytes":
        return base64.b64decode(data["base64"])
    raise ValueError(f"unknown JSON tag {tag!r}")


def _save_json(value: Any, folder: Path, name: str) -> dict | None:
    try:
        encoded = _encode(value)
        try:
            text = json.dumps(encoded, ensure_ascii=False, allow_nan=False)
            data = text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: escape them
            data = json.dumps(encoded, allow_nan=False).encode("ascii")
    except (_NotJSONable, RecursionError, ValueError, TypeError):
        return None
    path = _new_path(folder, name, ".json")
    path.write_bytes(data)
    return {"storage": "json", "path": _relative(folder, path), "pickled": False}


def _load_json(path: Path, entry: dict) -> Any:
    return _decode(json.loads(path.read_bytes()))


# --------------------------------------------------------------------------- pickle


def _save_pickle(value: Any, folder: Path, name: str) -> dict:
    path = _new_path(folder, name, ".pkl")
    try:
        with open(path, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - TypeError, PicklingError, AttributeError, ...
        path.unlink(missing_ok=True)
        raise StorageError(
            f"Cannot save output {name!r} of type {describe_type(value)}: it cannot be "
            f"pickled ({type(exc).__name__}: {exc}). Leave it out of the step's outputs "
            f"with --outputs (list the names to keep), or make it picklable (for example "
            f"convert it to a list or a plain object)."
        ) from exc
    return {"storage": "pickle", "path": _relative(folder, path), "pickled": True}


def _load_pickle(path: Path, entry: dict) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


_LOADERS = {
    "dataset": _load_dataset,
    "arrow": _load_arrow,
    "npy": _load_numpy,
    "safetensors": _load_torch,
    "json": _load_json,
    "pickle": _load_pickle,
}
