"""``make chaos``: a randomized nemesis run against procsync's Lock (issue 10, item 10).

Eight worker processes contend for one :class:`procsync.Lock`, with a one-second
lease, through fault proxies (:class:`procsync.testing.FaultProxy`) in front of the
lock's server, while a nemesis thread mixes faults in the network and in the server.
There are two proxies ("sides", ``--sides``; the workers alternate between them) and a
network fault hits one side or both: with one side cut off the other can still be
granted the lock, which is what shows a holder that loses its hold too late. In its
critical section each worker makes a *fenced write* to a resource the faults never
touch: a second private server, reached directly, where a Lua script accepts a write
only if its token is greater than every token it accepted before. Everything is
bounded in count and in time; the run stops by itself (about three minutes by
default), prints a table and a one-line verdict, and exits 0 iff every promised
count is 0::

    make chaos                                   # valkey, 8 workers, 180 s
    make chaos CHAOS_ARGS="--server redis --seconds 60 --seed 7"
    python -m benchmarks.chaos --help

What is promised (and counted):

overlapping holds
    two accepted writes from different workers whose critical sections overlap in
    time while both holders still saw ``lock.lost == False`` at the end of their
    section (each worker reads ``time.monotonic()``, then ``lock.lost``, after its
    section: the hold was good until at least that time).
token repeats
    a token granted twice, or a regression: a grant whose acquire *began* after
    another grant had been returned, with a lower token.
stuck
    a worker that completed no acquire attempt (granted, False or an exception) for
    longer than 3 x ttl + the longest fault + 5 s, that ended early, that did not
    finish its last attempt in time after the run, or that completed no attempt
    begun in the final quiet window (no faults: every worker must make progress).
overruns
    an ``acquire(timeout=T)`` that returned after more than T + 0.5 s.

Also failing, although not among the four: an exception that is not a
:class:`procsync.ProcsyncError` (unexpected errors), a refused write by a holder
whose hold was not lost (the fence caught a second holder that no count above saw),
and a harness error (a fault that could not be injected or healed). Procsync's own
exceptions (ServerUnavailableError, LockLostError, ...) are allowed: counted by
class, reported, not failures.

Faults, one at a time, every 0.5-2 s (seeded by ``--seed``), each healed before the
next, the network ones on one side or both: a 0.2-1.5 s blip (``reset`` +
``refuse``), a blackhole shorter than the ttl, a blackhole longer than the ttl
(holders must lose their holds, on time), a one-way stall, 50-200 ms of latency for a
second, a dropped reply, a held reply; a server pause of 0.2-2 s and, rarely, a
server crash and restart without its data (the proxies keep their ports; after it
nothing is granted for one ttl). The last ``--quiet`` seconds (10) are fault-free.

Sample output (``make chaos CHAOS_ARGS="--seed 42"``; the first runs of it, before the
fixes of issue 10 were complete, found overruns and an internal SessionGone out of
``release()``)::

    server                             valkey  seed 42
    workers                                 8  ttl 1 s, on 2 proxies (sides) round-robin
    duration                            180 s  last 10 s without faults
    faults injected                        81  longest 2.09 s
      drop-reply                           13
      blip                                 12
      blackhole<ttl                        10
      stall                                10
      latency                              10
      pause                                 8
      blackhole>ttl                         6
      hold-reply                            6
      crash-restart                         6
      by target                                all: 37, side 0: 16, side 1: 14, server: 14
    acquire attempts                     1972
      granted                            1420
      busy                                465
      ServerUnavailableError               87  allowed (procsync error)
    holds (grants)                       1420  90 in the quiet window
      accepted writes                    1420
      refused writes                        0  stale holders: fine
      lost at grant                         0
      lost by the end of the section       10
    releases                             1420
      ok                                 1395
      LockLostError                        25  allowed (procsync error)
    max acquire time over T           0.177 s  overrun above 0.5 s
    max release time                  1.766 s  0 slow
    overlapping holds                       0  must be 0
      incl. refused writes                  0
    token repeats / regressions             0  0 repeated, 0 regressed; must be 0
    stuck processes                         0  limit 10.1 s; must be 0
    overruns                                0  must be 0
    unexpected errors                       0  non-procsync exceptions; must be 0
    stale writes by holders not lost        0  must be 0
    harness errors                          0  must be 0
    chaos: 81 faults, 1420 holds, 0 overlapping holds, 0 token repeats, 0 stuck, 0 overruns: OK

Layout: :func:`worker_main` is one worker (started as ``python -c``, it reports each
attempt as a JSON line on stdout); :class:`Nemesis` injects the faults; :func:`run`
starts the servers, the proxies and the workers, watches their progress and kills only
the pids it started; :func:`analyse` turns the reports into the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent

LOCK_NAME = "chaos"
#: The resource's keys: the highest accepted token, the log of accepted writes, and
#: the count of refused ones.
FENCE_KEYS = ("chaos:top", "chaos:log", "chaos:refused")
#: Accept the write iff its token (a decimal string) is greater than the highest
#: accepted so far; compared as strings of digits (exact, no float rounding).
FENCE_LUA = """
local top = redis.call('GET', KEYS[1])
local tok = ARGV[1]
if top and (#tok < #top or (#tok == #top and tok <= top)) then
  redis.call('INCR', KEYS[3])
  return 0
end
redis.call('SET', KEYS[1], tok)
redis.call('RPUSH', KEYS[2], tok .. ' ' .. ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

#: The acquire timeouts a worker picks from.
TIMEOUTS = (0.5, 1.0, 2.0, 3.0)
#: How much later than its timeout an acquire may return before it is an overrun.
OVERRUN_SLACK = 0.5
#: Added to 3 x ttl + the longest fault: the longest a worker may go without progress.
STUCK_SLACK = 5.0
#: Critical sections: mostly a few milliseconds, now and then longer than the ttl.
SHORT_HOLD = 0.02
LONG_HOLD = (0.2, 1.5)
LONG_HOLD_SHARE = 0.1
#: Seconds a release may take (procsync's release budget) before it is reported slow.
RELEASE_BUDGET = 2.0
READY_TIMEOUT = 60.0


# -- the worker -----------------------------------------------------------------------


def _say(rec: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


def _exit_on_eof() -> None:
    """Never outlive the run: the parent holds our stdin; EOF means it went away."""
    while sys.stdin.readline():
        pass
    os._exit(3)


def _outcome(exc: BaseException) -> dict[str, Any]:
    from procsync.errors import ProcsyncError

    return {
        "o": type(exc).__name__,
        "cls": f"{type(exc).__module__}.{type(exc).__qualname__}",
        "unexpected": not isinstance(exc, ProcsyncError),
        "msg": str(exc)[:300],
    }


def worker_main(argv: list[str]) -> int:
    """One worker: ``argv[0]`` is its JSON configuration. Reports on stdout."""
    cfg = json.loads(argv[0])
    import redis

    import procsync

    w = int(cfg["worker"])
    side = int(cfg["side"])
    rng = random.Random(f"{cfg['seed']}:{w}")
    resource = redis.Redis(unix_socket_path=cfg["resource"], socket_timeout=10)
    fence = resource.register_script(FENCE_LUA)
    lock = procsync.Lock(cfg["lock"])
    _say({"k": "ready", "w": w, "pid": os.getpid()})
    line = sys.stdin.readline()
    if not line:
        return 3
    stop_at = float(line.split()[1])
    threading.Thread(target=_exit_on_eof, daemon=True).start()
    timeouts = [float(t) for t in cfg["timeouts"]]
    while time.monotonic() < stop_at:
        timeout = rng.choice(timeouts)
        if rng.random() < LONG_HOLD_SHARE:
            hold = rng.uniform(*LONG_HOLD)
        else:
            hold = rng.uniform(0.0, SHORT_HOLD)
        rec: dict[str, Any] = {"k": "a", "w": w, "side": side, "T": timeout}
        got = False
        t0 = time.monotonic()
        try:
            got = lock.acquire(timeout=timeout)
        except Exception as exc:
            rec.update(_outcome(exc))
        else:
            rec["o"] = "granted" if got else "busy"
        rec["t0"], rec["t1"] = t0, time.monotonic()
        if not got:
            _say(rec)
            time.sleep(rng.uniform(0.0, 0.01))
            continue
        _say({"k": "p", "w": w, "t1": rec["t1"]})  # progress, before the section
        rec["tok"] = str(lock.token)
        rec["lost0"] = lock.lost
        s = time.monotonic()
        rec["acc"] = int(fence(keys=list(FENCE_KEYS), args=[rec["tok"], w, repr(s)]))
        time.sleep(hold)
        e = time.monotonic()
        rec["lost"] = lock.lost  # read after e: the hold was good until at least e
        rec["s"], rec["e"], rec["hold"] = s, e, hold
        _say(rec)
        rel: dict[str, Any] = {"k": "r", "w": w, "o": "ok"}
        r0 = time.monotonic()
        try:
            lock.release()
        except Exception as exc:
            rel.update(_outcome(exc))
        rel["r0"], rel["r1"] = r0, time.monotonic()
        _say(rel)
    _say({"k": "bye", "w": w, "t": time.monotonic()})
    return 0


# -- the nemesis ------------------------------------------------------------------------


@dataclass
class Fault:
    kind: str
    start: float
    end: float
    planned: float
    detail: str = ""
    #: "server" (pause, crash), "all" (every proxy) or "side N" (proxy N only).
    where: str = "all"


#: Fault kinds and their weights (a crash is rare). All but the server's own faults
#: are network faults, applied to one side's proxy or to every proxy.
FAULT_WEIGHTS: dict[str, float] = {
    "blip": 3.0,
    "blackhole<ttl": 2.0,
    "blackhole>ttl": 2.0,
    "stall": 2.0,
    "latency": 2.0,
    "drop-reply": 2.0,
    "hold-reply": 1.5,
    "pause": 2.0,
    "crash-restart": 1.0,
}
SERVER_FAULTS = ("pause", "crash-restart")


class Nemesis(threading.Thread):
    """Injects one fault at a time until the quiet window; heals after each."""

    def __init__(
        self, rng: random.Random, proxies: list[Any], server: Any, ttl: float, quiet_at: float
    ):
        super().__init__(name="nemesis", daemon=True)
        self.rng = rng
        self.proxies = proxies
        self.server = server
        self.ttl = ttl
        self.quiet_at = quiet_at
        self.stop = threading.Event()
        self.faults: list[Fault] = []
        self.errors: list[str] = []
        self.current: Fault | None = None

    @property
    def longest(self) -> float:
        durations = [f.planned for f in self.faults]
        if self.current is not None:
            durations.append(self.current.planned)
        return max(durations, default=0.0)

    def _plan(self, kind: str) -> tuple[float, str]:
        """(seconds, detail) for a fault of ``kind``; crash-restart's is a guess."""
        rng, ttl = self.rng, self.ttl
        if kind == "blip":
            return rng.uniform(0.2, 1.5), ""
        if kind == "blackhole<ttl":
            return rng.uniform(0.1, 0.8) * ttl, ""
        if kind == "blackhole>ttl":
            return rng.uniform(1.2, 2.5) * ttl, ""
        if kind == "stall":
            return rng.uniform(0.2, 2.0), rng.choice(("up", "down"))
        if kind == "latency":
            return 1.0, f"{rng.uniform(0.05, 0.2) * 1000:.0f} ms"
        if kind in ("drop-reply", "hold-reply"):
            return rng.uniform(0.2, 1.5), ""
        if kind == "pause":
            return rng.uniform(0.2, 2.0), ""
        if kind == "crash-restart":
            return 1.0, ""
        raise ValueError(kind)

    def _where(self, kind: str) -> str:
        """Which proxies a network fault hits: every one, or one side's (half the
        time, when there are several: a partial partition, the others go on)."""
        if kind in SERVER_FAULTS:
            return "server"
        n = len(self.proxies)
        if n == 1 or self.rng.random() < 0.5:
            return "all"
        return f"side {self.rng.randrange(n)}"

    def _inject(self, kind: str, seconds: float, detail: str, where: str) -> None:
        srv = self.server
        if where == "all":
            targets = self.proxies
        elif where.startswith("side "):
            targets = [self.proxies[int(where.split()[1])]]
        else:
            targets = []
        for p in targets:
            if kind == "blip":
                p.reset()
                p.refuse()
            elif kind.startswith("blackhole"):
                p.blackhole()
            elif kind == "stall":
                p.stall(detail)
            elif kind == "latency":
                p.latency(float(detail.split()[0]) / 1000)
            elif kind == "drop-reply":
                p.drop_next_reply()
            elif kind == "hold-reply":
                p.hold_next_reply()
        if kind == "pause":
            srv.pause()
        elif kind == "crash-restart":
            srv.restart(hard=True)
            return  # the fault is the restart itself
        time.sleep(seconds)

    def heal(self) -> None:
        """End every fault: the proxies pass through, the server runs."""
        srv = self.server
        if srv.paused:
            srv.resume()
        if not srv.running:
            srv.start()
        for p in self.proxies:
            p.heal()

    def run(self) -> None:
        rng = self.rng
        kinds = list(FAULT_WEIGHTS)
        weights = [FAULT_WEIGHTS[k] for k in kinds]
        while not self.stop.wait(rng.uniform(0.5, 2.0)):
            kind = rng.choices(kinds, weights)[0]
            seconds, detail = self._plan(kind)
            where = self._where(kind)
            start = time.monotonic()
            if start + seconds + 0.5 > self.quiet_at:
                if self.quiet_at - start < 1.0:
                    break
                continue  # this one would reach into the quiet window: pick again
            fault = Fault(kind, start, start, seconds, detail, where)
            self.current = fault
            try:
                self._inject(kind, seconds, detail, where)
            except Exception as exc:
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
            finally:
                try:
                    self.heal()
                except Exception as exc:
                    self.errors.append(f"heal after {kind}: {type(exc).__name__}: {exc}")
                fault.end = time.monotonic()
                if kind == "crash-restart":
                    fault.planned = fault.end - fault.start
                self.faults.append(fault)
                self.current = None
            if self.errors:
                break


# -- the run -----------------------------------------------------------------------------


@dataclass
class Config:
    server: str = "valkey"
    workers: int = 8
    seconds: float = 180.0
    quiet: float = 10.0
    ttl: float = 1.0
    sides: int = 2
    seed: int = 0
    timeouts: tuple[float, ...] = TIMEOUTS
    verbose: bool = False


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen[bytes]
    err: IO[bytes]
    records: list[dict[str, Any]] = field(default_factory=list)
    noise: list[str] = field(default_factory=list)
    last_progress: float = 0.0
    stuck: list[str] = field(default_factory=list)
    exited_at: float | None = None
    said_bye: bool = False
    killed: bool = False

    def stderr_tail(self, n: int = 2000) -> str:
        with contextlib.suppress(OSError, ValueError):
            self.err.seek(0)
            return self.err.read().decode(errors="replace")[-n:]
        return ""


def log(msg: str) -> None:
    print(f"[chaos] {msg}", file=sys.stderr, flush=True)


def _reader(w: Worker, out: queue.Queue[tuple[int, dict[str, Any] | None]]) -> None:
    assert w.proc.stdout is not None
    for raw in w.proc.stdout:
        line = raw.decode(errors="replace").strip()
        try:
            rec = json.loads(line)
        except ValueError:
            w.noise.append(line)
            continue
        out.put((w.index, rec))
    out.put((w.index, None))


def _start_worker(i: int, cfg: Config, env: dict[str, str], resource_socket: str) -> Worker:
    wcfg = {
        "worker": i,
        "side": i % cfg.sides,
        "seed": cfg.seed,
        "lock": LOCK_NAME,
        "resource": resource_socket,
        "timeouts": list(cfg.timeouts),
    }
    err = tempfile.TemporaryFile()  # noqa: SIM115 (closed by run())
    code = (
        "import sys; from benchmarks.chaos import worker_main; sys.exit(worker_main(sys.argv[1:]))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(wcfg)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=err,
        env=env,
        cwd=ROOT,
    )
    return Worker(i, proc, err)


def _kill(w: Worker) -> None:
    """SIGKILL one worker we started, by its own pid, and reap it (bounded)."""
    if w.proc.poll() is None:
        w.proc.kill()
        w.killed = True
    with contextlib.suppress(subprocess.TimeoutExpired):
        w.proc.wait(timeout=10)


def run(cfg: Config) -> dict[str, Any]:
    """Run one chaos round; return the report (see :func:`analyse`)."""
    from procsync.testing import FaultProxy, ServerProcess

    rng = random.Random(cfg.seed)
    workers: list[Worker] = []
    with (
        ServerProcess(cfg.server) as server,
        ServerProcess(cfg.server) as resource,
        contextlib.ExitStack() as stack,
    ):
        proxies = [
            stack.enter_context(FaultProxy(server.socket_path, name=f"chaos-proxy-{n}"))
            for n in range(cfg.sides)
        ]
        env = dict(os.environ)
        env["PROCSYNC_TTL"] = f"{cfg.ttl:g}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        q: queue.Queue[tuple[int, dict[str, Any] | None]] = queue.Queue()
        nemesis: Nemesis | None = None
        try:
            for i in range(cfg.workers):
                env["PROCSYNC_URL"] = proxies[i % cfg.sides].url  # worker i is on side i % n
                w = _start_worker(i, cfg, env, str(resource.socket_path))
                workers.append(w)
                threading.Thread(target=_reader, args=(w, q), daemon=True).start()
            ready: set[int] = set()
            ready_by = time.monotonic() + READY_TIMEOUT
            while len(ready) < cfg.workers:
                try:
                    i, rec = q.get(timeout=max(0.01, ready_by - time.monotonic()))
                except queue.Empty:
                    raise RuntimeError(
                        f"only {len(ready)} of {cfg.workers} workers ready within "
                        f"{READY_TIMEOUT:g} s"
                    ) from None
                if rec is None:
                    raise RuntimeError(
                        f"worker {i} ended before it was ready:\n{workers[i].stderr_tail()}"
                    )
                if rec.get("k") == "ready":
                    ready.add(i)
            go_at = time.monotonic()
            stop_at = go_at + cfg.seconds
            quiet_at = stop_at - cfg.quiet
            for w in workers:
                w.last_progress = go_at
                assert w.proc.stdin is not None
                w.proc.stdin.write(f"go {stop_at!r}\n".encode())
                w.proc.stdin.flush()
            nemesis = Nemesis(rng, proxies, server, cfg.ttl, quiet_at)
            nemesis.start()
            log(
                f"{cfg.server}: {cfg.workers} workers, ttl {cfg.ttl:g} s, {cfg.seconds:g} s "
                f"(last {cfg.quiet:g} s quiet), seed {cfg.seed}"
            )
            _watch(cfg, workers, q, nemesis, go_at, stop_at)
        finally:
            if nemesis is not None:
                nemesis.stop.set()
                nemesis.join(timeout=15)
            for w in workers:
                _kill(w)  # only the ones still running; counted by _watch already
                with contextlib.suppress(OSError):
                    if w.proc.stdin is not None:
                        w.proc.stdin.close()
        assert nemesis is not None
        resource_log = [
            line.decode().split()
            for line in resource.client().lrange(FENCE_KEYS[1], 0, -1)  # type: ignore[union-attr]
        ]
    report = analyse(cfg, workers, nemesis, resource_log, go_at, quiet_at, stop_at)
    for w in workers:
        w.err.close()
    return report


def _watch(
    cfg: Config,
    workers: list[Worker],
    q: queue.Queue[tuple[int, dict[str, Any] | None]],
    nemesis: Nemesis,
    go_at: float,
    stop_at: float,
) -> None:
    """Collect reports until every worker has ended (or the grace is over); mark the
    stuck ones as they go."""
    grace = max(cfg.timeouts) + OVERRUN_SLACK + LONG_HOLD[1] + RELEASE_BUDGET + STUCK_SLACK
    hard_end = stop_at + grace
    ended: set[int] = set()
    next_tick = go_at + 15.0
    logged = 0
    while len(ended) < len(workers):
        now = time.monotonic()
        if now >= hard_end:
            for w in workers:
                if w.index not in ended:
                    w.stuck.append(f"still running {grace:.1f} s after the end of the run: killed")
                    _kill(w)
            break
        try:
            i, rec = q.get(timeout=0.25)
        except queue.Empty:
            pass
        else:
            w = workers[i]
            if rec is None:
                ended.add(i)
                w.exited_at = time.monotonic()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.proc.wait(timeout=5)
                if not w.said_bye:
                    w.stuck.append(f"ended early (status {w.proc.poll()}): {w.stderr_tail(600)!r}")
            else:
                kind = rec.get("k")
                if kind == "bye":
                    w.said_bye = True
                elif kind in ("a", "p"):
                    w.last_progress = max(w.last_progress, float(rec["t1"]))
                if kind in ("a", "r"):
                    w.records.append(rec)
        now = time.monotonic()
        limit = 3 * cfg.ttl + nemesis.longest + STUCK_SLACK
        for w in workers:
            if w.index in ended or w.stuck:
                continue
            gap = now - w.last_progress
            if gap > limit:
                last = w.records[-1] if w.records else None
                w.stuck.append(f"no completed acquire for {gap:.1f} s (> {limit:.1f}); last {last}")
                log(f"worker {w.index} (pid {w.proc.pid}) looks stuck: {w.stuck[-1]}")
        if now >= next_tick and now < stop_at:
            holds = sum(1 for w in workers for r in w.records if r.get("o") == "granted")
            log(f"t={now - go_at:5.0f} s  faults {len(nemesis.faults):4d}  holds {holds:6d}")
            next_tick += 15.0
        while cfg.verbose and logged < len(nemesis.faults):
            f = nemesis.faults[logged]
            log(f"t={f.start - go_at:7.2f} s  {_fault_text(f, go_at, times=False)}")
            logged += 1


# -- the analysis -----------------------------------------------------------------------


def _overlaps(sections: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Pairs of sections of different workers that overlap in time."""
    pairs = []
    active: list[dict[str, Any]] = []
    for g in sorted(sections, key=lambda r: r["s"]):
        active = [a for a in active if a["e"] > g["s"]]
        pairs.extend((a, g) for a in active if a["w"] != g["w"])
        active.append(g)
    return pairs


def _token_faults(grants: list[dict[str, Any]]) -> tuple[list[Any], list[Any]]:
    """(repeats, regressions). A repeat: a token granted more than once. A
    regression: a grant whose acquire began after another grant had been returned,
    with a lower token than that one."""
    by_token: dict[int, list[dict[str, Any]]] = {}
    for g in grants:
        by_token.setdefault(int(g["tok"]), []).append(g)
    repeats = [gs for gs in by_token.values() if len(gs) > 1]
    regressions = []
    returned = sorted(grants, key=lambda r: r["t1"])
    j, top, top_g = 0, -1, None
    for g in sorted(grants, key=lambda r: r["t0"]):
        while j < len(returned) and returned[j]["t1"] < g["t0"]:
            if int(returned[j]["tok"]) > top:
                top, top_g = int(returned[j]["tok"]), returned[j]
            j += 1
        if int(g["tok"]) < top:
            regressions.append((top_g, g))
    return repeats, regressions


def _brief(r: dict[str, Any], go_at: float) -> str:
    """One grant, for a report line: worker, token, times relative to the start."""
    parts = [f"worker {r['w']} (side {r.get('side', 0)}) token {r['tok']}"]
    parts.append(f"acquire {r['t0'] - go_at:.3f}->{r['t1'] - go_at:.3f} (T={r['T']:g})")
    if "s" in r:
        parts.append(f"section {r['s'] - go_at:.3f}->{r['e'] - go_at:.3f}")
        parts.append(f"accepted={bool(r['acc'])} lost={r['lost']} lost_at_grant={r['lost0']}")
    return " ".join(parts)


def _fault_text(f: Fault, go_at: float, times: bool = True) -> str:
    """``blackhole>ttl (side 1) 12.345->14.000``: a fault, its target and its times."""
    what = " ".join(x for x in (f.kind, f.detail, f"({f.where})") if x)
    if times:
        return f"{what} {f.start - go_at:.3f}->{f.end - go_at:.3f}"
    return f"{what} {f.end - f.start:.2f} s"


def _faults_near(faults: list[Fault], t0: float, t1: float, go_at: float) -> list[str]:
    """The faults from 3 s before ``t0`` to ``t1``."""
    return [_fault_text(f, go_at) for f in faults if f.end >= t0 - 3.0 and f.start <= t1]


def analyse(
    cfg: Config,
    workers: list[Worker],
    nemesis: Nemesis,
    resource_log: list[list[str]],
    go_at: float,
    quiet_at: float,
    stop_at: float,
) -> dict[str, Any]:
    """The counts (and, for each non-zero promised count, the cases) of one run."""
    attempts = [r for w in workers for r in w.records if r["k"] == "a"]
    releases = [r for w in workers for r in w.records if r["k"] == "r"]
    grants = [r for r in attempts if r["o"] == "granted"]
    sections = [g for g in grants if "s" in g]

    overlaps = _overlaps([g for g in sections if g["acc"] and not g["lost"]])
    overlaps_any = _overlaps([g for g in sections if not g["lost"]])
    stale_not_lost = [g for g in sections if not g["acc"] and not g["lost"]]
    repeats, regressions = _token_faults(grants)
    overruns = [r for r in attempts if r["t1"] - r["t0"] > r["T"] + OVERRUN_SLACK]

    stuck: dict[int, list[str]] = {}
    for w in workers:
        why = list(w.stuck)
        if not any(r["k"] == "a" and r["t0"] >= quiet_at for r in w.records) and not why:
            why.append("no attempt begun in the quiet window completed")
        if why:
            stuck[w.index] = why

    unexpected = [r for r in attempts + releases if r.get("unexpected")]
    unexpected_kinds = sorted({r["o"] for r in unexpected})
    acquire_outcomes = Counter(r["o"] for r in attempts)
    release_outcomes = Counter(r["o"] for r in releases)
    slow_releases = [r for r in releases if r["r1"] - r["r0"] > RELEASE_BUDGET + OVERRUN_SLACK]
    accepted_reported = {g["tok"] for g in sections if g["acc"]}
    accepted_resource = {parts[0] for parts in resource_log}

    def excess(r: dict[str, Any]) -> float:
        return float(r["t1"] - r["t0"] - r["T"])

    counts: dict[str, Any] = {
        "faults": len(nemesis.faults),
        "holds": len(grants),
        "overlapping_holds": len(overlaps),
        "token_repeats": len(repeats) + len(regressions),
        "stuck": len(stuck),
        "overruns": len(overruns),
        "unexpected_errors": len(unexpected),
        "stale_writes_not_lost": len(stale_not_lost),
        "harness_errors": len(nemesis.errors),
    }
    promised = ("overlapping_holds", "token_repeats", "stuck", "overruns")
    failing = (*promised, "unexpected_errors", "stale_writes_not_lost", "harness_errors")
    ok = all(counts[k] == 0 for k in failing)
    verdict = (
        f"chaos: {counts['faults']} faults, {counts['holds']} holds, "
        f"{counts['overlapping_holds']} overlapping holds, "
        f"{counts['token_repeats']} token repeats, {counts['stuck']} stuck, "
        f"{counts['overruns']} overruns"
    )
    for key, label in (
        ("unexpected_errors", "unexpected errors"),
        ("stale_writes_not_lost", "stale writes by holders not lost"),
        ("harness_errors", "harness errors"),
    ):
        if counts[key]:
            verdict += f", {counts[key]} {label}"
    verdict += ": OK" if ok else ": FAIL"

    cases: list[str] = []
    for a, b in overlaps[:10]:
        cases.append(f"overlapping holds: [{_brief(a, go_at)}] and [{_brief(b, go_at)}]")
        cases.append(
            "  faults near: " + "; ".join(_faults_near(nemesis.faults, a["t0"], b["e"], go_at))
        )
    for gs in repeats[:10]:
        cases.append("token repeat: " + " | ".join(_brief(g, go_at) for g in gs))
    for a, b in regressions[:10]:
        cases.append(f"token regression: [{_brief(a, go_at)}] then [{_brief(b, go_at)}]")
        cases.append(
            "  faults near: " + "; ".join(_faults_near(nemesis.faults, a["t0"], b["t1"], go_at))
        )
    for r in overruns[:10]:
        cases.append(
            f"overrun: worker {r['w']} acquire(timeout={r['T']:g}) took "
            f"{r['t1'] - r['t0']:.3f} s ({r['o']}) at {r['t0'] - go_at:.3f}; faults near: "
            + "; ".join(_faults_near(nemesis.faults, r["t0"], r["t1"], go_at))
        )
    for i, why in stuck.items():
        cases.append(f"stuck: worker {i} (pid {workers[i].proc.pid}): " + "; ".join(why))
    for g in stale_not_lost[:10]:
        cases.append(f"stale write by a holder not lost: [{_brief(g, go_at)}]")
        cases.append(
            "  faults near: " + "; ".join(_faults_near(nemesis.faults, g["t0"], g["e"], go_at))
        )
    for r in unexpected[:10]:
        call, t0, t1 = (
            ("acquire", r["t0"], r["t1"]) if r["k"] == "a" else ("release", r["r0"], r["r1"])
        )
        text = f"unexpected error: worker {r['w']} {call}: {r.get('cls', r['o'])}"
        text += f": {r['msg']}" if r.get("msg") else ""
        text += f" ({t0 - go_at:.3f}->{t1 - go_at:.3f}; faults near: "
        cases.append(text + "; ".join(_faults_near(nemesis.faults, t0, t1, go_at)) + ")")
    cases.extend(f"harness error: {e}" for e in nemesis.errors)
    if accepted_reported != accepted_resource:
        cases.append(
            f"note: the resource accepted {len(accepted_resource)} writes, the workers "
            f"reported {len(accepted_reported)} (differ by "
            f"{len(accepted_reported ^ accepted_resource)})"
        )

    return {
        "server": cfg.server,
        "seed": cfg.seed,
        "workers": cfg.workers,
        "sides": cfg.sides,
        "ttl": cfg.ttl,
        "seconds": cfg.seconds,
        "quiet": cfg.quiet,
        **counts,
        "token_repeated": len(repeats),
        "token_regressions": len(regressions),
        "faults_by_kind": dict(Counter(f.kind for f in nemesis.faults).most_common()),
        "faults_by_target": dict(Counter(f.where for f in nemesis.faults).most_common()),
        "longest_fault_s": round(nemesis.longest, 3),
        "stuck_limit_s": round(3 * cfg.ttl + nemesis.longest + STUCK_SLACK, 3),
        "attempts": len(attempts),
        "acquire_outcomes": dict(acquire_outcomes.most_common()),
        "release_outcomes": dict(release_outcomes.most_common()),
        "unexpected_kinds": unexpected_kinds,
        "accepted_writes": sum(1 for g in sections if g["acc"]),
        "refused_writes": sum(1 for g in sections if not g["acc"]),
        "lost_at_grant": sum(1 for g in sections if g["lost0"]),
        "lost_in_section": sum(1 for g in sections if g["lost"]),
        "overlapping_holds_any_write": len(overlaps_any),
        "max_acquire_over_timeout_s": round(max(map(excess, attempts), default=0.0), 3),
        "max_release_s": round(max((r["r1"] - r["r0"] for r in releases), default=0.0), 3),
        "slow_releases": len(slow_releases),
        "holds_in_quiet_window": sum(1 for g in grants if g["t0"] >= quiet_at),
        "workers_granted_in_quiet_window": len({g["w"] for g in grants if g["t0"] >= quiet_at}),
        "cases": cases,
        "ok": ok,
        "verdict": verdict,
    }


# -- the report ----------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The summary table and the verdict, as plain text."""
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: Any, note: str = "") -> None:
        rows.append((name, str(value), note))

    promise = "must be 0"

    def allowed(kind: str) -> str:
        if kind in ("granted", "busy", "ok"):
            return ""
        if kind in report["unexpected_kinds"]:
            return "NOT a procsync error: unexpected"
        return "allowed (procsync error)"

    row("server", report["server"], f"seed {report['seed']}")
    row(
        "workers",
        report["workers"],
        f"ttl {report['ttl']:g} s, on {report['sides']} proxies (sides) round-robin",
    )
    row("duration", f"{report['seconds']:g} s", f"last {report['quiet']:g} s without faults")
    row("faults injected", report["faults"], f"longest {report['longest_fault_s']:.2f} s")
    for kind, n in report["faults_by_kind"].items():
        row(f"  {kind}", n)
    row("  by target", "", ", ".join(f"{k}: {n}" for k, n in report["faults_by_target"].items()))
    row("acquire attempts", report["attempts"])
    for kind, n in report["acquire_outcomes"].items():
        row(f"  {kind}", n, allowed(kind))
    row("holds (grants)", report["holds"], f"{report['holds_in_quiet_window']} in the quiet window")
    row("  accepted writes", report["accepted_writes"])
    row("  refused writes", report["refused_writes"], "stale holders: fine")
    row("  lost at grant", report["lost_at_grant"])
    row("  lost by the end of the section", report["lost_in_section"])
    row("releases", sum(report["release_outcomes"].values()))
    for kind, n in report["release_outcomes"].items():
        row(f"  {kind}", n, allowed(kind))
    row(
        "max acquire time over T",
        f"{report['max_acquire_over_timeout_s']:.3f} s",
        f"overrun above {OVERRUN_SLACK:g} s",
    )
    row("max release time", f"{report['max_release_s']:.3f} s", f"{report['slow_releases']} slow")
    row("overlapping holds", report["overlapping_holds"], promise)
    row("  incl. refused writes", report["overlapping_holds_any_write"])
    row(
        "token repeats / regressions",
        report["token_repeats"],
        f"{report['token_repeated']} repeated, {report['token_regressions']} regressed; {promise}",
    )
    row("stuck processes", report["stuck"], f"limit {report['stuck_limit_s']:.1f} s; {promise}")
    row("overruns", report["overruns"], promise)
    row("unexpected errors", report["unexpected_errors"], "non-procsync exceptions; must be 0")
    row("stale writes by holders not lost", report["stale_writes_not_lost"], promise)
    row("harness errors", report["harness_errors"], promise)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}".rstrip() for a, b, c in rows]
    lines.extend(report["cases"])
    lines.append(report["verdict"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    ap.add_argument("--server", choices=("valkey", "redis"), default="valkey")
    ap.add_argument("--seconds", type=float, default=180.0, help="the whole run (180)")
    ap.add_argument(
        "--quiet", type=float, help="the fault-free end of the run (10, or half a shorter run)"
    )
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--ttl", type=float, default=1.0, help="PROCSYNC_TTL of the workers (1)")
    ap.add_argument(
        "--sides",
        type=int,
        default=2,
        help="proxies in front of the server, workers spread over them; a network fault "
        "hits one or all (2; 1: every fault cuts off everyone)",
    )
    ap.add_argument("--seed", type=int, help="the nemesis' and workers' seed (random)")
    ap.add_argument("--json", action="store_true", help="print the counts as JSON on stdout")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every fault")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.workers < 1 or args.ttl <= 0 or args.sides < 1:
        ap.error("--seconds, --workers, --ttl and --sides must be positive")
    quiet = args.quiet if args.quiet is not None else min(10.0, args.seconds / 2)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    cfg = Config(
        server=args.server,
        workers=args.workers,
        seconds=args.seconds,
        quiet=min(quiet, args.seconds),
        ttl=args.ttl,
        sides=min(args.sides, args.workers),
        seed=seed,
        verbose=args.verbose,
    )
    report = run(cfg)
    if args.json:
        print(render(report), file=sys.stderr)
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
