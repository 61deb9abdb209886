"""The network blackholes under a holder (issue 10, sixth row), and a holder whose
replies stop coming back while its requests still arrive.

The holder is a child with a 1 s lease connected through the proxy; a second child
waits for the same lock connected straight to the server, which it can always
reach. Both record ``time.monotonic()`` (one clock for every process on Linux) and
report it on stdout.

Regression: ``lock.lost`` turned True in time, but the ``on_lost`` callbacks ran
3-3.7 s after the other process had been granted the lock. Now they run from the
holder's client-side deadline, which is strictly before its lease can end on the
server.
"""

from __future__ import annotations

import redis

from helpers.faults import session_state, state
from helpers.procs import ChildFactory, wait_blocked, wait_until
from procsync.testing import FaultProxy, ServerProcess

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]

HOLDER = """
lock = Lock(NAME)

def lost(prim, reason):
    say("lost", repr(time.monotonic()), prim.lost)

lock.on_lost(lost)
assert lock.acquire(timeout=5)
say("held", procsync.current_session().id)
hear()
"""

WAITER = """
lock = Lock(NAME)
say("ready")
ok = lock.acquire(timeout=15)
say("got", ok, repr(time.monotonic()))
hear()
"""


def test_on_lost_runs_before_another_process_is_granted_the_lock(
    proxy: FaultProxy, direct: redis.Redis, children: ChildFactory, server: ServerProcess
) -> None:
    holder = children("NAME = 'hole'\n" + HOLDER, name="holder", PROCSYNC_TTL="1")
    holder.expect("held")
    waiter = children("NAME = 'hole'\n" + WAITER, name="waiter", PROCSYNC_URL=server.url)
    waiter.expect("ready")
    wait_blocked(direct, 1)  # queued behind the holder, watching its lease

    proxy.blackhole()

    lost_at, lost_flag = holder.expect("lost", timeout=10)
    ok, granted_at = waiter.expect("got", timeout=10)
    assert ok == "True"
    assert lost_flag == "True", "lock.lost was still False inside its on_lost callback"
    assert float(lost_at) < float(granted_at), (
        f"on_lost ran {float(lost_at) - float(granted_at):.3f}s after the other process "
        "was granted the lock"
    )


def test_a_session_lost_while_the_server_still_has_it_is_closed_there(
    proxy: FaultProxy, direct: redis.Redis, children: ChildFactory
) -> None:
    """Replies stop coming back (``stall("down")``) while requests still arrive: the
    holder's heartbeat reaches the server and renews its lease there, but the holder
    hears of no renewal, so at its client-side deadline it reports the hold lost --
    with its lease still running on the server. Once it can reach the server again it
    closes the session there, so the lock is free at once, not when a lease nobody
    renews runs out. (During the stall itself nothing gets through: a new connection
    needs replies to its set-up before it sends a command.)"""
    holder = children("NAME = 'stalled'\n" + HOLDER, name="holder", PROCSYNC_TTL="1")
    (sid,) = holder.expect("held")

    proxy.stall("down")

    holder.expect("lost", timeout=10)
    proxy.heal()
    # "left" is what a close records; a lease that ran out and was reaped is "dead".
    wait_until(
        lambda: session_state(direct, sid) == "left",
        timeout=5,
        what="the holder to close its lost session on the server (state 'left')",
    )
    assert not direct.exists(state("lock", "stalled")), "the lock is still held"
