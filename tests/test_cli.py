"""The ``balancerpool`` command as a user runs it: real processes, signals and files."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from balancerpool.proxy.cli import build_parser, limits_from
from balancerpool.proxy.hardening import DEFAULT_LIMITS

from .conftest import Backends, free_port, pool_doc

EXAMPLES = Path(__file__).parent.parent / "examples"


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def fetch_with(url: str, headers: dict[str, str]) -> str:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
        return str(resp.read().decode())


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():  # type: ignore[operator]
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


class Output:
    """Collects a process's stderr without blocking, to look for log lines."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.text = ""

    def read(self) -> str:
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self.text += chunk.decode()
        return self.text


def threads(pid: int) -> int:
    """The process's thread count. A proxy whose listeners and members are IP addresses runs
    on one (docs/performance.md: a second thread costs every read and write a file reference)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Threads:")[1].split()[0])


@pytest.fixture
def run() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def balancerpool(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "balancerpool.proxy", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_proxy_reloads_on_change_and_keeps_last_good(
        tmp_path: Path, backends: Backends, run: list[subprocess.Popen[bytes]]) -> None:
    a, b = backends.start("a"), backends.start("b")
    port = free_port()
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a"}], listen="127.0.0.1:1")))
    admin = free_port()
    log = tmp_path / "access.log"
    proc = balancerpool("proxy", str(path), "--listen", f"127.0.0.1:{port}",
                        "--admin", f"127.0.0.1:{admin}", "--access-log", str(log),
                        "--access-log-format", "json")
    run.append(proc)
    out = Output(proc)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: fetch(url) == (200, "a\n"))  # --listen overrides spec.listen
    # The admin listener: ready once a configuration is applied; metrics count the requests.
    assert fetch(f"http://127.0.0.1:{admin}/readyz")[0] == 200
    metrics = fetch(f"http://127.0.0.1:{admin}/metrics")[1]
    assert 'balancerpool_requests_total{' in metrics and 'member="a"' in metrics
    wait_until(lambda: log.exists() and '"member":"a"' in log.read_text())
    assert threads(proc.pid) == 1

    # A change of the file is picked up by itself.
    path.write_text(yaml.safe_dump(pool_doc([{"url": b.url, "name": "b"}])))
    wait_until(lambda: fetch(url) == (200, "b\n"))

    # An invalid file is refused with its errors, and the last good configuration keeps serving.
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a", "loadfactor": 250}])))
    wait_until(lambda: "keeping the last good configuration" in out.read())
    assert "spec.members[0].loadfactor: must be 1..100, got 250" in out.read()
    assert {fetch(url) for _ in range(4)} == {(200, "b\n")}

    # SIGHUP reloads too (here after a change made while the file watcher could miss it).
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a"}])))
    proc.send_signal(signal.SIGHUP)
    wait_until(lambda: fetch(url) == (200, "a\n"))

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_proxy_refuses_to_start_on_an_invalid_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "balancerpool.proxy", "proxy", str(EXAMPLES / "invalid-pool.yaml")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "spec.members[2].loadfactor: must be 1..100, got 250" in result.stderr


def test_invalid_client_limits_are_refused_naming_the_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "balancerpool.proxy", "proxy", str(EXAMPLES / "demo-pool.yaml"),
         "--max-headers", "0", "--header-timeout", "0", "--send-timeout", "soon"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--send-timeout: must be a duration like 5s" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "balancerpool.proxy", "proxy", str(EXAMPLES / "demo-pool.yaml"),
         "--max-headers", "0", "--header-timeout", "0"],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert ("--max-headers: must be at least 1; --header-timeout: must be more than 0 seconds"
            in result.stderr)


def test_client_limits_from_options() -> None:
    args = build_parser().parse_args(["proxy", "x.yaml", "--max-request-line", "100",
                                      "--header-timeout", "2.5", "--body-timeout", "1m"])
    limits = limits_from(args)
    assert (limits.max_request_line, limits.header_timeout, limits.body_timeout) == (100, 2.5, 60.0)
    assert limits.max_headers == DEFAULT_LIMITS.max_headers


def test_check_lists_every_problem() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "balancerpool.proxy", "check", str(EXAMPLES / "invalid-pool.yaml")],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    lines = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert lines == [
        "metadata.name: must be a DNS label (lower-case letters, digits, '-'), got 'Broken_Name'",
        "spec.lbmethod: must be one of byrequests, bytraffic, bybusyness, "
        "leastrequest, random, hash, got 'roundrobin'",
        "spec.routes[0].path: must be an absolute path like /app without query or spaces, got 'app'",
        "spec.members[1].url: must be an http:// URL such as http://10.0.0.5:8080, "
        "got 'ftp://127.0.0.1:9002'",
        "spec.members[2].loadfactor: must be 1..100, got 250",
        "spec.members[2].status: unknown status flag 'X': flags are D S I H R E N C",
        "spec.members[2].retry: must be a duration like 5s, 200ms or 1m, got 'soon'",
        "spec.members[2].pool.min: must not exceed max (2), got 5",
        "spec.members[2].colour: unknown field",
        "spec.members[1].route: 'a' repeats members[0]",
        "spec.members[2].redirect: names no member's route: 'z'",
        "spec.maxattempts: must be 0..100, got -1",
    ]
    ok = subprocess.run(
        [sys.executable, "-m", "balancerpool.proxy", "check", str(EXAMPLES / "demo-pool.yaml")],
        capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and "ok: demo (3 members)" in ok.stdout


def test_demo_serves_and_stops_on_ctrl_c(run: list[subprocess.Popen[bytes]]) -> None:
    port = free_port()
    proc = balancerpool("demo", "--listen", f"127.0.0.1:{port}")
    run.append(proc)
    url = f"http://127.0.0.1:{port}/"
    wait_until(lambda: fetch(url)[0] == 200)
    bodies = [fetch(url)[1].splitlines()[0] for _ in range(6)]
    # alpha has loadfactor 1, beta 2; gamma is a hot standby and gets nothing.
    assert sorted(bodies) == ["demo backend alpha (route a)"] * 2 + ["demo backend beta (route b)"] * 4
    # Stickiness with the demo backends' Tomcat-style cookies, as a cookie and as ;jsessionid=.
    for _ in range(5):
        assert fetch_with(url, {"Cookie": "JSESSIONID=abc.a"}).startswith("demo backend alpha")
        assert fetch(url + "cart;jsessionid=abc.b")[1].startswith("demo backend beta")
    # A new visitor gets a cookie naming the member that served it, and stays there.
    with urllib.request.urlopen(url, timeout=5) as resp:
        body = resp.read().decode()
        cookie = resp.headers["Set-Cookie"].split(";")[0]
    served = body.splitlines()[0]
    assert cookie.endswith(".a" if "alpha" in served else ".b")
    assert {fetch_with(url, {"Cookie": cookie}).splitlines()[0] for _ in range(5)} == {served}
    # The demo serves the balancer-manager too, and says how to log in.
    assert fetch("http://127.0.0.1:9090/healthz")[0] == 200
    assert fetch("http://127.0.0.1:9090/balancer-manager")[0] == 401
    assert threads(proc.pid) == 1  # its backends and admin listener bound without resolving
    proc.send_signal(signal.SIGINT)
    stdout, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0
    out = stdout.decode()
    assert f"proxy on http://127.0.0.1:{port}/" in out
    password = re.search(r"balancer-manager: http://127.0.0.1:9090/balancer-manager  "
                         r"\(log in as 'admin', password (\S+)\)", out)
    assert password is not None, out
    assert "demo stopped" in out


def test_check_reads_the_session_key_file(tmp_path: Path) -> None:
    weak = tmp_path / "weak.key"
    weak.write_text("short\n")
    doc = pool_doc([{"url": "http://127.0.0.1:9", "name": "a", "route": "a"}],
                   sessionCookie={"keyFile": str(tmp_path / "missing.key")})
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "balancerpool.proxy", "check", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "test: spec.sessionCookie.keyFile: cannot be read: No such file or directory" in result.stderr
    doc["spec"]["sessionCookie"]["keyFile"] = str(weak)
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run([sys.executable, "-m", "balancerpool.proxy", "check", str(path)],
                            capture_output=True, text=True, timeout=30)
    assert "spec.sessionCookie.keyFile: holds 5 bytes; a key needs at least 16" in result.stderr
