"""Names, the output folder's rules, and what happens when the disk is full."""

from __future__ import annotations

import errno
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from dreamer_magic.errors import InvalidNameError
from dreamer_magic.folders import OutputFolder, validate_name

ALLOWED = string.ascii_letters + string.digits + " _-."


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=ALLOWED, min_size=1, max_size=100))
def test_valid_names_map_to_safe_folder_names(name):
    ok = not name.startswith((".", "_")) and name != ".." and name.strip() == name
    if not ok:
        with pytest.raises(InvalidNameError, match="must not start"):
            validate_name(name)
        return
    folder = validate_name(name)
    assert folder == name.lower().replace(" ", "-")
    assert "/" not in folder and "\\" not in folder and folder not in (".", "..")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=120))
def test_any_text_is_either_a_safe_folder_or_a_clear_error(name):
    try:
        folder = validate_name(name)
    except InvalidNameError as e:
        assert "1-100 characters" in str(e) or "reserved" in str(e)
        return
    assert 1 <= len(folder) <= 100
    assert not any(ch in folder for ch in "/\\\x00\n")
    assert not folder.startswith((".", "_"))


@pytest.mark.parametrize("name", ["_backups", ".cache", "../x", "a/b", "x" * 101, ""])
def test_reserved_and_traversal_names(name):
    with pytest.raises(InvalidNameError):
        validate_name(name)


def test_gitignore_is_dropped(tmp_path):
    OutputFolder(tmp_path / "out").ensure()
    assert (tmp_path / "out" / ".gitignore").read_text().strip().endswith("*")


def test_no_space_left_is_a_clear_error_and_keeps_the_previous_result(ip, tmp_path, monkeypatch):
    from dreamer_magic import storage

    ip.user_ns["a"] = 1
    ip.run_cell_magic("dreamer_step", "full", "b = a + 1\n")
    before = (tmp_path / "output/full/step.json").read_text()

    def no_space(values, folder):
        (folder / "partial.bin").write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage, "save_outputs", no_space)
    ip.user_ns["a"] = 2
    with pytest.raises(UsageError, match="no space left.*%dreamer gc"):
        ip.run_cell_magic("dreamer_step", "full", "b = a + 1\n")
    assert (tmp_path / "output/full/step.json").read_text() == before
    assert [p.name for p in (tmp_path / "output").iterdir() if ".tmp-" in p.name] == []
