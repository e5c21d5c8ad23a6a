"""A hit loads only what the step wrote (issue 12, items 1-3; SPEC §3 *Integrity*, *Storage*).

Folders are tampered with between runs through a real IPython shell: a dataset truncated at a
record-batch boundary, a flipped byte, a pickle swapped in for an ``.npy``, paths and symlinks
that lead outside. Reads outside the output folder are watched with inotify (any code, C++
included) and an audit hook (Python's ``open``); hypothesis writes the tampered documents.
"""

from __future__ import annotations

import ctypes
import json
import os
import pickle
import shutil
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

import dreamer_magic
from dreamer_magic.errors import DreamerError
from dreamer_magic.folders import tree_digest
from dreamer_magic.integrity import record_files, sniff

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify watches reads outside")


# -- helpers ------------------------------------------------------------------------------------------


class Watch:
    """Every open or read, by any code in this process, of the files in some folders (inotify)."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, *folders: Path) -> None:
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0
        self.names: dict[int, str] = {}
        for folder in folders:
            for dirpath, _, _ in os.walk(folder):
                wd = self.libc.inotify_add_watch(self.fd, dirpath.encode(), self.IN_ACCESS | self.IN_OPEN)
                assert wd >= 0
                self.names[wd] = dirpath
        self.events()  # walking the folders to watch them opened them

    def events(self) -> list[str]:
        out = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            i = 0
            while i < len(data):
                wd, mask, _, size = struct.unpack_from("iIII", data, i)
                name = data[i + 16 : i + 16 + size].rstrip(b"\0").decode()
                out.append(os.path.join(self.names.get(wd, "?"), name))
                i += 16 + size

    def close(self) -> None:
        os.close(self.fd)


_OPENED: list[str] = []
_WATCHING = [False]


def _audit(event: str, args: tuple) -> None:
    if _WATCHING[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


sys.addaudithook(_audit)  # an audit hook cannot be removed: it records only while _WATCHING


class python_opens:
    """The paths Python's ``open`` is asked for inside the block."""

    def __enter__(self) -> list[str]:
        _OPENED.clear()
        _WATCHING[0] = True
        return _OPENED

    def __exit__(self, *exc: object) -> None:
        _WATCHING[0] = False


def _outside_opens(paths: list[str], output: Path, tmp_path: Path) -> list[str]:
    """Opened paths under ``tmp_path`` but not in the output folder (absolute or relative to cwd)."""
    bad = []
    for p in paths:
        full = os.path.normpath(os.path.join(str(tmp_path), p))
        if full.startswith(str(tmp_path)) and not full.startswith(str(output)):
            bad.append(p)
    return bad


def meta_of(folder: Path) -> dict:
    return json.loads((folder / "step.json").read_text())


def rewrite(folder: Path, meta: dict, *, rerecord: bool = True) -> None:
    """Write ``meta`` as step.json; ``rerecord``: as a careful attacker would, with a file record that matches."""
    if rerecord and "files" in meta:
        meta["files"] = record_files(folder, skip=["step.json"])
    (folder / "step.json").write_text(json.dumps(meta))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def first_batch_end(path: Path) -> int:
    """The byte offset where the first record batch of an Arrow stream ends."""
    import pyarrow as pa

    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.MessageReader.open_stream(f)
        reader.read_next_message()  # the schema
        reader.read_next_message()  # the first record batch
        return f.tell()


class Payload:
    """Unpickling it creates the file ``marker``: proof that a pickle ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def status():
    return dreamer_magic.last_status()


def run(ip, name: str, cell: str):
    ip.run_cell_magic("dreamer_step", name, cell)
    return status()


def kept_aside(output: Path, name: str) -> list[Path]:
    base = output / "_backups" / name
    return sorted(base.glob("incomplete-*")) if base.is_dir() else []


# -- 1. corrupt data is never a hit -----------------------------------------------------------------


CELL = "df = raw[raw.a >= 0].reset_index(drop=True)\narr = np.arange(6)\ninfo = {'rows': len(df)}\n"


@pytest.fixture
def saved(ip, tmp_path):
    """A step whose outputs are a 70,000-row DataFrame (two record batches), an array and a dict."""
    ip.run_cell("import numpy as np, pandas as pd\nraw = pd.DataFrame({'a': np.arange(70_000), 'b': np.arange(70_000) * 0.5})")
    assert run(ip, "s", CELL).state == "ran"
    return tmp_path / "output", tmp_path / "output" / "s"


def test_step_json_records_every_file_and_a_hit_verifies_them(ip, saved):
    output, folder = saved
    meta = meta_of(folder)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "step.json"}
    assert set(meta["files"]) == on_disk
    for rel, item in meta["files"].items():
        assert item["size"] == (folder / rel).stat().st_size and len(item["xxh3_128"]) == 32
    for entry in meta["outputs"].values():  # the per-output digest (lineage keys) is as before
        assert entry["digest"] == tree_digest(folder / entry["path"])
    hit = run(ip, "s", CELL)
    assert hit.state == "loaded from disk" and hit.verified == "digest"


def test_truncated_or_flipped_data_is_a_miss_that_keeps_the_folder_aside(ip, saved):
    output, folder = saved
    arrow = next((folder / "_dataset").glob("data-*.arrow"))
    rel = arrow.relative_to(folder).as_posix()
    size = arrow.stat().st_size
    with open(arrow, "r+b") as f:  # a clean cut after the first of two record batches
        f.truncate(first_batch_end(arrow))
    ran = run(ip, "s", CELL)
    assert ran.state == "ran" and len(ip.user_ns["df"]) == 70_000
    assert any(f"`{rel}` changed on disk (size" in r and "→" in r and "set aside in _backups/s/incomplete-" in r for r in ran.reasons), ran.reasons
    [aside] = kept_aside(output, "s")
    assert (aside / rel).stat().st_size < size  # kept for a person to look at, not deleted

    flip(arrow, arrow.stat().st_size - 200)  # same size, one byte differs
    ran = run(ip, "s", CELL)
    assert ran.state == "ran" and any("same size, different content" in r for r in ran.reasons)
    assert len(kept_aside(output, "s")) == 2

    # verify = "size" trades the digests for speed: a flipped byte passes, a cut never does
    ip.run_line_magic("config", 'DreamerMagics.verify = "size"')
    npy = folder / "_outputs" / "arr.npy"
    flip(npy, npy.stat().st_size - 1)
    hit = run(ip, "s", CELL)
    assert hit.state == "loaded from disk" and hit.verified == "size"
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 8)
    assert run(ip, "s", CELL).state == "ran"
    ip.run_line_magic("config", 'DreamerMagics.verify = "digest"')
    flip(npy, npy.stat().st_size - 1)
    assert run(ip, "s", CELL).state == "ran"
    assert run(ip, "s", CELL).verified == "digest"
    ip.run_line_magic("config", 'DreamerMagics.verify = "fast"')  # refused by the trait, with the choices
    assert ip._dreamer_magics.verify == "digest"
    with pytest.raises(DreamerError, match="'digest', 'size'"):
        dreamer_magic.step("t", verify="fast")


def test_a_folder_checked_in_this_kernel_is_checked_again_once_anything_in_it_moves(ip, saved, tmp_path, monkeypatch):
    """A second hit skips re-reading a folder it checked, unchanged since (by the stamps of its
    files and folders); a flipped byte, a symlink added deep inside, or a file added beside
    the outputs is still found on the next hit."""
    from dreamer_magic import integrity

    monkeypatch.setattr(integrity, "_RACY_NS", 0)  # remember even a folder written just now
    output, folder = saved
    import time

    for tamper, expect in [
        (lambda: flip(next((folder / "_dataset").glob("data-*.arrow")), 300), "same size, different content"),
        (lambda: os.symlink(_outside(tmp_path), folder / "_dataset" / "cache-x.arrow"), "outside the step folder"),
        (lambda: (folder / "replay.json").write_text("[]"), "`replay.json` was added after the save"),
    ]:
        assert run(ip, "s", CELL).state in ("loaded from disk", "ran")
        hit = run(ip, "s", CELL)  # remembered as checked
        assert hit.state == "loaded from disk" and str(folder) in integrity._CHECKED
        time.sleep(0.02)  # past the file system's clock tick
        tamper()
        ran = run(ip, "s", CELL)
        assert ran.state == "ran" and any(expect in str(r) for r in ran.reasons), (expect, ran.reasons)


def test_what_a_remembered_check_covers(tmp_path, monkeypatch):
    """Digests cover a check by sizes, not the other way round; a check with pickles refused
    covers one with pickles allowed, not the other way round; another record is not covered."""
    from dreamer_magic import integrity

    monkeypatch.setattr(integrity, "_RACY_NS", 0)
    folder = tmp_path / "s"
    (folder / "_outputs").mkdir(parents=True)
    (folder / "_outputs" / "a.npy").write_bytes(b"x" * 100)
    meta = {"files": record_files(folder), "outputs": {"a": {"path": "_outputs/a.npy"}}}
    integrity.remember_checked(folder, meta, "size", True)
    assert integrity.checked_before(folder, meta, "size", True)
    assert not integrity.checked_before(folder, meta, "digest", True)
    assert not integrity.checked_before(folder, meta, "size", False)
    integrity.remember_checked(folder, meta, "digest", False)
    assert integrity.checked_before(folder, meta, "size", True) and integrity.checked_before(folder, meta, "digest", False)
    other = {**meta, "outputs": {"a": {"path": "_outputs/a.npy", "storage": "pickle"}}}
    assert not integrity.checked_before(folder, other, "digest", False)
    integrity.forget_digests()
    assert not integrity.checked_before(folder, meta, "size", True)


def test_a_damaged_backup_is_never_restored_and_an_old_record_still_hits(ip, saved):
    output, folder = saved
    ip.user_ns["k"] = 1
    cell = "arr2 = np.arange(6) * k\n"
    assert run(ip, "b", cell).state == "ran"
    ip.user_ns["k"] = 2
    assert run(ip, "b", cell).state == "ran"
    [backup] = [p for p in (output / "_backups" / "b").iterdir() if not p.name.startswith("incomplete-")]
    flip(backup / "_outputs" / "arr2.npy", 130)
    ip.user_ns["k"] = 1
    ran = run(ip, "b", cell)
    assert ran.state == "ran" and list(ip.user_ns["arr2"]) == [0, 1, 2, 3, 4, 5]
    assert any("a backup with this fingerprint is damaged" in r and "arr2.npy" in r for r in ran.reasons), ran.reasons
    assert len(kept_aside(output, "b")) == 1

    meta = meta_of(folder)  # saved before file records existed: a hit, unverified
    del meta["files"]
    rewrite(folder, meta)
    hit = run(ip, "s", CELL)
    assert hit.state == "loaded from disk" and hit.verified is None


def test_cache_files_datasets_adds_beside_a_loaded_dataset_do_not_matter(ip, tmp_path):
    ip.run_cell("import datasets\nsrc = datasets.Dataset.from_dict({'a': [1, 2, 3]})")
    assert run(ip, "d", "ds = src\n").state == "ran"
    assert run(ip, "d", "ds = src\n").state == "loaded from disk"
    ip.run_cell("doubled = ds.map(lambda r: {'b': r['a'] * 2})")  # writes _dataset/cache-*.arrow
    assert list((tmp_path / "output" / "d" / "_dataset").glob("cache-*.arrow"))
    hit = run(ip, "d", "ds = src\n")
    assert hit.state == "loaded from disk" and hit.verified == "digest"


def test_a_trainer_model_is_verified_like_a_step(ip, tmp_path):
    ip.run_cell("import torch\ntorch.manual_seed(0)\nnet = torch.nn.Linear(3, 1)\nopt = torch.optim.SGD(net.parameters(), lr=0.1)")
    cell = "for _ in range(3):\n    loss = net(torch.ones(2, 3)).pow(2).mean()\n    opt.zero_grad(); loss.backward(); opt.step()\n"
    ip.run_cell_magic("dreamer_train", "fit", cell)
    folder = tmp_path / "output" / "fit"
    meta = json.loads((folder / "trainer.json").read_text())
    weights = [rel for rel in meta["files"] if rel.startswith("_model/") and rel.endswith(".safetensors")]
    assert weights and not any(rel.startswith("_checkpoints") for rel in meta["files"])
    ip.run_cell_magic("dreamer_train", "fit", cell)
    assert status().state == "loaded from disk" and status().verified == "digest"
    flip(folder / weights[0], (folder / weights[0]).stat().st_size - 1)
    ip.run_cell_magic("dreamer_train", "fit", cell)
    assert status().state != "loaded from disk" and any(weights[0] in r for r in status().reasons), status().reasons


# -- 2. nothing is read outside the output folder -------------------------------------------------------


def _outside(tmp_path: Path) -> Path:
    """Files a tampered folder might point at, outside the output folder (their reads are watched).

    The working directory moves to ``tmp_path/nb``: a body that runs (a miss) may look around
    its working directory, which is its right; the hit decision must not look anywhere outside.
    """
    import numpy as np
    import pyarrow as pa

    (tmp_path / "nb").mkdir(exist_ok=True)
    os.chdir(tmp_path / "nb")
    out = tmp_path / "outside"
    (out / "dir").mkdir(parents=True, exist_ok=True)
    np.save(out / "secret.npy", np.arange(3) + 1000)
    (out / "secret.json").write_text('{"secret": true}')
    table = pa.table({"a": [7], "b": [7.0]})
    with pa.OSFile(str(out / "secret.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (out / "dir" / "state.json").write_text("{}")
    return out


def _tamper_cases(folder: Path, outside: Path) -> list[tuple[str, object]]:
    def output_path(value: str):
        def tamper() -> None:
            meta = meta_of(folder)
            meta["outputs"]["arr"]["path"] = value
            rewrite(folder, meta)
        return tamper

    def record_key() -> None:
        meta = meta_of(folder)
        meta["files"] = record_files(folder, skip=["step.json"])
        meta["files"]["../../outside/secret.json"] = {"size": 16, "xxh3_128": "0" * 32}
        rewrite(folder, meta, rerecord=False)

    def state_file(value: str):
        def tamper() -> None:
            state = json.loads((folder / "_dataset" / "state.json").read_text())
            state["_data_files"] = [{"filename": value}]
            (folder / "_dataset" / "state.json").write_text(json.dumps(state))
            rewrite(folder, meta_of(folder))
        return tamper

    def link(rel: str, target: Path | str):
        def tamper() -> None:
            path = folder / rel
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            os.symlink(target, path)
            rewrite(folder, meta_of(folder))
        return tamper

    return [
        ("output path ../", output_path("../../outside/secret.npy")),
        ("output path absolute", output_path(str(outside / "secret.npy"))),
        ("output path backslashes", output_path("..\\..\\outside\\secret.npy")),
        ("output path drive", output_path("C:/outside/secret.npy")),
        ("output path via _outputs/..", output_path("_outputs/../../../outside/secret.npy")),
        ("record path", record_key),
        ("state.json ../", state_file("../../../outside/secret.arrow")),
        ("state.json absolute", state_file(str(outside / "secret.arrow"))),
        ("symlink file, absolute", link("_outputs/arr.npy", outside / "secret.npy")),
        ("symlink file, relative", link("_outputs/arr.npy", "../../../outside/secret.npy")),
        ("symlink folder deep", link("_dataset/extra", outside / "dir")),
    ]


def test_paths_and_symlinks_leading_outside_are_refused_and_kept_aside(ip, saved, tmp_path):
    output, folder = saved
    outside = _outside(tmp_path)
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine, symlinks=True)
    watch = Watch(outside)
    try:
        for label, tamper in _tamper_cases(folder, outside):
            shutil.rmtree(output / "_backups", ignore_errors=True)
            shutil.rmtree(folder)
            shutil.copytree(pristine, folder, symlinks=True)
            tamper()
            watch.events()
            with python_opens() as opened:
                ran = run(ip, "s", CELL)
            assert watch.events() == [], label
            assert _outside_opens(opened, output, tmp_path) == [], label
            assert ran.state == "ran", label
            assert list(ip.user_ns["arr"]) == list(range(6)) and len(ip.user_ns["df"]) == 70_000, label
            assert any(("outside" in r and "refused" in r) for r in ran.reasons), (label, ran.reasons)
            assert len(kept_aside(output, "s")) == 1, label  # the user's folder is kept, not deleted
    finally:
        watch.close()


# -- 3. allow_pickle = False refuses by content -----------------------------------------------------------


def _pickle_cases(folder: Path, marker: str) -> list[tuple[str, object, str]]:
    import numpy as np

    npy = folder / "_outputs" / "arr.npy"

    def swap_npy(data: bytes, drop_key: bool = False):
        def tamper() -> None:
            npy.write_bytes(data)
            meta = meta_of(folder)
            if drop_key:
                meta["outputs"]["arr"].pop("pickled")
            rewrite(folder, meta)
        return tamper

    def json_to_pickle() -> None:
        (folder / "_outputs" / "evil.pkl").write_bytes(pickle.dumps(Payload(marker)))
        meta = meta_of(folder)
        meta["outputs"]["info"]["path"] = "_outputs/evil.pkl"
        rewrite(folder, meta)

    def object_npy() -> None:
        with open(npy, "wb") as f:
            np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)
        rewrite(folder, meta_of(folder))

    def torch_zip() -> None:
        import torch

        torch.save({"x": Payload(marker)}, npy)
        rewrite(folder, meta_of(folder))

    def storage_word() -> None:
        npy.write_bytes(pickle.dumps(Payload(marker)))
        meta = meta_of(folder)
        meta["outputs"]["arr"]["storage"] = "pickle"
        rewrite(folder, meta)

    return [
        ("pickle for .npy, pickled: false", swap_npy(pickle.dumps(Payload(marker))), "arr"),
        ("pickle for .npy, no pickled key", swap_npy(pickle.dumps(Payload(marker)), drop_key=True), "arr"),
        ("protocol-0 pickle for .npy", swap_npy(pickle.dumps(Payload(marker), protocol=0)), "arr"),
        ("json entry pointing at a pickle", json_to_pickle, "info"),
        ("object .npy", object_npy, "arr"),
        ("torch archive for .npy", torch_zip, "arr"),
        ("storage says pickle, pickled: false", storage_word, "arr"),
    ]


def test_pickles_are_refused_by_content_before_any_output_loads(ip, saved, tmp_path):
    output, folder = saved
    marker = str(tmp_path / "pickle-ran")
    pristine = tmp_path / "pristine"
    shutil.copytree(folder, pristine)
    ip.run_line_magic("config", "DreamerMagics.allow_pickle = False")
    for label, tamper, name in _pickle_cases(folder, marker):
        shutil.rmtree(folder)
        shutil.copytree(pristine, folder)
        tamper()
        for var in ("df", "arr", "info"):
            ip.user_ns[var] = "before"
        with pytest.raises(UsageError) as refused:
            run(ip, "s", CELL)
        message = str(refused.value)
        assert f"{name!r}" in message and "%config DreamerMagics.allow_pickle = True" in message, (label, message)
        assert not os.path.exists(marker), label
        assert all(ip.user_ns[v] == "before" for v in ("df", "arr", "info")), label  # nothing loaded
        assert (folder / "step.json").exists() and not kept_aside(output, "s"), label  # nothing deleted or moved
    # allowed, a file that is not what its storage wrote is damage: a miss, and the pickle never runs
    ip.run_line_magic("config", "DreamerMagics.allow_pickle = True")
    shutil.rmtree(folder)
    shutil.copytree(pristine, folder)
    _pickle_cases(folder, marker)[0][1]()
    ran = run(ip, "s", CELL)
    assert ran.state == "ran" and not os.path.exists(marker)
    assert any("is a pickle, not an .npy array" in r for r in ran.reasons), ran.reasons


def test_sniff_names_formats_by_content(tmp_path):
    import numpy as np

    cases = {
        "p.bin": pickle.dumps([1]),
        "p0.bin": pickle.dumps({"a": (1, 2)}, protocol=0),
        "j.bin": b' {"a": [1, 2]}',
        "f.json": b"0.5",
        "t.json": b"true",
        "e.bin": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "a.npy", np.arange(3))
    np.save(tmp_path / "o.npy", np.array([{}], dtype=object), allow_pickle=True)
    found = {p.name: sniff(p) for p in sorted(tmp_path.iterdir())}
    assert found == {"a.npy": "npy", "e.bin": "empty", "f.json": "json", "j.bin": "json", "t.json": "json", "o.npy": "npy-object", "p.bin": "pickle", "p0.bin": "pickle"}


# -- property: tampered documents never lead outside, never raise anything undocumented ---------------------


PHASES = [Phase.explicit, Phase.reuse, Phase.generate]  # no shrinking: the failing document is in the message

_ESCAPES = st.sampled_from(
    [
        "../secret.json", "../../outside/secret.json", "../../../outside/secret.arrow", "..", "/",
        "..\\..\\outside\\secret.json", "C:secret", "c:/outside", "_outputs/../../../outside/secret.npy",
        "./../../outside/secret.npy", "~/secret", "_dataset/../../../outside/secret.arrow", "a/../../..",
        "_outputs/arr.npy", "_dataset", "_outputs/info.json", "state.json", "", ".", "x\x00y",
    ]
)


def _paths(outside: Path):
    absolute = st.sampled_from([str(outside / "secret.npy"), str(outside / "secret.arrow"), str(outside)])
    return st.one_of(_ESCAPES, absolute, st.text(max_size=12), st.integers(), st.none())


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _documents(outside: Path):
    paths = _paths(outside)
    storages = st.sampled_from(["npy", "json", "dataset", "arrow", "pickle", "safetensors", "function", "pretrained", "state_dict", "zzz"])
    entry = st.fixed_dictionaries(
        {},
        optional={"path": paths, "storage": storages, "pickled": st.booleans(), "exact_columns": paths, "pandas": _JSON},
    )
    return st.fixed_dictionaries(
        {
            "outputs": st.dictionaries(st.sampled_from(["df", "arr", "info", "zz"]), st.one_of(entry, _JSON), max_size=3),
            "files": st.one_of(st.none(), st.dictionaries(paths.filter(lambda p: isinstance(p, str)), _JSON, max_size=3), _JSON),
            "data_files": st.one_of(st.lists(st.one_of(st.fixed_dictionaries({"filename": paths}), _JSON), max_size=3), _JSON),
            "splits": st.one_of(st.none(), st.lists(paths, max_size=2)),
            "link": st.one_of(st.none(), st.tuples(st.sampled_from(["_outputs/arr.npy", "_dataset/x", "replay.json"]), paths.filter(lambda p: isinstance(p, str) and p and "\x00" not in p))),
        }
    )


@settings(max_examples=60, phases=PHASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_tampered_documents_never_read_outside(ip, tmp_path, data):
    output, folder = tmp_path / "output", tmp_path / "output" / "p"
    outside = tmp_path / "outside"
    cell = "ds = raw\narr = np.arange(3)\ninfo = {'n': 1}\n"
    pristine = tmp_path / "pristine-p"
    if not pristine.exists():  # set up once per test (hypothesis reuses the fixtures)
        _outside(tmp_path)
        ip.run_cell("import numpy as np, datasets\nraw = datasets.Dataset.from_dict({'a': [1, 2, 3]})")
        assert run(ip, "p", cell).state == "ran"
        shutil.copytree(folder, pristine, symlinks=True)
    doc = data.draw(_documents(outside))
    shutil.rmtree(output / "_backups", ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder, symlinks=True)
    meta = meta_of(folder)
    meta["outputs"] = {**meta["outputs"], **doc["outputs"]}
    if doc["files"] is not None:
        meta["files"] = doc["files"]
    state_path = folder / "_dataset" / "state.json"
    state = json.loads(state_path.read_text())
    state["_data_files"] = doc["data_files"]
    state_path.write_text(json.dumps(state))
    if doc["splits"] is not None:
        (folder / "_dataset" / "dataset_dict.json").write_text(json.dumps({"splits": doc["splits"]}))
    if doc["link"] is not None:
        rel, target = doc["link"]
        (folder / rel).unlink(missing_ok=True) if not (folder / rel).is_dir() else shutil.rmtree(folder / rel)
        os.symlink(target, folder / rel)
    (folder / "step.json").write_text(json.dumps(meta))
    watch = Watch(outside)
    try:
        with python_opens() as opened:
            try:
                run(ip, "p", cell)
            except UsageError:
                pass  # a DreamerError, as the magic shows it: documented
        events = watch.events()
        assert events == [], (doc, events)
        bad = _outside_opens(opened, output, tmp_path)
        assert bad == [], (doc, bad)
    finally:
        watch.close()


def test_a_file_is_hashed_again_whenever_its_stamp_moves(tmp_path, monkeypatch):
    from dreamer_magic import integrity
    from dreamer_magic.errors import DamagedResultError

    monkeypatch.setattr(integrity, "_RACY_NS", 0)  # remember even a file written just now
    folder = tmp_path / "s"
    data = folder / "_outputs" / "a.bin"
    data.parent.mkdir(parents=True)
    data.write_bytes(os.urandom(1 << 20))
    meta = {"files": record_files(folder)}
    assert integrity.known_digest(os.stat(data)) == meta["files"]["_outputs/a.bin"]["xxh3_128"]
    assert integrity.verify_record(folder, meta) == "digest"
    import time

    time.sleep(0.02)  # past the file system's clock tick
    flip(data, 1000)
    with pytest.raises(DamagedResultError, match="same size, different content"):
        integrity.verify_record(folder, meta)
    integrity.forget_digests()
    assert integrity.known_digest(os.stat(data)) is None


def test_a_file_is_sniffed_again_whenever_its_stamp_moves(tmp_path, monkeypatch):
    """The format memo follows the digest memo's rule: a file rewritten in place (same size,
    a pickle where JSON was) is opened again, never judged by what it was."""
    import pickle
    import time

    from dreamer_magic import integrity

    monkeypatch.setattr(integrity, "_RACY_NS", 0)
    path = tmp_path / "state.json"
    blob = pickle.dumps([1, 2, 3], protocol=2)
    path.write_bytes(b"[" + b" " * (len(blob) - 2) + b"]")
    assert integrity.sniff(path) == "json"
    assert integrity.sniff(path) == "json"  # remembered
    time.sleep(0.02)
    with open(path, "r+b") as f:  # in place: same inode, same size
        f.write(blob)
    assert os.path.getsize(path) == len(blob)
    assert integrity.sniff(path) == "pickle"


def test_a_model_folder_is_judged_by_every_file_in_it(tmp_path):
    """A ``from_pretrained`` folder is read by listing: a file added after the save is damage, and
    a torch archive in it is refused when pickles are off, whatever the entry says."""
    import torch

    from dreamer_magic import integrity
    from dreamer_magic.errors import DamagedResultError, PickleRefusedError
    from dreamer_magic.storage import LoadContext, check_files

    model = tmp_path / "t" / "_model"
    model.mkdir(parents=True)
    (model / "config.json").write_text('{"model_type": "gpt2"}')
    meta = {"files": record_files(tmp_path / "t")}
    torch.save({"w": torch.zeros(2)}, model / "pytorch_model.bin")
    with pytest.raises(DamagedResultError, match="`_model/pytorch_model.bin` was added after the save"):
        integrity.verify_record(tmp_path / "t", meta, listed=["_model"])
    assert integrity.verify_record(tmp_path / "t", meta) == "digest"  # elsewhere an added file is not read
    entry = {"storage": "pretrained", "path": "_model", "pickled": False}
    with pytest.raises(PickleRefusedError, match="torch archive"):
        check_files(tmp_path / "t", entry, LoadContext(False, None, "model"))
    check_files(tmp_path / "t", entry, LoadContext(True, None, "model"))
