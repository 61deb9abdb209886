"""The KTV room (信号量 KTV): ten people, a room for three, one ``Semaphore(3)``.

The notes' program: each person is a process that takes one of three keys
(``sem.acquire()``), sings for 1-4 s, and gives the key back (``sem.release()``), so
that never more than three are inside at once. Here the people are real processes
(``spawn``) sharing one ``procsync.Semaphore(3)`` by name, and the promise is
*checked*, not just printed.

Timestamps come from the server, never from a client clock. Each person appends to a
:class:`ServerLog` — a stream on the procsync server whose entries a tiny Lua script
stamps with the server's ``TIME`` (microseconds) and that the server orders totally
(the stream id) — right *after* ``acquire()`` returned (``in``) and right *before*
``release()`` (``out``)::

    sem.acquire()
    log.append(person=i, what="in")       # server time; within the hold
    time.sleep(stay)
    log.append(person=i, what="out")      # server time; still within the hold
    sem.release()

So each recorded stay lies inside the person's real hold of a permit, and the server
order of the records is the order in which they happened. If the semaphore ever let
a fourth person in, four recorded stays would overlap. The checker (:func:`check`)
replays the records in server order and demands: at most ``room`` inside at every
moment; everyone entered once and left once; and the room did fill up (a semaphore
that let one person in at a time would also keep the first promise).

The parent reads the log as it grows (a blocking ``XREAD``) and reports every step
through ``on_step``; ``procsync demo ktv`` draws it as a live timeline of who is
inside. Everything runs under one deadline; the parent signals only the processes
it started, and removes the log, the semaphore and the start flag at the end.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.process
import os
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

import redis.exceptions as rex

from procsync.backend.client import Backend, get_backend, resolve_url
from procsync.errors import ProcsyncError
from procsync.session import configure
from procsync.sync import Event, Semaphore

__all__ = [
    "KtvEvent",
    "KtvOptions",
    "KtvResult",
    "KtvStep",
    "KtvVerdict",
    "LogEntry",
    "ServerLog",
    "check",
    "person",
    "planned_stays",
    "run",
]


#: How long a demo log stays on the server if the run never removes it.
LOG_KEEP_MS: Final = 3600 * 1000
#: Longest single blocking read of a log (well under the client's socket timeout).
READ_BLOCK_S: Final = 0.25
#: Longest single ``acquire()`` of a person, so it re-checks its deadline and parent.
ACQUIRE_SLICE: Final = 2.0
#: A person's exit status when it gave up (deadline passed, or its parent is gone).
EXIT_GAVE_UP: Final = 3


# -- the server-stamped log ------------------------------------------------------------

_APPEND_LUA: Final = """
-- KEYS[1]: the log (a stream). ARGV[1]: how long it is kept (ms) after this append.
-- ARGV[2..]: field, value, field, value...
-- Appends one entry stamped with the server's clock (field "us": Unix microseconds);
-- the stream id gives the server's order. Returns {id, us}.
local t = redis.call('TIME')
local us = t[1] .. string.format('%06d', tonumber(t[2]))
local fields = {'us', us}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
local id = redis.call('XADD', KEYS[1], '*', unpack(fields))
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {id, us}
"""


@final
@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a :class:`ServerLog`."""

    id: str
    """The stream id: entries sort by it in the order the server appended them."""
    at: float
    """Server time of the append, Unix seconds (microsecond resolution)."""
    fields: dict[str, str]

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def get(self, key: str, default: str = "") -> str:
        return self.fields.get(key, default)


@final
class ServerLog:
    """An append-only log kept on the procsync server, each entry stamped by the server.

    The demos' witness: processes append what they did (one round trip, one tiny
    script: ``TIME`` then ``XADD``), and a checker reads back a history whose
    timestamps all come from one clock — the server's — in the order the server saw
    the appends. It pickles as its key and server, like the primitives, so it can be
    handed to ``Process(args=...)``. Used by the KTV and traffic-light demos.
    """

    __slots__ = ("_backend", "_script", "key", "namespace", "url")

    def __init__(self, key: str, *, url: str | None = None, namespace: str | None = None) -> None:
        self.key = key
        self.url = url
        self.namespace = namespace
        self._backend: Backend | None = None
        self._script: Any = None

    @classmethod
    def for_run(
        cls, demo: str, run_id: str, *, url: str | None = None, namespace: str | None = None
    ) -> ServerLog:
        """The log of one run of ``demo``, under the namespace's key prefix."""
        prefix = get_backend(url, namespace).prefix
        return cls(f"{prefix}demo:{demo}:{run_id}", url=url, namespace=namespace)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_log, (self.key, self.url, self.namespace))

    def __repr__(self) -> str:
        return f"<ServerLog {self.key!r}>"

    @property
    def backend(self) -> Backend:
        b = self._backend
        if b is None:
            b = self._backend = get_backend(self.url, self.namespace)
        return b

    def append(self, **fields: str | int | float) -> LogEntry:
        """Append one entry; returns it with its server time and id."""
        b = self.backend
        args: list[str | int | float] = [LOG_KEEP_MS]
        for k, v in fields.items():
            args += [k, v]
        try:
            if self._script is None:
                self._script = b.cmd().register_script(_APPEND_LUA)
            eid, us = self._script(keys=[self.key], args=args)
        except (rex.RedisError, OSError) as exc:
            b.translate(exc)
        return LogEntry(str(eid), int(us) / 1e6, {k: str(v) for k, v in fields.items()})

    def read(self, after: str = "0-0", *, block: float | None = None) -> list[LogEntry]:
        """Entries after the id ``after``, oldest first; with ``block`` wait up to that
        many seconds (at most :data:`READ_BLOCK_S`) for the first one."""
        b = self.backend
        block_ms = None if block is None else max(1, int(min(block, READ_BLOCK_S) * 1000))
        try:
            reply: Any = b.cmd().xread({self.key: after}, count=1000, block=block_ms)
        except (rex.RedisError, OSError) as exc:
            b.translate(exc)
        out = []
        for _key, entries in reply or ():
            for eid, f in entries:
                fields: dict[str, str] = dict(f)
                us = int(fields.pop("us", "0"))
                out.append(LogEntry(str(eid), us / 1e6, fields))
        return out

    def entries(self) -> list[LogEntry]:
        """Every entry, oldest first."""
        out: list[LogEntry] = []
        after = "0-0"
        while True:
            batch = self.read(after)
            if not batch:
                return out
            out += batch
            after = batch[-1].id

    def delete(self) -> None:
        """Remove the log from the server."""
        b = self.backend
        try:
            b.cmd().delete(self.key)
        except (rex.RedisError, OSError) as exc:
            b.translate(exc)


def _rebuild_log(key: str, url: str | None, namespace: str | None) -> ServerLog:
    return ServerLog(key, url=url, namespace=namespace)


# -- what the checker reads ------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class KtvStep:
    """Someone went in or came out, as the server recorded it."""

    at: float
    """Seconds since the start signal, on the server's clock."""
    person: int
    what: str
    """``in`` or ``out``."""


@final
@dataclass(frozen=True, slots=True)
class KtvVerdict:
    """What :func:`check` found. ``ok`` iff ``failures`` is empty."""

    people: int
    room: int
    entered: int
    left: int
    max_inside: int
    overfull_moments: int
    """Records after which more than ``room`` were inside."""
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def check(steps: Sequence[KtvStep], room: int, people: int) -> KtvVerdict:
    """Replay ``steps`` (in the server's order) and check the room.

    Demands: never more than ``room`` inside; everyone in ``range(people)`` entered
    exactly once and left exactly once, after entering; the room was full at least
    once (``min(room, people)`` inside), so the semaphore did let ``room`` people in.
    """
    inside: set[int] = set()
    entered: set[int] = set()
    left: set[int] = set()
    most = 0
    overfull = 0
    failures: list[str] = []
    for s in steps:
        who = f"person {s.person}"
        if s.person not in range(people):
            failures.append(f"{s.at:.3f}s: unknown {who}")
            continue
        if s.what == "in":
            if s.person in entered:
                failures.append(f"{s.at:.3f}s: {who} entered a second time")
            entered.add(s.person)
            inside.add(s.person)
            if len(inside) > room:
                overfull += 1
                crowd = ", ".join(str(p) for p in sorted(inside))
                failures.append(
                    f"{s.at:.3f}s: {len(inside)} inside a room for {room} (people {crowd})"
                )
        elif s.what == "out":
            if s.person not in inside:
                failures.append(f"{s.at:.3f}s: {who} came out without being inside")
            inside.discard(s.person)
            left.add(s.person)
        else:
            failures.append(f"{s.at:.3f}s: {who}: unknown step {s.what!r}")
        most = max(most, len(inside))
    if missing := sorted(set(range(people)) - entered):
        failures.append(f"never entered: people {', '.join(map(str, missing))}")
    if stayed := sorted(inside):
        failures.append(f"never came out: people {', '.join(map(str, stayed))}")
    full = min(room, people)
    if steps and most < full:
        failures.append(f"the room never held {full} at once (at most {most}): keys went unused")
    return KtvVerdict(
        people=people,
        room=room,
        entered=len(entered),
        left=len(left),
        max_inside=most,
        overfull_moments=overfull,
        failures=tuple(failures),
    )


# -- a person (runs in its own process) -------------------------------------------------


@dataclass(frozen=True)
class PersonConfig:
    """What a person process needs (pickled to it by ``spawn``)."""

    number: int
    stay_s: float
    ttl: float | None
    deadline: float
    """Unix time after which the person gives up."""
    parent_pid: int


def person(cfg: PersonConfig, sem: Semaphore, go: Event, book: ServerLog) -> None:
    """One person: wait for the doors to open, queue for a key, sing, leave.

    ``in`` is recorded after ``acquire()`` returned and ``out`` before ``release()``,
    so the recorded stay lies within the hold of the permit.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    if cfg.ttl is not None:
        configure(ttl=cfg.ttl)
    deadline = time.monotonic() + (cfg.deadline - time.time())
    book.append(person=cfg.number, what="ready", pid=os.getpid())
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        raise SystemExit(EXIT_GAVE_UP)
    book.append(person=cfg.number, what="queue")
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0 or os.getppid() != cfg.parent_pid:
            raise SystemExit(EXIT_GAVE_UP)
        if sem.acquire(timeout=min(ACQUIRE_SLICE, left_s)):
            break
    try:
        book.append(person=cfg.number, what="in", token=sem.token or 0)
        time.sleep(cfg.stay_s)
        book.append(person=cfg.number, what="out")
    finally:
        sem.release()


# -- the run ----------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class KtvOptions:
    """What to run. Stays are the notes' ``random.randint(1, 4)`` seconds / ``speed``."""

    people: int = 10
    room: int = 3
    speed: float = 1.0
    """Divides every stay (the notes: 1-4 s)."""
    seed: int | None = None
    ttl: float | None = None
    """Session lease of the people (default: PROCSYNC_TTL or 10 s)."""
    url: str | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.people < 1 or self.room < 1:
            raise ValueError("people and room must be at least 1")
        if not self.speed > 0:
            raise ValueError(f"speed must be positive, got {self.speed!r}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


@final
@dataclass(frozen=True, slots=True)
class KtvEvent:
    """What ``on_step`` receives: one step and the room right after it."""

    at: float
    """Seconds since the doors opened (server clock)."""
    person: int
    what: str
    """``queue``, ``in`` or ``out``."""
    inside: tuple[int, ...]
    waiting: tuple[int, ...]


@final
@dataclass(frozen=True, slots=True)
class KtvResult:
    """The run: the steps, the verdict, figures."""

    verdict: KtvVerdict
    steps: tuple[KtvStep, ...]
    stays: dict[int, float]
    """Planned stay of each person, seconds."""
    waits: dict[int, float]
    """From queueing to entering, per person who entered (server clock)."""
    duration_s: float
    url: str
    seed: int | None
    problems: tuple[str, ...] = field(default=())
    """What went wrong around the check (a person crashed, the run timed out)."""
    timed_out: bool = False

    @property
    def failures(self) -> tuple[str, ...]:
        return self.problems + self.verdict.failures

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "ok": self.ok,
            "people": v.people,
            "room": v.room,
            "entered": v.entered,
            "left": v.left,
            "max_inside": v.max_inside,
            "overfull_moments": v.overfull_moments,
            "waited": sum(1 for w in self.waits.values() if w > 0.005),
            "max_wait_s": round(max(self.waits.values(), default=0.0), 4),
            "duration_s": round(self.duration_s, 4),
            "timeline": [
                {"at": round(s.at, 6), "person": s.person, "what": s.what} for s in self.steps
            ],
            "clock": "server",
            "url": self.url,
            "seed": self.seed,
            "timed_out": self.timed_out,
            "failures": list(self.failures),
        }


def planned_stays(opts: KtvOptions) -> dict[int, float]:
    """How long each person stays in the room (seconds), as the run will have it."""
    rng = random.Random(opts.seed)
    return {i: rng.randint(1, 4) / opts.speed for i in range(opts.people)}


@contextlib.contextmanager
def _people(
    ctx: multiprocessing.context.SpawnContext, targets: list[tuple[Any, ...]]
) -> Iterator[list[multiprocessing.process.BaseProcess]]:
    """Start one process per args tuple; on the way out kill whatever still runs."""
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # children are born ignoring it
        try:
            for args in targets:
                p: multiprocessing.process.BaseProcess = ctx.Process(
                    target=person, args=args, name=f"person-{args[0].number}"
                )
                p.start()
                procs.append(p)
        finally:
            signal.signal(signal.SIGINT, old)
        yield procs
    finally:
        for q in procs:
            if q.exitcode is None:
                q.kill()
        for q in procs:
            q.join(5.0)


def run(opts: KtvOptions, *, on_step: Callable[[KtvEvent], None] | None = None) -> KtvResult:
    """Run the KTV and check the server's record; never raises for a broken property
    (see :attr:`KtvResult.ok`). Must run in the main thread.

    Raises:
        ServerError: the server cannot be reached (or the embedded one started).
    """
    run_id = secrets.token_hex(4)
    url = resolve_url(opts.url)
    sem = Semaphore(opts.room, name=f"demo:ktv:{run_id}", url=url)
    go = Event(f"demo:ktv:{run_id}:go", url=url)
    book = ServerLog.for_run("ktv", run_id, url=url)
    stays = planned_stays(opts)
    deadline = time.time() + opts.timeout
    cfgs = [
        (PersonConfig(i, stays[i], opts.ttl, deadline, os.getpid()), sem, go, book)
        for i in range(opts.people)
    ]
    problems: list[str] = []
    timed_out = False
    steps: list[KtvStep] = []
    queued_at: dict[int, float] = {}
    waits: dict[int, float] = {}
    t_go = 0.0
    try:
        with _people(multiprocessing.get_context("spawn"), cfgs) as procs:
            after = "0-0"
            ready: set[int] = set()
            inside: list[int] = []
            waiting: list[int] = []
            done: set[int] = set()
            opened = False
            while len(done) < opts.people:
                if time.time() >= deadline:
                    timed_out = True
                    problems.append(f"timed out after {opts.timeout:g} s")
                    break
                crashed = [p for p in procs if p.exitcode not in (None, 0)]
                if crashed:
                    for p in crashed:
                        problems.append(f"{p.name} exited with status {p.exitcode}")
                    break
                for e in book.read(after, block=READ_BLOCK_S):
                    after = e.id
                    who, what = int(e["person"]), e["what"]
                    if what == "ready":
                        ready.add(who)
                    if what in ("ready", "open"):
                        continue
                    at = e.at - t_go
                    if what == "queue":
                        queued_at[who] = e.at
                        waiting.append(who)
                    elif what == "in":
                        waits[who] = e.at - queued_at.get(who, e.at)
                        with contextlib.suppress(ValueError):
                            waiting.remove(who)
                        inside.append(who)
                        steps.append(KtvStep(at, who, "in"))
                    elif what == "out":
                        with contextlib.suppress(ValueError):
                            inside.remove(who)
                        done.add(who)
                        steps.append(KtvStep(at, who, "out"))
                    if on_step is not None:
                        on_step(KtvEvent(at, who, what, tuple(inside), tuple(waiting)))
                if not opened and len(ready) == opts.people:
                    # Everyone is at the door: open it, and count time from here on the
                    # server's clock.
                    opened = True
                    t_go = book.append(what="open", person=-1).at
                    go.set()
            for p in procs:
                p.join(max(0.0, min(5.0, deadline - time.time())))
                if p.exitcode not in (0, None) and not timed_out:
                    problems.append(f"{p.name} exited with status {p.exitcode}")
    finally:
        with contextlib.suppress(ProcsyncError):
            go.clear()
            book.delete()
    # Re-read nothing: the steps were collected in the server's order as they came.
    verdict = check(steps, opts.room, opts.people)
    return KtvResult(
        verdict=verdict,
        steps=tuple(steps),
        stays=stays,
        waits=waits,
        duration_s=steps[-1].at if steps else 0.0,
        url=sem.backend.safe_url,
        seed=opts.seed,
        problems=tuple(dict.fromkeys(problems)),
        timed_out=timed_out,
    )
