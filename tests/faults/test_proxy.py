"""FaultProxy: each fault, proved against a real server through the proxy.

Clients go through the proxy over TCP with ``single_connection_client=True`` and
no retries, so a broken connection shows as an error on the very next call instead
of being silently replaced by the pool. A direct client (``server.client()``) shows
what the server really executed.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from helpers.procs import wait_until
from procsync.testing import FaultProxy, ServerProcess

SHORT = 0.3  # socket timeout where a call is expected to time out
LONG = 5.0  # socket timeout where a call is expected to succeed


def through(proxy: FaultProxy, timeout: float = LONG, **kwargs: Any) -> redis.Redis:
    """A client of the server behind ``proxy``, one connection, no retries.

    It connects at once (``single_connection_client``): a connection that fails
    fails here.
    """
    return redis.Redis(
        host="127.0.0.1",
        port=proxy.port,
        socket_timeout=timeout,
        socket_connect_timeout=LONG,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
        **kwargs,
    )


def resp(*args: str) -> bytes:
    """One command in RESP, as a client writes it."""
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise AssertionError(f"connection closed after {data!r}")
        data += more
    return data


@pytest.fixture
def proxy(server: ServerProcess, url: str) -> Iterator[FaultProxy]:
    with FaultProxy(server.socket_path, name="fp-test") as p:
        yield p


@pytest.fixture
def direct(server: ServerProcess, url: str) -> Iterator[redis.Redis]:
    with server.client(socket_timeout=LONG) as r:
        yield r


# -- pass-through and targets -------------------------------------------------------


def test_pass_through(proxy: FaultProxy, direct: redis.Redis) -> None:
    with through(proxy) as r:
        assert r.set("k", "v")
        assert r.get("k") == b"v"
        assert direct.get("k") == b"v"
        assert proxy.connections == 1
        assert proxy.accepted == 1
    assert proxy.bytes_up > 0
    assert proxy.bytes_down > 0
    assert proxy.url == f"redis://127.0.0.1:{proxy.port}/0"


def test_tcp_and_url_targets_keep_the_db(server: ServerProcess, url: str) -> None:
    with (
        FaultProxy(url, name="fp-unix") as first,
        FaultProxy(("127.0.0.1", first.port), name="fp-tcp") as second,
        FaultProxy(f"redis://localhost:{second.port}/2", name="fp-url") as third,
    ):
        assert third.url == f"redis://127.0.0.1:{third.port}/2"
        with redis.Redis.from_url(third.url, socket_timeout=LONG) as r:
            assert r.set("k", "v")
        with server.client(db=2) as r2:
            assert r2.get("k") == b"v"
        assert first.accepted == second.accepted == third.accepted == 1


def test_unreachable_target_resets_the_client_and_the_proxy_survives(tmp_path: Path) -> None:
    with FaultProxy(tmp_path / "nothing.sock", name="fp-unreachable") as proxy:
        for n in (1, 2):
            with pytest.raises(redis.ConnectionError):
                through(proxy)
            assert proxy.failed_connects == n
        assert proxy.accepted == 2
        assert proxy.connections == 0
        assert any(t.name == "fp-unreachable-io" for t in threading.enumerate())


# -- faults -------------------------------------------------------------------------


@pytest.mark.parametrize(("direction", "legs"), [("both", 2), ("up", 1), ("down", 1)])
def test_latency_delays_every_chunk(proxy: FaultProxy, direction: str, legs: int) -> None:
    delay = 0.15
    with through(proxy) as r:
        assert r.ping()
        proxy.latency(delay, direction)
        started = time.monotonic()
        assert r.ping()
        elapsed = time.monotonic() - started
        assert elapsed >= legs * delay
        assert elapsed < 5.0
        proxy.heal()
        assert r.ping()


def test_stall_down_the_write_reaches_the_server_the_reply_never_comes(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    with through(proxy, timeout=SHORT) as r:
        assert r.ping()
        proxy.stall("down")
        with pytest.raises(redis.TimeoutError):
            r.set("k", "v")
        wait_until(lambda: direct.get("k") == b"v", timeout=5.0, what="the SET on the server")
        wait_until(lambda: proxy.buffered("down") > 0, timeout=5.0, what="the reply kept")
    assert proxy.buffered("up") == 0


def test_stall_up_the_server_never_sees_the_command(proxy: FaultProxy, direct: redis.Redis) -> None:
    with through(proxy, timeout=SHORT) as r:
        assert r.ping()
        proxy.stall("up")
        with pytest.raises(redis.TimeoutError):
            r.set("k", "v")
        assert proxy.buffered("up") > 0
        assert direct.get("k") is None
        proxy.heal()  # the kept SET is delivered now
        wait_until(lambda: direct.get("k") == b"v", timeout=5.0, what="the SET after heal")


def test_blackhole_new_connections_time_out_and_never_reach_the_server(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    with through(proxy, timeout=SHORT) as old:
        assert old.ping()
        clients_before = direct.info("clients")["connected_clients"]
        proxy.blackhole()
        with pytest.raises(redis.TimeoutError):
            old.ping()
        with pytest.raises(redis.TimeoutError):
            through(proxy, timeout=SHORT)  # the TCP connect succeeds; no reply, no RST
        assert proxy.accepted == 2
        assert direct.info("clients")["connected_clients"] == clients_before
        proxy.heal()
    with through(proxy) as r:
        assert r.ping()


def test_reset_aborts_current_connections_new_ones_work(proxy: FaultProxy) -> None:
    with through(proxy) as r1, through(proxy) as r2:
        assert r1.ping()
        assert r2.ping()
        assert proxy.reset() == 2
        assert proxy.connections == 0
        with pytest.raises(redis.ConnectionError):
            r1.ping()
        with pytest.raises(redis.ConnectionError):
            r2.ping()
    with through(proxy) as r:
        assert r.ping()
    wait_until(lambda: proxy.connections == 0, timeout=5.0, what="the FIN to close the pair")
    assert proxy.reset() == 0


def test_refuse_new_connections_fail_fast_until_heal(proxy: FaultProxy) -> None:
    port = proxy.port
    with through(proxy) as old:
        assert old.ping()
        proxy.refuse()
        with pytest.raises(redis.ConnectionError):
            old.ping()
    started = time.monotonic()
    with pytest.raises(redis.ConnectionError):
        through(proxy)
    assert time.monotonic() - started < 1.0
    assert proxy.refused == 1
    proxy.heal()
    assert proxy.port == port
    with through(proxy) as r:
        assert r.ping()


def test_hold_next_reply_arrives_only_after_release(proxy: FaultProxy, direct: redis.Redis) -> None:
    with through(proxy) as r:
        assert r.ping()
        proxy.hold_next_reply()
        result: list[object] = []
        done = threading.Event()

        def call() -> None:
            result.append(r.incr("n"))
            done.set()

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        wait_until(lambda: proxy.holding, timeout=5.0, what="the reply to be held")
        assert direct.get("n") == b"1"  # the server answered ...
        assert not done.is_set()  # ... the client has not heard
        proxy.release_held()
        assert done.wait(5.0)
        worker.join(5.0)
        assert result == [1]
        assert not proxy.holding
        assert r.incr("n") == 2  # only one reply was held


def test_drop_next_reply_the_command_ran_the_client_gets_a_connection_error(
    proxy: FaultProxy, direct: redis.Redis
) -> None:
    with through(proxy) as r:
        assert r.ping()
        proxy.drop_next_reply()
        with pytest.raises(redis.ConnectionError):
            r.set("k", "v")
        assert direct.get("k") == b"v"
        assert proxy.connections == 0
        assert r.ping()  # the client reconnects; the drop applied once


@pytest.mark.parametrize("direction", ["up", "down", "both"])
def test_heal_delivers_stalled_bytes_in_order(
    proxy: FaultProxy, direct: redis.Redis, direction: str
) -> None:
    commands = [resp("RPUSH", "l", x) for x in "abcde"]
    replies = b":1\r\n:2\r\n:3\r\n:4\r\n:5\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=LONG) as sock:
        proxy.wait_for_connections(1)
        proxy.stall(direction)
        for command in commands:
            sock.sendall(command)
        if direction == "down":
            wait_until(lambda: direct.llen("l") == 5, timeout=5.0, what="the pushes")
            wait_until(
                lambda: proxy.buffered("down") == len(replies), timeout=5.0, what="the replies"
            )
        else:
            wait_until(
                lambda: proxy.buffered("up") == sum(map(len, commands)),
                timeout=5.0,
                what="the commands kept",
            )
            assert direct.llen("l") == 0
        proxy.heal()
        assert recv_exactly(sock, len(replies)) == replies
    assert direct.lrange("l", 0, -1) == [b"a", b"b", b"c", b"d", b"e"]
    assert proxy.bytes_up == sum(map(len, commands))
    assert proxy.bytes_down == len(replies)


# -- life cycle, observation, arguments ---------------------------------------------


def test_close_stops_every_thread_and_is_idempotent(server: ServerProcess, url: str) -> None:
    name = "fp-close-check"
    proxy = FaultProxy(server.socket_path, name=name).start()
    port = proxy.port
    with through(proxy) as r:
        assert r.ping()
        proxy.close()
        assert not [t for t in threading.enumerate() if t.name.startswith(name)]
        proxy.close()
        with pytest.raises(redis.ConnectionError):
            r.ping()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=LONG).close()
    with pytest.raises(RuntimeError):
        proxy.start()


def test_wait_for_connections(proxy: FaultProxy) -> None:
    with pytest.raises(TimeoutError):
        proxy.wait_for_connections(1, timeout=0.05)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=LONG):
        proxy.wait_for_connections(1, timeout=5.0)
    assert proxy.accepted == 1


def test_bad_arguments(tmp_path: Path) -> None:
    proxy = FaultProxy(tmp_path / "s.sock")
    with pytest.raises(RuntimeError, match="not started"):
        _ = proxy.port
    for bad in ("sideways", "", "UP"):
        with pytest.raises(ValueError, match="'up', 'down', 'both'"):
            proxy.stall(bad)
        with pytest.raises(ValueError, match="'up', 'down', 'both'"):
            proxy.latency(0.1, bad)
    for seconds in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="latency"):
            proxy.latency(seconds)
    for target in (
        ("10.0.0.1", 6379),
        ("example.com", 6379),
        ("127.0.0.1", 0),
        "redis://example.com:6379/0",
        "rediss://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/x",
    ):
        with pytest.raises(ValueError):
            FaultProxy(target)
    assert FaultProxy("unix:///tmp/x.sock?db=3").target == "/tmp/x.sock"
    with FaultProxy("unix:///tmp/x.sock?db=3") as p:
        assert p.url.endswith("/3")
    proxy.close()  # never started: fine
