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


def forwarded_for(headers: Iterable[tuple[str, str]], value: str, field: str = "x-forwarded-for"
                  ) -> str:
    """An ``X-Forwarded-*`` list with this hop's value appended, as httpd does."""
    previous = [v for n, v in headers if n.lower() == field]
    return ", ".join([*previous, value])
