"""`%dreamer gc`: a lifecycle operation (locked, trash first), complete backups first, leftovers swept.

The crash points of gc are in test_crash_points.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import dreamer_magic
from dreamer_magic.folders import read_meta
from dreamer_magic.status import RESTORED


def _run(ip, a):
    ip.user_ns["a"] = a
    ip.run_cell_magic("dreamer_step", "s", "b = a + 1\n")
    return read_meta(ip_output(ip) / "s", "step.json")[0]["fingerprint"]


def ip_output(ip):
    from dreamer_magic.folders import get_output_folder

    return get_output_folder()


def test_gc_keeps_complete_backups_first_sweeps_leftovers_and_never_follows_a_symlink_out(ip, tmp_path, capsys):
    out = tmp_path / "output"
    fp1, fp2, _ = _run(ip, 1), _run(ip, 2), _run(ip, 3)
    backups = out / "_backups" / "s"
    old = time.time() - 3600
    # the newest backup is incomplete: it must not outrank the complete ones
    incomplete = backups / "incomplete-20260101-000000-abcd"
    incomplete.mkdir()
    (incomplete / "_outputs").mkdir()
    # what killed runs and operations leave behind
    leftovers = [
        out / ".s.tmp-4242-0badc0de",
        backups / f".{fp1}.trash-0badc0de",
        out / "t" / "_checkpoints" / ".checkpoint-3.tmp-4242-0badc0de",
        out / "t" / "_checkpoints" / ".checkpoint-2.trash-0badc0de",
        out / "t" / "_checkpoints" / ".skipped-checkpoint-2",
    ]
    for path in leftovers:
        path.mkdir(parents=True)
        (path / "weights.bin").write_bytes(b"x" * 1000)
    (out / "t" / ".trainer.json.tmp-4242-0badc0de").write_text("{")
    leftovers.append(out / "t" / ".trainer.json.tmp-4242-0badc0de")
    (out / "t" / "_checkpoints" / "checkpoint-1").mkdir()
    # symlinks out of the output folder: a backup that is one, and one inside a backup
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "fake").mkdir(parents=True)
    (elsewhere / "fake" / "step.json").write_text('{"fingerprint": "fake", "outputs": {}}')
    (elsewhere / "precious.txt").write_text("keep me")
    (backups / "fake").symlink_to(elsewhere / "fake", target_is_directory=True)
    os.utime(backups / "fake", (old - 120, old - 120), follow_symlinks=False)
    (backups / fp1 / "link").symlink_to(elsewhere)
    os.utime(backups / fp1, (old - 60, old - 60))
    os.utime(backups / fp2, (old, old))
    capsys.readouterr()

    ip.run_line_magic("dreamer", "gc --keep 1")

    printed = capsys.readouterr().out
    assert re.search(r"removed 2 backups, freed [5-9]\.\d KB", printed), printed  # leftovers count too
    assert "swept 6 leftovers of interrupted runs" in printed
    assert "left _backups/s/fake alone: it is a symlink" in printed
    assert sorted(p.name for p in backups.iterdir()) == sorted([fp2, "fake"])
    assert not any(p.exists() for p in leftovers)
    assert (out / "t" / "_checkpoints" / "checkpoint-1").is_dir()  # a checkpoint is not a leftover
    assert (elsewhere / "precious.txt").read_text() == "keep me" and (elsewhere / "fake" / "step.json").exists()
    # the backup kept is the good one: reverting restores it
    assert _run(ip, 2) == fp2
    assert dreamer_magic.last_status().state == RESTORED


HOLD = """
import sys
from dreamer_magic.folders import OutputFolder
with OutputFolder(sys.argv[1]).lock("s"):
    print("HELD", flush=True)
    sys.stdin.read()
"""


def test_gc_leaves_a_step_another_process_holds_alone(ip, tmp_path, capsys):
    out = tmp_path / "output"
    fp1 = _run(ip, 1)
    _run(ip, 2)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "HELD"
        capsys.readouterr()
        ip.run_line_magic("dreamer", "gc")
        printed = capsys.readouterr().out
        assert "removed 0 backups" in printed
        assert "skipped `s`: another kernel is running it" in printed
        assert (out / "_backups" / "s" / fp1 / "step.json").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    ip.run_line_magic("dreamer", "gc")
    assert "removed 1 backup," in capsys.readouterr().out
    assert list((out / "_backups" / "s").iterdir()) == []


def test_gc_leaves_a_backups_folder_that_is_a_symlink_alone(tmp_path):
    from dreamer_magic.folders import OutputFolder

    elsewhere = tmp_path / "big-disk" / "s" / "0123abcd"
    elsewhere.mkdir(parents=True)
    (elsewhere / "step.json").write_text('{"fingerprint": "0123abcd", "outputs": {}}')
    (elsewhere.parent / ".0123abcd.trash-0badc0de").mkdir()
    out = OutputFolder(tmp_path / "output")
    out.ensure()
    (out.root / "_backups").symlink_to(tmp_path / "big-disk", target_is_directory=True)
    report = out.gc()
    assert report.removed == [] and report.refused == ["_backups"]
    assert (elsewhere / "step.json").exists() and (elsewhere.parent / ".0123abcd.trash-0badc0de").exists()
    assert "left _backups alone" in "\n".join(report.lines())


def test_a_leftover_made_after_a_remembered_listing_is_still_swept(tmp_path, monkeypatch):
    """The output folder's listing is remembered by its stamp (a hit lists it every time); a
    temporary folder left there later moves the stamp and is found by the next sweep."""
    import time

    from dreamer_magic import folders, integrity

    monkeypatch.setattr(integrity, "_RACY_NS", 0)  # remember even a folder changed just now
    out = folders.OutputFolder(tmp_path / "output")
    out.ensure()
    final = out.path("s")
    final.mkdir()
    assert out.sweep(final) == {}
    assert os.fspath(out.root) in folders._LISTED and out.sweep(final) == {}  # remembered
    time.sleep(0.02)  # past the file system's clock tick
    leftover = out.root / ".s.tmp-123-0badc0de"
    leftover.mkdir()
    assert list(out.sweep(final)) == [leftover] and not leftover.exists()
