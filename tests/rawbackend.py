"""A backend that logs every byte it receives, run as its own process: the witness that a hostile
request never reached a backend.

``python tests/rawbackend.py --port P --log FILE`` prints ``ready`` once it listens. Every
``data_received`` is appended to FILE as one JSON line (``{"conn": N, "data": latin-1 text}``)
before anything is parsed, so even bytes no HTTP parser would accept are on record; then each
complete request (``{"conn": N, "request": "GET /x"}``) or parse error (``"error"``). Requests
that parse are answered ``200`` with ``<METHOD> <target>\\n`` (``/extra`` also gets an
unsolicited, unfinished second response 50 ms later); anything else closes the connection.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from itertools import count
from pathlib import Path
from typing import IO

import httptools

_ids = count(1)


class Witness(asyncio.Protocol):
    def __init__(self, log: IO[str]) -> None:
        self.log = log
        self.id = next(_ids)
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.log.write(json.dumps({"conn": self.id, "data": data.decode("latin-1")}) + "\n")
        self.log.flush()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # A CONNECT or Upgrade request reached us (logged as a request): no tunnel here.
            assert self.transport is not None
            self.transport.close()
        except httptools.HttpParserError as exc:
            # What a proxy forwarded must always parse: a smuggling oracle for the tests.
            self.log.write(json.dumps({"conn": self.id, "error": str(exc)}) + "\n")
            self.log.flush()
            assert self.transport is not None
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        assert self.transport is not None
        self.log.write(json.dumps({"conn": self.id, "request": f"{self.parser.get_method().decode()} "
                                                               f"{self.url.decode('latin-1')}"}) + "\n")
        self.log.flush()
        body = b"%s %s\n" % (self.parser.get_method(), self.url)
        extra = self.url == b"/extra"
        self.url = b""
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        if extra:
            # Then a response nobody asked for, on a connection the proxy may pool.
            asyncio.get_running_loop().call_later(0.05, self.transport.write,
                                                  b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\n\r\nPOISON\n")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    with args.log.open("a") as log:
        server = await loop.create_server(lambda: Witness(log), "127.0.0.1", args.port,
                                          reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        server.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
