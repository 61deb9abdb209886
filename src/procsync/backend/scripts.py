"""The Lua script registry: one ``.lua`` file per primitive, each prefixed with the
shared library ``_lib.lua``, loaded once per server and run with EVALSHA (redis-py's
``Script`` reloads it when the server answers NOSCRIPT, e.g. after a restart)."""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["SCRIPT_NAMES", "script_source"]

#: Every script procsync runs. The contract of each is in the header of its file.
SCRIPT_NAMES = ("session", "permits", "event", "cond", "barrier", "value")


@functools.cache
def script_source(name: str) -> str:
    """The full text sent to the server for script ``name`` (library + body)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no procsync script named {name!r}")
    lua = resources.files("procsync").joinpath("lua")
    lib = lua.joinpath("_lib.lua").read_text(encoding="utf-8")
    body = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    return f"{lib}\n-- ==== {name}.lua ====\n{body}"
