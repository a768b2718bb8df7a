"""Sticky sessions: route extraction (httpd's ``find_session_route``), the signed session cookie,
Set-Cookie formatting, and the scheduler's sticky side (``find_route``, ``note_sticky``) plus the
lbmethods random, leastrequest and hash, and slowstart. Pure: no sockets, explicit ``now``."""

from __future__ import annotations

import random
import string
from collections import Counter
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerpool.proxy.hashing import Maglev, Ring, hash64
from balancerpool.proxy.model import (
    API_VERSION,
    KIND,
    ROUTE_RE,
    BalancerPool,
    CookieSpec,
    SameSite,
    StickySession,
    parse_pools,
)
from balancerpool.proxy.scheduling import E, MemberState, PoolState
from balancerpool.proxy.sticky import (
    MAX_VALUE,
    NO_ROUTE,
    Reason,
    SessionRoute,
    SessionState,
    SignedSession,
    cookie_value,
    decode_session,
    encode_session,
    extract_route,
    path_param,
    query_param,
    route_from_value,
    set_cookie,
)

# ---------------------------------------------------------------------------------------------
# Route extraction

#: httpd's documented example: ``stickysession=JSESSIONID|jsessionid``.
BOTH = StickySession("JSESSIONID", "jsessionid")
#: ``stickysession: JSESSIONID`` parses to the same name for cookie and parameter.
SINGLE = StickySession("JSESSIONID", "JSESSIONID")
COOKIE_ONLY = StickySession("JSESSIONID", None)
PARAM_ONLY = StickySession(None, "jsessionid")

C = "JSESSIONID"
P = "jsessionid"
R64 = "r" * 64
R65 = "r" * 65


def ok(route: str, source: str) -> SessionRoute:
    return SessionRoute(route, source)


def bad(source: str) -> SessionRoute:
    return SessionRoute(None, source, malformed=True)


def unrouted(source: str) -> SessionRoute:
    """A value present but without a route part: a new session, not an attack."""
    return SessionRoute(None, source)


# (id, path, query, cookie headers, sticky, sep, scolonpathdelim, expected)
ROUTE_CASES: list[tuple[str, str, str, list[str], StickySession, str | None, bool, SessionRoute]] = [
    # Where the route comes from.
    ("cookie-only", "/app", "", ["JSESSIONID=abc.n1"], BOTH, ".", False, ok("n1", C)),
    ("query-only", "/app", "jsessionid=abc.n2", [], BOTH, ".", False, ok("n2", P)),
    ("query-among-others", "/app", "a=1&jsessionid=abc.n2&b=2", [], BOTH, ".", False, ok("n2", P)),
    ("query-first-of-two", "/app", "jsessionid=abc.n1&jsessionid=abc.n2", [], BOTH, ".", False,
     ok("n1", P)),
    ("path-param-scolon-on", "/app;jsessionid=abc.n3", "", [], BOTH, ".", True, ok("n3", P)),
    ("path-param-scolon-off", "/app;jsessionid=abc.n3", "", [], BOTH, ".", False, NO_ROUTE),
    ("path-param-off-cookie-used", "/app;jsessionid=abc.n3", "", ["JSESSIONID=abc.n1"], BOTH, ".",
     False, ok("n1", C)),
    ("param-wins-over-cookie", "/app", "jsessionid=abc.n2", ["JSESSIONID=abc.n1"], BOTH, ".", False,
     ok("n2", P)),
    ("path-param-wins-over-cookie", "/app;jsessionid=abc.n3", "", ["JSESSIONID=abc.n1"], BOTH, ".",
     True, ok("n3", P)),
    ("param-without-route-still-wins", "/app", "jsessionid=abc", ["JSESSIONID=abc.n1"], BOTH, ".",
     False, unrouted(P)),
    ("cookie-only-sticky-ignores-query", "/app", "jsessionid=abc.n2", [], COOKIE_ONLY, ".", True,
     NO_ROUTE),
    ("param-only-sticky-ignores-cookie", "/app", "", ["JSESSIONID=abc.n1"], PARAM_ONLY, ".", True,
     NO_ROUTE),
    ("nothing", "/app", "a=1", ["a=1"], BOTH, ".", True, NO_ROUTE),
    # The separator.
    ("sep-first-separator", "/", "", ["JSESSIONID=abc.x.y"], BOTH, ".", False, ok("x.y", C)),
    ("sep-off-whole-value", "/", "", ["JSESSIONID=abc.n1"], BOTH, None, False, ok("abc.n1", C)),
    ("sep-off-plain-route", "/", "jsessionid=n2", [], BOTH, None, False, ok("n2", P)),
    ("sep-custom", "/", "", ["JSESSIONID=abc~n1"], BOTH, "~", False, ok("n1", C)),
    ("sep-custom-dot-is-data", "/", "", ["JSESSIONID=a.b~n1"], BOTH, "~", False, ok("n1", C)),
    ("route-cookie-form", "/", "", ["JSESSIONID=.n1"], BOTH, ".", False, ok("n1", C)),
    ("no-separator-no-route", "/", "", ["JSESSIONID=abcdef"], BOTH, ".", False, unrouted(C)),
    ("separator-last-no-route", "/", "", ["JSESSIONID=abc."], BOTH, ".", False, unrouted(C)),
    ("empty-cookie", "/", "", ["JSESSIONID="], BOTH, ".", False, NO_ROUTE),
    ("empty-query-param", "/", "jsessionid=", [], BOTH, ".", False, NO_ROUTE),
    ("empty-quoted-cookie", "/", "", ['JSESSIONID=""'], BOTH, ".", False, NO_ROUTE),
    # Names: exact and case-sensitive.
    ("cookie-name-case", "/", "", ["jsessionid=abc.n1"], BOTH, ".", False, NO_ROUTE),
    ("query-name-case", "/", "JSESSIONID=abc.n1", [], BOTH, ".", False, NO_ROUTE),
    ("path-name-case", "/app;JSESSIONID=abc.n1", "", [], BOTH, ".", True, NO_ROUTE),
    ("query-name-prefixed", "/", "xjsessionid=abc.n1", [], BOTH, ".", False, NO_ROUTE),
    ("query-name-suffixed", "/", "jsessionidx=abc.n1", [], BOTH, ".", False, NO_ROUTE),
    ("cookie-name-prefixed", "/", "", ["XJSESSIONID=abc.n1"], BOTH, ".", False, NO_ROUTE),
    ("cookie-name-in-other-value", "/", "", ["other=JSESSIONID=abc.n1"], BOTH, ".", False, NO_ROUTE),
    ("path-name-prefixed", "/app;xjsessionid=abc.n1", "", [], BOTH, ".", True, NO_ROUTE),
    ("path-without-semicolon", "/app/jsessionid=abc.n1", "", [], BOTH, ".", True, NO_ROUTE),
    # Several cookies and headers.
    ("several-headers", "/", "", ["a=1; b=2", "c=3; JSESSIONID=abc.n4"], BOTH, ".", False,
     ok("n4", C)),
    ("several-cookies-one-header", "/", "", ["a=1;JSESSIONID=abc.n4 ; b=2"], BOTH, ".", False,
     ok("n4", C)),
    ("first-cookie-wins", "/", "", ["JSESSIONID=abc.n1", "JSESSIONID=abc.n2"], BOTH, ".", False,
     ok("n1", C)),
    ("first-cookie-wins-same-header", "/", "", ["JSESSIONID=abc.n1; JSESSIONID=abc.n2"], BOTH, ".",
     False, ok("n1", C)),
    ("quoted-cookie", "/", "", ['JSESSIONID="abc.n1"'], BOTH, ".", False, ok("n1", C)),
    # Hostile values.
    ("long-value-malformed", "/", "", ["JSESSIONID=" + "x" * (MAX_VALUE + 1 - 65) + "." + R64], BOTH,
     ".", False, bad(C)),
    ("value-at-limit", "/", "", ["JSESSIONID=" + "x" * (MAX_VALUE - 65) + "." + R64], BOTH, ".", False,
     ok(R64, C)),
    ("very-long-query", "/", "jsessionid=" + "x" * 10_000 + ".n1", [], BOTH, ".", False, bad(P)),
    ("route-64", "/", "", ["JSESSIONID=abc." + R64], BOTH, ".", False, ok(R64, C)),
    ("route-65", "/", "", ["JSESSIONID=abc." + R65], BOTH, ".", False, bad(C)),
    ("route-space", "/", "jsessionid=abc.n 1", [], BOTH, ".", False, bad(P)),
    ("cookie-route-space", "/", "", ["JSESSIONID=abc.n 1"], BOTH, ".", False, bad(C)),
    ("route-angle", "/", "jsessionid=abc.<script>", [], BOTH, ".", False, bad(P)),
    ("route-inner-quote", "/", "", ['JSESSIONID=abc."n1'], BOTH, ".", False, bad(C)),
    ("route-non-ascii", "/", "jsessionid=abc.n\u00f61", [], BOTH, ".", False, bad(P)),
    ("route-non-ascii-digit", "/", "jsessionid=abc.n\u0661", [], BOTH, ".", False, bad(P)),
    ("route-nul", "/", "jsessionid=abc.n1\x00", [], BOTH, ".", False, bad(P)),
    ("route-crlf-encoded", "/", "jsessionid=abc.n1%0d%0aSet-Cookie:x=1", [], BOTH, ".", False, bad(P)),
    ("route-crlf-raw-inside", "/", "jsessionid=abc.n1\r\nX: y", [], BOTH, ".", False, bad(P)),
    ("second-equals-cookie", "/", "", ["JSESSIONID=abc.n1=x"], BOTH, ".", False, ok("n1=x", C)),
    ("second-equals-query", "/", "jsessionid=abc.n1=x", [], BOTH, ".", False, ok("n1=x", P)),
    ("path-param-then-slash", "/app;jsessionid=abc.n3/more", "", [], BOTH, ".", True, ok("n3", P)),
    ("path-param-then-question", "/app;jsessionid=abc.n3?x=1", "", [], BOTH, ".", True, ok("n3", P)),
    ("path-param-then-semicolon", "/app;jsessionid=abc.n3;v=2", "", [], BOTH, ".", True, ok("n3", P)),
    ("path-param-empty-then-slash", "/app;jsessionid=/x", "", [], BOTH, ".", True, NO_ROUTE),
    # The single-name form finds the route in either place.
    ("single-name-cookie", "/", "", ["JSESSIONID=abc.n1"], SINGLE, ".", False, ok("n1", C)),
    ("single-name-query", "/", "JSESSIONID=abc.n2", [], SINGLE, ".", False, ok("n2", C)),
    ("single-name-path", "/app;JSESSIONID=abc.n3", "", [], SINGLE, ".", True, ok("n3", C)),
    ("single-name-query-wins", "/", "JSESSIONID=abc.n2", ["JSESSIONID=abc.n1"], SINGLE, ".", False,
     ok("n2", C)),
]


@pytest.mark.parametrize(("path", "query", "cookies", "sticky", "sep", "scolon", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in ROUTE_CASES])
def test_extract_route(path: str, query: str, cookies: list[str], sticky: StickySession,
                       sep: str | None, scolon: bool, expected: SessionRoute) -> None:
    assert extract_route(path, query, cookies, sticky, sep, scolon) == expected


HOSTILE_TEXT = st.lists(st.sampled_from(
    [*"=.;,& ?/%\"'\r\n\t\x00\u00e9\U0001f600", "JSESSIONID", "jsessionid", "n1", "n2", "abc"]),
    max_size=20).map("".join)


@settings(max_examples=400)
@given(path=HOSTILE_TEXT.map(lambda t: "/" + t), query=HOSTILE_TEXT,
       cookies=st.lists(HOSTILE_TEXT | st.text(max_size=80), max_size=3),
       sticky=st.sampled_from([BOTH, SINGLE, StickySession("JSESSIONID", None),
                               StickySession(None, "jsessionid")]),
       sep=st.sampled_from([".", None, "~"]), scolon=st.booleans())
def test_extract_route_on_hostile_input_is_a_route_or_malformed(
        path: str, query: str, cookies: list[str], sticky: StickySession, sep: str | None,
        scolon: bool) -> None:
    """Fuzzed paths, queries and Cookie headers: never an exception, and any route handed on
    is one a member could have (ROUTE_RE), so a hostile value never reaches a lookup."""
    result = extract_route(path, query, cookies, sticky, sep, scolon)
    if result.route is not None:
        assert ROUTE_RE.match(result.route) and not result.malformed
        assert result.source in (sticky.cookie, sticky.param)


def test_extract_route_takes_any_iterable_of_headers() -> None:
    headers = (h for h in ["a=1", "JSESSIONID=abc.n1"])
    assert extract_route("/", "", headers, BOTH, ".", False) == ok("n1", C)


@pytest.mark.parametrize(("path", "query"), [("/", "jsessionid=abc.n1\n"),
                                             ("/app;jsessionid=abc.n1\n", "")])
def test_route_with_trailing_newline_is_malformed(path: str, query: str) -> None:
    assert extract_route(path, query, [], BOTH, ".", True) == bad(P)


def test_empty_param_falls_back_to_cookie() -> None:
    assert extract_route("/", "jsessionid=", ["JSESSIONID=abc.n1"], BOTH, ".", False) == ok("n1", C)


# ---------------------------------------------------------------------------------------------
# The pieces


@pytest.mark.parametrize(("headers", "name", "expected"), [
    ([], "a", None),
    (["b=1"], "a", None),
    (["a=1"], "a", "1"),
    (["a"], "a", None),
    (["a; a=2"], "a", "2"),
    (["a="], "a", ""),
    (["a=1=2"], "a", "1=2"),
    (['a="q"'], "a", "q"),
    (['a=""'], "a", ""),
    (['a="'], "a", '"'),
    (['a="q'], "a", '"q'),
    (["  a =1"], "a", None),
    (["x=1;  a=  2  ;y=3"], "a", "2"),
    (["A=1"], "a", None),
    (["ba=1"], "a", None),
    (["b=a=1"], "a", None),
    (["b=1", "a=2", "a=3"], "a", "2"),
    (["a=1;a=2"], "a", "1"),
])
def test_cookie_value(headers: list[str], name: str, expected: str | None) -> None:
    assert cookie_value(headers, name) == expected


@pytest.mark.parametrize(("query", "expected"), [
    ("", None),
    ("b=1", None),
    ("p=1", "1"),
    ("a=1&p=2&p=3", "2"),
    ("p", None),
    ("p&p=4", "4"),
    ("p=", ""),
    ("p=&p=5", ""),
    ("xp=1", None),
    ("px=1", None),
    ("P=1", None),
    ("p=%41%20", "%41%20"),
    ("p=1=2", "1=2"),
    ("p=1;q=2", "1;q=2"),
])
def test_query_param(query: str, expected: str | None) -> None:
    assert query_param(query, "p") == expected


@pytest.mark.parametrize(("path", "expected"), [
    ("/a", None),
    ("/a;p=x", "x"),
    ("/a;p=x;y=1", "x"),
    ("/a;p=x/b", "x"),
    ("/a;p=x?q", "x"),
    ("/a;p=x&y", "x"),
    ("/a;p=", ""),
    ("/a;p=/b", ""),
    ("/a;P=x", None),
    ("/a;xp=x", None),
    ("/a/p=x", None),
    ("/a;p=1;p=2", "1"),
    ("/a;q=1;p=2", "2"),
    ("/a;p=x.y=z", "x.y=z"),
])
def test_path_param(path: str, expected: str | None) -> None:
    assert path_param(path, "p") == expected


@pytest.mark.parametrize(("value", "sep", "expected"), [
    ("abc.n1", ".", "n1"),
    ("abc.x.y", ".", "x.y"),
    ("abc", ".", None),
    ("abc.", ".", ""),
    (".n1", ".", "n1"),
    ("abc.n1", None, "abc.n1"),
    ("abc.n1", "_", None),
])
def test_route_from_value(value: str, sep: str | None, expected: str | None) -> None:
    assert route_from_value(value, sep) == expected


# ---------------------------------------------------------------------------------------------
# The signed session cookie

KEY = b"k" * 32
OTHER_KEY = b"j" * 32
HOUR = 3600


def test_encode_session_format() -> None:
    value = encode_session(SignedSession("n1", 1000, 1500), KEY)
    route, issued, last_seen, signature = value.split(".")
    assert (route, issued, last_seen) == ("bjE", "3e8", "5dc")
    assert len(signature) == 22  # 16 bytes, unpadded URL-safe base64
    assert set(signature) <= set(string.ascii_letters + string.digits + "-_")
    assert encode_session(SignedSession("n1", 1000, 1500), KEY) == value
    assert encode_session(SignedSession("n1", 1000, 1500), OTHER_KEY) != value


@pytest.mark.parametrize("route", ["n1", "a", R64, "node-1.x~y:z@!$&'()*+,;=", "0"])
def test_session_round_trip(route: str) -> None:
    session = SignedSession(route, 1000, 1500)
    value = encode_session(session, KEY)
    assert decode_session(value, KEY, 1500, None, None) == (SessionState.OK, session)
    assert decode_session(value, KEY, 1500, 300, 3600) == (SessionState.OK, session)


def _replace_part(value: str, index: int, new: str) -> str:
    parts = value.split(".")
    parts[index] = new
    return ".".join(parts)


def _flip(text: str, index: int) -> str:
    """One character of URL-safe base64 replaced by another that changes the decoded bytes."""
    c = text[index]
    return text[:index] + ("B" if c == "A" else "A") + text[index + 1:]


@pytest.mark.parametrize(("part", "new"), [
    (0, "bjI"),  # route n2
    (0, "bjE1"),  # route n15
    (0, ""),
    (1, "3e9"),  # issued + 1
    (1, "3E8"),  # same number, other spelling
    (1, "03e8"),
    (2, "5dd"),  # last-seen + 1
    (2, "ffffff"),
    (3, ""),
    (3, "A" * 22),
])
def test_tampered_session_is_invalid(part: int, new: str) -> None:
    value = encode_session(SignedSession("n1", 1000, 1500), KEY)
    assert decode_session(_replace_part(value, part, new), KEY, 1500, None, None) == (
        SessionState.INVALID, None)


@pytest.mark.parametrize("index", [0, 5, 10, 20])
def test_flipped_signature_is_invalid(index: int) -> None:
    value = encode_session(SignedSession("n1", 1000, 1500), KEY)
    signature = value.split(".")[3]
    tampered = _replace_part(value, 3, _flip(signature, index))
    assert decode_session(tampered, KEY, 1500, None, None) == (SessionState.INVALID, None)


def test_signature_of_other_session_is_invalid() -> None:
    mine = encode_session(SignedSession("n1", 1000, 1500), KEY)
    theirs = encode_session(SignedSession("n2", 1000, 1500), KEY)
    spliced = _replace_part(mine, 3, theirs.split(".")[3])
    assert decode_session(spliced, KEY, 1500, None, None) == (SessionState.INVALID, None)


def test_wrong_key_is_invalid() -> None:
    value = encode_session(SignedSession("n1", 1000, 1500), OTHER_KEY)
    assert decode_session(value, KEY, 1500, None, None) == (SessionState.INVALID, None)
    assert decode_session(value, b"", 1500, None, None) == (SessionState.INVALID, None)


@pytest.mark.parametrize("suffix", ["last-char", "padding"])
def test_signature_encoding_is_canonical(suffix: str) -> None:
    value = encode_session(SignedSession("n1", 1000, 1000), KEY)
    assert value == "bjE.3e8.3e8.T2m0G2CCZUotgybz1PijsQ"  # pins the example below
    tampered = value[:-1] + "R" if suffix == "last-char" else value + "=="
    assert decode_session(tampered, KEY, 1000, None, None) == (SessionState.INVALID, None)


def test_idle_timeout_boundary() -> None:
    session = SignedSession("n1", 1000, 1000)
    value = encode_session(session, KEY)
    assert decode_session(value, KEY, 1300, 300, None) == (SessionState.OK, session)
    assert decode_session(value, KEY, 1300.5, 300, None) == (SessionState.EXPIRED, session)
    assert decode_session(value, KEY, 1301, 300, None) == (SessionState.EXPIRED, session)


def test_idle_timeout_counts_from_last_seen() -> None:
    session = SignedSession("n1", 1000, 5000)
    value = encode_session(session, KEY)
    assert decode_session(value, KEY, 5300, 300, None) == (SessionState.OK, session)
    assert decode_session(value, KEY, 5301, 300, None) == (SessionState.EXPIRED, session)


def test_absolute_timeout_boundary() -> None:
    session = SignedSession("n1", 1000, 1900)
    value = encode_session(session, KEY)
    assert decode_session(value, KEY, 1000 + HOUR, 3 * HOUR, HOUR) == (SessionState.OK, session)
    assert decode_session(value, KEY, 1001 + HOUR, 3 * HOUR, HOUR) == (SessionState.EXPIRED, session)
    # The absolute limit holds however recently the session was seen.
    fresh = SignedSession("n1", 1000, 1000 + HOUR + 1)
    assert decode_session(encode_session(fresh, KEY), KEY, 1001 + HOUR, 60, HOUR) == (
        SessionState.EXPIRED, fresh)


def test_no_timeouts_never_expire() -> None:
    session = SignedSession("n1", 1000, 1000)
    assert decode_session(encode_session(session, KEY), KEY, 10**9, None, None) == (
        SessionState.OK, session)


def test_issued_in_the_future_is_invalid() -> None:
    session = SignedSession("n1", 1060, 1060)
    value = encode_session(session, KEY)
    assert decode_session(value, KEY, 1000, None, None) == (SessionState.OK, session)  # = now+60
    assert decode_session(value, KEY, 999, None, None) == (SessionState.INVALID, None)
    assert decode_session(value, KEY, 999.5, None, None) == (SessionState.INVALID, None)


def test_last_seen_before_issued_is_invalid() -> None:
    value = encode_session(SignedSession("n1", 1000, 999), KEY)
    assert decode_session(value, KEY, 1000, None, None) == (SessionState.INVALID, None)


@pytest.mark.parametrize("route", ["bad route", "", "r" * 65, "n\u00f6", "a<b"])
def test_signed_but_malformed_route_is_invalid(route: str) -> None:
    value = encode_session(SignedSession(route, 1000, 1000), KEY)
    assert decode_session(value, KEY, 1000, None, None) == (SessionState.INVALID, None)


GARBAGE = [
    "",
    ".",
    "...",
    "....",
    "nodots",
    "a.b.c",
    "a.b.c.d.e",
    "x" * 10240,
    "x.1.1." + "A" * 10240,
    "!!!.@@@.###.$$$",
    "bjE.3e8.3e8.%%%%",
    "bjE.zz.3e8.AAAA",
    "bjE.3e8..AAAA",
    "\u00e9.\u00e9.\u00e9.\u00e9",
    "bjE.3e8.3e8.T2m0G2CCZUotgybz1Pijs\u00e9",
    "\x00.\x00.\x00.\x00",
    "bjE.3e8.3e8.A",
    "/w.1.1.AAAA",
]


@pytest.mark.parametrize("value", GARBAGE, ids=range(len(GARBAGE)))
def test_garbage_session_is_invalid(value: str) -> None:
    assert decode_session(value, KEY, 1000, 60, 3600) == (SessionState.INVALID, None)


@pytest.mark.parametrize("value", ["bjE.\u0663e8.3e8.AAAA", "bjE.3e8.\uff13e8.AAAA"],
                         ids=["arabic-indic-digit-issued", "fullwidth-digit-last-seen"])
def test_non_ascii_digits_are_invalid(value: str) -> None:
    assert decode_session(value, KEY, 1000, 60, 3600) == (SessionState.INVALID, None)


_valid_values = {encode_session(SignedSession("n1", 1000, 1000), KEY)}


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=600),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.=", max_size=120),
    st.lists(st.text(alphabet=string.ascii_letters + string.digits + "-_", max_size=30),
             min_size=4, max_size=4).map(".".join),
), st.floats(min_value=0, max_value=2e9))
def test_decode_session_never_raises(value: str, now: float) -> None:
    assert value not in _valid_values  # anything hypothesis makes up is not a signed value
    assert decode_session(value, KEY, now, 60, 3600) == (SessionState.INVALID, None)


# ---------------------------------------------------------------------------------------------
# Set-Cookie


@pytest.mark.parametrize(("spec", "expected"), [
    (CookieSpec("ROUTEID"), "ROUTEID=.n1; Path=/; HttpOnly; SameSite=Lax"),
    (CookieSpec("ROUTEID", path="/app", domain="example.com", http_only=False, secure=True,
                same_site=SameSite.NONE, max_age=3600.0),
     "ROUTEID=.n1; Path=/app; Domain=example.com; Max-Age=3600; Secure; SameSite=None"),
    (CookieSpec("ROUTEID", http_only=False, same_site=None), "ROUTEID=.n1; Path=/"),
    (CookieSpec("ROUTEID", same_site=SameSite.STRICT, secure=True),
     "ROUTEID=.n1; Path=/; Secure; HttpOnly; SameSite=Strict"),
    (CookieSpec("ROUTEID", max_age=0.0, same_site=None), "ROUTEID=.n1; Path=/; Max-Age=0; HttpOnly"),
    (CookieSpec("ROUTEID", max_age=90.0, http_only=False, same_site=None),
     "ROUTEID=.n1; Path=/; Max-Age=90"),
    (CookieSpec("ROUTEID", domain="", http_only=False, same_site=None), "ROUTEID=.n1; Path=/"),
    (CookieSpec("ROUTEID", domain=".example.com", http_only=False, same_site=None),
     "ROUTEID=.n1; Path=/; Domain=.example.com"),
], ids=["defaults", "everything", "bare", "strict-secure", "max-age-0", "max-age", "empty-domain",
        "dot-domain"])
def test_set_cookie(spec: CookieSpec, expected: str) -> None:
    assert set_cookie(spec, ".n1") == expected


def test_set_cookie_session_value_is_verbatim() -> None:
    value = encode_session(SignedSession("n1", 1000, 1000), KEY)
    assert set_cookie(CookieSpec("BPSESSION", same_site=None, http_only=False), value) == (
        f"BPSESSION={value}; Path=/")


# ---------------------------------------------------------------------------------------------
# Sticky scheduling


def m(name: str, loadfactor: float = 1, **fields: Any) -> dict[str, Any]:
    """A member with route ``name`` written as in a BalancerPool file."""
    return {"url": f"http://{name}.test:8080", "name": name, "route": name, "loadfactor": loadfactor,
            **fields}


def make_pool(*members: dict[str, Any], **spec: Any) -> BalancerPool:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "web"},
           "spec": {"routes": [{"path": "/"}], "stickysession": "JSESSIONID|jsessionid",
                    "members": list(members), **spec}}
    (pool,) = parse_pools(yaml.safe_dump(doc, sort_keys=False))
    return pool


def state(*members: dict[str, Any], **spec: Any) -> PoolState:
    return PoolState(make_pool(*members, **spec))


def found(result: tuple[MemberState | None, Reason]) -> tuple[str | None, Reason]:
    member, reason = result
    return (None if member is None else member.name), reason


def test_pool_sticky_spec_parsed() -> None:
    pool = make_pool(m("a"))
    assert pool.stickysession == BOTH
    assert pool.stickysessionsep == "."
    assert pool.scolonpathdelim is False


@pytest.mark.parametrize(("status", "expected"), [
    ("", ("a", Reason.STICKY)),
    ("N", ("a", Reason.MEMBER_DRAINING)),
    ("H", ("a", Reason.STICKY)),
    ("R", ("a", Reason.STICKY)),
    ("I", ("a", Reason.STICKY)),
    ("D", (None, Reason.MEMBER_DISABLED)),
    ("S", (None, Reason.MEMBER_DISABLED)),
    ("E", (None, Reason.MEMBER_ERROR)),
    ("C", (None, Reason.MEMBER_ERROR)),
])
def test_find_route_by_status(status: str, expected: tuple[str | None, Reason]) -> None:
    s = state(m("a", status=status), m("b"))
    assert found(s.find_route("a", 0.0)) == expected


def test_find_route_unknown_route_is_gone() -> None:
    s = state(m("a"), m("b"))
    assert found(s.find_route("zz", 0.0)) == (None, Reason.MEMBER_GONE)
    assert found(s.find_route("A", 0.0)) == (None, Reason.MEMBER_GONE)  # routes are case-sensitive


def test_find_route_member_without_route_is_gone() -> None:
    s = state({"url": "http://x.test", "name": "x"}, m("a"))
    assert found(s.find_route("x", 0.0)) == (None, Reason.MEMBER_GONE)


def test_find_route_does_not_count_an_election() -> None:
    s = state(m("a"), m("b"))
    s.find_route("a", 0.0)
    assert [(x.elected, x.lbstatus) for x in s.members] == [(0, 0), (0, 0)]


def test_find_route_error_member_after_retry() -> None:
    s = state(m("a", status="E", retry="10s"), m("b"))
    a = s.by_name["a"]
    assert found(s.find_route("a", 9.999)) == (None, Reason.MEMBER_ERROR)
    assert a.flags & E
    assert found(s.find_route("a", 10.0)) == ("a", Reason.STICKY)
    assert not a.flags & E
    assert a.retries == 1
    assert a.usable_since == 10.0


def test_find_route_member_put_in_error_at_run_time() -> None:
    s = state(m("a", retry="30s"), m("b"))
    a = s.by_name["a"]
    assert a.mark_error(100.0) is True
    assert found(s.find_route("a", 129.0)) == (None, Reason.MEMBER_ERROR)
    assert found(s.find_route("a", 130.0)) == ("a", Reason.STICKY)


def test_find_route_excluded_member_is_error() -> None:
    s = state(m("a"), m("b"))
    a = s.by_name["a"]
    assert found(s.find_route("a", 0.0, exclude=[a])) == (None, Reason.MEMBER_ERROR)
    assert found(s.find_route("a", 0.0, exclude=[s.by_name["b"]])) == ("a", Reason.STICKY)


@pytest.mark.parametrize(("status", "reason"), [
    ("D", Reason.MEMBER_DISABLED),
    ("S", Reason.MEMBER_DISABLED),
    ("E", Reason.MEMBER_ERROR),
    ("C", Reason.MEMBER_ERROR),
])
def test_find_route_redirect(status: str, reason: Reason) -> None:
    s = state(m("a", status=status, redirect="b"), m("b"), m("c"))
    assert found(s.find_route("a", 0.0)) == ("b", reason)


def test_find_route_redirect_of_excluded_member() -> None:
    s = state(m("a", redirect="b"), m("b"))
    assert found(s.find_route("a", 0.0, exclude=[s.by_name["a"]])) == ("b", Reason.MEMBER_ERROR)


def test_find_route_redirect_unused_while_usable() -> None:
    s = state(m("a", redirect="b"), m("b"))
    assert found(s.find_route("a", 0.0)) == ("a", Reason.STICKY)


@pytest.mark.parametrize("target_status", ["D", "S", "E", "C"])
def test_find_route_redirect_to_unusable_member(target_status: str) -> None:
    s = state(m("a", status="D", redirect="b"), m("b", status=target_status), m("c"))
    assert found(s.find_route("a", 0.0)) == (None, Reason.MEMBER_DISABLED)


def test_find_route_redirect_to_excluded_member() -> None:
    s = state(m("a", status="D", redirect="b"), m("b"))
    assert found(s.find_route("a", 0.0, exclude=[s.by_name["b"]])) == (None, Reason.MEMBER_DISABLED)


def test_find_route_redirect_target_retried() -> None:
    s = state(m("a", status="D", redirect="b"), m("b", status="E", retry="5s"))
    assert found(s.find_route("a", 4.0)) == (None, Reason.MEMBER_DISABLED)
    assert found(s.find_route("a", 5.0)) == ("b", Reason.MEMBER_DISABLED)


def test_note_sticky_update() -> None:
    s = state(m("a", 1), m("b", 2), m("c", 3), m("d", 4, status="D"), m("e", 1, status="N"))
    s.note_sticky(s.by_name["b"], 0.0)
    # every usable member (draining too) gains its factor, the chosen one pays the total (700)
    assert {x.name: x.lbstatus for x in s.members} == {"a": 100, "b": -500, "c": 300, "d": 0, "e": 100}
    assert {x.name: x.elected for x in s.members} == {"a": 0, "b": 1, "c": 0, "d": 0, "e": 0}


def test_note_sticky_keeps_byrequests_fair() -> None:
    """A third of the requests stick to c (whose share is a half): new sessions make up for it so
    that the cumulative counts follow the weights 1:2:3, as httpd's updatelbstatus intends."""
    s = state(m("a", 1), m("b", 2), m("c", 3))
    c = s.by_name["c"]
    for i in range(1, 601):
        if i % 3 == 0:
            s.note_sticky(c, 0.0)
        else:
            assert s.choose(0.0) is not None
        if i % 6 == 0:
            assert {x.name: x.elected for x in s.members} == {"a": i // 6, "b": i // 3, "c": i // 2}
    assert sum(x.lbstatus for x in s.members) == 0


def test_note_sticky_counts_for_the_rotation() -> None:
    """After sticky requests to a, new sessions go to b until the counts are even again."""
    s = state(m("a"), m("b"))
    a = s.by_name["a"]
    for _ in range(3):
        s.note_sticky(a, 0.0)
    picks = [x.name for x in (s.choose(0.0) for _ in range(5)) if x is not None]
    assert picks == ["b", "b", "b", "a", "b"]
    assert (a.elected, s.by_name["b"].elected) == (4, 4)


# ---------------------------------------------------------------------------------------------
# lbmethods random, leastrequest, hash


def test_random_respects_weights_and_usability() -> None:
    s = state(m("a", 1), m("b", 3), m("c", 5, status="D"), m("d", 5, status="E"), m("e", 5, status="N"),
              lbmethod="random")
    s.random = random.Random(1)
    counts = Counter(x.name for x in (s.choose(0.0) for _ in range(20_000)) if x is not None)
    assert set(counts) == {"a", "b"}
    assert sum(counts.values()) == 20_000
    assert abs(counts["a"] - 5_000) <= 300  # about five standard deviations
    assert abs(counts["b"] - 15_000) <= 300


def test_random_excludes() -> None:
    s = state(m("a"), m("b"), m("c"), lbmethod="random")
    s.random = random.Random(1)
    b = s.by_name["b"]
    counts = Counter(x.name for x in (s.choose(0.0, exclude=[b]) for _ in range(2_000)) if x is not None)
    assert set(counts) == {"a", "c"}
    assert abs(counts["a"] - 1_000) <= 150


def test_random_nothing_usable() -> None:
    s = state(m("a", status="D"), m("b", status="S"), lbmethod="random")
    assert s.choose(0.0) is None


@pytest.mark.parametrize(("busy_a", "busy_b", "expected"), [
    (5, 0, {"b"}), (0, 5, {"a"}), (1, 2, {"a"}), (3, 3, {"a", "b"}),
])
def test_leastrequest_two(busy_a: int, busy_b: int, expected: set[str]) -> None:
    s = state(m("a"), m("b"), lbmethod="leastrequest")
    s.random = random.Random(1)
    s.by_name["a"].busy, s.by_name["b"].busy = busy_a, busy_b
    assert {x.name for x in (s.choose(0.0) for _ in range(50)) if x is not None} == expected


def test_leastrequest_ties_are_not_biased_by_member_order() -> None:
    """Idle members all tie: each must get its share, not the first-listed one."""
    s = state(m("a"), m("b"), m("c"), m("d"), lbmethod="leastrequest")
    s.random = random.Random(7)
    counts = Counter(x.name for x in (s.choose(0.0) for _ in range(8_000)) if x is not None)
    assert all(abs(counts[n] - 2_000) <= 200 for n in "abcd"), counts


def test_leastrequest_per_unit_of_weight() -> None:
    s = state(m("a", 4), m("b", 1), lbmethod="leastrequest")
    s.random = random.Random(1)
    a, b = s.by_name["a"], s.by_name["b"]
    a.busy, b.busy = 2, 0  # 3/400 < 1/100
    assert {x.name for x in (s.choose(0.0) for _ in range(20)) if x is not None} == {"a"}
    a.busy = 4  # 5/400 > 1/100
    assert {x.name for x in (s.choose(0.0) for _ in range(20)) if x is not None} == {"b"}
    a.busy = 3  # 4/400 == 1/100: a tie goes to either
    assert {x.name for x in (s.choose(0.0) for _ in range(40)) if x is not None} == {"a", "b"}


def test_leastrequest_never_picks_the_busiest_of_three() -> None:
    s = state(m("a"), m("b"), m("c"), m("d", status="D"), lbmethod="leastrequest")
    s.random = random.Random(1)
    s.by_name["a"].busy, s.by_name["b"].busy, s.by_name["c"].busy = 9, 1, 4
    counts = Counter(x.name for x in (s.choose(0.0) for _ in range(3_000)) if x is not None)
    assert counts["a"] == 0
    assert counts["d"] == 0
    assert abs(counts["b"] - 2_000) <= 150  # wins both pairs it is in
    assert abs(counts["c"] - 1_000) <= 150


def test_leastrequest_single_candidate() -> None:
    s = state(m("a"), m("b", status="D"), lbmethod="leastrequest")
    chosen = s.choose(0.0)
    assert chosen is not None and chosen.name == "a"


HASH_ON = {"on": "header", "name": "X-User"}


@pytest.mark.parametrize("algorithm", ["ringhash", "maglev"])
def test_hash_same_key_same_member(algorithm: str) -> None:
    members = (m("a"), m("b", 2), m("c"))
    s1 = state(*members, lbmethod="hash", hash={**HASH_ON, "algorithm": algorithm})
    s2 = state(*members, lbmethod="hash", hash={**HASH_ON, "algorithm": algorithm})
    table = (Maglev if algorithm == "maglev" else Ring)(["a", "b", "c"], [1.0, 2.0, 1.0])
    used: set[str] = set()
    for i in range(300):
        key = f"user-{i}"
        first = s1.choose(0.0, key=key)
        assert first is not None
        assert first.name == ["a", "b", "c"][table.lookup(hash64(key))]
        again, other = s1.choose(0.0, key=key), s2.choose(0.0, key=key)
        assert again is first
        assert other is not None and other.name == first.name
        used.add(first.name)
    assert used == {"a", "b", "c"}


@pytest.mark.parametrize("algorithm", ["ringhash", "maglev"])
def test_hash_only_usable_members(algorithm: str) -> None:
    s = state(m("a"), m("b", status="D"), m("c"), lbmethod="hash", hash={**HASH_ON, "algorithm": algorithm})
    names = {x.name for x in (s.choose(0.0, key=f"k{i}") for i in range(300)) if x is not None}
    assert names == {"a", "c"}


def test_hash_without_key_returns_usable_member() -> None:
    s = state(m("a"), m("b", status="D"), m("c", status="E"), lbmethod="hash", hash=HASH_ON)
    s.random = random.Random(1)
    names = [x.name if x is not None else None for x in (s.choose(0.0, key=None) for _ in range(100))]
    assert set(names) == {"a"}


def test_hash_without_key_spreads() -> None:
    s = state(m("a"), m("b"), lbmethod="hash", hash=HASH_ON)
    s.random = random.Random(1)
    names = Counter(x.name for x in (s.choose(0.0) for _ in range(1000)) if x is not None)
    assert set(names) == {"a", "b"}
    assert sum(names.values()) == 1000


def test_ring_hash_keeps_keys_when_member_fails() -> None:
    s = state(m("a"), m("b"), m("c"), lbmethod="hash", hash=HASH_ON)
    keys = [f"user-{i}" for i in range(500)]
    before = {}
    for k in keys:
        chosen = s.choose(0.0, key=k)
        assert chosen is not None
        before[k] = chosen.name
    s.by_name["c"].mark_error(0.0)
    for k in keys:
        chosen = s.choose(1.0, key=k)
        assert chosen is not None
        if before[k] != "c":
            assert chosen.name == before[k]
        else:
            assert chosen.name in ("a", "b")


# ---------------------------------------------------------------------------------------------
# slowstart


def test_slowstart_ramp_after_error() -> None:
    s = state(m("a", status="E", retry="5s", slowstart="10s"), m("b", slowstart="10s"),
              m("c", 2, status="E", retry="5s", slowstart="10s"))
    a, b, c = s.by_name["a"], s.by_name["b"], s.by_name["c"]
    assert b.factor(0.0) == 100  # initial members do not ramp
    assert [x.name for x in s.candidates(4.0)] == ["b"]
    assert [x.name for x in s.candidates(5.0)] == ["a", "b", "c"]
    assert a.usable_since == 5.0
    ramp = [(t, a.factor(t)) for t in (5.0, 6.0, 7.5, 10.0, 14.0, 14.9, 15.0, 20.0, 1e6)]
    assert ramp == [(5.0, 10), (6.0, 10), (7.5, 25), (10.0, 50), (14.0, 90), (14.9, 99), (15.0, 100),
                    (20.0, 100), (1e6, 100)]
    assert [c.factor(t) for t in (5.0, 10.0, 15.0)] == [20, 100, 200]
    assert b.factor(5.0) == 100
    # A second error restarts the ramp from the next retry.
    a.mark_error(100.0)
    assert found(s.find_route("a", 105.0)) == ("a", Reason.STICKY)
    assert [a.factor(t) for t in (105.0, 110.0, 115.0)] == [10, 50, 100]


def test_slowstart_zero_means_no_ramp() -> None:
    s = state(m("a", status="E", retry="5s"), m("b"))
    s.candidates(5.0)
    assert s.by_name["a"].factor(5.0) == 100


def test_slowstart_weighs_byrequests() -> None:
    s = state(m("a", status="E", retry="5s", slowstart="100s"), m("b"))
    s.candidates(0.0)
    picks = Counter(x.name for x in (s.choose(5.0) for _ in range(110)) if x is not None)
    assert picks == {"a": 10, "b": 100}  # a at 10% of its weight


def test_slowstart_member_added_on_reload() -> None:
    first = state(m("a", slowstart="10s"), m("b", slowstart="10s"))
    assert [x.factor(0.0) for x in first.members] == [100, 100]
    changed_url = {**m("b", slowstart="10s"), "url": "http://b2.test:8080"}
    second = PoolState(make_pool(m("a", slowstart="10s"), changed_url, m("c", slowstart="10s")),
                       previous=first, now=50.0)
    a, b, c = (second.by_name[n] for n in "abc")
    assert a.factor(50.0) == 100  # kept across the reload
    assert [c.factor(t) for t in (50.0, 52.5, 55.0, 60.0)] == [10, 25, 50, 100]
    assert [b.factor(t) for t in (50.0, 55.0, 60.0)] == [10, 50, 100]  # a new URL is a new member
    assert second.random is first.random
