"""Event against threading.Event: set/clear/is_set, wait's timeout and return value,
waking every waiting process, dead waiters, and which keys stay."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from helpers.keys import lasting_keys, leftover_keys, state_key, stored_keys
from helpers.procs import ChildFactory, InThread, wait_until
from procsync import Event

pytest_plugins = ["helpers.fixtures"]

WAITER = """
ev = Event({name!r})
say("ready")
hear()
t0 = time.monotonic()
got = ev.wait({timeout})
say("woke", got, round(time.monotonic() - t0, 3))
hear()
"""


def test_set_clear_is_set(ps_url: str) -> None:
    ev = Event("light")
    assert ev.name == "light"
    assert ev.is_set() is False
    ev.set()
    assert ev.is_set() is True
    assert ev.isSet() is True
    ev.set()  # idempotent
    assert ev.is_set()
    ev.clear()
    assert ev.is_set() is False
    ev.clear()
    assert not ev.is_set()


def test_wait_return_values_and_timeouts(ps_url: str) -> None:
    ev, model = Event("waits"), threading.Event()
    for timeout in (0, -1, -0.5, 0.0):
        t0 = time.monotonic()
        assert ev.wait(timeout) is False is model.wait(timeout)
        assert time.monotonic() - t0 < 1.0
    t0 = time.monotonic()
    assert ev.wait(0.25) is False
    assert 0.25 <= time.monotonic() - t0 < 2.0
    ev.set()
    model.set()
    for timeout in (None, 0, -1, 5):
        t0 = time.monotonic()
        assert ev.wait(timeout) is True is model.wait(timeout)
        assert time.monotonic() - t0 < 1.0
    assert ev.waiting() == 0


def test_set_wakes_a_waiter_in_another_thread(ps_url: str) -> None:
    ev = Event("thread")
    waiter = InThread(lambda: ev.wait(20))
    wait_until(lambda: ev.waiting() == 1, what="the waiter to register")
    set_at = time.monotonic()
    ev.set()
    assert waiter.join(10) is True
    assert waiter.done_at is not None and waiter.done_at - set_at < 2.0


def test_set_wakes_every_waiting_process_even_if_cleared_at_once(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    """threading: wait() returns True if the flag was set while waiting, even if it
    was cleared again before the waiter ran."""
    ev = Event("traffic-light")
    cars = [children(WAITER.format(name="traffic-light", timeout=20)) for _ in range(3)]
    for i, c in enumerate(cars):
        c.expect("ready")
        c.send()
        wait_until(lambda i=i: ev.waiting() == i + 1, what="cars to wait")
    ev.set()
    ev.clear()
    for c in cars:
        got, waited = c.expect("woke")
        assert got == "True"
        assert float(waited) < 15
    assert not ev.is_set()
    assert leftover_keys(raw) == []


def test_waiters_time_out_independently(ps_url: str, children: ChildFactory) -> None:
    ev = Event("timeouts")
    short = children(WAITER.format(name="timeouts", timeout=0.3), name="short")
    long = children(WAITER.format(name="timeouts", timeout=20), name="long")
    for i, c in enumerate((short, long)):
        c.expect("ready")
        c.send()
        wait_until(lambda i=i: ev.waiting() >= i + 1, what="waiters to register")
    got, waited = short.expect("woke")
    assert got == "False" and 0.3 <= float(waited) < 3
    wait_until(lambda: ev.waiting() == 1, what="the timed-out waiter to leave")
    ev.set()
    assert long.expect("woke")[0] == "True"


def test_an_event_set_by_an_unrelated_process(ps_url: str, children: ChildFactory) -> None:
    ev = Event("go")
    waiter = InThread(lambda: ev.wait(20))
    wait_until(lambda: ev.waiting() == 1, what="the waiter to register")
    c = children(
        """
        Event("go").set()
        say("set")
        """
    )
    c.expect("set")
    assert waiter.join(10) is True
    # the flag is state: it outlives the process that set it (unlike threading)
    assert c.wait() == 0
    assert ev.is_set()
    assert Event("go").wait(0)


def test_dead_waiter_does_not_disturb_set(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    ev = Event("dead-car")
    doomed = children(WAITER.format(name="dead-car", timeout=20), name="doomed")
    live = children(WAITER.format(name="dead-car", timeout=20), name="live")
    for i, c in enumerate((doomed, live)):
        c.expect("ready")
        c.send()
        wait_until(lambda i=i: ev.waiting() == i + 1, what="waiters to register")
    doomed.kill()
    ev.set()
    assert live.expect("woke")[0] == "True"
    ev.clear()
    assert lasting_keys(raw) == []


def test_which_keys_stay(ps_url: str, raw: redis.Redis) -> None:
    ev = Event("keys")
    assert ev.wait(0.05) is False
    assert leftover_keys(raw) == []  # a clear event nobody waits for has no key
    ev.set()
    assert leftover_keys(raw) == [state_key("event", "keys")]  # a set flag is state
    assert raw.pttl(state_key("event", "keys")) == -1  # kept until cleared
    ev.clear()
    assert leftover_keys(raw) == []


def test_anonymous_event_flag_expires_eventually(ps_url: str, raw: redis.Redis) -> None:
    ev = Event()
    assert ev.name.startswith("anon-")
    ev.set()
    ttl_ms = raw.pttl(state_key("event", ev.name))
    assert 0 < ttl_ms <= 24 * 3600 * 1000
    ev.clear()
    assert leftover_keys(raw) == []


@pytest.mark.parametrize("bad", [float("nan"), "1", b"1", [1]])
def test_bad_wait_timeouts_are_rejected(ps_url: str, raw: redis.Redis, bad: object) -> None:
    ev = Event("bad")
    with pytest.raises((TypeError, ValueError)):
        ev.wait(bad)  # type: ignore[arg-type]
    assert stored_keys(raw) == []
