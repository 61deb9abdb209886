"""The Lua script registry: one ``.lua`` file per primitive, each prefixed with the
shared library ``_lib.lua``, loaded once per server and run with EVALSHA
(:meth:`procsync.backend.client.Backend.call` loads it again when the server answers
NOSCRIPT, e.g. after a restart).

A script may also have a *prelude* (``PRELUDES``), sent before the library: every
EVALSHA runs the whole chunk, so each ``local function`` of the library makes its
closure on every call; a prelude answers a script's common cases before that, and
falls through, having written nothing, to the library and the script for the rest.
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["PRELUDES", "SCRIPT_NAMES", "script_source"]

#: Every script procsync runs. The contract of each is in the header of its file.
SCRIPT_NAMES = ("session", "permits", "event", "cond", "barrier", "value", "epoch")

#: Script name -> the file run before the library for it (same KEYS and ARGV).
PRELUDES = {"permits": "permits_fast"}


def _read(name: str) -> str:
    lua = resources.files("procsync").joinpath("lua")
    return lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")


@functools.cache
def script_source(name: str, *, prelude: bool = True) -> str:
    """The full text sent to the server for script ``name``: its prelude if any,
    the library, the body. ``prelude=False`` leaves the prelude out (the same
    behaviour by contract, all of it through the library: for tests and measures)."""
    if name not in SCRIPT_NAMES:
        raise KeyError(f"no procsync script named {name!r}")
    head = ""
    if prelude and name in PRELUDES:
        head = f"-- ==== {PRELUDES[name]}.lua ====\n{_read(PRELUDES[name])}\n"
    return f"{head}{_read('_lib')}\n-- ==== {name}.lua ====\n{_read(name)}"
