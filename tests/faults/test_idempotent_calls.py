"""Issue #10: every state-changing script call sent again after its reply was lost
answers as its first run did and changes nothing twice. The calls are made here
exactly as the drivers make them, twice in a row, against a real server (what a
reset after the write, a timeout or a garbled reply leads the driver to do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from procsync import Barrier, Condition, Lock, Value
from procsync.core import barrier as core_barrier
from procsync.core import condition as core_cond
from procsync.core import value as core_value
from procsync.core.steps import Call
from procsync.session import close_all, current_session

pytest_plugins = ["helpers.fixtures"]


@pytest.fixture(autouse=True)
def _sessions(ps_url: str) -> Iterator[None]:
    close_all()
    yield
    close_all()


def twice(call: Call) -> tuple[list[object], list[object]]:
    """Run ``call`` and the same call again (the resend after a lost reply)."""
    b = current_session().backend
    first = b.call(call.script, call.keys, call.args)
    return first, b.call(call.script, call.keys, call.args)


def test_a_value_add_sent_again_adds_once(raw: redis.Redis) -> None:
    v = Value("i", 5, name="counter")
    assert v.value == 5
    add = core_value.add(v.ref, 3)
    call = next(add)
    assert isinstance(call, Call)
    first, again = twice(call)
    assert [int(str(x)) for x in first[1:] + again[1:]] == [8, 8]
    assert v.value == 8
    v.value += 1  # another add (another id) adds as usual
    assert v.value == 9


def test_a_condition_wait_sent_again_finds_its_first_run(raw: redis.Redis) -> None:
    """Before, the resent wait found the lock released by its first run and raised
    NotHeldError; the waiter was queued and the lock free."""
    cond = Condition(Lock("c-lock"), name="c")
    assert cond.acquire()
    sess = current_session()
    wid = sess.new_waiter_id()
    first, again = twice(cond.ref.call("wait", sess.id, wid))
    assert first == again == ["waiting"]
    cond._lock._hold.released(1)  # the script released it on the server
    assert not Lock("c-lock").locked()
    assert cond.waiters() == 1


def test_a_barrier_party_whose_arrival_reply_was_lost_is_found_by_check(
    raw: redis.Redis,
) -> None:
    """The arrival is the one call not resent; its check finds it waiting (with the
    index the lost reply carried)."""
    bar = Barrier(3, name="b")
    sess = current_session()
    wid = sess.new_waiter_id()
    b = sess.backend
    call = bar.ref.call("wait", sess.id, wid, 0)
    assert b.call(call.script, call.keys, call.args)[0:2] == ["wait", 0]
    check = bar.ref.call("check", sess.id, wid)
    assert b.call(check.script, check.keys, check.args) == ["waiting", 0]
    assert bar.n_waiting == 1  # arrived once
    gone = bar.ref.call("check", sess.id, sess.new_waiter_id())
    assert b.call(gone.script, gone.keys, gone.args) == ["gone"]
    bar.abort()


def test_the_barrier_arrival_is_marked_not_to_be_resent() -> None:
    """(What the driver reads to know it must not resend it.)"""
    close_all()
    bar = Barrier(2, name="b2")
    op = core_barrier.wait(bar.ref, current_session(), False, None, lambda: 0.0)
    step = next(op)
    assert isinstance(step, Call) and step.once
    op.close()


def test_condition_core_wakes_on_a_failed_pop() -> None:
    """A Condition waiter whose pop failed cannot tell whether a notification was
    lost with it: it wakes (a spurious wake-up), it never sleeps through one."""
    from procsync.core.steps import POP_FAILED, Cleanup, Pop

    cond = Condition(Lock("c2-lock"), name="c2")
    assert cond.acquire()
    if True:
        sess = current_session()
        op = core_cond.wait(cond.ref, sess, None, lambda: 0.0)
        step = next(op)
        assert isinstance(step, Call)
        b = sess.backend
        reply = b.call(step.script, step.keys, step.args)
        step = op.send(reply)
        assert isinstance(step, Pop)
        step = op.send(POP_FAILED)
        assert isinstance(step, Cleanup)  # it leaves the waiter list ...
        leave = step.make()
        sub = next(leave)
        with pytest.raises(StopIteration):
            leave.send(b.call(sub.script, sub.keys, sub.args))
        with pytest.raises(StopIteration) as done:
            op.send(False)
        assert done.value.value is True  # ... and wakes
        cond._lock._hold.released(1)
    assert cond.waiters() == 0
