"""dreamer_magic: cached, explainable, crash-safe notebook steps, trainers and generation caches.

Examples
--------
>>> %load_ext dreamer_magic          # doctest: +SKIP
>>> from dreamer_magic import LLM, Embedder, cached, step   # doctest: +SKIP
>>> from dreamer_magic import OpenAILLM, VLLM, LiteLLM, ParallelLLM   # doctest: +SKIP

Importing the package is cheap: the magics, torch, transformers and datasets load only when
first needed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "LLM", "Embedder", "cached", "step", "Checkpointer", "last_status",
    "OpenAILLM", "VLLM", "LiteLLM", "ParallelLLM", "__version__",
]

_LAZY = {
    "LLM": "models",
    "Embedder": "models",
    "cached": "models",
    "step": "steps",
    "last_status": "steps",
    "Checkpointer": "checkpointer",
    "OpenAILLM": "backends.openai",
    "VLLM": "backends.vllm",
    "LiteLLM": "backends.litellm",
    "ParallelLLM": "backends.parallel",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dreamer_magic' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dreamer_magic``: register ``%%dreamer_step``, ``%%dreamer_train`` and ``%dreamer``."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext dreamer_magic``: remove every magic and hook the extension added."""
    from .magics import unload

    unload(ipython)
