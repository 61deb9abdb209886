"""Core logic of Event (script ``event.lua``).

``set()`` raises the flag and pushes a wake-up onto the inbox of every live waiter
in the same script; ``wait()`` registers in the waiter list and pops its inbox.

Faults: every call is idempotent (registering again, setting a set flag), so sent
again after a lost reply it answers the same. A waiter whose pop failed, or that
waits without a timeout, registers again before it pops again, so a set flag is
seen even if the server restarted and dropped the registration; a wake-up popped
at the moment a connection broke, for a flag cleared again at once, is the one set
a waiter can miss. Leaving (timeout, interrupt) is a clean-up, kept by the session
if the server cannot be reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procsync.backend.client import MAX_POP_SECONDS, Backend
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
    side_key,
)
from procsync.errors import ProtocolError

__all__ = ["EventRef", "clear", "is_set", "set_", "wait"]


@dataclass(frozen=True, slots=True)
class EventRef:
    """Where an Event lives. ``keep_ms`` > 0 makes a set flag expire (anonymous events)."""

    backend: Backend
    name: str
    keep_ms: int = 0

    @property
    def key(self) -> str:
        return f"{self.backend.prefix}event:{self.name}"

    def describe(self) -> str:
        return f"Event {self.name!r}"

    def call(self, op: str, sid: str, *extra: str | int) -> Call:
        b = self.backend
        return Call(
            "event",
            (self.key, side_key(b.prefix, "event", "w", self.name), b.sessions_key),
            (b.prefix, op, sid, *extra),
        )


def _expect(reply: list[Any], ref: EventRef, *allowed: str) -> str:
    status = str(reply[0])
    if status in allowed:
        return status
    check_common(reply, ref.describe)
    raise ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")


def wait(ref: EventRef, sess: SessionView, deadline: float | None, now: Callable[[], float]) -> Op:
    """Block until the flag is set; True if it was, False on timeout."""
    wid = sess.new_waiter_id()
    inbox = f"{ref.backend.prefix}in:{wid}"
    register = ref.call("wait", sess.id, wid)
    try:
        reply = yield register
        again = False
        while True:
            status = _expect(reply, ref, "set", "waiting", "nosession")
            if status == "set":
                if again:  # registered before: leave (and drop the inbox)
                    yield Cleanup(lambda: _leave(ref, sess.id, wid), _leaving(ref))
                return True
            if status == "nosession":
                raise SessionGone()
            left = None if deadline is None else deadline - now()
            if left is not None and left <= 0:
                break
            got = yield Pop(inbox, MAX_POP_SECONDS if left is None else min(left, MAX_POP_SECONDS))
            if got is not None and got not in (WAKE, POP_FAILED):
                return True
            if left is None or got == POP_FAILED:
                # A long wait or a failed pop: make sure we are still registered (the
                # server may have restarted); registering again is idempotent.
                reply = yield register
                again = True
            else:
                reply = ["waiting"]
    except SessionGone:
        raise
    except BaseException:
        yield Cleanup(lambda: _leave(ref, sess.id, wid), _leaving(ref))
        raise
    got = yield Cleanup(lambda: _leave(ref, sess.id, wid), _leaving(ref))
    return got is not DEFERRED and bool(got)


def _leaving(ref: EventRef) -> str:
    return f"leaving the waiters of {ref.describe()}"


def _leave(ref: EventRef, sid: str, wid: str) -> Op:
    """Waiter ``wid`` leaves the list; True if the flag was set meanwhile."""
    reply = yield ref.call("cancel", sid, wid)
    return _expect(reply, ref, "set", "cancelled") == "set"


def set_(ref: EventRef) -> Op:
    """Set the flag and wake every waiter. Returns how many were woken."""
    reply = yield ref.call("set", "-", "-", ref.keep_ms)
    _expect(reply, ref, "ok")
    return int(reply[1])


def clear(ref: EventRef) -> Op:
    """Reset the flag."""
    reply = yield ref.call("clear", "-")
    _expect(reply, ref, "ok")
    return None


def is_set(ref: EventRef) -> Op:
    """(flag, number of waiters)."""
    reply = yield ref.call("is_set", "-")
    _expect(reply, ref, "ok")
    return (int(reply[1]) == 1, int(reply[2]))
