"""A/B two revisions of balancerpool end to end: alternating timed runs against the same backends.

    python bench/ab.py HEAD~1 HEAD                    # compiled builds (mypyc), 4 rounds of 5 s
    python bench/ab.py HEAD~1 . --build interpreted   # '.': this checkout, uncommitted changes too
    python bench/ab.py HEAD~1 HEAD --haproxy --rounds 6

Each revision is checked out with `git worktree` into scratch space and built (a mypyc wheel, as
run.py's balancerpool-mypyc row) or imported from source. Every round starts each proxy afresh and
measures it once, A then B (then HAProxy with --haproxy), so that a drift of a shared machine hits
all alike; the medians and B/A come last. For deciding whether a change to proxy/ pays for itself:
the published figures come from run.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `bench` as a namespace package

from bench import run  # backends, pinning, the proxies and the load generator


def checkout(rev: str, tmp: Path) -> Path:
    """The source tree of `rev` ('.' is this checkout as it is)."""
    if rev == ".":
        return run.REPO_DIR
    path = tmp / f"src-{len(list(tmp.glob('src-*')))}"
    subprocess.run(["git", "-C", str(run.REPO_DIR), "worktree", "add", "-q", "--detach", str(path), rev],
                   check=True)
    return path


def environment(source: Path, build: str, tmp: Path, name: str) -> dict[str, str]:
    """A PYTHONPATH entry that imports `source` (compiled first, for --build mypyc)."""
    root = tmp / f"path-{name}"
    if build == "mypyc":
        wheels = tmp / f"wheel-{name}"
        env = {**os.environ, "BALANCERPOOL_MYPYC": "1"}
        print(f"  building {name} with mypyc (about a minute) ...", flush=True)

        def pip(*argv: str) -> None:
            subprocess.run([sys.executable, "-m", "pip", "-q", *argv], check=True, cwd=source, env=env)

        pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(source))
        pip("install", "--no-deps", "--target", str(root), *map(str, wheels.glob("balancerpool-*.whl")))
    else:
        namespace = root / "balancerpool"
        namespace.mkdir(parents=True)
        for package in run.SOURCE_PACKAGES:
            if (source / package / "__init__.py").exists():
                (namespace / package).symlink_to(source / package, target_is_directory=True)
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("a", help="git revision (or '.': this checkout as it is)")
    parser.add_argument("b", help="git revision (or '.')")
    parser.add_argument("--build", choices=["mypyc", "interpreted"], default="mypyc")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per timed run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--haproxy", action="store_true", help="measure HAProxy in every round too")
    args = parser.parse_args()
    pin = run.pinning(True)
    print(pin.note)
    results: dict[str, list[run.Row]] = {}
    with tempfile.TemporaryDirectory(prefix="balancerpool-ab-") as scratch:
        tmp = Path(scratch)
        sources = {f"A {args.a}": checkout(args.a, tmp), f"B {args.b}": checkout(args.b, tmp)}
        try:
            envs = {name: environment(src, args.build, tmp, name[0]) for name, src in sources.items()}
            with run.backends(tmp, pin) as (ports, kind):
                print(f"backends: {kind} on ports {ports}; {args.rounds} rounds of {args.duration:g} s "
                      f"at {args.connections} connections", flush=True)
                ctx = run.Ctx(tmp, pin, ports, quiet_wait=60.0, retries=1)
                targets: list[tuple[str, run.Target]] = [
                    (name, functools.partial(run.balancerpool, env=env)) for name, env in envs.items()]
                if args.haproxy:
                    targets.append(("haproxy", run.haproxy))
                for round_ in range(args.rounds):
                    for name, target in targets:
                        with target(ctx) as (proc, port):
                            assert proc is not None
                            row = run.measure(ctx, port, args.duration, 1.0, args.connections,
                                              run.tree(proc.pid))
                        results.setdefault(name, []).append(row)
                        print(f"round {round_ + 1}  {name:<24} {run.summary(row)}", flush=True)
        finally:
            for src in sources.values():
                if src != run.REPO_DIR:
                    subprocess.run(["git", "-C", str(run.REPO_DIR), "worktree", "remove", "--force",
                                    str(src)], check=False)
    print()
    medians: dict[str, float] = {}
    for name, rows in results.items():
        rps = [r.rps for r in rows if r.rps]
        medians[name] = statistics.median(rps)
        p99 = statistics.median(r.p99_ms for r in rows if r.p99_ms)
        cpu = statistics.median(r.cpu_us_per_req for r in rows if r.cpu_us_per_req)
        print(f"{name:<24} median {medians[name]:>9,.0f} req/s  p99 {p99:.3f} ms  CPU {cpu:.1f} µs/req"
              f"  (runs {min(rps):,.0f}-{max(rps):,.0f})")
    name_a, name_b = sources
    a, b = medians[name_a], medians[name_b]
    print(f"B/A req/s: {b / a:.3f} (of the medians); {paired(results, name_b, name_a)}")
    if "haproxy" in medians:
        print(f"vs HAProxy: A {a / medians['haproxy']:.3f}, B {b / medians['haproxy']:.3f} (of the medians)")
        for name in sources:
            print(f"  {name:<22} {paired(results, name, 'haproxy')}")
    return 0


def paired(results: dict[str, list[run.Row]], one: str, other: str) -> str:
    """The ratio of req/s within each round, where both met the same state of the machine: on a
    virtual machine whose speed drifts between rounds (HAProxy's req/s here moves by a quarter),
    its median is steadier than the ratio of two medians taken from different rounds."""
    ratios = sorted(x.rps / y.rps for x, y in zip(results[one], results[other], strict=True)
                    if x.rps and y.rps)
    if not ratios:
        return "no paired rounds"
    return (f"per round: median {statistics.median(ratios):.3f}, {ratios[0]:.3f}-{ratios[-1]:.3f} "
            f"over {len(ratios)} rounds")


if __name__ == "__main__":
    sys.exit(main())
