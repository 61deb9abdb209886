"""The two drivers that execute core operations: blocking and asyncio.

A core operation (:mod:`procsync.core`) is a generator of steps. The drivers run
each step against the process's :class:`~procsync.backend.client.Backend` and
send back the result; an exception raised while running a step (server error,
KeyboardInterrupt, task cancellation) is thrown into the generator at the step
that was running, so the operation's own clean-up code runs (leaving a queue,
giving back a permit granted meanwhile) before the exception continues.

asyncio: a script call or a pop already sent is never abandoned half-way — a
cancellation waits for its reply (a pending pop is ended at once by pushing WAKE
onto its own inbox), which goes to the operation as usual, and is then thrown in
at the next step; if the operation completed with something to undo (a grant), ``undo`` runs
it back before CancelledError propagates ("cancelled means it did not happen").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from procsync.backend.client import Backend
from procsync.core.steps import WAKE, Call, Op, Pop, SessionGone
from procsync.session import Session, session_for

__all__ = ["arun", "arun_with_session", "run", "run_with_session"]

T = TypeVar("T")

#: How many times an operation is restarted because the session was renewed under it.
SESSION_RETRIES = 3


def run(backend: Backend, op: Op) -> Any:
    """Execute ``op`` with blocking calls; return its result."""
    try:
        step = next(op)
    except StopIteration as stop:
        return stop.value
    while True:
        try:
            if isinstance(step, Call):
                result: Any = backend.call(step.script, step.keys, step.args)
            elif isinstance(step, Pop):
                result = backend.pop(step.key, step.timeout)
            else:  # pragma: no cover - a bug in a core module
                raise TypeError(f"unknown step {step!r}")
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


def run_with_session(backend: Backend, make: Callable[[Session], Op]) -> tuple[Any, Session]:
    """Run ``make(session)`` with the process's session, renewing it if the server
    no longer knows it (the operation changed nothing in that case). Returns the
    result and the session it ran in."""
    for attempt in range(SESSION_RETRIES + 1):
        sess = session_for(backend)
        try:
            return run(backend, make(sess)), sess
        except SessionGone:
            sess._lose("the server no longer knows this session")
            if attempt == SESSION_RETRIES:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def arun(backend: Backend, op: Op, undo: Callable[[Any], Op | None] | None = None) -> Any:
    """Execute ``op`` on the running event loop; return its result."""
    cancelled: BaseException | None = None
    try:
        step = next(op)
    except StopIteration as stop:
        return stop.value
    while True:
        if cancelled is not None:
            # Cancellation arrived during a script call: deliver it at this step.
            exc, cancelled = cancelled, None
            try:
                step = op.throw(exc)
            except StopIteration as stop:
                return stop.value
            continue
        try:
            if isinstance(step, Call):
                fut = asyncio.ensure_future(backend.acall(step.script, step.keys, step.args))
                try:
                    result: Any = await asyncio.shield(fut)
                except asyncio.CancelledError as exc:
                    result = await fut
                    cancelled = exc
            elif isinstance(step, Pop):
                # A pop is not abandoned either: its reply may carry a grant. On
                # cancellation, end it by pushing WAKE onto the same inbox, take
                # whatever it returns, and deliver the cancellation at the next step.
                pop = asyncio.ensure_future(backend.apop(step.key, step.timeout))
                try:
                    result = await asyncio.shield(pop)
                except asyncio.CancelledError as exc:
                    cancelled = exc
                    if not pop.done():
                        await backend.apush(step.key, WAKE)
                    result = await pop
            else:  # pragma: no cover
                raise TypeError(f"unknown step {step!r}")
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
                    await arun(backend, undo_op)
                raise cancelled from None
            return stop.value


async def asession_for(backend: Backend) -> Session:
    """The process's session, opened in a worker thread if needed (never blocking the
    event loop)."""
    from procsync.session import _key, _sessions

    s = _sessions.get(_key(backend))
    if s is not None and s.usable:
        return s
    return await asyncio.to_thread(session_for, backend)


async def arun_with_session(
    backend: Backend,
    make: Callable[[Session], Op],
    undo: Callable[[Session, Any], Op | None] | None = None,
) -> tuple[Any, Session]:
    """Async twin of :func:`run_with_session`."""
    for attempt in range(SESSION_RETRIES + 1):
        sess = await asession_for(backend)
        try:
            u = None if undo is None else (lambda value, s=sess: undo(s, value))
            return await arun(backend, make(sess), u), sess
        except SessionGone:
            sess._lose("the server no longer knows this session")
            if attempt == SESSION_RETRIES:
                raise
    raise AssertionError("unreachable")  # pragma: no cover
