"""Sessions: how a process proves to the server that it is alive.

Each process has one session per server and namespace: an id of 128 random bits,
its identity (host, boot id, pid, process start time), a name, and a lease of
``ttl`` seconds that a daemon heartbeat thread renews every ``ttl/3`` with one
script call, whatever the process holds. Every hold — lock owner, permit, waiter
— belongs to a session and is valid exactly while the session is.

Failure model
-------------
* Clean exit (interpreter exit, ``multiprocessing`` child exit, ``close()``): the
  session ends at once and every hold is released.
* Crash (SIGKILL, segfault): a waiter on the same host notices the pid is gone
  and reaps the session within milliseconds; otherwise the first script to see
  the lease expired reaps it, within ``ttl`` plus one heartbeat period.
* Client-side deadline (Chubby's "jeopardy"): the client counts the lease from the
  moment it *sent* the renewal. If no confirmation arrives before that local
  deadline, every hold is reported lost (``.lost``, ``on_lost`` callbacks,
  :class:`~procsync.errors.LockLostError` on release) — no later than the server
  could hand the primitive to someone else.
* Fork: a child never owns or renews its parent's session; it opens its own on
  first use.

States (ZooKeeper's and Chubby's model)
---------------------------------------
::

    connected --(a call or heartbeat fails)--> suspended --(the server answers)--> reconnected
        ^                                         |   ^                                  |
        +-----------------------------------------|---+---------(fails again)------------+
                                                  +--(client-side deadline, or the server
                                                      says it no longer knows it)--> lost

*Suspended*: the server cannot be reached, but the lease may still be valid: holds
are kept, waits go on (they ride out the outage, :mod:`procsync._drivers`). The
heartbeat tries again with jittered backoff, each try bounded by the deadline.
*Reconnected*: the server answered again. The session then *reconciles*: clean-ups
it could not confirm (a release, a waiter leaving a queue) are run, and every hold
the process believes in is checked against what the server records for the session;
one the server no longer has is reported lost at once. *Lost*: the client-side
deadline passed, or the server no longer knows the session (its lease ran out, the
server lost its data, or an operator forced it). Every hold is reported lost then,
from the deadline itself -- the heartbeat's calls are bounded by it -- so strictly
before the server could grant the hold to another process. A session lost while the
server may still have it is then closed on the server as soon as it can be reached,
so what it held is free at once. Waits go on in a new session.

:meth:`Session.on_state` subscribes to the transitions; each is logged once (WARNING
for suspended and lost, INFO for reconnected).

Heartbeat modes
---------------
``heartbeat="thread"`` (default) renews from a daemon thread. ``heartbeat="process"``
renews from a daemon process (:mod:`procsync._heartbeat_process`) that lives exactly
as long as this process: it keeps the session alive while the main thread is stuck in
C code holding the GIL (where a thread cannot run), and when this process dies it
ends the session at once, so the death is reported within milliseconds. Either way
:meth:`Session.beat` is the application's own progress signal: a session with
``stall_after`` that does not beat for that long is reported ``stalled`` (its
heartbeat still lives), and ``resumed`` at its next beat.
"""

from __future__ import annotations

import atexit
import contextlib
import enum
import itertools
import logging
import multiprocessing.util
import os
import random
import secrets
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from procsync import _config
from procsync._heartbeat_process import HeartbeatProcess
from procsync._identity import Identity, current_identity, pid_alive
from procsync._validate import check_name, check_ttl
from procsync.backend.client import Backend, get_backend
from procsync.core.steps import Call, HolderInfo, Op, reap
from procsync.errors import ServerError, ServerUnavailableError, SessionLostError

if TYPE_CHECKING:
    from collections.abc import Generator

__all__ = [
    "HEARTBEAT_MODES",
    "HoldOwner",
    "PidWatcher",
    "Session",
    "SessionState",
    "beat_args",
    "close_all",
    "close_args",
    "configure",
    "current_session",
    "open_args",
    "session_for",
    "session_keys",
    "watch_session_process",
]

log = logging.getLogger("procsync.session")

REAP_BATCH = 16
HEARTBEAT_MODES = ("thread", "process")
#: How long a new heartbeat process may take to confirm its first renewal (the
#: session renews from here meanwhile, so a short ttl is fine).
HEARTBEAT_PROCESS_START_S = 20.0


def session_keys(backend: Backend) -> list[str]:
    """KEYS of every ``session.lua`` call."""
    return [backend.sessions_key, backend.gone_key]


def open_args(
    backend: Backend,
    sid: str,
    ttl: float,
    name: str,
    ident: Identity,
    heartbeat: str,
    stall_after: float | None,
) -> list[str | int]:
    """ARGV of ``session.lua``'s ``open`` (shared with the fleet simulation)."""
    return [
        backend.prefix,
        "open",
        sid,
        int(ttl * 1000),
        name,
        ident.host,
        ident.boot_id,
        ident.pid,
        ident.start_ticks,
        heartbeat,
        int(stall_after * 1000) if stall_after else 0,
    ]


def beat_args(backend: Backend, sid: str, ttl: float) -> list[str | int]:
    """ARGV of ``session.lua``'s ``beat``: renew and reap a batch of expired sessions."""
    return [backend.prefix, "beat", sid, int(ttl * 1000), REAP_BATCH]


def close_args(backend: Backend, sid: str) -> list[str | int]:
    """ARGV of ``session.lua``'s ``close``."""
    return [backend.prefix, "close", sid]


class HoldOwner(Protocol):
    """A primitive that holds something through a session and must hear of its loss."""

    def _hold_lost(self, reason: str) -> None: ...

    def _hold_key(self) -> str:
        """The state key of what it holds (what the server records for the session)."""
        ...


class SessionState(enum.Enum):
    """Where a session stands (see the module docstring's state diagram)."""

    CONNECTED = "connected"
    SUSPENDED = "suspended"
    RECONNECTED = "reconnected"
    LOST = "lost"
    CLOSED = "closed"


#: Heartbeat retries after a failure: first wait and longest (jittered, and never past
#: the client-side deadline).
RETRY_FIRST = 0.05
RETRY_MAX = 1.0


class Session:
    """The process's membership on one server: identity, lease, heartbeat.

    ``Session(name=..., ttl=...)`` opens a session and makes it the one this
    process uses for that server and namespace (closing an idle previous one).
    Primitives open a default session on first use, so most programs never
    create one. Use as a context manager to end it (and release its holds) early.

    ``heartbeat="thread"`` renews from a daemon thread of this process;
    ``heartbeat="process"`` from a daemon process that survives a main thread stuck
    in C code holding the GIL and ends the session the moment this process dies
    (see the module docstring). ``stall_after`` (seconds) turns on stall reports:
    call :meth:`beat` at least that often while the application makes progress.
    """

    __slots__ = (
        "__weakref__",
        "_close_on_server",
        "_closed",
        "_deadline",
        "_hb_proc",
        "_hb_thread",
        "_holders",
        "_lock",
        "_lost_at",
        "_lost_reason",
        "_nudge",
        "_on_lost",
        "_on_state",
        "_pending",
        "_reconcile",
        "_state",
        "_stop",
        "_waiter_seq",
        "backend",
        "heartbeat",
        "id",
        "identity",
        "name",
        "stall_after",
        "started",
        "ttl",
    )

    def __init__(
        self,
        name: str | None = None,
        *,
        ttl: float | None = None,
        heartbeat: str = "thread",
        stall_after: float | None = None,
        url: str | None = None,
        namespace: str | None = None,
        _install: bool = True,
        _until: float | None = None,
    ) -> None:
        self.ttl = check_ttl(ttl if ttl is not None else _config.env_ttl())
        if heartbeat not in HEARTBEAT_MODES:
            raise ValueError(f"heartbeat must be 'thread' or 'process', got {heartbeat!r}")
        self.heartbeat = heartbeat
        self.stall_after = None if stall_after is None else check_ttl(stall_after)
        self.identity: Identity = current_identity()
        self.name = check_name(name, "session name") if name is not None else _default_name()
        self.backend: Backend = get_backend(url, namespace)
        self.backend.ttl_hint = max(self.backend.ttl_hint, self.ttl)
        self.id = secrets.token_hex(16)
        self._lock = threading.Lock()
        self._holders: set[HoldOwner] = set()
        self._on_lost: list[Callable[[Session, str], None]] = []
        self._on_state: list[Callable[[Session, SessionState, str], None]] = []
        self._state = SessionState.CONNECTED
        self._pending: list[tuple[str, Callable[[], Op]]] = []
        self._reconcile = False
        self._lost_reason: str | None = None
        self._lost_at = 0.0
        self._close_on_server = False
        self._closed = False
        self._stop = threading.Event()
        self._nudge = threading.Event()
        self._waiter_seq = itertools.count(1)
        self._hb_thread: threading.Thread | None = None
        self._hb_proc: HeartbeatProcess | None = None
        self.started = time.time()
        self._deadline = 0.0
        self._open(_until)
        if _install:
            _install_session(self)

    # -- lifecycle --------------------------------------------------------------

    def _keys(self) -> list[str]:
        return session_keys(self.backend)

    def _open(self, until: float | None = None) -> None:
        """Open the session on the server; the call is resent (it is idempotent) for
        the default budget, or until ``until`` (the deadline of the operation that
        needs the session) if that comes first."""
        from procsync import _drivers

        args = open_args(
            self.backend,
            self.id,
            self.ttl,
            self.name,
            self.identity,
            self.heartbeat,
            self.stall_after,
        )

        def op() -> Generator[Call, Any, float]:
            sent = time.monotonic()
            yield Call("session", tuple(self._keys()), tuple(args))
            return sent

        # Sent again (same id) if its reply is lost: opening is idempotent.
        end = time.monotonic() + self.backend.socket_timeout
        sent = _drivers.run(self.backend, op(), until=end if until is None else min(end, until))
        self._deadline = sent + self.ttl
        if self.heartbeat == "process":
            try:
                self._start_heartbeat_process(sent)
            except BaseException:
                with contextlib.suppress(ServerError):
                    self.backend.call("session", self._keys(), close_args(self.backend, self.id))
                raise
            target = self._watch_heartbeat_process
        else:
            target = self._beat_loop
        t = threading.Thread(target=target, name=f"procsync-heartbeat-{self.id[:8]}", daemon=True)
        self._hb_thread = t
        t.start()
        log.debug("session %s opened on %s (ttl %.1fs)", self.id, self.backend.safe_url, self.ttl)

    def _beat_loop(self) -> None:
        """Renew every ttl/3; on failure try again with jittered backoff. Every try is
        bounded by the client-side deadline (its socket timeout is what is left of it),
        so the session is declared lost at the deadline itself, however the network
        fails."""
        period = self.ttl / 3.0
        wait = period
        failures = 0
        while True:
            self._nudge.wait(wait)
            self._nudge.clear()
            if self._stop.is_set():
                break
            if os.getpid() != self.identity.pid:  # pragma: no cover - threads don't survive fork
                return
            sent = time.monotonic()
            left = self._deadline - sent
            if left <= 0:
                self._lose(f"no heartbeat confirmed for a whole ttl ({self.ttl:g}s)")
                break
            try:
                reply = self.backend.call(
                    "session", self._keys(), beat_args(self.backend, self.id, self.ttl), left
                )
            except ServerError as exc:
                if time.monotonic() >= self._deadline:
                    self._lose(f"no heartbeat confirmed for a whole ttl ({self.ttl:g}s): {exc}")
                    break
                self.suspend(f"heartbeat failed: {exc}")
                failures += 1
                backoff = min(RETRY_MAX, RETRY_FIRST * 2 ** min(failures - 1, 16))
                wait = min(backoff * random.uniform(0.5, 1.0), self._deadline - time.monotonic())
                continue
            if reply[0] == "unknown":
                self._lose(
                    "the server no longer knows this session: its lease ran out, "
                    "the server lost its data, or an operator forced it",
                    on_server=False,
                )
                break
            if time.monotonic() >= sent + self.ttl:
                self._lose(f"a heartbeat took longer than the ttl ({self.ttl:g}s)")
                break
            self._deadline = sent + self.ttl
            failures = 0
            self.reconnected()  # (if a call, this or another thread's, had suspended it)
            self._after_contact()
            # (clean-ups may have taken a while: never sleep past the deadline)
            wait = min(period, self._deadline - time.monotonic())
        self._close_after_loss()

    def _after_contact(self) -> None:
        """After the server answered a heartbeat: run the clean-ups kept for later, and
        reconcile the holds once after a reconnection."""
        if self._pending:
            self.settle()
        if self._reconcile:
            self._reconcile = False
            try:
                self._check_holds()
            except ServerError:
                self._reconcile = True  # next time

    def _check_holds(self) -> None:
        """Compare what the server records for this session with the holds this process
        believes in: one the server no longer has is reported lost at once."""
        with self._lock:
            believed = {h: h._hold_key() for h in self._holders}
        if not believed:
            return
        left = max(0.001, self._deadline - time.monotonic())
        reply = self.backend.call(
            "session", self._keys(), [self.backend.prefix, "holds", self.id], left
        )
        if reply[0] != "ok":
            return  # unknown: the heartbeat finds the session lost
        held = {str(k) for k in reply[1:]}
        with self._lock:
            still = [h for h in believed if h in self._holders]
        for h in still:
            if believed[h] not in held:
                self.remove_holder(h)
                log.warning(
                    "session %s: the server no longer records a hold of %s; reported lost",
                    self.id,
                    believed[h],
                )
                try:
                    h._hold_lost("the server no longer records this hold (it lost state?)")
                except Exception:
                    log.exception("on_lost callback failed")

    def _close_after_loss(self) -> None:
        """A session lost by its client-side deadline may still be alive on the server
        (the network failed one way, or this process was paused): close it there as
        soon as the server answers, so what it held is free at once, not at its lease
        end. Bounded: past one more ttl the server has ended it itself."""
        if self._closed or not self._close_on_server:
            return
        give_up = self._lost_at + self.ttl
        failures = 0
        while time.monotonic() < give_up and not self._closed:
            try:
                self.backend.call(
                    "session",
                    self._keys(),
                    close_args(self.backend, self.id),
                    give_up - time.monotonic(),
                )
                return
            except ServerError:
                failures += 1
                pause = min(RETRY_MAX, RETRY_FIRST * 2 ** min(failures - 1, 16))
                if self._nudge.wait(pause * random.uniform(0.5, 1.0)) and self._closed:
                    return

    def _renew_here(self) -> None:
        """One renewal from this process (while a heartbeat process starts)."""
        sent = time.monotonic()
        args = beat_args(self.backend, self.id, self.ttl)
        reply = self.backend.call("session", self._keys(), args)
        if reply[0] == "unknown":
            raise SessionLostError(f"session {self.id} ended before its heartbeat process started")
        self._deadline = sent + self.ttl

    def _start_heartbeat_process(self, opened: float) -> None:
        """Start the heartbeat process and wait until it has confirmed a renewal,
        renewing from here meanwhile (starting an interpreter may take longer than a
        short ttl)."""
        b, ident = self.backend, self.identity
        hb = HeartbeatProcess(
            {
                "url": b.url,
                "namespace": b.namespace,
                "sid": self.id,
                "ttl": self.ttl,
                "opened": opened,
                "parent_pid": ident.pid,
                "parent_start": ident.start_ticks,
                "boot_id": ident.boot_id,
            }
        )
        try:
            give_up = time.monotonic() + HEARTBEAT_PROCESS_START_S
            period = self.ttl / 3.0
            next_renewal = opened + period
            while True:
                now = time.monotonic()
                if now >= give_up:
                    raise ServerError(
                        f"the heartbeat process did not start within {HEARTBEAT_PROCESS_START_S:g}s"
                    )
                if now >= next_renewal:
                    self._renew_here()
                    next_renewal = time.monotonic() + period
                    continue
                wait = min(next_renewal, give_up) - now
                ready, _, _ = select.select([hb.wake_fd], [], [], wait)
                if not ready:
                    continue
                news = hb.read_wake()
                if hb.confirmed() is not None:
                    break
                reason = hb.lost_reason()
                if not news or reason is not None:
                    raise SessionLostError(
                        f"the heartbeat process of session {self.id} failed to start: "
                        f"{reason or 'it exited'}"
                    )
        except BaseException:
            hb.stop()
            raise
        self._hb_proc = hb
        self._current_deadline()

    def _current_deadline(self) -> float:
        """The client-side lease deadline, brought up to date from the heartbeat process."""
        hb = self._hb_proc
        if hb is not None:
            sent = hb.confirmed()
            if sent is not None and sent + self.ttl > self._deadline:
                self._deadline = sent + self.ttl
        return self._deadline

    def _watch_heartbeat_process(self) -> None:
        """Monitor thread of process mode: hear of a lost session (the heartbeat
        process writes a byte), of its exit, or of the client-side deadline passing."""
        hb = self._hb_proc
        if hb is None:  # pragma: no cover - set before the thread starts
            return
        confirmed = hb.confirmed()
        while not self._stop.is_set():
            reason = hb.lost_reason()
            if reason is not None:
                self._lose(reason, on_server="unknown" not in reason)
                break
            left = self._current_deadline() - time.monotonic()
            if left <= 0:
                self._lose(f"no heartbeat confirmed within the ttl ({self.ttl:g}s)")
                break
            now_confirmed = hb.confirmed()
            if now_confirmed != confirmed:  # the server answered the heartbeat process
                confirmed = now_confirmed
                self.reconnected()
                self._after_contact()
            # Clean-ups or a reconciliation wait for the next contact: look again soon.
            busy = self._pending or self._reconcile
            ready, _, _ = select.select([hb.wake_fd], [], [], min(left, 0.25) if busy else left)
            if ready and not hb.read_wake():
                if not self._stop.is_set():
                    self._lose(hb.lost_reason() or "the heartbeat process exited")
                break
        self._close_after_loss()

    def _lose(self, reason: str, *, on_server: bool = True) -> None:
        """The session is lost: every hold is reported lost, now. ``on_server``: the
        server may still have it (a client-side deadline), so the heartbeat thread
        closes it there as soon as it can."""
        with self._lock:
            if self._lost_reason is not None or self._closed:
                return
            self._lost_reason = reason
            self._lost_at = time.monotonic()
            self._close_on_server = on_server
            holders = list(self._holders)
            self._holders.clear()
            callbacks = list(self._on_lost)
            self._pending.clear()  # the session's end takes what they were to clean up
        self._stop.set()
        self._nudge.set()
        self._set_state(SessionState.LOST, reason)
        for h in holders:
            try:
                h._hold_lost(reason)
            except Exception:
                log.exception("on_lost callback failed")
        for cb in callbacks:
            try:
                cb(self, reason)
            except Exception:
                log.exception("on_lost callback failed")

    def lose(self, reason: str) -> None:
        """Declare the session lost (the server said it does not know it, or its
        deadline passed): holds are reported lost; the next use opens a new session."""
        self._lose(reason, on_server=False)

    # -- states -------------------------------------------------------------------

    def _set_state(self, new: SessionState, reason: str) -> None:
        with self._lock:
            old = self._state
            if old is new or old in (SessionState.LOST, SessionState.CLOSED):
                return
            if new is SessionState.RECONNECTED and old is not SessionState.SUSPENDED:
                return
            self._state = new
            callbacks = list(self._on_state)
        if new is SessionState.SUSPENDED:
            log.warning("session %s suspended: %s", self.id, reason)
        elif new is SessionState.LOST:
            log.warning("session %s lost: %s", self.id, reason)
        elif new is SessionState.RECONNECTED:
            log.info("session %s reconnected to %s", self.id, self.backend.safe_url)
        for cb in callbacks:
            try:
                cb(self, new, reason)
            except Exception:
                log.exception("on_state callback failed")

    def suspend(self, reason: str) -> None:
        """A call failed while the lease may still be valid (drivers and heartbeat)."""
        if self._state is SessionState.CONNECTED or self._state is SessionState.RECONNECTED:
            self._set_state(SessionState.SUSPENDED, reason)

    def reconnected(self) -> None:
        """The server answered again after a failure: reconcile (in the heartbeat)."""
        if self._state is SessionState.SUSPENDED:
            self._reconcile = True
            self._set_state(SessionState.RECONNECTED, "the server answered again")
            self._nudge.set()

    @property
    def state(self) -> SessionState:
        """The session's state now (``lost`` as soon as its deadline has passed)."""
        if self._state is not SessionState.CLOSED:
            _ = self.lost  # brings a passed deadline to LOST
        return self._state

    def on_state(self, callback: Callable[[Session, SessionState, str], None]) -> None:
        """Call ``callback(session, new_state, reason)`` at each transition (from the
        thread that saw it: the heartbeat, or a thread whose call failed or answered).
        Keep it short; exceptions are logged."""
        with self._lock:
            self._on_state.append(callback)

    def trusted_for(self) -> float:
        """Seconds until the client-side deadline (a wait looks again by then)."""
        return self._current_deadline() - time.monotonic()

    # -- clean-ups kept for later ------------------------------------------------------

    def defer(self, make: Callable[[], Op], what: str) -> None:
        """Keep the idempotent operation ``make()`` to run once the server answers
        again (a clean-up that could not be confirmed); dropped if the session ends,
        which ends what it was to clean up."""
        with self._lock:
            if self._lost_reason is not None or self._closed:
                return
            self._pending.append((what, make))
        log.info("session %s: %s kept for when the server answers", self.id, what)
        self._nudge.set()

    @property
    def pending(self) -> int:
        """How many clean-ups wait for the server to answer again."""
        return len(self._pending)

    def settle(self, until: float | None = None) -> bool:
        """Run the kept clean-ups, oldest first; True once none is left. Stops at the
        first that cannot reach the server (the rest wait with it). ``until``: a
        monotonic deadline for the tries (at most the default budget; never past the
        client-side deadline)."""
        from procsync import _drivers

        while (head := self._pending_head(until)) is not None:
            what, make, end = head
            try:
                _drivers.run(self.backend, make(), session=self, until=end)
            except ServerError as exc:
                if not self._tried(what, make, exc):
                    return False
                continue
            self._tried(what, make, None)
        return True

    async def asettle(self) -> bool:
        """Async twin of :meth:`settle`."""
        from procsync import _drivers

        while (head := self._pending_head(None)) is not None:
            what, make, end = head
            try:
                await _drivers.arun(self.backend, make(), session=self, until=end)
            except ServerError as exc:
                if not self._tried(what, make, exc):
                    return False
                continue
            self._tried(what, make, None)
        return True

    def _pending_head(self, until: float | None) -> tuple[str, Callable[[], Op], float] | None:
        """The oldest kept clean-up and the deadline of its try, or None."""
        with self._lock:
            if not self._pending:
                return None
            what, make = self._pending[0]
        end = min(time.monotonic() + self.backend.socket_timeout, self._deadline)
        return what, make, end if until is None else min(end, until)

    def _tried(self, what: str, make: Callable[[], Op], exc: ServerError | None) -> bool:
        """A clean-up was tried: drop it unless the server could not be reached (then
        False: stop, it waits for the next contact). Another failure is logged and the
        clean-up dropped (it cannot succeed by trying again)."""
        if exc is not None:
            if isinstance(exc, ServerUnavailableError) or not self.usable:
                return False
            log.warning("session %s: %s failed: %s", self.id, what, exc)
        with self._lock:
            if self._pending and self._pending[0][1] is make:
                self._pending.pop(0)
        return True

    def close(self) -> None:
        """End the session now: every hold is released and waiters are served.

        Idempotent. Called automatically at interpreter exit and when a
        ``multiprocessing`` child finishes.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._state = SessionState.CLOSED
            self._pending.clear()  # closing ends what they were to clean up
        self._stop.set()
        self._nudge.set()
        if os.getpid() != self.identity.pid:
            return  # a forked copy: the parent's session is not ours to end
        hb = self._hb_proc
        if hb is not None:
            hb.stop()
        if self._lost_reason is None:
            with contextlib.suppress(ServerError):
                self.backend.call("session", self._keys(), close_args(self.backend, self.id))
        _uninstall_session(self)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- state --------------------------------------------------------------------

    @property
    def lost(self) -> bool:
        """True once the session's lease may have ended without a clean close."""
        if self._lost_reason is not None:
            return True
        if self._closed:
            return False
        hb = self._hb_proc
        if hb is not None:
            reason = hb.lost_reason()
            if reason is not None:
                self._lose(reason)
                return True
        if time.monotonic() >= self._current_deadline():
            self._lose(f"no heartbeat confirmed within the ttl ({self.ttl:g}s)")
            return True
        return False

    @property
    def usable(self) -> bool:
        """Open, not lost, and owned by this very process (not a fork's copy)."""
        return not self._closed and not self.lost and os.getpid() == self.identity.pid

    @property
    def lost_reason(self) -> str | None:
        """Why the session was lost, or None."""
        return self._lost_reason

    @property
    def boot_id(self) -> str:
        return self.identity.boot_id

    @property
    def heartbeat_pid(self) -> int | None:
        """Pid of the heartbeat process (``heartbeat="process"``), else None."""
        hb = self._hb_proc
        return hb.pid if hb is not None else None

    def on_lost(self, callback: Callable[[Session, str], None]) -> None:
        """Call ``callback(session, reason)`` if the session is lost (from the
        heartbeat thread, at the client-side deadline)."""
        with self._lock:
            self._on_lost.append(callback)

    def progress(self) -> None:
        """Tell the registry the application made progress (see ``stall_after``).

        A session with ``stall_after`` that makes no progress call for that long is
        reported ``stalled`` (event and state), and ``resumed`` at the next call.
        ``beat`` is the same method."""
        reply = self.backend.call(
            "session", self._keys(), [self.backend.prefix, "progress", self.id]
        )
        if reply[0] == "unknown":
            raise SessionLostError(f"session {self.id} is no longer known to the server")

    beat = progress

    # -- what primitives use --------------------------------------------------------

    def new_waiter_id(self) -> str:
        return f"{self.id}/{next(self._waiter_seq)}"

    def add_holder(self, owner: HoldOwner) -> None:
        with self._lock:
            self._holders.add(owner)

    def remove_holder(self, owner: HoldOwner) -> None:
        with self._lock:
            self._holders.discard(owner)

    def watch_holders(self, holders: list[HolderInfo], inbox: str) -> list[HolderInfo]:
        """Watch the same-host holders among ``holders``; return those already dead
        (the caller reaps them on the server and looks again)."""
        dead = []
        watcher: PidWatcher | None = None
        for h in holders:
            if h.boot_id != self.identity.boot_id or h.sid == self.id:
                continue
            watcher = watcher or _watcher()
            # A process watched already is known alive without a /proc read (the
            # queue's processes are met again and again under contention).
            if watcher.watching(h.pid, h.start_ticks) or pid_alive(h.pid, h.start_ticks):
                watcher.watch(h.pid, h.start_ticks, (self.backend, h))
            else:
                dead.append(h)
        return dead

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("lost" if self._lost_reason else "alive")
        return (
            f"<procsync.Session {self.name!r} id={self.id[:8]} {state} ttl={self.ttl:g}s "
            f"at {self.backend.safe_url}>"
        )


def reap_dead(backend: Backend, h: HolderInfo) -> bool:
    """Run :func:`procsync.core.steps.reap` for one holder seen dead (blocking)."""
    from procsync import _drivers

    return bool(
        _drivers.run(backend, reap(backend.prefix, backend.sessions_key, backend.gone_key, [h]))
    )


def _default_name() -> str:
    import sys

    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    proc = multiprocessing.current_process().name
    return f"{argv0}:{proc}"[:200]


# -- the process's sessions -------------------------------------------------------

_sessions: dict[tuple[str, str], Session] = {}
_sessions_lock = threading.Lock()
_opening_lock = threading.Lock()
_session_defaults: dict[str, Any] = {}


def _key(backend: Backend) -> tuple[str, str]:
    return (backend.url, backend.namespace)


def _install_session(s: Session) -> None:
    with _sessions_lock:
        old = _sessions.get(_key(s.backend))
        _sessions[_key(s.backend)] = s
    if old is not None and old is not s:
        old.close()
    atexit.register(s.close)
    multiprocessing.util.Finalize(s, s.close, exitpriority=100)


def _uninstall_session(s: Session) -> None:
    with _sessions_lock:
        if _sessions.get(_key(s.backend)) is s:
            del _sessions[_key(s.backend)]


def usable_session(backend: Backend) -> Session | None:
    """The process's session on ``backend`` if it is usable now, else None (never
    opens one: the hot paths' check)."""
    s = _sessions.get(_key(backend))
    return s if s is not None and s.usable else None


def session_for(backend: Backend, until: float | None = None) -> Session:
    """The process's usable session on ``backend``, opened (or replaced) on demand;
    ``until``: the deadline of the operation that needs it (opening waits no longer)."""
    s = _sessions.get(_key(backend))
    if s is not None and s.usable:
        return s
    # One opener at a time: threads racing through their first use must share one
    # session, not each install their own (closing the one before, with its holds).
    with _opening_lock:
        with _sessions_lock:
            s = _sessions.get(_key(backend))
            if s is not None and s.usable:
                return s
        fresh = Session(
            url=backend.url,
            namespace=backend.namespace,
            _install=False,
            _until=until,
            **_session_defaults,
        )
        _install_session(fresh)
        return fresh


def close_all() -> None:
    """Close every session of this process: holds released, heartbeats stopped.

    Primitives open new sessions on their next use. Test fixtures call this between
    tests; programs rarely need it (exit closes them)."""
    with _sessions_lock:
        sessions = list(_sessions.values())
    for s in sessions:
        s.close()


def configure(
    *, ttl: float | None = None, stall_after: float | None = None, heartbeat: str | None = None
) -> None:
    """Defaults for the sessions this process opens from now on (``PROCSYNC_TTL`` is
    the environment's way to say the same)."""
    if ttl is not None:
        _session_defaults["ttl"] = check_ttl(ttl)
    if stall_after is not None:
        _session_defaults["stall_after"] = check_ttl(stall_after)
    if heartbeat is not None:
        if heartbeat not in HEARTBEAT_MODES:
            raise ValueError(f"heartbeat must be 'thread' or 'process', got {heartbeat!r}")
        _session_defaults["heartbeat"] = heartbeat


def current_session(url: str | None = None, namespace: str | None = None) -> Session:
    """The session this process uses for ``url``/``namespace`` (opened if needed)."""
    return session_for(get_backend(url, namespace))


# -- same-host death watcher -------------------------------------------------------


class PidWatcher:
    """One daemon thread per process that learns, within milliseconds, when a watched
    process on this host exits (Linux pidfds; a 50 ms check elsewhere), and then
    reaps its sessions on the server, which hands their holds to the next waiters."""

    POLL_FALLBACK_MS = 50
    MAX_WATCHED = 1000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._poll = select.poll()
        self._by_fd: dict[int, tuple[int, int]] = {}
        self._targets: dict[tuple[int, int], dict[str, tuple[Backend, HolderInfo]]] = {}
        self._fds: dict[tuple[int, int], int] = {}
        self._unwatchable: set[tuple[int, int]] = set()
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wake_r, self._wake_w = r, w
        self._poll.register(r, select.POLLIN)
        self._thread: threading.Thread | None = None

    def watch(self, pid: int, start: int, target: tuple[Backend, HolderInfo]) -> None:
        """Reap ``target`` (backend, holder) when process (pid, start) is gone."""
        key = (pid, start)
        with self._lock:
            known = key in self._targets
            if not known and len(self._targets) >= self.MAX_WATCHED:
                return  # the ttl still catches it
            self._targets.setdefault(key, {})[f"{id(target[0])}:{target[1].sid}"] = target
            if known:
                return
            fd = -1
            pidfd_open = getattr(os, "pidfd_open", None)
            if pidfd_open is not None:
                try:
                    fd = pidfd_open(pid)
                except ProcessLookupError:
                    fd = -1
                except OSError:
                    fd = -1
                if fd >= 0 and not pid_alive(pid, start):
                    # The pid was reused between the caller's check and pidfd_open: this
                    # pidfd is another process's. The 50 ms check reaps the one we meant.
                    os.close(fd)
                    fd = -1
            if fd >= 0:
                self._fds[key] = fd
                self._by_fd[fd] = key
                self._poll.register(fd, select.POLLIN)
            else:
                self._unwatchable.add(key)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="procsync-pidwatch", daemon=True
                )
                self._thread.start()
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def watching(self, pid: int, start: int) -> bool:
        """True if process (pid, start) is watched through a pidfd that has not been
        handled as ended: it is alive, known without reading /proc (its end makes the
        pidfd readable, and the watcher thread then reaps it)."""
        return (pid, start) in self._fds

    def _run(self) -> None:
        while True:
            timeout = self.POLL_FALLBACK_MS if self._unwatchable else None
            try:
                events = self._poll.poll(timeout)
            except InterruptedError:  # pragma: no cover
                continue
            dead: list[tuple[int, int]] = []
            for fd, _ in events:
                if fd == self._wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                key = self._by_fd.get(fd)
                if key is not None:
                    dead.append(key)
            with self._lock:
                for key in list(self._unwatchable):
                    if not pid_alive(*key):
                        dead.append(key)
                # A pidfd only says the pid ended; also catch a reused pid.
                for key in list(self._fds):
                    if key not in dead and not pid_alive(*key):
                        dead.append(key)
                batches = []
                for key in dead:
                    fd = self._fds.pop(key, -1)
                    if fd >= 0:
                        self._by_fd.pop(fd, None)
                        with contextlib.suppress(KeyError, ValueError):
                            self._poll.unregister(fd)
                        os.close(fd)
                    self._unwatchable.discard(key)
                    batches.append(list(self._targets.pop(key, {}).values()))
            for targets in batches:
                for backend, holder in targets:
                    try:
                        reap_dead(backend, holder)
                    except Exception:
                        log.warning("could not reap dead session %s", holder.sid, exc_info=True)


def watch_session_process(backend: Backend, ident: HolderInfo) -> None:
    """End the session ``ident`` (a process of this host) the moment its process exits.

    The registry's readers use it for the sessions of their host that nobody waits
    on; the session is ended only if its recorded identity still matches."""
    _watcher().watch(ident.pid, ident.start_ticks, (backend, ident))


_watcher_instance: PidWatcher | None = None
_watcher_lock = threading.Lock()


def _watcher() -> PidWatcher:
    global _watcher_instance
    w = _watcher_instance
    if w is None:
        with _watcher_lock:
            if _watcher_instance is None:
                _watcher_instance = PidWatcher()
            w = _watcher_instance
    return w


def _after_fork_in_child() -> None:
    global _opening_lock, _sessions_lock, _watcher_instance, _watcher_lock
    # The child owns nothing of its parent's: sessions, heartbeat, watcher all start over.
    _sessions_lock = threading.Lock()
    _opening_lock = threading.Lock()
    _watcher_lock = threading.Lock()
    for s in _sessions.values():
        s._closed = True  # never close or renew the parent's session from here
        if s._hb_proc is not None:
            s._hb_proc.forget_after_fork()
    _sessions.clear()
    _watcher_instance = None


os.register_at_fork(after_in_child=_after_fork_in_child)
_ = weakref  # weak references are used through __weakref__ slots
