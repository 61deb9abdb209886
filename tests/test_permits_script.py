"""permits.lua's prelude (permits_fast.lua) against the full script.

The prelude answers the common cases (a free primitive's acquire, a lock's release
with nobody or somebody queued, a semaphore's last release) before the Lua library is
defined; its contract is to give exactly the reply and leave exactly the state the
full script gives. Every call here runs three ways, each in its own namespace of one
server, from the same starting state:

  fast   the script as procsync sends it (prelude + library + permits.lua)
  slow   the library + permits.lua alone (``script_source(..., prelude=False)``)
  split  the prelude alone (ending in ``return {'fallthrough'}``), then, if it fell
         through, the slow script: so a call the prelude passes on has written nothing,
         and the test knows which calls the prelude answered

and the three replies and the three namespaces' every key (type, value, whether it
expires) are compared, with the namespace in names and values made alike and clock
readings (milliseconds, microsecond fencing tokens after a counter restart) allowed to
differ by the time between the calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from procsync.backend.scripts import PRELUDES, script_source
from procsync.core.steps import side_key
from procsync.testing import ServerProcess

NAMESPACES = ("fast", "slow", "split")
SIDS = ("aa01", "bb02", "cc03")
HOUR_MS = 3_600_000
#: Clock readings in two namespaces' copies of a value differ by less than this.
MS_SLACK = 5_000
US_SLACK = MS_SLACK * 1000


def _prelude_only() -> str:
    lua = resources.files("procsync").joinpath("lua")
    text = lua.joinpath(f"{PRELUDES['permits']}.lua").read_text(encoding="utf-8")
    return text + "\nreturn {'fallthrough'}\n"


@pytest.fixture
def r(server: ServerProcess) -> Iterator[redis.Redis]:
    c = server.client(decode_responses=True)
    c.flushall()
    try:
        yield c
    finally:
        c.close()


# -- comparing namespaces ------------------------------------------------------------


def _prefix(ns: str) -> str:
    return f"procsync:{{{ns}}}:"


def _norm(value: Any, ns: str) -> Any:
    """Namespace-free form of a reply or key value (strings, lists, dicts, sets)."""
    if isinstance(value, str):
        return value.replace(_prefix(ns), "P:")
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {_norm(k, ns): _norm(v, ns) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return frozenset(_norm(v, ns) for v in value)
    if isinstance(value, (list, tuple)):
        return [_norm(v, ns) for v in value]
    raise TypeError(f"unexpected value {value!r}")


def _clockish(v: Any) -> int | None:
    try:
        n = int(v)
    except (TypeError, ValueError):
        return None
    return n if n >= 10**12 else None


def _alike(a: Any, b: Any, path: str = "") -> None:
    """Assert a == b, allowing clock readings to differ by a little."""
    ca, cb = _clockish(a), _clockish(b)
    if ca is not None and cb is not None and not isinstance(a, (list, dict)):
        slack = US_SLACK if ca >= 10**15 else MS_SLACK
        assert abs(ca - cb) <= slack, f"{path}: {a!r} != {b!r}"
        return
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), f"{path}: fields {sorted(a)} != {sorted(b)}"
        for k in a:
            _alike(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), f"{path}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _alike(x, y, f"{path}[{i}]")
        return
    assert a == b, f"{path}: {a!r} != {b!r}"


def snapshot(r: redis.Redis, ns: str) -> dict[str, Any]:
    """Every key of namespace ``ns``: (type, value, expires?), namespace-free."""
    keys = sorted(str(k) for k in r.scan_iter(match=f"{_prefix(ns)}*", count=1000))
    types = [r.type(k) for k in keys]
    pipe = r.pipeline(transaction=False)
    for k, t in zip(keys, types, strict=True):
        if t == "hash":
            pipe.hgetall(k)
        elif t == "list":
            pipe.lrange(k, 0, -1)
        elif t == "set":
            pipe.smembers(k)
        elif t == "zset":
            pipe.zrange(k, 0, -1, withscores=True)
        elif t == "string":
            pipe.get(k)
        elif t == "stream":
            pipe.xrange(k)
        else:  # pragma: no cover
            raise AssertionError(f"unexpected type {t!r} at {k}")
        pipe.pttl(k)
    got = pipe.execute()
    out: dict[str, Any] = {}
    for i, (k, t) in enumerate(zip(keys, types, strict=True)):
        value, ttl = got[2 * i], got[2 * i + 1]
        if t == "stream":
            value = [fields for _id, fields in value]  # entry ids are clock readings
        elif t == "zset":
            value = [[m, s] for m, s in value]
        out[_norm(k, ns)] = [t, _norm(value, ns), ttl > 0]
    return out


def _reply(value: Any, ns: str) -> Any:
    if isinstance(value, redis.ResponseError):
        # (the message names the script and line, which differ)
        return ["error", str(value).split()[0]]
    return _norm(value, ns)


# -- the three-way runner ------------------------------------------------------------


@dataclass
class Mirror:
    """One primitive, driven the same way in the three namespaces."""

    r: redis.Redis
    kind: str = "lock"
    init: int = 1
    name: str = "x"
    shas: dict[str, str] = field(default_factory=dict)
    paths: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.shas = {
            "fast": self.r.script_load(script_source("permits")),
            "slow": self.r.script_load(script_source("permits", prelude=False)),
            "prelude": self.r.script_load(_prelude_only()),
        }

    # keys of one namespace
    def key(self, ns: str) -> str:
        return f"{_prefix(ns)}{self.kind}:{self.name}"

    def queue(self, ns: str) -> str:
        return side_key(_prefix(ns), self.kind, "q", self.name)

    def keys(self, ns: str) -> list[str]:
        p = _prefix(ns)
        return [self.key(ns), self.queue(ns), p + "sessions", p + "fence"]

    # setting the scene, alike everywhere
    def each(self, fn: Any) -> None:
        for ns in NAMESPACES:
            fn(_prefix(ns), ns)

    def server_ms(self) -> int:
        sec, usec = self.r.time()
        return int(sec) * 1000 + int(usec) // 1000

    def open(self, sid: str, deadline: int | None = None) -> None:
        """A live session (deadline an hour ahead), as session.lua's open leaves it."""
        d = self.server_ms() + HOUR_MS if deadline is None else deadline

        def go(p: str, _ns: str) -> None:
            self.r.zadd(p + "sessions", {sid: d})
            self.r.hset(
                p + "s:" + sid,
                mapping={
                    "id": sid,
                    "name": "n-" + sid,
                    "host": "host1",
                    "boot": "boot1",
                    "pid": str(1000 + SIDS.index(sid) if sid in SIDS else 999),
                    "start": "77",
                    "state": "alive",
                },
            )

        self.each(go)

    def expire(self, sid: str) -> None:
        """The session's lease ended (not yet reaped)."""
        self.each(lambda p, _ns: self.r.zadd(p + "sessions", {sid: 1}))

    # one call, three ways
    def _eval(self, which: str, ns: str, args: list[Any]) -> Any:
        try:
            return self.r.evalsha(self.shas[which], 4, *self.keys(ns), _prefix(ns), *args)
        except redis.ResponseError as exc:
            return exc

    def call(self, op: str, sid: str, *extra: Any) -> Any:
        """Run permits ``op`` in every namespace; assert the replies and every key
        alike; return the reply (namespace-free) and record which path answered."""
        args = [op, self.kind, self.init, sid, *extra]
        fast = self._eval("fast", "fast", args)
        slow = self._eval("slow", "slow", args)
        before = snapshot(self.r, "split")
        first = self._eval("prelude", "split", args)
        took = "slow" if first == ["fallthrough"] else "fast"
        if took == "slow":
            assert snapshot(self.r, "split") == before, (
                f"the prelude wrote, then fell through: {op}"
            )
            split = self._eval("slow", "split", args)
        else:
            split = first
        self.paths[(op, took)] += 1
        replies = {ns: _reply(v, ns) for ns, v in zip(NAMESPACES, (fast, slow, split), strict=True)}
        _alike(replies["fast"], replies["slow"], f"{op} reply fast/slow")
        _alike(replies["split"], replies["slow"], f"{op} reply split/slow")
        self.check()
        return replies["fast"]

    def check(self) -> None:
        states = {ns: snapshot(self.r, ns) for ns in NAMESPACES}
        _alike(states["fast"], states["slow"], "fast/slow")
        _alike(states["split"], states["slow"], "split/slow")

    def snapshot_keys(self) -> set[str]:
        return set(snapshot(self.r, "fast"))

    def pop(self, wid: str) -> Any:
        """What the waiter's blocking pop would take from its inbox, everywhere."""
        got = {ns: self.r.lpop(_prefix(ns) + "in:" + wid) for ns in NAMESPACES}
        _alike(_norm(got["fast"], "fast"), _norm(got["slow"], "slow"), f"pop {wid}")
        self.check()
        return got["fast"]

    def acquire(self, sid: str, wid: str, blocking: int = 1) -> Any:
        return self.call("acquire", sid, wid, blocking)

    def release(self, sid: str, n: int = 1, held: int = 1, ref: str | None = None) -> Any:
        return self.call("release", sid, n, held, *(() if ref is None else (ref,)))


class _Path:
    """Assert which path answers the next call of a Mirror."""

    def __init__(self, m: Mirror) -> None:
        self.m = m

    def __call__(self, expect: str, op: str, sid: str, *extra: Any) -> Any:
        before = self.m.paths[(op, expect)]
        reply = self.m.call(op, sid, *extra)
        assert self.m.paths[(op, expect)] == before + 1, f"{op} by {sid} not on the {expect} path"
        return reply


# -- scenarios: each case of the prelude, and its neighbours -------------------------


@pytest.mark.parametrize("kind", ["lock", "rlock"])
def test_uncontended_lock_takes_the_fast_paths(r: redis.Redis, kind: str) -> None:
    m = Mirror(r, kind=kind)
    go = _Path(m)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    reply = go("fast", "acquire", a, a + "/1", 1)
    assert reply[0] == "ok"
    assert go("fast", "release", a, 1, 1) == ["ok", 0]
    assert m.snapshot_keys() == {"P:sessions", "P:fence", "P:s:" + a, "P:s:" + b}
    # tokens keep rising through both paths
    t1 = go("fast", "acquire", a, a + "/2", 1)[1]
    go("fast", "release", a, 1, 1)
    t2 = go("fast", "acquire", b, b + "/1", 0)[1]
    assert int(t2) > int(t1)
    assert go("slow", "acquire", a, a + "/3", 0)[0] == "busy"
    # release by a non-holder: the full script answers
    assert go("slow", "release", a, 1, 0)[0] == "notowner"
    go("fast", "release", b, 1, 1)
    # the same release again (its reply was lost): a live session that no longer holds
    # what it believes it holds released it already; one that believes nothing: misuse
    assert go("slow", "release", b, 1, 1) == ["ok", 0]
    assert go("slow", "release", b, 1, 0) == ["notheld"]


@pytest.mark.parametrize("kind", ["lock", "sem", "bsem"])
def test_acquire_by_an_unknown_or_expired_session(r: redis.Redis, kind: str) -> None:
    m = Mirror(r, kind=kind, init=1 if kind == "lock" else 2)
    go = _Path(m)
    a = SIDS[0]
    assert go("fast", "acquire", a, a + "/1", 1) == ["nosession"]
    m.open(a, deadline=m.server_ms() - 1)
    assert go("fast", "acquire", a, a + "/2", 1) == ["nosession"]
    assert m.snapshot_keys() == {"P:sessions", "P:s:" + a}


def test_fresh_fencing_counter_restarts_from_the_clock(r: redis.Redis) -> None:
    m = Mirror(r)
    go = _Path(m)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    fence, state = _prefix("fast") + "fence", m.key("fast")
    tok = int(go("fast", "acquire", a, a + "/1", 1)[1])
    assert abs(tok - m.server_ms() * 1000) < US_SLACK
    assert r.get(fence) == r.hget(state, "t") == str(tok)  # (exact, in one namespace)
    assert go("slow", "acquire", b, b + "/1", 1)[0] == "queued"
    m.each(lambda p, _ns: r.delete(p + "fence"))  # lost data
    assert go("fast", "release", a, 1, 1) == ["ok", 1]  # the hand-off restarts it
    assert r.get(fence) == r.hget(state, "t")
    granted = int(m.pop(b + "/1"))
    assert str(granted) == r.get(fence)
    assert granted > tok
    assert abs(granted - m.server_ms() * 1000) < US_SLACK
    assert go("fast", "release", b, 1, 1) == ["ok", 0]
    # a counter a little ahead of the clock goes on from itself; one behind it, from
    # the clock (more than a second ahead it is a quiet period: the next test)
    ahead = m.server_ms() * 1000 + 500_000
    m.each(lambda p, _ns: r.set(p + "fence", str(ahead)))
    assert go("fast", "acquire", a, a + "/2", 1) == ["ok", ahead + 1]
    go("fast", "release", a, 1, 1)
    m.each(lambda p, _ns: r.set(p + "fence", "41"))
    tok = int(go("fast", "acquire", a, a + "/3", 1)[1])
    assert abs(tok - m.server_ms() * 1000) < US_SLACK


@pytest.mark.parametrize("kind", ["lock", "rlock"])
def test_hand_off_to_the_head_waiter(r: redis.Redis, kind: str) -> None:
    m = Mirror(r, kind=kind)
    go = _Path(m)
    a, b, c = SIDS
    for s in SIDS:
        m.open(s)
    go("fast", "acquire", a, a + "/1", 1)
    assert go("slow", "acquire", b, b + "/1", 1)[0] == "queued"
    assert go("slow", "acquire", c, c + "/1", 1)[0] == "queued"
    assert go("fast", "release", a, 1, 1) == ["ok", 1]
    st_ = snapshot(r, "fast")
    assert st_["P:" + kind + "/q:x"][1] == [c + "/1"]
    assert st_["P:in:" + c + "/1"][1] == [f"w:{b}|boot1|1001|77|host1"]
    assert m.pop(b + "/1").isdigit()
    assert go("fast", "release", b, 1, 1) == ["ok", 1]  # the last waiter: no notice
    assert go("fast", "release", c, 1, 1) == ["ok", 0]
    assert m.snapshot_keys() == {"P:sessions", "P:fence"} | {"P:s:" + s for s in SIDS} | {
        "P:in:" + c + "/1"
    }


def test_hand_off_skips_dead_waiters(r: redis.Redis) -> None:
    m = Mirror(r)
    go = _Path(m)
    a, b, c = SIDS
    for s in SIDS:
        m.open(s)
    go("fast", "acquire", a, a + "/1", 1)
    go("slow", "acquire", b, b + "/1", 1)
    go("slow", "acquire", c, c + "/1", 1)
    go("slow", "acquire", b, b + "/2", 1)
    m.expire(b)
    # b's two entries: the first (ahead of c) is dropped, c served, b/2 the new head
    assert go("fast", "release", a, 1, 1) == ["ok", 1]
    assert snapshot(r, "fast")["P:lock/q:x"][1] == [b + "/2"]
    # every waiter dead: the lock goes back to no key
    m.expire(a)
    go("slow", "acquire", a, a + "/2", 1)  # nosession: a is dead
    m.open(a)
    go("slow", "acquire", a, a + "/3", 1)
    m.expire(a)
    assert go("fast", "release", c, 1, 1) == ["ok", 0]
    assert "P:lock:x" not in m.snapshot_keys()


def test_hand_off_to_another_thread_of_the_same_process(r: redis.Redis) -> None:
    m = Mirror(r)
    go = _Path(m)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    go("fast", "acquire", a, a + "/1", 1)
    go("slow", "acquire", a, a + "/2", 1)
    go("slow", "acquire", b, b + "/1", 1)
    go("slow", "acquire", a, a + "/3", 1)
    assert go("fast", "release", a, 1, 1) == ["ok", 1]  # a/2 served: a holds again
    assert go("fast", "release", a, 1, 1) == ["ok", 1]  # b served; a still waits (a/3)
    assert "P:lock:x" in snapshot(r, "fast")["P:h:" + a][1]
    assert go("fast", "release", b, 1, 1) == ["ok", 1]
    assert go("fast", "release", a, 1, 1) == ["ok", 0]
    assert "P:h:" + a not in m.snapshot_keys()


def test_a_dead_holder_releasing_falls_through(r: redis.Redis) -> None:
    m = Mirror(r)
    go = _Path(m)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    go("fast", "acquire", a, a + "/1", 1)
    go("slow", "acquire", b, b + "/1", 1)
    m.expire(a)
    reply = go("slow", "release", a, 1, 1)  # the full script reaps a, serves b
    assert reply[0] == "notowner"
    # without waiters a lapsed holder's release still succeeds, as it always has
    m.open(a)
    m.pop(b + "/1")
    go("fast", "release", b, 1, 1)
    go("fast", "acquire", a, a + "/2", 1)
    m.expire(a)
    assert go("fast", "release", a, 1, 1) == ["ok", 0]


@pytest.mark.parametrize("kind", ["sem", "bsem"])
def test_semaphore_fast_paths(r: redis.Redis, kind: str) -> None:
    m = Mirror(r, kind=kind, init=2)
    go = _Path(m)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    go("fast", "acquire", a, a + "/1", 1)
    assert go("fast", "release", a, 1, 1) == ["ok", 0]
    go("fast", "acquire", a, a + "/2", 1)
    go("slow", "acquire", b, b + "/1", 1)
    assert go("slow", "release", a, 1, 1) == ["ok", 0]  # b still holds one
    assert go("fast", "release", b, 1, 1) == ["ok", 0]
    go("fast", "acquire", a, a + "/3", 1)
    if kind == "sem":
        go("slow", "release", b, 1, 0)  # an extra permit: v == init while a holds one
        go("slow", "acquire", b, b + "/2", 1)  # v == init - 1 again, two holders
        assert go("slow", "release", a, 1, 1) == ["ok", 0]  # b's hold stays
        assert "P:sem:x" in m.snapshot_keys()
        assert go("slow", "release", b, 1, 1) == ["ok", 0]  # v == init + 1: kept
        go("slow", "acquire", a, a + "/4", 1)
    m.expire(a)
    go("slow", "release", a, 1, 1)


def test_calls_the_prelude_leaves_to_the_full_script(r: redis.Redis) -> None:
    m = Mirror(r)
    go = _Path(m)
    a, b, c = SIDS
    for s in SIDS:
        m.open(s)
    # a queue key without a state key (left by hand): the full script grants anyway
    m.each(lambda p, ns: r.rpush(m.queue(ns), c + "/0"))
    assert go("slow", "acquire", a, a + "/1", 1)[0] == "ok"
    m.each(lambda p, ns: r.delete(m.queue(ns)))
    go("slow", "acquire", b, b + "/1", 1)
    go("slow", "acquire", c, c + "/1", 1)
    # the same name with another shape: a conflict, whoever asks
    other = Mirror(r, init=2)
    other.each = m.each  # type: ignore[method-assign]
    for op, extra in (("release", (1, 1)), ("acquire", (a + "/2", 1))):
        assert _Path(other)("slow", op, a, *extra) == ["conflict", "lock", "1"]
    # a holder whose session the server no longer knows, with waiters: the full
    # script reaps it (here nothing to reap but the hold) and serves the queue
    m.each(lambda p, _ns: r.zrem(p + "sessions", a))
    assert go("slow", "release", a, 1, 1)[0] == "notowner"
    go("slow", "acquire", a, a + "/3", 1)  # nosession
    m.open(a)
    go("slow", "acquire", a, a + "/4", 1)
    # more than one permit given back (no client does this to a lock): the full script
    assert go("slow", "release", b, 2, 1) == ["ok", 2]


# -- keys of the wrong type ----------------------------------------------------------

FOREIGN = {
    "string": lambda r, k: r.set(k, "someone else's"),
    "list": lambda r, k: r.rpush(k, "x", "y"),
    "set": lambda r, k: r.sadd(k, "x"),
    "hash": lambda r, k: r.hset(k, mapping={"owner": "someone", "v": "7"}),
}


@pytest.mark.parametrize(
    ("where", "how"),
    [("state", how) for how in FOREIGN] + [("queue", how) for how in FOREIGN if how != "list"],
)
@pytest.mark.parametrize("scene", ["free", "held", "held-queued"])
def test_a_foreign_value_at_the_state_or_queue_key(
    r: redis.Redis, how: str, where: str, scene: str
) -> None:
    m = Mirror(r)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    if scene != "free":
        m.acquire(a, a + "/1")
    if scene == "held-queued":
        m.acquire(b, b + "/1")

    def plant(p: str, ns: str) -> None:
        key = m.key(ns) if where == "state" else m.queue(ns)
        r.delete(key)
        FOREIGN[how](r, key)

    m.each(plant)
    m.paths.clear()
    before = snapshot(r, "fast")
    for op, sid, extra in (
        ("acquire", a, (a + "/9", 1)),
        ("acquire", b, (b + "/9", 0)),
        ("release", a, (1, 1)),
        ("release", b, (1, 0)),
        ("cancel", b, (b + "/1",)),
    ):
        assert m.call(op, sid, *extra) == ["wrongtype", how]
        assert snapshot(r, "fast") == before
    assert m.paths[("acquire", "fast")] == 0
    assert m.paths[("release", "fast")] == 0


@pytest.mark.parametrize("where", ["holds", "fence", "sessions"])
@pytest.mark.parametrize("how", ["string", "list"])
def test_a_foreign_value_at_a_namespace_key_fast_paths(
    r: redis.Redis, where: str, how: str
) -> None:
    """Keys no name can produce (the full script does not check them either): the
    prelude gives the same Redis error as the full script and writes nothing but,
    at most, a skipped fencing token."""
    m = Mirror(r)
    a = SIDS[0]
    m.open(a)
    names = {"holds": "h:" + a, "fence": "fence", "sessions": "sessions"}

    def plant(p: str, _ns: str) -> None:
        r.delete(p + names[where])
        FOREIGN[how](r, p + names[where])

    m.each(plant)
    before = snapshot(r, "fast")
    reply = m.call("acquire", a, a + "/1", 1)
    # a string that is no token at the counter is reported as such; other types are
    # the server's own error
    assert reply[0] == ("corrupt" if (where, how) == ("fence", "string") else "error")
    after = snapshot(r, "fast")
    assert {k: v for k, v in after.items() if k != "P:fence"} == {
        k: v for k, v in before.items() if k != "P:fence"
    }
    if where == "holds":
        # release with nobody queued: the index set is written first
        m.each(lambda p, ns: r.delete(p + names[where]))
        m.call("acquire", a, a + "/2", 1)
        m.each(plant)
        before = snapshot(r, "fast")
        assert m.call("release", a, 1, 1)[0] == "error"
        assert snapshot(r, "fast") == before


@pytest.mark.parametrize(
    "where", ["holder-holds", "waiter-holds", "head-inbox", "fence", "identity"]
)
def test_a_foreign_value_at_a_namespace_key_hand_off(r: redis.Redis, where: str) -> None:
    """The hand-off meets such a key before it writes the lock's state and queue:
    a Redis error, the lock's state, queue and the served waiter's inbox untouched."""
    m = Mirror(r)
    a, b, c = SIDS
    for s in SIDS:
        m.open(s)
    m.acquire(a, a + "/1")
    m.acquire(b, b + "/1")
    m.acquire(c, c + "/1")
    key = {
        "holder-holds": "h:" + a,
        "waiter-holds": "h:" + b,
        "head-inbox": "in:" + c + "/1",
        "fence": "fence",
        "identity": "s:" + b,
    }[where]
    p = _prefix("fast")
    r.delete(p + key)
    r.rpush(p + key, "x") if where != "head-inbox" else r.set(p + key, "x")
    before = snapshot(r, "fast")
    with pytest.raises(redis.ResponseError):
        r.evalsha(m.shas["fast"], 4, *m.keys("fast"), p, "release", "lock", 1, a, 1, 1)
    after = snapshot(r, "fast")
    for k in ("P:lock:x", "P:lock/q:x", "P:in:" + b + "/1"):
        assert after.get(k) == before.get(k)


# -- random sequences ----------------------------------------------------------------


@dataclass
class World:
    """The callers' side of a random sequence: who waits under which waiter id."""

    m: Mirror
    n: int = 0
    waiting: list[tuple[str, str]] = field(default_factory=list)

    def new_wid(self, sid: str) -> str:
        self.n += 1
        return f"{sid}/{self.n}"


#: Operation names, repeated to weigh them: a queue builds up and holders release.
OP_NAMES = (
    ["acquire"] * 6
    + ["release-by-holder"] * 3
    + ["release"]
    + ["pop"] * 2
    + ["expire"] * 2
    + ["renew"] * 2
    + ["retry", "cancel", "refence", "state"]
)
OPS = st.tuples(st.sampled_from(OP_NAMES), st.integers(0, 7), st.integers(0, 1))


def _holders(m: Mirror) -> list[str]:
    fields = m.r.hkeys(m.key("fast")) if m.r.type(m.key("fast")) == "hash" else []
    return sorted(str(f)[2:] for f in fields if str(f).startswith("h:"))


def _step(w: World, op: str, pick: int, flag: int) -> None:
    m = w.m
    who = SIDS[pick % len(SIDS)]
    holders = _holders(m)
    if op == "release-by-holder" and not holders:
        op = "acquire"
    if op == "acquire":
        wid = w.new_wid(who)
        reply = m.acquire(who, wid, 1 if flag or pick % 2 else 0)
        if reply[0] == "queued":
            w.waiting.append((who, wid))
    elif op == "release-by-holder":
        m.release(holders[pick % len(holders)], 1, 1)
    elif op == "release":
        m.release(who, 1, flag)
    elif op == "expire":
        m.expire(who)
    elif op == "renew":
        m.open(who)
    elif op == "refence":
        m.each(lambda p, _ns: m.r.delete(p + "fence"))
    elif op == "state":
        m.call("state", "-")
    elif w.waiting:
        sid, wid = w.waiting[pick % len(w.waiting)]
        if op == "retry":
            if m.acquire(sid, wid, 1)[0] != "queued":
                w.waiting.remove((sid, wid))
        elif op == "cancel":
            m.call("cancel", sid, wid)
            w.waiting.remove((sid, wid))
        else:  # pop
            got = m.pop(wid)
            if got is not None and not got.startswith("w:"):
                w.waiting.remove((sid, wid))


ALL_PATHS: Counter[tuple[str, str]] = Counter()


@pytest.mark.parametrize(("kind", "init"), [("lock", 1), ("rlock", 1), ("sem", 2), ("bsem", 2)])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(OPS, min_size=4, max_size=40))
def test_random_sequences_fast_and_full_script_alike(
    server: ServerProcess, kind: str, init: int, ops: list[tuple[str, int, int]]
) -> None:
    with server.client(decode_responses=True) as r:
        r.flushall()
        m = Mirror(r, kind=kind, init=init)
        for s in SIDS:
            m.open(s)
        w = World(m)
        for op, pick, flag in ops:
            _step(w, op, pick, flag)
        ALL_PATHS.update(m.paths)


def test_random_sequences_reached_every_fast_path(server: ServerProcess) -> None:
    """(after the random test) the sequences did exercise the prelude."""
    if not ALL_PATHS:
        pytest.skip("the random test did not run in this session")
    assert ALL_PATHS[("acquire", "fast")] > 0
    assert ALL_PATHS[("release", "fast")] > 0
    assert ALL_PATHS[("release", "slow")] > 0


@pytest.mark.parametrize("kind", ["lock", "rlock"])
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    queue=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    dead=st.sets(st.integers(0, 2), max_size=3),
    holder=st.integers(0, 2),
    fresh_fence=st.booleans(),
    notices=st.booleans(),
)
def test_random_hand_offs_fast_and_full_script_alike(
    server: ServerProcess,
    kind: str,
    queue: list[int],
    dead: set[int],
    holder: int,
    fresh_fence: bool,
    notices: bool,
) -> None:
    """A holder releases a lock with a queue of waiters from any sessions (its own
    too), any of them dead by then, the holder too, the fencing counter lost or not,
    waiters' inboxes holding stale notices or not."""
    with server.client(decode_responses=True) as r:
        r.flushall()
        m = Mirror(r, kind=kind)
        for s in SIDS:
            m.open(s)
        h = SIDS[holder]
        assert m.acquire(h, h + "/0")[0] == "ok"
        for i, who in enumerate(queue, 1):
            assert m.acquire(SIDS[who], f"{SIDS[who]}/{i}")[0] == "queued"
            if notices:
                m.each(lambda p, _ns, w=f"{SIDS[who]}/{i}": r.rpush(p + "in:" + w, "w:old|x"))
        for d in sorted(dead):
            m.expire(SIDS[d])
        if fresh_fence:
            m.each(lambda p, _ns: r.delete(p + "fence"))
        m.paths.clear()
        reply = m.release(h, 1, 1)
        assert m.paths[("release", "fast")] == (holder not in dead)
        assert reply[0] == ("ok" if holder not in dead else "notowner") or reply == ["notheld"]
        # and everyone after, while the lock is handed down the queue
        for _ in range(len(queue) + 1):
            holders = _holders(m)
            if not holders:
                break
            m.release(holders[0], 1, 1)


@pytest.mark.parametrize("kind", ["lock", "sem"])
def test_nothing_is_granted_during_a_quiet_period(r: redis.Redis, kind: str) -> None:
    """Issue #10: after lost state the counter is pushed ahead of the clock
    (epoch.lua) and no grant is made before the clock passes it: not to a newcomer
    (blocking: queued; not blocking: refused), not by a release to the queue."""
    m = Mirror(r, kind=kind, init=1)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    assert m.acquire(a, a + "/1")[0] == "ok"
    assert m.acquire(b, b + "/1")[0] == "queued"
    until = m.server_ms() + 60_000
    m.each(lambda p, _ns: r.set(p + "fence", str((until + 1000) * 1000)))
    assert m.release(a, 1, 1, a + "/1") == ["ok", 0]  # freed, but b is not served
    assert _holders(m) == []
    reply = m.acquire(b, b + "/1")  # b looks again
    assert reply[0] == "quiet" and abs(int(reply[2]) - until) <= 1
    refused = m.acquire(a, a + "/2", 0)
    assert refused[0] == "quiet"
    m.each(lambda p, _ns: r.set(p + "fence", "1"))  # the clock has passed it
    assert m.acquire(b, b + "/1")[0] == "ok"


# -- retries: every call sent again after its reply was lost answers as the first (#10) --


@pytest.mark.parametrize("kind", ["lock", "sem"])
def test_an_acquire_sent_again_returns_the_grant_it_got(r: redis.Redis, kind: str) -> None:
    """Issue #10: an acquire whose reply was lost (reset after the write, a timeout, a
    garbled reply) is sent again with the same waiter id: it gets the same grant back
    instead of a second permit or a place in the queue behind its own hold."""
    m = Mirror(r, kind=kind, init=1 if kind == "lock" else 2)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    first = m.acquire(a, a + "/1")
    assert first[0] == "ok"
    assert m.acquire(a, a + "/1") == first  # the retry: same token, nothing more taken
    st = snapshot(r, "fast")[m.key("fast").replace(_prefix("fast"), "P:")][1]
    assert st["h:" + a] == "1"
    assert "P:" + m.queue("fast")[len(_prefix("fast")) :] not in m.snapshot_keys()
    # a grant by hand-off: the waiter's retry (its acquire's reply, or its pop, was
    # lost) finds it too, also after the inbox was emptied
    if kind == "lock":
        assert m.acquire(b, b + "/1")[0] == "queued"
        m.release(a, 1, 1, a + "/1")
        tok = m.pop(b + "/1")
        assert m.acquire(b, b + "/1") == ["ok", int(tok)]
        assert m.call("cancel", b, b + "/1") == ["ok", int(tok)]


@pytest.mark.parametrize("kind", ["sem", "bsem"])
def test_a_semaphore_grant_lost_in_flight_is_found_by_cancel(r: redis.Redis, kind: str) -> None:
    """Issue #10: a Semaphore permit granted to a waiter whose pop took the token but
    never delivered it: the waiter's clean-up (cancel) gets it back, to release."""
    m = Mirror(r, kind=kind, init=1)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    assert m.acquire(a, a + "/1")[0] == "ok"
    assert m.acquire(b, b + "/1")[0] == "queued"
    m.release(a, 1, 1, "rel-1")
    tok = m.pop(b + "/1")  # popped, then the connection broke
    assert m.call("cancel", b, b + "/1") == ["ok", int(tok)]
    assert m.release(b, 1, 1, "rel-2") == ["ok", 0]
    assert "P:" + m.key("fast")[len(_prefix("fast")) :] not in m.snapshot_keys()


def test_a_lock_release_sent_again_releases_once(r: redis.Redis) -> None:
    """Issue #10: a release names the grant it ends. Sent again after its reply was
    lost -- even after another thread of the same process took the lock again under
    the same session -- it releases nothing more."""
    m = Mirror(r)
    a, b = SIDS[:2]
    m.open(a)
    m.open(b)
    m.acquire(a, a + "/1")
    assert m.release(a, 1, 1, a + "/1") == ["ok", 0]
    assert m.acquire(a, a + "/2")[0] == "ok"  # the process's other thread
    assert m.release(a, 1, 1, a + "/1") == ["ok", 0]  # the retry: a/2's hold stays
    assert _holders(m) == [a]
    assert m.acquire(b, b + "/1")[0] == "queued"
    assert m.release(a, 1, 1, a + "/1") == ["ok", 0]  # again: nobody is served
    assert _holders(m) == [a]
    assert m.release(a, 1, 1, a + "/2") == ["ok", 1]
    assert _holders(m) == [b]


def test_a_semaphore_release_sent_again_releases_once(r: redis.Redis) -> None:
    """Issue #10: a semaphore's release carries an id; sent again it gives back no
    second permit while the session holds others."""
    m = Mirror(r, kind="sem", init=3)
    a = SIDS[0]
    m.open(a)
    for i in (1, 2):
        assert m.acquire(a, f"{a}/{i}")[0] == "ok"
    assert m.release(a, 1, 1, "r1") == ["ok", 0]
    assert m.release(a, 1, 1, "r1") == ["ok", 0]
    st = snapshot(r, "fast")["P:sem:x"][1]
    assert st["h:" + a] == "1" and st["v"] == "2"
    assert m.release(a, 1, 1, "r2") == ["ok", 0]
    assert "P:sem:x" not in m.snapshot_keys()
    assert m.release(a, 1, 1, "r2") == ["ok", 0]  # key gone, session alive: done before
