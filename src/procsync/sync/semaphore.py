"""Semaphore and BoundedSemaphore: counterparts of ``threading.Semaphore`` /
``threading.BoundedSemaphore`` for processes on any machine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from procsync import _drivers
from procsync._drivers import RETRYABLE
from procsync._validate import check_permits, check_timeout
from procsync.core import permits
from procsync.core.steps import Cleanup, Op, SessionGone
from procsync.errors import LockLostError
from procsync.session import Session, usable_session
from procsync.sync._base import Holder, PermitHolder

__all__ = ["BoundedSemaphore", "Semaphore", "SemaphoreCommon", "SemaphoreStatistics"]


@dataclass(frozen=True, slots=True)
class SemaphoreStatistics:
    """A snapshot of a semaphore as the server sees it (one round trip)."""

    name: str
    value: int
    initial: int
    holders: tuple[Holder, ...]
    waiting: int
    last_token: int
    grants: int
    reclaimed: int
    """Permits given back by dead holders since the semaphore last had a key."""


class SemaphoreCommon(PermitHolder):
    """What the sync and asyncio semaphores share: shape, hold record, operations."""

    __slots__ = ()

    _kind = "sem"

    def __init__(
        self,
        value: int = 1,
        *,
        name: str | None = None,
        url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise ValueError("semaphore initial value must be >= 0")
        super().__init__(name, url, namespace, check_permits(value, "semaphore initial value"))

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._initial,), {"name": self._name}

    def _undo_acquire(self, sess: Session, acquired: Any) -> Op | None:
        return self._release_op(1) if acquired else None

    def _release_op(self, n: int) -> Op:
        """The release operation (both fronts)."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, not {type(n).__name__}")
        if n < 1:
            raise ValueError("n must be one or more")
        check_permits(n, "n")
        ref = self.ref
        hold = self._hold
        held = hold.count > 0
        lost = hold.lost()
        if held and lost is not None:
            hold.clear()
            raise LockLostError(f"{ref.describe()}: the permits held here were lost: {lost}")
        sess = hold.session if held else usable_session(ref.backend)
        # (a release id of its own: sent again, it gives back no second permit)
        call = permits.release_call(ref, sess, n, held)
        try:
            reply = yield call
        except RETRYABLE:
            if sess is None:
                raise
            # Not confirmed in time: given up here, sent when the server answers again.
            yield Cleanup(
                lambda: permits.send_again(call), f"releasing {ref.describe()}", now=False
            )
            hold.released(n)
            return None
        except SessionGone:
            hold.clear()
            raise LockLostError(
                f"{ref.describe()}: the permits held here were lost before the release was "
                "confirmed (the session was lost meanwhile)"
            ) from None
        try:
            permits.release_result(ref, reply, held)
        except LockLostError:
            hold.clear()
            raise
        hold.released(n)
        return None

    @property
    def initial_value(self) -> int:
        """The value the semaphore was created with."""
        return self._initial

    def _statistics(self, st: permits.PermitState) -> SemaphoreStatistics:
        return SemaphoreStatistics(
            name=self._name,
            value=st.value,
            initial=st.initial,
            holders=tuple(Holder.from_info(h) for h in st.holders),
            waiting=st.waiting,
            last_token=st.last_token,
            grants=st.grants,
            reclaimed=st.reclaimed,
        )

    def __repr__(self) -> str:
        cls = type(self).__name__
        front = (
            "procsync.asyncio"
            if type(self).__module__.startswith("procsync.asyncio")
            else "procsync"
        )
        return (
            f"<{front}.{cls} {self._name!r} value={self._initial} "
            f"held here={self._hold.count}{self._where()} at {id(self):#x}>"
        )


class Semaphore(SemaphoreCommon):
    """Counterpart of ``threading.Semaphore`` for processes on any machine.

    ``Semaphore(3, name="ktv")`` lets three holders in at once, across every process
    that opens ``"ktv"``. Waiters are served in arrival order; a release hands the
    permit to the next waiter directly.

    Differences from threading:

    * Permits are owned by the acquiring process: when it dies its permits come back
      (at once on the same host, within the ttl elsewhere).
    * ``release()`` by a process that holds no permit adds a free permit, as in
      threading (so the value can grow above the initial one; BoundedSemaphore forbids it).
    * Every process opening the same name must give the same initial value;
      another value raises :class:`~procsync.errors.ConflictError` while the
      semaphore is in use.
    """

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float | None = None) -> bool:
        """Take one permit, waiting up to ``timeout`` seconds (None: forever).

        As threading: a timeout with ``blocking=False`` raises ValueError; a negative
        timeout does not wait. Returns True when a permit was taken.
        """
        if not isinstance(blocking, (bool, int)):
            raise TypeError(f"blocking must be a bool, not {type(blocking).__name__}")
        if not blocking and timeout is not None:
            raise ValueError("can't specify timeout for non-blocking acquire")
        t = check_timeout(timeout, negative="zero")
        return self._server_acquire(bool(blocking), t)

    def release(self, n: int = 1) -> None:
        """Give back ``n`` permits (waking up to ``n`` waiters).

        Permits this process holds are returned first; beyond them a Semaphore adds
        free permits and a BoundedSemaphore raises ValueError.
        """
        _drivers.run(
            self.ref.backend,
            self._release_op(n),
            until=_drivers.release_until(),
            session=self._release_session(),
        )

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()

    # -- introspection ------------------------------------------------------------

    @property
    def value(self) -> int:
        """Free permits right now (one round trip)."""
        return self.statistics().value

    def get_value(self) -> int:
        """``multiprocessing.Semaphore.get_value()``: same as :attr:`value`."""
        return self.value

    def holders(self) -> list[Holder]:
        """The processes holding permits (at most 32 listed)."""
        return list(self.statistics().holders)

    def statistics(self) -> SemaphoreStatistics:
        """A snapshot of the semaphore on the server (one round trip)."""
        return self._statistics(_drivers.run(self.ref.backend, permits.state(self.ref)))


class BoundedSemaphore(Semaphore):
    """Counterpart of ``threading.BoundedSemaphore`` for processes on any machine.

    As :class:`Semaphore`, but a release that would raise the number of permits
    above the initial value raises :class:`~procsync.errors.OverReleaseError`
    (a ValueError) and changes nothing.
    """

    __slots__ = ()
    _kind = "bsem"
