"""The one seam to the notebook: IPython runs the body, re-runs definitions, records and replays output, shows the status.

The step and trainer lifecycles (``steps.py``, ``trainers.py``) are handed a
:class:`~dreamer_magic.steps.Frontend`; this module's :class:`IPythonFrontend` is the one
``%load_ext dreamer_magic`` installs. Nothing else in the package reaches into IPython.

Examples
--------
>>> fe = IPythonFrontend(get_ipython())            # doctest: +SKIP
>>> steps.use_frontend(fe)                         # doctest: +SKIP
"""

from __future__ import annotations

import ast
import contextlib
import sys
from typing import Any, Iterator

from .status import Status
from .steps import Frontend


class IPythonFrontend(Frontend):
    """Run cells in an IPython shell: its compiler (tracebacks name the cell), its display system.

    Parameters
    ----------
    shell : IPython.core.interactiveshell.InteractiveShell
    live : ``None`` decides by the shell (a live widget card inside a Jupyter kernel, text in
        a terminal); ``False`` always prints text.
    """

    name = "ipython"

    def __init__(self, shell: Any, *, live: bool | None = None) -> None:
        super().__init__()
        self.shell = shell
        self.live = live
        self.transform = shell.transform_cell

    # -- running code ---------------------------------------------------------------
    def run_cell(self, source: str, namespace: dict, raw: str | None = None) -> None:
        """Run the cell's code as IPython would: the last expression is displayed, and a
        traceback names the right ``Cell In[n]`` and the line numbers the editor shows.

        ``raw`` is the cell as typed; when it starts with the ``%%dreamer_...`` line, the body
        is compiled one line down, so that its first line is line 2, as in the editor.
        """
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame in tracebacks
        shell = self.shell
        raw = raw if raw is not None else source
        header = raw.split("\n", 1)[0] if raw.startswith("%%") else None
        if header is not None:  # a comment keeps the cached text valid Python for inspect
            source = "\n" + source
            cached = "# " + header + source
        else:
            cached = source
        filename = shell.compile.cache(cached, shell.execution_count, raw_code=raw)
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        shell.last_execution_succeeded = True
        if tree.body:
            exec(compile(tree, filename, "exec"), namespace)
        if last is not None:
            exec(compile(ast.Interactive([last]), filename, "single"), namespace)
        if not shell.last_execution_succeeded:  # a nested cell (%%capture's body) failed; IPython swallowed it
            from .errors import DreamerError

            raise DreamerError(
                "the code under the cell magic in this cell failed (IPython caught the error; "
                "its traceback is in the captured output): fix it and run the cell again"
            )

    def rerun(self, statement: str, namespace: dict) -> None:
        """Re-run a definition through IPython's compiler, so its source stays findable (a
        function re-defined on a hit fingerprints exactly as the one the cell defined)."""
        shell = self.shell
        filename = shell.compile.cache(statement, shell.execution_count, raw_code=statement)
        exec(compile(statement, filename, "exec"), namespace)

    # -- output -----------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, records: list) -> Iterator[None]:
        """Record streams and rich outputs (HTML, images, plots, the last expression's value)
        while still showing them.

        Live widgets (progress bars, say) are not recorded: replayed later they would be a
        frozen snapshot of their first state. In a terminal the last expression's value is
        printed to stdout, which is recorded already.
        """

        def record(data: dict | None, metadata: dict | None) -> None:
            if data and not any("widget-view" in k or "widget-state" in k for k in data):
                records.append({"data": dict(data), "metadata": metadata or {}})

        pub = self.shell.display_pub
        hook = self.shell.displayhook
        original_publish = pub.publish
        original_write = hook.write_format_data

        def publish(data: dict, metadata: dict | None = None, *a: Any, **kw: Any) -> Any:
            if not kw.get("transient"):
                record(data, metadata)
            return original_publish(data, metadata, *a, **kw)

        def write_format_data(format_dict: dict, md_dict: dict | None = None) -> Any:
            record(format_dict, md_dict)
            return original_write(format_dict, md_dict)

        patches = [(pub, "publish", publish)]
        if type(hook).__name__.startswith("ZMQ"):
            patches.append((hook, "write_format_data", write_format_data))
        saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in patches]
        for obj, name, wrapper in patches:
            setattr(obj, name, wrapper)
        try:
            with super().capture(records):
                yield
        finally:  # put back exactly what was there (an outer step's wrapper, or nothing)
            for obj, name, before in saved:
                if before is None:
                    vars(obj).pop(name, None)
                else:
                    setattr(obj, name, before)

    def replay(self, records: list) -> None:
        """Show recorded output again: streams as text, rich outputs through IPython's display."""
        from IPython.display import publish_display_data

        for rec in records:
            if "stream" in rec:
                stream = sys.stderr if rec["stream"] == "stderr" else sys.stdout
                stream.write(rec["text"])
                stream.flush()
            elif "data" in rec:
                publish_display_data(rec["data"], rec.get("metadata") or {})

    def show(self, status: Status) -> Any:
        """A live card in a Jupyter kernel, a text line elsewhere; ``finish()`` shows the final state."""
        from .widgets import display_status

        return display_status(status, live=self.live)
