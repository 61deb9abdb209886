"""Fixtures for the fault suites in ``tests/faults`` (load with
``pytest_plugins = ["helpers.fixtures", "helpers.fault_fixtures"]``).

``proxy``        a :class:`~procsync.testing.FaultProxy` in front of this leg's shared
                 server (emptied), made the process's ``PROCSYNC_URL`` (children
                 started from then on use it too); healed, and the process's sessions
                 closed, before it goes.
``direct``       a plain redis client (str replies) on the server itself, never through
                 the proxy: what the server really holds.
``frozen``       this test's own ``fresh_server`` as ``PROCSYNC_URL``, for tests that
                 pause (SIGSTOP) it; resumed before the sessions are closed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from procsync.session import close_all
from procsync.testing import FaultProxy, ServerProcess

__all__ = ["direct", "frozen", "proxy"]

_ENV = ("PROCSYNC_TTL", "PROCSYNC_NAMESPACE", "PROCSYNC_SOCKET_TIMEOUT")


@pytest.fixture
def direct(server: ServerProcess, url: str) -> Iterator[redis.Redis]:
    with server.client(decode_responses=True, socket_timeout=5.0) as r:
        yield r


@pytest.fixture
def proxy(server: ServerProcess, url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    close_all()
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    with FaultProxy(server.socket_path, name="fp-faults") as p:
        monkeypatch.setenv("PROCSYNC_URL", p.url)
        try:
            yield p
        finally:
            p.heal()
            close_all()


@pytest.fixture
def frozen(fresh_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[ServerProcess]:
    close_all()
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PROCSYNC_URL", fresh_server.url)
    try:
        yield fresh_server
    finally:
        if fresh_server.paused:
            fresh_server.resume()
        close_all()
