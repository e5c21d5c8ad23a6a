"""Save and load one output by its type, in a safe format where one exists: the one registry.

Every output gets one JSON-able *entry* (kept in step.json's or trainer.json's ``outputs``)
that says where and how it was written::

    {"type": "pandas.DataFrame", "storage": "dataset", "path": "_dataset",
     "pickled": false, "size": 123456}

How each kind of value is saved and loaded is one :class:`Storer` in :data:`STORERS`, tried in
order (the first that matches and can store the value exactly wins):

========================================  ===============  ==================================
value                                     ``storage``      written to
========================================  ===============  ==================================
``datasets.Dataset`` / ``DatasetDict``    ``dataset``      ``save_to_disk`` folder
``pandas.DataFrame`` (main dataset)       ``dataset``      ``_dataset`` (+ exact columns)
``pandas.DataFrame`` / ``Series``         ``arrow``        Arrow IPC file (Feather v2)
``numpy.ndarray`` / numpy scalar          ``npy``          ``.npy``, never pickled
``torch.Tensor`` / ``dict[str, Tensor]``  ``safetensors``  ``.safetensors`` (+ the device)
a lambda or notebook function             ``function``     ``.function.json``: its source
JSON-able values                          ``json``         ``.json`` (tagged where needed)
anything else                             ``pickle``       ``.pkl``, ``"pickled": true``
========================================  ===============  ==================================

Trainers also name a storer for a value themselves (``save_value(..., storage=, path=)``):
``pretrained`` (``save_pretrained`` / ``from_pretrained`` of models, tokenizers and
processors), ``state_dict`` (a plain PyTorch module's weights, loaded back into the module in
the namespace) and ``training_args`` (``TrainingArguments`` as JSON).

The step's *main dataset* (the first ``Dataset``/``DatasetDict`` output, else the first
DataFrame that Arrow stores exactly) goes to ``_dataset`` so that
``datasets.load_from_disk(folder / "_dataset")`` works without this package; everything
else goes to ``_outputs/<name>.<ext>`` (or a folder). A DataFrame or numpy array that cannot
be stored exactly in its safe format (say an object column of mixed Python values) is
pickled instead, and marked as pickled.

A value that cannot be saved at all (an open or closed file, a generator, a progress bar, a
socket or database connection, a lock, anything pickle refuses) is skipped:
:func:`save_outputs` names it in ``not_saved`` with the reason, rather than failing a step
whose body already ran. A torch tensor comes back on the device it was saved from when that
device exists here (else on the CPU). Loading code (a pickle, a function's source) is refused
when ``allow_pickle`` is false, before any output is loaded; whether a file is a pickle is
decided from its content (:func:`check_files`), never from the entry's word.

Loading gives back the same type and value: DataFrames keep their dtypes, column labels and
index; datasets come back memory-mapped. pandas, pyarrow, numpy, torch and datasets are
imported inside the functions that need them, so importing this module is cheap.

Examples
--------
>>> saved = save_outputs({"df": df, "n": 3, "log": open("log.txt")}, folder)  # doctest: +SKIP
>>> saved.not_saved  # doctest: +SKIP
{'log': 'an open file cannot be saved'}
>>> load_outputs(folder, saved)["n"]  # doctest: +SKIP
3
"""

from __future__ import annotations

import __future__
import ast
import base64
import builtins
import contextlib
import dataclasses
import functools
import importlib
import json
import linecache
import math
import operator
import os
import pickle
import re
import sys
import textwrap
import types
from collections import ChainMap
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from .errors import DamagedResultError, PickleRefusedError, StorageError
from .folders import folder_size, read_json, write_json_atomic

__all__ = [
    "LoadContext",
    "check_files",
    "STORERS",
    "SavedOutputs",
    "Storer",
    "describe_type",
    "load_outputs",
    "load_value",
    "not_saved_note",
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


# --------------------------------------------------------------------------- the registry


class LoadContext(NamedTuple):
    """What loading one value may need besides its files.

    ``allow_pickle``: whether code saved in the folder may run (pickles, functions' source);
    ``namespace``: the user namespace (a module's weights load into the module there; a
    function is re-created with it as its globals); ``name``: the variable, for messages.
    """

    allow_pickle: bool = True
    namespace: Mapping[str, Any] | None = None
    name: str = "?"


class Target(NamedTuple):
    """Where one value is written: under ``folder``, for variable ``name``.

    ``main``: the step's main dataset (``_dataset``); ``path``: a place the caller chose
    (relative to ``folder``), else a fresh ``_outputs/<name>.<ext>``.
    """

    folder: Path
    name: str
    main: Path | None = None
    path: str | None = None

    def new_path(self, ext: str) -> Path:
        if self.path is not None:
            path = self.folder.joinpath(*PurePosixPath(self.path).parts)
            path.parent.mkdir(parents=True, exist_ok=True)
            return path
        return _new_path(self.folder, self.name, ext)

    def relative(self, path: Path) -> str:
        return _relative(self.folder, path)


class Storer(NamedTuple):
    """How one kind of value is saved and loaded (one row of the table in the module docstring).

    Examples
    --------
    >>> [s.kind for s in STORERS][:3]
    ['dataset', 'dataframe', 'npy']

    ``matches(value)``: whether this storer is for the value; ``save(value, target)``: write it
    and return the entry (without ``type`` and ``size``, which :func:`save_value` adds), or
    ``None`` when this format cannot hold the value exactly (the next storer is tried);
    ``load(path, entry, context)``: the value back. ``storage``: the word the entry records
    (several storers may share one, such as ``dataset``). ``automatic``: chosen by type for
    any output; false for those a caller names (a trainer's models). ``runs_code``: loading
    runs code saved in the folder, so it is refused unless ``allow_pickle``.
    """

    kind: str
    storage: str
    matches: Callable[[Any], bool]
    save: Callable[[Any, Target], "dict | None"]
    load: Callable[[Path, dict, LoadContext], Any]
    automatic: bool = True
    runs_code: bool = False


class SavedOutputs(dict):
    """What :func:`save_outputs` returns: ``{name: entry}`` as step.json keeps them, in order,
    and ``not_saved``: ``{name: reason}`` for the outputs that cannot be saved."""

    def __init__(self, entries: Mapping[str, dict] = (), not_saved: Mapping[str, str] | None = None) -> None:  # type: ignore[assignment]
        super().__init__(entries)
        self.not_saved: dict[str, str] = dict(not_saved or {})


class _NotSaveable(Exception):
    """A value that no format can hold; ``args[0]`` is the reason, in the user's words."""


# --------------------------------------------------------------------------- public API


def save_outputs(
    values: Mapping[str, Any], folder: Path, *, placements: Mapping[str, tuple[str, str]] | None = None
) -> SavedOutputs:
    """Write every output under ``folder``: one entry per name, in order, plus what was skipped.

    Examples
    --------
    >>> saved = save_outputs({"ds": ds, "model_name": "gpt2"}, tmp / "step")  # doctest: +SKIP
    >>> saved["ds"]["path"], saved.not_saved  # doctest: +SKIP
    ('_dataset', {})

    The main dataset (the first ``datasets.Dataset``/``DatasetDict``, else the first pandas
    DataFrame that Arrow stores exactly) is written to ``folder / "_dataset"``.
    ``placements`` maps a name to ``(storer kind, path)`` for values the caller stores its own
    way (a trainer's ``_model``). An output that cannot be saved (a file, a generator, a lock,
    anything pickle refuses) is left out of the entries and named in ``not_saved`` with why.

    Raises
    ------
    StorageError
        If writing fails (a full disk, say); the message names the variable and the folder.
    """
    folder = Path(folder)
    placements = placements or {}
    saved = SavedOutputs()
    try:
        main = _pick_main({n: v for n, v in values.items() if n not in placements})
        for name, value in values.items():
            storage, path = placements.get(name, (None, None))
            try:
                saved[name] = _save(value, folder, name, main=(name == main), storage=storage, path=path)
            except _NotSaveable as e:
                saved.not_saved[name] = str(e)
    finally:
        _plan_cache.clear()
    return saved


def load_outputs(
    folder: Path,
    entries: Mapping[str, dict],
    *,
    allow_pickle: bool = True,
    namespace: Mapping[str, Any] | None = None,
    checked: bool = False,
) -> dict[str, Any]:
    """Load every output described by ``entries`` (as returned by :func:`save_outputs`).

    Examples
    --------
    >>> values = load_outputs(folder, step_json["outputs"], allow_pickle=False)  # doctest: +SKIP

    With ``allow_pickle`` false, an output whose loading would run saved code (a pickle, a
    function's source, a file that holds a pickle whatever the entry says) is refused before
    any output is loaded. ``namespace`` is the user namespace (see :class:`LoadContext`).
    ``checked``: the files were checked by content already, unchanged since
    (``integrity.checked_before``): :func:`check_files` is not run again.

    Raises
    ------
    StorageError
        If a file is missing or unreadable (the step is incomplete and should re-run), or a
        pickled output is met while ``allow_pickle`` is false (:class:`PickleRefusedError`).
    """
    folder = Path(folder)
    contexts = {name: LoadContext(allow_pickle, namespace, name) for name in entries}
    for name, entry in entries.items():
        _refuse_code(entry, _storer_for(entry, name), contexts[name])
    for name, entry in entries.items() if not checked else ():
        check_files(folder, entry, contexts[name])
    return {name: _load_one(folder, entry, contexts[name]) for name, entry in entries.items()}


def save_value(
    value: Any, folder: Path, name: str, *, main: bool = False, storage: str | None = None, path: str | None = None
) -> dict:
    """Write one value under ``folder`` and return its JSON-able entry.

    Examples
    --------
    >>> save_value(np.arange(3), folder, "xs")  # doctest: +SKIP
    {'type': 'numpy.ndarray', 'storage': 'npy', 'path': '_outputs/xs.npy', 'pickled': False, 'size': 152}
    >>> save_value(model, folder, "model", storage="pretrained", path="_model")  # doctest: +SKIP

    ``main=True`` writes a ``Dataset``/``DatasetDict``/DataFrame to ``folder / "_dataset"``
    (ignored for other types). ``storage`` names the storer kind to use (``pretrained``,
    ``state_dict``, ``training_args``) and ``path`` where it writes.

    Raises
    ------
    StorageError
        If the value cannot be saved (it cannot even be pickled); the message names the
        variable, its type and the remedy.
    """
    try:
        return _save(value, Path(folder), name, main=main, storage=storage, path=path)
    except _NotSaveable as e:
        raise StorageError(
            f"Cannot save output {name!r} of type {describe_type(value)}: {e}. Leave it out of the step's "
            f"outputs with --outputs (list the names to keep), or make it picklable (for example "
            f"convert it to a list or a plain object)."
        ) from e.__cause__


def load_value(
    folder: Path,
    entry: dict,
    *,
    allow_pickle: bool = True,
    name: str | None = None,
    context: LoadContext | None = None,
) -> Any:
    """Load one value described by ``entry`` from ``folder``.

    Examples
    --------
    >>> load_value(folder, {"type": "int", "storage": "json", "path": "_outputs/n.json",
    ...                     "pickled": False, "size": 1})  # doctest: +SKIP
    3

    ``name`` (the variable's name) is only used in error messages; ``context`` replaces
    ``allow_pickle`` and ``name`` (see :class:`LoadContext`).

    Raises
    ------
    StorageError
        If the files are missing or unreadable, or the entry is pickled and
        ``allow_pickle`` is false.
    """
    folder = Path(folder)
    if context is None:
        context = LoadContext(allow_pickle, None, name or PurePosixPath(str(entry.get("path", "?"))).stem)
    _refuse_code(entry, _storer_for(entry, context.name), context)
    check_files(folder, entry, context)
    return _load_one(folder, entry, context)


def _load_one(folder: Path, entry: dict, context: LoadContext) -> Any:
    """One value, once its files have been checked (:func:`check_files`)."""
    path = _entry_path(folder, entry)
    name = context.name
    storer = _storer_for(entry, name)
    if not path.exists():
        raise StorageError(
            f"Output {name!r} is missing: {path} does not exist. The step folder is "
            "incomplete; run the step again."
        )
    try:
        return storer.load(path, entry, context)
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot load, re-run"
        raise StorageError(
            f"Cannot load output {name!r} ({entry.get('type', '?')}) from {path}: "
            f"{type(exc).__name__}: {exc}. Run the step again to recompute it."
        ) from exc


def not_saved_note(name: str, reason: str) -> str:
    """The status note for an output that :func:`save_outputs` skipped.

    Examples
    --------
    >>> not_saved_note("f", "an open file cannot be saved")
    '`f` is not saved (an open file cannot be saved): a hit leaves it as it was'
    """
    return f"`{name}` is not saved ({reason}): a hit leaves it as it was"


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


def _save(value: Any, folder: Path, name: str, *, main: bool, storage: str | None, path: str | None) -> dict:
    """One value: the entry, or :class:`_NotSaveable` when nothing can hold it."""
    reason = _why_not_saveable(value)
    if reason is not None:
        raise _NotSaveable(reason)
    kind = _kind(value)
    type_name = describe_type(value)
    main_path = None
    if main and kind in ("dataset", "dataframe") and storage is None:
        main_path = folder / MAIN_DATASET
        if main_path.exists():
            raise StorageError(
                f"Cannot save {name!r} as the main dataset: {main_path} already exists "
                "(only one output can be the step's main dataset)."
            )
    target = Target(folder, name, main_path, path)
    if storage is not None:
        storers = [s for s in STORERS if s.kind == storage]
        if not storers:
            raise StorageError(f"unknown storer {storage!r}; expected one of {sorted(s.kind for s in STORERS)}")
    else:
        storers = [s for s in STORERS if s.automatic and s.matches(value)]
    entry: dict[str, Any] | None = None
    try:
        for storer in storers:
            entry = storer.save(value, target)
            if entry is not None:
                break
    except OSError as exc:  # disk full, permissions: nothing the format can fix
        raise StorageError(f"Cannot save output {name!r} ({type_name}) under {folder}: {exc}") from exc
    if entry is None:
        raise _NotSaveable(f"no storer {storage!r} can hold it" if storage else "it cannot be saved")
    entry = {"type": type_name, **entry}
    entry.setdefault("size", folder_size(folder / entry["path"]))
    return entry


def _storer_for(entry: dict, name: str) -> Storer:
    storage = entry.get("storage")
    for storer in _LOADING:
        if storer.storage == storage:
            return storer
    raise StorageError(
        f"Output {name!r} has an unknown storage {storage!r}; expected one of "
        f"{sorted({s.storage for s in STORERS})}. The step will have to run again."
    )


def _refuse_code(entry: dict, storer: Storer, context: LoadContext) -> None:
    """Refuse, before anything is loaded, an output whose loading runs code, unless allowed."""
    if context.allow_pickle or not (storer.runs_code or entry.get("pickled")):
        return
    how = "was saved with pickle" if storer.storage == "pickle" or entry.get("pickled") else "is re-created by running its saved source code"
    raise PickleRefusedError(
        f"Output {context.name!r} ({entry.get('type', '?')}) {how}, and loading "
        "pickles is turned off (a pickle can run code when it is loaded). " + _PICKLE_FIX
    )


# What each storage writes, by content (:func:`dreamer_magic.integrity.sniff`). A dataset's
# files are checked one by one (:func:`_dataset_files`); a ``from_pretrained`` folder may hold
# any format but a pickle when ``allow_pickle`` is false.
_FORMATS: dict[str, set[str]] = {
    "pickle": {"pickle"},
    "npy": {"npy"},
    "safetensors": {"safetensors"},
    "state_dict": {"safetensors"},
    "arrow": {"arrow-file"},
    "json": {"json"},
    "function": {"json"},
    "training_args": {"json"},
}


def check_files(folder: Path, entry: dict, context: LoadContext) -> None:
    """Check one output's files by what they are, before any output is loaded.

    Examples
    --------
    >>> check_files(folder, {"storage": "npy", "path": "_outputs/x.npy"}, LoadContext(False))  # doctest: +SKIP

    A file that is a pickle, or holds one (a torch archive, an ``.npy`` of objects), is refused
    when ``allow_pickle`` is false, whatever the entry says; a file that is not the format its
    storage writes is damage. A saved dataset's ``state.json`` must name files inside it.

    Raises
    ------
    PickleRefusedError
        Naming the output, the file and how to allow pickles.
    DamagedResultError
        A file of another format than the one saved, or a dataset naming files outside.
    """
    from .integrity import PICKLE_FORMATS, describe, files_under, sniff

    path = _entry_path(folder, entry)
    if not path.exists():
        return  # load_value names what is missing
    storage = entry.get("storage")
    if storage == "dataset":
        checks = _dataset_files(folder, path, entry)
    elif storage == "pretrained":
        checks = [(p, None) for p in files_under(path) if not p.name.startswith(".")]
    else:
        checks = [(p, _FORMATS.get(str(storage))) for p in files_under(path)]
    for file, expected in checks:
        try:
            found = sniff(file)
        except OSError:
            continue  # missing or unreadable: loading it says so
        rel = _relative(folder, file)
        if found in PICKLE_FORMATS and not context.allow_pickle:
            raise PickleRefusedError(
                f"Output {context.name!r} ({entry.get('type', '?')}): `{rel}` is {describe(found)}, and loading "
                "pickles is turned off (a pickle can run code when it is loaded). " + _PICKLE_FIX
            )
        if expected is not None and found not in expected:
            wanted = " or ".join(describe(f) for f in sorted(expected))
            raise DamagedResultError(f"`{rel}` (output {context.name!r}) is {describe(found)}, not {wanted} as saved")


def _dataset_files(folder: Path, path: Path, entry: dict) -> list[tuple[Path, set[str] | None]]:
    """The files ``load_from_disk`` (or the DataFrame loader) reads, with their formats; the
    JSON files that name them are checked to stay inside first."""
    from .integrity import check_dataset_state

    check_dataset_state(path, _relative(folder, path))
    out: list[tuple[Path, set[str] | None]] = []
    splits = [path]
    if (path / "dataset_dict.json").is_file():
        out.append((path / "dataset_dict.json", {"json"}))
        splits = [path / str(s) for s in (read_json(path / "dataset_dict.json") or {}).get("splits") or []]
    for split in splits:
        for meta in ("state.json", "dataset_info.json"):
            if (split / meta).is_file():
                out.append((split / meta, {"json"}))
        state = read_json(split / "state.json") or {}
        for item in state.get("_data_files") or []:
            out.append((split.joinpath(*PurePosixPath(item["filename"]).parts), {"arrow-stream"}))
    side = entry.get("exact_columns")
    if side:
        out.append((_entry_path(folder, {"path": side}), {"arrow-file"}))
    return out


def _why_not_saveable(value: Any) -> str | None:
    """Why no format can hold ``value`` (a live resource rather than data), or ``None``."""
    import io

    cls = type(value)
    module = cls.__module__ or ""
    if isinstance(value, io.IOBase) and not isinstance(value, (io.BytesIO, io.StringIO)):
        closed = True
        with contextlib.suppress(Exception):
            closed = bool(value.closed)
        return "a closed file cannot be saved" if closed else "an open file cannot be saved"
    if isinstance(value, (types.GeneratorType, types.AsyncGeneratorType)):
        return "a generator cannot be saved (it can be read only once); make it a list to save its items"
    if isinstance(value, types.CoroutineType):
        return "a coroutine cannot be saved; await it and save the result"
    if module.split(".")[0] == "tqdm":
        return "a progress bar cannot be saved"
    if module.split(".")[0] in ("_thread", "threading", "multiprocessing") and any(
        word in cls.__name__.lower() for word in ("lock", "semaphore", "condition", "event", "barrier")
    ):
        what = "a lock" if "lock" in cls.__name__.lower() else f"a {cls.__name__} (it synchronises threads)"
        return f"{what} cannot be saved"
    for mod_name, class_names, what in (
        ("socket", ("socket",), "a network connection (socket)"),
        ("ssl", ("SSLSocket",), "a network connection (socket)"),
        ("sqlite3", ("Connection", "Cursor"), "a database connection"),
        ("multiprocessing.connection", ("Connection", "PipeConnection"), "a connection between processes"),
        ("http.client", ("HTTPConnection", "HTTPSConnection", "HTTPResponse"), "a network connection"),
        ("subprocess", ("Popen",), "a running process"),
        ("selectors", ("BaseSelector",), "a selector"),
    ):
        mod = sys.modules.get(mod_name)
        classes = tuple(c for c in (getattr(mod, n, None) for n in class_names) if isinstance(c, type)) if mod else ()
        if classes and isinstance(value, classes):
            return f"{what} cannot be saved"
    return None


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


def _pick_main(values: Mapping[str, Any]) -> str | None:
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
    from .integrity import unsafe_path

    why = unsafe_path(rel)
    if why:
        raise DamagedResultError(f"a step.json output entry points outside its step folder (`{rel}`: {why}); refused")
    return folder.joinpath(*PurePosixPath(rel).parts)


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
        # dicts -> structs): check every value of those, unless their types alone prove
        # the round trip exact (text or bytes only: the common case, checked at C speed).
        unproven = [int(i) for i in objects if not _exact_by_types(df.iloc[:, int(i)].to_numpy(), table.column(int(i)).type)]
        if unproven or _has_object_index(df):
            full = _frame_from_table(table, meta, fixups)
            for i in unproven:
                if not _same_sequence(df.iloc[:, i].to_numpy(), full.iloc[:, i].to_numpy()):
                    return None
            if _has_object_index(df) and not _same_sequence(
                np.asarray(df.index.to_numpy()), np.asarray(full.index.to_numpy())
            ):
                return None
    except Exception:  # noqa: BLE001 - any difference: not exact, pickle instead
        return None
    return plan


def _exact_by_types(values: Any, arrow_type: Any) -> bool:
    """Whether an object column comes back from Arrow exactly, by the types of its values alone.

    True when Arrow stored it as (large) text and every value is exactly a ``str`` or a missing
    value, or as (large) binary and every value is exactly ``bytes`` or missing: such values
    round-trip unchanged (how missing values look is kept by ``object_columns``). Anything else
    (a ``str`` subclass, numbers, lists...) is for the value-by-value check.
    """
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        kind: type = str
    elif pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        kind = bytes
    else:
        return False
    types = set(map(type, values))
    return types <= {kind, type(None), float}  # a float here is a NaN: Arrow refuses other floats in text


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

    df = _simple_frame(table, meta, fixups)
    objects_done = df is not None
    if df is None:
        table = table.replace_schema_metadata({b"pandas": json.dumps(meta).encode()})
        df = table.to_pandas(use_threads=False)  # no thread pool: see _simple_frame
    if fixups.get("index_freq"):
        df.index = type(df.index)(df.index, freq=fixups["index_freq"])
    if fixups.get("column_range"):
        start, stop, step, name = fixups["column_range"]
        df.columns = pd.RangeIndex(start, stop, step, name=_decode(name))
    for key, na in fixups.get("object_columns", {}).items() if not objects_done else ():
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


# numpy dtypes a column without missing values comes back as, zero-copy where Arrow allows
_PLAIN_NUMPY = frozenset(["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64"])


def _simple_frame(table: Any, meta: dict, fixups: dict[str, Any]) -> Any:
    """The DataFrame of a plain table, built column by column: a range index, unique string
    column labels, and columns that are numbers or booleans without missing values, pandas'
    ``str`` text, or ``object`` text (with its missing values as saved). ``None`` for anything
    else, which pyarrow's pandas-metadata pass rebuilds.

    Ten times faster than that pass on a small frame; on a large one it converts text to
    ``object`` once (not to ``str`` and then again), starts no thread pool and imports
    nothing (both would cost a cold hit more than the conversion).
    """
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    index = meta.get("index_columns")
    levels = meta.get("column_indexes") or []
    columns = meta.get("columns") or []
    if (
        meta.get("attributes")
        or not (isinstance(index, list) and len(index) == 1 and isinstance(index[0], dict) and index[0].get("kind") == "range")
        or len(levels) != 1
        or levels[0].get("name") is not None
        or levels[0].get("pandas_type") != "unicode"
        or levels[0].get("numpy_type") not in ("str", "object")
        or len(columns) != table.num_columns
    ):
        return None
    names = table.column_names
    if len(set(names)) != len(names):
        return None
    objects = fixups.get("object_columns") or {}
    text_dtype = None  # pandas 3's ``str`` (made when needed: pandas 2 has no na_value)
    arrays: list[Any] = []
    for i, (column, name, data) in enumerate(zip(columns, names, table.columns)):
        if column.get("metadata") is not None or column.get("name") != name or column.get("field_name") != name:
            return None
        numpy_type, kind = column.get("numpy_type"), data.type
        text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        if numpy_type == "object" and text and objects.get(str(i)) in ("none", "nan"):
            array = data.to_numpy(zero_copy_only=False)  # str, and None where missing
            if data.null_count and objects[str(i)] == "nan":
                array[np.asarray(data.is_null())] = np.nan
        elif numpy_type == "str" and text:
            text_dtype = text_dtype or pd.StringDtype("pyarrow", na_value=np.nan)
            array = text_dtype.__from_arrow__(data)
        elif numpy_type in _PLAIN_NUMPY and (data.null_count == 0 or numpy_type.startswith("float")):
            array = data.to_numpy()  # may be a read-only view of the file: _frame_of_columns copies
        else:
            return None
        if str(array.dtype) != numpy_type:
            return None
        arrays.append(array)
    ix = index[0]
    rows = pd.RangeIndex(ix["start"], ix["stop"], ix["step"], name=ix.get("name"))
    if not arrays or len(rows) != table.num_rows:
        return None
    if levels[0]["numpy_type"] == "str":
        # the labels as Arrow text: pd.Index(names) would infer them through pyarrow's
        # pandas-compatibility module, whose import costs a cold hit more than the whole frame
        try:
            encoded = [name.encode() for name in names]
        except UnicodeEncodeError:
            return None
        offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        labels = pa.LargeStringArray.from_buffers(len(names), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded)))
        labels = pd.Index((text_dtype or pd.StringDtype("pyarrow", na_value=np.nan)).__from_arrow__(labels), copy=False)
    else:
        labels = pd.Index(names, dtype=object)
    return _frame_of_columns(arrays, rows, labels)


def _frame_of_columns(arrays: list[Any], index: Any, columns: Any) -> Any:
    """A DataFrame of these column arrays (dtypes as they are), as unpickling builds one
    (pandas' ``create_dataframe_from_blocks``), not through the inference of ``DataFrame(dict)``,
    which on a small frame costs more than the data. The numpy columns of one dtype share one
    block, as pandas keeps them; a read-only one (a view of the memory-mapped file) is copied,
    or ``df.loc[0, c] = v`` would fail."""
    import numpy as np
    import pandas as pd

    try:
        from pandas.api.internals import create_dataframe_from_blocks
    except ImportError:  # pandas < 3
        df = pd.DataFrame(dict(enumerate(arrays)), copy=True)
        df.index, df.columns = index, columns
        return df if list(df.dtypes) == [a.dtype for a in arrays] else None
    blocks: list[tuple[Any, Any]] = []
    by_dtype: dict[Any, list[int]] = {}
    for i, a in enumerate(arrays):
        if isinstance(a, np.ndarray) and a.dtype != object:
            by_dtype.setdefault(a.dtype, []).append(i)
        else:
            blocks.append((a.reshape(1, -1) if isinstance(a, np.ndarray) else a, np.array([i], dtype=np.intp)))
    for positions in by_dtype.values():
        if len(positions) == 1:
            one = arrays[positions[0]]
            block = (one if one.flags.writeable else one.copy()).reshape(1, -1)
        else:
            block = np.vstack([arrays[i] for i in positions])
        blocks.append((block, np.array(positions, dtype=np.intp)))
    return create_dataframe_from_blocks(blocks, index=index, columns=columns)


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
    devices = {k: str(t.device) for k, t in tensors.items() if t.device.type != "cpu"}
    if devices:  # loaded back there when that device exists
        if single:
            entry["device"] = devices["tensor"]
        else:
            entry["devices"] = devices
    return entry


def _device_exists(device: str) -> bool:
    """Whether the torch device ``device`` (``"cuda:1"``, ``"mps"``) exists in this process."""
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        return False
    if d.type == "cpu":
        return True
    backend = getattr(torch, d.type, None)
    try:
        if backend is None or not backend.is_available():
            return False
        count = backend.device_count() if hasattr(backend, "device_count") else 1
    except Exception:  # noqa: BLE001 - a backend that cannot even say
        return False
    return (d.index or 0) < count


def _load_torch(path: Path, entry: dict) -> Any:
    from safetensors.torch import load_file

    loaded = load_file(str(path), device="cpu")
    devices = entry.get("devices") or ({"tensor": entry["device"]} if entry.get("device") else {})
    for key, device in devices.items():
        if key in loaded and _device_exists(str(device)):
            loaded[key] = loaded[key].to(device)
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
        raise _NotSaveable(f"it cannot be pickled ({type(exc).__name__}: {exc})") from exc
    return {"storage": "pickle", "path": _relative(folder, path), "pickled": True}


def _load_pickle(path: Path, entry: dict) -> Any:
    with open(path, "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------- functions

_FUNCTION_FORMAT = "dreamer_magic.function/1"
_FUTURE_FLAGS = functools.reduce(
    operator.or_, (getattr(__future__, f).compiler_flag for f in __future__.all_feature_names), 0
)


def _is_code_function(value: Any) -> bool:
    """A function that pickle could not bring back as it is: a lambda, a nested function, a
    notebook function (``__main__``: gone after a restart, or redefined since)."""
    if type(value) is not types.FunctionType:
        return False
    if value.__name__ == "<lambda>" or "<locals>" in value.__qualname__ or value.__module__ in (None, "__main__"):
        return True
    obj: Any = sys.modules.get(value.__module__)
    for part in value.__qualname__.split("."):
        obj = getattr(obj, part, None)
    return obj is not value


def _same_code(a: types.CodeType, b: types.CodeType) -> bool:
    """Whether two code objects compute the same (line numbers, and ``CO_NESTED``, aside)."""
    nested = 0x10  # inspect.CO_NESTED: set for any function defined in a function, no effect
    if (a.co_code, a.co_names, a.co_varnames, a.co_freevars, a.co_cellvars, a.co_argcount,
            a.co_kwonlyargcount, a.co_posonlyargcount, a.co_flags & ~nested) != (
            b.co_code, b.co_names, b.co_varnames, b.co_freevars, b.co_cellvars, b.co_argcount,
            b.co_kwonlyargcount, b.co_posonlyargcount, b.co_flags & ~nested):
        return False
    if len(a.co_consts) != len(b.co_consts):
        return False
    for x, y in zip(a.co_consts, b.co_consts):
        if isinstance(x, types.CodeType) and isinstance(y, types.CodeType):
            if not _same_code(x, y):
                return False
        elif type(x) is not type(y) or (x != y and not (x != x and y != y)):
            return False
    return True


def _maker_source(source: str, is_lambda: bool, name: str, freevars: tuple[str, ...]) -> str:
    """Module source defining ``__dreamer_make__(<free variables>)``, which returns the function."""
    params = ", ".join(freevars)
    if is_lambda:
        body = f"    return (\n{source}\n    )\n"
    else:
        body = textwrap.indent(source, "    ") + f"\n    return {name}\n"
    return f"def __dreamer_make__({params}):\n{body}"


def _make_function(source: str, is_lambda: bool, name: str, freevars: tuple[str, ...], flags: int,
                   globals_: dict, closure: Mapping[str, Any]) -> types.FunctionType:
    code = compile(_maker_source(source, is_lambda, name, freevars), f"<dreamer_magic: {name}>", "exec",
                   flags=flags & _FUTURE_FLAGS, dont_inherit=True)
    scope: dict[str, Any] = {}
    exec(code, globals_, scope)  # defines __dreamer_make__ only; the function's globals are globals_
    return scope["__dreamer_make__"](**closure)


def _compiles_to(source: str, is_lambda: bool, code: types.CodeType) -> bool:
    """Whether ``source``, re-created as :func:`_load_function` does, compiles to ``code``."""
    try:
        module = compile(_maker_source(source, is_lambda, code.co_name, code.co_freevars), "<check>", "exec",
                         flags=code.co_flags & _FUTURE_FLAGS, dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    maker = next((c for c in module.co_consts if isinstance(c, types.CodeType)), None)
    inner = [c for c in (maker.co_consts if maker else ()) if isinstance(c, types.CodeType) and c.co_name == code.co_name]
    return len(inner) == 1 and _same_code(inner[0], code)


def _function_source(fn: types.FunctionType) -> str | None:
    """The source of ``fn`` (a ``def`` or the ``lambda`` expression), checked to compile to
    the very code ``fn`` runs; ``None`` when it cannot be found or does not match."""
    code = fn.__code__
    text = "".join(linecache.getlines(code.co_filename))
    if not text:
        return None
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    is_lambda = code.co_name == "<lambda>"
    for node in ast.walk(tree):
        if is_lambda:
            if not isinstance(node, ast.Lambda) or node.lineno != code.co_firstlineno:
                continue
            segment = ast.get_source_segment(text, node)
        else:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name != code.co_name:
                continue
            if node.decorator_list or node.lineno != code.co_firstlineno:
                continue
            segment = ast.get_source_segment(text, node, padded=True)
            segment = textwrap.dedent(segment) if segment else segment
        if not segment:
            continue
        if _compiles_to(segment, is_lambda, code):
            return segment
    return None


def _save_function(value: Any, target: Target) -> dict | None:
    """A lambda or notebook function: its source, closure values and defaults (as JSON)."""
    source = _function_source(value)
    if source is None:
        return None
    code = value.__code__
    try:
        closure = {v: _encode(c.cell_contents) for v, c in zip(code.co_freevars, value.__closure__ or ())}
        defaults = _encode(value.__defaults__) if value.__defaults__ is not None else None
        kwdefaults = _encode(value.__kwdefaults__) if value.__kwdefaults__ else None
        attributes = _encode(dict(value.__dict__)) if value.__dict__ else None
    except (_NotJSONable, ValueError, RecursionError):  # ValueError: an empty closure cell
        return None
    data = {
        "format": _FUNCTION_FORMAT,
        "source": source,
        "lambda": code.co_name == "<lambda>",
        "name": code.co_name,
        "qualname": value.__qualname__,
        "module": value.__module__,
        "flags": code.co_flags & _FUTURE_FLAGS,
        "closure": closure,
        "defaults": defaults,
        "kwdefaults": kwdefaults,
        "attributes": attributes,
        "fingerprint_source": _fingerprinted_source(code),
    }
    path = target.new_path(".function.json")
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return {"storage": "function", "path": target.relative(path), "pickled": False}


def _load_function(path: Path, entry: dict, context: LoadContext) -> Any:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("format") != _FUNCTION_FORMAT:
        raise StorageError(f"{path.name} is not a saved function; run the step again")
    globals_: Any = context.namespace
    if isinstance(globals_, ChainMap):  # a trainer's namespace over its inputs: the namespace
        globals_ = globals_.maps[0]
    if not isinstance(globals_, dict):
        module = sys.modules.get(str(data.get("module")))
        globals_ = module.__dict__ if module is not None else {"__builtins__": builtins, "__name__": data.get("module")}
    closure = {k: _decode(v) for k, v in (data.get("closure") or {}).items()}
    fn = _make_function(str(data["source"]), bool(data["lambda"]), str(data["name"]), tuple(closure),
                        int(data.get("flags") or 0), globals_, closure)
    if data.get("defaults") is not None:
        fn.__defaults__ = tuple(_decode(data["defaults"]))
    if data.get("kwdefaults") is not None:
        fn.__kwdefaults__ = _decode(data["kwdefaults"])
    if data.get("attributes") is not None:
        fn.__dict__.update(_decode(data["attributes"]))
    fn.__qualname__ = str(data.get("qualname") or fn.__qualname__)
    fn.__module__ = data.get("module")
    if isinstance(data.get("fingerprint_source"), str):
        _give_source(fn, data["fingerprint_source"])
    return fn


def _fingerprinted_source(code: types.CodeType) -> str | None:
    """The text a function's fingerprint reads (``fingerprint.source_of``), kept so that the
    function re-created on a hit fingerprints exactly as the one the step produced."""
    from .fingerprint import source_of

    return source_of(code)


def _give_source(fn: types.FunctionType, text: str) -> None:
    """Make ``inspect.getsource(fn)`` return ``text`` (the original function's source): its code
    is moved to a file name of its own, registered in ``linecache`` like a notebook cell, and
    its line numbers shifted so that they point into ``text`` (tracebacks show the right line)."""
    from .fingerprint import fingerprint

    digest = fingerprint(text)
    filename = f"<dreamer_magic: {fn.__qualname__} {digest[:12]}>"
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len(text), None, lines, filename)
    delta = 1 - fn.__code__.co_firstlineno

    def move(code: types.CodeType) -> types.CodeType:
        consts = tuple(move(c) if isinstance(c, types.CodeType) else c for c in code.co_consts)
        return code.replace(co_filename=filename, co_firstlineno=max(1, code.co_firstlineno + delta), co_consts=consts)

    fn.__code__ = move(fn.__code__)


# --------------------------------------------------------------------------- models (trainers)


def is_module(value: Any) -> bool:
    """A ``torch.nn.Module`` (without importing torch)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def is_pretrained(value: Any) -> bool:
    """A transformers-style object: ``save_pretrained`` + ``from_pretrained`` (models, tokenizers, processors)."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "save_pretrained", None))
        and callable(getattr(type(value), "from_pretrained", None))
    )


def is_training_args(value: Any) -> bool:
    """A ``transformers.TrainingArguments`` (without importing transformers)."""
    module = sys.modules.get("transformers.training_args")
    return module is not None and isinstance(value, module.TrainingArguments)


def class_path(cls: type) -> str:
    """``module:Qualified.Name`` of a class, as entries record it."""
    return f"{cls.__module__}:{cls.__qualname__}"


# The libraries whose classes save and load models, tokenizers, processors and training
# arguments: the only ones a saved entry may name (trainer.json's ``class``).
MODEL_LIBRARIES = (
    "transformers", "peft", "sentence_transformers", "diffusers", "timm", "setfit", "trl",
)


def import_class(path: str) -> type:
    """The class named by :func:`class_path`, if it is one a model library saves.

    Examples
    --------
    >>> import_class("transformers:GPT2LMHeadModel").__name__  # doctest: +SKIP
    'GPT2LMHeadModel'

    Allowed: a class of :data:`MODEL_LIBRARIES` (importing the library), or a class already
    defined in this process (the notebook's own ``PreTrainedModel`` subclass, say) that
    derives from one; nothing is imported for it. Anything else (``os:system``, a module
    nobody imported) is refused before any import: metadata cannot make this package run code.

    Raises
    ------
    PickleRefusedError
        If the class is not allowed.
    StorageError
        If an allowed class cannot be found (its library is not installed, say).
    """
    module, _, qualname = str(path).partition(":")
    parts = qualname.split(".")
    if not module or not all(p.isidentifier() for p in parts) or not all(m.isidentifier() for m in module.split(".")):
        raise PickleRefusedError(_class_refusal(path))
    library = module.split(".")[0] in MODEL_LIBRARIES
    try:
        obj: Any = importlib.import_module(module) if library else sys.modules[module]
        for part in parts:
            obj = getattr(obj, part)
    except KeyError:
        raise PickleRefusedError(
            _class_refusal(path) + f" (if it is your own class, import {module!r} in the notebook first: "
            "a class derived from a model library's then loads)"
        ) from None
    except (ImportError, AttributeError) as e:
        raise StorageError(f"cannot find the class {path!r}: {type(e).__name__}: {e}") from e
    if not isinstance(obj, type):
        raise PickleRefusedError(_class_refusal(path))
    if not library and not any(
        (base.__module__ or "").split(".")[0] in MODEL_LIBRARIES for base in obj.__mro__[1:] if base is not object
    ):
        raise PickleRefusedError(_class_refusal(path))
    return obj


def _class_refusal(path: str) -> str:
    shown = str(path) if len(str(path)) <= 80 else str(path)[:77] + "..."
    return (
        f"the saved metadata names the class {shown!r}, which is not a class of a library that saves models "
        f"({', '.join(MODEL_LIBRARIES)}) nor one derived from such a class; it is not imported. The folder was "
        "edited or not written by dreamer_magic: run the cell with --force to compute it again"
    )


def _save_pretrained(value: Any, target: Target) -> dict:
    folder, rel = target.folder, target.path or f"{OUTPUTS}/{target.name}"
    path = folder.joinpath(*PurePosixPath(rel).parts)
    path.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in path.iterdir()}
    value.save_pretrained(str(path))
    written = [p for p in path.iterdir() if p.name not in before]
    entry: dict[str, Any] = {
        "storage": "pretrained",
        "path": rel,
        "class": class_path(type(value)),
        "pickled": False,
        "size": sum(folder_size(p) for p in written),
    }
    if is_module(value):
        entry["module"] = True
        entry["training"] = bool(getattr(value, "training", False))  # a hit leaves the mode as the run did
        with contextlib.suppress(StopIteration, AttributeError):
            entry["device"] = str(next(value.parameters()).device)
    return entry


def _load_pretrained(path: Path, entry: dict, context: LoadContext) -> Any:
    cls = import_class(str(entry.get("class")))  # refused unless a model library's class
    try:
        value = cls.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot load, train again"
        raise StorageError(
            f"cannot load `{context.name}` ({entry.get('type')}) from {path}: {type(e).__name__}: {e}"
        ) from e
    if is_module(value) and "training" in entry:
        value.train(bool(entry["training"]))
    device = entry.get("device")
    if device and device != "cpu" and is_module(value):
        with contextlib.suppress(Exception):
            if _device_exists(str(device)):
                value = value.to(device)
    return value


def _save_state_dict(value: Any, target: Target) -> dict:
    from safetensors.torch import save_model

    path = target.new_path(".safetensors")
    save_model(value, str(path))
    return {"storage": "state_dict", "path": target.relative(path), "pickled": False}


def _load_state_dict(path: Path, entry: dict, context: LoadContext) -> Any:
    """A plain PyTorch module trained in place: load the weights into the one in the namespace."""
    from safetensors.torch import load_model

    name = context.name
    target = (context.namespace or {}).get(name)
    if not is_module(target):
        raise StorageError(
            f"`{name}` was saved as weights only (a plain PyTorch module); define `{name}` (the untrained "
            "module) before running the cell so its weights can be loaded into it"
        )
    try:
        load_model(target, str(path))
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot load the weights of `{name}`: {type(e).__name__}: {e}") from e
    return target


def _save_training_args(value: Any, target: Target) -> dict:
    from .fingerprint import json_safe

    path = target.new_path(".training_args.json")
    write_json_atomic(path, {"class": class_path(type(value)), "values": json_safe(value.to_dict())})
    return {"storage": "training_args", "path": target.relative(path), "pickled": False}


def _load_training_args(path: Path, entry: dict, context: LoadContext) -> Any:
    data = read_json(path)
    cls = import_class(str((data or {}).get("class")))  # refused unless a model library's class
    try:
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data["values"].items() if k in init})  # type: ignore[index]
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot rebuild `{context.name}` ({entry.get('type')}): {type(e).__name__}: {e}") from e


# --------------------------------------------------------------------------- the table


def _plain(load: Callable[[Path, dict], Any]) -> Callable[[Path, dict, LoadContext], Any]:
    return lambda path, entry, context: load(path, entry)


STORERS: list[Storer] = [
    Storer(
        "dataset", "dataset", lambda v: _kind(v) == "dataset",
        lambda v, t: _save_dataset(v, t.folder, t.main or _new_path(t.folder, t.name, "")), _plain(_load_dataset),
    ),
    Storer(
        "dataframe", "arrow", lambda v: _kind(v) in ("dataframe", "series"),
        lambda v, t: _save_pandas(v, t.folder, t.name, t.main), _plain(_load_arrow),
    ),
    Storer("npy", "npy", lambda v: _kind(v) == "ndarray", lambda v, t: _save_numpy(v, t.folder, t.name), _plain(_load_numpy)),
    Storer(
        "safetensors", "safetensors", lambda v: _kind(v) in ("tensor", "tensor_dict"),
        lambda v, t: _save_torch(v, t.folder, t.name), _plain(_load_torch),
    ),
    Storer("function", "function", _is_code_function, _save_function, _load_function, runs_code=True),
    Storer("json", "json", lambda v: True, lambda v, t: _save_json(v, t.folder, t.name), _plain(_load_json)),
    Storer("pickle", "pickle", lambda v: True, lambda v, t: _save_pickle(v, t.folder, t.name), _plain(_load_pickle), runs_code=True),
    Storer("pretrained", "pretrained", is_pretrained, _save_pretrained, _load_pretrained, automatic=False),
    Storer("state_dict", "state_dict", is_module, _save_state_dict, _load_state_dict, automatic=False),
    Storer("training_args", "training_args", is_training_args, _save_training_args, _load_training_args, automatic=False),
]

# The storer that loads each ``storage`` word: a main-dataset DataFrame is written by the
# ``dataframe`` storer as ``dataset``, and the dataset loader rebuilds it from the entry.
_LOADING: list[Storer] = [s for s in STORERS if s.kind != "dataframe"] + [s for s in STORERS if s.kind == "dataframe"]
