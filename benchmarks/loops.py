"""What each benchmark process does.

Each job is written once, as a generator that yields the name of the primitive
method to call next ("acquire", "release", "wait", "set", "clear", "ping") and is
sent its result; :func:`drive` runs it with blocking calls, :func:`adrive` on an
asyncio event loop (for procsync.asyncio). Everything else a job does (pipes to
the parent, the Redis counter of the critical section) is ordinary blocking code,
the same for every contender.

Times are ``time.perf_counter_ns()``: CLOCK_MONOTONIC on Linux, one clock for every
process of the machine, so a release in one process and the acquire it wakes in
another are compared directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
import traceback
from collections.abc import Generator
from typing import Any

from benchmarks.impls import Env, Impl, open_primitive, ping_fn, redis_client

__all__ = ["child_main"]

clock = time.perf_counter_ns
Job = Generator[str, Any, dict[str, Any]]
NS = 1_000_000_000


def drive(gen: Job, prim: Any) -> dict[str, Any]:
    send = gen.send
    try:
        step = next(gen)
        while True:
            step = send(getattr(prim, step)())
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def adrive(gen: Job, prim: Any) -> dict[str, Any]:
    send = gen.send
    try:
        step = next(gen)
        while True:
            step = send(await getattr(prim, step)())
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


# -- jobs -------------------------------------------------------------------------


def uncontended(conn: Any, env: Env, n: int, seconds: float, warm: int, floor: bool = False) -> Job:
    """acquire + release, again and again, nobody else around. With ``floor``, each
    pair is followed by two bare PINGs through the contender's own client, so the
    floor is sampled in the same moments as the pairs (this host's round trips
    change speed by 2-3x from one minute to the next)."""
    for _ in range(warm):
        yield "acquire"
        yield "release"
    acq: list[int] = []
    rel: list[int] = []
    pings: list[int] = []
    end = clock() + int(seconds * NS)
    for _ in range(n):
        t0 = clock()
        yield "acquire"
        t1 = clock()
        yield "release"
        t2 = clock()
        acq.append(t1 - t0)
        rel.append(t2 - t1)
        if floor:
            t3 = clock()
            yield "ping"
            yield "ping"
            pings.append(clock() - t3)
        if t2 > end:
            break
    return {"acquire": acq, "release": rel, "floor": pings}


def ping(conn: Any, env: Env, n: int, seconds: float, warm: int) -> Job:
    """A bare PING through the contender's own client: the round-trip floor."""
    for _ in range(warm):
        yield "ping"
    out: list[int] = []
    end = clock() + int(seconds * NS)
    for _ in range(n):
        t0 = clock()
        yield "ping"
        t1 = clock()
        out.append(t1 - t0)
        if t1 > end:
            break
    return {"ping": out}


def handoff(
    conn: Any,
    env: Env,
    peer: Any,
    first: bool,
    settle: float,
    jitter: float,
    rounds: int,
    seconds: float,
) -> Job:
    """Two processes pass the lock back and forth. The holder waits until the other
    has announced it is about to block in acquire(), lets it block (``settle``, plus a
    random ``jitter`` as long as the contender's poll interval so a poller is met at a
    random phase), notes the time and releases; the waiter notes when acquire()
    returns. One sample per pass: the waiter's return minus the holder's release call.
    """
    rng = random.Random(os.getpid())
    samples: list[int] = []
    holder = first
    if first:
        yield "acquire"
    conn.send(("ready",))
    conn.recv()  # go
    end = clock() + int(seconds * NS)
    passes = 0
    while True:
        if holder:
            peer.recv()  # "waiting": the other is about to block in acquire()
            time.sleep(settle + rng.uniform(0.0, jitter))
            passes += 1
            stop = passes >= rounds or clock() > end
            t0 = clock()
            yield "release"
            peer.send((t0, stop))
            if stop:
                break
            # Only once the other holds it may this one queue again: a lock that lets
            # the releaser barge back in would otherwise take it back from under it.
            peer.recv()  # "got"
            holder = False
        else:
            peer.send("waiting")
            yield "acquire"
            t1 = clock()
            t0, stop = peer.recv()
            samples.append(t1 - t0)
            if stop:
                yield "release"
                break
            peer.send("got")
            holder = True
    return {"samples": samples[1:]}  # the first pass also opened connections


def contended(
    conn: Any,
    env: Env,
    gate: Any,
    mode: str,
    m: int,
    seconds: float,
    key: str,
    value: int,
) -> Job:
    """Locked read-modify-write increments of a counter in the same Redis.

    ``mode="lock"``: GET then SET under the lock (a lost update shows in the final
    count). ``mode="sem"``: INCR an "inside" count on entry (above ``value`` is a
    violation), INCR the total, DECR "inside" on the way out.
    """
    r = redis_client(env)
    yield "acquire"  # warm: session, connections
    yield "release"
    r.ping()
    conn.send(("ready",))
    if not gate.wait(120):
        raise TimeoutError("start gate never opened")
    start = clock()
    end = start + int(seconds * NS)
    waits: list[int] = []
    most_inside = 0
    violations = 0
    done = 0
    for _ in range(m):
        t0 = clock()
        if t0 > end:
            break
        yield "acquire"
        t1 = clock()
        if mode == "lock":
            v = r.get(key)
            r.set(key, int(v or 0) + 1)
        else:
            inside = int(r.incr(key + ":in"))
            most_inside = max(most_inside, inside)
            if inside > value:
                violations += 1
            r.incr(key)
            r.decr(key + ":in")
        yield "release"
        waits.append(t1 - t0)
        done += 1
    finish = clock()
    return {
        "done": done,
        "start": start,
        "finish": finish,
        "waits": waits,
        "most_inside": most_inside,
        "violations": violations,
    }


def event_waiter(conn: Any, env: Env, rounds: int) -> Job:
    """Wait for the event ``rounds`` times; report when each wait() returned."""
    yield "is_set"  # warm: connections (the procsync session is opened before)
    for r in range(rounds):
        msg = conn.recv()
        if msg != "next":
            break
        conn.send(("ready", r))
        yield "wait"
        t = clock()
        conn.send(("woke", r, t))
    return {}


def event_setter(conn: Any, env: Env, rounds: int) -> Job:
    yield "is_set"
    yield "clear"
    conn.send(("ready",))
    for _ in range(rounds):
        msg = conn.recv()
        if msg != "set":
            break
        t0 = clock()
        yield "set"
        t1 = clock()
        conn.send(("set", t0, t1))
        if conn.recv() != "clear":
            break
        yield "clear"
        conn.send(("cleared",))
    return {}


def holder(conn: Any, env: Env) -> Job:
    """Take the lock and hang on to it until killed (bounded)."""
    yield "acquire"
    conn.send(("held", os.getpid()))
    end = time.monotonic() + 120
    while time.monotonic() < end:
        time.sleep(0.5)
    return {}


def waiter(conn: Any, env: Env) -> Job:
    """Block in acquire() behind a holder about to be killed; say when it returns."""
    conn.send(("waiting",))
    yield "acquire"
    t1 = clock()
    conn.send(("acquired", t1))
    yield "release"
    return {}


JOBS = {
    "uncontended": uncontended,
    "ping": ping,
    "handoff": handoff,
    "contended": contended,
    "event_waiter": event_waiter,
    "event_setter": event_setter,
    "holder": holder,
    "waiter": waiter,
}


class _Pinger:
    __slots__ = ("ping",)

    def __init__(self, fn: Any) -> None:
        self.ping = fn


class _WithPing:
    """A primitive that also has ``ping`` (a PING through the contender's client)."""

    def __init__(self, prim: Any, ping: Any) -> None:
        self._prim = prim
        self.ping = ping

    def __getattr__(self, name: str) -> Any:
        return getattr(self._prim, name)


def child_main(
    job: str,
    impl: Impl,
    kind: str,
    name: str,
    env: Env,
    shared: Any,
    params: dict[str, Any],
    conn: Any,
    value: int = 4,
) -> None:
    """Entry point of every benchmark process: open, run the job, send its result."""
    try:
        if impl.family == "procsync":
            import procsync

            procsync.session.configure(ttl=env.ttl)
            procsync.current_session(url=f"unix://{env.socket}")  # warm: open the session
        if job == "ping":
            prim: Any = _Pinger(ping_fn(impl, env))
        else:
            prim = open_primitive(impl, kind, name, env, shared, value)
            if params.get("floor"):
                prim = _WithPing(prim, ping_fn(impl, env))
        gen = JOBS[job](conn, env, **params)
        res = asyncio.run(adrive(gen, prim)) if impl.is_async else drive(gen, prim)
        conn.send(("result", res))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
        raise
