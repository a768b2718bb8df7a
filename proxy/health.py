"""Health as pure logic: judging a check's result, and the hysteresis that turns results into
member state (mod_proxy_hcheck's ``hcpasses``/``hcfails``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

from .model import HealthExpect, OutlierDetectionSpec, RetryBudgetSpec

BODY_LIMIT: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class CheckResult:
    time: float
    ok: bool
    detail: str


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def evaluate(expect: HealthExpect, status: int, headers: list[tuple[str, str]], body: bytes
             ) -> tuple[bool, str]:
    """Whether a response passes, and a short detail saying why not (or the status)."""
    if not any(low <= status <= high for low, high in expect.status):
        return False, f"status {status}"
    for name, pattern in expect.headers:
        low = name.lower()
        values = [v for n, v in headers if n.lower() == low]
        if not values:
            return False, f"status {status}, header {name} missing"
        if not any(_compiled(pattern).search(v) for v in values):
            return False, f"status {status}, header {name} does not match {pattern!r}"
    if expect.body is not None and not _compiled(expect.body).search(
            body[:BODY_LIMIT].decode("utf-8", "replace")):
        return False, f"status {status}, body does not match {expect.body!r}"
    return True, f"status {status}"


class HealthTracker:
    """Consecutive passes and fails for one member; says when its state must flip."""

    __slots__ = ("fail_run", "fails", "pass_run", "passes")

    def __init__(self, passes: int, fails: int) -> None:
        self.passes = passes
        self.fails = fails
        self.pass_run = 0
        self.fail_run = 0

    def observe(self, ok: bool, down: bool) -> bool | None:
        """Feed one result for a member that is ``down`` (C) or not: True means mark it healthy,
        False mark it failed, None leave it as it is."""
        if ok:
            self.pass_run += 1
            self.fail_run = 0
            if down and self.pass_run >= self.passes:
                return True
        else:
            self.fail_run += 1
            self.pass_run = 0
            if not down and self.fail_run >= self.fails:
                return False
        return None


class OutlierDetector:
    """Consecutive 5xx and gateway errors per member; says when and for how long to eject.

    The ejection time is ``baseEjectionTime`` times the number of ejections so far, at most
    ``maxEjectionTime``; a member that stays clean for ``maxEjectionTime`` starts from one again.
    At most ``maxEjectionPercent`` of the members (never less than one) are ejected at once.
    """

    __slots__ = ("counts", "spec")

    def __init__(self, spec: OutlierDetectionSpec) -> None:
        self.spec = spec
        #: name -> [consecutive 5xx, consecutive gateway errors, ejections, last ejection time]
        self.counts: dict[str, list[float]] = {}

    def observe(self, name: str, status: int | None, now: float, ejected_now: int, members: int
                ) -> tuple[float, str] | None:
        """``status`` None is a failed connect or a timeout. Returns (ejection seconds, why)
        when the member must be ejected."""
        c = self.counts.get(name)
        if c is None:
            c = self.counts[name] = [0, 0, 0, float("-inf")]
        gateway = status is None or status in (502, 503, 504)
        if status is not None and status < 500:
            c[0] = c[1] = 0
            return None
        c[0] += 1
        c[1] = c[1] + 1 if gateway else 0
        spec = self.spec
        why = ""
        if spec.consecutive_gateway_errors and c[1] >= spec.consecutive_gateway_errors:
            why = f"{int(c[1])} consecutive gateway errors"
        elif spec.consecutive_5xx and c[0] >= spec.consecutive_5xx:
            why = f"{int(c[0])} consecutive 5xx responses"
        if not why:
            return None
        if ejected_now + 1 > max(1, members * spec.max_ejection_percent // 100):
            return None  # too many ejected already: keep serving rather than empty the pool
        if now - c[3] > spec.max_ejection_time:
            c[2] = 0
        c[2] += 1
        c[3] = now
        c[0] = c[1] = 0
        return min(spec.base_ejection_time * c[2], spec.max_ejection_time), why


class RetryBudget:
    """Requests and retries over a sliding window of one-second buckets; a retry is allowed
    while retries stay under the budget, so that failures do not turn into a retry storm."""

    __slots__ = ("buckets", "current", "second", "spec")

    def __init__(self, spec: RetryBudgetSpec) -> None:
        self.spec = spec
        #: second -> [requests, retries]
        self.buckets: dict[int, list[int]] = {}
        #: The newest bucket and its second: every request counts there, without a lookup.
        self.second = -1
        self.current = [0, 0]

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        if second == self.second:
            return self.current
        bucket = self.buckets.get(second)
        if bucket is None:
            horizon = second - int(self.spec.window)
            for old in [k for k in self.buckets if k <= horizon]:
                del self.buckets[old]
            bucket = self.buckets[second] = [0, 0]
        if second > self.second:
            self.second, self.current = second, bucket
        return bucket

    def request(self, now: float) -> None:
        self._bucket(now)[0] += 1

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        bucket = self._bucket(now)
        horizon = now - self.spec.window
        requests = retries = 0
        for second, (req, ret) in self.buckets.items():
            if second > horizon:
                requests += req
                retries += ret
        if retries >= max(self.spec.min_retries, requests * self.spec.percent // 100):
            return False
        bucket[1] += 1
        return True
