"""Issue 4, the liveness registry: sessions(), watch()/awatch(), primitives(),
describe(), force_release(), purge() against real servers and real processes.

Deaths are awaited with the blocking watch() (bounded by its timeout), never with
sleeps; every bound asserted is the design's: a death is reported within ttl + 1 s
of the last heartbeat, within 1 s of the pid vanishing on the same host.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import procsync
from helpers.keys import stored_keys
from helpers.procs import Child, ChildFactory, wait_until
from procsync import LivenessEvent, registry
from procsync.backend.client import get_backend
from procsync.errors import NotHeldError
from procsync.session import close_all

pytest_plugins = ["helpers.fixtures"]

#: Same-host death: reported within this long of the pid vanishing (design: 1 s).
SAME_HOST_BOUND = 1.0
#: Lease expiry: reported within ttl + this of the last heartbeat (design: 1 s).
TTL_SLACK = 1.0

SESSION = """
s = Session(name={name!r}, ttl={ttl})
say("sid", s.id, os.getpid())
hear()
"""


class Events:
    """watch() running in a thread, its events in a queue (for deaths that must be
    seen while the watch is already running). Stopped with the test."""

    def __init__(self, after: str, **kw: Any) -> None:
        self._q: queue.Queue[LivenessEvent | BaseException | None] = queue.Queue()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, args=(after, kw), daemon=True)
        self._t.start()

    def _run(self, after: str, kw: dict[str, Any]) -> None:
        try:
            end = time.monotonic() + 30  # bounded even if the test forgets to stop it
            while not self._stop.is_set() and time.monotonic() < end:
                for ev in procsync.watch(after, timeout=0.25, **kw):
                    after = ev.id
                    self._q.put(ev)
        except BaseException as exc:
            self._q.put(exc)
        finally:
            self._q.put(None)

    def expect(self, pred: Callable[[LivenessEvent], bool], timeout: float) -> LivenessEvent:
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching event within {timeout:g}s")
            try:
                got = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if got is None:
                raise AssertionError("the watch ended before a matching event")
            if isinstance(got, BaseException):
                raise got
            if pred(got):
                return got

    def close(self) -> None:
        self._stop.set()
        self._t.join(timeout=10)


@pytest.fixture
def events() -> Iterator[Callable[..., Events]]:
    made: list[Events] = []

    def make(after: str, **kw: Any) -> Events:
        e = Events(after, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def first(
    it: Iterator[LivenessEvent], pred: Callable[[LivenessEvent], bool]
) -> LivenessEvent | None:
    for ev in it:
        if pred(ev):
            return ev
    return None


def start_session(children: ChildFactory, name: str, ttl: float = 30) -> tuple[Child, str]:
    c = children(SESSION.format(name=name, ttl=ttl), name=name)
    sid, _pid = c.expect("sid")
    return c, sid


def fake_session(url: str, ttl_ms: int, host: str = "elsewhere") -> str:
    """Open a session of a process on another host (boot id no real host has)
    through session.lua, as the fleet demo does; it never renews."""
    b = get_backend(url)
    sid = secrets.token_hex(16)
    b.call(
        "session",
        [b.sessions_key, b.gone_key],
        [b.prefix, "open", sid, ttl_ms, "remote", host, "boot-" + host, 4242, 0, "thread", 0],
    )
    return sid


def by_id(rows: list[procsync.SessionInfo]) -> dict[str, procsync.SessionInfo]:
    return {s.id: s for s in rows}


# -- deaths and leaves ------------------------------------------------------------------


def test_sigkill_seen_by_running_watch_within_a_second(
    ps_url: str, children: ChildFactory, events: Callable[..., Events]
) -> None:
    ev = events(registry.position())
    child, sid = start_session(children, "victim")
    # The watch sees it join first, and from then on watches its pid.
    ev.expect(lambda e: e.type == "joined" and e.session_id == sid, timeout=10)
    killed_at = time.time()
    child.kill()
    died = ev.expect(lambda e: e.type == "died" and e.session_id == sid, timeout=5)
    assert died.at - killed_at < SAME_HOST_BOUND
    assert died.pid == child.pid and died.name == "victim"
    s = by_id(procsync.sessions())[sid]
    assert s.state == "dead" and s.ended is not None and s.deadline is None


def test_sigkill_reported_by_ps_alone(ps_url: str, children: ChildFactory) -> None:
    pos = registry.position()
    child, sid = start_session(children, "victim2")
    assert by_id(procsync.sessions())[sid].state == "alive"
    killed_at = time.time()
    child.kill()
    # Nobody waits on it and its ttl is 30 s: sessions() itself finds the pid gone.
    s = by_id(procsync.sessions())[sid]
    assert s.state == "dead"
    died = first(procsync.watch(pos, timeout=2, check_pids=False), lambda e: e.type == "died")
    assert died is not None and died.session_id == sid
    assert died.at - killed_at < SAME_HOST_BOUND


def test_clean_exit_is_left(ps_url: str, children: ChildFactory) -> None:
    pos = registry.position()
    child, sid = start_session(children, "leaver")
    child.send()
    assert child.wait() == 0
    left = first(
        procsync.watch(pos, timeout=5, types={"left", "died"}), lambda e: e.session_id == sid
    )
    assert left is not None and left.type == "left"
    s = by_id(procsync.sessions())[sid]
    assert s.state == "left" and s.ended is not None
    assert sid not in by_id(procsync.sessions(include_ended=False))


def test_expiry_on_another_host_reported_within_ttl_plus_one(ps_url: str) -> None:
    pos = registry.position()
    sid = fake_session(ps_url, ttl_ms=1000)
    opened = by_id(procsync.sessions())[sid]
    assert opened.state == "alive" and opened.host == "elsewhere"
    # No other session renews anything: the watch itself sweeps at the deadline.
    died = first(procsync.watch(pos, timeout=5), lambda e: e.type == "died")
    assert died is not None and died.session_id == sid
    assert opened.ttl <= died.at - opened.last_heartbeat <= opened.ttl + TTL_SLACK


def test_ps_alone_reaps_expired_sessions(ps_url: str) -> None:
    sid = fake_session(ps_url, ttl_ms=-1)  # its lease ended before anyone looked
    s = by_id(procsync.sessions())[sid]
    assert s.state == "dead"


def test_awatch_and_resume_from_position(ps_url: str) -> None:
    pos = registry.position()
    a = procsync.Session(name="one", ttl=5)
    a.close()

    async def collect(after: str, n: int) -> list[LivenessEvent]:
        return [e async for e in procsync.awatch(after, count=n, timeout=5)]

    got = asyncio.run(collect(pos, 2))
    assert [(e.type, e.session_id) for e in got] == [("joined", a.id), ("left", a.id)]
    # Resuming after the first event gives exactly the second.
    again = list(procsync.watch(got[0].id, count=1, timeout=5))
    assert [e.id for e in again] == [got[1].id]
    assert got[0].at <= got[1].at


def test_stall_and_resume(ps_url: str) -> None:
    pos = registry.position()
    s = procsync.Session(name="worker", ttl=0.6, stall_after=0.3)
    stalled = first(procsync.watch(pos, timeout=5, types={"stalled"}), lambda e: True)
    assert stalled is not None and stalled.session_id == s.id
    assert by_id(procsync.sessions())[s.id].state == "stalled"
    s.beat()
    assert by_id(procsync.sessions())[s.id].state == "alive"
    resumed = first(procsync.watch(stalled.id, timeout=5, types={"resumed"}), lambda e: True)
    assert resumed is not None and resumed.session_id == s.id
    s.close()


# -- what the sessions hold ----------------------------------------------------------------

HOLDER = """
lock = Lock({name!r})
lock.acquire()
lost = threading.Event()
lock.on_lost(lambda *a: lost.set())
say("held", procsync.current_session().id)
hear()
say("lost", lost.wait(5))
try:
    lock.release()
    say("release", "ok")
except Exception as exc:
    say("release", type(exc).__name__)
"""

WAITER = """
lock = Lock({name!r})
say("ready", procsync.current_session().id)
lock.acquire()
say("got")
hear()
"""


def wait_queued(name: str, n: int) -> procsync.PrimitiveInfo:
    """Until ``n`` waiters are queued on ``name`` (nothing signals a queued waiter)."""

    def queued() -> procsync.PrimitiveInfo | None:
        p = procsync.describe(name)
        return p if p is not None and p.waiting >= n else None

    return wait_until(queued, timeout=10, what=f"{n} waiter(s) queued on {name!r}")


def test_primitives_holders_and_waiters_in_order(ps_url: str, children: ChildFactory) -> None:
    holder = children(HOLDER.format(name="L"), name="holder")
    (hsid,) = holder.expect("held")
    waiters = []
    for i in range(2):
        w = children(WAITER.format(name="L"), name=f"w{i}")
        (wsid,) = w.expect("ready")
        wait_queued("L", i + 1)
        waiters.append((w, wsid))
    sem = procsync.Semaphore(3, name="S")
    sem.acquire()
    sem.acquire()
    assert procsync.describe("free-lock") is None
    p = procsync.describe("L")
    assert p is not None and p.kind == "lock" and p.type == "Lock" and p.state == "locked"
    assert [(h.session_id, h.pid, h.permits) for h in p.holders] == [(hsid, holder.pid, 1)]
    assert [w.session_id for w in p.waiters] == [wsid for _, wsid in waiters]
    assert [w.pid for w in p.waiters] == [w.pid for w, _ in waiters]
    listed = {x.name: x for x in procsync.primitives()}
    assert set(listed) == {"L", "S"}
    assert listed["S"].state == "1/3 free" and listed["S"].holders[0].permits == 2
    me = procsync.current_session().id
    holds = by_id(procsync.sessions())
    assert [(h.kind, h.name, h.role) for h in holds[hsid].holds] == [("lock", "L", "holds")]
    assert [(h.kind, h.name, h.role) for h in holds[waiters[0][1]].holds] == [
        ("lock", "L", "waits")
    ]
    assert [(h.name, h.permits) for h in holds[me].holds] == [("S", 2)]
    procsync.Event("L").set()  # the same name as another kind
    with pytest.raises(ValueError, match="several"):
        procsync.describe("L")
    assert procsync.describe("L", kind="event") is not None
    sem.release(2)


def test_force_release_hands_the_lock_over_and_records_who(
    ps_url: str, children: ChildFactory
) -> None:
    pos = registry.position()
    holder = children(HOLDER.format(name="stuck"), name="holder", PROCSYNC_TTL="1.5")
    (hsid,) = holder.expect("held")
    waiter = children(WAITER.format(name="stuck"), name="waiter")
    waiter.expect("ready")
    wait_queued("stuck", 1)
    ended = registry.force_release("stuck", by="ops on call")
    assert [h.session_id for h in ended] == [hsid]
    waiter.expect("got")  # the next waiter holds it at once
    holder.send()
    assert holder.expect("lost") == ["True"]  # its session learnt at its next heartbeat
    assert holder.expect("release") == ["LockLostError"]
    forced = first(procsync.watch(pos, timeout=5, types={"forced"}), lambda e: True)
    assert forced is not None and forced.session_id == hsid
    assert forced.by == "ops on call" and forced.what == "lock:stuck"
    s = by_id(procsync.sessions())[hsid]
    assert s.state == "dead" and s.forced_by == "ops on call"
    with pytest.raises(NotHeldError):
        registry.force_release("nothing-held")


# -- retention ---------------------------------------------------------------------------------


def test_retention_then_purge_leaves_no_keys(
    ps_url: str, raw: redis.Redis, children: ChildFactory
) -> None:
    child, dead_sid = start_session(children, "gone")
    child.kill()
    a = procsync.Session(name="left", ttl=5)
    a.close()
    close_all()
    rows = by_id(procsync.sessions())
    assert rows[dead_sid].state == "dead" and rows[a.id].state == "left"
    # Ended sessions are kept for the retention period, then expire by themselves.
    prefix = get_backend().prefix
    for sid in (dead_sid, a.id):
        assert 0 < raw.pttl(f"{prefix}s:{sid}") <= 3600 * 1000
    assert registry.purge(older_than=3600) == 0  # all younger than an hour
    assert registry.purge() == 2
    assert procsync.sessions() == []
    assert stored_keys(raw) == []


def test_watch_arguments_are_checked(ps_url: str) -> None:
    with pytest.raises(ValueError):
        list(procsync.watch(timeout=-1))
    with pytest.raises(ValueError):
        procsync.primitives(kind="nope")
    assert list(procsync.watch(count=0)) == []
    assert list(procsync.watch(timeout=0)) == []
