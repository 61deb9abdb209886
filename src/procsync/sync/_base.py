"""What every public primitive shares, sync or asyncio: its name, where it lives,
pickling, and the local record of what this process holds."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from procsync import _drivers
from procsync._config import env_namespace, env_url
from procsync._validate import check_name, check_namespace
from procsync.backend.client import Backend, get_backend
from procsync.core import permits
from procsync.core.steps import HolderInfo, Op, SessionGone
from procsync.errors import ProtocolError, ServerUnavailableError
from procsync.session import Session, usable_session

__all__ = ["HoldRecord", "Holder", "Primitive", "rebuild"]

log = logging.getLogger("procsync.primitives")


class AcquireOp(Protocol):
    """An acquire operation: run in a session, optionally resumed from a first call
    already made (its waiter id, and its reply or None if none came)."""

    def __call__(self, sess: Session, resume: tuple[str, list[Any] | None] | None = None) -> Op: ...


#: How long the set flag of an anonymous Event lives after its last set().
ANON_KEEP_MS = 24 * 3600 * 1000


@dataclass(frozen=True, slots=True)
class Holder:
    """A process holding (part of) a primitive, as ``owner()`` / ``holders()`` report it."""

    session_id: str
    host: str
    pid: int
    permits: int
    lease_deadline: float
    """Server time (Unix seconds) at which the holder's session lease ends unless renewed."""

    @classmethod
    def from_info(cls, h: HolderInfo) -> Holder:
        return cls(h.sid, h.host, h.pid, h.permits, h.deadline_ms / 1000.0)


def rebuild(
    cls: type[Primitive], args: tuple[Any, ...], kwargs: dict[str, Any], anonymous: bool = False
) -> Primitive:
    """Unpickle a primitive: open the same name on the same server (an anonymous one
    stays anonymous: its state still expires)."""
    obj = cls(*args, **kwargs)
    obj._anonymous = anonymous
    return obj


class Primitive:
    """Base of every named primitive: ``name``, server, namespace, pickling."""

    __slots__ = ("__weakref__", "_anonymous", "_backend", "_name", "_namespace", "_url")

    _kind_label: ClassVar[str] = "primitive"

    def __init__(self, name: str | None, url: str | None, namespace: str | None) -> None:
        if url is not None and not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        self._anonymous = name is None
        self._name = check_name(name) if name is not None else f"anon-{secrets.token_hex(10)}"
        self._url = url
        self._namespace = check_namespace(namespace) if namespace is not None else None
        self._backend: Backend | None = None

    @property
    def name(self) -> str:
        """The name every process uses to open this primitive."""
        return self._name

    @property
    def backend(self) -> Backend:
        """The server connection (resolved on first use: constructing never connects)."""
        b = self._backend
        if b is None:
            b = self._backend = get_backend(self._url, self._namespace)
        return b

    async def _abackend(self) -> Backend:
        """Async twin of :attr:`backend`: resolving it may start the embedded server,
        so on an event loop that runs in a worker thread."""
        b = self._backend
        if b is None:
            b = await asyncio.to_thread(get_backend, self._url, self._namespace)
            self._backend = b
        return b

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return (), {"name": self._name}

    def __reduce__(self) -> tuple[Any, ...]:
        args, kwargs = self._ctor()
        # The server as resolved here: a child whose environment differs (a forkserver
        # started earlier, another PROCSYNC_URL) must still meet the same primitive.
        # None stays None only for the embedded server, which is per user anyway.
        url = self._backend.url if self._backend is not None else (self._url or env_url())
        namespace = self._namespace if self._namespace is not None else env_namespace()
        kwargs = dict(kwargs, url=url, namespace=namespace)
        return (rebuild, (type(self), args, kwargs, self._anonymous))

    def _where(self) -> str:
        return "" if self._backend is None else f" at {self._backend.safe_url}"


class HoldRecord:
    """This process's record of its holds on one primitive (thread-safe).

    A hold is tied to the session it was granted in. It is *lost* when that session
    is: the heartbeat fires ``_hold_lost`` and the registered callbacks.
    """

    __slots__ = (
        "_callbacks",
        "_count",
        "_lock",
        "_lost_reason",
        "_owner",
        "_pid",
        "session",
        "token",
        "wid",
    )

    def __init__(self, owner: Any) -> None:
        self._lock = threading.Lock()
        self._owner = owner
        self.session: Session | None = None
        self.token: int | None = None
        self.wid = ""  # the waiter id of the latest grant: what a lock's release names
        self._count = 0
        self._lost_reason: str | None = None
        self._callbacks: list[Callable[[Any, str], None]] = []
        self._pid = os.getpid()

    def _forked(self) -> bool:
        if self._pid != os.getpid():
            # A forked child never owns its parent's holds.
            self._pid = os.getpid()
            self.session, self._count, self._lost_reason = None, 0, None
            return True
        return False

    @property
    def count(self) -> int:
        self._forked()
        return self._count

    def granted(self, session: Session, token: int, wid: str) -> None:
        self._forked()
        with self._lock:
            if self.session is not session:
                self._count = 0
            self.session = session
            self.token = token
            self.wid = wid
            self._count += 1
            self._lost_reason = None
        session.add_holder(self._owner)

    def released(self, n: int = 1) -> None:
        with self._lock:
            self._count = max(0, self._count - n)
            sess = self.session if self._count == 0 else None
        if sess is not None:
            sess.remove_holder(self._owner)

    def clear(self) -> None:
        with self._lock:
            sess, self.session, self._count = self.session, None, 0
        if sess is not None:
            sess.remove_holder(self._owner)

    def lost(self) -> str | None:
        """Why the current hold was lost, or None (also None when nothing is held)."""
        if self._forked() or self._count == 0:
            return self._lost_reason
        if self._lost_reason is not None:
            return self._lost_reason
        sess = self.session
        if sess is not None and sess.lost:
            return sess.lost_reason or "session lost"
        return None

    def mark_lost(self, reason: str) -> None:
        with self._lock:
            if self._count == 0:
                return
            self._lost_reason = reason
            callbacks = list(self._callbacks)
        for cb in callbacks:
            try:
                cb(self._owner, reason)
            except Exception:
                log.exception("on_lost callback of %r failed", self._owner)

    def on_lost(self, callback: Callable[[Any, str], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)


class PermitHolder(Primitive):
    """A primitive whose grants are held (Lock, RLock, Semaphore, BoundedSemaphore),
    on either front: its server state, this process's hold record, and the acquire
    operation both fronts drive."""

    __slots__ = ("_hold", "_initial", "_ref")

    _kind: ClassVar[str] = "lock"

    def __init__(
        self, name: str | None, url: str | None, namespace: str | None, initial: int
    ) -> None:
        super().__init__(name, url, namespace)
        self._initial = initial
        self._hold = HoldRecord(self)
        self._ref: permits.PermitsRef | None = None

    @property
    def ref(self) -> permits.PermitsRef:
        r = self._ref
        if r is None:
            r = self._ref = permits.PermitsRef(self.backend, self._kind, self._name, self._initial)
        return r

    def _acquire_op(self, blocking: bool, timeout: float | None) -> AcquireOp:
        """The acquire operation (both fronts): take a grant, record the hold.

        The deadline starts now. ``resume`` continues from a first call already made
        (see :meth:`_server_acquire`). A grant that arrives in a session lost
        meanwhile is not taken: the operation starts again in a new session (the
        lost one's holds end with it)."""
        ref = self.ref
        deadline = None if timeout is None else time.monotonic() + timeout

        def op(sess: Session, resume: tuple[str, list[Any] | None] | None = None) -> Op:
            if resume is None:
                wid, reply = sess.new_waiter_id(), None
            else:
                wid, reply = resume
            token = yield from permits.acquire(
                ref, sess, wid, blocking, deadline, time.monotonic, reply
            )
            if token is None:
                return False
            if sess.lost:
                raise SessionGone()
            self._hold.granted(sess, token, wid)
            return True

        return op

    def _budget(self, blocking: bool, timeout: float | None) -> Any:
        """How long an acquire rides out server faults: its own timeout, forever
        without one, the default for a non-blocking try."""
        if not blocking:
            return _drivers.DEFAULT
        return _drivers.FOREVER if timeout is None else time.monotonic() + timeout

    def _server_acquire(self, blocking: bool, timeout: float | None) -> bool:
        """Blocking-front acquire. When this process already has a usable session, the
        first script call is made directly — no generator, no driver: a grant (the
        uncontended case) is recorded at once, any other reply is handed to the general
        operation, which goes on from it (queueing, reaping, timeouts, interrupts,
        faults: a first call that failed is sent again by it, unchanged)."""
        until = self._budget(blocking, timeout)
        make = self._acquire_op(blocking, timeout)
        ref = self.ref
        b = ref.backend
        sess = usable_session(b)
        if sess is not None:
            deadline = _drivers.deadline_of(until)
            if sess.pending:  # a release not yet confirmed goes first: never queue behind it
                sess.settle(deadline)
            wid, call = permits.first_call(ref, sess, blocking)
            reply: list[Any] | None
            try:
                t = None if deadline is None else deadline - time.monotonic()
                reply = b.call(call.script, call.keys, call.args, t)
            except (ServerUnavailableError, ProtocolError):
                reply = None  # it may have run: sent again, it answers the same
            if reply is not None and reply[0] == "ok":
                self._hold.granted(sess, permits.parse_token(reply[1]), wid)
                return True
            if reply is None or reply[0] != "nosession":
                try:
                    return bool(
                        _drivers.run(b, make(sess, (wid, reply)), until=until, session=sess)
                    )
                except SessionGone:
                    pass
            sess.lose("the server no longer knows this session")
        ok, _ = _drivers.run_with_session(b, make, until=until)
        return bool(ok)

    @property
    def token(self) -> int | None:
        """Fencing token of this process's latest grant: strictly increasing per
        primitive, also across server restarts. Pass it to the resource you protect
        and let it refuse writes whose token is older than one it has seen."""
        return self._hold.token

    @property
    def lost(self) -> bool:
        """True if this process held it and the hold ended without release()."""
        return self._hold.lost() is not None

    def on_lost(self, callback: Callable[[Any, str], None]) -> None:
        """Call ``callback(primitive, reason)`` (from the heartbeat thread) if a hold
        is lost."""
        self._hold.on_lost(callback)

    def _hold_lost(self, reason: str) -> None:
        self._hold.mark_lost(reason)

    def _hold_key(self) -> str:
        return self.ref.key

    def _release_session(self) -> Session | None:
        """The session a release runs in: the hold's, else the process's own (a
        release by a process holding nothing)."""
        hold = self._hold
        return hold.session if hold.count > 0 else usable_session(self.ref.backend)
