"""Plain status objects: what happened to a step or trainer, and why.

The core fills these in; ``render.py`` turns them into text and HTML and ``widgets.py`` shows
them live (an ipywidgets card). Nothing here imports IPython.

Examples
--------
>>> s = Status(kind="step", name="clean-reviews")
>>> s.state = RAN
>>> s.reasons.append(Reason.input_changed("raw"))
>>> s.reasons
['input `raw` changed']

Words
-----
One vocabulary, used by the cards, the text status line and ``%dreamer status`` alike:

- **What a cell did** (the card's badge, the first line of the text): ``running``,
  ``waiting for another kernel``, ``ran``, ``loaded from disk``, ``restored from backup``,
  ``resumed from checkpoint-N``, ``failed``, ``interrupted``.
- **What the output folder holds** (``%dreamer status``, and checkpoints on a trainer's card):
  ``complete`` (its metadata was written last and is valid: an unchanged cell loads it from
  disk) or ``incomplete`` (the reason follows in parentheses: the next run runs, or resumes
  from a checkpoint). A stored thing is complete or incomplete; a cell ran, loaded, restored,
  resumed, failed or was interrupted.
- "checkpoint" is only a training checkpoint; a bare "step" is only a ``%%dreamer_step``
  (training progress is "training step N/M"); "saved" is only time saved by a hit (disk writes
  are "written", results on disk are "kept").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

# What a cell did, in the words the user reads (SPEC §6).
RUNNING = "running"
WAITING = "waiting for another kernel"
RAN = "ran"
LOADED = "loaded from disk"
RESTORED = "restored from backup"
PULLED = "loaded from remote"  # a hit pulled from the remote output folder (SPEC §7)
FAILED = "failed"
INTERRUPTED = "interrupted"

# What the output folder holds (``%dreamer status``; a checkpoint's flag on a trainer's card).
COMPLETE = "complete"
INCOMPLETE = "incomplete"


def resumed_from(checkpoint: str, remote: bool = False) -> str:
    """The state of a trainer that resumed, e.g. ``"resumed from checkpoint-300"``
    (``"resumed from checkpoint-30 (remote)"`` when the checkpoint came from the remote)."""
    return f"resumed from {checkpoint}" + (" (remote)" if remote else "")


# --------------------------------------------------------------------------------------------
# Why a cell ran (or did not)

#: The kinds of :class:`Reason`, and what each one means.
REASON_KINDS: dict[str, str] = {
    "first-run": "no complete result is kept for this cell yet",
    "code": "the cell's code changed (``lines``: which lines, each a ``code`` reason)",
    "input": "an input is new or changed (``subject``: its name)",
    "input-gone": "an input the kept result read is no longer read or not defined",
    "version": "``--version`` changed (``old``, ``new``)",
    "library": "a library's version changed (``subject``: the library, ``old``, ``new``)",
    "format": "the fingerprint format changed (a dreamer_magic upgrade)",
    "arguments": "a step function was called with other arguments",
    "kind": "the cell was a step and is now a trainer, or the other way (``old``, ``new``)",
    "force": "``--force``",
    "problem": "the result on disk could not be used (the text says why)",
    "resume": "an unfinished training is resumed, or deliberately not",
    "restored": "a backup matched the code and inputs: restored instead of running",
    "unchanged": "nothing changed: the result on disk will be loaded (``%dreamer why``)",
    "file": "a file the body read changed (``subject``: its path)",
    "module": "user code outside the notebook changed (``subject``: the module)",
    "rng": "the global random state the body draws from differs",
    "untracked": "something the body reads cannot be tracked (``subject``: what)",
    "note": "free text, e.g. a plain ``str`` reason; Markdown-style `backticks` mark code",
}

_SLOTS = ("{subject}", "{old}", "{new}")


class Reason(str):
    """One typed reason why a cell ran: a ``str`` (the text the user reads) with fields.

    ``Reason.input_changed("raw")`` is ``"input `raw` changed"`` with ``kind == "input"`` and
    ``subject == "raw"``; renderers use the fields (names in code style, ``old → new``), code
    that only needs text uses it as the string it is.

    Parameters
    ----------
    words : str
        The sentence. ``{subject}``, ``{old}`` and ``{new}`` mark where those fields go; when
        ``old`` and ``new`` are both given and not placed, ``: old → new`` follows the words.
    kind : str
        One of :data:`REASON_KINDS` (default ``"note"``).
    subject : str, optional
        The input, library, file or module it is about.
    old, new : str, optional
        Short values before and after.
    lines : iterable of str, optional
        Changed-code descriptions (``code`` reasons from :meth:`code_line`, or plain text),
        shown after the words.

    Examples
    --------
    >>> r = Reason.library_changed("torch", "2.1.0", "2.2.0")
    >>> r, r.kind, r.subject, r.old, r.new
    ('library `torch`: `2.1.0` → `2.2.0`', 'library', 'torch', '2.1.0', '2.2.0')
    >>> "torch" in r
    True
    """

    __slots__ = ("words", "kind", "subject", "old", "new", "lines")

    words: str
    kind: str
    subject: str | None
    old: str | None
    new: str | None
    lines: list[str]

    def __new__(
        cls,
        words: str,
        kind: str = "note",
        *,
        subject: str | None = None,
        old: str | None = None,
        new: str | None = None,
        lines: Iterable[str] = (),
    ) -> Reason:
        if kind not in REASON_KINDS:
            raise ValueError(f"unknown reason kind {kind!r}; use one of: {', '.join(REASON_KINDS)}")
        lines = list(lines)
        text = words if kind == "note" else _text(_pieces(words, kind, subject, old, new, lines))
        self = super().__new__(cls, text)
        self.words, self.kind, self.subject, self.old, self.new, self.lines = (
            words, kind, subject, old, new, lines,
        )
        return self

    def __reduce__(self) -> tuple:
        return (_rebuild, (self.words, self.kind, self.subject, self.old, self.new, self.lines))

    @classmethod
    def of(cls, reason: str) -> Reason:
        """``reason`` itself if it is a :class:`Reason`, else a ``note`` with its text."""
        return reason if isinstance(reason, Reason) else cls(str(reason))

    def pieces(self) -> list[tuple[str, str]]:
        """The sentence in order, as ``(role, text)`` pairs, for renderers.

        Role ``"text"`` is plain words; ``"subject"``, ``"old"``, ``"new"`` and ``"code"`` are
        names, values and code, shown in code style.

        >>> Reason.input_changed("raw", "3", "4").pieces()
        [('text', 'input '), ('subject', 'raw'), ('text', ' changed'), ('text', ': '), ('old', '3'), ('text', ' → '), ('new', '4')]
        """
        return _pieces(self.words, self.kind, self.subject, self.old, self.new, self.lines)

    # -- the reasons the core gives, one constructor each --------------------------------

    @classmethod
    def first_run(cls, problem: str | None = None) -> Reason:
        """``"first run: no saved result"``, or ``"first run: <problem>"`` when a folder is unusable."""
        if problem and problem != "no saved result":
            return cls(f"first run: {problem}", "first-run")
        return cls("first run: no saved result", "first-run")

    @classmethod
    def code_changed(cls, lines: Iterable[str] = ()) -> Reason:
        """``"code changed: line 2: `b = 2` → `b = 3`"``; ``lines`` from :meth:`code_line`."""
        return cls("code changed", "code", lines=lines)

    @classmethod
    def code_line(cls, where: str, old: str | None = None, new: str | None = None) -> Reason:
        """One changed place in the code: ``where`` is ``"line 2"`` or ``"lines 2-3"``.

        Both ``old`` and ``new``: ``"line 2: `b = 2` → `b = 3`"``; only ``new``:
        ``"line 2 added: `c = 1`"``; only ``old``: ``"line 2: removed `b = 2`"``.
        """
        if old is not None and new is not None:
            return cls(where, "code", old=old, new=new)
        if new is not None:
            return cls(f"{where} added: {{new}}", "code", new=new)
        return cls(f"{where}: removed {{old}}", "code", old=old)

    @classmethod
    def input_added(cls, name: str) -> Reason:
        """``"new input `raw`"``."""
        return cls("new input {subject}", "input", subject=name)

    @classmethod
    def input_changed(cls, name: str, old: str | None = None, new: str | None = None) -> Reason:
        """``"input `raw` changed"``; with short values ``"input `n` changed: `3` → `4`"``."""
        return cls("input {subject} changed", "input", subject=name, old=old, new=new)

    @classmethod
    def input_gone(cls, name: str) -> Reason:
        """``"input `raw` no longer read"``."""
        return cls("input {subject} no longer read", "input-gone", subject=name)

    @classmethod
    def input_undefined(cls, name: str) -> Reason:
        """An input the kept result read that this kernel does not define (``%dreamer why``)."""
        return cls(
            "input {subject} is not defined in this kernel: run the cells that define it first",
            "input-gone",
            subject=name,
        )

    @classmethod
    def version_changed(cls, old: Any, new: Any) -> Reason:
        """``"--version changed: `'1'` → `'2'`"`` (values as Python writes them)."""
        return cls("--version changed", "version", old=repr(old), new=repr(new))

    @classmethod
    def library_changed(cls, name: str, old: str | None, new: str | None) -> Reason:
        """``"library `torch`: `2.1.0` → `2.2.0`"``; a library new to the cell, or no longer used, says so."""
        if old is None and new is not None:
            return cls("library {subject} {new} now used", "library", subject=name, new=new)
        if new is None and old is not None:
            return cls("library {subject} {old} no longer used", "library", subject=name, old=old)
        return cls("library {subject}", "library", subject=name, old=str(old), new=str(new))

    @classmethod
    def format_changed(cls) -> Reason:
        """The fingerprint format changed with a dreamer_magic upgrade."""
        return cls("the fingerprint format changed (dreamer_magic upgrade)", "format")

    @classmethod
    def arguments_changed(cls) -> Reason:
        """A step function was called with other arguments."""
        return cls("arguments changed", "arguments")

    @classmethod
    def kind_changed(cls, old: str, new: str) -> Reason:
        """``"was a step, now a trainer"``."""
        return cls("was a {old}, now a {new}", "kind", old=old, new=new)

    @classmethod
    def force(cls) -> Reason:
        """``"--force"``."""
        return cls("--force", "force")

    @classmethod
    def problem(cls, text: str) -> Reason:
        """The result on disk could not be used; ``text`` says why."""
        return cls(text, "problem")

    @classmethod
    def resume(cls, text: str) -> Reason:
        """Why a trainer resumes an unfinished training, or starts over (``--no-resume``)."""
        return cls(text, "resume")

    @classmethod
    def restored(cls) -> Reason:
        """A backup matched: restored instead of running."""
        return cls("the code and inputs match a backup: restored it instead of running", "restored")

    @classmethod
    def unchanged(cls, fingerprint: str) -> Reason:
        """``%dreamer why`` when nothing changed: the result on disk will be loaded."""
        return cls(
            "nothing changed: the result on disk (fingerprint {subject}) will be loaded",
            "unchanged",
            subject=fingerprint[:12],
        )

    @classmethod
    def file_changed(cls, path: str, old: str | None = None, new: str | None = None) -> Reason:
        """``"file `data/raw.csv` changed"``: a file the body read."""
        return cls("file {subject} changed", "file", subject=path, old=old, new=new)

    @classmethod
    def module_changed(cls, name: str, lines: Iterable[str] = ()) -> Reason:
        """``"module `helpers` changed"``: user code outside the notebook."""
        return cls("module {subject} changed", "module", subject=name, lines=lines)

    @classmethod
    def rng_changed(cls) -> Reason:
        """The global random state the body draws from differs."""
        return cls("the random state differs", "rng")

    @classmethod
    def untracked(cls, what: str) -> Reason:
        """Something the body reads that cannot be tracked (an environment variable, the network)."""
        return cls("reads {subject}, which cannot be tracked", "untracked", subject=what)

    @classmethod
    def note(cls, text: str) -> Reason:
        """Free text; Markdown-style `backticks` mark code."""
        return cls(text, "note")


PREVIEW_LIMIT = 40  # characters of a value preview (why-lines' old → new)
_SCALARS = (bool, int, float, complex, str, bytes, type(None))


def value_preview(value: Any) -> str | None:
    """A short text of a small value, for why-lines' ``old → new``; ``None`` when there is none.

    ``value_preview(128)`` -> ``"128"``; ``value_preview(list(range(10)))`` -> ``"10 items"``; ``[1, 2]`` -> ``"[1, 2]"``;
    ``value_preview("gpt2")`` -> ``"'gpt2'"``; an array -> ``"shape (3, 4)"``.

    Numbers and short strings are written as Python writes them; containers by their length (or
    themselves when they hold a few plain values); arrays, tensors and frames by their shape.
    Anything else has no preview (only "changed" is said).
    """
    if isinstance(value, _SCALARS):
        text = repr(value)
        if len(text) <= PREVIEW_LIMIT:
            return text
        return f"{len(value)} characters" if isinstance(value, (str, bytes)) else None
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        n = len(value)
        items = value.items() if isinstance(value, dict) else value
        if n <= 6 and isinstance(value, (list, tuple, dict)) and all(
            isinstance(x, _SCALARS) for pair in items for x in (pair if isinstance(value, dict) else (pair,))
        ):
            text = repr(value)
            if len(text) <= PREVIEW_LIMIT:
                return text
        return f"{n} item{'' if n == 1 else 's'}"
    shape = getattr(value, "shape", None)
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return f"shape {tuple(shape)}"
    return None


def _pieces(
    words: str, kind: str, subject: Any, old: Any, new: Any, lines: list
) -> list[tuple[str, str]]:
    """:meth:`Reason.pieces` from the fields (also how the text is made: code in backticks)."""
    if kind == "note":
        return _note_pieces(words)
    values = {"{subject}": subject, "{old}": old, "{new}": new}
    out: list[tuple[str, str]] = []
    rest, placed = words, set()
    while rest:
        found = [(rest.find(p), p) for p in _SLOTS if values[p] is not None and p in rest]
        if not found:
            out.append(("text", rest))
            break
        i, slot = min(found)
        if i:
            out.append(("text", rest[:i]))
        out.append((slot[1:-1], str(values[slot])))
        placed.add(slot)
        rest = rest[i + len(slot):]
    if old is not None and new is not None and not placed & {"{old}", "{new}"}:
        out += [("text", ": "), ("old", str(old)), ("text", " → "), ("new", str(new))]
    if lines:
        out.append(("text", ": "))
        for i, line in enumerate(lines):
            if i:
                out.append(("text", "; "))
            out.extend(line.pieces() if isinstance(line, Reason) else [("text", str(line))])
    return out


def _text(pieces: list[tuple[str, str]]) -> str:
    return "".join(text if role == "text" else f"`{text}`" for role, text in pieces)


def _note_pieces(text: str) -> list[tuple[str, str]]:
    """Free text with Markdown-style `code` spans; an unpaired backtick stays text."""
    parts = text.split("`")
    if len(parts) % 2 == 0:  # an odd number of backticks: the last one is not a code mark
        parts[-2:] = [parts[-2] + "`" + parts[-1]]
    return [("code" if i % 2 else "text", part) for i, part in enumerate(parts) if part]


def _rebuild(words: str, kind: str, subject: Any, old: Any, new: Any, lines: list) -> Reason:
    return Reason(words, kind, subject=subject, old=old, new=new, lines=lines)


@dataclass
class OutputInfo:
    """One output written to disk: its variable name, type, how it is stored, and its size.

    ``pickled``: saved with pickle (loading it runs code: the card flags it). ``temporary``: a
    loop variable or a ``_``-name, folded away at the end of the outputs table.
    """

    name: str
    type: str
    storage: str
    size: int = 0
    pickled: bool = False
    temporary: bool = False


@dataclass
class Progress:
    """Progress the body reports while it runs (a tqdm bar, generation batches).

    ``Progress("tokenize", 40, 100, eta=12.0)`` reads ``tokenize 40/100 (40%), ETA 12 s``.
    """

    what: str
    done: float
    total: float | None = None
    eta: float | None = None
    source: str = ""  # who reports it: "tqdm" (read by the live card's clock), or the code that set it


@dataclass
class CheckpointInfo:
    """One trainer checkpoint folder."""

    name: str
    step: int
    time: float
    size: int
    complete: bool = True


@dataclass
class Status:
    """Everything the status display shows for one ``%%dreamer_step``/``%%dreamer_train`` cell.

    Call :meth:`changed` after mutating fields; listeners (the widget) refresh on it.
    """

    kind: str  # "step" or "trainer"
    name: str
    folder: str = ""
    state: str = RUNNING
    reasons: list[str] = field(default_factory=list)  # Reasons; a plain str is a note
    fingerprint: str = ""
    started: float = field(default_factory=time.time)
    duration: float | None = None  # seconds this time
    saved: float | None = None  # seconds of original run time that a hit avoided
    outputs: list[OutputInfo] = field(default_factory=list)
    # generation-cache activity while the cell ran: database name -> [hits, misses]
    cache: dict[str, list[int]] = field(default_factory=dict)
    # what the hits would have cost (API backends): database name -> [tokens, money or None]
    cache_saved: dict[str, list] = field(default_factory=dict)
    error: str | None = None
    # the error is raised to the user right below the card (a traceback, a UsageError line):
    # the card names it without repeating the message
    error_shown_below: bool = False
    notes: list[str] = field(default_factory=list)
    # what a hit checked of the saved files: "digest", "size", or None (saved before file records)
    verified: str | None = None
    progress: Progress | None = None  # what the body reports while it runs (a tqdm bar)
    # trainers only
    step: int | None = None
    max_steps: int | None = None
    eta: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)  # validation loss by training step
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    resumed_from: str | None = None
    skipped_checkpoints: list[str] = field(default_factory=list)
    model_path: str | None = None

    def __post_init__(self) -> None:
        self._listeners: list[Callable[[Status], Any]] = []

    def on_change(self, listener: Callable[[Status], Any]) -> None:
        """Call ``listener(self)`` after every :meth:`changed`."""
        self._listeners.append(listener)

    def changed(self) -> None:
        """Tell listeners that fields changed (cheap; listeners throttle themselves)."""
        for listener in list(self._listeners):
            listener(self)

    def count_cache(self, database: str, hits: int, misses: int, tokens: int = 0,
                    saved: float | None = None) -> None:
        """Add generation-cache hits and misses made while the cell runs.

        API backends also report the tokens the hits would have cost and, given prices, the
        money (``saved``).
        """
        counts = self.cache.setdefault(database, [0, 0])
        counts[0] += hits
        counts[1] += misses
        if tokens or saved is not None:
            more = self.cache_saved.setdefault(database, [0, None])
            more[0] += tokens
            if saved is not None:
                more[1] = (more[1] or 0.0) + saved
        self.changed()

    @property
    def total_size(self) -> int:
        return sum(o.size for o in self.outputs)
