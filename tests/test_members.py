"""The member-set API: atomic changes, flushing, and the grace for in-flight requests."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from balancerpool.proxy.endpoints import endpoint_flags
from balancerpool.proxy.model import InvalidBalancerPool

from .conftest import Backend, Backends, get, pool_doc


@pytest.mark.parametrize(("ready", "serving", "terminating", "flags"), [
    (True, True, False, frozenset()),
    (None, None, None, frozenset()),
    (True, None, None, frozenset()),
    (False, True, True, frozenset("N")),
    (False, None, True, None),  # serving nil follows ready: not serving
    (False, False, True, None),
    (False, False, False, frozenset("D")),
    (False, None, None, frozenset("D")),
    (True, True, True, frozenset("N")),
])
def test_endpoint_conditions(ready: bool | None, serving: bool | None, terminating: bool | None,
                             flags: frozenset[str] | None) -> None:
    assert endpoint_flags(ready, serving, terminating) == flags


def established(port: int) -> int:
    """Established TCP connections whose local port is ``port``: the backend's real sockets."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # 01 = ESTABLISHED
                count += 1
    return count


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


def specs(proxy: Any) -> Any:
    return proxy.server.forwarder.pools["test"].spec


async def test_removed_member_keeps_no_connection_and_kept_ones_keep_theirs(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b, c = (backends.start(n) for n in "abc")
    proxy = await start_proxy(pool_doc([{"url": x.url, "name": x.name} for x in (a, b, c)]))
    await asyncio.gather(*(get(client, proxy.url + "/slow?s=0.2") for _ in range(9)))
    assert established(b.port) == 3
    old_a = proxy.connections("a")
    members = list(specs(proxy).members)
    # One step: b removed, a re-weighted, d added.
    d = backends.start("d")
    new = [dataclasses.replace(members[0], loadfactor=3), members[2],
           dataclasses.replace(members[2], url=d.url, host="127.0.0.1", port=d.port, name="d")]
    change = proxy.server.forwarder.set_members("test", new)
    assert change == {"added": ["d"], "changed": ["a"], "removed": ["b"]}
    await wait_until(lambda: established(b.port) == 0)  # the backend's sockets really closed
    assert proxy.connections("a") is old_a and len(old_a.idle) == 3  # re-weighting kept them
    assert "b\n" not in {(await get(client, proxy.url + "/"))[1] for _ in range(10)}
    assert b.requests()[-1]["path"] == "/slow?s=0.2"


async def test_invalid_member_set_is_refused_and_changes_nothing(
        backends: Backends, start_proxy: Any) -> None:
    a = backends.start("a")
    proxy = await start_proxy(pool_doc([{"url": a.url, "name": "a", "route": "r"}]))
    members = list(specs(proxy).members)
    twin = dataclasses.replace(members[0], name="twin")
    with pytest.raises(InvalidBalancerPool, match=r"spec.members\[1\].route: 'r' repeats members\[0\]"):
        proxy.server.forwarder.set_members("test", [members[0], twin])
    assert [m.name for m in specs(proxy).members] == ["a"]


async def slow_request(client: aiohttp.ClientSession, url: str) -> int | str:
    try:
        async with client.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def removal_with_grace(backends: Backends, start_proxy: Any, client: aiohttp.ClientSession,
                             grace: str) -> tuple[int | str, Backend, Any]:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], removalGrace=grace))
    inflight = asyncio.create_task(slow_request(client, proxy.url + "/slow?s=1.5"))
    await wait_until(lambda: proxy.member("a").busy == 1)
    proxy.server.forwarder.set_members("test", [m for m in specs(proxy).members if m.name == "b"])
    return await inflight, a, proxy


async def test_in_flight_request_finishes_within_the_grace(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    status, a, _ = await removal_with_grace(backends, start_proxy, client, "5s")
    assert status == 200
    assert [r["path"] for r in a.requests()] == ["/slow?s=1.5"]
    await wait_until(lambda: established(a.port) == 0)


async def test_in_flight_request_is_cut_after_the_grace(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    status, a, _ = await removal_with_grace(backends, start_proxy, client, "200ms")
    await wait_until(lambda: established(a.port) == 0)
    # Cut before any response byte, the GET was safely sent again to the remaining member.
    assert status == 200
    b = next(x for x in backends.started if x.name == "b")
    assert [r["path"] for r in b.requests()] == ["/slow?s=1.5"]


async def test_in_flight_post_is_cut_and_never_sent_again(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}], removalGrace="200ms"))

    async def post() -> int:
        async with client.post(proxy.url + "/slow?s=1.5", data=b"order=1") as resp:
            return resp.status

    inflight = asyncio.create_task(post())
    await wait_until(lambda: proxy.member("a").busy == 1)
    proxy.server.forwarder.set_members("test", [m for m in specs(proxy).members if m.name == "b"])
    assert await inflight == 502
    assert [r["method"] for r in a.requests()] == ["POST"]
    assert b.requests() == []


async def test_switching_a_member_to_draining_flushes_its_idle_connections(
        backends: Backends, start_proxy: Any, client: aiohttp.ClientSession) -> None:
    a, b = backends.start("a"), backends.start("b")
    proxy = await start_proxy(pool_doc(
        [{"url": a.url, "name": "a", "route": "a"}, {"url": b.url, "name": "b", "route": "b"}],
        stickysession="JSESSIONID"))
    await asyncio.gather(*(get(client, proxy.url + "/slow?s=0.2") for _ in range(4)))
    assert established(b.port) == 2
    members = list(specs(proxy).members)
    proxy.server.forwarder.set_members(
        "test", [members[0], dataclasses.replace(members[1], status=frozenset("N"))])
    await wait_until(lambda: established(b.port) == 0)
    assert proxy.member("b").last_change.after == "N"
    # Draining: its sessions still reach it, new ones do not.
    assert (await get(client, proxy.url + "/", headers={"Cookie": "JSESSIONID=x.b"}))[1] == "b\n"
    assert {(await get(client, proxy.url + "/"))[1] for _ in range(4)} == {"a\n"}
