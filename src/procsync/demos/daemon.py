"""Daemon processes that report "alive" (守护进程 报活), with the liveness registry.

The notes: a daemon process lives exactly as long as its main process, and that is
what it is for — reporting that the main process is alive (报活), for 100 machines
x 100 processes. Why a daemon *process* and not the main process, or a thread? The
main process has its own work and cannot promise to send a report on time.

procsync's sessions are that report. ``Session(heartbeat="process")`` starts a
heartbeat daemon process next to the main process: it renews the session's lease
every ttl/3, and when the main process dies it ends the session at once, so the
registry records the death within milliseconds. This demo shows both halves:

**1. 报活, and a death.** ``workers`` processes (``spawn``) each open a session with
a heartbeat process and work, beating progress. The registry
(:func:`procsync.sessions`) lists them alive, their heartbeats renewing. Then one
worker is SIGKILLed. Checked: the registry records ``died`` for it (via
:func:`procsync.watch`, server time), its heartbeat process ends too, the others
stay alive and report on (no false death), and at the end leave cleanly (``left``).

**2. Why a process** (``stuck=True``). Two more workers, one with
``heartbeat="thread"`` and one with ``heartbeat="process"``, both block their main
thread in C code that holds the GIL (a ``ctypes.PyDLL`` call, as a C extension that
forgot ``Py_BEGIN_ALLOW_THREADS`` would) for three leases. The heartbeat *thread*
cannot run: its session expires and the registry reports the process dead although
it is alive — the false alarm the notes' question is about. The heartbeat *process*
keeps reporting: checked, that session neither dies nor is lost.

Only the worker processes this run started are signalled; every wait is bounded by
the run's deadline.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, final

from procsync.backend.client import resolve_url
from procsync.demos.server import RegistryWatcher
from procsync.errors import ProcsyncError
from procsync.registry import LivenessEvent, SessionInfo, position, sessions
from procsync.session import Session
from procsync.sync import Event

__all__ = [
    "DaemonEvent",
    "DaemonOptions",
    "DaemonResult",
    "DaemonVerdict",
    "Report",
    "check",
    "run",
    "worker",
]

log = logging.getLogger("procsync.demo")

#: How often loops look at their deadline, and workers beat progress.
TICK: Final = 0.05
#: How long a killed worker's heartbeat process may take to end.
HEARTBEAT_EXIT_S: Final = 5.0
#: A death must be reported within the ttl plus this (the design's cross-host bound;
#: on one host it takes milliseconds).
REPORT_SLACK_S: Final = 1.0
#: How many leases the stuck workers hold the GIL.
STUCK_LEASES: Final = 3.0


# -- a worker (runs in its own process) --------------------------------------------------


@dataclass(frozen=True)
class WorkerConfig:
    """What a worker needs (pickled to it by ``spawn``)."""

    name: str
    url: str
    heartbeat: str
    """``process`` or ``thread``."""
    ttl: float
    stuck_s: float
    """> 0: block the main thread this long, holding the GIL, after the start signal."""
    deadline: float
    parent_pid: int
    log_level: int


def _hold_the_gil(seconds: float) -> None:
    """Sleep in C *without* releasing the GIL: ``poll(NULL, 0, ms)`` called through
    ``ctypes.PyDLL``, which keeps the GIL for the call (``CDLL`` would release it)."""
    libc = ctypes.PyDLL(None)
    libc.poll(None, 0, int(seconds * 1000))


def worker(
    cfg: WorkerConfig, go: Event, stop: Event, pipe: multiprocessing.connection.Connection
) -> None:
    """Open a session that reports alive, tell the parent who reports, then work.

    Sends ``{"pid", "session", "heartbeat_pid"}`` once the session is open, and
    ``{"lost": bool, "reason": ...}`` when it is done (after ``stop``, or after being
    stuck). Work is a progress beat every :data:`TICK`.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    logging.basicConfig(level=cfg.log_level, format=f"%(levelname)s {cfg.name}: %(message)s")
    deadline = time.monotonic() + (cfg.deadline - time.time())
    with Session(cfg.name, heartbeat=cfg.heartbeat, ttl=cfg.ttl, url=cfg.url) as s:
        pipe.send({"pid": os.getpid(), "session": s.id, "heartbeat_pid": s.heartbeat_pid})
        if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
            return
        if cfg.stuck_s > 0:
            _hold_the_gil(cfg.stuck_s)
            time.sleep(TICK)  # let the monitor thread hear from the heartbeat process
        else:
            while not stop.wait(timeout=TICK):
                if time.monotonic() >= deadline or os.getppid() != cfg.parent_pid:
                    break
                with contextlib.suppress(ProcsyncError):
                    s.beat()
        pipe.send({"lost": s.lost, "reason": s.lost_reason})


# -- the checker ----------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Report:
    """What the parent learned of one worker."""

    name: str
    pid: int
    session: str
    heartbeat: str
    heartbeat_pid: int | None
    heartbeat_parent: int | None
    """The heartbeat process's parent pid, read from /proc when it reported."""
    killed_at: float | None = None
    """Unix time just before the SIGKILL (phase 1's victim)."""
    heartbeat_exit_s: float | None = None
    """SIGKILL to the heartbeat process being gone (None: it was not seen to end)."""
    stuck: bool = False
    lost: bool | None = None
    """What the worker's session said at its end (None: it never said)."""


@final
@dataclass(frozen=True, slots=True)
class DaemonVerdict:
    """What :func:`check` found. ``ok`` iff ``failures`` is empty."""

    workers: int
    killed: int
    deaths_recorded: int
    death_report_s: float | None
    heartbeat_exit_s: float | None
    survivors_left: int
    false_deaths: int
    thread_heartbeat_died: bool | None
    """Phase 2: the thread-heartbeat session was reported dead while stuck (the
    lesson; not a failure if it was not)."""
    process_heartbeat_survived: bool | None
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def check(reports: list[Report], events: list[LivenessEvent], ttl: float) -> DaemonVerdict:
    """Check the run from the workers' reports and the registry's events.

    Demands: every reporter ran a heartbeat process that was its own child
    (``heartbeat="process"``); the killed worker has a ``died`` event within ttl +
    :data:`REPORT_SLACK_S` of its SIGKILL, and its heartbeat process ended; no other
    process-heartbeat worker died, and each left cleanly; the stuck process-heartbeat
    worker's session was never lost.
    """
    failures: list[str] = []
    by_sid: dict[str, list[LivenessEvent]] = {}
    for e in events:
        by_sid.setdefault(e.session_id, []).append(e)

    def types(r: Report) -> list[str]:
        return [e.type for e in by_sid.get(r.session, [])]

    killed = [r for r in reports if r.killed_at is not None]
    report_s: float | None = None
    hb_exit: float | None = None
    recorded = 0
    for r in killed:
        died = [e for e in by_sid.get(r.session, []) if e.type == "died"]
        if not died:
            failures.append(f"{r.name} (pid {r.pid}) was killed; the registry has no death")
            continue
        recorded += 1
        report_s = max(0.0, died[0].at - (r.killed_at or 0.0))
        if report_s > ttl + REPORT_SLACK_S:
            failures.append(
                f"{r.name}'s death was reported {report_s:.3f} s after the kill (ttl {ttl:g} s)"
            )
        hb_exit = r.heartbeat_exit_s
        if r.heartbeat_exit_s is None:
            failures.append(f"{r.name}'s heartbeat process outlived it")
    survivors_left = 0
    false_deaths = 0
    thread_died: bool | None = None
    process_survived: bool | None = None
    for r in reports:
        if r.heartbeat == "process" and (r.heartbeat_pid is None or r.heartbeat_parent != r.pid):
            failures.append(f"{r.name} has no heartbeat process of its own")
        if r.killed_at is not None:
            continue
        t = types(r)
        if r.heartbeat == "thread":
            thread_died = "died" in t
            continue
        if "died" in t:
            false_deaths += 1
            failures.append(f"{r.name} (pid {r.pid}) was reported dead but was never killed")
        elif "left" in t:
            survivors_left += 1
        else:
            failures.append(f"{r.name} never left the registry")
        if r.stuck:
            process_survived = "died" not in t and r.lost is False
            if r.lost is not False:
                failures.append(
                    f"{r.name}: its session was lost while the main thread was stuck, "
                    "although a heartbeat process reported for it"
                )
    return DaemonVerdict(
        workers=len(reports),
        killed=len(killed),
        deaths_recorded=recorded,
        death_report_s=report_s,
        heartbeat_exit_s=hb_exit,
        survivors_left=survivors_left,
        false_deaths=false_deaths,
        thread_heartbeat_died=thread_died,
        process_heartbeat_survived=process_survived,
        failures=tuple(failures),
    )


# -- the run ----------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class DaemonOptions:
    """What to run."""

    workers: int = 3
    """Phase 1: workers reporting through a heartbeat process; one is killed."""
    ttl: float = 2.0
    """Session lease of every worker."""
    observe: float | None = None
    """Seconds to watch them report before the kill, and after it (default: one ttl)."""
    stuck: bool = True
    """Run phase 2 (a thread and a process heartbeat, main thread stuck holding the GIL)."""
    url: str | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {self.workers}")
        if not self.ttl > 0 or not self.timeout > 0:
            raise ValueError("ttl and timeout must be positive")


@final
@dataclass(frozen=True, slots=True)
class DaemonEvent:
    """What ``on_event`` receives."""

    at: float
    """Seconds since the run started (the parent's clock)."""
    kind: str
    """phase, joined, snapshot, kill, died, left, heartbeat-gone, stuck, lost, ..."""
    message: str
    sessions: tuple[SessionInfo, ...] = ()
    """``snapshot``: the registry's view of this run's sessions."""


@final
@dataclass(frozen=True, slots=True)
class DaemonResult:
    """The run: the verdict and the figures."""

    verdict: DaemonVerdict
    reports: tuple[Report, ...]
    events: tuple[LivenessEvent, ...]
    ttl: float
    stuck_s: float | None
    url: str
    problems: tuple[str, ...] = field(default=())
    timed_out: bool = False

    @property
    def failures(self) -> tuple[str, ...]:
        return self.problems + self.verdict.failures

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        v = self.verdict

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x * 1000, 3)

        victim = next((r for r in self.reports if r.killed_at is not None), None)
        return {
            "ok": self.ok,
            "workers": v.workers,
            "ttl_s": self.ttl,
            "killed": v.killed,
            "victim": None if victim is None else victim.name,
            "deaths_recorded": v.deaths_recorded,
            "death_report_ms": ms(v.death_report_s),
            "heartbeat_exit_ms": ms(v.heartbeat_exit_s),
            "survivors_left": v.survivors_left,
            "false_deaths": v.false_deaths,
            "stuck_s": self.stuck_s,
            "thread_heartbeat_died": v.thread_heartbeat_died,
            "process_heartbeat_survived": v.process_heartbeat_survived,
            "reporters": [
                {
                    "name": r.name,
                    "pid": r.pid,
                    "heartbeat": r.heartbeat,
                    "heartbeat_pid": r.heartbeat_pid,
                    "events": [e.type for e in self.events if e.session_id == r.session],
                }
                for r in self.reports
            ],
            "url": self.url,
            "timed_out": self.timed_out,
            "failures": list(self.failures),
        }


def _child_log_level() -> int:
    # The stuck thread-heartbeat worker logs that it lost its session: expected here.
    level = logging.getLogger().getEffectiveLevel()
    return level if level < logging.WARNING else logging.CRITICAL


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of ``pid`` from /proc, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # exited, waiting to be reaped
        return None
    return int(fields[1]), int(fields[19])


class _Abort(Exception):
    pass


@dataclass
class _Worker:
    cfg: WorkerConfig
    process: multiprocessing.process.BaseProcess
    pipe: multiprocessing.connection.Connection
    hello: dict[str, Any] | None = None
    hb_start: int | None = None
    hb_parent: int | None = None
    killed_at: float | None = None
    hb_exit_s: float | None = None
    lost: bool | None = None

    def report(self, stuck: bool) -> Report:
        h = self.hello or {}
        return Report(
            name=self.cfg.name,
            pid=int(h.get("pid", self.process.pid or 0)),
            session=str(h.get("session", "")),
            heartbeat=self.cfg.heartbeat,
            heartbeat_pid=h.get("heartbeat_pid"),
            heartbeat_parent=self.hb_parent,
            killed_at=self.killed_at,
            heartbeat_exit_s=self.hb_exit_s,
            stuck=stuck,
            lost=self.lost,
        )


class _Run:
    def __init__(
        self, opts: DaemonOptions, url: str, on_event: Callable[[DaemonEvent], None] | None
    ) -> None:
        self.opts, self.url, self.on_event = opts, url, on_event
        self.run_id = secrets.token_hex(4)
        self.prefix = f"daemon-demo:{self.run_id}/"
        self.t0 = time.monotonic()
        self.deadline = time.monotonic() + opts.timeout
        self.wall_deadline = time.time() + opts.timeout
        self.ctx = multiprocessing.get_context("spawn")
        self.problems: list[str] = []
        self.timed_out = False
        self.watcher: RegistryWatcher | None = None

    def emit(self, kind: str, message: str, snapshot: tuple[SessionInfo, ...] = ()) -> None:
        log.info("%s", message)
        if self.on_event is not None:
            at = round(time.monotonic() - self.t0, 3)
            self.on_event(DaemonEvent(at, kind, message, snapshot))

    def short(self, name: str) -> str:
        return name.removeprefix(self.prefix)

    def check_time(self) -> None:
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            raise _Abort(f"timed out after {self.opts.timeout:g} s")

    def snapshot(self) -> tuple[SessionInfo, ...]:
        ours = [s for s in sessions(url=self.url) if s.name.startswith(self.prefix)]
        return tuple(ours)

    @contextlib.contextmanager
    def start(
        self, names: list[tuple[str, str]], stuck_s: float, go: Event, stop: Event
    ) -> Iterator[list[_Worker]]:
        """Start one worker per (name, heartbeat mode); kill what is left at the end."""
        workers: list[_Worker] = []
        try:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # children ignore it
            try:
                for name, mode in names:
                    cfg = WorkerConfig(
                        name=self.prefix + name,
                        url=self.url,
                        heartbeat=mode,
                        ttl=self.opts.ttl,
                        stuck_s=stuck_s,
                        deadline=self.wall_deadline,
                        parent_pid=os.getpid(),
                        log_level=_child_log_level(),
                    )
                    ours, theirs = self.ctx.Pipe(duplex=False)
                    p = self.ctx.Process(target=worker, args=(cfg, go, stop, theirs), name=name)
                    p.start()
                    theirs.close()
                    workers.append(_Worker(cfg, p, ours))
            finally:
                signal.signal(signal.SIGINT, old)
            self.hello(workers)
            yield workers
        finally:
            for w in workers:
                if w.process.exitcode is None:
                    w.process.kill()
            for w in workers:
                w.process.join(5.0)

    def hello(self, workers: list[_Worker]) -> None:
        """Wait until every worker said who reports for it."""
        for w in workers:
            while not w.pipe.poll(TICK):
                self.check_time()
                if w.process.exitcode is not None:
                    raise _Abort(f"{w.process.name} exited with status {w.process.exitcode}")
            w.hello = w.pipe.recv()
            hb = w.hello.get("heartbeat_pid")
            if hb is not None:
                st = _proc_stat(int(hb))
                if st is not None:
                    w.hb_parent, w.hb_start = st
            via = f"heartbeat process pid {hb}" if hb else "a heartbeat thread"
            self.emit("joined", f"{w.process.name} (pid {w.process.pid}) reports alive via {via}")

    def observe(self, seconds: float) -> None:
        """Let them report for a while, showing the registry's view."""
        end = time.monotonic() + seconds
        while True:
            self.check_time()
            self.emit("snapshot", "registry", self.snapshot())
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, max(TICK, self.opts.ttl / 6)))

    def wait_for(self, what: Callable[[], bool], within: float) -> bool:
        end = time.monotonic() + within
        while not what():
            if time.monotonic() >= end:
                return False
            self.check_time()
            time.sleep(TICK / 5)
        return True

    def died(self, sid: str) -> bool:
        w = self.watcher
        return w is not None and any(
            e.type == "died" and e.session_id == sid for e in list(w.events)
        )

    def ended(self, sid: str) -> bool:
        w = self.watcher
        return w is not None and any(
            e.type in ("died", "left") and e.session_id == sid for e in list(w.events)
        )

    def kill(self, w: _Worker) -> None:
        pid = w.process.pid
        if pid is None or w.process.exitcode is not None:
            raise _Abort(f"{w.process.name} is not running")
        hb = (w.hello or {}).get("heartbeat_pid")
        w.killed_at = time.time()
        t = time.monotonic()
        os.kill(pid, signal.SIGKILL)  # a child of ours
        self.emit("kill", f"SIGKILL {w.process.name} (pid {pid})")
        sid = str((w.hello or {}).get("session", ""))
        self.wait_for(functools.partial(self.died, sid), self.opts.ttl + REPORT_SLACK_S + 1.0)
        if hb is not None:

            def hb_gone() -> bool:
                st = _proc_stat(int(hb))
                return st is None or st[1] != w.hb_start

            if self.wait_for(hb_gone, HEARTBEAT_EXIT_S):
                w.hb_exit_s = time.monotonic() - t
                self.emit("heartbeat-gone", f"its heartbeat process (pid {hb}) ended too, "
                                            f"{_ms(w.hb_exit_s)} after the kill")  # fmt: skip
        w.process.join(5.0)

    def finish(self, workers: list[_Worker], stop: Event) -> None:
        """Tell the workers to stop; collect what each said about its session."""
        stop.set()
        for w in workers:
            if w.killed_at is not None:
                continue
            while not w.pipe.poll(TICK):
                self.check_time()
                if w.process.exitcode is not None:
                    break
            with contextlib.suppress(EOFError, OSError):
                if w.pipe.poll(0):
                    w.lost = bool(w.pipe.recv().get("lost"))
            w.process.join(max(0.0, min(10.0, self.deadline - time.monotonic())))
            if w.process.exitcode not in (0, None):
                self.problems.append(f"{w.process.name} exited with status {w.process.exitcode}")
            sid = str((w.hello or {}).get("session", ""))
            self.wait_for(functools.partial(self.ended, sid), 2.0)

    def phase1(self, go: Event, stop: Event) -> list[Report]:
        n = self.opts.workers
        observe = self.opts.observe if self.opts.observe is not None else self.opts.ttl
        self.emit("phase", f"1. 报活: {n} workers, each with a heartbeat daemon process "
                           f"(ttl {self.opts.ttl:g} s)")  # fmt: skip
        names = [(f"worker-{i}", "process") for i in range(1, n + 1)]
        with self.start(names, 0.0, go, stop) as workers:
            go.set()
            self.observe(observe)
            victim = workers[len(workers) // 2]
            self.kill(victim)
            self.observe(observe)  # the others keep reporting: no false death
            self.finish(workers, stop)
            return [w.report(stuck=False) for w in workers]

    def phase2(self, go: Event, stop: Event) -> tuple[list[Report], float]:
        ttl = self.opts.ttl
        stuck_s = STUCK_LEASES * ttl
        self.emit("phase", f"2. why a daemon process: the main thread holds the GIL for "
                           f"{stuck_s:g} s ({STUCK_LEASES:g} leases)")  # fmt: skip
        names = [("stuck-thread", "thread"), ("stuck-process", "process")]
        with self.start(names, stuck_s, go, stop) as workers:
            go.set()
            self.emit("stuck", "both main threads are stuck in C now")
            self.observe(stuck_s)
            for w in workers:
                while not w.pipe.poll(TICK):
                    self.check_time()
                    if w.process.exitcode is not None:
                        break
                with contextlib.suppress(EOFError, OSError):
                    if w.pipe.poll(0):
                        msg = w.pipe.recv()
                        w.lost = bool(msg.get("lost"))
                        state = "LOST its session" if w.lost else "still holds its session"
                        self.emit("lost" if w.lost else "kept", f"{w.process.name}: {state}")
                w.process.join(max(0.0, min(10.0, self.deadline - time.monotonic())))
            for w in workers:
                sid = str((w.hello or {}).get("session", ""))
                self.wait_for(functools.partial(self.ended, sid), 2.0)
            return [w.report(stuck=True) for w in workers], stuck_s


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def run(
    opts: DaemonOptions, *, on_event: Callable[[DaemonEvent], None] | None = None
) -> DaemonResult:
    """Run both phases and check them; never raises for a broken property (see
    :attr:`DaemonResult.ok`). Must run in the main thread.

    Raises:
        ServerError: the server cannot be reached.
    """
    url = resolve_url(opts.url)
    r = _Run(opts, url, on_event)

    def on_liveness(ev: LivenessEvent) -> None:
        who = r.short(ev.name)
        if ev.type == "died":
            r.emit("registry", f"registry: {who} (pid {ev.pid}) died")
        elif ev.type == "left":
            r.emit("registry", f"registry: {who} (pid {ev.pid}) left")

    watcher = RegistryWatcher(url, r.prefix, position(url=url), on_liveness)
    r.watcher = watcher
    watcher.start()
    reports: list[Report] = []
    stuck_s: float | None = None
    events = [Event(f"demo:daemon:{r.run_id}:{what}", url=url) for what in ("go", "stop")]
    try:
        try:
            reports += r.phase1(events[0], events[1])
            if opts.stuck:
                for e in events:
                    e.clear()
                more, stuck_s = r.phase2(events[0], events[1])
                reports += more
        except _Abort as exc:
            r.problems.append(str(exc))
        if watcher.error is not None:
            r.problems.append(f"the registry watch failed: {watcher.error}")
        verdict = check(reports, list(watcher.events), opts.ttl)
        return DaemonResult(
            verdict=verdict,
            reports=tuple(reports),
            events=tuple(watcher.events),
            ttl=opts.ttl,
            stuck_s=stuck_s,
            url=events[0].backend.safe_url,
            problems=tuple(r.problems),
            timed_out=r.timed_out,
        )
    finally:
        watcher.stop.set()
        watcher.join(5.0)
        with contextlib.suppress(ProcsyncError):
            for e in events:
                e.clear()
