"""The BalancerPool model: one schema for standalone files and the Kubernetes resource.

Pure: no I/O beyond parsing text handed in. Validation collects every problem with its field path
(``spec.members[2].loadfactor: must be 1..100, got 250``) instead of stopping at the first, so that
``balancerpool check`` and the operator can report a broken resource in one pass.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

API_VERSION = "balancerpool.io/v1alpha1"
KIND = "BalancerPool"

#: httpd's member status flags: Disabled, Stopped, Ignore-errors, Hot-standby, hot spaRe, Error,
#: draiN, and health-Check failed.
MEMBER_FLAGS = "DSIHRENC"

_T = TypeVar("_T")
_D = TypeVar("_D")


class LBMethod(enum.StrEnum):
    BYREQUESTS = "byrequests"
    BYTRAFFIC = "bytraffic"
    BYBUSYNESS = "bybusyness"
    #: Power of two choices: of two members picked at random, the one with fewer outstanding
    #: requests per unit of weight.
    LEASTREQUEST = "leastrequest"
    RANDOM = "random"
    #: Consistent hashing of a request attribute (see ``spec.hash``).
    HASH = "hash"


class HashOn(enum.StrEnum):
    HEADER = "header"
    COOKIE = "cookie"
    QUERY = "query"
    CLIENT = "client"


class HashAlgorithm(enum.StrEnum):
    RINGHASH = "ringhash"
    MAGLEV = "maglev"


class HealthMethod(enum.StrEnum):
    TCP = "TCP"
    OPTIONS = "OPTIONS"
    HEAD = "HEAD"
    GET = "GET"


class RetryNonIdempotent(enum.StrEnum):
    """When a request whose method is not idempotent may be sent again after its bytes went out."""

    NEVER = "never"
    #: Only with an ``Idempotency-Key`` header (the IETF draft): the client vouches for it.
    WITH_IDEMPOTENCY_KEY = "withIdempotencyKey"
    ALWAYS = "always"


class SameSite(enum.StrEnum):
    STRICT = "Strict"
    LAX = "Lax"
    NONE = "None"


@dataclass(frozen=True, slots=True)
class FieldError:
    path: str
    reason: str
    document: str = ""

    def __str__(self) -> str:
        prefix = f"{self.document}: " if self.document else ""
        return f"{prefix}{self.path}: {self.reason}"


class InvalidBalancerPool(ValueError):
    """Raised with every problem found, each naming its field."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class ConnectionPoolSpec:
    """httpd's per-worker pool parameters (``min max smax ttl acquire keepalive disablereuse``)."""

    min: int = 0
    max: int | None = None
    smax: int | None = None
    ttl: float | None = None
    acquire: float | None = None
    keepalive: bool = False
    disablereuse: bool = False


@dataclass(frozen=True, slots=True)
class MemberSpec:
    url: str
    host: str
    port: int
    base_path: str
    name: str
    route: str | None = None
    loadfactor: float = 1.0
    lbset: int = 0
    status: frozenset[str] = frozenset()
    redirect: str | None = None
    retry: float = 60.0
    timeout: float = 60.0
    connectiontimeout: float = 60.0
    pool: ConnectionPoolSpec = ConnectionPoolSpec()
    #: Weight ramp after the member becomes usable again (HAProxy ``slowstart``); 0 = none.
    slowstart: float = 0.0
    #: ``host:port`` (IPv6 in brackets), the Host field toward the member: computed once, as
    #: it goes out with every request.
    authority: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        host = self.host
        object.__setattr__(self, "authority",
                           f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}")


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """httpd's ``ProxyPass path balancer://pool/backendPath`` plus ``ProxyPassReverse``."""

    path: str
    backend_path: str
    reverse: bool = True
    preserve_host: bool = False
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StickySession:
    cookie: str | None
    param: str | None

    @property
    def names(self) -> str:
        """The names, for messages."""
        if self.cookie == self.param:
            return self.cookie or ""
        return "|".join(n for n in (self.cookie, self.param) if n is not None)


@dataclass(frozen=True, slots=True)
class CookieSpec:
    """Attributes of a cookie the proxy sets."""

    name: str
    path: str = "/"
    domain: str | None = None
    http_only: bool = True
    secure: bool = False
    same_site: SameSite | None = SameSite.LAX
    max_age: float | None = None


@dataclass(frozen=True, slots=True)
class SessionCookieSpec:
    """The signed sliding session cookie: route, issued-at and last-seen under an HMAC."""

    cookie: CookieSpec
    key_file: str
    idle_timeout: float | None = None
    absolute_timeout: float | None = None


@dataclass(frozen=True, slots=True)
class HashSpec:
    on: HashOn
    name: str | None = None
    algorithm: HashAlgorithm = HashAlgorithm.RINGHASH


@dataclass(frozen=True, slots=True)
class HealthExpect:
    """httpd's ``hcexpr``, structured: every condition must hold for a check to pass."""

    #: Inclusive status ranges; httpd's default is "2xx or 3xx".
    status: tuple[tuple[int, int], ...] = ((200, 399),)
    #: (header name, regular expression searched in its value); a missing header fails.
    headers: tuple[tuple[str, str], ...] = ()
    #: Regular expression searched in the first 64 KiB of the body.
    body: str | None = None


@dataclass(frozen=True, slots=True)
class HealthCheckSpec:
    """mod_proxy_hcheck's ``hcmethod hcuri hcinterval hcpasses hcfails hcexpr`` for the pool."""

    method: HealthMethod
    uri: str = "/"
    interval: float = 30.0
    timeout: float = 5.0
    passes: int = 1
    fails: int = 1
    expect: HealthExpect = HealthExpect()


@dataclass(frozen=True, slots=True)
class OutlierDetectionSpec:
    """Passive ejection, as Envoy's outlier detection: counted from real traffic."""

    #: Consecutive 5xx responses (0 = off).
    consecutive_5xx: int = 5
    #: Consecutive gateway errors: 502, 503, 504, failed connects and timeouts (0 = off).
    consecutive_gateway_errors: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 10


@dataclass(frozen=True, slots=True)
class RetryBudgetSpec:
    """Envoy's retry budget: retries may be at most ``percent`` of the requests of the last
    ``window``, but ``min_retries`` are always allowed."""

    percent: int = 20
    min_retries: int = 3
    window: float = 10.0


@dataclass(frozen=True, slots=True)
class WebSocketSpec:
    """Upgraded connections when their member is removed or goes down."""

    #: How long they may go on before the proxy closes them toward the client (code 1001).
    close_grace: float = 5.0
    #: At most this many closed per second, so that a scale event does not drop every stream at
    #: once (0 = no limit).
    close_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class BalancerVariables:
    """Where httpd's six ``BALANCER_*`` variables go, besides the access log."""

    request_headers: bool = False
    response_headers: bool = False


@dataclass(frozen=True, slots=True)
class BalancerPool:
    name: str
    namespace: str | None = None
    listen: tuple[str, int] | None = None
    routes: tuple[RouteSpec, ...] = ()
    lbmethod: LBMethod = LBMethod.BYREQUESTS
    maxattempts: int = 1
    nofailover: bool = False
    forcerecovery: bool = True
    timeout: float = 0.0
    failonstatus: frozenset[int] = frozenset()
    failontimeout: bool = False
    stickysession: StickySession | None = None
    stickysessionsep: str | None = "."
    scolonpathdelim: bool = False
    route_cookie: CookieSpec | None = None
    session_cookie: SessionCookieSpec | None = None
    hash: HashSpec | None = None
    balancer_variables: BalancerVariables = BalancerVariables()
    health_check: HealthCheckSpec | None = None
    outlier_detection: OutlierDetectionSpec | None = None
    #: How long in-flight requests to a removed member may run before they are cut.
    removal_grace: float = 30.0
    retry_non_idempotent: RetryNonIdempotent = RetryNonIdempotent.WITH_IDEMPOTENCY_KEY
    #: Request bodies up to this size are buffered so that the request can be sent again.
    retry_buffer: int = 64 * 1024
    retry_budget: RetryBudgetSpec = RetryBudgetSpec()
    websockets: WebSocketSpec = WebSocketSpec()
    members: tuple[MemberSpec, ...] = field(default=())

    @property
    def balancer_name(self) -> str:
        """httpd's ``BALANCER_NAME``."""
        return f"balancer://{self.name}"


# ---------------------------------------------------------------------------------------------
# Durations

_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|h|m|s)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
#: A year: longer is a typo, and keeps timer arithmetic finite.
MAX_DURATION = 365 * 24 * 3600.0


def parse_duration(value: object) -> float:
    """``5s``, ``200ms``, ``1m``, ``1m30s`` or a bare number of seconds (httpd's own unit)."""
    if isinstance(value, bool):
        raise ValueError(f"must be a duration like 5s, 200ms or 1m, got {value!r}")
    if isinstance(value, int | float):
        number = _finite(value)
        if number is None or number < 0:
            raise ValueError(f"must be a non-negative duration, got {value!r}")
        if number > MAX_DURATION:
            raise ValueError(f"must be at most {MAX_DURATION:g} seconds, got {value!r}")
        return number
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"must be a duration like 5s, 200ms or 1m, got {value!r}")
    text = value.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _DURATION_PART.match(text, pos)
        if m is None:
            raise ValueError(f"must be a duration like 5s, 200ms or 1m, got {value!r}")
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if not total <= MAX_DURATION:
        raise ValueError(f"must be at most {MAX_DURATION:g} seconds, got {value!r}")
    return total


def _finite(value: int | float) -> float | None:
    """The number as a float, or None when it is not finite (or too large to be a float)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------
# Reading with field paths


class _Reader:
    """Reads one mapping, recording problems under ``path`` and refusing unknown fields."""

    def __init__(self, data: object, path: str, errors: list[FieldError]) -> None:
        self.path = path
        self.errors = errors
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            self.error(None, f"must be a mapping, got {_kind(data)}")
            data = {}
        self.data: Mapping[str, Any] = data
        self.seen: set[str] = set()

    def sub(self, key: str) -> str:
        key = key if key != "" else '""'
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | None, reason: str) -> None:
        """``key`` None means the mapping itself."""
        self.errors.append(FieldError(self.sub(key) if key is not None else self.path or "(document)",
                                      reason))

    def has(self, key: str) -> bool:
        return key in self.data and self.data[key] is not None

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def get(self, key: str, conv: Callable[[Any], _T], default: _D) -> _T | _D:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            return default
        try:
            return conv(value)
        except ValueError as exc:
            self.error(key, str(exc))
            return default

    def finish(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.error(str(key), "unknown field")


def _kind(value: object) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, got {_kind(value)}")
    return value


def _boolean(value: Any) -> bool:
    # httpd writes On/Off; YAML 1.1 already maps on/off/yes/no to booleans.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("on", "off"):
        return value.lower() == "on"
    raise ValueError(f"must be true or false, got {value!r}")


def _int_range(lo: int, hi: int) -> Callable[[Any], int]:
    def conv(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number {lo}..{hi}, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"must be {lo}..{hi}, got {value}")
        return value

    return conv


def _loadfactor(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or _finite(value) is None:
        raise ValueError(f"must be a number 1..100, got {value!r}")
    if not 1 <= value <= 100:
        raise ValueError(f"must be 1..100, got {value:g}")
    if round(value, 2) != value:
        raise ValueError(f"takes at most two decimals, got {value!r}")
    return float(value)


_FLAGS_RE = re.compile(r"^(?:[+-]?[A-Za-z])*\Z")


def _status(value: Any) -> frozenset[str]:
    """httpd's ``status=`` syntax: ``D``, ``+H``, ``DH`` (a ``-X`` clears X from the default none)."""
    if isinstance(value, list):
        value = "".join(str(v) for v in value)
    if not isinstance(value, str) or not _FLAGS_RE.match(value):
        raise ValueError(f"must be status flags from {MEMBER_FLAGS} such as 'D' or '+H', got {value!r}")
    return frozenset(apply_flags(value, MEMBER_FLAGS))


def apply_flags(text: str, allowed: str, start: Iterable[str] = ()) -> set[str]:
    """httpd's flag syntax applied to ``start``: a letter sets its flag, ``+X`` sets it, ``-X``
    clears it. Raises ValueError for a letter outside ``allowed``."""
    flags = set(start)
    sign = "+"
    for ch in text:
        if ch in "+-":
            sign = ch
            continue
        flag = ch.upper()
        if flag not in allowed:
            raise ValueError(f"unknown status flag {ch!r}: flags are {' '.join(allowed)}")
        (flags.add if sign == "+" else flags.discard)(flag)
        sign = "+"
    return flags


_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
#: A member route, and what a route taken from a request must look like before it is used.
ROUTE_RE = re.compile(r"^[A-Za-z0-9._~:@!$&'()*+,;=-]{1,64}\Z")


def _route(value: Any) -> str:
    text = _string(value) if not isinstance(value, int) or isinstance(value, bool) else str(value)
    if not ROUTE_RE.match(text):
        raise ValueError(f"must be 1..64 URL-safe characters, got {text!r}")
    return text


def _path(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/") or any(c in text for c in " ?#\r\n\t") or "//" in text:
        raise ValueError(f"must be an absolute path like /app without query or spaces, got {text!r}")
    return text


def _listen(value: Any) -> tuple[str, int]:
    return parse_listen(_string(value))


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[v6]:PORT`` or ``:PORT`` (all addresses)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT such as 127.0.0.1:8080, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def _sticky(value: Any) -> StickySession:
    """httpd: ``NAME`` is both the cookie and the URL parameter; ``COOKIE|param`` names each."""
    text = _string(value)
    cookie, bar, param = text.partition("|")
    if not bar:
        param = cookie
    names = [n for n in (cookie, param) if n]
    if not names or any(not _TOKEN_RE.match(n) for n in names) or param.count("|"):
        raise ValueError(f"must be COOKIE or COOKIE|param with token characters, got {text!r}")
    return StickySession(cookie=cookie or None, param=param or None)


def _token(value: Any) -> str:
    text = _string(value)
    if not _TOKEN_RE.match(text) or len(text) > 128:
        raise ValueError(f"must be 1..128 token characters (letters, digits, !#$%&'*+.^_`|~-), "
                         f"got {text!r}")
    return text


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN_RE = re.compile(rf"^\.?{_LABEL}(\.{_LABEL})*\Z")


def _domain(value: Any) -> str:
    text = _string(value)
    if not _DOMAIN_RE.match(text) or len(text) > 253:
        raise ValueError(f"must be a domain name such as example.com, got {text!r}")
    return text


def _samesite(value: Any) -> SameSite | None:
    text = _string(value)
    if text.lower() == "off":
        return None
    for option in SameSite:
        if option.value.lower() == text.lower():
            return option
    raise ValueError(f"must be Strict, Lax, None or off, got {text!r}")


_E = TypeVar("_E", bound=enum.StrEnum)


def _choice(cls: type[_E]) -> Callable[[Any], _E]:
    def conv(value: Any) -> _E:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise ValueError(f"must be one of {choices}, got {value!r}") from None

    return conv


def _sep(value: Any) -> str | None:
    if value is False:
        return None
    text = _string(value)
    if text.lower() == "off":
        return None
    if len(text) != 1 or not text.isprintable() or text in "=;, ":
        raise ValueError(f"must be one character such as '.', or 'off', got {text!r}")
    return text


def _statuses(value: Any) -> frozenset[int]:
    items = value if isinstance(value, list) else [value]
    codes: set[int] = set()
    for item in items:
        parts = str(item).split(",") if not isinstance(item, int) else [str(item)]
        for part in parts:
            part = part.strip()
            if not part.isdigit() or not 100 <= int(part) <= 599:
                raise ValueError(f"must be HTTP status codes 100..599, got {item!r}")
            codes.add(int(part))
    return frozenset(codes)


# ---------------------------------------------------------------------------------------------
# Documents


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys instead of silently keeping the last one."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a mapping key must be a plain value, not a list or mapping",
                key_node.start_mark) from None
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_documents(text: str) -> list[Any]:
    """Parse YAML (one or more ``---`` documents); raises InvalidBalancerPool on a syntax error."""
    try:
        return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}"
        reason = getattr(exc, "problem", None) or str(exc)
        raise InvalidBalancerPool([FieldError(where or "(file)", f"not valid YAML: {reason}")]) from None


def _document_label(index: int, doc: object) -> str:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return f"documents[{index}]" + (f" (BalancerPool {name})" if isinstance(name, str) else "")


def parse_pools(text: str) -> list[BalancerPool]:
    """Every BalancerPool in a file, or InvalidBalancerPool listing every problem in it."""
    documents = load_documents(text)
    if not documents:
        raise InvalidBalancerPool([FieldError("(file)", "holds no BalancerPool")])
    pools: list[BalancerPool] = []
    labels: list[str] = []
    errors: list[FieldError] = []
    for index, doc in enumerate(documents):
        label = ""
        if len(documents) > 1:
            label = _document_label(index, doc)
        doc_errors: list[FieldError] = []
        pool = parse_pool(doc, doc_errors)
        errors.extend(FieldError(e.path, e.reason, label) for e in doc_errors)
        if pool is not None and not doc_errors:
            pools.append(pool)
            labels.append(label)
    served: dict[tuple[str, tuple[str, ...]], str] = {}
    defined: set[tuple[str | None, str]] = set()
    for pool, label in zip(pools, labels, strict=True):
        if (pool.namespace, pool.name) in defined:
            errors.append(FieldError("metadata.name", f"BalancerPool {pool.name!r} is defined twice",
                                     label))
            continue
        defined.add((pool.namespace, pool.name))
        for i, r in enumerate(pool.routes):
            key = (r.path.rstrip("/") or "/", r.hosts)
            if key in served and served[key] != pool.name:
                errors.append(FieldError(
                    f"spec.routes[{i}].path",
                    f"{r.path!r} is already served by BalancerPool {served[key]!r}", label))
            served.setdefault(key, pool.name)
    if errors:
        raise InvalidBalancerPool(errors)
    return pools


_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def parse_pool(doc: object, errors: list[FieldError]) -> BalancerPool | None:
    """One BalancerPool resource (as a dict); problems are appended to ``errors``."""
    top = _Reader(doc, "", errors)
    if errors:
        return None
    api = top.raw("apiVersion")
    if api != API_VERSION:
        top.error("apiVersion", f"must be {API_VERSION}, got {api!r}")
    kind = top.raw("kind")
    if kind != KIND:
        top.error("kind", f"must be {KIND}, got {kind!r}")
    meta = _Reader(top.raw("metadata"), "metadata", errors)
    name = meta.get("name", _string, "")
    if isinstance(meta.data.get("name", ""), str) and not _NAME_RE.match(name):
        meta.error("name", f"must be a DNS label (lower-case letters, digits, '-'), got {name!r}")
    namespace = meta.get("namespace", _string, None) if meta.has("namespace") else None
    for key in ("labels", "annotations", "uid", "resourceVersion", "generation", "creationTimestamp",
                "managedFields", "finalizers", "ownerReferences", "deletionTimestamp", "selfLink"):
        meta.raw(key)  # set by Kubernetes or other tools; not ours to judge
    meta.finish()
    top.raw("status")  # written by the operator; ignored on input
    if not top.has("spec"):
        top.error("spec", "is required")
    has_spec = top.has("spec")
    spec = _Reader(top.raw("spec"), "spec", errors)
    top.finish()
    pool = _parse_spec(spec, name, namespace, has_spec)
    spec.finish()
    return pool


def _parse_spec(spec: _Reader, name: str, namespace: str | None, has_spec: bool) -> BalancerPool:
    errors = spec.errors
    listen = spec.get("listen", _listen, None)
    lbmethod = spec.get("lbmethod", _choice(LBMethod), LBMethod.BYREQUESTS)

    routes = tuple(_parse_list(spec, "routes", _parse_route))
    if has_spec and not routes and not any(e.path.startswith("spec.routes") for e in errors):
        spec.error("routes", "needs at least one route (path prefix) to serve")
    seen_routes: dict[tuple[str, tuple[str, ...]], int] = {}
    for i, r in enumerate(routes):
        if not r.path:
            continue
        key = (r.path.rstrip("/") or "/", r.hosts)
        if key in seen_routes:
            spec.error(f"routes[{i}].path", f"{r.path!r} repeats routes[{seen_routes[key]}]")
        seen_routes.setdefault(key, i)

    defaults = spec.raw("memberDefaults")
    defaults_reader = _Reader(defaults, spec.sub("memberDefaults"), errors)
    if defaults is not None:
        # Check the defaults on their own once, so a problem is reported at its own path.
        _parse_member_fields(defaults_reader, is_default=True)
        defaults_reader.finish()
    base = {k: v for k, v in defaults_reader.data.items() if k not in _PER_MEMBER}

    def member(data: object, path: str, errs: list[FieldError]) -> MemberSpec:
        merged = {**base, **data} if isinstance(data, Mapping) else data
        own = set(data) if isinstance(data, Mapping) else set()
        local: list[FieldError] = []
        reader = _Reader(merged, path, local)
        result = _parse_member(reader)
        reader.finish()
        # Problems that come from memberDefaults were already reported there.
        errs.extend(e for e in local if _own_field(e.path, path, own))
        return result

    members = list(_parse_list(spec, "members", member))
    _check_members(spec, members)

    default_attempts = max(1, len(members) - 1)
    maxattempts = spec.get("maxattempts", _int_range(0, 100), default_attempts)
    pool = BalancerPool(
        name=name,
        namespace=namespace,
        listen=listen,
        routes=routes,
        lbmethod=lbmethod,
        maxattempts=maxattempts,
        nofailover=spec.get("nofailover", _boolean, False),
        forcerecovery=spec.get("forcerecovery", _boolean, True),
        timeout=spec.get("timeout", parse_duration, 0.0),
        failonstatus=spec.get("failonstatus", _statuses, frozenset()),
        failontimeout=spec.get("failontimeout", _boolean, False),
        stickysession=spec.get("stickysession", _sticky, None),
        stickysessionsep=spec.get("stickysessionsep", _sep, "."),
        scolonpathdelim=spec.get("scolonpathdelim", _boolean, False),
        route_cookie=_parse_cookie(spec, "routeCookie", "ROUTEID") if spec.has("routeCookie") else None,
        session_cookie=_parse_session_cookie(spec) if spec.has("sessionCookie") else None,
        hash=_parse_hash(spec) if spec.has("hash") else None,
        balancer_variables=_parse_variables(spec),
        health_check=_parse_health_check(spec) if spec.has("healthCheck") else None,
        outlier_detection=_parse_outliers(spec) if spec.has("outlierDetection") else None,
        removal_grace=spec.get("removalGrace", parse_duration, 30.0),
        retry_non_idempotent=spec.get("retryNonIdempotent", _choice(RetryNonIdempotent),
                                      RetryNonIdempotent.WITH_IDEMPOTENCY_KEY),
        retry_buffer=spec.get("retryBufferSize", _size, 64 * 1024),
        retry_budget=_parse_budget(spec),
        websockets=_parse_websockets(spec),
        members=tuple(members),
    )
    _check_sticky(spec, pool)
    return pool


def _parse_cookie(parent: _Reader, key: str, default_name: str,
                  extra: tuple[str, ...] = ()) -> CookieSpec:
    """Reads a cookie's attributes; ``extra`` keys are the caller's to read afterwards."""
    c = _Reader(parent.raw(key), parent.sub(key), parent.errors)
    c.seen.update(extra)
    name = c.get("name", _token, default_name)
    cookie = CookieSpec(
        name=name,
        path=c.get("path", _path, "/"),
        domain=c.get("domain", _domain, None),
        http_only=c.get("httpOnly", _boolean, True),
        secure=c.get("secure", _boolean, False),
        same_site=c.get("sameSite", _samesite, SameSite.LAX),
        max_age=c.get("maxAge", parse_duration, None),
    )
    if cookie.same_site is SameSite.NONE and not cookie.secure:
        c.error("sameSite", "None needs secure: true (browsers drop the cookie otherwise)")
    c.finish()
    return cookie


def _parse_session_cookie(spec: _Reader) -> SessionCookieSpec:
    keys = ("keyFile", "idleTimeout", "absoluteTimeout")
    cookie = _parse_cookie(spec, "sessionCookie", "BPSESSION", keys)
    c = _Reader(spec.raw("sessionCookie"), spec.sub("sessionCookie"), spec.errors)
    c.seen.update(("name", "path", "domain", "httpOnly", "secure", "sameSite", "maxAge"))
    if not c.has("keyFile"):
        c.error("keyFile", "is required: the HMAC key is read from this file")
    result = SessionCookieSpec(
        cookie=cookie,
        key_file=c.get("keyFile", _string, ""),
        idle_timeout=c.get("idleTimeout", parse_duration, None),
        absolute_timeout=c.get("absoluteTimeout", parse_duration, None),
    )
    if (result.idle_timeout and result.absolute_timeout
            and result.idle_timeout > result.absolute_timeout):
        c.error("idleTimeout", f"must not exceed absoluteTimeout ({result.absolute_timeout:g}s)")
    c.finish()
    return result


def _parse_hash(spec: _Reader) -> HashSpec:
    h = _Reader(spec.raw("hash"), spec.sub("hash"), spec.errors)
    if not h.has("on"):
        h.error("on", "is required: one of header, cookie, query, client")
    on = h.get("on", _choice(HashOn), HashOn.CLIENT)
    name = h.get("name", _token, None)
    if on is not HashOn.CLIENT and name is None:
        h.error("name", f"is required to hash on a {on.value}")
    if on is HashOn.CLIENT and name is not None:
        h.error("name", "must not be set when hashing on the client address")
    result = HashSpec(on=on, name=name, algorithm=h.get("algorithm", _choice(HashAlgorithm),
                                                        HashAlgorithm.RINGHASH))
    h.finish()
    return result


def _parse_health_check(spec: _Reader) -> HealthCheckSpec:
    h = _Reader(spec.raw("healthCheck"), spec.sub("healthCheck"), spec.errors)
    if not h.has("method"):
        h.error("method", "is required: one of TCP, OPTIONS, HEAD, GET")
    method = h.get("method", _choice(HealthMethod), HealthMethod.TCP)
    uri = h.get("uri", _uri, "/")
    e = _Reader(h.raw("expect"), h.sub("expect"), spec.errors)
    expect = HealthExpect(
        status=e.get("status", _status_ranges, ((200, 399),)),
        headers=e.get("headers", _header_patterns, ()),
        body=e.get("body", _regex, None),
    )
    e.finish()
    if method is HealthMethod.TCP and (h.has("uri") or h.has("expect")):
        h.error("method", "TCP checks only connect: uri and expect need an HTTP method")
    if method is HealthMethod.HEAD and expect.body is not None:
        h.error("expect.body", "a HEAD response has no body: use GET")
    check = HealthCheckSpec(
        method=method,
        uri=uri,
        interval=h.get("interval", parse_duration, 30.0),
        timeout=h.get("timeout", parse_duration, 5.0),
        passes=h.get("passes", _int_range(1, 100), 1),
        fails=h.get("fails", _int_range(1, 100), 1),
        expect=expect,
    )
    if check.interval < 0.1:
        h.error("interval", f"must be at least 100ms, got {check.interval:g}s")
    if not 0 < check.timeout <= max(check.interval, 0.1):
        h.error("timeout", f"must be more than 0 and at most the interval ({check.interval:g}s)")
    h.finish()
    return check


def _parse_outliers(spec: _Reader) -> OutlierDetectionSpec:
    o = _Reader(spec.raw("outlierDetection"), spec.sub("outlierDetection"), spec.errors)
    result = OutlierDetectionSpec(
        consecutive_5xx=o.get("consecutive5xx", _int_range(0, 1000), 5),
        consecutive_gateway_errors=o.get("consecutiveGatewayErrors", _int_range(0, 1000), 5),
        base_ejection_time=o.get("baseEjectionTime", parse_duration, 30.0),
        max_ejection_time=o.get("maxEjectionTime", parse_duration, 300.0),
        max_ejection_percent=o.get("maxEjectionPercent", _int_range(0, 100), 10),
    )
    if result.max_ejection_time < result.base_ejection_time:
        o.error("maxEjectionTime", f"must be at least baseEjectionTime "
                                   f"({result.base_ejection_time:g}s), got {result.max_ejection_time:g}s")
    if not result.consecutive_5xx and not result.consecutive_gateway_errors:
        o.error("", "ejects nothing: set consecutive5xx or consecutiveGatewayErrors above 0")
    o.finish()
    return result


def _parse_websockets(spec: _Reader) -> WebSocketSpec:
    w = _Reader(spec.raw("websockets"), spec.sub("websockets"), spec.errors)
    result = WebSocketSpec(close_grace=w.get("closeGrace", parse_duration, 5.0),
                           close_rate=w.get("closeRate", _rate, 0.0))
    w.finish()
    return result


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100_000:
        raise ValueError(f"must be a number of closes per second, 0..100000, got {value!r}")
    return float(value)


def _parse_budget(spec: _Reader) -> RetryBudgetSpec:
    b = _Reader(spec.raw("retryBudget"), spec.sub("retryBudget"), spec.errors)
    result = RetryBudgetSpec(percent=b.get("percent", _int_range(0, 100), 20),
                             min_retries=b.get("minRetries", _int_range(0, 1_000_000), 3),
                             window=b.get("window", parse_duration, 10.0))
    if result.window < 1:
        b.error("window", f"must be at least 1s, got {result.window:g}s")
    b.finish()
    return result


_SIZE_RE = re.compile(r"^([0-9]+)(|B|KiB|MiB|Ki|Mi|k|K|M)\Z")
_SIZE_UNITS = {"": 1, "B": 1, "k": 1000, "K": 1024, "Ki": 1024, "KiB": 1024, "M": 1024**2,
               "Mi": 1024**2, "MiB": 1024**2}


def _size(value: Any) -> int:
    """Bytes: ``65536``, ``64Ki`` / ``64KiB``, ``1Mi`` / ``1MiB``."""
    m = _SIZE_RE.match(str(value)) if not isinstance(value, bool) else None
    if m is None:
        raise ValueError(f"must be a size such as 65536, 64KiB or 1MiB, got {value!r}")
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if size > 64 * 1024**2:
        raise ValueError(f"must be at most 64MiB, got {value!r}")
    return size


def _uri(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/") or any(c in text for c in " \r\n\t#"):
        raise ValueError(f"must be an origin-form URI such as /health, got {text!r}")
    return text


_RANGE_RE = re.compile(r"^([1-5])xx\Z|^([1-5][0-9][0-9])(?:-([1-5][0-9][0-9]))?\Z")


def _status_ranges(value: Any) -> tuple[tuple[int, int], ...]:
    """``200``, ``"2xx"``, ``"200-299"``, or a list of them."""
    items = value if isinstance(value, list) else [value]
    ranges: list[tuple[int, int]] = []
    for item in items:
        m = _RANGE_RE.match(str(item)) if not isinstance(item, bool) else None
        if m is None:
            raise ValueError(f"must be status codes like 200, 2xx or 200-299, got {item!r}")
        if m.group(1):
            hundred = int(m.group(1)) * 100
            ranges.append((hundred, hundred + 99))
        else:
            low = int(m.group(2))
            high = int(m.group(3) or low)
            if high < low:
                raise ValueError(f"range {item!r} ends before it starts")
            ranges.append((low, high))
    if not ranges:
        raise ValueError("needs at least one status")
    return tuple(ranges)


def _regex(value: Any) -> str:
    text = _string(value)
    try:
        re.compile(text)
    except re.error as exc:
        raise ValueError(f"is not a valid regular expression ({exc}): {text!r}") from None
    return text


def _header_patterns(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must map header names to regular expressions, got {_kind(value)}")
    out = []
    for name, pattern in value.items():
        if not isinstance(name, str) or not _TOKEN_RE.match(name):
            raise ValueError(f"has an invalid header name {name!r}")
        out.append((name, _regex(pattern)))
    return tuple(out)


def _parse_variables(spec: _Reader) -> BalancerVariables:
    v = _Reader(spec.raw("balancerVariables"), spec.sub("balancerVariables"), spec.errors)
    result = BalancerVariables(request_headers=v.get("requestHeaders", _boolean, False),
                               response_headers=v.get("responseHeaders", _boolean, False))
    v.finish()
    return result


def _check_sticky(spec: _Reader, pool: BalancerPool) -> None:
    if pool.lbmethod is LBMethod.HASH and pool.hash is None:
        spec.error("hash", "is required with lbmethod hash")
    if pool.hash is not None and pool.lbmethod is not LBMethod.HASH:
        spec.error("hash", f"only applies to lbmethod hash, not {pool.lbmethod.value}")
    rc = pool.route_cookie
    if rc is not None:
        sticky = pool.stickysession
        if sticky is None or sticky.cookie != rc.name:
            written = spec.data.get("stickysession") if sticky else None
            spec.error("routeCookie.name",
                       f"{rc.name!r} must be the cookie named in stickysession, or the proxy would "
                       f"never read it back (stickysession: {written or 'unset'})")
        elif pool.stickysessionsep is None:
            spec.error("routeCookie", "needs stickysessionsep: the cookie value is '<sep><route>'")
    sc = pool.session_cookie
    if sc is not None and pool.stickysession is not None:
        # Two sources of a route would let stickysession keep a session whose signed cookie
        # expired: the timeouts would mean nothing.
        spec.error("sessionCookie", "cannot be combined with stickysession: use one or the other")
    if (sc is not None or rc is not None) and pool.members:
        for i, member in enumerate(pool.members):
            if member.route is None:
                spec.error(f"members[{i}].route", "is required: "
                           f"{'sessionCookie' if sc is not None else 'routeCookie'} carries the route")


def _own_field(error_path: str, member_path: str, own: set[str]) -> bool:
    rest = error_path[len(member_path):].lstrip(".")
    key = re.split(r"[.\[]", rest, maxsplit=1)[0]
    return not key or key in own or key == "url"


def _parse_list(
    spec: _Reader, key: str, parse: Callable[[object, str, list[FieldError]], _T]
) -> Iterable[_T]:
    value = spec.raw(key)
    if value is None:
        return []
    if not isinstance(value, list):
        spec.error(key, f"must be a list, got {_kind(value)}")
        return []
    if len(value) > 10_000:
        spec.error(key, f"holds {len(value)} items; at most 10000")
        return []
    return [parse(item, f"{spec.sub(key)}[{i}]", spec.errors) for i, item in enumerate(value)]


def _parse_route(data: object, path: str, errors: list[FieldError]) -> RouteSpec:
    r = _Reader(data, path, errors)
    if not r.has("path"):
        r.error("path", "is required")
    route_path = r.get("path", _path, "")  # "" only when invalid (already reported)
    backend_path = r.get("backendPath", _path, route_path)
    hosts = r.get("hosts", _hosts, ())
    route = RouteSpec(
        path=route_path,
        backend_path=backend_path,
        reverse=r.get("reverse", _boolean, True),
        preserve_host=r.get("preserveHost", _boolean, False),
        hosts=hosts,
    )
    r.finish()
    return route


def _hosts(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) and h for h in value):
        raise ValueError("must be a list of host names")
    return tuple(sorted(h.lower() for h in value))


_PER_MEMBER = ("url", "name", "route", "redirect")


def _parse_member_fields(m: _Reader, is_default: bool = False) -> dict[str, Any]:
    timeout = m.get("timeout", parse_duration, 60.0)
    fields: dict[str, Any] = {
        "loadfactor": m.get("loadfactor", _loadfactor, 1.0),
        "lbset": m.get("lbset", _int_range(0, 99), 0),
        "status": m.get("status", _status, frozenset()),
        "retry": m.get("retry", parse_duration, 60.0),
        "timeout": timeout,
        "connectiontimeout": m.get("connectiontimeout", parse_duration, timeout),
        "pool": _parse_connection_pool(m),
        "slowstart": m.get("slowstart", parse_duration, 0.0),
    }
    if not is_default:
        fields["route"] = m.get("route", _route, None)
        fields["redirect"] = m.get("redirect", _route, None)
    else:
        for key in _PER_MEMBER:
            if m.raw(key) is not None:
                m.error(key, "is per member; it cannot be a default")
    return fields


def _parse_member(m: _Reader) -> MemberSpec:
    """A member; one with a bad URL still comes back (unusable) so later checks keep their indices."""
    if not m.has("url"):
        m.error("url", "is required")
    url = m.get("url", _string, "")
    host, port, base_path = "", 0, ""
    if url:
        try:
            host, port, base_path = _member_url(url)
        except ValueError as exc:
            m.error("url", str(exc))
    name = m.get("name", _string, url)
    fields = _parse_member_fields(m)
    return MemberSpec(url=url, host=host, port=port, base_path=base_path, name=name, **fields)


def _member_url(url: str) -> tuple[str, int, str]:
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"must be an http:// URL such as http://10.0.0.5:8080, got {url!r}")
    try:
        port = parts.port if parts.port is not None else 80
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError(f"has an invalid port: {url!r}")
    if (not parts.hostname or parts.query or parts.fragment or parts.username is not None
            or parts.password is not None):
        raise ValueError(f"must be http://HOST[:PORT][/path] without query or credentials, got {url!r}")
    return parts.hostname, port, parts.path.rstrip("/")


def _parse_connection_pool(m: _Reader) -> ConnectionPoolSpec:
    p = _Reader(m.raw("pool"), m.sub("pool"), m.errors)
    pool = ConnectionPoolSpec(
        min=p.get("min", _int_range(0, 10_000), 0),
        max=p.get("max", _int_range(1, 100_000), None),
        smax=p.get("smax", _int_range(0, 100_000), None),
        ttl=p.get("ttl", parse_duration, None),
        acquire=p.get("acquire", parse_duration, None),
        keepalive=p.get("keepalive", _boolean, False),
        disablereuse=p.get("disablereuse", _boolean, False),
    )
    if pool.max is not None:
        if pool.min > pool.max:
            p.error("min", f"must not exceed max ({pool.max}), got {pool.min}")
        if pool.smax is not None and pool.smax > pool.max:
            p.error("smax", f"must not exceed max ({pool.max}), got {pool.smax}")
    if pool.smax is not None and pool.min > pool.smax:
        p.error("min", f"must not exceed smax ({pool.smax}), got {pool.min}")
    if pool.disablereuse and pool.min:
        p.error("min", "pre-opened connections make no sense with disablereuse")
    p.finish()
    return pool


def check_members(pool: BalancerPool) -> None:
    """The cross-member rules, for member sets that arrive at run time (from Kubernetes)."""
    errors: list[FieldError] = []
    _check_members(_Reader({}, "spec", errors), list(pool.members))
    if errors:
        raise InvalidBalancerPool(errors)


def _check_members(spec: _Reader, members: list[MemberSpec]) -> None:
    names: dict[str, int] = {}
    routes: dict[str, int] = {}
    for i, member in enumerate(members):
        if member.name and member.name in names:
            spec.error(f"members[{i}].name", f"{member.name!r} repeats members[{names[member.name]}]")
        names.setdefault(member.name, i)
        if member.route is not None:
            if member.route in routes:
                spec.error(f"members[{i}].route",
                           f"{member.route!r} repeats members[{routes[member.route]}]")
            routes.setdefault(member.route, i)
    for i, member in enumerate(members):
        if member.redirect is not None:
            if member.redirect not in routes:
                spec.error(f"members[{i}].redirect", f"names no member's route: {member.redirect!r}")
            elif member.redirect == member.route:
                spec.error(f"members[{i}].redirect", "must name another member's route, not its own")
