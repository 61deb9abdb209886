"""Where the time of an uncontended ``Lock.acquire()`` + ``release()`` goes.

``python -m benchmarks.profile`` (``--server redis`` for Redis; ``--quick``) starts a
private server and measures, in one process and interleaved batch by batch so that
machine noise hits every layer alike:

layers      the same two round trips built up one layer at a time: raw socket PING,
            redis-py PING (the floor of DESIGN §6), EVALSHA of a trivial script, the
            real permits.lua acquire/release sent with ``execute_command``, through
            redis-py's ``Script`` objects, through ``Backend.call``, and the public
            ``Lock``. Each difference is the cost of one layer.
server      the server's own time per call, from SLOWLOG with a threshold of 0 (the
            acquire and release ops apart) and ``INFO commandstats``: PING, a trivial
            script, the trivial script after the shared library (_lib.lua), the lock ops.
python      procsync's own Python per pair with the server replaced by canned replies.
cprofile    the top functions of the real loop by own time.
pyinstrument, py-spy
            call trees of the real loop (py-spy with ``--idle``, so time blocked in
            the socket shows), written to benchmarks/results/profile/.

Prints a summary and writes ``benchmarks/results/profile/profile-<server>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "profile"
clock = time.perf_counter_ns


def _batches(fns: dict[str, Any], rounds: int, per: int) -> dict[str, dict[str, float]]:
    res: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            for _ in range(5):
                f()
            t0 = clock()
            for _ in range(per):
                f()
            res[k].append((clock() - t0) / per / 1000)
    return {
        k: {"median_us": round(statistics.median(v), 2), "min_us": round(min(v), 2)}
        for k, v in res.items()
    }


def _usec(
    r: Any, fn: Any, n: int, command: str = "evalsha", exclude: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Server µs per call of ``command`` (INFO commandstats) over ``n`` runs of ``fn``,
    with the commands run inside the script alongside (``exclude``: plain commands
    ``fn`` also sends, not run by the script)."""
    for _ in range(20):
        fn()
    r.config_resetstat()
    for _ in range(n):
        fn()
    st = r.info("commandstats")
    main = st.get(f"cmdstat_{command}", {})
    inner = {
        k.removeprefix("cmdstat_"): {
            "per_call": round(v["calls"] / n, 2),
            "usec_per_call": v["usec_per_call"],
        }
        for k, v in st.items()
        if k != f"cmdstat_{command}"
        and "config" not in k
        and v["calls"] >= n // 2
        and k.removeprefix("cmdstat_") not in exclude
    }
    inner_us = sum(v["per_call"] * v["usec_per_call"] for v in inner.values())
    return {
        "usec_per_call": main.get("usec_per_call"),
        "commands_inside": inner,
        "usec_inside": round(inner_us, 2),
    }


def permits_release_step(ref: Any, sid: str) -> Any:
    """The Call that ``procsync.core.permits.release`` makes first for one permit held."""
    from procsync.core import permits

    op = permits.release(ref, _View(sid), 1, True)
    return next(op)


class _View:
    def __init__(self, sid: str) -> None:
        self.id = sid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--server", default="valkey")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-spy", action="store_true", help="skip py-spy")
    args = ap.parse_args(argv)
    rounds, per = (10, 50) if args.quick else (40, 100)

    from procsync.backend.scripts import script_source
    from procsync.testing import ServerProcess

    OUT.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "server": args.server,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    with ServerProcess(args.server) as srv:
        out["server_version"] = srv.version()
        os.environ["PROCSYNC_URL"] = srv.url
        import procsync
        from procsync.backend.client import Backend

        lk = procsync.Lock("profile")
        lk.acquire()
        lk.release()
        b = lk.ref.backend
        c = b.cmd()
        sess = procsync.current_session()
        ref = lk.ref
        # Keys and arguments exactly as the library builds them (PermitsRef.call).
        acq_step = ref.call("acquire", sess.id, sess.id + "/1", 1)
        rel_step = permits_release_step(ref, sess.id)
        keys = list(acq_step.keys)
        acq_args = list(acq_step.args)
        rel_args = list(rel_step.args)
        permits = b._scripts["permits"]
        sha = permits.sha
        r = srv.client(decode_responses=True)
        lib = script_source("permits").split("-- ==== permits.lua ====")[0]
        trivial = r.script_load("return {'ok', 1}")
        lib_trivial = r.script_load(lib + "\nreturn {'ok', 1}")

        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(srv.socket_path))
        ping_bytes = b"*1\r\n$4\r\nPING\r\n"

        def raw_ping2() -> None:
            for _ in range(2):
                raw.sendall(ping_bytes)
                raw.recv(64)

        def ping2() -> None:
            c.ping()
            c.ping()

        def trivial2() -> None:
            c.execute_command("EVALSHA", trivial, 0)
            c.execute_command("EVALSHA", trivial, 0)

        def exec_pair() -> None:
            c.execute_command("EVALSHA", sha, 4, *keys, *acq_args)
            c.execute_command("EVALSHA", sha, 4, *keys, *rel_args)

        def script_pair() -> None:
            permits(keys=keys, args=acq_args, client=c)
            permits(keys=keys, args=rel_args, client=c)

        def call_pair() -> None:
            b.call("permits", keys, acq_args)
            b.call("permits", keys, rel_args)

        def lock_pair() -> None:
            lk.acquire()
            lk.release()

        layers = {
            "raw socket: 2 PING": raw_ping2,
            "redis-py: 2 PING (the floor)": ping2,
            "2 EVALSHA of a trivial script": trivial2,
            "2 EVALSHA permits.lua (execute_command)": exec_pair,
            "  via redis-py Script objects": script_pair,
            "  via Backend.call": call_pair,
            "Lock.acquire() + release()": lock_pair,
        }
        out["layers"] = _batches(layers, rounds, per)

        # -- server time per call -------------------------------------------------------
        # Each script op alone: the other half of the pair is replaced by the plain
        # commands that leave the same state (the uncontended fast paths).
        n = 300 if args.quick else 2000
        tok = [0]

        def acquire_only() -> None:
            c.execute_command("EVALSHA", sha, 4, *keys, *acq_args)
            c.delete(ref.key)
            c.srem(b.prefix + "h:" + sess.id, ref.key)  # the fast release path's effects

        def release_only() -> None:
            tok[0] += 1
            c.hset(
                ref.key,
                mapping={
                    "kind": "lock",
                    "init": 1,
                    "v": 0,
                    "t": tok[0],
                    "g": 1,
                    "r": 0,
                    "h:" + sess.id: 1,
                },
            )
            c.sadd(b.prefix + "h:" + sess.id, ref.key)
            c.execute_command("EVALSHA", sha, 4, *keys, *rel_args)

        server = {
            "PING": _usec(r, lambda: c.ping(), n, "ping"),
            "EVALSHA trivial script": _usec(r, lambda: c.execute_command("EVALSHA", trivial, 0), n),
            "EVALSHA _lib.lua + trivial": _usec(
                r, lambda: c.execute_command("EVALSHA", lib_trivial, 0), n
            ),
            "EVALSHA permits acquire (free lock)": _usec(
                r, acquire_only, n, exclude=("del", "srem")
            ),
            "EVALSHA permits release (nobody waits)": _usec(
                r, release_only, n, exclude=("hset", "sadd")
            ),
        }
        out["server_usec"] = server
        r.config_resetstat()
        for _ in range(n):
            lock_pair()
        st = r.info("commandstats")
        out["commandstats_lock_pair"] = {
            k.removeprefix("cmdstat_"): {
                "calls_per_pair": round(v["calls"] / n, 2),
                "usec_per_call": v["usec_per_call"],
            }
            for k, v in st.items()
            if v["calls"] >= n // 2 and "config" not in k
        }

        # -- procsync's Python alone ------------------------------------------------------
        real_call = Backend.call

        def canned(self: Any, script: str, k: Any, a: Any) -> list[Any]:
            return ["ok", 12345] if a[1] == "acquire" else ["ok", 0]

        Backend.call = canned  # type: ignore[method-assign]
        try:
            out["python_only"] = _batches(
                {"Lock pair, server replaced by canned replies": lock_pair}, rounds, per * 5
            )
        finally:
            Backend.call = real_call  # type: ignore[method-assign]

        # -- cProfile ------------------------------------------------------------------
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(n):
            lock_pair()
        pr.disable()
        buf = io.StringIO()
        pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(30)
        (OUT / f"cprofile-{args.server}.txt").write_text(buf.getvalue())
        stats = pstats.Stats(pr)
        top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:15]  # type: ignore[attr-defined]
        out["cprofile_top_tottime_us_per_pair"] = [
            {
                "function": f"{Path(fn[0]).name}:{fn[1]}({fn[2]})",
                "us_per_pair": round(v[2] / n * 1e6, 2),
            }
            for fn, v in top
        ]

        # -- pyinstrument -----------------------------------------------------------------
        try:
            from pyinstrument import Profiler

            prof = Profiler(interval=0.0001)
            prof.start()
            for _ in range(n):
                lock_pair()
            prof.stop()
            (OUT / f"pyinstrument-{args.server}.txt").write_text(
                prof.output_text(unicode=False, color=False, show_all=False)
            )
            out["pyinstrument"] = str((OUT / f"pyinstrument-{args.server}.txt").relative_to(ROOT))
        except ImportError:
            out["pyinstrument"] = "not installed (pip install pyinstrument)"

        # -- py-spy ---------------------------------------------------------------------
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not args.no_spy and os.path.exists(spy):
            # The raw stacks run to megabytes: kept out of the repository, summarized.
            raw_path = Path(tempfile.mkdtemp(prefix="procsync-spy-")) / "py-spy.txt"
            code = (
                "import os, time, procsync\n"
                "lk = procsync.Lock('profile-spy')\n"
                "end = time.monotonic() + 4\n"
                "while time.monotonic() < end:\n"
                "    lk.acquire(); lk.release()\n"
            )
            env = dict(os.environ, PROCSYNC_URL=srv.url)
            cp = subprocess.run(
                [
                    spy,
                    "record",
                    "--idle",
                    "-r",
                    "2000",
                    "-f",
                    "raw",
                    "-o",
                    str(raw_path),
                    "--",
                    sys.executable,
                    "-c",
                    code,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if raw_path.exists():
                out["py_spy"] = _spy_summary(raw_path)
                shutil.rmtree(raw_path.parent, ignore_errors=True)
            else:
                out["py_spy"] = f"py-spy failed: {cp.stderr[-300:]}"
        procsync.session.close_all()
        raw.close()
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    path = OUT / f"profile-{args.server}.json"
    path.write_text(json.dumps(out, indent=1))
    print(render(out))
    print(
        f"\nwritten: {path.relative_to(ROOT)} (+ cProfile, pyinstrument, py-spy files beside)",
        file=sys.stderr,
    )
    return 0


def _spy_summary(path: Path) -> dict[str, Any]:
    """Share of samples per leaf frame and per inclusive frame of procsync/redis-py."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit() or "sync/lock.py" not in stack:
            continue  # only the samples inside Lock.acquire / Lock.release
        k = int(count)
        total += k
        frames = stack.split(";")
        leaf[frames[-1]] += k
        seen = set()
        for f in frames:
            name = f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
            if name not in seen:
                seen.add(name)
                incl[name] += k
    return {
        "samples": total,
        "leaf_top": [(f, round(c / total, 3)) for f, c in leaf.most_common(12)],
        "inclusive_top": [(f, round(c / total, 3)) for f, c in incl.most_common(25)],
    }


def render(out: dict[str, Any]) -> str:
    lines = [
        f"# Uncontended Lock pair on {out['server']} {out.get('server_version')}",
        f"load average {out['loadavg_start']} -> {out['loadavg_end']}",
        "",
        "| layer (2 round trips) | median µs | min µs | + over previous (median) |",
        "|---|---|---|---|",
    ]
    prev = None
    for k, v in out["layers"].items():
        d = "" if prev is None else f"{v['median_us'] - prev:+.1f}"
        lines.append(f"| {k} | {v['median_us']:.1f} | {v['min_us']:.1f} | {d} |")
        prev = v["median_us"]
    lines += ["", "Server time per call (INFO commandstats; µs):", ""]
    for k, v in out["server_usec"].items():
        lines.append(
            f"* {k}: {v['usec_per_call']} µs, of which {v['usec_inside']} µs in "
            f"{sum(x['per_call'] for x in v['commands_inside'].values()):g} commands"
        )
    lines += ["", "Commands per Lock pair (INFO commandstats; inside scripts included):", ""]
    for k, v in out["commandstats_lock_pair"].items():
        lines.append(f"* {k}: {v['calls_per_pair']} x {v['usec_per_call']} µs")
    po = out["python_only"]
    lines += [
        "",
        "procsync's Python per pair, server replaced by canned replies: "
        + ", ".join(f"{v['median_us']:.1f} µs (min {v['min_us']:.1f})" for v in po.values()),
        "",
        "cProfile, own time per pair:",
        "",
    ]
    for e in out["cprofile_top_tottime_us_per_pair"]:
        lines.append(f"* {e['us_per_pair']:6.2f} µs  {e['function']}")
    spy = out.get("py_spy")
    if isinstance(spy, dict):
        lines += [
            "",
            f"py-spy --idle ({spy['samples']} samples inside Lock.acquire/release), "
            "inclusive share:",
            "",
        ]
        for f, s in spy["inclusive_top"]:
            lines.append(f"* {s:6.1%}  {f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
