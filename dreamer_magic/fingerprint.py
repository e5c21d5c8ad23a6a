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


def fingerprint_untracked(value: Any) -> tuple[str, list[str]]:
    """:func:`fingerprint`, and what user code from module files reaches but could count only
    by its type (a lock, a logger, a connection kept in a global), one line each.

    Examples
    --------
    >>> fingerprint_untracked(3)[1]
    []
    """
    h = Hasher()
    walk = _walk(h)
    h.value(value)
    return h.hexdigest(), list(dict.fromkeys(walk.untracked))


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
    """The installed version of the distribution that provides a module, or ``None`` (the
    standard library, user code).

    Examples
    --------
    >>> package_version("xxhash") is not None
    True

    See :func:`distribution_version` for the distribution's name as well. A library module
    that no distribution metadata describes falls back to its ``__version__``.
    """
    if is_user_module(module_name):  # even one that shares its name with an installed distribution
        return None
    found = distribution_version(module_name)
    if found is not None:
        return found[1]
    version = getattr(sys.modules.get(module_name.split(".")[0]), "__version__", None)
    return version if isinstance(version, str) else None


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
    """True for functions and classes of user code: the notebook, local modules, editable
    installs (see :func:`is_user_module`); they count by their code, libraries by version."""
    module = getattr(obj, "__module__", None)
    return is_user_module(module) if module is None or isinstance(module, str) else False


_BLOCK = 1 << 20  # characters of text encoded at a time by Hasher._ascii_strings


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
        count = len(items)
        if joined.isascii() and len(joined) > _BLOCK and self._ascii_strings(joined, count):
            return
        lengths = np.fromiter(map(len, items), dtype=np.int64, count=count)
        self.bytes_(memoryview(lengths).cast("B"))
        self.bytes_(joined.encode("utf-8", "surrogatepass"))

    def _ascii_strings(self, joined: str, count: int) -> bool:
        """The ``strings`` record of ``count`` ASCII strings joined by NUL, with the lengths
        read from where the NULs are instead of ``len()`` on each string, and the text encoded
        one block at a time: over a million strings, one pass over the objects fewer and no
        second copy of the text (both cost more than the hash on a cold hit). ``False`` (nothing
        fed) when a string holds a NUL itself."""
        import numpy as np

        size = len(joined)
        bounds = [np.array([-1], dtype=np.int64)]
        for start in range(0, size, _BLOCK):
            block = np.frombuffer(joined[start : start + _BLOCK].encode("ascii"), dtype=np.uint8)
            bounds.append(np.flatnonzero(block == 0) + start)
        bounds.append(np.array([size], dtype=np.int64))
        ends = np.concatenate(bounds)
        if len(ends) != count + 1:
            return False
        self.bytes_(memoryview(np.diff(ends) - 1).cast("B"))
        self._h.update(b"\x02" + _pack_q(size))  # bytes_(joined.encode()), a block at a time
        for start in range(0, size, _BLOCK):
            self._h.update(joined[start : start + _BLOCK].encode("ascii"))
        return True

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
        column = getattr(df, "_get_column_array", None)  # the array itself: no Series per column
        for i in range(df.shape[1]):
            self.pandas_values(column(i) if column is not None else df.iloc[:, i])
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
        """A library module by distribution and version; a user module by its code: its
        functions, classes and plain constants (what a cell reaching ``helpers.clean`` runs).

        A package's own submodules are left out: ``import mypkg.sub`` anywhere (in a step's
        body, say) makes ``sub`` an attribute of ``mypkg``, and the first call that imports it
        must fingerprint like the next ones; their code counts as a dependency of the step."""
        name = getattr(module, "__name__", None)
        if not isinstance(name, str):
            raise FingerprintError(f"a module object without a name ({_qualname(type(module))}) cannot be fingerprinted")
        if not is_user_module(name):
            self.tag("module")
            self.str_(name)
            self.value(distribution_version(name))
            return

        def body(h: Hasher) -> None:
            h.tag("user-module")
            h.str_(name)
            for key, value in sorted(vars(module).items()):
                if key.startswith("__") and key.endswith("__"):
                    continue
                if isinstance(value, types.ModuleType) and getattr(value, "__name__", None) == f"{name}.{key}":
                    continue  # a submodule, bound by importing it
                if isinstance(value, (type, types.ModuleType)) or _is_callable_code(value) or _is_plain(value):
                    h.str_(key)
                    h._code_value(f"module {name}", key, value, owner=name, module_global=True)

        self._user_object(module, "module", body)

    # -- code -------------------------------------------------------------------
    def function(self, fn: Any) -> None:
        """Functions: user functions by code + the globals they use, recursively into the user
        code they reach; library callables by qualified name + distribution version."""
        import functools

        if isinstance(fn, functools.partial):
            self.tag("partial")
            self.value(fn.func)
            self.value(fn.args)
            self.value(dict(fn.keywords))
            return
        if isinstance(fn, functools._lru_cache_wrapper):  # @lru_cache, @cache
            self.tag("lru_cache")
            self.value(fn.__wrapped__)
            self.value(fn.cache_parameters())
            return
        if isinstance(fn, types.MethodType):
            self.tag("method")
            self.value(fn.__func__)
            self.value(fn.__self__)
            return
        bound_to = getattr(fn, "__self__", None)
        if isinstance(fn, types.BuiltinMethodType) and bound_to is not None and not isinstance(bound_to, (types.ModuleType, type)):
            self.tag("builtin-method")  # e.g. a compiled regex's .sub, a dict's .get
            self.str_(fn.__name__)
            self.value(bound_to)
            return
        if not isinstance(fn, types.FunctionType) or not _is_user_function(fn):
            self._library_callable(fn)
            return
        self._user_object(fn, "function", lambda h: h._user_function(fn))

    def _library_callable(self, fn: Any) -> None:
        module, name = _library_name(fn)
        if isinstance(fn, types.FunctionType):  # a library decorator's wrapper says the user's module
            module = _module_of_file(fn.__code__.co_filename) or module
        self.tag("library-callable")
        self.str_(module)
        self.str_(name)
        self.value(distribution_version(module) if module else None)
        if isinstance(fn, types.FunctionType) and (fn.__closure__ or "<locals>" in name):
            # made at run time (a decorator's wrapper, a factory's function): what it closes over
            self.str_(fn.__code__.co_name)
            self._code_value(f"function {name}()", "closure", (fn.__defaults__, fn.__kwdefaults__, _closure(fn)), owner=module)

    def _user_function(self, fn: types.FunctionType) -> None:
        self.tag("function")
        self.str_(fn.__qualname__)
        self.code(fn.__code__)
        self._function_data(fn)
        self.str_("globals")
        where = f"function {fn.__qualname__}()"
        for name in sorted(function_globals(fn)):
            self.str_(name)
            self._code_value(where, name, fn.__globals__[name], "uses the global", owner=fn.__module__, module_global=True)
        imports = code_imports(fn.__code__, fn.__globals__.get("__package__"))
        if imports:
            self.str_("imports")
            for name in sorted(imports):
                self.str_(name)
                self.value(import_version(name))

    def _function_data(self, fn: types.FunctionType) -> None:
        self.value(fn.__defaults__)
        self.value(fn.__kwdefaults__)
        if fn.__closure__:
            self.value(_closure(fn))

    def _code_value(
        self, where: str, name: str, value: Any, verb: str = "has", *, owner: str | None = None, module_global: bool = False
    ) -> None:
        """Feed a value user code reaches; a failure names where it was reached.

        A mutable container that a module file starts empty (``_CACHE = {}``, a registry, a list
        of calls) counts by its type: it is state that code fills as it runs, so a first call
        would fingerprint unlike the next ones (see :func:`_is_module_state`).
        Code typed in the notebook must have fingerprintable globals (the user can fix that).
        Code from a module file often keeps a lock, a logger or a cache in a global; such a
        value counts by its type, and is listed in :func:`fingerprint_untracked`.
        """
        if module_global and _is_module_state(value, owner, name):
            self.tag("module-state")
            self.klass(type(value))
            return
        child = _sub_hasher(self)
        try:
            child.value(value)
        except FingerprintError as e:
            if owner in (None, "__main__", "__mp_main__"):  # ``owner``: the module of the code
                raise FingerprintError(f"{where} {verb} {name!r}, which cannot be fingerprinted: {e}") from None
            _walk(self).untracked.append(f"{where} {verb} {name!r} ({_qualname(type(value))}): {e}")
            self.tag("untracked")
            self.klass(type(value))
            return
        self.tag("reached")
        self.str_(child.hexdigest())

    def _user_object(self, obj: Any, kind: str, body: Callable[[Hasher], None]) -> None:
        """Hash a user function, class or module once per fingerprint (see :class:`_Walk`)."""
        walk = _walk(self)
        for depth, active in enumerate(reversed(walk.active)):
            if active is obj:
                self.tag(f"recursive-{kind}")
                self.int_(depth)
                walk.reach = min(walk.reach, len(walk.active) - 1 - depth)
                return
        done = walk.done.get(id(obj))
        if done is None or done[0] is not obj:
            index = len(walk.active)
            outer_reach, walk.reach = walk.reach, sys.maxsize
            walk.active.append(obj)
            child = _sub_hasher(self)
            try:
                body(child)
            finally:
                walk.active.pop()
                inner_reach = walk.reach
                walk.reach = min(outer_reach, inner_reach)
            done = (obj, child.hexdigest())
            if inner_reach >= index:  # refers to nothing outside itself: the same wherever it is met
                walk.done[id(obj)] = done
        self.tag(kind)
        self.str_(done[1])

    def code(self, code: types.CodeType) -> None:
        self.tag("code")
        self.str_(code_digest(code))

    def klass(self, cls: type) -> None:
        """Classes: library ones by qualified name + version; user ones by everything in their
        ``__dict__`` (every method, dunders included, properties, class attributes), their
        dataclass fields and parameters, and their bases, by the code that runs."""
        if not _is_user_code(cls):
            module, name = _library_name(cls)
            self.tag("library-class")
            self.str_(module)
            self.str_(name)
            self.value(distribution_version(module) if module else None)
            return
        self._user_object(cls, "class", lambda h: h._user_class(cls))

    def _user_class(self, cls: type) -> None:
        where = f"class {cls.__qualname__}"
        self.tag("user-class")
        self.str_(cls.__qualname__)
        if type(cls) is not type:
            self.str_("metaclass")
            self.klass(type(cls))
        self.int_(len(cls.__bases__))
        for base in cls.__bases__:
            self.klass(base)
        if dataclasses.is_dataclass(cls):
            params = getattr(cls, "__dataclass_params__", None)
            self.str_("dataclass")
            self.value([getattr(params, p, None) for p in _DATACLASS_PARAMS])
            for f in dataclasses.fields(cls):
                self.str_(f.name)
                kind = getattr(getattr(f, "_field_type", None), "name", "field")
                self.value([kind, f.init, f.repr, f.hash, f.compare, getattr(f, "kw_only", None), dict(f.metadata)])
                for part in (f.default, f.default_factory):
                    if part is dataclasses.MISSING:
                        self.tag("missing")
                    else:
                        self._code_value(where, f.name, part, "has the field", owner=cls.__module__)
        members = cls.__members__ if isinstance(cls, enum.EnumMeta) else None
        if members is not None:
            self.str_("members")
            self.value([(k, m.value) for k, m in members.items()])
        for name, attr in sorted(vars(cls).items()):
            if name in _GENERATED_CLASS_ATTRIBUTES or _is_dataclass_generated(cls, name, attr):
                continue
            if members is not None and (isinstance(attr, cls) or (name[:1] == name[-1:] == "_" and name[:2] != "__")):
                continue  # the members (above) and the enum machinery's _sunder_ names
            if isinstance(attr, (types.MemberDescriptorType, types.GetSetDescriptorType)):
                continue  # made from __slots__, which is hashed
            self.str_(name)
            if name in ("__annotations__", "__orig_bases__"):
                items = attr.items() if isinstance(attr, dict) else enumerate(attr)
                for key, annotation in items:
                    self.value(key)
                    _annotation(self, annotation)
            elif isinstance(attr, (staticmethod, classmethod)):
                self.tag(type(attr).__name__)
                self._code_value(where, name, attr.__func__, owner=cls.__module__)
            elif isinstance(attr, property):
                self.tag("property")
                for part in (attr.fget, attr.fset, attr.fdel):
                    self._code_value(where, name, part, owner=cls.__module__)
            elif type(attr).__name__ == "cached_property" and hasattr(attr, "func"):
                self.tag("cached_property")
                self._code_value(where, name, attr.func, owner=cls.__module__)
            else:
                self._code_value(where, name, attr, owner=cls.__module__)

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
    """A class by its import path, or by its code when it is user code (the notebook, a local module)."""
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


def model_fingerprint(model: Any, *, mode: bool = True) -> str:
    """A torch model by what it computes: class, config, generation config, structure,
    hyperparameters, train/eval mode and every tensor.

    Examples
    --------
    >>> model_fingerprint(model)  # doctest: +SKIP
    '0f3a…'
    >>> model_fingerprint(model.eval(), mode=False) == model_fingerprint(model.train(), mode=False)  # doctest: +SKIP
    True

    The structure is every submodule (``named_modules()``) with its class and its plain
    attributes: dropout ``p``, ``eps``, ``inplace``, an activation chosen by function, and
    ``training`` unless ``mode=False`` (the generation cache, which always generates in eval
    mode, leaves the mode out). Bookkeeping of where a model came from does not count, so a
    trained model and the same model loaded back with ``from_pretrained`` fingerprint alike
    (in the same mode). The weights are hashed once per model object and again only after a
    parameter or buffer changes (checked cheaply: version counters plus a sample of every
    tensor); the rest is read afresh each call.
    """
    active = _models_in_progress()
    if id(model) in active:  # a model reached again from its own attributes (a closure over it)
        return fingerprint(("recursive-model", class_id(type(model)), len(active) - active.index(id(model))))
    active.append(id(model))
    try:
        return _model_fingerprint(model, mode)
    finally:
        active.pop()


def _model_fingerprint(model: Any, mode: bool) -> str:
    data: dict[str, Any] = {"class": class_id(type(model)), "config": config_data(getattr(model, "config", None))}
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        data["generation_config"] = config_data(generation)
    data["structure"] = module_structure(model, mode=mode)
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
    data["weights"] = _weights_fingerprint(model)
    return fingerprint(data)


def _models_in_progress() -> list[int]:
    """Ids of the models this thread is fingerprinting now."""
    if not _MODELS_IN_PROGRESS:
        import threading

        _MODELS_IN_PROGRESS.append(threading.local())
    local = _MODELS_IN_PROGRESS[0]
    if not hasattr(local, "ids"):
        local.ids = []
    return local.ids


_MODELS_IN_PROGRESS: list[Any] = []

# Attributes of modules that say where a model came from or how it is being trained, not what it computes.
VOLATILE_MODULE_ATTRIBUTES = {"name_or_path", "warnings_issued", "gradient_checkpointing", "hf_device_map", "model_parallel", "is_parallelizable"}


def module_structure(model: Any, *, mode: bool = True) -> list:
    """Every submodule of a torch model as ``[name, class, plain attributes]``.

    Examples
    --------
    >>> module_structure(torch.nn.Dropout(0.1))  # doctest: +SKIP
    [['', 'torch.nn.modules.dropout.Dropout', {'inplace': False, 'p': 0.1, 'training': True}]]

    Plain attributes are numbers, strings, tuples and such, enum members, dtypes, devices,
    callables (an activation stored as a function) and tensors that are neither parameters
    nor buffers; private names (``_parameters``, hooks), methods patched on the instance (a
    wrapped ``generate`` or ``forward``) and :data:`VOLATILE_MODULE_ATTRIBUTES` do not count,
    nor does ``training`` when ``mode=False``.
    """
    import torch

    out = []
    for name, sub in model.named_modules():
        attrs: dict[str, Any] = {}
        for key, value in vars(sub).items():
            if key.startswith("_") or key in VOLATILE_MODULE_ATTRIBUTES or (key == "training" and not mode):
                continue
            if hasattr(type(sub), key):  # a method patched on the instance: instrumentation, device hooks
                continue
            if isinstance(value, types.MethodType) and isinstance(value.__self__, torch.nn.Module):
                value = value.__func__  # a module's method stored under another name: its code
            if _is_hyperparameter(value):
                attrs[key] = value
        out.append([name, class_id(type(sub)), attrs])
    return out


def _is_hyperparameter(value: Any) -> bool:
    if _is_plain(value) or _is_callable_code(value):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, (torch.dtype, torch.device, torch.Tensor))


def _weights_fingerprint(model: Any) -> str:
    """The state dict's fingerprint, memoised in :data:`MODEL_MEMO` while the tensors (and
    their names) stay the same."""
    state = (_tensor_state(model), tuple(name for name, _ in model.named_parameters()), tuple(name for name, _ in model.named_buffers()))
    known = MODEL_MEMO.get(model, state)
    if known is not None:
        return known
    return MODEL_MEMO.put(model, state, fingerprint(dict(model.state_dict())))


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
    """Global names a code object (and its nested code) reads: its real global loads.

    Examples
    --------
    >>> def f(r):
    ...     return r.size + offset
    >>> code_global_names(f.__code__)
    {'offset'}

    Read from the bytecode (``LOAD_GLOBAL``, ``LOAD_NAME`` and 3.12's
    ``LOAD_FROM_DICT_OR_GLOBALS``), not ``co_names``, which holds attribute names too: ``r.size``
    does not make ``size`` a global. Computed once per code object.
    """
    memo = _code_memo("globals")
    known = memo.get(code)
    if known is None:
        import dis

        names = {ins.argval for ins in dis.get_instructions(code) if ins.opname in _GLOBAL_LOADS}
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                names |= code_global_names(const)
        known = memo[code] = frozenset(names)
    return set(known)


def _bound_before_read(code: types.CodeType) -> set[str]:
    """Global names ``code`` assigns whose first mention in its own bytecode is the assignment
    (``global np; import numpy as np; np.ones(3)``), not a read (``calls += 1``)."""
    import dis

    first: dict[str, bool] = {}
    for ins in dis.get_instructions(code):
        if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_GLOBAL", "LOAD_NAME"):
            first.setdefault(ins.argval, ins.opname != "LOAD_GLOBAL" and ins.opname != "LOAD_NAME")
    return {name for name, stored in first.items() if stored}


def function_globals(fn: types.FunctionType) -> set[str]:
    """The globals that count for a user function: the names its code reads that its module
    defines, less those its own code assigns.

    Examples
    --------
    >>> calls = 0
    >>> def f(x):
    ...     global calls, np
    ...     calls += 1
    ...     import numpy as np
    ...     return x + offset + np.sign(calls)
    >>> offset = 1
    >>> sorted(function_globals(f))
    ['calls', 'offset']

    A global the function binds before it reads it (``global np; import numpy as np``) is not an
    input: its value comes from the function's own code, and counting it would make every call
    after the first a miss. The same holds for what the functions of its module that it calls
    bind before reading (a ``setup()`` that binds ``tokenizer``), followed through the module's
    globals. A global read before it is bound (a call counter, ``calls += 1``; a model loaded once
    behind ``if model is None``) still counts: what the call returns may depend on it, so a
    changed value runs the step again rather than giving a result the call would not give now.
    """
    module_globals = fn.__globals__
    written: set[str] = set()
    seen: dict[int, Any] = {}
    todo = [fn]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen[id(current)] = current
        written |= _bound_before_read(current.__code__)
        for name in code_global_names(current.__code__):
            value = module_globals.get(name)
            if isinstance(value, types.FunctionType) and value.__globals__ is module_globals:
                todo.append(value)
    return {name for name in code_global_names(fn.__code__) if name in module_globals and name not in written}


def function_parts(fn: Any) -> dict[str, str]:
    """Digests of the parts a user function's fingerprint is made of, so that a why-line can
    say what changed when its source did not: ``code``, ``defaults``, ``closure``,
    ``global:<name>`` for each global it uses, ``import:<module>`` for what its body imports
    (the version, or ``source`` and a digest for a local module). Empty for other callables.

    Examples
    --------
    >>> def f(x):
    ...     return x + 1
    >>> sorted(function_parts(f))
    ['code', 'defaults']
    """
    if not isinstance(fn, types.FunctionType) or not _is_user_function(fn):
        return {}
    parts = {"code": code_digest(fn.__code__)}
    pieces: list[tuple[str, Callable[[Hasher], None]]] = [
        ("defaults", lambda h: h.value((fn.__defaults__, fn.__kwdefaults__))),
    ]
    if fn.__closure__:
        pieces.append(("closure", lambda h: h.value(_closure(fn))))
    for name in sorted(function_globals(fn)):
        value = fn.__globals__[name]
        pieces.append((f"global:{name}", lambda h, n=name, v=value: h._code_value("", n, v, owner=fn.__module__, module_global=True)))
    for key, feed in pieces:
        h = Hasher()
        try:
            feed(h)
        except Exception:  # noqa: BLE001 - a part that cannot be hashed is left unnamed
            continue
        parts[key] = h.hexdigest()
    for name in sorted(code_imports(fn.__code__, fn.__globals__.get("__package__"))):
        found = import_version(name)
        parts[f"import:{name}"] = "none" if found is None else f"source {found[1]}" if found[0] == "source" else str(found[1])
    return parts


def import_version(module_name: str) -> Any:
    """What a module that a function imports in its body counts by, the same before and after
    its first import (the first call imports it; the next ones must fingerprint alike).

    A library by its distribution and version (``None`` for the standard library); user code
    (a local module, an editable install) by the source of its file, found as the import system
    would find it, without importing it. A file edited but not reloaded reads as a change: a
    needless re-run, never a stale hit (the code that ran is also a dependency of the step).
    """
    path = _import_path(module_name)
    top = module_name.partition(".")[0]
    if path is not None and top != _THIS_PACKAGE and _is_user_path(top, path):
        return ("source", _file_source_digest(path))
    return distribution_version(module_name)


def _import_path(module_name: str) -> str | None:
    """The real path of the file a module is (or would be) loaded from; ``None`` when unknown.
    Parent packages are searched, never imported."""
    import importlib.machinery
    import importlib.util
    import os

    module = sys.modules.get(module_name)
    if module is not None:
        return _module_path(module)
    parts = module_name.split(".")
    try:
        parent = sys.modules.get(parts[0])
        spec = parent.__spec__ if parent is not None else importlib.util.find_spec(parts[0])
        for i in range(1, len(parts)):
            name = ".".join(parts[: i + 1])
            loaded = sys.modules.get(name)
            if loaded is not None:
                spec = loaded.__spec__
                continue
            search = getattr(spec, "submodule_search_locations", None)
            if not search:
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, list(search))
    except (ImportError, ValueError, AttributeError):
        return None
    origin = getattr(spec, "origin", None)
    if origin and os.path.isabs(origin):
        return os.path.realpath(origin)
    folders = list(getattr(spec, "submodule_search_locations", None) or [])
    return os.path.realpath(folders[0]) if folders else None


_SOURCE_DIGESTS: dict[tuple, str | None] = {}


def _file_source_digest(path: str) -> str | None:
    """A module file by its normalised source (comments and blank lines do not count)."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path):  # a namespace package's folder
        return None
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _SOURCE_DIGESTS:
        try:
            with open(path, "rb") as f:
                data = f.read()
            try:
                text = normalise_source(data.decode("utf-8"))
            except (UnicodeDecodeError, SyntaxError, ValueError):
                text = data.decode("latin-1")
            _SOURCE_DIGESTS[key] = combine(text)
        except OSError:
            _SOURCE_DIGESTS[key] = None
    return _SOURCE_DIGESTS[key]


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


# -- user code and libraries: by where a module's file lives ---------------------------------------


def is_user_module(module_name: str | None) -> bool:
    """True when a module is the user's own code, whose code (not a version) must count.

    Examples
    --------
    >>> is_user_module("__main__"), is_user_module("json"), is_user_module("xxhash")
    (True, False, False)

    User code is the notebook (``__main__``, IPython cells), and any module whose file is
    neither in the standard library nor installed by a non-editable distribution: a
    ``helpers.py`` beside the notebook, a package under the project, a ``pip install -e``
    package (even one with a ``__version__``). Decided once per imported module (and again
    when the module's file changes, as a module of that name loaded from elsewhere). This
    extension itself counts as a library.
    """
    if not module_name or module_name in ("__main__", "__mp_main__") or module_name.startswith("__ipython"):
        return True
    module = sys.modules.get(module_name)
    if module is None:  # not imported (a class named by a pickle, say): by its top-level package
        top = module_name.partition(".")[0]
        if top != module_name and top in sys.modules:
            return is_user_module(top)
        return top not in sys.stdlib_module_names and not _metadata().distributions_of(top)
    file = getattr(module, "__file__", None)
    known = _USER_MODULES.get(module_name)
    if known is not None and known[0] == file:
        return known[1]
    top = module_name.partition(".")[0]
    path = _module_path(module)
    user = path is not None and top != _THIS_PACKAGE and _is_user_path(top, path)
    _USER_MODULES[module_name] = (file, user)
    return user


def distribution_version(module_name: str) -> tuple[str, str] | None:
    """The installed distribution that provides a module, as ``(name, version)``; ``None`` for
    the standard library and for code no distribution installed.

    Examples
    --------
    >>> distribution_version("xxhash")[0]
    'xxhash'
    >>> distribution_version("json") is None
    True
    """
    return _metadata().version_of(module_name)


_USER_MODULES: dict[str, tuple[str | None, bool]] = {}
# This extension is the tool, not the user's code, wherever it is installed: its bookkeeping
# (hooks, memo tables) is not what a step computes.
_THIS_PACKAGE = __name__.partition(".")[0]


def _module_path(module: types.ModuleType) -> str | None:
    """The real path of a module's file (a namespace package: its first folder); ``None`` when
    the interpreter provides it (built-in, frozen)."""
    import os

    path = getattr(module, "__file__", None)
    if not path:
        spec = getattr(module, "__spec__", None)
        origin = getattr(spec, "origin", None)
        if origin and os.path.isabs(origin):
            path = origin
        else:
            folders = list(getattr(module, "__path__", None) or [])
            path = folders[0] if folders else None
    return os.path.realpath(path) if path else None


def _is_user_path(top: str, path: str) -> bool:
    import os

    parts = path.split(os.sep)
    candidates = _metadata().distributions_of(top)
    if "site-packages" in parts or "dist-packages" in parts:
        # installed there: a library, unless the distribution that owns it is an editable install
        if len(candidates) > 1:  # a namespace package several distributions share: the file's owner
            candidates = [d for d in candidates if path in _metadata().files_of(d)] or candidates
        return bool(candidates) and all(_metadata().editable(d) for d in candidates)
    if any(path.startswith(folder) for folder in _stdlib_folders()):
        return False
    # anywhere else: user code, unless a non-editable distribution installed this very file
    # (``pip install --target``, a conda or system layout without a site-packages folder)
    return not any(not _metadata().editable(d) and path in _metadata().files_of(d) for d in candidates)


def _stdlib_folders() -> tuple[str, ...]:
    """The standard library's folders (in a venv, ``platstdlib`` is the venv's own ``lib``,
    which is why site-packages is ruled out first)."""
    if not _STDLIB:
        import os
        import sysconfig

        paths = sysconfig.get_paths()
        folders = {paths["stdlib"], paths["platstdlib"], os.path.dirname(os.__file__)}
        _STDLIB.extend(os.path.join(os.path.realpath(f), "") for f in folders if f)
    return tuple(_STDLIB)


_STDLIB: list[str] = []


class _Metadata:
    """What the installed distributions say, read once per ``sys.path`` (a new entry can bring
    new distributions)."""

    def __init__(self) -> None:
        import importlib.metadata

        self.key = tuple(sys.path)
        self.top_level = importlib.metadata.packages_distributions()
        self._files: dict[str, frozenset[str]] = {}
        self._editable: dict[str, bool] = {}
        self._versions: dict[str, tuple[str, str] | None] = {}
        self._provides: dict[tuple[str, str], bool] = {}

    def distributions_of(self, top: str) -> list[str]:
        return sorted(set(self.top_level.get(top, ())))

    def files_of(self, name: str) -> frozenset[str]:
        """The paths a distribution's RECORD lists (under the real path of where it is installed)."""
        files = self._files.get(name)
        if files is None:
            import importlib.metadata
            import os

            try:
                dist = importlib.metadata.distribution(name)
                base = os.path.realpath(dist.locate_file(""))
                files = frozenset(os.path.normpath(os.path.join(base, str(f))) for f in dist.files or ())
            except Exception:
                files = frozenset()
            self._files[name] = files
        return files

    def editable(self, name: str) -> bool:
        """``pip install -e``: direct_url.json says ``"dir_info": {"editable": true}``."""
        known = self._editable.get(name)
        if known is None:
            import importlib.metadata
            import json

            try:
                text = importlib.metadata.distribution(name).read_text("direct_url.json")
                known = bool(text) and bool(json.loads(text).get("dir_info", {}).get("editable"))
            except Exception:
                known = False
            self._editable[name] = known
        return known

    def provides(self, name: str, module_name: str) -> bool:
        """Whether a distribution's RECORD holds the module ``a.b`` (``a/b.py`` or ``a/b/...``)."""
        key = (name, module_name)
        known = self._provides.get(key)
        if known is None:
            import importlib.metadata

            rel = module_name.replace(".", "/")
            try:
                files = [str(f).replace("\\", "/") for f in importlib.metadata.distribution(name).files or ()]
            except Exception:
                files = []
            known = self._provides[key] = any(f.startswith(rel + "/") or f.startswith(rel + ".") for f in files)
        return known

    def version_of(self, module_name: str) -> tuple[str, str] | None:
        if module_name in self._versions:
            return self._versions[module_name]
        import importlib.metadata

        top = module_name.partition(".")[0]
        names = self.distributions_of(top)
        if len(names) > 1:  # a namespace package several distributions share: the module's owner
            # by the module's path in each RECORD, whether or not it is imported yet (a body
            # that imports it must not change what it counts by)
            names = [n for n in names if self.provides(n, module_name)] or names
        found = None
        for name in names:
            try:
                dist = importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            found = (dist.metadata["Name"] or name, dist.version)
            break
        self._versions[module_name] = found
        return found


_METADATA: list[_Metadata] = []


def _metadata() -> _Metadata:
    if not _METADATA or _METADATA[0].key != tuple(sys.path):
        _METADATA[:] = [_Metadata()]
    return _METADATA[0]


# -- code: by what actually runs -----------------------------------------------------------------

_GLOBAL_LOADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_FROM_DICT_OR_GLOBALS"})
_CODE_MEMO: dict[str, Any] = {}  # weak dictionaries, made on first use


def _code_memo(kind: str) -> Any:
    memo = _CODE_MEMO.get(kind)
    if memo is None:
        import weakref

        memo = _CODE_MEMO[kind] = weakref.WeakKeyDictionary()
    return memo


def code_imports(code: types.CodeType, package: str | None = None) -> set[str]:
    """Absolute names of the modules a code object (and its nested code) imports while it runs.

    Examples
    --------
    >>> def f():
    ...     import json.decoder
    >>> code_imports(f.__code__)
    {'json.decoder'}
    """
    memo = _code_memo("imports")
    known = memo.get(code)
    if known is None or known[0] != package:
        known = memo[code] = (package, frozenset(_imports(code, package)))
    return set(known[1])


def _imports(code: types.CodeType, package: str | None) -> set[str]:
    import dis
    import importlib.util

    names: set[str] = set()
    consts: list[Any] = []
    for ins in dis.get_instructions(code):
        if ins.opname == "IMPORT_NAME":
            level = consts[-2] if len(consts) >= 2 and isinstance(consts[-2], int) else 0
            if level == 0:
                names.add(ins.argval)
            elif package:
                try:
                    names.add(importlib.util.resolve_name("." * level + ins.argval, package))
                except (ImportError, ValueError):
                    pass
        consts = consts[-1:] + [ins.argval] if ins.opname in ("LOAD_CONST", "LOAD_SMALL_INT") else []
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _imports(const, package)
    return names


def code_digest(code: types.CodeType) -> str:
    """The fingerprint of a code object: what it runs, not where it sits in its file.

    Examples
    --------
    >>> def f(x):
    ...     return x + 1  # a comment does not count
    >>> len(code_digest(f.__code__))
    32

    Code typed in the notebook (an IPython cell, whose source ``linecache`` holds for the
    cell that ran) counts by its normalised source, which stays stable across Python
    versions. Code from a module file counts by the *loaded* code object: bytecode,
    constants, names and nested code, but no line numbers, so a comment-only edit does not
    count and a file edited on disk but not reloaded is not mistaken for what runs.
    Computed once per code object.
    """
    memo = _code_memo("digest")
    known = memo.get(code)
    if known is None:
        h = Hasher()
        source = _notebook_source(code)
        if source is not None:
            h.tag("source")
            h.str_(normalise_source(source))
        else:
            h.tag("bytecode")
            _feed_code(h, code)
        known = memo[code] = h.hexdigest()
    return known


def _notebook_source(code: types.CodeType) -> str | None:
    """The source of code typed in a cell: IPython keeps each cell in ``linecache`` without
    an mtime (a file on disk has one, and may have changed since it was loaded)."""
    import linecache

    if code.co_name == "<lambda>":  # its source is the whole line, which may hold other lambdas
        return None
    entry = linecache.cache.get(code.co_filename)
    if entry is None or len(entry) != 4 or entry[1] is not None:
        return None
    return source_of(code)


def _feed_code(h: Hasher, code: types.CodeType) -> None:
    h.tag("code-object")
    h.str_(code.co_name)
    # CO_NESTED (0x10) says where the code was compiled (inside another function), not what it does
    h.value((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags & ~0x10))
    h.bytes_(code.co_code)
    h.value((code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars))
    h.bytes_(getattr(code, "co_exceptiontable", b""))  # 3.11+: where try blocks go, no lines
    h.int_(len(code.co_consts))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _feed_code(h, const)
        else:
            h.value(const)


class _Walk:
    """The user code one fingerprint walks through (functions, classes, user modules).

    ``active`` are the objects being hashed, outermost first: meeting one again is a cycle,
    hashed as a back-reference by relative depth. ``done`` holds digests of objects whose
    walk referred to nothing outside itself, reused when they are met again, so a module
    that many functions reach is hashed once per fingerprint. ``reach`` is the outermost
    ``active`` index referred to by the walk in progress.
    """

    def __init__(self) -> None:
        self.active: list[Any] = []
        self.done: dict[int, tuple[Any, str]] = {}
        self.reach = sys.maxsize
        self.untracked: list[str] = []  # values module code reaches that count by type only


def _walk(h: Hasher) -> _Walk:
    """The walk shared by a hasher and its children (kept first in their shared ``_functions``)."""
    shared = h._functions
    if not shared or not isinstance(shared[0], _Walk):
        shared.insert(0, _Walk())
    return shared[0]


def _sub_hasher(parent: Hasher) -> Hasher:
    child = Hasher.__new__(Hasher)
    child.__dict__.update(parent.__dict__)  # shares the guards, whatever they are
    child._h = xxhash.xxh3_128()
    return child


def _is_dataclass_generated(cls: type, name: str, attr: Any) -> bool:
    """What ``@dataclass`` writes from the fields and parameters (hashed instead): its methods,
    made by ``exec`` (``<string>``) or taken from the dataclasses module (3.13's ``__replace__``),
    and the docstring it makes from the signature."""
    if not dataclasses.is_dataclass(cls):
        return False
    if name == "__doc__":
        return isinstance(attr, str) and attr.startswith(f"{cls.__name__}(")
    if name not in _DATACLASS_METHODS or not isinstance(attr, types.FunctionType):
        return False
    if attr.__code__.co_filename == dataclasses.__file__:
        return True
    made = getattr(attr, "__wrapped__", attr)  # __repr__ comes wrapped in a recursion guard
    code = getattr(made, "__code__", None)
    if code is None or code.co_filename != "<string>":
        return False
    return getattr(code, "co_qualname", "__create_fn__").startswith("__create_fn__")  # 3.10: no co_qualname


_DATACLASS_METHODS = frozenset(
    {
        "__init__", "__repr__", "__eq__", "__hash__", "__lt__", "__le__", "__gt__", "__ge__", "__setattr__",
        "__delattr__", "__replace__", "__getstate__", "__setstate__",
    }
)
# What Python writes into a class's ``__dict__`` itself, or derives from what is hashed anyway.
_GENERATED_CLASS_ATTRIBUTES = frozenset(
    {
        "__dict__", "__weakref__", "__module__", "__qualname__", "__firstlineno__", "__static_attributes__",
        "__dataclass_fields__", "__dataclass_params__", "_abc_impl", "__abstractmethods__", "__parameters__",
        "__type_params__",
    }
)
_DATACLASS_PARAMS = ("init", "repr", "eq", "order", "unsafe_hash", "frozen")  # in every Python from 3.10


def _annotation(h: Hasher, value: Any) -> None:
    """A type annotation: classes by what they are, typing constructs by their text."""
    if isinstance(value, (str, type)):
        h.value(value)
        return
    try:
        digest = fingerprint_in(h, value)
    except (FingerprintError, RecursionError):
        text = str(value)
        if " at 0x" in text:
            raise FingerprintError(f"the annotation {type(value).__qualname__} cannot be fingerprinted") from None
        h.tag("annotation-text")
        h.str_(text)
        return
    h.tag("annotation")
    h.str_(digest)


def _is_plain(value: Any, depth: int = 0) -> bool:
    """A plain constant: numbers, strings, bytes, ``None``, enum members, and containers of those."""
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, enum.Enum)):
        return True
    if depth > 8:
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_is_plain(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(_is_plain(k, depth + 1) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


_MUTABLE_CONTAINERS = (dict, list, set, bytearray)
_EMPTY_CONSTRUCTORS = frozenset({"dict", "list", "set", "bytearray", "defaultdict", "OrderedDict", "Counter", "deque"})


def _is_module_state(value: Any, owner: str | None, name: str) -> bool:
    """A mutable container that a module file binds to an empty one at its top level
    (``_CACHE = {}``, ``_seen = set()``, ``calls = []``): what that module's code fills as it
    runs, not what the step computes from. A container the file fills itself (a ``LABELS``
    table) is configuration and counts by content; the notebook's own data always does."""
    if owner is None or owner in ("__main__", "__mp_main__") or owner.startswith("__ipython"):
        return False
    if not isinstance(value, _MUTABLE_CONTAINERS):
        import collections

        if not isinstance(value, collections.deque):
            return False
    module = sys.modules.get(owner)
    path = getattr(module, "__file__", None)
    return isinstance(path, str) and name in _empty_at_top_level(path)


_EMPTY_NAMES: dict[tuple, frozenset[str]] = {}


def _empty_at_top_level(path: str) -> frozenset[str]:
    """Names a module file binds to an empty container at its top level (read once per version of the file)."""
    import os

    try:
        st = os.stat(path)
    except OSError:
        return frozenset()
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _EMPTY_NAMES:
        names: set[str] = set()
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, ValueError):
            tree = ast.Module(body=[], type_ignores=[])
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
            value = getattr(node, "value", None)
            if value is not None and _is_empty_container(value):
                names.update(t.id for t in targets if isinstance(t, ast.Name))
        _EMPTY_NAMES[key] = frozenset(names)
    return _EMPTY_NAMES[key]


def _is_empty_container(node: ast.AST) -> bool:
    if isinstance(node, ast.Dict):
        return not node.keys
    if isinstance(node, (ast.List, ast.Set)):
        return not node.elts
    if isinstance(node, ast.Call) and not node.keywords:
        func = node.func
        called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
        if called not in _EMPTY_CONSTRUCTORS:
            return False
        return not node.args or (called == "defaultdict" and len(node.args) == 1)
    return False


def _is_callable_code(value: Any) -> bool:
    """Functions and the callables that stand for code: hashed by :meth:`Hasher.function`."""
    import functools

    return isinstance(
        value,
        (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial, functools._lru_cache_wrapper),
    ) or _is_named_library_callable(value)


def _is_named_library_callable(value: Any) -> bool:
    """A library's callable object that its import path names (a numpy ufunc, ``np.sum``'s
    dispatcher, a Cython function): it counts by that name and the library's version."""
    try:
        if isinstance(value, type) or not callable(value):
            return False
        module = getattr(value, "__module__", None)
        name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
        if not isinstance(module, str) or not isinstance(name, str) or is_user_module(module):
            return False
        target: Any = sys.modules.get(module)
        for part in name.split("."):
            target = getattr(target, part, None)
        return target is value
    except Exception:  # a property that raises, an odd proxy: not a named callable
        return False


def _closure(fn: types.FunctionType) -> tuple:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(cell.cell_contents)
        except ValueError:  # empty cell
            cells.append(None)
    return tuple(cells)


def _is_user_function(fn: types.FunctionType) -> bool:
    """User code by the module whose file holds the function's code: a library decorator's
    wrapper copies the user function's ``__module__`` (``functools.wraps``) but runs the
    library's code, and a user decorator's wrapper around a library function runs the user's.
    Code with no module file (a cell, ``exec``) goes by ``__module__``."""
    code_module = _module_of_file(fn.__code__.co_filename)
    return _is_user_code(fn) if code_module is None else is_user_module(code_module)


def _module_of_file(filename: str) -> str | None:
    """The imported module whose file is ``filename``; ``None`` for a cell or ``exec``'d code."""
    if filename.startswith("<"):
        return None
    if _FILE_MODULES.get("") != len(sys.modules):  # modules came or went: look again
        _FILE_MODULES.clear()
        _FILE_MODULES[""] = len(sys.modules)
    if filename not in _FILE_MODULES:
        _FILE_MODULES[filename] = None
        for name, module in list(sys.modules.items()):
            if getattr(module, "__file__", None) == filename:
                _FILE_MODULES[filename] = name
                break
    known = _FILE_MODULES[filename]
    return known if known is None or getattr(sys.modules.get(known), "__file__", None) == filename else None


_FILE_MODULES: dict[str, Any] = {}  # file -> module name, and "" -> len(sys.modules) when filled


def _library_name(obj: Any) -> tuple[str, str]:
    """A library callable or class by module and qualified name (never its repr or id)."""
    module = getattr(obj, "__module__", None)
    if not isinstance(module, str):
        module = getattr(type(obj), "__module__", "") or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return module, str(name)


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
    (_is_callable_code, Hasher.function),
    (lambda v: isinstance(v, enum.Enum), lambda h, v: (h.tag("enum"), h.str_(_qualname(type(v))), h.value(v.value))),
    (lambda v: isinstance(v, bool), lambda h, v: h.tag("True" if v else "False")),
    (lambda v: isinstance(v, int), _int),
    (lambda v: isinstance(v, float), _float),
    (lambda v: isinstance(v, str), _str),
]
