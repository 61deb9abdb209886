"""Who this process is, in terms another process on the same host can check.

A pid alone is not an identity: pids are reused. A process is identified by
(boot id, pid, start time in clock ticks since boot), all read from ``/proc``
on Linux. Two processes with the same boot id are on the same running kernel,
so one can tell for certain whether the other is still alive.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

__all__ = ["Identity", "boot_id", "current_identity", "pid_alive", "process_start_ticks"]


@dataclass(frozen=True, slots=True)
class Identity:
    """Host, kernel boot, pid and start time of one process."""

    host: str
    boot_id: str
    pid: int
    start_ticks: int


_BOOT_ID: str | None = None


def boot_id() -> str:
    """Where pids mean the same thing: the kernel's boot id plus this process's pid
    namespace (containers on one kernel share the boot id but not pid numbers), or a
    random stand-in where ``/proc`` is missing (no peer ever matches it)."""
    global _BOOT_ID
    if _BOOT_ID is None:
        try:
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
                boot = f.read().strip()
            try:
                pidns = os.readlink("/proc/self/ns/pid")  # e.g. "pid:[4026531836]"
            except OSError:
                pidns = "pid:?"
            _BOOT_ID = f"{boot}/{pidns}"
        except OSError:
            # No /proc: same-host fast recovery is off (a stand-in never matches a peer's
            # real boot id by accident, and two hosts without /proc share nothing).
            _BOOT_ID = "nobootid-" + uuid.uuid4().hex
    return _BOOT_ID


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it does not exist.

    A zombie counts as gone: it will never release anything again.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2 :].split()
    if not rest or rest[0] in (b"Z", b"X"):
        return None
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, start_ticks: int) -> bool:
    """Is the process ``pid`` that started at ``start_ticks`` still running?"""
    if start_ticks == 0:
        # Identity unknown (no /proc): fall back to the pid alone.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return process_start_ticks(pid) == start_ticks


def current_identity() -> Identity:
    """The identity of the calling process (computed afresh: fork changes it)."""
    pid = os.getpid()
    return Identity(
        host=socket.gethostname(),
        boot_id=boot_id(),
        pid=pid,
        start_ticks=process_start_ticks(pid) or 0,
    )
