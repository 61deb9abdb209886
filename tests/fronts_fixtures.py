"""Fixtures for suites that run each behaviour on both fronts (load with
``pytest_plugins = ["helpers.fixtures", "fronts_fixtures"]``).

``front``        the front under test, parametrised ``[sync]`` / ``[asyncio]``; its
                 event loop (asyncio) is stopped before the process's sessions close.
``front_child``  starts a ``python -c`` child that has ``F``, the front it is told
                 to use (see :func:`start_front_child`), plus ``say``/``hear``.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from fronts import FRONTS, TESTS_DIR, Front
from helpers.procs import Child, ChildFactory

__all__ = ["FrontChild", "front", "front_child", "start_front_child"]

CHILD_HEADER = """
import fronts
F = fronts.make(FRONT)
"""


def start_front_child(
    children: ChildFactory,
    front: str,
    body: str,
    name: str | None = None,
    env: dict[str, str] | None = None,
    **values: Any,
) -> Child:
    """Start a child whose script is ``body`` (dedented), with ``FRONT`` and every
    keyword in ``values`` defined as globals (their repr), and ``F`` the front."""
    assigns = "".join(f"{k} = {v!r}\n" for k, v in {"FRONT": front, **values}.items())
    code = assigns + CHILD_HEADER + textwrap.dedent(body)
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH")) if p)
    return children(code, name=name or f"{front}-child", PYTHONPATH=path, **(env or {}))


FrontChild = Callable[..., Child]


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest, ps_url: str) -> Iterator[Front]:
    """The front under test; the server is this leg's, emptied, in ``PROCSYNC_URL``."""
    f = Front(request.param)
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def front_child(children: ChildFactory) -> FrontChild:
    """``front_child(front_name, body, name=None, env=None, **globals) -> Child``."""

    def start(
        front: str,
        body: str,
        name: str | None = None,
        env: dict[str, str] | None = None,
        **values: Any,
    ) -> Child:
        return start_front_child(children, front, body, name, env, **values)

    return start
