"""The pure header rules."""

from __future__ import annotations

import httptools
from hypothesis import given
from hypothesis import strategies as st

from balancerpool.proxy.headers import HOP_BY_HOP, field_list, request_fields, response_fields
from balancerpool.proxy.messages import Response, decode_fields


def test_request_fields_in_one_go() -> None:
    headers = [("Host", "shop.example"), ("Connection", "keep-alive, X-Hop, Upgrade"),
               ("X-Hop", "1"), ("TE", "trailers"), ("X-Forwarded-For", "203.0.113.9"),
               ("X-Forwarded-Host", "edge.example"), ("Upgrade", "WebSocket"), ("Accept", "*/*")]
    lines, websocket = request_fields(headers, frozenset({"host", "x-forwarded-for",
                                                          "x-forwarded-host"}),
                                      "127.0.0.1", "shop.example")
    assert lines == ["Accept: */*", "X-Forwarded-For: 203.0.113.9, 127.0.0.1",
                     "X-Forwarded-Host: edge.example, shop.example"]
    assert websocket


def test_a_websocket_needs_connection_upgrade_too() -> None:
    lines, websocket = request_fields([("Upgrade", "websocket")], frozenset(), "10.0.0.1", "")
    assert not websocket
    assert lines == ["X-Forwarded-For: 10.0.0.1"]  # no Host: no X-Forwarded-Host


def test_response_fields_pass_bytes_through_and_drop_what_the_proxy_frames() -> None:
    raw = [(b"Server", b"nginx"), (b"Content-Length", b"13"), (b"Connection", b"close, X-Hop"),
           (b"X-Hop", b"1"), (b"keep-alive", b"timeout=5"), (b"Location", b"/x"),
           (b"X-Bytes", "caf\u00e9".encode("latin-1"))]
    block, length, reverse = response_fields(raw)
    assert block == b"Server: nginx\r\nLocation: /x\r\nX-Bytes: caf\xe9\r\n"
    assert length == 13 and reverse
    block, length, reverse = response_fields([(b"Transfer-Encoding", b"chunked"),
                                              (b"Content-Length", b"13")])
    assert (block, length, reverse) == (b"", None, False)


def test_response_fields_any_spelling_of_a_name_or_value() -> None:
    """Usual spellings take a table lookup, any other the lower() call: the same result."""
    for cl, conn in ((b"Content-Length", b"Keep-Alive"), (b"content-LENGTH", b"KEEP-ALIVE"),
                     (b"CONTENT-LENGTH", b"close")):
        block, length, _ = response_fields([(cl, b"13 "), (b"CONNECTION", conn), (b"X-A", b"1")])
        assert (block, length) == (b"X-A: 1\r\n", 13), (cl, conn)
    block, length, _ = response_fields([(b"Content-Length", b"1_3"), (b"Connection", b"Close, X-a"),
                                        (b"x-A", b"1"), (b"LOCATION", b"/")])
    assert (block, length) == (b"LOCATION: /\r\n", None)


@given(st.lists(st.tuples(st.from_regex(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", fullmatch=True)
                          .filter(lambda n: n.lower() != "connection"),
                          st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF,
                                                blacklist_characters="\x7f"))
                          .map(str.strip)), max_size=8))
def test_a_field_block_decodes_to_the_fields_it_was_made_of(fields: list[tuple[str, str]]) -> None:
    raw = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields]
    kept = [(n, v) for n, v in fields
            if n.lower() not in HOP_BY_HOP | {"content-length"}]
    block, _, _ = response_fields(raw)
    assert decode_fields(block) == kept
    assert Response(200, "OK", None, 0, fields=block).field_block() == block


def test_a_response_block_becomes_a_list_only_when_asked_for() -> None:
    response = Response(200, "OK", None, 0, fields=b"Server: a\r\n")
    response.add_field("Set-Cookie", "r=.1")
    assert response.field_block() == b"Server: a\r\nSet-Cookie: r=.1\r\n"
    assert response.headers == [("Server", "a"), ("Set-Cookie", "r=.1")]
    response.add_field("X-Route", "\u2192")  # beyond Latin-1: the head is written as UTF-8
    assert response.field_block() == "Server: a\r\nSet-Cookie: r=.1\r\nX-Route: \u2192\r\n".encode()
    assert Response(204, "", None, None).field_block() == b""
    block_response = Response(200, "OK", None, 0, fields=b"Server: a\r\n")
    assert "Server: a" in repr(block_response)
    assert block_response._fields is not None  # repr left the block as it was


def test_content_length_values_are_remembered_up_to_a_bound() -> None:
    from balancerpool.proxy import headers

    for n in range(headers.LENGTHS_MAX + 50):
        value = str(n).encode()
        assert headers._content_length(value) == n
        assert response_fields([(b"Content-Length", value)])[1] == n  # from the cache, or not
    assert len(headers._LENGTHS) == headers.LENGTHS_MAX
    assert headers._content_length(b" 7 ") == 7 and headers._content_length(b"7x") is None
    assert b"7x" not in headers._LENGTHS


def test_content_length_lines_are_remembered_up_to_a_bound() -> None:
    from balancerpool.proxy import headers

    for length in range(headers.LENGTHS_MAX + 100):
        assert headers.content_length_line(length) == b"Content-Length: %d\r\n" % length
    assert len(headers._LENGTH_LINES) == headers.LENGTHS_MAX  # no more than that
    assert headers._LENGTH_LINES[7] == b"Content-Length: 7\r\n"


_TOKEN = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
                 min_size=1, max_size=12)
_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
                 max_size=20)


@given(st.lists(st.tuples(_TOKEN, st.sampled_from(["", " ", "  ", "\t", " \t"]), _VALUE), max_size=8))
def test_field_list_reads_a_block_as_llhttp_gives_its_fields(
        lines: list[tuple[str, str, str]]) -> None:
    """UpstreamConnection reads a member's fields from the head's bytes, once llhttp has found
    it valid, instead of taking them one by one from its on_header callback: both must agree."""
    block = "".join(f"{name}:{ows}{value}\r\n" for name, ows, value in lines).encode("latin-1")
    given_fields: list[tuple[bytes, bytes]] = []

    class Fields:
        def on_header(self, name: bytes, value: bytes) -> None:
            given_fields.append((name, value))

    parser = httptools.HttpResponseParser(Fields())
    try:
        parser.feed_data(b"HTTP/1.1 204 No Content\r\n" + block + b"\r\n")
    except httptools.HttpParserError:
        return  # not a head llhttp takes (trailing whitespace before CRLF, say): never read
    assert field_list(block) == given_fields
