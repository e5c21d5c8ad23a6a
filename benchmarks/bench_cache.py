"""Generation-cache benchmark: all-hit lookups and fresh writes, side by side with baselines.

Run::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_cache.py [--n 100000] [--repeats 5]
    # realistic sizes: --prompt-chars 800 --answer-chars 400

Prints medians over ``--repeats`` runs (the machine is shared: medians, not minima):

* ``LLM.generate`` on N prompts that are all in the cache — key hashing, the batched
  lookup, decoding and answer assembly included; the model is never called (asserted).
* A plain one-query-per-prompt lookup (``SELECT response FROM cache WHERE key = ?`` then
  ``json.loads``) on the same database, given the keys already hashed (so it pays for
  less than ``generate`` does).
* ``sqlitedict`` (DataDreamer's store) reading the same keys, already hashed.
* Bytes per entry of the generation cache and of sqlitedict, same prompts and answers.
* ``--first``: the first all-hit ``generate`` of a fresh process over the next one (CPU).
* Writes of N fresh entries: ``Database.put_many`` in transactions of 1,000 rows, and
  ``LLM.generate`` end to end on N new prompts with an instant stand-in model
  (batch_size=1,000: one transaction per batch, as in real use).

Targets (issue): generate >= 200,000 prompts/s and >= 3x the faster baseline; writes >= 50,000/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT.parent / "tests")]

from dreamer_magic import cache as cache_mod  # noqa: E402
from dreamer_magic.models import LLM  # noqa: E402


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def fake_answers(llm: LLM, chars: int = 0) -> None:
    """Replace the model call with an instant one (the cache, not the model, is measured)."""
    filler = " And they lived happily ever after." * (chars // 35 + 1)

    def run(prompts, keys, args, greedy):
        return [f"An answer of a few words to: {p[:50]}{filler[: max(0, chars - 80)]}" for p in prompts]

    llm._run = run  # type: ignore[method-assign]


FIRST = """
import sys, time, json
sys.path[:0] = {paths!r}
from _tiny import tiny_gpt2
from dreamer_magic.models import LLM
model, tokenizer = tiny_gpt2()
llm = LLM(model, tokenizer, name="gpt2-tiny", output_folder={output!r})
filler = " Include a dragon, a lighthouse and a recipe for soup." * ({chars} // 50 + 1)
prompts = [f"Write a short story about topic number {{i}}, please.{{filler[: max(0, {chars} - 50)]}}" for i in range({n})]
params = dict(max_new_tokens=64, temperature=0.7, top_p=0.95, seed=1, batch_size=1000, progress=False)
llm.fingerprint  # the model's weights are hashed once per process, before any lookup: not the lookup's cost
times = []
for _ in range(2):
    start = time.process_time()
    llm.generate(prompts, cache_only=True, **params)
    times.append(time.process_time() - start)
print(json.dumps([times, "sqlite_utils" in sys.modules]))
"""
FIRST_IMPORTS: list[str] = []


def file_bytes(path: Path) -> int:
    """The database's size with its WAL copied back (what it takes on disk at rest)."""
    import sqlite3

    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()
    wal = Path(str(path) + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def first_call_ratios(work: Path, n: int, options: argparse.Namespace, repeats: int) -> list[float]:
    """CPU time of the first all-hit generate in a fresh process over that of the second one."""
    import subprocess

    code = FIRST.format(paths=[str(ROOT.parent), str(ROOT.parent / "tests")], output=str(work / "output"),
                        chars=options.prompt_chars, n=n)
    ratios = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        (first, second), imported = json.loads(out.splitlines()[-1])
        ratios.append(first / second)
        if imported and not FIRST_IMPORTS:
            FIRST_IMPORTS.append("YES")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-chars", type=int, default=0, help="pad prompts to this length")
    parser.add_argument("--answer-chars", type=int, default=0, help="pad answers to this length")
    parser.add_argument("--first", action="store_true", help="also time the first lookup of a fresh process (target 2)")
    options = parser.parse_args()
    n, repeats = options.n, options.repeats

    from _tiny import tiny_gpt2

    work = ROOT / "_work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, tokenizer = tiny_gpt2()

    def no_model(*a, **k):
        raise AssertionError("the model was called on an all-hit lookup")

    model.generate = no_model
    llm = LLM(model, tokenizer, name="gpt2-tiny", output_folder=work / "output")
    fake_answers(llm, options.answer_chars)
    filler = " Include a dragon, a lighthouse and a recipe for soup." * (options.prompt_chars // 50 + 1)
    prompts = [
        f"Write a short story about topic number {i}, please.{filler[: max(0, options.prompt_chars - 50)]}"
        for i in range(n)
    ]
    params = dict(max_new_tokens=64, temperature=0.7, top_p=0.95, seed=1, batch_size=1000, progress=False)

    print(f"generation-cache benchmark: {n:,} prompts (~{sum(map(len, prompts)) // n} chars; answers "
          f"~{max(80, options.answer_chars)} chars), median of {repeats} runs")
    print(f"python {sys.version.split()[0]}, sqlite {__import__('sqlite3').sqlite_version}, {os.cpu_count()} cpus\n")

    # -- writes ---------------------------------------------------------------------------------
    db = cache_mod.Database(work / "writes.sqlite")
    rows_all = [
        (cache_mod.request_key(r), r, cache_mod.json_str(f"answer {i}"))
        for i, r in enumerate(
            cache_mod.canonical_json({"args": {"x": 1}, "prompt": f"fresh prompt {i}"}) for i in range(n)
        )
    ]

    def write_put_many():
        db.connection.execute("DELETE FROM cache")
        start = time.perf_counter()
        for i in range(0, n, 1000):
            db.put_many(rows_all[i : i + 1000])
        return time.perf_counter() - start

    put_times = sorted(write_put_many() for _ in range(repeats))
    put_s = statistics.median(put_times)

    def write_generate():
        shutil.rmtree(work / "output", ignore_errors=True)
        cache_mod._open.clear()
        start = time.perf_counter()
        llm.generate(prompts, **params)
        return time.perf_counter() - start

    gen_write_times = [write_generate() for _ in range(repeats)]
    gen_write_s = statistics.median(gen_write_times)
    assert llm.database.count() == n

    # -- all-hit reads ----------------------------------------------------------------------------
    gen_s, answers = median_time(lambda: llm.generate(prompts, **params), repeats)
    assert answers[123].startswith(f"An answer of a few words to: {prompts[123][:50]}")

    args = llm._request_args(llm.fingerprint, 64, 0.7, 0.95, None, 1, 1, {})
    prefix = cache_mod.request_prefix({"args": args}, "prompt")
    keys = [cache_mod.request_key(f'{prefix}{cache_mod.json_str(p)},"sample":0}}') for p in prompts]
    # the same key, built the obvious way (per-prompt json.dumps of the whole request)
    naive_key = lambda p: cache_mod.request_key(  # noqa: E731
        json.dumps({"args": args, "prompt": p, "sample": 0}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    )
    assert naive_key(prompts[7]) == keys[7]

    import sqlite3

    conn = sqlite3.connect(str(llm.database.path), isolation_level=None)
    conn.execute("PRAGMA cache_size = -131072")
    conn.execute("PRAGMA mmap_size = 1073741824")
    query = "SELECT response FROM cache WHERE key = ?"

    def plain():
        return [json.loads(conn.execute(query, (k,)).fetchone()[0]) for k in keys]

    plain_s, plain_answers = median_time(plain, repeats)
    assert plain_answers == answers
    plain_hash_s, _ = median_time(
        lambda: [json.loads(conn.execute(query, (naive_key(p),)).fetchone()[0]) for p in prompts], repeats
    )

    from sqlitedict import SqliteDict

    sd_path = str(work / "sqlitedict.sqlite")
    with SqliteDict(sd_path, autocommit=False) as sd:
        for k, a in zip(keys, answers):
            sd[k] = a
        sd.commit()
    sd = SqliteDict(sd_path, flag="r")
    sd_s, sd_answers = median_time(lambda: [sd[k] for k in keys], max(1, min(repeats, 3)))
    assert sd_answers == answers
    sd.close()
    ours_bytes = file_bytes(llm.database.path) / n
    sd_bytes = file_bytes(Path(sd_path)) / n

    first_ratios = first_call_ratios(work, n, options, repeats) if options.first else []

    # -- report -----------------------------------------------------------------------------------
    def rate(seconds: float) -> str:
        return f"{n / seconds:>12,.0f}/s"

    faster = min(plain_s, sd_s)
    print("all hits (reads)                                      median      throughput")
    print(f"  LLM.generate, hashing included                   {gen_s * 1e3:8.1f} ms {rate(gen_s)}")
    print(f"  plain query per prompt (keys given)              {plain_s * 1e3:8.1f} ms {rate(plain_s)}")
    print(f"  plain query per prompt + per-prompt json hashing {plain_hash_s * 1e3:8.1f} ms {rate(plain_hash_s)}")
    print(f"  sqlitedict (keys given)                          {sd_s * 1e3:8.1f} ms {rate(sd_s)}")
    print(f"  ratio vs plain query:  {plain_s / gen_s:5.1f}x")
    print(f"  ratio vs sqlitedict:   {sd_s / gen_s:5.1f}x")
    print(f"  ratio vs faster baseline: {faster / gen_s:5.1f}x   (target >= 3x: "
          f"{'met' if faster / gen_s >= 3 else 'NOT met'}; >= 200,000/s: {'met' if n / gen_s >= 200_000 else 'NOT met'})")
    print()
    print("fresh writes                                          median      throughput")
    print(f"  Database.put_many, 1,000-row transactions        {put_s * 1e3:8.1f} ms {rate(put_s)}")
    print(f"  LLM.generate, stand-in model, batch_size=1,000   {gen_write_s * 1e3:8.1f} ms {rate(gen_write_s)}")
    print(f"  (target >= 50,000/s: {'met' if n / put_s >= 50_000 and n / gen_write_s >= 50_000 else 'NOT met'})")
    print()
    print("bytes per entry (file size after a checkpoint / entries), the same prompts and answers")
    print(f"  generation cache {ours_bytes:8.1f}   sqlitedict (DataDreamer's store) {sd_bytes:8.1f}"
          f"   ratio {ours_bytes / sd_bytes:.2f}x  (target <= 1.5x)")
    if first_ratios:
        print()
        print("first all-hit LLM.generate in a fresh process / the next one (same prompts), one process per round")
        print(f"  ratio {statistics.median(first_ratios):.2f}x [{min(first_ratios):.2f}-{max(first_ratios):.2f}]"
              f"   (target <= 1.2x; sqlite_utils imported: {FIRST_IMPORTS or 'no'})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
