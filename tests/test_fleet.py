"""Issue 4, the fleet demo: simulated machines x processes report alive through the
session script; killed ones are reported within ttl + 1 s, none falsely, and the
demo leaves nothing on the server."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner

from helpers.keys import stored_keys
from procsync.cli import main
from procsync.demos import fleet

pytest_plugins = ["helpers.fixtures"]

TTL = 1.0


@pytest.mark.parametrize("batch", ["--batch", "--no-batch"])
def test_fleet_reports_every_kill_and_no_false_death(
    ps_url: str, raw: redis.Redis, batch: str
) -> None:
    r = CliRunner().invoke(
        main,
        [
            "demo", "fleet", "--machines", "4", "--procs", "25", "--ttl", str(TTL),
            "--kill", "5", "--steady", "0.5", "--workers", "2", "--seed", "7", batch, "--json",
        ],
        catch_exceptions=False,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert {
        "sessions",
        "killed",
        "detected",
        "false_deaths",
        "detect_p50_s",
        "detect_p99_s",
        "detect_max_s",
        "server_cpu_pct",
    } <= set(got)
    assert (got["sessions"], got["killed"], got["detected"]) == (100, 5, 5)
    assert got["false_deaths"] == 0
    assert TTL <= got["detect_p50_s"] <= got["detect_max_s"] <= TTL + 1.0
    assert got["heartbeats_per_s"] > 0 and 0 <= got["server_cpu_pct"] < 100
    assert got["batch"] is (batch == "--batch")
    assert stored_keys(raw) == []  # its namespace was purged


def test_fleet_config_is_checked() -> None:
    with pytest.raises(ValueError):
        fleet.FleetConfig(machines=0).check()
    with pytest.raises(ValueError):
        fleet.FleetConfig(ttl=0.1).check()
    with pytest.raises(ValueError):
        fleet.FleetConfig(machines=2, procs=2, kill=5).check()
