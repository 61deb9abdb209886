"""Condition against threading.Condition, on both fronts (issue 3).

Every behavioural test runs on the blocking front (``procsync.Condition``) and the
asyncio front (``procsync.asyncio.Condition``) through :mod:`fronts`, against each
server of the leg. Waiters are unrelated processes; nothing here sleeps to
synchronise: the tests wait for what the server says (``waiters()``, the lock's
queue) or for what a child says.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from typing import TYPE_CHECKING

import pytest
import redis

import procsync
import procsync.asyncio as pa
from fronts import Front
from helpers.keys import leftover_keys
from helpers.procs import Child, wait_until
from procsync import NotHeldError

if TYPE_CHECKING:
    from fronts_fixtures import FrontChild

pytest_plugins = ["helpers.fixtures", "fronts_fixtures"]

#: A waiter process: on "wait" it enters the condition and waits (up to T seconds),
#: then says whether it was notified and whether it held the lock on return.
WAITER = """
cond = F.Condition(name=NAME)
lock_stats = procsync.Lock(NAME + ":lock").statistics
say("ready")
while True:
    cmd = hear()
    if cmd == "wait":
        with cond:
            ok = cond.wait(T)
            owner = lock_stats().owner
            say("woke", ok, owner is not None and owner.pid == os.getpid())
    elif cmd == "exit":
        break
"""


def cond_lock_stats(name: str) -> procsync.LockStatistics:
    """The server's view of a named condition's default lock ``"<name>:lock"``."""
    return procsync.Lock(f"{name}:lock").statistics()


def start_waiters(
    front_child: FrontChild, front: str, name: str, n: int, timeout: float = 20.0
) -> list[Child]:
    """n waiter processes, ready (not yet waiting)."""
    kids = [front_child(front, WAITER, name=f"waiter{i}", NAME=name, T=timeout) for i in range(n)]
    for k in kids:
        k.expect("ready")
    return kids


def enter_wait(kids: list[Child], cond: object, already: int = 0) -> None:
    """Make each child wait, one after the other, so their order on the server is
    the list's order (each one is seen among the waiters before the next starts)."""
    for i, k in enumerate(kids, start=already + 1):
        k.send("wait")
        wait_until(lambda i=i: cond.waiters() == i, what=f"{k.name} to wait")  # type: ignore[attr-defined]


# -- misuse ------------------------------------------------------------------------------


def test_wait_and_notify_without_the_lock_raise_runtime_error(front: Front) -> None:
    cond = front.Condition(name="c")
    for call in (lambda: cond.wait(0.1), cond.notify, cond.notify_all):
        with pytest.raises(RuntimeError) as info:
            call()
        assert isinstance(info.value, NotHeldError)
    assert cond.waiters() == 0
    assert not cond_lock_stats("c").locked


def test_wait_without_the_lock_while_another_process_holds_it(
    front: Front, front_child: FrontChild
) -> None:
    holder = front_child(
        front.name,
        """
        cond = F.Condition(name="c")
        cond.acquire()
        say("held")
        hear()
    """,
    )
    holder.expect("held")
    cond = front.Condition(name="c")
    with pytest.raises(RuntimeError):
        cond.wait(0.1)
    with pytest.raises(RuntimeError):
        cond.notify()
    assert cond_lock_stats("c").owner.pid == holder.pid  # type: ignore[union-attr]


def test_condition_refuses_locks_that_are_not_shared_between_processes(ps_url: str) -> None:
    with pytest.raises(TypeError):
        procsync.Condition(threading.Lock())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        procsync.Condition(threading.RLock())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pa.Condition(procsync.Lock("x"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        procsync.Condition(pa.Lock("x"))  # type: ignore[arg-type]


# -- wait / notify -------------------------------------------------------------------------


def test_wait_times_out_with_false_and_the_lock_held_again(front: Front) -> None:
    cond = front.Condition(name="c")
    with cond:
        t0 = time.monotonic()
        assert cond.wait(0.3) is False
        elapsed = time.monotonic() - t0
        st = cond_lock_stats("c")
        assert st.locked and st.owner is not None and st.owner.pid == os.getpid()
        assert cond.waiters() == 0
        assert cond.wait(0) is False  # zero (and negative, for sync) budgets do not wait
    assert 0.3 <= elapsed < 3.0
    assert not cond_lock_stats("c").locked


def test_notify_wakes_a_waiter_in_another_process(front: Front, front_child: FrontChild) -> None:
    cond = front.Condition(name="c")
    (w,) = start_waiters(front_child, front.name, "c", 1)
    enter_wait([w], cond)
    with cond:
        assert cond.notify() == 1
    assert w.expect("woke") == ["True", "True"]
    assert cond.waiters() == 0


def test_a_notified_waiter_returns_only_once_it_holds_the_lock_again(
    front: Front, front_child: FrontChild
) -> None:
    cond = front.Condition(name="c")
    (w,) = start_waiters(front_child, front.name, "c", 1)
    enter_wait([w], cond)
    cond.acquire()
    try:
        assert cond.notify() == 1
        # The waiter was woken and now queues for the lock this process still holds.
        wait_until(lambda: cond_lock_stats("c").waiting == 1, what="the waiter to queue")
        assert cond_lock_stats("c").owner.pid == os.getpid()  # type: ignore[union-attr]
    finally:
        cond.release()
    # notified, and the lock is the waiter's when wait() returns
    assert w.expect("woke") == ["True", "True"]


def test_waiter_and_notifier_in_one_process(front: Front) -> None:
    """Threads (blocking front) or tasks (asyncio front) of one process share the
    condition as threading's or asyncio's would."""
    cond = front.Condition(name="local")
    out: list[bool] = []

    def waiter() -> None:
        with cond:
            out.append(cond.wait(10))

    t = threading.Thread(target=waiter)
    t.start()
    try:
        wait_until(lambda: cond.waiters() == 1, what="the waiting thread")
        with cond:
            assert cond.notify() == 1
    finally:
        t.join(15)
    assert out == [True]
    assert not cond_lock_stats("local").locked


def test_notify_n_wakes_at_most_n_in_arrival_order(front: Front, front_child: FrontChild) -> None:
    cond = front.Condition(name="c")
    kids = start_waiters(front_child, front.name, "c", 4)
    enter_wait(kids, cond)
    with cond:
        assert cond.notify(2) == 2
    woken = {kids[0].name, kids[1].name}
    for k in kids[:2]:
        assert k.expect("woke") == ["True", "True"]
    assert cond.waiters() == 2, woken
    with cond:
        assert cond.notify(1) == 1
    assert kids[2].expect("woke") == ["True", "True"]
    with cond:
        assert cond.notify_all() == 1
    assert kids[3].expect("woke") == ["True", "True"]
    assert cond.waiters() == 0


def test_notify_all_wakes_every_waiter_and_nobody_later(
    front: Front, front_child: FrontChild
) -> None:
    cond = front.Condition(name="c")
    kids = start_waiters(front_child, front.name, "c", 3)
    enter_wait(kids, cond)
    with cond:
        assert cond.notify_all() == 3
        assert cond.notify_all() == 0
        assert cond.notify(5) == 0
        # A notify reaches only the waiters present when it is made.
        assert cond.wait(0.2) is False
    for k in kids:
        assert k.expect("woke") == ["True", "True"]
    assert cond.waiters() == 0


def test_no_wake_up_is_lost_between_processes(front: Front, front_child: FrontChild) -> None:
    """Strict turn taking through one condition: a notify lost between a waiter's
    release of the lock and its joining the waiters would stall a round (then the
    bounded wait_for returns False and the round fails)."""
    rounds = 30
    child = front_child(
        front.name,
        """
        import redis
        r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
        cond = F.Condition(name="pp")
        say("ready")
        for i in range(ROUNDS):
            with cond:
                if not cond.wait_for(lambda: r.get("turn") == "child", 10):
                    say("stalled", i)
                    raise SystemExit(1)
                r.incr("moves")
                r.set("turn", "parent")
                cond.notify()
        say("done")
    """,
        ROUNDS=rounds,
    )
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
    r.set("turn", "child")
    cond = front.Condition(name="pp")
    child.expect("ready")
    for i in range(rounds):
        with cond:
            assert cond.wait_for(lambda: r.get("turn") == "parent", 10), f"round {i} stalled"
            assert int(r.get("moves") or 0) == i + 1
            r.set("turn", "child")
            cond.notify()
    child.expect("done")
    assert child.wait() == 0
    r.close()


def test_wait_for_returns_the_predicate_value_or_its_last_value_on_timeout(
    front: Front, front_child: FrontChild
) -> None:
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
    cond = front.Condition(name="wf")
    with cond:
        t0 = time.monotonic()
        assert cond.wait_for(lambda: r.get("x"), 0.3) is None
        assert 0.3 <= time.monotonic() - t0 < 3.0
        r.set("x", "now")
        assert cond.wait_for(lambda: r.get("x"), 0.3) == "now"  # true at once: no wait
    r.delete("x")
    setter = front_child(
        front.name,
        """
        import redis
        r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
        cond = F.Condition(name="wf")
        say("ready")
        hear()
        with cond:
            r.set("x", "done")
            cond.notify_all()
        say("set")
    """,
    )
    setter.expect("ready")
    with cond:
        setter.send()
        assert cond.wait_for(lambda: r.get("x"), 10) == "done"
    setter.expect("set")
    r.close()


def test_condition_on_an_explicit_lock_releases_that_lock_while_waiting(
    front: Front, front_child: FrontChild
) -> None:
    lock = front.Lock("m")
    cond = front.Condition(lock, name="onm")
    other = front_child(
        front.name,
        """
        lock = F.Lock("m")
        cond = F.Condition(lock, name="onm")
        say("ready")
        hear()
        assert lock.acquire(10)
        say("got", cond.notify())
        lock.release()
    """,
    )
    other.expect("ready")
    with cond:
        assert lock.statistics().owner.pid == os.getpid()  # type: ignore[union-attr]
        other.send()
        # The other process can take the lock only because wait() released it.
        assert cond.wait(10) is True
        assert lock.statistics().owner.pid == os.getpid()  # type: ignore[union-attr]
    assert other.expect("got") == ["1"]
    assert not lock.locked()


def test_sync_condition_on_an_rlock_restores_its_depth(ps_url: str) -> None:
    """(blocking front only: asyncio has no RLock, neither has procsync.asyncio)"""
    rlock = procsync.RLock("r")
    cond = procsync.Condition(rlock, name="onr")
    with cond, cond, cond:
        assert rlock.depth == 3
        assert cond.wait(0.05) is False
        assert rlock.depth == 3
        st = rlock.statistics()
        assert st.locked and st.owner.pid == os.getpid()  # type: ignore[union-attr]
    assert rlock.depth == 0
    assert not rlock.locked()
    with pytest.raises(RuntimeError):
        rlock.release()
    assert not hasattr(pa, "RLock")


def test_sync_default_lock_is_reentrant_like_threading(ps_url: str) -> None:
    cond = procsync.Condition(name="d")
    with cond, cond:
        assert cond.wait(0.05) is False
    assert not cond_lock_stats("d").locked


# -- crashes -------------------------------------------------------------------------------


def test_a_dead_waiter_on_this_host_is_skipped_at_once(
    front: Front, front_child: FrontChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 3: notify(n) wakes live waiters; a waiter whose process died is skipped
    and its notification passes to the next one. With a 30 s ttl only same-host death
    detection (pid gone) can make it so right after the kill.

    Regression (issue 3): notify used to wake the dead waiter, whose lease still ran,
    and no live one."""
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    cond = front.Condition(name="c")
    kids = start_waiters(front_child, front.name, "c", 2)
    enter_wait(kids, cond)
    dead, live = kids
    dead.kill()
    t0 = time.monotonic()
    with cond:
        woken = cond.notify(1)
        # notify pops the waiters it wakes: had it woken the live one, nobody would
        # be waiting any more.
        still_waiting = cond.waiters()
    assert (woken, still_waiting) == (1, 0), "notify(1) went to the dead waiter"
    assert live.expect("woke", timeout=5) == ["True", "True"]
    assert time.monotonic() - t0 < 5


def test_a_dead_waiter_is_skipped_once_its_lease_ended(
    front: Front, front_child: FrontChild
) -> None:
    """The skip itself: the dead waiter (first in line) had a 1 s lease; once the
    server no longer counts it, notify(1) passes over it to the live one."""
    cond = front.Condition(name="c")
    dead = front_child(front.name, WAITER, name="dead", env={"PROCSYNC_TTL": "1"}, NAME="c", T=20.0)
    (live,) = start_waiters(front_child, front.name, "c", 1)
    dead.expect("ready")
    enter_wait([dead, live], cond)
    dead.kill()
    wait_until(lambda: cond.waiters() == 1, timeout=5, what="the dead waiter's lease to end")
    with cond:
        assert cond.notify(1) == 1
        assert cond.waiters() == 0
    assert live.expect("woke") == ["True", "True"]


# -- across fronts -------------------------------------------------------------------------

PRODUCER = """
import redis
r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
lock = F.Lock("buf")
not_full = F.Condition(lock, name="not_full")
not_empty = F.Condition(lock, name="not_empty")
say("ready")
hear()
for i in range(N):
    with lock:
        if not not_full.wait_for(lambda: r.llen("items") < CAP, 10):
            say("stalled", i)
            raise SystemExit(1)
        r.rpush("items", i)
        r.set("maxlen", max(int(r.get("maxlen") or 0), r.llen("items")))
        not_empty.notify()
say("produced")
"""

CONSUMER = """
import redis
r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
lock = F.Lock("buf")
not_full = F.Condition(lock, name="not_full")
not_empty = F.Condition(lock, name="not_empty")
got = []
say("ready")
hear()
while len(got) < N:
    with lock:
        if not not_empty.wait_for(lambda: r.llen("items") > 0, 10):
            say("stalled", len(got))
            raise SystemExit(1)
        got.append(int(r.lpop("items")))
        not_full.notify()
say("consumed", got == list(range(N)), len(got))
"""


@pytest.mark.parametrize(
    ("producer_front", "consumer_front"),
    [("sync", "asyncio"), ("asyncio", "sync")],
    ids=["sync-to-asyncio", "asyncio-to-sync"],
)
def test_producer_and_consumer_on_different_fronts(
    ps_url: str, front_child: FrontChild, producer_front: str, consumer_front: str
) -> None:
    """A bounded buffer (3 items, in Redis) between a producer process on one front
    and a consumer process on the other, with two conditions over one lock."""
    n, cap = 150, 3
    producer = front_child(producer_front, PRODUCER, name="producer", N=n, CAP=cap)
    consumer = front_child(consumer_front, CONSUMER, name="consumer", N=n)
    producer.expect("ready")
    consumer.expect("ready")
    consumer.send()
    producer.send()
    producer.expect("produced", timeout=60)
    assert consumer.expect("consumed", timeout=60) == ["True", str(n)]
    r = redis.Redis.from_url(ps_url, decode_responses=True)
    assert 1 <= int(r.get("maxlen") or 0) <= cap
    assert r.llen("items") == 0
    r.close()


def test_notify_on_one_front_wakes_a_waiter_on_the_other(
    front: Front, front_child: FrontChild
) -> None:
    other = "sync" if front.is_async else "asyncio"
    cond = front.Condition(name="x")
    kids = start_waiters(front_child, other, "x", 2)
    enter_wait(kids, cond)
    with cond:
        assert cond.notify() == 1
    assert kids[0].expect("woke") == ["True", "True"]
    with cond:
        assert cond.notify() == 1
    assert kids[1].expect("woke") == ["True", "True"]


def test_both_fronts_share_the_default_lock_of_a_name(
    front: Front, front_child: FrontChild
) -> None:
    other = "sync" if front.is_async else "asyncio"
    holder = front_child(
        other,
        """
        cond = F.Condition(name="shared")
        cond.acquire()
        say("held")
        hear()
        cond.release()
        say("released")
        hear()
    """,
    )
    holder.expect("held")
    cond = front.Condition(name="shared")
    assert cond.acquire(0.2) is False
    holder.send()
    holder.expect("released")
    assert cond.acquire(5) is True
    cond.release()


# -- state -----------------------------------------------------------------------------------


def test_pickles_as_its_name_and_lock(ps_url: str) -> None:
    cond = procsync.Condition(procsync.Lock("pl"), name="pc")
    copy = pickle.loads(pickle.dumps(cond))
    assert isinstance(copy, procsync.Condition)
    assert copy.name == "pc"
    with copy:
        assert procsync.Lock("pl").locked()
    anon = procsync.Condition()
    assert pickle.loads(pickle.dumps(anon)).name == anon.name


def test_nothing_is_left_on_the_server(front: Front, front_child: FrontChild) -> None:
    cond = front.Condition(name="c")
    kids = start_waiters(front_child, front.name, "c", 2)
    enter_wait(kids, cond)
    with cond:
        cond.notify()
    assert kids[0].expect("woke") == ["True", "True"]
    with cond:
        assert cond.wait(0.05) is False  # a timed-out waiter leaves the list too
        cond.notify()
    assert kids[1].expect("woke") == ["True", "True"]
    for k in kids:
        k.send("exit")
        assert k.wait() == 0
    front.close()
    procsync.session.close_all()
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
    assert leftover_keys(r) == []
    r.close()
