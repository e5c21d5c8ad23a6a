"""Run one ``%%dreamer_train`` cell with a tiny GPT-2 in a fresh process (a stand-in for a kernel).

Usage: python _run_trainer.py OUTPUT_FOLDER LOSS_FILE [KILL_AT_STEP] [KILL_WHILE_SAVING_STEP]

The cell trains for ``MAX_STEPS`` steps, saving every ``SAVE_STEPS``; each loss is appended
to LOSS_FILE as it is logged. ``KILL_AT_STEP`` > 0 SIGKILLs the process after that many steps
(the checkpoints before were written); ``KILL_WHILE_SAVING_STEP`` > 0 SIGKILLs it in
the middle of writing that checkpoint (weights and optimizer written, trainer_state.json
not). The last line printed is the status as JSON.

Also importable: :func:`lm_dataset` and :data:`TRAIN_CELL` are shared with test_trainers.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

MAX_STEPS = 40
SAVE_STEPS = 10

TRAIN_CELL = """
import json, os, signal
from transformers import Trainer, TrainerCallback, TrainingArguments

class LossLog(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and os.environ.get("LOSS_FILE"):
            with open(os.environ["LOSS_FILE"], "a") as f:
                f.write(json.dumps([state.global_step, logs["loss"]]) + "\\n")
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT") or -1):
            os.kill(os.getpid(), signal.SIGKILL)
        if state.global_step == int(os.environ.get("CRASH_AT") or -1):
            raise RuntimeError(f"crash at step {state.global_step}")

args = TrainingArguments(output_dir="anything", max_steps=MAX_STEPS_, save_steps=SAVE_STEPS_, logging_steps=1,
                         per_device_train_batch_size=4, learning_rate=1e-3, seed=1, disable_tqdm=True,
                         use_cpu=True, report_to="none", dataloader_num_workers=0)
trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok, callbacks=[LossLog()])
trainer.train()
"""


def train_cell(max_steps: int = MAX_STEPS, save_steps: int = SAVE_STEPS, lr: str = "1e-3") -> str:
    """The training cell, with the number of steps, checkpoint interval and learning rate filled in."""
    return (
        TRAIN_CELL.replace("MAX_STEPS_", str(max_steps))
        .replace("SAVE_STEPS_", str(save_steps))
        .replace("learning_rate=1e-3", f"learning_rate={lr}")
    )


def lm_dataset(tokenizer, n: int = 64, length: int = 16, offset: int = 0):
    """A deterministic causal-LM dataset (input_ids, attention_mask, labels) of ``n`` short lines."""
    import datasets

    from _tiny import CORPUS

    texts = [f"{i + offset} {CORPUS[(i + offset) % len(CORPUS)]}" for i in range(n)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length)
    return datasets.Dataset.from_dict(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": enc["input_ids"]}
    )


def status_json(status) -> dict:
    return {
        "state": status.state,
        "resumed_from": status.resumed_from,
        "skipped": list(status.skipped_checkpoints),
        "step": status.step,
        "checkpoints": [c.name for c in status.checkpoints],
        "notes": list(status.notes),
        "error": status.error,
    }


def main() -> None:
    output, loss_file = sys.argv[1:3]
    kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    kill_while_saving = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    os.environ["LOSS_FILE"] = loss_file
    os.environ["KILL_AT"] = str(kill_at or -1)

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from _tiny import tiny_gpt2

    if kill_while_saving:
        from transformers import Trainer

        save_rng_state = Trainer._save_rng_state

        def dying_save_rng_state(self, output_dir):
            if self.state.global_step == kill_while_saving:
                os.kill(os.getpid(), __import__("signal").SIGKILL)
            return save_rng_state(self, output_dir)

        Trainer._save_rng_state = dying_save_rng_state

    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "dreamer_magic")
    ip.run_line_magic("dreamer", f"output {output}")
    model, tok = tiny_gpt2(seed=0)
    ip.user_ns.update(model=model, tok=tok, train_ds=lm_dataset(tok))
    ip.run_cell_magic("dreamer_train", "sft-small", train_cell())
    line = json.dumps(status_json(ip._dreamer_magics._last_status)) + "\n"
    os.write(1, line.encode())  # one write() per line: ranks share stdout, and lines stay whole


if __name__ == "__main__":
    main()
