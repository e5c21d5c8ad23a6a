"""Clear errors for what a user can type or a disk can do (issue 12, item 7): one line each, and a
hit still works where only reading is needed. Through a real IPython shell."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pytest
from IPython.core.error import UsageError

from dreamer_magic import last_status
from dreamer_magic.errors import CacheWarning
from dreamer_magic.folders import NAME_MAX_BYTES, meta_shape_problem


def run(ip, name: str, body: str, magic: str = "dreamer_step") -> str:
    ip.run_cell_magic(magic, name, body)
    return last_status().state


def test_a_name_too_long_for_the_file_system_is_refused_up_front(ip, tmp_path):
    with pytest.raises(UsageError, match=r"80 characters are 240 bytes in UTF-8.*at most 200 bytes.*shorter name"):
        run(ip, "语" * 80, "x = 1")
    assert not any(p.name.startswith(".语") for p in (tmp_path / "output").iterdir())
    # the longest allowed, and a nested step under it whose lock name would pass 255 bytes
    name = "语" * (NAME_MAX_BYTES // 3)
    ip.run_cell("import dreamer_magic\n@dreamer_magic.step('" + "字" * 66 + "')\ndef inner(v):\n    return v + 1")
    assert run(ip, name, "x = inner(1)") == "ran"
    assert run(ip, name, "x = inner(1)") == "loaded from disk" and ip.user_ns["x"] == 2


def test_two_names_of_one_folder_are_refused_naming_both(ip, tmp_path):
    assert run(ip, "My Step", "y = 1") == "ran"
    with pytest.raises(UsageError, match=r"the step 'my-step' and the step 'My Step' map to the same folder 'my-step'.*--force"):
        run(ip, "my-step", "y = 2")
    assert last_status().state == "failed" and ip.user_ns["y"] == 1
    assert run(ip, "My Step", "y = 1") == "loaded from disk"  # the first one's result is untouched
    with pytest.raises(UsageError, match=r"the trainer 'my step' and the step 'My Step' map to the same folder"):
        run(ip, "my step", "y = 3", magic="dreamer_train")
    ip.run_cell_magic("dreamer_step", "my-step --force", "y = 2")  # a rename: --force takes the folder over
    assert ip.user_ns["y"] == 2 and run(ip, "my-step", "y = 2") == "loaded from disk"
    with pytest.raises(UsageError, match="the step 'My Step' and the step 'my-step'"):
        run(ip, "My Step", "y = 1")
    # a folder written before names were recorded keeps working under either name
    meta_path = tmp_path / "output" / "my-step" / "step.json"
    meta = json.loads(meta_path.read_text())
    del meta["name"]
    meta_path.write_text(json.dumps(meta))
    assert run(ip, "my-step", "y = 2") == "loaded from disk"


def _good(meta: dict) -> dict:
    return json.loads(json.dumps(meta))


DAMAGES = {
    "not UTF-8": lambda m: b"\xff\xfe{\x00",
    "a list": lambda m: b"[1, 2]",
    "outputs a list": lambda m: {**m, "outputs": ["y"]},
    "an output a string": lambda m: {**m, "outputs": {"y": "_outputs/y.json"}},
    "a number as text": lambda m: {**m, "duration": "3 s"},
    "inputs a list": lambda m: {**m, "components": {**m["components"], "inputs": ["x"]}},
    "dependencies of the wrong shape": lambda m: {**m, "dependencies": {"files": [{"path": 3}]}},
    "deleted names not strings": lambda m: {**m, "deleted": [1]},
}


def test_a_damaged_or_wrongly_shaped_step_json_is_a_damaged_folder_not_a_traceback(ip, tmp_path):
    ip.user_ns["x"] = 1
    body = "y = [x, 2]\nprint('computed')"
    assert run(ip, "s", body) == "ran"
    folder = tmp_path / "output" / "s"
    good = json.loads((folder / "step.json").read_text())
    kept_aside = 0
    for label, damage in DAMAGES.items():
        damaged = damage(_good(good))
        (folder / "step.json").write_bytes(damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
        overview = ip.run_line_magic("dreamer", "status")
        assert "damaged" in overview.text or "corrupt" in overview.text or label == "dependencies of the wrong shape", label
        ip.run_line_magic("dreamer", "why s")  # never a traceback
        state = run(ip, "s", body)
        assert state == "ran", label
        assert ip.user_ns["y"] == [1, 2]
        kept = sorted((tmp_path / "output" / "_backups" / "s").glob("incomplete-*"))
        reasons = " ".join(map(str, last_status().reasons))
        assert "damaged" in reasons or "corrupt" in reasons, (label, reasons)
        if label != "dependencies of the wrong shape":  # that one is a valid folder whose record re-runs
            kept_aside += 1
        assert len(kept) == kept_aside, label  # the damaged folder is kept aside, never deleted
        assert run(ip, "s", body) == "loaded from disk", label


def test_a_damaged_trainer_json_is_a_miss_and_the_overview_names_it(ip, tmp_path):
    assert run(ip, "t", "y = 1", magic="dreamer_train") == "ran"
    path = tmp_path / "output" / "t" / "trainer.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "losses": [["a", "b"]]}))
    assert "damaged: `losses`" in ip.run_line_magic("dreamer", "status").text
    assert run(ip, "t", "y = 1", magic="dreamer_train") == "ran"
    assert run(ip, "t", "y = 1", magic="dreamer_train") == "loaded from disk"


def test_meta_shape_problem_accepts_what_steps_write_and_names_what_is_wrong():
    assert meta_shape_problem({"fingerprint": "f", "outputs": {"y": {"path": None, "type": "int"}}, "duration": 0}) is None
    assert meta_shape_problem({"fingerprint": "f", "final_step": True}) == "`final_step` is not a number"
    assert meta_shape_problem({"fingerprint": "f", "components": {"libraries": []}}) == "`components.libraries` is not an object"
    # records read without that check (a trainer's .in-progress.json) still explain, never raise
    from dreamer_magic.steps import why

    for record in ({"components": [1], "source": 3}, {"components": {"inputs": ["x"], "libraries": 2}, "input_previews": []}):
        assert why({"fingerprint": "f", **record}, {"format": 1, "inputs": {"x": "a"}, "libraries": {}}, "x = 1")


def can_mount() -> bool:
    return os.geteuid() == 0 and not os.environ.get("DREAMER_TEST_NO_MOUNT")


@contextlib.contextmanager
def read_only(path):
    """``path`` read-only for real: a read-only bind mount of it onto itself (root only)."""
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True) if can_mount() else None
    if done is None or done.returncode != 0:
        pytest.skip("cannot bind-mount here: test_a_read_only_folder_simulated_at_the_os_layer covers it")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)  # lazy: never left mounted


def test_a_read_only_output_folder_still_hits_and_a_miss_says_it_is_read_only(ip, tmp_path):
    assert run(ip, "s", "y = 1") == "ran"
    assert run(ip, "s", "y = 2") == "ran"  # y = 1 is now a backup
    assert run(ip, "t", "m = 1", magic="dreamer_train") == "ran"
    ip.run_cell("from dreamer_magic import cached\ncalls = []\n@cached('api')\ndef double(x):\n    calls.append(x)\n    return 2 * x\ndouble(1)")
    ip.run_cell("double.database().close()")  # a fresh kernel, as far as the cache knows
    output = tmp_path / "output"
    with read_only(output):
        with pytest.warns(CacheWarning, match="could not be written"):
            assert ip.ev("double(1), double(2)") == (2, 4) and ip.user_ns["calls"] == [1, 2]  # a hit reads
        with pytest.raises(OSError):
            (output / "probe").write_text("x")
        assert run(ip, "s", "y = 2") == "loaded from disk" and ip.user_ns["y"] == 2
        assert run(ip, "s", "y = 1") == "restored from backup" and ip.user_ns["y"] == 1
        assert any("read-only" in str(n) for n in last_status().notes)
        assert run(ip, "t", "m = 1", magic="dreamer_train") == "loaded from disk"
        for magic in ("dreamer_step", "dreamer_train"):
            with pytest.raises(UsageError, match=r"^the output folder '.*' is read-only \(Read-only file system\).*`%dreamer output PATH`$"):
                run(ip, "new", "z = 3", magic=magic)
        assert "complete" in ip.run_line_magic("dreamer", "status").text
        ip.run_cell("double.database().close()")  # let go of the file, so that it can be unmounted
    with pytest.warns(CacheWarning, match="now written"):
        assert ip.ev("double.database().flush()") == 0  # writable again: the kept result is written


READ_ONLY_HOOK = """
import errno, os, sys
_root = os.path.realpath(os.path.join(os.getcwd(), "output"))

def _read_only(event, args):  # what a read-only mount answers, for every write Python makes under it
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
            (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC))
        paths = [path] if writes else []
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.link", "os.symlink", "os.truncate"):
        paths = [] if event == "os.mkdir" and os.path.exists(args[0]) else [args[0]]  # mkdir of what exists: EEXIST
    elif event == "os.rename":
        paths = list(args[:2])
    else:
        return
    for path in paths:
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(_root):
            raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

sys.addaudithook(_read_only)
"""


def test_a_read_only_folder_simulated_at_the_os_layer(tmp_path):
    """Where no read-only mount can be made (not root), the same checks in a child process whose
    every write under the output folder fails with EROFS, as a read-only mount's would."""
    if can_mount():
        pytest.skip("a real read-only bind mount is tested instead")
    from _session import session

    first = session(tmp_path, ["%%dreamer_step s\ny = 1", "%%dreamer_step s\ny = 2", "%%dreamer_train t\nm = 1"])
    assert first.states == ["ran", "ran", "ran"], first.errors
    second = session(
        tmp_path,
        [READ_ONLY_HOOK, "%%dreamer_step s\ny = 2", "%%dreamer_step s\ny = 1", "%%dreamer_train t\nm = 1",
         "%%dreamer_step new\nz = 3", "%%dreamer_train new2\nz = 3", "%dreamer status"],
        dump=["y", "m"],
    )
    assert second.states == ["loaded from disk", "restored from backup", "loaded from disk", "failed", "failed"], second.errors
    assert second.values["y"]["repr"] == "1" and second.values["m"]["repr"] == "1"
    assert len(second.errors) == 2 and all("is read-only (Read-only file system)" in e for e in second.errors), second.errors


def test_return_yield_break_await_name_the_editor_line_before_anything_runs(ip, tmp_path, capsys):
    for body, message in [
        ("print('ran')\nif True:\n    return 1", r"`return` at the top level of the cell \(line 4\)"),
        ("print('ran')\nyield 1", r"`yield` at the top level of the cell \(line 3\)"),
        ("print('ran')\nbreak", r"`break` outside a loop in the cell \(line 3\)"),
        ("for i in range(2):\n    pass\ncontinue", r"`continue` outside a loop in the cell \(line 4\)"),
        ("import asyncio\nawait asyncio.sleep(0)", r"top-level `await` in the cell \(line 3\)"),
    ]:
        with pytest.raises(UsageError, match=message):
            run(ip, "early", body)
    assert "ran" not in capsys.readouterr().out
    assert not (tmp_path / "output" / "early").exists()


def test_ctrl_c_is_one_line_and_a_commit_is_never_cut_in_half(ip, tmp_path, monkeypatch):
    from dreamer_magic import folders

    assert run(ip, "s", "y = 1") == "ran"
    with pytest.raises(UsageError, match=r"^interrupted: nothing saved, the previous result is kept$"):
        run(ip, "s", "y = 2\nraise KeyboardInterrupt")
    assert run(ip, "s", "y = 1") == "loaded from disk"

    # Ctrl-C while the result is being saved (before the commit): nothing is saved
    original_write = folders.write_json_atomic

    def interrupted_save(path, data):
        if path.name == "step.json":
            raise KeyboardInterrupt
        return original_write(path, data)

    monkeypatch.setattr(folders, "write_json_atomic", interrupted_save)
    with pytest.raises(UsageError, match=r"^interrupted: nothing saved, the previous result is kept$"):
        run(ip, "s", "y = 3")
    monkeypatch.undo()
    assert run(ip, "s", "y = 1") == "loaded from disk"
    assert not [p for p in (tmp_path / "output").iterdir() if ".tmp-" in p.name]

    # a real SIGINT in the middle of the commit (between the backup and the rename) waits for it
    original_move = folders.OutputFolder.move_to_backup

    def move_then_signal(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return original_move(self, *args, **kwargs)

    monkeypatch.setattr(folders.OutputFolder, "move_to_backup", move_then_signal)
    with pytest.raises(UsageError, match=r"^interrupted after the result was saved: it is kept and loads on the next run$"):
        run(ip, "s", "y = 4")
    monkeypatch.undo()
    assert run(ip, "s", "y = 4") == "loaded from disk" and ip.user_ns["y"] == 4


def test_data_is_fsynced_before_the_step_json_that_commits_it(ip, tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst, *a, **kw):
        events.append(("rename", f"{src} -> {dst}"))
        return real_rename(src, dst, *a, **kw)

    ip.run_cell("import pandas as pd\nraw = pd.DataFrame({'a': [1, 2]})")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    assert run(ip, "s", "df = raw.assign(b=raw.a * 2)\nz = {'k': 1}\nprint('hi')") == "ran"
    monkeypatch.undo()
    synced = [p for kind, p in events if kind == "fsync"]
    meta_at = next(i for i, (kind, p) in enumerate(events) if kind == "fsync" and "/.step.json.tmp-" in p)
    commit_at = next(i for i, (kind, p) in enumerate(events) if kind == "rename" and p.endswith("/output/s"))
    folder = tmp_path / "output" / "s"
    for path in folder.rglob("*"):
        if path.name == "step.json":
            continue
        tmp_name = [p for p in synced if p.endswith(str(path.relative_to(folder)))]
        assert tmp_name, f"{path} was never fsynced"
        first = next(i for i, (kind, p) in enumerate(events) if kind == "fsync" and p == tmp_name[0])
        assert first < meta_at, f"{path} was fsynced after step.json"
    assert meta_at < commit_at
    assert any(kind == "fsync" and p == str(tmp_path / "output") for kind, p in events[commit_at:])
