"""Restart hits through every output type (issue 10 item 1, SPEC §3).

The rule: a value loaded from a step fingerprints exactly as it did when the step produced it,
in this kernel and the next. For each storable type, a chain of two steps (``use-T`` reads what
``make-T`` produced) is run in a fresh process (tests/_session.py), run again in the same process
(both hit), then run in a new process (a kernel restart: both hit). The value's fingerprint at
the end of each session must be the same, as must its type and repr.

The sessions are shared by all the types of one group (one process start per session, not per
type); each type is its own test case, so a failure names the type.
"""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from _session import session

HIT = ("loaded from disk", "restored from backup")

# type -> (the cell body of make-T, the name it binds that use-T reads)
PLAIN = {
    "dataframe-main": ("""
        import pandas as pd, numpy as np
        df = pd.DataFrame({"i": [1, 2, 3], "f": [0.5, np.nan, 2.0], "s": ["a", "b", None],
                           "t": pd.to_datetime(["2024-01-01", "2024-01-02", None]).tz_localize("UTC")},
                          index=pd.Index([10, 20, 30], name="id"))
        """, "df"),
    "dataframe-extension-dtypes": ("""
        import pandas as pd
        first = pd.DataFrame({"x": [1]})  # the step's main dataset; `ext` goes to Arrow IPC
        ext = pd.DataFrame({"cat": pd.Categorical(["x", "y", "x"], categories=["y", "x"], ordered=True),
                            "ni": pd.array([1, None, 3], dtype="Int64"),
                            "nb": pd.array([True, None, False], dtype="boolean"),
                            "ns": pd.array(["p", None, "q"], dtype="string")},
                           index=pd.Index(["a", "b", "c"]))
        """, "ext"),
    "dataframe-multiindex": ("""
        import pandas as pd
        mi = pd.DataFrame({"k": ["a", "a", "b"], "n": [1, 2, 1], "v": [0.1, 0.2, 0.3]}).set_index(["k", "n"])
        """, "mi"),
    "series-categorical": ("""
        import pandas as pd
        ser = pd.Series(pd.Categorical(["lo", "hi", "lo"]), index=["a", "b", "c"], name="level")
        """, "ser"),
    "series-nullable": ("""
        import pandas as pd
        nser = pd.Series([1, None, 3], dtype="Int64", name="n")
        """, "nser"),
    "ndarray": ("import numpy as np\narr = np.arange(6, dtype=np.int32).reshape(2, 3)", "arr"),
    "ndarray-float16-nan": ("import numpy as np\nfarr = np.array([[1.5, np.nan]], dtype=np.float16)", "farr"),
    "ndarray-str": ("import numpy as np\nsarr = np.array(['ab', 'c', 'été'])", "sarr"),
    "ndarray-object": ("import numpy as np\noarr = np.array(['a', 1, None, (2, 3)], dtype=object)", "oarr"),
    "tensor": ("import torch\nten = torch.arange(4, dtype=torch.float32).reshape(2, 2)", "ten"),
    "tensor-bfloat16": ("import torch\nbten = torch.ones(2, 2, dtype=torch.bfloat16)", "bten"),
    "tensor-requires-grad": ("import torch\npten = torch.zeros(3, requires_grad=True)", "pten"),
    "tensor-dict": ("import torch\ntdict = {'w': torch.ones(3), 'b': torch.zeros(1, dtype=torch.int64)}", "tdict"),
    "json-tuple": ("tup = (1, 'a', (2.5, None), [True])", "tup"),
    "json-dict-int-keys": ("jdict = {'a': [1, 2], 'b': {'c': True}, 3: 'int key', None: 0.5}", "jdict"),
    "json-floats": ("fl = [float('nan'), float('inf'), -0.0, 2**70]", "fl"),
    "json-set": ("st = {1, 2, 'x'}\nfs = frozenset([3])", "st"),
    "pickle-library-objects": ("""
        import collections, fractions, datetime
        objs = [collections.Counter("abca"), collections.defaultdict(list, {"a": [1]}),
                collections.OrderedDict([("b", 1), ("a", 2)]), fractions.Fraction(1, 3),
                datetime.date(2024, 5, 1)]
        """, "objs"),
    "pickle-notebook-class": ("""
        class Point:
            def __init__(self, x, y):
                self.x, self.y = x, y
        p = Point(1, [2, 3])
        """, "p"),
    "function-lambda": ("square = lambda x: x * x", "square"),
    "function-closure": ("""
        def make_adder(k):
            def add(x):
                return [x + k for _ in range(2)]
            return add
        add3 = make_adder(3)
        """, "add3"),
}

DATASETS_FILES = {
    "train.jsonl": "\n".join(json.dumps({"text": f"line number {i} of the training text"}) for i in range(12)),
    "test.jsonl": "\n".join(json.dumps({"text": f"held out row {i}"}) for i in range(4)),
}
# a chain whose steps read one another (the tutorial's shape), plus hand-built dicts reusing splits
DATASETS = {
    "datasetdict-load_dataset": ("""
        from datasets import load_dataset
        raw = load_dataset("json", data_files={"train": "train.jsonl", "test": "test.jsonl"})
        """, "raw"),
    "datasetdict-map": ("""
        lens = raw.map(lambda batch: {"n": [len(t) for t in batch["text"]]}, batched=True)
        """, "lens"),
    "datasetdict-by-hand": ("""
        from datasets import Dataset, DatasetDict
        hand = DatasetDict({"extra": Dataset.from_dict({"x": [1, 2]}), "train": lens["train"]})
        """, "hand"),
    "dataset-select": ('train = lens["train"].select(range(6))', "train"),
    "dataset-a-split-of-an-input": ('held_out = lens["test"]', "held_out"),
    "dataset-with-format": ("""
        from datasets import Dataset
        fmt = Dataset.from_dict({"a": [1, 2, 3]}).with_format("numpy")
        """, "fmt"),
}

TRAINED = {
    "model-saved-by-a-trainer": ("""
        from tests_helpers import tiny_gpt2, lm_dataset
        from transformers import Trainer, TrainingArguments
        model, tok = tiny_gpt2()
        args = TrainingArguments(output_dir="anything", max_steps=4, save_steps=4, logging_steps=1,
                                 per_device_train_batch_size=4, seed=1, disable_tqdm=True, use_cpu=True,
                                 report_to="none", dataloader_num_workers=0)
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(tok), processing_class=tok)
        trainer.train()
        """, "model"),
}


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower())


def chain_cells(group: dict) -> tuple[list[str], list[str]]:
    """For each type, ``make-T`` (the trainer one with %%dreamer_train) and ``use-T`` reading its value."""
    cells, names = [], []
    for kind, (body, name) in group.items():
        magic = "%%dreamer_train" if kind.startswith("model-") else "%%dreamer_step"
        cells.append(f"{magic} make-{_slug(kind)}\n" + textwrap.dedent(body).strip("\n"))
        cells.append(f"%%dreamer_step use-{_slug(kind)}\nseen_{name} = type({name}).__name__")
        names.append(name)
    return cells, names


GROUPS = {"plain": PLAIN, "datasets": DATASETS, "trained": TRAINED}


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    """Per group: (run + the same cells again in one process, then a new process), run once."""
    done: dict[str, tuple] = {}

    def get(group: str):
        if group not in done:
            folder = tmp_path_factory.mktemp(group)
            for name, text in DATASETS_FILES.items():
                (folder / name).write_text(text)
            here = Path(__file__).parent
            (folder / "tests_helpers.py").write_text(
                f"import sys\nsys.path.insert(0, {str(here)!r})\nfrom _tiny import tiny_gpt2\nfrom _run_trainer import lm_dataset\n"
            )
            cells, names = chain_cells(GROUPS[group])
            first = session(folder, cells + cells, dump=names)
            again = session(folder, cells, dump=names)
            done[group] = (first, again, len(cells))
        return done[group]

    return get


CASES = [(group, kind) for group, types in GROUPS.items() for kind in types]


@pytest.mark.parametrize(("group", "kind"), CASES, ids=[kind for _, kind in CASES])
def test_a_loaded_value_fingerprints_as_when_it_was_produced(sessions, group, kind):
    first, again, n = sessions(group)
    i = list(GROUPS[group]).index(kind)
    name = GROUPS[group][kind][1]
    assert not first.errors and not again.errors, (first.errors, again.errors)

    def state(s, at: int) -> str:
        st = s.statuses[at]
        return f"{st['name']}: {st['state']} ({' | '.join(st['reasons'] + st['notes'])})"

    make, use = 2 * i, 2 * i + 1
    assert first.statuses[make]["state"] == "ran" and first.statuses[use]["state"] == "ran", state(first, make)
    # the same kernel: the value loaded by make-T is the one use-T saw
    assert first.statuses[n + make]["state"] in HIT, state(first, n + make)
    assert first.statuses[n + use]["state"] in HIT, state(first, n + use)
    # the next kernel: both hit
    assert again.statuses[make]["state"] in HIT, state(again, make)
    assert again.statuses[use]["state"] in HIT, state(again, use)
    one, two = first.values[name], again.values[name]
    assert one["fingerprint"] == two["fingerprint"], (one, two)
    assert one["type"] == two["type"]
    # (a repr with an address, or a set of strings, whose order follows PYTHONHASHSEED, differs anyway)
    if "object at 0x" not in one["repr"] and one["type"] not in ("function", "set", "frozenset"):
        assert one["repr"] == two["repr"]
