"""The exceptions procsync raises.

One library root, :class:`ProcsyncError`. Where ``threading`` or ``multiprocessing``
already raise something for the same misuse, procsync's class also inherits that
standard exception, so code written for the standard library keeps catching it::

    ProcsyncError
    ├── NotHeldError(RuntimeError, ValueError)     release() of a lock/condition not held
    │   └── NotOwnerError                          ... held, but by another process or thread
    ├── OverReleaseError(ValueError)               BoundedSemaphore released above its value
    ├── BrokenBarrierError(threading.BrokenBarrierError)
    ├── ConflictError(ValueError)                  same name and kind, another value / parties
    ├── LockLostError                              a hold ended without release (ttl passed,
    │                                              server lost its state, operator forced it)
    ├── SessionLostError                           the process's session ended under it
    └── ServerError                                infrastructure
        ├── ServerUnavailableError(ConnectionError)  cannot reach the server (names the URL)
        ├── ServerUnsupportedError                 too old, or an eviction policy that loses locks
        ├── WrongTypeError(TypeError)              a key of ours holds something else
        │   └── CorruptStateError                  ... our kind of key, with fields procsync
        │                                          never writes (edited by hand?)
        ├── ProtocolError                          a reply procsync cannot understand
        └── EmbeddedServerError                    the embedded server cannot be started
            └── NoServerBinaryError                no valkey-server / redis-server found

Misuse is never signalled with ``assert``: the checks stay under ``python -O``.
"""

from __future__ import annotations

import threading

__all__ = [
    "BrokenBarrierError",
    "ConflictError",
    "CorruptStateError",
    "EmbeddedServerError",
    "LockLostError",
    "NoServerBinaryError",
    "NotHeldError",
    "NotOwnerError",
    "OverReleaseError",
    "ProcsyncError",
    "ProtocolError",
    "ServerError",
    "ServerUnavailableError",
    "ServerUnsupportedError",
    "SessionLostError",
    "WrongTypeError",
]


class ProcsyncError(Exception):
    """Root of every exception procsync raises on its own account."""


class NotHeldError(ProcsyncError, RuntimeError, ValueError):
    """``release()`` of a primitive this process does not hold.

    ``threading.Lock`` raises ``RuntimeError`` here and ``multiprocessing.Lock``
    raises ``ValueError``; this class is both, so either ``except`` keeps working.
    """


class NotOwnerError(NotHeldError):
    """The primitive is held, but by another process (or, for RLock, another thread)."""


class OverReleaseError(ProcsyncError, ValueError):
    """A ``BoundedSemaphore`` was released more times than it was acquired."""


class BrokenBarrierError(ProcsyncError, threading.BrokenBarrierError):
    """The barrier is broken: reset, aborted, timed out, or a waiting party died."""


class ConflictError(ProcsyncError, ValueError):
    """A name is already in use by a primitive of the same kind but another shape.

    For example ``Semaphore(3, name="x")`` while ``x`` is in use as ``Semaphore(5)``,
    ``Barrier(4, name="b")`` while ``b`` has 3 parties, or ``Value("i", name="v")``
    while ``v`` holds a float. Each kind has its own names (``Lock("x")`` and
    ``Event("x")`` are two primitives, as two files in two folders), except that
    ``Lock`` and ``RLock`` of one name are the same lock.
    """


class LockLostError(ProcsyncError):
    """A hold ended without ``release()``.

    Raised by ``release()`` (and by fenced use) when the holder's lease ran out
    (process paused past its ttl, server unreachable for a ttl, server restarted
    with its data lost, or an operator forced the release). Another process may
    have been granted the primitive since; only the fencing token tells a
    resource which writer is current.
    """


class SessionLostError(ProcsyncError):
    """The process's session ended on the server while it was being used."""


class ServerError(ProcsyncError):
    """The server, or the way to it, failed."""


class ServerUnavailableError(ServerError, ConnectionError):
    """The server cannot be reached. The message names the URL (never a password)."""


class ServerUnsupportedError(ServerError):
    """The server is too old, or is configured in a way that would lose locks."""


class WrongTypeError(ServerError, TypeError):
    """A key procsync owns holds a value of another type; it was left untouched."""


class CorruptStateError(WrongTypeError):
    """A procsync key holds fields or values procsync never writes.

    For example a lock's state hash without its permit count, or with a negative or
    non-numeric one, or a fencing counter that can count no further: written by hand
    or by another program. The message names the key and what is wrong with it; the
    operation changed nothing. Delete the key (a primitive's state key: its holders
    and waiters are then forgotten) or restore the value, after finding out what
    wrote it.
    """


class ProtocolError(ServerError):
    """The server sent a reply procsync does not understand."""


class EmbeddedServerError(ServerError):
    """The embedded server could not be started or reached."""


class NoServerBinaryError(EmbeddedServerError):
    """No server binary was found for the embedded server.

    The message says where procsync looked and names ``PROCSYNC_URL`` as the way
    to use an existing Redis or Valkey instead.
    """
