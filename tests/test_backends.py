"""OpenAILLM and ParallelLLM against a real OpenAI-compatible server on 127.0.0.1 (tests/_openai_server.py).

The server decodes with the tiny local GPT-2 of ``_tiny.py`` (real generations) and counts the
completion requests it receives, so "a re-run makes no request" is what the server saw.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from _openai_server import FINGERPRINT, start_server  # noqa: E402

from dreamer_magic import cache  # noqa: E402
from dreamer_magic.errors import CacheMissError, DreamerError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from _tiny import save_tiny_gpt2

    return save_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny-gpt2")


@pytest.fixture(scope="module")
def servers(model_path):
    started = {}

    def get(name: str = "main", **options):
        if name not in started:
            started[name] = start_server(str(model_path), **options)
        server = started[name]
        server.reset()
        return server

    yield get
    for server in started.values():
        server.close()


@pytest.fixture
def server(servers):
    return servers()


def make(server, **kw):
    from dreamer_magic import OpenAILLM

    kw.setdefault("concurrency", 4)
    return OpenAILLM(kw.pop("model", "tiny-gpt2"), base_url=server.base_url, **kw)


def local_greedy(model_path, prompt: str, max_new_tokens: int) -> str:
    """What the tiny GPT-2 itself decodes greedily for a prompt (no server, no cache)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_path))
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


# -- answers, order, re-runs ----------------------------------------------------------------------
def test_completion_answers_are_the_models_own_and_a_rerun_makes_no_request(server, output, model_path):
    llm = make(server, mode="completion")
    prompts = ["hello world", "the quick brown", "hello world", "a story about"]
    answers = llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False)
    assert answers == [local_greedy(model_path, p, 6) for p in prompts]
    assert server.requests == 3, "a duplicate prompt is requested once"
    assert sorted(b["prompt"] for b in server.bodies) == ["a story about", "hello world", "the quick brown"]

    assert llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False) == answers
    again = make(server, mode="completion", concurrency=1, timeout=30, max_retries=1, api_key="other")
    assert again.generate(prompts, max_new_tokens=6, temperature=0, progress=False) == answers
    assert server.requests == 3, "re-runs (new client, other concurrency/timeout/retries/key) hit"
    assert llm.generate("hello world", max_new_tokens=6, temperature=0) == answers[0]


def test_chat_sends_the_full_message_list_and_keeps_the_order(server, output):
    llm = make(server, system_prompt="You are terse.")
    out = llm.generate(["hi", "bye"], max_new_tokens=4, temperature=0, progress=False)
    assert len(out) == 2 and all(isinstance(a, str) for a in out)
    sent = sorted((b["messages"] for b in server.bodies), key=lambda m: m[-1]["content"])
    assert sent[0] == [{"content": "You are terse.", "role": "system"}, {"content": "bye", "role": "user"}]
    assert all(b["model"] == "tiny-gpt2" and b["max_tokens"] == 4 and b["temperature"] == 0 for b in server.bodies)

    # a conversation as messages is the same request as the string with the system prompt
    conversation = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hi"}]
    before = server.requests
    assert llm.generate(conversation, max_new_tokens=4, temperature=0) == out[0]
    assert server.requests == before
    # another system prompt is another conversation
    llm.generate(["hi"], system_prompt="Be verbose.", max_new_tokens=4, temperature=0, progress=False)
    assert server.requests == before + 1
    assert server.bodies[-1]["messages"][0] == {"content": "Be verbose.", "role": "system"}


def test_every_parameter_sent_is_in_the_key(server, output):
    llm = make(server)
    base = dict(max_new_tokens=4, temperature=0.0)
    llm.generate(["x"], **base, progress=False)
    assert server.requests == 1
    variants = [
        dict(max_new_tokens=5, temperature=0.0),
        dict(max_new_tokens=4, temperature=0.5),
        dict(**base, top_p=0.9),
        dict(**base, stop=["\n"]),
        dict(**base, seed=3),
        dict(**base, frequency_penalty=0.5),
        dict(**base, logit_bias={"50": -100}),
        dict(**base, response_format={"type": "json_object"}),
        dict(**base, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        dict(**base, user_field={"a": [1, 2]}),
    ]
    for i, kw in enumerate(variants, start=2):
        llm.generate(["x"], **kw, progress=False)
        assert server.requests == i, f"{kw} must miss"
        sent = server.bodies[-1]
        for k, v in kw.items():
            name = {"max_new_tokens": "max_tokens"}.get(k, k)
            assert sent[name] == v, "every field is sent as given"
    for kw in variants:  # and each is a hit now
        llm.generate(["x"], **kw, progress=False)
    assert server.requests == len(variants) + 1


def test_reserved_fields_and_bad_values_are_clear_errors(server, output):
    llm = make(server)
    with pytest.raises(DreamerError, match="use max_new_tokens="):
        llm.generate(["x"], max_tokens=3)
    with pytest.raises(DreamerError, match="streaming"):
        llm.generate(["x"], stream=True)
    with pytest.raises(DreamerError, match="JSON"):
        llm.generate(["x"], logit_bias={1, 2})
    with pytest.raises(DreamerError, match="top_p"):
        llm.generate(["x"], top_p=2)
    with pytest.raises(DreamerError, match="completion"):
        make(server, mode="completion", system_prompt="no")
    assert server.requests == 0


def test_base_url_is_out_of_the_key_name_splits_and_kinds_never_share(servers, output):
    a, b = servers("main"), servers("second")
    first = make(a).generate(["same prompt"], max_new_tokens=3, temperature=0, progress=False)
    assert make(b).generate(["same prompt"], max_new_tokens=3, temperature=0, progress=False) == first
    assert (a.requests, b.requests) == (1, 0), "the same model at another address shares the cache"
    make(b, name="server b").generate(["same prompt"], max_new_tokens=3, temperature=0, progress=False)
    assert b.requests == 1, "name= splits caches"
    assert make(b, name="server b").database.name.startswith("server-b-")
    assert make(a).database.name.startswith("openai-tiny-gpt2-")
    assert make(a, mode="completion").database.path == make(a).database.path
    make(a, mode="completion").generate(["same prompt"], max_new_tokens=3, temperature=0, progress=False)
    assert a.requests == 2, "a completion is not a chat answer"
    assert make(a, model="other-model").database.path != make(a).database.path


# -- samples --------------------------------------------------------------------------------------
def test_n_samples_one_request_then_only_the_new_ones(server, output):
    llm = make(server)
    three = llm.generate(["tell"], max_new_tokens=6, temperature=1.0, n=3, seed=7, progress=False)
    assert len(three) == 1 and len(three[0]) == 3 and len(set(three[0])) == 3
    assert server.requests == 1 and server.bodies[0]["n"] == 3 and server.bodies[0]["seed"] == 7
    four = llm.generate(["tell"], max_new_tokens=6, temperature=1.0, n=4, seed=7, progress=False)
    assert four[0][:3] == three[0]
    assert server.requests == 2 and "n" not in server.bodies[1] and server.bodies[1]["seed"] == 7 + 3
    assert llm.generate("tell", max_new_tokens=6, temperature=1.0, n=2, seed=7) == three[0][:2]
    assert server.requests == 2


def test_a_server_that_ignores_n_still_yields_n_samples(servers, output):
    server = servers("ignores-n", ignore_n=True)
    llm = make(server, name="ignores n")
    samples = llm.generate(["tell"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False)
    assert len(samples[0]) == 3 and len(set(samples[0])) == 3, "three different samples"
    assert server.requests == 3
    assert [b.get("seed") for b in server.bodies] == [1, 2, 3]
    assert llm.generate(["tell"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False) == samples
    assert server.requests == 3


# -- faults ---------------------------------------------------------------------------------------
def test_429_is_retried_after_what_retry_after_says(server, output):
    llm = make(server, max_retries=3)
    server.inject("429", retry_after=0.3)
    server.inject("429", retry_after="0")
    answer = llm.generate("hello", max_new_tokens=3, temperature=0)
    assert isinstance(answer, str)
    assert server.requests == 3
    assert [(r.retry_after, r.wait) for r in llm.retries] == [(0.3, 0.3), (0.0, 0.0)]
    assert all(r.reason.startswith("429") for r in llm.retries)


def test_500_a_dropped_connection_and_a_slow_answer_are_retried(server, output):
    llm = make(server, timeout=0.5, max_retries=4, concurrency=1)
    server.inject("500", "drop", "slow", delay=3.0)
    answer = llm.generate("numbers", max_new_tokens=3, temperature=0, progress=False)
    assert isinstance(answer, str) and server.requests == 4
    reasons = [r.reason for r in llm.retries]
    assert reasons[0].startswith("500")
    assert "connection" in reasons[1]
    assert "no answer within 0.5 s" in reasons[2]
    assert make(server).generate("numbers", max_new_tokens=3, temperature=0) == answer
    assert server.requests == 4


def test_proxies_and_netrc_come_from_the_environment(server, output, monkeypatch, tmp_path):
    """Looked up once per call (not per request, as aiohttp's trust_env does), with the same rules."""
    import base64
    import socket

    from dreamer_magic import OpenAILLM

    for name in ("http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login ann password secret\n")
    monkeypatch.setenv("NETRC", str(netrc))
    make(server).generate("a", max_new_tokens=2, temperature=0, progress=False)
    assert server.headers[-1]["authorization"] == "Basic " + base64.b64encode(b"ann:secret").decode()
    make(server, api_key="sk-test").generate("b", max_new_tokens=2, temperature=0, progress=False)
    assert server.headers[-1]["authorization"] == "Bearer sk-test", "an api key wins over .netrc"

    with socket.socket() as s:  # an address nothing listens on: only the proxy can answer
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    OpenAILLM("tiny-gpt2", base_url=closed, concurrency=2).generate(
        ["c", "d"], max_new_tokens=2, temperature=0, progress=False)
    assert server.requests == 4, "both went through the proxy from HTTP_PROXY"
    assert server.headers[-1]["proxy-authorization"] == "Basic " + base64.b64encode(b"ann:secret").decode()
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(DreamerError, match="connection problem"):
        OpenAILLM("tiny-gpt2", base_url=closed, max_retries=0).generate("e", max_new_tokens=2, progress=False)
    assert server.requests == 4, "NO_PROXY: sent straight to the closed address"


def test_retries_run_out_with_a_clear_error(server, output):
    llm = make(server, max_retries=1)
    server.inject("500", "500")
    with pytest.raises(DreamerError, match="still after 1 retries"):
        llm.generate("x", max_new_tokens=3, temperature=0, progress=False)


def test_a_4xx_raises_at_once_and_keeps_the_finished_answers(server, output):
    llm = make(server, concurrency=1, max_retries=5)
    server.inject("ok", "ok", "400")
    prompts = ["p1", "p2", "p3", "p4", "p5"]
    with pytest.raises(DreamerError, match="answered 400: max_tokens is too large"):
        llm.generate(prompts, max_new_tokens=3, temperature=0, progress=False)
    assert server.requests == 3 and llm.retries == [], "a 400 is not retried"
    assert llm.database.count() == 2, "the answers that came back are committed"
    llm.generate(prompts, max_new_tokens=3, temperature=0, progress=False)
    assert server.requests == 3 + 3, "the re-run asks only for the three left"
    server.inject("401")
    with pytest.raises(DreamerError, match="401.*OPENAI_API_KEY"):
        llm.generate(["p6"], max_new_tokens=3, temperature=0, progress=False)


def test_an_interrupt_keeps_the_answers_that_came_back_and_is_not_a_timeout(server, output):
    import _thread
    import threading
    import time

    llm = make(server, concurrency=1, timeout=30)
    server.inject("ok", "slow", delay=4.0)

    def interrupt_once_the_slow_one_is_in_flight() -> None:
        deadline = time.monotonic() + 60
        while server.requests < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_the_slow_one_is_in_flight, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["i1", "i2", "i3"], max_new_tokens=3, temperature=0, progress=False)
    assert llm.retries == [], "the cancelled request is not retried as a timeout"
    assert llm.database.count() == 1, "the answer that came back is committed"
    llm.generate(["i1", "i2", "i3"], max_new_tokens=3, temperature=0, progress=False)
    assert server.requests == 2 + 2, "the re-run asks only for the two left"


class _CountingServer:
    """A minimal keep-alive server in a thread that answers every request at once and counts connections."""

    ANSWER = json.dumps({"model": "m", "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                                                     "finish_reason": "stop"}]}).encode()

    def __init__(self) -> None:
        import asyncio
        import threading

        self.connections = self.lost = 0
        self.transports: list = []
        ready = threading.Event()
        outer = self

        class Protocol(asyncio.Protocol):
            def connection_made(self, transport) -> None:
                outer.connections += 1
                outer.transports.append(transport)
                self.transport, self.buffer = transport, b""

            def connection_lost(self, exc) -> None:
                outer.lost += 1

            def data_received(self, data: bytes) -> None:
                self.buffer += data
                while b"\r\n\r\n" in self.buffer:
                    head, rest = self.buffer.split(b"\r\n\r\n", 1)
                    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                                      if line.startswith(b"content-length:")))
                    if len(rest) < length:
                        return
                    self.buffer = rest[length:]
                    self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                         b"content-length: %d\r\n\r\n%s" % (len(outer.ANSWER), outer.ANSWER))

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            server = self.loop.run_until_complete(self.loop.create_server(Protocol, "127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
            ready.set()
            self.loop.run_forever()
            for transport in self.transports:
                transport.close()
            server.close()
            self.loop.run_until_complete(server.wait_closed())
            self.loop.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        ready.wait(10)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_connections_stay_open_between_calls_and_a_forked_child_opens_its_own(output):
    import time

    from dreamer_magic import OpenAILLM

    counting = _CountingServer()
    try:
        llm = OpenAILLM("m", base_url=counting.url, output_folder=output)
        for i in range(5):
            assert llm.generate(f"call {i}", progress=False) == "ok"
        assert counting.connections == 1, "one connection for five one-prompt calls"
        llm.generate([f"batch {i}" for i in range(40)], progress=False)
        assert counting.connections <= llm.concurrency
        opened = counting.connections
        pid = os.fork()
        if pid == 0:  # the child: its own connections, never the parent's
            code = 1
            try:
                code = 0 if llm.generate("in the child", progress=False) == "ok" else 2
            finally:
                os._exit(code)
        deadline, done = time.monotonic() + 60, (0, 0)
        while done == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.02)
            done = os.waitpid(pid, os.WNOHANG)
        if done == (0, 0):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child's call worked"
        assert counting.connections == opened + 1
        assert llm.generate("parent again", progress=False) == "ok"
        assert counting.connections == opened + 1, "the parent still uses its own"
        other = OpenAILLM("m", base_url=counting.url, output_folder=output, concurrency=2)
        other.generate("another backend", progress=False)
        assert counting.connections == opened + 2, "another backend: another session"
        del llm, other  # their sessions close with them
        deadline = time.monotonic() + 10
        while counting.lost < counting.connections and time.monotonic() < deadline:
            time.sleep(0.01)
        assert counting.lost == counting.connections
    finally:
        counting.close()


def test_cache_only_names_how_many_are_missing(server, output):
    llm = make(server)
    llm.generate(["a"], max_new_tokens=3, temperature=0, progress=False)
    with pytest.raises(CacheMissError, match="2 of 3 prompts"):
        llm.generate(["a", "b", "c"], max_new_tokens=3, temperature=0, cache_only=True)
    assert server.requests == 1
    llm.generate(["a"], max_new_tokens=3, temperature=0, force=True, progress=False)
    assert server.requests == 2, "force asks again"


# -- what is stored -------------------------------------------------------------------------------------
def test_rows_keep_text_finish_reason_model_fingerprint_and_usage(server, output):
    llm = make(server, mode="completion")
    [answer] = llm.generate(["hello world"], max_new_tokens=4, temperature=0, progress=False)
    import sqlite_utils

    [row] = list(sqlite_utils.Database(llm.database.path)["cache"].rows)
    assert json.loads(row["response"]) == answer
    meta = json.loads(row["meta"])
    assert meta["finish_reason"] in ("length", "stop") and meta["choices"] == 1
    assert meta["model"] == "tiny-gpt2-2024-01-01" and meta["system_fingerprint"] == FINGERPRINT
    assert meta["usage"]["completion_tokens"] <= 4 and meta["usage"]["prompt_tokens"] > 0
    assert (row["prompt_tokens"], row["completion_tokens"]) == (
        meta["usage"]["prompt_tokens"], meta["usage"]["completion_tokens"])
    request = json.loads(row["request"])
    assert request == {"backend": "openai", "params": {"max_tokens": 4, "model": "tiny-gpt2", "temperature": 0.0},
                       "prompt": "hello world", "sample": 0}
    # the key: that JSON with the prompt's text raw between two NULs (see backends/base.py)
    raw = row["request"].replace('"prompt":"hello world"', '"prompt":\0hello world\0')
    assert row["key"] == cache.request_key(raw)
    assert "api_key" not in row["request"] and server.base_url not in row["request"]
    cli = Path(sys.executable).with_name("sqlite-utils")
    if cli.exists():  # the sqlite-utils CLI reads the database as it is
        out = subprocess.run([str(cli), "rows", str(llm.database.path), "cache"], capture_output=True,
                             text=True, check=True).stdout
        assert json.loads(out)[0]["key"] == row["key"]


def test_tokens_from_cache_and_money_saved(server, output):
    llm = make(server, prices={"input": 2.0, "output": 8.0})
    llm.generate(["a", "b"], max_new_tokens=4, temperature=0, progress=False)
    usage = [json.loads(r["meta"])["usage"] for r in
             __import__("sqlite_utils").Database(llm.database.path)["cache"].rows]
    before = cache.session_savings().get(str(llm.database.path), (0, None))
    llm.generate(["a", "b"], max_new_tokens=4, temperature=0, progress=False)
    tokens, money = cache.session_savings()[str(llm.database.path)]
    expected_tokens = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage)
    expected_money = sum(u["prompt_tokens"] * 2.0 + u["completion_tokens"] * 8.0 for u in usage) / 1e6
    assert tokens - before[0] == expected_tokens
    assert money - (before[1] or 0) == pytest.approx(expected_money)
    [entry] = [c for c in cache.list_databases(output) if c["path"] == str(llm.database.path)]
    assert entry["tokens_from_cache"] == tokens and entry["money_saved"] == pytest.approx(money)
    with pytest.raises(DreamerError, match="prices="):
        make(server, prices={"in": 1})


def test_progress_bar_while_requests_run(server, output, capsys):
    make(server).generate(["a", "b", "c"], max_new_tokens=3, temperature=0)
    err = capsys.readouterr().err
    assert "openai-tiny-gpt2" in err and "3/3" in err and "answer" in err


# -- ParallelLLM -----------------------------------------------------------------------------------------
def test_parallel_llm_shards_the_misses_and_shares_one_cache(servers, output):
    from dreamer_magic import OpenAILLM, ParallelLLM

    a, b = servers("main"), servers("second")
    both = ParallelLLM(make(a, concurrency=2), make(b, concurrency=2))
    prompts = [f"prompt {i}" for i in range(12)]
    answers = both.generate(prompts, max_new_tokens=3, temperature=0, progress=False)
    assert a.requests + b.requests == 12 and a.requests >= 2 and b.requests >= 2
    assert both.database.path == make(a).database.path
    assert make(b).generate(prompts, max_new_tokens=3, temperature=0, progress=False) == answers
    assert a.requests + b.requests == 12
    with pytest.raises(DreamerError, match="one model"):
        ParallelLLM(make(a), make(a, model="other"))
    with pytest.raises(DreamerError, match="at least one"):
        ParallelLLM()
    assert isinstance(both.members[0], OpenAILLM)


# -- through a real %%dreamer_step ---------------------------------------------------------------------
def test_a_step_shows_hits_misses_tokens_and_money_of_an_api_backend(ip, server, capsys):
    ip.user_ns["base_url"] = server.base_url
    ip.user_ns["prompts"] = ["one", "two", "one"]
    cell = (
        "from dreamer_magic import OpenAILLM\n"
        "llm = OpenAILLM('tiny-gpt2', base_url=base_url, prices={'input': 1.0, 'output': 4.0})\n"
        "answers = llm.generate(prompts, max_new_tokens=4, temperature=0, progress=False)\n"
    )
    ip.run_cell_magic("dreamer_step", "ask", cell)
    status = ip._dreamer_magics._last_status
    [(db, counts)] = status.cache.items()
    assert counts == [0, 2] and server.requests == 2
    ip.user_ns["prompts"] = ["one", "two", "three"]
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "ask", cell)
    status = ip._dreamer_magics._last_status
    assert status.cache[db] == [2, 1] and server.requests == 3
    tokens, money = status.cache_saved[db]
    assert tokens > 0 and money > 0
    out = capsys.readouterr().out
    assert f"{tokens:,} tokens from cache" in out and "saved" in out
    overview = ip.run_line_magic("dreamer", "status")._repr_mimebundle_()
    assert db in overview["text/plain"] and "tokens from cache" in overview["text/plain"]
    assert "tokens from cache" in overview["text/html"]


# -- extras and imports -----------------------------------------------------------------------------------
def _python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_load_ext_and_import_load_no_backend_and_no_extra():
    code = (
        "import sys\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance()\n"
        "ip.run_line_magic('load_ext', 'dreamer_magic')\n"
        "import dreamer_magic\n"
        "bad = [m for m in ('dreamer_magic.backends', 'aiohttp', 'httpx', 'vllm', 'litellm', 'openai') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
        "from dreamer_magic import OpenAILLM, VLLM, LiteLLM, ParallelLLM\n"
        "print('NAMES', [c.__name__ for c in (OpenAILLM, VLLM, LiteLLM, ParallelLLM)])\n"
        "print('AFTER', [m for m in ('aiohttp', 'vllm', 'litellm') if m in sys.modules])\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    assert "NAMES ['OpenAILLM', 'VLLM', 'LiteLLM', 'ParallelLLM']" in result.stdout
    assert "AFTER []" in result.stdout, "the classes import their extra only when used"


def test_a_missing_extra_is_one_clear_error_naming_the_pip_install(tmp_path):
    code = (
        "import sys\n"
        "for m in ('aiohttp', 'vllm', 'litellm'): sys.modules[m] = None\n"
        "from dreamer_magic import OpenAILLM, VLLM, LiteLLM, folders\n"
        f"folders.set_output_folder({str(tmp_path / 'out')!r})\n"
        "for make in (lambda: OpenAILLM('m', base_url='http://127.0.0.1:9').generate('x', progress=False),\n"
        "             lambda: VLLM('some/model'), lambda: LiteLLM('openai/m').generate('x', progress=False)):\n"
        "    try:\n"
        "        make()\n"
        "    except Exception as e:\n"
        "        print(type(e).__name__, e)\n"
    )
    result = _python(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3, result.stdout
    for line, extra in zip(lines, ("openai", "vllm", "litellm")):
        assert line.startswith("DreamerError") and f"pip install 'dreamer_magic[{extra}]'" in line


def test_a_database_of_the_old_layout_gains_the_columns_and_keeps_its_rows(tmp_path):
    import sqlite3

    path = tmp_path / ".cache" / "old.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE [cache] ([key] TEXT PRIMARY KEY, [request] TEXT, [response] TEXT, [created] TEXT)")
    conn.execute("INSERT INTO cache VALUES ('k1', '{}', '\"old answer\"', '2024-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    db = cache.open_database("old", tmp_path / ".cache")
    found, prompt, completion = db.get_answers(["k1", "k2"])
    assert found == {"k1": "old answer"} and (prompt, completion) == (0, 0)
    db.put_answers([("k2", "{}", '"new"', '{"finish_reason":"stop"}', 3.0, 1.0)])
    assert db.get_answers(["k1", "k2"]) == ({"k1": "old answer", "k2": "new"}, 3.0, 1.0)
    assert db.get_many(["k1"]) == {"k1": '"old answer"'}, "the plain reader still reads it"


_LITELLM_SCRIPT = """
import json, sys
from dreamer_magic import LiteLLM, folders
from dreamer_magic.errors import DreamerError
folders.set_output_folder(sys.argv[2])
llm = LiteLLM("openai/tiny-gpt2", api_base=sys.argv[1], api_key="none", concurrency=2)
out = {"answers": llm.generate(["hello", "world", "hello"], max_new_tokens=4, temperature=0, progress=False),
       "database": str(llm.database.path)}
llm.generate(["again"], max_new_tokens=4, temperature=0, progress=False)
out["retries"] = [r.reason for r in llm.retries]
try:
    llm.generate(["bad"], max_new_tokens=4, temperature=0, progress=False)
except DreamerError as e:
    out["error"] = str(e)
out["rerun"] = llm.generate(["hello", "world"], max_new_tokens=4, temperature=0, progress=False)
print("RESULT", json.dumps(out))
"""


def test_litellm_through_the_same_server(server, output):
    """In a subprocess: LiteLLM leaves logging tasks and global state behind in its importer."""
    import importlib.util

    if importlib.util.find_spec("litellm") is None:  # not imported here: it would fetch a price list
        pytest.skip("litellm is not installed (the [test] extra has it)")
    server.inject("ok", "ok", "429", "ok", "400", retry_after=0.1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", _LITELLM_SCRIPT, server.base_url, str(output)],
                            capture_output=True, text=True, env=env, timeout=300)
    lines = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")]
    assert len(lines) == 1, result.stderr[-3000:]
    [line] = lines
    out = json.loads(line[len("RESULT "):])
    assert out["answers"][0] == out["answers"][2] and len(out["answers"]) == 3
    assert out["retries"] and out["retries"][0].startswith("429")
    assert "400" in out["error"]
    assert out["rerun"] == out["answers"][:2]
    assert server.requests == 2 + 2 + 1, "two answers, the retried one, the refused one; the re-run none"
    direct = make(server).generate(["hello", "world"], max_new_tokens=4, temperature=0, progress=False)
    assert direct == out["answers"][:2], "the same server, the same greedy answers"
    assert server.requests == 7, "but OpenAILLM and LiteLLM never share a cache"
    assert out["database"] != str(make(server).database.path)
