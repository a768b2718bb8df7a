"""``balancerpool proxy FILE --workers N``: a supervisor process and N worker processes.

The supervisor (the parent) checks the file, starts the workers (each ``python -m
balancerpool.proxy`` with the same arguments plus its index and one end of a socketpair), and
then only relays state and watches: a worker that dies is started again after a short backoff;
SIGHUP is passed on to every worker; SIGTERM or SIGINT stops them all gracefully (each finishes
its requests in flight) and the supervisor exits 0.

Each worker is the normal single-process proxy (``ProxyServer`` and its ``Forwarder``) with its
listeners bound with SO_REUSEPORT, so that the kernel spreads new connections over the workers.
Worker 0 alone runs the active health checks and the admin listener (balancer-manager,
``/metrics``, probes, ``--persist``). Member state is shared through the supervisor: the pure
part (messages, what is sent, what is applied, who gets what) is :mod:`.statebus`; this module
moves the bytes: one JSON line per message over the socketpairs. Nothing here runs per request:
a worker sends only when a member's flags actually change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import accesslog
from .model import InvalidBalancerPool, parse_pools
from .scheduling import E, MemberState, Transition, bits_to_flags
from .statebus import (
    MAX_LINE,
    BusError,
    Change,
    Config,
    MemberStatus,
    Message,
    MetricsBundle,
    MetricsReply,
    MetricsRequest,
    Outgoing,
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

if TYPE_CHECKING:
    from .forward import Pool
    from .model import BalancerPool
    from .server import ProxyServer

log = logging.getLogger("balancerpool.workers")

#: Seconds the workers get to finish their requests on SIGTERM before they are killed.
STOP_GRACE = 20.0
#: A worker that served this long before dying was not crash-looping: its backoff starts over.
STEADY = 10.0
#: Seconds a /metrics scrape waits for the other workers' expositions (a stuck worker is left
#: out of that scrape rather than hold it up).
METRICS_WAIT = 1.0


def worker_count(text: str) -> int:
    """``--workers``: a positive number, or ``auto`` for one per CPU this process may use."""
    if text == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # pragma: no cover - not Linux
            return max(1, os.cpu_count() or 1)
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of processes or 'auto', got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"want at least 1 worker, got {count}")
    return count


# ---------------------------------------------------------------------------------------------
# The supervisor


def supervise(pools: list[BalancerPool], argv: Sequence[str], count: int,
              listen: tuple[str, int] | None = None) -> int:
    """Run ``count`` workers with the command line ``argv`` until SIGTERM/SIGINT (``pools``:
    the file, already checked); the exit status. ``listen``: the ``--listen`` override, if any."""
    addresses = [listen] if listen is not None else [p.listen for p in pools if p.listen is not None]
    if any(port == 0 for _, port in addresses):
        # Each worker would get a port of its own.
        print("balancerpool: --workers needs a fixed port to share, not port 0", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Supervisor(argv, count).run())
    except OSError as exc:
        print(f"balancerpool: cannot start the workers: {exc}", file=sys.stderr)
        return 1


@dataclass(slots=True)
class _Slot:
    """One worker index and its current process."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    started: float = 0.0
    ready: bool = False
    #: Deaths in a row, each within STEADY seconds of its start (for the backoff).
    failures: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


class Supervisor:
    """Starts, watches and restarts the workers and relays their state changes."""

    def __init__(self, argv: Sequence[str], count: int, python: str = sys.executable) -> None:
        self.argv = list(argv)
        self.python = python
        self.relay = Relay()
        self.slots = [_Slot(i) for i in range(count)]
        self.stopping = False
        self.failed = False
        #: Every worker of the first start has been ready once: from then on a death is restarted.
        self.started = False
        self._stop: asyncio.Event | None = None

    def command(self, index: int, fd: int) -> list[str]:
        return [self.python, "-m", "balancerpool.proxy", *self.argv,
                "--worker-index", str(index), "--bus-fd", str(fd)]

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        log.info("supervisor (pid %d) starting %d workers", os.getpid(), len(self.slots))
        try:
            for slot in self.slots:
                self.relay.join(slot.index)
            for slot in self.slots:
                await self._spawn(slot, restarted=False)
            await stop.wait()
        finally:
            await self._shutdown()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        log.info("supervisor: all workers stopped")
        return 1 if self.failed else 0

    async def _spawn(self, slot: _Slot, restarted: bool) -> None:
        ours, theirs = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(*self.command(slot.index, theirs.fileno()),
                                                        pass_fds=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.relay.join(slot.index, restarted)
        reader, writer = await asyncio.open_connection(sock=ours, limit=MAX_LINE)
        slot.proc, slot.writer, slot.ready = proc, writer, False
        slot.started = asyncio.get_running_loop().time()
        log.info("worker %d %s (pid %d)", slot.index, "restarted" if restarted else "started", proc.pid)
        reading = self._task(slot, self._read(slot, reader))
        self._task(slot, self._watch(slot, proc, reading))
        if self.stopping:  # a restart that crossed SIGTERM: stop it with the others
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def _task(self, slot: _Slot, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)
        return task

    async def _read(self, slot: _Slot, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await reader.readline()
            except (ValueError, ConnectionError) as exc:
                log.error("worker %d: bus read failed: %s", slot.index, exc)
                return
            if not line:
                return
            try:
                message = decode(line)
            except BusError as exc:
                log.warning("worker %d: ignored a bad bus message: %s", slot.index, exc)
                continue
            if isinstance(message, Ready):
                slot.ready = True
                log.info("worker %d ready (pid %d)", slot.index, message.pid)
                if not self.started and all(s.ready for s in self.slots):
                    self.started = True
                    log.info("supervisor: %d workers serving", len(self.slots))
            self._send(self.relay.receive(slot.index, message))
            if isinstance(message, MetricsRequest):
                asyncio.get_running_loop().call_later(METRICS_WAIT, self._expire, slot.index,
                                                      message.id)

    def _expire(self, requester: int, number: int) -> None:
        self._send(self.relay.expire(requester, number))

    def _send(self, outgoing: list[Outgoing]) -> None:
        for index, message in outgoing:
            writer = self.slots[index].writer
            if writer is not None and not writer.is_closing():
                writer.write(encode(message))

    async def _watch(self, slot: _Slot, proc: asyncio.subprocess.Process,
                     reading: asyncio.Task[None]) -> None:
        code = await proc.wait()
        # Whatever it sent before dying is relayed before it counts as gone.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), 2.0)
        reading.cancel()
        if slot.writer is not None:
            slot.writer.close()
        slot.proc = slot.writer = None
        was_ready, slot.ready = slot.ready, False
        self._send(self.relay.leave(slot.index))
        how = _exit_status(code)
        if self.stopping:
            log.info("worker %d (pid %d) stopped: %s", slot.index, proc.pid, how)
            return
        if not self.started and not was_ready:
            log.error("worker %d (pid %d) failed to start: %s; stopping", slot.index, proc.pid, how)
            self.failed = True
            assert self._stop is not None
            self._stop.set()
            return
        loop = asyncio.get_running_loop()
        if loop.time() - slot.started >= STEADY:
            slot.failures = 0
        delay = backoff(slot.failures)
        slot.failures += 1
        log.error("worker %d (pid %d) died: %s; restarting it in %gs", slot.index, proc.pid, how, delay)
        while not self.stopping:
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._spawn(slot, restarted=True)
                return
            except OSError as exc:
                delay = backoff(slot.failures)
                slot.failures += 1
                log.error("worker %d could not be started (%s); trying again in %gs", slot.index,
                          exc, delay)

    def _reload(self) -> None:
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        log.info("SIGHUP: reloading %d workers", len(live))
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGHUP)

    async def _shutdown(self) -> None:
        """SIGTERM to every worker (by PID), then SIGKILL to those still there after the grace."""
        self.stopping = True
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(p.wait()) for p in live]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=STOP_GRACE)
            if pending:
                for proc in live:
                    if proc.returncode is None:
                        log.error("worker pid %d did not stop in %gs: killing it", proc.pid, STOP_GRACE)
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                await asyncio.wait(waits, timeout=5.0)
        tasks = [t for s in self.slots for t in s.tasks]
        # The watchers log each worker's end; anything still waiting (a backoff) is cancelled.
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=3.0)
            for task in still:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self.slots:
            if slot.writer is not None:
                slot.writer.close()


def _exit_status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# ---------------------------------------------------------------------------------------------
# A worker's end of the bus


class WorkerBus:
    """A worker's connection to the supervisor: sends its own member state changes, applies
    the other workers', answers snapshot requests; sets ``stopped`` when the supervisor is gone."""

    def __init__(self, server: ProxyServer, index: int, fd: int) -> None:
        self.server = server
        self.index = index
        self.publisher = Publisher(index)
        self.stopped = asyncio.Event()
        self._sock = socket.socket(fileno=fd)
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None
        self._task: asyncio.Task[None] | None = None
        self._scrapes = 0
        self._pending: dict[int, asyncio.Future[MetricsBundle]] = {}

    async def connect(self) -> None:
        """Open the bus and hook the forwarder (before its first configuration is applied, so
        that every pool reports its changes)."""
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=MAX_LINE)
        self.server.forwarder.on_member_change = self._local

    def start(self) -> None:
        """The worker serves: say so, and apply what the others send from now on."""
        self._send(Ready(self.index, os.getpid()))
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def close(self) -> None:
        self.server.forwarder.on_member_change = None
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    def _send(self, message: Message) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(encode(message))

    # --- out ---------------------------------------------------------------------------------

    def _local(self, pool: Pool, member: MemberState, change: Transition) -> None:
        """A PoolState listener: called only when a member's flags change."""
        message = self.publisher.outgoing(pool.spec.name, member.name, change.before, change.after,
                                          change.signal, change.detail, member.error_duration)
        if message is not None:
            self._send(message)

    def config_applied(self, specs: list[BalancerPool]) -> None:
        """The balancer-manager changed the configuration (Manager.on_applied): the other workers
        apply the same one."""
        from .persist import dump

        if self.publisher.muted:
            return
        try:
            text = dump(specs)
        except ValueError as exc:  # pragma: no cover - persist.dump's own round-trip check
            log.error("the changed configuration cannot be sent to the other workers: %s", exc)
            return
        self._send(Config(self.index, text))

    # --- in ----------------------------------------------------------------------------------

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readline()
            except (ValueError, ConnectionError) as exc:
                log.error("bus read failed: %s", exc)
                line = b""
            if not line:
                log.warning("the supervisor is gone: stopping")
                self.stopped.set()
                return
            try:
                self.handle(decode(line))
            except BusError as exc:
                log.warning("ignored a bad bus message: %s", exc)
            except Exception:  # pragma: no cover - never let the bus die
                log.exception("a bus message could not be applied")

    def handle(self, message: Message) -> None:
        if isinstance(message, Change):
            self.apply_change(message)
        elif isinstance(message, Config):
            self.apply_config(message.text, f"worker {message.origin}")
        elif isinstance(message, SnapshotRequest):
            self._send(self.snapshot(message.target))
        elif isinstance(message, Snapshot):
            self.apply_snapshot(message)
        elif isinstance(message, MetricsRequest):
            from . import metrics

            text = metrics.enable(self.server.forwarder).render().decode()
            self._send(MetricsReply(message.requester, message.id, self.index, text))
        elif isinstance(message, MetricsBundle):
            future = self._pending.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)

    async def gather_metrics(self, own: bytes) -> bytes:
        """Manager.gather_metrics: this worker's exposition and every other worker's, merged,
        each sample with a ``worker`` label."""
        self._scrapes += 1
        number = self._scrapes
        future: asyncio.Future[MetricsBundle] = asyncio.get_running_loop().create_future()
        self._pending[number] = future
        self._send(MetricsRequest(self.index, number))
        texts = {self.index: own.decode()}
        try:
            bundle = await asyncio.wait_for(future, METRICS_WAIT + 1.0)
            texts.update(bundle.texts)
        except TimeoutError:
            log.warning("/metrics: no answer from the supervisor; serving worker %d's alone",
                        self.index)
        finally:
            self._pending.pop(number, None)
        return merge_expositions(texts)

    def _member(self, pool_name: str, member_name: str) -> MemberState | None:
        pool = self.server.forwarder.pools.get(pool_name)
        return pool.state.by_name.get(member_name) if pool is not None else None

    def apply_change(self, change: Change) -> None:
        member = self._member(change.pool, change.member)
        if member is None:
            log.debug("bus: no member %s in pool %s here", change.member, change.pool)
            return
        plan = plan_change(member.flags, change)
        if plan is None:
            return
        add, remove = plan
        now = self.server.forwarder.clock()
        if add & E:
            member.error_time = now
            member.error_duration = change.duration if change.duration is not None else member.spec.retry
        with self.publisher.applying():
            member.change(add, remove, now, change.signal, remote_detail(change.detail, change.origin))

    def apply_config(self, text: str, source: str) -> None:
        forwarder = self.server.forwarder
        try:
            specs = parse_pools(text)
            if specs == [p.spec for p in forwarder.pools.values()]:
                return
            with self.publisher.applying():
                forwarder.apply(specs)
        except (InvalidBalancerPool, OSError, ValueError) as exc:
            log.error("the configuration from %s could not be applied: %s", source, exc)
            return
        log.info("applied the configuration changed in %s", source)

    def snapshot(self, target: int) -> Snapshot:
        from .persist import dump

        forwarder = self.server.forwarder
        now = forwarder.clock()
        members = []
        for name, pool in forwarder.pools.items():
            for m in pool.state.members:
                remaining = max(0.0, m.error_time + m.error_duration - now) if m.flags & E else None
                last = m.last_change
                members.append(MemberStatus(name, m.name, bits_to_flags(m.flags), remaining,
                                            last.signal, last.detail))
        return Snapshot(self.index, target, dump([p.spec for p in forwarder.pools.values()]),
                        tuple(members))

    def apply_snapshot(self, snapshot: Snapshot) -> None:
        """Become like worker ``snapshot.origin``: its flags (so that the changes carry their
        own signal), its configuration, then the flags of members only that configuration has."""
        self._apply_statuses(snapshot)
        self.apply_config(snapshot.config, f"worker {snapshot.origin}")
        self._apply_statuses(snapshot)
        log.info("state copied from worker %d", snapshot.origin)

    def _apply_statuses(self, snapshot: Snapshot) -> None:
        now = self.server.forwarder.clock()
        for status in snapshot.members:
            member = self._member(status.pool, status.member)
            if member is None:
                continue
            plan = plan_snapshot(member.flags, status)
            if status.remaining is not None:
                member.error_time = now
                member.error_duration = status.remaining
            if plan is None:
                continue
            with self.publisher.applying():
                member.change(plan[0], plan[1], now, status.signal,
                              remote_detail(status.detail, snapshot.origin, "copied from"))


def merge_expositions(texts: dict[int, str]) -> bytes:
    """One Prometheus text exposition from several workers': every sample gets a ``worker``
    label (its index), families of the same name are joined."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for worker, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation,
                                                        family.type, family.unit)
            merged.samples += [sample._replace(labels={**sample.labels, "worker": str(worker)})
                               for sample in family.samples]

    class Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


# ---------------------------------------------------------------------------------------------
# Which worker answered: the access log says


class _WorkerFields(logging.Formatter):
    """Appends the worker's index and pid to every access-log line (a ``key=value`` field in
    the plain format, two more keys in JSON)."""

    def __init__(self, index: int, pid: int, plain: bool) -> None:
        super().__init__("%(message)s")
        self.plain = plain
        self.suffix = f" worker={index} pid={pid}" if plain else f',"worker":{index},"pid":{pid}}}'

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.plain:
            return line + self.suffix
        return line[:-1] + self.suffix if line.endswith("}") else line


def tag_access_log(index: int, plain: bool) -> None:
    """Call after ``accesslog.configure``: its lines name this worker."""
    for handler in accesslog.logger.handlers:
        handler.setFormatter(_WorkerFields(index, os.getpid(), plain))
