"""Generation-cache hit/miss events: the cache publishes, running steps and trainers subscribe.

Pure and tiny (stdlib only), so that both the generation cache and the step lifecycle can
import it without importing each other.

Examples
--------
>>> seen = []
>>> token = subscribe(lambda database, hits, misses: seen.append((database, hits, misses)))
>>> publish("gpt2-0123", 3, 1)
>>> unsubscribe(token); publish("gpt2-0123", 1, 0)
>>> seen
[('gpt2-0123', 3, 1)]
"""

from __future__ import annotations

import threading
from typing import Any, Callable

Listener = Callable[[str, int, int], Any]

_lock = threading.Lock()
_listeners: dict[int, tuple[Listener, int | None, bool]] = {}  # fn, thread, takes savings
_next = 0


def subscribe(listener: Listener, *, this_thread: bool = False) -> int:
    """Call ``listener(database, hits, misses)`` after every generation-cache lookup.

    With ``this_thread=True`` only lookups made in the calling thread are reported (a step
    counts what its own body looked up, not what another thread's step did). Returns a token
    for :func:`unsubscribe`.
    """
    global _next
    with _lock:
        _next += 1
        _listeners[_next] = (
            listener, threading.get_ident() if this_thread else None, _takes_savings(listener)
        )
        return _next


_SIGNATURES: dict[Any, bool] = {}  # function -> takes savings (a step subscribes on every run)


def _takes_savings(listener: Listener) -> bool:
    """Whether a listener accepts ``tokens=`` and ``saved=`` (API backends report them)."""
    function = getattr(listener, "__func__", None)  # a bound method: its function decides
    if function is not None and function in _SIGNATURES:
        return _SIGNATURES[function]
    import inspect

    try:
        params = inspect.signature(listener).parameters
    except (TypeError, ValueError):
        return False
    takes = ("tokens" in params and "saved" in params) or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
    )
    if function is not None and len(_SIGNATURES) < 256:
        _SIGNATURES[function] = takes
    return takes


def unsubscribe(token: int) -> None:
    """Stop a subscription; an unknown token does nothing."""
    with _lock:
        _listeners.pop(token, None)


def publish(database: str, hits: int, misses: int, **savings: Any) -> None:
    """Tell every subscriber about one lookup (called by the generation cache).

    ``savings`` (``tokens=``, ``saved=``: what the hits would have cost) reach only the
    listeners that accept them; the others hear ``(database, hits, misses)`` as always.
    """
    if not _listeners:
        return
    me = threading.get_ident()
    with _lock:
        targets = [(fn, takes) for fn, thread, takes in _listeners.values() if thread is None or thread == me]
    for fn, takes in targets:
        if savings and takes:
            fn(database, hits, misses, **savings)
        else:
            fn(database, hits, misses)
