"""The two drivers that execute core operations, blocking and asyncio, and the one
place where recovery from server and network faults lives.

A core operation (:mod:`procsync.core`) is a generator of steps. The drivers run
each step against the process's :class:`~procsync.backend.client.Backend` and
send back the result; an exception raised while running a step (server error,
KeyboardInterrupt, task cancellation) is thrown into the generator at the step
that was running, so the operation's own clean-up code runs (leaving a queue,
giving back a permit granted meanwhile) before the exception continues.

Faults (the rules of :mod:`procsync.core.steps`, applied here once for every
primitive, the registry's session calls and both fronts):

* A failed call (connection refused, reset before or after the write, a timeout, a
  garbled reply) is sent again with jittered backoff until the operation's *budget*
  ends: its own deadline for a wait with a timeout, never for a wait without one (it
  rides out any outage), ``PROCSYNC_SOCKET_TIMEOUT`` for everything else. Every call
  is idempotent, so a call that ran before its reply was lost answers the same again.
  Each call's socket timeout is what is left of the budget, so a frozen server never
  makes an operation overrun its deadline by more than a few tens of milliseconds.
* A failed pop is not resent: the driver backs off (within the pop's own time) and
  answers :data:`~procsync.core.steps.POP_FAILED`, and the operation looks again.
* Failures and recoveries move the session between ``connected``, ``suspended`` and
  ``reconnected`` (:class:`~procsync.session.SessionState`); once the session is
  lost, :class:`~procsync.core.steps.SessionGone` is thrown in at the next step and
  :func:`run_with_session` starts the operation again in a new session (within the
  budget), as a waiter whose queue place the server dropped joins again.
* A :class:`~procsync.core.steps.Cleanup` is tried at once (a short budget) and,
  if the server cannot be reached, kept by the session, which runs it when the
  server answers again (:meth:`~procsync.session.Session.settle`).

asyncio: a script call or a pop already sent is never abandoned half-way — a
cancellation waits for its reply (a pending pop is ended at once by pushing WAKE
onto its own inbox), which goes to the operation as usual, and is then thrown in
at the next step; if the operation completed with something to undo (a grant), ``undo`` runs
it back before CancelledError propagates ("cancelled means it did not happen").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from procsync.backend import reads
from procsync.backend.client import MIN_CALL_TIMEOUT, POP_GRACE, Backend
from procsync.core.steps import (
    DEFERRED,
    POP_FAILED,
    WAKE,
    Call,
    Cleanup,
    Op,
    Pop,
    Read,
    Scan,
    SessionGone,
    Step,
    XRead,
)
from procsync.errors import ProtocolError, ServerError, ServerUnavailableError
from procsync.session import Session, session_for, usable_session

__all__ = [
    "DEFAULT",
    "FOREVER",
    "RELEASE_BUDGET",
    "RETRYABLE",
    "Budget",
    "arun",
    "arun_with_session",
    "deadline_of",
    "run",
    "run_with_session",
]

#: ``until=FOREVER``: retry for as long as it takes (a wait without a timeout).
FOREVER: Final = None


class _Default:
    """``until=DEFAULT``: ``PROCSYNC_SOCKET_TIMEOUT`` from the start of the operation."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Final = _Default()

#: How long a clean-up is tried at once before the session keeps it for later.
CLEANUP_BUDGET = 1.0
#: How long a release is tried before the session keeps it for later (the hold is
#: given up at once; the server hears of it when it answers again).
RELEASE_BUDGET = 2.0
#: Backoff between tries: the first wait, the longest, and how much of each is random.
BACKOFF_FIRST = 0.02
BACKOFF_MAX = 1.0
#: The grace a pop that ends at the operation's own deadline gets (see POP_GRACE).
DEADLINE_GRACE = 0.05
#: How long a cancelled asyncio task still waits for the reply of a call or pop in
#: flight (it may carry a grant to give back) before it stops waiting for a server
#: that does not answer; the grant, if any, is then given back by the kept clean-up.
CANCEL_GRACE = 0.1

#: Failures of a call that sending it again may mend (the call is idempotent).
RETRYABLE = (ServerUnavailableError, ProtocolError)


def deadline_of(until: Any) -> float | None:
    """The monotonic deadline of a budget, None for FOREVER and DEFAULT (no deadline
    of the caller's own)."""
    return None if isinstance(until, _Default) else until


def release_until() -> float:
    """The budget of a release: ``RELEASE_BUDGET`` from now (within the socket timeout
    the calls themselves get)."""
    return time.monotonic() + RELEASE_BUDGET


class Budget:
    """How long one operation may go on trying, and what its failures do to the
    session. Written once; both drivers ask it the same questions."""

    __slots__ = ("failures", "session", "unanswered", "until")

    def __init__(self, backend: Backend, until: Any, session: Session | None) -> None:
        if isinstance(until, _Default):
            until = time.monotonic() + backend.socket_timeout
        self.until: float | None = until
        self.session = session
        self.failures = 0
        #: A cancelled task stopped waiting for a server that did not answer: its
        #: clean-up is kept for later at once, not tried against that server now.
        self.unanswered = False

    def call_timeout(self) -> float | None:
        """The socket timeout for the next call: what is left of the budget (None:
        the client's own)."""
        if self.until is None:
            return None
        return max(MIN_CALL_TIMEOUT, self.until - time.monotonic())

    def pop_args(self, timeout: float) -> tuple[float, float]:
        """(timeout, grace) of a pop: no longer than the session can be trusted, so a
        lost session is noticed; little grace when it ends at the deadline."""
        sess = self.session
        if sess is not None:
            timeout = min(timeout, max(0.001, sess.trusted_for()))
        end = time.monotonic() + timeout
        if self.until is None:
            return timeout, POP_GRACE
        # Never past the deadline by more than DEADLINE_GRACE.
        return timeout, max(DEADLINE_GRACE, min(POP_GRACE, self.until - end))

    def check_session(self) -> None:
        """Throw SessionGone in once the caller's session is lost."""
        sess = self.session
        if sess is not None and sess.lost:
            raise SessionGone()

    def failed(self, exc: BaseException, within: float | None = None) -> float:
        """A call (or pop) failed with ``exc``: how long to wait before trying again.

        Re-raises ``exc`` if it is not worth retrying or the budget ends first;
        ``within`` caps the wait (a pop's own time)."""
        if not isinstance(exc, RETRYABLE):
            raise exc
        if self.session is not None and isinstance(exc, ServerUnavailableError):
            self.session.suspend(str(exc))
        self.failures += 1
        delay: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2.0 ** min(self.failures - 1, 16))
        delay *= random.uniform(0.5, 1.0)
        if within is not None:
            return max(0.0, min(delay, within))
        if self.until is not None and time.monotonic() + delay >= self.until:
            raise exc
        return delay

    def answered(self) -> None:
        """The server answered: a suspended session is reconnected."""
        if self.failures:
            self.failures = 0
            if self.session is not None:
                self.session.reconnected()


# -- blocking -------------------------------------------------------------------------


def run(backend: Backend, op: Op, *, until: Any = DEFAULT, session: Session | None = None) -> Any:
    """Execute ``op`` with blocking calls; return its result.

    ``until``: the budget (:data:`DEFAULT`, :data:`FOREVER` or a monotonic deadline);
    ``session``: the session the operation runs in, whose state its faults move."""
    budget = Budget(backend, until, session)
    try:
        step = next(op)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            result = _step(backend, step, budget)
        except BaseException as exc:
            try:
                step = op.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            step = op.send(result)
        except StopIteration as stop:
            return stop.value


def _step(backend: Backend, step: Step, budget: Budget) -> Any:
    if isinstance(step, Call):
        while True:
            budget.check_session()
            try:
                reply = backend.call(step.script, step.keys, step.args, budget.call_timeout())
            except BaseException as exc:
                if step.once:
                    budget.failed(exc, within=0.0)  # (the session hears of it)
                    raise
                time.sleep(budget.failed(exc))
                continue
            budget.answered()
            return reply
    if isinstance(step, Pop):
        budget.check_session()
        timeout, grace = budget.pop_args(step.timeout)
        started = time.monotonic()
        try:
            got = backend.pop(step.key, timeout, grace)
        except BaseException as exc:
            time.sleep(budget.failed(exc, within=started + timeout - time.monotonic()))
            return POP_FAILED
        budget.answered()
        return got
    if isinstance(step, Cleanup):
        return _cleanup(backend, step, budget)
    if isinstance(step, (Read, XRead, Scan)):
        while True:
            try:
                got = reads.read(backend, step)
            except BaseException as exc:
                time.sleep(budget.failed(exc))
                continue
            budget.answered()
            return got
    raise TypeError(f"unknown step {step!r}")  # pragma: no cover - a bug in a core module


def _cleanup_until(budget: Budget) -> float:
    """Until when a clean-up is tried now: CLEANUP_BUDGET, within what is left of the
    operation's own deadline (never past it by more than one short call)."""
    now = time.monotonic()
    until = now + CLEANUP_BUDGET
    if budget.until is not None:
        until = min(until, max(budget.until, now + MIN_CALL_TIMEOUT))
    return until


def _cleanup(backend: Backend, step: Cleanup, budget: Budget) -> Any:
    sess = budget.session
    if sess is not None and not sess.usable:
        return DEFERRED  # the session's end took everything it held or waited for
    if step.now:
        try:
            return run(backend, step.make(), until=_cleanup_until(budget), session=sess)
        except RETRYABLE:
            pass
    if sess is not None:
        sess.defer(step.make, step.what)
    return DEFERRED


def _never_reached(backend: Backend, exc: ServerError) -> ServerError:
    """A server this process never reached is a wrong URL or a server not started,
    not an outage to ride out: the failure is raised at once (see Budget.failed)."""
    if not backend.reached:
        raise exc
    return exc


def _session_gone(backend: Backend, sess: Session, budget: Budget) -> None:
    """The operation's session was lost under it: forget the session; the operation
    starts again in a new one unless its budget is spent."""
    sess.lose("the server no longer knows this session")
    if budget.until is not None and time.monotonic() >= budget.until:
        raise ServerUnavailableError(
            f"the session on {backend.safe_url} was lost and no new one could "
            "finish the operation in time"
        ) from None


def run_with_session(
    backend: Backend, make: Callable[[Session], Op], *, until: Any = DEFAULT
) -> tuple[Any, Session]:
    """Run ``make(session)`` in the process's session, opened (or opened anew) as
    needed. If the session is lost under the operation -- the server no longer knows
    it, or its client-side deadline passed -- the operation starts again in a new one,
    as long as the budget lasts. Returns the result and the session it ran in."""
    budget = Budget(backend, until, None)
    while True:
        try:
            sess = session_for(backend, budget.until)
        except ServerError as exc:
            time.sleep(budget.failed(_never_reached(backend, exc)))
            continue
        try:
            return run(backend, make(sess), until=budget.until, session=sess), sess
        except SessionGone:
            _session_gone(backend, sess, budget)


# -- asyncio --------------------------------------------------------------------------


async def arun(
    backend: Backend,
    op: Op,
    undo: Callable[[Any], Op | None] | None = None,
    *,
    until: Any = DEFAULT,
    session: Session | None = None,
) -> Any:
    """Execute ``op`` on the running event loop; return its result (the budget and
    session as for :func:`run`)."""
    budget = Budget(backend, until, session)
    cancelled: BaseException | None = None
    try:
        step = next(op)
    except StopIteration as stop:
        return stop.value
    while True:
        if cancelled is not None:
            # Cancellation arrived during a step: deliver it at this one.
            exc, cancelled = cancelled, None
            try:
                step = op.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            result, cancelled = await _astep(backend, step, budget)
        except BaseException as exc:
            try:
                step = op.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            step = op.send(result)
        except StopIteration as stop:
            if cancelled is not None:
                undo_op = undo(stop.value) if undo is not None else None
                if undo_op is not None:
                    await arun(backend, undo_op, session=session)
                raise cancelled from None
            return stop.value


async def _shielded(
    make: Callable[[], Awaitable[Any]], budget: Budget
) -> tuple[Any, BaseException | None]:
    """Await ``make()`` even if the task is cancelled meanwhile, for up to
    ``CANCEL_GRACE`` more: returns (result, the cancellation or None). A server that
    does not answer by then is not waited for (the exchange is abandoned, its
    connection closed, and ``budget.unanswered`` set: the operation's clean-up is
    kept for later at once). Its own failure is raised, unless a cancellation came
    first: then that is what the caller hears."""
    fut = asyncio.ensure_future(make())
    try:
        return await asyncio.shield(fut), None
    except asyncio.CancelledError as exc:
        done, _ = await asyncio.wait({fut}, timeout=CANCEL_GRACE)
        if not done:
            fut.cancel()
            budget.unanswered = True
            raise exc from None
        try:
            return fut.result(), exc
        except Exception:
            raise exc from None


async def _astep(backend: Backend, step: Step, budget: Budget) -> tuple[Any, BaseException | None]:
    """Async twin of :func:`_step`: (result, a cancellation that came meanwhile)."""
    if isinstance(step, Call):
        while True:
            budget.check_session()
            try:
                reply, during = await _shielded(
                    lambda: backend.acall(step.script, step.keys, step.args, budget.call_timeout()),
                    budget,
                )
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                if step.once:
                    budget.failed(exc, within=0.0)
                    raise
                await asyncio.sleep(budget.failed(exc))
                continue
            budget.answered()
            return reply, during
    if isinstance(step, Pop):
        budget.check_session()
        timeout, grace = budget.pop_args(step.timeout)
        started = time.monotonic()
        # A pop is not abandoned either: its reply may carry a grant. On cancellation,
        # end it by pushing WAKE onto the same inbox, take whatever it returns, and
        # deliver the cancellation at the next step.
        pop = asyncio.ensure_future(backend.apop(step.key, timeout, grace))
        cancelled: BaseException | None = None
        try:
            try:
                got = await asyncio.shield(pop)
            except asyncio.CancelledError as exc:
                cancelled = exc
                if not pop.done():
                    # (unreachable: the pop ends by its own timeout, or fails)
                    with contextlib.suppress(ServerError, asyncio.TimeoutError):
                        await asyncio.wait_for(backend.apush(step.key, WAKE), CANCEL_GRACE)
                    done, _ = await asyncio.wait({pop}, timeout=CANCEL_GRACE)
                    if not done:  # the server does not answer: not waited for
                        pop.cancel()
                        budget.unanswered = True
                        return POP_FAILED, cancelled
                got = await pop
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            if cancelled is not None:
                return POP_FAILED, cancelled
            await asyncio.sleep(budget.failed(exc, within=started + timeout - time.monotonic()))
            return POP_FAILED, None
        budget.answered()
        return got, cancelled
    if isinstance(step, Cleanup):
        return await _acleanup(backend, step, budget), None
    if isinstance(step, (Read, XRead, Scan)):
        while True:
            try:
                got = await reads.aread(backend, step)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await asyncio.sleep(budget.failed(exc))
                continue
            budget.answered()
            return got, None
    raise TypeError(f"unknown step {step!r}")  # pragma: no cover - a bug in a core module


async def _acleanup(backend: Backend, step: Cleanup, budget: Budget) -> Any:
    sess = budget.session
    if sess is not None and not sess.usable:
        return DEFERRED
    if step.now and not budget.unanswered:
        try:
            return await arun(backend, step.make(), until=_cleanup_until(budget), session=sess)
        except RETRYABLE:
            pass
    if sess is not None:
        sess.defer(step.make, step.what)
    return DEFERRED


async def asession_for(backend: Backend, until: float | None = None) -> Session:
    """The process's session, opened in a worker thread if needed (never blocking the
    event loop)."""
    s = usable_session(backend)
    if s is not None:
        return s
    return await asyncio.to_thread(session_for, backend, until)


async def arun_with_session(
    backend: Backend,
    make: Callable[[Session], Op],
    undo: Callable[[Session, Any], Op | None] | None = None,
    *,
    until: Any = DEFAULT,
) -> tuple[Any, Session]:
    """Async twin of :func:`run_with_session`."""
    budget = Budget(backend, until, None)
    while True:
        try:
            sess = await asession_for(backend, budget.until)
        except ServerError as exc:
            await asyncio.sleep(budget.failed(_never_reached(backend, exc)))
            continue
        try:
            u = None if undo is None else (lambda value, s=sess: undo(s, value))
            return await arun(backend, make(sess), u, until=budget.until, session=sess), sess
        except SessionGone:
            _session_gone(backend, sess, budget)
