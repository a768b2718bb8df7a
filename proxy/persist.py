"""Where changes made at run time (the balancer-manager) go: httpd's ``BalancerPersist``.

One interface, :class:`ConfigStore`, so that the operator can write to the BalancerPool resource
instead (and every replica gets the change) while a standalone proxy writes its file back.
:func:`to_document` is the inverse of the model's parser: ``parse_pools(dump(pools)) == pools``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from .model import (
    API_VERSION,
    KIND,
    BalancerPool,
    ConnectionPoolSpec,
    CookieSpec,
    HealthCheckSpec,
    HealthMethod,
    MemberSpec,
    RetryBudgetSpec,
    RetryNonIdempotent,
    RouteSpec,
    StickySession,
    WebSocketSpec,
    parse_pools,
)


class ConfigStore(Protocol):
    """Keeps the whole configuration after a run-time change; raises OSError (or any error) when
    it could not, in which case the change is not applied."""

    async def write(self, pools: list[BalancerPool]) -> None: ...


class FileStore:
    """Writes the pools back to their BalancerPool file, atomically: a temporary file in the
    same folder, fsync, ``os.replace``, fsync of the folder. Comments in the file are lost: the
    file is regenerated from the configuration in force."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    async def write(self, pools: list[BalancerPool]) -> None:
        text = dump(pools, header=f"# Written by the balancerpool manager at "
                                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}.\n")
        await asyncio.to_thread(write_atomically, self.path, text)


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the new, never half."""
    folder = path.parent
    try:
        mode: int | None = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def dump(pools: list[BalancerPool], header: str = "") -> str:
    """BalancerPool YAML for ``pools``, checked to parse back to exactly ``pools``."""
    text = header + yaml.safe_dump_all([to_document(p) for p in pools], sort_keys=False,
                                       default_flow_style=False, allow_unicode=True)
    if parse_pools(text) != pools:  # pragma: no cover - a bug in to_document, never write it
        raise ValueError("the configuration does not survive serialisation; not written")
    return text


def _number(value: float) -> int | float:
    """Whole numbers as ints, for a readable file (the parser reads both back as floats)."""
    return int(value) if float(value).is_integer() else value


def _duration(value: float) -> str | int | float:
    """``10s``, ``0.5s``: what a person writes (parsed back to the same float)."""
    text = repr(float(value)).removesuffix(".0")
    return f"{text}s" if "e" not in text and "inf" not in text and "nan" not in text else value


def _listen(listen: tuple[str, int]) -> str:
    host, port = listen
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _sticky(sticky: StickySession) -> str:
    if sticky.cookie == sticky.param:
        return sticky.cookie or ""
    return f"{sticky.cookie or ''}|{sticky.param or ''}"


def _cookie(cookie: CookieSpec, default_name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cookie.name != default_name:
        out["name"] = cookie.name
    if cookie.path != "/":
        out["path"] = cookie.path
    if cookie.domain is not None:
        out["domain"] = cookie.domain
    if not cookie.http_only:
        out["httpOnly"] = False
    if cookie.secure:
        out["secure"] = True
    out["sameSite"] = cookie.same_site.value if cookie.same_site is not None else "off"
    if cookie.max_age is not None:
        out["maxAge"] = _duration(cookie.max_age)
    return out


def health_check_document(check: HealthCheckSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"method": check.method.value}
    if check.method is not HealthMethod.TCP:
        out["uri"] = check.uri
    out.update(interval=_duration(check.interval), timeout=_duration(check.timeout),
               passes=check.passes, fails=check.fails)
    if check.method is not HealthMethod.TCP:
        expect: dict[str, Any] = {
            "status": [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in check.expect.status]}
        if check.expect.headers:
            expect["headers"] = dict(check.expect.headers)
        if check.expect.body is not None:
            expect["body"] = check.expect.body
        out["expect"] = expect
    return out


def _route(route: RouteSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"path": route.path}
    if route.backend_path != route.path:
        out["backendPath"] = route.backend_path
    if not route.reverse:
        out["reverse"] = False
    if route.preserve_host:
        out["preserveHost"] = True
    if route.hosts:
        out["hosts"] = list(route.hosts)
    return out


def _connection_pool(pool: ConnectionPoolSpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pool.min:
        out["min"] = pool.min
    for key in ("max", "smax"):
        value = getattr(pool, key)
        if value is not None:
            out[key] = value
    for key in ("ttl", "acquire"):
        value = getattr(pool, key)
        if value is not None:
            out[key] = _duration(value)
    if pool.keepalive:
        out["keepalive"] = True
    if pool.disablereuse:
        out["disablereuse"] = True
    return out


def member_document(m: MemberSpec) -> dict[str, Any]:
    """One member as written in ``spec.members``: every field that differs from its default."""
    out: dict[str, Any] = {"url": m.url, "name": m.name}
    if m.route is not None:
        out["route"] = m.route
    if m.redirect is not None:
        out["redirect"] = m.redirect
    if m.loadfactor != 1.0:
        out["loadfactor"] = _number(m.loadfactor)
    if m.lbset:
        out["lbset"] = m.lbset
    if m.status:
        out["status"] = "".join(sorted(m.status))
    if m.retry != 60.0:
        out["retry"] = _duration(m.retry)
    if m.timeout != 60.0:
        out["timeout"] = _duration(m.timeout)
    if m.connectiontimeout != m.timeout:
        out["connectiontimeout"] = _duration(m.connectiontimeout)
    pool = _connection_pool(m.pool)
    if pool:
        out["pool"] = pool
    if m.slowstart:
        out["slowstart"] = _duration(m.slowstart)
    return out


def to_document(pool: BalancerPool) -> dict[str, Any]:
    """The BalancerPool resource (as a dict) that parses back to ``pool``."""
    meta: dict[str, Any] = {"name": pool.name}
    if pool.namespace is not None:
        meta["namespace"] = pool.namespace
    spec: dict[str, Any] = {}
    if pool.listen is not None:
        spec["listen"] = _listen(pool.listen)
    spec["routes"] = [_route(r) for r in pool.routes]
    spec["lbmethod"] = pool.lbmethod.value
    spec["maxattempts"] = pool.maxattempts
    if pool.nofailover:
        spec["nofailover"] = True
    if not pool.forcerecovery:
        spec["forcerecovery"] = False
    if pool.timeout:
        spec["timeout"] = _duration(pool.timeout)
    if pool.failonstatus:
        spec["failonstatus"] = sorted(pool.failonstatus)
    if pool.failontimeout:
        spec["failontimeout"] = True
    if pool.stickysession is not None:
        spec["stickysession"] = _sticky(pool.stickysession)
    if pool.stickysessionsep != ".":
        spec["stickysessionsep"] = pool.stickysessionsep if pool.stickysessionsep is not None else "off"
    if pool.scolonpathdelim:
        spec["scolonpathdelim"] = True
    if pool.route_cookie is not None:
        spec["routeCookie"] = _cookie(pool.route_cookie, "ROUTEID")
    sc = pool.session_cookie
    if sc is not None:
        session: dict[str, Any] = _cookie(sc.cookie, "BPSESSION")
        session["keyFile"] = sc.key_file
        if sc.idle_timeout is not None:
            session["idleTimeout"] = _duration(sc.idle_timeout)
        if sc.absolute_timeout is not None:
            session["absoluteTimeout"] = _duration(sc.absolute_timeout)
        spec["sessionCookie"] = session
    if pool.hash is not None:
        h: dict[str, Any] = {"on": pool.hash.on.value}
        if pool.hash.name is not None:
            h["name"] = pool.hash.name
        h["algorithm"] = pool.hash.algorithm.value
        spec["hash"] = h
    bv = pool.balancer_variables
    if bv.request_headers or bv.response_headers:
        spec["balancerVariables"] = {"requestHeaders": bv.request_headers,
                                     "responseHeaders": bv.response_headers}
    if pool.health_check is not None:
        spec["healthCheck"] = health_check_document(pool.health_check)
    od = pool.outlier_detection
    if od is not None:
        spec["outlierDetection"] = {
            "consecutive5xx": od.consecutive_5xx,
            "consecutiveGatewayErrors": od.consecutive_gateway_errors,
            "baseEjectionTime": _duration(od.base_ejection_time),
            "maxEjectionTime": _duration(od.max_ejection_time),
            "maxEjectionPercent": od.max_ejection_percent,
        }
    if pool.removal_grace != 30.0:
        spec["removalGrace"] = _duration(pool.removal_grace)
    if pool.retry_non_idempotent is not RetryNonIdempotent.WITH_IDEMPOTENCY_KEY:
        spec["retryNonIdempotent"] = pool.retry_non_idempotent.value
    if pool.retry_buffer != 64 * 1024:
        spec["retryBufferSize"] = pool.retry_buffer
    rb = pool.retry_budget
    if rb != RetryBudgetSpec():
        spec["retryBudget"] = {"percent": rb.percent, "minRetries": rb.min_retries,
                               "window": _duration(rb.window)}
    ws = pool.websockets
    if ws != WebSocketSpec():
        spec["websockets"] = {"closeGrace": _duration(ws.close_grace),
                              "closeRate": _number(ws.close_rate)}
    spec["members"] = [member_document(m) for m in pool.members]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}
