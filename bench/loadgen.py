"""Fallback HTTP/1.1 load generator, used only when wrk is missing.

Keeps N keep-alive connections busy with `GET` requests (one in flight per connection, like wrk), for
a fixed duration or until a total request budget is spent, then prints one JSON object with the same
figures the harness parses from wrk. It is a single Python process, so it saturates long before wrk
does: compare rows only against each other within one run.

Usage: python bench/loadgen.py URL [--duration S] [--connections N] [--max-requests N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IO_TIMEOUT = 2.0  # like wrk's default --timeout


@dataclass
class Stats:
    """Shared counters; asyncio is single-threaded, so plain ints are safe."""

    budget: int
    latencies: list[float] = field(default_factory=list)
    non_2xx_3xx: int = 0
    errors: dict[str, int] = field(
        default_factory=lambda: {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )

    def take(self) -> bool:
        """Reserve one request from the total budget."""
        if self.budget <= 0:
            return False
        self.budget -= 1
        return True


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response (Content-Length or chunked body); return (status, server wants close)."""
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed by peer")
    status = int(status_line.split()[1])
    length, chunked, close = 0, False, status_line.startswith(b"HTTP/1.0")
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection":
            close = value == b"close"
    if not chunked:
        await reader.readexactly(length)
        return status, close
    while size := int((await reader.readline()).split(b";")[0], 16):
        await reader.readexactly(size + 2)
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
        pass
    return status, close


async def connection(host: str, port: int, request: bytes, deadline: float, stats: Stats) -> None:
    """Drive one client connection until the deadline, reconnecting after errors or `close`."""
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), IO_TIMEOUT)
        except (OSError, TimeoutError):
            stats.errors["connect"] += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < deadline and stats.take():
                started = time.perf_counter()
                writer.write(request)
                status, close = await asyncio.wait_for(read_response(reader), IO_TIMEOUT)
                stats.latencies.append(time.perf_counter() - started)
                if not 200 <= status < 400:
                    stats.non_2xx_3xx += 1
                if close:
                    break
            else:
                return
        except TimeoutError:
            stats.errors["timeout"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            stats.errors["read"] += 1
        finally:
            writer.close()


def percentile_ms(sorted_seconds: list[float], q: float) -> float:
    if not sorted_seconds:
        return 0.0
    return sorted_seconds[round(q * (len(sorted_seconds) - 1))] * 1000.0


async def run(url: str, duration: float, connections: int, max_requests: int) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    stats = Stats(budget=max_requests)
    started = time.monotonic()
    deadline = started + duration
    tasks = [
        asyncio.create_task(connection(host, port, request, deadline, stats)) for _ in range(connections)
    ]
    # Hard bound: nothing outlives the deadline by more than one I/O timeout.
    await asyncio.wait(tasks, timeout=duration + IO_TIMEOUT + 1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    latencies = sorted(stats.latencies)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "non_2xx_3xx": stats.non_2xx_3xx,
        "socket_errors": stats.errors,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.duration, args.connections, args.max_requests))
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
