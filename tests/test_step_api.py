"""The Python API (`dreamer_magic.step`), nesting, and the %dreamer line magic."""

from __future__ import annotations

import json

import pytest
from IPython.core.error import UsageError

from conftest import fresh_kernel


def test_step_decorator_keys_on_code_globals_and_arguments(output, capsys):
    from dreamer_magic import step

    factor = {"value": 2}

    def calls():  # counted from what the body prints (anything the body reads is fingerprinted)
        return capsys.readouterr().out.count("computing")

    @step("scale")
    def scale(xs, offset=0):
        print("computing")
        return [x * factor["value"] + offset for x in xs]

    assert scale([1, 2]) == [2, 4]
    assert calls() == 1
    assert scale([1, 2]) == [2, 4]
    assert calls() == 1, "second call is a hit (and replays the output)"
    assert scale([1, 2], offset=1) == [3, 5]
    assert calls() == 1, "different arguments: runs"
    factor["value"] = 3
    assert scale([1, 2]) == [3, 6]
    assert calls() == 1, "a value it uses changed: runs"
    meta = json.loads((output / "scale" / "step.json").read_text())
    assert meta["outputs"]["result"]["storage"] == "json"


def test_nested_steps_write_under_the_parent(ip, tmp_path, capsys):
    ip.run_cell(
        "from dreamer_magic import step\n"
        "@step('tokenize')\n"
        "def tokenize(texts):\n"
        "    print('tokenizing', len(texts))\n"
        "    return [t.split() for t in texts]\n"
    )
    ip.user_ns["texts"] = ["a b", "c d e"]
    cell = "tokens = tokenize(texts)\nn = sum(map(len, tokens))\n"
    ip.run_cell_magic("dreamer_step", "prepare", cell)
    assert (tmp_path / "output" / "prepare" / "tokenize" / "step.json").is_file()
    assert ip.user_ns["n"] == 5
    assert capsys.readouterr().out.count("tokenizing 2") == 1
    child = json.loads((tmp_path / "output/prepare/tokenize/step.json").read_text())
    assert child["parent"] == "prepare"
    # the parent is re-run with a change that does not affect the child: the child is a hit
    ip.run_cell_magic("dreamer_step", "prepare", cell + "m = n * 2\n")
    out = capsys.readouterr().out
    assert "tokenizing 2" in out and "tokenize: loaded from disk" in out, "nested step loaded from the parent's previous folder"
    assert (tmp_path / "output" / "prepare" / "tokenize" / "step.json").is_file()
    assert ip.user_ns["m"] == 10


def test_dreamer_status_why_gc(ip, tmp_path):
    ip.user_ns["a"] = 1
    ip.run_cell_magic("dreamer_step", "one", "b = a + 1\n")
    ip.user_ns["a"] = 2
    ip.run_cell_magic("dreamer_step", "one", "b = a + 1\n")
    ip.user_ns["a"] = 3
    ip.run_cell_magic("dreamer_step", "one", "b = a + 1\n")
    ip.run_cell_magic("dreamer_step", "two", "c = 5\n")

    status = ip.run_line_magic("dreamer", "status")
    text = status._repr_mimebundle_()["text/plain"]
    assert "one" in text and "two" in text and "complete" in text

    ip.user_ns["a"] = 4
    why = ip.run_line_magic("dreamer", "why one")
    assert "input `a` changed" in why._repr_mimebundle_()["text/plain"]
    ip.user_ns["a"] = 3
    assert "nothing changed" in ip.run_line_magic("dreamer", "why one")._repr_mimebundle_()["text/plain"]

    fresh_kernel(ip)
    assert "saved" in ip.run_line_magic("dreamer", "why one")._repr_mimebundle_()["text/plain"]
    backups = tmp_path / "output" / "_backups" / "one"
    assert len(list(backups.iterdir())) == 2
    ip.run_line_magic("dreamer", "gc --keep 1")
    assert len(list(backups.iterdir())) == 1
    ip.run_line_magic("dreamer", "gc")
    assert not any(backups.iterdir())
    with pytest.raises(UsageError):
        ip.run_line_magic("dreamer", "gc --keep lots")
    with pytest.raises(UsageError, match="unknown"):
        ip.run_line_magic("dreamer", "frobnicate")
    with pytest.raises(UsageError):
        ip.run_line_magic("dreamer", "")


def test_dreamer_output_shows_and_sets(ip, tmp_path, capsys):
    ip.run_line_magic("dreamer", "output")
    assert str(tmp_path / "output") in capsys.readouterr().out
    ip.run_line_magic("dreamer", f"output {tmp_path / 'other'}")
    ip.run_cell_magic("dreamer_step", "x", "x = 1\n")
    assert (tmp_path / "other" / "x" / "step.json").exists()
    assert (tmp_path / "other" / ".gitignore").exists()


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, dreamer_magic, dreamer_magic.magics\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'pandas', 'sqlite_utils') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_nested_step_called_with_several_arguments_keeps_each_result(ip, tmp_path, capsys):
    ip.run_cell(
        "from dreamer_magic import step\n"
        "@step('square')\n"
        "def square(x):\n"
        "    print('squaring', x)\n"
        "    return x * x\n"
    )
    cell = "squares = [square(x) for x in (2, 3, 4)]\n"
    ip.run_cell_magic("dreamer_step", "table", cell)
    assert ip.user_ns["squares"] == [4, 9, 16]
    assert capsys.readouterr().out.count("squaring") == 3
    # the parent runs again (its code changed): every nested call is found, none recomputed
    ip.run_cell_magic("dreamer_step", "table", cell + "total = sum(squares)\n")
    out = capsys.readouterr().out
    assert ip.user_ns["total"] == 29
    assert out.count("square: ran") == 0 and out.count("square: loaded from disk") + out.count("square: restored from backup") == 3
    parent = tmp_path / "output" / "table"
    assert (parent / "square" / "step.json").is_file()
    assert len(list((parent / "_backups" / "square").iterdir())) == 2, "the other two results travel with the parent"
