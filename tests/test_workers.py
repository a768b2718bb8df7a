"""``balancerpool proxy --workers N``: a supervisor and N worker processes sharing the port.

The bus logic (:mod:`balancerpool.proxy.statebus`) is tested directly; the rest runs the real
command with two workers, real backends and signals, and observes it as an operator would: the
access log names the worker (index and pid) that answered each request, the backends log what
reached them, the admin listener (worker 0) shows the member states.
"""

from __future__ import annotations

import http.cookiejar
import http.server
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from balancerpool.proxy.model import parse_pools
from balancerpool.proxy.scheduling import C, D, E, MemberState, PoolState, Transition, bits_to_flags
from balancerpool.proxy.statebus import (
    BusError,
    Change,
    Config,
    MemberStatus,
    Message,
    MetricsBundle,
    MetricsReply,
    MetricsRequest,
    Publisher,
    Ready,
    Relay,
    Snapshot,
    SnapshotRequest,
    backoff,
    decode,
    encode,
    plan_change,
    plan_snapshot,
    remote_detail,
)
from balancerpool.proxy.workers import merge_expositions

from .conftest import Backends, free_port, pool_doc

# ---------------------------------------------------------------------------------------------
# The bus logic


def test_messages_round_trip() -> None:
    messages: list[Message] = [
        Ready(1, 4242),
        Change(0, "shop", "a", "", "E", "connect-error", "refused", 60.0),
        Change(1, "shop", "b", "C", "", "health-check", "GET /health: 200 (1 consecutive passes)"),
        Config(0, "apiVersion: balancerpool.io/v1alpha1\n"),
        SnapshotRequest(2),
        Snapshot(0, 2, "text", (MemberStatus("shop", "a", "DE", 12.5, "connect-error", "x"),
                                MemberStatus("shop", "b", "", None, "config", "loaded"))),
        MetricsRequest(0, 7), MetricsReply(0, 7, 1, "# HELP x\n"),
        MetricsBundle(7, ((1, "a"), (2, "b"))), MetricsBundle(8),
    ]
    for message in messages:
        line = encode(message)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode(line) == message


@pytest.mark.parametrize("line", [
    b"not json", b"[1]", b'{"type": "nope"}', b'{"worker": 1, "pid": 2}',
    b'{"type": "ready", "worker": -1, "pid": 2}',
    b'{"type": "ready", "worker": true, "pid": 2}',
    b'{"type": "change", "origin": 0, "pool": "p", "member": "m", "before": "", "after": "X", '
    b'"signal": "s", "detail": "", "duration": null}',
    b'{"type": "change", "origin": 0, "pool": "p", "member": "m", "before": "", "after": "E", '
    b'"signal": "s", "detail": "", "duration": -1}',
    b'{"type": "snapshot", "origin": 0, "target": 1, "config": "", "members": {}}',
    b'{"type": "snapshot", "origin": 0, "target": 1, "config": "", "members": [1]}',
    b'{"type": "metrics-bundle", "id": 1, "texts": [[1]]}',
    b'{"type": "metrics-bundle", "id": 1, "texts": [["1", "x"]]}',
])
def test_bad_lines_are_refused(line: bytes) -> None:
    with pytest.raises(BusError):
        decode(line)


def test_publisher_sends_own_changes_only() -> None:
    pub = Publisher(1)
    sent = pub.outgoing("p", "m", "", "E", "connect-error", "refused", 30.0)
    assert sent == Change(1, "p", "m", "", "E", "connect-error", "refused", 30.0)
    # The error duration travels only with a change that sets E.
    assert pub.outgoing("p", "m", "E", "", "retry", "30s passed", 30.0) == \
        Change(1, "p", "m", "E", "", "retry", "30s passed", None)
    assert pub.outgoing("p", "m", "", "C", "health-check", "x", 60.0) is not None
    # Every worker reads the same file: its transitions are never sent.
    assert pub.outgoing("p", "m", "", "D", "config", "status changed", 60.0) is None
    assert pub.outgoing("p", "m", "E", "E", "x", "", 60.0) is None
    with pub.applying():
        assert pub.muted
        assert pub.outgoing("p", "m", "", "E", "connect-error", "", 60.0) is None
    assert not pub.muted


def test_plans_apply_the_senders_delta() -> None:
    change = Change(0, "p", "m", "", "E", "connect-error")
    assert plan_change(0, change) == (E, 0)
    assert plan_change(D, change) == (E, 0)  # the receiver's other flags stay
    assert plan_change(E, change) is None  # nothing to do: no transition, nothing sent back
    assert plan_change(C | E, Change(0, "p", "m", "CE", "E", "health-check")) == (0, C)
    status = MemberStatus("p", "m", "DE", 5.0, "connect-error", "")
    assert plan_snapshot(C, status) == (D | E, C)
    assert plan_snapshot(D | E, status) is None
    assert remote_detail("refused", 1) == "refused (from worker 1)"
    assert remote_detail("", 0, "copied from") == "copied from worker 0"


def test_backoff_doubles_up_to_a_cap() -> None:
    assert [backoff(n) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff(10_000) == 30


def _change(origin: int) -> Change:
    return Change(origin, "p", "m", "", "E", "connect-error", "", 60.0)


def test_relay_sends_to_every_other_worker() -> None:
    relay = Relay()
    for i in range(3):
        relay.join(i)
    for i in range(3):
        assert relay.receive(i, Ready(i, 100 + i)) == []
    change = _change(1)
    assert relay.receive(1, change) == [(0, change), (2, change)]
    config = Config(0, "text")
    assert relay.receive(0, config) == [(1, config), (2, config)]
    # Workers the relay does not know (gone) are ignored either way.
    assert relay.leave(2) == []
    assert relay.receive(2, _change(2)) == []
    assert relay.receive(0, change) == [(1, change)]
    # A snapshot request is the relay's own message: never relayed.
    assert relay.receive(0, SnapshotRequest(1)) == []


def test_relay_brings_a_restarted_worker_up_to_date() -> None:
    relay = Relay()
    for i in range(3):
        relay.join(i)
        relay.receive(i, Ready(i, i))
    relay.leave(0)
    relay.join(0, restarted=True)
    # Changes relayed before the snapshot are held for it ...
    early = _change(1)
    assert relay.receive(1, early) == [(2, early)]
    # ... it is asked of the lowest ready worker once the restarted one is ready ...
    assert relay.receive(0, Ready(0, 7)) == [(1, SnapshotRequest(0))]
    late = _change(2)
    assert relay.receive(2, late) == [(1, late)]
    # ... and what was held follows the snapshot, in order.
    snap = Snapshot(1, 0, "config")
    assert relay.receive(2, Snapshot(2, 0, "other")) == []  # not the one asked: ignored
    assert relay.receive(1, snap) == [(0, snap), (0, early), (0, late)]
    after = _change(1)
    assert relay.receive(1, after) == [(0, after), (2, after)]
    assert relay.receive(1, snap) == []  # late duplicate


def test_relay_asks_another_source_when_the_first_dies() -> None:
    relay = Relay()
    for i in range(3):
        relay.join(i)
        relay.receive(i, Ready(i, i))
    relay.leave(2)
    relay.join(2, restarted=True)
    assert relay.receive(2, Ready(2, 9)) == [(0, SnapshotRequest(2))]
    held = _change(1)
    assert relay.receive(1, held) == [(0, held)]
    assert relay.leave(0) == [(1, SnapshotRequest(2))]
    assert relay.receive(1, Snapshot(1, 2, "c")) == [(2, Snapshot(1, 2, "c")), (2, held)]


def test_relay_without_a_source_lets_the_worker_start_from_the_file() -> None:
    relay = Relay()
    relay.join(0)
    relay.join(1)
    relay.receive(1, Ready(1, 1))
    relay.leave(0)
    relay.leave(1)
    relay.join(0, restarted=True)
    relay.join(1, restarted=True)
    held = _change(1)
    assert relay.receive(1, held) == []  # worker 0 waits: held
    assert relay.receive(0, Ready(0, 5)) == [(0, held)]  # nobody ready to copy from
    # Worker 1 may copy worker 0 now.
    assert relay.receive(1, Ready(1, 6)) == [(0, SnapshotRequest(1))]


def test_relay_gathers_a_metrics_scrape() -> None:
    relay = Relay()
    for i in range(3):
        relay.join(i)
        relay.receive(i, Ready(i, i))
    ask = MetricsRequest(0, 1)
    assert relay.receive(0, ask) == [(1, ask), (2, ask)]
    assert relay.receive(2, MetricsReply(0, 1, 2, "two")) == []
    assert relay.receive(1, MetricsReply(0, 1, 1, "one")) == [(0, MetricsBundle(1, ((1, "one"), (2, "two"))))]
    assert relay.expire(0, 1) == []  # answered already
    # A worker that does not answer in time is left out; a late answer is dropped.
    assert relay.receive(0, MetricsRequest(0, 2)) == [(1, MetricsRequest(0, 2)), (2, MetricsRequest(0, 2))]
    assert relay.receive(1, MetricsReply(0, 2, 1, "one")) == []
    assert relay.expire(0, 2) == [(0, MetricsBundle(2, ((1, "one"),)))]
    assert relay.receive(2, MetricsReply(0, 2, 2, "two")) == []
    # A worker that dies is not waited for.
    relay.receive(0, MetricsRequest(0, 3))
    relay.receive(1, MetricsReply(0, 3, 1, "one"))
    assert relay.leave(2) == [(0, MetricsBundle(3, ((1, "one"),)))]
    # Alone: an empty answer at once. A request in another's name is refused.
    relay.leave(1)
    assert relay.receive(0, MetricsRequest(0, 4)) == [(0, MetricsBundle(4))]
    assert relay.receive(0, MetricsRequest(1, 5)) == []


def test_expositions_are_merged_with_a_worker_label() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    def exposition(count: int) -> str:
        registry = CollectorRegistry()
        Counter("reqs", "Requests.", ["code"], registry=registry).labels("2xx").inc(count)
        Histogram("lat", "Latency.", buckets=(0.1, 1.0), registry=registry).observe(0.5)
        return generate_latest(registry).decode()

    text = merge_expositions({0: exposition(3), 1: exposition(4)}).decode()
    assert 'reqs_total{code="2xx",worker="0"} 3.0' in text
    assert 'reqs_total{code="2xx",worker="1"} 4.0' in text
    assert text.count("# TYPE reqs_total counter") == 1
    assert 'lat_bucket{le="1.0",worker="1"} 1.0' in text


def test_a_relayed_change_is_applied_once_and_not_sent_back() -> None:
    """Two workers' scheduler states wired through the relay as the I/O layer does: a change
    in one reaches the other with its signal; the receiver's own transition is not sent."""
    doc = pool_doc([{"url": "http://127.0.0.1:1", "name": "m"}], forcerecovery=False)
    spec = parse_pools(yaml.safe_dump(doc))[0]
    states = [PoolState(spec, now=0.0), PoolState(spec, now=0.0)]
    publishers = [Publisher(0), Publisher(1)]
    relay = Relay()
    wire: list[tuple[int, Any]] = []

    def listener(i: int) -> Any:
        def changed(member: MemberState, t: Transition) -> None:
            message = publishers[i].outgoing("test", member.name, t.before, t.after, t.signal,
                                             t.detail, member.error_duration)
            if message is not None:
                wire.extend(relay.receive(i, message))
        return changed

    for i, state in enumerate(states):
        relay.join(i)
        relay.receive(i, Ready(i, i))
        state.listeners.append(listener(i))
    states[1].by_name["m"].mark_error(10.0, "connect-error", "refused", duration=5.0)
    assert len(wire) == 1
    dest, message = wire.pop()
    assert dest == 0 and isinstance(message, Change) and message.duration == 5.0
    member = states[0].by_name["m"]
    plan = plan_change(member.flags, message)
    assert plan is not None
    member.error_time, member.error_duration = 10.0, message.duration
    with publishers[0].applying():
        member.change(*plan, 10.0, message.signal, remote_detail(message.detail, message.origin))
    assert wire == []  # applied, not echoed
    assert member.flags & E and member.last_change.signal == "connect-error"
    assert member.last_change.detail == "refused (from worker 1)"
    # The retry deadline is the sender's: not before 15.
    assert states[0].choose(14.0) is None
    assert states[0].choose(15.0) is member and bits_to_flags(member.flags) == ""


# ---------------------------------------------------------------------------------------------
# The real command


def wait_until(predicate: Any, timeout: float = 15.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if predicate():
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what}: not met in {timeout}s")


def fetch(url: str | urllib.request.Request, timeout: float = 10.0) -> tuple[int, str]:
    """One request on a fresh connection (urllib sends Connection: close)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Cluster:
    """``balancerpool proxy pool.yaml --workers 2`` with an admin listener and a JSON access log."""

    def __init__(self, tmp: Path, doc: dict[str, Any] | list[dict[str, Any]], workers: int = 2) -> None:
        self.tmp = tmp
        self.port, self.admin_port = free_port(), free_port()
        self.path = tmp / "pool.yaml"
        self.path.write_text(yaml.safe_dump_all(doc if isinstance(doc, list) else [doc]))
        self.token = secrets.token_urlsafe(24)
        (tmp / "tokens").write_text(self.token + "\n")
        self.access = tmp / "access.log"
        self.errors = tmp / "proxy.err"
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin = f"http://127.0.0.1:{self.admin_port}"
        with self.errors.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "balancerpool.proxy", "proxy", str(self.path),
                 "--listen", f"127.0.0.1:{self.port}", "--workers", str(workers),
                 "--admin", f"127.0.0.1:{self.admin_port}", "--admin-token-file", str(tmp / "tokens"),
                 "--access-log", str(self.access), "--access-log-format", "json"],
                stdout=subprocess.DEVNULL, stderr=err)
        self.count = workers
        self.jar = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def log(self) -> str:
        return self.errors.read_text()

    def wait_serving(self) -> None:
        wait_until(lambda: f"supervisor: {self.count} workers serving" in self.log(), 20,
                   "all workers ready")

    def pids(self) -> dict[int, int]:
        """The current pid of each worker index, from the supervisor's log."""
        found: dict[int, int] = {}
        for m in re.finditer(r"worker (\d+) (?:started|restarted) \(pid (\d+)\)", self.log()):
            found[int(m.group(1))] = int(m.group(2))
        return found

    def served(self) -> list[dict[str, Any]]:
        if not self.access.exists():
            return []
        return [json.loads(line) for line in self.access.read_text().splitlines() if line]

    def requests(self, n: int, path: str = "/", headers: dict[str, str] | None = None
                 ) -> list[dict[str, Any]]:
        """``n`` requests, each on its own connection; their access-log entries."""
        before = len(self.served())
        for _ in range(n):
            status, _ = fetch(urllib.request.Request(self.url + path, headers=headers or {}))
            assert status == 200
        wait_until(lambda: len(self.served()) >= before + n, what="access log written")
        return self.served()[before:]

    # --- the admin API (worker 0) ---------------------------------------------------------------

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.admin + path, data=data, method=method, headers={
            "Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
            **(headers or {})})
        with self.opener.open(request, timeout=10) as resp:
            return json.loads(resp.read())

    def member(self, name: str, pool: str = "test") -> dict[str, Any]:
        state = self._call("GET", f"/api/pools/{pool}/members/{name}")
        member: dict[str, Any] = state["member"]
        return member

    def change_member(self, name: str, changes: dict[str, Any], pool: str = "test") -> Any:
        state = self._call("GET", "/api/pools")
        nonce = next(p["nonce"] for p in state["pools"] if p["name"] == pool)
        return self._call("PATCH", f"/api/pools/{pool}/members/{name}", {**changes, "nonce": nonce},
                          {"X-CSRF-Token": state["csrf"], "Origin": self.admin})

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Any]:
    started: list[Cluster] = []

    def start(doc: dict[str, Any] | list[dict[str, Any]], workers: int = 2) -> Cluster:
        c = Cluster(tmp_path, doc, workers)
        started.append(c)
        c.wait_serving()
        return c

    yield start
    for c in started:
        pids = list(c.pids().values())
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
            try:
                c.proc.wait(30)
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait(10)
        for pid in pids:  # never leave a worker behind, whatever the test did
            if alive(pid) and "balancerpool.proxy" in _cmdline(pid):
                os.kill(pid, signal.SIGKILL)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def by_worker(entries: list[dict[str, Any]]) -> dict[int, set[int]]:
    """Worker index -> the pids that answered as it."""
    out: dict[int, set[int]] = {}
    for entry in entries:
        out.setdefault(entry["worker"], set()).add(entry["pid"])
    return out


def test_both_workers_serve_and_the_access_log_names_them(cluster: Any, backends: Backends) -> None:
    a, b = backends.start("a"), backends.start("b")
    c = cluster(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    pids = c.pids()
    assert sorted(pids) == [0, 1] and pids[0] != pids[1] != c.proc.pid
    entries = c.requests(40)
    # The kernel spread the connections (SO_REUSEPORT) over both workers; each line says which.
    assert by_worker(entries) == {0: {pids[0]}, 1: {pids[1]}}
    assert {e["member"] for e in entries} == {"a", "b"}
    # Only worker 0 has the admin listener; its /metrics has every worker's counters.
    assert fetch(c.admin + "/readyz") == (200, "ready\n")
    assert "admin listener" in c.log() and "[worker 1]: admin listener" not in c.log()
    status, metrics = fetch(c.admin + "/metrics")
    counts = {0: 0.0, 1: 0.0}
    for w, n in re.findall(r'balancerpool_requests_total\{code="2xx",member="[ab]",pool="test",'
                           r'worker="(\d)"\} (\S+)', metrics):
        counts[int(w)] += float(n)
    assert status == 200
    assert counts == {w: sum(1 for e in entries if e["worker"] == w) for w in (0, 1)}
    assert c.stop() == 0


def test_sessions_stick_whichever_worker_answers(cluster: Any, backends: Backends) -> None:
    """Nothing is shared for stickiness: the route is in the request, and lbmethod hash maps
    a key the same way in every worker."""
    a, b, x, y = (backends.start(n, route=n) for n in "abxy")
    sticky = pool_doc([{"url": a.url, "name": "a", "route": "a"}, {"url": b.url, "name": "b", "route": "b"}],
                      stickysession="ROUTEID")
    hashed = pool_doc([{"url": m.url, "name": m.name} for m in (a, b, x, y)], name="hashed",
                      routes=[{"path": "/h"}], lbmethod="hash", hash={"on": "header", "name": "X-User"})
    c = cluster([sticky, hashed])
    for route in "ab":
        entries = c.requests(30, headers={"Cookie": f"ROUTEID=.{route}"})
        assert set(by_worker(entries)) == {0, 1}
        assert {(e["member"], e["route_reason"]) for e in entries} == {(route, "sticky")}
    for user in ("ann", "bob", "cy"):
        entries = c.requests(20, "/h/x", headers={"X-User": user})
        assert set(by_worker(entries)) == {0, 1}
        assert len({e["member"] for e in entries}) == 1
    assert c.stop() == 0


def test_a_connect_error_in_one_worker_puts_the_member_in_error_in_all(
        cluster: Any, backends: Backends) -> None:
    a, b = backends.start("a"), backends.start("b")
    c = cluster(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b", "retry": "60s"}]))
    b.kill()  # SIGKILL
    # Requests until one worker tries b: its connect error fails the request over to a.
    seen: dict[str, Any] | None = None
    for _ in range(40):
        entry = c.requests(1)[0]
        if entry["attempts"] > 1:
            seen = entry
            break
        assert entry["member"] == "a"
    assert seen is not None, "no worker tried the dead member"
    finder = seen["worker"]
    # b is back at once, but every worker holds it in E for its retry time (60s): the other
    # worker never saw the error itself, and sends it nothing either.
    b.start()
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1}
    assert {e["member"] for e in entries} == {"a"}
    assert b.requests() == []
    state = c.member("b")
    assert "E" in state["flags"] and state["state"]["signal"] == "connect-error"
    if finder == 1:  # worker 0 (the admin's) learnt it over the bus, and says from where
        assert state["state"]["detail"].endswith("(from worker 1)")
    assert c.stop() == 0


def test_a_manager_change_in_worker_0_reaches_every_worker(cluster: Any, backends: Backends) -> None:
    a, b = backends.start("a"), backends.start("b")
    c = cluster(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    assert {e["member"] for e in c.requests(20)} == {"a", "b"}
    answer = c.change_member("b", {"status": "D"})
    assert answer["changed"].startswith("member b")
    wait_until(lambda: "[worker 1]: pool test: member b - -> D (manager: by token (from worker 0))"
               in c.log(), what="worker 1 applied the manager's change")
    served_by_b = len(b.requests())
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1}
    assert {e["member"] for e in entries} == {"a"}
    assert len(b.requests()) == served_by_b
    # A change of configuration (not a flag) reaches the others too: b back, with a's weight 3.
    c.change_member("b", {"status": ""})
    c.change_member("a", {"loadfactor": 3})
    wait_until(lambda: c.log().count("[worker 1]: applied the configuration changed in worker 0") >= 3,
               what="worker 1 applied the configuration")
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1}
    assert {e["member"] for e in entries} == {"a", "b"}
    assert c.stop() == 0


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child, *_descendants(child)]
    return found


def _socket_owner(client_port: int, server_port: int) -> int | None:
    """Which process started by this test holds the TCP connection from ``client_port`` to
    ``server_port`` (/proc/net/tcp gives the socket's inode, /proc/PID/fd who holds it)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if int(local.rsplit(":", 1)[1], 16) == client_port and \
                    int(remote.rsplit(":", 1)[1], 16) == server_port:
                inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in _descendants(os.getpid()):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


class WatchedBackend:
    """A backend in this test process that knows which process each request came from."""

    def __init__(self, name: str) -> None:
        self.health = 200
        self.seen: list[tuple[str, int | None]] = []
        watched = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                pid = _socket_owner(self.client_address[1], watched.port)
                watched.seen.append((self.path, pid))
                status = watched.health if self.path == "/health" else 200
                body = f"{name}\n".encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def probes(self) -> list[int | None]:
        return [pid for path, pid in list(self.seen) if path == "/health"]

    def traffic(self) -> list[int | None]:
        return [pid for path, pid in list(self.seen) if path != "/health"]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def watched() -> Iterator[WatchedBackend]:
    backend = WatchedBackend("h")
    yield backend
    backend.close()


def test_health_checks_run_in_worker_0_only_and_mark_c_everywhere(
        cluster: Any, backends: Backends, watched: WatchedBackend) -> None:
    a = backends.start("a")
    # Two failures in a row: a probe this busy test process answers late does not count.
    check = {"method": "GET", "uri": "/health", "interval": "200ms", "timeout": "200ms", "fails": 2}
    c = cluster(pool_doc([{"url": a.url, "name": "a"}, {"url": watched.url, "name": "h"}],
                         healthCheck=check))
    pids = c.pids()
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1} and {e["member"] for e in entries} == {"a", "h"}
    # Both workers send h traffic; only worker 0 probes it.
    assert set(watched.traffic()) == {pids[0], pids[1]}
    wait_until(lambda: len(watched.probes()) >= 5, what="probes")
    assert set(watched.probes()) == {pids[0]}

    watched.health = 503
    wait_until(lambda: "C" in c.member("h")["flags"], what="worker 0 marked h C")
    wait_until(lambda: "[worker 1]: pool test: member h - -> C (health-check: GET /health: status 503"
               in c.log(), what="worker 1 applied C")
    traffic = len(watched.traffic())
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1} and {e["member"] for e in entries} == {"a"}
    assert len(watched.traffic()) == traffic  # no worker sent h anything

    watched.health = 200
    wait_until(lambda: "C" not in c.member("h")["flags"], what="worker 0 cleared C")
    wait_until(lambda: {e["worker"] for e in c.requests(10) if e["member"] == "h"} == {0, 1},
               what="both workers use h again")
    assert set(watched.probes()) == {pids[0]}  # still worker 0 alone
    assert c.stop() == 0


def test_sighup_reloads_every_worker_and_sigterm_stops_them_gracefully(
        cluster: Any, backends: Backends) -> None:
    a, b = backends.start("a"), backends.start("b")
    c = cluster(pool_doc([{"url": a.url, "name": "a"}]))
    pids = c.pids()
    assert {e["member"] for e in c.requests(10)} == {"a"}
    # The file is unchanged (its watcher would not reload): the reloads are SIGHUP's.
    c.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: all(f"[worker {i}]: {c.path}: configuration reloaded (generation 2)" in c.log()
                           for i in (0, 1)), what="both workers reloaded")
    c.path.write_text(yaml.safe_dump(pool_doc([{"url": b.url, "name": "b"}])))
    c.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: all(f"[worker {i}]: {c.path}: configuration reloaded (generation 3)" in c.log()
                           for i in (0, 1)), what="both workers reloaded the new file")
    entries = c.requests(30)
    assert set(by_worker(entries)) == {0, 1} and {e["member"] for e in entries} == {"b"}

    # SIGTERM: the requests in flight finish, every worker stops, the supervisor exits 0.
    results: list[tuple[int, str]] = []
    slow = [threading.Thread(target=lambda: results.append(fetch(c.url + "/slow?s=1.5")))
            for _ in range(6)]
    for thread in slow:
        thread.start()
    wait_until(lambda: sum(r["path"].startswith("/slow") for r in b.requests()) == 6,
               what="slow requests in flight")
    started = time.monotonic()
    assert c.stop() == 0
    for thread in slow:
        thread.join(10)
    assert results == [(200, "b\n")] * 6
    assert time.monotonic() - started < 10
    assert not any(alive(pid) for pid in pids.values())
    assert "supervisor: all workers stopped" in c.log()


def test_a_killed_worker_is_restarted_with_the_shared_state(cluster: Any, backends: Backends) -> None:
    a, b = backends.start("a"), backends.start("b")
    c = cluster(pool_doc([{"url": a.url, "name": "a"}, {"url": b.url, "name": "b"}]))
    first = c.pids()
    c.change_member("b", {"status": "D"})  # made in worker 0, held by worker 1 too
    wait_until(lambda: "[worker 1]: pool test: member b - -> D" in c.log(), what="relayed")

    os.kill(first[1], signal.SIGKILL)
    # Reaped: every thread of it gone, its listening socket closed. (Connections the kernel had
    # queued on that socket are reset: SO_REUSEPORT, without net.ipv4.tcp_migrate_req.)
    wait_until(lambda: f"worker 1 (pid {first[1]}) died: killed by SIGKILL" in c.log(),
               what="worker 1 reaped")
    # The port keeps being served (by worker 0 alone) while worker 1 is restarted.
    entries = c.requests(20)
    assert by_worker(entries) == {0: {first[0]}}
    wait_until(lambda: c.pids()[1] != first[1] and
               f"worker 1 ready (pid {c.pids()[1]})" in c.log(), what="worker 1 restarted")
    wait_until(lambda: "[worker 1]: state copied from worker 0" in c.log(), what="snapshot")
    second = c.pids()
    # The new worker 1 starts from the file (b enabled) and copies worker 0's state: b stays D.
    entries = c.requests(40)
    assert by_worker(entries) == {0: {second[0]}, 1: {second[1]}}
    assert {e["member"] for e in entries} == {"a"}

    # Worker 0 (the admin's) too: restarted, it copies worker 1's state and configuration.
    os.kill(second[0], signal.SIGKILL)
    wait_until(lambda: f"worker 0 (pid {second[0]}) died" in c.log(), what="worker 0 reaped")
    wait_until(lambda: c.pids()[0] != second[0] and f"worker 0 ready (pid {c.pids()[0]})" in c.log(),
               what="worker 0 restarted")
    wait_until(lambda: fetch(c.admin + "/readyz")[0] == 200, what="admin back")
    wait_until(lambda: "[worker 0]: state copied from worker 1" in c.log(), what="snapshot")
    state = c.member("b")
    assert state["flags"] == "D" and state["status"] == "D"
    entries = c.requests(40)
    assert set(by_worker(entries)) == {0, 1} and {e["member"] for e in entries} == {"a"}
    assert c.stop() == 0


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path, backends: Backends) -> None:
    a = backends.start("a")
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a"}])))
    taken = free_port()
    with subprocess.Popen([sys.executable, "-c", "import socket, sys, time; s = socket.socket(); "
                           f"s.bind(('127.0.0.1', {taken})); s.listen(); print('ok', flush=True); "
                           "time.sleep(60)"], stdout=subprocess.PIPE) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"ok\n"
            # The admin port is taken: worker 0 fails to start, and the supervisor gives up.
            proc = subprocess.run(
                [sys.executable, "-m", "balancerpool.proxy", "proxy", str(path), "--listen",
                 f"127.0.0.1:{free_port()}", "--workers", "2", "--admin", f"127.0.0.1:{taken}"],
                capture_output=True, timeout=60)
        finally:
            holder.kill()
    assert proc.returncode == 1
    assert b"worker 0 (pid" in proc.stderr and b"failed to start" in proc.stderr
    # An invalid file is refused by the supervisor itself, before any worker starts.
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a", "loadfactor": 250}])))
    proc = subprocess.run([sys.executable, "-m", "balancerpool.proxy", "proxy", str(path),
                           "--workers", "2", "--admin", "off"], capture_output=True, timeout=60)
    assert proc.returncode == 1 and b"must be 1..100, got 250" in proc.stderr
    assert b"worker 0" not in proc.stderr
    # Port 0 would give each worker a port of its own.
    path.write_text(yaml.safe_dump(pool_doc([{"url": a.url, "name": "a"}])))
    proc = subprocess.run([sys.executable, "-m", "balancerpool.proxy", "proxy", str(path), "--listen",
                           "127.0.0.1:0", "--workers", "2", "--admin", "off"],
                          capture_output=True, timeout=60)
    assert proc.returncode == 1 and b"needs a fixed port" in proc.stderr
