"""Fleet simulation: 100 machines x 100 processes report alive (the notes' 报活).

The notes ask how 10,000 processes on 100 machines report to a detection service
that they are alive, and why a daemon does it. This demo runs that fleet against
one server, on one machine: every simulated process is an asyncio task (in a few
worker processes) that opens, renews and closes a session through exactly the
``session.lua`` operations :class:`procsync.Session` uses — same script, same
arguments (:func:`procsync.session.open_args` / ``beat_args`` / ``close_args``),
renewal every ttl/3, each renewal also ending up to 16 expired sessions. Simulated
hosts are called ``machine-NN`` with boot ids no real host has, so no same-host
pid check ever touches them: deaths here are found by lease expiry alone, the
slow path.

A random subset is then "killed": its renewals stop without a close, as a SIGKILL
would. A watcher (:func:`procsync.registry.watch`) collects the ``died`` events and
the demo reports, per killed session, the delay from its last *confirmed* renewal
(server time, from the renewal's reply) to its ``died`` event (server time), plus
false deaths (a session that was not killed reported dead, or told "unknown" at a
renewal: must be 0), renewals per second, and the server's CPU share (``INFO cpu``
user+sys deltas over the wall time of the steady phase).

Renewals due together in one worker go out in one pipeline (``batch=True``, the
default; still one script call per session): what a per-host heartbeat agent would
do, and how the design reaches a million sessions (docs/liveness.md). With
``batch=False`` every renewal is its own round trip on a small pool of connections,
which is closer to what the server pays for 10,000 separate processes, but costs
the simulator ~120 µs of Python per renewal: at 10,000 sessions and ttl 5 s that is
more than a 2-core machine has to spare, and ``max_send_lag_s`` says so.

By default the fleet lives in a fresh namespace that is purged at the end: nothing
is left on the server and ``procsync ps`` of other namespaces never sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import select
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from typing import IO, Any, Final, final

__all__ = ["FleetConfig", "FleetResult", "run", "worker_main"]

#: Opens (and closes) in flight per worker.
OPEN_CONCURRENCY: Final = 64
#: How long the coordinator waits for a worker's answer before giving up on it.
WORKER_REPLY_S: Final = 120.0
_WORKER: Final = "from procsync.demos.fleet import worker_main; worker_main()"


@final
@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What to simulate."""

    machines: int = 100
    procs: int = 100
    """Processes per machine."""
    ttl: float = 5.0
    kill: int | None = None
    """Sessions to kill; default 1 % of them (at least 1)."""
    workers: int = 0
    """Worker processes; 0 means one per CPU, between 2 and 4."""
    steady: float | None = None
    """Seconds of steady renewals measured before the kills (default: one ttl)."""
    batch: bool = True
    """Pipeline each worker's due renewals (one script call per session still)."""
    connections: int = 8
    """Server connections per worker."""
    url: str | None = None
    namespace: str | None = None
    """Default: a fresh namespace, purged at the end."""
    seed: int | None = None

    def check(self) -> None:
        if not (1 <= self.machines <= 1000 and 1 <= self.procs <= 10_000):
            raise ValueError("machines must be 1..1000 and procs 1..10000")
        if self.machines * self.procs > 1_000_000:
            raise ValueError("at most 1,000,000 simulated sessions")
        if not (0.5 <= self.ttl <= 600):
            raise ValueError("ttl must be between 0.5 and 600 seconds")
        if self.kill is not None and not (0 <= self.kill <= self.machines * self.procs):
            raise ValueError("kill must be between 0 and the number of sessions")
        if self.workers < 0 or self.connections < 1:
            raise ValueError("workers must be >= 0 and connections >= 1")


@final
@dataclass(frozen=True, slots=True)
class FleetResult:
    """What one run measured. Delays in seconds, from the last confirmed renewal to
    the ``died`` event, both on the server's clock."""

    sessions: int
    killed: int
    detected: int
    false_deaths: int
    detect_p50_s: float | None
    detect_p99_s: float | None
    detect_max_s: float | None
    server_cpu_pct: float
    heartbeats_per_s: float
    ttl: float
    workers: int
    batch: bool
    measured_s: float
    """Length of the measured window (steady renewals, kills, detection)."""
    max_renewal_gap_s: float
    """Longest time between two confirmed renewals of one live session (< ttl)."""
    max_send_lag_s: float
    """Longest delay of a renewal behind its schedule in the simulator: a run is only
    meaningful while this stays well under 2/3 ttl (the simulator kept up)."""
    wall_s: float
    server: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[i]


# -- the worker (one process, thousands of tasks) ---------------------------------------------


class _Batcher:
    """Sends the calls queued during one loop iteration as one pipeline."""

    def __init__(self, client: Any, sha: str) -> None:
        self._client = client
        self._sha = sha
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, fut))
        self._wake.set()
        return await fut

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(0)  # let every due task queue its call
            batch, self._queue = self._queue, []
            pipe = self._client.pipeline(transaction=False)
            for keys, args, _ in batch:
                pipe.evalsha(self._sha, len(keys), *keys, *args)
            try:
                replies = await pipe.execute(raise_on_error=False)
            except Exception as exc:
                replies = [exc] * len(batch)
            for (_, _, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)


class _Sim:
    __slots__ = (
        "killed",
        "last_ok_ms",
        "machine",
        "max_gap_ms",
        "max_lag",
        "proc",
        "sid",
        "stopped",
        "unknown",
    )

    def __init__(self, sid: str, machine: int, proc: int) -> None:
        self.sid = sid
        self.machine = machine
        self.proc = proc
        self.last_ok_ms = 0
        self.max_gap_ms = 0
        self.max_lag = 0.0
        self.killed = False
        """Renewals stopped without a close (the simulated SIGKILL)."""
        self.stopped = False
        self.unknown = False


async def _aworker(cfg: dict[str, Any], sims: list[_Sim], out: IO[str]) -> None:
    import redis.asyncio

    from procsync._identity import Identity
    from procsync.backend.client import Backend
    from procsync.backend.scripts import script_source
    from procsync.session import beat_args, close_args, open_args, session_keys

    def say(*msg: Any) -> None:
        out.write(json.dumps(list(msg)) + "\n")
        out.flush()

    ttl = float(cfg["ttl"])
    period = ttl / 3.0
    names = Backend(cfg["url"], cfg["namespace"])  # key names only; it never connects
    keys = session_keys(names)
    pool = redis.asyncio.BlockingConnectionPool.from_url(
        cfg["url"], max_connections=int(cfg["connections"]), decode_responses=True, timeout=None
    )
    client = redis.asyncio.Redis(connection_pool=pool)
    source = script_source("session")
    sha = await client.script_load(source)
    script = client.register_script(source)
    batcher_task: asyncio.Task[None] | None = None
    call: Callable[[list[str], list[Any]], Awaitable[Any]]
    if cfg["batch"]:
        batcher = _Batcher(client, sha)
        batcher_task = asyncio.create_task(batcher.run())
        call = batcher.call
    else:

        async def call(k: list[str], a: list[Any]) -> Any:
            return await script(keys=k, args=a)

    gate = asyncio.Semaphore(OPEN_CONCURRENCY)
    beats = 0
    tasks: list[asyncio.Task[None]] = []

    async def open_one(s: _Sim) -> None:
        host = f"machine-{s.machine:02d}"
        ident = Identity(host, f"fleet-boot-{host}", 10_000 + s.proc, 0)
        async with gate:
            reply = await call(
                keys,
                open_args(names, s.sid, ttl, f"fleet/{host}/proc-{s.proc:02d}", ident, "sim", None),
            )
        s.last_ok_ms = int(reply[1])
        tasks.append(asyncio.create_task(renew(s)))  # renew from now on, like a Session

    async def renew(s: _Sim) -> None:
        nonlocal beats
        loop = asyncio.get_running_loop()
        await asyncio.sleep(random.uniform(0, period))  # spread the phases
        due = loop.time()
        while not (s.killed or s.stopped):
            s.max_lag = max(s.max_lag, loop.time() - due)
            reply = await call(keys, beat_args(names, s.sid, ttl))
            if reply[0] != "ok":
                s.unknown = True
                return
            now_ms = int(reply[1])
            s.max_gap_ms = max(s.max_gap_ms, now_ms - s.last_ok_ms)
            s.last_ok_ms = now_ms
            beats += 1
            due += period
            await asyncio.sleep(max(0.0, due - loop.time()))

    await asyncio.gather(*(open_one(s) for s in sims))
    say("opened", len(sims))
    by_sid = {s.sid: s for s in sims}
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        msg = json.loads(line) if line.strip() else ["stop"]
        if msg[0] == "mark":
            beats = 0
            say("marked")
        elif msg[0] == "kill":
            for sid in msg[1]:
                by_sid[sid].killed = True  # its in-flight renewal, if any, still counts
            say("killing", len(msg[1]))
        elif msg[0] == "stop":
            counted = beats
            for s in sims:
                s.stopped = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            live = [s for s in sims if not (s.unknown or s.killed)]

            async def close_one(s: _Sim) -> None:
                async with gate:
                    await call(keys, close_args(names, s.sid))

            await asyncio.gather(*(close_one(s) for s in live), return_exceptions=True)
            say(
                "done",
                {
                    "beats": counted,
                    "unknown": [s.sid for s in sims if s.unknown],
                    "last_ok_ms": {s.sid: s.last_ok_ms for s in sims},
                    "max_gap_ms": max((s.max_gap_ms for s in sims), default=0),
                    "max_lag": max((s.max_lag for s in sims), default=0.0),
                },
            )
            break
    if batcher_task is not None:
        batcher_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await batcher_task
    await client.aclose()
    await pool.disconnect()


def worker_main() -> None:
    """Entry point of a worker process: configuration and its sessions arrive as the
    first line of stdin, then ``mark`` / ``kill`` / ``stop`` lines."""
    cfg = json.loads(sys.stdin.readline())
    sims = [_Sim(sid, m, p) for sid, m, p in cfg.pop("sessions")]
    asyncio.run(_aworker(cfg, sims, sys.stdout))


# -- the coordinator -----------------------------------------------------------------------------


class _Worker:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=os.environ.copy(),
        )
        self.send(cfg)

    def send(self, msg: Any) -> None:
        if self.proc.stdin is None:  # pragma: no cover - PIPE
            raise RuntimeError("worker stdin missing")
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def expect(self, word: str, timeout: float = WORKER_REPLY_S) -> Any:
        out = self.proc.stdout
        if out is None:  # pragma: no cover - PIPE
            raise RuntimeError("worker stdout missing")
        ready, _, _ = select.select([out], [], [], timeout)
        line = out.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"fleet worker {self.proc.pid} said nothing ({word} expected); "
                f"exit status {self.proc.poll()}"
            )
        msg = json.loads(line)
        if msg[0] != word:
            raise RuntimeError(f"fleet worker said {msg[0]!r}, expected {word!r}")
        return msg[1] if len(msg) > 1 else None

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class _DeathLog:
    """Collects ``died`` events in a thread, bounded reads of at most 0.5 s."""

    def __init__(self, url: str, namespace: str, after: str) -> None:
        self.died: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._after = after
        self._url, self._ns = url, namespace
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="fleet-deaths", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from procsync import registry

        try:
            while not self._stop.is_set():
                for ev in registry.watch(
                    self._after, timeout=0.5, url=self._url, namespace=self._ns, check_pids=False
                ):
                    self._after = ev.id
                    if ev.type == "died":
                        with self.cond:
                            self.died.setdefault(ev.session_id, ev.at)
                            self.cond.notify_all()
        except BaseException as exc:  # reported by the coordinator
            self.error = exc
            with self.cond:
                self.cond.notify_all()

    def wait_for(self, sids: set[str], timeout: float) -> None:
        end = time.monotonic() + timeout
        with self.cond:
            while not sids <= self.died.keys() and self.error is None:
                left = end - time.monotonic()
                if left <= 0:
                    return
                self.cond.wait(left)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def _server_cpu(client: Any) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run(cfg: FleetConfig, progress: Callable[[str], None] | None = None) -> FleetResult:
    """Run the simulation and measure it (blocks for about steady + 2 ttl + setup)."""
    import redis

    from procsync import registry
    from procsync.backend.client import get_backend, resolve_url

    cfg.check()
    say = progress or (lambda _msg: None)
    t_start = time.monotonic()
    rng = random.Random(cfg.seed)
    url = resolve_url(cfg.url)
    fresh = cfg.namespace is None
    ns = cfg.namespace or f"fleet-{secrets.token_hex(4)}"
    backend = get_backend(url, ns)
    backend.cmd()  # server checks
    server = f"{backend.server_info.get('product', '?')} {backend.server_info.get('version', '?')}"
    n = cfg.machines * cfg.procs
    kill = cfg.kill if cfg.kill is not None else max(1, n // 100)
    nworkers = cfg.workers or max(2, min(4, os.cpu_count() or 2))
    nworkers = min(nworkers, n)
    sessions = [
        (secrets.token_hex(16), m, p)
        for m in range(1, cfg.machines + 1)
        for p in range(1, cfg.procs + 1)
    ]
    shares: list[list[tuple[str, int, int]]] = [sessions[i::nworkers] for i in range(nworkers)]
    deaths = _DeathLog(url, ns, registry.position(url=url, namespace=ns))
    workers: list[_Worker] = []
    raw = redis.Redis.from_url(url, decode_responses=True)
    try:
        say(f"{n:,} sessions on {cfg.machines} machines, ttl {cfg.ttl:g}s, {nworkers} workers")
        for share in shares:
            workers.append(
                _Worker(
                    {
                        "url": url,
                        "namespace": ns,
                        "ttl": cfg.ttl,
                        "batch": cfg.batch,
                        "connections": cfg.connections,
                        "sessions": share,
                    }
                )
            )
        for w in workers:
            w.expect("opened")
        say(f"all {n:,} sessions opened; renewing every {cfg.ttl / 3:.2f}s")
        time.sleep(cfg.ttl / 3.0)  # every session has settled into its own phase
        cpu0, t0 = _server_cpu(raw), time.monotonic()
        for w in workers:
            w.send(["mark"])
        for w in workers:
            w.expect("marked")
        steady = cfg.steady if cfg.steady is not None else cfg.ttl
        time.sleep(steady)
        victims = rng.sample([s[0] for s in sessions], kill)
        chosen = set(victims)
        for w, share in zip(workers, shares, strict=True):
            w.send(["kill", [sid for sid, _, _ in share if sid in chosen]])
        for w in workers:
            w.expect("killing")
        say(f"killed {kill:,} sessions (renewals stopped, no close); waiting for the reports")
        deaths.wait_for(chosen, cfg.ttl + 5.0)
        if deaths.error is not None:
            raise deaths.error
        cpu1, t1 = _server_cpu(raw), time.monotonic()
        with deaths.cond:
            died = dict(deaths.died)  # later deaths are of sessions we stop renewing
        for w in workers:
            w.send(["stop"])
        stats = [w.expect("done") for w in workers]
        say("closed the survivors")
    finally:
        for w in workers:
            w.close()
        deaths.stop()
        if fresh:
            with contextlib.suppress(Exception):
                registry.purge(0.0, url=url, namespace=ns)
        raw.close()
    last_ok: dict[str, int] = {}
    unknown: set[str] = set()
    for st in stats:
        last_ok.update(st["last_ok_ms"])
        unknown.update(st["unknown"])
    delays = sorted(died[sid] - last_ok[sid] / 1000.0 for sid in chosen if sid in died)
    false = {sid for sid in died if sid not in chosen} | (unknown - chosen)
    window = t1 - t0
    return FleetResult(
        sessions=n,
        killed=kill,
        detected=len(delays),
        false_deaths=len(false),
        detect_p50_s=_round(_quantile(delays, 0.50)),
        detect_p99_s=_round(_quantile(delays, 0.99)),
        detect_max_s=_round(delays[-1] if delays else None),
        server_cpu_pct=round(100.0 * (cpu1 - cpu0) / window, 1),
        heartbeats_per_s=round(sum(int(st["beats"]) for st in stats) / window, 1),
        ttl=cfg.ttl,
        workers=nworkers,
        batch=cfg.batch,
        measured_s=round(window, 2),
        max_renewal_gap_s=round(max(int(st["max_gap_ms"]) for st in stats) / 1000.0, 3),
        max_send_lag_s=round(max(float(st["max_lag"]) for st in stats), 3),
        wall_s=round(time.monotonic() - t_start, 1),
        server=server,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
