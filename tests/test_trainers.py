"""``%%dreamer_train``: checkpoints, resume after a crash, instant reload, backups (SPEC §4, §6).

Every test trains a tiny GPT-2 (2 layers, 32 dimensions, built locally: no model hub) or a
tiny PyTorch module on CPU for a few dozen steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from _run_trainer import lm_dataset, train_cell
from _tiny import logged, same_weights, tiny_gpt2, weights
from conftest import fresh_kernel
from dreamer_magic import trainers
from dreamer_magic.errors import DreamerError
from dreamer_magic.status import FAILED, LOADED, RAN, RESTORED, resumed_from

HERE = Path(__file__).parent


def inputs(ip, *, seed: int = 0, offset: int = 0) -> None:
    """What the notebook's earlier cells define: a fresh tiny GPT-2, its tokenizer, a dataset."""
    model, tok = tiny_gpt2(seed=seed)
    ip.user_ns.update(model=model, tok=tok, train_ds=lm_dataset(tok, offset=offset))


def train(ip, line: str, cell: str):
    ip.run_cell_magic("dreamer_train", line, cell)
    return ip._dreamer_magics._last_status


@pytest.fixture
def loss_file(tmp_path, monkeypatch):
    path = tmp_path / "losses.jsonl"
    monkeypatch.setenv("LOSS_FILE", str(path))
    monkeypatch.delenv("KILL_AT", raising=False)
    monkeypatch.delenv("CRASH_AT", raising=False)
    return path


# -- the whole life of a trainer ----------------------------------------------------------------


def test_trains_redirects_checkpoints_saves_model_and_reloads_in_a_new_kernel(ip, tmp_path, loss_file):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from dreamer_magic import render

    inputs(ip)
    tok_class = type(ip.user_ns["tok"])
    cell = train_cell(max_steps=20, save_steps=10)
    status = train(ip, "sft-small", cell)

    folder = tmp_path / "output" / "sft-small"
    assert status.state == RAN
    # checkpoints go to _checkpoints whatever output_dir says, and the status says so
    assert sorted(p.name for p in (folder / "_checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-20"]
    assert not (tmp_path / "anything").exists()
    assert any("'anything' redirected to" in n and str(folder / "_checkpoints") in n for n in status.notes)
    assert ip.user_ns["args"].output_dir == "anything"  # the user's object is untouched
    # _model: model, tokenizer, training_args.json and the other metadata; trainer.json last
    model_dir = folder / "_model"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "training_args.json", "trainer_state.json", "metrics.json"):
        assert (model_dir / name).is_file(), name
    meta = json.loads((folder / "trainer.json").read_text())
    assert meta["fingerprint"] == status.fingerprint and meta["final_step"] == 20
    assert (folder / "trainer.json").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in model_dir.iterdir())
    assert not (folder / ".in-progress.json").exists()
    assert json.loads((model_dir / "training_args.json").read_text())["max_steps"] == 20
    assert len(json.loads((model_dir / "trainer_state.json").read_text())["log_history"]) >= 20
    # the _model folder needs nothing from this package
    assert type(GPT2LMHeadModel.from_pretrained(model_dir)) is GPT2LMHeadModel
    assert AutoTokenizer.from_pretrained(model_dir).pad_token == "<pad>"
    # the live status: progress, losses, checkpoints, model
    assert (status.step, status.max_steps) == (20, 20)
    assert [s for s, _ in status.losses] == list(range(1, 21))
    assert [c.name for c in status.checkpoints] == ["checkpoint-10", "checkpoint-20"]
    assert status.model_path == str(model_dir)
    trained = weights(ip.user_ns["model"])
    assert len(logged(loss_file)) == 20

    # the same kernel, the same cell: the trained `model` is recognised as this trainer's own output
    again = train(ip, "sft-small", cell)
    assert again.state == LOADED

    # a new kernel re-running the notebook: the body does not run, the variables come back
    fresh_kernel(ip)
    inputs(ip)
    hit = train(ip, "sft-small", cell)
    assert hit.state == LOADED
    assert len(logged(loss_file)) == 20  # no training happened
    assert type(ip.user_ns["model"]) is GPT2LMHeadModel
    assert same_weights(weights(ip.user_ns["model"]), trained)
    assert type(ip.user_ns["tok"]) is tok_class
    assert ip.user_ns["args"].max_steps == 20 and ip.user_ns["args"].output_dir == "anything"
    assert "trainer" not in ip.user_ns and any("`trainer`" in n and "not saved" in n for n in hit.notes)
    assert "LossLog" in ip.user_ns  # class statements are re-run
    assert (hit.step, hit.max_steps) == (20, 20) and len(hit.losses) == 20
    assert [c.name for c in hit.checkpoints] == ["checkpoint-10", "checkpoint-20"]
    assert hit.saved is not None
    text = render.status_text(hit)
    assert "loaded from disk" in text and "checkpoint-20" in text and "step 20/20" in text
    assert "<svg" in render.status_html(hit)  # the loss curve

    # and once more after the hit, in the same kernel; `%dreamer why` agrees
    assert train(ip, "sft-small", cell).state == LOADED
    saved = json.loads((folder / "trainer.json").read_text())
    hidden = ip._dreamer_magics._hidden_names()
    assert trainers.explain("sft-small", cell, ip.user_ns, saved, None, exclude=hidden)[0].startswith("nothing changed")
    changed = train_cell(max_steps=20, save_steps=10, lr="2e-3")
    assert any("learning_rate" in r for r in trainers.explain("sft-small", changed, ip.user_ns, saved, None, exclude=hidden))


def test_changed_cell_or_data_backs_up_and_reverting_restores_without_training(ip, tmp_path, loss_file):
    cell = train_cell(max_steps=10, save_steps=10)
    inputs(ip)
    first = train(ip, "sft-small", cell)
    first_weights = weights(ip.user_ns["model"])
    assert first.state == RAN

    # the learning rate changes; the model variable still holds the weights trained above
    changed = train(ip, "sft-small", train_cell(max_steps=10, save_steps=10, lr="5e-4"))
    assert changed.state == RAN
    assert any("code changed" in r and "learning_rate" in r for r in changed.reasons)
    backup = tmp_path / "output" / "_backups" / "sft-small" / first.fingerprint
    assert (backup / "trainer.json").is_file() and (backup / "_checkpoints" / "checkpoint-10").is_dir()
    assert any("already holds weights this trainer trained" in n for n in changed.notes)

    # reverting restores the first folder: no training
    n_logged = len(logged(loss_file))
    reverted = train(ip, "sft-small", cell)
    assert reverted.state == RESTORED
    assert len(logged(loss_file)) == n_logged
    assert same_weights(weights(ip.user_ns["model"]), first_weights)

    # the training data is an input like any other
    inputs(ip, offset=1)
    other_data = train(ip, "sft-small", cell)
    assert other_data.state == RAN
    assert "input `train_ds` changed" in other_data.reasons


# -- crashes and resuming -----------------------------------------------------------------------


def test_resumes_after_a_failure_skipping_a_truncated_checkpoint(ip, tmp_path, loss_file, monkeypatch):
    from transformers import Trainer

    original_init, original_train = Trainer.__dict__["__init__"], Trainer.__dict__["train"]
    inputs(ip)
    cell = train_cell(max_steps=30, save_steps=10)
    monkeypatch.setenv("CRASH_AT", "25")
    with pytest.raises(RuntimeError, match="crash at step 25"):
        train(ip, "sft-small", cell)
    failed = ip._dreamer_magics._last_status
    assert failed.state == FAILED and "run the cell again to resume" in failed.error
    # the patches are undone even on error
    assert Trainer.__dict__["__init__"] is original_init and Trainer.__dict__["train"] is original_train
    folder = tmp_path / "output" / "sft-small"
    assert (folder / ".in-progress.json").is_file() and not (folder / "trainer.json").exists()
    checkpoints = folder / "_checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-20"]

    # the newest checkpoint lost its weights: training resumes from the one before
    (checkpoints / "checkpoint-20" / "model.safetensors").unlink()
    monkeypatch.delenv("CRASH_AT")
    status = train(ip, "sft-small", cell)
    assert status.state == resumed_from("checkpoint-10") == "resumed from checkpoint-10"
    assert status.resumed_from == "checkpoint-10"
    assert status.skipped_checkpoints == ["checkpoint-20"]
    assert any("checkpoint-20" in n and "model" in n for n in status.notes)
    assert any("did not finish" in r for r in status.reasons)
    assert [s for s, _ in status.losses] == list(range(1, 31))  # the curve includes the part before
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30"]
    meta = json.loads((folder / "trainer.json").read_text())
    assert meta["final_step"] == 30 and meta["resumed_from"] == "checkpoint-10"
    assert not (folder / ".in-progress.json").exists()


def test_sigkilled_training_resumes_with_the_losses_of_an_uninterrupted_run(tmp_path):
    """A real process is SIGKILLed after a checkpoint, then while writing one; each re-run resumes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    script = str(HERE / "_run_trainer.py")

    def run(output: Path, losses: Path, kill_at: int = 0, kill_while_saving: int = 0) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, script, str(output), str(losses), str(kill_at), str(kill_while_saving)],
            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )

    def last_status(proc: subprocess.CompletedProcess) -> dict:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    output, losses = tmp_path / "output", tmp_path / "losses.jsonl"
    # 1. killed after 25 steps: checkpoint-10 and checkpoint-20 are on disk
    first = run(output, losses, kill_at=25)
    assert first.returncode == -9, first.stderr[-3000:]
    checkpoints = output / "sft-small" / "_checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-20"]
    # 2. re-run: resumes from checkpoint-20; killed while writing checkpoint-30
    second = run(output, losses, kill_while_saving=30)
    assert second.returncode == -9, second.stderr[-3000:]
    assert (checkpoints / "checkpoint-30" / "model.safetensors").exists()
    assert not (checkpoints / "checkpoint-30" / "trainer_state.json").exists()
    # 3. re-run: the half-written checkpoint-30 is skipped; resumes from checkpoint-20 and finishes
    third = last_status(run(output, losses))
    assert third["state"] == "resumed from checkpoint-20"
    assert third["skipped"] == ["checkpoint-30"]
    assert any("skipped checkpoint-30" in n and "trainer_state.json" in n for n in third["notes"])
    assert third["step"] == 40 and (output / "sft-small" / "trainer.json").is_file()
    # an uninterrupted run with the same seed, elsewhere
    reference_losses = tmp_path / "reference.jsonl"
    reference = last_status(run(tmp_path / "reference", reference_losses))
    assert reference["state"] == "ran" and reference["resumed_from"] is None
    expected = {step: loss for step, loss in logged(reference_losses)}
    assert sorted(expected) == list(range(1, 41))

    runs = [[], [], []]  # the loss lines of each attempt (steps restart after each resume)
    attempt, previous = 0, 0
    for step, loss in logged(losses):
        if step <= previous:
            attempt += 1
        runs[attempt].append((step, loss))
        previous = step
    assert [s for s, _ in runs[0]] == list(range(1, 26))
    assert [s for s, _ in runs[1]] == list(range(21, 31))
    assert [s for s, _ in runs[2]] == list(range(21, 41))
    for step, loss in runs[0] + runs[1] + runs[2]:
        assert loss == expected[step], (step, loss, expected[step])


# -- options ------------------------------------------------------------------------------------


def test_no_resume_force_and_version(ip, tmp_path, loss_file, monkeypatch):
    cell = train_cell(max_steps=10, save_steps=5)
    backups = tmp_path / "output" / "_backups" / "sft-small"
    inputs(ip)
    monkeypatch.setenv("CRASH_AT", "7")
    with pytest.raises(RuntimeError):
        train(ip, "sft-small", cell)
    monkeypatch.delenv("CRASH_AT")

    # --no-resume starts over; the old checkpoints are kept in _backups
    inputs(ip)  # `model` holds half-trained weights: rebuild it, as a user re-runs the cell that builds it
    status = train(ip, "sft-small --no-resume", cell)
    assert status.state == RAN and status.resumed_from is None
    assert status.reasons == ["--no-resume: starting over"]
    assert [s for s, _ in status.losses] == list(range(1, 11))
    kept = [p for p in backups.iterdir() if p.name.startswith("incomplete-")]
    assert len(kept) == 1 and (kept[0] / "_checkpoints" / "checkpoint-5").is_dir()
    assert any("kept in" in n for n in status.notes)
    fp = status.fingerprint

    # --force retrains and keeps the finished folder in _backups/<fingerprint>
    inputs(ip)
    forced = train(ip, "sft-small --force", cell)
    assert forced.state == RAN and forced.reasons == ["--force"] and forced.fingerprint == fp
    assert (backups / fp / "trainer.json").is_file()

    # --version is part of the fingerprint
    inputs(ip)
    versioned = train(ip, "sft-small --version v2", cell)
    assert versioned.state == RAN and versioned.fingerprint != fp
    assert any("--version" in r for r in versioned.reasons)
    inputs(ip)
    assert train(ip, "sft-small --version v2", cell).state == LOADED


# -- plain PyTorch loops ------------------------------------------------------------------------

PLAIN_CELL = """
import os, torch
ckpt = Checkpointer(net, opt, sched, every=5, max_steps=20)
for step in range(ckpt.resume(), 20):
    if step == int(os.environ.get("CRASH_AT") or -1):
        raise RuntimeError("crash")
    x = torch.randn(8, 4)
    loss = ((net(torch.nn.functional.dropout(x, 0.2)) - x.sum(1, keepdim=True)) ** 2).mean()
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()
    ckpt.step(step, loss=loss)
    with open(os.environ["LOSS_FILE"], "a") as f:
        f.write(f"[{step}, {loss.item()!r}]\\n")
"""


def plain_inputs(ip) -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
    ip.user_ns.update(net=net, opt=opt, sched=sched)


def test_checkpointer_resumes_a_plain_pytorch_loop_exactly(ip, tmp_path, loss_file, monkeypatch):
    import torch

    # an uninterrupted run, in another output folder
    ip.run_line_magic("dreamer", f"output {tmp_path / 'reference'}")
    plain_inputs(ip)
    torch.manual_seed(123)
    assert train(ip, "plain", PLAIN_CELL).state == RAN
    expected = dict(logged(loss_file))
    reference_weights = weights(ip.user_ns["net"])
    loss_file.unlink()

    ip.run_line_magic("dreamer", f"output {tmp_path / 'output'}")
    plain_inputs(ip)
    torch.manual_seed(123)
    monkeypatch.setenv("CRASH_AT", "12")
    with pytest.raises(RuntimeError):
        train(ip, "plain", PLAIN_CELL)
    checkpoints = tmp_path / "output" / "plain" / "_checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    monkeypatch.delenv("CRASH_AT")
    torch.manual_seed(999)  # the RNG state comes from the checkpoint, not from here
    status = train(ip, "plain", PLAIN_CELL)
    assert status.state == "resumed from checkpoint-10"
    resumed = logged(loss_file)[12:]
    assert [s for s, _ in resumed] == list(range(10, 20))
    assert all(loss == expected[step] for step, loss in resumed)
    assert same_weights(weights(ip.user_ns["net"]), reference_weights)
    assert [c.name for c in status.checkpoints] == ["checkpoint-5", "checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert len(status.losses) == 20 and (status.step, status.max_steps) == (20, 20)
    assert "Checkpointer" not in ip.user_ns  # only defined while the cell runs

    # a new kernel: the trained weights are loaded into the (untrained) module in place
    fresh_kernel(ip)
    plain_inputs(ip)
    untrained = ip.user_ns["net"]
    hit = train(ip, "plain", PLAIN_CELL)
    assert hit.state == LOADED
    assert ip.user_ns["net"] is untrained and same_weights(weights(untrained), reference_weights)
    assert "ckpt" not in ip.user_ns and any("`ckpt`" in n for n in hit.notes)
    assert any("`f` (TextIOWrapper) could not be saved" in n for n in hit.notes)


def test_checkpointer_outside_a_trainer_cell(tmp_path):
    import random

    import numpy as np
    import torch

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(DreamerError, match="folder"):
        trainers.Checkpointer(net, opt)
    ckpt = trainers.Checkpointer(net, opt, every=2, keep=2, folder=tmp_path / "ckpts")
    assert ckpt.resume() == 0
    for step in range(6):
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        ckpt.step(step, loss=float(step))
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["checkpoint-4", "checkpoint-6"]  # keep=2
    after = (torch.rand(3), np.random.rand(), random.random())
    saved = weights(net)

    torch.manual_seed(1)
    other = torch.nn.Linear(3, 2)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    again = trainers.Checkpointer(other, other_opt, every=2, folder=tmp_path / "ckpts")
    assert again.resume() == 6
    assert same_weights(weights(other), saved)
    assert other_opt.state_dict()["state"][0]["momentum_buffer"] is not None
    assert [e["step"] for e in again.log_history] == [1, 2, 3, 4, 5, 6]
    restored = (torch.rand(3), np.random.rand(), random.random())  # the RNGs continue where they were
    assert torch.equal(after[0], restored[0]) and after[1:] == restored[1:]


def test_every_validated():
    with pytest.raises(DreamerError, match="every"):
        trainers.Checkpointer(object(), every=0, folder="x")


# -- checkpoint validation ----------------------------------------------------------------------


def _fake_checkpoint(path: Path, step: int) -> Path:
    import torch
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"w": torch.zeros(4)}, str(path / "model.safetensors"))
    torch.save({"state": {}}, path / "optimizer.pt")
    torch.save({"last_epoch": step}, path / "scheduler.pt")
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return path


def test_check_checkpoint_finds_what_is_missing_or_truncated(tmp_path):
    ok = _fake_checkpoint(tmp_path / "checkpoint-5", 5)
    assert trainers.check_checkpoint(ok) is None

    def broken(name: str, damage) -> str | None:
        path = _fake_checkpoint(tmp_path / name / "checkpoint-5", 5)
        damage(path)
        return trainers.check_checkpoint(path)

    assert "trainer_state.json is missing" in broken("a", lambda p: (p / "trainer_state.json").unlink())
    assert "corrupt" in broken("b", lambda p: (p / "trainer_state.json").write_text('{"global_st'))
    assert "weights are missing" in broken("c", lambda p: (p / "model.safetensors").unlink())

    def truncate(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 7])

    assert "model.safetensors is truncated" in broken("d", lambda p: truncate(p / "model.safetensors"))
    assert "optimizer.pt is truncated" in broken("e", lambda p: truncate(p / "optimizer.pt"))
    assert "optimizer" in broken("f", lambda p: (p / "optimizer.pt").unlink())
    assert "step 7" in broken("g", lambda p: (p / "trainer_state.json").write_text('{"global_step": 7}'))
    assert trainers.check_checkpoint(tmp_path / "c" / "checkpoint-5", need_optimizer=False) is not None

    # the latest complete one is chosen; the newer broken one is reported and moved aside
    folder = tmp_path / "run"
    _fake_checkpoint(folder / "checkpoint-10", 10)
    (_fake_checkpoint(folder / "checkpoint-20", 20) / "trainer_state.json").unlink()
    from dreamer_magic.status import Status

    status = Status(kind="trainer", name="t")
    assert trainers.latest_checkpoint(folder, status=status) == folder / "checkpoint-10"
    assert status.skipped_checkpoints == ["checkpoint-20"]
    assert not (folder / "checkpoint-20").exists() and (folder / ".skipped-checkpoint-20").is_dir()


# -- distributed runs ---------------------------------------------------------------------------


def test_is_main_process_reads_the_rank(monkeypatch):
    for var in ("RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert trainers.is_main_process()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not trainers.is_main_process()
    monkeypatch.setenv("RANK", "0")  # the global rank wins
    assert trainers.is_main_process()
    monkeypatch.setenv("RANK", "3")
    assert not trainers.is_main_process()


def test_only_the_main_process_writes_the_trainer_folder(ip, tmp_path, loss_file, monkeypatch):
    """A non-main process (RANK=1) trains but writes no _model, trainer.json, marker or checkpoint."""
    monkeypatch.setenv("RANK", "1")
    plain_inputs(ip)
    status = train(ip, "plain", PLAIN_CELL)
    assert status.state == RAN
    assert len(logged(loss_file)) == 20
    assert any("not the main process" in n for n in status.notes)
    folder = tmp_path / "output" / "plain"
    assert not (folder / "trainer.json").exists() and not (folder / "_model").exists()
    assert not (folder / ".in-progress.json").exists()
    assert not (folder / "_checkpoints").exists() or not any((folder / "_checkpoints").iterdir())

    monkeypatch.setenv("RANK", "0")
    plain_inputs(ip)
    assert train(ip, "plain", PLAIN_CELL).state == RAN
    assert (folder / "trainer.json").is_file() and (folder / "_model" / "net.safetensors").is_file()


def status_lines(text: str) -> list[dict]:
    """The status objects the ranks printed (found anywhere: two ranks share one stdout)."""
    decoder, found = json.JSONDecoder(), []
    start = text.find('{"state"')
    while start != -1:
        obj, end = decoder.raw_decode(text, start)
        found.append(obj)
        start = text.find('{"state"', end)
    return found


def test_two_processes_with_gloo_only_rank_0_saves(tmp_path):
    """A real distributed run: ``torchrun`` with 2 CPU processes (gloo); then both load the result."""
    import torch.distributed

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)

    def torchrun() -> list[dict]:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(port), str(HERE / "_run_trainer.py"), str(tmp_path / "output"), str(tmp_path / "l.jsonl")],
            env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return status_lines(proc.stdout)

    first = torchrun()
    assert sorted(s["state"] for s in first) == ["ran", "ran"]
    non_main = [s for s in first if any("not the main process" in n for n in s["notes"])]
    assert len(non_main) == 1 and non_main[0]["checkpoints"] == []
    folder = tmp_path / "output" / "sft-small"
    assert (folder / "trainer.json").is_file() and (folder / "_model" / "model.safetensors").is_file()
    assert (folder / "_checkpoints" / "checkpoint-40" / "rng_state_1.pth").is_file()  # transformers' per-rank file
    assert not (folder / ".in-progress.json").exists()
    assert not (tmp_path / "_model").exists() and not (tmp_path / "anything").exists()

    again = torchrun()
    assert [s["state"] for s in again] == ["loaded from disk", "loaded from disk"]


def test_a_logging_dir_under_output_dir_is_redirected_too(ip, tmp_path):
    """transformers 4.x derives logging_dir from output_dir; nothing may land outside the output folder."""
    inputs(ip)
    cell = train_cell(max_steps=2, save_steps=2)
    cell = cell.replace("\ntrainer = ", "\nargs.logging_dir = 'anything/runs/today'\ntrainer = ", 1)
    assert "args.logging_dir" in cell
    status = train(ip, "logs", cell)
    assert status.state == "ran"
    trainer_args = ip.user_ns["trainer"].args
    assert trainer_args.logging_dir == str(tmp_path / "output" / "logs" / "_checkpoints" / "runs" / "today")
    assert ip.user_ns["args"].logging_dir == "anything/runs/today", "the user's object is untouched"
    assert not (tmp_path / "anything").exists()


def test_validation_loss_reaches_the_card_and_comes_back_on_a_hit(ip, tmp_path):
    """An evaluating Trainer's eval_loss is drawn beside the training loss and kept in trainer.json."""
    from _tiny import tiny_gpt2

    model, tok = tiny_gpt2()
    ip.user_ns.update(model=model, tok=tok)
    cell = (
        "from datasets import Dataset\n"
        "from transformers import Trainer, TrainingArguments, DataCollatorForLanguageModeling\n"
        "ds = Dataset.from_dict({'text': ['a b c d e f'] * 8}).map(lambda b: tok(b['text']), batched=True, remove_columns=['text'])\n"
        "args = TrainingArguments(output_dir='ignored', max_steps=4, eval_strategy='steps', eval_steps=2, logging_steps=1,\n"
        "                         per_device_train_batch_size=4, save_steps=4, use_cpu=True)\n"
        "trainer = Trainer(model=model, args=args, train_dataset=ds, eval_dataset=ds,\n"
        "                  data_collator=DataCollatorForLanguageModeling(tok, mlm=False))\n"
        "trainer.train()\n"
    )
    ip.run_cell_magic("dreamer_train", "with-eval", cell)
    status = ip._dreamer_magics._last_status
    assert [s for s, _ in status.eval_losses] == [2, 4], status.eval_losses
    meta = json.loads((tmp_path / "output" / "with-eval" / "trainer.json").read_text())
    assert [s for s, _ in meta["eval_losses"]] == [2, 4]
    ip.run_cell_magic("dreamer_train", "with-eval", cell)
    hit = ip._dreamer_magics._last_status
    assert hit.state == "loaded from disk" and hit.eval_losses == status.eval_losses
