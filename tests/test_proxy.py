"""End to end: a real proxy on 127.0.0.1 in front of real backend processes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
from typing import Any

import aiohttp
import pytest

from .conftest import Backends, free_port, get, pool_doc, wait_for


async def names(client: aiohttp.ClientSession, url: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        status, text, _ = await get(client, url)
        assert status == 200, text
        out.append(text.strip())
    return out


async def test_weighted_sequence_matches_httpd(backends: Backends, start_proxy: Any,
                                               client: aiohttp.ClientSession) -> None:
    a, b, c = (backends.start(n) for n in "abc")
    proxy = await start_proxy(pool_doc([
        {"url": a.url, "name": "a", "loadfactor": 1},
        {"url": b.url, "name": "b", "loadfactor": 2},
        {"url": c.url, "name": "c", "loadfactor": 3},
    ]))
    # httpd byrequests: every usable member gains its lbfactor, the highest wins and pays the total.
    expected = ["c", "b", "a", "c", "b", "c"] * 3
    assert await names(client, proxy.url + "/", 18) == expected
    assert [proxy.member(n).elected for n in "abc"] == [3, 6, 9]


async def test_lbset_disabled_stopped_standby_and_spare(backends: Backends, start_proxy: Any,
                                                        client: aiohttp.ClientSession) -> None:
    one, dis, stop, spare, tier1, standby = (
        backends.start(n) for n in ("one", "dis", "stop", "spare", "tier1", "standby"))
    proxy = await start_proxy(pool_doc([
        {"url": one.url, "name": "one"},
        {"url": dis.url, "name": "dis", "status": "D"},
        {"url": stop.url, "name": "stop", "status": "S"},
        {"url": spare.url, "name": "spare", "status": "R"},
        {"url": tier1.url, "name": "tier1", "lbset": 1},
        {"url": standby.url, "name": "standby", "status": "H"},
    ], maxattempts=5))
    # D and S count as unusable members of set 0, so the spare stands in beside `one`.
    assert sorted(set(await names(client, proxy.url + "/", 6))) == ["one", "spare"]
    one.kill()
    spare.kill()
    # Set 0 has nothing usable left: set 1 takes over, never D, S or the standby.
    assert set(await names(client, proxy.url + "/", 4)) == {"tier1"}
    tier1.kill()
    # No usable member in any set: the hot standby is the last resort.
    assert set(await names(client, proxy.url + "/", 3)) == {"standby"}
    for backend in (dis, stop):
        assert backend.requests() == []


async def test_failover_when_backend_killed_and_retry_expiry(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc([
        {"url": a.url, "name": "a", "retry": "30s"},
        {"url": b.url, "name": "b", "retry": "30s"},
    ]))
    assert sorted(await names(client, proxy.url + "/", 4)) == ["a", "a", "b", "b"]
    a.kill(signal.SIGKILL)
    # Every request still succeeds: the connect error moves it to b and puts a in E.
    assert await names(client, proxy.url + "/", 6) == ["b"] * 6
    member = proxy.member("a")
    assert "E" in _flags(member)
    assert member.errors == 1  # one failed connect, then a was skipped while in E
    a.start()
    proxy.clock.advance(29)
    assert await names(client, proxy.url + "/", 3) == ["b"] * 3
    proxy.clock.advance(1)  # retry has passed: a is tried again and works
    assert "a" in await names(client, proxy.url + "/", 4)
    assert "E" not in _flags(member) and member.retries == 1


def _flags(member: Any) -> str:
    from balancerpool.proxy.scheduling import bits_to_flags

    return bits_to_flags(member.flags)


async def test_503_when_no_member_is_usable(backends: Backends, start_proxy: Any,
                                            client: aiohttp.ClientSession) -> None:
    dead1, dead2 = free_port(), free_port()
    proxy = await start_proxy(pool_doc([
        {"url": f"http://127.0.0.1:{dead1}", "name": "x"},
        {"url": f"http://127.0.0.1:{dead2}", "name": "y"},
    ], forcerecovery=False))
    status, text, headers = await get(client, proxy.url + "/")
    assert status == 503
    assert "pool 'test' has no usable member" in text
    assert f"x: connect to 127.0.0.1:{dead1} failed" in text
    assert f"y: connect to 127.0.0.1:{dead2} failed" in text
    assert headers["Retry-After"] == "1"
    status, text, _ = await get(client, proxy.url + "/")
    assert status == 503 and "connect" not in text  # both in E now: not even tried


async def test_forcerecovery_tries_again_when_all_in_error(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    port = free_port()
    proxy = await start_proxy(pool_doc([{"url": f"http://127.0.0.1:{port}", "name": "only"}]))
    assert (await get(client, proxy.url + "/"))[0] == 503
    backends.start("only", port=port)
    # Still in E with 60 s retry, but every member is in error: forcerecovery clears it.
    status, text, _ = await get(client, proxy.url + "/")
    assert (status, text) == (200, "only\n")


async def test_maxattempts_limits_failover(backends: Backends, start_proxy: Any,
                                           client: aiohttp.ClientSession) -> None:
    ports = [free_port() for _ in range(3)]
    live = backends.start("live")
    proxy = await start_proxy(pool_doc(
        [{"url": f"http://127.0.0.1:{p}", "name": f"dead{i}"} for i, p in enumerate(ports)]
        + [{"url": live.url, "name": "live", "lbset": 1}], maxattempts=1))
    status, text, _ = await get(client, proxy.url + "/")
    assert status == 503 and text.count("connect to") == 2  # 1 try + 1 failover attempt
    # dead2 fails next; with set 0 all in E the failover attempt reaches set 1.
    assert await names(client, proxy.url + "/", 1) == ["live"]
    assert all("E" in _flags(proxy.member(f"dead{i}")) for i in range(3))


async def test_hop_by_hop_headers_removed_and_forwarding_headers_added(
        backends: Backends, start_proxy: Any) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}]))
    host, port = proxy.server.addresses[0]
    request = (
        "GET /headers HTTP/1.1\r\nHost: front.example:8443\r\n"
        "Connection: keep-alive, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n"
        "TE: trailers\r\nProxy-Authorization: Basic eDp5\r\nProxy-Connection: keep-alive\r\n"
        "X-Forwarded-For: 203.0.113.9\r\nX-Custom: kept\r\n\r\n")
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request.encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = int(next(line.split(":")[1] for line in head.split("\r\n")
                      if line.lower().startswith("content-length")))
    body = json.loads(await reader.readexactly(length))
    writer.close()
    got = {k.lower(): v for k, v in body["headers"]}
    for hop in ("x-hop", "keep-alive", "te", "proxy-authorization", "proxy-connection"):
        assert hop not in got
    assert got.get("connection", "keep-alive").lower() == "keep-alive"
    assert got["x-custom"] == "kept"
    assert got["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert got["x-forwarded-host"] == "front.example:8443"
    assert got["x-forwarded-proto"] == "http"
    assert got["host"] == f"127.0.0.1:{a.port}"
    lower_head = head.lower()
    assert "x-resp-hop" not in lower_head and "keep-alive: timeout=30" not in lower_head
    assert "x-end-to-end: kept" in lower_head


async def test_preserve_host_and_path_mapping(backends: Backends, start_proxy: Any,
                                              client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}],
        routes=[{"path": "/front", "backendPath": "/app", "preserveHost": True},
                {"path": "/other"}]))
    _, text, _ = await get(client, proxy.url + "/front/headers?x=1",
                                headers={"Host": "shop.example"})
    body = json.loads(text)
    assert body["path"] == "/app/headers?x=1"
    assert dict(body["headers"])["Host"] == "shop.example"
    assert (await get(client, proxy.url + "/frontier"))[0] == 404
    assert (await get(client, proxy.url + "/nothing"))[0] == 404
    assert a.requests()[-1]["path"] == "/app/headers?x=1"


async def test_reverse_rewriting_of_location(backends: Backends, start_proxy: Any,
                                             client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}],
                                       routes=[{"path": "/front", "backendPath": "/app"}]))
    status, _, headers = await get(client, proxy.url + "/front/redirect?to=/app/next")
    assert status == 302
    assert headers["Location"] == proxy.url + "/front/next"
    assert headers["Content-Location"] == proxy.url + "/front/here"
    _, _, headers = await get(client, proxy.url + "/front/redirect?to=/app/next&relative=1")
    assert headers["Location"] == "/front/next"
    _, _, headers = await get(client, proxy.url + "/front/redirect?to=/elsewhere&relative=1")
    assert headers["Location"] == "/elsewhere"


async def test_streams_50_mib_both_ways(backends: Backends, start_proxy: Any,
                                        client: aiohttp.ClientSession) -> None:
    """50 MiB up and down, chunked and with Content-Length, never held whole by the proxy."""
    import tracemalloc

    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}]))
    size = 50 * 1024 * 1024
    block = bytes(range(256)) * 4096  # 1 MiB
    tracemalloc.start()
    try:
        async def chunks() -> Any:
            for _ in range(50):
                yield block

        hasher = hashlib.sha256()
        for _ in range(50):
            hasher.update(block)
        digest = hasher.hexdigest()
        # Chunked upload (an async generator body is sent chunked).
        async with client.post(proxy.url + "/upload", data=chunks()) as resp:
            result = await resp.json()
        assert result == {"name": "a", "size": size, "sha256": digest, "chunked": "chunked"}
        # Content-Length upload, streamed from a generator with a known length.
        payload = aiohttp.AsyncIterablePayload(chunks())
        async with client.post(proxy.url + "/upload", data=payload,
                               headers={"Content-Length": str(size)}) as resp:
            result = await resp.json()
        assert result["size"] == size and result["chunked"] == ""
        # Downloads, with Content-Length and chunked.
        for chunked in ("0", "1"):
            async with client.get(proxy.url + f"/big?size={size}&chunked={chunked}") as resp:
                assert resp.status == 200
                assert (resp.headers.get("Content-Length") == str(size)) == (chunked == "0")
                got = 0
                async for piece in resp.content.iter_any():
                    got += len(piece)
            assert got == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Proxy and client share this process: the client's 1 MiB blocks plus the proxy's bounded
    # buffers. Holding one 50 MiB body would show up as a peak above 50 MiB.
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


async def test_connection_pool_max_and_acquire(backends: Backends, start_proxy: Any,
                                               client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a", "pool": {"max": 1, "acquire": "200ms"}}], maxattempts=0))
    slow = asyncio.create_task(get(client, proxy.url + "/slow?s=1"))
    await wait_for(lambda: proxy.connections("a").busy == 1)  # it holds the only connection
    status, text, _ = await get(client, proxy.url + "/")
    assert status == 503 and "no connection to a came free within 0.2s (max 1)" in text
    assert (await slow)[0] == 200
    # The connection came back to the pool and serves the next request.
    assert (await get(client, proxy.url + "/"))[0] == 200
    assert proxy.connections("a").open == 1


async def test_connection_reuse_min_and_disablereuse(backends: Backends, start_proxy: Any,
                                                     client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a", "pool": {"min": 2, "keepalive": True}},
         {"url": b.url, "name": "b", "pool": {"disablereuse": True}}],
        routes=[{"path": "/"}]))
    # The proxy's upkeep task pre-opens `min` connections on its own.
    await wait_for(lambda: len(proxy.connections("a").idle) == 2)
    conn = proxy.connections("a").idle[0]
    sock = conn.transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    await names(client, proxy.url + "/", 10)
    peers_a = {r["peer"] for r in a.requests()}
    peers_b = {r["peer"] for r in b.requests()}
    assert len(peers_a) <= 2  # pooled connections reused
    assert len(peers_b) == 5  # a new connection for every request
    assert proxy.connections("b").open == 0


async def test_ttl_retires_idle_connections_above_smax(backends: Backends, start_proxy: Any,
                                                       client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a", "pool": {"smax": 1, "ttl": "10s"}}]))
    await asyncio.gather(*(get(client, proxy.url + "/slow?s=0.3") for _ in range(3)))
    pool = proxy.connections("a")
    assert pool.open == 3 and len(pool.idle) == 3
    await pool.maintain(proxy.clock())
    assert pool.open == 3  # not idle for ttl yet
    proxy.clock.advance(10)
    await pool.maintain(proxy.clock())
    assert pool.open == 1  # down to smax


async def test_failonstatus_and_failontimeout(backends: Backends, start_proxy: Any,
                                              client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a", "timeout": "300ms"}, {"url": b.url, "name": "b"}],
        failonstatus=[503], failontimeout=True))
    status, _, headers = await get(client, proxy.url + "/status/503")
    assert status == 503
    first = headers["X-Backend"]
    assert "E" in _flags(proxy.member(first))
    other = "b" if first == "a" else "a"
    # While `first` is in E everything goes to the other member.
    assert set(await names(client, proxy.url + "/", 3)) == {other}
    proxy.clock.advance(60)
    for n in "ab":
        proxy.member(n).flags = 0
        proxy.member(n).lbstatus = 0
    status, text, _ = await get(client, proxy.url + "/slow?s=2")
    assert status == 504 and "did not answer within 0.3s" in text
    assert "E" in _flags(proxy.member("a"))


async def test_chunked_response_and_head(backends: Backends, start_proxy: Any,
                                         client: aiohttp.ClientSession) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}]))
    async with client.head(proxy.url + "/big?size=1000") as resp:
        assert resp.status == 200 and resp.headers["Content-Length"] == "1000"
        assert await resp.read() == b""
    # A HEAD answer that announced a body is not reused (some servers send the body anyway):
    # the next request gets a fresh connection, which then is reused.
    for _ in range(2):
        async with client.get(proxy.url + "/big?size=70000&chunked=1") as resp:
            assert len(await resp.read()) == 70000
    assert proxy.connections("a").opened_total == 2
    async with client.head(proxy.url + "/status/204") as resp:
        assert resp.status == 204
    async with client.get(proxy.url + "/") as resp:
        assert await resp.text() == "a\n"
    assert proxy.connections("a").opened_total == 2  # a bodiless HEAD answer keeps it


class RacyBackend:
    """Answers the first request on each connection with keep-alive, then closes the connection
    when the next request arrives on it, without answering: the keep-alive close race, made
    deterministic. It records every request it reads."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        served = 0
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                length = 0
                for line in head.split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":")[1])
                await reader.readexactly(length)
                self.seen.append((conn, head.split(" ")[0]))
                if served == 1:
                    writer.transport.abort()  # reset, no response byte
                    return
                served += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_reused_connection_closed_by_backend_is_resent_for_idempotent(
        start_proxy: Any, client: aiohttp.ClientSession) -> None:
    backend = RacyBackend()
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "r"}]))
        assert (await get(client, proxy.url + "/"))[0] == 200
        # The pooled connection is reset on the next request: a GET is re-sent on a new one.
        status, text, _ = await get(client, proxy.url + "/")
        assert (status, text) == (200, "ok\n")
        assert backend.seen == [(1, "GET"), (1, "GET"), (2, "GET")]
        assert "E" not in _flags(proxy.member("r"))
    finally:
        await backend.close()


async def test_post_is_never_sent_twice(start_proxy: Any, client: aiohttp.ClientSession) -> None:
    backend = RacyBackend()
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "r"}]))
        async with client.post(proxy.url + "/", data=b"x" * 10) as resp:
            assert resp.status == 200
        async with client.post(proxy.url + "/", data=b"y" * 10) as resp:
            # The body went out on a connection that then died: the backend may have acted on
            # it, so the proxy answers 502 rather than sending the POST again.
            assert resp.status == 502
        assert backend.seen == [(1, "POST"), (1, "POST")]
    finally:
        await backend.close()


def test_listening_socket_binds_addresses_and_leaves_names_to_the_loop() -> None:
    from balancerpool.proxy.server import listening_socket

    assert listening_socket("localhost", 0) is None  # a name: the event loop resolves it
    sock = listening_socket("127.0.0.1", 0, reuse_port=True)
    assert sock is not None
    try:
        host, port = sock.getsockname()
        assert host == "127.0.0.1" and port > 0 and not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        sock.listen()
        # Taken (without SO_REUSEPORT this time): the error names the address.
        with pytest.raises(OSError, match=rf"bind on address \('127.0.0.1', {port}\)"):
            listening_socket("127.0.0.1", port)
    finally:
        sock.close()
    if socket.has_ipv6:
        try:
            six = listening_socket("::1", 0)
        except OSError:  # no IPv6 loopback in this network namespace
            return
        assert six is not None
        with six:
            assert six.family == socket.AF_INET6
            assert six.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
