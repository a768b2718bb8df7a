"""Member selection: httpd's mod_proxy_balancer algorithms, checked against hand-computed sequences."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Collection, Iterable
from math import gcd
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerpool.proxy import scheduling
from balancerpool.proxy.hashing import Maglev, Ring, hash64
from balancerpool.proxy.model import (
    API_VERSION,
    KIND,
    BalancerPool,
    HashAlgorithm,
    HashOn,
    HashSpec,
    LBMethod,
    MemberSpec,
    parse_pools,
)
from balancerpool.proxy.scheduling import (
    FLAG_BITS,
    SCAN_MAX,
    UNUSABLE,
    MemberState,
    PoolState,
    Transition,
    bits_to_flags,
    flags_to_bits,
)
from balancerpool.proxy.sticky import Reason

# ---------------------------------------------------------------------------------------------
# Helpers


def m(name: str, loadfactor: float = 1, **fields: Any) -> dict[str, Any]:
    """A member written as in a BalancerPool file."""
    return {"url": f"http://{name}.test:8080", "name": name, "loadfactor": loadfactor, **fields}


def make_pool(*members: dict[str, Any], **spec: Any) -> BalancerPool:
    doc = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "web"},
           "spec": {"routes": [{"path": "/"}], "members": list(members), **spec}}
    (pool,) = parse_pools(yaml.safe_dump(doc, sort_keys=False))
    return pool


def state(*members: dict[str, Any], **spec: Any) -> PoolState:
    return PoolState(make_pool(*members, **spec))


def pick(pool: PoolState, now: float = 0.0, exclude: list[MemberState] | None = None) -> str | None:
    chosen = pool.choose(now, exclude or ())
    return None if chosen is None else chosen.name


def picks(pool: PoolState, n: int, now: float = 0.0, exclude: list[MemberState] | None = None) -> list[str]:
    result: list[str] = []
    for _ in range(n):
        name = pick(pool, now, exclude)
        assert name is not None
        result.append(name)
    return result


def seq(text: str) -> list[str]:
    return text.split()


# ---------------------------------------------------------------------------------------------
# Flags


def test_flag_bits_round_trip() -> None:
    assert flags_to_bits("") == 0
    assert flags_to_bits("DH") == FLAG_BITS["D"] | FLAG_BITS["H"]
    assert bits_to_flags(flags_to_bits("CNERHISD")) == "DSIHRENC"
    assert len(set(FLAG_BITS.values())) == len(FLAG_BITS) == 8


def test_member_state_starts_from_its_spec() -> None:
    pool = state(m("a", 1.5, route="r1", lbset=2, status="DH"), m("b"))
    a, b = pool.members
    assert (a.name, a.route, a.lbfactor, a.lbset, a.index) == ("a", "r1", 150, 2, 0)
    assert bits_to_flags(a.flags) == "DH"
    assert not a.usable and b.usable
    assert (b.lbstatus, b.busy, b.elected, b.transferred, b.read, b.errors, b.retries) == (0,) * 7
    assert pool.by_name == {"a": a, "b": b}
    assert pool.by_route == {"r1": a}


# ---------------------------------------------------------------------------------------------
# byrequests: httpd's weighted round robin, computed by hand
#
#   for each usable candidate: lbstatus += lbfactor; total += lbfactor
#   pick the highest lbstatus (the first one wins ties); winner.lbstatus -= total


def test_byrequests_one_to_two() -> None:
    # lbstatus (a, b) before each pick: (100,200)->b (200,100)->a (0,300)->b, then back to (0,0).
    pool = state(m("a", 1), m("b", 2))
    assert picks(pool, 9) == seq("b a b  b a b  b a b")
    assert [x.lbstatus for x in pool.members] == [0, 0]


def test_byrequests_equal_weights_rotate_in_member_order() -> None:
    pool = state(m("a"), m("b"), m("c"))
    assert picks(pool, 7) == seq("a b c a b c a")


def test_byrequests_five_three_two() -> None:
    # (a, b, c) lbstatus after adding lbfactors, and the winner (total 1000 subtracted):
    # (500,300,200)a (0,600,400)b (500,-100,600)c (1000,200,-200)a (500,500,0)a [tie: first]
    # (0,800,200)b (500,100,400)a (0,400,600)c (500,700,-200)b (1000,0,0)a -> back to (0,0,0)
    pool = state(m("a", 5), m("b", 3), m("c", 2))
    cycle = seq("a b c a a b a c b a")
    assert picks(pool, 10) == cycle
    assert picks(pool, 10) == cycle
    assert [x.elected for x in pool.members] == [10, 6, 4]


def test_byrequests_two_decimal_weights() -> None:
    # a=1.5 (150) vs b=1 (100), total 250:
    # (150,100)a (50,200)b (200,50)a (100,150)b (250,0)a -> back to (0,0)
    pool = state(m("a", 1.5), m("b", 1))
    assert picks(pool, 10) == seq("a b a b a  a b a b a")


def test_byrequests_weights_in_reverse_member_order() -> None:
    # a=2 (200), b=1 (100): (200,100)a (100,200)b (300,0)a -> back to (0,0).
    pool = state(m("a", 2), m("b", 1))
    assert picks(pool, 6) == seq("a b a  a b a")


def test_byrequests_single_member() -> None:
    pool = state(m("only", 7))
    assert picks(pool, 3) == ["only"] * 3
    assert pool.members[0].lbstatus == 0


@pytest.mark.parametrize(
    ("weights", "rounds"),
    [
        ({"a": 3, "b": 1, "c": 2}, 7),
        ({"a": 1, "b": 2.5, "c": 4}, 3),  # 100, 250, 400: one exact cycle is 15 picks
        ({"a": 1.25, "b": 1}, 4),  # 125, 100: one exact cycle is 9 picks
        ({"a": 100, "b": 1}, 2),
    ],
)
def test_byrequests_proportions_are_exact_over_whole_cycles(weights: dict[str, float], rounds: int) -> None:
    pool = state(*(m(name, w) for name, w in weights.items()))
    lbfactors = {name: round(w * 100) for name, w in weights.items()}
    unit = gcd(*lbfactors.values())
    cycle = sum(lbfactors.values()) // unit
    counts = Counter(picks(pool, cycle * rounds))
    assert counts == {name: f // unit * rounds for name, f in lbfactors.items()}


# ---------------------------------------------------------------------------------------------
# bytraffic and bybusyness


def test_bytraffic_picks_the_lowest_traffic_per_weight() -> None:
    pool = state(m("a", 1), m("b", 2), m("c", 1), lbmethod="bytraffic")
    a, b, c = pool.members
    a.transferred, a.read = 100, 0      # 100/100 = 1
    b.transferred, b.read = 300, 100    # 400/200 = 2
    c.transferred, c.read = 50, 60      # 110/100 = 1.1
    assert picks(pool, 2) == ["a", "a"]  # choosing does not count traffic; the proxy does
    a.read = 20                          # 120/100 = 1.2
    assert pick(pool) == "c"
    c.transferred = 500                  # 560/100 = 5.6
    assert pick(pool) == "a"
    a.transferred, a.read = 1000, 0      # 10
    assert pick(pool) == "b"
    assert [x.lbstatus for x in pool.members] == [0, 0, 0]
    assert [x.elected for x in pool.members] == [3, 1, 1]


def test_bytraffic_ties_go_to_the_first_member() -> None:
    pool = state(m("a", 1), m("b", 2), lbmethod="bytraffic")
    a, b = pool.members
    a.transferred, b.transferred = 100, 200  # both 1 per lbfactor unit
    assert picks(pool, 3) == ["a"] * 3


def test_bytraffic_skips_unusable_members() -> None:
    pool = state(m("a", status="D"), m("b"), m("c"), lbmethod="bytraffic")
    pool.members[1].read = 10
    assert pick(pool) == "c"


def test_bybusyness_picks_the_least_busy() -> None:
    pool = state(m("a"), m("b"), m("c", 100), lbmethod="bybusyness")
    a, b, c = pool.members
    a.busy, b.busy, c.busy = 2, 0, 1
    assert picks(pool, 3) == ["b"] * 3  # busy outweighs loadfactor
    b.busy = 5
    assert pick(pool) == "c"
    c.busy = 3
    assert pick(pool) == "a"


def test_bybusyness_ties_are_broken_like_byrequests() -> None:
    # With equal busy counts the lbstatus arithmetic is byrequests': a=1, b=2 gives b a b.
    pool = state(m("a", 1), m("b", 2), lbmethod="bybusyness")
    assert picks(pool, 6) == seq("b a b  b a b")


def test_bybusyness_tie_among_the_least_busy_only() -> None:
    pool = state(m("a", 1), m("b", 1), m("c", 1), lbmethod="bybusyness")
    a, b, c = pool.members
    a.busy, b.busy, c.busy = 1, 0, 0
    # a still accumulates lbstatus (it is a candidate) but never wins while busier.
    # (100,100,100) -> b, b -= 300; (200,-100,200) -> c, c -= 300; (300,0,0) -> b
    assert picks(pool, 3) == seq("b c b")
    assert a.lbstatus == 300


# ---------------------------------------------------------------------------------------------
# lbset tiers and status flags


def tiered() -> PoolState:
    return state(m("a"), m("b"), m("c", lbset=1), m("d", lbset=2))


def test_lowest_lbset_is_used_while_any_member_is_usable() -> None:
    pool = tiered()
    assert picks(pool, 6) == seq("a b a b a b")
    pool.members[0].flags |= FLAG_BITS["D"]
    assert picks(pool, 3) == seq("b b b")
    assert [x.lbstatus for x in pool.members[2:]] == [0, 0]


@pytest.mark.parametrize("how", ["D", "S", "C", "E", "N", "exclude"])
def test_next_lbset_only_when_the_lower_one_is_unusable(how: str) -> None:
    pool = tiered()
    a, b, c, _d = pool.members
    exclude: list[MemberState] = []
    for member in (a, b):
        if how == "E":
            assert member.mark_error(0.0)
        elif how == "exclude":
            exclude.append(member)
        else:
            member.flags |= FLAG_BITS[how]
    assert picks(pool, 3, now=1.0, exclude=exclude) == seq("c c c")
    c.flags |= FLAG_BITS["D"]
    assert picks(pool, 2, now=1.0, exclude=exclude) == seq("d d")


def test_configured_status_flags_take_effect() -> None:
    pool = state(m("a", status="D"), m("b", status="S"), m("c", status="C"), m("d"), m("e", status="N"))
    assert picks(pool, 5) == ["d"] * 5


@pytest.mark.parametrize("flag", ["D", "S", "N", "C"])
def test_unusable_and_draining_members_are_never_chosen(flag: str) -> None:
    pool = state(m("a", 2, status=flag), m("b"), m("c", status=flag))
    assert picks(pool, 8) == ["b"] * 8
    assert pool.members[0].elected == 0 and pool.members[2].elected == 0


@pytest.mark.parametrize("flag", ["D", "S", "N", "C"])
def test_nothing_usable_means_none(flag: str) -> None:
    pool = state(m("a", status=flag), m("b", status=flag, lbset=1))
    assert pick(pool) is None
    assert [x.elected for x in pool.members] == [0, 0]


def test_draining_member_in_every_tier_leaves_only_standbys() -> None:
    pool = state(m("a", status="N"), m("h", status="H"))
    assert picks(pool, 2) == ["h", "h"]


def test_hot_standby_only_when_no_lbset_has_a_usable_member() -> None:
    pool = state(m("a"), m("h", status="H"), m("c", lbset=1), m("h2", lbset=1, status="H"))
    a, h, c, h2 = pool.members
    assert picks(pool, 3) == ["a"] * 3
    a.flags |= FLAG_BITS["D"]
    # The module's rule: standbys wait until no set has a usable non-standby member.
    assert picks(pool, 3) == ["c"] * 3
    c.mark_error(0.0)
    # Both standbys now share the work as byrequests candidates, in member order.
    assert picks(pool, 4, now=1.0) == seq("h h2 h h2")
    h.flags |= FLAG_BITS["D"]
    assert picks(pool, 2, now=1.0) == ["h2", "h2"]
    h2.flags |= FLAG_BITS["S"]
    assert pick(pool, now=1.0) is None


def test_excluded_hot_standby_is_not_chosen() -> None:
    pool = state(m("a", status="D"), m("h", status="H"), m("h2", status="H"))
    h = pool.members[1]
    assert picks(pool, 2, exclude=[h]) == ["h2", "h2"]


def test_hot_spare_stands_in_for_an_unusable_member() -> None:
    pool = state(m("a"), m("b"), m("r", status="R"), m("c", lbset=1))
    a, b, _r, c = pool.members
    assert picks(pool, 4) == seq("a b a b")
    a.flags |= FLAG_BITS["D"]
    # b and r now share lbset 0 like two equal members: (100,100)b (0,200)r -> back to equal.
    assert picks(pool, 4) == seq("b r b r")
    b.flags |= FLAG_BITS["S"]
    assert picks(pool, 2) == ["r", "r"]
    assert c.elected == 0


def test_one_hot_spare_per_unusable_member() -> None:
    pool = state(m("a"), m("b"), m("c"), m("r1", status="R"), m("r2", status="R"))
    a, b, c, _r1, _r2 = pool.members
    a.flags |= FLAG_BITS["D"]
    assert Counter(picks(pool, 6)) == {"b": 2, "c": 2, "r1": 2}
    b.mark_error(0.0)
    assert Counter(picks(pool, 6, now=1.0)) == {"c": 2, "r1": 2, "r2": 2}
    c.flags |= FLAG_BITS["D"]
    assert Counter(picks(pool, 6, now=1.0)) == {"r1": 3, "r2": 3}


def test_unusable_hot_spare_is_skipped_for_the_next() -> None:
    pool = state(m("a", status="D"), m("b"), m("r1", status="RD"), m("r2", status="R"))
    assert Counter(picks(pool, 4)) == {"b": 2, "r2": 2}


def test_excluded_member_counts_as_unusable_for_spares() -> None:
    pool = state(m("a"), m("b"), m("r", status="R"))
    a = pool.members[0]
    assert Counter(picks(pool, 4, exclude=[a])) == {"b": 2, "r": 2}


def test_hot_spare_only_covers_its_own_lbset() -> None:
    pool = state(m("a", status="D"), m("b", status="D"), m("r", lbset=1, status="R"), m("c", lbset=1))
    assert picks(pool, 3) == ["c"] * 3
    pool.members[3].flags |= FLAG_BITS["D"]
    # c is unusable now, so lbset 1's own spare stands in for it.
    assert picks(pool, 2) == ["r", "r"]


def test_spare_of_a_lower_lbset_does_not_serve_a_healthy_set() -> None:
    pool = state(m("r", status="R"), m("a", lbset=1))
    # lbset 0 has no unusable member, so the spare has nothing to stand in for.
    assert picks(pool, 3) == ["a"] * 3


# ---------------------------------------------------------------------------------------------
# Error state and retry


def test_mark_error_then_retry_after_the_retry_time() -> None:
    pool = state(m("a", retry="10s"), m("b", lbset=1))
    a, b = pool.members
    assert pick(pool, now=0.0) == "a"
    assert a.mark_error(100.0) is True
    assert not a.usable and a.errors == 1 and a.error_time == 100.0
    assert a.mark_error(101.0) is False  # already in error: the retry clock restarts
    assert a.errors == 2 and a.error_time == 101.0
    assert picks(pool, 3, now=110.999) == ["b"] * 3
    assert a.retries == 0
    assert pick(pool, now=111.0) == "a"
    assert a.usable and a.retries == 1
    assert pick(pool, now=111.0) == "a"
    assert a.retries == 1
    assert (a.elected, b.elected) == (3, 3)


def test_retry_zero_recovers_at_once() -> None:
    pool = state(m("a", retry=0), m("b", lbset=1))
    a = pool.members[0]
    a.mark_error(50.0)
    assert pick(pool, now=50.0) == "a"
    assert a.retries == 1


def test_member_with_ignore_errors_never_enters_error() -> None:
    pool = state(m("a", status="I"), m("b", lbset=1))
    a = pool.members[0]
    assert a.mark_error(0.0) is False
    assert a.mark_error(0.0) is False
    assert a.errors == 2 and a.usable
    assert picks(pool, 2, now=0.0) == ["a", "a"]


def test_errored_member_is_skipped_in_byrequests_rotation() -> None:
    pool = state(m("a"), m("b"), m("c"))
    b = pool.members[1]
    b.mark_error(0.0)
    assert picks(pool, 4, now=1.0) == seq("a c a c")


# ---------------------------------------------------------------------------------------------
# forcerecovery


def test_forcerecovery_clears_error_when_every_member_is_in_error() -> None:
    pool = state(m("a"), m("b"), m("c", lbset=1))
    for member in pool.members:
        member.mark_error(0.0)
    assert pick(pool, now=1.0) == "a"
    assert [bits_to_flags(x.flags) for x in pool.members] == ["", "", ""]
    assert [x.retries for x in pool.members] == [1, 1, 1]
    assert pick(pool, now=1.0) == "b"


def test_forcerecovery_off_returns_none() -> None:
    pool = state(m("a"), m("b"), forcerecovery=False)
    for member in pool.members:
        member.mark_error(0.0)
    assert pick(pool, now=1.0) is None
    assert all(x.flags & FLAG_BITS["E"] for x in pool.members)
    assert [x.retries for x in pool.members] == [0, 0]
    # The ordinary retry still applies.
    assert pick(pool, now=60.0) == "a"


def test_forcerecovery_needs_every_member_in_error() -> None:
    pool = state(m("a"), m("b", status="D"))
    pool.members[0].mark_error(0.0)
    assert pick(pool, now=1.0) is None
    assert pool.members[0].flags & FLAG_BITS["E"]


def test_forcerecovery_does_not_override_exclusion() -> None:
    pool = state(m("a"), m("b"))
    a, b = pool.members
    a.mark_error(0.0)
    b.mark_error(0.0)
    assert pick(pool, now=1.0, exclude=[a, b]) is None
    assert pick(pool, now=1.0, exclude=[a]) == "b"


# ---------------------------------------------------------------------------------------------
# exclude


def test_excluded_members_are_skipped() -> None:
    pool = state(m("a"), m("b"), m("c"))
    a, b, _c = pool.members
    assert picks(pool, 4, exclude=[a]) == seq("b c b c")
    assert picks(pool, 2, exclude=[a, b]) == ["c", "c"]
    assert pick(pool, exclude=list(pool.members)) is None
    assert a.elected == 0 and a.lbstatus == 0


def test_failover_within_one_request() -> None:
    pool = state(m("a"), m("b"), m("c"))
    tried: list[MemberState] = []
    order: list[str] = []
    while (chosen := pool.choose(0.0, tried)) is not None:
        tried.append(chosen)
        order.append(chosen.name)
    assert order == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------------
# Reload


def test_reload_keeps_state_of_members_with_the_same_name_and_url() -> None:
    old = state(m("a"), m("b", 2), m("c"))
    assert picks(old, 1) == ["b"]
    a, b, c = old.members
    a.busy, a.transferred, a.read = 3, 1000, 2000
    b.mark_error(50.0)
    c.mark_error(50.0)

    new_pool = make_pool(m("a"), m("b", 2), {**m("c"), "url": "http://moved.test:80"}, m("d"))
    new = PoolState(new_pool, old)
    na, nb, nc, nd = new.members
    assert (na.lbstatus, na.elected, na.busy, na.transferred, na.read) == (a.lbstatus, 0, 3, 1000, 2000)
    assert (nb.lbstatus, nb.elected, nb.errors, nb.error_time) == (b.lbstatus, 1, 1, 50.0)
    assert nb.flags & FLAG_BITS["E"]
    # c moved to another URL: a new member as far as scheduling is concerned.
    assert (nc.lbstatus, nc.errors, nc.usable) == (0, 0, True)
    assert (nd.lbstatus, nd.elected, nd.usable) == (0, 0, True)
    # b is still waiting for its retry; it comes back 60s after the error.
    assert Counter(picks(new, 6, now=100.0)) == {"a": 2, "c": 2, "d": 2}
    # At 110 b is retried and rejoins with its adopted lbstatus (-200): a (200) wins once, then b.
    assert picks(new, 2, now=110.0) == ["a", "b"]
    assert nb.usable and nb.retries == 1


def test_reload_continues_the_byrequests_sequence() -> None:
    old = state(m("a", 1), m("b", 2))
    first = picks(old, 2)
    new = PoolState(make_pool(m("a", 1), m("b", 2)), old)
    assert first + picks(new, 7) == seq("b a b  b a b  b a b")


def test_reload_with_ignore_errors_drops_the_error_state() -> None:
    old = state(m("a"), m("b", lbset=1))
    old.members[0].mark_error(10.0)
    new = PoolState(make_pool(m("a", status="I"), m("b", lbset=1)), old)
    assert new.members[0].usable and new.members[0].errors == 1
    assert pick(new, now=11.0) == "a"


def test_reload_of_a_member_that_was_not_in_error_keeps_it_usable() -> None:
    old = state(m("a"), m("b"))
    picks(old, 3)
    new = PoolState(make_pool(m("a"), m("b")), old)
    assert all(x.usable for x in new.members)
    assert [x.elected for x in new.members] == [2, 1]


# ---------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=8))
def test_byrequests_is_exact_over_one_full_cycle(weights: list[int]) -> None:
    pool = state(*(m(f"m{i}", w) for i, w in enumerate(weights)))
    counts = Counter(picks(pool, sum(weights)))
    assert [counts[f"m{i}"] for i in range(len(weights))] == weights
    # After a whole cycle every lbstatus is back where it started.
    assert [x.lbstatus for x in pool.members] == [0] * len(weights)


MEMBER_SHAPES = st.tuples(
    st.integers(min_value=1, max_value=5),                     # loadfactor
    st.integers(min_value=0, max_value=2),                     # lbset
    st.sampled_from(["", "", "D", "S", "N", "C", "H", "HD"]),  # configured status
    st.booleans(),                                             # in error
    st.booleans(),                                             # excluded
)


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(MEMBER_SHAPES, min_size=1, max_size=8),
       st.sampled_from(["byrequests", "bybusyness", "bytraffic"]))
def test_picks_never_include_unusable_members(shapes: list[tuple[int, int, str, bool, bool]],
                                              lbmethod: str) -> None:
    members = [m(f"m{i}", w, lbset=s, status=flags) for i, (w, s, flags, _e, _x) in enumerate(shapes)]
    pool = state(*members, lbmethod=lbmethod, forcerecovery=False)
    exclude = [x for x, shape in zip(pool.members, shapes, strict=True) if shape[4]]
    for x, shape in zip(pool.members, shapes, strict=True):
        if shape[3]:
            x.mark_error(0.0)
    eligible = {x.name for x, (_w, _s, flags, err, exc) in zip(pool.members, shapes, strict=True)
                if not (set(flags) & set("DSNC")) and not err and not exc}
    regular = [x for x in pool.members if x.name in eligible and "H" not in x.spec.status]
    if regular:
        lowest = min(x.lbset for x in regular)
        allowed = {x.name for x in regular if x.lbset == lowest}
    else:
        allowed = eligible  # only hot standbys are left
    chosen = [pick(pool, now=1.0, exclude=exclude) for _ in range(12)]
    if not allowed:
        assert chosen == [None] * 12
    else:
        assert set(chosen) <= allowed


# ---------------------------------------------------------------------------------------------
# Equivalence with httpd's walk
#
# PoolState keeps incremental structures (see proxy/scheduling.py) so that a choice costs no walk
# over the members. RefPool below is the straightforward O(n) implementation it replaced, kept
# as the specification: random sequences of operations drive both, and every choice, lbstatus,
# counter, flag and transition must come out identical. random, leastrequest and hash without a
# key draw from a seeded random.Random: PoolState draws exactly as random.choices and
# random.sample do on the candidate list, so with the same seed the choices are identical too.


class RefMember:
    """The member state as the O(n) scheduler kept it: plain attributes."""

    def __init__(self, spec: MemberSpec, index: int, now: float) -> None:
        self.spec = spec
        self.index = index
        self.name = spec.name
        self.route = spec.route
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
        self.error_time = now
        self.error_duration = spec.retry
        self.usable_since = float("-inf")
        self.history: list[Transition] = [Transition(now, "", bits_to_flags(self.flags), "config", "loaded")]
        self.pool: RefPool | None = None

    @property
    def usable(self) -> bool:
        return not self.flags & UNUSABLE

    def change(self, add: int, remove: int, now: float, signal: str, detail: str = "") -> bool:
        before = self.flags
        after = (before | add) & ~remove
        if after == before:
            return False
        self.flags = after
        if before & UNUSABLE and not after & UNUSABLE:
            self.usable_since = now
        transition = Transition(now, bits_to_flags(before), bits_to_flags(after), signal, detail)
        self.history.append(transition)
        if self.pool is not None:
            self.pool.log.append((self.name, transition))
        return True

    def mark_error(self, now: float, signal: str = "error", detail: str = "",
                   duration: float | None = None) -> bool:
        self.errors += 1
        if self.flags & FLAG_BITS["I"]:
            return False
        self.error_time = now
        self.error_duration = self.spec.retry if duration is None else duration
        return self.change(FLAG_BITS["E"], 0, now, signal, detail)

    def retry_if_due(self, now: float) -> None:
        if self.flags & FLAG_BITS["E"] and now >= self.error_time + self.error_duration:
            self.retries += 1
            self.change(0, FLAG_BITS["E"], now, "retry", f"{self.error_duration:g}s in error passed")

    def factor(self, now: float) -> int:
        ramp = self.spec.slowstart
        if ramp and now - self.usable_since < ramp:
            return max(1, int(self.lbfactor * max(0.1, (now - self.usable_since) / ramp)))
        return self.lbfactor

    def adopt(self, old: RefMember, keep_health: bool) -> None:
        self.lbstatus = old.lbstatus
        self.busy = old.busy
        self.elected = old.elected
        self.transferred = old.transferred
        self.read = old.read
        self.errors = old.errors
        self.retries = old.retries
        self.usable_since = old.usable_since
        self.history = old.history
        if keep_health and old.flags & FLAG_BITS["C"]:
            self.flags |= FLAG_BITS["C"]
        if old.flags & FLAG_BITS["E"] and not self.flags & FLAG_BITS["I"]:
            self.flags |= FLAG_BITS["E"]
            self.error_time = old.error_time
            self.error_duration = old.error_duration


class RefPool:
    """httpd's walk, O(n) per request: the scheduler as it was before the structures."""

    def __init__(self, spec: BalancerPool, previous: RefPool | None = None, now: float = 0.0) -> None:
        self.spec = spec
        self.lbmethod = spec.lbmethod
        self.members = [RefMember(x, i, now) for i, x in enumerate(spec.members)]
        self.by_name = {x.name: x for x in self.members}
        self.by_route = {x.route: x for x in self.members if x.route is not None}
        sets = sorted({x.lbset for x in self.members})
        self.tiers = [[x for x in self.members if x.lbset == s] for s in sets]
        self.random = random.Random()
        self.log: list[tuple[str, Transition]] = []
        self.tables: dict[tuple[int, ...], Ring | Maglev] = {}
        for member in self.members:
            member.pool = self
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
                        self.log.append((member.name, change))
                else:
                    member.usable_since = now

    def choose(self, now: float, exclude: Collection[RefMember] = (), key: str | None = None
               ) -> RefMember | None:
        best = self._choose(now, exclude, key)
        if best is None and self.spec.forcerecovery and self.members and \
                all(x.flags & FLAG_BITS["E"] for x in self.members):
            for member in self.members:
                member.retries += 1
                member.change(0, FLAG_BITS["E"], now, "forcerecovery", "every member was in error")
            best = self._choose(now, exclude, key)
        if best is not None:
            best.elected += 1
        return best

    def find_route(self, route: str, now: float, exclude: Collection[RefMember] = ()
                   ) -> tuple[RefMember | None, Reason]:
        member = self.by_route.get(route)
        if member is None:
            return None, Reason.MEMBER_GONE
        if member not in exclude:
            member.retry_if_due(now)
            if member.usable:
                return member, Reason.MEMBER_DRAINING if member.flags & FLAG_BITS["N"] else Reason.STICKY
        reason = (Reason.MEMBER_DISABLED if member.flags & (FLAG_BITS["D"] | FLAG_BITS["S"])
                  and member not in exclude else Reason.MEMBER_ERROR)
        if member.spec.redirect is not None:
            target = self.by_route.get(member.spec.redirect)
            if target is not None and target not in exclude:
                target.retry_if_due(now)
                if target.usable:
                    return target, reason
        return None, reason

    def note_sticky(self, chosen: RefMember, now: float) -> None:
        total = 0
        for x in self.members:
            if x.usable:
                f = x.factor(now)
                x.lbstatus += f
                total += f
        chosen.lbstatus -= total
        chosen.elected += 1

    def candidates(self, now: float, exclude: Collection[RefMember] = ()) -> list[RefMember]:
        bits = FLAG_BITS
        standbys: list[RefMember] = []
        for tier in self.tiers:
            unusable = 0
            regular: list[RefMember] = []
            spares: list[RefMember] = []
            for x in tier:
                flags = x.flags
                if flags & bits["N"] or x in exclude:
                    if not flags & (bits["R"] | bits["H"]):
                        unusable += 1
                    continue
                if flags & bits["E"]:
                    x.retry_if_due(now)
                    flags = x.flags
                usable = not flags & UNUSABLE
                if flags & bits["R"]:
                    if usable:
                        spares.append(x)
                elif flags & bits["H"]:
                    if usable:
                        standbys.append(x)
                elif usable:
                    regular.append(x)
                else:
                    unusable += 1
            if unusable and spares:
                regular.extend(spares[:unusable])
            if regular:
                return regular
        return standbys

    def _choose(self, now: float, exclude: Collection[RefMember], key: str | None) -> RefMember | None:
        cands = self.candidates(now, exclude)
        if not cands:
            return None
        method = self.lbmethod
        if method is LBMethod.BYREQUESTS or method is LBMethod.BYBUSYNESS:
            total = 0
            best = cands[0]
            by_busy = method is LBMethod.BYBUSYNESS
            for x in cands:
                f = x.factor(now)
                x.lbstatus += f
                total += f
                if x is not best and (
                        (not by_busy and x.lbstatus > best.lbstatus)
                        or (by_busy and (x.busy < best.busy
                                         or (x.busy == best.busy and x.lbstatus > best.lbstatus)))):
                    best = x
            best.lbstatus -= total
            return best
        if method is LBMethod.BYTRAFFIC:
            best = cands[0]
            best_traffic = (best.transferred + best.read) / best.factor(now)
            for x in cands[1:]:
                traffic = (x.transferred + x.read) / x.factor(now)
                if traffic < best_traffic:
                    best, best_traffic = x, traffic
            return best
        if len(cands) == 1:
            return cands[0]
        if method is LBMethod.LEASTREQUEST:
            a, b = self.random.sample(cands, 2)
            score_a, score_b = (a.busy + 1) / a.factor(now), (b.busy + 1) / b.factor(now)
            return a if score_a <= score_b else b
        if method is LBMethod.HASH and key is not None:
            ident = tuple(x.index for x in cands)
            table = self.tables.get(ident)
            if table is None:
                spec = self.spec.hash
                names = [x.name for x in cands]
                weights = [x.spec.loadfactor for x in cands]
                maglev = spec is not None and spec.algorithm is HashAlgorithm.MAGLEV
                table = self.tables[ident] = Maglev(names, weights) if maglev else Ring(names, weights)
            return cands[table.lookup(hash64(key))]
        return self.random.choices(cands, [x.factor(now) for x in cands])[0]


def member_spec(i: int, loadfactor: float = 1.0, lbset: int = 0, status: str = "", retry: float = 60.0,
                slowstart: float = 0.0, redirect: str | None = None, url: str | None = None) -> MemberSpec:
    return MemberSpec(url=url or f"http://m{i}.test:8080", host=f"m{i}.test", port=8080, base_path="",
                      name=f"m{i}", route=f"r{i}", loadfactor=loadfactor, lbset=lbset,
                      status=frozenset(status), retry=retry, slowstart=slowstart, redirect=redirect)


def pool_spec(members: list[MemberSpec], lbmethod: str, forcerecovery: bool = True,
              maglev: bool = False) -> BalancerPool:
    hashing = HashSpec(HashOn.HEADER, "X-User", HashAlgorithm.MAGLEV if maglev else HashAlgorithm.RINGHASH)
    return BalancerPool(name="web", lbmethod=LBMethod(lbmethod), forcerecovery=forcerecovery,
                        hash=hashing if lbmethod == "hash" else None, members=tuple(members))


def snapshot(members: Iterable[MemberState] | Iterable[RefMember]) -> list[tuple[object, ...]]:
    return [(x.name, bits_to_flags(x.flags), x.lbstatus, x.busy, x.elected, x.transferred, x.read,
             x.errors, x.retries, x.error_time, x.error_duration, x.usable_since,
             [(t.time, t.before, t.after, t.signal, t.detail) for t in x.history])
            for x in members]


class Twin:
    """A PoolState and a RefPool driven alike, compared after every step."""

    def __init__(self, spec: BalancerPool, seed: int) -> None:
        self.now = 0.0
        self.pool = PoolState(spec, now=self.now)
        self.ref = RefPool(spec, now=self.now)
        self.pool.random, self.ref.random = random.Random(seed), random.Random(seed)
        self.log: list[tuple[str, Transition]] = []
        self.pool.listeners.append(lambda member, change: self.log.append((member.name, change)))
        self.choices: list[str | None] = []

    def pair(self, i: int) -> tuple[MemberState, RefMember]:
        i %= len(self.pool.members)
        return self.pool.members[i], self.ref.members[i]

    def choose(self, mask: int, key: str | None, serve: bool = False) -> None:
        """``serve``: the request then goes out to the chosen member (busy, 200 bytes sent)."""
        exclude = [x for i, x in enumerate(self.pool.members) if mask >> i & 1]
        ref_exclude = [x for i, x in enumerate(self.ref.members) if mask >> i & 1]
        got = self.pool.choose(self.now, exclude, key)
        want = self.ref.choose(self.now, ref_exclude, key)
        name = None if got is None else got.name
        assert name == (None if want is None else want.name)
        self.choices.append(name)
        if serve and got is not None and want is not None:
            got.begin()
            got.transferred += 200
            want.busy += 1
            want.transferred += 200

    def sticky(self, i: int, mask: int) -> None:
        member, _ = self.pair(i)
        assert member.route is not None
        exclude = [x for j, x in enumerate(self.pool.members) if mask >> j & 1]
        ref_exclude = [x for j, x in enumerate(self.ref.members) if mask >> j & 1]
        got, reason = self.pool.find_route(member.route, self.now, exclude)
        want, ref_reason = self.ref.find_route(member.route, self.now, ref_exclude)
        assert ((got and got.name), reason) == ((want and want.name), ref_reason)
        if got is not None and want is not None:
            self.pool.note_sticky(got, self.now)
            self.ref.note_sticky(want, self.now)

    def note(self, i: int) -> None:
        member, ref_member = self.pair(i)
        self.pool.note_sticky(member, self.now)
        self.ref.note_sticky(ref_member, self.now)

    def change(self, i: int, add: int, remove: int) -> None:
        member, ref_member = self.pair(i)
        assert member.change(add, remove, self.now, "manager") == \
            ref_member.change(add, remove, self.now, "manager")

    def set_flags(self, i: int, bits: int) -> None:
        member, ref_member = self.pair(i)
        member.flags ^= bits
        ref_member.flags ^= bits

    def error(self, i: int, duration: float | None) -> None:
        member, ref_member = self.pair(i)
        assert member.mark_error(self.now, "outlier", duration=duration) == \
            ref_member.mark_error(self.now, "outlier", duration=duration)

    def busy(self, i: int, how: int) -> None:
        member, ref_member = self.pair(i)
        if how == 0:
            member.begin()
            ref_member.busy += 1
        elif how == 1 and ref_member.busy > 0:
            member.end()
            ref_member.busy -= 1
        elif how >= 2:
            member.busy = ref_member.busy = how - 2

    def traffic(self, i: int, sent: int, received: int) -> None:
        member, ref_member = self.pair(i)
        member.transferred += sent
        member.read += received
        ref_member.transferred += sent
        ref_member.read += received

    def lbstatus(self, i: int, value: int) -> None:
        member, ref_member = self.pair(i)
        member.lbstatus = ref_member.lbstatus = value

    def reload(self, how: int) -> None:
        """The same members again, or one loadfactor changed, or the last member gone, or a
        member added, or one member's URL changed (a new member)."""
        specs = list(self.pool.spec.members)
        if how == 1:
            specs[0] = dataclasses.replace(specs[0], loadfactor=specs[0].loadfactor + 1)
        elif how == 2 and len(specs) > 1:
            specs.pop()
        elif how == 3:
            specs.append(member_spec(len(specs) + 100, 2.0, slowstart=3.0))
        elif how == 4:
            specs[-1] = dataclasses.replace(specs[-1], url="http://moved.test:80")
        spec = dataclasses.replace(self.pool.spec, members=tuple(specs))
        self.pool = PoolState(spec, self.pool, self.now)
        self.ref = RefPool(spec, self.ref, self.now)
        self.pool.listeners.append(lambda member, change: self.log.append((member.name, change)))
        self.pool.announce()

    def check(self) -> None:
        assert snapshot(self.pool.members) == snapshot(self.ref.members)
        assert self.log == self.ref.log
        self.log.clear()
        self.ref.log.clear()


OPERATIONS = st.one_of(
    st.tuples(st.just("choose"), st.sampled_from([0, 0, 0, 0, 1, 2, 3, 5, 64, 127]),
              st.sampled_from([None, "u1", "u2", "u3"]), st.booleans()),
    st.tuples(st.just("sticky"), st.integers(0, 7), st.sampled_from([0, 0, 1, 2])),
    st.tuples(st.just("note"), st.integers(0, 7)),
    st.tuples(st.just("change"), st.integers(0, 7), st.sampled_from([0, *FLAG_BITS.values()]),
              st.sampled_from([0, *FLAG_BITS.values()])),
    st.tuples(st.just("set_flags"), st.integers(0, 7), st.sampled_from(list(FLAG_BITS.values()))),
    st.tuples(st.just("error"), st.integers(0, 7), st.sampled_from([None, None, 0.0, 2.0, 30.0])),
    st.tuples(st.just("busy"), st.integers(0, 7), st.sampled_from([0, 0, 1, 1, 2, 4])),
    st.tuples(st.just("traffic"), st.integers(0, 7), st.integers(0, 300), st.integers(0, 300)),
    st.tuples(st.just("lbstatus"), st.integers(0, 7), st.integers(-500, 500)),
    st.tuples(st.just("time"), st.sampled_from([0.0, 0.25, 1.0, 1.0, 3.0, 10.0, 61.0, -0.5])),
    st.tuples(st.just("reload"), st.integers(0, 4)),
    st.tuples(st.just("candidates"), st.sampled_from([0, 0, 1, 6])),
)

SHAPES = st.tuples(
    st.sampled_from([1, 1, 2, 2, 1.5, 3, 7.25]),                      # loadfactor
    st.sampled_from([0, 0, 0, 1, 2]),                                   # lbset
    st.sampled_from(["", "", "", "", "H", "R", "N", "D", "E", "I"]),    # configured status
    st.sampled_from([0.0, 1.0, 5.0, 60.0]),                             # retry
    st.sampled_from([0.0, 0.0, 0.0, 4.0]),                              # slowstart
    st.booleans(),                                                      # redirect to the next member
)


def run_twin(twin: Twin, operations: list[tuple[Any, ...]], every: int = 1) -> None:
    """Apply the operations to both; compare the whole state after every ``every`` of them (and
    the choices after each)."""
    twin.check()
    for step, (op, *args) in enumerate(operations):
        if op == "time":
            twin.now += args[0]
        elif op == "candidates":
            mask = args[0]
            exclude = [x for i, x in enumerate(twin.pool.members) if mask >> i & 1]
            ref_exclude = [x for i, x in enumerate(twin.ref.members) if mask >> i & 1]
            assert [x.name for x in twin.pool.candidates(twin.now, exclude)] == \
                [x.name for x in twin.ref.candidates(twin.now, ref_exclude)]
        else:
            getattr(twin, op)(*args)
        if step % every == 0:
            twin.check()
    twin.check()


@settings(max_examples=1000, deadline=None, database=None)
@given(st.lists(SHAPES, min_size=1, max_size=12),
       st.sampled_from([x.value for x in LBMethod]),
       st.booleans(), st.booleans(), st.integers(0, 2**32), st.sampled_from([0, 4, SCAN_MAX]),
       st.lists(OPERATIONS, max_size=60))
def test_structures_choose_exactly_as_the_walk(shapes: list[tuple[float, int, str, float, float, bool]],
                                               lbmethod: str, forcerecovery: bool, maglev: bool, seed: int,
                                               scan_max: int, operations: list[tuple[Any, ...]]) -> None:
    """``scan_max``: candidate sets up to this size are walked, larger ones kept in heaps (0:
    heaps always); the set's size crosses it as members come and go."""
    specs = [member_spec(i, w, s, flags, retry, slowstart,
                         redirect=f"r{(i + 1) % len(shapes)}" if redirect else None)
             for i, (w, s, flags, retry, slowstart, redirect) in enumerate(shapes)]
    with mock.patch.object(scheduling, "SCAN_MAX", scan_max):
        run_twin(Twin(pool_spec(specs, lbmethod, forcerecovery, maglev), seed), operations)


@pytest.mark.parametrize("scan_max", [SCAN_MAX, 1000])
@pytest.mark.parametrize("lbmethod", [x.value for x in LBMethod])
def test_structures_match_the_walk_on_a_large_pool(lbmethod: str, scan_max: int) -> None:
    """300 members (few distinct loadfactors, tiers, spares, standbys) and 3,000 random steps:
    deep heaps, many busy levels, retries coming due among many members (and the same, walked)."""
    rnd = random.Random(lbmethod)
    specs = [member_spec(i, rnd.choice([1, 2, 2.5, 4]), rnd.choice([0, 0, 0, 0, 1]),
                         rnd.choice(["", "", "", "", "", "", "R", "H", "N", "E"]),
                         rnd.choice([1.0, 5.0]), rnd.choice([0.0, 0.0, 0.0, 2.0]))
             for i in range(300)]
    twin = Twin(pool_spec(specs, lbmethod, maglev=True), seed=7)
    operations: list[tuple[Any, ...]] = []
    flags = [*FLAG_BITS.values()]
    for _ in range(500 if lbmethod == "hash" else 3000):  # hash: a Maglev table per candidate set
        r = rnd.random()
        i = rnd.randrange(300)
        if r < 0.5:
            operations.append(("choose", rnd.choice([0, 0, 0, 0, 1 << rnd.randrange(300)]),
                               rnd.choice([None, f"u{rnd.randrange(50)}"]), True))
        elif r < 0.6:
            operations.append(("busy", i, 1))
        elif r < 0.7:
            operations.append(("busy", i, 0))
        elif r < 0.78:
            operations.append(("sticky", i, 0))
        elif r < 0.84:
            operations.append(("traffic", i, rnd.randrange(1000), rnd.randrange(5000)))
        elif r < 0.88:
            operations.append(("error", i, rnd.choice([None, 0.5, 3.0])))
        elif r < 0.9:
            operations.append(("change", i, rnd.choice(flags), rnd.choice(flags)))
        else:
            operations.append(("time", rnd.choice([0.01, 0.1, 0.5, 1.0])))
    with mock.patch.object(scheduling, "SCAN_MAX", scan_max):
        run_twin(twin, operations, every=10)
    assert len({c for c in twin.choices if c is not None}) > 50


def test_error_clock_moved_earlier_is_seen() -> None:
    """An outlier ejection of a member already in error can end sooner than its retry: the
    structures must look again at the new deadline, not the old one."""
    twin = Twin(pool_spec([member_spec(0, retry=60.0), member_spec(1, lbset=1)], "byrequests"), seed=1)
    run_twin(twin, [("error", 0, None), ("time", 1.0), ("choose", 0, None), ("error", 0, 2.0),
                    ("time", 2.0), ("choose", 0, None), ("choose", 0, None)])
    assert twin.choices == ["m1", "m0", "m0"]


def test_clock_going_back_into_a_ramp() -> None:
    """A member whose slowstart ramp had ended when the structures were built ramps again for a
    ``now`` before that end."""
    specs = [member_spec(0, 2.0, status="E", retry=5.0, slowstart=10.0), member_spec(1)]
    twin = Twin(pool_spec(specs, "byrequests"), seed=1)
    run_twin(twin, [("time", 5.0), ("candidates", 0), ("time", 15.0), ("choose", 0, None),
                    *[("choose", 0, None), ("time", -1.0)] * 12, ("note", 1), ("choose", 0, None)])
    assert twin.pool.members[0].factor(twin.now) < 200


class EdgeOfOne(random.Random):
    """random() at its upper bound: random.choices' guard against rounding picks the last one."""

    def random(self) -> float:
        return 1.0


@pytest.mark.parametrize("mask", [0, 0b100, 0b1100, 0b1])
def test_weighted_draw_at_the_edge_picks_the_last_candidate(mask: int) -> None:
    specs = [member_spec(i, 1 + i) for i in range(4)]
    for lbmethod in ("random", "hash"):
        twin = Twin(pool_spec(specs, lbmethod), seed=1)
        twin.pool.random, twin.ref.random = EdgeOfOne(), EdgeOfOne()
        run_twin(twin, [("choose", mask, None)])
        last = max(i for i in range(4) if not mask >> i & 1)
        assert twin.choices == [f"m{last}"]


@pytest.mark.parametrize("scan_max", [0, SCAN_MAX])
@pytest.mark.parametrize("lbmethod", ["leastrequest", "random", "bytraffic", "byrequests", "bybusyness"])
def test_excluded_candidates_are_skipped_exactly(lbmethod: str, scan_max: int) -> None:
    """Failover within a request: each exclusion pattern, many times, against the walk."""
    specs = [member_spec(i, 1 + i % 3, slowstart=4.0 if i == 4 else 0.0) for i in range(8)]
    twin = Twin(pool_spec(specs, lbmethod), seed=3)
    operations: list[tuple[Any, ...]] = [("reload", 3)]  # one member ramping up
    for mask in (0b1, 0b10, 0b1000_0000, 0b1_0001, 0b111_1110, 0b1_0000_0000, 0b1_0101_0101):
        operations += [("choose", mask, None, True), ("traffic", mask % 7, 50, 10), ("busy", mask % 5, 1),
                       ("time", 0.25)] * 25
    with mock.patch.object(scheduling, "SCAN_MAX", scan_max):
        run_twin(twin, operations)
