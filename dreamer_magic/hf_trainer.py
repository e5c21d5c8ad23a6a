"""The ``transformers.Trainer`` integration of ``%%dreamer_train``.

While a trainer cell's body runs, :func:`patched_trainer` patches ``Trainer.__init__`` and
``Trainer.train`` on the base class (so subclasses such as trl's ``SFTTrainer`` are covered):
every Trainer built in the cell, or built in an earlier cell and trained in this one, writes
its checkpoints to the trainer's ``_checkpoints`` folder whatever ``output_dir`` says, a callback feeds the live status (progress, ETA, losses,
checkpoints), and ``train()`` resumes from the latest complete checkpoint unless
``resume_from_checkpoint`` is given or ``--no-resume`` was. The patches are undone when the
body ends, even on error; a Trainer built before the cell gets its own ``args`` and callbacks
back then.

Resuming reads ``rng_state.pth``, ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt``) with
``torch.load``. With ``allow_pickle`` off, every such load of a file in the checkpoint is made
with ``weights_only=True`` whatever the installed transformers asks (recent versions already
do; older ones did not), and a file that needs a full unpickle stops the resume with one clear
line (:func:`weights_only_loads`): resuming with it dropped would silently change the training,
and loading it would run whatever the pickle holds.

The ``run`` handed in is the running trainer (``trainers.TrainerRun``); this module only uses
the attributes named in :func:`patched_trainer`, so it does not import the lifecycle.

Examples
--------
>>> with patched_trainer(run):   # doctest: +SKIP
...     run.execute()
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import os
import re
import sys
import weakref
from pathlib import Path
from typing import Any, Iterator

__all__ = ["patched_trainer", "weights_only_loads"]

_CALLBACK_CLASS: type | None = None


def _is_within(path: Any, folder: Any) -> bool:
    """Whether ``path`` lies inside ``folder`` (both as given, resolved against the working directory)."""
    inner, outer = os.path.abspath(str(path)), os.path.abspath(str(folder))
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _status_callback_class() -> type:
    from transformers import TrainerCallback

    class DreamerStatusCallback(TrainerCallback):
        """Feeds the ``%%dreamer_train`` status: progress, ETA, losses and checkpoints."""

        def __init__(self, live: Any, folder: Path) -> None:
            self.live, self.folder = live, folder

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.begin(state.global_step, state.max_steps)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.progress(state.global_step)

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
            if logs and "loss" in logs:
                self.live.loss(state.global_step, logs["loss"])
            if logs and "eval_loss" in logs:  # validation loss: its own line on the card's curve
                with contextlib.suppress(TypeError, ValueError):
                    self.live.status.eval_losses.append((int(state.global_step), float(logs["eval_loss"])))
                    self.live.changed(force=True)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.checkpoint_saved(self.folder)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.live.status.step = state.global_step
            self.live.status.eta = 0.0
            self.live.changed(force=True)

    return DreamerStatusCallback


def is_trainer(value: Any) -> bool:
    """A ``transformers.Trainer`` (without importing transformers)."""
    module = sys.modules.get("transformers.trainer")
    return module is not None and isinstance(value, module.Trainer)


@contextlib.contextmanager
def weights_only_loads(folder: Path) -> Iterator[None]:
    """While active, ``torch.load`` of a file under ``folder`` never runs a pickle's code.

    Examples
    --------
    >>> with weights_only_loads(checkpoint):   # doctest: +SKIP
    ...     trainer.train(resume_from_checkpoint=str(checkpoint))

    Such loads are made with ``weights_only=True``; one that needs more raises
    :class:`~dreamer_magic.errors.PickleRefusedError`, naming the file and the ways on.
    Loads of other files are left as they are.
    """
    import pickle

    import torch

    from .checkpointer import pickled_checkpoint_message
    from .errors import PickleRefusedError

    real = torch.load

    @functools.wraps(real)
    def load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(f, (str, os.PathLike)) or not _is_within(f, folder):
            return real(f, *args, **kwargs)
        kwargs["weights_only"] = True
        try:
            return real(f, *args, **kwargs)
        except pickle.UnpicklingError as e:
            raise PickleRefusedError(pickled_checkpoint_message(Path(f))) from e

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


@contextlib.contextmanager
def patched_trainer(run: Any) -> Iterator[None]:
    """Redirect, watch and resume every ``transformers.Trainer`` built or trained while the body runs.

    Examples
    --------
    >>> with patched_trainer(run):   # doctest: +SKIP
    ...     trainer = Trainer(model=model, args=args, train_dataset=ds); trainer.train()

    ``run`` provides: ``spec.source``, ``finished``, ``checkpoints_dir(i)``, ``trainers`` and
    ``trainer_ids`` (filled here), ``status``, ``live`` (``begin``/``progress``/``loss``/
    ``checkpoint_saved``/``changed``), ``resume``, ``find_resume_point(folder, need_optimizer=)``,
    ``resuming_from(checkpoint)``, and ``last_trainer``/``train_output`` (set here).
    Nothing is patched when the cell does not use transformers' Trainer.
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

    def redirected(training_args: Any, folder: Path) -> Any:
        """A copy of ``training_args`` writing under ``folder`` (the user's object keeps its output_dir)."""
        original = training_args.output_dir
        training_args = copy.copy(training_args)
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
        return training_args

    def watch(trainer: Any, folder: Path) -> Any:
        callback = callback_class(run.live, folder)
        trainer.add_callback(callback)
        run.trainers.append(weakref.ref(trainer))
        run.trainer_ids.add(id(trainer))
        return callback

    adopted: list[tuple[Any, Any, Any]] = []  # (trainer built before the cell, its own args, our callback)

    def adopt(trainer: Any) -> None:
        """A Trainer built in an earlier cell and trained here: redirected and watched while the
        body runs, as one built in the cell; its arguments and callbacks are put back afterwards."""
        folder = run.checkpoints_dir(len(run.trainers))
        own = trainer.args
        trainer.args = redirected(own, folder)
        adopted.append((trainer, own, watch(trainer, folder)))

    @functools.wraps(original_init)
    def __init__(trainer: Any, *args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True  # noqa: F841
        if run.finished:
            return original_init(trainer, *args, **kwargs)
        bound = init_signature.bind(trainer, *args, **kwargs)
        folder = run.checkpoints_dir(len(run.trainers))
        training_args = bound.arguments.get("args")
        if training_args is None:
            training_args = TrainingArguments(output_dir=str(folder))
        else:
            training_args = redirected(training_args, folder)
        bound.arguments["args"] = training_args
        original_init(*bound.args, **bound.kwargs)
        watch(trainer, folder)

    @functools.wraps(original_train)
    def train(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841 - an error in training shows transformers' and the user's frames
        if run.finished:
            return original_train(trainer, *args, **kwargs)
        if id(trainer) not in run.trainer_ids:
            adopt(trainer)
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
        resuming = bound.arguments.get("resume_from_checkpoint")
        guard = contextlib.nullcontext()
        if isinstance(resuming, (str, os.PathLike)) and not getattr(run.spec, "allow_pickle", True):
            guard = weights_only_loads(Path(resuming))
        with guard:
            output = original_train(*bound.args, **bound.kwargs)
        run.train_output = output
        return output

    Trainer.__init__, Trainer.train = __init__, train  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.__init__, Trainer.train = original_init, original_train  # type: ignore[method-assign]
        for trainer, own, callback in adopted:
            trainer.args = own
            with contextlib.suppress(ValueError):
                trainer.remove_callback(callback)
