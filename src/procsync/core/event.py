"""Core logic of Event (script ``event.lua``).

``set()`` raises the flag and pushes a wake-up onto the inbox of every live waiter
in the same script; ``wait()`` registers in the waiter list and pops its inbox.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from procsync.backend.client import MAX_POP_SECONDS, Backend
from procsync.core.steps import (
    WAKE,
    Call,
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


def wait(ref: EventRef, sess: SessionView, deadline: float | None, now: Any) -> Op:
    """Block until the flag is set; True if it was, False on timeout."""
    wid = sess.new_waiter_id()
    reply = yield ref.call("wait", sess.id, wid)
    status = _expect(reply, ref, "set", "waiting", "nosession")
    if status == "set":
        return True
    if status == "nosession":
        raise SessionGone()
    inbox = f"{ref.backend.prefix}in:{wid}"
    try:
        while True:
            left = None if deadline is None else deadline - now()
            if left is not None and left <= 0:
                break
            got = yield Pop(inbox, MAX_POP_SECONDS if left is None else min(left, MAX_POP_SECONDS))
            if got is not None and got != WAKE:
                return True
            if left is None:
                # A long wait: make sure we are still registered (session may have been
                # renewed after a server restart); re-registering is idempotent.
                reply = yield ref.call("wait", sess.id, wid)
                status = _expect(reply, ref, "set", "waiting", "nosession")
                if status == "set":
                    yield ref.call("cancel", sess.id, wid)
                    return True
                if status == "nosession":
                    raise SessionGone()
    except BaseException:
        yield ref.call("cancel", sess.id, wid)
        raise
    reply = yield ref.call("cancel", sess.id, wid)
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
