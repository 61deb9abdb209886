"""The Backend's own connections: one per thread for script calls and one for pops,
per-event-loop free lists for asyncio (``procsync.backend.client``).

Everything here runs against real servers (``url``: the shared one; ``fresh_server``:
a private one the test may restart, kill, pause or count the clients of). What a
script did is read back from the server: a Value's counter says how many times an
``add`` ran, a Lock's fencing token how many grants there were, ``CLIENT LIST``
which connections exist and what each ran last.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from helpers.procs import wait_until
from procsync import Lock, ServerUnavailableError, WrongTypeError
from procsync._drivers import arun, run
from procsync.backend.client import Backend
from procsync.backend.scripts import script_source
from procsync.core import value as vcore
from procsync.session import close_all
from procsync.testing import ServerProcess

SECRET = "s3cr3t-pw-Kx7"


# -- helpers -------------------------------------------------------------------------


def counter(b: Backend, name: str = "n") -> vcore.ValueRef:
    """A Value counter at 0 on ``b``'s server (created by one script call)."""
    ref = vcore.ValueRef(b, name, int, "q")
    assert run(b, vcore.open_(ref, 0)) == 0
    return ref


def add(ref: vcore.ValueRef) -> int:
    return int(run(ref.backend, vcore.add(ref, 1)))


def get(ref: vcore.ValueRef) -> int:
    return int(run(ref.backend, vcore.get(ref, -1)))


async def aadd(ref: vcore.ValueRef) -> int:
    return int(await arun(ref.backend, vcore.add(ref, 1)))


async def aget(ref: vcore.ValueRef) -> int:
    return int(await arun(ref.backend, vcore.get(ref, -1)))


def clients(r: redis.Redis, cmd: str | None = None) -> dict[int, dict[str, Any]]:
    """The server's clients other than ``r``'s own, by id; only those whose last
    command was ``cmd`` if given."""
    me = int(r.client_id())
    out = {}
    for c in r.client_list():
        if int(c["id"]) != me and (cmd is None or c["cmd"] == cmd):
            out[int(c["id"])] = c
    return out


def kill_all_but(r: redis.Redis) -> None:
    """CLIENT KILL every normal connection except ``r``'s, and wait (bounded) until
    the server lists none."""
    r.client_kill_filter(_type="normal", skipme=True)
    wait_until(lambda: not clients(r), 5.0, what="the killed clients to go")


@pytest.fixture
def raw(fresh_server: ServerProcess) -> Iterator[redis.Redis]:
    """A plain client of the test's private server (never one of procsync's)."""
    r = fresh_server.client(decode_responses=True)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def backend(fresh_server: ServerProcess) -> Iterator[Backend]:
    """A Backend of its own (not the process-wide one) on the private server."""
    b = Backend(fresh_server.url, "conns")
    try:
        yield b
    finally:
        b.close()


# -- the script is loaded again when the server forgot it -----------------------------


def test_a_call_after_a_server_restart_reloads_the_script(
    fresh_server: ServerProcess, backend: Backend
) -> None:
    sha = hashlib.sha1(script_source("value").encode()).hexdigest()
    ref = counter(backend)
    assert add(ref) == 1
    fresh_server.restart()  # a new server process: no data, no scripts
    with fresh_server.client(decode_responses=True) as r:
        assert r.script_exists(sha) == [False]
        assert run(backend, vcore.open_(ref, 10)) == 10  # loads the script, runs it once
        assert add(ref) == 11
        assert r.script_exists(sha) == [True]


def test_script_flush_between_calls_reloads_and_runs_the_call_once(
    raw: redis.Redis, backend: Backend
) -> None:
    ref = counter(backend)
    assert add(ref) == 1
    raw.script_flush()
    assert add(ref) == 2  # NOSCRIPT, SCRIPT LOAD, the call again: one add, not two
    assert get(ref) == 2
    raw.script_flush()
    assert asyncio.run(asyncio.wait_for(aadd(ref), 10)) == 3
    assert get(ref) == 3


# -- a connection the server closed is replaced before anything is sent ---------------


def test_a_call_after_client_kill_succeeds_and_runs_once(
    raw: redis.Redis, backend: Backend
) -> None:
    ref = counter(backend)
    assert add(ref) == 1
    for expected in (2, 3):
        kill_all_but(raw)
        assert add(ref) == expected
    assert get(ref) == 3


def test_a_lock_acquired_after_client_kill_gets_the_next_fencing_token(
    fresh_server: ServerProcess, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The acquire after the kill makes one grant: one hold on the server, nobody
    queued (an acquire run twice without its waiter id would have queued behind
    itself), and a token above the one before."""
    close_all()
    monkeypatch.setenv("PROCSYNC_URL", fresh_server.url)
    try:
        lock = Lock("fenced")
        assert lock.acquire(timeout=5)
        first = lock.token
        lock.release()
        kill_all_but(raw)
        assert lock.acquire(timeout=5)
        assert first is not None and lock.token is not None and lock.token > first
        state = raw.hgetall(lock.ref.key)
        assert [f for f in state if f.startswith("h:")] and not raw.exists(lock.ref.queue_key)
        assert [v for f, v in state.items() if f.startswith("h:")] == ["1"]
        lock.release()
        assert not lock.locked()
    finally:
        close_all()


def test_a_pop_after_client_kill_takes_exactly_one_item(raw: redis.Redis, backend: Backend) -> None:
    raw.rpush("items", "a", "b", "c")
    assert backend.pop("items", 1.0) == "a"
    kill_all_but(raw)
    assert backend.pop("items", 1.0) == "b"
    assert raw.lrange("items", 0, -1) == ["c"]


def test_an_async_call_after_client_kill_succeeds_and_runs_once(
    raw: redis.Redis, backend: Backend
) -> None:
    ref = counter(backend)

    async def main() -> list[int]:
        got = [await aadd(ref)]
        for _ in range(2):
            kill_all_but(raw)
            await asyncio.sleep(0.05)  # the loop reads the EOF of the idle connection
            got.append(await aadd(ref))
        raw.rpush("items", "x", "y")
        assert await backend.apop("items", 1.0) == "x"
        kill_all_but(raw)
        await asyncio.sleep(0.05)
        assert await backend.apop("items", 1.0) == "y"
        return got

    assert asyncio.run(asyncio.wait_for(main(), 20)) == [1, 2, 3]
    assert get(ref) == 3


def test_a_timed_out_call_is_not_sent_again_even_with_retry_on_timeout(
    fresh_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The URL asks redis-py to retry on timeouts, which for a plain command means
    sending it again on a new connection. A script whose reply timed out may have run
    -- here the paused server runs it on resuming, between the timeout and the time
    a resend would arrive -- so it is reported as a failure, never sent again."""
    monkeypatch.setenv("PROCSYNC_SOCKET_TIMEOUT", "0.5")
    b = Backend(fresh_server.url + "?retry_on_timeout=true", "conns")

    def paused_for(secs: float) -> threading.Timer:
        fresh_server.pause()
        timer = threading.Timer(secs, fresh_server.resume)
        timer.start()
        return timer

    async def aadd_paused() -> int:
        n = await aadd(ref)  # the loop's connection is made and idle
        timer = paused_for(0.75)  # past the timeout, before a resend's would end
        try:
            with pytest.raises(ServerUnavailableError):
                await aadd(ref)
        finally:
            timer.join(5)
        return n

    try:
        ref = counter(b)
        assert add(ref) == 1
        timer = paused_for(0.75)
        try:
            with pytest.raises(ServerUnavailableError):
                add(ref)
        finally:
            timer.join(5)
        assert wait_until(lambda: get(ref) == 2, 5.0, what="the timed-out add run once")
        assert asyncio.run(asyncio.wait_for(aadd_paused(), 10)) == 3
        assert wait_until(lambda: get(ref) == 4, 5.0, what="the timed-out add run once")
        time.sleep(0.5)  # a resend would show by now
        assert get(ref) == 4
    finally:
        if fresh_server.paused:
            fresh_server.resume()
        b.close()


# -- whose connection is whose -----------------------------------------------------------


def test_each_thread_uses_its_own_connection_and_keeps_it(
    raw: redis.Redis, backend: Backend
) -> None:
    """Three threads have called: three connections last ran EVALSHA; more calls
    from the same threads open no more."""
    ref = counter(backend)  # the main thread
    called = threading.Barrier(3, timeout=10)
    again, finish = threading.Barrier(3, timeout=10), threading.Event()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            add(ref)
            called.wait()  # every thread has called once and is still alive
            called.wait()  # the main thread has looked
            for _ in range(5):
                add(ref)
            again.wait()
            finish.wait(10)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        called.wait()
        first = set(clients(raw, "evalsha"))
        assert len(first) == 3
        called.wait()
        for _ in range(5):
            add(ref)
        again.wait()
        assert set(clients(raw, "evalsha")) == first
    finally:
        finish.set()
        for t in threads:
            t.join(10)
    assert not errors
    assert get(ref) == 2 + 10 + 5


def test_a_finished_thread_closes_its_connection(raw: redis.Redis, backend: Backend) -> None:
    ref = counter(backend)
    t = threading.Thread(target=lambda: add(ref), daemon=True)
    t.start()
    t.join(10)
    # only the main thread's connection stays (the thread's closed with its locals)
    wait_until(lambda: len(clients(raw, "evalsha")) == 1, 5.0, what="the thread's close")
    assert get(ref) == 1


def test_more_threads_than_the_pool_size_over_time_all_get_connections(
    raw: redis.Redis, backend: Backend
) -> None:
    """redis-py's pool allows 100 connections by default; threads' own connections
    are not drawn from it, and each closes with its thread."""
    ref = counter(backend)
    raw.rpush("items", *["x"] * 150)
    for i in range(150):
        t = threading.Thread(target=lambda: (add(ref), backend.pop("items", 1.0)))
        t.start()
        t.join(10)
        assert not t.is_alive(), f"thread {i} hung"
    assert get(ref) == 150
    assert raw.llen("items") == 0
    wait_until(lambda: len(clients(raw)) <= 2, 5.0, what="the threads' connections to close")


def test_concurrent_tasks_on_one_loop_do_not_share_a_connection(
    fresh_server: ServerProcess, raw: redis.Redis, backend: Backend
) -> None:
    """Five calls in flight at once (the server paused while they are sent) are on
    five connections; each task reads its own reply."""
    ref = counter(backend)

    async def main() -> list[int]:
        assert await aadd(ref) == 1  # the loop's first connection, now idle
        fresh_server.pause()
        try:
            tasks = [asyncio.ensure_future(aadd(ref)) for _ in range(5)]
            await asyncio.sleep(0.2)  # every task sent its call; nothing answered
            assert not any(t.done() for t in tasks)
        finally:
            fresh_server.resume()
        return list(await asyncio.wait_for(asyncio.gather(*tasks), 10))

    got = asyncio.run(asyncio.wait_for(main(), 20))
    assert sorted(got) == [2, 3, 4, 5, 6]
    # the sync counter() call's connection and the loop's five (kept idle)
    assert len(clients(raw, "evalsha")) == 6


def test_a_cancelled_async_call_never_lends_its_connection(
    fresh_server: ServerProcess, raw: redis.Redis, backend: Backend
) -> None:
    """A call cancelled while its reply is pending: its connection is closed, not put
    back, so the reply that arrives later is read by no one, and the next call reads
    its own reply."""
    ref = counter(backend)

    async def main() -> tuple[int, int, int]:
        assert await aadd(ref) == 1
        idle = set(clients(raw, "evalsha"))  # the sync call's and the loop's one
        fresh_server.pause()
        try:
            step = ref.call("add", "1")
            task = asyncio.ensure_future(backend.acall(step.script, step.keys, step.args))
            await asyncio.sleep(0.2)  # sent on the idle connection; no reply yet
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            fresh_server.resume()
        after = await aadd(ref)
        now = await aget(ref)
        # The cancelled call's connection is gone from the server (closed by us)...
        wait_until(lambda: len(set(clients(raw)) & idle) == 1, 5.0, what="the close")
        return after, now, len(clients(raw, "evalsha"))

    after, now, n = asyncio.run(asyncio.wait_for(main(), 20))
    # ...and the next call got a reply of its own: the value after its add (3 if the
    # server still ran the cancelled add, whose command it had received, else 2).
    assert after == now
    assert now in (2, 3)
    assert n == 2  # the sync connection and one new asyncio connection


def test_an_async_call_cancelled_while_its_command_is_written_never_completes(
    fresh_server: ServerProcess, raw: redis.Redis, backend: Backend
) -> None:
    """A command too big for the socket buffers of a paused server is still being
    written when the task is cancelled: the connection is closed with the command
    half sent, so the server never runs it, and the next call is not appended to it."""
    ref = counter(backend)
    big = vcore.ValueRef(backend, "big", str, None)

    async def main() -> int:
        assert await aadd(ref) == 1
        fresh_server.pause()
        try:
            step = big.call("set", "x" * (16 << 20))
            task = asyncio.ensure_future(backend.acall(step.script, step.keys, step.args))
            await asyncio.sleep(0.3)  # the buffers are full; the write waits
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            fresh_server.resume()
        return await aadd(ref)

    assert asyncio.run(asyncio.wait_for(main(), 20)) == 2
    assert run(backend, vcore.get(big, "absent")) == "absent"
    assert get(ref) == 2


# -- a nested call on the same thread ---------------------------------------------------


def test_a_call_from_a_signal_handler_during_a_call_gets_its_own_connection(
    fresh_server: ServerProcess, backend: Backend
) -> None:
    """A signal handler (or a finaliser) that calls the server while this thread waits
    for a reply must not write on the connection that reply will come on."""
    ref, other = counter(backend, "outer"), counter(backend, "inner")
    nested: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        fresh_server.resume()
        nested.append(add(other))

    old = signal.signal(signal.SIGALRM, handler)
    try:
        fresh_server.pause()
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert add(ref) == 1  # blocked in the read when the handler runs
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if fresh_server.paused:
            fresh_server.resume()
    assert nested == [1]
    assert (get(ref), get(other)) == (1, 1)


def test_a_pop_from_a_signal_handler_during_a_pop_gets_its_own_connection(
    raw: redis.Redis, backend: Backend
) -> None:
    raw.rpush("inner", "in")
    nested: list[str | None] = []

    def handler(signum: int, frame: Any) -> None:
        nested.append(backend.pop("inner", 1.0))
        raw.rpush("outer", "out")

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        assert backend.pop("outer", 5.0) == "out"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert nested == ["in"]
    assert backend.pop("outer", 0.01) is None


# -- fork --------------------------------------------------------------------------------


def _wait_child(pid: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"child {pid} still running after {timeout:g}s")


def test_a_forked_child_does_not_use_its_parents_connection(
    fresh_server: ServerProcess, raw: redis.Redis, backend: Backend
) -> None:
    """The child calls through the Backend object it inherited: a connection of its
    own appears on the server; the parent's connection is the same one before and
    after, still works, and is never shut down by the child."""
    ref = counter(backend)
    assert add(ref) == 1
    parent_conns = set(clients(raw, "evalsha"))
    assert len(parent_conns) == 1
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            os.close(rfd)
            got = add(ref)
            with fresh_server.client(decode_responses=True) as r:
                ids = sorted(clients(r, "evalsha"))
            os.write(wfd, json.dumps({"got": got, "ids": ids}).encode())
            code = 0
        except BaseException:
            os.write(wfd, json.dumps({"error": traceback.format_exc()}).encode())
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        assert _wait_child(pid) == 0
        with os.fdopen(rfd, "rb") as f:
            report = json.loads(f.read() or b"{}")
    finally:
        with pytest.raises(OSError):
            os.close(rfd)  # closed by fdopen
    assert "error" not in report, report.get("error")
    assert report["got"] == 2
    child_conns = set(report["ids"]) - parent_conns
    assert set(report["ids"]) >= parent_conns and len(child_conns) == 1
    # The child has exited (its connection closes); the parent's is untouched.
    assert add(ref) == 3
    wait_until(lambda: set(clients(raw, "evalsha")) == parent_conns, 5.0, what="child gone")


# -- errors ------------------------------------------------------------------------------


def test_a_dead_server_is_server_unavailable_quickly_without_the_password(
    fresh_server: ServerProcess, tmp_path: Path
) -> None:
    with fresh_server.client() as r:
        r.config_set("requirepass", SECRET)
    b = Backend(f"unix://:{SECRET}@{fresh_server.socket_path}", "conns")
    try:
        ref = counter(b)
        assert add(ref) == 1
        fresh_server.kill()
        calls: list[Any] = [
            lambda: add(ref),
            lambda: b.pop("k", 1.0),
            lambda: asyncio.run(asyncio.wait_for(aadd(ref), 10)),
            lambda: asyncio.run(asyncio.wait_for(b.apop("k", 1.0), 10)),
        ]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(ServerUnavailableError) as info:
                call()
            assert time.monotonic() - t0 < 5.0
            text = "".join(traceback.format_exception(info.value))
            assert SECRET not in text
            assert str(fresh_server.socket_path) in str(info.value)
            assert "***" in str(info.value)
    finally:
        b.close()


def test_a_value_of_another_type_is_wrong_type_and_the_connection_stays_usable(
    raw: redis.Redis, backend: Backend
) -> None:
    ref = counter(backend)
    raw.delete(ref.key)
    raw.rpush(ref.key, "someone else's")
    raw.set("alist", "not a list")
    raw.rpush("items", "a", "b")
    before = set(clients(raw))
    with pytest.raises(WrongTypeError):
        add(ref)
    with pytest.raises(WrongTypeError):
        backend.pop("alist", 0.1)
    assert backend.pop("items", 1.0) == "a"

    async def main() -> str | None:
        with pytest.raises(WrongTypeError):
            await aadd(ref)
        with pytest.raises(WrongTypeError):
            await backend.apop("alist", 0.1)
        return await backend.apop("items", 1.0)

    assert asyncio.run(asyncio.wait_for(main(), 10)) == "b"
    assert raw.lrange(ref.key, 0, -1) == ["someone else's"]
    other = counter(backend, "other")
    assert add(other) == 1
    # the sync error replies did not cost the thread its connections
    assert before <= set(clients(raw))


# -- close -------------------------------------------------------------------------------


def test_close_drops_every_threads_connections_and_later_calls_reconnect(
    raw: redis.Redis, backend: Backend
) -> None:
    ref = counter(backend)
    raw.rpush("items", "a", "b")
    assert backend.pop("items", 1.0) == "a"
    called, closed = threading.Event(), threading.Event()
    after: list[int] = []

    def worker() -> None:
        add(ref)
        called.set()
        closed.wait(10)
        after.append(add(ref))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    assert called.wait(10)
    assert len(clients(raw, "evalsha")) == 2
    assert len(clients(raw, "blpop")) == 1
    backend.close()
    wait_until(lambda: not clients(raw), 5.0, what="every connection closed")
    closed.set()
    t.join(10)
    assert after == [2]
    assert add(ref) == 3
    assert backend.pop("items", 1.0) == "b"


def test_close_retires_an_event_loops_connections_too(raw: redis.Redis, backend: Backend) -> None:
    ref = counter(backend)
    backend.close()  # the sync one: closed now

    async def main() -> int:
        assert await aadd(ref) == 1
        before = set(clients(raw, "evalsha"))
        backend.close()
        assert await aadd(ref) == 2  # a new loop state; the old one closes its own
        for _ in range(100):  # bounded: 100 x 20 ms
            now = set(clients(raw, "evalsha"))
            if not now & before:
                return len(now)
            await asyncio.sleep(0.02)
        raise AssertionError(f"still open: {now & before}")

    assert asyncio.run(asyncio.wait_for(main(), 10)) == 1
