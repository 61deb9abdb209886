"""Bad input gets a clear error before any server call, and odd but valid names
work and stay apart."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from helpers.keys import leftover_keys, state_key, stored_keys
from helpers.procs import InThread, wait_until
from procsync import BoundedSemaphore, Event, Lock, RLock, Semaphore

pytest_plugins = ["helpers.fixtures"]

SCRIPTING = ("cmdstat_eval", "cmdstat_evalsha", "cmdstat_script", "cmdstat_blpop")


@pytest.fixture
def untouched(raw: redis.Redis) -> Iterator[redis.Redis]:
    """Fails the test if procsync ran a script (or left a key) on the server."""
    raw.config_resetstat()
    yield raw
    stats = raw.info("commandstats")
    assert [c for c in SCRIPTING if c in stats] == []
    assert stored_keys(raw) == []


CONSTRUCTORS: dict[str, Callable[[Any], object]] = {
    "Lock": lambda name: Lock(name),
    "RLock": lambda name: RLock(name),
    "Event": lambda name: Event(name),
    "Semaphore": lambda name: Semaphore(2, name=name),
    "BoundedSemaphore": lambda name: BoundedSemaphore(2, name=name),
}


@pytest.mark.parametrize("kind", list(CONSTRUCTORS))
@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", ValueError),
        ("x" * 201, ValueError),
        ("x" * 100_000, ValueError),
        ("line\nbreak", ValueError),
        ("nul\x00byte", ValueError),
        ("tab\tchar", ValueError),
        ("del\x7f", ValueError),
        ("\r\n", ValueError),
        (123, TypeError),
        (b"bytes", TypeError),
        (1.5, TypeError),
        (object(), TypeError),
    ],
    ids=[
        "empty",
        "201-chars",
        "100k-chars",
        "newline",
        "nul",
        "tab",
        "del",
        "crlf",
        "int",
        "bytes",
        "float",
        "object",
    ],
)
def test_bad_names_are_rejected_by_the_constructor(
    ps_url: str, untouched: redis.Redis, kind: str, name: object, error: type[Exception]
) -> None:
    with pytest.raises(error) as info:
        CONSTRUCTORS[kind](name)
    assert "name" in str(info.value)


@pytest.mark.parametrize(
    ("value", "error"),
    [("3", TypeError), (3.0, TypeError), (None, TypeError), (-1, ValueError), (10**7, ValueError)],
)
@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_bad_semaphore_values(
    ps_url: str, untouched: redis.Redis, cls: type, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        cls(value, name="v")


def test_negative_semaphore_value_is_the_same_error_as_threading(
    ps_url: str, untouched: redis.Redis
) -> None:
    with pytest.raises(ValueError):
        threading.Semaphore(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        Semaphore(-1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"blocking": False, "timeout": 1}, ValueError),  # as threading
        ({"blocking": False, "timeout": 0}, ValueError),  # as threading
        ({"timeout": -2}, ValueError),  # as threading: only -1 means forever
        ({"timeout": -0.5}, ValueError),
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": float("inf")}, ValueError),
        ({"timeout": 1e20}, ValueError),
        ({"timeout": "1"}, TypeError),
        ({"timeout": [1]}, TypeError),
    ],
)
@pytest.mark.parametrize("cls", [Lock, RLock])
def test_bad_lock_acquire_arguments(
    ps_url: str, untouched: redis.Redis, cls: type, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        cls("args").acquire(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"blocking": False, "timeout": 1}, {"timeout": -2}, {"timeout": "1"}],
)
def test_lock_argument_errors_match_threading(
    ps_url: str, untouched: redis.Redis, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(Exception) as std:
        threading.Lock().acquire(**kwargs)
    with pytest.raises(Exception) as ours:
        Lock("parity").acquire(**kwargs)
    assert isinstance(ours.value, type(std.value))


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"blocking": False, "timeout": 1}, ValueError),  # as threading
        ({"timeout": float("nan")}, ValueError),
        ({"timeout": float("inf")}, ValueError),
        ({"timeout": 1e20}, ValueError),
        ({"timeout": "1"}, TypeError),
    ],
)
@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_bad_semaphore_acquire_arguments(
    ps_url: str, untouched: redis.Redis, cls: type, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        cls(1, name="args").acquire(**kwargs)


@pytest.mark.parametrize(
    ("n", "error"), [(0, ValueError), (-1, ValueError), ("2", TypeError), (2.0, TypeError)]
)
@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_bad_release_counts(
    ps_url: str, untouched: redis.Redis, cls: type, n: object, error: type
) -> None:
    with pytest.raises(error):
        cls(1, name="n").release(n)


@pytest.mark.parametrize(
    ("timeout", "error"),
    [(float("nan"), ValueError), (float("inf"), ValueError), (1e20, ValueError), ("1", TypeError)],
)
def test_bad_event_wait_timeouts(
    ps_url: str, untouched: redis.Redis, timeout: object, error: type
) -> None:
    with pytest.raises(error):
        Event("e").wait(timeout)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"url": 123}, TypeError),
        ({"namespace": "a{b"}, ValueError),
        ({"namespace": ""}, ValueError),
        ({"namespace": 5}, TypeError),
    ],
)
def test_bad_url_and_namespace_types(
    ps_url: str, untouched: redis.Redis, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        Lock("x", **kwargs)


@pytest.mark.parametrize("bad_url", ["http://localhost:6379", "localhost:6379", "redis"])
def test_unsupported_url_schemes(ps_url: str, untouched: redis.Redis, bad_url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        Lock("x", url=bad_url).acquire(timeout=1)


@pytest.mark.parametrize("ttl", ["abc", "0", "-1", "nan", "inf", "0.01"])
def test_bad_ttl_in_the_environment(
    ps_url: str, untouched: redis.Redis, monkeypatch: pytest.MonkeyPatch, ttl: str
) -> None:
    monkeypatch.setenv("PROCSYNC_TTL", ttl)
    with pytest.raises(ValueError, match=r"(?i)ttl"):
        Lock("x").acquire(timeout=1)


# -- odd but valid names -------------------------------------------------------------


ODD_NAMES = [
    "x" * 200,
    "票🎫 ünïcödé",
    "with space",
    "a:b:c",
    "{braces}",
    "*?[glob]",
    "']) redis.call('FLUSHALL') --",
    "procsync:{default}:lock:x",
]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_odd_names_work_and_round_trip(ps_url: str, raw: redis.Redis, name: str) -> None:
    raw.set("bystander", "still here")
    lock = Lock(name)
    assert lock.name == name
    assert lock.acquire(timeout=5)
    assert state_key("lock", name) in leftover_keys(raw)
    lock.release()
    ev = Event(name)
    ev.set()
    assert Event(name).is_set()
    ev.clear()
    sem = Semaphore(2, name=name)
    assert sem.acquire(timeout=5)
    assert sem.value == 1
    sem.release()
    assert leftover_keys(raw) == []
    assert raw.get("bystander") == "still here"


def test_lock_names_never_collide_with_internal_keys(ps_url: str) -> None:
    """While Lock "x" has a waiter (so its queue exists), Lock "x:q" is just another
    lock."""
    base, other = Lock("x"), Lock("x:q")
    base.acquire()
    waiter = InThread(lambda: base.acquire(timeout=5))
    try:
        wait_until(lambda: base.statistics().waiting == 1, what="the waiter to queue")
        assert other.acquire(timeout=2)
        other.release()
    finally:
        base.release()
        assert waiter.join(10) is True
        base.release()


def test_event_names_never_collide_with_internal_keys(ps_url: str) -> None:
    """While Event "e" has a waiter (so its waiter list exists), Event "e:w" is just
    another event."""
    base, other = Event("e"), Event("e:w")
    waiter = InThread(lambda: base.wait(5))
    try:
        wait_until(lambda: base.waiting() == 1, what="the waiter to register")
        other.set()
        assert other.is_set()
        other.clear()
    finally:
        base.set()
        assert waiter.join(10) is True
