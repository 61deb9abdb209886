"""Condition: counterpart of ``threading.Condition`` for processes on any machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, final

from procsync import _drivers
from procsync._validate import check_permits, check_timeout
from procsync.core import condition as core
from procsync.errors import NotHeldError
from procsync.session import _key, _sessions
from procsync.sync._base import Primitive
from procsync.sync.lock import Lock, RLock

__all__ = ["Condition"]

T = TypeVar("T")


@final
class Condition(Primitive):
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
    a RuntimeError as in threading.
    """

    __slots__ = ("_lock", "_ref")

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
        super().__init__(name, url, namespace)
        self._lock: Lock | RLock = (
            lock if lock is not None else RLock(f"{self._name}:lock", url=url, namespace=namespace)
        )
        self._ref: core.CondRef | None = None

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._lock,), {"name": self._name}

    @property
    def ref(self) -> core.CondRef:
        r = self._ref
        if r is None:
            r = self._ref = core.CondRef(self._name, self._lock.ref)
        return r

    # -- the lock -------------------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        """Acquire the underlying lock."""
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        """Release the underlying lock."""
        self._lock.release()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)

    def _is_owned(self) -> bool:
        lock = self._lock
        if isinstance(lock, RLock):
            return lock._is_owned()
        return lock._hold.count > 0

    # -- waiting --------------------------------------------------------------------

    def wait(self, timeout: float | None = None) -> bool:
        """Release the lock, wait for a notify or ``timeout`` seconds, re-acquire.

        Returns False if the timeout expired, True otherwise (as threading).
        """
        if not self._is_owned():
            raise NotHeldError("cannot wait on un-acquired lock")
        t = check_timeout(timeout, negative="zero")
        ref = self.ref
        lock = self._lock
        deadline = None if t is None else time.monotonic() + t
        saved = (lock._depth, lock._owner_thread) if isinstance(lock, RLock) else None
        # The script releases the server-side hold; forget it locally first.
        lock._hold.clear()
        if isinstance(lock, RLock):
            lock._depth, lock._owner_thread = 0, None
        try:
            notified, _ = _drivers.run_with_session(
                ref.lock.backend, lambda s: core.wait(ref, s, deadline, time.monotonic)
            )
        finally:
            lock._server_acquire(True, None)
            if isinstance(lock, RLock) and saved is not None:
                lock._depth, lock._owner_thread = saved
        return bool(notified)

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
        """Wake up to ``n`` waiting processes (first come, first woken). Returns how
        many were woken (threading returns None; the count is extra)."""
        if not self._is_owned():
            raise NotHeldError("cannot notify on un-acquired lock")
        n = check_permits(n, "n")
        ref = self.ref
        sess = _sessions.get(_key(ref.lock.backend))
        return int(_drivers.run(ref.lock.backend, core.notify(ref, sess, n)))

    def notify_all(self) -> int:
        """Wake every waiting process."""
        if not self._is_owned():
            raise NotHeldError("cannot notify on un-acquired lock")
        ref = self.ref
        sess = _sessions.get(_key(ref.lock.backend))
        return int(_drivers.run(ref.lock.backend, core.notify(ref, sess, -1)))

    notifyAll = notify_all

    def waiters(self) -> int:
        """How many live processes wait right now (one round trip)."""
        return int(_drivers.run(self.ref.lock.backend, core.waiters(self.ref)))

    def __repr__(self) -> str:
        return f"<procsync.Condition {self._name!r} lock={self._lock!r}>"
