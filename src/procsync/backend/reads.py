"""The registry's reads (pipelined reads, stream reads, key scans) on redis-py's
clients: what :mod:`procsync._drivers` runs for the ``Read``, ``XRead`` and ``Scan``
steps. Every redis-py failure is translated by the Backend, as for script calls."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import redis
import redis.asyncio
import redis.exceptions as rex

from procsync.backend.client import MAX_POP_SECONDS, Backend
from procsync.core.steps import Read, Scan, XRead

__all__ = ["aread", "read"]

_blocking_clients: weakref.WeakKeyDictionary[Backend, redis.Redis] = weakref.WeakKeyDictionary()
_async_clients: weakref.WeakKeyDictionary[
    Backend,
    weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[redis.asyncio.Redis, ...]],
] = weakref.WeakKeyDictionary()


def _blocking_client(backend: Backend) -> redis.Redis:
    """A client whose socket timeout allows the longest blocking read."""
    c = _blocking_clients.get(backend)
    if c is None:
        backend.cmd()  # checks the server once
        c = redis.Redis.from_url(
            backend.url,
            decode_responses=True,
            socket_timeout=MAX_POP_SECONDS + backend.socket_timeout,
            socket_connect_timeout=min(backend.socket_timeout, 5.0),
        )
        _blocking_clients[backend] = c
    return c


def _async_pair(backend: Backend) -> tuple[redis.asyncio.Redis, ...]:
    """(reads, blocking reads) clients for the running event loop."""
    loop = asyncio.get_running_loop()
    per_loop = _async_clients.setdefault(backend, weakref.WeakKeyDictionary())
    got = per_loop.get(loop)
    if got is None:
        kw: dict[str, Any] = {
            "decode_responses": True,
            "socket_connect_timeout": min(backend.socket_timeout, 5.0),
        }
        got = (
            redis.asyncio.Redis.from_url(backend.url, socket_timeout=backend.socket_timeout, **kw),
            redis.asyncio.Redis.from_url(
                backend.url, socket_timeout=MAX_POP_SECONDS + backend.socket_timeout, **kw
            ),
        )
        per_loop[loop] = got
    return got


def read(backend: Backend, step: Read | XRead | Scan) -> Any:
    """Run one read step with blocking calls."""
    try:
        if isinstance(step, Read):
            pipe = backend.cmd().pipeline(transaction=False)
            for method, args, kwargs in step.commands:
                getattr(pipe, method)(*args, **kwargs)
            return pipe.execute()
        if isinstance(step, XRead):
            return _blocking_client(backend).xread(
                {step.key: step.after}, count=step.count, block=step.block_ms
            )
        return list(backend.cmd().scan_iter(match=step.match, _type=step.type, count=1000))
    except (rex.RedisError, OSError) as exc:
        backend.translate(exc)


async def aread(backend: Backend, step: Read | XRead | Scan) -> Any:
    """Async twin of :func:`read`."""
    try:
        await backend.acheck()
        reads, blocking = _async_pair(backend)
        if isinstance(step, Read):
            pipe = reads.pipeline(transaction=False)
            for method, args, kwargs in step.commands:
                getattr(pipe, method)(*args, **kwargs)
            return await pipe.execute()
        if isinstance(step, XRead):
            return await blocking.xread(
                {step.key: step.after}, count=step.count, block=step.block_ms
            )
        return [k async for k in reads.scan_iter(match=step.match, _type=step.type, count=1000)]
    except (rex.RedisError, OSError) as exc:
        backend.translate(exc)
