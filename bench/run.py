"""Benchmark balancerpool against HAProxy and nginx, all fronting the same local backends.

    python bench/run.py [--duration 10] [--connections 50] [--quick]

Every proxy runs alone on one core (`taskset`), the load generator and backends on another, so req/s
compares single-core proxy efficiency. Results go to stdout and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0


class Skip(Exception):
    """A row that cannot be measured on this machine; the message says why."""


@dataclass
class Pinning:
    """`taskset` prefixes keeping the proxy and the load (generator + backends) on separate cores."""

    proxy: list[str]
    load: list[str]
    note: str


@dataclass
class Row:
    """One line of the result table."""

    name: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    requests: int | None = None
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    skipped: str | None = None


@dataclass
class Ctx:
    """What every target needs: scratch space, pinning and the backend ports."""

    tmp: Path
    pin: Pinning
    backends: list[int]
    #: balancerpool's `--frontend` (fast or aiohttp); None: the proxy's default, no option passed.
    frontend: str | None = None


# --------------------------------------------------------------------------------------------- processes


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, or None; the start time guards against PID reuse."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of `root` (nginx/haproxy workers, proxy workers)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: list[tuple[int, int]] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def rss_mib(root: int) -> float:
    """Resident memory of a process tree: master plus workers."""
    total_kib = 0
    for pid in [root, *(pid for pid, _ in descendants(root))]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop a process we started, by PID: SIGTERM, SIGKILL after a timeout, then any leftover children."""
    if proc.poll() is not None:
        return
    leftovers = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)
    deadline = time.monotonic() + STOP_TIMEOUT
    for pid, started in leftovers:
        while (stat := proc_stat(pid)) is not None and stat[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if time.monotonic() < deadline else signal.SIGKILL)
            time.sleep(0.05)


@contextlib.contextmanager
def started(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in its own session (so a terminal Ctrl-C reaches only us), output to `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def find_tool(name: str) -> str | None:
    """A tool on PATH, or in /usr/sbin (Debian's nginx/haproxy, often not on a user's PATH)."""
    sbin = Path("/usr/sbin") / name
    return shutil.which(name) or (str(sbin) if os.access(sbin, os.X_OK) else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    """Poll `GET /` until it answers 200; raise Skip with the process output if it never does."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Skip(f"{what} exited with code {proc.returncode}:\n{tail(log)}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.1)
    raise Skip(f"{what} not ready on port {port} after {READY_TIMEOUT:.0f} s:\n{tail(log)}")


def sample_bodies(port: int, count: int = 4) -> set[bytes]:
    """Bodies of a few sequential requests: proves the proxy really forwards, and to both backends."""
    bodies: set[bytes] = set()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        for _ in range(count):
            conn.request("GET", "/")
            bodies.add(conn.getresponse().read())
    except (OSError, http.client.HTTPException) as exc:
        raise Skip(f"GET / on port {port} failed: {exc!r}") from exc
    finally:
        conn.close()
    if not all(body.startswith(b"hello from ") for body in bodies):
        raise Skip(f"unexpected response bodies {sorted(bodies)!r}")
    return bodies


# ------------------------------------------------------------------------------------------ servers


def nginx_config(tmp: Path, http_block: str) -> Path:
    """Self-contained nginx config: foreground, one worker, all files inside `tmp`."""
    tmp.mkdir()
    tmp.chmod(0o755)  # workers drop to an unprivileged user when started as root
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{http_block}
}}
""")
    return conf


def nginx_argv(nginx: str, tmp: Path, conf: Path) -> list[str]:
    return [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]


@contextlib.contextmanager
def backends(tmp: Path, pin: Pinning, count: int = 2) -> Iterator[tuple[list[int], str]]:
    """Start `count` fast fixed-body backends (nginx, else bench/backend.py) on the load core."""
    ports = [free_port() for _ in range(count)]
    nginx = find_tool("nginx")
    attempts: list[tuple[str, list[str], Path]] = []
    if nginx is not None:
        servers = "".join(
            f"    server {{ listen 127.0.0.1:{port}; default_type text/plain; "
            f'location / {{ return 200 "hello from {i}\\n"; }} }}\n'
            for i, port in enumerate(ports, start=1)
        )
        conf = nginx_config(tmp / "backend-nginx", servers)
        attempts.append(("nginx", nginx_argv(nginx, conf.parent, conf), conf.parent / "out.log"))
    python_argv = [sys.executable, str(BENCH_DIR / "backend.py"), *map(str, ports)]
    attempts.append(("python (uvloop+httptools)", python_argv, tmp / "backend-python.log"))
    for kind, argv, log in attempts:
        with started([*pin.load, *argv], log) as proc:
            try:
                for port in ports:
                    wait_ready(proc, port, log, f"{kind} backend")
            except Skip as exc:
                print(f"backend: {exc}; trying the next kind", file=sys.stderr)
                continue
            yield ports, kind
            return
    raise SystemExit("no backend could be started")


Target = Callable[[Ctx], contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes] | None, int]]]


@contextlib.contextmanager
def direct(ctx: Ctx) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    """Reference row: the load generator straight against backend 1, no proxy."""
    yield None, ctx.backends[0]


@contextlib.contextmanager
def balancerpool(ctx: Ctx) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    probe = (
        "import importlib.util, balancerpool.proxy.cli; "
        "print(importlib.util.find_spec('balancerpool.proxy.__main__') is not None)"
    )
    check = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_DIR, capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise Skip(
            "`import balancerpool.proxy.cli` fails: " + (check.stderr.strip().splitlines() or ["?"])[-1]
        )
    # `python -m balancerpool.proxy`; without a __main__ module, exactly what the console script runs.
    launcher = (
        ["-m", "balancerpool.proxy"]
        if check.stdout.strip() == "True"
        else ["-c", "import sys; from balancerpool.proxy.cli import main; sys.exit(main())"]
    )
    port = free_port()
    members = "".join(
        f"  - url: http://127.0.0.1:{backend}\n    route: b{i}\n"
        for i, backend in enumerate(ctx.backends, start=1)
    )
    pool = ctx.tmp / "balancerpool.yaml"
    pool.write_text(
        "apiVersion: balancerpool.io/v1alpha1\nkind: BalancerPool\nmetadata: {name: bench}\nspec:\n"
        f"  listen: 127.0.0.1:{port}\n  routes:\n  - path: /\n  lbmethod: byrequests\n  members:\n{members}"
    )
    argv = [sys.executable, *launcher, "proxy", str(pool), "--listen", f"127.0.0.1:{port}"]
    if ctx.frontend is not None:
        argv += ["--frontend", ctx.frontend]
    usage = subprocess.run(
        [sys.executable, *launcher, "proxy", "--help"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    if "--admin" in usage:
        argv += ["--admin", "off"]  # no admin listener: a fixed port, and not what is measured
    log = ctx.tmp / "balancerpool.log"
    with started([*ctx.pin.proxy, *argv], log) as proc:
        wait_ready(proc, port, log, "balancerpool")
        yield proc, port


@contextlib.contextmanager
def haproxy(ctx: Ctx) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    exe = find_tool("haproxy")
    if exe is None:
        raise Skip("haproxy not installed")
    port = free_port()
    servers = "".join(f"    server b{i} 127.0.0.1:{p}\n" for i, p in enumerate(ctx.backends, start=1))
    # HAProxy refuses to start if it cannot get ~2 fds per maxconn; stay under the hard limit.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    maxconn = 10_000 if hard == resource.RLIM_INFINITY else max(256, min(10_000, (hard - 200) // 2))
    cfg = ctx.tmp / "haproxy.cfg"
    cfg.write_text(f"""global
    nbthread 1
    maxconn {maxconn}
defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
{servers}""")
    log = ctx.tmp / "haproxy.log"
    with started([*ctx.pin.proxy, exe, "-db", "-f", str(cfg)], log) as proc:
        wait_ready(proc, port, log, "haproxy")
        yield proc, port


@contextlib.contextmanager
def nginx_proxy(ctx: Ctx) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    exe = find_tool("nginx")
    if exe is None:
        raise Skip("nginx not installed")
    port = free_port()
    upstreams = "".join(f"        server 127.0.0.1:{p};\n" for p in ctx.backends)
    conf = nginx_config(
        ctx.tmp / "proxy-nginx",
        f"""    upstream backends {{
{upstreams}        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}""",
    )
    log = conf.parent / "out.log"
    with started([*ctx.pin.proxy, *nginx_argv(exe, conf.parent, conf)], log) as proc:
        wait_ready(proc, port, log, "nginx")
        yield proc, port


TARGETS: dict[str, Target] = {
    "direct": direct,
    "balancerpool": balancerpool,
    "haproxy": haproxy,
    "nginx": nginx_proxy,
}

# --------------------------------------------------------------------------------------------- load

SOCKET_ERRORS = ("connect", "read", "write", "timeout")
UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def wrk_ms(text: str, percent: int) -> float:
    match = re.search(rf"^\s*{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"no {percent}% latency in wrk output")
    return float(match[1]) * UNIT_MS[match[2]]


def parse_wrk(text: str) -> Row:
    """Figures from `wrk --latency` output (req/s, p50/p99, errors)."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.MULTILINE)
    requests = re.search(r"^\s*(\d+) requests in", text, re.MULTILINE)
    if rps is None or requests is None:
        raise ValueError(f"unexpected wrk output:\n{text}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return Row(
        name="",
        rps=float(rps[1]),
        p50_ms=wrk_ms(text, 50),
        p99_ms=wrk_ms(text, 99),
        requests=int(requests[1]),
        non_2xx_3xx=int(non_ok[1]) if non_ok else 0,
        socket_errors=dict(
            zip(SOCKET_ERRORS, map(int, errors.groups() if errors else (0,) * 4), strict=True)
        ),
    )


def load(port: int, duration: float, connections: int, pin: Pinning) -> Row:
    """One load run: wrk when installed, else bench/loadgen.py; both pinned to the load core."""
    url = f"http://127.0.0.1:{port}/"
    wrk = find_tool("wrk")
    if wrk is not None:
        argv = [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url]
    else:
        argv = [
            sys.executable,
            str(BENCH_DIR / "loadgen.py"),
            url,
            "--duration",
            str(duration),
            "--connections",
            str(connections),
        ]
    try:
        out = subprocess.run(
            [*pin.load, *argv], capture_output=True, text=True, timeout=duration + 60, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise Skip(f"load generator still running {exc.timeout:.0f} s later; killed") from exc
    if out.returncode != 0:
        raise Skip(f"load generator failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    try:
        if wrk is not None:
            return parse_wrk(out.stdout)
        data = json.loads(out.stdout)
        return Row(
            name="",
            rps=data["rps"],
            p50_ms=data["p50_ms"],
            p99_ms=data["p99_ms"],
            requests=data["requests"],
            non_2xx_3xx=data["non_2xx_3xx"],
            socket_errors=data["socket_errors"],
        )
    except (ValueError, KeyError) as exc:
        raise Skip(f"cannot parse load generator output: {exc}") from exc


def bench_target(
    name: str, target: Target, ctx: Ctx, duration: float, warmup: float, connections: int
) -> Row:
    """Start one proxy, warm it up, measure it, read its RSS, stop it."""
    try:
        with target(ctx) as (proc, port):
            if proc is not None and len(sample_bodies(port)) < len(ctx.backends):
                print(f"  warning: {name} did not spread 4 requests over all {len(ctx.backends)} backends")
            load(port, warmup, connections, ctx.pin)
            row = load(port, duration, connections, ctx.pin)
            if proc is not None:
                row.rss_mib = round(rss_mib(proc.pid), 2)
            row.name = name
            return row
    except Skip as exc:
        return Row(name=name, skipped=str(exc))


# ------------------------------------------------------------------------------------------ report


def version(name: str, flag: str) -> str | None:
    """First line a tool prints about its version (nginx uses stderr, wrk exits non-zero)."""
    exe = find_tool(name)
    if exe is None:
        return None
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run([exe, flag], capture_output=True, text=True, timeout=10)
        return ((out.stdout + out.stderr).strip().splitlines() or [""])[0].strip()
    return None


def machine_info() -> dict[str, object]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "haproxy": version("haproxy", "-v"),
        "nginx": version("nginx", "-v"),
        "wrk": version("wrk", "--version"),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def fmt(value: float | None, spec: str) -> str:
    """Format a figure; a missing one is a right-aligned dash of the same width."""
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def report(rows: list[Row]) -> dict[str, float | None]:
    """Print the table and ratios; return the ratios for the JSON file."""
    print(f"\n{'name':<14}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'RSS MiB':>10}")
    for row in rows:
        if row.skipped:
            print(f"{row.name:<14}  skipped: {row.skipped.splitlines()[0]}")
            continue
        print(
            f"{row.name:<14}{fmt(row.rps, '12.0f')}{fmt(row.p50_ms, '10.3f')}{fmt(row.p99_ms, '10.3f')}"
            f"{fmt(row.rss_mib, '10.1f')}"
        )
        if row.non_2xx_3xx or any(row.socket_errors.values()):
            print(f"{'':<14}  !! non-2xx/3xx: {row.non_2xx_3xx}, socket errors: {row.socket_errors}")
    by_name = {row.name: row for row in rows if not row.skipped}
    ours = by_name.get("balancerpool")
    ratios: dict[str, float | None] = {}
    for other in ("haproxy", "nginx"):
        theirs = by_name.get(other)
        ratios[f"rps_balancerpool/{other}"] = ratio(ours.rps, theirs.rps) if ours and theirs else None
        ratios[f"p99_balancerpool/{other}"] = ratio(ours.p99_ms, theirs.p99_ms) if ours and theirs else None
    print()
    for key, value in ratios.items():
        print(f"{key:<28}{fmt(value, '.2f')}")
    print("(req/s ratio: higher is better, 1.0 = parity; p99 ratio: lower is better)")
    return ratios


def pinning(enabled: bool) -> Pinning:
    taskset = shutil.which("taskset")
    cores = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning([], [], "pinning disabled (--no-pin)")
    if taskset is None:
        return Pinning([], [], "taskset not found: no CPU pinning")
    if len(cores) < 2:
        return Pinning([], [], "fewer than 2 usable CPUs: no pinning")
    return Pinning(
        [taskset, "-c", str(cores[0])],
        [taskset, "-c", str(cores[1])],
        f"proxy on CPU {cores[0]}; load generator and backends on CPU {cores[1]}",
    )


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt so every `finally` stops its processes."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run (default 10)")
    parser.add_argument("--connections", type=int, default=50, help="concurrent keep-alive connections")
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up (smoke test)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list from {','.join(TARGETS)}")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--frontend",
        choices=["fast", "aiohttp"],
        help="balancerpool's HTTP front end (default: the proxy's own default)",
    )
    args = parser.parse_args()
    names = [name.strip() for name in args.targets.split(",") if name.strip()]
    if unknown := [name for name in names if name not in TARGETS]:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    duration, warmup = (3, 1) if args.quick else (args.duration, 2)
    signal.signal(signal.SIGTERM, on_sigterm)

    pin = pinning(not args.no_pin)
    tool = "wrk" if find_tool("wrk") else "bench/loadgen.py (wrk not found)"
    print(f"{pin.note}\nload: {tool}, {args.connections} connections, {duration} s (+{warmup} s warm-up)")
    rows: list[Row] = []
    try:
        with (
            tempfile.TemporaryDirectory(prefix="balancerpool-bench-") as tmp_name,
            backends(Path(tmp_name), pin) as (ports, kind),
        ):
            print(f"backends: {kind} on ports {ports}")
            ctx = Ctx(Path(tmp_name), pin, ports, args.frontend)
            for name in names:
                print(f"running {name} ...", flush=True)
                rows.append(bench_target(name, TARGETS[name], ctx, duration, warmup, args.connections))
                if rows[-1].skipped:
                    print(f"  skipped: {rows[-1].skipped}")
            backend_kind = kind
    except KeyboardInterrupt:
        print("\ninterrupted; all started processes were stopped", file=sys.stderr)
        return 130
    ratios = report(rows)
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(
        json.dumps(
            {
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(),
                "params": {
                    "duration_s": duration,
                    "warmup_s": warmup,
                    "connections": args.connections,
                    "load_generator": tool,
                    "backend": backend_kind,
                    "pinning": pin.note,
                    "balancerpool_frontend": args.frontend or "default",
                },
                "results": [asdict(row) for row in rows],
                "ratios": ratios,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
