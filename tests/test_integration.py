"""Steps and the generation cache together: live hit/miss counts and %dreamer status."""

from __future__ import annotations

import pytest

from _tiny import tiny_gpt2


@pytest.fixture(scope="module")
def tiny():
    return tiny_gpt2()


def test_a_step_shows_the_generation_cache_hits_and_misses_of_its_cell(ip, tiny, capsys):
    from dreamer_magic import LLM

    model, tok = tiny
    ip.user_ns["llm"] = LLM(model, tok)
    ip.user_ns["prompts"] = ["hello there", "good morning", "hello there"]
    cell = "answers = llm.generate(prompts, max_new_tokens=4, temperature=0)\n"
    ip.run_cell_magic("dreamer_step", "answer", cell)
    status = ip._dreamer_magics._last_status
    [(db, (hits, misses))] = status.cache.items()
    assert (hits, misses) == (0, 2), "two distinct prompts, both computed"
    out = capsys.readouterr().out
    assert "generation cache" in out and db in out

    # a new prompt re-runs the step: the cache answers the old ones, the model only the new one
    ip.user_ns["prompts"] = ["hello there", "good morning", "good night"]
    ip.run_cell_magic("dreamer_step", "answer", cell)
    assert ip._dreamer_magics._last_status.cache[db] == [2, 1]
    assert len(ip.user_ns["answers"]) == 3

    overview = ip.run_line_magic("dreamer", "status")._repr_mimebundle_()["text/plain"]
    assert db in overview and "answer" in overview


def test_a_step_that_reads_a_model_hits_until_the_weights_change(ip, tiny):
    import torch

    model, tok = tiny
    ip.user_ns.update(model=model, tok=tok)
    cell = "n_params = sum(p.numel() for p in model.parameters())\nvocab = len(tok)\n"
    ip.run_cell_magic("dreamer_step", "count", cell)
    ip.run_cell_magic("dreamer_step", "count", cell)
    assert ip._dreamer_magics._last_status.state == "loaded from disk"
    with torch.no_grad():
        next(model.parameters()).mul_(2.0)
    ip.run_cell_magic("dreamer_step", "count", cell)
    status = ip._dreamer_magics._last_status
    assert status.state == "ran" and "input `model` changed" in status.reasons
