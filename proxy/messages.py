"""The seam between a front-end HTTP server and the balancing core.

A front end (aiohttp's low-level server, or the fast uvloop+httptools protocol) hands the core a
parsed :class:`RequestHead` and a :class:`Body`, and gets back a :class:`Response` to write. The
fast front end may instead offer a bodiless request to the core's fast lane with itself as the
:class:`Sink`. Scheduling, stickiness and health never see the front end's types.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from .agen import no_chunks, one_chunk


@dataclass(slots=True)
class RequestHead:
    """One request's head, as parsed. ``__init__`` is written out (dataclass keeps it): compiled
    with mypyc, a generated one would stay interpreted Python on every request."""

    method: str
    path: str
    query: str
    version: tuple[int, int]
    #: As received, names in their original case; the core filters hop-by-hop fields itself.
    headers: list[tuple[str, str]]
    host: str
    client: str
    scheme: str = "http"
    #: The client connection's memo of forwarded fields (None: nothing to remember them in).
    memo: FieldsMemo | None = field(default=None, compare=False, repr=False)

    def __init__(self, method: str, path: str, query: str, version: tuple[int, int],
                 headers: list[tuple[str, str]], host: str, client: str, scheme: str = "http",
                 memo: FieldsMemo | None = None) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.version = version
        self.headers = headers
        self.host = host
        self.client = client
        self.scheme = scheme
        self.memo = memo


class FieldsMemo:
    """The request fields last forwarded for one client connection, kept by the core: a
    keep-alive client sends the same fields request after request, and its front end then
    hands over the same ``headers`` list, so the forwarded block is built once."""

    __slots__ = ("block", "drop", "headers", "host", "length", "method")

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] | None = None
        self.drop: frozenset[str] | None = None
        self.host = ""
        self.method = ""
        self.length: int | None = 0
        self.block = b""


class Body(Protocol):
    """A request body read as a stream; ``length`` is None when the client sent it chunked."""

    length: int | None

    async def read(self) -> bytes:
        """The next chunk, or b"" at the end."""
        ...


class ClientStream(Protocol):
    """The client's side of an upgraded connection (WebSocket), as the front end hands it over
    after writing a 101 response: raw bytes both ways."""

    async def read(self) -> bytes:
        """The next bytes from the client, or b"" when it closed."""
        ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class EmptyBody:
    length: int | None = 0

    async def read(self) -> bytes:
        return b""


EMPTY_BODY: Final = EmptyBody()


def _no_finish(ok: bool) -> None:
    pass


@dataclass(slots=True)
class Response:
    """A response to write: a head, then ``chunks()``; ``finish(ok)`` must always be called last.
    ``__init__`` is written out, as for :class:`RequestHead`."""

    status: int
    reason: str
    headers: list[tuple[str, str]]
    #: Content-Length to announce, or None to let the front end frame it (chunked).
    length: int | None
    chunks: Callable[[], AsyncIterator[bytes]] = no_chunks
    finish: Callable[[bool], None] = _no_finish
    #: Facts for the access log and metrics: pool, member, attempts, ...
    info: dict[str, object] = field(default_factory=dict)
    #: For a 101 response: run with the client's stream once the head is written; the tunnel
    #: lasts until this returns (then ``finish``).
    upgrade: Callable[[ClientStream], Awaitable[None]] | None = None
    #: The whole body when it is already at hand (a small response, a local one): then it is
    #: written at once and ``chunks`` is not used.
    body: bytes | None = None

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None,
                 chunks: Callable[[], AsyncIterator[bytes]] = no_chunks,
                 finish: Callable[[bool], None] = _no_finish, info: dict[str, object] | None = None,
                 upgrade: Callable[[ClientStream], Awaitable[None]] | None = None,
                 body: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.length = length
        self.chunks = chunks
        self.finish = finish
        self.info = {} if info is None else info
        self.upgrade = upgrade
        self.body = body


class Sink(Protocol):
    """Where the fast lane delivers: the front end's connection, which knows the request."""

    def respond(self, response: Response) -> None:
        """Write ``response`` (at once when its body is at hand) and go on with the connection.
        Never called from inside the front end's own parser callbacks."""

    def respond_later(self, response: Awaitable[Response]) -> None:
        """The ordinary way after all: await ``response`` in a Task, then write it."""


def local_response(status: int, reason: str, text: str, info: dict[str, object] | None = None,
                   extra: list[tuple[str, str]] | None = None) -> Response:
    """A response the proxy answers itself (404, 502, 503, 504 ...) with a plain-text reason."""
    body = (text.rstrip("\n") + "\n").encode()

    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if extra:
        headers.extend(extra)
    return Response(status, reason, headers, len(body), one_chunk(body), info=info or {}, body=body)
