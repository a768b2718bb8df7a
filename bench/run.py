"""Benchmark balancerpool against HAProxy and nginx, all fronting the same local backends.

    python bench/run.py [--duration 10] [--connections 50] [--quick]
    python bench/run.py --sweep 1,10,50,100,200,400 --duration 5 --json bench/results/sweep.json

Every proxy runs alone on one core (`taskset`), the load generator and backends on another, so req/s
compares single-core proxy efficiency. balancerpool runs from the checkout this file lives in, whatever
the installed package points at. Results go to stdout and bench/results/latest.json (sweep.json with
--sweep), or to --json.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
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
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_FILE = BENCH_DIR / "results" / "latest.json"
SWEEP_FILE = BENCH_DIR / "results" / "sweep.json"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
#: How often the proxy's RSS is sampled while a timed run goes on.
RSS_SAMPLE_INTERVAL = 0.25
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The packages of the `balancerpool` namespace, as `package-dir` maps them (pyproject.toml).
SOURCE_PACKAGES = ("proxy", "examples", "operator")
#: The performance issue's goals, checked after every run: (ratio, comparison, bound).
GOALS = (
    ("rps/haproxy", ">=", 0.8),
    ("rps/nginx", ">", 1.0),
    ("p99/haproxy", "<=", 2.0),
)
#: The p99 goal is stated at this many connections.
P99_GOAL_CONNECTIONS = 50


class Skip(Exception):
    """A row that cannot be measured on this machine; the message says why."""


@dataclass
class Pinning:
    """`taskset` prefixes keeping the proxy and the load (generator + backends) on separate cores."""

    proxy: list[str]
    load: list[str]
    note: str
    #: The proxy's CPU number when pinned: its /proc/stat line shows whether anything else ran there.
    proxy_cpu: int | None = None
    #: Both pinned CPUs (proxy, load), for `wait_quiet`.
    cpus: list[int] = field(default_factory=list)


@dataclass
class Row:
    """One line of the result table."""

    name: str
    connections: int | None = None
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: VmRSS of the proxy's process tree, last sample before the load generator ended (connections open).
    rss_mib: float | None = None
    #: Highest VmRSS sample during the timed run.
    rss_peak_mib: float | None = None
    #: CPU time (user + system) of the proxy's process tree during the timed run, per request.
    cpu_us_per_req: float | None = None
    #: Share of that CPU time spent in the kernel (system time / total).
    cpu_sys_share: float | None = None
    #: CPU time over wall time of the timed run: 1.0 is one core fully busy.
    cpu_busy: float | None = None
    #: CPU time of everybody else's processes during the timed run, in cores (0.3: 30% of one core):
    #: someone's tests or builds on a shared machine, taking CPU from the proxy or the load side.
    others_busy: float | None = None
    #: Share of the proxy's core stolen by the hypervisor during the timed run. Only when pinned.
    core_steal: float | None = None
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
    #: Environment of the balancerpool process: imports this checkout (see `source_env`).
    env: dict[str, str] | None = None
    #: Longest wait for a quiet machine before each timed run (see `wait_quiet`).
    quiet_wait: float = 0.0
    #: How many times a disturbed timed run is measured again (see `measure`).
    retries: int = 0
    #: Profilers for one extra run of each proxy after its timed run (see `profile_run`).
    profile: list[str] = field(default_factory=list)
    #: Their summaries: target -> tool -> text.
    profiles: dict[str, dict[str, str]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- processes


def proc_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (so index 0 is field 3, `state`), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()


def proc_stat(pid: int) -> tuple[int, int] | None:
    """(ppid, start time) of a live process, or None; the start time guards against PID reuse."""
    fields = proc_fields(pid)
    return None if fields is None else (int(fields[1]), int(fields[19]))


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds used so far by these processes (utime and stime of /proc/PID/stat)."""
    user = system = 0
    for pid in pids:
        if (fields := proc_fields(pid)) is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLOCK_TICKS, system / CLOCK_TICKS


def core_ticks(cpu: int) -> tuple[int, int] | None:
    """(busy, steal) clock ticks of one CPU so far, from /proc/stat. Busy is user + nice + system + irq +
    softirq: a task's stime includes the softirq work done while it ran, /proc/stat files it apart."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
                return user + nice + system + irq + softirq, steal
    return None


def wait_quiet(cpus: list[int], max_wait: float, threshold: float = 0.10) -> None:
    """Before a timed run (our own processes idle): wait up to `max_wait` s until no CPU in `cpus` is
    more than `threshold` busy with other work (someone else's tests or builds on a shared machine)."""
    if not cpus:
        return
    deadline = time.monotonic() + max_wait
    told = False
    while True:
        before = {cpu: core_ticks(cpu) for cpu in cpus}
        time.sleep(0.5)
        busy = {}
        for cpu in cpus:
            first, last = before[cpu], core_ticks(cpu)
            if first is not None and last is not None:
                busy[cpu] = (last[0] - first[0] + last[1] - first[1]) / CLOCK_TICKS / 0.5
        noisy = {cpu: share for cpu, share in busy.items() if share > threshold}
        if not noisy:
            if told:
                print("  quiet again", flush=True)
            return
        shares = ", ".join(f"CPU {cpu} {100 * share:.0f}%" for cpu, share in noisy.items())
        if time.monotonic() >= deadline:
            print(f"  !! other processes keep the machine busy ({shares}); measuring anyway", flush=True)
            return
        if not told:
            print(f"  waiting up to {max_wait:.0f} s for a quiet machine ({shares} busy) ...", flush=True)
            told = True


def tree(root: int) -> list[int]:
    """A process and its live descendants (nginx master + worker, proxy workers)."""
    return [root, *(pid for pid, _ in descendants(root))]


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


def status_mib(pids: list[int], key: str = "VmRSS") -> float:
    """Sum of one /proc/PID/status figure (VmRSS, VmHWM, ...) over processes, in MiB."""
    total_kib = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{key}:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def rss_mib(root: int) -> float:
    """Resident memory of a process tree: master plus workers."""
    return status_mib(tree(root))


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
def started(
    argv: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `argv` in its own session (so a terminal Ctrl-C reaches only us), output to `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO_DIR,
            env=env,
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


def wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path, what: str,
               timeout: float = READY_TIMEOUT) -> None:
    """Poll `GET /` until it answers 200; raise Skip with the process output if it never does."""
    deadline = time.monotonic() + timeout
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
    raise Skip(f"{what} not ready on port {port} after {timeout:.0f} s:\n{tail(log)}")


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


def nginx_config(tmp: Path, http_block: str, worker_connections: int = 4096) -> Path:
    """Self-contained nginx config: foreground, one worker, all files inside `tmp`."""
    tmp.mkdir()
    tmp.chmod(0o755)  # workers drop to an unprivileged user when started as root
    conf = tmp / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections {worker_connections}; }}
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
def backends(
    tmp: Path, pin: Pinning, count: int = 2, worker_connections: int = 4096
) -> Iterator[tuple[list[int], str]]:
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
        conf = nginx_config(tmp / "backend-nginx", servers, worker_connections)
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


def source_env(tmp: Path) -> dict[str, str]:
    """An environment in which `balancerpool.*` imports this checkout's proxy/, examples/, operator/.

    The editable install maps them to wherever `pip install -e` last ran (another worktree, a CI copy,
    a directory that no longer exists). A PYTHONPATH entry holding `balancerpool/<package>` symlinks to
    REPO_DIR comes before site-packages, so the benchmark always measures the code next to it.
    """
    root = tmp / "pythonpath"
    namespace = root / "balancerpool"
    namespace.mkdir(parents=True, exist_ok=True)
    for package in SOURCE_PACKAGES:
        link = namespace / package
        if (REPO_DIR / package / "__init__.py").exists() and not link.exists():
            link.symlink_to(REPO_DIR / package, target_is_directory=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def proxy_launcher(env: dict[str, str] | None) -> list[str]:
    """`python -m balancerpool.proxy` (or the console script's code), after checking it imports."""
    probe = (
        "import importlib.util, balancerpool.proxy.cli as cli; "
        "print(importlib.util.find_spec('balancerpool.proxy.__main__') is not None)"
    )
    check = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        raise Skip(
            "`import balancerpool.proxy.cli` fails: " + (check.stderr.strip().splitlines() or ["?"])[-1]
        )
    # `python -m balancerpool.proxy`; without a __main__ module, exactly what the console script runs.
    return (
        ["-m", "balancerpool.proxy"]
        if check.stdout.strip() == "True"
        else ["-c", "import sys; from balancerpool.proxy.cli import main; sys.exit(main())"]
    )


def proxy_has_admin_option(launcher: list[str], env: dict[str, str] | None) -> bool:
    usage = subprocess.run(
        [sys.executable, *launcher, "proxy", "--help"],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    return "--admin" in usage


def mypyc_env(ctx: Ctx) -> dict[str, str]:
    """An environment importing this checkout built with mypyc (setup.py, BALANCERPOOL_MYPYC=1).

    Built once per bench run into scratch space: a wheel, unpacked to a PYTHONPATH directory that
    comes before the editable install. Skip when mypyc or a C compiler is missing.
    """
    root = ctx.tmp / "mypyc"
    if not (root / "balancerpool").is_dir():
        log = ctx.tmp / "mypyc-build.log"
        wheels = ctx.tmp / "wheel"
        build_env = {**os.environ, "BALANCERPOOL_MYPYC": "1"}
        print("  building with mypyc (about a minute) ...", flush=True)
        with log.open("wb") as out:

            def pip(*argv: str) -> None:
                done = subprocess.run(
                    [sys.executable, "-m", "pip", "-q", *argv],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=REPO_DIR,
                    env=build_env,
                )
                if done.returncode != 0:
                    raise Skip(f"the mypyc build failed (needs mypy, wheel and a C compiler):\n{tail(log)}")

            pip("wheel", "--no-build-isolation", "--no-deps", "-w", str(wheels), str(REPO_DIR))
            pip("install", "--no-deps", "--target", str(root), *map(str, wheels.glob("balancerpool-*.whl")))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


@contextlib.contextmanager
def balancerpool(
    ctx: Ctx, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    env = env or ctx.env
    launcher = proxy_launcher(env)
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
    if proxy_has_admin_option(launcher, env):
        # The admin listener as by default, so /metrics counts every request (HAProxy keeps its
        # stats too); on a free port rather than the default 9090.
        argv += ["--admin", f"127.0.0.1:{free_port()}"]
    log = ctx.tmp / "balancerpool.log"
    with started([*ctx.pin.proxy, *argv], log, env) as proc:
        wait_ready(proc, port, log, "balancerpool")
        yield proc, port


@contextlib.contextmanager
def balancerpool_mypyc(ctx: Ctx) -> Iterator[tuple[subprocess.Popen[bytes] | None, int]]:
    """The same proxy with its request path compiled by mypyc (docs/performance.md)."""
    env = mypyc_env(ctx)
    probe = "import balancerpool.proxy.frontend as m; print(m.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=30
    ).stdout.strip()
    if not where.endswith(".so"):
        raise Skip(f"the mypyc build did not load compiled: frontend from {where or '?'}")
    with balancerpool(ctx, env) as started_proxy:
        yield started_proxy


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
    "balancerpool-mypyc": balancerpool_mypyc,
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


def load(port: int, duration: float, connections: int, pin: Pinning, watch: list[int] | None = None) -> Row:
    """One load run: wrk when installed, else bench/loadgen.py; both pinned to the load core.

    With `watch` (the proxy's process tree), the row also gets the tree's RSS, sampled every
    RSS_SAMPLE_INTERVAL while the load runs, and its CPU time (utime + stime) over the run.
    """
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
    rss: list[float] = []
    core = pin.proxy_cpu if watch else None
    core_before = core_ticks(core) if core is not None else None
    others_before = others_ticks()
    cpu_before = cpu_seconds(watch) if watch else (0.0, 0.0)
    began = time.monotonic()
    gen = subprocess.Popen([*pin.load, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if watch:
                rss.append(status_mib(watch))
            try:
                stdout, stderr = gen.communicate(timeout=RSS_SAMPLE_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() - began > duration + 60:
                    raise Skip(f"load generator still running {duration + 60:.0f} s later; killed") from None
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
    elapsed = time.monotonic() - began
    cpu_after = cpu_seconds(watch) if watch else (0.0, 0.0)
    core_after = core_ticks(core) if core is not None else None
    others_after = others_ticks()
    if gen.returncode != 0:
        raise Skip(f"load generator failed ({gen.returncode}): {stderr.strip() or stdout.strip()}")
    try:
        if wrk is not None:
            row = parse_wrk(stdout)
        else:
            data = json.loads(stdout)
            row = Row(
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
    row.connections = connections
    if watch:
        row.rss_mib = round(rss[-1], 2)
        row.rss_peak_mib = round(max(rss), 2)
        user, system = (after - before for after, before in zip(cpu_after, cpu_before, strict=True))
        if row.requests:
            row.cpu_us_per_req = round((user + system) * 1e6 / row.requests, 2)
        if user + system > 0:
            row.cpu_sys_share = round(system / (user + system), 3)
        row.cpu_busy = round((user + system) / elapsed, 3)
        if core_before is not None and core_after is not None:
            row.core_steal = round((core_after[1] - core_before[1]) / CLOCK_TICKS / elapsed, 3)
    others = 0
    for pid, (start, ticks) in others_after.items():
        earlier = others_before.get(pid)
        others += ticks - earlier[1] if earlier is not None and earlier[0] == start else ticks
    row.others_busy = round(others / CLOCK_TICKS / elapsed, 3)
    return row


def others_ticks() -> dict[int, tuple[int, int]]:
    """pid -> (start time, CPU ticks incl. reaped children) of every process that is not ours (this
    harness and its descendants: proxies, backends, load generator) and not a kernel thread (those,
    ksoftirqd above all, mostly carry our own network traffic)."""
    ours = {os.getpid(), *(pid for pid, _ in descendants(os.getpid()))}
    found: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (pid := int(entry.name)) in ours or pid == 2:
            continue
        fields = proc_fields(pid)
        if fields is None or int(fields[1]) == 2:  # a child of kthreadd: a kernel thread
            continue
        found[pid] = (int(fields[19]), sum(int(value) for value in fields[11:15]))
    return found


def measure(ctx: Ctx, port: int, duration: float, warmup: float, count: int, watch: list[int] | None) -> Row:
    """Warm-up and timed run at one connection count; a run that other processes disturbed (see
    `noise`) is measured again, up to `ctx.retries` times, and the least disturbed run is kept."""
    runs: list[Row] = []
    for attempt in range(1 + ctx.retries):
        if attempt:
            print(f"  {count} connections: {noise(runs[-1])}; measuring again", flush=True)
        wait_quiet(ctx.pin.cpus, ctx.quiet_wait)
        load(port, warmup, count, ctx.pin)
        runs.append(load(port, duration, count, ctx.pin, watch))
        if not noise(runs[-1]):
            break
    return min(runs, key=lambda row: (row.others_busy or 0) + (row.core_steal or 0))


def bench_target(
    name: str, target: Target, ctx: Ctx, duration: float, warmup: float, connections: list[int]
) -> list[Row]:
    """Start one proxy, warm it up, then one timed run per connection count (RSS, CPU), stop it.

    Every connection count gets its own warm-up at that count; the proxy keeps running between them.
    """
    rows: list[Row] = []
    try:
        with target(ctx) as (proc, port):
            if proc is not None and len(sample_bodies(port)) < len(ctx.backends):
                print(f"  warning: {name} did not spread 4 requests over all {len(ctx.backends)} backends")
            watch = tree(proc.pid) if proc is not None else None
            for count in connections:
                try:
                    row = measure(ctx, port, duration, warmup, count, watch)
                except Skip as exc:
                    row = Row(name=name, connections=count, skipped=str(exc))
                row.name = name
                rows.append(row)
                if len(connections) > 1:
                    print(f"  {count:>5} connections: {summary(row)}", flush=True)
            for tool in ctx.profile:
                if watch is not None and name in PROFILERS[tool]:
                    print(f"  profiling with {tool} ...", flush=True)
                    text = profile_run(tool, name, ctx, watch, port, duration, connections[-1])
                    ctx.profiles.setdefault(name, {})[tool] = text
    except Skip as exc:
        done = {row.connections for row in rows}
        rows += [Row(name, count, skipped=str(exc)) for count in connections if count not in done]
    return rows


# ------------------------------------------------------------------------------------------ profiles

PROFILE_DIR = BENCH_DIR / "results" / "profile"
#: System calls counted one by one by the `syscalls` profiler (the rest are counted together).
SYSCALLS = (
    "read",
    "write",
    "readv",
    "writev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "splice",
    "epoll_wait",
    "epoll_pwait",
    "epoll_ctl",
    "io_uring_enter",
    "accept4",
    "connect",
    "close",
    "setsockopt",
    "getsockopt",
    "clock_gettime",
)
#: Which profilers apply to which targets: py-spy reads Python stacks, perf works on any process.
PROFILERS = {
    "py-spy": ("balancerpool",),
    "perf": ("balancerpool", "balancerpool-mypyc", "haproxy", "nginx"),
    "syscalls": ("balancerpool", "balancerpool-mypyc", "haproxy", "nginx"),
}


def profile_run(
    tool: str, name: str, ctx: Ctx, pids: list[int], port: int, duration: float, conns: int
) -> str:
    """One extra load run of `name` under a profiler; returns a text summary (also saved to
    PROFILE_DIR). The load starts 1 s before the profiler and ends 1 s after it, so the profile sees
    steady load only. Profilers run on the load core and cost it CPU: the run's req/s is not a figure.

    - py-spy: `py-spy record --nonblocking` (Python stacks, the proxy is never paused); self time by
      function and by file. Time in C called from Python (a socket write) counts for the caller.
    - perf: `perf record -e cpu-clock` of the proxy's processes; CPU share by shared object (kernel,
      libpython, uvloop, httptools, ...) and by symbol.
    - syscalls: `perf stat` counting syscall tracepoints of the proxy's processes (exact counts, cheap
      enough that the run stays close to normal batching); system calls per request.
    """
    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    base = PROFILE_DIR / f"{name}-c{conns}.{tool}"
    seconds = str(max(1, round(duration)))
    pid_list = ",".join(map(str, pids))
    exe = shutil.which("py-spy" if tool == "py-spy" else "perf")
    if exe is None:
        return f"  {tool}: {'py-spy' if tool == 'py-spy' else 'perf'} not found"
    raw = base.with_suffix(base.suffix + ".raw")
    raw.unlink(missing_ok=True)
    if tool == "py-spy":
        argv = [exe, "record", "--nonblocking", "--rate", "250", "--format", "raw"]
        argv += ["--duration", seconds, "--output", str(raw), "--pid", str(pids[0])]
    elif tool == "perf":
        argv = [exe, "record", "-e", "cpu-clock", "-F", "999", "-p", pid_list, "-o", str(raw), "--", "sleep"]
        argv += [seconds]
    else:
        events = ["raw_syscalls:sys_enter", *(f"syscalls:sys_enter_{call}" for call in SYSCALLS)]
        argv = [exe, "stat", "-x", ",", "-e", ",".join(events), "-p", pid_list, "-o", str(raw)]
        argv += ["--", "sleep", seconds]
    log = ctx.tmp / f"{tool}.log"
    outcome: list[Row | Skip] = []

    def run_load() -> None:
        try:
            outcome.append(load(port, int(seconds) + 2, conns, ctx.pin))
        except Skip as exc:
            outcome.append(exc)

    loader = threading.Thread(target=run_load, daemon=True)
    loader.start()
    time.sleep(1.0)
    with started([*ctx.pin.load, *argv], log) as prof:
        try:
            prof.wait(int(seconds) + 60)
        except subprocess.TimeoutExpired:
            return f"  {tool}: did not finish; stopped\n{tail(log)}"
    loader.join(int(seconds) + 90)
    row = outcome[0] if outcome else Skip("the load did not finish")
    if isinstance(row, Skip):
        return f"  {tool}: the load failed: {row}"
    if not raw.exists() or not raw.stat().st_size:
        return f"  {tool}: wrote nothing\n{tail(log)}"
    if tool == "py-spy":
        text = summarise_py_spy(raw)
    elif tool == "perf":
        text = summarise_perf(exe, raw)
    else:
        # The counts cover the profiler's window, which lies inside the load run.
        text = summarise_syscalls(raw, round((row.rps or 0) * int(seconds)))
    text = f"{name}, {conns} connections, {row.rps or 0:.0f} req/s under {tool}; {raw}\n{text}"
    base.with_suffix(base.suffix + ".txt").write_text(text + "\n")
    return text


def summarise_py_spy(path: Path, top: int = 20) -> str:
    """Self time by function and by source file from py-spy's raw (collapsed) output."""
    by_function: dict[str, int] = {}
    by_file: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        leaf = stack.rsplit(";", 1)[-1]
        # "function (path/to/file.py:123)" -> function and file, line numbers merged.
        function = re.sub(r":\d+\)$", ")", leaf)
        source = re.search(r"\(([^()]*?)(?::\d+)?\)$", leaf)
        file = source[1] if source else leaf
        by_function[function] = by_function.get(function, 0) + count
        by_file[file] = by_file.get(file, 0) + count
    if not total:
        return "  (no samples)"
    lines = [f"  {total} samples (not idle); self time by function:"]
    for key, count in sorted(by_function.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {key}")
    lines.append("  self time by file:")
    for key, count in sorted(by_file.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"  {100 * count / total:5.1f}%  {key}")
    return "\n".join(lines)


def summarise_perf(perf: str, path: Path, top: int = 25) -> str:
    """`perf report` of a cpu-clock recording: share by shared object, then by symbol."""
    parts = []
    for sort, limit in (("dso", 0.5), ("dso,sym", 0.7)):
        out = subprocess.run(
            [perf, "report", "-i", str(path), "--stdio", "--sort", sort, "--percent-limit", str(limit)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        lines = [line for line in out.stdout.splitlines() if line.strip() and not line.startswith("#")]
        parts.append(f"  by {sort}:\n" + "\n".join(f"  {line.rstrip()}" for line in lines[:top]))
    return "\n".join(parts)


def summarise_syscalls(path: Path, requests: int) -> str:
    """System calls per request from `perf stat -x,` counts of syscall tracepoints."""
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            event = fields[2].rsplit(":", 1)[-1].removeprefix("sys_enter_")
            counts[event] = counts.get(event, 0) + int(fields[0])
    total = counts.pop("sys_enter", 0)
    if not total or not requests:
        return "  (no system calls counted, or no requests)"
    lines = [f"  {total / requests:.2f} system calls per request (~{requests} requests), of which:"]
    for key, count in sorted(counts.items(), key=lambda item: -item[1]):
        if count:
            lines.append(f"  {count / requests:8.3f}  {key}")
    other = total - sum(counts.values())
    lines.append(f"  {other / requests:8.3f}  (other system calls)")
    return "\n".join(lines)


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


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_info() -> dict[str, object]:
    """Which code balancerpool ran: this checkout's commit, and whether its sources had local changes."""
    info: dict[str, object] = {"dir": str(REPO_DIR)}
    git = shutil.which("git")
    if git is None:
        return info
    # Read-only; no optional locks, so a concurrent git command in this checkout is never disturbed.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        head = subprocess.run(
            [git, "rev-parse", "HEAD"], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=10
        )
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            changed = subprocess.run(
                [git, "status", "--porcelain", "--", *SOURCE_PACKAGES],
                cwd=REPO_DIR,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["uncommitted_changes"] = sorted(
                line[3:] for line in changed.stdout.splitlines() if line.strip()
            )
    return info


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
        "uvloop": package_version("uvloop"),
        "httptools": package_version("httptools"),
        "aiohttp": package_version("aiohttp"),
        "haproxy": version("haproxy", "-v"),
        "nginx": version("nginx", "-v"),
        "wrk": version("wrk", "--version"),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def fmt(value: float | None, spec: str) -> str:
    """Format a figure; a missing one is a right-aligned dash of the same width."""
    return format("-", f">{spec.split('.')[0]}") if value is None else format(value, spec)


def summary(row: Row) -> str:
    """One row on one line (progress output during a sweep)."""
    if row.skipped:
        return f"skipped: {row.skipped.splitlines()[0]}"
    text = f"{fmt(row.rps, '.0f')} req/s, p50 {fmt(row.p50_ms, '.3f')} ms, p99 {fmt(row.p99_ms, '.3f')} ms"
    if row.rss_mib is not None:
        text += f", RSS {row.rss_mib:.1f} MiB, {fmt(row.cpu_us_per_req, '.1f')} us/req"
    for problem in (errors(row), noise(row)):
        if problem:
            text += f"  !! {problem}"
    return text


def errors(row: Row) -> str:
    """Non-2xx/3xx responses and socket errors of a row, or '' when there are none."""
    if not row.non_2xx_3xx and not any(row.socket_errors.values()):
        return ""
    return f"non-2xx/3xx: {row.non_2xx_3xx}, socket errors: {row.socket_errors}"


#: Above these shares of a core, a row is flagged: something else competed for the CPUs.
NOISE_OTHER = 0.05
NOISE_STEAL = 0.02


def noise(row: Row) -> str:
    """A warning when other processes or the hypervisor took a noticeable share of the CPUs."""
    others, steal = row.others_busy or 0.0, row.core_steal or 0.0
    if others <= NOISE_OTHER and steal <= NOISE_STEAL:
        return ""
    return (
        f"a busy machine: other processes used {100 * others:.0f}% of a core, the hypervisor stole "
        f"{100 * steal:.0f}% of the proxy's core"
    )


HEADER = (
    f"{'name':<20}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'RSS MiB':>9}"
    f"{'CPU us/req':>11}{'sys %':>7}{'CPU busy':>9}"
)


def table_line(row: Row) -> str:
    if row.skipped:
        return f"{row.name:<20}{fmt(row.connections, '6d')}  skipped: {row.skipped.splitlines()[0]}"
    sys_pct = None if row.cpu_sys_share is None else 100 * row.cpu_sys_share
    return (
        f"{row.name:<20}{fmt(row.connections, '6d')}{fmt(row.rps, '10.0f')}{fmt(row.p50_ms, '9.3f')}"
        f"{fmt(row.p99_ms, '9.3f')}{fmt(row.rss_mib, '9.1f')}{fmt(row.cpu_us_per_req, '11.1f')}"
        f"{fmt(sys_pct, '7.0f')}{fmt(row.cpu_busy, '9.2f')}"
    )


#: Rows of balancerpool itself, each set against HAProxy and nginx: the interpreted build first.
OURS = ("balancerpool", "balancerpool-mypyc")
#: Each build's ratios: what over which other, from which row attribute.
RATIOS = tuple(
    (f"{key}/{other}", other, attr)
    for other in ("haproxy", "nginx")
    for key, attr in (("rps", "rps"), ("p99", "p99_ms"), ("cpu", "cpu_us_per_req"))
)


def ratios_at(rows: list[Row], connections: int) -> dict[str, dict[str, float | None]]:
    """Each build of balancerpool measured, over HAProxy and nginx at one connection count: req/s, p99
    and CPU per request, as {build: {"rps/haproxy": ratio, ...}}. The interpreted build is always
    there (its ratios None when not measured)."""
    by_name = {row.name: row for row in rows if row.connections == connections and not row.skipped}
    measured = {row.name for row in rows}
    ratios: dict[str, dict[str, float | None]] = {}
    for name in OURS:
        if name in measured or name == OURS[0]:
            ours = by_name.get(name)
            ratios[name] = {
                key: ratio(getattr(ours, attr), getattr(theirs, attr)) if ours and theirs else None
                for key, other, attr in RATIOS
                for theirs in [by_name.get(other)]
            }
    return ratios


def goal_lines(ratios: dict[str, dict[str, float | None]], connections: int) -> list[str]:
    """The performance issue's goals against one set of ratios, for each build of balancerpool
    measured: met, not met, or not measured."""
    lines = []
    for name, values in ratios.items():
        for key, op, bound in GOALS:
            value = values.get(key)
            if value is None:
                verdict = "not measured"
            else:
                met = {">=": value >= bound, ">": value > bound, "<=": value <= bound}[op]
                verdict = "met" if met else "NOT MET"
            note = (
                f"  (the goal is stated at {P99_GOAL_CONNECTIONS} connections)"
                if key.startswith("p99") and connections != P99_GOAL_CONNECTIONS
                else ""
            )
            lines.append(f"  {name:<20}{key:<14}{op:>3} {bound:<5}{fmt(value, '7.2f')}  {verdict}{note}")
    return lines


Ratios = dict[int, dict[str, dict[str, float | None]]]


def report(rows: list[Row], connections: list[int]) -> Ratios:
    """Print the table, the ratios and the goals; return the ratios per connection count."""
    print(f"\n{HEADER}")
    previous = None
    for row in rows:
        if previous is not None and row.name != previous and len(connections) > 1:
            print()
        previous = row.name
        print(table_line(row))
        for problem in (errors(row), noise(row)) if not row.skipped else ():
            if problem:
                print(f"{'':<20}!! {problem}")
    ratios = {count: ratios_at(rows, count) for count in connections}
    keys = [key for key, _, _ in RATIOS]
    print(f"\n{'conns':>6}  {'build':<20}" + "".join(f"{key:>13}" for key in keys))
    for count, builds in ratios.items():
        for name, values in builds.items():
            print(f"{count:>6}  {name:<20}" + "".join(fmt(values[key], "13.2f") for key in keys))
    print(
        "(balancerpool / other. req/s: higher is better; p99 and CPU per request: lower is better;"
        " 1.0 = parity)"
    )
    goal_at = P99_GOAL_CONNECTIONS if P99_GOAL_CONNECTIONS in ratios else connections[0]
    print(f"\ngoals of the performance issue, at {goal_at} connections:")
    print("\n".join(goal_lines(ratios[goal_at], goal_at)))
    if any(not row.skipped and errors(row) for row in rows):
        print("!! some rows had errors: they are not valid measurements")
    if any(not row.skipped and noise(row) for row in rows):
        print("!! some rows ran on a busy machine: their figures are low; re-run when it is quiet")
    return ratios


def markdown(rows: list[Row], ratios: Ratios) -> str:
    """The table and the ratios as Markdown, for docs/performance.md."""

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        "| target | conns | req/s | p50 ms | p99 ms | RSS MiB | CPU µs/req | sys % | CPU busy |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        if row.skipped:
            lines.append(f"| {row.name} | {cell(row.connections, 'd')} | skipped | | | | | | |")
            continue
        flags = " ⚠" if errors(row) or noise(row) else ""
        sys_pct = None if row.cpu_sys_share is None else 100 * row.cpu_sys_share
        lines.append(
            f"| {row.name}{flags} | {cell(row.connections, 'd')} | {cell(row.rps, ',.0f')} | "
            f"{cell(row.p50_ms, '.3f')} | {cell(row.p99_ms, '.3f')} | {cell(row.rss_mib, '.1f')} | "
            f"{cell(row.cpu_us_per_req, '.1f')} | {cell(sys_pct, '.0f')} | {cell(row.cpu_busy, '.2f')} |"
        )
    keys = [key for key, _, _ in RATIOS]
    lines += ["", "| conns | build | " + " | ".join(keys) + " |", "|--:|---|" + "--:|" * len(keys)]
    for count, builds in ratios.items():
        for name, values in builds.items():
            cells = " | ".join(cell(values[key], ".2f") for key in keys)
            lines.append(f"| {count} | {name} | {cells} |")
    return "\n".join(lines)


def pinning(enabled: bool) -> Pinning:
    taskset = shutil.which("taskset")
    cores = sorted(os.sched_getaffinity(0))
    if not enabled:
        return Pinning([], [], "pinning disabled (--no-pin)")
    if taskset is None:
        return Pinning([], [], "taskset not found: no CPU pinning")
    if len(cores) < 2:
        return Pinning([], [], "fewer than 2 usable CPUs: no pinning")
    # The harness itself (RSS sampling, /proc reads) stays off the proxy's core too.
    os.sched_setaffinity(0, {cores[1]})
    return Pinning(
        [taskset, "-c", str(cores[0])],
        [taskset, "-c", str(cores[1])],
        f"proxy on CPU {cores[0]}; load generator, backends and harness on CPU {cores[1]}",
        cores[0],
        cores[:2],
    )


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    """Turn SIGTERM into KeyboardInterrupt so every `finally` stops its processes."""
    raise KeyboardInterrupt


def connection_list(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("connection counts must be positive integers")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per timed run (default 10)")
    parser.add_argument("--connections", type=int, default=50, help="concurrent keep-alive connections")
    parser.add_argument(
        "--sweep",
        type=connection_list,
        metavar="N,N,...",
        help="one timed run per connection count for every target (each after a 1 s warm-up at that "
        "count); results to bench/results/sweep.json (and --json); plot with bench/plot.py",
    )
    parser.add_argument("--quick", action="store_true", help="3 s runs, 1 s warm-up (smoke test)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma list from {','.join(TARGETS)}")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    parser.add_argument(
        "--frontend",
        choices=["fast", "aiohttp"],
        help="balancerpool's HTTP front end (default: the proxy's own default)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results here as well")
    parser.add_argument(
        "--markdown", action="store_true", help="also print the tables as Markdown (docs/performance.md)"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=60.0,
        metavar="S",
        help="before each timed run, wait up to S s while other processes keep a pinned CPU over 10%% "
        "busy (a shared machine); 0: never wait (default 60)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        metavar="N",
        help="measure a timed run again, up to N times, when other processes took more than 5%% of a "
        "core during it (or the hypervisor 2%% of the proxy's); the least disturbed run is kept (default 2)",
    )
    parser.add_argument(
        "--profile",
        default="",
        metavar="TOOL,...",
        help=f"after each proxy's timed run, one more run per profiler from {','.join(PROFILERS)} "
        "(py-spy: balancerpool only); summaries printed and saved in bench/results/profile/. "
        "Profilers cost the load core CPU: a profiled run's req/s is not a figure",
    )
    args = parser.parse_args()
    names = [name.strip() for name in args.targets.split(",") if name.strip()]
    if unknown := [name for name in names if name not in TARGETS]:
        parser.error(f"unknown targets: {', '.join(unknown)}")
    tools = [tool.strip() for tool in args.profile.split(",") if tool.strip()]
    if unknown := [tool for tool in tools if tool not in PROFILERS]:
        parser.error(f"unknown profilers: {', '.join(unknown)}")
    if args.sweep and tools:
        parser.error("--profile goes with one connection count: not with --sweep")
    duration, warmup = (3, 1) if args.quick else (args.duration, 2)
    connections: list[int] = args.sweep or [args.connections]
    if args.sweep:
        warmup = 1
    signal.signal(signal.SIGTERM, on_sigterm)

    pin = pinning(not args.no_pin)
    tool = "wrk" if find_tool("wrk") else "bench/loadgen.py (wrk not found)"
    counts = ",".join(map(str, connections))
    print(f"{pin.note}\nload: {tool}, {counts} connections, {duration} s (+{warmup} s warm-up)")
    rows: list[Row] = []
    profiles: dict[str, dict[str, str]] = {}
    try:
        with (
            tempfile.TemporaryDirectory(prefix="balancerpool-bench-") as tmp_name,
            backends(Path(tmp_name), pin) as (ports, kind),
        ):
            print(f"backends: {kind} on ports {ports}")
            ctx = Ctx(
                Path(tmp_name),
                pin,
                ports,
                args.frontend,
                env=source_env(Path(tmp_name)),
                profile=tools,
                profiles=profiles,
                quiet_wait=args.wait_quiet,
                retries=max(0, args.retries),
            )
            print(f"balancerpool: from {REPO_DIR}")
            for name in names:
                print(f"running {name} ...", flush=True)
                rows += bench_target(name, TARGETS[name], ctx, duration, warmup, connections)
                if len(connections) == 1 and rows[-1].skipped:
                    print(f"  skipped: {rows[-1].skipped}")
            backend_kind = kind
    except KeyboardInterrupt:
        print("\ninterrupted; all started processes were stopped", file=sys.stderr)
        return 130
    ratios = report(rows, connections)
    for texts in profiles.values():
        for tool, text in texts.items():
            print(f"\nprofile ({tool}): {text}")
    if args.markdown:
        print(f"\n{markdown(rows, ratios)}\n")
    result: dict[str, object] = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "bench/run.py", *sys.argv[1:]]),
        "machine": machine_info(),
        "source": source_info(),
        "params": {
            "duration_s": duration,
            "warmup_s": warmup,
            "connections": connections if args.sweep else args.connections,
            "load_generator": tool,
            "backend": backend_kind,
            "pinning": pin.note,
            "wait_quiet_s": args.wait_quiet,
            "retries": args.retries,
            "balancerpool_frontend": args.frontend or "default",
        },
        "results": [asdict(row) for row in rows],
        "profiles": profiles,
    }
    if args.sweep:
        result["ratios"] = {str(count): values for count, values in ratios.items()}
    else:
        result["ratios"] = ratios[connections[0]]
    text = json.dumps(result, indent=2) + "\n"
    for path in dict.fromkeys([SWEEP_FILE if args.sweep else RESULTS_FILE, *filter(None, [args.json])]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
