"""Barrier: counterpart of ``threading.Barrier`` for processes on any machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, final

from procsync import _drivers
from procsync._validate import check_permits, check_timeout
from procsync.core import barrier as core
from procsync.core.steps import Op
from procsync.session import Session
from procsync.sync._base import Primitive

__all__ = ["Barrier", "BarrierCommon"]


class BarrierCommon(Primitive):
    """What the sync and asyncio barriers share: shape and the wait operation."""

    __slots__ = ("_action", "_parties", "_ref", "_timeout")

    def __init__(
        self,
        parties: int,
        action: Callable[[], Any] | None = None,
        timeout: float | None = None,
        *,
        name: str | None = None,
        url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        if isinstance(parties, int) and not isinstance(parties, bool) and parties < 1:
            raise ValueError("parties must be >= 1")
        self._parties = check_permits(parties, "parties", minimum=1)
        if action is not None and not callable(action):
            raise TypeError(f"action must be callable, not {type(action).__name__}")
        self._action = action
        self._timeout = check_timeout(timeout, negative="zero")
        super().__init__(name, url, namespace)
        self._ref: core.BarrierRef | None = None

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (self._parties, self._action, self._timeout), {"name": self._name}

    @property
    def ref(self) -> core.BarrierRef:
        r = self._ref
        if r is None:
            r = self._ref = core.BarrierRef(self.backend, self._name, self._parties)
        return r

    def _wait_op(self, timeout: object) -> tuple[Callable[[Session], Op], Any]:
        """Arrive, run the action if last, return the arrival index; and the budget it
        rides out server faults for (its timeout, or forever)."""
        t = check_timeout(timeout, negative="zero") if timeout is not None else self._timeout
        ref = self.ref
        deadline = None if t is None else time.monotonic() + t
        action = self._action

        def op(sess: Session) -> Op:
            status, index = yield from core.wait(
                ref, sess, action is not None, deadline, time.monotonic
            )
            if status == "run" and action is not None:
                try:
                    action()
                except BaseException:
                    yield from core.abort(ref, sess.id, "the action raised")
                    raise
                yield from core.done(ref, sess)
            return int(index)

        return op, (_drivers.FOREVER if deadline is None else deadline)

    @property
    def parties(self) -> int:
        """How many parties must arrive."""
        return self._parties

    def __repr__(self) -> str:
        front = (
            "procsync.asyncio"
            if type(self).__module__.startswith("procsync.asyncio")
            else "procsync"
        )
        return f"<{front}.Barrier {self._name!r} parties={self._parties}{self._where()}>"


@final
class Barrier(BarrierCommon):
    """Counterpart of ``threading.Barrier`` for processes on any machine.

    ``parties`` processes (or threads) call ``wait()``; when the last arrives, all are
    released together, and ``wait()`` returns each one's arrival index (0 to
    parties-1). The barrier can be reused generation after generation.

    ``action``, if given, runs exactly once per generation, in the last party to
    arrive, before any party is released; if it raises, the barrier breaks.

    Breaks (every waiter gets :class:`~procsync.errors.BrokenBarrierError`, a
    ``threading.BrokenBarrierError``): a wait times out, ``abort()``, ``reset()``
    while parties wait, the action raises, or — beyond threading — **a waiting
    party's process dies** (at once on the same host, within the ttl elsewhere).

    Differences from threading: every process opening the same name must give the
    same ``parties`` (another value raises :class:`~procsync.errors.ConflictError`).
    """

    __slots__ = ()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for all parties; return this party's arrival index.

        ``timeout`` defaults to the constructor's; when it expires the barrier breaks.
        """
        make, until = self._wait_op(timeout)
        index, _ = _drivers.run_with_session(self.ref.backend, make, until=until)
        return int(index)

    def reset(self) -> None:
        """Return to the initial state; parties waiting now get BrokenBarrierError."""
        _drivers.run(self.ref.backend, core.reset(self.ref))

    def abort(self) -> None:
        """Break the barrier: waiting and future parties get BrokenBarrierError until
        ``reset()``."""
        _drivers.run(self.ref.backend, core.abort(self.ref, "-", "aborted"))

    @property
    def n_waiting(self) -> int:
        """How many parties wait in the current generation (one round trip)."""
        return int(_drivers.run(self.ref.backend, core.state(self.ref)).n_waiting)

    @property
    def broken(self) -> bool:
        """True if the barrier is broken (one round trip)."""
        return bool(_drivers.run(self.ref.backend, core.state(self.ref)).broken)
