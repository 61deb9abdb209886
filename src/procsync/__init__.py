"""procsync: multiprocessing's synchronization tools for any processes on any machine.

Map of the package (each layer uses only the ones below it)::

    procsync.sync / procsync.asyncio   public primitives (threading / asyncio signatures)
    procsync.registry                  liveness registry (报活): sessions, death events,
                                       primitives' holders and waiters; the CLI reads it
    procsync._drivers                  run core operations: blocking, or on an event loop;
                                       the one place faults are ridden out (retries,
                                       budgets, clean-ups kept for later)
    procsync.core                      each primitive's algorithm, no I/O (yields steps)
    procsync.session                   one session per process per server: heartbeat,
                                       lease, states (connected / suspended /
                                       reconnected / lost), same-host death watcher
    procsync._heartbeat_process        a session's heartbeat daemon process (optional)
    procsync.backend                   redis-py clients, server checks, Lua script registry,
                                       the embedded Valkey launcher
    procsync/lua/*.lua                 all shared state changes: one script per primitive

Everything shared lives in the server and changes only inside Lua scripts.
``from procsync import Lock, Semaphore, Event`` is the only line a program written
for ``multiprocessing`` has to change.
"""

from procsync.errors import (
    BrokenBarrierError,
    ConflictError,
    CorruptStateError,
    LockLostError,
    NoServerBinaryError,
    NotHeldError,
    NotOwnerError,
    OverReleaseError,
    ProcsyncError,
    ServerError,
    ServerUnavailableError,
    ServerUnsupportedError,
    SessionLostError,
    WrongTypeError,
)
from procsync.registry import (
    LivenessEvent,
    PrimitiveInfo,
    SessionInfo,
    asessions,
    awatch,
    describe,
    primitives,
    sessions,
    watch,
)
from procsync.session import Session, SessionState, current_session
from procsync.sync import (
    Barrier,
    BoundedSemaphore,
    Condition,
    Event,
    Lock,
    LockStatistics,
    RLock,
    Semaphore,
    SemaphoreStatistics,
    Value,
)

__version__ = "0.1.0"

__all__ = [
    "Barrier",
    "BoundedSemaphore",
    "BrokenBarrierError",
    "Condition",
    "ConflictError",
    "CorruptStateError",
    "Event",
    "LivenessEvent",
    "Lock",
    "LockLostError",
    "LockStatistics",
    "NoServerBinaryError",
    "NotHeldError",
    "NotOwnerError",
    "OverReleaseError",
    "PrimitiveInfo",
    "ProcsyncError",
    "RLock",
    "Semaphore",
    "SemaphoreStatistics",
    "ServerError",
    "ServerUnavailableError",
    "ServerUnsupportedError",
    "Session",
    "SessionInfo",
    "SessionLostError",
    "SessionState",
    "Value",
    "WrongTypeError",
    "__version__",
    "asessions",
    "awatch",
    "current_session",
    "describe",
    "primitives",
    "sessions",
    "watch",
]
