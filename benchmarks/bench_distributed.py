"""Benchmark ``%%dreamer_train NAME --processes 2`` with a tiny GPT-2 on CPU (gloo; no model hub).

Prints medians [min-max] of interleaved rounds, and the ratio between the peers of each round:

1. The magic's overhead on a 200-step, 2-process training run (fingerprint, fork, status stream,
   rank 0 saving ``_model``, the kernel reloading it) versus the same cell body launched without
   the magic by accelerate's ``notebook_launcher`` (2 processes, the same one thread per worker,
   the same checkpoints). Target: under 5%.
2. The time the kernel takes to reload ``_model`` after the workers finish (the load that gives
   later cells the trained model), beside the whole run.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_distributed.py [--rounds 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

CELL = """
from transformers import Trainer, TrainingArguments
args = TrainingArguments(output_dir=OUTPUT_DIR, max_steps=STEPS, save_steps=SAVE, logging_steps=10,
                         per_device_train_batch_size=4, learning_rate=1e-3, seed=1, disable_tqdm=True,
                         use_cpu=True, report_to="none", ddp_find_unused_parameters=False)
trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok)
trainer.train()
"""


def cell(steps: int, output_dir: str) -> str:
    return CELL.replace("OUTPUT_DIR", repr(output_dir)).replace("STEPS", str(steps)).replace("SAVE", str(max(1, steps // 4)))


def shell(output: Path):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from _run_trainer import lm_dataset
    from _tiny import tiny_gpt2

    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "dreamer_magic")
    with contextlib.redirect_stdout(io.StringIO()):
        ip.run_line_magic("dreamer", f"output {output}")
    model, tok = tiny_gpt2(seed=0)
    ip.user_ns.update(model=model, tok=tok, train_ds=lm_dataset(tok))
    return ip


def launched_without_the_magic(source: str, namespace: dict) -> None:
    """The same body in 2 processes through accelerate's notebook_launcher (what a user would write)."""
    from accelerate import notebook_launcher

    def train() -> None:
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)  # as the magic's workers: the kernel's OpenMP pool does not survive fork
        exec(source, dict(namespace))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notebook_launcher(train, num_processes=2, use_port=str(port))


@contextlib.contextmanager
def quiet():
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def timed(fn) -> float:
    t0 = time.perf_counter()
    with quiet():
        fn()
    return time.perf_counter() - t0


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.2f} s [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200)
    opts = parser.parse_args()

    import torch  # noqa: F401
    import transformers  # noqa: F401

    from dreamer_magic import distributed

    reloads: list[float] = []
    original_reload = distributed._reload

    def timed_reload(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original_reload(*args, **kwargs)
        finally:
            reloads.append(time.perf_counter() - t0)

    distributed._reload = timed_reload
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)
        try:
            ip = shell(root / "output")
            with quiet():  # warm-up, not counted: first imports (accelerate's launcher, gloo) for both
                launched_without_the_magic(cell(10, str(root / "warm")), ip.user_ns)
                ip.run_cell_magic("dreamer_train", "warm --processes 2", cell(10, "x"))
            reloads.clear()
            magic, plain = [], []
            for i in range(opts.rounds):  # interleaved: a load change on the machine hits both alike
                plain_source = cell(opts.steps, str(root / f"plain-{i}"))
                plain.append(timed(lambda: launched_without_the_magic(plain_source, ip.user_ns)))
                magic.append(timed(lambda: ip.run_cell_magic("dreamer_train", f"run-{i} --processes 2", cell(opts.steps, "x"))))
                assert ip._dreamer_magics._last_status.state == "ran", ip._dreamer_magics._last_status
        finally:
            os.chdir(cwd)
    ratios = [m / p for m, p in zip(magic, plain)]
    print(f"{opts.steps}-step training run, 2 processes (gloo, CPU), tiny GPT-2, {opts.rounds} interleaved rounds:")
    print(f"  notebook_launcher, no magic      {spread(plain)}")
    print(f"  %%dreamer_train --processes 2    {spread(magic)}")
    print(f"  overhead = {(statistics.median(magic) / statistics.median(plain) - 1) * 100:+.1f}% of the medians; "
          f"{(statistics.median(ratios) - 1) * 100:+.1f}% median of per-round ratios "
          f"[{(min(ratios) - 1) * 100:+.1f}%..{(max(ratios) - 1) * 100:+.1f}%] (target < 5%)")
    print(f"  kernel reload of _model after the workers: {statistics.median(reloads) * 1000:.0f} ms "
          f"[{min(reloads) * 1000:.0f}-{max(reloads) * 1000:.0f}] "
          f"({statistics.median(reloads) / statistics.median(magic) * 100:.1f}% of the run)")


if __name__ == "__main__":
    main()
