"""A ``Trainer`` built in an earlier cell and trained in ``%%dreamer_train`` (issue 10 item 2, SPEC §4).

Tutorials build ``trainer = Trainer(...)`` in one cell and call ``trainer.train()`` in the next.
Wrapping only ``trainer.train()`` must give what building it inside gives: checkpoints in
``<name>/_checkpoints`` (the user's ``output_dir`` untouched, and put back after the cell), the
live progress, resume after a crash, the model saved to ``_model`` and, on a hit, loaded back
into ``trainer.model`` (the same object as ``model``). A ``Trainer`` input counts by its model,
arguments, data, collator and callbacks, never by its live state.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _run_trainer import lm_dataset
from _session import session
from _tiny import logged, same_weights, tiny_gpt2, weights
from conftest import fresh_kernel
from dreamer_magic.fingerprint import fingerprint
from dreamer_magic.status import FAILED, LOADED, RAN

BUILD = """
import json, os
from transformers import Trainer, TrainerCallback, TrainingArguments

class LossLog(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and os.environ.get("LOSS_FILE"):
            with open(os.environ["LOSS_FILE"], "a") as f:
                f.write(json.dumps([state.global_step, logs["loss"]]) + "\\n")
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("CRASH_AT") or -1):
            raise RuntimeError(f"crash at step {state.global_step}")

args = TrainingArguments(output_dir="user-out", max_steps=10, save_steps=5, logging_steps=1,
                         per_device_train_batch_size=4, learning_rate=1e-3, seed=1, disable_tqdm=True,
                         use_cpu=True, report_to="none", dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok, callbacks=[LossLog()])
"""
TRAIN = "trainer.train()\n"


def restart(ip) -> None:
    """conftest's in-process restart, with the ``__name__`` a new kernel's namespace has (classes
    defined in cells then belong to ``__main__`` as in a real kernel, not to ``builtins``)."""
    fresh_kernel(ip)
    ip.user_ns.setdefault("__name__", "__main__")


def inputs(ip) -> None:
    model, tok = tiny_gpt2()
    ip.user_ns.update(model=model, tok=tok, train_ds=lm_dataset(tok))


def build(ip) -> None:
    ip.run_cell(BUILD).raise_error()


def train(ip, line: str = "outside", cell: str = TRAIN):
    ip.run_cell_magic("dreamer_train", line, cell)
    return ip._dreamer_magics._last_status


@pytest.fixture
def loss_file(tmp_path, monkeypatch):
    path = tmp_path / "losses.jsonl"
    monkeypatch.setenv("LOSS_FILE", str(path))
    monkeypatch.delenv("CRASH_AT", raising=False)
    return path


def test_redirected_watched_saved_and_reloaded_into_the_trainer(ip, tmp_path, loss_file):
    inputs(ip)
    build(ip)
    trainer = ip.user_ns["trainer"]
    own_args, own_callbacks = trainer.args, list(trainer.callback_handler.callbacks)
    status = train(ip)
    folder = tmp_path / "output" / "outside"
    assert status.state == RAN, status.error
    # checkpoints in _checkpoints, none in the user's output_dir, and the status says so
    assert sorted(p.name for p in (folder / "_checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert not list((tmp_path / "user-out").glob("checkpoint-*"))
    assert any("'user-out' redirected to" in n for n in status.notes), status.notes
    # the Trainer gets its own arguments and callbacks back after the cell
    assert trainer.args is own_args and trainer.args.output_dir == "user-out"
    assert list(trainer.callback_handler.callbacks) == own_callbacks
    # the progress card was fed: steps, losses, checkpoints
    assert (status.step, status.max_steps) == (10, 10)
    assert [s for s, _ in status.losses] == list(range(1, 11))
    assert [c.name for c in status.checkpoints] == ["checkpoint-5", "checkpoint-10"]
    # the trained model and its tokenizer are in _model, as the variables that hold them
    for name in ("model.safetensors", "config.json", "tokenizer.json", "trainer_state.json"):
        assert (folder / "_model" / name).is_file(), name
    meta = json.loads((folder / "trainer.json").read_text())
    assert meta["outputs"]["model"]["into"] == "trainer.model" and meta["outputs"]["model"]["path"] == "_model"
    assert meta["outputs"]["tok"]["into"] == "trainer.processing_class"
    trained = weights(ip.user_ns["model"])
    assert len(logged(loss_file)) == 10

    # the same kernel, the notebook run again: the Trainer built from the trained `model` is this
    # trainer's own output
    build(ip)
    assert train(ip).state == LOADED and len(logged(loss_file)) == 10

    # a restart, the notebook run again: no training, the weights go into the new Trainer's model
    restart(ip)
    inputs(ip)
    build(ip)
    hit = train(ip)
    assert hit.state == LOADED, hit.reasons
    assert len(logged(loss_file)) == 10
    trainer = ip.user_ns["trainer"]
    assert ip.user_ns["model"] is trainer.model and same_weights(weights(trainer.model), trained)
    assert trainer.state.global_step == 10 and trainer.state.log_history
    assert "trainer.model" not in ip.user_ns and ip.user_ns["tok"] is trainer.processing_class
    assert (hit.step, len(hit.losses)) == (10, 10)
    build(ip)
    assert train(ip).state == LOADED  # and once more after the hit

    # only the training cell again: training would draw other random numbers (dropout), so it
    # runs, and the status says which cell to re-run instead
    again = train(ip)
    assert again.state == RAN and any(r.kind == "rng" for r in again.reasons), again.reasons
    assert any("re-run the cell that builds `trainer`" in n for n in again.notes), again.notes


def test_a_crash_resumes_from_the_last_checkpoint(ip, tmp_path, loss_file, monkeypatch):
    inputs(ip)
    build(ip)
    monkeypatch.setenv("CRASH_AT", "7")
    with pytest.raises(RuntimeError, match="crash at step 7"):
        train(ip)
    failed = ip._dreamer_magics._last_status
    assert failed.state == FAILED and "checkpoints are kept" in failed.error
    assert ip.user_ns["trainer"].args.output_dir == "user-out"  # put back on error too
    monkeypatch.delenv("CRASH_AT")
    resumed = train(ip)
    assert resumed.state == "resumed from checkpoint-5", (resumed.state, resumed.reasons, resumed.notes)
    assert resumed.step == 10
    assert [s for s, _ in logged(loss_file)] == [*range(1, 8), *range(6, 11)]


def test_a_model_no_variable_holds_is_saved_as_trainer_model(ip, tmp_path, loss_file):
    model, tok = tiny_gpt2()
    ip.user_ns.update(config=model.config, tok=tok, train_ds=lm_dataset(tok))
    cell = BUILD.replace("Trainer(model=model,", "Trainer(model=GPT2LMHeadModel(config),")
    cell = "import torch\nfrom transformers import GPT2LMHeadModel\ntorch.manual_seed(0)\n" + cell
    ip.run_cell(cell).raise_error()
    assert train(ip).state == RAN
    meta = json.loads((tmp_path / "output" / "outside" / "trainer.json").read_text())
    assert meta["outputs"]["trainer.model"]["into"] == "trainer.model"
    trained = weights(ip.user_ns["trainer"].model)
    assert "trainer.model" not in ip.user_ns
    restart(ip)
    ip.user_ns.update(config=model.config, tok=tok, train_ds=lm_dataset(tok))
    ip.run_cell(cell).raise_error()
    assert train(ip).state == LOADED
    assert same_weights(weights(ip.user_ns["trainer"].model), trained)


def test_two_run_alls_in_fresh_processes(tmp_path):
    """The issue's report: the second Run All failed with "`trainer` cannot be fingerprinted"."""
    (tmp_path / "tests_helpers.py").write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom _tiny import tiny_gpt2\nfrom _run_trainer import lm_dataset\n" % str(Path(__file__).parent)
    )
    cells = [
        "from tests_helpers import tiny_gpt2, lm_dataset\nmodel, tok = tiny_gpt2()\ntrain_ds = lm_dataset(tok)",
        BUILD,
        "%%dreamer_train outside\ntrainer.train()",
        "%%dreamer_step after\nloss = trainer.evaluate(train_ds)['eval_loss']",
    ]
    # `after` puts the model in eval mode (Trainer.evaluate): a Trainer cannot be saved, so a hit
    # of `after` does not restore that change and says so; the values compared are the results.
    first = session(tmp_path, cells, dump=["loss"])
    assert not first.errors and first.states == ["ran", "ran"], (first.errors, first.statuses)
    second = session(tmp_path, cells, dump=["loss"])
    assert not second.errors, second.errors
    assert second.states == ["loaded from disk", "loaded from disk"], second.statuses
    assert second.same_values(first), (first.values, second.values)


def test_a_trainer_counts_by_what_decides_training_not_by_where_it_writes(tmp_path):
    import copy

    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    class Extra(TrainerCallback):
        pass

    model, tok = tiny_gpt2()
    data = lm_dataset(tok)

    def make(**changes):
        options = dict(output_dir=str(tmp_path / "a"), max_steps=2, use_cpu=True, report_to="none", learning_rate=1e-3)
        options.update(changes.pop("args", {}))
        kwargs = dict(model=model, args=TrainingArguments(**options), train_dataset=data, processing_class=tok)
        kwargs.update(changes)
        return Trainer(**kwargs)

    base = fingerprint(make())
    assert fingerprint(make()) == base
    assert fingerprint(make(args={"output_dir": str(tmp_path / "b"), "run_name": "another name"})) == base
    other_model = copy.deepcopy(model)
    with __import__("torch").no_grad():
        next(other_model.parameters()).add_(1.0)
    assert fingerprint(make(model=other_model)) != base
    assert fingerprint(make(args={"learning_rate": 2e-3})) != base
    assert fingerprint(make(train_dataset=lm_dataset(tok, offset=1))) != base
    assert fingerprint(make(data_collator=DataCollatorForLanguageModeling(tok, mlm=False))) != base
    assert fingerprint(make(callbacks=[Extra()])) != base
    assert fingerprint(make(compute_metrics=lambda p: {})) != base
    trained = make()
    trained.train()  # live state now: an accelerator, an optimizer it made, weak references
    fingerprint(trained)  # fingerprints without error
