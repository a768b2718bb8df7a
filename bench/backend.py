"""Fallback benchmark backend: a tiny uvloop + httptools server, used only when nginx is missing.

It answers every request on every port with a fixed 13-byte body ("hello from N\\n", N = 1-based port
index), keep-alive, so the proxy under test -- not the backend -- is the bottleneck.

Usage: python bench/backend.py PORT [PORT ...]
"""

from __future__ import annotations

import asyncio
import functools
import signal
import sys
from collections.abc import Callable
from typing import Any, cast

import httptools

LoopFactory = Callable[[], asyncio.AbstractEventLoop]
try:
    import uvloop

    loop_factory: LoopFactory | None = uvloop.new_event_loop
except ImportError:  # uvloop is a dependency, but stay usable without it
    loop_factory = None


def response(body: bytes, keep_alive: bool) -> bytes:
    """Pre-built response bytes: nothing is formatted per request."""
    connection = b"keep-alive" if keep_alive else b"close"
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: %s\r\n\r\n"
    return head % (len(body), connection) + body


class Backend(asyncio.Protocol):
    """One client connection; replies as soon as a whole request has been parsed."""

    def __init__(self, body: bytes) -> None:
        self.keep_alive_reply = response(body, True)
        self.close_reply = response(body, False)
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpRequestParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        if self.parser.should_keep_alive():
            self.transport.write(self.keep_alive_reply)
        else:
            self.transport.write(self.close_reply)
            self.transport.close()


async def serve(ports: list[int]) -> None:
    """Listen on every port until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for index, port in enumerate(ports, start=1):
        body = f"hello from {index}\n".encode()
        factory = functools.partial(Backend, body)
        servers.append(await loop.create_server(factory, "127.0.0.1", port, backlog=1024))
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    if not argv or not all(arg.isdigit() for arg in argv):
        print(__doc__, file=sys.stderr)
        return 2
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve([int(arg) for arg in argv]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
