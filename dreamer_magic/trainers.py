"""The trainer lifecycle: ``%%dreamer_train`` cells that checkpoint, resume and reload.

A trainer is a step whose body trains a model. It differs from a step in three ways:

* It trains **in place**, in ``output/<name>/``: checkpoints must survive the kernel being
  killed, so they cannot live in a temporary folder. A small ``.in-progress.json`` marker
  (with the fingerprint) says that training started; ``trainer.json``, written last, says it
  finished. Re-running a cell whose training did not finish resumes it: from the latest
  *complete* checkpoint, with the same loss values as an uninterrupted run.
* Every ``transformers.Trainer`` built in the cell is redirected: its checkpoints go to
  ``<name>/_checkpoints`` whatever ``output_dir`` says, a callback feeds the live status
  (progress, ETA, loss curve, checkpoints), and ``train()`` resumes from the latest complete
  checkpoint unless ``resume_from_checkpoint`` is given or ``--no-resume`` was. A plain PyTorch
  loop gets the same from :class:`Checkpointer`.
* When the cell finishes, models, tokenizers and processors are saved with ``save_pretrained``
  to ``<name>/_model/`` (the main model and its tokenizer at the top, other ones in
  ``_model/<variable>/``), with ``training_args.json``, ``trainer_state.json`` (the log
  history) and ``metrics.json``. A hit loads them back with ``from_pretrained`` of the
  recorded class. ``Trainer`` objects are not saved (they hold live training state): after
  a hit the variable is left as it was, and the status says so.

Layout::

    output/<name>/
      .in-progress.json          while training has not finished
      _checkpoints/checkpoint-N/ written by transformers or Checkpointer
      _model/                    model + tokenizer (save_pretrained), training_args.json,
                                 trainer_state.json, metrics.json
      _outputs/, _dataset/       other values the cell binds (storage.py)
      trainer.json               metadata, written last: its presence means "complete"

Models are trained in place: after a run, the ``model`` variable the cell read holds the
trained weights. The fingerprint of such an input is recorded before and after training, so
re-running the cell in the same kernel is still a hit (the trained model is recognised as
this trainer's own output) instead of training the trained model again.

Multi-GPU (``accelerate launch``, ``torchrun``): every process runs the cell and trains, but
only the main process (rank 0; ``torch.distributed`` rank when it is initialised, else the
``RANK`` / ``LOCAL_RANK`` environment variables) moves folders, writes ``_model``,
``trainer.json`` and :class:`Checkpointer` checkpoints; the other processes do not take the
trainer's lock (that would deadlock the collective operations) and write nothing but what
transformers itself writes per rank.

Examples
--------
>>> %%dreamer_train sft-small                                   # doctest: +SKIP
... args = TrainingArguments(output_dir="anything", max_steps=500, save_steps=100)
... trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok)
... trainer.train()
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import DreamerError, StorageError
from .fingerprint import fingerprint, json_safe, model_fingerprint
from .folders import OutputFolder, folder_size, fsync_tree as _fsync_tree, now_iso, read_json as _read_json, read_meta, write_json_atomic
from .status import FAILED, INTERRUPTED, LOADED, RAN, RESTORED, CheckpointInfo, Status, resumed_from
from . import steps
from .steps import (
    REPLAY_FILE,
    StepRun,
    StepSpec,
    _capture,
    _describe,
    cell_spec,
    components_of,
    fingerprint_of,
    rerun_statements,
    why,
    write_replay,
)

__all__ = ["Checkpointer", "TrainerRun", "check_checkpoint", "explain", "is_main_process", "list_checkpoints", "run_cell_trainer"]

TRAINER_FILE = "trainer.json"
IN_PROGRESS = ".in-progress.json"
CHECKPOINTS = "_checkpoints"
MODEL = "_model"
STATE_FILE = "trainer_state.json"
MAX_LOSS_POINTS = 2000  # loss points kept in trainer.json (the full history is in _model/)
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_UPDATE_EVERY = 0.25  # seconds between live status updates (besides losses and checkpoints)

_RUNS: list["TrainerRun"] = []  # trainers running now, innermost last


def is_main_process() -> bool:
    """True unless this is a non-main process of a distributed run (rank > 0).

    Uses ``torch.distributed``'s rank when it is initialised, else the ``RANK`` (or, failing
    that, ``LOCAL_RANK``) environment variable that ``torchrun`` and ``accelerate`` set.
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


def active_trainer() -> "TrainerRun | None":
    """The ``%%dreamer_train`` cell running now, if any."""
    return _RUNS[-1] if _RUNS else None


# -- checkpoints ------------------------------------------------------------------------------


def checkpoint_step(path: Path | str) -> int | None:
    """``checkpoint-300`` -> 300; anything else -> None."""
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

    Complete means: ``trainer_state.json`` (written last by transformers and by
    :class:`Checkpointer`) parses and names the folder's step, the model weights are there and
    whole (safetensors headers and sizes, ``torch.save`` archives' end records), and so are the
    optimizer and scheduler states (unless ``need_optimizer`` is false: ``save_only_model``).
    A checkpoint that was being written when the process died fails one of these.

    Examples
    --------
    >>> check_checkpoint(Path("output/sft/_checkpoints/checkpoint-300"))  # doctest: +SKIP
    'trainer_state.json is missing'
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


def list_checkpoints(folder: Path, *, validate: bool = True) -> list[CheckpointInfo]:
    """The ``checkpoint-N`` folders under ``folder``, oldest step first."""
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


def _losses_from_state(state: dict) -> list[tuple[int, float]]:
    out = []
    for entry in state.get("log_history") or []:
        if isinstance(entry, dict) and "loss" in entry and "step" in entry:
            with contextlib.suppress(TypeError, ValueError):
                out.append((int(entry["step"]), float(entry["loss"])))
    return out


def _read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


# -- what counts as a model ---------------------------------------------------------------------


def _is_module(value: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.nn.Module)


def _is_pretrained(value: Any) -> bool:
    """A transformers-style object: ``save_pretrained`` + ``from_pretrained`` (models, tokenizers, processors)."""
    return (
        not isinstance(value, type)
        and callable(getattr(value, "save_pretrained", None))
        and callable(getattr(type(value), "from_pretrained", None))
    )


def _is_within(path: Any, folder: Any) -> bool:
    """Whether ``path`` lies inside ``folder`` (both as given, resolved against the working directory)."""
    inner, outer = os.path.abspath(str(path)), os.path.abspath(str(folder))
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _is_trainer(value: Any) -> bool:
    """A ``transformers.Trainer`` or a :class:`Checkpointer`: live training state, never saved."""
    if isinstance(value, Checkpointer):
        return True
    module = sys.modules.get("transformers.trainer")
    return module is not None and isinstance(value, module.Trainer)


def _is_training_args(value: Any) -> bool:
    module = sys.modules.get("transformers.training_args")
    return module is not None and isinstance(value, module.TrainingArguments)


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class _Key:
    """Stands for a model or tokenizer in the fingerprint: what it computes, not how it was loaded.

    A model counts by its class, its configuration (less bookkeeping such as the path it was
    loaded from) and its weights; train/eval mode does not count. A fast tokenizer counts by
    its class, its tokenizer definition and its special tokens. An optimizer or learning-rate
    scheduler counts by its class and settings, not by its running state (which training
    changes). So the trained model a run
    leaves in the namespace and the same model loaded back from ``_model`` fingerprint alike.
    """

    __slots__ = ("data",)

    def __init__(self, data: Any) -> None:
        self.data = data

    def __dreamer_fingerprint__(self) -> Any:
        return self.data


def stable_value(value: Any) -> Any:
    """``value`` itself, or for models, tokenizers, optimizers and schedulers a :class:`_Key` of
    their canonical fingerprint (what they compute; see fingerprint.model_fingerprint)."""
    torch = sys.modules.get("torch")
    if (
        _is_module(value)
        or (getattr(value, "backend_tokenizer", None) is not None and _is_pretrained(value))
        or (torch is not None and isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)))
    ):
        return _Key(model_fingerprint(value, mode=False) if _is_module(value) else fingerprint(value))  # training sets the mode itself
    return value


# -- the status callback for transformers' Trainer ------------------------------------------------


class _Live:
    """Throttled live updates of a trainer's status (progress, ETA, losses, checkpoints)."""

    def __init__(self, run: "TrainerRun") -> None:
        self.run = run
        self.status = run.status
        self._last = 0.0
        self._t0: float | None = None
        self._step0 = 0

    def begin(self, step: int, max_steps: int | None) -> None:
        self.status.step = step
        if max_steps:
            self.status.max_steps = max_steps
        self._t0, self._step0 = time.perf_counter(), step
        self.changed(force=True)

    def progress(self, step: int) -> None:
        status = self.status
        status.step = step
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), step
        done = step - self._step0
        if status.max_steps and done > 0:
            rate = (time.perf_counter() - self._t0) / done
            status.eta = max(0.0, (status.max_steps - step) * rate)
        self.changed()

    def loss(self, step: int, loss: Any) -> None:
        try:
            value = float(loss)
        except (TypeError, ValueError):
            return
        self.status.losses.append((int(step), value))
        self.changed()

    def checkpoint_saved(self, folder: Path) -> None:
        if is_main_process():
            self.status.checkpoints = list_checkpoints(folder, validate=False)
        self.changed(force=True)

    def changed(self, force: bool = False) -> None:
        if self.run.finished and self.run.status.duration is not None:
            return  # a Trainer trained again in a later cell: this cell's status is final
        now = time.perf_counter()
        if force or now - self._last >= _UPDATE_EVERY:
            self._last = now
            self.status.changed()


def _status_callback_class() -> type:
    from transformers import TrainerCallback

    class DreamerStatusCallback(TrainerCallback):
        """Feeds the ``%%dreamer_train`` status: progress, ETA, losses and checkpoints."""

        def __init__(self, live: _Live, folder: Path) -> None:
            self.live, self.folder = live, folder

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.begin(state.global_step, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.progress(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.live.loss(state.global_step, logs["loss"])

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.checkpoint_saved(self.folder)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.status.step = state.global_step
            self.live.status.eta = 0.0
            self.live.changed(force=True)

    return DreamerStatusCallback


_CALLBACK_CLASS: type | None = None


@contextlib.contextmanager
def _patched_trainer(run: "TrainerRun") -> Iterator[None]:
    """Redirect, watch and resume every ``transformers.Trainer`` built while the body runs.

    ``Trainer.__init__`` and ``Trainer.train`` are patched on the base class (so subclasses
    such as trl's ``SFTTrainer`` are covered) and restored afterwards, even on error.
    """
    global _CALLBACK_CLASS
    needed = "transformers.trainer" in sys.modules or re.search(r"Trainer\b", run.spec.source) is not None
    if not needed:
        yield
        return
    try:
        from transformers import Trainer, TrainingArguments
    except ImportError:
        yield
        return
    if _CALLBACK_CLASS is None:
        _CALLBACK_CLASS = _status_callback_class()
    callback_class = _CALLBACK_CLASS
    original_init, original_train = Trainer.__dict__["__init__"], Trainer.__dict__["train"]
    init_signature = inspect.signature(original_init)
    train_signature = inspect.signature(original_train)

    @functools.wraps(original_init)
    def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
        if run.finished:
            return original_init(trainer, *args, **kwargs)
        bound = init_signature.bind(trainer, *args, **kwargs)
        folder = run.checkpoints_dir(len(run.trainers))
        training_args = bound.arguments.get("args")
        if training_args is None:
            training_args = TrainingArguments(output_dir=str(folder))
        else:
            original = training_args.output_dir
            training_args = copy.copy(training_args)  # the user's object keeps its output_dir
            training_args.output_dir = str(folder)
            # transformers 4.x derives logging_dir (TensorBoard) from output_dir: keep it inside too
            logging_dir = getattr(training_args, "logging_dir", None)
            if original and logging_dir and _is_within(logging_dir, original):
                training_args.logging_dir = str(folder / "runs" / Path(logging_dir).name)
            if original and os.path.abspath(str(original)) != str(folder):
                note = f"output_dir {str(original)!r} redirected to {folder}"
                if note not in run.status.notes:
                    run.status.notes.append(note)
                    run.status.changed()
        bound.arguments["args"] = training_args
        original_init(*bound.args, **bound.kwargs)
        trainer.add_callback(callback_class(run.live, folder))
        run.trainers.append(weakref.ref(trainer))
        run.trainer_ids.add(id(trainer))

    @functools.wraps(original_train)
    def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if id(trainer) not in run.trainer_ids or run.finished:
            return original_train(trainer, *args, **kwargs)
        bound = train_signature.bind(trainer, *args, **kwargs)
        given = bound.arguments.get("resume_from_checkpoint")
        if given is None or given is True:
            folder = Path(trainer.args.output_dir)
            need_optimizer = not getattr(trainer.args, "save_only_model", False)
            found = run.find_resume_point(folder, need_optimizer=need_optimizer) if run.resume else None
            bound.arguments["resume_from_checkpoint"] = str(found) if found is not None else None
            if found is not None:
                run.resuming_from(found)
        run.last_trainer = weakref.ref(trainer)
        output = original_train(*bound.args, **bound.kwargs)
        run.train_output = output
        return output

    Trainer.__init__, Trainer.train = __init__, train  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.__init__, Trainer.train = original_init, original_train  # type: ignore[method-assign]


# -- the trainer lifecycle ------------------------------------------------------------------------


class _TrainerFolder(OutputFolder):
    """The output folder as a trainer sees it: non-main processes of a distributed run take no lock."""

    @contextlib.contextmanager
    def lock(self, name_path: str, on_wait: Callable[[], Any] | None = None) -> Iterator[None]:
        if not is_main_process():
            yield
            return
        with super().lock(name_path, on_wait=on_wait):
            yield


class TrainerRun(StepRun):
    """One run of the trainer lifecycle (see the module docstring).

    Parameters
    ----------
    spec : what decides the fingerprint (``kind="trainer"``).
    execute : runs the body; returns the namespace holding the outputs.
    status : the status to fill in.
    resume : resume an unfinished run of the same cell (``--no-resume`` sets it false).
    namespace : the user namespace (plain PyTorch modules are loaded back into it in place).
    """

    meta_file = TRAINER_FILE

    def __init__(
        self,
        spec: Any,
        execute: Callable[[], dict],
        status: Status | None = None,
        *,
        resume: bool = True,
        namespace: dict | None = None,
    ) -> None:
        super().__init__(spec, execute, status)
        self.out = _TrainerFolder(self.out.root)
        self.resume = resume
        self.namespace = namespace if namespace is not None else {}
        self.live = _Live(self)
        self.trainers: list[weakref.ref] = []
        self.trainer_ids: set[int] = set()
        self.last_trainer: weakref.ref | None = None
        self.train_output: Any = None
        self.checkpointers: list[Checkpointer] = []
        self.finished = False
        self.main = is_main_process()
        self._input_keys: dict[str, str] = {}  # fingerprints of the model/tokenizer inputs used
        self._moved: str | None = None  # where the previous folder went when this run started
        self._resumed = False

    # -- where things are ---------------------------------------------------------
    @property
    def marker(self) -> Path:
        return self.final / IN_PROGRESS

    def checkpoints_dir(self, index: int = 0) -> Path:
        """Where the ``index``-th Trainer of the cell writes checkpoints (the first: ``_checkpoints``)."""
        base = self.final / CHECKPOINTS
        return base if index == 0 else base / f"trainer-{index + 1}"

    # -- the fingerprint ------------------------------------------------------------
    def components(self) -> dict[str, Any]:
        """Fingerprint components; models and tokenizers count by what they compute (:class:`_Key`).

        An input that this trainer itself trained in place (the ``model`` a previous run left
        in the namespace) counts as the model it was before training, when that leads to a
        result that can be reused (a hit, a backup, or an unfinished run to resume).
        """
        spec = self.spec
        keyed = {name: stable_value(value) for name, value in spec.inputs.items()}
        components = components_of(dataclasses.replace(spec, inputs=keyed))
        inputs = components["inputs"]
        self._input_keys = {n: inputs[n] for n, v in keyed.items() if isinstance(v, _Key)}
        pairs = self._trained_pairs() if self._input_keys else {}
        current = dict(inputs)
        substituted = False
        for _ in range(8):  # follow "trained from" links back, a few runs deep
            moved = False
            for name in self._input_keys:
                before = pairs.get(current[name])
                if before is not None and before != current[name]:
                    current[name], moved, substituted = before, True, True
            if not moved:
                break
            candidate = {**components, "inputs": current}
            if not spec.force and self._reusable(fingerprint_of(candidate)):
                self._input_keys.update({n: current[n] for n in self._input_keys})
                return candidate
        if substituted:
            names = ", ".join(f"`{n}`" for n in self._input_keys if pairs.get(inputs[n]))
            self.status.notes.append(
                f"{names} already holds weights this trainer trained, so training starts from them; re-run "
                "the cell that builds it to train from the original weights"
            )
        return components

    def _trained_pairs(self) -> dict[str, str]:
        """``after -> before`` fingerprints of inputs trained in place, from this trainer's records and backups."""
        records = [read_meta(self.final, TRAINER_FILE)[0], _read_json(self.marker)]
        base = self.out.backup_dir(self.name_path)
        if base.is_dir():
            for child in base.iterdir():
                records.append(_read_json(child / TRAINER_FILE) or _read_json(child / IN_PROGRESS))
        pairs: dict[str, str] = {}
        for record in records:
            for pair in ((record or {}).get("trained") or {}).values():
                if isinstance(pair, dict) and isinstance(pair.get("after"), str) and isinstance(pair.get("before"), str):
                    pairs.setdefault(pair["after"], pair["before"])
        return pairs

    def _reusable(self, fp: str) -> bool:
        meta, _ = read_meta(self.final, TRAINER_FILE)
        if meta is not None:
            if meta.get("fingerprint") == fp:
                return True
        elif self.resume and (_read_json(self.marker) or {}).get("fingerprint") == fp:
            if latest_checkpoint(self.final / CHECKPOINTS, move_aside=False, need_optimizer=False) is not None:
                return True
        if self.out.find_backup(self.name_path, fp, TRAINER_FILE) is not None:
            return True
        return self.resume and self._incomplete_backup(fp) is not None

    def _incomplete_backup(self, fp: str) -> Path | None:
        """An unfinished run of this fingerprint kept in ``_backups`` that has a complete checkpoint."""
        base = self.out.backup_dir(self.name_path)
        if not base.is_dir():
            return None
        found = []
        for child in base.iterdir():
            if child.name.startswith("incomplete-") and (_read_json(child / IN_PROGRESS) or {}).get("fingerprint") == fp:
                best = latest_checkpoint(child / CHECKPOINTS, move_aside=False, need_optimizer=False)
                if best is not None:
                    found.append((checkpoint_step(best) or 0, child.stat().st_mtime, child))
        return max(found)[2] if found else None

    # -- loading a finished trainer ---------------------------------------------------
    def _load_values(self, folder: Path, entries: dict) -> dict[str, Any]:
        from .storage import load_outputs

        plain = {n: e for n, e in entries.items() if e.get("storage") not in _LOADERS}
        loaded = load_outputs(folder, plain, allow_pickle=self.spec.allow_pickle) if plain else {}
        values = {}
        for name, entry in entries.items():
            loader = _LOADERS.get(entry.get("storage"))
            values[name] = loader(self, folder, name, entry) if loader is not None else loaded[name]
        return values

    def _load(self, folder: Path, meta: dict, state: str, started: float) -> dict[str, Any]:
        values = super()._load(folder, meta, state, started)
        status = self.status
        status.step = meta.get("final_step")
        status.max_steps = meta.get("max_steps")
        status.eta = None
        status.losses = [(int(s), float(v)) for s, v in meta.get("losses") or []]
        status.checkpoints = list_checkpoints(folder / CHECKPOINTS, validate=False)
        status.model_path = str(folder / MODEL)
        for name, kind in (meta.get("not_saved") or {}).items():
            status.notes.append(_not_saved_note(name, kind, meta))
        status.changed()
        return values

    # -- running -----------------------------------------------------------------------
    def _run_and_save(self, components: dict, fp: str, started: float) -> dict[str, Any]:
        status, spec = self.status, self.spec
        if self.main:
            self._prepare_folder(components, fp)
        self.live.begin(0, None)
        records: list = []
        _RUNS.append(self)
        injected = "Checkpointer" not in self.namespace
        if injected:
            self.namespace["Checkpointer"] = Checkpointer
        try:
            try:
                with _capture(records), _patched_trainer(self):
                    namespace = self.execute()
            finally:
                self.finished = True
                if injected and self.namespace.get("Checkpointer") is Checkpointer:
                    del self.namespace["Checkpointer"]
            values = self._collect(namespace)
            if self.main:
                self._save(values, records, components, fp, time.perf_counter() - started)
            else:
                status.notes.append("not the main process of a distributed run: the main process saves the trainer")
        except KeyboardInterrupt:
            self._after_failure()
            status.state = INTERRUPTED
            status.error = "interrupted: " + self._kept_phrase()
            raise
        except BaseException as e:
            self._after_failure()
            status.state = FAILED
            status.error = f"{_describe(e)} ({self._kept_phrase()})"
            import errno

            if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                raise DreamerError(
                    f"no space left on the device while training {spec.name!r}; the checkpoints are kept. "
                    "Free some space (`%dreamer gc` prunes backups) and run the cell again to resume"
                ) from None
            raise
        finally:
            _RUNS.remove(self)
        status.state = resumed_from(status.resumed_from) if status.resumed_from else RAN
        status.eta = None
        self._mark_lineage(fp, values)
        status.changed()
        self.values = values
        return values

    def _prepare_folder(self, components: dict, fp: str) -> None:
        """Decide between resuming and starting over; back up what must not be trained over."""
        status, spec = self.status, self.spec
        folder = self.final
        marker = _read_json(self.marker) if folder.exists() else None
        if folder.exists():
            meta, _ = read_meta(folder, TRAINER_FILE)
            same = marker is not None and marker.get("fingerprint") == fp and meta is None
            if same and self.resume and not spec.force:
                self._resumed = True
                status.reasons = ["the previous training of this cell did not finish: resuming it"]
            else:
                if meta is None and marker is not None and marker.get("fingerprint") != fp:
                    status.reasons = why(marker, components, spec.source) + ["the unfinished training was kept"]
                elif meta is None and marker is not None:
                    status.reasons = ["--force" if spec.force else "--no-resume: starting over"]
                self._moved = self.out.move_to_backup(folder, self.name_path, TRAINER_FILE)
                if self._moved:
                    what = "the previous trainer" if meta is not None else "the unfinished training (checkpoints)"
                    status.notes.append(f"{what} kept in {self._moved}")
        if not folder.exists() and self.resume and not spec.force:
            backup = self._incomplete_backup(fp)
            if backup is not None:
                os.rename(backup, folder)
                self._resumed = True
                status.reasons = [f"an unfinished training of this cell was kept in {backup.relative_to(self.out.root)}: resuming it"]
        (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        if self._resumed:  # leftovers of a save that did not finish
            for stale in (MODEL, "_outputs", "_dataset", REPLAY_FILE):
                path = folder / stale
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        previous = _read_json(self.marker) or {}
        write_json_atomic(
            self.marker,
            {
                "name": spec.name,
                "kind": "trainer",
                "fingerprint": fp,
                "components": components,
                "source": spec.source,
                "started": previous.get("started") if self._resumed else now_iso(),
                "attempts": int(previous.get("attempts") or 0) + 1 if self._resumed else 1,
                "pid": os.getpid(),
                "trained": previous.get("trained") or {} if self._resumed else {},
            },
        )
        status.folder = str(folder)
        status.changed()

    def find_resume_point(self, folder: Path, *, need_optimizer: bool = True) -> Path | None:
        """The latest complete checkpoint in ``folder`` (skipped ones go into the status)."""
        found = latest_checkpoint(folder, need_optimizer=need_optimizer, status=self.status, move_aside=self.main)
        if self.main:
            self.status.checkpoints = list_checkpoints(folder, validate=False)
        return found

    def resuming_from(self, checkpoint: Path, losses: list[tuple[int, float]] | None = None) -> None:
        """Record in the status that training continues from ``checkpoint``."""
        status = self.status
        status.resumed_from = checkpoint.name
        status.state = resumed_from(checkpoint.name)
        state = _read_state(checkpoint)
        status.losses = losses if losses is not None else _losses_from_state(state)
        status.step = checkpoint_step(checkpoint)
        if state.get("max_steps"):
            status.max_steps = int(state["max_steps"])
        self.live.begin(status.step or 0, status.max_steps)

    def _kept_phrase(self) -> str:
        if not self.main:
            return "this process saves nothing"
        if self.final.exists() and list_checkpoints(self.final / CHECKPOINTS, validate=False):
            return "the checkpoints are kept: run the cell again to resume"
        return "nothing was saved"

    def _after_failure(self) -> None:
        """Keep checkpoints for resuming; with none, put the previous folder back as it was."""
        if not self.main or not self.final.exists():
            return
        if not self._resumed and not list_checkpoints(self.final / CHECKPOINTS, validate=False):
            shutil.rmtree(self.final, ignore_errors=True)
            if self._moved:
                with contextlib.suppress(OSError):
                    os.rename(self.out.root / self._moved, self.final)
                self.status.notes[:] = [n for n in self.status.notes if not n.endswith(f"kept in {self._moved}")]
            return
        # record what the trained inputs look like now, so that re-running in this kernel resumes
        with contextlib.suppress(Exception):
            marker = _read_json(self.marker)
            if marker is not None:
                marker["trained"] = {**(marker.get("trained") or {}), **self._trained_inputs()}
                write_json_atomic(self.marker, marker)

    def _trained_inputs(self) -> dict[str, dict]:
        """Inputs (models, tokenizers) that the body changed in place: fingerprints before and after."""
        out = {}
        for name, before in self._input_keys.items():
            value = self.namespace.get(name, self.spec.inputs.get(name))
            with contextlib.suppress(Exception):
                after = fingerprint(stable_value(value))
                if after != before:
                    out[name] = {"before": before, "after": after}
        return out

    def _touched(self) -> list[Any]:
        """Models and tokenizers that a Trainer or Checkpointer of this cell used."""
        objects: list[Any] = []
        for ref in self.trainers:
            trainer = ref()
            if trainer is not None:
                objects.append(trainer.model)
                if getattr(trainer, "processing_class", None) is not None:
                    objects.append(trainer.processing_class)
        objects.extend(c.model for c in self.checkpointers)
        return objects

    def _collect(self, namespace: dict) -> dict[str, Any]:
        values = super()._collect(namespace)
        if self.spec.strict_outputs:
            return values
        touched = {id(o) for o in self._touched()}
        changed = self._trained_inputs()
        for name in self.spec.inputs:
            value = namespace.get(name)
            if name not in values and value is not None and (id(value) in touched or name in changed):
                if _is_module(value) or _is_pretrained(value):
                    values[name] = value
        return values

    def _main_names(self, values: dict) -> tuple[str | None, str | None]:
        """The variables of the main model and its tokenizer/processor (saved at the top of ``_model``)."""
        model = tokenizer = None
        last = self.last_trainer() if self.last_trainer is not None else None
        if last is None and self.trainers:
            last = self.trainers[-1]()
        preferred = [last.model, getattr(last, "processing_class", None)] if last is not None else []
        preferred += [c.model for c in self.checkpointers]
        for obj in preferred:
            for name, value in values.items():
                if value is obj and obj is not None:
                    if _is_module(value) and _is_pretrained(value) and model is None:
                        model = name
                    elif not _is_module(value) and _is_pretrained(value) and tokenizer is None:
                        tokenizer = name
        for name, value in values.items():
            if model is None and _is_module(value) and _is_pretrained(value):
                model = name
            if tokenizer is None and not _is_module(value) and _is_pretrained(value) and hasattr(value, "backend_tokenizer"):
                tokenizer = name
        return model, tokenizer

    def _save(self, values: dict, records: list, components: dict, fp: str, duration: float) -> None:
        folder = self.final
        model_dir = folder / MODEL
        for stale in (MODEL, "_outputs", "_dataset"):
            if (folder / stale).exists():
                shutil.rmtree(folder / stale)
        model_dir.mkdir(parents=True)
        main_model, main_tokenizer = self._main_names(values)
        entries: dict[str, dict] = {}
        plain: dict[str, Any] = {}
        not_saved: dict[str, str] = {}
        for name, value in values.items():
            if _is_trainer(value):
                not_saved[name] = type(value).__name__
            elif _is_pretrained(value):
                rel = MODEL if name in (main_model, main_tokenizer) else f"{MODEL}/{name}"
                entries[name] = _save_pretrained(value, folder, rel)
            elif _is_module(value) and name in self.spec.inputs:
                entries[name] = _save_state_dict(value, folder, f"{MODEL}/{name}.safetensors")
            elif _is_training_args(value):
                entries[name] = _save_training_args(value, folder, f"_outputs/{name}.training_args.json")
            else:
                plain[name] = value
        if plain:
            entries.update(_save_plain(plain, folder, not_saved))
        entries = {name: entries[name] for name in values if name in entries}
        meta_extra = self._write_model_metadata(model_dir)
        write_replay(folder, records)
        _fsync_tree(model_dir)
        trained = self._trained_inputs()
        marker = _read_json(self.marker) or {}
        status = self.status
        meta = {
            **self.metadata(components, fp, entries, duration),
            "kind": "trainer",
            "parent": None,
            "started": marker.get("started"),
            "attempts": marker.get("attempts", 1),
            "final_step": status.step,
            "max_steps": status.max_steps,
            "losses": _thin(status.losses, MAX_LOSS_POINTS),
            "resumed_from": status.resumed_from,
            "checkpoints": [c.name for c in list_checkpoints(folder / CHECKPOINTS, validate=False)],
            "model": MODEL,
            "trained": trained,
            "not_saved": not_saved,
            **meta_extra,
        }
        write_json_atomic(folder / TRAINER_FILE, meta)
        with contextlib.suppress(FileNotFoundError):
            self.marker.unlink()
        self._note_outputs(folder, entries)
        status.folder = str(folder)
        status.model_path = str(model_dir)
        status.checkpoints = list_checkpoints(folder / CHECKPOINTS, validate=False)
        for name, kind in not_saved.items():
            status.notes.append(_not_saved_note(name, kind, meta))

    def _write_model_metadata(self, model_dir: Path) -> dict:
        """training_args.json, trainer_state.json and metrics.json next to the model."""
        extra: dict[str, Any] = {}
        last = self.last_trainer() if self.last_trainer is not None else None
        if last is None and self.trainers:
            last = self.trainers[-1]()
        if last is not None:
            write_json_atomic(model_dir / "training_args.json", json_safe(last.args.to_dict()))
            state = last.state
            with contextlib.suppress(Exception):
                state_dict = json_safe(dataclasses.asdict(state))
                write_json_atomic(model_dir / "trainer_state.json", state_dict)
            extra["trainer_class"] = _class_path(type(last))
        elif self.checkpointers:
            ckpt = self.checkpointers[-1]
            write_json_atomic(
                model_dir / "trainer_state.json",
                {"global_step": ckpt.global_step, "max_steps": ckpt.max_steps, "log_history": ckpt.log_history},
            )
        metrics: dict[str, Any] = {}
        output = self.train_output
        if output is not None:
            metrics = dict(getattr(output, "metrics", None) or {})
            with contextlib.suppress(Exception):
                metrics.setdefault("global_step", int(output.global_step))
                metrics.setdefault("training_loss", float(output.training_loss))
        if self.status.losses:
            metrics.setdefault("final_loss", self.status.losses[-1][1])
        if metrics:
            write_json_atomic(model_dir / "metrics.json", json_safe(metrics))
            extra["metrics"] = json_safe(metrics)
        return extra


def _save_plain(values: dict, folder: Path, not_saved: dict[str, str]) -> dict[str, dict]:
    """Other outputs, by storage.py. One that cannot be saved is left out (noted), not fatal:
    failing here would throw away a finished training run."""
    from .storage import save_outputs, save_value

    try:
        return save_outputs(values, folder)
    except StorageError:
        for leftover in ("_outputs", "_dataset"):
            shutil.rmtree(folder / leftover, ignore_errors=True)
    entries = {}
    for name, value in values.items():
        try:
            entries[name] = save_value(value, folder, name)
        except StorageError as e:
            not_saved[name] = f"{type(value).__name__}: {e}"
    return entries


def _not_saved_note(name: str, kind: str, meta: dict) -> str:
    if ": " in kind:  # could not be saved
        kind, _, why = kind.partition(": ")
        return f"`{name}` ({kind}) could not be saved, so a hit leaves it as it was ({why.split('. ')[0]})"
    models = [n for n, e in (meta.get("outputs") or {}).items() if e.get("storage") == "pretrained" and e.get("module")]
    where = f"; the trained model is `{models[0]}`" if models else ""
    return f"`{name}` ({kind}) is not saved: it holds live training state, so a hit leaves it as it was{where}"


def _thin(points: list[tuple[int, float]], limit: int) -> list[list[float]]:
    if len(points) <= limit:
        return [[s, v] for s, v in points]
    stride = math.ceil(len(points) / limit)
    kept = points[::stride]
    if kept[-1] != points[-1]:
        kept.append(points[-1])
    return [[s, v] for s, v in kept]


# -- saving and loading models ----------------------------------------------------------------------


def _save_pretrained(value: Any, folder: Path, rel: str) -> dict:
    from .storage import describe_type

    target = folder.joinpath(*rel.split("/"))
    target.mkdir(parents=True, exist_ok=True)
    before = {p.name for p in target.iterdir()}
    value.save_pretrained(str(target))
    written = [p for p in target.iterdir() if p.name not in before]
    entry: dict[str, Any] = {
        "type": describe_type(value),
        "storage": "pretrained",
        "path": rel,
        "class": _class_path(type(value)),
        "pickled": False,
        "size": sum(folder_size(p) for p in written),
    }
    if _is_module(value):
        entry["module"] = True
        with contextlib.suppress(StopIteration, AttributeError):
            entry["device"] = str(next(value.parameters()).device)
    return entry


def _load_pretrained(run: TrainerRun, folder: Path, name: str, entry: dict) -> Any:
    path = folder.joinpath(*str(entry["path"]).split("/"))
    try:
        cls = _import_class(str(entry["class"]))
        value = cls.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - any failure means "cannot load, train again"
        raise StorageError(f"cannot load `{name}` ({entry.get('type')}) from {path}: {type(e).__name__}: {e}") from e
    device = entry.get("device")
    if device and device != "cpu" and _is_module(value):
        import torch

        with contextlib.suppress(Exception):
            if device.startswith("cuda") and torch.cuda.is_available():
                value = value.to(device)
    return value


def _save_state_dict(value: Any, folder: Path, rel: str) -> dict:
    from safetensors.torch import save_model

    from .storage import describe_type

    path = folder.joinpath(*rel.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(value, str(path))
    return {"type": describe_type(value), "storage": "state_dict", "path": rel, "pickled": False, "size": path.stat().st_size}


def _load_state_dict(run: TrainerRun, folder: Path, name: str, entry: dict) -> Any:
    """A plain PyTorch module the cell trained in place: load the weights into the one in the namespace."""
    from safetensors.torch import load_model

    target = run.namespace.get(name, run.spec.inputs.get(name))
    if not _is_module(target):
        raise StorageError(
            f"`{name}` was saved as weights only (a plain PyTorch module); define `{name}` (the untrained "
            "module) before running the cell so its weights can be loaded into it"
        )
    try:
        load_model(target, str(folder.joinpath(*str(entry["path"]).split("/"))))
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot load the weights of `{name}`: {type(e).__name__}: {e}") from e
    return target


def _save_training_args(value: Any, folder: Path, rel: str) -> dict:
    from .storage import describe_type

    path = folder.joinpath(*rel.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"class": _class_path(type(value)), "values": json_safe(value.to_dict())})
    return {"type": describe_type(value), "storage": "training_args", "path": rel, "pickled": False, "size": path.stat().st_size}


def _load_training_args(run: TrainerRun, folder: Path, name: str, entry: dict) -> Any:
    data = _read_json(folder.joinpath(*str(entry["path"]).split("/")))
    try:
        cls = _import_class(data["class"])  # type: ignore[index]
        init = {f.name for f in dataclasses.fields(cls) if f.init}
        return cls(**{k: v for k, v in data["values"].items() if k in init})  # type: ignore[index]
    except Exception as e:  # noqa: BLE001
        raise StorageError(f"cannot rebuild `{name}` ({entry.get('type')}): {type(e).__name__}: {e}") from e


_LOADERS: dict[str, Callable[[TrainerRun, Path, str, dict], Any]] = {
    "pretrained": _load_pretrained,
    "state_dict": _load_state_dict,
    "training_args": _load_training_args,
}


# -- the helper for plain PyTorch loops ----------------------------------------------------------


class Checkpointer:
    """Checkpoint and resume a plain PyTorch training loop.

    Examples
    --------
    >>> %%dreamer_train tiny-mlp                                       # doctest: +SKIP
    ... ckpt = Checkpointer(model, optimizer, scheduler, every=50, max_steps=500)
    ... for step in range(ckpt.resume(), 500):      # 0 at first, 300 after resuming checkpoint-300
    ...     loss = model(batch(step)).loss
    ...     loss.backward(); optimizer.step(); scheduler.step(); optimizer.zero_grad()
    ...     ckpt.step(step, loss=loss.item())        # saves checkpoint-50, checkpoint-100, ...

    ``step`` is the index of the step that just finished (as in ``range``); ``checkpoint-N``
    holds the state after N steps: the model's weights (safetensors), the optimizer's and
    scheduler's state, the random number generators (Python, NumPy, torch, CUDA) and the
    loss history. Each checkpoint is written under a temporary name and renamed into place,
    so a checkpoint either exists whole or not at all; :meth:`resume` still validates them and
    skips an incomplete one.

    Parameters
    ----------
    model : torch.nn.Module
    optimizer, scheduler : optional; anything with ``state_dict()`` / ``load_state_dict()``.
    every : save every ``every`` steps (and after the last step when ``max_steps`` is given).
    max_steps : the number of steps, for the progress bar and ETA.
    keep : keep only the newest ``keep`` checkpoints (default: all).
    folder : where ``checkpoint-N`` folders go. Inside a ``%%dreamer_train`` cell the default is
        the trainer's ``_checkpoints`` folder; outside one it must be given.

    In a distributed run only the main process writes checkpoints; every process resumes.
    """

    def __init__(
        self,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        *,
        every: int = 100,
        max_steps: int | None = None,
        keep: int | None = None,
        folder: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise DreamerError(f"Checkpointer(every={every!r}): give a whole number of steps, 1 or more")
        if keep is not None and (not isinstance(keep, int) or keep < 1):
            raise DreamerError(f"Checkpointer(keep={keep!r}): give a whole number of checkpoints, 1 or more, or None")
        self.run = active_trainer()
        if folder is None:
            if self.run is None:
                raise DreamerError(
                    "Checkpointer() outside a %%dreamer_train cell needs a folder: Checkpointer(model, optimizer, "
                    "folder='checkpoints')"
                )
            folder = self.run.checkpoints_dir(0)
        self.folder = Path(folder).absolute()
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.every, self.max_steps, self.keep = every, max_steps, keep
        self.global_step = 0
        self.log_history: list[dict] = []
        self._main = is_main_process()
        if self.run is not None:
            self.run.checkpointers.append(self)
            if max_steps:
                self.run.status.max_steps = max_steps
                self.run.status.changed()

    @property
    def status(self) -> Status | None:
        return self.run.status if self.run is not None else None

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        return latest_checkpoint(self.folder, need_optimizer=False, status=self.status, move_aside=self._main)

    def resume(self) -> int:
        """Load the newest complete checkpoint; return the number of steps it holds (0 if none).

        With ``--no-resume`` (or none saved yet) nothing is loaded and 0 is returned.
        """
        if self.run is not None and not self.run.resume:
            return 0
        found = self.latest()
        if found is None:
            if self.run is not None:
                self.run.live.begin(0, self.max_steps)
            return 0
        self.load(found)
        if self.run is not None:
            losses = [(int(e["step"]), float(e["loss"])) for e in self.log_history if "loss" in e]
            self.run.resuming_from(found, losses)
            if self.run.main:
                self.run.status.checkpoints = list_checkpoints(self.folder, validate=False)
        return self.global_step

    def load(self, checkpoint: str | os.PathLike) -> int:
        """Load one checkpoint folder (model, optimizer, scheduler, RNG states); return its step."""
        from safetensors.torch import load_file, load_model

        path = Path(checkpoint)
        state = _read_state(path)
        device = _device_of(self.model)
        load_model(self.model, str(path / "model.safetensors"), device=str(device) if device is not None else "cpu")
        if self.optimizer is not None and (path / "optimizer.pt").exists():
            self.optimizer.load_state_dict(_torch_load(path / "optimizer.pt"))
        if self.scheduler is not None and (path / "scheduler.pt").exists():
            self.scheduler.load_state_dict(_torch_load(path / "scheduler.pt"))
        rng = _read_json(path / "rng_state.json") or {}
        if (path / "rng_state.safetensors").exists():
            tensors = load_file(str(path / "rng_state.safetensors"))
            _set_rng_states(rng, tensors)
        self.global_step = int(state.get("global_step") or checkpoint_step(path) or 0)
        self.log_history = list(state.get("log_history") or [])
        return self.global_step

    def step(self, step: int, *, loss: Any = None, **metrics: Any) -> bool:
        """Record that step ``step`` (0-based) finished; save a checkpoint every ``every`` steps.

        Returns whether a checkpoint was written.
        """
        done = int(step) + 1
        self.global_step = done
        entry: dict[str, Any] = {"step": done}
        if loss is not None:
            with contextlib.suppress(TypeError, ValueError):
                entry["loss"] = float(loss.item() if hasattr(loss, "item") else loss)
        for key, value in metrics.items():
            with contextlib.suppress(TypeError, ValueError):
                entry[key] = float(value.item() if hasattr(value, "item") else value)
        if len(entry) > 1:
            self.log_history.append(entry)
        if self.run is not None:
            if "loss" in entry:
                self.run.status.losses.append((done, entry["loss"]))
            self.run.live.progress(done)
        if done % self.every == 0 or (self.max_steps is not None and done == self.max_steps):
            self.save(done)
            return True
        return False

    def save(self, steps_done: int | None = None) -> Path:
        """Write ``checkpoint-<steps_done>`` now (atomically: temporary folder, then rename)."""
        import torch
        from safetensors.torch import save_file, save_model

        done = self.global_step if steps_done is None else int(steps_done)
        final = self.folder / f"checkpoint-{done}"
        if not self._main:
            return final
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".checkpoint-{done}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            files = ["model.safetensors"]
            save_model(self.model, str(tmp / "model.safetensors"))
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                files.append("optimizer.pt")
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                files.append("scheduler.pt")
            rng, tensors = _get_rng_states()
            save_file(tensors, str(tmp / "rng_state.safetensors"))
            (tmp / "rng_state.json").write_text(json.dumps(rng), encoding="utf-8")
            files += ["rng_state.safetensors", "rng_state.json"]
            state = {
                "global_step": done,
                "max_steps": self.max_steps,
                "every": self.every,
                "log_history": self.log_history,
                "dreamer_files": files,
            }
            (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():
                trash = self.folder / f".{final.name}.trash-{uuid.uuid4().hex[:8]}"
                os.rename(final, trash)
                shutil.rmtree(trash, ignore_errors=True)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune()
        if self.run is not None:
            self.run.live.checkpoint_saved(self.folder)
        return final

    def _prune(self) -> None:
        if self.keep is None:
            return
        complete = [c for c in list_checkpoints(self.folder) if c.complete]
        for old in complete[: -self.keep]:
            shutil.rmtree(self.folder / old.name, ignore_errors=True)


def _device_of(model: Any) -> Any:
    with contextlib.suppress(StopIteration, AttributeError):
        return next(model.parameters()).device
    return None


def _torch_load(path: Path) -> Any:
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # a scheduler with custom objects in its state
        return torch.load(path, map_location="cpu", weights_only=False)


def _get_rng_states() -> tuple[dict, dict]:
    """Python, NumPy, torch and CUDA generator states: JSON for the first two, tensors for torch."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    rng = {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = state
    return rng, tensors


def _set_rng_states(rng: dict, tensors: dict) -> None:
    import random

    import numpy as np
    import torch

    if "python" in rng:
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng:
        name, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all(cuda)


# -- the magic's core ----------------------------------------------------------------------------


def explain(name: str, source: str, namespace: dict, meta: dict | None, problem: str | None, **options: Any) -> list[str]:
    """``%dreamer why`` for a trainer: :func:`dreamer_magic.steps.explain` with the components
    a trainer computes (models it trained in place count as the originals)."""

    def components_for(spec: StepSpec) -> dict:
        return TrainerRun(spec, lambda: namespace, Status(kind="trainer", name=name), namespace=namespace).components()

    options["kind"] = "trainer"
    return steps.explain(name, source, namespace, meta, problem, components_for=components_for, **options)


def run_cell_trainer(
    name: str,
    source: str,
    namespace: dict,
    execute: Callable[[], Any],
    *,
    resume: bool = True,
    rerun: Callable[[str], Any] | None = None,
    status: Status | None = None,
    **options: Any,
) -> Status:
    """Run a cell as a trainer: fingerprint, then load (hit), restore, resume or train; put outputs in ``namespace``.

    ``execute()`` runs the body in ``namespace``; ``resume=False`` is ``--no-resume``;
    ``rerun(source)`` re-executes the ``import``/``def``/``class`` statements on a hit;
    ``options`` are those of :func:`dreamer_magic.steps.cell_spec` (``inputs``, ``outputs``,
    ``version``, ``force``, ``replay``, ``allow_pickle``, ``exclude``).
    """
    spec, info = cell_spec(name, source, namespace, kind="trainer", **options)

    def run_body() -> dict:
        execute()
        return namespace

    run = TrainerRun(spec, run_body, status or Status(kind="trainer", name=name), resume=resume, namespace=namespace)
    values = run.run()
    if run.status.state in (LOADED, RESTORED):
        rerun_statements(info.rebind, namespace, rerun, name)
    namespace.update(values)
    return run.status

