"""Imported by the benchmark forkserver before it forks anything: reads every Lua
script once, so that all the processes of a run use the same text even if the files
change on disk while it runs (procsync reads them lazily, on first use)."""

from procsync.backend.scripts import SCRIPT_NAMES, script_source

SOURCES = {name: script_source(name) for name in SCRIPT_NAMES}
