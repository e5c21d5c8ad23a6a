"""The output folder mirrored on object storage (SPEC §7), against a real S3 API on loopback.

Each "machine" is a fresh process with its own working directory (so its own ``./output``),
pointed at one bucket of the moto server the ``s3_server`` fixture starts. A pre-emption is a
SIGKILL of that process at a chosen moment of a push (the child blocks itself there and says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _session import _SCRIPT, Session, session  # noqa: E402

STEP_V1 = """
%%dreamer_step make data
import numpy as np
arr = np.arange(50_000) * 3
table = {"n": int(arr.size), "label": "v1"}
print("made", arr.size)
"""
STEP_V2 = STEP_V1.replace("* 3", "* 5").replace('"v1"', '"v2"')
DOWNSTREAM = """
%%dreamer_step total
total = int(arr.sum())
"""


def remote_files(fs, url: str) -> dict[str, int]:
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return {p[len(root) + 1:]: info["size"] for p, info in fs.find(root, detail=True).items()}


def machine(tmp_path: Path, name: str, url: str, cells: list[str], env: dict, dump=()) -> Session:
    """Run ``cells`` on a fresh "machine" (its own folder) with the remote set first."""
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    return session(cwd, [f"%dreamer remote {url}", *cells], dump=list(dump), env=env, timeout=120)


def killed_during_push(
    tmp_path: Path, name: str, url: str, cells: list[str], env: dict, block: str, sig: int = signal.SIGKILL, after: tuple = ()
) -> int:
    """Run ``cells`` on a machine whose push blocks at ``block`` (a cell that instruments the
    remote's filesystem and prints READY when it is reached), then send ``sig`` right there.
    ``after``: cells run after the last one (the machine busy with something else). Returns the exit code."""
    cwd = tmp_path / name
    cwd.mkdir(exist_ok=True)
    spec = {
        "cells": [f"%dreamer remote {url}\n", *[textwrap.dedent(c).strip("\n") + "\n" for c in cells[:-1]], block, cells[-1], *after],
        "dump": [],
        "output": str(cwd / "output"),
    }
    full_env = {**os.environ, **env, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, cwd=cwd, env=full_env,
    )
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    deadline = time.monotonic() + 120
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "READY" in line:
                break
            assert time.monotonic() < deadline, "the push never reached the blocking point"
        else:
            raise AssertionError("the machine ended before its push reached the blocking point:\n" + "".join(seen[-30:]))
    finally:
        proc.send_signal(sig)
        code = proc.wait(60)
        proc.stdout.close()
    return code


# A cell that makes the next push of "make-data" stop for good just before it writes step.json
# (every data file of the new version is uploaded; the old step.json was deleted): the worst moment.
BLOCK_BEFORE_METADATA = """
import threading, time as _t
from dreamer_magic.remote import get_remote
_fs = get_remote().fs
_pipe = _fs.pipe_file
def _blocking(path, data, **kw):
    if path.endswith("make-data/step.json"):
        print("READY", flush=True)
        threading.Event().wait()
    return _pipe(path, data, **kw)
_fs.pipe_file = _blocking
"""
# ...and one that stops it half-way through the data files (one file sent, the rest not).
BLOCK_MID_DATA = """
import threading
from dreamer_magic.remote import get_remote
_fs = get_remote().fs
_put = _fs.put
def _blocking(lpaths, rpaths, **kw):
    if any("make-data/" in r for r in rpaths) and len(lpaths) > 1:
        _fs.put_file(lpaths[0], rpaths[0])
        print("READY", flush=True)
        threading.Event().wait()
    return _put(lpaths, rpaths, **kw)
_fs.put = _blocking
"""


def test_a_fresh_machine_loads_every_step_from_the_remote_in_the_seeds_layout(tmp_path, bucket):
    url, fs, env = bucket
    a = machine(tmp_path, "a", url, [STEP_V1, DOWNSTREAM], env, dump=["arr", "table", "total"])
    assert a.states == ["ran", "ran"], a.statuses
    assert not a.errors, a.errors
    # the bucket holds exactly the local layout: same files, same sizes, step.json included
    local = tmp_path / "a" / "output"
    for step in ("make-data", "total"):
        here = {p.relative_to(local / step).as_posix(): p.stat().st_size for p in (local / step).rglob("*") if p.is_file()}
        there = {k.removeprefix(step + "/"): v for k, v in remote_files(fs, url).items() if k.startswith(step + "/")}
        assert here == there and "step.json" in there, (step, here, there)

    b = machine(tmp_path, "b", url, [STEP_V1, DOWNSTREAM, STEP_V1, "%dreamer status"], env, dump=["arr", "table", "total"])
    assert b.states == ["loaded from remote", "loaded from remote", "loaded from disk"], b.statuses  # then a local hit
    status = [line.split() for line in b.stdout.splitlines() if line.startswith(("make-data ", "total "))]
    assert [row[-1] for row in status] == ["both", "both"], b.stdout  # %dreamer status: where each entry is
    assert b.same_values(a), (a.values, b.values)
    assert "made 50000" in b.stdout  # the recorded output is replayed, as on any hit

    # readable without this package: plain s3fs + json + numpy
    import numpy as np

    plain = tmp_path / "plain"
    fs.get(url.removeprefix("s3://") + "/make-data", str(plain), recursive=True)
    meta = json.loads((plain / "step.json").read_text())
    arr = np.load(plain / meta["outputs"]["arr"]["path"], allow_pickle=False)
    assert int(arr[1]) == 3 and meta["name"] == "make data"


@pytest.mark.parametrize("block", [BLOCK_BEFORE_METADATA, BLOCK_MID_DATA], ids=["before-metadata", "mid-data"])
def test_a_push_killed_at_any_moment_leaves_the_remote_step_committed_or_absent(tmp_path, bucket, block):
    url, fs, env = bucket
    first = machine(tmp_path, "a", url, [STEP_V1], env)
    assert first.states == ["ran"], first.statuses
    fp1 = json.loads(fs.cat_file(url.removeprefix("s3://") + "/make-data/step.json"))["fingerprint"]

    # the changed step commits locally, then the machine dies during its push
    killed_during_push(tmp_path, "a", url, [STEP_V2], env, block)
    files = remote_files(fs, url)
    assert "make-data/step.json" not in files, "a half-pushed step must not be committed"
    backup = f"_backups/make-data/{fp1}"
    assert f"{backup}/step.json" in files, sorted(files)  # the old version stays, committed, in _backups

    # a fresh machine: the old code is a hit from the remote backup, the new one runs (never a
    # mix of v2 data under v1 metadata), and its push commits v2 in place
    b = machine(tmp_path, "b", url, [STEP_V1, "v1 = table", STEP_V2], env, dump=["v1", "table"])
    assert b.states == ["loaded from remote", "ran"], b.statuses
    assert b.values["v1"]["repr"] == repr({"n": 50000, "label": "v1"})
    assert b.values["table"]["repr"] == repr({"n": 50000, "label": "v2"})
    # what b pushed is committed in place, whole: its step.json is b's, its files are those it lists
    root = url.removeprefix("s3://")
    pushed = json.loads(fs.cat_file(f"{root}/make-data/step.json"))
    assert pushed == json.loads((tmp_path / "b" / "output" / "make-data" / "step.json").read_text())
    table = pushed["outputs"]["table"]["path"]
    assert json.loads(fs.cat_file(f"{root}/make-data/{table}"))["label"] == "v2"


SLOW_METADATA = """
import time as _t
from dreamer_magic.remote import get_remote
_fs = get_remote().fs
_pipe = _fs.pipe_file
def _slow(path, data, **kw):
    if path.endswith("make-data/step.json"):
        print("READY", flush=True)
        _t.sleep(3)
    return _pipe(path, data, **kw)
_fs.pipe_file = _slow
"""


def test_sigterm_flushes_pending_uploads_before_the_machine_goes(tmp_path, bucket):
    """The pre-emption notice: SIGTERM while a push is under way (and the kernel busy) waits for it,
    then does what SIGTERM did before (here: the default, the process ends by the signal)."""
    url, fs, env = bucket
    code = killed_during_push(
        tmp_path, "a", url, [STEP_V1], env, SLOW_METADATA, sig=signal.SIGTERM, after=("import time\ntime.sleep(120)",)
    )
    assert code == -signal.SIGTERM
    assert "make-data/step.json" in remote_files(fs, url)


def test_remote_needs_its_extra_and_load_ext_imports_nothing_remote(shell, tmp_path):
    """``%load_ext`` leaves fsspec and the remote module unimported; a remote whose driver is
    missing is one clear line naming what to install."""
    code = textwrap.dedent(
        """
        import sys
        from IPython.core.interactiveshell import InteractiveShell
        ip = InteractiveShell.instance()
        ip.run_line_magic("load_ext", "dreamer_magic")
        print("LOADED", sorted(m for m in ("fsspec", "s3fs", "dreamer_magic.remote") if m in sys.modules))
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("fsspec", "s3fs"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from IPython.core.error import UsageError
        try:
            ip.run_line_magic("dreamer", "remote s3://bucket/x")
        except UsageError as e:
            print("ERROR", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr
    assert "ERROR" in out.stdout and "pip install dreamer_magic[remote]" in out.stdout, out.stdout + out.stderr


# -- trainers: checkpoints uploaded as they are saved, resumed on a fresh machine ---------------

TRAIN_SETUP = """
import torch
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
opt = torch.optim.AdamW(net.parameters(), lr=0.01)
sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.9)
torch.manual_seed(123)
"""
TRAIN = """
%%dreamer_train plain
import os, torch
ckpt = Checkpointer(net, opt, sched, every=5, max_steps=20)
for step in range(ckpt.resume(), 20):
    x = torch.randn(8, 4)
    loss = ((net(torch.nn.functional.dropout(x, 0.2)) - x.sum(1, keepdim=True)) ** 2).mean()
    loss.backward(); opt.step(); sched.step(); opt.zero_grad()
    ckpt.step(step, loss=loss)
    with open(os.environ["LOSS_FILE"], "a") as f:
        f.write(f"{step} {loss.item()!r}\\n")
"""
# the upload of checkpoint-15 stops for good just before its completion marker
BLOCK_CHECKPOINT_MARKER = """
import threading
from dreamer_magic.remote import get_remote
_fs = get_remote().fs
_pipe = _fs.pipe_file
def _blocking(path, data, **kw):
    if path.endswith("checkpoint-15/upload_complete.json"):
        print("READY", flush=True)
        threading.Event().wait()
    return _pipe(path, data, **kw)
_fs.pipe_file = _blocking
"""


def _losses(path: Path) -> dict[int, str]:
    return {int(a): b for a, b in (line.split() for line in path.read_text().splitlines())}


def test_a_trainer_killed_during_a_checkpoint_upload_resumes_on_a_fresh_machine(tmp_path, bucket):
    url, fs, env = bucket
    killed_during_push(tmp_path, "a", url, [TRAIN_SETUP, TRAIN], {**env, "LOSS_FILE": str(tmp_path / "a.loss")}, BLOCK_CHECKPOINT_MARKER)
    files = remote_files(fs, url)
    assert "plain/_checkpoints/checkpoint-10/upload_complete.json" in files, sorted(files)
    assert "plain/_checkpoints/checkpoint-15/upload_complete.json" not in files
    assert "plain/trainer.json" not in files

    # machine b resumes from the remote; then (one process, to spare the imports) a fresh local
    # folder loads the finished trainer from the remote, and a run without remote is the reference
    loss = lambda name: f"import os\nos.environ['LOSS_FILE'] = {str(tmp_path / name)!r}"  # noqa: E731
    b = machine(
        tmp_path, "b", url,
        [loss("b.loss"), TRAIN_SETUP, TRAIN, "from dreamer_magic.remote import get_remote\nget_remote().flush()",
         f"%dreamer output {tmp_path / 'c' / 'output'}", loss("c.loss"), TRAIN_SETUP, TRAIN,
         "%dreamer remote off", f"%dreamer output {tmp_path / 'r' / 'output'}", loss("r.loss"), TRAIN_SETUP, TRAIN],
        env,
    )
    assert b.states == ["resumed from checkpoint-10 (remote)", "loaded from remote", "ran"], b.statuses
    resumed, expected = _losses(tmp_path / "b.loss"), _losses(tmp_path / "r.loss")
    assert sorted(resumed) == list(range(10, 20)) and sorted(expected) == list(range(20))
    assert resumed == {s: expected[s] for s in range(10, 20)}  # the same trajectory as an uninterrupted run
    assert not (tmp_path / "c.loss").exists()  # a finished remote trainer reloads without training


# -- the generation cache: committed batches pushed as segments, merged on another machine --------

ASK = """
import os
from dreamer_magic import cached
@cached("my-api")
def ask(i):
    with open(os.environ["CALLS_FILE"], "a") as f:
        f.write(f"{i}\\n")
    return {"q": i, "a": i * i}
answers = [ask(i) for i in range(20)]
"""
# the upload of the 8th segment (the 8th committed batch) stops for good
BLOCK_SEGMENT = """
import threading
from dreamer_magic.remote import get_remote
_fs = get_remote().fs
_pipe = _fs.pipe_file
_seen = []
def _blocking(path, data, **kw):
    if ".segments/" in path:
        _seen.append(path)
        if len(_seen) == 8:
            print("READY", flush=True)
            threading.Event().wait()
    return _pipe(path, data, **kw)
_fs.pipe_file = _blocking
"""


def test_a_generation_killed_on_one_machine_is_finished_on_another_computing_only_the_rest(tmp_path, bucket):
    url, fs, env = bucket
    killed_during_push(tmp_path, "a", url, [ASK], {**env, "CALLS_FILE": str(tmp_path / "a.calls")}, BLOCK_SEGMENT)
    segments = url.removeprefix("s3://") + "/.cache/my-api.segments"
    pushed = fs.find(segments)
    assert len(pushed) == 7, pushed  # seven committed batches reached the bucket, the 8th never did
    in_bucket = {json.loads(line)["request"] for p in pushed for line in fs.cat_file(p).decode().splitlines()[1:]}

    gc = "from dreamer_magic.remote import get_remote\nget_remote().flush()\n%dreamer gc"
    b = machine(tmp_path, "b", url, [ASK, gc], {**env, "CALLS_FILE": str(tmp_path / "b.calls")}, dump=["answers"])
    assert not b.errors, b.errors
    computed = [int(x) for x in (tmp_path / "b.calls").read_text().split()]
    assert len(computed) == 20 - 7, computed  # only what machine A never committed to the bucket
    assert len(set(computed)) == 13 and len(in_bucket) == 7  # each computed once, none of those in the bucket
    assert b.values["answers"]["repr"] == repr([{"q": i, "a": i * i} for i in range(20)])
    assert "compacted 20 generation-cache segments" in b.stdout, b.stdout
    fs.invalidate_cache()
    assert len(fs.find(segments)) == 1

    c = machine(tmp_path, "c", url, [ASK], {**env, "CALLS_FILE": str(tmp_path / "c.calls")}, dump=["answers"])
    assert not (tmp_path / "c.calls").exists()  # a third machine computes nothing
    assert c.values["answers"] == b.values["answers"]


# -- two machines on one bucket ----------------------------------------------------------------

SLOW_STEP = """
%%dreamer_step slow
import time
time.sleep(5)
result = "computed once"
"""


def test_two_machines_on_one_bucket_one_runs_the_other_waits_and_loads(tmp_path, bucket):
    """The lease in the bucket: a dead machine's expired lease is taken over; of two live machines
    one runs, the other waits for its push and loads it from the remote."""
    from concurrent.futures import ThreadPoolExecutor

    url, fs, env = bucket
    lease = url.removeprefix("s3://") + "/.locks/slow.lease"
    fs.pipe_file(lease, json.dumps({"machine": "dead-box", "token": "x", "expires": time.time() - 5}).encode())
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(machine, tmp_path, "a", url, [SLOW_STEP], env, ["result"])
        time.sleep(1.0)
        second = pool.submit(machine, tmp_path, "b", url, [SLOW_STEP], env, ["result"])
        a, b = first.result(), second.result()
    runs = sorted([a, b], key=lambda s: s.states[0] != "ran")
    assert [s.states for s in runs] == [["ran"], ["loaded from remote"]], (a.statuses, b.statuses)
    ran, loaded = runs
    assert "took over the expired lease of dead-box" in ran.reasons()
    assert "another machine" in loaded.reasons() and "waiting for it" in loaded.reasons()
    assert loaded.values["result"]["repr"] == repr("computed once")
    fs.invalidate_cache()
    assert not fs.exists(lease)  # released once the push committed


# -- in one process, on a file:// remote ---------------------------------------------------------------


@pytest.fixture
def file_remote(ip, tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    url = f"file://{tmp_path / 'bucket'}"
    ip.run_line_magic("dreamer", f"remote {url}")
    yield url, tmp_path / "bucket"
    remote.set_remote(None)


def test_a_damaged_remote_copy_is_a_miss_and_the_card_shows_the_upload(ip, tmp_path, file_remote):
    import dreamer_magic
    from dreamer_magic.remote import get_remote

    url, bucket = file_remote
    cell = "import numpy as np\nvalues = np.arange(1000)\n"
    ip.run_cell_magic("dreamer_step", "numbers", cell)
    status = dreamer_magic.last_status()
    assert status.state == "ran"
    assert get_remote().flush(60)
    assert f"pushed to {url}" in [str(n) for n in status.notes]  # the card's note followed the upload
    assert (bucket / "numbers" / "step.json").is_file()

    # a fresh folder, but the bucket's copy has one flipped byte (same size): verified, not used
    npy = next((bucket / "numbers" / "_outputs").glob("values*"))
    data = bytearray(npy.read_bytes())
    data[-1] ^= 0xFF
    npy.write_bytes(bytes(data))
    ip.run_line_magic("dreamer", f"output {tmp_path / 'fresh'}")
    ip.run_cell_magic("dreamer_step", "numbers", cell)
    status = dreamer_magic.last_status()
    assert status.state == "ran", status
    assert any("the remote copy was not used" in str(n) and "digest" in str(n) for n in status.notes), status.notes
    assert list(ip.user_ns["values"][-3:]) == [997, 998, 999]
    assert not list((tmp_path / "fresh").glob(".numbers.tmp-*"))  # the pulled temporary folder is gone

    # the rerun's push repaired the bucket: a third folder loads it from the remote
    assert get_remote().flush(60)
    ip.run_line_magic("dreamer", f"output {tmp_path / 'third'}")
    ip.run_cell_magic("dreamer_step", "numbers", cell)
    assert dreamer_magic.last_status().state == "loaded from remote"


def test_config_sets_the_remote_and_off_unsets_it(ip, tmp_path, capsys):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    url = f"file://{tmp_path / 'bucket'}"
    ip.run_line_magic("config", f'DreamerMagics.remote = "{url}"')
    try:
        assert remote.get_remote() is not None and remote.get_remote().url == url
        ip.run_line_magic("dreamer", "remote")
        assert f"remote: {url}" in capsys.readouterr().out
        ip.run_line_magic("dreamer", "remote off")
        assert remote.get_remote() is None
        assert "local only" in capsys.readouterr().out
    finally:
        remote.set_remote(None)


def test_network_errors_are_retried_with_backoff_and_a_missing_object_is_not(monkeypatch):
    from dreamer_magic import remote

    waits = []
    monkeypatch.setattr(remote.time, "sleep", waits.append)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert remote.retry(flaky) == "ok" and len(calls) == 3 and waits == [0.2, 0.4]

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        remote.retry(missing)
    assert len(calls) == 1

    def down():
        raise ConnectionRefusedError("endpoint down")

    with pytest.raises(ConnectionRefusedError):
        remote.retry(down, attempts=4)
