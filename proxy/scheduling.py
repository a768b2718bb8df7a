"""Member selection: httpd's mod_proxy_balancer algorithms as pure code.

No I/O and no clock of its own: callers pass ``now``. The selection walk follows httpd 2.4's
``ap_proxy_balancer_get_best_worker``: lbsets lowest first, hot spares (``R``) stand in for
unusable members of their own set, draining members (``N``) take no new work, and hot standbys
(``H``) are the last resort once no set has a usable member. Members in error (``E``) are retried
once their ``retry`` time has passed; ``forcerecovery`` clears ``E`` everywhere when every member
is in error.

Cost does not grow with the pool: the candidate set and the structures each lbmethod needs are
built once per change of the members' state (any flag change, an ``E`` member's retry coming due,
a slowstart ramp ending) and then used in O(log n) per request (a set of up to ``SCAN_MAX``
candidates is simply walked: cheaper at that size). Between rebuilds a member's lbstatus is kept
as ``base + k * factor`` with ``k`` a step counter shared by its class of members (see
``PoolState._rebuild``), so that a byrequests step or a sticky update costs no walk.
``PoolState._choose_slowly`` keeps httpd's walk as it is, for the rare requests it cannot
shortcut (see ``PoolState.choose``). Choices, lbstatus, counters and transitions are exactly
those of the walk (tests/test_scheduling.py drives both side by side).
"""

from __future__ import annotations

import itertools
import random
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from heapq import heapify, heappop, heappush, heapreplace
from typing import Any, Final

from .hashing import Maglev, Ring, hash64
from .model import BalancerPool, HashAlgorithm, LBMethod, MemberSpec
from .sticky import Reason

# Status flags as bits, so that a usability test is one AND on the hot path.
# Final: compiled with mypyc, these are constants in the code rather than module lookups.
D: Final = 1
S: Final = 2
I: Final = 4  # noqa: E741
H: Final = 8
R: Final = 16
E: Final = 32
N: Final = 64
C: Final = 128
FLAG_BITS: Final = {"D": D, "S": S, "I": I, "H": H, "R": R, "E": E, "N": N, "C": C}
UNUSABLE: Final = D | S | E | C

# What a member reports to its pool's scheduling structures when it changes (MemberState._watch).
WATCH_BUSY: Final = 1
WATCH_TRAFFIC: Final = 2
WATCH_LB: Final = 4
INF: Final = float("inf")
#: byrequests, bybusyness and bytraffic walk candidate sets up to this size (as httpd does, on
#: the cached set) instead of keeping heaps: below it the walk costs less. Not Final: tests
#: patch it, and compiled code would not see a patched Final.
SCAN_MAX = 8


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

#: A heap entry: (key, position in the candidate list, sequence number, member). The sequence
#: number keeps two entries of one member apart without ever comparing members.
#: Typed as a variable-length tuple on purpose: mypyc keeps a fixed-length tuple type unboxed
#: and boxes a new object at each store, which breaks the ``m._entry is entry`` tests.
Entry = tuple[Any, ...]
_SEQUENCE = itertools.count()
#: No member excluded (never appended to).
_NOTHING: list[MemberState] = []


class MemberState:
    """A member's live scheduling state: httpd's ``proxy_worker_shared`` counters and flags.

    The fields the scheduler indexes (flags, busy, lbstatus, the error clock, slowstart start,
    lbfactor, the traffic counters) are properties: a write, from anywhere, keeps the pool's
    structures exact."""

    __slots__ = (
        "_busy",
        "_entry",
        "_error_duration",
        "_error_time",
        "_flags",
        "_heap",
        "_lb",
        "_lbf",
        "_lbfactor",
        "_lbk",
        "_pool",
        "_pos",
        "_read",
        "_sent",
        "_slowstart",
        "_usable_since",
        "_watch",
        "elected",
        "errors",
        "history",
        "index",
        "lbset",
        "name",
        "on_change",
        "retries",
        "route",
        "spec",
    )

    def __init__(self, spec: MemberSpec, index: int, now: float) -> None:
        #: The pool whose structures index this member (set by PoolState), and which changes of
        #: this member they must hear about.
        self._pool: PoolState | None = None
        self._watch = 0
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.route = spec.route
        # httpd keeps loadfactor times 100 as an integer so that two decimals schedule exactly.
        self._lbfactor = round(spec.loadfactor * 100)
        self.lbset = spec.lbset
        self._flags = flags_to_bits(spec.status)
        # lbstatus is _lb + _lbk[0] * _lbf while the pool's structures hold it (see lbstatus).
        self._lb = 0
        self._lbk: list[int] | None = None
        self._lbf = 0
        self._busy = 0
        self.elected = 0
        # Bytes sent to and received from the member (transferred, read).
        self._sent = 0
        self._read = 0
        self.errors = 0
        self.retries = 0
        # A member configured in E starts its `retry` wait now.
        self._error_time = now
        self._error_duration = spec.retry
        #: When the member last became usable, for slowstart; -inf: not ramping.
        self._usable_since = float("-inf")
        self._slowstart = spec.slowstart  # read per choice: spares a look into spec
        self.history: deque[Transition] = deque(
            [Transition(now, "", bits_to_flags(self._flags), "config", "loaded")], maxlen=HISTORY)
        self.on_change: Callable[[MemberState, Transition], None] | None = None
        # The pool's bookkeeping: position among the candidates (-1: not one), live heap entry
        # and the heap holding it.
        self._pos = -1
        self._entry: Entry | None = None
        self._heap: _Heap | None = None

    # --- indexed fields ---------------------------------------------------------------------

    @property
    def transferred(self) -> int:
        """Bytes sent to the member; a bytraffic pool re-keys the member when they move."""
        return self._sent

    @transferred.setter
    def transferred(self, value: int) -> None:
        self._sent = value
        if self._watch & WATCH_TRAFFIC:
            self._pool._dirty.add(self)  # type: ignore[union-attr]

    @property
    def read(self) -> int:
        """Bytes received from the member (response bodies)."""
        return self._read

    @read.setter
    def read(self, value: int) -> None:
        self._read = value
        if self._watch & WATCH_TRAFFIC:
            self._pool._dirty.add(self)  # type: ignore[union-attr]

    @property
    def flags(self) -> int:
        return self._flags

    @flags.setter
    def flags(self, value: int) -> None:
        self._flags = value
        if self._pool is not None:
            self._pool._version += 1

    @property
    def busy(self) -> int:
        """Requests (and tunnels) in flight on this member."""
        return self._busy

    @busy.setter
    def busy(self, value: int) -> None:
        self._busy = value
        if self._watch & WATCH_BUSY:
            self._pool._busy_moved(self)  # type: ignore[union-attr]

    def begin(self) -> None:
        """A request (or tunnel) went out to this member."""
        self._busy += 1
        if self._watch & WATCH_BUSY:
            self._pool._busy_moved(self)  # type: ignore[union-attr]

    def end(self) -> None:
        """A request (or tunnel) on this member is over."""
        self._busy -= 1
        if self._watch & WATCH_BUSY:
            self._pool._busy_moved(self)  # type: ignore[union-attr]

    @property
    def lbstatus(self) -> int:
        """httpd's lbstatus: the byrequests (and bybusyness tie-break) credit."""
        k = self._lbk
        return self._lb if k is None else self._lb + k[0] * self._lbf

    @lbstatus.setter
    def lbstatus(self, value: int) -> None:
        k = self._lbk
        self._lb = value if k is None else value - k[0] * self._lbf
        if self._watch & WATCH_LB:
            self._pool._rekey(self)  # type: ignore[union-attr]

    @property
    def error_time(self) -> float:
        return self._error_time

    @error_time.setter
    def error_time(self, value: float) -> None:
        self._error_time = value
        if self._pool is not None:
            self._pool._deadline(self)

    @property
    def error_duration(self) -> float:
        return self._error_duration

    @error_duration.setter
    def error_duration(self, value: float) -> None:
        self._error_duration = value
        if self._pool is not None:
            self._pool._deadline(self)

    @property
    def usable_since(self) -> float:
        return self._usable_since

    @usable_since.setter
    def usable_since(self, value: float) -> None:
        self._usable_since = value
        if self._pool is not None:
            self._pool._version += 1

    @property
    def lbfactor(self) -> int:
        """loadfactor times 100."""
        return self._lbfactor

    @lbfactor.setter
    def lbfactor(self, value: int) -> None:
        self._lbfactor = value
        if self._pool is not None:
            self._pool._version += 1

    # --- state --------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        return not self._flags & UNUSABLE

    def change(self, add: int, remove: int, now: float, signal: str, detail: str = "") -> bool:
        """Set and clear status flags, recording the transition; True when the flags changed.
        Every change of state goes through here, so listeners (flushing connections, metrics,
        status) see all of them."""
        before = self._flags
        after = (before | add) & ~remove
        if after == before:
            return False
        self._flags = after
        if before & UNUSABLE and not after & UNUSABLE:
            self._usable_since = now
        if self._pool is not None:
            self._pool._version += 1
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
        if self._flags & I:
            return False
        self.error_time = now
        self.error_duration = self.spec.retry if duration is None else duration
        return self.change(E, 0, now, signal, detail)

    def retry_if_due(self, now: float) -> None:
        if self._flags & E and now >= self._error_time + self._error_duration:
            self.retries += 1
            self.change(0, E, now, "retry", f"{self._error_duration:g}s in error passed")

    def factor(self, now: float) -> int:
        """lbfactor, ramped up over ``slowstart`` after the member became usable (at least 10%,
        as Envoy's default min_weight_percent)."""
        ramp = self._slowstart
        if ramp and now - self._usable_since < ramp:
            return max(1, int(self._lbfactor * max(0.1, (now - self._usable_since) / ramp)))
        return self._lbfactor

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


class _Heap:
    """A min-heap of entries in which a member's latest entry supersedes its earlier ones:
    re-keying a member is one push, and superseded entries are dropped when they surface (or
    all at once when they outnumber the live ones)."""

    __slots__ = ("entries", "factor", "level", "live")

    def __init__(self, level: int = 0, factor: int = 0) -> None:
        """``level`` and ``factor``: the busy count and factor of a rotation's members."""
        self.entries: list[Entry] = []
        self.live = 0
        self.level = level
        self.factor = factor

    def fill(self, members: Iterable[MemberState], key: Callable[[MemberState], Any]) -> None:
        for m in members:
            entry: Entry = (key(m), m._pos, next(_SEQUENCE), m)
            m._entry, m._heap = entry, self
            self.entries.append(entry)
        self.live = len(self.entries)
        heapify(self.entries)

    def push(self, member: MemberState, key: Any) -> None:
        entries = self.entries
        if len(entries) > 2 * self.live + 16:
            entries[:] = [e for e in entries if e[3]._entry is e]
            heapify(entries)
        entry: Entry = (key, member._pos, next(_SEQUENCE), member)
        member._entry, member._heap = entry, self
        self.live += 1
        heappush(entries, entry)

    def drop(self, member: MemberState) -> None:
        """Forget the member (which has its live entry here)."""
        member._entry = None
        self.live -= 1

    def top(self) -> Entry | None:
        entries = self.entries
        while entries:
            entry = entries[0]
            member: MemberState = entry[3]
            if member._entry is entry:
                return entry
            heappop(entries)
        return None

    def replace_top(self, member: MemberState, key: Any) -> None:
        """Re-key the member whose entry ``top()`` just returned."""
        entry: Entry = (key, member._pos, next(_SEQUENCE), member)
        member._entry = entry
        heapreplace(self.entries, entry)


class PoolState:
    """The members of one pool as the scheduler sees them, grouped into lbset tiers."""

    __slots__ = ("_all_error", "_built", "_by_busy", "_cands", "_cum", "_dirty", "_expires",
                 "_hash_cache", "_kc", "_ku", "_level_count", "_levels", "_low", "_next_due", "_ramp_c",
                 "_ramp_end", "_ramp_u", "_reconfigured", "_scan", "_spare_waiting", "_sum_c", "_sum_u",
                 "_table", "_traffic", "_valid_from", "_version", "by_name", "by_route", "lbmethod",
                 "listeners", "members", "random", "spec", "tiers")

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
        # The structures (see _rebuild) are current while _built == _version; every change of
        # a member's flags, lbfactor or slowstart start bumps _version.
        self._version = 0
        self._built = -1
        self._cands: list[MemberState] = []
        self._spare_waiting = False
        self._next_due = self._ramp_end = self._expires = self._valid_from = -INF
        self._all_error = False
        self._ramp_c: list[MemberState] = []
        self._ramp_u: list[MemberState] = []
        self._kc, self._ku = [0], [0]
        self._sum_c = self._sum_u = 0
        self._levels: dict[int, dict[int, _Heap]] = {}
        self._level_count: dict[int, int] = {}
        self._low = 0
        self._by_busy = spec.lbmethod is LBMethod.BYBUSYNESS
        self._scan = False
        self._traffic = _Heap()
        self._dirty: set[MemberState] = set()
        self._cum: list[float] = []
        self._table: Ring | Maglev | None = None
        for member in self.members:
            member._pool = self

    def announce(self) -> None:
        """Tell the listeners about state changes a new configuration made (call once they
        are registered): a member switched to draining must be flushed like any other."""
        for member, change in self._reconfigured:
            self._changed(member, change)
        self._reconfigured.clear()

    def _changed(self, member: MemberState, transition: Transition) -> None:
        for listener in self.listeners:
            listener(member, transition)

    # --- the scheduler's entry points ---------------------------------------------------------

    def choose(self, now: float, exclude: Collection[MemberState] = (),
               key: str | None = None) -> MemberState | None:
        """The member for a request without a usable session route, or None when nothing is
        usable. ``key`` is the request's hash key for lbmethod hash.

        O(log n) (byrequests and bybusyness: O(G + log n), G the distinct loadfactors among the
        candidates; up to SCAN_MAX candidates: walked), plus the members ramping up in slowstart,
        scanned. ``exclude`` (the members this request already tried) costs O(len(exclude)
        log n) when it only removes candidates; when it would change more than that (a hot spare
        waiting to stand in, an lbset left empty, an excluded member due for its retry, lbmethod
        hash with a key), the request takes httpd's walk, O(n), and the next one rebuilds the
        structures, O(n)."""
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
        rotation, so sessions do not skew byrequests. Every usable member gains its factor and
        the chosen one pays the total: one step of the usable members' counters, O(1) plus the
        members ramping up."""
        if self._built != self._version or now >= self._ramp_end or now < self._valid_from:
            self._rebuild(now)  # (no retries here: httpd's updatelbstatus retries nobody)
        self._kc[0] += 1
        if self._ku is not self._kc:
            self._ku[0] += 1
        total = self._sum_u
        for m in self._ramp_u:
            f = m.factor(now)
            m._lb += f
            total += f
        chosen._lb -= total  # its rotation heap catches up when it surfaces (see _head)
        chosen.elected += 1

    def candidates(self, now: float, exclude: Collection[MemberState] = ()) -> list[MemberState]:
        """The members a new request may go to, in order: the usable regular members of the
        lowest lbset that has any, plus one usable spare per unusable member of that set; else
        the usable hot standbys of every set. Members in error whose retry time has passed are
        retried on the way, in the lbsets looked at."""
        if exclude:
            return self._walk(now, exclude, True)[0]
        self._refresh(now)
        return list(self._cands)

    def _all_in_error(self) -> bool:
        if self._built == self._version:
            return self._all_error
        return bool(self.members) and all(m._flags & E for m in self.members)

    # --- httpd's walk ----------------------------------------------------------------------------

    def _walk(self, now: float, exclude: Collection[MemberState], retry: bool
              ) -> tuple[list[MemberState], int, bool]:
        """httpd's candidate walk, O(n): the candidates, how many lbsets were looked at, and
        whether a usable hot spare of the chosen set was left out (so that excluding one more
        member would bring it in). ``retry``: retry members in error whose time has come."""
        standbys: list[MemberState] = []
        for t, tier in enumerate(self.tiers):
            unusable = 0
            regular: list[MemberState] = []
            spares: list[MemberState] = []
            for m in tier:
                flags = m._flags
                if flags & N or (exclude and m in exclude):
                    if not flags & (R | H):
                        unusable += 1
                    continue
                if flags & E and retry:
                    m.retry_if_due(now)
                    flags = m._flags
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
                return regular, t + 1, len(spares) > unusable
        return standbys, len(self.tiers), False

    def _choose_slowly(self, now: float, exclude: Collection[MemberState], key: str | None
                       ) -> MemberState | None:
        """httpd's selection as it is written, O(n): for exclusions the structures cannot
        express. Leaves the structures to be rebuilt."""
        self._dissolve()
        cands = self._walk(now, exclude, True)[0]
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
                m._lb += f
                total += f
                if m is not best and (
                        (not by_busy and m._lb > best._lb)
                        or (by_busy and (m._busy < best._busy
                                         or (m._busy == best._busy and m._lb > best._lb)))):
                    best = m
            best._lb -= total
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
            return self._fewer_requests(a, b, now)
        if method is LBMethod.HASH and key is not None:
            return cands[self._hash_table(cands).lookup(hash64(key))]
        return self.random.choices(cands, [m.factor(now) for m in cands])[0]

    # --- the structures ----------------------------------------------------------------------------

    def _refresh(self, now: float) -> None:
        """Make the structures current for ``now``, retrying the members in error that are due
        as httpd's walk would (only when one is: ``_next_due``)."""
        if self._built != self._version or now >= self._ramp_end or now < self._valid_from:
            self._rebuild(now)
        if now >= self._next_due:
            self._walk(now, (), True)
            self._rebuild(now)

    def _dissolve(self) -> None:
        """Write every lbstatus back into its member and drop the structures."""
        for m in self.members:
            k = m._lbk
            if k is not None:
                m._lb += k[0] * m._lbf
                m._lbk = None
            m._lbf = 0
            m._pos = -1
            m._watch = 0
            m._entry = m._heap = None
        self._version += 1
        self._dirty.clear()

    def _rebuild(self, now: float) -> None:
        """Build the candidate set and the lbmethod's structure for it, O(n) (no retries: see
        ``_refresh``).

        lbstatus: the usable members with a constant factor (not ramping up) keep ``lbstatus =
        _lb + k * f``; k is ``_kc`` for the candidates of byrequests and bybusyness (a choose
        steps it: every candidate gains its factor) and ``_ku`` for the others (note_sticky
        steps both: every usable member gains). Members ramping up keep a plain lbstatus and are
        scanned. The structures stay valid until ``_version`` moves, an ``E`` member's retry
        is due (``_next_due``) or a ramp ends (``_ramp_end``); ``_valid_from`` guards a clock
        going back into the ramp of a member treated as done."""
        self._dissolve()
        cands, walked, self._spare_waiting = self._walk(now, (), False)
        self._cands = cands
        for pos, m in enumerate(cands):
            m._pos = pos
        method = self.lbmethod
        rotation = method is LBMethod.BYREQUESTS or method is LBMethod.BYBUSYNESS
        self._kc = kc = [0]
        self._ku = ku = [0] if rotation else kc
        ramp_c: list[MemberState] = []
        ramp_u: list[MemberState] = []
        sum_c = sum_u = 0
        ramp_end = valid_from = -INF
        all_error = bool(self.members)
        for m in self.members:
            flags = m._flags
            if not flags & E:
                all_error = False
            if flags & UNUSABLE:
                continue
            ramp = m._slowstart
            if ramp and now - m._usable_since < ramp:
                ramp_u.append(m)
                if m._pos >= 0:
                    ramp_c.append(m)
                ramp_end = max(ramp_end, m._usable_since + ramp)
                continue
            if ramp:
                valid_from = max(valid_from, m._usable_since + ramp)
            f = m._lbfactor
            m._lbf = f
            sum_u += f
            if rotation and m._pos >= 0:
                m._lbk = kc
                sum_c += f
            else:
                m._lbk = ku
        grouped = [m for m in cands if m._lbk is not None]  # the candidates not ramping up
        self._ramp_c, self._ramp_u = ramp_c, ramp_u
        self._sum_c, self._sum_u = sum_c, sum_u
        self._ramp_end = ramp_end if ramp_u else INF
        self._valid_from = valid_from
        self._all_error = all_error
        next_due = INF
        for tier in self.tiers[:walked]:
            for m in tier:
                if m._flags & E and not m._flags & N:
                    next_due = min(next_due, m._error_time + m._error_duration)
        self._next_due = next_due
        self._expires = min(next_due, self._ramp_end)
        self._levels, self._level_count = {}, {}
        self._traffic = _Heap()
        self._cum = []
        self._table = None
        # A few candidates are walked: no heaps to keep up to date.
        scan = self._scan = (rotation or method is LBMethod.BYTRAFFIC) and len(cands) <= SCAN_MAX
        if rotation and not scan:
            by_busy = method is LBMethod.BYBUSYNESS
            watch = WATCH_LB | (WATCH_BUSY if by_busy else 0)
            groups: dict[tuple[int, int], list[MemberState]] = {}
            for m in grouped:
                m._watch = watch
                groups.setdefault((m._busy if by_busy else 0, m._lbf), []).append(m)
            for (level, f), members in groups.items():
                heap = _Heap(level, f)
                heap.fill(members, _neg_lb)
                self._levels.setdefault(level, {})[f] = heap
                self._level_count[level] = self._level_count.get(level, 0) + len(members)
            self._low = min(self._level_count, default=0)
        elif method is LBMethod.BYTRAFFIC and not scan:
            for m in grouped:
                m._watch = WATCH_TRAFFIC
            self._traffic.fill(grouped, _traffic)
        elif method is LBMethod.RANDOM or method is LBMethod.HASH:
            # Floats, exact below 2**53, compare faster with random()'s float than ints do.
            self._cum = [float(c) for c in itertools.accumulate(m._lbfactor for m in cands)]
        self._built = self._version

    def _deadline(self, member: MemberState) -> None:
        """An error clock moved: look again no later than the new deadline."""
        if member._flags & E:
            due = member._error_time + member._error_duration
            self._next_due = min(self._next_due, due)
            self._expires = min(self._expires, due)

    def _busy_moved(self, m: MemberState) -> None:
        """bybusyness: a candidate's busy count changed. Up: nothing now, its entry is moved up
        when it surfaces (see _head); down: it moves down at once."""
        heap = m._heap
        if self._built == self._version and heap is not None and m._entry is not None \
                and m._busy < heap.level:
            self._level_drop(m, heap)
            self._level_push(m, m._busy)

    def _rekey(self, m: MemberState) -> None:
        """byrequests, bybusyness: a candidate's lbstatus was set from outside."""
        heap = m._heap
        if self._built != self._version or heap is None or m._entry is None:
            return
        self._level_drop(m, heap)
        self._level_push(m, m._busy if self._by_busy else 0)

    def _head(self, heap: _Heap) -> Entry | None:
        """The best entry of a rotation heap, after bringing up to date the entries that
        surface with a key too good: a member that paid for a sticky request (note_sticky
        lowers ``_lb`` without touching the heap), or (bybusyness) one whose busy count went
        up since (begin() leaves it in its level). Every other entry is ordered right below
        them, so the first entry found current is the heap's best."""
        entries = heap.entries
        while entries:
            entry = entries[0]
            m: MemberState = entry[3]
            if m._entry is not entry:
                heappop(entries)
            elif self._by_busy and m._busy != heap.level:
                heappop(entries)
                self._level_drop(m, heap)
                self._level_push(m, m._busy)
            elif entry[0] != -m._lb:
                heap.replace_top(m, -m._lb)
            else:
                return entry
        return None

    def _level_push(self, m: MemberState, level: int) -> None:
        groups = self._levels.get(level)
        if groups is None:
            groups = self._levels[level] = {}
        heap = groups.get(m._lbf)
        if heap is None:
            heap = groups[m._lbf] = _Heap(level, m._lbf)
        heap.push(m, -m._lb)
        self._level_count[level] = self._level_count.get(level, 0) + 1
        if level < self._low:
            self._low = level

    def _level_drop(self, m: MemberState, heap: _Heap) -> None:
        heap.drop(m)
        level = heap.level
        left = self._level_count[level] - 1
        if left:
            self._level_count[level] = left
        else:
            del self._level_count[level]
            del self._levels[level]

    # --- the lbmethods -------------------------------------------------------------------------

    def _choose(self, now: float, exclude: Collection[MemberState], key: str | None
                ) -> MemberState | None:
        if exclude:
            for x in exclude:
                if x._flags & E and now >= x._error_time + x._error_duration:
                    return self._choose_slowly(now, exclude, key)  # the walk must not retry it
        if self._built != self._version or not self._valid_from <= now < self._expires:
            self._refresh(now)
        cands = self._cands
        skip: list[MemberState] = _NOTHING
        if exclude:
            skip = []
            for x in exclude:
                if x._pos >= 0 and x._pool is self and x not in skip:
                    skip.append(x)
            if skip and (self._spare_waiting or len(skip) >= len(cands)
                         or (self.lbmethod is LBMethod.HASH and key is not None)):
                return self._choose_slowly(now, exclude, key)
        if not cands:
            return None
        method = self.lbmethod
        if method is LBMethod.BYREQUESTS or method is LBMethod.BYBUSYNESS:
            if self._scan:
                return self._rotate_few(now, skip, method is LBMethod.BYBUSYNESS)
            return self._rotate(now, skip, method is LBMethod.BYBUSYNESS)
        if method is LBMethod.BYTRAFFIC:
            return self._least_traffic_few(now, skip) if self._scan else self._least_traffic(now, skip)
        if len(cands) - len(skip) == 1:
            return cands[0] if not skip else next(m for m in cands if m not in skip)
        if method is LBMethod.LEASTREQUEST:
            if skip:
                i, j = self.random.sample(range(len(cands) - len(skip)), 2)
                gaps = sorted(x._pos for x in skip)
                a, b = cands[_unskip(i, gaps)], cands[_unskip(j, gaps)]
            else:
                a, b = self.random.sample(cands, 2)
            return self._fewer_requests(a, b, now)
        if method is LBMethod.HASH and key is not None:
            table = self._table
            if table is None:
                table = self._table = self._hash_table(cands)
            return cands[table.lookup(hash64(key))]
        return self._weighted(now, skip)

    def _rotate(self, now: float, skip: list[MemberState], by_busy: bool) -> MemberState:
        """byrequests (bybusyness: least busy first): every candidate gains its factor, the
        highest lbstatus wins (the first in candidate order on ties) and pays the total back.

        One step of ``_kc`` is the gain of every grouped candidate. Within one factor the order
        of lbstatus is the order of ``_lb`` and a step does not change it, so each (busy level,
        factor) heap's head is its best, and the winner is the best of the lowest level's heads
        and of the members ramping up. Excluded candidates give their gain back."""
        kc = self._kc
        kc[0] += 1
        step = kc[0]
        total = self._sum_c
        for x in skip:
            heap = x._heap
            if x._entry is not None and heap is not None:
                x._lb -= x._lbf
                total -= x._lbf
                self._level_drop(x, heap)
        best: MemberState | None = None
        best_heap: _Heap | None = None
        # The winner so far, ranked by (busy, -lbstatus, position): least first.
        best_busy = best_neg = best_pos = 0
        counts = self._level_count
        while counts:
            low = self._low
            if low not in counts:
                low = self._low = min(counts)
            # (_head may move members up to other levels, never into this one.)
            for heap in self._levels[low].values():
                entries = heap.entries
                top = entries[0] if entries else None
                if top is None or top[3]._entry is not top or top[0] != -top[3]._lb \
                        or (by_busy and top[3]._busy != low):
                    top = self._head(heap)  # (the same test, in a loop)
                if top is not None:
                    neg = top[0] - step * heap.factor
                    if best is None or neg < best_neg or (neg == best_neg and top[1] < best_pos):
                        best, best_heap, best_neg, best_pos = top[3], heap, neg, top[1]
            if best is not None:
                best_busy = low
                break
            # (bybusyness) every member of this level had moved up: look at the next
        for m in self._ramp_c:
            if skip and m in skip:
                continue
            f = m.factor(now)
            m._lb += f
            total += f
            rank = (m._busy if by_busy else 0, -m._lb, m._pos)
            if best is None or rank < (best_busy, best_neg, best_pos):
                best, best_heap = m, None
                best_busy, best_neg, best_pos = rank
        assert best is not None
        best._lb -= total
        if best_heap is not None:
            entry: Entry = (-best._lb, best._pos, next(_SEQUENCE), best)
            best._entry = entry
            heapreplace(best_heap.entries, entry)
        for x in skip:
            if x._watch and x._entry is None:
                self._level_push(x, x._busy if by_busy else 0)
        return best

    def _rotate_few(self, now: float, skip: list[MemberState], by_busy: bool) -> MemberState:
        """``_rotate`` for a few candidates: httpd's walk over the cached set."""
        kc = self._kc
        kc[0] += 1
        step = kc[0]
        total = 0
        best: MemberState | None = None
        best_busy = best_lb = 0
        for m in self._cands:
            if m._lbk is not None:  # the step gave it its factor
                f = m._lbf
                if skip and m in skip:
                    m._lb -= f
                    continue
                lb = m._lb + step * f
            else:  # ramping up
                if skip and m in skip:
                    continue
                f = m.factor(now)
                m._lb += f
                lb = m._lb
            total += f
            if best is None or ((m._busy < best_busy or (m._busy == best_busy and lb > best_lb))
                                if by_busy else lb > best_lb):
                best, best_busy, best_lb = m, m._busy, lb
        assert best is not None
        best._lb -= total
        return best

    def _least_traffic_few(self, now: float, skip: list[MemberState]) -> MemberState:
        """``_least_traffic`` for a few candidates: httpd's walk over the cached set."""
        best: MemberState | None = None
        best_traffic = 0.0
        for m in self._cands:
            if skip and m in skip:
                continue
            traffic = (m.transferred + m.read) / (m._lbf if m._lbk is not None else m.factor(now))
            if best is None or traffic < best_traffic:
                best, best_traffic = m, traffic
        assert best is not None
        return best

    def _least_traffic(self, now: float, skip: list[MemberState]) -> MemberState:
        """bytraffic: the lowest (sent + received) / factor, the first in candidate order on
        ties. A heap keyed by it; members whose traffic moved are re-keyed here, once each."""
        heap = self._traffic
        dirty = self._dirty
        if dirty:
            for m in dirty:
                if m._entry is not None:
                    heap.drop(m)
                    heap.push(m, _traffic(m))
            dirty.clear()
        dropped = [x for x in skip if x._entry is not None]
        for x in dropped:
            heap.drop(x)
        top = heap.top()
        best: MemberState | None = None
        best_key: tuple[float, int] = (0.0, 0)
        if top is not None:
            best, best_key = top[3], (top[0], top[1])
        for m in self._ramp_c:
            if m in skip:
                continue
            rank = ((m.transferred + m.read) / m.factor(now), m._pos)
            if best is None or rank < best_key:
                best, best_key = m, rank
        for x in dropped:
            heap.push(x, _traffic(x))
        assert best is not None
        return best

    def _weighted(self, now: float, skip: list[MemberState]) -> MemberState:
        """random (and hash without a key): ``random.choices`` by factor, drawing exactly as it
        would (one ``random()``, then bisect over the cumulative weights), on the cumulative
        lbfactors built once. Members ramping up and excluded members are corrections of their
        own weight that shift the sums after them: O((r + x) log n)."""
        cands, cum = self._cands, self._cum
        n = len(cands)
        fixes = [(m._pos, m.factor(now) - m._lbfactor) for m in self._ramp_c if m not in skip]
        if not fixes and not skip:
            return cands[bisect_right(cum, self.random.random() * cum[-1], 0, n - 1)]
        fixes += [(x._pos, -x._lbfactor) for x in skip]
        fixes.sort()
        x = self.random.random() * (cum[-1] + sum(d for _, d in fixes))
        lo, offset = 0, 0.0
        for pos, delta in [*fixes, (n, 0)]:
            if lo < pos and cum[pos - 1] + offset > x:
                return cands[bisect_right(cum, x, lo, pos, key=offset.__add__)]
            offset += delta
            lo = pos
        # random.choices' guard against rounding: the last (not excluded) candidate.
        return next(m for m in reversed(cands) if m not in skip)

    @staticmethod
    def _fewer_requests(a: MemberState, b: MemberState, now: float) -> MemberState:
        """leastrequest: of two, fewer outstanding requests per unit of weight wins; the pair
        comes in random order, so a tie goes to either with equal chance."""
        score_a, score_b = (a._busy + 1) / a.factor(now), (b._busy + 1) / b.factor(now)
        return a if score_a <= score_b else b

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


def _neg_lb(m: MemberState) -> int:
    return -m._lb


def _traffic(m: MemberState) -> float:
    return (m.transferred + m.read) / m._lbf


def _unskip(i: int, gaps: list[int]) -> int:
    """The position of the i-th candidate that is not at one of the (sorted) ``gaps``."""
    for gap in gaps:
        if gap <= i:
            i += 1
        else:
            break
    return i
