"""The proxy's async generators. mypyc cannot compile async generators, so they live here, in a
module a compiled build leaves interpreted; the compiled modules only call these factories."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .scheduling import MemberState
    from .upstream import UpstreamConnection


async def no_chunks() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


def one_chunk(body: bytes) -> Callable[[], AsyncIterator[bytes]]:
    """``chunks`` for a body at hand."""
    async def chunks() -> AsyncIterator[bytes]:
        yield body
    return chunks


def counting(chunks: Callable[[], AsyncIterator[bytes]], sent: list[int]
             ) -> Callable[[], AsyncIterator[bytes]]:
    """``chunks``, adding the length of each chunk to ``sent[0]`` as it goes by."""
    async def counted() -> AsyncIterator[bytes]:
        async for chunk in chunks():
            sent[0] += len(chunk)
            yield chunk
    return counted


def member_chunks(conn: UpstreamConnection, member: MemberState, timeout: float
                  ) -> Callable[[], AsyncIterator[bytes]]:
    """``chunks`` of a streamed upstream response body, counted as read from ``member``."""
    async def chunks() -> AsyncIterator[bytes]:
        while True:
            chunk = await conn.read_body(timeout)
            if not chunk:
                return
            member.read += len(chunk)
            yield chunk
    return chunks
