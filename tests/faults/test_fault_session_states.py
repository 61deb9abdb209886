"""``Session.on_state`` through faults: a blip is one SUSPENDED then one RECONNECTED
(no flood of transitions, however many calls and heartbeats failed meanwhile), and
a blackhole longer than the ttl is LOST, from the client-side deadline.
"""

from __future__ import annotations

import threading
import time

import redis

import procsync
import procsync.session as sessions
from helpers.faults import PREFIX, blip
from helpers.procs import InThread, wait_blocked, wait_until
from procsync import Event
from procsync.testing import FaultProxy

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]


def recorder(sess: procsync.Session) -> tuple[list[object], threading.Event]:
    """Every state ``sess`` moves to, in order; and an event set once it is LOST."""
    seen: list[object] = []
    lost = threading.Event()

    def on_state(s: procsync.Session, new: object, reason: str) -> None:
        seen.append(new)
        if new is sessions.SessionState.LOST:
            lost.set()

    sess.on_state(on_state)
    return seen, lost


def test_a_blip_is_one_suspended_then_one_reconnected(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    """Three waiters' pops fail at once in the blip, then their calls to look again
    fail and are sent again until it ends (the heartbeat, one a second here, may fail
    too); after it they and the heartbeat are answered again. The session moves once
    each way."""
    states = sessions.SessionState
    sess = procsync.Session(ttl=3)
    seen, _ = recorder(sess)
    events = [Event(f"states-e{i}") for i in range(3)]
    waiters = [InThread(lambda e=e: e.wait(10)) for e in events]
    wait_blocked(direct, len(waiters))

    blip(proxy)
    renewed = direct.zscore(f"{PREFIX}sessions", sess.id)

    for e in events:
        e.set()
    assert [w.join(10) for w in waiters] == [True] * len(waiters)
    # Look only once the heartbeat too has been answered after the blip.
    wait_until(
        lambda: direct.zscore(f"{PREFIX}sessions", sess.id) != renewed,
        timeout=5,
        what="a heartbeat after the blip",
    )
    assert seen == [states.SUSPENDED, states.RECONNECTED]
    assert sess.state is states.RECONNECTED
    assert not sess.lost


def test_a_blackhole_longer_than_the_ttl_is_lost_at_the_deadline(proxy: FaultProxy) -> None:
    states = sessions.SessionState
    sess = procsync.Session(ttl=1)
    seen, lost = recorder(sess)
    assert Event("states-bh").wait(0.01) is False  # a call answered in this session

    proxy.blackhole()
    started = time.monotonic()

    assert lost.wait(5), f"not lost 5 s into a blackhole (ttl 1 s); states {seen}"
    assert time.monotonic() - started < 1 + 1.0
    # A heartbeat that times out a hair before the deadline suspends it first.
    assert seen in ([states.LOST], [states.SUSPENDED, states.LOST]), seen
    assert sess.state is states.LOST
    assert sess.lost
