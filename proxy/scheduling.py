"""Member selection: httpd's mod_proxy_balancer algorithms as pure code.

No I/O and no clock of its own: callers pass ``now``. The selection walk follows httpd 2.4's
``ap_proxy_balancer_get_best_worker``: lbsets lowest first, hot spares (``R``) stand in for
unusable members of their own set, draining members (``N``) take no new work, and hot standbys
(``H``) are the last resort once no set has a usable member. Members in error (``E``) are retried
once their ``retry`` time has passed; ``forcerecovery`` clears ``E`` everywhere when every member
is in error.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from .model import BalancerPool, LBMethod, MemberSpec

# Status flags as bits, so that a usability test is one AND on the hot path.
FLAG_BITS = {"D": 1, "S": 2, "I": 4, "H": 8, "R": 16, "E": 32, "N": 64, "C": 128}
D, S, I, H, R, E, N, C = (FLAG_BITS[f] for f in "DSIHRENC")  # noqa: E741
UNUSABLE = D | S | E | C


def flags_to_bits(flags: Iterable[str]) -> int:
    bits = 0
    for flag in flags:
        bits |= FLAG_BITS[flag]
    return bits


def bits_to_flags(bits: int) -> str:
    return "".join(flag for flag, bit in FLAG_BITS.items() if bits & bit)


class MemberState:
    """A member's live scheduling state: httpd's ``proxy_worker_shared`` counters and flags."""

    __slots__ = ("busy", "elected", "error_time", "errors", "flags", "index", "lbfactor", "lbset",
                 "lbstatus", "name", "read", "retries", "route", "spec", "transferred")

    def __init__(self, spec: MemberSpec, index: int, now: float) -> None:
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.route = spec.route
        # httpd keeps loadfactor times 100 as an integer so that two decimals schedule exactly.
        self.lbfactor = round(spec.loadfactor * 100)
        self.lbset = spec.lbset
        self.flags = flags_to_bits(spec.status)
        self.lbstatus = 0
        self.busy = 0
        self.elected = 0
        self.transferred = 0
        self.read = 0
        self.errors = 0
        self.retries = 0
        # A member configured in E starts its `retry` wait now.
        self.error_time = now

    @property
    def usable(self) -> bool:
        return not self.flags & UNUSABLE

    def mark_error(self, now: float) -> bool:
        """Put the member in ``E`` (unless it ignores errors); True when its state changed."""
        self.errors += 1
        if self.flags & I:
            return False
        changed = not self.flags & E
        self.flags |= E
        self.error_time = now
        return changed

    def retry_if_due(self, now: float) -> None:
        if self.flags & E and now >= self.error_time + self.spec.retry:
            self.flags &= ~E
            self.retries += 1

    def adopt(self, old: MemberState) -> None:
        """Keep counters and error state across a reload that kept this member."""
        self.lbstatus = old.lbstatus
        self.busy = old.busy
        self.elected = old.elected
        self.transferred = old.transferred
        self.read = old.read
        self.errors = old.errors
        self.retries = old.retries
        if old.flags & E and not self.flags & I:
            self.flags |= E
            self.error_time = old.error_time


class PoolState:
    """The members of one pool as the scheduler sees them, grouped into lbset tiers."""

    __slots__ = ("by_name", "by_route", "lbmethod", "members", "spec", "tiers")

    def __init__(self, spec: BalancerPool, previous: PoolState | None = None, now: float = 0.0) -> None:
        self.spec = spec
        self.lbmethod = spec.lbmethod
        self.members = [MemberState(m, i, now) for i, m in enumerate(spec.members)]
        self.by_name = {m.name: m for m in self.members}
        self.by_route = {m.route: m for m in self.members if m.route is not None}
        sets = sorted({m.lbset for m in self.members})
        self.tiers = [[m for m in self.members if m.lbset == s] for s in sets]
        if previous is not None:
            for member in self.members:
                old = previous.by_name.get(member.name)
                if old is not None and old.spec.url == member.spec.url:
                    member.adopt(old)

    def choose(self, now: float, exclude: Collection[MemberState] = ()) -> MemberState | None:
        """The member for a new (non-sticky) request, or None when nothing is usable."""
        best = self._choose(now, exclude)
        if best is None and self.spec.forcerecovery and self._all_in_error():
            for member in self.members:
                member.flags &= ~E
                member.retries += 1
            best = self._choose(now, exclude)
        if best is not None:
            best.elected += 1
        return best

    def _all_in_error(self) -> bool:
        return bool(self.members) and all(m.flags & E for m in self.members)

    def _choose(self, now: float, exclude: Collection[MemberState]) -> MemberState | None:
        method = self.lbmethod
        total = 0
        best: MemberState | None = None
        best_traffic = 0.0
        standbys: list[MemberState] = []

        def consider(m: MemberState) -> None:
            nonlocal total, best, best_traffic
            if method is LBMethod.BYTRAFFIC:
                traffic = m.transferred / m.lbfactor + m.read / m.lbfactor
                if best is None or traffic < best_traffic:
                    best, best_traffic = m, traffic
                return
            m.lbstatus += m.lbfactor
            total += m.lbfactor
            if (
                best is None
                or (method is LBMethod.BYREQUESTS and m.lbstatus > best.lbstatus)
                or (method is LBMethod.BYBUSYNESS and (
                    m.busy < best.busy or (m.busy == best.busy and m.lbstatus > best.lbstatus)))
            ):
                best = m

        for tier in self.tiers:
            unusable = 0
            spares: list[MemberState] = []
            for m in tier:
                flags = m.flags
                if flags & N or m in exclude:
                    if not flags & (R | H):
                        unusable += 1
                    continue
                if flags & E:
                    m.retry_if_due(now)
                    flags = m.flags
                usable = not flags & UNUSABLE
                if flags & R:
                    if usable:
                        spares.append(m)
                elif flags & H:
                    if usable:
                        standbys.append(m)
                elif usable:
                    consider(m)
                else:
                    unusable += 1
            for spare in spares[:unusable]:
                consider(spare)
            if best is not None:
                break
        if best is None:
            for standby in standbys:
                consider(standby)
        if best is not None and method is not LBMethod.BYTRAFFIC:
            best.lbstatus -= total
        return best
