"""RLock against threading.RLock: reentrancy, per-thread ownership, per-process
ownership, hand-off between threads, and no keys left behind."""

from __future__ import annotations

import threading

import pytest
import redis

from helpers.keys import leftover_keys
from helpers.procs import ChildFactory, wait_until
from procsync import Lock, NotHeldError, NotOwnerError, RLock

pytest_plugins = ["helpers.fixtures"]


def test_reentrant_for_the_holding_thread(ps_url: str) -> None:
    rl = RLock("re")
    assert rl.depth == 0
    assert rl.acquire() is True
    token = rl.token
    assert rl.acquire() is True
    assert rl.acquire(blocking=False) is True
    assert rl.acquire(timeout=0.01) is True
    assert rl.depth == 4
    assert rl.token == token  # re-entering is not a new grant
    for left in (3, 2, 1):
        rl.release()
        assert rl.depth == left
        assert rl.locked()
    rl.release()
    assert rl.depth == 0
    assert not rl.locked()


def test_nested_context_managers(ps_url: str) -> None:
    rl = RLock("nested")
    with rl as a, rl as b, rl as c:
        assert (a, b, c) == (True, True, True)
        assert rl.depth == 3
    assert not rl.locked()


def test_release_unheld_is_runtime_error(ps_url: str) -> None:
    rl = RLock("unheld")
    with pytest.raises(NotHeldError) as info:
        rl.release()
    assert isinstance(info.value, RuntimeError)  # what threading.RLock raises
    with pytest.raises(RuntimeError):
        threading.RLock().release()
    rl.acquire()
    rl.release()
    with pytest.raises(NotHeldError):
        rl.release()


def test_another_thread_can_neither_acquire_nor_release(ps_url: str) -> None:
    rl = RLock("per-thread")
    rl.acquire()
    rl.acquire()
    seen: dict[str, object] = {}

    def other() -> None:
        seen["try"] = rl.acquire(blocking=False)
        seen["timeout"] = rl.acquire(timeout=0.1)
        seen["depth"] = rl.depth
        try:
            rl.release()
        except BaseException as exc:
            seen["release"] = exc

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert seen["try"] is False
    assert seen["timeout"] is False
    assert seen["depth"] == 0
    assert isinstance(seen["release"], RuntimeError)  # as threading.RLock
    assert rl.depth == 2  # untouched
    rl.release()
    rl.release()
    assert not rl.locked()


def test_release_from_another_thread_is_not_owner(ps_url: str) -> None:
    rl = RLock("not-owner-thread")
    rl.acquire()
    seen: list[BaseException] = []

    def other() -> None:
        try:
            rl.release()
        except BaseException as exc:
            seen.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    rl.release()
    assert len(seen) == 1
    assert isinstance(seen[0], NotOwnerError)


def test_waiting_thread_gets_it_only_after_the_last_release(ps_url: str) -> None:
    rl = RLock("depth-handoff")
    rl.acquire()
    rl.acquire()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(rl.acquire(timeout=10)))
    t.start()
    try:
        wait_until(lambda: rl.statistics().waiting == 1, what="the thread to queue")
        rl.release()  # depth 2 -> 1: still ours
        assert rl.depth == 1
        assert rl.statistics().waiting == 1
        assert not got
        rl.release()
    finally:
        t.join(10)
    assert got == [True]
    assert rl.depth == 0  # this thread's view: the other thread holds it
    assert rl.locked()
    with pytest.raises(RuntimeError):
        rl.release()


def test_threads_hand_it_to_each_other(ps_url: str, raw: redis.Redis) -> None:
    """Three threads of one process take turns (each hand-off goes through the
    server's queue); each must be able to release what it was granted."""
    rl = RLock("threads")
    rl.acquire()  # the session is open before the threads start
    rl.release()
    errors: list[str] = []
    done = threading.Event()

    def work() -> None:
        for _ in range(40):
            if done.is_set():
                return
            try:
                if not rl.acquire(timeout=5):
                    errors.append("acquire timed out")
                    done.set()
                    return
                with rl:
                    raw.ping()  # leave the GIL with the lock held: others queue
                rl.release()
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                done.set()
                return

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert not rl.locked()


def test_another_process_cannot_take_or_release_it(ps_url: str, children: ChildFactory) -> None:
    rl = RLock("per-process")
    rl.acquire()
    rl.acquire()
    c = children(
        """
        rl = RLock("per-process")
        say("try", rl.acquire(blocking=False), rl.acquire(timeout=0.1))
        try:
            rl.release()
            say("release", "ok")
        except NotHeldError as exc:
            say("release", type(exc).__name__, isinstance(exc, RuntimeError))
        """
    )
    assert c.expect("try") == ["False", "False"]
    _kind, is_runtime = c.expect("release")
    assert is_runtime == "True"
    assert c.wait() == 0
    assert rl.depth == 2
    rl.release()
    rl.release()
    assert not rl.locked()


def test_release_from_another_process_is_not_owner(ps_url: str, children: ChildFactory) -> None:
    rl = RLock("not-owner-process")
    rl.acquire()
    c = children(
        """
        try:
            RLock("not-owner-process").release()
            say("release", "ok")
        except NotHeldError as exc:
            say("release", type(exc).__name__)
        """
    )
    assert c.expect("release") == ["NotOwnerError"]
    rl.release()


def test_rlock_and_lock_of_one_name_exclude_each_other(ps_url: str) -> None:
    rl = RLock("shared-name")
    rl.acquire()
    seen: list[bool] = []
    t = threading.Thread(target=lambda: seen.append(Lock("shared-name").acquire(timeout=0.1)))
    t.start()
    t.join(10)
    assert seen == [False]
    rl.release()


def test_nested_use_leaves_no_keys(ps_url: str, raw: redis.Redis) -> None:
    rl = RLock("leak")
    with rl, rl, rl:
        assert leftover_keys(raw) != []
    assert leftover_keys(raw) == []
