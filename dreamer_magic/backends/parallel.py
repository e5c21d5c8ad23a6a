""":class:`ParallelLLM`: several backends of one model (two servers, two GPUs) behind one cache.

Examples
--------
>>> from dreamer_magic import OpenAILLM, ParallelLLM
>>> llm = ParallelLLM(OpenAILLM(model, base_url="http://gpu-a:8000/v1"),
...                   OpenAILLM(model, base_url="http://gpu-b:8000/v1"))  # doctest: +SKIP
>>> llm.generate(prompts, max_new_tokens=256)  # the misses are shared out between both  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from ..errors import DreamerError
from .base import Backend

__all__ = ["ParallelLLM"]


class ParallelLLM(Backend):
    """Share the misses of one ``generate`` between several backends of one model; one cache.

    Examples
    --------
    >>> both = ParallelLLM(llm_a, llm_b)  # doctest: +SKIP
    >>> both.generate(["Hi!"] * 1000, max_new_tokens=32)  # doctest: +SKIP

    Parameters
    ----------
    *members
        Backends of one kind, one model, one mode and one system prompt (so they make the
        same keys). Each runs up to its own ``concurrency`` requests at once and takes the
        next request when it has room, so a faster member answers more.
    name, prices
        As for the members (default: the first member's).

    The cache is the first member's database; any member alone finds the same answers.
    """

    def __init__(self, *members: Backend, name: str | None = None, prices: dict | None = None) -> None:
        if not members:
            raise DreamerError("ParallelLLM needs at least one backend: ParallelLLM(llm_a, llm_b)")
        for m in members:
            if not isinstance(m, Backend) or isinstance(m, ParallelLLM):
                raise DreamerError(
                    f"ParallelLLM takes OpenAILLM, VLLM or LiteLLM backends, not {type(m).__name__}"
                )
        first = members[0]
        for m in members[1:]:
            same = (type(m), m._backend_key(), m._model_params(), m.mode, m.system_prompt)
            if same != (type(first), first._backend_key(), first._model_params(), first.mode, first.system_prompt):
                raise DreamerError(
                    f"ParallelLLM shares one cache, so its backends must serve one model the same way: "
                    f"{first!r} and {m!r} differ in kind, model, mode or system prompt"
                )
        super().__init__(first.model, mode=first.mode, system_prompt=first.system_prompt,
                         concurrency=sum(m.concurrency for m in members),
                         name=name if name is not None else first.name,
                         prices=prices if prices is not None else first.prices,
                         output_folder=first.output_folder)
        self.members = list(members)
        self.kind = first.kind
        self.retries = first.retries

    def __repr__(self) -> str:
        return f"ParallelLLM({', '.join(map(repr, self.members))})"

    def _backend_key(self) -> Any:
        return self.members[0]._backend_key()

    def _model_params(self) -> dict:
        return self.members[0]._model_params()

    def _members(self) -> list[Backend]:
        return self.members

    @property
    def requests_by_member(self) -> list[int]:
        """Requests each member answered so far."""
        return [m.requests_sent for m in self.members]
