"""The core's fast lane (``Forwarder.fast``), end to end: real backends on 127.0.0.1 (processes
from tests/backend.py, or scripted raw-socket servers in this process), a real proxy with the
fast front end, and raw client sockets, so that framing is checked byte for byte.

Every test proves the lane was taken (``Forwarder.fast_requests`` moves) or, for pools it must
not take, that it was not; and checks what a client and a backend see. Only the fast front end
has the fast lane, so every test here runs on it alone.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import signal
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancerpool.proxy import accesslog
from balancerpool.proxy import metrics as metrics_module
from balancerpool.proxy.model import parse_pools
from balancerpool.proxy.scheduling import bits_to_flags

from .conftest import Backends, metric_samples, pool_doc, wait_for

#: start_proxy with the fast front end only: the aiohttp front end has no fast lane.
FRONTENDS = ("fast",)

IO = 5.0  # bound on every socket wait
MiB = 1024 * 1024


def request(target: str, *fields: str, method: str = "GET", body: bytes | None = None,
            version: str = "1.1") -> bytes:
    """One request's bytes (HTTP/1.1 with Host front.test unless told otherwise); ``body`` gets
    a Content-Length."""
    lines = [f"{method} {target} HTTP/{version}", *(["Host: front.test"] if version == "1.1" else []),
             *fields]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def response(status: int, body: bytes = b"", *fields: str) -> bytes:
    """A backend's response with a Content-Length after ``fields``."""
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}", *fields,
             f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def big_body(size: int) -> bytes:
    """What tests/backend.py's /big sends: a 64 KiB pattern, repeated."""
    block = bytes(range(256)) * 256
    return (block * (size // len(block) + 1))[:size]


def hard_close(sock: Any) -> None:
    """SO_LINGER 0: the close sends a reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- a raw client ----------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    reason: str
    #: As received, names in their case and order.
    headers: list[tuple[str, str]]
    body: bytes
    #: The response's bytes as they came on the wire.
    raw: bytes

    def header(self, name: str) -> str | None:
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    @property
    def names(self) -> set[str]:
        return {n.lower() for n, _ in self.headers}


class Wire:
    """One client connection to the proxy, read and written as bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, head_only: bool = False) -> Reply:
        return await asyncio.wait_for(self._reply(head_only), IO)

    async def ask(self, data: bytes, head_only: bool = False) -> Reply:
        await self.send(data)
        return await self.reply(head_only)

    async def exactly(self, size: int) -> bytes:
        return await asyncio.wait_for(self.reader.readexactly(size), IO)

    async def rest(self) -> bytes:
        """Everything up to the proxy's close."""
        return await asyncio.wait_for(self.reader.read(), IO)

    async def head(self) -> Reply:
        """A response head alone (its body is read with ``chunk``)."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), IO)
        status, reason, headers = _parse_head(raw)
        return Reply(status, reason, headers, b"", raw)

    async def chunk(self) -> bytes:
        """One chunk of a chunked body; b"" for the last one (its CRLF read too)."""
        size = int(await asyncio.wait_for(self.reader.readuntil(b"\r\n"), IO), 16)
        data = await self.exactly(size + 2)
        assert data.endswith(b"\r\n")
        return data[:-2]

    async def _reply(self, head_only: bool) -> Reply:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        status, reason, headers = _parse_head(raw)
        fields = {n.lower(): v for n, v in headers}
        body = b""
        if head_only or status in (204, 304) or status < 200:
            pass
        elif "content-length" in fields:
            body = await self.reader.readexactly(int(fields["content-length"]))
            raw += body
        elif fields.get("transfer-encoding") == "chunked":
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                size = int(size_line, 16)
                data = await self.reader.readexactly(size + 2)
                raw += size_line + data
                if size == 0:
                    break
                body += data[:-2]
        else:
            body = await self.reader.read()
            raw += body
        return Reply(status, reason, headers, body, raw)

    def reset(self) -> None:
        hard_close(self.writer.get_extra_info("socket"))
        self.writer.transport.abort()

    def close(self) -> None:
        self.writer.close()


def _parse_head(raw: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    first, *lines = raw.decode("latin-1").split("\r\n")
    version, status, reason = first.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = []
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.append((name, value.strip()))
    lowered = [n.lower() for n, _ in headers]
    assert len(lowered) == len(set(lowered)), f"a field twice in {raw!r}"
    return int(status), reason, headers


OpenWire = Callable[[Any], Awaitable[Wire]]


@pytest.fixture
async def open_wire() -> AsyncIterator[OpenWire]:
    opened: list[Wire] = []

    async def connect(proxy: Any) -> Wire:
        host, port = proxy.server.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        wire = Wire(reader, writer)
        opened.append(wire)
        return wire

    yield connect
    for wire in opened:
        wire.close()


# --- a scripted raw backend ------------------------------------------------------------------


@dataclass
class Ask:
    """One request as a raw backend received it."""

    #: The connection it came on (1, 2 ... in accept order) and its rank on that connection.
    conn: int
    nth: int
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


#: Answers (or not) one request; False: the connection ends after it.
Handler = Callable[[Ask], Awaitable[bool]]


class RawBackend:
    """An HTTP/1.1 server on 127.0.0.1 in this process that does what its handler says, and
    records every request and which connections ended."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0
        self.seen: list[Ask] = []
        self.accepted = 0
        #: Connections that are over (the proxy closed them, or the handler ended them).
        self.ended: set[int] = set()
        #: Every request from now on is answered with a reset (see ``die``).
        self.dead = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> RawBackend:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> list[str]:
        return [f"{a.method} {a.target}" for a in self.seen]

    def die(self) -> None:
        """As a crashed server: nothing listens any more, and the connections already open
        are reset when a request arrives on them."""
        assert self.server is not None
        self.server.close()
        self.dead = True

    async def close(self) -> None:
        """Stop listening and end every connection; handlers end on their own (a cancelled
        one would make asyncio log an error), and only one stuck in a wait is cancelled."""
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        if self.tasks:
            _, stuck = await asyncio.wait(self.tasks, timeout=IO)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        self.accepted += 1
        conn, nth = self.accepted, 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ")
                headers = {n.strip().lower(): v.strip()
                           for n, _, v in (f.partition(":") for f in lines if f)}
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                nth += 1
                ask = Ask(conn, nth, method, target, headers, body, reader, writer)
                self.seen.append(ask)
                if self.dead:
                    hard_close(writer.get_extra_info("socket"))
                    writer.transport.abort()
                    return
                if not await self.handler(ask):
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass  # the proxy closed the connection, or a handler's bounded wait ran out
        finally:
            self.ended.add(conn)
            writer.close()
            self.tasks.discard(task)


StartRaw = Callable[[Handler], Awaitable[RawBackend]]


@pytest.fixture
async def raw() -> AsyncIterator[StartRaw]:
    started: list[RawBackend] = []

    async def start(handler: Handler) -> RawBackend:
        backend = await RawBackend(handler).start()
        started.append(backend)
        return backend

    yield start
    for backend in started:
        await backend.close()


def named(name: str) -> Handler:
    """A backend that answers every request with its name and the target."""

    async def handler(ask: Ask) -> bool:
        ask.writer.write(response(200, f"{name} {ask.target}".encode(), f"X-Backend: {name}"))
        return True

    return handler


async def _warmed(raw: StartRaw, start_proxy: Any, open_wire: OpenWire,
                  handler: Handler | None = None, warm: bytes | None = b"GET /warm 0"
                  ) -> tuple[RawBackend, Any, Any, Wire]:
    """A member "m" (``handler``, else echo), a proxy, its forwarder, and a client connection
    whose first request (answered ``warm``) opened the pooled connection, so that the next ones
    can take the fast lane (``warm=None``: no first request)."""
    backend = await raw(handler or echo)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m"}]))
    wire = await open_wire(proxy)
    if warm is not None:
        assert (await wire.ask(request("/warm"))).body == warm
    return backend, proxy, proxy.server.forwarder, wire


async def echo(ask: Ask) -> bool:
    ask.writer.write(response(200, f"{ask.method} {ask.target} {len(ask.body)}".encode()))
    return True


def flags(proxy: Any, name: str, pool: str = "test") -> str:
    return bits_to_flags(proxy.member(name, pool).flags)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


# --- 1. repeated GETs on keep-alive ----------------------------------------------------------


def _comparable(reply: Reply) -> tuple[int, str, list[tuple[str, str]], bytes]:
    return reply.status, reply.reason, [(n, v) for n, v in reply.headers if n.lower() != "date"], \
        reply.body


async def test_keepalive_gets_take_the_fast_lane_and_answer_as_the_ordinary_path(
        backends: Backends, start_proxy: Any, open_wire: OpenWire) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    # The client names a field in Connection: hop-by-hop, never forwarded.
    ask = request("/headers?q=1", "Connection: X-Req-Hop", "X-Req-Hop: secret", "X-Keep: yes")
    fast = [await wire.ask(ask) for _ in range(6)]
    # The first request to each member opened its connection on the ordinary path, with the
    # member the fast lane chose (each member elected once per request, not twice); the other
    # four went out on the pooled connections from the fast lane.
    assert fwd.fast_requests == 4
    assert [proxy.connections(n).opened_total for n in "ab"] == [1, 1]
    assert [proxy.member(n).elected for n in "ab"] == [3, 3]
    for reply, name in zip(fast, "ababab", strict=True):
        assert reply.status == 200
        doc = json.loads(reply.body)
        assert doc["name"] == name and doc["path"] == "/headers?q=1"
        # The backend's Connection, Keep-Alive and the field its Connection names stay here.
        assert {"connection", "keep-alive", "x-resp-hop", "transfer-encoding"}.isdisjoint(reply.names)
        assert reply.header("X-End-To-End") == "kept" and reply.header("X-Backend") == name
        assert reply.header("Content-Length") == str(len(reply.body))
        seen = {k.lower(): v for k, v in doc["headers"]}
        assert seen["x-keep"] == "yes" and "x-req-hop" not in seen and "connection" not in seen
        assert seen["x-forwarded-host"] == "front.test" and seen["x-forwarded-for"] == "127.0.0.1"
    # The same requests with the fast lane off: the same answers, byte for byte (but Date), on
    # the same pooled connections, and the lane's counter stands still.
    fwd.fast_lane = False
    ordinary = [await wire.ask(ask) for _ in range(6)]
    assert fwd.fast_requests == 4
    assert [proxy.connections(n).opened_total for n in "ab"] == [1, 1]
    assert [_comparable(r) for r in ordinary] == [_comparable(r) for r in fast]
    # And back on: the lane takes them again.
    fwd.fast_lane = True
    assert json.loads((await wire.ask(ask)).body)["name"] == "a"
    assert fwd.fast_requests == 5


async def test_forwarded_fields_follow_each_request_on_a_keepalive_connection(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    """A keep-alive client's forwarded fields are built once and remembered for its connection
    (FieldsMemo): a request whose fields, Host or method differ must never get the last one's."""
    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire)
    asks = [
        request("/1", "X-A: one", "Accept: */*"),
        request("/2", "X-A: one", "Accept: */*"),  # the same fields: from the memo
        request("/3", "X-A: two", "Accept: */*"),  # one value differs
        request("/4", "X-A: two", "Accept: */*"),
        request("/5", "Accept: */*", "X-A: two"),  # the same fields in another order
        request("/6", "X-A: two", "Accept: */*").replace(b"front.test", b"other.test"),
        request("/7", "X-A: two", "Accept: */*", method="DELETE"),
        request("/8", "X-A: two", "Accept: */*", method="POST"),  # bodiless: Content-Length: 0
        request("/9", "X-A: two", "Accept: */*", "X-Forwarded-For: 10.0.0.1"),
        request("/10", "X-A: two", "Accept: */*"),
    ]
    for ask in asks:
        assert (await wire.ask(ask)).status == 200
    assert fwd.fast_requests == len(asks)
    seen = backend.seen[1:]
    assert [a.target for a in seen] == [f"/{i}" for i in range(1, 11)]
    assert [a.headers.get("x-a") for a in seen] == ["one", "one", *["two"] * 8]
    assert [a.headers["x-forwarded-host"] for a in seen] == \
        [*["front.test"] * 5, "other.test", *["front.test"] * 4]
    assert [a.method for a in seen][5:8] == ["GET", "DELETE", "POST"]
    assert [a.headers.get("content-length") for a in seen][6:9] == [None, "0", None]
    assert [a.headers["x-forwarded-for"] for a in seen][7:] == \
        ["127.0.0.1", "10.0.0.1, 127.0.0.1", "127.0.0.1"]
    # HTTP/1.0 without Host: the same fields, and the host from each absolute-form target.
    for host in ("one.test", "two.test"):
        head = f"GET http://{host}/h HTTP/1.0\r\nConnection: keep-alive\r\nX-A: two\r\n\r\n"
        assert (await wire.ask(head.encode())).status == 200
    assert [a.headers["x-forwarded-host"] for a in backend.seen[-2:]] == ["one.test", "two.test"]
    # Another client connection with other fields gets its own.
    other = await open_wire(proxy)
    assert (await other.ask(request("/11", "X-A: three"))).status == 200
    assert (await wire.ask(asks[0])).status == 200
    assert [a.headers.get("x-a") for a in backend.seen[-2:]] == ["three", "one"]


#: What the member answers on one pooled connection, in turn. A head the same, byte for byte,
#: as the last one's is not read again (UpstreamConnection.last_head): its reason and fields,
#: and what the Forwarder made of them, are the last ones. Every difference must reach the
#: client as it was sent. Each row: the body, the status line, the fields (a Content-Length
#: after them unless they have one), and how the member writes the head ("split": in three
#: writes, "blank": after an empty line, which llhttp skips).
MEMBER_HEADS: list[tuple[str, str, list[str], str]] = [
    ("a", "200 OK", ["X-One: 1", "X-Two: 2"], ""),
    ("b", "200 OK", ["X-One: 1", "X-Two: 2"], ""),  # the same head
    ("c", "200 OK", ["X-One: 1", "X-Two: 22"], ""),  # the last value differs
    ("d", "200 OK", ["X-One: 11", "X-Two: 22"], ""),  # the first value differs
    ("e", "200 OK", ["X-One: 11"], ""),  # fewer fields
    ("f", "200 OK", ["X-One: 11", "X-Two: 2", "X-Three: 3"], ""),  # more fields
    ("gg", "200 OK", ["X-One: 11", "X-Two: 2", "X-Three: 3"], ""),  # but for Content-Length
    ("h", "200 OK", ["X-One: 11", "x-two: 2", "X-Three: 3"], ""),  # a name's case differs
    ("i", "200 OK", ["X-One: 11", "Connection: X-Two", "X-Two: 2"], ""),  # X-Two hop-by-hop
    ("j", "200 OK", ["X-One: 11", "X-Two: 2", "X-Three: 3"], ""),  # ... and not here
    ("k", "200 OK", ["X-One: 11", "Location: {member}/x"], ""),  # rewritten (ProxyPassReverse)
    ("l", "200 OK", ["X-One: 11", "Location: {member}/x"], ""),  # the same head: rewritten again
    ("m", "200 Fine", ["X-One: 11", "Location: {member}/x"], ""),  # only the reason differs
    ("n", "200 OK", ["X-One: 11", "Location: {member}/x"], ""),
    ("o", "200 OK", [], ""),
    ("p", "200 OK", [], ""),
    ("q", "200 OK", ["Content-Length: 1", "X-One: 11", "X-Tail: t"], ""),
    ("r", "200 OK", ["Content-Length: 1", "X-One: 11"], ""),  # the first lines of the last head
    ("s", "200 OK", ["Content-Length: 1", "X-One: 11"], "split"),  # the same head, in pieces
    ("t", "200 OK", ["Content-Length: 1", "X-One: 12"], "split"),
    ("u", "200 OK", ["Content-Length: 1", "X-One: 12"], "blank"),  # the same after an empty line
    ("v", "200 OK", ["Content-Length: 1", "X-One:  13 ", "X-Two:"], "blank"),  # OWS as sent
    ("w", "201 Created", ["X-One: 1", "X-Two: 2"], ""),  # the first fields again, another status
]


async def test_member_heads_follow_each_response_on_a_pooled_connection(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    async def answers(ask: Ask) -> bool:
        body, status, fields, how = next(row for row in MEMBER_HEADS if ask.target == f"/{row[0]}")
        member = f"http://127.0.0.1:{backend.port}"
        lines = [f.format(member=member) for f in fields]
        if not any(f.startswith("Content-Length") for f in fields):
            lines.append(f"Content-Length: {len(body)}")
        head = "\r\n".join([f"HTTP/1.1 {status}", *lines, "", ""]).encode()
        if how == "split":
            # Three reads: each piece waits until the proxy's connection has the one before.
            (conn,) = proxy.connections("m").conns
            for end in (10, len(head) - 3):
                ask.writer.write(head[len(conn.head):end])
                await wait_for(lambda end=end: len(conn.head) == end)
            head = head[len(conn.head):]
        ask.writer.write((b"\r\n" if how == "blank" else b"") + head + body.encode())
        return True

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, answers, None)
    replies = [await wire.ask(request(f"/{row[0]}")) for row in MEMBER_HEADS]
    assert fwd.fast_requests == len(MEMBER_HEADS) - 1  # the first one opened the connection
    assert {a.conn for a in backend.seen} == {1}  # one pooled connection served them all
    for (body, status, fields, _), reply in zip(MEMBER_HEADS, replies, strict=True):
        expected = [(n, v.strip()) for n, _, v in (f.format(member="http://front.test").partition(":")
                                                  for f in fields)
                    if n not in ("Connection", "Content-Length") and not (body == "i" and n == "X-Two")]
        assert (reply.status, reply.reason) == (int(status[:3]), status[4:]), body
        assert reply.body == body.encode()
        assert [(n, v) for n, v in reply.headers if n.lower() != "content-length"] == expected, body
        assert reply.header("Content-Length") == str(len(body))
    # A value goes on without the whitespace before it, and with what follows it (as llhttp's
    # callbacks gave it).
    assert b"\r\nX-One: 13 \r\nX-Two: \r\n" in replies[-2].raw


# --- 2. HEAD, 204 and 304 ------------------------------------------------------------------

BODILESS: list[tuple[bytes, bytes]] = [
    (request("/204"), b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n"),
    # The member's Content-Length on a 304 describes the representation: no body follows.
    (request("/304"), b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'),
    (request("/head", method="HEAD"), b"HTTP/1.1 200 OK\r\nX-Kind: head\r\nContent-Length: 11\r\n\r\n"),
    (request("/after", "Connection: close"),
     b"HTTP/1.1 200 OK\r\nX-Kind: plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nafter"),
]


async def bodiless_answers(ask: Ask) -> bool:
    if ask.target == "/204":
        ask.writer.write(b"HTTP/1.1 204 No Content\r\nX-Kind: none\r\n\r\n")
    elif ask.target == "/304":
        ask.writer.write(b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 7\r\n\r\n')
    elif ask.method == "HEAD":
        ask.writer.write(b"HTTP/1.1 200 OK\r\nX-Kind: head\r\nContent-Length: 11\r\n\r\n")
    else:
        ask.writer.write(response(200, ask.target[1:].encode(), "X-Kind: plain"))
    return True


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "one-by-one"])
async def test_head_204_and_304_are_framed_exactly(raw: StartRaw, start_proxy: Any,
                                                   open_wire: OpenWire, pipelined: bool) -> None:
    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, bodiless_answers, None)
    assert (await wire.ask(request("/warm"))).body == b"warm"  # opens the pooled connection
    before = fwd.fast_requests
    if pipelined:
        await wire.send(b"".join(ask for ask, _ in BODILESS))
        expected = b"".join(answer for _, answer in BODILESS)
        assert await wire.exactly(len(expected)) == expected
    else:
        for ask, answer in BODILESS:
            await wire.send(ask)
            assert await wire.exactly(len(answer)) == answer
    assert await wire.rest() == b""  # not one byte more, then the close asked for
    # 204, 304 and HEAD went through the fast lane. The HEAD answer announced a body, so its
    # connection is not reused: /after opened a new one on the ordinary path.
    assert fwd.fast_requests - before == 3
    assert backend.requests() == ["GET /warm", "GET /204", "GET /304", "HEAD /head", "GET /after"]
    assert [a.conn for a in backend.seen] == [1, 1, 1, 1, 2]
    await wait_for(lambda: 1 in backend.ended)


# --- 3. bodies that are not complete in the first read ---------------------------------------


async def test_large_responses_started_in_the_fast_lane_arrive_whole(
        backends: Backends, start_proxy: Any, open_wire: OpenWire) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}]))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    assert (await wire.ask(request("/"))).body == b"a\n"
    before = fwd.fast_requests
    sized = await wire.ask(request(f"/big?size={2 * MiB}"))
    assert sized.status == 200 and sized.header("Content-Length") == str(2 * MiB)
    assert sized.body == big_body(2 * MiB)
    size = 3 * MiB + 1234
    chunked = await wire.ask(request(f"/big?size={size}&chunked=1"))
    assert chunked.status == 200 and chunked.header("Transfer-Encoding") == "chunked"
    assert chunked.header("Content-Length") is None
    assert chunked.body == big_body(size)
    # The member's connection went back to the pool after each: one connection for all.
    assert (await wire.ask(request("/"))).body == b"a\n"
    assert fwd.fast_requests - before == 3
    assert proxy.connections("a").opened_total == 1
    assert proxy.member("a").busy == 0


async def test_slow_chunked_response_started_in_the_fast_lane_is_streamed(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    pieces = [b"first-", b"second-", b"third-", b"fourth"]
    gate = asyncio.Event()

    async def drip(ask: Ask) -> bool:
        if ask.target != "/drip":
            return await echo(ask)
        ask.writer.write(b"HTTP/1.1 200 OK\r\nX-Kind: drip\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + chunk(pieces[0]))
        await ask.writer.drain()
        await asyncio.wait_for(gate.wait(), IO)  # the client has the first piece already
        for piece in pieces[1:]:
            await asyncio.sleep(0.02)
            ask.writer.write(chunk(piece))
            await ask.writer.drain()
        ask.writer.write(b"0\r\n\r\n")
        return True

    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, drip, b"GET /warm 0")
    before = fwd.fast_requests
    await wire.send(request("/drip"))
    head = await wire.head()
    assert head.status == 200 and head.header("X-Kind") == "drip"
    assert head.header("Transfer-Encoding") == "chunked" and head.header("Content-Length") is None
    assert await wire.chunk() == pieces[0]  # before the member sent the rest: streamed
    gate.set()
    received = b""
    while data := await wire.chunk():
        received += data
    assert received == b"".join(pieces[1:])
    assert fwd.fast_requests - before == 1
    # The connection served the whole stream and is pooled again: the next request takes it.
    assert (await wire.ask(request("/next"))).body == b"GET /next 0"
    assert fwd.fast_requests - before == 2
    assert [a.conn for a in backend.seen] == [1, 1, 1] and backend.accepted == 1


# --- 4. the keep-alive race ----------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_keepalive_race_is_resent_without_a_client_visible_error(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, caplog: pytest.LogCaptureFixture,
        how: str) -> None:
    """The member answers one request per connection and closes (or resets) the connection when
    the next one arrives, as a server whose keep-alive timeout fires just then: each request
    the fast lane sends on a pooled connection is lost that way and must go out again."""
    caplog.set_level(logging.INFO, logger="balancerpool.proxy")

    async def one_per_connection(ask: Ask) -> bool:
        if ask.nth > 1:
            if how == "reset":
                hard_close(ask.writer.get_extra_info("socket"))
                ask.writer.transport.abort()
            return False
        ask.writer.write(response(200, f"{ask.target} on {ask.conn}".encode()))
        return True

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, one_per_connection, None)
    replies = [await wire.ask(request(f"/r{i}")) for i in range(5)]
    assert [(r.status, r.body) for r in replies] == [(200, f"/r{i} on {i + 1}".encode())
                                                     for i in range(5)]
    # Requests 1-4 went out from the fast lane on the pooled connection, found it closed, and
    # were sent again on a fresh one.
    assert fwd.fast_requests == 4
    assert backend.requests() == ["GET /r0"] + [f"GET /r{i}" for i in range(1, 5) for _ in (1, 2)]
    resent = [r for r in caplog.records if "closed a reused connection; re-sending" in r.getMessage()]
    assert len(resent) == 4
    member = proxy.member("m")
    assert flags(proxy, "m") == "" and member.errors == 0 and member.busy == 0
    assert errors_logged(caplog) == []


# --- 5. a member that dies with idle pooled connections --------------------------------------


async def test_killed_member_with_idle_connections_fails_over(
        backends: Backends, start_proxy: Any, open_wire: OpenWire) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    warm = [(await wire.ask(request("/"))).body for _ in range(4)]
    assert warm == [b"a\n", b"b\n", b"a\n", b"b\n"]
    assert fwd.fast_requests == 2
    assert len(proxy.connections("b").idle) == 1
    b.kill(signal.SIGKILL)
    after = [await wire.ask(request("/")) for _ in range(6)]
    assert [(r.status, r.body) for r in after] == [(200, b"a\n")] * 6
    assert fwd.fast_requests - 2 >= 3  # a's answers came through the fast lane
    assert "E" in flags(proxy, "b") and flags(proxy, "a") == ""
    assert proxy.connections("b").open == 0


async def test_member_that_resets_its_pooled_connections_and_stops_listening_fails_over(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = await raw(named("a")), await raw(named("b"))
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    warm = [(await wire.ask(request("/"))).body for _ in range(4)]
    assert warm == [b"a /", b"b /", b"a /", b"b /"]
    assert fwd.fast_requests == 2
    b.die()
    after = [await wire.ask(request(f"/{i}")) for i in range(6)]
    assert [(r.status, r.body) for r in after] == [(200, f"a /{i}".encode()) for i in range(6)]
    # The fast lane did send a request on b's pooled connection after b died (the reset came
    # back, the request went out again), then b's refused connect put it in error.
    assert [(s.conn, s.nth) for s in b.seen] == [(1, 1), (1, 2), (1, 3)]
    assert fwd.fast_requests - 2 >= 4
    member = proxy.member("b")
    assert flags(proxy, "b") == "E" and member.last_change.signal == "connect-error"
    assert flags(proxy, "a") == "" and proxy.connections("b").open == 0
    assert errors_logged(caplog) == []


# --- 6. member timeout ---------------------------------------------------------------------


@pytest.mark.parametrize("failontimeout", [False, True], ids=["plain", "failontimeout"])
@pytest.mark.parametrize("drip", [False, True], ids=["silent", "dripping-head"])
@pytest.mark.parametrize("real_clock", [False, True], ids=["fake-clock", "real-clock"])
async def test_member_timeout_in_the_fast_lane_is_a_504_and_the_connection_is_dropped(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, failontimeout: bool,
        drip: bool, real_clock: bool) -> None:
    """(``real_clock``: the deadline comes from the request's one clock reading, as deployed;
    with a test's clock, from the event loop's.)"""
    async def hang(ask: Ask) -> bool:
        if ask.target == "/hang":
            if drip:  # a head that never ends: the deadline counts from the request, not a byte
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 100:
                    ask.writer.write(bytes([byte]))
                    await ask.writer.drain()
                    await asyncio.sleep(0.02)
            await ask.reader.read()  # until the proxy gives the connection up
            return False
        return await echo(ask)

    backend = await raw(hang)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m", "timeout": "300ms"}],
                                       failontimeout=failontimeout), real_clock=real_clock)
    fwd = proxy.server.forwarder
    assert fwd.monotonic is real_clock
    wire = await open_wire(proxy)
    assert (await wire.ask(request("/warm"))).status == 200
    before = fwd.fast_requests
    loop = asyncio.get_running_loop()
    started = loop.time()
    reply = await wire.ask(request("/hang"))
    elapsed = loop.time() - started
    assert reply.status == 504 and b"did not answer within 0.3s" in reply.body
    assert 0.25 <= elapsed < 3
    assert fwd.fast_requests - before == 1
    member = proxy.member("m")
    if failontimeout:
        assert flags(proxy, "m") == "E" and member.last_change.signal == "failontimeout"
    else:
        assert flags(proxy, "m") == "" and member.errors == 0
    # The connection that timed out is closed, never pooled again.
    await wait_for(lambda: 1 in backend.ended)
    assert proxy.connections("m").open == 0 and member.busy == 0
    # The client connection goes on; the next request gets its own answer on a new connection.
    reply = await wire.ask(request("/next"))
    assert (reply.status, reply.body) == (200, b"GET /next 0")
    assert backend.seen[-1].conn == 2


# --- 7. pipelined requests -------------------------------------------------------------------


async def test_pipelined_mix_of_fast_and_body_requests_answered_in_order(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire)
    before = fwd.fast_requests
    body = bytes(range(256)) * 400  # 100 KiB: it comes in several reads
    await wire.send(request("/p1") + request("/p2") + request("/p3", method="POST", body=body)
                    + request("/p4") + request("/p5?x=1") + request("/p6", "Connection: close"))
    replies = [await wire.reply() for _ in range(6)]
    assert [(r.status, r.body) for r in replies] == [
        (200, b"GET /p1 0"), (200, b"GET /p2 0"), (200, b"POST /p3 102400"), (200, b"GET /p4 0"),
        (200, b"GET /p5?x=1 0"), (200, b"GET /p6 0")]
    assert replies[-1].header("Connection") == "close"
    assert await wire.rest() == b""
    assert backend.seen[3].body == body
    assert backend.requests() == ["GET /warm", "GET /p1", "GET /p2", "POST /p3", "GET /p4",
                                  "GET /p5?x=1", "GET /p6"]
    assert fwd.fast_requests - before >= 2  # at least /p1 and /p2 took the lane
    assert backend.accepted == 1


async def test_pipelined_gets_then_a_half_close_are_all_answered_then_closed(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire)
    before = fwd.fast_requests
    await wire.send(request("/h1") + request("/h2") + request("/h3"))
    wire.writer.write_eof()  # the client is done sending: answer what came, then close
    expected = (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nGET /h1 0"
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nGET /h2 0"
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nConnection: close\r\n\r\nGET /h3 0")
    assert await wire.rest() == expected
    assert fwd.fast_requests - before == 3
    assert backend.requests() == ["GET /warm", "GET /h1", "GET /h2", "GET /h3"]


async def test_connection_close_and_http10_keepalive_in_the_fast_lane(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire)
    # HTTP/1.0 asking for keep-alive: told it is kept, and it is.
    await wire.send(request("/ten", "Connection: keep-alive", version="1.0"))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: keep-alive\r\n\r\nGET /ten 0"
    assert await wire.exactly(len(answer)) == answer
    assert fwd.fast_requests == 1
    # HTTP/1.0 without keep-alive: Connection: close, then the close.
    await wire.send(request("/ten-close", version="1.0"))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 16\r\nConnection: close\r\n\r\nGET /ten-close 0"
    assert await wire.rest() == answer
    assert fwd.fast_requests == 2
    # HTTP/1.1 with Connection: close, on another client connection.
    other = await open_wire(proxy)
    await other.send(request("/close", "Connection: close"))
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\nGET /close 0"
    assert await other.rest() == answer
    assert fwd.fast_requests == 3
    # The member's connection was not the client's to close: one connection served them all.
    assert backend.accepted == 1 and len(proxy.connections("m").idle) == 1


async def test_many_clients_share_a_small_connection_pool_through_the_fast_lane(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    """pool max 2, eight clients at once: the burst starts on the two idle connections from
    the fast lane, the other requests wait for those connections to be handed over (the lane
    never opens one); every client gets its own answers, in order."""
    async def sometimes_slow(ask: Ask) -> bool:
        if "slow" in ask.target:
            await asyncio.sleep(0.01)
        return await echo(ask)

    backend = await raw(sometimes_slow)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m", "pool": {"max": 2}}]))
    fwd = proxy.server.forwarder
    conns = proxy.connections("m")
    wires = [await open_wire(proxy) for _ in range(8)]
    await asyncio.gather(*(w.ask(request("/warm/slow")) for w in wires[:2]))
    assert conns.opened_total == 2 and len(conns.idle) == 2
    before = fwd.fast_requests

    def target(n: int, i: int) -> str:
        return f"/c{n}/{i}" + ("/slow" if i % 4 == 0 else "")

    async def client(n: int, wire: Wire) -> list[tuple[int, bytes]]:
        return [((r := await wire.ask(request(target(n, i)))).status, r.body) for i in range(12)]

    results = await asyncio.gather(*(client(n, w) for n, w in enumerate(wires)))
    for n, replies in enumerate(results):
        assert replies == [(200, f"GET {target(n, i)} 0".encode()) for i in range(12)]
    assert fwd.fast_requests - before >= 2
    assert conns.opened_total == 2 and backend.accepted == 2
    assert proxy.member("m").busy == 0 and conns.busy == 0 and not conns.waiters
    # Quiet again: each client's next request takes an idle connection in the fast lane.
    before = fwd.fast_requests
    for n, wire in enumerate(wires):
        assert (await wire.ask(request(f"/quiet{n}"))).body == f"GET /quiet{n} 0".encode()
    assert fwd.fast_requests - before == 8


async def test_long_pipeline_stays_in_the_fast_lane_and_in_order(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, echo, None)
    assert (await wire.ask(request("/warm"))).status == 200
    before = fwd.fast_requests
    await wire.send(b"".join(request(f"/n{i}") for i in range(100)))
    replies = [await wire.reply() for _ in range(100)]
    assert [r.body for r in replies] == [f"GET /n{i} 0".encode() for i in range(100)]
    # Each answer, written from the member connection's callback, sends the next one.
    assert fwd.fast_requests - before == 100
    assert backend.accepted == 1


async def test_keepalive_race_under_pipelining_keeps_the_order(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    """The first pipelined request, sent from the fast lane, meets the keep-alive race and is
    resumed by a Task, which serves the rest of the queue: all answered, in order, once."""
    async def one_per_connection(ask: Ask) -> bool:
        if ask.nth > 1:
            return False
        ask.writer.write(response(200, ask.target.encode()))
        return True

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, one_per_connection, b"/warm")
    await wire.send(b"".join(request(f"/q{i}") for i in range(4)))
    replies = [await wire.reply() for _ in range(4)]
    assert [(r.status, r.body) for r in replies] == [(200, f"/q{i}".encode()) for i in range(4)]
    assert fwd.fast_requests >= 1
    answered = [a.target for a in backend.seen if a.nth == 1]
    assert answered == ["/warm", "/q0", "/q1", "/q2", "/q3"]
    assert flags(proxy, "m") == "" and proxy.member("m").errors == 0


@pytest.mark.parametrize("split", [False, True], ids=["one-segment", "two-segments"])
async def test_interim_responses_before_a_fast_lane_answer_are_not_forwarded(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, split: bool) -> None:
    async def hints(ask: Ask) -> bool:
        if ask.target != "/hinted":
            return await echo(ask)
        ask.writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n")
        if split:
            await ask.writer.drain()
            await asyncio.sleep(0.02)
        ask.writer.write(response(200, b"final", "X-Kind: final"))
        return True

    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, hints, None)
    assert (await wire.ask(request("/warm"))).status == 200
    await wire.send(request("/hinted"))
    answer = b"HTTP/1.1 200 OK\r\nX-Kind: final\r\nContent-Length: 5\r\n\r\nfinal"
    assert await wire.exactly(len(answer)) == answer
    assert fwd.fast_requests == 1
    # The connection is pooled again and the next answer is its own.
    assert (await wire.ask(request("/next"))).body == b"GET /next 0"
    assert fwd.fast_requests == 2 and backend.accepted == 1


# --- 8. the client goes away -----------------------------------------------------------------


@pytest.mark.parametrize("size", [10, MiB], ids=["small", "large"])
@pytest.mark.parametrize("how", ["reset", "close"])
async def test_client_gone_while_its_fast_lane_request_is_in_flight(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, caplog: pytest.LogCaptureFixture,
        size: int, how: str) -> None:
    gate = asyncio.Event()

    async def late(ask: Ask) -> bool:
        if ask.target != "/late":
            return await echo(ask)
        await asyncio.wait_for(gate.wait(), IO)
        ask.writer.write(response(200, b"L" * size))
        return True

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, late, None)
    assert (await wire.ask(request("/warm"))).status == 200
    before = fwd.fast_requests
    await wire.send(request("/late"))
    await wait_for(lambda: len(backend.seen) == 2)  # at the member, through the fast lane
    assert fwd.fast_requests - before == 1
    if how == "reset":
        wire.reset()
    else:
        wire.close()
    # The proxy sees the client go first.
    await wait_for(lambda: all(c._lost or c._eof for c in proxy.server.server.connections))
    gate.set()
    member = proxy.member("m")
    await wait_for(lambda: member.busy == 0)
    if how == "reset" and size == MiB:
        # Read in part only: that connection is closed, never pooled.
        await wait_for(lambda: 1 in backend.ended)
    # The proxy goes on; every later request gets its own answer (never the late one).
    other = await open_wire(proxy)
    for i in range(3):
        reply = await other.ask(request(f"/after{i}"))
        assert (reply.status, reply.body) == (200, f"GET /after{i} 0".encode())
    assert flags(proxy, "m") == "" and member.errors == 0
    assert errors_logged(caplog) == []


# --- 9. access log and metrics --------------------------------------------------------------


async def test_access_log_and_metrics_see_fast_lane_requests(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, tmp_path: Path) -> None:
    async def varied(ask: Ask) -> bool:
        if ask.target == "/hang":
            await ask.reader.read()
            return False
        if ask.target == "/big":
            ask.writer.write(response(200, b"B" * 300_000))
            return True
        return await echo(ask)

    backend = await raw(varied)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m", "timeout": "300ms"}]))
    fwd = proxy.server.forwarder
    fwd.metrics = metrics = metrics_module.enable(fwd)
    log_file = tmp_path / "access.log"
    accesslog.configure(str(log_file))
    try:
        wire = await open_wire(proxy)
        statuses = [(await wire.ask(request(t))).status for t in ("/one", "/two", "/three", "/big",
                                                                   "/hang")]
    finally:
        accesslog.configure(None)
    assert statuses == [200, 200, 200, 200, 504]
    # /one opened the connection; /two, /three, /big (streamed after its start) and /hang
    # (timed out) went through the fast lane.
    assert fwd.fast_requests == 4
    lines = log_file.read_text().splitlines()
    expected = [("/one", 200, 10), ("/two", 200, 10), ("/three", 200, 12), ("/big", 200, 300_000)]
    assert len(lines) == 5
    for line, (target, status, sent) in zip(lines, expected, strict=False):
        assert f'"GET {target} HTTP/1.1" {status} {sent} ' in line, line
        for field in ("complete=True", "pool=test", "member=m", "attempts=1",
                      "route_reason=new-session"):
            assert field in line, (field, line)
    assert '"GET /hang HTTP/1.1" 504 ' in lines[4]
    # Timings: milliseconds, rounded to the microsecond where logged.
    for line in lines[:4]:
        timings = dict(f.split("=", 1) for f in line.split() if f.startswith(("connect_ms=",
                                                                              "response_ms=")))
        assert set(timings) == {"connect_ms", "response_ms"}, line
        for value in timings.values():
            assert 0 <= float(value) < 10_000 and len(value.partition(".")[2]) <= 3, line
    for field in ("pool=test", "member=m", "attempts=1", "route_reason=timeout"):
        assert field in lines[4], (field, lines[4])
    s = metric_samples(metrics.render().decode())

    def v(name: str, **labels: str) -> float:
        return s[(name, tuple(sorted(labels.items())))]

    assert v("balancerpool_requests_total", pool="test", member="m", code="2xx") == 4
    assert v("balancerpool_requests_total", pool="test", member="m", code="5xx") == 1
    assert v("balancerpool_request_duration_seconds_count", pool="test", member="m") == 5
    assert v("balancerpool_member_elected_total", pool="test", member="m") == 5
    assert v("balancerpool_member_received_bytes_total", pool="test", member="m") >= 300_000
    assert ("balancerpool_responses_incomplete_total", (("member", "m"), ("pool", "test"))) not in s


# --- 10. pools the fast lane must not take ---------------------------------------------------


async def test_sticky_pool_is_not_taken_by_the_fast_lane(
        backends: Backends, start_proxy: Any, open_wire: OpenWire) -> None:
    a, b = backends.start("a"), backends.start("b")
    members = [{"url": a.url, "name": "a", "route": "a"}, {"url": b.url, "name": "b", "route": "b"}]
    proxy = await start_proxy(
        pool_doc(members, name="sticky", routes=[{"path": "/s"}], stickysession="JSESSIONID"),
        pool_doc(members, name="plain", routes=[{"path": "/p"}]))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    sticky = [await wire.ask(request("/s/x", "Cookie: JSESSIONID=abc.b")) for _ in range(6)]
    assert [(r.status, r.body) for r in sticky] == [(200, b"b\n")] * 6
    # The URL parameter form, and requests without a session (balanced, still not fast).
    assert (await wire.ask(request("/s/x?JSESSIONID=abc.a"))).body == b"a\n"
    fresh = [await wire.ask(request("/s/x")) for _ in range(4)]
    assert all(r.status == 200 for r in fresh)
    assert fwd.fast_requests == 0
    assert fwd.pools["sticky"].route_reasons["sticky"] == 7
    assert proxy.connections("b", "sticky").opened_total == 1  # pooled, yet not the fast lane
    # The same proxy takes a plain pool's repeated requests: the counter works.
    plain = [(await wire.ask(request("/p/x"))).body for _ in range(4)]
    assert plain == [b"a\n", b"b\n", b"a\n", b"b\n"]
    assert fwd.fast_requests == 2
    # And the sticky pool is still sticky after that.
    assert (await wire.ask(request("/s/y", "Cookie: JSESSIONID=abc.b"))).body == b"b\n"
    assert fwd.fast_requests == 2


async def test_pool_exporting_balancer_variables_is_not_taken_by_the_fast_lane(
        backends: Backends, start_proxy: Any, open_wire: OpenWire) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}],
                                       balancerVariables={"requestHeaders": True}))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    for _ in range(3):
        reply = await wire.ask(request("/headers"))
        seen = {k.lower(): v for k, v in json.loads(reply.body)["headers"]}
        assert seen["x-balancer-worker-name"] == "a"
    assert fwd.fast_requests == 0


# --- reloads, member removal, shutdown ------------------------------------------------------


async def test_reload_turns_the_fast_lane_off_and_on_and_keeps_the_pooled_connection(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    a = await raw(named("a"))
    plain = pool_doc([{"url": a.url, "name": "a", "route": "a"}])
    proxy = await start_proxy(plain)
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    assert [(await wire.ask(request("/"))).body for _ in range(2)] == [b"a /"] * 2
    assert fwd.fast_requests == 1
    fwd.apply(parse_pools(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a", "route": "a"}],
                                                  stickysession="JSESSIONID"))))
    assert [(await wire.ask(request("/", "Cookie: JSESSIONID=s.a"))).body for _ in range(2)] \
        == [b"a /"] * 2
    assert fwd.fast_requests == 1  # sticky now: not the lane's
    fwd.apply(parse_pools(yaml.safe_dump(plain)))
    assert [(await wire.ask(request("/"))).body for _ in range(2)] == [b"a /"] * 2
    assert fwd.fast_requests == 3
    assert a.accepted == 1  # one connection through both reloads


@pytest.mark.parametrize("grace", ["5s", "100ms"], ids=["answered-in-grace", "cut-after-grace"])
async def test_member_removed_while_its_fast_lane_request_is_in_flight(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, grace: str) -> None:
    gate = asyncio.Event()

    async def a_holds(ask: Ask) -> bool:
        if ask.target == "/inflight":
            if grace == "100ms":
                await ask.reader.read()  # never answers: cut when the grace ends
                return False
            await asyncio.wait_for(gate.wait(), IO)
        return await named("a")(ask)

    a, b = await raw(a_holds), await raw(named("b"))
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                                       removalGrace=grace))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    assert [(await wire.ask(request("/"))).body for _ in range(2)] == [b"a /", b"b /"]
    await wire.send(request("/inflight"))  # a's turn, on its pooled connection
    await wait_for(lambda: len(a.seen) == 2)
    assert fwd.fast_requests == 1
    change = fwd.set_members("test", [m for m in fwd.pools["test"].spec.members if m.name == "b"])
    assert change["removed"] == ["a"]
    gate.set()
    reply = await wire.reply()
    if grace == "5s":
        # In-flight requests of a removed member finish within the grace...
        assert (reply.status, reply.body) == (200, b"a /inflight")
    else:
        # ... and past it they are cut; a GET is sent again, to a member that is still there.
        assert (reply.status, reply.body) == (200, b"b /inflight")
    await wait_for(lambda: 1 in a.ended)  # its connection is not kept
    assert [(await wire.ask(request("/"))).body for _ in range(3)] == [b"b /"] * 3
    assert a.requests() == ["GET /", "GET /inflight"]


async def test_shutdown_waits_for_a_fast_lane_request_in_flight(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    gate = asyncio.Event()

    async def held(ask: Ask) -> bool:
        if ask.target == "/inflight":
            await asyncio.wait_for(gate.wait(), IO)
        return await echo(ask)

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, held, None)
    assert (await wire.ask(request("/warm"))).status == 200
    await wire.send(request("/inflight"))
    await wait_for(lambda: len(backend.seen) == 2)
    assert fwd.fast_requests == 1
    closing = asyncio.create_task(proxy.server.close())
    await wait_for(lambda: proxy.server.server.closing)
    assert not closing.done()  # waiting for the request in flight
    gate.set()
    reply = await wire.reply()
    assert (reply.status, reply.body) == (200, b"GET /inflight 0")
    assert reply.header("Connection") == "close"
    assert await wire.rest() == b""
    await asyncio.wait_for(closing, IO)  # done when that connection closed, not at the grace's end


# --- the same decisions as the ordinary path ------------------------------------------------


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "ordinary"])
async def test_malformed_head_on_a_pooled_connection_is_the_same_502(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, fast_lane: bool) -> None:
    async def broken_second(ask: Ask) -> bool:
        if ask.nth == 1:
            return await echo(ask)
        ask.writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")
        return True

    backend = await raw(broken_second)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m"}], forcerecovery=False))
    fwd = proxy.server.forwarder
    fwd.fast_lane = fast_lane
    wire = await open_wire(proxy)
    assert (await wire.ask(request("/warm"))).status == 200
    reply = await wire.ask(request("/broken"))
    assert reply.status == 502 and b"malformed response from backend" in reply.body
    assert fwd.fast_requests == (1 if fast_lane else 0)
    member = proxy.member("m")
    assert flags(proxy, "m") == "E" and member.last_change.signal == "bad-response"
    await wait_for(lambda: proxy.connections("m").open == 0)
    # The client connection is still good: the next request is answered (503, no member).
    assert (await wire.ask(request("/next"))).status == 503


async def test_101_without_a_handshake_in_the_fast_lane_is_a_502(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    async def upgrades(ask: Ask) -> bool:
        if ask.target != "/up":
            return await echo(ask)
        ask.writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\n\r\nraw bytes")
        return True

    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, upgrades, None)
    assert (await wire.ask(request("/warm"))).status == 200
    reply = await wire.ask(request("/up"))
    assert reply.status == 502 and b"without completing a WebSocket handshake" in reply.body
    assert fwd.fast_requests == 1
    await wait_for(lambda: 1 in backend.ended)  # never pooled again
    reply = await wire.ask(request("/next"))
    assert (reply.status, reply.body) == (200, b"GET /next 0")
    assert backend.seen[-1].conn == 2


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "ordinary"])
async def test_hash_key_places_requests_as_the_ordinary_path_does(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, fast_lane: bool) -> None:
    members = [await raw(named(n)) for n in "abc"]
    proxy = await start_proxy(pool_doc([{"url": b.url, "name": n} for b, n in zip(members, "abc",
                                                                                     strict=True)],
                                       lbmethod="hash", hash={"on": "header", "name": "X-User"}))
    fwd = proxy.server.forwarder
    wire = await open_wire(proxy)
    users = [f"user-{i}" for i in range(12)]

    async def placement() -> list[str]:
        return [(await wire.ask(request("/", f"X-User: {u}"))).body.split()[0].decode() for u in users]

    first = await placement()  # opens a connection to each member it uses
    assert len(set(first)) > 1
    fwd.fast_lane = fast_lane
    before = fwd.fast_requests
    assert await placement() == first
    assert fwd.fast_requests - before == (len(users) if fast_lane else 0)


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "ordinary"])
async def test_failonstatus_answer_in_the_fast_lane_marks_the_member(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, fast_lane: bool) -> None:
    async def a_fails(ask: Ask) -> bool:
        if ask.target == "/down":
            ask.writer.write(response(503, b"a is down"))
            return True
        return await named("a")(ask)

    a, b = await raw(a_fails), await raw(named("b"))
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}],
                                       failonstatus=[503]))
    fwd = proxy.server.forwarder
    fwd.fast_lane = fast_lane
    wire = await open_wire(proxy)
    assert [(await wire.ask(request("/"))).body for _ in range(2)] == [b"a /", b"b /"]
    reply = await wire.ask(request("/down"))  # a's turn
    # The member's own answer is passed on (as httpd does), and the member is put in error.
    assert (reply.status, reply.body) == (503, b"a is down")
    assert fwd.fast_requests == (1 if fast_lane else 0)
    assert flags(proxy, "a") == "E" and proxy.member("a").last_change.signal == "failonstatus"
    assert [(await wire.ask(request("/"))).body for _ in range(3)] == [b"b /"] * 3


async def test_member_that_closes_after_its_answer_is_not_reused(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, caplog: pytest.LogCaptureFixture) -> None:
    """The member serves two requests per connection and says Connection: close on the second:
    that connection is never pooled, so the lane takes every other request, and nothing has to
    be sent twice."""
    caplog.set_level(logging.INFO, logger="balancerpool.proxy")

    async def two_per_connection(ask: Ask) -> bool:
        last = ask.nth == 2
        ask.writer.write(response(200, f"{ask.target} on {ask.conn}".encode(),
                                  *(["Connection: close"] if last else [])))
        return not last

    backend, proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, two_per_connection, None)
    replies = [await wire.ask(request(f"/r{i}")) for i in range(6)]
    assert [(r.status, r.body) for r in replies] == [(200, f"/r{i} on {i // 2 + 1}".encode())
                                                     for i in range(6)]
    assert all("connection" not in r.names for r in replies)  # the member's, not the client's
    assert fwd.fast_requests == 3
    assert backend.requests() == [f"GET /r{i}" for i in range(6)]  # each sent once
    assert not [r for r in caplog.records if "re-sending" in r.getMessage()]
    assert flags(proxy, "m") == "" and proxy.connections("m").open == 0


async def test_bodiless_post_delete_and_options_take_the_fast_lane(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire) -> None:
    backend, _proxy, fwd, wire = await _warmed(raw, start_proxy, open_wire, echo, None)
    assert (await wire.ask(request("/warm"))).status == 200
    asks = [request("/p", "Content-Length: 0", method="POST"), request("/d", method="DELETE"),
            request("/o", method="OPTIONS"), request("/p2", method="POST")]
    assert [(await wire.ask(a)).body for a in asks] == [b"POST /p 0", b"DELETE /d 0",
                                                        b"OPTIONS /o 0", b"POST /p2 0"]
    assert fwd.fast_requests == 4
    # A POST says it has no body (Content-Length: 0), as on the ordinary path; the others say
    # nothing.
    lengths = [a.headers.get("content-length") for a in backend.seen[1:]]
    assert lengths == ["0", None, None, "0"]


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast-lane", "ordinary"])
async def test_response_and_unsolicited_bytes_in_one_segment_never_reach_the_client(
        raw: StartRaw, start_proxy: Any, open_wire: OpenWire, fast_lane: bool) -> None:
    """tests/test_security.py's witness sends an unsolicited second response 50 ms after its
    answer; here it comes in the same segment as the answer. The client must get the member's
    answer intact (or a clean 502), never the injected head's fields or body, and the
    connection that carried them must not be pooled."""
    async def inject(ask: Ask) -> bool:
        if ask.target == "/inject":
            ask.writer.write(response(200, b"ok")
                             + b"HTTP/1.1 200 OK\r\nX-Evil: 1\r\nContent-Length: 6\r\n\r\nPOISON")
            return True
        return await echo(ask)

    backend = await raw(inject)
    proxy = await start_proxy(pool_doc([{"url": backend.url, "name": "m"}]))
    fwd = proxy.server.forwarder
    fwd.fast_lane = fast_lane
    wire = await open_wire(proxy)
    assert (await wire.ask(request("/warm"))).status == 200
    await wire.send(request("/inject", "Connection: close"))
    got = await wire.rest()
    assert fwd.fast_requests == (1 if fast_lane else 0)
    assert b"X-Evil" not in got and b"POISON" not in got, got
    assert got == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok" \
        or got.startswith(b"HTTP/1.1 502 "), got
    await wait_for(lambda: proxy.connections("m").open == 0)
    other = await open_wire(proxy)
    reply = await other.ask(request("/next"))
    assert (reply.status, reply.body) == (200, b"GET /next 0")
