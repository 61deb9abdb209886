"""The connection to one server: URL, namespace, redis-py clients, scripts, checks.

A :class:`Backend` is shared by every primitive of a process that names the same
server and namespace (see :func:`get_backend`). It owns two redis-py clients over
one server: ``cmd`` (short socket timeout, so a dead server is an error within
seconds, never a hang) for the server check, SCRIPT LOAD and the helpers other
modules run (pipelines, scans), and ``wait`` (a timeout just above the longest
single pop) whose settings blocking pops use.

The hot paths -- :meth:`Backend.call` (one ``EVALSHA``) and :meth:`Backend.pop` (one
``BLPOP``) -- do not go through redis-py's command machinery (pool checkout and
release with a readiness peek, the retry closure, observability hooks, ``Script``
objects): each thread owns one connection for script calls and one for pops, made
from the matching client's pool but never returned to it, and a call is one packed
write and one read on it. The asyncio twins keep per-event-loop free lists of
connections instead: a connection is held by one task for one exchange, and one
cancelled or broken mid-exchange is closed, never reused.

Every redis-py exception is translated here, in one place, into procsync's tree
(:mod:`procsync.errors`); messages name the server by its URL with the password
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import ipaddress
import logging
import os
import re
import select
import socket
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol, cast
from urllib.parse import unquote, urlsplit

import hiredis
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.exceptions as rex
import redis.retry

from procsync import _config
from procsync._validate import check_namespace
from procsync.backend.scripts import SCRIPT_NAMES, script_source
from procsync.errors import (
    CorruptStateError,
    ProcsyncError,
    ProtocolError,
    ServerError,
    ServerUnavailableError,
    ServerUnsupportedError,
    WrongTypeError,
)

__all__ = ["MAX_POP_SECONDS", "Backend", "get_backend", "redact_url"]

log = logging.getLogger("procsync.backend")

#: The longest single blocking pop; longer waits are made of several.
MAX_POP_SECONDS = 10.0
MIN_REDIS = (6, 2)
MIN_VALKEY = (7, 2)

ScriptArg = str | int | float

#: Idle connections kept per event loop and kind (script calls, pops); more are closed.
MAX_IDLE_ASYNC = 32
#: How long past its own timeout a pop's reply may come before the pop counts as
#: failed (the server is frozen, or the network dropped it): a pop's socket timeout is
#: its timeout plus this. A pop that fails so is never resent; its caller looks again.
POP_GRACE = 0.5
#: No call's socket timeout is set shorter than this, however close its deadline.
MIN_CALL_TIMEOUT = 0.05
#: Holds the run id of a server that started empty, written by whoever started it so
#: (procsync.testing, the embedded server): no lease was ever granted before it, so
#: its empty namespaces need no quiet period (see ``epoch.lua``).
BORN_KEY = "procsync:born"


class SyncConnection(Protocol):
    """What procsync uses of a redis-py connection (``redis.connection.Connection``)."""

    _sock: socket.socket | None
    _parser: Any
    retry: redis.retry.Retry
    socket_timeout: float | None
    socket_connect_timeout: float | None

    def send_packed_command(self, command: list[bytes], check_health: bool = True) -> None: ...
    def read_response(self) -> Any: ...
    def disconnect(self) -> None: ...


class AsyncConnection(Protocol):
    """What procsync uses of a ``redis.asyncio`` connection."""

    _reader: asyncio.StreamReader | None
    _writer: asyncio.StreamWriter | None
    retry: redis.asyncio.retry.Retry
    socket_timeout: float | None
    socket_connect_timeout: float | None

    async def send_packed_command(
        self, command: list[bytes], check_health: bool = True
    ) -> None: ...

    async def read_response(self) -> Any: ...
    async def disconnect(self, nowait: bool = False) -> None: ...


def _make_connection(client: redis.Redis) -> SyncConnection:
    """A new (not yet connected) connection with ``client``'s settings, outside its
    pool: not counted against the pool's ``max_connections`` either (a thread's
    connection lives as long as the thread, and is never handed back)."""
    pool = cast(Any, client.connection_pool)
    return cast(SyncConnection, pool.connection_class(**pool.connection_kwargs))


def _amake_connection(client: redis.asyncio.Redis) -> AsyncConnection:
    """A new ``redis.asyncio`` connection with ``client``'s settings, outside its pool."""
    pool = cast(Any, client.connection_pool)
    return cast(AsyncConnection, pool.connection_class(**pool.connection_kwargs))


_pack_command = cast(Any, hiredis).pack_command


def _pack(*parts: ScriptArg) -> bytes:
    """One command in the wire protocol (str as UTF-8, int and float as redis-py
    writes them)."""
    return cast(bytes, _pack_command(parts))


def _arm(conn: SyncConnection, timeout: float) -> None:
    """Make ``timeout`` the socket timeout of ``conn`` for connecting, writing and
    reading, also on the socket it has open now (redis-py keeps a copy of it in the
    parser, to restore after a read with a timeout of its own)."""
    conn.socket_timeout = timeout
    conn.socket_connect_timeout = timeout
    sock = conn._sock
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.settimeout(timeout)
    parser = conn._parser
    if hasattr(parser, "_socket_timeout"):
        parser._socket_timeout = timeout
    buf = getattr(parser, "_buffer", None)
    if buf is not None and hasattr(buf, "socket_timeout"):
        buf.socket_timeout = timeout


def _retries(retry: Any) -> int:
    """How many times a redis-py ``Retry`` tries again (``get_retries()``, which
    redis-py releases before 5.1 lack)."""
    get = getattr(retry, "get_retries", None)
    return int(get() if get is not None else getattr(retry, "_retries", 0))


def _script_sha(name: str) -> str:
    """The SHA1 the server names script ``name`` by (a pure function of its text)."""
    return hashlib.sha1(script_source(name).encode("utf-8")).hexdigest()


class _Lane:
    """A connection owned by one thread, for script calls or for pops.

    It is never shared and never goes back to a pool: a call is one packed write and
    one read, and at most one exchange is ever in flight on it. ``busy`` is set for
    the duration of an exchange, so code that runs in between on the same thread (a
    signal handler, a finaliser run by the garbage collector) and calls the server
    gets a one-off connection (:meth:`Backend._new_lane`) instead of interleaving its
    command with a reply still on the way. ``epoch`` is the owning Backend's epoch
    when the lane was made: a lane from before :meth:`Backend.close` or from before
    a fork is never used again.
    """

    __slots__ = ("armed", "busy", "conn", "epoch", "poller", "sock", "spare")

    def __init__(self, conn: SyncConnection, epoch: int, *, spare: bool = False) -> None:
        self.conn = conn
        self.epoch = epoch
        self.busy = False
        self.spare = spare  # a one-off connection for a nested call: closed after it
        self.poller: select.poll | None = None
        self.sock: socket.socket | None = None
        #: The socket timeout set on conn (its client's until a call asks another).
        self.armed: float | None = conn.socket_timeout

    def arm(self, timeout: float) -> None:
        """Give the connection this socket timeout (nothing to do if it has it)."""
        if timeout != self.armed:
            _arm(self.conn, timeout)
            self.armed = timeout

    def ready(self) -> SyncConnection:
        """The connection, disconnected first if the server closed it while it sat
        idle (a restart, ``CLIENT KILL``, an idle timeout).

        An idle connection has nothing to read unless the server closed it (EOF reads
        as readable) or sent something unasked; either way it is not fit to carry a
        command, so one ``poll(0)`` decides, and the send that follows connects anew.
        Checking before sending -- not retrying after a failed read -- is what lets
        a script be sent at most once.
        """
        conn = self.conn
        sock = conn._sock
        if sock is not None:
            poller = self.poller
            if poller is None or sock is not self.sock:
                poller = select.poll()
                poller.register(sock, select.POLLIN | select.POLLPRI)
                self.poller, self.sock = poller, sock
            if poller.poll(0):
                conn.disconnect()
        return conn


class _ThreadLanes(threading.local):
    """This thread's two lanes to one Backend's server (made on first use)."""

    call: _Lane | None = None
    pop: _Lane | None = None


class _LoopConns:
    """One event loop's clients and idle connections to one Backend's server.

    ``calls`` and ``pops`` hold connections no task is using, each with nothing left
    to read; a task takes one out for one exchange and puts it back only if the
    exchange completed (a reply, or an error reply, was read).
    """

    __slots__ = ("calls", "cmd", "epoch", "pops", "wait")

    def __init__(self, cmd: redis.asyncio.Redis, wait: redis.asyncio.Redis, epoch: int) -> None:
        self.cmd = cmd
        self.wait = wait
        self.epoch = epoch
        self.calls: list[AsyncConnection] = []
        self.pops: list[AsyncConnection] = []


def _a_closed_while_idle(conn: AsyncConnection) -> bool:
    """True if an idle asyncio connection may not carry a command: the event loop saw
    the server close it (EOF, a reset) or bytes nobody asked for arrived."""
    rd = conn._reader
    if rd is None:
        return False
    return rd.at_eof() or rd.exception() is not None or bool(getattr(rd, "_buffer", None))


async def _adrop(conn: AsyncConnection) -> None:
    """Close an asyncio connection whose state is unknown (never to be reused)."""
    with contextlib.suppress(Exception):
        await conn.disconnect(nowait=True)


_background: set[asyncio.Task[None]] = set()


def _adrop_later(old: _LoopConns) -> None:
    """Close a retired loop state's clients and idle connections, from synchronous
    code running on that loop."""

    async def drop_all() -> None:
        for c in old.calls + old.pops:
            await _adrop(c)
        for client in (old.cmd, old.wait):
            with contextlib.suppress(Exception):
                await client.aclose()

    task = asyncio.get_running_loop().create_task(drop_all())
    _background.add(task)
    task.add_done_callback(_background.discard)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "password" not in parts.query.lower():
        return url
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:***@{host}"
    # Rebuilt by hand: urlunsplit would turn "unix:///path" into "unix:/path".
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = re.match(r"\d+", part)
        out.append(int(digits.group()) if digits else 0)
    return tuple(out)


#: The permissions procsync's commands (and its scripts' commands) need, as one ACL
#: rule: EVALSHA / SCRIPT LOAD; BLPOP, and LPUSH + PEXPIRE in MULTI / EXEC; INFO and
#: CONFIG GET (the server check; CONFIG GET is optional); PING; the registry's reads
#: (SCAN, HGETALL, XREAD, ...); TIME and the data commands inside the scripts.
ACL_RULES = (
    "resetkeys ~procsync:* -@all +@read +@write -@dangerous "
    "+evalsha +script|load +multi +exec +ping +info +time +config|get"
)
#: An ACL refusal: NOPERM, or the words the servers use for one inside a script.
_ACL_DENIED = re.compile(
    r"NOPERM|ACL failure|no permissions? to|can't run this command|can't access at least one",
    re.IGNORECASE,
)
#: A runtime error of a script (Redis 7 / Valkey: "... script: ..., on @user_script:N.";
#: Redis 6.2: "Error running script (call to f_...): @user_script:N: ...").
_SCRIPT_ERROR = re.compile(r"user_script|script:|Error running script")
_SCRIPT_LINE = re.compile(r"@user_script:(\d+)")


@functools.cache
def _fence_incr_lines() -> frozenset[int]:
    """Line numbers at which some script INCRs the fencing counter and no script
    increments anything else: an overflow reported there is the counter's."""
    incr: set[int] = set()
    other: set[int] = set()
    for name in SCRIPT_NAMES:
        for n, line in enumerate(script_source(name).splitlines(), 1):
            if "'INCR'" in line:
                incr.add(n)
            elif "INCRBY" in line:
                other.add(n)
    return frozenset(incr - other)


def _option_problem(exc: BaseException, scheme: str) -> str:
    """What redis-py's error about a URL's query options means, in the URL's terms."""
    text = str(exc)
    m = re.search(r"unexpected keyword argument '(\w+)'", text)
    if m:
        opt = m.group(1)
        tls = opt.startswith("ssl") and scheme != "rediss"
        hint = " (TLS options need a rediss:// URL)" if tls else ""
        return f"unknown option {opt!r} in its query string{hint}"
    m = re.search(r"Certificate Requirements Flag: (.*)", text)
    if m:
        return f"ssl_cert_reqs={m.group(1)!r} is not one of none, optional, required"
    return text


def _url_problem(url: str, scheme: str) -> str | None:
    """What is wrong with server URL ``url``, or None: the faults redis-py would only
    meet when connecting, as an internal TypeError or UnicodeError. Nothing is sent."""
    try:
        url.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"it is not valid Unicode text (lone surrogate at position {exc.start})"
    for i, ch in enumerate(url):
        if ord(ch) < 32 or ord(ch) == 127:
            return f"it contains the control character {ch!r} at position {i}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no port
    except ValueError as exc:
        return str(exc)
    host = unquote(parts.hostname or "") if scheme != "unix" else ""
    if host:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            labels = host[:-1].split(".") if host.endswith(".") else host.split(".")
            for label in labels:
                if not label:
                    return "its host name is not a valid DNS name: it has an empty label"
                try:
                    size = len(label.encode("ascii"))
                except UnicodeEncodeError:
                    try:
                        size = len(label.encode("idna"))
                    except UnicodeError:
                        return (
                            f"its host name is not a valid DNS name: label {label!r} is not "
                            "valid IDNA"
                        )
                if size > 63:
                    return (
                        f"its host name is not a valid DNS name: a label is {size} characters "
                        "long; the limit is 63"
                    )
    try:
        pool = redis.ConnectionPool.from_url(url)
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError, rex.RedisError) as exc:
        return _option_problem(exc, scheme)
    return None


class Backend:
    """One server and namespace, as seen from this process.

    Connections: ``cmd()`` and the ``wait`` client are redis-py clients (made and the
    server checked on first use); each thread that calls :meth:`call` or :meth:`pop`
    owns one connection for each, made from those clients' pools; each event loop
    keeps its own free lists for :meth:`acall` and :meth:`apop`. A forked child never
    uses a connection of its parent's (:func:`_after_fork_in_child` retires them).
    """

    __slots__ = (
        "__weakref__",
        "_aclients",
        "_checked",
        "_cmd",
        "_conns",
        "_epoch",
        "_lock",
        "_password",
        "_scripts",
        "_seen_quiet",
        "_shas",
        "_tls",
        "_wait",
        "epoch_key",
        "fence_key",
        "gone_key",
        "namespace",
        "prefix",
        "safe_url",
        "server_info",
        "sessions_key",
        "socket_timeout",
        "ttl_hint",
        "url",
    )

    def __init__(self, url: str, namespace: str) -> None:
        if not isinstance(url, str) or not url:
            raise TypeError("url must be a non-empty str")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"unsupported server URL {redact_url(url)!r}: use redis://, rediss:// or unix://"
            )
        problem = _url_problem(url, scheme)
        if problem is not None:
            with contextlib.suppress(ValueError):
                secret = urlsplit(url).password
                if secret:
                    problem = problem.replace(secret, "***")
            raise ValueError(f"bad server URL {redact_url(url)!r}: {problem}")
        self.url = url
        self.safe_url = redact_url(url)
        self._password = urlsplit(url).password
        self.namespace = check_namespace(namespace)
        self.prefix = f"procsync:{{{self.namespace}}}:"
        self.sessions_key = self.prefix + "sessions"
        self.fence_key = self.prefix + "fence"
        self.epoch_key = self.prefix + "epoch"
        self.gone_key = self.prefix + "gone"
        #: The longest session ttl of this process here: the quiet period after lost
        #: state lasts at least that long (sessions raise it when they open).
        self.ttl_hint = _config.env_ttl()
        self._seen_quiet = 0
        self.socket_timeout = _config.env_socket_timeout()
        self.server_info: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cmd: redis.Redis | None = None
        self._wait: redis.Redis | None = None
        # redis-py Script objects, kept for tools that read a script's SHA; the calls
        # themselves use _shas.
        self._scripts: dict[str, Any] = {}
        self._shas: dict[str, str] = {}
        self._checked = False
        # Bumped by close() and, in a forked child, at the fork: a thread's lane or a
        # loop's free list made under another epoch is never used again.
        self._epoch = 0
        self._tls = _ThreadLanes()
        self._conns: weakref.WeakSet[SyncConnection] = weakref.WeakSet()
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopConns] = (
            weakref.WeakKeyDictionary()
        )
        _all_backends.add(self)

    def __repr__(self) -> str:
        return f"<procsync.Backend {self.safe_url} namespace={self.namespace!r}>"

    # -- errors ---------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def translate(self, exc: BaseException) -> NoReturn:
        """Raise the procsync exception for a redis-py exception, chained.

        A procsync exception is raised as it is: a :class:`ServerUnavailableError` is
        also an ``OSError``, which callers catch to translate, and its message must
        not be wrapped in itself.
        """
        if isinstance(exc, ProcsyncError):
            raise exc
        msg = self._scrub(str(exc))
        if isinstance(exc, rex.AuthenticationError):
            raise ServerUnavailableError(
                f"the procsync server at {self.safe_url} refused the credentials: {msg}"
            ) from None
        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError)):
            raise ServerUnavailableError(
                f"cannot reach the procsync server at {self.safe_url}: {msg or type(exc).__name__}"
            ) from exc
        if isinstance(exc, rex.ResponseError):
            # redis-py strips the NOPERM code from the message (NoPermissionError); an
            # ACL refusal inside a script is a plain ERR with its own words.
            if (
                isinstance(exc, rex.NoPermissionError)
                or getattr(exc, "status_code", None) == "NOPERM"
                or _ACL_DENIED.search(msg)
            ):
                user = unquote(urlsplit(self.url).username or "") or "default"
                raise ServerError(
                    f"the server at {self.safe_url} denies procsync a command or key: "
                    f"{msg.rstrip('. ')}. Give its ACL user what procsync needs: ACL SETUSER "
                    f"{user} {ACL_RULES} (+config|get is optional: the eviction policy check; "
                    "add +select if the URL names a database)"
                ) from exc
            if msg.startswith("WRONGTYPE") or "WRONGTYPE" in msg:
                raise WrongTypeError(
                    f"a key procsync uses on {self.safe_url} holds another type of value: {msg}"
                ) from exc
            # (an error of the server's own state -- OOM, READONLY, ... -- keeps its code)
            if _SCRIPT_ERROR.search(msg) and getattr(exc, "status_code", "ERR") in ("ERR", None):
                if "overflow" in msg:
                    line = _SCRIPT_LINE.search(msg)
                    if line and int(line.group(1)) in _fence_incr_lines():
                        raise CorruptStateError(
                            f"the fencing counter {self.fence_key} is at its maximum (the "
                            f"server at {self.safe_url}: {msg.rstrip('. ')}); no lock or "
                            f"semaphore of namespace {self.namespace!r} can be granted until "
                            "it is fixed. Find what wrote it, then DEL it (it restarts from the "
                            "server clock in microseconds; a resource that checks tokens and "
                            "accepted one above that needs its last accepted token reset too)"
                        ) from exc
                    raise ServerError(
                        f"a number procsync's script increments on {self.safe_url} would "
                        f"overflow ({msg.rstrip('. ')}); that command changed nothing. A Value "
                        "added to past 64-bit integers ends so; anything else means a key under "
                        f"{self.prefix} holds a number procsync never writes"
                    ) from exc
                raise CorruptStateError(
                    f"procsync's script failed on the server at {self.safe_url}: "
                    f"{msg.rstrip('. ')}. A key "
                    f"under {self.prefix} most likely holds a value procsync never writes "
                    "(changed by hand or by another program); `procsync show NAME` lists a "
                    "primitive's state. The script's writes before the failure stay"
                ) from exc
            raise ServerError(f"the server at {self.safe_url} answered an error: {msg}") from exc
        if isinstance(exc, rex.RedisError):
            raise ProtocolError(f"unexpected reply from {self.safe_url}: {msg}") from exc
        raise exc

    def _sha(self, script: str) -> str:
        sha = self._shas.get(script)
        if sha is None:
            sha = self._shas[script] = _script_sha(script)  # KeyError: no such script
        return sha

    # -- sync -----------------------------------------------------------------

    def _make_sync(self, socket_timeout: float) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=min(socket_timeout, 5.0),
                health_check_interval=0,
                client_name=None,
            )
        except (ValueError, TypeError, rex.RedisError) as exc:
            problem = self._scrub(_option_problem(exc, urlsplit(self.url).scheme.lower()))
            raise ValueError(f"bad server URL {self.safe_url!r}: {problem}") from None

    @property
    def reached(self) -> bool:
        """True once this process has reached the server (its first-use check passed):
        a failure after that is an outage to ride out, not a configuration error."""
        return self._checked

    def cmd(self) -> redis.Redis:
        """The client for the server check, SCRIPT LOAD and other modules' commands
        (created, and the server checked, on first use)."""
        c = self._cmd
        if c is None:
            with self._lock:
                if self._cmd is None:
                    client = self._make_sync(self.socket_timeout)
                    if not self._checked:
                        self._check(client)
                    self._scripts = {
                        n: client.register_script(script_source(n)) for n in SCRIPT_NAMES
                    }
                    self._wait = self._make_sync(MAX_POP_SECONDS + self.socket_timeout)
                    self._cmd = client
                c = self._cmd
        return c

    def _new_lane(self, pop: bool) -> _Lane:
        """A new lane for this thread (stored as its lane unless its current one is
        busy: then a spare for one nested exchange)."""
        self.cmd()
        client = self._wait if pop else self._cmd
        if client is None:  # close() ran in another thread just now
            raise ServerUnavailableError(f"the connection to {self.safe_url} was closed")
        conn = _make_connection(client)
        tls = self._tls
        old = tls.pop if pop else tls.call
        busy = old is not None and old.busy and old.epoch == self._epoch
        lane = _Lane(conn, self._epoch, spare=busy)
        if not busy:
            self._conns.add(conn)
            if pop:
                tls.pop = lane
            else:
                tls.call = lane
            if old is not None:
                # A lane of an earlier epoch: closed already by close(), or a parent's
                # connection in a forked child (redis-py then closes only the child's
                # descriptor, never shutting down the parent's socket).
                with contextlib.suppress(Exception):
                    old.conn.disconnect()
        return lane

    def _send(self, conn: SyncConnection, packed: bytes) -> None:
        """Write one packed command, applying the client's retry policy to failures
        while connecting or writing -- never to a failure after the command was
        written, when the server may have run it."""
        retry = conn.retry
        if _retries(retry) == 0:  # the policy of a client made from a URL
            conn.send_packed_command([packed], check_health=False)
        else:
            retry.call_with_retry(
                lambda: conn.send_packed_command([packed], check_health=False),
                lambda _exc: conn.disconnect(),
            )

    def _script_load(self, conn: SyncConnection, script: str) -> str:
        self._send(conn, _pack("SCRIPT", "LOAD", script_source(script)))
        sha = str(conn.read_response())
        self._shas[script] = sha
        return sha

    def _exchange(
        self,
        pop: bool,
        packed: bytes,
        script: str | None = None,
        keys: Sequence[str] = (),
        args: Sequence[ScriptArg] = (),
        timeout: float | None = None,
    ) -> Any:
        """Send one packed command on this thread's call (or pop) lane and read its
        reply. ``script``: the command is its EVALSHA with ``keys`` and ``args``, sent
        once more after loading it if the server does not know it. ``timeout``: the
        socket timeout for this exchange (connecting, writing, reading), else the
        client's."""
        lane = self._tls.pop if pop else self._tls.call
        if lane is None or lane.busy or lane.epoch != self._epoch:
            lane = self._new_lane(pop)
        conn = lane.ready()
        t = self.socket_timeout if timeout is None else timeout
        lane.arm(t)
        lane.busy = True
        try:
            if not pop and script is not None and conn._sock is None:
                # A new connection: has the server lost state? (Its set-up reads share
                # the call's time: what is left of it is the call's own.)
                end = time.monotonic() + t
                self._look_at_state(
                    conn, lambda: lane.arm(max(MIN_CALL_TIMEOUT, end - time.monotonic()))
                )
                lane.arm(max(MIN_CALL_TIMEOUT, end - time.monotonic()))
            self._send(conn, packed)
            try:
                return conn.read_response()
            except rex.NoScriptError:
                if script is None:
                    raise
                sha = self._script_load(conn, script)
                self._send(conn, _pack("EVALSHA", sha, len(keys), *keys, *args))
                return conn.read_response()
        except rex.ResponseError as exc:
            self.translate(exc)  # a whole error reply was read: the connection is fine
        except (rex.RedisError, OSError) as exc:
            conn.disconnect()
            self.translate(exc)
        except BaseException:  # interrupted mid-exchange: a reply may still come
            conn.disconnect()
            raise
        finally:
            lane.busy = False
            if lane.spare:
                conn.disconnect()

    def _epoch_args(self, born: Any) -> tuple[tuple[str, str], tuple[ScriptArg, ...]]:
        """KEYS and ARGV of ``epoch.lua``."""
        keys = (self.epoch_key, self.fence_key)
        return keys, (self.prefix, int(self.ttl_hint * 1000), str(born or ""))

    def _look_at_state(self, conn: SyncConnection, rearm: Callable[[], None]) -> None:
        """Before the first script call on a new connection: has this namespace's state
        been lost, or the server restarted or failed over, since it was last looked at?
        Then ``epoch.lua`` starts the quiet period before anything can be granted: the
        first client back after such an event is the one that starts it."""
        self._send(conn, _pack("GET", BORN_KEY))  # (connects)
        rearm()
        keys, args = self._epoch_args(conn.read_response())
        rearm()
        self._send(conn, _pack("EVALSHA", self._sha("epoch"), len(keys), *keys, *args))
        try:
            reply = conn.read_response()
        except rex.NoScriptError:
            sha = self._script_load(conn, "epoch")
            self._send(conn, _pack("EVALSHA", sha, len(keys), *keys, *args))
            reply = conn.read_response()
        self._note_state(reply)

    def _note_state(self, reply: Any) -> None:
        """Log a quiet period once (every connection of the process hears of it)."""
        try:
            quiet, lost = int(reply[1]), int(reply[2])
        except (TypeError, ValueError, IndexError):
            raise ProtocolError(
                f"epoch check on {self.safe_url}: malformed reply {reply!r:.100}"
            ) from None
        if quiet > self._seen_quiet:
            self._seen_quiet = quiet
            what = "lost the state" if lost else "restarted or failed over"
            log.warning(
                "the server at %s %s of namespace %r: nothing is granted there until every "
                "lease from before has run out (%.1f s from its start)",
                self.safe_url,
                what,
                self.namespace,
                self.ttl_hint,
            )

    def call(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        timeout: float | None = None,
    ) -> list[Any]:
        """Run ``script`` atomically on the server and return its reply list.

        ``timeout`` bounds the call (connecting, writing and reading; at least
        :data:`MIN_CALL_TIMEOUT`); by default the ``PROCSYNC_SOCKET_TIMEOUT``. Callers
        with a deadline pass what is left of it, so a frozen server never makes a call
        overrun its caller's deadline by more than that minimum.

        One ``EVALSHA`` on this thread's own connection. If the server does not know
        the script (it restarted, or ``SCRIPT FLUSH``), it is loaded and the call sent
        once more. A connection the server closed while it was idle is detected before
        sending and replaced, so the command goes out once, on a live connection.
        Connecting and writing follow the client's retry policy (from the URL; none by
        default); a failure once the command was written is never retried -- the
        script may have run -- and raises :class:`ServerUnavailableError`, the
        connection being dropped (its state is unknown). Error replies are translated
        (:meth:`translate`) and leave the connection in use.
        """
        sha = self._shas.get(script) or self._sha(script)
        packed = _pack("EVALSHA", sha, len(keys), *keys, *args)
        t = None if timeout is None else max(MIN_CALL_TIMEOUT, min(timeout, self.socket_timeout))
        return self._check_reply(script, self._exchange(False, packed, script, keys, args, t))

    def pop(self, key: str, timeout: float, grace: float = POP_GRACE) -> str | None:
        """Block until a value is pushed onto list ``key`` or ``timeout`` seconds pass
        (at most :data:`MAX_POP_SECONDS`); return it, or None.

        One ``BLPOP`` on this thread's own pop connection, with the same checks, retry
        rule and error handling as :meth:`call`. Its socket timeout is the pop's own
        plus ``grace``: a server that does not answer by then (frozen, or cut off)
        makes it raise :class:`ServerUnavailableError` -- never a hang. The value the
        server may have popped meanwhile is lost with the connection; callers look
        again (a grant is found again by its waiter id, see ``permits.lua``).
        """
        secs = max(0.001, min(timeout, MAX_POP_SECONDS))
        got = self._exchange(
            True, _pack("BLPOP", key, round(secs, 3)), timeout=secs + max(grace, MIN_CALL_TIMEOUT)
        )
        if got is None:
            return None
        return str(got[1])

    def ping(self) -> float:
        """One ``PING`` on the lane script calls use; returns the seconds it took
        (the round-trip floor of :meth:`call`)."""
        t0 = time.perf_counter()
        self._exchange(False, _pack("PING"))
        return time.perf_counter() - t0

    def _check_reply(self, script: str, reply: Any) -> list[Any]:
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], str):
            raise ProtocolError(
                f"script {script!r} on {self.safe_url} gave a malformed reply {reply!r:.200}"
            )
        return reply

    # -- server check ---------------------------------------------------------

    def _check(self, client: redis.Redis) -> None:
        """Refuse servers that are too old or evict keys (that would drop locks)."""
        try:
            info = client.info("server")
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        self._apply_check(info, lambda: self._policy_sync(client))

    def _policy_sync(self, client: redis.Redis) -> str | None:
        try:
            got = client.config_get("maxmemory-policy")
            if got:
                return str(next(iter(got.values())))
        except rex.ResponseError:
            pass
        except rex.RedisError as exc:
            self.translate(exc)
        try:
            mem = client.info("memory")
            return str(mem.get("maxmemory_policy")) if mem.get("maxmemory_policy") else None
        except rex.RedisError as exc:
            self.translate(exc)

    def _apply_check(self, info: dict[str, Any], policy_of: Any) -> None:
        if "valkey_version" in info:
            product, version, minimum = "Valkey", str(info["valkey_version"]), MIN_VALKEY
        else:
            product, version, minimum = "Redis", str(info.get("redis_version", "0")), MIN_REDIS
        if _version_tuple(version) < minimum:
            need = ".".join(map(str, minimum))
            raise ServerUnsupportedError(
                f"{product} {version} at {self.safe_url} is too old: procsync needs "
                f"{product} >= {need} (Redis >= 6.2 or Valkey >= 7.2)"
            )
        policy = policy_of()
        if policy is not None and policy != "noeviction":
            raise ServerUnsupportedError(
                f"the server at {self.safe_url} has maxmemory-policy {policy!r}: it may evict "
                "the keys that hold locks. Set it to 'noeviction' (CONFIG SET maxmemory-policy "
                "noeviction) or use a dedicated server."
            )
        if policy is None:
            log.warning("could not read maxmemory-policy of %s; assuming noeviction", self.safe_url)
        self.server_info = {"product": product, "version": version, "policy": policy or "?"}
        self._checked = True

    # -- asyncio --------------------------------------------------------------

    def _aconns(self) -> _LoopConns:
        """The running event loop's clients and free lists (made on first use; made
        anew after :meth:`close` or a fork, the old idle connections being closed)."""
        loop = asyncio.get_running_loop()
        got = self._aclients.get(loop)
        if got is not None and got.epoch == self._epoch:
            return got
        kw: dict[str, Any] = {"decode_responses": True, "health_check_interval": 0}
        try:
            cmd = redis.asyncio.Redis.from_url(
                self.url,
                socket_timeout=self.socket_timeout,
                socket_connect_timeout=min(self.socket_timeout, 5.0),
                **kw,
            )
            wait = redis.asyncio.Redis.from_url(
                self.url,
                socket_timeout=MAX_POP_SECONDS + self.socket_timeout,
                socket_connect_timeout=min(self.socket_timeout, 5.0),
                **kw,
            )
            _amake_connection(cmd)  # redis.asyncio's connections take the URL's options
        except (ValueError, TypeError, rex.RedisError) as exc:
            problem = self._scrub(_option_problem(exc, urlsplit(self.url).scheme.lower()))
            raise ValueError(f"bad server URL {self.safe_url!r}: {problem}") from None
        if got is not None:
            _adrop_later(got)
        fresh = self._aclients[loop] = _LoopConns(cmd, wait, self._epoch)
        return fresh

    def _aset(self) -> tuple[redis.asyncio.Redis, redis.asyncio.Redis, _LoopConns]:
        """(cmd, wait, free lists) of the running event loop."""
        got = self._aconns()
        return got.cmd, got.wait, got

    async def acheck(self) -> None:
        """Async twin of the first-use server check."""
        if self._checked:
            return
        cmd, _, _ = self._aset()
        try:
            info = await cmd.info("server")
            policy: str | None = None
            try:
                got = await cmd.config_get("maxmemory-policy")
                policy = str(next(iter(got.values()))) if got else None
            except rex.ResponseError:
                mem = await cmd.info("memory")
                policy = mem.get("maxmemory_policy")
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        self._apply_check(info, lambda: policy)

    async def _asend(self, conn: AsyncConnection, packed: bytes) -> None:
        """Async twin of :meth:`_send` (the same retry rule).

        On a connected connection with no retries (the default), the command goes
        straight to the transport, which sends what the socket takes at once; only if
        some of it had to be buffered is there a wait (bounded by the socket timeout).
        A write that fails later surfaces as a failed read -- never retried.
        """
        retry = conn.retry
        writer = conn._writer
        if _retries(retry) == 0:
            if writer is None or writer.transport.is_closing():
                await conn.send_packed_command([packed], check_health=False)  # connects
                return
            writer.write(packed)
            if writer.transport.get_write_buffer_size():
                try:
                    await asyncio.wait_for(writer.drain(), conn.socket_timeout)
                except asyncio.TimeoutError:
                    raise rex.TimeoutError("Timeout writing to socket") from None
                except OSError as exc:
                    raise rex.ConnectionError(f"Error while writing to socket: {exc}") from exc
        else:

            async def fail(_exc: Exception) -> None:
                await conn.disconnect()

            await retry.call_with_retry(
                lambda: conn.send_packed_command([packed], check_health=False), fail
            )

    async def _agive_back(
        self, st: _LoopConns, free: list[AsyncConnection], conn: AsyncConnection
    ) -> None:
        if st.epoch == self._epoch and len(free) < MAX_IDLE_ASYNC:
            free.append(conn)
        else:
            await _adrop(conn)

    async def _aexchange(
        self,
        pop: bool,
        packed: bytes,
        script: str | None = None,
        keys: Sequence[str] = (),
        args: Sequence[ScriptArg] = (),
        timeout: float | None = None,
    ) -> Any:
        """Async twin of :meth:`_exchange` (``timeout`` likewise).

        The exchange runs on a connection taken from the running loop's free list of
        call (or pop) connections, or a new one, and used by this task alone; it goes
        back to the list only once a reply -- or an error reply -- was read. A
        connection whose exchange was cancelled or failed is closed and never reused:
        its reply may still arrive.
        """
        st = self._aconns()
        free = st.pops if pop else st.calls
        conn = free.pop() if free else _amake_connection(st.wait if pop else st.cmd)
        t = self.socket_timeout if timeout is None else timeout
        conn.socket_timeout = conn.socket_connect_timeout = t
        try:
            if _a_closed_while_idle(conn):
                await conn.disconnect(nowait=True)
            if not pop and script is not None and conn._writer is None:
                end = time.monotonic() + t
                await self._alook_at_state(conn, end)
                conn.socket_timeout = max(MIN_CALL_TIMEOUT, end - time.monotonic())
            await self._asend(conn, packed)
            try:
                reply = await conn.read_response()
            except rex.NoScriptError:
                if script is None:
                    raise
                await self._asend(conn, _pack("SCRIPT", "LOAD", script_source(script)))
                sha = self._shas[script] = str(await conn.read_response())
                await self._asend(conn, _pack("EVALSHA", sha, len(keys), *keys, *args))
                reply = await conn.read_response()
        except rex.ResponseError as exc:
            await self._agive_back(st, free, conn)
            self.translate(exc)
        except BaseException as exc:
            await _adrop(conn)
            if isinstance(exc, (rex.RedisError, OSError)):
                self.translate(exc)
            raise
        await self._agive_back(st, free, conn)
        return reply

    async def _alook_at_state(self, conn: AsyncConnection, end: float) -> None:
        """Async twin of :meth:`_look_at_state` (its reads share the time until ``end``)."""
        await self._asend(conn, _pack("GET", BORN_KEY))
        conn.socket_timeout = max(MIN_CALL_TIMEOUT, end - time.monotonic())
        keys, args = self._epoch_args(await conn.read_response())
        conn.socket_timeout = max(MIN_CALL_TIMEOUT, end - time.monotonic())
        await self._asend(conn, _pack("EVALSHA", self._sha("epoch"), len(keys), *keys, *args))
        try:
            reply = await conn.read_response()
        except rex.NoScriptError:
            await self._asend(conn, _pack("SCRIPT", "LOAD", script_source("epoch")))
            sha = self._shas["epoch"] = str(await conn.read_response())
            await self._asend(conn, _pack("EVALSHA", sha, len(keys), *keys, *args))
            reply = await conn.read_response()
        self._note_state(reply)

    async def acall(
        self,
        script: str,
        keys: Sequence[str],
        args: Sequence[ScriptArg],
        timeout: float | None = None,
    ) -> list[Any]:
        """Async twin of :meth:`call`, with :meth:`_aexchange`'s rules for connections."""
        if not self._checked:
            await self.acheck()
        sha = self._shas.get(script) or self._sha(script)
        packed = _pack("EVALSHA", sha, len(keys), *keys, *args)
        t = None if timeout is None else max(MIN_CALL_TIMEOUT, min(timeout, self.socket_timeout))
        reply = await self._aexchange(False, packed, script, keys, args, t)
        return self._check_reply(script, reply)

    async def apush(self, key: str, value: str, ttl_ms: int = 120_000) -> None:
        """Push ``value`` onto list ``key`` (expiring after ``ttl_ms``): how a cancelled
        waiter ends its own pending pop."""
        cmd, _, _ = self._aset()
        try:
            async with cmd.pipeline(transaction=True) as pipe:
                pipe.lpush(key, value)
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)

    async def apop(self, key: str, timeout: float, grace: float = POP_GRACE) -> str | None:
        """Async twin of :meth:`pop`, with :meth:`_aexchange`'s rules for connections."""
        secs = max(0.001, min(timeout, MAX_POP_SECONDS))
        got = await self._aexchange(
            True, _pack("BLPOP", key, round(secs, 3)), timeout=secs + max(grace, MIN_CALL_TIMEOUT)
        )
        if got is None:
            return None
        return str(got[1])

    async def aping(self) -> float:
        """Async twin of :meth:`ping`."""
        t0 = time.perf_counter()
        await self._aexchange(False, _pack("PING"))
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop the clients and every thread's connections (their sockets close).

        Another thread's call in flight fails with :class:`ServerUnavailableError`;
        later calls connect anew. asyncio connections are closed by their own loop the
        next time it uses this Backend.
        """
        with self._lock:
            self._epoch += 1
            clients = (self._cmd, self._wait)
            self._cmd = self._wait = None
            conns = list(self._conns)
            self._conns = weakref.WeakSet()
        for c in clients:
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.disconnect()
        self._tls.call = self._tls.pop = None

    def _after_fork(self) -> None:
        """In a forked child: retire every connection inherited from the parent."""
        self._lock = threading.Lock()
        self._epoch += 1
        self._conns = weakref.WeakSet()
        self._tls = _ThreadLanes()


_all_backends: weakref.WeakSet[Backend] = weakref.WeakSet()

_backends: dict[tuple[str, str], Backend] = {}
_backends_lock = threading.Lock()


def resolve_url(url: str | None = None) -> str:
    """The server URL to use: ``url``, else ``PROCSYNC_URL``, else the embedded server
    (started on first use)."""
    if url is not None:
        return url
    env = _config.env_url()
    if env is not None:
        return env
    from procsync.backend import embedded

    return embedded.ensure_running()


def get_backend(url: str | None = None, namespace: str | None = None) -> Backend:
    """The process's :class:`Backend` for ``url`` and ``namespace`` (defaults from the
    environment; no URL anywhere means the embedded server)."""
    ns = namespace if namespace is not None else _config.env_namespace()
    key_url = url if url is not None else (_config.env_url() or "")
    with _backends_lock:
        b = _backends.get((key_url, ns))
    if b is not None:
        return b
    real = resolve_url(url)
    with _backends_lock:
        b = _backends.get((key_url, ns))
        if b is None:
            b = Backend(real, ns)
            _backends[(key_url, ns)] = b
    return b


def _after_fork_in_child() -> None:
    # A child owns nothing of its parent's connections: start over lazily.
    global _backends_lock
    _backends_lock = threading.Lock()
    _backends.clear()
    # Backends held by primitives survive the fork: none may use a parent's socket.
    for b in list(_all_backends):
        b._after_fork()


os.register_at_fork(after_in_child=_after_fork_in_child)
