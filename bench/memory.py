"""Resident memory (VmRSS) of the balancerpool proxy: idle, with 10,000 members and 1,000 open client
connections, and after load; checked against the performance issue's targets (60 MiB idle, 150 MiB with
10,000 members and 1,000 client connections).

    python bench/memory.py [--members 10000] [--clients 1000] [--load-duration 10] [--json FILE]

Scenarios, each a fresh proxy process unless said otherwise (run from this checkout, pinned like
bench/run.py: proxy on the first CPU, backends, wrk and this script on the second):

1. `examples/demo-pool.yaml` (the embedded demo pool, 3 members), `--admin off`, idle.
2. The same with the admin listener on (the command line's default), idle.
3. bench/run.py's 2-member pool, at the end of a wrk run (50 connections), and 2 s later.
4. One pool of `--members` members, alternately pointing at the two bench backends under distinct names
   (no health checks; upstream connections open lazily), idle after one request.
5. Process 4 holding `--clients` client keep-alive connections, each with one request answered.
6. Process 4 still holding them, at the end of a wrk run (50 connections) and 2 s after it; the held
   connections then get a second request each, to show they were still real, open connections.

Round-robin over N members leaves one idle pooled upstream connection per member that took a request
(members keep idle connections unless `pool.ttl` says otherwise), so after load (6) the proxy holds
about min(N, requests) upstream sockets: the `fds` column shows it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))  # `bench` as a namespace package

from bench.run import (
    REPO_DIR,
    Pinning,
    Skip,
    backends,
    find_tool,
    free_port,
    load,
    machine_info,
    on_sigterm,
    pinning,
    proxy_has_admin_option,
    proxy_launcher,
    source_env,
    source_info,
    started,
    status_mib,
    tail,
    wait_quiet,
    wait_ready,
)

IDLE_TARGET_MIB = 60.0
MEMBERS_TARGET_MIB = 150.0
SETTLE = 2.0
RESULTS_FILE = Path(__file__).resolve().parent / "results" / "memory.json"


@dataclass
class Sample:
    """One line of the memory table."""

    scenario: str
    rss_mib: float
    hwm_mib: float
    fds: int | None
    target_mib: float | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.target_mib is None:
            return ""
        return "met" if self.rss_mib < self.target_mib else "NOT MET"


def fd_count(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        return len(os.listdir(f"/proc/{pid}/fd"))
    return None


def sample(pid: int, scenario: str, target: float | None = None, note: str = "") -> Sample:
    found = Sample(
        scenario,
        round(status_mib([pid]), 1),
        round(status_mib([pid], "VmHWM"), 1),
        fd_count(pid),
        target,
        note,
    )
    print(
        f"  {scenario}: RSS {found.rss_mib:.1f} MiB (peak {found.hwm_mib:.1f}), {found.fds} fds", flush=True
    )
    return found


def wait_listening(pid: int, port: int, log: Path, timeout: float) -> None:
    """Wait until the proxy accepts TCP connections (no request: the demo pool's members are not up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            raise Skip(f"proxy exited:\n{tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise Skip(f"proxy not listening on {port} after {timeout:.0f} s:\n{tail(log)}")


def exchange(sock: socket.socket) -> int:
    """One `GET /` on an open keep-alive socket; returns the status (body read by Content-Length)."""
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed inside the body")
        body += chunk
    return int(head.split()[1])


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` client connections to the proxy, each with one request answered, held open."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            if (status := exchange(sock)) != 200:
                raise Skip(f"a client connection got {status}")
        yield socks
    finally:
        for sock in socks:
            sock.close()


def raise_nofile(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE (inherited by the proxy and backends) up to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        print(f"warning: RLIMIT_NOFILE {soft} < {needed} wanted; the largest scenario may fail")


def members_pool(path: Path, ports: list[int], members: int) -> None:
    """One pool of `members` members over the bench backends, distinct names, no health checks."""
    lines = [
        "apiVersion: balancerpool.io/v1alpha1",
        "kind: BalancerPool",
        f"metadata: {{name: members-{members}}}",
        "spec:",
        "  routes:",
        "  - path: /",
        "  lbmethod: byrequests",
        "  maxattempts: 2",
        "  members:",
    ]
    width = len(str(members))
    lines += [
        f"  - {{url: 'http://127.0.0.1:{ports[i % len(ports)]}', name: m{i:0{width}d}}}"
        for i in range(members)
    ]
    path.write_text("\n".join(lines) + "\n")


def bench_pool(path: Path, ports: list[int]) -> None:
    """bench/run.py's pool: byrequests over the two backends."""
    members = "".join(f"  - url: http://127.0.0.1:{p}\n    route: b{i}\n" for i, p in enumerate(ports, 1))
    path.write_text(
        "apiVersion: balancerpool.io/v1alpha1\nkind: BalancerPool\nmetadata: {name: bench}\nspec:\n"
        f"  routes:\n  - path: /\n  lbmethod: byrequests\n  members:\n{members}"
    )


class Proxy:
    """Starts balancerpool processes from this checkout, pinned to the proxy core."""

    def __init__(self, tmp: Path, pin: Pinning) -> None:
        self.tmp, self.pin = tmp, pin
        self.env = source_env(tmp)
        self.launcher = proxy_launcher(self.env)
        self.admin_option = proxy_has_admin_option(self.launcher, self.env)
        self.runs = 0

    @contextlib.contextmanager
    def run(self, pool: Path, port: int, admin: bool = False
            ) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
        self.runs += 1
        argv = [sys.executable, *self.launcher, "proxy", str(pool), "--listen", f"127.0.0.1:{port}"]
        if self.admin_option:
            argv += ["--admin", f"127.0.0.1:{free_port()}" if admin else "off"]
        elif not admin:
            print("warning: this proxy has no --admin option")
        log = self.tmp / f"proxy-{self.runs}.log"
        with started([*self.pin.proxy, *argv], log, self.env) as proc:
            yield proc, log


def measure(args: argparse.Namespace) -> tuple[list[Sample], dict[str, object]]:
    pin = pinning(not args.no_pin)
    print(pin.note)
    raise_nofile(args.members + args.clients + 1024)
    samples: list[Sample] = []
    extra: dict[str, object] = {"pinning": pin.note}
    with (
        tempfile.TemporaryDirectory(prefix="balancerpool-memory-") as tmp_name,
        backends(Path(tmp_name), pin, worker_connections=args.members + 2048) as (ports, kind),
    ):
        tmp = Path(tmp_name)
        extra["backend"] = kind
        proxy = Proxy(tmp, pin)
        demo = REPO_DIR / "examples" / "demo-pool.yaml"

        for admin in (False, True):
            what = "admin listener on" if admin else "--admin off"
            print(f"demo pool, {what} ...", flush=True)
            port = free_port()
            with proxy.run(demo, port, admin) as (proc, log):
                pid = proc.pid
                wait_listening(pid, port, log, 30)
                time.sleep(SETTLE)
                samples.append(sample(pid, f"idle, demo pool (3 members), {what}", IDLE_TARGET_MIB))

        print("bench pool (2 members) under load ...", flush=True)
        pool = tmp / "bench-pool.yaml"
        bench_pool(pool, ports)
        port = free_port()
        with proxy.run(pool, port) as (proc, log):
            pid = proc.pid
            wait_ready(proc, port, log, "balancerpool", 30)
            samples.append(sample(pid, "idle, 2-member bench pool, after 1 request"))
            wait_quiet(pin.cpus, 60)
            row = load(port, args.load_duration, 50, pin, [pid])
            samples.append(
                Sample(
                    f"2-member bench pool, end of {args.load_duration} s wrk at 50 connections",
                    row.rss_mib or 0.0,
                    round(status_mib([pid], "VmHWM"), 1),
                    None,
                    note=f"{row.rps:.0f} req/s",
                )
            )
            time.sleep(SETTLE)
            samples.append(sample(pid, f"2-member bench pool, {SETTLE:.0f} s after the load"))

        print(f"{args.members} members ...", flush=True)
        pool = tmp / "members.yaml"
        members_pool(pool, ports, args.members)
        port = free_port()
        began = time.monotonic()
        with proxy.run(pool, port) as (proc, log):
            pid = proc.pid
            wait_ready(proc, port, log, "balancerpool", 120)
            extra["members_start_s"] = round(time.monotonic() - began, 2)
            time.sleep(SETTLE)
            samples.append(sample(pid, f"idle, {args.members} members, after 1 request"))
            began = time.monotonic()
            with clients(port, args.clients) as socks:
                extra["clients_open_s"] = round(time.monotonic() - began, 2)
                time.sleep(SETTLE)
                samples.append(
                    sample(
                        pid,
                        f"{args.members} members + {args.clients} open client connections",
                        MEMBERS_TARGET_MIB,
                        "one request answered on each",
                    )
                )
                wait_quiet(pin.cpus, 60)
                row = load(port, args.load_duration, 50, pin, [pid])
                errors = row.non_2xx_3xx + sum(row.socket_errors.values())
                samples.append(
                    Sample(
                        f"same, end of {args.load_duration} s wrk at 50 more connections",
                        row.rss_mib or 0.0,
                        round(status_mib([pid], "VmHWM"), 1),
                        fd_count(pid),
                        MEMBERS_TARGET_MIB,
                        f"{row.rps:.0f} req/s, {errors} errors",
                    )
                )
                time.sleep(SETTLE)
                after = sample(pid, f"same, {SETTLE:.0f} s after the load", MEMBERS_TARGET_MIB)
                samples.append(after)
                answered = 0
                for sock in socks:
                    with contextlib.suppress(OSError, ValueError, IndexError):
                        answered += exchange(sock) == 200
                after.note = f"{answered}/{len(socks)} held connections answered a 2nd request"
                print(f"  {after.note}")
    return samples, extra


def report(samples: list[Sample]) -> None:
    width = max(len(found.scenario) for found in samples)
    print(f"\n{'scenario':<{width}}  {'RSS MiB':>8}  {'peak':>7}  {'fds':>6}  {'target':>7}  verdict")
    for found in samples:
        target = f"< {found.target_mib:.0f}" if found.target_mib else "-"
        fds = "-" if found.fds is None else str(found.fds)
        print(
            f"{found.scenario:<{width}}  {found.rss_mib:>8.1f}  {found.hwm_mib:>7.1f}  {fds:>6}  "
            f"{target:>7}  {found.verdict}{'  (' + found.note + ')' if found.note else ''}"
        )
    print("(RSS: VmRSS of the proxy process; peak: its VmHWM so far; fds: its open file descriptors)")


def markdown(samples: list[Sample]) -> str:
    lines = [
        "| scenario | RSS MiB | peak MiB | fds | target | verdict | note |",
        "|---|--:|--:|--:|--:|---|---|",
    ]
    for found in samples:
        target = f"< {found.target_mib:.0f}" if found.target_mib else ""
        lines.append(
            f"| {found.scenario} | {found.rss_mib:.1f} | {found.hwm_mib:.1f} | "
            f"{'' if found.fds is None else found.fds} | {target} | {found.verdict} | {found.note} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=10_000, help="members of the large pool")
    parser.add_argument("--clients", type=int, default=1_000, help="client connections held open")
    parser.add_argument("--load-duration", type=int, default=10, help="seconds of wrk load")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here as well")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    if find_tool("wrk") is None:
        print("wrk not found: the load scenarios use bench/loadgen.py (slower)")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        samples, extra = measure(args)
    except KeyboardInterrupt:
        print("\ninterrupted; all started processes were stopped", file=sys.stderr)
        return 130
    except Skip as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 1
    report(samples)
    if args.markdown:
        print(f"\n{markdown(samples)}\n")
    text = json.dumps(
        {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(["python", "bench/memory.py", *sys.argv[1:]]),
            "machine": machine_info(),
            "source": source_info(),
            "params": {"members": args.members, "clients": args.clients, **extra},
            "samples": [{**asdict(found), "verdict": found.verdict} for found in samples],
        },
        indent=2,
    )
    for path in dict.fromkeys([RESULTS_FILE, *filter(None, [args.json])]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
