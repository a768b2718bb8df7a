"""The upstream side: one HTTP/1.1 connection protocol over httptools, and one pool per member.

Not aiohttp's client: its ``ClientSession`` silently re-sends a request once, even a POST, on a
dropped pooled connection (aio-libs/aiohttp#10790), and its connector cannot close one host's
connections on its own. Here every retry decision belongs to the caller, who knows whether the
request went out, and each member's idle connections can be flushed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any, ClassVar, Final

import httptools

from .headers import field_list
from .model import MemberSpec

log = logging.getLogger("balancerpool.proxy")

#: Response bytes buffered before the backend socket stops being read (backpressure).
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
#: Transport write buffer size above which the request body writer waits.
WRITE_HIGH_WATER: Final = 256 * 1024
#: A response head larger than this, or with more fields, is refused: a broken or hostile backend
#: must not make the proxy buffer without bound.
MAX_RESPONSE_HEAD: Final = 64 * 1024
MAX_RESPONSE_FIELDS: Final = 256


class UpstreamError(Exception):
    """A failure talking to a member. ``sent`` tells whether any request byte left the proxy."""

    # ClassVar: mypyc drops plain class-level defaults of compiled Exception subclasses.
    kind: ClassVar[str] = "error"

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class ConnectFailed(UpstreamError):
    kind: ClassVar[str] = "connect"


class PoolExhausted(UpstreamError):
    kind: ClassVar[str] = "acquire"


class UpstreamClosed(UpstreamError):
    kind: ClassVar[str] = "closed"


class UpstreamTimeout(UpstreamError):
    kind: ClassVar[str] = "timeout"


class UpstreamProtocolError(UpstreamError):
    kind: ClassVar[str] = "protocol"


_OVERSIZED: Final = f"response head over {MAX_RESPONSE_HEAD // 1024} KiB or {MAX_RESPONSE_FIELDS} fields"


class Outbox:
    """Request heads and responses, written together when the event loop turns.

    Made at once, every write wakes its peer (a member, a client) at once; while the proxy goes
    on with the other connections that became readable, that peer answers and often sleeps
    again before the next write reaches it, and waking a process asleep on another core costs
    an inter-processor interrupt, dear in a virtual machine. Gathered over one loop iteration,
    the writes go out back to back: HAProxy's order of poll, process, then send. One per
    Forwarder, shared by its connection pools and the fast front end."""

    __slots__ = ("_queued", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: Transport, bytes, transport, bytes ...: no tuple per write.
        self._queued: list[Any] = []

    def write(self, transport: asyncio.Transport, data: bytes) -> None:
        queued = self._queued
        if not queued:
            self.loop.call_soon(self.flush)
        queued.append(transport)
        queued.append(data)

    def flush(self) -> None:
        """Write what is queued: when the loop turns, and before anything written straight to
        a transport, which must not overtake it."""
        queued = self._queued
        if not queued:
            return
        self._queued = []
        for i in range(0, len(queued), 2):
            transport = queued[i]
            try:
                transport.write(queued[i + 1])
            except RuntimeError:
                # uvloop's transport closed meanwhile (a peer went away, an exchange was cut;
                # asyncio's drops the bytes itself): that connection's own callbacks report it.
                pass
            except Exception:  # one transport's trouble must not keep the others' bytes
                log.exception("writing to %s failed", transport.get_extra_info("peername"))


class Listener:
    """What waits on a connection's exchange without a Task (the fast lane's). A base class
    rather than a Protocol: compiled, the call is then a direct one, not a method lookup."""

    __slots__ = ()

    def upstream_ready(self) -> None:
        """The response head, an error, or the end of the connection arrived."""
        raise NotImplementedError


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to a member, serving one request at a time."""

    # Thousands of these can sit idle in the pools: no per-instance dict.
    __slots__ = ("_tell", "buffered", "chunks", "closed", "complete", "counted", "drain_waiter",
                 "error", "expires", "feed", "fields_memo", "get_status_code", "head", "head_done",
                 "head_only", "head_received", "head_start", "headers", "idle_since", "keep_alive",
                 "keepalive_timeout", "last_head", "listener", "loop", "parser", "pool",
                 "reading_paused", "reason", "received_any", "requests", "reused",
                 "should_keep_alive", "status", "transport", "upgraded", "waiter", "write_paused")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport | None = None
        self._new_parser()
        self.closed = False
        #: True while this connection holds one of the pool's ``open`` slots.
        self.counted = True
        self.reused = False
        self.idle_since = 0.0
        #: When the backend will close this connection if idle (its ``Keep-Alive: timeout=N``,
        #: less a margin); +inf when it did not say.
        self.expires = float("inf")
        self.keepalive_timeout: float | None = None
        self.requests = 0
        # Current exchange.
        self.head_only = False
        self.status = 0
        #: The response's reason and fields, never changed once made: the same as the last
        #: response's when its head (``last_head``) is the same, byte for byte. A member
        #: repeats its heads (but Date, once a second) on a connection; then nothing is read
        #: again, and the Forwarder reuses what it made of the fields (``fields_memo``).
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.last_head = b"\0"  # never the start of a head
        #: What ``response_fields`` made of ``headers`` (the Forwarder's); None when new.
        self.fields_memo: tuple[bytes, int | None, bool] | None = None
        #: What came of the response so far while its head is incomplete (llhttp checks the
        #: head; its fields are read from these bytes once it is complete, rather than passed
        #: one by one to a callback), and where the head begins (after interim responses).
        self.head = b""
        self.head_start = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        #: The size of everything received before the head completed.
        self.head_received = 0
        #: After a 101 response: raw bytes, no more HTTP (a WebSocket tunnel).
        self.upgraded = False
        self.error: UpstreamError | None = None
        #: Body chunks not yet taken. A list, not a deque: an empty deque takes about 600 bytes,
        #: in each of thousands of idle pooled connections.
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        #: Told, instead of a waiting coroutine, when the head, an error or the end arrives (a
        #: fast-lane exchange); called once the callback that learnt it has returned.
        self.listener: Listener | None = None
        self._tell = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not subclasses
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.pool.member.pool.keepalive:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self._received(data)
        if self._tell:
            self._told()

    def _received(self, data: bytes) -> None:
        self.received_any = True
        if self.upgraded:
            self.on_body(data)
            return
        if self.complete:
            # Bytes after a complete response (or on an idle pooled connection): whatever they
            # are, they would be read as the answer to the next request. Never reuse it.
            log.warning("member %s sent %d bytes outside a response; connection closed",
                        self.pool.member.name, len(data))
            self.keep_alive = False
            self.close()
            return
        if self.head_done and self.head_only:
            self._fail(UpstreamProtocolError("backend sent data after a bodiless response"))
            return
        if not self.head_done:
            self.head = self.head + data if self.head else data
        try:
            self.feed(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.status == 101:
                self.upgraded = True
                self.complete = False  # llhttp ends the 101 "message"; the tunnel starts now
                rest = data[upgrade.args[0]:] if upgrade.args else b""
                if rest:
                    self.on_body(rest)
            else:
                self._fail(UpstreamProtocolError(f"backend upgraded without a 101 ({self.status})"))
            return
        except httptools.HttpParserError as exc:
            if self.complete and self.head_done:
                # on_message_begin refused a second message in the same read: the response
                # stands, the connection is never reused.
                log.warning("member %s sent bytes after its response; connection closed",
                            self.pool.member.name)
                self.keep_alive = False
                self.close()
                return
            if isinstance(exc.__context__, UpstreamProtocolError):  # on_headers_complete's
                self._fail(exc.__context__)
                return
            self._fail(UpstreamProtocolError(f"malformed response from backend: {exc}"))
            return
        if not self.head_done:
            # Bytes received without a complete head: one that never ends must not grow forever.
            self.head_received += len(data)
            if self.head_received > MAX_RESPONSE_HEAD:
                self._fail(UpstreamProtocolError(_OVERSIZED))
                return
        if self.head_done and self.head_only and not self.complete:
            # httptools cannot be told that a HEAD response has no body: end it here.
            self._message_done(keep_alive=self.should_keep_alive())

    def eof_received(self) -> bool:
        if self.upgraded:
            self.complete = True  # the tunnel's end: read_body returns b""
            self._wake()
            return False
        if self.head_done and not self.complete:
            with contextlib.suppress(httptools.HttpParserError):
                self.parser.feed_data(b"")  # ends a read-until-close body
        if not self.complete:
            self._fail(UpstreamClosed(
                "backend closed the connection before the response ended" if self.head_done
                else "backend closed the connection before responding"))
        if self._tell:
            self._told()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.upgraded:
            self.complete = True
            self._wake()
        elif not self.complete and self.error is None:
            self._fail(UpstreamClosed(f"connection to backend lost: {exc or 'closed'}"))
        self._wake_drain()
        self.pool.drop(self)
        if self._tell:
            self._told()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_drain()

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            # Another message right behind the response, in the same read: llhttp would merge
            # it into this exchange (its status, fields and body). Stop here.
            raise UpstreamProtocolError("bytes after the response")

    # No on_status or on_header: the head's lines are read from its bytes, once llhttp has
    # found them valid (CRLF-ended, no obs-fold, names tokens), in on_headers_complete.

    def on_headers_complete(self) -> None:
        head = self.head
        status = self.get_status_code()
        # The same head as the last response's (the one before it ends where the last one
        # did: a head ends at its first empty line): the same reason and fields, unread.
        if not (self.head_start == 0 and head.startswith(self.last_head)) \
                and not self._read_head(head, status):
            return  # an interim response (100 Continue, 103 Early Hints): not forwarded
        self.head = b""
        self.status = status
        self.head_done = True
        self._wake()

    def _read_head(self, head: bytes, status: int) -> bool:
        """The reason and fields of the head llhttp found valid in ``head`` (CRLF-ended lines,
        no obs-fold, names tokens); False for an interim response, skipped."""
        start = self.head_start
        while start < len(head) and head[start] == 13:  # llhttp skips empty lines before one
            start += 2
        line = head.find(b"\r\n", start)  # the status line's end
        end = head.find(b"\r\n\r\n", line)  # the last field's end (or the status line's)
        if head[start:start + 5] != b"HTTP/" or line < 0 or end < 0:
            raise UpstreamProtocolError("response head not where llhttp found one")  # never seen
        if end + 4 - start > MAX_RESPONSE_HEAD:
            raise UpstreamProtocolError(_OVERSIZED)
        if 100 <= status < 200 and status != 101:
            self.head_start = end + 4
            return False
        fields = field_list(head[line + 2:end + 2])
        if len(fields) > MAX_RESPONSE_FIELDS:
            raise UpstreamProtocolError(_OVERSIZED)
        for name, value in fields:
            if len(name) == 10 and name.lower() == b"keep-alive":
                self.keepalive_timeout = keepalive_timeout(value)
        self.headers, self.fields_memo = fields, None
        self.reason = head[start + 13:line]  # after "HTTP/1.1 200 " (llhttp checked the form)
        self.last_head = head[start:end + 4]
        return True

    def on_body(self, body: bytes) -> None:
        if not body:
            return  # httptools reports one at EOF; queued, it would read as the body's end
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.head_done:
            self._message_done(keep_alive=self.should_keep_alive())

    # --- the exchange, for the caller -------------------------------------------------------

    def begin(self, head: bytes, head_only: bool) -> None:
        """Send a request head; ``head_only`` says the response carries no body (HEAD)."""
        self.requests += 1
        self.head_only = head_only
        self.status = 0
        self.head = b""
        self.head_start = 0
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.received_any = False
        self.head_received = 0
        self.upgraded = False
        self.error = None
        if self.chunks:
            self.chunks = []
        self.buffered = 0
        if self.closed or self.transport is None or self.transport.is_closing():
            raise UpstreamClosed("pooled connection was already closed", sent=False)
        self.pool.outbox.write(self.transport, head)

    async def write(self, data: bytes, timeout: float) -> None:
        if self.error is not None:
            raise self.error
        if self.closed or self.transport is None:
            raise UpstreamClosed("backend closed the connection while the request was sent")
        self.pool.outbox.flush()  # the head first
        self.transport.write(data)
        if self.write_paused:
            fut = self.drain_waiter = self.loop.create_future()
            await self._wait(fut, timeout, "sending the request body")
            if self.closed:
                raise UpstreamClosed("backend closed the connection while the request was sent")

    async def read_head(self, timeout: float) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """The response head, which must be complete within ``timeout`` in all: a head that
        drips in a byte at a time does not reset the clock."""
        deadline = self.loop.time() + timeout if timeout > 0 else 0.0
        while not self.head_done:
            if self.error is not None:
                raise self.error
            left = deadline - self.loop.time() if deadline else 0.0
            try:
                if deadline and left <= 0:
                    raise UpstreamTimeout("")
                await self._wait_data(left, "waiting for the response head")
            except UpstreamTimeout:
                raise UpstreamTimeout(f"backend did not answer within {timeout:g}s while waiting "
                                      "for the response head") from None
        return self.status, self.reason, self.headers

    async def read_body(self, timeout: float) -> bytes:
        """The next decoded body chunk, b"" at the end."""
        while True:
            if self.chunks:
                chunk = self.take_body()  # all that is buffered, as one chunk
                if self.reading_paused and self.buffered < LOW_WATER and self.transport is not None:
                    self.reading_paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            await self._wait_data(timeout, "reading the response body")

    def take_body(self) -> bytes:
        """All the body buffered so far, at once (for a complete response: the whole body)."""
        chunks = self.chunks
        body = chunks.pop() if len(chunks) == 1 else b"".join(self._take_all())
        self.buffered = 0
        return body

    def _take_all(self) -> list[bytes]:
        chunks = self.chunks
        self.chunks = []
        return chunks

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.pool.outbox.flush()  # a head waiting for the loop to turn goes first
                self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- internals ----------------------------------------------------------------------------

    def _new_parser(self) -> None:
        """A fresh parser, with the methods used for every response looked up once: a method
        call by name looks the method up each time."""
        self.parser = parser = httptools.HttpResponseParser(self)
        self.feed: Callable[[bytes], None] = parser.feed_data
        self.get_status_code: Callable[[], int] = parser.get_status_code
        self.should_keep_alive: Callable[[], bool] = parser.should_keep_alive

    def _message_done(self, keep_alive: bool) -> None:
        self.complete = True
        self.keep_alive = keep_alive
        if self.head_only:
            self._new_parser()
            # A HEAD answer that announced a body: some servers send it anyway, and those bytes
            # would land in the next exchange on this connection. Never reuse it.
            for name, value in self.headers:
                low = name.lower()
                if (low == b"transfer-encoding"
                        or (low == b"content-length" and value.strip() not in (b"", b"0"))):
                    self.keep_alive = False
                    break
        self._wake()

    def _fail(self, error: UpstreamError) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if not self.closed:
            self.abort()

    def _wake(self) -> None:
        if self.listener is not None:
            self._tell = True  # told when the protocol callback returns: never from the parser
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _told(self) -> None:
        self._tell = False
        listener = self.listener
        if listener is not None:
            listener.upstream_ready()

    def _wake_drain(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait_data(self, timeout: float, doing: str) -> None:
        fut = self.waiter = self.loop.create_future()
        try:
            await self._wait(fut, timeout, doing)
        finally:
            self.waiter = None

    async def _wait(self, fut: asyncio.Future[Any], timeout: float, doing: str) -> None:
        # Future[Any]: _expire puts _TIMED_OUT in it, which compiled code would reject as None.
        handle = self.loop.call_later(timeout, _expire, fut) if timeout > 0 else None
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()
        if fut.result() is _TIMED_OUT:
            raise UpstreamTimeout(f"backend did not answer within {timeout:g}s while {doing}")


_TIMED_OUT: Final[Any] = object()
_LOCAL_ERRORS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


class ConnectionPool:
    """httpd's per-worker connection pool: ``min``, ``max``, ``smax`` + ``ttl``, ``acquire``,
    ``keepalive`` and ``disablereuse``. One per member, so one member can be flushed alone."""

    def __init__(self, member: MemberSpec, loop: asyncio.AbstractEventLoop, outbox: Outbox,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.member = member
        self.loop = loop
        self.outbox = outbox
        self.clock = clock
        spec = member.pool
        self.max = spec.max
        self.smax = spec.smax if spec.smax is not None else spec.max
        #: Oldest first. A list, not a deque: compiled, its pop and append are direct calls.
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self.closing = False
        self.opened_total = 0
        #: Idle connections closed by flushes (a member turned unusable, a keep-alive race).
        self.flushed_total = 0
        #: Every open connection, idle or busy: what a removal's grace period ends by cutting.
        self.conns: set[UpstreamConnection] = set()
        self._cut: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> int:
        return self.open - len(self.idle)

    async def acquire(self) -> UpstreamConnection:
        """A connection to the member: an idle one (most recent first) or a new one."""
        # Without `acquire`, wait at most the member's I/O timeout rather than forever.
        acquire = self.member.pool.acquire
        if acquire is None:
            acquire = self.member.timeout or None
        deadline = None if acquire is None else self.loop.time() + acquire
        while True:
            conn = self.take_idle(self.clock())
            if conn is not None:
                return conn
            if self.max is None or self.open < self.max:
                return await self._connect()
            # At `max`: wait for a connection handed back, or a slot freed (None).
            fut: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
            self.waiters.append(fut)
            try:
                left = None if deadline is None else max(0.0, deadline - self.loop.time())
                handed = await asyncio.wait_for(fut, left)
            except TimeoutError:
                raise PoolExhausted(
                    f"no connection to {self.member.name} came free within {acquire:g}s "
                    f"(max {self.max})", sent=False) from None
            finally:
                if fut in self.waiters:
                    self.waiters.remove(fut)
            if handed is not None:
                handed.reused = True
                return handed

    def take_idle(self, now: float) -> UpstreamConnection | None:
        """The most recently used idle connection, or None (then ``acquire`` must wait)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.closed:
                continue
            if now >= conn.expires:
                # The backend is about to close it (its Keep-Alive timeout): never reuse it.
                conn.close()
                self.drop(conn)
                continue
            conn.reused = True
            return conn
        return None

    async def _connect(self) -> UpstreamConnection:
        self.open += 1
        member = self.member
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), member.host, member.port),
                member.connectiontimeout or None)
        except TimeoutError:
            self._slot_freed()
            raise ConnectFailed(
                f"connect to {member.authority} timed out after {member.connectiontimeout:g}s",
                sent=False) from None
        except OSError as exc:
            self._slot_freed()
            if exc.errno in _LOCAL_ERRORS:
                # Out of descriptors or buffers here: not the member's fault, so no E mark.
                log.warning("connect to %s: %s (local resources exhausted)", member.authority,
                            exc.strerror or exc)
                raise PoolExhausted(f"local resources exhausted connecting to {member.authority}: "
                                    f"{exc.strerror or exc}", sent=False) from None
            raise ConnectFailed(f"connect to {member.authority} failed: {exc.strerror or exc}",
                                sent=False) from None
        except BaseException:
            self._slot_freed()
            raise
        self.opened_total += 1
        self.conns.add(proto)
        return proto

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Give a connection back after an exchange; it is closed unless ``reusable``."""
        if (conn.closed or not reusable or self.closing or self.member.pool.disablereuse
                or not conn.complete or not conn.keep_alive or conn.reading_paused):
            conn.close()
            self.drop(conn)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        conn.idle_since = now = self.clock()
        if conn.keepalive_timeout is not None:
            conn.expires = now + conn.keepalive_timeout - keepalive_margin(conn.keepalive_timeout)
        self.idle.append(conn)

    def drop(self, conn: UpstreamConnection) -> None:
        """Forget a closed connection and free its slot; safe to call more than once."""
        if not conn.counted:
            return
        conn.counted = False
        self.conns.discard(conn)
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self._slot_freed()

    def _slot_freed(self) -> None:
        self.open -= 1
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def close_idle(self) -> int:
        """Close every idle connection now (a flush); returns how many were closed."""
        count = 0
        while self.idle:
            conn = self.idle.pop()
            conn.close()
            self.drop(conn)
            count += 1
        self.flushed_total += count
        return count

    def close(self, grace: float | None = None) -> None:
        """Stop pooling: idle connections close now, busy ones when their exchange ends, or are
        cut once ``grace`` seconds have passed (a removed member's in-flight requests)."""
        self.closing = True
        self.close_idle()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)
        if grace is not None and self.conns and self._cut is None:
            self._cut = self.loop.call_later(grace, self.cut)

    def cut(self) -> int:
        """Abort every connection still open; returns how many."""
        conns = list(self.conns)
        for conn in conns:
            conn.abort()
            self.drop(conn)
        return len(conns)

    def same_connections(self, member: MemberSpec) -> bool:
        """Whether ``member`` would open the same connections (address and pool settings)."""
        old = self.member
        return (old.host, old.port, old.pool, old.connectiontimeout) == (
            member.host, member.port, member.pool, member.connectiontimeout)

    async def maintain(self, now: float) -> None:
        """Retire idle connections past ``ttl`` (above ``smax``) and pre-open up to ``min``."""
        spec = self.member.pool
        for conn in [c for c in self.idle if now >= c.expires]:
            conn.close()
            self.drop(conn)
        if spec.ttl is not None:
            floor = max(spec.min, self.smax or 0)
            # Oldest idle connections sit at the start of the list.
            while self.idle and self.open > floor and now - self.idle[0].idle_since >= spec.ttl:
                conn = self.idle[0]
                conn.close()
                self.drop(conn)
        while not self.closing and self.open < spec.min and (self.max is None or self.open < self.max):
            try:
                conn = await self._connect()
            except UpstreamError:
                return
            conn.idle_since = self.clock()
            self.idle.insert(0, conn)  # the cold end: most recent ones are reused first


def keepalive_timeout(value: bytes) -> float | None:
    """``timeout=N`` from a ``Keep-Alive`` response header (RFC 2068 §19.7.1.1)."""
    for part in value.split(b","):
        key, _, number = part.strip().partition(b"=")
        if key.strip().lower() == b"timeout":
            try:
                seconds = float(number.strip())
            except ValueError:
                return None
            return seconds if 0 < seconds < 86400 else None
    return None


def keepalive_margin(timeout: float) -> float:
    """Retire a connection this long before the backend's own idle timeout: a quarter of it, at
    most one second, so that a request never races the backend's close."""
    return min(1.0, timeout / 4)
