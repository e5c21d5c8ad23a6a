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
import html
import sys
import threading
from typing import Any, Iterator

from .render import StatusHandle, TextStatus
from .status import FAILED, Status
from .steps import Frontend, active_runs


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
        self._shown: list[_Shown] = []  # status handles of the steps running now, outermost first

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
        """Record what the body shows, as it ends up, while still showing it.

        Streams and rich outputs (HTML, images, plots, the last expression's value) are kept in
        order and collapsed to their final state when the body ends: a display updated in place
        (``display(..., display_id=...)`` then ``handle.update(...)``, the Trainer's
        training/validation table) keeps its last data; ``clear_output()`` drops what came
        before; carriage returns in a stream (a tqdm bar in text) keep what the line finally
        read; a widget (a tqdm bar in a notebook) becomes the text and HTML of its last state,
        or nothing if it was closed. Status cards of this package are not recorded.
        """
        rec = _Recording(records)
        pub = self.shell.display_pub
        hook = self.shell.displayhook
        original_publish = pub.publish
        original_write = hook.write_format_data
        original_clear = pub.clear_output
        live_handles = [h for h in self._shown if h.live]
        for handle in live_handles:  # the body is about to show things: the card goes live above them
            handle.go_live()

        def publish(data: dict, metadata: dict | None = None, *a: Any, **kw: Any) -> Any:
            rec.display(data, metadata, kw.get("transient"), bool(kw.get("update")))
            with _quiet():  # a terminal prints the text/plain: recorded once, as the display
                return original_publish(data, metadata, *a, **kw)

        def write_format_data(format_dict: dict, md_dict: dict | None = None) -> Any:
            rec.display(format_dict, md_dict, None, False)
            with _quiet():
                return original_write(format_dict, md_dict)

        def clear_output(*a: Any, **kw: Any) -> Any:
            with _quiet():
                result = original_clear(*a, **kw)
            rec.clear()
            for handle in live_handles:  # the cell's output area is gone, our card with it
                handle.cleared()
            return result

        patches = [(pub, "publish", publish), (pub, "clear_output", clear_output)]
        if type(hook).__name__.startswith("ZMQ"):
            patches.append((hook, "write_format_data", write_format_data))
        saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in patches]
        for obj, name, wrapper in patches:
            setattr(obj, name, wrapper)
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(out, "stdout", rec), _Tee(err, "stderr", rec)
        try:
            yield
        finally:  # put back exactly what was there (an outer step's wrapper, or nothing)
            sys.stdout, sys.stderr = out, err
            for obj, name, before in saved:
                if before is None:
                    vars(obj).pop(name, None)
                else:
                    setattr(obj, name, before)
            rec.finish()

    def replay(self, records: list) -> None:
        """Show recorded output again: streams as text, rich outputs through IPython's display.

        Where the status is not shown yet (terminal IPython prints its line at the end; a hit's
        card in a kernel is displayed when it ends) it is shown first, then the replayed output,
        as a run would read: what happened, then what the cell showed.
        """
        runs = active_runs()
        status = runs[-1].status if runs else None
        for handle in reversed(self._shown):
            if handle.status is status and not handle.finished and not getattr(handle.inner, "shown", handle.live):
                handle.pending = records  # shown by finish(), after the status line or card
                return
        self._replay(records)

    def _replay(self, records: list) -> None:
        from IPython.display import publish_display_data

        for rec in records:
            if "stream" in rec:
                stream = sys.stderr if rec["stream"] == "stderr" else sys.stdout
                stream.write(rec["text"])
                stream.flush()
            elif "data" in rec:
                publish_display_data(rec["data"], rec.get("metadata") or {})

    def show(self, status: Status) -> Any:
        """A card in a Jupyter kernel, a text line elsewhere; ``finish()`` shows the final state.

        The card is displayed live when the body is about to run (:meth:`capture`) or the step
        waits for another kernel, else once, static, when the cell ends: a hit, which only
        loads, never imports ipywidgets and publishes one display.
        """
        from .widgets import CardStatus, display_status, widgets_supported

        live = widgets_supported() if self.live is None else self.live
        inner = CardStatus(status) if live else display_status(status, live=False)
        handle = _Shown(self, inner)
        self._shown.append(handle)
        return handle


class _Shown(StatusHandle):
    """The frontend's wrapper of a status handle: replays after a text status line, re-shows a
    card that ``clear_output()`` removed."""

    def __init__(self, frontend: IPythonFrontend, inner: StatusHandle) -> None:
        self.frontend, self.inner, self.status = frontend, inner, inner.status
        self.live = not isinstance(inner, TextStatus)
        self.pending: list | None = None
        self.finished = False

    def go_live(self) -> None:
        go_live = getattr(self.inner, "go_live", None)
        if go_live is not None and not self.finished:
            go_live()

    def cleared(self) -> None:
        redisplay = getattr(self.inner, "redisplay", None)
        if redisplay is not None and not self.finished:
            redisplay()

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        with contextlib.suppress(ValueError):
            self.frontend._shown.remove(self)
        if self.status.state == FAILED and self.status.error:
            self.status.error_shown_below = True  # the magic raises it: a traceback or a UsageError
        self.inner.finish()
        pending, self.pending = self.pending, None
        if pending:
            self.frontend._replay(pending)


# --------------------------------------------------------------------------------------------
# Recording what a body shows


class _Quiet(threading.local):
    depth = 0


_QUIET = _Quiet()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Streams written meanwhile are not recorded (they are part of a display being recorded)."""
    _QUIET.depth += 1
    try:
        yield
    finally:
        _QUIET.depth -= 1


class _Tee:
    """A stream that writes through to the real one and records what passed."""

    def __init__(self, stream: Any, name: str, recording: _Recording) -> None:
        self._stream, self._name, self._recording = stream, name, recording

    def write(self, text: str) -> int:
        if text and not _QUIET.depth:
            self._recording.stream(self._name, text)
        return self._stream.write(text)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._stream, attr)


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
OWN_MARK = "dreamer_magic"  # display metadata key of this package's status cards
WIDGET_FINAL = "dreamer_magic_widget_final_state"  # metadata of a live widget replayed as its final state


class _Recording:
    """What one body showed, kept in order and collapsed to the state it ended in."""

    def __init__(self, records: list) -> None:
        self.records = records
        self.widgets: list[tuple[dict, Any]] = []  # (record, widget): made static at the end
        self.own_ids: set[str] = set()

    def stream(self, name: str, text: str) -> None:
        records = self.records
        if records and records[-1].get("stream") == name:
            records[-1]["text"] += text
        else:
            records.append({"stream": name, "text": text})

    def display(self, data: dict | None, metadata: dict | None, transient: dict | None, update: bool) -> None:
        display_id = (transient or {}).get("display_id")
        if metadata and OWN_MARK in metadata:  # a status card (of a nested step): not replayed
            if display_id:
                self.own_ids.add(display_id)
            return
        if not data or WIDGET_STATE in data or display_id in self.own_ids:
            return
        if update:  # a display updated in place: keep its last data
            for rec in self.records:
                if display_id is not None and rec.get("display_id") == display_id:
                    self._fill(rec, data, metadata)
            return  # an update of something shown before this cell ran is not this cell's
        rec: dict[str, Any] = {}
        if display_id is not None:
            rec["display_id"] = display_id
        self._fill(rec, data, metadata)
        self.records.append(rec)

    def _fill(self, rec: dict, data: dict, metadata: dict | None) -> None:
        rec["data"] = {k: v for k, v in data.items() if k != WIDGET_VIEW}
        rec["metadata"] = dict(metadata or {})
        self.widgets = [(r, w) for r, w in self.widgets if r is not rec]
        if WIDGET_VIEW in data:
            widget = _widget_of(data[WIDGET_VIEW])
            if widget is not None:
                self.widgets.append((rec, widget))

    def clear(self) -> None:
        self.records.clear()
        self.widgets.clear()

    def finish(self) -> None:
        """Collapse: widgets to their final text/HTML, carriage returns to the final line."""
        for rec, widget in self.widgets:
            static = _widget_static(widget)
            if static is None:
                rec.clear()  # closed or hidden: the cell no longer showed it
            else:
                rec["data"] = static
                # replayed as the final state of what was a live widget (marked for readers of the notebook)
                rec["metadata"] = {**(rec.get("metadata") or {}), WIDGET_FINAL: True}
        self.widgets.clear()
        kept = []
        for rec in self.records:
            if "stream" in rec:
                rec["text"] = collapse_carriage_returns(rec["text"])
                if not rec["text"]:
                    continue
            elif not rec.get("data"):
                continue
            rec.pop("display_id", None)
            kept.append(rec)
        self.records[:] = kept


def collapse_carriage_returns(text: str) -> str:
    """What a terminal line finally reads when ``\\r`` rewrites it (a text progress bar).

    >>> collapse_carriage_returns("\\r 10%|#    |\\r100%|#####|\\ndone\\n")
    '100%|#####|\\ndone\\n'
    """
    if "\r" not in text:
        return text
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if "\r" not in line:
            out.append(line)
            continue
        chars: list[str] = []
        pos = 0
        for ch in line:
            if ch == "\r":
                pos = 0
                continue
            if pos < len(chars):
                chars[pos] = ch
            else:
                chars.append(ch)
            pos += 1
        out.append("".join(chars).rstrip())
    return "\n".join(out)


def _widget_of(view: Any) -> Any:
    """The live ipywidgets object of a widget-view bundle (``None`` without ipywidgets)."""
    module = sys.modules.get("ipywidgets.widgets.widget")
    model_id = view.get("model_id") if isinstance(view, dict) else None
    if module is None or not model_id:
        return None
    return getattr(module, "_instances", {}).get(model_id)


def _widget_static(widget: Any) -> dict | None:
    """A widget's final state as ``text/plain`` and ``text/html``; ``None`` when it was closed.

    A tqdm bar reads as its final meter (``100%|██████████| 10/10 [00:01<00:00, 9.9it/s]``);
    boxes, HTML, labels and progress bars become plain HTML.
    """
    if getattr(widget, "comm", None) is None:
        return None
    layout = getattr(widget, "layout", None)
    if getattr(layout, "display", None) == "none" or getattr(layout, "visibility", None) == "hidden":
        return None
    try:
        text = repr(widget) if hasattr(widget, "pbar") else _widget_text(widget)
    except ReferenceError:  # a tqdm bar whose tqdm object is gone (its widget keeps a weak proxy)
        text = _widget_text(widget)
    return {"text/plain": text, "text/html": _widget_html(widget)}


def _widget_text(widget: Any) -> str:
    import re

    children = getattr(widget, "children", None)
    if children is not None:
        return " ".join(t for t in (_widget_text(c) for c in children) if t)
    if hasattr(widget, "max") and hasattr(widget, "value") and "Progress" in type(widget).__name__:
        return f"{float(widget.value):g}/{float(widget.max):g}"
    value = getattr(widget, "value", "")
    text = re.sub(r"<[^>]+>", "", str(value)) if "HTML" in type(widget).__name__ else str(value)
    return html.unescape(text).strip()


def _widget_html(widget: Any) -> str:
    name = type(widget).__name__
    children = getattr(widget, "children", None)
    if children is not None:
        direction = "column" if "VBox" in name else "row"
        inner = "".join(_widget_html(c) for c in children)
        return f'<div style="display:flex;flex-direction:{direction};gap:6px;align-items:center">{inner}</div>'
    if "Progress" in name:
        return f'<progress value="{float(widget.value):g}" max="{float(widget.max):g}" style="width:220px"></progress>'
    value = getattr(widget, "value", "")
    if "HTML" in name:
        return f"<span>{value}</span>"
    return f"<span>{html.escape(str(value))}</span>"
