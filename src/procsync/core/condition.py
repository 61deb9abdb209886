"""Core logic of Condition (script ``cond.lua``).

``wait`` joins the waiter list and releases the condition's lock in one script (no
notify can fall between them), pops its inbox until notified or timed out, and
leaves the list; re-acquiring the lock is the caller's next operation
(:func:`procsync.core.permits.acquire`), done even when the wait is interrupted,
as threading and asyncio do.

Faults: ``wait`` sent again after a lost reply finds its first run (it joined, the
lock was released) and answers the same. A waiter whose pop failed cannot know
whether a notification was popped and lost with the connection, so it wakes: a
spurious wake-up, which Condition's contract allows (callers re-check their
predicate), never a lost one. A waiter whose session was lost wakes the same way
(the front re-acquires the lock in a new session). ``notify`` sent again may wake
more waiters than asked: spurious wake-ups again, never fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procsync.backend.client import MAX_POP_SECONDS
from procsync.core.permits import PermitsRef
from procsync.core.steps import (
    DEFERRED,
    POP_FAILED,
    WAKE,
    Call,
    Cleanup,
    Op,
    Pop,
    SessionGone,
    SessionView,
    check_common,
    dead_on_this_host,
    parse_holders,
    reap,
    side_key,
)
from procsync.errors import NotHeldError, ProtocolError

__all__ = ["CondRef", "notify", "wait", "waiters"]

#: How many times notify() passes on notifications that fell on dead waiters.
MAX_NOTIFY_ROUNDS = 8


@dataclass(frozen=True, slots=True)
class CondRef:
    """Where a Condition lives, and its lock."""

    name: str
    lock: PermitsRef

    @property
    def key(self) -> str:
        return f"{self.lock.backend.prefix}cond:{self.name}"

    def describe(self) -> str:
        return f"Condition {self.name!r}"

    def call(self, op: str, sid: str, arg: str | int) -> Call:
        b = self.lock.backend
        lk = self.lock.key
        return Call(
            "cond",
            (
                self.key,
                side_key(b.prefix, "cond", "w", self.name),
                lk,
                self.lock.queue_key,
                b.sessions_key,
                b.fence_key,
            ),
            (b.prefix, op, sid, arg, self.lock.kind),
        )


def _unexpected(ref: CondRef, reply: list[Any]) -> Exception:
    check_common(reply, ref.describe)
    return ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")


def wait(ref: CondRef, sess: SessionView, deadline: float | None, now: Callable[[], float]) -> Op:
    """Release the lock and wait for a notify; True if notified (or woken spuriously,
    see the module docstring), False on timeout.

    The lock is *not* re-acquired here (see the module docstring).
    """
    wid = sess.new_waiter_id()
    reply = yield ref.call("wait", sess.id, wid)
    status = reply[0]
    if status == "nosession":
        raise SessionGone()
    if status == "notheld":
        raise NotHeldError(f"cannot wait on un-acquired lock of {ref.describe()}")
    if status != "waiting":
        raise _unexpected(ref, reply)
    inbox = f"{ref.lock.backend.prefix}in:{wid}"
    leave = Cleanup(lambda: _leave(ref, sess.id, wid), f"leaving {ref.describe()}")
    try:
        while True:
            left = None if deadline is None else deadline - now()
            if left is not None and left <= 0:
                break
            got = yield Pop(inbox, MAX_POP_SECONDS if left is None else min(left, MAX_POP_SECONDS))
            if got == POP_FAILED:
                yield leave
                return True  # a notification may have been lost with the pop: wake
            if got is not None and got != WAKE:
                return True
    except SessionGone:
        raise
    except BaseException:
        yield leave
        raise
    notified = yield leave
    return notified is DEFERRED or bool(notified)


def _leave(ref: CondRef, sid: str, wid: str) -> Op:
    """Waiter ``wid`` leaves the list; True if a notification came first."""
    reply = yield ref.call("cancel", sid, wid)
    return reply[0] == "notified"


def notify(ref: CondRef, sess: SessionView | None, n: int) -> Op:
    """Wake up to ``n`` live waiters (``n < 0``: all). Returns how many were woken.

    A woken waiter on this host whose process is already dead (its lease not yet run
    out) is reaped and the notification passes to the next waiter, as with threading
    where a dead thread cannot be notified.
    """
    sid = sess.id if sess is not None else "-"
    total = 0
    for _ in range(MAX_NOTIFY_ROUNDS):
        reply = yield ref.call("notify", sid, n)
        if reply[0] == "notheld":
            raise NotHeldError(f"cannot notify on un-acquired lock of {ref.describe()}")
        if reply[0] != "ok":
            raise _unexpected(ref, reply)
        woken = parse_holders(reply[2:])
        dead = dead_on_this_host(woken)
        total += int(reply[1]) - len(dead)
        if not dead or n < 0:
            break
        b = ref.lock.backend
        yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
        n = len(dead)
    return total


def waiters(ref: CondRef) -> Op:
    """How many live processes wait on the condition."""
    reply = yield ref.call("waiters", "-", "-")
    if reply[0] != "ok":
        raise _unexpected(ref, reply)
    return int(reply[1])
