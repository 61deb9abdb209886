"""Value: counterpart of ``multiprocessing.Value`` for processes on any machine."""

from __future__ import annotations

from typing import Any, final

from procsync import _drivers
from procsync.core import value as core
from procsync.sync._base import ANON_KEEP_MS, Primitive
from procsync.sync.lock import Lock, RLock

__all__ = ["Value"]

_ZERO: dict[type, object] = {int: 0, float: 0.0, str: "", bytes: b""}


def _resolve_type(typecode_or_type: object) -> tuple[type, str | None]:
    if isinstance(typecode_or_type, str):
        if typecode_or_type not in core.TYPECODES:
            raise ValueError(
                f"unsupported typecode {typecode_or_type!r}: use one of "
                f"{''.join(core.TYPECODES)} or int, float, str, bytes"
            )
        return core.TYPECODES[typecode_or_type], typecode_or_type
    if typecode_or_type in (int, float, str, bytes):
        return typecode_or_type, None
    code = getattr(typecode_or_type, "_type_", None)  # a ctypes simple type, e.g. c_int
    if isinstance(code, str) and code in core.TYPECODES:
        return core.TYPECODES[code], code
    raise TypeError(
        f"Value holds int, float, str or bytes (or a typecode / ctypes type of one), not "
        f"{typecode_or_type!r}: nothing is pickled onto the wire"
    )


@final
class Value(Primitive):
    """Counterpart of ``multiprocessing.Value`` for processes on any machine.

    ``Value("i", 0, name="counter")`` is one integer shared by every process that
    opens ``"counter"``: ``.value`` reads it from the server, ``.value = x`` writes it.
    As with multiprocessing, ``v.value += 1`` is a read then a write; hold
    ``v.get_lock()`` around it, or use the atomic :meth:`add`.

    Types: int (typecodes ``bBhHiIlLqQ``, range-checked), float (``fd``), bytes
    (``c``: one byte) and str (``u``: one character), or the types ``int``,
    ``float``, ``str``, ``bytes`` (any length). Values travel as text, never pickles.

    Differences from multiprocessing: a named Value is state on the server — it keeps
    its value across runs until :meth:`delete` (an anonymous one, ``Value("i")``,
    expires a day after its last write); the initial value only creates it
    when absent (so a child or another program opening it never resets it).
    ``lock`` is True (an RLock named ``"<name>:lock"``), a procsync Lock/RLock, or
    False (then ``get_lock()`` raises AttributeError, as multiprocessing's raw value
    has none).
    """

    __slots__ = ("_initial", "_lock", "_opened", "_pytype", "_ref", "_typecode")

    def __init__(
        self,
        typecode_or_type: Any,
        *args: Any,
        lock: bool | Lock | RLock = True,
        name: str | None = None,
        url: str | None = None,
        namespace: str | None = None,
    ) -> None:
        self._pytype, self._typecode = _resolve_type(typecode_or_type)
        if len(args) > 1:
            raise TypeError(f"Value takes one initial value, got {len(args)}")
        if args:
            initial = args[0]
        elif self._typecode == "c":
            initial = b"\x00"
        elif self._typecode == "u":
            initial = "\x00"
        else:
            initial = _ZERO[self._pytype]
        super().__init__(name, url, namespace)
        self._ref: core.ValueRef | None = None
        # Validate the initial value now, before any server call.
        core.encode(self._make_ref(None), initial)
        self._initial = initial
        self._opened = False
        if lock is True:
            self._lock: Lock | RLock | None = RLock(
                f"{self._name}:lock", url=url, namespace=namespace
            )
        elif lock is False:
            self._lock = None
        elif isinstance(lock, (Lock, RLock)):
            self._lock = lock
        else:
            raise TypeError(f"lock must be True, False or a procsync Lock/RLock, not {lock!r}")

    def _make_ref(self, backend: Any) -> core.ValueRef:
        keep = ANON_KEEP_MS if self._anonymous else 0
        return core.ValueRef(backend, self._name, self._pytype, self._typecode, keep)

    def _ctor(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        lock: bool | Lock | RLock = self._lock if self._lock is not None else False
        return (self._typecode or self._pytype, self._initial), {"name": self._name, "lock": lock}

    @property
    def ref(self) -> core.ValueRef:
        r = self._ref
        if r is None:
            r = self._ref = self._make_ref(self.backend)
        return r

    def _open(self) -> Any:
        value = _drivers.run(self.ref.backend, core.open_(self.ref, self._initial))
        self._opened = True
        return value

    @property
    def value(self) -> Any:
        """The current value (one round trip)."""
        if not self._opened:
            return self._open()
        return _drivers.run(self.ref.backend, core.get(self.ref, self._initial))

    @value.setter
    def value(self, new: Any) -> None:
        _drivers.run(self.ref.backend, core.set_(self.ref, new))
        self._opened = True

    def add(self, delta: int | float) -> Any:
        """Atomically add ``delta`` (int and float values); returns the new value."""
        if not self._opened:
            self._open()
        return _drivers.run(self.ref.backend, core.add(self.ref, delta))

    def delete(self) -> bool:
        """Remove the value from the server (the next use recreates it from the
        initial value). True if it existed."""
        self._opened = False
        return bool(_drivers.run(self.ref.backend, core.delete(self.ref)))

    def get_lock(self) -> Lock | RLock:
        """The lock that guards read-modify-write sequences."""
        if self._lock is None:
            raise AttributeError("this Value was created with lock=False and has no lock")
        return self._lock

    def get_obj(self) -> Value:
        """``multiprocessing``'s synchronized wrapper returns the raw object; here it is
        the Value itself."""
        return self

    def __repr__(self) -> str:
        t = self._typecode or self._pytype.__name__
        return f"<procsync.Value {self._name!r} {t}{self._where()}>"
