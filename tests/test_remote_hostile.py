"""A remote output folder that someone else wrote (or damaged): a pull never writes outside the
local output folder nor reads outside the remote prefix, a lease with garbage content never
hangs a cell, and a name clash arriving from the remote is refused like a local one."""

from __future__ import annotations

import json
import os
import time

import pytest
from IPython.core.error import UsageError

CELL = "import numpy as np\nvalues = np.arange(10)\n"


@pytest.fixture
def s3_ip(ip, bucket, monkeypatch):
    from dreamer_magic import remote

    url, fs, env = bucket
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ip.run_line_magic("dreamer", f"remote {url}")
    yield ip, url, fs
    remote.set_remote(None)


def test_a_remote_key_with_dotdot_is_never_written_outside_the_local_folder(s3_ip, tmp_path):
    import dreamer_magic
    from dreamer_magic.remote import get_remote

    ip, url, fs = s3_ip
    ip.run_cell_magic("dreamer_step", "numbers", CELL)
    assert get_remote().flush(60)
    prefix = url[len("s3://"):]
    fs.pipe_file(f"{prefix}/numbers/_outputs/../../../escape.txt", b"planted")  # a literal S3 key

    ip.run_line_magic("dreamer", f"output {tmp_path / 'fresh'}")
    ip.run_cell_magic("dreamer_step", "numbers", CELL)
    status = dreamer_magic.last_status()
    assert not (tmp_path / "escape.txt").exists()
    assert status.state == "ran", status
    assert any("outside" in str(n) for n in status.notes), status.notes
    assert list(ip.user_ns["values"]) == list(range(10))


def test_a_checkpoint_marker_naming_files_outside_is_refused(tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"secret")
    bucket = tmp_path / "bucket"
    folder = bucket / "t" / "_checkpoints" / "checkpoint-1"
    folder.mkdir(parents=True)
    (folder / "w.bin").write_bytes(b"ok")
    rel = "../../../../secret.txt"  # from the checkpoint folder to tmp_path/secret.txt
    record = {"files": {"w.bin": {"size": 2}, rel: {"size": 6}}, "fingerprint": "x"}
    (folder / remote.CHECKPOINT_MARKER).write_text(json.dumps(record))
    r = remote.Remote(f"file://{bucket}")
    try:
        local = tmp_path / "local" / "output" / "t"
        problem = r.pull_checkpoint("t", "_checkpoints/checkpoint-1", local)
    finally:
        r.close()
    assert problem is not None and "outside" in problem
    assert not (tmp_path / "local" / "secret.txt").exists() and not (local / "_checkpoints").exists()


def test_a_lease_with_garbage_content_is_taken_over_once_stale_and_never_raises(tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    r = remote.Remote(f"file://{tmp_path / 'bucket'}")
    try:
        for garbage in (b"\x00not json", b"[1, 2]", json.dumps({"machine": "m", "expires": "soon"}).encode()):
            lease = remote.Lease(r, "step-a", ttl=5)
            path = tmp_path / "bucket" / lease.rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(garbage)
            assert lease.try_acquire() is False  # written just now: perhaps a machine mid-write
            old = time.time() - 60
            os.utime(path, (old, old))
            assert lease.try_acquire() is True, garbage  # older than a ttl: its machine is gone
            assert json.loads(path.read_bytes())["token"] == lease.token
            lease.release()
            assert not path.exists()
    finally:
        r.close()


def test_a_name_clash_arriving_from_the_remote_is_refused_like_a_local_one(ip, tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    ip.run_line_magic("dreamer", f"remote file://{tmp_path / 'bucket'}")
    try:
        ip.run_cell_magic("dreamer_step", "My Step", CELL)
        assert remote.get_remote().flush(60)
        ip.run_line_magic("dreamer", f"output {tmp_path / 'fresh'}")
        with pytest.raises(UsageError, match=r"the step 'my-step' and the step 'My Step' map to the same folder"):
            ip.run_cell_magic("dreamer_step", "my-step", CELL)
        assert not (tmp_path / "fresh" / "my-step").exists()
        ip.run_cell_magic("dreamer_step", "My Step", CELL)  # its own name: a hit from the remote
        import dreamer_magic

        assert dreamer_magic.last_status().state == "loaded from remote"
    finally:
        remote.set_remote(None)


ASK = """
from dreamer_magic import cached
calls = []
@cached("my-api")
def ask(i):
    calls.append(i)
    return {"q": i, "a": i * i}
answers = [ask(i) for i in range(3)]
"""


def test_a_damaged_cache_segment_in_the_remote_is_skipped_and_the_others_still_merge(ip, tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    bucket = tmp_path / "bucket"
    ip.run_line_magic("dreamer", f"remote file://{bucket}")
    try:
        assert ip.run_cell(ASK).success
        assert remote.get_remote().flush(60) and ip.user_ns["calls"] == [0, 1, 2]
        folder = bucket / ".cache" / "my-api.segments"
        header = json.dumps({"segment": 1})
        for i, bad in enumerate(["5", '{"key": {"k": 1}, "response": [1]}', '{"key": "k", "binary": true, "response": "zz"}']):
            (folder / f"0000-bad-{i}.jsonl").write_text(f"{header}\n{bad}\n")  # sorts before the good ones
        (folder / "0000-bad-replaces.jsonl").write_text(json.dumps({"segment": 1, "replaces": 5}) + "\n")
        ip.run_line_magic("dreamer", f"output {tmp_path / 'fresh'}")
        result = ip.run_cell(ASK)
        assert result.success, result.error_in_exec
        assert ip.user_ns["calls"] == [], ip.user_ns["calls"]  # every answer came from the good segments
        assert ip.user_ns["answers"] == [{"q": i, "a": i * i} for i in range(3)]
    finally:
        remote.set_remote(None)


@pytest.mark.parametrize(
    "damage, said",
    [
        ({"rebind": 5}, "`rebind`"),
        ({"outputs": ["values"]}, "`outputs`"),
        ({"outputs": {"values": {"path": "../../secret.txt", "type": "numpy.ndarray", "storage": "npy"}}}, "outside"),
        ({"files": {"../../../secret.txt": {"size": 6}}}, "outside"),
    ],
)
def test_a_wrongly_shaped_remote_step_json_is_a_miss_saying_why(ip, tmp_path, damage, said):
    pytest.importorskip("fsspec")
    import dreamer_magic
    from dreamer_magic import remote

    (tmp_path / "secret.txt").write_text("secret")
    bucket = tmp_path / "bucket"
    ip.run_line_magic("dreamer", f"remote file://{bucket}")
    try:
        ip.run_cell_magic("dreamer_step", "numbers", CELL)
        assert remote.get_remote().flush(60)
        meta = json.loads((bucket / "numbers" / "step.json").read_text())
        (bucket / "numbers" / "step.json").write_text(json.dumps({**meta, **damage}))
        ip.run_line_magic("dreamer", f"output {tmp_path / 'fresh'}")
        ip.run_cell_magic("dreamer_step", "numbers", CELL)
        status = dreamer_magic.last_status()
        assert status.state == "ran", status
        assert any("the remote copy was not used" in str(n) and said in str(n) for n in status.notes), status.notes
    finally:
        remote.set_remote(None)


def test_gc_with_an_unreachable_remote_says_so_in_one_line(ip, tmp_path, capsys, monkeypatch):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    ip.run_line_magic("dreamer", f"remote file://{tmp_path / 'bucket'}")
    try:
        def down(*args, **kwargs):
            raise ConnectionError("the network is down")

        monkeypatch.setattr(remote.get_remote().fs, "find", down)
        monkeypatch.setattr(remote.retry, "__defaults__", (1, 0.0))  # one attempt: no backoff waits
        ip.run_line_magic("dreamer", "gc")  # the local gc is done; the remote's part says why not
        out = capsys.readouterr().out
        assert "remote: segments not compacted" in out and "the network is down" in out, out
    finally:
        remote.set_remote(None)


def test_a_checkpoint_key_leading_out_of_the_trainer_is_not_a_checkpoint(bucket, monkeypatch):
    from dreamer_magic import remote

    url, fs, env = bucket
    prefix = url[len("s3://"):]
    for key in ("t/_checkpoints/../../../x/checkpoint-9", "t/_checkpoints/trainer-0/checkpoint-3", "t/_checkpoints/checkpoint-2"):
        fs.pipe_file(f"{prefix}/{key}/{remote.CHECKPOINT_MARKER}", b"{}")  # literal S3 keys
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    r = remote.Remote(url)
    try:  # the newest is resumed from: checkpoint-9 would have been pulled outside the trainer folder
        assert r.complete_checkpoints("t") == ["_checkpoints/checkpoint-2", "_checkpoints/trainer-0/checkpoint-3"]
    finally:
        r.close()


def test_a_push_over_a_damaged_remote_step_json_keeps_the_old_files_in_the_remote_backups(ip, tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    bucket = tmp_path / "bucket"
    ip.run_line_magic("dreamer", f"remote file://{bucket}")
    try:
        ip.run_cell_magic("dreamer_step", "numbers", CELL)
        assert remote.get_remote().flush(60)
        old = {p.relative_to(bucket / "numbers").as_posix(): p.read_bytes() for p in (bucket / "numbers").rglob("*") if p.is_file()}
        (bucket / "numbers" / "step.json").write_text('{"fingerprint": "ab", "outp')  # truncated: damaged
        ip.run_cell_magic("dreamer_step", "numbers", CELL.replace("10", "20"))
        assert remote.get_remote().flush(60) and not remote.get_remote().errors
        kept = list((bucket / "_backups" / "numbers").glob("incomplete-*"))
        assert len(kept) == 1, list((bucket / "_backups").rglob("*"))  # as a local damaged folder is kept aside
        for rel, data in old.items():
            if rel != "step.json":
                assert (kept[0] / rel).read_bytes() == data, rel
        assert json.loads((bucket / "numbers" / "step.json").read_text())["fingerprint"] != "ab"
    finally:
        remote.set_remote(None)


def test_checkpoints_another_run_left_behind_are_neither_resumed_from_nor_taken_for_this_runs(tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    bucket = tmp_path / "bucket"
    for n in (10, 30):  # what a push killed while removing the old run's checkpoints leaves behind
        old = bucket / "t" / "_checkpoints" / f"checkpoint-{n}"
        old.mkdir(parents=True)
        (old / "model.safetensors").write_bytes(b"old weights")
        (old / remote.CHECKPOINT_MARKER).write_text(json.dumps({"files": {"model.safetensors": {"size": 11}}, "fingerprint": "old"}))
    local = tmp_path / "output" / "t"
    mine = local / "_checkpoints" / "checkpoint-10"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_bytes(b"new")
    (local / ".in-progress.json").write_text(json.dumps({"fingerprint": "new"}))
    r = remote.Remote(f"file://{bucket}")
    try:
        assert r.complete_checkpoints("t", "new") == []  # a fresh machine would have resumed from old's checkpoint-30
        assert r.push_checkpoints(tmp_path / "output", "t", ".in-progress.json", lambda folder: True) == ["_checkpoints/checkpoint-10"]
        assert (bucket / "t" / "_checkpoints" / "checkpoint-10" / "model.safetensors").read_bytes() == b"new"
        assert r.complete_checkpoints("t", "new") == ["_checkpoints/checkpoint-10"]
    finally:
        r.close()


def test_a_step_never_pushes_over_a_trainer_of_its_name_in_the_remote(ip, tmp_path):
    pytest.importorskip("fsspec")
    from dreamer_magic import remote

    bucket = tmp_path / "bucket"
    trainer = bucket / "x"  # another machine's trainer `x`
    (trainer / "_model").mkdir(parents=True)
    (trainer / "_model" / "model.safetensors").write_bytes(b"weights")
    (trainer / "trainer.json").write_text(json.dumps({"fingerprint": "t" * 32, "name": "x", "kind": "trainer"}))
    ip.run_line_magic("dreamer", f"remote file://{bucket}")
    try:
        ip.run_cell_magic("dreamer_step", "x", CELL)
        assert remote.get_remote().flush(60)
        assert (trainer / "_model" / "model.safetensors").read_bytes() == b"weights"
        assert (trainer / "trainer.json").is_file() and not (trainer / "step.json").exists()
        assert any("trainer 'x'" in e for e in remote.get_remote().errors), remote.get_remote().errors
    finally:
        remote.set_remote(None)


def test_a_mistyped_lease_ttl_in_the_environment_falls_back_to_the_default(monkeypatch):
    from dreamer_magic import remote

    for text in ("30s", "-1", ""):
        monkeypatch.setenv("DREAMER_LEASE_TTL", text)
        assert remote._env_seconds("DREAMER_LEASE_TTL", 30.0) == 30.0
    monkeypatch.setenv("DREAMER_LEASE_TTL", "3")
    assert remote._env_seconds("DREAMER_LEASE_TTL", 30.0) == 3.0


def test_switching_remotes_says_it_waits_for_pending_uploads_and_what_it_gave_up(tmp_path, monkeypatch):
    import threading

    from dreamer_magic import remote

    monkeypatch.setattr(remote, "FLUSH_ON_EXIT", 0.3)
    old = remote.set_remote(f"file://{tmp_path / 'bucket'}")
    release = threading.Event()
    try:
        old.submit("push of `slow`", "slow", lambda task: release.wait(10))
        with pytest.warns(RuntimeWarning) as said:
            remote.set_remote(None)
        texts = [str(w.message) for w in said]
        assert any(t.startswith("finishing 1 upload(s) to ") for t in texts), texts
        assert any("gave up waiting" in t and "`slow`" in t for t in texts), texts
    finally:
        release.set()
        remote.set_remote(None)
