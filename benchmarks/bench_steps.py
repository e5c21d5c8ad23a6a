"""Step benchmarks, each side by side with the peer doing the same work in the same run.

    .venv/bin/python benchmarks/bench_steps.py [--rows 1000000] [--repeat 5] [--verify-only]

Prints medians and ratios for:
- `%load_ext dreamer_magic` wall time (fresh processes), and which heavy modules it imported;
- a hit on a step whose input and output are a 1M-row DataFrame vs joblib.Memory and pickle.load;
- saving a 1M-row DataFrame with an object text column (a miss's save) vs df.to_parquet;
- a hit on a step whose input and output are a 1M-row datasets.Dataset (the magic's overhead);
- fingerprinting a 1 GB array and the 1M-row DataFrame vs joblib.hash;
- peak RSS added by a hit on the 1M-row Dataset;
- what verifying a hit costs (`--verify-only` runs just this): the 1M-row DataFrame and Dataset
  hits with the checks off (as before file records), `verify = "size"`, `verify = "digest"` (a
  repeat hit in one kernel: a folder checked before is recognised by the inode, size, mtime and
  ctime of its files and folders) and digests with every file hashed and checked again (the
  first hit after a restart), in interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_time, ms  # noqa: E402




def make_frame(rows: int):
    import pandas as pd

    rng = np.random.default_rng(0)
    words = np.array(["good", "bad", "fine", "great", "awful", "ok", "superb", "meh"])
    text = [f"review {i}: {words[i % 8]} {words[(i * 7) % 8]}" for i in range(rows)]
    return pd.DataFrame({"text": text, "stars": rng.integers(1, 6, rows), "score": rng.random(rows)})


def bench_load_ext(repeat: int) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        t = time.perf_counter()
        ip.run_line_magic("load_ext", "dreamer_magic")
        elapsed = time.perf_counter() - t
        heavy = [m for m in ("torch", "transformers", "datasets") if m in sys.modules]
        print(elapsed, ",".join(heavy) or "-")
        """
    )
    times, heavy = [], set()
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        times.append(float(out[0]))
        if out[1] != "-":
            heavy.update(out[1].split(","))
    print(f"%load_ext dreamer_magic          median {ms(statistics.median(times))}  (target < 150 ms)")
    print(f"  heavy modules imported by it: {sorted(heavy) or 'none (torch, transformers, datasets stay unloaded)'}")


def shell(output: Path):
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "dreamer_magic")
    ip.run_line_magic("config", "DreamerMagics.widgets = False")
    ip.run_line_magic("dreamer", f"output {output}")
    return ip


class quiet:
    def __enter__(self):
        self._out = sys.stdout
        sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self._out


def bench_frame_hit(ip, work: Path, rows: int, repeat: int, text_dtype: str = "str") -> None:
    import joblib

    frame = make_frame(rows).astype({"text": text_dtype})
    ip.user_ns["frame"] = frame
    cell = "kept = frame[frame.stars > 0].reset_index(drop=True)\n"
    name = f"frame-step-{text_dtype}"
    with quiet():
        ip.run_cell_magic("dreamer_step", name, cell)  # the first run computes and saves

        def hit():
            ip.run_cell_magic("dreamer_step", name, cell)
            assert ip._dreamer_magics._last_status.state == "loaded from disk"

        magic = median_time(hit, repeat)

    memory = joblib.Memory(str(work / f"joblib-{text_dtype}"), verbose=0)

    def clean(df):
        return df[df.stars > 0].reset_index(drop=True)

    cached = memory.cache(clean)
    cached(frame)
    jl = median_time(lambda: cached(frame), repeat)

    pkl = work / f"frame-{text_dtype}.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(frame[frame.stars > 0].reset_index(drop=True), f, protocol=pickle.HIGHEST_PROTOCOL)

    def load_pickle():
        with open(pkl, "rb") as f:
            pickle.load(f)

    pk = median_time(load_pickle, repeat)
    print(f"hit, {rows:,}-row DataFrame in and out (text column dtype {text_dtype}):")
    print(f"  %%dreamer_step (whole magic)   {ms(magic)}")
    print(f"  joblib.Memory cached call      {ms(jl)}   ratio joblib/magic = {jl / magic:5.2f}x  (target > 1)")
    print(f"  pickle.load of the output      {ms(pk)}   ratio magic/pickle = {magic / pk:5.2f}x  (target <= 1.5)")


def bench_object_save(work: Path, rows: int, repeat: int) -> None:
    """What a miss spends saving a frame with an ``object`` text column, vs ``df.to_parquet``."""
    from dreamer_magic.storage import save_outputs

    frame = make_frame(rows).astype({"text": object})
    save_outputs({"kept": frame.head(10)}, work / "save-warm-up")  # imports datasets: not counted
    ratios, ours, theirs = [], [], []
    for r in range(repeat):
        folder = work / f"save-{r}"
        folder.mkdir()

        def save():
            save_outputs({"kept": frame}, folder)

        def parquet():
            frame.to_parquet(work / f"frame-{r}.parquet")

        pair = [(save, ours), (parquet, theirs)]
        for fn, times in pair if r % 2 == 0 else pair[::-1]:  # interleaved, order alternating
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        ratios.append(ours[-1] / theirs[-1])
        shutil.rmtree(folder)
    print(f"saving a {rows:,}-row frame with an object text column (CPU):")
    print(f"  save_outputs {ms(statistics.median(ours))}   df.to_parquet {ms(statistics.median(theirs))}"
          f"   ratio {statistics.median(ratios):.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]  (target <= 1.2)")


def bench_dataset_hit(ip, work: Path, rows: int, repeat: int) -> None:
    import datasets

    source = work / "source-ds"
    datasets.Dataset.from_pandas(make_frame(rows)).save_to_disk(str(source))
    ds = datasets.load_from_disk(str(source))
    ip.user_ns["ds"] = ds
    cell = "out_ds = ds\n"
    with quiet():
        ip.run_cell_magic("dreamer_step", "dataset-step", cell)

        def hit():
            ip.run_cell_magic("dreamer_step", "dataset-step", cell)
            assert ip._dreamer_magics._last_status.state == "loaded from disk"

        magic = median_time(hit, repeat)
    saved = ip.user_ns["out_ds"]
    plain = median_time(lambda: datasets.load_from_disk(str(work / "output" / "dataset-step" / "_dataset")), repeat)
    print(f"hit, {rows:,}-row datasets.Dataset in and out:")
    print(f"  %%dreamer_step (whole magic)   {ms(magic)}   (target: under 30 ms of magic overhead)")
    print(f"  datasets.load_from_disk alone  {ms(plain)}   magic overhead = {ms(magic - plain)}")
    assert saved.num_rows == rows


CHECKS: list[float] = []  # seconds spent in the hit checks, per call


def _timed(fn):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            CHECKS.append(time.perf_counter() - t)
    return timed


@contextlib.contextmanager
def verify_mode(ip, mode: str):
    """``off``: the hit checks patched out (a hit as before file records); ``cold``: digests, every
    file hashed and checked again (the first hit after a restart); else ``%config
    DreamerMagics.verify`` as a repeat hit in one kernel has it (a folder checked before and
    unchanged is recognised by the stamps of its files and folders: those stats are timed too)."""
    from dreamer_magic import integrity, steps, storage

    saved = steps.StepRun._check_saved, storage.check_files, steps.checked_before, steps.remember_checked
    memos = dict(integrity._KNOWN), dict(integrity._SNIFFED), dict(integrity._CHECKED)  # a cold hit forgets for itself only
    if mode == "off":
        steps.StepRun._check_saved = lambda self, folder, meta: None
        storage.check_files = lambda *args, **kwargs: None
        steps.checked_before = lambda *args: False
        steps.remember_checked = lambda *args: None
    else:
        steps.StepRun._check_saved = _timed(saved[0])
        storage.check_files = _timed(saved[1])
        steps.checked_before, steps.remember_checked = _timed(saved[2]), _timed(saved[3])
        ip.run_line_magic("config", f'DreamerMagics.verify = "{"digest" if mode == "cold" else mode}"')
        if mode == "cold":
            integrity.forget_digests()
    try:
        yield
    finally:
        steps.StepRun._check_saved, storage.check_files, steps.checked_before, steps.remember_checked = saved
        ip.run_line_magic("config", 'DreamerMagics.verify = "digest"')
        if mode == "cold":
            for memo, kept in zip((integrity._KNOWN, integrity._SNIFFED, integrity._CHECKED), memos):
                memo.update(kept)


def bench_verify(ip, work: Path, rows: int, repeat: int) -> None:
    import datasets

    source = work / "source-ds"
    if not source.exists():
        datasets.Dataset.from_pandas(make_frame(rows)).save_to_disk(str(source))
    ip.user_ns["vframe"] = make_frame(rows)
    ip.user_ns["vds"] = datasets.load_from_disk(str(source))
    cases = {
        "DataFrame": ("verify-frame", "vkept = vframe[vframe.stars > 0].reset_index(drop=True)\n"),
        "Dataset": ("verify-dataset", "vout = vds\n"),
    }
    modes = ["off", "size", "digest", "cold"]
    times: dict[tuple[str, str], list[float]] = {(c, m): [] for c in cases for m in modes}
    checks: dict[tuple[str, str], list[float]] = {(c, m): [] for c in cases for m in modes}
    with quiet():
        for name, cell in cases.values():
            ip.run_cell_magic("dreamer_step", name, cell)
        time.sleep(2.5)  # files written in the last 2 s are hashed at every hit ("racily clean", as in git)
        for round_ in range(repeat):
            for case, (name, cell) in cases.items():
                for mode in modes[round_ % 4:] + modes[: round_ % 4]:  # interleaved, order rotated
                    CHECKS.clear()
                    with verify_mode(ip, mode):
                        t = time.perf_counter()
                        ip.run_cell_magic("dreamer_step", name, cell)
                        times[(case, mode)].append(time.perf_counter() - t)
                    checks[(case, mode)].append(sum(CHECKS))
                    status = ip._dreamer_magics._last_status
                    assert status.state == "loaded from disk" and status.verified == {"off": None, "cold": "digest"}.get(mode, mode)
    size = sum(p.stat().st_size for p in (work / "output" / "verify-frame").rglob("*") if p.is_file())
    print(f"verifying a hit ({rows:,} rows; {repeat} interleaved rounds; median [min-max]; DataFrame folder {size / 1e6:.0f} MB)")
    print("  whole hit, and the time spent in the checks themselves (timed inside the same hits; the")
    print("  ratio is (hit with checks off + median check time) / hit with checks off, steadier than whole-hit ratios):")
    for case in cases:
        off = statistics.median(times[(case, "off")])
        for mode in modes:
            ts = times[(case, mode)]
            med = statistics.median(ts)
            label = {"cold": "digest*"}.get(mode, mode)
            line = f"  {case:9} verify {label:7} {ms(med)}  [{ms(min(ts)).strip()}-{ms(max(ts)).strip()}]"
            if mode != "off":
                spent = statistics.median(checks[(case, mode)])
                line += f"  checks {ms(spent, 3).strip()}  ratio {(off + spent) / off:5.3f}x"
                line += "  (target <= 1.10)" if mode == "digest" else ""
            print(line)
    print("  digest* = every file hashed and checked again, as at the first hit after a restart")


def bench_fingerprint(rows: int, repeat: int, gigabytes: float) -> None:
    import joblib

    from dreamer_magic.fingerprint import fingerprint

    arr = np.random.default_rng(1).integers(0, 2**62, int(gigabytes * 2**30 / 8), dtype=np.int64)
    t_arr = median_time(lambda: fingerprint(arr), repeat)
    t_arr_joblib = median_time(lambda: joblib.hash(arr), max(1, repeat // 2))
    frame = make_frame(rows)
    t_df = median_time(lambda: fingerprint(frame), repeat)
    t_df_joblib = median_time(lambda: joblib.hash(frame), repeat)
    gb = arr.nbytes / 1e9
    print(f"fingerprint {gb:.2f} GB int64 array   {ms(t_arr)}  = {gb / t_arr:6.1f} GB/s (target >= 10)  joblib.hash {ms(t_arr_joblib)} = {gb / t_arr_joblib:5.1f} GB/s")
    print(f"fingerprint {rows:,}-row DataFrame {ms(t_df)}   joblib.hash {ms(t_df_joblib)}   ratio = {t_df_joblib / t_df:5.1f}x (target >= 3)")
    obj = frame.astype({"text": object})
    t_obj = median_time(lambda: fingerprint(obj), repeat)
    t_obj_joblib = median_time(lambda: joblib.hash(obj), repeat)
    print(f"  same frame, object text column {ms(t_obj)}   joblib.hash {ms(t_obj_joblib)}   ratio = {t_obj_joblib / t_obj:5.1f}x")


def bench_rss(work: Path, rows: int) -> None:
    code = textwrap.dedent(
        f"""
        import os, sys, threading, time, psutil, datasets
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "dreamer_magic")
        ip.run_line_magic("config", "DreamerMagics.widgets = False")
        ip.run_line_magic("dreamer", "output {work / 'output'}")
        ip.user_ns["ds"] = datasets.load_from_disk("{work / 'source-ds'}")
        proc = psutil.Process()
        import gc; gc.collect()
        before = proc.memory_info().rss
        peak = [before]
        done = threading.Event()
        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.0005)
        t = threading.Thread(target=sample); t.start()
        sys.stdout = open(os.devnull, "w")
        ip.run_cell_magic("dreamer_step", "dataset-step", "out_ds = ds\\n")
        state = ip._dreamer_magics._last_status.state
        done.set(); t.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        sys.stdout = sys.__stdout__
        print((peak[0] - before) / 1e6, state)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()[-1].split()
    print(f"peak RSS added by a hit on the {rows:,}-row Dataset: {float(out[0]):6.1f} MB ({' '.join(out[1:])}; target < 100 MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--only-save", action="store_true", help="only the object-column save (target 3)")
    parser.add_argument("--verify-only", action="store_true", help="only the cost of verifying hits")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dreamer-bench-"))
    if args.only_save:
        bench_object_save(work, args.rows, args.repeat)
        shutil.rmtree(work, ignore_errors=True)
        return
    try:
        if args.verify_only:
            bench_verify(shell(work / "output"), work, args.rows, args.repeat)
            return
        bench_load_ext(args.repeat)
        ip = shell(work / "output")
        bench_frame_hit(ip, work, args.rows, args.repeat)  # pandas 3's default string dtype
        bench_frame_hit(ip, work, args.rows, args.repeat, "object")  # pandas 2's default
        bench_object_save(work, args.rows, args.repeat)
        bench_dataset_hit(ip, work, args.rows, args.repeat)
        bench_rss(work, args.rows)
        bench_verify(ip, work, args.rows, args.repeat)
        bench_fingerprint(args.rows, args.repeat, args.gigabytes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
