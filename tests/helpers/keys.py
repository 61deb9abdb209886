"""What procsync leaves on the server, and checks of it."""

from __future__ import annotations

import re

import redis

__all__ = [
    "NAMESPACE_LEVEL",
    "lasting_keys",
    "leftover_keys",
    "namespace_key",
    "state_key",
    "stored_keys",
]

PREFIX = "procsync:{default}:"

#: Keys a namespace keeps whatever its primitives do: the session registry, the
#: fencing counter, the epoch, the event stream, each session's hash; and the
#: server-wide mark of a server started empty.
NAMESPACE_LEVEL = re.compile(
    r"^(procsync:\{[^}]+\}:(sessions|gone|fence|epoch|events|s:[0-9a-f]+)|procsync:born)$"
)


def stored_keys(r: redis.Redis) -> list[str]:
    """Every key on the server but the mark of a server started empty
    (``procsync:born``, written by procsync.testing): what a test stored."""
    keys = (k.decode() if isinstance(k, bytes) else str(k) for k in r.scan_iter(count=1000))
    return sorted(k for k in keys if k != "procsync:born")


def namespace_key(suffix: str) -> str:
    return PREFIX + suffix


def state_key(kind: str, name: str) -> str:
    """The state key of a primitive: kind is lock, rlock, sem, bsem or event."""
    return f"{PREFIX}{kind}:{name}"


SESSION_HOLDS = re.compile(r"^procsync:\{[^}]+\}:h:[0-9a-f]+$")


def leftover_keys(r: redis.Redis, *, session_holds: bool = True) -> list[str]:
    """Every procsync key that is not namespace-level: per-primitive state, queues,
    inboxes and (unless ``session_holds`` is False) the per-session sets of what a
    session holds or waits in. The test's own keys are not procsync's."""
    out = []
    for k in r.scan_iter(match="procsync:*", count=1000):
        key = k.decode() if isinstance(k, bytes) else str(k)
        if NAMESPACE_LEVEL.match(key):
            continue
        if not session_holds and SESSION_HOLDS.match(key):
            continue
        out.append(key)
    return sorted(out)


#: An inbox holding a grant nobody will pop (its waiter died) expires by itself.
INBOX_TTL_MS = 120_000


def lasting_keys(r: redis.Redis) -> list[str]:
    """What crashed processes may leave for good: per-primitive keys, ignoring the
    sets of sessions that died (reaped by the next live session's heartbeat) and
    inboxes of dead waiters that expire by themselves within two minutes."""
    out = []
    for key in leftover_keys(r, session_holds=False):
        if ":in:" in key and 0 < r.pttl(key) <= INBOX_TTL_MS:
            continue
        out.append(key)
    return out
