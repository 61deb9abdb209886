"""Semaphore and BoundedSemaphore against threading's: value, holders, release(n),
release by a non-holder, bounded over-release, timeouts, FIFO, "never more than N
holders" across processes, and a property test against threading's model."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import uuid

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import workers
from helpers.keys import leftover_keys
from helpers.procs import ChildFactory, wait_until
from procsync import BoundedSemaphore, OverReleaseError, Semaphore

pytest_plugins = ["helpers.fixtures"]


def test_value_holders_and_context_manager(ps_url: str) -> None:
    sem = Semaphore(3, name="ktv")
    assert sem.initial_value == 3
    assert sem.value == 3 == sem.get_value()
    assert sem.holders() == []
    assert sem.acquire() is True
    assert sem.acquire() is True
    assert sem.value == 1
    (me,) = sem.holders()
    assert me.pid == os.getpid() and me.permits == 2
    with sem as got:
        assert got is True
        assert sem.value == 0
        assert sem.acquire(blocking=False) is False
    assert sem.value == 1
    sem.release()
    sem.release()
    assert sem.value == 3
    assert sem.holders() == []


def test_default_value_is_one(ps_url: str) -> None:
    sem = Semaphore(name="one")
    assert sem.initial_value == 1
    assert sem.acquire(blocking=False)
    assert not sem.acquire(blocking=False)
    sem.release()


def test_timeouts_follow_threading(ps_url: str) -> None:
    sem = Semaphore(1, name="timeouts")
    assert sem.acquire()
    t0 = time.monotonic()
    assert sem.acquire(timeout=0.2) is False
    assert 0.2 <= time.monotonic() - t0 < 2.0
    # negative timeouts don't wait (threading computes an end time in the past)
    t0 = time.monotonic()
    assert sem.acquire(timeout=-1) is False
    assert sem.acquire(timeout=-5.5) is False
    assert threading.Semaphore(0).acquire(timeout=-1) is False
    assert sem.acquire(timeout=0) is False
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(ValueError):
        sem.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        threading.Semaphore(1).acquire(blocking=False, timeout=1)
    assert sem.statistics().waiting == 0
    sem.release()


def test_semaphore_zero_and_release_by_non_holder(ps_url: str) -> None:
    sem = Semaphore(0, name="zero")
    assert sem.value == 0
    assert sem.acquire(blocking=False) is False
    sem.release()  # threading: anybody may release, adding a permit
    assert sem.value == 1
    assert sem.acquire(blocking=False) is True
    assert sem.value == 0
    sem.release()


def test_release_beyond_initial_value_grows_it(ps_url: str) -> None:
    sem = Semaphore(2, name="grow")
    model = threading.Semaphore(2)
    sem.release()
    model.release()
    sem.release(2)
    model.release(2)
    assert sem.value == 5 == model._value  # type: ignore[attr-defined]


def test_release_n_returns_own_permits_then_adds(ps_url: str) -> None:
    sem = Semaphore(3, name="rel-n")
    for _ in range(3):
        assert sem.acquire()
    sem.release(2)
    assert sem.value == 2
    (me,) = sem.holders()
    assert me.permits == 1
    sem.release(3)  # one of mine, two added
    assert sem.value == 5
    assert sem.holders() == []


@pytest.mark.parametrize("bad", [0, -1])
def test_release_n_must_be_positive(ps_url: str, bad: int) -> None:
    with pytest.raises(ValueError):
        threading.Semaphore(1).release(bad)
    with pytest.raises(ValueError):
        Semaphore(1, name="n").release(bad)


def test_non_holder_process_release_adds_a_permit(ps_url: str, children: ChildFactory) -> None:
    sem = Semaphore(2, name="shared")
    sem.acquire()
    c = children(
        """
        sem = Semaphore(2, name="shared")
        sem.release()
        say("value", sem.value)
        """
    )
    assert c.expect("value") == ["2"]
    assert c.wait() == 0
    (me,) = sem.holders()
    assert me.pid == os.getpid()  # our permit is still ours
    sem.release()
    assert sem.value == 3


def test_bounded_over_release_raises_and_changes_nothing(ps_url: str, raw: redis.Redis) -> None:
    bsem = BoundedSemaphore(2, name="bounded")
    with pytest.raises(ValueError):
        threading.BoundedSemaphore(2).release()
    with pytest.raises(OverReleaseError) as info:
        bsem.release()
    assert isinstance(info.value, ValueError)
    assert bsem.value == 2
    assert leftover_keys(raw) == []
    bsem.acquire()
    before = raw.hgetall("procsync:{default}:bsem:bounded")
    with pytest.raises(ValueError):
        bsem.release(2)
    assert raw.hgetall("procsync:{default}:bsem:bounded") == before
    assert bsem.value == 1
    (me,) = bsem.holders()
    assert me.permits == 1
    bsem.release()
    assert bsem.value == 2
    with pytest.raises(ValueError):
        bsem.release()
    assert leftover_keys(raw) == []


def test_bounded_release_by_another_process_cannot_exceed(
    ps_url: str, children: ChildFactory
) -> None:
    """Permits are owned: the parent's permit counts, so a release by a process
    holding none would take the total above the initial value."""
    bsem = BoundedSemaphore(2, name="owned")
    bsem.acquire()
    c = children(
        """
        bsem = BoundedSemaphore(2, name="owned")
        try:
            bsem.release()
            say("released")
        except ValueError as exc:
            say("refused", type(exc).__name__)
        say("value", bsem.value)
        """
    )
    assert c.expect("refused") == ["OverReleaseError"]
    assert c.expect("value") == ["1"]
    bsem.release()
    assert bsem.value == 2


def test_release_n_wakes_n_waiters_in_arrival_order(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    sem = Semaphore(0, name="gate")
    code = """
    import redis
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"])
    sem = Semaphore(0, name="gate")
    say("ready")
    me = hear()
    if sem.acquire(timeout=20):
        r.rpush("order", me)
        say("in")
    hear()
    """
    waiters = [children(code, name=f"w{i}") for i in range(4)]
    for w in waiters:
        w.expect("ready")
    for i, w in enumerate(waiters):
        w.send(str(i))
        wait_until(lambda i=i: sem.statistics().waiting == i + 1, what=f"w{i} to queue")
    sem.release(2)
    waiters[0].expect("in")
    waiters[1].expect("in")
    assert sorted(raw.lrange("order", 0, -1)) == ["0", "1"]  # granted together
    assert sem.statistics().waiting == 2
    assert sem.value == 0
    sem.release()
    waiters[2].expect("in")
    assert raw.lrange("order", 2, -1) == ["2"]
    assert sem.statistics().waiting == 1
    holders = {h.pid for h in sem.holders()}
    assert holders == {waiters[0].pid, waiters[1].pid, waiters[2].pid}


def test_never_more_than_three_holders(ps_url: str, raw: redis.Redis) -> None:
    """Six forked processes take Semaphore(3) twenty times each; the number inside,
    counted at the server, never exceeds three."""
    ctx = multiprocessing.get_context("fork")
    sem = Semaphore(3, name="room")
    start, finish = ctx.Event(), ctx.Barrier(6)
    procs = [
        ctx.Process(target=workers.count_holders, args=(sem, 20, start, finish)) for _ in range(6)
    ]
    for p in procs:
        p.start()
    try:
        start.set()
        for p in procs:
            p.join(60)
        assert [p.exitcode for p in procs] == [0] * 6
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert raw.llen("work") == 120
    assert raw.get("inside") == "0"
    assert 1 <= int(raw.get("peak") or 0) <= 3
    assert sem.value == 3
    assert leftover_keys(raw) == []


def test_all_free_semaphore_leaves_no_keys(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    sem = BoundedSemaphore(2, name="leak")
    sem.acquire()
    sem.acquire()
    c = children(
        """
        sem = BoundedSemaphore(2, name="leak")
        say("try", sem.acquire(blocking=False), sem.acquire(timeout=0.05))
        say("got", sem.acquire(timeout=10))
        sem.release()
        say("released")
        """
    )
    assert c.expect("try") == ["False", "False"]
    wait_until(lambda: sem.statistics().waiting == 1, what="the child to queue")
    sem.release()
    assert c.expect("got") == ["True"]
    c.expect("released")
    assert c.wait() == 0
    sem.release()
    assert sem.value == 2
    assert leftover_keys(raw) == []


# -- property test against threading's model ---------------------------------------

OPS = st.lists(
    st.one_of(
        st.just(("acquire", 0)),
        st.tuples(st.just("release"), st.integers(min_value=1, max_value=3)),
    ),
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    bounded=st.booleans(),
    initial=st.integers(min_value=0, max_value=4),
    ops=OPS,
)
def test_single_process_matches_threading_model(
    ps_url: str, bounded: bool, initial: int, ops: list[tuple[str, int]]
) -> None:
    """Any sequence of non-blocking acquires and releases (n = 1..3) in one process
    gives the same results, errors and values as threading's (Bounded)Semaphore."""
    name = f"prop-{uuid.uuid4().hex}"
    if bounded:
        sem: Semaphore = BoundedSemaphore(initial, name=name)
        model: threading.Semaphore = threading.BoundedSemaphore(initial)
    else:
        sem = Semaphore(initial, name=name)
        model = threading.Semaphore(initial)
    for op, n in ops:
        if op == "acquire":
            assert sem.acquire(blocking=False) == model.acquire(blocking=False)
        else:
            try:
                model.release(n)
                expected: type[BaseException] | None = None
            except ValueError:
                expected = ValueError
            if expected is None:
                sem.release(n)
            else:
                with pytest.raises(expected):
                    sem.release(n)
        assert sem.value == model._value  # type: ignore[attr-defined]
