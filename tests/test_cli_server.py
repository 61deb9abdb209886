"""``procsync server start | stop | status | url`` on a private runtime directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from procsync.backend import embedded


@pytest.fixture
def runtime() -> Iterator[Path]:
    """A runtime directory of this test's own (short: socket paths are limited)."""
    d = Path(tempfile.mkdtemp(prefix="ps-cli-")) / "rt"
    try:
        yield d
    finally:
        embedded.stop(directory=d)
        shutil.rmtree(d.parent, ignore_errors=True)


def _server(runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PROCSYNC_RUNTIME_DIR=str(runtime))
    env.pop("PROCSYNC_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "procsync", "server", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _status(runtime: Path) -> dict[str, Any]:
    proc = _server(runtime, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def test_start_status_url_stop(runtime: Path) -> None:
    expected_url = f"unix://{runtime / 'valkey.sock'}"
    st = _status(runtime)
    assert st["running"] is False
    assert st["url"] == expected_url

    proc = _server(runtime, "url", "--no-start")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "not running" in proc.stderr

    proc = _server(runtime, "start", "--idle-timeout", "0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected_url
    assert "started" in proc.stderr

    st = _status(runtime)
    assert st["running"] is True
    assert st["url"] == expected_url
    assert isinstance(st["pid"], int)
    assert st["dir"] == str(runtime)
    assert st["idle_shutdown"] is False
    assert st["idle_timeout_s"] is None

    proc = _server(runtime, "start")
    assert proc.returncode == 0
    assert proc.stdout.strip() == expected_url
    assert "already running" in proc.stderr

    for args in (("url",), ("url", "--no-start")):
        proc = _server(runtime, *args)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == expected_url + "\n"  # just the URL: $(procsync server url)

    proc = _server(runtime, "status")
    assert proc.returncode == 0
    assert "running" in proc.stdout
    assert str(st["pid"]) in proc.stdout

    proc = _server(runtime, "stop")
    assert proc.returncode == 0, proc.stderr
    assert "stopped" in proc.stderr
    assert _status(runtime)["running"] is False

    proc = _server(runtime, "stop")
    assert proc.returncode == 0
    assert "no embedded server was running" in proc.stderr


def test_url_starts_the_server_when_needed(runtime: Path) -> None:
    proc = _server(runtime, "url")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"unix://{runtime / 'valkey.sock'}"
    assert _status(runtime)["running"] is True


def test_status_warns_when_procsync_url_points_elsewhere(runtime: Path) -> None:
    env = dict(os.environ, PROCSYNC_RUNTIME_DIR=str(runtime), PROCSYNC_URL="redis://elsewhere:1")
    proc = subprocess.run(
        [sys.executable, "-m", "procsync", "server", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0
    assert "PROCSYNC_URL is set" in proc.stderr
