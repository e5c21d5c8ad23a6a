"""Shared fixtures: a real IPython shell with the extension loaded and a private output folder."""

from __future__ import annotations

import atexit
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
    # Each shell registers its exit operations (a reset with a full gc.collect()) with atexit:
    # hundreds of them kept every test's namespace alive and held the process minutes at exit.
    atexit.unregister(ip.atexit_operations)


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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback (moto's server, started here: no service for CI to run).

    Yields the environment a "machine" needs to reach it the usual way (``AWS_ENDPOINT_URL`` and
    dummy credentials). The tests' own process is left as it was (its client is given the endpoint
    explicitly), so nothing else in the session talks to this server by accident. Each test uses
    its own bucket.
    """
    pytest.importorskip("s3fs")
    server_module = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "DREAMER_LEASE_TTL": "3",  # a killed machine's lease expires in 3 s, not 30
    }
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A fresh, empty bucket on the loopback S3 server: ``(url prefix, s3fs filesystem, env)``."""
    import re
    import uuid

    import s3fs

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    fs = s3fs.S3FileSystem(
        skip_instance_cache=True, use_listings_cache=False, endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        key=s3_server["AWS_ACCESS_KEY_ID"], secret=s3_server["AWS_SECRET_ACCESS_KEY"],
    )
    fs.mkdir(name)
    return f"s3://{name}/project/output", fs, s3_server
