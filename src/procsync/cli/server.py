"""``procsync server start | stop | status | url``: the embedded server.

These commands manage the per-user embedded Valkey of
:mod:`procsync.backend.embedded` (the server procsync starts on first use when
``PROCSYNC_URL`` is unset), in its runtime directory (``PROCSYNC_RUNTIME_DIR``, else
``$XDG_RUNTIME_DIR/procsync``, else ``/tmp/procsync-<uid>``):

* ``start`` starts it unless it is running, and prints its URL on stdout.
* ``stop`` stops it; every lock held on it is lost. Exit status 0 either way.
* ``status`` describes it without starting anything (``--json`` for scripts).
* ``url`` prints just its URL, starting it if needed, so that
  ``export PROCSYNC_URL=$(procsync server url)`` works; with ``--no-start`` it
  starts nothing and fails (exit status 1) when the server is not running.

Messages for people go to stderr; stdout carries only what a script would capture.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from procsync.backend import embedded
from procsync.errors import EmbeddedServerError

__all__ = ["register", "server"]


def _warn_if_url_set() -> None:
    url = os.environ.get("PROCSYNC_URL", "").strip()
    if url:
        click.echo(
            "note: PROCSYNC_URL is set, so procsync programs use that server, "
            "not this embedded one",
            err=True,
        )


def _status_dict(st: embedded.EmbeddedStatus) -> dict[str, Any]:
    """``status`` as JSON-ready data (paths as strings; no idle shutdown as null)."""
    d = dataclasses.asdict(st)
    d["dir"] = str(st.dir)
    idle = st.idle_timeout_s
    d["idle_timeout_s"] = None if idle is None or math.isinf(idle) else idle
    d["idle_shutdown"] = None if idle is None else not math.isinf(idle)
    return d


@click.group()
def server() -> None:
    """Manage the embedded server (used when PROCSYNC_URL is unset)."""


@server.command()
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0.0),
    default=None,
    help="Stop after this many seconds without clients; 0: never "
    "[default: PROCSYNC_IDLE_TIMEOUT or 600]. A running server keeps its own.",
)
def start(idle_timeout: float | None) -> None:
    """Start the embedded server unless it runs; print its URL."""
    _warn_if_url_set()
    was_running = embedded.status().running
    try:
        url = embedded.ensure_running(idle_timeout)
    except (EmbeddedServerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(url)
    click.echo("already running" if was_running else "started", err=True)


@server.command()
def stop() -> None:
    """Stop the embedded server (every lock held on it is lost)."""
    d = embedded.runtime_dir()
    try:
        stopped = embedded.stop()
    except EmbeddedServerError as exc:
        raise click.ClickException(str(exc)) from exc
    if stopped:
        click.echo(f"stopped the embedded server in {d}", err=True)
    else:
        click.echo(f"no embedded server was running in {d}", err=True)


@server.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def status(as_json: bool) -> None:
    """Describe the embedded server; starts nothing."""
    try:
        st = embedded.status()
    except EmbeddedServerError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(_status_dict(st)))
        return
    _warn_if_url_set()
    table = Table(title="procsync embedded server", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("state", "[green]running[/]" if st.running else "[yellow]not running[/]")
    table.add_row("url", st.url)
    table.add_row("directory", str(st.dir))
    if st.running:
        idle = st.idle_timeout_s
        table.add_row("server pid", str(st.pid))
        table.add_row("supervisor pid", str(st.supervisor_pid) if st.supervisor_pid else "-")
        table.add_row("binary", st.binary or "-")
        table.add_row("version", st.version or "-")
        table.add_row("uptime", f"{st.uptime_s:.0f} s" if st.uptime_s is not None else "-")
        table.add_row("clients", str(st.connected_clients))
        table.add_row(
            "idle shutdown",
            "-" if idle is None else ("never" if math.isinf(idle) else f"after {idle:g} s"),
        )
    elif st.supervisor_pid is not None:
        table.add_row("supervisor pid", f"{st.supervisor_pid} (its server does not answer)")
    Console(highlight=False).print(table)


@server.command()
@click.option("--no-start", is_flag=True, help="Start nothing; fail if it is not running.")
def url(no_start: bool) -> None:
    """Print the embedded server's URL (for `export PROCSYNC_URL=$(procsync server url)`)."""
    if no_start:
        st = embedded.status()
        if not st.running:
            raise click.ClickException(f"the embedded server is not running ({st.url})")
        click.echo(st.url)
        return
    try:
        click.echo(embedded.ensure_running())
    except (EmbeddedServerError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc


def register(group: click.Group) -> None:
    """Add ``server`` to the ``procsync`` command."""
    group.add_command(server)
