"""Core logic of Value (script ``value.lua``): typed encoding on the wire.

Values travel as text, never pickles: an int as its decimal digits, a float as
``repr`` (round-trips exactly), a str as itself, bytes as latin-1 text.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

from procsync.backend.client import Backend
from procsync.core.steps import Call, Op, check_common
from procsync.errors import ConflictError, ProtocolError

__all__ = ["TYPECODES", "ValueRef", "add", "decode", "delete", "encode", "get", "open_", "set_"]

#: multiprocessing / array typecodes and the Python type each maps to.
TYPECODES: dict[str, type] = {
    **dict.fromkeys("bBhHiIlLqQ", int),
    **dict.fromkeys("fd", float),
    "c": bytes,
    "u": str,
}
#: Bounds of C integer typecodes (multiprocessing wraps silently; procsync refuses).
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "b": (-(2**7), 2**7 - 1), "B": (0, 2**8 - 1),
    "h": (-(2**15), 2**15 - 1), "H": (0, 2**16 - 1),
    "i": (-(2**31), 2**31 - 1), "I": (0, 2**32 - 1),
    "l": (-(2**63), 2**63 - 1), "L": (0, 2**64 - 1),
    "q": (-(2**63), 2**63 - 1), "Q": (0, 2**64 - 1),
}  # fmt: skip
MAX_TEXT = 512 * 1024 * 1024 - 1


@dataclass(frozen=True, slots=True)
class ValueRef:
    """Where a Value lives and what it holds."""

    backend: Backend
    name: str
    pytype: type
    typecode: str | None
    keep_ms: int = 0

    @property
    def key(self) -> str:
        return f"{self.backend.prefix}value:{self.name}"

    @property
    def type_name(self) -> str:
        return self.pytype.__name__

    def describe(self) -> str:
        return f"Value {self.name!r} ({self.typecode or self.type_name})"

    def call(self, op: str, arg: str = "") -> Call:
        b = self.backend
        return Call("value", (self.key,), (b.prefix, op, self.type_name, arg, self.keep_ms))


def encode(ref: ValueRef, value: object) -> str:
    """Check ``value`` against the Value's type and turn it into wire text."""
    t = ref.pytype
    if t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{ref.describe()} holds an int, not {type(value).__name__}")
        if ref.typecode in INT_BOUNDS:
            lo, hi = INT_BOUNDS[ref.typecode]
            if not lo <= value <= hi:
                raise OverflowError(f"{value} does not fit typecode {ref.typecode!r}")
        return str(value)
    if t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{ref.describe()} holds a float, not {type(value).__name__}")
        f = float(value)
        if math.isnan(f) or math.isinf(f):
            raise ValueError(f"{ref.describe()} cannot hold {f!r}")
        return repr(f)
    if t is str:
        if not isinstance(value, str):
            raise TypeError(f"{ref.describe()} holds a str, not {type(value).__name__}")
        if ref.typecode == "u" and len(value) != 1:
            raise ValueError("typecode 'u' holds exactly one character")
        if len(value) > MAX_TEXT:
            raise ValueError(f"{ref.describe()}: value too large")
        return value
    if not isinstance(value, bytes):
        raise TypeError(f"{ref.describe()} holds bytes, not {type(value).__name__}")
    if ref.typecode == "c" and len(value) != 1:
        raise ValueError("typecode 'c' holds exactly one byte")
    return value.decode("latin-1")


def decode(ref: ValueRef, text: Any) -> Any:
    """Turn wire text back into the Value's Python type."""
    try:
        if ref.pytype is int:
            return int(text)
        if ref.pytype is float:
            return float(text)
        if ref.pytype is str:
            return str(text)
        return str(text).encode("latin-1")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{ref.describe()}: malformed stored value {text!r:.100}") from exc


def _ok(ref: ValueRef, reply: list[Any]) -> list[Any]:
    if reply[0] == "conflict":
        raise ConflictError(f"{ref.describe()}: the name already holds a {reply[2]} Value")
    if reply[0] != "ok":
        check_common(reply, ref.describe)
        raise ProtocolError(f"{ref.describe()}: unexpected reply {reply!r:.200}")
    return reply


def open_(ref: ValueRef, initial: object) -> Op:
    """Create the value with ``initial`` unless it exists; returns the current value."""
    reply = _ok(ref, (yield ref.call("open", encode(ref, initial))))
    return decode(ref, reply[1])


def get(ref: ValueRef, default: object) -> Op:
    """The current value (``default`` if it was deleted)."""
    reply = yield ref.call("get")
    if reply[0] == "absent":
        return default
    return decode(ref, _ok(ref, reply)[1])


def set_(ref: ValueRef, value: object) -> Op:
    """Store ``value``."""
    _ok(ref, (yield ref.call("set", encode(ref, value))))
    return None


def add(ref: ValueRef, delta: object) -> Op:
    """Atomically add ``delta`` (int or float values); returns the new value."""
    if ref.pytype not in (int, float):
        raise TypeError(f"{ref.describe()}: add() needs an int or float value")
    if ref.pytype is int:
        text = encode(ref, delta)
    else:
        if isinstance(delta, bool) or not isinstance(delta, (int, float)):
            raise TypeError(f"{ref.describe()}: delta must be a number, not {type(delta).__name__}")
        text = encode(ref, float(delta))
    # An id of its own: resent after a lost reply, it adds once (an add made by another
    # process in between makes the resent one add again: the one race left).
    call = ref.call("add", text)
    reply = _ok(ref, (yield Call(call.script, call.keys, (*call.args, secrets.token_hex(8)))))
    return decode(ref, reply[1])


def delete(ref: ValueRef) -> Op:
    """Remove the value from the server; True if it existed."""
    reply = _ok(ref, (yield ref.call("delete")))
    return int(reply[1]) == 1
