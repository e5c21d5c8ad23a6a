"""The first hit in a restarted kernel gives back exactly the saved frame, and does only what a
hit needs: no remote module without a remote, no dependency checker when the step recorded
nothing to check, no pyarrow pandas-compatibility pass for a plain frame. (How fast that is, is
``benchmarks/bench_cold.py``'s business; here: that it is exact and that the skipped work is
really not needed.)"""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
from _session import session

from dreamer_magic.fingerprint import Hasher, fingerprint
from dreamer_magic.status import LOADED, RAN

FRAME = """
import numpy as np, pandas as pd
n = 3000
rows = pd.RangeIndex(10, 10 + 2 * n, 2)
frame = pd.DataFrame({
    "text": [f"review {i}: ok" for i in range(n)],
    "notes": pd.Series([None if i % 7 == 0 else f"n{i}" for i in range(n)], dtype=object, index=rows),
    "gaps": pd.Series([float("nan") if i % 5 == 0 else f"g{i}" for i in range(n)], dtype=object, index=rows),
    "label": pd.Series(["é" * (i % 3) for i in range(n)], dtype="str", index=rows),
    "stars": np.arange(n) % 5,
    "small": (np.arange(n) % 100).astype("int8"),
    "score": np.where(np.arange(n) % 11 == 0, np.nan, np.arange(n) / 7),
    "flag": np.arange(n) % 2 == 0,
}, index=rows)
"""

CELL = "%%dreamer_step cold\nkept = frame[frame.stars >= 0]\n"

PROBE = """
import sys
loaded = {m: m in set(sys.modules) - before for m in ("dreamer_magic.remote", "dreamer_magic.dependencies", "pyarrow.pandas_compat")}
kept.loc[kept.index[0], "stars"] = 99  # numeric columns are writeable, not views of the memory-mapped file
kept.loc[kept.index[0], "score"] = -1.0
kept.loc[kept.index[0], "flag"] = False
"""


def test_a_cold_hit_is_the_saved_frame_and_imports_only_what_it_needs(tmp_path):
    dump = tmp_path / "kept.pkl"
    first = session(tmp_path, [FRAME, CELL, f"import pickle\npickle.dump(kept, open({str(dump)!r}, 'wb'))"])
    assert first.states == [RAN], first.stdout
    assert "pickle" not in first.stdout, first.stdout  # saved as the _dataset, not pickled
    expected = pickle.loads(dump.read_bytes())

    later = session(
        tmp_path,
        [FRAME, "import sys\nbefore = set(sys.modules)", CELL, PROBE, f"import pickle\npickle.dump((kept, loaded), open({str(dump)!r}, 'wb'))"],
    )
    assert later.states == [LOADED], later.stdout + later.stderr
    kept, loaded = pickle.loads(dump.read_bytes())
    assert loaded == {"dreamer_magic.remote": False, "dreamer_magic.dependencies": False, "pyarrow.pandas_compat": False}
    expected.loc[expected.index[0], ["stars", "score", "flag"]] = [99, -1.0, False]
    pd.testing.assert_frame_equal(kept, expected, check_exact=True)
    assert list(map(type, kept["notes"].iloc[:8])) == list(map(type, expected["notes"].iloc[:8]))
    assert kept["gaps"].iloc[0] != kept["gaps"].iloc[0]  # NaN stays NaN (not None) in an object column
    assert [str(t) for t in kept.dtypes] == ["str", "object", "object", "str", "int64", "int8", "float64", "bool"]
    assert str(kept.columns.dtype) == "str"


def test_long_ascii_text_hashes_as_the_element_wise_record(monkeypatch):
    """The fast path for long all-ASCII object text (lengths from the NULs, text a block at a
    time) feeds exactly the bytes of the general one, whatever the block size."""
    import dreamer_magic.fingerprint as fp

    def general(items: list[str]) -> str:
        h = Hasher()
        h.tag("strings")
        lengths = np.array([len(s) for s in items], dtype=np.int64)
        h.bytes_(memoryview(lengths).cast("B"))
        h.bytes_("\x00".join(items).encode("utf-8", "surrogatepass"))
        return h.hexdigest()

    rng = np.random.default_rng(0)
    for block in (1, 3, 7, 64):
        monkeypatch.setattr(fp, "_BLOCK", block)
        for _ in range(200):
            items = ["".join(rng.choice(list("ab c\x00"), size=rng.integers(0, 6))) for _ in range(rng.integers(1, 9))]
            h = Hasher()
            h._object_values(np.array(items + [None], dtype=object)[:-1])
            assert h.hexdigest() == general(items), (block, items)
    monkeypatch.setattr(fp, "_BLOCK", 4)
    a = pd.Series(["x" * 3, "yy", ""], dtype=object)
    assert fingerprint(a) != fingerprint(pd.Series(["x" * 3 + "\x00yy", ""], dtype=object))
