"""Header rules of a reverse proxy, as pure functions: hop-by-hop removal, forwarding headers,
path mapping and ``ProxyPassReverse``-style rewriting of redirects."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# RFC 9110 §7.6.1 plus the historical Proxy-Connection and Keep-Alive.
HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
#: Fields the proxy writes itself toward the backend.
OWN_REQUEST_FIELDS: Final = frozenset({"host", "content-length", "expect", "x-forwarded-proto"})
REVERSE_FIELDS: Final = frozenset({"location", "content-location", "uri"})


#: What a response head loses on its way to the client: the proxy frames the body itself.
_RESPONSE_DROP: Final = frozenset({n.encode() for n in HOP_BY_HOP | {"content-length"}})
_PLAIN_CONNECTION: Final = frozenset({b"keep-alive", b"close"})
_REVERSE_BYTES: Final = frozenset({n.encode() for n in REVERSE_FIELDS})
#: What a request head loses besides a pool's own list: the forwarding fields are rewritten.
_REQUEST_DROP: Final = HOP_BY_HOP | {"x-forwarded-for", "x-forwarded-host"}
#: The usual spellings of those names, lowercased without a method call (one per field).
_LOWER: Final = {spelling: name for name in _RESPONSE_DROP | _REVERSE_BYTES
                 for spelling in (name, name.title(), name.upper())}
#: ``Connection`` values that list no field name, as sent.
_PLAIN_CONNECTION_SENT: Final = frozenset({b"keep-alive", b"close", b"Keep-Alive", b"Close"})
#: Bit n set: some field the response rules look at has a name n bytes long. Most fields
#: (Date, Server, Content-Type ...) are passed on without being lowercased and looked up.
_RESPONSE_SIZES: Final = sum({1 << len(n) for n in _RESPONSE_DROP | _REVERSE_BYTES})


#: Content-Length values read from members (``_content_length``) and lines written to clients
#: (``content_length_line``), up to LENGTHS_MAX of each: the same resources answer with the
#: same lengths, and a lookup costs less than parsing or formatting the number.
_LENGTHS: Final[dict[bytes, int]] = {}
_LENGTH_LINES: Final[dict[int, bytes]] = {}
LENGTHS_MAX: Final = 4096


def content_length_line(length: int) -> bytes:
    """``Content-Length: N`` with its CRLF, for a response head."""
    line = _LENGTH_LINES.get(length)
    if line is None:
        line = b"Content-Length: %d\r\n" % length
        if len(_LENGTH_LINES) < LENGTHS_MAX:
            _LENGTH_LINES[length] = line
    return line


def _content_length(value: bytes) -> int | None:
    """A Content-Length value's number, or None when it is not one."""
    digits = value if value.isdigit() else value.strip()
    if not digits.isdigit():
        return None
    # int() of the str: compiled, int() of bytes goes through the builtins module.
    length = int(digits.decode("ascii"))
    if len(_LENGTHS) < LENGTHS_MAX:
        _LENGTHS[value] = length
    return length


def _tokens(value: str, listed: set[str] | None) -> set[str]:
    """Field names listed in ``Connection``: hop-by-hop for this hop only (RFC 9110 §7.6.1)."""
    tokens = listed if listed is not None else set()
    tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def response_fields(raw: list[tuple[bytes, bytes]]) -> tuple[bytes, int | None, bool]:
    """A member's response fields to pass on, in one pass (the per-request path): without
    hop-by-hop fields, those named in Connection, and Content-Length, as the block of
    CRLF-ended lines the front end writes (bytes as received: nothing decoded); with that
    length (None when chunked or absent) and whether any field may need ``ProxyPassReverse``."""
    parts: list[bytes] = []
    length: int | None = None
    chunked = reverse = False
    listed: set[str] | None = None
    drop = _RESPONSE_DROP
    for name, value in raw:
        size = len(name)
        if size < 64 and _RESPONSE_SIZES >> size & 1:
            low = _LOWER.get(name)
            if low is None:
                low = name.lower()
            if low in drop:
                if low == b"content-length":
                    length = _LENGTHS.get(value)
                    if length is None:
                        length = _content_length(value)
                elif low == b"transfer-encoding":
                    chunked = True
                elif (low == b"connection" and value not in _PLAIN_CONNECTION_SENT
                      and value.lower() not in _PLAIN_CONNECTION):
                    listed = _tokens(value.decode("latin-1"), listed)
                continue
            if low in _REVERSE_BYTES:
                reverse = True
        # One flat list joined once: no bytes object per field.
        parts.append(name)
        parts.append(b": ")
        parts.append(value)
        parts.append(b"\r\n")
    if listed and not listed <= HOP_BY_HOP:
        parts = [part for i in range(0, len(parts), 4)
                 if parts[i].decode("latin-1").lower() not in listed for part in parts[i:i + 4]]
    return b"".join(parts), None if chunked else length, reverse


def field_list(block: bytes) -> list[tuple[bytes, bytes]]:
    """The fields of a head's field block (CRLF-ended lines) that llhttp found valid, as its
    callbacks would give them: the name as sent, the value without the whitespace before it."""
    fields = []
    for line in block.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.append((name, value.lstrip(b" \t")))
    return fields


def map_path(path: str, route_prefix: str, backend_prefix: str) -> str:
    """``ProxyPass /app http://m/base`` maps /app/x to /base/x (prefixes without trailing /)."""
    mapped = backend_prefix + path[len(route_prefix):]
    return mapped if mapped.startswith("/") else "/" + mapped


def reverse_location(value: str, backend_urls: Iterable[str], backend_prefix: str,
                     front_origin: str, route_prefix: str) -> str:
    """Map a backend's redirect target back into the client's view of the URL space.

    ``backend_urls`` are the members' ``http://host:port`` + base path + backend prefix, as
    httpd matches ``ProxyPassReverse / balancer://pool/`` against every member.
    """
    for url in backend_urls:
        if value.startswith(url) and (len(value) == len(url) or value[len(url)] in "/?#"):
            rest = value[len(url):]
            return front_origin + (route_prefix + rest if (route_prefix + rest) else "/")
    if backend_prefix != route_prefix and value.startswith(backend_prefix + "/"):
        return route_prefix + value[len(backend_prefix):]
    return value


def request_fields(headers: list[tuple[str, str]], drop: frozenset[str], client: str, host: str
                   ) -> tuple[list[str], bool]:
    """The request fields to forward as ``Name: value`` lines, in one pass over the headers
    (the proxy's per-request path): the end-to-end fields, then ``X-Forwarded-For`` and
    ``X-Forwarded-Host`` with this hop appended to any list the client sent, as httpd does.
    Also says whether the request asks for a WebSocket (``Upgrade: websocket`` with
    ``Connection: upgrade``; the method is the caller's to check)."""
    lines: list[str] = []
    xff: list[str] = []
    xfh: list[str] = []
    listed: set[str] | None = None
    websocket = False
    hop = _REQUEST_DROP
    for name, value in headers:
        low = name.lower()
        if low in hop:
            if low == "x-forwarded-for":
                xff.append(value)
            elif low == "x-forwarded-host":
                xfh.append(value)
            elif low == "connection":
                listed = _tokens(value, listed)
            elif low == "upgrade" and "websocket" in value.lower():
                websocket = True
        elif low not in drop:
            lines.append(f"{name}: {value}")
    if listed and not listed <= HOP_BY_HOP:
        lines = [line for line in lines if line[:line.index(":")].lower() not in listed]
    xff.append(client)
    lines.append(f"X-Forwarded-For: {', '.join(xff)}")
    if host:
        xfh.append(host)
        lines.append(f"X-Forwarded-Host: {', '.join(xfh)}")
    return lines, websocket and listed is not None and "upgrade" in listed
