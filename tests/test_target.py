"""The canonical request target (gateway.target): both implementations, same decisions.

Every test that takes the ``impl`` fixture runs against the pure-Python module
and the native one.  A missing native module is skipped, unless
FAIRGATE_REQUIRE_EXTENSIONS=1, where it fails.
"""

from __future__ import annotations

import os
import subprocess
import sys
import unicodedata
import urllib.parse
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gateway
from gateway import _target_py, target
from gateway._target_errors import BadTarget
from tests.support import REQUIRE_EXTENSIONS, load_native, require_native

C_MODULE, C_IMPORT_ERROR = load_native("_target_c")
MAX = 8192

Outcome = tuple[str, bytes, bytes] | str  # a str is the expected BadTarget detail


def _native() -> ModuleType:
    module: ModuleType = require_native(C_MODULE, C_IMPORT_ERROR, "_target_c")
    return module


@pytest.fixture(scope="module", params=["py", "c"])
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "py":
        return _target_py
    return _native()


@pytest.fixture(scope="module")
def both() -> tuple[ModuleType, ModuleType]:
    return _target_py, _native()


def outcome(mod: ModuleType, raw_path: bytes, query: bytes) -> Outcome:
    try:
        result: tuple[str, bytes, bytes] = mod.canonical_target(raw_path, query)
    except BadTarget as exc:
        assert type(exc) is BadTarget
        assert str(exc) == exc.detail
        return exc.detail
    return result


def ok(path: str, forward: bytes | None = None, query: bytes = b"") -> tuple[str, bytes, bytes]:
    return (path, path.encode("ascii") if forward is None else forward, query)


# (raw_path, query, expected): expected is a detail string (refused) or the exact result.
HOSTILE: list[tuple[bytes, bytes, Outcome]] = [
    # traversal, literal and encoded
    (b"/crm/v1/acme/leads/../admin/users", b"", "dot segment in path"),
    (b"/crm/v1/acme/./admin", b"", "dot segment in path"),
    (b"/crm/v1/acme/..", b"", "dot segment in path"),
    (b"/..", b"", "dot segment in path"),
    (b"/crm/v1/acme/%2e%2e/admin", b"", "dot segment in path"),
    (b"/crm/v1/acme/%2E%2e/admin", b"", "dot segment in path"),
    (b"/crm/v1/acme/.%2E/admin", b"", "dot segment in path"),
    (b"/crm/v1/acme/%2e/admin", b"", "dot segment in path"),
    (b"/crm/v1/acme/%2e%2e", b"", "dot segment in path"),
    (b"/crm/v1/%252e%252e%252fadmin", b"", "double percent encoding in path"),
    (b"/crm/v1/acme/%25", b"", "double percent encoding in path"),
    (b"/crm/v1/acme/%c0%ae%c0%ae/admin", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/acme/%e0%80%afadmin", b"", "invalid UTF-8 in path"),
    # encoded delimiters
    (b"/crm/v1/acme/admin%2Fusers", b"", "encoded slash in path"),
    (b"/crm/v1/acme/admin%2fusers", b"", "encoded slash in path"),
    (b"/crm/v1/acme%5Cadmin", b"", "encoded backslash in path"),
    (b"/crm/v1/acme%5cadmin", b"", "encoded backslash in path"),
    (b"/crm/v1/acme%3Bx=y", b"", "encoded semicolon in path"),
    (b"/crm/v1/acme%23frag", b"", "encoded fragment marker in path"),
    (b"/crm/v1/acme/admin%3Fx=1", b"", "encoded question mark in path"),
    # empty segments
    (b"//crm/v1//acme/admin///users", b"", "empty path segment"),
    (b"//evil.example/crm", b"", "empty path segment"),
    (b"/crm/v1//acme", b"", "empty path segment"),
    (b"/crm/v1/acme//", b"", "empty path segment"),
    # raw bytes that are never allowed
    (b"/crm/v1/acme/admin;x=y/users", b"", "semicolon in path"),
    (b"/..;/admin", b"", "semicolon in path"),
    (b"/crm/v1/acme#frag", b"", "fragment in path"),
    (b"/crm/v1/acme\\admin", b"", "backslash in path"),
    (b"/crm/v1/acme?x=1", b"", "question mark in path"),
    (b"/crm/v1/acme/\x80", b"", "non-ASCII byte in path"),
    (b"/crm/v1/caf\xc3\xa9", b"", "non-ASCII byte in path"),
    (b"/crm/v1/acme\tadmin", b"", "control character in path"),
    (b"/crm/v1/acme\x00", b"", "control character in path"),
    (b"/crm/v1/acme\r\nX-Evil: 1", b"", "control character in path"),
    (b"/crm/v1/acme\x7f", b"", "control character in path"),
    (b"/crm/v1/acme admin", b"", "space in path"),
    (b"/crm/v1/<script>", b"", "disallowed character in path"),
    (b'/crm/v1/"acme"', b"", "disallowed character in path"),
    (b"/crm/v1/a|b", b"", "disallowed character in path"),
    (b"/crm/v1/a^b", b"", "disallowed character in path"),
    (b"/crm/v1/a`b", b"", "disallowed character in path"),
    (b"/crm/v1/{a}", b"", "disallowed character in path"),
    # encoded control characters
    (b"/crm/v1/acme%00", b"", "encoded control character in path"),
    (b"/crm/v1/acme%00.json", b"", "encoded control character in path"),
    (b"/crm/v1/acme%09", b"", "encoded control character in path"),
    (b"/crm/v1/acme%0d%0aX-Evil:%201", b"", "encoded control character in path"),
    (b"/crm/v1/acme%7F", b"", "encoded control character in path"),
    (b"/crm/v1/acme%C2%85", b"", "encoded control character in path"),  # U+0085 NEL
    # malformed escapes
    (b"/crm/v1/%zz", b"", "malformed percent escape in path"),
    (b"/crm/v1/%4", b"", "malformed percent escape in path"),
    (b"/crm/v1/%", b"", "malformed percent escape in path"),
    (b"/crm/v1/%4g", b"", "malformed percent escape in path"),
    (b"/crm/v1/%u002e%u002e", b"", "malformed percent escape in path"),
    (b"/crm/v1/%+f", b"", "malformed percent escape in path"),
    (b"/crm/v1/% 1", b"", "malformed percent escape in path"),
    # invalid UTF-8
    (b"/crm/v1/%c0%ae", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/%e0%80%af", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/%ed%a0%80", b"", "invalid UTF-8 in path"),  # surrogate U+D800
    (b"/crm/v1/%ff", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/%C3", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/%C3%28", b"", "invalid UTF-8 in path"),
    (b"/crm/v1/%F4%90%80%80", b"", "invalid UTF-8 in path"),  # > U+10FFFF
    # unicode look-alikes of delimiters (NFKC would turn them into / . \ etc.)
    (b"/crm/v1/acme%EF%BC%8Fadmin", b"", "ambiguous unicode character in path"),
    (b"/crm/v1/%EF%BC%8E%EF%BC%8E/admin", b"", "ambiguous unicode character in path"),
    (b"/crm/v1/%E2%80%A5/admin", b"", "ambiguous unicode character in path"),
    (b"/crm/v1/acme%EF%BC%BCadmin", b"", "ambiguous unicode character in path"),
    # path shape
    (b"", b"", "empty path"),
    (b"crm/v1/acme", b"", "path must start with /"),
    (b"*", b"", "path must start with /"),
    (b"http:/crm/v1", b"", "path must start with /"),
    # absolute-form
    (b"http://evil/crm/v1/acme/admin/users", b"", ok("/crm/v1/acme/admin/users")),
    (b"HTTPS://x", b"", ok("/")),
    (b"hTtP://host:8080", b"a=1", ok("/", query=b"a=1")),
    (b"https://user@host/crm/v1/%61cme", b"", ok("/crm/v1/acme")),
    (b"http://", b"", "empty authority in absolute-form target"),
    (b"http:///crm/v1", b"", "empty authority in absolute-form target"),
    (b"http://a b/crm", b"", "invalid authority in absolute-form target"),
    (b"http://evil\\@good/crm", b"", "invalid authority in absolute-form target"),
    (b"http://evil?x/crm", b"", "invalid authority in absolute-form target"),
    (b"http://evil#x/crm", b"", "invalid authority in absolute-form target"),
    (b"http://\xffevil/crm", b"", "invalid authority in absolute-form target"),
    (b"http://evil//crm/v1", b"", "empty path segment"),
    (b"http://evil/crm/../admin", b"", "dot segment in path"),
    (b"http://evil/crm%2fadmin", b"", "encoded slash in path"),
    # query: validated, never decoded
    (b"/crm/v1/acme", b"page=2#frag", "fragment in query"),
    (b"/crm/v1/acme", b"page= 2", "space in query"),
    (b"/crm/v1/acme", b"q=%zz", "malformed percent escape in query"),
    (b"/crm/v1/acme", b"q=%4", "malformed percent escape in query"),
    (b"/crm/v1/acme", b"q=%", "malformed percent escape in query"),
    (b"/crm/v1/acme", b"q=\xc3\xa9", "non-ASCII byte in query"),
    (b"/crm/v1/acme", b"q=a\r\nX-Evil:1", "control character in query"),
    (b"/crm/v1/acme", b"q=\x7f", "control character in query"),
    (b"/crm/v1/acme", b"q=%2e%2e%2f%00;x?y", ok("/crm/v1/acme", query=b"q=%2e%2e%2f%00;x?y")),
    (b"/crm/v1/acme", b"a=<b>&c={d}|e^f", ok("/crm/v1/acme", query=b"a=<b>&c={d}|e^f")),
    # the order of checks: path bytes before segments, path before query
    (b"//a%zz", b"", "malformed percent escape in path"),
    (b"/../a%2f", b"", "encoded slash in path"),
    (b"/..//a", b"", "dot segment in path"),
    (b"//../a", b"", "empty path segment"),
    (b"/a/..", b"#", "dot segment in path"),
    (b"/%ff/..", b"", "invalid UTF-8 in path"),
    # length
    (b"/" + b"a" * MAX, b"", "request target too long"),
    (b"/a", b"q" * MAX, "request target too long"),
    (b"/" + b"a" * (MAX - 7), b"page=2", ok("/" + "a" * (MAX - 7), query=b"page=2")),
    (b"/" + b"[" * 3000, b"", "request target too long"),  # forward form would exceed it
    # accepted, normalized
    (b"/", b"", ok("/")),
    (b"/crm/v1/acme/leads/1234", b"page=2", ok("/crm/v1/acme/leads/1234", query=b"page=2")),
    (b"/crm/v1/acme/leads/", b"", ok("/crm/v1/acme/leads/")),
    (b"/crm/v1/acme/Admin/users", b"", ok("/crm/v1/acme/Admin/users")),
    (b"/crm/v1/%61cme", b"", ok("/crm/v1/acme")),
    (b"/crm/v1/acme%20corp", b"", ok("/crm/v1/acme corp", b"/crm/v1/acme%20corp")),
    (b"/caf%C3%A9", b"", ok("/caf\u00e9", b"/caf%C3%A9")),
    (b"/caf%c3%a9", b"", ok("/caf\u00e9", b"/caf%C3%A9")),
    (b"/%F0%9F%98%80", b"", ok("/\U0001f600", b"/%F0%9F%98%80")),
    (b"/a%2Eb/...", b"", ok("/a.b/...")),
    (b"/.well-known/x", b"", ok("/.well-known/x")),
    (b"/a[1]", b"", ok("/a[1]", b"/a%5B1%5D")),
    (b"/%7e%41%22", b"", ok('/~A"', b"/~A%22")),
    (b"/a:b@c!$&'()*+,=-._~", b"", ok("/a:b@c!$&'()*+,=-._~")),
]


@pytest.mark.parametrize(
    ("raw_path", "query", "expected"), HOSTILE, ids=[repr(c[0][:60] + c[1][:20]) for c in HOSTILE]
)
def test_table(impl: ModuleType, raw_path: bytes, query: bytes, expected: Outcome) -> None:
    assert outcome(impl, raw_path, query) == expected


def test_table_is_big_enough() -> None:
    assert len(HOSTILE) >= 40
    assert sum(isinstance(e, str) for _, _, e in HOSTILE) >= 40


def test_fast_path_forwards_raw_object(impl: ModuleType) -> None:
    raw = b"/crm/v1/acme/leads/1234"
    query = b"page=2"
    path, forward, fquery = impl.canonical_target(raw, query)
    assert path == "/crm/v1/acme/leads/1234"
    assert forward is raw
    assert fquery is query


def test_max_target(impl: ModuleType) -> None:
    assert impl.MAX_TARGET == MAX == target.MAX_TARGET


def test_bad_target_is_shared() -> None:
    assert target.BadTarget is BadTarget is _target_py.BadTarget
    if C_MODULE is not None:
        assert C_MODULE.BadTarget is BadTarget
    exc = BadTarget("encoded slash in path")
    assert isinstance(exc, ValueError)
    assert exc.detail == "encoded slash in path" == str(exc)


class BytesSubclass(bytes):
    pass


def test_non_bytes_rejected(impl: ModuleType) -> None:
    cases: list[tuple[object, object]] = [
        ("/a", b""),
        (b"/a", "q"),
        (None, b""),
        (b"/a", None),
        (bytearray(b"/a"), b""),
        (memoryview(b"/a"), b""),
        (BytesSubclass(b"/a"), b""),
        (b"/a", BytesSubclass(b"q")),
    ]
    for args in cases:
        with pytest.raises(TypeError):
            impl.canonical_target(*args)


def test_every_raw_byte_and_escape(both: tuple[ModuleType, ModuleType]) -> None:
    py, c = both
    for b in range(256):
        byte = bytes((b,))
        for raw, query in [
            (b"/a" + byte, b""),
            (b"/a" + byte + b"b/", b""),
            (b"/a%%%02Xb" % b, b""),
            (b"/a%%%02xb" % b, b""),
            (b"/a", b"q=" + byte),
            (b"http://h" + byte + b"/a", b""),
        ]:
            assert outcome(py, raw, query) == outcome(c, raw, query), (raw, query)


def _nfkc_ambiguous() -> set[int]:
    found = set()
    for cp in range(0x80, 0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        norm = unicodedata.normalize("NFKC", chr(cp))
        if any(ch in norm for ch in "/\\.;#?%"):
            found.add(cp)
    return found


def test_ambiguous_codepoints_match_unicodedata() -> None:
    assert _nfkc_ambiguous() == set(_target_py.AMBIGUOUS_CODEPOINTS)
    if C_MODULE is not None:
        assert C_MODULE.AMBIGUOUS_CODEPOINTS == _target_py.AMBIGUOUS_CODEPOINTS


def test_ambiguous_and_c1_codepoints_refused(impl: ModuleType) -> None:
    for cp in _target_py.AMBIGUOUS_CODEPOINTS:
        raw = b"/x" + urllib.parse.quote(chr(cp)).encode() + b"y"
        assert outcome(impl, raw, b"") == "ambiguous unicode character in path", hex(cp)
    for cp in range(0x80, 0xA0):
        raw = b"/x" + urllib.parse.quote(chr(cp)).encode()
        assert outcome(impl, raw, b"") == "encoded control character in path", hex(cp)
    # Neighbours stay allowed.
    for cp in (0xA0, 0xE9, 0x2027, 0xFF0D, 0xFF10, 0x4E2D):
        raw = b"/x" + urllib.parse.quote(chr(cp)).encode()
        result = outcome(impl, raw, b"")
        assert isinstance(result, tuple) and result[0] == "/x" + chr(cp), hex(cp)


# --- selector -------------------------------------------------------------------------------


def _implementation_with(env_value: str | None) -> str:
    env = dict(os.environ)
    env.pop("FAIRGATE_NO_EXTENSIONS", None)
    if env_value is not None:
        env["FAIRGATE_NO_EXTENSIONS"] = env_value
    root = str(Path(gateway.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    code = "import gateway.target as t; print(t.IMPLEMENTATION)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def test_selector_honours_no_extensions() -> None:
    assert _implementation_with("1") == "py"
    assert _implementation_with("yes") == "py"
    native = "c" if C_MODULE is not None else "py"
    assert _implementation_with(None) == native
    assert _implementation_with("") == native
    assert _implementation_with("0") == native


def test_selector_in_this_process() -> None:
    flag = os.environ.get("FAIRGATE_NO_EXTENSIONS", "")
    if flag and flag != "0":
        assert target.IMPLEMENTATION == "py"
        assert target.canonical_target is _target_py.canonical_target
    elif C_MODULE is not None:
        assert target.IMPLEMENTATION == "c"
        assert target.canonical_target is C_MODULE.canonical_target
    elif REQUIRE_EXTENSIONS:
        pytest.fail("FAIRGATE_REQUIRE_EXTENSIONS=1 but gateway._target_c is not importable")
    else:
        assert target.IMPLEMENTATION == "py"


# --- properties -----------------------------------------------------------------------------

TOKENS = [
    b"/", b".", b"..", b"%", b"2", b"e", b"E", b"f", b"F", b"5", b"c", b"C", b";", b"#",
    b"a", b"A", b"0", b"?", b"\\", b"[", b"]", b" ", b"\x00", b"\t", b"\x7f", b"\x80",
    b"\xff", b"~", b"-", b"@", b":", b"+", b"%2e", b"%2E", b"%2f", b"%2F", b"%5c", b"%5C",
    b"%25", b"%00", b"%20", b"%41", b"%3b", b"%23", b"%3f", b"%c3%a9", b"%C3", b"%A9",
    b"%c0%ae", b"%e0%80%af", b"%ed%a0%80", b"%f0%9f%98%80", b"%ef%bc%8f", b"%e2%80%a4",
    b"%c2%85", b"%ff", b"%zz", b"%4", b"http://", b"HTTPS://", b"//", b"/./", b"/../",
]  # fmt: skip

token_bytes = st.lists(st.sampled_from(TOKENS), max_size=24).map(b"".join)
interesting_path = st.one_of(token_bytes, token_bytes.map(lambda b: b"/" + b))
any_bytes = st.binary(max_size=64)
QUERY_TOKENS = [b"a", b"=", b"&", b"%", b"2", b"F", b"z", b"#", b" ", b"\x80", b"%2F", b"?"]
query_bytes = st.one_of(
    st.binary(max_size=24), st.lists(st.sampled_from(QUERY_TOKENS)).map(b"".join)
)

_SEGMENT_CHARS = st.characters(codec="utf-8", exclude_categories=("Cs", "Cc"))
segment = st.one_of(
    st.text(alphabet="abcAZ09-._~!$&'()*+,=:@[]", min_size=1, max_size=8),
    st.text(_SEGMENT_CHARS, min_size=1, max_size=6).map(
        lambda s: urllib.parse.quote(s, safe="-._~!$&'()*+,=:@")
    ),
)
plausible_path = st.builds(
    lambda segs, slash: ("/" + "/".join(segs) + ("/" if slash and segs else "")).encode(),
    st.lists(segment, max_size=6),
    st.booleans(),
)
plausible_query = st.text(alphabet="abz09=&%2F+-._~!$'()*,;:@/?", max_size=16).map(str.encode)

candidate_path = st.one_of(interesting_path, any_bytes, plausible_path, plausible_path)
candidate_query = st.one_of(query_bytes, plausible_query)

PROPERTY_SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@PROPERTY_SETTINGS
@given(raw_path=candidate_path, query=candidate_query)
@example(raw_path=b"/a/%2e%2e", query=b"")
@example(raw_path=b"/%252e%252e%252f", query=b"")
@example(raw_path=b"HTTP://h", query=b"x")
def test_parity(both: tuple[ModuleType, ModuleType], raw_path: bytes, query: bytes) -> None:
    py, c = both
    assert outcome(py, raw_path, query) == outcome(c, raw_path, query)


def _accepted(impl: ModuleType, raw_path: bytes, query: bytes) -> tuple[str, bytes, bytes] | None:
    result = outcome(impl, raw_path, query)
    return None if isinstance(result, str) else result


@PROPERTY_SETTINGS
@given(raw_path=candidate_path, query=candidate_query)
def test_idempotent(impl: ModuleType, raw_path: bytes, query: bytes) -> None:
    result = _accepted(impl, raw_path, query)
    if result is None:
        return
    path, forward, fquery = result
    assert fquery == query
    assert impl.canonical_target(forward, fquery) == (path, forward, fquery)


@PROPERTY_SETTINGS
@given(raw_path=candidate_path, query=candidate_query)
def test_accepted_paths_are_clean(impl: ModuleType, raw_path: bytes, query: bytes) -> None:
    result = _accepted(impl, raw_path, query)
    if result is None:
        return
    path, forward, _ = result
    assert path.startswith("/")
    segments = path.split("/")[1:]
    assert "." not in segments and ".." not in segments
    assert "" not in segments[:-1]
    assert "//" not in path
    for bad in ("\\", ";", "\x00", "#", "?", "%"):
        assert bad not in path
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F for ch in path)
    assert urllib.parse.unquote(forward.decode("ascii"), errors="strict") == path
    assert all(0x21 <= b <= 0x7E for b in forward)
    # forward_path is the normal form: only the unreserved set, "/" and "%XX" (uppercase).
    assert urllib.parse.quote(path, safe="/!$&'()*+,=:@").encode() == forward
    # path is exactly one decoding of the raw (origin-form) target.
    if raw_path.startswith(b"/"):
        assert urllib.parse.unquote(raw_path.decode("ascii"), errors="strict") == path
