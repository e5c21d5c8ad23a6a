"""Replay through real Jupyter kernels: what a cell showed comes back on a hit in its final state.

Each test executes a small notebook with nbclient twice against one output folder, a fresh
kernel each time (a restart): the first run computes, the second is a hit that replays. What a
notebook saves is what a reader sees, so the assertions read the executed notebooks' outputs:

- a display updated in place (``display(..., display_id=True)`` then ``handle.update(...)``)
  replays once, as its last update;
- ``clear_output()`` drops what the cell showed before it, on the run and on the replay;
- a ``tqdm.auto`` bar (an ipywidget in a kernel) replays as the text/HTML of its final state,
  never as a widget that has no model any more;
- the status card's output is its final state as static HTML and text (no widget), so a
  notebook executed headless and exported to HTML shows it (nbconvert's HTMLExporter).
"""

from __future__ import annotations

import os
import re

import nbformat
import pytest

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def notebook(*cells: str) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    return nb


def execute(nb: nbformat.NotebookNode, workdir) -> nbformat.NotebookNode:
    """Run ``nb`` in a fresh kernel in ``workdir``."""
    from nbclient import NotebookClient

    nb = nbformat.from_dict(nb)  # a copy: each run starts from the stored notebook
    NotebookClient(
        nb, kernel_name="python3", timeout=120, startup_timeout=120,
        resources={"metadata": {"path": str(workdir)}},
    ).execute()
    return nb


def outputs(cell) -> list[dict]:
    return [o for o in cell.outputs if o.output_type in ("display_data", "execute_result", "stream")]


def texts(cell, mime: str = "text/html") -> list[str]:
    """The ``mime`` data of each rich output that is not a status card."""
    out = []
    for o in cell.outputs:
        if o.output_type in ("display_data", "execute_result"):
            plain = o.data.get("text/plain", "")
            if not plain.startswith("[dreamer] ") and mime in o.data:
                out.append(o.data[mime])
    return out


def cards(cell) -> list[dict]:
    return [
        o for o in cell.outputs
        if o.output_type == "display_data" and o.data.get("text/plain", "").startswith("[dreamer] ")
    ]


def stdout(cell) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


SETUP = "%load_ext dreamer_magic\n%dreamer output {output}"


@pytest.fixture
def twice(tmp_path):
    """Run a notebook of ``cells`` twice (first run, then a hit after a restart); returns both."""

    def run(*cells: str):
        nb = notebook(SETUP.format(output=tmp_path / "output"), *cells)
        first = execute(nb, tmp_path)
        second = execute(nb, tmp_path)
        return first, second

    return run


@pytest.mark.timeout(300)
def test_display_updates_clear_output_and_tqdm_replay_in_their_final_state(twice):
    first, second = twice(
        "%%dreamer_step shows\n"
        "from IPython.display import HTML, clear_output, display\n"
        "from tqdm.auto import tqdm\n"
        "print('gone after the clear')\n"
        "display(HTML('<i>gone too</i>'))\n"
        "clear_output()\n"
        "print('kept')\n"
        "table = display(HTML('<b>epoch 0</b>'), display_id=True)\n"
        "for epoch in range(1, 4):\n"
        "    table.update(HTML(f'<b>epoch {epoch}</b>'))\n"
        "total = 0\n"
        "for i in tqdm(range(7), desc='tokenize'):\n"
        "    total += i\n"
    )
    run, hit = first.cells[1], second.cells[1]
    assert cards(run)[0].data["text/plain"].startswith("[dreamer] step shows: ran")
    assert cards(hit)[0].data["text/plain"].startswith("[dreamer] step shows: loaded from disk")
    # on the run: the clear removed what came before it, the card came back
    assert "gone" not in stdout(run) and len(cards(run)) == 1
    # the hit shows what the run's cell finally showed: one table, at its last update
    assert stdout(hit) == "kept\n"
    assert [h for h in texts(hit) if "epoch" in h] == ["<b>epoch 3</b>"]
    assert not any("gone" in h for h in texts(hit))
    # the tqdm bar: its final state as text and HTML, no widget
    bar_text = [t for t in texts(hit, "text/plain") if "tokenize" in t]
    assert len(bar_text) == 1 and "7/7" in bar_text[0] and "100%" in bar_text[0], texts(hit, "text/plain")
    assert any('<progress value="7" max="7"' in h for h in texts(hit))
    assert not any(WIDGET_MIME in o.data for o in hit.outputs if o.output_type == "display_data"), (
        "a replayed bar must not be a widget: its model is gone after the restart"
    )
    for card in cards(run) + cards(hit):
        assert WIDGET_MIME not in card.data, "a finished card is static HTML and text"


@pytest.mark.timeout(300)
def test_a_text_progress_bar_replays_as_its_last_line(twice):
    """Where tqdm writes text (``tqdm.tqdm`` to stderr, ``\\r`` between updates), the hit
    replays the line as it finally read, not every intermediate state."""
    first, second = twice(
        "%%dreamer_step text bar\n"
        "from tqdm import tqdm\n"
        "for i in tqdm(range(5), desc='count', mininterval=0):\n"
        "    pass\n"
    )
    err = "".join(o.text for o in second.cells[1].outputs if o.output_type == "stream" and o.name == "stderr")
    assert "\r" not in err and err.count("count") == 1 and "5/5" in err, repr(err)


@pytest.mark.timeout(300)
def test_exported_html_shows_the_final_card(tmp_path):
    """Executed headless (nbclient, as ``jupyter nbconvert --execute`` and papermill do) and
    exported with nbconvert's HTMLExporter, the notebook shows each card's final state."""
    from nbconvert import HTMLExporter

    nb = notebook(
        SETUP.format(output=tmp_path / "output"),
        "%%dreamer_step exported card\nrows = [1, 2, 3]\nprint(len(rows), 'rows')",
    )
    done = execute(nb, tmp_path)
    card = cards(done.cells[1])
    assert len(card) == 1 and WIDGET_MIME not in card[0].data
    assert card[0].data["text/plain"].startswith("[dreamer] step exported card: ran in ")
    html, _ = HTMLExporter().from_notebook_node(done)
    assert 'class="dreamer-status"' in html and 'data-state="ran"' in html
    assert re.search(r"exported card</b>", html)
    # the widget left no view behind that an offline page could not draw
    assert '<script type="application/vnd.jupyter.widget-view+json">' not in html
    (tmp_path / "exported.html").write_text(html, encoding="utf-8")


@pytest.mark.timeout(300)
def test_text_printed_before_a_hit_comes_before_its_card_and_a_quiet_hit_shows_one_card(twice):
    """A hit's card is displayed without ipykernel's stream flush only when nothing waits in
    the streams: text the cell printed first still arrives first, the replay after the card."""
    first, second = twice(
        "print('printed first')\nget_ipython().run_cell_magic('dreamer_step', 'after', 'print(\"from the body\")\\nz = 3')",
        "%%dreamer_step quiet\ny = 2",
    )
    for nb in (first, second):
        kinds = [(o.output_type, o.get("text", "").strip()) for o in outputs(nb.cells[1])]
        assert kinds == [("stream", "printed first"), ("display_data", ""), ("stream", "from the body")], kinds
        assert len(cards(nb.cells[2])) == 1 and not stdout(nb.cells[2])
    assert cards(second.cells[1])[0].data["text/plain"].startswith("[dreamer] step after: loaded from disk")
    assert cards(second.cells[2])[0].data["text/plain"].startswith("[dreamer] step quiet: loaded from disk")
