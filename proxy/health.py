"""Health as pure logic: judging a check's result, and the hysteresis that turns results into
member state (mod_proxy_hcheck's ``hcpasses``/``hcfails``)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from .model import HealthExpect

BODY_LIMIT = 64 * 1024


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
