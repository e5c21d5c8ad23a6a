"""Plain status objects: what happened to a step or trainer, and why.

The core fills these in; ``widgets.py`` renders them (an ipywidgets view that updates live,
or plain text where no widget frontend exists). Nothing here imports IPython.

Examples
--------
>>> s = Status(kind="step", name="clean-reviews")
>>> s.state = RAN
>>> s.reasons.append("first run: no saved result")
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

# What happened, in the words the user reads (SPEC §6).
RUNNING = "running"
WAITING = "waiting for another kernel"
RAN = "ran"
LOADED = "loaded from disk"
RESTORED = "restored from backup"
FAILED = "failed"
INTERRUPTED = "interrupted"


def resumed_from(checkpoint: str) -> str:
    """The state of a trainer that resumed, e.g. ``"resumed from checkpoint-300"``."""
    return f"resumed from {checkpoint}"


@dataclass
class OutputInfo:
    """One saved output: its variable name, type, how it is stored, and its size on disk."""

    name: str
    type: str
    storage: str
    size: int = 0


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
    reasons: list[str] = field(default_factory=list)
    fingerprint: str = ""
    started: float = field(default_factory=time.time)
    duration: float | None = None  # seconds this time
    saved: float | None = None  # seconds of original run time that a hit avoided
    outputs: list[OutputInfo] = field(default_factory=list)
    # generation-cache activity while the cell ran: database name -> [hits, misses]
    cache: dict[str, list[int]] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    # trainers only
    step: int | None = None
    max_steps: int | None = None
    eta: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
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

    def count_cache(self, database: str, hits: int, misses: int) -> None:
        """Add generation-cache hits and misses made while the cell runs."""
        counts = self.cache.setdefault(database, [0, 0])
        counts[0] += hits
        counts[1] += misses
        self.changed()

    @property
    def total_size(self) -> int:
        return sum(o.size for o in self.outputs)
