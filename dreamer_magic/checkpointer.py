"""Checkpoint and resume a plain PyTorch training loop: :class:`Checkpointer`.

A checkpoint holds the model's weights (safetensors), the optimizer's and scheduler's state,
the random number generators (Python, NumPy, torch, CUDA) and the loss history; it is written
under a temporary name and renamed into place. Inside a ``%%dreamer_train`` cell the
checkpoints go to the trainer's ``_checkpoints`` folder and feed its live status; the running
trainer is found on the stack of running steps and trainers (:func:`steps.active_runs`).

Examples
--------
>>> ckpt = Checkpointer(model, optimizer, every=50, folder="checkpoints")   # doctest: +SKIP
>>> for step in range(ckpt.resume(), 500):                                # doctest: +SKIP
...     ...
...     ckpt.step(step, loss=loss)
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from . import steps
from .checkpoints import STATE_FILE, checkpoint_step, is_main_process, latest_checkpoint, list_checkpoints, read_state
from .errors import DreamerError, PickleRefusedError
from .folders import discard, read_json, write_folder
from .status import Status

__all__ = ["Checkpointer", "active_trainer"]


def active_trainer() -> Any:
    """The ``%%dreamer_train`` cell running now in this thread (the innermost), or ``None``.

    Examples
    --------
    >>> active_trainer() is None   # outside a trainer cell
    True
    """
    for run in reversed(steps.active_runs()):
        if run.spec.kind == "trainer":
            return run
    return None


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
    allow_pickle : whether resuming may unpickle optimizer or scheduler state that holds more
        than tensors and plain values (a pickle can run code). Default: the trainer cell's
        ``%config DreamerMagics.allow_pickle`` (``True`` outside a cell). When false, such a
        checkpoint is refused with a clear message; plain state loads with ``weights_only``.

    In a distributed run (``%%dreamer_train NAME --processes N``, torchrun) call :meth:`step` on every
    rank: only the main process writes checkpoints, with each rank's random state (gathered over
    ``torch.distributed`` when it is initialised); every rank resumes, with its own random state.
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
        allow_pickle: bool | None = None,
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
        if allow_pickle is None:
            allow_pickle = bool(getattr(getattr(self.run, "spec", None), "allow_pickle", True))
        self.allow_pickle = allow_pickle
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
        state = read_state(path)
        device = device_of(self.model)
        load_model(self.model, str(path / "model.safetensors"), device=str(device) if device is not None else "cpu")
        if self.optimizer is not None and (path / "optimizer.pt").exists():
            self.optimizer.load_state_dict(torch_load(path / "optimizer.pt", allow_pickle=self.allow_pickle))
        if self.scheduler is not None and (path / "scheduler.pt").exists():
            self.scheduler.load_state_dict(torch_load(path / "scheduler.pt", allow_pickle=self.allow_pickle))
        rank = process_rank()
        stem = f"rng_state_{rank}" if rank and (path / f"rng_state_{rank}.safetensors").exists() else "rng_state"
        rng = read_json(path / f"{stem}.json") or {}
        if (path / f"{stem}.safetensors").exists():
            set_rng_states(rng, load_file(str(path / f"{stem}.safetensors")))
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
        others = gather_rng_states()  # collective in a distributed run: every rank calls save()
        if not self._main:
            return final
        with write_folder(final) as tmp:
            files = ["model.safetensors"]
            save_model(self.model, str(tmp / "model.safetensors"))
            if self.optimizer is not None:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
                files.append("optimizer.pt")
            if self.scheduler is not None:
                torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
                files.append("scheduler.pt")
            rng, tensors = get_rng_states()
            save_file(tensors, str(tmp / "rng_state.safetensors"))
            (tmp / "rng_state.json").write_text(json.dumps(rng), encoding="utf-8")
            files += ["rng_state.safetensors", "rng_state.json"]
            for rank, (rank_rng, rank_tensors) in others.items():  # each other rank's own random state
                save_file(rank_tensors, str(tmp / f"rng_state_{rank}.safetensors"))
                (tmp / f"rng_state_{rank}.json").write_text(json.dumps(rank_rng), encoding="utf-8")
                files += [f"rng_state_{rank}.safetensors", f"rng_state_{rank}.json"]
            state = {
                "global_step": done,
                "max_steps": self.max_steps,
                "every": self.every,
                "log_history": self.log_history,
                "dreamer_files": files,
            }
            (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")  # last: it marks "complete"
        self._prune()
        if self.run is not None:
            self.run.live.checkpoint_saved(self.folder)
        return final

    def _prune(self) -> None:
        if self.keep is None:
            return
        complete = [c for c in list_checkpoints(self.folder) if c.complete]
        for old in complete[: -self.keep]:
            with contextlib.suppress(OSError):
                discard(self.folder / old.name)  # renamed first: a kill never leaves half a checkpoint-N


# -- torch helpers --------------------------------------------------------------------------------


def device_of(model: Any) -> Any:
    """The device of a module's first parameter, or ``None``."""
    with contextlib.suppress(StopIteration, AttributeError):
        return next(model.parameters()).device
    return None


def torch_load(path: Path, *, allow_pickle: bool = True) -> Any:
    """``torch.load`` onto the CPU with ``weights_only``; state holding custom objects (a scheduler's
    lambda, say) needs a full unpickle, done only when ``allow_pickle``.

    Raises
    ------
    PickleRefusedError
        If the file needs a full unpickle and ``allow_pickle`` is false.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            raise PickleRefusedError(pickled_checkpoint_message(path)) from e
        return torch.load(path, map_location="cpu", weights_only=False)


def process_rank() -> int:
    """This process's rank in a distributed run (0 outside one)."""
    import sys

    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    with contextlib.suppress(ValueError):
        return int(os.environ.get("RANK", "").strip() or 0)
    return 0


def gather_rng_states() -> dict[int, tuple[dict, dict]]:
    """The random states of the other ranks, gathered on rank 0 (``{}`` on other ranks and outside
    a distributed run); every rank must call it, as with any collective."""
    import sys

    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is None or not dist.is_available() or not dist.is_initialized() or dist.get_world_size() < 2:
        return {}
    mine = get_rng_states()
    everyone: list | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    return {rank: state for rank, state in enumerate(everyone or []) if rank and state is not None}


def pickled_checkpoint_message(path: Path) -> str:
    """Why a checkpoint file is refused while ``allow_pickle`` is off, and the two ways on."""
    path = Path(path)
    return (
        f"{path.parent.name}/{path.name} holds objects that only a full unpickle can load (a pickle can run "
        "code when it is loaded), and loading pickles is turned off. If you trust this output folder, run "
        "`%config DreamerMagics.allow_pickle = True` and run the cell again; or run it with --no-resume to "
        "train from the start"
    )


def get_rng_states() -> tuple[dict, dict]:
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


def set_rng_states(rng: dict, tensors: dict) -> None:
    """Put back what :func:`get_rng_states` returned."""
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
