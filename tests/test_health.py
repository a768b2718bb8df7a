"""Health: the pure judge and hysteresis, then active checks against real backend processes."""

from __future__ import annotations

import signal
import urllib.request
from typing import Any

import aiohttp
import pytest
import yaml

from balancerpool.proxy.health import HealthTracker, evaluate
from balancerpool.proxy.model import HealthExpect, parse_pools
from balancerpool.proxy.scheduling import bits_to_flags

from .conftest import Backend, Backends, get, pool_doc

EXPECT_READY = HealthExpect(status=((200, 299), (404, 404)), headers=(("X-Ready", "^yes$"),),
                            body="ready")


@pytest.mark.parametrize(("status", "headers", "body", "ok", "detail"), [
    (200, [("X-Ready", "yes")], b"all ready", True, "status 200"),
    (404, [("x-ready", "yes")], b"ready", True, "status 404"),
    (503, [("X-Ready", "yes")], b"ready", False, "status 503"),
    (302, [("X-Ready", "yes")], b"ready", False, "status 302"),
    (200, [], b"ready", False, "status 200, header X-Ready missing"),
    (200, [("X-Ready", "yes!")], b"ready", False, "status 200, header X-Ready does not match '^yes$'"),
    (200, [("X-Ready", "no"), ("X-Ready", "yes")], b"ready", True, "status 200"),
    (200, [("X-Ready", "yes")], b"starting", False, "status 200, body does not match 'ready'"),
    (200, [("X-Ready", "yes")], b"\xff\xfeready", True, "status 200"),
])
def test_evaluate(status: int, headers: list[tuple[str, str]], body: bytes, ok: bool, detail: str
                  ) -> None:
    assert evaluate(EXPECT_READY, status, headers, body) == (ok, detail)


def test_default_expectation_is_2xx_or_3xx() -> None:
    assert [evaluate(HealthExpect(), s, [], b"")[0] for s in (200, 204, 301, 399, 400, 500)] == [
        True, True, True, True, False, False]


def test_tracker_hysteresis() -> None:
    t = HealthTracker(passes=2, fails=3)
    # Up: two failures are not enough, a pass in between resets the run.
    assert [t.observe(False, down=False) for _ in range(2)] == [None, None]
    assert t.observe(True, down=False) is None
    assert [t.observe(False, down=False) for _ in range(3)] == [None, None, False]
    # Down: one pass is not enough, two are.
    assert t.observe(True, down=True) is None
    assert t.observe(False, down=True) is None
    assert [t.observe(True, down=True) for _ in range(2)] == [None, True]


def set_health(backend: Backend, **values: str) -> None:
    query = "&".join(f"{k}={v}" for k, v in values.items())
    with urllib.request.urlopen(f"{backend.url}/_set_health?{query}", timeout=5) as resp:
        assert resp.status == 200


async def checker_of(proxy: Any) -> Any:
    """The pool's checker with its background task stopped: the test drives the rounds."""
    checker = proxy.server.forwarder.pools["test"].checker
    await checker.stop()
    return checker


async def test_active_checks_take_a_member_out_and_back_with_thresholds(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
        healthCheck={"method": "GET", "uri": "/health", "interval": "1h", "timeout": "2s",
                     "passes": 2, "fails": 2,
                     "expect": {"status": "2xx", "headers": {"X-Ready": "^yes$"}, "body": "ready"}}))
    checker = await checker_of(proxy)
    # Traffic to b leaves idle pooled connections behind.
    assert sorted([(await get(client, proxy.url + "/"))[1] for _ in range(4)]) == ["a\n"] * 2 + ["b\n"] * 2
    assert len(proxy.connections("b").idle) == 1
    set_health(b, status="503")
    await checker.check_all()
    assert "C" not in bits_to_flags(proxy.member("b").flags)  # one failure of two
    proxy.clock.advance(5)
    await checker.check_all()
    member = proxy.member("b")
    assert bits_to_flags(member.flags) == "C"
    last = member.last_change
    assert (last.time, last.before, last.after, last.signal) == (proxy.clock(), "", "C", "health-check")
    assert last.detail == "GET /health: status 503 (2 consecutive failures)"
    assert len(proxy.connections("b").idle) == 0  # flushed at once
    assert {(await get(client, proxy.url + "/"))[1] for _ in range(4)} == {"a\n"}
    # Back: the body must say "ready" too, and two passes are needed.
    set_health(b, status="200", body="starting")
    await checker.check_all()
    assert checker.results["b"].detail == "status 200, body does not match 'ready'"
    set_health(b, body="ready")
    await checker.check_all()
    assert "C" in bits_to_flags(member.flags)
    await checker.check_all()
    assert bits_to_flags(member.flags) == ""
    assert member.last_change.detail == "GET /health: status 200 (2 consecutive passes)"
    assert "b\n" in {(await get(client, proxy.url + "/"))[1] for _ in range(4)}
    assert [t.signal for t in member.history] == ["config", "health-check", "health-check"]


async def test_tcp_check_notices_a_dead_backend_before_any_request(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
        healthCheck={"method": "TCP", "interval": "1h", "timeout": "1s"}))
    checker = await checker_of(proxy)
    await checker.check_all()
    assert checker.results["b"].ok and checker.results["b"].detail == "connected"
    b.kill(signal.SIGKILL)
    await checker.check_all()
    assert bits_to_flags(proxy.member("b").flags) == "C"
    assert "TCP connect: connect failed" in proxy.member("b").last_change.detail
    # No client request ever paid for the dead member.
    assert {(await get(client, proxy.url + "/"))[1] for _ in range(4)} == {"a\n"}
    assert proxy.member("b").errors == 0


async def test_health_state_survives_a_reload(backends: Backends, start_proxy: Any) -> None:
    a = backends.start("a")
    doc = pool_doc([{"url": a.url, "name": "a"}],
                   healthCheck={"method": "GET", "uri": "/health", "interval": "1h", "fails": 1})
    proxy = await start_proxy(doc)
    checker = await checker_of(proxy)
    set_health(a, status="500")
    await checker.check_all()
    assert bits_to_flags(proxy.member("a").flags) == "C"
    doc["spec"]["maxattempts"] = 3
    proxy.server.forwarder.apply(parse_pools(yaml.safe_dump(doc)))
    assert bits_to_flags(proxy.member("a").flags) == "C"
    assert proxy.member("a").last_change.signal == "health-check"
    await proxy.server.forwarder.pools["test"].checker.stop()


def test_outlier_detector_ejection_grows_and_is_capped() -> None:
    from balancerpool.proxy.health import OutlierDetector
    from balancerpool.proxy.model import OutlierDetectionSpec

    d = OutlierDetector(OutlierDetectionSpec(consecutive_5xx=3, consecutive_gateway_errors=2,
                                             base_ejection_time=10, max_ejection_time=25,
                                             max_ejection_percent=50))
    # A success in between resets the run.
    assert [d.observe("a", s, 0, 0, 4) for s in (500, 500, 200, 500, 500)] == [None] * 5
    assert d.observe("a", 500, 0, 0, 4) == (10, "3 consecutive 5xx responses")
    # Gateway errors (failed connects are None) count on their own, and faster.
    assert d.observe("b", None, 0, 0, 4) is None
    assert d.observe("b", 503, 0, 0, 4) == (10, "2 consecutive gateway errors")
    # Repeated ejection doubles, then hits the maximum.
    assert [d.observe("a", 500, 1, 0, 4) for _ in range(3)][-1] == (20, "3 consecutive 5xx responses")
    assert [d.observe("a", 500, 2, 0, 4) for _ in range(3)][-1] == (25, "3 consecutive 5xx responses")
    # Clean for longer than the maximum: back to the base time.
    assert [d.observe("a", 500, 100, 0, 4) for _ in range(3)][-1] == (10, "3 consecutive 5xx responses")
    # 50% of 4 members: with two already ejected, a third is not.
    assert [d.observe("c", None, 0, 2, 4) for _ in range(4)] == [None] * 4


async def test_outlier_ejection_end_to_end(backends: Backends, start_proxy: Any,
                                           client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
        outlierDetection={"consecutive5xx": 3, "consecutiveGatewayErrors": 0,
                          "baseEjectionTime": "30s", "maxEjectionPercent": 50}))
    # /status/500 answers 500 from whichever member gets it: each member sees 500s in turn.
    statuses = [(await get(client, proxy.url + "/status/500"))[0] for _ in range(6)]
    assert statuses == [500] * 6  # the response still reaches the client
    ejected = [n for n in "ab" if "E" in bits_to_flags(proxy.member(n).flags)]
    # Both reached three in a row, but at most 50% of two members may be out at once.
    assert len(ejected) == 1
    member = proxy.member(ejected[0])
    assert member.last_change.signal == "outlier"
    assert member.last_change.detail == "3 consecutive 5xx responses; ejected for 30s"
    other = "b" if ejected[0] == "a" else "a"
    assert {(await get(client, proxy.url + "/"))[1] for _ in range(4)} == {f"{other}\n"}
    proxy.clock.advance(30)
    assert f"{ejected[0]}\n" in {(await get(client, proxy.url + "/"))[1] for _ in range(4)}
