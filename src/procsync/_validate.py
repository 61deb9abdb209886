"""Argument checks done before any server call: bad input gets a clear error and
changes nothing."""

from __future__ import annotations

import math
import numbers

__all__ = [
    "MAX_NAME_LENGTH",
    "MAX_TIMEOUT",
    "check_name",
    "check_namespace",
    "check_permits",
    "check_timeout",
    "check_ttl",
]

MAX_NAME_LENGTH = 200
#: Longer than any sensible wait; beyond it a timeout is taken for a unit mistake.
MAX_TIMEOUT = 365 * 24 * 3600.0
MAX_PERMITS = 1_000_000


def check_name(name: object, what: str = "name") -> str:
    """Return ``name`` if it is a usable primitive name, else raise.

    A name is a non-empty ``str`` of at most 200 characters, valid Unicode text (no
    lone surrogates: names are stored as UTF-8), without control characters (they
    would garble logs and the CLI).
    """
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, not {type(name).__name__}")
    if not name:
        raise ValueError(f"{what} must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"{what} is {len(name)} characters long; the limit is {MAX_NAME_LENGTH}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        plural = "namespaces" if what == "namespace" else "names"
        raise ValueError(
            f"{what} {name!r} is not valid Unicode text (lone surrogate {name[exc.start]!r} at "
            f"position {exc.start}); {plural} are stored as UTF-8: decode the {what}'s bytes "
            "with their real encoding (a byte that is not UTF-8 becomes such a character "
            "under errors='surrogateescape', as in sys.argv and os.environ)"
        ) from None
    for ch in name:
        if ord(ch) < 32 or ord(ch) == 127:
            raise ValueError(f"{what} {name!r} contains the control character {ch!r}")
    return name


def check_namespace(namespace: object) -> str:
    """A namespace is a name without braces (they delimit the Redis hash tag)."""
    ns = check_name(namespace, "namespace")
    if "{" in ns or "}" in ns:
        raise ValueError(f"namespace {ns!r} must not contain '{{' or '}}'")
    return ns


def _check_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    f = float(value)
    if math.isnan(f):
        raise ValueError(f"{what} must not be NaN")
    return f


def check_timeout(timeout: object, *, negative: str = "error") -> float | None:
    """Normalise a wait budget in seconds; None means wait forever.

    ``negative`` says what a negative value means, primitive by primitive, as in
    the standard library: ``"forever"`` (``Lock.acquire(timeout=-1)``),
    ``"zero"`` (``Event.wait``, ``Semaphore.acquire`` and ``Condition.wait``
    treat it as "don't wait"), or ``"error"`` (raise ValueError).
    """
    if timeout is None:
        return None
    t = _check_number(timeout, "timeout")
    if t < 0:
        if negative == "forever":
            return None
        if negative == "zero":
            return 0.0
        raise ValueError(f"timeout must be non-negative, got {t!r}")
    if t > MAX_TIMEOUT:
        raise ValueError(f"timeout {t!r} s is absurd (more than a year); use None to wait forever")
    return t


def check_ttl(ttl: object) -> float:
    """A session lease: positive, finite, between 0.2 s and one day."""
    t = _check_number(ttl, "ttl")
    if not (0.2 <= t <= 86400.0):
        raise ValueError(f"ttl must be between 0.2 and 86400 seconds, got {t!r}")
    return t


def check_permits(value: object, what: str = "value", *, minimum: int = 0) -> int:
    """A permit count: an int (not a bool), ``minimum`` <= value <= 1,000,000."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    v = int(value)
    if v < minimum:
        if minimum == 0:
            raise ValueError(f"{what} must be >= 0")
        raise ValueError(f"{what} must be >= {minimum}")
    if v > MAX_PERMITS:
        raise ValueError(f"{what} {v} is absurd; the limit is {MAX_PERMITS}")
    return v
