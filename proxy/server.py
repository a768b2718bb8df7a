"""The front ends and the process around them: listeners, configuration reloads, signals.

Two front ends sit behind the same seam: ``fast`` (the default, :mod:`.frontend`, a bare
``asyncio.Protocol`` over httptools) and ``aiohttp`` (aiohttp's low-level server, no router, no
middlewares). Each turns a request into the seam's :class:`RequestHead` and :class:`Body` and
writes back the core's :class:`Response`; nothing else here knows about balancing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from aiohttp import web
from aiohttp.web_request import BaseRequest

from .forward import Forwarder
from .frontend import HttpServer
from .hardening import (
    DEFAULT_LIMITS,
    BadRequest,
    Limits,
    check_head,
    check_path,
    check_transfer_encoding,
    split_target,
)
from .keys import load_session_keys
from .messages import RequestHead
from .model import BalancerPool, InvalidBalancerPool, parse_pools
from .upstream import UpstreamError

log = logging.getLogger("balancerpool.proxy")

DEFAULT_LISTEN = ("127.0.0.1", 8080)
FRONTENDS = ("fast", "aiohttp")
#: The front end a ProxyServer gets when none is named.
DEFAULT_FRONTEND = "fast"


def listening_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket | None:
    """A bound socket for a numeric ``host``, or None for a name (the event loop resolves it).

    Binding here keeps the process single-threaded: uvloop resolves even a numeric host through
    libuv's thread pool, whose threads then live on, and in a process with more than one thread
    the kernel takes a reference on the socket's file for every read and write (about 80 ns a
    request in the profile, see docs/performance.md)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return None
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as the event loops do
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"error while attempting to bind on address {(host, port)!r}: "
                      f"{exc.strerror}") from None
    sock.setblocking(False)
    return sock


def aiohttp_site(runner: web.AppRunner, host: str, port: int) -> web.BaseSite:
    """An aiohttp listener bound as ``listening_socket`` binds (no resolver threads)."""
    sock = listening_socket(host, port)
    return web.TCPSite(runner, host, port) if sock is None else web.SockSite(runner, sock)


class _Listener(Protocol):
    """What ProxyServer needs of a front end: a protocol factory that can shut down."""

    def __call__(self) -> asyncio.BaseProtocol: ...

    async def shutdown(self, timeout: float = ...) -> None: ...


class RequestBody:
    """The seam's Body over aiohttp's request stream."""

    __slots__ = ("content", "length")

    def __init__(self, request: BaseRequest) -> None:
        self.content = request.content
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
            self.length: int | None = None
        else:
            self.length = request.content_length or 0

    async def read(self) -> bytes:
        return await self.content.readany()


class FrontEnd:
    """The ``aiohttp`` front end: turns aiohttp requests into calls of ``Forwarder.handle``.
    It cannot tunnel: a 101 with an ``upgrade`` (WebSocket) is answered 501."""

    warned_upgrade = False

    def __init__(self, forwarder: Forwarder) -> None:
        self.forwarder = forwarder

    async def __call__(self, request: BaseRequest) -> web.StreamResponse:
        raw = request.raw_path
        version = (request.version.major, request.version.minor)
        host = request.headers.get("Host")
        try:
            # aiohttp's parser (llhttp too) refuses what the fast front end's does, except
            # for what hardening checks.
            chunked = "Transfer-Encoding" in request.headers
            if chunked:
                check_transfer_encoding(request.headers["Transfer-Encoding"])
            if raw[:1] == "/":
                path, _, query = raw.partition("?")
                authority = None
            else:
                path, query, authority = split_target(raw)
            check_head(request.method, version, raw, host, authority, chunked)
            check_path(path)
        except BadRequest as exc:
            refusal = web.Response(status=exc.status, text=f"{exc.status} {exc.detail}\n")
            refusal.force_close()
            return refusal
        head = RequestHead(
            method=request.method,
            path=path,
            query=query,
            version=version,
            headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers],
            host=authority or host or "",
            client=request.remote or "",
        )
        body = RequestBody(request)
        if body.length != 0 and request.headers.get("Expect", "").lower() == "100-continue":
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        result = await self.forwarder.handle(head, body)
        if result.upgrade is not None:
            # aiohttp's server has no public way to hand over the raw connection: no tunnel.
            result.finish(False)
            if not FrontEnd.warned_upgrade:
                FrontEnd.warned_upgrade = True
                log.warning("the aiohttp front end cannot tunnel upgraded connections "
                            "(WebSockets); answering 501: use --frontend fast")
            return web.Response(status=501, text="Upgrades (WebSockets) need the fast front end.\n")
        response = web.StreamResponse(status=result.status, reason=result.reason or None)
        headers = response.headers
        for name, value in result.headers:
            headers.add(name, value)
        if result.length is not None:
            response.content_length = result.length
        ok = False
        try:
            await response.prepare(request)
            if result.body is not None:
                if result.body:
                    await response.write(result.body)
            else:
                async for chunk in result.chunks():
                    await response.write(chunk)
            await response.write_eof()
            ok = True
        except ConnectionResetError:
            # The client went away (aiohttp's ClientConnectionResetError is a subclass): the
            # upstream connection is closed by finish(False), nothing else to do.
            log.debug("client %s went away during the response", head.client)
        except UpstreamError as exc:
            # The head is already out: all that is left is to cut the client connection, so that
            # it sees a truncated response rather than a complete-looking one.
            log.warning("pool %s: member %s failed mid-response: %s",
                        result.info.get("pool"), result.info.get("member"), exc)
            if request.transport is not None:
                request.transport.abort()
        finally:
            result.finish(ok)
        return response


class ProxyServer:
    """Listeners plus a Forwarder, reconfigured from a file on SIGHUP or when it changes."""

    def __init__(self, source: Path | None, listen: tuple[str, int] | None = None,
                 pools: list[BalancerPool] | None = None,
                 clock: Callable[[], float] = time.monotonic, *,
                 frontend: str | None = None,
                 limits: Limits = DEFAULT_LIMITS,
                 reuse_port: bool = False,
                 health_checks: bool = True) -> None:
        self.source = source
        self.listen_override = listen
        #: SO_REUSEPORT on the listeners, so that several worker processes share a port and the
        #: kernel spreads the connections (``--workers``).
        self.reuse_port = reuse_port
        self.loop = asyncio.get_running_loop()
        self.forwarder = Forwarder(self.loop, clock)
        self.forwarder.health_checks = health_checks
        self.frontend = frontend or DEFAULT_FRONTEND
        self.server: _Listener
        if self.frontend == "fast":
            self.server = HttpServer(self.forwarder.handle, limits=limits, loop=self.loop,
                                     fast=self.forwarder.fast, outbox=self.forwarder.outbox)
        elif self.frontend == "aiohttp":
            self.server = web.Server(FrontEnd(self.forwarder), access_log=None,
                                     auto_decompress=False, keepalive_timeout=limits.keepalive_timeout,
                                     max_line_size=limits.max_request_line,
                                     max_field_size=limits.max_header_size,
                                     max_headers=limits.max_headers)
        else:
            raise ValueError(f"unknown front end {self.frontend!r}: one of {', '.join(FRONTENDS)}")
        self.listeners: dict[tuple[str, int], asyncio.Server] = {}
        self.fingerprint = b""
        self.generation = 0
        self.initial = pools
        self._watch: asyncio.Task[None] | None = None
        self.on_reload: list[Callable[[bool, str], None]] = []

    async def start(self) -> None:
        pools = self.initial if self.initial is not None else self._load()
        await self._apply(pools)
        if self.source is not None:
            self._watch = self.loop.create_task(self._watch_file())

    def _load(self) -> list[BalancerPool]:
        assert self.source is not None
        data = self.source.read_bytes()
        self.fingerprint = hashlib.sha256(data).digest()
        pools = parse_pools(data.decode("utf-8"))
        load_session_keys(pools)  # a missing or weak key fails here, as part of the file
        return pools

    async def _apply(self, pools: list[BalancerPool]) -> None:
        wanted = self._addresses(pools)
        for address in wanted:
            if address not in self.listeners:
                sock = listening_socket(*address, reuse_port=self.reuse_port)
                if sock is not None:
                    self.listeners[address] = await self.loop.create_server(
                        self.server, sock=sock, backlog=1024)
                else:
                    self.listeners[address] = await self.loop.create_server(
                        self.server, address[0], address[1], reuse_address=True,
                        reuse_port=self.reuse_port or None, backlog=1024)
                log.info("listening on http://%s:%d", *address)
        for address in [a for a in self.listeners if a not in wanted]:
            self.listeners.pop(address).close()
        self.forwarder.apply(pools)
        self.generation += 1
        for pool in pools:
            log.info("pool %s: %d members, lbmethod %s, routes %s", pool.name, len(pool.members),
                     pool.lbmethod, ", ".join(r.path for r in pool.routes))

    def _addresses(self, pools: list[BalancerPool]) -> list[tuple[str, int]]:
        if self.listen_override is not None:
            return [self.listen_override]
        addresses = list(dict.fromkeys(p.listen for p in pools if p.listen is not None))
        return addresses or [DEFAULT_LISTEN]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Where the proxy really listens (port 0 resolved)."""
        out = []
        for server in self.listeners.values():
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append((host, port))
        return out

    async def reload(self) -> bool:
        """Re-read the file; on any problem keep the last good configuration and say why."""
        if self.source is None:
            return False
        try:
            pools = self._load()
        except InvalidBalancerPool as exc:
            message = f"{self.source}: invalid, keeping the last good configuration:\n{exc}"
            log.error("%s", message)
            self._notify(False, message)
            return False
        except (OSError, UnicodeDecodeError) as exc:
            message = f"{self.source}: cannot be read ({exc}), keeping the last good configuration"
            log.error("%s", message)
            self._notify(False, message)
            return False
        try:
            await self._apply(pools)
        except OSError as exc:
            message = f"{self.source}: cannot listen as configured ({exc}); routes kept as before"
            log.error("%s", message)
            self._notify(False, message)
            return False
        log.info("%s: configuration reloaded (generation %d)", self.source, self.generation)
        self._notify(True, f"{self.source}: reloaded")
        return True

    def _notify(self, ok: bool, message: str) -> None:
        for callback in self.on_reload:
            callback(ok, message)

    async def _watch_file(self) -> None:
        """Poll the file: inotify is not everywhere, and a ConfigMap swaps a symlink anyway."""
        assert self.source is not None
        last = self._stat()
        while True:
            await asyncio.sleep(1.0)
            current = self._stat()
            if current != last:
                last = current
                with contextlib.suppress(OSError):
                    if hashlib.sha256(self.source.read_bytes()).digest() == self.fingerprint:
                        continue
                await self.reload()

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.source is not None
        try:
            st = os.stat(self.source)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for server in self.listeners.values():
            server.close()
        await self.server.shutdown(5.0)
        for server in self.listeners.values():
            await server.wait_closed()
        self.listeners.clear()
        await self.forwarder.close()


async def run_until_signalled(server: ProxyServer, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or ``stop`` is set); SIGHUP reloads the file."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: the proxy sits on every request, so the faster loop is the default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
