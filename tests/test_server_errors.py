"""Infrastructure errors: a server that is down or hung, credentials, keys of the
wrong type, and names already used with another shape."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from helpers.keys import leftover_keys, state_key
from helpers.procs import ChildFactory, InThread, wait_blocked, wait_until
from procsync import (
    BoundedSemaphore,
    ConflictError,
    Event,
    Lock,
    RLock,
    Semaphore,
    ServerUnavailableError,
    WrongTypeError,
)
from procsync.core.steps import side_key
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures"]

SECRET = "s3cr3t-pw-Zq9"

OPERATIONS: dict[str, Callable[[str | None], Any]] = {
    "Lock.acquire": lambda url: Lock("x", url=url).acquire(timeout=1),
    "Lock.locked": lambda url: Lock("x", url=url).locked(),
    "RLock.acquire": lambda url: RLock("x", url=url).acquire(timeout=1),
    "Semaphore.acquire": lambda url: Semaphore(2, name="x", url=url).acquire(timeout=1),
    "Semaphore.value": lambda url: Semaphore(2, name="x", url=url).value,
    "BoundedSemaphore.release": lambda url: BoundedSemaphore(2, name="x", url=url).release(),
    "Event.set": lambda url: Event("x", url=url).set(),
    "Event.wait": lambda url: Event("x", url=url).wait(1),
}


# -- no server -----------------------------------------------------------------------


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_nobody_listening_is_server_unavailable_naming_the_url(
    ps_url: str, tmp_path: Path, op: str
) -> None:
    url = f"unix://{tmp_path}/nobody.sock"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError) as info:
        OPERATIONS[op](url)
    assert time.monotonic() - t0 < 5.0
    assert isinstance(info.value, ConnectionError)
    assert url in str(info.value)


def test_nobody_listening_on_tcp(ps_url: str) -> None:
    url = "redis://127.0.0.1:1/0"
    t0 = time.monotonic()
    with pytest.raises(ServerUnavailableError, match=r"127\.0\.0\.1:1"):
        Lock("x", url=url).acquire(timeout=1)
    assert time.monotonic() - t0 < 5.0


def test_the_environment_url_is_named_too(
    ps_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"unix://{tmp_path}/env.sock"
    monkeypatch.setenv("PROCSYNC_URL", url)
    with pytest.raises(ServerUnavailableError) as info:
        Event("e").set()
    assert url in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://user:{SECRET}@127.0.0.1:1/0",
        f"redis://:{SECRET}@127.0.0.1:1",
        f"rediss://admin:{SECRET}@127.0.0.1:1/2",
        f"unix://:{SECRET}@/tmp/procsync-nobody/x.sock",
        f"unix:///tmp/procsync-nobody/x.sock?password={SECRET}",
        f"redis://127.0.0.1:1/0?password={SECRET}",
    ],
    ids=["user-password", "password", "rediss", "unix-netloc", "unix-query", "tcp-query"],
)
def test_a_password_is_never_shown(ps_url: str, url: str) -> None:
    lock = Lock("secret", url=url)
    with pytest.raises(ServerUnavailableError) as info:
        lock.acquire(timeout=1)
    shown = [
        str(info.value),
        repr(info.value),
        "".join(traceback.format_exception(info.value)),  # the whole chain
        repr(lock),
        repr(lock.backend),
    ]
    for text in shown:
        assert SECRET not in text
    assert "***" in str(info.value)


def test_a_redacted_unix_url_keeps_its_form(ps_url: str) -> None:
    url = f"unix:///tmp/procsync-nobody/x.sock?password={SECRET}"
    with pytest.raises(ServerUnavailableError) as info:
        Lock("x", url=url).acquire(timeout=1)
    assert "unix:///tmp/procsync-nobody/x.sock?password=***" in str(info.value)


def test_wrong_password_on_a_live_server(
    ps_url: str, fresh_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = "g00d-" + SECRET
    with fresh_server.client() as r:
        r.config_set("requirepass", good)
    try:
        path = fresh_server.socket_path
        with pytest.raises(ServerUnavailableError) as info:
            Lock("x", url=f"unix://:{SECRET}@{path}").acquire(timeout=1)
        text = "".join(traceback.format_exception(info.value))
        assert SECRET not in text
        assert str(path) in str(info.value)
        # the right password works, and is not shown either
        lock = Lock("x", url=f"unix://:{good}@{path}")
        assert lock.acquire(timeout=5)
        assert good not in repr(lock)
        lock.release()
    finally:
        with fresh_server.client(password=good) as r:
            r.config_set("requirepass", "")


def test_a_hung_server_is_an_error_within_the_socket_timeout(
    ps_url: str, fresh_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCSYNC_SOCKET_TIMEOUT", "1")
    fresh_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(ServerUnavailableError) as info:
            Lock("x", url=fresh_server.url).acquire(timeout=1)
        assert time.monotonic() - t0 < 5.0
        assert fresh_server.url in str(info.value)
    finally:
        fresh_server.resume()


def test_waiters_ride_out_the_server_dying_and_coming_back(
    fresh_url: str,
    fresh_server: ServerProcess,
    children: ChildFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue #10: blocked acquire() and wait() calls with no timeout neither raise
    nor hang when the server dies: they ride the outage out and go on in new
    sessions once it is back (the lock after the quiet period of lost state)."""
    monkeypatch.setenv("PROCSYNC_TTL", "1")
    holder = children(
        """
        lock = Lock("x")
        lock.acquire()
        say("held")
        hear()
        """
    )
    holder.expect("held")
    lock, ev = Lock("x"), Event("e")
    waiters = [InThread(lambda: lock.acquire()), InThread(lambda: ev.wait())]
    with fresh_server.client(decode_responses=True) as r:
        wait_blocked(r, 2)
    fresh_server.kill()
    with pytest.raises(AssertionError):  # still waiting, not raising, while it is down
        wait_until(lambda: not all(w.running for w in waiters), 1.0, "a waiter to end")
    fresh_server.start()
    Event("e").set()
    assert waiters[1].join(20) is True
    assert waiters[0].join(20) is True
    assert lock.locked()
    lock.release()


# -- keys of the wrong type ----------------------------------------------------------------


FOREIGN: dict[str, tuple[str, Callable[[], Any]]] = {
    "Lock": ("lock", lambda: Lock("x").acquire(timeout=1)),
    "RLock": ("lock", lambda: RLock("x").acquire(timeout=1)),
    "Lock.release": ("lock", lambda: Lock("x").release()),
    "Semaphore": ("sem", lambda: Semaphore(2, name="x").acquire(timeout=1)),
    "Semaphore.value": ("sem", lambda: Semaphore(2, name="x").value),
    "Semaphore.release": ("sem", lambda: Semaphore(2, name="x").release()),
    "BoundedSemaphore": ("bsem", lambda: BoundedSemaphore(2, name="x").acquire(timeout=1)),
    "Event.set": ("event", lambda: Event("x").set()),
    "Event.wait": ("event", lambda: Event("x").wait(0.1)),
    "Event.clear": ("event", lambda: Event("x").clear()),
}


def _plant(raw: redis.Redis, key: str, how: str) -> Callable[[], object]:
    """Write a foreign value of type ``how`` at ``key``; return a reader of it."""
    if how == "string":
        raw.set(key, "someone else's")
        return lambda: raw.get(key)
    if how == "list":
        raw.rpush(key, "a", "b")
        return lambda: raw.lrange(key, 0, -1)
    raw.hset(key, mapping={"owner": "someone else", "v": "7"})  # a hash without our fields
    return lambda: raw.hgetall(key)


@pytest.mark.parametrize("how", ["string", "list", "foreign-hash"])
@pytest.mark.parametrize("op", list(FOREIGN))
def test_a_foreign_value_at_our_key_is_wrong_type_and_left_alone(
    ps_url: str, raw: redis.Redis, op: str, how: str
) -> None:
    kind, call = FOREIGN[op]
    key = state_key(kind, "x")
    read = _plant(raw, key, how)
    before = read()
    with pytest.raises(WrongTypeError) as info:
        call()
    assert isinstance(info.value, TypeError)
    assert read() == before
    assert raw.ttl(key) == -1
    assert set(leftover_keys(raw)) <= {key}


@pytest.mark.parametrize(
    ("tag", "call", "kind"),
    [
        pytest.param("q", lambda: Lock("x").acquire(timeout=1), "lock", id="lock"),
        pytest.param("q", lambda: Semaphore(2, name="x").acquire(timeout=1), "sem", id="sem"),
        pytest.param("w", lambda: Event("x").set(), "event", id="event-set"),
        pytest.param("w", lambda: Event("x").wait(0.1), "event", id="event-wait"),
    ],
)
def test_a_foreign_value_at_our_side_key_changes_nothing(
    ps_url: str, raw: redis.Redis, tag: str, call: Callable[[], Any], kind: str
) -> None:
    state = state_key(kind, "x")
    side = side_key(state[: -len(f"{kind}:x")], kind, tag, "x")
    raw.set(side, "someone else's")
    with pytest.raises(WrongTypeError):
        call()
    assert raw.get(side) == "someone else's"
    assert not raw.exists(state)  # nothing half-done


# -- names in use with another shape ----------------------------------------------------------


@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_same_name_other_value_is_a_conflict(ps_url: str, raw: redis.Redis, cls: type) -> None:
    sem = cls(3, name="ktv")
    assert sem.acquire()
    key = state_key("sem" if cls is Semaphore else "bsem", "ktv")
    before = raw.hgetall(key)
    other = cls(5, name="ktv")
    for call in (
        lambda: other.acquire(timeout=1),
        lambda: other.release(),
        lambda: other.value,
    ):
        with pytest.raises(ConflictError) as info:
            call()
        assert isinstance(info.value, ValueError)
        assert "3" in str(info.value)
    assert raw.hgetall(key) == before
    sem.release()
    # once nothing is held, the name is free for another value
    assert leftover_keys(raw) == []
    assert other.acquire(timeout=1)
    other.release()


def test_each_kind_has_its_own_names(ps_url: str, raw: redis.Redis) -> None:
    """ConflictError is for one kind with another shape; a Lock, an Event and a
    Semaphore called "x" are three primitives (Lock and RLock of one name are one)."""
    lock, ev = Lock("x"), Event("x")
    sem, bsem = Semaphore(1, name="x"), BoundedSemaphore(1, name="x")
    assert lock.acquire(timeout=1)
    ev.set()
    assert sem.acquire(timeout=1)
    assert bsem.acquire(timeout=1)
    assert RLock("x").acquire(timeout=0.1) is False  # the same lock as Lock("x")
    assert ev.is_set() and lock.locked() and sem.value == 0 and bsem.value == 0
    lock.release()
    sem.release()
    bsem.release()
    ev.clear()
    assert leftover_keys(raw) == []
