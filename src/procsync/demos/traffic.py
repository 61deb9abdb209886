"""The traffic light (事件 红绿灯模型): one Event, a light process, cars and police cars.

The notes' program: a light process switches every 2 s — green sets the Event, red
clears it. A car that finds the light red prints ``等待`` and waits for green; a
police car waits at most 0.5 s and then passes anyway. Here every vehicle and the
light are real processes (``spawn``) sharing one ``procsync.Event`` by name, and
the promises are *checked* from a history the server wrote.

The witness is a :class:`~procsync.demos.ktv.ServerLog`: every entry is stamped with
the server's ``TIME`` and ordered by the server. Who writes what, and when::

    light   log("green"); light.set()           the entry comes before the flag goes up
            light.clear(); log("red")           ... and after it came down
    car     log("look"); if light.is_set(): log("pass")
            else: log("wait"); light.wait(); look again
    police  log("look"); if light.is_set(): log("pass")
            else: log("wait"); woke = light.wait(0.5); log("pass", woke)

So a recorded green phase — from a ``green`` entry to the next ``red`` entry —
contains the real one, and a car's ``is_set()`` that said True ran, on the server,
between its last ``look`` and its ``pass``. The checker (:func:`check`) demands:

* **no car passed on red**: for every car the window (last ``look``, ``pass``)
  meets a recorded green phase; a car that waited looks again before it crosses,
  so its window is one ``is_set()`` round trip, not the whole wait;
* **police cars pass on red only after their 0.5 s**: a police car whose
  ``wait(0.5)`` returned False (it passes on red) has ``pass`` at least 0.5 s after
  ``wait`` on the server's clock; one whose wait returned True met a green phase;
* every vehicle passed exactly once, and the light alternated red, green, red...

The parent reads the log as it grows and reports each entry through ``on_entry``;
``procsync demo traffic`` prints them coloured like the notes. The light sleeps by
waiting on a ``stop`` Event, so the parent ends it cleanly at once; everything runs
under one deadline, and only the processes started here are ever signalled.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import multiprocessing
import multiprocessing.process
import os
import random
import secrets
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, final

from procsync.backend.client import resolve_url
from procsync.demos.ktv import READ_BLOCK_S, ServerLog
from procsync.errors import ProcsyncError
from procsync.session import configure
from procsync.sync import Event

__all__ = [
    "LIGHT",
    "TrafficOptions",
    "TrafficRecord",
    "TrafficResult",
    "TrafficVerdict",
    "check",
    "light",
    "run",
    "vehicle",
]

#: ``who`` of the light's records.
LIGHT: Final = -1
#: Longest single ``wait()`` of a car, so it re-checks its deadline and parent.
WAIT_SLICE: Final = 2.0
#: A vehicle's exit status when it gave up (deadline passed, or its parent is gone).
EXIT_GAVE_UP: Final = 3
#: Slack for comparing a police car's wait with its 0.5 s: the server stamps in
#: microseconds, and the client's and server's clocks may tick at slightly different
#: rates (NTP slews by at most 0.05 %).
WAIT_SLACK_S: Final = 0.001


# -- what the checker reads ----------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class TrafficRecord:
    """One entry of the history, in the server's order."""

    at: float
    """Seconds since the start signal, on the server's clock."""
    who: int
    """Vehicle number, or :data:`LIGHT`."""
    kind: str
    """``light``, ``car`` or ``police_car``."""
    what: str
    """light: ``red`` / ``green``; vehicles: ``look``, ``wait``, ``pass``."""
    woke: bool | None = None
    """A police car's ``pass`` after a wait: what ``wait(0.5)`` returned."""


@final
@dataclass(frozen=True, slots=True)
class TrafficVerdict:
    """What :func:`check` found. ``ok`` iff ``failures`` is empty."""

    vehicles: int
    cars: int
    police: int
    passed: int
    cars_waited: int
    """Cars that found the light red at least once."""
    police_on_red: int
    """Police cars that waited their time out and passed on red."""
    police_on_green: int
    passed_on_red: int
    """Vehicles that crossed on red without having waited their time (must be 0)."""
    light_changes: int
    min_police_red_wait_s: float | None
    """Shortest wait of a police car that passed on red (must be >= police_wait)."""
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def _green_phases(records: Sequence[TrafficRecord]) -> list[tuple[int, float]]:
    """(index of a ``green`` record, index of the next ``red`` or +inf), in order."""
    phases: list[tuple[int, float]] = []
    for i, r in enumerate(records):
        if r.who != LIGHT:
            continue
        if r.what == "green":
            phases.append((i, float("inf")))
        elif r.what == "red" and phases and phases[-1][1] == float("inf"):
            phases[-1] = (phases[-1][0], float(i))
    return phases


def _meets_green(phases: list[tuple[int, float]], starts: list[int], lo: int, hi: int) -> bool:
    """Does some green phase (g, r) overlap the window (lo, hi) of record indexes?
    That is: g < hi and r > lo."""
    k = bisect.bisect_left(starts, hi)  # phases[:k] start before hi
    return k > 0 and phases[k - 1][1] > lo


def check(
    records: Sequence[TrafficRecord], vehicles: dict[int, str], police_wait: float
) -> TrafficVerdict:
    """Check the history (``records`` in the server's order; ``vehicles`` maps each
    vehicle number to ``car`` or ``police_car``). See the module docstring."""
    failures: list[str] = []
    light_seq = [r.what for r in records if r.who == LIGHT]
    if not light_seq or light_seq[0] != "red":
        failures.append("the light did not start red")
    for a, b in itertools.pairwise(light_seq):
        if a == b:
            failures.append(f"the light went {a} twice in a row")
            break
    phases = _green_phases(records)
    starts = [g for g, _ in phases]
    last_look: dict[int, int] = {}
    wait_at: dict[int, tuple[int, float]] = {}
    waited: set[int] = set()
    passes: dict[int, int] = {}
    police_red = police_green = on_red = 0
    red_waits: list[float] = []
    for i, r in enumerate(records):
        if r.who == LIGHT:
            continue
        name = f"{r.kind} {r.who}"
        if vehicles.get(r.who) != r.kind:
            failures.append(f"{r.at:.3f}s: unknown vehicle {name}")
            continue
        if r.who in passes:
            failures.append(f"{r.at:.3f}s: {name} acted after it passed ({r.what})")
            continue
        if r.what == "look":
            last_look[r.who] = i
            wait_at.pop(r.who, None)
        elif r.what == "wait":
            wait_at[r.who] = (i, r.at)
            waited.add(r.who)
        elif r.what == "pass":
            passes[r.who] = i
            if r.kind == "police_car" and r.who in wait_at:
                w, w_at = wait_at[r.who]
                if r.woke:
                    police_green += 1
                    if not _meets_green(phases, starts, w, i):
                        on_red += 1
                        failures.append(f"{r.at:.3f}s: {name} was woken by a green that never came")
                else:
                    police_red += 1
                    red_waits.append(r.at - w_at)
                    if r.at - w_at < police_wait - WAIT_SLACK_S:
                        on_red += 1
                        failures.append(
                            f"{r.at:.3f}s: {name} passed on red after waiting only "
                            f"{r.at - w_at:.3f} s, not {police_wait:g} s"
                        )
                continue
            look = last_look.get(r.who)
            if look is None:
                failures.append(f"{r.at:.3f}s: {name} passed without looking at the light")
            elif not _meets_green(phases, starts, look, i):
                on_red += 1
                failures.append(f"{r.at:.3f}s: {name} passed on red")
            elif r.kind == "police_car":
                police_green += 1
        else:
            failures.append(f"{r.at:.3f}s: {name}: unknown step {r.what!r}")
    if missing := sorted(set(vehicles) - set(passes)):
        failures.append(f"never passed: {', '.join(f'{vehicles[v]} {v}' for v in missing)}")
    kinds = list(vehicles.values())
    return TrafficVerdict(
        vehicles=len(vehicles),
        cars=kinds.count("car"),
        police=kinds.count("police_car"),
        passed=len(passes),
        cars_waited=sum(1 for v in waited if vehicles.get(v) == "car"),
        police_on_red=police_red,
        police_on_green=police_green,
        passed_on_red=on_red,
        light_changes=max(0, len(light_seq) - 1),
        min_police_red_wait_s=min(red_waits) if red_waits else None,
        failures=tuple(failures),
    )


# -- the processes ---------------------------------------------------------------------


@dataclass(frozen=True)
class LightConfig:
    """What the light process needs (pickled to it by ``spawn``)."""

    period_s: float
    ttl: float | None
    deadline: float
    """Unix time after which it stops."""
    parent_pid: int


@dataclass(frozen=True)
class VehicleConfig:
    """What a vehicle process needs (pickled to it by ``spawn``)."""

    number: int
    kind: str
    """``car`` or ``police_car``."""
    arrive_s: float
    """Seconds after the start signal at which it comes to the light."""
    police_wait_s: float
    ttl: float | None
    deadline: float
    parent_pid: int


def _start(ttl: float | None, book: ServerLog, who: int, kind: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C means
    if ttl is not None:
        configure(ttl=ttl)
    book.append(who=who, kind=kind, what="ready")


def light(cfg: LightConfig, lamp: Event, go: Event, stop: Event, book: ServerLog) -> None:
    """The notes' ``traffic_light``: red first, then switch every ``period_s``.

    Turning green, the record comes before ``set()``; turning red, after ``clear()``:
    a recorded green phase always contains the real one.
    """
    _start(cfg.ttl, book, LIGHT, "light")
    deadline = time.monotonic() + (cfg.deadline - time.time())
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        raise SystemExit(EXIT_GAVE_UP)
    book.append(who=LIGHT, kind="light", what="red")  # 红灯亮
    # stop.wait(period) is the notes' time.sleep(2), cut short when the parent is done.
    while not stop.wait(timeout=cfg.period_s):
        if time.monotonic() >= deadline or os.getppid() != cfg.parent_pid:
            raise SystemExit(EXIT_GAVE_UP)
        if lamp.is_set():
            lamp.clear()
            book.append(who=LIGHT, kind="light", what="red")  # 红灯亮
        else:
            book.append(who=LIGHT, kind="light", what="green")  # 绿灯亮
            lamp.set()


def vehicle(cfg: VehicleConfig, lamp: Event, go: Event, book: ServerLog) -> None:
    """The notes' ``car`` (waits for green; looks again before it crosses) or
    ``police_car`` (waits at most ``police_wait_s``, then passes anyway)."""
    _start(cfg.ttl, book, cfg.number, cfg.kind)
    deadline = time.monotonic() + (cfg.deadline - time.time())
    if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
        raise SystemExit(EXIT_GAVE_UP)
    time.sleep(cfg.arrive_s)
    me: dict[str, str | int] = {"who": cfg.number, "kind": cfg.kind}
    if cfg.kind == "police_car":
        book.append(**me, what="look")
        if lamp.is_set():
            book.append(**me, what="pass")
            return
        book.append(**me, what="wait")
        woke = lamp.wait(timeout=cfg.police_wait_s)
        book.append(**me, what="pass", woke=int(woke))  # police_car 通过
        return
    while True:
        left_s = deadline - time.monotonic()
        if left_s <= 0 or os.getppid() != cfg.parent_pid:
            raise SystemExit(EXIT_GAVE_UP)
        book.append(**me, what="look")
        if lamp.is_set():
            book.append(**me, what="pass")  # car 通过
            return
        book.append(**me, what="wait")  # car 等待
        lamp.wait(timeout=min(WAIT_SLICE, left_s))


# -- the run ----------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class TrafficOptions:
    """What to run. The notes: 20 vehicles, a light switching every 2 s, vehicles
    0 or 2 s apart, police cars waiting 0.5 s."""

    vehicles: int = 20
    period: float = 2.0
    """Seconds between two switches of the light."""
    police_wait: float = 0.5
    seed: int | None = None
    ttl: float | None = None
    url: str | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.vehicles < 1:
            raise ValueError(f"vehicles must be at least 1, got {self.vehicles}")
        for what in ("period", "police_wait", "timeout"):
            if not getattr(self, what) > 0:
                raise ValueError(f"{what} must be positive, got {getattr(self, what)!r}")


@final
@dataclass(frozen=True, slots=True)
class TrafficResult:
    """The run: the history, the verdict, figures."""

    verdict: TrafficVerdict
    records: tuple[TrafficRecord, ...]
    kinds: dict[int, str]
    period: float
    police_wait: float
    duration_s: float
    url: str
    seed: int | None
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
        min_wait = v.min_police_red_wait_s
        return {
            "ok": self.ok,
            "vehicles": v.vehicles,
            "cars": v.cars,
            "police_cars": v.police,
            "passed": v.passed,
            "cars_waited": v.cars_waited,
            "police_on_red": v.police_on_red,
            "police_on_green": v.police_on_green,
            "passed_on_red": v.passed_on_red,
            "min_police_red_wait_s": None if min_wait is None else round(min_wait, 4),
            "light_changes": v.light_changes,
            "period_s": self.period,
            "police_wait_s": self.police_wait,
            "duration_s": round(self.duration_s, 4),
            "history": [
                {"at": round(r.at, 6), "who": r.who, "kind": r.kind, "what": r.what}
                | ({} if r.woke is None else {"woke": r.woke})
                for r in self.records
            ],
            "clock": "server",
            "url": self.url,
            "seed": self.seed,
            "timed_out": self.timed_out,
            "failures": list(self.failures),
        }


def _plan(opts: TrafficOptions) -> tuple[dict[int, str], dict[int, float]]:
    """Kind and arrival time of each vehicle: the notes' ``random.choice`` and
    ``time.sleep(random.randrange(0, 3, 2))`` (0 or 2 s: none or one period), the
    first a quarter period after the light starts, so that vehicles meet the light
    in the middle of a phase rather than just as it switches."""
    rng = random.Random(opts.seed)
    kinds: dict[int, str] = {}
    arrivals: dict[int, float] = {}
    t = opts.period / 4
    for i in range(opts.vehicles):
        kinds[i] = rng.choice(["police_car", "car"])
        arrivals[i] = t
        t += rng.randrange(0, 3, 2) / 2 * opts.period
    return kinds, arrivals


@contextlib.contextmanager
def _started(
    ctx: multiprocessing.context.SpawnContext,
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]],
) -> Iterator[list[multiprocessing.process.BaseProcess]]:
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # children are born ignoring it
        try:
            for target, args in jobs:
                p: multiprocessing.process.BaseProcess = ctx.Process(target=target, args=args)
                p.start()
                procs.append(p)
        finally:
            signal.signal(signal.SIGINT, old)
        yield procs
    finally:
        for q in procs:
            if q.exitcode is None:
                q.kill()
        for q in procs:
            q.join(5.0)


def _record(e: Any, t0: float) -> TrafficRecord:
    woke = e.get("woke")
    return TrafficRecord(
        at=e.at - t0,
        who=int(e["who"]),
        kind=e["kind"],
        what=e["what"],
        woke=None if woke == "" else woke == "1",
    )


def run(
    opts: TrafficOptions, *, on_entry: Callable[[TrafficRecord], None] | None = None
) -> TrafficResult:
    """Run the crossing and check the server's history; never raises for a broken
    property (see :attr:`TrafficResult.ok`). Must run in the main thread.

    Raises:
        ServerError: the server cannot be reached (or the embedded one started).
    """
    run_id = secrets.token_hex(4)
    url = resolve_url(opts.url)
    lamp = Event(f"demo:traffic:{run_id}", url=url)
    go = Event(f"demo:traffic:{run_id}:go", url=url)
    stop = Event(f"demo:traffic:{run_id}:stop", url=url)
    book = ServerLog.for_run("traffic", run_id, url=url)
    kinds, arrivals = _plan(opts)
    deadline = time.time() + opts.timeout
    me = os.getpid()
    jobs: list[tuple[Callable[..., None], tuple[Any, ...]]] = [
        (light, (LightConfig(opts.period, opts.ttl, deadline, me), lamp, go, stop, book))
    ]
    for i in range(opts.vehicles):
        cfg = VehicleConfig(i, kinds[i], arrivals[i], opts.police_wait, opts.ttl, deadline, me)
        jobs.append((vehicle, (cfg, lamp, go, book)))
    records: list[TrafficRecord] = []
    problems: list[str] = []
    timed_out = False
    t0 = 0.0
    try:
        with _started(multiprocessing.get_context("spawn"), jobs) as procs:
            after = "0-0"
            ready = 0
            started = False
            passed: set[int] = set()
            while len(passed) < opts.vehicles:
                if time.time() >= deadline:
                    timed_out = True
                    problems.append(f"timed out after {opts.timeout:g} s")
                    break
                crashed = [p for p in procs if p.exitcode not in (None, 0)]
                if crashed:
                    problems += [f"{p.name} exited with status {p.exitcode}" for p in crashed]
                    break
                for e in book.read(after, block=READ_BLOCK_S):
                    after = e.id
                    if e["what"] == "ready":
                        ready += 1
                        continue
                    if e["what"] == "start":
                        continue
                    r = _record(e, t0)
                    records.append(r)
                    if r.what == "pass":
                        passed.add(r.who)
                    if on_entry is not None:
                        on_entry(r)
                if not started and ready == len(jobs):
                    started = True
                    t0 = book.append(who=LIGHT, kind="start", what="start").at
                    go.set()
            stop.set()  # the light ends at once
            for p in procs:
                p.join(max(0.0, min(5.0, deadline - time.time())))
                if p.exitcode not in (0, None) and not timed_out:
                    problems.append(f"{p.name} exited with status {p.exitcode}")
    finally:
        with contextlib.suppress(ProcsyncError):
            for ev in (lamp, go, stop):
                ev.clear()
            book.delete()
    verdict = check(records, kinds, opts.police_wait)
    return TrafficResult(
        verdict=verdict,
        records=tuple(records),
        kinds=kinds,
        period=opts.period,
        police_wait=opts.police_wait,
        duration_s=records[-1].at if records else 0.0,
        url=lamp.backend.safe_url,
        seed=opts.seed,
        problems=tuple(dict.fromkeys(problems)),
        timed_out=timed_out,
    )
