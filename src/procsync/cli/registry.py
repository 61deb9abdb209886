"""``procsync ps | ls | show | watch | release``: the liveness registry on the terminal.

Every command is a thin view of :mod:`procsync.registry` and takes ``--json``
(``watch --json`` prints one JSON object per line, as events arrive). Without
``--url`` or ``PROCSYNC_URL`` the commands read the embedded server; ``ps``, ``ls``
and ``show`` never start it just to report that nothing runs.

Also the ``fleet`` demo's command (:func:`fleet`), listed in
:data:`procsync.demos.CATALOGUE`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import click

from procsync import registry
from procsync.errors import ProcsyncError

__all__ = ["fleet", "register"]

F = TypeVar("F", bound=Callable[..., Any])


def _server_options(f: F) -> F:
    f = click.option(
        "--namespace", default=None, help="Namespace (default: $PROCSYNC_NAMESPACE or 'default')."
    )(f)
    f = click.option(
        "--url", default=None, help="Server URL (default: $PROCSYNC_URL, else the embedded server)."
    )(f)
    return f


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


def _no_server(url: str | None) -> bool:
    """True when no URL is given anywhere and the embedded server is not running."""
    if url is not None:
        return False
    from procsync import _config
    from procsync.backend import embedded

    return _config.env_url() is None and not embedded.status().running


def _dump(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    elif isinstance(value, list):
        value = [dataclasses.asdict(v) for v in value]
    return json.dumps(value, ensure_ascii=False, default=str)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    d = max(0.0, now - t)
    if d < 60:
        return f"{d:.1f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    return f"{d / 3600:.1f}h ago"


def _when(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


_STATE_STYLE = {"alive": "green", "stalled": "yellow", "dead": "red", "left": "dim"}
_EVENT_STYLE = {
    "joined": "green",
    "left": "dim",
    "died": "bold red",
    "stalled": "yellow",
    "resumed": "green",
    "forced": "bold magenta",
}


def _console() -> Any:
    from rich.console import Console

    return Console()


def _fail(exc: BaseException) -> click.ClickException:
    return click.ClickException(str(exc))


# -- ps ----------------------------------------------------------------------------------------


def _holds_text(s: registry.SessionInfo) -> str:
    return ", ".join(
        f"{h.kind}:{h.name}" + ("" if h.role == "holds" else " (waits)") for h in s.holds
    )


@click.command("ps")
@click.option("--alive", is_flag=True, help="Only live sessions (alive or stalled).")
@_json_option
@_server_options
def ps(alive: bool, as_json: bool, url: str | None, namespace: str | None) -> None:
    """List the sessions: who is alive, stalled, dead or left (ended ones for an hour)."""
    if _no_server(url):
        if as_json:
            click.echo("[]")
        else:
            click.echo("no procsync server is running: no sessions", err=True)
        return
    try:
        rows = registry.sessions(include_ended=not alive, url=url, namespace=namespace)
    except (ProcsyncError, ValueError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(_dump(rows))
        return
    from rich.table import Table

    now = time.time()
    t = Table(title=f"{len(rows)} session(s)", title_justify="left")
    for col in ("ID", "NAME", "HOST", "PID", "STATE", "STARTED", "LAST BEAT", "HOLDS"):
        t.add_column(col, no_wrap=col in ("ID", "PID", "STATE"))
    for s in rows:
        style = _STATE_STYLE.get(s.state, "")
        state = s.state if not s.forced_by else f"{s.state} (forced by {s.forced_by})"
        last = s.ended if s.ended is not None else s.last_heartbeat
        t.add_row(
            s.id[:8],
            s.name,
            s.host,
            str(s.pid),
            f"[{style}]{state}[/]" if style else state,
            _ago(s.started, now),
            ("ended " if s.ended is not None else "") + _ago(last, now),
            _holds_text(s),
        )
    _console().print(t)


# -- ls / show ---------------------------------------------------------------------------------


def _holders_text(p: registry.PrimitiveInfo, now: float) -> str:
    out = []
    for h in p.holders:
        part = f"{h.host}/{h.pid}"
        if h.permits > 1:
            part += f" x{h.permits}"
        if h.since is not None:
            part += f" since {_ago(h.since, now)}"
        if h.session_state not in ("alive", "stalled"):
            part += f" ({h.session_state})"
        out.append(part)
    return ", ".join(out)


def _waiters_text(p: registry.PrimitiveInfo) -> str:
    text = ", ".join(f"{w.host}/{w.pid}" for w in p.waiters)
    if p.waiting > len(p.waiters):
        text += f" (+{p.waiting - len(p.waiters)} more)"
    return text


@click.command("ls")
@click.option(
    "--kind", type=click.Choice(list(registry.KINDS)), default=None, help="Only this kind."
)
@_json_option
@_server_options
def ls(kind: str | None, as_json: bool, url: str | None, namespace: str | None) -> None:
    """List the primitives that have state: kind, name, state, holders, waiters in order."""
    if _no_server(url):
        if as_json:
            click.echo("[]")
        else:
            click.echo("no procsync server is running: no primitives", err=True)
        return
    try:
        rows = registry.primitives(kind=kind, url=url, namespace=namespace)
    except (ProcsyncError, ValueError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(_dump(rows))
        return
    from rich.table import Table

    now = time.time()
    t = Table(title=f"{len(rows)} primitive(s) with state", title_justify="left")
    for col in ("KIND", "NAME", "STATE", "HOLDERS (host/pid)", "WAITERS (in order)"):
        t.add_column(col)
    for p in rows:
        t.add_row(p.type, p.name, p.state, _holders_text(p, now), _waiters_text(p))
    _console().print(t)


@click.command("show")
@click.argument("name")
@click.option("--kind", type=click.Choice(list(registry.KINDS)), default=None)
@_json_option
@_server_options
def show(
    name: str, kind: str | None, as_json: bool, url: str | None, namespace: str | None
) -> None:
    """Show one primitive: state, numbers, every holder and waiter."""
    try:
        p = (
            None
            if _no_server(url)
            else registry.describe(name, kind=kind, url=url, namespace=namespace)
        )
    except (ProcsyncError, ValueError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo("null" if p is None else _dump(p))
        if p is None:
            sys.exit(1)
        return
    if p is None:
        raise click.ClickException(
            f"no primitive named {name!r} has state on the server (a free Lock or "
            "Semaphore, or a clear Event nobody waits on, keeps none)"
        )
    from rich.table import Table

    console = _console()
    now = time.time()
    console.print(f"[bold]{p.type}[/] {p.name!r}: {p.state}")
    for k, v in p.details.items():
        console.print(f"  {k}: {v}")
    if p.holders:
        t = Table(title="holders", title_justify="left")
        for col in ("SESSION", "NAME", "HOST", "PID", "PERMITS", "SINCE", "SESSION STATE"):
            t.add_column(col)
        for h in p.holders:
            t.add_row(
                h.session_id[:8],
                h.name,
                h.host,
                str(h.pid),
                str(h.permits),
                _ago(h.since, now),
                h.session_state,
            )
        console.print(t)
    if p.waiters:
        t = Table(title=f"waiters ({p.waiting}, in order)", title_justify="left")
        for col in ("#", "WAITER", "NAME", "HOST", "PID", "SESSION STATE"):
            t.add_column(col)
        for i, w in enumerate(p.waiters, 1):
            t.add_row(str(i), w.waiter_id[:10], w.name, w.host, str(w.pid), w.session_state)
        console.print(t)


# -- watch ---------------------------------------------------------------------------------------


@click.command("watch")
@click.option(
    "--from",
    "after",
    default="$",
    show_default=True,
    help="Stream position: '$' new events only, '0' all retained, or an event id to resume.",
)
@click.option("--count", type=click.IntRange(min=0), default=None, help="Stop after N events.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None, help="Stop after S seconds.")
@click.option(
    "--type",
    "types",
    multiple=True,
    type=click.Choice(list(registry.EVENT_TYPES)),
    help="Only these event types (repeatable).",
)
@_json_option
@_server_options
def watch(
    after: str,
    count: int | None,
    timeout: float | None,
    types: tuple[str, ...],
    as_json: bool,
    url: str | None,
    namespace: str | None,
) -> None:
    """Follow joins, leaves, deaths, stalls and forced ends as they happen.

    While it runs it also reports deaths promptly: it ends expired sessions at their
    deadline and watches the processes of this host's sessions."""
    console = None if as_json else _console()
    events: Iterable[registry.LivenessEvent] = registry.watch(
        after, timeout=timeout, count=count, types=types or None, url=url, namespace=namespace
    )
    try:
        for ev in events:
            if console is None:
                click.echo(_dump(ev))
                continue
            style = _EVENT_STYLE.get(ev.type, "")
            extra = f" by {ev.by} ({ev.what})" if ev.type == "forced" else ""
            console.print(
                f"{_when(ev.at)}  [{style}]{ev.type:<8}[/] {ev.name}  {ev.host}/{ev.pid}  "
                f"[dim]{ev.session_id[:8]} {ev.id}[/]{extra}",
                highlight=False,
            )
    except (ProcsyncError, ValueError) as exc:
        raise _fail(exc) from exc
    except KeyboardInterrupt:
        pass


# -- release --force -------------------------------------------------------------------------


@click.command("release")
@click.argument("name")
@click.option("--force", is_flag=True, help="Required: end the holder's session.")
@click.option("--kind", type=click.Choice(["lock", "rlock", "sem", "bsem"]), default=None)
@click.option("--session", default=None, help="Only the holder whose session id starts so.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_json_option
@_server_options
def release(
    name: str,
    force: bool,
    kind: str | None,
    session: str | None,
    yes: bool,
    as_json: bool,
    url: str | None,
    namespace: str | None,
) -> None:
    """Take a lock or semaphore away from a stuck holder (operator's last resort).

    The holder's whole session ends (recorded as 'forced', with who did it): every
    hold it had is lost, which it learns at its next heartbeat, and the next waiters
    get what it held."""
    if not force:
        raise click.UsageError("releasing another process's hold needs --force")
    try:
        if _no_server(url):
            raise click.ClickException("no procsync server is running")
        p = registry.describe(name, kind=kind, url=url, namespace=namespace)
        holders = (
            []
            if p is None
            else [h for h in p.holders if not session or h.session_id.startswith(session)]
        )
        if p is None or not holders:
            raise click.ClickException(f"{name!r} is not held: nothing to release")
        if not yes:
            who = "; ".join(
                f"{h.name} on {h.host} pid {h.pid} ({h.session_id[:8]})" for h in holders
            )
            click.confirm(
                f"End the session of {who}? Every hold of it is lost, and the next waiters "
                f"of {p.type} {p.name!r} get it.",
                abort=True,
                err=True,
            )
        ended = registry.force_release(
            name, kind=p.kind, session=session, url=url, namespace=namespace
        )
    except (ProcsyncError, ValueError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(_dump(ended))
        return
    for h in ended:
        click.echo(f"ended session {h.session_id[:8]} ({h.name} on {h.host} pid {h.pid})")


# -- the fleet demo ------------------------------------------------------------------------------


@click.command("fleet")
@click.option("--machines", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option(
    "--procs",
    type=click.IntRange(1, 10_000),
    default=100,
    show_default=True,
    help="Processes per machine.",
)
@click.option("--ttl", type=click.FloatRange(0.5, 600), default=5.0, show_default=True)
@click.option(
    "--kill", type=click.IntRange(min=0), default=None, help="Sessions to kill (default 1%)."
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    help="Worker processes (0: one per CPU, 2..4).",
)
@click.option(
    "--steady",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds measured before the kills (default: one ttl).",
)
@click.option(
    "--batch/--no-batch",
    default=True,
    show_default=True,
    help="Pipeline each worker's due renewals (still one script call each).",
)
@click.option("--seed", type=int, default=None)
@_json_option
@click.option("--url", default=None, help="Server URL (default: $PROCSYNC_URL, else embedded).")
@click.option("--namespace", default=None, help="Default: a fresh one, purged at the end.")
def fleet(
    machines: int,
    procs: int,
    ttl: float,
    kill: int | None,
    workers: int,
    steady: float | None,
    batch: bool,
    seed: int | None,
    as_json: bool,
    url: str | None,
    namespace: str | None,
) -> None:
    """100 machines x 100 processes report alive; kill some and time their reports."""
    from procsync.demos import fleet as demo

    cfg = demo.FleetConfig(
        machines=machines,
        procs=procs,
        ttl=ttl,
        kill=kill,
        workers=workers,
        steady=steady,
        batch=batch,
        url=url,
        namespace=namespace,
        seed=seed,
    )
    console = _console()
    err = _console_err()

    def progress(msg: str) -> None:
        (err if as_json else console).print(f"[dim]{msg}[/]", highlight=False)

    try:
        result = demo.run(cfg, progress)
    except (ProcsyncError, ValueError, RuntimeError) as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(json.dumps(result.as_dict()))
    else:
        from rich.table import Table

        t = Table(title="fleet: liveness under load", title_justify="left")
        t.add_column("measure")
        t.add_column("value", justify="right")
        for k, v in result.as_dict().items():
            t.add_row(k, "-" if v is None else str(v))
        console.print(t)
        verdict = (
            "[green]no false deaths[/]"
            if result.false_deaths == 0
            else f"[red]{result.false_deaths} false deaths[/]"
        )
        console.print(verdict)
        if result.max_send_lag_s > ttl / 3:
            console.print(
                f"[yellow]the simulator fell behind its own schedule (renewals up to "
                f"{result.max_send_lag_s:.2f}s late): deaths of unkilled sessions are the "
                "simulator's; use --batch, more --workers or a longer --ttl[/]"
            )
    if result.false_deaths or result.detected < result.killed:
        sys.exit(1)


def _console_err() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def register(group: click.Group) -> None:
    """Add ps, ls, show, watch and release to ``group`` (and a ``demo fleet`` command
    while the demo group itself is not installed)."""
    for cmd in (ps, ls, show, watch, release):
        group.add_command(cmd)
    if "demo" not in group.commands:

        @click.group("demo")
        def demo_group() -> None:
            """Runnable demos."""

        demo_group.add_command(fleet)
        group.add_command(demo_group)
