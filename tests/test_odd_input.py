"""Odd input of every kind gets a procsync error that says what to fix, changes
nothing on the server, and says each thing once: lone surrogates in names, state
keys written by something else, a fencing counter at its end, a server user without
the permissions procsync needs, bad TLS options and host names in the URL, and the
command line's messages."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner

from helpers.keys import leftover_keys, namespace_key, state_key
from helpers.procs import ChildFactory, wait_until
from procsync import (
    Barrier,
    BoundedSemaphore,
    Condition,
    CorruptStateError,
    Event,
    Lock,
    ProcsyncError,
    Semaphore,
    ServerError,
    ServerUnavailableError,
    Session,
    Value,
    WrongTypeError,
    registry,
)
from procsync.backend.client import ACL_RULES
from procsync.cli import main
from procsync.core.steps import side_key
from procsync.session import close_all
from procsync.testing import ServerProcess

pytest_plugins = ["helpers.fixtures"]

FENCE = namespace_key("fence")
#: Keys the test process's own session writes when it opens (no change of any state).
SESSION_KEYS = re.compile(r"^procsync:(born|\{default\}:(sessions|events|epoch|s:[0-9a-f]+))$")


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key but the test session's own records, with its type, value and expiry."""
    read: dict[str, Callable[[str], Any]] = {
        "string": r.get,
        "hash": r.hgetall,
        "list": lambda k: r.lrange(k, 0, -1),
        "set": r.smembers,
        "zset": lambda k: r.zrange(k, 0, -1, withscores=True),
    }
    out: dict[str, Any] = {}
    for key in r.scan_iter(count=1000):
        k = str(key)
        if SESSION_KEYS.match(k):
            continue
        typ = str(r.type(k))
        out[k] = (typ, read[typ](k) if typ in read else None, r.pttl(k))
    return out


class Server:
    """The test's server: what the test planted, to compare with at the end."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.before: dict[str, Any] | None = None

    def plant(self, writes: Callable[[redis.Redis], object] | None = None) -> None:
        if writes is not None:
            writes(self.r)
        self.before = snapshot(self.r)


@pytest.fixture
def server_state(raw: redis.Redis) -> Iterator[Server]:
    """Fails the test if anything but its session's registration changed after
    ``plant()``."""
    state = Server(raw)
    yield state
    assert state.before is not None, "the test did not plant()"
    assert snapshot(raw) == state.before, "the server's state changed"


# -- 1. lone surrogates --------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: Lock("a\udc80").acquire(timeout=1), id="lock-name"),
        pytest.param(lambda: Semaphore(2, name="\ud800x").acquire(timeout=1), id="sem-name"),
        pytest.param(lambda: Event("e", namespace="x\ud800").set(), id="namespace"),
        pytest.param(lambda: Session("worker-\udcff"), id="session-name"),
        pytest.param(lambda: registry.describe("a\udc80"), id="registry-name"),
    ],
)
def test_a_lone_surrogate_is_refused_naming_the_input(
    server_state: Server, make: Callable[[], object]
) -> None:
    server_state.plant()
    with pytest.raises(ValueError, match="not valid Unicode text") as info:
        make()
    assert not isinstance(info.value, UnicodeError)
    assert "stored as UTF-8" in str(info.value)
    assert "position" in str(info.value)


def test_a_lone_surrogate_in_the_namespace_variable(
    server_state: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    server_state.plant()
    monkeypatch.setenv("PROCSYNC_NAMESPACE", "x\udc80")  # a non-UTF-8 byte in the environment
    with pytest.raises(ValueError, match=r"namespace 'x\\udc80' is not valid Unicode text"):
        Lock("x").acquire(timeout=1)


# -- 2. corrupt state keys -----------------------------------------------------------------

BASE = {"t": "7", "g": "3", "r": "0"}

CORRUPT: dict[str, tuple[str, dict[str, str], str, Callable[[], object]]] = {
    # id: (state key, fields, the field named, the call)
    "lock-no-v": (
        state_key("lock", "x"),
        {"kind": "lock", "init": "1"},
        "'v'",
        lambda: Lock("x").acquire(timeout=0.5),
    ),
    "lock-v-abc": (
        state_key("lock", "x"),
        {"kind": "lock", "init": "1", "v": "abc", **BASE},
        "v='abc'",
        lambda: Lock("x").acquire(timeout=0.5),
    ),
    "lock-v-negative": (
        state_key("lock", "x"),
        {"kind": "lock", "init": "1", "v": "-5", **BASE},
        "v='-5'",
        lambda: Lock("x").acquire(timeout=0.5),
    ),
    "lock-v-above-init": (
        state_key("lock", "x"),
        {"kind": "lock", "init": "1", "v": "2", **BASE},
        "v='2'",
        lambda: Lock("x").acquire(blocking=False),
    ),
    "lock-init-missing": (
        state_key("lock", "x"),
        {"kind": "lock", "v": "1", **BASE},
        "'init'",
        lambda: Lock("x").acquire(timeout=0.5),
    ),
    "sem-value-t": (
        state_key("sem", "x"),
        {"kind": "sem", "init": "2", "v": "1", "t": "x", "g": "1", "r": "0"},
        "t='x'",
        lambda: Semaphore(2, name="x").value,
    ),
    "bsem-release-g": (
        state_key("bsem", "x"),
        {"kind": "bsem", "init": "2", "v": "1", "t": "1", "g": "1.5", "r": "0"},
        "g='1.5'",
        lambda: BoundedSemaphore(2, name="x").release(),
    ),
    "event-set": (
        state_key("event", "x"),
        {"kind": "event", "set": "yes"},
        "set='yes'",
        lambda: Event("x").set(),
    ),
    "barrier-count": (
        state_key("barrier", "x"),
        {"kind": "barrier", "init": "2", "count": "5", "broken": "0"},
        "count='5'",
        lambda: Barrier(2, name="x").wait(timeout=0.5),
    ),
    "barrier-broken": (
        state_key("barrier", "x"),
        {"kind": "barrier", "init": "2", "count": "0", "broken": "maybe"},
        "broken='maybe'",
        lambda: Barrier(2, name="x").wait(timeout=0.5),
    ),
    "value-int": (
        state_key("value", "x"),
        {"kind": "value", "type": "int", "v": "abc"},
        "v='abc'",
        lambda: Value("i", 0, name="x").value,
    ),
    "value-add-missing": (
        state_key("value", "x"),
        {"kind": "value", "type": "float"},
        "'v'",
        lambda: Value("d", 0.0, name="x").add(1.0),
    ),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_state_key_is_named_and_left_as_it_was(server_state: Server, case: str) -> None:
    key, fields, named, call = CORRUPT[case]
    server_state.plant(lambda r: r.hset(key, mapping=fields))
    with pytest.raises(CorruptStateError) as info:
        call()
    assert isinstance(info.value, WrongTypeError)  # and so a TypeError, a ServerError
    text = str(info.value)
    assert key in text
    assert named in text
    assert "Delete the key" in text


def test_a_script_failing_on_the_server_is_a_corrupt_state_error(server_state: Server) -> None:
    """A field the checks before writing do not read (a dead holder's count): the
    script fails on the server; the error says so, with the server's message."""
    key = state_key("lock", "x")
    dead = "deadbeef" * 4

    def writes(r: redis.Redis) -> None:
        r.hset(key, mapping={"kind": "lock", "init": "1", "v": "0", **BASE, f"h:{dead}": "abc"})
        r.sadd(namespace_key(f"h:{dead}"), key)

    server_state.plant(writes)
    with pytest.raises(CorruptStateError, match="procsync's script failed on the server") as e:
        Lock("x").acquire(timeout=0.5)
    assert "user_script" in str(e.value)  # the server's own words


# -- 3. the fencing counter ----------------------------------------------------------------


def test_a_fencing_counter_at_its_maximum_says_what_to_do(server_state: Server) -> None:
    server_state.plant(lambda r: r.set(FENCE, str(2**63 - 1)))
    for call in (lambda: Lock("x").acquire(timeout=0.5), lambda: Semaphore(2, name="s").acquire()):
        with pytest.raises(CorruptStateError) as info:
            call()
        text = str(info.value)
        assert f"the fencing counter {FENCE} is at its maximum" in text
        assert "DEL" in text


@pytest.mark.parametrize("value", ["-5", "abc", "1.5"])
def test_a_fencing_counter_that_is_no_token_is_refused(server_state: Server, value: str) -> None:
    server_state.plant(lambda r: r.set(FENCE, value))
    with pytest.raises(CorruptStateError) as info:
        Lock("x").acquire(timeout=0.5)
    assert f"the fencing counter {FENCE}" in str(info.value)
    assert "procsync's script failed" not in str(info.value)


WAITER = """
lock = Lock("L")
say("ready")
lock.acquire()
say("got")
hear()
"""


def test_a_fencing_counter_that_is_no_token_stops_a_condition_wait_unchanged(
    children: ChildFactory, server_state: Server
) -> None:
    """Condition.wait gives the lock to its first waiter: a grant, so a token; a
    counter that is no token must stop it before anything is written (today the
    waiter is taken off the lock's queue and the grant fails)."""
    lock = Lock("L")
    cond = Condition(lock, name="c")
    assert lock.acquire(timeout=2)
    children(WAITER, name="waiter").expect("ready")
    queue = side_key("procsync:{default}:", "lock", "q", "L")
    wait_until(lambda: server_state.r.llen(queue) == 1, timeout=5, what="the waiter queued")
    server_state.plant(lambda r: r.set(FENCE, "abc"))
    with pytest.raises(CorruptStateError, match=r"the fencing counter procsync:\{default\}:fence"):
        cond.wait(0.2)
    assert server_state.r.llen(queue) == 1


# -- 4. a server user without the permissions procsync needs --------------------------------


ACL_PASSWORD = "Odd-Acl-Secret-9"


@pytest.fixture
def acl_user(ps_url: str, server: ServerProcess) -> Iterator[Callable[[str, list[str]], str]]:
    """Make ACL users on the test's server (removed at the end); returns their URL."""
    made: list[str] = []

    def make(user: str, rules: list[str]) -> str:
        with server.client() as r:
            r.execute_command("ACL", "SETUSER", user, "reset", "on", f">{ACL_PASSWORD}", *rules)
        made.append(user)
        return f"unix://{user}:{ACL_PASSWORD}@{server.socket_path}"

    yield make
    close_all()  # before the users go: deleting one disconnects its clients
    with server.client() as r:
        for user in made:
            r.execute_command("ACL", "DELUSER", user)


@pytest.mark.parametrize("missing", ["+info", "+time", "~procsync:*"])
def test_a_user_without_the_acl_procsync_needs_is_told_the_rule(
    server_state: Server, acl_user: Callable[[str, list[str]], str], missing: str
) -> None:
    server_state.plant()
    rules = [r for r in ACL_RULES.split() if r != missing]
    if missing.startswith("~"):
        rules.append("~other:*")
    user = "odd-" + missing.strip("+~:*")
    url = acl_user(user, rules)
    with pytest.raises(ServerError) as info:
        Lock("x", url=url).acquire(timeout=1)
    text = str(info.value)
    assert f"ACL SETUSER {user} {ACL_RULES}" in text
    assert ACL_PASSWORD not in text
    assert text.count("denies procsync") == 1


def test_the_documented_acl_is_enough(
    ps_url: str, raw: redis.Redis, acl_user: Callable[[str, list[str]], str]
) -> None:
    rules = [r for r in ACL_RULES.split() if r != "+config|get"]  # optional
    url = acl_user("odd-enough", rules)
    lock, ev = Lock("x", url=url), Event("e", url=url)
    assert lock.acquire(timeout=2)
    info = registry.describe("x", url=url)
    assert info is not None and info.state == "locked"
    lock.release()
    ev.set()
    assert ev.wait(1)
    ev.clear()
    assert [s.state for s in registry.sessions(url=url)] == ["alive"]
    assert [k for k in leftover_keys(raw) if not SESSION_KEYS.match(k)] == []


# -- 5. bad options and host names in the URL -------------------------------------------------

SECRET = "s3cr3t-odd"


@pytest.mark.parametrize(
    ("bad_url", "named"),
    [
        ("rediss://127.0.0.1:1/0?ssl_cert_reqs=bogus", "ssl_cert_reqs='bogus'"),
        (f"redis://:{SECRET}@127.0.0.1:1?ssl_cert_reqs=bogus", "'ssl_cert_reqs'"),
        (f"unix://:{SECRET}@/tmp/procsync-nobody.sock?ssl_ca_certs=/x", "'ssl_ca_certs'"),
        ("redis://127.0.0.1:1?no_such_option=1", "'no_such_option'"),
        ("redis://a..b:6379", "empty label"),
        ("redis://" + "a" * 70 + ".example:6379", "70 characters"),
        ("redis://h\udcff:6379", "not valid Unicode text"),
    ],
    ids=["tls-bogus", "tls-on-redis", "tls-on-unix", "unknown", "empty-label", "long-label",
         "surrogate"],
)  # fmt: skip
def test_a_bad_url_is_a_value_error_naming_the_option(
    server_state: Server, bad_url: str, named: str
) -> None:
    server_state.plant()
    with pytest.raises(ValueError) as info:
        Lock("x", url=bad_url).acquire(timeout=1)
    assert not isinstance(info.value, (UnicodeError, ProcsyncError))
    text = str(info.value)
    assert named in text
    assert text.startswith("bad server URL '")
    assert SECRET not in text
    if SECRET in bad_url:
        assert "***" in text


def test_an_unknown_idna_host_cannot_be_reached(
    server_state: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A well-formed name that resolves to nothing is the network's answer."""
    server_state.plant()
    monkeypatch.setenv("PROCSYNC_SOCKET_TIMEOUT", "0.3")  # how long it is tried
    with pytest.raises((ServerUnavailableError, ValueError)) as info:
        Lock("x", url="redis://xn--a.example:6379").acquire(timeout=1)
    assert not isinstance(info.value, UnicodeError)
    assert "xn--a.example" in str(info.value)


# -- 6. each message once ---------------------------------------------------------------------


#: Nobody listens there (the database number keeps its Backend this module's own).
NOBODY = "redis://127.0.0.1:1/9"


@pytest.mark.parametrize("args", [["ps"], ["ls"], ["show", "x"], ["watch"]], ids=" ".join)
def test_the_command_line_says_cannot_reach_once(
    ps_url: str, monkeypatch: pytest.MonkeyPatch, args: list[str]
) -> None:
    monkeypatch.setenv("PROCSYNC_SOCKET_TIMEOUT", "0.3")  # how long it is tried
    url = NOBODY
    r = CliRunner().invoke(main, [*args, "--url", url])
    assert r.exit_code == 1, r.output
    assert r.output.count("cannot reach") == 1, r.output
    assert r.output.count(url) == 1, r.output


def test_the_registry_says_cannot_reach_once(ps_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROCSYNC_SOCKET_TIMEOUT", "0.3")
    with pytest.raises(ServerUnavailableError) as info:
        registry.sessions(url=NOBODY)
    assert str(info.value).count("cannot reach") == 1
