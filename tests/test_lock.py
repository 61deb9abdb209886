"""Lock against threading.Lock: acquire/release/locked, timeouts, ownership, FIFO,
mutual exclusion between unrelated processes, and no keys left behind."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.keys import leftover_keys
from helpers.procs import Child, ChildFactory, wait_until
from procsync import Lock, NotHeldError, NotOwnerError, RLock, Semaphore
from procsync.core import permits
from procsync.core.steps import Call, Cleanup, Pop
from procsync.errors import ServerUnavailableError
from procsync.session import close_all, session_for, usable_session

pytest_plugins = ["helpers.fixtures"]

HOLDER = """
lock = Lock({name!r})
say("ready")
hear()
lock.acquire()
say("held", lock.token, os.getpid())
while True:
    cmd = hear()
    if cmd == "release":
        lock.release()
        say("released")
    elif cmd == "exit":
        break
"""


def start_holder(children: ChildFactory, name: str) -> tuple[Child, int]:
    c = children(HOLDER.format(name=name), name="holder")
    c.expect("ready")
    c.send()
    token, _pid = c.expect("held")
    return c, int(token)


def test_acquire_release_locked(ps_url: str) -> None:
    lock = Lock("l")
    assert lock.name == "l"
    assert not lock.locked()
    assert lock.owner() is None
    assert lock.token is None
    assert lock.acquire() is True
    assert lock.locked()
    owner = lock.owner()
    assert owner is not None
    assert owner.pid == multiprocessing.current_process().pid
    assert isinstance(lock.token, int) and lock.token > 0
    lock.release()
    assert not lock.locked()
    assert lock.owner() is None


def test_context_manager_returns_true_and_releases_on_exception(ps_url: str) -> None:
    lock = Lock("cm")
    with lock as got:
        assert got is True
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(KeyError), lock:
        raise KeyError("inside")
    assert not lock.locked()


def test_blocking_false_when_free_and_when_held(ps_url: str, children: ChildFactory) -> None:
    lock = Lock("nb")
    assert lock.acquire(blocking=False) is True
    lock.release()
    # threading allows timeout=-1 with blocking=False
    assert lock.acquire(False, -1) is True
    lock.release()
    start_holder(children, "nb")
    t0 = time.monotonic()
    assert lock.acquire(blocking=False) is False
    assert lock.acquire(False) is False
    assert time.monotonic() - t0 < 1.0
    assert lock.locked()


def test_timeout_gives_up_after_the_timeout(ps_url: str, children: ChildFactory) -> None:
    lock = Lock("to")
    start_holder(children, "to")
    t0 = time.monotonic()
    assert lock.acquire(timeout=0.3) is False
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2.0
    t0 = time.monotonic()
    assert lock.acquire(timeout=0) is False
    assert time.monotonic() - t0 < 1.0
    assert lock.acquire(True, 0.05) is False
    # the timed-out waiter left the queue
    assert lock.statistics().waiting == 0


def test_timeout_minus_one_waits_until_released(ps_url: str, children: ChildFactory) -> None:
    lock = Lock("forever")
    holder, _ = start_holder(children, "forever")
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(lock.acquire(timeout=-1)))
    t.start()
    try:
        wait_until(lambda: lock.statistics().waiting == 1, what="the waiter to queue")
        assert not result
        holder.send("release")
        holder.expect("released")
    finally:
        t.join(10)
    assert result == [True]
    lock.release()


def test_same_thread_acquiring_twice_is_not_reentrant(ps_url: str) -> None:
    lock = Lock("twice")
    assert lock.acquire()
    assert lock.acquire(timeout=0.1) is False
    assert lock.acquire(blocking=False) is False
    lock.release()


def test_another_thread_of_the_holding_process_may_release(ps_url: str) -> None:
    # threading.Lock allows it; procsync keeps that within one process.
    lock = Lock("other-thread")
    lock.acquire()
    errors: list[BaseException] = []

    def release() -> None:
        try:
            lock.release()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=release)
    t.start()
    t.join(10)
    assert errors == []
    assert not lock.locked()


def test_another_thread_waits_for_the_holding_thread(ps_url: str) -> None:
    lock = Lock("threads")
    lock.acquire()
    got: list[bool] = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=10)))
    t.start()
    wait_until(lambda: lock.statistics().waiting == 1, what="the thread to queue")
    lock.release()
    t.join(10)
    assert got == [True]
    assert lock.locked()
    lock.release()


def test_release_unheld_is_runtime_and_value_error(ps_url: str) -> None:
    lock = Lock("unheld")
    with pytest.raises(NotHeldError) as info:
        lock.release()
    assert isinstance(info.value, RuntimeError)  # what threading.Lock raises
    assert isinstance(info.value, ValueError)  # what multiprocessing.Lock raises
    with pytest.raises(RuntimeError):
        threading.Lock().release()
    with pytest.raises(ValueError):
        multiprocessing.Lock().release()
    # acquire/release/release: the second release is misuse too
    lock.acquire()
    lock.release()
    with pytest.raises(NotHeldError):
        lock.release()


def test_release_by_another_process_is_not_owner(ps_url: str, children: ChildFactory) -> None:
    lock = Lock("owned")
    holder, token = start_holder(children, "owned")
    with pytest.raises(NotOwnerError) as info:
        lock.release()
    assert isinstance(info.value, RuntimeError)
    assert str(holder.pid) in str(info.value)
    # the holder's hold is untouched
    owner = lock.owner()
    assert owner is not None and owner.pid == holder.pid
    assert lock.statistics().last_token == token
    holder.send("release")
    holder.expect("released")
    assert not lock.locked()


def test_child_cannot_release_the_parents_lock(ps_url: str, children: ChildFactory) -> None:
    lock = Lock("parent-held")
    lock.acquire()
    c = children(
        """
        lock = Lock("parent-held")
        try:
            lock.release()
            say("released")
        except NotOwnerError as exc:
            say("notowner", isinstance(exc, RuntimeError))
        """
    )
    assert c.expect("notowner") == ["True"]
    assert c.wait() == 0
    owner = lock.owner()
    assert owner is not None and owner.pid == multiprocessing.current_process().pid
    lock.release()


def test_unrelated_processes_share_a_lock_by_name(ps_url: str, children: ChildFactory) -> None:
    code = """
    lock = Lock("by-name")
    while True:
        cmd = hear()
        if cmd == "try":
            say("try", lock.acquire(blocking=False))
        elif cmd == "wait":
            say("wait", lock.acquire(timeout=10))
        elif cmd == "release":
            lock.release()
            say("released")
        else:
            break
    """
    a, b = children(code, name="a"), children(code, name="b")
    a.send("try")
    assert a.expect("try") == ["True"]
    b.send("try")
    assert b.expect("try") == ["False"]
    b.send("wait")
    wait_until(lambda: Lock("by-name").statistics().waiting == 1, what="b to queue")
    a.send("release")
    a.expect("released")
    assert b.expect("wait") == ["True"]
    a.send("try")
    assert a.expect("try") == ["False"]
    b.send("release")
    b.expect("released")
    assert not Lock("by-name").locked()


def test_waiters_are_served_in_arrival_order(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    lock = Lock("fifo")
    lock.acquire()
    code = """
    import redis
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"])
    lock = Lock("fifo")
    say("ready")
    me = hear()
    with lock:
        r.rpush("order", me)
    say("done")
    hear()  # don't exit while others wait (a holder that just exited looks dead)
    """
    waiters = [children(code, name=f"w{i}") for i in range(5)]
    for w in waiters:
        w.expect("ready")
    for i, w in enumerate(waiters):
        w.send(str(i))
        wait_until(lambda i=i: lock.statistics().waiting == i + 1, what=f"w{i} to queue")
    lock.release()
    for w in waiters:
        w.expect("done")
    assert raw.lrange("order", 0, -1) == ["0", "1", "2", "3", "4"]


def test_mutual_exclusion_under_contention(
    ps_url: str, children: ChildFactory, raw: redis.Redis, tmp_path: Path
) -> None:
    """Four unrelated processes do a read-modify-write of a file under the lock:
    no update is lost, and no two are ever inside at once."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    rounds, procs = 60, 4
    code = f"""
    import redis
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"])
    lock = Lock("tickets")
    path = {str(counter)!r}
    say("ready")
    hear()
    for _ in range({rounds}):
        with lock:
            if r.incr("inside") != 1:
                r.incr("overlaps")
            with open(path) as f:
                n = int(f.read())
            with open(path, "w") as f:
                f.write(str(n + 1))
            r.decr("inside")
    say("done")
    hear()  # don't exit while others wait (a holder that just exited looks dead)
    """
    workers = [children(code, name=f"worker{i}") for i in range(procs)]
    for w in workers:
        w.expect("ready")
    for w in workers:
        w.send()
    for w in workers:
        w.expect("done", timeout=60)
    assert int(counter.read_text()) == rounds * procs
    assert raw.get("overlaps") is None
    assert leftover_keys(raw) == []


def test_free_lock_leaves_no_keys(ps_url: str, children: ChildFactory, raw: redis.Redis) -> None:
    lock = Lock("leak")
    lock.acquire()
    lock.release()
    assert leftover_keys(raw) == []
    # a busy non-blocking try and a timed-out waiter
    lock.acquire()
    c = children(
        """
        lock = Lock("leak")
        say("try", lock.acquire(blocking=False))
        say("wait", lock.acquire(timeout=0.1))
        say("handoff", lock.acquire(timeout=10))
        lock.release()
        say("released")
        """
    )
    assert c.expect("try") == ["False"]
    assert c.expect("wait") == ["False"]
    wait_until(lambda: lock.statistics().waiting == 1, what="the child to queue")
    lock.release()  # hands the lock to the child
    assert c.expect("handoff") == ["True"]
    c.expect("released")
    assert c.wait() == 0
    assert leftover_keys(raw) == []


@pytest.mark.parametrize("kind", ["Lock", "Semaphore"])
def test_acquire_after_the_server_dropped_the_session_opens_a_new_one(
    ps_url: str, raw: redis.Redis, kind: str
) -> None:
    # The session looks fine here, so acquire() takes the direct path; the server says
    # "nosession" and the acquire must go on in a fresh session, not fail.
    prim = Lock("dropped") if kind == "Lock" else Semaphore(1, name="dropped")
    assert prim.acquire()
    first = prim.token
    prim.release()
    old = usable_session(prim.backend)
    assert old is not None
    assert raw.zrem(prim.backend.sessions_key, old.id) == 1
    assert prim.acquire(timeout=5)
    new = usable_session(prim.backend)
    assert new is not None and new.id != old.id
    assert old.lost
    assert first is not None and prim.token is not None and prim.token > first
    assert raw.zscore(prim.backend.sessions_key, new.id) is not None
    prim.release()
    assert leftover_keys(raw) == []


def test_repr_needs_no_round_trip(ps_url: str) -> None:
    lock = Lock("repr")
    assert "repr" in repr(lock) and "not held" in repr(lock)
    lock.acquire()
    assert "held here" in repr(lock) and f"token={lock.token}" in repr(lock)
    lock.release()
    anon = Lock()
    assert anon.name.startswith("anon-") and anon.name != Lock().name


def test_threads_opening_the_first_session_at_once_keep_their_holds(ps_url: str) -> None:
    """Eight threads of a process with no session yet acquire at the same instant:
    every grant must stay valid (one session, not one per thread closed by the next).
    Three rounds, each from no session, so a lucky interleaving does not hide it."""
    n = 8
    for round_ in range(3):
        close_all()
        locks = [Lock(f"first-use-{round_}-{i}") for i in range(n)]
        start, acquired = threading.Barrier(n), threading.Barrier(n)
        results: list[str] = []
        threads = [
            threading.Thread(target=_first_use, args=(lk, start, acquired, results)) for lk in locks
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert results == ["ok"] * n, f"round {round_}"


def _first_use(
    lock: Lock, start: threading.Barrier, acquired: threading.Barrier, results: list[str]
) -> None:
    try:
        start.wait(10)
        assert lock.acquire(timeout=10)
        acquired.wait(10)
        lost = lock.lost
        lock.release()
        results.append("lost" if lost else "ok")
    except Exception as exc:
        results.append(f"{type(exc).__name__}: {exc}")


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(reentrant=st.booleans(), ops=st.lists(st.sampled_from(["acquire", "release"]), max_size=20))
def test_single_thread_matches_threading_model(
    ps_url: str, reentrant: bool, ops: list[str]
) -> None:
    """Any sequence of non-blocking acquires and releases by one thread gives the
    results and errors of threading.Lock / threading.RLock."""
    name = f"prop-{uuid.uuid4().hex}"
    ours: Lock | RLock = RLock(name) if reentrant else Lock(name)
    model = threading.RLock() if reentrant else threading.Lock()
    depth = 0
    for op in ops:
        if op == "acquire":
            got = model.acquire(blocking=False)
            assert ours.acquire(blocking=False) is got
            depth += got
        else:
            try:
                model.release()
            except RuntimeError:
                with pytest.raises(RuntimeError):
                    ours.release()
            else:
                ours.release()
                depth -= 1
        assert ours.locked() is (depth > 0)
    while depth:
        ours.release()
        depth -= 1


def test_a_waiter_whose_grant_was_popped_but_never_delivered_gives_the_lock_back(
    ps_url: str, raw: redis.Redis, children: ChildFactory
) -> None:
    # The waiter's pop connection breaks after the server popped its grant off the
    # inbox and before the reply arrived (or an interrupt lands then). Its clean-up
    # must find that grant and give the lock back, not leave it held by a session
    # that does not know it holds it. The operation is driven step by step here so
    # the break lands exactly there.
    name = f"lost-{uuid.uuid4().hex[:8]}"
    holder, first = start_holder(children, name)
    lock = Lock(name)
    b = lock.backend
    sess = session_for(b)
    op = permits.acquire(lock.ref, sess, sess.new_waiter_id(), True, None, time.monotonic)
    step = next(op)
    assert isinstance(step, Call) and step.args[1] == "acquire"
    step = op.send(b.call(step.script, step.keys, step.args))
    assert isinstance(step, Pop)  # queued behind the holder, which is alive
    holder.send("release")
    holder.expect("released")
    popped = raw.lpop(step.key)  # what the broken pop took
    assert popped is not None and int(popped) > first
    lost = ServerUnavailableError("the connection broke while the pop's reply was on the way")
    step = op.throw(lost)
    assert isinstance(step, Cleanup)  # leave the queue, give back what came
    cleanup = step.make()
    sub = next(cleanup)
    assert isinstance(sub, Call) and sub.args[1] == "cancel"
    reply = b.call(sub.script, sub.keys, sub.args)
    assert reply == ["ok", int(popped)]
    sub = cleanup.send(reply)
    assert isinstance(sub, Call) and sub.args[1] == "release"
    with pytest.raises(StopIteration):
        cleanup.send(b.call(sub.script, sub.keys, sub.args))
    with pytest.raises(ServerUnavailableError):
        op.send(None)
    assert not lock.locked()
    holder.send("exit")
    assert holder.wait() == 0
    assert leftover_keys(raw) == []
