"""Fencing tokens: strictly increasing per primitive across grants, processes,
re-creation of a name, crashes, pauses and a server that lost its data; and a
fenced resource refusing a paused holder's stale write."""

from __future__ import annotations

import itertools
import threading

import pytest
import redis

from helpers.procs import (
    ChildFactory,
    InThread,
    short_lease_for_children,
    wait_blocked,
    wait_until,
)
from procsync import BoundedSemaphore, Lock, RLock, Semaphore
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures"]

#: The fenced resource: KEYS[1] highest token accepted, KEYS[2] accepted writes,
#: KEYS[3] stale writes refused. ARGV[1] the writer's token. Returns 1 or 0.
FENCED_WRITE = """
local top = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(ARGV[1])
if tok <= top then
  redis.call('INCR', KEYS[3])
  return 0
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCR', KEYS[2])
return 1
"""

FENCED_WORKER = """
import redis
r = redis.Redis.from_url(os.environ["PROCSYNC_URL"])
write = r.register_script({script!r})
lock = Lock({name!r})
say("ready")
hear()
for _ in range({rounds}):
    with lock:
        r.rpush("tokens", lock.token)
        write(keys=["top", "accepted", "stale"], args=[lock.token])
say("done")
hear()  # don't exit while others wait (a holder that just exited looks dead)
"""


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


def token(prim: Lock | RLock | Semaphore) -> int:
    """The primitive's latest token; it must have one."""
    t = prim.token
    assert isinstance(t, int)
    return t


def test_tokens_increase_across_grants_and_processes(
    ps_url: str, children: ChildFactory, raw: redis.Redis
) -> None:
    """Four unrelated processes take turns; the tokens, in the order the lock was
    held, strictly increase, and the fenced resource never refuses a write."""
    rounds, procs = 25, 4
    code = FENCED_WORKER.format(script=FENCED_WRITE, name="fenced", rounds=rounds)
    workers = [children(code, name=f"w{i}") for i in range(procs)]
    for w in workers:
        w.expect("ready")
    for w in workers:
        w.send()
    for w in workers:
        w.expect("done", timeout=60)
    tokens = [int(t) for t in raw.lrange("tokens", 0, -1)]
    assert len(tokens) == rounds * procs
    assert strictly_increasing(tokens)
    assert raw.get("accepted") == str(rounds * procs)
    assert raw.get("stale") is None


def test_tokens_increase_when_a_name_is_created_again(ps_url: str, raw: redis.Redis) -> None:
    lock = Lock("again")
    tokens: list[int] = []
    for _ in range(5):
        lock.acquire()
        tokens.append(token(lock))
        lock.release()
        assert not raw.exists("procsync:{default}:lock:again")  # gone: created anew
    assert strictly_increasing(tokens)


def test_reentering_an_rlock_keeps_its_token(ps_url: str) -> None:
    rl = RLock("re")
    with rl:
        first = rl.token
        with rl:
            assert rl.token == first
    with rl:
        assert rl.token is not None and first is not None and rl.token > first


@pytest.mark.parametrize("cls", [Semaphore, BoundedSemaphore])
def test_every_permit_grant_gets_a_new_larger_token(ps_url: str, cls: type) -> None:
    sem = cls(3, name="permits")
    tokens: list[int] = []
    for _ in range(3):
        sem.acquire()
        tokens.append(token(sem))
    sem.release(3)
    sem.acquire()
    tokens.append(token(sem))
    sem.release()
    assert strictly_increasing(tokens)
    assert sem.statistics().last_token in (0, tokens[-1])  # key gone when all free


def test_handoff_to_a_waiter_carries_a_larger_token(ps_url: str) -> None:
    lock = Lock("handoff")
    lock.acquire()
    mine = lock.token
    other = Lock("handoff")
    waiter = InThread(lambda: other.acquire(timeout=10))
    wait_until(lambda: lock.statistics().waiting == 1, what="the waiter to queue")
    lock.release()
    assert waiter.join(10) is True
    assert other.token is not None and mine is not None and other.token > mine
    assert other.statistics().last_token == other.token
    other.release()


def test_a_paused_holders_stale_write_is_refused(
    ps_url: str, children: ChildFactory, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The paused holder wakes after another process was granted the lock and tries
    to write without asking whether it still holds it: the resource refuses the write
    because its token is older than one it has seen."""
    short_lease_for_children(monkeypatch)
    write = raw.register_script(FENCED_WRITE)
    holder = children(
        f"""
        import redis
        r = redis.Redis.from_url(os.environ["PROCSYNC_URL"])
        write = r.register_script({FENCED_WRITE!r})
        lock = Lock("stale")
        lock.acquire()
        say("held", lock.token)
        hear()
        say("wrote", write(keys=["top", "accepted", "stale"], args=[lock.token]))
        """
    )
    old = int(holder.expect("held")[0])
    lock = Lock("stale")
    holder.stop()
    try:
        assert lock.acquire(timeout=10)
        assert lock.token is not None and lock.token > old
        assert write(keys=["top", "accepted", "stale"], args=[lock.token]) == 1
    finally:
        holder.cont()
    holder.send()
    assert holder.expect("wrote") == ["0"]
    assert raw.get("stale") == "1"
    assert raw.get("accepted") == "1"
    assert raw.get("top") == str(lock.token)
    lock.release()


def test_tokens_increase_across_a_server_restart_that_lost_everything(
    fresh_url: str,
    fresh_server: ServerProcess,
    children: ChildFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PROCSYNC_TTL", "1")
    lock, sem = Lock("epoch"), Semaphore(2, name="epoch")
    before: list[int] = []
    for _ in range(20):
        with lock:
            before.append(token(lock))
        with sem:
            before.append(token(sem))
    assert strictly_increasing(before)
    lock.acquire()  # held across the restart
    lost = threading.Event()
    lock.on_lost(lambda prim, reason: lost.set())
    fresh_server.restart(hard=True)
    with fresh_server.client() as r:
        assert r.dbsize() == 0  # really lost
    assert lost.wait(10), "the hold was not reported lost"
    assert lock.lost
    after: list[int] = []
    c = children(
        """
        lock = Lock("epoch")
        with lock:
            say("token", lock.token)
        """
    )
    after.append(int(c.expect("token")[0]))
    for _ in range(5):
        assert lock.acquire(timeout=5)
        after.append(token(lock))
        lock.release()
        with sem:
            after.append(token(sem))
    assert strictly_increasing(after)
    assert min(after) > max(before)


def test_tokens_keep_increasing_after_a_holder_is_killed(
    ps_url: str, children: ChildFactory, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    tokens: list[int] = []
    lock = Lock("killed")
    for _ in range(3):
        c = children(
            """
            lock = Lock("killed")
            lock.acquire()
            say("held", lock.token)
            hear()
            """
        )
        tokens.append(int(c.expect("held")[0]))
        waiter = InThread(lambda: lock.acquire(timeout=10))
        wait_until(lambda: lock.statistics().waiting == 1, what="the waiter to queue")
        wait_blocked(raw, 1)  # it watches the holder now
        c.kill()
        assert waiter.join(15) is True
        tokens.append(token(lock))
        lock.release()
    assert strictly_increasing(tokens)
