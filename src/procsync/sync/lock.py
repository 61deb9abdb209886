"""Lock and RLock: counterparts of ``threading.Lock`` / ``threading.RLock`` for
processes on any machine."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, final

from procsync import _drivers
from procsync._drivers import RETRYABLE
from procsync._validate import check_timeout
from procsync.core import permits
from procsync.core.steps import Cleanup, Op, SessionGone
from procsync.errors import LockLostError, NotHeldError, NotOwnerError
from procsync.session import Session, usable_session
from procsync.sync._base import Holder, PermitHolder

__all__ = ["Lock", "LockCommon", "LockStatistics", "RLock"]


@dataclass(frozen=True, slots=True)
class LockStatistics:
    """A snapshot of a lock as the server sees it (one round trip)."""

    name: str
    locked: bool
    owner: Holder | None
    waiting: int
    last_token: int
    grants: int
    reclaimed: int
    """Holds taken back from dead holders since the lock last had a key."""


def _check_acquire_args(blocking: object, timeout: object) -> float | None:
    if not isinstance(blocking, (bool, int)):
        raise TypeError(f"blocking must be a bool, not {type(blocking).__name__}")
    if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        if not blocking and timeout != -1:
            raise ValueError("can't specify a timeout for a non-blocking call")
        if timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
    return check_timeout(timeout, negative="forever")


class LockCommon(PermitHolder):
    """What the sync and asyncio locks share: where the lock lives, the local hold
    record, and the acquire/release operations both fronts drive."""

    __slots__ = ()

    _kind = "lock"

    def __init__(
        self, name: str | None = None, *, url: str | None = None, namespace: str | None = None
    ) -> None:
        super().__init__(name, url, namespace, 1)

    def _undo_acquire(self, sess: Session, acquired: Any) -> Op | None:
        """Give back a grant whose caller was cancelled (asyncio)."""
        return self._release_op() if acquired else None

    def _release_op(self) -> Op:
        """The release operation (both fronts).

        Faults: the call is sent again (it names the grant it ends, so it releases
        once) for up to ``RELEASE_BUDGET``; if the server still cannot confirm it, the
        hold is given up here and the session sends the release when the server
        answers again (before this process queues for the lock again), or the lock is
        freed with the session's end. A hold already lost raises LockLostError."""
        ref = self.ref
        hold = self._hold
        held = hold.count > 0
        sess = hold.session if held else usable_session(ref.backend)
        lost = hold.lost()
        if lost is not None:
            # Freed with the lost session: closed on the server when it answers.
            hold.clear()
            raise LockLostError(f"{ref.describe()} was lost before release: {lost}")
        call = permits.release_call(ref, sess, 1, held, hold.wid if held else "")
        try:
            reply = yield call
        except RETRYABLE:
            if not held:
                raise
            yield Cleanup(
                lambda: permits.send_again(call), f"releasing {ref.describe()}", now=False
            )
            hold.released(1)
            return
        except SessionGone:
            # The session was lost while the release was being sent: so was the hold.
            hold.clear()
            raise LockLostError(
                f"{ref.describe()} was lost before its release was confirmed: its session "
                "was lost meanwhile"
            ) from None
        self._released(reply, held)

    def _released(self, reply: list[Any], held: bool) -> None:
        """Apply a release reply to the local hold record (or raise its error)."""
        try:
            permits.release_result(self.ref, reply, held)
        except LockLostError:
            self._hold.clear()
            raise
        # One grant fewer, not "none": another thread of this process may already have
        # been handed the lock by this very release and recorded its grant.
        self._hold.released(1)

    def _server_release(self) -> None:
        hold = self._hold
        sess = hold.session
        b = self.ref.backend
        until = _drivers.release_until()
        if sess is not None and hold.count > 0 and hold.lost() is None:
            # The common case, made directly: held here, not lost — one script call.
            call = permits.release_call(self.ref, sess, 1, True, hold.wid)
            try:
                reply = b.call(call.script, call.keys, call.args, until - time.monotonic())
            except RETRYABLE:
                pass  # it may have run: the operation sends it again, naming its grant
            else:
                self._released(reply, True)
                return
        _drivers.run(b, self._release_op(), until=until, session=self._release_session())

    # -- introspection ------------------------------------------------------------

    def _statistics(self, st: permits.PermitState) -> LockStatistics:
        return LockStatistics(
            name=self._name,
            locked=st.value == 0,
            owner=Holder.from_info(st.holders[0]) if st.holders else None,
            waiting=st.waiting,
            last_token=st.last_token,
            grants=st.grants,
            reclaimed=st.reclaimed,
        )


class _LockBase(LockCommon):
    __slots__ = ()

    def locked(self) -> bool:
        """True if some process holds the lock (one round trip)."""
        return self.statistics().locked

    def owner(self) -> Holder | None:
        """The holding process (session id, host, pid, lease end), or None."""
        return self.statistics().owner

    def statistics(self) -> LockStatistics:
        """A snapshot of the lock on the server (one round trip)."""
        return self._statistics(_drivers.run(self.ref.backend, permits.state(self.ref)))


@final
class Lock(_LockBase):
    """Counterpart of ``threading.Lock`` for processes on any machine.

    ``Lock("tickets")`` in any process — parent, child, unrelated program, another
    host with the same ``PROCSYNC_URL`` — is the same lock. ``Lock()`` makes an
    anonymous one to hand to children (it pickles as its name and server).

    Waiters are served first come, first served; a release hands the lock straight
    to the next waiter. Every grant carries a fencing :attr:`token`.

    Differences from threading:

    * Only the holding *process* may release (any of its threads, as threading allows);
      another process gets :class:`~procsync.errors.NotOwnerError` (a RuntimeError).
    * Releasing an unheld lock raises :class:`~procsync.errors.NotHeldError`, both the
      RuntimeError of threading and the ValueError of multiprocessing.
    * A holder that dies releases it: at once when a waiter on the same host sees its
      pid gone, else when its session lease (``ttl``) runs out.
    * A hold can be lost (process paused past its ttl, server down or restarted):
      :attr:`lost`, :meth:`on_lost`, and release() raises LockLostError.
    """

    __slots__ = ()
    _kind = "lock"

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the lock, blocking or not, with an optional timeout in seconds.

        As ``threading.Lock.acquire``: ``timeout=-1`` waits forever, other negative
        values and a timeout with ``blocking=False`` raise ValueError. Returns True
        when acquired.
        """
        t = _check_acquire_args(blocking, timeout)
        return self._server_acquire(bool(blocking), t)

    def release(self) -> None:
        """Release the lock; the next waiter (if any) holds it when this returns."""
        self._server_release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "held here" if self._hold.count else "not held here"
        tok = f" token={self._hold.token}" if self._hold.count else ""
        return f"<procsync.Lock {self._name!r} {state}{tok}{self._where()} at {id(self):#x}>"


@final
class RLock(_LockBase):
    """Counterpart of ``threading.RLock`` for processes on any machine.

    Reentrant for the thread that holds it: it may acquire again, and must release
    as many times. The depth is counted in this process; the server sees one hold,
    which a crash frees whatever the depth.

    Differences from threading: as :class:`Lock` (release from another thread of the
    same process raises :class:`~procsync.errors.NotOwnerError`, as threading's
    RuntimeError).
    """

    __slots__ = ("_depth", "_owner_thread")
    # Same server lock as Lock(name): reentrancy lives in the client, so an RLock and a
    # Lock of one name (e.g. a Condition's default lock on both fronts) exclude each other.
    _kind = "lock"

    def __init__(
        self, name: str | None = None, *, url: str | None = None, namespace: str | None = None
    ) -> None:
        super().__init__(name, url=url, namespace=namespace)
        self._owner_thread: int | None = None
        self._depth = 0

    def _mine(self) -> bool:
        return self._hold.count > 0 and self._owner_thread == threading.get_ident()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire, or re-enter if this thread already holds it (no round trip)."""
        t = _check_acquire_args(blocking, timeout)
        if self._mine():
            self._depth += 1
            return True
        if not self._server_acquire(bool(blocking), t):
            return False
        self._owner_thread = threading.get_ident()
        self._depth = 1
        return True

    def release(self) -> None:
        """Leave one level; the last one releases the lock on the server."""
        if not self._mine():
            if self._hold.count > 0:
                raise NotOwnerError(
                    f"cannot release RLock {self._name!r}: thread {self._owner_thread} holds it"
                )
            owner = self.owner()
            if owner is not None:
                raise NotOwnerError(
                    f"cannot release RLock {self._name!r}: held by pid {owner.pid} on "
                    f"{owner.host} (session {owner.session_id[:8]})"
                )
            raise NotHeldError(f"cannot release un-acquired RLock {self._name!r}")
        if self._depth > 1:
            self._depth -= 1
            return
        self._depth = 0
        self._owner_thread = None
        self._server_release()

    def _is_owned(self) -> bool:
        return self._mine()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def depth(self) -> int:
        """How many times the calling thread holds it (0 if it does not)."""
        return self._depth if self._mine() else 0

    def __repr__(self) -> str:
        if self._hold.count:
            state = (
                f"held here by thread {self._owner_thread} depth={self._depth} "
                f"token={self._hold.token}"
            )
        else:
            state = "not held here"
        return f"<procsync.RLock {self._name!r} {state}{self._where()} at {id(self):#x}>"
