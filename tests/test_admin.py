"""The admin listener: balancer-manager API and page, its security rules, persistence, metrics."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from balancerpool.proxy import admin as admin_module
from balancerpool.proxy import metrics as metrics_module
from balancerpool.proxy.admin import AdminAuth, hash_password, start_admin, verify_password
from balancerpool.proxy.forward import Forwarder
from balancerpool.proxy.messages import EMPTY_BODY, RequestHead
from balancerpool.proxy.model import BalancerPool, parse_pools
from balancerpool.proxy.persist import FileStore, dump, to_document, write_atomically

from .conftest import Backends, get, metric_samples, pool_doc
from .test_proxy import names

TOKEN = "t0ken-for-the-admin-tests-0123456789"
USER, PASSWORD = "op", "correct horse battery staple"
EXAMPLES = Path(__file__).parent.parent / "examples"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Admin:
    url: str
    forwarder: Forwarder
    session: aiohttp.ClientSession
    runner: web.AppRunner

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def pools(self) -> dict[str, Any]:
        async with self.session.get(self.url + "/api/pools", headers=self.auth) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, Any] = await resp.json()
            return data

    async def pool(self, name: str = "test") -> dict[str, Any]:
        return next(p for p in (await self.pools())["pools"] if p["name"] == name)

    async def send(self, method: str, path: str, body: dict[str, Any], *, nonce: str | None = "auto",
                   csrf: str | None = "auto", origin: str | None = "own",
                   headers: dict[str, str] | None = None, drop_cookie: bool = False
                   ) -> tuple[int, Any]:
        """A change with everything right unless told otherwise."""
        state = await self.pools()
        if drop_cookie:
            self.session.cookie_jar.clear()
        payload = dict(body)
        if nonce == "auto":
            pool_name = path.split("/")[3]
            payload["nonce"] = next(p["nonce"] for p in state["pools"] if p["name"] == pool_name)
        elif nonce is not None:
            payload["nonce"] = nonce
        sent = {**self.auth}
        if csrf == "auto":
            sent[admin_module.CSRF_HEADER] = state["csrf"]
        elif csrf is not None:
            sent[admin_module.CSRF_HEADER] = csrf
        if origin == "own":
            sent["Origin"] = self.url
        elif origin is not None:
            sent["Origin"] = origin
        sent.update(headers or {})
        async with self.session.request(method, self.url + path, json=payload, headers=sent,
                                        allow_redirects=False) as resp:
            data = await resp.json() if resp.content_type == "application/json" else await resp.text()
            return resp.status, data

    def specs(self) -> list[BalancerPool]:
        return [p.spec for p in self.forwarder.pools.values()]


@pytest.fixture
async def start_admin_for() -> AsyncIterator[Callable[..., Any]]:
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(forwarder: Forwarder, **kw: Any) -> Admin:
        auth = AdminAuth({USER: hash_password(PASSWORD, iterations=1000)}, [TOKEN])
        runner, url = await start_admin(forwarder, "127.0.0.1", 0, auth=auth, **kw)
        runners.append(runner)
        # The cookie jar keeps the CSRF session cookie, as a browser does (127.0.0.1 is an IP).
        session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        sessions.append(session)
        return Admin(url, forwarder, session, runner)

    yield start
    for session in sessions:
        await session.close()
    for runner in runners:
        await runner.cleanup()


async def two_member_proxy(backends: Backends, start_proxy: Any, **spec: Any) -> Any:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc([
        {"url": a.url, "name": "a", "route": "ra"},
        {"url": b.url, "name": "b", "route": "rb"},
    ], **spec))
    return proxy, a, b


# --- the listener ------------------------------------------------------------------------------


async def test_health_ready_and_metrics_need_no_login(backends: Backends, start_proxy: Any,
                                                      start_admin_for: Any,
                                                      client: aiohttp.ClientSession) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    assert (await get(client, admin.url + "/healthz"))[:2] == (200, "ok\n")
    assert (await get(client, admin.url + "/readyz"))[:2] == (200, "ready\n")
    status, text, headers = await get(client, admin.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    # Not ready until a configuration is applied.
    waiting = await start_admin_for(Forwarder(proxy.server.forwarder.loop))
    status, text, _ = await get(client, waiting.url + "/readyz")
    assert status == 503 and "no configuration" in text
    assert admin.url != proxy.url  # never the data port


async def test_every_page_and_api_needs_authentication(backends: Backends, start_proxy: Any,
                                                       start_admin_for: Any,
                                                       client: aiohttp.ClientSession) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    for path in ("/balancer-manager", "/balancer-manager/test", "/api/pools", "/api/pools/test",
                 "/api/pools/test/members/a"):
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"},
                        {"Authorization": basic(USER, "wrong")},
                        {"Authorization": basic("nobody", PASSWORD)},
                        {"Authorization": basic("token", "wrong")}, {"Authorization": "Digest x"}):
            status, text, resp_headers = await get(client, admin.url + path, headers=headers)
            assert status == 401, (path, headers)
            assert resp_headers["WWW-Authenticate"].startswith('Basic realm="balancerpool manager"')
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": basic(USER, PASSWORD)},
                        {"Authorization": basic("token", TOKEN)}):
            status, text, _ = await get(client, admin.url + path, headers=headers)
            assert status == 200, (path, headers, text)


async def test_page_shows_every_member_with_its_state(backends: Backends, start_proxy: Any,
                                                      start_admin_for: Any,
                                                      client: aiohttp.ClientSession) -> None:
    proxy, a, b = await two_member_proxy(backends, start_proxy)
    await names(client, proxy.url + "/", 4)
    admin = await start_admin_for(proxy.server.forwarder)
    async with admin.session.get(admin.url + "/balancer-manager", headers=admin.auth) as resp:
        assert resp.status == 200
        html = await resp.text()
        assert resp.headers["Content-Security-Policy"].startswith("default-src 'none'")
        cookie = resp.cookies[admin_module.CSRF_COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict"
    assert "balancer://test" in html
    for name, backend in (("a", a), ("b", b)):
        assert f'data-member="{name}"' in html
        assert backend.url in html
    assert 'name="nonce"' in html and f'value="{cookie.value}"' in html  # the CSRF token echoed
    assert "<script" not in html and "http://" not in html.split("<style>")[1].split("</style>")[0]


async def test_api_lists_pools_members_and_counters(backends: Backends, start_proxy: Any,
                                                    start_admin_for: Any,
                                                    client: aiohttp.ClientSession) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    await names(client, proxy.url + "/", 4)
    admin = await start_admin_for(proxy.server.forwarder)
    data = await admin.pools()
    assert data["csrf"] and data["persist"] is False
    [pool] = data["pools"]
    assert pool["name"] == "test" and pool["lbmethod"] == "byrequests" and len(pool["nonce"]) >= 16
    members = {m["name"]: m for m in pool["members"]}
    assert members["a"]["elected"] == 2 and members["b"]["elected"] == 2
    assert members["a"]["route"] == "ra" and members["a"]["usable"] is True
    assert members["a"]["state"]["signal"] == "config"
    assert members["a"]["connections"]["idle"] >= 1
    assert pool["routeReasons"] == {"new-session": 4}


# --- changes that work -------------------------------------------------------------------------


async def test_disable_member_through_the_api_then_it_gets_nothing(
        backends: Backends, start_proxy: Any, start_admin_for: Any,
        client: aiohttp.ClientSession) -> None:
    proxy, _a, b = await two_member_proxy(backends, start_proxy)
    await names(client, proxy.url + "/", 4)
    admin = await start_admin_for(proxy.server.forwarder)
    before = await admin.pool()
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"status": "D"})
    assert status == 200, data
    member = data["pool"]["members"][1]
    assert member["flags"] == "D" and member["status"] == "D" and not member["usable"]
    assert member["state"]["signal"] == "manager" and "token" in member["state"]["detail"]
    assert member["elected"] == 2  # counters survive the change
    assert data["pool"]["nonce"] != before["nonce"]  # a new nonce for the next change
    served = len(b.requests())
    assert await names(client, proxy.url + "/", 6) == ["a"] * 6
    assert len(b.requests()) == served
    # And back: the flags are a full set, so an empty status clears D.
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"status": ""})
    assert status == 200, data
    assert sorted(set(await names(client, proxy.url + "/", 4))) == ["a", "b"]
    assert [t["signal"] for t in data["pool"]["members"][1]["history"]][-2:] == ["manager", "manager"]


async def test_edit_member_fields_pool_settings_and_add_member(
        backends: Backends, start_proxy: Any, start_admin_for: Any,
        client: aiohttp.ClientSession) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    status, data = await admin.send("PATCH", "/api/pools/test/members/a",
                                    {"loadfactor": 3, "lbset": 1, "route": "r1", "status": "+H"})
    assert status == 200, data
    spec = admin.specs()[0].members[0]
    assert (spec.loadfactor, spec.lbset, spec.route, spec.status) == (3.0, 1, "r1", frozenset("H"))
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"redirect": "r1"})
    assert status == 200, data
    assert admin.specs()[0].members[1].redirect == "r1"
    status, data = await admin.send("PATCH", "/api/pools/test", {
        "lbmethod": "bybusyness", "timeout": "2s", "maxattempts": 3,
        "stickysession": "JSESSIONID|jsessionid",
        "healthCheck": {"method": "GET", "uri": "/health", "interval": "10s", "timeout": "2s",
                        "passes": 2, "fails": 3}})
    assert status == 200, data
    pool = admin.specs()[0]
    assert pool.lbmethod.value == "bybusyness" and pool.timeout == 2.0 and pool.maxattempts == 3
    assert pool.stickysession is not None and pool.stickysession.cookie == "JSESSIONID"
    assert pool.health_check is not None and pool.health_check.uri == "/health"
    assert (pool.health_check.passes, pool.health_check.fails) == (2, 3)
    # A TCP check drops the HTTP-only fields by itself; "off" removes the check.
    status, data = await admin.send("PATCH", "/api/pools/test", {"healthCheck": {"method": "TCP"}})
    assert status == 200, data
    assert admin.specs()[0].health_check is not None
    status, data = await admin.send("PATCH", "/api/pools/test", {"healthCheck": None})
    assert status == 200 and admin.specs()[0].health_check is None
    c = backends.start("c")
    status, data = await admin.send("POST", "/api/pools/test/members",
                                    {"url": c.url, "name": "c", "route": "rc", "loadfactor": 2})
    assert status == 200, data
    added = data["pool"]["members"][2]
    assert added["name"] == "c" and added["state"]["signal"] == "manager"
    assert "c" in await names(client, proxy.url + "/", 6)


async def test_form_posts_redirect_back_to_the_page(backends: Backends, start_proxy: Any,
                                                    start_admin_for: Any) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    state = await admin.pools()
    form = aiohttp.FormData([("csrf", state["csrf"]), ("nonce", state["pools"][0]["nonce"]),
                             ("loadfactor", "2.5"), ("lbset", "0"), ("route", "ra"), ("redirect", ""),
                             ("status", ""), ("status", "N"), ("status", "I")])
    async with admin.session.post(admin.url + "/api/pools/test/members/a", data=form,
                                  headers={**admin.auth, "Origin": admin.url},
                                  allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert resp.headers["Location"].startswith("/balancer-manager?changed=")
    member = admin.specs()[0].members[0]
    assert member.loadfactor == 2.5 and member.status == frozenset("IN")
    # A refused form gets an HTML page with the reason.
    form = aiohttp.FormData([("csrf", state["csrf"]), ("nonce", "stale"), ("loadfactor", "3")])
    async with admin.session.post(admin.url + "/api/pools/test/members/a", data=form,
                                  headers={**admin.auth, "Origin": admin.url}) as resp:
        assert resp.status == 403
        assert "stale or wrong nonce" in await resp.text()
        assert resp.content_type == "text/html"


async def test_bad_edits_are_400_naming_the_field(backends: Backends, start_proxy: Any,
                                                  start_admin_for: Any) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    specs = admin.specs()
    cases: list[tuple[str, dict[str, Any], str, str]] = [
        ("/api/pools/test/members/a", {"loadfactor": 250}, "loadfactor", "1..100"),
        ("/api/pools/test/members/a", {"loadfactor": "heavy"}, "loadfactor", "number"),
        ("/api/pools/test/members/a", {"redirect": "nowhere"}, "redirect", "names no member"),
        ("/api/pools/test/members/a", {"route": "rb"}, "spec.members[1].route", "repeats"),
        ("/api/pools/test/members/a", {"status": "X"}, "status", "D N H S I R"),
        ("/api/pools/test/members/a", {"url": "http://127.0.0.1:1"}, "url", "not editable"),
        ("/api/pools/test", {"lbmethod": "fastest"}, "lbmethod", "must be one of"),
        ("/api/pools/test", {"maxattempts": -1}, "maxattempts", "0..100"),
        ("/api/pools/test", {"healthCheck": {"method": "GET", "interval": "10ms"}},
         "healthCheck.interval", "at least 100ms"),
        ("/api/pools/test/members", {"url": "ftp://x", "name": "x"}, "url", "http://"),
        ("/api/pools/test/members", {"url": "http://127.0.0.1:9", "name": "a"}, "name", "repeats"),
    ]
    for path, body, field, words in cases:
        status, data = await admin.send("PATCH" if "members/" in path or path.endswith("test")
                                        else "POST", path, body)
        assert status == 400, (body, data)
        assert any(e["field"] == field and words in e["reason"] for e in data["errors"]), (body, data)
    assert admin.specs() == specs


# --- changes that are refused ------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no-nonce", "stale-nonce", "foreign-origin", "no-origin",
                                  "null-origin", "foreign-referer", "unauthenticated", "no-csrf",
                                  "wrong-csrf", "no-session-cookie", "other-login"])
async def test_refused_changes_change_nothing(case: str, backends: Backends, start_proxy: Any,
                                              start_admin_for: Any,
                                              client: aiohttp.ClientSession) -> None:
    proxy, _, _b = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    kw: dict[str, Any] = {}
    expected, words = 403, ""
    if case == "no-nonce":
        kw["nonce"], words = None, "no nonce"
    elif case == "stale-nonce":
        old = (await admin.pool())["nonce"]
        assert (await admin.send("PATCH", "/api/pools/test/members/a", {"loadfactor": 2}))[0] == 200
        kw["nonce"], words = old, "stale"
    elif case == "foreign-origin":
        kw["origin"], words = "http://evil.example", "foreign Origin"
    elif case == "no-origin":
        kw["origin"], words = None, "neither Origin nor Referer"
    elif case == "null-origin":
        kw["origin"], words = "null", "'null'"
    elif case == "foreign-referer":
        kw["origin"] = None
        kw["headers"], words = {"Referer": "http://127.0.0.2:1/balancer-manager"}, "foreign Referer"
    elif case == "unauthenticated":
        kw["headers"], expected, words = {"Authorization": ""}, 401, "authentication required"
    elif case == "no-csrf":
        kw["csrf"], words = None, "no CSRF token"
    elif case == "wrong-csrf":
        kw["csrf"], words = "guessed", "does not match"
    elif case == "no-session-cookie":
        kw["drop_cookie"], words = True, "no CSRF session cookie"
    elif case == "other-login":
        # A session made by one login is no good for another.
        other = {"Authorization": basic(USER, PASSWORD)}
        kw["headers"], words = other, "another login"
    specs = admin.specs()
    flags = proxy.member("b").flags
    history = len(proxy.member("b").history)
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"status": "D"}, **kw)
    assert status == expected, data
    assert words in data["error"], data
    assert admin.specs() == specs
    assert proxy.member("b").flags == flags and len(proxy.member("b").history) == history
    assert "b" in await names(client, proxy.url + "/", 4)


async def test_referer_stands_in_for_a_missing_origin(backends: Backends, start_proxy: Any,
                                                      start_admin_for: Any) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"status": "N"},
                                    origin=None,
                                    headers={"Referer": admin.url + "/balancer-manager"})
    assert status == 200, data


async def test_no_change_is_possible_with_get(backends: Backends, start_proxy: Any,
                                              start_admin_for: Any) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder)
    nonce = (await admin.pool())["nonce"]
    specs = admin.specs()
    # httpd's own GET form of a change, and the API URLs with the fields as a query.
    for path in (f"/balancer-manager?b=test&w=b&w_status_D=1&nonce={nonce}",
                 f"/api/pools/test/members/b?status=D&nonce={nonce}",
                 f"/api/pools/test?lbmethod=random&nonce={nonce}"):
        async with admin.session.get(admin.url + path, headers={**admin.auth, "Origin": admin.url}
                                     ) as resp:
            assert resp.status in (200, 403), path
            if resp.status == 403:
                assert "never made with GET" in (await resp.json())["error"]
    assert admin.specs() == specs
    assert proxy.member("b").flags == 0
    for method in ("PUT", "DELETE"):
        async with admin.session.request(method, admin.url + "/api/pools/test/members/b",
                                         headers=admin.auth) as resp:
            assert resp.status == 405


# --- persistence -------------------------------------------------------------------------------


async def test_changes_are_written_back_atomically(backends: Backends, start_proxy: Any,
                                                   start_admin_for: Any, tmp_path: Path) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    path = tmp_path / "pool.yaml"
    path.write_text(dump([p.spec for p in proxy.server.forwarder.pools.values()]))
    path.chmod(0o640)
    admin = await start_admin_for(proxy.server.forwarder, store=FileStore(path))
    status, data = await admin.send("PATCH", "/api/pools/test/members/b",
                                    {"status": "D", "loadfactor": 4})
    assert status == 200 and data["persisted"] is True
    written = parse_pools(path.read_text())
    assert written == admin.specs()
    assert written[0].members[1].status == frozenset("D") and written[0].members[1].loadfactor == 4
    assert path.read_text().startswith("# Written by the balancerpool manager")
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in list(tmp_path.iterdir())) == ["pool.yaml"]  # noqa: ASYNC240


class _BrokenStore:
    async def write(self, pools: list[BalancerPool]) -> None:
        raise OSError("disk full")


async def test_a_change_that_cannot_be_persisted_is_not_applied(
        backends: Backends, start_proxy: Any, start_admin_for: Any) -> None:
    proxy, _, _ = await two_member_proxy(backends, start_proxy)
    admin = await start_admin_for(proxy.server.forwarder, store=_BrokenStore())
    specs = admin.specs()
    nonce = (await admin.pool())["nonce"]
    status, data = await admin.send("PATCH", "/api/pools/test/members/b", {"status": "D"})
    assert status == 500 and "disk full" in data["error"]
    assert admin.specs() == specs and proxy.member("b").flags == 0
    assert (await admin.pool())["nonce"] == nonce


RICH = """\
apiVersion: balancerpool.io/v1alpha1
kind: BalancerPool
metadata: {name: shop, namespace: web}
spec:
  listen: "[::1]:8080"
  routes:
  - {path: /shop, backendPath: /app, reverse: false, preserveHost: true, hosts: [b.example, a.example]}
  - {path: /api}
  lbmethod: hash
  hash: {"on": header, name: X-User, algorithm: maglev}
  maxattempts: 3
  nofailover: true
  forcerecovery: false
  timeout: 1.5s
  failonstatus: [503, 502]
  failontimeout: true
  stickysession: "|jsessionid"
  stickysessionsep: "off"
  scolonpathdelim: true
  balancerVariables: {requestHeaders: true}
  healthCheck:
    method: GET
    uri: /health?deep=1
    interval: 250ms
    timeout: 0.1s
    passes: 2
    fails: 3
    expect: {status: [2xx, 304, 400-404], headers: {X-Ok: "^yes$"}, body: "up"}
  outlierDetection: {consecutive5xx: 0, baseEjectionTime: 1m, maxEjectionTime: 1h30m}
  removalGrace: 0.001s
  retryNonIdempotent: always
  retryBufferSize: 1MiB
  retryBudget: {percent: 50, minRetries: 0, window: 2s}
  websockets: {closeGrace: 0, closeRate: 2.5}
  memberDefaults: {retry: 5s, timeout: 7s}
  members:
  - url: http://10.0.0.1:8080/base
    route: a
    loadfactor: 2.25
    lbset: 3
    status: +H-H+I
    connectiontimeout: 300ms
    slowstart: 30s
    pool: {min: 1, max: 10, smax: 5, ttl: 1m, acquire: 2s, keepalive: true}
  - {url: "http://[fd00::1]", name: v6, route: b, redirect: a, status: DN, pool: {disablereuse: true}}
---
apiVersion: balancerpool.io/v1alpha1
kind: BalancerPool
metadata: {name: cookies}
spec:
  routes: [{path: /c}]
  stickysession: ROUTEID
  routeCookie: {name: ROUTEID, path: /c, domain: .example.com, httpOnly: false, secure: true,
                sameSite: None, maxAge: 1h}
  members: [{url: "http://127.0.0.1:1", route: x}]
---
apiVersion: balancerpool.io/v1alpha1
kind: BalancerPool
metadata: {name: signed}
spec:
  routes: [{path: /s}]
  sessionCookie: {keyFile: /etc/key, idleTimeout: 10m, absoluteTimeout: 8h, sameSite: "off"}
  healthCheck: {method: TCP, interval: 1s, timeout: 1s}
  members: []
"""


def test_dump_is_the_inverse_of_the_parser() -> None:
    for text in (RICH, (EXAMPLES / "demo-pool.yaml").read_text()):
        pools = parse_pools(text)
        again = dump(pools)
        assert parse_pools(again) == pools
        assert dump(parse_pools(again)) == again  # stable
    doc = to_document(parse_pools(RICH)[0])
    assert doc["spec"]["members"][0]["status"] == "I"
    assert doc["spec"]["timeout"] == "1.5s" and doc["spec"]["listen"] == "[::1]:8080"


def test_write_atomically_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "pools.yaml"
    write_atomically(path, "one\n")
    write_atomically(path, "two\n")
    assert path.read_text() == "two\n"
    assert [p.name for p in tmp_path.iterdir()] == ["pools.yaml"]


# --- authentication set-up ---------------------------------------------------------------------


def test_password_hashes_and_files(tmp_path: Path) -> None:
    encoded = hash_password("s3cret", iterations=1000, salt="abc")
    assert encoded.startswith("pbkdf2_sha256$1000$abc$")
    assert verify_password("s3cret", encoded) and not verify_password("s3cre", encoded)
    assert not verify_password("s3cret", "pbkdf2_sha256$x$y$z") and not verify_password("x", "plain")
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(f"# operators\n\nop:{encoded}\n")
    tokens = tmp_path / "token"
    tokens.write_text(TOKEN + "\n")
    auth = AdminAuth.from_files(tokens, htpasswd)
    assert auth.users == {"op": encoded}
    for content, words in ((f"op:{encoded}\nop:{encoded}\n", "repeats"), ("op\n", "want user:hash"),
                           ("op:$apr1$xyz$abc\n", "unsupported hash format"),
                           ("op:pbkdf2_sha256$1000$$abc\n", "malformed")):
        htpasswd.write_text(content)
        with pytest.raises(ValueError, match=words):
            AdminAuth.from_files(htpasswd_file=htpasswd)
    tokens.write_text("short\n")
    with pytest.raises(ValueError, match="at least 16"):
        AdminAuth.from_files(token_file=tokens)
    with pytest.raises(ValueError, match="token file or a password file"):
        AdminAuth.from_files()


async def test_identify_caches_a_verified_login() -> None:
    auth = AdminAuth({USER: hash_password(PASSWORD, iterations=200_000)})
    started = time.perf_counter()
    assert await auth.identify(basic(USER, PASSWORD)) == f"user:{USER}"
    first = time.perf_counter() - started
    started = time.perf_counter()
    assert await auth.identify(basic(USER, PASSWORD)) == f"user:{USER}"
    assert time.perf_counter() - started < first / 2
    assert await auth.identify(basic(USER, "nope")) is None
    assert await auth.identify("Basic !!!") is None


def test_hash_password_command(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
                               ) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("hunter2hunter2\n"))
    assert admin_module.main(["hash-password", "--user", "ops", "--iterations", "1000"]) == 0
    line = capsys.readouterr().out.strip()
    user, _, encoded = line.partition(":")
    assert user == "ops" and verify_password("hunter2hunter2", encoded)


# --- metrics -----------------------------------------------------------------------------------


async def _request(handle: Any, path: str = "/") -> int:
    head = RequestHead("GET", path, "", (1, 1), [("Host", "x")], "x", "127.0.0.1")
    response = await handle(head, EMPTY_BODY)
    async for _ in response.chunks():
        pass
    response.finish(True)
    status: int = response.status
    return status


async def test_metrics_parse_and_count_what_happened(backends: Backends, start_proxy: Any,
                                                     start_admin_for: Any,
                                                     client: aiohttp.ClientSession) -> None:
    proxy, _a, b = await two_member_proxy(backends, start_proxy)
    forwarder = proxy.server.forwarder
    admin = await start_admin_for(forwarder)
    handle = metrics_module.enable(forwarder).instrument(forwarder.handle)
    assert [await _request(handle) for _ in range(4)] == [200] * 4
    b.kill()
    # b's connection is refused: the request fails over to a (one retry, one failover).
    statuses = [await _request(handle) for _ in range(4)]
    assert statuses == [200] * 4
    await names(client, proxy.url + "/", 2)  # not instrumented: only the live state counts it
    status, text, _ = await get(client, admin.url + "/metrics")
    assert status == 200
    s = metric_samples(text)

    def v(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted(labels.items())))]

    assert v("balancerpool_requests_total", pool="test", member="a", code="2xx") == 6
    assert v("balancerpool_requests_total", pool="test", member="b", code="2xx") == 2
    assert v("balancerpool_request_duration_seconds_count", pool="test", member="a") == 6
    assert v("balancerpool_retries_total", pool="test") == 1
    assert v("balancerpool_failovers_total", pool="test") == 1
    assert v("balancerpool_member_elected_total", pool="test", member="a") == 8
    assert v("balancerpool_member_errors_total", pool="test", member="b") == 1
    assert v("balancerpool_member_usable", pool="test", member="b") == 0
    assert v("balancerpool_member_status", pool="test", member="b", flag="E") == 1
    assert v("balancerpool_member_status", pool="test", member="a", flag="E") == 0
    assert v("balancerpool_route_decisions_total", pool="test", reason="new-session") == 10
    assert v("balancerpool_upstream_connections_idle", pool="test", member="a") >= 1
    assert v("balancerpool_upstream_connections_open", pool="test", member="b") == 0
    assert v("balancerpool_member_busy", pool="test", member="a") == 0
    assert v("balancerpool_member_websockets", pool="test", member="a") == 0
    assert v("balancerpool_member_sent_bytes_total", pool="test", member="a") > 0
    assert v("balancerpool_pool_members", pool="test") == 2
    # A manager change is counted too.
    assert (await admin.send("PATCH", "/api/pools/test/members/a", {"loadfactor": 2}))[0] == 200
    s = metric_samples((await get(client, admin.url + "/metrics"))[1])
    assert v("balancerpool_manager_changes_total", pool="test", kind="member") == 1
    assert v("balancerpool_member_loadfactor", pool="test", member="a") == 2


async def test_health_check_results_are_metrics(backends: Backends, start_proxy: Any,
                                                start_admin_for: Any,
                                                client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                                       healthCheck={"method": "GET", "uri": "/", "interval": "1h"}))
    b.kill()
    checker = proxy.server.forwarder.pools["test"].checker
    assert checker is not None and checker.task is not None
    # Only this round: the scheduled first one (0-1 s after the start) would count a 2nd failure.
    checker.task.cancel()
    await checker.check_all()
    admin = await start_admin_for(proxy.server.forwarder)
    s = metric_samples((await get(client, admin.url + "/metrics"))[1])
    assert s[("balancerpool_health_check_up", (("member", "a"), ("pool", "test")))] == 1
    assert s[("balancerpool_health_check_up", (("member", "b"), ("pool", "test")))] == 0
    assert s[("balancerpool_member_status", (("flag", "C"), ("member", "b"), ("pool", "test")))] == 1
    assert s[("balancerpool_health_check_consecutive",
              (("member", "b"), ("pool", "test"), ("result", "fail")))] == 1
    stamp = s[("balancerpool_health_check_last_timestamp_seconds", (("member", "a"), ("pool", "test")))]
    assert abs(stamp - time.time()) < 60
    pool = (await admin.pool())["members"]
    assert pool[1]["healthCheck"]["ok"] is False and "connect failed" in pool[1]["healthCheck"]["detail"]
    html = (await get(client, admin.url + "/balancer-manager", headers=admin.auth))[1]
    assert "failed" in html


def test_metrics_observe_counts_local_answers_and_incomplete_bodies() -> None:
    import asyncio

    loop = asyncio.new_event_loop()
    try:
        m = metrics_module.ProxyMetrics(Forwarder(loop))
        m.observe(404, time.monotonic(), {"reason": "no-route"}, True)
        m.observe(503, time.monotonic(), {"pool": "p", "reason": "no-member", "attempts": 2}, True)
        m.observe(200, time.monotonic(), {"pool": "p", "member": "x", "attempts": 1,
                                          "route_reason": "sticky"}, False)
        s = metric_samples(m.render().decode())
    finally:
        loop.close()
    assert s[("balancerpool_requests_total", (("code", "4xx"), ("member", ""), ("pool", "")))] == 1
    assert s[("balancerpool_requests_total", (("code", "5xx"), ("member", ""), ("pool", "p")))] == 1
    assert s[("balancerpool_retries_total", (("pool", "p"),))] == 1
    assert ("balancerpool_failovers_total", (("pool", "p"),)) not in s
    assert s[("balancerpool_responses_incomplete_total", (("member", "x"), ("pool", "p")))] == 1


def test_metrics_latency_histogram_matches_prometheus_client() -> None:
    """The per-request counters are plain numbers turned into families at scrape time: their
    exposition must be what prometheus_client's own Histogram and Counter give for the same
    observations (the oracle), across buckets, +Inf, _count and _sum."""
    import asyncio

    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    durations = [0.0004, 0.0017, 0.0017, 0.004, 0.03, 0.7, 3.0, 45.0, 75.0]
    statuses = [200, 201, 302, 404, 500, 503, 101, 200, 200]
    registry = CollectorRegistry()
    oracle = Histogram("balancerpool_request_duration_seconds", "d", ["pool", "member"],
                       buckets=metrics_module.LATENCY_BUCKETS, registry=registry)
    codes = Counter("balancerpool_requests", "r", ["pool", "member", "code"], registry=registry)
    loop = asyncio.new_event_loop()
    try:
        m = metrics_module.ProxyMetrics(Forwarder(loop))
        for seconds, status in zip(durations, statuses, strict=True):
            # observe() measures from ``started``: microseconds pass, far from any bucket bound.
            m.observe(status, time.monotonic() - seconds, {"pool": "p", "member": "a"}, True)
            oracle.labels("p", "a").observe(seconds)
            codes.labels("p", "a", f"{status // 100}xx").inc()
        ours = metric_samples(m.render().decode())
    finally:
        loop.close()
    expected = metric_samples(generate_latest(registry).decode())
    compared = 0
    for key, value in expected.items():
        if key[0].endswith("_created"):
            continue
        if key[0].endswith("_sum"):
            assert ours[key] == pytest.approx(value, abs=0.01)
        else:
            assert ours[key] == value, key
        compared += 1
    assert compared == len(metrics_module.LATENCY_BUCKETS) + 1 + 2 + 5  # buckets, +Inf, count, sum, codes
    assert ours[("balancerpool_request_duration_seconds_bucket",
                 (("le", "0.0025"), ("member", "a"), ("pool", "p")))] == 3


def test_yaml_is_safe_for_names() -> None:
    # Member names and routes that YAML would read as other types survive the round trip.
    text = yaml.safe_dump(pool_doc([{"url": "http://127.0.0.1:1", "name": "yes", "route": "123"},
                                    {"url": "http://127.0.0.1:2", "name": "null", "route": "1.5"}]))
    pools = parse_pools(text)
    assert parse_pools(dump(pools)) == pools
