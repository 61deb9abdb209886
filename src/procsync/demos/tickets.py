"""The ticket rush (抢票): the notes' Lock example, made safe against crashes and pauses.

The notes keep a ticket count in a JSON file and let ten processes buy under a
``multiprocessing.Lock``. Here N buyer processes (real OS processes, started with
``spawn``) race for M tickets kept in a real SQLite database, under one
``procsync.Lock``::

    with lock:                                    # Lock("tickets:<run id>")
        left = inventory.remaining(token=lock.token)          # search: read the stock
        time.sleep(work)                          # think about it
        inventory.sell(ticket, left - 1, token=lock.token)   # buy: write it back

Why the fencing token. A lock cannot, on its own, keep the tickets exact: a holder
frozen past its lease (SIGSTOP, swap, a long GC pause) wakes up still believing it
holds the lock, although the server has long given it to someone else, and writes
its stale view of the stock. So every read and every sale carries ``lock.token``
(strictly increasing per lock) and the *database* refuses a sale whose token is not
newer than the last sale it accepted, or older than the newest token it has seen
on a read: a trigger aborts the INSERT, the sale is not applied, and the refusal is
counted in the ``rejected`` table. The reads count because a stale write can also
land between the new holder's read and its write: fencing the writes alone would
accept both (their tokens do increase) and sell a ticket twice. Checking
``lock.lost`` before writing would only narrow the window (the pause can come right
after the check); the buyers here deliberately do not, so that the fence is seen
doing its job.

The database (WAL mode)::

    meta(key, value)              app, initial, run id, fenced, stage (staged runs)
    stock(remaining)              one row: tickets left
    fence(token, seen)            one row: the newest token of an accepted sale, and
                                  the newest token presented at all (read or sale)
    sales(seq, ticket, buyer, pid, token, granted_at, sold_at)
    rejected(seq, ticket, buyer, pid, token, fence_token, at)
    buyers(pid, buyer, generation, started_at)
    incidents(seq, kind, buyer, pid, token, at, detail)    kill / pause / resume / lost

A read is one transaction: advance ``fence.seen``, SELECT the stock. A sale is one
transaction: INSERT into ``sales`` (the trigger checks the token and advances
``fence``), then UPDATE ``stock``; a refused sale writes only ``rejected``.

The start line. The parent holds the lock while the buyers queue on it, and lets go
once the server counts every buyer waiting: FIFO hand-off then serves each buyer
within the first round, however slowly its process got going.

Chaos (``chaos=True``). The parent process picks moments (by tickets sold) to strike
the buyer that *holds the lock right now*: it asks the server for the owner
(``Lock.owner()``), SIGSTOPs that process, asks twice more to be sure it still holds
it (a stopped process cannot release, and a release it sent just before it stopped
has been served by the second answer), then either SIGKILLs it (a *crash*; it is
respawned) or leaves it stopped for longer than the ttl and then SIGCONTs it (a
*pause*). What a paused buyer does next depends on where the pause fell, which is
chance: before its write, it writes with a stale token and the database refuses
it; anywhere in its hold, its ``release()`` raises :class:`~procsync.LockLostError`,
which it logs and carries on from; before it had even heard of its grant, its next
acquire just starts over in a new session. ``scenario="stale-write"`` stages the
worst place. Crash recovery is measured from the SIGKILL to the next grant to
another buyer.

Staged (``scenario="stale-write"``). Random chaos shows what happens to whoever holds
the lock at a random moment, so whether a pause hits between the read and the write
is chance. The staged run makes that worst case happen once, every time: the holder
that first finds half the tickets (or fewer) left claims the stage in the database
and, right before it writes, tells the parent over a pipe (its token, what it read)
and waits there for its cue. The parent SIGSTOPs it, keeps it stopped until the
database shows a sale under a newer token (the lease ran out, the server gave the
lock to another buyer, and that buyer bought), then SIGCONTs it and gives the cue:
it writes the stock it read before the pause. Fenced, the database refuses that
write; unfenced, the ticket is sold twice and the stock goes wrong. Nothing here
waits for a time to pass: each step waits for the previous one to be seen.

The checker (:func:`check`) reads only the database and demands: sold + remaining ==
initial, nothing oversold, no ticket sold twice, every ticket number in range, and
the accepted tokens strictly increasing in sale order.

Bounds. Everything runs under one deadline (``timeout``); each buyer exits at the
deadline or when its parent is gone; the parent signals only the pids it started,
and kills them all if it is interrupted (Ctrl-C) or runs out of time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import os
import random
import secrets
import shutil
import signal
import sqlite3
import statistics
import tempfile
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, final

from procsync._config import env_ttl
from procsync._validate import check_ttl
from procsync.backend.client import resolve_url
from procsync.errors import LockLostError, ProcsyncError
from procsync.session import configure
from procsync.sync import Event, Lock

__all__ = [
    "CHAOS_TTL",
    "SCENARIOS",
    "Inventory",
    "RushEvent",
    "RushOptions",
    "RushResult",
    "Verdict",
    "buyer",
    "check",
    "run",
]

log = logging.getLogger("procsync.demo")

#: The lease the buyers use under ``--chaos`` unless told otherwise: short, so that a
#: paused holder loses the lock (and the run ends) quickly.
CHAOS_TTL: Final = 2.0
#: What ``meta.app`` holds in a ticket database (a file without it is never replaced).
APP_ID: Final = "procsync-tickets/1"
#: The message of the trigger that refuses a stale sale.
STALE_TOKEN: Final = "stale fencing token"
#: How long a SQLite statement waits for the database's write lock. A buyer frozen in
#: the middle of a transaction keeps it for the whole pause, so this must exceed it.
DB_BUSY_TIMEOUT: Final = 60.0
#: Longest single ``acquire()`` of a buyer, so it re-checks its deadline and parent.
ACQUIRE_SLICE: Final = 5.0
#: How often the parent looks at the database and its children.
TICK: Final = 0.02
#: A buyer's exit status when it gave up (deadline passed, or its parent is gone).
EXIT_GAVE_UP: Final = 3
#: The staged runs (``RushOptions.scenario``): "stale-write", a holder paused between
#: reading the stock and writing it, until another buyer has bought.
SCENARIOS: Final = ("stale-write",)
#: Longest single wait of a staged buyer for its cue, so it re-checks deadline and parent.
CUE_SLICE: Final = 0.5

_SCHEMA: Final = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE stock(id INTEGER PRIMARY KEY CHECK (id = 1), remaining INTEGER NOT NULL);
CREATE TABLE fence(
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token INTEGER NOT NULL,
    seen INTEGER NOT NULL
);
CREATE TABLE sales(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket INTEGER NOT NULL,
    buyer TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token INTEGER NOT NULL,
    granted_at REAL NOT NULL,
    sold_at REAL NOT NULL
);
CREATE TABLE rejected(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ticket INTEGER NOT NULL,
    buyer TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token INTEGER NOT NULL,
    fence_token INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE buyers(
    pid INTEGER PRIMARY KEY,
    buyer TEXT NOT NULL,
    generation INTEGER NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE incidents(
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    buyer TEXT NOT NULL,
    pid INTEGER NOT NULL,
    token INTEGER,
    at REAL NOT NULL,
    detail TEXT NOT NULL DEFAULT ''
);
-- Every accepted sale moves the fence forward (also in an unfenced database, so the
-- checker can see what was accepted).
CREATE TRIGGER fence_advance AFTER INSERT ON sales BEGIN
    UPDATE fence SET token = max(token, NEW.token), seen = max(seen, NEW.token) WHERE id = 1;
END;
"""

#: The database's guard: a sale whose token is not newer than the last accepted sale's,
#: or older than one a read presented since, is aborted.
_FENCE_TRIGGER: Final = f"""
CREATE TRIGGER fence_check BEFORE INSERT ON sales
WHEN NEW.token <= (SELECT token FROM fence WHERE id = 1)
  OR NEW.token < (SELECT seen FROM fence WHERE id = 1)
BEGIN
    SELECT RAISE(ABORT, '{STALE_TOKEN}');
END;
"""


# -- the inventory -------------------------------------------------------------------


@final
class Inventory:
    """One connection to a ticket database (one per process; not thread-safe).

    Statements run in autocommit mode; :meth:`sell` is one explicit ``BEGIN
    IMMEDIATE`` transaction, so it either happens whole or not at all, also when
    its process is killed half-way.
    """

    __slots__ = ("_conn", "path")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._conn = sqlite3.connect(
            self.path, timeout=DB_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA synchronous=NORMAL")

    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        tickets: int,
        *,
        run_id: str,
        fenced: bool = True,
        staged: bool = False,
    ) -> Inventory:
        """Create a ticket database with ``tickets`` tickets at ``path``.

        ``path`` must not exist, or must be a ticket database of an earlier run
        (which is replaced); any other file is refused with FileExistsError.
        ``fenced=False`` leaves out the token check, to show what goes wrong then.
        ``staged=True`` opens the stage one buyer may claim (:meth:`claim_stage`).
        """
        p = Path(path)
        if p.exists():
            if not _is_ticket_db(p):
                raise FileExistsError(f"{p} exists and is not a ticket database; not replacing it")
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    Path(f"{p}{suffix}").unlink()
        inv = cls(p)
        c = inv._conn
        c.execute("PRAGMA journal_mode=WAL")
        c.executescript(_SCHEMA + (_FENCE_TRIGGER if fenced else ""))
        c.execute("BEGIN IMMEDIATE")
        c.executemany(
            "INSERT INTO meta(key, value) VALUES (?, ?)",
            [
                ("app", APP_ID),
                ("initial", str(tickets)),
                ("run_id", run_id),
                ("fenced", "1" if fenced else "0"),
                ("created_at", repr(time.time())),
            ]
            + ([("stage", "open")] if staged else []),
        )
        c.execute("INSERT INTO stock(id, remaining) VALUES (1, ?)", (tickets,))
        c.execute("INSERT INTO fence(id, token, seen) VALUES (1, 0, 0)")
        c.execute("COMMIT")
        return inv

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def __enter__(self) -> Inventory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _scalar(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        row = self._conn.execute(sql, args).fetchone()
        return None if row is None else row[0]

    def initial(self) -> int:
        """How many tickets the run started with."""
        return int(self._scalar("SELECT value FROM meta WHERE key = 'initial'"))

    def remaining(self, token: int | None = None) -> int:
        """Tickets left, as the stock row says (the buyer's "search").

        With ``token`` (the reader's fencing token), one transaction that also
        records the token as seen: from then on a sale under an older token is
        refused, so a paused holder's late write cannot slip in between this read
        and the sale made from it.
        """
        if token is None:
            return int(self._scalar("SELECT remaining FROM stock WHERE id = 1"))
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            c.execute("UPDATE fence SET seen = max(seen, ?) WHERE id = 1", (token,))
            left = int(self._scalar("SELECT remaining FROM stock WHERE id = 1"))
            c.execute("COMMIT")
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise
        return left

    def sell(
        self,
        *,
        ticket: int,
        remaining_after: int,
        buyer: str,
        pid: int,
        token: int,
        granted_at: float,
    ) -> bool:
        """Sell ``ticket`` and set the stock to ``remaining_after``, in one transaction.

        True if the database accepted the sale. False if it refused it because
        ``token`` is not newer than the last accepted one, or older than one a read
        presented since: then nothing but a row in ``rejected`` is written (with
        the newest token the database had seen).
        """
        c = self._conn
        c.execute("BEGIN IMMEDIATE")
        try:
            try:
                c.execute(
                    "INSERT INTO sales(ticket, buyer, pid, token, granted_at, sold_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (ticket, buyer, pid, token, granted_at, time.time()),
                )
            except sqlite3.IntegrityError as exc:
                if STALE_TOKEN not in str(exc):
                    raise
                fence = int(self._scalar("SELECT max(token, seen) FROM fence WHERE id = 1"))
                c.execute(
                    "INSERT INTO rejected(ticket, buyer, pid, token, fence_token, at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (ticket, buyer, pid, token, fence, time.time()),
                )
                c.execute("COMMIT")
                return False
            c.execute("UPDATE stock SET remaining = ? WHERE id = 1", (remaining_after,))
            c.execute("COMMIT")
            return True
        except BaseException:
            if c.in_transaction:
                c.execute("ROLLBACK")
            raise

    def claim_stage(self, buyer: str) -> bool:
        """Claim the stage of a staged run: True for exactly one caller, ever."""
        cur = self._conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'stage' AND value = 'open'",
            (f"claimed by {buyer}",),
        )
        return cur.rowcount == 1

    def register_buyer(self, buyer: str, pid: int, generation: int) -> None:
        """Record that a buyer process is up and about to wait for the start."""
        self._conn.execute(
            "INSERT OR REPLACE INTO buyers(pid, buyer, generation, started_at) VALUES (?, ?, ?, ?)",
            (pid, buyer, generation, time.time()),
        )

    def record_incident(
        self, kind: str, buyer: str, pid: int, token: int | None, detail: str = "", at: float = 0.0
    ) -> int:
        """Append to the incident log (chaos actions, lost holds); returns its seq."""
        cur = self._conn.execute(
            "INSERT INTO incidents(kind, buyer, pid, token, at, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, buyer, pid, token, at or time.time(), detail),
        )
        return int(cur.lastrowid or 0)

    # -- what the parent watches -----------------------------------------------------

    def sold(self) -> int:
        """How many sales were accepted so far."""
        return int(self._scalar("SELECT count(*) FROM sales"))

    def sold_after(self, token: int) -> int:
        """How many accepted sales carry a token newer than ``token``."""
        return int(self._scalar("SELECT count(*) FROM sales WHERE token > ?", (token,)))

    def ready(self) -> int:
        """How many buyer processes have registered."""
        return int(self._scalar("SELECT count(*) FROM buyers"))

    def rejected_since(self, seq: int) -> list[tuple[int, int, str, int, int, int]]:
        """Refused sales after ``seq``: (seq, ticket, buyer, pid, token, fence_token)."""
        rows = self._conn.execute(
            "SELECT seq, ticket, buyer, pid, token, fence_token FROM rejected "
            "WHERE seq > ? ORDER BY seq",
            (seq,),
        ).fetchall()
        return [(int(a), int(b), str(c), int(d), int(e), int(f)) for a, b, c, d, e, f in rows]

    def incidents_since(self, seq: int, kind: str) -> list[tuple[int, str, int, str]]:
        """Incidents of ``kind`` after ``seq``: (seq, buyer, pid, detail)."""
        rows = self._conn.execute(
            "SELECT seq, buyer, pid, detail FROM incidents WHERE seq > ? AND kind = ? ORDER BY seq",
            (seq, kind),
        ).fetchall()
        return [(int(a), str(b), int(c), str(d)) for a, b, c, d in rows]

    def incident_times(self, kind: str) -> list[float]:
        """When each incident of ``kind`` happened (Unix time), in order."""
        rows = self._conn.execute(
            "SELECT at FROM incidents WHERE kind = ? ORDER BY seq", (kind,)
        ).fetchall()
        return [float(r[0]) for r in rows]

    def grant_times(self) -> list[float]:
        """When the lock was granted for each accepted sale (Unix time), sorted."""
        rows = self._conn.execute("SELECT granted_at FROM sales ORDER BY granted_at").fetchall()
        return [float(r[0]) for r in rows]

    def sales_per_buyer(self) -> dict[str, int]:
        """Accepted sales by buyer name (all generations of a respawned buyer together)."""
        rows = self._conn.execute("SELECT buyer, count(*) FROM sales GROUP BY buyer").fetchall()
        return {str(b): int(n) for b, n in rows}


def _is_ticket_db(path: Path) -> bool:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as c:
            row = c.execute("SELECT value FROM meta WHERE key = 'app'").fetchone()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == APP_ID


# -- the checker ---------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`check` found in a ticket database. ``ok`` iff ``failures`` is empty."""

    initial: int
    sold: int
    """Accepted sales (rows of ``sales``)."""
    remaining: int
    oversold: int
    """Sales beyond the tickets that existed: max(0, sold - initial, -remaining)."""
    sold_twice: int
    """Ticket numbers with more than one sale."""
    invalid_tickets: int
    """Sales of ticket numbers outside 1..initial."""
    token_regressions: int
    """Sales whose token is not greater than the previous sale's (in sale order)."""
    stale_rejected: int
    """Sales the database refused for a stale token."""
    lost_on_release: int
    """Holds the buyers found lost when they released (LockLostError)."""
    fenced: bool
    failures: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """True if every invariant holds."""
        return not self.failures


def check(path: str | os.PathLike[str]) -> Verdict:
    """Check a ticket database's invariants, reading nothing but the database.

    The invariants: sold + remaining == initial; nothing oversold; no ticket sold
    twice; every ticket number in 1..initial; accepted tokens strictly increase in
    sale order. Each broken one is a line of ``failures``.
    """
    uri = f"file:{Path(path)}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=DB_BUSY_TIMEOUT)) as c:

        def scalar(sql: str) -> int:
            row = c.execute(sql).fetchone()
            return int(row[0]) if row is not None and row[0] is not None else 0

        try:
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError:
            meta = {}
        if meta.get("app") != APP_ID:
            raise ValueError(f"{path} is not a ticket database")
        initial = int(meta["initial"])
        remaining = scalar("SELECT remaining FROM stock WHERE id = 1")
        sold = scalar("SELECT count(*) FROM sales")
        sold_twice = scalar(
            "SELECT count(*) FROM (SELECT ticket FROM sales GROUP BY ticket HAVING count(*) > 1)"
        )
        invalid = scalar(f"SELECT count(*) FROM sales WHERE ticket < 1 OR ticket > {initial}")
        tokens = [int(r[0]) for r in c.execute("SELECT token FROM sales ORDER BY seq")]
        stale = scalar("SELECT count(*) FROM rejected")
        lost = scalar("SELECT count(*) FROM incidents WHERE kind = 'lost'")
    regressions = sum(1 for a, b in itertools.pairwise(tokens) if b <= a)
    oversold = max(0, sold - initial, -remaining)
    failures = []
    if sold + remaining != initial:
        failures.append(f"sold + remaining = {sold} + {remaining}, not {initial}")
    if oversold:
        failures.append(f"{oversold} ticket(s) oversold")
    if sold_twice:
        failures.append(f"{sold_twice} ticket(s) sold more than once")
    if invalid:
        failures.append(f"{invalid} sale(s) of ticket numbers outside 1..{initial}")
    if regressions:
        failures.append(f"{regressions} accepted sale(s) whose token did not increase")
    return Verdict(
        initial=initial,
        sold=sold,
        remaining=remaining,
        oversold=oversold,
        sold_twice=sold_twice,
        invalid_tickets=invalid,
        token_regressions=regressions,
        stale_rejected=stale,
        lost_on_release=lost,
        fenced=meta.get("fenced") == "1",
        failures=tuple(failures),
    )


# -- a buyer (runs in its own process) -----------------------------------------------


@dataclass(frozen=True)
class BuyerConfig:
    """What a buyer process needs (pickled to it by ``spawn``)."""

    name: str
    generation: int
    db: str
    ttl: float | None
    work_s: float
    seed: int | None
    deadline: float
    """Unix time after which the buyer gives up."""
    parent_pid: int
    log_level: int
    staged: bool = False
    """A staged run: the holder that first finds half the tickets (or fewer) left
    claims the stage and waits for its cue (over ``cue``) right before it writes."""


def buyer(
    cfg: BuyerConfig,
    lock: Lock,
    go: Event,
    cue: multiprocessing.connection.Connection | None = None,
) -> None:
    """A buyer process: wait for the start, then buy one ticket per turn of the lock
    until none are left.

    Each turn: acquire ``lock``, read the stock, work a little, sell the next ticket
    carrying ``lock.token``, release. A sale the database refuses (stale token) is
    logged and the buyer goes on; so is a hold found lost on release. In a staged
    run (``cfg.staged``, ``cue`` the buyers' end of the pipe to the parent), the one
    buyer that claims the stage reports before it writes and waits for its cue.
    """
    # Born ignoring SIGINT (see _sigint_ignored); say so again for other launchers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(
        level=cfg.log_level,
        format=f"%(levelname)s {cfg.name}[%(process)d] %(name)s: %(message)s",
    )
    if cfg.ttl is not None:
        configure(ttl=cfg.ttl)
    seed = None if cfg.seed is None else f"{cfg.seed}/{cfg.name}/{cfg.generation}"
    rng = random.Random(seed)
    pid = os.getpid()
    deadline = time.monotonic() + (cfg.deadline - time.time())
    may_stage = cfg.staged and cue is not None
    with Inventory(cfg.db) as inv:
        initial = inv.initial()
        stage_at = max(1, (initial + 1) // 2)
        inv.register_buyer(cfg.name, pid, cfg.generation)
        if not go.wait(timeout=max(0.0, deadline - time.monotonic())):
            raise SystemExit(EXIT_GAVE_UP)
        while True:
            left_s = deadline - time.monotonic()
            if left_s <= 0 or os.getppid() != cfg.parent_pid:
                log.warning("%s gives up: %s", cfg.name, "deadline" if left_s <= 0 else "orphan")
                raise SystemExit(EXIT_GAVE_UP)
            if not lock.acquire(timeout=min(ACQUIRE_SLICE, left_s)):
                continue
            granted_at = time.time()
            token = lock.token
            try:
                if token is None:  # cannot happen after a grant; never sell unfenced
                    raise ProcsyncError("the lock was granted without a fencing token")
                left = inv.remaining(token)
                if left <= 0:
                    return
                time.sleep(cfg.work_s * rng.uniform(0.5, 1.5))
                if may_stage and left <= stage_at:
                    may_stage = False  # one try per process: the stage is claimed once
                    if cue is not None and inv.claim_stage(cfg.name):
                        _await_cue(cue, cfg, pid, token, left, deadline)
                # No `if lock.lost` here, on purpose: a pause can strike right after any
                # such check. The database's fence is what keeps the stock exact.
                ticket = initial - left + 1
                accepted = inv.sell(
                    ticket=ticket,
                    remaining_after=left - 1,
                    buyer=cfg.name,
                    pid=pid,
                    token=token,
                    granted_at=granted_at,
                )
                if not accepted:
                    log.info("%s: the database refused ticket %d (stale token %d)",
                             cfg.name, ticket, token)  # fmt: skip
            finally:
                try:
                    lock.release()
                except LockLostError as exc:
                    inv.record_incident("lost", cfg.name, pid, token, f"LockLostError: {exc}")
                    log.info("%s: lost the lock before release: %s", cfg.name, exc)


def _await_cue(
    cue: multiprocessing.connection.Connection,
    cfg: BuyerConfig,
    pid: int,
    token: int,
    left: int,
    deadline: float,
) -> None:
    """The staged buyer's part: say "I hold ``token`` and read ``left``", then wait
    for the parent's cue to write (it comes after the parent has paused this process
    and seen another buyer buy). Gives up at the deadline or when orphaned."""
    cue.send(("holding", cfg.name, pid, token, left))
    while not cue.poll(CUE_SLICE):
        if time.monotonic() >= deadline or os.getppid() != cfg.parent_pid:
            log.warning("%s gives up waiting for its cue", cfg.name)
            raise SystemExit(EXIT_GAVE_UP)
    cue.recv()


# -- the parent ----------------------------------------------------------------------


@final
@dataclass(frozen=True, slots=True)
class RushOptions:
    """How to run the rush. ``ttl=None``: :data:`CHAOS_TTL` under chaos, else the
    session default (``PROCSYNC_TTL`` or 10 s). ``kills`` / ``pauses`` = None: chosen
    from the number of tickets. ``db=None``: a temporary file, removed afterwards."""

    buyers: int = 20
    tickets: int = 100
    chaos: bool = False
    ttl: float | None = None
    db: Path | None = None
    seed: int | None = None
    work_s: float = 0.02
    timeout: float = 120.0
    kills: int | None = None
    pauses: int | None = None
    fenced: bool = True
    url: str | None = None
    """Server URL; None: ``PROCSYNC_URL``, else the embedded server."""
    scenario: str | None = None
    """A staged run instead of random chaos (one of :data:`SCENARIOS`), or None."""

    def __post_init__(self) -> None:
        if not 1 <= self.buyers <= 1000:
            raise ValueError(f"buyers must be in 1..1000, got {self.buyers}")
        if not 1 <= self.tickets <= 1_000_000:
            raise ValueError(f"tickets must be in 1..1000000, got {self.tickets}")
        for what, value in (("work_s", self.work_s), ("timeout", self.timeout)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.ttl is not None:
            check_ttl(self.ttl)  # what the buyers' sessions will demand
        for what, n in (("kills", self.kills), ("pauses", self.pauses)):
            if n is not None and n < 0:
                raise ValueError(f"{what} must be >= 0, got {n}")
        if self.scenario is not None:
            if self.scenario not in SCENARIOS:
                raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
            if self.chaos:
                raise ValueError("a staged scenario and random chaos exclude each other")

    @property
    def effective_ttl(self) -> float | None:
        """The ttl the buyers are configured with (None: the session default)."""
        if self.ttl is not None:
            return self.ttl
        return CHAOS_TTL if self.chaos or self.scenario is not None else None


@final
@dataclass(frozen=True, slots=True)
class RushEvent:
    """Something worth telling while the rush runs (for the progress display)."""

    kind: str
    """"go" (the start signal), "kill", "pause", "resume", "respawn", "rejected" (the
    database refused a stale sale), "lost" (a buyer found its hold lost on release) or
    "exit" (a buyer exited on its own with an error)."""
    buyer: str
    pid: int
    at: float
    """Seconds since the start signal."""
    message: str


@final
@dataclass(frozen=True, slots=True)
class RushResult:
    """The outcome of :func:`run`: the checker's verdict plus what the parent saw."""

    verdict: Verdict
    buyers: int
    processes_started: int
    chaos: bool
    crashes: int
    pauses: int
    recovery_s: tuple[float, ...]
    """Per crash: seconds from the SIGKILL to the next grant to another buyer."""
    pause_recovery_s: tuple[float, ...]
    """Per pause: seconds from the SIGSTOP to the next grant to another buyer."""
    duration_s: float
    ttl_s: float
    """The buyers' session lease."""
    sales_per_buyer: dict[str, int]
    run_id: str
    url: str
    """The server, password redacted."""
    db: str | None
    """The database file, if it was kept (``--db``)."""
    seed: int | None
    problems: tuple[str, ...] = ()
    """What went wrong outside the database (buyer crashed on its own, timeout)."""
    timed_out: bool = False
    scenario: str | None = None
    """The staged scenario that ran instead of random chaos, if any."""

    @property
    def failures(self) -> tuple[str, ...]:
        """Every broken invariant and every problem of the run."""
        return self.verdict.failures + self.problems

    @property
    def ok(self) -> bool:
        """True if the checker found nothing wrong and the run itself went well."""
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (what ``procsync demo tickets --json`` prints)."""
        v = self.verdict
        per_buyer = list(self.sales_per_buyer.values())
        return {
            "ok": self.ok,
            "initial": v.initial,
            "sold": v.sold,
            "remaining": v.remaining,
            "oversold": v.oversold,
            "sold_twice": v.sold_twice,
            "invalid_tickets": v.invalid_tickets,
            "tokens_increasing": v.token_regressions == 0,
            "stale_rejected": v.stale_rejected,
            "lost_on_release": v.lost_on_release,
            "crashes": self.crashes,
            "pauses": self.pauses,
            "recovery_p50_s": _round(_p50(self.recovery_s)),
            "recovery_max_s": _round(max(self.recovery_s, default=None)),
            "pause_recovery_max_s": _round(max(self.pause_recovery_s, default=None)),
            "buyers": self.buyers,
            "processes_started": self.processes_started,
            "sales_per_buyer_min": min(per_buyer, default=0),
            "sales_per_buyer_max": max(per_buyer, default=0),
            "duration_s": round(self.duration_s, 3),
            "chaos": self.chaos,
            "scenario": self.scenario,
            "fenced": v.fenced,
            "ttl_s": self.ttl_s,
            "seed": self.seed,
            "run_id": self.run_id,
            "url": self.url,
            "db": self.db,
            "timed_out": self.timed_out,
            "failures": list(self.failures),
        }


def _p50(values: tuple[float, ...]) -> float | None:
    return statistics.median(values) if values else None


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


@dataclass
class _Buyer:
    """The parent's record of one buyer process."""

    name: str
    generation: int
    process: multiprocessing.process.BaseProcess
    paused_until: float | None = None
    killed: bool = False

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None:  # pragma: no cover - only before start()
            raise RuntimeError(f"{self.name} is not started")
        return pid


@dataclass
class _Fleet:
    """The buyer processes this run started; only these pids are ever signalled."""

    ctx: multiprocessing.context.SpawnContext
    template: BuyerConfig
    lock: Lock
    go: Event
    cue: multiprocessing.connection.Connection | None = None
    """The buyers' end of the staged run's pipe (None unless staged)."""
    live: dict[int, _Buyer] = field(default_factory=dict)
    started: int = 0

    def spawn(self, name: str, generation: int) -> _Buyer:
        cfg = dataclasses.replace(self.template, name=name, generation=generation)
        proc = self.ctx.Process(
            target=buyer, args=(cfg, self.lock, self.go, self.cue), name=f"{name}.{generation}"
        )
        with _sigint_ignored():
            proc.start()
        b = _Buyer(name, generation, proc)
        self.live[b.pid] = b
        self.started += 1
        return b

    def paused(self) -> list[_Buyer]:
        return [b for b in self.live.values() if b.paused_until is not None]

    def exited(self) -> Iterator[_Buyer]:
        for pid, b in list(self.live.items()):
            if b.process.exitcode is not None:
                b.process.join()
                del self.live[pid]
                yield b

    def stop_all(self) -> None:
        """Kill every buyer still running (continuing the paused ones first) and reap."""
        for b in self.live.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(b.pid, signal.SIGKILL)
                os.kill(b.pid, signal.SIGCONT)
        for b in self.live.values():
            b.process.join(timeout=5.0)
        self.live.clear()


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while starting a child, so that it is born ignoring it.

    A Ctrl-C at the terminal goes to the whole process group; the buyers must not
    die of it half-way through a sale (or print tracebacks over the display): the
    parent gets it and kills them itself. Python leaves an inherited SIG_IGN alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _chaos_plan(opts: RushOptions, rng: random.Random) -> list[tuple[int, str]]:
    """(tickets sold, "kill" | "pause") moments, in order: when to strike the holder."""
    if not opts.chaos:
        return []
    t = opts.tickets
    kills = opts.kills if opts.kills is not None else max(1, t // 10)
    pauses = opts.pauses if opts.pauses is not None else max(1, t // 50)
    lo, hi = max(1, round(t * 0.05)), max(1, round(t * 0.9))
    points = list(range(lo, hi + 1))
    n = min(kills + pauses, len(points))
    kinds = ["pause"] * min(pauses, n) + ["kill"] * (n - min(pauses, n))
    rng.shuffle(kinds)
    return list(zip(sorted(rng.sample(points, n)), kinds, strict=True))


def _recoveries(strikes: list[float], grants: list[float]) -> tuple[float, ...]:
    """For each strike time, the wait until the first later grant (if there was one)."""
    out = []
    for t in strikes:
        i = bisect_right(grants, t)
        if i < len(grants):
            out.append(grants[i] - t)
    return tuple(out)


def _child_log_level() -> int:
    # Buyers stay quiet unless the user asked for details: their stderr would
    # otherwise tear through the progress display (a lost session logs a warning).
    level = logging.getLogger().getEffectiveLevel()
    return level if level < logging.WARNING else logging.ERROR


class _Abort(Exception):
    """Ends the rush early; the reason is already in ``problems``."""


@dataclass
class _Stage:
    """The parent's side of a staged run: its end of the pipe, and the buyer it paused."""

    conn: multiprocessing.connection.Connection
    victim: _Buyer | None = None
    token: int = 0
    done: bool = False


class _Rush:
    """The parent's side of one run: the buyers it started, the chaos plan, and
    what it saw. Only the pids in ``fleet`` are ever signalled."""

    def __init__(
        self,
        opts: RushOptions,
        inv: Inventory,
        fleet: _Fleet,
        on_progress: Callable[[int, int], None] | None,
        on_event: Callable[[RushEvent], None] | None,
        stage: _Stage | None = None,
    ) -> None:
        self.opts = opts
        self.inv = inv
        self.fleet = fleet
        self.stage = stage
        self.on_progress = on_progress
        self.on_event = on_event
        self.plan = _chaos_plan(opts, random.Random(opts.seed))
        ttl = opts.effective_ttl
        self.chaos_ttl = ttl if ttl is not None else CHAOS_TTL
        self.pause_s = self.chaos_ttl + max(1.0, self.chaos_ttl / 2)  # well past the lease
        self.deadline = time.monotonic() + opts.timeout
        self.t_go = time.monotonic()
        self.t_end: float | None = None
        self.problems: list[str] = []
        self.timed_out = False
        self.crashes = 0
        self.pauses = 0
        self._sold = -1
        self._seen_rejected = 0
        self._seen_lost = 0

    @property
    def duration(self) -> float:
        """Seconds from the start signal to the end (or to now)."""
        end = self.t_end if self.t_end is not None else time.monotonic()
        return end - self.t_go

    def emit(self, kind: str, buyer_name: str, pid: int, message: str) -> None:
        log.info("%s", message)
        if self.on_event is not None:
            at = round(time.monotonic() - self.t_go, 3)
            self.on_event(RushEvent(kind, buyer_name, pid, at, message))

    def start(self) -> None:
        """Start the buyers, wait until all are ready, then line them up on the lock.

        The parent takes the lock, fires the gun, and lets go of the lock only once
        the server counts every buyer waiting for it: FIFO hand-off then serves each
        of them within the first round, however slowly its process got going. The
        duration measures selling, not interpreter start-up.
        """
        n = self.opts.buyers
        width = len(str(n))
        for i in range(1, n + 1):
            self.fleet.spawn(f"buyer-{i:0{width}d}", 1)
        while self.inv.ready() < n:
            self._check_starting("start")
            time.sleep(TICK)
        lock = self.fleet.lock
        if not lock.acquire(timeout=max(0.0, self.deadline - time.monotonic())):
            self._check_starting("line up")
            self.problems.append("the parent could not take the lock to line the buyers up")
            raise _Abort
        try:
            self.fleet.go.set()
            while lock.statistics().waiting < n:
                self._check_starting("line up")
                time.sleep(TICK)
        finally:
            try:
                lock.release()
            except LockLostError as exc:  # the buyers got it anyway: the race is on
                log.warning("the parent's start-line hold was lost: %s", exc)
        self.t_go = time.monotonic()
        self.emit("go", "", 0, f"all {n} buyers queued on the lock: go!")

    def _check_starting(self, what: str) -> None:
        """Abort the start if a buyer exited or the deadline passed."""
        for b in self.fleet.live.values():
            if b.process.exitcode is not None:
                self.problems.append(f"{b.name} exited with status {b.process.exitcode}")
                raise _Abort
        if time.monotonic() >= self.deadline:
            self.timed_out = True
            self.problems.append(f"the buyers did not all {what} in {self.opts.timeout:g} s")
            raise _Abort

    def watch(self) -> None:
        """Follow the run until every buyer has exited (or the deadline passes)."""
        while self.fleet.live:
            if time.monotonic() >= self.deadline:
                self.timed_out = True
                self.problems.append(f"timed out after {self.opts.timeout:g} s")
                return
            self._progress()
            self._database_events()
            self._resume_paused()
            self._reap()
            self._chaos()
            self._stage()
            time.sleep(TICK)

    def stop(self) -> None:
        """Kill whatever buyer still runs and lower the start flag (it is state)."""
        if self.t_end is None:
            self.t_end = time.monotonic()
        self.fleet.stop_all()
        with contextlib.suppress(ProcsyncError):
            self.fleet.go.clear()

    def _progress(self) -> None:
        n = self.inv.sold()
        if n != self._sold:
            self._sold = n
            if self.on_progress is not None:
                self.on_progress(n, self.opts.tickets)

    def _database_events(self) -> None:
        for seq, ticket, name, pid, token, fence in self.inv.rejected_since(self._seen_rejected):
            self._seen_rejected = seq
            self.emit(
                "rejected",
                name,
                pid,
                f"database refused {name}'s sale of ticket {ticket}: "
                f"token {token} is not newer than {fence}",
            )
        for seq, name, pid, _ in self.inv.incidents_since(self._seen_lost, "lost"):
            self._seen_lost = seq
            self.emit("lost", name, pid, f"{name} (pid {pid}): release() raised LockLostError")

    def _resume_paused(self) -> None:
        now = time.monotonic()
        for b in self.fleet.paused():
            if b.paused_until is not None and now >= b.paused_until:
                b.paused_until = None
                with contextlib.suppress(ProcessLookupError):
                    os.kill(b.pid, signal.SIGCONT)
                self.inv.record_incident("resume", b.name, b.pid, None)
                self.emit("resume", b.name, b.pid, f"SIGCONT {b.name} (pid {b.pid})")

    def _reap(self) -> None:
        """Collect exited buyers; respawn the ones chaos killed while tickets are left."""
        for b in self.fleet.exited():
            code = b.process.exitcode
            if b.killed:
                if self.inv.remaining() > 0:
                    nb = self.fleet.spawn(b.name, b.generation + 1)
                    self.emit("respawn", nb.name, nb.pid, f"respawned {nb.name} as pid {nb.pid}")
            elif code != 0:
                self.problems.append(f"{b.name} (pid {b.pid}) exited with status {code}")
                self.emit("exit", b.name, b.pid, f"{b.name} (pid {b.pid}) exited with {code}")

    def _chaos(self) -> None:
        """Carry out the next planned strike once enough tickets are sold."""
        if not self.plan or not self.plan[0][0] <= self._sold < self.opts.tickets:
            return
        kind = self.plan[0][1]
        struck = _strike(kind, self.fleet, self.inv, self.pause_s)
        if struck is None:
            return  # nobody of ours holds the lock this very moment: next tick
        self.plan.pop(0)
        b, token = struck
        if kind == "kill":
            self.crashes += 1
            msg = f"SIGKILL {b.name} (pid {b.pid}) holding token {token}"
        else:
            self.pauses += 1
            msg = (
                f"SIGSTOP {b.name} (pid {b.pid}) holding token {token} "
                f"for {self.pause_s:g} s (ttl {self.chaos_ttl:g} s)"
            )
        self.emit(kind, b.name, b.pid, msg)

    def _stage(self) -> None:
        """Play the staged scenario: each step once the one before it is seen done.

        1. The buyer that claimed the stage reports (pipe) that it holds the lock
           and has read the stock: SIGSTOP it.
        2. The database shows a sale under a newer token (its lease ran out, the
           lock went to another buyer, who bought): give the cue, SIGCONT it. It
           writes what it read before the pause.
        """
        st = self.stage
        if st is None or st.done:
            return
        if st.victim is None:
            if not st.conn.poll():
                return
            _, _, pid, token, left = st.conn.recv()
            b = self.fleet.live.get(pid)
            if b is None:  # pragma: no cover - only our buyers hold the pipe
                self.problems.append(f"the stage was claimed by pid {pid}, not one of ours")
                st.done = True
                return
            os.kill(b.pid, signal.SIGSTOP)
            b.paused_until = math.inf  # the stage resumes it, not the clock
            st.victim, st.token = b, token
            self.pauses += 1
            self.inv.record_incident("pause", b.name, b.pid, token, f"staged: read {left} left")
            self.emit(
                "pause",
                b.name,
                b.pid,
                f"SIGSTOP {b.name} (pid {b.pid}) holding token {token}, "
                f"between reading the stock ({left} left) and writing it",
            )
            return
        if self.inv.sold_after(st.token) == 0:
            return
        b = st.victim
        st.conn.send("write")
        with contextlib.suppress(ProcessLookupError):
            os.kill(b.pid, signal.SIGCONT)
        b.paused_until = None
        st.done = True
        self.inv.record_incident("resume", b.name, b.pid, st.token, "staged")
        self.emit(
            "resume",
            b.name,
            b.pid,
            f"SIGCONT {b.name} (pid {b.pid}): another buyer has bought since, "
            f"under a newer token; {b.name} now writes what it read before the pause",
        )


def run(
    opts: RushOptions,
    *,
    on_progress: Callable[[int, int], None] | None = None,
    on_event: Callable[[RushEvent], None] | None = None,
) -> RushResult:
    """Run the ticket rush and check the database; never raises for a broken invariant
    (see :attr:`RushResult.ok`).

    ``on_progress(sold, initial)`` is called whenever the number of accepted sales
    changes; ``on_event`` for the start signal, every chaos action and every refused
    or lost write. Starts ``opts.buyers`` processes with ``spawn``; all of them are
    gone when this returns, also on KeyboardInterrupt.

    Raises:
        ServerError: the server cannot be reached (or the embedded one started).
        FileExistsError: ``opts.db`` is a file that is not a ticket database.
    """
    run_id = secrets.token_hex(4)
    url = opts.url or resolve_url(None)
    lock = Lock(f"tickets:{run_id}", url=url)
    go = Event(f"tickets:{run_id}:go", url=url)
    tmpdir: str | None = None
    if opts.db is None:
        tmpdir = tempfile.mkdtemp(prefix="procsync-tickets-")
        db = Path(tmpdir) / "tickets.db"
    else:
        db = Path(opts.db).absolute()
    staged = opts.scenario is not None
    try:
        inv = Inventory.create(db, opts.tickets, run_id=run_id, fenced=opts.fenced, staged=staged)
    except BaseException:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    template = BuyerConfig(
        name="",
        generation=0,
        db=str(db),
        ttl=opts.effective_ttl,
        work_s=opts.work_s,
        seed=opts.seed,
        deadline=time.time() + opts.timeout,
        parent_pid=os.getpid(),
        log_level=_child_log_level(),
        staged=staged,
    )
    log.info("ticket rush %s: %d buyers, %d tickets, db %s, server %s",
             run_id, opts.buyers, opts.tickets, db, lock.backend.safe_url)  # fmt: skip
    ctx = multiprocessing.get_context("spawn")
    pipe = ctx.Pipe() if staged else None
    try:
        fleet = _Fleet(ctx, template, lock, go, None if pipe is None else pipe[1])
        stage = None if pipe is None else _Stage(pipe[0])
        rush = _Rush(opts, inv, fleet, on_progress, on_event, stage)
        try:
            rush.start()
            rush.watch()
        except _Abort:
            pass
        finally:
            rush.stop()
        if on_progress is not None:
            on_progress(inv.sold(), opts.tickets)
        grants = inv.grant_times()
        return RushResult(
            verdict=check(db),
            buyers=opts.buyers,
            processes_started=fleet.started,
            chaos=opts.chaos,
            crashes=rush.crashes,
            pauses=rush.pauses,
            recovery_s=_recoveries(inv.incident_times("kill"), grants),
            pause_recovery_s=_recoveries(inv.incident_times("pause"), grants),
            duration_s=rush.duration,
            ttl_s=opts.effective_ttl or env_ttl(),
            sales_per_buyer=inv.sales_per_buyer(),
            run_id=run_id,
            url=lock.backend.safe_url,
            db=None if tmpdir is not None else str(db),
            seed=opts.seed,
            problems=tuple(rush.problems),
            timed_out=rush.timed_out,
            scenario=opts.scenario,
        )
    finally:
        if pipe is not None:
            for end in pipe:
                end.close()
        inv.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _strike(kind: str, fleet: _Fleet, inv: Inventory, pause_s: float) -> tuple[_Buyer, int] | None:
    """Kill or pause the buyer that holds the lock right now; None if none of ours does.

    The victim is stopped first and the owner asked twice more: a stopped process
    cannot release, but a release it sent just before it stopped may still wait in
    the server's input behind the first question; the server has read it by the time
    the second one arrives (it is sent after the first answer). If the server still
    names the victim then, the victim holds the lock when it is struck.
    """
    lock = fleet.lock
    owner = lock.owner()
    b = fleet.live.get(owner.pid) if owner is not None else None
    if b is None or b.killed or b.paused_until is not None or b.process.exitcode is not None:
        return None
    os.kill(b.pid, signal.SIGSTOP)
    try:
        st = lock.statistics()
        if st.owner is not None and st.owner.pid == b.pid:
            st = lock.statistics()
    except BaseException:
        os.kill(b.pid, signal.SIGCONT)
        raise
    if st.owner is None or st.owner.pid != b.pid:
        os.kill(b.pid, signal.SIGCONT)
        return None
    if kind == "kill":
        os.kill(b.pid, signal.SIGKILL)
        b.killed = True
        inv.record_incident("kill", b.name, b.pid, st.last_token)
    else:
        b.paused_until = time.monotonic() + pause_s
        inv.record_incident("pause", b.name, b.pid, st.last_token)
    return b, st.last_token
