"""The trainer lifecycle: ``%%dreamer_train`` cells that checkpoint, resume and reload.

A trainer is a step whose body trains a model. It differs from a step in three ways:

* It trains **in place**, in ``output/<name>/``: checkpoints must survive the kernel being
  killed, so they cannot live in a temporary folder. A small ``.in-progress.json`` marker
  (with the fingerprint) says that training started; ``trainer.json``, written last, says it
  finished. Re-running a cell whose training did not finish resumes it: from the latest
  *complete* checkpoint, with the same loss values as an uninterrupted run.
* Every ``transformers.Trainer`` built in the cell, or built in an earlier cell and trained in
  this one, is redirected: its checkpoints go to ``<name>/_checkpoints`` whatever ``output_dir`` says, a callback feeds the live status
  (progress, ETA, loss curve, checkpoints), and ``train()`` resumes from the latest complete
  checkpoint unless ``resume_from_checkpoint`` is given or ``--no-resume`` was. A plain PyTorch
  loop gets the same from :class:`Checkpointer`.
* When the cell finishes, models, tokenizers and processors are saved with ``save_pretrained``
  to ``<name>/_model/`` (the main model and its tokenizer at the top, other ones in
  ``_model/<variable>/``), with ``training_args.json``, ``trainer_state.json`` (the log
  history) and ``metrics.json``. A hit loads them back with ``from_pretrained`` of the
  recorded class. ``Trainer`` objects are not saved (they hold live training state): after
  a hit the variable is left as it was, and the status says so. A Trainer built before the cell
  (an input) gets its ``args`` and callbacks back when the cell ends; its model and tokenizer are
  saved as the variables that hold them (else as ``trainer.model``), and a hit copies the trained
  weights into its model and restores its state (log history, global step).

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

Multi-GPU from the notebook: ``%%dreamer_train NAME --processes N`` (:mod:`.distributed`) forks N
workers that each run this lifecycle as below, then loads the trained model in the kernel.
Multi-GPU (``accelerate launch``, ``torchrun``): every process runs the cell and trains, but
only the main process (rank 0; ``torch.distributed`` rank when it is initialised, else the
``RANK`` / ``LOCAL_RANK`` environment variables) moves folders, writes ``_model``,
``trainer.json`` and :class:`Checkpointer` checkpoints; the other processes do not take the
trainer's lock (that would deadlock the collective operations) and write nothing but what
transformers itself writes per rank.

Where the parts live: :mod:`.checkpoints` (checkpoint validation and listing, and the resume
decision as a pure function), :mod:`.checkpointer` (the plain-PyTorch :class:`Checkpointer`),
:mod:`.hf_trainer` (the ``transformers.Trainer`` patches and status callback), :mod:`.storage`
(how models, weights and ``TrainingArguments`` are saved and loaded); this module is the
lifecycle that ties them together and re-exports what users and tests import from here.

Examples
--------
>>> %%dreamer_train sft-small                                   # doctest: +SKIP
... args = TrainingArguments(output_dir="anything", max_steps=500, save_steps=100)
... trainer = Trainer(model=model, args=args, train_dataset=train_ds, processing_class=tok)
... trainer.train()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import time
import weakref
from collections import ChainMap
from pathlib import Path
from typing import Any, Callable, Iterator

from . import steps
from .checkpointer import Checkpointer, active_trainer
from .checkpoints import (
    CHECKPOINTS,
    IN_PROGRESS,
    RESUME_FROM_BACKUP,
    TRAINER_FILE,
    ResumeDecision,
    check_checkpoint,
    checkpoint_step,
    decide_resume,
    is_main_process,
    latest_checkpoint,
    list_checkpoints,
    losses_from_state,
    read_resume_facts,
    read_state,
)
from .errors import DreamerError, StorageError
from .fingerprint import fingerprint, json_safe, model_fingerprint
from .folders import OutputFolder, fsync_tree, now_iso, read_json, read_meta, saving_into, write_json_atomic
from .integrity import RECORD, record_files
from .hf_trainer import is_trainer as _is_hf_trainer, patched_trainer
from .status import FAILED, INTERRUPTED, LOADED, PULLED, RAN, RESTORED, Status, resumed_from
from .steps import (
    REPLAY_FILE,
    StepRun,
    Frontend,
    StepSpec,
    _describe,
    cell_spec,
    components_of,
    current_remote,
    fingerprint_of,
    why,
    write_replay,
)
from .storage import class_path, is_module, is_pretrained, is_training_args, load_outputs

__all__ = [
    "Checkpointer",
    "ResumeDecision",
    "TrainerRun",
    "active_trainer",
    "check_checkpoint",
    "checkpoint_step",
    "decide_resume",
    "explain",
    "is_main_process",
    "latest_checkpoint",
    "list_checkpoints",
    "run_cell_trainer",
]

MODEL = "_model"
MAX_LOSS_POINTS = 2000  # loss points kept in trainer.json (the full history is in _model/)
_UPDATE_EVERY = 0.25  # seconds between live status updates (besides losses and checkpoints)


def _is_trainer(value: Any) -> bool:
    """A ``transformers.Trainer`` or a :class:`Checkpointer`: live training state, never saved."""
    return isinstance(value, Checkpointer) or _is_hf_trainer(value)


# -- what counts as a model in the fingerprint ----------------------------------------------------


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
    """``value`` itself, or for models, tokenizers, optimizers, schedulers and ``Trainer`` objects
    a :class:`_Key` of their canonical fingerprint (what they compute; see
    fingerprint.model_fingerprint; a Trainer counts by its model, arguments, data, collator and
    callbacks, so one trained in place by this trainer is recognised as its own output)."""
    torch = sys.modules.get("torch")
    if (
        is_module(value)
        or (getattr(value, "backend_tokenizer", None) is not None and is_pretrained(value))
        or (torch is not None and isinstance(value, (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)))
        or _is_hf_trainer(value)
    ):
        return _Key(model_fingerprint(value, mode=False) if is_module(value) else fingerprint(value))  # training sets the mode itself
    return value


# -- live status ---------------------------------------------------------------------------------


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
            self.run.push_checkpoints()
        self.changed(force=True)

    def changed(self, force: bool = False) -> None:
        if self.run.finished and self.run.status.duration is not None:
            return  # a Trainer trained again in a later cell: this cell's status is final
        now = time.perf_counter()
        if force or now - self._last >= _UPDATE_EVERY:
            self._last = now
            self.status.changed()


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
        frontend: Frontend | None = None,
    ) -> None:
        super().__init__(spec, execute, status, frontend, namespace=namespace)
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
        self._pulled: set[str] = set()  # checkpoints pulled from the remote output folder by this run
        self.attached: dict[str, tuple[str, str]] = {}  # output -> (Trainer input, attribute) it came from
        # hooks for distributed.py: called where training would start (under the lock), once the folder is
        # ready to train in (rank 0 prepared it), and context managers entered around the body
        self.before_training: Callable[["TrainerRun"], None] | None = None
        self.folder_ready: Callable[[], Any] | None = None
        self.around_body: list[Callable[[], Any]] = []
        self.arguments_left_out: str | None = None  # why a hit leaves TrainingArguments out (distributed.py)

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
        records = [read_meta(self.final, TRAINER_FILE)[0], read_json(self.marker)]
        base = self.out.backup_dir(self.name_path)
        if base.is_dir():
            for child in base.iterdir():
                records.append(read_json(child / TRAINER_FILE) or read_json(child / IN_PROGRESS))
        pairs: dict[str, str] = {}
        for record in records:
            trained = (record or {}).get("trained")
            for pair in (trained.values() if isinstance(trained, dict) else ()):  # a hand-edited record: ignored
                if isinstance(pair, dict) and isinstance(pair.get("after"), str) and isinstance(pair.get("before"), str):
                    pairs.setdefault(pair["after"], pair["before"])
        return pairs

    def _decide(self, components: dict, fp: str) -> ResumeDecision:
        """Read what is on disk and decide whether to resume (:func:`checkpoints.decide_resume`)."""
        facts = read_resume_facts(self.final, self.out.backup_dir(self.name_path), self.out.root, fp)
        marker = facts["marker"]
        changes = why(marker, components, self.spec.source) if marker is not None else []
        return decide_resume(fingerprint=fp, force=self.spec.force, resume=self.resume, changes=changes, **facts)

    def _reusable(self, fp: str) -> bool:
        facts = read_resume_facts(self.final, self.out.backup_dir(self.name_path), self.out.root, fp)
        return decide_resume(fingerprint=fp, force=self.spec.force, resume=self.resume, **facts).reusable

    # -- loading a finished trainer ---------------------------------------------------
    def _load_values(self, folder: Path, entries: dict) -> dict[str, Any]:
        """Models with ``from_pretrained``; plain modules trained in place get their weights back."""
        namespace = ChainMap(self.namespace, self.spec.inputs)
        arguments = {n: e for n, e in entries.items() if e.get("storage") == "training_args"}
        others = {n: e for n, e in entries.items() if n not in arguments}
        values = load_outputs(folder, others, allow_pickle=self.spec.allow_pickle, namespace=namespace)
        values.update(self._load_arguments(folder, arguments))
        for name, entry in entries.items():
            into = entry.get("into")
            if isinstance(into, str) and name in values:
                values[name] = self._put_back(values[name], into, folder)
        return values

    def _load_arguments(self, folder: Path, entries: dict) -> dict[str, Any]:
        """``TrainingArguments``; one saved by a distributed run that cannot be rebuilt in this process
        (``ddp_backend="gloo"`` needs a process group) is left as it was, with a note, instead of retraining."""
        from .storage import load_value

        values: dict[str, Any] = {}
        for name, entry in entries.items():
            if self.arguments_left_out:
                self.status.notes.append(f"`{name}` was not restored in the kernel: {self.arguments_left_out}")
                continue
            if not (folder / str(entry.get("path") or "")).is_file():
                raise StorageError(f"`{name}`'s saved arguments are missing ({entry.get('path')})")
            try:
                values[name] = load_value(folder, entry, name=name)
            except StorageError as e:
                self.status.notes.append(
                    f"`{name}` was not restored ({e}); the trained model was loaded. Build the arguments again in a "
                    "cell to train further"
                )
        return values

    def _put_back(self, loaded: Any, into: str, folder: Path) -> Any:
        """A hit: give the Trainer built before the cell (``into`` is ``trainer.model``) what training
        left in it: the trained weights copied into its own model (same object, device and dtype, so
        ``model is trainer.model`` still holds) and its state (log history, global step)."""
        tname, _, attr = into.partition(".")
        trainer = self.namespace.get(tname, self.spec.inputs.get(tname))
        if not _is_hf_trainer(trainer):
            return loaded
        current = getattr(trainer, attr, None)
        if attr == "model" and current is not None:
            import torch

            try:
                with torch.no_grad():
                    current.load_state_dict(loaded.state_dict())
                current.train(loaded.training)  # the mode the run left it in
                loaded = current
            except Exception:  # noqa: BLE001 - another architecture: hand the Trainer the loaded model
                trainer.model = trainer.model_wrapped = loaded
            with contextlib.suppress(Exception):
                from transformers import TrainerState

                trainer.state = TrainerState.load_from_json(str(folder / MODEL / "trainer_state.json"))
            return loaded
        return current if current is not None else loaded  # a tokenizer: part of the Trainer's fingerprint

    def _load(self, folder: Path, meta: dict, state: str, started: float) -> dict[str, Any]:
        values = _variables(super()._load(folder, meta, state, started))
        self.values = values
        status = self.status
        status.step = meta.get("final_step")
        status.max_steps = meta.get("max_steps")
        status.eta = None
        status.losses = [(int(s), float(v)) for s, v in meta.get("losses") or []]
        status.eval_losses = [(int(s), float(v)) for s, v in meta.get("eval_losses") or []]
        status.checkpoints = list_checkpoints(folder / CHECKPOINTS, validate=False)
        status.model_path = str(folder / MODEL)
        for name, kind in (meta.get("not_saved") or {}).items():
            status.notes.append(_not_saved_note(name, kind, meta))
        status.changed()
        return values

    # -- running -----------------------------------------------------------------------
    def _run_and_save(self, components: dict, fp: str, started: float) -> dict[str, Any]:
        __tracebackhide__ = True  # noqa: F841 - IPython shows the user's frames, not the lifecycle's
        status, spec = self.status, self.spec
        if self.before_training is not None:
            self.before_training(self)
        if self.main:
            try:
                with saving_into(self.out.root, f"trainer {spec.name!r}"):
                    self._pull_checkpoint_from_remote(fp)
                    self._prepare_folder(components, fp)
            except DreamerError as e:
                status.state = FAILED
                status.error = str(e)
                raise
        if self.folder_ready is not None:
            self.folder_ready()
        self._note_outside_seed()
        self.live.begin(0, None)
        records: list = []
        injected = "Checkpointer" not in self.namespace
        if injected:
            self.namespace["Checkpointer"] = Checkpointer
        try:
            try:
                tracer = self._tracer()
                with self.frontend.capture(records), patched_trainer(self), tracer, contextlib.ExitStack() as around:
                    for enter in self.around_body:
                        around.enter_context(enter())
                    namespace = self.execute()
            finally:
                self.finished = True
                if injected and self.namespace.get("Checkpointer") is Checkpointer:
                    del self.namespace["Checkpointer"]
            self.dependencies = self._record(tracer)
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
        status.state = resumed_from(status.resumed_from, remote=status.resumed_from in self._pulled) if status.resumed_from else RAN
        status.eta = None
        self._mark_lineage(fp, values)
        status.changed()
        values = _variables(values)
        self.values = values
        return values

    def _note_outside_seed(self) -> None:
        """What to do when a Trainer built in an earlier cell runs again only because the global
        random state differs (it seeds it from ``args.seed`` when built, not when it trains)."""
        names = [n for n, v in self.spec.inputs.items() if _is_hf_trainer(v)]
        if names and any(getattr(r, "kind", None) == "rng" for r in self.status.reasons):
            self.status.notes.append(
                f"`{names[0]}` was built in an earlier cell, so its training draws from the random state that "
                f"cell left (a Trainer seeds it from args.seed when it is built); re-run the cell that builds "
                f"`{names[0]}`, or build it in this cell, to reuse the saved result"
            )

    def _prepare_folder(self, components: dict, fp: str) -> None:
        """Resume or start over, as :func:`checkpoints.decide_resume` says; back up what must not be trained over."""
        status, spec = self.status, self.spec
        folder = self.final
        decision = self._decide(components, fp)
        if decision.reasons is not None:
            status.reasons = list(decision.reasons)
        if decision.back_up:
            self._moved = self.out.move_to_backup(folder, self.name_path, TRAINER_FILE)
            if self._moved:
                status.notes.append(f"{decision.kept} kept in {self._moved}")
        if decision.action == RESUME_FROM_BACKUP and decision.backup is not None:
            os.rename(self.out.root / decision.backup, folder)
        self._resumed = decision.resumes
        (folder / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        if self._resumed:  # leftovers of a save that did not finish
            for stale in (MODEL, "_outputs", "_dataset", REPLAY_FILE):
                path = folder / stale
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                elif path.exists():
                    path.unlink()
        previous = read_json(self.marker) or {}
        write_json_atomic(
            self.marker,
            {
                "name": spec.name,
                "kind": "trainer",
                "fingerprint": fp,
                "components": components,
                "source": spec.source,
                "started": previous.get("started") if self._resumed else now_iso(),
                "attempts": _whole(previous.get("attempts")) + 1 if self._resumed else 1,
                "pid": os.getpid(),
                "trained": previous.get("trained") or {} if self._resumed else {},
            },
        )
        status.folder = str(folder)
        status.changed()

    # -- the remote output folder (remote.py, SPEC §7) ---------------------------------------
    def _takes_lease(self) -> bool:
        return self.main  # the other ranks of a distributed run follow the main process

    def push_checkpoints(self) -> None:
        """Queue the upload of every complete checkpoint not yet complete remotely (in the background)."""
        remote = current_remote()
        if remote is None or self.parent is not None:
            return
        remote.push_checkpoints_later(
            self.out.root, self.name_path, IN_PROGRESS, lambda path: check_checkpoint(path, need_optimizer=False) is None
        )

    def _pull_checkpoint_from_remote(self, fp: str) -> None:
        """A fresh machine: bring the newest *complete* remote checkpoint of this very run (the
        remote in-progress marker has ``fp``) and that marker into the local trainer folder, when
        it is newer than any complete local one, so that training resumes from it."""
        remote = current_remote()
        if remote is None or self.parent is not None or self.spec.force or not self.resume:
            return
        local_marker = read_json(self.marker)
        if local_marker is not None and local_marker.get("fingerprint") != fp:
            return  # another run is in progress here: decide_resume deals with it
        if read_meta(self.final, TRAINER_FILE)[0] is not None:
            return  # a finished trainer is in place: a hit, or backed up by _prepare_folder
        try:
            remote_marker = remote.read_json(f"{self.name_path}/{IN_PROGRESS}")
            if remote_marker is None or remote_marker.get("fingerprint") != fp:
                return
            names = remote.complete_checkpoints(self.name_path, fp)
            if not names:
                return
            newest = names[-1]
            local = latest_checkpoint(self.final.joinpath(*Path(newest).parent.parts), need_optimizer=False, move_aside=False)
            if local is not None and (checkpoint_step(local) or 0) >= (checkpoint_step(Path(newest)) or 0):
                return
            self.status.notes.append(f"pulling {Path(newest).name} from {remote.url}")
            self.status.changed()
            problem = remote.pull_checkpoint(self.name_path, newest, self.final)
        except Exception as e:  # noqa: BLE001 - an unreachable remote means training from what is here
            problem = f"{type(e).__name__}: {e}"
        self.status.notes[:] = [n for n in self.status.notes if not str(n).startswith("pulling checkpoint-")]
        if problem is not None:
            self.status.notes.append(f"the remote checkpoint was not used: {problem}")
            return
        if local_marker is None:
            write_json_atomic(self.marker, remote_marker)
        self._pulled.add(Path(newest).name)

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
        status.state = resumed_from(checkpoint.name, remote=checkpoint.name in self._pulled)
        state = read_state(checkpoint)
        status.losses = losses if losses is not None else losses_from_state(state)
        status.step = checkpoint_step(checkpoint)
        if state.get("max_steps"):
            status.max_steps = int(state["max_steps"])
        self.live.begin(status.step or 0, status.max_steps)

    def _kept_phrase(self) -> str:
        if not self.main:
            return "this process saves nothing"
        if self.final.exists() and list_checkpoints(self.final / CHECKPOINTS, validate=False):
            return "the checkpoints are kept: run the cell again to resume"
        return "nothing saved, the previous result is kept"

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
            marker = read_json(self.marker)
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
                if is_module(value) or is_pretrained(value):
                    values[name] = value
        self._attach_trainer_models(values, namespace)
        return values

    def _attach_trainer_models(self, values: dict, namespace: dict) -> None:
        """The model and tokenizer/processor of each Trainer input this cell trained (one built in
        an earlier cell) are outputs too: saved to ``_model`` under the variable that holds them
        (``model``), or as ``trainer.model`` when none does, and put back into the Trainer on a hit."""
        for tname, trainer in self.spec.inputs.items():
            if not _is_hf_trainer(trainer) or id(trainer) not in self.trainer_ids:
                continue
            for attr in ("model", "processing_class"):
                obj = getattr(trainer, attr, None)
                if obj is None or not is_pretrained(obj):
                    if attr == "model" and obj is not None:
                        self.status.notes.append(
                            f"`{tname}.model` is a plain PyTorch module: it is not saved, so a hit leaves it untrained; "
                            "build the Trainer inside this cell and bind the model there to keep it"
                        )
                    continue
                if any(v is obj for v in values.values()):
                    name = next(n for n, v in values.items() if v is obj)
                else:
                    held = [n for n, v in namespace.items() if v is obj and not n.startswith("_") and n.isidentifier()]
                    name = ("model" if attr == "model" and "model" in held else held[0]) if held else f"{tname}.{attr}"
                    values[name] = obj
                self.attached[name] = (tname, attr)

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
                    if is_module(value) and is_pretrained(value) and model is None:
                        model = name
                    elif not is_module(value) and is_pretrained(value) and tokenizer is None:
                        tokenizer = name
        for name, value in values.items():
            if model is None and is_module(value) and is_pretrained(value):
                model = name
            if tokenizer is None and not is_module(value) and is_pretrained(value) and hasattr(value, "backend_tokenizer"):
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
        placements: dict[str, tuple[str, str]] = {}
        saveable: dict[str, Any] = {}
        not_saved: dict[str, str] = {}
        for name, value in values.items():
            if _is_trainer(value):
                not_saved[name] = type(value).__name__
                continue
            saveable[name] = value
            if is_pretrained(value):
                placements[name] = ("pretrained", MODEL if name in (main_model, main_tokenizer) else f"{MODEL}/{name}")
            elif is_module(value) and name in self.spec.inputs:
                placements[name] = ("state_dict", f"{MODEL}/{name}.safetensors")
            elif is_training_args(value):
                placements[name] = ("training_args", f"_outputs/{name}.training_args.json")
        entries = _save_outputs(saveable, folder, placements, not_saved)
        steps.record_inherited_lineage(saveable, entries)
        self.entries = entries
        for name, (tname, attr) in self.attached.items():
            if name in entries:
                entries[name]["into"] = f"{tname}.{attr}"
        meta_extra = self._write_model_metadata(model_dir)
        write_replay(folder, records)
        self._write_rng(folder)
        for written in (MODEL, "_outputs", "_dataset", REPLAY_FILE, steps.RNG_FILE):  # data first, then trainer.json
            if (folder / written).exists():
                fsync_tree(folder / written)
        trained = self._trained_inputs()
        marker = read_json(self.marker) or {}
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
            "eval_losses": _thin(status.eval_losses, MAX_LOSS_POINTS),
            "resumed_from": status.resumed_from,
            "checkpoints": [c.name for c in list_checkpoints(folder / CHECKPOINTS, validate=False)],
            "model": MODEL,
            "trained": trained,
            "not_saved": not_saved,
            **meta_extra,
        }
        meta[RECORD] = record_files(folder, skip=[TRAINER_FILE])  # _model, _outputs...: checked on a hit
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
            extra["trainer_class"] = class_path(type(last))
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


def _whole(value: Any) -> int:
    """A count read back from a marker a person may have edited (anything else counts as 0)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _variables(values: dict[str, Any]) -> dict[str, Any]:
    """The outputs that are variables (not ``trainer.model``, saved for a Trainer built before the cell)."""
    return {name: value for name, value in values.items() if name.isidentifier()}


def _save_outputs(values: dict, folder: Path, placements: dict, not_saved: dict[str, str]) -> dict[str, dict]:
    """The outputs, by storage.py. One that cannot be saved is left out (noted), not fatal:
    failing here would throw away a finished training run."""
    from .storage import save_outputs, save_value

    try:
        saved = save_outputs(values, folder, placements=placements)
    except StorageError:  # a write that failed: try each value alone, keep what can be kept
        for leftover in ("_outputs", "_dataset"):
            shutil.rmtree(folder / leftover, ignore_errors=True)
        entries = {}
        for name, value in values.items():
            storage, path = placements.get(name, (None, None))
            try:
                entries[name] = save_value(value, folder, name, storage=storage, path=path)
            except StorageError as e:
                not_saved[name] = f"{type(value).__name__}: {e}"
        return entries
    for name, reason in saved.not_saved.items():
        not_saved[name] = f"{type(values[name]).__name__}: {reason}"
    return dict(saved)


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
    *,
    frontend: Frontend | None = None,
    raw: str | None = None,
    resume: bool = True,
    status: Status | None = None,
    setup: Callable[[TrainerRun], Any] | None = None,
    **options: Any,
) -> Status:
    """Run a cell as a trainer: fingerprint, then load (hit), restore, resume or train; put outputs in ``namespace``.

    The ``frontend`` runs the body and re-runs its definitions on a hit; ``resume=False`` is
    ``--no-resume``; ``setup(run)`` may set the run's hooks first (distributed.py does); ``options`` are those of :func:`dreamer_magic.steps.cell_spec`
    (``inputs``, ``outputs``, ``version``, ``force``, ``replay``, ``allow_pickle``, ``exclude``).
    """
    __tracebackhide__ = True  # noqa: F841
    started = options.pop("started", None)
    frontend = frontend or steps.current_frontend()
    options.setdefault("transform", frontend.transform)
    spec, info = cell_spec(name, source, namespace, kind="trainer", **options)
    run = TrainerRun(
        spec,
        steps.cell_body(frontend, source, namespace, raw, spec, info),
        status or Status(kind="trainer", name=name),
        resume=resume,
        namespace=namespace,
        frontend=frontend,
    )
    run.cell_info = info
    run.started = started
    if setup is not None:
        setup(run)
    values = run.run()
    namespace.update(values)
    if run.status.state in (LOADED, RESTORED, PULLED):
        steps.leave_as_run_left(namespace, info, run.meta)
    return run.status
