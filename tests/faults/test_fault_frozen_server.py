"""A frozen server (issue 10, fifth row): ``ServerProcess.pause()`` (SIGSTOP) while
calls with a timeout are made or waiting. Nothing answers, nothing is refused: only
each call's own socket timeout can end it.

Regression: every call with ``timeout=1`` took 5 s (PROCSYNC_SOCKET_TIMEOUT), a pop
in flight up to 20 s. Now each call's socket timeout is what is left of its budget,
so each ends within about its timeout: ServerUnavailableError when the server could
not be reached to find out, False for an acquire that had seen the lock busy (it was
queued behind a holder).

Every timed operation runs in a thread the test joins with a bound a little past
the timeout, so an overrun fails at once (the server is resumed afterwards, which
lets the operation finish).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import procsync
import procsync.asyncio as pa
from helpers.faults import side, stray_keys
from helpers.procs import ChildFactory, InThread, wait_blocked, wait_until
from procsync import Event, Lock, Semaphore, ServerUnavailableError
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]

TIMEOUT = 1.0
#: The timeout of an acquire that queues first (then the server freezes).
QUEUED = 1.5
#: How far past its timeout a call may end (the old behaviour was >= 5 s over).
LATE = 1.0

HOLDER = """
lock = Lock(NAME)
lock.acquire()
say("held")
hear()
lock.release()
say("released")
hear()
"""


def finished(t: InThread, limit: float) -> None:
    """Wait at most ``limit`` seconds for ``t``; fail if it is still running (what its
    function raised is left for :func:`outcome`)."""
    try:
        t.join(max(0.0, limit))
    except AssertionError:
        if t.running:
            raise
    except Exception:
        pass


def outcome(t: InThread) -> object:
    """What the thread's function returned, or the type of what it raised."""
    return type(t.error) if t.error is not None else t.result


KINDS = ("lock", "sem", "event")


def warm(kind: str) -> Callable[[], Any]:
    """Use the primitive once while the server answers (the session, this thread's
    connection and the scripts exist before the freeze); return its timed call."""
    if kind == "lock":
        lock = Lock("frozen-lock")
        assert lock.acquire(timeout=5)
        lock.release()
        return lambda: lock.acquire(timeout=TIMEOUT)
    if kind == "sem":
        sem = Semaphore(1, name="frozen-sem")
        assert sem.acquire(timeout=5)
        sem.release()
        return lambda: sem.acquire(timeout=TIMEOUT)
    event = Event("frozen-event")
    assert event.wait(0.01) is False
    return lambda: event.wait(TIMEOUT)


def test_timed_calls_on_a_frozen_server_end_at_their_timeout(frozen: ServerProcess) -> None:
    """``Lock.acquire(timeout=1)``, ``Semaphore.acquire(timeout=1)`` and
    ``Event.wait(1)``, made together (each in its thread) on a frozen server: each
    ends within about 1 s with ServerUnavailableError -- the server never answered, so
    the caller cannot know whether the lock was free or the flag set."""
    calls = {kind: warm(kind) for kind in KINDS}
    frozen.pause()
    try:
        started = time.monotonic()
        threads = {kind: InThread(call) for kind, call in calls.items()}
        for t in threads.values():
            finished(t, started + TIMEOUT + LATE - time.monotonic())
    finally:
        frozen.resume()
    took = {kind: round(t.done_at - started, 2) for kind, t in threads.items() if t.done_at}
    assert all(v < TIMEOUT + LATE for v in took.values()), took
    assert {kind: outcome(t) for kind, t in threads.items()} == dict.fromkeys(
        KINDS, ServerUnavailableError
    )


def test_a_queued_acquire_on_a_frozen_server_ends_at_its_timeout_with_false(
    frozen: ServerProcess, children: ChildFactory
) -> None:
    """The acquire had seen the lock busy (it is queued behind another process) when
    the server froze: at its timeout it returns False. Its leaving the queue, which
    the frozen server could not confirm, is made when the server answers again."""
    holder = children("NAME = 'frozen-q'\n" + HOLDER, name="holder")
    holder.expect("held")
    lock = Lock("frozen-q")
    with frozen.client(decode_responses=True, socket_timeout=5.0) as r:
        started = time.monotonic()
        t = InThread(lambda: lock.acquire(timeout=QUEUED))
        wait_until(lambda: r.llen(side("lock", "q", "frozen-q")) == 1, what="the acquire to queue")
        wait_blocked(r, 1)
        frozen.pause()
        try:
            finished(t, started + QUEUED + LATE - time.monotonic())
        finally:
            frozen.resume()
        assert t.done_at is not None
        assert t.done_at - started < QUEUED + LATE
        assert outcome(t) is False
        wait_until(
            lambda: not r.exists(side("lock", "q", "frozen-q")),
            timeout=5,
            what="the kept clean-up to leave the queue",
        )
        holder.send()
        holder.expect("released")
        assert stray_keys(r) == [], "the release granted the lock to the waiter that left"


def test_a_second_timed_acquire_on_a_frozen_server_also_ends_at_its_timeout(
    frozen: ServerProcess,
) -> None:
    """A caller retrying ``acquire(timeout=1)`` during an outage: each try ends within
    about 1 s, also once the first has left a clean-up for later.

    Regression (found writing these tests): the second acquire first ran the kept
    clean-up (``Session.settle()``) with the default budget, PROCSYNC_SOCKET_TIMEOUT,
    instead of its own, and took 5 s."""
    call = warm("lock")
    frozen.pause()
    try:
        first = InThread(call)
        finished(first, TIMEOUT + LATE)
        assert outcome(first) is ServerUnavailableError
        assert procsync.current_session().pending >= 1  # its clean-up, kept for later
        second = InThread(call)
        finished(second, TIMEOUT + LATE)
    finally:
        frozen.resume()
    assert outcome(second) is ServerUnavailableError


# -- the asyncio front ---------------------------------------------------------------


def run_loop(main: Callable[[], Any]) -> InThread:
    return InThread(lambda: asyncio.run(main()))


def test_asyncio_waits_on_a_frozen_server_end_at_their_wait_for_timeout(
    frozen: ServerProcess,
) -> None:
    """``asyncio.wait_for(lock.acquire(), 1)``, the same for a Semaphore and
    ``Event.wait()``: with the server frozen, each ends (TimeoutError) within about 1 s.

    Regression (found writing these tests): a task cancelled while its script call
    was in flight waited for that call's reply, bounded only by its socket timeout
    (PROCSYNC_SOCKET_TIMEOUT, 5 s: an asyncio wait has no budget of its own)."""

    async def main() -> dict[str, object]:
        lock, sem, event = pa.Lock("afrozen-l"), pa.Semaphore(1, name="afrozen-s"), pa.Event("afe")
        await lock.acquire()
        await lock.release()
        await sem.acquire()
        await sem.release()
        assert not await event.is_set()
        frozen.pause()
        waits = {"lock": lock.acquire(), "sem": sem.acquire(), "event": event.wait()}
        got = await asyncio.gather(
            *(asyncio.wait_for(w, TIMEOUT) for w in waits.values()), return_exceptions=True
        )
        return {
            k: type(v) if isinstance(v, BaseException) else v
            for k, v in zip(waits, got, strict=True)
        }

    loop = run_loop(main)
    try:
        wait_until(lambda: frozen.paused, timeout=10, what="the warm-up")
        finished(loop, TIMEOUT + LATE)  # from the freeze
    finally:
        if frozen.paused:
            frozen.resume()
        finished(loop, 30)  # (let it end before the next test)
    assert loop.join() == {k: TimeoutError for k in ("lock", "sem", "event")}


def test_a_queued_asyncio_acquire_on_a_frozen_server_ends_at_its_wait_for_timeout(
    frozen: ServerProcess, children: ChildFactory
) -> None:
    """Queued behind another process when the server froze: cancelled at its
    ``wait_for`` timeout, the acquire ends then; its leaving the queue is made once
    the server answers again, and the holder's release grants nobody.

    Regression (found writing these tests): a cancelled pop in flight first pushed
    WAKE onto its inbox (a call that blocked up to 5 s) and then waited for the pop to
    end by itself (up to MAX_POP_SECONDS plus grace): ~10.5 s."""
    holder = children("NAME = 'afrozen-q'\n" + HOLDER, name="holder")
    holder.expect("held")

    async def main() -> object:
        try:
            return await asyncio.wait_for(pa.Lock("afrozen-q").acquire(), QUEUED)
        except TimeoutError:
            return TimeoutError

    with frozen.client(decode_responses=True, socket_timeout=5.0) as r:
        started = time.monotonic()
        loop = run_loop(main)
        try:
            wait_blocked(r, 1)
            frozen.pause()
            finished(loop, started + QUEUED + LATE - time.monotonic())
        finally:
            frozen.resume()
            finished(loop, 30)  # (let it end before the next test)
        assert loop.join() is TimeoutError
        wait_until(
            lambda: not r.exists(side("lock", "q", "afrozen-q")),
            timeout=5,
            what="the kept clean-up to leave the queue",
        )
        holder.send()
        holder.expect("released")
        assert stray_keys(r) == [], "the release granted the lock to the waiter that left"
