"""procsync for asyncio: Lock, Semaphore, BoundedSemaphore, Event, Condition, Barrier.

Counterparts of :mod:`asyncio`'s primitives for tasks in any process on any machine.
They are the same primitives as the blocking ones of the same name — an
``await procsync.asyncio.Lock("x").acquire()`` here excludes a
``procsync.Lock("x").acquire()`` there — and run the same core operations
(:mod:`procsync.core`), driven by the asyncio driver. No call blocks the event loop:
server calls use redis-py's asyncio client; opening a session or starting the
embedded server runs in a worker thread.

Differences from asyncio, all because each of these is a server round trip:

* ``release()``, ``locked()``, ``Event.set()/clear()/is_set()``,
  ``Condition.notify()/notify_all()`` and ``Barrier.n_waiting()/broken()`` are
  coroutines: ``await`` them.
* Cancellation means it did not happen: a task cancelled while waiting leaves no
  trace, and one cancelled after the server granted it gives the grant back before
  ``CancelledError`` propagates.
* There is no RLock, as in asyncio itself (reentrancy per task is rarely what a
  cross-process lock wants); use :class:`procsync.RLock` from threads.
* Time limits: use ``asyncio.timeout()`` / ``asyncio.wait_for()``, as with asyncio.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TypeVar, final

from procsync import _drivers
from procsync._validate import check_permits
from procsync.core import barrier as core_barrier
from procsync.core import condition as core_cond
from procsync.core import event as core_event
from procsync.core import permits
from procsync.core.steps import Op, SessionGone
from procsync.session import usable_session
from procsync.sync._base import ANON_KEEP_MS, Holder, Primitive
from procsync.sync.barrier import BarrierCommon
from procsync.sync.condition import ConditionCommon
from procsync.sync.lock import LockCommon, LockStatistics
from procsync.sync.semaphore import SemaphoreCommon, SemaphoreStatistics

__all__ = ["Barrier", "BoundedSemaphore", "Condition", "Event", "Lock", "Semaphore"]

T = TypeVar("T")


async def _aacquire(prim: LockCommon | SemaphoreCommon) -> bool:
    """The acquire of both asyncio permit kinds: wait without a timeout (it rides out
    any outage), after the session's unconfirmed clean-ups (a release of this very
    lock must reach the server before this process queues for it again)."""
    b = await prim._abackend()
    sess = usable_session(b)
    if sess is not None and sess.pending:
        await sess.asettle()
    ok, _ = await _drivers.arun_with_session(
        b, prim._acquire_op(True, None), prim._undo_acquire, until=_drivers.FOREVER
    )
    return bool(ok)


async def _arelease(prim: LockCommon | SemaphoreCommon, op: Op) -> None:
    """Run a release operation with a release's budget, in its hold's session."""
    b = await prim._abackend()
    await _drivers.arun(b, op, until=_drivers.release_until(), session=prim._release_session())


@final
class Lock(LockCommon):
    """Counterpart of ``asyncio.Lock`` for tasks in any process on any machine.

    The same lock as :class:`procsync.Lock` of the same name: waiters of both fronts
    queue together, first come first served; every grant carries a fencing
    :attr:`token`. See the module docstring for the differences from asyncio.
    """

    __slots__ = ()
    _kind = "lock"

    async def acquire(self) -> bool:
        """Wait for the lock and take it (riding out server outages). Returns True."""
        return await _aacquire(self)

    async def release(self) -> None:
        """Release the lock; the next waiter (any process, any front) holds it."""
        await _arelease(self, self._release_op())

    async def locked(self) -> bool:
        """True if some process holds the lock."""
        return (await self.statistics()).locked

    async def owner(self) -> Holder | None:
        """The holding process, or None."""
        return (await self.statistics()).owner

    async def statistics(self) -> LockStatistics:
        """A snapshot of the lock on the server."""
        b = await self._abackend()
        return self._statistics(await _drivers.arun(b, permits.state(self.ref)))

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    def __repr__(self) -> str:
        state = "held here" if self._hold.count else "not held here"
        return f"<procsync.asyncio.Lock {self._name!r} {state}{self._where()} at {id(self):#x}>"


class Semaphore(SemaphoreCommon):
    """Counterpart of ``asyncio.Semaphore`` for tasks in any process on any machine.

    The same semaphore as :class:`procsync.Semaphore` of the same name and value.
    Permits are owned by the process: a dead holder's permits come back.
    """

    __slots__ = ()

    async def acquire(self) -> bool:
        """Wait for a permit and take it (riding out server outages). Returns True."""
        return await _aacquire(self)

    async def release(self, n: int = 1) -> None:
        """Give back ``n`` permits."""
        await _arelease(self, self._release_op(n))

    async def locked(self) -> bool:
        """True if no permit is free."""
        return (await self.statistics()).value == 0

    async def get_value(self) -> int:
        """Free permits right now."""
        return (await self.statistics()).value

    async def statistics(self) -> SemaphoreStatistics:
        """A snapshot of the semaphore on the server."""
        b = await self._abackend()
        return self._statistics(await _drivers.arun(b, permits.state(self.ref)))

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


@final
class BoundedSemaphore(Semaphore):
    """Counterpart of ``asyncio.BoundedSemaphore``: releasing above the initial value
    raises :class:`~procsync.errors.OverReleaseError` (a ValueError)."""

    __slots__ = ()
    _kind = "bsem"


@final
class Event(Primitive):
    """Counterpart of ``asyncio.Event`` for tasks in any process on any machine.

    The same event as :class:`procsync.Event` of the same name.
    """

    __slots__ = ("_ref",)

    def __init__(
        self, name: str | None = None, *, url: str | None = None, namespace: str | None = None
    ) -> None:
        super().__init__(name, url, namespace)
        self._ref: core_event.EventRef | None = None

    async def _aref(self) -> core_event.EventRef:
        r = self._ref
        if r is None:
            b = await self._abackend()
            r = self._ref = core_event.EventRef(
                b, self._name, ANON_KEEP_MS if self._anonymous else 0
            )
        return r

    async def wait(self) -> bool:
        """Wait until the flag is set (riding out server outages). Returns True."""
        ref = await self._aref()
        got, _ = await _drivers.arun_with_session(
            ref.backend,
            lambda s: core_event.wait(ref, s, None, time.monotonic),
            until=_drivers.FOREVER,
        )
        return bool(got)

    async def set(self) -> None:
        """Raise the flag and wake every waiter, in every process."""
        ref = await self._aref()
        await _drivers.arun(ref.backend, core_event.set_(ref))

    async def clear(self) -> None:
        """Lower the flag."""
        ref = await self._aref()
        await _drivers.arun(ref.backend, core_event.clear(ref))

    async def is_set(self) -> bool:
        """True if the flag is up."""
        ref = await self._aref()
        flag, _ = await _drivers.arun(ref.backend, core_event.is_set(ref))
        return bool(flag)

    def __repr__(self) -> str:
        return f"<procsync.asyncio.Event {self._name!r}{self._where()} at {id(self):#x}>"


@final
class Condition(ConditionCommon):
    """Counterpart of ``asyncio.Condition`` for tasks in any process on any machine.

    ``Condition(lock=None, *, name=None)``: with no lock, a named condition uses the
    lock ``"<name>:lock"`` — the same server lock as a blocking
    :class:`procsync.Condition` of that name, so producers and consumers may use
    either front.
    """

    __slots__ = ()

    def __init__(
        self,
        lock: Lock | None = None,
        *,
        name: str | None = None,
        url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if lock is not None and not isinstance(lock, Lock):
            raise TypeError(
                f"an asyncio Condition needs a procsync.asyncio.Lock, not {type(lock).__name__}"
            )
        if lock is not None:
            url = url if url is not None else lock._url
            namespace = namespace if namespace is not None else lock._namespace
        super().__init__(
            lock, lambda n: Lock(n, url=url, namespace=namespace), name, url, namespace
        )

    @property
    def _alock(self) -> Lock:
        lock = self._lock
        if not isinstance(lock, Lock):  # pragma: no cover - the constructor guarantees it
            raise TypeError("internal: the lock of an asyncio Condition must be asyncio")
        return lock

    async def acquire(self) -> bool:
        """Acquire the underlying lock."""
        return await self._alock.acquire()

    async def release(self) -> None:
        """Release the underlying lock."""
        await self._alock.release()

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        await self.release()

    async def wait(self) -> bool:
        """Release the lock, wait for a notify, re-acquire the lock (also when
        cancelled, as asyncio). Returns True (also for a spurious wake-up: see
        :meth:`procsync.Condition.wait`)."""
        b = await self._alock._abackend()
        w = self._begin_wait(None)
        try:
            if w.session is not None:
                with contextlib.suppress(SessionGone):  # the session ended: a spurious wake-up
                    await _drivers.arun(
                        b, self._wait_core(w), until=_drivers.FOREVER, session=w.session
                    )
        finally:
            await _aacquire(self._alock)
            self._end_wait(w)
        return True

    async def wait_for(self, predicate: Callable[[], T]) -> T:
        """Wait until ``predicate()`` is true; return its value."""
        result = predicate()
        while not result:
            await self.wait()
            result = predicate()
        return result

    async def notify(self, n: int = 1) -> int:
        """Wake up to ``n`` waiters (first come, first woken); returns how many."""
        op = self._notify_op(check_permits(n, "n"))
        return int(await _drivers.arun(await self._alock._abackend(), op))

    async def notify_all(self) -> int:
        """Wake every waiter."""
        return int(await _drivers.arun(await self._alock._abackend(), self._notify_op(-1)))

    async def waiters(self) -> int:
        """How many live waiters there are."""
        b = await self._alock._abackend()
        return int(await _drivers.arun(b, core_cond.waiters(self.ref)))


@final
class Barrier(BarrierCommon):
    """Counterpart of ``asyncio.Barrier`` for tasks in any process on any machine.

    The same barrier as :class:`procsync.Barrier` of the same name and parties. It
    breaks when a waiting party's process dies. ``action`` and ``timeout`` are
    accepted as in :class:`procsync.Barrier` (asyncio's Barrier has neither).

    Difference from asyncio: a cancelled ``wait()`` breaks the barrier for every
    party (threading's rule for an interrupted wait), where asyncio's Barrier lets
    the cancelled task leave: across processes, the others cannot tell a task that
    left from one that died.
    """

    __slots__ = ()

    async def wait(self) -> int:
        """Wait for all parties; return this party's arrival index."""
        b = await self._abackend()
        make, until = self._wait_op(None)
        index, _ = await _drivers.arun_with_session(b, make, until=until)
        return int(index)

    async def reset(self) -> None:
        """Return to the initial state; waiting parties get BrokenBarrierError."""
        b = await self._abackend()
        await _drivers.arun(b, core_barrier.reset(self.ref))

    async def abort(self) -> None:
        """Break the barrier until ``reset()``."""
        b = await self._abackend()
        await _drivers.arun(b, core_barrier.abort(self.ref, "-", "aborted"))

    async def n_waiting(self) -> int:
        """How many parties wait in the current generation."""
        b = await self._abackend()
        return int((await _drivers.arun(b, core_barrier.state(self.ref))).n_waiting)

    async def broken(self) -> bool:
        """True if the barrier is broken."""
        b = await self._abackend()
        return bool((await _drivers.arun(b, core_barrier.state(self.ref))).broken)
