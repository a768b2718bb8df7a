"""Hostile HTTP against a real proxy: refused with the right status and never forwarded.

The witness (tests/rawbackend.py, its own process) logs every byte it receives before parsing
anything, so "not forwarded" means not one byte reached a backend. Each refusal test also sends a
valid request afterwards and sees it arrive, so the witness is shown to be listening.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balancerpool.proxy.hardening import Limits

from .conftest import free_port, pool_doc, wait_for

HERE = Path(__file__).parent
IO = 5.0


@dataclass
class Witness:
    port: int
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entries(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]

    def received(self) -> str:
        return "".join(e["data"] for e in self.entries() if "data" in e)

    def requests(self) -> list[str]:
        return [e["request"] for e in self.entries() if "request" in e]

    def errors(self) -> list[str]:
        return [e["error"] for e in self.entries() if "error" in e]

    def clear(self) -> None:
        self.log.write_text("")


def start_witness(log: Path) -> Witness:
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(HERE / "rawbackend.py"), "--port", str(port),
                             "--log", str(log)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    return Witness(port, log, proc)


@pytest.fixture(scope="module")
def witness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Witness]:
    w = start_witness(tmp_path_factory.mktemp("witness") / "seen.log")
    try:
        yield w
    finally:
        w.proc.terminate()
        w.proc.wait(10)


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, then read everything until the proxy closes the connection (a refusal
    closes it; a request that should be served says ``Connection: close``). Never half-closed:
    a refusal must not depend on the client ending its side."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(1 << 20), IO) + await asyncio.wait_for(
            reader.read(), IO)
    finally:
        writer.close()


def statuses(raw: bytes) -> list[int]:
    """The status of each response in ``raw`` (the witness's bodies end in a bare LF)."""
    return [int(code) for code in re.findall(rb"(?:^|\n)HTTP/\d\.\d (\d{3}) ", raw)]


POST = b"POST /x HTTP/1.1\r\nHost: a\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"
GET = b"GET /x HTTP/1.1\r\nHost: a\r\n"
CLOSE = b"Connection: close\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"

#: (case, bytes, status). Every one must be answered with the status and reach no backend.
HOSTILE: list[tuple[str, bytes, int]] = [
    # Content-Length and Transfer-Encoding together: the classic CL.TE / TE.CL desync.
    ("cl-te", POST + b"Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED, 400),
    ("te-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n" + SMUGGLED, 400),
    # Obfuscated Transfer-Encoding.
    ("te-xchunked", POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-space-before-colon", POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-identity", POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    ("te-vertical-tab", POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n", 400),
    ("te-identity", POST + b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
    ("te-quoted", POST + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n', 400),
    ("te-twice", POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400),
    ("te-chunked-then-identity",
     POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n", 400),
    ("te-chunked-chunked", POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold-name", POST + b"X: y\r\n Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-obs-fold-value", POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-http10", b"POST /x HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    ("te-gzip-not-implemented", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    # Duplicate, conflicting or malformed Content-Length.
    ("cl-duplicate-same", POST + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd", 400),
    ("cl-conflicting", POST + b"Content-Length: 4\r\nContent-Length: 40\r\n\r\nabcd" + SMUGGLED, 400),
    ("cl-list", POST + b"Content-Length: 4, 4\r\n\r\nabcd", 400),
    ("cl-plus", POST + b"Content-Length: +4\r\n\r\nabcd", 400),
    ("cl-hex", POST + b"Content-Length: 0x4\r\n\r\nabcd", 400),
    ("cl-negative", POST + b"Content-Length: -1\r\n\r\nabcd", 400),
    ("cl-inner-space", POST + b"Content-Length: 4 4\r\n\r\nabcd", 400),
    ("cl-overflow", POST + b"Content-Length: 99999999999999999999999\r\n\r\nabcd", 400),
    ("cl-empty", POST + b"Content-Length: \r\n\r\nabcd", 400),
    # Invalid chunk sizes, extensions and trailers.
    ("chunk-size-not-hex", CHUNKED + b"zz\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-negative", CHUNKED + b"-1\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-overflow", CHUNKED + b"fffffffffffffffff4\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-0x", CHUNKED + b"0x4\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-trailing-space", CHUNKED + b"4 \r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-leading-space", CHUNKED + b" 4\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-size-bare-lf", CHUNKED + b"4\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-data-overrun", CHUNKED + b"4\r\nabcdXX0\r\n\r\n", 400),
    ("chunk-ext-empty", CHUNKED + b"4;\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-ext-open-quote", CHUNKED + b'4;a="b\r\nabcd\r\n0\r\n\r\n', 400),
    ("chunk-ext-nul", CHUNKED + b"4;a=\x00\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-cr", CHUNKED + b"4;a\rb\r\nabcd\r\n0\r\n\r\n", 400),
    ("chunk-ext-bare-lf", CHUNKED + b"4;a\nabcd\r\n0\r\n\r\n", 400),
    ("trailer-bad-name", CHUNKED + b"4\r\nabcd\r\n0\r\nX Y: z\r\n\r\n", 400),
    # Bare CR or LF.
    ("bare-cr-request-line", b"GET /x HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("bare-cr-in-value", GET + b"X: a\rb\r\n\r\n", 400),
    ("bare-lf-line-endings", b"GET /x HTTP/1.1\nHost: a\n\n", 400),
    ("bare-lf-in-value", GET + b"X: a\nb\r\n\r\n", 400),
    # Header names with spaces or odd bytes, values with control bytes.
    ("name-space", GET + b"Foo Bar: x\r\n\r\n", 400),
    ("name-nul", GET + b"Foo\x00: x\r\n\r\n", 400),
    ("name-del", GET + b"Foo\x7f: x\r\n\r\n", 400),
    ("name-at-sign", GET + b"Foo@: x\r\n\r\n", 400),
    ("name-empty", GET + b": x\r\n\r\n", 400),
    ("name-high-byte", GET + b"F\xe9o: x\r\n\r\n", 400),
    ("name-tab-before-colon", GET + b"Foo\t: x\r\n\r\n", 400),
    ("name-no-colon", GET + b"XYZ\r\n\r\n", 400),
    ("value-nul", GET + b"X: a\x00b\r\n\r\n", 400),
    ("value-control", GET + b"X: a\x01b\r\n\r\n", 400),
    ("value-del", GET + b"X: a\x7fb\r\n\r\n", 400),
    # Request lines.
    ("line-trailing-garbage", b"GET /x HTTP/1.1 x\r\nHost: a\r\n\r\n", 400),
    ("target-nul", b"GET /\x00 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-space", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-high-byte", b"GET /\xff HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-asterisk-not-options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("target-authority-form", b"GET a:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("method-lowercase", b"get /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("method-unknown", b"FOO /x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("version-2", b"GET /x HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    ("version-0.9", b"GET /x\r\n\r\n", 505),
    ("version-1.10", b"GET /x HTTP/1.10\r\nHost: a\r\n\r\n", 400),
    # Host.
    ("host-missing", b"GET /x HTTP/1.1\r\n\r\n", 400),
    ("host-twice", GET + b"Host: b\r\n\r\n", 400),
    ("host-space", b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    ("host-slash", b"GET /x HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    ("host-userinfo", b"GET /x HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
    # Absolute form that disagrees with Host, or carries userinfo; CONNECT.
    ("absolute-host-mismatch", b"GET http://evil.example/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("absolute-userinfo", b"GET http://u@a/x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("connect", b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n", 405),
    ("connect-origin-form", b"CONNECT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\n\r\n" + SMUGGLED,
     405),
    # Dot-segments and backslashes: a backend resolving them would escape the route's prefix.
    ("dot-dot", b"GET /x/../admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("dot", b"GET /x/./admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("dot-dot-encoded", b"GET /x/%2e%2E/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("dot-dot-semicolon", b"GET /x/..;/admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    ("backslash", b"GET /x/..\\admin HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    # A bad chunk behind Expect: 100-continue (sent without waiting) is refused before anything
    # goes out too.
    ("chunk-size-not-hex-expect", POST + b"Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\nabcd\r\n0\r\n\r\n", 400),
]


@pytest.mark.parametrize(("data", "expected"), [pytest.param(d, s, id=c) for c, d, s in HOSTILE])
async def test_hostile_request_is_refused_and_never_forwarded(
        witness: Witness, start_proxy: Any, data: bytes, expected: int) -> None:
    proxy = await start_proxy(pool_doc([{"url": witness.url}]))
    port = proxy.server.addresses[0][1]
    witness.clear()
    raw = await exchange(port, data)
    assert statuses(raw) == [expected], raw[:200]
    assert witness.received() == ""
    # A valid request still gets through, so the witness was listening.
    raw = await exchange(port, GET + CLOSE)
    assert statuses(raw) == [200]
    assert witness.requests() == ["GET /x"]


@pytest.mark.parametrize(("data", "expected"), [pytest.param(d, s, id=c) for c, d, s in HOSTILE])
async def test_hostile_request_after_a_valid_one_on_the_same_connection(
        witness: Witness, start_proxy: Any, data: bytes, expected: int) -> None:
    """Pipelined behind a valid request with the same Host (what the front end caches between
    requests): refused all the same, and only the valid one may reach the backend. The fast
    front end answers the valid one first; aiohttp's parser reads the whole packet first, so
    what it refuses itself takes the valid request down with it."""
    proxy = await start_proxy(pool_doc([{"url": witness.url}]))
    witness.clear()
    raw = await exchange(proxy.server.addresses[0][1], GET + b"\r\n" + data)
    answered = statuses(raw)
    if proxy.server.frontend == "fast":
        assert answered == [200, expected]
    else:
        assert answered in ([200, expected], [expected])
    assert witness.requests() == ["GET /x"] * answered.count(200)
    assert "smuggled" not in witness.received()
    assert witness.errors() == []


async def test_absolute_form_never_makes_an_open_proxy(
        witness: Witness, start_proxy: Any, tmp_path: Path) -> None:
    """An absolute-form target only names the virtual host, like Host: the request goes to the
    pool's members or nowhere, never to the host it names."""
    foreign = start_witness(tmp_path / "foreign.log")
    try:
        served = pool_doc([{"url": witness.url}], name="app",
                          routes=[{"path": "/", "hosts": ["app.example"]}])
        proxy = await start_proxy(served)
        port = proxy.server.addresses[0][1]
        witness.clear()
        target = f"127.0.0.1:{foreign.port}".encode()
        foreign_get = b"GET http://%s/secret HTTP/1.1\r\nHost: %s\r\n%s" % (target, target, CLOSE)
        raw = await exchange(port, foreign_get)
        assert statuses(raw) == [404]
        raw = await exchange(port, b"GET https://%s/secret HTTP/1.1\r\nHost: %s\r\n%s"
                             % (target, target, CLOSE))
        assert statuses(raw) == [404]
        assert foreign.received() == "" and witness.received() == ""
        # A host the pool serves, in absolute form: served by its members, as in origin form.
        raw = await exchange(port, b"GET http://APP.example/ok HTTP/1.1\r\nHost: app.example\r\n" + CLOSE)
        assert statuses(raw) == [200]
        assert witness.requests() == ["GET /ok"]
        # A catch-all route serves any Host; in absolute form too, still only by its members.
        proxy = await start_proxy(pool_doc([{"url": witness.url}]))
        raw = await exchange(proxy.server.addresses[0][1], foreign_get)
        assert statuses(raw) == [200]
        assert witness.requests() == ["GET /ok", "GET /secret"]
        assert foreign.received() == ""
    finally:
        foreign.proc.terminate()
        foreign.proc.wait(10)


# --- limits: configurable, answered 414 / 431 / 400 ----------------------------------------

SMALL = Limits(max_request_line=200, max_header_size=100, max_headers=5, max_header_section=400)


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
@pytest.mark.parametrize(("data", "expected"), [
    pytest.param(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, id="request-line"),
    pytest.param(GET + b"X: " + b"v" * 100 + b"\r\n\r\n", 431, id="header-field"),
    pytest.param(GET + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 94) for i in range(4)) + b"\r\n", 431,
                 id="header-section"),
    pytest.param(GET + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n", 400, id="header-count"),
])
async def test_configured_limits(witness: Witness, start_proxy: Any, data: bytes, expected: int) -> None:
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=SMALL)
    port = proxy.server.addresses[0][1]
    witness.clear()
    assert statuses(await exchange(port, data)) == [expected]
    assert witness.received() == ""
    # At the limits, served: a 200-byte request line, 4 fields of which one is 100 bytes.
    line = b"GET /" + b"a" * (200 - 14) + b" HTTP/1.1\r\n"
    ok = line + b"Host: a\r\nX: " + b"v" * 95 + b"\r\nY: 1\r\nZ: 2\r\n" + CLOSE
    assert statuses(await exchange(port, ok)) == [200]
    assert len(witness.requests()) == 1


# --- slow clients ----------------------------------------------------------------------------

SLOW = Limits(header_timeout=0.5, body_timeout=0.5, body_min_rate=1000, keepalive_timeout=30.0)


async def _served_meanwhile(port: int, stop: asyncio.Event) -> int:
    """Requests of a well-behaved client, on one keep-alive connection, until ``stop``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    served = 0
    try:
        while not stop.is_set():
            writer.write(GET + b"\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            served += 1
            await asyncio.sleep(0.02)
    finally:
        writer.close()
    return served


async def _drip(writer: asyncio.StreamWriter, reader: asyncio.StreamReader, pieces: list[bytes],
                every: float) -> bytes:
    """Send ``pieces`` one per ``every`` seconds until the proxy answers and closes; return what
    it sent. Bounded: at most len(pieces) * every seconds."""
    for piece in pieces:
        try:
            writer.write(piece)
            await writer.drain()
        except ConnectionError:
            break
        try:
            data = await asyncio.wait_for(reader.read(1 << 16), every)
        except TimeoutError:
            continue
        return data + await asyncio.wait_for(reader.read(), IO)
    return b""


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
@pytest.mark.parametrize(("start", "pieces", "expected"), [
    # Slowloris: a head that never ends, one field every 0.1 s.
    pytest.param(GET, [b"X-%d: v\r\n" % i for i in range(50)], 408, id="slowloris-head"),
    # A small body (buffered for retries) sent at 20 bytes/s: 408, nothing forwarded.
    pytest.param(POST + b"Content-Length: 1000\r\n\r\n", [b"x" * 2] * 50, 408, id="slow-small-body"),
    # A large body (streamed) at 20 bytes/s: 408; the member's connection is cut mid-body.
    pytest.param(POST + b"Content-Length: 100000\r\n\r\n", [b"x" * 2] * 50, 408, id="slow-large-body"),
    # A chunked body that stalls after its first chunk.
    pytest.param(CHUNKED + b"2\r\nxx\r\n", [b""] * 50, 408, id="stalled-chunked-body"),
])
async def test_slow_clients_are_cut_while_others_are_served(
        witness: Witness, start_proxy: Any, start: bytes, pieces: list[bytes], expected: int) -> None:
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=SLOW)
    port = proxy.server.addresses[0][1]
    witness.clear()
    stop = asyncio.Event()
    others = asyncio.create_task(_served_meanwhile(port, stop))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(start)
        raw = await _drip(writer, reader, pieces, 0.1)  # at most 5 s, ten timeouts
    finally:
        writer.close()
        stop.set()
    assert statuses(raw) == [expected] and b"connection: close" in raw.lower()
    assert await others > 0
    # No request of the slow client completed at a backend.
    assert witness.requests().count("POST /x") == 0
    assert all(r == "GET /x" for r in witness.requests())


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
async def test_silent_connection_closed_after_header_timeout(witness: Witness, start_proxy: Any) -> None:
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=SLOW)
    reader, writer = await asyncio.open_connection(*proxy.server.addresses[0])
    try:
        # keepalive_timeout is 30 s: only header_timeout can close it within IO.
        assert await asyncio.wait_for(reader.read(), IO) == b""
    finally:
        writer.close()


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
async def test_slow_body_above_min_rate_is_served(witness: Witness, start_proxy: Any) -> None:
    """body_min_rate earns time: 100 bytes every 0.05 s (2000 B/s, over the 1000 B/s asked
    for) keeps going well past body_timeout."""
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=SLOW)
    witness.clear()
    reader, writer = await asyncio.open_connection(*proxy.server.addresses[0])
    try:
        writer.write(POST + b"Content-Length: 3000\r\n\r\n")
        for _ in range(30):  # 1.5 s, three times body_timeout
            writer.write(b"y" * 100)
            await writer.drain()
            await asyncio.sleep(0.05)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IO)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert witness.requests() == ["POST /x"]


@pytest.mark.parametrize("start_proxy", ["aiohttp"], indirect=True)
@pytest.mark.parametrize("data", [
    pytest.param(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", id="request-line"),
    pytest.param(GET + b"X: " + b"v" * 200 + b"\r\n\r\n", id="header-field"),
    pytest.param(GET + b"".join(b"X-%d: v\r\n" % i for i in range(5)) + b"\r\n", id="header-count"),
])
async def test_aiohttp_front_end_applies_the_line_field_and_count_limits(
        witness: Witness, start_proxy: Any, data: bytes) -> None:
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=SMALL)
    witness.clear()
    assert statuses(await exchange(proxy.server.addresses[0][1], data)) == [400]
    assert witness.received() == ""


async def test_pipelined_heads_are_not_counted_as_one_header_section(
        witness: Witness, start_proxy: Any) -> None:
    """120 pipelined requests in one write (76 KB, more than max_header_section), then a
    partial head: each head is counted on its own."""
    proxy = await start_proxy(pool_doc([{"url": witness.url}]))
    witness.clear()
    one = GET + b"X-Pad: " + b"p" * 600 + b"\r\n\r\n"
    raw = await exchange(proxy.server.addresses[0][1], one * 120 + GET + CLOSE)
    assert statuses(raw) == [200] * 121
    assert len(witness.requests()) == 121


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
async def test_endless_trailer_section_is_cut(witness: Witness, start_proxy: Any) -> None:
    """Trailers are not forwarded, and bytes that carry no body data are bounded by
    max_header_section: 431, not memory growing until the body timeout."""
    proxy = await start_proxy(pool_doc([{"url": witness.url}]), limits=Limits(max_header_section=4096))
    reader, writer = await asyncio.open_connection(*proxy.server.addresses[0])
    try:
        writer.write(CHUNKED + b"1\r\na\r\n0\r\nX-Trailer: ")
        raw = await _drip(writer, reader, [b"t" * 1024] * 40, 0.05)
    finally:
        writer.close()
    assert statuses(raw) == [431]


@pytest.mark.parametrize("start_proxy", ["fast"], indirect=True)
async def test_client_that_never_reads_is_cut_and_frees_the_member(
        backends: Any, start_proxy: Any) -> None:
    """A client that reads nothing of a large response holds a member connection only for
    send_timeout: then it is cut, and with max 1 connection the next client is served."""
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a", "pool": {"max": 1, "acquire": "10s"}}]),
                              limits=Limits(send_timeout=0.5))
    host, port = proxy.server.addresses[0]
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    try:
        sock.sendall(b"GET /big?size=67108864 HTTP/1.1\r\nHost: a\r\n\r\n")
        await wait_for(lambda: proxy.member("a").busy == 1)
        await wait_for(lambda: proxy.member("a").busy == 0, IO)  # cut after send_timeout
        raw = await exchange(port, GET + CLOSE)
        assert statuses(raw) == [200]
    finally:
        sock.close()


async def test_101_without_a_websocket_handshake_is_a_502(backends: Any, start_proxy: Any) -> None:
    """A member's 101 opens a tunnel only when it completes this request's WebSocket handshake;
    any other 101 would be a raw tunnel past the routes."""
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a"}]))
    request = (b"GET /status/101 HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    raw = await exchange(proxy.server.addresses[0][1], request + GET + CLOSE)
    assert statuses(raw)[0] == 502


async def test_unsolicited_bytes_from_a_member_never_answer_another_request(
        witness: Witness, start_proxy: Any) -> None:
    """The witness sends a second, unasked-for response after /extra. The pooled connection it
    arrives on is closed, so the next request gets its own answer, never the injected one."""
    proxy = await start_proxy(pool_doc([{"url": witness.url}]))
    port = proxy.server.addresses[0][1]
    assert b"GET /extra" in await exchange(port, b"GET /extra HTTP/1.1\r\nHost: a\r\n" + CLOSE)
    # The injected bytes arrive on the pooled connection, which is closed for them.
    pools = proxy.server.forwarder.pools["test"].connections.values()
    await wait_for(lambda: all(conns.open == 0 for conns in pools))
    for _ in range(3):
        raw = await exchange(port, GET + CLOSE)
        assert raw.endswith(b"GET /x\n") and b"POISON" not in raw
