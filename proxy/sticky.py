"""Sticky sessions as pure functions: where a request's route comes from, and the cookies that
carry it.

httpd's rules (mod_proxy_balancer ``find_session_route``): the URL parameter named in
``stickysession`` wins over the cookie; ``stickysessionsep`` (default ``.``) splits a Tomcat value
``id.route`` and the part after the first separator is the route. With ``scolonpathdelim`` the
parameter may also stand in the path as ``;jsessionid=id.route``.

Beyond httpd: a signed sliding session cookie (route, issued-at, last-seen, HMAC) that makes idle
and absolute session timeouts work with no server-side table, identically on every replica.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

# A route taken from a request must have the model's route syntax; anything else is hostile or
# broken and is never looked up, logged raw or echoed.
from .model import ROUTE_RE, CookieSpec, StickySession

MAX_VALUE: Final = 4096


class Reason(enum.StrEnum):
    """Why a request went where it went: in the access log and counted per pool."""

    NEW_SESSION = "new-session"
    STICKY = "sticky"
    MEMBER_GONE = "member-gone"
    MEMBER_ERROR = "member-error"
    MEMBER_DRAINING = "member-draining"
    MEMBER_DISABLED = "member-disabled"
    COOKIE_INVALID = "cookie-invalid"
    COOKIE_EXPIRED = "cookie-expired"
    NOFAILOVER = "nofailover"


@dataclass(frozen=True, slots=True)
class SessionRoute:
    """The route a request asks for. ``source`` is the cookie or parameter name that carried it
    (``BALANCER_SESSION_STICKY``); ``malformed`` marks a value present but unusable."""

    route: str | None
    source: str | None
    malformed: bool = False


NO_ROUTE: Final = SessionRoute(None, None)


def cookie_value(cookie_headers: Iterable[str], name: str) -> str | None:
    """The first value of cookie ``name`` (case-sensitive, as httpd) across Cookie headers."""
    for header in cookie_headers:
        if name not in header:
            continue
        for part in header.split(";"):
            key, eq, value = part.strip().partition("=")
            if eq and key == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value
    return None


def query_param(query: str, name: str) -> str | None:
    """The first value of ``name`` in a query string (undecoded, like httpd)."""
    if not query or name not in query:
        return None
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if eq and key == name:
            return value
    return None


def path_param(path: str, name: str) -> str | None:
    """``;name=value`` in the path (the Java servlet form), up to the next ``;`` ``/`` or ``?``."""
    marker = ";" + name + "="
    start = path.find(marker)
    if start < 0:
        return None
    start += len(marker)
    end = len(path)
    for delim in ";/?&":
        found = path.find(delim, start)
        if 0 <= found < end:
            end = found
    return path[start:end]


def route_from_value(value: str, sep: str | None) -> str | None:
    """httpd: everything after the first separator is the route; no separator, no route."""
    if sep is None:
        return value
    _, found, route = value.partition(sep)
    return route if found else None


def extract_route(path: str, query: str, cookie_headers: Iterable[str], sticky: StickySession,
                  sep: str | None, scolonpathdelim: bool) -> SessionRoute:
    """The route a request carries, the parameter winning over the cookie (httpd's order)."""
    value: str | None = None
    source: str | None = None
    if sticky.param is not None:
        # httpd's get_path_param skips an empty value, so the cookie still counts then.
        value = query_param(query, sticky.param) or None
        if value is None and scolonpathdelim:
            value = path_param(path, sticky.param) or None
        if value is not None:
            source = sticky.param
    if value is None and sticky.cookie is not None:
        value = cookie_value(cookie_headers, sticky.cookie)
        if value is not None:
            source = sticky.cookie
    if value is None or not value:
        return NO_ROUTE
    if len(value) > MAX_VALUE:
        return SessionRoute(None, source, malformed=True)
    route = route_from_value(value, sep)
    if not route:
        return SessionRoute(None, source)  # a session without a route yet: treated as new
    if not ROUTE_RE.match(route):
        return SessionRoute(None, source, malformed=True)
    return SessionRoute(route, source)


# --- Set-Cookie ---------------------------------------------------------------------------------


def set_cookie(spec: CookieSpec, value: str) -> str:
    parts = [f"{spec.name}={value}", f"Path={spec.path}"]
    if spec.domain:
        parts.append(f"Domain={spec.domain}")
    if spec.max_age is not None:
        parts.append(f"Max-Age={int(spec.max_age)}")
    if spec.secure:
        parts.append("Secure")
    if spec.http_only:
        parts.append("HttpOnly")
    if spec.same_site is not None:
        parts.append(f"SameSite={spec.same_site.value}")
    return "; ".join(parts)


# --- the signed sliding session cookie ----------------------------------------------------------


class SessionState(enum.Enum):
    OK = "ok"
    INVALID = "invalid"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class SignedSession:
    route: str
    issued: int
    last_seen: int


_SIG_BYTES: Final = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: str) -> bytes:
    return hmac.new(key, payload.encode("ascii"), hashlib.sha256).digest()[:_SIG_BYTES]


def encode_session(session: SignedSession, key: bytes) -> str:
    """``route.issued.lastseen.signature``, all URL-safe: no quoting needed in a cookie."""
    payload = f"{_b64(session.route.encode())}.{session.issued:x}.{session.last_seen:x}"
    return f"{payload}.{_b64(_mac(key, payload))}"


def decode_session(value: str, key: bytes, now: float, idle_timeout: float | None,
                   absolute_timeout: float | None) -> tuple[SessionState, SignedSession | None]:
    """Check the signature first, then the times; a bad cookie is never an error, only ignored."""
    if len(value) > 512 or not value.isascii():
        return SessionState.INVALID, None
    payload, _, signature = value.rpartition(".")
    parts = payload.split(".")
    # Compare the signature as text: only the exact encoding encode_session writes is accepted.
    if len(parts) != 3 or not hmac.compare_digest(signature, _b64(_mac(key, payload))):
        return SessionState.INVALID, None
    try:
        route = _unb64(parts[0]).decode("ascii")
        issued, last_seen = int(parts[1], 16), int(parts[2], 16)
    except (ValueError, UnicodeDecodeError):
        return SessionState.INVALID, None
    if not ROUTE_RE.match(route):
        return SessionState.INVALID, None
    session = SignedSession(route, issued, last_seen)
    if issued > now + 60 or last_seen < issued:  # from the future: a key or clock problem
        return SessionState.INVALID, None
    if absolute_timeout is not None and now - issued > absolute_timeout:
        return SessionState.EXPIRED, session
    if idle_timeout is not None and now - last_seen > idle_timeout:
        return SessionState.EXPIRED, session
    return SessionState.OK, session
