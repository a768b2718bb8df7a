"""Consistent hashing: the ring hash and Maglev are deterministic, weighted, and move about 1/N of
the keys when one of N members leaves or joins."""

from __future__ import annotations

import hashlib
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancerpool.proxy.hashing import MAGLEV_TABLE, RING_POINTS_PER_WEIGHT, Maglev, Ring, hash64

Table = Ring | Maglev
ALGORITHMS: list[type[Ring] | type[Maglev]] = [Ring, Maglev]
KEYS = [hash64(f"key-{i}") for i in range(2000)]
MANY_KEYS = [hash64(f"user-{i}") for i in range(20_000)]


def owners(table: Table, names: list[str], keys: list[int] = KEYS) -> list[str]:
    return [names[table.lookup(k)] for k in keys]


def shares(table: Table, names: list[str]) -> dict[str, float]:
    counts = Counter(owners(table, names, MANY_KEYS))
    return {n: counts[n] / len(MANY_KEYS) for n in names}


def test_hash64_is_blake2b_64() -> None:
    assert hash64("abc") == int.from_bytes(hashlib.blake2b(b"abc", digest_size=8).digest(), "big")
    assert hash64("") == int.from_bytes(hashlib.blake2b(b"", digest_size=8).digest(), "big")
    assert hash64("\u00e9") == int.from_bytes(hashlib.blake2b("\u00e9".encode(), digest_size=8).digest(),
                                              "big")
    assert hash64("\udcff") == int.from_bytes(hashlib.blake2b(b"\xff", digest_size=8).digest(), "big")
    assert 0 <= hash64("x") < 1 << 64


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_deterministic_across_instances(cls: type[Ring] | type[Maglev]) -> None:
    names = ["pod-a", "pod-b", "pod-c", "pod-d"]
    first = owners(cls(names, [1.0, 2.0, 1.0, 1.5]), names)
    second = owners(cls(list(names), [1.0, 2.0, 1.0, 1.5]), names)
    assert first == second
    assert set(first) == set(names)


def test_ring_points_depend_only_on_the_member() -> None:
    names = ["pod-a", "pod-b", "pod-c"]
    forward = Ring(names, [1.0, 1.0, 1.0])
    backward = Ring(names[::-1], [1.0, 1.0, 1.0])
    assert forward.points == backward.points
    assert owners(forward, names) == owners(backward, names[::-1])
    assert len(forward.points) == 3 * RING_POINTS_PER_WEIGHT
    assert forward.points == sorted(forward.points)
    assert Counter(forward.owners) == {0: 160, 1: 160, 2: 160}


def test_ring_points_follow_weight() -> None:
    ring = Ring(["a", "b", "c"], [1.0, 2.5, 0.01])
    assert Counter(ring.owners) == {0: 160, 1: 400, 2: 2}


def test_ring_lookup_wraps_and_hits_points() -> None:
    ring = Ring(["a", "b"], [1.0, 1.0])
    first, last = ring.points[0], ring.points[-1]
    assert ring.lookup(first) == ring.owners[0]
    assert ring.lookup(0) == ring.owners[0]
    assert ring.lookup(last) == ring.owners[-1]
    assert ring.lookup(last + 1) == ring.owners[0]  # past the last point: back to the first
    assert ring.lookup((1 << 64) - 1) == ring.owners[0]
    assert ring.lookup(ring.points[5] + 1) == ring.owners[6]


def test_maglev_table_full_and_weighted() -> None:
    table = Maglev(["a", "b"], [1.0, 3.0])
    assert len(table.table) == MAGLEV_TABLE
    assert Counter(table.table) == {0: 16384, 1: 49153}
    assert table.lookup(MAGLEV_TABLE + 7) == table.table[7]


def test_maglev_small_table() -> None:
    table = Maglev(["a", "b", "c"], [1.0, 1.0, 1.0], size=7)
    assert len(table.table) == 7
    assert sorted(Counter(table.table).values()) == [2, 2, 3]


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_single_member_takes_everything(cls: type[Ring] | type[Maglev]) -> None:
    table = cls(["only"], [1.0])
    assert {table.lookup(k) for k in KEYS} == {0}


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_empty_raises_lookup_error(cls: type[Ring] | type[Maglev]) -> None:
    table = cls([], [])
    with pytest.raises(LookupError):
        table.lookup(0)
    with pytest.raises(LookupError):
        table.lookup(hash64("x"))


def test_ring_names_and_weights_must_match() -> None:
    with pytest.raises(ValueError):
        Ring(["a", "b"], [1.0])


PAIRS = [("a", "b"), ("alpha", "beta"), ("m1", "m2"), ("x", "y"), ("pod-0", "pod-1"),
         ("10.0.0.1:8080", "10.0.0.2:8080")]


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_weights_respected(cls: type[Ring] | type[Maglev]) -> None:
    """Weight 3 gets about three times the keys of weight 1 (a 0.75 share)."""
    heavy = []
    for light_name, heavy_name in PAIRS:
        names = [light_name, heavy_name]
        share = shares(cls(names, [1.0, 3.0]), names)[heavy_name]
        heavy.append(share)
        # The ring's spread comes from a few hundred points: looser per pair than Maglev's table.
        assert 0.68 <= share <= 0.82, (names, share)
    assert 0.73 <= sum(heavy) / len(heavy) <= 0.77


@pytest.mark.parametrize("cls", ALGORITHMS)
def test_equal_weights_spread_evenly(cls: type[Ring] | type[Maglev]) -> None:
    names = [f"pod-{i}" for i in range(5)]
    for name, share in shares(cls(names, [1.0] * 5), names).items():
        assert 0.14 <= share <= 0.26, (name, share)


# ---------------------------------------------------------------------------------------------
# Properties: about 1/N of the keys move


NAME = st.text(alphabet=string.ascii_lowercase + string.digits + "-.:", min_size=1, max_size=16)


def bound(n: int) -> float:
    return 2000 * (1 / n) * 1.6 + 30


@settings(max_examples=50, deadline=None)
@given(st.lists(NAME, min_size=3, max_size=12, unique=True), st.data())
def test_removing_a_member_moves_about_one_nth(names: list[str], data: st.DataObject) -> None:
    n = len(names)
    gone = data.draw(st.integers(0, n - 1), label="removed")
    rest = names[:gone] + names[gone + 1:]
    for cls in ALGORITHMS:
        before = owners(cls(names, [1.0] * n), names)
        after = owners(cls(rest, [1.0] * (n - 1)), rest)
        moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
        assert len(moved) <= bound(n), (cls.__name__, n, len(moved))
        # every key of the removed member had to move, and none went to it
        assert all(after[i] != names[gone] for i in range(len(KEYS)))
        if cls is Ring:
            # the ring moves only the removed member's keys
            assert all(before[i] == names[gone] for i in moved)


@settings(max_examples=50, deadline=None)
@given(st.lists(NAME, min_size=4, max_size=13, unique=True))
def test_adding_a_member_moves_about_one_nth(names: list[str]) -> None:
    old, new = names[:-1], names[-1]
    n = len(old)
    for cls in ALGORITHMS:
        before = owners(cls(old, [1.0] * n), old)
        after = owners(cls(names, [1.0] * (n + 1)), names)
        moved = [i for i in range(len(KEYS)) if before[i] != after[i]]
        assert len(moved) <= bound(n + 1), (cls.__name__, n, len(moved))
        assert len(moved) > 0
        if cls is Ring:
            # the ring gives the newcomer keys and moves nothing else
            assert all(after[i] == new for i in moved)


@settings(max_examples=25, deadline=None)
@given(st.lists(NAME, min_size=3, max_size=8, unique=True), st.data())
def test_ring_weight_change_moves_only_to_or_from_that_member(names: list[str],
                                                              data: st.DataObject) -> None:
    n = len(names)
    which = data.draw(st.integers(0, n - 1), label="reweighted")
    weights = [1.0] * n
    heavier = list(weights)
    heavier[which] = 2.0
    before = owners(Ring(names, weights), names)
    after = owners(Ring(names, heavier), names)
    assert all(after[i] == names[which] for i in range(len(KEYS)) if before[i] != after[i])
