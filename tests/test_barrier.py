"""Barrier against threading.Barrier, on both fronts, plus what threading cannot do:
a party whose process dies breaks the barrier for everyone (issue 3).

Arrival order is made deterministic by waiting, before each next arrival, for the
server's ``n_waiting`` to count the previous one. Nothing sleeps to synchronise.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import redis

import procsync
import procsync.asyncio as pa
from fronts import Front
from helpers.keys import leftover_keys
from helpers.procs import Child, wait_until
from procsync import BrokenBarrierError, ConflictError

if TYPE_CHECKING:
    from fronts_fixtures import FrontChild

pytest_plugins = ["helpers.fixtures", "fronts_fixtures"]

#: A party process. "wait" arrives once and says how it went; "loop G" runs G
#: generations and checks, after every release, that all parties had arrived
#: (each party counts its arrival in Redis before waiting).
PARTY = """
import redis
r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)

def action():
    r.incr("actions")

b = F.Barrier(PARTIES, action if WITH_ACTION else None, name=NAME)
say("ready")
while True:
    cmd = hear().split()
    if cmd[0] == "wait":
        try:
            say("passed", b.wait(T))
        except threading.BrokenBarrierError as exc:
            say("broken", type(exc).__name__)
    elif cmd[0] == "loop":
        for g in range(int(cmd[1])):
            r.incr("arrived")
            b.wait(T)
            if int(r.get("arrived")) < PARTIES * (g + 1):
                say("early", g)
                raise SystemExit(1)
            if WITH_ACTION and int(r.get("actions")) != g + 1:
                say("action-not-run", g, r.get("actions"))
                raise SystemExit(1)
        say("looped")
    elif cmd[0] == "exit":
        break
"""


def start_parties(
    front_child: FrontChild,
    front: str,
    n: int,
    parties: int,
    name: str = "b",
    with_action: bool = False,
    timeout: float = 20.0,
    env: dict[str, str] | None = None,
) -> list[Child]:
    kids = [
        front_child(
            front,
            PARTY,
            name=f"party{i}",
            env=env,
            PARTIES=parties,
            NAME=name,
            WITH_ACTION=with_action,
            T=timeout,
        )
        for i in range(n)
    ]
    for k in kids:
        k.expect("ready")
    return kids


def arrive(kids: list[Child], barrier: Any, already: int = 0) -> None:
    """Send each child to the barrier in list order, each counted before the next."""
    for i, k in enumerate(kids, start=already + 1):
        k.send("wait")
        wait_until(lambda i=i: barrier.n_waiting == i, what=f"{k.name} to arrive")


class Parties:
    """Parties run by threads of this process (each thread calls the adapter, so on
    the asyncio front each is a task on the front's loop). Results or exceptions."""

    def __init__(self) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        self.futures: list[concurrent.futures.Future[Any]] = []

    def start(self, fn: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        f = self.pool.submit(fn)
        self.futures.append(f)
        return f

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture
def parties(front: Front) -> Any:
    p = Parties()
    try:
        yield p
    finally:
        p.close()


def outcome(f: concurrent.futures.Future[Any], timeout: float = 15.0) -> Any:
    """The value of a party's wait, or the class of what it raised."""
    try:
        return f.result(timeout)
    except concurrent.futures.TimeoutError:
        raise AssertionError(f"a party did not finish within {timeout:g}s") from None
    except BaseException as exc:
        return type(exc)


# -- threading's behaviour ---------------------------------------------------------------


def test_wait_returns_each_arrival_index_once(front: Front, front_child: FrontChild) -> None:
    b = front.Barrier(3, name="b")
    assert b.parties == 3
    kids = start_parties(front_child, front.name, 2, 3)
    arrive(kids, b)
    assert b.n_waiting == 2
    assert not b.broken
    assert b.wait(10) == 2
    assert kids[0].expect("passed") == ["0"]
    assert kids[1].expect("passed") == ["1"]
    assert b.n_waiting == 0
    assert not b.broken


def test_reused_generation_after_generation_without_early_release(
    front: Front, front_child: FrontChild, raw: redis.Redis
) -> None:
    generations = 25
    b = front.Barrier(3, name="b")
    kids = start_parties(front_child, front.name, 2, 3)
    for k in kids:
        k.send(f"loop {generations}")
    for g in range(generations):
        raw.incr("arrived")
        b.wait(20)
        assert int(raw.get("arrived")) >= 3 * (g + 1), f"released early in generation {g}"
    for k in kids:
        k.expect("looped", timeout=30)
    assert int(raw.get("arrived")) == 3 * generations


def test_action_runs_once_per_generation_before_anyone_is_released(
    front: Front, front_child: FrontChild, raw: redis.Redis
) -> None:
    generations = 10
    ran_here: list[int] = []

    def action() -> None:
        raw.incr("actions")
        ran_here.append(1)

    b = front.Barrier(3, action, name="b")
    kids = start_parties(front_child, front.name, 2, 3, with_action=True)
    for k in kids:
        k.send(f"loop {generations}")
    for g in range(generations):
        raw.incr("arrived")
        b.wait(20)
        assert int(raw.get("actions")) == g + 1
    for k in kids:
        k.expect("looped", timeout=30)
    assert int(raw.get("actions")) == generations
    assert len(ran_here) <= generations


def test_single_party_passes_at_once_and_runs_its_action(front: Front) -> None:
    ran: list[int] = []
    b = front.Barrier(1, lambda: ran.append(1), name="one")
    assert [b.wait(), b.wait(), b.wait()] == [0, 0, 0]
    assert ran == [1, 1, 1]
    assert not b.broken


def test_an_action_that_raises_breaks_the_barrier(front: Front, front_child: FrontChild) -> None:
    calls: list[int] = []

    def action() -> None:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")

    b = front.Barrier(3, action, name="b")
    kids = start_parties(front_child, front.name, 2, 3)
    arrive(kids, b)
    # The last party runs the action; its exception reaches that party, as threading.
    with pytest.raises(KeyError):
        b.wait(10)
    for k in kids:
        assert k.expect("broken") == ["BrokenBarrierError"]
    assert b.broken
    with pytest.raises(BrokenBarrierError):
        b.wait(10)
    b.reset()
    assert not b.broken
    arrive(kids, b)
    assert b.wait(10) == 2
    assert [k.expect("passed") for k in kids] == [["0"], ["1"]]
    assert calls == [1, 1]


def test_a_timeout_breaks_the_barrier_for_everyone(front: Front, front_child: FrontChild) -> None:
    b = front.Barrier(3, name="b")
    (kid,) = start_parties(front_child, front.name, 1, 3)
    arrive([kid], b)
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError) as info:
        b.wait(0.3)
    assert isinstance(info.value, BrokenBarrierError)
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert kid.expect("broken") == ["BrokenBarrierError"]
    assert b.broken
    assert b.n_waiting == 0
    t0 = time.monotonic()
    with pytest.raises(BrokenBarrierError):
        b.wait(10)  # broken: fails at once, whatever the timeout
    assert time.monotonic() - t0 < 2.0
    b.reset()
    assert not b.broken


def test_the_constructor_timeout_is_the_default(front: Front) -> None:
    b = front.Barrier(2, timeout=0.3, name="b")
    t0 = time.monotonic()
    with pytest.raises(BrokenBarrierError):
        b.wait()
    assert 0.3 <= time.monotonic() - t0 < 3.0
    assert b.broken


def test_abort_breaks_waiting_and_later_parties_until_reset(
    front: Front, front_child: FrontChild
) -> None:
    b = front.Barrier(3, name="b")
    kids = start_parties(front_child, front.name, 2, 3)
    arrive(kids, b)
    b.abort()
    for k in kids:
        assert k.expect("broken") == ["BrokenBarrierError"]
    assert b.broken
    kids[0].send("wait")
    assert kids[0].expect("broken") == ["BrokenBarrierError"]
    b.reset()
    assert not b.broken
    arrive(kids, b)
    assert b.wait(10) == 2
    assert [k.expect("passed") for k in kids] == [["0"], ["1"]]


def test_reset_breaks_the_current_waiters_and_leaves_it_usable(
    front: Front, front_child: FrontChild
) -> None:
    b = front.Barrier(2, name="b")
    (kid,) = start_parties(front_child, front.name, 1, 2)
    arrive([kid], b)
    b.reset()
    assert kid.expect("broken") == ["BrokenBarrierError"]
    assert not b.broken
    assert b.n_waiting == 0
    arrive([kid], b)
    assert b.wait(10) == 1
    assert kid.expect("passed") == ["0"]


def test_different_parties_for_one_name_is_a_clear_error(
    front: Front, front_child: FrontChild
) -> None:
    three = front.Barrier(3, name="b")
    (kid,) = start_parties(front_child, front.name, 1, 3)
    arrive([kid], three)
    four = front.Barrier(4, name="b")
    with pytest.raises(ConflictError, match="3"):
        four.wait(1)
    with pytest.raises(ConflictError):
        _ = four.n_waiting
    assert isinstance(ConflictError("x"), ValueError)
    # The barrier in use is untouched.
    assert three.n_waiting == 1
    assert not three.broken


def test_bad_arguments_are_refused_before_any_server_call() -> None:
    for cls in (procsync.Barrier, pa.Barrier):
        for bad in (0, -1):
            with pytest.raises(ValueError):
                cls(bad, name="x")
        for wrong in ("3", 2.5, True, None):
            with pytest.raises(TypeError):
                cls(wrong, name="x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            cls(2, action=42, name="x")  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            cls(2, timeout=float("nan"), name="x")


def test_repr_of_barriers_and_conditions_needs_no_round_trip() -> None:
    nowhere = "unix:///nonexistent/procsync.sock"  # any server call would fail
    assert repr(procsync.Barrier(3, name="b", url=nowhere)) == "<procsync.Barrier 'b' parties=3>"
    assert repr(pa.Barrier(2, name="b", url=nowhere)) == "<procsync.asyncio.Barrier 'b' parties=2>"
    sync_cond = repr(procsync.Condition(name="c", url=nowhere))
    assert sync_cond.startswith("<procsync.Condition 'c' lock=<procsync.RLock 'c:lock'")
    async_cond = repr(pa.Condition(pa.Lock("m", url=nowhere), name="c"))
    assert async_cond.startswith("<procsync.asyncio.Condition 'c' lock=<procsync.asyncio.Lock 'm'")


def test_nothing_is_left_on_the_server(front: Front, front_child: FrontChild) -> None:
    b = front.Barrier(2, name="b")
    (kid,) = start_parties(front_child, front.name, 1, 2)
    for _ in range(3):
        arrive([kid], b)
        assert b.wait(10) == 1
        assert kid.expect("passed") == ["0"]
    b.abort()
    b.reset()
    kid.send("exit")
    assert kid.wait() == 0
    front.close()
    procsync.session.close_all()
    r = redis.Redis.from_url(os.environ["PROCSYNC_URL"], decode_responses=True)
    assert leftover_keys(r) == []
    r.close()


# -- parties that die -----------------------------------------------------------------------


@pytest.mark.parametrize("victim_at", [0, 1, 3], ids=["first", "middle", "last"])
def test_a_party_killed_while_waiting_breaks_it_for_the_others_at_once(
    front: Front,
    front_child: FrontChild,
    parties: Parties,
    monkeypatch: pytest.MonkeyPatch,
    victim_at: int,
) -> None:
    """Barrier(5): four parties wait (three here, one the victim process, which
    arrives first, in the middle or last); the victim is SIGKILLed. With a 30 s ttl
    the others must see BrokenBarrierError within a few seconds (same host: the pid
    is gone), and the fifth party, arriving later, too."""
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    b = front.Barrier(5, name="b")
    (victim,) = start_parties(front_child, front.name, 1, 5)
    survivors = []
    for i in range(4):
        if i == victim_at:
            victim.send("wait")
        else:
            survivors.append(parties.start(lambda: b.wait(60)))
        wait_until(lambda i=i: b.n_waiting == i + 1, what=f"arrival {i}")
    t0 = time.monotonic()
    victim.kill()
    for f in survivors:
        assert outcome(f, timeout=10) is BrokenBarrierError
    elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"the others saw the death after {elapsed:.1f}s (ttl 30s)"
    assert b.broken
    with pytest.raises(BrokenBarrierError):
        b.wait(10)


def test_kill_one_of_five_parties_each_in_its_own_process(
    ps_url: str, front_child: FrontChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The issue's scenario with every party a process, on both fronts: four wait,
    one of them is killed, the other three break at once, the fifth breaks on arrival."""
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    b = procsync.Barrier(5, name="b5")
    kids = [
        *start_parties(front_child, "sync", 2, 5, name="b5"),
        *start_parties(front_child, "asyncio", 2, 5, name="b5"),
    ]
    order = [kids[0], kids[2], kids[1], kids[3]]  # fronts interleaved
    arrive(order, b)
    victim = order[2]
    t0 = time.monotonic()
    victim.kill()
    for k in order:
        if k is not victim:
            assert k.expect("broken", timeout=10) == ["BrokenBarrierError"]
    assert time.monotonic() - t0 < 5.0
    with pytest.raises(BrokenBarrierError, match="died"):
        b.wait(10)


RUNNER = """
b = F.Barrier(2, lambda: (say("in-action"), hear()), name="b")
say("ready")
hear()
b.wait(30)
say("passed")
"""


def run_until_the_runner_dies(
    front: Front, front_child: FrontChild, env: dict[str, str], limit: float
) -> tuple[Any, float]:
    """This process arrives first; the runner process arrives last, so it runs the
    action, where it is killed. Returns what this process's wait gave (or None if it
    had not returned within ``limit``) and how long after the kill it returned."""
    b = front.Barrier(2, name="b")
    runner = front_child(front.name, RUNNER, name="runner", env=env)
    runner.expect("ready")
    res: list[Any] = []
    done = threading.Event()

    def party() -> None:
        try:
            res.append(b.wait(30))
        except BrokenBarrierError as exc:
            res.append(exc)
        done.set()

    t = threading.Thread(target=party, daemon=True)
    t.start()
    try:
        wait_until(lambda: b.n_waiting == 1, what="the first party to arrive")
        runner.send()
        runner.expect("in-action")
        t0 = time.monotonic()
        runner.kill()
        done.wait(limit)
        elapsed = time.monotonic() - t0
    finally:
        if not done.is_set():
            b.abort()  # let the party go, whatever the verdict
        t.join(15)
    return (res[0] if done.is_set() and res else None), elapsed


def test_the_party_running_the_action_dies_on_this_host(
    front: Front, front_child: FrontChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (issue 3): the last arrival, running the action, was watched by
    nobody, so its death broke the barrier only when its lease ended."""
    monkeypatch.setenv("PROCSYNC_TTL", "30")
    # Same-host deaths are seen in milliseconds elsewhere (see the tests above).
    got, elapsed = run_until_the_runner_dies(front, front_child, {}, limit=2.0)
    assert isinstance(got, BrokenBarrierError), f"{got!r} after {elapsed:.1f}s"
    assert elapsed < 2.0


def test_the_party_running_the_action_dies_and_its_lease_ends(
    front: Front, front_child: FrontChild, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's hold ends with its session: the generation is not released, the
    waiter gets BrokenBarrierError once the lease (0.5 s) ran out and a live session's
    heartbeat (every 0.5 s here) reaped it."""
    monkeypatch.setenv("PROCSYNC_TTL", "1.5")
    got, elapsed = run_until_the_runner_dies(
        front, front_child, {"PROCSYNC_TTL": "0.5"}, limit=10.0
    )
    assert isinstance(got, BrokenBarrierError), f"{got!r} after {elapsed:.1f}s"
    assert "died" in str(got)
    assert elapsed < 5.0


def test_threads_of_one_process_are_parties_from_their_first_use(
    ps_url: str, front_child: FrontChild
) -> None:
    """Regression: threads making their first call together each opened a session
    (session_for opened it outside any lock) and installing one closed the others,
    whose barrier arrivals the server then dropped: 'a party died' though none had."""
    kid = front_child(
        "sync",
        """
        import json
        b = procsync.Barrier(6, name="threads")
        out = []
        def party():
            try:
                out.append(b.wait(20))
            except Exception as exc:
                out.append(repr(exc))
        ts = [threading.Thread(target=party) for _ in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(30)
        say(json.dumps(sorted(out, key=str)))
    """,
    )
    assert json.loads(kid.readline(timeout=30)) == [0, 1, 2, 3, 4, 5]


# -- many parties, many generations ------------------------------------------------------------

#: A process of the big barrier: TASKS parties (asyncio tasks or threads) pass the
#: barrier GENS times; each notes, per generation, when its last party arrived and
#: when its first party was released, and the indices it got. The test merges them:
#: no release may come before the last arrival (CLOCK_MONOTONIC is system-wide).
BIG = """
import asyncio, json
arrive = [0.0] * GENS
release = [float("inf")] * GENS
indices = [[] for _ in range(GENS)]
actions = []
guard = threading.Lock()

def note(g, i):
    t = time.monotonic()
    with guard:
        release[g] = min(release[g], t)
        indices[g].append(i)

def come(g):
    t = time.monotonic()
    with guard:
        arrive[g] = max(arrive[g], t)

say("ready")
hear()
t0 = time.monotonic()
if FRONT == "asyncio":
    async def party(b):
        for g in range(GENS):
            come(g)
            note(g, await b.wait())

    async def main():
        b = procsync.asyncio.Barrier(PARTIES, lambda: actions.append(1), name=NAME)
        await asyncio.gather(*[party(b) for _ in range(TASKS)])

    import procsync.asyncio
    asyncio.run(main())
else:
    b = procsync.Barrier(PARTIES, lambda: actions.append(1), name=NAME)
    def party():
        for g in range(GENS):
            come(g)
            note(g, b.wait())
    ts = [threading.Thread(target=party) for _ in range(TASKS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
say(json.dumps({"arrive": arrive, "release": release, "indices": indices,
                "actions": len(actions), "secs": time.monotonic() - t0}))
"""


def run_big_barrier(
    front_child: FrontChild, generations: int, parties: int = 100, procs: int = 4
) -> float:
    """parties split over procs processes, fronts alternating; returns seconds taken."""
    per = parties // procs
    kids = [
        front_child(
            "asyncio" if i % 2 == 0 else "sync",
            BIG,
            name=f"big{i}",
            GENS=generations,
            PARTIES=parties,
            TASKS=per,
            NAME="big",
        )
        for i in range(procs)
    ]
    for k in kids:
        k.expect("ready")
    t0 = time.monotonic()
    for k in kids:
        k.send()
    limit = 60 + generations * 0.5
    reports = [json.loads(k.readline(timeout=limit)) for k in kids]
    elapsed = time.monotonic() - t0
    for g in range(generations):
        last_arrival = max(r["arrive"][g] for r in reports)
        first_release = min(r["release"][g] for r in reports)
        assert first_release >= last_arrival, f"generation {g} released early"
        got = sorted(i for r in reports for i in r["indices"][g])
        assert got == list(range(parties)), f"generation {g}: indices {got}"
    assert sum(r["actions"] for r in reports) == generations
    return elapsed


#: 1,000 by default (about 30 s a leg on 2 cores once each arrival watches only its
#: neighbour; minutes when every arrival listed all earlier ones). Lower it with
#: PROCSYNC_TEST_BARRIER_GENERATIONS, or leave the test out with -m "not slow".
BIG_GENERATIONS = int(os.environ.get("PROCSYNC_TEST_BARRIER_GENERATIONS", "1000"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_barrier_of_100_parties_reused_for_1000_generations(
    ps_url: str, front_child: FrontChild
) -> None:
    """Barrier(100), 25 parties per process (two processes of asyncio tasks, two of
    threads), with an action, reused BIG_GENERATIONS times: no party is ever released
    before the last one of its generation arrived, every generation hands out each
    index once, and the action runs once per generation."""
    elapsed = run_big_barrier(front_child, BIG_GENERATIONS)
    print(f"Barrier(100): {BIG_GENERATIONS} generations in {elapsed:.1f}s")
