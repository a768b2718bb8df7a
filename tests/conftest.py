"""Real processes and sockets on 127.0.0.1: backends are separate processes that tests can kill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from balancerpool.proxy.hardening import DEFAULT_LIMITS, Limits
from balancerpool.proxy.model import parse_pools
from balancerpool.proxy.server import ProxyServer

HERE = Path(__file__).parent
BACKEND = HERE / "backend.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Backend:
    """One backend process (tests/backend.py) on a fixed port, so it can be killed and restarted."""

    name: str
    port: int
    route: str | None
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Backend:
        cmd = [sys.executable, str(BACKEND), "--port", str(self.port), "--name", self.name,
               "--log", str(self.log)]
        if self.route:
            cmd += ["--route", self.route]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # blocks until ready (or the process dies)
        if line.strip() != b"ready":
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"backend {self.name} failed to start: {err}")
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self.proc.wait(10)

    def requests(self) -> list[dict[str, Any]]:
        import json

        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]


@dataclass
class Backends:
    tmp: Path
    started: list[Backend] = field(default_factory=list)

    def start(self, name: str, route: str | None = None, port: int | None = None) -> Backend:
        backend = Backend(name, port or free_port(), route, self.tmp / f"{name}.log").start()
        self.started.append(backend)
        return backend

    def stop_all(self) -> None:
        for backend in self.started:
            backend.kill(signal.SIGTERM)


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The fast front end's and the fast lane's own tests run on uvloop (what the proxy runs
    on) as well as on asyncio's loop; every other test on asyncio's loop only, as before."""
    if item.path.name in ("test_frontend.py", "test_fastlane.py", "test_outbox.py"):
        import uvloop

        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
def backends(tmp_path: Path) -> Iterator[Backends]:
    group = Backends(tmp_path)
    try:
        yield group
    finally:
        group.stop_all()


def pool_doc(members: list[dict[str, Any]], name: str = "test", **spec: Any) -> dict[str, Any]:
    """A BalancerPool document; ``spec`` overrides or adds spec fields (routes default to /)."""
    body: dict[str, Any] = {"routes": [{"path": "/"}], "members": members}
    body.update(spec)
    return {"apiVersion": "balancerpool.io/v1alpha1", "kind": "BalancerPool",
            "metadata": {"name": name}, "spec": body}


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningProxy:
    server: ProxyServer
    url: str
    clock: FakeClock

    def member(self, name: str, pool: str = "test") -> Any:
        return self.server.forwarder.pools[pool].state.by_name[name]

    def connections(self, name: str, pool: str = "test") -> Any:
        return self.server.forwarder.pools[pool].connections[name]


#: Every test using start_proxy runs once per front end. A test module may narrow this by
#: defining its own FRONTENDS, a test with ``@pytest.mark.parametrize("start_proxy", [...],
#: indirect=True)``.
FRONTENDS = ("fast", "aiohttp")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "start_proxy" not in metafunc.fixturenames:
        return
    for marker in metafunc.definition.iter_markers(name="parametrize"):
        names = marker.args[0] if marker.args else marker.kwargs.get("argnames", "")
        if "start_proxy" in ([n.strip() for n in names.split(",")] if isinstance(names, str)
                             else list(names)):
            return  # the test chose its front ends itself
    metafunc.parametrize("start_proxy", getattr(metafunc.module, "FRONTENDS", FRONTENDS),
                         indirect=True)


@pytest.fixture
async def start_proxy(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """``await start_proxy(doc, ...)``: an in-process proxy on a free port from BalancerPool docs,
    once with each front end. ``limits=`` sets the listener's limits and timeouts."""
    servers: list[ProxyServer] = []
    frontend: str = request.param

    async def start(*docs: dict[str, Any], limits: Limits = DEFAULT_LIMITS,
                    real_clock: bool = False) -> RunningProxy:
        pools = parse_pools(yaml.safe_dump_all(docs))
        clock = FakeClock()  # ``real_clock``: the proxy runs on time.monotonic, as deployed
        server = ProxyServer(None, ("127.0.0.1", 0), pools,
                             clock=time.monotonic if real_clock else clock, frontend=frontend,
                             limits=limits)
        servers.append(server)
        await server.start()
        host, port = server.addresses[0]
        return RunningProxy(server, f"http://{host}:{port}", clock)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def get(client: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str, Any]:
    async with client.get(url, allow_redirects=False, **kw) as resp:
        return resp.status, await resp.text(), resp.headers


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """Poll a condition that another process makes true (no fixed sleeps)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def metric_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text as {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out
