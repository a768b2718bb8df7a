"""The state bus of ``balancerpool proxy --workers N``: its messages and every decision about
them, with no I/O (:mod:`.workers` moves the bytes).

Each worker process has its own scheduler state. What must agree across workers is a member's
status flags: ``E`` after a connect error, ``failonstatus``, an outlier ejection; ``C`` from the
health checks (run by worker 0 only); the manager's ``D N H S I R`` (its listener runs in worker 0
only); a retry or forcerecovery clearing ``E``. So every local :meth:`MemberState.change` of a
worker becomes a :class:`Change`, sent to the supervisor, which relays it to every other worker
(:class:`Relay`); they apply it with the same flags and signal, and do not send it again
(:class:`Publisher`). ``config`` transitions are never sent: every worker derives them from the
same file. Counters (elected, busy, bytes, errors, lbstatus) stay per worker. A change the
balancer-manager makes to the configuration itself (a loadfactor, a new member) travels whole, as
a :class:`Config`.

A worker that is restarted starts from the file, then copies the state of a running worker (a
:class:`Snapshot`, worker 0 preferred); changes relayed meanwhile are held and delivered after it.

Worker 0's ``/metrics`` asks the others for their expositions (:class:`MetricsRequest`), and the
supervisor answers with those that came in time (:class:`MetricsBundle`).

Ordering: each worker applies its own changes at once and the others' as they arrive, so two
opposite changes of one member made at the same moment in two workers (a retry here, a connect
error there) can leave them apart until that member's next error or retry, as httpd's shared
scoreboard would (last writer wins).

The wire format is one JSON object per line, ``{"type": ..., fields...}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .scheduling import FLAG_BITS, E, flags_to_bits

#: Transitions every worker makes by itself, from the same file: never sent.
LOCAL_SIGNALS = frozenset({"config"})
#: The longest line accepted (a snapshot carries the whole configuration).
MAX_LINE = 64 * 1024 * 1024


class BusError(ValueError):
    """A line that is not a valid message."""


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker serves (its listeners are bound, its configuration applied)."""

    worker: int
    pid: int


@dataclass(frozen=True, slots=True)
class Change:
    """One member's flags changed in worker ``origin``, from ``before`` to ``after``."""

    origin: int
    pool: str
    member: str
    before: str
    after: str
    signal: str
    detail: str = ""
    #: Seconds the member stays in E (its retry time, or an outlier's ejection time), sent when
    #: the change sets E, so that the receivers retry it no earlier than the sender.
    duration: float | None = None

    @property
    def added(self) -> int:
        return flags_to_bits(self.after) & ~flags_to_bits(self.before)

    @property
    def removed(self) -> int:
        return flags_to_bits(self.before) & ~flags_to_bits(self.after)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration in force in worker ``origin`` (BalancerPool YAML), after a change
    made at run time (the balancer-manager) that the file does not hold."""

    origin: int
    text: str


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Supervisor to a worker: send your state for worker ``target``."""

    target: int


@dataclass(frozen=True, slots=True)
class MemberStatus:
    """One member's flags in a snapshot, with the last change that set them."""

    pool: str
    member: str
    flags: str
    #: Seconds left in E (None: not in E).
    remaining: float | None
    signal: str
    detail: str


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of worker ``origin``, for the (re)started worker ``target``."""

    origin: int
    target: int
    config: str
    members: tuple[MemberStatus, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class MetricsRequest:
    """A scrape of worker ``requester``'s ``/metrics``: the other workers' expositions, please.
    From that worker to the supervisor, and from the supervisor to each other worker."""

    requester: int
    id: int


@dataclass(frozen=True, slots=True)
class MetricsReply:
    """Worker ``worker``'s Prometheus text exposition, for scrape ``id`` of ``requester``."""

    requester: int
    id: int
    worker: int
    text: str


@dataclass(frozen=True, slots=True)
class MetricsBundle:
    """Supervisor to the requester: the expositions of every worker that answered in time."""

    id: int
    texts: tuple[tuple[int, str], ...] = ()


Message = (Ready | Change | Config | SnapshotRequest | Snapshot | MetricsRequest | MetricsReply
           | MetricsBundle)
_TYPES: dict[str, type[Any]] = {"ready": Ready, "change": Change, "config": Config,
                                "snapshot-request": SnapshotRequest, "snapshot": Snapshot,
                                "metrics-request": MetricsRequest, "metrics-reply": MetricsReply,
                                "metrics-bundle": MetricsBundle}
_NAMES = {cls: name for name, cls in _TYPES.items()}


def encode(message: Message) -> bytes:
    """One line of JSON."""
    body = {"type": _NAMES[type(message)], **asdict(message)}
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes | str) -> Message:
    """The message of one line; raises BusError for anything else."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BusError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BusError("not a JSON object")
    kind = data.pop("type", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise BusError(f"unknown message type {kind!r}")
    r = _Fields(data, kind)
    message: Message
    if cls is Ready:
        message = Ready(r.index("worker"), r.index("pid"))
    elif cls is Change:
        message = Change(r.index("origin"), r.text("pool"), r.text("member"), r.flags("before"),
                         r.flags("after"), r.text("signal"), r.text("detail"), r.seconds("duration"))
    elif cls is Config:
        message = Config(r.index("origin"), r.text("text"))
    elif cls is SnapshotRequest:
        message = SnapshotRequest(r.index("target"))
    elif cls is MetricsRequest:
        message = MetricsRequest(r.index("requester"), r.index("id"))
    elif cls is MetricsReply:
        message = MetricsReply(r.index("requester"), r.index("id"), r.index("worker"), r.text("text"))
    elif cls is MetricsBundle:
        texts = data.get("texts")
        if not isinstance(texts, list) or not all(
                isinstance(t, list) and len(t) == 2 and isinstance(t[0], int)
                and not isinstance(t[0], bool) and t[0] >= 0 and isinstance(t[1], str) for t in texts):
            raise BusError("metrics-bundle: texts must be a list of [worker, text]")
        message = MetricsBundle(r.index("id"), tuple((t[0], t[1]) for t in texts))
    else:
        members = data.get("members")
        if not isinstance(members, list):
            raise BusError("snapshot: members must be a list")
        statuses = []
        for i, item in enumerate(members):
            if not isinstance(item, dict):
                raise BusError(f"snapshot: members[{i}] must be an object")
            m = _Fields(item, f"snapshot members[{i}]")
            statuses.append(MemberStatus(m.text("pool"), m.text("member"), m.flags("flags"),
                                         m.seconds("remaining"), m.text("signal"), m.text("detail")))
        message = Snapshot(r.index("origin"), r.index("target"), r.text("config"), tuple(statuses))
    return message


class _Fields:
    """Typed access to a decoded object's fields, naming the bad one."""

    def __init__(self, data: dict[str, Any], what: str) -> None:
        self.data = data
        self.what = what

    def _bad(self, name: str, want: str) -> BusError:
        return BusError(f"{self.what}: {name} must be {want}, got {self.data.get(name)!r}")

    def index(self, name: str) -> int:
        value = self.data.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._bad(name, "a non-negative integer")
        return value

    def text(self, name: str) -> str:
        value = self.data.get(name)
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def flags(self, name: str) -> str:
        value = self.text(name)
        if any(f not in FLAG_BITS for f in value):
            raise self._bad(name, f"status flags ({''.join(FLAG_BITS)})")
        return value

    def seconds(self, name: str) -> float | None:
        value: object = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) \
                or value < 0:
            raise self._bad(name, "a duration in seconds or null")
        return float(value)


# ---------------------------------------------------------------------------------------------
# The worker's side


class Publisher:
    """Decides which of a worker's own transitions go on the bus: every flag change but the
    ``config`` ones, and none made while applying what came from the bus (no echo, no loop)."""

    def __init__(self, worker: int) -> None:
        self.worker = worker
        self._applying = 0

    @contextmanager
    def applying(self) -> Iterator[None]:
        """Changes made inside come from another worker: they are not sent again."""
        self._applying += 1
        try:
            yield
        finally:
            self._applying -= 1

    @property
    def muted(self) -> bool:
        return self._applying > 0

    def outgoing(self, pool: str, member: str, before: str, after: str, signal: str, detail: str,
                 error_duration: float) -> Change | None:
        """The message for a local transition, or None when it must not be sent."""
        if self._applying or signal in LOCAL_SIGNALS or before == after:
            return None
        sets_e = bool(flags_to_bits(after) & ~flags_to_bits(before) & E)
        return Change(self.worker, pool, member, before, after, signal, detail,
                      float(error_duration) if sets_e else None)


def plan_change(current: int, change: Change) -> tuple[int, int] | None:
    """The flags to add and to remove on a member whose flags are ``current`` for a change made
    elsewhere (its own delta: ``E`` added there is added here, whatever else is set); None when
    it changes nothing here."""
    add, remove = change.added & ~current, change.removed & current
    return (add, remove) if add or remove else None


def plan_snapshot(current: int, status: MemberStatus) -> tuple[int, int] | None:
    """The flags to add and to remove so that a member's flags become the snapshot's."""
    target = flags_to_bits(status.flags)
    add, remove = target & ~current, current & ~target
    return (add, remove) if add or remove else None


def remote_detail(detail: str, origin: int, how: str = "from") -> str:
    """The transition's detail in a receiving worker: says where it happened."""
    where = f"{how} worker {origin}"
    return f"{detail} ({where})" if detail else where


# ---------------------------------------------------------------------------------------------
# The supervisor's side

#: (destination worker, message)
Outgoing = tuple[int, Message]


@dataclass(slots=True)
class _Waiting:
    source: int | None = None
    held: list[Message] = field(default_factory=list)


@dataclass(slots=True)
class _Scrape:
    waiting: set[int]
    texts: dict[int, str] = field(default_factory=dict)


class Relay:
    """The supervisor's switchboard: who gets what.

    A change or configuration from one worker goes to every other connected worker (never back
    to its sender). A restarted worker is first brought up to date: once it is ready, the lowest
    ready worker that is not itself waiting is asked for a snapshot; what is relayed to the
    restarted worker in the meantime is held and delivered after the snapshot, so that nothing
    newer is overwritten by it. With nobody to copy from, it keeps the file's state.

    A metrics scrape of one worker is passed to every other ready worker; their answers go back
    together once all have answered, or when the supervisor calls :meth:`expire`."""

    def __init__(self) -> None:
        self.connected: set[int] = set()
        self.ready: set[int] = set()
        self.waiting: dict[int, _Waiting] = {}
        #: Scrapes in progress by (requester, id).
        self.scrapes: dict[tuple[int, int], _Scrape] = {}

    def join(self, worker: int, restarted: bool = False) -> None:
        """A worker process was started (``restarted``: it replaces one that died)."""
        self.connected.add(worker)
        self.ready.discard(worker)
        if restarted:
            self.waiting[worker] = _Waiting()
        else:
            self.waiting.pop(worker, None)

    def leave(self, worker: int) -> list[Outgoing]:
        """A worker process is gone; whoever waited for its snapshot asks another."""
        self.connected.discard(worker)
        self.ready.discard(worker)
        self.waiting.pop(worker, None)
        out: list[Outgoing] = []
        for target in [t for t, w in self.waiting.items() if w.source == worker]:
            out += self._sync(target)
        for key, scrape in list(self.scrapes.items()):
            if key[0] == worker:
                del self.scrapes[key]
            elif worker in scrape.waiting:
                scrape.waiting.discard(worker)
                if not scrape.waiting:
                    out += self.expire(*key)
        return out

    def receive(self, sender: int, message: Message) -> list[Outgoing]:
        """What to send, and to whom, for a message from worker ``sender``."""
        if sender not in self.connected:
            return []
        if isinstance(message, Ready):
            self.ready.add(sender)
            waiting = self.waiting.get(sender)
            if waiting is not None and waiting.source is None:
                return self._sync(sender)
            return []
        if isinstance(message, Change | Config):
            out: list[Outgoing] = []
            for worker in sorted(self.connected - {sender}):
                waiting = self.waiting.get(worker)
                if waiting is not None:
                    waiting.held.append(message)
                else:
                    out.append((worker, message))
            return out
        if isinstance(message, Snapshot):
            waiting = self.waiting.get(message.target)
            if waiting is None or waiting.source != sender:
                return []  # a late answer (the target died, or another was asked)
            return [(message.target, message), *self._release(message.target)]
        if isinstance(message, MetricsRequest):
            if message.requester != sender:
                return []
            asked = sorted(self.ready - {sender})
            if not asked:
                return [(sender, MetricsBundle(message.id))]
            self.scrapes[(sender, message.id)] = _Scrape(set(asked))
            return [(worker, message) for worker in asked]
        if isinstance(message, MetricsReply):
            key = (message.requester, message.id)
            scrape = self.scrapes.get(key)
            if scrape is None or sender not in scrape.waiting or message.worker != sender:
                return []  # late (expired), or not asked
            scrape.waiting.discard(sender)
            scrape.texts[sender] = message.text
            return self.expire(*key) if not scrape.waiting else []
        return []  # a snapshot request or a bundle is the supervisor's own message

    def expire(self, requester: int, id: int) -> list[Outgoing]:
        """Answer scrape ``id`` of ``requester`` with what it has (nothing if it is over)."""
        scrape = self.scrapes.pop((requester, id), None)
        if scrape is None:
            return []
        return [(requester, MetricsBundle(id, tuple(sorted(scrape.texts.items()))))]

    def _sync(self, target: int) -> list[Outgoing]:
        """Ask the best source for the target's snapshot; with none, let the target go on."""
        waiting = self.waiting[target]
        sources = sorted(self.ready - {target} - set(self.waiting))
        if not sources:
            return self._release(target)
        waiting.source = sources[0]
        return [(sources[0], SnapshotRequest(target))]

    def _release(self, target: int) -> list[Outgoing]:
        waiting = self.waiting.pop(target)
        return [(target, message) for message in waiting.held]


def backoff(failures: int, base: float = 0.5, cap: float = 30.0) -> float:
    """Seconds before restarting a worker after ``failures`` deaths in a row, each soon after
    its start: 0.5, 1, 2, 4 ... at most ``cap``."""
    return min(cap, base * 2.0 ** min(max(0, failures), 32))
