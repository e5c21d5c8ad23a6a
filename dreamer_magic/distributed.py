"""``%%dreamer_train NAME --processes N``: the body trains in N worker processes on torch.distributed.

The kernel fingerprints the cell and looks for a finished trainer first, as for any trainer. On
a miss it forks N workers with torch's launcher (``torch.multiprocessing.start_processes``,
``start_method="fork"``) wrapped by accelerate's ``PrepareForLaunch``, which sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``: what ``notebook_launcher``
does, without its fixed port and its signal handlers. The process group itself is set up by
whatever the body uses (``Trainer``/``Accelerator`` do it; a plain loop calls
``torch.distributed.init_process_group()``): gloo on CPU, nccl on GPUs.

Fork carries the namespace, so every worker computes the fingerprint the kernel computed and
runs the ordinary trainer lifecycle (:func:`trainers.run_cell_trainer`): rank 0 takes the
trainer's lock, resumes or starts over, and writes ``_checkpoints``, ``_model`` and
``trainer.json``; the other ranks wait until rank 0 has prepared the folder, then resume from
the same checkpoint and write nothing. Rank 0 streams its status (progress, loss, checkpoints)
to the kernel through a pipe; the workers' prints reach the cell through ipykernel's own
forwarding of forked output. When the workers finish, the kernel loads the trained model from
``_model`` exactly as on a hit.

A worker that fails or is killed stops them all (torch's launcher terminates the others); the
kernel survives and says at which step, and that the checkpoints are kept for the next run.

The same module refuses bodies that launch processes themselves (``notebook_launcher``,
``torch.multiprocessing.spawn``, an ``mp.Process`` running the training): the kernel would save
the model it still holds, untrained.

Examples
--------
>>> %%dreamer_train sft-small --processes 2                      # doctest: +SKIP
... args = TrainingArguments(output_dir="anything", max_steps=500, save_steps=100)
... Trainer(model=model, args=args, train_dataset=train_ds).train()
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from . import trainers
from .checkpoints import CHECKPOINTS, list_checkpoints
from .errors import DreamerError
from .status import FAILED, INTERRUPTED, RAN, RUNNING, Status
from .steps import Frontend, current_remote

__all__ = ["refuse_launches", "run_cell_trainer"]

_BARRIER_TIMEOUT = 3600.0  # seconds the other ranks wait for rank 0 to prepare the folder (it may wait for a lock)
_STREAMED = (
    "state", "step", "max_steps", "eta", "checkpoints", "resumed_from", "skipped_checkpoints", "notes",
    "error", "folder", "model_path", "progress",
)  # the Status fields rank 0 streams to the kernel (losses go as new points only)


# -- the kernel's side ---------------------------------------------------------------------------


def run_cell_trainer(
    name: str,
    source: str,
    namespace: dict,
    *,
    processes: int | None = None,
    frontend: Frontend | None = None,
    status: Status | None = None,
    **options: Any,
) -> Status:
    """Run a ``%%dreamer_train`` cell, in ``processes`` worker processes when given (``--processes N``).

    Without ``processes`` it is :func:`trainers.run_cell_trainer`, with bodies that launch
    training processes themselves refused. With it: a hit loads as usual; a miss trains in the
    workers, then loads the trained model into ``namespace`` as a hit would. ``options`` are
    those of :func:`trainers.run_cell_trainer`.
    """
    __tracebackhide__ = True  # noqa: F841
    from . import steps

    frontend = frontend or steps.current_frontend()
    if processes is None:
        return trainers.run_cell_trainer(name, source, namespace, frontend=frontend, status=status, setup=_guarded, **options)
    if not isinstance(processes, int) or processes < 1:
        raise DreamerError(f"--processes {processes!r}: give a whole number of worker processes, 1 or more")
    if _inside_worker():
        raise DreamerError(
            f"the trainer {name!r} asks for --processes inside a distributed run (RANK is set): "
            "drop --processes when the notebook itself runs under torchrun or accelerate launch"
        )
    status = status or Status(kind="trainer", name=name)
    card = _OneCard(frontend, status)
    try:
        try:
            trainers.run_cell_trainer(name, source, namespace, frontend=card, status=status, setup=_probe, **options)
            return status  # a hit: loaded from disk, nothing to train
        except _TrainInWorkers:
            pass
        go_live = getattr(card.handle, "go_live", None)  # the workers train: the card shows it live
        if go_live is not None:
            go_live()
        started = time.perf_counter()
        try:
            final = _launch(processes, name, source, namespace, card.inner, status, options)
            _reload(name, source, namespace, card, status, options, final, processes)
        finally:
            status.duration = time.perf_counter() - started
            status.changed()
        return status
    finally:
        card.finish()


class _TrainInWorkers(Exception):
    """Raised by the kernel's probe run at the point where it would start training."""


def _probe(run: Any) -> None:
    def train_in_workers(run: Any) -> None:
        raise _TrainInWorkers()

    run.before_training = train_in_workers
    _keep_cuda_untouched(run)


def _keep_cuda_untouched(run: Any) -> None:
    """A hit or reload in the kernel of a ``--processes`` trainer leaves ``TrainingArguments`` out where
    rebuilding them would initialise CUDA (they set the device up), which the next such cell needs untouched."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and not torch.cuda.is_initialized():
        run.arguments_left_out = (
            "building TrainingArguments would initialise CUDA here, and a `--processes` cell needs it "
            "untouched; they are saved in the trainer's _outputs"
        )


def _reload(name: str, source: str, namespace: dict, card: "_OneCard", status: Status, options: dict, final: dict, n: int) -> None:
    """Load what rank 0 saved, exactly as a hit does; the status then reads as the run it was."""

    def nothing_saved(run: Any) -> None:
        raise DreamerError(
            f"the {n} workers of {name!r} finished but left no finished trainer in {run.final}: "
            "check the output above, then run the cell again"
        )

    def setup(run: Any) -> None:
        run.before_training = nothing_saved
        _keep_cuda_untouched(run)

    reload_options = {**options, "replay": False}  # the workers' output is already in the cell
    trainers.run_cell_trainer(name, source, namespace, frontend=card, status=status, setup=setup, **reload_options)
    status.state = final.get("state") if final.get("state") not in (None, RUNNING) else RAN
    status.saved = None
    note = f"trained in {n} processes ({_backend()}); the kernel loaded the trained model from _model"
    status.notes = list(dict.fromkeys([*status.notes, note]))


@dataclass
class _Job:
    """What each worker needs: the cell, and where to report (inherited through fork)."""

    name: str
    source: str
    namespace: dict
    frontend: Frontend
    options: dict
    writer: Any
    barrier: Any
    remote: str | None = None  # the URL of the remote output folder, if one is set (SPEC §7)


def _launch(n: int, name: str, source: str, namespace: dict, frontend: Frontend, status: Status, options: dict) -> dict:
    """Fork ``n`` workers, stream rank 0's status into ``status`` until they end; returns rank 0's last status."""
    import torch
    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    _refuse_initialised_cuda(name)
    ctx = multiprocessing.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)
    remote = current_remote()
    job = _Job(name, source, namespace, frontend, options, writer, ctx.Barrier(n, timeout=_BARRIER_TIMEOUT), remote.url if remote else None)
    kind = "MULTI_GPU" if torch.cuda.is_available() else "MULTI_CPU"
    port = os.environ.get("MASTER_PORT") or str(_free_port())
    stream = _Stream(status)
    env = dict(nproc=n, node_rank=0, world_size=n, master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"), master_port=port)
    with patch_environment(**env), _default_signals():
        context = start_processes(PrepareForLaunch(_worker, distributed_type=kind), args=(job,), nprocs=n, join=False, start_method="fork")
    writer.close()
    try:
        while True:
            stream.pump(reader)
            try:
                if context.join(timeout=0.05):
                    break
            except Exception as e:  # noqa: BLE001 - a worker raised or died: the others are stopped by now
                stream.pump(reader)
                raise _failure(e, name, status, stream) from None
        stream.pump(reader)
    except KeyboardInterrupt:
        _stop(context.processes)
        stream.pump(reader)
        status.state = INTERRUPTED
        status.error = "interrupted: " + _kept(status)
        raise
    finally:
        _stop(context.processes)
        reader.close()
    return stream.final


def _failure(error: Exception, name: str, status: Status, stream: "_Stream") -> DreamerError:
    """The one line a user reads when a worker failed or was killed; the worker's traceback is printed."""
    rank = getattr(error, "error_index", "?")
    signal_name = getattr(error, "signal_name", None)
    if signal_name:
        what = f"worker {rank} was killed ({signal_name})"
    else:
        text = str(error).strip()
        if text:
            print(text, file=sys.stderr)
        last = [line for line in text.splitlines() if line.strip() and not line.startswith(" ")]
        what = f"worker {rank} failed: {last[-1] if last else type(error).__name__}"
    step = stream.step if stream.step is not None else status.step
    at = f" at step {step}" if step else ""
    status.state = FAILED
    status.error = f"failed{at}: {_kept(status)}"
    status.changed()
    return DreamerError(f"{what}; the trainer {name!r} {status.error} (all workers were stopped)")


def _kept(status: Status) -> str:
    folder = status.folder
    if folder and list_checkpoints(os.path.join(folder, CHECKPOINTS), validate=False):
        return "checkpoints kept, run again to resume"
    return "nothing was saved, run again to start over"


def _stop(processes: list) -> None:
    """Terminate workers still running (SIGTERM, then SIGKILL after a grace period) and reap them."""
    alive = [p for p in processes if p.is_alive()]
    for p in alive:
        with contextlib.suppress(OSError):
            p.terminate()
    deadline = time.monotonic() + 10
    for p in alive:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            with contextlib.suppress(OSError):
                p.kill()
            p.join(5)


class _Stream:
    """The kernel's copy of rank 0's status, fed by the pipe."""

    def __init__(self, status: Status) -> None:
        self.status = status
        self.final: dict = {}
        self.step: int | None = None

    def pump(self, reader: Any) -> None:
        changed = False
        try:
            while reader.poll(0):
                message = reader.recv()
                self.apply(message)
                changed = True
        except (EOFError, OSError):
            pass
        if changed:
            self.status.changed()

    def apply(self, message: dict) -> None:
        status = self.status
        losses, eval_losses = message.pop("losses", []), message.pop("eval_losses", [])
        if message.pop("restart_losses", False):
            status.losses, status.eval_losses = [], []
        status.losses.extend(losses)
        status.eval_losses.extend(eval_losses)
        state = message.get("state")
        for key, value in message.items():
            if key == "notes":
                status.notes = list(dict.fromkeys([*status.notes, *value]))
            elif key == "state":
                status.state = value if value not in (RAN,) else RUNNING  # "ran" once the kernel has the model
            else:
                setattr(status, key, value)
        self.step = status.step
        if state is not None:
            self.final = {"state": state, "step": status.step}


@contextlib.contextmanager
def _default_signals() -> Iterator[None]:
    """Fork with Python's default SIGINT/SIGTERM handling, so a stopped worker dies at once (not in a handler
    the kernel installed), and put the kernel's handlers back."""
    saved = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ValueError, OSError, TypeError):
            saved[sig] = signal.signal(sig, signal.SIG_DFL if sig == signal.SIGTERM else signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    torch = sys.modules.get("torch")
    return "nccl" if torch is not None and torch.cuda.is_available() else "gloo"


def _inside_worker() -> bool:
    return bool(os.environ.get("FORK_LAUNCHED")) or bool(os.environ.get("RANK", "").strip())


def _refuse_initialised_cuda(name: str) -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        raise DreamerError(
            f"CUDA is already initialised in this kernel, so the worker processes of {name!r} cannot use the GPUs "
            "(a forked process cannot re-initialise CUDA). Restart the kernel and keep everything that touches the GPU "
            "(`.to('cuda')`, `torch.cuda` calls, building `TrainingArguments`) inside the `--processes` cell"
        )


class _OneCard(Frontend):
    """The kernel's frontend with one status card for the probe, the workers and the reload."""

    def __init__(self, inner: Frontend, status: Status) -> None:
        super().__init__()
        self.inner, self.status = inner, status
        self.transform = inner.transform
        self.name = inner.name
        self.handle = inner.show(status)

    def run_cell(self, source: str, namespace: dict, raw: str | None = None) -> None:
        self.inner.run_cell(source, namespace, raw)

    def rerun(self, statement: str, namespace: dict) -> None:
        self.inner.rerun(statement, namespace)

    def capture(self, records: list) -> Any:
        return self.inner.capture(records)

    def replay(self, records: list) -> None:
        self.inner.replay(records)

    def show(self, status: Status) -> Any:
        self.inner.last_status = status
        return _Handle()

    def finish(self) -> None:
        self.handle.finish()


class _Handle:
    def finish(self) -> None:
        pass


# -- a worker's side -----------------------------------------------------------------------------


def _worker(job: _Job) -> None:
    """One worker (runs in the forked process): the ordinary trainer lifecycle, on this rank."""
    __tracebackhide__ = True  # noqa: F841
    rank = int(os.environ.get("RANK", "0"))
    _single_threaded()
    _fresh_accelerate_state()
    _own_remote(job.remote if rank == 0 else None)
    status = Status(kind="trainer", name=job.name)
    frontend = _WorkerFrontend(job.frontend, job.writer if rank == 0 else None, job.namespace)

    def setup(run: Any) -> None:
        _guarded(run)
        run.folder_ready = job.barrier.wait

    try:
        trainers.run_cell_trainer(job.name, job.source, job.namespace, frontend=frontend, status=status, setup=setup, **job.options)
    finally:
        _flush_remote()
        frontend.send(status, final=True)
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()


def _own_remote(url: str | None) -> None:
    """Rank 0 mirrors to the remote output folder with its own pusher (the kernel's, copied by fork,
    has no thread behind it); the other ranks write nothing, there either."""
    from . import remote

    remote._remote = remote.Remote(url) if url else None


def _flush_remote() -> None:
    """Rank 0: finish the uploads (checkpoints, the trainer's commit) before the process ends."""
    from .remote import get_remote

    pusher = get_remote()
    if pusher is not None:
        pusher.flush()


def _single_threaded() -> None:
    """One CPU thread per worker: the kernel's OpenMP thread pool does not survive fork (a forked process
    that starts a parallel region the kernel already ran hangs), as in torch's own data-loader workers."""
    import torch

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # accelerate would raise it again
    torch.set_num_threads(1)


def _no_display(value: Any) -> None:
    pass


def _fresh_accelerate_state() -> None:
    """Forget accelerate's single-process state copied from the kernel (``TrainingArguments`` built in an
    earlier cell sets it up), so that this worker sets up its own on the process group."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return
    with contextlib.suppress(Exception):
        state.AcceleratorState._reset_state(True)
    with contextlib.suppress(Exception):
        state.PartialState._reset_state()
    with contextlib.suppress(Exception):
        state.GradientState._reset_state()


def _forget_devices(namespace: dict) -> None:
    """``TrainingArguments`` copied from the kernel cache the kernel's device setup: drop it in this worker."""
    from .storage import is_training_args

    for value in list(namespace.values()):
        candidates = [value, getattr(value, "args", None)]  # a TrainingArguments, or a Trainer's
        for args in candidates:
            if args is not None and is_training_args(args):
                for cached in ("_setup_devices", "distributed_state"):
                    args.__dict__.pop(cached, None)


class _WorkerFrontend(Frontend):
    """The kernel's frontend as a worker uses it: same compiler and capture, status sent to the kernel."""

    def __init__(self, inner: Frontend, writer: Any, namespace: dict) -> None:
        super().__init__()
        self.inner, self.writer, self.namespace = inner, writer, namespace
        self.transform = inner.transform
        self._sent_losses = 0
        self._sent_eval = 0

    def run_cell(self, source: str, namespace: dict, raw: str | None = None) -> None:
        __tracebackhide__ = True  # noqa: F841
        _forget_devices(namespace)
        if self.writer is not None:
            self.inner.run_cell(source, namespace, raw)
            return
        hook = sys.displayhook
        sys.displayhook = _no_display  # the cell's last value is shown once, by rank 0
        try:
            self.inner.run_cell(source, namespace, raw)
        finally:
            sys.displayhook = hook

    def rerun(self, statement: str, namespace: dict) -> None:
        self.inner.rerun(statement, namespace)

    def capture(self, records: list) -> Any:
        return Frontend.capture(self, records)  # prints go to the cell through ipykernel; displays too

    def replay(self, records: list) -> None:
        pass  # the kernel loads (and shows) the result

    def show(self, status: Status) -> Any:
        if self.writer is not None:
            status.on_change(lambda s: self.send(s))
        return _Handle()

    def send(self, status: Status, final: bool = False) -> None:
        """Rank 0: the status fields the card shows, and the loss points not sent yet."""
        if self.writer is None:
            return
        restart = len(status.losses) < self._sent_losses or len(status.eval_losses) < self._sent_eval
        if restart:
            self._sent_losses = self._sent_eval = 0
        message = {key: getattr(status, key) for key in _STREAMED if key != "state" or final}
        message["notes"] = [str(n) for n in status.notes]
        message["losses"] = list(status.losses[self._sent_losses :])
        message["eval_losses"] = list(status.eval_losses[self._sent_eval :])
        message["restart_losses"] = restart
        if not final:
            message["state"] = status.state if status.state not in (RAN,) else RUNNING
        self._sent_losses, self._sent_eval = len(status.losses), len(status.eval_losses)
        with contextlib.suppress(OSError, ValueError):
            self.writer.send(message)


# -- bodies that launch processes themselves -------------------------------------------------------

_LAUNCHERS = ("torch.multiprocessing", "torch.distributed", "accelerate")
_HELPERS = ("multiprocessing", "concurrent.futures", "torch.utils.data", "multiprocess")  # pools, data loaders


def _guarded(run: Any) -> None:
    run.around_body.append(lambda: refuse_launches(run))


@contextlib.contextmanager
def refuse_launches(run: Any) -> Iterator[None]:
    """While a trainer's body runs: refuse to start training processes, which would train models the
    kernel never sees (``notebook_launcher``, ``torch.multiprocessing.spawn``); and if the body
    started processes of its own (``mp.Process(target=train)``) and trained nothing here, refuse to
    save the untrained model. Data-loader workers and pools are fine."""
    original = multiprocessing.process.BaseProcess.start
    started: list[str] = []
    name = run.spec.name

    def start(process: Any) -> None:
        target = getattr(process, "_target", None)
        module = getattr(target, "__module__", None) or ""
        if _launched_by(module, _LAUNCHERS) or _launcher_on_stack():
            raise DreamerError(
                f"the trainer {name!r} starts its own worker processes ({_launcher_name()}), which train copies of "
                f"the model that this kernel never sees: use `%%dreamer_train {name} --processes N` and train "
                "directly in the cell (call the training function instead of launching it)"
            )
        if not _launched_by(module, _HELPERS):
            started.append(getattr(target, "__qualname__", None) or repr(target))
        original(process)

    def refused(*args: Any, **kwargs: Any) -> None:
        raise DreamerError(
            f"the trainer {name!r} calls notebook_launcher, which trains copies of the model in processes this kernel "
            f"never sees: use `%%dreamer_train {name} --processes N` and call the training function directly in the cell"
        )

    launchers = [(m, "notebook_launcher") for m in (sys.modules.get("accelerate"), sys.modules.get("accelerate.launchers")) if m is not None]
    saved = [(m, attr, getattr(m, attr, None)) for m, attr in launchers]
    multiprocessing.process.BaseProcess.start = start
    for module, attr, _ in saved:
        setattr(module, attr, refused)
    try:
        yield
    finally:
        multiprocessing.process.BaseProcess.start = original
        for module, attr, value in saved:
            setattr(module, attr, value)
    if started and not run.trainers and not run.checkpointers:
        raise DreamerError(
            f"the trainer {name!r} started processes of its own ({', '.join(started[:3])}) and trained nothing in this "
            f"kernel, so there is no trained model to save: use `%%dreamer_train {name} --processes N` and train "
            "directly in the cell"
        )


def _launched_by(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _launcher_on_stack() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if _launched_by(frame.f_globals.get("__name__", ""), ("accelerate.launchers", "torch.multiprocessing.spawn", "torch.distributed.launcher", "torch.distributed.elastic")):
            return True
        frame = frame.f_back
    return False


def _launcher_name() -> str:
    frame = sys._getframe(2)
    names = []
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if _launched_by(module, ("accelerate", "torch.multiprocessing", "torch.distributed")):
            names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names[-1] if names else "a process launcher"
