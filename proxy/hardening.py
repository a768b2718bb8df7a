"""What keeps hostile requests out, as pure rules: the client-side limits and timeouts, and the
checks on a request head that the HTTP parser (llhttp) leaves to the server.

llhttp already refuses what would let two parsers disagree about where a request ends: both
``Content-Length`` and ``Transfer-Encoding``, duplicate or malformed ``Content-Length``, bad chunk
sizes, extensions and trailers, bare CR or LF, obs-fold, and names or values with bytes no token
or field value may hold. What it accepts but a proxy must not forward is checked here: a request
``Transfer-Encoding`` other than plain ``chunked`` (llhttp notices a bad one only once the body
starts, after the head would have gone out), ``Transfer-Encoding`` in HTTP/1.0, a missing,
repeated or malformed ``Host``, an absolute-form target whose authority disagrees with ``Host``
or carries userinfo, ``CONNECT`` (this is a reverse proxy, never a tunnel to anywhere) and HTTP
versions other than 1.0 and 1.1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class BadRequest(Exception):
    """A request the front end refuses with ``status`` (400, 405, 408, 414, 431, 501, 505); the
    connection is closed after the answer."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Limits:
    """Client-side limits of a listener. Defaults follow httpd (LimitRequestLine,
    LimitRequestFieldSize, LimitRequestFields) and mod_reqtimeout (``header=20
    body=20,MinRate=500``); ``keepalive_timeout`` is nginx's."""

    #: Request line (method, target, version) in bytes: 414 beyond.
    max_request_line: int = 8190
    #: One header field (name, colon, value): 431 beyond.
    max_header_size: int = 8190
    #: Number of header fields: 400 beyond, as httpd and HAProxy answer.
    max_headers: int = 100
    #: The whole header section: 431 beyond.
    max_header_section: int = 64 * 1024
    #: From a request's first byte (a new connection's accept) to the end of its head: 408 after.
    header_timeout: float = 20.0
    #: A request body may take ``body_timeout`` seconds plus one second per ``body_min_rate``
    #: bytes received (mod_reqtimeout's rule), counted while the proxy is reading: 408 after.
    body_timeout: float = 20.0
    body_min_rate: int = 500
    #: An idle keep-alive connection is closed after this long.
    keepalive_timeout: float = 75.0
    #: A client that reads nothing of a response for this long is cut (nginx's send_timeout),
    #: so that it cannot hold a member's connection.
    send_timeout: float = 60.0

    def errors(self) -> list[str]:
        """What is wrong with these limits, each naming its option."""
        out = []
        for name in ("max_request_line", "max_header_size", "max_headers", "max_header_section"):
            if getattr(self, name) < 1:
                out.append(f"{name}: must be at least 1")
        for name in ("header_timeout", "body_timeout", "keepalive_timeout", "send_timeout"):
            if not getattr(self, name) > 0:
                out.append(f"{name}: must be more than 0 seconds")
        if self.body_min_rate < 0:
            out.append("body_min_rate: must be 0 (no allowance) or more bytes per second")
        return out


DEFAULT_LIMITS = Limits()

# RFC 9110 section 7.2: Host = uri-host [ ":" port ]; uri-host an IP literal or a reg-name.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")
# A transfer coding list (tokens separated by commas and optional whitespace).
_TOKEN_LIST = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+(?:[ \t]*,[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+)*\Z")


def valid_host(value: str) -> bool:
    return _HOST.match(value) is not None


def check_transfer_encoding(value: str) -> None:
    """A request's ``Transfer-Encoding``: only ``chunked`` is forwarded (the proxy re-frames the
    body and does not decode other codings)."""
    text = value.strip(" \t").lower()
    if text == "chunked":
        return
    if _TOKEN_LIST.match(text) and text.rsplit(",", 1)[-1].strip(" \t") == "chunked":
        raise BadRequest(501, f"Transfer-Encoding {value.strip()!r} is not implemented: "
                              "only chunked is")
    raise BadRequest(400, f"invalid Transfer-Encoding {value.strip()!r}")


def check_head(method: str, version: tuple[int, int], target: str, host: str | None,
               authority: str | None, chunked: bool) -> None:
    """The checks on a parsed head that the parser leaves to us. ``host``: the Host field (None
    when absent); ``authority``: an absolute-form target's authority (None in origin form)."""
    if version != (1, 1) and version != (1, 0):
        raise BadRequest(505, f"HTTP/{version[0]}.{version[1]} is not supported: 1.0 and 1.1 are")
    if method == "CONNECT":
        raise BadRequest(405, "CONNECT is not supported: this is a reverse proxy, not a tunnel")
    if chunked and version == (1, 0):
        raise BadRequest(400, "Transfer-Encoding in an HTTP/1.0 request")
    if host is None:
        if version == (1, 1):
            raise BadRequest(400, "missing Host header field")
    elif not valid_host(host):
        raise BadRequest(400, f"invalid Host {host!r}")
    if authority is not None:
        if "@" in authority:
            raise BadRequest(400, "userinfo in the request target")
        if not valid_host(authority):
            raise BadRequest(400, f"invalid authority {authority!r} in the request target")
        if host is not None and host.lower() != authority.lower():
            raise BadRequest(400, f"Host {host!r} does not match the request target's "
                                  f"authority {authority!r}")
    elif target == "*":
        if method != "OPTIONS":
            raise BadRequest(400, "the asterisk target is for OPTIONS only")
    elif target[:1] != "/":
        raise BadRequest(400, "the request target is neither a path nor an absolute URI")


def check_path(path: str) -> None:
    """Refuse dot-segments (``.``, ``..``, also percent-encoded or as Tomcat's ``..;``) and
    backslashes: routes match path prefixes, and a backend that resolves ``/public/../admin``
    itself would serve what no route allows. Browsers never send them."""
    if "\\" in path:
        raise BadRequest(400, "backslash in the request path")
    for segment in path.split("/"):
        name = segment.partition(";")[0]
        if "%" in name:
            name = name.replace("%2e", ".").replace("%2E", ".")
        if name == "." or name == "..":
            raise BadRequest(400, f"dot-segment {segment!r} in the request path")


def split_target(url: str) -> tuple[str, str, str | None]:
    """Path, query and authority (None unless absolute form) of a request target that is not in
    origin form: absolute form ``http://host/path``, or ``*``."""
    lower = url[:8].lower()
    if lower.startswith("http://") or lower.startswith("https://"):
        rest = url[url.index("//") + 2:]
        cut = len(rest)
        for sep in "/?#":
            at = rest.find(sep)
            if at != -1 and at < cut:
                cut = at
        target = rest[cut:]
        if not target.startswith("/"):
            target = "/" + target
        path, _, query = target.partition("?")
        return path, query, rest[:cut]
    path, _, query = url.partition("?")
    return path, query, None
