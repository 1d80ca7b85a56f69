"""Token buckets (gateway.buckets): both implementations, same decisions, same state.

Every test that takes the ``impl`` fixture runs against the pure-Python module
and the native one; the parity tests drive both side by side with one fake
clock.  A missing native module is skipped, unless
FAIRGATE_REQUIRE_EXTENSIONS=1, where it fails.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import _buckets_py, buckets
from gateway._buckets_verdict import MIN_CAPACITY, Verdict
from tests.support import load_native, require_native

C_MODULE, C_IMPORT_ERROR = load_native("_buckets_c")
SECOND = 1_000_000_000
T0 = 1_000 * SECOND


def _native() -> ModuleType:
    module: ModuleType = require_native(C_MODULE, C_IMPORT_ERROR, "_buckets_c")
    return module


@pytest.fixture(scope="module", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "py":
        return _buckets_py
    return _native()


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return _buckets_py, _native()


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * SECOND)


def make(impl: ModuleType, clock: FakeClock, capacity_hint: int = 1024) -> Any:
    return impl.BucketTable(clock=clock, capacity_hint=capacity_hint)


# -- exact semantics ---------------------------------------------------------------------


def test_burst_then_refill(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    verdicts = [table.acquire(["k"], [5.0], [10]) for _ in range(10)]
    assert all(v.allowed for v in verdicts)
    assert [v.remaining for v in verdicts] == list(range(9, -1, -1))
    assert verdicts[-1].reset == pytest.approx(2.0)
    refused = table.acquire(["k"], [5.0], [10])
    assert refused == Verdict(False, 0, 2.0, 0.2, 0)
    clock.advance(0.2)
    assert table.acquire(["k"], [5.0], [10]).allowed
    assert not table.acquire(["k"], [5.0], [10]).allowed
    clock.advance(0.199999999)
    assert not table.acquire(["k"], [5.0], [10]).allowed
    clock.now += 1
    assert table.acquire(["k"], [5.0], [10]).allowed


def test_verdict_type_and_fields(impl: ModuleType) -> None:
    table = make(impl, FakeClock())
    verdict = table.acquire(["k"], [5], [10])
    assert type(verdict) is Verdict
    assert verdict == (True, 9, 0.2, 0.0, 0)
    assert verdict.allowed is True
    assert type(verdict.remaining) is int
    assert type(verdict.reset) is float and type(verdict.retry_after) is float
    assert buckets.Verdict is Verdict and impl.Verdict is Verdict
    assert pickle.loads(pickle.dumps(verdict)) == verdict
    assert verdict._replace(allowed=False) == (False, 9, 0.2, 0.0, 0)
    assert verdict._asdict()["tightest"] == 0


def test_cost_weighted(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    assert table.acquire(["k"], [5.0], [10], 3) == Verdict(True, 7, 0.6, 0.0, 0)
    assert table.acquire(["k"], [5.0], [10], 3).remaining == 4
    assert table.acquire(["k"], [5.0], [10], 3).remaining == 1
    refused = table.acquire(["k"], [5.0], [10], 3)
    assert not refused.allowed
    assert refused.remaining == 1
    assert refused.retry_after == pytest.approx(0.4)  # two more tokens at 5/s
    assert table.peek("k", 5.0, 10) == (1, pytest.approx(1.8))
    assert table.acquire(["k"], [5.0], [10], 1).remaining == 0


def test_cost_above_burst_never_allowed(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    verdict = table.acquire(["a", "b"], [5.0, 1.0], [10, 3], 4)
    assert verdict == Verdict(False, 3, 0.0, math.inf, 1)
    assert len(table) == 0
    assert table.peek("a", 5.0, 10) == (10, 0.0)
    # A bucket that can never allow beats any finite retry.
    table.acquire(["a"], [5.0], [10], 10)
    verdict = table.acquire(["a", "b"], [5.0, 1.0], [10, 3], 4)
    assert verdict.retry_after == math.inf and verdict.tightest == 1


def test_cost_zero_is_a_peek(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    assert table.acquire(["k"], [5.0], [10], 0) == Verdict(True, 10, 0.0, 0.0, 0)
    assert len(table) == 0
    for _ in range(10):
        table.acquire(["k"], [5.0], [10])
    assert table.acquire(["k"], [5.0], [10], 0) == Verdict(True, 0, 2.0, 0.0, 0)
    assert table.peek("k", 5.0, 10) == (0, 2.0)


def test_all_or_nothing(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    keys = ["tenant", "user", "route"]
    rates = [100.0, 5.0, 1.0]
    bursts = [100, 10, 2]
    assert table.acquire(keys, rates, bursts) == Verdict(True, 1, 1.0, 0.0, 2)
    assert table.acquire(keys, rates, bursts) == Verdict(True, 0, 2.0, 0.0, 2)
    before = [table.peek(k, r, b) for k, r, b in zip(keys, rates, bursts, strict=True)]
    refused = table.acquire(keys, rates, bursts)
    assert refused == Verdict(False, 0, 2.0, 1.0, 2)
    after = [table.peek(k, r, b) for k, r, b in zip(keys, rates, bursts, strict=True)]
    assert after == before == [(98, 0.02), (8, 0.4), (0, 2.0)]
    # The tightest bucket among allowed ones is the one with the least left (first on ties).
    assert table.acquire(["x", "y"], [1.0, 1.0], [5, 5]).tightest == 0
    assert table.acquire(["p", "q"], [1.0, 1.0], [5, 3]).tightest == 1


def test_refusal_reports_the_slowest_bucket(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    table.acquire(["a", "b", "c"], [10.0, 1.0, 2.0], [1, 1, 1])
    verdict = table.acquire(["a", "b", "c"], [10.0, 1.0, 2.0], [1, 1, 1])
    assert verdict == Verdict(False, 0, 1.0, 1.0, 1)
    clock.advance(0.5)
    verdict = table.acquire(["a", "b", "c"], [10.0, 1.0, 2.0], [1, 1, 1])
    assert verdict == Verdict(False, 0, 0.5, 0.5, 1)
    # Ties: the first refusing bucket.
    table.acquire(["d", "e"], [1.0, 1.0], [1, 1])
    assert table.acquire(["d", "e"], [1.0, 1.0], [1, 1]).tightest == 0


@pytest.mark.parametrize(
    ("rate", "burst", "cost", "spent"),
    [(5.0, 10, 1, 10), (5.0, 10, 3, 9), (3.0, 7, 2, 6), (0.5, 1, 1, 1), (1e6 / 3, 50, 7, 49)],
)
def test_retry_after_is_exact(
    impl: ModuleType, rate: float, burst: int, cost: int, spent: int
) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    assert table.acquire(["a", "b"], [rate, 0.001], [burst, 1000], spent).allowed
    refused = table.acquire(["a", "b"], [rate, 0.001], [burst, 1000], cost)
    assert not refused.allowed and refused.tightest == 0
    wait = round(refused.retry_after * SECOND)
    assert wait > 0
    start = clock.now
    clock.now = start + wait - 1
    assert not table.acquire(["a", "b"], [rate, 0.001], [burst, 1000], cost).allowed
    assert table.acquire(["b"], [0.001], [1000], 0).remaining == 1000 - spent
    clock.now = start + wait
    assert table.acquire(["a", "b"], [rate, 0.001], [burst, 1000], cost).allowed


def test_remaining_and_reset_agree_with_peek(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    for step in range(30):
        verdict = table.acquire(["k"], [7.0], [12], step % 3)
        assert (verdict.remaining, verdict.reset) == table.peek("k", 7.0, 12)
        clock.advance(0.05)


def test_integer_nanoseconds(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    # 1e9 / 3 = 333333333.33 -> an interval of 333333333 ns, the tolerance 3x that.
    for _ in range(3):
        assert table.acquire(["k"], [3.0], [3]).allowed
    refused = table.acquire(["k"], [3.0], [3])
    assert refused.retry_after == 333333333 / 1e9
    assert refused.reset == 999999999 / 1e9


def test_full_idle_buckets_are_evicted(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock)
    for i in range(50):
        table.acquire([f"k{i}", "shared"], [5.0, 1000.0], [10, 1000])
    assert len(table) == 51
    assert table.evict() == 0
    clock.advance(0.2)  # the k buckets are full again; "shared" (0.05 s) too
    assert table.evict() == 51
    assert len(table) == 0
    assert table.peek("k0", 5.0, 10) == (10, 0.0)
    table.acquire(["x"], [1.0], [1])
    table.clear()
    assert len(table) == 0 and table.peek("x", 1.0, 1) == (1, 0.0)


def test_memory_bounded_under_key_churn(impl: ModuleType) -> None:
    clock = FakeClock()
    table = make(impl, clock, capacity_hint=0)
    peak = 0
    for i in range(100_000):
        assert table.acquire([f"client-{i}"], [5.0], [10]).allowed
        clock.now += 1_000_000  # 1 ms: about 200 buckets are not yet full
        peak = max(peak, len(table))
    assert peak <= 512
    assert table.capacity <= 1024
    clock.advance(1.0)
    table.evict()
    assert len(table) == 0
    assert table.capacity == MIN_CAPACITY


def test_grows_when_keys_stay_active(impl: ModuleType) -> None:
    table = make(impl, FakeClock(), capacity_hint=0)
    for i in range(5000):
        table.acquire([f"k{i}"], [1.0], [10])
    assert len(table) == 5000
    assert table.capacity == 16384
    assert all(table.peek(f"k{i}", 1.0, 10) == (9, 1.0) for i in range(0, 5000, 7))
    table.clear()
    assert table.capacity == MIN_CAPACITY


class CollidingKey(str):
    def __hash__(self) -> int:
        return 42


def test_hash_collision_merges_buckets(impl: ModuleType) -> None:
    table = make(impl, FakeClock())
    table.acquire([CollidingKey("a")], [1.0], [2])
    assert table.peek(CollidingKey("b"), 1.0, 2) == (1, 1.0)
    with pytest.raises(ValueError, match="duplicate key"):
        table.acquire([CollidingKey("a"), CollidingKey("b")], [1.0, 1.0], [2, 2])


def test_default_clock(impl: ModuleType) -> None:
    table = impl.BucketTable()
    verdict = table.acquire(["k"], [1.0], [2])
    assert verdict[:2] == (True, 1) and verdict[3:] == (0.0, 0)
    assert 0.9 < verdict.reset <= 1.0
    assert table.peek("k", 1.0, 2)[0] == 1
    assert len(table) == 1
    assert table.capacity == 2048


BAD_CALLS: list[tuple[tuple[Any, ...], type[Exception], str]] = [
    (([], [], []), ValueError, "1 to 16 keys"),
    (([str(i) for i in range(17)], [1.0] * 17, [1] * 17), ValueError, "1 to 16 keys"),
    ((["a"], [1.0, 2.0], [1]), ValueError, "same length"),
    ((["a"], [1.0], [1, 2]), ValueError, "same length"),
    ((["a"], [1.0], [1], -1), ValueError, "cost must be"),
    ((["a"], [1.0], [1], 2**61 + 1), ValueError, "cost must be"),
    ((["a"], [1.0], [1], 10**30), ValueError, "cost must be"),
    ((["a"], [1.0], [1], 1.0), TypeError, "cannot be interpreted as an integer"),
    (([b"a"], [1.0], [1]), TypeError, "keys must be str"),
    ((["a", "b", "a"], [1.0] * 3, [1] * 3), ValueError, "duplicate key"),
    ((["a"], [0.0], [1]), ValueError, "rate must be > 0"),
    ((["a"], [-1.0], [1]), ValueError, "rate must be > 0"),
    ((["a"], [math.nan], [1]), ValueError, "rate must be > 0"),
    ((["a"], [math.inf], [1]), ValueError, "rate must be > 0"),
    ((["a"], [2e9], [1]), ValueError, "rate must be > 0"),
    ((["a"], ["5"], [1]), TypeError, "rate must be a real number"),
    ((["a"], [None], [1]), TypeError, r"float\(\) argument"),
    ((["a"], [1.0], [0]), ValueError, "burst must be >= 1"),
    ((["a"], [1.0], [-(2**70)]), ValueError, "burst must be >= 1"),
    ((["a"], [1.0], [2.0]), TypeError, "cannot be interpreted as an integer"),
    ((["a"], [1.0], [2**62]), ValueError, "at most 2\\*\\*61 ns"),
    ((["a"], [1.0], [10**40]), ValueError, "at most 2\\*\\*61 ns"),
    ((["a"], [1e-300], [1]), ValueError, "at most 2\\*\\*61 ns"),
    ((["a"], [1e-9], [3]), ValueError, "at most 2\\*\\*61 ns"),
]


@pytest.mark.parametrize(("args", "error", "message"), BAD_CALLS)
def test_bad_arguments(
    both: tuple[ModuleType, ModuleType], args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    raised: list[tuple[type[BaseException], str]] = []
    for mod in both:
        table = make(mod, FakeClock())
        with pytest.raises(error, match=message) as info:
            table.acquire(*args)
        raised.append((type(info.value), str(info.value)))
        assert len(table) == 0
    assert raised[0] == raised[1]


def test_bad_clock_and_constructor(both: tuple[ModuleType, ModuleType]) -> None:
    for mod in both:
        for value in (-1, 2**61, 2**64):
            table = mod.BucketTable(clock=lambda v=value: v)
            with pytest.raises(ValueError, match=r"clock must return nanoseconds"):
                table.acquire(["a"], [1.0], [1])
            with pytest.raises(ValueError, match=r"clock must return nanoseconds"):
                table.peek("a", 1.0, 1)
        with pytest.raises(TypeError, match="integer"):
            mod.BucketTable(clock=lambda: 1.5).evict()
        with pytest.raises(TypeError, match="clock must be callable"):
            mod.BucketTable(clock=5)
        with pytest.raises(ValueError, match="capacity_hint"):
            mod.BucketTable(capacity_hint=-1)
        with pytest.raises(TypeError, match="keys must be str"):
            mod.BucketTable().peek(1, 1.0, 1)
        # Lenient but equal conversions: int rates, bool/int-like bursts.
        table = mod.BucketTable(clock=FakeClock())
        assert table.acquire(("a",), (2,), (True,)) == Verdict(True, 0, 0.5, 0.0, 0)


def test_bounds_are_exact_at_the_edges(both: tuple[ModuleType, ModuleType]) -> None:
    results = []
    for mod in both:
        clock = FakeClock(2**61 - 1)
        table = mod.BucketTable(clock=clock)
        out = [
            table.acquire(["a"], [1e9], [2**61], 2**61),
            table.acquire(["a"], [1e9], [2**61], 2**61),
            table.acquire(["b"], [0.5], [2**30], 2**30),
            table.peek("b", 0.5, 2**30),
            table.acquire(["c"], [1e9 / 7], [3]),  # 1e9 / (1e9 / 7) is not exactly 7
        ]
        results.append(out)
    assert results[0] == results[1]
    assert results[0][0].allowed and not results[0][1].allowed


# -- the selector ------------------------------------------------------------------------


def _selected(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("FAIRGATE_NO_EXTENSIONS", None)
    if env_value is not None:
        env["FAIRGATE_NO_EXTENSIONS"] = env_value
    root = Path(__file__).resolve().parents[1]
    code = (
        "from gateway import buckets; print(buckets.IMPLEMENTATION, buckets.BucketTable.__module__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def test_selector_honours_no_extensions() -> None:
    assert _selected("1") == "py gateway._buckets_py"
    expected = "c gateway._buckets_c" if C_MODULE is not None else "py gateway._buckets_py"
    assert _selected(None) == expected
    assert _selected("0") == expected
    assert buckets.IMPLEMENTATION in {"c", "py"}


# -- parity ------------------------------------------------------------------------------

KEY_POOL = [f"key-{i}" for i in range(40)]
RATES = [0.5, 1.0, 3.0, 5.0, 100.0, 1e6 / 3]
BURSTS = [1, 2, 3, 5, 10]

Op = tuple[Any, ...]

acquire_op = st.tuples(
    st.just("acquire"),
    st.lists(st.integers(0, len(KEY_POOL) - 1), min_size=1, max_size=4, unique=True),
    st.one_of(st.just(1), st.integers(0, 5)),
)
small_step = st.one_of(st.just(0), st.integers(0, 1000), st.integers(0, 50_000_000))
large_step = st.one_of(
    st.integers(0, 3 * SECOND), st.sampled_from([SECOND // 5, SECOND // 3, SECOND, 333333333])
)
advance_op = st.tuples(
    st.just("advance"), st.one_of(small_step, small_step, small_step, large_step)
)
other_op = st.one_of(
    st.tuples(st.just("evict")),
    st.tuples(st.just("len")),
    st.tuples(st.just("peek"), st.integers(0, len(KEY_POOL) - 1)),
    st.tuples(st.just("dup"), st.integers(0, len(KEY_POOL) - 1)),
    st.tuples(st.just("clear"), st.integers(0, 9)),  # clears only on 0: rarely
)
# Mostly acquires and small clock steps, so tables fill, evict and grow.
operation = st.one_of(*[acquire_op] * 6, advance_op, advance_op, other_op)
params = st.lists(
    st.tuples(st.sampled_from(RATES), st.sampled_from(BURSTS)),
    min_size=len(KEY_POOL),
    max_size=len(KEY_POOL),
)


def run(table: Any, clock: FakeClock, op: Op, key_params: list[tuple[float, int]]) -> object:
    kind = op[0]
    try:
        if kind == "acquire":
            idx, cost = op[1], op[2]
            return table.acquire(
                [KEY_POOL[i] for i in idx],
                [key_params[i][0] for i in idx],
                [key_params[i][1] for i in idx],
                cost,
            )
        if kind == "advance":
            clock.now += op[1]
            return None
        if kind == "evict":
            return table.evict()
        if kind == "len":
            return len(table)
        if kind == "clear":
            if op[1] == 0:
                table.clear()
            return None
        if kind == "peek":
            rate, burst = key_params[op[1]]
            return table.peek(KEY_POOL[op[1]], rate, burst)
        if kind == "dup":
            key = KEY_POOL[op[1]]
            return table.acquire([key, key], [1.0, 1.0], [1, 1])
    except (ValueError, TypeError) as exc:
        return (type(exc), str(exc))
    raise AssertionError(kind)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=40, max_size=300),
    key_params=params,
    hint=st.sampled_from([0, 0, 4, 1024]),
)
def test_parity(
    both: tuple[ModuleType, ModuleType],
    ops: list[Op],
    key_params: list[tuple[float, int]],
    hint: int,
) -> None:
    py_mod, c_mod = both
    py_clock, c_clock = FakeClock(), FakeClock()
    py_table = py_mod.BucketTable(clock=py_clock, capacity_hint=hint)
    c_table = c_mod.BucketTable(clock=c_clock, capacity_hint=hint)
    for step, op in enumerate(ops):
        expected = run(py_table, py_clock, op, key_params)
        got = run(c_table, c_clock, op, key_params)
        assert got == expected, (step, op)
        assert len(c_table) == len(py_table), (step, op)
        assert c_table.capacity == py_table.capacity, (step, op)
        if isinstance(expected, Verdict):
            assert expected.remaining >= 0 and expected.reset >= 0
            assert expected.allowed == (expected.retry_after == 0.0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    pool_size=st.sampled_from([6, 40, 400]),
    hint=st.sampled_from([0, 0, 16, 1024]),
)
def test_parity_random_walks(
    both: tuple[ModuleType, ModuleType], seed: int, pool_size: int, hint: int
) -> None:
    """Long seeded walks: tables fill, evict inside acquire, grow, shrink, shift clusters."""
    rng = random.Random(seed)
    key_params = [(rng.choice(RATES), rng.choice(BURSTS)) for _ in range(pool_size)]
    pool = [f"walk-{i}" for i in range(pool_size)]
    clocks = [FakeClock(), FakeClock()]
    tables = [
        mod.BucketTable(clock=clk, capacity_hint=hint)
        for mod, clk in zip(both, clocks, strict=True)
    ]
    for step in range(1500):
        roll = rng.random()
        if roll < 0.75:
            idx = rng.sample(range(pool_size), rng.randint(1, min(4, pool_size)))
            cost = rng.choice([1, 1, 1, 0, 2, 3, 5])
            args: Op = (
                [pool[i] for i in idx],
                [key_params[i][0] for i in idx],
                [key_params[i][1] for i in idx],
                cost,
            )
            out = [t.acquire(*args) for t in tables]
        elif roll < 0.93:
            gap = rng.choice([0, rng.randint(0, 10_000_000), rng.randint(0, 2 * SECOND)])
            for clk in clocks:
                clk.now += gap
            continue
        elif roll < 0.97:
            i = rng.randrange(pool_size)
            out = [t.peek(pool[i], *key_params[i]) for t in tables]
        elif roll < 0.999:
            out = [t.evict() for t in tables]
        else:
            out = [t.clear() for t in tables]
        assert out[0] == out[1], (step, out)
        assert len(tables[0]) == len(tables[1]), step
        assert tables[0].capacity == tables[1].capacity, step
    for i in range(pool_size):
        assert tables[0].peek(pool[i], *key_params[i]) == tables[1].peek(pool[i], *key_params[i])


def test_parity_soak(both: tuple[ModuleType, ModuleType]) -> None:
    """A long random run over many keys: exercises growth, eviction and backward shifts."""
    rng = random.Random(20240501)
    pool = [f"tenant-{i}/user-{j}" for i in range(50) for j in range(40)]
    key_params = {key: (rng.choice(RATES[:4]), rng.choice(BURSTS)) for key in pool}
    clocks = [FakeClock(), FakeClock()]
    tables = [
        mod.BucketTable(clock=clk, capacity_hint=0) for mod, clk in zip(both, clocks, strict=True)
    ]
    for step in range(30_000):
        keys = rng.sample(pool, rng.randint(1, 3))
        cost = rng.randint(0, 3)
        rates = [key_params[k][0] for k in keys]
        bursts = [key_params[k][1] for k in keys]
        out = [t.acquire(keys, rates, bursts, cost) for t in tables]
        assert out[0] == out[1], step
        assert len(tables[0]) == len(tables[1]), step
        assert tables[0].capacity == tables[1].capacity, step
        if step % 5000 == 4999:
            assert tables[0].evict() == tables[1].evict()
        gap = rng.choice([0, 1_000, 1_000_000, 20_000_000])
        for clk in clocks:
            clk.now += gap
    for key in pool[::37]:
        assert tables[0].peek(key, *key_params[key]) == tables[1].peek(key, *key_params[key])
