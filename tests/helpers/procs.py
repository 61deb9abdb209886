"""Child processes for tests: ``python -c`` scripts talking line by line.

A :class:`Child` is an unrelated program (it shares nothing with the test but the
server URL in its environment). The test drives it through its stdin and reads
what it says on stdout, one line at a time, with a bound on every wait. Every
script starts with :data:`PRELUDE`, which gives it ``say()`` (print a line and
flush) and ``hear()`` (read a line; exit at once when the test has gone away), so
no child outlives its test.

Only the pids started here are ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from typing import IO, Any, TypeVar

__all__ = [
    "PRELUDE",
    "Child",
    "ChildFactory",
    "InThread",
    "blocked_clients",
    "short_lease_for_children",
    "wait_blocked",
    "wait_until",
]

T = TypeVar("T")

PRELUDE = """\
import os, sys, threading, time
import procsync
from procsync import *
from procsync.errors import *

def say(*parts):
    print(*parts, flush=True)

def hear():
    line = sys.stdin.readline()
    if not line:          # the test went away: never outlive it
        os._exit(3)
    return line.strip()
"""


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` (a cheap check of server or process state) until it returns
    something true, at most ``timeout`` seconds; return that value or fail.

    For conditions nothing signals (a waiter is queued on the server); where a pipe
    or an event exists, wait on it instead.
    """
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class Child:
    """One ``python -c`` script started by the test."""

    def __init__(self, code: str, env: Mapping[str, str], name: str = "child") -> None:
        self.name = name
        # closed in close(): the child's stderr, shown when it misbehaves
        self._err: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self._buf = b""
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=dict(env),
        )
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def _fail(self, why: str) -> AssertionError:
        return AssertionError(
            f"{self.name} (pid {self.pid}): {why}; exit status {self.proc.poll()}\n"
            f"--- stderr ---\n{self.stderr()[-3000:]}"
        )

    def readline(self, timeout: float = 15.0) -> str:
        """The next line the child prints (without the newline)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"said nothing within {timeout:g}s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise self._fail(f"exited before saying a line (buffered: {self._buf!r})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def expect(self, word: str, timeout: float = 15.0) -> list[str]:
        """Read one line; it must start with ``word``. Returns the rest, split."""
        line = self.readline(timeout)
        parts = line.split()
        if not parts or parts[0] != word:
            raise self._fail(f"said {line!r}, expected {word!r} ...")
        return parts[1:]

    def send(self, line: str = "go") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL the child and reap it (bounded)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def cont(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def wait(self, timeout: float = 15.0) -> int:
        """Wait (bounded) for the child to exit; return its status."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"did not exit within {timeout:g}s") from None

    def close(self) -> None:
        """Make sure the child is gone: SIGCONT (if stopped), SIGKILL, reap."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)
            self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._err.close()


class ChildFactory:
    """Starts :class:`Child` processes with the test's environment; closes them all."""

    def __init__(self, env: Callable[[], Mapping[str, str]]) -> None:
        self._env = env
        self.children: list[Child] = []

    def __call__(self, code: str, name: str | None = None, **env: str) -> Child:
        full = dict(self._env())
        full.update(env)
        c = Child(code, full, name or f"child{len(self.children)}")
        self.children.append(c)
        return c

    def close(self) -> None:
        for c in self.children:
            c.close()
        self.children.clear()


class InThread:
    """Run ``fn()`` in a thread; keep its result (or exception) and when it returned."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.done_at: float | None = None
        self._fn = fn
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.result = self._fn()
        except BaseException as exc:
            self.error = exc
        self.done_at = time.monotonic()

    def join(self, timeout: float = 30.0) -> object:
        """Wait (bounded) for ``fn`` to return; re-raise its exception; return its result."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"still running after {timeout:g}s")
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def running(self) -> bool:
        return self._thread.is_alive()


def blocked_clients(r: Any) -> int:
    """How many connections of the server are blocked in a pop right now (a waiter
    that reached its inbox: it has looked at the holders and watches them)."""
    return sum(1 for c in r.client_list() if "b" in str(c.get("flags", "")))


def wait_blocked(r: Any, n: int, timeout: float = 10.0) -> None:
    """Wait until at least ``n`` connections are blocked in a pop."""
    wait_until(lambda: blocked_clients(r) >= n, timeout, what=f"{n} blocked waiter(s)")


def short_lease_for_children(monkeypatch: Any, ttl: str = "1") -> None:
    """Children started from now on get a ``ttl`` lease (``PROCSYNC_TTL``); this
    process opens its session first with a long one, so its own heartbeat never reaps
    a paused child while the test is looking (the test decides who sees it expire)."""
    import procsync

    procsync.Session(ttl=30)
    monkeypatch.setenv("PROCSYNC_TTL", ttl)
