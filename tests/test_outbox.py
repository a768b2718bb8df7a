"""The outbox: writes made during one event-loop iteration go out together when it turns, in
order; a transport closed meanwhile costs the others nothing, and a client's FIN never costs it
its answer. Real sockets on 127.0.0.1, on asyncio's loop and on uvloop (conftest.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from balancerpool.proxy.upstream import Outbox

from .conftest import Backends, wait_for
from .test_frontend import Client, clients, connect, proxy_for

__all__ = ["clients"]  # the fixture

#: start_proxy with the fast front end only: aiohttp's server drops a request followed at once
#: by the client's FIN.
FRONTENDS = ("fast",)

IO = 5.0


class Peer(asyncio.Protocol):
    """The receiving end of one connection: keeps what arrives."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.arrived = asyncio.Event()
        self.lost = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.arrived.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    async def read(self, size: int) -> bytes:
        while len(self.data) < size:
            self.arrived.clear()
            await asyncio.wait_for(self.arrived.wait(), IO)
        return bytes(self.data)


@pytest.fixture
async def pairs() -> AsyncIterator[Any]:
    """``await pairs()``: a client transport and the peer that receives what it writes."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Queue[Peer] = asyncio.Queue()

    def factory() -> Peer:
        peer = Peer()
        accepted.put_nowait(peer)
        return peer

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transports: list[asyncio.BaseTransport] = []

    async def pair() -> tuple[asyncio.Transport, Peer]:
        transport, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
        transports.append(transport)
        return transport, await asyncio.wait_for(accepted.get(), IO)

    yield pair
    for transport in transports:
        transport.close()
    server.close()
    await server.wait_closed()


async def test_writes_wait_for_the_loop_to_turn_then_go_out_in_order(pairs: Any) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    (t1, p1), (t2, p2) = await pairs(), await pairs()
    outbox.write(t1, b"one ")
    outbox.write(t2, b"A")
    outbox.write(t1, b"two")
    # Nothing is written before the loop turns ...
    assert t1.get_write_buffer_size() == 0 and t2.get_write_buffer_size() == 0
    assert outbox._queued
    await asyncio.sleep(0)
    # ... then all of it, each transport's bytes in the order given.
    assert not outbox._queued
    assert await p1.read(7) == b"one two"
    assert await p2.read(1) == b"A"


async def test_flush_lets_a_direct_write_follow_what_was_queued(pairs: Any) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    transport, peer = await pairs()
    outbox.write(transport, b"queued,")
    outbox.flush()  # what every direct write does first
    transport.write(b"direct")
    assert await peer.read(13) == b"queued,direct"
    await asyncio.sleep(0)  # the turn's own flush finds nothing left: nothing comes twice
    transport.write(b"|end")
    assert await peer.read(17) == b"queued,direct|end"


async def test_a_transport_aborted_meanwhile_gets_nothing_and_the_others_are_written(
        pairs: Any, caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(asyncio.get_running_loop())
    (gone, gone_peer), (kept, kept_peer) = await pairs(), await pairs()
    outbox.write(gone, b"never sent")
    outbox.write(kept, b"sent")
    gone.abort()
    await asyncio.sleep(0)
    assert await kept_peer.read(4) == b"sent"
    await asyncio.wait_for(gone_peer.lost.wait(), IO)  # the abort reached it, and nothing before
    assert bytes(gone_peer.data) == b""
    assert "failed" not in caplog.text


async def test_a_half_close_right_after_a_request_still_gets_the_answer(
        backends: Backends, start_proxy: Any, clients: list[Client]) -> None:
    """A client's FIN right behind its requests: every answer, perhaps still in the outbox when
    the FIN is read, goes out before the connection closes."""
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    get = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    for request, statuses in (
            (get, [200]),  # the fast lane
            (b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd", [200]),  # ordinary
            (get + get, [200, 200]),
            # found by test_fuzz_http: a request with a body, then another
            (b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nabcd"
             b"GET /xCONNECT HTTP/1.1\r\nHost: a\r\n\r\n", [200, 200])):
        client = await connect(proxy, clients)
        client.writer.write(request)
        client.writer.write_eof()
        assert [(await client.response())[0] for _ in statuses] == statuses, request
        assert await client.at_eof(), request


async def test_a_fin_read_in_the_same_turn_as_the_answer_does_not_lose_it(
        backends: Backends, start_proxy: Any, clients: list[Client]) -> None:
    """The member's answer and the client's FIN are read in one loop iteration, the answer
    first: the fast lane puts the response in the outbox and the connection is idle when the
    FIN arrives. The transport closes; what waits in the outbox must go out first."""
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")  # leaves an idle pooled connection
    assert (await client.response())[0] == 200
    await client.send(b"GET /slow?s=0.1 HTTP/1.1\r\nHost: a\r\n\r\n")
    await wait_for(lambda: len(a.requests()) == 2)  # the head is out; the answer comes in 0.1 s
    time.sleep(0.3)  # noqa: ASYNC251 - the proxy shares this loop: the answer waits, unread
    client.writer.write_eof()  # the FIN, behind the answer
    status, _, body = await client.response()
    assert (status, body) == (200, b"a\n")
    assert await client.at_eof()
