"""Issue 4, heartbeat modes: ``Session(heartbeat="process")`` keeps a session alive
while the main thread is stuck in C code holding the GIL, reports its parent's
death at once, and ends with it.

The GIL-holding call is ``ctypes.PyDLL(None).sleep(n)``: libc's ``sleep`` called
through ``PyDLL``, which by its documented contract does *not* release the GIL
during the call (``CDLL`` does). That is exactly a C extension stuck in a long call
without ``Py_BEGIN_ALLOW_THREADS``, and unlike a pathological regex or
``sum(range(...))`` (which also hold it, since no bytecode runs) it lasts a known
time on any machine.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

import procsync
from helpers.procs import ChildFactory
from procsync import LivenessEvent, registry

pytest_plugins = ["helpers.fixtures"]

TTL = 1.0

STUCK = """
import ctypes
s = Session(name={name!r}, ttl={ttl}, heartbeat={mode!r})
say("sid", s.id, s.heartbeat_pid)
hear()
ctypes.PyDLL(None).sleep({secs})   # holds the GIL: no thread of this process runs
say("after", s.lost)
hear()
"""


def first(
    it: Iterator[LivenessEvent], pred: Callable[[LivenessEvent], bool]
) -> LivenessEvent | None:
    for ev in it:
        if pred(ev):
            return ev
    return None


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait (pidfd, bounded) until process ``pid`` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def test_gil_held_past_three_ttls_process_mode_lives_thread_mode_dies(
    ps_url: str, children: ChildFactory
) -> None:
    secs = int(3 * TTL) + 1  # libc sleep() takes whole seconds
    pos = registry.position()
    t = children(STUCK.format(name="thread", ttl=TTL, mode="thread", secs=secs), name="thread")
    p = children(STUCK.format(name="process", ttl=TTL, mode="process", secs=secs), name="process")
    tsid, none = t.expect("sid")
    psid, hb_pid = p.expect("sid")
    assert none == "None" and int(hb_pid) > 0
    t.send()
    p.send()
    # Collect every death while both are stuck (bounded by the GIL hold itself).
    deaths = {
        ev.session_id: ev
        for ev in procsync.watch(pos, timeout=secs, types={"died"}, check_pids=False)
    }
    assert psid not in deaths, "the heartbeat process did not keep its session alive"
    assert tsid in deaths, "the stuck thread-mode session was not reported dead"
    dead = {s.id: s for s in procsync.sessions()}[tsid]
    assert deaths[tsid].at - dead.last_heartbeat <= TTL + 1.0
    assert t.expect("after") == ["True"]  # it learns it lost its session
    assert p.expect("after") == ["False"]
    alive = {s.id: s for s in procsync.sessions()}[psid]
    assert alive.state == "alive" and alive.heartbeat == "process"


def test_heartbeat_process_reports_its_parents_death_at_once(
    ps_url: str, children: ChildFactory
) -> None:
    pos = registry.position()
    c = children(STUCK.format(name="p", ttl=30, mode="process", secs=0), name="p")
    sid, hb_pid = c.expect("sid")
    killed_at = time.time()
    c.kill()
    # No waiter, no pid check by the watcher, a ttl of 30 s: only the heartbeat
    # process can have reported it.
    died = first(
        procsync.watch(pos, timeout=5, types={"died"}, check_pids=False),
        lambda e: e.session_id == sid,
    )
    assert died is not None and died.at - killed_at < 1.0
    assert wait_gone(int(hb_pid), 5.0), "the heartbeat process outlived its parent"


def test_close_is_a_clean_leave_and_stops_the_process(ps_url: str) -> None:
    pos = registry.position()
    s = procsync.Session(name="clean", ttl=TTL, heartbeat="process")
    hb = s.heartbeat_pid
    assert hb is not None and not s.lost
    s.close()
    assert wait_gone(hb, 5.0)
    left = first(procsync.watch(pos, timeout=5), lambda e: e.type in ("left", "died"))
    assert left is not None and left.type == "left" and left.session_id == s.id


def test_forced_session_is_lost_in_process_mode(ps_url: str) -> None:
    s = procsync.Session(name="forced", ttl=TTL, heartbeat="process")
    lock = procsync.Lock("pm")
    lock.acquire()
    lost = threading.Event()
    lock.on_lost(lambda *_: lost.set())
    registry.force_release("pm", by="test")
    assert lost.wait(5), "the hold was not reported lost"
    assert lock.lost and s.lost
    with contextlib.suppress(procsync.LockLostError):
        lock.release()
    s.close()


def test_a_killed_heartbeat_process_loses_the_session(ps_url: str) -> None:
    s = procsync.Session(name="orphan", ttl=TTL, heartbeat="process")
    lost = threading.Event()
    s.on_lost(lambda *_: lost.set())
    hb = s.heartbeat_pid
    assert hb is not None
    os.kill(hb, signal.SIGKILL)  # only its own heartbeat process, by pid
    assert lost.wait(5), "nobody renews the session any more: it must be reported lost"
    assert s.lost and "heartbeat process" in (s.lost_reason or "")
    s.close()


def test_sigterm_from_a_finished_starter_thread_does_not_end_it(ps_url: str) -> None:
    # PR_SET_PDEATHSIG fires when the *thread* that started the child ends: the
    # heartbeat process must only look, and keep beating while its parent lives.
    box: list[procsync.Session] = []
    t = threading.Thread(
        target=lambda: box.append(procsync.Session(name="t", ttl=TTL, heartbeat="process"))
    )
    t.start()
    t.join(30)
    (s,) = box
    hb = s.heartbeat_pid
    assert hb is not None
    os.kill(hb, signal.SIGTERM)  # as the kernel sent when the starter thread ended
    pos = registry.position()
    gone = first(procsync.watch(pos, timeout=2 * TTL, check_pids=False), lambda e: True)
    assert gone is None, f"unexpected {gone}"
    assert not s.lost
    s.close()


def test_bad_mode_rejected() -> None:
    with pytest.raises(ValueError, match="heartbeat"):
        procsync.Session(heartbeat="daemon", url="redis://unused")
