"""Consistent hashing, pure: a ring hash (Karger et al., as Envoy's RING_HASH) and Maglev.

Both map a 64-bit key hash to one of a set of members and move only about 1/N of the keys when
one of N members leaves. Hashes are blake2b, so every proxy replica and every restart agrees.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

#: Ring points per unit of loadfactor (a few hundred points per member keep the spread even).
RING_POINTS_PER_WEIGHT = 160
MAX_RING = 1 << 20
#: Maglev's lookup table size: a prime, as the paper requires (Envoy's default).
MAGLEV_TABLE = 65537


def hash64(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode("utf-8", "surrogateescape"),
                                          digest_size=8).digest(), "big")


class Ring:
    """Each member owns ``points`` pseudo-random points; a key belongs to the next point."""

    __slots__ = ("owners", "points")

    def __init__(self, names: Sequence[str], weights: Sequence[float]) -> None:
        # A member's points depend only on its own name and weight, never on the other members:
        # that is what keeps a member's departure from moving anyone else's keys.
        total = sum(weights) or 1.0
        scale = min(1.0, MAX_RING / (RING_POINTS_PER_WEIGHT * total))
        entries: list[tuple[int, int]] = []
        for index, (name, weight) in enumerate(zip(names, weights, strict=True)):
            count = max(1, round(RING_POINTS_PER_WEIGHT * weight * scale))
            entries.extend((hash64(f"{name}#{i}"), index) for i in range(count))
        entries.sort()
        self.points = [p for p, _ in entries]
        self.owners = [o for _, o in entries]

    def lookup(self, key: int) -> int:
        if not self.points:
            raise LookupError("empty ring")
        i = bisect.bisect_left(self.points, key)
        return self.owners[i if i < len(self.owners) else 0]


class Maglev:
    """Maglev (Eisenbud et al., NSDI 2016) with weights as Envoy does: a member takes its turn
    to fill a slot only while its share of slots is below its share of weight."""

    __slots__ = ("table",)

    def __init__(self, names: Sequence[str], weights: Sequence[float], size: int = MAGLEV_TABLE) -> None:
        n = len(names)
        self.table: list[int] = []
        if n == 0:
            return
        offsets = [hash64(f"{name}#offset") % size for name in names]
        skips = [hash64(f"{name}#skip") % (size - 1) + 1 for name in names]
        top = max(weights)
        shares = [w / top for w in weights]
        nexts = [0] * n
        placed = [0] * n
        table = [-1] * size
        filled = 0
        iteration = 0
        while filled < size:
            iteration += 1
            for i in range(n):
                if placed[i] + 1 > shares[i] * iteration + 1e-9:
                    continue
                # The next free slot in member i's permutation.
                while True:
                    slot = (offsets[i] + nexts[i] * skips[i]) % size
                    nexts[i] += 1
                    if table[slot] < 0:
                        break
                table[slot] = i
                placed[i] += 1
                filled += 1
                if filled == size:
                    break
        self.table = table

    def lookup(self, key: int) -> int:
        if not self.table:
            raise LookupError("empty table")
        return self.table[key % len(self.table)]
