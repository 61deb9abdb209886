"""The steps a core operation yields, and the helpers every core module shares.

A core operation is a generator of steps, run by a driver (:mod:`procsync._drivers`),
which owns every rule about server and network faults. What an operation may rely
on, step by step:

``Call``
    Every script call is idempotent: sent again with the same arguments after its
    reply never came (a reset after the write, a timeout, a garbled reply) it answers
    as its first run did and changes nothing twice (waiter ids, grant records and
    release ids in the scripts). So the driver resends a call that failed, with
    jittered backoff, until the operation's budget is spent; only then is the error
    thrown in, and the call's effect is unknown. The one exception is marked
    ``once`` (a Barrier arrival): its failure is thrown in at once.
``Pop``
    A pop whose connection failed is not resent (the server may have popped a value
    that is now lost): the driver backs off and sends :data:`POP_FAILED`, and the
    operation looks again, by a call that finds what the lost value carried.
``Read``, ``XRead``, ``Scan``
    Reads (the registry's): resent like calls.
``Cleanup``
    An idempotent clean-up (leave a queue, give back a grant): run now if the server
    answers; else kept by the session, and run again until it is confirmed or the
    session ends (which ends everything it held). Its result is the clean-up's, or
    :data:`DEFERRED`.

A driver throws :class:`SessionGone` in at any step once the caller's session is lost
(the client-side deadline passed, or the server no longer knows it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from procsync._identity import boot_id, pid_alive
from procsync.errors import ConflictError, CorruptStateError, ProtocolError, WrongTypeError

__all__ = [
    "DEFERRED",
    "POP_FAILED",
    "WAKE",
    "Call",
    "Cleanup",
    "HolderInfo",
    "Op",
    "Pop",
    "Read",
    "Scan",
    "SessionGone",
    "SessionView",
    "Step",
    "XRead",
    "check_common",
    "dead_on_this_host",
    "parse_holders",
    "parse_notice",
    "reap",
    "side_key",
]

ScriptArg: TypeAlias = "str | int | float"

#: What a cancelled asyncio waiter pushes onto its own inbox to end its pending pop;
#: a core operation that pops it just looks again (scripts never take it for a grant).
WAKE = "wake"

#: What a pop returns when its connection failed (no script pushes such a value): what
#: the server may have popped for the caller is lost, so the operation looks again.
POP_FAILED = "\x00pop-failed"

#: What a :class:`Cleanup` returns when the server could not be reached: the session
#: keeps the clean-up and runs it when the server answers again.
DEFERRED: Any = object()


@dataclass(frozen=True, slots=True)
class Call:
    """Run Lua script ``script`` with ``keys`` and ``args``; the result is its reply list.

    ``once``: not idempotent, so never sent again: a failure is thrown in at once and
    the operation finds out what happened by other calls (a Barrier arrival)."""

    script: str
    keys: tuple[str, ...]
    args: tuple[ScriptArg, ...]
    once: bool = False


@dataclass(frozen=True, slots=True)
class Pop:
    """Block until a value is pushed onto list ``key`` (result: str) or ``timeout``
    seconds pass (result: None). Drivers cap one pop at MAX_POP_SECONDS."""

    key: str
    timeout: float


#: One read-only client method call: (method name, args, keyword args).
Command: TypeAlias = "tuple[str, tuple[Any, ...], Mapping[str, Any]]"


@dataclass(frozen=True, slots=True)
class Read:
    """Run read-only client methods in one pipeline; the result is their replies."""

    commands: tuple[Command, ...]


@dataclass(frozen=True, slots=True)
class XRead:
    """XREAD [BLOCK block_ms] COUNT count STREAMS key after; None block: don't block."""

    key: str
    after: str
    block_ms: int | None
    count: int


@dataclass(frozen=True, slots=True)
class Scan:
    """Every key matching ``match`` of type ``type`` (SCAN, client side)."""

    match: str
    type: str


@dataclass(frozen=True, slots=True)
class Cleanup:
    """Run the idempotent operation ``make()`` now, or keep it in the session to run
    until confirmed (see the module docstring). ``what`` names it in logs.
    ``now=False``: keep it at once (the caller already tried for its budget)."""

    make: Callable[[], Op]
    what: str
    now: bool = True


Step: TypeAlias = "Call | Pop | Cleanup | Read | XRead | Scan"
Op: TypeAlias = "Generator[Step, Any, Any]"


class SessionGone(Exception):
    """Internal: the server does not know the caller's session; drivers open a new one
    and run the operation again (the script changed nothing)."""


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """One holder as scripts report it: session id, lease deadline (server ms), the
    identity of its process, and how many permits it holds."""

    sid: str
    deadline_ms: int
    boot_id: str
    pid: int
    start_ticks: int
    host: str
    permits: int


class SessionView(Protocol):
    """What core operations need of the caller's session."""

    @property
    def id(self) -> str: ...

    @property
    def boot_id(self) -> str: ...

    def new_waiter_id(self) -> str: ...

    def watch_holders(self, holders: list[HolderInfo], inbox: str) -> list[HolderInfo]:
        """Have same-host holders watched: when one dies its session is reaped, which
        serves the waiters. Returns the holders already dead, for the caller to reap
        (:func:`reap`) before looking again."""
        ...


def dead_on_this_host(sessions: list[HolderInfo]) -> list[HolderInfo]:
    """The sessions among ``sessions`` whose process ran on this host and is gone."""
    me = boot_id()
    return [h for h in sessions if h.boot_id == me and not pid_alive(h.pid, h.start_ticks)]


def reap(prefix: str, sessions_key: str, gone_key: str, dead: list[HolderInfo]) -> Op:
    """End the sessions of processes seen dead on this host; returns how many were
    ended (the script checks each identity, so a reused pid is never touched)."""
    n = 0
    for h in dead:
        reply = yield Call(
            "session",
            (sessions_key, gone_key),
            (prefix, "reap", h.sid, h.boot_id, h.pid, h.start_ticks),
        )
        n += 1 if len(reply) > 1 and str(reply[1]) == "1" else 0
    return n


def side_key(prefix: str, kind: str, tag: str, name: str) -> str:
    """A primitive's queue or waiter list: ``<prefix><kind>/<tag>:<name>`` (the Lua
    ``side()``). State keys are ``<prefix><kind>:<name>``; no kind contains ``/``,
    so no name can make a state key that is another primitive's list."""
    return f"{prefix}{kind}/{tag}:{name}"


def parse_notice(text: str, prefix: str) -> HolderInfo | None:
    """Decode an inbox notice ``<prefix><sid>|<boot>|<pid>|<start>|<host>`` naming a
    process to watch; None if ``text`` is not such a notice (e.g. a grant token)."""
    if not text.startswith(prefix):
        return None
    try:
        sid, boot, pid, start, host = text[len(prefix) :].split("|", 4)
        return HolderInfo(sid, 0, boot, int(pid), int(start), host, 1)
    except ValueError:
        raise ProtocolError(f"malformed inbox notice {text!r:.200}") from None


def parse_holders(flat: list[Any]) -> list[HolderInfo]:
    """Decode the flat ``sid, deadline, boot, pid, start, host, permits`` list."""
    if len(flat) % 7:
        raise ProtocolError(f"malformed holder list {flat!r:.200}")
    out = []
    try:
        for i in range(0, len(flat), 7):
            out.append(
                HolderInfo(
                    sid=str(flat[i]),
                    deadline_ms=int(float(flat[i + 1])),
                    boot_id=str(flat[i + 2]),
                    pid=int(flat[i + 3]),
                    start_ticks=int(flat[i + 4]),
                    host=str(flat[i + 5]),
                    permits=int(flat[i + 6]),
                )
            )
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed holder list {flat!r:.200}") from exc
    return out


def check_common(reply: list[Any], what: Callable[[], str]) -> None:
    """Raise for the replies every script may give: wrong key type, kind conflict,
    corrupt state: ``{'corrupt', field, value (None: missing), key}`` for a field of a
    state hash, ``{'corrupt', key, value}`` for a key that is one value (the fencing
    counter)."""
    status = reply[0]
    if status == "corrupt":
        field, value, key = [*reply[1:4], None, None, None][:3]
        field = str(field)
        if key is None and ":" in field:  # a whole key: {'corrupt', key, value}
            key, field = field, ""
        shown = f"{str(value)!r:.100}"
        if field:
            where = f"its key {key}" if key else "its key"
            wrong = (
                f"{where} has no field {field!r}, which procsync always writes"
                if value is None
                else f"{where} has {field}={shown}, a value procsync never writes"
            )
            fix = (
                "Delete the key (its holders and waiters are then forgotten) or restore "
                "the field, once you know what wrote it"
            )
        elif str(key).endswith(":fence"):
            big = str(value).isdigit() and int(str(value)) >= 2**53 - 1
            wrong = (
                f"the fencing counter {key} is at its maximum ({shown})"
                if big
                else f"the fencing counter {key} holds {shown}, which is not a fencing token"
            )
            fix = (
                "No lock or semaphore of the namespace can be granted until it is fixed: find "
                "what wrote it, then DEL the counter (it restarts from the server clock in "
                "microseconds; a resource that checks tokens and accepted one above that "
                "needs its last accepted token reset too)"
            )
        else:
            wrong = f"the key {key} holds {shown}, a value procsync never writes"
            fix = "Delete the key or restore it, once you know what wrote it"
        raise CorruptStateError(
            f"{what()}: {wrong} (changed by hand or by another program?); nothing was "
            f"changed. {fix}"
        )
    if status == "wrongtype":
        raise WrongTypeError(
            f"{what()}: its key holds a Redis {reply[1]!r}, written by something other than "
            "procsync; it was left untouched"
        )
    if status == "conflict":
        shape = reply[1] if not reply[2] else f"{reply[1]} with value {reply[2]}"
        raise ConflictError(f"{what()}: the name is already in use by a {shape}")
