"""Issue 4, the operator's commands: ``procsync ps | ls | show | watch | release``,
checked in their ``--json`` form (the tables are views of the same records)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import procsync
from helpers.procs import ChildFactory, wait_until
from procsync import registry
from procsync.cli import main

pytest_plugins = ["helpers.fixtures"]

HOLDER = """
lock = Lock({name!r})
lock.acquire()
say("held", procsync.current_session().id)
hear()
"""

WAITER = """
lock = Lock({name!r})
say("ready", procsync.current_session().id)
lock.acquire()
say("got")
hear()
"""


def cli(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


def cli_json(*args: str) -> Any:
    r = cli(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def holder_and_waiter(children: ChildFactory, name: str) -> tuple[str, str, Any, Any]:
    h = children(HOLDER.format(name=name), name="holder")
    (hsid,) = h.expect("held")
    w = children(WAITER.format(name=name), name="waiter")
    (wsid,) = w.expect("ready")

    def queued() -> bool:
        p = procsync.describe(name)
        return p is not None and p.waiting == 1

    wait_until(queued, timeout=10, what="the waiter queued")
    return hsid, wsid, h, w


def test_ps_json(ps_url: str, children: ChildFactory) -> None:
    c = children('say("sid", procsync.current_session().id); hear()', name="doomed")
    (sid,) = c.expect("sid")
    rows = {r["id"]: r for r in cli_json("ps")}
    assert rows[sid]["state"] == "alive" and rows[sid]["pid"] == c.pid
    c.kill()
    row = {r["id"]: r for r in cli_json("ps")}[sid]
    assert row["state"] == "dead" and row["ended"] is not None
    assert set(row) >= {"id", "name", "host", "pid", "started", "last_heartbeat", "state", "holds"}
    assert sid not in {r["id"] for r in cli_json("ps", "--alive")}
    assert cli("ps").exit_code == 0  # the table


def test_ls_and_show_json(ps_url: str, children: ChildFactory) -> None:
    hsid, wsid, h, _w = holder_and_waiter(children, "tickets")
    (row,) = cli_json("ls")
    assert (row["kind"], row["name"], row["state"]) == ("lock", "tickets", "locked")
    assert [(x["session_id"], x["pid"]) for x in row["holders"]] == [(hsid, h.pid)]
    assert [x["session_id"] for x in row["waiters"]] == [wsid]
    shown = cli_json("show", "tickets")
    assert shown == row
    r = cli("show", "nothing", "--json")
    assert r.exit_code == 1 and r.stdout.strip() == "null"
    assert cli("show", "nothing").exit_code == 1
    assert cli("ls").exit_code == 0 and cli("show", "tickets").exit_code == 0


def test_watch_json_bounded_by_count_and_timeout(ps_url: str) -> None:
    pos = registry.position()
    s = procsync.Session(name="watched", ttl=5)
    s.close()
    r = cli("watch", "--from", pos, "--count", "2", "--json")
    assert r.exit_code == 0
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(e["type"], e["session_id"]) for e in got] == [("joined", s.id), ("left", s.id)]
    assert all(isinstance(e["at"], float) for e in got)
    r = cli("watch", "--from", got[0]["id"], "--type", "left", "--count", "1", "--json")
    assert [json.loads(x)["id"] for x in r.stdout.splitlines()] == [got[1]["id"]]
    r = cli("watch", "--timeout", "0.2", "--json")
    assert r.exit_code == 0 and r.stdout == ""
    assert cli("watch", "--from", "0", "--timeout", "0.5").exit_code == 0


def test_release_force_confirms_and_hands_over(ps_url: str, children: ChildFactory) -> None:
    pos = registry.position()
    hsid, _wsid, _h, w = holder_and_waiter(children, "stuck")
    r = cli("release", "stuck")
    assert r.exit_code == 2 and "--force" in r.output
    r = cli("release", "stuck", "--force", input="n\n")
    assert r.exit_code == 1  # declined: nothing happened
    assert procsync.describe("stuck") is not None
    assert procsync.describe("stuck").holders[0].session_id == hsid  # type: ignore[union-attr]
    ended = cli_json("release", "stuck", "--force", "--yes")
    assert [e["session_id"] for e in ended] == [hsid]
    w.expect("got")
    (forced,) = list(procsync.watch(pos, types={"forced"}, count=1, timeout=5))
    assert forced.session_id == hsid and forced.by and forced.what == "lock:stuck"
    r = cli("release", "stuck", "--force", "--yes")  # now held by the waiter
    assert r.exit_code == 0
    r = cli("release", "never-held", "--force", "--yes")
    assert r.exit_code == 1 and "not held" in r.output


def test_no_server_running_reports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROCSYNC_URL", raising=False)
    with tempfile.TemporaryDirectory(prefix="ps-none-") as d:
        monkeypatch.setenv("PROCSYNC_RUNTIME_DIR", str(Path(d) / "rt"))
        assert cli_json("ps") == [] and cli_json("ls") == []
        assert cli("show", "x", "--json").stdout.strip() == "null"
        assert not (Path(d) / "rt").exists() or not any((Path(d) / "rt").iterdir())


def test_real_command_line(ps_url: str) -> None:
    s = procsync.Session(name="seen-by-the-cli", ttl=5)
    out = subprocess.run(
        [sys.executable, "-m", "procsync", "ps", "--json"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert s.id in {r["id"] for r in json.loads(out.stdout)}
    s.close()
