"""The contenders, each behind one small adapter.

An :class:`Impl` is a picklable description (what it is, which server, which
options); :func:`open_primitive` builds the live object inside a benchmark process.
Every adapter has the methods its primitive kind needs, with no arguments:

    lock / sem:  acquire(), release()
    event:       wait(), set(), clear()

For the asyncio front they are coroutine functions (``Impl.is_async``). The
objects of multiprocessing and of a Manager cannot be opened by name: the parent
makes them (:func:`make_shared`) and hands them to the processes it starts.

Options chosen for the peers, as their users meet them:

* redis-py ``Lock``: ``timeout=ttl`` (a lease, else a dead holder never frees it),
  default ``sleep=0.1`` between tries.
* python-redis-lock: ``expire=ttl``, with and without ``auto_renewal`` (which starts
  a renewal thread per acquire); waiting is a BLPOP on a signal list.
* pottery ``Redlock`` with one master, ``auto_release_time=ttl``; it retries after a
  random sleep of up to 0.2 s.
* filelock ``FileLock``: default 50 ms poll. portalocker ``Lock``: defaults
  (non-blocking flock retried every 0.25 s), timeout raised to a minute.
* multiprocessing ``Lock``/``Semaphore``/``Event``: the floor for one process tree.
* ``multiprocessing.Manager()`` proxies: one manager process, a thread per client.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["IMPLS", "Impl", "impls_for", "make_shared", "open_primitive"]


@dataclass(frozen=True)
class Impl:
    key: str
    label: str
    family: str  # procsync | mp | manager | file | redis
    kinds: tuple[str, ...]  # which of lock, sem, event it offers
    is_async: bool = False
    #: Seconds between tries while waiting (0: pushed wake-ups, no polling).
    poll: float = 0.0
    #: False: a killed holder's lock is never freed (no lease, no kernel help).
    frees_dead: bool = True
    #: Needs the Redis/Valkey server (measured on every server of the run).
    on_server: bool = True
    opts: dict[str, Any] = field(default_factory=dict)


IMPLS: tuple[Impl, ...] = (
    Impl("procsync", "procsync", "procsync", ("lock", "sem", "event")),
    Impl("procsync-aio", "procsync.asyncio", "procsync", ("lock", "sem", "event"), is_async=True),
    Impl(
        "mp",
        "multiprocessing (floor)",
        "mp",
        ("lock", "sem", "event"),
        frees_dead=False,
        on_server=False,
    ),
    Impl(
        "manager",
        "Manager() proxy",
        "manager",
        ("lock", "sem", "event"),
        frees_dead=False,
        on_server=False,
    ),
    Impl("filelock", "filelock", "file", ("lock",), poll=0.05, on_server=False),
    Impl("portalocker", "portalocker", "file", ("lock",), poll=0.25, on_server=False),
    Impl("redis-py", "redis-py Lock", "redis", ("lock",), poll=0.1),
    Impl("redis-lock", "python-redis-lock", "redis", ("lock",)),
    Impl(
        "redis-lock-renew",
        "python-redis-lock +renewal",
        "redis",
        ("lock",),
        opts={"auto_renewal": True},
    ),
    Impl("pottery", "pottery Redlock (1 master)", "redis", ("lock",), poll=0.2),
)

BY_KEY = {i.key: i for i in IMPLS}


def impls_for(kind: str, *, server_only: bool = False) -> list[Impl]:
    """The implementations that offer ``kind`` (optionally only the server-backed ones)."""
    return [i for i in IMPLS if kind in i.kinds and (i.on_server or not server_only)]


# -- parent side: objects that cannot be opened by name ------------------------------


def make_shared(impl: Impl, kind: str, ctx: Any, manager: Any, value: int = 4) -> Any:
    """The primitive object the parent must create (mp, Manager); None for the others."""
    if impl.family == "mp":
        src = ctx
    elif impl.family == "manager":
        src = manager
    else:
        return None
    if kind == "lock":
        return src.Lock()
    if kind == "sem":
        return src.Semaphore(value)
    if kind == "event":
        return src.Event()
    raise ValueError(kind)


# -- process side ------------------------------------------------------------------


@dataclass(frozen=True)
class Env:
    """Where a benchmark process finds its server and files, and the lease to use."""

    socket: str  # server's Unix socket path
    workdir: str  # for lock files
    ttl: float


def redis_client(env: Env, **kw: Any) -> Any:
    import redis

    return redis.Redis(unix_socket_path=env.socket, **kw)


class _Sync:
    """Adapter with the same method names for every sync peer."""

    __slots__ = ("acquire", "clear", "is_set", "obj", "release", "set", "wait")

    def __init__(self, obj: Any, acquire: Any = None, release: Any = None) -> None:
        self.obj = obj
        self.acquire = acquire or getattr(obj, "acquire", None)
        self.release = release or getattr(obj, "release", None)
        self.set = getattr(obj, "set", None)
        self.wait = getattr(obj, "wait", None)
        self.clear = getattr(obj, "clear", None)
        self.is_set = getattr(obj, "is_set", None)


def open_primitive(
    impl: Impl, kind: str, name: str, env: Env, shared: Any = None, value: int = 4
) -> Any:
    """Open the primitive ``name`` of ``kind`` for ``impl`` in this process."""
    if impl.family == "procsync":
        import procsync
        import procsync.asyncio as paio

        procsync.session.configure(ttl=env.ttl)
        url = f"unix://{env.socket}"
        mod: Any = paio if impl.is_async else procsync
        if kind == "lock":
            return mod.Lock(name, url=url)
        if kind == "sem":
            return mod.Semaphore(value, name=name, url=url)
        if kind == "event":
            return mod.Event(name, url=url)
        raise ValueError(kind)
    if impl.family in ("mp", "manager"):
        if shared is None:
            raise ValueError(f"{impl.key} needs the object made by its parent")
        return _Sync(shared)
    if kind != "lock":
        raise ValueError(f"{impl.key} has no {kind}")
    path = os.path.join(env.workdir, f"{name}.lock")
    if impl.key == "filelock":
        import filelock

        return _Sync(filelock.FileLock(path))
    if impl.key == "portalocker":
        import portalocker

        return _Sync(portalocker.Lock(path, timeout=60))
    ttl = env.ttl
    if impl.key == "redis-py":
        r = redis_client(env)
        return _Sync(r.lock(name, timeout=ttl))
    if impl.key in ("redis-lock", "redis-lock-renew"):
        import redis_lock

        r = redis_client(env)
        lk = redis_lock.Lock(
            r, name, expire=max(1, round(ttl)), auto_renewal=bool(impl.opts.get("auto_renewal"))
        )
        return _Sync(lk)
    if impl.key == "pottery":
        import logging

        from pottery import Redlock

        logging.getLogger("pottery").setLevel(logging.ERROR)
        r = redis_client(env)
        return _Sync(Redlock(key=name, masters={r}, auto_release_time=ttl))
    raise ValueError(impl.key)


def ping_fn(impl: Impl, env: Env) -> Any:
    """A bare PING through the client ``impl`` uses (the round-trip floor)."""
    if impl.family == "procsync":
        import procsync
        from procsync.backend.client import get_backend

        b = get_backend(f"unix://{env.socket}", None)
        if impl.is_async:
            return b.aping  # the connections acall() uses
        procsync.session.configure(ttl=env.ttl)
        return b.ping  # the connection call() uses
    return redis_client(env).ping


def preload() -> None:
    """Import everything a benchmark process needs (the forkserver does it once)."""
    import filelock  # noqa: F401
    import portalocker  # noqa: F401
    import pottery  # noqa: F401
    import redis  # noqa: F401
    import redis_lock  # noqa: F401

    import procsync
    import procsync.asyncio  # noqa: F401
