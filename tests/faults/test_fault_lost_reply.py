"""A grant whose reply never came (issue 10, fourth row): the proxy discards the
server's reply to an uncontended ``acquire()`` -- the script ran, the grant is
recorded on the server -- and resets the connection.

Regression: the grant stayed on the server with nobody knowing (the caller asked
again as a new waiter, or gave up). Now the acquire is sent again under the same
waiter id, finds the grant it got, and returns True: one hold on the server, no
queue, and after release() nothing is left.
"""

from __future__ import annotations

import pytest
import redis

import procsync
from helpers.faults import side, state, stray_keys
from procsync import Lock, Semaphore
from procsync.testing import FaultProxy

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]


@pytest.mark.parametrize(("kind", "value"), [("lock", 1), ("sem", 1), ("sem", 2)])
def test_an_acquire_whose_grant_reply_was_lost_holds_it_once(
    proxy: FaultProxy, direct: redis.Redis, kind: str, value: int
) -> None:
    name = f"dropped-{kind}-{value}"
    prim = Lock(name) if kind == "lock" else Semaphore(value, name=name)
    # This thread's connection, the session and the scripts are set up first, so
    # the reply dropped is the acquire's, not a connection's set-up.
    assert prim.acquire(timeout=5)
    prim.release()
    sess = procsync.current_session()
    sess.backend.ping()
    accepted = proxy.accepted

    proxy.drop_next_reply()
    assert prim.acquire(timeout=5)

    assert proxy.accepted == accepted + 1, "the reply dropped was not this thread's"
    fields = direct.hgetall(state(kind, name))
    holds = {f: v for f, v in fields.items() if f.startswith("h:")}
    assert holds == {f"h:{sess.id}": "1"}, f"one hold of one permit expected: {fields}"
    assert not direct.exists(side(kind, "q", name)), "a waiter is queued behind the grant"
    prim.release()
    assert stray_keys(direct) == []
