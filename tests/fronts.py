"""Both fronts behind one blocking interface, so each behavioural test is written once.

procsync has a blocking front (``procsync.X``) and an asyncio front
(``procsync.asyncio.X``) over one core. A test asks for a :class:`Front` and calls
``front.Lock(...)``, ``front.Condition(...)``, ``front.Barrier(...)``; it gets an
adapter with threading's signatures whatever the front:

* ``sync``: the adapter calls the procsync object directly, in the caller's thread
  (so an RLock's owner thread is the caller's, as the test expects).
* ``asyncio``: every call is a coroutine run on a :class:`Portal` — one event loop in
  a thread of its own — and waited for. Time limits are asyncio's own
  (``asyncio.timeout``), translated back to threading's return values: an acquire
  or a wait that times out returns False, exactly as a threading caller sees it.

The same module serves child processes (``PYTHONPATH`` = ``tests/``): a child script
does ``F = fronts.make("asyncio")`` and is written once for both fronts too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import procsync
import procsync.asyncio as pa

__all__ = ["FRONTS", "TESTS_DIR", "Front", "Portal", "make"]

T = TypeVar("T")

FRONTS = ("sync", "asyncio")
TESTS_DIR = Path(__file__).resolve().parent

#: Upper bound on one call through the portal: a hung call fails the test instead
#: of hanging it (every wait a test makes has its own, smaller, limit).
PORTAL_CALL_LIMIT = 60.0


class Portal:
    """An event loop running in a daemon thread; ``call`` runs a coroutine on it."""

    def __init__(self, debug: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(debug)
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(ready.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="portal-loop", daemon=True)
        self.thread.start()
        if not ready.wait(10):
            raise RuntimeError("the portal's event loop did not start")
        self._closed = False

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the loop and return its result (or raise)."""

        async def go() -> T:
            return await fn(*args, **kwargs)

        return self.submit(go()).result(PORTAL_CALL_LIMIT)

    def close(self) -> None:
        """Cancel what still runs on the loop (bounded), then stop and close it."""
        if self._closed:
            return
        self._closed = True

        async def drain() -> None:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=15)
            await self.loop.shutdown_asyncgens()

        with contextlib.suppress(Exception):
            self.submit(drain()).result(20)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.thread.is_alive():
            self.loop.close()


async def _within(aw: Awaitable[T], timeout: float | None) -> tuple[bool, T | None]:
    """(True, result) if ``aw`` finished within ``timeout`` seconds, else (False, None)."""
    if timeout is None:
        return True, await aw
    try:
        async with asyncio.timeout(max(timeout, 0.0)):
            return True, await aw
    except TimeoutError:
        return False, None


# -- sync adapters (thin: threading's signatures already) -----------------------------


class SyncLock:
    def __init__(self, raw: procsync.Lock | procsync.RLock) -> None:
        self.raw = raw
        self.name = raw.name

    def acquire(self, timeout: float | None = None) -> bool:
        return self.raw.acquire(True, -1 if timeout is None else timeout)

    def try_acquire(self) -> bool:
        return self.raw.acquire(False)

    def release(self) -> None:
        self.raw.release()

    def locked(self) -> bool:
        return self.raw.locked()

    def statistics(self) -> procsync.LockStatistics:
        return self.raw.statistics()

    @property
    def token(self) -> int | None:
        return self.raw.token

    def __enter__(self) -> SyncLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class SyncSemaphore:
    def __init__(self, raw: procsync.Semaphore) -> None:
        self.raw = raw

    def acquire(self, timeout: float | None = None) -> bool:
        return self.raw.acquire(True, timeout)

    def release(self, n: int = 1) -> None:
        self.raw.release(n)

    def value(self) -> int:
        return self.raw.value

    def statistics(self) -> procsync.SemaphoreStatistics:
        return self.raw.statistics()


class SyncEvent:
    def __init__(self, raw: procsync.Event) -> None:
        self.raw = raw

    def set(self) -> None:
        self.raw.set()

    def clear(self) -> None:
        self.raw.clear()

    def is_set(self) -> bool:
        return self.raw.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.raw.wait(timeout)


class SyncCondition:
    def __init__(self, raw: procsync.Condition) -> None:
        self.raw = raw

    def acquire(self, timeout: float | None = None) -> bool:
        return self.raw.acquire(True, -1 if timeout is None else timeout)

    def release(self) -> None:
        self.raw.release()

    def __enter__(self) -> SyncCondition:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait(self, timeout: float | None = None) -> bool:
        return self.raw.wait(timeout)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        return self.raw.wait_for(predicate, timeout)

    def notify(self, n: int = 1) -> int:
        return self.raw.notify(n)

    def notify_all(self) -> int:
        return self.raw.notify_all()

    def waiters(self) -> int:
        return self.raw.waiters()


class SyncBarrier:
    def __init__(self, raw: procsync.Barrier) -> None:
        self.raw = raw

    def wait(self, timeout: float | None = None) -> int:
        return self.raw.wait(timeout)

    def reset(self) -> None:
        self.raw.reset()

    def abort(self) -> None:
        self.raw.abort()

    @property
    def parties(self) -> int:
        return self.raw.parties

    @property
    def n_waiting(self) -> int:
        return self.raw.n_waiting

    @property
    def broken(self) -> bool:
        return self.raw.broken


# -- asyncio adapters: each call is a coroutine on the portal --------------------------


class AsyncLock:
    def __init__(self, raw: pa.Lock, portal: Portal) -> None:
        self.raw = raw
        self.portal = portal
        self.name = raw.name

    def acquire(self, timeout: float | None = None) -> bool:
        async def go() -> bool:
            done, got = await _within(self.raw.acquire(), timeout)
            return bool(done and got)

        return self.portal.call(go)

    def try_acquire(self) -> bool:
        # asyncio.Lock has no blocking=False: a zero budget is the asyncio idiom.
        return self.acquire(0)

    def release(self) -> None:
        self.portal.call(self.raw.release)

    def locked(self) -> bool:
        return self.portal.call(self.raw.locked)

    def statistics(self) -> procsync.LockStatistics:
        return self.portal.call(self.raw.statistics)

    @property
    def token(self) -> int | None:
        return self.raw.token

    def __enter__(self) -> AsyncLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AsyncSemaphore:
    def __init__(self, raw: pa.Semaphore, portal: Portal) -> None:
        self.raw = raw
        self.portal = portal

    def acquire(self, timeout: float | None = None) -> bool:
        async def go() -> bool:
            done, got = await _within(self.raw.acquire(), timeout)
            return bool(done and got)

        return self.portal.call(go)

    def release(self, n: int = 1) -> None:
        self.portal.call(self.raw.release, n)

    def value(self) -> int:
        return self.portal.call(self.raw.get_value)

    def statistics(self) -> procsync.SemaphoreStatistics:
        return self.portal.call(self.raw.statistics)


class AsyncEvent:
    def __init__(self, raw: pa.Event, portal: Portal) -> None:
        self.raw = raw
        self.portal = portal

    def set(self) -> None:
        self.portal.call(self.raw.set)

    def clear(self) -> None:
        self.portal.call(self.raw.clear)

    def is_set(self) -> bool:
        return self.portal.call(self.raw.is_set)

    def wait(self, timeout: float | None = None) -> bool:
        async def go() -> bool:
            done, _ = await _within(self.raw.wait(), timeout)
            return done

        return self.portal.call(go)


class AsyncCondition:
    def __init__(self, raw: pa.Condition, portal: Portal) -> None:
        self.raw = raw
        self.portal = portal

    def acquire(self, timeout: float | None = None) -> bool:
        async def go() -> bool:
            done, got = await _within(self.raw.acquire(), timeout)
            return bool(done and got)

        return self.portal.call(go)

    def release(self) -> None:
        self.portal.call(self.raw.release)

    def __enter__(self) -> AsyncCondition:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def wait(self, timeout: float | None = None) -> bool:
        # asyncio.Condition.wait re-acquires the lock also when cancelled, so a
        # timed-out wait returns with the lock held, as threading's does.
        async def go() -> bool:
            done, _ = await _within(self.raw.wait(), timeout)
            return done

        return self.portal.call(go)

    def wait_for(self, predicate: Callable[[], T], timeout: float | None = None) -> T:
        async def go() -> T:
            done, got = await _within(self.raw.wait_for(predicate), timeout)
            return got if done else predicate()  # type: ignore[return-value]

        return self.portal.call(go)

    def notify(self, n: int = 1) -> int:
        return self.portal.call(self.raw.notify, n)

    def notify_all(self) -> int:
        return self.portal.call(self.raw.notify_all)

    def waiters(self) -> int:
        return self.portal.call(self.raw.waiters)


class AsyncBarrier:
    def __init__(self, raw: pa.Barrier, portal: Portal) -> None:
        self.raw = raw
        self.portal = portal

    def wait(self, timeout: float | None = None) -> int:
        # asyncio's Barrier.wait takes no timeout; asyncio.timeout around it is the
        # idiom, and procsync breaks the barrier when a wait is interrupted (as a
        # threading timeout does), so the caller sees BrokenBarrierError.
        async def go() -> int:
            try:
                if timeout is None:
                    return await self.raw.wait()
                async with asyncio.timeout(max(timeout, 0.0)):
                    return await self.raw.wait()
            except TimeoutError as exc:
                raise procsync.BrokenBarrierError("the wait timed out") from exc

        return self.portal.call(go)

    def reset(self) -> None:
        self.portal.call(self.raw.reset)

    def abort(self) -> None:
        self.portal.call(self.raw.abort)

    @property
    def parties(self) -> int:
        return self.raw.parties

    @property
    def n_waiting(self) -> int:
        return self.portal.call(self.raw.n_waiting)

    @property
    def broken(self) -> bool:
        return self.portal.call(self.raw.broken)


# -- the fronts -----------------------------------------------------------------------


class Front:
    """Factory of adapted primitives for one front; ``close()`` stops its loop."""

    def __init__(self, name: str) -> None:
        if name not in FRONTS:
            raise ValueError(f"unknown front {name!r}")
        self.name = name
        self._portal: Portal | None = None

    def __repr__(self) -> str:
        return f"<Front {self.name}>"

    @property
    def is_async(self) -> bool:
        return self.name == "asyncio"

    @property
    def portal(self) -> Portal:
        if self._portal is None:
            self._portal = Portal()
        return self._portal

    def close(self) -> None:
        if self._portal is not None:
            self._portal.close()
            self._portal = None

    def Lock(self, name: str | None = None) -> SyncLock | AsyncLock:
        if self.is_async:
            return AsyncLock(pa.Lock(name), self.portal)
        return SyncLock(procsync.Lock(name))

    def Semaphore(
        self, value: int = 1, *, name: str | None = None, bounded: bool = False
    ) -> SyncSemaphore | AsyncSemaphore:
        if self.is_async:
            acls = pa.BoundedSemaphore if bounded else pa.Semaphore
            return AsyncSemaphore(acls(value, name=name), self.portal)
        scls = procsync.BoundedSemaphore if bounded else procsync.Semaphore
        return SyncSemaphore(scls(value, name=name))

    def Event(self, name: str | None = None) -> SyncEvent | AsyncEvent:
        if self.is_async:
            return AsyncEvent(pa.Event(name), self.portal)
        return SyncEvent(procsync.Event(name))

    def Condition(
        self, lock: SyncLock | AsyncLock | None = None, *, name: str | None = None
    ) -> SyncCondition | AsyncCondition:
        raw_lock = None if lock is None else lock.raw
        if self.is_async:
            return AsyncCondition(pa.Condition(raw_lock, name=name), self.portal)  # type: ignore[arg-type]
        return SyncCondition(procsync.Condition(raw_lock, name=name))  # type: ignore[arg-type]

    def Barrier(
        self,
        parties: int,
        action: Callable[[], Any] | None = None,
        timeout: float | None = None,
        *,
        name: str | None = None,
    ) -> SyncBarrier | AsyncBarrier:
        if self.is_async:
            return AsyncBarrier(pa.Barrier(parties, action, timeout, name=name), self.portal)
        return SyncBarrier(procsync.Barrier(parties, action, timeout, name=name))


def make(name: str) -> Front:
    """The front called ``name`` ("sync" or "asyncio")."""
    return Front(name)
