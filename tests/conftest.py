"""Shared fixtures: a real IPython shell with the extension loaded and a private output folder."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def output(tmp_path, monkeypatch):
    """A fresh output folder under tmp_path, set for the core (no IPython)."""
    from dreamer_magic import folders

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "output"
    folders.set_output_folder(path)
    yield path
    folders.set_output_folder(None)


@pytest.fixture
def shell(tmp_path, monkeypatch):
    """A fresh IPython shell as a user would have it: history off, nothing loaded, cwd in tmp_path."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from dreamer_magic import folders

    monkeypatch.chdir(tmp_path)
    config = Config()
    config.HistoryManager.enabled = False
    InteractiveShell.clear_instance()
    ip = InteractiveShell.instance(config=config)
    yield ip
    if "dreamer_magic" in ip.extension_manager.loaded:
        ip.run_line_magic("unload_ext", "dreamer_magic")
    folders.set_output_folder(None)
    InteractiveShell.clear_instance()


@pytest.fixture
def ip(shell, tmp_path):
    """A real IPython shell with the extension loaded and the output folder under tmp_path."""
    shell.run_line_magic("load_ext", "dreamer_magic")
    shell.run_line_magic("dreamer", f"output {tmp_path / 'output'}")
    return shell


def fresh_kernel(ip):
    """Simulate a kernel restart in-process: a clean user namespace, same output folder."""
    keep = {k: v for k, v in ip.user_ns.items() if k in ip.user_ns_hidden}
    ip.user_ns.clear()
    ip.user_ns.update(keep)
    ip.run_line_magic("reload_ext", "dreamer_magic")
    return ip
