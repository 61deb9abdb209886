"""Helpers for the fault suites in ``tests/faults`` (their fixtures are in
:mod:`helpers.fault_fixtures`).

:func:`blip` (every connection reset, then refused for a moment),
:func:`sweep_until_ended` (wait for the server to end a session whose lease ran out),
:func:`stray_keys` (what primitives left on the server), and the key names the
scripts use.
"""

from __future__ import annotations

import re
import time

import redis

from helpers.procs import wait_until
from procsync import registry
from procsync.testing import FaultProxy

__all__ = [
    "BLIP",
    "PREFIX",
    "blip",
    "session_state",
    "side",
    "state",
    "stray_keys",
    "sweep_until_ended",
]

PREFIX = "procsync:{default}:"
#: How long a blip keeps refusing connections (after resetting every one).
BLIP = 0.5

#: Keys a primitive, a waiter or a hold leaves: state, side lists, inboxes, the
#: per-session sets of what it holds. Namespace-level keys (sessions, fence, events,
#: session hashes, ...) are not matched, whatever new ones there are.
_PER_PRIMITIVE = re.compile(
    r"^procsync:\{[^}]+\}:(lock|rlock|sem|bsem|event|cond|barrier|value)[:/]"
    r"|^procsync:\{[^}]+\}:(in|h):"
)


def state(kind: str, name: str) -> str:
    """A primitive's state key (``lock``, ``sem``, ``event``, ``cond``, ``barrier``)."""
    return f"{PREFIX}{kind}:{name}"


def side(kind: str, tag: str, name: str) -> str:
    """A primitive's side list: a lock's queue (``q``), a condition's or event's
    waiters (``w``), a barrier's arrivals (``a``)."""
    return f"{PREFIX}{kind}/{tag}:{name}"


def session_state(r: redis.Redis, sid: str) -> str | None:
    """What the server records of session ``sid``: alive, dead, left, or None."""
    value = r.hget(f"{PREFIX}s:{sid}", "state")
    return None if value is None else str(value)


def blip(proxy: FaultProxy, seconds: float = BLIP) -> None:
    """A short outage: every connection through ``proxy`` is reset, new ones are
    refused for ``seconds``, then everything passes again."""
    proxy.reset()
    proxy.refuse()
    time.sleep(seconds)  # the outage lasts this long (not a synchronisation)
    proxy.heal()


def sweep_until_ended(url: str, r: redis.Redis, sid: str, timeout: float = 10.0) -> str:
    """Wait until the server has ended session ``sid`` (its lease ran out): each poll
    is a registry read, which ends expired sessions first. Returns its final state."""

    def ended() -> str | None:
        registry.sessions(url=url, check_pids=False)
        got = session_state(r, sid)
        return got if got not in (None, "alive") else None

    return wait_until(ended, timeout, what=f"the server to end session {sid[:8]}")


def stray_keys(r: redis.Redis) -> list[str]:
    """Every key of a primitive, a queue, an inbox or a session's holds still on the
    server (none once every wait ended and every hold was released)."""
    return sorted(
        str(k) for k in r.scan_iter(match="procsync:*", count=1000) if _PER_PRIMITIVE.match(str(k))
    )
