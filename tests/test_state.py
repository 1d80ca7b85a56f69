"""Identity state and detector windows stay bounded under floods of keys."""

from __future__ import annotations

from gateway.abuse.windows import MAX_KEYS, Distinct, Events
from gateway.policy.model import Lockout
from gateway.state import MAX_COUNTERS, MemoryIdentityState, shrink


def test_shrink_frees_at_least_a_quarter() -> None:
    table = {str(i): i for i in range(1000)}
    kept = shrink(table, lambda v: True)  # nothing is dead: the oldest half goes
    assert len(kept) == 500 and "999" in kept and "0" not in kept
    kept = shrink(table, lambda v: v % 2 == 0)  # half is dead: only that goes
    assert len(kept) == 500 and "0" in kept


def test_failure_counters_are_bounded_and_blocks_still_work() -> None:
    state = MemoryIdentityState(Lockout(3, 300, 900))
    for i in range(MAX_COUNTERS * 2):
        state.record_failure(("net:203.0.113.0/24", f"sub:{i}"), 1000.0)
    assert len(state._failures) <= MAX_COUNTERS + 1
    assert state.blocked_for(("net:203.0.113.0/24",), 1000.0) > 0


def test_detector_windows_are_bounded() -> None:
    distinct, events = Distinct(), Events()
    for i in range(MAX_KEYS + 10):
        distinct.add(f"who{i}", "v", 1000.0, 60, 10)
        events.add(f"who{i}", 1000.0, 60)
    assert len(distinct._seen) <= MAX_KEYS and len(events._times) <= MAX_KEYS
    # Counting per key is unaffected.
    assert distinct.add("x", "a", 2000.0, 60, 10) == 1
    assert distinct.add("x", "b", 2001.0, 60, 10) == 2
    assert distinct.add("x", "a", 2100.0, 60, 10) == 1  # b fell out of the window
