"""``procsync demo``: run the examples of the notes for real.

``procsync demo`` lists the demos of :data:`procsync.demos.CATALOGUE`, one line
each; ``procsync demo NAME`` runs one. Each entry names its click command as
``"module:attribute"``, imported only when that demo runs (or its help is shown),
so a new demo plugs in by adding its entry to the catalogue.

The demos do their work in :mod:`procsync.demos`; this module draws it: a rich
progress bar and the checker's table, or with ``--json`` one JSON object on stdout.
A demo's exit status is 0 when its checker found nothing wrong, 1 otherwise.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from procsync.backend.client import redact_url, resolve_url
from procsync.demos import CATALOGUE, find
from procsync.demos.tickets import RushEvent, RushOptions, RushResult, run
from procsync.errors import ServerError

__all__ = ["demo", "register", "tickets"]


class _DemoGroup(click.Group):
    """A group whose commands come from the demo catalogue, imported on demand."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [info.name for info in CATALOGUE]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        info = find(cmd_name)
        if info is None:
            return None
        module, _, attr = info.command.partition(":")
        cmd = getattr(importlib.import_module(module), attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{info.command} is not a click command")
        return cmd


@click.group(cls=_DemoGroup, invoke_without_command=True)
@click.pass_context
def demo(ctx: click.Context) -> None:
    """Run an example of the notes with real processes (no NAME: list them)."""
    if ctx.invoked_subcommand is not None:
        return
    width = max(len(info.name) for info in CATALOGUE)
    for info in CATALOGUE:
        click.echo(f"{info.name:<{width}}  {info.summary}  [{info.lesson}]")
    click.echo("run one: procsync demo NAME   (options: procsync demo NAME --help)", err=True)


# -- tickets -------------------------------------------------------------------------

_EVENT_STYLE = {
    "go": ("green", "go"),
    "kill": ("red", "kill"),
    "pause": ("yellow", "pause"),
    "resume": ("yellow", "resume"),
    "respawn": ("cyan", "respawn"),
    "rejected": ("magenta", "fenced"),
    "lost": ("dim", "lost"),
    "exit": ("bold red", "exit"),
}


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _report(console: Console, d: dict[str, Any]) -> None:
    """The checker's table, then OK or the list of failures."""
    good, bad = "[green]✓[/]", "[bold red]✗[/]"

    def mark(ok: bool) -> str:
        return good if ok else bad

    table = Table(title="The checker (reads only the database)", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_column("")
    table.add_row("tickets sold", f"{d['sold']} / {d['initial']}", "")
    table.add_row("remaining", str(d["remaining"]), "")
    table.add_row(
        "sold + remaining",
        str(d["sold"] + d["remaining"]),
        mark(d["sold"] + d["remaining"] == d["initial"]),
    )
    table.add_row("oversold", str(d["oversold"]), mark(d["oversold"] == 0))
    table.add_row("sold twice", str(d["sold_twice"]), mark(d["sold_twice"] == 0))
    table.add_row(
        "tokens increasing in sale order",
        "yes" if d["tokens_increasing"] else "no",
        mark(d["tokens_increasing"]),
    )
    fence = "refused by the database" if d["fenced"] else "[red]database unfenced[/]"
    table.add_row("stale writes rejected", str(d["stale_rejected"]), fence)
    if d["chaos"]:
        table.add_row(
            "crashes (SIGKILL while holding)",
            str(d["crashes"]),
            f"lock back after p50 {_ms(d['recovery_p50_s'])}, max {_ms(d['recovery_max_s'])}",
        )
        table.add_row(
            "pauses (SIGSTOP past the ttl)",
            str(d["pauses"]),
            f"lock back after max {_ms(d['pause_recovery_max_s'])}; "
            f"{d['lost_on_release']} release(s) saw LockLostError",
        )
    table.add_row(
        "buyers",
        str(d["buyers"]),
        f"{d['processes_started']} processes, "
        f"{d['sales_per_buyer_min']}-{d['sales_per_buyer_max']} tickets each",
    )
    table.add_row("duration", f"{d['duration_s']:.2f} s", "")
    console.print(table)
    if d["ok"]:
        console.print("[bold green]OK[/]: every ticket sold exactly once.")
    else:
        console.print("[bold red]FAILED[/]:")
        for line in d["failures"]:
            console.print(f"  [red]-[/] {line}")


@click.command()
@click.option(
    "--buyers", type=click.IntRange(1, 1000), default=20, show_default=True, help="Buyer processes."
)
@click.option(
    "--tickets",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="Tickets on sale.",
)
@click.option("--chaos", is_flag=True, help="SIGKILL and SIGSTOP buyers while they hold the lock.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, no progress.")
@click.option(
    "--ttl",
    type=click.FloatRange(min=0.2, max=86400.0),
    default=None,
    help="Session lease of the buyers, seconds [default: 2 with --chaos, else PROCSYNC_TTL or 10].",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Keep the SQLite inventory in this file [default: a temporary file].",
)
@click.option("--seed", type=int, default=None, help="Seed the work times and chaos moments.")
@click.option(
    "--work",
    type=click.FloatRange(min=0.0, max=10.0),
    default=0.02,
    show_default=True,
    help="Mean seconds a buyer works while holding the lock.",
)
@click.option(
    "--kills",
    type=click.IntRange(min=0),
    default=None,
    help="SIGKILLs under --chaos [default: tickets/10, at least 1].",
)
@click.option(
    "--pauses",
    type=click.IntRange(min=0),
    default=None,
    help="SIGSTOPs under --chaos [default: tickets/50, at least 1].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0, max=86400.0),
    default=120.0,
    show_default=True,
    help="Give up (and fail) after this many seconds.",
)
@click.option(
    "--unfenced",
    is_flag=True,
    help="Leave out the database's token check: with --chaos, watch the lock alone oversell.",
)
def tickets(
    buyers: int,
    tickets: int,
    chaos: bool,
    as_json: bool,
    ttl: float | None,
    db: Path | None,
    seed: int | None,
    work: float,
    kills: int | None,
    pauses: int | None,
    timeout: float,
    unfenced: bool,
) -> None:
    """The ticket rush (抢票): buyer processes race for tickets under one Lock.

    The stock lives in a SQLite database; every sale carries the lock's fencing
    token and the database refuses one older than the last it accepted. At the
    end a checker reads the database: nothing oversold, no ticket sold twice,
    tokens increasing. Runs on PROCSYNC_URL, else on the embedded server.
    """
    try:
        url = resolve_url(None)
        opts = RushOptions(
            buyers=buyers,
            tickets=tickets,
            chaos=chaos,
            ttl=ttl,
            db=db,
            seed=seed,
            work_s=work,
            timeout=timeout,
            kills=kills,
            pauses=pauses,
            fenced=not unfenced,
            url=url,
        )
        if as_json:
            result = run(opts)
            click.echo(json.dumps(result.as_dict()))
        else:
            result = _run_with_progress(opts, url)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    except FileExistsError as exc:
        raise click.BadParameter(str(exc), param_hint="--db") from exc
    if not result.ok:
        raise SystemExit(1)


def _run_with_progress(opts: RushOptions, url: str) -> RushResult:
    """Run the rush under a rich progress bar, printing chaos events above it."""
    console = Console(highlight=False)
    where = redact_url(url)
    if not os.environ.get("PROCSYNC_URL", "").strip():
        where += " (embedded: PROCSYNC_URL is unset)"
    details = ["chaos" if opts.chaos else "no chaos"]
    if opts.effective_ttl is not None:
        details.append(f"ttl {opts.effective_ttl:g} s")
    if not opts.fenced:
        details.append("[red]database unfenced[/]")
    console.print(
        f"[bold]Ticket rush[/]: {opts.buyers} buyer processes, {opts.tickets} tickets, "
        f"{', '.join(details)}\n[dim]server {where}[/]"
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        task: TaskID = progress.add_task(f"starting {opts.buyers} buyers", total=opts.tickets)

        def on_progress(sold: int, total: int) -> None:
            progress.update(task, completed=min(sold, total))

        def on_event(ev: RushEvent) -> None:
            if ev.kind == "go":
                progress.update(task, description="tickets sold")
                return
            style, label = _EVENT_STYLE.get(ev.kind, ("", ev.kind))
            progress.console.print(f"[dim]{ev.at:7.3f}s[/] [{style}]{label:<8}[/] {ev.message}")

        result = run(opts, on_progress=on_progress, on_event=on_event)
    _report(console, result.as_dict())
    return result


def register(group: click.Group) -> None:
    """Add ``demo`` to the ``procsync`` command."""
    group.add_command(demo)
