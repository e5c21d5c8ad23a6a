"""Deterministic, versioned fingerprints of values, code and functions.

Pure: no IPython, no disk. A fingerprint is a 32-character hex digest (xxh3-128) over a
type-tagged, length-prefixed encoding of the value, so that values of different types never
collide by accident (an int64 array and its float64 view differ, ``1`` and ``"1"`` differ).
What a program can observe counts: a dict's insertion order (``list(labels)`` depends on it),
a ``defaultdict``'s factory, a tensor's device and ``requires_grad``, an RNG's state (drawing
from a ``Generator`` changes its fingerprint). Sets stay order-free: Python does not promise
their order. Fingerprints do not depend on the process (no ``hash()``, no ``id()``, sets
sorted by their items' digests), nor on the Python version for code (see
:func:`canonical_ast`), so two kernels agree. :data:`FORMAT_VERSION` is folded into every
digest; golden-digest tests pin them so that an upgrade never silently invalidates users'
folders.

Examples
--------
>>> fingerprint([1, 2.0, "three"])  # doctest: +SKIP
'4c7b0e…'
>>> fingerprint({"b": 1, "a": 2}) == fingerprint({"a": 2, "b": 1})
False
>>> fingerprint({3, 1, 2}) == fingerprint({1, 2, 3})
True
"""

from __future__ import annotations

import ast
import copyreg
import dataclasses
import enum
import inspect
import struct
import sys
import types
from typing import Any, Callable

import xxhash

from .errors import FingerprintError

# 2: dict insertion order, defaultdict factories and tensor device/requires_grad count; ints
# are hashed as bytes; code is hashed as canonical_ast (the same on Python 3.10 to 3.13).
FORMAT_VERSION = 2

_pack_q = struct.Struct("<q").pack
_pack_d = struct.Struct("<d").pack


def fingerprint(value: Any) -> str:
    """Return the hex fingerprint of ``value``.

    Examples
    --------
    >>> fingerprint(3) != fingerprint(3.0)
    True

    Raises
    ------
    FingerprintError
        If the value (or something inside it) cannot be fingerprinted; the message names
        the type and the reason.
    """
    h = Hasher()
    h.value(value)
    return h.hexdigest()


def combine(*parts: str | bytes) -> str:
    """Fingerprint of an ordered sequence of fingerprints or strings.

    Examples
    --------
    >>> combine("a", "b") != combine("b", "a")
    True
    """
    h = Hasher()
    h.tag("combine")
    for part in parts:
        h.bytes_(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()


def package_version(module_name: str) -> str | None:
    """The installed version of a top-level package, or ``None`` when unknown.

    Examples
    --------
    >>> package_version("xxhash") is not None
    True
    """
    top = module_name.split(".")[0]
    module = sys.modules.get(top)
    version = getattr(module, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            return dist_version(top)
        except PackageNotFoundError:
            return dist_version(top.replace("_", "-"))
    except Exception:
        return None


def normalise_source(source: str) -> str:
    """Source with comments, blank lines and formatting removed: its canonical AST text.

    The text is :func:`canonical_ast` of the parsed code, the same under Python 3.10 to 3.13,
    so that upgrading Python does not re-run every step. Falls back to the stripped non-blank,
    non-comment lines when the code does not parse (IPython syntax such as ``!ls`` or ``%time``).

    Examples
    --------
    >>> normalise_source("x = 1  # one\\n\\n") == normalise_source("x=1")
    True
    >>> normalise_source("x = 1")
    'Module(body=[Assign(targets=[Name(ctx=Store(),id="x")],value=Constant(value=1))])'
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):  # a NUL byte; nesting too deep for the parser
        return "\n".join(code_lines(source))
    return canonical_ast(tree)


def canonical_ast(node: ast.AST) -> str:
    """A version-stable text of an AST: what the code means, not how one Python prints it.

    Examples
    --------
    >>> canonical_ast(ast.parse("f(x, k=1)", mode="eval"))
    'Expression(body=Call(args=[Name(ctx=Load(),id="x")],func=Name(ctx=Load(),id="f"),keywords=[keyword(arg="k",value=Constant(value=1))]))'

    The form, fixed so that digests stay the same from Python 3.10 to 3.13 (``ast.dump``
    changes between them: 3.12 adds ``type_params=[]``, 3.13 leaves out empty fields, ...):

    - a node is ``Type(field=value,...)``: its class name, then its fields sorted by name;
      a field that is ``None`` or an empty list is left out, so fields that a newer Python
      adds empty do not count; positions (line, column) and comments are not in the AST;
    - a list is ``[item,...]``; an item that is ``None`` (the key of ``**d`` in a dict
      display) is written ``None``;
    - a ``str`` is JSON with every non-ASCII character escaped (so it does not depend on the
      Unicode tables of one Python); ``bytes``, ``float``, ``complex``, ``bool`` and ``...``
      are their ``repr``; an ``int`` is decimal, or ``0x...`` beyond 13,000 bits (no
      ``str()`` limit);
    - ``Constant.kind`` (the meaningless ``u`` prefix) is left out, and the parts of an
      f-string are normalised: adjacent literal parts are joined and empty ones dropped
      (Python 3.12 splits them differently from 3.10).

    Iterative, so deeply nested code (a long ``a + b + ...`` chain) does not hit the
    recursion limit.
    """
    out: list[str] = []
    todo: list[Any] = [node]  # a str is finished text; a node or a list is still to write
    while todo:
        item = todo.pop()
        if type(item) is str:
            out.append(item)
            continue
        if isinstance(item, list):
            parts = ["["]
            for i, value in enumerate(item):
                if i:
                    parts.append(",")
                parts.append(value if isinstance(value, (ast.AST, list)) else _constant_text(value))
            parts.append("]")
        else:
            cls = type(item)
            names = _AST_FIELDS.get(cls) or _ast_fields(cls)
            parts = [cls.__name__ + "("]
            for name in names:
                value = getattr(item, name, None)
                if value is None or (type(value) is list and not value):
                    continue
                if cls is ast.JoinedStr and name == "values":
                    value = _fstring_parts(value)
                parts.append(("," if len(parts) > 1 else "") + name + "=")
                parts.append(value if isinstance(value, (ast.AST, list)) else _constant_text(value))
            parts.append(")")
        todo.extend(reversed(parts))
    return "".join(out)


_AST_FIELDS: dict[type, tuple[str, ...]] = {}


def _ast_fields(cls: type) -> tuple[str, ...]:
    """A node class's fields in :func:`canonical_ast` order (sorted; ``Constant.kind`` left out)."""
    names = tuple(sorted(name for name in cls._fields if not (cls is ast.Constant and name == "kind")))
    _AST_FIELDS[cls] = names
    return names


def _fstring_parts(values: list) -> list:
    """An f-string's parts with adjacent literal parts joined and empty ones dropped."""
    parts: list = []
    for value in values:
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            if not value.value:
                continue
            if parts and isinstance(parts[-1], ast.Constant) and isinstance(parts[-1].value, str):
                parts[-1] = ast.Constant(value=parts[-1].value + value.value)
                continue
            value = ast.Constant(value=value.value)
        parts.append(value)
    return parts


def _constant_text(value: Any) -> str:
    """A constant (or identifier) in :func:`canonical_ast`'s form."""
    if isinstance(value, str):
        if value.isascii() and value.isidentifier():  # most of them: names need no escapes
            return '"' + value + '"'
        import json

        return json.dumps(str(value), ensure_ascii=True)
    if isinstance(value, bool) or value is None or value is Ellipsis:
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 13_000 else hex(value)
    if isinstance(value, (bytes, float, complex)):
        return repr(value)
    if isinstance(value, (tuple, frozenset)):  # only in optimised trees
        items = value if isinstance(value, tuple) else sorted(value, key=_constant_text)
        return type(value).__name__ + "(" + ",".join(_constant_text(v) for v in items) + ")"
    raise TypeError(f"unexpected constant in an AST: {type(value).__name__}")


def code_lines(source: str) -> list[str]:
    """The lines that count for the fingerprint: no blank lines, no comment-only lines."""
    return [line.rstrip() for line in source.splitlines() if line.strip() and not line.strip().startswith("#")]


def _is_user_code(obj: Any) -> bool:
    """True for functions/classes defined in the notebook (``__main__``) or another unversioned file."""
    module = getattr(obj, "__module__", None)
    if module in (None, "__main__", "__mp_main__") or module.startswith("__ipython"):
        return True
    return package_version(module) is None and module.split(".")[0] not in sys.stdlib_module_names


class Hasher:
    """Streaming, type-tagged hasher behind :func:`fingerprint`.

    Examples
    --------
    >>> h = Hasher(); h.value({"a": 1}); len(h.hexdigest())
    32
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._stack: list[int] = []  # ids of containers being hashed, for cycles
        self._functions: list[Any] = []  # functions being hashed, for recursion
        self.tag(f"dreamer-fingerprint-v{FORMAT_VERSION}")

    # -- primitives ---------------------------------------------------------------
    def tag(self, name: str) -> None:
        data = name.encode()
        self._h.update(b"\x01" + _pack_q(len(data)) + data)

    def bytes_(self, data: bytes | memoryview) -> None:
        self._h.update(b"\x02" + _pack_q(len(data)))
        self._h.update(data)

    def int_(self, n: int) -> None:
        """An int as little-endian two's complement: 8 bytes when it fits, more otherwise
        (no ``str()``, so no 4,300-digit limit)."""
        if -0x8000000000000000 <= n <= 0x7FFFFFFFFFFFFFFF:
            self.bytes_(_pack_q(n))
        else:  # at least 9 bytes: never one of the 8-byte forms
            self.bytes_(n.to_bytes(n.bit_length() // 8 + 1, "little", signed=True))

    def str_(self, s: str) -> None:
        self.bytes_(s.encode("utf-8", "surrogatepass"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()

    # -- dispatch -----------------------------------------------------------------
    def value(self, value: Any) -> None:
        """Feed one value of any supported type."""
        handler = _EXACT.get(type(value))
        if handler is not None:
            handler(self, value)
            return
        for check, handler in _HANDLERS:
            if check(value):
                handler(self, value)
                return
        self._generic(value)

    def _container(self, value: Any, body: Callable[[], None]) -> None:
        key = id(value)
        if key in self._stack:
            self.tag("cycle")
            self.int_(len(self._stack) - self._stack.index(key))
            return
        self._stack.append(key)
        try:
            body()
        finally:
            self._stack.pop()

    def _sequence(self, value: list | tuple) -> None:
        def body() -> None:
            self.tag(type(value).__name__ if type(value) in (list, tuple) else _qualname(type(value)))
            self.int_(len(value))
            for item in value:
                self.value(item)

        self._container(value, body)

    def _set(self, value: set | frozenset) -> None:
        def body() -> None:
            self.tag(type(value).__name__)
            digests = sorted(fingerprint_in(self, item) for item in value)
            self.int_(len(digests))
            for d in digests:
                self.bytes_(d.encode())

        self._container(value, body)

    def _dict(self, value: dict) -> None:
        """Dicts in insertion order (iterating one depends on it); a ``defaultdict`` with its
        ``default_factory``; ``OrderedDict``, ``Counter`` and other subclasses by class."""
        from collections import defaultdict

        def body() -> None:
            self.tag("dict" if type(value) is dict else _qualname(type(value)))
            if isinstance(value, defaultdict):
                self.tag("default_factory")
                self.value(value.default_factory)
            items = _dict_items(value)
            self.int_(len(items))
            for k, v in items:
                self.value(k)
                self.value(v)

        self._container(value, body)

    # -- third-party types --------------------------------------------------------
    def ndarray(self, arr: Any) -> None:
        self.tag("numpy.ndarray")
        self.str_(arr.dtype.str if arr.dtype.fields is None else repr(arr.dtype.descr))
        self.str_(repr(tuple(arr.shape)))
        if arr.dtype.hasobject:
            self._object_values(arr.ravel(order="C"))
        else:
            self.bytes_(_buffer(arr))

    def _object_values(self, flat: Any) -> None:
        """Object arrays: a fast path for all-``str`` data, element-wise otherwise."""
        import numpy as np

        items = flat.tolist()
        try:
            joined = "\x00".join(items)
        except TypeError:
            self.tag("objects")
            self.int_(len(items))
            for item in items:
                self.value(item)
            return
        self.tag("strings")
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=len(items))
        self.bytes_(memoryview(lengths).cast("B"))
        self.bytes_(joined.encode("utf-8", "surrogatepass"))

    def numpy_scalar(self, value: Any) -> None:
        import numpy as np

        self.tag("numpy.scalar")
        self.ndarray(np.asarray(value))

    def pandas_values(self, values: Any) -> None:
        """The values of a pandas Series/Index column, by dtype."""
        import numpy as np
        import pandas as pd

        dtype = values.dtype
        self.str_(str(dtype))
        array = values.array if hasattr(values, "array") else values
        if isinstance(dtype, np.dtype):
            arr = np.asarray(array)
            if arr.dtype.hasobject:
                self._object_values(arr)
            else:
                self.bytes_(_buffer(arr))
        elif isinstance(dtype, pd.CategoricalDtype):
            self.tag("categorical")
            self.value(dtype.ordered)
            self.pandas_index(dtype.categories)
            self.ndarray(np.asarray(array.codes))
        elif hasattr(array, "_data") and hasattr(array, "_mask"):  # nullable Int64, boolean, Float64
            self.ndarray(np.asarray(array._mask))
            self.ndarray(np.where(array._mask, 0, array._data) if array._data.dtype.kind in "iufb" else array._data)
        elif hasattr(array, "_pa_array"):  # pyarrow-backed: pandas 3's default str dtype
            self.arrow(array._pa_array)
        elif hasattr(array, "asi8"):  # tz-aware datetimes, periods
            self.ndarray(np.asarray(array.asi8))
        else:  # strings and other extension arrays
            self._object_values(np.asarray(array.astype(object), dtype=object))

    def arrow(self, chunked: Any) -> None:
        """A pyarrow (chunked) array, hashed from its buffers; independent of the chunking."""
        import numpy as np
        import pyarrow as pa

        chunks = chunked.chunks if isinstance(chunked, pa.ChunkedArray) else [chunked]
        kind = chunked.type
        self.tag("arrow")
        self.str_(str(kind))
        binary = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        if not binary:
            for chunk in chunks:
                self.ndarray(np.asarray(chunk.is_null()))
                self.ndarray(np.asarray(chunk.to_numpy(zero_copy_only=False)))
            return
        wide = pa.types.is_large_string(kind) or pa.types.is_large_binary(kind)
        lengths, data, nulls = xxhash.xxh3_128(), xxhash.xxh3_128(), xxhash.xxh3_128()
        count = null_count = 0
        for chunk in chunks:
            bufs = chunk.buffers()
            offsets = np.frombuffer(bufs[1], dtype=np.int64 if wide else np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
            if len(offsets):
                lengths.update(np.diff(offsets).astype(np.int64, copy=False))
                if bufs[2] is not None:
                    data.update(memoryview(bufs[2])[int(offsets[0]) : int(offsets[-1])])
            if chunk.null_count:
                nulls.update(np.asarray(chunk.is_null()))
            null_count += chunk.null_count
            count += len(chunk)
        self.int_(count)
        self.int_(null_count)
        for part in (lengths, data, nulls):
            self.bytes_(part.digest())

    def pandas_index(self, index: Any) -> None:
        import pandas as pd

        if isinstance(index, pd.RangeIndex):
            self.tag("pandas.RangeIndex")
            self.value((index.start, index.stop, index.step, index.name))
            return
        if isinstance(index, pd.MultiIndex):
            self.tag("pandas.MultiIndex")
            self.value(list(index.names))
            for level in range(index.nlevels):
                self.pandas_values(index.get_level_values(level))
            return
        self.tag(_qualname(type(index)))
        self.value(index.name)
        self.pandas_values(index)

    def dataframe(self, df: Any) -> None:
        self.tag("pandas.DataFrame")
        self.int_(df.shape[1])
        self.pandas_index(df.columns)
        self.pandas_index(df.index)
        for i in range(df.shape[1]):
            self.pandas_values(df.iloc[:, i])
        if df.attrs:
            self.value(dict(df.attrs))

    def series(self, s: Any) -> None:
        self.tag("pandas.Series")
        self.value(s.name)
        self.pandas_index(s.index)
        self.pandas_values(s)

    def dataset(self, ds: Any) -> None:
        """datasets: the library's own fingerprint (it follows the lineage of transforms)."""
        lineage = LINEAGE.get(ds)
        if lineage is not None:
            self.tag("lineage")
            self.str_(lineage)
            return
        self.tag("datasets.Dataset")
        self.str_(ds._fingerprint)

    def tensor(self, t: Any) -> None:
        """A tensor by class, device, ``requires_grad`` and :meth:`tensor_content`."""
        import torch

        self.tag("torch.Tensor")
        if type(t) is not torch.Tensor:  # nn.Parameter, tensor subclasses
            self.str_(_qualname(type(t)))
        self.str_(str(t.device))
        self.value(bool(t.requires_grad))
        self.tensor_content(t)

    def tensor_content(self, t: Any) -> None:
        """What a tensor holds, wherever it lives: dtype, shape, layout and values. Sparse
        tensors (COO, CSR, CSC, BSR, BSC) by their layout and index and value tensors, a COO
        tensor coalesced (with whether it was)."""
        import torch

        self.str_(str(t.dtype))
        self.str_(repr(tuple(t.shape)))
        layout = t.layout
        if layout == torch.strided:
            flat = t.detach().resolve_conj().resolve_neg().to("cpu").contiguous().reshape(-1)
            self.bytes_(memoryview(flat.view(torch.uint8).numpy()).cast("B"))
            return
        self.str_(str(layout))
        t = t.detach()
        if layout == torch.sparse_coo:
            self.value(t.is_coalesced())
            t = t.coalesce()
            parts = (t.indices(), t.values())
        elif layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = (t.crow_indices(), t.col_indices(), t.values())
        elif layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = (t.ccol_indices(), t.row_indices(), t.values())
        else:
            raise FingerprintError(f"a tensor with layout {layout} cannot be fingerprinted")
        for part in parts:
            self.tensor_content(part)

    def module_object(self, module: types.ModuleType) -> None:
        self.tag("module")
        self.str_(module.__name__)
        self.value(package_version(module.__name__))

    # -- code -------------------------------------------------------------------
    def function(self, fn: Any) -> None:
        """Functions: notebook functions by code + the globals they use; library ones by name + version."""
        if isinstance(fn, functools_partial()):
            self.tag("partial")
            self.value(fn.func)
            self.value(fn.args)
            self.value(dict(fn.keywords))
            return
        if isinstance(fn, (types.MethodType,)):
            self.tag("method")
            self.value(fn.__func__)
            self.value(fn.__self__)
            return
        bound_to = getattr(fn, "__self__", None)
        if isinstance(fn, types.BuiltinMethodType) and bound_to is not None and not isinstance(bound_to, types.ModuleType):
            self.tag("builtin-method")  # e.g. a compiled regex's .sub, a dict's .get
            self.str_(fn.__name__)
            self.value(bound_to)
            return
        if not isinstance(fn, types.FunctionType) or not _is_user_code(fn):
            self.tag("library-callable")
            self.str_(getattr(fn, "__module__", None) or "")
            self.str_(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", repr(type(fn))))
            self.value(package_version(getattr(fn, "__module__", None) or ""))
            return
        if fn in self._functions:  # recursion: a function using itself
            self.tag("recursive-function")
            self.int_(self._functions.index(fn))
            return
        self._functions.append(fn)
        try:
            self.tag("function")
            self.str_(fn.__qualname__)
            self.code(fn.__code__)
            self.value(fn.__defaults__)
            self.value(fn.__kwdefaults__)
            if fn.__closure__:
                cells = []
                for cell in fn.__closure__:
                    try:
                        cells.append(cell.cell_contents)
                    except ValueError:  # empty cell
                        cells.append(None)
                self.value(tuple(cells))
            self.str_("globals")
            for name in sorted(code_global_names(fn.__code__)):
                if name in fn.__globals__:
                    value = fn.__globals__[name]
                    self.str_(name)
                    try:
                        self.value(value)
                    except FingerprintError as e:
                        raise FingerprintError(
                            f"function {fn.__qualname__}() uses the global {name!r}, which "
                            f"cannot be fingerprinted: {e}"
                        ) from None
        finally:
            self._functions.pop()

    def code(self, code: types.CodeType) -> None:
        self.tag("code")
        source = source_of(code)
        if source is not None:
            self.str_(normalise_source(source))
            return
        self.bytes_(code.co_code)
        self.value(code.co_names)
        self.value(code.co_varnames)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                self.code(const)
            else:
                self.value(const)

    def klass(self, cls: type) -> None:
        if not _is_user_code(cls):
            self.tag("library-class")
            self.str_(cls.__module__)
            self.str_(cls.__qualname__)
            self.value(package_version(cls.__module__))
            return
        self.tag("class")
        self.str_(cls.__qualname__)
        try:
            self.str_(normalise_source(inspect.getsource(cls)))
        except (OSError, TypeError):  # no source (older Pythons, for notebook classes)
            self.value(cls.__bases__)
            for name, attr in sorted(vars(cls).items()):
                if name.startswith("__") and name.endswith("__"):
                    continue
                self.str_(name)
                if isinstance(attr, (staticmethod, classmethod)):
                    attr = attr.__func__
                elif isinstance(attr, property):
                    attr = (attr.fget, attr.fset)
                self.value(attr)

    # -- anything else ------------------------------------------------------------
    def _generic(self, value: Any) -> None:
        custom = getattr(type(value), "__dreamer_fingerprint__", None)
        if custom is not None:
            self.tag("custom")
            self.str_(_qualname(type(value)))
            self.value(custom(value))
            return
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            self.tag("dataclass")
            self.klass(type(value))
            self.value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
            return
        try:
            reducer = copyreg.dispatch_table.get(type(value))  # e.g. re.Pattern registers one
            reduced = reducer(value) if reducer is not None else value.__reduce_ex__(4)
        except Exception as e:
            raise FingerprintError(
                f"a {_qualname(type(value))} cannot be fingerprinted: {e}"
            ) from None
        if isinstance(reduced, str) or not isinstance(reduced, tuple):
            raise FingerprintError(f"a {_qualname(type(value))} cannot be fingerprinted")
        self._container(value, lambda: self._reduced(value, reduced))

    def _reduced(self, value: Any, reduced: tuple) -> None:
        self.tag("object")
        self.str_(_qualname(type(value)))
        if not _is_user_code(type(value)):
            self.value(package_version(type(value).__module__))
        else:
            self.klass(type(value))
        callable_, args, *rest = reduced + (None,) * (5 - len(reduced))
        state, listitems, dictitems = rest[:3]
        if callable_ is not None and getattr(callable_, "__name__", "") != "__newobj__":
            self.value(callable_)
        self.value(args[1:] if getattr(callable_, "__name__", "") == "__newobj__" else args)
        self.value(state)
        if listitems is not None:
            self.value(list(listitems))
        if dictitems is not None:
            self.value(dict(dictitems))


# -- models, tokenizers, optimizers: by what they compute, not how they were loaded ---------------

# Config entries that say where a model came from or how it is run, not what it computes.
VOLATILE_CONFIG = {"transformers_version", "architectures", "dtype", "torch_dtype", "use_cache"}
_OPTIMIZER_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "base_lrs"}


def json_safe(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, sort_keys=True, default=str))


def config_data(config: Any) -> Any:
    """A model config as JSON, less bookkeeping (private keys, versions, the path it came from)."""
    if config is None:
        return None
    data = config.to_dict() if callable(getattr(config, "to_dict", None)) else dict(config)
    return json_safe({k: v for k, v in data.items() if not k.startswith("_") and k not in VOLATILE_CONFIG})


def class_id(cls: type) -> str:
    """A class by its import path, or by its source when it is defined in the notebook."""
    return fingerprint(cls) if _is_user_code(cls) else f"{cls.__module__}.{cls.__qualname__}"


def sentence_transformer_modules(model: Any) -> list:
    if type(model).__name__ == "SentenceTransformer" and hasattr(model, "_modules"):
        return list(model._modules.values())
    return []


def _tensor_state(model: Any) -> tuple:
    """A cheap check that changes when a parameter or buffer is replaced or modified.

    Version counters catch in-place ops on the tensors, but not updates through ``.data``
    (which some optimizers and trainers use), so a strided sample of every tensor's values
    is compared too: a training step moves (nearly) every weight.
    """
    import torch

    tensors = [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        samples = [t.detach().reshape(-1)[:: max(1, t.numel() // 16)].float() for t in tensors if t.numel()]
        sample = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return tuple((t.data_ptr(), t._version) for t in tensors), xxhash.xxh3_64_hexdigest(sample)


class _Memo:
    """Digests of big objects, reused while a cheap state check says they did not change."""

    def __init__(self) -> None:
        import weakref

        self.known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, obj: Any, state: Any) -> str | None:
        try:
            known = self.known.get(obj)
        except TypeError:
            return None
        return known[1] if known is not None and known[0] == state else None

    def put(self, obj: Any, state: Any, digest: str) -> str:
        try:
            self.known[obj] = (state, digest)
        except TypeError:
            pass
        return digest

    def clear(self) -> None:
        self.known.clear()


MODEL_MEMO = _Memo()
TOKENIZER_MEMO = _Memo()


def model_fingerprint(model: Any) -> str:
    """A torch model by class, config, generation config and every tensor; train/eval mode does not count.

    Examples
    --------
    >>> model_fingerprint(model)  # doctest: +SKIP
    '0f3a…'

    Computed once per model object and reused until its config or a parameter or buffer
    changes (checked cheaply: version counters plus a sample of every tensor), so the
    weights are hashed again only after a change. A trained model and the same model
    loaded back with ``from_pretrained`` fingerprint alike.
    """
    data: dict[str, Any] = {"class": class_id(type(model)), "config": config_data(getattr(model, "config", None))}
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        data["generation_config"] = config_data(generation)
    state = (_tensor_state(model), repr(data))
    known = MODEL_MEMO.get(model, state)
    if known is not None:
        return known
    modules = []
    for sub in sentence_transformer_modules(model):
        entry: dict[str, Any] = {"class": type(sub).__qualname__}
        if hasattr(sub, "get_config_dict"):
            entry["config"] = json_safe(sub.get_config_dict())
        if hasattr(sub, "auto_model"):
            entry["model_config"] = config_data(getattr(sub.auto_model, "config", None))
        if hasattr(sub, "tokenizer"):
            entry["tokenizer"] = tokenizer_fingerprint(sub.tokenizer)
        modules.append(entry)
    if modules:
        data["modules"] = modules
        data["max_seq_length"] = getattr(model, "max_seq_length", None)
    data["weights"] = dict(model.state_dict())
    return MODEL_MEMO.put(model, state, fingerprint(data))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A tokenizer by class, definition (backend JSON or vocabulary), special tokens and sides.

    Examples
    --------
    >>> tokenizer_fingerprint(tokenizer)  # doctest: +SKIP
    '9b1c…'

    Padding and truncation settings that tokenizing a batch switches on do not count, nor do
    the keyword arguments it was loaded with (where from, local or not).
    """
    import json

    if tokenizer is None:
        return fingerprint(None)
    try:
        size = len(tokenizer)
    except TypeError:
        size = None
    special = getattr(tokenizer, "special_tokens_map", {}) or {}
    state = (
        size,
        repr(special),
        getattr(tokenizer, "chat_template", None),
        getattr(tokenizer, "padding_side", None),
        getattr(tokenizer, "truncation_side", None),
        repr(getattr(tokenizer, "model_max_length", None)),
    )
    known = TOKENIZER_MEMO.get(tokenizer, state)
    if known is not None:
        return known
    data: dict[str, Any] = {
        "class": class_id(type(tokenizer)),
        "special": {k: str(v) for k, v in special.items()},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "sides": [getattr(tokenizer, "padding_side", None), getattr(tokenizer, "truncation_side", None)],
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        backend_json = json.loads(backend.to_str())
        backend_json.pop("padding", None)
        backend_json.pop("truncation", None)
        data["backend"] = backend_json
    elif hasattr(tokenizer, "get_vocab"):
        data["vocab"] = sorted(tokenizer.get_vocab().items())
    data["model_max_length"] = json_safe(getattr(tokenizer, "model_max_length", None))
    return TOKENIZER_MEMO.put(tokenizer, state, fingerprint(data))


def _torch_module(h: Hasher, value: Any) -> None:
    h.tag("model")
    h.str_(model_fingerprint(value))


def _tokenizer(h: Hasher, value: Any) -> None:
    h.tag("tokenizer")
    h.str_(tokenizer_fingerprint(value))


def _optimizer(h: Hasher, value: Any) -> None:
    """Optimizers count by class and settings, not by running state (which training changes)."""
    h.tag("optimizer")
    h.str_(class_id(type(value)))
    h.value(json_safe(value.defaults))


def _scheduler(h: Hasher, value: Any) -> None:
    h.tag("lr-scheduler")
    h.str_(class_id(type(value)))
    h.value(json_safe({k: v for k, v in value.state_dict().items() if k not in _OPTIMIZER_PROGRESS}))


# TrainingArguments that say where a Trainer writes, not how it trains.
_TRAINER_BOOKKEEPING = {"output_dir", "logging_dir", "run_name", "hub_token", "push_to_hub_token"}


def _trainer(h: Hasher, trainer: Any) -> None:
    """A ``transformers.Trainer`` by what decides its training: its class, model, arguments (less
    where it writes), datasets, collator, tokenizer/processor, metric and loss functions, and its
    callbacks by class; never its live state (accelerator, weak references, the progress). An
    optimizer passed in counts by class and settings until training starts (the one the Trainer
    makes then follows from the arguments)."""
    args = getattr(trainer, "args", None)
    settings = args.to_dict() if callable(getattr(args, "to_dict", None)) else None
    if isinstance(settings, dict):
        settings = json_safe({k: v for k, v in settings.items() if k not in _TRAINER_BOOKKEEPING})
    state = getattr(trainer, "state", None)
    fresh = getattr(state, "global_step", 0) == 0 and not getattr(trainer, "is_in_train", False)
    callbacks = getattr(getattr(trainer, "callback_handler", None), "callbacks", None) or []
    h.tag("transformers.Trainer")
    h.str_(class_id(type(trainer)))
    h.value({
        "model": getattr(trainer, "model", None),
        "args": settings,
        "train_dataset": getattr(trainer, "train_dataset", None),
        "eval_dataset": getattr(trainer, "eval_dataset", None),
        "data_collator": getattr(trainer, "data_collator", None),
        "processing_class": getattr(trainer, "processing_class", getattr(trainer, "tokenizer", None)),
        "functions": [getattr(trainer, a, None) for a in ("compute_metrics", "preprocess_logits_for_metrics", "compute_loss_func", "model_init")],
        "callbacks": [class_id(type(c)) for c in callbacks if type(c).__name__ != "DreamerStatusCallback"],
        "optimizer": getattr(trainer, "optimizer", None) if fresh else None,
        "optimizer_cls_and_kwargs": getattr(trainer, "optimizer_cls_and_kwargs", None),
    })


def fingerprint_in(parent: Hasher, value: Any) -> str:
    """Fingerprint a value while sharing the parent's cycle/recursion guards."""
    child = Hasher.__new__(Hasher)
    child._h = xxhash.xxh3_128()
    child._stack = parent._stack
    child._functions = parent._functions
    child.value(value)
    return child.hexdigest()


class _Lineage:
    """Datasets that are the unchanged output of a step, by identity."""

    def __init__(self) -> None:
        import weakref

        self._map: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def set(self, obj: Any, key: str) -> None:
        try:
            self._map[obj] = (key, getattr(obj, "_fingerprint", None))
        except TypeError:
            pass

    def get(self, obj: Any) -> str | None:
        """The step's key while the object is unchanged (``set_format`` and friends change a
        dataset in place, and its ``_fingerprint`` with it)."""
        try:
            entry = self._map.get(obj)
        except TypeError:
            return None
        if entry is None or entry[1] != getattr(obj, "_fingerprint", None):
            return None
        return entry[0]


LINEAGE = _Lineage()


def code_global_names(code: types.CodeType) -> set[str]:
    """Global names a code object (and its nested functions) may read."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= code_global_names(const)
    return names


def source_of(code: types.CodeType) -> str | None:
    """The dedented source of a code object (a function's ``__code__``), or ``None``."""
    try:
        source = inspect.getsource(code)
    except (OSError, TypeError, IndexError):
        return None
    import textwrap

    source = textwrap.dedent(source)
    try:
        ast.parse(source)
    except SyntaxError:  # a lambda inside an expression, for instance
        return None
    return source


def _buffer(arr: Any) -> memoryview:
    """The raw bytes of a numpy array (datetime/timedelta through their int64 view: numpy will
    not export those dtypes as buffers; the dtype string, with its unit, is hashed apart)."""
    import numpy as np

    if arr.dtype.kind in "mM":
        arr = arr.view(np.int64)
    return memoryview(np.ascontiguousarray(arr)).cast("B")


def _dict_items(value: dict) -> list:
    return list(value.items())


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def functools_partial() -> type:
    import functools

    return functools.partial


def _float(h: Hasher, v: float) -> None:
    h.tag("float")
    h._h.update(_pack_d(v))


def _str(h: Hasher, v: str) -> None:
    h.tag("str")
    h.str_(v)


def _int(h: Hasher, v: int) -> None:
    h.tag("int")
    h.int_(v)


def _bytes(h: Hasher, v: bytes) -> None:
    h.tag(type(v).__name__)
    h.bytes_(bytes(v))


# -- values by their exact state: RNGs, times, numbers, paths ------------------------------------
# Each is deterministic across processes and PYTHONHASHSEED; an RNG counts by its state, so
# drawing from it changes its fingerprint (a step that draws from it would give other numbers).


def _random(h: Hasher, rng: Any) -> None:
    """``random.Random`` (and subclasses) by ``getstate()``."""
    h.tag("random.Random")
    h.value(type(rng))
    try:
        state = rng.getstate()
    except NotImplementedError:  # random.SystemRandom: no state, numbers from the OS
        raise FingerprintError(
            f"a {_qualname(type(rng))} draws from the operating system: it has no state, so what a "
            "step draws from it cannot be reproduced"
        ) from None
    h.value(state)


def _np_seed_sequence(h: Hasher, seq: Any) -> None:
    """``np.random.SeedSequence`` by entropy, spawn key, pool size and children spawned."""
    h.tag("numpy.random.SeedSequence")
    if not hasattr(seq, "entropy"):  # SeedlessSeedSequence (a legacy-seeded bit generator)
        h.str_(type(seq).__name__)
        return
    h.value(seq.entropy)
    h.value(tuple(seq.spawn_key))
    h.int_(seq.pool_size)
    h.int_(seq.n_children_spawned)


def _np_bit_generator(h: Hasher, bits: Any) -> None:
    """A numpy bit generator (PCG64, MT19937, Philox, ...) by class, state and the seed
    sequence it spawns from."""
    h.tag("numpy.random.BitGenerator")
    h.str_(type(bits).__name__ if type(bits).__module__.startswith("numpy.") else _qualname(type(bits)))
    h.value(bits.state)
    seed_seq = getattr(bits, "seed_seq", None) if hasattr(type(bits), "seed_seq") else getattr(bits, "_seed_seq", None)
    h.value(seed_seq)


def _np_generator(h: Hasher, rng: Any) -> None:
    h.tag("numpy.random.Generator")
    _np_bit_generator(h, rng.bit_generator)


def _np_random_state(h: Hasher, rng: Any) -> None:
    h.tag("numpy.random.RandomState")
    h.value(rng.get_state(legacy=False))


def _torch_generator(h: Hasher, rng: Any) -> None:
    h.tag("torch.Generator")
    h.str_(str(rng.device))
    h.tensor_content(rng.get_state())


def _tzinfo(h: Hasher, tz: Any) -> None:
    """A time zone by what names it: a zoneinfo key, a pytz zone, a fixed offset and name."""
    import datetime

    if tz is None:
        h.tag("naive")
    elif type(tz) is datetime.timezone:
        h.tag("timezone")
        h.value(tz.utcoffset(None))
        h.str_(tz.tzname(None))
    elif isinstance(getattr(tz, "key", None), str):  # zoneinfo.ZoneInfo
        h.tag("zoneinfo")
        h.str_(tz.key)
    elif isinstance(getattr(tz, "zone", None), str):  # pytz
        h.tag("pytz")
        h.str_(tz.zone)
        h.str_(type(tz).__name__)
        if hasattr(tz, "_utcoffset"):  # a localized pytz zone: which offset it stands for
            h.value((tz._utcoffset, getattr(tz, "_dst", None), getattr(tz, "_tzname", None)))
    else:
        h.tag("tzinfo")
        h.value(tz)


def _datetime(h: Hasher, v: Any) -> None:
    """``datetime.datetime`` by its fields, ``fold`` and time zone (wall time and zone, not
    only the instant: 12:00 in Paris and 11:00 UTC print differently)."""
    h.tag("datetime.datetime" if type(v).__module__ == "datetime" else _qualname(type(v)))
    h.value((v.year, v.month, v.day, v.hour, v.minute, v.second, v.microsecond, v.fold))
    _tzinfo(h, v.tzinfo)


def _date(h: Hasher, v: Any) -> None:
    h.tag("datetime.date" if type(v).__module__ == "datetime" else _qualname(type(v)))
    h.value((v.year, v.month, v.day))


def _time(h: Hasher, v: Any) -> None:
    h.tag("datetime.time" if type(v).__module__ == "datetime" else _qualname(type(v)))
    h.value((v.hour, v.minute, v.second, v.microsecond, v.fold))
    _tzinfo(h, v.tzinfo)


def _timedelta(h: Hasher, v: Any) -> None:
    h.tag("datetime.timedelta" if type(v).__module__ == "datetime" else _qualname(type(v)))
    h.value((v.days, v.seconds, v.microseconds))


def _decimal(h: Hasher, v: Any) -> None:
    """By ``str``: exact, with its exponent (``1.0`` and ``1.00`` print differently)."""
    h.tag("decimal.Decimal")
    h.str_(str(v))


def _fraction(h: Hasher, v: Any) -> None:
    h.tag("fractions.Fraction")
    h.int_(v.numerator)
    h.int_(v.denominator)


def _uuid(h: Hasher, v: Any) -> None:
    h.tag("uuid.UUID")
    h.bytes_(v.bytes)


def _path(h: Hasher, v: Any) -> None:
    """A path by its flavour (posix or windows, pure or not) and text; the class's module is
    left out (``pathlib._local`` since Python 3.13)."""
    cls = type(v)
    h.tag("pathlib")
    h.str_(cls.__name__ if cls.__module__.startswith("pathlib") else _qualname(cls))
    h.str_(str(v))


def _pandas_timestamp(h: Hasher, v: Any) -> None:
    """A Timestamp by its instant and unit (``asm8``), ``fold`` and time zone."""
    h.tag("pandas.Timestamp")
    h.numpy_scalar(v.asm8)
    h.int_(v.fold)
    _tzinfo(h, v.tzinfo)


def _pandas_timedelta(h: Hasher, v: Any) -> None:
    h.tag("pandas.Timedelta")
    h.numpy_scalar(v.asm8)


def _pandas_period(h: Hasher, v: Any) -> None:
    h.tag("pandas.Period")
    h.str_(v.freqstr)
    h.int_(v.ordinal)


def _pandas_interval(h: Hasher, v: Any) -> None:
    h.tag("pandas.Interval")
    h.value(v.left)
    h.value(v.right)
    h.str_(v.closed)


def _pandas_array(h: Hasher, v: Any) -> None:
    """A pandas extension array (``pd.Categorical``, ``pd.array([...])``) by class and values."""
    h.tag("pandas.array")
    h.str_(type(v).__name__)
    h.pandas_values(v)


def _module_is(module: str, attr: str) -> Callable[[Any], bool]:
    """A check for one singleton (``pd.NaT``) that never imports ``module``."""

    def check(value: Any) -> bool:
        mod = sys.modules.get(module)
        return mod is not None and value is getattr(mod, attr, check)

    return check


_EXACT: dict[type, Callable[[Hasher, Any], None]] = {
    type(None): lambda h, v: h.tag("None"),
    bool: lambda h, v: h.tag("True" if v else "False"),
    int: _int,
    float: _float,
    complex: lambda h, v: (h.tag("complex"), h._h.update(_pack_d(v.real) + _pack_d(v.imag))),
    str: _str,
    bytes: _bytes,
    bytearray: _bytes,
    list: Hasher._sequence,
    tuple: Hasher._sequence,
    dict: Hasher._dict,
    set: Hasher._set,
    frozenset: Hasher._set,
    range: lambda h, v: (h.tag("range"), h.value((v.start, v.stop, v.step))),
    slice: lambda h, v: (h.tag("slice"), h.value((v.start, v.stop, v.step))),
    types.FunctionType: Hasher.function,
    types.MethodType: Hasher.function,
    types.BuiltinFunctionType: Hasher.function,
    types.ModuleType: Hasher.module_object,
    types.CodeType: Hasher.code,
    type(Ellipsis): lambda h, v: h.tag("Ellipsis"),
}


def _module_isinstance(module: str, attr: str) -> Callable[[Any], bool]:
    """A check that never imports ``module``: a value of that type implies it is imported."""

    def check(value: Any) -> bool:
        mod = sys.modules.get(module)
        if mod is None:
            return False
        cls = mod
        for part in attr.split("."):
            cls = getattr(cls, part, None)
            if cls is None:
                return False
        return isinstance(value, cls)

    return check


_HANDLERS: list[tuple[Callable[[Any], bool], Callable[[Hasher, Any], None]]] = [
    (_module_isinstance("numpy", "ndarray"), Hasher.ndarray),
    (_module_isinstance("numpy", "generic"), Hasher.numpy_scalar),
    (_module_isinstance("pandas", "DataFrame"), Hasher.dataframe),
    (_module_isinstance("pandas", "Series"), Hasher.series),
    (_module_isinstance("pandas", "Index"), Hasher.pandas_index),
    (_module_isinstance("datasets", "Dataset"), Hasher.dataset),
    (_module_isinstance("datasets", "DatasetDict"), lambda h, v: (h.tag("datasets.DatasetDict"), h.value(dict(v)))),
    (_module_isinstance("torch", "Tensor"), Hasher.tensor),
    (_module_isinstance("torch", "nn.Module"), _torch_module),
    (_module_isinstance("torch", "optim.Optimizer"), _optimizer),
    (_module_isinstance("torch", "optim.lr_scheduler.LRScheduler"), _scheduler),
    (_module_isinstance("torch", "dtype"), lambda h, v: (h.tag("torch.dtype"), h.str_(str(v)))),
    (_module_isinstance("torch", "device"), lambda h, v: (h.tag("torch.device"), h.str_(str(v)))),
    (_module_isinstance("transformers", "PreTrainedTokenizerBase"), _tokenizer),
    (_module_isinstance("transformers.trainer", "Trainer"), _trainer),
    (_module_isinstance("numpy.random", "Generator"), _np_generator),
    (_module_isinstance("numpy.random", "BitGenerator"), _np_bit_generator),
    (_module_isinstance("numpy.random", "SeedSequence"), _np_seed_sequence),
    (_module_isinstance("numpy.random.bit_generator", "ISeedSequence"), _np_seed_sequence),
    (_module_isinstance("numpy.random", "RandomState"), _np_random_state),
    (_module_isinstance("random", "Random"), _random),
    (_module_isinstance("torch", "Generator"), _torch_generator),
    (_module_is("pandas", "NaT"), lambda h, v: h.tag("pandas.NaT")),
    (_module_is("pandas", "NA"), lambda h, v: h.tag("pandas.NA")),
    (_module_isinstance("pandas", "Timestamp"), _pandas_timestamp),
    (_module_isinstance("pandas", "Timedelta"), _pandas_timedelta),
    (_module_isinstance("pandas", "Period"), _pandas_period),
    (_module_isinstance("pandas", "Interval"), _pandas_interval),
    (_module_isinstance("pandas", "api.extensions.ExtensionArray"), _pandas_array),
    (_module_isinstance("datetime", "datetime"), _datetime),  # before date: a datetime is a date
    (_module_isinstance("datetime", "date"), _date),
    (_module_isinstance("datetime", "time"), _time),
    (_module_isinstance("datetime", "timedelta"), _timedelta),
    (_module_isinstance("decimal", "Decimal"), _decimal),
    (_module_isinstance("fractions", "Fraction"), _fraction),
    (_module_isinstance("uuid", "UUID"), _uuid),
    (_module_isinstance("pathlib", "PurePath"), _path),
    (lambda v: isinstance(v, (list, tuple)), Hasher._sequence),
    (lambda v: isinstance(v, dict), Hasher._dict),
    (lambda v: isinstance(v, (set, frozenset)), Hasher._set),
    (lambda v: isinstance(v, type), Hasher.klass),
    (lambda v: isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)) or isinstance(v, functools_partial()), Hasher.function),
    (lambda v: isinstance(v, enum.Enum), lambda h, v: (h.tag("enum"), h.str_(_qualname(type(v))), h.value(v.value))),
    (lambda v: isinstance(v, bool), lambda h, v: h.tag("True" if v else "False")),
    (lambda v: isinstance(v, int), _int),
    (lambda v: isinstance(v, float), _float),
    (lambda v: isinstance(v, str), _str),
]
