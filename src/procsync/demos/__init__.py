"""Runnable demos: the examples of the user's notes, made real with procsync.

Each demo is a module here that does the work (real processes, real signals, a
checker that fails loudly) and reports through callbacks and a result record; the
``procsync demo NAME`` command (:mod:`procsync.cli.demo`) draws it on the terminal.

:data:`CATALOGUE` is the list ``procsync demo`` shows. A new demo plugs in by adding
one :class:`DemoInfo` entry that names its click command; nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import final

__all__ = ["CATALOGUE", "DemoInfo", "find"]


@final
@dataclass(frozen=True, slots=True)
class DemoInfo:
    """One entry of ``procsync demo``'s list."""

    name: str
    """What follows ``procsync demo`` on the command line."""
    summary: str
    """One line: what runs and what it proves."""
    lesson: str
    """The example of the notes (and the primitive) it makes real."""
    command: str
    """``"module:attribute"`` of its click command, imported only when it runs."""


#: Every demo, in the order ``procsync demo`` lists them.
CATALOGUE: tuple[DemoInfo, ...] = (
    DemoInfo(
        name="tickets",
        summary="buyers race for tickets in SQLite; fencing tokens keep it exact under --chaos",
        lesson="抢票, Lock",
        command="procsync.cli.demo:tickets",
    ),
    DemoInfo(
        name="isolation",
        summary="the notes' first program twice: multiprocessing prints 100, procsync.Value 0",
        lesson="数据隔离, Value",
        command="procsync.cli.demo:isolation",
    ),
    DemoInfo(
        name="daemon",
        summary="workers report alive through a daemon process; kill one, the registry sees it",
        lesson="守护进程报活, Session",
        command="procsync.cli.demo:daemon",
    ),
    DemoInfo(
        name="server",
        summary="a TCP ticket server, pre-fork or per connection, under load; a worker is killed",
        lesson="socket server 多进程, Lock",
        command="procsync.cli.demo:server",
    ),
    DemoInfo(
        name="ktv",
        summary="10 people, a room for 3: a live timeline; server clocks prove never more than 3",
        lesson="KTV, Semaphore",
        command="procsync.cli.demo:ktv",
    ),
    DemoInfo(
        name="traffic",
        summary="a traffic light, cars and police cars; proves no car passed on red",
        lesson="红绿灯, Event",
        command="procsync.cli.demo:traffic",
    ),
    DemoInfo(
        name="fleet",
        summary="100 machines x 100 processes report alive; kills some, times the death reports",
        lesson="100台机器报活, Session",
        command="procsync.cli.registry:fleet",
    ),
)


def find(name: str) -> DemoInfo | None:
    """The catalogue entry called ``name``, or None."""
    for info in CATALOGUE:
        if info.name == name:
            return info
    return None
