"""Property-based fuzzing of request-head handling against the real proxy process.

Hypothesis builds requests from hostile pieces (methods, targets, versions, framing fields,
separators, bytes) and pipelines of them, sends each on a fresh connection to a ``balancerpool
proxy`` process, and reads until the proxy closes. Properties:

- the proxy never crashes, never hangs a connection, never answers 500;
- every answer is a well-formed status line with a status from the expected set;
- the backend (the witness, which logs every byte) never sees bytes it cannot parse, and sees
  exactly as many requests as the client got 200 answers: one request can never become two.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import free_port, pool_doc
from .test_security import Witness, start_witness

IO = 5.0
#: What the proxy may answer: served, or refused by the front end or the router.
ALLOWED = {100, 200, 400, 404, 405, 408, 414, 431, 501, 505}
STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Witness]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    witness = start_witness(tmp / "seen.log")
    pool = tmp / "pool.yaml"
    pool.write_text(yaml.safe_dump(pool_doc([{"url": witness.url}], routes=[{"path": "/x"}])))
    port = free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "balancerpool.proxy", "--log-level", "ERROR", "proxy",
                              str(pool), "--listen", f"127.0.0.1:{port}", "--admin", "off"])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise RuntimeError("the proxy did not start") from None
                time.sleep(0.05)
        yield port, witness
        assert proxy.poll() is None, "the proxy died during fuzzing"
    finally:
        proxy.terminate()
        proxy.wait(10)
        witness.proc.terminate()
        witness.proc.wait(10)


def exchange(port: int, data: bytes) -> bytes:
    """Send, half-close, read until the proxy closes (it must, within IO seconds)."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed while we were still sending: what was read counts
        out = bytearray()
        while True:
            try:
                piece = sock.recv(65536)
            except ConnectionResetError:
                break
            if not piece:
                break
            out += piece
        return bytes(out)


VALID_METHODS = [b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"DELETE"]
VALID_TARGETS = [b"/x", b"/x/y?z=1", b"/x?a=b&c", b"http://a/x"]
VALID_FIELDS = [(b"X-A", b"1"), (b"Connection", b"close"), (b"Connection", b"keep-alive"),
                (b"Expect", b"100-continue"), (b"Upgrade", b"websocket"), (b"Cookie", b"a=b")]
FRAMINGS = [(None, b""), (b"Content-Length: 4", b"abcd"), (b"Content-Length: 0", b""),
            (b"Transfer-Encoding: chunked", b"4\r\nabcd\r\n0\r\n\r\n"),
            (b"Transfer-Encoding: chunked", b"4;e=1\r\nabcd\r\n0\r\nT: 1\r\n\r\n")]
#: Pieces that replace or join a piece of a valid request: one or two per request, so that
#: each sits in an otherwise good request.
HOSTILE = st.sampled_from([
    b"CONNECT", b"get", b"G\x00T", b"", b"FOO", b"*", b"http://u@a/x", b"http://b/x", b"a:443",
    b"/x#f", b"//x", b"/x\x00", b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.10", b"HTTP/1.1 x", b"http/1.1",
    b"Host: b", b"Host: a b", b"Host ", b" Transfer-Encoding", b"Content-Length\t",
    b"Transfer-Encoding: chunked", b"Transfer-Encoding: xchunked", b"Transfer-Encoding: gzip, chunked",
    b"Transfer-Encoding: chunked, identity", b"Content-Length: 4", b"Content-Length: 0x4",
    b"Content-Length: -1", b"Content-Length: 4, 4", b"Content-Length: 99999999999999999999",
    b" : ", b":\t", b"\t:", b"\n", b"\r", b"\r\r\n", b"\n\r", b"\r\n", b"\r\n\r\n",
    b"zz\r\nabcd\r\n", b"4;a\rb\r\n", b"-1\r\n", b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
    b"\x00", b" ", b"\t", b":", b"\x0b", b"\xff", b",", b";", b'"', b"@", b"/"]) | st.binary(max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """A valid request with up to two pieces replaced by, or joined with, a hostile one."""
    target = draw(st.sampled_from(VALID_TARGETS))
    parts = [draw(st.sampled_from(VALID_METHODS)), b" ", target, b" ", b"HTTP/1.1", b"\r\n",
             b"Host", b": ", b"a", b"\r\n"]
    for name, value in draw(st.lists(st.sampled_from(VALID_FIELDS), max_size=3)):
        parts += [name, b": ", value, b"\r\n"]
    framing, body = draw(st.sampled_from(FRAMINGS))
    if framing is not None:
        parts += [framing, b"\r\n"]
    parts += [b"\r\n", body]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(parts) - 1))
        piece = draw(HOSTILE)
        if draw(st.booleans()):
            parts[at] = piece
        else:
            parts.insert(at, piece)
    return b"".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          derandomize=True)
@given(st.lists(requests(), min_size=1, max_size=3).map(b"".join))
def test_fuzzed_requests_never_crash_hang_or_smuggle(fuzz_target: tuple[int, Witness],
                                                     data: bytes) -> None:
    port, witness = fuzz_target
    witness.clear()
    raw = exchange(port, data)
    codes = [int(m.group(1)) for m in STATUS_LINE.finditer(raw)]
    if raw:
        assert STATUS_LINE.match(raw), raw[:100]
    assert set(codes) <= ALLOWED, (codes, data)
    assert witness.errors() == [], (witness.errors(), data)
    # One request forwarded per 200 answered (the witness answers every request it parses),
    # and only with a method the proxy forwards.
    seen = witness.requests()
    assert len(seen) == codes.count(200), (seen, codes, data)
    assert all(r.split(" ")[0].encode() in VALID_METHODS for r in seen), (seen, data)


def test_proxy_still_serves_after_fuzzing(fuzz_target: tuple[int, Witness]) -> None:
    port, witness = fuzz_target
    witness.clear()
    raw = exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 ") and witness.requests() == ["GET /x"]
