"""What may be sent again after a failure, and how much: idempotency, Idempotency-Key with a
buffered body, and the retry budget."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from balancerpool.proxy.health import RetryBudget
from balancerpool.proxy.model import RetryBudgetSpec

from .conftest import Backends, pool_doc


def test_retry_budget_minimum_and_share() -> None:
    budget = RetryBudget(RetryBudgetSpec(percent=20, min_retries=2, window=10))
    for _ in range(5):
        budget.request(100.0)
    # 20% of 5 is 1, but two retries are always allowed.
    assert [budget.try_retry(100.5) for _ in range(3)] == [True, True, False]
    for _ in range(20):
        budget.request(101.0)
    # 25 requests in the window: 20% is 5, two already spent.
    assert [budget.try_retry(101.5) for _ in range(4)] == [True, True, True, False]
    # Ten seconds later the window has moved on.
    assert budget.try_retry(112.0)


class DroppingBackend:
    """Reads each whole request, records it, and drops the connection without answering: a
    backend that dies while handling the request. Nobody can know whether it acted on it."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                           if line.lower().startswith("content-length:")), 0)
            await reader.readexactly(length)
            self.seen.append(head.split(" ")[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.transport.abort()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def dropping() -> Any:
    backend = DroppingBackend()
    yield backend
    await backend.close()


async def pool_with_dropper(start_proxy: Any, backends: Backends, dropping: DroppingBackend,
                            **spec: Any) -> tuple[Any, Any]:
    good = backends.start("good")
    # The dropper comes first: byrequests sends the first request to it.
    proxy = await start_proxy(pool_doc(
        [{"url": await dropping.start(), "name": "dropper"}, {"url": good.url, "name": "good"}],
        **spec))
    return proxy, good


async def post(client: aiohttp.ClientSession, url: str, body: bytes, **headers: str) -> int:
    async with client.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_get_fails_over_after_the_member_dropped_it(
        start_proxy: Any, backends: Backends, dropping: DroppingBackend,
        client: aiohttp.ClientSession) -> None:
    proxy, _ = await pool_with_dropper(start_proxy, backends, dropping)
    async with client.get(proxy.url + "/") as resp:
        assert (resp.status, await resp.text()) == (200, "good\n")
    assert dropping.seen == ["GET"]


@pytest.mark.parametrize(("policy", "headers", "size", "resent"), [
    ("withIdempotencyKey", {}, 100, False),
    ("withIdempotencyKey", {"Idempotency-Key": "order-8812"}, 100, True),
    ("withIdempotencyKey", {"Idempotency-Key": "order-8812"}, 100_000, False),  # not buffered
    ("never", {"Idempotency-Key": "order-8812"}, 100, False),
    ("always", {}, 100, True),
])
async def test_post_is_sent_again_only_when_safe(
        policy: str, headers: dict[str, str], size: int, resent: bool, start_proxy: Any,
        backends: Backends, dropping: DroppingBackend, client: aiohttp.ClientSession) -> None:
    proxy, good = await pool_with_dropper(start_proxy, backends, dropping,
                                          retryNonIdempotent=policy, retryBufferSize="64KiB")
    status = await post(client, proxy.url + "/upload", b"x" * size, **headers)
    assert dropping.seen == ["POST"]
    if resent:
        assert status == 200
        assert [(r["method"], r["size"]) for r in good.requests()] == [("POST", size)]
    else:
        assert status == 502
        assert good.requests() == []


async def test_retry_budget_stops_a_retry_storm(
        start_proxy: Any, backends: Backends, dropping: DroppingBackend,
        client: aiohttp.ClientSession) -> None:
    proxy, _ = await pool_with_dropper(
        start_proxy, backends, dropping, retryBudget={"percent": 0, "minRetries": 1},
        memberDefaults={"retry": "0s"})
    statuses = []
    texts = []
    for _ in range(4):
        async with client.get(proxy.url + "/") as resp:
            statuses.append(resp.status)
            texts.append(await resp.text())
    # byrequests alternates; the dropper's first request is retried, the second is not.
    assert statuses == [200, 200, 502, 200]
    assert "retry budget spent" in texts[2]
    assert dropping.seen == ["GET", "GET"]
