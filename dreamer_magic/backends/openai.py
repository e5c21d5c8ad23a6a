""":class:`OpenAILLM`: OpenAI, and any server that speaks its API (vLLM, llama.cpp, TGI, Ollama...).

Examples
--------
>>> from dreamer_magic import OpenAILLM
>>> llm = OpenAILLM("gpt-4o-mini", prices={"input": 0.15, "output": 0.60})  # doctest: +SKIP
>>> llm.generate(["Name a colour."], max_new_tokens=8, temperature=0)  # doctest: +SKIP
['Blue.']
>>> local = OpenAILLM("Qwen/Qwen2.5-0.5B-Instruct", base_url="http://127.0.0.1:8000/v1")  # doctest: +SKIP

The client is a small one of our own over ``aiohttp`` (the ``[openai]`` extra), not the
``openai`` package nor ``httpx``: the cache needs only two endpoints and the raw JSON of the
answer, and on this project's 2-core machine ``httpx.AsyncClient`` (which the ``openai`` package
runs on) managed 65-130 requests/s against an instant local server, where a bare ``aiohttp``
loop makes 4,000-6,500 (``benchmarks/bench_backends.py --part client``). aiohttp also brings
TLS and chunked answers. Retries, backoff and ``Retry-After`` are ours, the same for every
backend. See :mod:`.base` for the keys.

What keeps the client's own cost near the bare loop's (about 0.75-0.9 of its requests per CPU
second): ``HTTP(S)_PROXY``, ``NO_PROXY`` and ``.netrc`` are looked up once a call, not per
request (aiohttp's ``trust_env`` does that in a worker thread and cost three quarters of the
client's time); one timer task watches every request in flight (:class:`_Deadlines`); only the
prompt is JSON-encoded per request (:meth:`.base.Job.request_json`); and each backend keeps its
session, and so its connections, open from one call to the next on the loop every backend
shares (:func:`.base.shared_loop`), so a loop of one-prompt calls does not open a connection
(and a TLS handshake) per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import time
import weakref
from typing import Any, AsyncIterator

from ..errors import DreamerError
from .base import Backend, BackendError, Job, RetryableError, missing_extra, openai_rows, retrying

__all__ = ["OpenAILLM"]

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_HINTS = {
    401: "check the api key (api_key= or OPENAI_API_KEY)",
    403: "the api key may not have access to this model",
    404: "check the model name and base_url (it usually ends in /v1)",
    400: "the server refused a request field; check the arguments to generate()",
    422: "the server refused a request field; check the arguments to generate()",
}


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def _error_message(raw: bytes) -> str:
    try:
        data = json.loads(raw)
    except ValueError:
        return raw[:300].decode("utf-8", "replace")
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or data)[:300]


def _from_environment(url: str, headers: dict) -> tuple[Any, Any] | None:
    """``(proxy, proxy_auth)`` for ``url`` from the environment, as aiohttp's ``trust_env`` finds them.

    Adds ``.netrc`` credentials for the host to ``headers`` when no api key is set. ``None``
    when this aiohttp lacks the helpers (the session then falls back to ``trust_env=True``).
    """
    try:
        from aiohttp.helpers import basicauth_from_netrc, get_env_proxy_for_url, netrc_from_env
        from yarl import URL
    except ImportError:
        return None
    target = URL(url)
    if "authorization" not in {k.lower() for k in headers} and target.host:
        with contextlib.suppress(LookupError):
            headers["authorization"] = basicauth_from_netrc(netrc_from_env(), target.host).encode()
    try:
        return get_env_proxy_for_url(target)
    except LookupError:  # no proxy for this address (none set, or NO_PROXY)
        return None, None


class _Deadlines:
    """One timer for every request in flight: a request past its deadline is cancelled as a timeout.

    Examples
    --------
    >>> async with _Deadlines(600.0) as deadlines:  # doctest: +SKIP
    ...     with deadlines.request():  # asyncio.TimeoutError after 600 s
    ...         await client.post(...)

    aiohttp's own ``total`` timeout schedules and cancels a timer for each request; this one task
    looks at the requests in flight every ``tick`` seconds instead, so a request times out between
    ``timeout`` and ``timeout + tick`` seconds after it started (``tick``: a twentieth of the
    timeout, at most one second). Cancelling the request's task and turning that into a timeout is
    what aiohttp's timer does too.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(1.0, max(timeout / 20, 0.005))
        self._due: dict[asyncio.Task, float] = {}  # the task of each request in flight: its deadline
        self._expired: set[asyncio.Task] = set()
        self._watch: asyncio.Task | None = None
        self._request = _Request(self)

    async def __aenter__(self) -> "_Deadlines":
        self._watch = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            now = time.monotonic()
            for task in [t for t, due in self._due.items() if due <= now]:
                del self._due[task]
                self._expired.add(task)
                task.cancel()

    def request(self) -> "_Request":
        """Around one request (in its own task); raises :class:`asyncio.TimeoutError` past the deadline."""
        return self._request


class _Request:
    """``with deadlines.request():`` (a class, not a generator: it is entered for every request)."""

    __slots__ = ("deadlines",)

    def __init__(self, deadlines: _Deadlines) -> None:
        self.deadlines = deadlines

    def __enter__(self) -> None:
        d = self.deadlines
        d._due[asyncio.current_task()] = time.monotonic() + d.timeout

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> bool:
        d, task = self.deadlines, asyncio.current_task()
        d._due.pop(task, None)
        if task not in d._expired:
            return False
        d._expired.discard(task)  # the cancel was ours: it ends here
        if hasattr(task, "uncancel"):  # Python 3.11+
            task.uncancel()
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            raise asyncio.TimeoutError from None
        return False  # the request failed otherwise meanwhile: that error goes on as it is


# each OpenAILLM's open aiohttp session on the shared loop: (what it was made for, session, finalizer)
_CLIENTS: "weakref.WeakKeyDictionary[Any, tuple[tuple, Any, weakref.finalize]]" = weakref.WeakKeyDictionary()


async def _client(llm: "OpenAILLM", aiohttp: Any, headers: dict, trust_env: bool, via: dict) -> Any:
    """``llm``'s aiohttp session, kept open from one call to the next (with its connections).

    Made again when what it was made for changes (headers, the proxy, ``concurrency``, the
    process); closed when ``llm`` is garbage-collected or the interpreter exits.
    """
    loop = asyncio.get_running_loop()
    key = (os.getpid(), id(loop), sorted(headers.items()), trust_env, repr(via), llm.concurrency, llm.timeout)
    held = _CLIENTS.get(llm)
    if held is not None:
        if held[0] == key and not held[1].closed:
            return held[1]
        held[2].detach()
        if held[0][1] == key[1]:  # on this loop (a loop closed by the interpreter exiting: let it be)
            await held[1].close()
    # the whole request's timeout is ours (one timer for all, see _Deadlines); aiohttp's
    # bounds only the opening of a new connection
    timeout = aiohttp.ClientTimeout(total=None, connect=min(llm.timeout, 30.0))
    connector = aiohttp.TCPConnector(limit=llm.concurrency, limit_per_host=llm.concurrency)
    session = aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector, trust_env=trust_env)
    _CLIENTS[llm] = (key, session, weakref.finalize(llm, _close_client, loop, session, os.getpid()))
    return session


def _forget_clients_after_fork() -> None:
    """In a forked child: the parent's sessions are not ours to use or to close.

    Their connections are the parent's (closing a TLS one would write on it), so they are only
    marked closed, which also keeps aiohttp from warning about them; the child opens its own.
    """
    for _, session, finalizer in list(_CLIENTS.values()):
        finalizer.detach()
        with contextlib.suppress(Exception):
            session._connector._closed = True
            session._connector = None
    _CLIENTS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_clients_after_fork)


def _close_client(loop: asyncio.AbstractEventLoop, session: Any, pid: int) -> None:
    """Close a session on its loop (from a finalizer: the backend went away, or the interpreter exits)."""
    if os.getpid() != pid or loop.is_closed() or not loop.is_running():
        return
    future = asyncio.run_coroutine_threadsafe(session.close(), loop)
    if asyncio._get_running_loop() is not loop:  # not on the loop's own thread: let it finish
        with contextlib.suppress(Exception):
            future.result(timeout=2)


class OpenAILLM(Backend):
    """A model behind the OpenAI API or any compatible server, with every answer cached.

    Examples
    --------
    >>> llm = OpenAILLM("gpt-4o-mini", system_prompt="Answer in one word.")  # doctest: +SKIP
    >>> llm.generate(["Sky colour?", "Grass colour?"], temperature=0)  # doctest: +SKIP
    ['Blue', 'Green']

    Parameters
    ----------
    model
        The model name the server knows (``"gpt-4o-mini"``, a vLLM server's model path...).
    base_url
        The API's address (default ``OPENAI_BASE_URL`` or ``https://api.openai.com/v1``). Not
        part of the key: the same model behind another address shares its cache; pass
        ``name=`` to keep them apart.
    api_key
        Default ``OPENAI_API_KEY``; a server at another ``base_url`` may need none. Never stored.
    system_prompt
        Put first in every conversation without a system message.
    mode
        ``"chat"`` (``/chat/completions``) or ``"completion"`` (``/completions``, plain text).
    concurrency
        Requests in flight at once (default 16).
    timeout
        Seconds one request may take before it is retried (default 600; checked a twentieth
        of it, at most a second, apart).
    max_retries
        Retries of one request (429, 5xx, timeouts, dropped connections) before giving up.
    name
        The database's name instead of ``openai-<model>`` (splits caches).
    prices
        ``{"input": ..., "output": ...}`` in dollars per million tokens: the status then says
        how much money the cache saved.
    output_folder
        Where ``.cache/`` lives (default: the current output folder).
    headers
        Further HTTP headers (an organisation, a project); not part of the key.
    """

    kind = "openai"

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 system_prompt: str | None = None, mode: str = "chat", concurrency: int = 16,
                 timeout: float = 600.0, max_retries: int = 6, name: str | None = None,
                 prices: dict | None = None, output_folder: Any = None,
                 headers: dict | None = None) -> None:
        if not isinstance(model, str) or not model:
            raise DreamerError(f"OpenAILLM needs a model name, e.g. OpenAILLM('gpt-4o-mini'); got {model!r}")
        super().__init__(model, mode=mode, system_prompt=system_prompt, concurrency=concurrency,
                         name=name, prices=prices, output_folder=output_folder)
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self._api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not self._api_key and self.base_url == DEFAULT_BASE_URL:
            raise DreamerError(
                "OpenAILLM needs an api key for api.openai.com: set OPENAI_API_KEY or pass api_key="
            )
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self._headers = dict(headers or {})

    def __repr__(self) -> str:
        return f"OpenAILLM({self.model!r}, base_url={self.base_url!r})"

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        try:
            import aiohttp
        except ImportError:
            raise missing_extra("OpenAILLM", "aiohttp", "openai") from None
        headers = {"content-type": "application/json", **self._headers}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        path = "/chat/completions" if self.mode == "chat" else "/completions"
        url = self.base_url + path
        # HTTP(S)_PROXY, NO_PROXY and .netrc are honoured as most HTTP clients do, looked up
        # once a call: aiohttp's trust_env looks both up again in a worker thread for every
        # request, which cost three quarters of the client's time against a fast server
        env = _from_environment(url, headers)  # reads .netrc: a small file
        via: dict[str, Any] = {}  # the proxy, when there is one
        if env is not None and env[0] is not None:
            via["proxy"] = env[0]
            if env[1] is not None:
                via["proxy_headers"] = {"proxy-authorization": env[1].encode()}
        client = await _client(self, aiohttp, headers, env is None, via)
        async with _Deadlines(self.timeout) as deadlines:

            async def send(job: Job) -> list[str]:
                content = job.request_json().encode()
                retry_after = None
                try:
                    with deadlines.request():
                        async with client.post(url, data=content, **via) as response:
                            status = response.status
                            raw = await response.read()
                            if status in RETRY_STATUS:
                                retry_after = _retry_after(response.headers)
                except asyncio.TimeoutError:
                    raise RetryableError(f"no answer within {self.timeout:g} s") from None
                except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as e:
                    raise RetryableError(f"connection problem ({type(e).__name__}: {e})") from None
                if status in RETRY_STATUS:
                    raise RetryableError(f"{status} {_error_message(raw)}", retry_after)
                if status >= 400:
                    hint = _HINTS.get(status, "")
                    raise BackendError(
                        f"{url} answered {status}: {_error_message(raw)}" + (f" ({hint})" if hint else "")
                    )
                try:
                    data = json.loads(raw)
                except ValueError:
                    raise RetryableError(f"the answer is not JSON: {raw[:100]!r}") from None
                return self._rows(data)

            async def call(batch: list[Job]) -> list[list[str]]:
                return [
                    await retrying(lambda: send(job), max_retries=self.max_retries, log=self.retries,
                                   what=f"{self.model} at {url}")
                    for job in batch
                ]

            yield call

    def _rows(self, data: Any) -> list[str]:
        return openai_rows(data, self.mode == "chat")
