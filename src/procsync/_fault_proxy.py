"""A TCP fault-injection proxy between a client and a Valkey/Redis server.

:class:`FaultProxy` listens on ``127.0.0.1`` (loopback only, a free port) and
forwards every connection it accepts to a target server: a Unix socket (what
:class:`procsync.testing.ServerProcess` listens on) or a ``(host, port)`` on
loopback. Faults are switched on while connections are open, take effect at once
for existing and new connections, and last until :meth:`FaultProxy.heal`. What
each one models:

``latency(seconds)``
    A slow network: every chunk is delivered ``seconds`` after the proxy read it,
    in order.
``stall("up" | "down" | "both")``
    A one-direction stall (a stuck buffer, an asymmetric partition): bytes in that
    direction are kept, not delivered, and nobody gets an error. ``stall("down")``
    is "the write reached the server, the reply never came": the command runs, the
    client times out. ``stall("up")``: the server never sees the command.
``blackhole()``
    A network partition: both directions stall, and a new connection is accepted
    (the client's connect succeeds) but never reaches the server, which does not
    even see it. Nothing is reset or closed: clients only ever time out. Compare a
    *frozen server* (:meth:`ServerProcess.pause <procsync.testing.ServerProcess.pause>`):
    there every client, proxied or not, hangs, and the server's kernel still
    accepts connections; behind a blackhole the server is fine and serves
    everyone else.
``reset()``
    The connection broke (a server restart, a middlebox dropping state): every
    current connection is aborted with a TCP RST; new connections work.
``refuse()``
    The server is down: new connections are reset at once (accept, then RST), and
    current ones too, until :meth:`~FaultProxy.heal`.
``hold_next_reply()`` / ``release_held()``
    A slow reply, deterministically: the next chunk the server sends (on any
    connection) is kept back until released, e.g. to let a lease expire between
    the server's decision and the client hearing of it.
``drop_next_reply()``
    A reset after the write, before the reply: the next chunk the server sends is
    discarded and its connection reset. The command ran; the client gets a
    connection error and cannot know whether it did.

Stalled and held bytes are delivered in order by :meth:`~FaultProxy.heal`. One
daemon I/O thread serves all connections (``selectors`` with a wake-up socket;
latency deadlines become the selector's timeout), so nothing busy-waits and every
control call returns once the I/O thread has applied it::

    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from procsync.testing import FaultProxy, ServerProcess

    with ServerProcess("valkey") as srv, FaultProxy(srv.socket_path) as proxy:
        r = redis.Redis.from_url(proxy.url, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
        r.ping()
        proxy.stall("down")
        try:
            r.set("k", "v")                  # runs on the server ...
        except redis.TimeoutError:
            pass                             # ... but the reply never comes
        assert srv.client().get("k") == b"v"
        proxy.heal()

``proxy.url`` can equally be handed to procsync (``Lock("x", url=proxy.url)``).
"""

from __future__ import annotations

import collections
import contextlib
import ipaddress
import math
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, TypeVar, cast, final
from urllib.parse import parse_qs, urlsplit

__all__ = ["FaultProxy"]

_T = TypeVar("_T")

#: The directions a fault may apply to: client->server, server->client, both.
DIRECTIONS: Final = ("up", "down", "both")

_LISTEN_HOST: Final = "127.0.0.1"
_RECV_SIZE: Final = 65536
#: Per direction and connection: reading pauses while this much is kept back.
_MAX_BUFFERED: Final = 4 * 1024 * 1024
_CONNECT_TIMEOUT: Final = 2.0
_CALL_TIMEOUT: Final = 10.0
_JOIN_TIMEOUT: Final = 5.0
_ACCEPTS_PER_WAKE: Final = 64
_LINGER_RST: Final = struct.pack("ii", 1, 0)

_LISTEN: Final = "listen"
_WAKE: Final = "wake"

_Target = str | tuple[str, int]


# -- argument checks --------------------------------------------------------------


def _directions(direction: str) -> tuple[bool, bool]:
    """(up, down) for a direction name; ValueError for anything else."""
    if direction == "up":
        return True, False
    if direction == "down":
        return False, True
    if direction == "both":
        return True, True
    raise ValueError(f"direction must be one of {DIRECTIONS}, not {direction!r}")


def _seconds(seconds: float) -> float:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"latency must be a number of seconds, not {seconds!r}")
    value = float(seconds)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"latency must be a finite number of seconds >= 0, not {seconds!r}")
    return value


def _loopback_host(host: str) -> str:
    """The address to connect to for ``host``, which must be on loopback."""
    if host == "localhost":
        return _LISTEN_HOST
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(
            f"a FaultProxy target host must be a loopback address or 'localhost', not {host!r}"
        ) from None
    if not address.is_loopback:
        raise ValueError(f"a FaultProxy target must be on loopback, not {host!r}")
    return str(address)


def _port(port: object) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"a FaultProxy target port must be an int in 1..65535, not {port!r}")
    return port


def _db(text: str, url: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise ValueError(f"bad database number {text!r} in {url!r}") from None
    if db < 0:
        raise ValueError(f"bad database number {text!r} in {url!r}")
    return db


def _parse_target(target: str | os.PathLike[str] | tuple[str, int]) -> tuple[_Target, int]:
    """(unix path or (host, port), database number) for a FaultProxy target."""
    if isinstance(target, tuple):
        if len(target) != 2 or not isinstance(target[0], str):
            raise ValueError(f"a FaultProxy target tuple must be (host, port), not {target!r}")
        return (_loopback_host(target[0]), _port(target[1])), 0
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if not isinstance(target, str):
        raise TypeError(
            "a FaultProxy target is a unix socket path, a (host, port) tuple or a "
            f"unix:// or redis:// URL, not {target!r}"
        )
    if "://" not in target:
        if not target:
            raise ValueError("a FaultProxy target path must not be empty")
        return target, 0
    parts = urlsplit(target)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"no socket path in {target!r}")
        dbs = parse_qs(parts.query).get("db", ["0"])
        return parts.path, _db(dbs[-1], target)
    if parts.scheme == "redis":
        if parts.hostname is None:
            raise ValueError(f"no host in {target!r}")
        try:
            port = parts.port or 6379
        except ValueError:
            raise ValueError(f"bad port in {target!r}") from None
        path = parts.path.strip("/")
        return (_loopback_host(parts.hostname), _port(port)), _db(path or "0", target)
    raise ValueError(
        f"a FaultProxy target URL must be unix:// or redis:// (plain TCP), not {target!r}"
    )


def _rst(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST (SO_LINGER on, timeout 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    with contextlib.suppress(OSError):
        sock.close()


# -- connection state (touched by the I/O thread only) ------------------------------


class _Chunk:
    """Bytes read from one side at monotonic time ``t``; empty ``data`` is an EOF."""

    __slots__ = ("data", "held", "t")

    def __init__(self, data: bytes, t: float) -> None:
        self.data = data
        self.t = t
        self.held = False


class _Flow:
    """One direction of a connection: the chunks read and not yet delivered."""

    __slots__ = ("chunks", "eof_in", "eof_out", "size", "up", "want_write")

    def __init__(self, up: bool) -> None:
        self.up = up
        self.chunks: collections.deque[_Chunk] = collections.deque()
        self.size = 0  # bytes in chunks
        self.eof_in = False  # the source half-closed (its EOF is queued as a chunk)
        self.eof_out = False  # that EOF was passed on (shutdown SHUT_WR)
        self.want_write = False  # the last send would have blocked


class _Pair:
    """A client connection and its connection to the target (None until made)."""

    __slots__ = ("client", "client_mask", "closed", "down", "server", "server_mask", "up")

    def __init__(self, client: socket.socket) -> None:
        self.client = client
        self.server: socket.socket | None = None
        self.up = _Flow(True)
        self.down = _Flow(False)
        self.client_mask = 0  # selector events registered; 0 = not registered
        self.server_mask = 0
        self.closed = False


class _Command:
    __slots__ = ("done", "error", "fn", "result")

    def __init__(self, fn: Callable[[], object]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.result: object = None
        self.error: BaseException | None = None


# -- the proxy ----------------------------------------------------------------------


@final
class FaultProxy:
    """A TCP proxy on ``127.0.0.1`` that injects network faults; see the module doc.

    ``target`` is where connections go: a Unix socket path (``str`` or path-like),
    a ``(host, port)`` tuple on loopback, or a ``unix:///path[?db=N]`` or
    ``redis://127.0.0.1:port/N`` URL (whose database number :attr:`url` keeps).
    Only loopback targets are accepted, and the proxy only ever listens on
    loopback. Nothing connects to the target before a client connects; a target
    that cannot be reached then makes the proxy reset that client (counted in
    :attr:`failed_connects`), never stops the proxy.

    :meth:`start` (or entering the ``with`` block) starts listening; :meth:`close`
    (or leaving it) stops. Fault and observation methods may be called from any
    thread; a fault method returns once it is in force. ``name`` names the I/O
    thread (``"<name>-io"``) and appears in messages.

    Raises:
        ValueError: a malformed target, or a host that is not loopback.
        TypeError: a target of the wrong type.
    """

    __slots__ = (
        "_accepted",
        "_blackhole",
        "_buffered_down",
        "_buffered_up",
        "_bytes_down",
        "_bytes_up",
        "_closed",
        "_commands",
        "_cond",
        "_crash",
        "_ctl",
        "_db",
        "_drop_armed",
        "_failed",
        "_hold_armed",
        "_holding",
        "_latency_down",
        "_latency_up",
        "_listener",
        "_name",
        "_pairs",
        "_port",
        "_refused",
        "_refusing",
        "_selector",
        "_stall_down",
        "_stall_up",
        "_stopping",
        "_target",
        "_thread",
        "_wake_r",
        "_wake_w",
    )

    def __init__(
        self, target: str | os.PathLike[str] | tuple[str, int], *, name: str = "proxy"
    ) -> None:
        self._target, self._db = _parse_target(target)
        self._name = str(name)
        self._ctl = threading.Lock()  # serialises start/close/control calls
        self._cond = threading.Condition()  # signals accepts
        self._commands: collections.deque[_Command] = collections.deque()
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._stopping = False
        self._closed = False
        self._crash: BaseException | None = None
        self._pairs: set[_Pair] = set()
        # faults
        self._latency_up = 0.0
        self._latency_down = 0.0
        self._stall_up = False
        self._stall_down = False
        self._blackhole = False
        self._refusing = False
        self._hold_armed = False
        self._drop_armed = False
        # counters (written by the I/O thread only)
        self._accepted = 0
        self._refused = 0
        self._failed = 0
        self._bytes_up = 0
        self._bytes_down = 0
        self._buffered_up = 0
        self._buffered_down = 0
        self._holding = 0

    # -- description --------------------------------------------------------------

    @property
    def name(self) -> str:
        """The name given at construction (the I/O thread is ``"<name>-io"``)."""
        return self._name

    @property
    def target(self) -> str | tuple[str, int]:
        """The Unix socket path or ``(host, port)`` connections are forwarded to."""
        return self._target

    @property
    def port(self) -> int:
        """The loopback TCP port the proxy listens on (still known after close).

        Raises:
            RuntimeError: the proxy was never started.
        """
        if self._port is None:
            raise RuntimeError(f"{self!r} is not started: it has no port yet")
        return self._port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/<db>``: connect here instead of to the target.

        ``db`` is the target URL's database number (0 for other targets).

        Raises:
            RuntimeError: the proxy was never started.
        """
        return f"redis://{_LISTEN_HOST}:{self.port}/{self._db}"

    def __repr__(self) -> str:
        state = "closed" if self._closed else "listening" if self._thread else "new"
        where = f" port={self._port}" if self._port is not None else ""
        return f"<FaultProxy {self._name!r} {state}{where} -> {self._target!r}>"

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on a free port on ``127.0.0.1`` and start the I/O thread; return self.

        Raises:
            RuntimeError: already started, or closed (a proxy starts once).
            OSError: the listening socket could not be made.
        """
        with self._ctl:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed; make a new FaultProxy")
            if self._thread is not None:
                raise RuntimeError(f"{self!r} is already started")
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            made: list[socket.socket] = [listener]
            try:
                listener.bind((_LISTEN_HOST, 0))
                listener.listen(128)
                listener.setblocking(False)
                wake_r, wake_w = socket.socketpair()
                made += [wake_r, wake_w]
                wake_r.setblocking(False)
                wake_w.setblocking(False)
                selector = selectors.DefaultSelector()
                selector.register(listener, selectors.EVENT_READ, _LISTEN)
                selector.register(wake_r, selectors.EVENT_READ, _WAKE)
            except BaseException:
                for sock in made:
                    sock.close()
                raise
            self._listener, self._wake_r, self._wake_w = listener, wake_r, wake_w
            self._selector = selector
            self._port = int(listener.getsockname()[1])
            thread = threading.Thread(target=self._run, name=f"{self._name}-io", daemon=True)
            self._thread = thread
            thread.start()
        return self

    def close(self) -> None:
        """Stop listening, close every connection and join the I/O thread.

        Idempotent; the join is bounded (a few seconds). Connections are closed
        normally (FIN), not reset: use :meth:`reset` first for that.
        """
        with self._ctl:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._wake()
            thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> FaultProxy:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- faults -------------------------------------------------------------------

    def latency(self, seconds: float, direction: str = "both") -> None:
        """Deliver every chunk in ``direction`` ``seconds`` after it was read.

        Order is kept. Applies at once, also to chunks already waiting; ``0``
        removes it for that direction.

        Raises:
            ValueError: ``seconds`` is negative, NaN or infinite, or ``direction``
                is not ``"up"``, ``"down"`` or ``"both"``.
        """
        value = _seconds(seconds)
        up, down = _directions(direction)

        def apply() -> None:
            if up:
                self._latency_up = value
            if down:
                self._latency_down = value

        self._control(apply)

    def stall(self, direction: str) -> None:
        """Keep, without delivering, every byte in ``direction`` until :meth:`heal`.

        ``"up"`` is client->server, ``"down"`` server->client, ``"both"`` both.
        No error reaches either side; end-of-stream is kept back too. Stalls add
        up (``stall("up")`` then ``stall("down")`` stalls both).

        Raises:
            ValueError: ``direction`` is not ``"up"``, ``"down"`` or ``"both"``.
        """
        up, down = _directions(direction)

        def apply() -> None:
            self._stall_up = self._stall_up or up
            self._stall_down = self._stall_down or down

        self._control(apply)

    def blackhole(self) -> None:
        """Partition the network until :meth:`heal`.

        Like ``stall("both")``, and new connections are accepted but not
        connected to the target (the server never sees them) until :meth:`heal`.
        Nothing is reset or closed, in either direction.
        """

        def apply() -> None:
            self._blackhole = True

        self._control(apply)

    def reset(self) -> int:
        """Abort every current connection; return how many there were.

        The client side gets a TCP RST (``SO_LINGER`` 0), the server side is
        closed; bytes not yet delivered are lost. New connections work as normal.
        """
        return self._control(self._reset_all)

    def refuse(self) -> None:
        """Reset new connections at once (accept, then RST) until :meth:`heal`.

        Current connections are reset too. The port stays the same.
        """

        def apply() -> None:
            self._refusing = True
            self._reset_all()

        self._control(apply)

    def hold_next_reply(self) -> None:
        """Keep back the next chunk the server sends, on any connection.

        It is delivered by :meth:`release_held` or :meth:`heal`; later chunks on
        that connection queue behind it. One chunk is one ``recv`` by the proxy:
        a reply the server writes at once (as it does for one command) is one.
        :attr:`holding` says when a chunk has been caught.
        """

        def apply() -> None:
            self._hold_armed = True

        self._control(apply)

    def release_held(self) -> None:
        """Deliver what :meth:`hold_next_reply` kept back, or cancel a hold not yet used."""
        self._control(self._release)

    def drop_next_reply(self) -> None:
        """Discard the next chunk the server sends, then reset that connection.

        "The reply never came": the command ran on the server, its client gets a
        connection error (RST). Applies once; other connections are untouched.
        """

        def apply() -> None:
            self._drop_armed = True

        self._control(apply)

    def heal(self) -> None:
        """End every fault: pass-through again.

        Stalled, held and delayed bytes are delivered in order; connections
        accepted during :meth:`blackhole` are connected to the target now; an
        unused :meth:`hold_next_reply` or :meth:`drop_next_reply` is cancelled.
        """

        def apply() -> None:
            self._latency_up = self._latency_down = 0.0
            self._stall_up = self._stall_down = False
            self._blackhole = False
            self._refusing = False
            self._drop_armed = False
            self._release()
            for pair in list(self._pairs):
                if pair.server is None and not pair.closed:
                    self._connect(pair)

        self._control(apply)

    # -- observation --------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections open now (a client and its server side count as one)."""
        return len(self._pairs)

    @property
    def accepted(self) -> int:
        """Connections accepted so far, including those refused or failed at once."""
        return self._accepted

    @property
    def refused(self) -> int:
        """Connections reset at once because :meth:`refuse` was in force."""
        return self._refused

    @property
    def failed_connects(self) -> int:
        """Connections reset at once because the target could not be reached."""
        return self._failed

    @property
    def bytes_up(self) -> int:
        """Bytes delivered client->server so far."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered server->client so far."""
        return self._bytes_down

    @property
    def holding(self) -> bool:
        """True while a chunk caught by :meth:`hold_next_reply` is kept back."""
        return self._holding > 0

    def buffered(self, direction: str = "both") -> int:
        """Bytes read from one side and not yet delivered to the other, now.

        Raises:
            ValueError: ``direction`` is not ``"up"``, ``"down"`` or ``"both"``.
        """
        up, down = _directions(direction)
        return (self._buffered_up if up else 0) + (self._buffered_down if down else 0)

    def wait_for_connections(self, n: int, timeout: float = 5.0) -> None:
        """Wait until :attr:`accepted` is at least ``n``, at most ``timeout`` seconds.

        Raises:
            TimeoutError: fewer were accepted in time.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._accepted >= n, timeout):
                raise TimeoutError(
                    f"{self._name}: {self._accepted} connection(s) accepted, "
                    f"not {n}, within {timeout:g} s"
                )

    # -- control plumbing -----------------------------------------------------------

    def _control(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the I/O thread (inline when there is none) and return its result."""
        with self._ctl:
            thread = self._thread
            if thread is None or not thread.is_alive():
                if self._crash is not None:
                    raise RuntimeError(f"{self._name}: the I/O thread failed") from self._crash
                return fn()  # no I/O thread, no connections: nothing to race with
            command = _Command(fn)
            self._commands.append(command)
            self._wake()
            if not command.done.wait(_CALL_TIMEOUT):
                raise RuntimeError(
                    f"{self._name}: the I/O thread did not answer within {_CALL_TIMEOUT:g} s"
                )
            if command.error is not None:
                raise command.error
            return cast(_T, command.result)

    def _wake(self) -> None:
        wake_w = self._wake_w
        if wake_w is not None:
            # full buffer: a wake-up is pending anyway; closed: the loop has ended
            with contextlib.suppress(OSError):
                wake_w.send(b"x")

    def _run_commands(self) -> None:
        while self._commands:
            command = self._commands.popleft()
            try:
                command.result = command.fn()
            except Exception as exc:
                command.error = exc
            command.done.set()

    # -- the I/O thread -----------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None
        try:
            while not self._stopping:
                timeout = self._pump_all(time.monotonic())
                for key, mask in selector.select(timeout):
                    data = key.data
                    if data == _LISTEN:
                        self._accept()
                    elif data == _WAKE:
                        self._drain_wake()
                    else:
                        pair, is_client = data
                        if not pair.closed and mask & selectors.EVENT_READ:
                            self._read(pair, is_client)
                self._run_commands()
        except BaseException as exc:
            self._crash = exc
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pair in list(self._pairs):
            self._close_pair(pair, rst=False)
        selector = self._selector
        if selector is not None:
            selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        while self._commands:  # a control call that raced with the end
            command = self._commands.popleft()
            command.error = RuntimeError(f"{self._name}: the proxy is closed")
            command.done.set()

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while self._wake_r.recv(4096):
                pass

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. out of file descriptors: try again on the next event
            # Counted before anything is done to it: a client that saw its reset sees
            # itself counted.
            with self._cond:
                self._accepted += 1
                self._cond.notify_all()
            if self._refusing:
                self._refused += 1
                _rst(conn)
            else:
                conn.setblocking(False)
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pair = _Pair(conn)
                self._pairs.add(pair)
                if not self._blackhole:
                    self._connect(pair)
                if not pair.closed:
                    self._update(pair)

    def _connect(self, pair: _Pair) -> None:
        """Connect ``pair`` to the target (bounded); reset the client if that fails."""
        target = self._target
        if isinstance(target, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = target
        else:
            family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            address = target
        try:
            sock.settimeout(_CONNECT_TIMEOUT)
            sock.connect(address)
            sock.setblocking(False)
            if not isinstance(target, str):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            self._failed += 1
            self._close_pair(pair, rst=True)
            return
        pair.server = sock

    def _read(self, pair: _Pair, is_client: bool) -> None:
        sock = pair.client if is_client else pair.server
        assert sock is not None
        flow = pair.up if is_client else pair.down
        try:
            data = sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close_pair(pair, rst=True)
            return
        chunk = _Chunk(data, time.monotonic())
        if not data:
            flow.eof_in = True
            flow.chunks.append(chunk)
            return
        if not is_client:
            if self._drop_armed:
                self._drop_armed = False
                self._close_pair(pair, rst=True)
                return
            if self._hold_armed:
                self._hold_armed = False
                chunk.held = True
                self._holding += 1
        flow.chunks.append(chunk)
        flow.size += len(data)
        if flow.up:
            self._buffered_up += len(data)
        else:
            self._buffered_down += len(data)

    def _pump_all(self, now: float) -> float | None:
        """Deliver what is due on every connection; the seconds until the next is."""
        next_due: float | None = None
        for pair in list(self._pairs):
            for flow in (pair.up, pair.down):
                if pair.closed:
                    break
                due = self._pump(pair, flow, now)
                if due is not None and (next_due is None or due < next_due):
                    next_due = due
            if pair.closed:
                continue
            if pair.up.eof_out and pair.down.eof_out:
                self._close_pair(pair, rst=False)
            else:
                self._update(pair)
        return None if next_due is None else max(0.0, next_due - now)

    def _pump(self, pair: _Pair, flow: _Flow, now: float) -> float | None:
        """Send ``flow``'s due chunks; return when the next one is due, if it waits."""
        flow.want_write = False
        if flow.up:
            dst, gated, latency = pair.server, self._stall_up, self._latency_up
        else:
            dst, gated, latency = pair.client, self._stall_down, self._latency_down
        if dst is None or gated or self._blackhole:
            return None
        while flow.chunks:
            head = flow.chunks[0]
            if head.held:
                return None
            due = head.t + latency
            if due > now:
                return due
            if not head.data:
                flow.chunks.popleft()
                flow.eof_out = True
                with contextlib.suppress(OSError):  # the peer is gone: its side ends it
                    dst.shutdown(socket.SHUT_WR)
                continue
            try:
                sent = dst.send(head.data)
            except (BlockingIOError, InterruptedError):
                flow.want_write = True
                return None
            except OSError:
                self._close_pair(pair, rst=True)
                return None
            flow.size -= sent
            if flow.up:
                self._bytes_up += sent
                self._buffered_up -= sent
            else:
                self._bytes_down += sent
                self._buffered_down -= sent
            if sent < len(head.data):
                head.data = head.data[sent:]
                flow.want_write = True
                return None
            flow.chunks.popleft()
        return None

    def _update(self, pair: _Pair) -> None:
        """Register the events ``pair``'s sockets should wait for now."""
        selector = self._selector
        assert selector is not None
        read, write = selectors.EVENT_READ, selectors.EVENT_WRITE
        up, down = pair.up, pair.down
        mask = (read if not up.eof_in and up.size < _MAX_BUFFERED else 0) | (
            write if down.want_write else 0
        )
        pair.client_mask = self._register(selector, pair.client, pair.client_mask, mask, pair, True)
        if pair.server is not None:
            mask = (read if not down.eof_in and down.size < _MAX_BUFFERED else 0) | (
                write if up.want_write else 0
            )
            pair.server_mask = self._register(
                selector, pair.server, pair.server_mask, mask, pair, False
            )

    @staticmethod
    def _register(
        selector: selectors.BaseSelector,
        sock: socket.socket,
        old: int,
        new: int,
        pair: _Pair,
        is_client: bool,
    ) -> int:
        if new != old:
            if old == 0:
                selector.register(sock, new, (pair, is_client))
            elif new == 0:
                selector.unregister(sock)
            else:
                selector.modify(sock, new, (pair, is_client))
        return new

    def _close_pair(self, pair: _Pair, *, rst: bool) -> None:
        """Close both sides of ``pair``: the client with an RST if ``rst``, else a FIN."""
        if pair.closed:
            return
        pair.closed = True
        self._pairs.discard(pair)
        selector = self._selector
        for sock, mask in ((pair.client, pair.client_mask), (pair.server, pair.server_mask)):
            if sock is not None and mask and selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    selector.unregister(sock)
        pair.client_mask = pair.server_mask = 0
        if rst:
            _rst(pair.client)
        else:
            pair.client.close()
        if pair.server is not None:
            pair.server.close()
        self._buffered_up -= pair.up.size
        self._buffered_down -= pair.down.size
        self._holding -= sum(1 for chunk in pair.down.chunks if chunk.held)

    def _reset_all(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair, rst=True)
        return len(pairs)

    def _release(self) -> None:
        self._hold_armed = False
        for pair in self._pairs:
            for chunk in pair.down.chunks:
                chunk.held = False
        self._holding = 0
