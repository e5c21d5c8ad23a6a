"""What a cell reads and binds, from its AST. Pure: no IPython, no disk.

Examples
--------
>>> info = analyze("import numpy as np\\nreviews = raw[raw.stars > 2]\\nprint(len(reviews))")
>>> info.reads, info.outputs, info.rebind_names
(['raw', 'print', 'len'], ['reviews'], ['np'])

The analysis is a definite-assignment one, as Python runs the cell: a name read at a point where
the cell has not bound it on *every* path so far (a branch that may not run, a loop that may run
zero times, a ``try`` body that may stop early, a comprehension, a short-circuit) may come from the
namespace, so it is a read. Names bound on *some* path are outputs, listed in
:attr:`CellInfo.maybe_bound` too (the lifecycle must save only those the run did bind).

The cell is the code after IPython's ``transform_cell``: ``%time x = f()`` arrives as
``get_ipython().run_line_magic('time', 'x = f()')``, a body that starts with ``%%capture out`` as
``get_ipython().run_cell_magic('capture', 'out', '...')``. The magics that run code in the
notebook's namespace (``%time``, ``%prun``, ``%timeit``, ``%%capture``, ``%%time``, ``%%prun``,
``%%timeit``) are analysed through; other cell magics are refused; line magics whose effect cannot
be analysed are listed in :attr:`CellInfo.unanalysable`.
"""

from __future__ import annotations

import ast
import difflib
import io
import re
import tokenize
from dataclasses import dataclass, field
from typing import Callable

from .errors import DreamerError
from .fingerprint import code_lines


@dataclass
class CellInfo:
    """The result of :func:`analyze`.

    Attributes
    ----------
    reads : names read where the cell has not bound them on every path before (``del x`` included),
        in first-read order (the candidate inputs; the caller keeps those that exist in the user
        namespace), then the free names of functions the cell defines, unless the cell binds them
        on every path.
    outputs : names bound at top level on any path (assignments, loops, ``with ... as``, walrus
        targets, also inside comprehensions, ``global`` names assigned by functions the cell
        defines, names bound by ``%time``/``%%capture`` and the like), plus names mutated in place
        (``df["x"] = ...``), in first-bind order; not those only bound by top-level
        ``import``/``def``/``class``, nor names the cell deletes on every path.
    maybe_bound : the outputs that some paths neither bind nor delete (a branch, a loop body, a
        comprehension's walrus, a function's ``global``). Where such a path runs, the run
        leaves the value the name had before, which must not be saved as the step's result: those not
        in ``reads`` (the cell never reads them before binding them) can be taken out of the
        namespace for the run, put back if the run did not bind them, and saved only if it did.
    rebind : source of the top-level ``import``/``def``/``class`` statements, re-run on a hit.
    rebind_names : the names those statements bind.
    deleted : names absent at the end of every path through the cell because it deletes them
        (``del a, b``, ``%xdel a``), in order; on a hit they must be deleted as a run would.
    maybe_deleted : names deleted on some paths only (``del x`` in a branch, the ``e`` of
        ``except ... as e``, which Python deletes when the handler ends); whether they exist after
        the run is known only then (the lifecycle records which are missing and deletes those on a
        hit). Those the cell also binds are in ``outputs``.
    modules : top-level modules the cell imports (absolute imports), in order.
    unanalysable : one line per thing the cell does whose effect cannot be analysed (``%run``,
        ``%store -r``, ``!shell`` commands, ``exec``...), naming it and why.
    """

    source: str
    reads: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    maybe_bound: list[str] = field(default_factory=list)
    rebind: list[str] = field(default_factory=list)
    rebind_names: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    maybe_deleted: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    unanalysable: list[str] = field(default_factory=list)


def analyze(source: str, *, transform: Callable[[str], str] | None = None, first_line: int = 1) -> CellInfo:
    """Find a cell's inputs, outputs and re-runnable statements.

    ``transform`` turns IPython syntax into Python (``shell.transform_cell``); it is applied to the
    code nested in magics (the body after ``%%capture``, the statement after ``%time``), which
    IPython transforms only when it runs it. Without it, nested code must be plain Python, except
    that a nested body may itself start with a cell magic line.

    Examples
    --------
    >>> analyze("x = x + 1").reads
    ['x']
    >>> analyze("if flag:\\n    x = 1\\nprint(x)").reads
    ['flag', 'print', 'x']
    >>> analyze("get_ipython().run_line_magic('time', 'y = f(x)')").outputs
    ['y']

    Raises
    ------
    DreamerError
        If the cell is not valid Python; if it uses ``return``, ``yield``, ``await``,
        ``nonlocal`` at the top level or ``break``/``continue`` outside a loop; if it runs a cell
        magic other than ``%%capture``, ``%%time``, ``%%timeit`` and ``%%prun``.
    """
    where = _Where(first_line=first_line)  # messages name the lines as the editor shows them
    tree = _parse(source, where)
    scanner = _Scanner(transform)
    scanner.where = where
    scanner.code(tree.body, source, where, top=True)
    return scanner.result(source)


# -- parsing and refusals ------------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """Where nested code comes from, for messages: the cell itself or a magic's body."""

    magic: str | None = None  # "%%capture", "%time", ...
    first_line: int = 1  # the editor's number of the cell's first line (2 under a %%dreamer_ line)

    def line(self, lineno: int | None) -> str:
        if lineno is None:
            return "line ?"
        return f"line {lineno + self.first_line - 1 if self.magic is None else lineno}"

    @property
    def what(self) -> str:
        return "the cell" if self.magic is None else f"the `{self.magic}` code"


def _parse(source: str, where: _Where, *, check: bool = True) -> ast.Module:
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        lines = source.splitlines()
        bad = lines[e.lineno - 1].lstrip() if e.lineno and e.lineno <= len(lines) else ""
        if where.magic is not None and bad[:1] in ("%", "!"):
            raise DreamerError(
                f"{where.line(e.lineno)} of {where.what} uses IPython syntax (`{_short(bad, 40)}`), which cannot be "
                f"analysed inside `{where.magic}`; write it as Python or move it to a cell of its own"
            ) from None
        raise DreamerError(
            f"{where.what} is not valid Python ({where.line(e.lineno)}: {e.msg}); fix the syntax and run it again"
        ) from None
    if check:
        _refuse_top_level(tree.body, where, loop=False)
        try:
            compile(tree, "<cell>", "exec", dont_inherit=True)
        except SyntaxError as e:
            raise DreamerError(
                f"{where.what} is not valid Python ({where.line(e.lineno)}: {e.msg}); fix the syntax and run it again"
            ) from None
    return tree


_REFUSED = {
    "return": "a step's body is not a function: remove it, or move the code into a function and call that",
    "yield": "only a function can yield: move the loop into a generator function and call it",
    "break": "a cell cannot be left early: put the rest of the cell under an `if` instead",
    "nonlocal": "there is no enclosing function: use `global` or remove it",
    "await": (
        "a step runs its body without an event loop: do the awaiting in a cell of its own before the "
        "step (or in an `async def` run with `asyncio.run(...)` where no loop is running) and use its result here"
    ),
}


def _refuse(node: ast.AST, word: str, where: _Where) -> None:
    reason = _REFUSED["break" if word == "continue" else word]
    if word in ("break", "continue"):
        head = f"`{word}` outside a loop in"
    elif word == "await":
        head = "top-level `await` in"
    else:
        head = f"`{word}` at the top level of"
    raise DreamerError(f"{head} {where.what} ({where.line(getattr(node, 'lineno', None))}): {reason}")


def _refuse_top_level(nodes: list, where: _Where, *, loop: bool) -> None:
    """Refuse what only a function (or a loop, or an event loop) allows, with one clear line each."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            outer = [*getattr(node, "decorator_list", []), node.args]
            _refuse_top_level(outer + ([node.returns] if getattr(node, "returns", None) else []), where, loop=loop)
            continue
        if isinstance(node, ast.ClassDef):
            _refuse_top_level([*node.decorator_list, *node.bases, *node.keywords], where, loop=loop)
            _refuse_top_level(node.body, where, loop=False)
            continue
        if isinstance(node, ast.Return):
            _refuse(node, "return", where)
        if isinstance(node, (ast.Yield, ast.YieldFrom)):
            _refuse(node, "yield", where)
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)) or (
            isinstance(node, ast.comprehension) and node.is_async
        ):
            _refuse(node if hasattr(node, "lineno") else node.iter, "await", where)
        if isinstance(node, ast.Nonlocal):
            _refuse(node, "nonlocal", where)
        if isinstance(node, (ast.Break, ast.Continue)) and not loop:
            _refuse(node, "break" if isinstance(node, ast.Break) else "continue", where)
        if isinstance(node, (ast.For, ast.While)):
            head = [node.target, node.iter] if isinstance(node, ast.For) else [node.test]
            _refuse_top_level(head + node.orelse, where, loop=loop)
            _refuse_top_level(node.body, where, loop=True)
            continue
        _refuse_top_level(list(ast.iter_child_nodes(node)), where, loop=loop)


# -- the flow state ------------------------------------------------------------------------


class _State:
    """What is known at one point of the cell: names bound on every path, names absent on every path."""

    __slots__ = ("bound", "absent", "written", "dead")

    def __init__(
        self,
        bound: set[str] | None = None,
        absent: set[str] | None = None,
        written: set[str] | None = None,
        dead: bool = False,
    ) -> None:
        self.bound = set(bound or ())
        self.absent = set(absent or ())
        self.written = set(written or ())  # bound or deleted at least once: the old value is gone
        self.dead = dead  # no path reaches here (after `raise`, `break`, `continue`)

    def copy(self, *, dead: bool | None = None) -> _State:
        return _State(self.bound, self.absent, self.written, self.dead if dead is None else dead)

    def without(self, binds: set[str], dels: set[str]) -> _State:
        """This state, as seen from any point of code that binds ``binds`` and deletes ``dels``."""
        return _State(self.bound - dels, self.absent - binds, self.written, self.dead)


def _merge(*states: _State) -> _State:
    live = [s for s in states if not s.dead] or [states[0].copy(dead=True)]
    out = live[0].copy()
    for s in live[1:]:
        out.bound &= s.bound
        out.absent &= s.absent
        out.written &= s.written
    return out


class _Frame:
    """A scope the scanner is in: the cell (module), a class body, or a comprehension."""

    def __init__(self, kind: str, state: _State | None = None, local: set[str] | None = None) -> None:
        self.kind = kind
        self.state = state or _State()
        self.local = local or set()  # comprehension variables
        self.globals: set[str] = set()  # `global` names of a class body


class _Loop:
    def __init__(self) -> None:
        self.breaks: list[_State] = []
        self.continues: list[_State] = []


# context managers known never to swallow an exception, so their body runs to its end or the cell fails
_NO_SUPPRESS = frozenset(
    "open no_grad inference_mode enable_grad set_grad_enabled autocast errstate catch_warnings redirect_stdout "
    "redirect_stderr TemporaryDirectory NamedTemporaryFile TemporaryFile ThreadPoolExecutor ProcessPoolExecutor "
    "Pool tqdm nullcontext option_context printoptions".split()
)


# -- the scanner ---------------------------------------------------------------------------


class _Scanner:
    """Walks the cell in execution order, tracking what is bound on every path so far."""

    def __init__(self, transform: Callable[[str], str] | None) -> None:
        self.transform = transform
        self.frames = [_Frame("module")]
        self.loops: list[_Loop] = []
        self.touched: list[tuple[set[str], set[str]]] = []  # binds, deletes of enclosing try/with bodies
        self.lines: list[str] = []  # of the code being scanned, for the source of rebind statements
        self.where = _Where()
        self.reads: list[str] = []
        self.binds: list[str] = []
        self.value_binds: set[str] = set()
        self.del_order: list[str] = []
        self.deferred: list[set[str]] = []  # free names of the functions the cell defines
        self.rebind: list[str] = []
        self.rebind_names: list[str] = []
        self.modules: list[str] = []
        self.unanalysable: list[str] = []

    # -- frames and state ---------------------------------------------------------------
    @property
    def flow(self) -> _Frame:
        """The innermost module or class frame: the one statements run in."""
        return next(f for f in reversed(self.frames) if f.kind != "comp")

    @property
    def state(self) -> _State:
        return self.flow.state

    @state.setter
    def state(self, value: _State) -> None:
        self.flow.state = value

    def result(self, source: str) -> CellInfo:
        final = self.frames[0].state
        for free in self.deferred:
            for name in sorted(free):
                if name not in final.bound and name not in self.reads:
                    self.reads.append(name)
        only_defined = {n for n in self.rebind_names if n not in self.value_binds}
        outputs = [n for n in self.binds if n not in final.absent and n not in only_defined]
        return CellInfo(
            source=source,
            reads=self.reads,
            outputs=outputs,
            maybe_bound=[n for n in outputs if n not in final.written],
            rebind=self.rebind,
            rebind_names=self.rebind_names,
            deleted=[n for n in self.del_order if n in final.absent],
            maybe_deleted=[n for n in self.del_order if n not in final.absent and n not in final.bound],
            modules=self.modules,
            unanalysable=self.unanalysable,
        )

    # -- bookkeeping --------------------------------------------------------------------
    def read(self, name: str) -> None:
        innermost = len(self.frames) - 1
        for i in range(innermost, -1, -1):
            frame = self.frames[i]
            if frame.kind == "comp":
                if name in frame.local:
                    return
            elif frame.kind == "class":
                # a class body sees its own names; nothing nested in it does
                if i == innermost and name in frame.state.bound and name not in frame.globals:
                    return
            elif name in frame.state.bound:
                return
        if name not in self.reads:
            self.reads.append(name)

    def bind(self, name: str, *, value: bool = True, output: bool = True) -> None:
        frame = self.flow
        if frame.kind == "class" and name in frame.globals:
            frame = self.frames[0]
        frame.state.bound.add(name)
        frame.state.absent.discard(name)
        frame.state.written.add(name)
        for binds, _ in self.touched:
            binds.add(name)
        if frame is self.frames[0] and output:
            if value:
                self.value_binds.add(name)
            if name not in self.binds:
                self.binds.append(name)

    def delete(self, name: str) -> None:
        frame = self.flow
        if frame.kind == "class" and name in frame.globals:
            frame = self.frames[0]
        frame.state.bound.discard(name)
        frame.state.absent.add(name)
        frame.state.written.add(name)
        for _, dels in self.touched:
            dels.add(name)
        if frame is self.frames[0] and name not in self.del_order:
            self.del_order.append(name)

    def note(self, what: str, reason: str) -> None:
        line = f"`{_short(what.strip(), 60)}`: {reason}"
        if line not in self.unanalysable:
            self.unanalysable.append(line)

    def touching(self) -> tuple[set[str], set[str]]:
        entry: tuple[set[str], set[str]] = (set(), set())
        self.touched.append(entry)
        return entry

    # -- code and statements ------------------------------------------------------------
    def code(self, stmts: list[ast.stmt], source: str, where: _Where, *, top: bool) -> None:
        """Scan a block of code from ``source`` (the cell, or code nested in a magic)."""
        saved = self.lines, self.where
        self.lines, self.where = source.splitlines(keepends=True), where
        try:
            self.block(stmts, top=top)
        finally:
            self.lines, self.where = saved

    def block(self, stmts: list[ast.stmt], *, top: bool = False) -> None:
        for stmt in stmts:
            self.statement(stmt, top=top)

    def statement(self, stmt: ast.stmt, *, top: bool = False) -> None:
        top = top and len(self.frames) == 1
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            self._import(stmt, top)
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._definition(stmt, top)
        elif isinstance(stmt, ast.Expr):
            magic = _magic_call(stmt.value)
            if magic is not None:
                self.magic(stmt.value, *magic, top=top)
            else:
                self.expr(stmt.value)
        elif isinstance(stmt, ast.Assign):
            self.expr(stmt.value)
            for target in stmt.targets:
                self.target(target)
        elif isinstance(stmt, ast.AugAssign):
            if isinstance(stmt.target, ast.Name):
                self.read(stmt.target.id)
            self.expr(stmt.value)
            self.target(stmt.target)
        elif isinstance(stmt, ast.AnnAssign):
            if stmt.value is not None:
                self.expr(stmt.value)
                self.target(stmt.target)
            elif not isinstance(stmt.target, ast.Name):
                self.expr(stmt.target.value)  # type: ignore[union-attr]
            self.expr(stmt.annotation)
        elif isinstance(stmt, ast.For):
            self._for(stmt)
        elif isinstance(stmt, ast.While):
            self._while(stmt)
        elif isinstance(stmt, ast.If):
            self.expr(stmt.test)
            before = self.state.copy()
            self.block(stmt.body)
            taken, self.state = self.state, before
            self.block(stmt.orelse)
            self.state = _merge(taken, self.state)
        elif isinstance(stmt, ast.With):
            self._with(stmt)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            self._try(stmt)  # type: ignore[arg-type]
        elif type(stmt).__name__ == "Match":
            self._match(stmt)
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                self._delete(target)
        elif isinstance(stmt, ast.Global):
            if self.flow.kind == "class":
                self.flow.globals.update(stmt.names)
        elif isinstance(stmt, ast.Raise):
            for node in (stmt.exc, stmt.cause):
                if node is not None:
                    self.expr(node)
            self.state.dead = True
        elif isinstance(stmt, (ast.Break, ast.Continue)):
            if self.loops:
                loop = self.loops[-1]
                (loop.breaks if isinstance(stmt, ast.Break) else loop.continues).append(self.state.copy())
            self.state.dead = True
        else:  # Assert, Pass, and what _parse already refused
            for node in ast.iter_child_nodes(stmt):
                if isinstance(node, ast.expr):
                    self.expr(node)

    def _import(self, stmt: ast.Import | ast.ImportFrom, top: bool) -> None:
        if top:
            self.rebind.append(_segment(self.lines, stmt))
        for alias in stmt.names:
            module = alias.name if isinstance(stmt, ast.Import) else (stmt.module or "")
            if module and getattr(stmt, "level", 0) == 0 and self.flow.kind == "module":
                top_module = module.split(".")[0]
                if top_module not in self.modules:
                    self.modules.append(top_module)
            if alias.name == "*":
                self.note(
                    f"from {module} import *",
                    "binds names that cannot be listed; import the names the step uses by name",
                )
                continue
            name = alias.asname or (alias.name.split(".")[0] if isinstance(stmt, ast.Import) else alias.name)
            if top and name not in self.rebind_names:
                self.rebind_names.append(name)
            self.bind(name, value=not top)

    def _definition(self, stmt: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, top: bool) -> None:
        if top:
            self.rebind.append(_segment(self.lines, stmt))
        for dec in stmt.decorator_list:
            self.expr(dec)
        if isinstance(stmt, ast.ClassDef):
            for base in stmt.bases + [k.value for k in stmt.keywords]:
                self.expr(base)
            self._class_body(stmt)
        else:
            self._function(stmt)
        if top and stmt.name not in self.rebind_names:
            self.rebind_names.append(stmt.name)
        self.bind(stmt.name, value=not top)

    def _class_body(self, stmt: ast.ClassDef) -> None:
        """A class body runs now, in a scope of its own that falls back on the cell's names."""
        loops, self.loops = self.loops, []
        self.frames.append(_Frame("class"))
        try:
            self.block(stmt.body)
        finally:
            self.frames.pop()
            self.loops = loops

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = fn.args
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.expr(default)
        if not isinstance(fn, ast.Lambda):
            for a in _all_args(args):
                if a.annotation is not None:
                    self.expr(a.annotation)
            if fn.returns is not None:
                self.expr(fn.returns)
        scope = _scope_of(fn)
        free = _free(scope)
        if isinstance(fn, ast.Lambda):
            # lambdas are called right away as often as not: their reads count here
            for name in sorted(free):
                self.read(name)
        else:
            self.deferred.append(free)
        for name in _global_stores(scope):  # `global x; x = ...` binds x when the function is called
            if name not in self.binds:
                self.binds.append(name)
                self.value_binds.add(name)

    def _for(self, stmt: ast.For) -> None:
        self.expr(stmt.iter)
        zero = self.state.copy()
        once = _runs_at_least_once(stmt.iter)

        def body() -> None:
            self.target(stmt.target)
            self.block(stmt.body)

        ends = self._loop(zero, body)
        self.state = _merge(*ends) if once else _merge(zero, *ends)
        self._loop_exit(stmt)

    def _while(self, stmt: ast.While) -> None:
        tests: list[_State] = []

        def body() -> None:
            self.expr(stmt.test)
            tests.append(self.state.copy())
            self.block(stmt.body)

        head = self.state.copy()
        self._loop(head, body)
        forever = isinstance(stmt.test, ast.Constant) and bool(stmt.test.value)
        # the loop ends where its test is false (never for `while True`), not part-way through the body
        self.state = head.copy(dead=True) if forever else _merge(*tests)
        self._loop_exit(stmt)

    def _loop(self, head: _State, body: Callable[[], None]) -> list[_State]:
        """Scan a loop body until the state at its head settles; the states at the end of an iteration."""
        self.loops.append(_Loop())
        ends: list[_State] = []
        while True:
            self.state = head.copy()
            body()
            loop = self.loops[-1]
            ends = [self.state.copy(), *loop.continues]
            settled = _merge(head, *ends)
            if settled.bound == head.bound and settled.absent == head.absent:
                break
            head = settled
        return ends

    def _loop_exit(self, stmt: ast.For | ast.While) -> None:
        loop = self.loops.pop()
        self.block(stmt.orelse)
        self.state = _merge(self.state, *loop.breaks)

    def _with(self, stmt: ast.With) -> None:
        for item in stmt.items:
            self.expr(item.context_expr)
            if item.optional_vars is not None:
                self.target(item.optional_vars)
        if all(_never_suppresses(item.context_expr) for item in stmt.items):
            self.block(stmt.body)
            return
        # the context manager may swallow an exception: the body may stop anywhere
        before = self.state.copy()
        binds, dels = self.touching()
        try:
            self.block(stmt.body)
        finally:
            self.touched.pop()
        self.state = _merge(self.state, before.without(binds, dels))

    def _try(self, stmt: ast.Try) -> None:
        before = self.state.copy()
        all_binds, all_dels = self.touching()
        body_binds, body_dels = self.touching()
        self.block(stmt.body)
        self.touched.pop()
        raised = before.without(body_binds, body_dels)  # where a handler starts: anywhere in the body
        self.block(stmt.orelse)
        ends = [self.state]
        for handler in stmt.handlers:
            self.state = raised.copy()
            if handler.type is not None:
                self.expr(handler.type)
            if handler.name:
                self.bind(handler.name, output=False)
            self.block(handler.body)
            if handler.name:  # Python deletes `e` when the handler ends
                self.delete(handler.name)
            ends.append(self.state)
        self.touched.pop()
        after = _merge(*ends)
        if stmt.finalbody:
            if any(isinstance(n, (ast.Break, ast.Continue)) for s in stmt.finalbody for n in ast.walk(s)):
                # a `break` in `finally` swallows an exception: the cell goes on from any point of the try
                self.state = _merge(after, before.without(all_binds, all_dels))
                self.block(stmt.finalbody)
            # (otherwise an exception re-raises after `finally`: the run fails, its reads then do not matter)
            self.state = after
            self.block(stmt.finalbody)
        else:
            self.state = after

    def _match(self, stmt: ast.AST) -> None:
        self.expr(stmt.subject)  # type: ignore[attr-defined]
        before = self.state.copy()
        ends = []
        for case in stmt.cases:  # type: ignore[attr-defined]
            self.state = before.copy()
            self._pattern(case.pattern)
            if case.guard is not None:
                self.expr(case.guard)
            self.block(case.body)
            ends.append(self.state)
            if case.guard is None and _irrefutable(case.pattern):
                break
        else:
            ends.append(before)  # no case matched
        self.state = _merge(*ends)

    def _pattern(self, pattern: ast.AST) -> None:
        kind = type(pattern).__name__
        if kind == "MatchValue":
            self.expr(pattern.value)  # type: ignore[attr-defined]
            return
        if kind == "MatchMapping":
            for key in pattern.keys:  # type: ignore[attr-defined]
                self.expr(key)
        if kind == "MatchClass":
            self.expr(pattern.cls)  # type: ignore[attr-defined]
        for child in ast.iter_child_nodes(pattern):
            if not isinstance(child, ast.expr):
                self._pattern(child)
        name = getattr(pattern, "name", None) if kind in ("MatchAs", "MatchStar") else getattr(pattern, "rest", None)
        if name:
            self.bind(name)

    def _delete(self, target: ast.expr) -> None:
        if isinstance(target, ast.Name):
            self.read(target.id)  # `del x` fails unless x exists: what it does depends on the namespace
            self.delete(target.id)
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self._delete(elt)
        else:  # `del d["k"]`, `del obj.attr`: mutates d / obj
            self.target(target)

    def target(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            self.bind(node.id)
        elif isinstance(node, (ast.Tuple, ast.List)):
            for elt in node.elts:
                self.target(elt)
        elif isinstance(node, ast.Starred):
            self.target(node.value)
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            # in-place mutation: `df["x"] = ...` reads df and makes it an output
            self.expr(node)
            base = node
            while isinstance(base, (ast.Attribute, ast.Subscript)):
                base = base.value
            if isinstance(base, ast.Name):
                self.bind(base.id)

    # -- expressions --------------------------------------------------------------------
    def expr(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.read(node.id)
            else:
                self.bind(node.id)
        elif isinstance(node, ast.NamedExpr):
            self.expr(node.value)
            self.bind(node.target.id)  # in a comprehension too: walrus binds in the enclosing scope
        elif isinstance(node, ast.BoolOp):
            self.expr(node.values[0])
            before = self.state.copy()
            for value in node.values[1:]:  # evaluated only as far as needed
                self.expr(value)
            self.state = _merge(before, self.state)
        elif isinstance(node, ast.IfExp):
            self.expr(node.test)
            before = self.state.copy()
            self.expr(node.body)
            taken, self.state = self.state, before
            self.expr(node.orelse)
            self.state = _merge(taken, self.state)
        elif isinstance(node, ast.Lambda):
            self._function(node)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            self._comprehension(node)
        elif isinstance(node, ast.Call) and _magic_call(node) is not None:
            self.magic(node, *_magic_call(node), top=False)  # type: ignore[misc]
        else:
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in _DYNAMIC
                and node.func.id not in self.state.bound
                and not (node.func.id == "vars" and node.args)
            ):
                self.note(
                    _unparse(node),
                    "can read and bind names that cannot be listed; name them with --inputs/--outputs",
                )
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
                elif isinstance(child, ast.keyword):
                    self.expr(child.value)

    def _comprehension(self, node: ast.ListComp | ast.SetComp | ast.GeneratorExp | ast.DictComp) -> None:
        first, *rest = node.generators
        self.expr(first.iter)  # evaluated in the enclosing scope, once
        before = self.state.copy()
        local = {n.id for g in node.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}
        self.frames.append(_Frame("comp", local=local))
        try:
            for cond in first.ifs:
                self.expr(cond)
            for gen in rest:
                self.expr(gen.iter)
                for cond in gen.ifs:
                    self.expr(cond)
            if isinstance(node, ast.DictComp):
                self.expr(node.key)
                self.expr(node.value)
            else:
                self.expr(node.elt)
        finally:
            self.frames.pop()
        self.state = _merge(before, self.state)  # the body may run zero times

    # -- magics -------------------------------------------------------------------------
    def magic(self, node: ast.Call, method: str, args: list[str] | None, *, top: bool) -> None:
        """``get_ipython().run_line_magic(...)`` and friends: analyse what the magic runs."""
        if args is None:
            self.note(_unparse(node), "calls IPython with a computed argument, which cannot be analysed")
            for arg in node.args:
                self.expr(arg)
            return
        if method in ("getoutput", "system"):
            self._shell(args[0], f"!{args[0]}")
        elif method == "run_line_magic":
            self._line_magic(args[0], args[1], node, top)
        else:
            self._cell_magic(args[0], args[1], args[2], top=top)

    def nested(self, text: str, magic: str, *, top: bool, interruptible: bool = False) -> None:
        """Code a magic runs in the notebook's namespace, as if it were part of the cell."""
        before = self.state.copy()
        binds, dels = self.touching()
        try:
            lead = _leading_cell_magic(text) if self.transform is None else None
            if lead is not None:
                self._cell_magic(*lead, top=top)
            else:
                source = self.transform(text) if self.transform is not None else text
                where = _Where(magic)
                self.code(_parse(source, where).body, source, where, top=top)
        finally:
            self.touched.pop()
        if interruptible:  # an error stops the code anywhere, and the cell goes on
            self.state = _merge(self.state, before.without(binds, dels))

    def _function_scope(self, texts: list[str], magic: str) -> None:
        """Code a magic runs inside a function (``%timeit``): its free names are reads now."""
        body: list[ast.stmt] = []
        for text in texts:
            if text.strip():
                source = self.transform(text) if self.transform is not None else text
                body.extend(_parse(source, _Where(magic), check=False).body)
        for name in sorted(_free(_body_scope(set(), body))):
            self.read(name)

    def _line_magic(self, name: str, line: str, node: ast.Call, top: bool) -> None:
        shown = f"%{name} {line}"
        if name.startswith("%"):
            raise DreamerError(
                f"`%{name}` is not on the first line of {self.where.what} ({self.where.line(node.lineno)}): a cell "
                f"magic only works as the first line of a body; move it there, right under the %%dreamer_step line"
            )
        if name == "time":
            no_raise, code = _strip_long_option(line, "--no-raise-error")
            self.nested(code, "%time", top=top, interruptible=no_raise)
        elif name == "prun":
            opts, code = _options(line, "D:l:rs:T:q")
            if "D" in opts or "T" in opts:
                self.note(shown, "writes profiler statistics to a file, which a hit does not write again")
            self.nested(code, "%prun", top=top)
        elif name == "timeit":
            opts, code = _options(line, "n:r:tcp:qov:")
            self._function_scope([code], "%timeit")
            if opts.get("v", "").isidentifier():
                self.bind(opts["v"])
        elif name == "xdel":
            _, target = _options(line, "n")
            if target.isidentifier():
                self.read(target)
                self.delete(target)
            else:
                self.note(shown, "deletes a name that cannot be analysed")
        elif name in _SHOWS_OBJECT:
            try:
                self.expr(ast.parse(line.strip().rstrip("?"), mode="eval").body)
            except SyntaxError:
                pass
        elif name in _HARMLESS:
            pass
        elif name in _SHELL:
            self._shell(line, shown)
        else:
            for reads in _expanded_names(line):
                self.read(reads)
            reason = _LINE_MAGICS.get(name)
            if name == "store":
                reason = _STORE_READ if re.search(r"(^|\s)-\w*r", line) else _STORE_WRITE
            self.note(shown, reason or "a magic whose effect on the namespace cannot be analysed")

    def _cell_magic(self, name: str, line: str, body: str, *, top: bool) -> None:
        if name == "capture":
            words = [w for w in line.split() if not w.startswith("-")]
            self.nested(body, "%%capture", top=top, interruptible=True)  # run_cell swallows errors
            if words:
                if _ends_with_semicolon(body):  # IPython deletes the variable then
                    self.delete(words[0])
                else:
                    self.bind(words[0])
        elif name == "time":
            no_raise, _ = _strip_long_option(line, "--no-raise-error")
            self.nested(body, "%%time", top=top, interruptible=no_raise)
        elif name == "prun":
            opts, code = _options(line, "D:l:rs:T:q")
            if "D" in opts or "T" in opts:
                self.note(f"%%prun {line}", "writes profiler statistics to a file, which a hit does not write again")
            self.nested(code + "\n" + body, "%%prun", top=top)
        elif name == "timeit":
            opts, setup = _options(line, "n:r:tcp:qov:")
            self._function_scope([setup, body], "%%timeit")
            if opts.get("v", "").isidentifier():
                self.bind(opts["v"])
        else:
            raise DreamerError(f"`%%{name}` cannot run inside a step: {_cell_magic_fix(name)}")

    def _shell(self, command: str, shown: str) -> None:
        for name in _expanded_names(command):
            self.read(name)
        self.note(shown, "runs a shell command; what it reads and writes outside Python is not tracked")


# -- magics: tables and small parsers ------------------------------------------------------

_DYNAMIC = frozenset({"exec", "eval", "globals", "locals", "vars"})
_SHOWS_OBJECT = frozenset({"pinfo", "pinfo2", "pdef", "pdoc", "psource", "pfile", "page"})
_HARMLESS = frozenset(
    "who whos who_ls lsmagic magic quickref pprint precision matplotlib xmode colors history hist psearch "
    "pwd dhist dirs".split()
)
_SHELL = frozenset("sx system ls ll lf lk ldir lx cat cp mv rm mkdir rmdir sc".split())
_STORE_READ = (
    "loads variables from IPython's store: the names it binds are not tracked "
    "(run it in a cell of its own before the step)"
)
_STORE_WRITE = "writes to IPython's store, which a hit does not do again"
_LINE_MAGICS = {
    "run": "runs another file: the names it binds and what it reads are not tracked (import it as a module instead)",
    "load": "inserts a file's code, which is not analysed",
    "loadpy": "inserts a file's code, which is not analysed",
    "autoreload": "changes how modules are reloaded; put it in a cell of its own",
    "aimport": "changes how modules are reloaded; put it in a cell of its own",
    "reset": "deletes names that cannot be listed",
    "reset_selective": "deletes names that cannot be listed",
    "cd": "changes the working directory, which a hit does not do again",
    "pushd": "changes the working directory, which a hit does not do again",
    "popd": "changes the working directory, which a hit does not do again",
    "env": "reads or sets environment variables, which are not tracked",
    "set_env": "sets an environment variable, which a hit does not do again",
    "pip": "installs packages, which a hit does not do again",
    "conda": "installs packages, which a hit does not do again",
    "mamba": "installs packages, which a hit does not do again",
    "micromamba": "installs packages, which a hit does not do again",
    "uv": "installs packages, which a hit does not do again",
    "config": "changes configuration, which a hit does not do again",
    "pylab": "binds numpy and matplotlib names that cannot be listed",
    "macro": "runs code from the history, which is not analysed",
    "rerun": "runs code from the history, which is not analysed",
    "recall": "runs code from the history, which is not analysed",
    "edit": "runs code from an editor, which is not analysed",
    "ed": "runs code from an editor, which is not analysed",
    "load_ext": "loads an extension, which a hit does not do again",
    "reload_ext": "loads an extension, which a hit does not do again",
    "unload_ext": "unloads an extension, which a hit does not do again",
}
_OTHER_PROCESS = frozenset("bash sh script system sx ! perl ruby python python2 python3 pypy".split())
_DISPLAY_ONLY = frozenset("html HTML svg SVG javascript js latex markdown".split())


def _cell_magic_fix(name: str) -> str:
    if name in ("writefile", "file"):
        return f"a hit would not write the file again; put %%{name} in its own cell before the step"
    if name in _OTHER_PROCESS:
        return (
            f"it runs its body in another process, which a step cannot fingerprint or replay; put %%{name} "
            "in its own cell before the step, or call subprocess.run(...) in the step"
        )
    if name in _DISPLAY_ONLY:
        return f"it only displays its body; put %%{name} in its own cell"
    return (
        f"only %%capture, %%time, %%timeit and %%prun run their body in the notebook's namespace; "
        f"put %%{name} in its own cell before the step"
    )


def _magic_call(node: ast.expr) -> tuple[str, list[str] | None] | None:
    """``get_ipython().run_line_magic('time', 'x = 1')`` -> ``("run_line_magic", ["time", "x = 1"])``.

    The arguments are ``None`` when they are not plain strings.
    """
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
        return None
    arity = {"run_line_magic": 2, "run_cell_magic": 3, "getoutput": 1, "system": 1}.get(node.func.attr)
    owner = node.func.value
    if arity is None or not (
        isinstance(owner, ast.Call)
        and isinstance(owner.func, ast.Name)
        and owner.func.id == "get_ipython"
        and not owner.args
        and not owner.keywords
    ):
        return None
    args = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    if len(args) != len(node.args) or len(args) < arity or node.keywords:
        return node.func.attr, None
    return node.func.attr, args[:arity]


def _leading_cell_magic(text: str) -> tuple[str, str, str] | None:
    """``"%%time\\nx = 1"`` -> ``("time", "", "x = 1")``: a nested body that starts with a cell magic."""
    stripped = text.lstrip("\n")
    if not stripped.startswith("%%"):
        return None
    first, _, body = stripped.partition("\n")
    name, _, line = first[2:].strip().partition(" ")
    return name, line.strip(), body


def _options(line: str, spec: str) -> tuple[dict[str, str], str]:
    """Split leading getopt-style options off a magic's line, as IPython's ``parse_options`` does.

    >>> _options("-q -l 10 x = f()", "D:l:rs:T:q")
    ({'q': '', 'l': '10'}, 'x = f()')
    """
    with_value = {c for c, nxt in zip(spec, spec[1:] + " ") if c != ":" and nxt == ":"}
    flags = set(spec) - {":"}
    opts: dict[str, str] = {}
    rest = line
    while True:
        m = re.match(r"\s*(\S+)", rest)
        if m is None or not m.group(1).startswith("-") or len(m.group(1)) < 2:
            break
        if m.group(1) == "--":
            rest = rest[m.end() :]
            break
        chars, used, found = m.group(1)[1:], m.end(), {}
        for i, c in enumerate(chars):
            if c not in flags:
                found = None
                break
            if c in with_value:
                value = chars[i + 1 :]
                if not value:
                    nxt = re.match(r"\s*(\S+)", rest[used:])
                    if nxt is None:
                        found = None
                        break
                    value, used = nxt.group(1), used + nxt.end()
                found[c] = value
                break
            found[c] = ""
        if found is None:
            break
        opts.update(found)
        rest = rest[used:]
    return opts, rest.strip()


def _strip_long_option(line: str, option: str) -> tuple[bool, str]:
    stripped = line.lstrip()
    if stripped == option or stripped.startswith(option + " "):
        return True, stripped[len(option) :].strip()
    return False, line.strip()


def _expanded_names(command: str) -> list[str]:
    """Names IPython expands into a shell command or a magic's line (``$name``, ``{expr}``)."""
    names: list[str] = []
    for m in re.finditer(r"\$\$|\$([A-Za-z_]\w*)|\{([^{}]+)\}", command):
        found = [m.group(1)] if m.group(1) else []
        if m.group(2):
            try:
                tree = ast.parse(m.group(2).strip(), mode="eval")
            except SyntaxError:
                continue
            found = [n.id for n in ast.walk(tree) if isinstance(n, ast.Name)]
        names.extend(n for n in found if n not in names)
    return names


def _ends_with_semicolon(code: str) -> bool:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, SyntaxError):
        return False
    skip = (tokenize.ENDMARKER, tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT)
    last = next((t for t in reversed(tokens) if t.type not in skip), None)
    return last is not None and last.type == tokenize.OP and last.string == ";"


def _never_suppresses(node: ast.expr) -> bool:
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    return name in _NO_SUPPRESS


def _runs_at_least_once(iterable: ast.expr) -> bool:
    """A literal, non-empty iterable (``[1, 2]``, ``"ab"``, ``range(3)``): the loop body runs."""
    if isinstance(iterable, (ast.List, ast.Tuple, ast.Set)):
        return bool(iterable.elts) and not any(isinstance(e, ast.Starred) for e in iterable.elts)
    if isinstance(iterable, ast.Constant):
        return isinstance(iterable.value, (str, bytes)) and bool(iterable.value)
    if isinstance(iterable, ast.Call) and isinstance(iterable.func, ast.Name) and iterable.func.id == "range":
        ints = [a.value for a in iterable.args if isinstance(a, ast.Constant) and type(a.value) is int]
        if len(ints) != len(iterable.args) or iterable.keywords or not 1 <= len(ints) <= 3:
            return False
        return len(range(*ints)) > 0 if (len(ints) < 3 or ints[2] != 0) else False
    return False


def _irrefutable(pattern: ast.AST) -> bool:
    kind = type(pattern).__name__
    if kind == "MatchAs":
        return pattern.pattern is None or _irrefutable(pattern.pattern)  # type: ignore[attr-defined]
    if kind == "MatchOr":
        return any(_irrefutable(p) for p in pattern.patterns)  # type: ignore[attr-defined]
    return False


def _segment(lines: list[str], stmt: ast.stmt) -> str:
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return "".join(lines[first - 1 : stmt.end_lineno])


def _unparse(node: ast.AST) -> str:
    try:
        return ast.unparse(node)
    except Exception:  # pragma: no cover - unparse handles every parsed node
        return type(node).__name__


def _all_args(args: ast.arguments) -> list[ast.arg]:
    out = list(args.posonlyargs) + list(args.args) + list(args.kwonlyargs)
    if args.vararg:
        out.append(args.vararg)
    if args.kwarg:
        out.append(args.kwarg)
    return out


# -- the names of nested scopes (functions, lambdas, classes, comprehensions) ---------------


class _Scope:
    def __init__(self, kind: str) -> None:
        self.kind = kind  # "function", "class" or "comp"
        self.loads: set[str] = set()
        self.stores: set[str] = set()
        self.globals: set[str] = set()
        self.nonlocals: set[str] = set()
        self.walrus: set[str] = set()  # a comprehension's walrus targets: they bind in the enclosing scope
        self.children: list[_Scope] = []


def _scope_of(fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> _Scope:
    """The names of a function's own scope and of the scopes nested in it."""
    params = {a.arg for a in _all_args(fn.args)}
    return _body_scope(params, fn.body if isinstance(fn.body, list) else [fn.body])


def _body_scope(params: set[str], body: list) -> _Scope:
    scope = _Scope("function")
    scope.stores.update(params)
    _walk(body, scope)
    return scope


def _walk(nodes: list, scope: _Scope) -> None:
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            if not isinstance(node, ast.Lambda):
                scope.stores.add(node.name)
                stack.extend(node.decorator_list)
                stack.extend(a.annotation for a in _all_args(node.args) if a.annotation is not None)
                if node.returns is not None:
                    stack.append(node.returns)
            stack.extend(node.args.defaults + [d for d in node.args.kw_defaults if d is not None])
            scope.children.append(_scope_of(node))
        elif isinstance(node, ast.ClassDef):
            scope.stores.add(node.name)
            stack.extend([*node.decorator_list, *node.bases, *(k.value for k in node.keywords)])
            child = _Scope("class")
            _walk(node.body, child)
            scope.children.append(child)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            first, *rest = node.generators
            stack.append(first.iter)
            child = _Scope("comp")
            inner: list = [first.target, *first.ifs]
            for gen in rest:
                inner += [gen.target, gen.iter, *gen.ifs]
            inner += [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            _walk(inner, child)
            scope.children.append(child)
            (scope.walrus if scope.kind == "comp" else scope.stores).update(child.walrus)
        elif isinstance(node, ast.NamedExpr) and scope.kind == "comp":
            scope.walrus.add(node.target.id)
            stack.append(node.value)
        elif isinstance(node, ast.Name):
            (scope.loads if isinstance(node.ctx, ast.Load) else scope.stores).add(node.id)
        elif isinstance(node, ast.Global):
            scope.globals.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            scope.nonlocals.update(node.names)
        else:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                scope.stores.update(
                    a.asname or (a.name.split(".")[0] if isinstance(node, ast.Import) else a.name)
                    for a in node.names
                    if a.name != "*"
                )
            elif isinstance(node, ast.ExceptHandler) and node.name:
                scope.stores.add(node.name)
            elif type(node).__name__ in ("MatchAs", "MatchStar") and getattr(node, "name", None):
                scope.stores.add(node.name)
            elif type(node).__name__ == "MatchMapping" and getattr(node, "rest", None):
                scope.stores.add(node.rest)
            stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _free(scope: _Scope) -> set[str]:
    """Names a scope (and the scopes nested in it) reads from the cell's namespace or builtins."""
    inner: set[str] = set()
    for child in scope.children:
        inner |= _free(child)
    local = scope.stores - scope.globals - scope.nonlocals
    if scope.kind == "class":  # what is nested in a class body does not see the class's names
        return (scope.loads - local) | inner
    return (scope.loads | inner) - local


def _global_stores(scope: _Scope) -> set[str]:
    """Names a function assigns after declaring them ``global`` (in it or in a scope nested in it)."""
    out = scope.globals & scope.stores
    for child in scope.children:
        out |= _global_stores(child)
    return out


def changed_lines(old: str, new: str) -> list[str]:
    """Describe how the code lines of a cell changed, for "why did it run".

    Examples
    --------
    >>> changed_lines("a = 1\\nb = 2", "a = 1\\nb = 3")
    ['line 2: `b = 2` → `b = 3`']
    """
    out = []
    for where, before, after in line_changes(old, new):
        if before is not None and after is not None:
            out.append(f"{where}: `{before}` → `{after}`")
        elif after is not None:
            out.append(f"{where} added: `{after}`")
        else:
            out.append(f"{where}: removed `{before}`")
    return out


def line_changes(old: str, new: str, first_line: int = 1) -> list[tuple[str, str | None, str | None]]:
    """Where the code lines of a cell changed: ``(where, before, after)``, shortened.

    ``where`` uses the line numbers the editor shows for the new code: comments and blank lines
    count as lines (they do not count as changes), and ``first_line`` is the number of the
    code's first line (2 for a cell body under its ``%%dreamer_step`` line). ``before`` is
    ``None`` for added lines, ``after`` is ``None`` for removed ones.

    Examples
    --------
    >>> line_changes("a = 1\\nb = 2", "a = 1\\nb = 3\\nc = 4")
    [('lines 2-3', 'b = 2', 'b = 3 / c = 4')]
    >>> line_changes("a = 1", "# note\\na = 2", first_line=2)
    [('line 3', 'a = 1', 'a = 2')]
    """
    old_lines, new_lines = code_lines(old), code_lines(new)
    numbers = [
        first_line + i for i, line in enumerate(new.splitlines()) if line.strip() and not line.strip().startswith("#")
    ]

    def number(j: int) -> int:  # the editor's number of the new code's j-th counted line
        if j < len(numbers):
            return numbers[j]
        return (numbers[-1] + 1) if numbers else first_line

    out: list[tuple[str, str | None, str | None]] = []
    matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        before = _short(" / ".join(s.strip() for s in old_lines[i1:i2]))
        after = _short(" / ".join(s.strip() for s in new_lines[j1:j2]))
        start, end = number(j1), number(j2 - 1)
        where = f"line {start}" if j2 - j1 <= 1 or end == start else f"lines {start}-{end}"
        if op == "replace":
            out.append((where, before, after))
        elif op == "insert":
            out.append((where, None, after))
        else:
            out.append((f"line {number(j1)}", before, None))
    return out


def loop_names(source: str) -> list[str]:
    """Names bound only as ``for`` loop targets at the cell's top level (its temporaries).

    >>> loop_names("for i, row in enumerate(rows):\\n    total = i\\nrow = 1")
    ['i']
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    nodes: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:  # every node of the cell's own scope (not inside a def, class or lambda)
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))
    found: list[tuple[int, int, str]] = []
    scoped: set[int] = set()  # Name nodes bound by a loop, or inside a comprehension
    for node in nodes:
        if isinstance(node, (ast.For, ast.AsyncFor)):
            for n in ast.walk(node.target):
                if isinstance(n, ast.Name):
                    scoped.add(id(n))
                    found.append((n.lineno, n.col_offset, n.id))
        elif isinstance(node, ast.comprehension):
            scoped.update(id(n) for n in ast.walk(node.target))
    other = {
        n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store) and id(n) not in scoped
    }
    other |= {n.name for n in nodes if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    loops: list[str] = []
    for _, _, name in sorted(found):
        if name not in loops:
            loops.append(name)
    return [n for n in loops if n not in other]


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
