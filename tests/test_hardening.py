"""The pure request-head rules (proxy/hardening.py), directly and under hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancerpool.proxy.hardening import (
    BadRequest,
    Limits,
    check_head,
    check_path,
    check_transfer_encoding,
    split_target,
    valid_host,
)


@pytest.mark.parametrize(("target", "expected"), [
    ("http://a/x?y=1", ("/x", "y=1", "a")),
    ("HTTP://A:8080", ("/", "", "A:8080")),
    ("https://a?q", ("/", "q", "a")),
    ("http://u@a/x", ("/x", "", "u@a")),
    ("http://a#frag", ("/#frag", "", "a")),
    ("*", ("*", "", None)),
    ("a:443", ("a:443", "", None)),
])
def test_split_target(target: str, expected: tuple[str, str, str | None]) -> None:
    assert split_target(target) == expected


@pytest.mark.parametrize(("host", "ok"), [
    ("a", True), ("a.example:8080", True), ("[::1]:80", True), ("127.0.0.1", True), ("", True),
    ("a b", False), ("a/b", False), ("u@a", False), ("a:x", False), ("[::1", False), ("a\x00", False),
    ("a\r\nX: y", False),
])
def test_valid_host(host: str, ok: bool) -> None:
    assert valid_host(host) is ok


@pytest.mark.parametrize(("value", "status"), [
    ("chunked", None), (" Chunked\t", None), ("gzip, chunked", 501), ("gzip,chunked", 501),
    ("xchunked", 400), ("chunked, identity", 400), ('"chunked"', 400), ("identity", 400),
    ("chunked,", 400), ("", 400), ("\x0bchunked", 400),
])
def test_check_transfer_encoding(value: str, status: int | None) -> None:
    if status is None:
        check_transfer_encoding(value)
    else:
        with pytest.raises(BadRequest) as refused:
            check_transfer_encoding(value)
        assert refused.value.status == status


@pytest.mark.parametrize(("args", "status"), [
    (("GET", (1, 1), "/x", "a", None, False), None),
    (("GET", (1, 0), "/x", None, None, False), None),  # HTTP/1.0 may leave Host out
    (("OPTIONS", (1, 1), "*", "a", None, False), None),
    (("GET", (1, 1), "http://a/x", "A", "a", False), None),
    (("GET", (1, 1), "http://a/x", None, "a", False), 400),  # HTTP/1.1 needs Host, always
    (("GET", (2, 0), "/x", "a", None, False), 505),
    (("GET", (0, 9), "/x", None, None, False), 505),
    (("CONNECT", (1, 1), "a:443", "a:443", None, False), 405),
    (("POST", (1, 0), "/x", "a", None, True), 400),
    (("GET", (1, 1), "/x", None, None, False), 400),
    (("GET", (1, 1), "/x", "a b", None, False), 400),
    (("GET", (1, 1), "http://b/x", "a", "b", False), 400),
    (("GET", (1, 1), "http://u@a/x", "a", "u@a", False), 400),
    (("GET", (1, 1), "*", "a", None, False), 400),
    (("GET", (1, 1), "a:443", "a", None, False), 400),
])
def test_check_head(args: tuple[str, tuple[int, int], str, str | None, str | None, bool],
                    status: int | None) -> None:
    if status is None:
        check_head(*args)
    else:
        with pytest.raises(BadRequest) as refused:
            check_head(*args)
        assert refused.value.status == status


@pytest.mark.parametrize(("path", "ok"), [
    ("/", True), ("/a/b.c/.well-known/x", True), ("/a/...", True), ("/a/..b", True), ("/a%20b", True),
    ("/a/../b", False), ("/a/./b", False), ("/a/..", False), ("/a/%2e%2E/b", False), ("/a/%2E/b", False),
    ("/a/..;x=1/b", False), ("/a\\b", False),
])
def test_check_path(path: str, ok: bool) -> None:
    if ok:
        check_path(path)
    else:
        with pytest.raises(BadRequest) as refused:
            check_path(path)
        assert refused.value.status == 400


def test_limits_errors_name_each_option() -> None:
    assert Limits().errors() == []
    errors = Limits(max_headers=0, header_timeout=0, body_min_rate=-1).errors()
    assert [e.split(":")[0] for e in errors] == ["max_headers", "header_timeout", "body_min_rate"]


@given(method=st.text(max_size=10), version=st.tuples(st.integers(0, 9), st.integers(0, 9)),
       target=st.text(max_size=40), host=st.none() | st.text(max_size=20), chunked=st.booleans(),
       te=st.text(max_size=30))
def test_rules_only_ever_raise_bad_request(method: str, version: tuple[int, int], target: str,
                                           host: str | None, chunked: bool, te: str) -> None:
    for rule, args in ((check_transfer_encoding, (te,)), (check_path, (target,)),
                       (check_head, (method, version, target, host, split_target(target)[2], chunked))):
        try:
            rule(*args)
        except BadRequest as exc:
            assert exc.status in (400, 405, 501, 505) and exc.detail
