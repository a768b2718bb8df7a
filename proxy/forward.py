"""The balancing core: from a request head and body stream to a response.

It routes by path prefix to a pool, asks the scheduler for a member, sends the request on one of
that member's pooled connections, and fails over on errors that provably lost nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from .headers import OWN_REQUEST_FIELDS, end_to_end, forwarded_for, map_path, reverse_location
from .messages import Body, RequestHead, Response, local_response
from .model import BalancerPool, RouteSpec
from .scheduling import MemberState, PoolState
from .upstream import (
    ConnectFailed,
    ConnectionPool,
    PoolExhausted,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamError,
    UpstreamTimeout,
)

log = logging.getLogger("balancerpool.proxy")

#: Methods that RFC 9110 §9.2.2 calls idempotent: safe to re-send when no response came back.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
REQUEST_DROP = OWN_REQUEST_FIELDS | {"x-forwarded-for", "x-forwarded-host"}
_REASONS = {404: "Not Found", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class Pool:
    """One BalancerPool at run time: its scheduling state and one connection pool per member."""

    def __init__(self, spec: BalancerPool, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float], previous: Pool | None = None) -> None:
        self.spec = spec
        self.state: PoolState = PoolState(spec, previous.state if previous is not None else None,
                                          clock())
        self.connections: dict[str, ConnectionPool] = {}
        old = previous.connections if previous is not None else {}
        for member in spec.members:
            kept = old.get(member.name)
            if kept is not None and kept.member == member:
                self.connections[member.name] = kept
            else:
                self.connections[member.name] = ConnectionPool(member, loop, clock)
        for name, pool in old.items():
            if self.connections.get(name) is not pool:
                pool.close()
        # ProxyPassReverse matches the members' URLs, as httpd does for balancer:// targets.
        self.reverse_bases = {
            route.path: tuple(f"http://{authority}{m.base_path}{route.backend_path.rstrip('/')}"
                              for m in spec.members for authority in _authorities(m.host, m.port))
            for route in spec.routes
        }

    def close(self) -> None:
        for pool in self.connections.values():
            pool.close()


def _authorities(host: str, port: int) -> tuple[str, ...]:
    """How a backend may spell itself in a redirect: the default port may be left out."""
    name = f"[{host}]" if ":" in host else host
    return (f"{name}:{port}", name) if port == 80 else (f"{name}:{port}",)


@dataclass(frozen=True, slots=True)
class _Route:
    spec: RouteSpec
    pool: Pool
    prefix: str
    backend_prefix: str


class Router:
    """Longest path-prefix match (segment-aware: /app matches /app and /app/x, not /apple)."""

    def __init__(self, pools: list[Pool]) -> None:
        routes = [_Route(r, p, r.path.rstrip("/"), r.backend_path.rstrip("/"))
                  for p in pools for r in p.spec.routes]
        # Host-specific routes before catch-alls, then longest prefix first.
        routes.sort(key=lambda r: (not r.spec.hosts, -len(r.prefix)))
        self.routes = routes

    def match(self, host: str, path: str) -> _Route | None:
        hostname = host.rsplit(":", 1)[0].lower() if not host.endswith("]") else host.lower()
        for route in self.routes:
            prefix = route.prefix
            if route.spec.hosts and hostname not in route.spec.hosts:
                continue
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return route
        return None


class Forwarder:
    """Everything a front end needs: ``await forwarder.handle(head, body)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        #: Injectable so that tests move time instead of sleeping through ``retry`` or ``ttl``.
        self.clock = clock
        self.pools: dict[str, Pool] = {}
        self.router = Router([])
        self._maintainer: asyncio.Task[None] | None = None

    def apply(self, specs: list[BalancerPool]) -> None:
        """Swap in a new configuration; members that stayed keep their state and connections."""
        new: dict[str, Pool] = {}
        for spec in specs:
            new[spec.name] = Pool(spec, self.loop, self.clock, self.pools.get(spec.name))
        for name, pool in self.pools.items():
            if name not in new:
                pool.close()
        self.pools = new
        self.router = Router(list(new.values()))
        if self._maintainer is None:
            self._maintainer = self.loop.create_task(self._maintain())

    async def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
            self._maintainer = None
        for pool in self.pools.values():
            pool.close()

    async def _maintain(self) -> None:
        """Once a second: retire idle connections past ``ttl`` and pre-open ``min`` ones."""
        while True:
            now = self.clock()
            for pool in list(self.pools.values()):
                for conns in list(pool.connections.values()):
                    try:
                        await conns.maintain(now)
                    except Exception:  # pragma: no cover - never let upkeep die
                        log.exception("connection pool upkeep failed for %s", conns.member.name)
            await asyncio.sleep(1.0)

    # --- the request path -----------------------------------------------------------------------

    async def handle(self, head: RequestHead, body: Body) -> Response:
        route = self.router.match(head.host, head.path)
        if route is None:
            return local_response(404, "Not Found", f"No route for {head.path}",
                                  {"reason": "no-route"})
        pool = route.pool
        spec = pool.spec
        state = pool.state
        upstream_path = map_path(head.path, route.prefix, route.backend_prefix)
        target = upstream_path + ("?" + head.query if head.query else "")
        fixed = self._fixed_headers(head, body)
        head_only = head.method == "HEAD"
        idempotent = head.method in IDEMPOTENT
        has_body = body.length != 0
        tried: list[MemberState] = []
        failures: list[str] = []
        clock = self.clock
        deadline = clock() + spec.timeout
        body_started = False

        while True:
            now = clock()
            member = state.choose(now, tried)
            if member is None:
                if spec.timeout > 0 and now < deadline and not tried:
                    await asyncio.sleep(min(0.05, deadline - now))
                    continue
                return self._unavailable(spec, failures, len(tried))
            conns = pool.connections[member.name]
            try:
                conn = await conns.acquire()
            except PoolExhausted as exc:
                failures.append(f"{member.name}: {exc}")
                tried.append(member)
                if len(tried) > spec.maxattempts:
                    return self._unavailable(spec, failures, len(tried))
                continue
            except ConnectFailed as exc:
                member.mark_error(clock())
                failures.append(f"{member.name}: {exc}")
                log.warning("pool %s: member %s in error: %s", spec.name, member.name, exc)
                tried.append(member)
                if len(tried) > spec.maxattempts:
                    return self._unavailable(spec, failures, len(tried))
                continue

            member.busy += 1
            m = member.spec
            host = head.host if route.spec.preserve_host else m.authority
            request_head = (f"{head.method} {m.base_path}{target} HTTP/1.1\r\nHost: {host}\r\n"
                            f"{fixed}\r\n").encode("latin-1")
            try:
                conn.begin(request_head, head_only)
                member.transferred += len(request_head)
                if has_body:
                    body_started = True
                    await self._send_body(conn, body, member)
                status, reason, raw_headers = await conn.read_head(m.timeout)
            except UpstreamError as exc:
                member.busy -= 1
                conns.release(conn, False)
                # A reused keep-alive connection that the backend closed before answering: the
                # request may be re-sent on a fresh connection if nothing was lost doing so.
                if not exc.sent or (isinstance(exc, UpstreamClosed) and conn.reused
                                    and not conn.received_any and not body_started and idempotent):
                    # Idle connections at least as old as this one are as likely dead: flush them,
                    # so that the request goes out on a fresh connection.
                    flushed = conns.close_idle()
                    log.info("pool %s: member %s closed a reused connection; re-sending "
                             "(%d idle connections flushed)", spec.name, member.name, flushed)
                    continue
                failures.append(f"{member.name}: {exc}")
                if isinstance(exc, UpstreamTimeout):
                    if spec.failontimeout:
                        member.mark_error(clock())
                    return local_response(504, _REASONS[504], _explain(spec, 504, failures),
                                          {"pool": spec.name, "member": member.name,
                                           "reason": exc.kind, "attempts": len(tried) + 1})
                if isinstance(exc, UpstreamClosed) and not body_started and idempotent:
                    member.mark_error(clock())
                    tried.append(member)
                    if len(tried) <= spec.maxattempts:
                        continue
                return local_response(502, _REASONS[502], _explain(spec, 502, failures),
                                      {"pool": spec.name, "member": member.name,
                                       "reason": exc.kind, "attempts": len(tried) + 1})
            except BaseException:
                member.busy -= 1
                conns.release(conn, False)
                raise

            if status in spec.failonstatus:
                member.mark_error(clock())
                log.warning("pool %s: member %s in error: status %d matches failonstatus",
                            spec.name, member.name, status)
            return self._stream(head, route, pool, member, conns, conn, status, reason, raw_headers,
                                len(tried) + 1)

    @staticmethod
    def _fixed_headers(head: RequestHead, body: Body) -> str:
        """The request fields that do not depend on the member chosen."""
        lines = [f"{n}: {v}" for n, v in end_to_end(head.headers, REQUEST_DROP)]
        lines.append(f"X-Forwarded-For: {forwarded_for(head.headers, head.client)}")
        if head.host:
            lines.append(f"X-Forwarded-Host: {forwarded_for(head.headers, head.host, 'x-forwarded-host')}")
        lines.append(f"X-Forwarded-Proto: {head.scheme}")
        if body.length is None:
            lines.append("Transfer-Encoding: chunked")
        elif body.length or head.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {body.length}")
        return "\r\n".join(lines) + "\r\n"

    @staticmethod
    async def _send_body(conn: UpstreamConnection, body: Body, member: MemberState) -> None:
        timeout = member.spec.timeout
        chunked = body.length is None
        while True:
            chunk = await body.read()
            if not chunk:
                break
            member.transferred += len(chunk)
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
            else:
                await conn.write(chunk, timeout)
        if chunked:
            await conn.write(b"0\r\n\r\n", timeout)

    def _stream(self, head: RequestHead, route: _Route, pool: Pool, member: MemberState,
                conns: ConnectionPool, conn: UpstreamConnection, status: int, reason: bytes,
                raw_headers: list[tuple[bytes, bytes]], attempts: int) -> Response:
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw_headers]
        length: int | None = None
        chunked = False
        for n, v in headers:
            low = n.lower()
            if low == "content-length":
                length = int(v) if v.strip().isdigit() else None
            elif low == "transfer-encoding":
                chunked = True
        if chunked:
            length = None
        out = end_to_end(headers, frozenset({"content-length"}))
        if route.spec.reverse:
            origin = f"{head.scheme}://{head.host}" if head.host else ""
            bases = pool.reverse_bases[route.spec.path]
            out = [(n, reverse_location(v, bases, route.backend_prefix, origin, route.prefix))
                   if n.lower() in ("location", "content-location", "uri") else (n, v) for n, v in out]
        timeout = member.spec.timeout
        bodiless = head.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        spec = pool.spec

        async def chunks() -> AsyncIterator[bytes]:
            if bodiless:
                return
            while True:
                chunk = await conn.read_body(timeout)
                if not chunk:
                    return
                member.read += len(chunk)
                yield chunk

        def finish(ok: bool) -> None:
            member.busy -= 1
            if not ok and isinstance(conn.error, UpstreamTimeout) and spec.failontimeout:
                member.mark_error(self.clock())
            conns.release(conn, ok)

        info: dict[str, object] = {"pool": spec.name, "member": member.name, "attempts": attempts}
        return Response(status, reason.decode("latin-1") or "", out,
                        0 if bodiless and head.method != "HEAD" else length, chunks, finish, info)

    @staticmethod
    def _unavailable(spec: BalancerPool, failures: list[str], attempts: int) -> Response:
        return local_response(503, _REASONS[503], _explain(spec, 503, failures),
                              {"pool": spec.name, "reason": "no-member", "attempts": attempts},
                              extra=[("Retry-After", "1")])


def _explain(spec: BalancerPool, status: int, failures: list[str]) -> str:
    what = {
        502: f"Bad gateway: pool {spec.name!r} got no valid response from its member.",
        503: f"Service unavailable: pool {spec.name!r} has no usable member for this request.",
        504: f"Gateway timeout: a member of pool {spec.name!r} did not answer in time.",
    }[status]
    if not spec.members:
        what += " The pool has no members."
    lines = [what, *(f"  {f}" for f in failures)]
    return "\n".join(lines)
