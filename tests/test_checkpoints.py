"""The resume decision (a pure function over plain facts), the facts read from real folders,
and the import order of the trainer modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dreamer_magic.checkpoints import (
    BACK_UP_THEN_START,
    RESUME_FROM_BACKUP,
    RESUME_IN_PLACE,
    START,
    UnfinishedBackup,
    decide_resume,
    pick_unfinished,
    read_resume_facts,
)

FP = "f-now"
CHANGES = ["code changed: line 2"]


def decide(**facts):
    options = {"fingerprint": FP, "force": False, "resume": True, "folder_exists": False}
    options.update(facts)
    return decide_resume(**options)


def unfinished(key="_backups/sft/incomplete-1", fp=FP, step=10, mtime=1.0):
    return UnfinishedBackup(key=key, fingerprint=fp, step=step, mtime=mtime)


# -- nothing in place ---------------------------------------------------------------------------


def test_nothing_anywhere_starts():
    d = decide()
    assert (d.action, d.back_up, d.backup, d.reasons, d.kept, d.reusable) == (START, False, None, None, None, False)
    assert not d.resumes


def test_an_unfinished_backup_of_this_fingerprint_is_resumed():
    d = decide(incomplete_backups=[unfinished()])
    assert d.action == RESUME_FROM_BACKUP and d.resumes and d.reusable
    assert d.backup == "_backups/sft/incomplete-1" and not d.back_up
    assert d.reasons == ("an unfinished training of this cell was kept in _backups/sft/incomplete-1: resuming it",)


@pytest.mark.parametrize(("force", "resume", "reusable"), [(True, True, True), (False, False, False), (True, False, False)])
def test_force_or_no_resume_start_over_instead(force, resume, reusable):
    d = decide(force=force, resume=resume, incomplete_backups=[unfinished()])
    assert d.action == START and d.backup is None and not d.resumes
    assert d.reusable is reusable  # the fingerprint's question ignores --force, not --no-resume


def test_an_unfinished_backup_without_a_complete_checkpoint_or_of_another_fingerprint_is_not_resumed():
    d = decide(incomplete_backups=[unfinished(step=None), unfinished(key="other", fp="f-old")])
    assert d.action == START and not d.reusable


def test_the_backup_with_the_newest_complete_checkpoint_wins_then_the_newest():
    backups = [
        unfinished(key="a", step=20, mtime=1.0),
        unfinished(key="b", step=30, mtime=0.5),
        unfinished(key="c", step=30, mtime=2.0),
        unfinished(key="d", step=90, fp="f-old"),
        unfinished(key="e", step=None, mtime=9.0),
    ]
    assert decide(incomplete_backups=backups).backup == "c"
    assert pick_unfinished(backups, "f-old").key == "d"
    assert pick_unfinished(backups, "f-none") is None


def test_a_complete_backup_makes_the_fingerprint_reusable():
    assert decide(complete_backup=True).reusable
    assert decide(complete_backup=True).action == START  # restoring it is the step lifecycle's job


# -- an unfinished training in place ---------------------------------------------------------------


@pytest.mark.parametrize("has_checkpoint", [True, False])
def test_the_unfinished_training_of_this_fingerprint_is_resumed_in_place(has_checkpoint):
    d = decide(folder_exists=True, marker={"fingerprint": FP}, has_complete_checkpoint=has_checkpoint)
    assert d.action == RESUME_IN_PLACE and d.resumes and not d.back_up
    assert d.reasons == ("the previous training of this cell did not finish: resuming it",)
    assert d.reusable is has_checkpoint


def test_resuming_in_place_comes_before_a_backup():
    d = decide(folder_exists=True, marker={"fingerprint": FP}, incomplete_backups=[unfinished()])
    assert d.action == RESUME_IN_PLACE and d.backup is None


@pytest.mark.parametrize(("force", "resume", "reason"), [(True, True, "--force"), (False, False, "--no-resume: starting over")])
def test_force_or_no_resume_back_up_the_unfinished_training(force, resume, reason):
    d = decide(folder_exists=True, marker={"fingerprint": FP}, force=force, resume=resume, incomplete_backups=[unfinished()])
    assert d.action == BACK_UP_THEN_START and d.back_up and d.backup is None
    assert d.reasons == (reason,)
    assert d.kept == "the unfinished training (checkpoints)"


def test_an_unfinished_training_of_another_fingerprint_is_kept_and_says_what_changed():
    d = decide(folder_exists=True, marker={"fingerprint": "f-old"}, changes=CHANGES)
    assert d.action == BACK_UP_THEN_START and d.back_up
    assert d.reasons == ("code changed: line 2", "the unfinished training was kept")
    assert d.kept == "the unfinished training (checkpoints)" and not d.reusable


def test_another_unfinished_training_is_backed_up_before_resuming_this_ones_backup():
    d = decide(folder_exists=True, marker={"fingerprint": "f-old"}, changes=CHANGES, incomplete_backups=[unfinished()])
    assert d.action == RESUME_FROM_BACKUP and d.back_up and d.backup == "_backups/sft/incomplete-1"
    assert d.kept == "the unfinished training (checkpoints)"
    assert d.reasons == ("an unfinished training of this cell was kept in _backups/sft/incomplete-1: resuming it",)


# -- a finished trainer or something else in place -------------------------------------------------


def test_a_finished_trainer_of_another_fingerprint_is_backed_up_and_the_reasons_kept():
    d = decide(folder_exists=True, folder_meta={"fingerprint": "f-old"}, marker=None)
    assert d.action == BACK_UP_THEN_START and d.back_up
    assert d.reasons is None  # the lifecycle's "why" (what changed since that trainer) stands
    assert d.kept == "the previous trainer" and not d.reusable


def test_a_finished_trainer_with_a_stray_marker_counts_as_finished():
    d = decide(folder_exists=True, folder_meta={"fingerprint": "f-old"}, marker={"fingerprint": FP}, has_complete_checkpoint=True)
    assert d.action == BACK_UP_THEN_START and d.reasons is None and d.kept == "the previous trainer"


def test_a_finished_trainer_of_this_fingerprint_is_reusable_and_forced_away():
    d = decide(folder_exists=True, folder_meta={"fingerprint": FP}, force=True)
    assert d.reusable and d.action == BACK_UP_THEN_START and d.kept == "the previous trainer"


def test_a_folder_with_neither_metadata_nor_marker_is_backed_up():
    d = decide(folder_exists=True)
    assert (d.action, d.back_up, d.reasons, d.kept) == (BACK_UP_THEN_START, True, None, "the unfinished training (checkpoints)")


def test_the_decision_reads_only_what_it_is_given():
    marker, backups = {"fingerprint": FP}, [unfinished()]
    before = (json.dumps(marker), list(backups))
    decide(folder_exists=True, marker=marker, incomplete_backups=backups)
    assert (json.dumps(marker), list(backups)) == before


# -- the facts, read from real folders --------------------------------------------------------------


def checkpoint(folder: Path, step: int, complete: bool = True) -> None:
    path = folder / "_checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "weights.bin").write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "dreamer_files": ["weights.bin"]}))


def test_facts_from_disk_and_the_decisions_they_lead_to(tmp_path):
    root = tmp_path / "output"
    here, backups = root / "sft", root / "_backups" / "sft"
    here.mkdir(parents=True)
    (here / ".in-progress.json").write_text(json.dumps({"fingerprint": "f1"}))
    checkpoint(here, 5)
    checkpoint(here, 10, complete=False)
    kept = backups / "incomplete-20240101-000000-abcd"
    kept.mkdir(parents=True)
    (kept / ".in-progress.json").write_text(json.dumps({"fingerprint": "f2"}))
    checkpoint(kept, 7)
    checkpoint(kept, 9, complete=False)
    finished = backups / "f3"
    finished.mkdir()
    (finished / "trainer.json").write_text(json.dumps({"fingerprint": "f3", "outputs": {}}))

    f1 = read_resume_facts(here, backups, root, "f1")
    assert f1["folder_exists"] and f1["folder_meta"] is None and f1["marker"] == {"fingerprint": "f1"}
    assert f1["has_complete_checkpoint"] and not f1["complete_backup"] and f1["incomplete_backups"] == []
    assert decide_resume(fingerprint="f1", force=False, resume=True, **f1).action == RESUME_IN_PLACE

    f2 = read_resume_facts(here, backups, root, "f2")
    assert not f2["has_complete_checkpoint"]
    [backup] = f2["incomplete_backups"]
    assert (backup.key, backup.fingerprint, backup.step) == ("_backups/sft/incomplete-20240101-000000-abcd", "f2", 7)
    d2 = decide_resume(fingerprint="f2", force=False, resume=True, **f2)
    assert d2.action == RESUME_FROM_BACKUP and d2.back_up and d2.backup == backup.key

    f3 = read_resume_facts(here, backups, root, "f3")
    assert f3["complete_backup"] and decide_resume(fingerprint="f3", force=False, resume=True, **f3).reusable

    nothing = read_resume_facts(root / "other", root / "_backups" / "other", root, "f1")
    assert nothing == {
        "folder_exists": False,
        "folder_meta": None,
        "marker": None,
        "has_complete_checkpoint": False,
        "complete_backup": False,
        "incomplete_backups": [],
    }
    # reading the facts moved nothing aside (the incomplete checkpoint-10 is still there)
    assert (here / "_checkpoints" / "checkpoint-10").is_dir()


# -- import order -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "not_above"),
    [
        ("checkpoints", ["checkpointer", "hf_trainer", "trainers"]),
        ("checkpointer", ["hf_trainer", "trainers"]),
        ("hf_trainer", ["checkpointer", "trainers"]),
    ],
)
def test_each_trainer_module_imports_only_those_above_it(module, not_above):
    code = (
        f"import sys, dreamer_magic.{module}; "
        f"print([m for m in {not_above!r} if 'dreamer_magic.' + m in sys.modules]); "
        "print([m for m in ('torch', 'transformers', 'IPython') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "[]"
