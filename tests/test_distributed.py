"""``%%dreamer_train NAME --processes 2`` in a real ipykernel (nbclient), on CPU with gloo.

One kernel runs every cell in order (the cells build on each other, as in a notebook):

1. a Trainer in one process with a batch of 4, then the same cell in 2 processes, each batch of
   4 split in 2 (``split_batches``: the same global batch): same losses and final weights within float tolerance, and the
   kernel holds the trained model afterwards;
2. the same 2-process run with worker 1 SIGKILLed at step 5: the cell fails, the kernel lives,
   the status says "failed at step 5: checkpoints kept"; re-running resumes both ranks from
   checkpoint-4 with the losses and weights of the uninterrupted run;
3. a plain-PyTorch loop with ``Checkpointer`` under ``--processes 2``, killed and resumed: each
   rank resumes its own RNG stream;
4. a body that calls ``notebook_launcher`` itself is refused, and nothing is committed.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

TESTS = Path(__file__).resolve().parent

SETUP = f"""
import json, os, sys
sys.path.insert(0, {str(TESTS)!r})
%load_ext dreamer_magic
%dreamer output out
import torch
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
from _tiny import tiny_gpt2

def fresh():
    # the tiny GPT-2 without dropout: two ranks with their own dropout masks would not match one process
    config = tiny_gpt2()[0].config
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
    torch.manual_seed(0)
    return type(tiny_gpt2()[0])(config).eval()

model, tok = fresh(), tiny_gpt2()[1]
texts = [f"{{i}} the quick brown fox jumps over the lazy dog" for i in range(32)]
ds = Dataset.from_dict({{"text": texts}}).map(
    lambda b: tok(b["text"], truncation=True, max_length=16, padding="max_length"), batched=True, remove_columns=["text"]
)
collator = DataCollatorForLanguageModeling(tok, mlm=False)

class Killer(TrainerCallback):
    # SIGKILL worker 1 at the step in $KILL_AT (the test sets it for one run only)
    def on_step_end(self, args, state, control, **kw):
        if os.environ.get("RANK") == "1" and str(state.global_step) == os.environ.get("KILL_AT"):
            os.kill(os.getpid(), 9)

def weights(m):
    return {{k: v.detach().clone() for k, v in m.state_dict().items()}}

def close(a, b):
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)

initial = weights(model)
"""

TRAIN = """
args = TrainingArguments(output_dir="x", max_steps=6, per_device_train_batch_size={batch}, save_steps=2,
                         logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, train_sampling_strategy="sequential",
                         ddp_find_unused_parameters=False, accelerator_config={{"split_batches": True}}{extra})
trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[Killer()])
trainer.train()
"""

GLOO = TRAIN.format(batch=4, extra=', ddp_backend="gloo"')  # cannot be rebuilt outside a process group

CHECKPOINTER = """
import torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # each rank its own random stream
net = torch.nn.Linear(4, 1)
ddp = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
ckpt = Checkpointer(net, opt, every=2, max_steps=6)
for step in range(ckpt.resume(), 6):
    x = torch.rand(8, 4)
    loss = ddp(x).pow(2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    with open(f"draws-{tag}-{rank}.jsonl", "a") as f:
        f.write(json.dumps([step, x.sum().item()]) + "\\n")
    ckpt.step(step, loss=loss.item())
    if rank == 1 and str(step + 1) == os.environ.get("KILL_AT"):
        os.kill(os.getpid(), 9)
dist.destroy_process_group()
net_out = net
"""

LAUNCHER = """
from accelerate import notebook_launcher

def train():
    Trainer(model=model, args=TrainingArguments(output_dir="y", max_steps=2, report_to=[], use_cpu=True),
            train_dataset=ds, data_collator=collator).train()

notebook_launcher(train, num_processes=2)
"""


def _cells() -> list[str]:
    return [
        SETUP,
        "%%dreamer_train single\n" + TRAIN.format(batch=4, extra=""),
        "single_w = weights(model); single_losses = dreamer_magic_status().losses",
        "model = fresh()\n",
        "%%dreamer_train full --processes 2\n" + TRAIN.format(batch=4, extra=""),
        "full_w = weights(model); full_losses = dreamer_magic_status().losses",
        "model = fresh()\nos.environ['KILL_AT'] = '5'",
        "%%dreamer_train crash --processes 2\n" + GLOO,
        "crash_status = dreamer_magic_status(); del os.environ['KILL_AT']",
        "%%dreamer_train crash --processes 2\n" + GLOO,
        "crash_w = weights(model); resumed = dreamer_magic_status()",
        "tag = 'full'\n",
        "%%dreamer_train ck-full --processes 2\n" + CHECKPOINTER,
        "tag = 'crash'; os.environ['KILL_AT'] = '3'",
        "%%dreamer_train ck-crash --processes 2\n" + CHECKPOINTER,
        "del os.environ['KILL_AT']",
        "%%dreamer_train ck-crash --processes 2\n" + CHECKPOINTER,
        "ck_resumed = dreamer_magic_status()",
        "%%dreamer_train launched\n" + LAUNCHER,
        "%%dreamer_train full --processes 2\n" + TRAIN.format(batch=4, extra=""),
        "hit = dreamer_magic_status()",
        "%%dreamer_train crash --processes 2\n" + GLOO,
        "gloo_hit = dreamer_magic_status()",
        # what the kernel saw, as JSON for the test
        "print(json.dumps({"
        "'single_vs_full': close(single_w, full_w), 'full_trained': not close(initial, full_w),"
        "'crash_vs_full': close(crash_w, full_w), 'kernel_is_full': close(weights(model), full_w),"
        "'single_losses': single_losses, 'full_losses': full_losses, 'resumed_losses': resumed.losses,"
        "'crash_error': crash_status.error, 'crash_state': crash_status.state, 'resumed_state': resumed.state,"
        "'ck_state': ck_resumed.state, 'hit_state': hit.state, 'net_out': type(net_out).__name__,"
        "'gloo_hit': gloo_hit.state, 'gloo_notes': [str(n) for n in gloo_hit.notes + resumed.notes]}))",
    ]


@pytest.fixture(scope="module")
def notebook(tmp_path_factory):
    from nbclient import NotebookClient

    workdir = tmp_path_factory.mktemp("distributed")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in _cells()]
    nb.cells[0].source += "\nimport dreamer_magic\ndreamer_magic_status = dreamer_magic.last_status\n"
    client = NotebookClient(
        nb, kernel_name="python3", timeout=240, startup_timeout=120, allow_errors=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return nb, workdir


def _errors(cell) -> list[str]:
    """Tracebacks, and the one line IPython prints for a UsageError."""
    errors = [f"{o.ename}: {o.evalue}" for o in cell.outputs if o.output_type == "error"]
    return errors + [line for line in _text(cell, "stderr").splitlines() if line.startswith("UsageError: ")]


def _text(cell, name: str = "stdout") -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == name)


def _cell(nb, start: str, nth: int = 0):
    return [c for c in nb.cells if c.source.startswith(start)][nth]


@pytest.mark.timeout(300)
def test_two_processes_train_like_one_with_the_same_global_batch(notebook):
    nb, workdir = notebook
    failed = {i: _errors(c) for i, c in enumerate(nb.cells) if _errors(c) and "crash" not in c.source and "launched" not in c.source}
    assert not failed, failed
    seen = json.loads(_text(nb.cells[-1]))
    assert seen["full_trained"], "the kernel's model after the 2-process run holds the initial weights"
    assert seen["single_vs_full"], (seen["single_losses"], seen["full_losses"])
    assert len(seen["full_losses"]) == 6
    for (s1, a), (s2, b) in zip(seen["single_losses"], seen["full_losses"]):
        assert s1 == s2 and abs(a - b) < 1e-4
    out = workdir / "out" / "full"
    meta = json.loads((out / "trainer.json").read_text())
    assert meta["final_step"] == 6 and (out / "_model" / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "_checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    # the workers' prints reach the cell; a re-run is a hit in the kernel (no workers)
    full_cell = _cell(nb, "%%dreamer_train full")
    assert "'loss'" in _text(full_cell)
    assert seen["hit_state"] == "loaded from disk" and seen["kernel_is_full"]


@pytest.mark.timeout(300)
def test_a_killed_worker_stops_the_run_and_the_rerun_resumes_every_rank(notebook):
    nb, workdir = notebook
    seen = json.loads(_text(nb.cells[-1]))
    crashed = _cell(nb, "%%dreamer_train crash", 0)
    errors = _errors(crashed)
    assert errors and "worker 1 was killed (SIGKILL)" in errors[0], errors
    assert seen["crash_state"] == "failed"
    assert seen["crash_error"] == "failed at step 4: checkpoints kept, run again to resume" or seen["crash_error"].startswith(
        "failed at step 5"
    ), seen["crash_error"]
    assert not _errors(_cell(nb, "%%dreamer_train crash", 1))
    assert seen["resumed_state"] == "resumed from checkpoint-4"
    assert [s for s, _ in seen["resumed_losses"]] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(seen["resumed_losses"], seen["full_losses"]):
        assert abs(a - b) < 1e-5, (seen["resumed_losses"], seen["full_losses"])
    assert seen["crash_vs_full"]
    meta = json.loads((workdir / "out" / "crash" / "trainer.json").read_text())
    assert meta["attempts"] == 2 and meta["resumed_from"] == "checkpoint-4"


@pytest.mark.timeout(300)
def test_arguments_that_need_a_process_group_do_not_stop_a_hit(notebook):
    """`ddp_backend="gloo"` cannot be rebuilt in the kernel (no process group): the model still loads."""
    nb, workdir = notebook
    seen = json.loads(_text(nb.cells[-1]))
    assert seen["gloo_hit"] == "loaded from disk"
    assert any(n.startswith("`args` was not restored") and "process group" in n for n in seen["gloo_notes"]), seen["gloo_notes"]
    assert seen["crash_vs_full"]


@pytest.mark.timeout(300)
def test_checkpointer_resumes_each_rank_with_its_own_random_state(notebook):
    nb, workdir = notebook
    seen = json.loads(_text(nb.cells[-1]))
    assert seen["ck_state"] == "resumed from checkpoint-2", seen["ck_state"]
    for rank in (0, 1):
        full = [json.loads(line) for line in (workdir / f"draws-full-{rank}.jsonl").read_text().splitlines()]
        crash = [json.loads(line) for line in (workdir / f"draws-crash-{rank}.jsonl").read_text().splitlines()]
        assert [s for s, _ in full] == list(range(6))
        # the killed run drew steps 0-2 (rank 1 died after step 2); the resumed one steps 2-5 again from checkpoint-2
        resumed = {s: x for s, x in crash[-4:]}
        assert sorted(resumed) == [2, 3, 4, 5], crash
        assert all(abs(resumed[s] - x) < 1e-6 for s, x in full if s >= 2), (rank, full, crash)
    ck = workdir / "out" / "ck-crash" / "_checkpoints" / "checkpoint-2"
    assert (ck / "rng_state_1.safetensors").exists()
    assert seen["net_out"] == "Linear"


@pytest.mark.timeout(300)
def test_a_body_that_launches_its_own_processes_is_refused(notebook):
    nb, workdir = notebook
    errors = _errors(_cell(nb, "%%dreamer_train launched"))
    assert errors and "--processes" in errors[0] and "notebook_launcher" in errors[0], errors
    assert errors[0].startswith("UsageError")
    assert not (workdir / "out" / "launched" / "trainer.json").exists()


# -- in-process checks (an IPython shell; nothing trains) ------------------------------------------


def test_a_body_that_spawns_or_starts_training_processes_is_refused(ip, tmp_path):
    """torch.multiprocessing.spawn is refused before any process starts; a body whose own
    mp.Process did the work and trained nothing in the kernel commits nothing."""
    from IPython.core.error import UsageError

    ip.run_cell("import multiprocessing as mp, torch.multiprocessing as tmp\ndef work(*a):\n    pass\n")
    with pytest.raises(UsageError, match=r"--processes N.*train directly in the cell"):
        ip.run_cell_magic("dreamer_train", "spawned", "tmp.spawn(work, nprocs=2)\nresult = 1\n")
    with pytest.raises(UsageError, match=r"started processes of its own \(work\).*--processes N"):
        ip.run_cell_magic(
            "dreamer_train", "forked", "p = mp.get_context('fork').Process(target=work)\np.start(); p.join()\nresult = 1\n"
        )
    assert not list((tmp_path / "output").glob("*/trainer.json"))
    # a data loader's workers are no training processes of the body's own
    ip.run_cell_magic(
        "dreamer_train", "loader",
        "import torch\nloader = torch.utils.data.DataLoader(list(range(8)), batch_size=4, num_workers=1, "
        "multiprocessing_context='fork')\ntotal = sum(int(b.sum()) for b in loader)\n",
    )
    assert ip.user_ns["total"] == 28


def test_processes_must_be_a_count_and_cuda_must_be_untouched(ip, monkeypatch):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match="whole number of worker processes"):
        ip.run_cell_magic("dreamer_train", "bad --processes two", "x = 1\n")
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(UsageError, match=r"CUDA is already initialised in this kernel.*Restart the kernel"):
        ip.run_cell_magic("dreamer_train", "gpu --processes 2", "x = 1\n")


def test_a_hit_of_a_processes_trainer_keeps_cuda_untouched(ip, monkeypatch):
    """On a GPU machine rebuilding TrainingArguments sets CUDA up, which the next --processes cell
    needs untouched: the kernel leaves them out (noted) and loads the rest."""
    import torch

    from conftest import fresh_kernel

    body = "from transformers import TrainingArguments\nargs = TrainingArguments(output_dir='x', use_cpu=True, report_to=[])\nn = 3\n"
    ip.run_cell_magic("dreamer_train", "args-only", body)
    fresh_kernel(ip)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    ip.run_cell_magic("dreamer_train", "args-only --processes 2", body)
    status = ip._dreamer_magics._last_status
    assert status.state == "loaded from disk" and ip.user_ns["n"] == 3 and "args" not in ip.user_ns
    assert any(str(n).startswith("`args` was not restored in the kernel: building TrainingArguments would initialise CUDA")
               for n in status.notes), status.notes


def test_an_error_in_a_worker_is_one_line_and_the_traceback_is_printed(ip, tmp_path, capfd):
    from IPython.core.error import UsageError

    with pytest.raises(UsageError, match=r"^worker \d failed: NameError: name 'undefined_thing' is not defined; "
                                         r"the trainer 'broken' failed: nothing was saved, run again to start over"):
        ip.run_cell_magic("dreamer_train", "broken --processes 2", "result = undefined_thing + 1\n")
    assert "Traceback" in capfd.readouterr().err
    assert not (tmp_path / "output" / "broken").exists()
    assert ip.user_ns.get("result") is None


def test_rank_0_mirrors_to_the_remote_output_folder(ip, tmp_path):
    """With a remote output folder, rank 0 pushes the checkpoints and the finished trainer with a
    pusher of its own (the kernel's, copied by fork, has no thread) before its process ends."""
    bucket = tmp_path / "bucket"
    ip.run_line_magic("config", f"DreamerMagics.remote = 'file://{bucket}'")
    body = (
        "import torch, torch.distributed as dist\ndist.init_process_group('gloo')\nnet = torch.nn.Linear(2, 1)\n"
        "ckpt = Checkpointer(net, every=2, max_steps=2)\nfor step in range(ckpt.resume(), 2):\n    ckpt.step(step, loss=1.0)\n"
        "dist.destroy_process_group()\nw = net.weight.detach().clone()\n"
    )
    try:
        ip.run_cell_magic("dreamer_train", "mirrored --processes 2", body)
    finally:
        from dreamer_magic import remote

        remote.set_remote(None)
    assert ip._dreamer_magics._last_status.state == "ran"
    assert (bucket / "mirrored" / "trainer.json").exists()
    assert (bucket / "mirrored" / "_checkpoints" / "checkpoint-2" / "upload_complete.json").exists()
    assert (bucket / "mirrored" / "_checkpoints" / "checkpoint-2" / "rng_state_1.safetensors").exists()
