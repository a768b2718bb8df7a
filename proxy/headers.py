"""Header rules of a reverse proxy, as pure functions: hop-by-hop removal, forwarding headers,
path mapping and ``ProxyPassReverse``-style rewriting of redirects."""

from __future__ import annotations

from collections.abc import Iterable

# RFC 9110 §7.6.1 plus the historical Proxy-Connection and Keep-Alive.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
#: Fields the proxy writes itself toward the backend.
OWN_REQUEST_FIELDS = frozenset({"host", "content-length", "expect", "x-forwarded-proto"})
REVERSE_FIELDS = frozenset({"location", "content-location", "uri"})


def connection_tokens(headers: Iterable[tuple[str, str]]) -> frozenset[str]:
    """Field names listed in ``Connection``: hop-by-hop for this hop only (RFC 9110 §7.6.1)."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() == "connection":
            tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return frozenset(tokens)


def end_to_end(headers: Iterable[tuple[str, str]], also_drop: frozenset[str] = frozenset()
               ) -> list[tuple[str, str]]:
    """The headers without hop-by-hop fields, those named in Connection, and ``also_drop``."""
    headers = list(headers)
    listed = connection_tokens(headers)
    return [(n, v) for n, v in headers
            if (low := n.lower()) not in HOP_BY_HOP and low not in listed and low not in also_drop]


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
    """The request fields to forward as ``Name: value`` lines, in two passes over the headers
    (the proxy's per-request path): the end-to-end fields, then ``X-Forwarded-For`` and
    ``X-Forwarded-Host`` with this hop appended to any list the client sent, as httpd does.
    Also says whether the request asks for a WebSocket (``Upgrade: websocket`` with
    ``Connection: upgrade``; the method is the caller's to check)."""
    listed = connection_tokens(headers)
    lines: list[str] = []
    xff: list[str] = []
    xfh: list[str] = []
    websocket = False
    for name, value in headers:
        low = name.lower()
        if low == "x-forwarded-for":
            xff.append(value)
        elif low == "x-forwarded-host":
            xfh.append(value)
        elif low == "upgrade" and "websocket" in value.lower():
            websocket = True
        if low not in HOP_BY_HOP and low not in listed and low not in drop:
            lines.append(f"{name}: {value}")
    xff.append(client)
    lines.append(f"X-Forwarded-For: {', '.join(xff)}")
    if host:
        xfh.append(host)
        lines.append(f"X-Forwarded-Host: {', '.join(xfh)}")
    return lines, websocket and "upgrade" in listed
