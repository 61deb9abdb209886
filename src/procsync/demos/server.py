"""The ticket server (socket tcp server 多进程): the notes' TCP server, made real.

The notes start one process per accepted connection so that a socket server can
talk to several clients at once. Here that server sells tickets:

* **A real server** listens on 127.0.0.1 (a port the OS picks) and speaks a line
  protocol: it greets each connection with ``HELLO <worker> <pid>``, and answers
  ``BUY <request id>`` with ``OK <ticket> <token> <worker> <pid>`` or ``SOLDOUT``.
* **Worker processes.** A *master* process binds the socket and forks the workers,
  which never touch each other's memory. Two models: **pre-fork** (default; W
  workers share the listening socket and each serves many connections with a
  selector, as nginx or gunicorn do) and **per-connection** (``per_connection``:
  the notes' model, one forked process per accepted connection, living as long as
  its client). Either way every worker is a **registered session** of the liveness
  registry, named ``ticket-server:<run>/worker-N`` or ``.../conn-N``.
* **The shared inventory** is a SQLite database. A sale is one transaction under
  one ``procsync.Lock``, written with the lock's fencing token; the database refuses
  a token older than the last it accepted. A request id makes a sale idempotent:
  asking again for an id already sold returns the same ticket, so a client may
  always retry.
* **A load generator** (its own process, asyncio) opens many concurrent client
  connections; each buys ticket after ticket until it hears ``SOLDOUT``. A request
  whose connection breaks (or that gets no answer in time) is sent again, with the
  same id, on a new connection.
* **Chaos** (``kills``): while tickets sell, the coordinator finds the worker that
  *holds the lock* (``Lock.owner()``), stops it, makes sure it still holds it, and
  SIGKILLs it — only ever a child of the master this run started, signalled through
  a pidfd. The registry records the death; the lock is free again in milliseconds
  (a waiter on this host sees the pid gone); the client of the interrupted request
  retries; the pre-fork master forks a replacement.

The checker (:func:`check`) reads the database, the clients' acknowledgements and
the registry's events: sold + remaining == initial and nothing left unsold; no
ticket sold twice; tokens strictly increasing in sale order; every sale
acknowledged to exactly the client that asked, with the same ticket and token;
every killed worker recorded ``died`` in the registry, and no other worker of the
run; the clients of interrupted requests retried. It reports throughput and the
latency of every request (retries included) as the clients saw it.

Bounds: one deadline for the run; every loop in every process checks it (and its
parent); sockets listen on 127.0.0.1 only; the coordinator stops the master, which
stops its children, and kills whatever is left of what it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.process
import os
import random
import secrets
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast, final

from procsync.backend.client import resolve_url
from procsync.errors import ProcsyncError
from procsync.registry import LivenessEvent, position, watch
from procsync.session import Session
from procsync.sync import Lock

__all__ = [
    "Ack",
    "Kill",
    "RegistryWatcher",
    "Sale",
    "ServerOptions",
    "ServerResult",
    "ServerVerdict",
    "TicketDB",
    "check",
    "run",
]

log = logging.getLogger("procsync.demo")

APP_ID: Final = "procsync-ticket-server/1"
STALE_TOKEN: Final = "stale fencing token"
#: How long a SQLite statement waits for the write lock (a killed writer's is freed
#: by the kernel at once; this only covers slow disks).
DB_BUSY_TIMEOUT: Final = 30.0
#: How often idle loops look at their deadline, stop flag and parent.
TICK: Final = 0.05
#: How often the coordinator looks for the lock's holder while a strike is due.
STRIKE_TICK: Final = 0.002
#: A client sends a request again if it has no answer after this long.
REPLY_TIMEOUT: Final = 15.0
#: Longest single ``acquire()`` of a worker, so it re-checks its deadline.
ACQUIRE_SLICE: Final = 5.0
#: Longest single ``procsync.watch`` of a :class:`RegistryWatcher`.
WATCH_SLICE: Final = 0.5
#: How long the coordinator waits for the stopped workers to leave the registry.
LEAVE_GRACE: Final = 5.0

_SCHEMA: Final = f"""
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stock(id INTEGER PRIMARY KEY CHECK (id = 1), remaining INTEGER NOT NULL);
CREATE TABLE fence(id INTEGER PRIMARY KEY CHECK (id = 1), token INTEGER NOT NULL);
CREATE TABLE sales(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket INTEGER NOT NULL,
    request TEXT NOT NULL UNIQUE,
    worker TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TRIGGER fence_check BEFORE INSERT ON sales
WHEN NEW.token <= (SELECT token FROM fence WHERE id = 1)
BEGIN
    SELECT RAISE(ABORT, '{STALE_TOKEN}');
END;
CREATE TRIGGER fence_advance AFTER INSERT ON sales BEGIN
    UPDATE fence SET token = NEW.token WHERE id = 1;
END;
"""


# -- the inventory ---------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Sale:
    """One row of ``sales``."""

    seq: int
    ticket: int
    request: str
    worker: str
    pid: int
    token: int
    at: float
    """Unix time of the sale (the worker's clock)."""


@final
class TicketDB:
    """One connection to the server's inventory (one per process)."""

    __slots__ = ("_conn", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(self.path, timeout=DB_BUSY_TIMEOUT, isolation_level=None)
        self._conn.execute("PRAGMA synchronous=NORMAL")

    @classmethod
    def create(cls, path: str | os.PathLike[str], tickets: int, run_id: str) -> TicketDB:
        """A new inventory of ``tickets`` tickets at ``path`` (which must not exist)."""
        db = cls(path)
        c = db._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(_SCHEMA)
        c.execute("BEGIN IMMEDIATE")
        c.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [("app", APP_ID), ("initial", str(tickets)), ("run_id", run_id)],
        )
        c.execute("INSERT INTO stock(id, remaining) VALUES (1, ?)", (tickets,))
        c.execute("INSERT INTO fence(id, token) VALUES (1, 0)")
        c.execute("COMMIT")
        return db

    def close(self) -> None:
        self._conn.close()

    def _scalar(self, sql: str) -> int:
        row = self._conn.execute(sql).fetchone()
        return int(row[0]) if row is not None and row[0] is not None else 0

    def initial(self) -> int:
        return self._scalar("SELECT value FROM meta WHERE key = 'initial'")

    def remaining(self) -> int:
        return self._scalar("SELECT remaining FROM stock WHERE id = 1")

    def sold(self) -> int:
        return self._scalar("SELECT count(*) FROM sales")

    def sales(self) -> list[Sale]:
        rows = self._conn.execute(
            "SELECT seq, ticket, request, worker, pid, token, at FROM sales ORDER BY seq"
        ).fetchall()
        return [
            Sale(int(a), int(b), str(c), str(d), int(e), int(f), float(g))
            for a, b, c, d, e, f, g in rows
        ]

    def sell(self, request: str, worker: str, pid: int, token: int) -> tuple[str, int, int]:
        """Sell the next ticket for ``request`` in one transaction.

        Returns ``("ok", ticket, token)`` — for a request already sold, the ticket and
        token of that sale — or ``("soldout", 0, 0)``, or ``("stale", 0, fence)`` when
        the database refuses ``token`` as not newer than the last it accepted.
        """
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT ticket, token FROM sales WHERE request = ?", (request,))
            found = row.fetchone()
            if found is not None:
                c.execute("COMMIT")
                return ("ok", int(found[0]), int(found[1]))
            remaining = self._scalar("SELECT remaining FROM stock WHERE id = 1")
            if remaining <= 0:
                c.execute("COMMIT")
                return ("soldout", 0, 0)
            ticket = self.initial() - remaining + 1
            try:
                c.execute(
                    "INSERT INTO sales(ticket, request, worker, pid, token, at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (ticket, request, worker, pid, token, time.time()),
                )
            except sqlite3.IntegrityError as exc:
                if STALE_TOKEN not in str(exc):
                    raise
                c.execute("ROLLBACK")
                return ("stale", 0, self._scalar("SELECT token FROM fence WHERE id = 1"))
            c.execute("UPDATE stock SET remaining = remaining - 1 WHERE id = 1")
            c.execute("COMMIT")
            return ("ok", ticket, token)
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise


# -- the checker -------------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Ack:
    """A client's acknowledged purchase: what the server answered to ``request``."""

    request: str
    ticket: int
    token: int


@final
@dataclass(frozen=True, slots=True)
class Kill:
    """A worker the coordinator SIGKILLed while it held the lock."""

    pid: int
    session_id: str
    at: float
    """Unix time just before the SIGKILL."""


@final
@dataclass(frozen=True, slots=True)
class ServerVerdict:
    """What :func:`check` found. ``ok`` iff ``failures`` is empty."""

    initial: int
    sold: int
    remaining: int
    oversold: int
    sold_twice: int
    token_regressions: int
    acked: int
    ack_mismatches: int
    unacked_sales: int
    kills: int
    deaths_recorded: int
    false_deaths: int
    death_report_s: tuple[float, ...]
    """Per kill: SIGKILL to the ``died`` event (server time)."""
    lock_recovery_s: tuple[float, ...]
    """Per kill: SIGKILL to the next sale."""
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def check(
    *,
    initial: int,
    remaining: int,
    sales: Sequence[Sale],
    acks: Sequence[Ack],
    kills: Sequence[Kill],
    liveness: Sequence[LivenessEvent],
    retries: int,
    finished: bool = True,
) -> ServerVerdict:
    """Check a run (see the module docstring). ``liveness``: the registry's events of
    the run's sessions; ``finished``: every client heard ``SOLDOUT`` (so every ticket
    should be sold and every sale acknowledged)."""
    failures: list[str] = []
    sold = len(sales)
    oversold = max(0, sold - initial, -remaining)
    if sold + remaining != initial:
        failures.append(f"sold + remaining = {sold} + {remaining}, not {initial}")
    if oversold:
        failures.append(f"{oversold} ticket(s) oversold")
    per_ticket: dict[int, int] = {}
    for s in sales:
        per_ticket[s.ticket] = per_ticket.get(s.ticket, 0) + 1
        if not 1 <= s.ticket <= initial:
            failures.append(f"sale {s.seq}: ticket {s.ticket} is not in 1..{initial}")
    twice = sum(1 for n in per_ticket.values() if n > 1)
    if twice:
        failures.append(f"{twice} ticket(s) sold more than once")
    regressions = sum(1 for a, b in itertools.pairwise(sales) if b.token <= a.token)
    if regressions:
        failures.append(f"{regressions} sale(s) whose fencing token did not increase")
    if finished and remaining > 0:
        failures.append(f"every client heard SOLDOUT but {remaining} ticket(s) are left")
    by_request = {s.request: s for s in sales}
    mismatches = 0
    acked: set[str] = set()
    for a in acks:
        sale = by_request.get(a.request)
        if sale is None or (sale.ticket, sale.token) != (a.ticket, a.token):
            mismatches += 1
            if mismatches <= 5:
                told = f"ticket {a.ticket} (token {a.token})"
                truth = "no sale" if sale is None else f"ticket {sale.ticket} (token {sale.token})"
                failures.append(
                    f"request {a.request}: the client was told {told}, the db has {truth}"
                )
        acked.add(a.request)
    if mismatches > 5:
        failures.append(f"... {mismatches} acknowledgements disagree with the database in all")
    unacked = sum(1 for s in sales if s.request not in acked)
    if finished and unacked:
        failures.append(f"{unacked} sale(s) no client was told of")
    died = {e.session_id: e for e in liveness if e.type == "died"}
    killed_sids = {k.session_id for k in kills}
    recorded = 0
    report_s: list[float] = []
    recovery_s: list[float] = []
    sale_times = sorted(s.at for s in sales)
    for k in kills:
        e = died.get(k.session_id)
        if e is None:
            failures.append(f"worker pid {k.pid} was killed but the registry has no death for it")
        else:
            recorded += 1
            report_s.append(max(0.0, e.at - k.at))
        nxt = next((t for t in sale_times if t > k.at), None)
        if nxt is not None:
            recovery_s.append(nxt - k.at)
    false = [e for sid, e in died.items() if sid not in killed_sids]
    for e in false[:5]:
        failures.append(f"the registry reports {e.name} (pid {e.pid}) dead, but it was not killed")
    if kills and retries < 1:
        failures.append("a worker was killed mid-request but no client retried")
    return ServerVerdict(
        initial=initial,
        sold=sold,
        remaining=remaining,
        oversold=oversold,
        sold_twice=twice,
        token_regressions=regressions,
        acked=len(acked),
        ack_mismatches=mismatches,
        unacked_sales=unacked,
        kills=len(kills),
        deaths_recorded=recorded,
        false_deaths=len(false),
        death_report_s=tuple(report_s),
        lock_recovery_s=tuple(recovery_s),
        failures=tuple(failures),
    )


# -- the worker side (forked by the master) ---------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """What the master and its workers need (pickled to the master by ``spawn``)."""

    run_id: str
    url: str
    lock_name: str
    db: str
    per_connection: bool
    workers: int
    ttl: float | None
    deadline: float
    """Unix time after which everything gives up."""
    coordinator_pid: int
    log_level: int

    @property
    def session_prefix(self) -> str:
        return f"ticket-server:{self.run_id}/"


_stopping = False


def _on_sigterm(signum: int, frame: Any) -> None:
    global _stopping
    _stopping = True


def _worker_setup(cfg: ServerConfig, name: str) -> tuple[Session, Lock, TicketDB, float]:
    """Open the worker's registered session, its lock and database connection."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=cfg.log_level, format=f"%(levelname)s {name}: %(message)s")
    session = Session(cfg.session_prefix + name, ttl=cfg.ttl, url=cfg.url)
    lock = Lock(cfg.lock_name, url=cfg.url)
    db = TicketDB(cfg.db)
    return session, lock, db, time.monotonic() + (cfg.deadline - time.time())


def _answer(line: bytes, name: str, lock: Lock, db: TicketDB, deadline: float) -> bytes:
    """The reply to one request line."""
    parts = line.decode("ascii", "replace").split()
    if len(parts) != 2 or parts[0] != "BUY":
        return b"ERR expected: BUY <request id>\n"
    request = parts[1]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"ERR the server is shutting down\n"
        if lock.acquire(timeout=min(ACQUIRE_SLICE, left)):
            break
    try:
        token = lock.token
        if token is None:  # cannot happen after a grant; never sell unfenced
            return b"ERR no fencing token\n"
        what, ticket, tok = db.sell(request, name, os.getpid(), token)
    finally:
        with contextlib.suppress(ProcsyncError):
            lock.release()
    if what == "ok":
        return f"OK {ticket} {tok} {name} {os.getpid()}\n".encode()
    if what == "soldout":
        return b"SOLDOUT\n"
    return f"ERR stale fencing token (fence at {tok})\n".encode()


def _greeting(name: str) -> bytes:
    return f"HELLO {name} {os.getpid()}\n".encode()


def _prefork_worker(cfg: ServerConfig, listener: socket.socket, slot: int, gen: int) -> None:
    """A pre-fork worker: accept on the shared socket, serve many connections."""
    name = f"worker-{slot}" + (f".{gen}" if gen > 1 else "")
    session, lock, db, deadline = _worker_setup(cfg, name)
    master = os.getppid()
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytearray] = {}
    try:
        while not _stopping and time.monotonic() < deadline and os.getppid() == master:
            for key, _ in sel.select(timeout=TICK):
                if key.fileobj is listener:
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue  # another worker took it
                    conn.setblocking(True)
                    conn.settimeout(REPLY_TIMEOUT)
                    with contextlib.suppress(OSError):
                        conn.sendall(_greeting(name))
                        buffers[conn] = bytearray()
                        sel.register(conn, selectors.EVENT_READ)
                    continue
                sock = cast(socket.socket, key.fileobj)
                if not _serve_ready(sock, buffers[sock], name, lock, db, deadline):
                    sel.unregister(sock)
                    del buffers[sock]
                    sock.close()
    finally:
        for sock in buffers:
            sock.close()
        sel.close()
        db.close()
        session.close()


def _serve_ready(
    sock: socket.socket, buf: bytearray, name: str, lock: Lock, db: TicketDB, deadline: float
) -> bool:
    """Read what a readable connection sent and answer every complete line; False
    when the connection is done (closed by the client, or broken)."""
    try:
        data = sock.recv(4096)
    except OSError:
        return False
    if not data:
        return False
    buf += data
    while (nl := buf.find(b"\n")) >= 0:
        line = bytes(buf[:nl])
        del buf[: nl + 1]
        reply = _answer(line, name, lock, db, deadline)
        try:
            sock.sendall(reply)
        except OSError:
            return False
    return True


def _connection_worker(cfg: ServerConfig, conn: socket.socket, number: int) -> None:
    """The notes' ``talk(conn)``: one process for one client, as long as it stays."""
    name = f"conn-{number}"
    session, lock, db, deadline = _worker_setup(cfg, name)
    master = os.getppid()
    buf = bytearray()
    try:
        conn.setblocking(True)
        conn.settimeout(REPLY_TIMEOUT)
        conn.sendall(_greeting(name))
        while not _stopping and time.monotonic() < deadline and os.getppid() == master:
            ready = selectors.DefaultSelector()
            with ready:
                ready.register(conn, selectors.EVENT_READ)
                if not ready.select(timeout=TICK):
                    continue
            if not _serve_ready(conn, buf, name, lock, db, deadline):
                break
    except OSError:
        pass
    finally:
        conn.close()
        db.close()
        session.close()


# -- the master (spawned by the coordinator; forks the workers) -------------------------


def master(cfg: ServerConfig, pipe: multiprocessing.connection.Connection) -> None:
    """Bind 127.0.0.1 on a port the OS picks, tell the coordinator, fork the workers.

    It never opens a procsync session (so it forks without procsync's threads). It
    listens for ``stop`` on ``pipe``; then it SIGTERMs its children (they finish the
    request at hand and leave the registry cleanly) and exits. Pre-fork: a worker
    that dies is replaced. Reports ``("fork", pid, name)`` for every child.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = multiprocessing.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listener.setblocking(False)  # shared by the workers: accept() must never block
    pipe.send(("port", listener.getsockname()[1]))
    deadline = time.monotonic() + (cfg.deadline - time.time())
    children: dict[int, tuple[multiprocessing.process.BaseProcess, int, int]] = {}
    numbers = itertools.count(1)

    def fork(target: Callable[..., None], args: tuple[Any, ...], slot: int, gen: int) -> None:
        p = ctx.Process(target=target, args=args)
        p.start()
        pid = p.pid or 0
        children[pid] = (p, slot, gen)
        pipe.send(("fork", pid, slot, gen))

    if not cfg.per_connection:
        for slot in range(1, cfg.workers + 1):
            fork(_prefork_worker, (cfg, listener, slot, 1), slot, 1)
    try:
        while time.monotonic() < deadline and os.getppid() == cfg.coordinator_pid:
            if pipe.poll(0 if cfg.per_connection else TICK) and pipe.recv() == "stop":
                break
            for pid, (p, slot, gen) in list(children.items()):
                if p.exitcode is not None:
                    p.join()
                    del children[pid]
                    pipe.send(("exit", pid, p.exitcode))
                    if not cfg.per_connection:
                        fork(_prefork_worker, (cfg, listener, slot, gen + 1), slot, gen + 1)
            if cfg.per_connection:
                ready, _, _ = select.select([listener], [], [], TICK)
                if ready:
                    try:
                        conn, _addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    n = next(numbers)
                    fork(_connection_worker, (cfg, conn, n), n, 1)
                    conn.close()  # the child has its own copy of the connection
    finally:
        listener.close()
        for p, _, _ in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid or 0, signal.SIGTERM)
        end = time.monotonic() + 5.0
        for p, _, _ in children.values():
            p.join(max(0.0, end - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(1.0)
            with contextlib.suppress(OSError):
                pipe.send(("exit", p.pid, p.exitcode))


# -- the load generator (its own process) ---------------------------------------------------


@dataclass(frozen=True)
class LoadConfig:
    port: int
    clients: int
    run_id: str
    deadline: float


async def _client(i: int, cfg: LoadConfig, out: dict[str, Any]) -> None:
    """Buy until SOLDOUT; send a request again (same id) when its connection breaks."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    seq = 0

    async def close() -> None:
        nonlocal reader, writer
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
        reader = writer = None

    try:
        while time.time() < cfg.deadline:
            request = f"{cfg.run_id}-c{i}-{seq}"
            started = time.monotonic()
            reply = ""
            attempt = 0
            while time.time() < cfg.deadline:
                attempt += 1
                if attempt > 1:
                    out["retries"] += 1
                    await asyncio.sleep(min(0.2, 0.01 * attempt))
                try:
                    if writer is None:
                        r, w = await asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", cfg.port), REPLY_TIMEOUT
                        )
                        reader, writer = r, w
                        out["connections"] += 1
                        hello = await asyncio.wait_for(r.readline(), REPLY_TIMEOUT)
                        if not hello.startswith(b"HELLO "):
                            raise ConnectionError("no greeting")
                    if reader is None or writer is None:  # pragma: no cover - set above
                        raise ConnectionError("not connected")
                    writer.write(f"BUY {request}\n".encode())
                    await writer.drain()
                    line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
                    if not line.endswith(b"\n"):
                        raise ConnectionError("connection closed mid-request")
                    reply = line.decode().strip()
                    if reply.startswith("ERR"):
                        out["errors"].append(reply)
                        raise ConnectionError(reply)
                    break
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                    out["broken"] += 1
                    await close()
            if not reply:
                return
            out["latencies"].append(time.monotonic() - started)
            if reply == "SOLDOUT":
                out["soldout"] += 1
                return
            _ok, ticket, token, *_ = reply.split()
            out["acks"].append((request, int(ticket), int(token)))
            seq += 1
    finally:
        await close()


async def _load(cfg: LoadConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "acks": [],
        "latencies": [],
        "retries": 0,
        "broken": 0,
        "connections": 0,
        "soldout": 0,
        "errors": [],
    }
    t0 = time.monotonic()
    await asyncio.gather(*(_client(i, cfg, out) for i in range(cfg.clients)))
    out["duration_s"] = time.monotonic() - t0
    return out


def load_generator(cfg: LoadConfig, pipe: multiprocessing.connection.Connection) -> None:
    """Run ``cfg.clients`` concurrent clients; send the tally back on ``pipe``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe.send(asyncio.run(_load(cfg)))


# -- the coordinator -----------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class ServerOptions:
    """What to run."""

    tickets: int = 1000
    clients: int = 50
    """Concurrent client connections of the load generator."""
    workers: int = 4
    """Pre-fork workers (ignored with ``per_connection``)."""
    per_connection: bool = False
    kills: int = 1
    """Workers to SIGKILL while they hold the lock (spread over 20-70 % sold)."""
    ttl: float | None = None
    url: str | None = None
    seed: int | None = None
    timeout: float = 120.0

    def __post_init__(self) -> None:
        if self.tickets < 1 or self.clients < 1 or self.workers < 1 or self.kills < 0:
            raise ValueError("tickets, clients and workers must be >= 1, kills >= 0")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout!r}")


@final
@dataclass(frozen=True, slots=True)
class ServerEvent:
    """What ``on_event`` receives: something the coordinator saw."""

    at: float
    """Seconds since the run started (coordinator's clock)."""
    kind: str
    """listen, fork, exit, joined, left, died, kill, done."""
    message: str


@final
@dataclass(frozen=True, slots=True)
class ServerResult:
    """The run: the verdict and the figures."""

    verdict: ServerVerdict
    mode: str
    workers: int
    clients: int
    port: int
    processes: int
    """Worker processes the master forked (replacements included)."""
    sessions_joined: int
    sessions_left: int
    retries: int
    connections: int
    latencies_s: tuple[float, ...]
    duration_s: float
    """From the first request to the last answer (the load generator's clock)."""
    url: str
    problems: tuple[str, ...] = field(default=())
    timed_out: bool = False

    @property
    def failures(self) -> tuple[str, ...]:
        return self.problems + self.verdict.failures

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        v = self.verdict
        lat = sorted(self.latencies_s)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, math.ceil(p / 100 * len(lat)) - 1)] * 1000, 3)

        def ms(xs: tuple[float, ...]) -> list[float]:
            return [round(x * 1000, 3) for x in xs]

        return {
            "ok": self.ok,
            "mode": self.mode,
            "workers": self.workers,
            "clients": self.clients,
            "port": self.port,
            "tickets": v.initial,
            "sold": v.sold,
            "remaining": v.remaining,
            "oversold": v.oversold,
            "sold_twice": v.sold_twice,
            "tokens_increasing": v.token_regressions == 0,
            "acked": v.acked,
            "ack_mismatches": v.ack_mismatches,
            "unacked_sales": v.unacked_sales,
            "kills": v.kills,
            "deaths_recorded": v.deaths_recorded,
            "false_deaths": v.false_deaths,
            "death_report_ms": ms(v.death_report_s),
            "lock_recovery_ms": ms(v.lock_recovery_s),
            "processes": self.processes,
            "sessions_joined": self.sessions_joined,
            "sessions_left": self.sessions_left,
            "connections": self.connections,
            "retries": self.retries,
            "requests": len(lat),
            "throughput_per_s": (
                round(v.sold / self.duration_s, 1) if self.duration_s > 0 else None
            ),
            "latency_ms": {
                "p50": pct(50),
                "p95": pct(95),
                "p99": pct(99),
                "max": round(lat[-1] * 1000, 3) if lat else None,
                "mean": round(statistics.fmean(lat) * 1000, 3) if lat else None,
            },
            "duration_s": round(self.duration_s, 4),
            "url": self.url,
            "timed_out": self.timed_out,
            "failures": list(self.failures),
        }


def _child_log_level() -> int:
    level = logging.getLogger().getEffectiveLevel()
    return level if level < logging.WARNING else logging.ERROR


def _parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class RegistryWatcher(threading.Thread):
    """A thread that collects the registry's events of the sessions whose name starts
    with ``prefix`` (``procsync.watch`` from ``after``), calling ``on_event`` for each.
    Set :attr:`stop` to end it (within :data:`WATCH_SLICE`)."""

    def __init__(
        self, url: str, prefix: str, after: str, on_event: Callable[[LivenessEvent], None]
    ) -> None:
        super().__init__(name="procsync-demo-watch", daemon=True)
        self.url, self.prefix, self.after = url, prefix, after
        self.on_event = on_event
        self.events: list[LivenessEvent] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                for ev in watch(self.after, timeout=WATCH_SLICE, url=self.url):
                    self.after = ev.id
                    if ev.name.startswith(self.prefix):
                        self.events.append(ev)
                        self.on_event(ev)
        except BaseException as exc:  # reported by the coordinator
            self.error = exc

    def count(self, kind: str) -> int:
        """How many events of ``kind`` were seen."""
        return sum(1 for e in list(self.events) if e.type == kind)


class _Run:
    """The coordinator's side of one run: what it started and what it saw."""

    def __init__(
        self,
        opts: ServerOptions,
        cfg: ServerConfig,
        db: TicketDB,
        on_event: Callable[[ServerEvent], None] | None,
        on_progress: Callable[[int, int], None] | None,
    ) -> None:
        self.opts, self.cfg, self.db = opts, cfg, db
        self.on_event, self.on_progress = on_event, on_progress
        self.t0 = time.monotonic()
        self.deadline = time.monotonic() + (cfg.deadline - time.time())
        self.ctx = multiprocessing.get_context("spawn")
        self.lock = Lock(cfg.lock_name, url=cfg.url)
        self.master: multiprocessing.process.BaseProcess | None = None
        self.pipe: multiprocessing.connection.Connection | None = None
        self.loadgen: multiprocessing.process.BaseProcess | None = None
        self.load_pipe: multiprocessing.connection.Connection | None = None
        self.port = 0
        self.children: dict[int, str] = {}
        self.forked = 0
        self.kills: list[Kill] = []
        self.problems: list[str] = []
        self.timed_out = False
        rng = random.Random(opts.seed)
        self.kill_at = sorted(
            max(1, round(opts.tickets * rng.uniform(0.2, 0.7))) for _ in range(opts.kills)
        )

    def emit(self, kind: str, message: str) -> None:
        log.info("%s", message)
        if self.on_event is not None:
            self.on_event(ServerEvent(round(time.monotonic() - self.t0, 3), kind, message))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def start_master(self) -> None:
        ours, theirs = self.ctx.Pipe()
        self.pipe = ours
        self.master = self.ctx.Process(target=master, args=(self.cfg, theirs), name="master")
        self.master.start()
        theirs.close()
        while not ours.poll(TICK):
            if self.master.exitcode is not None or self.left() <= 0:
                raise _Abort(f"the server did not start (status {self.master.exitcode})")
        _, self.port = ours.recv()
        mode = "per-connection" if self.cfg.per_connection else f"pre-fork x{self.cfg.workers}"
        self.emit(
            "listen",
            f"ticket server on 127.0.0.1:{self.port} ({mode}), master pid {self.master.pid}",
        )

    def pump(self) -> None:
        """Take in what the master reports."""
        assert self.pipe is not None
        while self.pipe.poll(0):
            try:
                msg = self.pipe.recv()
            except (EOFError, OSError):
                return
            if msg[0] == "fork":
                _, pid, slot, gen = msg
                self.forked += 1
                self.children[pid] = f"{'conn' if self.cfg.per_connection else 'worker'}-{slot}"
                if not self.cfg.per_connection:
                    what = "forked" if gen == 1 else "re-forked"
                    self.emit("fork", f"master {what} worker-{slot} as pid {pid}")
            elif msg[0] == "exit":
                self.children.pop(msg[1], None)

    def start_load(self) -> None:
        ours, theirs = self.ctx.Pipe(duplex=False)
        self.load_pipe = ours
        lc = LoadConfig(self.port, self.opts.clients, self.cfg.run_id, self.cfg.deadline)
        self.loadgen = self.ctx.Process(target=load_generator, args=(lc, theirs), name="clients")
        self.loadgen.start()
        theirs.close()
        self.emit("load", f"{self.opts.clients} clients connect to 127.0.0.1:{self.port}")

    def strike(self) -> None:
        """SIGKILL the worker that holds the lock right now, if it is ours."""
        owner = self.lock.owner()
        if owner is None or self.master is None:
            return
        pid = owner.pid
        if _parent_pid(pid) != self.master.pid:
            return  # not a child of our master (or gone): never signal it
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            if _parent_pid(pid) != self.master.pid:
                return
            signal.pidfd_send_signal(fd, signal.SIGSTOP)
            try:
                st = self.lock.statistics()
            except BaseException:
                signal.pidfd_send_signal(fd, signal.SIGCONT)
                raise
            if st.owner is None or st.owner.pid != pid:
                signal.pidfd_send_signal(fd, signal.SIGCONT)
                return
            at = time.time()
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
        self.kills.append(Kill(pid, st.owner.session_id, at))
        self.kill_at.pop(0)
        name = self.children.get(pid, f"pid {pid}")
        self.emit("kill", f"SIGKILL {name} (pid {pid}) holding the lock, token {st.last_token}")

    def sell(self, watcher: RegistryWatcher) -> dict[str, Any] | None:
        """Follow the sale until the clients are done; strike as planned."""
        assert self.load_pipe is not None and self.loadgen is not None
        last = -1
        while True:
            self.pump()
            if watcher.error is not None:
                raise watcher.error
            # While a strike is due, look often: a small sale is over in a blink.
            if self.load_pipe.poll(STRIKE_TICK if self.kill_at else TICK):
                tally: dict[str, Any] = self.load_pipe.recv()
                return tally
            if self.loadgen.exitcode is not None:
                self.problems.append(f"the load generator exited with {self.loadgen.exitcode}")
                return None
            if self.left() <= 0:
                self.timed_out = True
                self.problems.append(f"timed out after {self.opts.timeout:g} s")
                return None
            if self.master is not None and self.master.exitcode is not None:
                self.problems.append(f"the master exited with {self.master.exitcode}")
                return None
            sold = self.db.sold()
            if sold != last:
                last = sold
                if self.on_progress is not None:
                    self.on_progress(sold, self.opts.tickets)
            if self.kill_at and sold >= self.kill_at[0] and sold < self.opts.tickets:
                self.strike()

    def stop(self) -> None:
        """Stop the master (it stops its children); kill whatever we started is left."""
        if self.pipe is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self.pipe.send("stop")
        for p in (self.master, self.loadgen):
            if p is None or p.pid is None:
                continue
            p.join(8.0)
            if p.exitcode is None:
                p.kill()
                p.join(2.0)
        if self.pipe is not None:
            self.pump()


class _Abort(Exception):
    pass


def run(
    opts: ServerOptions,
    *,
    on_event: Callable[[ServerEvent], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ServerResult:
    """Run the ticket server under load and check it; never raises for a broken
    property (see :attr:`ServerResult.ok`). Must run in the main thread.

    Raises:
        ServerError: the procsync server cannot be reached.
    """
    run_id = secrets.token_hex(4)
    url = resolve_url(opts.url)
    tmpdir = tempfile.mkdtemp(prefix="procsync-server-")
    dbpath = Path(tmpdir) / "tickets.db"
    db = TicketDB.create(dbpath, opts.tickets, run_id)
    cfg = ServerConfig(
        run_id=run_id,
        url=url,
        lock_name=f"demo:server:{run_id}",
        db=str(dbpath),
        per_connection=opts.per_connection,
        workers=opts.workers,
        ttl=opts.ttl,
        deadline=time.time() + opts.timeout,
        coordinator_pid=os.getpid(),
        log_level=_child_log_level(),
    )
    r = _Run(opts, cfg, db, on_event, on_progress)

    def on_liveness(ev: LivenessEvent) -> None:
        short = ev.name.removeprefix(cfg.session_prefix)
        if ev.type == "died":
            r.emit("died", f"registry: {short} (pid {ev.pid}) died")
        elif ev.type == "joined" and not opts.per_connection:
            r.emit("joined", f"registry: {short} (pid {ev.pid}) joined")

    watcher = RegistryWatcher(url, cfg.session_prefix, position(url=url), on_liveness)
    watcher.start()
    tally: dict[str, Any] | None = None
    try:
        try:
            r.start_master()
            if not opts.per_connection:
                # Every worker registered before the clients come.
                while watcher.count("joined") < opts.workers:
                    r.pump()
                    if r.left() <= 0 or watcher.error is not None:
                        raise _Abort("the workers did not all register")
                    time.sleep(TICK)
            r.start_load()
            tally = r.sell(watcher)
        except _Abort as exc:
            r.problems.append(str(exc))
        finally:
            r.stop()
        # The stopped workers leave the registry cleanly; wait for them a little.
        end = time.monotonic() + LEAVE_GRACE
        while time.monotonic() < end and watcher.count("joined") > (
            watcher.count("left") + watcher.count("died")
        ):
            time.sleep(TICK)
        if on_progress is not None:
            on_progress(db.sold(), opts.tickets)
        tally = tally or {}
        acks = [Ack(a, b, c) for a, b, c in tally.get("acks", [])]
        verdict = check(
            initial=opts.tickets,
            remaining=db.remaining(),
            sales=db.sales(),
            acks=acks,
            kills=r.kills,
            liveness=list(watcher.events),
            retries=int(tally.get("retries", 0)),
            finished=tally.get("soldout", 0) == opts.clients,
        )
        errors = tally.get("errors", [])
        if errors:
            r.problems.append(f"{len(errors)} error answer(s), e.g. {errors[0]!r}")
        if len(r.kills) < opts.kills:
            r.problems.append(
                f"{len(r.kills)} of {opts.kills} planned kill(s): the sale ended first"
            )
        if tally and tally.get("soldout", 0) != opts.clients:
            r.problems.append(f"only {tally.get('soldout', 0)} of {opts.clients} clients finished")
        return ServerResult(
            verdict=verdict,
            mode="per-connection" if opts.per_connection else "pre-fork",
            workers=0 if opts.per_connection else opts.workers,
            clients=opts.clients,
            port=r.port,
            processes=r.forked,
            sessions_joined=watcher.count("joined"),
            sessions_left=watcher.count("left"),
            retries=int(tally.get("retries", 0)),
            connections=int(tally.get("connections", 0)),
            latencies_s=tuple(tally.get("latencies", ())),
            duration_s=float(tally.get("duration_s", 0.0)),
            url=r.lock.backend.safe_url,
            problems=tuple(r.problems),
            timed_out=r.timed_out,
        )
    finally:
        watcher.stop.set()
        watcher.join(5.0)
        db.close()
        shutil.rmtree(tmpdir, ignore_errors=True)
