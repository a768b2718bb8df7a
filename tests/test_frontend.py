"""The fast front end on the wire: raw sockets against a real proxy and real backend processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from balancerpool.proxy import frontend
from balancerpool.proxy.hardening import DEFAULT_LIMITS, Limits
from balancerpool.proxy.messages import Body, ClientStream, RequestHead, Response

from .conftest import Backend, Backends, pool_doc, wait_for

#: start_proxy with the fast front end only (conftest.py runs both by default).
FRONTENDS = ("fast",)

IO = 5.0  # bound on every socket wait


class Client:
    """One raw client connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, proxy: Any) -> Client:
        host, port = proxy.server.addresses[0]
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One response: status, headers (lower-case names), body (Content-Length, chunked or
        up to EOF)."""
        return await asyncio.wait_for(self._response(head_only), IO)

    async def _response(self, head_only: bool) -> tuple[int, dict[str, str], bytes]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                assert name.lower() not in headers, f"{name} twice"
                headers[name.lower()] = value.strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, await self.reader.readexactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self.reader.readexactly(size + 2)
                if size == 0:
                    return status, headers, body
                body += chunk[:-2]
        return status, headers, await self.reader.read()

    async def at_eof(self) -> bool:
        """True when the proxy closed the connection (after what was already read)."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), IO)
        except ConnectionResetError:
            return True
        return data == b""

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    opened: list[Client] = []
    yield opened
    for client in opened:
        client.close()


async def proxy_for(start_proxy: Any, backend: Backend, **kw: Any) -> Any:
    return await start_proxy(pool_doc([{"url": backend.url, "name": backend.name}],
                                      routes=[{"path": "/"}]), **kw)


async def connect(proxy: Any, clients: list[Client]) -> Client:
    client = await Client.open(proxy)
    clients.append(client)
    return client


async def test_pipelined_requests_answered_in_order(backends: Backends, start_proxy: Any,
                                                    clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    # The first is slow, so the second waits in the queue behind it.
    await client.send(b"GET /slow?s=0.2 HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"GET /status/202 HTTP/1.1\r\nHost: x\r\n\r\n"
                      b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    first = await client.response()
    second = await client.response()
    third = await client.response()
    assert (first[0], first[2]) == (200, b"a\n")
    assert (second[0], second[2]) == (202, b"a\n")
    assert third[0] == 200 and json.loads(third[2])["size"] == 5
    assert [r["path"] for r in a.requests()] == ["/slow?s=0.2", "/status/202", "/upload"]


async def test_http10_with_and_without_keep_alive(backends: Backends, start_proxy: Any,
                                                  clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await client.response()
    assert (status, body) == (200, b"a\n")
    assert headers["connection"] == "keep-alive" and headers["content-length"] == "2"
    # The same connection serves a plain HTTP/1.0 request, then closes.
    await client.send(b"GET / HTTP/1.0\r\n\r\n")
    status, headers, body = await client.response()
    assert (status, body) == (200, b"a\n")
    assert headers["connection"] == "close"
    assert await client.at_eof()


async def test_http10_chunked_response_is_close_delimited(backends: Backends, start_proxy: Any,
                                                          clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"GET /big?size=100000&chunked=1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    status, headers, body = await client.response()
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    assert status == 200 and len(body) == 100000  # read up to EOF


async def test_connection_close(backends: Backends, start_proxy: Any,
                                clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await client.response()
    assert status == 200 and "connection" not in headers  # HTTP/1.1: keep-alive by default
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    status, headers, body = await client.response()
    assert (status, body, headers["connection"]) == (200, b"a\n", "close")
    assert await client.at_eof()


async def test_head_keeps_content_length_and_sends_no_body(backends: Backends, start_proxy: Any,
                                                           clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await client.response(head_only=True)
    assert status == 200 and headers["content-length"] == "2"
    # Had a body been written, this response would start with it.
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.response())[::2] == (200, b"a\n")


async def test_head_of_a_local_response(start_proxy: Any, clients: list[Client]) -> None:
    proxy = await start_proxy(pool_doc([], routes=[{"path": "/app"}]))
    client = await connect(proxy, clients)
    await client.send(b"HEAD /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await client.response(head_only=True)
    assert status == 404 and int(headers["content-length"]) > 0
    await client.send(b"GET /elsewhere HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await client.response()
    assert status == 404 and body.startswith(b"No route for /elsewhere")


async def test_chunked_request_body(backends: Backends, start_proxy: Any,
                                    clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    pieces = [b"x" * 10, b"y" * 70000, b"z"]
    await client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in pieces:
        await client.send(b"%x\r\n%b\r\n" % (len(piece), piece))
    await client.send(b"0\r\n\r\n")
    status, _, body = await client.response()
    result = json.loads(body)
    assert status == 200 and result["chunked"] == "chunked"
    assert result["size"] == 70011
    assert result["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()


async def test_expect_100_continue(backends: Backends, start_proxy: Any,
                                   clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                      b"Expect: 100-continue\r\n\r\n")
    # The client waits for the interim response before it sends the body.
    interim = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), IO)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    await client.send(b"data")
    status, _, body = await client.response()
    assert status == 200 and json.loads(body)["size"] == 4


async def test_unread_body_small_is_discarded_large_closes(start_proxy: Any,
                                                           clients: list[Client]) -> None:
    # No route: the core answers 404 without reading the body.
    proxy = await start_proxy(pool_doc([], routes=[{"path": "/app"}]))
    client = await connect(proxy, clients)
    await client.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
    status, headers, _ = await client.response()
    assert status == 404 and "connection" not in headers
    await client.send(b"z" * 1000)  # arrives after the response: thrown away
    await client.send(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await client.response()
    assert status == 404 and body.startswith(b"No route for /y")
    # Too much left to read: the connection closes after the response.
    await client.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
    await client.send(b"z" * 100000)
    status, headers, _ = await client.response()
    assert status == 404 and headers["connection"] == "close"
    # An Expect: 100-continue body never asked for: it may never come, so close too.
    other = await connect(proxy, clients)
    await other.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
    status, headers, _ = await other.response()
    assert status == 404 and headers["connection"] == "close"
    assert await other.at_eof()


async def test_malformed_request_is_400_and_never_forwarded(backends: Backends, start_proxy: Any,
                                                            clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    for bad in (b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
                b"G\x01T / HTTP/1.1\r\n\r\n",
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"):
        client = await connect(proxy, clients)
        await client.send(bad)
        status, headers, body = await client.response()
        assert status == 400 and headers["connection"] == "close", bad
        assert body.startswith(b"400 Bad Request")
        assert await client.at_eof()
    # A bad request pipelined behind a good one: the good one is answered first.
    client = await connect(proxy, clients)
    await client.send(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nBROKEN\r\n\r\n")
    assert (await client.response())[0] == 200
    assert (await client.response())[0] == 400
    assert await client.at_eof()
    assert [r["path"] for r in a.requests()] == ["/first"]


async def test_oversized_request_line_is_414(backends: Backends, start_proxy: Any,
                                             clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    # Sent in pieces, as a slow client would.
    await client.send(b"GET /" + b"a" * 5000)
    await client.send(b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await client.response()
    assert status == 414 and headers["connection"] == "close"
    # Just under the limit is fine: "GET " + target + " HTTP/1.1" is 8190 bytes.
    client = await connect(proxy, clients)
    await client.send(b"GET /" + b"b" * (8190 - 14) + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.response())[0] == 200
    assert len(a.requests()) == 1


async def test_too_many_fields_400_too_large_431(backends: Backends, start_proxy: Any,
                                                 clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    # Host plus max_headers fields is one too many.
    many = b"".join(b"X-F%d: v\r\n" % i for i in range(DEFAULT_LIMITS.max_headers))
    large = b"X-Big: " + b"v" * DEFAULT_LIMITS.max_header_size + b"\r\n"
    for fields, expected in ((many, 400), (large, 431)):
        client = await connect(proxy, clients)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, headers, _ = await client.response()
        assert status == expected and headers["connection"] == "close"
        assert await client.at_eof()
    # An endless field, never finished: refused once the head passes the bound.
    client = await connect(proxy, clients)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
    for _ in range(DEFAULT_LIMITS.max_header_section // 65536 + 2):
        await client.send(b"v" * 65536)  # a lingering close: still read (and dropped)
    status, headers, _ = await client.response()
    assert status == 431 and headers["connection"] == "close"
    assert a.requests() == []


async def test_upgrade_request_is_an_ordinary_request(backends: Backends, start_proxy: Any,
                                                      clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    await client.send(b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                      b"Upgrade: websocket\r\n\r\n"
                      b"POST /upload HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                      b"Content-Length: 3\r\n\r\nabc"
                      b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await client.response()
    assert status == 200 and json.loads(body)["path"] == "/headers"  # answered in HTTP...
    status, _, body = await client.response()
    assert status == 200 and json.loads(body)["size"] == 3  # the body llhttp skipped
    assert (await client.response())[::2] == (200, b"a\n")  # ...so HTTP goes on


class EchoWebSocketBackend:
    """Answers a WebSocket handshake with 101, then sends back what it gets, upper-cased."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.heads: list[str] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1"))
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        while data := await reader.read(65536):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


HANDSHAKE = (b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def read_exactly_or_eof(client: Client, size: int) -> bytes:
    got = b""
    while len(got) < size:
        data = await asyncio.wait_for(client.reader.read(size - len(got)), IO)
        if not data:
            break
        got += data
    return got


@contextlib.asynccontextmanager
async def stand_in_core(handle: Any) -> AsyncIterator[tuple[str, int]]:
    """The fast front end on a free port, with ``handle`` in place of the core: its address."""
    server = frontend.HttpServer(handle)
    listener = await asyncio.get_running_loop().create_server(server, "127.0.0.1", 0)
    try:
        yield listener.sockets[0].getsockname()[:2]
    finally:
        listener.close()
        await server.shutdown(1.0)


async def _ok() -> AsyncIterator[bytes]:
    yield b"ok"


async def test_tunnel_runs_the_responses_upgrade(clients: list[Client]) -> None:
    """The front end's half of a WebSocket, against a stand-in core: a 101 whose Response
    carries ``upgrade`` (here an upper-casing echo) gets the client's raw stream."""
    finished: list[bool] = []

    async def echo(stream: ClientStream) -> None:
        while data := await stream.read():
            await stream.write(data.upper())
        stream.close()

    async def handle(head: RequestHead, body: Body) -> Response:
        if head.path == "/plain":
            return Response(200, "OK", [], 2, _ok, finished.append)
        return Response(101, "Switching Protocols", [("Upgrade", "websocket"),
                                                     ("Connection", "Upgrade")], None,
                        finish=finished.append, upgrade=echo)

    async with stand_in_core(handle) as (host, port):
        client = Client(*await asyncio.open_connection(host, port))
        clients.append(client)
        await client.send(HANDSHAKE + b"early ")  # held until the answer, then tunnelled
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), IO)
        assert head == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\n\r\n")
        await client.send(b"hello")
        assert await read_exactly_or_eof(client, 11) == b"EARLY HELLO"
        client.writer.write_eof()  # the client is done: the tunnel ends, then finish(True)
        assert await client.at_eof()
        await wait_for(lambda: finished == [True])
        # An Upgrade request answered in plain HTTP: the held bytes are the next request.
        plain = Client(*await asyncio.open_connection(host, port))
        clients.append(plain)
        await plain.send(HANDSHAKE.replace(b"/chat", b"/plain") + b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await plain.response())[::2] == (200, b"ok")
        assert (await plain.response())[::2] == (200, b"ok")
        await wait_for(lambda: finished == [True, True, True])
        # A 101 for a request that asked for no upgrade: nothing to tunnel, the connection is cut.
        other = Client(*await asyncio.open_connection(host, port))
        clients.append(other)
        await other.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await other.at_eof()
        await wait_for(lambda: finished == [True, True, True, False])


@pytest.mark.parametrize(("request_head", "version", "kept"), [
    (b"GET /v HTTP/1.1\r\nHost: x\r\n\r\n", (1, 1), True),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (1, 1), False),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nconnection: keep-alive\r\n\r\n", (1, 1), True),
    (b"GET /v HTTP/1.0\r\n\r\n", (1, 0), False),
    (b"GET /v HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", (1, 0), True),
    (b"GET /v HTTP/1.0\r\nCONNECTION: Keep-Alive\r\n\r\n", (1, 0), True),
    # llhttp reads the obsolete Proxy-Connection as it reads Connection
    (b"GET /v HTTP/1.0\r\nProxy-Connection: keep-alive\r\n\r\n", (1, 0), True),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nProxy-Connection: close\r\n\r\n", (1, 1), False),
    (b"GET /v HTTP/1.1\r\nHost: x\r\nUser-Agent: close\r\n\r\n", (1, 1), True),
])
async def test_request_version_and_keep_alive(clients: list[Client], request_head: bytes,
                                              version: tuple[int, int], kept: bool) -> None:
    """The version a request head gives the core, whether or not it is read off the parser
    (HTTP/1.1 without a Connection field is inferred from llhttp's keep-alive answer)."""
    seen: list[tuple[int, int]] = []

    async def handle(head: RequestHead, body: Body) -> Response:
        seen.append(head.version)
        return Response(200, "OK", [], 2, _ok, lambda ok: None)

    async with stand_in_core(handle) as (host, port):
        client = Client(*await asyncio.open_connection(host, port))
        clients.append(client)
        for _ in range(2 if kept else 1):  # a kept connection serves the same request again
            await client.send(request_head)
            status, headers, body = await client.response()
            assert (status, body) == (200, b"ok")
        assert seen == [version] * len(seen)
        assert headers.get("connection") == (None if version == (1, 1) and kept
                                             else "keep-alive" if kept else "close")
        if not kept:
            assert await client.at_eof()


async def test_websocket_tunnel(start_proxy: Any, clients: list[Client]) -> None:
    backend = EchoWebSocketBackend()
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "ws"}]))
        client = await connect(proxy, clients)
        # Bytes sent before the 101 are held, then go through the tunnel.
        await client.send(HANDSHAKE + b"early ")
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), IO)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Upgrade: websocket" in head and b"Connection: close" not in head
        assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        assert "upgrade: websocket" in backend.heads[0].lower()
        await client.send(b"hello")
        assert await read_exactly_or_eof(client, 11) == b"EARLY HELLO"
        assert proxy.member("ws").busy == 1  # a tunnel counts as busy
        client.writer.close()  # the client leaves: the tunnel ends on both sides
        await wait_for(lambda: proxy.member("ws").busy == 0)
    finally:
        await backend.close()


async def test_aiohttp_front_end_refuses_upgrades(start_proxy: Any) -> None:
    from balancerpool.proxy.model import parse_pools
    from balancerpool.proxy.server import ProxyServer

    backend = EchoWebSocketBackend()
    server = ProxyServer(None, ("127.0.0.1", 0),
                         parse_pools(json.dumps(pool_doc([{"url": await backend.start(), "name": "ws"}]))),
                         frontend="aiohttp")
    try:
        await server.start()
        host, port = server.addresses[0]
        client = Client(*await asyncio.open_connection(host, port))
        await client.send(HANDSHAKE)
        status, _, body = await client.response()
        assert status == 501 and b"fast front end" in body
        client.close()
    finally:
        await server.close()
        await backend.close()


async def test_client_disconnect_mid_response(backends: Backends, start_proxy: Any,
                                              clients: list[Client],
                                              caplog: pytest.LogCaptureFixture) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    caplog.set_level(logging.DEBUG, logger="balancerpool.proxy")
    client = await connect(proxy, clients)
    await client.send(b"GET /big?size=50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(client.reader.readexactly(100000), IO)
    client.writer.transport.abort()
    # finish(False) ran: the member is not busy any more and its connection was not reused.
    await wait_for(lambda: proxy.member("a").busy == 0 and proxy.connections("a").open == 0)
    assert not [r for r in caplog.records if r.levelno > logging.DEBUG]
    # The next request is served as usual.
    client = await connect(proxy, clients)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.response())[::2] == (200, b"a\n")


class TruncatingBackend:
    """Announces 1000 bytes, sends 10 and closes."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_upstream_failure_mid_body_aborts_the_client(start_proxy: Any, clients: list[Client],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    backend = TruncatingBackend()
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "t"}]))
        client = await connect(proxy, clients)
        await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(client.reader.readuntil(b"\r\n\r\n"), IO)
        assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 1000" in head
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await asyncio.wait_for(client.reader.readexactly(1000), IO)
        # "failed mid-response" (UpstreamError from chunks()) or, while upstream.py ends the
        # body early on EOF, the front end's own check of Content-Length.
        assert any(r.levelno == logging.WARNING and "member t" in r.getMessage()
                   for r in caplog.records)
    finally:
        await backend.close()


async def test_idle_keep_alive_connection_closed_after_timeout(
        backends: Backends, start_proxy: Any, clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a, limits=Limits(keepalive_timeout=0.3))
    loop = asyncio.get_running_loop()
    client = await connect(proxy, clients)
    await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await client.response())[0] == 200
    idle_from = loop.time()
    assert await client.at_eof()
    assert loop.time() - idle_from >= 0.25
    # A connection that never sends anything is closed the same way.
    silent = await connect(proxy, clients)
    assert await silent.at_eof()


async def test_close_finishes_requests_in_flight_and_drops_idle_connections(
        backends: Backends, start_proxy: Any, clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    idle = await connect(proxy, clients)
    await idle.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await idle.response())[0] == 200
    busy = await connect(proxy, clients)
    await busy.send(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_for(lambda: proxy.member("a").busy == 1)
    closing = asyncio.create_task(proxy.server.close())
    assert await idle.at_eof()  # at once, while the slow request is still running
    assert not closing.done()
    status, headers, body = await busy.response()
    assert (status, body, headers["connection"]) == (200, b"a\n", "close")
    await asyncio.wait_for(closing, IO)


async def test_slow_client_backpressure(backends: Backends, start_proxy: Any,
                                        clients: list[Client]) -> None:
    a = backends.start("a")
    proxy = await proxy_for(start_proxy, a)
    client = await connect(proxy, clients)
    size = 30_000_000
    await client.send(b"GET /big?size=%d&chunked=1 HTTP/1.1\r\nHost: x\r\n\r\n" % size)
    (conn,) = proxy.server.server.connections
    # The client reads nothing: once the socket buffers are full the proxy stops writing (and so
    # stops reading the backend) instead of queueing the body in memory.
    await wait_for(lambda: conn._write_paused, timeout=IO)
    assert conn._transport.get_write_buffer_size() < 1024 * 1024
    status, _, body = await client.response()
    assert status == 200 and len(body) == size


async def test_front_end_choice(start_proxy: Any) -> None:
    from balancerpool.proxy import server
    from balancerpool.proxy.cli import build_parser

    proxy = await start_proxy(pool_doc([], routes=[{"path": "/app"}]))
    assert proxy.server.frontend == "fast" and isinstance(proxy.server.server, frontend.HttpServer)
    assert server.ProxyServer(None, ("127.0.0.1", 0), []).frontend == server.DEFAULT_FRONTEND == "fast"
    for command in (["proxy", "pool.yaml"], ["demo"]):
        assert build_parser().parse_args(command).frontend == "fast"
        assert build_parser().parse_args([*command, "--frontend", "aiohttp"]).frontend == "aiohttp"
    other = server.ProxyServer(None, ("127.0.0.1", 0), [], frontend="aiohttp")
    assert other.frontend == "aiohttp" and not isinstance(other.server, frontend.HttpServer)
    with pytest.raises(ValueError, match="unknown front end"):
        server.ProxyServer(None, ("127.0.0.1", 0), [], frontend="h2o")
