"""procsync.asyncio: the asyncio front of every primitive (issue 3).

* Conformance: Lock, Semaphore, BoundedSemaphore and Event behave the same on both
  fronts (each test parametrised ``[sync]`` / ``[asyncio]`` through :mod:`fronts`),
  and the two fronts interoperate across processes (children use the other front).
* asyncio's own contract: coroutine signatures, ``async with``; cancellation at every
  await point of ``acquire`` leaves nothing behind, and a grant whose task was
  cancelled is given back; no blocking call runs on the event loop.

Cancellation points are reached deterministically: by stepping the loop
(``asyncio.sleep(0)``), by holding a script reply that the server already sent
(a spy around ``Backend.acall`` that only delays its caller), or by waiting for the
server to report the waiter blocked (``INFO clients``) before acting.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import pickle
import socket
import threading
import time
import traceback
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import redis

import procsync
import procsync.asyncio as pa
from fronts import Front
from helpers.procs import Child, ChildFactory, wait_until
from procsync import BrokenBarrierError, OverReleaseError
from procsync.backend.client import Backend
from procsync.session import close_all

if TYPE_CHECKING:
    from fronts_fixtures import FrontChild

pytest_plugins = ["helpers.fixtures", "fronts_fixtures"]


def other(front: Front) -> str:
    return "sync" if front.is_async else "asyncio"


#: A process that holds a primitive on command, on the front it is given.
HOLDER = """
import redis
r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
if KIND == "lock":
    p = F.Lock(NAME)
else:
    p = F.Semaphore(VALUE, name=NAME, bounded=KIND == "bsem")
say("ready")
while True:
    cmd = hear()
    if cmd == "acquire":
        ok = p.acquire(T)
        if ok:
            r.rpush("order", MARK)
        say("acquired", ok)
    elif cmd == "release":
        p.release()
        say("released")
    elif cmd == "exit":
        break
"""


def holder(
    front_child: FrontChild,
    front: str,
    name: str,
    kind: str = "lock",
    value: int = 1,
    mark: str = "",
    timeout: float = 20.0,
) -> Child:
    c = front_child(
        front,
        HOLDER,
        name=f"{front}-{kind}-{mark or 'holder'}",
        KIND=kind,
        NAME=name,
        VALUE=value,
        MARK=mark,
        T=timeout,
    )
    c.expect("ready")
    return c


def take(c: Child) -> None:
    c.send("acquire")
    assert c.expect("acquired") == ["True"]


def give(c: Child) -> None:
    c.send("release")
    c.expect("released")


def blocked_clients(r: redis.Redis) -> int:
    """Clients the server has parked in a blocking pop (procsync waiters)."""
    return int(r.info("clients")["blocked_clients"])


async def parked(r: redis.Redis, n: int = 1, limit: float = 10.0) -> None:
    """Wait (bounded) until ``n`` waiters are parked in their blocking pop on the
    server. Cancelling a task then lands while it reads the pop's reply; a task
    still *sending* its pop may not see a cancellation at all (see
    test_a_cancel_landing_as_the_waiter_sends_its_pop_is_not_lost)."""
    deadline = time.monotonic() + limit
    while await asyncio.to_thread(blocked_clients, r) < n:
        assert time.monotonic() < deadline, f"{n} waiter(s) not parked within {limit:g}s"
        await asyncio.sleep(0.005)


# == conformance on both fronts ==========================================================


def test_lock_excludes_another_process_on_the_other_front(
    front: Front, front_child: FrontChild
) -> None:
    lock = front.Lock("l")
    h = holder(front_child, other(front), "l")
    take(h)
    assert lock.try_acquire() is False
    t0 = time.monotonic()
    assert lock.acquire(0.3) is False
    assert 0.3 <= time.monotonic() - t0 < 3.0
    st = lock.statistics()
    assert st.locked and st.waiting == 0 and st.owner is not None and st.owner.pid == h.pid
    give(h)
    assert lock.acquire(5) is True
    first = lock.token
    assert lock.statistics().owner.pid == os.getpid()  # type: ignore[union-attr]
    lock.release()
    assert not lock.locked()
    assert lock.acquire(5) is True
    assert lock.token is not None and first is not None and lock.token > first
    lock.release()


def test_lock_waiters_of_both_fronts_share_one_fifo_queue(
    front: Front, front_child: FrontChild, raw: redis.Redis
) -> None:
    lock = front.Lock("fifo")
    a = holder(front_child, other(front), "fifo", mark="a")
    b = holder(front_child, front.name, "fifo", mark="b")
    c = holder(front_child, other(front), "fifo", mark="c")
    assert lock.acquire(5)
    for i, k in enumerate((a, b, c), start=1):
        k.send("acquire")
        wait_until(lambda i=i: lock.statistics().waiting == i, what=f"{k.name} to queue")
    lock.release()
    for k in (a, b, c):
        assert k.expect("acquired") == ["True"]
        give(k)
    assert raw.lrange("order", 0, -1) == ["a", "b", "c"]


def test_semaphore_permits_are_shared_by_both_fronts(front: Front, front_child: FrontChild) -> None:
    sem = front.Semaphore(2, name="s")
    h = holder(front_child, other(front), "s", kind="sem", value=2)
    take(h)
    assert sem.acquire(5) is True
    assert sem.value() == 0
    assert sem.acquire(0.2) is False
    assert sem.statistics().waiting == 0
    give(h)
    assert sem.acquire(5) is True
    sem.release()
    sem.release()
    assert sem.value() == 2
    sem.release()  # a Semaphore (not bounded) may go above its initial value
    assert sem.value() == 3


def test_bounded_semaphore_refuses_to_go_above_its_value(front: Front) -> None:
    sem = front.Semaphore(1, name="bs", bounded=True)
    with pytest.raises(ValueError) as info:
        sem.release()
    assert isinstance(info.value, OverReleaseError)
    assert sem.acquire(5)
    sem.release()
    with pytest.raises(OverReleaseError):
        sem.release()
    assert sem.value() == 1


def test_a_killed_holders_permit_comes_back_at_once(
    front: Front, front_child: FrontChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    sem = front.Semaphore(1, name="k", bounded=True)
    h = holder(front_child, other(front), "k", kind="bsem")
    take(h)
    h.kill()
    t0 = time.monotonic()
    assert sem.acquire(10) is True
    assert time.monotonic() - t0 < 3.0
    assert sem.statistics().reclaimed == 1
    sem.release()


def test_event_set_on_one_front_wakes_waiters_on_both(
    front: Front, front_child: FrontChild
) -> None:
    ev = front.Event("e")
    body = """
        ev = F.Event("e")
        say("ready")
        hear()
        say("woke", ev.wait(20))
    """
    kids = [front_child(f, body, name=f"{f}-waiter") for f in ("sync", "asyncio")]
    for k in kids:
        k.expect("ready")
        k.send()
    wait_until(lambda: procsync.Event("e").waiting() == 2, what="both waiters")
    assert ev.is_set() is False
    assert ev.wait(0.2) is False
    ev.set()
    for k in kids:
        assert k.expect("woke") == ["True"]
    assert ev.is_set() is True
    t0 = time.monotonic()
    assert ev.wait(10) is True  # set: returns at once
    assert time.monotonic() - t0 < 2.0
    ev.clear()
    assert ev.is_set() is False


# == the asyncio API ======================================================================


def test_the_asyncio_api_has_asyncio_signatures() -> None:
    assert set(pa.__all__) == {
        "Barrier",
        "BoundedSemaphore",
        "Condition",
        "Event",
        "Lock",
        "Semaphore",
    }
    assert not hasattr(pa, "RLock")  # as asyncio itself; documented in the module
    assert "RLock" in (pa.__doc__ or "")
    coroutines = {
        pa.Lock: ("acquire", "release", "locked", "statistics", "__aenter__", "__aexit__"),
        pa.Semaphore: ("acquire", "release", "locked", "get_value", "__aenter__"),
        pa.BoundedSemaphore: ("acquire", "release"),
        pa.Event: ("wait", "set", "clear", "is_set"),
        pa.Condition: (
            "acquire",
            "release",
            "wait",
            "wait_for",
            "notify",
            "notify_all",
            "__aenter__",
            "__aexit__",
        ),
        pa.Barrier: ("wait", "reset", "abort", "n_waiting", "broken"),
    }
    for cls, names in coroutines.items():
        for n in names:
            assert inspect.iscoroutinefunction(getattr(cls, n)), f"{cls.__name__}.{n}"
    # asyncio's parameters: no blocking/timeout on acquire, no timeout on wait
    assert list(inspect.signature(pa.Lock.acquire).parameters) == ["self"]
    assert list(inspect.signature(pa.Event.wait).parameters) == ["self"]
    assert list(inspect.signature(pa.Condition.wait).parameters) == ["self"]
    assert list(inspect.signature(pa.Condition.notify).parameters) == ["self", "n"]
    assert pa.Barrier(3, name="sig").parties == 3


def test_asyncio_primitives_pickle_as_their_name(ps_url: str) -> None:
    made = [
        pa.Lock("p"),
        pa.Semaphore(3, name="p"),
        pa.BoundedSemaphore(2, name="p"),
        pa.Event("p"),
        pa.Condition(pa.Lock("pl"), name="p"),
        pa.Barrier(4, name="p"),
    ]
    for obj in made:
        copy = pickle.loads(pickle.dumps(obj))
        assert type(copy) is type(obj)
        assert copy.name == obj.name
    assert pickle.loads(pickle.dumps(made[1])).initial_value == 3
    assert pickle.loads(pickle.dumps(made[5])).parties == 4


def test_async_with_takes_and_gives_back(ps_url: str) -> None:
    async def main() -> None:
        lock, sem = pa.Lock("aw"), pa.Semaphore(2, name="aws")
        cond = pa.Condition(name="awc")
        async with lock:
            assert await lock.locked()
        assert not await lock.locked()
        with pytest.raises(KeyError):
            async with lock, sem:
                assert await sem.get_value() == 1
                raise KeyError("inside")
        assert not await lock.locked()
        assert await sem.get_value() == 2
        async with cond:
            assert await cond.notify() == 0
        with pytest.raises(RuntimeError):
            await cond.notify()
        with pytest.raises(RuntimeError):
            await cond.wait()

    asyncio.run(main())


# == cancellation at every await point of acquire =========================================


class ScriptSpy:
    """Wraps ``Backend.acall``: records each (script, op) sent, and can hold back the
    reply of one chosen call — already executed by the server — until released, so a
    cancellation can land while that reply is in flight."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, str]] = []
        self.target: tuple[str, str] | None = None
        self.reached: asyncio.Event | None = None
        self.gate: asyncio.Event | None = None
        orig = Backend.acall
        spy = self

        async def acall(
            self: Backend, script: str, keys: Any, args: Any, timeout: float | None = None
        ) -> list[Any]:
            reply = await orig(self, script, keys, args, timeout)
            op = (script, str(args[1]))
            spy.calls.append(op)
            if spy.target == op and spy.reached is not None and spy.gate is not None:
                spy.target = None
                spy.reached.set()
                await spy.gate.wait()
            return reply

        monkeypatch.setattr(Backend, "acall", acall)

    def hold(self, script: str, op: str) -> None:
        """Hold the reply of the next (script, op) call; call inside the loop."""
        self.target = (script, op)
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()

    def ops(self, script: str) -> list[str]:
        return [op for s, op in self.calls if s == script]


@pytest.fixture
def spy(ps_url: str, monkeypatch: pytest.MonkeyPatch) -> ScriptSpy:
    return ScriptSpy(monkeypatch)


async def lock_state(lock: pa.Lock) -> tuple[bool, int | None, int]:
    """(locked, owner pid, queue length) as the server says."""
    st = await lock.statistics()
    return st.locked, (st.owner.pid if st.owner else None), st.waiting


def test_cancelled_before_it_ever_ran(ps_url: str, spy: ScriptSpy) -> None:
    async def main() -> None:
        lock = pa.Lock("c0")
        task = asyncio.create_task(lock.acquire())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await lock_state(lock) == (False, None, 0)
        assert "acquire" not in spy.ops("permits")

    asyncio.run(main())


@pytest.mark.parametrize("stage", ["resolving the server", "opening the session"])
def test_cancelled_during_first_use(ps_url: str, spy: ScriptSpy, stage: str) -> None:
    """The first awaits of a first acquire run in worker threads (the embedded-server
    check and the session's first round trip): cancelled there, nothing is queued."""

    async def main() -> None:
        close_all()
        lock = pa.Lock("c1")
        if stage == "opening the session":
            await lock.locked()  # the server is resolved; no session is open yet
        task = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)  # the task runs up to its first await, a worker thread
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "acquire" not in spy.ops("permits")
        assert await lock_state(lock) == (False, None, 0)
        assert await lock.acquire()
        await lock.release()

    asyncio.run(main())


def test_cancelled_while_the_granting_reply_is_in_flight_gives_the_lock_back(
    ps_url: str, spy: ScriptSpy
) -> None:
    """The server granted the lock at once, but the task was cancelled before it saw
    the reply: the grant is undone before CancelledError propagates."""

    async def main() -> None:
        lock = pa.Lock("c2")
        await lock.locked()
        spy.hold("permits", "acquire")
        assert spy.reached is not None and spy.gate is not None
        task = asyncio.create_task(lock.acquire())
        await spy.reached.wait()
        # The server has granted it to this process:
        assert (await lock_state(lock))[:2] == (True, os.getpid())
        task.cancel()
        spy.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await lock_state(lock) == (False, None, 0)
        assert not lock.lost
        assert spy.ops("permits").count("release") == 1

    asyncio.run(main())


def test_cancelled_while_the_queueing_reply_is_in_flight_leaves_the_queue(
    ps_url: str, spy: ScriptSpy, front_child: FrontChild
) -> None:
    h = holder(front_child, "sync", "c3")
    take(h)

    async def main() -> None:
        lock = pa.Lock("c3")
        await lock.locked()
        spy.hold("permits", "acquire")
        assert spy.reached is not None and spy.gate is not None
        task = asyncio.create_task(lock.acquire())
        await spy.reached.wait()
        assert await lock_state(lock) == (True, h.pid, 1)  # queued on the server
        task.cancel()
        spy.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await lock_state(lock) == (True, h.pid, 0)
        assert "cancel" in spy.ops("permits")

    asyncio.run(main())
    give(h)
    assert not procsync.Lock("c3").locked()  # not granted to the cancelled waiter


def test_cancelled_while_queued_leaves_nothing_behind(
    ps_url: str, raw: redis.Redis, front_child: FrontChild
) -> None:
    h = holder(front_child, "sync", "c4")
    take(h)

    async def main() -> None:
        lock = pa.Lock("c4")
        task = asyncio.create_task(lock.acquire())
        await parked(raw)
        assert await lock_state(lock) == (True, h.pid, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await lock_state(lock) == (True, h.pid, 0)

    asyncio.run(main())
    give(h)
    assert not procsync.Lock("c4").locked()
    assert blocked_clients(raw) == 0


def test_a_timeout_while_queued_leaves_nothing_behind(ps_url: str, front_child: FrontChild) -> None:
    h = holder(front_child, "sync", "c5")
    take(h)

    async def main() -> None:
        lock, sem = pa.Lock("c5"), pa.Semaphore(0, name="c5s")
        for prim in (lock, sem):
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await prim.acquire()
            assert 0.5 <= time.monotonic() - t0 < 3.0
            assert (await prim.statistics()).waiting == 0
        assert await lock_state(lock) == (True, h.pid, 0)
        assert await sem.get_value() == 0

    asyncio.run(main())
    give(h)
    assert not procsync.Lock("c5").locked()


def test_cancelled_right_after_the_grant_gives_the_lock_back(
    ps_url: str, raw: redis.Redis, front_child: FrontChild
) -> None:
    """The holder releases, the server grants the lock to the waiting task and pushes
    the token to its blocked pop, and the task is cancelled before it reads it: as
    anyio, "cancelled means it did not happen", so the lock must be free again (or,
    had the task won the race, held by it and known to be).

    Regression (issue 3): the pop consumed the token, the cancel script found neither
    the waiter queued nor the token in its inbox, and the lock stayed held."""
    h = holder(front_child, "sync", "c6")
    take(h)

    async def main() -> None:
        lock = pa.Lock("c6")
        task = asyncio.create_task(lock.acquire())
        await parked(raw)
        # Blocking this loop on purpose: the grant reaches the task's socket while
        # the task cannot run, then the cancellation lands first.
        give(h)
        task.cancel()
        try:
            got = await task
        except asyncio.CancelledError:
            got = None
        locked, owner, waiting = await lock_state(lock)
        if got:  # the task won: it holds the lock, and knows it
            assert (locked, owner) == (True, os.getpid())
            await lock.release()
        else:
            assert (locked, owner, waiting) == (False, None, 0), "the grant was kept"

    asyncio.run(main())


def test_a_cancelled_semaphore_waiter_leaves_the_queue(
    ps_url: str, raw: redis.Redis, front_child: FrontChild
) -> None:
    h = holder(front_child, "sync", "c7", kind="sem", value=1)
    take(h)

    async def main() -> None:
        sem = pa.Semaphore(1, name="c7")
        task = asyncio.create_task(sem.acquire())
        await parked(raw)
        assert (await sem.statistics()).waiting == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        st = await sem.statistics()
        assert (st.value, st.waiting, [x.pid for x in st.holders]) == (0, 0, [h.pid])

    asyncio.run(main())
    give(h)
    assert procsync.Semaphore(1, name="c7").value == 1


def test_a_cancelled_condition_wait_holds_the_lock_again_before_it_ends(
    ps_url: str, raw: redis.Redis, front_child: FrontChild
) -> None:
    """As asyncio.Condition: a cancelled wait() re-acquires the lock before raising —
    here it must first wait for another process that took the lock meanwhile — and
    leaves no waiter behind."""
    other_proc = front_child(
        "sync",
        """
        cond = procsync.Condition(name="cw")
        say("ready")
        hear()
        cond.acquire()
        say("held")
        hear()
        cond.release()
        say("released")
    """,
    )
    other_proc.expect("ready")

    async def main() -> None:
        cond = pa.Condition(name="cw")
        lock = pa.Lock("cw:lock")
        seen: list[Any] = []

        async def waiter() -> None:
            async with cond:
                try:
                    await cond.wait()
                except asyncio.CancelledError:
                    seen.append(await lock_state(lock))
                    raise

        task = asyncio.create_task(waiter())
        await parked(raw)
        assert await cond.waiters() == 1
        await asyncio.to_thread(other_proc.send)
        await asyncio.to_thread(other_proc.expect, "held")
        task.cancel()
        deadline = time.monotonic() + 5
        while (await lock_state(lock))[2] < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert not task.done()  # it waits for the lock before raising
        assert await lock_state(lock) == (True, other_proc.pid, 1)
        await asyncio.to_thread(other_proc.send)
        await asyncio.to_thread(other_proc.expect, "released")
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == [(True, os.getpid(), 0)]
        assert await cond.waiters() == 0
        assert await lock_state(lock) == (False, None, 0)

    asyncio.run(main())


def test_a_cancelled_event_wait_leaves_no_waiter(ps_url: str, raw: redis.Redis) -> None:
    async def main() -> None:
        ev = pa.Event("ce")
        task = asyncio.create_task(ev.wait())
        await parked(raw)
        assert procsync.Event("ce").waiting() == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert procsync.Event("ce").waiting() == 0
        assert not await ev.is_set()

    asyncio.run(main())


def test_a_cancel_landing_as_the_waiter_sends_its_pop_is_not_lost(
    ps_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cancellation is delivered at a controlled point: right as the write of the
    waiter's blocking pop completes (a wrapper around redis-py's socket write calls
    ``task.cancel()`` after it). The waiting task must end in CancelledError; in the
    wild this happens whenever a cancel or a timeout lands in that loop tick, which
    on a fresh connection is most of the time (measured: 28 of 40 trials).

    Regression (issue 3): redis-py's asyncio write goes through asyncio.wait_for,
    which before Python 3.12 swallows a cancellation arriving as the write completes
    (CPython #86296); the pop was awaited directly, so the task went on waiting."""
    from redis.asyncio.connection import AbstractConnection

    orig = AbstractConnection._send_packed_command
    victim: list[asyncio.Task[Any]] = []

    async def send(self: AbstractConnection, command: Any) -> None:
        chunks = list(command)
        await orig(self, chunks)
        if victim and any(b"BLPOP" in bytes(c) for c in chunks):
            victim.pop().cancel()

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", send)

    async def main() -> bool:
        ev = pa.Event("prompt")
        task = asyncio.create_task(ev.wait())
        victim.append(task)
        done, _ = await asyncio.wait({task}, timeout=1)
        assert not victim, "the pop was never sent"
        return bool(done) and task.cancelled()

    assert asyncio.run(main()), "the task was still waiting 1 s after cancel()"
    assert procsync.Event("prompt").waiting() == 0


def test_a_cancelled_barrier_wait_breaks_the_barrier_as_an_interrupted_threading_wait(
    ps_url: str, raw: redis.Redis, front_child: FrontChild
) -> None:
    """threading breaks a Barrier whose wait is interrupted; procsync does the same
    for a cancelled task (documented in core/barrier.py), so no party is left
    waiting for one that will never come."""
    kid = front_child(
        "sync",
        """
        b = procsync.Barrier(3, name="cb")
        say("ready")
        hear()
        try:
            say("passed", b.wait(20))
        except BrokenBarrierError:
            say("broken")
    """,
    )
    kid.expect("ready")
    kid.send()

    async def main() -> None:
        b = pa.Barrier(3, name="cb")
        await parked(raw, 1)  # the other process's party
        task = asyncio.create_task(b.wait())
        await parked(raw, 2)
        assert await b.n_waiting() == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await b.broken()
        assert await b.n_waiting() == 0
        await b.reset()
        assert not await b.broken()

    asyncio.run(main())
    assert kid.expect("broken") == []


# == first use from many tasks ============================================================


def test_tasks_acquiring_together_on_first_use_keep_their_locks(ps_url: str) -> None:
    """Regression: concurrent first use opened one session per task (session_for ran
    in several worker threads at once) and installing one closed the others, whose
    locks the server dropped: acquire() had returned True, the lock was free, and
    .lost said nothing. Each trial is a new loop, so a new executor, as it failed."""

    async def trial(i: int) -> list[bool]:
        locks = [pa.Lock(f"first{i}-{j}") for j in range(8)]
        for lk in locks:
            await lk.locked()  # the server is resolved; no session yet
        assert all(await asyncio.gather(*[lk.acquire() for lk in locks]))
        held = [await lk.locked() for lk in locks]
        assert not any(lk.lost for lk in locks)
        for lk, h in zip(locks, held, strict=True):
            if h:
                await lk.release()
        return held

    for i in range(10):
        close_all()
        held = asyncio.run(trial(i))
        assert all(held), f"trial {i}: {held.count(False)} of 8 granted locks were dropped"


# == no blocking call on the event loop ===================================================


class BlockingCallDetector:
    """Records blocking socket operations and sleeps made on one thread (the loop's).

    Non-blocking sockets (timeout 0.0: asyncio's transports) are fine; a socket in
    blocking or timeout mode used from the loop thread — a redis-py *sync* client, or
    anything else — is a blocking call, as is ``time.sleep``.
    """

    SOCKET_OPS = ("connect", "send", "sendall", "recv", "recv_into", "recvfrom", "sendto")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.thread: int | None = None
        self.hits: list[str] = []
        for name in self.SOCKET_OPS:
            orig = getattr(socket.socket, name)
            monkeypatch.setattr(socket.socket, name, self._wrap_socket(name, orig))
        sleep = time.sleep

        def checked_sleep(secs: float) -> None:
            self._hit(f"time.sleep({secs})")
            sleep(secs)

        monkeypatch.setattr(time, "sleep", checked_sleep)

    def _hit(self, what: str) -> None:
        if self.thread is not None and threading.get_ident() == self.thread:
            stack = "".join(traceback.format_stack(limit=12)[:-2])
            self.hits.append(f"{what}\n{stack}")

    def _wrap_socket(self, name: str, orig: Any) -> Any:
        detector = self

        def wrapped(sock: socket.socket, *args: Any, **kwargs: Any) -> Any:
            if sock.gettimeout() != 0.0:
                detector._hit(f"blocking socket.{name} (timeout {sock.gettimeout()})")
            return orig(sock, *args, **kwargs)

        return wrapped


class SlowCallbacks(logging.Handler):
    """Collects asyncio debug mode's "Executing <...> took N seconds" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Executing") and "took" in msg:
            self.records.append(msg)


@pytest.fixture
def loop_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[BlockingCallDetector, SlowCallbacks]]:
    detector = BlockingCallDetector(monkeypatch)
    slow = SlowCallbacks()
    log = logging.getLogger("asyncio")
    log.addHandler(slow)
    try:
        yield detector, slow
    finally:
        log.removeHandler(slow)


#: Slow-callback threshold: far below any blocking pop (up to 10 s) or wait, and
#: far above a loop step on a busy 2-core machine.
SLOW_CALLBACK = 0.25


def run_watched(coro_fn: Any, detector: BlockingCallDetector) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = SLOW_CALLBACK
        detector.thread = threading.get_ident()
        try:
            await coro_fn()
        finally:
            detector.thread = None

    asyncio.run(main(), debug=True)


def test_the_detectors_see_a_blocking_call(
    ps_url: str, loop_watch: tuple[BlockingCallDetector, SlowCallbacks]
) -> None:
    """Control: a blocking procsync call made on the loop is caught by both."""
    detector, slow = loop_watch

    async def blocking() -> None:
        procsync.Event("control").wait(0.4)  # blocking on purpose

    run_watched(blocking, detector)
    assert detector.hits, "the socket detector missed a blocking call"
    assert slow.records, "debug mode missed a 0.4 s blocking call"


def test_no_blocking_call_runs_on_the_event_loop(
    ps_url: str,
    raw: redis.Redis,
    children: ChildFactory,
    loop_watch: tuple[BlockingCallDetector, SlowCallbacks],
) -> None:
    """Every asyncio primitive, from first use (server resolution, session opening)
    through contention with another process (queued acquire, same-host holder watch,
    pushed wake-ups) to cancellation, with asyncio debug mode on and every blocking
    socket operation or sleep on the loop thread recorded."""
    detector, slow = loop_watch
    close_all()
    partner = children(
        """
        lock, sem = Lock("nb-lock"), Semaphore(1, name="nb-sem")
        ev, cond, bar = Event("nb-ev"), Condition(name="nb-cond"), Barrier(2, name="nb-bar")
        say("ready")
        while True:
            cmd = hear()
            if cmd == "hold":
                lock.acquire(); sem.acquire(); say("held")
            elif cmd == "release":
                lock.release(); sem.release(); say("released")
            elif cmd == "set":
                ev.set(); say("set")
            elif cmd == "notify":
                with cond:
                    say("notified", cond.notify())
            elif cmd == "barrier":
                say("passed", bar.wait(20))
            elif cmd == "exit":
                break
    """,
        name="partner",
    )
    partner.expect("ready")

    async def tell(cmd: str, answer: str) -> list[str]:
        await asyncio.to_thread(partner.send, cmd)
        return await asyncio.to_thread(partner.expect, answer)

    async def workload() -> None:
        lock, sem = pa.Lock("nb-lock"), pa.Semaphore(1, name="nb-sem")
        bsem = pa.BoundedSemaphore(1, name="nb-bsem")
        ev, cond, bar = (
            pa.Event("nb-ev"),
            pa.Condition(name="nb-cond"),
            pa.Barrier(2, name="nb-bar"),
        )
        # first use: resolving the server and opening the session
        async with lock:
            assert await lock.locked()
        await tell("hold", "held")
        # contended: both wait in the server's queues, watching the holder's pid
        waits = [asyncio.create_task(lock.acquire()), asyncio.create_task(sem.acquire())]
        while (await lock.statistics()).waiting < 1 or (await sem.statistics()).waiting < 1:
            await asyncio.sleep(0.01)
        await tell("release", "released")
        assert await asyncio.gather(*waits) == [True, True]
        await lock.release()
        await sem.release()
        with pytest.raises(OverReleaseError):
            await bsem.release()
        async with bsem:
            pass
        # Event: a pushed wake-up
        wait_ev = asyncio.create_task(ev.wait())
        while await _event_waiters(ev) < 1:
            await asyncio.sleep(0.01)
        await tell("set", "set")
        assert await wait_ev is True
        await ev.clear()
        # Condition: wait releases the lock atomically, a notify from the other process
        wait_c = asyncio.create_task(_wait_once(cond))
        while await cond.waiters() < 1:
            await asyncio.sleep(0.01)
        assert await tell("notify", "notified") == ["1"]
        assert await wait_c is True
        # Barrier with the other process
        passing = asyncio.create_task(tell("barrier", "passed"))
        assert await bar.wait() in (0, 1)
        await passing
        # cancellation while queued
        await tell("hold", "held")
        task = asyncio.create_task(lock.acquire())
        await parked(raw)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await tell("release", "released")
        assert not await lock.locked()
        with pytest.raises(BrokenBarrierError):
            async with asyncio.timeout(5):
                await bar.abort()
                await bar.wait()

    run_watched(workload, detector)
    partner.send("exit")
    assert detector.hits == [], "blocking calls on the event loop:\n" + "\n".join(detector.hits)
    assert slow.records == [], slow.records


async def _event_waiters(ev: pa.Event) -> int:
    # procsync.asyncio.Event has no waiter count; ask the blocking one off the loop.
    return await asyncio.to_thread(lambda: procsync.Event(ev.name).waiting())


async def _wait_once(cond: pa.Condition) -> bool:
    async with cond:
        return await cond.wait()
