"""A slow network (found while writing the frozen-server tests): every reply takes
0.4 s to come back. A timed call still ends within about its timeout, also when it
is the first call on a new connection, which first sets the connection up.
"""

from __future__ import annotations

import time

from helpers.procs import InThread
from procsync import Lock, ServerUnavailableError
from procsync.testing import FaultProxy

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]

TIMEOUT = 1.0
LATENCY = 0.4
#: How far past its timeout the call may end.
LATE = 0.5


def test_a_timed_acquire_on_a_new_connection_ends_within_its_timeout(proxy: FaultProxy) -> None:
    lock = Lock("slow")
    assert lock.acquire(timeout=5)  # the session and the scripts exist already
    lock.release()
    proxy.latency(LATENCY, "down")
    started = time.monotonic()
    # A new thread: its own connection, set up by this call.
    t = InThread(lambda: lock.acquire(timeout=TIMEOUT))
    try:
        t.join(TIMEOUT + LATE)
    except ServerUnavailableError:
        pass  # it could not be told in time: fine, as long as it is told in time
    finally:
        proxy.heal()
        if t.running:
            t.join(10)
    assert t.done_at is not None
    took = t.done_at - started
    assert took < TIMEOUT + LATE, f"acquire(timeout={TIMEOUT:g}) took {took:.2f}s"
