"""Prometheus metrics: one registry per Forwarder.

What the proxy already counts (member state, busy, connections, WebSockets, route decisions,
health-check results, elected and error counters) is read at scrape time by a custom collector,
so the request path does no extra work for it. Only what exists nowhere else — requests by
status class, latency, retries, failovers — is counted per request, by :meth:`ProxyMetrics.observe`
called from the access-log wrapper point of ``Forwarder.handle`` (or by :meth:`ProxyMetrics.instrument`
around any ``handle``), in plain numbers that a second collector turns into families at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from time import monotonic  # a module global: time.monotonic is an attribute lookup
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from .messages import Body, RequestHead, Response
from .scheduling import FLAG_BITS

if TYPE_CHECKING:
    from .forward import Forwarder

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds: from 1 ms (a pooled connection to a near backend) to a minute (httpd's timeout).
#: Not Final: compiled, a Final tuple of floats is never set for the module's own use below.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)
_CLASS_NAMES: Final = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
_BUCKET_LABELS: Final = (*(repr(b) for b in LATENCY_BUCKETS), "+Inf")  # as prometheus_client writes le


class ProxyMetrics:
    """The registry of one Forwarder, with its per-request counters."""

    def __init__(self, forwarder: Forwarder) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Per pool and member: plain numbers, turned into families at scrape time
        #: (prometheus_client's ``labels()`` and locks cost about 8 µs a request, a third of
        #: what the whole fast lane does).
        #: Pool, then member: two lookups by strings that hash once, not one by a new tuple.
        self.counts: dict[object, dict[object, RequestCounts]] = {}
        self.bounds: list[float] = list(LATENCY_BUCKETS)
        self.retries: dict[object, int] = {}
        self.failovers: dict[object, int] = {}
        self.manager_changes = Counter(
            "balancerpool_manager_changes", "Changes made through the balancer-manager, by pool "
            "and what changed (member, pool, add-member).", ["pool", "kind"], registry=self.registry)
        self.registry.register(RequestCollector(self))
        self.registry.register(StateCollector(forwarder))

    def observe(self, status: int, started: float, info: dict[str, object], ok: bool) -> None:
        """One finished response; ``started`` is ``time.monotonic()`` when the request came in,
        ``info`` the Response's facts (pool, member, attempts, route_reason ...)."""
        pool = info.get("pool", "")
        member = info.get("member", "")
        members = self.counts.get(pool)
        if members is None:
            members = self.counts[pool] = {}
        counts = members.get(member)
        if counts is None:
            counts = members[member] = RequestCounts()
        status_class = status // 100
        counts.codes[status_class if 0 < status_class < 6 else 0] += 1
        seconds = monotonic() - started
        # bisect_left, written out: compiled, a scan from the fast end compares plain doubles
        # where bisect needs a float object (most responses land in the first buckets).
        bucket = 0
        for bound in self.bounds:
            if seconds <= bound:
                break
            bucket += 1
        counts.latency[bucket] += 1
        counts.seconds += seconds
        attempts = info.get("attempts", 0)
        if isinstance(attempts, int) and attempts > 1:
            self.retries[pool] = self.retries.get(pool, 0) + attempts - 1
            if "route_reason" in info:  # a member answered: the request failed over to it
                self.failovers[pool] = self.failovers.get(pool, 0) + 1
        if not ok:
            counts.incomplete += 1

    def instrument(self, handle: Callable[[RequestHead, Body], Awaitable[Response]]
                   ) -> Callable[[RequestHead, Body], Awaitable[Response]]:
        """``handle`` (``Forwarder.handle``) observed: for front ends that cannot call
        :meth:`observe` from inside ``handle`` itself."""

        async def observed(head: RequestHead, body: Body) -> Response:
            started = time.monotonic()
            response = await handle(head, body)
            finish, info, status = response.finish, response.info, response.status

            def finished(ok: bool) -> None:
                finish(ok)
                self.observe(status, started, info, ok)

            response.finish = finished
            return response

        return observed

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)


def enable(forwarder: Forwarder) -> ProxyMetrics:
    """The forwarder's metrics, created on first use (idempotent)."""
    metrics = forwarder.metrics_made
    if metrics is None:
        metrics = forwarder.metrics_made = ProxyMetrics(forwarder)
    return metrics


def get(forwarder: Forwarder) -> ProxyMetrics | None:
    """The forwarder's metrics when :func:`enable` was called, else None."""
    return forwarder.metrics_made


class RequestCounts:
    """What :meth:`ProxyMetrics.observe` counts for one pool and member."""

    __slots__ = ("codes", "incomplete", "latency", "seconds")

    def __init__(self) -> None:
        #: By status class: other, 1xx .. 5xx.
        self.codes = [0] * 6
        #: By latency bucket, not cumulative; the last one is +Inf.
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.incomplete = 0


class RequestCollector(Collector):
    """The per-request counters, as the families they always were."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics  # its registry holds this collector: a cycle the GC collects

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        m = ["pool", "member"]
        requests = CounterMetricFamily(
            "balancerpool_requests", "Requests answered, by pool, member and status class "
            "(member is empty for a local answer: no route, no usable member).",
            labels=[*m, "code"])
        latency = HistogramMetricFamily(
            "balancerpool_request_duration_seconds",
            "From the request head to the last byte of the response, by pool and member.", labels=m)
        incomplete = CounterMetricFamily(
            "balancerpool_responses_incomplete", "Responses whose body did not reach the client "
            "in full (client gone, member closed, timeout).", labels=m)
        retries = CounterMetricFamily(
            "balancerpool_retries", "Attempts beyond the first: a request sent to another member "
            "after a failed connect or a connection closed before any response.", labels=["pool"])
        failovers = CounterMetricFamily(
            "balancerpool_failovers", "Requests a member answered after at least one other "
            "member failed them.", labels=["pool"])
        for pool, member, counts in [(p, m, c) for p, members in list(metrics.counts.items())
                                     for m, c in list(members.items())]:
            labels = [str(pool), str(member)]
            for index, count in enumerate(counts.codes):
                if count:
                    requests.add_metric([*labels, _CLASS_NAMES[index]], count)
            cumulative, buckets = 0, []
            for bound, count in zip(_BUCKET_LABELS, counts.latency, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric(labels, buckets, counts.seconds)
            if counts.incomplete:
                incomplete.add_metric(labels, counts.incomplete)
        for pool, count in list(metrics.retries.items()):
            retries.add_metric([str(pool)], count)
        for pool, count in list(metrics.failovers.items()):
            failovers.add_metric([str(pool)], count)
        yield from (requests, latency, retries, failovers, incomplete)


class StateCollector(Collector):
    """Reads the live state of every pool at scrape time."""

    def __init__(self, forwarder: Forwarder) -> None:
        # A plain reference: a class compiled with mypyc (Forwarder) cannot be weakly referenced.
        # The forwarder holds its metrics: a cycle the GC collects.
        self.forwarder = forwarder

    def describe(self) -> list[Metric]:
        return []  # the families depend on the pools in force: nothing to pre-register

    def collect(self) -> Iterator[Metric]:
        yield from _collect(self.forwarder)


def _collect(forwarder: Forwarder) -> Iterator[Metric]:
    m = ["pool", "member"]
    usable = GaugeMetricFamily("balancerpool_member_usable",
                               "1 when the member may take new requests (none of D S E C).", labels=m)
    flag = GaugeMetricFamily("balancerpool_member_status",
                             "The member's status flags (D S I H R E N C), 1 when set.",
                             labels=[*m, "flag"])
    since = GaugeMetricFamily("balancerpool_member_status_age_seconds",
                              "Seconds since the member's status flags last changed.", labels=m)
    loadfactor = GaugeMetricFamily("balancerpool_member_loadfactor", "The member's loadfactor.",
                                   labels=m)
    lbset = GaugeMetricFamily("balancerpool_member_lbset", "The member's lbset.", labels=m)
    busy = GaugeMetricFamily("balancerpool_member_busy",
                             "Requests in flight to the member (WebSockets included).", labels=m)
    elected = CounterMetricFamily("balancerpool_member_elected",
                                  "Times the scheduler chose the member.", labels=m)
    errors = CounterMetricFamily("balancerpool_member_errors",
                                 "Errors that counted against the member (connect errors, "
                                 "failonstatus, timeouts, outlier ejections).", labels=m)
    error_retries = CounterMetricFamily("balancerpool_member_error_retries",
                                        "Times the member left E after its retry time.", labels=m)
    sent = CounterMetricFamily("balancerpool_member_sent_bytes",
                               "Bytes sent to the member (request heads and bodies).", labels=m)
    received = CounterMetricFamily("balancerpool_member_received_bytes",
                                   "Response body bytes received from the member.", labels=m)
    conn_open = GaugeMetricFamily("balancerpool_upstream_connections_open",
                                  "Pooled connections open to the member, idle or busy.", labels=m)
    conn_idle = GaugeMetricFamily("balancerpool_upstream_connections_idle",
                                  "Pooled connections idle, ready for reuse.", labels=m)
    opened = CounterMetricFamily("balancerpool_upstream_connections_opened",
                                 "Connections opened to the member by its current pool.", labels=m)
    flushed = CounterMetricFamily("balancerpool_upstream_connections_flushed",
                                  "Idle connections closed at once because the member turned "
                                  "unusable or draining, or one of them was found closed.", labels=m)
    websockets = GaugeMetricFamily("balancerpool_member_websockets",
                                   "WebSockets open through the member.", labels=m)
    reasons = CounterMetricFamily("balancerpool_route_decisions",
                                  "Where requests went and why (new-session, sticky, "
                                  "member-error ...).", labels=["pool", "reason"])
    hc_up = GaugeMetricFamily("balancerpool_health_check_up",
                              "1 when the member's last health check passed, 0 when it failed.",
                              labels=m)
    hc_time = GaugeMetricFamily("balancerpool_health_check_last_timestamp_seconds",
                                "Unix time of the member's last health check.", labels=m)
    hc_runs = GaugeMetricFamily("balancerpool_health_check_consecutive",
                                "Consecutive passes or failures of the member's health checks.",
                                labels=[*m, "result"])
    members = GaugeMetricFamily("balancerpool_pool_members", "Members of the pool.", labels=["pool"])
    now = forwarder.clock()
    wall = time.time()
    for name, pool in list(forwarder.pools.items()):
        members.add_metric([name], len(pool.state.members))
        for reason, count in pool.route_reasons.items():
            reasons.add_metric([name, str(reason)], count)
        results = pool.checker.results if pool.checker is not None else {}
        trackers = pool.checker.trackers if pool.checker is not None else {}
        for member in pool.state.members:
            labels = [name, member.name]
            usable.add_metric(labels, 1 if member.usable else 0)
            for letter, bit in FLAG_BITS.items():
                flag.add_metric([*labels, letter], 1 if member.flags & bit else 0)
            since.add_metric(labels, max(0.0, now - member.last_change.time))
            loadfactor.add_metric(labels, member.spec.loadfactor)
            lbset.add_metric(labels, member.lbset)
            busy.add_metric(labels, member.busy)
            elected.add_metric(labels, member.elected)
            errors.add_metric(labels, member.errors)
            error_retries.add_metric(labels, member.retries)
            sent.add_metric(labels, member.transferred)
            received.add_metric(labels, member.read)
            conns = pool.connections.get(member.name)
            if conns is not None:
                conn_open.add_metric(labels, conns.open)
                conn_idle.add_metric(labels, len(conns.idle))
                opened.add_metric(labels, conns.opened_total)
                flushes: Any = getattr(conns, "flushed_total", None)
                if isinstance(flushes, int):
                    flushed.add_metric(labels, flushes)
            websockets.add_metric(labels, len(pool.tunnels.get(member.name, ())))
            result = results.get(member.name)
            if result is not None:
                hc_up.add_metric(labels, 1 if result.ok else 0)
                hc_time.add_metric(labels, wall - (now - result.time))
            tracker = trackers.get(member.name)
            if tracker is not None:
                hc_runs.add_metric([*labels, "pass"], tracker.pass_run)
                hc_runs.add_metric([*labels, "fail"], tracker.fail_run)
    yield from (members, usable, flag, since, loadfactor, lbset, busy, elected, errors, error_retries,
                sent, received, conn_open, conn_idle, opened, flushed, websockets, reasons, hc_up,
                hc_time, hc_runs)
