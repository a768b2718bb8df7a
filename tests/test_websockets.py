"""WebSockets whose member goes away are closed toward the client with 1001 (Going Away), after a
grace and at a bounded rate, so that clients reconnect to a live member."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from balancerpool.proxy.forward import GOING_AWAY

from .conftest import pool_doc, wait_for
from .test_frontend import HANDSHAKE, EchoWebSocketBackend

IO = 5.0


async def open_websocket(proxy: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.server.addresses[0]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(HANDSHAKE)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
    assert head.startswith(b"HTTP/1.1 101 ")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), IO) == b"PING"  # the tunnel works
    return reader, writer


@pytest.fixture
async def echo_backends() -> Any:
    started: list[EchoWebSocketBackend] = []

    async def start() -> str:
        backend = EchoWebSocketBackend()
        started.append(backend)
        return await backend.start()

    yield start
    for backend in started:
        await backend.close()


async def test_websockets_of_a_removed_member_get_1001_after_the_grace_at_a_bounded_rate(
        start_proxy: Any, echo_backends: Any) -> None:
    proxy = await start_proxy(pool_doc(
        [{"url": await echo_backends(), "name": "ws1"}, {"url": await echo_backends(), "name": "ws2"}],
        websockets={"closeGrace": "300ms", "closeRate": 10}))
    if proxy.server.frontend != "fast":
        pytest.skip("WebSockets are served by the fast front end (aiohttp's answers 501)")
    sockets = [await open_websocket(proxy) for _ in range(6)]
    pool = proxy.server.forwarder.pools["test"]
    on_ws1 = len(pool.tunnels.get("ws1", ()))
    ws1 = proxy.member("ws1")
    assert on_ws1 == 3 and ws1.busy == 3  # counted as busy: bybusyness sees them
    loop = asyncio.get_running_loop()
    removed_at = loop.time()
    proxy.server.forwarder.set_members("test", [m for m in pool.spec.members if m.name == "ws2"])

    async def outcome(reader: asyncio.StreamReader) -> tuple[bytes, float]:
        # Until EOF; the three on the remaining member never end and time out after 1.5 s.
        data = await asyncio.wait_for(reader.read(), 1.5)
        return data, loop.time() - removed_at

    results = await asyncio.gather(*(outcome(r) for r, _ in sockets[:6]), return_exceptions=True)
    closed = [r for r in results if isinstance(r, tuple)]
    # The three on ws1 got a close frame with 1001 and then EOF; the three on ws2 still run.
    assert [data for data, _ in closed] == [GOING_AWAY] * 3
    times = sorted(t for _, t in closed)
    assert times[0] >= 0.3  # not before the grace
    assert times[-1] - times[0] >= 0.15  # spread: 10 per second, not all at once
    await wait_for(lambda: ws1.busy == 0)
    for reader, writer in sockets:
        if not reader.at_eof():
            writer.write(b"still here")
            assert await asyncio.wait_for(reader.readexactly(10), IO) == b"STILL HERE"
        writer.close()


async def test_websockets_of_a_member_that_goes_down_get_1001(
        start_proxy: Any, echo_backends: Any) -> None:
    proxy = await start_proxy(pool_doc([{"url": await echo_backends(), "name": "ws"}],
                                       websockets={"closeGrace": "0s"}))
    if proxy.server.frontend != "fast":
        pytest.skip("WebSockets are served by the fast front end (aiohttp's answers 501)")
    reader, writer = await open_websocket(proxy)
    member = proxy.member("ws")
    member.mark_error(proxy.clock(), "health-check", "test")
    assert await asyncio.wait_for(reader.read(), IO) == GOING_AWAY
    writer.close()
    await wait_for(lambda: member.busy == 0)
