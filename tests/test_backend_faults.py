"""Broken and hostile backends: the client gets a clean answer, the member gets the blame."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from balancerpool.proxy.scheduling import bits_to_flags

from .conftest import get, pool_doc

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedBackend:
    """Reads a request head, then behaves as the script says."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
                await self.script(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def malformed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def oversized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()


async def too_many_fields(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    fields = b"".join(b"X-%d: 1\r\n" % i for i in range(300))
    writer.write(b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 2\r\n\r\nok")
    await writer.drain()


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(30)


async def drip_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"z" * 100:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.transport.abort()


@pytest.mark.parametrize(("script", "expected"), [
    (malformed, "malformed response from backend"),
    (oversized, "response head over 64 KiB or 256 fields"),
    (too_many_fields, "response head over 64 KiB or 256 fields"),
])
async def test_bad_response_head_is_a_clean_502_and_marks_the_member(
        script: Script, expected: str, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    backend = ScriptedBackend(script)
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "bad"}],
                                           forcerecovery=False))
        status, text, _ = await get(client, proxy.url + "/")
        assert status == 502
        assert expected in text
        member = proxy.member("bad")
        assert bits_to_flags(member.flags) == "E"
        assert member.last_change.signal == "bad-response"
    finally:
        await backend.close()


@pytest.mark.parametrize("script", [hang, drip_head], ids=["hang", "drip-head"])
async def test_hanging_or_dripping_backend_gets_a_504_in_time(
        script: Script, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    backend = ScriptedBackend(script)
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "slow",
                                             "timeout": "400ms"}]))
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, text, _ = await get(client, proxy.url + "/")
        assert status == 504 and "0.4s" in text
        # Bounded by the head deadline, not by how long the drip could go on (5 s).
        assert loop.time() - started < 3
    finally:
        await backend.close()


async def test_reset_mid_body_truncates_and_the_proxy_goes_on(
        start_proxy: Any, client: aiohttp.ClientSession) -> None:
    backend = ScriptedBackend(reset_mid_body)
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "r"}]))
        for _ in range(2):
            with pytest.raises(aiohttp.ClientPayloadError):
                async with client.get(proxy.url + "/") as resp:
                    assert resp.status == 200
                    await resp.read()
        assert proxy.connections("r").open == 0
    finally:
        await backend.close()
