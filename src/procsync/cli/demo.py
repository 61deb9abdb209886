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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from procsync.backend.client import redact_url, resolve_url
from procsync.demos import CATALOGUE, find
from procsync.demos.tickets import SCENARIOS, RushEvent, RushOptions, RushResult, run
from procsync.errors import ServerError

__all__ = ["daemon", "demo", "isolation", "ktv", "register", "server", "tickets", "traffic"]


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
    if d["chaos"] or d["scenario"]:
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
    help="Leave out the database's token check: with --chaos or --scenario, watch the lock "
    "alone oversell.",
)
@click.option(
    "--scenario",
    type=click.Choice(SCENARIOS),
    default=None,
    help="Instead of --chaos, stage one fault, the same every run. stale-write: SIGSTOP a "
    "holder between reading the stock and writing it, keep it stopped until another buyer "
    "has bought, then let it write.",
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
    scenario: str | None,
) -> None:
    """The ticket rush (抢票): buyer processes race for tickets under one Lock.

    The stock lives in a SQLite database; every sale carries the lock's fencing
    token and the database refuses one older than the last it accepted. At the
    end a checker reads the database: nothing oversold, no ticket sold twice,
    tokens increasing. Runs on PROCSYNC_URL, else on the embedded server.
    """
    if chaos and scenario is not None:
        raise click.UsageError("--chaos and --scenario exclude each other")
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
            scenario=scenario,
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
    if opts.scenario is not None:
        details = [f"staged: {opts.scenario}"]
    else:
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


# -- shared by the lesson demos ------------------------------------------------------


def _where(url: str) -> str:
    """The server, for a demo's header (password redacted; says when it is embedded)."""
    where = redact_url(url)
    if not os.environ.get("PROCSYNC_URL", "").strip():
        where += " (embedded: PROCSYNC_URL is unset)"
    return where


def _verdict(console: Console, ok: bool, good: str, failures: list[str]) -> None:
    """OK and what it means, or FAILED and the list of failures."""
    if ok:
        console.print(f"[bold green]OK[/]: {good}")
        return
    console.print("[bold red]FAILED[/]:")
    for line in failures:
        console.print(f"  [red]-[/] {escape(line)}")


def _mark(ok: bool) -> str:
    return "[green]✓[/]" if ok else "[bold red]✗[/]"


def _finish(result: Any, as_json: bool) -> None:
    """Print the JSON object (with --json) and exit 1 if a property failed."""
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    if not result.ok:
        raise SystemExit(1)


_json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (with an `ok` key), no display."
)


_F = TypeVar("_F", bound=Callable[..., Any])


def _timeout_option(default: float) -> Callable[[_F], _F]:
    return click.option(
        "--timeout",
        type=click.FloatRange(min=1.0, max=86400.0),
        default=default,
        show_default=True,
        help="Give up (and fail) after this many seconds.",
    )


# -- isolation ------------------------------------------------------------------------

_ISOLATION_CODE = {
    "multiprocessing": (
        "n = {n}\n\n"
        "def func():\n"
        "    global n\n"
        "    n = n - 1\n\n"
        "# {n} x Process(target=func)\n"
        "print(n)"
    ),
    "procsync": (
        'n = Value("i", {n}, name=...)\n\n'
        "def func(n):\n"
        "    with n.get_lock():\n"
        "        n.value = n.value - 1\n\n"
        "# {n} x Process(target=func, args=(n,))\n"
        "print(n.value)"
    ),
}


@click.command()
@click.option(
    "--children",
    type=click.IntRange(1, 2000),
    default=100,
    show_default=True,
    help="Children per leg; n starts at this number.",
)
@click.option(
    "--start-method",
    type=click.Choice(["fork", "spawn", "forkserver"]),
    default="fork",
    show_default=True,
    help="How the children are started (the notes' programs fork, as Linux does).",
)
@_json_option
@_timeout_option(120.0)
def isolation(children: int, start_method: str, as_json: bool, timeout: float) -> None:
    """Data isolation (进程之间的数据隔离问题), and the way out, side by side.

    The notes' first program: children each run n = n - 1 on a global n, and the
    parent still prints 100 (each child changed its own copy). Then the same with n
    a procsync.Value in the server: the parent prints 0. Exits 1 unless the
    multiprocessing parent sees 100 and the procsync parent 0.
    """
    from procsync.demos import isolation as demo

    try:
        url = resolve_url(None)
        opts = demo.IsolationOptions(
            children=children, start_method=start_method, url=url, timeout=timeout
        )
        result = demo.run(opts) if as_json else _isolation_live(demo, opts, url)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(result, as_json)


def _isolation_live(demo: Any, opts: Any, url: str) -> Any:
    console = Console(highlight=False)
    console.print(
        f"[bold]Data isolation[/]: the notes' first program, {opts.children} children "
        f"({opts.start_method}), twice\n[dim]server {_where(url)}[/]"
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def on_leg(library: str) -> None:
            tasks[library] = progress.add_task(f"{library:<15}", total=opts.children)

        def on_child(library: str, joined: int) -> None:
            progress.update(tasks[library], completed=joined)

        result = demo.run(opts, on_leg=on_leg, on_child=on_child)
    panels = []
    for leg, colour in ((result.multiprocessing, "yellow"), (result.procsync, "green")):
        body = Table.grid(padding=(1, 0))
        code = _ISOLATION_CODE[leg.library].format(n=leg.start)
        body.add_row(Syntax(code, "python", theme="ansi_dark"))
        printed = "-" if leg.printed is None else str(leg.printed)
        body.add_row(f"the parent prints [bold {colour}]{printed}[/]")
        why = (
            "each child changed its own copy of n"
            if leg.library == "multiprocessing"
            else "every child changed the one n in the server"
        )
        body.add_row(f"[dim]{why}; {leg.duration_s:.2f} s[/]")
        panels.append(Panel(body, title=leg.library, border_style=colour, expand=True))
    side_by_side = Table.grid(expand=True, padding=(0, 1))
    side_by_side.add_column(ratio=1)
    side_by_side.add_column(ratio=1)
    side_by_side.add_row(*panels)
    console.print(side_by_side)
    _verdict(
        console,
        result.ok,
        "processes don't share memory; a procsync.Value is the one n of every process.",
        list(result.failures),
    )
    return result


# -- ktv ---------------------------------------------------------------------------------


class _KtvView:
    """The live timeline: one row per person, a bar of when they waited and sang."""

    WIDTH = 48

    def __init__(self, people: int, room: int, expected_s: float) -> None:
        self.people, self.room, self.expected = people, room, expected_s
        self.queued: dict[int, float] = {}
        self.entered: dict[int, float] = {}
        self.left: dict[int, float] = {}
        self.inside: tuple[int, ...] = ()
        self.waiting: tuple[int, ...] = ()
        self.most = 0
        self.clock0: float | None = None  # local monotonic time of the server's 0

    def step(self, ev: Any) -> None:
        if self.clock0 is None:
            self.clock0 = time.monotonic() - ev.at
        {"queue": self.queued, "in": self.entered, "out": self.left}[ev.what][ev.person] = ev.at
        self.inside, self.waiting = ev.inside, ev.waiting
        self.most = max(self.most, len(ev.inside))

    def now(self) -> float:
        return 0.0 if self.clock0 is None else time.monotonic() - self.clock0

    def __rich__(self) -> Any:
        if self.left and len(self.left) == self.people:
            now = max(self.left.values())  # everyone is out: the timeline is complete
        else:
            now = max([self.now(), *self.left.values()])
        span = max(now, self.expected, 0.001)
        cell = span / self.WIDTH
        t = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        t.add_column("")
        t.add_column("", width=9)
        t.add_column(f"0 s{'':{self.WIDTH - 10}}{span:6.1f} s", no_wrap=True)
        for p in range(self.people):
            q, i, o = self.queued.get(p), self.entered.get(p), self.left.get(p)
            bar = []
            for c in range(self.WIDTH):
                a, b = c * cell, (c + 1) * cell
                if i is not None and i < b and (o if o is not None else now) > a:
                    bar.append("[magenta]█[/]")
                elif q is not None and q < b and (i if i is not None else now) > a:
                    bar.append("[dim]░[/]")
                else:
                    bar.append(" ")
            if o is not None:
                state = "[dim]出来了[/]"
            elif i is not None:
                state = "[bold magenta]进了KTV[/]"
            elif q is not None:
                state = "[yellow]waiting[/]"
            else:
                state = "[dim]-[/]"
            t.add_row(f"person {p}", state, "".join(bar))
        keys = " ".join(f"[{p}]" for p in self.inside) + " [ ]" * (self.room - len(self.inside))
        head = (
            f"room for {self.room}: [bold magenta]{keys.strip()}[/]   "
            f"waiting: {len(self.waiting)}   most inside at once: {self.most}"
        )
        return Group(head, t)


@click.command()
@click.option("--people", type=click.IntRange(1, 200), default=10, show_default=True)
@click.option(
    "--room",
    type=click.IntRange(1, 200),
    default=3,
    show_default=True,
    help="Keys: Semaphore(ROOM).",
)
@click.option(
    "--speed",
    type=click.FloatRange(min=0.01, max=1000.0),
    default=1.0,
    show_default=True,
    help="Divide every stay (the notes: 1-4 s) by this.",
)
@click.option("--seed", type=int, default=None, help="Seed the stays.")
@_json_option
@_timeout_option(120.0)
def ktv(
    people: int, room: int, speed: float, seed: int | None, as_json: bool, timeout: float
) -> None:
    """The KTV room (信号量): people share Semaphore(3); never more than 3 inside.

    Every person records going in and coming out with the server's clock (not its
    own); the checker replays that history and fails if more than ROOM were ever
    inside, if someone never got in or out, or if the room never filled up.
    """
    from procsync.demos import ktv as demo

    try:
        url = resolve_url(None)
        opts = demo.KtvOptions(
            people=people, room=room, speed=speed, seed=seed, url=url, timeout=timeout
        )
        if as_json:
            result = demo.run(opts)
        else:
            console = Console(highlight=False)
            console.print(
                f"[bold]KTV[/]: {people} people, a room for {room} — Semaphore({room}), "
                f"stays of 1-4 s / {speed:g}\n[dim]server {_where(url)}; "
                "times from the server's clock[/]"
            )
            expected = sum(demo.planned_stays(opts).values()) / room
            view = _KtvView(people, room, expected)
            with Live(view, console=console, refresh_per_second=8, transient=False):
                result = demo.run(opts, on_step=view.step)
            console.print()
            v = result.verdict
            table = Table(title="The checker (reads only the server's record)", show_header=False)
            table.add_column("what")
            table.add_column("value", justify="right")
            table.add_column("")
            table.add_row("entered / came out", f"{v.entered} / {v.left} of {v.people}", "")
            table.add_row(
                "most inside at once", f"{v.max_inside} / {v.room}", _mark(v.max_inside <= v.room)
            )
            table.add_row("moments over the limit", str(v.overfull_moments), "")
            d = result.as_dict()
            table.add_row("people who waited for a key", str(d["waited"]), "")
            table.add_row("longest wait", f"{d['max_wait_s']:.2f} s", "")
            table.add_row("duration", f"{d['duration_s']:.2f} s", "")
            console.print(table)
            _verdict(
                console,
                result.ok,
                f"never more than {room} inside, and everyone sang.",
                list(result.failures),
            )
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(result, as_json)


# -- traffic -----------------------------------------------------------------------------


def _traffic_line(r: Any, police_wait: float, waits: dict[int, float]) -> str | None:
    """One record in the notes' style (None: not shown)."""
    t = f"[dim]{r.at:7.3f}s[/] "
    if r.kind == "light":
        return t + ("[bold red] 红灯亮[/]" if r.what == "red" else "[bold green] 绿灯亮[/]")
    if r.what == "wait":
        waits[r.who] = r.at
        if r.kind == "car":
            return t + f"car {r.who} 等待"
        return t + f"[blue]police_car {r.who}[/] [dim]waits at most {police_wait:g} s[/]"
    if r.what != "pass":
        return None
    if r.kind == "car":
        return t + f"car {r.who} 通过"
    note = ""
    if r.woke is False:
        note = f" [dim](on red, after {r.at - waits.get(r.who, r.at):.2f} s)[/]"
    elif r.woke is True:
        note = " [dim](the light turned green)[/]"
    return t + f"[blue]police_car {r.who}通过[/]{note}"


@click.command()
@click.option(
    "--vehicles",
    type=click.IntRange(1, 500),
    default=20,
    show_default=True,
    help="Cars and police cars (random.choice, as in the notes).",
)
@click.option(
    "--period",
    type=click.FloatRange(min=0.05, max=600.0),
    default=2.0,
    show_default=True,
    help="Seconds between two switches of the light.",
)
@click.option(
    "--police-wait",
    type=click.FloatRange(min=0.01, max=600.0),
    default=0.5,
    show_default=True,
    help="How long a police car waits at a red light.",
)
@click.option("--seed", type=int, default=None, help="Seed the vehicles and their arrivals.")
@_json_option
@_timeout_option(180.0)
def traffic(
    vehicles: int,
    period: float,
    police_wait: float,
    seed: int | None,
    as_json: bool,
    timeout: float,
) -> None:
    """The traffic light (事件 红绿灯): one Event, a light process, cars and police cars.

    Green sets the Event, red clears it; cars wait for green, police cars wait at
    most --police-wait. The checker reads a history stamped by the server's clock
    and fails if a car passed on red, or a police car passed on red without
    waiting its time.
    """
    from procsync.demos import traffic as demo

    try:
        url = resolve_url(None)
        opts = demo.TrafficOptions(
            vehicles=vehicles,
            period=period,
            police_wait=police_wait,
            seed=seed,
            url=url,
            timeout=timeout,
        )
        if as_json:
            result = demo.run(opts)
        else:
            console = Console(highlight=False)
            console.print(
                f"[bold]Traffic light[/]: {vehicles} vehicles, the light switches every "
                f"{period:g} s, police cars wait {police_wait:g} s\n"
                f"[dim]server {_where(url)}; times from the server's clock[/]"
            )
            waits: dict[int, float] = {}

            def on_entry(r: Any) -> None:
                line = _traffic_line(r, police_wait, waits)
                if line is not None:
                    console.print(line)

            result = demo.run(opts, on_entry=on_entry)
            v = result.verdict
            table = Table(title="The checker (reads only the server's record)", show_header=False)
            table.add_column("what")
            table.add_column("value", justify="right")
            table.add_column("")
            table.add_row(
                "vehicles passed",
                f"{v.passed} / {v.vehicles}",
                f"{v.cars} cars, {v.police} police cars",
            )
            table.add_row("cars that waited for green", str(v.cars_waited), "")
            table.add_row(
                "passed on red without waiting their turn",
                str(v.passed_on_red),
                _mark(v.passed_on_red == 0),
            )
            wait = v.min_police_red_wait_s
            table.add_row(
                "police cars on red / on green",
                f"{v.police_on_red} / {v.police_on_green}",
                ""
                if wait is None
                else f"shortest red wait {wait:.3f} s {_mark(wait >= police_wait - 0.001)}",
            )
            table.add_row("light changes", str(v.light_changes), "")
            console.print(table)
            _verdict(
                console,
                result.ok,
                "no car passed on red; police cars passed on red only after their wait.",
                list(result.failures),
            )
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(result, as_json)


# -- daemon -------------------------------------------------------------------------------


def _sessions_table(sessions: tuple[Any, ...], prefix: str) -> Table:
    now = time.time()
    t = Table(title="procsync.sessions() — the registry", title_justify="left")
    for col in ("session", "pid", "heartbeat", "state", "last heartbeat"):
        t.add_column(col)
    style = {"alive": "green", "dead": "bold red", "left": "dim", "stalled": "yellow"}
    for s in sessions:
        ago = f"{max(0.0, now - s.last_heartbeat):.1f} s ago" if s.state == "alive" else "-"
        t.add_row(
            s.name.removeprefix(prefix),
            str(s.pid),
            s.heartbeat,
            f"[{style.get(s.state, '')}]{s.state}[/]",
            ago,
        )
    return t


@click.command()
@click.option(
    "--workers",
    type=click.IntRange(1, 50),
    default=3,
    show_default=True,
    help="Workers reporting alive through a heartbeat process; one is killed.",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0.2, max=600.0),
    default=2.0,
    show_default=True,
    help="Session lease of every worker.",
)
@click.option(
    "--observe",
    type=click.FloatRange(min=0.0, max=600.0),
    default=None,
    help="Seconds to watch them before and after the kill [default: one ttl].",
)
@click.option(
    "--stuck/--no-stuck",
    default=True,
    show_default=True,
    help="Also show why a process: a heartbeat thread vs process, main thread stuck in C.",
)
@_json_option
@_timeout_option(120.0)
def daemon(
    workers: int, ttl: float, observe: float | None, stuck: bool, as_json: bool, timeout: float
) -> None:
    """Daemon processes that report alive (守护进程 报活), and the registry.

    Workers open sessions whose heartbeat is a daemon process; one worker is
    SIGKILLed and the registry records its death, its heartbeat process ends too,
    the others report on. Then (--stuck) a heartbeat thread and a heartbeat process
    face a main thread stuck in C holding the GIL: only the process keeps reporting.
    """
    from procsync.demos import daemon as demo

    try:
        url = resolve_url(None)
        opts = demo.DaemonOptions(
            workers=workers, ttl=ttl, observe=observe, stuck=stuck, url=url, timeout=timeout
        )
        result = demo.run(opts) if as_json else _daemon_live(demo, opts, url)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(result, as_json)


def _daemon_live(demo: Any, opts: Any, url: str) -> Any:
    console = Console(highlight=False)
    console.print(
        f"[bold]报活[/]: sessions whose heartbeat is a daemon process (ttl {opts.ttl:g} s)"
        f"\n[dim]server {_where(url)}[/]"
    )
    style = {
        "kill": "bold red",
        "died": "red",
        "registry": "cyan",
        "heartbeat-gone": "magenta",
        "phase": "bold",
        "lost": "bold red",
        "kept": "bold green",
        "stuck": "yellow",
    }
    last: tuple[Any, ...] = ()
    prefix = ""
    with Live(Text(""), console=console, refresh_per_second=4, transient=True) as live:

        def on_event(ev: Any) -> None:
            nonlocal prefix, last
            if ev.kind == "snapshot":
                if ev.sessions:
                    prefix = ev.sessions[0].name.rsplit("/", 1)[0] + "/"
                last = ev.sessions
                live.update(_sessions_table(ev.sessions, prefix))
                return
            s = style.get(ev.kind, "")
            text = f"[{s}]{escape(ev.message)}[/]" if s else escape(ev.message)
            live.console.print(f"[dim]{ev.at:7.3f}s[/] {text}")

        result = demo.run(opts, on_event=on_event)
    if last:
        console.print(_sessions_table(last, prefix))
    d = result.as_dict()
    v = result.verdict
    t = Table(title="The checker (registry events, /proc)", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("")
    t.add_row("killed", str(d["victim"] and d["victim"].rsplit("/", 1)[-1]), "")
    report = d["death_report_ms"]
    t.add_row(
        "death in the registry",
        "-" if report is None else f"{report:.1f} ms after SIGKILL",
        _mark(v.deaths_recorded == v.killed),
    )
    hb = d["heartbeat_exit_ms"]
    t.add_row(
        "its heartbeat process ended",
        "-" if hb is None else f"{hb:.1f} ms after SIGKILL",
        _mark(hb is not None),
    )
    t.add_row("false deaths", str(v.false_deaths), _mark(v.false_deaths == 0))
    t.add_row("left cleanly at the end", str(v.survivors_left), "")
    if d["stuck_s"] is not None:
        t.add_row(
            f"main thread stuck {d['stuck_s']:g} s: heartbeat thread",
            "reported dead" if v.thread_heartbeat_died else "survived",
            "[dim](the lesson: a thread cannot report)[/]" if v.thread_heartbeat_died else "",
        )
        t.add_row(
            f"main thread stuck {d['stuck_s']:g} s: heartbeat process",
            "kept reporting" if v.process_heartbeat_survived else "lost",
            _mark(bool(v.process_heartbeat_survived)),
        )
    console.print(t)
    _verdict(
        console,
        result.ok,
        "a daemon process reported for each worker; a killed worker was reported dead at once.",
        list(result.failures),
    )
    return result


# -- server -------------------------------------------------------------------------------

_SERVER_STYLE = {
    "kill": "bold red",
    "died": "red",
    "fork": "cyan",
    "joined": "dim cyan",
    "listen": "bold",
    "load": "bold",
}


@click.command()
@click.option("--tickets", type=click.IntRange(1, 10_000_000), default=1000, show_default=True)
@click.option(
    "--clients",
    type=click.IntRange(1, 5000),
    default=50,
    show_default=True,
    help="Concurrent client connections.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Pre-fork worker processes.",
)
@click.option(
    "--per-connection",
    is_flag=True,
    help="The notes' model: one forked process per client connection.",
)
@click.option(
    "--kills",
    type=click.IntRange(0, 100),
    default=1,
    show_default=True,
    help="Workers to SIGKILL while they hold the lock.",
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0.2, max=86400.0),
    default=None,
    help="Session lease of the workers [default: PROCSYNC_TTL or 10].",
)
@click.option("--seed", type=int, default=None, help="Seed the moments of the kills.")
@_json_option
@_timeout_option(120.0)
def server(
    tickets: int,
    clients: int,
    workers: int,
    per_connection: bool,
    kills: int,
    ttl: float | None,
    seed: int | None,
    as_json: bool,
    timeout: float,
) -> None:
    """The notes' TCP server made real: a ticket server on 127.0.0.1.

    Worker processes (pre-fork, or --per-connection) are registered sessions that
    sell from one SQLite inventory under a procsync Lock, with fencing tokens. Many
    client connections buy at once; a worker is killed while it holds the lock. The
    checker fails on an oversold or twice-sold ticket, a sale no client was told of,
    a kill the registry missed, or a false death. Reports throughput and latency.
    """
    from procsync.demos import server as demo

    try:
        url = resolve_url(None)
        opts = demo.ServerOptions(
            tickets=tickets,
            clients=clients,
            workers=workers,
            per_connection=per_connection,
            kills=kills,
            ttl=ttl,
            url=url,
            seed=seed,
            timeout=timeout,
        )
        result = demo.run(opts) if as_json else _server_live(demo, opts, url)
    except ServerError as exc:
        raise click.ClickException(str(exc)) from exc
    _finish(result, as_json)


def _server_live(demo: Any, opts: Any, url: str) -> Any:
    console = Console(highlight=False)
    mode = (
        "one process per connection" if opts.per_connection else f"{opts.workers} pre-fork workers"
    )
    console.print(
        f"[bold]Ticket server[/]: {opts.tickets} tickets, {mode}, {opts.clients} client "
        f"connections, {opts.kills} kill(s)\n[dim]server {_where(url)}[/]"
    )
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("tickets sold", total=opts.tickets)

        def on_event(ev: Any) -> None:
            s = _SERVER_STYLE.get(ev.kind, "")
            text = f"[{s}]{escape(ev.message)}[/]" if s else escape(ev.message)
            progress.console.print(f"[dim]{ev.at:7.3f}s[/] {text}")

        def on_progress(sold: int, total: int) -> None:
            progress.update(task, completed=min(sold, total))

        result = demo.run(opts, on_event=on_event, on_progress=on_progress)
    d = result.as_dict()
    lat = d["latency_ms"]
    t = Table(title="The checker (database, clients, registry)", show_header=False)
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_column("")
    t.add_row("tickets sold", f"{d['sold']} / {d['tickets']}", f"{d['remaining']} left")
    t.add_row("oversold / sold twice", f"{d['oversold']} / {d['sold_twice']}",
              _mark(d["oversold"] == 0 and d["sold_twice"] == 0))  # fmt: skip
    t.add_row("tokens increasing", "yes" if d["tokens_increasing"] else "no",
              _mark(d["tokens_increasing"]))  # fmt: skip
    t.add_row("sales acknowledged to their client", f"{d['acked']} / {d['sold']}",
              _mark(d["ack_mismatches"] == 0 and d["unacked_sales"] == 0))  # fmt: skip
    deaths = ", ".join(f"{x:.1f} ms" for x in d["death_report_ms"]) or "-"
    t.add_row("kills / deaths in the registry", f"{d['kills']} / {d['deaths_recorded']}",
              f"reported {deaths} after SIGKILL")  # fmt: skip
    recovery = ", ".join(f"{x:.1f} ms" for x in d["lock_recovery_ms"]) or "-"
    t.add_row("lock back in use after a kill", recovery, "")
    t.add_row("false deaths", str(d["false_deaths"]), _mark(d["false_deaths"] == 0))
    t.add_row("client retries", str(d["retries"]), f"{d['connections']} connections opened")
    t.add_row("worker processes", str(d["processes"]),
              f"{d['sessions_joined']} sessions joined, {d['sessions_left']} left")  # fmt: skip
    t.add_row("throughput", f"{d['throughput_per_s']} tickets/s", f"{d['duration_s']:.2f} s")
    t.add_row(
        "latency (client side, retries included)",
        f"p50 {lat['p50']} ms",
        f"p95 {lat['p95']} ms, p99 {lat['p99']} ms, max {lat['max']} ms",
    )
    console.print(t)
    _verdict(
        console,
        result.ok,
        "every ticket sold once, to the client that asked; the kill showed up in the registry.",
        list(result.failures),
    )
    return result


def register(group: click.Group) -> None:
    """Add ``demo`` to the ``procsync`` command."""
    group.add_command(demo)
