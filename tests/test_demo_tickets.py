"""The ticket rush demo, run the way a user runs it: ``python -m procsync demo tickets``
as a real command, with real buyer processes, against the test servers (through
``PROCSYNC_URL``; never the user's embedded server). Plus the checker on databases
corrupted on purpose, to prove it can fail."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from procsync.cli import main
from procsync.demos import CATALOGUE
from procsync.demos.tickets import Inventory, check

DEMO_TIMEOUT = 90.0


def _procsync(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PROCSYNC_URL=url)
    return subprocess.run(
        [sys.executable, "-m", "procsync", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT,
        check=False,
    )


def _rush(url: str, *args: str) -> tuple[int, dict[str, Any]]:
    proc = _procsync(url, "demo", "tickets", "--json", "--timeout", "60", *args)
    assert proc.stdout.strip(), f"no JSON on stdout; stderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON object, got:\n{proc.stdout}"
    data: dict[str, Any] = json.loads(lines[0])
    return proc.returncode, data


def _assert_exact(d: dict[str, Any], tickets: int) -> None:
    assert d["ok"] is True, d["failures"]
    assert d["failures"] == []
    assert d["initial"] == tickets
    assert d["sold"] == tickets
    assert d["remaining"] == 0
    assert d["sold"] + d["remaining"] == d["initial"]
    assert d["oversold"] == 0
    assert d["sold_twice"] == 0
    assert d["invalid_tickets"] == 0
    assert d["tokens_increasing"] is True
    assert d["timed_out"] is False


def test_rush_sells_every_ticket_exactly_once(url: str, tmp_path: Path) -> None:
    db = tmp_path / "tickets.db"
    rc, d = _rush(url, "--buyers", "8", "--tickets", "40", "--seed", "1", "--db", str(db))
    assert rc == 0, d
    _assert_exact(d, 40)
    assert d["buyers"] == 8
    assert d["processes_started"] == 8
    assert d["crashes"] == 0
    assert d["pauses"] == 0
    assert d["stale_rejected"] == 0
    assert d["lost_on_release"] == 0
    assert d["recovery_p50_s"] is None
    assert d["ttl_s"] > 0  # the session default (PROCSYNC_TTL or 10 s)
    # FIFO hand-off: every buyer gets its turns, nobody starves.
    assert d["sales_per_buyer_min"] >= 1
    # --db keeps the database; the checker, run here on its own, agrees.
    assert d["db"] == str(db)
    verdict = check(db)
    assert verdict.ok
    assert verdict.sold == 40


def test_chaos_kills_and_pauses_holders_and_nothing_is_oversold(url: str) -> None:
    rc, d = _rush(url, "--buyers", "8", "--tickets", "40", "--chaos", "--seed", "2")
    assert rc == 0, d
    _assert_exact(d, 40)
    assert d["chaos"] is True
    assert d["ttl_s"] == 2.0
    assert d["crashes"] >= 1
    assert d["pauses"] >= 1
    # Each killed buyer was respawned (a kill only happens while tickets are left).
    assert d["processes_started"] >= 8 + 1
    # A paused holder comes back past its lease: release() says the hold was lost,
    # and a write it still makes is refused by the database, never applied. (A
    # machine loaded past the 2 s lease may add losses of its own, never fewer.)
    assert d["lost_on_release"] >= d["pauses"]
    assert d["stale_rejected"] <= d["lost_on_release"]
    # Same-host crash: the pid watcher frees the lock long before the 2 s lease ends.
    assert d["recovery_p50_s"] is not None
    assert d["recovery_p50_s"] < 0.5
    assert d["recovery_max_s"] < d["ttl_s"] + 1.0
    assert d["pause_recovery_max_s"] is not None


def test_without_the_fence_a_paused_holder_corrupts_the_stock(url: str, server_kind: str) -> None:
    if server_kind != "valkey":
        pytest.skip("shows the demo's own failure mode; one server kind is enough")
    args = ("--buyers", "6", "--tickets", "40", "--chaos", "--kills", "0", "--pauses", "2")
    rc, d = _rush(url, *args, "--unfenced", "--seed", "3")
    assert d["fenced"] is False
    assert d["pauses"] == 2
    assert d["stale_rejected"] == 0  # nobody checks tokens any more...
    assert rc == 1  # ...so the stale writes land, and the checker says so
    assert d["ok"] is False
    assert d["failures"]
    assert (
        d["sold_twice"] > 0
        or d["oversold"] > 0
        or not d["tokens_increasing"]
        or d["sold"] + d["remaining"] != d["initial"]
    )


def test_human_output_shows_the_checker(url: str) -> None:
    proc = _procsync(url, "demo", "tickets", "--buyers", "3", "--tickets", "6", "--work", "0")
    assert proc.returncode == 0, proc.stderr
    assert "The checker" in proc.stdout
    assert "OK" in proc.stdout
    assert "oversold" in proc.stdout


def test_demo_without_name_lists_the_catalogue() -> None:
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 0, result.output
    lines = [ln for ln in result.stdout.splitlines() if ln.strip()]
    assert len(lines) == len(CATALOGUE)
    assert lines[0].startswith("tickets ")


def test_bad_options_are_usage_errors() -> None:
    result = CliRunner().invoke(main, ["demo", "tickets", "--buyers", "0"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["demo", "nosuchdemo"])
    assert result.exit_code == 2


# -- the checker and the fence, without any server ------------------------------------


def _sell(inv: Inventory, ticket: int, remaining_after: int, token: int) -> bool:
    return inv.sell(
        ticket=ticket,
        remaining_after=remaining_after,
        buyer="t",
        pid=os.getpid(),
        token=token,
        granted_at=0.0,
    )


def _shop(path: Path, tickets: int = 5, sold: int = 3) -> Inventory:
    inv = Inventory.create(path, tickets, run_id="test")
    for i in range(1, sold + 1):
        assert _sell(inv, i, tickets - i, token=100 + i)
    return inv


def test_checker_passes_a_clean_database(tmp_path: Path) -> None:
    with _shop(tmp_path / "t.db"):
        pass
    v = check(tmp_path / "t.db")
    assert v.ok
    assert (v.initial, v.sold, v.remaining) == (5, 3, 2)
    assert v.oversold == v.sold_twice == v.token_regressions == v.stale_rejected == 0


def test_database_refuses_a_stale_token(tmp_path: Path) -> None:
    with _shop(tmp_path / "t.db") as inv:
        # A holder paused since token 102 wakes up and sells "ticket 3" again.
        assert _sell(inv, 3, 2, token=102) is False
        assert _sell(inv, 3, 2, token=103) is False  # equal is stale too
        assert inv.remaining() == 2
        assert inv.sold() == 3
    v = check(tmp_path / "t.db")
    assert v.ok
    assert v.stale_rejected == 2


def test_checker_catches_a_ticket_sold_twice(tmp_path: Path) -> None:
    with _shop(tmp_path / "t.db") as inv:
        # A newer token, but a stale view of the stock: ticket 2 again, stock 3.
        assert _sell(inv, 2, 3, token=200)
    v = check(tmp_path / "t.db")
    assert not v.ok
    assert v.sold_twice == 1
    assert any("more than once" in f for f in v.failures)
    assert any("sold + remaining" in f for f in v.failures)


def test_checker_catches_overselling(tmp_path: Path) -> None:
    with _shop(tmp_path / "t.db", tickets=2, sold=2) as inv:
        assert _sell(inv, 3, -1, token=300)
    v = check(tmp_path / "t.db")
    assert not v.ok
    assert v.oversold == 1
    assert v.invalid_tickets == 1


def test_checker_catches_a_token_going_backwards(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    with _shop(path):
        pass
    with sqlite3.connect(path) as c:  # bypass the fence, as a careless writer would
        c.execute("DROP TRIGGER fence_check")
        c.execute(
            "INSERT INTO sales(ticket, buyer, pid, token, granted_at, sold_at) "
            "VALUES (4, 'x', 1, 50, 0, 0)"
        )
        c.execute("UPDATE stock SET remaining = 1")
    v = check(path)
    assert not v.ok
    assert v.token_regressions == 1
    assert v.sold_twice == 0
    assert any("token did not increase" in f for f in v.failures)


def test_inventory_replaces_only_its_own_files(tmp_path: Path) -> None:
    other = tmp_path / "precious.db"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE t(x)")
    with pytest.raises(FileExistsError):
        Inventory.create(other, 5, run_id="x")
    with pytest.raises(ValueError, match="not a ticket database"):
        check(other)
    mine = tmp_path / "t.db"
    _shop(mine).close()
    Inventory.create(mine, 7, run_id="again").close()
    v = check(mine)
    assert (v.initial, v.sold, v.remaining) == (7, 0, 7)
