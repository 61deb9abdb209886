"""The ``procsync`` command.

One click group; each area registers its commands from its own module:

    procsync server start|stop|status|url    procsync.cli.server
    procsync demo NAME                       procsync.cli.demo
    procsync ps | ls | show | watch | release   procsync.cli.registry

Every command that prints data takes ``--json`` for scripts; tables use rich.
"""

from __future__ import annotations

import importlib
import logging

import click

from procsync import __version__

__all__ = ["main"]

#: Modules that add commands to :data:`main` (each defines ``register(group)``).
COMMAND_MODULES = ("procsync.cli.server", "procsync.cli.demo", "procsync.cli.registry")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="procsync")
@click.option("-v", "--verbose", count=True, help="Log more (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Named, crash-safe Lock, Semaphore, Event... for any processes on any machine."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


for _mod in COMMAND_MODULES:
    try:
        _m = importlib.import_module(_mod)
    except ModuleNotFoundError as _exc:
        if _exc.name != _mod:
            raise
        continue
    _m.register(main)
