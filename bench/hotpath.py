"""The proxy's own CPU per request, without sockets: µs of Python per proxied request.

    python bench/hotpath.py                 # fast lane and ordinary path, 50,000 requests each
    python bench/hotpath.py --profile       # plus a cProfile of the fast lane (top functions)
    python bench/hotpath.py --metrics       # requests counted for /metrics, as by default deployed
    python bench/hotpath.py --lane fast     # one path only (to perf record it alone)
    python bench/hotpath.py --instructions  # instructions per request, counted (valgrind)

bench/run.py measures the whole process under load, where the kernel's loopback TCP (about a
third of the time) and the event loop blur what the Python code costs. This drives the real
front end (``HttpConnection``), core (``Forwarder``) and upstream protocol
(``UpstreamConnection``) through their protocol callbacks, with in-memory transports standing in
for the two sockets: one client request's bytes in, the member's response bytes in, the
response bytes out. Nothing else differs from a real request on a pooled keep-alive connection:
the same parsing, hardening checks, routing, scheduling, header rewriting and bookkeeping. The
ordinary path (``--no-fast-lane`` rows) runs each request as a Task, so its figure includes the
event loop turns that Task and its futures cost.

Use it to compare changes to the request path (A/B on the same machine); bench/run.py stays the
measure of throughput. µs of CPU move by a few percent from one run to the next on a shared
machine; ``--instructions`` counts the instructions a request executes instead (callgrind, the
difference between two runs of different lengths, so that start-up cancels out): the same to a
few instructions from run to run, it shows a change of 0.5 % (the bench's own driver, about 15 %
of the count, included).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from balancerpool.proxy import metrics
from balancerpool.proxy.forward import Forwarder
from balancerpool.proxy.frontend import HttpServer
from balancerpool.proxy.model import parse_pools
from balancerpool.proxy.upstream import UpstreamConnection

REQUEST = (b"GET /hello?x=1 HTTP/1.1\r\nHost: bench.test\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 04:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
            b"hello from 1\n")
POOL = """
apiVersion: balancerpool.io/v1alpha1
kind: BalancerPool
metadata: {name: bench}
spec:
  routes: [{path: /}]
  lbmethod: byrequests
  members:
  - url: http://127.0.0.1:1
  - url: http://127.0.0.1:2
"""


class Transport:
    """An in-memory transport: keeps what is written, and says which upstream got a request."""

    def __init__(self, sent: list[Any] | None = None, owner: Any = None) -> None:
        self.out: list[bytes] = []
        self.closed = False
        self.sent = sent
        self.owner = owner

    def write(self, data: bytes) -> None:
        self.out.append(data)
        if self.sent is not None:
            self.sent.append(self.owner)

    def writelines(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def pause_reading(self) -> None:
        raise AssertionError("the bench never fills a buffer")

    resume_reading = pause_reading

    def close(self) -> None:
        self.closed = True

    abort = write_eof = close


async def run(requests: int, fast: bool, profile: bool, counted: bool) -> tuple[float, str]:
    loop = asyncio.get_running_loop()
    forwarder = Forwarder(loop)
    forwarder.fast_lane = fast
    if counted:  # as `balancerpool proxy` with its admin listener on
        forwarder.metrics = metrics.enable(forwarder)
    forwarder.apply(parse_pools(POOL))
    server = HttpServer(forwarder.handle, fast=forwarder.fast, loop=loop, outbox=forwarder.outbox)
    client = server()
    client_transport = Transport()
    client.connection_made(client_transport)  # type: ignore[arg-type]
    sent: list[UpstreamConnection] = []
    pool = forwarder.pools["bench"]
    upstreams = []
    for conns in pool.connections.values():
        upstream = UpstreamConnection(conns)
        upstreams.append(upstream)
        upstream.connection_made(Transport(sent, upstream))  # type: ignore[arg-type]
        conns.open += 1
        conns.conns.add(upstream)
        upstream.complete = True  # as after an earlier exchange
        conns.idle.append(upstream)

    async def one() -> None:
        client.data_received(REQUEST)
        # Bare loop turns, not an Event: the ordinary path's Task must run, and nothing else
        # may be added to what is measured.
        while not sent:  # noqa: ASYNC110
            await asyncio.sleep(0)
        sent.pop().data_received(RESPONSE)
        while client._serving:  # noqa: ASYNC110
            await asyncio.sleep(0)

    for _ in range(1000):
        await one()
    if not client_transport.out[-1].endswith(b"hello from 1\n"):
        raise SystemExit(f"unexpected response: {client_transport.out[-1]!r}")
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    started = time.process_time()
    for _ in range(requests):
        await one()
    elapsed = time.process_time() - started
    if profiler is not None:
        profiler.disable()
    if client_transport.closed or any(c.transport.closed for c in upstreams):  # type: ignore[union-attr]
        raise SystemExit("a keep-alive connection was closed: not the path meant to be measured")
    client_transport.out.clear()
    await forwarder.close()
    text = ""
    if profiler is not None:
        stream = io.StringIO()
        pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(25)
        text = stream.getvalue()
    return elapsed / requests * 1e6, text


def instructions(lane: str, counted: bool) -> float:
    """Instructions per request on ``lane``, from two runs under callgrind."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    totals = []
    for requests in (2000, 4000):
        with tempfile.TemporaryDirectory() as tmp:
            run_ = subprocess.run(
                ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable,
                 __file__, "--lane", lane, "--requests", str(requests), *(["--metrics"] if counted else [])],
                capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"}, check=True)
        found = re.search(r"Collected : ([\d,]+)", run_.stderr)
        if found is None:
            raise SystemExit(f"no count from callgrind:\n{run_.stderr[-2000:]}")
        totals.append(int(found.group(1).replace(",", "")))
    return (totals[1] - totals[0]) / (3 * 2000)  # each run measures 3 x its requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true", help="cProfile the fast lane as well")
    parser.add_argument(
        "--metrics", action="store_true", help="count requests for /metrics (the admin listener's default)"
    )
    parser.add_argument(
        "--lane", choices=["fast", "ordinary", "both"], default="both",
        help="measure only one path (for perf record: its samples alone)"
    )
    parser.add_argument(
        "--instructions", action="store_true",
        help="count instructions per request under valgrind's callgrind instead (about a minute)"
    )
    args = parser.parse_args()
    if args.instructions:
        for lane in {"fast": ("fast",), "ordinary": ("ordinary",), "both": ("fast", "ordinary")}[args.lane]:
            name = "fast lane" if lane == "fast" else "ordinary path"
            print(f"{name:14} {instructions(lane, args.metrics):8,.0f} instructions per request")
        return 0
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency
        runner = asyncio.run
    for fast in {"fast": (True,), "ordinary": (False,), "both": (True, False)}[args.lane]:
        best = min(runner(run(args.requests, fast, False, args.metrics))[0] for _ in range(3))
        print(f"{'fast lane' if fast else 'ordinary path':14} {best:6.2f} µs CPU per request "
              f"(best of 3 x {args.requests:,})")
    if args.profile:
        print(runner(run(args.requests, True, True, args.metrics))[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
