"""A blip: every connection reset once, then refused for half a second, while
processes wait (issue 10, first row).

One waiter of each kind -- Lock, Semaphore, Event, Condition, Barrier -- is a child
process on one front (both fronts are tested), connected through the proxy and
blocked in its pop (the server shows it blocked) when the blip comes. The test
process then does what should end each wait -- release, set, notify, arrive -- and
each waiter must be the one served. Each kind's outcome is reported, so one that
fails does not hide how the others fared.

Regression: the waiter raised ServerUnavailableError and its clean-up failed too, so
its waiter id stayed queued under its live session: the next release granted the
lock (or permit) to that ghost, a ``notify(1)`` was eaten by it, and a ``Barrier(2)``
let the other party through alone.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from fronts import FRONTS
from fronts_fixtures import start_front_child
from helpers.faults import blip, side, state, stray_keys
from helpers.procs import ChildFactory, blocked_clients, wait_until
from procsync import Barrier, Condition, Event, Lock, Semaphore
from procsync.testing import FaultProxy, ServerProcess

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]

#: The child's own limit on every wait: far beyond what the test waits for.
T = 20.0
#: How long the test waits for the child to report, after the fault healed.
REPORT = 10.0

WAITER = """
def report(wait):
    # A waiter that fails says so and lives on, as a service would: its session
    # stays alive, so anything it left queued on the server stays a live ghost.
    try:
        say("got", wait())
    except Exception as exc:
        say("error", type(exc).__name__, str(exc)[:200])

kind = KIND
if kind in ("lock", "sem"):
    p = F.Lock(NAME) if kind == "lock" else F.Semaphore(1, name=NAME)
    say("ready", procsync.current_session().id)
    report(lambda: p.acquire(T))
    hear()
    p.release()
    say("released")
elif kind == "event":
    e = F.Event(NAME)
    say("ready")
    report(lambda: e.wait(T))
elif kind == "barrier":
    b = F.Barrier(2, name=NAME)
    say("ready")
    report(lambda: b.wait(T))
elif kind == "cond":
    import redis
    r = redis.Redis.from_url(DIRECT, decode_responses=True)
    cond = F.Condition(name=NAME)

    def wait_for_flag():
        # Spurious wake-ups are allowed (a failed pop makes one): the predicate
        # loop is what a caller writes.
        wakes = 0
        while r.get("flag") != "1":
            cond.wait(T)
            wakes += 1
        return wakes

    with cond:
        say("ready")
        report(wait_for_flag)
    say("released")
hear()
"""


KINDS = ("lock", "sem", "event", "cond", "barrier")


def outcome(check: Callable[[], object]) -> str:
    """``check()`` run to the end: "ok", or what went wrong (so one failing primitive
    does not hide how the others fared)."""
    try:
        check()
    except AssertionError as exc:
        lines = [x for x in str(exc).splitlines() if x.strip()]
        # the first line, and a child's last line of stderr (its exception) if any
        last = f" ... {lines[-1][:200]}" if len(lines) > 1 else ""
        return f"FAILED: {lines[0][:200] if lines else exc!r}{last}"
    return "ok"


@pytest.mark.parametrize("front", FRONTS)
def test_every_waiter_rides_out_a_blip_and_is_the_one_served(
    proxy: FaultProxy,
    direct: redis.Redis,
    children: ChildFactory,
    server: ServerProcess,
    front: str,
) -> None:
    """One waiter of each kind, each a process on ``front`` blocked in its pop when
    every connection is reset and refused for half a second. Afterwards each is
    waiting again (a Condition waiter may first wake spuriously: its pop failed, and
    it re-checks its predicate), and each is the one served: the lock and the permit
    released here are granted to it, ``notify(1)`` wakes it, ``set()`` wakes it, and
    this process's arrival releases it with a ``Barrier(2)``."""
    lock, sem = Lock("blip-lock"), Semaphore(1, name="blip-sem")
    assert lock.acquire(timeout=5)
    assert sem.acquire(timeout=5)
    kids = {
        kind: start_front_child(
            children,
            front,
            WAITER,
            name=f"{front}-{kind}-waiter",
            KIND=kind,
            NAME=f"blip-{kind}",
            T=T,
            DIRECT=server.url,
        )
        for kind in KINDS
    }
    sids = {kind: kid.expect("ready") for kind, kid in kids.items()}
    queues = {kind: side(kind, "q", f"blip-{kind}") for kind in ("lock", "sem")}
    cond_waiters = side("cond", "w", "blip-cond")

    def all_waiting() -> bool:
        return (
            blocked_clients(direct) >= len(KINDS)
            and direct.llen(cond_waiters) == 1
            and all(direct.llen(q) == 1 for q in queues.values())
        )

    wait_until(all_waiting, what="every child blocked in its wait")

    blip(proxy)

    again = outcome(lambda: wait_until(all_waiting, REPORT, what="every child waiting again"))
    results: dict[str, str] = {"waiting again after the blip": again}

    def served_permit(kind: str, holder: Lock | Semaphore) -> None:
        holder.release()
        assert kids[kind].expect("got", timeout=REPORT) == ["True"], "not granted"
        holds = {
            f: v
            for f, v in direct.hgetall(state(kind, f"blip-{kind}")).items()
            if f.startswith("h:")
        }
        (sid,) = sids[kind]
        assert holds == {f"h:{sid}": "1"}, f"one hold, the child's, expected: {holds}"
        assert direct.llen(queues[kind]) == 0, "a ghost is still queued"

    def served_event() -> None:
        Event("blip-event").set()
        assert kids["event"].expect("got", timeout=REPORT) == ["True"]

    def served_cond() -> None:
        cond = Condition(name="blip-cond")
        with cond:
            direct.set("flag", "1")
            woken = cond.notify(1)
        (wakes,) = kids["cond"].expect("got", timeout=REPORT)
        assert woken == 1, f"notify(1) woke {woken}"
        assert int(wakes) >= 1
        kids["cond"].expect("released")

    def served_barrier() -> None:
        mine = Barrier(2, name="blip-barrier").wait(REPORT)
        got = kids["barrier"].expect("got", timeout=REPORT)
        assert sorted([mine, int(got[0])]) == [0, 1], f"indices {mine} and {got}"

    results["lock"] = outcome(lambda: served_permit("lock", lock))
    results["sem"] = outcome(lambda: served_permit("sem", sem))
    results["event"] = outcome(served_event)
    results["cond"] = outcome(served_cond)
    results["barrier"] = outcome(served_barrier)
    assert all(r == "ok" for r in results.values()), "\n".join(
        f"{what}: {r}" for what, r in results.items()
    )

    for kind in ("lock", "sem"):
        kids[kind].send()
        kids[kind].expect("released")
    Event("blip-event").clear()
    direct.delete("flag")
    assert not Barrier(2, name="blip-barrier").broken
    # Every lock, permit and wait is over: no state, queue, waiter list or inbox is
    # left (the per-session sets of what each holds are looked at once they exit:
    # see test_fault_barrier_sets.py).
    assert [k for k in stray_keys(direct) if ":h:" not in k] == []
    for kid in kids.values():
        kid.send()
        assert kid.wait() == 0
    assert stray_keys(direct) == []
