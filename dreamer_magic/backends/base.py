"""What every generation backend shares: the ``generate`` surface, cache keys, the concurrent runner.

Examples
--------
>>> llm = OpenAILLM("gpt-4o-mini")  # any Backend subclass  # doctest: +SKIP
>>> llm.generate(["Hi!"], max_new_tokens=16, temperature=0.7, n=2, seed=1)  # doctest: +SKIP
[['Hello!', 'Hi there!']]

Cache keys
    One row per (prompt, sample index), for the request::

        {"backend": <kind, or the engine's identity>, "messages": [... the full list sent ...],
         "params": {<every request field sent but the messages and n: model, max_tokens,
                    temperature, top_p, stop, seed, extra fields ...>}, "sample": <index>}

    (``"prompt"`` instead of ``"messages"`` in completion mode), stored as canonical JSON
    (:func:`dreamer_magic.cache.canonical_json`) in the ``request`` column. The key is the
    xxh3-128 digest of that JSON with the last user message's text (or the prompt) written raw
    between two NUL characters instead of as a JSON string: ``...{"content":\0<text>\0,"role":
    "user"}]...``. JSON holds no raw NUL, so the text is still delimited without ambiguity, and
    a 2,000-character prompt is hashed in about a microsecond instead of being JSON-escaped in
    about fifteen. (A conversation that does not end in a plain user message is keyed by its
    canonical JSON as it is.) Never in the key: the api key, timeouts, retries,
    ``concurrency``, batch sizes, and by default ``base_url`` (the same model behind another
    address shares its cache; pass ``name=`` to keep two apart). ``n`` is not in the key, the
    sample index is: asking for ``n=3`` after ``n=2`` computes one sample. Each backend kind
    has its own database (``.cache/<kind>-<model>-<digest>.sqlite``), so two backends never
    share answers, even for the same weights.

Stored rows
    ``response`` holds the text as a JSON string; ``meta`` a JSON object with
    ``finish_reason``, ``model`` (as the server reported it), ``system_fingerprint``, ``usage``
    (the request's token usage, as reported), ``choices`` (how many samples that request
    returned) and ``tool_calls`` when the model called tools; ``prompt_tokens`` and
    ``completion_tokens`` this answer's share of the usage (what a hit saves).

Samples and seeds
    The missing samples of one prompt go out as one request with ``n`` set to their number.
    A server that returns fewer choices (many ignore ``n``) is asked again for the rest. The
    request for samples from index ``s`` on carries ``seed + s`` (``s = 0``: the seed as given),
    so that a server honouring seeds returns different samples, and the same ones again.

Running the misses
    Requests run concurrently (``concurrency=`` per backend) on one event loop per process, in
    a helper thread (:func:`shared_loop`: a backend's connections stay open between calls);
    the calling thread commits every finished response as it arrives (many in one transaction
    when they arrive together, at most ``COMMIT_EVERY_S`` later), so an interrupt loses only
    the requests in flight.
    429s, 5xx answers, timeouts and dropped connections are retried with exponential backoff
    and jitter, waiting what ``Retry-After`` asks for when the server sends it; other 4xx
    answers raise :class:`BackendError` at once, after committing what had finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from .. import cache as _cache
from ..cache import canonical_json, json_str, jsonable
from ..errors import CacheMissError, DreamerError

__all__ = ["Backend", "BackendError", "Job", "Retry", "RetryableError", "answer", "missing_extra", "openai_rows"]

COMMIT_EVERY_S = 0.02  # finished answers wait at most this long for their commit
# made once: json.dumps(..., separators=...) builds a new encoder for every answer
_META_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))

# request fields that generate() sets itself
_RESERVED = {
    "model": "the model is given to the constructor",
    "messages": "pass prompts or message lists as the first argument",
    "prompt": "pass prompts as the first argument",
    "n": "use n=",
    "stream": "streaming is not supported by the generation cache",
    "max_tokens": "use max_new_tokens=",
}


class BackendError(DreamerError):
    """A request the server refused and that retrying cannot fix (a 4xx answer), or retries ran out."""


class RetryableError(Exception):
    """Raised by a backend's call for what a retry may fix (429, 5xx, timeouts, dropped connections)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


@dataclass
class Retry:
    """One retry the runner made: why, and how long it waited (seconds) before trying again."""

    reason: str
    wait: float
    retry_after: float | None = None


def missing_extra(what: str, module: str, extra: str) -> DreamerError:
    """The one clear error for an optional extra that is not installed."""
    return DreamerError(
        f"{what} needs the {module!r} package, which is not installed: "
        f"pip install 'dreamer_magic[{extra}]'"
    )


@dataclass
class Job:
    """The missing samples of one prompt: one request (``n = len(keys)``), re-queued if short."""

    body: dict  # the request fields (messages or prompt included), without n
    keys: list[str]
    samples: list[int]
    attempts: int = 0
    # ``body``'s JSON is ``around[0] + <text as a JSON string> + around[1]``: the parts every
    # prompt of a call shares (parameters, tools, the system prompt) are encoded once
    around: tuple[str, str] | None = None
    text: str = ""

    def request_body(self) -> dict:
        """The body to send: ``n`` for several samples, the seed moved on by the first sample index."""
        body = dict(self.body)
        if len(self.keys) > 1:
            body["n"] = len(self.keys)
        if self.samples[0] and body.get("seed") is not None:
            body["seed"] = body["seed"] + self.samples[0]
        return body

    def request_json(self) -> str:
        """:meth:`request_body` as JSON text; only the prompt's text is encoded when the call shares the rest."""
        if self.around is not None and len(self.keys) == 1 and not self.samples[0]:
            return f"{self.around[0]}{json_str(self.text)}{self.around[1]}"
        return json.dumps(self.request_body(), ensure_ascii=False, separators=(",", ":"))

    def rest(self, done: int) -> "Job":
        return Job(self.body, self.keys[done:], self.samples[done:], self.attempts + 1, self.around, self.text)


def answer(text: Any, finish_reason: Any, model: Any, system_fingerprint: Any, usage: Any,
           choices: int, tool_calls: Any = None) -> tuple[str, str, float, float]:
    """One stored answer: ``(response JSON, meta JSON, prompt tokens, completion tokens)``.

    The response is the text as a JSON string; ``meta`` keeps the rest (see the module
    docstring); the token columns are this answer's share of the request's usage.
    """
    meta: dict[str, Any] = {
        "finish_reason": finish_reason,
        "model": model,
        "system_fingerprint": system_fingerprint,
        "usage": jsonable(usage, "the usage") if usage is not None else None,
        "choices": choices,
    }
    if tool_calls:
        meta["tool_calls"] = jsonable(tool_calls, "the tool calls")
    text = text if isinstance(text, str) else ("" if text is None else str(text))
    share = max(1, choices)
    usage = usage if isinstance(usage, dict) else {}
    prompt = float(usage.get("prompt_tokens") or 0) / share
    completion = float(usage.get("completion_tokens") or 0) / share
    return json_str(text), _META_JSON.encode(meta), prompt, completion


def openai_rows(data: Any, chat: bool) -> list[tuple]:
    """The stored answers (:func:`answer`) of an OpenAI-style response, one per choice in index order."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list):
        raise RetryableError(f"the answer has no choices: {str(data)[:200]!r}")
    choices = sorted(choices, key=lambda c: c.get("index") or 0)
    model, fp, usage = data.get("model"), data.get("system_fingerprint"), data.get("usage")
    if isinstance(usage, dict):
        usage = {k: v for k, v in usage.items() if v is not None}
    rows = []
    for c in choices:
        if chat:
            message = c.get("message") or {}
            text, tools = message.get("content"), message.get("tool_calls")
        else:
            text, tools = c.get("text"), None
        rows.append(answer(text, c.get("finish_reason"), model, fp, usage, len(choices), tools))
    return rows


async def retrying(send: Callable[[], Awaitable[Any]], *, max_retries: int, log: list[Retry],
                   what: str, max_wait: float = 300.0) -> Any:
    """Await ``send()``, retrying on :class:`RetryableError` with backoff or the server's ``Retry-After``."""
    for attempt in range(max_retries + 1):
        try:
            return await send()
        except RetryableError as e:
            if attempt >= max_retries:
                raise BackendError(
                    f"{what}: {e.reason}, still after {max_retries} retries; the finished answers "
                    "are stored, run again to continue (or raise max_retries=)"
                ) from None
            if e.retry_after is not None:
                wait = min(max(e.retry_after, 0.0), max_wait)
            else:
                wait = min(0.5 * 2**attempt, 30.0) * (0.5 + random.random() / 2)
            log.append(Retry(e.reason, wait, e.retry_after))
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


def _check_params(max_new_tokens, temperature, top_p, stop, n, seed) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DreamerError(f"n must be a positive integer, not {n!r}")
    if max_new_tokens is not None and (
        not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1
    ):
        raise DreamerError(f"max_new_tokens must be a positive integer or None, not {max_new_tokens!r}")
    for label, value, low in (("temperature", temperature, 0.0), ("top_p", top_p, 0.0)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < low):
            raise DreamerError(f"{label} must be a number >= {low:g} or None, not {value!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise DreamerError(f"top_p must be in (0, 1], not {top_p!r}")
    if stop is not None and not isinstance(stop, str) and not (
        isinstance(stop, (list, tuple)) and all(isinstance(s, str) for s in stop)
    ):
        raise DreamerError(f"stop must be a string, a list of strings or None, not {stop!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise DreamerError(f"seed must be an integer or None, not {seed!r}")


class Backend:
    """The ``generate`` surface over a model behind an API or an engine; subclasses make the calls.

    Examples
    --------
    >>> llm.generate("Hi!", max_new_tokens=8)  # one prompt, one answer  # doctest: +SKIP
    'Hello!'
    >>> llm.generate([[{"role": "user", "content": "Hi!"}]], n=2, temperature=1.0)  # doctest: +SKIP
    [['Hello!', 'Hey!']]

    Subclasses set :attr:`kind` and implement :meth:`_session`; see :mod:`.openai`.
    """

    kind = "backend"
    max_batch = 1  # requests handed to one call (an offline engine takes many)
    max_retries = 6

    def __init__(self, model: str, *, mode: str = "chat", system_prompt: str | None = None,
                 concurrency: int = 16, name: str | None = None, prices: dict | None = None,
                 output_folder: Any = None) -> None:
        if mode not in ("chat", "completion"):
            raise DreamerError(f"mode must be 'chat' or 'completion', not {mode!r}")
        if not isinstance(concurrency, int) or concurrency < 1:
            raise DreamerError(f"concurrency must be a positive integer, not {concurrency!r}")
        if system_prompt is not None and mode == "completion":
            raise DreamerError("system_prompt needs mode='chat'; in completion mode put it in the prompt")
        self.model = model
        self.mode = mode
        self.system_prompt = system_prompt
        self.concurrency = concurrency
        self.name = name
        self.prices = _check_prices(prices)
        self.output_folder = output_folder
        self.retries: list[Retry] = []  # every retry made, for a look after a slow call
        self.requests_sent = 0  # requests that got an answer

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model!r})"

    # -- identity: what the key and the database name are made of --------------------------------
    def _backend_key(self) -> Any:
        """The ``"backend"`` field of every key (a JSON value): the kind, or an engine's identity."""
        return self.kind

    def _model_params(self) -> dict:
        """Request fields that name the model (sent, so in the key)."""
        return {"model": self.model}

    def __dreamer_fingerprint__(self) -> str:
        """A step that reads a backend is keyed by what it computes (not by its api key)."""
        return _cache.request_key(
            canonical_json([self._backend_key(), self._model_params(), self.mode, self.system_prompt, self.name])
        )

    @property
    def database(self) -> _cache.Database:
        """``<output folder>/.cache/<name or kind-model>-<digest>.sqlite``."""
        stem = self.name or f"{self.kind}-{str(self.model).rsplit('/', 1)[-1]}"
        digest = _cache.request_key(canonical_json([self._backend_key(), self._model_params(), self.name]))
        return _cache.open_database(
            _cache.database_name(stem, digest), _cache.cache_folder(self.output_folder)
        )

    # -- generate --------------------------------------------------------------------------------
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[dict] | Sequence[Sequence[dict]],
        *,
        system_prompt: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: str | Sequence[str] | None = None,
        n: int = 1,
        seed: int | None = None,
        force: bool = False,
        cache_only: bool = False,
        progress: bool = True,
        **extra: Any,
    ) -> Any:
        """One answer per prompt (a list of ``n`` when ``n > 1``), in order, from the cache when it can.

        Examples
        --------
        >>> llm.generate(["2+2?", "3+3?"], max_new_tokens=4, temperature=0)  # doctest: +SKIP
        ['4', '6']

        Parameters
        ----------
        prompts
            A prompt, a list of prompts, a conversation (a list of ``{"role", "content"}``
            dicts) or a list of conversations. One prompt or conversation gives one answer.
            Duplicates are requested once.
        system_prompt
            Put first in every conversation that has no system message (default: the one given
            to the constructor). Chat mode only.
        max_new_tokens, temperature, top_p, stop, seed
            Sent as ``max_tokens``, ``temperature``, ... when given (``None``: not sent, the
            server's default applies); each one sent is part of the key.
        n
            Samples per prompt, each stored under its own index.
        force, cache_only
            Request every answer again and overwrite; or never call the model and raise
            :class:`~dreamer_magic.errors.CacheMissError` saying how many are missing.
        progress
            A progress bar with an ETA while requests run.
        **extra
            Further request fields (``frequency_penalty``, ``logit_bias``, ``response_format``,
            ``tools``...), sent as given and part of the key; they must be JSON values.
        """
        _check_params(max_new_tokens, temperature, top_p, stop, n, seed)
        items, single = self._items(prompts)
        params = self._params(max_new_tokens, temperature, top_p, stop, seed, extra)
        system = self.system_prompt if system_prompt is None else system_prompt
        if system is not None and self.mode == "completion":
            raise DreamerError("system_prompt needs mode='chat'; in completion mode put it in the prompt")
        if not items:
            return []
        backend = canonical_json(self._backend_key(), "the backend")
        params_json = canonical_json(params, "the request")
        tails = [f',"params":{params_json},"sample":{s}}}' for s in range(n)]
        if self.mode == "completion":
            if not set(map(type, items)) <= {str} and not all(isinstance(p, str) for p in items):
                raise DreamerError("mode='completion' takes prompts as strings, not message lists")
            # "params" sorts before "prompt": {"backend":..,"params":{..},"prompt":"..","sample":s}
            head = f'{{"backend":{backend},"params":{params_json},"prompt":'
            tails = [f',"sample":{s}}}' for s in range(n)]
            texts = items
            bodies_of = lambda i: {**params, "prompt": items[i]}  # noqa: E731
            around = (params_json[:-1] + ("," if params else "") + '"prompt":', "}")
            per_sample = [_keys(head, items, t) for t in tails]
            request_of = lambda i, s: f"{head}{json_str(items[i])}{tails[s]}"  # noqa: E731
        else:
            sys_msgs = [] if system is None else [{"content": system, "role": "system"}]
            if set(map(type, items)) <= {str}:
                conversations = None
                heads = [canonical_json(sys_msgs)[:-1] + ("," if sys_msgs else "")] * len(items)
                texts = items
            else:
                conversations = [self._conversation(p, sys_msgs, i) for i, p in enumerate(items)]
                heads, texts = zip(*map(_split_last_user, conversations))
            bodies_of = (  # noqa: E731
                (lambda i: {**params, "messages": [*sys_msgs, {"content": items[i], "role": "user"}]})
                if conversations is None else (lambda i: {**params, "messages": conversations[i]})
            )
            start = f'{{"backend":{backend},"messages":'
            around = None
            if conversations is None:  # the hot path: one head for every prompt
                head = start + heads[0] + '{"content":'
                around = (params_json[:-1] + ("," if params else "") + '"messages":' + heads[0]
                          + '{"content":', ',"role":"user"}]}')
                mid = ',"role":"user"}]'
                per_sample = [_keys(head, items, mid + t) for t in tails]
                request_of = lambda i, s: f"{head}{json_str(items[i])}{mid}{tails[s]}"  # noqa: E731
            else:
                per_sample = [
                    [_conversation_key(start, h, x, t) for h, x in zip(heads, texts)] for t in tails
                ]
                request_of = lambda i, s: (  # noqa: E731
                    f"{start}{canonical_json(conversations[i])}{tails[s]}"
                )
        unique = list(dict.fromkeys(per_sample[0])) if n == 1 else list(
            dict.fromkeys(k for ks in zip(*per_sample) for k in ks)
        )
        database = self.database
        if force:
            found, prompt_tokens, completion_tokens = {}, 0.0, 0.0
        else:
            found, prompt_tokens, completion_tokens = database.get_answers(unique)
        hits = len(found)
        saved = None
        if self.prices:
            saved = (prompt_tokens * self.prices["input"] + completion_tokens * self.prices["output"]) / 1e6
        _cache.record(database, hits, len(unique) - hits, tokens=round(prompt_tokens + completion_tokens),
                      saved=saved)
        if hits < len(unique):
            missing = {k for k in unique if k not in found}
            if cache_only:
                raise CacheMissError(
                    f"{len(missing)} of {len(unique)} {'prompts' if n == 1 else 'prompt samples'} are "
                    f"not in the generation cache {database.name!r} (cache_only=True); run again "
                    "without cache_only=True to request them"
                )
            jobs, requests_json = [], {}
            first_of = dict(zip(per_sample[0], range(len(items))))
            for i in sorted(set(first_of.values())):
                fresh = [(per_sample[s][i], s) for s in range(n)
                         if per_sample[s][i] in missing and per_sample[s][i] not in requests_json]
                if not fresh:
                    continue
                for k, s in fresh:
                    requests_json[k] = request_of(i, s)
                jobs.append(Job(bodies_of(i), [k for k, _ in fresh], [s for _, s in fresh], 0, around,
                                texts[i] if around else ""))
            found.update(self._run_jobs(jobs, database, requests_json, progress))
        if n == 1:
            answers: list = list(map(found.__getitem__, per_sample[0]))
        else:
            answers = [[found[k] for k in ks] for ks in zip(*per_sample)]
        return answers[0] if single else answers

    # -- pieces of generate ---------------------------------------------------------------------------
    def _items(self, prompts: Any) -> tuple[list, bool]:
        if isinstance(prompts, str):
            return [prompts], True
        try:
            items = list(prompts)
        except TypeError:
            raise DreamerError(
                f"prompts must be a string, a list of strings or of message lists, not {type(prompts).__name__}"
            ) from None
        if items and isinstance(items[0], dict):  # one conversation
            return [items], True
        if set(map(type, items)) <= {str}:  # the common case, checked in C
            return items, False
        for i, item in enumerate(items):
            if not isinstance(item, (str, list, tuple)):
                raise DreamerError(
                    f"prompts[{i}] is a {type(item).__name__}; pass strings or message lists "
                    '([{"role": "user", "content": "..."}])'
                )
        return items, False

    def _conversation(self, item: Any, sys_msgs: list, i: int) -> list:
        if isinstance(item, str):
            messages = [{"content": item, "role": "user"}]
        else:
            messages = jsonable(list(item), f"prompts[{i}]")
            for j, m in enumerate(messages):
                if not isinstance(m, dict) or "role" not in m:
                    raise DreamerError(f"prompts[{i}][{j}] must be a dict with a 'role' and a 'content'")
        if sys_msgs and not (messages and messages[0].get("role") == "system"):
            messages = [*sys_msgs, *messages]
        return messages

    def _params(self, max_new_tokens, temperature, top_p, stop, seed, extra) -> dict:
        for k in extra:
            if k in _RESERVED:
                raise DreamerError(f"generate() does not take {k}=: {_RESERVED[k]}")
        params = dict(self._model_params())
        for k, v in (("max_tokens", max_new_tokens), ("temperature", temperature), ("top_p", top_p),
                     ("stop", stop), ("seed", seed)):
            if v is not None:
                params[k] = float(v) if k in ("temperature", "top_p") else v
        for k, v in extra.items():
            params[k] = jsonable(v, f"the request field {k!r}")
        return jsonable(params, "the request")

    # -- running the misses -------------------------------------------------------------------------
    def _members(self) -> list["Backend"]:
        return [self]

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Callable[[list[Job]], Awaitable[list[list[str]]]]]:
        """Yields ``call(jobs) -> [stored rows (JSON text) per job]`` (subclasses: one client each)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def _run_jobs(self, jobs: list[Job], database: _cache.Database, requests_json: dict,
                  progress: bool) -> dict[str, Any]:
        total = sum(len(j.keys) for j in jobs)
        runner = _Runner(self._members(), jobs)
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=database.name, unit="answer", disable=not progress, leave=True)
        found: dict[str, Any] = {}

        def commit(items: list) -> BaseException | None:
            rows, error = [], None
            for item in items:
                if item[0] == "error":
                    error = error or item[1]
                else:
                    rows.extend(zip(item[1], item[2]))
            if rows:
                database.put_answers((k, requests_json[k], *a) for k, a in rows)
                found.update(zip((k for k, _ in rows), _cache.decode_json_many(a[0] for _, a in rows)))
                bar.update(len(rows))
            return error

        runner.start()
        taken: list = []  # answers taken from the runner, not committed yet (an interrupt commits them)
        try:
            while len(found) < total:
                try:
                    taken.append(runner.results.get(timeout=0.2))
                except queue.Empty:
                    if runner.alive():
                        continue
                    taken += runner.drain()
                    error, taken = commit(taken), []
                    if error is not None:
                        raise error
                    if len(found) < total:
                        raise BackendError("the request runner stopped before every answer came back")
                    continue
                # let answers that arrive together share one transaction (and one wake-up of
                # this thread): at most COMMIT_EVERY_S seconds after the first of them, unless
                # they are the last ones (a call of one prompt commits at once)
                if len(found) + sum(len(i[1]) for i in taken if i[0] == "rows") < total:
                    time.sleep(COMMIT_EVERY_S)
                taken += runner.drain()
                error, taken = commit(taken), []
                if error is not None:
                    raise error
        finally:
            runner.stop()
            commit([i for i in taken + runner.drain() if i[0] != "error"])
            bar.close()
        return found


_LOOP: tuple[int, asyncio.AbstractEventLoop, threading.Thread] | None = None
_LOOP_LOCK = threading.Lock()


def shared_loop() -> asyncio.AbstractEventLoop:
    """This process's event loop for backend requests, running in a daemon thread.

    One for every call and every backend, so that a backend can keep its connections open
    from one ``generate`` call to the next (a loop per call closed them every time). Started
    on first use, and again in a forked child (the parent's thread does not exist there).
    """
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None or _LOOP[0] != os.getpid() or not _LOOP[2].is_alive():
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="dreamer-backend", daemon=True)
            thread.start()
            _LOOP = (os.getpid(), loop, thread)
        return _LOOP[1]


def _after_fork_in_child() -> None:
    global _LOOP_LOCK
    _LOOP_LOCK = threading.Lock()  # it may have been held by another thread at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Runner:
    """One call's jobs, run on every member backend's workers on the :func:`shared_loop`."""

    def __init__(self, members: list[Backend], jobs: list[Job]) -> None:
        self.members = members
        self.jobs = jobs
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # C: cheaper than queue.Queue per answer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self._done = threading.Event()

    def start(self) -> None:
        self._loop = shared_loop()
        if asyncio._get_running_loop() is self._loop:  # it would wait on itself forever
            raise DreamerError("generate() cannot be called from the backends' own event loop thread")
        started = threading.Event()

        def begin() -> None:
            self._task = self._loop.create_task(self._run())
            started.set()

        self._loop.call_soon_threadsafe(begin)
        started.wait()

    def alive(self) -> bool:
        return self._task is not None and not self._done.is_set()

    def drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        """Cancel what is still running and wait until it has stopped."""
        if self._loop is not None and self._task is not None and not self._done.is_set():
            try:
                self._loop.call_soon_threadsafe(self._task.cancel)
            except RuntimeError:  # the loop is closed (the interpreter is exiting)
                return
            self._done.wait()

    async def _run(self) -> None:
        try:
            await self._main()
        except asyncio.CancelledError:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the calling thread
            self.results.put(("error", e))
        finally:
            self._done.set()

    async def _main(self) -> None:
        pending = asyncio.Queue()
        for job in self.jobs:
            pending.put_nowait(job)
        self.outstanding = len(self.jobs)
        finished = asyncio.Event()
        if not self.jobs:
            return
        async with contextlib.AsyncExitStack() as stack:
            workers = []
            for member in self.members:
                call = await stack.enter_async_context(member._session())
                for _ in range(min(member.concurrency, len(self.jobs))):  # no idle workers
                    workers.append(asyncio.ensure_future(self._worker(member, call, pending, finished)))
            try:
                await finished.wait()
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    async def _worker(self, member: Backend, call, pending: asyncio.Queue, finished: asyncio.Event) -> None:
        while True:
            batch = [await pending.get()]
            while len(batch) < member.max_batch and not pending.empty():
                batch.append(pending.get_nowait())
            try:
                outs = await call(batch)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - handed to the calling thread
                self.results.put(("error", e))
                finished.set()
                return
            member.requests_sent += len(batch)
            for job, rows in zip(batch, outs):
                rows = list(rows)[: len(job.keys)]
                if rows:
                    self.results.put(("rows", job.keys[: len(rows)], rows))
                if len(rows) < len(job.keys):
                    if not rows and job.attempts >= 3:
                        self.results.put(("error", BackendError(
                            f"{member!r} returned no answer for a request three times in a row"
                        )))
                        finished.set()
                        return
                    pending.put_nowait(job.rest(len(rows)))
                else:
                    self.outstanding -= 1
            if self.outstanding <= 0:
                finished.set()


def _keys(head: str, items: list[str], tail: str) -> list[str]:
    """Keys of ``head + NUL + item + NUL + tail`` for each item (the hot loop: no JSON escaping)."""
    h = _cache._hash
    try:
        return [h(f"{head}\0{p}\0{tail}".encode()) for p in items]
    except UnicodeEncodeError:
        error = _cache.invalid_text(items, "prompts")
        if error is None:
            raise
        raise error from None


def _split_last_user(messages: list) -> tuple[str | None, Any]:
    """``(JSON of the messages before a plain last user message + '{"content":', its text)``.

    ``(None, canonical JSON of all)`` when the last message is anything else.
    """
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.keys() == {"content", "role"} and last["role"] == "user" \
            and isinstance(last["content"], str):
        before = canonical_json(messages[:-1])[:-1] + ("," if len(messages) > 1 else "")
        return before, last["content"]
    return None, canonical_json(messages)


def _conversation_key(start: str, head: str | None, text: str, tail: str) -> str:
    if head is None:  # JSON holds no raw NUL, so this never equals a key of the form below
        return _cache._hash(f"{start}{text}{tail}".encode())
    return _cache._hash(f'{start}{head}{{"content":\0{text}\0,"role":"user"}}]{tail}'.encode())


def _check_prices(prices: Any) -> dict | None:
    if prices is None:
        return None
    if not isinstance(prices, dict) or set(prices) - {"input", "output"} or not prices:
        raise DreamerError(
            'prices= takes {"input": ..., "output": ...}, US dollars per million tokens; '
            f"got {prices!r}"
        )
    out = {}
    for k in ("input", "output"):
        v = prices.get(k, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise DreamerError(f"prices[{k!r}] must be a number >= 0 (dollars per million tokens), not {v!r}")
        out[k] = float(v)
    return out
