"""A waiter whose session is reaped while it blocks (issue 10, second row).

The waiter is a child process with a 1 s lease. Either it is SIGSTOPped until the
server has ended its session (the test sweeps the registry, which ends sessions
whose lease ran out, and waits for the server to record it dead), or the server
itself is paused past that lease. Then the waiter goes on and must notice.

Regression: ``Condition.wait()`` and ``Barrier.wait()`` without a timeout never
returned; ``Condition.wait(5)`` raised NotHeldError and left the lock held on the
server with nobody owning it. Now a Condition waiter wakes (True: a spurious
wake-up) holding the lock again, in a new session, and the lock is usable (another
process takes it once released); a Barrier party gets BrokenBarrierError.
"""

from __future__ import annotations

import time

import pytest
import redis

from helpers.faults import side, sweep_until_ended
from helpers.procs import Child, ChildFactory, wait_blocked, wait_until
from procsync import Barrier, Lock
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]

#: Every waiter's lease, in seconds.
TTL = "1"
#: How long the test waits for the waiter to report once it runs again.
REPORT = 10.0

COND_WAITER = """
lock = RLock(NAME + ":lock")
cond = Condition(lock, name=NAME)
cond.acquire()
say("sid", procsync.current_session().id)
try:
    ok = cond.wait(T)
    owner = lock.owner()
    say("woke", ok, lock.depth, owner.pid if owner else None, owner.session_id if owner else None)
except Exception as exc:
    say("error", type(exc).__name__, str(exc)[:200])
hear()
cond.release()
say("released")
hear()
"""

PARTY = """
b = Barrier(2, name=NAME)
say("sid", procsync.current_session().id)
try:
    say("passed", b.wait(T))
except BrokenBarrierError as exc:
    say("broken", type(exc).__name__, exc)
except Exception as exc:
    say("error", type(exc).__name__, str(exc)[:200])
hear()
"""


def start(children: ChildFactory, code: str, name: str, t: float | None) -> tuple[Child, str]:
    """A child with a 1 s lease running ``code``; returns it and its session id."""
    child = children(
        f"NAME = {name!r}\nT = {t!r}\n" + code, name=f"waiter-{name}", PROCSYNC_TTL=TTL
    )
    (sid,) = child.expect("sid")
    return child, sid


def assert_woke_holding_the_lock(child: Child, old_sid: str, lock_name: str) -> None:
    """The waiter says it woke (True), holding its RLock once, as the server's owner,
    in a session that is not the reaped one; released, another process takes it."""
    ok, depth, pid, owner_sid = child.expect("woke", timeout=REPORT)
    assert ok == "True"
    assert depth == "1", "the RLock's depth was not restored"
    assert pid == str(child.pid), f"the server's owner is pid {pid}, not the waiter"
    assert owner_sid != old_sid, "the lock is recorded under the reaped session"
    child.send()
    child.expect("released")
    other = Lock(lock_name)
    assert other.acquire(timeout=5), "the lock stayed held on the server"
    other.release()


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["wait()", "wait(5)"])
def test_a_condition_waiter_stopped_past_its_lease_wakes_holding_the_lock(
    ps_url: str, raw: redis.Redis, children: ChildFactory, timeout: float | None
) -> None:
    child, sid = start(children, COND_WAITER, "reaped", timeout)
    wait_until(lambda: raw.llen(side("cond", "w", "reaped")) == 1, what="the waiter to wait")
    wait_blocked(raw, 1)
    child.stop()
    try:
        assert sweep_until_ended(ps_url, raw, sid) == "dead"
    finally:
        child.cont()
    assert_woke_holding_the_lock(child, sid, "reaped:lock")


def test_a_condition_waiter_on_a_server_paused_past_its_lease_wakes_holding_the_lock(
    frozen: ServerProcess, children: ChildFactory
) -> None:
    with frozen.client(decode_responses=True, socket_timeout=5.0) as r:
        child, sid = start(children, COND_WAITER, "frozen", None)
        wait_until(lambda: r.llen(side("cond", "w", "frozen")) == 1, what="the waiter to wait")
        wait_blocked(r, 1)
        frozen.pause()
        try:
            time.sleep(float(TTL) + 0.5)  # the server stays frozen past the lease
        finally:
            frozen.resume()
        assert_woke_holding_the_lock(child, sid, "frozen:lock")


def test_a_barrier_party_stopped_past_its_lease_gets_broken_barrier_error(
    ps_url: str, raw: redis.Redis, children: ChildFactory
) -> None:
    child, sid = start(children, PARTY, "reaped-b", None)
    wait_until(lambda: raw.llen(side("barrier", "a", "reaped-b")) == 1, what="the arrival")
    wait_blocked(raw, 1)
    child.stop()
    try:
        assert sweep_until_ended(ps_url, raw, sid) == "dead"
        assert Barrier(2, name="reaped-b").broken, "the reaped party did not break it"
    finally:
        child.cont()
    got = child.expect("broken", timeout=REPORT)
    assert got[0] == "BrokenBarrierError"
