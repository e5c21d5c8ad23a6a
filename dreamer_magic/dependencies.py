"""What a step's body reads besides its inputs: traced while it runs, recorded, checked before a hit.

Usage::

    with trace(output_folder=out, cwd=os.getcwd()) as t:
        ...run the body...
    deps = t.record(declared_files=["a.csv", "data/"], source=cell_source)
    end = rng_end_state(deps["rng"])              # save next to the outputs when deps["rng"]
    step_json["dependencies"] = deps              # JSON-able

    # later, before a hit
    changes = check(step_json["dependencies"], cwd=os.getcwd())
    if changes:                                   # re-run; each Change says why in one line
        print(changes[0].text)                    # "file `data.csv` changed"
    else:
        restore_rng(end)                          # global RNGs exactly as after the run

What is traced (SPEC §3 *Dependencies*):

**Files read.** An audit hook (:func:`sys.addaudithook`, installed once per process, a no-op
unless a trace is active in the calling thread) sees every ``open`` (``open``, ``io.open``,
``os.open``, and the Python-level opens of numpy, pandas, ...), ``os.listdir``/``os.scandir``
(hence ``glob``, ``pathlib``'s ``iterdir``/``glob``, ``os.walk``). A file is recorded with its
path (relative to ``cwd`` when under it), size, ``mtime_ns`` and xxh3-128 content digest; a
listed folder with a digest of its names, kinds, sizes and mtimes. Not recorded: files under
the output folder, the standard library, site-packages, ``__pycache__``, ``/proc``, ``/dev``,
``/sys``, ``/etc``, ``/usr/share``, the IPython/Jupyter/matplotlib/Hugging Face/torch caches and
runtime folders, the files of imported modules (their code is tracked as code), what the import
system opens, and files the body opened for writing or renamed into place (its own products).
A file opened by native code (a C library reading by itself) is invisible: the caller declares
it (``declared_files``; a folder is declared recursively). Checking: same size and
``mtime_ns`` is unchanged without reading; a new mtime with the same digest is unchanged
(touched only still hits); a missing file is a change.

**User code that ran.** Code objects that start while tracing are collected
(``sys.monitoring`` PY_START, disabled after each code's first sight, on Python 3.12+;
``cProfile`` without builtins, a C-level profile hook of the calling thread, on 3.10/3.11).
User code is a function whose file is not in the standard library, not under site-packages,
not an IPython/ipykernel cell (cells are covered by the cell fingerprint) and not dreamer_magic
itself. Each is recorded with its module, qualname, file and the digest of its *loaded* code
object (bytecode, constants recursively, names; not line numbers), so an edited file that was
not reloaded still checks as unchanged. Module-level literal constants those functions name
(``THRESHOLD = 0.5``) are recorded too. Checking finds the module in ``sys.modules`` and the
code by qualname, or, when the module is not imported (a fresh kernel), compiles its file from
disk (the code that will run). Under another Python minor version bytecode differs, so the check
falls back to a digest of each function's source text (recorded when the file on disk was the
code that ran): upgrading Python does not re-run every step. Libraries count by distribution
version: the distributions whose Python code ran, and those the body imported.

**Global RNG state** of ``random``, ``np.random`` (the legacy global ``RandomState``) and
``torch`` (CPU; ``torch.cuda`` when initialised). A digest of each state is taken before and
after the body; if it differs the body drew, and the *start* digest becomes a dependency. A
body that seeds (``random.seed``, ``np.random.seed``, ``torch.manual_seed``, their
``setstate`` forms, so also ``transformers.set_seed``) before any draw does not depend on the
start state: the seeding functions are wrapped while tracing to notice this. A module the body
imports itself starts from OS entropy (numpy and torch seed themselves at import), which no
run can reproduce, so it is no dependency; its end state is still saved and restored. After a
hit, :func:`restore_rng` sets the end state saved with :func:`rng_end_state`.

**What cannot be tracked** is named, one line each, in ``record()["untracked"]``: network use
(audit events ``socket.getaddrinfo``, ``socket.connect``, ``urllib.Request``), subprocesses
(``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.posix_spawn``, ``os.spawn*``), and
environment variables read by the cell, found statically in its source
(:func:`untracked_in_source`; Python has no audit event for them).

API (all JSON-able in, JSON-able out):

* ``trace(output_folder=None, cwd=None, ignore=()) -> Trace``, a context manager; after it,
  ``Trace.record(declared_files=(), source=None) -> dict`` gives ``{"format", "python",
  "files", "folders", "code", "libraries", "rng", "untracked", "writes"}`` (``writes``: files
  the body left outside the output folder, which a hit does not recreate).
* ``check(recorded, cwd=None, *, first_only=False) -> list[Change]``; ``Change(kind, subject,
  text)`` with kind "file", "folder", "module", "library" or "rng".
* ``rng_end_state(names=None) -> dict`` and ``restore_rng(saved)``.
* ``untracked_in_source(source) -> list[str]``.

Threads and nesting: a trace covers the thread that entered it (the audit hook and the profile
hook filter by thread; background threads the body starts are not traced). Traces nest: a step
inside a step records its own reads, and the outer trace sees them too (they are merged into it
when the inner one exits). ``record`` and ``check`` pause tracing of their own reads.
"""

from __future__ import annotations

import array
import ast
import base64
import dataclasses
import os
import stat as _stat
import sys
import threading
import types
from typing import Any, Iterable

import xxhash

from .integrity import digest_file

__all__ = [
    "Change",
    "user_modules_reached",
    "Trace",
    "check",
    "restore_rng",
    "rng_end_state",
    "trace",
    "untracked_in_source",
]

FORMAT = 1
_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
_MAX_LISTED = 3  # hosts or commands named on one "untracked" line before "and N more"

_local = threading.local()  # .stack: list[Trace] of this thread; .paused: int
_active = 0  # traces active in all threads: the audit hook's one-load fast path
_threads_tracing = 0  # threads with at least one active trace
_lock = threading.Lock()
_hook_installed = False


# --------------------------------------------------------------------------- changes


@dataclasses.dataclass(frozen=True)
class Change:
    """One changed dependency: ``kind`` ("file", "folder", "module", "library", "rng"),
    ``subject`` (the path, ``module.qualname``, distribution or RNG name) and ``text``, the one
    line a user reads (``"file `data.csv` changed"``)."""

    kind: str
    subject: str
    text: str

    def __str__(self) -> str:
        return self.text


# --------------------------------------------------------------------------- paths


def _norm(path: str) -> str:
    return os.path.normpath(path)


def _home(*parts: str) -> str:
    return os.path.join(os.path.expanduser("~"), *parts)


_roots_cache: dict[str, tuple[str, ...]] = {}


def _library_roots() -> tuple[str, ...]:
    """Folders whose code is library code: the standard library and every site-packages."""
    if "lib" not in _roots_cache:
        import site
        import sysconfig

        paths = sysconfig.get_paths()
        found = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
        try:
            found.update(site.getsitepackages())
        except AttributeError:  # some embedded interpreters
            pass
        found.add(site.getusersitepackages() if hasattr(site, "getusersitepackages") else None)
        for entry in sys.path:  # site-packages / dist-packages added by .pth files or venvs
            if entry and os.path.basename(entry) in ("site-packages", "dist-packages"):
                found.add(entry)
        _roots_cache["lib"] = _as_roots(found)
    return _roots_cache["lib"]


def _site_roots() -> tuple[str, ...]:
    if "site" not in _roots_cache:
        _roots_cache["site"] = tuple(
            r for r in _library_roots() if os.path.basename(r.rstrip(os.sep)) in ("site-packages", "dist-packages")
        )
    return _roots_cache["site"]


def _as_roots(paths: Iterable[str | None]) -> tuple[str, ...]:
    out = set()
    for p in paths:
        if not p:
            continue
        for q in (os.path.abspath(p), os.path.realpath(p)):
            out.add(q.rstrip(os.sep) + os.sep)
    return tuple(sorted(out))


def _ignored_file_roots() -> tuple[str, ...]:
    """Folders whose files are never data a step depends on (runtime, caches, the system)."""
    if "files" not in _roots_cache:
        import tempfile

        env = os.environ.get
        cache = env("XDG_CACHE_HOME") or _home(".cache")
        found = [
            "/proc", "/dev", "/sys", "/etc", "/usr/share",
            sys.prefix and os.path.join(sys.prefix, "share", "jupyter"),
            sys.prefix and os.path.join(sys.prefix, "etc", "jupyter"),
            env("IPYTHONDIR") or _home(".ipython"),
            env("JUPYTER_CONFIG_DIR") or _home(".jupyter"),
            env("JUPYTER_DATA_DIR") or _home(".local", "share", "jupyter"),
            env("JUPYTER_RUNTIME_DIR"),
            env("MPLCONFIGDIR"), os.path.join(cache, "matplotlib"), _home(".config", "matplotlib"),
            os.path.join(cache, "fontconfig"),
            # Hugging Face and torch caches are content-addressed by repository and revision
            # (their identity is an input of the cell, and fetching them is network use)
            env("HF_HOME"), env("HF_HUB_CACHE"), env("HF_DATASETS_CACHE"), env("TRANSFORMERS_CACHE"),
            os.path.join(cache, "huggingface"), env("TORCH_HOME"), os.path.join(cache, "torch"),
        ]
        roots = _as_roots(found) + _library_roots()
        # ipykernel writes each cell's source to <tmp>/ipykernel_<pid>/<hash>.py
        roots += (os.path.join(tempfile.gettempdir(), "ipykernel_"),)
        _roots_cache["files"] = roots
    return _roots_cache["files"]


def _code_roots() -> tuple[str, ...]:
    """Folders whose code is not user code: libraries, ipykernel cells, dreamer_magic itself."""
    if "code" not in _roots_cache:
        import tempfile

        own = os.path.dirname(os.path.abspath(__file__))
        _roots_cache["code"] = (
            _library_roots() + _as_roots([own]) + (os.path.join(tempfile.gettempdir(), "ipykernel_"),)
        )
    return _roots_cache["code"]


def _is_user_file(filename: str) -> bool:
    if not filename or filename[0] == "<":  # <string>, <frozen os>, <ipython-input-...>
        return False
    return not os.path.abspath(filename).startswith(_code_roots())


def _display(path: str, cwd: str) -> str:
    """A path as stored and shown: relative to cwd (posix separators) when under it."""
    try:
        rel = os.path.relpath(path, cwd)
    except ValueError:  # another drive on Windows
        return path
    if rel == os.curdir:
        return "."
    if rel.startswith(os.pardir + os.sep) or rel == os.pardir:
        return path
    return rel.replace(os.sep, "/")


def _resolve(path: str, cwd: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cwd, path)


# --------------------------------------------------------------------------- the audit hook

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = frozenset({
    "open", "os.listdir", "os.scandir", "os.rename", "os.mkdir",
    "socket.getaddrinfo", "socket.connect", "urllib.Request",
    "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
})


def _path_arg(value: Any) -> str | None:
    if value is None:
        return os.getcwd()
    if isinstance(value, int):  # a file descriptor
        return None
    try:
        value = os.fsdecode(value)
    except TypeError:
        return None
    return value if os.path.isabs(value) else os.path.join(os.getcwd(), value)


def _caller_file(depth: int = 2) -> str:
    # called from the hook: frame 0 is this function, 1 the hook, 2 the code that raised the event
    try:
        return sys._getframe(depth).f_code.co_filename
    except ValueError:
        return ""


# importlib.metadata lists every sys.path entry (the working directory too) looking for *.dist-info
_IMPORTLIB = os.path.join(os.path.dirname(os.__file__), "importlib", "")


def _from_import_system() -> bool:
    caller = _caller_file(3)
    return caller.startswith("<frozen importlib") or caller.startswith(_IMPORTLIB)


def _audit(event: str, args: tuple) -> None:
    if not _active or event not in _EVENTS:
        return
    stack = getattr(_local, "stack", None)
    if not stack or getattr(_local, "paused", 0):
        return
    t = stack[-1]
    try:
        if event == "open":
            path = _path_arg(args[0]) if args[0] is not None else None
            if path is None:
                return
            mode, flags = args[1], args[2]
            if mode is not None:
                writes = any(c in mode for c in "wax+")
            else:
                writes = bool((flags or 0) & _WRITE_FLAGS)
            if writes:
                t._written.add(path)
            elif not _from_import_system():
                t._read.setdefault(path, None)
        elif event in ("os.listdir", "os.scandir"):
            path = _path_arg(args[0] if args else None)
            if path is not None and not _from_import_system():
                t._listed.setdefault(path, None)
        elif event == "os.rename":
            path = _path_arg(args[1])
            if path is not None:
                t._written.add(path)
        elif event == "os.mkdir":
            path = _path_arg(args[0])
            if path is not None:
                t._written.add(path)
        elif event == "socket.getaddrinfo":
            host = args[0]
            if isinstance(host, bytes):
                host = host.decode(errors="replace")
            if host:
                t._hosts.setdefault(f"{host}:{args[1]}" if args[1] else str(host), None)
        elif event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and len(address) >= 2:  # AF_INET/AF_INET6, not AF_UNIX
                t._connects.setdefault(f"{address[0]}:{address[1]}", None)
        elif event == "urllib.Request":
            from urllib.parse import urlsplit

            t._hosts.setdefault(urlsplit(str(args[0])).netloc or str(args[0]), None)
        elif event == "subprocess.Popen":
            argv = args[1]
            if isinstance(argv, (list, tuple)):
                argv = " ".join(os.fsdecode(a) if isinstance(a, (bytes, os.PathLike)) else str(a) for a in argv)
            t._commands.setdefault(str(argv if argv is not None else args[0]), None)
        elif event == "os.system":
            command = args[0]
            t._commands.setdefault(os.fsdecode(command) if isinstance(command, bytes) else str(command), None)
        elif event in ("os.exec", "os.posix_spawn", "os.spawn"):
            if os.path.basename(_caller_file()) == "subprocess.py":
                return  # the Popen above already named it (3.13 spawns through posix_spawn)
            path = args[1] if event == "os.spawn" else args[0]
            t._commands.setdefault(os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path), None)
    except Exception:  # an audit hook must never break the user's code
        pass


def _install_hook() -> None:
    global _hook_installed
    with _lock:
        if not _hook_installed:
            sys.addaudithook(_audit)
            _hook_installed = True


class _paused:
    """Tracing of this thread ignores what happens inside (record/check reading files)."""

    def __enter__(self) -> None:
        _local.paused = getattr(_local, "paused", 0) + 1

    def __exit__(self, *exc: Any) -> None:
        _local.paused -= 1


# --------------------------------------------------------------------------- code collection

_MONITORING = sys.version_info >= (3, 12)
_tool_id: int | None = None
_monitor_users = 0


def _monitor_callback(code: types.CodeType, offset: int) -> Any:
    stack = getattr(_local, "stack", None)
    if not stack:
        return None  # another thread: keep the event for the traced one
    stack[-1]._codes.add(code)
    # DISABLE is process-wide; with two threads tracing at once, keep seeing every start
    return sys.monitoring.DISABLE if _threads_tracing == 1 else None


def _monitor_start() -> bool:
    """Start PY_START monitoring (3.12+); False when every free tool id is taken."""
    global _tool_id, _monitor_users
    mon = sys.monitoring
    with _lock:
        if _tool_id is None:
            for candidate in (4, 3):
                if mon.get_tool(candidate) is None:
                    mon.use_tool_id(candidate, "dreamer_magic")
                    mon.register_callback(candidate, mon.events.PY_START, _monitor_callback)
                    _tool_id = candidate
                    break
            else:
                return False
        if _monitor_users == 0:
            mon.set_events(_tool_id, mon.events.PY_START)
        _monitor_users += 1
    mon.restart_events()  # codes disabled by an earlier trace are seen again by this one
    return True


def _monitor_stop() -> None:
    global _monitor_users
    with _lock:
        _monitor_users -= 1
        if _monitor_users == 0 and _tool_id is not None:
            sys.monitoring.set_events(_tool_id, 0)


# --------------------------------------------------------------------------- RNG states


def _feed_state(h: Any, value: Any) -> None:
    """Digest an RNG state (nested tuples/dicts of ints, floats, arrays, tensors)."""
    if isinstance(value, dict):
        h.update(b"{")
        for k in sorted(value, key=str):
            h.update(str(k).encode() + b":")
            _feed_state(h, value[k])
        h.update(b"}")
    elif isinstance(value, (tuple, list)):
        if len(value) > 16 and all(type(item) is int for item in value):  # random's 625 words
            try:
                h.update(b"I%d" % len(value) + array.array("Q", value).tobytes())
                return
            except OverflowError:  # negative or wider than 64 bits: the general path below
                pass
        h.update(b"(%d" % len(value))
        for item in value:
            _feed_state(h, item)
        h.update(b")")
    elif hasattr(value, "tobytes") and hasattr(value, "dtype"):  # numpy array
        h.update(b"A" + str(value.dtype).encode() + value.tobytes())
    elif type(value).__module__.startswith("torch"):
        h.update(b"T" + value.cpu().numpy().tobytes())
    else:
        h.update(b"V" + repr(value).encode())


def _rng_states(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The current raw global RNG states of the generators that exist in this process."""
    import random

    wanted = None if names is None else set(names)
    states: dict[str, Any] = {}
    if wanted is None or "random" in wanted:
        states["random"] = random.getstate()
    np_random = sys.modules.get("numpy.random")
    if wanted is not None and "np.random" not in wanted:
        np_random = None
    if np_random is not None and hasattr(np_random, "mtrand"):
        try:
            states["np.random"] = np_random.mtrand._rand.get_state(legacy=False)
        except Exception:
            pass
    torch = sys.modules.get("torch")
    if wanted is not None and not wanted & {"torch", "torch.cuda"}:
        torch = None
    if torch is not None and hasattr(torch, "random") and hasattr(torch.random, "get_rng_state"):
        if wanted is None or "torch" in wanted:
            states["torch"] = torch.random.get_rng_state()
        try:
            if (wanted is None or "torch.cuda" in wanted) and torch.cuda.is_initialized():
                states["torch.cuda"] = torch.cuda.get_rng_state_all()
        except Exception:
            pass
    return states


def _state_digest(state: Any) -> str:
    h = xxhash.xxh3_128()
    _feed_state(h, state)
    return h.hexdigest()


def _rng_digests(names: Iterable[str] | None = None) -> dict[str, str]:
    return {name: _state_digest(state) for name, state in _rng_states(names).items()}


# The functions that set a global RNG's state outright: wrapped while any trace is active so a
# body that seeds before drawing does not depend on the start state.
_SEEDERS = {  # generators a call sets -> (module, function names)
    ("random",): [("random", ("seed", "setstate"))],
    ("np.random",): [("numpy.random", ("seed", "set_state")), ("numpy.random.mtrand", ("seed", "set_state"))],
    ("torch",): [("torch", ("set_rng_state",)), ("torch.random", ("set_rng_state",))],
    ("torch", "torch.cuda"): [("torch", ("manual_seed", "seed")), ("torch.random", ("manual_seed", "seed"))],
}
_patched: list[tuple[Any, str, Any]] = []
_seeder_users = 0


def _seed_wrapper(rngs: tuple[str, ...], original: Any) -> Any:
    def seeding(*args: Any, **kwargs: Any) -> Any:
        stack = getattr(_local, "stack", None)
        if stack:
            pending = [(t, r) for t in stack for r in rngs if r in t._rng_start and r not in t._rng_seeded]
            if pending:
                with _paused():
                    now = _rng_digests({r for _, r in pending})
                for t, r in pending:
                    # untouched since the trace began: the start state cannot matter any more
                    t._rng_seeded[r] = now.get(r) == t._rng_start[r]
        return original(*args, **kwargs)

    seeding.__wrapped__ = original  # type: ignore[attr-defined]
    seeding.__name__ = getattr(original, "__name__", "seed")
    seeding.__qualname__ = getattr(original, "__qualname__", seeding.__name__)
    seeding.__doc__ = getattr(original, "__doc__", None)
    return seeding


def _patch_seeders() -> None:
    global _seeder_users
    with _lock:
        _seeder_users += 1
        if _seeder_users > 1:
            return
        for rngs, places in _SEEDERS.items():
            for module_name, names in places:
                module = sys.modules.get(module_name)
                if module is None:
                    continue
                for name in names:
                    original = getattr(module, name, None)
                    if original is None or getattr(original, "__name__", "") == "seeding":
                        continue
                    setattr(module, name, _seed_wrapper(rngs, original))
                    _patched.append((module, name, original))


def _unpatch_seeders() -> None:
    global _seeder_users
    with _lock:
        _seeder_users -= 1
        if _seeder_users:
            return
        while _patched:
            module, name, original = _patched.pop()
            setattr(module, name, original)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tobytes") and hasattr(value, "dtype") and hasattr(value, "shape"):
        return {"__array__": base64.b64encode(value.tobytes()).decode(), "dtype": str(value.dtype),
                "shape": list(value.shape)}
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy scalar
        return value.item()
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "__array__" in value:
            import numpy as np

            data = base64.b64decode(value["__array__"])
            return np.frombuffer(data, dtype=value["dtype"]).reshape(value["shape"]).copy()
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def rng_end_state(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The global RNG states now, JSON-able, to save after a body that drew.

    Examples
    --------
    >>> deps = t.record()
    >>> saved = rng_end_state(deps["rng"])     # only the generators the body drew from
    >>> restore_rng(saved)                     # on a later hit

    Parameters
    ----------
    names
        Which generators ("random", "np.random", "torch", "torch.cuda"); all that exist when
        None. A name whose library is not imported is left out.
    """
    wanted = None if names is None else set(names)
    if wanted is not None and "torch" in wanted:
        wanted.add("torch.cuda")
    out: dict[str, Any] = {}
    with _paused():
        for name, state in _rng_states().items():
            if wanted is not None and name not in wanted:
                continue
            if name == "random":
                version, internal, gauss = state
                out[name] = {"version": version, "state": list(internal), "gauss": gauss}
            elif name == "np.random":
                out[name] = _jsonable(state)
            elif name == "torch":
                out[name] = base64.b64encode(state.numpy().tobytes()).decode()
            elif name == "torch.cuda":
                out[name] = [base64.b64encode(s.cpu().numpy().tobytes()).decode() for s in state]
    return out


def restore_rng(saved: dict[str, Any]) -> None:
    """Set the global RNGs to a state saved by :func:`rng_end_state` (after a hit).

    Examples
    --------
    >>> restore_rng(saved)
    >>> random.random() == value_drawn_next_after_the_run
    True

    numpy and torch are imported when the saved state names them (the body used them).
    """
    for name, state in saved.items():
        if name == "random":
            import random

            random.setstate((state["version"], tuple(state["state"]), state["gauss"]))
        elif name == "np.random":
            import numpy as np

            np.random.mtrand._rand.set_state(_from_jsonable(state))
        elif name == "torch":
            import torch

            torch.random.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state)), dtype=torch.uint8))
        elif name == "torch.cuda":
            import torch

            if torch.cuda.is_available():
                for device, s in enumerate(state[: torch.cuda.device_count()]):
                    torch.cuda.set_rng_state(
                        torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8), device
                    )


# --------------------------------------------------------------------------- code digests

_CO_OPTIMIZED = 0x0001  # functions, lambdas, comprehensions; not module or class bodies


def _feed_const(h: Any, value: Any) -> None:
    t = type(value)
    if t is types.CodeType:
        _feed_code(h, value)
    elif t is str:
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(data) + data)
    elif t is bytes:
        h.update(b"b%d:" % len(value) + value)
    elif t is tuple:
        h.update(b"t%d(" % len(value))
        for item in value:
            _feed_const(h, item)
        h.update(b")")
    elif t is frozenset:  # iteration order depends on string hashing: sort the members' digests
        digests = sorted(_const_digest(item) for item in value)
        h.update(b"f%d(" % len(value) + "".join(digests).encode() + b")")
    else:  # None, Ellipsis, bool, int, float, complex
        h.update(t.__name__.encode() + b"=" + repr(value).encode() + b";")


def _const_digest(value: Any) -> str:
    h = xxhash.xxh3_128()
    _feed_const(h, value)
    return h.hexdigest()


def _feed_code(h: Any, code: types.CodeType) -> None:
    h.update(b"code(")
    h.update(b"%d,%d,%d,%d," % (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags & ~0x10))
    for names in (code.co_names, code.co_varnames, code.co_freevars, code.co_cellvars, (code.co_name,)):
        h.update("\0".join(names).encode("utf-8", "surrogatepass") + b"|")
    h.update(code.co_code)
    table = getattr(code, "co_exceptiontable", None)  # 3.11+: offsets, not line numbers
    if table:
        h.update(b"x" + table)
    h.update(b"consts")
    for const in code.co_consts:
        _feed_const(h, const)
    h.update(b")")


def _code_digest(code: types.CodeType) -> str:
    h = xxhash.xxh3_128()
    _feed_code(h, code)
    return h.hexdigest()


def _nested_codes(code: types.CodeType) -> Iterable[types.CodeType]:
    for const in code.co_consts:
        if type(const) is types.CodeType:
            yield const
            yield from _nested_codes(const)


def _child_qualname(parent: str, parent_is_function: bool, child: types.CodeType) -> str:
    qualname = getattr(child, "co_qualname", None)
    if qualname is not None:
        return qualname
    if not parent:
        return child.co_name
    return f"{parent}.<locals>.{child.co_name}" if parent_is_function else f"{parent}.{child.co_name}"


def _index_compiled(module_code: types.CodeType) -> dict[str, list[types.CodeType]]:
    """qualname -> code objects of a module compiled from source (the code that would run)."""
    index: dict[str, list[types.CodeType]] = {}

    def walk(code: types.CodeType, qualname: str, is_function: bool) -> None:
        for const in code.co_consts:
            if type(const) is types.CodeType:
                child = _child_qualname(qualname, is_function, const)
                child_is_function = bool(const.co_flags & _CO_OPTIMIZED)
                if child_is_function:
                    index.setdefault(child, []).append(const)
                walk(const, child, child_is_function)

    walk(module_code, "", False)
    return index


def _index_loaded(module: types.ModuleType, filename: str) -> dict[str, list[types.CodeType]]:
    """qualname -> code objects reachable from an imported module (functions, methods,
    properties, static/class methods, decorated functions, and what they define inside)."""
    index: dict[str, list[types.CodeType]] = {}
    seen: set[int] = set()
    target = os.path.abspath(filename)
    name = module.__name__

    def add_code(code: types.CodeType, qualname: str) -> None:
        if id(code) in seen or os.path.abspath(code.co_filename) != target:
            return
        seen.add(id(code))
        index.setdefault(qualname, []).append(code)

        def walk(parent: types.CodeType, parent_qual: str) -> None:
            for child in parent.co_consts:
                if type(child) is types.CodeType and child.co_flags & _CO_OPTIMIZED:
                    child_qual = _child_qualname(parent_qual, True, child)
                    if id(child) not in seen:
                        seen.add(id(child))
                        index.setdefault(child_qual, []).append(child)
                    walk(child, child_qual)

        walk(code, qualname)

    def visit(obj: Any, depth: int = 0) -> None:
        if depth > 20 or id(obj) in seen:
            return
        if isinstance(obj, (staticmethod, classmethod)):
            visit(obj.__func__, depth + 1)
        elif isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    visit(f, depth + 1)
        elif isinstance(obj, types.FunctionType):
            code = obj.__code__
            qualname = getattr(code, "co_qualname", None)
            if qualname is None:  # 3.10: the function's qualname, unless copied by functools.wraps
                qualname = obj.__qualname__
                if qualname.rsplit(".", 1)[-1] != code.co_name:
                    qualname = code.co_name
            add_code(code, qualname)
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:
                visit(wrapped, depth + 1)
        elif isinstance(obj, type):
            if getattr(obj, "__module__", None) != name:
                return
            seen.add(id(obj))
            for value in list(vars(obj).values()):
                visit(value, depth + 1)
        elif isinstance(obj, (dict, list, tuple)) and depth < 2:  # HANDLERS = {"a": lambda ...}
            seen.add(id(obj))
            for item in list(obj.values() if isinstance(obj, dict) else obj)[:1000]:
                visit(item, depth + 1)
        elif not isinstance(obj, types.ModuleType):
            wrapped = getattr(obj, "__wrapped__", None)
            func = getattr(obj, "func", None)  # functools.cached_property, partialmethod
            for inner in (wrapped, func):
                if isinstance(inner, types.FunctionType):
                    visit(inner, depth + 1)

    for key, value in list(vars(module).items()):
        if key.startswith("__") and not isinstance(value, types.FunctionType):
            continue  # __builtins__, __spec__, __loader__...; a module __getattr__ still counts
        try:
            visit(value)
        except Exception:  # an object with hostile attribute access: skip it
            continue
    return index


def _compile_file(path: str) -> tuple[types.CodeType, str] | None:
    try:
        with open(path, "rb") as f:
            source_bytes = f.read()
        source = source_bytes.decode("utf-8", "surrogateescape")
        return compile(source_bytes, path, "exec", dont_inherit=True), source
    except (OSError, SyntaxError, ValueError):
        return None


def _named_qualname(qualname: str) -> str:
    """The nearest named def or class of a qualname (lambdas and comprehensions have no node)."""
    parts = qualname.split(".")
    while parts and parts[-1].startswith("<"):
        parts.pop()
        if parts and parts[-1] == "<locals>":
            parts.pop()
    return ".".join(parts)


def _source_index(source: str) -> dict[str, list[str]]:
    """qualname -> source segments of each def/class with that qualname (AST positions are the
    same across Python versions, unlike bytecode)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return {}
    lines = source.splitlines(keepends=True)
    index: dict[str, list[str]] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                qualname = prefix + child.name
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                segment = "".join(lines[start - 1 : child.end_lineno])
                index.setdefault(qualname, []).append(segment)
                inner = qualname + (".<locals>." if not isinstance(child, ast.ClassDef) else ".")
                walk(child, inner)
            else:
                walk(child, prefix)

    walk(tree, "")
    return index


def _source_digest(index: dict[str, list[str]], qualname: str) -> str | None:
    segments = index.get(_named_qualname(qualname))
    if not segments:
        return None
    h = xxhash.xxh3_128()
    for s in segments:
        h.update(s.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _literal_assignments(source: str) -> dict[str, Any]:
    """Top-level ``NAME = <literal>`` of a module's source (the last one wins)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return {}
    found: dict[str, Any] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        value = None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        for target in targets:
            if isinstance(target, ast.Name):
                try:
                    found[target.id] = ast.literal_eval(value)
                except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                    found.pop(target.id, None)
    return found


def _literal_digest(value: Any, depth: int = 0) -> str | None:
    """A digest of a plain literal value (what ``ast.literal_eval`` gives), else None."""
    if depth > 10:
        return None
    t = type(value)
    h = xxhash.xxh3_128()
    if value is None or t in (bool, int, float, complex, str, bytes):
        h.update(t.__name__.encode() + b"=" + repr(value).encode("utf-8", "surrogatepass"))
    elif t in (tuple, list):
        h.update(t.__name__.encode() + b"(")
        for item in value:
            d = _literal_digest(item, depth + 1)
            if d is None:
                return None
            h.update(d.encode())
        h.update(b")")
    elif t in (set, frozenset):
        parts = [_literal_digest(item, depth + 1) for item in value]
        if None in parts:
            return None
        h.update(b"set(" + "".join(sorted(parts)).encode() + b")")  # type: ignore[arg-type]
    elif t is dict:
        h.update(b"dict(")
        for k, v in value.items():
            dk, dv = _literal_digest(k, depth + 1), _literal_digest(v, depth + 1)
            if dk is None or dv is None:
                return None
            h.update(dk.encode() + dv.encode())
        h.update(b")")
    else:
        return None
    return h.hexdigest()


# --------------------------------------------------------------------------- libraries

_dists_cache: dict[str, Any] = {}


def _site_stamp() -> tuple:
    """Changes when a distribution is installed or removed (site-packages' mtimes)."""
    stamp = []
    for root in _site_roots():
        try:
            stamp.append(os.stat(root).st_mtime_ns)
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def _dist_cache() -> dict[str, Any]:
    """Per-process answers about installed distributions, dropped when site-packages change."""
    stamp = _site_stamp()
    if _dists_cache.get("stamp") != stamp:
        _dists_cache.clear()
        _dists_cache.update(stamp=stamp, versions={}, owners={})
    return _dists_cache


def _dist_version(dist: str) -> str | None:
    versions = _dist_cache()["versions"]
    if dist not in versions:
        import importlib.metadata as md

        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    return versions[dist]


def _owners(top: str, root: str) -> list[str]:
    """The distributions that provide top-level module ``top`` installed in site folder ``root``.
    A distribution of the same name is taken at its word; other names (``sklearn``, ``PIL``,
    ``yaml``) are looked up in the ``top_level.txt``/``RECORD`` files of ``root``'s
    distributions (as text: ``packages_distributions()`` parses every one and takes ~0.5 s)."""
    cache = _dist_cache()
    owners = cache["owners"]
    if top not in owners:
        import importlib.metadata as md

        try:
            dist = md.distribution(top)
            owners[top] = [dist.metadata["Name"] or top]
            cache["versions"].setdefault(owners[top][0], dist.version)
        except md.PackageNotFoundError:
            owners[top] = _owners_in(top, root)
    return owners[top]


def _owners_in(top: str, root: str) -> list[str]:
    import importlib.metadata as md

    found = []
    markers = (f"{top}/", f"{top}.py,", f"{top}.")
    try:
        infos = [e.path for e in os.scandir(root) if e.name.endswith(".dist-info")]
    except OSError:
        return []
    for info in sorted(infos):
        owns = False
        for name in ("top_level.txt", "RECORD"):
            try:
                with open(os.path.join(info, name), encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue
            if name == "top_level.txt":
                owns = top in text.split()
            else:
                owns = any(line.startswith(markers) for line in text.splitlines())
            break
        if owns:
            dist = md.Distribution.at(info)
            name = dist.metadata["Name"]
            if name:
                found.append(name)
                _dist_cache()["versions"].setdefault(name, dist.version)
    return found


def _top_level_of_file(filename: str) -> tuple[str, str] | None:
    """(top-level module name, site folder) of a file under site-packages."""
    path = os.path.abspath(filename)
    for root in _site_roots():
        if path.startswith(root):
            first = path[len(root):].split(os.sep, 1)[0]
            top = first.split(".", 1)[0]
            return (top, root.rstrip(os.sep)) if top else None
    return None


# import-machinery helpers that run during any import, whatever the body does
_NOT_LIBRARIES = frozenset({"_distutils_hack", "__editable__", "_virtualenv"})
# the notebook's own machinery, which runs around every cell (display, output capture, the
# kernel's threads) without shaping what a step computes; dreamer_magic is in the fingerprint
RUNTIME_DISTRIBUTIONS = frozenset({
    "dreamer_magic", "ipython", "ipykernel", "ipywidgets", "widgetsnbextension", "traitlets", "comm",
    "jupyter_client", "jupyter-client", "jupyter_core", "jupyter-core", "pyzmq", "tornado", "debugpy",
    "matplotlib-inline", "matplotlib_inline", "prompt_toolkit", "prompt-toolkit", "executing", "stack-data",
    "stack_data", "asttokens", "pure-eval", "pure_eval", "decorator", "pygments", "Pygments", "parso", "jedi",
    "wcwidth", "pexpect", "ptyprocess", "nest-asyncio", "nest_asyncio", "psutil", "setuptools", "pip",
})


def _distributions(top_levels: Iterable[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for top, root in top_levels:
        if top in _NOT_LIBRARIES or top.startswith("__editable__"):
            continue
        for dist in _owners(top, root):
            if dist in RUNTIME_DISTRIBUTIONS:
                continue
            version = _dist_version(dist)
            if version is not None:
                out[dist] = version
    return out


# --------------------------------------------------------------------------- files


def _file_entry(path: str, cwd: str, declared: bool = False) -> dict[str, Any] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not _stat.S_ISREG(st.st_mode):
        return None
    try:
        digest = digest_file(path)
    except OSError:
        return None
    entry: dict[str, Any] = {"path": _display(path, cwd), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                             "digest": digest}
    if declared:
        entry["declared"] = True
    return entry


def _listing(path: str, recursive: bool) -> tuple[int, str, str] | None:
    """(entries, digest of names/kinds/sizes/mtimes, digest of names/kinds/sizes) of a folder."""
    rows: list[tuple[str, str, int, int]] = []

    def scan(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            for e in it:
                try:
                    st = e.stat()
                except OSError:
                    continue
                is_dir = _stat.S_ISDIR(st.st_mode)
                rows.append((prefix + e.name, "d" if is_dir else "f", 0 if is_dir else st.st_size,
                             0 if is_dir else st.st_mtime_ns))
                if recursive and is_dir and not e.is_symlink():
                    scan(e.path, prefix + e.name + "/")

    try:
        scan(path, "")
    except OSError:
        return None
    rows.sort()
    full, names = xxhash.xxh3_128(), xxhash.xxh3_128()
    for name, kind, size, mtime in rows:
        names.update(f"{name}\0{kind}\0{size}\n".encode("utf-8", "surrogateescape"))
        full.update(f"{name}\0{kind}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return len(rows), full.hexdigest(), names.hexdigest()


def _folder_entry(path: str, cwd: str, recursive: bool = False, declared: bool = False) -> dict[str, Any] | None:
    listing = _listing(path, recursive)
    if listing is None:
        return None
    entries, digest, names = listing
    entry: dict[str, Any] = {"path": _display(path, cwd), "entries": entries, "digest": digest, "names": names}
    if recursive:
        entry["recursive"] = True
    if declared:
        entry["declared"] = True
    return entry


# --------------------------------------------------------------------------- the trace


class Trace:
    """What one run of a body read; made by :func:`trace`, read with :meth:`record`."""

    def __init__(self, output_folder: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 ignore: Iterable[str | os.PathLike] = (), code: bool | None = None) -> None:
        self.watch_code = _MONITORING if code is None else bool(code)
        self.cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        extra = [os.fspath(output_folder)] if output_folder is not None else []
        extra += [os.fspath(p) for p in ignore]
        self._ignore = _as_roots(_resolve(p, self.cwd) for p in extra)
        self._read: dict[str, None] = {}      # insertion-ordered sets
        self._listed: dict[str, None] = {}
        self._written: set[str] = set()
        self._hosts: dict[str, None] = {}
        self._connects: dict[str, None] = {}
        self._commands: dict[str, None] = {}
        self._codes: set[types.CodeType] = set()
        self._code_note: str | None = None
        self._profiler: Any = None
        self._monitoring = False
        self._modules_before: set[str] = set()
        self._modules_after: set[str] = set()
        self._rng_start: dict[str, str] = {}
        self._rng_end: dict[str, str] = {}
        self._rng_seeded: dict[str, bool] = {}  # rng -> seeded before any draw
        self._open = False
        self._finished = False

    # -- lifecycle
    def __enter__(self) -> Trace:
        global _active, _threads_tracing
        if self._open or self._finished:
            raise RuntimeError("a Trace runs once")
        _install_hook()
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        parent = stack[-1] if stack else None
        with _paused():
            self._modules_before = set(sys.modules)
            self._rng_start = _rng_digests()
        _patch_seeders()
        # code collection
        if not self.watch_code:
            pass
        elif _MONITORING:
            self._monitoring = _monitor_start()
            if not self._monitoring:
                self._code_note = ("functions outside the notebook: not tracked "
                                   "(no free sys.monitoring tool id)")
        else:
            current = sys.getprofile()
            if current is not None and (parent is None or parent._profiler is None):
                self._code_note = ("functions outside the notebook: not tracked "
                                   "(another profiler is active)")
            else:
                import cProfile

                if parent is not None and parent._profiler is not None:
                    parent._profiler.disable()
                self._profiler = cProfile.Profile(builtins=False)
        with _lock:
            _active += 1
            if not stack:
                _threads_tracing += 1
        stack.append(self)
        self._open = True
        if self._profiler is not None:
            self._profiler.enable()
        return self

    def __exit__(self, *exc: Any) -> None:
        global _active, _threads_tracing
        if self._profiler is not None:
            if sys.getprofile() is not self._profiler:  # the body started its own (%prun)
                self._code_note = ("functions outside the notebook: partly tracked "
                                   "(the body replaced the trace's profile hook)")
            self._profiler.disable()
        stack = _local.stack
        assert stack and stack[-1] is self, "traces must exit in the order they were entered"
        stack.pop()
        with _lock:
            _active -= 1
            if not stack:
                _threads_tracing -= 1
        if self._monitoring:
            _monitor_stop()
        _unpatch_seeders()
        with _paused():
            if self._profiler is not None:
                self._codes.update(e.code for e in self._profiler.getstats() if type(e.code) is types.CodeType)
                self._profiler = None
            self._rng_end = _rng_digests()
            self._modules_after = set(sys.modules)
        self._open = False
        self._finished = True
        parent = stack[-1] if stack else None
        if parent is not None:
            parent._merge(self)
            if parent._profiler is not None:
                parent._profiler.enable()

    def _merge(self, inner: Trace) -> None:
        for path in inner._read:
            self._read.setdefault(path, None)
        for path in inner._listed:
            self._listed.setdefault(path, None)
        self._written |= inner._written
        self._hosts.update(inner._hosts)
        self._connects.update(inner._connects)
        self._commands.update(inner._commands)
        self._codes |= inner._codes

    # -- the record
    def record(self, declared_files: Iterable[str | os.PathLike] = (), source: str | None = None,
               modules: Iterable[str] = ()) -> dict[str, Any]:
        """The dependencies of the run, JSON-able, for ``step.json["dependencies"]``.

        Examples
        --------
        >>> with trace(output_folder="output") as t:
        ...     text = open("data.csv").read()
        >>> t.record()["files"]
        [{'path': 'data.csv', 'size': 12, 'mtime_ns': ..., 'digest': '...'}]

        Parameters
        ----------
        declared_files
            Files and folders the body reads that a trace cannot see (``--files``), relative to
            ``cwd``; a folder counts with everything under it. A declared path that does not
            exist is recorded as missing (its appearance is a change).
        source
            The cell's source, to name the environment variables it reads (``untracked``).
        modules
            User modules whose every function counts, whether it ran or not (the static
            record used where functions are not watched; see :func:`user_modules_reached`).

        Returns
        -------
        dict
            ``{"format", "python", "files": [...], "folders": [...], "code": [...],
            "libraries": {dist: version}, "rng": {name: {"start": digest | None}},
            "untracked": [line, ...], "writes": [path, ...]}``. ``rng`` names the generators the
            body drew from (save their :func:`rng_end_state`); ``start`` None means the start
            state does not matter (seeded in the body, or imported by it).
        """
        if not self._finished:
            raise RuntimeError("record() comes after the traced body has finished")
        with _paused():
            files, folders = self._record_files(declared_files)
            code, libraries = self._record_code(modules)
            untracked = self._record_untracked(source)
            writes = sorted(
                _display(p, self.cwd) for p in self._written
                if not self._skip_file(p) and os.path.isfile(p)
            )
            return {
                "format": FORMAT,
                "python": _PYTHON,
                "files": files,
                "folders": folders,
                "code": code,
                "libraries": libraries,
                "rng": self._record_rng(),
                "untracked": untracked,
                "writes": writes,
            }

    def _skip_file(self, path: str) -> bool:
        path = _norm(path)
        if path.startswith(self._ignore) or path.startswith(_ignored_file_roots()):
            return True
        if "__pycache__" in path.split(os.sep):
            return True
        real = os.path.realpath(path)
        return real != path and (real.startswith(self._ignore) or real.startswith(_ignored_file_roots()))

    def _record_files(self, declared: Iterable[str | os.PathLike]) -> tuple[list[dict], list[dict]]:
        module_files = set()
        for module in list(sys.modules.values()):
            f = getattr(module, "__file__", None)
            if isinstance(f, str):
                module_files.add(_norm(os.path.abspath(f)))
        written = {_norm(p) for p in self._written}
        files: dict[str, dict] = {}
        folders: dict[str, dict] = {}
        for raw in self._read:
            path = _norm(raw)
            if path in written or path in module_files or self._skip_file(path):
                continue
            entry = _file_entry(path, self.cwd)
            if entry is not None:
                files.setdefault(entry["path"], entry)
        for raw in self._listed:
            path = _norm(raw)
            if path in written or self._skip_file(path):
                continue
            entry = _folder_entry(path, self.cwd)
            if entry is not None:
                folders.setdefault(entry["path"], entry)
        for item in declared:
            path = _norm(_resolve(os.fspath(item), self.cwd))
            if os.path.isdir(path):
                entry = _folder_entry(path, self.cwd, recursive=True, declared=True)
                if entry is not None:
                    folders[entry["path"]] = entry
                for folder, _dirs, names in os.walk(path):
                    for name in sorted(names):
                        fe = _file_entry(os.path.join(folder, name), self.cwd, declared=True)
                        if fe is not None:
                            files[fe["path"]] = fe
            else:
                fe = _file_entry(path, self.cwd, declared=True)
                if fe is None:
                    fe = {"path": _display(path, self.cwd), "missing": True, "declared": True}
                files[fe["path"]] = fe
        return list(files.values()), list(folders.values())

    def _record_code(self, modules: Iterable[str] = ()) -> tuple[list[dict], dict[str, str]]:
        by_file: dict[str, list[types.CodeType]] = {}
        library_tops: set[tuple[str, str]] = set()
        for name in modules:  # statically reached: every function of the module counts
            module = sys.modules.get(name)
            f = getattr(module, "__file__", None)
            if module is None or not isinstance(f, str) or not f.endswith(".py") or not _is_user_file(f):
                continue
            path = os.path.abspath(f)
            for codes in _index_loaded(module, path).values():
                by_file.setdefault(path, []).extend(codes)
        for code in self._codes:
            filename = code.co_filename
            if not (code.co_flags & _CO_OPTIMIZED) or not filename or filename[0] == "<":
                continue
            if _is_user_file(filename):
                by_file.setdefault(os.path.abspath(filename), []).append(code)
            else:
                top = _top_level_of_file(filename)
                if top:
                    library_tops.add(top)
        for name in self._modules_after - self._modules_before:  # imported by the body
            f = getattr(sys.modules.get(name), "__file__", None)
            top = _top_level_of_file(f) if isinstance(f, str) else None
            if top:
                library_tops.add(top)
        modules_by_file: dict[str, str] = {}
        for name, module in list(sys.modules.items()):
            f = getattr(module, "__file__", None)
            if isinstance(f, str) and f.endswith(".py"):
                modules_by_file.setdefault(os.path.abspath(f), name)
        entries = []
        for path in sorted(by_file):
            entry = _code_entry(path, by_file[path], modules_by_file.get(path), self.cwd)
            if entry is not None:
                entries.append(entry)
        libraries = dict(sorted(_distributions(library_tops).items()))
        return entries, libraries

    def _record_rng(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for name, end in self._rng_end.items():
            start = self._rng_start.get(name)
            if start is None:
                # first imported (numpy, torch) or initialised (CUDA) by the body: it started
                # from OS entropy, which no run reproduces; keep its end state all the same
                out[name] = {"start": None}
                continue
            seeded = self._rng_seeded.get(name)
            if seeded is True:  # seeded before any draw: the start state cannot matter
                out[name] = {"start": None}
            elif seeded is False or end != start:  # drew (perhaps then seeded or set it back)
                out[name] = {"start": start}
        return out

    def _record_untracked(self, source: str | None) -> list[str]:
        lines = []
        if self._code_note:
            lines.append(self._code_note)
        hosts = list(self._hosts) or list(self._connects)
        if hosts:
            lines.append(f"uses the network ({_named(hosts)}): not tracked")
        if self._commands:
            lines.append(f"runs {_named(list(self._commands))}: not tracked")
        if source is not None:
            lines.extend(untracked_in_source(source))
        return lines


def _named(items: list[str]) -> str:
    shown = ", ".join(f"`{_short(i)}`" for i in items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _code_entry(path: str, codes: list[types.CodeType], module_name: str | None, cwd: str) -> dict | None:
    module = sys.modules.get(module_name) if module_name else None
    loaded = _index_loaded(module, path) if module is not None else {}
    qualname_of = {id(c): q for q, cs in loaded.items() for c in cs}
    compiled = _compile_file(path)
    disk: dict[str, list[types.CodeType]] = _index_compiled(compiled[0]) if compiled else {}
    disk_digests = {q: {_code_digest(c) for c in cs} for q, cs in disk.items()}
    sources = _source_index(compiled[1]) if compiled else {}
    functions: dict[tuple[str, str], dict] = {}
    for code in codes:
        qualname = qualname_of.get(id(code)) or getattr(code, "co_qualname", None)
        if qualname is None:  # 3.10, a code not reachable from the module: match it on disk
            digest = _code_digest(code)
            qualname = next((q for q, ds in disk_digests.items() if digest in ds), code.co_name)
        digest = _code_digest(code)
        item: dict[str, Any] = {"qualname": qualname, "digest": digest}
        if digest in disk_digests.get(qualname, ()):  # the file on disk is the code that ran
            source = _source_digest(sources, qualname)
            if source is not None:
                item["source"] = source
        functions[(qualname, digest)] = item
    # a function nested in a recorded one is covered by the outer digest
    quals = {q for q, _ in functions}
    kept = [f for (q, _), f in sorted(functions.items())
            if not any(q.startswith(o + ".<locals>.") for o in quals if o != q)]
    entry: dict[str, Any] = {"module": module_name, "file": _display(path, cwd), "functions": kept}
    if module is not None and compiled:
        literals = _literal_assignments(compiled[1])
        names: set[str] = set()
        for code in codes:
            names.update(code.co_names)
            for inner in _nested_codes(code):
                names.update(inner.co_names)
        constants = {}
        for name in sorted(names & literals.keys()):
            value = vars(module).get(name, _MISSING)
            digest = _literal_digest(value)
            if digest is not None and digest == _literal_digest(literals[name]):
                constants[name] = digest
        if constants:
            entry["globals"] = constants
    return entry


_MISSING = object()


def trace(output_folder: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
          ignore: Iterable[str | os.PathLike] = (), *, code: bool | None = None) -> Trace:
    """Trace what the body run inside the ``with`` block reads besides its inputs.

    Examples
    --------
    >>> with trace(output_folder="output") as t:
    ...     rows = open("data.csv").read().splitlines()
    >>> deps = t.record(declared_files=["extra/"])

    Parameters
    ----------
    output_folder
        Files under it are the extension's own (outputs of steps), never dependencies.
    cwd
        Recorded paths are relative to it when under it (default: the working directory).
    ignore
        More folders whose files are not dependencies.
    code
        Watch which user functions run. ``None`` (default): on Python 3.12+, where
        ``sys.monitoring`` makes it nearly free; before 3.12 the only hook is a profiler,
        which slows Python-heavy bodies several times, so there the caller records the user
        modules it reaches statically instead (``record(modules=...)``, see
        :func:`user_modules_reached`).
    """
    return Trace(output_folder=output_folder, cwd=cwd, ignore=ignore, code=code)


def user_modules_reached(values: Iterable[Any] = (), imported: Iterable[str] = ()) -> list[str]:
    """Names of the user-code modules a cell reaches, found without running it.

    Examples
    --------
    >>> user_modules_reached([helpers.clean], imported=["mypkg"])   # doctest: +SKIP
    ['helpers', 'mypkg', 'mypkg.text', 'shared_utils']

    The roots are the modules the cell imports (top-level names: every loaded submodule
    counts) and the modules of the user functions, classes, instances and modules among
    ``values`` (its inputs); the set is closed over the user modules and user functions or
    classes that those modules' globals refer to, the globals those functions (and the methods
    of those classes) name, and the modules their bodies import (``def f(): import helpers``).
    User code is code outside the standard library and site-packages (an editable install
    counts as user code).
    """
    found: dict[str, None] = {}
    todo: list[str] = []

    def consider(name: Any) -> None:
        if not isinstance(name, str) or name in found:
            return
        module = sys.modules.get(name)
        f = getattr(module, "__file__", None)
        if module is None or not isinstance(f, str) or not f.endswith(".py") or not _is_user_file(f):
            return
        found[name] = None
        todo.append(name)

    walked: dict[int, Any] = {}

    def of_value(value: Any) -> None:
        if isinstance(value, types.ModuleType):
            consider(value.__name__)
        elif isinstance(value, types.FunctionType):
            consider(getattr(value, "__module__", None))
            of_code(value)
        elif isinstance(value, type):
            consider(getattr(value, "__module__", None))
            of_class(value)
        elif isinstance(value, (types.MethodType, staticmethod, classmethod)):
            of_value(value.__func__)
        else:
            consider(getattr(type(value), "__module__", None))

    def is_users(module: Any, filename: str) -> bool:
        notebook = module in (None, "__main__", "__mp_main__") or str(module).startswith("__ipython")
        return notebook or _is_user_file(filename)

    def of_code(fn: types.FunctionType) -> None:
        """A user function's body imports and the code its globals name (a notebook function
        has no module file whose globals are walked): the modules it reaches when it runs."""
        if id(fn) in walked or not is_users(fn.__module__, fn.__code__.co_filename):
            return
        walked[id(fn)] = fn
        from .fingerprint import code_global_names, code_imports

        for name in code_imports(fn.__code__, fn.__globals__.get("__package__")):
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                consider(".".join(parts[:i]))
        for name in code_global_names(fn.__code__):
            value = fn.__globals__.get(name)
            if isinstance(value, (types.ModuleType, types.FunctionType, type)):
                of_value(value)

    def of_class(cls: type) -> None:
        module = getattr(cls, "__module__", None)
        file = getattr(sys.modules.get(module), "__file__", None) if isinstance(module, str) else None
        if id(cls) in walked or not is_users(module, file if isinstance(file, str) else "<>"):
            return
        walked[id(cls)] = cls
        for attr in list(vars(cls).values()):
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType):
                of_code(attr)

    with _paused():
        for top in imported:
            for name in [n for n in list(sys.modules) if n == top or n.startswith(top + ".")]:
                consider(name)
        for value in values:
            of_value(value)
        while todo:
            module = sys.modules.get(todo.pop())
            for value in list(vars(module).values()) if module is not None else []:
                if isinstance(value, (types.ModuleType, types.FunctionType, type)):
                    of_value(value)
    return sorted(found)


# --------------------------------------------------------------------------- checking


def check(recorded: dict[str, Any] | None, cwd: str | os.PathLike | None = None, *,
          first_only: bool = False) -> list[Change]:
    """What changed among recorded dependencies; empty means a hit is still exact.

    Examples
    --------
    >>> [c.text for c in check(step_json["dependencies"], cwd=".")]
    ['file `data.csv` changed', 'function `helpers.clean` changed (helpers.py)']

    Parameters
    ----------
    recorded
        ``Trace.record()``'s dict (None or {} has nothing to check).
    cwd
        What relative paths are relative to (default: the working directory).
    first_only
        Stop at the first change (enough to decide a re-run; ``why`` wants them all).
    """
    if not recorded:
        return []
    base = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
    changes: list[Change] = []
    with _paused():
        # steps._DEPENDENCY_KEYS names the keys these read: a record empty in all of them is not checked
        for checker in (_check_files, _check_folders, _check_code, _check_libraries, _check_rng):
            try:
                for change in checker(recorded, base):
                    changes.append(change)
                    if first_only:
                        return changes
            except (AttributeError, IndexError, KeyError, TypeError, ValueError):
                # a hand-edited or damaged record: the result cannot be trusted, so it re-runs
                changes.append(Change("damaged", "dependencies", "the recorded dependencies are damaged"))
                if first_only:
                    return changes
    return changes


def _check_files(recorded: dict, cwd: str) -> Iterable[Change]:
    for entry in recorded.get("files", ()):
        shown = entry["path"]
        path = _resolve(shown, cwd)
        try:
            st = os.stat(path)
        except OSError:
            if not entry.get("missing"):
                yield Change("file", shown, f"file `{shown}` was deleted")
            continue
        if entry.get("missing"):
            yield Change("file", shown, f"file `{shown}` now exists")
            continue
        if st.st_size == entry["size"] and st.st_mtime_ns == entry["mtime_ns"]:
            continue
        if st.st_size == entry["size"]:
            try:
                if digest_file(path) == entry["digest"]:
                    continue  # touched only
            except OSError:
                pass
        yield Change("file", shown, f"file `{shown}` changed")


def _check_folders(recorded: dict, cwd: str) -> Iterable[Change]:
    for entry in recorded.get("folders", ()):
        shown = entry["path"]
        path = _resolve(shown, cwd)
        label = shown if shown.endswith("/") else shown + "/"
        listing = _listing(path, bool(entry.get("recursive")))
        if listing is None:
            yield Change("folder", shown, f"folder `{label}` was deleted")
            continue
        entries, digest, names = listing
        if digest == entry["digest"] or names == entry["names"]:
            continue  # the same entries, at most touched
        if entries != entry["entries"]:
            detail = f"{entry['entries']} → {entries} entries"
        else:
            detail = "an entry was renamed, replaced or resized"
        yield Change("folder", shown, f"folder `{label}` changed ({detail})")


def _check_code(recorded: dict, cwd: str) -> Iterable[Change]:
    same_python = recorded.get("python") == _PYTHON
    for entry in recorded.get("code", ()):
        shown = entry["file"]
        path = os.path.abspath(_resolve(shown, cwd))
        module_name = entry.get("module")
        module = sys.modules.get(module_name) if module_name else None
        module_file = getattr(module, "__file__", None) if module is not None else None
        if module is not None and not (isinstance(module_file, str) and os.path.abspath(module_file) == path):
            module = None  # another file answers to that name now: judge the recorded file
        prefix = f"{module_name}." if module_name else ""
        compiled: tuple[types.CodeType, str] | None = None
        if module is None or not same_python:
            compiled = _compile_file(path)
            if compiled is None:
                reason = "was deleted" if not os.path.exists(path) else "cannot be compiled"
                first = entry["functions"][0]["qualname"] if entry["functions"] else "?"
                yield Change("module", f"{prefix}{first}", f"function `{prefix}{first}` changed ({shown} {reason})")
                continue
        if same_python:
            index = _index_loaded(module, path) if module is not None else _index_compiled(compiled[0])
            digests: dict[str, set[str]] = {}
            for item in entry["functions"]:
                qualname = item["qualname"]
                if qualname not in digests:
                    digests[qualname] = {_code_digest(c) for c in index.get(qualname, ())}
                if item["digest"] not in digests[qualname] and module is not None:
                    # not reachable from the loaded module's names (kept only in a closure or
                    # a registry): the file on disk is the best witness (an unreloaded edit
                    # then reads as a change: a needless re-run, never a stale hit)
                    if compiled is None:
                        compiled = _compile_file(path)
                    if compiled is not None:
                        disk = _index_compiled(compiled[0])
                        digests[qualname] |= {_code_digest(c) for c in disk.get(qualname, ())}
                if item["digest"] not in digests[qualname]:
                    what = "no longer exists" if not digests[qualname] else "changed"
                    yield Change("module", f"{prefix}{qualname}", f"function `{prefix}{qualname}` {what} ({shown})")
        else:
            sources = _source_index(compiled[1])
            for item in entry["functions"]:
                qualname = item["qualname"]
                now = _source_digest(sources, qualname)
                if item.get("source") is None or now != item["source"]:
                    what = "no longer exists" if now is None else "changed"
                    yield Change("module", f"{prefix}{qualname}", f"function `{prefix}{qualname}` {what} ({shown})")
        constants = entry.get("globals")
        if constants:
            if module is not None:
                values = vars(module)
                current = {n: _literal_digest(values.get(n, _MISSING)) for n in constants}
            else:
                if compiled is None:
                    compiled = _compile_file(path)
                literals = _literal_assignments(compiled[1]) if compiled else {}
                current = {n: _literal_digest(literals[n]) if n in literals else None for n in constants}
            for name, digest in constants.items():
                if current.get(name) != digest:
                    yield Change("module", f"{prefix}{name}", f"`{prefix}{name}` changed ({shown})")


def _check_libraries(recorded: dict, cwd: str) -> Iterable[Change]:
    for dist, version in recorded.get("libraries", {}).items():
        now = _dist_version(dist)
        if now is None:
            yield Change("library", dist, f"library `{dist}` is no longer installed (was {version})")
        elif now != version:
            yield Change("library", dist, f"library `{dist}` changed: {version} → {now}")


def _check_rng(recorded: dict, cwd: str) -> Iterable[Change]:
    wanted = {name: item["start"] for name, item in recorded.get("rng", {}).items() if item.get("start")}
    if not wanted:
        return
    now = _rng_digests(wanted)
    for name, start in wanted.items():
        if now.get(name) != start:
            yield Change("rng", name, f"the global RNG state of `{name}` differs from the saved run")


# --------------------------------------------------------------------------- the cell's source

_GETENV = ("getenv", "getenvb")


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` or a bare ``environ`` (``from os import environ``), also ``os.environb``."""
    if isinstance(node, ast.Attribute):
        return node.attr in ("environ", "environb") and isinstance(node.value, ast.Name) and node.value.id == "os"
    return isinstance(node, ast.Name) and node.id in ("environ", "environb")


def untracked_in_source(source: str) -> list[str]:
    """What the cell reads that no trace can see, found in its source: environment variables.

    Examples
    --------
    >>> untracked_in_source('token = os.environ["HF_TOKEN"]\\nlevel = os.getenv("LEVEL", "1")')
    ['reads environment variable `HF_TOKEN`: not tracked', 'reads environment variable `LEVEL`: not tracked']

    Writes (``os.environ["X"] = ...``) are not reads. Source that does not parse gives [].
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    names: dict[str, None] = {}
    dynamic = whole = False
    handled: set[int] = set()

    def key_of(node: ast.AST | None) -> None:
        nonlocal dynamic
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value.decode(errors="replace") if isinstance(node.value, bytes) else node.value
            names.setdefault(value, None)
        else:
            dynamic = True

    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            handled.add(id(node.value))
            if isinstance(node.ctx, ast.Load):
                key_of(node.slice)
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and _is_environ(func.value):
                handled.add(id(func.value))
                if func.attr in ("get", "setdefault", "pop", "__getitem__", "__contains__"):
                    key_of(node.args[0] if node.args else None)
                elif func.attr not in ("__setitem__", "update", "clear", "__delitem__"):
                    whole = True  # copy(), items(), keys(), values()...
            elif (isinstance(func, ast.Attribute) and func.attr in _GETENV
                  and isinstance(func.value, ast.Name) and func.value.id == "os") or (
                    isinstance(func, ast.Name) and func.id in _GETENV):
                key_of(node.args[0] if node.args else None)
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
            for op, right in zip(node.ops, node.comparators):
                if isinstance(op, (ast.In, ast.NotIn)) and _is_environ(right):
                    handled.add(id(right))
                    key_of(node.left)
        elif isinstance(node, ast.Delete):
            for target in node.targets:
                if isinstance(target, ast.Subscript) and _is_environ(target.value):
                    handled.add(id(target.value))
    for node in ast.walk(tree):
        if _is_environ(node) and id(node) not in handled and isinstance(getattr(node, "ctx", ast.Load()), ast.Load):
            if isinstance(node, ast.Name) and not _imports_environ(tree):
                continue
            whole = True  # passed along, iterated, copied: the whole environment is read
    lines = [f"reads environment variable `{n}`: not tracked" for n in names]
    if dynamic:
        lines.append("reads an environment variable named at run time: not tracked")
    if whole:
        lines.append("reads the environment (`os.environ`): not tracked")
    return lines


def _imports_environ(tree: ast.AST) -> bool:
    return any(
        isinstance(n, ast.ImportFrom) and n.module == "os" and any(a.name in ("environ", "environb") for a in n.names)
        for n in ast.walk(tree)
    )
