"""Issue #10: state lost by the server (a restart without its data, a failover to a
replica that lagged): nobody is granted what someone may still hold, and fencing
tokens never repeat or regress.

Real servers: a crash is SIGKILL and a start on the same socket; a lagging replica is
a real replica (``REPLICAOF``) that was SIGSTOPped while the primary granted, then
promoted (``REPLICAOF NO ONE``) after the primary was killed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
import redis

from helpers.procs import ChildFactory, wait_until
from procsync import Lock, Session
from procsync.session import close_all
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures"]

TTL = 1.0


@pytest.fixture(autouse=True)
def _sessions_closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # One ttl for every session here (a deployment's): the quiet period after lost
    # state lasts the longest ttl any client of the namespace uses.
    monkeypatch.setenv("PROCSYNC_TTL", str(TTL))
    close_all()
    yield
    close_all()


HOLDER = """
lock = Lock("ledger")
assert lock.acquire()
lost = []
lock.on_lost(lambda *_: lost.append(time.monotonic()))
say("held", lock.token)
hear()                       # the server is back
while not lost:
    time.sleep(0.005)        # (a bounded wait: the test reads the answer with a timeout)
say("lost", repr(lost[0]))
hear()
"""

TAKER = """
lock = Lock("ledger")
say("trying")
assert lock.acquire(timeout=20)
say("granted", repr(time.monotonic()), lock.token)
lock.release()
"""


def test_after_a_restart_that_lost_everything_nobody_is_granted_while_an_old_holder_believes(
    fresh_server: ServerProcess, children: ChildFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's process is told it lost the lock strictly before another process
    is granted it, and the new grant's token is above the old one: the quiet period
    after lost state, and clock-based tokens. Before, the other process was granted
    at once while the old holder still believed it held the lock."""
    monkeypatch.setenv("PROCSYNC_URL", fresh_server.url)
    monkeypatch.setenv("PROCSYNC_TTL", str(TTL))
    holder = children(HOLDER, name="holder")
    old_token = int(holder.expect("held")[0])
    fresh_server.restart(hard=True)  # SIGKILL and start again: every key is gone
    taker = children(TAKER, name="taker")
    taker.expect("trying")
    holder.send("back")
    lost_at = float(holder.expect("lost", timeout=10)[0])
    granted_at, new_token = taker.expect("granted", timeout=20)
    assert lost_at < float(granted_at)
    assert int(new_token) > old_token
    holder.send("exit")


def test_a_server_started_empty_grants_at_once(fresh_url: str) -> None:
    """The quiet period is for lost state only: a server procsync.testing started
    empty is marked born empty, so the first grant is immediate (not a ttl later)."""
    Session(ttl=30)  # a quiet period would last 30 s: the timeout below would fail
    assert Lock("first").acquire(timeout=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def primary_and_replica(server_kind: str) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    port = _free_port()
    primary = ServerProcess(
        server_kind,
        # (a replica's first sync starts at once, not after the default 5 s delay)
        extra_args=["--port", str(port), "--bind", "127.0.0.1", "--repl-diskless-sync-delay", "0"],
    )
    replica = ServerProcess(server_kind, extra_args=["--replicaof", "127.0.0.1", str(port)])
    with primary, replica:
        with replica.client(decode_responses=True) as r:
            wait_until(
                lambda: r.info("replication").get("master_link_status") == "up",
                what="the replica to sync",
            )
        yield primary, replica


def test_failover_to_a_replica_that_lagged_repeats_no_token_and_grants_nothing_early(
    primary_and_replica: tuple[ServerProcess, ServerProcess],
) -> None:
    """Issue #10: failover to a replica that lagged 2 s. Before, the tokens handed out
    in the lag were handed out again and a fenced resource refused legitimate writes;
    and a holder whose grant never reached the replica could be joined by a second
    holder at once. Now every token the promoted replica grants is above every token
    the primary granted, and nobody is granted the lock until the lost grant's lease
    could have run out."""
    primary, replica = primary_and_replica
    Session(ttl=TTL, url=primary.url)
    on_primary = Lock("ledger", url=primary.url)
    before: list[int] = []
    for _ in range(5):  # these reach the replica
        assert on_primary.acquire()
        before.append(int(on_primary.token or 0))
        on_primary.release()
    with primary.client(decode_responses=True) as r:
        r.wait(1, 2000)
    os.kill(replica.pid or 0, 19)  # SIGSTOP: the replica falls behind
    try:
        lag_end = time.monotonic() + 2.0
        while time.monotonic() < lag_end:  # two seconds of grants the replica misses
            assert on_primary.acquire()
            before.append(int(on_primary.token or 0))
            on_primary.release()
        assert on_primary.acquire()  # a hold the replica never hears of
        before.append(int(on_primary.token or 0))
        held_at = time.monotonic()
        primary.kill()
    finally:
        os.kill(replica.pid or 0, 18)  # SIGCONT
    with replica.client(decode_responses=True) as r:
        r.execute_command("REPLICAOF", "NO", "ONE")
    close_all()
    Session(ttl=TTL, url=replica.url)
    on_replica = Lock("ledger", url=replica.url)
    after: list[int] = []
    for _ in range(5):
        assert on_replica.acquire(timeout=10)
        if not after:  # the lost hold's lease, counted from before its grant, is over
            assert time.monotonic() >= held_at + TTL - 0.05
        after.append(int(on_replica.token or 0))
        on_replica.release()
    assert after == sorted(set(after))
    assert min(after) > max(before), "a token handed out before the failover came again"
    with pytest.raises(redis.RedisError):
        primary.client().ping()
