"""What the user sees live: an ipywidgets card over :mod:`dreamer_magic.render`.

Every ``%%dreamer_step``/``%%dreamer_train`` cell in a Jupyter kernel shows a small status card
that updates while the cell runs (SPEC §6). Its mime bundle also carries the static
``text/plain`` and ``text/html`` renderings (from ``render.py``), so a notebook executed
headless or exported still shows what happened. Where no widget frontend exists (terminal
IPython, a plain ``InteractiveShell``) :func:`display_status` returns a
:class:`~dreamer_magic.render.TextStatus` that prints.

ipywidgets is imported only when a card is made: the terminal path (``widgets_supported()``
false, ``display_status(status, live=False)``) never imports it, and the first access to
:class:`StatusView` does.

Examples
--------
>>> from dreamer_magic.status import Status
>>> handle = display_status(Status(kind="step", name="clean-reviews"), live=False)
>>> handle.finish()  # doctest: +ELLIPSIS
[dreamer] step clean-reviews: running...

Only this module, ``frontend.py`` and ``magics.py`` import IPython or ipywidgets.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import sys
import threading
import time
from typing import Any, Iterator

from .render import (  # noqa: F401 - names other modules and tests import from here
    BLUE,
    GREEN,
    GREY,
    ORANGE,
    RED,
    Rendered,
    StatusHandle,
    TextStatus,
    human_duration,
    human_size,
    loss_svg,
    reason_html,
    reason_text,
    render_overview,
    render_why,
    status_html,
    status_text,
)
from .render import (
    _BORDER,
    _details_html,
    _has_progress,
    _header_html,
    _latest_loss,
    _progress_label_html,
    _state_colour,
    _trainer_html,
)
from .status import FAILED, INTERRUPTED, LOADED, PULLED, RAN, RESTORED, RUNNING, WAITING, Progress, Status

__all__ = [
    "StatusView",
    "LiveStatus",
    "CardStatus",
    "display_status",
    "widgets_supported",
    # rendering, from render.py
    "status_text",
    "status_html",
    "loss_svg",
    "render_overview",
    "render_why",
    "human_size",
    "human_duration",
]

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def __getattr__(name: str) -> Any:
    """``widgets.StatusView`` is made on first use, so importing this module leaves ipywidgets alone."""
    if name == "StatusView":
        return _status_view_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _status_view_class() -> type:
    """Import ipywidgets and define :class:`StatusView` (once; later calls return it)."""
    cls = globals().get("StatusView")
    if cls is not None:
        return cls
    import ipywidgets

    class StatusView(ipywidgets.VBox):
        """A live ipywidgets card for one status; it refreshes when ``status.changed()`` is called.

        ``view = StatusView(status); display(view); ...; status.changed(); view.finish()``

        Parameters
        ----------
        status : Status
            The status to show. The view registers itself with ``status.on_change``.
        interval : float
            Refresh at most once per ``interval`` seconds (default 0.2, i.e. 5 per second); a
            change inside the interval is shown when it ends, so the latest state always appears.
            ``0`` refreshes on every change (tests).

        Notes
        -----
        Children: ``header`` (HTML: kind, name, state badge, timing), for trainers ``progress``
        (``IntProgress``) beside ``progress_label`` (HTML), and ``details`` (HTML: why it ran,
        outputs, generation cache, loss curve, checkpoints, model, notes, error). Its mime bundle
        carries ``text/plain`` (:func:`status_text`) and ``text/html`` (:func:`status_html`) beside
        the widget view, for frontends without widgets.
        """

        def __init__(self, status: Status, *, interval: float = 0.2, **kwargs: Any) -> None:
            self.status = status
            self.header = ipywidgets.HTML()
            self.details = ipywidgets.HTML()
            self.progress = ipywidgets.IntProgress(
                value=0, min=0, max=1, layout=ipywidgets.Layout(width="220px", height="14px")
            )
            self.progress_label = ipywidgets.HTML()
            self.progress_row = ipywidgets.HBox(
                [self.progress, self.progress_label],
                layout=ipywidgets.Layout(align_items="center", display="none"),
            )
            children = [self.header]
            if status.kind == "trainer":
                children.append(self.progress_row)
            children.append(self.details)
            kwargs.setdefault(
                "layout",
                ipywidgets.Layout(
                    border=f"1px solid {_BORDER}",
                    padding="2px 10px",
                    margin="2px 0",
                    max_width="780px",
                ),
            )
            super().__init__(children, **kwargs)
            self.add_class("dreamer-status")
            self._interval = max(0.0, float(interval))
            self._lock = threading.Lock()
            self._render_lock = threading.Lock()
            self._timer: threading.Timer | None = None
            self._last = 0.0
            self._clock: threading.Thread | None = None
            self._clock_stop = threading.Event()
            self.refresh_count = 0
            self.refresh()
            status.on_change(self._on_change)

        # -- the clock: elapsed time and the body's progress while it runs -------------------

        def start_clock(self, every: float = 1.0) -> None:
            """Tick about every ``every`` seconds while the status runs: the elapsed time (and
            what a tqdm bar in the body reports) keeps moving during a long step. Stopped by
            :meth:`finish`, or by itself once the status is no longer running."""
            if self._clock is not None:
                return
            self._clock_stop.clear()
            self._clock = threading.Thread(
                target=self._run_clock, args=(max(0.05, float(every)),), name="dreamer-status-clock", daemon=True
            )
            self._clock.start()

        def stop_clock(self) -> None:
            """Stop the clock thread and wait for it."""
            self._clock_stop.set()
            clock, self._clock = self._clock, None
            if clock is not None and clock is not threading.current_thread():
                clock.join(timeout=5)

        @property
        def ticking(self) -> bool:
            """True while the clock thread runs."""
            return self._clock is not None and self._clock.is_alive()

        def _run_clock(self, every: float) -> None:
            while not self._clock_stop.wait(every):
                if not _running(self.status):
                    return
                try:
                    self.tick()
                except RuntimeError:  # the status was mutated mid-render; the next tick shows it
                    continue

        def tick(self) -> None:
            """One tick: read the body's progress (tqdm bars made since the status started) and
            redraw what moves with time: the header (elapsed), and the details if the progress
            changed."""
            s = self.status
            progress = observed_progress(s) if s.step is None else None
            if progress is None and s.progress is not None and s.progress.source != "tqdm":
                progress = s.progress  # reported by other code (generation batches): keep it
            moved = progress != s.progress
            if moved:
                s.progress = progress
            with self._render_lock:
                self.header.value = _header_html(s)
            if moved:
                self.refresh()

        # -- updates -------------------------------------------------------------------------

        def refresh(self) -> None:
            """Redraw every child from the status now (no throttling)."""
            with self._render_lock:
                self._last = time.monotonic()
                s = self.status
                self.header.value = _header_html(s)
                if s.kind == "trainer":
                    self._refresh_progress(s)
                    details = _details_html(s) + _trainer_html(s)
                else:
                    details = _details_html(s)
                self.details.value = details
                self.details.layout.display = None if details else "none"
                self.layout.border_left = f"4px solid {_state_colour(s.state)}"
                self.refresh_count += 1

        def _refresh_progress(self, s: Status) -> None:
            show = _has_progress(s) or _latest_loss(s) is not None or bool(s.eval_losses)
            self.progress_row.layout.display = None if show else "none"
            self.progress.layout.display = None if _has_progress(s) else "none"
            if _has_progress(s):
                assert s.max_steps and s.step is not None
                if self.progress.max != s.max_steps:
                    self.progress.max = s.max_steps
                self.progress.value = max(0, min(s.step, s.max_steps))
            if s.state == FAILED:
                self.progress.bar_style = "danger"
            elif s.state in (INTERRUPTED, WAITING):
                self.progress.bar_style = "warning"
            elif s.duration is not None or s.state in (LOADED, RESTORED, PULLED, RAN):
                self.progress.bar_style = "success"
            else:
                self.progress.bar_style = "info"
            self.progress_label.value = _progress_label_html(s)

        def _on_change(self, status: Status) -> None:
            if self._interval <= 0:
                self.refresh()
                return
            with self._lock:
                if self._timer is not None:
                    return  # a refresh is already scheduled; it will show this change too
                wait = self._last + self._interval - time.monotonic()
                if wait > 0:
                    self._timer = threading.Timer(wait, self._fire)
                    self._timer.daemon = True
                    self._timer.start()
                    return
            self.refresh()

        def _fire(self) -> None:
            with self._lock:
                self._timer = None
            try:
                self.refresh()
            except RuntimeError:  # the status was mutated mid-render (dict resized); try again
                self._on_change(self.status)

        def finish(self) -> None:
            """Stop the clock, cancel any pending throttled refresh and show the final state now."""
            self.stop_clock()
            if not _running(self.status):
                self.status.progress = None  # what the body reported is over
            with self._lock:
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
            self.refresh()

        # -- display -------------------------------------------------------------------------

        def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
            data = dict(super()._repr_mimebundle_(**kwargs) or {})
            data["text/plain"] = status_text(self.status)
            data["text/html"] = status_html(self.status)
            return data

    StatusView.__qualname__ = "StatusView"
    globals()["StatusView"] = StatusView
    return StatusView


# --------------------------------------------------------------------------------------------
# What the magics call


#: Display metadata that marks this package's status cards (a step's recording skips them).
CARD_METADATA = {"dreamer_magic": {"card": "status"}}


def _running(status: Status) -> bool:
    return status.duration is None and (
        status.state in (RUNNING, WAITING) or status.state.startswith("resumed from")
    )


def static_bundle(status: Status) -> dict[str, str]:
    """The final card as plain ``text/plain`` and ``text/html`` (no widget): what a finished
    card's output holds, so every reader of the notebook shows it."""
    return {"text/plain": status_text(status), "text/html": status_html(status)}


class LiveStatus(StatusHandle):
    """A displayed :class:`StatusView`; :meth:`finish` shows the final state.

    ``LiveStatus(view, display_handle).finish()``

    While the cell runs the output is the live widget, its clock ticking (``clock`` seconds;
    ``None``: no clock). When it ends the output becomes the final card as static HTML and
    text, and the widget is closed: a notebook executed headless and exported, opened where the
    widget state is missing (JupyterLab after a restart shows "Error displaying widget: model
    not found" for a widget), or read on GitHub shows the card as it ended.
    """

    def __init__(self, view: Any, display_handle: Any = None, *, clock: float | None = None) -> None:
        self.view = view
        self.status = view.status
        self.display_handle = display_handle
        self.finished = False
        self._cleared = False
        if clock is not None:
            view.start_clock(clock)

    def redisplay(self) -> None:
        """Show the live card again (the body called ``clear_output()``, which removed it)."""
        from IPython.display import display

        if self.finished:
            return
        self._cleared = True
        try:
            self.display_handle = display(self.view, display_id=True, metadata=CARD_METADATA)
        except Exception:  # noqa: BLE001 - a display hiccup must never fail the cell
            pass

    def finish(self) -> None:
        """Refresh the widget, then replace the output by the final card's static text/HTML.

        The replacement matters wherever the live widget is gone: notebooks executed headless
        or exported, reopened without their widget state, rendered on GitHub or nbviewer.
        """
        self.view.finish()
        if self.finished:
            return
        self.finished = True
        if self.display_handle is not None:
            try:
                self.display_handle.update(static_bundle(self.status), raw=True, metadata=CARD_METADATA)
            except Exception:  # noqa: BLE001 - a display hiccup must never fail the cell
                return
            _close(self.view)


class CardStatus(StatusHandle):
    """A status card shown live only when the cell has work to show live.

    ``handle = CardStatus(status); ...; handle.go_live(); ...; handle.finish()``

    Nothing is displayed until the cell either runs its body or waits for another kernel
    (:meth:`go_live`: the live :class:`StatusView`, which imports ipywidgets) or ends
    (:meth:`finish`: the final card as static text and HTML). A hit, which only loads, is then
    one static display and never imports ipywidgets; the frontend calls :meth:`go_live` before
    the body's first output, so the live card stays above what the body shows.
    """

    def __init__(self, status: Status, *, interval: float = 0.2, clock: float | None = 1.0) -> None:
        self.status = status
        self.interval, self.clock = interval, clock
        self.live: LiveStatus | None = None
        self.display_handle: Any = None
        self.finished = False
        status.on_change(self._on_change)

    @property
    def shown(self) -> bool:
        """Whether the card is in the output area yet."""
        return self.live is not None or self.display_handle is not None

    def _on_change(self, status: Status) -> None:
        if status.state == WAITING and self.live is None and not self.finished:
            self.go_live()

    def go_live(self) -> None:
        """Display the live widget (once); it ticks until :meth:`finish`."""
        from IPython.display import display

        if self.live is not None or self.finished:
            return
        view = _status_view_class()(self.status, interval=self.interval)
        try:
            handle = display(view, display_id=True, metadata=CARD_METADATA)
        except Exception:  # noqa: BLE001 - a display hiccup must never fail the cell
            handle = None
        self.live = LiveStatus(view, handle, clock=self.clock)

    def redisplay(self) -> None:
        """Show the card again (the body called ``clear_output()``, which removed it)."""
        if self.live is not None and not self.finished:
            self.live.redisplay()

    def finish(self) -> None:
        """Show the final state: the live card turned static, or the static card displayed now."""
        from IPython.display import display

        if self.finished:
            return
        self.finished = True
        if self.live is not None:
            self.live.finish()
            return
        try:
            with _streams_left_alone():
                self.display_handle = display(static_bundle(self.status), raw=True, display_id=True, metadata=CARD_METADATA)
        except Exception:  # noqa: BLE001
            pass


@contextlib.contextmanager
def _streams_left_alone() -> Iterator[None]:
    """Display without ipykernel's flush of stdout and stderr when nothing waits in them.

    ipykernel flushes both streams before every display, each a round trip to its IO thread
    (a third of a hit's fixed cost), so that text printed before a display arrives before it.
    With both buffers empty there is nothing to order; anything else (another kernel, a stream
    of unknown kind, text waiting) keeps the flush.
    """
    from IPython import get_ipython

    publisher = getattr(get_ipython(), "display_pub", None)
    idle = publisher is not None and callable(getattr(publisher, "_flush_streams", None))
    for stream in (sys.stdout, sys.stderr) if idle else ():
        buffers, lock = getattr(stream, "_buffers", None), getattr(stream, "_buffer_lock", None)
        pending = getattr(stream, "_flush_pending", True) or getattr(stream, "_subprocess_flush_pending", False)
        if not isinstance(buffers, dict) or lock is None or pending:
            idle = False
            break
        with lock:
            if any(buffer.tell() for buffer in buffers.values()):
                idle = False
                break
    if not idle:
        yield
        return
    publisher._flush_streams = _no_flush  # this instance only, for this one display
    try:
        yield
    finally:
        with contextlib.suppress(AttributeError):
            del publisher._flush_streams


def _no_flush() -> None:
    return None


def _close(widget: Any) -> None:
    """Close a widget, its children and their layouts and styles (their comms are not needed)."""
    for child in getattr(widget, "children", ()) or ():
        _close(child)
    for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
        if part is not None and hasattr(part, "close"):
            part.close()
    widget.close()


def observed_progress(status: Status) -> Progress | None:
    """What a tqdm bar made while the status runs reports: done, total and an ETA.

    ``observed_progress(status)`` -> ``Progress("tokenize", 40, 100, eta=12.0)``, or ``None``
    when no bar with a known total was made since ``status.started`` (or tqdm is not loaded).
    The outermost such bar (the first made) is the one that says how long the cell has left.
    """
    std = sys.modules.get("tqdm.std")
    if std is None:
        return None
    try:
        bars = [b for b in list(std.tqdm._instances) if not getattr(b, "disable", False)]
    except (RuntimeError, AttributeError):  # the set changed meanwhile: next tick
        return None
    bars = [b for b in bars if getattr(b, "start_t", 0) >= status.started - 0.5 and getattr(b, "total", None)]
    if not bars:
        return None
    bar = min(bars, key=lambda b: b.start_t)
    try:
        done, total = float(bar.n), float(bar.total)
        elapsed = max(0.0, bar._time() - bar.start_t)
    except (TypeError, ValueError, AttributeError):
        return None
    eta = None
    if 0 < done < total and elapsed > 0:
        eta = (total - done) * elapsed / done
    what = str(getattr(bar, "desc", "") or "").rstrip(": ")
    return Progress(what, done, total, eta, source="tqdm")


def widgets_supported() -> bool:
    """True inside a Jupyter kernel (ipykernel's ``ZMQInteractiveShell``) with ipywidgets installed.

    ``if widgets_supported(): display(StatusView(status))``

    Imports nothing: ipykernel counts only if it is loaded already, ipywidgets only if it can
    be found.
    """
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    if zmqshell is None:
        return False
    if "ipywidgets" not in sys.modules and not _installed("ipywidgets"):
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and isinstance(shell, zmqshell.ZMQInteractiveShell)


@functools.lru_cache(maxsize=None)
def _installed(module: str) -> bool:
    """Whether ``module`` can be imported, looked up once per process (a search of sys.path on
    every hit costs more than the rest of showing the card)."""
    return importlib.util.find_spec(module) is not None


def display_status(
    status: Status, *, live: bool | None = None, interval: float = 0.2, clock: float | None = 1.0
) -> StatusHandle:
    """Show a status for a cell that is about to run; call ``.finish()`` when it ends.

    ``handle = display_status(status); ...run the cell...; handle.finish()``

    Parameters
    ----------
    status : Status
        The status the core fills in while the cell runs.
    live : bool or None
        ``True`` displays a live :class:`StatusView`, ``False`` prints text at the end;
        ``None`` (default) decides by the shell: live inside a Jupyter kernel, text in
        terminal IPython or a plain ``InteractiveShell``.
    interval : float
        Throttle for the live view (seconds between refreshes).
    clock : float or None
        The live view's elapsed time ticks every ``clock`` seconds while the status runs
        (``None``: only on changes).

    Returns
    -------
    StatusHandle
        A :class:`LiveStatus` (widget displayed now) or a :class:`TextStatus` (prints once
        on :meth:`~StatusHandle.finish`).
    """
    if live is None:
        live = widgets_supported()
    if not live:
        return TextStatus(status)
    from IPython.display import display

    view = _status_view_class()(status, interval=interval)
    handle = display(view, display_id=True, metadata=CARD_METADATA)
    return LiveStatus(view, handle, clock=clock)
