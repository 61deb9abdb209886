"""The heartbeat daemon process of ``Session(heartbeat="process")`` (the notes' 守护进程).

A heartbeat *thread* cannot renew its session while the main thread is stuck in C
code that holds the GIL (a C extension that forgot ``Py_BEGIN_ALLOW_THREADS``, a
ctypes ``PyDLL`` call): the lease runs out and every hold is lost although the
process is fine. A heartbeat *process* has its own interpreter, so it keeps beating.
It beats while its parent lives and ends when the parent dies; as it is the first
to know, it then ends the parent's session at once (event ``died``), so a crashed
process that had a heartbeat process is reported within milliseconds, on any host.

The session starts it as ``python -c "...main()" STATUS_FD procsync-heartbeat-of-PID``
(the last word names it in ``ps``). Protocol, parent
(the session's process) and child (this process):

* **stdin**, parent -> child: one JSON line of configuration (it holds the server
  URL, which must not appear in ``/proc/<pid>/cmdline``), later ``stop`` when the
  parent closes the session (the parent ends the session on the server itself).
* **stdout**, child -> parent: one byte whenever the status changes in a way the
  parent must hear of promptly: ``r`` the first renewal is confirmed, ``l`` the
  session is lost. The parent's monitor thread sleeps on this pipe.
* **status memory**: a shared mapping (memfd) written by the child after every
  confirmed renewal, read by the parent without a system call — even while the
  parent's own threads cannot run — see :class:`StatusBlock`.

How the child learns that its parent died (Linux): ``PR_SET_PDEATHSIG`` (SIGTERM,
set through ctypes) and a pidfd of the parent that ``poll`` reports readable when the
parent exits; elsewhere it checks ``getppid()`` every 100 ms. The pipe is not the
test of life: a child the parent forked holds a copy of its write end.
PR_SET_PDEATHSIG fires when the *thread* that started the child ends, so a SIGTERM
only makes the child look: it ends only if the parent (pid and start time) is gone.

The child ignores SIGINT and SIGHUP: Ctrl-C in a terminal goes to the whole process
group, and the parent decides what Ctrl-C means.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

__all__ = ["STATUS_SIZE", "HeartbeatProcess", "Status", "StatusBlock", "main"]

log = logging.getLogger("procsync.heartbeat")

#: Bytes of the shared status mapping.
STATUS_SIZE: Final = 4096

_SEQ = struct.Struct("<Q")
_BODY = struct.Struct("<dQ")  # sent (CLOCK_MONOTONIC seconds), status


class Status:
    """Values of the status word."""

    STARTING: Final = 0
    RUNNING: Final = 1
    UNKNOWN: Final = 2
    """The server no longer knows the session (lease ran out, server lost its data,
    or an operator forced it)."""
    NO_CONFIRM: Final = 3
    """No renewal confirmed for a whole ttl (server unreachable or too slow)."""
    STOPPED: Final = 4


class StatusBlock:
    """The last confirmed renewal, shared between the heartbeat process (writer) and
    its parent (reader) through a memory mapping.

    A seqlock: the writer makes the sequence odd, writes, makes it even; a reader
    retries while it is odd or changed under it. ``sent`` is the CLOCK_MONOTONIC time
    (system-wide on Linux, so comparable across processes) at which the confirmed
    renewal was *sent*: the parent counts its lease from there (Chubby's jeopardy).
    """

    __slots__ = ("_mm", "_seq")

    def __init__(self, fd: int) -> None:
        self._mm = mmap.mmap(fd, STATUS_SIZE)
        self._seq = _SEQ.unpack_from(self._mm, 0)[0] & ~1

    def write(self, sent: float, status: int) -> None:
        mm = self._mm
        self._seq += 1
        _SEQ.pack_into(mm, 0, self._seq)
        _BODY.pack_into(mm, _SEQ.size, sent, status)
        self._seq += 1
        _SEQ.pack_into(mm, 0, self._seq)

    def read(self) -> tuple[float, int]:
        """(sent, status) of the last confirmed renewal."""
        mm = self._mm
        for _ in range(10_000):  # the writer holds the odd state for a few stores
            s1 = _SEQ.unpack_from(mm, 0)[0]
            if s1 & 1:
                continue
            sent, status = _BODY.unpack_from(mm, _SEQ.size)
            if _SEQ.unpack_from(mm, 0)[0] == s1:
                return float(sent), int(status)
        return 0.0, Status.STARTING  # pragma: no cover - a writer stopped mid-write

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._mm.close()


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send ``sig`` when the parent (thread) ends; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return int(libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0)) == 0
    except (OSError, AttributeError):  # pragma: no cover - no prctl
        return False


class _Child:
    """The heartbeat loop of one session."""

    def __init__(self, cfg: dict[str, Any], status: StatusBlock, backlog: bytes) -> None:
        from procsync._identity import pid_alive
        from procsync.backend.client import Backend

        self.cfg = cfg
        self.status = status
        self.backend = Backend(str(cfg["url"]), str(cfg["namespace"]))
        self.sid = str(cfg["sid"])
        self.ttl = float(cfg["ttl"])
        self.parent = int(cfg["parent_pid"])
        self.parent_start = int(cfg["parent_start"])
        self.deadline = float(cfg["opened"]) + self.ttl
        self._pid_alive = pid_alive
        self._cmd = backlog

    # -- the parent ----------------------------------------------------------------

    def parent_alive(self) -> bool:
        if os.getppid() != self.parent:
            return False
        return self._pid_alive(self.parent, self.parent_start)

    def end_for_dead_parent(self) -> None:
        """The parent is gone: end its session now (identity-checked on the server)."""
        from procsync.errors import ServerError

        b = self.backend
        try:
            b.call(
                "session",
                [b.sessions_key, b.gone_key],
                [
                    b.prefix,
                    "reap",
                    self.sid,
                    str(self.cfg["boot_id"]),
                    self.parent,
                    self.parent_start,
                ],
            )
        except ServerError as exc:
            log.warning("could not report the death of pid %d: %s", self.parent, exc)

    # -- renewals ---------------------------------------------------------------------

    def beat(self) -> float | None:
        """Renew once. Returns when to renew next (monotonic), or None to stop."""
        from procsync.errors import ServerError
        from procsync.session import beat_args

        b = self.backend
        period = self.ttl / 3.0
        sent = time.monotonic()
        try:
            keys = [b.sessions_key, b.gone_key]
            # Bounded by the client-side deadline: the loss is reported at the deadline.
            left = max(0.001, self.deadline - sent)
            reply = b.call("session", keys, beat_args(b, self.sid, self.ttl), left)
        except ServerError as exc:
            if time.monotonic() >= self.deadline:
                log.warning("no renewal confirmed for a whole ttl (%gs): %s", self.ttl, exc)
                self.report(sent, Status.NO_CONFIRM)
                return None
            return time.monotonic() + max(0.05, min(period, (self.deadline - time.monotonic()) / 4))
        if reply[0] == "unknown":
            self.report(sent, Status.UNKNOWN)
            return None
        if time.monotonic() >= sent + self.ttl:
            self.report(sent, Status.NO_CONFIRM)
            return None
        first = self.status.read()[1] == Status.STARTING
        self.deadline = sent + self.ttl
        self.status.write(sent, Status.RUNNING)
        if first:
            self.wake(b"r")
        return sent + period

    def report(self, sent: float, status: int) -> None:
        self.status.write(sent, status)
        self.wake(b"l")

    @staticmethod
    def wake(code: bytes) -> None:
        with contextlib.suppress(OSError):
            os.write(1, code)

    # -- the loop ---------------------------------------------------------------------

    def commands(self) -> str | None:
        """Read what the parent wrote: 'stop', 'eof' or None (nothing complete yet)."""
        try:
            chunk = os.read(0, 4096)
        except BlockingIOError:
            return None
        if not chunk:
            return "eof"
        self._cmd += chunk
        if b"stop" in self._cmd:
            return "stop"
        return None

    def run(self) -> int:
        poller = select.poll()
        os.set_blocking(0, False)
        poller.register(0, select.POLLIN)
        sig_r, sig_w = os.pipe()
        os.set_blocking(sig_r, False)
        os.set_blocking(sig_w, False)
        signal.set_wakeup_fd(sig_w)
        signal.signal(signal.SIGTERM, lambda *_: None)
        poller.register(sig_r, select.POLLIN)
        pidfd = -1
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            with contextlib.suppress(OSError):
                pidfd = pidfd_open(self.parent)
        if pidfd >= 0:
            poller.register(pidfd, select.POLLIN)
        set_parent_death_signal(signal.SIGTERM)
        if not self.parent_alive():  # died before the death signal was armed
            self.end_for_dead_parent()
            return 0
        if self._cmd and b"stop" in self._cmd:
            return 0
        next_beat: float | None = time.monotonic()
        while next_beat is not None:
            left = next_beat - time.monotonic()
            if left > 0:
                # Without a pidfd, look at the parent every 100 ms.
                ms = left * 1000.0 if pidfd >= 0 else min(left * 1000.0, 100.0)
                events = poller.poll(max(1, int(ms)))
                for fd, _ in events:
                    if fd == sig_r:
                        with contextlib.suppress(BlockingIOError):
                            os.read(sig_r, 4096)
                    elif fd == 0:
                        what = self.commands()
                        if what == "stop":
                            self.status.write(self.status.read()[0], Status.STOPPED)
                            return 0
                        if what == "eof":
                            # The parent closed our pipe without "stop": it exec'd another
                            # program or closed every descriptor. Nobody will use this
                            # session again: end it now rather than at the ttl.
                            poller.unregister(0)
                            # A SIGKILLed parent's pipe closes a moment before its pid
                            # is gone: give the pid a little time before telling apart
                            # "died" from "dropped us while alive".
                            if pidfd >= 0:
                                select.select([pidfd], [], [], 0.2)
                            if self.parent_alive():
                                log.warning("the parent dropped its heartbeat; ending session")
                            self.end_for_dead_parent()
                            return 0
                if not self.parent_alive():
                    self.end_for_dead_parent()
                    return 0
                if time.monotonic() < next_beat:
                    continue
            next_beat = self.beat()
        return 0


# -- the parent's side -------------------------------------------------------------------


def _status_fd() -> int:
    """A descriptor of fresh shared memory for the status block (memfd on Linux)."""
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = int(memfd_create("procsync-heartbeat", 0))
    else:  # pragma: no cover - not Linux
        import tempfile

        with tempfile.TemporaryFile() as f:
            fd = os.dup(f.fileno())
    os.ftruncate(fd, STATUS_SIZE)
    return fd


def _child_env() -> dict[str, str]:
    """The environment of the child: ours, with procsync importable as it is here."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    old = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = root + (os.pathsep + old if old else "")
    return env


_REASONS: Final = {
    Status.UNKNOWN: (
        "the server no longer knows this session: its lease ran out, the server lost its "
        "data, or an operator forced it"
    ),
    Status.NO_CONFIRM: "the heartbeat process could not get a renewal confirmed within the ttl",
}


# Run through -c, not -m: importing the package already imports this module, and
# runpy would warn about executing it a second time as __main__.
_LAUNCH: Final = "import sys; from procsync._heartbeat_process import main; sys.exit(main())"


class HeartbeatProcess:
    """The parent's handle on its heartbeat process (started by the constructor).

    Only the pid it started is ever signalled, and only when ``stop`` finds it still
    running after it was told to stop.
    """

    __slots__ = ("_out", "proc", "status")

    def __init__(self, cfg: dict[str, Any]) -> None:
        if not sys.executable:
            raise RuntimeError("heartbeat='process' needs sys.executable to start a process")
        fd = _status_fd()
        try:
            self.status = StatusBlock(fd)
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCH, str(fd), f"procsync-heartbeat-of-{os.getpid()}"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(fd,),
                env=_child_env(),
            )
        finally:
            os.close(fd)
        if self.proc.stdin is None or self.proc.stdout is None:  # pragma: no cover - PIPE
            raise RuntimeError("internal: heartbeat process pipes missing")
        self._out = self.proc.stdout.fileno()
        self.proc.stdin.write(json.dumps(cfg).encode() + b"\n")
        self.proc.stdin.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def wake_fd(self) -> int:
        """Readable when the child has news (a status byte, or EOF when it ended)."""
        return self._out

    def read_wake(self) -> bytes:
        """The status bytes the child wrote (b"" once it has exited)."""
        try:
            return os.read(self._out, 64)
        except BlockingIOError:  # pragma: no cover - only called when readable
            return b"-"

    def confirmed(self) -> float | None:
        """Send time (monotonic) of the last confirmed renewal, or None before the first."""
        sent, status = self.status.read()
        return sent if status == Status.RUNNING else None

    def lost_reason(self) -> str | None:
        """Why the child stopped renewing, or None while it renews."""
        _, status = self.status.read()
        if status in _REASONS:
            return _REASONS[status]
        if status != Status.STOPPED and self.proc.poll() is not None:
            return f"the heartbeat process exited unexpectedly (status {self.proc.returncode})"
        return None

    def stop(self, timeout: float = 2.0) -> None:
        """Tell the child to stop and wait for it (bounded); the session is the caller's."""
        stdin = self.proc.stdin
        if stdin is not None:
            with contextlib.suppress(OSError, ValueError):
                stdin.write(b"stop\n")
                stdin.flush()
            with contextlib.suppress(OSError, ValueError):
                stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.stdout is not None:
            with contextlib.suppress(OSError):
                self.proc.stdout.close()

    def forget_after_fork(self) -> None:
        """In a forked child of the parent: drop the copies of the pipes, never signal."""
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError, ValueError):
                    f.close()
        self.proc.returncode = 0  # not our child: never wait for it


# -- the child's entry point ----------------------------------------------------------


def _read_config() -> tuple[dict[str, Any], bytes]:
    buf = b""
    while b"\n" not in buf:
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit(0)  # the parent went away before configuring us
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    cfg: dict[str, Any] = json.loads(line)
    return cfg, rest


def main(argv: list[str] | None = None) -> int:
    """Entry point of the heartbeat process: ``argv[0]`` is the status descriptor."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    logging.basicConfig(level=logging.WARNING, format="procsync heartbeat: %(message)s")
    status = StatusBlock(int(args[0]))
    cfg, rest = _read_config()
    return _Child(cfg, status, rest).run()
