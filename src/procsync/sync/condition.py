"""Condition: counterpart of ``threading.Condition`` for processes on any machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast, final

from procsync import _drivers
from procsync._validate import check_permits, check_timeout
from procsync.core import condition as core
from procsync.core.steps import Op, SessionGone
from procsync.errors import NotHeldError
from procsync.session import Session, usable_session
from procsync.sync._base import Primitive
from procsync.sync.lock import Lock, LockCommon, RLock

__all__ = ["Condition", "ConditionCommon"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A wait in progress: the session that held the lock (None: lost already), the
    deadline, an RLock's saved (depth, owner thread)."""

    session: Session | None
    deadline: float | None
    saved: tuple[int, int | None] | None


class ConditionCommon(Primitive):
    """What the sync and asyncio conditions share: the lock, and the wait/notify
    operations both fronts drive."""

    __slots__ = ("_lock", "_ref")

    def __init__(
        self,
        lock: LockCommon | None,
        default_lock: Callable[[str], LockCommon],
        name: str | None,
        url: str | None,
        namespace: str | None,
    ) -> None:
        super().__init__(name, url, namespace)
        self._lock = lock if lock is not None else default_lock(f"{self._name}:lock")
        self._ref: core.CondRef | None = None

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._lock,), {"name": self._name}

    @property
    def ref(self) -> core.CondRef:
        r = self._ref
        if r is None:
            r = self._ref = core.CondRef(self._name, self._lock.ref)
        return r

    def _is_owned(self) -> bool:
        lock = self._lock
        if isinstance(lock, RLock):
            return lock._is_owned()
        return lock._hold.count > 0

    def _begin_wait(self, timeout: object) -> _Waiting:
        """Check the caller may wait and forget its hold locally (the wait script
        releases it on the server): the first half of a wait, both fronts."""
        if not self._is_owned():
            raise NotHeldError("cannot wait on un-acquired lock")
        t = check_timeout(timeout, negative="zero")
        lock = self._lock
        hold = lock._hold
        saved = (lock._depth, lock._owner_thread) if isinstance(lock, RLock) else None
        # A hold lost already (its session ended): no wait, a spurious wake-up.
        sess = hold.session if hold.lost() is None else None
        hold.released(1)
        if isinstance(lock, RLock):
            lock._depth, lock._owner_thread = 0, None
        deadline = None if t is None else time.monotonic() + t
        return _Waiting(sess, deadline, saved)

    def _wait_core(self, w: _Waiting) -> Op:
        """The wait itself, in the session that held the lock."""
        if w.session is None:  # pragma: no cover - callers check
            raise SessionGone()
        return core.wait(self.ref, w.session, w.deadline, time.monotonic)

    def _end_wait(self, w: _Waiting) -> None:
        """The lock is held again: an RLock gets its depth back."""
        lock = self._lock
        if isinstance(lock, RLock) and w.saved is not None:
            lock._depth, lock._owner_thread = w.saved

    def _notify_op(self, n: int) -> Op:
        if not self._is_owned():
            raise NotHeldError("cannot notify on un-acquired lock")
        ref = self.ref
        return core.notify(ref, usable_session(ref.lock.backend), n)

    def __repr__(self) -> str:
        front = (
            "procsync.asyncio"
            if type(self).__module__.startswith("procsync.asyncio")
            else "procsync"
        )
        return f"<{front}.Condition {self._name!r} lock={self._lock!r}>"


@final
class Condition(ConditionCommon):
    """Counterpart of ``threading.Condition`` for processes on any machine.

    ``Condition(lock=None, *, name=None)``: with no lock, a named condition uses the
    RLock ``"<name>:lock"`` (as threading's default lock is an RLock). Every process
    opening the same name shares the waiters; ``notify(n)`` wakes the first ``n``
    live waiters in arrival order, skipping any whose process died.

    ``wait()`` releases the lock and joins the waiters in one atomic step (no
    notify can be lost between them), and re-acquires the lock before returning —
    also when interrupted — restoring an RLock's depth.

    Differences from threading: the lock must be a procsync :class:`Lock` or
    :class:`RLock` (a threading lock means nothing to another process); calling
    wait/notify without holding it raises :class:`~procsync.errors.NotHeldError`,
    a RuntimeError as in threading. ``notify`` returns how many it woke.
    """

    __slots__ = ()

    def __init__(
        self,
        lock: Lock | RLock | None = None,
        *,
        name: str | None = None,
        url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if lock is not None and not isinstance(lock, (Lock, RLock)):
            raise TypeError(
                "Condition needs a procsync Lock or RLock (a threading or multiprocessing "
                f"lock is not shared between processes), not {type(lock).__name__}"
            )
        if lock is not None:
            url = url if url is not None else lock._url
            namespace = namespace if namespace is not None else lock._namespace
        super().__init__(
            lock, lambda n: RLock(n, url=url, namespace=namespace), name, url, namespace
        )

    @property
    def _sync_lock(self) -> Lock | RLock:
        return cast("Lock | RLock", self._lock)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the underlying lock."""
        return self._sync_lock.acquire(blocking, timeout)

    def release(self) -> None:
        """Release the underlying lock."""
        self._sync_lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify or ``timeout`` seconds, re-acquire.

        Returns False if the timeout expired, True otherwise (as threading), also for
        a spurious wake-up: the server could not be asked, or the session was lost
        (the lock is re-acquired in a new one). The re-acquire waits as threading's
        does, however long -- also for a server that is down.
        """
        w = self._begin_wait(timeout)
        notified = True
        try:
            if w.session is not None:
                try:
                    notified = bool(
                        _drivers.run(
                            self.ref.lock.backend,
                            self._wait_core(w),
                            until=_drivers.FOREVER,
                            session=w.session,
                        )
                    )
                except SessionGone:
                    notified = True  # the session ended: a spurious wake-up
        finally:
            self._sync_lock._server_acquire(True, None)
            self._end_wait(w)
        return notified

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        """Wait until ``predicate()`` is true, or ``timeout`` seconds pass; return the
        last value of the predicate (threading's semantics)."""
        endtime: float | None = None
        waittime = timeout
        result = predicate()
        while not result:
            if waittime is not None:
                if endtime is None:
                    endtime = time.monotonic() + waittime
                else:
                    waittime = endtime - time.monotonic()
                    if waittime <= 0:
                        break
            self.wait(waittime)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiting processes (first come, first woken)."""
        op = self._notify_op(check_permits(n, "n"))
        return int(_drivers.run(self.ref.lock.backend, op))

    def notify_all(self) -> int:
        """Wake every waiting process."""
        return int(_drivers.run(self.ref.lock.backend, self._notify_op(-1)))

    notifyAll = notify_all  # threading's old alias

    def waiters(self) -> int:
        """How many live processes wait right now (one round trip)."""
        return int(_drivers.run(self.ref.lock.backend, core.waiters(self.ref)))
