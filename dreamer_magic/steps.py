"""The step lifecycle: decide hit / changed / restore, run, save, load.

No IPython here: the magic hands in the cell's source, the values of its inputs, a function
that runs the body, and (optionally) hooks to capture and replay rich output. The
:func:`step` decorator drives the same lifecycle for a plain Python function.

Examples
--------
>>> @step("tokenize")                      # doctest: +SKIP
... def tokenize(texts):
...     return [t.split() for t in texts]
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import json
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

from . import __version__, events
from .cell import analyze, line_changes, loop_names
from .errors import DamagedResultError, DreamerError, FingerprintError, PickleRefusedError, StorageError
from .fingerprint import (
    FORMAT_VERSION,
    LINEAGE,
    combine,
    distribution_version,
    fingerprint,
    function_parts,
    is_user_module,
    normalise_source,
    package_version,
    source_of,
)
from .folders import OutputFolder, get_output_folder, now_iso, read_json, read_meta, tree_digest, validate_name, write_json_atomic
from .folders import WRITE_REFUSED, interrupts_deferred, saving_into
from .integrity import RECORD, check_links, check_mode, checked_before, record_files, remember_checked, tree_digest_of, verify_record
from .status import FAILED, INTERRUPTED, LOADED, PULLED, RAN, RESTORED, RUNNING, WAITING, OutputInfo, Reason, Status, value_preview

STEP_FILE = "step.json"
REPLAY_FILE = "replay.json"
RNG_FILE = "rng_state.json"  # the global RNG state the body left, set again on a hit
INTERRUPTED_NOTHING_SAVED = "interrupted: nothing saved, the previous result is kept"

class _Active(threading.local):
    """The steps running now in this thread, outermost first (a step called from a worker
    thread does not nest under a step of another thread)."""

    def __init__(self) -> None:
        self.runs: list["StepRun"] = []


_ACTIVE = _Active()


def active_runs() -> list["StepRun"]:
    """The steps and trainers running now in this thread, outermost first (one stack for both)."""
    return list(_ACTIVE.runs)


def active_statuses() -> list[Status]:
    """Statuses of the steps and trainers running now in this thread, outermost first."""
    return [run.status for run in _ACTIVE.runs]


# What dependencies.check() looks at in a step's recorded dependencies.
_DEPENDENCY_KEYS = ("files", "folders", "code", "libraries", "rng")


def current_remote() -> Any:
    """The remote mirror in use (``remote.get_remote()``), or ``None``; never imports remote.py,
    which whatever sets a remote (``%dreamer remote``, the ``remote`` trait) has imported."""
    module = sys.modules.get("dreamer_magic.remote")
    return module.get_remote() if module is not None else None


def core_versions() -> dict[str, str]:
    """Versions of the packages a saved result depends on (recorded in step.json)."""
    out = {"python": sys.version.split()[0], "dreamer_magic": __version__}
    for name in ("numpy", "pandas", "pyarrow", "datasets", "torch", "transformers"):
        if name in sys.modules:
            version = package_version(name)
            if version:
                out[name] = version
    return out


@dataclass
class StepSpec:
    """Everything that decides a step's fingerprint and how to run it."""

    name: str
    source: str  # the code (for the fingerprint and "why")
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)  # names to save after the body runs
    strict_outputs: bool = False  # True for --outputs: each name must exist after the run
    rebind: list[str] = field(default_factory=list)  # import/def/class statements re-run on a hit
    version: str | None = None
    libraries: list[str] = field(default_factory=list)  # modules whose versions count
    force: bool = False
    replay: bool = True
    allow_pickle: bool = True
    verify: str = "digest"  # what a hit checks of the saved files: "digest" (sizes and contents) or "size"
    kind: str = "step"
    extra: dict[str, Any] = field(default_factory=dict)  # more fingerprint components (decorator args)
    files: list[str] = field(default_factory=list)  # --files: what the body reads that a trace cannot see
    unbound: set[str] = field(default_factory=set)  # outputs this run did not bind (kept their old value)
    gone: list[str] = field(default_factory=list)  # names deleted on some paths that this run deleted
    first_line: int = 1  # the editor's number of the source's first line (2 under a %%dreamer_ line)
    temporaries: list[str] = field(default_factory=list)  # loop variables: folded on the card


def input_fingerprints(inputs: dict[str, Any]) -> dict[str, str]:
    """Fingerprint each input; an input that cannot be fingerprinted is named with the fix."""
    out = {}
    for name, value in inputs.items():
        try:
            out[name] = fingerprint(value)
        except RecursionError:
            raise FingerprintError(
                f"input {name!r} is nested too deeply to fingerprint; leave it out with `--inputs`"
            ) from None
        except Exception as e:  # never a traceback from inside the hasher, never a random key
            reason = str(e) if isinstance(e, FingerprintError) else f"{type(e).__name__}: {e}"
            raise FingerprintError(
                f"input {name!r} ({type(value).__module__}.{type(value).__qualname__}) cannot be "
                f"fingerprinted: {reason}. Leave it out with `--inputs` (list the inputs that matter), "
                "or give its class a `__dreamer_fingerprint__(self)` method returning something "
                "that can be fingerprinted"
            ) from None
    return out


def components_of(spec: StepSpec) -> dict[str, Any]:
    """The fingerprint components stored in step.json (each one explains a change)."""
    libraries = {}
    for module in sorted(set(spec.libraries)):  # by distribution: `import sklearn` counts scikit-learn
        found = distribution_version(module)
        if found is not None:
            libraries[found[0]] = found[1]
    return {
        "format": FORMAT_VERSION,
        "kind": spec.kind,
        "source": _source_fingerprint(spec.source),
        "inputs": input_fingerprints(spec.inputs),
        "version": spec.version,
        "libraries": libraries,
        **({"outputs": list(spec.outputs)} if spec.strict_outputs else {}),
        **({"extra": fingerprint(spec.extra)} if spec.extra else {}),
    }


@functools.lru_cache(maxsize=256)
def _source_fingerprint(source: str) -> str:
    """The fingerprint of a cell's normalised code (pure: re-running a cell does not re-parse it)."""
    return fingerprint(normalise_source(source))


@functools.lru_cache(maxsize=256)
def _analysis(source: str, transform: Callable[[str], str] | None) -> tuple[Any, list[str]]:
    """The cell analysis and loop temporaries of ``source`` (pure, so kept for the next run of
    the same cell: a hit's fixed cost). Callers must not change what it returns."""
    return analyze(source, transform=transform, first_line=2), loop_names(source)  # the body starts under its %%dreamer_ line


def input_previews(inputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Short previews of the inputs, kept in step.json so that a why-line can say ``old → new``.

    ``{"block_size": {"value": "128"}, "clean": {"source": "def clean(t): ...", "line": 1}}``:
    small values by :func:`~dreamer_magic.status.value_preview`, notebook functions by their
    source (and the editor's number of its first line). Nothing here is part of the fingerprint.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, value in inputs.items():
        try:
            if inspect.isfunction(value):
                out[name] = _function_preview(value)
                continue
            preview = value_preview(value)
        except Exception:  # noqa: BLE001 - a preview is a courtesy, never a failure
            continue
        if preview is not None:
            out[name] = {"value": preview}
    return out


def _function_preview(fn: Callable) -> dict[str, Any]:
    """A function input's preview: its name, its source (a notebook function) and the digests of
    its parts (:func:`~dreamer_magic.fingerprint.function_parts`), for a why-line that names it
    and says what changed."""
    preview: dict[str, Any] = {"name": getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "?")}
    source = _function_source(fn)
    if not source.startswith("<function"):
        preview.update(source=source[:4000], line=fn.__code__.co_firstlineno)
    try:
        preview["parts"] = function_parts(fn)
    except Exception:  # noqa: BLE001 - a preview is a courtesy, never a failure
        pass
    return preview


def _part_changes(old: dict, new: dict) -> list[str]:
    """What changed among a function's parts, in words (its code is told by changed lines)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key == "code":
            continue
        kind, _, what = key.partition(":")
        if kind == "global":
            state = "is new" if key not in old else "is gone" if key not in new else "changed"
            lines.append(f"the global `{what}` it uses {state}")
        elif kind == "import":
            before, after = old.get(key), new.get(key)
            if before and after and not before.startswith("source") and not after.startswith("source"):
                lines.append(f"the module `{what}` it imports: `{before}` → `{after}`")
            else:
                lines.append(f"the module `{what}` it imports changed")
        elif kind == "defaults":
            lines.append("its default arguments changed")
        elif kind == "closure":
            lines.append("a value it closes over changed")
    if old.get("code") != new.get("code") and old.get("code") and new.get("code") and not lines:
        lines.append("its code changed")
    return lines


def _input_reason(name: str, old: dict, new: dict) -> Reason:
    """``input `n` changed: `3` → `4```, or a changed function (named as the user named it: the
    decorated function of a ``@step``) with the lines or the parts that changed."""
    if "name" in new or ("source" in old and "source" in new):
        subject = str(new.get("name") or name) if name == "function" else name
        lines: list = []
        if "source" in old and "source" in new:
            changes = line_changes(old["source"], new["source"], first_line=int(new.get("line") or 1))
            lines = [Reason.code_line(*c) for c in changes]
        if not lines:
            lines = _part_changes(old.get("parts") or {}, new.get("parts") or {})
        return Reason("function {subject} changed", "input", subject=subject, lines=lines)
    before, after = old.get("value"), new.get("value")
    if before is not None and after is not None and before != after:
        return Reason.input_changed(name, before, after)
    return Reason.input_changed(name)


def fingerprint_of(components: dict[str, Any]) -> str:
    return combine(json.dumps(components, sort_keys=True))


def why(
    meta: dict | None,
    components: dict[str, Any],
    source: str,
    problem: str | None = None,
    *,
    first_line: int = 1,
    previews: dict[str, dict] | None = None,
) -> list[Reason]:
    """What changed between a stored result and now, as typed reasons (:class:`~dreamer_magic.status.Reason`).

    Code lines are numbered as the editor shows them (``first_line`` is the source's first
    line); ``previews`` (:func:`input_previews` of the inputs now) give changed inputs their
    ``old → new``.

    Examples
    --------
    >>> why(None, {}, "")
    ['first run: no saved result']
    >>> why(None, {}, "")[0].kind
    'first-run'
    """
    if meta is None:
        return [Reason.first_run(problem)]
    old = _dict(meta.get("components"))  # a hand-edited record counts as "changed", never a traceback
    reasons = []
    if old.get("format") != components.get("format"):
        reasons.append(Reason.format_changed())
    if old.get("source") != components.get("source"):
        before = meta.get("source")
        changes = line_changes(before if isinstance(before, str) else "", source, first_line=first_line)
        reasons.append(Reason.code_changed(Reason.code_line(*change) for change in changes))
    old_inputs, new_inputs = _dict(old.get("inputs")), components.get("inputs") or {}
    old_previews, new_previews = _dict(meta.get("input_previews")), previews or {}
    for name in new_inputs:
        if name not in old_inputs:
            reasons.append(Reason.input_added(name))
        elif old_inputs[name] != new_inputs[name]:
            reasons.append(_input_reason(name, _dict(old_previews.get(name)), new_previews.get(name) or {}))
    for name in old_inputs:
        if name not in new_inputs:
            reasons.append(Reason.input_gone(name))
    if old.get("version") != components.get("version"):
        reasons.append(Reason.version_changed(old.get("version"), components.get("version")))
    old_libs, new_libs = _dict(old.get("libraries")), components.get("libraries") or {}
    for lib in sorted(set(old_libs) | set(new_libs)):
        if old_libs.get(lib) != new_libs.get(lib):
            reasons.append(Reason.library_changed(lib, old_libs.get(lib), new_libs.get(lib)))
    if old.get("outputs") != components.get("outputs"):
        reasons.append(Reason("--outputs changed", "arguments", old=old.get("outputs"), new=components.get("outputs")))
    if old.get("extra") != components.get("extra"):
        reasons.append(Reason.arguments_changed())
    if old.get("kind") != components.get("kind"):
        reasons.append(Reason.kind_changed(str(old.get("kind")), str(components.get("kind"))))
    return reasons or [Reason.note("fingerprint changed")]


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


class _Tee:
    """A stream that writes through to the real one and records what passed."""

    def __init__(self, stream: Any, name: str, records: list) -> None:
        self._stream, self._name, self._records = stream, name, records

    def write(self, text: str) -> int:
        if text:
            if self._records and self._records[-1].get("stream") == self._name:
                self._records[-1]["text"] += text
            else:
                self._records.append({"stream": self._name, "text": text})
        return self._stream.write(text)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stream, attr)


class Frontend:
    """The one seam between the lifecycle and wherever the cell runs; this base is plain Python.

    Examples
    --------
    >>> fe = Frontend()
    >>> ns = {}
    >>> fe.run_cell("x = 1 + 1", ns); ns["x"]
    2

    The step and trainer lifecycles never reach back into the notebook any other way: they
    run a cell's body (:meth:`run_cell`), re-run its definitions on a hit (:meth:`rerun`),
    record and replay its output (:meth:`capture`, :meth:`replay`) and show its status
    (:meth:`show`). ``frontend.py`` subclasses it for IPython; this plain version serves
    scripts and ``@step`` outside a notebook, printing one status line per step.
    """

    name = "python"
    transform: Callable[[str], str] | None = None  # IPython syntax -> Python (None: plain Python only)

    def __init__(self) -> None:
        self.last_status: Status | None = None

    def run_cell(self, source: str, namespace: dict, raw: str | None = None) -> None:
        """Execute a cell's code in ``namespace``; the value of a last expression is shown."""
        import ast

        tree = ast.parse(source, "<dreamer cell>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if tree.body:
            exec(compile(tree, "<dreamer cell>", "exec"), namespace)
        if last is not None:
            exec(compile(ast.Interactive([last]), "<dreamer cell>", "single"), namespace)

    def rerun(self, statement: str, namespace: dict) -> None:
        """Re-run one ``import``/``def``/``class`` statement of a cell after a hit."""
        exec(compile(statement, "<dreamer_magic: re-running an import/def/class>", "exec"), namespace)

    @contextlib.contextmanager
    def capture(self, records: list) -> Iterator[None]:
        """Record what the body prints (``{"stream": ..., "text": ...}``) while still showing it."""
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, "stdout", records), _Tee(err, "stderr", records)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err

    def replay(self, records: list) -> None:
        """Show recorded output again (rich displays as their plain text)."""
        for rec in records:
            if "stream" in rec:
                (sys.stderr if rec["stream"] == "stderr" else sys.stdout).write(rec["text"])
            elif "data" in rec and "text/plain" in rec["data"]:
                print(rec["data"]["text/plain"])

    def show(self, status: Status) -> Any:
        """Show ``status`` for a step that starts now; returns a handle whose ``finish()`` ends it."""
        from .render import TextStatus

        return TextStatus(status)


_FRONTEND: list[Frontend] = [Frontend()]  # [the frontend of a step that is not nested in another]


def use_frontend(frontend: Frontend | None) -> Frontend:
    """Make ``frontend`` the one top-level steps use (``None``: the plain-Python default).

    ``%load_ext dreamer_magic`` installs the IPython one and ``%unload_ext`` removes it.
    Returns the frontend now in use.
    """
    _FRONTEND[0] = frontend if frontend is not None else Frontend()
    return _FRONTEND[0]


def current_frontend() -> Frontend:
    """The frontend of the innermost running step in this thread, else the installed one."""
    return _ACTIVE.runs[-1].frontend if _ACTIVE.runs else _FRONTEND[0]


def last_status() -> Status | None:
    """The status of the last step or trainer shown by the frontend in use (for tests and tools)."""
    return _FRONTEND[0].last_status


class StepRun:
    """One run of the lifecycle for one step (subclassed by trainers).

    Parameters
    ----------
    spec : what decides the fingerprint.
    execute : runs the body; returns the namespace holding the outputs (a dict).
    status : the status to fill in (created if not given).
    """

    meta_file = STEP_FILE

    def __init__(
        self,
        spec: StepSpec,
        execute: Callable[[], dict],
        status: Status | None = None,
        frontend: Frontend | None = None,
        *,
        namespace: dict | None = None,
    ) -> None:
        self.spec = spec
        self.execute = execute
        self.folder_name = validate_name(spec.name)
        self.status = status or Status(kind=spec.kind, name=spec.name)
        self.parent = _ACTIVE.runs[-1] if _ACTIVE.runs else None
        self.frontend = frontend or current_frontend()
        self.namespace = namespace  # the user namespace of a cell step (definitions re-run there)
        self.out = OutputFolder(get_output_folder())
        self.name_path = f"{self.parent.name_path}/{self.folder_name}" if self.parent else self.folder_name
        self.tmp: Path | None = None
        self.values: dict[str, Any] = {}
        self.entries: dict[str, dict] = {}  # step.json's "outputs" of the result saved or loaded
        self.dependencies: dict | None = None  # what the body read besides its inputs (traced)
        self.meta: dict | None = None  # step.json of the result loaded
        self.cell_info: Any = None  # the cell analysis (cell steps), for notes on what it cannot analyse
        self.started: float | None = None  # perf_counter() when the cell began (the magic's entry)
        self.previews: dict[str, dict[str, Any]] | None = None  # input_previews before the body ran
        self.damaged: list[Reason] = []  # saved results with this fingerprint found damaged and set aside
        self.load_from: Path | None = None  # a backup loaded where it is (a read-only output folder)
        self.committed = False  # the new result is in place (an interrupt after this loses nothing)
        self.files_checked = False  # the hit's files were checked before, unchanged since (_load)
        # Where this step's folder and its backups live: the output folder, or for a nested
        # step the folder its parent is writing (so nested backups travel with the parent).
        if self.parent is None:
            self.home, self.key = self.out, self.name_path
        else:
            container = self.parent.tmp if self.parent.tmp is not None else self.parent.final
            self.home, self.key = OutputFolder(container), self.folder_name

    # -- where things are ---------------------------------------------------------
    @property
    def final(self) -> Path:
        return self.home.path(self.key)

    # -- the lifecycle ------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Show the status, then hit, restore or run; returns the output values."""
        __tracebackhide__ = True  # noqa: F841 - IPython shows the user's frames, not the lifecycle's
        handle = self.frontend.show(self.status)
        if self.parent is None:
            self.frontend.last_status = self.status
        token = events.subscribe(self.status.count_cache, this_thread=True)
        try:
            return self._run()
        finally:
            events.unsubscribe(token)
            handle.finish()

    def _run(self) -> dict[str, Any]:
        __tracebackhide__ = True  # noqa: F841 - IPython shows the user's frames, not the lifecycle's
        status = self.status
        status.state = RUNNING
        status.folder = str(self.final)
        started = self.started if self.started is not None else time.perf_counter()
        try:
            self.out.ensure()
            components = self.components()
        except BaseException as e:  # e.g. an input that cannot be fingerprinted
            status.state = FAILED
            status.error = _describe(e)
            status.duration = time.perf_counter() - started
            status.changed()
            raise
        fp = fingerprint_of(components)
        status.fingerprint = fp
        status.changed()

        def waiting() -> None:
            status.state = WAITING
            status.notes.append("another kernel is running this step; waiting for it, then loading its result")
            status.changed()

        lock_name = self.name_path if self.parent is None else self.name_path + ".nested"
        _ACTIVE.runs.append(self)
        lease = None
        try:
            with self.out.lock(lock_name, on_wait=waiting):
                lease = self._remote_lease()
                status.state = RUNNING
                current = read_meta(self.final, self.meta_file)
                self._refuse_name_clash(current[0])
                if self.parent is None:
                    self.out.clean_temps(self.final)
                values = self._decide_and_go(components, fp, started, current)
                self._push_to_remote(lease)
                lease = None  # the push releases it once the remote copy is committed
                return values
        finally:
            if lease is not None:
                lease.release()
            _ACTIVE.runs.remove(self)
            status.duration = time.perf_counter() - started
            status.changed()

    def _refuse_name_clash(self, current: dict | None = None) -> None:
        """Two names that map to one folder (``My Step`` and ``my-step``, or a step and a trainer
        of one name) never share it: the folder's metadata records the name that wrote it.

        Folders written before names were recorded (no ``name``) keep working; ``--force``
        lets this name take the folder over (the other result goes to ``_backups``).
        """
        if self.spec.force:
            return
        if current is not None and self.meta_file == STEP_FILE:  # step.json, as read_meta found it
            self._refuse_clash_with(current, "step")
            return
        for meta_file, kind in ((STEP_FILE, "step"), ("trainer.json", "trainer"), (".in-progress.json", "trainer")):
            recorded = read_json(self.final / meta_file)
            if recorded is None:
                continue
            self._refuse_clash_with(recorded, kind)
            return

    def _refuse_clash_with(self, recorded: dict, kind: str) -> None:
        """Raise the name-clash error when ``recorded`` (a folder's metadata, local or remote)
        was written by another name or kind than this one."""
        name = recorded.get("name")
        if (isinstance(name, str) and name != self.spec.name) or kind != self.spec.kind:
            other = f"the {kind} {name!r}" if isinstance(name, str) else f"a {kind}"
            message = (
                f"the {self.spec.kind} {self.spec.name!r} and {other} map to the same folder "
                f"{self.folder_name!r} (names are lower-cased and spaces become '-'), which holds the "
                f"result of {other}: give this {self.spec.kind} another name, or, if it is the same one "
                "renamed, run it once with --force (the old result goes to _backups)"
            )
            self.status.state, self.status.error = FAILED, message
            raise DreamerError(message)

    def _decide_and_go(
        self, components: dict, fp: str, started: float, current_meta: tuple[dict | None, str | None] | None = None
    ) -> dict[str, Any]:
        __tracebackhide__ = True  # noqa: F841 - IPython shows the user's frames, not the lifecycle's
        status, spec = self.status, self.spec
        current, problem = current_meta if current_meta is not None else read_meta(self.final, self.meta_file)
        meta = current
        if meta is None and self.parent is not None:  # compare with the parent's previous run
            meta, _ = read_meta(self._earlier_home().path(self.key), self.meta_file)
        changed: list[Reason] = []  # dependencies of a result with this very fingerprint
        if not spec.force:
            for state, found in self._candidates(current, fp, changed):
                try:
                    return self._load(self.load_from or self.final, found, state, started)
                except PickleRefusedError:
                    raise
                except DamagedResultError as e:  # never a hit, never a backup under its fingerprint
                    self._set_aside(self.home, self.load_from or self.final, self.key, e, backup=self.load_from is not None)
                except StorageError as e:
                    problem = f"the saved result could not be loaded ({e}); running again"
                    meta = None
        if spec.force:
            status.reasons = [Reason.force()]
        elif self.damaged:
            status.reasons = list(self.damaged)
        elif changed and meta is not None and meta.get("fingerprint") == fp:
            status.reasons = changed
        else:
            status.reasons = why(meta, components, spec.source, problem, first_line=spec.first_line, previews=input_previews(spec.inputs))
            status.reasons += self._code_changes(meta)
        if problem and meta is not None:
            status.reasons.append(Reason.problem(problem))
        status.changed()
        return self._run_and_save(components, fp, started)

    def _candidates(self, current: dict | None, fp: str, changed: list) -> Iterator[tuple[str, dict]]:
        """Saved results with this fingerprint whose dependencies are unchanged, tried in order
        (each looked for only if needed): the folder in place (``current``, its metadata as
        read), a backup, and for a nested step the parent's previous run. A result whose
        dependencies changed adds the reasons to ``changed`` and is passed over."""
        if current is not None and current.get("fingerprint") == fp and self._dependencies_hold(current, changed):
            yield LOADED, current
        found = self.home.find_backup(self.key, fp, self.meta_file)
        if found is not None and self._dependencies_hold(found[1], changed) and self._intact(found[0], found[1]):
            try:
                restored = self.home.restore(self.key, fp, self.meta_file)
            except OSError as e:  # a read-only output folder: load the backup where it is
                if e.errno not in WRITE_REFUSED or not found[0].is_dir():
                    raise
                self.load_from = found[0]
                restored = found[1]
                self.status.notes.append("the output folder is read-only: loaded the backup where it is")
            if restored is not None:
                yield RESTORED, restored
                self.load_from = None
        if self.parent is not None:
            carried = self._carry_over(fp)
            if carried is not None and self._dependencies_hold(carried, changed):
                yield LOADED, carried
        else:
            pulled = self._pull_from_remote(fp, changed)
            if pulled is not None:
                yield PULLED, pulled

    # -- the remote output folder (remote.py, SPEC §7) -------------------------------------
    def _pull_from_remote(self, fp: str, changed: list) -> dict | None:
        """A local miss: a committed remote copy with ``fp`` (in place, else in ``_backups``) is
        pulled into a temporary folder, verified, and renamed into place (what is there goes to
        the local backups). ``None`` when the remote has none (or it could not be used)."""
        remote = current_remote()
        if remote is None:
            return None
        try:
            found = remote.find(self.name_path, fp, self.meta_file)
        except Exception as e:  # noqa: BLE001 - an unreachable remote is a miss, never a failed cell
            self.status.notes.append(f"the remote copy was not used: {type(e).__name__}: {e}")
            return None
        if found is not None:  # another name's result (`My Step` for `my-step`): refused as locally
            self._refuse_clash_with(found[1], self.spec.kind)
        try:
            if found is None or not self._dependencies_hold(found[1], changed):
                return None
            where, meta = found
            self.status.notes.append(f"pulling from {remote.url}/{where}")
            self.status.changed()
            problem = remote.pull_into_place(
                where, meta, self.meta_file, self.final,
                lambda: self.home.move_to_backup(self.final, self.key, self.meta_file),
            )
        except Exception as e:  # noqa: BLE001 - an unreachable remote is a miss, never a failed cell
            problem = f"{type(e).__name__}: {e}"
        self.status.notes[:] = [n for n in self.status.notes if not str(n).startswith("pulling from ")]
        if problem is not None:
            self.status.notes.append(f"the remote copy was not used: {problem}")
            return None
        return meta

    def _remote_lease(self) -> Any:
        """With a remote, hold this step's lease in the bucket (another machine running it: wait,
        then load its result). ``None`` without a remote, for a nested step, or when the remote
        cannot be reached (then the local lock alone guards it, and a note says so)."""
        remote = current_remote()
        if remote is None or self.parent is not None or not self._takes_lease():
            return None
        from .remote import Lease

        status = self.status

        def waiting(holder: str) -> None:
            status.state = WAITING
            status.notes.append(f"another machine ({holder}) is running this {self.spec.kind}; waiting for it, then loading its result")
            status.changed()

        lease = Lease(remote, self.name_path)
        try:
            lease.acquire(on_wait=waiting)
        except Exception as e:  # noqa: BLE001 - an unreachable remote never stops a local run
            status.notes.append(f"the remote lease could not be taken ({type(e).__name__}: {e}); running under the local lock only")
            return None
        if lease.took_over:
            status.notes.append(f"took over the expired lease of {lease.took_over} (it stopped renewing it)")
        return lease

    def _takes_lease(self) -> bool:
        """Whether this process takes part in the bucket lease (trainers: the main process only)."""
        return True

    def _push_to_remote(self, lease: Any = None) -> None:
        """After a top-level step or trainer commits (or is loaded while the remote lacks it),
        queue its push; it runs in the background, metadata last, and releases ``lease`` after."""
        remote = current_remote()
        if remote is None or self.parent is not None or self.status.state == PULLED or read_meta(self.final, self.meta_file)[0] is None:
            if lease is not None:
                lease.release()
            return
        status = self.status
        shown = status.state != LOADED  # a hit is pushed only if the remote lacks it: no news
        note = f"pushing to {remote.url} in the background"

        def progress(done: int, total: int, finished: bool) -> None:  # the card shows the upload
            nonlocal note
            if not shown:
                return
            if finished:
                text = f"push to {remote.url} failed (see `%dreamer status`)" if total < 0 else f"pushed to {remote.url}"
            else:
                text = f"pushing to {remote.url}: {done}/{total} files"
            status.notes[:] = [text if n == note else n for n in status.notes]
            note = text
            status.changed()

        if shown:
            status.notes.append(note)
        remote.push_later(
            self.out.root, self.name_path, self.meta_file, self.spec.kind, lease=lease, on_progress=progress,
            only_if_absent=status.state == LOADED,
        )

    def _check_saved(self, folder: Path, meta: dict) -> None:
        """Before anything of a saved result is read: no symlink in it leads outside, and its
        files are the ones the step wrote (sizes, and digests unless ``verify="size"``).
        ``status.verified`` says what was checked (``None``: saved before file records)."""
        check_links(folder)
        entries = meta.get("outputs") or {}
        if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
            raise DamagedResultError(f"the outputs in {self.meta_file} are not readable")
        listed = [e["path"] for e in entries.values() if e.get("storage") == "pretrained" and isinstance(e.get("path"), str)]
        self.status.verified = verify_record(folder, meta, mode=self.spec.verify, listed=listed, skip=[self.meta_file])

    def _intact(self, folder: Path, meta: dict) -> bool:
        """Whether a backup passes :meth:`_check_saved`; a damaged one is set aside, never restored."""
        try:
            self._check_saved(folder, meta)
        except DamagedResultError as e:
            self._set_aside(self.home, folder, self.key, e, backup=True)
            return False
        return True

    def _set_aside(self, home: OutputFolder, folder: Path, key: str, error: Exception, *, backup: bool = False) -> None:
        """Move a damaged result to ``_backups/<name>/incomplete-…`` (kept for a person to look
        at, never loaded or restored) and say why in the status."""
        try:
            where = home.move_to_backup(folder, key, self.meta_file, damaged=True)
            kept = f"; it was set aside in {where}" if where else ""
        except OSError as e:  # a read-only output folder, say: it stays where it is, unused
            kept = f"; it could not be set aside ({e.strerror or e})"
        what = "a backup with this fingerprint" if backup else "the saved result"
        self.damaged.append(Reason.problem(f"{what} is damaged: {error}{kept}"))

    def _code_changes(self, meta: dict | None) -> list[Reason]:
        """Which functions outside the notebook changed since the saved run (a changed module
        input says only "input `helpers` changed"; this names ``helpers.clean``)."""
        recorded = (meta or {}).get("dependencies") or {}
        if not recorded.get("code"):
            return []
        from . import dependencies

        code_only = {**recorded, "files": [], "folders": [], "libraries": {}, "rng": {}}
        return [_dependency_reason(c) for c in dependencies.check(code_only, os.getcwd())]

    def _dependencies_hold(self, meta: dict, changed: list) -> bool:
        """Whether what the saved run read besides its inputs (files, user code, libraries,
        global RNG state) is as it was; the first change found is added to ``changed``."""
        recorded = meta.get("dependencies")
        if not recorded or (isinstance(recorded, dict) and all(recorded.get(k) in (None, [], {}) for k in _DEPENDENCY_KEYS)):
            return True  # nothing to check (most steps): dependencies.py is not even imported
        from . import dependencies

        found = dependencies.check(recorded, os.getcwd(), first_only=True)
        if found and not changed:  # why it runs: what changed since the result in place (or the backup)
            changed.extend(_dependency_reason(c) for c in found)
        return not found

    def _earlier_home(self) -> OutputFolder:
        """Where the parent's previous run keeps this nested step (the parent's folder on disk)."""
        assert self.parent is not None
        return OutputFolder(self.out.path(self.parent.name_path))

    def _carry_over(self, fp: str) -> dict | None:
        """Bring a nested result with ``fp`` from the parent's previous folder (or its nested
        backups) into the folder the parent is writing, by hard links: no copy."""
        if self.home.root == self._earlier_home().root:  # the parent runs in place (a trainer)
            return None
        earlier = self._earlier_home()
        meta, _ = read_meta(earlier.path(self.key), self.meta_file)
        source = earlier.path(self.key) if meta is not None and meta.get("fingerprint") == fp else None
        if source is None:
            found = earlier.find_backup(self.key, fp, self.meta_file)
            if found is None:
                return None
            source, meta = found
        self.home.move_to_backup(self.final, self.key, self.meta_file)
        shutil.copytree(source, self.final, copy_function=_link_or_copy)
        return meta

    def components(self) -> dict[str, Any]:
        """The fingerprint components of this run (trainers count models by their weights)."""
        return components_of(self.spec)

    def _load_values(self, folder: Path, entries: dict) -> dict[str, Any]:
        """Load the saved outputs (trainers load models with ``from_pretrained``)."""
        from .storage import load_outputs

        return load_outputs(folder, entries, allow_pickle=self.spec.allow_pickle, checked=self.files_checked)

    def rebind(self) -> None:
        """Re-run the cell's ``import``/``def``/``class`` statements, as a run would have bound them.

        Done before the outputs load, so that instances of a class the cell defines unpickle.
        """
        if self.namespace is None:
            return
        for statement in self.spec.rebind:
            self.frontend.rerun(statement, self.namespace)

    def _load(self, folder: Path, meta: dict, state: str, started: float) -> dict[str, Any]:
        status, spec = self.status, self.spec
        # A step folder this kernel checked and loaded, unchanged since (integrity.checked_before),
        # is not checked again: a second hit costs a stat per file instead of reading them.
        self.files_checked = self.meta_file == STEP_FILE and checked_before(folder, meta, spec.verify, spec.allow_pickle)
        if self.files_checked:
            status.verified = spec.verify
        else:
            self._check_saved(folder, meta)
        entries = meta.get("outputs") or {}
        self.entries = entries
        self.meta = meta
        self.rebind()
        values = self._load_values(folder, entries)
        if not self.files_checked and self.meta_file == STEP_FILE and status.verified is not None:
            remember_checked(folder, meta, spec.verify, spec.allow_pickle)
        self._restore_rng(folder, meta)
        self._note_untracked(meta.get("dependencies"))
        self._note_outputs(folder, entries)
        self._mark_lineage(meta["fingerprint"], values)
        status.state = state
        status.folder = str(folder)
        load_time = time.perf_counter() - started
        original = float(meta.get("duration") or 0.0)
        status.saved = max(original - load_time, 0.0)
        status.duration = load_time
        if state == RESTORED:
            status.reasons = [Reason.restored()]
        status.notes.extend(self.damaged)  # loaded another copy: say what was set aside
        if self.spec.replay:
            replay_path = folder / REPLAY_FILE
            if replay_path.exists():
                with contextlib.suppress(OSError, ValueError):
                    self.frontend.replay(json.loads(replay_path.read_text(encoding="utf-8")))
        status.changed()
        self.values = values
        return values

    def _run_and_save(self, components: dict, fp: str, started: float) -> dict[str, Any]:
        __tracebackhide__ = True  # noqa: F841 - IPython shows the user's frames, not the lifecycle's
        status, spec = self.status, self.spec
        # the inputs as the body found them: a global it changes, an input it mutates in place
        self.previews = input_previews(spec.inputs)
        try:
            with saving_into(self.out.root, f"{spec.kind} {spec.name!r}"):
                self.tmp = self.out.new_temp(self.final)
        except DreamerError as e:
            status.state = FAILED
            status.error = str(e)
            raise
        records: list = []
        try:
            status.changed()
            body_started = time.perf_counter()  # what a hit saves: the body, not waiting or hashing
            tracer = self._tracer()
            with self.frontend.capture(records), tracer:
                namespace = self.execute()
            duration = time.perf_counter() - body_started
            self.dependencies = self._record(tracer)
            values = self._collect(namespace)
            values.update(self._mutated_inputs(components))
            self._save(values, records, components, fp, duration)
        except KeyboardInterrupt:
            self._discard()
            status.state = INTERRUPTED
            status.error = (
                "interrupted after the result was saved: it is kept and loads on the next run"
                if self.committed
                else INTERRUPTED_NOTHING_SAVED
            )
            raise
        except BaseException as e:
            self._discard()
            status.state = FAILED
            status.error = _describe(e)
            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DreamerError(
                    f"no space left on the device while saving {spec.kind} {spec.name!r}; nothing "
                    "was changed on disk. Free some space (`%dreamer gc` prunes backups) and run it again"
                ) from None
            raise
        status.state = RAN
        self._mark_lineage(fp, values)
        status.changed()
        self.values = values
        return values

    def _collect(self, namespace: dict) -> dict[str, Any]:
        import types

        values = {}
        for name in self.spec.outputs:
            if name in self.spec.unbound:
                continue
            if name not in namespace:
                if self.spec.strict_outputs:
                    raise DreamerError(
                        f"--outputs names {name!r}, but the {self.spec.kind} did not define it; "
                        "fix the list or the code"
                    )
                continue
            value = namespace[name]
            if isinstance(value, types.ModuleType):
                self.status.notes.append(f"`{name}` is a module: not saved (import it in the cell instead)")
                continue
            values[name] = value
        return values

    def _tracer(self) -> Any:
        from . import dependencies

        return dependencies.trace(output_folder=self.out.root, cwd=os.getcwd())

    def _record(self, tracer: Any) -> dict:
        """step.json's ``dependencies``: what the body read besides its inputs (SPEC §3)."""
        from . import dependencies

        modules: list[str] = []
        if not tracer.watch_code:  # before Python 3.12: the user modules the cell reaches, whole
            modules = dependencies.user_modules_reached(self.spec.inputs.values(), imported=self.spec.libraries)
        recorded = tracer.record(declared_files=self.spec.files, source=self.spec.source, modules=modules)
        self._note_untracked(recorded)
        return recorded

    def _note_untracked(self, recorded: dict | None) -> None:
        lines = list((recorded or {}).get("untracked") or [])
        lines += list(getattr(self.cell_info, "unanalysable", None) or [])
        for line in lines:
            note = Reason(line, "untracked")
            if str(note) not in map(str, self.status.notes):
                self.status.notes.append(note)

    def _write_rng(self, folder: Path) -> None:
        """Keep the global RNG state the body left, if it drew from one (restored on a hit)."""
        drawn = (self.dependencies or {}).get("rng")
        if drawn:
            from . import dependencies

            write_json_atomic(folder / RNG_FILE, dependencies.rng_end_state(drawn))

    def _restore_rng(self, folder: Path, meta: dict) -> None:
        if (meta.get("dependencies") or {}).get("rng") and (folder / RNG_FILE).is_file():
            from . import dependencies

            saved = read_json(folder / RNG_FILE)
            if saved:
                dependencies.restore_rng(saved)

    def _mutated_inputs(self, components: dict) -> dict[str, Any]:
        """Inputs the body changed in place (``lst.append``, ``df.drop(inplace=True)``, a model's
        weights): they become outputs, so a hit leaves them as a run would."""
        if self.namespace is None:
            return {}
        before = components.get("inputs") or {}
        out = {}
        for name in self.spec.inputs:
            if name in self.spec.outputs or name not in self.namespace or name not in before:
                continue
            value = self.namespace[name]
            try:
                now = fingerprint(value)
            except Exception:  # noqa: BLE001 - it was fingerprinted before the body ran
                self.status.notes.append(f"`{name}` cannot be fingerprinted after the run: a change to it is not restored on a hit")
                continue
            if now != before[name]:
                out[name] = value
                self.status.notes.append(f"`{name}` was changed in place by the cell: saved, and restored on a hit")
        return out

    def _save(self, values: dict, records: list, components: dict, fp: str, duration: float) -> None:
        from .storage import not_saved_note, save_outputs

        assert self.tmp is not None
        entries = save_outputs(values, self.tmp)
        record_inherited_lineage(values, entries)
        self.entries = entries
        for name, reason in getattr(entries, "not_saved", {}).items():  # storage skipped it: say so
            self.status.notes.append(not_saved_note(name, reason))
        self._write_rng(self.tmp)
        write_replay(self.tmp, records)
        files = record_files(self.tmp, skip=[self.meta_file])
        for entry in entries.values():
            if entry.get("path"):  # what the lineage of a saved dataset is keyed by
                entry["digest"] = tree_digest_of(files, entry["path"]) or tree_digest(self.tmp / entry["path"])
        meta = self.metadata(components, fp, entries, duration)
        meta[RECORD] = files
        final = self.final
        with interrupts_deferred():  # a commit is never cut in half by Ctrl-C
            moved = self.home.commit(self.tmp, final, self.key, self.meta_file, meta)
            self.tmp = None
            self.committed = True
        if moved and self.parent is None:
            self.status.notes.append(f"previous result kept in {moved}")
        self._note_outputs(final, entries)
        self.status.folder = str(final)

    def metadata(self, components: dict, fp: str, entries: dict, duration: float) -> dict[str, Any]:
        """What step.json (and trainer.json) hold, at least (SPEC §2)."""
        return {
            "name": self.spec.name,
            "kind": self.spec.kind,
            "fingerprint": fp,
            "components": components,
            "source": self.spec.source,
            "inputs": list(self.spec.inputs),
            "input_previews": self.previews if self.previews is not None else input_previews(self.spec.inputs),
            "outputs": entries,
            "rebind": self.spec.rebind,
            "version": self.spec.version,
            "created": now_iso(),
            "duration": duration,
            "packages": core_versions(),
            "parent": self.parent.name_path if self.parent else None,
            "dependencies": self.dependencies,
            "deleted": self.spec.gone,
        }

    def _discard(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def _note_outputs(self, folder: Path, entries: dict) -> None:
        from .folders import folder_size

        self.status.outputs = [
            OutputInfo(
                name=name,
                type=str(entry.get("type", "?")),
                storage=str(entry.get("storage", "?")),
                size=int(entry.get("size") or folder_size(folder / entry.get("path", ""))),
                pickled=bool(entry.get("pickled")) or entry.get("storage") == "pickle",
                temporary=name.startswith("_") or name in self.spec.temporaries,
            )
            for name, entry in entries.items()
        ]

    def _mark_lineage(self, fp: str, values: dict) -> None:
        """Datasets this step produced are fingerprinted by their lineage from now on: the step's
        fingerprint, the output's name and the digest of what was saved, so the key changes
        whenever the data does (a ``--force`` re-run, a non-deterministic body), in this kernel
        and after a restart alike. A ``DatasetDict``'s splits are marked one by one.

        A dataset that is already another step's unchanged output (a split put into a new
        ``DatasetDict``, ``train = ds["train"]``) keeps that step's key, here and, through the
        key its entry recorded (:func:`record_inherited_lineage`), when it is loaded after a
        restart: one object never changes its fingerprint because a second step returned it.
        """
        inputs = {id(v) for v in self.spec.inputs.values()}
        entries = self.entries
        for name, value in values.items():
            if not _is_dataset(value) or id(value) in inputs:
                continue
            entry = entries.get(name) or {}
            digest = entry.get("digest")
            key = combine(fp, name, digest) if digest else combine(fp, name)
            inherited = entry.get("lineage")
            if isinstance(value, dict):  # DatasetDict / IterableDatasetDict: the splits are what hashes
                LINEAGE.set(value, key)
                inherited = inherited if isinstance(inherited, dict) else {}
                for split, part in value.items():
                    _mark(part, inherited.get(str(split)) or combine(key, str(split)))
            else:
                _mark(value, inherited if isinstance(inherited, str) else key)


def _is_dataset(value: Any) -> bool:
    return type(value).__module__.startswith("datasets")


def _mark(value: Any, key: str) -> None:
    """Give a dataset its lineage key, unless it already carries a valid one (another step's)."""
    if LINEAGE.get(value) is None:
        LINEAGE.set(value, key)


def record_inherited_lineage(values: dict, entries: dict) -> None:
    """Write into each dataset output's entry the lineage keys it already carries (it, or a split
    of it, is an earlier step's unchanged output), so that loading it gives the same keys."""
    for name, value in values.items():
        entry = entries.get(name)
        if entry is None or not _is_dataset(value):
            continue
        if isinstance(value, dict):
            kept = {str(split): key for split, part in value.items() if (key := LINEAGE.get(part)) is not None}
            if kept:
                entry["lineage"] = kept
        else:
            key = LINEAGE.get(value)
            if key is not None:
                entry["lineage"] = key


def _dependency_reason(change: Any) -> Reason:
    """A dependency change (``dependencies.Change``) as the typed reason the status shows."""
    kind = {"folder": "file"}.get(change.kind, change.kind)
    return Reason(change.text, kind if kind in ("file", "module", "library", "rng") else "note", subject=change.subject)


def write_replay(folder: Path, records: list) -> None:
    """Save a cell's recorded output (streams and rich displays) for replay on a hit."""
    if records:
        (folder / REPLAY_FILE).write_text(json.dumps(records, ensure_ascii=False, default=str), encoding="utf-8")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def step(
    name: str, *, version: str | None = None, force: bool = False, allow_pickle: bool = True, verify: str = "digest"
) -> Callable:
    """Make calling a function a step, keyed by its code, the globals it uses and its arguments.

    Examples
    --------
    >>> @step("embed texts")                       # doctest: +SKIP
    ... def embed(texts, model_name="mini"):
    ...     return encoder.encode(texts)
    >>> vectors = embed(["a", "b"])               # runs; later calls with the same arguments load

    Called while another step runs, its folder nests under that step's folder. A hit checks the
    saved files' sizes and digests first (``verify="size"``: sizes only, faster on huge outputs).
    """
    validate_name(name)
    check_mode(verify)

    def decorate(fn: Callable) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            result: dict[str, Any] = {}

            def execute() -> dict:
                result["result"] = fn(*args, **kwargs)
                return result

            spec = StepSpec(
                name=name,
                source=_function_source(fn),
                inputs={"function": fn, **{f"arg:{k}": v for k, v in bound.arguments.items()}},
                outputs=["result"],
                strict_outputs=True,
                version=version,
                force=force,
                allow_pickle=allow_pickle,
                verify=verify,
            )
            return StepRun(spec, execute).run()["result"]

        wrapper.step_name = name  # type: ignore[attr-defined]
        return wrapper

    return decorate


def _function_source(fn: Callable) -> str:
    """A notebook function's source (shown in why-lines). A function from a module file counts
    by the code that runs (its input fingerprint), never by the file on disk, which may have been
    edited since it was imported."""
    code = getattr(fn, "__code__", None)
    module = getattr(fn, "__module__", None)
    notebook = module in (None, "__main__", "__mp_main__") or str(module).startswith("__ipython")
    source = source_of(code) if code is not None and notebook else None
    return source if source is not None else f"<function {getattr(fn, '__qualname__', fn)}>"


# -- the step magic's core ---------------------------------------------------------------


def cell_spec(
    name: str,
    source: str,
    namespace: dict,
    *,
    inputs: list[str] | None = None,
    outputs: list[str] | None = None,
    version: str | None = None,
    force: bool = False,
    replay: bool = True,
    allow_pickle: bool = True,
    exclude: set[str] | frozenset[str] = frozenset(),
    kind: str = "step",
    files: list[str] | None = None,
    transform: Callable[[str], str] | None = None,
    verify: str = "digest",
) -> tuple[StepSpec, Any]:
    """Work out a cell's inputs, outputs and libraries: the :class:`StepSpec` and the cell analysis.

    ``transform`` turns IPython syntax nested in the cell (a ``%%capture`` body, the statement
    after ``%time``) into Python (the shell's ``transform_cell``).
    """
    import types

    info, temporaries = _analysis(source, transform)
    if inputs is None:
        input_names = [n for n in info.reads if n in namespace and n not in exclude and not n.startswith("__")]
    else:
        missing = [n for n in inputs if n not in namespace]
        if missing:
            raise DreamerError(
                f"--inputs names {', '.join(map(repr, missing))}, which "
                f"{'is' if len(missing) == 1 else 'are'} not defined; run the cells that define "
                f"{'it' if len(missing) == 1 else 'them'} first or fix the list"
            )
        input_names = list(inputs)
    libraries = list(info.modules)
    values = {}
    for n in input_names:
        value = namespace[n]
        if isinstance(value, types.ModuleType) and not is_user_module(value.__name__):
            libraries.append(value.__name__.split(".")[0])  # a library counts by its distribution's version
        else:  # a local module (helpers.py, an editable package) counts by its code
            values[n] = value
    spec = StepSpec(
        name=name,
        source=source,
        inputs=values,
        outputs=list(outputs) if outputs is not None else list(info.outputs),
        strict_outputs=outputs is not None,
        rebind=list(info.rebind),
        version=version,
        libraries=libraries,
        force=force,
        replay=replay,
        allow_pickle=allow_pickle,
        verify=check_mode(verify),
        kind=kind,
        files=list(files or []),
        first_line=2,  # the cell's body starts under its %%dreamer_ line
        temporaries=list(temporaries),
    )
    return spec, info


def explain(
    name: str,
    source: str,
    namespace: dict,
    meta: dict | None,
    problem: str | None,
    *,
    inputs: list[str] | None = None,
    version: str | None = None,
    exclude: set[str] | frozenset[str] = frozenset(),
    kind: str = "step",
    components_for: Callable[[StepSpec], dict] = components_of,
) -> list[Reason]:
    """``%dreamer why``: what differs between the saved result and the cell as it is now.

    ``components_for`` computes the fingerprint components (trainers pass their own).
    """
    spec, _ = cell_spec(name, source, namespace, inputs=inputs, version=version, exclude=exclude, kind=kind)
    components = components_for(spec)
    recorded = (meta or {}).get("dependencies") or {}
    untracked = [Reason(line, "untracked") for line in recorded.get("untracked") or []]
    if meta is not None and meta.get("fingerprint") == fingerprint_of(components):
        from . import dependencies

        changes = [_dependency_reason(c) for c in dependencies.check(recorded, os.getcwd())] if recorded else []
        return (changes or [Reason.unchanged(meta["fingerprint"])]) + untracked
    return [
        Reason.input_undefined(r.subject) if r.kind == "input-gone" and r.subject not in namespace else r
        for r in why(meta, components, source, problem, first_line=spec.first_line, previews=input_previews(spec.inputs))
    ] + untracked


def run_cell_step(
    name: str,
    source: str,
    namespace: dict,
    *,
    frontend: Frontend | None = None,
    raw: str | None = None,
    status: Status | None = None,
    **options: Any,
) -> Status:
    """Run a cell as a step: work out inputs/outputs, fingerprint, hit or run, put outputs in ``namespace``.

    The ``frontend`` runs the body (``raw`` is the cell as typed, for tracebacks) and re-runs
    its ``import``/``def``/``class`` statements on a hit; ``options`` are those of
    :func:`cell_spec`, and ``started`` (a ``time.perf_counter()`` reading) is when the cell
    began, so that the status line times the whole cell.
    """
    __tracebackhide__ = True  # noqa: F841
    started = options.pop("started", None)
    frontend = frontend or current_frontend()
    options.setdefault("transform", frontend.transform)
    spec, info = cell_spec(name, source, namespace, **options)
    run = StepRun(spec, cell_body(frontend, source, namespace, raw, spec, info), status, frontend, namespace=namespace)
    run.cell_info = info
    run.started = started
    values = run.run()
    namespace.update(values)
    if run.status.state in (LOADED, RESTORED, PULLED):
        leave_as_run_left(namespace, info, run.meta)
    return run.status


def cell_body(frontend: Frontend, source: str, namespace: dict, raw: str | None, spec: StepSpec, info: Any) -> Callable[[], dict]:
    """The body of a cell step or trainer, run so that the outputs are what the run bound.

    A name the cell binds on some paths only (a loop that may not run, a branch) keeps its old
    value when that path does not run; such a value is no output of this run, so it is set
    aside first and put back afterwards, and only names the run did bind are saved.
    """

    def run_body() -> dict:
        __tracebackhide__ = True  # noqa: F841
        aside = {n: namespace.pop(n) for n in info.maybe_bound if n not in info.reads and n in namespace}
        try:
            frontend.run_cell(source, namespace, raw)
        finally:
            for name, value in aside.items():
                if name not in namespace:
                    namespace[name] = value
                    spec.unbound.add(name)
        spec.gone = [n for n in info.maybe_deleted if n not in namespace]
        return namespace

    return run_body


def leave_as_run_left(namespace: dict, info: Any, meta: dict | None) -> None:
    """After a hit: delete what the body's ``del`` statements deleted in the saved run."""
    for name in [*info.deleted, *((meta or {}).get("deleted") or [])]:
        namespace.pop(name, None)
