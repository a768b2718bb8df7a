"""Member selection: httpd's mod_proxy_balancer algorithms as pure code.

No I/O and no clock of its own: callers pass ``now``. The selection walk follows httpd 2.4's
``ap_proxy_balancer_get_best_worker``: lbsets lowest first, hot spares (``R``) stand in for
unusable members of their own set, draining members (``N``) take no new work, and hot standbys
(``H``) are the last resort once no set has a usable member. Members in error (``E``) are retried
once their ``retry`` time has passed; ``forcerecovery`` clears ``E`` everywhere when every member
is in error.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass

from .hashing import Maglev, Ring, hash64
from .model import BalancerPool, HashAlgorithm, LBMethod, MemberSpec
from .sticky import Reason

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


@dataclass(frozen=True, slots=True)
class Transition:
    """One change of a member's status flags: when, from what to what, and which signal caused
    it (config, connect-error, failonstatus, failontimeout, retry, forcerecovery, health-check,
    outlier, manager, kubernetes ...), with a human detail."""

    time: float
    before: str
    after: str
    signal: str
    detail: str = ""


HISTORY = 32


class MemberState:
    """A member's live scheduling state: httpd's ``proxy_worker_shared`` counters and flags."""

    __slots__ = ("busy", "elected", "error_duration", "error_time", "errors", "flags", "history",
                 "index", "lbfactor",
                 "lbset", "lbstatus", "name", "on_change", "read", "retries", "route", "spec",
                 "transferred", "usable_since")

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
        self.error_duration = spec.retry
        #: When the member last became usable, for slowstart; -inf: not ramping.
        self.usable_since = float("-inf")
        self.history: deque[Transition] = deque(
            [Transition(now, "", bits_to_flags(self.flags), "config", "loaded")], maxlen=HISTORY)
        self.on_change: Callable[[MemberState, Transition], None] | None = None

    @property
    def usable(self) -> bool:
        return not self.flags & UNUSABLE

    def change(self, add: int, remove: int, now: float, signal: str, detail: str = "") -> bool:
        """Set and clear status flags, recording the transition; True when the flags changed.
        Every change of state goes through here, so listeners (flushing connections, metrics,
        status) see all of them."""
        before = self.flags
        after = (before | add) & ~remove
        if after == before:
            return False
        self.flags = after
        if before & UNUSABLE and not after & UNUSABLE:
            self.usable_since = now
        transition = Transition(now, bits_to_flags(before), bits_to_flags(after), signal, detail)
        self.history.append(transition)
        if self.on_change is not None:
            self.on_change(self, transition)
        return True

    @property
    def last_change(self) -> Transition:
        return self.history[-1]

    def mark_error(self, now: float, signal: str = "error", detail: str = "",
                   duration: float | None = None) -> bool:
        """Put the member in ``E`` (unless it ignores errors) for ``duration`` (its ``retry``
        by default); True when its state changed."""
        self.errors += 1
        if self.flags & I:
            return False
        self.error_time = now
        self.error_duration = self.spec.retry if duration is None else duration
        return self.change(E, 0, now, signal, detail)

    def retry_if_due(self, now: float) -> None:
        if self.flags & E and now >= self.error_time + self.error_duration:
            self.retries += 1
            self.change(0, E, now, "retry", f"{self.error_duration:g}s in error passed")

    def factor(self, now: float) -> int:
        """lbfactor, ramped up over ``slowstart`` after the member became usable (at least 10%,
        as Envoy's default min_weight_percent)."""
        ramp = self.spec.slowstart
        if ramp and now - self.usable_since < ramp:
            return max(1, int(self.lbfactor * max(0.1, (now - self.usable_since) / ramp)))
        return self.lbfactor

    def adopt(self, old: MemberState, keep_health: bool) -> None:
        """Keep counters and error state across a reload that kept this member; ``keep_health``
        keeps a failed health check (C) while checks go on."""
        self.lbstatus = old.lbstatus
        self.busy = old.busy
        self.elected = old.elected
        self.transferred = old.transferred
        self.read = old.read
        self.errors = old.errors
        self.retries = old.retries
        self.usable_since = old.usable_since
        self.history = old.history
        if keep_health and old.flags & C:
            self.flags |= C
        if old.flags & E and not self.flags & I:
            self.flags |= E
            self.error_time = old.error_time
            self.error_duration = old.error_duration


class PoolState:
    """The members of one pool as the scheduler sees them, grouped into lbset tiers."""

    __slots__ = ("_hash_cache", "_reconfigured", "by_name", "by_route", "lbmethod", "listeners",
                 "members", "random", "spec", "tiers")

    def __init__(self, spec: BalancerPool, previous: PoolState | None = None, now: float = 0.0) -> None:
        self.spec = spec
        self.lbmethod = spec.lbmethod
        self.members = [MemberState(m, i, now) for i, m in enumerate(spec.members)]
        self.by_name = {m.name: m for m in self.members}
        self.by_route = {m.route: m for m in self.members if m.route is not None}
        sets = sorted({m.lbset for m in self.members})
        self.tiers = [[m for m in self.members if m.lbset == s] for s in sets]
        self.random = random.Random()
        #: Called after every member state change (flush connections, publish status ...).
        self.listeners: list[Callable[[MemberState, Transition], None]] = []
        self._reconfigured: list[tuple[MemberState, Transition]] = []
        for member in self.members:
            member.on_change = self._changed
        self._hash_cache: OrderedDict[tuple[int, ...], Ring | Maglev] = OrderedDict()
        if previous is not None:
            self.random = previous.random
            for member in self.members:
                old = previous.by_name.get(member.name)
                if old is not None and old.spec.url == member.spec.url:
                    member.adopt(old, spec.health_check is not None)
                    if member.flags != old.flags:
                        change = Transition(now, bits_to_flags(old.flags), bits_to_flags(member.flags),
                                            "config", "status changed by a new configuration")
                        member.history.append(change)
                        self._reconfigured.append((member, change))
                else:
                    member.usable_since = now  # a member added at run time ramps up

    def announce(self) -> None:
        """Tell the listeners about state changes a new configuration made (call once they
        are registered): a member switched to draining must be flushed like any other."""
        for member, change in self._reconfigured:
            self._changed(member, change)
        self._reconfigured.clear()

    def _changed(self, member: MemberState, transition: Transition) -> None:
        for listener in self.listeners:
            listener(member, transition)

    def choose(self, now: float, exclude: Collection[MemberState] = (),
               key: str | None = None) -> MemberState | None:
        """The member for a request without a usable session route, or None when nothing is
        usable. ``key`` is the request's hash key for lbmethod hash."""
        best = self._choose(now, exclude, key)
        if best is None and self.spec.forcerecovery and self._all_in_error():
            for member in self.members:
                member.retries += 1
                member.change(0, E, now, "forcerecovery", "every member was in error")
            best = self._choose(now, exclude, key)
        if best is not None:
            best.elected += 1
        return best

    def find_route(self, route: str, now: float, exclude: Collection[MemberState] = ()
                   ) -> tuple[MemberState | None, Reason]:
        """httpd's ``find_route_worker``: the member whose route this is, if usable (a draining
        member still takes its own sessions); else its ``redirect`` member; else None. The reason
        says why the session stayed, moved or must be re-balanced."""
        member = self.by_route.get(route)
        if member is None:
            return None, Reason.MEMBER_GONE
        if member not in exclude:
            member.retry_if_due(now)
            if member.usable:
                return member, Reason.MEMBER_DRAINING if member.flags & N else Reason.STICKY
        reason = (Reason.MEMBER_DISABLED if member.flags & (D | S) and member not in exclude
                  else Reason.MEMBER_ERROR)
        if member.spec.redirect is not None:
            target = self.by_route.get(member.spec.redirect)
            if target is not None and target not in exclude:
                target.retry_if_due(now)
                if target.usable:
                    return target, reason
        return None, reason

    def note_sticky(self, chosen: MemberState, now: float) -> None:
        """httpd's default ``updatelbstatus``: a sticky request still counts in the weighted
        rotation, so sessions do not skew byrequests."""
        total = 0
        for m in self.members:
            if m.usable:
                f = m.factor(now)
                m.lbstatus += f
                total += f
        chosen.lbstatus -= total
        chosen.elected += 1

    def _all_in_error(self) -> bool:
        return bool(self.members) and all(m.flags & E for m in self.members)

    def candidates(self, now: float, exclude: Collection[MemberState] = ()) -> list[MemberState]:
        """The members a new request may go to, in order: the usable regular members of the
        lowest lbset that has any, plus one usable spare per unusable member of that set; else
        the usable hot standbys of every set."""
        standbys: list[MemberState] = []
        for tier in self.tiers:
            unusable = 0
            regular: list[MemberState] = []
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
                    regular.append(m)
                else:
                    unusable += 1
            if unusable and spares:
                regular.extend(spares[:unusable])
            if regular:
                return regular
        return standbys

    def _choose(self, now: float, exclude: Collection[MemberState], key: str | None
                ) -> MemberState | None:
        cands = self.candidates(now, exclude)
        if not cands:
            return None
        method = self.lbmethod
        if method is LBMethod.BYREQUESTS or method is LBMethod.BYBUSYNESS:
            # httpd: every candidate gains its factor, the best pays the total back.
            total = 0
            best = cands[0]
            by_busy = method is LBMethod.BYBUSYNESS
            for m in cands:
                f = m.factor(now)
                m.lbstatus += f
                total += f
                if m is not best and (
                        (not by_busy and m.lbstatus > best.lbstatus)
                        or (by_busy and (m.busy < best.busy
                                         or (m.busy == best.busy and m.lbstatus > best.lbstatus)))):
                    best = m
            best.lbstatus -= total
            return best
        if method is LBMethod.BYTRAFFIC:
            best = cands[0]
            best_traffic = (best.transferred + best.read) / best.factor(now)
            for m in cands[1:]:
                traffic = (m.transferred + m.read) / m.factor(now)
                if traffic < best_traffic:
                    best, best_traffic = m, traffic
            return best
        if len(cands) == 1:
            return cands[0]
        if method is LBMethod.LEASTREQUEST:
            a, b = self.random.sample(cands, 2)
            # Fewer outstanding requests per unit of weight wins; ties keep member order.
            score_a, score_b = (a.busy + 1) / a.factor(now), (b.busy + 1) / b.factor(now)
            # The sample is in random order, so a tie goes to either with equal chance.
            return a if score_a <= score_b else b
        if method is LBMethod.HASH and key is not None:
            return cands[self._hash_table(cands).lookup(hash64(key))]
        # random, and hash without a key
        return self.random.choices(cands, [m.factor(now) for m in cands])[0]

    def _hash_table(self, cands: list[MemberState]) -> Ring | Maglev:
        """One table per candidate set, rebuilt only when the set changes (kept for 8 sets)."""
        ident = tuple(m.index for m in cands)
        table = self._hash_cache.get(ident)
        if table is None:
            spec = self.spec.hash
            names = [m.name for m in cands]
            weights = [m.spec.loadfactor for m in cands]
            maglev = spec is not None and spec.algorithm is HashAlgorithm.MAGLEV
            table = Maglev(names, weights) if maglev else Ring(names, weights)
            self._hash_cache[ident] = table
            if len(self._hash_cache) > 8:
                self._hash_cache.popitem(last=False)
        else:
            self._hash_cache.move_to_end(ident)
        return table
