"""Per-test fixtures for the primitive suites (load with
``pytest_plugins = ["helpers.fixtures"]``).

``ps_url``    the conftest ``url`` (a FLUSHALL-ed shared server) made the process's
              ``PROCSYNC_URL``; the process's sessions are closed before and after.
``raw``       a plain redis client on that server, to look at keys behind the API.
``children``  starts ``python -c`` child processes (see :mod:`helpers.procs`) with
              the test's environment; kills whatever is left at the end.
``fresh_url`` as ``ps_url`` but on the test's own ``fresh_server`` (kill/restart ok).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis

from helpers.procs import ChildFactory
from procsync.session import close_all
from procsync.testing import ServerProcess

_ENV = ("PROCSYNC_TTL", "PROCSYNC_NAMESPACE", "PROCSYNC_SOCKET_TIMEOUT")


def _use(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    close_all()
    monkeypatch.setenv("PROCSYNC_URL", url)
    for var in _ENV:
        monkeypatch.delenv(var, raising=False)
    try:
        yield url
    finally:
        close_all()


@pytest.fixture
def ps_url(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``PROCSYNC_URL`` = the shared server of this leg, emptied before the test."""
    yield from _use(url, monkeypatch)


@pytest.fixture
def fresh_url(fresh_server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``PROCSYNC_URL`` = this test's own server, which it may kill or restart."""
    yield from _use(fresh_server.url, monkeypatch)


@pytest.fixture
def raw(ps_url: str) -> Iterator[redis.Redis]:
    """A plain redis client (str replies) on the test's server."""
    r = redis.Redis.from_url(ps_url, decode_responses=True)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def children() -> Iterator[ChildFactory]:
    """Start ``python -c`` children with the environment as it is when each starts."""
    factory = ChildFactory(lambda: os.environ)
    try:
        yield factory
    finally:
        factory.close()
