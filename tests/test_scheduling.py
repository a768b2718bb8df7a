"""Member selection: httpd's mod_proxy_balancer algorithms, checked against hand-computed sequences."""

from __future__ import annotations

from collections import Counter
from math import gcd
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerpool.proxy.model import API_VERSION, KIND, BalancerPool, parse_pools
from balancerpool.proxy.scheduling import (
    FLAG_BITS,
    MemberState,
    PoolState,
    bits_to_flags,
    flags_to_bits,
)

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
