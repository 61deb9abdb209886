"""What the server records a Barrier party as waiting in, once the barrier released
it (found while checking that the blip leaves nothing behind).

Each session has a set ``h:<sid>`` of the keys it holds or waits in; a party that
arrives is added to it, and a party that is released must be taken out again, as a
party that times out, aborts or runs the action is.
"""

from __future__ import annotations

import redis

from helpers.faults import PREFIX, side
from helpers.procs import ChildFactory, wait_blocked, wait_until
from procsync import Barrier

pytest_plugins = ["helpers.fixtures"]

PARTY = """
b = Barrier(2, name="released")
say("sid", procsync.current_session().id)
say("passed", b.wait(10))
hear()
"""


def test_a_released_party_is_no_longer_recorded_in_the_barrier(
    ps_url: str, raw: redis.Redis, children: ChildFactory
) -> None:
    party = children(PARTY, name="party")
    (sid,) = party.expect("sid")
    wait_until(lambda: raw.llen(side("barrier", "a", "released")) == 1, what="the arrival")
    wait_blocked(raw, 1)
    assert Barrier(2, name="released").wait(10) == 1
    assert party.expect("passed") == ["0"]
    assert f"{PREFIX}barrier:released" not in raw.smembers(f"{PREFIX}h:{sid}")
