"""The ticket rush demo, run the way a user runs it: ``python -m procsync demo tickets``
as a real command, with real buyer processes, against the test servers (through
``PROCSYNC_URL``; never the user's embedded server). Plus the checker on databases
corrupted on purpose, to prove it can fail.

No assertion here rests on a lucky interleaving or on the machine being fast: what a
test claims is either true of every run (the checker's invariants, the fence), or
forced by the demo's own handshakes (the start line on the lock's queue; the staged
stale write), or bounded by a lease so long that only the claimed mechanism can
explain the result."""

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
    # FIFO hand-off: every buyer gets its turns, nobody starves. Not luck: the parent
    # lets go of the lock only once all 8 are queued on it, and there are 40 tickets.
    assert d["sales_per_buyer_min"] >= 1
    # --db keeps the database; the checker, run here on its own, agrees.
    assert d["db"] == str(db)
    verdict = check(db)
    assert verdict.ok
    assert verdict.sold == 40


def test_chaos_kills_and_pauses_holders_and_nothing_is_oversold(url: str) -> None:
    # The user's --chaos: random strikes on whoever holds the lock at that moment, so
    # where in the critical section each one lands is chance; what is asserted holds
    # wherever they land. (The staged tests below force the worst landing.)
    rc, d = _rush(url, "--buyers", "8", "--tickets", "40", "--chaos", "--seed", "2")
    assert rc == 0, d
    _assert_exact(d, 40)
    assert d["chaos"] is True
    assert d["scenario"] is None
    assert d["ttl_s"] == 2.0
    # Seed 2 strikes at 4, 12, 15, 18 (kills) and 21 (pause) tickets sold of 40: the
    # lock is held nearly all the time, so each lands on the next look at the holder.
    assert d["crashes"] >= 1
    assert d["pauses"] >= 1
    # Each killed buyer was respawned (a kill only happens while tickets are left).
    assert d["processes_started"] >= 8 + 1
    assert d["recovery_p50_s"] is not None
    # Whatever a paused holder does when it comes back depends on where the pause
    # fell, but a write the database refused was a lost hold's, and its release()
    # said so. (Not "lost >= pauses": a pause that falls between the server's grant
    # and the buyer hearing of it loses no hold the buyer knew of.)
    assert d["stale_rejected"] <= d["lost_on_release"]
    assert d["pause_recovery_max_s"] is not None


def test_a_crashed_holder_is_replaced_through_its_pid_not_its_lease(
    url: str, server_kind: str
) -> None:
    if server_kind != "valkey":
        pytest.skip("the client's pid watcher; one server kind is enough")
    # With a 30 s lease, a killed holder's session outlives it by 20 s or more
    # (renewed every 10 s): the lock can come back sooner only because a waiter on
    # this host saw the pid gone. Two crashes by lease alone would not fit in the
    # run's 60 s. The bound is half a lease, not a latency that load could break.
    # (Seed 4 strikes at 4 and 10 tickets sold of 20.)
    args = ("--buyers", "3", "--tickets", "20", "--chaos", "--kills", "2", "--pauses", "0")
    rc, d = _rush(url, *args, "--ttl", "30", "--seed", "4")
    assert rc == 0, d
    _assert_exact(d, 20)
    assert d["ttl_s"] == 30.0
    assert d["crashes"] >= 1
    assert d["pauses"] == d["lost_on_release"] == d["stale_rejected"] == 0
    assert d["recovery_max_s"] is not None
    assert d["recovery_max_s"] < d["ttl_s"] / 2


def _staged_pause(db: Path) -> tuple[str, int, int]:
    """The staged pause's victim: (buyer, pid, token), from the incident log."""
    with sqlite3.connect(db) as c:
        rows = c.execute("SELECT buyer, pid, token FROM incidents WHERE kind = 'pause'").fetchall()
        resumed = c.execute("SELECT count(*) FROM incidents WHERE kind = 'resume'").fetchone()
    assert len(rows) == 1, rows
    assert resumed == (1,)
    buyer, pid, token = rows[0]
    return str(buyer), int(pid), int(token)


@pytest.mark.parametrize("fenced", [True, False], ids=["fenced", "unfenced"])
def test_a_holder_paused_between_read_and_write(
    url: str, server_kind: str, tmp_path: Path, fenced: bool
) -> None:
    """The staged stale write, the same every run: the holder that finds 6 of 12
    tickets left says so (pipe) and waits for its cue before writing; the parent
    SIGSTOPs it, waits until the database shows a sale under a newer token (the
    2 s lease ran out and another buyer bought), SIGCONTs it and gives the cue. Its
    write then carries a stale token and a stale view of the stock. Each step waits
    for the previous one to be seen, never for time to pass."""
    if server_kind != "valkey":
        pytest.skip("the demo's own failure mode; one server kind is enough")
    db = tmp_path / "tickets.db"
    args = ["--buyers", "3", "--tickets", "12", "--scenario", "stale-write", "--db", str(db)]
    rc, d = _rush(url, *args, "--seed", "3", *([] if fenced else ["--unfenced"]))
    assert d["scenario"] == "stale-write", d
    assert d["chaos"] is False
    assert d["fenced"] is fenced
    assert d["ttl_s"] == 2.0
    assert d["pauses"] == 1, d
    assert d["crashes"] == 0
    assert d["timed_out"] is False
    # Its lease ran out while it was stopped: release() says so.
    assert d["lost_on_release"] >= 1
    victim, pid, token = _staged_pause(db)
    with sqlite3.connect(db) as c:
        # The first sale under a newer token: the buyer the lock went to while the
        # victim was stopped. It read the same 6 left, so it sold ticket 7.
        later = c.execute(
            "SELECT seq, ticket FROM sales WHERE token > ? ORDER BY seq LIMIT 1", (token,)
        ).fetchone()
        mine = c.execute(
            "SELECT seq, ticket FROM sales WHERE pid = ? AND token = ?", (pid, token)
        ).fetchall()
        refused = c.execute(
            "SELECT ticket, fence_token FROM rejected WHERE pid = ? AND token = ?", (pid, token)
        ).fetchall()
    assert later is not None
    assert later[1] == 7
    if fenced:
        # The database refused the stale write; the stock is exact.
        assert rc == 0, d
        _assert_exact(d, 12)
        assert d["stale_rejected"] >= 1
        assert mine == []
        assert len(refused) == 1
        assert refused[0][0] == 7  # what it read: 6 left, so ticket 7
        assert refused[0][1] > token
    else:
        # Nobody checks tokens: the stale write lands and the checker catches it.
        assert rc == 1, d
        assert d["ok"] is False
        assert d["stale_rejected"] == 0
        assert refused == []
        # Its ticket 7 landed after the newer buyer's ticket 7, older token and all.
        assert [ticket for _, ticket in mine] == [7]
        assert mine[0][0] > later[0]
        assert d["sold_twice"] >= 1
        assert d["oversold"] >= 1
        assert d["sold"] + d["remaining"] != d["initial"]
        assert d["tokens_increasing"] is False
        assert any("more than once" in f for f in d["failures"])
    assert victim.startswith("buyer-")


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
    result = CliRunner().invoke(main, ["demo", "tickets", "--scenario", "nosuch"])
    assert result.exit_code == 2
    result = CliRunner().invoke(main, ["demo", "tickets", "--chaos", "--scenario", "stale-write"])
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


def test_database_refuses_a_stale_write_between_a_newer_read_and_its_write(
    tmp_path: Path,
) -> None:
    with _shop(tmp_path / "t.db") as inv:
        # Holder 110 read the stock (2 left), then froze; its lease ran out. Holder
        # 120 reads the same 2 left. Holder 110 wakes and sells ticket 4: its token
        # is newer than every accepted sale (103), but older than one that has read.
        assert inv.remaining(token=110) == 2
        assert inv.remaining(token=120) == 2
        assert _sell(inv, 4, 1, token=110) is False
        assert _sell(inv, 4, 1, token=120) is True  # the new holder's sale stands
        assert inv.remaining() == 1
        # A read under an older token records nothing newer: the fence stays.
        assert inv.remaining(token=115) == 1
        assert _sell(inv, 5, 0, token=115) is False
    v = check(tmp_path / "t.db")
    assert v.ok
    assert (v.sold, v.remaining, v.stale_rejected) == (4, 1, 2)
    with sqlite3.connect(tmp_path / "t.db") as c:
        fences = c.execute("SELECT token, fence_token FROM rejected ORDER BY seq").fetchall()
    assert fences == [(110, 120), (115, 120)]


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
