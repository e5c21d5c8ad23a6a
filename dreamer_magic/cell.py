"""What a cell reads and binds, from its AST. Pure: no IPython, no disk.

Examples
--------
>>> info = analyze("import numpy as np\\nreviews = raw[raw.stars > 2]\\nprint(len(reviews))")
>>> info.reads, info.outputs, info.rebind_names
(['raw', 'print', 'len'], ['reviews'], ['np'])
"""

from __future__ import annotations

import ast
import difflib
from dataclasses import dataclass, field

from .errors import DreamerError
from .fingerprint import code_lines


@dataclass
class CellInfo:
    """The result of :func:`analyze`.

    Attributes
    ----------
    reads : names read before the cell binds them, in first-read order (the candidate inputs;
        the caller keeps those that exist in the user namespace).
    outputs : names bound at top level by assignments, loops, ``with ... as`` and the like,
        plus names mutated in place (``df["x"] = ...``), in first-bind order; not those only
        bound by ``import``/``def``/``class``.
    rebind : source of the top-level ``import``/``def``/``class`` statements, re-run on a hit.
    rebind_names : the names those statements bind.
    deleted : names the cell deletes at top level (never outputs).
    """

    source: str
    reads: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    rebind: list[str] = field(default_factory=list)
    rebind_names: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)


def analyze(source: str) -> CellInfo:
    """Find a cell's inputs, outputs and re-runnable statements.

    Examples
    --------
    >>> analyze("x = x + 1").reads
    ['x']

    Raises
    ------
    DreamerError
        If the cell is not valid Python.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        raise DreamerError(f"the cell is not valid Python (line {e.lineno}: {e.msg}); fix the syntax and run it again") from None
    scanner = _Scanner()
    info = CellInfo(source=source)
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            segment = _segment(source, stmt)
            info.rebind.append(segment)
            names = scanner.definition(stmt)
            info.rebind_names.extend(n for n in names if n not in info.rebind_names)
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for alias in stmt.names:
                    module = alias.name if isinstance(stmt, ast.Import) else (stmt.module or "")
                    if module and stmt.__dict__.get("level", 0) == 0:
                        top = module.split(".")[0]
                        if top not in info.modules:
                            info.modules.append(top)
        else:
            scanner.statement(stmt)
    scanner.finish()
    info.reads = scanner.reads
    info.deleted = [n for n in scanner.deleted if n not in scanner.rebound_after_delete]
    info.outputs = [n for n in scanner.binds if n not in info.deleted and n not in scanner.definition_only(info.rebind_names)]
    return info


def _segment(source: str, stmt: ast.stmt) -> str:
    lines = source.splitlines(keepends=True)
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return "".join(lines[first - 1 : stmt.end_lineno])


class _Scanner:
    """Walks top-level statements in order, tracking what is bound so far."""

    def __init__(self) -> None:
        self.bound: set[str] = set()
        self.reads: list[str] = []
        self.binds: list[str] = []
        self.value_binds: set[str] = set()
        self.deferred: list[set[str]] = []  # free names of function bodies
        self.deleted: list[str] = []
        self.rebound_after_delete: set[str] = set()

    # -- bookkeeping --------------------------------------------------------------
    def read(self, name: str) -> None:
        if name not in self.bound and name not in self.reads:
            self.reads.append(name)

    def bind(self, name: str, *, value: bool = True) -> None:
        self.bound.add(name)
        if value:
            self.value_binds.add(name)
            if name in self.deleted:
                self.rebound_after_delete.add(name)
        if name not in self.binds:
            self.binds.append(name)

    def definition_only(self, names: list[str]) -> set[str]:
        return {n for n in names if n not in self.value_binds}

    def finish(self) -> None:
        for free in self.deferred:
            for name in sorted(free):
                if name not in self.binds:
                    self.read(name)

    # -- statements ---------------------------------------------------------------
    def definition(self, stmt: ast.stmt) -> list[str]:
        if isinstance(stmt, ast.Import):
            names = [(a.asname or a.name.split(".")[0]) for a in stmt.names]
        elif isinstance(stmt, ast.ImportFrom):
            names = [(a.asname or a.name) for a in stmt.names if a.name != "*"]
        else:
            for dec in stmt.decorator_list:
                self.expr(dec)
            if isinstance(stmt, ast.ClassDef):
                for base in stmt.bases + [k.value for k in stmt.keywords]:
                    self.expr(base)
                self.deferred.append(_free_names(stmt.body, set()))
            else:
                self._function(stmt)
            names = [stmt.name]
        for name in names:
            self.bind(name, value=False)
        return names

    def _function(self, fn: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        args = fn.args
        for default in args.defaults + [d for d in args.kw_defaults if d is not None]:
            self.expr(default)
        if not isinstance(fn, ast.Lambda):
            for a in _all_args(args):
                if a.annotation is not None:
                    self.expr(a.annotation)
        params = {a.arg for a in _all_args(args)}
        body = fn.body if isinstance(fn.body, list) else [ast.Expr(fn.body)]
        self.deferred.append(_free_names(body, params))

    def statement(self, stmt: ast.stmt) -> None:
        if isinstance(stmt, ast.Assign):
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
        elif isinstance(stmt, (ast.For, ast.AsyncFor)):
            self.expr(stmt.iter)
            self.target(stmt.target)
            self.block(stmt.body + stmt.orelse)
        elif isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                self.expr(item.context_expr)
                if item.optional_vars is not None:
                    self.target(item.optional_vars)
            self.block(stmt.body)
        elif isinstance(stmt, (ast.If, ast.While)):
            self.expr(stmt.test)
            self.block(stmt.body + stmt.orelse)
        elif isinstance(stmt, ast.Try) or type(stmt).__name__ == "TryStar":
            self.block(stmt.body)
            for handler in stmt.handlers:
                if handler.type is not None:
                    self.expr(handler.type)
                self.block(handler.body)
            self.block(stmt.orelse + stmt.finalbody)
        elif isinstance(stmt, ast.Delete):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    if target.id not in self.deleted:
                        self.deleted.append(target.id)
                    self.rebound_after_delete.discard(target.id)
                else:
                    self.expr(target)
        elif isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            # nested inside a block: binds like an assignment
            for name in self.definition(stmt):
                self.bind(name)
        elif isinstance(stmt, (ast.Global, ast.Nonlocal, ast.Pass, ast.Break, ast.Continue)):
            pass
        else:  # Expr, Return, Raise, Assert, Match, ...
            for node in ast.iter_child_nodes(stmt):
                if isinstance(node, ast.expr):
                    self.expr(node)
                elif isinstance(node, ast.stmt):
                    self.statement(node)
                else:  # match_case, pattern
                    for sub in ast.walk(node):
                        if isinstance(sub, ast.expr) and not isinstance(sub, ast.Name):
                            self.expr(sub)
                        elif isinstance(sub, ast.Name):
                            self.read(sub.id) if isinstance(sub.ctx, ast.Load) else self.bind(sub.id)
                        elif isinstance(sub, (ast.MatchAs, ast.MatchStar)) and sub.name:
                            self.bind(sub.name)
                        elif isinstance(sub, ast.stmt):
                            self.statement(sub)

    def block(self, stmts: list[ast.stmt]) -> None:
        for stmt in stmts:
            self.statement(stmt)

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

    def expr(self, node: ast.expr) -> None:
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                self.read(node.id)
            else:
                self.bind(node.id)
        elif isinstance(node, ast.NamedExpr):
            self.expr(node.value)
            self.target(node.target)
        elif isinstance(node, ast.Lambda):
            self._function(node)
            # lambdas are called right away as often as not: treat their reads as reads now
            for name in sorted(self.deferred.pop()):
                self.read(name)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for name in sorted(_free_names([ast.Expr(node)], set()), key=_first_use(node)):
                self.read(name)
        else:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.expr):
                    self.expr(child)
                elif isinstance(child, ast.comprehension):  # pragma: no cover - handled above
                    self.expr(child.iter)
                elif isinstance(child, ast.keyword):
                    self.expr(child.value)
                elif isinstance(child, (ast.arguments,)):
                    pass


def _first_use(node: ast.AST):
    order: dict[str, int] = {}
    for i, sub in enumerate(ast.walk(node)):
        if isinstance(sub, ast.Name):
            order.setdefault(sub.id, i)
    return lambda name: order.get(name, 0)


def _all_args(args: ast.arguments) -> list[ast.arg]:
    out = list(args.posonlyargs) + list(args.args) + list(args.kwonlyargs)
    if args.vararg:
        out.append(args.vararg)
    if args.kwarg:
        out.append(args.kwarg)
    return out


def _free_names(body: list[ast.stmt], params: set[str]) -> set[str]:
    """Names a nested scope reads that it does not bind itself (its free/global names)."""
    local = set(params)
    loads: set[str] = set()
    for stmt in body:
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name):
                if isinstance(node.ctx, ast.Load):
                    loads.add(node.id)
                else:
                    local.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                local.add(node.name)
            elif isinstance(node, ast.arg):
                local.add(node.arg)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    local.add(a.asname or a.name.split(".")[0])
            elif isinstance(node, ast.ExceptHandler) and node.name:
                local.add(node.name)
            elif isinstance(node, ast.Global):
                loads.update(node.names)
    return loads - local


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
