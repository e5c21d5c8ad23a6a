"""``%%dreamer_step``, ``%%dreamer_train`` and ``%dreamer``: parse arguments, call the core, display.

Examples
--------
>>> %load_ext dreamer_magic                       # doctest: +SKIP
>>> %%dreamer_step clean-reviews                  # doctest: +SKIP
... reviews = raw[raw.stars > 2].reset_index(drop=True)
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, CaselessStrEnum, Unicode, observe

from . import steps
from .errors import DreamerError
from .folders import OutputFolder, get_output_folder, read_meta, set_output_folder, validate_name

_IPYTHON_NAMES = re.compile(r"^(_+|_i+\d*|_\d+|_oh|_ih|_dh|In|Out|get_ipython|exit|quit)$")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not a variable name: {', '.join(map(repr, bad))}; give a comma-separated list such as `--inputs raw,stopwords`")
    return names


def _processes(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise UsageError(f"--processes {text}: give a whole number of worker processes, such as `--processes 2`")
    return int(text)


@magics_class
class DreamerMagics(Magics):
    """The dreamer_magic magics. Configure with ``%config DreamerMagics.<option> = value``."""

    output_folder = Unicode(
        "", help="Where steps, trainers and generation caches are saved. Empty: ./output under the working directory."
    ).tag(config=True)
    allow_pickle = Bool(
        True, help="Load outputs that were saved with pickle. Set False to refuse pickles from folders you do not trust."
    ).tag(config=True)
    verify = CaselessStrEnum(
        ["digest", "size"],
        default_value="digest",
        help="What a hit checks of the files a step wrote before loading them: 'digest' (sizes and xxh3 content "
        "digests at memory speed; a file this kernel already hashed, with the same inode, size, mtime and ctime, "
        "is not hashed again) or 'size' (sizes only: faster on huge outputs, blind to a changed byte of the same "
        "size). A mismatch is a miss that sets the damaged folder aside.",
    ).tag(config=True)
    replay = Bool(True, help="Replay a step's recorded output (prints, plots, HTML) when it is loaded from disk.").tag(config=True)
    remote = Unicode(
        "",
        help="Mirror the output folder on this fsspec URL (s3://bucket/prefix, gs://, az://, file://): commits are "
        "pushed in the background and a local miss is looked up there. Empty: local only.",
    ).tag(config=True)
    widgets = Bool(True, help="Show ipywidgets status views in a kernel with a widget frontend (False: plain text).").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._cells: dict[str, tuple[str, Any, str]] = {}
        self._parsed: dict[tuple[str, str], Any] = {}  # (magic, line) -> parsed arguments
        self._transformed: dict[tuple, str] = {}  # (cell, transformers) -> transformed source
        self.frontend: Any = None  # the IPythonFrontend, set by load()
        if self.output_folder:
            set_output_folder(self.output_folder)
        if self.remote:
            self._remote_changed({"new": self.remote})

    @observe("widgets")
    def _widgets_changed(self, change: Any) -> None:
        if self.frontend is not None:
            self.frontend.live = None if change["new"] else False

    @observe("remote")
    def _remote_changed(self, change: Any) -> None:
        from .remote import set_remote

        try:
            set_remote(change["new"] or None)
        except DreamerError as e:
            raise UsageError(str(e)) from None

    @observe("output_folder")
    def _output_folder_changed(self, change: Any) -> None:
        try:
            set_output_folder(change["new"] or None)
        except DreamerError as e:
            raise UsageError(str(e)) from None

    # -- the cell magics ----------------------------------------------------------
    @magic_arguments()
    @argument("name", nargs="+", help="The step's name (letters, digits, space, _ - .); it names its folder.")
    @argument("--inputs", default=None, help="Comma-separated inputs to fingerprint, instead of the ones found automatically.")
    @argument("--outputs", default=None, help="Comma-separated names to save, instead of every name the cell binds.")
    @argument("--version", default=None, help="A version string that is part of the fingerprint: change it to re-run.")
    @argument("--force", action="store_true", help="Run even if a saved result matches (the old folder goes to _backups).")
    @argument("--no-replay", action="store_true", help="Do not replay the recorded output on a hit.")
    @argument(
        "--files",
        default=None,
        help="Comma-separated files or folders the cell reads that tracing cannot see (opened by native code); "
        "a change to them re-runs the step.",
    )
    @cell_magic
    def dreamer_step(self, line: str, cell: str) -> None:
        """Make a cell a named, cached step.

        Same fingerprint (the cell's code + the values it reads + --version + library
        versions): the body does not run, the outputs are loaded from disk and the recorded
        output is replayed. Changed: it runs, and the previous folder moves to _backups.

        For example:

            %%dreamer_step clean-reviews
            reviews = raw[raw.stars > 2].reset_index(drop=True)
            print(len(reviews), "reviews kept")
        """
        __tracebackhide__ = True  # noqa: F841 - an error in the body shows the user's frames only
        started = time.perf_counter()  # the status line's time is the whole cell's
        args = self._arguments(self.dreamer_step, line)
        self._run_cell("step", args, cell, f"%%dreamer_step {line}", started)

    @magic_arguments()
    @argument("name", nargs="+", help="The trainer's name; it names its folder.")
    @argument("--inputs", default=None, help="Comma-separated inputs to fingerprint, instead of the ones found automatically.")
    @argument("--outputs", default=None, help="Comma-separated names to save, instead of every name the cell binds.")
    @argument("--version", default=None, help="A version string that is part of the fingerprint: change it to retrain.")
    @argument("--force", action="store_true", help="Train even if a finished model matches (the old folder goes to _backups).")
    @argument("--no-resume", action="store_true", help="Start over instead of resuming from the last checkpoint (old checkpoints go to _backups).")
    @argument("--no-replay", action="store_true", help="Do not replay the recorded output on a hit.")
    @argument("--files", default=None, help="Comma-separated files or folders the cell reads that tracing cannot see.")
    @argument(
        "--processes",
        default=None,
        help="Train in N worker processes on torch.distributed (gloo on CPU, nccl on GPUs); rank 0 saves, "
        "then this kernel loads the trained model.",
    )
    @cell_magic
    def dreamer_train(self, line: str, cell: str) -> None:
        """Make a training cell a named trainer that checkpoints, resumes and reloads.

        A transformers ``Trainer`` built in the cell writes its checkpoints to
        ``<name>/_checkpoints`` and resumes from the latest complete one; when the cell ends the
        model is saved to ``<name>/_model``. Re-running a finished trainer loads the model
        instead of training. ``--processes N`` runs the body in N worker processes (one per
        GPU), then loads the trained model here.

        For example:

            %%dreamer_train sft-small
            trainer = Trainer(model=model, args=args, train_dataset=train_ds)
            trainer.train()
        """
        __tracebackhide__ = True  # noqa: F841
        started = time.perf_counter()  # the status line's time is the whole cell's
        args = self._arguments(self.dreamer_train, line)
        self._run_cell("trainer", args, cell, f"%%dreamer_train {line}", started)

    def _arguments(self, magic: Any, line: str) -> Any:
        """``parse_argstring(magic, line)``, remembered per line (argparse costs a tenth of a
        hit): a fresh copy each time, so nothing that changes it reaches the next run."""
        key = (magic.__name__, line)
        parsed = self._parsed.get(key)
        if parsed is None:
            parsed = parse_argstring(magic, line)
            if len(self._parsed) > 1000:
                self._parsed.clear()
            self._parsed[key] = parsed
        return argparse.Namespace(**{k: list(v) if isinstance(v, list) else v for k, v in vars(parsed).items()})

    def _transform(self, cell: str) -> str:
        """The cell's body as IPython runs it (``%magic`` and ``!shell`` lines turned into calls),
        remembered per text while IPython's input transformers stay the same. A body of one line
        is never remembered: IPython transforms those by the namespace too (autocall)."""
        manager, shell = self.shell.input_transformer_manager, self.shell
        transformers = manager.cleanup_transforms + manager.line_transforms + manager.token_transformers
        key = (cell, tuple(map(id, transformers + list(shell.input_transformers_post))))
        source = self._transformed.get(key)
        if source is None:
            source = shell.transform_cell(cell)
            if len(source.splitlines()) > 1:
                if len(self._transformed) > 200:
                    self._transformed.clear()
                self._transformed[key] = source
        return source

    def _run_cell(self, kind: str, args: Any, cell: str, magic_line: str, started: float | None = None) -> None:
        __tracebackhide__ = True  # noqa: F841
        name = " ".join(args.name)
        try:
            folder_name = validate_name(name)
        except DreamerError as e:
            raise UsageError(str(e)) from None
        if not cell.strip():
            raise UsageError(f"the {kind} {name!r} has an empty cell: put the code to cache below the magic line")
        source = self._transform(cell)
        self._cells[folder_name] = (source, args, kind)
        options = dict(
            frontend=self.frontend,
            raw=magic_line + "\n" + cell,
            inputs=_names(args.inputs),
            outputs=_names(args.outputs),
            version=args.version,
            force=args.force,
            replay=self.replay and not args.no_replay,
            allow_pickle=self.allow_pickle,
            verify=self.verify.lower(),
            exclude=self._hidden_names(),
            files=[f.strip() for f in (args.files or "").split(",") if f.strip()],
            started=started,
        )
        before = self.frontend.last_status
        try:
            if kind == "step":
                steps.run_cell_step(name, source, self.shell.user_ns, **options)
            else:
                from . import distributed

                processes = _processes(args.processes)
                distributed.run_cell_trainer(name, source, self.shell.user_ns, processes=processes, resume=not args.no_resume, **options)
        except DreamerError as e:
            raise UsageError(str(e)) from None
        except KeyboardInterrupt:
            raise UsageError(_interrupted_line(self.frontend.last_status, before)) from None

    @property
    def _last_status(self) -> Any:
        """The status of the last step or trainer cell (public: ``dreamer_magic.last_status()``)."""
        return self.frontend.last_status

    def _hidden_names(self) -> set[str]:
        hidden = {n for n in self.shell.user_ns_hidden if self.shell.user_ns.get(n) is self.shell.user_ns_hidden[n]}
        return hidden | {n for n in self.shell.user_ns if _IPYTHON_NAMES.match(n)}

    # -- %dreamer -----------------------------------------------------------------------
    @magic_arguments()
    @argument(
        "command",
        nargs="?",
        default=None,
        help="output [PATH]: show or set the output folder; remote [URL|off]: show or set its remote mirror; status: every step, trainer and generation "
        "cache; why NAME: what changed since NAME's saved fingerprint; gc [--keep N]: delete old backups.",
    )
    @argument("target", nargs="*", help="the PATH for `output`, the URL for `remote`, the NAME for `why`.")
    @argument("--keep", default="0", help="gc: how many backups of each step and trainer to keep, complete ones first, then the newest (default 0).")
    @line_magic
    def dreamer(self, line: str) -> Any:
        """Inspect and manage the output folder.

        For example:

            %dreamer output [PATH]     show or set the output folder
            %dreamer remote [URL|off]  mirror the output folder on s3://, gs://, az://, file:// (pushes, pulls)
            %dreamer status            every step and trainer, its state, size and backups; generation caches
            %dreamer why NAME          what changed since NAME's saved fingerprint
            %dreamer gc [--keep N]     delete all but the N best backups of each step (complete, then newest;
                                       default 0) and sweep what interrupted runs left
        """
        args = parse_argstring(self.dreamer, line)
        commands = {"output": self._output, "remote": self._remote, "status": self._status, "why": self._why, "gc": self._gc}
        if args.command is None:
            raise UsageError("say what to do: `%dreamer output [PATH]`, `%dreamer remote [URL]`, `%dreamer status`, `%dreamer why NAME` or `%dreamer gc [--keep N]`")
        if args.command not in commands:
            raise UsageError(f"unknown %dreamer command {args.command!r}; use one of: {', '.join(commands)}")
        try:
            return commands[args.command](args)
        except DreamerError as e:
            raise UsageError(str(e)) from None

    def _output(self, args: Any) -> None:
        if args.target:
            self.output_folder = " ".join(args.target).strip("'\"")
            OutputFolder(get_output_folder()).ensure()
        print(f"output folder: {get_output_folder()}")

    def _remote(self, args: Any) -> None:
        from . import remote

        if args.target:
            self.remote = " ".join(args.target).strip("'\"")
            if self.remote.lower() in ("off", "none"):
                self.remote = ""
        mirror = remote.get_remote()
        if mirror is None:
            print("remote: none (the output folder is local only); set one with `%dreamer remote s3://bucket/prefix`")
            return
        pending = mirror.pending()
        print(f"remote: {mirror.url}" + (f" ({len(pending)} pending upload{'s' if len(pending) != 1 else ''})" if pending else ""))
        for line in mirror.errors[-3:]:
            print(f"  push failed: {line}")

    def _status(self, args: Any) -> Any:
        from .render import render_overview

        out = OutputFolder(get_output_folder())
        caches: list[dict] = []
        if out.cache_dir.is_dir():
            from . import cache

            caches = cache.list_databases(out.cache_dir)
        rows, remote = out.overview(), None
        import sys

        mirror = sys.modules.get("dreamer_magic.remote")
        if mirror is not None and mirror.get_remote() is not None:
            rows, remote = mirror.status_rows(mirror.get_remote(), rows)
        return render_overview(rows, caches, folder=_shown_path(out.root), remote=remote)

    def _why(self, args: Any) -> Any:
        from .render import render_why

        name = " ".join(args.target).strip("'\"")
        if not name:
            raise UsageError("say which step: `%dreamer why NAME`")
        folder_name = validate_name(name)
        out = OutputFolder(get_output_folder())
        path = out.path(folder_name)
        meta_file = "trainer.json" if out.kind_of(path) == "trainer" else "step.json"
        meta, problem = read_meta(path, meta_file)
        remembered = self._cells.get(folder_name)
        if remembered is None:
            if meta is None:
                return render_why(name, [f"nothing saved: {problem}", "run the cell to create it"])
            return render_why(
                name,
                [
                    f"saved {meta.get('created', '?')}, fingerprint {meta['fingerprint'][:12]}",
                    f"inputs: {', '.join(meta.get('inputs') or []) or 'none'}",
                    "run the cell once in this kernel to compare it with the saved result",
                ],
            )
        source, args, kind = remembered
        if kind == "trainer":
            from . import trainers

            explain = trainers.explain
        else:
            explain = steps.explain
        lines = explain(
            name, source, self.shell.user_ns, meta, problem,
            inputs=_names(args.inputs), version=args.version, exclude=self._hidden_names(), kind=kind,
        )
        return render_why(name, lines)

    def _gc(self, args: Any) -> None:
        if args.target or not str(args.keep).isdigit():
            raise UsageError("usage: `%dreamer gc [--keep N]` with N a whole number of backups to keep per step")
        keep = int(args.keep)
        from .render import human_size

        report = OutputFolder(get_output_folder()).gc(keep)
        print("\n".join(report.lines(human_size)))
        import sys

        mirror = sys.modules.get("dreamer_magic.remote")
        if mirror is not None and mirror.get_remote() is not None:
            remote = mirror.get_remote()
            remote.flush(mirror.FLUSH_ON_EXIT)  # pending segments first, so that the compaction includes them
            try:
                merged, saved = mirror.compact_all(remote)
            except Exception as e:  # noqa: BLE001 - an unreachable remote: the local gc is done, say why not the rest
                print(f"remote: segments not compacted ({type(e).__name__}: {e}); run `%dreamer gc` again when it is reachable")
                return
            print(f"remote: compacted {merged} generation-cache segment{'s' if merged != 1 else ''}, freed {human_size(saved)}")


def _interrupted_line(status: Any, before: Any) -> str:
    """The one line a Ctrl-C in a step or trainer cell shows: what was kept (the status says)."""
    error = getattr(status, "error", None) if status is not before else None
    if isinstance(error, str) and error.startswith("interrupted"):
        return error
    return steps.INTERRUPTED_NOTHING_SAVED


def _shown_path(path: Any) -> str:
    """A folder as the user names it: relative to the working directory when it is inside it."""
    import os
    from pathlib import Path

    path = Path(path)
    try:
        return str(path.relative_to(Path(os.getcwd()).resolve())) or "."
    except ValueError:
        return str(path)


def load(shell: Any) -> None:
    """Register the magics and install the IPython frontend (see ``load_ipython_extension``)."""
    from .frontend import IPythonFrontend

    unload(shell)  # a second %load_ext (or %reload_ext) replaces, never stacks
    magics = DreamerMagics(shell)
    magics.frontend = IPythonFrontend(shell, live=None if magics.widgets else False)
    shell.register_magics(magics)
    shell._dreamer_magics = magics
    steps.use_frontend(magics.frontend)


def unload(shell: Any) -> None:
    """Remove every magic, configurable and frontend that :func:`load` added."""
    magics = getattr(shell, "_dreamer_magics", None)
    if magics is None:
        return
    for kind, names in (("cell", ("dreamer_step", "dreamer_train")), ("line", ("dreamer",))):
        for name in names:
            if shell.magics_manager.magics[kind].get(name) is not None:
                shell.magics_manager.magics[kind].pop(name, None)
    shell.magics_manager.registry.pop("DreamerMagics", None)
    shell.configurables[:] = [c for c in shell.configurables if not isinstance(c, DreamerMagics)]
    steps.use_frontend(None)
    del shell._dreamer_magics
