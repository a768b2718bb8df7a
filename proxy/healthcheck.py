"""Active health checks: one task per pool probes every member each ``interval``.

A probe uses its own short-lived connection (``Connection: close``), never a pooled one, so a
check neither hides nor disturbs the state of the connections that carry traffic.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import httptools

from .health import BODY_LIMIT, CheckResult, HealthTracker, evaluate
from .model import HealthCheckSpec, HealthMethod
from .scheduling import C, MemberState, PoolState

log = logging.getLogger("balancerpool.health")


class _Response:
    """httptools callbacks collecting one response head and up to BODY_LIMIT of body."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.head_done = False
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) < BODY_LIMIT:
            self.body += body[: BODY_LIMIT - len(self.body)]

    def on_message_complete(self) -> None:
        self.done = True


async def probe(member: MemberState, check: HealthCheckSpec) -> tuple[bool, str]:
    """One check of one member: (passed, detail)."""
    spec = member.spec
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(spec.host, spec.port)
            try:
                if check.method is HealthMethod.TCP:
                    return True, "connected"
                writer.write((f"{check.method.value} {spec.base_path}{check.uri} HTTP/1.1\r\n"
                              f"Host: {spec.authority}\r\nConnection: close\r\n"
                              f"User-Agent: balancerpool-healthcheck\r\n\r\n").encode("latin-1"))
                response = _Response()
                parser = httptools.HttpResponseParser(response)
                while not response.done:
                    data = await reader.read(65536)
                    if not data:
                        break
                    parser.feed_data(data)
                    if response.head_done and (check.method is HealthMethod.HEAD
                                               or len(response.body) >= BODY_LIMIT):
                        break
                if not response.head_done:
                    return False, "connection closed before a response"
                return evaluate(check.expect, parser.get_status_code(), response.headers,
                                bytes(response.body))
            finally:
                writer.close()
    except TimeoutError:
        return False, f"no answer within {check.timeout:g}s"
    except httptools.HttpParserError as exc:
        return False, f"malformed response: {exc}"
    except OSError as exc:
        return False, f"connect failed: {exc.strerror or exc}"


class HealthChecker:
    """Probes a pool's members and turns results into ``C`` transitions with their reason."""

    def __init__(self, state: PoolState, check: HealthCheckSpec, clock: Callable[[], float],
                 previous: HealthChecker | None = None) -> None:
        self.state = state
        self.check = check
        self.clock = clock
        self.trackers: dict[str, HealthTracker] = {}
        self.results: dict[str, CheckResult] = {}
        if previous is not None and previous.check == check:
            self.trackers = previous.trackers
            self.results = previous.results
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
            self.task = None

    async def _run(self) -> None:
        # Spread the first round, so that many pools started together do not probe in step.
        await asyncio.sleep(random.uniform(0, min(1.0, self.check.interval)))
        while True:
            try:
                await self.check_all()
            except Exception:  # pragma: no cover - a checker must not die
                log.exception("health checks of pool %s failed", self.state.spec.name)
            await asyncio.sleep(self.check.interval)

    async def check_all(self) -> None:
        """One round: every member probed at once, results applied in member order."""
        members = list(self.state.members)
        outcomes = await asyncio.gather(*(probe(m, self.check) for m in members))
        for member, (ok, detail) in zip(members, outcomes, strict=True):
            self.apply(member, ok, detail)

    def apply(self, member: MemberState, ok: bool, detail: str) -> None:
        now = self.clock()
        self.results[member.name] = CheckResult(now, ok, detail)
        tracker = self.trackers.get(member.name)
        if tracker is None:
            tracker = self.trackers[member.name] = HealthTracker(self.check.passes, self.check.fails)
        verdict = tracker.observe(ok, bool(member.flags & C))
        what = f"{self.check.method.value} {self.check.uri}" if self.check.method is not \
            HealthMethod.TCP else "TCP connect"
        if verdict is False:
            member.change(C, 0, now, "health-check",
                          f"{what}: {detail} ({tracker.fail_run} consecutive failures)")
        elif verdict is True:
            member.change(0, C, now, "health-check",
                          f"{what}: {detail} ({tracker.pass_run} consecutive passes)")
