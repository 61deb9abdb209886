"""Targets for ``multiprocessing.Process`` in the primitive suites.

They live in a module of their own (importing only procsync, redis and the
standard library) so that spawn and forkserver children can import them cheaply.
Results go back through a ``multiprocessing`` queue or pipe, or into Redis keys.
"""

from __future__ import annotations

import os
from typing import Any

import redis

import procsync
from procsync import BoundedSemaphore, Event, Lock, RLock, Semaphore

__all__ = [
    "ENTER",
    "count_holders",
    "forked_view",
    "hold_and_wait",
    "hold_until_killed",
    "report_locked",
    "use_passed_primitives",
]

#: KEYS[1] = "inside" counter, KEYS[2] = "peak": count one more holder inside and
#: keep the highest count ever seen. Returns the count.
ENTER = """
local n = redis.call('INCR', KEYS[1])
local p = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > p then redis.call('SET', KEYS[2], n) end
return n
"""


def _raw() -> redis.Redis:
    return redis.Redis.from_url(os.environ["PROCSYNC_URL"])


def count_holders(sem: Semaphore, rounds: int, start: Any, finish: Any) -> None:
    """Take ``sem`` ``rounds`` times; count holders inside at the server. Exit only
    when every worker is done (``finish``, a barrier): nobody waits on an exited one."""
    r = _raw()
    enter = r.register_script(ENTER)
    if not start.wait(30):
        raise SystemExit(2)
    for _ in range(rounds):
        with sem:
            enter(keys=["inside", "peak"])
            r.rpush("work", os.getpid())  # some work, and a round trip with the permit held
            r.decr("inside")
    finish.wait(60)


def hold_until_killed(sem: Semaphore, never: Any) -> None:
    """Take one permit, count it in "inside"/"peak", say so in "entered", then
    wait forever (the test kills this process)."""
    r = _raw()
    enter = r.register_script(ENTER)
    sem.acquire()
    enter(keys=["inside", "peak"])
    r.rpush("entered", os.getpid())
    never.wait(120)


def use_passed_primitives(sets: list[dict[str, Any]], out: Any) -> None:
    """Run in a child that received primitives through ``Process(args=...)``.

    For each dict of primitives: the parent holds "lock" and "rlock", holds one
    permit of "sem" (value 2) and of "bsem" (value 2), and has not set "event".
    Reports what the child sees, one dict per set, through the queue ``out``.
    """
    report = []
    for prims in sets:
        seen: dict[str, Any] = {"pid": os.getpid()}
        lock: Lock = prims["lock"]
        rlock: RLock = prims["rlock"]
        sem: Semaphore = prims["sem"]
        bsem: BoundedSemaphore = prims["bsem"]
        event: Event = prims["event"]
        seen["types"] = {k: type(v).__name__ for k, v in prims.items()}
        seen["names"] = {k: v.name for k, v in prims.items()}
        seen["lock"] = (lock.locked(), lock.acquire(blocking=False))
        seen["rlock"] = (rlock.locked(), rlock.acquire(blocking=False))
        seen["sem"] = (sem.value, sem.acquire(blocking=False), sem.value)
        sem.release()
        seen["bsem"] = (bsem.value, bsem.acquire(blocking=False), bsem.value)
        bsem.release()
        try:
            bsem.release()
            seen["bsem_over"] = "no error"
        except ValueError as exc:
            seen["bsem_over"] = type(exc).__name__
        seen["event"] = (event.is_set(), event.wait(0.01))
        event.set()
        report.append(seen)
    procsync.session.close_all()
    out.put(report)


def hold_and_wait(prim: Any, conn: Any, times: int = 1) -> None:
    """Acquire ``prim`` ``times`` times, send its token, then wait for the test (which
    usually kills this process)."""
    for _ in range(times):
        prim.acquire()
    conn.send(prim.token)
    conn.poll(120)


def forked_view(lock: Lock, rlock: RLock, bsem: BoundedSemaphore, out: Any) -> None:
    """In a child forked while the parent holds all three: what does the child own?"""
    seen: dict[str, Any] = {}

    def err(fn: Any) -> str:
        try:
            fn()
        except Exception as exc:
            return type(exc).__name__ + ("/RuntimeError" if isinstance(exc, RuntimeError) else "")
        return "no error"

    seen["lock_token"] = lock.token
    seen["lock_lost"] = lock.lost
    seen["lock_release"] = err(lock.release)
    seen["lock_acquire"] = lock.acquire(timeout=0.2)
    seen["lock_locked"] = lock.locked()
    seen["rlock_depth"] = rlock.depth
    seen["rlock_release"] = err(rlock.release)
    seen["rlock_acquire"] = rlock.acquire(timeout=0.2)
    seen["bsem_release"] = err(bsem.release)
    seen["bsem_acquire"] = bsem.acquire(timeout=0.2)
    procsync.session.close_all()
    out.send(seen)


def report_locked(lock: Lock, out: Any) -> None:
    """Put ``"locked=<bool>"`` (or the error) for ``lock`` on the queue ``out``."""
    try:
        out.put(f"locked={lock.locked()}")
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")
