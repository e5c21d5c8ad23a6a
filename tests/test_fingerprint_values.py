"""Values that crashed or silently collided before format 2, each checked two ways.

- Determinism: every value in :data:`CASES` fingerprints alike in another process that runs
  with another ``PYTHONHASHSEED`` (one subprocess for all of them, one test per value).
- Sensitivity: what the value holds counts; a changed value, state or flag changes the
  fingerprint, and an RNG's fingerprint changes when something draws from it.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import fractions
import json
import os
import pathlib
import random
import subprocess
import sys
import textwrap
import uuid
import zoneinfo
from typing import Any, Callable

import numpy as np
import pandas as pd
import pytest
import torch

from dreamer_magic.errors import FingerprintError
from dreamer_magic.fingerprint import fingerprint


def _drawn(rng: Any, draw: Callable[[Any], Any]) -> Any:
    draw(rng)
    return rng


def _spawned(seq: np.random.SeedSequence) -> np.random.SeedSequence:
    seq.spawn(2)
    return seq


# name -> a builder of one value; every builder gives the same value in every process
CASES: dict[str, Callable[[], Any]] = {
    "numpy_generator": lambda: _drawn(np.random.default_rng(3), lambda g: g.random(2)),
    "numpy_generator_mt19937": lambda: np.random.Generator(np.random.MT19937(3)),
    "numpy_pcg64": lambda: np.random.PCG64(3),
    "numpy_philox": lambda: np.random.Philox(3),
    "numpy_seed_sequence": lambda: _spawned(np.random.SeedSequence([1, 2], spawn_key=(3,), pool_size=8)),
    "numpy_random_state": lambda: _drawn(np.random.RandomState(3), lambda r: r.standard_normal()),
    "random_random": lambda: _drawn(random.Random("seed"), lambda r: r.gauss(0, 1)),
    "torch_generator": lambda: _drawn(torch.Generator().manual_seed(3), lambda g: torch.rand(2, generator=g)),
    "pandas_timestamp": lambda: pd.Timestamp("2024-03-31 02:30"),
    "pandas_timestamp_tz": lambda: pd.Timestamp("2024-03-31 03:30", tz="Europe/Paris"),
    "pandas_timedelta": lambda: pd.Timedelta("1 days 02:03:04.000005"),
    "pandas_nat": lambda: pd.NaT,
    "pandas_na": lambda: pd.NA,
    "pandas_period": lambda: pd.Period("2024-02", freq="M"),
    "pandas_interval": lambda: pd.Interval(0.5, 1.5, closed="left"),
    "pandas_categorical": lambda: pd.Categorical(["b", "a", "b"], categories=["b", "a"], ordered=True),
    "pandas_int_array": lambda: pd.array([1, None, 3], dtype="Int64"),
    "big_int": lambda: 10**5000 + 17,
    "big_negative_int": lambda: -(3**20000),
    "torch_sparse_coo": lambda: torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse(),
    "torch_sparse_csr": lambda: torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse_csr(),
    "torch_sparse_csc": lambda: torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse_csc(),
    "torch_requires_grad": lambda: torch.ones(3, requires_grad=True),
    "torch_parameter": lambda: torch.nn.Parameter(torch.ones(3)),
    "datetime_naive": lambda: datetime.datetime(2024, 3, 31, 2, 30, 0, 5),
    "datetime_zoneinfo": lambda: datetime.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")),
    "datetime_utc": lambda: datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc),
    "datetime_dateutil": lambda: datetime.datetime(2024, 1, 1, tzinfo=__import__("dateutil.tz").tz.gettz("Europe/Paris")),
    "date": lambda: datetime.date(2024, 2, 29),
    "time": lambda: datetime.time(12, 30, 1, 7, tzinfo=datetime.timezone(datetime.timedelta(hours=2))),
    "timedelta": lambda: datetime.timedelta(days=-1, seconds=5, microseconds=3),
    "decimal": lambda: decimal.Decimal("-0.00"),
    "fraction": lambda: fractions.Fraction(10**5000 + 1, 3),
    "uuid": lambda: uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "path": lambda: pathlib.Path("data") / "train.csv",
    "pure_windows_path": lambda: pathlib.PureWindowsPath("C:/data/train.csv"),
    "ordered_dict": lambda: collections.OrderedDict([("z", 1), ("a", 2)]),
    "defaultdict": lambda: collections.defaultdict(list, {"k": [1]}),
    "counter": lambda: collections.Counter("abracadabra"),
    "dict_of_sets_of_strings": lambda: {"zeta": {"x", "y", "z", "w"}, "alpha": frozenset({"p", "q", "r"})},
}


@pytest.fixture(scope="module")
def digests_in_another_process() -> dict[str, str]:
    """Every case's digest, computed in a fresh interpreter under another hash seed."""
    seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    code = textwrap.dedent(
        f"""
        import json, sys, warnings
        warnings.simplefilter("ignore")
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        from test_fingerprint_values import CASES
        from dreamer_magic.fingerprint import fingerprint
        print(json.dumps({{name: fingerprint(build()) for name, build in CASES.items()}}))
        """
    )
    env = dict(os.environ, PYTHONHASHSEED=seed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("name", sorted(CASES))
def test_same_fingerprint_in_another_process_and_hash_seed(name, digests_in_another_process):
    here = fingerprint(CASES[name]())
    assert here == fingerprint(CASES[name]()), "a second, equal value fingerprints alike"
    assert digests_in_another_process[name] == here


def test_all_cases_are_told_apart():
    digests = {name: fingerprint(build()) for name, build in CASES.items()}
    assert len(set(digests.values())) == len(digests)


# -- RNGs: by their state, so drawing changes the fingerprint ------------------------------------


def test_numpy_generator_by_bit_generator_state():
    g = np.random.default_rng(1)
    first = fingerprint(g)
    assert fingerprint(np.random.default_rng(1)) == first
    assert fingerprint(np.random.default_rng(2)) != first
    g.random()
    assert fingerprint(g) != first, "a draw moves the state"
    assert fingerprint(np.random.Generator(np.random.MT19937(1))) != fingerprint(np.random.Generator(np.random.PCG64(1)))
    assert fingerprint(np.random.Generator(np.random.PCG64(1))) != fingerprint(np.random.PCG64(1))
    spawner = np.random.default_rng(5)
    before = fingerprint(spawner)
    spawner.spawn(1)
    assert fingerprint(spawner) != before, "spawning counts: the next children differ"


def test_numpy_bit_generators_by_class_and_state():
    assert fingerprint(np.random.PCG64(1)) == fingerprint(np.random.PCG64(1))
    assert fingerprint(np.random.PCG64(1)) != fingerprint(np.random.PCG64(2))
    assert fingerprint(np.random.PCG64(1)) != fingerprint(np.random.PCG64DXSM(1))
    assert fingerprint(np.random.Philox(1)) != fingerprint(np.random.SFC64(1))
    bits = np.random.MT19937(1)
    before = fingerprint(bits)
    bits.random_raw()
    assert fingerprint(bits) != before
    jumped = np.random.PCG64(1).jumped()
    assert fingerprint(jumped) != fingerprint(np.random.PCG64(1))


def test_numpy_seed_sequence_by_entropy_key_pool_and_children():
    base = fingerprint(np.random.SeedSequence(42))
    assert fingerprint(np.random.SeedSequence(42)) == base
    assert fingerprint(np.random.SeedSequence(43)) != base
    assert fingerprint(np.random.SeedSequence([42, 0])) != base
    assert fingerprint(np.random.SeedSequence(42, spawn_key=(0,))) != base
    assert fingerprint(np.random.SeedSequence(42, pool_size=8)) != base
    seq = np.random.SeedSequence(42)
    seq.spawn(1)
    assert fingerprint(seq) != base, "n_children_spawned counts"
    child_a, child_b = np.random.SeedSequence(42).spawn(2)
    assert fingerprint(child_a) != fingerprint(child_b)


def test_numpy_random_state_by_state():
    rs = np.random.RandomState(1)
    first = fingerprint(rs)
    assert fingerprint(np.random.RandomState(1)) == first
    assert fingerprint(np.random.RandomState(2)) != first
    rs.randint(10)
    assert fingerprint(rs) != first
    # the cached second Gaussian is state too: same key, different has_gauss
    a, b = np.random.RandomState(7), np.random.RandomState(7)
    a.standard_normal()
    b.set_state(a.get_state())
    assert fingerprint(a) == fingerprint(b)
    state = list(b.get_state())
    state[3] = 0  # has_gauss: drop the cached value
    b.set_state(tuple(state))
    assert fingerprint(a) != fingerprint(b)


def test_random_random_by_getstate():
    r = random.Random(1)
    first = fingerprint(r)
    assert fingerprint(random.Random(1)) == first
    assert fingerprint(random.Random(2)) != first
    r.random()
    assert fingerprint(r) != first
    g1, g2 = random.Random(3), random.Random(3)
    g1.gauss(0, 1)
    g2.setstate(g1.getstate()[:2] + (None,))  # same stream, no cached gauss
    assert fingerprint(g1) != fingerprint(g2)
    with pytest.raises(FingerprintError, match="operating system"):
        fingerprint(random.SystemRandom())


def test_torch_generator_by_state():
    g = torch.Generator().manual_seed(1)
    first = fingerprint(g)
    assert fingerprint(torch.Generator().manual_seed(1)) == first
    assert fingerprint(torch.Generator().manual_seed(2)) != first
    torch.rand(3, generator=g)
    assert fingerprint(g) != first


# -- pandas scalars and arrays --------------------------------------------------------------------


def test_pandas_timestamps_keep_their_zone_and_unit():
    ts = pd.Timestamp("2024-01-01 12:00")
    assert fingerprint(ts) == fingerprint(pd.Timestamp(datetime.datetime(2024, 1, 1, 12)).as_unit(ts.unit))
    assert fingerprint(ts) != fingerprint(pd.Timestamp("2024-01-01 12:00:00.000001"))
    assert fingerprint(ts) != fingerprint(ts.tz_localize("UTC")), "naive and aware differ"
    paris = pd.Timestamp("2024-01-01 12:00", tz="Europe/Paris")
    assert fingerprint(paris) != fingerprint(paris.tz_convert("UTC")), "same instant, other zone"
    assert fingerprint(paris) != fingerprint(pd.Timestamp("2024-01-01 12:00", tz="Europe/Berlin"))
    assert fingerprint(paris) == fingerprint(pd.Timestamp("2024-01-01 12:00", tz="Europe/Paris"))
    assert fingerprint(ts.as_unit("ns")) != fingerprint(ts.as_unit("s")), "the unit changes what arithmetic gives"
    assert fingerprint(ts) != fingerprint(ts.to_pydatetime())


def test_pandas_timedelta_nat_and_na():
    assert fingerprint(pd.Timedelta(hours=1)) == fingerprint(pd.Timedelta(minutes=60))
    assert fingerprint(pd.Timedelta(hours=1)) != fingerprint(pd.Timedelta(hours=2))
    assert fingerprint(pd.Timedelta(hours=1)) != fingerprint(datetime.timedelta(hours=1))
    singletons = [pd.NaT, pd.NA, None, np.datetime64("NaT"), float("nan")]
    assert len({fingerprint(v) for v in singletons}) == len(singletons)
    assert fingerprint([pd.NaT, 1]) != fingerprint([pd.NA, 1])


def test_pandas_period_and_interval():
    month = pd.Period("2024-02", freq="M")
    assert fingerprint(month) == fingerprint(pd.Period("2024-02-15", freq="M"))
    assert fingerprint(month) != fingerprint(pd.Period("2024-03", freq="M"))
    assert fingerprint(month) != fingerprint(pd.Period("2024-02-01", freq="D"))
    iv = pd.Interval(0, 1)
    assert fingerprint(iv) == fingerprint(pd.Interval(0, 1, closed="right"))
    assert fingerprint(iv) != fingerprint(pd.Interval(0, 1, closed="both"))
    assert fingerprint(iv) != fingerprint(pd.Interval(0, 2))
    assert fingerprint(iv) != fingerprint(pd.Interval(0.0, 1.0)), "int and float bounds differ"


def test_pandas_categorical_by_categories_order_and_codes():
    cat = pd.Categorical(["a", "b", "a"])
    assert fingerprint(cat) == fingerprint(pd.Categorical(["a", "b", "a"]))
    assert fingerprint(cat) != fingerprint(pd.Categorical(["a", "b", "b"]))
    assert fingerprint(cat) != fingerprint(pd.Categorical(["a", "b", "a"], categories=["b", "a"]))
    assert fingerprint(cat) != fingerprint(pd.Categorical(["a", "b", "a"], ordered=True))
    assert fingerprint(cat) != fingerprint(pd.Categorical(["a", "b", "a"], categories=["a", "b", "c"]))
    assert fingerprint(cat) != fingerprint(["a", "b", "a"])
    ints = pd.array([1, None, 3], dtype="Int64")
    assert fingerprint(ints) != fingerprint(pd.array([1, 2, 3], dtype="Int64"))
    assert fingerprint(ints) != fingerprint(pd.array([1, None, 3], dtype="Float64"))


# -- numbers, times, paths --------------------------------------------------------------------------


def test_ints_beyond_the_str_digit_limit():
    big = 10**5000
    assert fingerprint(big) == fingerprint(10**5000)
    assert fingerprint(big) != fingerprint(big + 1)
    assert fingerprint(big) != fingerprint(-big)
    assert fingerprint([big, 1]) != fingerprint([1, big])
    edges = [0, -1, 1, 127, 128, -128, 255, 256, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, -(2**64)]
    assert len({fingerprint(n) for n in edges}) == len(edges)
    assert fingerprint(2**63) != fingerprint(2**63 - 1)


def test_datetimes_exact_with_zone_and_fold():
    naive = datetime.datetime(2024, 10, 27, 2, 30)
    assert fingerprint(naive) == fingerprint(datetime.datetime(2024, 10, 27, 2, 30))
    assert fingerprint(naive) != fingerprint(naive.replace(microsecond=1))
    assert fingerprint(naive) != fingerprint(naive.replace(fold=1)), "fold picks one of two wall times"
    paris = zoneinfo.ZoneInfo("Europe/Paris")
    assert fingerprint(naive) != fingerprint(naive.replace(tzinfo=paris))
    assert fingerprint(naive.replace(tzinfo=paris)) != fingerprint(naive.replace(tzinfo=zoneinfo.ZoneInfo("Europe/Berlin")))
    plus_one = datetime.timezone(datetime.timedelta(hours=1))
    assert fingerprint(naive.replace(tzinfo=plus_one)) != fingerprint(naive.replace(tzinfo=paris))
    assert fingerprint(naive.replace(tzinfo=plus_one)) != fingerprint(
        naive.replace(tzinfo=datetime.timezone(datetime.timedelta(hours=1), "CET"))
    ), "the zone's name prints"
    assert fingerprint(naive) != fingerprint(naive.date())
    assert fingerprint(datetime.date(2024, 1, 1)) != fingerprint(datetime.date(2024, 1, 2))
    assert fingerprint(datetime.time(1, 2)) != fingerprint(datetime.time(1, 2, tzinfo=datetime.timezone.utc))
    assert fingerprint(datetime.timedelta(seconds=1)) != fingerprint(datetime.timedelta(microseconds=1))


def test_decimal_fraction_uuid_exact():
    assert fingerprint(decimal.Decimal("1.0")) != fingerprint(decimal.Decimal("1.00")), "they print differently"
    assert fingerprint(decimal.Decimal("0")) != fingerprint(decimal.Decimal("-0"))
    assert fingerprint(decimal.Decimal("NaN")) != fingerprint(decimal.Decimal("sNaN"))
    assert fingerprint(decimal.Decimal("1.5")) == fingerprint(decimal.Decimal("1.5"))
    huge = fractions.Fraction(10**5000 + 1, 7)
    assert fingerprint(huge) == fingerprint(fractions.Fraction(10**5000 + 1, 7))
    assert fingerprint(huge) != fingerprint(fractions.Fraction(10**5000 + 2, 7))
    assert fingerprint(fractions.Fraction(1, 3)) != fingerprint(fractions.Fraction(3, 1))
    u = uuid.UUID(int=1)
    assert fingerprint(u) == fingerprint(uuid.UUID(int=1)) != fingerprint(uuid.UUID(int=2))
    assert fingerprint(u) != fingerprint(u.int)


def test_paths_by_flavour_and_text():
    p = pathlib.Path("data/train.csv")
    assert fingerprint(p) == fingerprint(pathlib.Path("data") / "train.csv")
    assert fingerprint(p) != fingerprint(pathlib.Path("data/test.csv"))
    assert fingerprint(p) != fingerprint(pathlib.PurePosixPath("data/train.csv")), "a pure path cannot open"
    assert fingerprint(pathlib.PurePosixPath("a/b")) != fingerprint(pathlib.PureWindowsPath("a/b"))
    assert fingerprint(p) != fingerprint("data/train.csv")


# -- order and flags ----------------------------------------------------------------------------


def test_dict_insertion_order_counts_set_order_does_not():
    assert fingerprint({"a": 1, "b": 2}) != fingerprint({"b": 2, "a": 1})
    labels = {"cat": 0, "dog": 1}
    assert fingerprint(labels) == fingerprint(dict(labels))
    assert fingerprint(collections.OrderedDict(a=1, b=2)) != fingerprint(collections.OrderedDict(b=2, a=1))
    assert fingerprint(collections.OrderedDict(a=1)) != fingerprint({"a": 1}), "move_to_end and == differ"
    assert fingerprint({"s": {"x", "y", "z"}}) == fingerprint({"s": {"z", "y", "x"}})
    assert fingerprint(frozenset(["a", "b"])) == fingerprint(frozenset(["b", "a"]))
    assert fingerprint({1: "a", 2: "b"}) != fingerprint({2: "b", 1: "a"})
    assert fingerprint(collections.Counter("ab")) != fingerprint(collections.Counter("ba"))


def test_defaultdict_factory_counts():
    base = collections.defaultdict(list, {"a": [1]})
    assert fingerprint(base) == fingerprint(collections.defaultdict(list, {"a": [1]}))
    assert fingerprint(base) != fingerprint(collections.defaultdict(set, {"a": [1]}))
    assert fingerprint(base) != fingerprint(collections.defaultdict(None, {"a": [1]}))
    assert fingerprint(base) != fingerprint({"a": [1]})
    assert fingerprint(collections.defaultdict(int)) != fingerprint(collections.defaultdict(float))


def test_tensor_requires_grad_and_class_count():
    t = torch.ones(3)
    assert fingerprint(t) != fingerprint(t.clone().requires_grad_())
    assert fingerprint(t.clone().requires_grad_()) == fingerprint(torch.ones(3, requires_grad=True))
    assert fingerprint(t) != fingerprint(torch.nn.Parameter(torch.ones(3), requires_grad=False)), "a Parameter registers"
    assert fingerprint(torch.tensor([1 + 2j])) != fingerprint(torch.tensor([1 + 2j]).conj()), "conjugate views resolved"
    assert fingerprint(torch.tensor([1 + 2j]).conj()) == fingerprint(torch.tensor([1 - 2j]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_device_counts():
    cpu = torch.arange(4.0)
    gpu = cpu.to("cuda")
    assert fingerprint(gpu) == fingerprint(cpu.to("cuda"))
    assert fingerprint(gpu) != fingerprint(cpu)
    assert fingerprint(gpu.to_sparse()) != fingerprint(cpu.to_sparse())
    generator = torch.Generator("cuda").manual_seed(1)
    assert fingerprint(generator) != fingerprint(torch.Generator().manual_seed(1))


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_sparse_tensors_by_layout_indices_values_and_shape():
    dense = torch.tensor([[0.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    for convert in (torch.Tensor.to_sparse, torch.Tensor.to_sparse_csr, torch.Tensor.to_sparse_csc):
        sparse = convert(dense)
        assert fingerprint(sparse) == fingerprint(convert(dense.clone()))
        assert fingerprint(sparse) != fingerprint(dense)
        moved = torch.tensor([[2.0, 0.0, 0.0], [3.0, 0.0, 0.0]])  # same values, other places
        assert fingerprint(sparse) != fingerprint(convert(moved))
        assert fingerprint(sparse) != fingerprint(convert(dense * 2))
        wider = torch.cat([dense, torch.zeros(2, 1)], dim=1)  # same entries, other shape
        assert fingerprint(sparse) != fingerprint(convert(wider))
    layouts = [dense.to_sparse(), dense.to_sparse_csr(), dense.to_sparse_csc(), dense.to_sparse_bsr((1, 1))]
    assert len({fingerprint(t) for t in layouts}) == len(layouts)
    coo = torch.sparse_coo_tensor([[0, 0], [1, 1]], [1.0, 1.0], (2, 3))  # a duplicate entry
    assert fingerprint(coo) == fingerprint(torch.sparse_coo_tensor([[0, 0], [1, 1]], [1.0, 1.0], (2, 3)))
    assert fingerprint(coo) != fingerprint(torch.sparse_coo_tensor([[0], [1]], [2.0], (2, 3)).coalesce())
    assert fingerprint(coo.coalesce()) == fingerprint(torch.sparse_coo_tensor([[0], [1]], [2.0], (2, 3)).coalesce())
