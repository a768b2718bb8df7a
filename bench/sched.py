"""Scheduling cost against pool size: µs per request spent in proxy/scheduling.py.

    python bench/sched.py            # pools of 10, 100, 1,000 and 10,000 members (< 60 s)
    python bench/sched.py --quick    # the same table with shorter timings (< 10 s)

For every lbmethod it times what the request path asks of the scheduler for one request: a
``choose()``, then the accounting the proxy does around it (``begin()``/``end()``: busy while the
request is out, with 8 requests in flight; the bytes sent and received, for ``bytraffic``). The ``sticky`` row
times ``find_route()`` + ``note_sticky()`` (httpd's updatelbstatus after a sticky request).

Pools: members all usable with loadfactors 1, 2, 3, 4 in turn in one lbset ("plain"); and "mixed":
the same plus 5 members in error (retry far away) and a second lbset of n/10 hot standbys (H).
``hash`` uses Maglev tables (the ring takes seconds to build for 10,000 members; lookups cost the
same), built before the timing starts, as the proxy caches them per candidate set.

The last column is the ratio of the 10,000-member figure to the 10-member one: 1.0 means the cost
does not depend on the pool size.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from collections import deque
from collections.abc import Callable

from balancerpool.proxy.model import BalancerPool, HashAlgorithm, HashOn, HashSpec, LBMethod, MemberSpec
from balancerpool.proxy.scheduling import MemberState, PoolState

SIZES = (10, 100, 1000, 10000)
METHODS = ("byrequests", "bytraffic", "bybusyness", "leastrequest", "random", "hash")
IN_FLIGHT = 8
RETRY_FAR = 365 * 24 * 3600.0


def pool_spec(method: str, n: int, mixed: bool) -> BalancerPool:
    members = [MemberSpec(url=f"http://m{i}.test:8080", host=f"m{i}.test", port=8080, base_path="",
                          name=f"m{i}", route=f"r{i}", loadfactor=float(1 + i % 4), retry=RETRY_FAR)
               for i in range(n)]
    if mixed:
        for i in range(0, min(n, 50), 10):  # 5 members in error (fewer in a pool of 10: 1)
            members[i] = dataclasses.replace(members[i], status=frozenset("E"))
        members += [MemberSpec(url=f"http://h{i}.test:8080", host=f"h{i}.test", port=8080, base_path="",
                               name=f"h{i}", loadfactor=1.0, lbset=1, status=frozenset("H"))
                    for i in range(max(1, n // 10))]
    hash_spec = HashSpec(HashOn.HEADER, "X-User", HashAlgorithm.MAGLEV) if method == "hash" else None
    return BalancerPool(name="bench", lbmethod=LBMethod(method), hash=hash_spec, members=tuple(members))


def request_loop(state: PoolState, method: str) -> Callable[[int], None]:
    """One request's scheduling work, ``count`` times."""
    keys = [f"user-{i}" for i in range(997)] if method == "hash" else [None]
    flight: deque[MemberState] = deque()
    clock = [1000.0]

    def run(count: int) -> None:
        now = clock[0]
        choose = state.choose
        key_iter = itertools.cycle(keys)
        for _ in range(count):
            now += 1e-6
            member = choose(now, (), next(key_iter))
            assert member is not None
            member.begin()
            member.transferred += 300
            member.read += 1200
            flight.append(member)
            if len(flight) > IN_FLIGHT:
                flight.popleft().end()
        clock[0] = now

    return run


def sticky_loop(state: PoolState) -> Callable[[int], None]:
    routes = [m.route for m in state.members if m.route is not None and m.usable]
    clock = [1000.0]

    def run(count: int) -> None:
        now = clock[0]
        find_route, note_sticky = state.find_route, state.note_sticky
        route_iter = itertools.cycle(routes[::7] or routes)
        for _ in range(count):
            now += 1e-6
            member, _reason = find_route(next(route_iter), now)
            assert member is not None
            note_sticky(member, now)
        clock[0] = now

    return run


def calibrate(run: Callable[[int], None], seconds: float) -> int:
    """How many calls take about ``seconds``."""
    run(3)  # warm-up: builds lazily computed tables
    count, elapsed = 1, 0.0
    while elapsed < seconds / 4:
        count *= 2
        start = time.perf_counter()
        run(count)
        elapsed = time.perf_counter() - start
    return max(1, int(count * seconds / elapsed))


def measure(runs: list[Callable[[int], None]], budget: float, rounds: int = 30) -> list[float]:
    """µs per call for each of ``runs``: the best of ``rounds`` batches, the runs taking turns
    batch by batch so that a machine busy for a while weighs on all of them alike."""
    counts = [calibrate(run, budget / rounds) for run in runs]
    best = [float("inf")] * len(runs)
    for _ in range(rounds):
        for i, (run, count) in enumerate(zip(runs, counts, strict=True)):
            start = time.perf_counter()
            run(count)
            best[i] = min(best[i], (time.perf_counter() - start) / count)
    return [b * 1e6 for b in best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timings (< 10 s in all)")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma list of pool sizes")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    budget = 0.06 if args.quick else 0.45
    started = time.perf_counter()
    header = f"{'lbmethod':<14}{'pool':<7}" + "".join(f"{n:>10}" for n in sizes) + f"{'ratio':>9}"
    print("µs per request (choose + busy/traffic accounting; sticky: find_route + note_sticky)")
    print(header)
    print("-" * len(header))
    worst = 0.0
    rows = [(method, mixed) for mixed in (False, True) for method in (*METHODS, "sticky")]
    for method, mixed in rows:
        runs: list[Callable[[int], None]] = []
        for n in sizes:
            state = PoolState(pool_spec("byrequests" if method == "sticky" else method, n, mixed), now=0.0)
            runs.append(sticky_loop(state) if method == "sticky" else request_loop(state, method))
        figures = measure(runs, budget)
        ratio = figures[-1] / figures[0]
        worst = max(worst, ratio)
        print(f"{method:<14}{'mixed' if mixed else 'plain':<7}" + "".join(f"{f:>10.2f}" for f in figures)
              + f"{ratio:>9.2f}", flush=True)
    print(f"\nworst ratio {sizes[-1]}/{sizes[0]}: {worst:.2f} (goal <= 1.5); "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
