"""Sticky sessions end to end: real backend processes on 127.0.0.1, killed for real."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from balancerpool.proxy import accesslog
from balancerpool.proxy.model import parse_pools

from .conftest import Backends, get, pool_doc


def members(*backends: Any, **extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"url": b.url, "name": b.name, "route": b.name, **extra.get(b.name, {})} for b in backends]


def set_cookies(headers: Any) -> list[str]:
    return list(headers.getall("Set-Cookie", []))


async def test_stickiness_holds_across_1000_requests(backends: Backends, start_proxy: Any,
                                                     client: aiohttp.ClientSession) -> None:
    a, b, c = (backends.start(n) for n in "abc")
    proxy = await start_proxy(pool_doc(members(a, b, c), stickysession="JSESSIONID|jsessionid",
                                       scolonpathdelim=True))
    for _ in range(1000):
        status, text, _ = await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=s1.b"})
        assert (status, text) == (200, "b\n")
    # The ;jsessionid= path parameter, and the parameter winning over the cookie.
    assert (await get(client, proxy.url + "/cart;jsessionid=s2.c"))[1] == "c\n"
    assert (await get(client, proxy.url + "/?jsessionid=s3.a",
                      headers={"Cookie": "JSESSIONID=s3.b"}))[1] == "a\n"
    reasons = proxy.server.forwarder.pools["test"].route_reasons
    assert reasons["sticky"] == 1002
    # httpd's updatelbstatus: sticky traffic still counts in the rotation, so new sessions go to
    # the members that served less (b took 1000 sticky requests).
    fresh = [(await get(client, proxy.url + "/"))[1] for _ in range(6)]
    assert sorted(fresh) == ["a\n", "a\n", "a\n", "c\n", "c\n", "c\n"]


async def test_failover_when_the_sticky_backend_dies_issues_a_new_route(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        members(a, b), stickysession="ROUTEID", routeCookie={"name": "ROUTEID", "path": "/"},
        balancerVariables={"responseHeaders": True}))
    status, text, headers = await get(client, proxy.url + "/")
    first = text.strip()
    assert set_cookies(headers) == [f"ROUTEID=.{first}; Path=/; HttpOnly; SameSite=Lax"]
    assert headers["X-Balancer-Route-Changed"] == "1"
    cookie = {"Cookie": f"ROUTEID=.{first}"}
    status, text, headers = await get(client, proxy.url + "/", headers=cookie)
    assert text.strip() == first and set_cookies(headers) == []  # sticky: no new cookie
    assert "X-Balancer-Route-Changed" not in headers
    victim = a if first == "a" else b
    survivor = "b" if first == "a" else "a"
    victim.kill(signal.SIGKILL)
    status, text, headers = await get(client, proxy.url + "/", headers=cookie)
    assert (status, text.strip()) == (200, survivor)
    assert set_cookies(headers) == [f"ROUTEID=.{survivor}; Path=/; HttpOnly; SameSite=Lax"]
    assert headers["X-Balancer-Session-Route"] == first
    assert headers["X-Balancer-Worker-Route"] == survivor
    reasons = proxy.server.forwarder.pools["test"].route_reasons
    assert reasons["member-error"] == 1
    # The client follows the new cookie and stays on the survivor.
    status, text, headers = await get(client, proxy.url + "/",
                                      headers={"Cookie": f"ROUTEID=.{survivor}"})
    assert text.strip() == survivor and reasons["sticky"] == 2


async def test_nofailover_answers_503(backends: Backends, start_proxy: Any,
                                      client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(members(a, b), stickysession="JSESSIONID", nofailover=True))
    a.kill(signal.SIGKILL)
    status, text, _ = await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=x.a"})
    assert status == 503
    # The first try failed on connect; then a is in E and nofailover refuses to move the session.
    assert "nofailover is on" in text and "route 'a'" in text
    status, text, _ = await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=x.a"})
    assert status == 503 and "member-error" in text
    assert b.requests() == []
    # Without a session, or with a route no member has, requests are balanced as usual.
    assert (await get(client, proxy.url + "/"))[1] == "b\n"
    assert (await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=x.zz"}))[1] == "b\n"
    assert proxy.server.forwarder.pools["test"].route_reasons["nofailover"] == 2


async def test_draining_member_keeps_sessions_and_takes_no_new_ones(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(members(a, b, b={"status": "N"}), stickysession="JSESSIONID"))
    for _ in range(20):
        assert (await get(client, proxy.url + "/"))[1] == "a\n"
    for _ in range(5):
        assert (await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=s.b"}))[1] == "b\n"
    assert proxy.server.forwarder.pools["test"].route_reasons["member-draining"] == 5


async def test_redirect_moves_sessions_of_an_unusable_member(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b, c = (backends.start(n) for n in "abc")
    proxy = await start_proxy(pool_doc(
        members(a, b, c, a={"status": "D", "redirect": "c"}), stickysession="JSESSIONID",
        balancerVariables={"responseHeaders": True}))
    for _ in range(4):
        _, text, headers = await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=s.a"})
        assert text == "c\n"
        assert headers["X-Balancer-Route-Changed"] == "1"
    # Requests without a session are balanced as usual (httpd 2.4), not all sent to c; the four
    # redirected sessions counted against c in the rotation, so b catches up first.
    fresh = [(await get(client, proxy.url + "/"))[1].strip() for _ in range(8)]
    assert fresh == ["b", "b", "b", "b", "b", "c", "b", "c"]
    assert proxy.server.forwarder.pools["test"].route_reasons["member-disabled"] == 4


async def test_signed_session_cookie_idle_and_absolute_expiry(
        tmp_path: Path, backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    key = tmp_path / "session.key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    proxy = await start_proxy(pool_doc(members(a, b), sessionCookie={
        "name": "BPSESSION", "keyFile": str(key), "idleTimeout": "30s", "absoluteTimeout": "2m",
        "secure": True}))
    wall = [1_800_000_000.0]
    proxy.server.forwarder.wallclock = lambda: wall[0]
    pool = proxy.server.forwarder.pools["test"]

    async def visit(cookie: str | None) -> tuple[str, str]:
        headers = {"Cookie": f"BPSESSION={cookie}"} if cookie else {}
        status, text, resp_headers = await get(client, proxy.url + "/", headers=headers)
        assert status == 200
        (set_cookie,) = set_cookies(resp_headers)
        assert set_cookie.endswith("; Path=/; Secure; HttpOnly; SameSite=Lax")
        return text.strip(), set_cookie.split(";")[0].split("=", 1)[1]

    member, cookie = await visit(None)
    assert pool.route_reasons["new-session"] == 1
    # Sliding: each visit within 30 s keeps the member and re-issues the cookie.
    for _ in range(4):
        wall[0] += 25
        again, cookie = await visit(cookie)
        assert again == member
    assert pool.route_reasons["sticky"] == 4
    # 100 s after it was issued, still sliding; at 125 s the absolute timeout (2 min) ends it.
    wall[0] += 25
    _, cookie = await visit(cookie)
    assert pool.route_reasons["cookie-expired"] == 1
    # A fresh session: idle for 31 s ends it.
    wall[0] += 31
    _, cookie = await visit(cookie)
    assert pool.route_reasons["cookie-expired"] == 2
    # A tampered cookie is ignored (a new session), never an error.
    tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    await visit(tampered)
    assert pool.route_reasons["cookie-invalid"] == 1
    # The same key on another proxy (a second replica) accepts the cookie: no shared table.
    other = await start_proxy(pool_doc(members(a, b), sessionCookie={
        "name": "BPSESSION", "keyFile": str(key), "idleTimeout": "30s"}))
    other.server.forwarder.wallclock = lambda: wall[0]
    member, cookie = await visit(None)
    _, text, _ = await get(client, other.url + "/", headers={"Cookie": f"BPSESSION={cookie}"})
    assert text.strip() == member
    assert other.server.forwarder.pools["test"].route_reasons["sticky"] == 1


async def test_consistent_hashing_remaps_about_one_nth(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    group = [backends.start(f"m{i}") for i in range(5)]
    doc = pool_doc(members(*group), lbmethod="hash", hash={"on": "header", "name": "X-User"})
    proxy = await start_proxy(doc)

    async def placement() -> dict[str, str]:
        out = {}
        for user in range(200):
            status, text, _ = await get(client, proxy.url + "/", headers={"X-User": f"user{user}"})
            assert status == 200
            out[f"user{user}"] = text.strip()
        return out

    before = await placement()
    assert before == await placement()  # stable
    assert len(set(before.values())) == 5
    # One of five members leaves the configuration.
    doc["spec"]["members"] = doc["spec"]["members"][:4]
    proxy.server.forwarder.apply(parse_pools(yaml.safe_dump(doc)))
    after = await placement()
    moved = [u for u in before if before[u] != after[u]]
    assert all(before[u] == "m4" for u in moved)  # only the leaver's keys moved
    assert len(moved) <= 200 / 5 * 1.6
    # A member that dies (E) loses its keys the same way; the others keep theirs.
    group[0].kill(signal.SIGKILL)
    dead = await placement()
    assert all(dead[u] == after[u] for u in after if after[u] != "m0")


async def test_balancer_variables_to_backend_and_in_the_access_log(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc(
        members(a), stickysession="JSESSIONID", balancerVariables={"requestHeaders": True}))
    stream = io.StringIO()
    accesslog.configure(stream)
    try:
        _, text, _ = await get(client, proxy.url + "/headers",
                               headers={"Cookie": "JSESSIONID=abc.a",
                                        "X-Balancer-Worker-Name": "spoofed"})
    finally:
        accesslog.configure(None)
    seen = {k: v for k, v in json.loads(text)["headers"] if k.startswith("X-Balancer")}
    assert seen == {
        "X-Balancer-Session-Sticky": "JSESSIONID",
        "X-Balancer-Session-Route": "a",
        "X-Balancer-Name": "balancer://test",
        "X-Balancer-Worker-Name": "a",
        "X-Balancer-Worker-Route": "a",
    }
    line = stream.getvalue()
    assert '"GET /headers HTTP/1.1" 200' in line
    for field in ("pool=test", "member=a", "attempts=1", "route_reason=sticky",
                  "BALANCER_SESSION_STICKY=JSESSIONID", "BALANCER_SESSION_ROUTE=a",
                  "BALANCER_NAME=balancer://test", "BALANCER_WORKER_NAME=a", "BALANCER_WORKER_ROUTE=a"):
        assert field in line, field
    assert "BALANCER_ROUTE_CHANGED" not in line
