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

import importlib.util
import sys
import threading
import time
from typing import Any

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
from .status import FAILED, INTERRUPTED, LOADED, RAN, RESTORED, WAITING, Status

__all__ = [
    "StatusView",
    "LiveStatus",
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
            self.refresh_count = 0
            self.refresh()
            status.on_change(self._on_change)

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
            show = _has_progress(s) or _latest_loss(s) is not None
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
            elif s.duration is not None or s.state in (LOADED, RESTORED, RAN):
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
            """Cancel any pending throttled refresh and show the final state now."""
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


class LiveStatus(StatusHandle):
    """A displayed :class:`StatusView`; :meth:`finish` shows the final state.

    ``LiveStatus(view, display_handle).finish()``
    """

    def __init__(self, view: Any, display_handle: Any = None) -> None:
        self.view = view
        self.status = view.status
        self.display_handle = display_handle
        self.finished = False

    def finish(self) -> None:
        """Refresh the widget, then re-publish the output so its static text/HTML is final.

        The re-publish matters for notebooks executed headless or exported: their saved
        ``text/plain``/``text/html`` would otherwise show the state the cell started in.
        """
        self.view.finish()
        if self.finished:
            return
        self.finished = True
        if self.display_handle is not None:
            try:
                self.display_handle.update(self.view)
            except Exception:  # noqa: BLE001 - a display hiccup must never fail the cell
                pass


def widgets_supported() -> bool:
    """True inside a Jupyter kernel (ipykernel's ``ZMQInteractiveShell``) with ipywidgets installed.

    ``if widgets_supported(): display(StatusView(status))``

    Imports nothing: ipykernel counts only if it is loaded already, ipywidgets only if it can
    be found.
    """
    zmqshell = sys.modules.get("ipykernel.zmqshell")
    if zmqshell is None:
        return False
    if "ipywidgets" not in sys.modules and importlib.util.find_spec("ipywidgets") is None:
        return False
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython is a dependency
        return False
    shell = get_ipython()
    return shell is not None and isinstance(shell, zmqshell.ZMQInteractiveShell)


def display_status(
    status: Status, *, live: bool | None = None, interval: float = 0.2
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
    handle = display(view, display_id=True)
    return LiveStatus(view, handle)
