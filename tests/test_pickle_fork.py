"""The seed's style: create primitives in the parent, hand them to children through
``multiprocessing.Process(args=...)`` under fork, spawn and forkserver."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from typing import Any

import pytest
import redis

from helpers import workers
from helpers.keys import state_key
from procsync import BoundedSemaphore, Event, Lock, RLock, Semaphore

pytest_plugins = ["helpers.fixtures"]


def make_set(named: bool, url: str | None = None) -> dict[str, Any]:
    """One primitive of each kind, named or anonymous (on ``url``, default: the
    environment's)."""

    def n(x: str) -> str | None:
        return f"passed-{x}" if named else None

    return {
        "lock": Lock(n("lock"), url=url),
        "rlock": RLock(n("rlock"), url=url),
        "sem": Semaphore(2, name=n("sem"), url=url),
        "bsem": BoundedSemaphore(2, name=n("bsem"), url=url),
        "event": Event(n("event"), url=url),
    }


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_primitives_passed_to_a_child_are_the_same_primitives(ps_url: str, method: str) -> None:
    ctx = multiprocessing.get_context(method)
    # The server comes from PROCSYNC_URL; the forkserver (one per pytest process) may
    # have been started with another leg's environment: pickles carry their server.
    sets = [make_set(named=True), make_set(named=False)]
    for prims in sets:
        assert prims["lock"].acquire()
        assert prims["rlock"].acquire()
        assert prims["sem"].acquire()
        assert prims["bsem"].acquire()
    out = ctx.Queue()
    p = ctx.Process(target=workers.use_passed_primitives, args=(sets, out))
    p.start()
    try:
        report = out.get(timeout=60)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)
    assert p.exitcode == 0
    assert len(report) == 2
    for prims, seen in zip(sets, report, strict=True):
        assert seen["pid"] != os.getpid()
        assert seen["types"] == {k: type(v).__name__ for k, v in prims.items()}
        assert seen["names"] == {k: v.name for k, v in prims.items()}
        assert seen["lock"] == (True, False)  # ours, not the child's
        assert seen["rlock"] == (True, False)
        assert seen["sem"] == (1, True, 0)  # one permit is ours, the child took the other
        assert seen["bsem"] == (1, True, 0)
        assert seen["bsem_over"] == "OverReleaseError"
        assert seen["event"] == (False, False)
        # and what the child did, the parent sees
        assert prims["event"].is_set()
        assert prims["sem"].value == 1 and prims["bsem"].value == 1
        assert prims["lock"].owner().pid == os.getpid()
        prims["lock"].release()
        prims["rlock"].release()
        prims["sem"].release()
        prims["bsem"].release()
        prims["event"].clear()


@pytest.mark.parametrize("named", [True, False], ids=["named", "anonymous"])
def test_pickle_round_trip_keeps_name_kind_and_value(ps_url: str, named: bool) -> None:
    for prim in make_set(named).values():
        copy = pickle.loads(pickle.dumps(prim))
        assert type(copy) is type(prim)
        assert copy.name == prim.name
        if isinstance(prim, Semaphore):
            assert copy.initial_value == prim.initial_value


def test_pickle_keeps_an_explicit_url_and_namespace(ps_url: str, raw: redis.Redis) -> None:
    lock = Lock("where", url=ps_url, namespace="tenant")
    copy = pickle.loads(pickle.dumps(lock))
    assert copy.acquire(timeout=5)
    assert raw.exists("procsync:{tenant}:lock:where")
    assert lock.locked()
    copy.release()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_an_anonymous_event_set_by_a_child_still_expires(
    ps_url: str, raw: redis.Redis, method: str
) -> None:
    ev = Event()
    ctx = multiprocessing.get_context(method)
    p = ctx.Process(target=ev.set)
    p.start()
    p.join(30)
    assert p.exitcode == 0
    assert ev.is_set()
    assert raw.pttl(state_key("event", ev.name)) > 0


def test_a_pickled_primitive_names_its_server(
    ps_url: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DESIGN: every primitive pickles as (url, namespace, name)."""
    lock = Lock("which-server")
    assert lock.acquire()
    monkeypatch.setenv("PROCSYNC_URL", f"unix://{tmp_path}/elsewhere.sock")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=workers.report_locked, args=(lock, out))
    p.start()
    try:
        seen = out.get(timeout=60)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
            p.join(10)
    lock.release()
    assert seen == "locked=True"
