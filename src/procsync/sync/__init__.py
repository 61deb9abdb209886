"""The blocking (threading-style) front of procsync's primitives."""

from procsync.sync.barrier import Barrier
from procsync.sync.condition import Condition
from procsync.sync.event import Event
from procsync.sync.lock import Lock, LockStatistics, RLock
from procsync.sync.semaphore import BoundedSemaphore, Semaphore, SemaphoreStatistics
from procsync.sync.value import Value

__all__ = [
    "Barrier",
    "BoundedSemaphore",
    "Condition",
    "Event",
    "Lock",
    "LockStatistics",
    "RLock",
    "Semaphore",
    "SemaphoreStatistics",
    "Value",
]
