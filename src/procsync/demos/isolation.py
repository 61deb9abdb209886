"""Data isolation, and the way out (进程之间的数据隔离问题): the notes' first program, twice.

The notes start a hundred children that each run ``n = n - 1`` on a global ``n = 100``
and have the parent print ``n``: it prints 100. Each child decremented its *own copy*
of ``n`` (after ``fork`` a child's memory is a copy of its parent's; after ``spawn``
it is a fresh interpreter), so the parent's ``n`` never moved. Processes do not share
memory.

This demo runs that program as written (the *multiprocessing* leg), and then the way
out (the *procsync* leg): ``n`` is a :class:`procsync.Value` kept in the server, the
one ``n`` of every process, and each child decrements it under the value's lock::

    multiprocessing                           procsync
    n = 100                                   n = Value("i", 100, name=...)
    def func():                               def func(n):
        global n                                  with n.get_lock():
        n = n - 1                                     n.value = n.value - 1
    print(n)            # 100                 print(n.value)      # 0

The checker (:func:`check`) demands that the multiprocessing parent still sees its
starting value (nothing leaked between address spaces) and that the procsync parent
sees exactly ``start - children`` (no decrement lost), with every child exiting 0.

Children are started with ``fork`` by default, as the notes' programs are on Linux
(100 forks take milliseconds; 100 fresh interpreters take many seconds). The parent
touches the server only after its children are gone, so it forks without procsync's
threads running. The value lives under a per-run name and is deleted at the end.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, final

from procsync.backend.client import resolve_url
from procsync.errors import ProcsyncError
from procsync.sync import Value

__all__ = ["START_METHODS", "IsolationOptions", "IsolationResult", "Leg", "check", "run"]

#: Start methods a leg may use.
START_METHODS: Final = ("fork", "spawn", "forkserver")
#: How long one child may take to exit after the others, at most.
JOIN_SLICE: Final = 0.5

#: The notes' global. Each child of the multiprocessing leg decrements *its* copy.
n = 100


def _mp_func() -> int:
    """The notes' ``func``: decrement the global (this process's own copy of it)."""
    global n
    n = n - 1
    return 6666


def _procsync_func(shared: Value) -> int:
    """The way out: decrement the one ``n`` in the server, under its lock."""
    with shared.get_lock():
        shared.value = shared.value - 1
    return 6666


@final
@dataclass(frozen=True, slots=True)
class IsolationOptions:
    """What to run."""

    children: int = 100
    """Children per leg; ``n`` starts at this number, as in the notes (100)."""
    start_method: str = "fork"
    url: str | None = None
    """Server of the procsync leg (default: ``PROCSYNC_URL``, else the embedded one)."""
    timeout: float = 120.0
    """Give up on a leg (and fail) after this many seconds."""

    def __post_init__(self) -> None:
        if self.children < 1:
            raise ValueError(f"children must be at least 1, got {self.children}")
        if self.start_method not in START_METHODS:
            raise ValueError(f"start_method must be one of {START_METHODS}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


@final
@dataclass(frozen=True, slots=True)
class Leg:
    """One run of the program: what the parent printed at the end."""

    library: str
    """``multiprocessing`` or ``procsync``."""
    start: int
    """``n`` before the children ran."""
    printed: int | None
    """What the parent printed (None if the leg did not finish)."""
    expected: int
    """What the lesson says it prints."""
    children: int
    failed_children: int
    """Children that exited with a non-zero status (or never exited)."""
    duration_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "library": self.library,
            "start": self.start,
            "printed": self.printed,
            "expected": self.expected,
            "children": self.children,
            "failed_children": self.failed_children,
            "duration_s": round(self.duration_s, 4),
        }


@final
@dataclass(frozen=True, slots=True)
class IsolationResult:
    """Both legs and the checker's verdict. ``ok`` iff ``failures`` is empty."""

    multiprocessing: Leg
    procsync: Leg
    start_method: str
    url: str
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "children": self.multiprocessing.children,
            "start": self.multiprocessing.start,
            "multiprocessing_printed": self.multiprocessing.printed,
            "procsync_printed": self.procsync.printed,
            "lost_updates": (
                None
                if self.procsync.printed is None
                else self.procsync.printed - self.procsync.expected
            ),
            "start_method": self.start_method,
            "url": self.url,
            "legs": [self.multiprocessing.as_dict(), self.procsync.as_dict()],
            "failures": list(self.failures),
        }


def check(mp: Leg, ps: Leg) -> tuple[str, ...]:
    """What is wrong with the two legs (empty: the lesson holds).

    The multiprocessing parent must still print its starting value; the procsync
    parent exactly ``start - children``; every child must have exited 0.
    """
    failures = []
    for leg in (mp, ps):
        if leg.printed is None:
            failures.append(f"the {leg.library} leg did not finish")
        if leg.failed_children:
            failures.append(
                f"{leg.failed_children} of the {leg.children} {leg.library} children failed"
            )
    if mp.printed is not None and mp.printed != mp.start:
        failures.append(
            f"multiprocessing: the parent printed {mp.printed}, not {mp.start}: "
            "a child's change reached the parent's memory"
        )
    if ps.printed is not None and ps.printed != ps.start - ps.children:
        lost = ps.printed - (ps.start - ps.children)
        failures.append(
            f"procsync: the parent printed {ps.printed}, not {ps.start - ps.children}: "
            f"{lost} decrement(s) lost"
        )
    return tuple(failures)


def _run_children(
    ctx: multiprocessing.context.BaseContext,
    target: Callable[..., Any],
    args: tuple[Any, ...],
    count: int,
    deadline: float,
    on_child: Callable[[int], None] | None,
) -> int:
    """Start ``count`` children, join them all; return how many failed. Children still
    running at ``deadline`` are killed (they were started here) and count as failed."""
    procs = []
    try:
        for _ in range(count):
            p = ctx.Process(target=target, args=args)  # type: ignore[attr-defined]
            p.start()
            procs.append(p)
        failed = 0
        for i, p in enumerate(procs, 1):
            while p.exitcode is None and time.monotonic() < deadline:
                p.join(JOIN_SLICE)
            if p.exitcode != 0:
                failed += 1
            if on_child is not None:
                on_child(i)
        return failed
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
                p.join(5.0)


def run(
    opts: IsolationOptions,
    *,
    on_leg: Callable[[str], None] | None = None,
    on_child: Callable[[str, int], None] | None = None,
) -> IsolationResult:
    """Run both legs and check them; never raises for a failed property (see
    :attr:`IsolationResult.ok`).

    ``on_leg(library)`` is called as each leg starts, ``on_child(library, joined)``
    as its children are joined.

    Raises:
        ServerError: the server of the procsync leg cannot be reached.
    """
    global n
    url = resolve_url(opts.url)
    ctx = multiprocessing.get_context(opts.start_method)
    start = opts.children

    def progress(library: str) -> Callable[[int], None] | None:
        if on_child is None:
            return None
        cb = on_child
        return lambda joined: cb(library, joined)

    # The notes' program, as written.
    if on_leg is not None:
        on_leg("multiprocessing")
    n = start
    t0 = time.monotonic()
    failed = _run_children(
        ctx, _mp_func, (), opts.children, t0 + opts.timeout, progress("multiprocessing")
    )
    mp = Leg("multiprocessing", start, n, start, opts.children, failed, time.monotonic() - t0)

    # The way out: one n, in the server. The parent does not touch the server before
    # its children are gone (fork without procsync's threads running).
    if on_leg is not None:
        on_leg("procsync")
    shared = Value("i", start, name=f"demo:isolation:{secrets.token_hex(4)}", url=url)
    t0 = time.monotonic()
    try:
        failed = _run_children(
            ctx,
            _procsync_func,
            (shared,),
            opts.children,
            t0 + opts.timeout,
            progress("procsync"),
        )
        printed: int | None = int(shared.value)
    finally:
        with contextlib.suppress(ProcsyncError):
            shared.delete()
    ps = Leg("procsync", start, printed, 0, opts.children, failed, time.monotonic() - t0)
    return IsolationResult(
        multiprocessing=mp,
        procsync=ps,
        start_method=opts.start_method,
        url=shared.backend.safe_url,
        failures=check(mp, ps),
    )
