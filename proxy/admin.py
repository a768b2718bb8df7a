"""The admin listener: ``/healthz``, ``/readyz``, ``/metrics``, the balancer-manager page and its
JSON API. Never on the data port; 127.0.0.1 by default.

Every change must pass, in this order: authentication (bearer token or Basic against a hashed
password), the Origin (or Referer) check, the CSRF token bound to the login session, and the
pool's nonce, which changes after every successful change (httpd's ``nonce``). No GET changes
anything. A change is validated by the model's own parser (so a bad value is a 400 naming its
field), written to the :class:`~.persist.ConfigStore` when there is one, then applied through
``Forwarder.apply``: members keep their state, counters and connections.

``python -m balancerpool.proxy.admin hash-password [--user NAME]`` prints a password-file line.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import getpass
import hashlib
import hmac
import importlib
import logging
import secrets
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import yaml
from aiohttp import web
from multidict import MultiDictProxy

from . import metrics as metrics_module
from .forward import Forwarder, Pool
from .keys import load_session_keys
from .model import BalancerPool, FieldError, InvalidBalancerPool, apply_flags, parse_pools
from .persist import ConfigStore, to_document
from .scheduling import MemberState, Transition, bits_to_flags, flags_to_bits
from .server import aiohttp_site

log = logging.getLogger("balancerpool.admin")

#: The status flags the manager sets, as httpd's balancer-manager: Disabled, draiN, Hot standby,
#: Stopped, Ignore errors, hot spaRe. E and C belong to the proxy's own checks.
MANAGER_FLAGS = "DNHSIR"
FLAG_NAMES = {"D": "disabled", "N": "draining", "H": "hot standby", "S": "stopped",
              "I": "ignore errors", "R": "hot spare", "E": "error", "C": "health check failed"}
MEMBER_FIELDS = ("loadfactor", "lbset", "route", "redirect", "status")
NEW_MEMBER_FIELDS = ("url", "name", "route", "redirect", "loadfactor", "lbset", "status", "retry",
                     "timeout", "connectiontimeout")
POOL_FIELDS = ("lbmethod", "timeout", "maxattempts", "stickysession", "healthCheck")
HEALTH_FIELDS = ("method", "uri", "interval", "timeout", "passes", "fails")
CSRF_COOKIE = "bpm_csrf"
CSRF_HEADER = "X-CSRF-Token"
SESSION_LIFETIME = 12 * 3600.0
MAX_SESSIONS = 1000
PBKDF2 = "pbkdf2_sha256"
DEFAULT_ITERATIONS = 600_000
REALM = "balancerpool manager"

# ---------------------------------------------------------------------------------------------
# Passwords and tokens


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: str | None = None) -> str:
    """``pbkdf2_sha256$<iterations>$<salt>$<base64 sha256 digest>`` (Django's layout)."""
    salt = salt if salt is not None else secrets.token_hex(16)
    if not salt or "$" in salt:
        raise ValueError("the salt must be non-empty and hold no '$'")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"{PBKDF2}${iterations}${salt}${base64.b64encode(digest).decode()}"


def _is_bcrypt(encoded: str) -> bool:
    return encoded[:4] in ("$2a$", "$2b$", "$2y$")


def _bcrypt() -> Any:
    """The bcrypt module when installed (optional), else None."""
    try:
        return importlib.import_module("bcrypt")
    except ImportError:
        return None


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a ``pbkdf2_sha256$...`` or (with the bcrypt package) a
    bcrypt hash; constant time in the digest comparison."""
    if encoded.startswith(PBKDF2 + "$"):
        try:
            _, iterations, salt, digest = encoded.split("$")
            expected = base64.b64decode(digest, validate=True)
            rounds = int(iterations)
        except ValueError:
            return False
        actual = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), rounds)
        return hmac.compare_digest(actual, expected)
    bcrypt = _bcrypt() if _is_bcrypt(encoded) else None
    if bcrypt is not None:
        try:
            return bool(bcrypt.checkpw(password.encode(), encoded.encode()))
        except ValueError:
            return False
    return False


def _check_hash(encoded: str) -> str | None:
    """Why a stored hash cannot be used, or None."""
    if encoded.startswith(PBKDF2 + "$"):
        parts = encoded.split("$")
        if len(parts) != 4 or not parts[1].isdigit() or int(parts[1]) < 1 or not parts[2]:
            return f"malformed {PBKDF2} hash: want {PBKDF2}$ITERATIONS$SALT$BASE64DIGEST"
        try:
            if len(base64.b64decode(parts[3], validate=True)) != 32:
                return f"the {PBKDF2} digest must be 32 bytes in base64"
        except ValueError:
            return f"the {PBKDF2} digest is not base64"
        return None
    if _is_bcrypt(encoded):
        return None if _bcrypt() is not None else "a bcrypt hash needs the bcrypt package installed"
    return (f"unsupported hash format: use {PBKDF2}$... (python -m balancerpool.proxy.admin "
            f"hash-password) or bcrypt")


class AdminAuth:
    """Who may use the manager: bearer tokens and/or users with hashed passwords.

    A token also works as the password of Basic auth with the user name ``token``, so a browser
    can log in with only a token file."""

    def __init__(self, users: Mapping[str, str] | None = None, tokens: Iterable[str] = (),
                 locked: bool = False) -> None:
        """``locked``: no credentials on purpose; probes and metrics serve, nobody logs in."""
        self.users = dict(users or {})
        for user, encoded in self.users.items():
            problem = _check_hash(encoded)
            if problem is not None:
                raise ValueError(f"user {user!r}: {problem}")
        self._tokens = [hashlib.sha256(t.encode()).digest() for t in tokens]
        if not self.users and not self._tokens and not locked:
            raise ValueError("the admin listener needs a token file or a password file")
        #: sha256(user, password) -> expiry: PBKDF2 is slow on purpose, so a login is verified
        #: once and then remembered for a few minutes.
        self._verified: OrderedDict[bytes, float] = OrderedDict()

    @classmethod
    def from_files(cls, token_file: str | Path | None = None,
                   htpasswd_file: str | Path | None = None) -> AdminAuth:
        """Tokens: one per line, at least 16 characters. Passwords: ``user:hash`` lines, the hash
        ``pbkdf2_sha256$ITERATIONS$SALT$BASE64`` or bcrypt (``$2b$...``, with the bcrypt
        package). Blank lines and ``#`` comments are skipped. Raises ValueError naming the line."""
        tokens: list[str] = []
        users: dict[str, str] = {}
        if token_file is not None:
            for n, line in _lines(Path(token_file)):
                if len(line) < 16:
                    raise ValueError(f"{token_file}:{n}: a token needs at least 16 characters")
                tokens.append(line)
        if htpasswd_file is not None:
            for n, line in _lines(Path(htpasswd_file)):
                user, sep, encoded = line.partition(":")
                if not sep or not user or not encoded:
                    raise ValueError(f"{htpasswd_file}:{n}: want user:hash")
                problem = _check_hash(encoded)
                if problem is not None:
                    raise ValueError(f"{htpasswd_file}:{n}: {problem}")
                if user in users:
                    raise ValueError(f"{htpasswd_file}:{n}: user {user!r} repeats")
                users[user] = encoded
        return cls(users, tokens)

    @classmethod
    def ephemeral(cls, user: str = "admin") -> tuple[AdminAuth, str]:
        """A random password for ``user`` (also valid as a bearer token), for the demo."""
        password = secrets.token_urlsafe(18)
        return cls({user: hash_password(password, iterations=100_000)}, [password]), password

    def _token_ok(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for known in self._tokens:
            ok |= hmac.compare_digest(digest, known)
        return ok

    async def identify(self, authorization: str | None) -> str | None:
        """The identity an ``Authorization`` header proves (``token`` or ``user:NAME``), or None."""
        if not authorization:
            return None
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer":
            return "token" if credentials and self._token_ok(credentials) else None
        if scheme.lower() != "basic":
            return None
        try:
            user, sep, password = base64.b64decode(credentials, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        if not sep:
            return None
        if user == "token" and self._token_ok(password):
            return "token"
        encoded = self.users.get(user)
        if encoded is None:
            return None
        key = hashlib.sha256(f"{user}\0{password}\0{encoded}".encode()).digest()
        now = time.monotonic()
        if self._verified.get(key, 0.0) > now:
            return f"user:{user}"
        if not await asyncio.to_thread(verify_password, password, encoded):
            return None
        self._verified[key] = now + 300.0
        while len(self._verified) > 256:
            self._verified.popitem(last=False)
        return f"user:{user}"


def _lines(path: Path) -> Iterable[tuple[int, str]]:
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield n, line


# ---------------------------------------------------------------------------------------------
# State of the admin listener


@dataclasses.dataclass
class _Session:
    identity: str
    expires: float


class Rejected(Exception):
    """A refused request: its status and the reason the client sees."""

    def __init__(self, status: int, reason: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.errors = errors or []


class Manager:
    """What the admin handlers share: the forwarder, auth, nonces, login sessions."""

    def __init__(self, forwarder: Forwarder, auth: AdminAuth, store: ConfigStore | None,
                 ready: Callable[[], bool], origins: Iterable[str]) -> None:
        self.forwarder = forwarder
        self.auth = auth
        self.store = store
        self.ready = ready
        #: Origins a change may come from: the listener's own (added once it is bound) and any
        #: configured (a port-forward, an ingress in front of it).
        self.origins: set[str] = {_origin_of(o) or o for o in origins}
        self.nonces: dict[str, str] = {}
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.lock = asyncio.Lock()
        #: Called with the whole configuration after each applied change (``--workers``: the
        #: other worker processes apply it too).
        self.on_applied: Callable[[list[BalancerPool]], None] | None = None
        #: Turns this process's /metrics text into the one served (``--workers``: every
        #: worker's, each sample labelled with its worker).
        self.gather_metrics: Callable[[bytes], Awaitable[bytes]] | None = None

    def nonce(self, pool: str) -> str:
        value = self.nonces.get(pool)
        if value is None:
            value = self.nonces[pool] = secrets.token_urlsafe(16)
        return value

    def session(self, request: web.Request, identity: str) -> tuple[str, bool]:
        """The login session's CSRF token, and whether it is new (then set its cookie)."""
        now = time.monotonic()
        token = request.cookies.get(CSRF_COOKIE, "")
        session = self.sessions.get(token)
        if session is not None and session.identity == identity and session.expires > now:
            return token, False
        token = secrets.token_urlsafe(24)
        self.sessions[token] = _Session(identity, now + SESSION_LIFETIME)
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return token, True

    def check_csrf(self, request: web.Request, identity: str, sent: str | None) -> None:
        cookie = request.cookies.get(CSRF_COOKIE)
        if not cookie:
            raise Rejected(403, "no CSRF session cookie: load the manager page (or GET /api/pools) "
                                "first")
        session = self.sessions.get(cookie)
        if session is None or session.expires <= time.monotonic():
            raise Rejected(403, "the CSRF session is unknown or expired: reload the page")
        if session.identity != identity:
            raise Rejected(403, "the CSRF session belongs to another login")
        if not sent:
            raise Rejected(403, f"no CSRF token: send it in the 'csrf' field or the {CSRF_HEADER} "
                                "header")
        if not hmac.compare_digest(sent.encode(), cookie.encode()):
            raise Rejected(403, "the CSRF token does not match the session")

    def check_origin(self, request: web.Request) -> None:
        origin = request.headers.get("Origin")
        where = "Origin"
        if origin is None or origin == "null":
            referer = request.headers.get("Referer")
            if referer is None:
                if origin == "null":
                    raise Rejected(403, "Origin is 'null' and no Referer was sent")
                raise Rejected(403, "neither Origin nor Referer was sent: a change must come from "
                                    "the manager's own pages")
            origin, where = _origin_of(referer), "Referer"
        if origin not in self.origins:
            raise Rejected(403, f"foreign {where} {origin!r}: changes are accepted only from "
                                f"{', '.join(sorted(self.origins)) or '(the listener is not bound)'}")

    def check_nonce(self, pool: str, sent: str | None) -> None:
        if not sent:
            raise Rejected(403, f"no nonce: every change must carry pool {pool!r}'s current nonce")
        if not hmac.compare_digest(sent.encode(), self.nonce(pool).encode()):
            raise Rejected(403, f"stale or wrong nonce for pool {pool!r}: reload the page and try "
                                "again")


def _origin_of(url: str) -> str | None:
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:
        return None
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None and port != default else "")


MANAGER: web.AppKey[Manager] = web.AppKey("manager", Manager)
#: Who the request authenticated as (a RequestKey where aiohttp has them, 3.12+).
IDENTITY: Any = (web.RequestKey("identity", str) if hasattr(web, "RequestKey")
                 else "balancerpool.identity")
PUBLIC = frozenset({"/healthz", "/readyz", "/metrics"})
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

# ---------------------------------------------------------------------------------------------
# Snapshots (what GET returns and the page shows)


def _wall(forwarder: Forwarder, monotonic: float) -> str:
    wall = time.time() - (forwarder.clock() - monotonic)
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))


def state_text(flags: str) -> str:
    """httpd's ``Init Ok`` / ``Init Dis`` ..., in words."""
    bad = [FLAG_NAMES[f] for f in flags if f in "DSEC"]
    if bad:
        return ", ".join(bad)
    extra = [FLAG_NAMES[f] for f in flags if f in "NHRI"]
    return "ok" + (f" ({', '.join(extra)})" if extra else "")


def _transition(forwarder: Forwarder, t: Transition) -> dict[str, Any]:
    return {"before": t.before, "after": t.after, "signal": t.signal, "detail": t.detail,
            "at": _wall(forwarder, t.time), "ago": round(max(0.0, forwarder.clock() - t.time), 3)}


def member_snapshot(forwarder: Forwarder, pool: Pool, member: MemberState) -> dict[str, Any]:
    spec = member.spec
    flags = "".join(f for f in "DSIHRENC" if f in _flags(member))
    conns = pool.connections.get(member.name)
    result = pool.checker.results.get(member.name) if pool.checker is not None else None
    return {
        "name": member.name,
        "url": spec.url,
        "route": spec.route,
        "redirect": spec.redirect,
        "lbset": spec.lbset,
        "loadfactor": spec.loadfactor,
        "status": "".join(sorted(spec.status)),
        "flags": flags,
        "usable": member.usable,
        "state": {"text": state_text(flags), **_transition(forwarder, member.last_change)},
        "elected": member.elected,
        "busy": member.busy,
        "sent": member.transferred,
        "received": member.read,
        "errors": member.errors,
        "healthCheck": None if result is None else {
            "ok": result.ok, "detail": result.detail, "at": _wall(forwarder, result.time),
            "ago": round(max(0.0, forwarder.clock() - result.time), 3)},
        "connections": {"open": conns.open if conns else 0, "idle": len(conns.idle) if conns else 0},
        "websockets": len(pool.tunnels.get(member.name, ())),
        "history": [_transition(forwarder, t) for t in list(member.history)[-10:]],
    }


def _flags(member: MemberState) -> str:
    return bits_to_flags(member.flags)


def pool_snapshot(forwarder: Forwarder, pool: Pool, nonce: str) -> dict[str, Any]:
    spec = pool.spec
    sticky = to_document(spec)["spec"].get("stickysession")
    return {
        "name": spec.name,
        "balancer": spec.balancer_name,
        "nonce": nonce,
        "routes": [r.path for r in spec.routes],
        "lbmethod": spec.lbmethod.value,
        "timeout": spec.timeout,
        "maxattempts": spec.maxattempts,
        "stickysession": sticky,
        "nofailover": spec.nofailover,
        "healthCheck": None if spec.health_check is None else {
            k: v for k, v in _health_doc_seconds(spec).items() if k in HEALTH_FIELDS},
        "routeReasons": {str(k): v for k, v in sorted(pool.route_reasons.items())},
        "members": [member_snapshot(forwarder, pool, m) for m in pool.state.members],
    }


def _health_doc_seconds(spec: BalancerPool) -> dict[str, Any]:
    assert spec.health_check is not None
    hc = spec.health_check
    return {"method": hc.method.value, "uri": hc.uri, "interval": hc.interval,
            "timeout": hc.timeout, "passes": hc.passes, "fails": hc.fails}


# ---------------------------------------------------------------------------------------------
# Changes


def _scalar(value: Any) -> Any:
    """A form field's text as the number it spells, when it spells one."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if number == number and number not in (float("inf"), float("-inf")) else text


def _status(current: frozenset[str], value: Any) -> str:
    """The new ``status`` for a member: ``value`` lists the manager flags to set (all others of
    D N H S I R are cleared), or ``+X``/``-X`` changes single flags; E and C are kept."""
    if isinstance(value, list):
        value = "".join(str(v) for v in value)
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise Rejected(400, "invalid change", [{"field": "status", "reason": "must be a string of "
                                                f"flags from {MANAGER_FLAGS}, got {value!r}"}])
    text = value.replace(" ", "").replace(",", "")
    relative = any(c in "+-" for c in text)
    start = set(current) if relative else {f for f in current if f not in MANAGER_FLAGS}
    try:
        flags = apply_flags(text, MANAGER_FLAGS, start)
    except ValueError:
        bad = next(c for c in text if c not in "+-" and c.upper() not in MANAGER_FLAGS)
        raise Rejected(400, "invalid change", [{
            "field": "status",
            "reason": f"the manager sets only {' '.join(MANAGER_FLAGS)}, got {bad!r}"}]) from None
    return "".join(sorted(flags))


def _optional(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _patch_member(doc: dict[str, Any], current: frozenset[str], changes: dict[str, Any]) -> None:
    for key, value in changes.items():
        if key not in MEMBER_FIELDS:
            raise Rejected(400, "invalid change", [{
                "field": key, "reason": f"not editable here; one of {', '.join(MEMBER_FIELDS)}"}])
        if key == "status":
            status = _status(current, value)
            if status:
                doc["status"] = status
            else:
                doc.pop("status", None)
        elif key in ("route", "redirect"):
            value = _optional(value)
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = _scalar(value) if key == "route" and isinstance(value, int) else value
        else:
            doc[key] = _scalar(value)


def _patch_pool(doc: dict[str, Any], changes: dict[str, Any]) -> None:
    health = {k.partition(".")[2]: v for k, v in changes.items() if k.startswith("healthCheck.")}
    for key, value in changes.items():
        if key.startswith("healthCheck."):
            if key.partition(".")[2] not in HEALTH_FIELDS:
                raise Rejected(400, "invalid change", [{
                    "field": key, "reason": f"one of {', '.join(HEALTH_FIELDS)} may be set"}])
            continue
        if key not in POOL_FIELDS:
            raise Rejected(400, "invalid change", [{
                "field": key, "reason": f"not editable here; one of {', '.join(POOL_FIELDS)}"}])
        if key == "healthCheck":
            if value is None:
                doc.pop("healthCheck", None)
                continue
            if not isinstance(value, dict):
                raise Rejected(400, "invalid change", [{
                    "field": "healthCheck", "reason": "must be a mapping, or null to remove it"}])
            health.update(value)
        elif key == "stickysession":
            value = _optional(value)
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        else:
            doc[key] = _scalar(value)
    if not health:
        return
    method = health.get("method")
    if isinstance(method, str) and method.strip().lower() in ("off", "none", ""):
        doc.pop("healthCheck", None)
        return
    check = dict(doc.get("healthCheck") or {})
    for key, value in health.items():
        if key not in HEALTH_FIELDS and key != "expect":
            raise Rejected(400, "invalid change", [{
                "field": f"healthCheck.{key}", "reason": f"one of {', '.join(HEALTH_FIELDS)}"}])
        if _optional(value) is None:
            check.pop(key, None)
        else:
            check[key] = _scalar(value) if key in ("passes", "fails") else value
    if str(check.get("method", "")).upper() == "TCP":
        # A TCP check only connects: drop what only HTTP checks take, unless sent on purpose.
        for key in ("uri", "expect"):
            if key not in health:
                check.pop(key, None)
    elif "method" in health and "expect" not in check:
        check.pop("expect", None)
    doc["healthCheck"] = check


def _new_member(changes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in changes.items():
        if key not in NEW_MEMBER_FIELDS:
            raise Rejected(400, "invalid change", [{
                "field": key, "reason": f"a new member takes {', '.join(NEW_MEMBER_FIELDS)}"}])
        if _optional(value) is None:
            continue
        if key == "status":
            status = _status(frozenset(), value)
            if status:
                out["status"] = status
        elif key in ("loadfactor", "lbset"):
            out[key] = _scalar(value)
        else:
            out[key] = value
    if "url" not in out:
        raise Rejected(400, "invalid change", [{"field": "url", "reason": "is required"}])
    return out


def _validate(documents: list[dict[str, Any]], prefix: str) -> list[BalancerPool]:
    """The model's own rules over the whole configuration; errors name the changed field."""
    try:
        pools = parse_pools(yaml.safe_dump_all(documents, sort_keys=False))
        load_session_keys(pools)
    except InvalidBalancerPool as exc:
        raise Rejected(400, "invalid change", [_field_error(e, prefix) for e in exc.errors]) from None
    return pools


def _field_error(error: FieldError, prefix: str) -> dict[str, str]:
    path = error.path
    short = path[len(prefix):].lstrip(".") if prefix and path.startswith(prefix) else path
    return {"field": short or path, "path": path, "reason": error.reason}


# ---------------------------------------------------------------------------------------------
# Handlers


async def _read_changes(request: web.Request) -> tuple[dict[str, Any], bool]:
    """The fields of a change (JSON object or form), and whether it came from a form."""
    ctype = request.content_type
    if ctype == "application/json":
        try:
            data = await request.json()
        except ValueError:
            raise Rejected(400, "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise Rejected(400, "the body must be a JSON object")
        return data, False
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form: MultiDictProxy[Any] = await request.post()
        out: dict[str, Any] = {}
        for key in form:
            values = [str(v) for v in form.getall(key)]
            out[key] = "".join(values) if key == "status" else values[-1]
        return out, True
    raise Rejected(415, "send application/json or a form (application/x-www-form-urlencoded)")


@web.middleware
async def _middleware(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                      ) -> web.StreamResponse:
    manager = request.app[MANAGER]
    try:
        if request.path not in PUBLIC:
            identity = await manager.auth.identify(request.headers.get("Authorization"))
            if identity is None:
                response: web.StreamResponse = _reject(request, Rejected(
                    401, "authentication required: a bearer token or Basic credentials"))
                response.headers["WWW-Authenticate"] = f'Basic realm="{REALM}", charset="UTF-8"'
                _secure(response)
                return response
            request[IDENTITY] = identity
        response = await handler(request)
    except Rejected as exc:
        response = _reject(request, exc)
    _secure(response)
    return response


def _secure(response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _wants_html(request: web.Request) -> bool:
    return (request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data")
            or (not request.path.startswith("/api/")
                and "text/html" in request.headers.get("Accept", "")))


def _reject(request: web.Request, exc: Rejected) -> web.Response:
    if exc.status >= 400 and exc.status != 401:
        log.warning("admin: %s %s refused (%d): %s %s", request.method, request.path, exc.status,
                    exc.reason, exc.errors or "")
    if _wants_html(request):
        from .manager_page import render_error

        return web.Response(status=exc.status, text=render_error(exc.status, exc.reason, exc.errors),
                            content_type="text/html", charset="utf-8")
    body: dict[str, Any] = {"error": exc.reason}
    if exc.errors:
        body["errors"] = exc.errors
    return web.json_response(body, status=exc.status)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    if request.app[MANAGER].ready():
        return web.Response(text="ready\n")
    return web.Response(status=503, text="not ready: no configuration applied yet\n")


async def _metrics(request: web.Request) -> web.Response:
    manager = request.app[MANAGER]
    body = metrics_module.enable(manager.forwarder).render()
    if manager.gather_metrics is not None:
        body = await manager.gather_metrics(body)
    return web.Response(body=body, headers={"Content-Type": metrics_module.CONTENT_TYPE})


def _pool(manager: Manager, name: str) -> Pool:
    pool = manager.forwarder.pools.get(name)
    if pool is None:
        raise Rejected(404, f"no pool {name!r}")
    return pool


def _with_session(request: web.Request, response: web.StreamResponse, token: str, new: bool) -> None:
    if new:
        response.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="Strict", path="/",
                            secure=request.secure, max_age=int(SESSION_LIFETIME))


async def _page(request: web.Request) -> web.StreamResponse:
    from .manager_page import render_page

    manager = request.app[MANAGER]
    if any(k in request.query for k in ("b", "w", "nonce", "w_status_D", "b_lbm", "w_lf")):
        raise Rejected(403, "changes are never made with GET: use the page's forms (POST) or the "
                            "JSON API")
    only = request.match_info.get("pool")
    pools = [_pool(manager, only)] if only else list(manager.forwarder.pools.values())
    token, new = manager.session(request, request[IDENTITY])
    snapshots = [pool_snapshot(manager.forwarder, p, manager.nonce(p.spec.name)) for p in pools]
    html = render_page(snapshots, csrf=token, identity=request[IDENTITY],
                       notice=request.query.get("changed"), persist=manager.store is not None,
                       single=only is not None)
    response = web.Response(text=html, content_type="text/html", charset="utf-8")
    _with_session(request, response, token, new)
    return response


async def _get_pools(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    token, new = manager.session(request, request[IDENTITY])
    only = request.match_info.get("pool")
    pools = [_pool(manager, only)] if only else list(manager.forwarder.pools.values())
    snapshots = [pool_snapshot(manager.forwarder, p, manager.nonce(p.spec.name)) for p in pools]
    body: dict[str, Any] = {"csrf": token, "persist": manager.store is not None}
    if only:
        body["pool"] = snapshots[0]
    else:
        body["pools"] = snapshots
    response = web.json_response(body)
    _with_session(request, response, token, new)
    return response


async def _get_member(request: web.Request) -> web.StreamResponse:
    manager = request.app[MANAGER]
    pool = _pool(manager, request.match_info["pool"])
    member = pool.state.by_name.get(request.match_info["member"])
    if member is None:
        raise Rejected(404, f"no member {request.match_info['member']!r} in pool {pool.spec.name!r}")
    token, new = manager.session(request, request[IDENTITY])
    response = web.json_response({"csrf": token, "nonce": manager.nonce(pool.spec.name),
                                  "member": member_snapshot(manager.forwarder, pool, member)})
    _with_session(request, response, token, new)
    return response


async def _change(request: web.Request) -> web.StreamResponse:
    """PATCH/POST a pool, PATCH/POST a member, POST a new member."""
    manager = request.app[MANAGER]
    identity: str = request[IDENTITY]
    manager.check_origin(request)
    changes, is_form = await _read_changes(request)
    sent_csrf = changes.pop("csrf", None) or request.headers.get(CSRF_HEADER)
    manager.check_csrf(request, identity, sent_csrf if isinstance(sent_csrf, str) else None)
    pool_name = request.match_info["pool"]
    member_name = request.match_info.get("member")
    adding = request.path.endswith("/members") and member_name is None
    nonce = changes.pop("nonce", None)
    async with manager.lock:
        pool = _pool(manager, pool_name)
        manager.check_nonce(pool_name, nonce if isinstance(nonce, str) else None)
        if not changes:
            raise Rejected(400, "nothing to change")
        documents = [to_document(p.spec) for p in manager.forwarder.pools.values()]
        index = list(manager.forwarder.pools).index(pool_name)
        doc_spec = documents[index]["spec"]
        member: MemberState | None = None
        if adding:
            kind = "add-member"
            doc_spec["members"].append(_new_member(changes))
            prefix = f"spec.members[{len(doc_spec['members']) - 1}]"
            what = f"member {doc_spec['members'][-1].get('name') or doc_spec['members'][-1]['url']} added"
        elif member_name is not None:
            kind = "member"
            member = pool.state.by_name.get(member_name)
            if member is None:
                raise Rejected(404, f"no member {member_name!r} in pool {pool_name!r}")
            i = member.index
            _patch_member(doc_spec["members"][i], member.spec.status, changes)
            prefix = f"spec.members[{i}]"
            what = f"member {member_name}: " + ", ".join(f"{k}={v}" for k, v in changes.items())
        else:
            kind = "pool"
            _patch_pool(doc_spec, changes)
            prefix = "spec"
            what = "pool settings: " + ", ".join(f"{k}={v}" for k, v in changes.items())
        if len(documents) > 1:
            prefix = ""  # multi-document errors carry their document; keep the full path
        new_specs = _validate(documents, prefix)
        if new_specs == [p.spec for p in manager.forwarder.pools.values()]:
            response = _done(request, manager, pool_name, is_form, f"{what} (no change)")
            return response
        if manager.store is not None:
            try:
                await manager.store.write(new_specs)
            except Exception as exc:
                log.exception("admin: could not persist the change")
                raise Rejected(500, f"not changed: the configuration could not be persisted "
                                    f"({exc})") from None
        _apply(manager, pool_name, member, new_specs, identity, adding)
        if manager.on_applied is not None:
            manager.on_applied(new_specs)
        manager.nonces[pool_name] = secrets.token_urlsafe(16)
        m = metrics_module.get(manager.forwarder)
        if m is not None:
            m.manager_changes.labels(pool_name, kind).inc()
        log.warning("admin: %s changed pool %s: %s", identity, pool_name, what)
        return _done(request, manager, pool_name, is_form, what)


def _apply(manager: Manager, pool_name: str, member: MemberState | None,
           new_specs: list[BalancerPool], identity: str, adding: bool) -> None:
    """Apply through the Forwarder; a flag change is made on the live member first, so that it
    is recorded (and announced to listeners: flushes, WebSockets) as signal ``manager``."""
    forwarder = manager.forwarder
    now = forwarder.clock()
    new_pool = next(p for p in new_specs if p.name == pool_name)
    undo: tuple[int, int] | None = None
    if member is not None:
        new_spec = next(m for m in new_pool.members if m.name == member.name)
        before, after = flags_to_bits(member.spec.status), flags_to_bits(new_spec.status)
        add, remove = after & ~before, before & ~after
        if member.change(add, remove, now, "manager", f"by {identity}"):
            undo = (remove, add)
    try:
        forwarder.apply(new_specs)
    except Exception:
        if member is not None and undo is not None:
            member.change(undo[0], undo[1], now, "manager", "change undone: it could not be applied")
        raise
    if adding:
        added = forwarder.pools[pool_name].state.members[-1]
        first = added.history[-1]
        added.history[-1] = Transition(first.time, first.before, first.after, "manager",
                                       f"added by {identity}")


def _done(request: web.Request, manager: Manager, pool_name: str, is_form: bool,
          what: str) -> web.StreamResponse:
    if is_form:
        anchor = f"pool-{pool_name}"
        raise web.HTTPSeeOther(f"/balancer-manager?changed={quote(what[:200])}#{anchor}")
    pool = manager.forwarder.pools[pool_name]
    return web.json_response({"changed": what, "persisted": manager.store is not None,
                              "pool": pool_snapshot(manager.forwarder, pool,
                                                    manager.nonce(pool_name))})


async def _root(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/balancer-manager")


def admin_app(forwarder: Forwarder, *, auth: AdminAuth, store: ConfigStore | None,
              ready: Callable[[], bool], origins: Iterable[str] = ()) -> web.Application:
    """The admin application. ``origins``: where changes may come from besides the listener's
    own origin, which :func:`start_admin` adds once bound (``http://host:port``)."""
    app = web.Application(middlewares=[_middleware], client_max_size=64 * 1024)
    app[MANAGER] = Manager(forwarder, auth, store, ready, origins)
    r = app.router
    r.add_get("/healthz", _healthz)
    r.add_get("/readyz", _readyz)
    r.add_get("/metrics", _metrics)
    r.add_get("/", _root)
    r.add_get("/balancer-manager", _page)
    r.add_get("/balancer-manager/{pool}", _page)
    r.add_get("/api/pools", _get_pools)
    r.add_get("/api/pools/{pool}", _get_pools)
    r.add_route("PATCH", "/api/pools/{pool}", _change)
    r.add_post("/api/pools/{pool}", _change)
    r.add_post("/api/pools/{pool}/members", _change)
    r.add_get("/api/pools/{pool}/members/{member}", _get_member)
    r.add_route("PATCH", "/api/pools/{pool}/members/{member}", _change)
    r.add_post("/api/pools/{pool}/members/{member}", _change)
    return app


def own_origins(host: str, port: int) -> list[str]:
    """The origins a browser shows for the listener: loopback names are interchangeable, and a
    wildcard address is reached by loopback (anything else must be configured)."""
    if host in ("0.0.0.0", "::", ""):
        return [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    name = f"[{host}]" if ":" in host else host
    out = [f"http://{name}:{port}"]
    if host in ("127.0.0.1", "::1", "localhost"):
        out += [f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"]
    return list(dict.fromkeys(out))


async def start_admin(forwarder: Forwarder, host: str = "127.0.0.1", port: int = 9090, *,
                      auth: AdminAuth, store: ConfigStore | None = None,
                      ready: Callable[[], bool] | None = None,
                      origins: Iterable[str] = ()) -> tuple[web.AppRunner, str]:
    """Serve the admin listener; returns its runner (``await runner.cleanup()`` to stop) and
    its URL (``http://host:port``, port 0 resolved). ``ready`` defaults to "a configuration is
    applied" (the forwarder has pools). Also enables the forwarder's metrics."""
    if ready is None:
        def ready() -> bool:
            return bool(forwarder.pools)
    metrics_module.enable(forwarder)
    app = admin_app(forwarder, auth=auth, store=store, ready=ready, origins=origins)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await aiohttp_site(runner, host, port).start()
    bound_host, bound_port = runner.addresses[0][:2]
    app[MANAGER].origins.update(own_origins(host, bound_port))
    name = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{name}:{bound_port}"
    log.info("admin listener on %s (balancer-manager at %s/balancer-manager)", url, url)
    return runner, url


def login_help(url: str, user: str, password: str) -> str:
    """What to print for a person: where the manager is and how to log in."""
    return (f"balancer-manager: {url}/balancer-manager  (log in as {user!r}, password {password})\n"
            f"  JSON API: curl -H 'Authorization: Bearer {password}' {url}/api/pools\n"
            f"  metrics:  curl {url}/metrics")


async def start_demo_admin(forwarder: Forwarder, host: str = "127.0.0.1", port: int = 9090,
                           store: ConfigStore | None = None) -> tuple[web.AppRunner, str, str]:
    """The demo's admin listener with a fresh random password: (runner, url, login help)."""
    auth, password = AdminAuth.ephemeral("admin")
    runner, url = await start_admin(forwarder, host, port, auth=auth, store=store)
    return runner, url, login_help(url, "admin", password)


# ---------------------------------------------------------------------------------------------
# python -m balancerpool.proxy.admin hash-password


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancerpool.proxy.admin",
                                     description="Admin listener helpers.")
    sub = parser.add_subparsers(dest="command", required=True)
    hp = sub.add_parser("hash-password", help="print a 'user:pbkdf2_sha256$...' password-file line")
    hp.add_argument("--user", default="admin")
    hp.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    args = parser.parse_args(argv)
    if args.command == "hash-password":
        if ":" in args.user or not args.user:
            parser.error("the user name must be non-empty and hold no ':'")
        if sys.stdin.isatty():
            password = getpass.getpass("password: ")
            if getpass.getpass("again: ") != password:
                print("the passwords differ", file=sys.stderr)
                return 1
        else:
            password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            print("empty password refused", file=sys.stderr)
            return 1
        print(f"{args.user}:{hash_password(password, args.iterations)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["AdminAuth", "admin_app", "hash_password", "login_help", "start_admin",
           "start_demo_admin", "verify_password"]
