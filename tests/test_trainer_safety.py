"""Checkpoints and trainer metadata follow the rules of step outputs: no pickle runs when
``allow_pickle`` is off, ``trainer.json`` never loads another folder's model, and its ``class``
names only a model library's class."""

from __future__ import annotations

import json
import os

import pytest
from IPython.core.error import UsageError

from _run_trainer import lm_dataset, train_cell
from _tiny import same_weights, tiny_gpt2, weights
from conftest import fresh_kernel
from dreamer_magic.errors import PickleRefusedError
from dreamer_magic.hf_trainer import weights_only_loads
from dreamer_magic.status import RAN


class Payload:
    """Unpickling it creates a folder: the proof that a pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path, marker):
    import torch

    torch.save({"state": Payload(marker)}, path)


PLAIN = """
import os, torch
ckpt = Checkpointer(net, opt, every=5, max_steps=10)
for step in range(ckpt.resume(), 10):
    if step == int(os.environ.get("CRASH_AT") or -1):
        raise RuntimeError("crash")
    net(torch.randn(4, 3)).sum().backward(); opt.step(); opt.zero_grad()
    ckpt.step(step, loss=0.0)
"""


def test_checkpointer_resume_refuses_a_pickle_when_allow_pickle_is_off(ip, tmp_path, monkeypatch):
    import torch

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ip.user_ns.update(net=net, opt=torch.optim.SGD(net.parameters(), lr=0.1))
    monkeypatch.setenv("CRASH_AT", "7")
    with pytest.raises(RuntimeError, match="crash"):
        ip.run_cell_magic("dreamer_train", "loop", PLAIN)
    monkeypatch.delenv("CRASH_AT")
    marker = tmp_path / "PWNED"
    plant(tmp_path / "output/loop/_checkpoints/checkpoint-5/optimizer.pt", marker)
    killed_save = tmp_path / "output/loop/_checkpoints/.checkpoint-10.tmp-4242-0badc0de"  # a save that was killed
    killed_save.mkdir()
    ip.run_line_magic("config", "DreamerMagics.allow_pickle = False")
    with pytest.raises(UsageError, match=r"checkpoint-5/optimizer.pt .*full unpickle.*allow_pickle = True.*--no-resume"):
        ip.run_cell_magic("dreamer_train", "loop", PLAIN)
    assert not marker.exists()
    assert not killed_save.exists()  # the next run sweeps it, under the trainer's lock
    # the way on the message gives: train from the start
    ip.run_cell_magic("dreamer_train", "loop --no-resume", PLAIN)
    assert ip._dreamer_magics._last_status.state == RAN and not marker.exists()


def test_transformers_resume_loads_checkpoint_files_weights_only(tmp_path):
    import torch

    checkpoint = tmp_path / "checkpoint-5"
    checkpoint.mkdir()
    torch.save({"cpu": torch.arange(3)}, checkpoint / "optimizer.pt")
    plant(checkpoint / "rng_state.pth", tmp_path / "PWNED")
    with weights_only_loads(checkpoint):
        assert torch.load(checkpoint / "optimizer.pt", weights_only=False)["cpu"].tolist() == [0, 1, 2]
        with pytest.raises(PickleRefusedError, match="checkpoint-5/rng_state.pth"):
            torch.load(str(checkpoint / "rng_state.pth"), weights_only=False)
    assert not (tmp_path / "PWNED").exists()
    assert torch.load.__name__ == "load" and not hasattr(torch.load, "__wrapped__")  # put back


def test_a_transformers_trainer_does_not_resume_through_a_pickle(ip, tmp_path, monkeypatch):
    model, tok = tiny_gpt2()
    ip.user_ns.update(model=model, tok=tok, train_ds=lm_dataset(tok, n=16))
    cell = train_cell(max_steps=6, save_steps=3)
    monkeypatch.setenv("CRASH_AT", "4")
    with pytest.raises(RuntimeError, match="crash at step 4"):
        ip.run_cell_magic("dreamer_train", "sft", cell)
    monkeypatch.delenv("CRASH_AT")
    marker = tmp_path / "PWNED"
    plant(tmp_path / "output/sft/_checkpoints/checkpoint-3/rng_state.pth", marker)
    ip.run_line_magic("config", "DreamerMagics.allow_pickle = False")
    with pytest.raises(UsageError, match=r"checkpoint-3/rng_state.pth .*allow_pickle = True"):
        ip.run_cell_magic("dreamer_train", "sft", cell)
    assert not marker.exists()


MAKE = """
from _tiny import tiny_gpt2
model, _ = tiny_gpt2(seed=SEED)
"""


def test_trainer_json_cannot_point_at_another_model_or_name_any_class(ip, tmp_path):
    ip.run_cell_magic("dreamer_train", "mine", MAKE.replace("SEED", "1"))
    mine = weights(ip.user_ns["model"])
    ip.run_cell_magic("dreamer_train", "other", MAKE.replace("SEED", "2"))
    meta_path = tmp_path / "output/mine/trainer.json"
    meta = json.loads(meta_path.read_text())
    good = dict(meta["outputs"]["model"])

    for path in ["../other/_model", str(tmp_path / "output/other/_model")]:
        meta["outputs"]["model"] = {**good, "path": path}
        meta_path.write_text(json.dumps(meta))
        fresh_kernel(ip)
        ip.run_cell_magic("dreamer_train", "mine", MAKE.replace("SEED", "1"))
        status = ip._dreamer_magics._last_status
        assert status.state == RAN and any("outside" in str(r) for r in status.reasons), status.reasons
        assert same_weights(weights(ip.user_ns["model"]), mine)  # its own model, never the other one
        meta = json.loads(meta_path.read_text())
        good = dict(meta["outputs"]["model"])

    for cls in ["os:system", "subprocess:Popen", "never_imported_module:Model", "__main__:Evil"]:
        meta["outputs"]["model"] = {**good, "class": cls}
        meta_path.write_text(json.dumps(meta))
        fresh_kernel(ip)
        ip.run_cell("class Evil:\n    @classmethod\n    def from_pretrained(cls, path):\n        raise SystemExit('ran')\n")
        with pytest.raises(UsageError, match="not a class of a library that saves models"):
            ip.run_cell_magic("dreamer_train", "mine", MAKE.replace("SEED", "1"))
