"""Training checkpoints: are they complete, which is the latest, and whether a trainer resumes.

Nothing here trains or imports torch. :func:`check_checkpoint` tells why a ``checkpoint-N``
folder cannot be resumed from (a file missing or truncated because the process died while
writing it); :func:`list_checkpoints` and :func:`latest_checkpoint` list them.
:func:`decide_resume` is the resume decision as a pure function over plain facts that the
trainer lifecycle reads from disk with :func:`read_resume_facts`.

Examples
--------
>>> checkpoint_step("checkpoint-300")
300
>>> decide_resume(fingerprint="abc", force=False, resume=True, folder_exists=False).action
'start'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .folders import folder_size, read_json, read_meta
from .status import CheckpointInfo, Status

__all__ = [
    "ResumeDecision",
    "UnfinishedBackup",
    "check_checkpoint",
    "checkpoint_step",
    "decide_resume",
    "is_main_process",
    "latest_checkpoint",
    "list_checkpoints",
    "read_resume_facts",
]

TRAINER_FILE = "trainer.json"
IN_PROGRESS = ".in-progress.json"
CHECKPOINTS = "_checkpoints"
STATE_FILE = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_main_process() -> bool:
    """True unless this is a non-main process of a distributed run (rank > 0).

    Examples
    --------
    >>> is_main_process()  # doctest: +SKIP
    True

    Uses ``torch.distributed``'s rank when it is initialised, else the ``RANK`` (or, failing
    that, ``LOCAL_RANK``) environment variable that ``torchrun`` and ``accelerate`` set. Only
    the main process writes checkpoints, ``_model`` and ``trainer.json``.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        if dist is not None and dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                return int(value) == 0
            except ValueError:
                continue
    return True


# -- one checkpoint ------------------------------------------------------------------------------


def checkpoint_step(path: Path | str) -> int | None:
    """``checkpoint-300`` -> 300; anything else -> None.

    Examples
    --------
    >>> checkpoint_step("out/_checkpoints/checkpoint-40"), checkpoint_step("runs")
    (40, None)
    """
    m = _CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def _check_safetensors(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__})"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + n + max(ends, default=0) > size:
        return f"{path.name} is truncated"
    return None


def _check_torch_file(path: Path) -> str | None:
    """A ``torch.save`` file: new-style files are zip archives, complete when the end record is there."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(2) != b"PK":
                return None if size > 0 else f"{path.name} is empty"
            f.seek(max(0, size - 65_557))
            tail = f.read()
    except OSError as e:
        return f"{path.name} is unreadable ({e.strerror})"
    end = tail.rfind(b"PK\x05\x06")  # the end-of-central-directory record: 22 bytes + a comment
    if end < 0 or end + 22 > len(tail):
        return f"{path.name} is truncated"
    (comment,) = struct.unpack("<H", tail[end + 20 : end + 22])
    return None if end + 22 + comment == len(tail) else f"{path.name} is truncated"


def _check_file(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    name = path.name
    if name.endswith(".safetensors"):
        return _check_safetensors(path)
    if name.endswith((".pt", ".pth", ".bin")):
        return _check_torch_file(path)
    if name.endswith(".json"):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return f"{name} is corrupt"
    return None


def _check_weights(path: Path) -> str | None:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.exists():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"{index_name} is corrupt"
            for shard in sorted(shards):
                problem = _check_file(path / shard)
                if problem:
                    return problem
            return None
    for name in ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin"):
        if (path / name).exists():
            return _check_file(path / name)
    if any(p.is_dir() and p.name.startswith(("global_step", "pytorch_model_fsdp")) for p in path.iterdir()):
        return None  # DeepSpeed / FSDP: the engine validates its own files
    return "the model weights are missing"


def check_checkpoint(path: Path, *, need_optimizer: bool = True) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, or ``None`` if it is complete.

    Examples
    --------
    >>> check_checkpoint(Path("output/sft/_checkpoints/checkpoint-300"))  # doctest: +SKIP
    'trainer_state.json is missing'

    Complete means: ``trainer_state.json`` (written last by transformers and by the
    ``Checkpointer``) parses and names the folder's step, the model weights are there and
    whole (safetensors headers and sizes, ``torch.save`` archives' end records), and so are the
    optimizer and scheduler states (unless ``need_optimizer`` is false: ``save_only_model``).
    A checkpoint that was being written when the process died fails one of these.
    """
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError):
        return f"{STATE_FILE} is corrupt"
    if not isinstance(state, dict):
        return f"{STATE_FILE} is corrupt"
    step, saved_step = checkpoint_step(path), state.get("global_step")
    if step is not None and isinstance(saved_step, int) and saved_step != step:
        return f"{STATE_FILE} says step {saved_step}, not {step}"
    files = state.get("dreamer_files")
    if isinstance(files, list):  # written by Checkpointer: it lists its files
        for name in files:
            problem = _check_file(path / str(name))
            if problem:
                return problem
        return None
    problem = _check_weights(path)
    if problem:
        return problem
    if need_optimizer and not any(p.name.startswith("global_step") for p in path.iterdir() if p.is_dir()):
        optimizers = [p for p in path.iterdir() if p.name == "optimizer.pt" or p.name.endswith("-optimizer.pt") or p.name == "optimizer.bin"]
        if not optimizers:
            return "the optimizer state (optimizer.pt) is missing"
        for p in optimizers:
            problem = _check_file(p)
            if problem:
                return problem
        scheduler = path / "scheduler.pt"
        if scheduler.exists():
            problem = _check_file(scheduler)
            if problem:
                return problem
        elif not (path / "scheduler.bin").exists():
            return "the scheduler state (scheduler.pt) is missing"
    return None


def read_state(checkpoint: Path) -> dict:
    """A checkpoint's ``trainer_state.json`` (``{}`` if it is missing or unreadable)."""
    return read_json(Path(checkpoint) / STATE_FILE) or {}


def losses_from_state(state: dict) -> list[tuple[int, float]]:
    """``(step, loss)`` points of a ``trainer_state.json``'s log history."""
    out = []
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and "loss" in entry and "step" in entry:
            with contextlib.suppress(TypeError, ValueError):
                out.append((int(entry["step"]), float(entry["loss"])))
    return out


# -- the checkpoints of a trainer ------------------------------------------------------------------


def list_checkpoints(folder: Path, *, validate: bool = True) -> list[CheckpointInfo]:
    """The ``checkpoint-N`` folders under ``folder``, oldest step first.

    Examples
    --------
    >>> [c.name for c in list_checkpoints(Path("output/sft/_checkpoints"))]  # doctest: +SKIP
    ['checkpoint-100', 'checkpoint-200']
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    out = []
    for child in folder.iterdir():
        step = checkpoint_step(child)
        if step is None or not child.is_dir():
            continue
        with contextlib.suppress(OSError):
            out.append(
                CheckpointInfo(
                    name=child.name,
                    step=step,
                    time=child.stat().st_mtime,
                    size=folder_size(child),
                    complete=(check_checkpoint(child, need_optimizer=False) is None) if validate else True,
                )
            )
    out.sort(key=lambda c: c.step)
    return out


def latest_checkpoint(
    folder: Path, *, need_optimizer: bool = True, status: Status | None = None, move_aside: bool = True
) -> Path | None:
    """The newest complete checkpoint under ``folder``; incomplete newer ones are skipped.

    Examples
    --------
    >>> latest_checkpoint(Path("output/sft/_checkpoints"), move_aside=False)  # doctest: +SKIP
    PosixPath('output/sft/_checkpoints/checkpoint-200')

    Each skipped checkpoint is named in ``status.skipped_checkpoints`` (its reason in
    ``status.notes``) and, when ``move_aside``, renamed to ``.skipped-checkpoint-N`` so that
    training can write a fresh ``checkpoint-N`` when it gets there again.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    candidates = sorted(
        (p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None),
        key=lambda p: checkpoint_step(p),  # type: ignore[arg-type, return-value]
        reverse=True,
    )
    for path in candidates:
        problem = check_checkpoint(path, need_optimizer=need_optimizer)
        if problem is None:
            return path
        if status is not None and path.name not in status.skipped_checkpoints:
            status.skipped_checkpoints.append(path.name)
            status.notes.append(f"skipped {path.name}: {problem} (it was being written when training stopped)")
        if move_aside:
            aside = folder / f".skipped-{path.name}"
            with contextlib.suppress(OSError):
                if aside.exists():
                    shutil.rmtree(aside)
                os.rename(path, aside)
    return None


# -- the resume decision ------------------------------------------------------------------------

RESUME_IN_PLACE = "resume-in-place"
RESUME_FROM_BACKUP = "resume-from-backup"
BACK_UP_THEN_START = "back-up-then-start"
START = "start"


@dataclass(frozen=True)
class UnfinishedBackup:
    """An unfinished training kept in ``_backups`` (an ``incomplete-…`` folder).

    ``key``: its folder relative to the output folder (as the status names it);
    ``fingerprint``: the one its ``.in-progress.json`` records; ``step``: the step of its
    newest complete checkpoint (``None`` when none is complete); ``mtime``: breaks ties.
    """

    key: str
    fingerprint: str | None
    step: int | None
    mtime: float = 0.0


@dataclass(frozen=True)
class ResumeDecision:
    """What a trainer does with its folder before training, and what the status says about it.

    Examples
    --------
    >>> d = decide_resume(fingerprint="f1", force=False, resume=True, folder_exists=True,
    ...                   marker={"fingerprint": "f1"})
    >>> d.action, d.reasons
    ('resume-in-place', ('the previous training of this cell did not finish: resuming it',))

    ``action``: ``"resume-in-place"``, ``"resume-from-backup"``, ``"back-up-then-start"`` or
    ``"start"``. ``back_up``: move the folder in place to ``_backups`` first (also before
    resuming from a backup). ``backup``: the :attr:`UnfinishedBackup.key` to resume from.
    ``reasons``: the status's "why" lines, or ``None`` to keep those the lifecycle gave.
    ``kept``: what the folder moved to ``_backups`` holds, for the note that says where it went.
    ``reusable``: a saved result with this fingerprint exists (a finished trainer in place or
    in ``_backups``, or an unfinished training with a complete checkpoint to resume); the
    fingerprint asks this while it follows "trained from" links back (``force`` not applied).
    """

    action: str
    back_up: bool = False
    backup: str | None = None
    reasons: tuple[str, ...] | None = None
    kept: str | None = None
    reusable: bool = False

    @property
    def resumes(self) -> bool:
        return self.action in (RESUME_IN_PLACE, RESUME_FROM_BACKUP)


def _fingerprint(record: dict | None) -> str | None:
    value = (record or {}).get("fingerprint")
    return value if isinstance(value, str) else None


def pick_unfinished(backups: Sequence[UnfinishedBackup], fingerprint: str) -> UnfinishedBackup | None:
    """The unfinished backup of ``fingerprint`` with the newest complete checkpoint (then the newest)."""
    found = [b for b in backups if b.fingerprint == fingerprint and b.step is not None]
    return max(found, key=lambda b: (b.step, b.mtime, b.key)) if found else None


def decide_resume(
    *,
    fingerprint: str,
    force: bool,
    resume: bool,
    folder_exists: bool,
    folder_meta: dict | None = None,
    marker: dict | None = None,
    has_complete_checkpoint: bool = False,
    complete_backup: bool = False,
    incomplete_backups: Sequence[UnfinishedBackup] = (),
    changes: Sequence[str] = (),
) -> ResumeDecision:
    """Resume, or start over (backing up what is there)? A pure function of what is on disk.

    Examples
    --------
    >>> decide_resume(fingerprint="f2", force=False, resume=True, folder_exists=True,
    ...               marker={"fingerprint": "f1"}, changes=["code changed"]).reasons
    ('code changed', 'the unfinished training was kept')

    Parameters
    ----------
    fingerprint : the trainer's fingerprint now.
    force, resume : ``--force``; ``resume`` is false with ``--no-resume``.
    folder_exists : whether the trainer's folder exists.
    folder_meta : its complete ``trainer.json``, or ``None``.
    marker : its ``.in-progress.json`` (training started and did not finish), or ``None``.
    has_complete_checkpoint : whether its ``_checkpoints`` hold a complete checkpoint.
    complete_backup : whether ``_backups`` holds a finished trainer with ``fingerprint``.
    incomplete_backups : the unfinished trainings kept in ``_backups``.
    changes : what changed since the unfinished run in place (``why`` of ``marker``).
    """
    resumable = resume and not force
    unfinished_here = folder_exists and folder_meta is None and marker is not None
    same_here = unfinished_here and _fingerprint(marker) == fingerprint
    backup = pick_unfinished(incomplete_backups, fingerprint) if resume else None

    if folder_meta is not None and _fingerprint(folder_meta) == fingerprint:
        reusable = True
    else:
        reusable = (same_here and resume and has_complete_checkpoint) or complete_backup or backup is not None

    if same_here and resumable:
        return ResumeDecision(
            RESUME_IN_PLACE, reasons=("the previous training of this cell did not finish: resuming it",), reusable=reusable
        )
    reasons: tuple[str, ...] | None = None
    if unfinished_here and not same_here:
        reasons = (*changes, "the unfinished training was kept")
    elif unfinished_here:
        reasons = ("--force",) if force else ("--no-resume: starting over",)
    kept = None
    if folder_exists:
        kept = "the previous trainer" if folder_meta is not None else "the unfinished training (checkpoints)"
    if backup is not None and resumable:
        return ResumeDecision(
            RESUME_FROM_BACKUP,
            back_up=folder_exists,
            backup=backup.key,
            reasons=(f"an unfinished training of this cell was kept in {backup.key}: resuming it",),
            kept=kept,
            reusable=reusable,
        )
    if folder_exists:
        return ResumeDecision(BACK_UP_THEN_START, back_up=True, reasons=reasons, kept=kept, reusable=reusable)
    return ResumeDecision(START, reusable=reusable)


def read_resume_facts(folder: Path, backups: Path, root: Path, fingerprint: str) -> dict[str, Any]:
    """What :func:`decide_resume` needs, read from disk (the keyword arguments it takes).

    Examples
    --------
    >>> facts = read_resume_facts(out / "sft", out / "_backups/sft", out, fp)  # doctest: +SKIP
    >>> decide_resume(fingerprint=fp, force=False, resume=True, **facts).action  # doctest: +SKIP
    'resume-in-place'

    ``folder``: the trainer's folder; ``backups``: its ``_backups/<name>`` folder; ``root``:
    the folder backup keys are relative to. Only backups of ``fingerprint`` are validated.
    """
    folder, backups = Path(folder), Path(backups)
    exists = folder.exists()
    meta = read_meta(folder, TRAINER_FILE)[0] if exists else None
    marker = read_json(folder / IN_PROGRESS) if exists else None
    has_complete = (
        meta is None
        and _fingerprint(marker) == fingerprint
        and latest_checkpoint(folder / CHECKPOINTS, move_aside=False, need_optimizer=False) is not None
    )
    complete_backup = False
    unfinished: list[UnfinishedBackup] = []
    if backups.is_dir():
        found, _ = read_meta(backups / fingerprint, TRAINER_FILE)
        complete_backup = found is not None and found.get("fingerprint") == fingerprint
        for child in backups.iterdir():
            if not child.name.startswith("incomplete-"):
                continue
            child_fp = _fingerprint(read_json(child / IN_PROGRESS))
            if child_fp != fingerprint:
                continue
            best = latest_checkpoint(child / CHECKPOINTS, move_aside=False, need_optimizer=False)
            with contextlib.suppress(OSError):
                unfinished.append(
                    UnfinishedBackup(
                        key=os.path.relpath(child, root),
                        fingerprint=child_fp,
                        step=(checkpoint_step(best) or 0) if best is not None else None,
                        mtime=child.stat().st_mtime,
                    )
                )
    return {
        "folder_exists": exists,
        "folder_meta": meta,
        "marker": marker,
        "has_complete_checkpoint": has_complete,
        "complete_backup": complete_backup,
        "incomplete_backups": unfinished,
    }
