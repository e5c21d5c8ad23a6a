""":class:`LiteLLM`: any provider LiteLLM speaks to (Anthropic, Gemini, Bedrock, Mistral...), cached.

Examples
--------
>>> from dreamer_magic import LiteLLM
>>> llm = LiteLLM("anthropic/claude-3-5-haiku-latest", prices={"input": 0.8, "output": 4.0})  # doctest: +SKIP
>>> llm.generate(["Name a colour."], max_new_tokens=8, temperature=0)  # doctest: +SKIP
['Blue.']

The ``[litellm]`` extra. LiteLLM's own retries are turned off (``num_retries=0``): the runner
retries every backend the same way (see :mod:`.base`). LiteLLM is imported with
``LITELLM_LOCAL_MODEL_COST_MAP=True`` unless set otherwise, so it reads its bundled model list
instead of fetching one from the network.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator

from ..errors import DreamerError
from .base import Backend, BackendError, Job, RetryableError, missing_extra, openai_rows, retrying
from .openai import RETRY_STATUS, _HINTS, _retry_after

__all__ = ["LiteLLM"]


def _import_litellm():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise missing_extra("LiteLLM", "litellm", "litellm") from None
    return litellm


class LiteLLM(Backend):
    """A model of any provider LiteLLM supports, with every answer cached.

    Examples
    --------
    >>> llm = LiteLLM("openai/my-model", api_base="http://127.0.0.1:8000/v1")  # doctest: +SKIP
    >>> llm.generate("Hi!", max_new_tokens=8)  # doctest: +SKIP
    'Hello!'

    Parameters
    ----------
    model
        LiteLLM's model name, ``"<provider>/<model>"``.
    api_base, api_key
        Passed to LiteLLM (default: its environment variables); neither is part of the key.
    system_prompt, mode, concurrency, timeout, max_retries, name, prices, output_folder
        As for :class:`~dreamer_magic.OpenAILLM`.
    """

    kind = "litellm"

    def __init__(self, model: str, *, api_base: str | None = None, api_key: str | None = None,
                 system_prompt: str | None = None, mode: str = "chat", concurrency: int = 16,
                 timeout: float = 600.0, max_retries: int = 6, name: str | None = None,
                 prices: dict | None = None, output_folder: Any = None) -> None:
        if not isinstance(model, str) or not model:
            raise DreamerError(f"LiteLLM needs a model name, e.g. LiteLLM('openai/gpt-4o-mini'); got {model!r}")
        super().__init__(model, mode=mode, system_prompt=system_prompt, concurrency=concurrency,
                         name=name, prices=prices, output_folder=output_folder)
        self.api_base = api_base
        self._api_key = api_key
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        litellm = _import_litellm()
        chat = self.mode == "chat"
        options: dict[str, Any] = {"timeout": self.timeout, "num_retries": 0}
        if self.api_base:
            options["api_base"] = self.api_base
        if self._api_key:
            options["api_key"] = self._api_key

        async def send(job: Job) -> list[str]:
            body = job.request_body()
            try:
                if chat:
                    response = await litellm.acompletion(**body, **options)
                else:
                    response = await litellm.atext_completion(**body, **options)
            except Exception as e:  # LiteLLM maps every provider's errors onto OpenAI's
                raise _translate(e, self.model) from None
            data = response.model_dump() if hasattr(response, "model_dump") else dict(response)
            return openai_rows(data, chat)

        async def call(batch: list[Job]) -> list[list[str]]:
            return [
                await retrying(lambda: send(job), max_retries=self.max_retries, log=self.retries,
                               what=f"{self.model} through LiteLLM")
                for job in batch
            ]

        yield call


def _translate(error: Exception, model: str) -> Exception:
    status = getattr(error, "status_code", None)
    name = type(error).__name__
    message = str(getattr(error, "message", "") or error)[:300]
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    if name in ("Timeout", "APIConnectionError", "ServiceUnavailableError", "InternalServerError",
                "RateLimitError") or status in RETRY_STATUS:
        return RetryableError(f"{status or name} {message}", _retry_after(headers) if headers else None)
    hint = _HINTS.get(status or 0, "")
    return BackendError(
        f"{model} through LiteLLM: {name}" + (f" {status}" if status else "") + f": {message}"
        + (f" ({hint})" if hint else "")
    )
