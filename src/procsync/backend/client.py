"""The connection to one server: URL, namespace, redis-py clients, scripts, checks.

A :class:`Backend` is shared by every primitive of a process that names the same
server and namespace (see :func:`get_backend`). It owns two redis-py clients over
one server: ``cmd`` for script calls (short socket timeout, so a dead server is an
error within seconds, never a hang) and ``wait`` for blocking pops (a timeout just
above the longest single pop). asyncio clients are made per event loop.

Every redis-py exception is translated here, in one place, into procsync's tree
(:mod:`procsync.errors`); messages name the server by its URL with the password
removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import threading
import weakref
from collections.abc import Sequence
from typing import Any, NoReturn
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.exceptions as rex

from procsync import _config
from procsync._validate import check_namespace
from procsync.backend.scripts import SCRIPT_NAMES, script_source
from procsync.errors import (
    ProtocolError,
    ServerError,
    ServerUnavailableError,
    ServerUnsupportedError,
    WrongTypeError,
)

__all__ = ["MAX_POP_SECONDS", "Backend", "get_backend", "redact_url"]

log = logging.getLogger("procsync.backend")

#: The longest single blocking pop; longer waits are made of several.
MAX_POP_SECONDS = 10.0
MIN_REDIS = (6, 2)
MIN_VALKEY = (7, 2)

ScriptArg = str | int | float


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None and "password" not in parts.query.lower():
        return url
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    netloc = parts.netloc
    if parts.password is not None:
        user = parts.username or ""
        host = netloc.rsplit("@", 1)[1]
        netloc = f"{user}:***@{host}"
    # Rebuilt by hand: urlunsplit would turn "unix:///path" into "unix:/path".
    out = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        out += f"?{query}"
    if parts.fragment:
        out += f"#{parts.fragment}"
    return out


def _version_tuple(text: str) -> tuple[int, ...]:
    out = []
    for part in text.split(".")[:3]:
        digits = re.match(r"\d+", part)
        out.append(int(digits.group()) if digits else 0)
    return tuple(out)


class Backend:
    """One server and namespace, as seen from this process."""

    __slots__ = (
        "__weakref__",
        "_aclients",
        "_checked",
        "_cmd",
        "_lock",
        "_password",
        "_scripts",
        "_wait",
        "fence_key",
        "gone_key",
        "namespace",
        "prefix",
        "safe_url",
        "server_info",
        "sessions_key",
        "socket_timeout",
        "url",
    )

    def __init__(self, url: str, namespace: str) -> None:
        if not isinstance(url, str) or not url:
            raise TypeError("url must be a non-empty str")
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"unsupported server URL {redact_url(url)!r}: use redis://, rediss:// or unix://"
            )
        self.url = url
        self.safe_url = redact_url(url)
        self._password = urlsplit(url).password
        self.namespace = check_namespace(namespace)
        self.prefix = f"procsync:{{{self.namespace}}}:"
        self.sessions_key = self.prefix + "sessions"
        self.fence_key = self.prefix + "fence"
        self.gone_key = self.prefix + "gone"
        self.socket_timeout = _config.env_socket_timeout()
        self.server_info: dict[str, str] = {}
        self._lock = threading.Lock()
        self._cmd: redis.Redis | None = None
        self._wait: redis.Redis | None = None
        self._scripts: dict[str, Any] = {}
        self._checked = False
        self._aclients: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop,
            tuple[redis.asyncio.Redis, redis.asyncio.Redis, dict[str, Any]],
        ] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return f"<procsync.Backend {self.safe_url} namespace={self.namespace!r}>"

    # -- errors ---------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return text

    def translate(self, exc: BaseException) -> NoReturn:
        """Raise the procsync exception for a redis-py exception, chained."""
        msg = self._scrub(str(exc))
        if isinstance(exc, rex.AuthenticationError):
            raise ServerUnavailableError(
                f"the procsync server at {self.safe_url} refused the credentials: {msg}"
            ) from None
        if isinstance(exc, (rex.ConnectionError, rex.TimeoutError, OSError)):
            raise ServerUnavailableError(
                f"cannot reach the procsync server at {self.safe_url}: {msg or type(exc).__name__}"
            ) from exc
        if isinstance(exc, rex.ResponseError):
            if msg.startswith("WRONGTYPE") or "WRONGTYPE" in msg:
                raise WrongTypeError(
                    f"a key procsync uses on {self.safe_url} holds another type of value: {msg}"
                ) from exc
            if msg.startswith("NOPERM") or "NOPERM" in msg:
                raise ServerError(
                    f"the server at {self.safe_url} denies procsync a command ({msg}); the "
                    "ACL user needs +@scripting +@read +@write +@stream +@connection"
                ) from exc
            raise ServerError(f"the server at {self.safe_url} answered an error: {msg}") from exc
        if isinstance(exc, rex.RedisError):
            raise ProtocolError(f"unexpected reply from {self.safe_url}: {msg}") from exc
        raise exc

    # -- sync -----------------------------------------------------------------

    def _make_sync(self, socket_timeout: float) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.url,
                decode_responses=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=min(socket_timeout, 5.0),
                health_check_interval=0,
                client_name=None,
            )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"bad server URL {self.safe_url}: {self._scrub(str(exc))}") from None

    def cmd(self) -> redis.Redis:
        """The client for script calls (created and checked on first use)."""
        c = self._cmd
        if c is None:
            with self._lock:
                if self._cmd is None:
                    client = self._make_sync(self.socket_timeout)
                    if not self._checked:
                        self._check(client)
                    self._scripts = {
                        n: client.register_script(script_source(n)) for n in SCRIPT_NAMES
                    }
                    self._wait = self._make_sync(MAX_POP_SECONDS + self.socket_timeout)
                    self._cmd = client
                c = self._cmd
        return c

    def call(self, script: str, keys: Sequence[str], args: Sequence[ScriptArg]) -> list[Any]:
        """Run ``script`` atomically on the server and return its reply list."""
        client = self.cmd()
        try:
            reply = self._scripts[script](keys=list(keys), args=list(args), client=client)
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        return self._check_reply(script, reply)

    def pop(self, key: str, timeout: float) -> str | None:
        """Block until a value is pushed onto list ``key`` or ``timeout`` seconds pass."""
        self.cmd()
        assert_client = self._wait
        if assert_client is None:  # pragma: no cover - cmd() always sets it
            raise ServerError("internal: wait client missing")
        secs = max(0.001, min(timeout, MAX_POP_SECONDS))
        try:
            got = assert_client.blpop([key], timeout=round(secs, 3))
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        if got is None:
            return None
        return str(got[1])

    def _check_reply(self, script: str, reply: Any) -> list[Any]:
        if not isinstance(reply, list) or not reply or not isinstance(reply[0], str):
            raise ProtocolError(
                f"script {script!r} on {self.safe_url} gave a malformed reply {reply!r:.200}"
            )
        return reply

    # -- server check ---------------------------------------------------------

    def _check(self, client: redis.Redis) -> None:
        """Refuse servers that are too old or evict keys (that would drop locks)."""
        try:
            info = client.info("server")
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        self._apply_check(info, lambda: self._policy_sync(client))

    def _policy_sync(self, client: redis.Redis) -> str | None:
        try:
            got = client.config_get("maxmemory-policy")
            if got:
                return str(next(iter(got.values())))
        except rex.ResponseError:
            pass
        except rex.RedisError as exc:
            self.translate(exc)
        try:
            mem = client.info("memory")
            return str(mem.get("maxmemory_policy")) if mem.get("maxmemory_policy") else None
        except rex.RedisError as exc:
            self.translate(exc)

    def _apply_check(self, info: dict[str, Any], policy_of: Any) -> None:
        if "valkey_version" in info:
            product, version, minimum = "Valkey", str(info["valkey_version"]), MIN_VALKEY
        else:
            product, version, minimum = "Redis", str(info.get("redis_version", "0")), MIN_REDIS
        if _version_tuple(version) < minimum:
            need = ".".join(map(str, minimum))
            raise ServerUnsupportedError(
                f"{product} {version} at {self.safe_url} is too old: procsync needs "
                f"{product} >= {need} (Redis >= 6.2 or Valkey >= 7.2)"
            )
        policy = policy_of()
        if policy is not None and policy != "noeviction":
            raise ServerUnsupportedError(
                f"the server at {self.safe_url} has maxmemory-policy {policy!r}: it may evict "
                "the keys that hold locks. Set it to 'noeviction' (CONFIG SET maxmemory-policy "
                "noeviction) or use a dedicated server."
            )
        if policy is None:
            log.warning("could not read maxmemory-policy of %s; assuming noeviction", self.safe_url)
        self.server_info = {"product": product, "version": version, "policy": policy or "?"}
        self._checked = True

    # -- asyncio --------------------------------------------------------------

    def _aset(self) -> tuple[redis.asyncio.Redis, redis.asyncio.Redis, dict[str, Any]]:
        loop = asyncio.get_running_loop()
        got = self._aclients.get(loop)
        if got is None:
            kw: dict[str, Any] = {"decode_responses": True, "health_check_interval": 0}
            try:
                cmd = redis.asyncio.Redis.from_url(
                    self.url,
                    socket_timeout=self.socket_timeout,
                    socket_connect_timeout=min(self.socket_timeout, 5.0),
                    **kw,
                )
                wait = redis.asyncio.Redis.from_url(
                    self.url,
                    socket_timeout=MAX_POP_SECONDS + self.socket_timeout,
                    socket_connect_timeout=min(self.socket_timeout, 5.0),
                    **kw,
                )
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"bad server URL {self.safe_url}: {self._scrub(str(exc))}"
                ) from None
            scripts = {n: cmd.register_script(script_source(n)) for n in SCRIPT_NAMES}
            got = (cmd, wait, scripts)
            self._aclients[loop] = got
        return got

    async def acheck(self) -> None:
        """Async twin of the first-use server check."""
        if self._checked:
            return
        cmd, _, _ = self._aset()
        try:
            info = await cmd.info("server")
            policy: str | None = None
            try:
                got = await cmd.config_get("maxmemory-policy")
                policy = str(next(iter(got.values()))) if got else None
            except rex.ResponseError:
                mem = await cmd.info("memory")
                policy = mem.get("maxmemory_policy")
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        self._apply_check(info, lambda: policy)

    async def acall(self, script: str, keys: Sequence[str], args: Sequence[ScriptArg]) -> list[Any]:
        """Async twin of :meth:`call`."""
        await self.acheck()
        cmd, _, scripts = self._aset()
        try:
            reply = await scripts[script](keys=list(keys), args=list(args), client=cmd)
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        return self._check_reply(script, reply)

    async def apush(self, key: str, value: str, ttl_ms: int = 120_000) -> None:
        """Push ``value`` onto list ``key`` (expiring after ``ttl_ms``): how a cancelled
        waiter ends its own pending pop."""
        cmd, _, _ = self._aset()
        try:
            async with cmd.pipeline(transaction=True) as pipe:
                pipe.lpush(key, value)
                pipe.pexpire(key, ttl_ms)
                await pipe.execute()
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)

    async def apop(self, key: str, timeout: float) -> str | None:
        """Async twin of :meth:`pop`."""
        _, wait, _ = self._aset()
        secs = max(0.001, min(timeout, MAX_POP_SECONDS))
        try:
            got = await wait.blpop([key], timeout=round(secs, 3))
        except rex.RedisError as exc:
            self.translate(exc)
        except OSError as exc:
            self.translate(exc)
        if got is None:
            return None
        return str(got[1])

    def close(self) -> None:
        """Drop the sync clients (their sockets close)."""
        for c in (self._cmd, self._wait):
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._cmd = self._wait = None


_backends: dict[tuple[str, str], Backend] = {}
_backends_lock = threading.Lock()


def resolve_url(url: str | None = None) -> str:
    """The server URL to use: ``url``, else ``PROCSYNC_URL``, else the embedded server
    (started on first use)."""
    if url is not None:
        return url
    env = _config.env_url()
    if env is not None:
        return env
    from procsync.backend import embedded

    return embedded.ensure_running()


def get_backend(url: str | None = None, namespace: str | None = None) -> Backend:
    """The process's :class:`Backend` for ``url`` and ``namespace`` (defaults from the
    environment; no URL anywhere means the embedded server)."""
    ns = namespace if namespace is not None else _config.env_namespace()
    key_url = url if url is not None else (_config.env_url() or "")
    with _backends_lock:
        b = _backends.get((key_url, ns))
    if b is not None:
        return b
    real = resolve_url(url)
    with _backends_lock:
        b = _backends.get((key_url, ns))
        if b is None:
            b = Backend(real, ns)
            _backends[(key_url, ns)] = b
    return b


def _after_fork_in_child() -> None:
    # A child owns nothing of its parent's connections: start over lazily.
    global _backends_lock
    _backends_lock = threading.Lock()
    _backends.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
