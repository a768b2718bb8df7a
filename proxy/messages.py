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

from mypy_extensions import trait

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


class Response:
    """A response to write: a head, then ``chunks()``; ``finish(ok)`` must always be called last.

    Its fields come either as a list (``headers``) or, from a member, as the block of
    ``Name: value`` lines the front end writes as it is (``fields``): decoding each field to
    ``str`` and encoding it back cost the fast lane more than anything else it does to a
    response. Asking for ``headers`` decodes the block once; from then on the list counts."""

    __slots__ = ("_fields", "_headers", "body", "chunks", "finish", "info", "length", "reason",
                 "status", "upgrade")

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None,
                 length: int | None, chunks: Callable[[], AsyncIterator[bytes]] = no_chunks,
                 finish: Callable[[bool], None] = _no_finish, info: dict[str, object] | None = None,
                 upgrade: Callable[[ClientStream], Awaitable[None]] | None = None,
                 body: bytes | None = None, fields: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        #: One of the two is None: the fields as a list, or as a block of CRLF-ended lines.
        self._headers = headers if headers is not None or fields is not None else []
        self._fields = fields if headers is None else None
        #: Content-Length to announce, or None to let the front end frame it (chunked).
        self.length = length
        self.chunks = chunks
        self.finish = finish
        #: Facts for the access log and metrics: pool, member, attempts, ...
        self.info: dict[str, object] = {} if info is None else info
        #: For a 101 response: run with the client's stream once the head is written; the
        #: tunnel lasts until this returns (then ``finish``).
        self.upgrade = upgrade
        #: The whole body when it is already at hand (a small response, a local one): then it
        #: is written at once and ``chunks`` is not used.
        self.body = body

    @property
    def headers(self) -> list[tuple[str, str]]:
        headers = self._headers
        if headers is None:
            headers = self._headers = decode_fields(self._fields or b"")
            self._fields = None
        return headers

    @headers.setter
    def headers(self, headers: list[tuple[str, str]]) -> None:
        self._headers, self._fields = headers, None

    def add_field(self, name: str, value: str) -> None:
        """Append a field, to the block as it is when nothing decoded it."""
        fields = self._fields
        if fields is not None:
            self._fields = fields + encode_head(f"{name}: {value}\r\n")
        else:
            self.headers.append((name, value))

    def field_block(self) -> bytes:
        """The fields as written in the head: CRLF-ended lines."""
        fields = self._fields
        if fields is not None:
            return fields
        headers = self._headers
        return encode_head(_field_lines(headers)) if headers else b""

    def __repr__(self) -> str:
        fields = self._headers if self._headers is not None else self._fields  # as they are
        return f"<Response {self.status} {self.reason!r} {fields!r} length={self.length}>"


def _field_lines(headers: list[tuple[str, str]]) -> str:
    """``Name: value`` lines, each ended by CRLF (joined in C: no Python frame per field)."""
    return "\r\n".join(map(": ".join, headers)) + "\r\n" if headers else ""


def decode_fields(block: bytes) -> list[tuple[str, str]]:
    """The list form of a field block (a name holds no colon, so the first ": " ends it)."""
    out: list[tuple[str, str]] = []
    for line in block.decode("latin-1").split("\r\n"):
        if line:
            name, _, value = line.partition(": ")
            out.append((name, value))
    return out


def encode_head(text: str) -> bytes:
    """Head text as bytes: Latin-1 as HTTP/1.1 has it, UTF-8 when some field needs more."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


@trait
class Sink:
    """Where the fast lane delivers: the front end's connection, which knows the request. A
    trait rather than a Protocol: compiled, a call is then a direct one, not a lookup by name."""

    def respond(self, response: Response) -> None:
        """Write ``response`` (at once when its body is at hand) and go on with the connection.
        Never called from inside the front end's own parser callbacks."""
        raise NotImplementedError

    def respond_later(self, response: Awaitable[Response]) -> None:
        """The ordinary way after all: await ``response`` in a Task, then write it."""
        raise NotImplementedError


def local_response(status: int, reason: str, text: str, info: dict[str, object] | None = None,
                   extra: list[tuple[str, str]] | None = None) -> Response:
    """A response the proxy answers itself (404, 502, 503, 504 ...) with a plain-text reason."""
    body = (text.rstrip("\n") + "\n").encode()

    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]
    if extra:
        headers.extend(extra)
    return Response(status, reason, headers, len(body), one_chunk(body), info=info or {}, body=body)
