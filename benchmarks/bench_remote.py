"""Remote output folder benchmarks (SPEC §7), each beside its peer in the same run, on a real S3 API
(moto's server on loopback, started here; s3fs as the client).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_remote.py [--mb 200] [--rounds 3]

Prints medians [min-max] and ratios for:
- push of a committed step of ``--mb`` MB (4 arrays) vs plain ``s3fs.put`` of the same folder;
- pull of it (into a temporary folder, verified, renamed into place) vs plain ``s3fs.get``;
- a hit from the remote on a fresh machine (pull + load) vs a local hit;
- time from the start of a trainer cell to its first resumed training step on a fresh machine
  (pull the newest complete checkpoint, load it) vs resuming from the same checkpoint locally.

Rounds are interleaved (ours, peer, ours, peer, ...); every round writes to a fresh prefix.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def summary(times: list[float]) -> str:
    return f"{statistics.median(times):8.3f} s [{min(times):.3f}-{max(times):.3f}]"


def start_s3() -> tuple[object, object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1"
    )
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    bucket = "bench-" + uuid.uuid4().hex[:8]
    fs.mkdir(bucket)
    return server, fs, bucket


def run_step(cell: str, ns: dict) -> str:
    from dreamer_magic import steps

    return steps.run_cell_step("big", cell, ns).state


BIG_CELL = """
import numpy as np
rng = np.random.default_rng(0)
part_a, part_b, part_c, part_d = (rng.integers(0, 255, size=({n},), dtype=np.uint8) for _ in range(4))
"""


def bench_push_pull(fs, bucket: str, mb: int, rounds: int, work: Path) -> None:
    from dreamer_magic import folders, remote

    folders.set_output_folder(work / "machine-a")
    remote.set_remote(None)
    cell = BIG_CELL.format(n=mb * 2**20 // 4)
    assert run_step(cell, {}) == "ran"
    local = work / "machine-a" / "big"
    size = folders.folder_size(local)
    print(f"step folder: {size / 2**20:.0f} MB in {len(remote.local_files(local))} files")

    push, put, pull, get, remote_hit, local_hit = [], [], [], [], [], []
    for r in range(rounds):
        prefix = f"{bucket}/push-{r}"
        mirror = remote.Remote(f"s3://{prefix}")
        t = time.perf_counter()
        assert mirror.push_folder(work / "machine-a", "big", "step.json")
        push.append(time.perf_counter() - t)
        t = time.perf_counter()
        fs.put(str(local), f"{bucket}/put-{r}/big", recursive=True)
        put.append(time.perf_counter() - t)

        meta = folders.read_json(local / "step.json")
        dest = work / f"pulled-{r}"
        t = time.perf_counter()
        assert mirror.pull_into_place("big", meta, "step.json", dest, lambda: None) is None
        pull.append(time.perf_counter() - t)
        t = time.perf_counter()
        fs.get(f"{bucket}/put-{r}/big", str(work / f"got-{r}"), recursive=True)
        get.append(time.perf_counter() - t)
        shutil.rmtree(dest)
        shutil.rmtree(work / f"got-{r}")
        mirror.close()

        # a hit on a fresh machine (pull + load) vs a local hit
        remote.set_remote(f"s3://{prefix}")
        folders.set_output_folder(work / f"machine-b-{r}")
        t = time.perf_counter()
        assert run_step(cell, {}) == "loaded from remote"
        remote_hit.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert run_step(cell, {}) == "loaded from disk"
        local_hit.append(time.perf_counter() - t)
        remote.set_remote(None)
        shutil.rmtree(work / f"machine-b-{r}")
        folders.set_output_folder(work / "machine-a")

    print(f"push (ours)           {summary(push)}  {size / 2**20 / statistics.median(push):7.1f} MB/s")
    print(f"s3fs.put (peer)       {summary(put)}  {size / 2**20 / statistics.median(put):7.1f} MB/s")
    print(f"  push throughput = {statistics.median(put) / statistics.median(push):.0%} of s3fs.put")
    print(f"pull (ours, verified) {summary(pull)}  {size / 2**20 / statistics.median(pull):7.1f} MB/s")
    print(f"s3fs.get (peer)       {summary(get)}  {size / 2**20 / statistics.median(get):7.1f} MB/s")
    print(f"  pull throughput = {statistics.median(get) / statistics.median(pull):.0%} of s3fs.get")
    print(f"hit from remote       {summary(remote_hit)}")
    print(f"local hit             {summary(local_hit)}")
    print(f"  hit from remote / local hit = {statistics.median(remote_hit) / statistics.median(local_hit):.1f}x")


TRAIN_CELL = """
import os, time, torch
ckpt = Checkpointer(net, opt, every=10, max_steps=40)
for step in range(ckpt.resume(), 40):
    if FIRST[0] is None:
        FIRST[0] = time.perf_counter()
    if step == 25 and CRASH:
        raise RuntimeError("pre-empted")
    x = torch.randn(64, 512)
    loss = ((net(x) - x) ** 2).mean()
    loss.backward(); opt.step(); opt.zero_grad()
    ckpt.step(step, loss=loss)
"""


def bench_resume(bucket: str, rounds: int, work: Path) -> None:
    import torch

    from dreamer_magic import folders, remote, trainers

    def namespace() -> dict:  # every cell stops at step 25 (same fingerprint), so each can resume again
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 512))
        return {"net": net, "opt": torch.optim.AdamW(net.parameters()), "CRASH": True, "FIRST": [None]}

    def cell(ns: dict) -> tuple[str, float]:
        t = time.perf_counter()
        try:
            state = trainers.run_cell_trainer("resume", TRAIN_CELL, ns).state
        except RuntimeError:
            state = "pre-empted"
        return state, ns["FIRST"][0] - t

    fresh, local = [], []
    for r in range(rounds):
        remote.set_remote(f"s3://{bucket}/train-{r}")
        folders.set_output_folder(work / f"train-a-{r}")
        assert cell(namespace())[0] == "pre-empted"
        remote.get_remote().flush()
        # a fresh machine (empty folder, same bucket), then the same machine resuming locally
        folders.set_output_folder(work / f"train-b-{r}")
        state, first = cell(namespace())
        assert state == "pre-empted", state
        fresh.append(first)
        folders.set_output_folder(work / f"train-a-{r}")
        state, first = cell(namespace())
        assert state == "pre-empted", state
        local.append(first)
        remote.get_remote().flush()
        remote.set_remote(None)
    size = folders.folder_size(work / "train-a-0" / "resume" / "_checkpoints" / "checkpoint-20")
    print(f"checkpoint: {size / 2**20:.1f} MB (model, optimizer, RNG)")
    print(f"cell start -> first resumed training step, fresh machine (remote) {summary(fresh)}")
    print(f"cell start -> first resumed training step, same machine (local)   {summary(local)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200, help="size of the step to push and pull (MB)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server, fs, bucket = start_s3()
    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    try:
        bench_push_pull(fs, bucket, args.mb, args.rounds, work)
        bench_resume(bucket, args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        server.stop()


if __name__ == "__main__":
    main()
