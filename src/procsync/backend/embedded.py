"""The per-user embedded server: zero set-up on one machine.

With no ``PROCSYNC_URL``, the first procsync process of a user starts a Valkey
server (see :mod:`procsync.backend.binary` for which binary) that every later
process of that user reuses. The server listens only on a Unix socket, binds no TCP
port, keeps nothing on disk, and outlives the process that started it; it shuts
itself down after a period with no clients.

The runtime directory (:func:`runtime_dir`)::

    $PROCSYNC_RUNTIME_DIR                    if set (tests point it at a temp dir)
    $XDG_RUNTIME_DIR/procsync/               else, when XDG_RUNTIME_DIR is set
    <tempfile.gettempdir()>/procsync-<uid>/  else

It is created with mode 0700 and must be owned by the current user and writable by
no one else; procsync refuses to use it otherwise. It holds::

    valkey.sock       the server's socket (mode 0700)     -> unix:///.../valkey.sock
    lock              flock(2) file serializing start, stop and idle shutdown
    supervisor.pid    pid of the supervisor process
    state.json        binary, idle timeout, server pid, start time
    supervisor.log    the supervisor's log, and the server's stderr
    server.log        the server's own log (level "warning")
    in-use            exists while a server runs that clients may hold leases on, and
                      after one that ended with clients connected (a crash, a stop)

Start protocol (:func:`ensure_running`). Under the directory's flock: PING the
socket; if something answers, use it. Otherwise start a *supervisor*
(``python -m procsync.backend.embedded supervise --dir D --idle-timeout S``) in a
new session, detached from the caller, which starts the server as its child and
reports over a pipe once the server answers PING (bounded by
:data:`STARTUP_TIMEOUT`). Twenty processes arriving at once thus start exactly one
server: the other nineteen wait for the lock and find it answering.

Idle shutdown. The supervisor samples ``INFO clients`` / ``INFO stats`` every few
seconds. The server is idle while no client other than the supervisor is connected
and no new connection has arrived since the previous sample; after ``idle_timeout``
seconds of that, the supervisor takes the flock, samples once more, and sends
``SHUTDOWN NOSAVE``. Because :func:`ensure_running` PINGs under the same lock and a
PING is a new connection, a caller that :func:`ensure_running` just answered gets at
least one full idle period to connect. Any procsync process keeps a connection open
(its session heartbeat), so the server stays up while one is alive.

Failure model. The server dies with its supervisor (``PR_SET_PDEATHSIG`` on Linux)
and the supervisor exits when its server does, so the two are never left apart for
long; a stale pid file is recognised by checking that the pid is a live supervisor
for this directory. All data is in memory only: a server that stops loses every
lock. A server started after one that ended idle (or the first) is marked born empty
(``procsync:born``), so procsync grants at once; one started after a server that
ended with clients connected (``in-use`` left behind) is not: procsync then grants
nothing until every lease from before could have run out (the quiet period of
``epoch.lua``), and holders of the old server learn they lost their holds first.
Processes are only ever signalled by the pid in this directory's pid file, after
checking it is the supervisor of this directory; nothing is found or killed by name.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import select
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from procsync.backend.binary import find_server_binary, server_argv
from procsync.errors import EmbeddedServerError

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "ENV_IDLE_TIMEOUT",
    "ENV_RUNTIME_DIR",
    "STARTUP_TIMEOUT",
    "EmbeddedStatus",
    "ensure_running",
    "main",
    "runtime_dir",
    "socket_path",
    "status",
    "stop",
]

log = logging.getLogger("procsync.server")

#: Overrides the runtime directory (the test suite sets it to a temporary directory).
ENV_RUNTIME_DIR: Final = "PROCSYNC_RUNTIME_DIR"
#: Seconds without clients after which the embedded server stops; 0 or "inf": never.
ENV_IDLE_TIMEOUT: Final = "PROCSYNC_IDLE_TIMEOUT"
DEFAULT_IDLE_TIMEOUT: Final = 600.0
#: Longest wait for a newly started server to answer PING.
STARTUP_TIMEOUT: Final = 10.0
#: Longest wait for the directory's flock (held only for a PING or a start).
LOCK_TIMEOUT: Final = 30.0
#: How long a supervisor whose server does not answer is given to exit on its own.
_HUNG_GRACE: Final = 5.0

SOCKET_NAME: Final = "valkey.sock"
_LOCK_NAME: Final = "lock"
_PID_NAME: Final = "supervisor.pid"
_STATE_NAME: Final = "state.json"
_SUPERVISOR_LOG: Final = "supervisor.log"
_SERVER_LOG: Final = "server.log"
_IN_USE: Final = "in-use"
_MODULE: Final = "procsync.backend.embedded"
_CLIENT_NAME: Final = "procsync-supervisor"


@final
@dataclass(frozen=True, slots=True)
class EmbeddedStatus:
    """What :func:`status` found in a runtime directory.

    When ``running`` is False, every field but ``url``, ``dir`` and
    ``supervisor_pid`` is None. ``connected_clients`` leaves out procsync's own
    bookkeeping connections (the supervisor's and the one that asked).
    ``idle_timeout_s`` is ``math.inf`` when idle shutdown is off.
    """

    running: bool
    url: str
    pid: int | None
    binary: str | None
    version: str | None
    uptime_s: float | None
    connected_clients: int | None
    idle_timeout_s: float | None
    dir: Path
    supervisor_pid: int | None = None


# -- paths ---------------------------------------------------------------------------


def runtime_dir(directory: Path | None = None) -> Path:
    """The absolute runtime directory of the embedded server (not created here).

    ``directory`` if given, else ``$PROCSYNC_RUNTIME_DIR``, else
    ``$XDG_RUNTIME_DIR/procsync``, else ``<tempfile.gettempdir()>/procsync-<uid>``.
    """
    if directory is not None:
        return Path(directory).expanduser().absolute()
    override = os.environ.get(ENV_RUNTIME_DIR, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    xdg = os.environ.get("XDG_RUNTIME_DIR", "").strip()
    if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
        return Path(xdg) / "procsync"
    return Path(tempfile.gettempdir()).absolute() / f"procsync-{os.getuid()}"


def socket_path(directory: Path | None = None) -> Path:
    """The absolute path of the embedded server's Unix socket."""
    return runtime_dir(directory) / SOCKET_NAME


def _url(sock: Path) -> str:
    return f"unix://{sock}"


def _idle_timeout(value: float | None) -> float:
    """Validate an idle timeout; None reads ``PROCSYNC_IDLE_TIMEOUT`` (default 600 s).

    Returns ``math.inf`` for "never" (given as 0 or infinity).
    """
    if value is None:
        raw = os.environ.get(ENV_IDLE_TIMEOUT, "").strip()
        if not raw:
            return DEFAULT_IDLE_TIMEOUT
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{ENV_IDLE_TIMEOUT}={raw!r} is not a number of seconds") from None
        source = f"{ENV_IDLE_TIMEOUT}={raw!r}"
    else:
        value = float(value)
        source = f"idle_timeout={value!r}"
    if math.isnan(value) or value < 0:
        raise ValueError(f"{source}: the idle timeout must be >= 0 seconds (0 means never)")
    return math.inf if value == 0 else value


# -- the directory and its lock ------------------------------------------------------


def _check_dir(d: Path) -> None:
    """Refuse a runtime directory that is not ours alone; tighten a readable one."""
    try:
        st = os.lstat(d)
    except FileNotFoundError:
        raise EmbeddedServerError(f"runtime directory {d} does not exist") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise EmbeddedServerError(f"runtime directory {d} is not a directory (or is a symlink)")
    if st.st_uid != os.getuid():
        raise EmbeddedServerError(
            f"runtime directory {d} is owned by uid {st.st_uid}, not by this user "
            f"(uid {os.getuid()}); refusing to use it. Set {ENV_RUNTIME_DIR} to a "
            "directory of your own, or PROCSYNC_URL to use an existing server."
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise EmbeddedServerError(
            f"runtime directory {d} has mode {mode:04o}: others can write to it; "
            "refusing to use it. Remove it, or chmod 700 it if you trust its contents."
        )
    if mode != 0o700:
        log.warning("runtime directory %s had mode %04o; setting 0700", d, mode)
        os.chmod(d, 0o700)


def _prepare_dir(d: Path) -> None:
    """Create ``d`` with mode 0700 (parents as needed) and check it is ours alone."""
    d.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    else:
        os.chmod(d, 0o700)  # mkdir's mode went through the umask
    _check_dir(d)


def _open_lock(d: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    return os.open(d / _LOCK_NAME, flags, 0o600)


@contextlib.contextmanager
def _dir_lock(d: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the directory's exclusive flock, waiting at most ``timeout`` seconds.

    The kernel drops the lock when its holder dies, so a crashed starter cannot
    wedge the directory.
    """
    fd = _open_lock(d)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise EmbeddedServerError(
                        f"timed out after {timeout:g} s waiting for the lock {d / _LOCK_NAME}"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        yield
    finally:
        os.close(fd)  # releases the flock


def _try_dir_lock(d: Path) -> int | None:
    """The directory's flock without waiting: its fd (close it to release), or None."""
    fd = _open_lock(d)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


# -- talking to the server -----------------------------------------------------------


def _client(sock: Path, timeout: float, name: str | None = None) -> redis.Redis:
    """A bookkeeping client: no retries (a dead server must fail fast), short timeouts."""
    return redis.Redis(
        unix_socket_path=str(sock),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        client_name=name,
    )


def _answers(sock: Path, timeout: float = 2.0) -> bool:
    """True if a server answers PING on ``sock`` within ``timeout`` seconds."""
    if not sock.exists():
        return False
    try:
        with _client(sock, timeout) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError):
        return False


def _wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` with a short backoff until it holds or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if predicate():
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.05)


# -- pid file and state --------------------------------------------------------------


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text(encoding="ascii").strip())
    except (OSError, ValueError):
        return None


def _proc_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True  # no /proc (macOS): signal 0 is all we know
    # "pid (comm) S ...": the state follows the last ')'
    return fields.rpartition(")")[2].split()[:1] != ["Z"]


def _cmdline(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None where there is no /proc."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return [] if Path("/proc/self").exists() else None
    except OSError:
        return None
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]


def _is_supervisor(pid: int, d: Path) -> bool:
    """True if ``pid`` is alive and is the supervisor of directory ``d``.

    Guards against a stale pid file whose pid was reused by an unrelated process.
    """
    if pid <= 0 or pid == os.getpid() or not _proc_alive(pid):
        return False
    argv = _cmdline(pid)
    if argv is None:
        return True  # cannot inspect; trust the pid file
    return _MODULE in argv and "supervise" in argv and str(d) in argv


def _live_supervisor(d: Path) -> int | None:
    """The pid of the live supervisor of ``d`` according to its pid file, or None."""
    pid = _read_pid(d / _PID_NAME)
    if pid is not None and _is_supervisor(pid, d):
        return pid
    return None


def _read_state(d: Path) -> dict[str, Any]:
    try:
        data = json.loads((d / _STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _mark_born(client: redis.Redis) -> None:
    """Record on a server just started empty that no lease was granted before it."""
    from procsync.backend.client import BORN_KEY

    try:
        client.set(BORN_KEY, str(client.info("server")["run_id"]))
    except (redis.RedisError, OSError, KeyError) as exc:
        log.warning("could not mark the new server born empty: %s", exc)


def _remove_files_of(d: Path, supervisor_pid: int) -> None:
    """Remove the pid and state files if they still describe ``supervisor_pid``."""
    if _read_pid(d / _PID_NAME) == supervisor_pid:
        for name in (_STATE_NAME, _PID_NAME):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()


def _remove_stale_files(d: Path) -> None:
    """Remove pid and state files left by a supervisor that is no longer running."""
    pid = _read_pid(d / _PID_NAME)
    if pid is not None and not _is_supervisor(pid, d):
        _remove_files_of(d, pid)


# -- public API ----------------------------------------------------------------------


def ensure_running(idle_timeout: float | None = None, *, directory: Path | None = None) -> str:
    """Start the embedded server unless one answers; return its ``unix://`` URL.

    Safe to call from any number of processes at once: exactly one server is
    started per directory (see the module docstring). The server outlives the
    caller and stops after ``idle_timeout`` seconds without clients (None: the
    ``PROCSYNC_IDLE_TIMEOUT`` environment variable, default 600 s; 0 or ``inf``:
    never). A server that is already running keeps the idle timeout it was
    started with.

    Raises:
        NoServerBinaryError: no server binary was found (the message names
            ``PROCSYNC_URL``).
        EmbeddedServerError: the directory is unsafe; the server did not start
            within :data:`STARTUP_TIMEOUT` (the message quotes its log); or a
            server is running but does not answer (hung or stopped): procsync
            reports it rather than start a second server on the same socket.
        ValueError: ``idle_timeout`` (or ``PROCSYNC_IDLE_TIMEOUT``) is negative or NaN.
    """
    idle = _idle_timeout(idle_timeout)
    d = runtime_dir(directory)
    _prepare_dir(d)
    sock = d / SOCKET_NAME
    url = _url(sock)
    with _dir_lock(d):
        if _answers(sock):
            return url
        supervisor = _live_supervisor(d)
        if supervisor is not None:
            # Its server just exited (the supervisor follows in a moment), or the
            # server is hung or stopped. Starting a second one would steal the socket.
            sup = supervisor
            _wait_until(lambda: _answers(sock, 0.5) or not _is_supervisor(sup, d), _HUNG_GRACE)
            if _answers(sock, 0.5):
                return url
            if _is_supervisor(sup, d):
                raise EmbeddedServerError(
                    f"the embedded server at {url} does not answer, but its supervisor "
                    f"(pid {sup}) is running; stop it with `procsync server stop` "
                    f"(or kill {sup}) and retry"
                )
        _remove_stale_files(d)
        binary = find_server_binary()
        _start_supervisor(d, binary, idle)
        if not _answers(sock):
            raise EmbeddedServerError(
                f"the embedded server reported ready but does not answer at {url}" + _log_tail(d)
            )
    return url


def stop(directory: Path | None = None, *, timeout: float = 15.0) -> bool:
    """Stop the embedded server; True if one was running.

    Sends ``SHUTDOWN NOSAVE`` over the socket (or, if the server does not answer,
    SIGTERM to the supervisor named in the pid file), then waits up to ``timeout``
    seconds for both to exit. Every lock held on the server is lost.

    Raises:
        EmbeddedServerError: the directory is not ours, or the server is still
            running after ``timeout`` seconds.
    """
    d = runtime_dir(directory)
    if not d.is_dir():
        return False
    _check_dir(d)
    sock = d / SOCKET_NAME
    with _dir_lock(d):
        supervisor = _live_supervisor(d)
        stopped = False
        if _answers(sock):
            try:
                with _client(sock, timeout) as r:
                    # Nobody but the supervisor and us: no lease ends with the server.
                    if int(r.info("clients").get("connected_clients", 99)) <= 2:
                        with contextlib.suppress(FileNotFoundError):
                            (d / _IN_USE).unlink()
                    r.shutdown(nosave=True)
            except redis.RedisError as exc:
                raise EmbeddedServerError(f"SHUTDOWN failed at {_url(sock)}: {exc}") from exc
            stopped = True
        elif supervisor is not None:
            os.kill(supervisor, signal.SIGTERM)
            stopped = True
        if supervisor is not None:
            # Wait for the pid to end, not for it to stop looking like the supervisor:
            # an exiting process has an empty cmdline well before it is gone.
            sup = supervisor
            if not _wait_until(lambda: not _proc_alive(sup), timeout) and _is_supervisor(sup, d):
                log.warning("supervisor %d did not exit; sending SIGKILL", sup)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sup, signal.SIGKILL)
                _wait_until(lambda: not _proc_alive(sup), timeout)
        if not _wait_until(lambda: not _answers(sock, 0.5), timeout):
            raise EmbeddedServerError(f"the server at {_url(sock)} still answers after stop")
        _remove_stale_files(d)
    if stopped:
        log.info("stopped the embedded server in %s", d)
    return stopped


def status(directory: Path | None = None) -> EmbeddedStatus:
    """Describe the embedded server of ``directory`` without starting anything."""
    d = runtime_dir(directory)
    sock = d / SOCKET_NAME
    url = _url(sock)
    supervisor = _live_supervisor(d) if d.is_dir() else None
    server: dict[str, Any] | None = None
    clients: dict[str, Any] = {}
    if sock.exists():
        try:
            with _client(sock, 2.0) as r:
                server = r.info("server")
                clients = r.info("clients")
        except (redis.RedisError, OSError):
            server = None
    if server is None:
        return EmbeddedStatus(
            running=False,
            url=url,
            pid=None,
            binary=None,
            version=None,
            uptime_s=None,
            connected_clients=None,
            idle_timeout_s=None,
            dir=d,
            supervisor_pid=supervisor,
        )
    state = _read_state(d) if supervisor is not None else {}
    ours = 1 + (1 if supervisor is not None else 0)
    idle = state.get("idle_timeout_s")
    version = server.get("valkey_version") or server.get("redis_version")
    return EmbeddedStatus(
        running=True,
        url=url,
        pid=int(server["process_id"]),
        binary=state.get("binary") or server.get("executable") or None,
        version=str(version) if version is not None else None,
        uptime_s=float(server.get("uptime_in_seconds", 0)),
        connected_clients=max(0, int(clients.get("connected_clients", 0)) - ours),
        idle_timeout_s=float(idle) if isinstance(idle, (int, float)) else None,
        dir=d,
        supervisor_pid=supervisor,
    )


# -- starting the supervisor (caller side) -------------------------------------------


def _log_tail(d: Path, lines: int = 15) -> str:
    """The last lines of the supervisor's and the server's logs, for error messages."""
    parts = []
    for name in (_SUPERVISOR_LOG, _SERVER_LOG):
        try:
            text = (d / name).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        tail = "\n".join(text.strip().splitlines()[-lines:])
        if tail:
            parts.append(f"\n--- {d / name} ---\n{tail}")
    return "".join(parts)


def _child_env() -> dict[str, str]:
    """The environment of the supervisor: ours, with procsync importable for sure."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not old else root + os.pathsep + old
    return env


def _read_ready(fd: int, deadline: float) -> str:
    """Read the supervisor's one-line report from the pipe ``fd`` ("" on EOF/timeout)."""
    data = b""
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data.decode("utf-8", errors="replace").strip()


def _start_supervisor(d: Path, binary: str, idle: float) -> None:
    """Start a detached supervisor for ``d`` and wait until its server answers.

    Called with the directory's lock held.
    """
    if not sys.executable:
        raise EmbeddedServerError("cannot start the embedded server: sys.executable is unknown")
    log.info("starting the embedded server %s in %s (idle timeout %s s)", binary, d, idle)
    read_fd, write_fd = os.pipe()
    try:
        log_fd = os.open(
            d / _SUPERVISOR_LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600
        )
        with open(log_fd, "wb") as log_file:
            argv = [
                sys.executable, "-m", _MODULE, "supervise",
                "--dir", str(d),
                "--idle-timeout", repr(idle),
                "--binary", binary,
                "--ready-fd", str(write_fd),
                "--startup-timeout", repr(STARTUP_TIMEOUT),
                "--detach",
            ]  # fmt: skip
            try:
                launcher = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    pass_fds=(write_fd,),
                    start_new_session=True,
                    cwd=d,
                    env=_child_env(),
                )
            except OSError as exc:
                raise EmbeddedServerError(f"cannot start {sys.executable}: {exc}") from exc
        os.close(write_fd)
        write_fd = -1
        deadline = time.monotonic() + STARTUP_TIMEOUT + 5.0
        report = _read_ready(read_fd, deadline)
        # The launcher forks the supervisor and exits at once; reap it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            launcher.wait(timeout=max(0.1, deadline - time.monotonic()))
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
    if not report.startswith("ok"):
        detail = report.removeprefix("error").strip() or "no report from the supervisor"
        raise EmbeddedServerError(
            f"the embedded server ({binary}) did not start in {d}: {detail}" + _log_tail(d)
        )


# -- the supervisor (runs in its own process) ----------------------------------------


class _Terminate(BaseException):
    """Raised in the supervisor by SIGTERM/SIGINT/SIGHUP to unwind into shutdown."""


def _raise_terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminate(signum)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the server get SIGTERM when the supervisor dies."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def _sample(client: redis.Redis) -> tuple[int, int] | None:
    """(clients other than the supervisor, total connections ever received), or None."""
    try:
        clients = client.info("clients")
        stats = client.info("stats")
        return (
            int(clients["connected_clients"]) - 1,
            int(stats["total_connections_received"]),
        )
    except (redis.RedisError, OSError, KeyError, ValueError) as exc:
        log.warning("cannot sample the server: %s", exc)
        return None


def _shutdown_server(proc: subprocess.Popen[bytes], client: redis.Redis | None) -> None:
    """Stop the server child: SHUTDOWN NOSAVE over ``client`` if given, else (or if
    that fails) SIGTERM + SIGCONT, then SIGKILL. At most ~10 s after the SHUTDOWN."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if proc.poll() is not None:
        return
    sent = False
    if client is not None:
        try:
            client.shutdown(nosave=True)
            sent = True
        except (redis.RedisError, OSError) as exc:
            log.warning("SHUTDOWN NOSAVE failed: %s", exc)

    def terminate() -> None:
        proc.terminate()
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a stopped server acts on SIGTERM only then

    steps: tuple[tuple[Callable[[], None] | None, float], ...] = (
        (None, 5.0 if sent else 0.0),
        (terminate, 5.0),
        (proc.kill, 5.0),
    )
    for action, wait in steps:
        if action is not None:
            action()
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
    log.error("server pid %d did not exit", proc.pid)


def _watch(proc: subprocess.Popen[bytes], client: redis.Redis, d: Path, idle: float) -> int:
    """Watch the server until it exits or has been idle for ``idle`` seconds."""
    interval = 5.0 if math.isinf(idle) else min(5.0, max(0.1, idle / 4))
    last_active = time.monotonic()
    last_total: int | None = None
    while True:
        try:
            code = proc.wait(timeout=interval)
        except subprocess.TimeoutExpired:
            pass
        else:
            log.info("server pid %d exited with status %d", proc.pid, code)
            return 0
        if math.isinf(idle):
            continue
        sample = _sample(client)
        now = time.monotonic()
        if sample is None or sample[0] > 0 or sample[1] != last_total:
            last_active = now
            last_total = sample[1] if sample is not None else None
            continue
        if now - last_active < idle:
            continue
        fd = _try_dir_lock(d)
        if fd is None:  # someone is starting or stopping: not idle
            last_active = now
            continue
        try:
            again = _sample(client)
            if again is None or again[0] > 0 or again[1] != last_total:
                last_active = time.monotonic()
                last_total = again[1] if again is not None else None
                continue
            log.info("no client for %g s: shutting the server down", idle)
            _shutdown_server(proc, client)
            with contextlib.suppress(FileNotFoundError):
                (d / _IN_USE).unlink()  # nobody held anything: the next one starts clean
            _remove_files_of(d, os.getpid())  # under the lock: no one sees a stale file
            return 0
        finally:
            os.close(fd)


def _supervise(
    d: Path, binary: str, idle: float, ready_fd: int | None, startup_timeout: float
) -> int:
    """Run the server as a child, report readiness on ``ready_fd``, watch it."""

    def report(line: str) -> None:
        nonlocal ready_fd
        if ready_fd is not None:
            with contextlib.suppress(OSError):
                os.write(ready_fd, (line + "\n").encode())
                os.close(ready_fd)
            ready_fd = None

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_terminate)
    os.umask(0o077)
    me = os.getpid()
    proc: subprocess.Popen[bytes] | None = None
    client: redis.Redis | None = None
    try:
        _check_dir(d)
        os.chdir(d)
        sock = d / SOCKET_NAME
        (d / _PID_NAME).write_text(f"{me}\n", encoding="ascii")
        state: dict[str, Any] = {
            "supervisor_pid": me,
            "binary": binary,
            "idle_timeout_s": idle,
            "socket": str(sock),
            "started_at": time.time(),
        }
        _write_atomic(d / _STATE_NAME, json.dumps(state))
        with contextlib.suppress(FileNotFoundError):
            (d / _SERVER_LOG).unlink()
        argv = server_argv(binary, socket_path=sock, workdir=d)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                preexec_fn=_die_with_parent(),  # safe: the supervisor has one thread
            )
        except OSError as exc:
            report(f"error cannot run {binary}: {exc}")
            return 1
        log.info("server pid %d started: %s", proc.pid, " ".join(argv))
        client = _client(sock, 5.0, name=_CLIENT_NAME)
        started = proc

        def ready() -> bool:
            if started.poll() is not None:
                return True
            try:
                return bool(client is not None and client.ping())
            except (redis.RedisError, OSError):
                return False

        if not _wait_until(ready, startup_timeout) or proc.poll() is not None:
            why = (
                f"exited with status {proc.returncode}"
                if proc.poll() is not None
                else f"did not answer PING within {startup_timeout:g} s"
            )
            report(f"error the server {why}")
            _shutdown_server(proc, None)
            return 1
        state["server_pid"] = proc.pid
        _write_atomic(d / _STATE_NAME, json.dumps(state))
        if not (d / _IN_USE).exists():  # the last server ended with nobody connected
            _mark_born(client)
        (d / _IN_USE).touch()
        report(f"ok {proc.pid}")
        return _watch(proc, client, d, idle)
    except _Terminate:
        log.info("terminated by signal: stopping the server")
        if proc is not None:
            _shutdown_server(proc, None)  # SIGTERM is the server's own graceful stop
        return 0
    except Exception as exc:
        log.exception("supervisor failed")
        report(f"error {exc}")
        if proc is not None:
            _shutdown_server(proc, None)
        return 1
    finally:
        report("error the supervisor exited")
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
        _remove_files_of(d, me)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m procsync.backend.embedded supervise ...``.

    ``supervise`` runs a server for one runtime directory in the foreground (or,
    with ``--detach``, in a forked child while the command returns at once),
    writes ``supervisor.pid``, shuts the server down after ``--idle-timeout``
    seconds without clients (0 or inf: never) and exits when the server exits.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {_MODULE}")
    commands = parser.add_subparsers(dest="command", required=True)
    sup = commands.add_parser("supervise", help="run the embedded server of a directory")
    sup.add_argument("--dir", required=True, type=Path, help="runtime directory")
    sup.add_argument("--idle-timeout", type=float, default=None, help="seconds; 0: never")
    sup.add_argument("--binary", default=None, help="server binary (default: searched)")
    sup.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    sup.add_argument("--startup-timeout", type=float, default=STARTUP_TIMEOUT)
    sup.add_argument("--detach", action="store_true", help="fork and return at once")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )
    d = runtime_dir(args.dir)
    idle = _idle_timeout(args.idle_timeout)
    binary = args.binary or find_server_binary()
    if args.detach:
        sys.stderr.flush()
        if os.fork() > 0:
            os._exit(0)  # the caller waits for the report on --ready-fd, not for us
    return _supervise(d, binary, idle, args.ready_fd, args.startup_timeout)


if __name__ == "__main__":
    sys.exit(main())
