"""Core logic of Lock, RLock, Semaphore and BoundedSemaphore (script ``permits.lua``).

All four are a counted set of permits owned by sessions:

=========  =======  ==================================================================
kind       permits  release by a session holding none
=========  =======  ==================================================================
lock       1        NotHeldError / NotOwnerError (only the holding process releases)
rlock      1        same; reentrancy is counted in the client, per thread
sem        value    adds a free permit (threading's semantics)
bsem       value    OverReleaseError if that would exceed the initial value
=========  =======  ==================================================================

Waiting is a FIFO queue on the server. A release grants the freed permit to the head
waiter inside the same script and pushes the fencing token onto that waiter's inbox,
so the woken waiter owns the permit without another round trip. A waiter also looks
again when the earliest holder lease ends, so a lost wake-up costs at most one lease.

Faults. Every call here may be sent again after its reply was lost and answers as
its first run did (``permits.lua``: a grant is recorded with the waiter id it went
to, a lock's release names the grant it ends, a semaphore's release has an id):

==========================================  ==========================================
what fails                                  what happens
==========================================  ==========================================
acquire's reply lost (reset, timeout,       sent again with the same waiter id: the
garbled)                                    grant it got, or its place in the queue
a waiter's pop lost with its connection     it looks again: a grant popped and lost is
                                            found by its waiter id
the server restarted and dropped the queue  looking again joins it anew
the wait ends otherwise than with a grant   a clean-up leaves the queue and gives back a
(timeout, interrupt, cancellation) after a  grant that may have come (:func:`give_up`):
call that may have queued or granted        now, or kept by the session until the
                                            server answers
release's reply lost                        sent again: released once
release cannot reach the server at all      kept by the session and sent when the
                                            server answers; the hold is given up here
==========================================  ==========================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from procsync.backend.client import MAX_POP_SECONDS, Backend
from procsync.core.steps import (
    POP_FAILED,
    WAKE,
    Call,
    Cleanup,
    HolderInfo,
    Op,
    Pop,
    SessionGone,
    SessionView,
    check_common,
    dead_on_this_host,
    parse_holders,
    parse_notice,
    reap,
    side_key,
)
from procsync.errors import (
    LockLostError,
    NotHeldError,
    NotOwnerError,
    OverReleaseError,
    ProtocolError,
    ServerError,
)

__all__ = [
    "KINDS",
    "PermitState",
    "PermitsRef",
    "acquire",
    "first_call",
    "give_up",
    "parse_token",
    "release",
    "release_call",
    "release_result",
    "send_again",
    "state",
]

KINDS = {"lock": "Lock", "rlock": "RLock", "sem": "Semaphore", "bsem": "BoundedSemaphore"}

#: Extra wait past a holder's lease before looking again (server clocks tick in ms).
LEASE_MARGIN_S = 0.02


@dataclass(frozen=True, slots=True)
class PermitsRef:
    """Where a permit primitive lives and what shape it has."""

    backend: Backend
    kind: str
    name: str
    init: int
    keys: tuple[str, str, str, str] = field(init=False, repr=False, compare=False)
    """KEYS of every permits.lua call: state, queue, sessions, fence (made once)."""

    def __post_init__(self) -> None:
        b = self.backend
        keys = (
            f"{b.prefix}{self.kind}:{self.name}",
            side_key(b.prefix, self.kind, "q", self.name),
            b.sessions_key,
            b.fence_key,
        )
        object.__setattr__(self, "keys", keys)

    @property
    def key(self) -> str:
        return self.keys[0]

    @property
    def queue_key(self) -> str:
        return self.keys[1]

    def describe(self) -> str:
        return f"{KINDS[self.kind]} {self.name!r}"

    def call(self, op: str, sid: str, *extra: str | int) -> Call:
        b = self.backend
        return Call("permits", self.keys, (b.prefix, op, self.kind, self.init, sid, *extra))

    def inbox(self, wid: str) -> str:
        return f"{self.backend.prefix}in:{wid}"


def parse_token(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ProtocolError(f"malformed fencing token {value!r:.100}") from None


def _parse_queued(reply: list[Any]) -> tuple[list[HolderInfo], list[HolderInfo]]:
    """Split a 'queued' reply into the holders and the waiters just ahead."""
    try:
        n = int(reply[2])
    except (IndexError, TypeError, ValueError):
        raise ProtocolError(f"malformed queued reply {reply!r:.200}") from None
    return parse_holders(reply[3 : 3 + 7 * n]), parse_holders(reply[3 + 7 * n :])


def _quiet_left(reply: list[Any]) -> float:
    """Seconds until the quiet period of a ``quiet`` reply ends, by the server's clock."""
    try:
        return max(0.0, (int(reply[2]) - int(reply[1])) / 1000.0)
    except (IndexError, TypeError, ValueError):
        raise ProtocolError(f"malformed quiet reply {reply!r:.200}") from None


def lease_left(server_now: Any, holders: list[HolderInfo]) -> float:
    """Seconds until the earliest holder lease ends, by the server's clock (no holder,
    e.g. a Semaphore(0) waiting for a release: the longest single pop)."""
    try:
        now_ms = int(server_now)
    except (TypeError, ValueError):
        raise ProtocolError(f"malformed server time {server_now!r:.100}") from None
    if not holders:
        return MAX_POP_SECONDS
    return max(0.0, (min(h.deadline_ms for h in holders) - now_ms) / 1000.0)


def acquire(
    ref: PermitsRef,
    sess: SessionView,
    wid: str,
    blocking: bool,
    deadline: float | None,
    now: Callable[[], float],
    reply: list[Any] | None = None,
) -> Op:
    """Take one permit as waiter ``wid``. Returns the fencing token, or None if not
    granted in time.

    ``deadline`` is a value of the monotonic clock ``now()`` (None: no limit).
    ``reply`` is the reply of a first ``acquire`` call the caller made itself (a
    front's direct path, see :func:`first_call`); None: the operation makes it (also
    when the caller's call failed: sent again, it answers as it would have).
    Raises SessionGone (nothing changed) when the server does not know ``sess``.
    If it ends any other way than with a grant or a plain "busy" -- interrupted
    (KeyboardInterrupt, task cancelled), the server unreachable past the budget --
    it leaves the queue and gives back a permit granted in the meantime (a
    :class:`Cleanup`, see :func:`give_up`) before re-raising.
    """
    inbox = ref.inbox(wid)
    b = ref.backend
    try:
        if reply is None:
            reply = yield ref.call("acquire", sess.id, wid, 1 if blocking else 0)
        while True:
            status = reply[0]
            if status == "ok":
                return parse_token(reply[1])
            if status == "busy":
                return None
            if status == "nosession":
                raise SessionGone()
            if status == "quiet":
                # The server lost state: nothing is granted until every old lease has
                # run out. A blocking waiter is queued; it looks again then.
                if not blocking:
                    return None
                lease_end = now() + _quiet_left(reply)
            elif status != "queued":
                check_common(reply, ref.describe)
                raise ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")
            else:
                holders, ahead = _parse_queued(reply)
                dead = sess.watch_holders(holders + ahead, inbox)
                if dead:
                    yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
                    reply = yield ref.call("acquire", sess.id, wid, 1)
                    continue
                # Look again when the earliest holder lease runs out (its session is
                # then reaped by whoever meets it first, possibly us), or when the
                # budget ends.
                lease_end = now() + lease_left(reply[1], holders)
            while True:
                left = None if deadline is None else deadline - now()
                if left is not None and left <= 0:
                    try:
                        reply = yield ref.call("cancel", sess.id, wid)
                    except ServerError:
                        # Busy when last seen; a grant that came since goes back.
                        yield Cleanup(lambda: give_up(ref, sess.id, wid), _leaving(ref))
                        return None
                    return parse_token(reply[1]) if reply[0] == "ok" else None
                wait = min(MAX_POP_SECONDS, max(0.0, lease_end - now()) + LEASE_MARGIN_S)
                if left is not None:
                    wait = min(wait, left)
                got = yield Pop(inbox, wait)
                if got is None or got in (WAKE, POP_FAILED):
                    if deadline is not None and now() >= deadline:
                        continue  # the budget is spent: cancel at the top
                    break  # a lease may have ended, or the pop failed: look again
                notice = parse_notice(got, "w:")
                if notice is None:
                    return parse_token(got)
                # We became the head of the queue: watch the new holder.
                dead = sess.watch_holders([notice], inbox)
                if dead:
                    yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
            reply = yield ref.call("acquire", sess.id, wid, 1)
    except SessionGone:
        raise  # the session's end took its place in the queue and anything granted
    except BaseException:
        yield Cleanup(lambda: give_up(ref, sess.id, wid), _leaving(ref))
        raise


def _leaving(ref: PermitsRef) -> str:
    return f"leaving the queue of {ref.describe()}"


def give_up(ref: PermitsRef, sid: str, wid: str) -> Op:
    """Waiter ``wid`` of session ``sid`` leaves the queue, and gives back what it may
    have been granted (by a reply or a pop that never arrived). Idempotent: run
    again, it finds nothing more to do."""
    reply = yield ref.call("cancel", sid, wid)
    if reply[0] == "ok":
        yield ref.call("release", sid, 1, 1, wid)
    elif reply[0] != "cancelled":
        check_common(reply, ref.describe)


def first_call(ref: PermitsRef, sess: SessionView, blocking: bool) -> tuple[str, Call]:
    """A new waiter id and the first call :func:`acquire` would make: a front may make
    it directly (no generator, no driver) and hand the reply to :func:`acquire`
    unless it is a plain grant."""
    wid = sess.new_waiter_id()
    return wid, ref.call("acquire", sess.id, wid, 1 if blocking else 0)


def release(
    ref: PermitsRef, sess: SessionView | None, n: int, held_locally: bool, grant: str = ""
) -> Op:
    """Give back ``n`` permits. Returns how many waiters were woken.

    ``held_locally`` says whether this process believes it holds the primitive: a
    lock the server says is not ours then means the hold was lost (LockLostError),
    not misuse. ``grant``: a lock's release names the waiter id of the grant it
    ends; a semaphore's release gets an id of its own -- either way, the call sent
    again after its reply was lost releases nothing more.
    """
    reply = yield release_call(ref, sess, n, held_locally, grant)
    return release_result(ref, reply, held_locally)


def release_call(
    ref: PermitsRef, sess: SessionView | None, n: int, held_locally: bool, grant: str = ""
) -> Call:
    """The one call :func:`release` makes (a front may make it directly and hand the
    reply to :func:`release_result`)."""
    sid = sess.id if sess is not None else "-"
    if ref.kind in ("sem", "bsem") and sess is not None:
        grant = sess.new_waiter_id()  # the release's own id
    return ref.call("release", sid, n, 1 if held_locally else 0, grant)


def send_again(call: Call) -> Op:
    """A release the server could not confirm, kept by the session: sent again until
    answered. Whatever it answers is fine: the hold ended, by this release or with
    its session."""
    yield call


def release_result(ref: PermitsRef, reply: list[Any], held_locally: bool) -> int:
    """What a ``release`` reply means: how many waiters were woken, or the error."""
    status = reply[0]
    if status == "ok":
        return int(reply[1])
    if status in ("notheld", "notowner"):
        if held_locally:
            raise LockLostError(
                f"{ref.describe()} was no longer held by this process when released: its "
                "session lease ended (paused or cut off past the ttl, or the server lost "
                "its data); another process may have been granted it since"
            )
        if status == "notowner":
            h = parse_holders(reply[1:])
            who = f" (held by pid {h[0].pid}, session {h[0].sid[:8]})" if h else ""
            raise NotOwnerError(f"cannot release {ref.describe()}: held by another process{who}")
        raise NotHeldError(f"release of unlocked {ref.describe()}")
    if status == "overrelease":
        raise OverReleaseError(f"{ref.describe()} released too many times")
    check_common(reply, ref.describe)
    raise ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")


@dataclass(frozen=True, slots=True)
class PermitState:
    """What the server knows of a permit primitive at one instant."""

    value: int
    initial: int
    last_token: int
    grants: int
    reclaimed: int
    waiting: int
    holders: tuple[Any, ...]


def state(ref: PermitsRef) -> Op:
    """Read the primitive's state. Holders whose lease ended are reaped by the script;
    holders on this host whose process is gone are reaped too, and the state read
    again, so a value read right after a crash already counts the returned permits."""
    reply = yield ref.call("state", "-")
    if reply[0] == "state":
        dead = dead_on_this_host(parse_holders(reply[7:]))
        if dead:
            b = ref.backend
            yield from reap(b.prefix, b.sessions_key, b.gone_key, dead)
            reply = yield ref.call("state", "-")
    if reply[0] != "state":
        check_common(reply, ref.describe)
        raise ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")
    try:
        nums = [int(x) for x in reply[1:7]]
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{ref.describe()}: malformed state {reply!r:.200}") from exc
    v, init, last, grants, reclaimed, waiting = nums
    return PermitState(v, init, last, grants, reclaimed, waiting, tuple(parse_holders(reply[7:])))
