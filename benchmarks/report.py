"""The results table: from a run's JSON record to Markdown (terminal and docs).

``python -m benchmarks.report benchmarks/results/full-....json`` prints the tables
of a saved run; ``--docs`` also rewrites the results part of docs/benchmarks.md
(between its ``<!-- results:begin -->`` / ``<!-- results:end -->`` markers; the
hand-written analysis around them stays).

Ratios are of medians (and of p99s after the slash), always within one run and one
server: "x redis-py" divides by redis-py's Lock on the same server, "x Manager" by
the Manager proxy (measured on the first server of the run).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.impls import BY_KEY

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def _label(key: str) -> str:
    i = BY_KEY.get(key)
    return i.label if i else key


def _us(x: float | None) -> str:
    if x is None:
        return "–"
    if x >= 100_000:
        return f"{x / 1e6:.2f} s"
    if x >= 10_000:
        return f"{x / 1000:.1f} ms"
    if x >= 1000:
        return f"{x / 1000:.2f} ms"
    if x < 10:
        return f"{x:.1f} µs"
    return f"{x:.0f} µs"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    r = a / b
    return f"{r:.2f}" if r < 10 else f"{r:.0f}"


def _pair(a: dict[str, Any] | None, b: dict[str, Any] | None) -> str:
    if not a or not b or "median_us" not in a or "median_us" not in b:
        return "–"
    return f"{_ratio(a['median_us'], b['median_us'])} / {_ratio(a['p99_us'], b['p99_us'])}"


def _table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _get(rec: dict[str, Any], server: str, scen: str) -> dict[str, Any]:
    return rec["servers"].get(server, {}).get("scenarios", {}).get(scen, {})


def _primary(rec: dict[str, Any]) -> str:
    return next(iter(rec["servers"]))


def _merged(rec: dict[str, Any], server: str, scen: str) -> dict[str, Any]:
    """Results of ``scen`` on ``server``, plus the off-server contenders of the first
    server (they run once)."""
    out = dict(_get(rec, _primary(rec), scen))
    out = {k: v for k, v in out.items() if not BY_KEY.get(k) or not BY_KEY[k].on_server}
    out.update(_get(rec, server, scen))
    order = {k: n for n, k in enumerate(BY_KEY)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], 99)))


def _err(v: dict[str, Any]) -> str | None:
    if "error" in v:
        return "error: " + v["error"].strip().splitlines()[-1][:80]
    return None


def _floor(v: dict[str, Any], ping: dict[str, Any] | None) -> dict[str, Any] | None:
    """Two PINGs through the contender's client: sampled between its pairs when the
    record has it, else twice the separate PING scenario."""
    if v.get("floor"):
        return dict(v["floor"])
    if ping and "median_us" in ping:
        return {"median_us": 2 * ping["median_us"], "p99_us": 2 * ping["p99_us"]}
    return None


def latency_table(rec: dict[str, Any], server: str, scen: str, floor: bool) -> str:
    res = _merged(rec, server, scen)
    ref = res.get("redis-py")
    man = _get(rec, _primary(rec), scen).get("manager")
    pings = _get(rec, server, "ping")
    head = ["contender", "median", "p99", "× redis-py", "× Manager"]
    if floor:
        head += [
            "× floor (2 PINGs sampled between pairs)",
            "EVALSHA / pair (server time)",
            "other commands / pair (incl. in scripts)",
        ]
    rows = []
    for key, v in res.items():
        e = _err(v)
        if e:
            rows.append([_label(key), e] + [""] * (len(head) - 2))
            continue
        row = [
            _label(key),
            _us(v.get("median_us")),
            _us(v.get("p99_us")),
            _pair(v, ref),
            _pair(v, man),
        ]
        if floor:
            fl = _floor(v, pings.get(key) or pings.get("redis-py"))
            if not BY_KEY[key].on_server:
                fl = None
            row.append(_pair(v, fl) if fl else "–")
            calls = v.get("server_calls_per_pair") or {}
            usec = v.get("server_usec_per_call") or {}
            if calls:
                ev = calls.get("evalsha", 0)
                cell = f"{ev:g}" + (f" ({usec['evalsha']:g} µs each)" if ev else "")
                inner = sum(n for c, n in calls.items() if c != "evalsha")
                row += [cell, f"{inner:g}"]
            else:
                row += ["–", "–"]
        rows.append(row)
    return _table(head, rows)


def ping_table(rec: dict[str, Any], server: str) -> str:
    rows = []
    for key, v in _get(rec, server, "ping").items():
        client = {
            "procsync": "procsync's sync client (`Backend.ping`: the connection `call()` uses)",
            "procsync-aio": (
                "procsync's asyncio client (`Backend.aping`: the connections `acall()` uses)"
            ),
            "redis-py": "a plain redis.Redis (hiredis)",
        }.get(key, key)
        rows.append([client, _us(v.get("median_us")), _us(v.get("p99_us"))])
    return _table(["PING through", "median", "p99"], rows)


def contended_table(rec: dict[str, Any], server: str, scen: str) -> str:
    res = _merged(rec, server, scen)
    ref = res.get("redis-py")
    man = _get(rec, _primary(rec), scen).get("manager")
    head = [
        "contender",
        "ops/s",
        "× redis-py",
        "× Manager",
        "wait median",
        "wait p99",
        "longest wait",
        "first done at",
        "lost updates",
    ]
    sem = scen == "semaphore"
    if sem:
        head = [h for h in head if h not in ("× redis-py",)]
        head[-1] = "count check"
        head.append("most inside")
    rows = []
    for key, v in res.items():
        e = _err(v)
        if e:
            rows.append([_label(key), e] + [""] * (len(head) - 2))
            continue
        tp = v.get("throughput_per_s")
        row = [_label(key), f"{tp:,.0f}" if tp else "–"]
        if not sem:
            row.append(_ratio(tp, ref.get("throughput_per_s") if ref else None))
        row += [
            _ratio(tp, man.get("throughput_per_s") if man else None),
            _us(v.get("median_us")),
            _us(v.get("p99_us")),
            _us(v.get("max_us")),
            f"{v['first_finish_fraction']:.0%}" + (" (capped)" if v.get("capped") else ""),
        ]
        if sem:
            ok = v["lost_updates"] == 0
            row.append("ok" if ok else f"FAIL ({v['lost_updates']} off)")
            viol = v.get("violations", 0)
            row.append(f"{v.get('most_inside')}" + (f" ({viol} violations)" if viol else ""))
        else:
            lost = v["lost_updates"]
            row.append("0" if lost == 0 else f"**{lost} (FAIL)**")
        rows.append(row)
    return _table(head, rows)


def event_table(rec: dict[str, Any], server: str, scen: str) -> str:
    res = _merged(rec, server, scen)
    mpv = _get(rec, _primary(rec), scen).get("mp")
    man = _get(rec, _primary(rec), scen).get("manager")
    head = [
        "contender",
        "last awake (median of rounds)",
        "last awake (worst)",
        "each waiter median",
        "each waiter p99",
        "× multiprocessing",
        "× Manager",
        "set() call",
    ]
    rows = []
    for key, v in res.items():
        e = _err(v)
        if e:
            rows.append([_label(key), e] + [""] * (len(head) - 2))
            continue
        last = v["last"]
        rows.append(
            [
                _label(key),
                _us(last.get("median_us")),
                _us(last.get("max_us")),
                _us(v["each"].get("median_us")),
                _us(v["each"].get("p99_us")),
                _ratio(last.get("median_us"), mpv["last"].get("median_us") if mpv else None),
                _ratio(last.get("median_us"), man["last"].get("median_us") if man else None),
                _us(v["set_call"].get("median_us")),
            ]
        )
    return _table(head, rows)


def recovery_table(rec: dict[str, Any], server: str) -> str:
    res = _merged(rec, server, "recovery")
    rows = []
    for key, v in res.items():
        e = _err(v)
        if e:
            rows.append([_label(key), e, "", ""])
            continue
        if v.get("n"):
            t = f"{_us(v['median_us'])} (worst {_us(v['max_us'])})"
        else:
            t = f"never (not within {v['cap_s']:g} s)"
        if v.get("n") and v.get("not_within_cap"):
            t += f", {v['not_within_cap']} not within {v['cap_s']:g} s"
        rows.append([_label(key), t, str(v.get("rounds")), _how(key, rec)])
    return _table(["contender", "killed holder → next waiter holds", "rounds", "how"], rows)


def _how(key: str, rec: dict[str, Any]) -> str:
    ttl = rec["meta"]["config"]["recovery_ttl"]
    return {
        "procsync": "same-host waiter sees the pid gone (pidfd), reaps the session",
        "procsync-aio": "same as procsync",
        "mp": "POSIX semaphore: nobody frees it",
        "manager": "the manager's threading.Lock: nobody frees it",
        "filelock": "kernel drops the flock; waiter polls every 50 ms",
        "portalocker": "kernel drops the flock; waiter retries every 0.25 s",
        "redis-py": f"lease (timeout={ttl:g} s) runs out; waiter polls every 0.1 s",
        "redis-lock": f"lease (expire={ttl:g} s) runs out; the waiter wakes at its BLPOP "
        "timeout (= expire) — unless that is ≥ redis-py 8's default 5 s socket timeout: "
        "then the client times out, re-sends the BLPOP, and never wakes",
        "redis-lock-renew": f"renewal thread dies with it; lease ({ttl:g} s) runs out; "
        "same BLPOP timeout as above",
        "pottery": f"lease (auto_release_time={ttl:g} s) runs out; retries every ≤0.2 s",
    }.get(key, "")


def fleet_table(rec: dict[str, Any], server: str) -> str:
    res = _get(rec, server, "fleet")
    rows = []
    for n, v in res.items():
        if "error" in v:
            rows.append([f"{int(n):,}", "error: " + v["error"][-100:]] + [""] * 7)
            continue
        lat = v.get("renewal_latency", {})
        death = "–"
        if v.get("detected"):
            death = f"{v['detect_p50_s']:.2f} s (worst {v['detect_max_s']:.2f} s)"
        missed = v["killed"] - v["detected"]
        rows.append(
            [
                f"{int(n):,}",
                f"{v['heartbeats_per_s']:,.0f}",
                f"{v['server_cpu_pct']:.1f} %",
                _us(lat.get("median_us")),
                _us(lat.get("p99_us")),
                f"{v['server_usec_per_evalsha']} µs" if v.get("server_usec_per_evalsha") else "–",
                f"{v['detected']}/{v['killed']}" + (f" ({missed} missed)" if missed else ""),
                death,
                str(v["false_deaths"]),
                f"{v['max_send_lag_s'] * 1000:.0f} ms",
            ]
        )
    return _table(
        [
            "sessions",
            "renewals/s",
            "server CPU (of one core)",
            "renewal median",
            "renewal p99",
            "server µs / EVALSHA",
            "deaths reported",
            "reported after last renewal",
            "false deaths",
            "simulator lag (worst)",
        ],
        rows,
    )


# -- DESIGN §6 targets -------------------------------------------------------------------


def targets(rec: dict[str, Any], server: str) -> list[tuple[str, str, str, bool | None]]:
    """(target, front, measured, met?) for each §6 target on ``server``."""
    out: list[tuple[str, str, str, bool | None]] = []
    unc = _get(rec, server, "uncontended")
    pings = _get(rec, server, "ping")
    for front in ("procsync", "procsync-aio"):
        v, ref = unc.get(front), unc.get("redis-py")
        fl = _floor(v, pings.get(front)) if v else None
        if v and ref and fl and "median_us" in v and "median_us" in ref:
            floor = fl["median_us"]
            calls = v.get("server_calls_per_pair", {})
            evals = calls.get("evalsha", 0)
            ok = v["median_us"] <= ref["median_us"] and v["median_us"] <= 1.1 * floor
            out.append(
                (
                    "Uncontended: 2 round trips, ≤ redis-py, ≤ 1.1× two PINGs",
                    front,
                    f"{_us(v['median_us'])} vs redis-py {_us(ref['median_us'])} "
                    f"({v['median_us'] / ref['median_us']:.2f}×), "
                    f"vs 2 PINGs between its pairs {_us(floor)} "
                    f"({v['median_us'] / floor:.2f}×); {evals:g} EVALSHA per pair",
                    ok,
                )
            )
    ho = _merged(rec, server, "handoff")
    for front in ("procsync", "procsync-aio"):
        v, man, prl = ho.get(front), ho.get("manager"), ho.get("redis-lock")
        if v and man and "median_us" in v and "median_us" in man:
            ok = v["median_us"] <= 1.25 * man["median_us"]
            txt = (
                f"{_us(v['median_us'])} vs Manager {_us(man['median_us'])} "
                f"({v['median_us'] / man['median_us']:.2f}×)"
            )
            if prl and "median_us" in prl:
                txt += f", python-redis-lock {_us(prl['median_us'])}"
                ok = ok and v["median_us"] < 0.5 * prl["median_us"]
            out.append(("Hand-off ≤ 1.25× Manager, well under python-redis-lock", front, txt, ok))
    for p in (4, 8):
        res = _merged(rec, server, f"contended_{p}")
        ref = res.get("redis-py")
        for front in ("procsync", "procsync-aio"):
            v = res.get(front)
            if not v or "throughput_per_s" not in v or not ref or "throughput_per_s" not in ref:
                continue
            fair = v["first_finish_fraction"] >= 0.9
            wait = v["max_us"] < 20_000
            tp = v["throughput_per_s"] >= 0.8 * ref["throughput_per_s"]
            out.append(
                (
                    f"Contended x{p}: first done ≥ 90 %, longest wait < 20 ms, ≥ 0.8× redis-py "
                    "throughput, no lost update",
                    front,
                    f"first done at {v['first_finish_fraction']:.0%}, longest wait "
                    f"{_us(v['max_us'])}, {v['throughput_per_s']:,.0f}/s = "
                    f"{v['throughput_per_s'] / ref['throughput_per_s']:.2f}× redis-py "
                    f"({ref['throughput_per_s']:,.0f}/s, longest wait {_us(ref['max_us'])}), "
                    f"lost {v['lost_updates']}",
                    fair and wait and tp and v["lost_updates"] == 0,
                )
            )
    ev = _merged(rec, server, "event_200")
    mpv = ev.get("mp")
    for front in ("procsync", "procsync-aio"):
        v = ev.get(front)
        if v and mpv and "last" in v and "last" in mpv:
            a, b = v["last"]["median_us"], mpv["last"]["median_us"]
            out.append(
                (
                    "Event.set() → last of 200 waiters awake ≤ 2× multiprocessing.Event",
                    front,
                    f"{_us(a)} vs {_us(b)} ({a / b:.2f}×)",
                    a <= 2 * b,
                )
            )
    rc = _get(rec, server, "recovery")
    for front in ("procsync", "procsync-aio"):
        v = rc.get(front)
        if v and v.get("n"):
            ok = v["max_us"] <= 50_000 and not v.get("not_within_cap")
            out.append(
                (
                    "SIGKILLed holder → same-host waiter holds it within 50 ms",
                    front,
                    f"median {_us(v['median_us'])}, worst {_us(v['max_us'])} over {v['n']} kills",
                    ok,
                )
            )
    fl = _get(rec, server, "fleet").get("10000")
    if fl and "error" not in fl:
        limit = fl["ttl"] + 1.0
        ok = (
            fl["server_cpu_pct"] < 25.0
            and fl["false_deaths"] == 0
            and fl["detected"] == fl["killed"]
            and (fl.get("detect_max_s") or 0) <= limit
        )
        worst = fl.get("detect_max_s")
        out.append(
            (
                "10,000 sessions: server < 25 % of a core, deaths within ttl + 1 s, no false death",
                "procsync",
                f"server CPU {fl['server_cpu_pct']:.1f} % at "
                f"{fl['heartbeats_per_s']:,.0f} renewals/s; {fl['detected']}/"
                f"{fl['killed']} deaths reported, worst {worst} s after the last "
                f"renewal (ttl {fl['ttl']:g} s); false deaths {fl['false_deaths']}",
                ok,
            )
        )
    return out


def targets_table(rec: dict[str, Any], server: str) -> str:
    rows = [
        [t, f, m, "**met**" if ok else ("**not met**" if ok is False else "?")]
        for t, f, m, ok in targets(rec, server)
    ]
    return _table(["DESIGN §6 target", "front", "measured", ""], rows)


# -- whole documents ------------------------------------------------------------------------


def render(rec: dict[str, Any], *, heading: str = "##") -> str:
    meta = rec["meta"]
    m = meta["machine"]
    cfg = meta["config"]
    h3 = heading + "#"
    parts = [
        f"{heading} Results of {meta['date']} ({meta['mode']} run, {meta['seconds']:.0f} s)",
        "",
        f"* Machine: {m['cpu']}, {m['cores']} cores, {m['memory']}, Linux {m['kernel']}, "
        f"Python {m['python']}; load average {', '.join(map(str, meta['loadavg_start']))} "
        f"at the start, {', '.join(map(str, meta.get('loadavg_end', [])))} at the end.",
        "* Servers: "
        + ", ".join(f"{k} {v['version']}" for k, v in rec["servers"].items())
        + ", each private, on a Unix socket, started by the run.",
        "* Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        f"* Command: `{meta['command']}` (git {meta.get('git')}); lease of every "
        f"lease-based lock {cfg['ttl']:g} s ({cfg['recovery_ttl']:g} s in the recovery "
        "scenario).",
        "",
    ]
    for server in rec["servers"]:
        sc = rec["servers"][server]["scenarios"]
        ver = rec["servers"][server]["version"]
        parts += [f"{h3} On {server} {ver}", ""]
        if "ping" in sc:
            parts += [
                "Round-trip floor (a bare PING through the same client):",
                "",
                ping_table(rec, server),
                "",
            ]
        if "uncontended" in sc:
            parts += [
                "**Uncontended acquire + release** (one process, nobody else):",
                "",
                latency_table(rec, server, "uncontended", True),
                "",
            ]
        if "handoff" in sc:
            parts += [
                "**Hand-off**: from `release()` in one process to the blocked "
                "`acquire()` returning in another:",
                "",
                latency_table(rec, server, "handoff", False),
                "",
            ]
        for p in cfg["contended_procs"]:
            if f"contended_{p}" in sc:
                parts += [
                    f"**Contended, {p} processes**, each doing "
                    f"{cfg['contended_total'] // p} locked GET+SET increments of one "
                    "counter in the same server (waits are acquire() call to return; "
                    '"first done at" is when the first process finished its share, '
                    "as a fraction of the run):",
                    "",
                    contended_table(rec, server, f"contended_{p}"),
                    "",
                ]
        if "semaphore" in sc:
            parts += [
                f"**Semaphore({cfg['sem_value']}), {cfg['sem_procs']} processes** "
                "(INCR an inside-count on entry — above "
                f"{cfg['sem_value']} is a violation —, INCR the total, DECR on exit; the "
                "count check compares the total with the operations done):",
                "",
                contended_table(rec, server, "semaphore"),
                "",
            ]
        for n in cfg["event_sizes"]:
            if f"event_{n}" in sc:
                parts += [
                    f"**Event fan-out, {n} waiting processes**: from `set()` being "
                    f"called until the last waiter's `wait()` returns "
                    f"({cfg['event_rounds']} rounds):",
                    "",
                    event_table(rec, server, f"event_{n}"),
                    "",
                ]
        if "recovery" in sc:
            parts += [
                "**Recovery**: the holder is SIGKILLed; time until the waiter (same "
                "host) holds the lock:",
                "",
                recovery_table(rec, server),
                "",
            ]
        if "fleet" in sc:
            drv = next(iter(sc["fleet"].values()), {}).get("driver", "?")
            parts += [
                "**Heartbeat cost**: simulated sessions renewing every ttl/3 "
                f"(ttl {cfg['fleet_ttl']:g} s) through session.lua, driven by `{drv}`; "
                f"{cfg['fleet_kill']} of them stop renewing (killed) after "
                f"{cfg['fleet_steady']:g} s of steady renewals. Renewal latency is a "
                "probe session's renewal every 20 ms, client time included:",
                "",
                fleet_table(rec, server),
                "",
            ]
        parts += [f"**DESIGN §6 targets on {server}:**", "", targets_table(rec, server), ""]
    return "\n".join(parts)


def render_terminal(rec: dict[str, Any]) -> str:
    return render(rec, heading="#")


_SKELETON = f"""# Benchmarks

procsync against every peer, side by side, in one run on the same private servers.
See the analysis below the results for where the time goes.

How to run: `make bench` (about ten minutes; rewrites the results below and saves the
raw record in `benchmarks/results/`) or `make bench-quick` (a one-minute smoke run;
prints, saves, leaves this page alone).

{BEGIN}
{END}
"""


def update_docs(rec: dict[str, Any], path: Path | None = None) -> None:
    text = DOCS.read_text(encoding="utf-8") if DOCS.exists() else _SKELETON
    if BEGIN not in text or END not in text:
        text = text.rstrip() + "\n\n" + BEGIN + "\n" + END + "\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = render(rec)
    if path is not None:
        rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        body += f"\nRaw record: [`{rel}`](../{rel}).\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(head + BEGIN + "\n" + body + "\n" + END + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    docs = "--docs" in args
    files = [a for a in args if a != "--docs"]
    if not files:
        results = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
        if not results:
            print("no results yet: run `make bench`", file=sys.stderr)
            return 1
        files = [str(results[-1])]
    path = Path(files[0]).resolve()
    rec = json.loads(path.read_text())
    print(render_terminal(rec))
    if docs:
        update_docs(rec, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
