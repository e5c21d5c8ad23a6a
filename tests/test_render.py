"""Pure rendering (render.py) and typed "why" reasons (status.Reason); the ipywidgets import cost."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dreamer_magic import render
from dreamer_magic.render import (
    TextStatus,
    reason_html,
    reason_text,
    render_overview,
    render_why,
    status_html,
    status_text,
)
from dreamer_magic.status import (
    INCOMPLETE,
    RAN,
    REASON_KINDS,
    CheckpointInfo,
    Reason,
    Status,
)
from dreamer_magic.steps import explain, why

ROOT = Path(__file__).resolve().parents[1]


def parse(fragment: str) -> ET.Element:
    """Parse generated HTML as XML: proves tags balance and attributes are quoted."""
    return ET.fromstring(f"<root>{fragment}</root>")


def codes(fragment: str) -> list[tuple[str | None, str | None]]:
    """(class, text) of every <code> in an HTML fragment, in order."""
    return [(e.get("class"), e.text) for e in parse(fragment).iter("code")]


# -- Reason: a str with fields ---------------------------------------------------------------


def test_reason_is_the_string_the_user_reads():
    r = Reason.input_changed("raw")
    assert r == "input `raw` changed" and isinstance(r, str)
    assert "`raw`" in r and r.startswith("input")  # every string use keeps working
    assert (r.kind, r.subject, r.old, r.new, r.lines) == ("input", "raw", None, None, [])
    assert json.dumps([r]) == '["input `raw` changed"]'
    assert {r: 1}["input `raw` changed"] == 1


@pytest.mark.parametrize(
    "reason, text, kind, subject",
    [
        (Reason.first_run(), "first run: no saved result", "first-run", None),
        (Reason.first_run("no saved result"), "first run: no saved result", "first-run", None),
        (Reason.first_run("step.json is not valid JSON"), "first run: step.json is not valid JSON",
         "first-run", None),
        (Reason.input_added("raw"), "new input `raw`", "input", "raw"),
        (Reason.input_gone("raw"), "input `raw` no longer read", "input-gone", "raw"),
        (Reason.input_undefined("raw"),
         "input `raw` is not defined in this kernel: run the cells that define it first",
         "input-gone", "raw"),
        (Reason.version_changed(None, "2"), "--version changed: `None` → `'2'`", "version", None),
        (Reason.library_changed("torch", "2.1.0", "2.2.0"), "library `torch`: `2.1.0` → `2.2.0`",
         "library", "torch"),
        (Reason.library_changed("numpy", None, "2.0"), "library `numpy` `2.0` now used", "library",
         "numpy"),
        (Reason.library_changed("numpy", "2.0", None), "library `numpy` `2.0` no longer used",
         "library", "numpy"),
        (Reason.format_changed(), "the fingerprint format changed (dreamer_magic upgrade)",
         "format", None),
        (Reason.arguments_changed(), "arguments changed", "arguments", None),
        (Reason.kind_changed("step", "trainer"), "was a `step`, now a `trainer`", "kind", None),
        (Reason.force(), "--force", "force", None),
        (Reason.unchanged("0123456789abcdef"),
         "nothing changed: the result on disk (fingerprint `0123456789ab`) will be loaded",
         "unchanged", "0123456789ab"),
        (Reason.file_changed("data/raw.csv"), "file `data/raw.csv` changed", "file", "data/raw.csv"),
        (Reason.note("replayed 2 outputs"), "replayed 2 outputs", "note", None),
    ],
)
def test_reason_constructors(reason, text, kind, subject):
    assert str(reason) == text
    assert (reason.kind, reason.subject) == (kind, subject)
    assert reason.kind in REASON_KINDS


def test_code_reason_keeps_todays_words_and_its_lines():
    lines = [
        Reason.code_line("line 1", "a = 1", "a = 2"),
        Reason.code_line("line 3", new="c = 3"),
        Reason.code_line("line 4", old="d = 4"),
    ]
    r = Reason.code_changed(lines)
    assert r == "code changed: line 1: `a = 1` → `a = 2`; line 3 added: `c = 3`; line 4: removed `d = 4`"
    assert r.kind == "code" and r.lines == lines
    assert (r.lines[0].old, r.lines[0].new) == ("a = 1", "a = 2")
    assert Reason.code_changed() == "code changed"


def test_reason_survives_pickle_and_rejects_unknown_kinds():
    r = Reason.code_changed([Reason.code_line("line 2", "x", "y")])
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.kind == "code" and back.lines[0].old == "x"
    with pytest.raises(ValueError, match="unknown reason kind 'nope'.*first-run"):
        Reason("x", "nope")


def test_plain_strings_are_notes():
    r = Reason.of("the unfinished training was kept")
    assert r.kind == "note" and r == "the unfinished training was kept"
    typed = Reason.input_changed("a")
    assert Reason.of(typed) is typed


# -- rendering reasons: text and HTML from the fields ----------------------------------------


def test_reason_html_puts_names_and_old_new_in_code():
    r = Reason.input_changed("n", old="3", new="4")
    assert reason_text(r) == "input `n` changed: `3` → `4`"
    out = reason_html(r)
    assert "`" not in out
    assert codes(out) == [
        ("dreamer-reason-subject", "n"), ("dreamer-reason-old", "3"), ("dreamer-reason-new", "4")
    ]
    assert "".join(parse(out).itertext()) == "input n changed: 3 → 4"


def test_reason_html_renders_code_lines():
    r = Reason.code_changed([Reason.code_line("line 2", "b = 2", "b = 3"),
                             Reason.code_line("line 4", new="print(b)")])
    out = reason_html(r)
    assert codes(out) == [
        ("dreamer-reason-old", "b = 2"), ("dreamer-reason-new", "b = 3"),
        ("dreamer-reason-new", "print(b)"),
    ]
    assert "".join(parse(out).itertext()) == "code changed: line 2: b = 2 → b = 3; line 4 added: print(b)"


def test_reason_html_escapes_every_field():
    evil = "<script>alert('x')</script>"
    r = Reason.input_changed(evil, old=evil, new="</code>")
    out = reason_html(r)
    assert "<script>" not in out and parse(out) is not None
    assert [t for _, t in codes(out)] == [evil, evil, "</code>"]


def test_notes_render_markdown_code_and_keep_a_lone_backtick():
    assert codes(reason_html("input `raw` changed")) == [("dreamer-reason-code", "raw")]
    out = reason_html("a ` b")
    assert codes(out) == [] and "".join(parse(out).itertext()) == "a ` b"
    assert reason_text("a ` b") == "a ` b"


def test_card_marks_each_reason_with_its_kind():
    s = Status(kind="step", name="clean", state=RAN, duration=1.0,
               reasons=[Reason.input_changed("raw"), Reason.library_changed("torch", "1", "2"),
                        "kept the unfinished training"])
    root = parse(status_html(s))
    spans = [e for e in root.iter("span") if e.get("class") == "dreamer-reason"]
    assert [(e.get("data-kind"), e.get("data-subject")) for e in spans] == [
        ("input", "raw"), ("library", "torch"), ("note", None)
    ]
    assert "why: input `raw` changed; library `torch`: `1` → `2`; kept the unfinished training" in (
        status_text(s)
    )


def test_render_why_with_typed_reasons():
    reasons = [Reason.input_changed("raw"), Reason.code_changed([Reason.code_line("line 1", "a", "b")])]
    r = render_why("clean", reasons)
    assert r.text == "why clean:\n  - input `raw` changed\n  - code changed: line 1: `a` → `b`"
    items = list(parse(r.html).iter("li"))
    assert [li.get("data-kind") for li in items] == ["input", "code"]
    assert items[0].get("data-subject") == "raw"
    assert [c.text for c in items[1].iter("code")] == ["a", "b"]


# -- why() and explain() give typed reasons --------------------------------------------------


def test_why_returns_typed_reasons():
    meta = {
        "source": "a = 1\nb = 2",
        "components": {"format": 1, "kind": "step", "source": "s1", "version": None,
                       "inputs": {"raw": "f1", "gone": "f2"}, "libraries": {"pandas": "2.0"}},
    }
    now = {"format": 1, "kind": "step", "source": "s2", "version": "v2",
           "inputs": {"raw": "f9", "fresh": "f3"}, "libraries": {"pandas": "2.1"}}
    reasons = why(meta, now, "a = 1\nb = 3")
    assert [(r.kind, r.subject) for r in reasons] == [
        ("code", None), ("input", "raw"), ("input", "fresh"), ("input-gone", "gone"),
        ("version", None), ("library", "pandas"),
    ]
    assert reasons[0] == "code changed: line 2: `b = 2` → `b = 3`"
    assert (reasons[0].lines[0].old, reasons[0].lines[0].new) == ("b = 2", "b = 3")
    assert (reasons[-1].old, reasons[-1].new) == ("2.0", "2.1")
    assert why(None, now, "")[0].kind == "first-run"


def test_explain_names_an_input_this_kernel_does_not_define(ip):
    ip.user_ns["raw"] = [1, 2, 3]
    cell = "total = sum(raw)\n"
    ip.run_cell_magic("dreamer_step", "add-up", cell)
    del ip.user_ns["raw"]
    r = ip.run_line_magic("dreamer", "why add-up")
    items = list(parse(r.html).iter("li"))
    assert any(li.get("data-kind") == "input-gone" and li.get("data-subject") == "raw" for li in items)
    assert "input `raw` is not defined in this kernel" in r.text
    ip.user_ns["raw"] = [1, 2, 4]
    r = ip.run_line_magic("dreamer", "why add-up")
    assert [li.get("data-kind") for li in parse(r.html).iter("li")] == ["input"]
    ip.user_ns["raw"] = [1, 2, 3]
    unchanged = ip.run_line_magic("dreamer", "why add-up")
    assert [li.get("data-kind") for li in parse(unchanged.html).iter("li")] == ["unchanged"]
    assert unchanged.text.splitlines()[1].startswith("  - nothing changed")


def test_explain_is_typed_without_a_shell(output):
    from dreamer_magic.folders import read_meta
    from dreamer_magic.steps import run_cell_step

    ns = {"raw": [1, 2]}
    source = "total = sum(raw)\n"
    run_cell_step("plain", source, ns)  # the plain-Python frontend runs the body
    meta, problem = read_meta(output / "plain", "step.json")
    changed = "total = sum(raw) * 2\n"
    reasons = explain("plain", changed, ns, meta, problem)
    assert [r.kind for r in reasons] == ["code"]
    assert reasons[0].lines[0].new == "total = sum(raw) * 2"


# -- words --------------------------------------------------------------------------------------


def test_training_progress_says_training_and_checkpoints_need_no_step_number():
    now = time.time()
    s = Status(kind="trainer", name="t", state=RAN, duration=5.0, step=40, max_steps=100,
               checkpoints=[CheckpointInfo("checkpoint-20", 20, now, 1000),
                            CheckpointInfo("checkpoint-40", 40, now, 10, complete=False)])
    text = status_text(s)
    assert "progress: training step 40/100 (40%)" in text
    assert "checkpoints: checkpoint-20 (1.0 KB, " in text and "checkpoint-40 (incomplete)" in text
    root = parse(status_html(s))
    assert "training step 40/100 (40%)" in "".join(root.itertext())
    table = root.find(".//table[@class='dreamer-checkpoints']")
    assert [th.text for th in table.iter("th")] == ["checkpoint", "written", "size"]
    cp = root.find(".//span[@class='dreamer-checkpoint']")
    assert (cp.get("data-name"), cp.get("data-step")) == ("checkpoint-20", "20")


def test_overview_incomplete_with_a_reason_keeps_its_state_word():
    r = render_overview([{"name": "a", "kind": "step", "state": f"{INCOMPLETE} (no step.json)"}], [])
    span = next(e for e in parse(r.html).iter("span") if e.get("class") == "dreamer-state")
    assert span.get("data-state") == "incomplete" and span.text == "incomplete (no step.json)"
    assert render.ORANGE in span.get("style")
    assert "incomplete (no step.json)" in r.text


def test_text_status_prints_to_the_file_it_is_given(tmp_path):
    path = tmp_path / "status.txt"
    with path.open("w") as f, TextStatus(Status(kind="step", name="s"), file=f) as handle:
        handle.status.state, handle.status.duration = RAN, 0.5
    assert path.read_text() == "[dreamer] step s: ran in 500 ms\n"


# -- import cost: the terminal path never imports ipywidgets ---------------------------------


def run_python(code: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
        env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_render_imports_neither_ipython_nor_ipywidgets(tmp_path):
    out = run_python(
        """
        import sys
        import dreamer_magic.render, dreamer_magic.status
        print(sorted(m for m in ("IPython", "ipywidgets") if m in sys.modules))
        """,
        tmp_path,
    )
    assert out.strip() == "[]"


def test_a_step_hit_in_a_terminal_shell_never_imports_ipywidgets(tmp_path):
    out = run_python(
        f"""
        import sys
        from IPython.core.interactiveshell import InteractiveShell
        from traitlets.config import Config

        config = Config()
        config.HistoryManager.enabled = False
        ip = InteractiveShell.instance(config=config)
        ip.run_line_magic("load_ext", "dreamer_magic")
        ip.run_line_magic("dreamer", "output {tmp_path / 'output'}")
        ip.user_ns["x"] = 41
        for _ in range(2):
            ip.run_cell_magic("dreamer_step", "answer", "y = x + 1\\n")
        from dreamer_magic import widgets
        from dreamer_magic.status import Status
        assert not widgets.widgets_supported()
        widgets.display_status(Status(kind="step", name="quiet"), live=False).finish()
        print("y =", ip.user_ns["y"])
        print("ipywidgets imported:", "ipywidgets" in sys.modules)
        """,
        tmp_path,
    )
    lines = out.splitlines()
    assert any(line.startswith("[dreamer] step answer: ran") for line in lines), out
    assert any(line.startswith("[dreamer] step answer: loaded from disk") for line in lines), out
    assert "y = 42" in lines
    assert lines[-1] == "ipywidgets imported: False"


def test_a_widget_view_imports_ipywidgets_on_first_use(tmp_path):
    out = run_python(
        """
        import sys
        from dreamer_magic import widgets
        from dreamer_magic.status import Status
        before = "ipywidgets" in sys.modules
        view = widgets.StatusView(Status(kind="step", name="s"), interval=0)
        print(before, "ipywidgets" in sys.modules, type(view).__qualname__, view.header.value != "")
        """,
        tmp_path,
    )
    assert out.split() == ["False", "True", "StatusView", "True"]


# -- facts a person can act on: editor line numbers, old → new, a changed function's diff ---------


def test_line_changes_use_the_editors_line_numbers():
    from dreamer_magic.cell import line_changes

    old = "a = 1\nb = 2\n"
    new = "# load\na = 1\n\nb = 3\n"
    assert line_changes(old, new) == [("line 4", "b = 2", "b = 3")]
    assert line_changes(old, new, first_line=2) == [("line 5", "b = 2", "b = 3")]  # under %%dreamer_step
    assert line_changes("a = 1", "a = 1\n# c\nc = 2\nd = 3", first_line=2) == [("lines 4-5", None, "c = 2 / d = 3")]


def test_value_preview_is_short_and_says_sizes():
    import numpy as np

    from dreamer_magic.status import value_preview

    assert value_preview(128) == "128" and value_preview(0.5) == "0.5" and value_preview(None) == "None"
    assert value_preview("gpt2") == "'gpt2'" and value_preview("x" * 500) == "500 characters"
    assert value_preview(list(range(10))) == "10 items" and value_preview([1, 2]) == "[1, 2]"
    assert value_preview({"lr": 0.1}) == "{'lr': 0.1}" and value_preview({1, 2, 3}) == "3 items"
    assert value_preview(np.zeros((3, 4))) == "shape (3, 4)"
    assert value_preview(object()) is None and value_preview(10**60) is None


def test_why_lines_in_a_real_shell_say_old_and_new_and_the_editors_line(ip):
    ip.run_cell("block_size = 128\nrows = list(range(10))\ndef clean(t):\n    return t.strip()\n")
    cell = "# settings above\nn = block_size * 2\ntexts = [clean(' a ')] * len(rows)\n"
    ip.run_cell_magic("dreamer_step", "prepare", cell)
    ip.run_cell("block_size = 64\nrows = list(range(8))\ndef clean(t):\n    return t.strip().lower()\n")
    ip.run_cell_magic("dreamer_step", "prepare", cell.replace("* 2", "* 3"))
    status = ip._dreamer_magics.frontend.last_status
    reasons = {(r.kind, r.subject): r for r in status.reasons}
    code = reasons[("code", None)]
    # the %%dreamer_step line is line 1, the comment line 2: the changed line is line 3
    assert str(code) == "code changed: line 3: `n = block_size * 2` → `n = block_size * 3`"
    assert (reasons[("input", "block_size")].old, reasons[("input", "block_size")].new) == ("128", "64")
    assert str(reasons[("input", "rows")]) == "input `rows` changed: `10 items` → `8 items`"
    fn = reasons[("input", "clean")]
    assert str(fn) == "function `clean` changed: line 4: `return t.strip()` → `return t.strip().lower()`"
    html = render.reason_html(fn)
    assert '<code class="dreamer-reason-new"' in html and "lower()" in html


def test_terminal_status_line_comes_before_the_replayed_output(ip, capsys):
    cell = "print('counted', 3)\nn = 3\n"
    ip.run_cell_magic("dreamer_step", "count", cell)
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "count", cell)
    out = capsys.readouterr().out
    assert out.index("[dreamer] step count: loaded from disk") < out.index("counted 3"), out
    assert out.count("counted 3") == 1


def test_terminal_rich_displays_replay_once(ip, capsys):
    cell = "from IPython.display import HTML, display\ndisplay(HTML('<b>x</b>'))\nh = 1\n"
    ip.run_cell_magic("dreamer_step", "show", cell)
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "show", cell)
    assert capsys.readouterr().out.count("<IPython.core.display.HTML object>") == 1


def test_an_error_in_a_body_is_named_once(ip, capsys):
    ip.run_cell("%%dreamer_step boom\nx = 1 / 0\n")
    captured = capsys.readouterr()
    status = ip._dreamer_magics.frontend.last_status
    assert status.error == "ZeroDivisionError: division by zero"  # tools still read all of it
    assert "error: ZeroDivisionError (shown below)" in captured.out
    assert captured.out.count("division by zero") + captured.err.count("division by zero") == 1


def test_dreamer_status_names_the_folder_and_the_sessions_counts(ip, tmp_path):
    ip.run_cell_magic("dreamer_step", "one", "a = 1\n")
    r = ip.run_line_magic("dreamer", "status")
    assert r.text.splitlines()[0] == "dreamer output folder output"  # the cwd is tmp_path
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"  # outside the working directory
    ip.run_line_magic("dreamer", f"output {elsewhere}")
    assert ip.run_line_magic("dreamer", "status").text.splitlines()[0] == f"dreamer output folder {elsewhere}"


def test_outputs_of_a_cell_fold_loop_variables_and_underscore_names(ip):
    ip.run_cell_magic("dreamer_step", "loop", "total = 0\nfor i in range(3):\n    total += i\n_scratch = 'x'\n")
    outputs = {o.name: o for o in ip._dreamer_magics.frontend.last_status.outputs}
    assert outputs["i"].temporary and outputs["_scratch"].temporary and not outputs["total"].temporary
