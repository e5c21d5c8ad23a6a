"""Generation-backend benchmark: client overhead against an instant server, and all-hit lookups.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_backends.py [--requests 4000] [--n 100000]

Prints medians over ``--repeats`` runs (the machine is shared: medians, not minima):

* ``OpenAILLM.generate`` on fresh prompts against ``tests/_openai_server.py --instant`` (a
  separate process that answers at once), with ``--concurrency`` requests in flight: requests
  per second end to end (keys, lookup, HTTP, parsing, commits, progress bar off).
  Target: >= 2,000 requests/s.
* ``OpenAILLM.generate`` on ``--n`` chat prompts of ``--prompt-chars`` characters (2,000) that
  are all in the cache, with a system prompt: prompts per second; no request is sent (asserted).
  Target: >= 200,000 prompts/s.
* The same keys read one at a time from ``sqlitedict`` (DataDreamer's store), given the keys
  already hashed, when sqlitedict is installed.
"""

from __future__ import annotations

import argparse
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


@contextlib.contextmanager
def instant_server():
    proc = subprocess.Popen(
        [sys.executable, str(ROOT.parent / "tests" / "_openai_server.py"), "--instant"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            raise RuntimeError(f"the instant server did not start: {line!r}")
        yield line.split()[1]
    finally:
        proc.terminate()
        proc.wait(10)


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
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--prompt-chars", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    work = ROOT / "_work_backends"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")

    # -- client overhead -----------------------------------------------------------------------
    with instant_server() as url:
        llm = OpenAILLM("instant", base_url=url, concurrency=options.concurrency, output_folder=work)
        llm.generate(["warm up"] * 1, progress=False)
        run = [0]

        def fresh() -> int:
            run[0] += 1
            prompts = [f"request {i} of run {run[0]}" for i in range(options.requests)]
            before = llm.requests_sent
            llm.generate(prompts, max_new_tokens=16, progress=False)
            return llm.requests_sent - before

        seconds, sent = median_time(fresh, options.repeats)
        assert sent == options.requests
        print(f"client overhead: {options.requests / seconds:,.0f} requests/s "
              f"({options.requests} fresh prompts, concurrency {options.concurrency}, median of "
              f"{options.repeats}; target >= 2,000)")

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
