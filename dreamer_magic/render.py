"""Text, HTML and SVG of status objects: what the user reads, with no IPython or ipywidgets.

Every ``%%dreamer_step``/``%%dreamer_train`` cell's status renders here: a few lines of text
(terminal IPython, a script, nbconvert to text), a static HTML card (exported notebooks, and the
``text/html`` beside every live widget), a loss curve as inline SVG, and the ``%dreamer status``
and ``%dreamer why`` reports. ``widgets.py`` shows the same card live with ipywidgets.

Examples
--------
>>> from dreamer_magic.status import Status, LOADED
>>> s = Status(kind="step", name="clean-reviews", state=LOADED, duration=0.038, saved=4.2)
>>> print(status_text(s))
[dreamer] step clean-reviews: loaded from disk in 38 ms (saved 4.2 s)

The words follow one vocabulary (see :mod:`dreamer_magic.status`): a cell *ran*, was *loaded
from disk*, *restored from backup*, *resumed from checkpoint-N*; what the output folder holds is
*complete* or *incomplete*; *saved* is only time saved; training progress is *training step
N/M*, never a bare "step" (that word is a ``%%dreamer_step``).
"""

from __future__ import annotations

import html
import math
import sys
import time
from typing import Any, Iterable, Sequence

from .status import (
    COMPLETE,
    FAILED,
    INCOMPLETE,
    INTERRUPTED,
    LOADED,
    PULLED,
    RAN,
    RESTORED,
    RUNNING,
    WAITING,
    CheckpointInfo,
    OutputInfo,
    Reason,
    Status,
)

__all__ = [
    "status_text",
    "status_html",
    "reason_text",
    "reason_html",
    "loss_svg",
    "render_overview",
    "render_why",
    "human_size",
    "human_duration",
    "Rendered",
    "StatusHandle",
    "TextStatus",
]

# Badge colours by meaning: green = nothing had to be computed, blue = computing or computed,
# orange = waiting or stopped by the user, red = failed.
GREEN, BLUE, ORANGE, RED, GREY = "#2e7d32", "#1565c0", "#e65100", "#c62828", "#757575"
_STATE_COLOURS = {
    LOADED: GREEN,
    RESTORED: GREEN,
    PULLED: GREEN,
    RAN: BLUE,
    RUNNING: BLUE,
    WAITING: ORANGE,
    INTERRUPTED: ORANGE,
    FAILED: RED,
}
MAX_CURVE_POINTS = 400  # a loss curve longer than this is averaged down to this many points
MAX_CHECKPOINTS_SHOWN = 8

_FONT = "var(--jp-ui-font-family, -apple-system, 'Segoe UI', Roboto, sans-serif)"
_MONO = "var(--jp-code-font-family, SFMono-Regular, Menlo, Consolas, monospace)"
_MUTED = "opacity:0.7"
_BORDER = "var(--jp-border-color2, #ddd)"


# --------------------------------------------------------------------------------------------
# Human formatting


def human_size(n: int | float | None) -> str:
    """Format a byte count with decimal (SI) units.

    ``human_size(1_234_567)`` -> ``"1.2 MB"``; ``human_size(512)`` -> ``"512 B"``.

    Parameters
    ----------
    n : int or float or None
        Bytes. ``None`` formats as ``"?"``.

    Returns
    -------
    str
        One decimal below 10 units (``"3.4 MB"``), none above (``"340 MB"``).
    """
    if n is None:
        return "?"
    n = float(n)
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if round(n, 1) < 10:
            return f"{n:.1f} {unit}"
        if round(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}"
    return f"{n:.0f} PB"  # pragma: no cover - loop always returns


def human_duration(seconds: float | None) -> str:
    """Format a duration the way a person says it.

    ``human_duration(0.012)`` -> ``"12 ms"``; ``3.4`` -> ``"3.4 s"``; ``125`` -> ``"2 min 5 s"``;
    ``7500`` -> ``"2 h 5 min"``.

    Parameters
    ----------
    seconds : float or None
        ``None`` formats as ``"?"``.

    Returns
    -------
    str
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0.0, float(seconds))
    if s == 0:
        return "0 ms"
    if s < 0.0005:
        return "<1 ms"
    if round(s * 1000) < 1000:
        return f"{round(s * 1000)} ms"
    if round(s, 1) < 10:
        return f"{s:.1f} s"
    if round(s) < 60:
        return f"{round(s)} s"
    total = round(s)
    if total < 3600:
        minutes, secs = divmod(total, 60)
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    total_min = round(s / 60)
    hours, minutes = divmod(total_min, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def _human_time(epoch: float | None, now: float | None = None) -> str:
    """``"14:03:12"`` for today, ``"2024-05-01 14:03"`` otherwise."""
    if epoch is None:
        return "?"
    try:
        t = time.localtime(float(epoch))
    except (TypeError, ValueError, OverflowError, OSError):
        return str(epoch)
    today = time.localtime(time.time() if now is None else now)
    if t[:3] == today[:3]:
        return time.strftime("%H:%M:%S", t)
    return time.strftime("%Y-%m-%d %H:%M", t)


def _fmt_loss(loss: float) -> str:
    return f"{loss:.4g}"


def _hit_rate(hits: int, misses: int) -> float | None:
    total = hits + misses
    return hits / total if total else None


def _pct(rate: float | None) -> str:
    return "–" if rate is None else f"{rate:.0%}"


# --------------------------------------------------------------------------------------------
# Facts shared by the text and HTML renderings


def _state_colour(state: str) -> str:
    if state.startswith("resumed from"):
        return BLUE
    return _STATE_COLOURS.get(state, GREY)


def _elapsed(status: Status) -> float | None:
    """This run's duration, or for a running cell the time since it started."""
    if status.duration is not None:
        return status.duration
    if status.state in (RUNNING, WAITING) or status.state.startswith("resumed from"):
        return max(0.0, time.time() - status.started)
    return None


def _timing_phrase(status: Status) -> str:
    """``"in 38 ms"``, ``"after 2.0 s"``, ``"for 3.4 s"`` or ``""``."""
    elapsed = _elapsed(status)
    if elapsed is None:
        return ""
    if status.duration is None:  # still going
        return f"for {human_duration(elapsed)}"
    if status.state in (FAILED, INTERRUPTED, WAITING):
        return f"after {human_duration(elapsed)}"
    return f"in {human_duration(elapsed)}"


def _latest_loss(status: Status) -> tuple[int, float] | None:
    return _latest(status.losses)


def _latest(losses: Sequence[tuple[int, float]]) -> tuple[int, float] | None:
    for step, loss in reversed(losses):
        if loss is not None and math.isfinite(loss):
            return step, loss
    return None


def _body_progress_phrase(status: Status) -> str:
    """``"tokenize 40/100 (40%), ETA 12 s"``: what the body reports, while it runs."""
    p = status.progress
    if p is None or status.duration is not None:
        return ""
    done = f"{p.done:g}"
    text = (p.what + " " if p.what else "") + done
    if p.total:
        frac = min(1.0, max(0.0, p.done / p.total))
        text += f"/{p.total:g} ({frac:.0%})"
    if p.eta is not None:
        text += f", ETA {human_duration(p.eta)}"
    return text


def ordered_outputs(status: Status) -> tuple[list[OutputInfo], list[OutputInfo]]:
    """The outputs as the card lists them: the values that matter (largest first), then the
    temporaries (loop variables, ``_``-names) that the card folds away."""
    main = sorted((o for o in status.outputs if not o.temporary), key=lambda o: -o.size)
    return main, [o for o in status.outputs if o.temporary]


def _error_phrase(status: Status) -> str:
    """The error, named once: when it is shown right below the card (a traceback, a UsageError
    line) only its type is repeated."""
    error = status.error or ""
    if status.error_shown_below:
        kind = error.split(":", 1)[0].strip() or "the error"
        return f"{kind} (shown below)"
    return error


def _has_progress(status: Status) -> bool:
    return bool(status.max_steps) and status.step is not None


def _progress_phrase(status: Status) -> str:
    """``"training step 120/500 (24%), ETA 2 min 5 s"`` or ``""``.

    "training" says which kind of step this is: never a ``%%dreamer_step``.
    """
    if status.step is None:
        return ""
    if not status.max_steps:
        return f"training step {status.step}"
    frac = min(1.0, max(0.0, status.step / status.max_steps))
    text = f"training step {status.step}/{status.max_steps} ({frac:.0%})"
    if status.eta is not None and status.step < status.max_steps:
        text += f", ETA {human_duration(status.eta)}"
    return text


def _checkpoint_phrase(cp: CheckpointInfo) -> str:
    """``"checkpoint-200 (12 MB, 14:03:12)"``: the name already says how far training got."""
    if not cp.complete:
        return f"{cp.name} ({INCOMPLETE})"
    return f"{cp.name} ({human_size(cp.size)}, {_human_time(cp.time)})"


# --------------------------------------------------------------------------------------------
# Plain text


def status_text(status: Status) -> str:
    """The facts of one status as a few lines of plain text (terminal IPython, nbconvert).

    ``print(status_text(s))`` ->
    ``[dreamer] step clean-reviews: loaded from disk in 38 ms (saved 4.2 s) — outputs: reviews
    (pandas.DataFrame, dataset, 1.2 MB)``

    Parameters
    ----------
    status : Status
        The step or trainer status to describe.

    Returns
    -------
    str
        The first line says what happened; indented lines follow for why it ran, generation-cache
        activity, training progress, checkpoints, the model, notes and the error.
    """
    head = f"[dreamer] {status.kind} {status.name}: {status.state}"
    timing = _timing_phrase(status)
    if timing:
        head += f" {timing}"
    if status.saved is not None:
        head += f" (saved {human_duration(status.saved)})"
    main, temporaries = ordered_outputs(status)
    if main:
        outs = ", ".join(f"{o.name} ({o.type}, {o.storage}, {human_size(o.size)})" for o in main)
        head += f" — outputs: {outs}"
    lines = [head]
    if status.reasons:
        lines.append("  why: " + "; ".join(reason_text(r) for r in status.reasons))
    if temporaries:
        lines.append(
            "  temporaries: " + ", ".join(o.name for o in temporaries)
            + f" ({human_size(sum(o.size for o in temporaries))})"
        )
    pickled = [o.name for o in status.outputs if o.pickled]
    if pickled:
        lines.append(f"  pickled: {', '.join(pickled)} ({_PICKLE_WARNING})")
    body = _body_progress_phrase(status)
    if body:
        lines.append("  progress: " + body)
    if status.cache:
        parts = []
        for db, (hits, misses) in sorted(dict(status.cache).items()):
            rate = _hit_rate(hits, misses)
            parts.append(
                f"{db}: {hits} hits, {misses} misses ({_pct(rate)} hits)"
                + _savings_phrase(getattr(status, "cache_saved", {}).get(db))
            )
        lines.append("  generation cache: " + "; ".join(parts))
    if status.kind == "trainer":
        progress = _progress_phrase(status)
        latest = _latest_loss(status)
        if latest is not None:
            progress = (progress + ", " if progress else "") + (
                f"loss {_fmt_loss(latest[1])} at step {latest[0]}"
            )
        latest_eval = _latest(status.eval_losses)
        if latest_eval is not None:
            progress = (progress + ", " if progress else "") + (
                f"validation loss {_fmt_loss(latest_eval[1])} at step {latest_eval[0]}"
            )
        if progress:
            lines.append("  progress: " + progress)
        if status.resumed_from and not status.state.startswith("resumed from"):
            lines.append(f"  resumed from {status.resumed_from}")
        if status.checkpoints:
            shown = status.checkpoints[-MAX_CHECKPOINTS_SHOWN:]
            more = len(status.checkpoints) - len(shown)
            text = ", ".join(_checkpoint_phrase(cp) for cp in shown)
            if more:
                text = f"… {more} earlier, " + text
            lines.append("  checkpoints: " + text)
        if status.skipped_checkpoints:
            lines.append(
                "  skipped checkpoints (incomplete or corrupt): "
                + ", ".join(status.skipped_checkpoints)
            )
        if status.model_path:
            lines.append(f"  model: {status.model_path}")
    for note in status.notes:
        lines.append(f"  note: {note}")
    if status.error:
        lines.append(f"  error: {_error_phrase(status)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# HTML pieces (all user text goes through html.escape)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def reason_text(reason: str) -> str:
    """One reason as the user reads it in text: its string (names and code in backticks).

    ``reason_text(Reason.input_changed("raw"))`` -> ``"input `raw` changed"``; a plain ``str``
    is a note and reads as itself.
    """
    return str(reason)


def reason_html(reason: str) -> str:
    """One reason as HTML, from its fields: names, values and code in ``<code>``.

    ``reason_html(Reason.input_changed("n", "3", "4"))`` ->
    ``'input <code ...>n</code> changed: <code ...>3</code> → <code ...>4</code>'``.

    Parameters
    ----------
    reason : Reason or str
        A plain ``str`` renders as a note (:meth:`~dreamer_magic.status.Reason.of`), its
        Markdown-style `backticks` as code.

    Returns
    -------
    str
        Escaped HTML: text as text, every other piece (subject, old, new, code) in a
        ``<code class="dreamer-reason-ROLE">``.
    """
    return "".join(
        _esc(text)
        if role == "text"
        else f'<code class="dreamer-reason-{role}" style="font-family:{_MONO}">{_esc(text)}</code>'
        for role, text in Reason.of(reason).pieces()
    )


def _reason_attrs(reason: str) -> str:
    r = Reason.of(reason)
    attrs = f'data-kind="{_esc(r.kind)}"'
    if r.subject is not None:
        attrs += f' data-subject="{_esc(r.subject)}"'
    return attrs


def _badge(state: str) -> str:
    colour = _state_colour(state)
    return (
        f'<span class="dreamer-state" data-state="{_esc(state)}" '
        f'style="background:{colour};color:#fff;border-radius:9px;padding:1px 8px;'
        f'font-size:12px;white-space:nowrap">{_esc(state)}</span>'
    )


def _header_html(status: Status) -> str:
    parts = [
        f'<span class="dreamer-kind" style="{_MUTED};text-transform:uppercase;'
        f'font-size:11px;letter-spacing:0.05em">{_esc(status.kind)}</span>',
        f'<b class="dreamer-name" style="font-family:{_MONO}">{_esc(status.name)}</b>',
        _badge(status.state),
    ]
    timing = _timing_phrase(status)
    if timing:
        parts.append(f'<span class="dreamer-duration" style="{_MUTED}">{_esc(timing)}</span>')
    if status.saved is not None:
        parts.append(
            f'<span class="dreamer-saved" style="color:{GREEN}">'
            f"saved {_esc(human_duration(status.saved))}</span>"
        )
    return (
        '<div class="dreamer-header" style="display:flex;gap:8px;align-items:baseline;'
        'flex-wrap:wrap">' + "".join(parts) + "</div>"
    )


def _row(label: str, body: str, cls: str) -> str:
    return (
        f'<div class="{cls}" style="margin-top:3px"><span style="{_MUTED};display:inline-block;'
        f'min-width:7em">{label}</span>{body}</div>'
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], cls: str) -> str:
    """A compact table; cells are already-escaped HTML."""
    th = "".join(
        f'<th style="text-align:left;padding:1px 10px 1px 0;font-weight:600">{h}</th>'
        for h in header
    )
    body = "".join(
        '<tr data-row="">'
        + "".join(f'<td style="text-align:left;padding:1px 10px 1px 0;vertical-align:top">{c}</td>' for c in r)
        + "</tr>"
        for r in rows
    )
    return (
        f'<table class="{cls}" style="border-collapse:collapse;font-size:12px;'
        f'font-family:{_MONO};margin:2px 0"><thead><tr>{th}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _details_html(status: Status) -> str:
    """Why it ran, outputs, generation cache, notes and the error."""
    out = []
    if status.reasons:
        items = "; ".join(
            f'<span class="dreamer-reason" {_reason_attrs(r)}>{reason_html(r)}</span>'
            for r in status.reasons
        )
        out.append(_row("why", items, "dreamer-reasons"))
    main, temporaries = ordered_outputs(status)
    if main:
        table = _table(("output", "type", "storage", "size"), [_output_row(o) for o in main], "dreamer-outputs")
        if len(status.outputs) > 1:
            table += (
                f'<div style="{_MUTED};font-size:12px">total '
                f"{_esc(human_size(status.total_size))}</div>"
            )
        out.append(table)
    if temporaries:
        names = ", ".join(_esc(o.name) for o in temporaries)
        out.append(
            f'<details class="dreamer-temporaries" style="font-size:12px;margin-top:2px">'
            f'<summary style="{_MUTED};cursor:pointer">{len(temporaries)} '
            f"temporar{'y' if len(temporaries) == 1 else 'ies'} (loop variables, _names): {names}</summary>"
            + _table(("output", "type", "storage", "size"), [_output_row(o) for o in temporaries], "dreamer-outputs-temporary")
            + "</details>"
        )
    body = _body_progress_phrase(status)
    if body:
        out.append(_row("progress", f'<span class="dreamer-body-progress">{_esc(body)}</span>', "dreamer-progress-row"))
    if status.cache:
        rows = []
        saved_of = dict(getattr(status, "cache_saved", {}) or {})
        for db, (hits, misses) in sorted(dict(status.cache).items()):
            row = (
                f'<span class="dreamer-cache-db" data-db="{_esc(db)}" data-hits="{hits}" '
                f'data-misses="{misses}">{_esc(db)}</span>',
                str(hits),
                str(misses),
                _pct(_hit_rate(hits, misses)),
            )
            if saved_of:
                tokens, money = saved_of.get(db, (0, None))
                row += (_esc(f"{tokens:,}"), _esc(_money(money)))
            rows.append(row)
        header = ("generation cache", "hits", "misses", "hit rate")
        if saved_of:
            header += ("tokens from cache", "saved")
        out.append(_table(header, rows, "dreamer-cache"))
    for note in status.notes:
        out.append(_row("note", _esc(note), "dreamer-note"))
    if status.error:
        out.append(
            f'<div class="dreamer-error" style="margin-top:3px;color:{RED};'
            f'font-family:{_MONO};white-space:pre-wrap">{_esc(_error_phrase(status))}</div>'
        )
    return "".join(out)


_PICKLE_WARNING = "loading a pickle runs code: load it only from folders you trust"


def _output_row(o: OutputInfo) -> tuple[str, str, str, str]:
    storage = _esc(o.storage)
    if o.pickled:
        storage = (
            f'<span class="dreamer-pickled" title="{_esc(_PICKLE_WARNING)}" '
            f'style="color:{ORANGE}">⚠ {storage}</span>'
        )
    return (
        f'<span class="dreamer-output" data-name="{_esc(o.name)}">{_esc(o.name)}</span>',
        _esc(o.type),
        storage,
        _esc(human_size(o.size)),
    )


def _progress_label_html(status: Status) -> str:
    parts = []
    progress = _progress_phrase(status)
    if progress:
        parts.append(f'<span class="dreamer-progress-text">{_esc(progress)}</span>')
    latest = _latest_loss(status)
    if latest is not None:
        parts.append(
            f'<span class="dreamer-loss" data-loss="{latest[1]!r}">loss '
            f"<b>{_esc(_fmt_loss(latest[1]))}</b></span>"
        )
    latest_eval = _latest(status.eval_losses)
    if latest_eval is not None:
        parts.append(
            f'<span class="dreamer-eval-loss" data-loss="{latest_eval[1]!r}">validation loss '
            f"<b>{_esc(_fmt_loss(latest_eval[1]))}</b></span>"
        )
    return f'<span style="font-size:12px;font-family:{_MONO}">{" · ".join(parts)}</span>'


def _static_progress_html(status: Status) -> str:
    """The progress bar and label in plain HTML, for the static rendering."""
    label = _progress_label_html(status)
    if not _has_progress(status):
        if _progress_phrase(status) or _latest_loss(status) or _latest(status.eval_losses):
            return f'<div style="margin-top:4px">{label}</div>'
        return ""
    assert status.max_steps and status.step is not None
    frac = min(1.0, max(0.0, status.step / status.max_steps))
    colour = _state_colour(status.state)
    return (
        f'<div class="dreamer-progress" data-step="{status.step}" '
        f'data-max-steps="{status.max_steps}" style="display:flex;gap:8px;align-items:center;'
        f'margin-top:4px"><div style="width:220px;height:8px;background:{_BORDER};'
        f'border-radius:4px;overflow:hidden"><div style="width:{frac * 100:.1f}%;height:100%;'
        f'background:{colour}"></div></div>{label}</div>'
    )


def _trainer_html(status: Status) -> str:
    """Loss curve, checkpoints, resume point, skipped checkpoints and the model path."""
    if status.kind != "trainer":
        return ""
    out = []
    svg = loss_svg(status.losses, eval_losses=status.eval_losses)
    if svg:
        out.append(f'<div class="dreamer-loss-curve" style="margin-top:4px">{svg}</div>')
    if status.resumed_from:
        out.append(
            _row(
                "resumed from",
                f'<code class="dreamer-resumed-from" style="font-family:{_MONO}">'
                f"{_esc(status.resumed_from)}</code>",
                "dreamer-resume",
            )
        )
    if status.checkpoints:
        shown = status.checkpoints[-MAX_CHECKPOINTS_SHOWN:]
        rows = []
        for cp in shown:
            flag = ""
            if not cp.complete:
                flag = f' <span style="color:{ORANGE}">{INCOMPLETE}</span>'
            elif cp.name == status.resumed_from:
                flag = f' <span style="color:{BLUE}">← resumed</span>'
            rows.append(
                (
                    f'<span class="dreamer-checkpoint" data-name="{_esc(cp.name)}" '
                    f'data-step="{cp.step}" data-complete="{str(bool(cp.complete)).lower()}">'
                    f"{_esc(cp.name)}</span>" + flag,
                    _esc(_human_time(cp.time)),
                    _esc(human_size(cp.size)),
                )
            )
        table = _table(("checkpoint", "written", "size"), rows, "dreamer-checkpoints")
        more = len(status.checkpoints) - len(shown)
        if more:
            table = f'<div style="{_MUTED};font-size:12px">… {more} earlier</div>' + table
        out.append(table)
    if status.skipped_checkpoints:
        names = ", ".join(
            f'<code style="font-family:{_MONO}">{_esc(n)}</code>'
            for n in status.skipped_checkpoints
        )
        out.append(
            _row(
                f'<span style="color:{ORANGE}">skipped</span>',
                names + f' <span style="{_MUTED}">(incomplete or corrupt)</span>',
                "dreamer-skipped",
            )
        )
    if status.model_path:
        out.append(
            _row(
                "model",
                f'<code class="dreamer-model-path" style="font-family:{_MONO}">'
                f"{_esc(status.model_path)}</code>",
                "dreamer-model",
            )
        )
    return "".join(out)


def _card_style(status: Status) -> str:
    return (
        f"font-family:{_FONT};font-size:13px;line-height:1.45;border:1px solid {_BORDER};"
        f"border-left:4px solid {_state_colour(status.state)};border-radius:4px;"
        "padding:5px 10px;margin:2px 0;max-width:760px"
    )


def status_html(status: Status) -> str:
    """Static HTML of one status: the card a widget shows, frozen (exported notebooks).

    ``IPython.display.HTML(status_html(s))``

    Parameters
    ----------
    status : Status

    Returns
    -------
    str
        A ``<div class="dreamer-status" data-kind=... data-name=... data-state=...>`` holding
        a state badge ``<span class="dreamer-state" data-state="...">``, the facts, and for
        trainers a progress bar and an inline SVG loss curve. All user text is escaped.
    """
    trainer = ""
    if status.kind == "trainer":
        trainer = _static_progress_html(status) + _trainer_html(status)
    return (
        f'<div class="dreamer-status" data-kind="{_esc(status.kind)}" '
        f'data-name="{_esc(status.name)}" data-state="{_esc(status.state)}" '
        f'style="{_card_style(status)}">'
        + _header_html(status)
        + _details_html(status)
        + trainer
        + "</div>"
    )


# --------------------------------------------------------------------------------------------
# Loss curve


def _downsample(points: list[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """Average consecutive points into ``limit`` buckets, keeping the last point exact."""
    if len(points) <= limit:
        return points
    out = []
    n = len(points)
    for i in range(limit - 1):
        chunk = points[i * (n - 1) // (limit - 1) : (i + 1) * (n - 1) // (limit - 1)]
        if chunk:
            out.append(
                (sum(p[0] for p in chunk) / len(chunk), sum(p[1] for p in chunk) / len(chunk))
            )
    out.append(points[-1])
    return out


def _finite_points(losses: Sequence[tuple[int, float]]) -> list[tuple[float, float]]:
    pts = [
        (float(s), float(v))
        for s, v in losses
        if v is not None and s is not None and math.isfinite(v) and math.isfinite(s)
    ]
    pts.sort(key=lambda p: p[0])
    return pts


def loss_svg(
    losses: Sequence[tuple[int, float]],
    *,
    eval_losses: Sequence[tuple[int, float]] = (),
    width: int = 360,
    height: int = 130,
    max_points: int = MAX_CURVE_POINTS,
) -> str:
    """Draw a loss curve as a small standalone SVG (no matplotlib).

    ``loss_svg([(10, 2.3), (20, 1.9), (30, 1.7)], eval_losses=[(30, 2.0)])`` ->
    ``'<svg xmlns=... <polyline ...'``

    Parameters
    ----------
    losses : sequence of (step, loss)
        The training loss. Non-finite losses (NaN, inf) are left out.
    eval_losses : sequence of (step, loss)
        The validation loss, drawn in another colour with a dot per evaluation; a legend names
        both curves when it is given.
    width, height : int
        Size in pixels.
    max_points : int
        Longer curves are averaged down to this many points.

    Returns
    -------
    str
        ``""`` when there is nothing to draw; otherwise an ``<svg class="dreamer-loss-svg">``
        with axes, min/max loss and first/last step labels, one ``<polyline
        class="dreamer-loss-line">`` for the training loss and, given validation losses, one
        ``<polyline class="dreamer-eval-line">`` and a legend.
    """
    pts = _downsample(_finite_points(losses), max(2, max_points))
    evals = _downsample(_finite_points(eval_losses), max(2, max_points))
    both = pts + evals
    if not both:
        return ""
    left, right, top, bottom = 48, 10, 8, 22
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min(p[0] for p in both), max(p[0] for p in both)
    y0, y1 = min(p[1] for p in both), max(p[1] for p in both)
    first_step, last_step = int(round(x0)), int(round(x1))
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    axis = "stroke:currentColor;stroke-opacity:0.45;stroke-width:1"
    label = "font-size:10px;fill:currentColor;fill-opacity:0.75;font-family:sans-serif"
    title = []
    if pts:
        title.append(f"training loss: {_fmt_loss(pts[-1][1])} at training step {int(round(pts[-1][0]))}")
    if evals:
        title.append(f"validation loss: {_fmt_loss(evals[-1][1])} at training step {int(round(evals[-1][0]))}")
    aria = "training and validation loss curves" if evals else "training loss curve"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="dreamer-loss-svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{aria}" data-points="{len(pts)}" data-eval-points="{len(evals)}">',
        f"<title>{_esc('; '.join(title))}</title>",
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" style="{axis}"/>',
        f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" style="{axis}"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" style="{label}">'
        f"{_esc(_fmt_loss(y1))}</text>",
        f'<text x="{left - 4}" y="{top + ph}" text-anchor="end" style="{label}">'
        f"{_esc(_fmt_loss(y0))}</text>",
        f'<text x="{left - 4}" y="{top + ph / 2 + 3:.0f}" text-anchor="end" style="{label}">'
        "loss</text>",
        f'<text x="{left}" y="{height - 6}" text-anchor="start" style="{label}">'
        f"{first_step}</text>",
        f'<text x="{left + pw / 2:.0f}" y="{height - 6}" text-anchor="middle" style="{label}">'
        "step</text>",
        f'<text x="{left + pw}" y="{height - 6}" text-anchor="end" style="{label}">'
        f"{last_step}</text>",
    ]
    if pts:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(
            f'<polyline class="dreamer-loss-line" points="{coords}" fill="none" '
            f'style="stroke:{BLUE};stroke-width:1.5;stroke-linejoin:round"/>'
        )
        if len(pts) == 1:
            x, y = pts[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{BLUE}"/>')
    if evals:
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in evals)
        parts.append(
            f'<polyline class="dreamer-eval-line" points="{coords}" fill="none" '
            f'style="stroke:{ORANGE};stroke-width:1.5;stroke-dasharray:4 2;stroke-linejoin:round"/>'
        )
        parts.extend(
            f'<circle class="dreamer-eval-point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{ORANGE}"/>'
            for x, y in evals
        )
        # the legend, top right: which colour is which loss
        lx = left + pw - 118
        parts.append(
            f'<g class="dreamer-loss-legend" style="{label}">'
            f'<line x1="{lx}" y1="{top + 6}" x2="{lx + 14}" y2="{top + 6}" style="stroke:{BLUE};stroke-width:2"/>'
            f'<text x="{lx + 18}" y="{top + 9}" style="{label}">training</text>'
            f'<line x1="{lx + 62}" y1="{top + 6}" x2="{lx + 76}" y2="{top + 6}" '
            f'style="stroke:{ORANGE};stroke-width:2;stroke-dasharray:4 2"/>'
            f'<text x="{lx + 80}" y="{top + 9}" style="{label}">validation</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# A status handle that prints (terminal IPython, scripts)


class StatusHandle:
    """Shows one status while its cell runs; :meth:`finish` shows the final state.

    ``with TextStatus(status): ...run the cell...`` — or call ``handle.finish()`` when it ends.
    :class:`TextStatus` prints; ``widgets.LiveStatus`` is a live ipywidgets card.
    """

    status: Status

    def finish(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def __enter__(self) -> StatusHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()


class TextStatus(StatusHandle):
    """Print :func:`status_text` once, when the cell ends (no widget frontend, or a script).

    ``TextStatus(status).finish()`` prints ``[dreamer] step x: ran in 1.2 s``;
    ``TextStatus(status, file=sys.stderr)`` prints there instead of ``sys.stdout``.

    The one thing printed early is a wait for another kernel, so that a cell which seems to
    hang says why.

    Parameters
    ----------
    status : Status
        The status the core fills in; the handle listens to its changes.
    file : file-like, optional
        Where to print (default: ``sys.stdout`` at the time of printing).
    """

    def __init__(self, status: Status, file: Any = None) -> None:
        self.status = status
        self.file = file
        self.finished = False
        self._announced_wait = False
        status.on_change(self._on_change)

    def _print(self, text: str) -> None:
        print(text, file=self.file or sys.stdout, flush=True)

    def _on_change(self, status: Status) -> None:
        if status.state == WAITING and not self._announced_wait and not self.finished:
            self._announced_wait = True
            self._print(f"[dreamer] {status.kind} {status.name}: {WAITING} …")

    def finish(self) -> None:
        """Print the final status once (later calls do nothing)."""
        if self.finished:
            return
        self.finished = True
        self._print(status_text(self.status))

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": status_text(self.status), "text/html": status_html(self.status)}


# --------------------------------------------------------------------------------------------
# %dreamer status / %dreamer why


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [len(h) for h in header]
    for r in rows:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))

    def fmt(r: Sequence[str]) -> str:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def _fmt_created(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (int, float)):
        return _human_time(value)
    return str(value)[:19].replace("T", " ")


def _stored_state(state: str) -> str:
    """The state word of an overview row: ``"incomplete (no step.json)"`` -> ``"incomplete"``."""
    return state.split(" (", 1)[0]


def _overview_state_colour(state: str) -> str:
    return {COMPLETE: GREEN, INCOMPLETE: ORANGE, RUNNING: BLUE, FAILED: RED}.get(
        _stored_state(state), _state_colour(state)
    )


_SESSION_NOTE = "hits, misses and hit rate: this kernel session; rows and size: on disk"


class Rendered:
    """Text and HTML of one report, shown by IPython (``display(r)``, ``print(r)``).

    ``r = render_why("clean", [Reason.input_changed("raw")]); print(r.text); r.html``
    """

    def __init__(self, text: str, html_: str) -> None:
        self.text = text
        self.html = html_

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return self.text

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, str]:
        return {"text/plain": self.text, "text/html": self.html}


def render_overview(
    rows: Sequence[dict[str, Any]], caches: Sequence[dict[str, Any]], *, folder: Any = None,
    remote: dict[str, Any] | None = None,
) -> Rendered:
    """Render ``%dreamer status``: every step and trainer, and every generation cache.

    ``render_overview([{"name": "clean", "kind": "step", "state": "complete", "size": 1200,
    "backups": 1, "fingerprint": "ab12...", "created": 1714567890.0}], [])``

    Parameters
    ----------
    rows : sequence of dict
        Keys ``name``, ``kind`` ("step"/"trainer"), ``state`` (:data:`~dreamer_magic.status.COMPLETE`,
        or :data:`~dreamer_magic.status.INCOMPLETE` with the reason in parentheses),
        ``size`` (bytes), ``backups`` (count), ``fingerprint``, ``created`` (epoch seconds or
        an ISO string). Missing keys show as blanks.
    caches : sequence of dict
        Keys ``name``, ``rows``, ``size`` (bytes), ``hits``, ``misses``, ``hit_rate`` (0..1 or
        ``None``; computed from hits and misses when absent).
    folder : path-like, optional
        The output folder, named in the heading.
    remote : dict, optional
        The remote mirror (SPEC §7): ``url``, ``pending`` (uploads queued or running, as text),
        ``errors`` (pushes given up). Rows then carry ``where``: ``local``, ``remote`` or ``both``.

    Returns
    -------
    Rendered
        ``.text`` (plain-text tables) and ``.html`` (HTML tables), shown by IPython.
    """
    title = "dreamer output folder" + (f" {folder}" if folder is not None else "")
    text_parts = [title]
    html_parts = [
        f'<div class="dreamer-overview" style="font-family:{_FONT};font-size:13px">'
        f'<div style="font-weight:600;margin-bottom:3px">{_esc(title)}</div>'
    ]
    if remote is not None:
        pending = list(remote.get("pending") or [])
        line = f"remote {remote.get('url')}: " + (f"{len(pending)} pending upload{'s' if len(pending) != 1 else ''} ({'; '.join(pending)})" if pending else "no pending uploads")
        lines = [line] + [f"push failed: {e}" for e in remote.get("errors") or []]
        text_parts.extend(lines)
        html_parts.extend(f'<div class="dreamer-remote" style="{_MUTED}">{_esc(x)}</div>' for x in lines)
    where = any("where" in r for r in rows)
    if rows:
        header = ("name", "kind", "state", "size", "backups", "fingerprint", "created") + (("where",) if where else ())
        trows = []
        hrows = []
        for r in rows:
            state = str(r.get("state", ""))
            fp = str(r.get("fingerprint") or "")[:12]
            cells = (
                str(r.get("name", "")),
                str(r.get("kind", "")),
                state,
                human_size(r["size"]) if r.get("size") is not None else "",
                str(r.get("backups", 0) or 0),
                fp,
                _fmt_created(r.get("created")),
            ) + ((str(r.get("where", "")),) if where else ())
            trows.append(cells)
            colour = _overview_state_colour(state)
            hrows.append(
                (
                    f'<span class="dreamer-name">{_esc(cells[0])}</span>',
                    _esc(cells[1]),
                    f'<span class="dreamer-state" data-state="{_esc(_stored_state(state))}" '
                    f'style="color:{colour}">{_esc(state)}</span>',
                    _esc(cells[3]),
                    _esc(cells[4]),
                    _esc(cells[5]),
                    _esc(cells[6]),
                    *((_esc(cells[7]),) if where else ()),
                )
            )
        text_parts.append(_text_table(header, trows, right={3, 4}))
        html_parts.append(_table(header, hrows, "dreamer-steps"))
    else:
        text_parts.append("no steps or trainers yet")
        html_parts.append(f'<div style="{_MUTED}">no steps or trainers yet</div>')
    if caches:
        header = ("generation cache", "rows", "size", "hits", "misses", "hit rate")
        with_savings = any(c.get("tokens_from_cache") or c.get("money_saved") is not None for c in caches)
        if with_savings:
            header += ("tokens from cache", "saved")
        trows = []
        for c in caches:
            hits, misses = int(c.get("hits") or 0), int(c.get("misses") or 0)
            rate = c.get("hit_rate")
            if rate is None:
                rate = _hit_rate(hits, misses)
            trows.append(
                (
                    str(c.get("name", "")),
                    str(c.get("rows", "")),
                    human_size(c["size"]) if c.get("size") is not None else "",
                    str(hits),
                    str(misses),
                    _pct(rate),
                )
                + (
                    (f"{int(c.get('tokens_from_cache') or 0):,}", _money(c.get("money_saved")))
                    if with_savings
                    else ()
                )
            )
        text_parts.append(_text_table(header, trows, right={1, 2, 3, 4, 5, 6, 7}) + "\n" + _SESSION_NOTE)
        html_parts.append(
            _table(header, [[_esc(x) for x in r] for r in trows], "dreamer-caches")
            + f'<div class="dreamer-session-note" style="{_MUTED};font-size:12px">{_esc(_SESSION_NOTE)}</div>'
        )
    html_parts.append("</div>")
    return Rendered("\n\n".join(text_parts), "".join(html_parts))


def _money(amount: float | None) -> str:
    """Dollars saved, to the cent (a tenth of a cent below one dollar); blank without prices."""
    if amount is None:
        return ""
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.3f}"


def _savings_phrase(saved: Any) -> str:
    """``", 1,234 tokens from cache, $0.012 saved"`` for an API backend's hits, else ``""``."""
    if not saved:
        return ""
    tokens, money = saved
    phrase = f", {int(tokens):,} tokens from cache"
    return phrase + (f", {_money(money)} saved" if money is not None else "")


def render_why(name: str, lines: Sequence[str]) -> Rendered:
    """Render ``%dreamer why NAME``: what changed since the stored fingerprint.

    ``print(render_why("clean", [Reason.input_changed("raw"), Reason.code_changed()]))``

    Parameters
    ----------
    name : str
        The step or trainer.
    lines : sequence of Reason or str
        One finding per line, rendered from its fields (:func:`reason_text`,
        :func:`reason_html`); a plain ``str`` is a note.

    Returns
    -------
    Rendered
        ``.text`` and ``.html``; with no lines, says that nothing changed.
    """
    head = f"why {name}:"
    if lines:
        text = head + "\n" + "\n".join(f"  - {reason_text(line)}" for line in lines)
        items = "".join(f"<li {_reason_attrs(line)}>{reason_html(line)}</li>" for line in lines)
        body = f'<ul style="margin:2px 0;padding-left:20px">{items}</ul>'
    else:
        text = head + "\n  nothing changed since the stored fingerprint"
        body = f'<div style="{_MUTED}">nothing changed since the stored fingerprint</div>'
    html_ = (
        f'<div class="dreamer-why" data-name="{_esc(name)}" style="font-family:{_FONT};'
        f'font-size:13px"><div>why <b style="font-family:{_MONO}">{_esc(name)}</b></div>'
        f"{body}</div>"
    )
    return Rendered(text, html_)
