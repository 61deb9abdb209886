"""The lesson demos, run the way a user runs them: ``python -m procsync demo NAME --json``
as a real command with real processes, against the test servers (``PROCSYNC_URL`` from
the ``url`` fixture, so once per server kind; never the user's embedded server), with
small sizes. Each checks ``ok`` and the demo's figures. Then each checker is fed a
corrupted history, to prove it can fail (issue 5).

The ticket rush has its own file, ``test_demo_tickets.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from procsync.cli import main
from procsync.demos import CATALOGUE, daemon, isolation, ktv, server, traffic
from procsync.registry import LivenessEvent

DEMO_TIMEOUT = 100.0

pytestmark = pytest.mark.timeout(150)


def _demo(url: str, name: str, *args: str) -> tuple[int, dict[str, Any]]:
    """Run ``procsync demo NAME --json ARGS`` against ``url``; (exit status, the object)."""
    env = dict(os.environ, PROCSYNC_URL=url)
    proc = subprocess.run(
        [sys.executable, "-m", "procsync", "demo", name, "--json", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON object, got:\n{proc.stdout}"
    data: dict[str, Any] = json.loads(lines[0])
    assert isinstance(data.get("ok"), bool), data
    assert data["ok"] == (proc.returncode == 0), (proc.returncode, data, proc.stderr)
    return proc.returncode, data


def _assert_ok(rc: int, d: dict[str, Any]) -> None:
    assert d["ok"] is True, d["failures"]
    assert d["failures"] == []
    assert rc == 0


#: What a demo may leave on the server: the liveness registry (ended sessions are
#: listed for an hour) and the fencing counter. Its locks, events, values and logs go.
REGISTRY_KEYS = ("s:", "h:", "sessions", "events", "gone", "fence", "epoch", "procsync:born")


def _assert_nothing_left(url: str) -> None:
    with redis.Redis.from_url(url, decode_responses=True) as r:
        keys = r.keys("*")
    left = [k for k in keys if not k.split("}:", 1)[-1].startswith(REGISTRY_KEYS)]
    assert left == [], f"the demo left state on the server: {left}"


# -- the list ------------------------------------------------------------------------------


def test_demo_lists_every_demo_one_line_each() -> None:
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    names = [line.split()[0] for line in lines]
    assert names == [info.name for info in CATALOGUE]
    for wanted in ("isolation", "daemon", "server", "tickets", "ktv", "traffic"):
        assert wanted in names


@pytest.mark.parametrize("name", ["isolation", "ktv", "traffic", "daemon", "server"])
def test_each_demo_has_help_with_json(name: str) -> None:
    result = CliRunner().invoke(main, ["demo", name, "--help"])
    assert result.exit_code == 0, result.output
    assert "--json" in result.output
    assert "--timeout" in result.output


# -- isolation -------------------------------------------------------------------------------


def test_isolation_multiprocessing_prints_start_procsync_prints_zero(url: str) -> None:
    rc, d = _demo(url, "isolation", "--children", "20")
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    assert d["children"] == d["start"] == 20
    assert d["multiprocessing_printed"] == 20  # each child decremented its own copy
    assert d["procsync_printed"] == 0  # the one n in the server
    assert d["lost_updates"] == 0
    assert [leg["failed_children"] for leg in d["legs"]] == [0, 0]


def _leg(library: str, printed: int | None, failed: int = 0) -> isolation.Leg:
    expected = 100 if library == "multiprocessing" else 0
    return isolation.Leg(library, 100, printed, expected, 100, failed, 0.1)


def test_isolation_checker_fails_on_wrong_results() -> None:
    good_mp, good_ps = _leg("multiprocessing", 100), _leg("procsync", 0)
    assert isolation.check(good_mp, good_ps) == ()
    # Memory shared by accident: the multiprocessing parent saw a child's change.
    assert "reached the parent" in isolation.check(_leg("multiprocessing", 99), good_ps)[0]
    # Lost updates: the procsync parent did not see every decrement.
    assert "3 decrement(s) lost" in isolation.check(good_mp, _leg("procsync", 3))[0]
    assert "did not finish" in isolation.check(good_mp, _leg("procsync", None))[0]
    assert "children failed" in isolation.check(good_mp, _leg("procsync", 0, failed=2))[0]


# -- ktv --------------------------------------------------------------------------------------


def _ktv_steps(timeline: list[dict[str, Any]]) -> list[ktv.KtvStep]:
    return [ktv.KtvStep(s["at"], s["person"], s["what"]) for s in timeline]


def test_ktv_never_more_than_three_inside(url: str) -> None:
    rc, d = _demo(url, "ktv", "--people", "6", "--speed", "5", "--seed", "1")
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    assert (d["people"], d["room"]) == (6, 3)
    assert d["entered"] == d["left"] == 6
    assert d["max_inside"] == 3  # full, never over
    assert d["overfull_moments"] == 0
    assert d["waited"] >= 3  # six people, three keys
    assert d["clock"] == "server"
    steps = _ktv_steps(d["timeline"])
    assert len(steps) == 12
    assert ktv.check(steps, 3, 6).ok
    # Corrupt the record: the first person who had to wait for a key goes in the
    # moment the room is full, before anyone came out. The checker must see four inside.
    inside: set[int] = set()
    full = 0
    while True:
        step = steps[full]
        if step.what == "in":
            inside.add(step.person)
        else:
            inside.discard(step.person)
        if len(inside) == 3:
            break
        full += 1
    later = next(j for j in range(full + 1, len(steps)) if steps[j].what == "in")
    corrupted = [*steps[: full + 1], steps[later], *steps[full + 1 : later], *steps[later + 1 :]]
    verdict = ktv.check(corrupted, 3, 6)
    assert not verdict.ok
    assert verdict.max_inside == 4
    assert verdict.overfull_moments == 1
    assert any("4 inside a room for 3" in f for f in verdict.failures)


def test_ktv_checker_fails_on_corrupted_timelines() -> None:
    def s(at: float, person: int, what: str) -> ktv.KtvStep:
        return ktv.KtvStep(at, person, what)

    good = [s(0, 0, "in"), s(0, 1, "in"), s(1, 0, "out"), s(1, 2, "in"), s(2, 1, "out")]
    good += [s(2, 2, "out")]
    assert ktv.check(good, 2, 3).ok
    assert ktv.check(good, 2, 3).max_inside == 2
    four = [s(0, p, "in") for p in range(4)] + [s(1, p, "out") for p in range(4)]
    assert "4 inside a room for 3" in ktv.check(four, 3, 4).failures[0]
    assert not ktv.check(good[:-1], 2, 3).ok  # person 2 never came out
    assert not ktv.check([s(0, 0, "out"), *good], 2, 3).ok  # out before in
    twice = [*good, s(3, 0, "in"), s(4, 0, "out")]
    assert any("second time" in f for f in ktv.check(twice, 2, 3).failures)
    one_at_a_time = [s(i, i, w) for i in range(3) for w in ("in", "out")]
    assert any("never held 2" in f for f in ktv.check(one_at_a_time, 2, 3).failures)


# -- traffic -------------------------------------------------------------------------------------


def _history(d: dict[str, Any]) -> list[traffic.TrafficRecord]:
    return [
        traffic.TrafficRecord(h["at"], h["who"], h["kind"], h["what"], h.get("woke"))
        for h in d["history"]
    ]


def test_traffic_no_car_passes_on_red(url: str) -> None:
    rc, d = _demo(url, "traffic", "--vehicles", "8", "--period", "0.6", "--seed", "2")
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    assert d["vehicles"] == d["passed"] == 8
    assert d["cars"] + d["police_cars"] == 8
    assert d["passed_on_red"] == 0
    assert d["police_on_red"] + d["police_on_green"] == d["police_cars"]
    if d["min_police_red_wait_s"] is not None:
        assert d["min_police_red_wait_s"] >= 0.5 - 0.001
    assert d["light_changes"] >= 1
    assert d["clock"] == "server"
    records = _history(d)
    kinds = {r.who: r.kind for r in records if r.who != traffic.LIGHT}
    assert traffic.check(records, kinds, 0.5).ok
    # Corrupt the record: the light never turned green. Whoever passed without a
    # timed-out police wait now passed on red.
    no_green = [r for r in records if not (r.who == traffic.LIGHT and r.what == "green")]
    verdict = traffic.check(no_green, kinds, 0.5)
    assert not verdict.ok
    assert verdict.passed_on_red == 8 - d["police_on_red"]


def _red_then_green() -> list[traffic.TrafficRecord]:
    L, R = traffic.LIGHT, traffic.TrafficRecord
    return [
        R(0.0, L, "light", "red"),
        R(0.1, 0, "car", "look"),
        R(0.1, 0, "car", "wait"),
        R(0.1, 1, "police_car", "look"),
        R(0.1, 1, "police_car", "wait"),
        R(0.6, 1, "police_car", "pass", woke=False),
        R(1.0, L, "light", "green"),
        R(1.0, 0, "car", "look"),
        R(1.0, 0, "car", "pass"),
    ]


def test_traffic_checker_fails_on_corrupted_histories() -> None:
    kinds = {0: "car", 1: "police_car"}
    good = _red_then_green()
    v = traffic.check(good, kinds, 0.5)
    assert v.ok, v.failures
    assert (v.cars_waited, v.police_on_red, v.min_police_red_wait_s) == (1, 1, 0.5)
    # The car crosses before the green.
    early = [*good[:5], good[7], good[8], good[5], good[6]]
    assert any("car 0 passed on red" in f for f in traffic.check(early, kinds, 0.5).failures)
    # The police car gives up on the red after 0.3 s, not 0.5 s.
    short = [replace(r, at=0.4) if r.what == "pass" and r.who == 1 else r for r in good]
    assert any("waiting only 0.300 s" in f for f in traffic.check(short, kinds, 0.5).failures)
    # The police car claims a green woke it, on red.
    woken = [replace(r, woke=True) if r.what == "pass" and r.who == 1 else r for r in good]
    assert any("never came" in f for f in traffic.check(woken, kinds, 0.5).failures)
    # A vehicle that never passes; a light that stays green twice.
    assert any("never passed" in f for f in traffic.check(good[:-1], kinds, 0.5).failures)
    twice = [*good, traffic.TrafficRecord(2.0, traffic.LIGHT, "light", "green")]
    assert any("twice in a row" in f for f in traffic.check(twice, kinds, 0.5).failures)


# -- daemon --------------------------------------------------------------------------------------


def test_daemon_reports_alive_and_the_registry_records_the_kill(url: str) -> None:
    rc, d = _demo(url, "daemon", "--workers", "2", "--ttl", "1.5", "--observe", "0.5")
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    assert d["workers"] == 4  # two reporters, then the stuck pair
    assert d["killed"] == d["deaths_recorded"] == 1
    assert d["death_report_ms"] is not None
    assert d["death_report_ms"] <= 1000 * (d["ttl_s"] + 1)  # on one host: milliseconds
    assert d["heartbeat_exit_ms"] is not None
    assert d["false_deaths"] == 0
    assert d["survivors_left"] == 2  # the other reporter and the stuck process
    # The lesson: with the main thread stuck in C holding the GIL, a heartbeat thread
    # cannot report (its session is declared dead); a heartbeat process can.
    assert d["thread_heartbeat_died"] is True
    assert d["process_heartbeat_survived"] is True
    reporters = {r["name"].rsplit("/", 1)[-1]: r for r in d["reporters"]}
    assert reporters[d["victim"].rsplit("/", 1)[-1]]["events"] == ["joined", "died"]
    assert reporters["stuck-thread"]["events"] == ["joined", "died"]
    assert reporters["stuck-process"]["events"] == ["joined", "left"]
    assert reporters["stuck-process"]["heartbeat_pid"] is not None


def _report(name: str, **kw: Any) -> daemon.Report:
    base: dict[str, Any] = {
        "name": name,
        "pid": 100,
        "session": f"sid-{name}",
        "heartbeat": "process",
        "heartbeat_pid": 101,
        "heartbeat_parent": 100,
    }
    return daemon.Report(**{**base, **kw})


def _event(kind: str, name: str, at: float = 1000.0) -> LivenessEvent:
    return LivenessEvent(f"{at}-0", kind, f"sid-{name}", at, name, "host", 100)


def test_daemon_checker_fails_on_corrupted_histories() -> None:
    reports = [
        _report("w1", killed_at=1000.0, heartbeat_exit_s=0.02),
        _report("w2"),
        _report("stuck", stuck=True, lost=False),
    ]
    events = [_event("died", "w1", 1000.005), _event("left", "w2"), _event("left", "stuck")]
    assert daemon.check(reports, events, ttl=1.0).ok
    # The kill never reached the registry.
    v = daemon.check(reports, events[1:], ttl=1.0)
    assert not v.ok and v.deaths_recorded == 0
    # ... or only long after the ttl.
    late = [_event("died", "w1", 1003.0), *events[1:]]
    assert any("reported 3.000 s" in f for f in daemon.check(reports, late, 1.0).failures)
    # A worker that was never killed reported dead: a false death.
    false = [events[0], _event("died", "w2"), events[2]]
    v = daemon.check(reports, false, ttl=1.0)
    assert not v.ok and v.false_deaths == 1
    # The killed worker's heartbeat process lived on.
    orphan = [replace(reports[0], heartbeat_exit_s=None), *reports[1:]]
    assert any("outlived" in f for f in daemon.check(orphan, events, 1.0).failures)
    # A heartbeat process that did not save the stuck worker's session.
    lost = [*reports[:2], replace(reports[2], lost=True)]
    assert any("lost while" in f for f in daemon.check(lost, events, 1.0).failures)
    # A reporter without a heartbeat process of its own.
    foreign = [reports[0], replace(reports[1], heartbeat_parent=1), reports[2]]
    assert any("no heartbeat process" in f for f in daemon.check(foreign, events, 1.0).failures)


# -- server --------------------------------------------------------------------------------------


def _assert_server(d: dict[str, Any], tickets: int) -> None:
    """The figures of a ticket server run that sold every ticket through one kill."""
    assert d["tickets"] == d["sold"] == d["acked"] == tickets
    assert d["remaining"] == d["oversold"] == d["sold_twice"] == 0
    assert d["ack_mismatches"] == d["unacked_sales"] == 0
    assert d["tokens_increasing"] is True
    assert d["kills"] == d["deaths_recorded"] == 1
    assert d["false_deaths"] == 0
    assert d["retries"] >= 1  # the client of the interrupted request asked again
    assert len(d["death_report_ms"]) == 1
    assert d["throughput_per_s"] > 0
    lat = d["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert d["requests"] >= tickets + d["clients"]  # every sale, and a SOLDOUT each
    assert 0 < d["port"] < 65536


def test_server_prefork_survives_a_killed_worker(url: str) -> None:
    rc, d = _demo(
        url, "server", "--tickets", "200", "--clients", "12", "--workers", "2", "--seed", "1"
    )
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    _assert_server(d, 200)
    assert d["mode"] == "pre-fork"
    assert d["processes"] == 3  # two workers and the replacement of the killed one
    assert d["sessions_joined"] == 3
    assert d["sessions_left"] == 2


def test_server_per_connection_survives_a_killed_worker(url: str) -> None:
    rc, d = _demo(
        url, "server", "--per-connection", "--tickets", "120", "--clients", "8", "--seed", "1"
    )
    _assert_ok(rc, d)
    _assert_nothing_left(url)
    _assert_server(d, 120)
    assert d["mode"] == "per-connection"
    # One process per connection: one per client, and one more for each reconnection.
    assert d["processes"] == d["connections"] >= 9
    assert d["sessions_joined"] == d["processes"]
    assert d["sessions_left"] == d["processes"] - 1  # all but the killed one


def _sales(n: int) -> list[server.Sale]:
    return [
        server.Sale(i, i, f"r{i}", "worker-1", 100, 10 * i, 1000.0 + i) for i in range(1, n + 1)
    ]


def test_server_checker_fails_on_corrupted_records() -> None:
    sales = _sales(5)
    acks = [server.Ack(s.request, s.ticket, s.token) for s in sales]
    kill = server.Kill(pid=100, session_id="sid-w1", at=1002.5)
    died = LivenessEvent("1-0", "died", "sid-w1", 1002.51, "ticket-server:x/worker-1", "h", 100)
    kw: dict[str, Any] = {
        "initial": 5,
        "remaining": 0,
        "sales": sales,
        "acks": acks,
        "kills": [kill],
        "liveness": [died],
        "retries": 1,
    }
    good = server.check(**kw)
    assert good.ok, good.failures
    assert good.lock_recovery_s == pytest.approx((0.5,))

    def fails(**change: Any) -> tuple[str, ...]:
        v = server.check(**{**kw, **change})
        assert not v.ok
        return v.failures

    twice = [*sales[:4], replace(sales[4], ticket=2)]
    assert any("sold more than once" in f for f in fails(sales=twice))
    assert any("oversold" in f for f in fails(remaining=-1))
    back = [*sales[:4], replace(sales[4], token=5)]
    assert any("did not increase" in f for f in fails(sales=back))
    lie = [*acks[:4], server.Ack("r5", 3, acks[4].token)]
    assert any("was told ticket 3" in f for f in fails(acks=lie))
    assert any("no client was told" in f for f in fails(acks=acks[:4]))
    assert any("left" in f for f in fails(remaining=1, sales=sales[:4], acks=acks[:4]))
    assert any("no death" in f for f in fails(liveness=[]))
    other = replace(died, session_id="sid-w2", name="ticket-server:x/worker-2")
    assert any("was not killed" in f for f in fails(liveness=[died, other]))
    assert any("no client retried" in f for f in fails(retries=0))
