"""Audit record sealing: native and pure-Python twins write the same bytes.

Hypothesis feeds ``gateway._records_py.RecordSealer`` (``record_from`` +
``Chain.seal``, orjson) and the native ``gateway._records_c.RecordSealer``
the same snapshots on chains with the same head: hostile strings (quotes,
backslashes, control characters, any Unicode, lone surrogates), ints up to
and past 64 bits, every kind of float. Both must return the same line and
move the chain the same way, or both refuse with the same error and leave
it where it was. Every line must also verify (``record_hash``), so the
native bytes are the canonical JSON ``fairgate audit verify`` recomputes.
A missing native module is skipped, unless FAIRGATE_REQUIRE_EXTENSIONS=1.
"""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import _records_py, recording
from gateway.audit.chain import Chain, record_hash
from tests.support import load_native, require_native
from tests.test_audit_frames import body as record_body

C_MODULE, C_IMPORT_ERROR = load_native("_records_c")
KEY = b"k" * 32

any_text = st.one_of(
    st.text(max_size=40),
    st.text(st.sampled_from('"\\/\x00\x01\x08\t\n\x0c\r\x1f\x7f é€😀\u2028'), max_size=12),
    st.text(st.characters(codec="utf-8"), max_size=20),
)
hostile_text = any_text
maybe_text = st.one_of(st.none(), hostile_text)
ints = st.one_of(
    st.integers(0, 10**7), st.integers(-(2**63), -(2**63) + 2), st.integers(2**64 - 3, 2**64 - 1)
)
# Values orjson refuses, put in place of one fact now and then.
refused_values = st.one_of(
    any_text.map(lambda s: s + "\ud800"),  # a lone surrogate
    st.sampled_from([2**64, 2**70, -(2**63) - 1]),  # past 64 bits
    st.just(("ok", "\udfff")),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0, 1e6).map(lambda x: round(x, 3)),
    st.sampled_from([0.0, -0.0, 1e-05, 1e16, 1e15, 0.30000000000000004, 5e-324]),
)
texts = st.lists(hostile_text, max_size=3).map(tuple)
snapshots = st.tuples(
    ints,  # bytes_in
    ints,  # bytes_out
    maybe_text,  # network
    st.one_of(st.none(), st.sampled_from(["192.0.2.7", "2001:db8::1", "::ffff:192.0.2.7"])),
    st.sampled_from(["allow", "deny", "shadow_deny"]),
    st.booleans(),  # degraded
    floats,  # latency (seconds)
    hostile_text,  # method
    st.sampled_from(["enforce", "shadow"]),
    hostile_text,  # path
    maybe_text,  # plan
    hostile_text,  # policy_rev
    maybe_text,  # reason
    hostile_text,  # request_id
    texts,  # roles
    maybe_text,  # route
    maybe_text,  # rule
    maybe_text,  # session
    texts,  # signals
    st.integers(0, 599),  # status
    maybe_text,  # subject
    maybe_text,  # tenant
    st.floats(0, 4e9),  # ts
    maybe_text,  # upstream
    st.one_of(st.none(), st.integers(100, 599)),  # upstream_status
)
heads = st.tuples(
    st.text(st.characters(codec="ascii"), min_size=1, max_size=12),  # chain id
    st.integers(0, 2**40),  # seq
    st.one_of(st.text(st.sampled_from("0123456789abcdef"), min_size=64, max_size=64), any_text),
)


def _native() -> Any:
    return require_native(C_MODULE, C_IMPORT_ERROR, "_records_c")


def _seal(sealer: Any, facts: tuple[Any, ...], head: tuple[str, int, str]) -> Any:
    chain = Chain(*head)
    try:
        line = sealer.seal(facts, chain)
    except Exception as exc:
        return ("refused", type(exc), str(exc), chain.seq, chain.prev)
    return ("sealed", line, chain.seq, chain.prev)


def _seal_via_body(sealer: Any, facts: Any, head: tuple[str, int, str]) -> Any:
    """The worker writes the body, the writer process seals it (a new chain
    head, as the writer process has its own)."""
    try:
        body = sealer.body(facts)
    except Exception as exc:
        return ("refused", type(exc), str(exc), head[1], head[2])
    return _seal(sealer, body, head)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    facts=snapshots,
    head=heads,
    instance=hostile_text,
    spoil=st.one_of(st.none(), st.none(), st.none(), st.tuples(st.integers(0, 24), refused_values)),
)
def test_native_and_pure_sealers_write_the_same_line(
    facts: tuple[Any, ...], head: tuple[str, int, str], instance: str, spoil: Any
) -> None:
    native = _native()
    if spoil is not None and spoil[0] not in (3, 22):  # the address and ts are never client text
        index, value = spoil
        facts = (*facts[:index], value, *facts[index + 1 :])
    pure = _seal(_records_py.RecordSealer(instance, KEY), facts, head)
    assert _seal(native.RecordSealer(instance, KEY), facts, head) == pure
    # Split in two (a body in the worker, sealed in the writer process): the
    # same line, or the same refusal, by either twin; and the same body.
    assert _seal_via_body(native.RecordSealer(instance, KEY), facts, head) == pure
    assert _seal_via_body(_records_py.RecordSealer(instance, KEY), facts, head) == pure
    if pure[0] == "sealed":
        body = _records_py.RecordSealer(instance, KEY).body(facts)
        assert native.RecordSealer(instance, KEY).body(facts) == body
    # The writer process seals the lists JSON gives it, as it seals tuples.
    assert _seal(native.RecordSealer(instance, KEY), list(facts), head) == pure  # type: ignore[arg-type]
    if pure[0] == "refused":
        assert pure[1] is TypeError or issubclass(pure[1], TypeError)
        assert pure[3:] == (head[1], head[2])  # the chain did not move
    else:
        record = orjson.loads(pure[1])
        assert record["hash"] == record_hash(record) == pure[3]
        assert record["seq"] == head[1] + 1 == pure[2]


def test_the_selected_sealer_is_the_native_one_unless_disabled() -> None:
    expected = "c" if C_MODULE is not None else "py"
    if os.environ.get("FAIRGATE_NO_EXTENSIONS", "") not in ("", "0"):
        expected = "py"
    assert expected == recording.SEALER_IMPLEMENTATION


def test_every_escaped_byte_at_every_offset() -> None:
    """Strings are scanned eight bytes at a time: a character that must be
    escaped is found wherever it sits in the word, next to others or not."""
    native = _native()
    base = (
        0, 0, None, None, "allow", False, 0.001, "GET", "enforce", "/p", None, "r", None,
        "id", (), None, None, None, (), 200, None, None, 1_795_000_000.0, None, None,
    )  # fmt: skip
    specials = ['"', "\\", "\x00", "\x01", "\x08", "\t", "\n", "\x0c", "\r", "\x1f", "é", "\x7f"]
    for length in range(0, 20):
        for offset in range(length):
            for ch in specials:
                text = "a" * offset + ch + "b" * (length - offset - 1)
                for twin in ("", "\\"):  # alone, and right after another escape
                    path = twin + text
                    facts = (*base[:9], path, *base[10:])
                    pure = _seal(_records_py.RecordSealer("i", KEY), facts, ("c", 0, "0" * 64))
                    assert _seal(native.RecordSealer("i", KEY), facts, ("c", 0, "0" * 64)) == pure
                    assert orjson.loads(pure[1])["path"] == path


def _proxied(latency: float) -> tuple[Any, ...]:
    return (0, 1234, "192.0.2.0/24", "192.0.2.7", "allow", False, latency, "GET", "enforce",
            "/t/acme/items/1", "pro", "rev", None, "req-1", ("agent",), "items", None, "s",
            (), 200, "alice", "acme", 1_700_000_000.25, "up", 200)  # fmt: skip


def test_latencies_at_and_beside_a_rounding_tie_are_written_as_python_rounds_them() -> None:
    """The native sealer writes round(latency * 1000, 3) without round() where
    the answer is clear, and must agree with it next to the ties it leaves to
    round() (a tie in decimal is rarely one in binary: x.xxx5 ms)."""
    import math

    native = _native().RecordSealer("gw", KEY)
    pure = _records_py.RecordSealer("gw", KEY)
    latencies: list[float] = [0.0, -0.0, -1.0, 1e-9, 4.99e-7, 5e-7, 5.01e-7, 1e9, 1e12, 1e300]
    for micros in (0, 1, 5, 999, 1000, 12345, 10**6, 10**9 - 1, 2**40):
        for tie in (micros + 0.5, micros + 0.4995, micros + 0.5005, float(micros)):
            x = tie / 1e6
            latencies += [x, math.nextafter(x, 0.0), math.nextafter(x, math.inf)]
    latencies += [math.nan, math.inf, -math.inf]
    for latency in latencies:
        facts = _proxied(latency)
        head = ("gw-w0", 7, "0" * 64)
        assert _seal(native, facts, head) == _seal(pure, facts, head), latency


def test_a_body_that_is_not_one_is_refused_and_the_chain_does_not_move() -> None:
    """A writer process seals what its worker wrote; bytes that are not a
    record body (cut short, lengths that do not add up, gaps out of order or
    past the end, no closing brace) are refused, by both twins, before the
    chain moves: the writer then records the failure in the record's place."""
    native = _native()
    good = _records_py.RecordSealer("gw", KEY).body(_proxied(0.002))
    size, at_chain, at_prev, at_seq = _records_py.BODY_HEADER.unpack_from(good)
    text = good[16:]
    header = _records_py.BODY_HEADER.pack
    bad = [
        b"",
        good[:16],
        good[:-1],  # the length no longer adds up, and no closing brace
        good + b" ",
        header(size, at_prev, at_chain, at_seq) + text,  # gaps out of order
        header(size, at_chain, at_prev, len(text) + 1) + text,  # past the end
        header(size | 0x8000_0000, at_chain, at_prev, at_seq) + text,  # a JSON entry's length
        header(size, at_chain, at_prev, at_seq) + text[:-1] + b" ",  # no closing brace
    ]
    for sealer in (native.RecordSealer("gw", KEY), _records_py.RecordSealer("gw", KEY)):
        for body in bad:
            chain = Chain("gw-w0", 7, "0" * 64)
            try:
                sealer.seal(body, chain)
            except ValueError as exc:
                assert "not an audit record body" in str(exc)
            else:
                raise AssertionError(f"{type(sealer).__module__} sealed {body[:24]!r}")
            assert (chain.seq, chain.prev) == (7, "0" * 64)
        # and the body itself seals, on any head
        chain = Chain("gw-w0", 7, "0" * 64)
        line = sealer.seal(good, chain)
        assert line == _records_py.RecordSealer("gw", KEY).seal(
            _proxied(0.002), Chain("gw-w0", 7, "0" * 64)
        )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    many=st.lists(snapshots, max_size=5),
    head=heads,
    spoil=st.one_of(st.none(), st.integers(0, 4)),
)
def test_a_run_of_bodies_sealed_in_one_call_is_each_sealed_in_turn(
    many: list[tuple[Any, ...]], head: tuple[str, int, str], spoil: int | None
) -> None:
    """The writer process seals a run of bodies in one call (``seal_many``):
    the lines one ``seal`` per body writes, joined, and the same head; a run
    holding something that is not a body is refused whole, the chain unmoved."""
    native = _native()
    pure = _records_py.RecordSealer("gw", KEY)
    bodies = []
    for facts in many:
        try:
            bodies.append(pure.body(facts))
        except (TypeError, ValueError):
            continue
    if spoil is not None and spoil < len(bodies):
        bodies[spoil] = bodies[spoil][:-1] + b" "  # no closing brace
    one_by_one = Chain(*head)
    try:
        expected: Any = b"".join(pure.seal(body, one_by_one) for body in bodies)
    except ValueError:
        expected = ValueError
    for sealer, twin in ((native.RecordSealer("gw", KEY), native), (pure, _records_py)):
        # As the writer process gets them too: where the frame it read holds them.
        in_frame = twin.decode_batch(bytearray(b"".join(bodies))) or [()]
        for run in (tuple(bodies), bodies, *in_frame):
            chain = Chain(*head)
            if expected is ValueError:
                try:
                    sealer.seal_many(run, chain)
                except ValueError:
                    assert (chain.seq, chain.prev) == (head[1], head[2])
                    continue
                raise AssertionError("a run with a bad body was sealed")
            assert sealer.seal_many(run, chain) == expected
            assert (chain.seq, chain.prev) == (one_by_one.seq, one_by_one.prev)
            if len(run) > 1:  # split where the writer's queue or a checkpoint cuts it
                chain = Chain(*head)
                assert sealer.seal_many(run[:1], chain) + sealer.seal_many(run[1:], chain) == (
                    expected
                )


@given(
    sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6),
    index=st.one_of(st.integers(-8, 8), st.sampled_from([2**80, -(2**80), "1", 1.0, None])),
    first=st.one_of(st.none(), st.integers(-8, 8)),
    last=st.one_of(st.none(), st.integers(-8, 8)),
    step=st.one_of(st.none(), st.integers(-2, 2).filter(bool)),
)
def test_a_run_of_bodies_reads_alike(
    sizes: list[int], index: int, first: int | None, last: int | None, step: int | None
) -> None:
    """A run of bodies (``Bodies``) is a sequence of each body's bytes in both
    twins: its length, items, negative indices, slices (in order only, and
    of slices) and the errors of each (an index too large for a C integer
    included)."""
    native = _native()
    payload = b"".join(n.to_bytes(4, "big") + bytes([65 + n]) * n for n in sizes)

    def read(twin: Any) -> Any:
        (run,) = twin.decode_batch(bytearray(payload))
        out: list[Any] = [len(run), list(run), run == tuple(run), list(run[1:][1:])]
        for look in (lambda: run[index], lambda: tuple(run[first:last:step])):
            try:
                out.append(look())
            except (IndexError, ValueError, TypeError) as exc:
                out.append((type(exc), str(exc)))
        return out

    assert read(native) == read(_records_py)


def test_a_frame_changed_under_its_bodies_is_refused_never_read_past() -> None:
    """Natively a run reads its bodies where the frame holds them: a frame
    that cannot be resized while they live, and one written to in place is a
    ``ValueError`` on the next read of it, never a read past its end."""
    native = _native()
    frame = bytearray(record_body(1) + record_body(2))
    (run,) = native.decode_batch(frame)
    with pytest.raises(BufferError):
        frame.extend(b"more")
    frame[0:4] = (2**31 - 1).to_bytes(4, "big")  # the first body now claims 2 GB
    sealer = native.RecordSealer("gw", KEY)
    reads = (list, lambda r: r[1], lambda r: r[1:], lambda r: sealer.seal_many(r, Chain("c")))
    for read in reads:
        with pytest.raises(ValueError, match="changed"):
            read(run)
    del run
    frame.extend(b"more")  # released with the run


entries = st.one_of(
    st.binary(max_size=40).map(lambda b: len(b).to_bytes(4, "big") + b),  # a body's bytes
    st.sampled_from([b'{"decision":"note"}', b"[1,null]", b"[]", b"{x", b""]).map(
        lambda j: (len(j) | 0x8000_0000).to_bytes(4, "big") + j  # JSON, or not
    ),
)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(entries, max_size=8), cut=st.one_of(st.none(), st.integers(0, 400)))
def test_batch_frames_are_split_alike(parts: list[bytes], cut: int | None) -> None:
    """The writer process splits a batch frame natively (runs of bodies as
    ``Bodies``, JSON decoded); its twin must split it the same way, and refuse
    the same frames (cut short, JSON that does not decode) with the same error."""
    native = _native()
    payload = b"".join(parts)
    if cut is not None:
        payload = payload[:cut]

    def split(decode: Any) -> Any:
        try:
            items = decode(bytearray(payload) if cut else payload)
            # A run of bodies as the bytes of each (each twin has its Bodies).
            return ("ok", [("run", tuple(x)) if type(x).__name__ == "Bodies" else x for x in items])
        except ValueError as exc:
            return ("refused", type(exc), str(exc) if type(exc) is ValueError else "")

    assert split(native.decode_batch) == split(_records_py.decode_batch)


def test_a_time_no_calendar_holds_is_refused_alike() -> None:
    """A snapshot's time is the clock's, but a bad one must fail the same
    way in both twins (the worker then hands the facts over as they are)."""
    import math

    native = _native()
    for ts in (1e17, -1e17, 1e300, -1e300, math.inf, -math.inf, math.nan, 9.3e18):
        facts = (*_proxied(0.001)[:22], ts, *_proxied(0.001)[23:])
        outcomes = []
        for sealer in (native.RecordSealer("gw", KEY), _records_py.RecordSealer("gw", KEY)):
            try:
                sealer.body(facts)
            except Exception as exc:
                outcomes.append(type(exc))
            else:
                outcomes.append(None)
        assert outcomes[0] == outcomes[1] and outcomes[0] is not None, (ts, outcomes)
