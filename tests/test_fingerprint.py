"""Fingerprints: deterministic, type-aware, pinned by golden digests, equal across processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dreamer_magic.errors import FingerprintError
from dreamer_magic.fingerprint import fingerprint, normalise_source


def golden_values():
    return {
        "none": None,
        "int": 42,
        "float": 0.1,
        "str": "héllo",
        "bytes": b"\x00\x01",
        "list": [1, "a", None, 2.5],
        "tuple": (1, 2),
        "dict": {"b": 1, "a": [1, 2]},
        "set": {3, 1, 2},
        "int64": np.arange(6, dtype=np.int64).reshape(2, 3),
        "float32": np.linspace(0, 1, 5, dtype=np.float32),
        "frame": pd.DataFrame({"text": ["a", "bb", "ccc"], "n": [1, 2, 3], "x": [0.5, 1.5, 2.5]}),
        "series": pd.Series([1.0, 2.0], name="s"),
        # format 2
        "ordered": __import__("collections").OrderedDict([("b", 1), ("a", 2)]),
        "defaultdict": __import__("collections").defaultdict(list, {"x": [1]}),
        "bigint": -(7**6000),
        "timestamp": pd.Timestamp("2020-01-01 12:00", tz="Europe/Paris").as_unit("ns"),
        "generator": np.random.default_rng(7),
        "seed_sequence": np.random.SeedSequence(7, spawn_key=(1,)),
        "decimal": __import__("decimal").Decimal("1.10"),
        "date": __import__("datetime").date(2020, 2, 29),
        "path": __import__("pathlib").PurePosixPath("data/train.csv"),
        "code": normalise_source("@cache\ndef f(x: int) -> str:\n    return f'{x!r:>{w}}'\n"),
    }


# Pinned: if one of these changes, every user's saved steps would silently re-run. Change
# them only together with fingerprint.FORMAT_VERSION, on purpose. (Format 2, on purpose: dict
# order, tensor flags, ints as bytes, code as canonical_ast.)
GOLDEN = {
    "none": "5e2c55532585376bb41df1949b51d753",
    "int": "f8977baec2fe7cd37dd47cd5a33cd16e",
    "float": "bdf60a676964b0dae00f7920864591b5",
    "str": "5ed07e8d65e6b0b41b39e11069b98c67",
    "bytes": "3621cddc310a725752d188988e4940fe",
    "list": "739908884d22c74d2eebf428e3d8d025",
    "tuple": "35dea8fefe84f6dd6f9d0ed2cb548883",
    "dict": "19fc621d293a76802b94484f06994fba",
    "set": "bd1817c32b754aad01386391fe8a4af8",
    "int64": "b9945ce4a9a9f6d0760c6f41e3cf788f",
    "float32": "41ef38289e29f312e162190f0f12adca",
    "frame": "66dae7bbdd851bbf9fb769fb0709801f",
    "series": "590d546f19ccd1e62fc11d6d0b57a7bf",
    "ordered": "5bbee53c25b9d44f1053c9a584ac570b",
    "defaultdict": "a15d2c7a128b9e57f16a7670f2925b5d",
    "bigint": "ec37884e973345305c6d2270a0570dd6",
    "timestamp": "c7c4d2be3417f8309071bd0789b80978",
    "generator": "4229534103804f8f3be9a88e769ebace",
    "seed_sequence": "caca49baeab6d006be17ac54072c43fa",
    "decimal": "3a34206f7327beb88fe35b03d9f095b0",
    "date": "d3e90283fbe1c199612271ccfef5549a",
    "path": "412d8968d68dc5f9011ff4eaa4c361d6",
    "code": "9e330094ee88d863d7c9dc2d2eaeb0a0",
}


def test_golden_digests():
    actual = {k: fingerprint(v) for k, v in golden_values().items()}
    assert actual == GOLDEN


def test_same_in_another_process():
    code = textwrap.dedent(
        """
        import json, sys
        sys.path.insert(0, %r)
        from test_fingerprint import golden_values
        from dreamer_magic.fingerprint import fingerprint
        print(json.dumps({k: fingerprint(v) for k, v in golden_values().items()}))
        """
        % str(__import__("pathlib").Path(__file__).parent)
    )
    import json
    import os

    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == {k: fingerprint(v) for k, v in golden_values().items()}


def test_types_are_part_of_the_fingerprint():
    a = np.arange(4, dtype=np.int64)
    assert fingerprint(a) != fingerprint(a.view(np.float64))
    assert fingerprint(a) != fingerprint(a.astype(np.int32))
    assert fingerprint(a) != fingerprint(a.reshape(2, 2))
    assert fingerprint(1) != fingerprint(1.0) != fingerprint("1")
    assert fingerprint(True) != fingerprint(1)
    assert fingerprint([1, 2]) != fingerprint((1, 2))
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])


def test_order_insensitive_where_python_is():
    """Sets have no order a program can rely on; dicts keep insertion order (``list(d)``
    depends on it), so since format 2 their order counts (SPEC §3)."""
    assert fingerprint({"a": 1, "b": 2}) != fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1, "b": 2}) == fingerprint(dict([("a", 1), ("b", 2)]))
    assert fingerprint({1, 2, 3}) == fingerprint({3, 2, 1})


def test_dataframes_by_content_index_and_dtypes():
    df = pd.DataFrame({"text": ["x", "y"], "n": [1, 2]})
    assert fingerprint(df) == fingerprint(df.copy())
    assert fingerprint(df) != fingerprint(df.set_axis([5, 6]))
    assert fingerprint(df) != fingerprint(df.astype({"n": "float64"}))
    assert fingerprint(df) != fingerprint(df.astype({"text": object}))
    assert fingerprint(df) != fingerprint(df.rename(columns={"n": "m"}))
    changed = df.copy()
    changed.loc[1, "text"] = "z"
    assert fingerprint(df) != fingerprint(changed)
    with_none = pd.DataFrame({"o": ["a", None, 3]}, dtype=object)
    assert fingerprint(with_none) == fingerprint(with_none.copy())
    cat = df.astype({"text": "category"})
    assert fingerprint(cat) == fingerprint(cat.copy()) != fingerprint(df)
    nullable = pd.DataFrame({"n": pd.array([1, None, 3], dtype="Int64")})
    assert fingerprint(nullable) != fingerprint(pd.DataFrame({"n": pd.array([1, 2, 3], dtype="Int64")}))


def test_sliced_strings_hash_like_their_copy():
    s = pd.Series(["alpha", "beta", "gamma", "delta"])
    assert fingerprint(s.iloc[1:3].reset_index(drop=True)) == fingerprint(pd.Series(["beta", "gamma"]))


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert fingerprint(t) == fingerprint(t.clone())
    assert fingerprint(t) != fingerprint(t.to(torch.float64))
    assert fingerprint(t) != fingerprint(t.T.contiguous())
    assert fingerprint(torch.ones(2, dtype=torch.bfloat16)) != fingerprint(torch.ones(2, dtype=torch.float16))


def test_functions_by_code_and_globals():
    ns: dict = {"scale": 2}
    exec("def f(x):\n    # a comment\n    return x * scale\n", ns)
    first = fingerprint(ns["f"])
    exec("def f(x):\n    return x * scale\n", ns)
    assert fingerprint(ns["f"]) == first, "comments do not count"
    ns["scale"] = 3
    assert fingerprint(ns["f"]) != first, "a global it uses changed"
    exec("def f(x):\n    return x * scale + 1\n", ns)
    assert fingerprint(ns["f"]) != first


def test_recursive_function_and_cycles():
    ns: dict = {}
    exec("def fact(n):\n    return 1 if n < 2 else n * fact(n - 1)\n", ns)
    assert fingerprint(ns["fact"]) == fingerprint(ns["fact"])
    loop: list = [1]
    loop.append(loop)
    assert fingerprint(loop) == fingerprint(loop)


def test_modules_by_name_and_version():
    import json

    assert fingerprint(np) != fingerprint(json)
    assert fingerprint(np) == fingerprint(np)


def test_unfingerprintable_is_an_error_not_a_random_key():
    import threading

    with pytest.raises(FingerprintError, match="lock"):
        fingerprint(threading.Lock())
    with pytest.raises(FingerprintError):
        fingerprint((i for i in range(3)))


def test_custom_hook():
    class Client:
        def __init__(self, url):
            self.url = url
            self.session = __import__("threading").Lock()

        def __dreamer_fingerprint__(self):
            return self.url

    assert fingerprint(Client("a")) == fingerprint(Client("a")) != fingerprint(Client("b"))


def test_plain_objects_and_dataclasses():
    from dataclasses import dataclass
    from fractions import Fraction

    @dataclass
    class Cfg:
        lr: float
        tags: set

    assert fingerprint(Cfg(0.1, {"a", "b"})) == fingerprint(Cfg(0.1, {"b", "a"}))
    assert fingerprint(Cfg(0.1, set())) != fingerprint(Cfg(0.2, set()))
    assert fingerprint(Fraction(1, 3)) == fingerprint(Fraction(2, 6)) != fingerprint(Fraction(1, 2))


def test_datasets_by_their_fingerprint_and_lineage():
    import datasets

    from dreamer_magic.fingerprint import LINEAGE

    ds = datasets.Dataset.from_dict({"a": [1, 2, 3]})
    assert fingerprint(ds) == fingerprint(ds)
    mapped = ds.map(lambda r: {"a": r["a"] + 1})
    assert fingerprint(mapped) != fingerprint(ds)
    LINEAGE.set(ds, "step-abc")
    assert fingerprint(ds) != fingerprint(mapped)
    assert fingerprint(ds) == fingerprint(ds)


def test_normalise_source_ignores_comments_and_blank_lines():
    assert normalise_source("x = 1\n\n# hi\ny = x  # there\n") == normalise_source("x = 1\ny = x")
    assert normalise_source("x = 1") != normalise_source("x = 2")


def test_normalise_source_is_a_fixed_canonical_form():
    """The text itself is pinned: no field a newer Python adds empty, no positions, JSON strings."""
    from dreamer_magic.fingerprint import canonical_ast

    assert normalise_source("def f(a, *, k=None, j):\n    return a[1:]\n") == (
        'Module(body=[FunctionDef(args=arguments(args=[arg(arg="a")],kw_defaults=[Constant(),None],'
        'kwonlyargs=[arg(arg="k"),arg(arg="j")]),'
        'body=[Return(value=Subscript(ctx=Load(),slice=Slice(lower=Constant(value=1)),value=Name(ctx=Load(),id="a")))],'
        'name="f")])'
    )
    assert canonical_ast(__import__("ast").parse("'\u00e9' + x", mode="eval")) == (
        'Expression(body=BinOp(left=Constant(value="\\u00e9"),op=Add(),right=Name(ctx=Load(),id="x")))'
    )
    assert normalise_source("x = None") != normalise_source("x = 'None'") != normalise_source("x = ...")
    assert normalise_source("x = 1") != normalise_source("x = 1.0") != normalise_source("x = True")
    assert normalise_source("x = b'a'") != normalise_source("x = 'a'")


def test_normalise_source_ignores_what_python_versions_print_differently():
    assert normalise_source("s = u'x'") == normalise_source("s = 'x'"), "the u prefix means nothing"
    assert normalise_source("s = f'a' f'b{x}' f''") == normalise_source("s = f'ab{x}'"), "f-string parts joined"
    assert normalise_source("s = f'{x:}'") == normalise_source("s = f'{x:}'")
    assert normalise_source("s = f'{x!r}'") != normalise_source("s = f'{x}'")
    assert normalise_source("s = f'{x=}'") != normalise_source("s = f'{x}'")
    assert normalise_source("s = f'{x:>{w}}'") != normalise_source("s = f'{x:>w}'")


def test_normalise_source_of_deep_code_and_big_literals():
    chain = "x = " + " + ".join(["a"] * 900)  # deeper than the recursion limit allows ast.dump
    assert normalise_source(chain) != normalise_source(chain + " + a")
    assert normalise_source("x = 0x" + "f" * 4000).count("0x") == 1, "beyond 13,000 bits: hex, no str() limit"
    assert normalise_source("!ls -l  # shell\n") == "!ls -l  # shell", "IPython syntax: the lines themselves"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_deterministic_for_any_json_value(value):
    import copy

    assert fingerprint(value) == fingerprint(copy.deepcopy(value))


def test_models_tokenizers_and_optimizers_by_what_they_compute(tmp_path):
    import torch
    from _tiny import tiny_gpt2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dreamer_magic.fingerprint import model_fingerprint

    model, tok = tiny_gpt2()
    model.eval()
    first = fingerprint(model)
    without_mode = model_fingerprint(model, mode=False)
    model.train()
    assert model_fingerprint(model, mode=False) == without_mode, "train/eval mode left out (the generation cache)"
    assert fingerprint(model) != first, "train/eval mode counts for steps (SPEC §3)"
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert fingerprint(reloaded) == first, "reloaded (in eval mode): same fingerprint as in eval mode"
    assert model_fingerprint(reloaded, mode=False) == without_mode, "reloaded: same fingerprint, mode left out"
    assert fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fingerprint(tok)
    tok(["a", "bb"], padding=True, truncation=True)  # switches per-call settings on
    assert fingerprint(AutoTokenizer.from_pretrained(tmp_path)) == fingerprint(tok)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert fingerprint(model.eval()) != first, "weights changed in place"
    assert fingerprint(torch.float16) != fingerprint(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt_fp = fingerprint(opt)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    assert fingerprint(opt) == opt_fp, "running state does not count"
    assert fingerprint(torch.optim.AdamW(model.parameters(), lr=2e-3)) != opt_fp


def test_a_model_trained_through_data_is_seen_to_change():
    """Updates through ``.data`` do not bump version counters; the memo must notice anyway."""
    from _tiny import tiny_gpt2

    model, _ = tiny_gpt2()
    first = fingerprint(model)
    for p in model.parameters():
        p.data.add_(0.01)
    assert fingerprint(model) != first


def test_datetimes_and_timedeltas():
    dates = pd.DataFrame({"t": pd.to_datetime(["2020-01-01", "2021-06-30"]), "d": pd.to_timedelta([1, 2], unit="h")})
    assert fingerprint(dates) == fingerprint(dates.copy())
    later = dates.copy()
    later.loc[1, "t"] = pd.Timestamp("2022-01-01")
    assert fingerprint(dates) != fingerprint(later)
    days = np.array(["2020-01-01"], dtype="datetime64[D]")
    assert fingerprint(days) != fingerprint(days.astype("datetime64[s]"))


def test_bound_builtins_classes_and_odd_dict_keys():
    import re

    assert fingerprint(re.compile(r"\s+").sub) != fingerprint(re.compile("x").sub)
    assert fingerprint({"a": 1}.get) != fingerprint({"a": 2}.get)

    class Key:
        pass

    # keys that fingerprint alike are told apart by position: deterministic, and the order counts
    assert fingerprint({Key(): 1, Key(): 2}) == fingerprint({Key(): 1, Key(): 2})
    assert fingerprint({Key(): 1, Key(): 2}) != fingerprint({Key(): 2, Key(): 1})


def test_a_dataset_changed_in_place_loses_its_lineage():
    import datasets

    from dreamer_magic.fingerprint import LINEAGE

    ds = datasets.Dataset.from_dict({"a": [1, 2, 3]})
    LINEAGE.set(ds, "from-a-step")
    before = fingerprint(ds)
    ds.set_format("numpy", columns=["a"])
    assert fingerprint(ds) != before


def test_tokenizer_settings_that_change_its_output_are_seen():
    from _tiny import tiny_gpt2

    _, tok = tiny_gpt2()
    first = fingerprint(tok)
    tok.padding_side = "left"
    assert fingerprint(tok) != first
