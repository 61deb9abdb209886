"""Process-wide settings, read from the environment once per use.

| variable              | meaning                                           | default   |
|-----------------------|---------------------------------------------------|-----------|
| PROCSYNC_URL          | redis:// rediss:// or unix:// URL of the server   | embedded  |
| PROCSYNC_NAMESPACE    | tenant on a shared server                         | "default" |
| PROCSYNC_TTL          | session lease in seconds                          | 10        |
| PROCSYNC_SOCKET_TIMEOUT | seconds a single server call may take           | 5         |
"""

from __future__ import annotations

import math
import os

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_TTL",
    "env_namespace",
    "env_socket_timeout",
    "env_ttl",
    "env_url",
]

DEFAULT_TTL = 10.0
DEFAULT_NAMESPACE = "default"
DEFAULT_SOCKET_TIMEOUT = 5.0


def env_url() -> str | None:
    """``PROCSYNC_URL``, or None when unset or empty (use the embedded server)."""
    url = os.environ.get("PROCSYNC_URL", "").strip()
    return url or None


def env_namespace() -> str:
    """``PROCSYNC_NAMESPACE`` or ``"default"``."""
    return os.environ.get("PROCSYNC_NAMESPACE", "").strip() or DEFAULT_NAMESPACE


def _env_seconds(var: str, default: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{var}={raw!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{var}={raw!r} must be a positive, finite number of seconds")
    return value


def env_ttl() -> float:
    """``PROCSYNC_TTL`` in seconds, default 10."""
    return _env_seconds("PROCSYNC_TTL", DEFAULT_TTL)


def env_socket_timeout() -> float:
    """``PROCSYNC_SOCKET_TIMEOUT``: the longest one non-blocking server call may take."""
    return _env_seconds("PROCSYNC_SOCKET_TIMEOUT", DEFAULT_SOCKET_TIMEOUT)
