"""Benchmark ``%%dreamer_train`` with a tiny GPT-2 on CPU (no model hub).

Prints medians of repeats and ratios; the targets come from the issue:

1. A hit on a finished trainer: the whole magic time, versus re-training the same model and
   versus ``from_pretrained`` (model + tokenizer) of the same ``_model`` folder.
   Target: within 1.5x of ``from_pretrained``.
2. The overhead the magic adds to a 200-step training run (redirection, status callback,
   checkpoint checks, saving ``_model``) versus the same cell run with plain ``exec``.
   Target: under 5%.

Usage::

    HF_HUB_OFFLINE=1 python benchmarks/bench_trainer.py [--repeats 5] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
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
                         use_cpu=True, report_to="none")
trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok)
trainer.train()
"""


def cell(steps: int, output_dir: str) -> str:
    return CELL.replace("OUTPUT_DIR", repr(output_dir)).replace("STEPS", str(steps)).replace("SAVE", str(max(1, steps // 4)))


def inputs() -> dict:
    from _run_trainer import lm_dataset
    from _tiny import tiny_gpt2

    model, tok = tiny_gpt2(seed=0)
    return {"model": model, "tok": tok, "train_ds": lm_dataset(tok)}


def shell(output: Path):
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    ip = InteractiveShell.instance(config=config)
    ip.run_line_magic("load_ext", "dreamer_magic")
    with contextlib.redirect_stdout(io.StringIO()):
        ip.run_line_magic("dreamer", f"output {output}")
    return ip


def fresh(ip) -> None:
    """A kernel restart, in-process: the user namespace holds only what earlier cells define."""
    hidden = {k: v for k, v in ip.user_ns.items() if k in ip.user_ns_hidden}
    ip.user_ns.clear()
    ip.user_ns.update(hidden)
    ip.user_ns.update(inputs())


@contextlib.contextmanager
def quiet():
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), contextlib.redirect_stderr(devnull):
        yield


def timed(fn) -> float:
    """Wall-clock seconds of ``fn()`` (its output hidden)."""
    return timed_both(fn)[0]


def timed_both(fn) -> tuple[float, float]:
    """Wall-clock and CPU seconds of ``fn()``; CPU time is steadier on a machine shared with others."""
    t0, c0 = time.perf_counter(), time.process_time()
    with quiet():
        fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    opts = parser.parse_args()

    import torch
    import transformers  # noqa: F401  (imported before timing)

    torch.set_num_threads(opts.threads)  # fewer threads: steadier figures on a shared machine

    import dreamer_magic  # noqa: F401

    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.chdir(root)  # output_dir="anything" would be created here if it were not redirected
        try:
            run_benchmarks(root, opts)
        finally:
            os.chdir(cwd)


def run_benchmarks(root: Path, opts: argparse.Namespace) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    ip = shell(root / "output")
    source = cell(opts.steps, "anything")

    # -- 1. a hit on a finished trainer ------------------------------------------------
    fresh(ip)
    train_time = timed(lambda: ip.run_cell_magic("dreamer_train", "bench", source))
    model_dir = root / "output" / "bench" / "_model"
    hits, loads = [], []
    for _ in range(opts.repeats):
        fresh(ip)
        hits.append(timed(lambda: ip.run_cell_magic("dreamer_train", "bench", source)))
        assert ip._dreamer_magics._last_status.state == "loaded from disk"
        loads.append(timed(lambda: (GPT2LMHeadModel.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))))
    hit, load = statistics.median(hits), statistics.median(loads)
    print(f"hit on a finished trainer ({opts.steps} steps, tiny GPT-2), medians of {opts.repeats}:")
    print(f"  whole %%dreamer_train hit         {hit * 1000:8.1f} ms")
    print(f"  from_pretrained(model + tok)      {load * 1000:8.1f} ms   hit / from_pretrained = {hit / load:.2f}x (target <= 1.5x)")
    print(f"  training it (first run)           {train_time * 1000:8.1f} ms   training / hit = {train_time / hit:.0f}x")

    # -- 2. the overhead on a training run (interleaved, so that load changes hit both alike) ------
    plain, magic = [], []
    for i in range(opts.repeats):
        fresh(ip)
        namespace = dict(ip.user_ns)
        plain_source = cell(opts.steps, str(root / f"plain-{i}"))
        plain.append(timed_both(lambda: exec(plain_source, namespace)))
        fresh(ip)
        magic.append(timed_both(lambda: ip.run_cell_magic("dreamer_train", f"run-{i}", source)))
        assert ip._dreamer_magics._last_status.state == "ran"
    print(f"{opts.steps}-step training run (checkpoint every {max(1, opts.steps // 4)} steps), medians of {opts.repeats}:")
    for label, index in (("wall-clock", 0), ("CPU time", 1)):
        p = statistics.median(x[index] for x in plain)
        m = statistics.median(x[index] for x in magic)
        print(f"  {label:10}  plain exec {p * 1000:8.1f} ms   %%dreamer_train {m * 1000:8.1f} ms   "
              f"overhead = {(m / p - 1) * 100:+.1f}% (target < 5%)")


if __name__ == "__main__":
    main()
