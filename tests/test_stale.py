"""Stale keep-alive connections: the backend closes idle connections, the client never notices."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from .conftest import get, pool_doc


class IdleClosingBackend:
    """Closes every keep-alive connection after ``idle`` seconds without a request, as uvicorn,
    Node.js or Apache do; optionally says so in ``Keep-Alive: timeout=N``."""

    def __init__(self, idle: float, advertise: bool) -> None:
        self.idle = idle
        self.advertise = advertise
        self.requests = 0
        self.connections = 0
        self.closed_idle = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        extra = f"Keep-Alive: timeout={self.idle:g}\r\n" if self.advertise else ""
        try:
            while True:
                try:
                    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle)
                except TimeoutError:
                    self.closed_idle += 1
                    return
                self.requests += 1
                writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n{extra}\r\nok\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


#: Irregular gaps around the backend's 1 s idle timeout, in seconds.
GAPS = [0.2, 0.95, 1.05, 0.5, 0.99, 1.3, 0.1, 0.9]


@pytest.mark.parametrize("advertise", [True, False], ids=["keep-alive-header", "silent"])
async def test_backend_closing_idle_keepalives_never_causes_a_502(
        advertise: bool, start_proxy: Any, client: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "balancerpool.proxy")
    backend = IdleClosingBackend(idle=1.0, advertise=advertise)
    try:
        proxy = await start_proxy(pool_doc([{"url": await backend.start(), "name": "b"}]))
        statuses = []
        for gap in GAPS:
            await asyncio.sleep(gap)  # the backend's idle timer runs on real time
            proxy.clock.advance(gap)
            statuses.append((await get(client, proxy.url + "/"))[0])
        assert statuses == [200] * len(GAPS)
        assert backend.requests == len(GAPS)  # nothing was sent twice
        # The gaps of a second or more (and, with the header, those past its margin) each needed
        # a new connection: the race was really there.
        assert backend.connections >= 3
        resent = [r for r in caplog.records if "closed a reused connection" in r.getMessage()]
        if advertise:
            # Connections are retired before the backend's timeout: no request ever went out on a
            # connection the backend was closing. (Without the header, an idle connection the
            # backend closes is dropped on its EOF; the exact race, a close crossing a request,
            # is pinned by the RacyBackend tests in test_proxy.py.)
            assert resent == []
    finally:
        await backend.close()
