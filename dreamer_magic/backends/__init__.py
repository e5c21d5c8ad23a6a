"""Cached generation backends beside the local transformers :class:`~dreamer_magic.LLM`.

Examples
--------
>>> from dreamer_magic import OpenAILLM, ParallelLLM
>>> llm = OpenAILLM("gpt-4o-mini", prices={"input": 0.15, "output": 0.60})  # doctest: +SKIP
>>> llm.generate(["Name a colour."], max_new_tokens=8, temperature=0)  # doctest: +SKIP
['Blue.']

Each backend lives in its own module and imports its optional extra (``httpx``, ``vllm``,
``litellm``) only when it is first used, so ``import dreamer_magic`` and ``%load_ext`` stay light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OpenAILLM", "VLLM", "LiteLLM", "ParallelLLM", "Backend"]

_LAZY = {
    "OpenAILLM": "openai",
    "VLLM": "vllm",
    "LiteLLM": "litellm",
    "ParallelLLM": "parallel",
    "Backend": "base",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
