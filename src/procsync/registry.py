"""The liveness registry (报活): which processes are alive, which died, what each holds.

Every session is registered on the server with its identity (host, pid, boot id,
process start time), its lease deadline, its last heartbeat and last progress beat,
and the primitives it holds or waits for. Joins, clean leaves, deaths (lease
expired, or on the same host the pid gone), stalls and operator-forced ends are
appended to an event stream stamped with the server's clock. This module reads
both; the ``procsync ps | ls | show | watch | release`` commands are built on it::

    for s in procsync.sessions():              # ended sessions stay listed for an hour
        print(s.name, s.host, s.pid, s.state, [h.name for h in s.holds])
    for ev in procsync.watch(timeout=60):       # a blocking read of the stream
        print(ev.at, ev.type, ev.host, ev.pid)

Detection, and who does it
--------------------------
* **Lease expiry.** The first script that meets an expired session ends it (holds
  return, waiters are served, ``died`` is logged). Every heartbeat ends a batch of
  up to 16 expired sessions; the readers here run the same bounded ``sweep`` before
  they answer, and :func:`watch` sweeps again at the earliest lease deadline it
  knows of. So with a watcher running a death is reported within milliseconds of
  the ttl, and a lone ``procsync ps`` reports deaths too. No script ends more than
  a batch of sessions: none runs long, however many sessions there are.
* **Same host.** :func:`sessions` checks the pid and start time of every live
  session of its own host (same boot id and host name) and ends the dead at once;
  :func:`watch` has each of them watched through a pidfd for as long as it lives,
  so a ``procsync watch`` running on a host reports a crash there within
  milliseconds. A session with a heartbeat process is ended by that process the
  moment its parent dies; waiters watch the holders they wait for.
* **Retention.** Ended sessions stay listed (``dead`` or ``left``) for an hour, and
  the event stream keeps the same window; then both are forgotten and leave no key.
  :func:`purge` forgets them sooner.

Only the identity recorded on the server is checked: a reused pid has another start
time and is never taken for the dead process.

Reading primitives (:func:`primitives`, :func:`describe`) lists their state keys
with ``SCAN`` from the client (read-only, matching the namespace prefix): an
operator's tool, so the scripts on the hot path keep no index. Reads are pipelined
(a few round trips, whatever the number of sessions) and every function has an
asyncio twin (``asessions``, ``awatch``, ``aprimitives``, ``adescribe``); both run
the same operation, written once as a generator of steps.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeAlias, TypeVar, cast, final

from procsync import _drivers
from procsync._identity import boot_id as _boot_id
from procsync._identity import pid_alive
from procsync._validate import check_name
from procsync.backend.client import MAX_POP_SECONDS, Backend, get_backend
from procsync.core.steps import Call, HolderInfo, Read, Scan, Step, XRead, reap, side_key
from procsync.errors import NotHeldError, ProtocolError
from procsync.session import session_keys, watch_session_process

__all__ = [
    "EVENT_TYPES",
    "KINDS",
    "SESSION_STATES",
    "HoldInfo",
    "HolderEntry",
    "LivenessEvent",
    "PrimitiveInfo",
    "SessionInfo",
    "WaiterEntry",
    "adescribe",
    "aprimitives",
    "asessions",
    "awatch",
    "describe",
    "force_release",
    "position",
    "primitives",
    "purge",
    "sessions",
    "watch",
]

T = TypeVar("T")

#: Session states: alive, stalled (heartbeat lives, no progress beat for its
#: stall_after), dead (lease ran out, process gone, or forced), left (closed).
SESSION_STATES: Final = ("alive", "stalled", "dead", "left")
#: Event types of the stream.
EVENT_TYPES: Final = ("joined", "left", "died", "stalled", "resumed", "forced")
#: Kind of a state key -> the class that opens it.
KINDS: Final[Mapping[str, str]] = {
    "lock": "Lock",
    "rlock": "RLock",
    "sem": "Semaphore",
    "bsem": "BoundedSemaphore",
    "event": "Event",
    "cond": "Condition",
    "barrier": "Barrier",
    "value": "Value",
}
_PERMIT_KINDS: Final = frozenset({"lock", "rlock", "sem", "bsem"})
#: The waiter lists of each kind, in the order they are served.
_LISTS: Final[Mapping[str, tuple[str, ...]]] = {
    "lock": ("q",),
    "rlock": ("q",),
    "sem": ("q",),
    "bsem": ("q",),
    "event": ("w",),
    "cond": ("w",),
    "barrier": ("a", "r"),
}

#: Sessions one sweep script may end (the heartbeat's batch too).
SWEEP_BATCH: Final = 16
#: Sweeps one reader call may run before it answers with what it has.
MAX_SWEEP_ROUNDS: Final = 64
#: Waiters listed per primitive (the total is always counted).
MAX_WAITERS_LISTED: Final = 1000
#: Stream entries read per round trip of a watch.
READ_COUNT: Final = 256
#: A watcher sweeps this long after the earliest deadline it knows (server ms tick).
SWEEP_MARGIN_S: Final = 0.005
#: With no live session a watcher still sweeps (and trims retention) this often.
IDLE_SWEEP_S: Final = 5.0


# -- records ------------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class HoldInfo:
    """One primitive a session holds or waits for."""

    kind: str
    """lock, rlock, sem, bsem, event, cond, barrier."""
    name: str
    role: str
    """``holds`` (a permit primitive) or ``waits``."""
    permits: int
    """Permits held (0 when waiting)."""


@final
@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session of the registry. Times are Unix seconds on the server's clock."""

    id: str
    name: str
    host: str
    pid: int
    state: str
    """alive, stalled, dead or left (see :data:`SESSION_STATES`)."""
    started: float
    last_heartbeat: float
    last_progress: float
    """Last :meth:`procsync.Session.beat` (the session's start if it never beat)."""
    deadline: float | None
    """When the lease ends unless renewed; None once the session ended."""
    ended: float | None
    ttl: float
    heartbeat: str
    """thread or process (what renews it)."""
    stall_after: float | None
    boot_id: str
    holds: tuple[HoldInfo, ...]
    forced_by: str | None = None
    """Who ended it with ``procsync release --force``."""


@final
@dataclass(frozen=True, slots=True)
class LivenessEvent:
    """One entry of the event stream. ``id`` is its position: pass it as ``after`` to
    resume a :func:`watch` exactly after this event."""

    id: str
    type: str
    """joined, left, died, stalled, resumed or forced (see :data:`EVENT_TYPES`)."""
    session_id: str
    at: float
    """Server time (Unix seconds) of the event."""
    name: str
    host: str
    pid: int | None
    by: str | None = None
    """forced: who forced it."""
    what: str | None = None
    """forced: the primitive it was forced for (``kind:name``)."""


@final
@dataclass(frozen=True, slots=True)
class HolderEntry:
    """A session holding (permits of) a primitive."""

    session_id: str
    name: str
    host: str
    pid: int | None
    permits: int
    since: float | None
    """When it was granted (Unix s), where the server records it; else None."""
    session_state: str
    """State of the holding session (a holder found dead is ended at the next look)."""


@final
@dataclass(frozen=True, slots=True)
class WaiterEntry:
    """A waiter of a primitive, in the order it will be served."""

    waiter_id: str
    session_id: str
    name: str
    host: str
    pid: int | None
    session_state: str


@final
@dataclass(frozen=True, slots=True)
class PrimitiveInfo:
    """What the server keeps for one primitive. A free Lock or Semaphore, a clear Event
    nobody waits on, an idle Barrier keep no state and are not listed."""

    kind: str
    type: str
    """The class that opens it: Lock, Semaphore, Event..."""
    name: str
    state: str
    """In words: locked / free, "2/3 free", set / clear, "1/3 arrived", broken..."""
    holders: tuple[HolderEntry, ...]
    waiters: tuple[WaiterEntry, ...]
    """In the order they will be served (at most 1000 listed)."""
    waiting: int
    """How many wait (all of them, not only those listed)."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Kind-specific numbers: value, initial, last_token, grants, reclaimed, parties..."""


# -- steps and drivers ------------------------------------------------------------------

_Op: TypeAlias = "Generator[Step, Any, T]"


def _cmd(method: str, *args: Any, **kwargs: Any) -> tuple[str, tuple[Any, ...], Mapping[str, Any]]:
    return (method, args, kwargs)


def _run(backend: Backend, op: _Op[T]) -> T:
    """Drive ``op`` with blocking calls (the one driver: reads are resent like calls)."""
    result: T = _drivers.run(backend, op)
    return result


async def _arun(backend: Backend, op: _Op[T]) -> T:
    """Drive ``op`` on the running event loop."""
    result: T = await _drivers.arun(backend, op)
    return result


# -- helpers --------------------------------------------------------------------------------


def _int(v: Any, default: int = 0) -> int:
    try:
        return int(float(v))
    except (TypeError, ValueError):
        return default


def _secs(ms: Any) -> float:
    return _int(ms) / 1000.0


def _sid_of(wid: str) -> str:
    return wid.split("/", 1)[0]


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _split_state_key(prefix: str, key: str) -> tuple[str, str] | None:
    """(kind, name) of a primitive's state key, or None for any other key."""
    if not key.startswith(prefix):
        return None
    kind, sep, name = key[len(prefix) :].partition(":")
    if not sep or not name or kind not in KINDS:
        return None
    return kind, name


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # pragma: no cover - no user name
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


# -- sweeping -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Sweep:
    now_ms: int
    reaped: int
    forgotten: int
    next_deadline_ms: int
    more: bool


def _sweep_once(backend: Backend, retention_ms: int | None = None) -> _Op[_Sweep]:
    b = backend
    reply = yield Call(
        "session",
        tuple(session_keys(b)),
        (b.prefix, "sweep", "-", SWEEP_BATCH, "" if retention_ms is None else retention_ms),
    )
    if reply[0] != "ok" or len(reply) < 6:
        raise ProtocolError(f"session sweep: unexpected reply {reply!r:.200}")
    return _Sweep(
        _int(reply[1]), _int(reply[2]), _int(reply[3]), _int(reply[4], -1), _int(reply[5]) == 1
    )


def _sweep(backend: Backend, retention_ms: int | None = None) -> _Op[_Sweep]:
    """Sweep in bounded batches until done (or MAX_SWEEP_ROUNDS scripts ran)."""
    reaped = forgotten = 0
    for _ in range(MAX_SWEEP_ROUNDS):
        sw = yield from _sweep_once(backend, retention_ms)
        reaped += sw.reaped
        forgotten += sw.forgotten
        if not sw.more:
            break
    return _Sweep(sw.now_ms, reaped, forgotten, sw.next_deadline_ms, sw.more)


def _same_host(boot: str, host: str) -> bool:
    # The boot id says "same kernel"; the host name guards against containers, which
    # share the kernel's boot id but not its pid numbers.
    return boot == _boot_id() and host == socket.gethostname()


def _reap_dead_here(backend: Backend, idents: Iterable[HolderInfo]) -> _Op[int]:
    """End the sessions among ``idents`` (processes of this host) whose process is
    gone. Returns how many were ended."""
    dead = [h for h in idents if not pid_alive(h.pid, h.start_ticks)]
    if not dead:
        return 0
    b = backend
    op = cast("_Op[int]", reap(b.prefix, b.sessions_key, b.gone_key, dead))
    n: int = yield from op
    return n


def _local_idents(sid_hashes: Iterable[tuple[str, Mapping[str, str]]]) -> list[HolderInfo]:
    out = []
    for sid, h in sid_hashes:
        if h and _same_host(h.get("boot", ""), h.get("host", "")):
            pid, start = _int(h.get("pid")), _int(h.get("start"))
            if pid > 0:
                out.append(HolderInfo(sid, 0, h["boot"], pid, start, h["host"], 0))
    return out


# -- sessions ------------------------------------------------------------------------------


def _session_info(
    sid: str,
    h: Mapping[str, str],
    deadline_ms: float | None,
    holds: tuple[HoldInfo, ...],
    now_ms: int,
) -> SessionInfo:
    stall = _int(h.get("stall_after"))
    started = _secs(h.get("started"))
    ended = h.get("ended")
    state = h.get("state", "alive")
    if deadline_ms is not None and deadline_ms <= now_ms:
        state = "dead"  # expired; ended at the next sweep (there were too many to end now)
    elif deadline_ms is None and not ended:
        state = "dead"
    return SessionInfo(
        id=sid,
        name=h.get("name", ""),
        host=h.get("host", ""),
        pid=_int(h.get("pid")),
        state=state,
        started=started,
        last_heartbeat=_secs(h.get("beat")) if h.get("beat") else started,
        last_progress=_secs(h.get("progress")) if h.get("progress") else started,
        deadline=None if deadline_ms is None else deadline_ms / 1000.0,
        ended=_secs(ended) if ended else None,
        ttl=_secs(h.get("ttl")),
        heartbeat=h.get("hb", "thread"),
        stall_after=stall / 1000.0 if stall > 0 else None,
        boot_id=h.get("boot", ""),
        holds=holds,
        forced_by=h.get("forced_by") or None,
    )


def _sessions_op(backend: Backend, include_ended: bool, check_pids: bool) -> _Op[list[SessionInfo]]:
    b = backend
    sw = yield from _sweep(b)
    for attempt in range(2):
        live, gone = yield Read(
            (
                _cmd("zrange", b.sessions_key, 0, -1, withscores=True),
                _cmd("zrange", b.gone_key, 0, -1, withscores=True),
            )
        )
        deadlines = {str(sid): float(score) for sid, score in live}
        sids = list(deadlines)
        if include_ended:
            sids += [str(sid) for sid, _ in gone if str(sid) not in deadlines]
        reads = [_cmd("hgetall", f"{b.prefix}s:{sid}") for sid in sids]
        reads += [_cmd("smembers", f"{b.prefix}h:{sid}") for sid in deadlines]
        replies = (yield Read(tuple(reads))) if reads else []
        hashes: dict[str, Mapping[str, str]] = dict(zip(sids, replies[: len(sids)], strict=True))
        held: dict[str, list[str]] = {
            sid: sorted(keys) for sid, keys in zip(deadlines, replies[len(sids) :], strict=True)
        }
        if check_pids and attempt == 0:
            local = _local_idents((sid, hashes.get(sid, {})) for sid in deadlines)
            if (yield from _reap_dead_here(b, local)):
                continue  # someone here died: read again
        break
    # Which of the keys a live session is in does it hold (permits) rather than wait on?
    pairs = [
        (sid, key, kn)
        for sid, keys in held.items()
        for key in keys
        if (kn := _split_state_key(b.prefix, key)) is not None
    ]
    counts = (
        (yield Read(tuple(_cmd("hget", key, f"h:{sid}") for sid, key, _ in pairs))) if pairs else []
    )
    holds: dict[str, list[HoldInfo]] = {}
    for (sid, _, (kind, name)), n in zip(pairs, counts, strict=True):
        permits = _int(n)
        role = "holds" if kind in _PERMIT_KINDS and permits > 0 else "waits"
        holds.setdefault(sid, []).append(HoldInfo(kind, name, role, permits))
    out = []
    for sid in sids:
        h = hashes.get(sid) or {}
        if not h:
            continue  # forgotten between the two reads
        out.append(_session_info(sid, h, deadlines.get(sid), tuple(holds.get(sid, ())), sw.now_ms))
    out.sort(key=lambda s: (s.ended is not None, s.started, s.id))
    return out


def sessions(
    *,
    include_ended: bool = True,
    check_pids: bool = True,
    url: str | None = None,
    namespace: str | None = None,
) -> list[SessionInfo]:
    """Every session of the namespace: live ones first (oldest first), then ended
    ones still within retention.

    Before answering it ends, in bounded batches, the sessions whose lease ran out,
    and (``check_pids``) those of this host whose process is gone.
    """
    b = get_backend(url, namespace)
    return _run(b, _sessions_op(b, include_ended, check_pids))


async def asessions(
    *,
    include_ended: bool = True,
    check_pids: bool = True,
    url: str | None = None,
    namespace: str | None = None,
) -> list[SessionInfo]:
    """Async twin of :func:`sessions`."""
    b = await asyncio.to_thread(get_backend, url, namespace)
    return await _arun(b, _sessions_op(b, include_ended, check_pids))


def purge(older_than: float = 0.0, *, url: str | None = None, namespace: str | None = None) -> int:
    """Forget ended sessions (and events) older than ``older_than`` seconds now, instead
    of after the hour of retention; expired sessions are ended first. Returns how many
    were forgotten."""
    if not older_than >= 0:
        raise ValueError(f"older_than must be >= 0 seconds, got {older_than!r}")
    b = get_backend(url, namespace)
    total = 0
    keep = int(older_than * 1000)
    for _ in range(MAX_SWEEP_ROUNDS):
        sw = _run(b, _sweep(b, keep))
        total += sw.forgotten
        if not sw.more:
            break
    return total


# -- watching ----------------------------------------------------------------------------------


class _Watch:
    """The state of one watch: stream position, when to sweep next, pids watched."""

    __slots__ = ("after", "backend", "check_pids", "next_sweep", "started", "types")

    def __init__(
        self, backend: Backend, after: str, types: Iterable[str] | None, check_pids: bool
    ) -> None:
        self.backend = backend
        self.after = after
        if isinstance(types, str):
            types = (types,)
        self.types = None if types is None else frozenset(types)
        self.check_pids = check_pids
        self.next_sweep = 0.0
        self.started = False

    def _watch_local(self, sid_hashes: Iterable[tuple[str, Mapping[str, str]]]) -> _Op[None]:
        local = _local_idents(sid_hashes)
        yield from _reap_dead_here(self.backend, local)
        for h in local:
            watch_session_process(self.backend, h)

    def _start(self) -> _Op[None]:
        b = self.backend
        if self.after == "$":
            self.after = yield from _position_op(b)
        if self.check_pids:
            (live,) = yield Read((_cmd("zrange", b.sessions_key, 0, -1),))
            fields = ("boot", "host", "pid", "start")
            rows = yield Read(tuple(_cmd("hmget", f"{b.prefix}s:{s}", fields) for s in live))
            yield from self._watch_local(
                (str(s), dict(zip(fields, row, strict=True)))
                for s, row in zip(live, rows, strict=True)
            )
        self.started = True

    def round(self, budget: float | None) -> _Op[list[LivenessEvent]]:
        """Sweep if due, then one blocking read of at most ``budget`` seconds."""
        if not self.started:
            yield from self._start()
        b = self.backend
        now = time.monotonic()
        if now >= self.next_sweep:
            sw = yield from _sweep_once(b)
            now = time.monotonic()
            if sw.more:
                self.next_sweep = now
            elif sw.next_deadline_ms >= 0:
                wait = (sw.next_deadline_ms - sw.now_ms) / 1000.0 + SWEEP_MARGIN_S
                self.next_sweep = now + min(max(wait, 0.0), IDLE_SWEEP_S)
            else:
                self.next_sweep = now + IDLE_SWEEP_S
        wait = self.next_sweep - now
        if budget is not None:
            wait = min(wait, budget)
        wait = min(wait, MAX_POP_SECONDS)
        block = None if wait <= 0 else max(1, int(wait * 1000))
        got = yield XRead(b.prefix + "events", self.after, block, READ_COUNT)
        entries: list[tuple[str, Mapping[str, str]]] = got[0][1] if got else []
        if not entries:
            return []
        self.after = str(entries[-1][0])
        # New sessions may expire before the deadline we planned: sweep after news.
        self.next_sweep = min(self.next_sweep, time.monotonic() + SWEEP_MARGIN_S)
        events = [_event(eid, f) for eid, f in entries]
        yield from self._enrich(events)
        return [e for e in events if self.types is None or e.type in self.types]

    def _enrich(self, events: list[LivenessEvent]) -> _Op[None]:
        b = self.backend
        joined_here = [e for e in events if e.type == "joined" and e.host == socket.gethostname()]
        forced = [e for e in events if e.type == "forced" and e.by is None]
        if not ((joined_here and self.check_pids) or forced):
            return
        fields = ("boot", "host", "pid", "start", "forced_by", "forced_what")
        rows = yield Read(
            tuple(
                _cmd("hmget", f"{b.prefix}s:{e.session_id}", fields) for e in joined_here + forced
            )
        )
        info = {
            e.session_id: dict(zip(fields, row, strict=True))
            for e, row in zip(joined_here + forced, rows, strict=True)
        }
        if joined_here and self.check_pids:
            yield from self._watch_local((e.session_id, info[e.session_id]) for e in joined_here)
        for i, e in enumerate(events):
            if e.type == "forced" and e.by is None:
                row = info.get(e.session_id, {})
                events[i] = LivenessEvent(
                    e.id,
                    e.type,
                    e.session_id,
                    e.at,
                    e.name,
                    e.host,
                    e.pid,
                    row.get("forced_by"),
                    row.get("forced_what"),
                )


def _event(eid: str, f: Mapping[str, str]) -> LivenessEvent:
    pid = _int(f.get("pid"), -1)
    return LivenessEvent(
        id=str(eid),
        type=f.get("type", ""),
        session_id=f.get("sid", ""),
        at=_secs(f.get("at")),
        name=f.get("name", ""),
        host=f.get("host", ""),
        pid=pid if pid >= 0 else None,
        by=f.get("by") or None,
        what=f.get("what") or None,
    )


def _position_op(backend: Backend) -> _Op[str]:
    (last,) = yield Read((_cmd("xrevrange", backend.prefix + "events", "+", "-", count=1),))
    return str(last[0][0]) if last else "0-0"


def position(*, url: str | None = None, namespace: str | None = None) -> str:
    """The id of the latest event (``"0-0"`` when there is none). A
    ``watch(after=position())`` started later misses nothing that came after."""
    b = get_backend(url, namespace)
    return _run(b, _position_op(b))


def _check_watch_args(after: str, timeout: float | None, count: int | None) -> None:
    if not isinstance(after, str) or not after:
        raise TypeError("after must be a stream position: '$', '0' or an event id")
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds or None, got {timeout!r}")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 or None, got {count!r}")


def watch(
    after: str = "$",
    *,
    timeout: float | None = None,
    count: int | None = None,
    types: Iterable[str] | None = None,
    check_pids: bool = True,
    url: str | None = None,
    namespace: str | None = None,
) -> Iterator[LivenessEvent]:
    """Yield liveness events as the server records them (a blocking ``XREAD``).

    ``after``: ``"$"`` (default) only events from now on; ``"0"`` every event still
    retained; an event's ``id`` to resume exactly after it. Stops after ``timeout``
    seconds in all, or ``count`` events (``types`` filters: ``{"died"}``); with
    neither it runs until closed.

    While it waits it sweeps at the earliest lease deadline, so deaths are reported
    as they happen even when no other process is running, and (``check_pids``) it
    watches the processes of live sessions on this host, ending a session the moment
    its process is gone.
    """
    _check_watch_args(after, timeout, count)
    if count == 0:
        return
    b = get_backend(url, namespace)
    w = _Watch(b, after, types, check_pids)
    end = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        budget = None if end is None else end - time.monotonic()
        for ev in _run(b, w.round(None if budget is None else max(budget, 0.0))):
            yield ev
            seen += 1
            if count is not None and seen >= count:
                return
        if end is not None and time.monotonic() >= end:
            return


async def awatch(
    after: str = "$",
    *,
    timeout: float | None = None,
    count: int | None = None,
    types: Iterable[str] | None = None,
    check_pids: bool = True,
    url: str | None = None,
    namespace: str | None = None,
) -> AsyncIterator[LivenessEvent]:
    """Async twin of :func:`watch` (``async for ev in procsync.awatch(): ...``)."""
    _check_watch_args(after, timeout, count)
    if count == 0:
        return
    b = await asyncio.to_thread(get_backend, url, namespace)
    w = _Watch(b, after, types, check_pids)
    end = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        budget = None if end is None else end - time.monotonic()
        for ev in await _arun(b, w.round(None if budget is None else max(budget, 0.0))):
            yield ev
            seen += 1
            if count is not None and seen >= count:
                return
        if end is not None and time.monotonic() >= end:
            return


# -- primitives -------------------------------------------------------------------------------


def _permit_state(kind: str, h: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    v, init = _int(h.get("v")), _int(h.get("init"))
    details = {
        "value": v,
        "initial": init,
        "last_token": _int(h.get("t")),
        "grants": _int(h.get("g")),
        "reclaimed": _int(h.get("r")),
    }
    if kind in ("lock", "rlock"):
        return ("locked" if v < init else "free"), details
    return f"{v}/{init} free", details


def _describe_state(kind: str, h: Mapping[str, str], waiting: int) -> tuple[str, dict[str, Any]]:
    if kind in _PERMIT_KINDS:
        return _permit_state(kind, h)
    if kind == "event":
        return ("set" if h.get("set") == "1" else "clear"), {}
    if kind == "cond":
        return f"{waiting} waiting", {}
    if kind == "barrier":
        parties = _int(h.get("init"))
        details: dict[str, Any] = {
            "parties": parties,
            "count": _int(h.get("count")),
            "broken": False,
        }
        if h.get("broken") == "1":
            details.update(broken=True, why=h.get("why", ""))
            return f"broken ({h.get('why', '')})", details
        return f"{_int(h.get('count'))}/{parties} arrived", details
    # (o, ov: the id and result of the latest add, for its retry: not state)
    return "-", {k: v for k, v in h.items() if k not in ("kind", "o", "ov")}


def _primitives_op(
    backend: Backend, name: str | None, kind: str | None
) -> _Op[list[PrimitiveInfo]]:
    b = backend
    yield from _sweep_once(b)  # dead holders are ended before we look
    if name is not None:
        keys = [f"{b.prefix}{k}:{name}" for k in ([kind] if kind else list(KINDS))]
    else:
        keys = sorted((yield Scan(_glob_escape(b.prefix) + "*", "hash")))
    found: list[tuple[str, str, str]] = []
    for key in keys:
        kn = _split_state_key(b.prefix, key)
        if kn is not None and (kind is None or kn[0] == kind):
            found.append((key, kn[0], kn[1]))
    if not found:
        return []
    reads = []
    for key, k, n in found:
        reads.append(_cmd("hgetall", key))
        for tag in _LISTS.get(k, ()):
            lst = side_key(b.prefix, k, tag, n)
            reads.append(_cmd("lrange", lst, 0, MAX_WAITERS_LISTED - 1))
            reads.append(_cmd("llen", lst))
    replies = iter((yield Read(tuple(reads))))
    raw = []
    sids: set[str] = set()
    for key, k, n in found:
        h: Mapping[str, str] = next(replies)
        wids: list[str] = []
        waiting = 0
        for _ in _LISTS.get(k, ()):
            wids += [str(w) for w in next(replies)]
            waiting += _int(next(replies))
        if not h or h.get("kind") != k:
            continue  # no state (free), or a key of this name that isn't ours
        holders = {f[2:]: _int(v) for f, v in h.items() if f.startswith("h:")}
        sids.update(holders)
        sids.update(_sid_of(w) for w in wids)
        raw.append((key, k, n, h, holders, wids, waiting))
    order = sorted(sids)
    fields = ("name", "host", "pid", "state")
    rows = (
        (
            yield Read(
                tuple(_cmd("hmget", f"{b.prefix}s:{s}", fields) for s in order)
                + tuple(_cmd("zscore", b.sessions_key, s) for s in order)
            )
        )
        if order
        else []
    )
    who = {
        s: dict(zip(fields, row, strict=True))
        for s, row in zip(order, rows[: len(order)], strict=True)
    }
    live = {s: d is not None for s, d in zip(order, rows[len(order) :], strict=True)}

    def state_of(s: str) -> str:
        st = who.get(s, {}).get("state") or "unknown"
        return st if live.get(s) or st in ("dead", "left") else "dead"

    def pid_of(s: str) -> int | None:
        p = _int(who.get(s, {}).get("pid"), -1)
        return p if p >= 0 else None

    out = []
    for _key, k, n, h, holders, wids, waiting in raw:
        state, details = _describe_state(k, h, waiting)
        out.append(
            PrimitiveInfo(
                kind=k,
                type=KINDS[k],
                name=n,
                state=state,
                holders=tuple(
                    HolderEntry(
                        s,
                        who.get(s, {}).get("name") or "",
                        who.get(s, {}).get("host") or "",
                        pid_of(s),
                        permits,
                        _secs(h["a:" + s]) if h.get("a:" + s) else None,
                        state_of(s),
                    )
                    for s, permits in sorted(holders.items())
                ),
                waiters=tuple(
                    WaiterEntry(
                        w,
                        _sid_of(w),
                        who.get(_sid_of(w), {}).get("name") or "",
                        who.get(_sid_of(w), {}).get("host") or "",
                        pid_of(_sid_of(w)),
                        state_of(_sid_of(w)),
                    )
                    for w in wids
                ),
                waiting=waiting,
                details=details,
            )
        )
    out.sort(key=lambda p: (p.name, p.kind))
    return out


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")


def primitives(
    *, kind: str | None = None, url: str | None = None, namespace: str | None = None
) -> list[PrimitiveInfo]:
    """Every primitive of the namespace that has state on the server, by name.

    Found with ``SCAN`` from the client (read-only): meant for operators, not for a
    hot path. Free locks and semaphores keep no state and are not listed.
    """
    _check_kind(kind)
    b = get_backend(url, namespace)
    return _run(b, _primitives_op(b, None, kind))


async def aprimitives(
    *, kind: str | None = None, url: str | None = None, namespace: str | None = None
) -> list[PrimitiveInfo]:
    """Async twin of :func:`primitives`."""
    _check_kind(kind)
    b = await asyncio.to_thread(get_backend, url, namespace)
    return await _arun(b, _primitives_op(b, None, kind))


def _one(name: str, found: list[PrimitiveInfo]) -> PrimitiveInfo | None:
    if len(found) > 1:
        kinds = ", ".join(p.kind for p in found)
        raise ValueError(f"several primitives are named {name!r} ({kinds}); pass kind=")
    return found[0] if found else None


def describe(
    name: str, *, kind: str | None = None, url: str | None = None, namespace: str | None = None
) -> PrimitiveInfo | None:
    """The primitive called ``name`` (of ``kind``), or None when it has no state on
    the server (a free Lock, a clear Event nobody waits on, or a name never used).
    Raises ValueError if several kinds use the name and ``kind`` is not given."""
    _check_kind(kind)
    check_name(name)
    b = get_backend(url, namespace)
    return _one(name, _run(b, _primitives_op(b, name, kind)))


async def adescribe(
    name: str, *, kind: str | None = None, url: str | None = None, namespace: str | None = None
) -> PrimitiveInfo | None:
    """Async twin of :func:`describe`."""
    _check_kind(kind)
    check_name(name)
    b = await asyncio.to_thread(get_backend, url, namespace)
    return _one(name, await _arun(b, _primitives_op(b, name, kind)))


# -- operator's release --------------------------------------------------------------------


def force_release(
    name: str,
    *,
    kind: str | None = None,
    session: str | None = None,
    by: str | None = None,
    url: str | None = None,
    namespace: str | None = None,
) -> list[HolderEntry]:
    """End the session(s) holding ``name`` so the next waiters get it: an operator's
    last resort against a stuck holder. Returns the holders ended.

    The holder's *whole* session ends (state ``dead``, event ``forced`` recording
    ``by``, default ``user@host pid N``): every hold it had is lost, which its process
    learns at its next heartbeat (``lock.lost``, :class:`~procsync.LockLostError` on
    release). ``session`` (an id or a prefix of one) picks one holder of a semaphore;
    by default every holder is ended. Raises NotHeldError if nothing matches.
    """
    _check_kind(kind)
    check_name(name)
    if kind is not None and kind not in _PERMIT_KINDS:
        raise ValueError(f"only locks and semaphores are held; {kind!r} is not")
    b = get_backend(url, namespace)
    found = _run(b, _primitives_op(b, name, kind))
    found = [p for p in found if p.kind in _PERMIT_KINDS]
    prim = _one(name, found)
    holders = [] if prim is None else list(prim.holders)
    if session is not None:
        holders = [h for h in holders if h.session_id.startswith(session)]
    if prim is None or not holders:
        what = f"{KINDS.get(kind or '', 'primitive')} {name!r}"
        whom = f" by a session {session!r}..." if session else ""
        raise NotHeldError(f"{what} is not held{whom}: nothing to release")
    who = by if by is not None else _operator()
    ended = []
    for h in holders:
        reply = b.call(
            "session",
            session_keys(b),
            [b.prefix, "force", h.session_id, who, f"{prim.kind}:{prim.name}"],
        )
        if _int(reply[1] if len(reply) > 1 else 0) == 1:
            ended.append(h)
    return ended
