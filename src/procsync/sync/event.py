"""Event: counterpart of ``threading.Event`` for processes on any machine."""

from __future__ import annotations

import time
from typing import final

from procsync import _drivers
from procsync._validate import check_timeout
from procsync.core import event as core
from procsync.sync._base import ANON_KEEP_MS, Primitive

__all__ = ["Event"]


@final
class Event(Primitive):
    """Counterpart of ``threading.Event`` for processes on any machine.

    A flag every process that opens the name shares: ``set()`` raises it and wakes
    every waiter at once (each waiter's wake-up is pushed by the server, nobody
    polls); ``clear()`` lowers it; ``wait()`` blocks while it is down.

    Differences from threading: a set flag outlives the processes that set it (it
    is state, like a file), until ``clear()``; the flag of an anonymous Event
    (``Event()``) is dropped a day after its last ``set()``.
    """

    __slots__ = ("_ref",)

    def __init__(
        self, name: str | None = None, *, url: str | None = None, namespace: str | None = None
    ) -> None:
        super().__init__(name, url, namespace)
        self._ref: core.EventRef | None = None

    @property
    def ref(self) -> core.EventRef:
        r = self._ref
        if r is None:
            r = self._ref = core.EventRef(
                self.backend, self._name, ANON_KEEP_MS if self._anonymous else 0
            )
        return r

    def is_set(self) -> bool:
        """True if the flag is up (one round trip)."""
        flag, _ = _drivers.run(self.ref.backend, core.is_set(self.ref))
        return bool(flag)

    isSet = is_set

    def set(self) -> None:
        """Raise the flag and wake every waiting process."""
        _drivers.run(self.ref.backend, core.set_(self.ref))

    def clear(self) -> None:
        """Lower the flag."""
        _drivers.run(self.ref.backend, core.clear(self.ref))

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is up or ``timeout`` seconds pass.

        Returns True if the flag was set (as threading, even if it was cleared again
        before this returns), False on timeout. A negative timeout does not wait.
        Server faults are ridden out until the timeout (forever without one); if no
        server could be reached to tell, :class:`~procsync.errors.ServerUnavailableError`.
        """
        t = check_timeout(timeout, negative="zero")
        ref = self.ref
        deadline = None if t is None else time.monotonic() + t
        got, _ = _drivers.run_with_session(
            ref.backend,
            lambda s: core.wait(ref, s, deadline, time.monotonic),
            until=_drivers.FOREVER if deadline is None else deadline,
        )
        return bool(got)

    def waiting(self) -> int:
        """How many waiters are registered (one round trip)."""
        _, n = _drivers.run(self.ref.backend, core.is_set(self.ref))
        return int(n)

    def __repr__(self) -> str:
        return f"<procsync.Event {self._name!r}{self._where()} at {id(self):#x}>"
