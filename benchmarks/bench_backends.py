"""Generation-backend benchmark: client overhead against an instant server, and all-hit lookups.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py [--requests 4000] [--n 100000]
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py --part client --repeats 7

Prints medians and [min-max] over ``--repeats`` rounds (the machine is shared):

* **Client overhead.** ``OpenAILLM.generate`` on ``--requests`` fresh prompts (keys, lookup,
  HTTP, parsing, commits; progress bar off) against an instant server in its own process (a
  minimal asyncio server that answers every request with one fixed chat completion over
  keep-alive connections), with ``--concurrency`` requests in flight. Two figures each: wall
  requests/s, and requests per second of the client's own CPU time (``time.process_time`` of
  this process, every thread; the server's CPU is not counted, it is printed apart). The floor
  is a bare ``aiohttp`` loop doing the same requests (one session, ``--concurrency`` workers,
  each posting a JSON body and parsing the JSON answer), run in the same rounds, interleaved;
  ``ours/bare`` is the median of the per-round ratios. Target: >= 2,000 requests/s. Then
  ``--calls`` calls of one fresh prompt each: calls/s (what a loop over rows pays per call).
* **All-hit lookups.** ``OpenAILLM.generate`` on ``--n`` chat prompts of ``--prompt-chars``
  characters (2,000) that are all in the cache, with a system prompt: prompts per second; no
  request is sent (asserted). Target: >= 200,000 prompts/s.
* The same keys read one at a time from ``sqlitedict`` (DataDreamer's store), given the keys
  already hashed, when sqlitedict is installed.

``bench_backends.py --serve`` runs the instant server alone (it prints ``listening <url>``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT.parent / "tests")]

from dreamer_magic.backends.base import answer  # noqa: E402
from dreamer_magic.backends.openai import OpenAILLM  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def spread(values: list[float], digits: int = 0) -> str:
    """``median [min-max]`` of a list of figures."""
    f = f"{{:,.{digits}f}}"
    return f"{f.format(statistics.median(values))} [{f.format(min(values))}-{f.format(max(values))}]"


# -- the instant server (its own process) ------------------------------------------------------------
_ANSWER = json.dumps({
    "id": "chatcmpl-instant", "object": "chat.completion", "model": "instant-2024-01-01",
    "system_fingerprint": "fp_instant",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "An instant answer."},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16},
}).encode()
_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
             % (len(_ANSWER), _ANSWER))


def _content_length(head: bytes) -> int:
    head = head.lower() + b"\r\n"
    at = head.find(b"\r\ncontent-length:")
    return int(head[at + 17 : head.index(b"\r\n", at + 2)]) if at >= 0 else 0


class _Instant(asyncio.Protocol):
    """HTTP/1.1 keep-alive: every complete request in the buffer gets the fixed answer, in one write."""

    def connection_made(self, transport) -> None:
        self.transport, self.buffer = transport, b""

    def data_received(self, data: bytes) -> None:
        buffer, answered = self.buffer + data, 0
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = _content_length(buffer[:end])
            if len(buffer) < end + 4 + length:
                break
            buffer = buffer[end + 4 + length :]
            answered += 1
        self.buffer = buffer
        if answered:
            self.transport.write(_RESPONSE * answered)


def serve() -> None:
    async def run() -> None:
        server = await asyncio.get_running_loop().create_server(_Instant, "127.0.0.1", 0, backlog=1024)
        print(f"listening http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
        await server.serve_forever()

    asyncio.run(run())


@contextlib.contextmanager
def instant_server():
    """``(base_url, cpu)``: the server in its own process; ``cpu()`` its CPU seconds so far."""
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)

    def cpu() -> float:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    try:
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the instant server did not start: {line!r}")
        yield line.split()[1], cpu
    finally:
        proc.terminate()
        proc.wait(10)


# -- the floor: a bare aiohttp loop -----------------------------------------------------------------------
def bare_aiohttp(url: str, prompts: list[str], concurrency: int) -> int:
    """POST one chat body per prompt with ``concurrency`` workers on one session; the answers parsed."""
    import aiohttp

    async def run() -> int:
        todo = iter(prompts)
        done = [0]
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector,
                                         headers={"content-type": "application/json"}) as session:

            async def worker() -> None:
                for prompt in todo:
                    body = {"model": "instant", "messages": [{"role": "user", "content": prompt}],
                            "max_tokens": 16}
                    async with session.post(url + "/chat/completions", data=json.dumps(body).encode()) as r:
                        data = json.loads(await r.read())
                    assert data["choices"][0]["message"]["content"]
                    done[0] += 1

            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done[0]

    return asyncio.run(run())


def client_overhead(options, work: Path) -> None:
    n, concurrency = options.requests, options.concurrency
    with instant_server() as (url, server_cpu):
        llm = OpenAILLM("instant", base_url=url, concurrency=concurrency, output_folder=work)
        llm.generate(["warm up"], progress=False)
        bare_aiohttp(url, ["warm up"] * concurrency, concurrency)
        figures: dict[str, dict[str, list[float]]] = {
            k: {"wall": [], "cpu": [], "server": []} for k in ("ours", "bare")
        }

        def ours(r: int) -> int:
            before = llm.requests_sent
            llm.generate([f"request {i} of round {r}" for i in range(n)], max_new_tokens=16, progress=False)
            return llm.requests_sent - before

        def bare(r: int) -> int:
            return bare_aiohttp(url, [f"request {i} of round {r}" for i in range(n)], concurrency)

        single: dict[str, list[float]] = {"wall": [], "cpu": []}
        for r in range(options.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(options.calls):
                llm.generate(f"one prompt {i} of round {r}", max_new_tokens=16, progress=False)
            single["wall"].append(options.calls / (time.perf_counter() - t0))
            single["cpu"].append(options.calls / max(time.process_time() - c0, 1e-9))
            for name, fn in ((("ours", ours), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("ours", ours))):
                s0, c0, t0 = server_cpu(), time.process_time(), time.perf_counter()
                sent = fn(r)
                t1, c1, s1 = time.perf_counter(), time.process_time(), server_cpu()
                assert sent == n, f"{name} sent {sent} requests, not {n}"
                figures[name]["wall"].append(n / (t1 - t0))
                figures[name]["cpu"].append(n / max(c1 - c0, 1e-9))
                figures[name]["server"].append((s1 - s0) / n * 1e6)
    print(f"client overhead: {n:,} fresh prompts, concurrency {concurrency}, {options.repeats} interleaved "
          "rounds; median [min-max]")
    for name, label in (("ours", "OpenAILLM.generate"), ("bare", "bare aiohttp loop")):
        f = figures[name]
        print(f"  {label:<20} {spread(f['wall']):>24} requests/s wall   "
              f"{spread(f['cpu']):>24} requests per client CPU-second   "
              f"(server CPU {spread(f['server'])} us/request)")
    for what in ("wall", "cpu"):
        ratios = [a / b for a, b in zip(figures["ours"][what], figures["bare"][what])]
        print(f"  ours/bare ({what}): {spread(ratios, 2)}")
    print("  target: >= 2,000 requests/s")
    print(f"  one fresh prompt per generate() call ({options.calls} calls a round): "
          f"{spread(single['wall'])} calls/s wall, {spread(single['cpu'])} calls per client CPU-second")


class _Filler(OpenAILLM):
    """OpenAILLM's keys and rows, answered in-process (fills a large cache in seconds)."""

    max_batch = 4096

    @contextlib.asynccontextmanager
    async def _session(self):
        async def call(batch):
            usage = {"prompt_tokens": 500, "completion_tokens": 20}
            return [[answer(f"answer {len(j.body['messages'][-1]['content'])}", "stop", self.model,
                              "fp", usage, 1)] for j in batch]

        yield call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calls", type=int, default=300, help="one-prompt generate() calls a round")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=("all", "client", "lookups"), default="all")
    parser.add_argument("--serve", action="store_true", help="run the instant server alone")
    options = parser.parse_args()
    if options.serve:
        serve()
        return
    work = ROOT / "_work_backends"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    if options.part in ("all", "client"):
        client_overhead(options, work)
    if options.part == "client":
        return

    # -- all-hit lookups of long chat prompts ----------------------------------------------------------
    n, chars = options.n, options.prompt_chars
    filler = ("The quick brown fox jumps over the lazy dog; " * (chars // 44 + 1))[:chars]
    prompts = [f"{i:08d} {filler}"[:chars] for i in range(n)]
    fill = _Filler("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", output_folder=work,
                   system_prompt="You are a helpful assistant.", prices={"input": 0.15, "output": 0.6})
    start = time.perf_counter()
    fill.generate(prompts, max_new_tokens=64, temperature=0.7, progress=False)
    print(f"(filled {n:,} rows in {time.perf_counter() - start:.1f} s)")
    fill.database.checkpoint()

    class NoCalls(_Filler):
        @contextlib.asynccontextmanager
        async def _session(self):
            raise AssertionError("a request was sent on an all-hit lookup")
            yield

    hits = NoCalls("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", output_folder=work,
                   system_prompt="You are a helpful assistant.", prices={"input": 0.15, "output": 0.6})
    seconds, answers = median_time(
        lambda: hits.generate(prompts, max_new_tokens=64, temperature=0.7, progress=False), options.repeats
    )
    assert len(answers) == n and answers[5] == f"answer {chars}"
    print(f"all-hit lookups: {n / seconds:,.0f} prompts/s ({n:,} chat prompts of {chars:,} characters "
          f"with a system prompt, median of {options.repeats}; target >= 200,000)")

    try:
        from sqlitedict import SqliteDict
    except ImportError:
        return
    import xxhash

    keys = [xxhash.xxh3_128_hexdigest(p.encode()) for p in prompts]
    store_path = work / "sqlitedict.sqlite"
    with SqliteDict(str(store_path), autocommit=False) as store:
        for k in keys:
            store[k] = json.dumps({"text": "answer", "usage": {"prompt_tokens": 500}})
        store.commit()
    with SqliteDict(str(store_path), flag="r") as store:
        seconds, got = median_time(lambda: [store[k] for k in keys], max(1, options.repeats // 2))
    print(f"sqlitedict (DataDreamer's store), keys already hashed: {n / seconds:,.0f} prompts/s")


if __name__ == "__main__":
    main()
