"""The balancing core: from a request head and body stream to a response.

It routes by path prefix to a pool, asks the scheduler for a member, sends the request on one of
that member's pooled connections, and fails over on errors that provably lost nothing.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from . import accesslog
from .agen import counting, member_chunks
from .hardening import BadRequest
from .headers import (
    OWN_REQUEST_FIELDS,
    REVERSE_FIELDS,
    map_path,
    request_fields,
    response_fields,
    reverse_location,
)
from .health import OutlierDetector, RetryBudget
from .healthcheck import HealthChecker
from .keys import load_session_keys
from .messages import (
    EMPTY_BODY,
    Body,
    ClientStream,
    RequestHead,
    Response,
    Sink,
    decode_fields,
    local_response,
)
from .metrics import ProxyMetrics
from .model import (
    BalancerPool,
    HashOn,
    MemberSpec,
    RetryNonIdempotent,
    RouteSpec,
    check_members,
)
from .scheduling import UNUSABLE, E, MemberState, N, PoolState, Transition, flags_to_bits
from .sticky import (
    NO_ROUTE,
    Reason,
    SessionRoute,
    SessionState,
    SignedSession,
    cookie_value,
    decode_session,
    encode_session,
    extract_route,
    query_param,
    set_cookie,
)
from .upstream import (
    ConnectFailed,
    ConnectionPool,
    Listener,
    Outbox,
    PoolExhausted,
    UpstreamClosed,
    UpstreamConnection,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger("balancerpool.proxy")

#: Methods that RFC 9110 §9.2.2 calls idempotent: safe to re-send when no response came back.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
REQUEST_DROP: Final = OWN_REQUEST_FIELDS | {"x-forwarded-for", "x-forwarded-host"}
#: httpd's six variables and the header names that carry them when exported.
VARIABLE_HEADERS: Final = {
    "BALANCER_SESSION_STICKY": "X-Balancer-Session-Sticky",
    "BALANCER_SESSION_ROUTE": "X-Balancer-Session-Route",
    "BALANCER_NAME": "X-Balancer-Name",
    "BALANCER_WORKER_NAME": "X-Balancer-Worker-Name",
    "BALANCER_WORKER_ROUTE": "X-Balancer-Worker-Route",
    "BALANCER_ROUTE_CHANGED": "X-Balancer-Route-Changed",
}
_VARIABLE_FIELDS: Final = frozenset({h.lower() for h in VARIABLE_HEADERS.values()})
#: How often fast-lane requests are checked against their member's ``timeout``: a timeout
#: fires up to this much late.
DEADLINE_SWEEP: Final = 0.05
_REASONS: Final = {404: "Not Found", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


class Pool:
    """One BalancerPool at run time: its scheduling state and one connection pool per member."""

    def __init__(self, spec: BalancerPool, loop: asyncio.AbstractEventLoop, outbox: Outbox,
                 clock: Callable[[], float], previous: Pool | None = None,
                 session_key: bytes | None = None) -> None:
        self.spec = spec
        self.session_key = session_key
        #: Route decisions by reason, for metrics (kept across reloads). A dict, not a Counter:
        #: Counter defines __delitem__ in Python, which makes every store a method lookup.
        self.route_reasons: dict[str, int] = previous.route_reasons if previous is not None else {}
        self.sticky = spec.stickysession is not None or spec.session_cookie is not None
        #: No session and no BALANCER_* headers: its bodiless requests may take the fast lane.
        self.fast = not self.sticky and not spec.balancer_variables.request_headers \
            and not spec.balancer_variables.response_headers
        self.drop = REQUEST_DROP | _VARIABLE_FIELDS if spec.balancer_variables.request_headers \
            else REQUEST_DROP
        self.state: PoolState = PoolState(spec, previous.state if previous is not None else None,
                                          clock())
        self.connections: dict[str, ConnectionPool] = {}
        old = previous.connections if previous is not None else {}
        for member in spec.members:
            kept = old.get(member.name)
            if kept is not None and kept.same_connections(member):
                kept.member = member  # e.g. a new loadfactor: the connections stay
                self.connections[member.name] = kept
            else:
                self.connections[member.name] = ConnectionPool(member, loop, outbox, clock)
        for name, pool in old.items():
            if self.connections.get(name) is not pool:
                pool.close(spec.removal_grace)
        #: Upgraded connections (WebSockets) by member name.
        self.tunnels: dict[str, set[Tunnel]] = previous.tunnels if previous is not None else {}
        for name in [n for n in self.tunnels if n not in self.connections]:
            self.close_tunnels(name, "member removed")
        self.state.listeners.append(self._member_changed)
        self.state.announce()
        self.outliers: OutlierDetector | None = None
        if spec.outlier_detection is not None:
            old_outliers = previous.outliers if previous is not None else None
            self.outliers = old_outliers if old_outliers is not None and \
                old_outliers.spec == spec.outlier_detection else OutlierDetector(spec.outlier_detection)
        old_budget = previous.budget if previous is not None else None
        self.budget: RetryBudget = old_budget if old_budget is not None and \
            old_budget.spec == spec.retry_budget else RetryBudget(spec.retry_budget)
        self.checker: HealthChecker | None = None
        if spec.health_check is not None:
            old_checker = previous.checker if previous is not None else None
            self.checker = HealthChecker(self.state, spec.health_check, clock, old_checker)
        # ProxyPassReverse matches the members' URLs, as httpd does for balancer:// targets.
        self.reverse_bases = {
            route.path: tuple(f"http://{authority}{m.base_path}{route.backend_path.rstrip('/')}"
                              for m in spec.members for authority in _authorities(m.host, m.port))
            for route in spec.routes
        }

    def member_error(self, member: MemberState, now: float, signal: str, detail: str) -> None:
        member.mark_error(now, signal, detail)
        self.observe(member, None, now)

    def observe(self, member: MemberState, status: int | None, now: float) -> None:
        """Feed outlier detection one outcome: a status, or None for a gateway failure."""
        if self.outliers is None:
            return
        ejected = sum(1 for m in self.state.members if m.flags & E and m.last_change.signal == "outlier")
        verdict = self.outliers.observe(member.name, status, now, ejected, len(self.state.members))
        if verdict is not None:
            seconds, why = verdict
            member.mark_error(now, "outlier", f"{why}; ejected for {seconds:g}s", duration=seconds)

    def _member_changed(self, member: MemberState, change: Transition) -> None:
        """The moment a member turns unusable or starts draining, its idle pooled connections
        close: nothing more is ever sent on them (LVS ``expire_nodest_conn``)."""
        before, after = flags_to_bits(change.before), flags_to_bits(change.after)
        gone = (after & UNUSABLE and not before & UNUSABLE) or (after & N and not before & N)
        flushed = self.connections[member.name].close_idle() if gone else 0
        if after & UNUSABLE and not before & UNUSABLE:
            self.close_tunnels(member.name, f"member {change.after}: {change.signal}")
        log.warning("pool %s: member %s %s -> %s (%s: %s)%s", self.spec.name, member.name,
                    change.before or "-", change.after or "-", change.signal, change.detail,
                    f"; {flushed} idle connections closed" if flushed else "")

    def close_tunnels(self, name: str, why: str) -> None:
        """Close a member's WebSockets toward their clients with 1001 (Going Away) once the
        grace has passed, at most ``closeRate`` a second, so that clients reconnect to a live
        member rather than all at the same instant."""
        tunnels = list(self.tunnels.get(name, ()))
        if not tunnels:
            return
        ws = self.spec.websockets
        loop = asyncio.get_running_loop()
        step = 1.0 / ws.close_rate if ws.close_rate else 0.0
        log.warning("pool %s: %d WebSockets of member %s close in %gs (%s)", self.spec.name,
                    len(tunnels), name, ws.close_grace, why)
        for i, tunnel in enumerate(tunnels):
            loop.call_later(ws.close_grace + i * step, tunnel.going_away)

    def close(self, grace: float | None = None) -> None:
        if self.checker is not None and self.checker.task is not None:
            self.checker.task.cancel()
        for pool in self.connections.values():
            pool.close(grace)


def _member_hook(hook: Callable[[Pool, MemberState, Transition], None], pool: Pool
                 ) -> Callable[[MemberState, Transition], None]:
    def changed(member: MemberState, change: Transition) -> None:
        hook(pool, member, change)
    return changed


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
    hosts: frozenset[str] | None


class Router:
    """Longest path-prefix match (segment-aware: /app matches /app and /app/x, not /apple)."""

    def __init__(self, pools: list[Pool]) -> None:
        routes = [_Route(r, p, r.path.rstrip("/"), r.backend_path.rstrip("/"),
                         frozenset(r.hosts) if r.hosts else None)
                  for p in pools for r in p.spec.routes]
        # Host-specific routes before catch-alls, then longest prefix first.
        routes.sort(key=lambda r: (not r.spec.hosts, -len(r.prefix)))
        self.routes = routes
        self.by_host = any(r.hosts for r in routes)

    def match(self, host: str, path: str) -> _Route | None:
        hostname = "" if not self.by_host else (
            host.rsplit(":", 1)[0].lower() if not host.endswith("]") else host.lower())
        for route in self.routes:
            prefix = route.prefix
            if route.hosts is not None and hostname not in route.hosts:
                continue
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return route
        return None


class Forwarder:
    """Everything a front end needs: ``await forwarder.handle(head, body)``."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 clock: Callable[[], float] = time.monotonic,
                 wallclock: Callable[[], float] = time.time) -> None:
        self.loop = loop
        #: Request heads, and the fast front end's responses, written when the loop turns.
        self.outbox = Outbox(loop)
        #: Injectable so that tests move time instead of sleeping through ``retry`` or ``ttl``.
        self.clock = clock
        #: The clock is time.monotonic: the fast lane's one reading per request then serves the
        #: scheduler, the metrics and its deadline alike (a clock call costs a float each).
        self.monotonic = clock is time.monotonic
        #: Wall-clock time for signed session cookies, which must agree across replicas.
        self.wallclock = wallclock
        #: Per-request Prometheus metrics, when the admin listener turned them on.
        self.metrics: ProxyMetrics | None = None
        #: What ``metrics.enable`` made for this forwarder (a compiled class takes no weak
        #: references, so the metrics module keeps it here rather than in a WeakKeyDictionary).
        self.metrics_made: ProxyMetrics | None = None
        self.pools: dict[str, Pool] = {}
        self.router = Router([])
        self._maintainer: asyncio.Task[None] | None = None
        #: False: pools' active health checks are not run here (``--workers``: another process
        #: runs them and its ``C`` transitions arrive through the state bus).
        self.health_checks = True
        #: Told of every member state change of every pool from the next ``apply`` on (the
        #: state bus of ``--workers``); never called on the request path unless flags change.
        self.on_member_change: Callable[[Pool, MemberState, Transition], None] | None = None
        #: Whether ``fast`` takes requests at all, and how many it sent itself.
        self.fast_lane = True
        self.fast_requests = 0
        #: Fast-lane requests waiting for a response head, and the timer that checks their
        #: deadlines (one for all of them, running only while there are some).
        self._waiting: set[_Exchange] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    def apply(self, specs: list[BalancerPool]) -> None:
        """Swap in a new configuration; members that stayed keep their state and connections."""
        keys = load_session_keys(specs)
        new: dict[str, Pool] = {}
        for spec in specs:
            new[spec.name] = Pool(spec, self.loop, self.outbox, self.clock,
                                  self.pools.get(spec.name), keys.get(spec.name))
        for name, pool in self.pools.items():
            if name not in new:
                pool.close(pool.spec.removal_grace)
            elif pool.checker is not None and pool.checker.task is not None:
                pool.checker.task.cancel()  # the new pool runs its own
        hook = self.on_member_change
        for pool in new.values():
            if pool.checker is not None and self.health_checks:
                pool.checker.start()
            if hook is not None:
                pool.state.listeners.append(_member_hook(hook, pool))
        self.pools = new
        self.router = Router(list(new.values()))
        if self._maintainer is None:
            self._maintainer = self.loop.create_task(self._maintain())

    def set_members(self, pool_name: str, members: list[MemberSpec]) -> dict[str, list[str]]:
        """Replace one pool's members in one step (the operator's EndpointSlice updates).

        Members are matched by name: one that stays keeps its state and connections, a changed
        one keeps them when its address and pool settings are unchanged, a removed one has its
        idle connections closed at once and its in-flight requests cut after ``removalGrace``.
        Raises InvalidBalancerPool when the new set breaks a rule (duplicate names or routes,
        a redirect to a missing route)."""
        pool = self.pools[pool_name]
        spec = dataclasses.replace(pool.spec, members=tuple(members))
        check_members(spec)
        old = {m.name: m for m in pool.spec.members}
        new = {m.name: m for m in members}
        self.apply([spec if p.spec.name == pool_name else p.spec for p in self.pools.values()])
        return {"added": [n for n in new if n not in old],
                "changed": [n for n in new if n in old and old[n] != new[n]],
                "removed": [n for n in old if n not in new]}

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
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

    async def handle(self, head: RequestHead, body: Body, resume: _Resume | None = None
                     ) -> Response:
        """``resume``: a request the fast lane began (and counted) but could not finish."""
        if not accesslog.enabled() and self.metrics is None:
            return await self._handle(head, body, resume)
        started = time.monotonic()
        return self._observed(head, await self._handle(head, body, resume), started)

    def _observed(self, head: RequestHead, response: Response, started: float) -> Response:
        """``response``, logged and counted when it ends (access log, metrics)."""
        log_on, metrics = accesslog.enabled(), self.metrics
        if not log_on and metrics is None:
            return response
        finish, chunks, info, status = response.finish, response.chunks, response.info, response.status
        sent = [0]
        if response.body is not None:
            sent[0] = len(response.body)  # written as it is; chunks() is not what counts
        else:
            response.chunks = counting(chunks, sent)

        def logged(ok: bool) -> None:
            finish(ok)
            if log_on:
                accesslog.record(head, status, sent[0], started, info, ok)
            if metrics is not None:
                metrics.observe(status, started, info, ok)

        response.finish = logged
        return response

    def fast(self, head: RequestHead, sink: Sink) -> bool:
        """The fast lane, for a bodiless request without Upgrade from the fast front end's
        parser callback: when its pool needs no session work and the member chosen has an idle
        pooled connection, the request goes out from here and is answered from that
        connection's callbacks, with no Task, future or event-loop turn in between. Whatever
        goes differently (no idle connection, an error before the head) continues on the
        ordinary path through ``sink.respond_later``, with the same decisions. False: declined,
        nothing done."""
        if not self.fast_lane:
            return False
        route = self.router.match(head.host, head.path)
        if route is None:
            return False
        pool = route.pool
        if not pool.fast:
            return False
        spec = pool.spec
        now = self.clock()
        member = pool.state.choose(now, (), _hash_key(head, spec) if spec.hash is not None else None)
        if member is None:
            return False  # the ordinary path waits for one, or answers 503
        started = now if self.monotonic else time.monotonic()
        pool.budget.request(now)
        conns = pool.connections[member.name]
        conn = conns.take_idle(now)
        if conn is None:
            sink.respond_later(self.handle(head, EMPTY_BODY, _Resume(member)))
            return True
        member.begin()
        m = member.spec
        request_head = _request_head(head, route, m,
                                     map_path(head.path, route.prefix, route.backend_prefix),
                                     self._fixed_headers(head, EMPTY_BODY, pool.drop))
        try:
            conn.begin(request_head, head.method == "HEAD")
        except UpstreamError as exc:  # found closed: nothing went out, try again the usual way
            self._failed(pool, member, conns, conn, exc, [], [], rewind=True, resendable=False)
            sink.respond_later(self.handle(head, EMPTY_BODY, _Resume(None)))
            return True
        member.transferred += len(request_head)
        self.fast_requests += 1
        _Exchange(self, head, sink, route, member, conns, conn, now, started)
        return True

    def _wait_for(self, exchange: _Exchange) -> None:
        self._waiting.add(exchange)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(DEADLINE_SWEEP, self._sweep)

    def _sweep(self) -> None:
        """Time out fast-lane requests past their member's ``timeout``: a set lookup per
        request instead of a timer, checked every DEADLINE_SWEEP seconds."""
        self._sweeper = None
        now = time.monotonic() if self.monotonic else self.loop.time()  # as _Exchange's deadline
        for exchange in [e for e in self._waiting if e.deadline <= now]:
            try:
                exchange.timed_out()
            except Exception:  # pragma: no cover - one request's failure must not stop the sweep
                log.exception("pool %s: timing out a request failed", exchange.route.pool.spec.name)
        if self._waiting:
            self._sweeper = self.loop.call_later(DEADLINE_SWEEP, self._sweep)

    async def _handle(self, head: RequestHead, body: Body, resume: _Resume | None = None
                      ) -> Response:
        route = self.router.match(head.host, head.path)
        if route is None:
            return local_response(404, "Not Found", f"No route for {head.path}",
                                  {"reason": "no-route"})
        pool = route.pool
        spec = pool.spec
        state = pool.state
        upstream_path = map_path(head.path, route.prefix, route.backend_prefix)
        fixed = self._fixed_headers(head, body, pool.drop)
        head_only = head.method == "HEAD"
        has_body = body.length != 0
        tried: list[MemberState] = resume.tried if resume is not None else []
        failures: list[str] = resume.failures if resume is not None else []
        chosen = resume.member if resume is not None else None
        if chosen is not None and state.by_name.get(chosen.name) is not chosen:
            chosen = None  # a reload came in between: choose again in the new pool
        clock = self.clock
        if resume is None:
            pool.budget.request(clock())
        deadline = clock() + spec.timeout
        body_started = False
        # May this request go out again after its bytes did? Its method must allow it, and its
        # body must still be at hand: buffered, when small enough (retryBufferSize).
        method_ok = _method_resendable(head, spec)
        buffered: bytes | None = None
        if has_body and method_ok and body.length is not None and body.length <= spec.retry_buffer:
            buffered = await _read_all(body)
        # A chunked body's first piece (what came with the head) is read before anything goes
        # out: a body broken from its first bytes (a bad chunk size or extension) is refused
        # with nothing sent to a member. (With Expect, this is when 100 Continue is sent.)
        prefix: bytes | None = None
        if body.length is None:
            prefix = await body.read()
        resendable = method_ok and (not has_body or buffered is not None)
        session, signed, reason = self._session(head, pool) if pool.sticky else (NO_ROUTE, None, None)
        hash_key = _hash_key(head, spec) if spec.hash is not None else None

        member: MemberState | None
        while True:
            now = clock()
            if chosen is not None:
                member, chosen = chosen, None  # chosen by the fast lane, which found no idle connection
                if reason is None:
                    reason = Reason.NEW_SESSION
            elif session.route is not None:
                member, why = state.find_route(session.route, now, tried)
                if member is not None:
                    state.note_sticky(member, now)
                elif spec.nofailover and why is not Reason.MEMBER_GONE:
                    _count(pool.route_reasons, Reason.NOFAILOVER)
                    return local_response(
                        503, _REASONS[503],
                        f"Service unavailable: the session's member (route {session.route!r}) in "
                        f"pool {spec.name!r} is unusable ({why.value}) and nofailover is on.",
                        {"pool": spec.name, "reason": "nofailover", "route_reason": Reason.NOFAILOVER,
                         "attempts": len(tried)}, extra=[("Retry-After", "1")])
                else:
                    member = state.choose(now, tried, hash_key)
                reason = why
            else:
                member = state.choose(now, tried, hash_key)
                if reason is None:
                    reason = Reason.NEW_SESSION
            if member is None:
                if spec.timeout > 0 and now < deadline and not tried:
                    await asyncio.sleep(min(0.05, deadline - now))
                    continue
                return self._unavailable(spec, failures, len(tried))
            conns = pool.connections[member.name]
            attempt_started = clock()
            try:
                conn = await conns.acquire()
            except PoolExhausted as exhausted:  # mypyc: one type per `except ... as` name
                failures.append(f"{member.name}: {exhausted}")
                tried.append(member)
                if len(tried) > spec.maxattempts:
                    return self._unavailable(spec, failures, len(tried))
                continue
            except ConnectFailed as refused:
                pool.member_error(member, clock(), "connect-error", str(refused))
                failures.append(f"{member.name}: {refused}")
                tried.append(member)
                if len(tried) > spec.maxattempts:
                    return self._unavailable(spec, failures, len(tried))
                continue

            acquired = clock()
            member.begin()
            m = member.spec
            variables = self._variables(pool, session, member) if pool.sticky or \
                spec.balancer_variables.request_headers or spec.balancer_variables.response_headers \
                else None
            extra = ""
            if variables is not None and spec.balancer_variables.request_headers:
                extra = "".join(f"{VARIABLE_HEADERS[k]}: {v}\r\n" for k, v in variables.items())
            request_head = _request_head(head, route, m, upstream_path, fixed, extra)
            try:
                conn.begin(request_head, head_only)
                member.transferred += len(request_head)
                if has_body:
                    body_started = True
                    if buffered is not None:
                        member.transferred += len(buffered)
                        await conn.write(buffered, m.timeout)
                    else:
                        await self._send_body(conn, body, member, prefix)
                status, reason_phrase, raw_headers = await conn.read_head(m.timeout)
            except UpstreamError as exc:
                failed = self._failed(pool, member, conns, conn, exc, tried, failures,
                                      rewind=not body_started or buffered is not None,
                                      resendable=resendable)
                if failed is None:
                    continue
                return failed
            except BaseException:
                member.end()
                conns.release(conn, False)
                raise

            assert reason is not None
            response = self._answered(head, route, member, conns, conn, status, reason_phrase,
                                      raw_headers, reason, len(tried) + 1, attempt_started, acquired)
            if variables is not None:
                response.info["balancer"] = variables
                self._session_response(response, pool, session, signed, member, variables)
            return response

    def _failed(self, pool: Pool, member: MemberState, conns: ConnectionPool,
                conn: UpstreamConnection, exc: UpstreamError, tried: list[MemberState],
                failures: list[str], *, rewind: bool, resendable: bool) -> Response | None:
        """An attempt failed before its response head: the response that ends the request, or
        None to try again (``tried`` and ``failures`` updated). ``rewind``: the request can go
        out again as it was (no body byte consumed, or the body buffered); ``resendable``: its
        method and body allow sending it to another member."""
        spec = pool.spec
        clock = self.clock
        member.end()
        conns.release(conn, False)
        # A reused keep-alive connection that the backend closed before answering (the
        # keep-alive race): re-sent on a fresh connection when nothing is lost doing so.
        if not exc.sent or (isinstance(exc, UpstreamClosed) and conn.reused
                            and not conn.received_any and rewind):
            # Idle connections at least as old as this one are as likely dead: flush them,
            # so that the request goes out on a fresh connection.
            flushed = conns.close_idle()
            log.info("pool %s: member %s closed a reused connection; re-sending "
                     "(%d idle connections flushed)", spec.name, member.name, flushed)
            return None
        failures.append(f"{member.name}: {exc}")
        if isinstance(exc, UpstreamTimeout):
            if spec.failontimeout:
                pool.member_error(member, clock(), "failontimeout", str(exc))
            else:
                pool.observe(member, None, clock())
            return local_response(504, _REASONS[504], _explain(spec, 504, failures),
                                  {"pool": spec.name, "member": member.name,
                                   "reason": exc.kind, "attempts": len(tried) + 1})
        if isinstance(exc, UpstreamClosed) and not conn.received_any and resendable:
            pool.member_error(member, clock(), "closed-before-response", str(exc))
            tried.append(member)
            if len(tried) <= spec.maxattempts and pool.budget.try_retry(clock()):
                return None
            if len(tried) <= spec.maxattempts:
                failures.append("retry budget spent: not sent again")
        elif isinstance(exc, UpstreamProtocolError):
            # A malformed or oversized response head: the member is broken.
            pool.member_error(member, clock(), "bad-response", str(exc))
        else:
            pool.observe(member, 502, clock())
        return local_response(502, _REASONS[502], _explain(spec, 502, failures),
                              {"pool": spec.name, "member": member.name,
                               "reason": exc.kind, "attempts": len(tried) + 1})

    def _answered(self, head: RequestHead, route: _Route, member: MemberState,
                  conns: ConnectionPool, conn: UpstreamConnection, status: int, reason_phrase: bytes,
                  raw_headers: list[tuple[bytes, bytes]], reason: Reason, attempts: int,
                  attempt_started: float, acquired: float) -> Response:
        """The response head arrived: health and outlier bookkeeping, then the response."""
        pool = route.pool
        now = self.clock()
        if status in pool.spec.failonstatus:
            member.mark_error(now, "failonstatus", f"status {status}")
        pool.observe(member, status, now)
        _count(pool.route_reasons, reason)
        # connect: getting a connection (pooled or new); response: sending the request until
        # the response head arrived (both rounded where logged). Made whole here: a dict that
        # grows past five keys resizes.
        info: dict[str, object] = {
            "pool": pool.spec.name, "member": member.name, "attempts": attempts,
            "route_reason": reason, "connect_ms": (acquired - attempt_started) * 1000,
            "response_ms": (now - acquired) * 1000}
        return self._stream(head, route, pool, member, conns, conn, status, reason_phrase,
                            raw_headers, info)

    def _session(self, head: RequestHead, pool: Pool
                 ) -> tuple[SessionRoute, SignedSession | None, Reason | None]:
        """The route this request asks for, its signed session, and a reason when a cookie it
        carried was refused (then the request is balanced as a new session)."""
        spec = pool.spec
        cookies = [v for n, v in head.headers if n.lower() == "cookie"]
        reason: Reason | None = None
        session = NO_ROUTE
        if spec.stickysession is not None:
            session = extract_route(head.path, head.query, cookies, spec.stickysession,
                                    spec.stickysessionsep, spec.scolonpathdelim)
            if session.malformed:
                reason = Reason.COOKIE_INVALID
                session = NO_ROUTE
        signed: SignedSession | None = None
        sc = spec.session_cookie
        if sc is not None and pool.session_key is not None:
            value = cookie_value(cookies, sc.cookie.name)
            if value is not None:
                state, decoded = decode_session(value, pool.session_key, self.wallclock(),
                                                sc.idle_timeout, sc.absolute_timeout)
                if state is SessionState.OK and decoded is not None:
                    signed = decoded
                    if session.route is None:
                        session = SessionRoute(decoded.route, sc.cookie.name)
                elif session.route is None:
                    reason = (Reason.COOKIE_EXPIRED if state is SessionState.EXPIRED
                              else Reason.COOKIE_INVALID)
        return session, signed, reason

    @staticmethod
    def _variables(pool: Pool, session: SessionRoute, member: MemberState) -> dict[str, str]:
        """httpd's ``BALANCER_*`` environment, computed as mod_proxy_balancer documents it."""
        variables = {"BALANCER_NAME": pool.spec.balancer_name,
                     "BALANCER_WORKER_NAME": member.name,
                     "BALANCER_WORKER_ROUTE": member.route or ""}
        if session.route is not None and session.source is not None:
            variables["BALANCER_SESSION_STICKY"] = session.source
            variables["BALANCER_SESSION_ROUTE"] = session.route
        if pool.sticky and (session.route is None or session.route != member.route):
            variables["BALANCER_ROUTE_CHANGED"] = "1"
        return variables

    def _session_response(self, response: Response, pool: Pool, session: SessionRoute,
                          signed: SignedSession | None, member: MemberState,
                          variables: dict[str, str]) -> None:
        spec = pool.spec
        if spec.balancer_variables.response_headers:
            response.headers = [(n, v) for n, v in response.headers
                                if n.lower() not in _VARIABLE_FIELDS]
            response.headers.extend((VARIABLE_HEADERS[k], v) for k, v in variables.items())
        if member.route is None:
            return
        changed = "BALANCER_ROUTE_CHANGED" in variables
        if spec.route_cookie is not None and changed:
            # httpd: Header add Set-Cookie "ROUTEID=.%{BALANCER_WORKER_ROUTE}e" env=BALANCER_ROUTE_CHANGED
            response.add_field("Set-Cookie", set_cookie(spec.route_cookie,
                                                        f"{spec.stickysessionsep}{member.route}"))
        sc = spec.session_cookie
        if sc is not None and pool.session_key is not None:
            now = int(self.wallclock())
            issued = signed.issued if signed is not None and signed.route == member.route else now
            value = encode_session(SignedSession(member.route, issued, now), pool.session_key)
            response.add_field("Set-Cookie", set_cookie(sc.cookie, value))

    @staticmethod
    def _fixed_headers(head: RequestHead, body: Body, drop: frozenset[str]) -> bytes:
        """The request fields that do not depend on the member chosen, from the client
        connection's memo when its last request had the same."""
        memo = head.memo
        length = body.length
        if memo is not None:
            if (memo.headers is head.headers and memo.drop is drop and memo.host == head.host
                    and memo.method == head.method and memo.length == length):
                return memo.block
            block = _fixed_block(head, length, drop)
            memo.headers, memo.drop, memo.host, memo.method = head.headers, drop, head.host, head.method
            memo.length, memo.block = length, block
            return block
        return _fixed_block(head, length, drop)

    @staticmethod
    async def _send_body(conn: UpstreamConnection, body: Body, member: MemberState,
                         prefix: bytes | None) -> None:
        """``prefix``: the body's first piece, already read (b"" when that was its end)."""
        timeout = member.spec.timeout
        chunked = body.length is None
        sent = 0
        while True:
            if prefix is not None:
                chunk, prefix = prefix, None
            else:
                chunk = await body.read()
            if not chunk:
                break
            sent += len(chunk)
            member.transferred += len(chunk)
            if chunked:
                await conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk), timeout)
            else:
                await conn.write(chunk, timeout)
        if chunked:
            await conn.write(b"0\r\n\r\n", timeout)
        elif sent != body.length:
            raise _short_body(sent, body.length or 0)

    def _stream(self, head: RequestHead, route: _Route, pool: Pool, member: MemberState,
                conns: ConnectionPool, conn: UpstreamConnection, status: int, reason: bytes,
                raw_headers: list[tuple[bytes, bytes]], info: dict[str, object]) -> Response:
        """The Response for a member's answer; ``info`` its facts so far (see _answered)."""
        fields: bytes | None
        memo = conn.fields_memo  # None when the connection read new fields (raw_headers)
        if memo is None:
            memo = conn.fields_memo = response_fields(raw_headers)
        fields, length, reverse = memo
        out: list[tuple[str, str]] | None = None
        if reverse and route.spec.reverse:
            origin = f"{head.scheme}://{head.host}" if head.host else ""
            bases = pool.reverse_bases[route.spec.path]
            out = [(n, reverse_location(v, bases, route.backend_prefix, origin, route.prefix))
                   if n.lower() in REVERSE_FIELDS else (n, v) for n, v in decode_fields(fields)]
            fields = None
        timeout = member.spec.timeout
        bodiless = head.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        spec = pool.spec
        if status == 101:
            if conn.upgraded and is_websocket_upgrade(head) and _accepts_websocket(head, raw_headers):
                if out is None:
                    out = decode_fields(fields or b"")
                out += [("Upgrade", "websocket"), ("Connection", "Upgrade")]
                return self._tunnel(pool, member, conns, conn, reason, out, info)
            member.end()
            conns.release(conn, False)
            return local_response(
                502, _REASONS[502],
                f"Bad gateway: member {member.name!r} of pool {spec.name!r} answered 101 without "
                "completing a WebSocket handshake for this request.",
                info | {"reason": "bad-upgrade"})

        def finish(ok: bool) -> None:
            member.end()
            if not ok and isinstance(conn.error, UpstreamTimeout) and spec.failontimeout:
                pool.member_error(member, self.clock(), "failontimeout", str(conn.error))
            conns.release(conn, ok)

        if bodiless or (conn.complete and not conn.reading_paused):
            # All of it is here already (a small response): handed over as one piece.
            body = b"" if bodiless else conn.take_body()
            member.read += len(body)
            return Response(status, reason.decode("latin-1") or "", out,
                            0 if bodiless and head.method != "HEAD" else length, finish=finish,
                            info=info, body=body, fields=fields)

        return Response(status, reason.decode("latin-1") or "", out, length,
                        member_chunks(conn, member, timeout), finish, info, fields=fields)

    def _tunnel(self, pool: Pool, member: MemberState, conns: ConnectionPool,
                conn: UpstreamConnection, reason: bytes, headers: list[tuple[str, str]],
                info: dict[str, object]) -> Response:
        """A 101: after the head, bytes flow both ways until either side closes. The tunnel
        counts as busy on its member (bybusyness sees WebSockets) until it ends."""
        tunnel = Tunnel(conn)

        async def upgrade(client: ClientStream) -> None:
            tunnel.client = client
            pool.tunnels.setdefault(member.name, set()).add(tunnel)
            try:
                await tunnel.run(member)
            finally:
                pool.tunnels.get(member.name, set()).discard(tunnel)

        def finish(ok: bool) -> None:
            member.end()
            conns.release(conn, False)  # never pooled again

        info["upgrade"] = "websocket"
        return Response(101, reason.decode("latin-1") or "Switching Protocols", headers, None,
                        finish=finish, info=info, upgrade=upgrade)

    @staticmethod
    def _unavailable(spec: BalancerPool, failures: list[str], attempts: int) -> Response:
        return local_response(503, _REASONS[503], _explain(spec, 503, failures),
                              {"pool": spec.name, "reason": "no-member", "attempts": attempts},
                              extra=[("Retry-After", "1")])


def _fixed_block(head: RequestHead, length: int | None, drop: frozenset[str]) -> bytes:
    lines, websocket = request_fields(head.headers, drop, head.client, head.host)
    lines.append(f"X-Forwarded-Proto: {head.scheme}")
    if websocket and head.method == "GET":
        lines.append("Upgrade: websocket")
        lines.append("Connection: Upgrade")
    if length is None:
        lines.append("Transfer-Encoding: chunked")
    elif length or head.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n").encode("latin-1")


def _request_head(head: RequestHead, route: _Route, m: MemberSpec, path: str, fixed: bytes,
                  extra: str = "") -> bytes:
    """``path``: the request's, mapped to the member (``map_path``); the query follows it."""
    host = head.host if route.spec.preserve_host else m.authority
    start = (f"{head.method} {m.base_path}{path}?{head.query} HTTP/1.1\r\nHost: {host}\r\n" if head.query
             else f"{head.method} {m.base_path}{path} HTTP/1.1\r\nHost: {host}\r\n").encode("latin-1")
    if extra:
        return b"".join((start, fixed, extra.encode("latin-1"), b"\r\n"))
    return b"".join((start, fixed, b"\r\n"))


@dataclass(slots=True)
class _Resume:
    """Where the ordinary path takes over a request from the fast lane."""

    #: Chosen already (and counted by the scheduler), but with no idle connection.
    member: MemberState | None
    tried: list[MemberState] = dataclasses.field(default_factory=list)
    failures: list[str] = dataclasses.field(default_factory=list)


class _Exchange(Listener):
    """A fast-lane request on its pooled connection, waiting for the response head: told by
    the connection's callbacks (the listener), or by the member's timeout."""

    __slots__ = ("conn", "conns", "deadline", "forwarder", "head", "member", "route", "sent",
                 "sink", "started")

    def __init__(self, forwarder: Forwarder, head: RequestHead, sink: Sink, route: _Route,
                 member: MemberState, conns: ConnectionPool, conn: UpstreamConnection,
                 sent: float, started: float) -> None:
        self.forwarder = forwarder
        self.head = head
        self.sink = sink
        self.route = route
        self.member = member
        self.conns = conns
        self.conn = conn
        self.sent = sent
        self.started = started
        conn.listener = self
        timeout = member.spec.timeout
        if timeout > 0:
            self.deadline = (started if forwarder.monotonic else forwarder.loop.time()) + timeout
            forwarder._wait_for(self)

    def upstream_ready(self) -> None:
        conn = self.conn
        if conn.head_done:
            self._stop_waiting()
            fwd = self.forwarder
            try:
                response = fwd._answered(self.head, self.route, self.member, self.conns, conn,
                                         conn.status, conn.reason, conn.headers,
                                         Reason.NEW_SESSION, 1, self.sent, self.sent)
            except Exception:
                # A bug, not the member's doing: the client gets a 500 as on the ordinary path,
                # rather than a connection left waiting inside a protocol callback.
                log.exception("pool %s: handling the response of member %s failed",
                              self.route.pool.spec.name, self.member.name)
                self.member.end()
                self.conns.release(conn, False)
                response = local_response(500, "Internal Server Error", "internal error",
                                          {"pool": self.route.pool.spec.name, "reason": "error"})
            self.sink.respond(fwd._observed(self.head, response, self.started))
        elif conn.error is not None:
            self._stop_waiting()
            self._failed(conn.error)

    def timed_out(self) -> None:
        self._stop_waiting()
        self._failed(UpstreamTimeout(
            f"backend did not answer within {self.member.spec.timeout:g}s while waiting for "
            "the response head"))

    def _stop_waiting(self) -> None:
        self.conn.listener = None
        self.forwarder._waiting.discard(self)

    def _failed(self, exc: UpstreamError) -> None:
        fwd, head = self.forwarder, self.head
        pool = self.route.pool
        resume = _Resume(None)
        response = fwd._failed(pool, self.member, self.conns, self.conn, exc, resume.tried,
                               resume.failures, rewind=True,
                               resendable=_method_resendable(head, pool.spec))
        if response is None:
            self.sink.respond_later(fwd.handle(head, EMPTY_BODY, resume))
        else:
            self.sink.respond(fwd._observed(head, response, self.started))


def _count(counts: dict[str, int], key: str) -> None:
    counts[key] = counts.get(key, 0) + 1


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


def _hash_key(head: RequestHead, spec: BalancerPool) -> str | None:
    """The request attribute lbmethod hash maps to a member; None when the request lacks it."""
    h = spec.hash
    assert h is not None
    if h.on is HashOn.CLIENT:
        return head.client
    assert h.name is not None
    if h.on is HashOn.QUERY:
        return query_param(head.query, h.name)
    if h.on is HashOn.COOKIE:
        return cookie_value((v for n, v in head.headers if n.lower() == "cookie"), h.name)
    low = h.name.lower()
    return next((v for n, v in head.headers if n.lower() == low), None)


def _method_resendable(head: RequestHead, spec: BalancerPool) -> bool:
    """Whether the request's method (or the pool's policy for the others) lets it go out again."""
    if head.method in IDEMPOTENT:
        return True
    policy = spec.retry_non_idempotent
    if policy is RetryNonIdempotent.ALWAYS:
        return True
    return policy is RetryNonIdempotent.WITH_IDEMPOTENCY_KEY and any(
        n.lower() == "idempotency-key" and v.strip() for n, v in head.headers)


async def _read_all(body: Body) -> bytes:
    chunks = []
    while chunk := await body.read():
        chunks.append(chunk)
    data = b"".join(chunks)
    if body.length is not None and len(data) != body.length:
        raise _short_body(len(data), body.length)
    return data


def _short_body(sent: int, length: int) -> BadRequest:
    """A body that ended short of its Content-Length (the front end ended the message): the
    member would read the next request as the rest of it, so nothing more goes out."""
    return BadRequest(400, f"request body of {sent} bytes, {length} announced")


def _accepts_websocket(head: RequestHead, headers: list[tuple[bytes, bytes]]) -> bool:
    """RFC 6455 §4.2.2: a 101 that completes this request's WebSocket handshake, not just
    any 101 (which would open a raw tunnel past the routes)."""
    key = next((v.strip() for n, v in head.headers if n.lower() == "sec-websocket-key"), None)
    if key is None:
        return False
    expected = base64.b64encode(hashlib.sha1((key + _WS_GUID).encode("latin-1")).digest()).decode()
    upgrade = accept = False
    for name, value in headers:
        low = name.lower()
        if low == b"upgrade":
            upgrade = value.strip().lower() == b"websocket"
        elif low == b"sec-websocket-accept":
            accept = value.strip() == expected.encode()
    return upgrade and accept


_WS_GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def is_websocket_upgrade(head: RequestHead) -> bool:
    """RFC 6455 §4.1: GET with ``Upgrade: websocket`` and ``Connection: Upgrade``."""
    if head.method != "GET":
        return False
    upgrade = connection = False
    for name, value in head.headers:
        low = name.lower()
        if low == "upgrade" and "websocket" in value.lower():
            upgrade = True
        elif low == "connection" and "upgrade" in value.lower():
            connection = True
    return upgrade and connection


#: A WebSocket close frame from the server (unmasked), status 1001 Going Away.
GOING_AWAY: Final = b"\x88\x02\x03\xe9"


class Tunnel:
    """One upgraded connection: the client's stream and the member's connection."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self.conn = conn
        self.client: ClientStream | None = None
        self.closed = False
        self.closing: asyncio.Future[None] | None = None

    async def run(self, member: MemberState) -> None:
        client = self.client
        assert client is not None
        conn = self.conn

        async def up() -> None:
            while data := await client.read():
                member.transferred += len(data)
                await conn.write(data, 0)

        async def down() -> None:
            while data := await conn.read_body(0):
                member.read += len(data)
                await client.write(data)

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.closed = True
            conn.close()
            client.close()

    def going_away(self) -> None:
        """Tell the client the member went away (1001), then close both sides."""
        if self.closed or self.client is None:
            return
        self.closed = True
        self.closing = asyncio.ensure_future(self._send_going_away(self.client))

    async def _send_going_away(self, client: ClientStream) -> None:
        with contextlib.suppress(Exception):
            await client.write(GOING_AWAY)
        client.close()
        self.conn.close()
