"""``%%dreamer_step``, ``%%dreamer_train`` and ``%dreamer``: parse arguments, call the core, display.

Examples
--------
>>> %load_ext dreamer_magic                       # doctest: +SKIP
>>> %%dreamer_step clean-reviews                  # doctest: +SKIP
... reviews = raw[raw.stars > 2].reset_index(drop=True)
"""

from __future__ import annotations

import ast
import contextlib
import re
import sys
from typing import Any, Iterator

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Unicode, observe

from . import steps
from .errors import DreamerError
from .folders import OutputFolder, folder_size, get_output_folder, read_meta, set_output_folder, validate_name

_IPYTHON_NAMES = re.compile(r"^(_+|_i+\d*|_\d+|_oh|_ih|_dh|In|Out|get_ipython|exit|quit)$")


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise UsageError(f"not a variable name: {', '.join(map(repr, bad))}; give a comma-separated list such as `--inputs raw,stopwords`")
    return names


@magics_class
class DreamerMagics(Magics):
    """The dreamer_magic magics. Configure with ``%config DreamerMagics.<option> = value``."""

    output_folder = Unicode(
        "", help="Where steps, trainers and generation caches are saved. Empty: ./output under the working directory."
    ).tag(config=True)
    allow_pickle = Bool(
        True, help="Load outputs that were saved with pickle. Set False to refuse pickles from folders you do not trust."
    ).tag(config=True)
    replay = Bool(True, help="Replay a step's recorded output (prints, plots, HTML) when it is loaded from disk.").tag(config=True)
    widgets = Bool(True, help="Show ipywidgets status views in a kernel with a widget frontend (False: plain text).").tag(config=True)

    def __init__(self, shell: Any = None, **kwargs: Any) -> None:
        super().__init__(shell=shell, **kwargs)
        self._cells: dict[str, tuple[str, Any, str]] = {}
        self._last_status: Any = None
        if self.output_folder:
            set_output_folder(self.output_folder)

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
    @cell_magic
    def dreamer_step(self, line: str, cell: str) -> None:
        """Make a cell a named, cached step.

        Same fingerprint (the cell's code + the values it reads + --version + library
        versions): the body does not run, the outputs are loaded from disk and the recorded
        output is replayed. Changed: it runs, and the previous folder moves to _backups.

        Example::

            %%dreamer_step clean-reviews
            reviews = raw[raw.stars > 2].reset_index(drop=True)
            print(len(reviews), "reviews kept")
        """
        args = parse_argstring(self.dreamer_step, line)
        self._run_cell("step", args, cell)

    @magic_arguments()
    @argument("name", nargs="+", help="The trainer's name; it names its folder.")
    @argument("--inputs", default=None, help="Comma-separated inputs to fingerprint, instead of the ones found automatically.")
    @argument("--outputs", default=None, help="Comma-separated names to save, instead of every name the cell binds.")
    @argument("--version", default=None, help="A version string that is part of the fingerprint: change it to retrain.")
    @argument("--force", action="store_true", help="Train even if a finished model matches (the old folder goes to _backups).")
    @argument("--no-resume", action="store_true", help="Start over instead of resuming from the last checkpoint (old checkpoints go to _backups).")
    @argument("--no-replay", action="store_true", help="Do not replay the recorded output on a hit.")
    @cell_magic
    def dreamer_train(self, line: str, cell: str) -> None:
        """Make a training cell a named trainer that checkpoints, resumes and reloads.

        A transformers ``Trainer`` built in the cell writes its checkpoints to
        ``<name>/_checkpoints`` and resumes from the latest complete one; when the cell ends the
        model is saved to ``<name>/_model``. Re-running a finished trainer loads the model
        instead of training.

        Example::

            %%dreamer_train sft-small
            trainer = Trainer(model=model, args=args, train_dataset=train_ds)
            trainer.train()
        """
        args = parse_argstring(self.dreamer_train, line)
        self._run_cell("trainer", args, cell)

    def _run_cell(self, kind: str, args: Any, cell: str) -> None:
        name = " ".join(args.name)
        try:
            validate_name(name)
        except DreamerError as e:
            raise UsageError(str(e)) from None
        if not cell.strip():
            raise UsageError(f"the {kind} {name!r} has an empty cell: put the code to cache below the magic line")
        source = self.shell.transform_cell(cell)
        self._cells[validate_name(name)] = (source, args, kind)
        from .status import Status

        status = Status(kind=kind, name=name)
        self._last_status = status
        handle = self._display(status)
        options = dict(
            inputs=_names(args.inputs),
            outputs=_names(args.outputs),
            version=args.version,
            force=args.force,
            replay=self.replay and not args.no_replay,
            allow_pickle=self.allow_pickle,
            exclude=self._hidden_names(),
            rerun=self._rerun,
            status=status,
        )
        try:
            if kind == "step":
                steps.run_cell_step(name, source, self.shell.user_ns, lambda: self._execute(source, cell), **options)
            else:
                from . import trainers

                trainers.run_cell_trainer(
                    name, source, self.shell.user_ns, lambda: self._execute(source, cell), resume=not args.no_resume, **options
                )
        except DreamerError as e:
            status.error = status.error or str(e)
            raise UsageError(str(e)) from None
        finally:
            handle.finish()

    # -- running the body -----------------------------------------------------------
    def _execute(self, source: str, raw: str) -> None:
        """Run the cell's code in the user namespace; the last expression is displayed as usual."""
        shell = self.shell
        filename = shell.compile.cache(source, shell.execution_count, raw_code=raw)
        tree = ast.parse(source, filename)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        __tracebackhide__ = True  # noqa: F841 - IPython hides this frame in tracebacks
        if tree.body:
            exec(compile(tree, filename, "exec"), shell.user_ns)
        if last is not None:
            exec(compile(ast.Interactive([last]), filename, "single"), shell.user_ns)

    def _rerun(self, statement: str) -> None:
        exec(compile(statement, "<dreamer_magic: re-running an import/def/class>", "exec"), self.shell.user_ns)

    def _hidden_names(self) -> set[str]:
        hidden = {n for n in self.shell.user_ns_hidden if self.shell.user_ns.get(n) is self.shell.user_ns_hidden[n]}
        return hidden | {n for n in self.shell.user_ns if _IPYTHON_NAMES.match(n)}

    # -- display ---------------------------------------------------------------------
    def _display(self, status: Any) -> Any:
        from .widgets import display_status

        return display_status(status, live=None if self.widgets else False)

    @contextlib.contextmanager
    def _capture_displays(self, records: list) -> Iterator[None]:
        """Record rich outputs (HTML, images, plots, the last expression's value) while still showing them.

        Live widgets (progress bars, say) are not recorded: replayed later they would be a
        frozen snapshot of their first state. In a terminal the last expression's value is
        printed to stdout, which is recorded already.
        """

        def record(data: dict | None, metadata: dict | None) -> None:
            if data and not any("widget-view" in k or "widget-state" in k for k in data):
                records.append({"data": dict(data), "metadata": metadata or {}})

        pub = self.shell.display_pub
        hook = self.shell.displayhook
        original_publish = pub.publish
        original_write = hook.write_format_data

        def publish(data: dict, metadata: dict | None = None, *a: Any, **kw: Any) -> Any:
            if not kw.get("transient"):
                record(data, metadata)
            return original_publish(data, metadata, *a, **kw)

        def write_format_data(format_dict: dict, md_dict: dict | None = None) -> Any:
            record(format_dict, md_dict)
            return original_write(format_dict, md_dict)

        patches = [(pub, "publish", publish)]
        if type(hook).__name__.startswith("ZMQ"):
            patches.append((hook, "write_format_data", write_format_data))
        saved = [(obj, name, vars(obj).get(name)) for obj, name, _ in patches]
        for obj, name, wrapper in patches:
            setattr(obj, name, wrapper)
        try:
            yield
        finally:  # put back exactly what was there (an outer step's wrapper, or nothing)
            for obj, name, before in saved:
                if before is None:
                    vars(obj).pop(name, None)
                else:
                    setattr(obj, name, before)

    def _replay(self, records: list) -> None:
        from IPython.display import publish_display_data

        for rec in records:
            if "stream" in rec:
                stream = sys.stderr if rec["stream"] == "stderr" else sys.stdout
                stream.write(rec["text"])
                stream.flush()
            elif "data" in rec:
                publish_display_data(rec["data"], rec.get("metadata") or {})

    # -- %dreamer -----------------------------------------------------------------------
    @line_magic
    def dreamer(self, line: str) -> Any:
        """Inspect and manage the output folder.

        Usage::

            %dreamer output [PATH]     show or set the output folder
            %dreamer status            every step and trainer, its state, size and backups; generation caches
            %dreamer why NAME          what changed since NAME's stored fingerprint
            %dreamer gc [--keep N]     delete all but the N newest backups of each step (default 0)
        """
        words = line.split()
        if not words:
            raise UsageError("say what to do: `%dreamer output [PATH]`, `%dreamer status`, `%dreamer why NAME` or `%dreamer gc [--keep N]`")
        command, rest = words[0], line.strip()[len(words[0]):].strip()
        try:
            if command == "output":
                return self._output(rest)
            if command == "status":
                return self._status()
            if command == "why":
                return self._why(rest)
            if command == "gc":
                return self._gc(rest)
        except DreamerError as e:
            raise UsageError(str(e)) from None
        raise UsageError(f"unknown %dreamer command {command!r}; use one of: output, status, why, gc")

    def _output(self, rest: str) -> None:
        if rest:
            path = rest.strip().strip("'\"")
            self.output_folder = path
            OutputFolder(get_output_folder()).ensure()
        print(f"output folder: {get_output_folder()}")

    def _status(self) -> Any:
        from .render import render_overview

        out = OutputFolder(get_output_folder())
        rows = []
        for name_path, kind, folder in out.entries():
            meta_file = "trainer.json" if kind == "trainer" else "step.json"
            meta, problem = read_meta(folder, meta_file)
            rows.append(
                {
                    "name": name_path,
                    "kind": kind,
                    "state": "complete" if meta else f"incomplete ({problem})",
                    "size": folder_size(folder),
                    "backups": len(out.backups(name_path)),
                    "fingerprint": (meta or {}).get("fingerprint", ""),
                    "created": (meta or {}).get("created", ""),
                    "duration": (meta or {}).get("duration"),
                }
            )
        caches: list[dict] = []
        if out.cache_dir.is_dir():
            from . import cache

            caches = cache.list_databases(out.cache_dir)
        return render_overview(rows, caches)

    def _why(self, rest: str) -> Any:
        from .render import render_why

        name = rest.strip().strip("'\"")
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

    def _gc(self, rest: str) -> None:
        keep = 0
        words = rest.split()
        if words:
            if len(words) != 2 or words[0] != "--keep" or not words[1].isdigit():
                raise UsageError("usage: `%dreamer gc [--keep N]` with N a whole number of backups to keep per step")
            keep = int(words[1])
        from .render import human_size

        removed, freed = OutputFolder(get_output_folder()).gc(keep)
        print(f"removed {removed} backup{'s' if removed != 1 else ''}, freed {human_size(freed)}")


def load(shell: Any) -> None:
    """Register the magics and the hooks the core calls (see ``load_ipython_extension``)."""
    magics = DreamerMagics(shell)
    shell.register_magics(magics)
    shell._dreamer_magics = magics
    steps.DISPLAY_HOOK = lambda status: magics._display(status)
    steps.CAPTURE_HOOK = magics._capture_displays
    steps.REPLAY_HOOK = magics._replay


def unload(shell: Any) -> None:
    """Remove every magic and hook that :func:`load` added."""
    magics = getattr(shell, "_dreamer_magics", None)
    if magics is None:
        return
    for kind, names in (("cell", ("dreamer_step", "dreamer_train")), ("line", ("dreamer",))):
        for name in names:
            shell.magics_manager.magics[kind].pop(name, None)
    shell.magics_manager.registry.pop("DreamerMagics", None)
    steps.DISPLAY_HOOK = steps.CAPTURE_HOOK = steps.REPLAY_HOOK = None
    del shell._dreamer_magics
