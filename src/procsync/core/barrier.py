"""Core logic of Barrier (script ``barrier.lua``).

The last party to arrive either releases everyone (no action) or is told to run
the action and then report ``done`` (or ``abort`` if it raised). Waiters pop their
inbox for ``go`` / ``broken``; ``peer:`` notices name the party that arrived right
after them, so each waiter watches its neighbours and a party dying on the same
host breaks the barrier at once (elsewhere: when its lease ends). As in threading,
a timeout or an interrupted wait breaks the barrier for everyone.

Faults: an arrival is the one call never sent again (it would count twice). When its
reply, or a pop, is lost, the party asks where its arrival stands (``check``): still
waiting -- it goes on; released -- it passes; broken, or not known at all any more
(it never arrived, or it was the last and released the others) --
BrokenBarrierError, the answer threading gives a party that cannot go on. A party
whose session is lost while it waits gets BrokenBarrierError too (the session's end
breaks the barrier for the others, as a party's death does). A timeout that cannot
reach the server raises ServerUnavailableError; the break it owes the others is
kept by the session and made when the server answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from procsync.backend.client import MAX_POP_SECONDS, Backend
from procsync.core.steps import (
    POP_FAILED,
    Call,
    Cleanup,
    Op,
    Pop,
    SessionGone,
    SessionView,
    check_common,
    parse_holders,
    parse_notice,
    reap,
    side_key,
)
from procsync.errors import (
    BrokenBarrierError,
    ProtocolError,
    ServerError,
    ServerUnavailableError,
)

__all__ = ["BarrierRef", "BarrierState", "abort", "done", "reset", "state", "wait"]


@dataclass(frozen=True, slots=True)
class BarrierRef:
    """Where a Barrier lives and how many parties it needs."""

    backend: Backend
    name: str
    parties: int

    @property
    def key(self) -> str:
        return f"{self.backend.prefix}barrier:{self.name}"

    def describe(self) -> str:
        return f"Barrier {self.name!r}"

    def call(self, op: str, sid: str, wid: str = "", has_action: int = 0) -> Call:
        b = self.backend
        return Call(
            "barrier",
            (
                self.key,
                side_key(b.prefix, "barrier", "a", self.name),
                side_key(b.prefix, "barrier", "r", self.name),
                b.sessions_key,
            ),
            (b.prefix, op, sid, wid, self.parties, has_action),
        )


def _broken(ref: BarrierRef, why: Any) -> BrokenBarrierError:
    reason = str(why) if why else "broken"
    return BrokenBarrierError(f"{ref.describe()} is broken: {reason}")


def _unexpected(ref: BarrierRef, reply: list[Any]) -> Exception:
    check_common(reply, ref.describe)
    return ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")


def wait(
    ref: BarrierRef,
    sess: SessionView,
    has_action: bool,
    deadline: float | None,
    now: Callable[[], float],
) -> Op:
    """Arrive. Returns ``("go", index)`` once released, or ``("run", index)`` when the
    caller is the last party and must run the action then call :func:`done`.

    Raises BrokenBarrierError if the barrier is or becomes broken, and breaks it
    itself on timeout or interruption.
    """
    wid = sess.new_waiter_id()
    arrive = ref.call("wait", sess.id, wid, 1 if has_action else 0)
    try:
        reply = yield Call(arrive.script, arrive.keys, arrive.args, once=True)
    except (ServerUnavailableError, ProtocolError):
        # Did it arrive? Ask (an idempotent call, sent again as needed).
        found = yield ref.call("check", sess.id, wid)
        if found[0] != "waiting":
            raise _lost(ref, found) from None
        reply = ["wait", found[1]]
    status = reply[0]
    if status == "nosession":
        raise SessionGone()
    if status == "broken":
        raise _broken(ref, reply[1])
    if status in ("go", "run"):
        return (status, int(reply[1]))
    if status != "wait":
        raise _unexpected(ref, reply)
    index = int(reply[1])
    inbox = f"{ref.backend.prefix}in:{wid}"
    try:
        b = ref.backend
        dead = sess.watch_holders(parse_holders(reply[2:]), inbox)
        if dead:
            yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
        while True:
            left = None if deadline is None else deadline - now()
            if left is not None and left <= 0:
                try:
                    reply = yield ref.call("timeout", sess.id, wid)
                except ServerError:
                    yield Cleanup(
                        lambda: _time_out(ref, sess.id, wid), f"breaking {ref.describe()}"
                    )
                    raise
                if reply[0] == "go":
                    return ("go", index)
                raise _broken(ref, reply[1] if len(reply) > 1 else "a wait timed out")
            got = yield Pop(inbox, MAX_POP_SECONDS if left is None else min(left, MAX_POP_SECONDS))
            if got is None:
                continue
            if got == POP_FAILED:
                found = yield ref.call("check", sess.id, wid)
                if found[0] == "waiting":
                    continue
                got = "go" if found[0] == "go" else "lost"
                if got == "lost":
                    raise _lost(ref, found)
            if got == "go":
                return ("go", index)
            if got == "broken":
                st = yield from state(ref)
                raise _broken(ref, st.why)
            if got.startswith("peer:"):
                peer = parse_notice(got, "peer:")
                if peer is not None:
                    dead = sess.watch_holders([peer], inbox)
                    if dead:
                        yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
    except BrokenBarrierError:
        raise
    except SessionGone:
        # Its session ended, and its arrival with it (which broke the barrier).
        raise _broken(ref, "this party's session was lost while it waited") from None
    except BaseException:
        yield Cleanup(
            lambda: abort(ref, sess.id, "a waiting party was interrupted"),
            f"breaking {ref.describe()}",
        )
        raise


def _lost(ref: BarrierRef, found: list[Any]) -> BrokenBarrierError:
    """What a party hears whose arrival's fate could not be told for sure."""
    if found[0] == "broken":
        return _broken(ref, found[1])
    return BrokenBarrierError(
        f"{ref.describe()}: this party's arrival may have been lost with a connection "
        "(it is not waiting any more); the barrier cannot tell it passed"
    )


def _time_out(ref: BarrierRef, sid: str, wid: str) -> Op:
    """A timed-out party's break of the barrier (idempotent)."""
    yield ref.call("timeout", sid, wid)


def done(ref: BarrierRef, sess: SessionView) -> Op:
    """The action ran: release the generation."""
    reply = yield ref.call("done", sess.id)
    if reply[0] == "broken":
        raise _broken(ref, reply[1])
    if reply[0] != "ok":
        raise _unexpected(ref, reply)
    return None


def abort(ref: BarrierRef, sid: str, why: str = "aborted") -> Op:
    """Break the barrier: every waiter, now and later, gets BrokenBarrierError."""
    reply = yield ref.call("abort", sid, why)
    if reply[0] != "ok":
        raise _unexpected(ref, reply)
    return None


def reset(ref: BarrierRef) -> Op:
    """Return to the empty state; current waiters get BrokenBarrierError."""
    reply = yield ref.call("reset", "-")
    if reply[0] != "ok":
        raise _unexpected(ref, reply)
    return None


@dataclass(frozen=True, slots=True)
class BarrierState:
    """Parties waiting in the current generation, and whether the barrier is broken."""

    n_waiting: int
    broken: bool
    why: str


def state(ref: BarrierRef) -> Op:
    """Read the barrier's state."""
    reply = yield ref.call("state", "-")
    if reply[0] != "ok":
        raise _unexpected(ref, reply)
    return BarrierState(int(reply[1]), int(reply[2]) == 1, str(reply[3]))
