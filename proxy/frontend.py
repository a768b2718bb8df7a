"""The fast front end: an ``asyncio.Protocol`` HTTP/1.1 server over httptools (llhttp).

It does what aiohttp's low-level server did for the proxy, and nothing else: parse a request into
the seam's :class:`RequestHead` and a streamed :class:`Body`, call ``handle(head, body)``, and
write the :class:`Response`. The hot path is kept lean: the request head is built straight from
the parser callbacks, the response head is one ``bytes`` written together with the first body
chunk (one ``write``/``writev`` for a small response), the keep-alive timer is one lazily
re-armed handle per connection rather than one per request, and a request costs one Task.

Connection rules:

- Keep-alive as HTTP/1.1 says; ``Connection: close`` (or HTTP/1.0 without ``keep-alive``) gets a
  ``Connection: close`` response and the connection is closed after it. An idle connection is
  closed after ``keepalive_timeout`` seconds.
- Pipelined requests are answered in order, one at a time. httptools cannot stop in the middle of
  a buffer, so a request parsed while another is in flight is queued, and the socket is not read
  again until the queue is empty.
- Request bodies are buffered up to ``HIGH_WATER`` bytes, then the socket stops being read until
  the core has read them below ``LOW_WATER``. A body the core did not read is discarded when at
  most ``DISCARD_MAX`` bytes of it are left, otherwise the connection is closed after the
  response (a lingering close, so that the client still gets the response rather than a reset).
- Errors: a malformed request 400, a request line over ``max_request_line`` 414, a header
  field over ``max_header_size`` or a header section over ``max_header_section`` bytes 431,
  more than ``max_headers`` fields 400, and whatever :mod:`.hardening` refuses; each closes the
  connection. None of these requests reaches the core, so none reaches a backend.
- Slow clients: a request head must be complete within ``header_timeout`` of its first byte
  (of the accept, for a connection's first request), a body must keep up with
  ``body_timeout`` plus ``body_min_rate``; else 408 and the connection is closed. One sweep per
  server checks every connection a few times per timeout, so requests pay nothing for it.
- Upgrades: after a request with ``Upgrade`` (and no body) what the client sends next is held
  until the answer. A 101 whose Response carries ``upgrade`` turns the connection into a raw
  tunnel (:class:`ClientTunnel`, the seam's ClientStream) for as long as ``upgrade`` runs; any
  other answer and the held bytes are parsed as the next requests.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import httptools
from mypy_extensions import mypyc_attr

from .hardening import (
    DEFAULT_LIMITS,
    BadRequest,
    Limits,
    check_head,
    check_path,
    check_transfer_encoding,
    split_target,
)
from .headers import content_length_line
from .messages import (
    EMPTY_BODY,
    Body,
    ClientStream,
    FieldsMemo,
    RequestHead,
    Response,
    Sink,
    encode_head,
)
from .upstream import Outbox, UpstreamError

log = logging.getLogger("balancerpool.proxy")

Handler = Callable[[RequestHead, Body], Awaitable[Response]]
#: The core's fast lane: takes a bodiless request and answers through the Sink, or declines.
FastLane = Callable[[RequestHead, Sink], bool]

#: Request body bytes buffered before the client socket stops being read, and where it resumes.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024
#: Response bytes buffered in the transport before the writer waits for it to drain.
WRITE_HIGH_WATER: Final = 256 * 1024
WRITE_LOW_WATER: Final = 64 * 1024
#: Response bytes gathered before they are written even though more may follow at once.
FLUSH_SIZE: Final = 64 * 1024
#: Up to this size, gathered pieces are joined into one buffer for the write.
JOIN_SIZE: Final = 4096
#: At most this much of an unread request body is read and thrown away to keep the connection.
DISCARD_MAX: Final = 64 * 1024
#: How long a closing connection keeps reading (and dropping) what the client still sends.
LINGER_TIMEOUT: Final = 2.0
SHUTDOWN_GRACE: Final = 5.0

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PHRASES: Final = {s.value: s.phrase for s in http.HTTPStatus}
#: Status lines with their standard reason phrase, ready to write.
_STATUS_LINES: Final = {code: f"HTTP/1.1 {code} {phrase}\r\n".encode() for code, phrase in _PHRASES.items()}
_VERSIONS: Final = {"1.1": (1, 1), "1.0": (1, 0)}
_V11: Final = _VERSIONS["1.1"]
_METHODS: Final[dict[bytes, str]] = {}


@mypyc_attr(native_class=False)
class ClientGone(ConnectionResetError):
    """The client closed the connection (or half-closed it in the middle of a request body)."""


class RequestBody:
    """The seam's Body over the bytes httptools hands to one request."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_error", "_waiter", "complete", "discarding",
                 "expect", "length", "received")

    def __init__(self, conn: HttpConnection, length: int | None, expect: bool) -> None:
        self.length = length
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self.complete = False
        #: ``Expect: 100-continue`` was asked for and the interim response is not written yet.
        self.expect = expect
        self.discarding = False
        self.received = 0

    async def read(self) -> bytes:
        if self.expect:
            self.expect = False
            if not self._chunks and not self.complete and self._error is None:
                self._conn._send_continue()
        while True:
            if self._error is not None:
                raise self._error  # what arrived before the break is of no use
            chunks = self._chunks
            if chunks:
                chunk = b"".join(chunks)  # the one chunk itself when there is one
                chunks.clear()
                self._buffered = 0
                conn = self._conn
                if conn._reading_paused:
                    conn._maybe_resume()
                return chunk
            if self.complete:
                return b""
            fut = self._waiter = self._conn._loop.create_future()
            try:
                await fut
            finally:
                self._waiter = None

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _done(self) -> None:
        self.complete = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.complete:
            self._error = error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _discard(self) -> None:
        """Drop what is buffered and whatever still arrives for this body."""
        self.discarding = True
        self.expect = False
        self._chunks.clear()
        self._buffered = 0


class ClientTunnel:
    """The seam's ClientStream: the client's side of an upgraded connection, raw bytes both
    ways, with the same backpressure as request bodies."""

    __slots__ = ("_buffered", "_chunks", "_conn", "_ended", "_waiter")

    def __init__(self, conn: HttpConnection) -> None:
        self._conn = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._ended = False
        self._waiter: asyncio.Future[None] | None = None

    async def read(self) -> bytes:
        """The next bytes from the client, b"" once it closed (or half-closed)."""
        conn = self._conn
        while True:
            chunks = self._chunks
            if chunks:
                data = b"".join(chunks)
                chunks.clear()
                self._buffered = 0
                if conn._reading_paused and not conn._lost:
                    conn._reading_paused = False
                    conn._transport.resume_reading()
                return data
            if self._ended or conn._lost:
                return b""
            fut = self._waiter = conn._loop.create_future()
            try:
                await fut
            finally:
                self._waiter = None

    async def write(self, data: bytes) -> None:
        conn = self._conn
        if conn._lost or conn._transport.is_closing():
            raise ClientGone("the client closed the connection")
        conn._transport.write(data)
        if conn._write_paused:
            await conn._drain()

    def close(self) -> None:
        conn = self._conn
        if not conn._lost and not conn._transport.is_closing():
            conn._transport.close()

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self._wake()
        if self._buffered > HIGH_WATER:
            self._conn._pause()

    def _end(self) -> None:
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# A queued pipelined request, or the status of a parse error to answer in its turn.
#: A request parsed while another is served, or the refusal of one.
_Queued = tuple[RequestHead, Body, bool] | BadRequest


class HttpConnection(asyncio.Protocol, Sink):
    """One client connection."""

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._outbox = server.outbox
        self._handle = server.handler
        self._fast = server.fast
        #: The request in the fast lane, and whether its connection may be kept.
        self._fast_head: RequestHead | None = None
        self._fast_keep = False
        self._loop = server.loop
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)
        #: ``_transport.is_closing``, looked up once: asked before every response.
        self._is_closing: Callable[[], bool] = _not_closing
        self._parser = httptools.HttpRequestParser(self)
        #: ``_parser.feed_data``, looked up once (as in UpstreamConnection).
        self._feed: Callable[[bytes], None] = self._parser.feed_data
        self._get_method: Callable[[], bytes] = self._parser.get_method
        self._should_keep_alive: Callable[[], bool] = self._parser.should_keep_alive
        self._limits = server.limits
        self._client = ""
        self._lost = False
        self._eof = False
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # Output gathered for one write.
        self._out: list[bytes] = []
        self._out_size = 0
        #: In the server's list of connections to flush when the event loop turns.
        self._flush_queued = False
        # The request being parsed.
        self._url = b""
        #: The fields as parsed; the last request's, raw and decoded: a keep-alive client sends
        #: the same fields again and again, and then gets the same (never mutated) list.
        self._raw: list[tuple[bytes, bytes]] = []
        self._last_raw: list[tuple[bytes, bytes]] | None = None
        self._last_headers: list[tuple[str, str]] = []
        #: While ``_matching``, ``_raw`` is ``_last_raw``, never changed, and the fields parsed
        #: so far equal its first ``_matched``; at the first difference they are copied into a
        #: list of their own. The same fields as the last request's: no tuple made, nothing
        #: compared at the end, nothing decoded.
        self._matching = False
        self._matched = 0
        #: The core's memo of this connection's forwarded fields.
        self._memo = FieldsMemo()
        #: The last request's method, as parsed and as a str.
        self._last_method = (b"GET", "GET")
        self._host: str | None = None
        #: The last Host value that passed the head checks (most requests repeat it).
        self._checked_host: str | None = None
        self._length = 0
        self._chunked = False
        self._expect = False
        self._upgrade = False
        #: The head has a Connection field (else llhttp's keep-alive answer gives the version).
        self._connection = False
        self._in_head = False
        self._head_size = 0
        #: The head's request line and complete fields, as parsed (max_header_section).
        self._fields_size = 0
        #: Bytes of a chunked body received since the last body data (framing and trailers).
        self._framing = 0
        #: When the head being received started (None: not timed yet); the server's sweep
        #: compares it with header_timeout.
        self._head_since: float | None = None
        #: When the body being received was last seen moving, and its size then (body_timeout).
        self._body_since: float | None = None
        self._body_base = 0
        self._error_status = 400
        self._body_in: RequestBody | None = None
        #: A body llhttp skipped (an Upgrade request's): fed again after a synthetic head.
        self._upgrade_body: RequestBody | None = None
        self._synthetic = False
        #: Input after an Upgrade request, held until its answer says HTTP or tunnel.
        self._held: bytes | None = None
        #: The Upgrade request the held input waits on, and the last Upgrade request parsed.
        self._held_for: RequestHead | None = None
        self._upgrade_head: RequestHead | None = None
        self._tunnel: ClientTunnel | None = None
        #: Input goes to ``_held`` or ``_tunnel`` instead of the parser.
        self._diverted = False
        #: No more input is parsed: after a parse error, a half-close, a CONNECT or while closing.
        self._stop_parsing = False
        #: Close after the current response (a discarded body grew past DISCARD_MAX).
        self._must_close = False
        # Requests.
        self._serving = False
        self._task: asyncio.Task[None] | None = None
        self._queue: deque[_Queued] | None = None
        # Timers: one handle, re-armed lazily (no per-request timer).
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._closing = False

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._is_closing = self._transport.is_closing
        server = self._server
        server.connections.add(self)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client = peer[0] if isinstance(peer, tuple) else str(peer)
        self._transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if server.closing:
            self._closing = True
            transport.close()
            return
        self._idle_since = self._head_since = self._loop.time()
        self._timer = self._loop.call_later(self._limits.keepalive_timeout, self._on_timer)
        server._watch(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if not self._serving:
            self._server._forget(self)  # else when its task ends: shutdown waits for that task
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._out.clear()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        gone = ClientGone("the client closed the connection")
        if self._body_in is not None:
            self._body_in._fail(gone)
        if self._upgrade_body is not None:
            self._upgrade_body._fail(gone)
        if self._tunnel is not None:
            self._tunnel._end()
        if self._queue:
            for item in self._queue:
                if isinstance(item, tuple) and isinstance(item[1], RequestBody):
                    item[1]._fail(gone)

    def data_received(self, data: bytes) -> None:
        if self._stop_parsing or self._diverted:
            if self._tunnel is not None:
                self._tunnel._feed(data)
            elif self._held is not None and not self._stop_parsing:
                self._held += data
            return  # else closing, or after a parse error: what comes now is dropped
        feed = self._feed
        before = self._body_in
        received = before.received if before is not None else 0
        while True:
            try:
                feed(data)
            except httptools.HttpParserUpgrade as exc:
                data = data[exc.args[0]:]
                if not self._after_upgrade(data) or not data:
                    return
                continue
            except httptools.HttpParserError as exc:
                self._parse_error(exc)
                return
            break
        if self._in_head:
            # httptools holds a field in progress itself: count the feeds after the one the head
            # began in (that one may hold earlier pipelined requests; it is bounded by the read
            # size anyway).
            if self._head_size < 0:
                self._head_size = 0
            else:
                self._head_size += len(data)
                if self._head_size > self._limits.max_header_section:
                    self._parse_error(BadRequest(
                        431, f"request header section over {self._limits.max_header_section} bytes"))
            return
        body = self._body_in
        if body is not None and body.length is None and not body.complete:
            # Chunked framing, extensions and trailers: bytes that carry no body data must not
            # pile up (httptools builds a trailer field up in memory).
            if body is before and body.received == received:
                self._framing += len(data)
                if self._framing > self._limits.max_header_section:
                    self._parse_error(BadRequest(
                        431, f"over {self._limits.max_header_section} bytes of chunk framing or "
                             "trailers without body data"))
            else:
                self._framing = 0

    def eof_received(self) -> bool:
        self._eof = True
        if self._tunnel is not None:
            self._tunnel._end()  # the tunnel ends; it closes the connection itself
            return True
        body = self._body_in
        if body is not None and not body.complete:
            body._fail(ClientGone("the client closed the connection in the middle of the body"))
        if self._serving and not self._lingering:
            # A half-close after a request: answer it (and what is queued), then close.
            self._stop_parsing = True
            return True
        self._outbox.flush()  # the transport closes on return: what waits for the loop first
        return False

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks ----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_head = True
        self._url = b""
        last = self._last_raw
        if last is not None:
            self._raw, self._matching, self._matched = last, True, 0
        else:
            self._raw = []
        self._fields_size = 0
        self._head_size = -1  # began in this feed: data_received counts from the next one
        self._framing = 0
        self._host = None
        self._length = 0
        self._chunked = False
        self._expect = False
        self._upgrade = False
        self._connection = False

    def on_url(self, url: bytes) -> None:
        url = self._url + url if self._url else url
        self._url = url
        self._fields_size = len(url) + 16
        limit = self._limits.max_request_line
        if len(url) > limit - 20 and len(self._parser.get_method()) + len(url) + 10 > limit:
            self._error_status = 414
            raise BadRequest(414, f"request line over {limit} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field: not forwarded (its bytes are bounded in data_received)
        limits = self._limits
        if (self._matched if self._matching else len(self._raw)) >= limits.max_headers:
            raise BadRequest(400, f"more than {limits.max_headers} header fields")
        size = len(name)
        if size + len(value) + 2 > limits.max_header_size:
            raise BadRequest(431, f"a request header field over {limits.max_header_size} bytes")
        self._fields_size += size + len(value) + 4
        if self._fields_size > limits.max_header_section:
            raise BadRequest(431, f"request header section over {limits.max_header_section} bytes")
        if not (self._matching and self._matches(name, value)):
            self._raw.append((name, value))
        # The usual spelling first: lower() is a method call.
        if size == 4:
            if name == b"Host" or name.lower() == b"host":
                if self._host is not None:
                    raise BadRequest(400, "more than one Host header field")
                self._host = value.decode("latin-1")
        elif size == 14:
            if name.lower() == b"content-length":
                self._length = int(value)  # llhttp has checked the digits and refused duplicates
        elif size == 17:
            if name.lower() == b"transfer-encoding":
                # llhttp finds a bad one only where the body starts, after the head went out.
                check_transfer_encoding(value.decode("latin-1"))
                self._chunked = True
        elif size == 6:
            if (name[0] | 0x20 == 0x65  # e: not Accept, Cookie, Origin, Pragma ...
                    and name.lower() == b"expect" and value.strip().lower() == b"100-continue"):
                self._expect = True
        elif size == 7 and name.lower() == b"upgrade":
            self._upgrade = True
        elif size == 10 and name[0] | 0x20 == 0x63 and name.lower() == b"connection":  # c: not User-Agent
            self._connection = True
        elif size == 16 and name[0] | 0x20 == 0x70 and name.lower() == b"proxy-connection":
            self._connection = True  # llhttp reads it as it reads Connection

    def _matches(self, name: bytes, value: bytes) -> bool:
        """Whether this field is the last request's at the same place; when not, the fields so
        far get a list of their own (see ``_matching``)."""
        raw = self._raw
        i = self._matched
        if i < len(raw):
            known = raw[i]
            if known[0] == name and known[1] == value:
                self._matched = i + 1
                return True
        self._matching = False
        self._raw = raw[:i]
        return False

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._matching:
            self._matching = False
            if self._matched < len(self._raw):  # fewer fields than the last request
                self._raw = self._raw[:self._matched]
        self._head_size = 0
        self._head_since = None
        if self._synthetic:
            # The made-up head in front of an Upgrade request's body: only its body counts.
            self._synthetic = False
            return
        if self._stop_parsing:
            return  # the connection closes after the response in flight: nothing new starts
        raw_method = self._get_method()
        if raw_method == self._last_method[0]:  # a compare, where a lookup hashes the bytes
            method = self._last_method[1]
        else:
            found = _METHODS.get(raw_method)
            if found is None:
                found = _METHODS[raw_method] = raw_method.decode("ascii")
            method = found
            self._last_method = (raw_method, method)
        keep_alive = self._should_keep_alive()
        if keep_alive and not self._connection:
            # llhttp keeps a connection open by default for HTTP/1.1 alone (of the versions it
            # parses: 0.9, 1.0, 1.1, 2.0), and get_http_version() formats a string each call.
            version = _V11
        else:
            raw_version = self._parser.get_http_version()
            version = _VERSIONS.get(raw_version) or _version(raw_version)
        url = self._url.decode("latin-1")
        host = self._host
        if url[:1] == "/":
            mark = url.find("?")  # not partition(): no tuple, and no string without a query
            if mark < 0:
                path, query = url, ""
            else:
                path, query = url[:mark], url[mark + 1:]
            if (version != _V11 or host is None or host != self._checked_host or self._chunked
                    or method == "CONNECT"):
                check_head(method, version, url, host, None, self._chunked)
                self._checked_host = host
        else:
            path, query, authority = split_target(url)
            check_head(method, version, url, host, authority, self._chunked)
            if authority is not None:
                host = authority
        if "/." in path or "%" in path or "\\" in path:
            check_path(path)
        if host is None:
            host = ""
        if self._chunked:
            body: Body = RequestBody(self, None, self._expect)
        elif self._length:
            body = RequestBody(self, self._length, self._expect)
        else:
            body = EMPTY_BODY
        raw = self._raw
        if raw is self._last_raw:  # the same fields (see _matching)
            headers = self._last_headers
        else:
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in raw]
            self._last_raw, self._last_headers = raw, headers
        head = RequestHead(method, path, query, version, headers, host, self._client,
                           memo=self._memo)
        if self._upgrade:
            self._upgrade_head = head
            keep_alive = self._upgrade_request(body, keep_alive)
        elif body is not EMPTY_BODY:
            self._body_in = cast(RequestBody, body)
        if self._serving:
            self._enqueue((head, body, keep_alive))
        else:
            self._serving = True
            self._idle_since = None
            self._dispatch(head, body, keep_alive)

    def _dispatch(self, head: RequestHead, body: Body, keep_alive: bool) -> None:
        """Offer a bodiless request to the core's fast lane; else (or when declined) one Task
        serves it and whatever is queued behind it."""
        fast = self._fast
        if fast is not None and body is EMPTY_BODY and head is not self._upgrade_head:
            self._fast_head, self._fast_keep = head, keep_alive
            if fast(head, self):
                return
        self._task = self._loop.create_task(self._serve(head, body, keep_alive))

    # --- the fast lane's Sink ---------------------------------------------------------------

    def respond(self, response: Response) -> None:
        head = self._fast_head
        assert head is not None
        if response.body is None:
            self.respond_later(_ready(response))  # a body still coming: streamed by a Task
            return
        keep = self._write_now(head, response, self._fast_keep)
        self._fast_head = None
        self._next(head, keep)

    def respond_later(self, response: Awaitable[Response]) -> None:
        head = self._fast_head
        assert head is not None
        self._fast_head = None
        self._task = self._loop.create_task(self._serve(head, EMPTY_BODY, self._fast_keep, response))

    def _next(self, head: RequestHead, keep: bool) -> None:
        """After a fast-lane response."""
        item = self._after(head, keep)
        if item is not None:
            self._dispatch(*item)
            return
        self._serving = False
        if self._lost:
            self._server._forget(self)

    def _after(self, head: RequestHead, keep: bool) -> tuple[RequestHead, Body, bool] | None:
        """Between two requests: the next queued one to serve, or None when there is none (the
        connection is then idle, or closed when it may not be kept)."""
        if keep and not self._lost:
            if self._held_for is head:
                self._release_held()  # an Upgrade request answered in HTTP: parse on
            queue = self._queue
            if queue:
                item = queue.popleft()
                if not queue:
                    self._maybe_resume()
                if not isinstance(item, BadRequest):
                    return item
                self._send_error(item.status, item.detail)
            elif not (self._stop_parsing or self._closing):
                self._serving = False
                self._idle_since = self._server.time()
                if self._reading_paused:
                    self._maybe_resume()
                return None
        self._close()
        return None

    def on_body(self, data: bytes) -> None:
        body = self._body_in
        if body is None or not data:
            return  # (llhttp reports an empty piece when fed b"": it is not the end)
        body.received += len(data)
        if body.discarding:
            # A Content-Length rest was checked against DISCARD_MAX before; a chunked one is
            # counted from the start of the discard.
            if body.length is None and body.received > DISCARD_MAX and not self._must_close:
                # More than we are willing to throw away: close after the response instead.
                self._must_close = True
                self._stop_parsing = True
                self._pause()
            return
        body._feed(data)
        if body._buffered > HIGH_WATER and not self._reading_paused:
            self._pause()

    def on_message_complete(self) -> None:
        body = self._body_in
        if body is not None:
            self._body_in = None
            body._done()

    # --- the request cycle ------------------------------------------------------------------

    async def _serve(self, head: RequestHead, body: Body, keep_alive: bool,
                     pending: Awaitable[Response] | None = None) -> None:
        """Answer a request, then every request queued behind it; runs as one Task.
        ``pending``: the first request's response, from the fast lane."""
        try:
            while True:
                keep = await self._respond(head, body, keep_alive, pending)
                pending = None
                item = self._after(head, keep)
                if item is None:
                    return
                head, body, keep_alive = item
        except asyncio.CancelledError:
            self._abort()
            raise
        except Exception:
            log.exception("front end: request failed")
            self._abort()
        finally:
            self._serving = False
            if self._lost:
                self._server._forget(self)

    async def _respond(self, head: RequestHead, body: Body, keep_alive: bool,
                       pending: Awaitable[Response] | None = None) -> bool:
        """Write the response to one request; True when the connection may serve another."""
        try:
            response = await (self._handle(head, body) if pending is None else pending)
        except BadRequest as exc:
            self._send_error(exc.status, exc.detail)
            return False
        except ConnectionError:
            log.debug("client %s went away while sending its request", head.client)
            return False
        except Exception:
            log.exception("front end: handling %s %s failed", head.method, head.path)
            self._send_error(500, "internal error")
            return False
        if body is not EMPTY_BODY:
            request_body = cast(RequestBody, body)
            if not request_body.complete and not self._settle(request_body):
                keep_alive = False
        if response.body is not None and response.status != 101:
            return self._write_now(head, response, keep_alive)
        ok = False
        try:  # from here on, finish() is called whatever happens
            if self._lost:
                log.debug("client %s went away before the response", head.client)
                return False
            if response.status == 101:
                ok = await self._run_tunnel(response, head)
                return False
            data, bodiless, chunked, keep_alive = self._response_head(head, response, keep_alive)
            if bodiless:
                self._send(data)
            else:
                sent = await self._stream(response, data, chunked)
                if response.length is not None and sent != response.length:
                    self._wrong_length(response, sent)
                    return False
            ok = True
        except UpstreamError as error:  # mypyc: one type per `except ... as` name
            # The head is out (or promised): all that is left is to cut the client connection,
            # so that it sees a truncated response rather than a complete-looking one.
            log.warning("pool %s: member %s failed mid-response: %s",
                        response.info.get("pool"), response.info.get("member"), error)
            self._abort()
            return False
        except ConnectionError:
            log.debug("client %s went away during the response", head.client)
            return False
        finally:
            response.finish(ok)
        return keep_alive and not self._must_close

    def _write_now(self, head: RequestHead, response: Response, keep_alive: bool) -> bool:
        """Write a response whose body is at hand in one write; True when the connection may
        serve another request."""
        ok = False
        try:
            if self._lost or self._is_closing():
                log.debug("client %s went away before the response", head.client)
                return False
            body = response.body
            assert body is not None
            length = response.length
            # The usual response, with its length as announced: head and body in one join.
            whole = length is not None and len(body) == length and length <= JOIN_SIZE
            data, bodiless, chunked, keep_alive = self._response_head(
                head, response, keep_alive, body if whole else b"")
            if whole or bodiless:
                self._send(data)
            else:
                if length is not None and len(body) != length:
                    self._outbox.flush()
                    self._transport.write(data)
                    self._wrong_length(response, len(body))
                    return False
                if chunked:
                    body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
                if len(body) <= JOIN_SIZE:
                    self._send(data + body)
                else:  # one writev, now: a burst of such writes gains nothing from waiting
                    self._outbox.flush()
                    self._transport.writelines([data, body])
            ok = True
        finally:
            response.finish(ok)
        return keep_alive and not self._must_close

    def _wrong_length(self, response: Response, sent: int) -> None:
        # Whatever the cause, the client's framing is broken: cut the connection rather than
        # leave it waiting for bytes that will never come.
        log.warning("pool %s: member %s: response body of %d bytes, %d announced",
                    response.info.get("pool"), response.info.get("member"), sent, response.length)
        self._abort()

    def _response_head(self, head: RequestHead, response: Response, keep_alive: bool,
                       body: bytes = b"") -> tuple[bytes, bool, bool, bool]:
        """The response head's bytes (followed by ``body`` unless the response is bodiless), and
        whether the response is bodiless, chunked and followed by another on this connection."""
        status = response.status
        method = head.method
        major, minor = head.version
        http10 = major < 1 or (major == 1 and minor < 1)  # compiled: no tuples made to compare
        if self._closing or self._must_close or (self._stop_parsing and not self._queue):
            keep_alive = False
        length = response.length
        chunked = False
        if method == "HEAD" or status < 200 or status == 204 or status == 304:
            bodiless = True
            framing = (b"Content-Length: %d\r\n" % length
                       if length is not None and method == "HEAD" and status >= 200
                       and status != 204 and status != 304 else b"")
            if status < 200:
                keep_alive = False  # 101 cannot be followed here (no tunnel yet)
        else:
            bodiless = False
            if length is not None:
                framing = content_length_line(length)
            elif http10:
                framing = b""
                keep_alive = False  # the end of the body is the end of the connection
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                chunked = True
        if not keep_alive:
            framing += b"Connection: close\r\n"
        elif http10:
            framing += b"Connection: keep-alive\r\n"
        reason = response.reason
        line = (_STATUS_LINES.get(status) if not reason or reason == _PHRASES.get(status)
                else None) or encode_head(f"HTTP/1.1 {status} {reason}\r\n")
        return (b"".join((line, response.field_block(), framing, b"\r\n", b"" if bodiless else body)),
                bodiless, chunked, keep_alive)

    async def _run_tunnel(self, response: Response, head: RequestHead) -> bool:
        """A 101: write the head, then the connection is a tunnel while ``upgrade`` runs."""
        upgrade = response.upgrade
        if upgrade is None or self._held_for is not head:
            # Nothing to tunnel to, or the request was no Upgrade we held input for.
            log.warning("pool %s: member %s: 101 response without an upgrade to run; closed",
                        response.info.get("pool"), response.info.get("member"))
            self._abort()
            return False
        self._outbox.flush()
        self._transport.write(
            encode_head(f"HTTP/1.1 101 {response.reason or 'Switching Protocols'}\r\n")
            + response.field_block() + b"\r\n")
        tunnel = self._tunnel = ClientTunnel(self)
        held = self._held
        self._held = self._held_for = None
        if held:
            tunnel._feed(held)
        if self._eof:
            tunnel._end()
        if self._reading_paused and tunnel._buffered <= HIGH_WATER:
            self._reading_paused = False
            self._transport.resume_reading()
        stream: ClientStream = tunnel
        await upgrade(stream)
        return True

    def _release_held(self) -> None:
        held = self._held or b""
        self._held = self._held_for = None
        self._diverted = False
        if held:
            self.data_received(held)

    async def _stream(self, response: Response, head: bytes, chunked: bool) -> int:
        """Write the head and the body; the head waits for the first chunk (one write) unless
        that chunk is not there before the event loop turns. Returns the body size."""
        sent = 0
        self._outbox.flush()  # a response before this one goes first
        out = self._out
        out.append(head)
        self._out_size = len(head)
        if not self._flush_queued:
            self._server._queue_flush(self)
        try:
            async for chunk in response.chunks():
                if not chunk:
                    continue
                if self._lost:
                    raise ClientGone("the client closed the connection")
                if chunked:
                    out.append(b"%x\r\n" % len(chunk))
                    out.append(chunk)
                    out.append(b"\r\n")
                else:
                    out.append(chunk)
                sent += len(chunk)
                self._out_size += len(chunk)
                if self._out_size >= FLUSH_SIZE or self._write_paused:
                    self._flush()
                    if self._write_paused:  # the client reads slower than the backend sends
                        await self._drain()
                elif not self._flush_queued:
                    self._server._queue_flush(self)
            if self._lost:
                raise ClientGone("the client closed the connection")
            if chunked:
                out.append(b"0\r\n\r\n")
            self._flush()
            return sent
        except BaseException:
            out.clear()
            self._out_size = 0
            raise

    def _send(self, data: bytes) -> None:
        """Write ``data`` when the event loop turns, with every other response and request head
        made meanwhile (``Outbox``): a burst of writes wakes each peer once rather than once per
        write. Whatever is written straight to the transport flushes the outbox first, so that
        nothing overtakes what waits there."""
        self._outbox.write(self._transport, data)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        if not self._lost:
            if len(out) == 1:
                self._transport.write(out[0])
            elif self._out_size <= JOIN_SIZE:
                self._transport.write(b"".join(out))  # a copy is cheaper than a writev setup
            else:
                self._transport.writelines(out)
        out.clear()
        self._out_size = 0

    async def _drain(self) -> None:
        """Wait until the client reads; one that reads nothing for ``send_timeout`` is cut, so
        that it cannot hold a member's connection forever."""
        timeout = self._limits.send_timeout
        while self._write_paused and not self._lost:
            fut = self._drain_waiter = self._loop.create_future()
            timer = self._loop.call_later(timeout, _expire, fut)
            try:
                await fut
            finally:
                timer.cancel()
                self._drain_waiter = None
            if fut.result() is _TIMED_OUT and self._write_paused and not self._lost:
                log.info("client %s read nothing for %gs; connection cut", self._client, timeout)
                self._abort()
        if self._lost:
            raise ClientGone("the client closed the connection")

    def _settle(self, body: RequestBody) -> bool:
        """The core did not read all of ``body``: can the connection be kept (rest discarded)?"""
        if (body.expect and body.received == 0) or body._error is not None:
            return False  # never asked for (100 Continue unsent), or broken
        if body.length is not None and body.length - body.received > DISCARD_MAX:
            return False
        body._discard()
        if body.length is None:
            body.received = 0  # from now on, counts what is thrown away
        if self._reading_paused:
            self._maybe_resume()
        return True

    def _send_continue(self) -> None:
        if not self._lost and not self._transport.is_closing():
            self._outbox.flush()
            self._transport.write(_CONTINUE)

    def _send_error(self, status: int, detail: str) -> None:
        """A response of the front end's own (400, 414, 431, 500); the connection closes after."""
        if self._lost or self._transport.is_closing():
            return
        text = f"{status} {_PHRASES.get(status, 'Error')}: {detail}\n".encode("ascii", "replace")
        self._outbox.flush()
        self._transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s"
            % (status, _PHRASES.get(status, "Error").encode("ascii"), len(text), text))

    # --- parsing states ---------------------------------------------------------------------

    def _enqueue(self, item: _Queued) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(item)
        self._pause()

    def _parse_error(self, exc: Exception) -> None:
        refused = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
        if isinstance(refused, BadRequest):
            status, detail = refused.status, refused.detail
        else:
            status, detail = self._error_status, str(exc) or "malformed request"
        if status != 400:
            log.info("client %s: %d %s", self._client, status, detail)
        self._stop_parsing = True
        self._pause()
        body = self._body_in
        if body is not None and not self._in_head:
            # Broken inside a body: the request that owns it fails when the core reads on.
            body._fail(BadRequest(status, detail))
            return
        if self._serving:
            self._enqueue(BadRequest(status, detail))
        else:
            self._send_error(status, detail)
            self._close()

    def _upgrade_request(self, body: Body, keep_alive: bool) -> bool:
        """llhttp treats an ``Upgrade`` request as the end of HTTP on the connection. Here it is
        an ordinary request (no tunnel yet); returns keep-alive. (``CONNECT`` never gets here:
        it is refused with the head.)"""
        if body is not EMPTY_BODY:
            if self._parser.should_upgrade():
                self._upgrade_body = cast(RequestBody, body)  # llhttp skips it: fed again later
            else:
                self._body_in = cast(RequestBody, body)
        return keep_alive

    def _after_upgrade(self, rest: bytes) -> bool:
        """After llhttp stopped at an Upgrade request: hold what follows until the answer (a
        101 may turn it into a tunnel); or, for a request with a body (not a WebSocket), parse
        the body and what follows as HTTP at once. False when nothing more is to be parsed."""
        if self._stop_parsing:
            return False
        body = self._upgrade_body
        if body is None:
            self._held = rest
            self._held_for = self._upgrade_head
            self._diverted = True
            self._pause()
            return False
        if body is not None:
            self._upgrade_body = None
            self._body_in = body
            self._synthetic = True
            framing = (b"Transfer-Encoding: chunked" if body.length is None
                       else b"Content-Length: %d" % body.length)
            try:
                self._parser.feed_data(b"POST / HTTP/1.1\r\n" + framing + b"\r\n\r\n")
            except httptools.HttpParserError as exc:  # pragma: no cover - a fixed, valid head
                self._parse_error(exc)
                return False
        return True

    # --- flow control and closing -----------------------------------------------------------

    def _pause(self) -> None:
        if not self._reading_paused and not self._lost:
            self._reading_paused = True
            self._transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (not self._reading_paused or self._lost or self._stop_parsing or self._queue
                or self._diverted):
            return
        body = self._body_in
        if body is not None and body._buffered >= LOW_WATER:
            return
        self._reading_paused = False
        self._transport.resume_reading()

    def _close(self) -> None:
        """Close after the response: at once when the input is clean, else a lingering close
        (stop writing, read and drop what the client still sends) so that the client reads the
        response rather than a reset."""
        transport = self._transport
        if self._lost or self._lingering or transport.is_closing():
            self._serving = False
            return
        self._outbox.flush()
        body = self._body_in
        dirty = (self._stop_parsing and not self._eof) or self._must_close or self._in_head or (
            body is not None and not body.complete)
        self._stop_parsing = True
        self._serving = False
        if not dirty or self._eof:
            transport.close()
            return
        self._lingering = True
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(LINGER_TIMEOUT, self._on_timer)

    def _abort(self) -> None:
        self._stop_parsing = True
        if not self._lost:
            # Nothing may be written from now on (uvloop raises on a closed transport);
            # connection_lost() follows and does the rest.
            self._lost = True
            self._out.clear()
            self._transport.abort()

    def _on_timer(self) -> None:
        self._timer = None
        if self._lost:
            return
        loop = self._loop
        if self._lingering:
            if self._transport.get_write_buffer_size():
                self._timer = loop.call_later(LINGER_TIMEOUT, self._on_timer)  # still sending
            else:
                self._transport.close()
            return
        timeout = self._limits.keepalive_timeout
        idle = self._idle_since
        if idle is None:
            self._timer = loop.call_later(timeout, self._on_timer)
            return
        left = idle + timeout - loop.time()
        if left > 0.001:
            self._timer = loop.call_later(left, self._on_timer)
            return
        log.debug("client %s: keep-alive connection idle for %gs, closed", self._client, timeout)
        self._stop_parsing = True
        self._transport.close()

    def _check_slow(self, now: float) -> None:
        """The sweep's look at this connection: a head past header_timeout, a body behind
        body_timeout and body_min_rate."""
        if self._lost or self._lingering or self._stop_parsing:
            return
        limits = self._limits
        since = self._head_since
        if self._in_head:
            if since is None:
                self._head_since = now  # a keep-alive connection's next request: timed from here
            elif now - since > limits.header_timeout:
                self._parse_error(BadRequest(
                    408, f"request head not complete after {limits.header_timeout:g}s"))
                return
        elif since is not None and not self._serving and now - since > limits.header_timeout:
            # A new connection that never sent a byte: close without an answer, as for an idle
            # keep-alive connection.
            log.debug("client %s: nothing received in %gs, closed", self._client, limits.header_timeout)
            self._stop_parsing = True
            self._transport.close()
            return
        body = self._body_in
        if body is None or body.complete or body.expect or self._reading_paused:
            self._body_since = None  # not the client's turn: the window starts when it is
            return
        if self._body_since is None:
            self._body_since, self._body_base = now, body.received
            return
        allowed = limits.body_timeout + (
            (body.received - self._body_base) / limits.body_min_rate if limits.body_min_rate else 0.0)
        if now - self._body_since > allowed:
            detail = (f"request body too slow: {body.received - self._body_base} bytes in "
                      f"{now - self._body_since:.1f}s")
            log.info("client %s: %s; 408, closed", self._client, detail)
            self._stop_parsing = True
            self._pause()
            body._fail(BadRequest(408, detail))
            self._body_in = None
            if not self._serving:
                self._send_error(408, detail)
                self._close()

    def _shutdown(self) -> None:
        """Stop serving: close now when idle, after the request in flight otherwise."""
        self._closing = True
        if not self._serving and not self._lost and not self._lingering:
            self._stop_parsing = True
            self._outbox.flush()  # a response that waits for the loop to turn
            self._transport.close()


_TIMED_OUT: Final[Any] = object()


def _not_closing() -> bool:
    return False


async def _ready(response: Response) -> Response:
    return response


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


def _version(text: str) -> tuple[int, int]:
    """An HTTP version other than 1.0 and 1.1, for check_head to refuse."""
    major, _, minor = text.partition(".")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else (0, 0)


class HttpServer:
    """The protocol factory for ``loop.create_server`` plus the set of open connections."""

    def __init__(self, handler: Handler, *, limits: Limits = DEFAULT_LIMITS,
                 loop: asyncio.AbstractEventLoop | None = None, fast: FastLane | None = None,
                 outbox: Outbox | None = None) -> None:
        self.handler = handler
        self.fast = fast
        self.limits = limits
        self.loop = loop or asyncio.get_running_loop()
        #: ``loop.time``, looked up once: read after every keep-alive response.
        self.time: Callable[[], float] = self.loop.time
        #: Responses written when the loop turns: the forwarder's, so that they go out together
        #: with its request heads.
        self.outbox = outbox if outbox is not None else Outbox(self.loop)
        self.connections: set[HttpConnection] = set()
        self._to_flush: list[HttpConnection] = []
        self.closing = False
        self._all_closed: asyncio.Future[None] | None = None
        #: The slow-client sweep: a few times per timeout, while there are connections.
        self._sweep_every = min(1.0, max(0.05, min(limits.header_timeout, limits.body_timeout) / 4))
        self._sweeper: asyncio.TimerHandle | None = None

    def __call__(self) -> HttpConnection:
        return HttpConnection(self)

    def _watch(self, conn: HttpConnection) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _sweep(self) -> None:
        """Cut clients too slow with a request head or body (slowloris and its kin)."""
        self._sweeper = None
        if not self.connections:
            return
        now = self.loop.time()
        for conn in list(self.connections):
            conn._check_slow(now)
        self._sweeper = self.loop.call_later(self._sweep_every, self._sweep)

    def _queue_flush(self, conn: HttpConnection) -> None:
        """Write ``conn``'s gathered output when the event loop turns (unless written before):
        one callback per loop iteration for all connections, not one per response."""
        conn._flush_queued = True
        if not self._to_flush:
            self.loop.call_soon(self._flush_all)
        self._to_flush.append(conn)

    def _flush_all(self) -> None:
        conns = self._to_flush
        self._to_flush = []
        for conn in conns:
            conn._flush_queued = False
            conn._flush()

    def _forget(self, conn: HttpConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    async def shutdown(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Close idle connections now; give requests in flight ``grace`` seconds, then cut them.
        Stop the listeners first, so that nothing new arrives."""
        self.closing = True
        for conn in list(self.connections):
            conn._shutdown()
        if self.connections:
            self._all_closed = self.loop.create_future()
            try:
                await asyncio.wait_for(asyncio.shield(self._all_closed), grace)
            except TimeoutError:
                log.warning("%d connection(s) still busy after %gs; closing them",
                            len(self.connections), grace)
        tasks: list[asyncio.Task[Any]] = []
        for conn in list(self.connections):
            task = conn._task
            if task is not None and not task.done():
                task.cancel()
                tasks.append(task)
            conn._abort()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
