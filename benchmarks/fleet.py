"""Heartbeat cost: many sessions renewing their leases against one server.

The load is ``procsync demo fleet``'s own simulation (:func:`procsync.demos.fleet.run`):
simulated processes in a few worker processes open, renew every ttl/3 and close
sessions with exactly the ``session.lua`` calls :class:`procsync.Session` makes; a
few are then killed (renewals stop, no close) and it reports how long after its last
confirmed renewal each was reported ``died``, false deaths, renewals per second and
the server's CPU share. The benchmark runs it with ``batch=False`` — one script call
per renewal on its own, as separate processes each renewing their own session would
send them — and adds what it does not measure: the latency of a renewal while the
fleet runs, from a probe session in the same server that renews every 20 ms through
``Backend.call`` (client time included), and the server's own µs per EVALSHA.

If the fleet demo cannot be imported (an older procsync), a minimal driver of the
same ``open`` / ``beat`` calls in this process stands in (:func:`_minimal`), and the
record says so.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

__all__ = ["run_fleet"]

clock = time.perf_counter_ns
PROBE_EVERY = 0.02


def _probe(url: str, ttl: float, stop: threading.Event, out: list[int]) -> None:
    """Open one session in its own namespace and renew it every PROBE_EVERY seconds,
    timing each renewal."""
    from procsync._identity import current_identity
    from procsync.backend.client import Backend
    from procsync.session import REAP_BATCH

    b = Backend(url, f"bench-probe-{uuid.uuid4().hex[:6]}")
    keys = [b.sessions_key, b.gone_key]
    sid = uuid.uuid4().hex
    ident = current_identity()
    ttl_ms = int(ttl * 1000)
    b.call(
        "session",
        keys,
        [
            b.prefix,
            "open",
            sid,
            ttl_ms,
            "bench-probe",
            ident.host,
            ident.boot_id,
            ident.pid,
            ident.start_ticks,
            "thread",
            0,
        ],
    )
    try:
        while not stop.wait(PROBE_EVERY):
            t0 = clock()
            b.call("session", keys, [b.prefix, "beat", sid, ttl_ms, REAP_BATCH])
            out.append(clock() - t0)
    finally:
        b.call("session", keys, [b.prefix, "close", sid])
        b.close()


def run_fleet(srv: Any, n: int, ttl: float, steady: float, kill: int) -> dict[str, Any]:
    from benchmarks.run import summarize

    r = srv.client(decode_responses=True)
    lat: list[int] = []
    stop = threading.Event()
    probe = threading.Thread(target=_probe, args=(srv.url, ttl, stop, lat), daemon=True)
    r.config_resetstat()
    probe.start()
    try:
        try:
            from procsync.demos.fleet import FleetConfig
            from procsync.demos.fleet import run as fleet_run
        except ImportError:
            res = _minimal(srv, n, ttl, steady, kill)
        else:
            machines = max(1, n // 100)
            cfg = FleetConfig(
                machines=machines,
                procs=n // machines,
                ttl=ttl,
                kill=kill,
                steady=steady,
                batch=False,
                url=srv.url,
                seed=1,
            )
            res = {"driver": "procsync.demos.fleet.run (batch=False)", **fleet_run(cfg).as_dict()}
    finally:
        stop.set()
        probe.join(10)
    evalsha = r.info("commandstats").get("cmdstat_evalsha", {})
    res["renewal_latency"] = summarize(lat)
    res["server_usec_per_evalsha"] = evalsha.get("usec_per_call")
    r.close()
    return res


def _minimal(srv: Any, n: int, ttl: float, steady: float, kill: int) -> dict[str, Any]:
    """Stand-in for the fleet demo: open ``n`` sessions, renew each every ttl/3 (spread
    evenly), stop ``kill`` of them after ``steady`` seconds, watch for ``died``."""
    import psutil

    from procsync.backend.client import Backend
    from procsync.session import REAP_BATCH

    b = Backend(srv.url, f"bench-fleet-{uuid.uuid4().hex[:8]}")
    keys = [b.sessions_key, b.gone_key]
    ttl_ms = int(ttl * 1000)
    sids = [uuid.uuid4().hex for _ in range(n)]
    r = srv.client(decode_responses=True)
    for i, sid in enumerate(sids):
        b.call(
            "session",
            keys,
            [
                b.prefix,
                "open",
                sid,
                ttl_ms,
                f"fleet-{i}",
                f"machine-{i % 100}",
                f"fleet-boot-{i % 100}",
                10000 + i,
                0,
                "sim",
                0,
            ],
        )
    period = ttl / 3.0
    victims = set(random.Random(1).sample(range(n), min(kill, n)))
    last_ok: dict[int, int] = {}
    lag_max = 0.0
    unknown = 0
    seconds = steady + ttl + 1.5
    proc = psutil.Process(srv.pid)
    cpu0 = sum(proc.cpu_times()[:2])
    start = time.monotonic()
    sent = beats = 0
    while (now := time.monotonic()) < start + seconds:
        due = int((now - start) / period * n)
        if sent >= due:
            time.sleep(0.002)
            continue
        while sent < due:
            i = sent % n
            due_at = start + sent * period / n
            sent += 1
            if i in victims and due_at - start >= steady:
                continue
            lag_max = max(lag_max, time.monotonic() - due_at)
            reply = b.call("session", keys, [b.prefix, "beat", sids[i], ttl_ms, REAP_BATCH])
            beats += 1
            if reply[0] != "ok":
                unknown += 1
            else:
                last_ok[i] = int(reply[1])
    wall = time.monotonic() - start
    cpu = sum(proc.cpu_times()[:2]) - cpu0
    died = {
        f["sid"]: int(f["at"])
        for _, f in r.xrange(b.prefix + "events", "-", "+")
        if f.get("type") == "died"
    }
    chosen = {sids[i]: i for i in victims}
    delays = sorted(
        (died[s] - last_ok[i]) / 1000 for s, i in chosen.items() if s in died and i in last_ok
    )
    r.close()
    return {
        "driver": "benchmarks.fleet._minimal",
        "sessions": n,
        "killed": len(victims),
        "detected": len(delays),
        "false_deaths": sum(1 for s in died if s not in chosen) + unknown,
        "detect_p50_s": delays[len(delays) // 2] if delays else None,
        "detect_max_s": delays[-1] if delays else None,
        "server_cpu_pct": round(100 * cpu / wall, 1),
        "heartbeats_per_s": round(beats / wall, 1),
        "ttl": ttl,
        "max_send_lag_s": round(lag_max, 3),
        "measured_s": round(wall, 2),
    }
