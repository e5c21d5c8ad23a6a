"""%%dreamer_step through a real IPython shell: hit, change, backup, restore, failures."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from IPython.core.error import UsageError

from conftest import fresh_kernel

CLEAN = 'reviews = raw[raw.stars > 2].reset_index(drop=True)\nprint(len(reviews), "reviews kept")\n'


def make_raw() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "text": ["great", "awful", "fine", "superb", "meh"],
            "stars": np.array([5, 1, 3, 5, 2], dtype=np.int64),
            "score": [0.9, 0.1, 0.5, 0.95, 0.3],
        },
        index=pd.Index([10, 11, 12, 13, 14], name="id"),
    )


def status_of(ip):
    return ip._dreamer_magics._last_status


def test_first_run_writes_folder_then_hit_after_restart(ip, tmp_path, capsys):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    first = capsys.readouterr().out
    assert "3 reviews kept" in first and "ran" in first and "first run" in first
    folder = tmp_path / "output" / "clean-reviews"
    assert (folder / "_dataset").is_dir() and (folder / "step.json").is_file()
    meta = json.loads((folder / "step.json").read_text())
    assert meta["name"] == "clean-reviews" and meta["inputs"] == ["raw"]
    assert set(meta["components"]) >= {"source", "inputs", "version", "libraries"}
    assert meta["outputs"]["reviews"]["type"] == "pandas.DataFrame"
    assert "created" in meta and "duration" in meta and "packages" in meta
    expected = ip.user_ns["reviews"].copy()

    fresh_kernel(ip)
    ip.user_ns["raw"] = make_raw()
    ip.user_ns["boom"] = 1
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    second = capsys.readouterr().out
    assert "3 reviews kept" in second, "the recorded output is replayed"
    assert "loaded from disk" in second and "saved" in second
    pd.testing.assert_frame_equal(ip.user_ns["reviews"], expected, check_index_type=True)
    assert list(ip.user_ns["reviews"].dtypes) == list(expected.dtypes)


def test_datasets_load_it_without_this_package(ip, tmp_path):
    import datasets

    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    ds = datasets.load_from_disk(str(tmp_path / "output" / "clean-reviews" / "_dataset"))
    assert ds.num_rows == 3 and "text" in ds.column_names


def test_changed_input_reruns_backs_up_and_revert_restores(ip, tmp_path, capsys):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    old_fp = json.loads((tmp_path / "output/clean-reviews/step.json").read_text())["fingerprint"]
    capsys.readouterr()

    changed = make_raw()
    changed.loc[11, "stars"] = 4
    ip.user_ns["raw"] = changed
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    out = capsys.readouterr().out
    assert "4 reviews kept" in out and "input `raw` changed" in out
    backup = tmp_path / "output" / "_backups" / "clean-reviews" / old_fp
    assert (backup / "step.json").is_file()

    ip.user_ns["raw"] = make_raw()
    ip.user_ns.pop("reviews")
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    out = capsys.readouterr().out
    assert "restored from backup" in out
    assert len(ip.user_ns["reviews"]) == 3
    assert json.loads((tmp_path / "output/clean-reviews/step.json").read_text())["fingerprint"] == old_fp


def test_code_change_names_the_lines_and_comments_do_not_count(ip, capsys):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "clean-reviews", "# keep the good ones\n\n" + CLEAN.replace("\n", "  # !\n") + "\n\n")
    assert "loaded from disk" in capsys.readouterr().out
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN.replace("> 2", "> 3"))
    # the editor numbers the %%dreamer_step line 1: the body's first line is line 2 (issue 10)
    out = capsys.readouterr().out
    assert "ran" in out and "code changed: line 2" in out and "raw.stars > 3" in out


def test_imports_and_defs_are_rebound_on_a_hit(ip, capsys):
    ip.user_ns["xs"] = [1, 2, 3]
    cell = "import math\ndef double(v):\n    return 2 * v\nclass Box:\n    pass\nys = [double(x) for x in xs]\n"
    ip.run_cell_magic("dreamer_step", "double", cell)
    fresh_kernel(ip)
    ip.user_ns["xs"] = [1, 2, 3]
    ip.run_cell_magic("dreamer_step", "double", cell)
    assert "loaded from disk" in capsys.readouterr().out
    assert ip.user_ns["ys"] == [2, 4, 6]
    assert ip.user_ns["double"](5) == 10 and ip.user_ns["math"].pi > 3 and isinstance(ip.user_ns["Box"], type)


def test_failure_writes_nothing_and_keeps_the_previous_result(ip, tmp_path):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    folder = tmp_path / "output" / "clean-reviews"
    before = (folder / "step.json").read_text()
    with pytest.raises(ZeroDivisionError):
        ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN + "1 / 0\n")
    assert (folder / "step.json").read_text() == before
    assert not any(p.name.startswith(".clean-reviews.tmp") for p in folder.parent.iterdir())
    assert not (tmp_path / "output" / "_backups").exists()
    assert status_of(ip).state == "failed"


def test_keyboard_interrupt_writes_nothing(ip, tmp_path):
    ip.user_ns["raw"] = make_raw()
    with pytest.raises(UsageError, match="^interrupted: nothing saved, the previous result is kept$"):
        ip.run_cell_magic("dreamer_step", "interrupted", "x = 1\nraise KeyboardInterrupt\n")
    assert not (tmp_path / "output" / "interrupted").exists()
    assert status_of(ip).state == "interrupted"


def test_force_and_version(ip, tmp_path, capsys):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "clean-reviews --force", CLEAN)
    out = capsys.readouterr().out
    assert "--force" in out and " ran" in out
    ip.run_cell_magic("dreamer_step", "clean-reviews --version 2", CLEAN)
    assert "--version changed" in capsys.readouterr().out
    ip.run_cell_magic("dreamer_step", "clean-reviews --version 2", CLEAN)
    assert "loaded from disk" in capsys.readouterr().out


def test_explicit_inputs_and_outputs(ip, tmp_path):
    ip.user_ns.update(a=1, b=2)
    ip.run_cell_magic("dreamer_step", "pick --inputs a --outputs total", "total = a + b\nscratch = 5\n")
    meta = json.loads((tmp_path / "output/pick/step.json").read_text())
    assert meta["inputs"] == ["a"] and list(meta["outputs"]) == ["total"]
    ip.user_ns["b"] = 100  # not an input: still a hit
    ip.run_cell_magic("dreamer_step", "pick --inputs a --outputs total", "total = a + b\nscratch = 5\n")
    assert status_of(ip).state == "loaded from disk"
    with pytest.raises(UsageError, match="not defined"):
        ip.run_cell_magic("dreamer_step", "pick --inputs nope", "total = 1\n")
    with pytest.raises(UsageError, match="did not define"):
        ip.run_cell_magic("dreamer_step", "pick2 --outputs missing", "total = 1\n")


def test_rich_output_and_last_expression_are_replayed(ip):
    from IPython.display import HTML, display

    recorded = []
    original = ip.display_pub.publish

    def spy(data, metadata=None, **kw):
        recorded.append(data)
        return original(data, metadata, **kw)

    ip.user_ns["HTML"], ip.user_ns["display"] = HTML, display
    cell = "x = 41 + 1\ndisplay(HTML('<b>bold</b>'))\n"
    ip.run_cell_magic("dreamer_step", "rich", cell)
    ip.display_pub.publish = spy
    try:
        ip.run_cell_magic("dreamer_step", "rich", cell)
    finally:
        del ip.display_pub.publish
    assert any("<b>bold</b>" in d.get("text/html", "") for d in recorded)


@pytest.mark.parametrize(
    "name", ["../x", "a/b", "_backups", ".cache", "x" * 101, "", " lead", "bad$name", "..", "a\\b"]
)
def test_bad_names_are_usage_errors(ip, tmp_path, name):
    with pytest.raises(UsageError, match="name"):
        ip.run_cell_magic("dreamer_step", repr(name) if name else '""', "x = 1\n")
    assert not (tmp_path / "x").exists() and not (tmp_path.parent / "x").exists()


def test_missing_name_unknown_flag_empty_cell(ip):
    with pytest.raises(UsageError):
        ip.run_cell_magic("dreamer_step", "", "x = 1\n")
    with pytest.raises(UsageError):
        ip.run_cell_magic("dreamer_step", "ok --frobnicate", "x = 1\n")
    with pytest.raises(UsageError, match="empty"):
        ip.run_cell_magic("dreamer_step", "ok", "\n  \n")


def test_unfingerprintable_input_is_named(ip):
    import threading

    ip.user_ns["lock"] = threading.Lock()
    with pytest.raises(UsageError, match=r"input 'lock' \(_thread.lock\).*--inputs"):
        ip.run_cell_magic("dreamer_step", "locked", "with lock:\n    y = 1\n")
    assert status_of(ip).state == "failed" and "lock" in status_of(ip).error


def test_unsaveable_output_is_skipped_with_a_note_and_the_rest_is_saved(ip, tmp_path):
    # issue 9: an output that cannot be saved no longer fails a step whose body already ran
    ip.run_cell_magic("dreamer_step", "gen", "gen = (i for i in range(3))\nn = 3\n")
    status = status_of(ip)
    assert status.state == "ran" and any("`gen` is not saved" in n and "generator" in n for n in status.notes)
    meta = json.loads((tmp_path / "output" / "gen" / "step.json").read_text())
    assert list(meta["outputs"]) == ["n"]


def test_corrupt_or_truncated_step_json_reruns(ip, tmp_path, capsys):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    meta = tmp_path / "output/clean-reviews/step.json"
    meta.write_text(meta.read_text()[:40])
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    out = capsys.readouterr().out
    assert " ran" in out and "corrupt" in out
    assert len(ip.user_ns["reviews"]) == 3
    # the damaged folder is kept aside, not deleted
    assert any(p.name.startswith("incomplete-") for p in (tmp_path / "output/_backups/clean-reviews").iterdir())


def test_deleted_dataset_reruns(ip, tmp_path, capsys):
    import shutil

    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    shutil.rmtree(tmp_path / "output/clean-reviews/_dataset")
    capsys.readouterr()
    ip.run_cell_magic("dreamer_step", "clean-reviews", CLEAN)
    out = capsys.readouterr().out
    assert " ran" in out and "deleted" in out
    assert (tmp_path / "output/clean-reviews/_dataset").is_dir()


def test_output_folder_that_is_a_file(ip, tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a folder")
    with pytest.raises(UsageError, match="is a file"):
        ip.run_line_magic("dreamer", f"output {target}")
    assert target.read_text() == "not a folder"


def test_mutated_input_is_saved_as_output(ip):
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "add-col", 'raw["len"] = raw.text.str.len()\n')
    fresh_kernel(ip)
    ip.user_ns["raw"] = make_raw()
    ip.run_cell_magic("dreamer_step", "add-col", 'raw["len"] = raw.text.str.len()\n')
    assert list(ip.user_ns["raw"]["len"]) == [5, 5, 4, 6, 3]


def test_reload_and_unload_extension(ip):
    ip.run_line_magic("reload_ext", "dreamer_magic")
    assert ip.find_cell_magic("dreamer_step") is not None
    ip.run_line_magic("unload_ext", "dreamer_magic")
    assert ip.find_cell_magic("dreamer_step") is None and ip.find_line_magic("dreamer") is None
    from dreamer_magic import steps

    assert type(steps.current_frontend()) is steps.Frontend, "the IPython frontend is uninstalled"
    ip.run_line_magic("load_ext", "dreamer_magic")
    assert ip.find_cell_magic("dreamer_train") is not None


def test_config_traits(ip, tmp_path):
    from dreamer_magic.folders import get_output_folder

    ip.run_line_magic("config", f"DreamerMagics.output_folder = '{tmp_path / 'elsewhere'}'")
    assert get_output_folder() == tmp_path / "elsewhere"
    ip.run_cell_magic("dreamer_step", "here", "x = 1\n")
    assert (tmp_path / "elsewhere" / "here" / "step.json").exists()


def test_allow_pickle_false_refuses_pickles(ip):
    ip.run_cell_magic("dreamer_step", "pickled", "import fractions\nf = fractions.Fraction(1, 3)\n")
    fresh_kernel(ip)
    ip.run_line_magic("config", "DreamerMagics.allow_pickle = False")
    with pytest.raises(UsageError, match="allow_pickle"):
        ip.run_cell_magic("dreamer_step", "pickled", "import fractions\nf = fractions.Fraction(1, 3)\n")


def test_a_damaged_result_never_replaces_its_good_backup(ip, tmp_path):
    ip.run_cell_magic("dreamer_step", "s", "y = {'a': 1}\n")
    ip.run_cell_magic("dreamer_step", "s --force", "y = {'a': 1}\n")  # a good copy goes to _backups
    folder = tmp_path / "output" / "s"
    meta = json.loads((folder / "step.json").read_text())
    (folder / meta["outputs"]["y"]["path"]).write_text("{corrupt")
    ip.user_ns.pop("y")
    ip.run_cell_magic("dreamer_step", "s", "y = {'a': 1}\n")
    assert status_of(ip).state == "restored from backup"
    assert ip.user_ns["y"] == {"a": 1}
    backups = tmp_path / "output" / "_backups" / "s"
    assert [p.name.startswith("incomplete-") for p in backups.iterdir()] == [True], "the damaged copy is kept aside"


def test_two_names_for_one_folder_share_why(ip):
    ip.user_ns["a"] = 1
    ip.run_cell_magic("dreamer_step", "Clean Reviews", "b = a\n")
    ip.user_ns["a"] = 2
    assert "input `a` changed" in ip.run_line_magic("dreamer", "why clean-reviews")._repr_mimebundle_()["text/plain"]


def test_reload_twice_then_unload_leaves_no_trace(shell, tmp_path):
    """Every magic, configurable, event handler and frontend that loading added goes away again."""
    from traitlets.config import Config

    from dreamer_magic import steps
    from dreamer_magic.folders import get_output_folder

    def snapshot():
        return (
            {k: set(v) for k, v in shell.magics_manager.magics.items()},
            set(shell.magics_manager.registry),
            [type(c).__name__ for c in shell.configurables],
            {name: list(cbs) for name, cbs in shell.events.callbacks.items()},
            hasattr(shell, "_dreamer_magics"),
            type(steps.current_frontend()),
        )

    shell.run_line_magic("load_ext", "storemagic")  # IPython's own extension magics register on first use
    before = snapshot()
    shell.run_line_magic("load_ext", "dreamer_magic")
    shell.run_line_magic("reload_ext", "dreamer_magic")
    shell.run_line_magic("reload_ext", "dreamer_magic")
    assert [type(c).__name__ for c in shell.configurables].count("DreamerMagics") == 1
    shell.run_line_magic("unload_ext", "dreamer_magic")
    assert snapshot() == before
    folder = get_output_folder()
    shell.run_line_magic("config", f"DreamerMagics.output_folder = '{tmp_path / 'after'}'")
    assert get_output_folder() == folder, "%config of an unloaded extension acts on nothing"
    shell.run_line_magic("load_ext", "dreamer_magic")
    assert shell.find_cell_magic("dreamer_step") is not None


def test_error_in_body_shows_the_users_frame_at_the_editors_line(ip, capsys):
    ip.user_ns["x"] = 1
    result = ip.run_cell("%%dreamer_step boom\ny = x + 1\nz = 1 / 0\n")
    assert isinstance(result.error_in_exec, ZeroDivisionError)
    out = capsys.readouterr()
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.out + out.err)
    assert "----> 3 z = 1 / 0" in text, text
    assert "dreamer_magic/steps.py" not in text and "dreamer_magic/frontend.py" not in text
    assert "dreamer_magic/magics.py" not in text
